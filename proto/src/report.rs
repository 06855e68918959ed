//! The device state report, published by the agent on `<p>/d/{device}/state`.
//!
//! It says which model each slot holds, which slot serves, how far an update has come, and
//! the last error with its reason, so operators see why a device did not move.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::DecodeError;

/// Largest state report accepted.
pub const MAX_REPORT_BYTES: usize = 256 * 1024;

/// One of the two slots a model has on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    /// Slot A.
    A,
    /// Slot B.
    B,
}

impl Slot {
    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Slot::A => "a",
            Slot::B => "b",
        })
    }
}

/// A model version held in a slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotContent {
    /// Model version.
    pub version: u64,
    /// Hex SHA-256 of the artifact.
    pub sha256: String,
}

/// Where an update stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Chunks are being fetched.
    Downloading,
    /// The artifact is complete and being checked and loaded.
    Staging,
    /// The new version serves on trial; the previous one is kept to swap back.
    Probation,
    /// The new version serves.
    Active,
    /// The update was rejected; see `last_error`.
    Failed,
    /// The download policy holds the update back (see [`UpdateProgress::held`]): a
    /// maintenance window, or a metered link.
    Waiting,
}

/// What holds an update back ([`Phase::Waiting`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "lowercase")]
pub enum Held {
    /// The maintenance window, closed until `until` (Unix seconds).
    Window {
        /// When it opens.
        until: u64,
        /// What waits: the activation (the download is complete or may go on) or both.
        activation_only: bool,
    },
    /// The link is metered and the deployment does not allow metered downloads.
    Metered,
}

impl std::fmt::Display for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Held::Window {
                until,
                activation_only,
            } => {
                let what = if *activation_only {
                    "activation"
                } else {
                    "download"
                };
                let at = time::OffsetDateTime::from_unix_timestamp(*until as i64)
                    .ok()
                    .and_then(|t| {
                        t.format(&time::format_description::well_known::Rfc3339)
                            .ok()
                    })
                    .unwrap_or_else(|| until.to_string());
                write!(f, "{what} waiting for the maintenance window until {at}")
            }
            Held::Metered => f.write_str("paused: metered link"),
        }
    }
}

/// Progress of the most recent update of one model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateProgress {
    /// Version being installed.
    pub version: u64,
    /// Phase.
    pub phase: Phase,
    /// Bytes received and verified so far.
    pub received_bytes: u64,
    /// Artifact size.
    pub total_bytes: u64,
    /// Bytes of the download the device copied from artifacts it already held (chunks with
    /// the same digest) instead of downloading them; part of `received_bytes`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reused_bytes: u64,
    /// What holds the update back, in [`Phase::Waiting`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<Held>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The state of one model on a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelState {
    /// The slot that serves, if any.
    pub active: Option<Slot>,
    /// Slot A's content.
    pub a: Option<SlotContent>,
    /// Slot B's content.
    pub b: Option<SlotContent>,
    /// The latest update, if any.
    pub update: Option<UpdateProgress>,
    /// What runs the serving version, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineReport>,
    /// The last shadow phase of a new version: under way, passed or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowSummary>,
    /// A new version on probation answering a share beside the last good one, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryState>,
    /// How long the model answered nothing (503) in its latest low-memory swap, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_memory_swap_ms: Option<u64>,
}

/// A new version on probation answering a share of the requests beside the last good one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanaryState {
    /// The canary's version.
    pub version: u64,
    /// Its share of the requests that name no version, percent.
    pub percent: u32,
    /// The request header that keeps clients on one version, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// How a new version answered live requests beside the serving one, in its shadow phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowSummary {
    /// The candidate version.
    pub version: u64,
    /// Answers compared so far.
    pub compared: u32,
    /// Answers the phase asks for.
    pub wanted: u32,
    /// Mirrored requests dropped (the queue full, or over the CPU budget).
    pub dropped: u64,
    /// Argmax agreement on classifier outputs, per thousand rows (none without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement_permille: Option<u32>,
    /// Largest absolute difference of any output value (infinite for a NaN or infinity on
    /// one side only).
    pub max_abs_diff: f64,
    /// Mean absolute difference over every output value.
    pub mean_abs_diff: f64,
    /// Kolmogorov–Smirnov distance between the two answers' values on regressor outputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ks: Option<f64>,
    /// The serving model's p99 latency on the mirrored requests, µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_p99_us: Option<u64>,
    /// The candidate's, µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_p99_us: Option<u64>,
    /// `passed`, `failed`, `cancelled` (the desired state moved on) or, while it runs,
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
}

