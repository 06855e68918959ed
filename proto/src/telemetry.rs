//! The telemetry report, published by the agent on `<p>/d/{device}/telemetry` once per
//! interval: per model and slot, what was served in the interval (requests, errors, latency
//! percentiles, summary statistics of each output tensor, the class histogram of a
//! classifier), and what the agent costs its host (CPU, memory, disk, store).
//!
//! Reports carry a sequence number per device. They are queued on the device while the
//! broker is out of reach and sent in order, at least once, when it is back: a receiver keeps
//! the first copy of each sequence number. `dropped` counts the reports the device's queue
//! discarded (oldest first) to stay within its bounds.
//!
//! Where a deployment turned sampling on ([`crate::desired::SamplingSpec`]), a report also
//! carries some of the device's [`Sample`]s: requests kept whole, inputs and outputs, for
//! analysis. They ride in the report so they share its queue, ordering and delivery.

use serde::{Deserialize, Serialize};

use crate::error::DecodeError;
use crate::manifest::TensorData;
use crate::report::Slot;

/// Largest telemetry report accepted (under the 1 MiB MQTT packet the agent and the fleet
/// server allow).
pub const MAX_TELEMETRY_BYTES: usize = 960 * 1024;
/// Most bytes of samples one report carries; a larger sample is never shipped.
pub const MAX_REPORT_SAMPLE_BYTES: usize = 512 * 1024;
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
    /// Sampled requests, oldest first (only where a deployment turned sampling on).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<Sample>,
    /// Samples the device discarded so far (over its budget, or too large to ship), over its
    /// lifetime.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub samples_dropped: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One request a device kept whole: what came in and what the model answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// Position in the device's sequence of samples, from 1 (with the device, the sample's
    /// identity: a receiver keeps the first copy).
    pub id: u64,
    /// Model name.
    pub model: String,
    /// Version that answered.
    pub version: u64,
    /// Slot that answered.
    pub slot: Slot,
    /// When it was answered, Unix milliseconds.
    pub at_ms: i64,
    /// The request's input tensors.
    pub inputs: Vec<TensorData>,
    /// The model's output tensors.
    pub outputs: Vec<TensorData>,
}

impl Sample {
    /// Checks that every tensor's bytes fit its shape and type.
    pub fn check(&self) -> Result<(), DecodeError> {
        if self.id == 0 {
            return Err(DecodeError::Invalid {
                what: "sample",
                reason: "sample ids start at 1".into(),
            });
        }
        for t in self.inputs.iter().chain(&self.outputs) {
            t.values()?;
        }
        Ok(())
    }
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
    /// The same latencies in logarithmic buckets, which add up across intervals and devices
    /// (percentiles do not).
    #[serde(default, skip_serializing_if = "LatencyBuckets::is_empty")]
    pub latency_buckets: LatencyBuckets,
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

/// Latencies in logarithmic buckets: bucket `i` counts the runs that took more than
/// `2^((i-1)/8)` and at most `2^(i/8)` microseconds (bucket 0: at most 1 µs). Each bucket is
/// 9 % wide, so a quantile read from them (see [`LatencyBuckets::quantile`]) is within 4.5 %
/// of the exact one, however many reports and devices were merged. Pairs of `[bucket, count]`,
/// by bucket, without empty buckets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LatencyBuckets(pub Vec<(u16, u64)>);

/// Buckets per doubling of latency.
pub const BUCKETS_PER_DOUBLING: u16 = 8;
/// The last bucket (2^40 µs, 12.7 days); longer runs count in it.
pub const MAX_BUCKET: u16 = 40 * BUCKETS_PER_DOUBLING;

impl LatencyBuckets {
    /// The bucket of a latency of `us` microseconds.
    pub fn bucket_of(us: u64) -> u16 {
        if us <= 1 {
            return 0;
        }
        let b = ((us as f64).log2() * f64::from(BUCKETS_PER_DOUBLING)).ceil();
        (b as u64).min(u64::from(MAX_BUCKET)) as u16
    }

    /// A bucket's upper bound, microseconds.
    pub fn upper_bound(bucket: u16) -> f64 {
        2f64.powf(f64::from(bucket) / f64::from(BUCKETS_PER_DOUBLING))
    }

