//! Drift detection end to end: two real agents serve the example classifier and report
//! telemetry every second; clients send each a 50/50 mix of two inputs the model puts in
//! different classes. Then one device's inputs shift to the second kind only, while the other
//! keeps the mix.
//!
//! - The shifted device raises a class-drift alert (PSI of its class histogram against its
//!   baseline) for the version it serves, visible in the API, the CLI and `/metrics`.
//! - The stable device raises no alert of any kind.
//! - The dashboard, in headless Chromium, shows the alert and the model's charts.
//!   `MODELCAST_SCREENSHOT=docs/monitoring.png` also writes a screenshot.
//! - As a rollout's abort criterion: version 2 goes out with `abort_on_alerts` to one canary
//!   (on a long trial, so the rollout waits in its first wave); when the canary's inputs
//!   shift, the alert fails it and the rollout aborts and sends it back to version 1.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use modelcast_proto::manifest::TensorData;
use modelcast_server::api::AlertQuery;
use modelcast_server::rollout::{RolloutSpec, RolloutState};
use modelcast_tests::browser::{chromium, element, rendered};
use modelcast_tests::{bin, wait_for, Agent, Fleet};

/// Inputs: the mix, or the second kind only.
const MIX: u8 = 0;
const SHIFTED: u8 = 1;

/// Two inputs the model puts in different classes.
fn two_classes(agent: &Agent, golden: &TensorData) -> (Vec<TensorData>, Vec<TensorData>) {
    let argmax = |v: &[f64]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
            .unwrap()
    };
    let mut seen: Vec<(usize, Vec<TensorData>)> = Vec::new();
    // Probes: one-hot vectors both ways, then pseudo-random ones (a fixed LCG).
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((state >> 33) as f32 / (1u64 << 31) as f32) * 16.0 - 8.0
    };
    let probes = (0..8).map(|i| {
        let mut x = vec![0.0f32; 4];
        x[i / 2] = if i % 2 == 0 { 8.0 } else { -8.0 };
        x
    });
    let random: Vec<Vec<f32>> = (0..64).map(|_| (0..4).map(|_| next()).collect()).collect();
    for x in probes.chain(random) {
        let input = vec![TensorData::from_f32(&golden.name, golden.shape.clone(), &x)];
        let (_, out) = agent.infer("classifier", &input).expect("inference");
        let class = argmax(&out);
        if let Some((_, first)) = seen.iter().find(|(c, _)| *c != class) {
            return (first.clone(), input);
        }
        seen.push((class, input));
    }
    panic!("every probe input lands in one class");
}

