//! Benchmark: the low-memory swap's unavailability window against the time to load and check
//! the same model alone. An agent (the release build beside this binary) runs in a memory
//! cgroup whose limit holds one model but not two; each new version then swaps in by
//! unloading the serving one first, and the agent measures how long the model answered
//! nothing (`modelcast_low_memory_swap_unavailable_milliseconds`). In this process, the same
//! artifacts are loaded and checked (golden vectors, warm-up) as the agent's staging does,
//! with nothing else to do: the floor the window can reach.
//!
//! Run as root (the cgroup): `cargo build --release --bins && target/release/bench-lowmem`;
//! `BENCH_MB` sets the model's weights (default 100), `BENCH_SWAPS` the swaps (default 3).
//! The machine is shared and noisy: read the ratio.

use std::time::{Duration, Instant};

use modelcast_agent::config::EngineConfig;
use modelcast_ops::publish::PublishOptions;
use modelcast_proto::report::Slot;
use modelcast_tests::cgroup::MemoryCgroup;
use modelcast_tests::{wait_for, AgentOptions, Fleet};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let mb: u64 = std::env::var("BENCH_MB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let swaps: u64 = std::env::var("BENCH_SWAPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let cgroup = MemoryCgroup::create("modelcast-bench-lowmem").expect("a memory cgroup");
    let fleet = Fleet::embedded();
    let agent = fleet.start_agent_opts("bench-1", &[], AgentOptions::committing());
    fleet.wait_registered();
    cgroup.add(agent.pid().expect("agent pid"));

    let mut load_alone = Vec::new();
    let mut windows = Vec::new();
    let mut need = 0;
    for version in 1..=swaps + 1 {
        let onnx = modelcast_ops::onnx::example_model_of_size(version, mb << 20);
        let path = fleet.dir.path().join(format!("v{version}.onnx"));
        std::fs::write(&path, &onnx).unwrap();
        let opts = PublishOptions::new("classifier", version);
        // Loaded and checked here, alone, as the agent's staging does.
        let prepared = modelcast_ops::publish::prepare(&onnx, &opts, 0).expect("prepare");
        let started = Instant::now();
        let open = || Ok::<_, modelcast_agent::update::Failure>(&prepared.artifact[..]);
        let golden = match &prepared.golden_file {
            Some(file) => modelcast_proto::manifest::decode_golden_file(file).expect("golden"),
            None => prepared.manifest.golden.clone(),
        };
        modelcast_agent::engine::stage(
            &prepared.manifest,
            Slot::A,
            open,
            &golden,
            &EngineConfig::default(),
        )
        .expect("stage");
        load_alone.push(started.elapsed());
        drop(prepared);

        let manifest = fleet.publish_with(&path, &opts);
        need = manifest.memory_bytes.expect("measured");
        fleet.deploy("classifier", version, "*");
        fleet.wait_serving("bench-1", "classifier", version);
        if version == 1 {
            let limit = cgroup.usage() + need / 2;
            cgroup.set_limit(limit);
            println!(
                "model of {mb} MB weights needs {} MiB (publisher's measure); agent limited to {} MiB",
                need >> 20,
                limit >> 20
            );
            continue;
        }
        let sample = "modelcast_low_memory_swap_unavailable_milliseconds{model=\"classifier\"}";
        let ms = wait_for("the window", Duration::from_secs(30), || {
            agent.metric(sample)
        });
        windows.push(Duration::from_millis(ms as u64));
        println!(
            "v{version}: unavailable {ms} ms; loaded and checked alone in {:.0} ms",
            load_alone.last().unwrap().as_secs_f64() * 1e3
        );
    }
    for line in std::fs::read_to_string(agent.log_path())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("low memory") || l.contains("low-memory"))
    {
        println!("  {line}");
    }
    assert_eq!(cgroup.oom_kills(), 0);
    let (w, l) = (median(windows), median(load_alone));
    println!(
        "median over {swaps} swaps: unavailable {:.0} ms, load and checks alone {:.0} ms: {:.2}x (model needs {} MiB)",
        w.as_secs_f64() * 1e3,
        l.as_secs_f64() * 1e3,
        w.as_secs_f64() / l.as_secs_f64(),
        need >> 20
    );
}
