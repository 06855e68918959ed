//! Sampling of requests, inputs and outputs whole, for analysis: opt-in per deployment (the
//! director's signed `custom.sampling`, [`SamplingSpec`]), off by default.
//!
//! [`Sampler`] sits on the serve path: it draws whether a request is kept (lock-free, a few
//! nanoseconds when the model is not sampled), and holds what was kept in a small bounded
//! buffer until the control plane moves it to the store ([`crate::store::Store::keep_samples`]),
//! where each model's samples stay within the deployment's byte budget, oldest dropped first,
//! until they ride out in a telemetry report. Turning sampling off for a model deletes what
//! the device still holds of it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use modelcast_proto::desired::SamplingSpec;
use modelcast_proto::manifest::TensorData;
use modelcast_proto::report::Slot;
use modelcast_proto::telemetry::{Sample, MAX_REPORT_SAMPLE_BYTES};

use crate::engine::HostTensor;

/// Most bytes of samples held in memory between two moves to the store; beyond it new samples
/// are dropped (and counted).
pub const PENDING_BYTES: usize = 1024 * 1024;

/// The serve path's side of sampling; shared with the control plane.
#[derive(Default)]
pub struct Sampler {
    /// Which models are sampled, and how.
    policies: ArcSwap<BTreeMap<String, SamplingSpec>>,
    /// State of the random draw (SplitMix64).
    draw: AtomicU64,
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    samples: VecDeque<Sample>,
    bytes: usize,
    dropped: u64,
}

/// Bytes a sample takes in a report (about: its tensors' hex data and names).
pub fn sample_bytes(s: &Sample) -> usize {
    s.inputs
        .iter()
        .chain(&s.outputs)
        .map(|t| t.data.len() + t.name.len() + 64)
        .sum::<usize>()
        + s.model.len()
        + 96
}

/// Packs a host tensor as little-endian hex, the manifest's tensor encoding.
fn pack(t: &HostTensor) -> TensorData {
    TensorData {
        name: t.name.clone(),
        datatype: t.values.datatype(),
        shape: t.shape.clone(),
        data: hex::encode(t.values.bytes()),
    }
}

impl Sampler {
    /// A sampler with nothing sampled, its draws seeded from the clock.
    pub fn new() -> Arc<Self> {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Arc::new(Sampler {
            draw: AtomicU64::new(seed),
            ..Sampler::default()
        })
    }

    /// Samples the models in `policies` (and no other) from now on.
    pub fn set_policies(&self, policies: BTreeMap<String, SamplingSpec>) {
        if **self.policies.load() != policies {
            tracing::info!(?policies, "sampling");
            self.policies.store(Arc::new(policies));
        }
    }

    /// The models sampled now, and how.
    pub fn policies(&self) -> BTreeMap<String, SamplingSpec> {
        (**self.policies.load()).clone()
    }

    /// Whether to keep this request to `model`: drawn at random at the model's rate.
    pub fn draw(&self, model: &str) -> bool {
        let policies = self.policies.load();
        let Some(spec) = policies.get(model) else {
            return false;
        };
        // SplitMix64: one atomic add and a few multiplications.
        let mut z = self
            .draw
            .fetch_add(0x9E37_79B9_7F4A_7C15, Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        z % 1000 < u64::from(spec.rate_permille)
    }

    /// Keeps a drawn request with its outputs (call off the runtime's workers: it encodes the
    /// tensors). A sample too large for a report, or one that finds the buffer full, is
    /// dropped and counted.
    pub fn keep(
        &self,
        model: &str,
        version: u64,
        slot: Slot,
        inputs: &[HostTensor],
        outputs: &[HostTensor],
    ) {
        let sample = Sample {
            id: 0,
            model: model.into(),
            version,
            slot,
            at_ms: crate::clock::unix_ms(),
            inputs: inputs.iter().map(pack).collect(),
            outputs: outputs.iter().map(pack).collect(),
        };
        let size = sample_bytes(&sample);
        let mut pending = self.pending.lock().expect("samples lock");
        if size > MAX_REPORT_SAMPLE_BYTES || pending.bytes + size > PENDING_BYTES {
            pending.dropped += 1;
            return;
        }
        pending.bytes += size;
        pending.samples.push_back(sample);
    }

    /// Takes what was kept since the last call (without ids yet), and the count dropped.
    pub fn take(&self) -> (Vec<Sample>, u64) {
        let mut pending = self.pending.lock().expect("samples lock");
        let taken = std::mem::take(&mut *pending);
        (taken.samples.into(), taken.dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rate_permille: u32) -> SamplingSpec {
        SamplingSpec {
            rate_permille,
            budget_bytes: 1 << 20,
        }
    }

    fn tensor(values: Vec<f32>) -> HostTensor {
        HostTensor {
            name: "x".into(),
            shape: vec![1, values.len() as u64],
            values: crate::engine::Values::from_f32(&values),
        }
    }

    #[test]
    fn only_sampled_models_are_drawn_at_their_rate() {
        let s = Sampler::new();
        assert!(!(0..1000).any(|_| s.draw("m")), "off by default");
        s.set_policies(BTreeMap::from([("m".to_string(), spec(1000))]));
        assert!((0..1000).all(|_| s.draw("m")));
        assert!(!(0..1000).any(|_| s.draw("other")));
        s.set_policies(BTreeMap::from([("m".to_string(), spec(100))]));
        let kept = (0..100_000).filter(|_| s.draw("m")).count();
        assert!((9_000..11_000).contains(&kept), "{kept} of 100000 at 10%");
        s.set_policies(BTreeMap::new());
        assert!(!(0..1000).any(|_| s.draw("m")), "off again");
    }

    #[test]
    fn kept_samples_round_trip_their_tensors_and_the_buffer_is_bounded() {
        let s = Sampler::new();
        let (x, y) = (tensor(vec![0.5, -1.25]), tensor(vec![0.75]));
        s.keep(
            "m",
            3,
            Slot::B,
            std::slice::from_ref(&x),
            std::slice::from_ref(&y),
        );
        let (samples, dropped) = s.take();
        assert_eq!((samples.len(), dropped), (1, 0));
        let got = &samples[0];
        assert_eq!(
            (got.model.as_str(), got.version, got.slot),
            ("m", 3, Slot::B)
        );
        assert_eq!(got.inputs[0].values().unwrap(), vec![0.5, -1.25]);
        assert_eq!(got.outputs[0].values().unwrap(), vec![0.75]);

        // 16 KiB of f32 hex per sample: the buffer holds 1 MiB's worth, the rest is counted.
        let big = tensor(vec![1.0; 2048]);
        for _ in 0..100 {
            s.keep("m", 3, Slot::A, std::slice::from_ref(&big), &[]);
        }
        let (samples, dropped) = s.take();
        let bytes: usize = samples.iter().map(sample_bytes).sum();
        assert!(bytes <= PENDING_BYTES, "{bytes}");
        assert_eq!(samples.len() as u64 + dropped, 100);
        assert!(dropped > 0);

        // Larger than a report can carry: never kept.
        let huge = tensor(vec![1.0; MAX_REPORT_SAMPLE_BYTES / 4]);
        s.keep("m", 3, Slot::A, std::slice::from_ref(&huge), &[]);
        assert_eq!(s.take().1, 1);
    }
}
