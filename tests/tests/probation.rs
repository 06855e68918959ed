//! Probation end to end: a new version that is much slower than the one it replaced is rolled
//! back on live traffic; a version on trial through which the agent keeps crashing (SIGKILL)
//! is rolled back at start-up. Both are reported with their reason, and the last good model
//! serves throughout.

use std::time::Duration;

use modelcast_ops::onnx::example_model_of_size;
use modelcast_proto::desired::TrialThresholds;
use modelcast_proto::report::Phase;
use modelcast_tests::{wait_for, Agent, Fleet};

const PROBATION: &str =
    "[probation]\nrequests = 100\nseconds = 600\nmax_p99_ratio = 3.0\np99_slack_ms = 0.0\nmax_trial_boots = 2\n";

/// Sends `n` inferences; returns the versions that answered.
fn hammer(agent: &Agent, manifest: &modelcast_proto::manifest::Manifest, n: usize) -> Vec<String> {
    let inputs = &manifest.golden[0].inputs;
    (0..n)
        .map(|_| agent.infer(&manifest.name, inputs).expect("inference").0)
        .collect()
}

fn wait_error(fleet: &Fleet, device: &str, version: u64, needle: &str) -> String {
    wait_for(
        &format!("{device} to report {needle:?} for v{version}"),
        Duration::from_secs(60),
        || {
            let e = fleet.report(device)?.last_error?;
            (e.version == Some(version) && e.reason.contains(needle)).then_some(e.reason)
        },
    )
}

/// A deployment's thresholds override the device's: a device that would judge a trial after
/// 1,000 requests commits after the rollout's 10.
#[test]
fn a_rollouts_probation_thresholds_override_the_devices() {
    let fleet = Fleet::embedded();
    let agent = fleet.start_agent_with(
        "edge-1",
        &[],
        "[probation]\nrequests = 1000\nseconds = 600\n",
    );
    fleet.wait_registered();
    fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);
    let v2 = fleet.publish_example(2, 16);
    let thresholds = TrialThresholds {
        requests: Some(10),
        max_p99_percent: Some(1000),
        ..TrialThresholds::default()
    };
    fleet.deploy_with("classifier", 2, "*", Some(thresholds));
    fleet.wait_serving("edge-1", "classifier", 2);
    let phase = || {
        fleet.report("edge-1")?.models["classifier"]
            .update
            .as_ref()
            .map(|u| u.phase)
    };
    assert_eq!(phase(), Some(Phase::Probation));
    assert!(hammer(&agent, &v2, 10).iter().all(|v| v == "2"));
    wait_for("the trial to be committed", Duration::from_secs(30), || {
        (phase() == Some(Phase::Active)).then_some(())
    });
    let committed =
        agent.metric("modelcast_updates_total{model=\"classifier\",outcome=\"committed\"}");
    assert_eq!(committed, Some(1.0));
}

#[test]
fn slow_and_crash_looping_versions_are_rolled_back() {
    let fleet = Fleet::embedded();
    let mut agent = fleet.start_agent_with("edge-1", &[("site", "lab")], PROBATION);
    fleet.wait_registered();
    // v1: tiny and fast; the first install has nothing to roll back to and commits at once.
    let v1 = fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);
    assert!(hammer(&agent, &v1, 100).iter().all(|v| v == "1"));

    // v2: a deep 32 MB network, far slower per request: rolled back on its p99.
    let path = fleet.dir.path().join("slow.onnx");
    std::fs::write(&path, example_model_of_size(2, 32 << 20)).unwrap();
    let v2 = fleet.publish_file(&path, "classifier", 2);
    fleet.deploy("classifier", 2, "*");
    fleet.wait_serving("edge-1", "classifier", 2);
    let report = fleet.report("edge-1").unwrap();
    assert_eq!(
        report.models["classifier"].update.as_ref().unwrap().phase,
        Phase::Probation
    );
    let answered = hammer(&agent, &v2, 100);
    assert!(answered.iter().all(|v| v == "2"), "{answered:?}");
    let reason = wait_error(&fleet, "edge-1", 2, "rolled back to version 1");
    assert!(reason.contains("p99 latency"), "{reason}");
    fleet.wait_serving("edge-1", "classifier", 1);
    assert_eq!(agent.check_golden(&v1), "1");

    // v3: on trial, and the agent dies (SIGKILL) again and again before it is committed.
    let v3 = fleet.publish_example(3, 16);
    fleet.deploy("classifier", 3, "*");
    fleet.wait_serving("edge-1", "classifier", 3);
    assert_eq!(agent.check_golden(&v3), "3");
    for _ in 0..2 {
        agent.kill();
        agent.start(); // Start-ups 1 and 2 with v3 on trial: allowed.
        assert_eq!(agent.check_golden(&v3), "3");
    }
    agent.kill();
    agent.start(); // Start-up 3: a crash loop; v1 serves before the API even answers.
    assert_eq!(agent.check_golden(&v1), "1");
    let reason = wait_error(&fleet, "edge-1", 3, "crash loop");
    assert!(reason.contains("3 start-ups"), "{reason}");
    fleet.wait_serving("edge-1", "classifier", 1);

    // The rolled-back versions are not installed again while the desired state names them:
    // once this start has verified the desired state (naming v3), no update starts.
    let log = wait_for(
        "the desired state verified",
        Duration::from_secs(30),
        || {
            let log = std::fs::read_to_string(agent.log_path()).ok()?;
            log.contains("desired state verified").then_some(log)
        },
    );
    assert!(!log.contains("update starts"), "{log}");
    assert_eq!(agent.check_golden(&v1), "1");
    let metrics = ureq::get(format!("http://127.0.0.1:{}/metrics", agent.http_port))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(
        metrics.contains(r#"modelcast_update_phase{model="classifier",phase="failed"} 1"#),
        "{metrics}"
    );
}
