//! How the operator console's overview loads as the fleet grows: N simulated devices (the
//! agent's update machine on real MQTT connections, `modelcast_tests::sim`) serving a model,
//! and the overview loaded in Debian's Chromium (`server/console/e2e/load.mjs`): from
//! navigation until the fleet's count and the first page of the device table are on screen.
//!
//! ```text
//! cargo build --release --bins && target/release/bench-console
//! BENCH_DEVICES=10,1000 BENCH_RUNS=3 target/release/bench-console
//! ```
//!
//! For each N it prints each load, the median, and the time of the API calls the overview
//! makes (`/api/v1/fleet`, a page of `/api/v1/devices`) beside reading every device at once;
//! then the ratio of each median to the smallest fleet's, measured in the same run: the
//! browser, the server, its broker and the simulated devices share this machine's cores, so
//! the ratios are what to read.

use std::process::Command;
use std::time::Duration;

use modelcast_tests::browser::console_script;
use modelcast_tests::sim::{Sim, SimOptions};
use modelcast_tests::{wait_for, Fleet};

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// Median seconds of `runs` GETs of `url` by curl.
fn curl_median(url: &str, runs: usize) -> f64 {
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let out = Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{time_total}", url])
                .output()
                .expect("curl");
            String::from_utf8_lossy(&out.stdout)
                .parse()
                .unwrap_or(f64::NAN)
        })
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

fn main() {
    let sizes: Vec<usize> = env("BENCH_DEVICES", "10,10000")
        .split(',')
        .map(|n| n.trim().parse().expect("BENCH_DEVICES: counts"))
        .collect();
    let runs = env("BENCH_RUNS", "5");
    let mut medians = Vec::new();
    for &n in &sizes {
        let fleet = Fleet::embedded();
        let sim = Sim::start(SimOptions::new(fleet.mqtt_port, n), &fleet.keys);
        let limit = Duration::from_secs(60 + n as u64 / 10);
        wait_for(&format!("{n} devices known"), limit, || {
            (fleet.client.devices().ok()?.len() >= n).then_some(())
        });
        fleet.publish_example(1, 16);
        fleet.deploy("classifier", 1, "fleet=sim");
        wait_for(&format!("{n} devices serving v1"), limit, || {
            (sim.serving("classifier", 1) >= n).then_some(())
        });
        // Until the server has every report (serving v1) on record.
        wait_for(&format!("{n} reports serving v1"), limit, || {
            let f: serde_json::Value = serde_json::from_str(
                &Command::new("curl")
                    .args(["-s", &format!("{}/api/v1/fleet", fleet.client.base())])
                    .output()
                    .ok()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())?,
            )
            .ok()?;
            (f["serving"]["classifier"]["1"].as_u64()? as usize >= n).then_some(())
        });
        let base = fleet.client.base().to_string();
        let summary = curl_median(&format!("{base}/api/v1/fleet"), 5);
        let page = curl_median(&format!("{base}/api/v1/devices?offset=0&limit=50"), 5);
        let all = curl_median(&format!("{base}/api/v1/devices"), 3);
        let out = console_script(
            "load.mjs",
            &[
                ("CONSOLE_URL", base.clone()),
                ("DEVICES", n.to_string()),
                ("RUNS", runs.clone()),
            ],
            Duration::from_secs(900),
        );
        let last = out
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .expect("load.mjs prints its figures");
        let figures: serde_json::Value = serde_json::from_str(last).expect("JSON");
        let median = figures["median_ms"].as_f64().expect("median_ms");
        println!(
            "{n:>6} devices: overview usable in {median:.0} ms (median; loads {}), API: /api/v1/fleet {:.1} ms, \
             a page of 50 devices {:.1} ms, every device at once {:.1} ms",
            figures["times"],
            summary * 1e3,
            page * 1e3,
            all * 1e3
        );
        medians.push((n, median, summary, page));
        drop(sim);
    }
    let (n0, m0, s0, p0) = medians[0];
    for &(n, m, s, p) in &medians[1..] {
        println!(
            "{n} devices vs {n0}: page load {:.2}x, /api/v1/fleet {:.2}x, a page of devices {:.2}x",
            m / m0,
            s / s0,
            p / p0
        );
    }
}
