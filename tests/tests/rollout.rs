//! Fleet rollouts end to end, with real agents.
//!
//! Four devices serve v1; v2 (a far slower network) is rolled out in waves with a canary of
//! two. One canary gets live traffic and its probation rolls v2 back on its p99. The failure
//! aborts the rollout by itself, and auto-rollback sends both canaries back to v1 (the other
//! one ends its trial at once); the two devices of later waves never see v2.
//!
//! Then v3 (good) goes out with a canary of one while an operator holds the rollout paused;
//! the canary commits v3, the operator aborts, and the canary goes back to v1 — a committed
//! version left through v3's signed `fallback_to`, which defaults to the oldest version a
//! deployment still names.

use std::time::Duration;

use modelcast_ops::onnx::example_model_of_size;
use modelcast_proto::desired::TrialThresholds;
use modelcast_server::fleet::RolloutAction;
use modelcast_server::rollout::{DeviceState, RolloutSpec, RolloutState};
use modelcast_tests::{bin, wait_for, Agent, Fleet};

const DEVICES: [&str; 4] = ["edge-1", "edge-2", "edge-3", "edge-4"];

/// The device's own policy would judge a trial after 1,000 requests or 10 minutes; the
/// rollout's thresholds say 30 requests or 3 seconds. A p99 three times v1's rolls back (v1
/// answers in ~0.05 ms, v2 in ~1 ms: no slack).
const PROBATION: &str =
    "[probation]\nrequests = 1000\nseconds = 600\nmax_p99_ratio = 3.0\np99_slack_ms = 0.0\n";

fn hammer(agent: &Agent, manifest: &modelcast_proto::manifest::Manifest, n: usize) {
    let inputs = &manifest.golden[0].inputs;
    for _ in 0..n {
        agent.infer(&manifest.name, inputs).expect("inference");
    }
}

#[test]
fn a_failing_canary_aborts_the_rollout_and_rolls_the_moved_devices_back() {
    let fleet = Fleet::embedded();
    let agents: Vec<Agent> = DEVICES
        .iter()
        .map(|id| fleet.start_agent_with(id, &[("site", "lab")], PROBATION))
        .collect();
    wait_for("four devices", Duration::from_secs(30), || {
        (fleet.client.devices().ok()?.len() == DEVICES.len()).then_some(())
    });
    let v1 = fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "site=lab");
    for id in DEVICES {
        fleet.wait_serving(id, "classifier", 1);
    }
    // Live traffic on v1 gives each device the baseline its next trial is judged against:
    // 200 requests, so that its p99 is not the one run a loaded machine happened to delay
    // (with 40 it was the slowest run, and once it came within 3x of v2's).
    for agent in &agents {
        hammer(agent, &v1, 200);
    }

    let path = fleet.dir.path().join("slow.onnx");
    std::fs::write(&path, example_model_of_size(2, 32 << 20)).unwrap();
    let v2 = fleet.publish_file(&path, "classifier", 2);
    assert_eq!(v2.fallback_to, Some(1), "publish allows falling back to v1");

    let spec = RolloutSpec {
        wave_timeout_secs: 120,
        probation: Some(TrialThresholds {
            requests: Some(30),
            seconds: Some(3),
            ..TrialThresholds::default()
        }),
        ..RolloutSpec::new("classifier", 2, "site=lab", &["2", "75%"]).unwrap()
    };
    let rollout = fleet.start_rollout(spec);
    assert_eq!(rollout.wave_sizes, vec![2, 3, 4]);
    let canaries: Vec<String> = rollout.wave_members(0).map(|m| m.device.clone()).collect();
    let later: Vec<String> = rollout
        .members
        .iter()
        .filter(|m| m.wave > 0)
        .map(|m| m.device.clone())
        .collect();
    let agent = |id: &str| &agents[DEVICES.iter().position(|d| *d == id).unwrap()];

    // The busy canary: v2 serves on trial, then its p99 rolls it back.
    let busy = &canaries[0];
    fleet.wait_serving(busy, "classifier", 2);
    hammer(agent(busy), &v2, 40);

    let aborted = wait_for("the rollout to abort", Duration::from_secs(60), || {
        let r = fleet.client.rollout(rollout.id).ok()?;
        match r.state {
            RolloutState::Aborted { reason } => Some(reason),
            _ => None,
        }
    });
    assert!(aborted.contains("1 device(s) failed"), "{aborted}");

    // Both canaries end on v1 again; the later waves never moved.
    for id in DEVICES {
        fleet.wait_serving(id, "classifier", 1);
    }
    let r = wait_for(
        "both canaries reported back on v1",
        Duration::from_secs(60),
        || {
            let r = fleet.client.rollout(rollout.id).ok()?;
            let back = r.wave_members(0).all(|m| m.state == DeviceState::Reverted);
            back.then_some(r)
        },
    );
    for id in &later {
        assert_eq!(r.member(id).unwrap().state, DeviceState::Waiting);
        let report = fleet.report(id).unwrap();
        assert!(
            report.last_error.is_none(),
            "{id} never saw v2: {:?}",
            report.last_error
        );
    }
    let reason = fleet
        .report(busy)
        .and_then(|r| r.last_error)
        .map(|e| e.reason)
        .unwrap_or_default();
    assert!(reason.contains("p99 latency"), "{reason}");
    for id in &canaries {
        assert_eq!(agent(id).check_golden(&v1), "1");
    }
    let timeline = &r.timeline;
    assert!(timeline.iter().any(|c| c.failed == 1));
    assert_eq!(timeline.last().unwrap().reverted, 2);

    // The operators' view.
    let out = std::process::Command::new(bin("modelcast"))
        .args([
            "--server",
            fleet.client.base(),
            "rollout",
            "status",
            "--follow",
        ])
        .output()
        .expect("modelcast rollout status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("aborted: 1 device(s) failed"), "{text}");
    assert!(
        text.contains(&format!("failed: {busy}: rolled back to version 1")),
        "{text}"
    );
    assert!(text.contains("2 sent back"), "{text}");

    // v3: good; its canary commits while the rollout is held; the operator aborts.
    let v3 = fleet.publish_example(3, 16);
    assert_eq!(
        v3.fallback_to,
        Some(1),
        "v1 is what the group's deployment names"
    );
    let out = std::process::Command::new(bin("modelcast"))
        .args(["--server", fleet.client.base(), "rollout", "start"])
        .args([
            "--model",
            "classifier",
            "--version",
            "3",
            "--group",
            "site=lab",
        ])
        .args(["--waves", "1", "--probation-seconds", "1", "--by", "alice"])
        .output()
        .expect("modelcast rollout start");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let third = fleet.client.rollouts().unwrap().last().unwrap().clone();
    assert_eq!(third.by, "alice");
    fleet
        .client
        .act_on_rollout(third.id, RolloutAction::Pause, "alice")
        .unwrap();
    let canary = third.wave_members(0).next().unwrap().device.clone();
    wait_for("the v3 canary to commit", Duration::from_secs(60), || {
        let r = fleet.client.rollout(third.id).ok()?;
        (r.member(&canary)?.state == DeviceState::Committed).then_some(())
    });
    assert_eq!(
        fleet.client.rollout(third.id).unwrap().state,
        RolloutState::Paused,
        "held: no second wave"
    );
    assert_eq!(agent(&canary).check_golden(&v3), "3");
    let out = std::process::Command::new(bin("modelcast"))
        .args(["--server", fleet.client.base(), "rollout", "abort"])
        .arg(third.id.to_string())
        .args(["--by", "alice"])
        .output()
        .expect("modelcast rollout abort");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("aborted by alice"));
    fleet.wait_serving(&canary, "classifier", 1);
    assert_eq!(agent(&canary).check_golden(&v1), "1");
    wait_for(
        "the v3 canary reported back",
        Duration::from_secs(60),
        || {
            let r = fleet.client.rollout(third.id).ok()?;
            (r.member(&canary)?.state == DeviceState::Reverted).then_some(())
        },
    );
    for id in DEVICES.iter().filter(|d| **d != canary.as_str()) {
        fleet.wait_serving(id, "classifier", 1);
    }
}