// The judge never stores a NaN (a NaN difference counts as infinite), so equality is an
// equivalence.
impl Eq for ShadowSummary {}

/// The engine that runs a model on a device, and why it was chosen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineReport {
    /// `tract`, or `onnxruntime/<provider>`.
    pub backend: String,
    /// Why: configured, or measured fastest.
    pub reason: String,
    /// Every backend tried at staging, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trials: Vec<EngineTrial>,
}

/// One backend tried at staging.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineTrial {
    /// `tract`, or `onnxruntime/<provider>`.
    pub backend: String,
    /// The p95 of its warm-up runs, microseconds of CPU time, if it passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p95_us: Option<u64>,
    /// Why it did not, if it did not (load, golden vectors, latency budget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ModelState {
    /// The version that serves, if any.
    pub fn serving_version(&self) -> Option<u64> {
        let slot = match self.active? {
            Slot::A => self.a.as_ref(),
            Slot::B => self.b.as_ref(),
        };
        slot.map(|c| c.version)
    }
}

/// The last error a device hit, with its reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedError {
    /// Model concerned, if any.
    pub model: Option<String>,
    /// Version concerned, if any.
    pub version: Option<u64>,
    /// What kind of error: what the fleet decides by (never the reason's wording).
    #[serde(default)]
    pub kind: ErrorKind,
    /// Human-readable reason, for people.
    pub reason: String,
    /// Unix seconds.
    pub at: i64,
}

/// What kind of error a device reports: what the fleet decides by (a rollout counts a device
/// as failed for a kind that is a verdict on the version, never for its reason's wording).
/// New kinds may come: a kind this build does not know reads as [`ErrorKind::Failed`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// A download is waiting for chunks and keeps retrying: not a verdict on the version.
    Stalled,
    /// The device's store lost something (a damaged artifact, a rebuilt database) and is
    /// healing: not a verdict on the version.
    Healing,
    /// A chunk arrived damaged; it is asked for again, and after repeated damage the
    /// download backs off and retries: not a verdict on the version.
    Chunk,
    /// No room for the artifact on the device: not a verdict on the version.
    NoSpace,
    /// The device's own key could not be used (its PKCS#11 token locked, unplugged or
    /// failing): not a verdict on the version.
    DeviceKey,
    /// Signed metadata or an artifact's digest did not verify.
    Verification,
    /// The artifact does not load (or its golden file does not read back).
    Staging,
    /// The model's answer to its golden vectors differs beyond the tolerance.
    GoldenMismatch,
    /// The model's warm-up missed its latency budget.
    LatencyBudget,
    /// In its shadow phase, the version's answers to live requests differed from the serving
    /// model's beyond the deployment's thresholds (or it failed, hung or saw no traffic): it
    /// never served.
    Shadow,
    /// An older version than one already installed was refused.
    Downgrade,
    /// The version on trial was rolled back (probation, a desired state going back).
    RolledBack,
    /// The version on trial crashed the agent at start-up too often, or no longer loads.
    CrashLoop,
    /// Anything else, and any kind this build does not know.
    #[default]
    #[serde(other)]
    Failed,
}

impl ErrorKind {
    /// Whether the error passes by itself and says nothing against the version.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorKind::Stalled
                | ErrorKind::Healing
                | ErrorKind::Chunk
                | ErrorKind::NoSpace
                | ErrorKind::DeviceKey
        )
    }
}

#[cfg(test)]
mod error_kind_tests {
    use super::*;

