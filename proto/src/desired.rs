//! The per-device desired state: what the fleet wants a device to run.
//!
//! Published retained on `<p>/d/{device}/desired`. It carries the operators' repository
//! metadata (TUF root rotations, timestamp, snapshot, targets) and the director's targets
//! document for this device, signed by the server's director key, as Uptane does. The agent
//! activates a model only when both agree (see [`crate::verify`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::DecodeError;
use crate::metadata::{Signed, MAX_METADATA_BYTES};

/// The repository metadata a device needs to check the operators' targets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RepositoryMetadata {
    /// Root documents newer than any a device may trust, oldest first (rotation chain).
    #[serde(default)]
    pub root: Vec<Signed>,
    /// Signed timestamp.
    pub timestamp: Signed,
    /// Signed snapshot.
    pub snapshot: Signed,
    /// Signed top-level targets (offline operator key).
    pub targets: Signed,
    /// The delegated targets roles (hash bins, see [`crate::bins`]) that hold this device's
    /// targets, by role name: only those, not the repository's whole history.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub delegated: BTreeMap<String, Signed>,
}

/// The desired-state message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredState {
    /// Payload format version.
    pub format: u32,
    /// The device this is for.
    pub device: String,
    /// The director's targets for this device; each target's `custom.device` names it, and
    /// the document's version is the device's desired-state counter.
    pub director: Signed,
    /// The operators' repository metadata.
    pub repository: RepositoryMetadata,
}

impl DesiredState {
    /// Decodes untrusted bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > 4 * MAX_METADATA_BYTES {
            return Err(DecodeError::Invalid {
                what: "desired state",
                reason: format!("{} bytes is too large", bytes.len()),
            });
        }
        let state: DesiredState =
            serde_json::from_slice(bytes).map_err(|e| DecodeError::json("desired state", e))?;
        if state.format != crate::FORMAT_VERSION {
            return Err(DecodeError::Version {
                what: "desired state",
                found: state.format,
                expected: crate::FORMAT_VERSION,
            });
        }
        Ok(state)
    }

    /// Encodes to JSON bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("json values serialize")
    }
}

/// A rollout's probation thresholds for the devices it moves. The director puts them in each
/// device's signed target (`custom.probation`); each field present overrides the device's
/// setting and the manifest's. Integers only: signed documents are canonical JSON, which has
/// no floating-point numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrialThresholds {
    /// Requests after which the trial is judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<u32>,
    /// Seconds after which the trial is judged (at most 30 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<u64>,
    /// Largest failed-request rate tolerated above the previous model's, in parts per
    /// thousand (0..=1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_permille: Option<u32>,
    /// Largest p99 latency tolerated, in percent of the previous model's (at least 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p99_percent: Option<u32>,
}

/// Longest trial a rollout may ask for.
pub const MAX_TRIAL_SECS: u64 = 30 * 24 * 3600;

impl TrialThresholds {
    /// Checks the ranges; the reason names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.seconds.is_some_and(|s| s > MAX_TRIAL_SECS) {
            return Err(format!("probation seconds above {MAX_TRIAL_SECS}"));
        }
        if self.max_error_permille.is_some_and(|p| p > 1000) {
            return Err("probation max_error_permille above 1000".into());
        }
        if self.max_p99_percent.is_some_and(|p| p < 100) {
            return Err("probation max_p99_percent below 100".into());
        }
        Ok(())
    }

    /// No field is set.
    pub fn is_empty(&self) -> bool {
        *self == TrialThresholds::default()
    }
}