    /// Whether no latency was counted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Latencies counted.
    pub fn count(&self) -> u64 {
        self.0
            .iter()
            .fold(0u64, |sum, &(_, n)| sum.saturating_add(n))
    }

    /// Counts `n` latencies of `us` microseconds.
    pub fn add(&mut self, us: u64, n: u64) {
        let b = Self::bucket_of(us);
        match self.0.binary_search_by_key(&b, |&(i, _)| i) {
            Ok(at) => self.0[at].1 = self.0[at].1.saturating_add(n),
            Err(at) => self.0.insert(at, (b, n)),
        }
    }

    /// Adds `other`'s counts to these.
    pub fn merge(&mut self, other: &LatencyBuckets) {
        let mut merged = Vec::with_capacity(self.0.len().max(other.0.len()));
        let (mut a, mut b) = (self.0.iter().peekable(), other.0.iter().peekable());
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(&&(i, n)), Some(&&(j, m))) if i == j => {
                    a.next();
                    b.next();
                    (i, n.saturating_add(m))
                }
                (Some(&&x), Some(&&y)) => {
                    if x.0 < y.0 {
                        a.next();
                        x
                    } else {
                        b.next();
                        y
                    }
                }
                (Some(&&x), None) => {
                    a.next();
                    x
                }
                (None, Some(&&y)) => {
                    b.next();
                    y
                }
                (None, None) => break,
            };
            merged.push(next);
        }
        self.0 = merged;
    }

    /// The `q` quantile (0..=1), microseconds: the geometric middle of the bucket holding the
    /// nearest-rank sample. `None` without latencies.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0u64;
        for &(b, n) in &self.0 {
            seen = seen.saturating_add(n);
            if seen >= rank {
                if b == 0 {
                    return Some(1);
                }
                let middle = (Self::upper_bound(b) * Self::upper_bound(b - 1)).sqrt();
                return Some(middle.round() as u64);
            }
        }
        None
    }

    /// Checks the pairs are in order, distinct and in range.
    fn check(&self) -> Result<(), String> {
        let mut last = None;
        for &(b, _) in &self.0 {
            if b > MAX_BUCKET || last.is_some_and(|l| b <= l) {
                return Err(format!("latency bucket {b} out of order or range"));
            }
            last = Some(b);
        }
        Ok(())
    }
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
            m.latency_buckets
                .check()
                .map_err(|e| invalid(format!("{}: {e}", m.model)))?;
            if m.latency_buckets
                .0
                .iter()
                .map(|&(_, n)| n)
                .try_fold(0u64, u64::checked_add)
                .is_none_or(|n| n > m.requests)
            {
                return Err(invalid(format!(
                    "{}: more latencies than requests",
                    m.model
                )));
            }
        }
        for sample in &r.samples {
            sample
                .check()
                .map_err(|e| invalid(format!("sample {}: {e}", sample.id)))?;
        }
        Ok(r)
    }

    /// Encodes the report (compact JSON).
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("telemetry serializes")
    }
}

/// Most sequence numbers one receipt names.
pub const MAX_ACKED: usize = 256;

/// The server's receipt for telemetry reports of one device: it has dealt with them (stored,
/// already had, or refused for good), so the device may drop them from its queue. Reports
/// the server never names (lost with a connection, or while the server was away) are sent
/// again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TelemetryAck {
    /// Wire format version.
    pub format: u32,
    /// The device whose reports these are.
    pub device: String,
    /// Their sequence numbers.
    pub seqs: Vec<u64>,
}

impl TelemetryAck {
    /// A receipt for `device`'s reports `seqs`.
    pub fn new(device: &str, seqs: Vec<u64>) -> Self {
        TelemetryAck {
            format: crate::FORMAT_VERSION,
            device: device.into(),
            seqs,
        }
    }

    /// Decodes and checks a receipt (untrusted bytes).
    pub fn from_slice(bytes: &[u8]) -> Result<Self, DecodeError> {
        const MAX_BYTES: usize = 64 * 1024;
        let invalid = |reason: String| DecodeError::Invalid {
            what: "telemetry receipt",
            reason,
        };
        if bytes.len() > MAX_BYTES {
            return Err(invalid(format!("{} bytes is too large", bytes.len())));
        }
        let ack: TelemetryAck =
            serde_json::from_slice(bytes).map_err(|e| DecodeError::json("telemetry receipt", e))?;
        if ack.format != crate::FORMAT_VERSION {
            return Err(DecodeError::Version {
                what: "telemetry receipt",
                found: ack.format,
                expected: crate::FORMAT_VERSION,
            });
        }
        if ack.seqs.len() > MAX_ACKED {
            return Err(invalid(format!("{} sequence numbers", ack.seqs.len())));
        }
        Ok(ack)
    }