    #[test]
    fn a_kind_round_trips_and_an_unknown_or_missing_one_reads_as_failed() {
        let error = ReportedError {
            model: Some("m".into()),
            version: Some(2),
            kind: ErrorKind::Stalled,
            reason: "download stalled".into(),
            at: 1,
        };
        let json = serde_json::to_string(&error).unwrap();
        assert!(json.contains(r#""kind":"stalled""#), "{json}");
        assert_eq!(serde_json::from_str::<ReportedError>(&json).unwrap(), error);
        let newer = json.replace("stalled\"", "from_the_future\"");
        let read: ReportedError = serde_json::from_str(&newer).unwrap();
        assert_eq!(read.kind, ErrorKind::Failed);
        let older = r#"{"model":null,"version":null,"reason":"x","at":0}"#;
        let read: ReportedError = serde_json::from_str(older).unwrap();
        assert_eq!(read.kind, ErrorKind::Failed);
    }

    #[test]
    fn every_kind_has_a_stable_name_and_only_passing_ones_are_transient() {
        use ErrorKind::*;
        let named = [
            (Stalled, "stalled", true),
            (Healing, "healing", true),
            (Chunk, "chunk", true),
            (NoSpace, "no_space", true),
            (DeviceKey, "device_key", true),
            (Shadow, "shadow", false),
            (Verification, "verification", false),
            (Staging, "staging", false),
            (GoldenMismatch, "golden_mismatch", false),
            (LatencyBudget, "latency_budget", false),
            (Downgrade, "downgrade", false),
            (RolledBack, "rolled_back", false),
            (CrashLoop, "crash_loop", false),
            (Failed, "failed", false),
        ];
        for (kind, name, transient) in named {
            assert_eq!(serde_json::to_value(kind).unwrap(), name);
            assert_eq!(
                serde_json::from_value::<ErrorKind>(name.into()).unwrap(),
                kind
            );
            assert_eq!(kind.is_transient(), transient, "{name}");
        }
    }
}

/// The full state report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceReport {
    /// Payload format version.
    pub format: u32,
    /// Device id.
    pub device: String,
    /// The device's labels (group membership is a selector over these).
    pub labels: BTreeMap<String, String>,
    /// Agent version string.
    pub agent_version: String,
    /// Model name → state.
    pub models: BTreeMap<String, ModelState>,
    /// The last error, if any.
    pub last_error: Option<ReportedError>,
    /// Version of the last desired state accepted.
    pub desired_version: u64,
    /// Unix seconds when the report was made.
    pub at: i64,
    /// The backends the device has and the artifact forms it would rather receive (the
    /// director sends each device the form it prefers, [`crate::engine::choose_form`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engines: Option<crate::engine::Engines>,
    /// The device's sealing key (hex: X25519, or P-256 when it is in a PKCS#11 token), to
    /// which servers seal the content keys of encrypted models ([`crate::seal`]); its private
    /// half never leaves the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealing_key: Option<String>,
}

impl DeviceReport {
    /// Decodes untrusted bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_REPORT_BYTES {
            return Err(DecodeError::Invalid {
                what: "device report",
                reason: format!("{} bytes is too large", bytes.len()),
            });
        }
        let r: DeviceReport =
            serde_json::from_slice(bytes).map_err(|e| DecodeError::json("device report", e))?;
        if r.format != crate::FORMAT_VERSION {
            return Err(DecodeError::Version {
                what: "device report",
                found: r.format,
                expected: crate::FORMAT_VERSION,
            });
        }
        Ok(r)
    }

    /// Encodes to JSON bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("reports serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let r = DeviceReport {
            format: 1,
            device: "d".into(),
            labels: BTreeMap::from([("site".into(), "berlin".into())]),
            agent_version: "0.1.0".into(),
            models: BTreeMap::from([(
                "m".into(),
                ModelState {
                    active: Some(Slot::B),
                    a: None,
                    b: Some(SlotContent {
                        version: 2,
                        sha256: "00".into(),
                    }),
                    update: None,
                    shadow: Some(ShadowSummary {
                        version: 2,
                        compared: 200,
                        wanted: 200,
                        dropped: 3,
                        agreement_permille: Some(995),
                        max_abs_diff: 0.25,
                        mean_abs_diff: 0.001,
                        ks: None,
                        serving_p99_us: Some(120),
                        candidate_p99_us: Some(180),
                        verdict: Some("passed".into()),
                    }),
                    canary: Some(CanaryState {
                        version: 2,
                        percent: 10,
                        key: Some("x-user".into()),
                    }),
                    low_memory_swap_ms: Some(223),
                    engine: Some(EngineReport {
                        backend: "onnxruntime/cpu".into(),
                        reason: "measured fastest".into(),
                        trials: vec![EngineTrial {
                            backend: "tract".into(),
                            p95_us: Some(900),
                            error: None,
                        }],
                    }),
                },
            )]),
            last_error: None,
            desired_version: 3,
            at: 0,
            engines: None,
            sealing_key: Some("ab".repeat(32)),
        };
        let back = DeviceReport::from_slice(&r.to_vec()).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.models["m"].serving_version(), Some(2));
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = DeviceReport::from_slice(&bytes);
        }
    }
}