/// A deployment's shadow phase (`custom.shadow`): before the new version serves, the device
/// loads it beside the serving one and mirrors a share of its live requests to it, off the
/// serving path, comparing the two answers. The version swaps in only if the comparison
/// passes; else it is dropped and never serves.
///
/// The phase ends when `requests` answers were compared, or after `seconds` (judged on what
/// was compared by then; nothing compared fails). Each output is compared: classifier outputs
/// (a last dimension of 2 or more) by argmax agreement, every output by its largest and mean
/// absolute difference and, for the others (regressors), by the two-sample
/// Kolmogorov–Smirnov distance between the two answers' values.
///
/// Whole numbers only: the spec is signed in the director's targets, whose canonical JSON has
/// no fractions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowSpec {
    /// Answers to compare (1..=[`MAX_SHADOW_REQUESTS`]).
    pub requests: u32,
    /// Longest phase, seconds (1..=[`MAX_TRIAL_SECS`]).
    #[serde(default = "default_shadow_secs")]
    pub seconds: u64,
    /// Share of live requests mirrored, percent (1..=100).
    #[serde(default = "default_shadow_percent")]
    pub sample_percent: u32,
    /// Most CPU the candidate may take, percent of one core (1..=100); mirrored requests
    /// beyond it are dropped, not queued.
    #[serde(default = "default_shadow_cpu")]
    pub cpu_percent: u32,
    /// Least argmax agreement on classifier outputs, per thousand (0..=1000).
    #[serde(default = "default_shadow_agreement")]
    pub min_agreement_permille: u32,
    /// Largest mean absolute difference allowed on any output, in millionths (1000 = 0.001).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_mean_abs_diff_millionths: Option<u64>,
    /// Largest Kolmogorov–Smirnov distance allowed on regressor outputs, per thousand
    /// (0..=1000).
    #[serde(default = "default_shadow_ks")]
    pub max_ks_permille: u32,
    /// Largest candidate p99 latency, percent of the serving model's (at least 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p99_percent: Option<u32>,
}

/// Most answers a shadow phase may ask to compare.
pub const MAX_SHADOW_REQUESTS: u32 = 1_000_000;

fn default_shadow_secs() -> u64 {
    3600
}

fn default_shadow_percent() -> u32 {
    10
}

fn default_shadow_cpu() -> u32 {
    50
}

fn default_shadow_agreement() -> u32 {
    990
}

fn default_shadow_ks() -> u32 {
    200
}

impl ShadowSpec {
    /// `requests` compared, every other field at its default.
    pub fn new(requests: u32) -> Self {
        ShadowSpec {
            requests,
            seconds: default_shadow_secs(),
            sample_percent: default_shadow_percent(),
            cpu_percent: default_shadow_cpu(),
            min_agreement_permille: default_shadow_agreement(),
            max_mean_abs_diff_millionths: None,
            max_ks_permille: default_shadow_ks(),
            max_p99_percent: None,
        }
    }

    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), ShadowSpecError> {
        let out = |field, range| Err(ShadowSpecError { field, range });
        if !(1..=MAX_SHADOW_REQUESTS).contains(&self.requests) {
            return out("requests", "1..=1000000");
        }
        if !(1..=MAX_TRIAL_SECS).contains(&self.seconds) {
            return out("seconds", "1..=2592000");
        }
        if !(1..=100).contains(&self.sample_percent) {
            return out("sample_percent", "1..=100");
        }
        if !(1..=100).contains(&self.cpu_percent) {
            return out("cpu_percent", "1..=100");
        }
        if self.min_agreement_permille > 1000 {
            return out("min_agreement_permille", "0..=1000");
        }
        if self.max_ks_permille > 1000 {
            return out("max_ks_permille", "0..=1000");
        }
        if self.max_p99_percent.is_some_and(|p| p < 100) {
            return out("max_p99_percent", "100 or more");
        }
        Ok(())
    }
}

/// A shadow spec's field out of its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("shadow {field} must be {range}")]
pub struct ShadowSpecError {
    /// The field.
    pub field: &'static str,
    /// What it may be.
    pub range: &'static str,
}

