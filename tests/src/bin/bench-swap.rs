//! Benchmark: inference latency seen by clients in steady state and while the device swaps
//! models. Four clients hammer `/v2/models/classifier/infer` on one agent; after a steady
//! phase, `BENCH_SWAPS` (default 20) new versions are deployed one after the other, each
//! swapped in and committed under that load. Prints p50/p99 of the steady phase, of the whole
//! swap phase (downloads and loads included) and of the requests sent within ±250 ms of each
//! swap, and the ratios to steady p99 (goal: p99 around swaps ≤ 1.2 × steady p99).
//!
//! On a device the fleet server and its broker run elsewhere; here they share the two cores
//! with the device and the clients, and their work for each deploy (signing, publishing,
//! answering chunk requests) lands on the device's latency. So the benchmark runs twice in one
//! invocation: once with the server at normal priority, and once with it moved to the
//! `SCHED_IDLE` policy (`chrt --idle`), which stands in for a server on another machine. The
//! clients stay at normal priority in both.
//!
//! Run: `cargo build --release --bins && target/release/bench-swap`. The machine is shared and
//! noisy: compare the ratios, not the absolute times. `BENCH_HIDDEN` sets the model width
//! (default 256), `BENCH_STEADY_SECS` the steady phase (default 5), `BENCH_SERVER` which runs
//! to make (`both`, the default, `normal` or `idle`).

use std::time::Duration;

use modelcast_proto::report::Phase;
use modelcast_tests::hammer::{quantile, Hammer, Shot};
use modelcast_tests::{wait_for, Fleet};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn line(what: &str, shots: &[&Shot], steady_p99: Duration) {
    let lat: Vec<Duration> = shots.iter().map(|s| s.latency).collect();
    let (p50, p99) = (quantile(&lat, 0.5), quantile(&lat, 0.99));
    println!(
        "{what:<28} {:>7} requests  p50 {:>8.3} ms  p99 {:>8.3} ms  p99 / steady p99 {:.2}",
        shots.len(),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        p99.as_secs_f64() / steady_p99.as_secs_f64().max(1e-9)
    );
}

fn main() {
    let runs = std::env::var("BENCH_SERVER").unwrap_or_else(|_| "both".into());
    for (name, idle) in [("normal", false), ("idle", true)] {
        if runs == "both" || runs == name {
            run(idle);
        }
    }
}

/// Moves every thread of process `pid` to the `SCHED_IDLE` policy.
fn to_idle(pid: u32) {
    let status = std::process::Command::new("chrt")
        .args(["--idle", "--all-tasks", "--pid", "0", &pid.to_string()])
        .status()
        .expect("chrt (util-linux)");
    assert!(status.success(), "chrt --idle failed");
}

fn run(server_idle: bool) {
    let swaps = env("BENCH_SWAPS", 20);
    let hidden = env("BENCH_HIDDEN", 256) as usize;
    let steady = Duration::from_secs(env("BENCH_STEADY_SECS", 5));
    let fleet = Fleet::embedded();
    if server_idle {
        to_idle(fleet.server_pid());
    }
    let agent = fleet.start_agent_with(
        "edge-1",
        &[("site", "lab")],
        "[probation]\nrequests = 100\nseconds = 600\n",
    );
    fleet.wait_registered();
    let v1 = fleet.publish_example(1, hidden);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);
    // Published before the clients start, so the swap phase measures the device only.
    for v in 2..=swaps + 1 {
        fleet.publish_example(v, hidden);
    }

    let hammer = Hammer::start(
        agent.http_port,
        "classifier",
        &v1.golden[0].inputs,
        4,
        Duration::from_millis(1),
        steady * 2 + Duration::from_secs(600),
    );
    std::thread::sleep(steady);
    let swaps_from = hammer.elapsed();
    for v in 2..=swaps + 1 {
        fleet.deploy("classifier", v, "*");
        wait_for(&format!("v{v} committed"), Duration::from_secs(120), || {
            let report = fleet.report("edge-1")?;
            let update = report.models.get("classifier")?.update.clone()?;
            (update.version == v && update.phase == Phase::Active).then_some(())
        });
    }
    let swaps_to = hammer.elapsed();
    std::thread::sleep(steady);
    let shots = hammer.stop();
    if std::env::var("BENCH_OFFSETS").is_ok() {
        let _ = std::fs::copy(agent.log_path(), "/tmp/bench-swap-agent.log");
    }

    let failed = shots.iter().filter(|s| s.answer.is_err()).count();
    // Each swap as each client saw it: its first answer from a new version.
    let mut swap_at = Vec::new();
    let mut changes = 0;
    for client in 0..4 {
        let mut last = String::new();
        for s in shots.iter().filter(|s| s.client == client) {
            if let Ok((v, _)) = &s.answer {
                if *v != last {
                    if !last.is_empty() {
                        swap_at.push(s.sent);
                        changes += usize::from(client == 0);
                    }
                    last = v.clone();
                }
            }
        }
    }
    let window = Duration::from_millis(250);
    let near_swap = |s: &Shot| {
        swap_at
            .iter()
            .any(|t| s.sent + window >= *t && s.sent <= *t + window)
    };
    let ok: Vec<&Shot> = shots.iter().filter(|s| s.answer.is_ok()).collect();
    let steady_shots: Vec<&Shot> = ok
        .iter()
        .copied()
        .filter(|s| s.sent < swaps_from || s.sent > swaps_to)
        .collect();
    let swap_phase: Vec<&Shot> = ok
        .iter()
        .copied()
        .filter(|s| s.sent >= swaps_from && s.sent <= swaps_to)
        .collect();
    let around: Vec<&Shot> = swap_phase
        .iter()
        .copied()
        .filter(|s| near_swap(s))
        .collect();
    let steady_lat: Vec<Duration> = steady_shots.iter().map(|s| s.latency).collect();
    let steady_p99 = quantile(&steady_lat, 0.99);

    println!(
        "\nbench-swap, server and broker at {} priority: 4 clients, model width {hidden}, {swaps} \
         swaps in {:.1}s, {changes} version changes seen by client 0, {} requests, {failed} \
         failed",
        if server_idle { "idle" } else { "normal" },
        (swaps_to - swaps_from).as_secs_f64(),
        shots.len()
    );
    line("steady", &steady_shots, steady_p99);
    line("swap phase (whole)", &swap_phase, steady_p99);
    line("within ±250 ms of a swap", &around, steady_p99);
    assert_eq!(failed, 0, "requests failed during swaps");
}
