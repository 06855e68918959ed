//! Benchmark: what a shadow phase costs the serving path. Four clients ask one agent without
//! pause; the latency they see is measured before a shadow phase (A), during it (B: the new
//! version runs on 10 % of the requests, mirrored off the serving path) and after it, once
//! the new version serves (A again). The new version has the serving one's weights, so the
//! phase passes and both models cost the same per request. Prints p50 and p99 of each phase
//! and the ratio of the shadow phase's p99 to the mean of the two others (goal ≤ 1.05).
//!
//! As in `bench-swap`, the fleet server is moved to `SCHED_IDLE` (`chrt --idle`): it stands in
//! for a server on another machine. The clients, the agent and its candidate share this
//! machine's two cores, so read the ratio, not the times.
//!
//! Run: `cargo build --release --bins && target/release/bench-shadow`. `BENCH_HIDDEN` sets the
//! model width (default 256), `BENCH_PHASE_SECS` each phase (default 10), `BENCH_SAMPLE` the
//! mirrored share in percent (default 10), `BENCH_CLIENTS` the clients (default 4: both cores
//! kept busy; 1 leaves the device a free core, as the shadow phase expects to find).

use std::time::Duration;

use modelcast_ops::onnx::example_model;
use modelcast_proto::desired::ShadowSpec;
use modelcast_tests::hammer::{quantile, Hammer, Shot};
use modelcast_tests::{wait_for, Fleet};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn p99(shots: &[&Shot]) -> (Duration, Duration) {
    let lat: Vec<Duration> = shots.iter().map(|s| s.latency).collect();
    (quantile(&lat, 0.5), quantile(&lat, 0.99))
}

fn main() {
    let hidden = env("BENCH_HIDDEN", 256) as usize;
    let phase = Duration::from_secs(env("BENCH_PHASE_SECS", 10));
    let sample = env("BENCH_SAMPLE", 10) as u32;
    let clients = env("BENCH_CLIENTS", 4) as usize;
    let fleet = Fleet::embedded();
    let status = std::process::Command::new("chrt")
        .args([
            "--idle",
            "--all-tasks",
            "--pid",
            "0",
            &fleet.server_pid().to_string(),
        ])
        .status()
        .expect("chrt (util-linux)");
    assert!(status.success(), "chrt --idle failed");
    let agent = fleet.start_agent_with(
        "edge-1",
        &[],
        "[probation]\nrequests = 100\nseconds = 600\n",
    );
    let v1 = fleet.publish_example(1, hidden);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);
    let path = fleet.dir.path().join("v2.onnx");
    std::fs::write(&path, example_model(1, hidden)).unwrap();
    fleet.publish_file(&path, "classifier", 2);

    let hammer = Hammer::start(
        agent.http_port,
        "classifier",
        &v1.golden[0].inputs,
        clients,
        Duration::ZERO,
        phase * 3 + Duration::from_secs(600),
    );
    // Every phase reads the device's report ten times a second, as the waits of the shadow
    // phase do, so that only the shadow differs between them.
    let watch = |d: Duration| {
        let until = std::time::Instant::now() + d;
        while std::time::Instant::now() < until {
            let _ = fleet.report("edge-1");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    watch(phase);
    let before_to = hammer.elapsed();
    let spec = ShadowSpec {
        requests: modelcast_proto::desired::MAX_SHADOW_REQUESTS,
        seconds: phase.as_secs(),
        sample_percent: sample,
        ..ShadowSpec::new(1)
    };
    fleet.deploy_shadowed("classifier", 2, "*", spec);
    let summary = |running: bool| {
        let s = fleet
            .report("edge-1")?
            .models
            .get("classifier")?
            .shadow
            .clone()?;
        (s.version == 2 && s.verdict.is_none() == running && s.compared > 0).then_some(s)
    };
    wait_for("the shadow phase running", Duration::from_secs(120), || {
        summary(true)
    });
    let during_from = hammer.elapsed();
    let done = wait_for(
        "the shadow phase's verdict",
        phase + Duration::from_secs(120),
        || summary(false),
    );
    let during_to = hammer.elapsed();
    fleet.wait_serving("edge-1", "classifier", 2);
    let after_from = hammer.elapsed() + Duration::from_secs(1);
    watch(phase);
    let shots = hammer.stop();

    let within = |from: Duration, to: Duration| -> Vec<&Shot> {
        shots
            .iter()
            .filter(|s| s.sent >= from && s.sent < to && s.answer.is_ok())
            .collect()
    };
    // The first second warms the clients' connections.
    let before = within(Duration::from_secs(1), before_to);
    let during = within(during_from, during_to);
    let after = within(after_from, Duration::MAX);
    let failed = shots.iter().filter(|s| s.answer.is_err()).count();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let line = |what: &str, s: &[&Shot]| {
        let (p50, p99) = p99(s);
        println!(
            "{what:<34} {:>7} requests  p50 {:>7.3} ms  p99 {:>7.3} ms",
            s.len(),
            ms(p50),
            ms(p99)
        );
        p99
    };
    println!("model width {hidden}, {clients} clients without pause, {sample} % mirrored");
    let a1 = line("before (v1 serves)", &before);
    let b = line("shadow phase (v2 on the mirror)", &during);
    let a2 = line("after (v2 serves)", &after);
    println!(
        "shadow phase: {} answers compared, {} mirrored copies dropped, verdict {}; {failed} requests failed",
        done.compared,
        done.dropped,
        done.verdict.as_deref().unwrap_or("-")
    );
    println!(
        "p99 during the shadow phase / mean p99 without: {:.3} (goal ≤ 1.05)",
        ms(b) / ((ms(a1) + ms(a2)) / 2.0)
    );
}
