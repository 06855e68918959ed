//! Benchmark: the agent's CPU cost of telemetry. Runs the example classifier (tract, the
//! agent's own engine) on its golden input, and for each answer records it into a telemetry
//! [`Collector`] as the inference API does (latency histogram, output statistics, class
//! histogram). The baseline is measured in the same invocation: the same inferences without
//! recording. Prints the cost per recorded request, as a share of an inference, and what it
//! comes to at 1,000 inferences per second; then the cost and size of building a report, and
//! the cost of sampling (the draw on every request, keeping a drawn one, storing it in sled).
//!
//! Run: `cargo build --release --bins && target/release/bench-telemetry`. `BENCH_N` sets the
//! requests per round (default 20,000); the best of 5 rounds counts. The machine is shared
//! and noisy: read the ratios.

use std::time::{Duration, Instant};

use modelcast_agent::engine::{HostTensor, LoadedModel};
use modelcast_agent::telemetry::{Collector, Summary};
use modelcast_ops::publish::{prepare, PublishOptions};
use modelcast_proto::report::Slot;
use modelcast_proto::telemetry::{SystemTelemetry, TelemetryReport};

fn best(rounds: usize, mut f: impl FnMut() -> Duration) -> Duration {
    (0..rounds).map(|_| f()).min().expect("rounds")
}

fn main() {
    let n: u32 = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let onnx = modelcast_ops::onnx::example_model(1, 16);
    let prepared = prepare(&onnx, &PublishOptions::new("classifier", 1), 0).expect("prepare");
    let model =
        LoadedModel::load(&prepared.manifest, Slot::A, &mut &prepared.artifact[..]).expect("load");
    let inputs: Vec<HostTensor> = prepared.manifest.golden[0]
        .inputs
        .iter()
        .map(|t| HostTensor::from_data(t).expect("golden input"))
        .collect();
    let outputs = model.run(&inputs).expect("run");

    let inference = best(5, || {
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(model.run(&inputs).expect("run"));
        }
        t.elapsed()
    });
    let collector = Collector::default();
    let recorded = best(5, || {
        let t = Instant::now();
        for _ in 0..n {
            let started = Instant::now();
            let out = model.run(&inputs).expect("run");
            let took = started.elapsed();
            collector.served("classifier", Slot::A, 1, took, &Summary::of(&out));
        }
        t.elapsed()
    });
    let record_only = best(5, || {
        let t = Instant::now();
        for i in 0..n {
            collector.served(
                "classifier",
                Slot::A,
                1,
                Duration::from_micros(50 + u64::from(i % 200)),
                &Summary::of(&outputs),
            );
        }
        t.elapsed()
    });
    let per = |d: Duration| d.as_secs_f64() * 1e9 / f64::from(n);
    let (inf_ns, rec_ns) = (per(inference), per(record_only));
    println!(
        "bench-telemetry: example classifier, {} outputs of {} values; {n} requests per round, \
         best of 5",
        outputs.len(),
        outputs[0].values.to_f64().len()
    );
    println!("inference alone             {:>9.0} ns per request", inf_ns);
    println!(
        "inference + telemetry       {:>9.0} ns per request  ({:+.1}% over inference alone)",
        per(recorded),
        (per(recorded) / inf_ns - 1.0) * 100.0
    );
    println!(
        "recording alone             {:>9.0} ns per request  ({:.1}% of an inference)",
        rec_ns,
        rec_ns / inf_ns * 100.0
    );
    println!(
        "at 1,000 inferences/s       {:>9.3} % of one core for telemetry",
        rec_ns * 1000.0 / 1e9 * 100.0
    );

    let (mut size, mut took) = (0, Duration::MAX);
    for _ in 0..5 {
        for _ in 0..1000 {
            collector.served(
                "classifier",
                Slot::A,
                1,
                Duration::from_micros(80),
                &Summary::of(&outputs),
            );
        }
        let t = Instant::now();
        let report = TelemetryReport {
            format: modelcast_proto::FORMAT_VERSION,
            device: "edge-1".into(),
            seq: 1,
            from_ms: 0,
            to_ms: 60_000,
            dropped: 0,
            models: collector.take(),
            system: SystemTelemetry::default(),
            samples: vec![],
            samples_dropped: 0,
        };
        let (cpu, rss) = modelcast_agent::telemetry::system();
        std::hint::black_box((cpu, rss));
        size = report.to_vec().len();
        took = took.min(t.elapsed());
    }
    println!(
        "a report (one model)        {:>9.1} µs to build and encode, {size} bytes",
        took.as_secs_f64() * 1e6
    );

    sampling(n, &inputs, &outputs, inf_ns);
}

/// The serve path's cost of sampling: the draw every request pays, and keeping a drawn one;
/// then the control plane's cost of storing a sample in sled.
fn sampling(n: u32, inputs: &[HostTensor], outputs: &[HostTensor], inf_ns: f64) {
    use modelcast_agent::sampling::{sample_bytes, Sampler};
    use modelcast_proto::desired::SamplingSpec;
    let per = |d: Duration| d.as_secs_f64() * 1e9 / f64::from(n);
    let sampler = Sampler::new();
    let off = best(5, || {
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(sampler.draw("classifier"));
        }
        t.elapsed()
    });
    let spec = SamplingSpec {
        rate_permille: 10,
        budget_bytes: 64 << 20,
    };
    sampler.set_policies([("classifier".to_string(), spec)].into());
    let at_one_percent = best(5, || {
        let t = Instant::now();
        for _ in 0..n {
            if sampler.draw("classifier") {
                sampler.keep("classifier", 1, Slot::A, inputs, outputs);
            }
        }
        let took = t.elapsed();
        sampler.take();
        took
    });
    let keep = best(5, || {
        let t = Instant::now();
        for _ in 0..1000 {
            sampler.keep("classifier", 1, Slot::A, inputs, outputs);
        }
        t.elapsed() * n / 1000
    });
    let (taken, _) = sampler.take();
    let bytes = sample_bytes(&taken[0]);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = modelcast_agent::store::Store::open(dir.path()).expect("store");
    let policies = [("classifier".to_string(), spec)].into();
    let t = Instant::now();
    let stored = taken.len();
    store.keep_samples(taken, 0, &policies).expect("keep");
    let store_ns = t.elapsed().as_secs_f64() * 1e9 / stored as f64;
    let at_one = per(at_one_percent);
    println!(
        "sampling off: the draw        {:>9.1} ns per request  ({:.2}% of an inference)",
        per(off),
        per(off) / inf_ns * 100.0
    );
    println!(
        "keeping one sample            {:>9.0} ns  ({bytes} bytes in a report)",
        per(keep)
    );
    println!(
        "sampling 1%: draw + keep      {:>9.1} ns per request  ({:.2}% of an inference)",
        at_one,
        at_one / inf_ns * 100.0
    );
    println!("storing one sample in sled    {:>9.0} ns", store_ns);
    println!(
        "at 1,000 inferences/s, 1%     {:>9.4} % of one core for sampling (serve path and store)",
        (at_one * 1000.0 + store_ns * 10.0) / 1e9 * 100.0
    );
}
