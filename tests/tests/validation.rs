//! Validation before the swap: a version whose warm-up runs on the device miss the latency
//! budget its manifest sets is rejected with the measured p95 in the reason, and the old model
//! keeps serving; the same model with a budget it meets installs.

use modelcast_ops::onnx::example_model_of_size;
use modelcast_ops::publish::PublishOptions;
use modelcast_proto::manifest::LatencyBudget;
use modelcast_tests::Fleet;

#[test]
fn a_version_over_its_latency_budget_never_serves() {
    let fleet = Fleet::embedded();
    let agent = fleet.start_agent_with(
        "edge-1",
        &[("site", "lab")],
        "[probation]\nrequests = 0\nseconds = 0\n",
    );
    fleet.wait_registered();
    let v1 = fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);

    // v2: four 1024-wide layers cannot answer within a microsecond.
    let path = fleet.dir.path().join("v2.onnx");
    std::fs::write(&path, example_model_of_size(2, 16 << 20)).unwrap();
    let mut opts = PublishOptions::new("classifier", 2);
    opts.latency_budget = Some(LatencyBudget {
        p95_us: 1,
        runs: 10,
    });
    fleet.publish_with(&path, &opts);
    fleet.deploy("classifier", 2, "*");
    let reason = fleet.wait_error("edge-1", "latency budget");
    assert!(
        reason.contains("over 10 warm-up runs exceeds 1 µs"),
        "{reason}"
    );
    assert_eq!(agent.check_golden(&v1), "1");

    // v3: the same network with a budget of ten seconds.
    let path = fleet.dir.path().join("v3.onnx");
    std::fs::write(&path, example_model_of_size(3, 16 << 20)).unwrap();
    let mut opts = PublishOptions::new("classifier", 3);
    opts.latency_budget = Some(LatencyBudget {
        p95_us: 10_000_000,
        runs: 10,
    });
    let v3 = fleet.publish_with(&path, &opts);
    fleet.deploy("classifier", 3, "*");
    fleet.wait_serving("edge-1", "classifier", 3);
    assert_eq!(agent.check_golden(&v3), "3");
    let log = std::fs::read_to_string(agent.log_path()).unwrap();
    assert!(
        log.contains("warmed up") && log.contains("p95_us="),
        "{log}"
    );
}
