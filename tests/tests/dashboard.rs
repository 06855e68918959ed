//! The dashboard in headless Chromium (Debian's package, installed by `tests/run.sh`): after
//! a rollout whose canary rejects the new version, the page a person opens shows every device
//! with its labels and serving version, the aborted rollout with its waves, the canary's
//! reason and a chart over time, and the registry.
//!
//! `MODELCAST_SCREENSHOT=docs/dashboard.png` also writes a screenshot.

use std::time::Duration;

use modelcast_ops::onnx::example_model;
use modelcast_ops::publish::PublishOptions;
use modelcast_proto::manifest::LatencyBudget;
use modelcast_server::api::RolloutRequest;
use modelcast_server::rollout::{RolloutSpec, RolloutState};
use modelcast_tests::browser::{chromium, element, rendered};
use modelcast_tests::{wait_for, Fleet};

const DEVICES: [(&str, &str); 3] = [
    ("edge-1", "berlin"),
    ("edge-2", "berlin"),
    ("edge-3", "paris"),
];

#[test]
fn the_dashboard_shows_devices_rollouts_and_the_registry() {
    let fleet = Fleet::embedded();
    let _agents: Vec<_> = DEVICES
        .iter()
        .map(|(id, site)| fleet.start_agent_with(id, &[("site", site), ("hw", "jetson")], ""))
        .collect();
    wait_for("three devices", Duration::from_secs(30), || {
        (fleet.client.devices().ok()?.len() == 3).then_some(())
    });
    fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "hw=jetson");
    for (id, _) in DEVICES {
        fleet.wait_serving(id, "classifier", 1);
    }
    // v2 asks for a p95 no device can meet: the canary rejects it before the swap.
    let path = fleet.dir.path().join("v2.onnx");
    std::fs::write(&path, example_model(2, 16)).unwrap();
    let mut opts = PublishOptions::new("classifier", 2);
    opts.latency_budget = Some(LatencyBudget { p95_us: 1, runs: 5 });
    fleet.publish_with(&path, &opts);
    let spec = RolloutSpec {
        wave_timeout_secs: 600,
        ..RolloutSpec::new("classifier", 2, "hw=jetson", &["1"]).unwrap()
    };
    let r = fleet
        .client
        .start_rollout(&RolloutRequest {
            spec,
            by: "alice".into(),
        })
        .unwrap();
    let canary = r.wave_members(0).next().unwrap().device.clone();
    wait_for("the rollout to abort", Duration::from_secs(60), || {
        let r = fleet.client.rollout(r.id).ok()?;
        matches!(r.state, RolloutState::Aborted { .. }).then_some(())
    });

    let url = format!("{}/dashboard", fleet.client.base());
    let dom = rendered(fleet.dir.path(), &url);

    // The fleet table: every device, online, its labels, what it serves.
    assert!(dom.contains("3 devices, 3 online · 2 model versions · 0 rollouts running"));
    for (id, site) in DEVICES {
        let row = element(&dom, "tr", "data-device", id);
        assert!(row.contains(">online<"), "{row}");
        assert!(row.contains(&format!("site={site}")), "{row}");
        assert!(row.contains("classifier v1 (a) on tract"), "{row}");
        assert!(row.contains("title=\"configured"), "why, on hover: {row}");
    }
    let row = element(&dom, "tr", "data-device", &canary);
    assert!(row.contains("latency budget"), "the canary's reason: {row}");

    // The rollout: aborted, why, its canary wave, the chart, the canary's failure.
    let block = element(&dom, "div", "data-rollout", &r.id.to_string());
    assert!(block.contains("classifier v2 → hw=jetson"), "{block}");
    assert!(block.contains("aborted: 1 device(s) failed"), "{block}");
    assert!(
        block.contains("0/1 committed, 1 failed, 1 sent back"),
        "{block}"
    );
    let times = element(&dom, "div", "data-times", &r.id.to_string());
    assert!(
        times.contains("started ") && times.contains(", ended "),
        "{times}"
    );
    assert!(block.contains("<svg"), "{block}");
    assert!(block.contains("data-series=\"failed\""), "{block}");
    assert!(
        block.contains(&format!("{canary}: update rejected")),
        "{block}"
    );

    // The registry.
    for v in [1, 2] {
        let row = element(&dom, "tr", "data-model", &format!("classifier:{v}"));
        assert!(
            row.contains(&format!(">v{v}<")) && row.contains("nnef"),
            "{row}"
        );
        assert!(row.contains(">candidate<"), "{row}");
    }
    let row = element(&dom, "tr", "data-model", "classifier:1");
    assert!(row.contains(">3 devices<"), "v1 serves everywhere: {row}");

    if let Ok(path) = std::env::var("MODELCAST_SCREENSHOT") {
        let path = std::fs::canonicalize(".").unwrap().join(path);
        let out = chromium(
            fleet.dir.path(),
            &[
                "--window-size=1280,900",
                &format!("--screenshot={}", path.display()),
                &url,
            ],
        );
        assert!(path.exists(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}
