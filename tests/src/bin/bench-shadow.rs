//! Benchmark: what a shadow phase costs the serving path. Four clients ask one agent without
//! pause; the latency they see is measured in phases that alternate: without a shadow phase
//! (A: one version serves) and during one (B: the next version runs on 10 % of the requests,
//! mirrored off the serving path, then passes and serves). `BENCH_CYCLES` (default 3) B
//! phases, each between two A phases (A B A B A B A), so that drift on this shared machine
//! falls on both sides. Every version has the same weights, so each phase passes and both
//! models cost the same per request; each commits at once (no probation), so the A phases
//! differ from the B phases only by the shadow. Prints p50 and p99 of each phase, each
//! cycle's ratio (B's p99 over the mean of the A phases around it), their median, and the
//! ratio of the pooled p99s (goal ≤ 1.05).
//!
//! As in `bench-swap`, the fleet server is moved to `SCHED_IDLE` (`chrt --idle`): it stands in
//! for a server on another machine. The clients, the agent and its candidate share this
//! machine's two cores, so read the ratio, not the times.
//!
//! Run: `cargo build --release --bins && target/release/bench-shadow`. `BENCH_HIDDEN` sets the
//! model width (default 256), `BENCH_PHASE_SECS` each phase (default 10), `BENCH_SAMPLE` the
//! mirrored share in percent (default 10), `BENCH_CLIENTS` the clients (default 4: both cores
//! kept busy; 1 leaves the device a free core, as the shadow phase expects to find),
//! `BENCH_CYCLES` the B phases.

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
    let cycles = env("BENCH_CYCLES", 3).max(1);
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
    let agent = fleet.start_agent_with("edge-1", &[], "[probation]\nrequests = 0\nseconds = 0\n");
    let v1 = fleet.publish_example(1, hidden);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);
    // The next versions: the same weights.
    let path = fleet.dir.path().join("next.onnx");
    std::fs::write(&path, example_model(1, hidden)).unwrap();
    for version in 2..=cycles + 1 {
        fleet.publish_file(&path, "classifier", version);
    }

    let hammer = Hammer::start(
        agent.http_port,
        "classifier",
        &v1.golden[0].inputs,
        clients,
        Duration::ZERO,
        (phase * 2 + Duration::from_secs(120)) * cycles as u32 + phase,
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
    let summary = |version: u64, running: bool| {
        let s = fleet
            .report("edge-1")?
            .models
            .get("classifier")?
            .shadow
            .clone()?;
        (s.version == version && s.verdict.is_none() == running && s.compared > 0).then_some(s)
    };
    // (from, to) of each A phase and each B phase, on the hammer's clock; the first second
    // warms the clients' connections.
    let mut without = Vec::new();
    let mut during = Vec::new();
    let mut phases_done = Vec::new();
    let mut from = Duration::from_secs(1);
    for version in 2..=cycles + 1 {
        watch(phase);
        without.push((from, hammer.elapsed()));
        let spec = ShadowSpec {
            requests: modelcast_proto::desired::MAX_SHADOW_REQUESTS,
            seconds: phase.as_secs(),
            sample_percent: sample,
            ..ShadowSpec::new(1)
        };
        fleet.deploy_shadowed("classifier", version, "*", spec);
        wait_for("the shadow phase running", Duration::from_secs(120), || {
            summary(version, true)
        });
        let b_from = hammer.elapsed();
        let done = wait_for(
            "the shadow phase's verdict",
            phase + Duration::from_secs(120),
            || summary(version, false),
        );
        during.push((b_from, hammer.elapsed()));
        phases_done.push(done);
        fleet.wait_serving("edge-1", "classifier", version);
        from = hammer.elapsed() + Duration::from_secs(1);
    }
    watch(phase);
    without.push((from, hammer.elapsed()));
    let shots = hammer.stop();

    let within = |(from, to): (Duration, Duration)| -> Vec<&Shot> {
        shots
            .iter()
            .filter(|s| s.sent >= from && s.sent < to && s.answer.is_ok())
            .collect()
    };
    let failed = shots.iter().filter(|s| s.answer.is_err()).count();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let line = |what: &str, s: &[&Shot]| {
        // The clients ran out of time before this phase (a very slow machine): no figure.
        assert!(!s.is_empty(), "{what}: no request answered in this phase");
        let (p50, p99) = p99(s);
        println!(
            "{what:<34} {:>7} requests  p50 {:>7.3} ms  p99 {:>7.3} ms",
            s.len(),
            ms(p50),
            ms(p99)
        );
        ms(p99)
    };
    println!(
        "model width {hidden}, {clients} clients without pause, {sample} % mirrored, {cycles} cycles"
    );
    let mut ratios = Vec::new();
    let mut a_prev = line("A (no shadow phase)", &within(without[0]));
    for (c, (b, done)) in during.iter().zip(&phases_done).enumerate() {
        let b = line(&format!("B (shadow phase of v{})", c + 2), &within(*b));
        let a_next = line("A (no shadow phase)", &within(without[c + 1]));
        println!(
            "  v{}: {} answers compared, {} mirrored copies dropped, verdict {}",
            c + 2,
            done.compared,
            done.dropped,
            done.verdict.as_deref().unwrap_or("-")
        );
        ratios.push(b / ((a_prev + a_next) / 2.0));
        a_prev = a_next;
    }
    let pooled = |phases: &[(Duration, Duration)]| -> Vec<&Shot> {
        phases.iter().flat_map(|p| within(*p)).collect()
    };
    let (_, a_all) = p99(&pooled(&without));
    let (_, b_all) = p99(&pooled(&during));
    let mut sorted = ratios.clone();
    sorted.sort_by(f64::total_cmp);
    println!("{failed} requests failed");
    // Whether a candidate was starved at idle priority and raised (the agent logs it).
    let log = std::fs::read_to_string(agent.log_path()).unwrap_or_default();
    println!(
        "candidates raised from idle priority: {} of {cycles}",
        log.matches("raising it").count()
    );
    println!(
        "p99 of each shadow phase / mean p99 of the phases around it: {}; median {:.3}",
        ratios
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(", "),
        sorted[sorted.len() / 2]
    );
    println!(
        "p99 of all shadow phases / p99 of all others: {:.3} (goal ≤ 1.05)",
        ms(b_all) / ms(a_all)
    );
}
