//! Benchmark: how closely a device holds its download policy, on the embedded broker with the
//! release binaries. (1) A download held to a rate for about a minute: the rate achieved
//! (after the bucket's first chunk) against the rate set, as a ratio. (2) An update deployed
//! outside its maintenance window: how long after the window opens the device serves it.
//!
//! Run: `cargo build --release --bins && target/release/bench-policy`. `BENCH_RATE` (bytes a
//! second, default 262144) and `BENCH_SECS` (default 60) size the first; `BENCH_RUNS`
//! (default 3) repeats the second. Figures are printed; nothing is asserted.

use std::time::{Duration, Instant};

use modelcast_proto::desired::DownloadPolicy;
use modelcast_proto::window::MaintenanceWindow;
use modelcast_server::unix_now;
use modelcast_tests::{wait_for, Fleet};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `HH:MM:SS` of Unix second `t` in UTC.
fn hms(t: i64) -> String {
    let s = t.rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

fn main() {
    let rate = env("BENCH_RATE", 256 * 1024);
    let secs = env("BENCH_SECS", 60);
    let runs = env("BENCH_RUNS", 3);
    let fleet = Fleet::embedded();
    let agent = fleet.start_agent_with(
        "edge-1",
        &[("site", "lab")],
        "[probation]\nrequests = 0\nseconds = 0\n",
    );
    fleet.wait_registered();

    // (1) The rate.
    let size = rate * secs;
    let v1 = fleet.publish_example_of_size("classifier", 1, size);
    let started = Instant::now();
    fleet.deploy_policy(
        "classifier",
        1,
        "*",
        DownloadPolicy {
            max_rate: Some(rate),
            ..DownloadPolicy::default()
        },
    );
    let done = wait_for(
        "the rate-limited download",
        Duration::from_secs(secs * 3 + 60),
        || {
            let u = fleet
                .report("edge-1")?
                .models
                .remove("classifier")?
                .update?;
            (u.version == 1 && u.received_bytes == u.total_bytes).then(|| started.elapsed())
        },
    );
    let paced = (v1.download_size() - u64::from(v1.chunk_size)) as f64;
    let achieved = paced / done.as_secs_f64();
    println!(
        "rate: {} bytes in {:.1} s; {achieved:.0} bytes/s after the first chunk, set {rate}: ratio {:.3} \
         (up to the report interval late: the device reports progress every 5 s)",
        v1.download_size(),
        done.as_secs_f64(),
        achieved / rate as f64
    );
    fleet.wait_serving("edge-1", "classifier", 1);

    // (2) The window.
    let mut delays = Vec::new();
    for run in 0..runs {
        let version = 2 + run;
        fleet.publish_example(version, 16);
        let opens = unix_now() + 15;
        let spec = format!("daily {}-{}", hms(opens), hms(opens + 3600));
        fleet.deploy_policy(
            "classifier",
            version,
            "*",
            DownloadPolicy {
                window: Some(MaintenanceWindow::parse(&spec).expect("a window")),
                utc_offset_minutes: Some(0),
                ..DownloadPolicy::default()
            },
        );
        let url = format!("http://127.0.0.1:{}/v2/models/classifier", agent.http_port);
        let serving = wait_for("the windowed update", Duration::from_secs(120), || {
            let v: serde_json::Value = ureq::get(&url).call().ok()?.body_mut().read_json().ok()?;
            let want = version.to_string();
            (v["versions"][0].as_str() == Some(want.as_str())).then(unix_ms)
        });
        let delay = (serving - opens * 1000) as f64 / 1000.0;
        println!(
            "window run {}: serving {delay:.2} s after the window opened",
            run + 1
        );
        delays.push(delay);
    }
    delays.sort_by(f64::total_cmp);
    if let Some(median) = delays.get(delays.len() / 2) {
        println!("window: median {median:.2} s after opening, over {runs} runs");
    }
}
