//! The telemetry report, published by the agent on `<p>/d/{device}/telemetry` once per
//! interval: per model and slot, what was served in the interval (requests, errors, latency
//! percentiles, summary statistics of each output tensor, the class histogram of a
//! classifier), and what the agent costs its host (CPU, memory, disk, store).
//!
//! Reports carry a sequence number per device. They are queued on the device while the
//! broker is out of reach and sent in order, at least once, when it is back: a receiver keeps
//! the first copy of each sequence number. `dropped` counts the reports the device's queue
//! discarded (oldest first) to stay within its bounds.

use serde::{Deserialize, Serialize};

use crate::error::DecodeError;
use crate::report::Slot;

/// Largest telemetry report accepted.
pub const MAX_TELEMETRY_BYTES: usize = 256 * 1024;
/// Most classes a class histogram keeps (larger outputs are summarized, not histogrammed).
pub const MAX_CLASSES: usize = 1024;

/// One interval's telemetry of one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryReport {
    /// Format version ([`crate::FORMAT_VERSION`]).
    pub format: u32,
    /// Device id.
    pub device: String,
    /// Position in the device's sequence of reports, from 1.
    pub seq: u64,
    /// Start of the interval, Unix milliseconds.
    pub from_ms: i64,
    /// End of the interval, Unix milliseconds.
    pub to_ms: i64,
    /// Reports the device's queue discarded so far (oldest first), over its lifetime.
    pub dropped: u64,
    /// Per model and slot that served in the interval.
    pub models: Vec<ModelTelemetry>,
    /// What the agent costs its host.
    pub system: SystemTelemetry,
}

/// What one model served from one slot in an interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelTelemetry {
    /// Model name.
    pub model: String,
    /// Version serving from the slot.
    pub version: u64,
    /// Slot.
    pub slot: Slot,
    /// Requests answered.
    pub requests: u64,
    /// Requests that failed in the model (bad requests are not counted).
    pub errors: u64,
    /// Latency of the model's own run, microseconds (absent without requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<Percentiles>,
    /// Summary of each output tensor's values over the interval, in the model's order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<OutputStats>,
}

/// Latency percentiles over an interval, microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 95th percentile.
    pub p95: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest.
    pub max: u64,
}

/// Summary statistics of one output tensor's values over an interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputStats {
    /// Output name.
    pub name: String,
    /// Finite values seen.
    pub count: u64,
    /// Their mean (0 without values).
    pub mean: f64,
    /// Their population variance (0 without values).
    pub variance: f64,
    /// Smallest finite value (0 without values).
    pub min: f64,
    /// Largest finite value (0 without values).
    pub max: f64,
    /// NaN or infinite values seen.
    pub non_finite: u64,
    /// For a classifier's scores (one row of at most [`MAX_CLASSES`] values per request):
    /// how often each class had the highest score.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<u64>,
}

/// What the agent costs its host, at the end of the interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemTelemetry {
    /// CPU time the agent used in the interval (user and system), milliseconds.
    pub cpu_ms: u64,
    /// Resident memory, bytes.
    pub rss_bytes: u64,
    /// The agent's store on disk, bytes.
    pub store_bytes: u64,
    /// Free space on the store's file system, bytes.
    pub disk_free_bytes: u64,
    /// Reports waiting in the device's queue (this one included).
    pub queued: u64,
}

impl TelemetryReport {
    /// Decodes and checks a report (untrusted bytes).
    pub fn from_slice(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_TELEMETRY_BYTES {
            return Err(DecodeError::Invalid {
                what: "telemetry report",
                reason: format!("{} bytes is too large", bytes.len()),
            });
        }
        let r: TelemetryReport =
            serde_json::from_slice(bytes).map_err(|e| DecodeError::json("telemetry report", e))?;
        if r.format != crate::FORMAT_VERSION {
            return Err(DecodeError::Version {
                what: "telemetry report",
                found: r.format,
                expected: crate::FORMAT_VERSION,
            });
        }
        let invalid = |reason: String| DecodeError::Invalid {
            what: "telemetry report",
            reason,
        };
        if r.seq == 0 {
            return Err(invalid("sequence numbers start at 1".into()));
        }
        if r.to_ms < r.from_ms {
            return Err(invalid("the interval ends before it starts".into()));
        }
        for m in &r.models {
            if m.errors > m.requests {
                return Err(invalid(format!("{}: more errors than requests", m.model)));
            }
            if m.outputs.iter().any(|o| o.classes.len() > MAX_CLASSES) {
                return Err(invalid(format!("{}: too many classes", m.model)));
            }
        }
        Ok(r)
    }

    /// Encodes the report (compact JSON).
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("telemetry serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn report() -> TelemetryReport {
        TelemetryReport {
            format: crate::FORMAT_VERSION,
            device: "edge-1".into(),
            seq: 3,
            from_ms: 1_000,
            to_ms: 61_000,
            dropped: 0,
            models: vec![ModelTelemetry {
                model: "classifier".into(),
                version: 2,
                slot: Slot::B,
                requests: 10,
                errors: 1,
                latency_us: Some(Percentiles {
                    p50: 120,
                    p95: 300,
                    p99: 450,
                    max: 900,
                }),
                outputs: vec![OutputStats {
                    name: "scores".into(),
                    count: 40,
                    mean: 0.25,
                    variance: 0.01,
                    min: 0.0,
                    max: 0.9,
                    non_finite: 0,
                    classes: vec![7, 2, 0, 1],
                }],
            }],
            system: SystemTelemetry {
                cpu_ms: 12,
                rss_bytes: 30 << 20,
                store_bytes: 1 << 20,
                disk_free_bytes: 1 << 30,
                queued: 1,
            },
        }
    }

    #[test]
    fn round_trips_and_rejects_what_cannot_be() {
        let r = report();
        assert_eq!(TelemetryReport::from_slice(&r.to_vec()).unwrap(), r);
        let bad = |f: &dyn Fn(&mut TelemetryReport)| {
            let mut r = report();
            f(&mut r);
            TelemetryReport::from_slice(&r.to_vec()).unwrap_err()
        };
        bad(&|r| r.seq = 0);
        bad(&|r| r.to_ms = 0);
        bad(&|r| r.models[0].errors = 11);
        bad(&|r| r.format = 99);
        bad(&|r| r.models[0].outputs[0].classes = vec![0; MAX_CLASSES + 1]);
        assert!(TelemetryReport::from_slice(&vec![b' '; MAX_TELEMETRY_BYTES + 1]).is_err());
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = TelemetryReport::from_slice(&bytes);
        }

        #[test]
        fn decoder_never_panics_on_mangled_reports(at in 0usize..400, byte in any::<u8>()) {
            let mut bytes = report().to_vec();
            let at = at % bytes.len();
            bytes[at] = byte;
            let _ = TelemetryReport::from_slice(&bytes);
        }
    }
}