/// A deployment's traffic split (`custom.canary`): the new version serves beside the one it
/// replaces, answering `percent` of the requests that name no version, while probation
/// judges it on that share alone. Probation's commit gives it all traffic; its rollback drops
/// it, and the version it was to replace never stopped serving. Clients can also ask for
/// either by label (`stable`, `canary`) or by version number.
///
/// Without `key` the share is kept by count (of every 100 requests, exactly `percent` go to
/// the canary, spread evenly); with it, the value of that request header (gRPC: metadata)
/// decides, so requests with the same value always reach the same version (sticky), and
/// requests without it are split by count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanarySpec {
    /// Share of requests the new version answers, percent (1..=99).
    pub percent: u32,
    /// The request header whose value picks the version: lowercase letters, digits and `-`,
    /// at most [`MAX_CANARY_KEY`] bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Longest header name a canary may be keyed by.
pub const MAX_CANARY_KEY: usize = 64;

impl CanarySpec {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), CanarySpecError> {
        if !(1..=99).contains(&self.percent) {
            return Err(CanarySpecError::Percent);
        }
        if let Some(key) = &self.key {
            let token = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-';
            if key.is_empty() || key.len() > MAX_CANARY_KEY || !key.bytes().all(token) {
                return Err(CanarySpecError::Key);
            }
        }
        Ok(())
    }

    /// Whether the request numbered `n` (0, 1, …) of those without a key goes to the canary:
    /// exactly `percent` of every 100 consecutive ones, spread evenly.
    pub fn by_count(&self, n: u64) -> bool {
        let p = u64::from(self.percent);
        (n % 100 + 1) * p / 100 > (n % 100) * p / 100
    }

    /// Whether a request whose key header has `value` goes to the canary: the same value,
    /// the same answer; values spread evenly over 10,000 buckets (SHA-256 of the value).
    pub fn by_key(&self, value: &[u8]) -> bool {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(value);
        let bucket = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")) % 10_000;
        bucket < u64::from(self.percent) * 100
    }
}

/// A canary spec out of range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CanarySpecError {
    /// Not 1..=99.
    #[error("canary percent must be 1..=99")]
    Percent,
    /// Not a header name of lowercase letters, digits and `-`.
    #[error("canary key must be a header name of 1..=64 lowercase letters, digits and '-'")]
    Key,
}

/// A deployment's sampling of inputs and outputs, for analysis: opt-in, off unless the
/// director puts it in the device's signed target (`custom.sampling`). The agent keeps one
/// request in `1000 / rate_permille` (drawn at random) with its outputs, holds at most
/// `budget_bytes` of them per model until they are shipped with telemetry, and drops the
/// oldest beyond that.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingSpec {
    /// Requests sampled, in parts per thousand (1..=1000).
    pub rate_permille: u32,
    /// Most bytes of samples the device keeps for the model (1 KiB ..= [`MAX_SAMPLE_BUDGET`]).
    pub budget_bytes: u64,
}

/// Slowest download rate a policy may set, bytes per second.
pub const MIN_RATE: u64 = 1024;
/// Largest offset from UTC a policy may give, minutes (UTC+14:00 is the furthest in use).
pub const MAX_UTC_OFFSET_MINUTES: i32 = 14 * 60;

/// What a maintenance window holds back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WindowMode {
    /// Download any time; activate only inside the window.
    #[default]
    Activate,
    /// Download and activate only inside the window (a download pauses when it closes).
    Download,
}

/// A deployment's or rollout's download policy (`custom.download`): how fast, when and over
/// which links its devices fetch and install the version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownloadPolicy {
    /// Largest download rate, bytes per second (at least [`MIN_RATE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rate: Option<u64>,
    /// The maintenance window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<crate::window::MaintenanceWindow>,
    /// What the window holds back.
    #[serde(default)]
    pub window_mode: WindowMode,
    /// The window's times are at this offset from UTC, in minutes east; absent: in the
    /// device's own time zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utc_offset_minutes: Option<i32>,
    /// The version may be downloaded over a metered link (a device says whether its link is
    /// metered in its configuration or through its local API).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub metered: bool,
    /// Where the chunks may be fetched over HTTP(S) instead of MQTT: a base URL under which
    /// a host serves every file of the download by its SHA-256 (`{http}/{sha256}`) with range
    /// requests (the fleet server's `/files`, or any static host or CDN: each chunk is checked
    /// against the signed manifest). MQTT stays for control and reports, and carries the
    /// chunks again when HTTP fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
}