/// A rollout's state survives a server restart (SIGKILL): it resumes where it stood, ends,
/// and the group keeps the version as its deployment.
#[test]
fn a_rollout_survives_a_server_restart() {
    let mut fleet = Fleet::embedded();
    let agents: Vec<Agent> = DEVICES[..3]
        .iter()
        .map(|id| fleet.start_agent_with(id, &[("site", "lab")], PROBATION))
        .collect();
    wait_for("three devices", Duration::from_secs(30), || {
        (fleet.client.devices().ok()?.len() == 3).then_some(())
    });
    fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "site=lab");
    for id in &DEVICES[..3] {
        fleet.wait_serving(id, "classifier", 1);
    }
    let v2 = fleet.publish_example(2, 16);
    let spec = RolloutSpec {
        wave_timeout_secs: 600,
        probation: Some(TrialThresholds {
            seconds: Some(1),
            ..TrialThresholds::default()
        }),
        ..RolloutSpec::new("classifier", 2, "site=lab", &["1"]).unwrap()
    };
    let r = fleet.start_rollout(spec);
    fleet
        .client
        .act_on_rollout(r.id, RolloutAction::Pause, "e2e")
        .unwrap();
    let canary = r.wave_members(0).next().unwrap().device.clone();
    wait_for("the canary to commit", Duration::from_secs(60), || {
        let r = fleet.client.rollout(r.id).ok()?;
        (r.member(&canary)?.state == DeviceState::Committed).then_some(())
    });
    let before = fleet.client.rollout(r.id).unwrap();

    fleet.restart_server();
    // Decisions are flushed before they are acted on; device states within a second, and the
    // devices' retained reports restore them in any case.
    let after = wait_for(
        "the rollout where it stood",
        Duration::from_secs(30),
        || {
            let after = fleet.client.rollout(r.id).ok()?;
            (after.member(&canary)?.state == DeviceState::Committed).then_some(after)
        },
    );
    assert_eq!(after.state, RolloutState::Paused);
    assert_eq!(after.members.len(), before.members.len());
    assert_eq!(after.wave_sizes, before.wave_sizes);
    fleet
        .client
        .act_on_rollout(r.id, RolloutAction::Resume, "e2e")
        .unwrap();
    wait_for("the rollout to complete", Duration::from_secs(60), || {
        let r = fleet.client.rollout(r.id).ok()?;
        (r.state == RolloutState::Completed).then_some(())
    });
    for (id, agent) in DEVICES[..3].iter().zip(&agents) {
        fleet.wait_serving(id, "classifier", 2);
        assert_eq!(agent.check_golden(&v2), "2");
    }
    let deployments = fleet.client.deployments().unwrap();
    let last = deployments.last().unwrap();
    assert_eq!((last.version, last.group.as_str()), (2, "site=lab"));
    assert_eq!(last.by, format!("rollout {}", r.id));
}