/// Sends `agent` requests about every 20 ms until `stop`: alternating the two inputs under
/// [`MIX`], the second only under [`SHIFTED`].
fn traffic(
    agent: &Agent,
    inputs: (Vec<TensorData>, Vec<TensorData>),
    mode: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    let port = agent.http_port;
    std::thread::spawn(move || {
        let clients = [
            modelcast_tests::hammer::InferClient::new(port, "classifier", &inputs.0),
            modelcast_tests::hammer::InferClient::new(port, "classifier", &inputs.1),
        ];
        let mut sent = 0u64;
        // Bounded: at most ten minutes of requests.
        for i in 0..30_000u64 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let which = if mode.load(Ordering::Relaxed) == SHIFTED {
                1
            } else {
                (i % 2) as usize
            };
            if clients[which].call().is_ok() {
                sent += 1;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        sent
    })
}

/// Requests an interval needs to make a drift sample (`--drift-min-requests`).
const MIN_REQUESTS: u64 = 20;

/// How many of `device`'s stored telemetry reports hold a whole drift sample of the
/// classifier at `version` (at least [`MIN_REQUESTS`] requests). The server stores a report
/// before its drift detectors take it, and takes reports one at a time: when `n` are stored,
/// the first `n - 1` have been judged.
fn samples(fleet: &Fleet, device: &str, version: u64) -> usize {
    fleet
        .client
        .device_telemetry(device, 3600)
        .unwrap_or_default()
        .iter()
        .filter(|r| {
            r.models.iter().any(|m| {
                m.model == "classifier" && m.version == version && m.requests >= MIN_REQUESTS
            })
        })
        .count()
}

/// Waits until `device` has at least `n` judged samples of the classifier at `version`.
fn wait_judged(fleet: &Fleet, device: &str, version: u64, n: usize) {
    wait_for(
        &format!("{n} judged drift samples of {device} at v{version}"),
        Duration::from_secs(60),
        || (samples(fleet, device, version) > n).then_some(()),
    );
}

fn alerts(fleet: &Fleet, all: bool) -> modelcast_server::api::AlertList {
    fleet
        .client
        .alerts(&AlertQuery {
            all,
            ..AlertQuery::default()
        })
        .unwrap()
}

#[test]
fn a_shifted_input_distribution_raises_an_alert_and_a_stable_one_does_not() {
    let fleet = Fleet::embedded_with(&[
        "--drift-min-requests",
        &MIN_REQUESTS.to_string(),
        "--drift-baseline-samples",
        "3",
    ]);
    let config = "[telemetry]\ninterval_secs = 1\n[probation]\nrequests = 20\nseconds = 600\n";
    let stable = fleet.start_agent_with("stable", &[("site", "lab")], config);
    let shifted = fleet.start_agent_with("shifted", &[("site", "lab")], config);
    wait_for("two devices", Duration::from_secs(30), || {
        (fleet.client.devices().ok()?.len() == 2).then_some(())
    });
    let v1 = fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "site=lab");
    fleet.wait_serving("stable", "classifier", 1);
    fleet.wait_serving("shifted", "classifier", 1);
    let inputs = two_classes(&stable, &v1.golden[0].inputs[0]);

    let stop = Arc::new(AtomicBool::new(false));
    let modes = [Arc::new(AtomicU8::new(MIX)), Arc::new(AtomicU8::new(MIX))];
    let senders = [
        traffic(&stable, inputs.clone(), modes[0].clone(), stop.clone()),
        traffic(&shifted, inputs.clone(), modes[1].clone(), stop.clone()),
    ];
    // A baseline of the mix (three samples of 20 requests or more) on both devices, and two
    // samples judged against it.
    for device in ["stable", "shifted"] {
        wait_judged(&fleet, device, 1, 5);
    }
    assert!(
        alerts(&fleet, true).alerts.is_empty(),
        "no alert on the mix"
    );
    modes[1].store(SHIFTED, Ordering::Relaxed);
    let shifted_at = Instant::now();
    let alert = wait_for(
        "a drift alert on the shifted device",
        Duration::from_secs(40),
        || {
            alerts(&fleet, false)
                .alerts
                .into_iter()
                .find(|a| a.device == "shifted")
        },
    );
    let after = shifted_at.elapsed();
    assert_eq!((alert.model.as_str(), alert.version), ("classifier", 1));
    assert_eq!(alert.test, "psi");
    assert!(alert.value > alert.threshold, "{alert:?}");
    // The stable device goes on with the mix: two more samples judged.
    let judged = samples(&fleet, "stable", 1);
    wait_judged(&fleet, "stable", 1, judged + 2);

    let list = alerts(&fleet, true);
    assert!(
        list.alerts.iter().all(|a| a.device == "shifted"),
        "the stable device raised no alert: {:?}",
        list.alerts
    );
    assert_eq!(list.versions.len(), 1);
    assert_eq!(list.versions[0].devices, 1);

    let out = std::process::Command::new(bin("modelcast"))
        .args(["--server", fleet.client.base(), "alerts"])
        .output()
        .expect("modelcast alerts");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("classifier v1: 1 device(s) alerting: class drift of"),
        "{text}"
    );
    assert!(
        text.contains("shifted") && text.contains("ACTIVE"),
        "{text}"
    );
    // The console: the alert on the overview, the model's charts and figures on its page.
    let dom = rendered(
        fleet.dir.path(),
        &format!("{}/dashboard", fleet.client.base()),
        &format!("data-alert=\"{}\"", alert.id),
    );
    let row = element(&dom, "tr", "data-alert", &alert.id.to_string());
    assert!(
        row.contains("shifted") && row.contains("class drift"),
        "{row}"
    );
    let summary = element(&dom, "div", "data-alert-version", "classifier:1");
    assert!(summary.contains("1 device(s) alerting"), "{summary}");
    let page = format!("{}/dashboard/models/classifier", fleet.client.base());
    let dom = rendered(fleet.dir.path(), &page, ">v1 p50<");
    let block = element(&dom, "section", "id", "model-telemetry");
    for series in ["v1 p50", "v1 p99"] {
        assert!(block.contains(&format!(">{series}<")), "{block}");
    }
    let v1_row = element(&dom, "tr", "data-version-telemetry", "1");
    assert!(
        v1_row.contains("0.00 %") && v1_row.contains(" ms<"),
        "{v1_row}"
    );
    // No request failed: the error-rate chart's largest value is 0 (not its scale's top).
    let errors = element(&dom, "figure", "data-chart", "error rate");
    assert!(errors.contains("data-max=\"0\""), "{errors}");
    if let Ok(path) = std::env::var("MODELCAST_SCREENSHOT") {
        let path = std::fs::canonicalize(".").unwrap().join(path);
        chromium(
            fleet.dir.path(),
            &[
                "--window-size=1280,1100",
                &format!("--screenshot={}", path.display()),
                &page,
            ],
        );
    }

    let metrics = fleet.client.metrics().unwrap();
    assert!(
        metrics.contains(
            "modelcast_fleet_alerts{model=\"classifier\",version=\"1\",kind=\"class_drift\",output="
        ),
        "{metrics}"
    );
    println!(
        "alert {:.1} s after the shift: {} ({} {:.3} > {:.3})",
        after.as_secs_f64(),
        alert.message,
        alert.test,
        alert.value,
        alert.threshold
    );

    // As a rollout's abort criterion: v2 to one canary.
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        assert!(s.join().unwrap() > 100);
    }
    fleet.publish_example(2, 16);
    let mut spec = RolloutSpec::new("classifier", 2, "site=lab", &["1"]).unwrap();
    spec.abort_on_alerts = true;
    spec.wave_timeout_secs = 600;
    // The canary stays on trial, so the rollout waits in its first wave.
    spec.probation = Some(modelcast_proto::desired::TrialThresholds {
        requests: Some(1_000_000),
        seconds: Some(600),
        max_error_permille: None,
        max_p99_percent: None,
    });
    let r = fleet.start_rollout(spec);
    let canary = r.members[0].device.clone();
    fleet.wait_serving(&canary, "classifier", 2);
    // v2 has other weights: two inputs it puts in different classes; the mix again.
    let agent = if canary == "stable" {
        &stable
    } else {
        &shifted
    };
    let inputs = two_classes(agent, &v1.golden[0].inputs[0]);
    let stop = Arc::new(AtomicBool::new(false));
    let canary_mode = Arc::new(AtomicU8::new(MIX));
    let sender = traffic(agent, inputs, canary_mode.clone(), stop.clone());
    // The canary's baseline of v2 on the mix (three samples judged), then its inputs shift.
    wait_judged(&fleet, &canary, 2, 3);
    canary_mode.store(SHIFTED, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(40);
    let aborted = loop {
        let now = fleet.client.rollout(r.id).unwrap();
        if matches!(now.state, RolloutState::Aborted { .. }) {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "the rollout was not aborted by an alert: {:?}\nalerts: {:?}\n{}",
            now.members,
            alerts(&fleet, true).alerts,
            fleet.server_log()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let failure = aborted.members[0].failure.clone().unwrap_or_default();
    assert!(failure.starts_with("alert: class drift"), "{failure}");
    fleet.wait_serving(&canary, "classifier", 1);
    stop.store(true, Ordering::Relaxed);
    assert!(sender.join().unwrap() > 100);
    println!("rollout {} aborted: {failure}", aborted.id);

    // Both versions served in the hour: the model page's charts compare them line by line.
    let dom = rendered(
        fleet.dir.path(),
        &format!("{}/dashboard/models/classifier", fleet.client.base()),
        ">v2 p99<",
    );
    let block = element(&dom, "section", "id", "model-telemetry");
    for v in [1, 2] {
        for series in ["p50", "p99"] {
            assert!(
                block.contains(&format!(">v{v} {series}<")),
                "v{v} {series}: {block}"
            );
        }
        assert!(
            block.contains(&format!("data-version-telemetry=\"{v}\"")),
            "{block}"
        );
    }
}