    /// Encodes the receipt (compact JSON).
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("receipts serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receipt_round_trips_and_is_bounded() {
        let ack = TelemetryAck::new("edge-1", vec![1, 2, 9]);
        assert_eq!(TelemetryAck::from_slice(&ack.to_vec()).unwrap(), ack);
        let many = TelemetryAck::new("edge-1", (1..=MAX_ACKED as u64 + 1).collect());
        assert!(TelemetryAck::from_slice(&many.to_vec()).is_err());
        assert!(TelemetryAck::from_slice(&vec![b' '; 64 * 1024 + 1]).is_err());
        assert!(TelemetryAck::from_slice(b"{\"format\":1}").is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_decode_to_a_receipt_or_an_error(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = TelemetryAck::from_slice(&bytes);
        }
    }
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
                latency_buckets: LatencyBuckets(vec![(55, 5), (66, 4)]),
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
            samples: vec![Sample {
                id: 4,
                model: "classifier".into(),
                version: 2,
                slot: Slot::B,
                at_ms: 30_000,
                inputs: vec![TensorData::from_f32("x", vec![1, 2], &[0.5, -1.0])],
                outputs: vec![TensorData::from_f32("scores", vec![1, 2], &[0.9, 0.1])],
            }],
            samples_dropped: 2,
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
        bad(&|r| r.models[0].latency_buckets = LatencyBuckets(vec![(66, 1), (55, 1)]));
        bad(&|r| r.models[0].latency_buckets = LatencyBuckets(vec![(MAX_BUCKET + 1, 1)]));
        bad(&|r| r.models[0].latency_buckets = LatencyBuckets(vec![(1, 11)]));
        bad(&|r| r.models[0].latency_buckets = LatencyBuckets(vec![(1, u64::MAX), (2, 2)]));
        bad(&|r| r.samples[0].id = 0);
        bad(&|r| r.samples[0].inputs[0].shape = vec![1, 3]);
        bad(&|r| r.samples[0].outputs[0].data.push('z'));
        assert!(TelemetryReport::from_slice(&vec![b' '; MAX_TELEMETRY_BYTES + 1]).is_err());
    }

    #[test]
    fn buckets_bound_the_relative_error() {
        for us in [1u64, 2, 3, 7, 100, 999, 12_345, 1_000_000, 10_000_000_000] {
            let mut b = LatencyBuckets::default();
            b.add(us, 1);
            let got = b.quantile(0.5).unwrap() as f64;
            assert!(
                (got - us as f64).abs() <= 0.05 * us as f64 + 1.0,
                "{us} read as {got}"
            );
        }
    }

    proptest! {
        #[test]
        fn merged_buckets_read_like_one_histogram(
            a in proptest::collection::vec(1u64..5_000_000, 1..200),
            b in proptest::collection::vec(1u64..5_000_000, 0..200),
            q in 0.0f64..=1.0,
        ) {
            let (mut x, mut y, mut all) = Default::default();
            let fill = |h: &mut LatencyBuckets, v: &[u64]| v.iter().for_each(|&us| h.add(us, 1));
            fill(&mut x, &a);
            fill(&mut y, &b);
            fill(&mut all, &a);
            fill(&mut all, &b);
            let mut merged: LatencyBuckets = x;
            merged.merge(&y);
            prop_assert_eq!(&merged, &all);
            prop_assert!(merged.check().is_ok());
            // Against the exact nearest-rank quantile of the samples.
            let mut v: Vec<u64> = a.iter().chain(&b).copied().collect();
            v.sort();
            let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
            let exact = v[rank - 1] as f64;
            let read = merged.quantile(q).unwrap() as f64;
            prop_assert!((read - exact).abs() <= 0.05 * exact + 1.0, "{} vs {}", read, exact);
        }

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