/// Longest base URL a policy may give for HTTP downloads.
pub const MAX_HTTP_BASE: usize = 512;

/// A download policy out of range; the message names the field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// `max_rate` below [`MIN_RATE`].
    #[error("download max_rate below {MIN_RATE} bytes/s")]
    RateTooLow,
    /// `utc_offset_minutes` beyond ±[`MAX_UTC_OFFSET_MINUTES`].
    #[error("download utc_offset_minutes beyond ±{MAX_UTC_OFFSET_MINUTES}")]
    OffsetOutOfRange,
    /// `http` is not an `http://` or `https://` URL without query, fragment or spaces, of
    /// at most [`MAX_HTTP_BASE`] bytes.
    #[error(
        "download http must be an http:// or https:// base URL (no query, fragment or spaces; \
         at most {MAX_HTTP_BASE} bytes)"
    )]
    BadHttpBase,
}

impl DownloadPolicy {
    /// Checks the ranges. (The window checked itself when it was parsed.)
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.max_rate.is_some_and(|r| r < MIN_RATE) {
            return Err(PolicyError::RateTooLow);
        }
        if self
            .utc_offset_minutes
            .is_some_and(|m| m.abs() > MAX_UTC_OFFSET_MINUTES)
        {
            return Err(PolicyError::OffsetOutOfRange);
        }
        if let Some(base) = &self.http {
            let rest = base
                .strip_prefix("http://")
                .or_else(|| base.strip_prefix("https://"));
            let host = rest.and_then(|r| r.split('/').next()).unwrap_or("");
            if base.len() > MAX_HTTP_BASE
                || host.is_empty()
                || base
                    .bytes()
                    .any(|b| b <= b' ' || b == b'?' || b == b'#' || b >= 0x7f)
            {
                return Err(PolicyError::BadHttpBase);
            }
        }
        Ok(())
    }

    /// Nothing is restricted but metered links (the default policy).
    pub fn is_default(&self) -> bool {
        *self == DownloadPolicy::default()
    }
}

/// What the director attaches to one device's target besides the model: the rollout's or
/// deployment's probation thresholds, sampling and download policy, each signed in `custom`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetTerms {
    /// Probation thresholds (`custom.probation`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probation: Option<TrialThresholds>,
    /// Sampling of inputs and outputs (`custom.sampling`); off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<SamplingSpec>,
    /// Download policy (`custom.download`); absent: any time, any rate, no metered links.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download: Option<DownloadPolicy>,
    /// The backend the deployment pins the model to (`custom.backend`), in place of the
    /// device's configured choice; absent: the device's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<crate::engine::Backend>,
    /// A shadow phase before the version serves (`custom.shadow`); absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowSpec>,
    /// A traffic split while the version is on probation (`custom.canary`); absent: it
    /// takes all traffic when it swaps in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanarySpec>,
    /// Which of the version's forms the device downloads (`custom.form`), chosen by the
    /// director for this device ([`crate::engine::choose_form`]); absent: the manifest's own
    /// artifact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub form: Option<crate::manifest::ModelFormat>,
    /// The content key of an encrypted artifact, sealed to this device's key
    /// (`custom.key_wrap`, see [`crate::seal`]); absent for an artifact in clear, or for a
    /// device that has not reported a key yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_wrap: Option<crate::seal::KeyWrap>,
}

/// The `custom` object of a target in a device's director targets, as the server signs it
/// and the agent reads it: the device it addresses and the terms it carries
/// (`{"device": …, "probation": …, "sampling": …}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectorCustom {
    /// The device the target is for (Uptane: a director target names its ECU).
    pub device: String,
    /// The rollout's or deployment's terms.
    #[serde(flatten)]
    pub terms: TargetTerms,
}

/// Why a director target's `custom` object was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CustomError {
    /// It names no device (or not as a string).
    #[error("no device named")]
    NoDevice,
    /// Its terms do not decode or are out of range.
    #[error("{0}")]
    Terms(String),
}

