//! Benchmark: the agent's footprint. Prints the stripped size of every agent binary named on
//! the command line, then runs one agent natively against the embedded server on loopback and
//! reads its resident memory from `/proc`: idle with no model, and with a 100 MB model loaded —
//! right after the update, and again after a restart that loads the model from the store.
//!
//! Run: `bash cross/footprint` (builds the device profile for aarch64 and natively, then runs
//! this with `MODELCAST_AGENT_BIN` pointing at the native device build). `BENCH_MB` changes the
//! model size. `BENCH_ENGINE=onnxruntime` publishes the model as ONNX and has the agent (built
//! with `ort`) serve it on ONNX Runtime's CPU provider, with the library the corpus' `onnxruntime`
//! package ships. RSS depends on the allocator and the machine; the figures are for this build
//! on this machine.

use std::time::Duration;

use modelcast_ops::onnx::example_model_of_size;
use modelcast_tests::{proc_status_kib, wait_for, Agent, Fleet};

const MB: u64 = 1024 * 1024;
/// How long the agent is left alone before RSS is read.
const SETTLE: Duration = Duration::from_secs(3);

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Current and peak RSS of the running agent, after letting it settle.
fn rss(agent: &Agent) -> (u64, u64) {
    std::thread::sleep(SETTLE);
    let pid = agent.pid().expect("agent running");
    (
        proc_status_kib(pid, "VmRSS:"),
        proc_status_kib(pid, "VmHWM:"),
    )
}

fn main() {
    println!("== binary size (stripped)");
    for path in std::env::args().skip(1) {
        match std::fs::metadata(&path) {
            Ok(m) => println!(
                "{path}: {:.2} MiB ({} bytes); goal for aarch64 ≤ 12 MB",
                m.len() as f64 / MB as f64,
                m.len()
            ),
            Err(e) => println!("{path}: {e}"),
        }
    }
    let size = std::env::var("BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
        * MB;
    let agent_bin = std::env::var("MODELCAST_AGENT_BIN")
        .unwrap_or_else(|_| "target/release/modelcast-agent (default)".into());
    println!("== resident memory of {agent_bin}, natively");

    let onnxruntime = std::env::var("BENCH_ENGINE").is_ok_and(|e| e == "onnxruntime");
    let engine = if onnxruntime {
        format!(
            "[engine]\nbackend = \"onnxruntime\"\nonnxruntime_library = \"{}\"\nproviders = [\"cpu\"]\n",
            modelcast_tests::corpus::onnxruntime_library().display()
        )
    } else {
        String::new()
    };
    let fleet = Fleet::embedded();
    let mut agent = fleet.start_agent_with("footprint-1", &[("site", "bench")], &engine);
    fleet.wait_registered();
    let (idle, _) = rss(&agent);
    println!(
        "idle, connected, no model: RSS {:.1} MiB; goal ≤ 16 MB",
        mib(idle)
    );

    let path = fleet.dir.path().join("big.onnx");
    std::fs::write(&path, example_model_of_size(100, size)).expect("model file");
    let mut opts = modelcast_ops::publish::PublishOptions::new("classifier", 100);
    if onnxruntime {
        opts.format = modelcast_ops::convert::Choice::Onnx;
    }
    let manifest = fleet.publish_with(&path, &opts);
    std::fs::remove_file(&path).ok();
    let model_kib = manifest.size / 1024;
    fleet.deploy("classifier", 100, "*");
    wait_for("the big model to serve", Duration::from_secs(600), || {
        let r = fleet.report(&agent.id)?;
        (r.models.get("classifier")?.serving_version() == Some(100)).then_some(())
    });
    let (updated, updated_peak) = rss(&agent);
    agent.stop();
    agent.start();
    let (restored, restored_peak) = rss(&agent);
    let golden = agent.check_golden(&manifest);
    assert_eq!(
        golden, "100",
        "the restored model answers its golden vector"
    );

    println!(
        "model: {:.1} MiB {} artifact, served on {}",
        mib(model_kib),
        manifest.model_format,
        fleet
            .report(&agent.id)
            .and_then(|r| r.models.get("classifier")?.engine.clone())
            .map_or("?".into(), |e| e.backend)
    );
    for (when, now, peak) in [
        ("after the update", updated, updated_peak),
        (
            "after a restart (loaded from the store)",
            restored,
            restored_peak,
        ),
    ] {
        println!(
            "{when}: RSS {:.1} MiB = model + {:.1} MiB (goal ≤ 24 MB); peak {:.1} MiB = {:.2}× model",
            mib(now),
            mib(now) - mib(model_kib),
            mib(peak),
            mib(peak) / mib(model_kib),
        );
    }
}
