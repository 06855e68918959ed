//! modelcast-agent: the device daemon.
//!
//! - [`config`]: TOML config, overridden by environment and flags.
//! - [`store`]: sled — trust, A/B slots, downloads, chunks, last error; [`store_error`]: its
//!   one error type (the artifact files' too).
//! - [`recovery`]: start-up — loading what the store holds, healing lost artifacts; opening a
//!   damaged store — the database moved aside and rebuilt from the
//!   verified artifact files and the mirrored trust state.
//! - [`slots`]: the A/B slot state machine of one model (install, trial, commit, rollback).
//! - [`transfer`]: the sans-IO chunk download of one artifact.
//! - [`update`]: the sans-IO update sequence of every model (download → staging → swap →
//!   trial → commit or rollback).
//! - [`engine`]: tract — load, one optimized plan per concrete input shape (bounded cache),
//!   golden check, run; tensors of every KServe v2 numeric type as little-endian bytes.
//! - [`kserve`]: the sans-IO Open Inference Protocol codec (JSON and binary tensors).
//! - [`serve`]: the local Open Inference Protocol (KServe v2) API over the serving models.
//! - [`link`]: MQTT (rumqttc): connect, last will, subscriptions, events in, publishes out.
//! - [`fetch`]: chunks as HTTP(S) byte ranges, when a deployment gives a base URL.
//! - [`identity`], [`enrol`]: the device's own key and certificate when it enrols by claim;
//!   when to ask for a certificate (sans-IO) and the claim connection that asks.
//! - [`driver`]: the one loop that feeds events to the update logic and acts on it.
//! - [`systemd`]: readiness, status and watchdog notifications.
//! - [`artifacts`]: the artifact files (reserved before they are written, each complete one
//!   with the manifest it was accepted under beside it).
//! - [`probation`]: the sans-IO judgement of a version on trial.
//! - [`memory`]: what a model needs (measured at publishing) against what the device has
//!   (`MemAvailable`, memory cgroups): beside the serving model, or the low-memory swap.
//! - [`shadow`]: a new version's shadow phase before it serves: live requests mirrored to it
//!   off the serving path, its answers compared with the serving model's (sans-IO judge, and
//!   the thread that runs it).
//! - [`metrics`], [`telemetry`], [`sampling`]: `/metrics`, the telemetry reports kept until
//!   the server acknowledges them, sampled inputs and outputs.
//! - [`priority`]: background threads that yield to serving.
//! - [`clock`]: the wall clock, in one unit. [`sys`]: every operating-system call (`unsafe`
//!   is allowed there only, and for one tract call in [`engine`]).
//! - `grpc` (feature `grpc`): the KServe v2 gRPC service.

#![deny(unsafe_code)]

pub(crate) mod artifacts;
pub(crate) mod clock;
pub mod config;
pub mod driver;
pub mod engine;
pub mod enrol;
pub mod fetch;
#[cfg(feature = "grpc")]
pub(crate) mod grpc;
pub mod identity;
pub mod inflate;
pub mod kserve;
pub mod link;
pub mod memory;
pub(crate) mod metrics;
pub mod priority;
pub mod probation;
pub(crate) mod recovery;
pub mod sampling;
pub(crate) mod sealing;
pub mod serve;
pub mod shadow;
pub mod slots;
pub mod store;
pub(crate) mod store_error;
pub(crate) mod sys;
pub mod systemd;
pub mod telemetry;
pub(crate) mod transfer;
pub mod update;

/// What this build carries, as `modelcast-agent --version` prints it after the version: its
/// inference backends and the optional parts built in (cargo features).
pub fn build_info() -> String {
    let parts = [
        ("onnx", cfg!(feature = "onnx")),
        ("grpc", cfg!(feature = "grpc")),
        ("ort", cfg!(feature = "ort")),
        ("multithread", cfg!(feature = "multithread")),
        ("pkcs11", cfg!(feature = "pkcs11")),
    ];
    let features: Vec<&str> = parts.iter().filter(|p| p.1).map(|p| p.0).collect();
    let backends = if cfg!(feature = "ort") {
        "tract, onnxruntime"
    } else {
        "tract"
    };
    format!(
        "{} (backends: {backends}; features: {})",
        env!("CARGO_PKG_VERSION"),
        if features.is_empty() {
            "none".to_string()
        } else {
            features.join(", ")
        }
    )
}