impl DirectorCustom {
    /// The `custom` value to sign: empty probation thresholds are left out.
    pub fn to_value(&self) -> serde_json::Value {
        let mut custom = self.clone();
        custom.terms.probation = custom.terms.probation.filter(|t| !t.is_empty());
        custom.terms.download = custom.terms.download.filter(|d| !d.is_default());
        serde_json::to_value(custom).expect("custom serializes")
    }

    /// Reads a target's `custom` value: the device it names, then its terms, each checked.
    pub fn from_value(value: Option<&serde_json::Value>) -> Result<DirectorCustom, CustomError> {
        let value = value.ok_or(CustomError::NoDevice)?;
        let device = value
            .get("device")
            .and_then(|d| d.as_str())
            .ok_or(CustomError::NoDevice)?
            .to_string();
        let terms: TargetTerms =
            serde_json::from_value(value.clone()).map_err(|e| CustomError::Terms(e.to_string()))?;
        if let Some(t) = &terms.probation {
            t.validate().map_err(CustomError::Terms)?;
        }
        if let Some(s) = &terms.sampling {
            s.validate().map_err(CustomError::Terms)?;
        }
        if let Some(s) = &terms.shadow {
            s.validate()
                .map_err(|e| CustomError::Terms(e.to_string()))?;
        }
        if let Some(c) = &terms.canary {
            c.validate()
                .map_err(|e| CustomError::Terms(e.to_string()))?;
        }
        if let Some(d) = &terms.download {
            d.validate()
                .map_err(|e| CustomError::Terms(e.to_string()))?;
        }
        Ok(DirectorCustom { device, terms })
    }
}

/// Largest sample budget a deployment may give a device.
pub const MAX_SAMPLE_BUDGET: u64 = 64 * 1024 * 1024;

