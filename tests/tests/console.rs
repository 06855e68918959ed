//! The operator console (`server/console/`, embedded in the server) in a real browser: Debian's
//! Chromium (installed by `tests/run.sh`) driven by playwright-core (`server/console/e2e/`).
//!
//! A deployer signs in with a token, starts a rollout from the model page, follows it live,
//! aborts it from the page and sees the canary sent back on its device page; a viewer sees every
//! action disabled and is refused with 403 when it forces the call; the page says when the
//! server is out of reach. Each action lands in the audit log under the token's name. Then a
//! rollout whose canary rejects its version aborts by itself, and its page says why.
//!
//! `MODELCAST_SCREENSHOTS=docs/console cargo test -p modelcast-tests --test console` refreshes
//! the screenshots of each page in `docs/console/`.

use std::time::Duration;

use modelcast_ops::onnx::example_model;
use modelcast_ops::publish::PublishOptions;
use modelcast_proto::manifest::LatencyBudget;
use modelcast_server::api::RolloutRequest;
use modelcast_server::rollout::{RolloutSpec, RolloutState};
use modelcast_tests::browser::{console_script, element, rendered};
use modelcast_tests::{wait_for, Fleet};

const DEVICES: [(&str, &str); 3] = [
    ("edge-1", "berlin"),
    ("edge-2", "berlin"),
    ("edge-3", "paris"),
];

/// Sets the flag when dropped.
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn an_operator_rolls_out_and_aborts_from_the_console_and_a_viewer_cannot() {
    let mut fleet = Fleet::embedded();
    let [admin, deployer, viewer] = fleet.require_tokens();
    // Telemetry every second, so the pages chart the traffic below.
    let agents: Vec<_> = DEVICES
        .iter()
        .map(|(id, site)| {
            fleet.start_agent_with(
                id,
                &[("site", site), ("hw", "jetson")],
                "[telemetry]\ninterval_secs = 1\n",
            )
        })
        .collect();
    wait_for("three devices", Duration::from_secs(30), || {
        (fleet.client.devices().ok()?.len() == 3).then_some(())
    });
    let v1 = fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "hw=jetson");
    for (id, _) in DEVICES {
        fleet.wait_serving(id, "classifier", 1);
    }
    fleet.publish_example(2, 16);
    // Clients asking every device while the operator works: the canary's v2 answers beside v1.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let input = v1.golden[0].inputs.clone();
    let audit_from = fleet.client.audit(0).unwrap().len() as u64;

    let shots = std::env::var("MODELCAST_SCREENSHOTS").ok().map(|dir| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::canonicalize(dir).unwrap()
    });
    let out = std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut sent = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && sent < 100_000 {
                for agent in &agents {
                    let _ = agent.infer("classifier", &input);
                    sent += 1;
                }
                // About 30 requests a second across the fleet: traffic, not a load test.
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        // Stopped however the script ends (a failed one panics through here).
        let _stop = StopOnDrop(&stop);
        console_script(
            "console.mjs",
            &[
                ("CONSOLE_URL", fleet.client.base().to_string()),
                ("DEPLOYER_TOKEN", deployer),
                ("VIEWER_TOKEN", viewer),
                ("MODEL", "classifier".into()),
                ("DEVICES", DEVICES.map(|(id, _)| id).join(",").to_string()),
                (
                    "SCREENSHOTS",
                    shots.map(|d| d.display().to_string()).unwrap_or_default(),
                ),
            ],
            Duration::from_secs(420),
        )
    });
    println!("{out}");
    assert!(out.contains("console: ok"), "{out}");

    // What the deployer did from the page, in the audit log under its token's name.
    let audit = fleet.client.audit(audit_from).unwrap();
    for action in ["rollout.start", "rollout.abort"] {
        assert!(
            audit.iter().any(|e| e.action == action && e.who == "alice"),
            "{action} by alice: {audit:?}"
        );
    }
    assert!(
        !audit.iter().any(|e| e.who == "bob"),
        "the viewer changed nothing: {audit:?}"
    );
    // The rollback reached the device itself, not only the page.
    let rollouts = fleet.client.rollouts().unwrap();
    let aborted = rollouts.last().unwrap();
    assert!(matches!(aborted.state, RolloutState::Aborted { .. }));
    let canary = aborted.wave_members(0).next().unwrap().device.clone();
    fleet.wait_serving(&canary, "classifier", 1);

    // v3 asks for a p95 no device can meet: its canary rejects it before the swap and the
    // rollout aborts by itself. Its page says why, from the same data a person sees.
    let path = fleet.dir.path().join("v3.onnx");
    std::fs::write(&path, example_model(3, 16)).unwrap();
    let mut opts = PublishOptions::new("classifier", 3);
    opts.latency_budget = Some(LatencyBudget { p95_us: 1, runs: 5 });
    fleet.publish_with(&path, &opts);
    let spec = RolloutSpec {
        wave_timeout_secs: 600,
        ..RolloutSpec::new("classifier", 3, "hw=jetson", &["1"]).unwrap()
    };
    let r = fleet
        .client
        .start_rollout(&RolloutRequest {
            spec,
            by: "ci".into(),
        })
        .unwrap();
    let canary = r.wave_members(0).next().unwrap().device.clone();
    wait_for("the rollout to abort", Duration::from_secs(60), || {
        let r = fleet.client.rollout(r.id).ok()?;
        matches!(r.state, RolloutState::Aborted { .. }).then_some(())
    });
    // The page needs a token: the admin's, handed over in the link as an operator would.
    let url = format!(
        "{}/dashboard/rollouts/{}#token={}",
        fleet.client.base(),
        r.id,
        admin
    );
    let dom = rendered(fleet.dir.path(), &url, "data-member-state=\"reverted\"");
    let head = element(&dom, "section", "id", "rollout");
    assert!(head.contains("data-state=\"aborted\""), "{head}");
    assert!(head.contains("1 device(s) failed"), "the reason: {head}");
    assert!(
        head.contains("started ") && head.contains(", ended "),
        "{head}"
    );
    let wave = element(&dom, "div", "data-wave", "0");
    assert!(
        wave.contains("0/1 committed, 1 failed, 1 sent back"),
        "{wave}"
    );
    let member = element(&dom, "tr", "data-member", &canary);
    assert!(
        member.contains("update rejected") && member.contains("latency budget"),
        "the canary's reason: {member}"
    );
}