impl SamplingSpec {
    /// Checks the ranges; the reason names the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=1000).contains(&self.rate_permille) {
            return Err("sampling rate_permille must be within 1..=1000".into());
        }
        if !(1024..=MAX_SAMPLE_BUDGET).contains(&self.budget_bytes) {
            return Err(format!(
                "sampling budget_bytes must be within 1024..={MAX_SAMPLE_BUDGET}"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_http_base_must_be_a_plain_http_or_https_url() {
        let with = |base: &str| DownloadPolicy {
            http: Some(base.into()),
            ..DownloadPolicy::default()
        };
        for good in [
            "http://127.0.0.1:8080/files",
            "https://cdn.example.com/models/",
            "http://fleet",
        ] {
            assert_eq!(with(good).validate(), Ok(()), "{good}");
        }
        for bad in [
            "ftp://host/x",
            "http://",
            "http:///path",
            "http://host/a b",
            "http://host/?sig=1",
            "http://host/#frag",
            "host/files",
            &format!("http://host/{}", "a".repeat(MAX_HTTP_BASE)),
        ] {
            assert_eq!(with(bad).validate(), Err(PolicyError::BadHttpBase), "{bad}");
        }
    }

    #[test]
    fn every_term_signs_as_canonical_json_and_a_bad_shadow_is_refused() {
        // The director signs `custom` as canonical JSON, which has no fractions: every term
        // must be whole numbers and strings.
        let custom = DirectorCustom {
            device: "edge-1".into(),
            terms: TargetTerms {
                probation: Some(TrialThresholds {
                    requests: Some(7),
                    seconds: Some(60),
                    max_error_permille: Some(10),
                    max_p99_percent: Some(150),
                }),
                sampling: Some(SamplingSpec {
                    rate_permille: 10,
                    budget_bytes: 4096,
                }),
                shadow: Some(ShadowSpec {
                    max_mean_abs_diff_millionths: Some(1000),
                    max_p99_percent: Some(200),
                    ..ShadowSpec::new(2000)
                }),
                ..TargetTerms::default()
            },
        };
        let value = custom.to_value();
        assert!(crate::keys::canonical_json(&value).is_ok());
        assert_eq!(DirectorCustom::from_value(Some(&value)), Ok(custom));
        for bad in [
            ShadowSpec::new(0),
            ShadowSpec {
                sample_percent: 0,
                ..ShadowSpec::new(10)
            },
            ShadowSpec {
                sample_percent: 101,
                ..ShadowSpec::new(10)
            },
            ShadowSpec {
                min_agreement_permille: 1001,
                ..ShadowSpec::new(10)
            },
            ShadowSpec {
                max_ks_permille: 1001,
                ..ShadowSpec::new(10)
            },
            ShadowSpec {
                max_p99_percent: Some(99),
                ..ShadowSpec::new(10)
            },
            ShadowSpec {
                seconds: 0,
                ..ShadowSpec::new(10)
            },
        ] {
            let mut value = serde_json::json!({ "device": "edge-1" });
            value["shadow"] = serde_json::to_value(bad).unwrap();
            assert!(
                matches!(
                    DirectorCustom::from_value(Some(&value)),
                    Err(CustomError::Terms(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_canary_signs_and_a_bad_one_is_refused() {
        let custom = DirectorCustom {
            device: "edge-1".into(),
            terms: TargetTerms {
                canary: Some(CanarySpec {
                    percent: 10,
                    key: Some("x-user-id".into()),
                }),
                ..TargetTerms::default()
            },
        };
        let value = custom.to_value();
        assert!(crate::keys::canonical_json(&value).is_ok());
        assert_eq!(DirectorCustom::from_value(Some(&value)), Ok(custom));
        for (percent, key) in [
            (0, None),
            (100, None),
            (10, Some("")),
            (10, Some("X-User")),
            (10, Some("x user")),
            (10, Some("x:y")),
        ] {
            let bad = CanarySpec {
                percent,
                key: key.map(String::from),
            };
            assert!(bad.validate().is_err(), "{bad:?}");
            let mut value = serde_json::json!({ "device": "edge-1" });
            value["canary"] = serde_json::to_value(&bad).unwrap();
            assert!(
                matches!(
                    DirectorCustom::from_value(Some(&value)),
                    Err(CustomError::Terms(_))
                ),
                "{bad:?}"
            );
        }
        let long = CanarySpec {
            percent: 10,
            key: Some("k".repeat(MAX_CANARY_KEY + 1)),
        };
        assert_eq!(long.validate(), Err(CanarySpecError::Key));
    }

    #[test]
    fn keyed_canaries_are_sticky_and_hold_their_share() {
        let spec = CanarySpec {
            percent: 10,
            key: Some("x-user-id".into()),
        };
        let users = 10_000;
        let chosen = (0..users)
            .filter(|u| spec.by_key(format!("user-{u}").as_bytes()))
            .count();
        // 10 % of 10,000 users within one percentage point.
        assert!((900..=1100).contains(&chosen), "{chosen}");
        for u in 0..100 {
            let key = format!("user-{u}");
            assert_eq!(spec.by_key(key.as_bytes()), spec.by_key(key.as_bytes()));
        }
    }

    #[test]
    fn the_director_custom_object_round_trips_and_refuses_what_it_must() {
        let custom = DirectorCustom {
            device: "edge-1".into(),
            terms: TargetTerms {
                probation: Some(TrialThresholds {
                    requests: Some(7),
                    ..TrialThresholds::default()
                }),
                sampling: Some(SamplingSpec {
                    rate_permille: 5,
                    budget_bytes: 65_536,
                }),
                download: Some(DownloadPolicy {
                    max_rate: Some(1 << 20),
                    window: Some(
                        crate::window::MaintenanceWindow::parse("mon-fri 02:00-04:00").unwrap(),
                    ),
                    window_mode: WindowMode::Download,
                    utc_offset_minutes: Some(-300),
                    metered: true,
                    http: Some("https://cdn.example.com/models".into()),
                }),
                backend: Some(crate::engine::Backend::Onnxruntime),
                shadow: None,
                canary: None,
                form: Some(crate::manifest::ModelFormat::Onnx),
                key_wrap: Some(crate::seal::KeyWrap {
                    enc: "ab".repeat(32),
                    sealed: "cd".repeat(48),
                }),
            },
        };
        let value = custom.to_value();
        assert_eq!(value["device"], "edge-1");
        assert_eq!(value["probation"]["requests"], 7);
        assert_eq!(value["download"]["window"], "mon-fri 02:00-04:00");
        assert_eq!(value["download"]["window_mode"], "download");
        assert_eq!(value["backend"], "onnxruntime");
        assert_eq!(value["form"], "onnx");
        assert_eq!(DirectorCustom::from_value(Some(&value)), Ok(custom));
        // What older servers signed: a device and nothing else.
        let bare = serde_json::json!({ "device": "edge-1" });
        let read = DirectorCustom::from_value(Some(&bare)).unwrap();
        assert_eq!(read.terms, TargetTerms::default());
        // Empty thresholds are left out of what is signed.
        let empty = DirectorCustom {
            device: "edge-1".into(),
            terms: TargetTerms {
                probation: Some(TrialThresholds::default()),
                sampling: None,
                download: Some(DownloadPolicy::default()),
                ..TargetTerms::default()
            },
        };
        assert_eq!(empty.to_value(), bare);
        assert_eq!(DirectorCustom::from_value(None), Err(CustomError::NoDevice));
        let unnamed = serde_json::json!({ "device": 7 });
        assert_eq!(
            DirectorCustom::from_value(Some(&unnamed)),
            Err(CustomError::NoDevice)
        );
        let out_of_range = serde_json::json!({
            "device": "edge-1",
            "sampling": { "rate_permille": 0, "budget_bytes": 65536 }
        });
        assert!(matches!(
            DirectorCustom::from_value(Some(&out_of_range)),
            Err(CustomError::Terms(_))
        ));
        for bad in [
            serde_json::json!({ "max_rate": 10 }),
            serde_json::json!({ "utc_offset_minutes": 15 * 60 }),
            serde_json::json!({ "window": "02:00-02:00" }),
            serde_json::json!({ "window_mode": "sometimes" }),
            serde_json::json!({ "rate": 2048 }),
        ] {
            let v = serde_json::json!({ "device": "edge-1", "download": bad });
            assert!(
                matches!(
                    DirectorCustom::from_value(Some(&v)),
                    Err(CustomError::Terms(_))
                ),
                "{v}"
            );
        }
    }

    #[test]
    fn sampling_ranges_are_checked() {
        let ok = SamplingSpec {
            rate_permille: 10,
            budget_bytes: 1 << 20,
        };
        assert_eq!(ok.validate(), Ok(()));
        for bad in [
            SamplingSpec {
                rate_permille: 0,
                ..ok
            },
            SamplingSpec {
                rate_permille: 1001,
                ..ok
            },
            SamplingSpec {
                budget_bytes: 100,
                ..ok
            },
            SamplingSpec {
                budget_bytes: MAX_SAMPLE_BUDGET + 1,
                ..ok
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    proptest! {
        /// Counted canaries take exactly their share of any 100 consecutive requests from
        /// the first, and never two in a row below 50 %.
        #[test]
        fn counted_canaries_take_exactly_their_share(percent in 1u32..=99, start in 0u64..1_000_000) {
            let spec = CanarySpec { percent, key: None };
            let from = start - start % 100;
            let taken = (from..from + 100).filter(|n| spec.by_count(*n)).count();
            prop_assert_eq!(taken as u32, percent);
            if percent <= 50 {
                for n in start..start + 200 {
                    prop_assert!(!(spec.by_count(n) && spec.by_count(n + 1)));
                }
            }
        }
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = DesiredState::from_slice(&bytes);
        }

        #[test]
        fn decoder_survives_json_shaped_noise(s in r#"\{"format":[0-9],"device":"[a-z]{0,3}","director":\{.{0,20}\},"repository":.{0,30}\}"#) {
            let _ = DesiredState::from_slice(s.as_bytes());
        }
    }
}
