//! Two versions serving at once (`CanarySpec`, `Models::set_canary` in `agent/src/serve.rs`):
//! while a new version is on probation, it answers its share of the requests beside the last
//! good one, every answer names the version that gave it, clients can ask for either by
//! number or by label (`stable`, `canary`), probation judges the canary's share alone, and
//! telemetry keeps the versions apart. A canary that passes takes all traffic; one that fails
//! is dropped, and the stable version never stopped answering.

use std::collections::BTreeMap;
use std::time::Duration;

use modelcast_ops::onnx::example_model_of_size;
use modelcast_proto::desired::CanarySpec;
use modelcast_proto::manifest::Manifest;
use modelcast_server::telemetry::Question;
use modelcast_tests::hammer::InferClient;
use modelcast_tests::{wait_for, Agent, Fleet};

/// One inference on `path` (`""` or `/versions/{v}`) with an optional header; the version
/// that answered, or the status and body.
fn ask(
    agent: &Agent,
    manifest: &Manifest,
    path: &str,
    header: Option<(&str, &str)>,
) -> Result<String, String> {
    let mut client = InferClient::new(agent.http_port, &manifest.name, &manifest.golden[0].inputs);
    if let Some(version) = path.strip_prefix("/versions/") {
        client = client.version(version);
    }
    client.call_with(header).map(|(version, _)| version)
}

/// The model's metadata (`/v2/models/{name}{path}`).
fn metadata(agent: &Agent, name: &str, path: &str) -> serde_json::Value {
    ureq::get(format!(
        "http://127.0.0.1:{}/v2/models/{name}{path}",
        agent.http_port
    ))
    .call()
    .expect("metadata")
    .body_mut()
    .read_json()
    .expect("JSON")
}

/// Waits until the device's API lists exactly `versions` for the model.
fn wait_versions(agent: &Agent, name: &str, versions: &[&str]) {
    wait_for(
        &format!("{name} to answer as versions {versions:?}"),
        Duration::from_secs(120),
        || (metadata(agent, name, "")["versions"] == serde_json::json!(versions)).then_some(()),
    );
}

/// The canary `device` reports for the classifier, if any.
fn canary_of(fleet: &Fleet, device: &str) -> Option<modelcast_proto::report::CanaryState> {
    fleet
        .report(device)?
        .models
        .get("classifier")?
        .canary
        .clone()
}

fn count(answers: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for a in answers {
        *counts.entry(a.clone()).or_default() += 1;
    }
    counts
}

#[test]
fn a_canary_answers_its_share_beside_the_stable_version_and_takes_over_when_it_passes() {
    let fleet = Fleet::embedded();
    let agent = fleet.start_agent_with(
        "edge-1",
        &[],
        "[probation]\nrequests = 1000\nseconds = 600\nmax_p99_ratio = 100.0\n\
         [telemetry]\ninterval_secs = 1\n",
    );
    fleet.wait_registered();
    let v1 = fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);

    // v2 on probation as a 10 % canary: both answer.
    fleet.publish_example(2, 16);
    let split = |percent, key: Option<&str>| CanarySpec {
        percent,
        key: key.map(String::from),
    };
    fleet.deploy_canary("classifier", 2, "*", split(10, None));
    wait_versions(&agent, "classifier", &["1", "2"]);
    wait_for(
        "the canary in the device's report",
        Duration::from_secs(60),
        || {
            let canary = canary_of(&fleet, "edge-1")?;
            (canary.version == 2 && canary.percent == 10).then_some(())
        },
    );

    // By count: exactly 100 of 1,000 requests, every answer naming its version.
    let answers: Vec<String> = (0..1000)
        .map(|_| ask(&agent, &v1, "", None).expect("inference"))
        .collect();
    let counts = count(&answers);
    println!("1,000 requests: {counts:?}");
    assert_eq!(counts.get("2"), Some(&100), "{counts:?}");
    assert_eq!(counts.get("1"), Some(&900), "{counts:?}");

    // Telemetry keeps the versions apart.
    let requests = |version| {
        fleet
            .client
            .telemetry(&Question {
                model: "classifier".into(),
                version: Some(version),
                group: None,
                since_secs: 3600,
                step_secs: None,
            })
            .ok()
            .map_or(0, |a| a.totals.requests)
    };
    let (one, two) = wait_for(
        "the server's telemetry of both versions",
        Duration::from_secs(60),
        || {
            let (one, two) = (requests(1), requests(2));
            (one >= 900 && two >= 100).then_some((one, two))
        },
    );
    assert_eq!((one, two), (900, 100));

    // Versions by number and by label; one not loaded is a clear 404.
    for (path, version) in [
        ("/versions/1", "1"),
        ("/versions/2", "2"),
        ("/versions/stable", "1"),
        ("/versions/canary", "2"),
    ] {
        assert_eq!(
            ask(&agent, &v1, path, None).as_deref(),
            Ok(version),
            "{path}"
        );
    }
    let missing = ask(&agent, &v1, "/versions/7", None).unwrap_err();
    assert!(
        missing.starts_with("404") && missing.contains("1 (stable) and 2 (canary)"),
        "{missing}"
    );
    assert_eq!(
        metadata(&agent, "classifier", "/versions/canary")["parameters"]["label"],
        "canary"
    );
    assert_eq!(
        metadata(&agent, "classifier", "/versions/1")["parameters"]["label"],
        "stable"
    );

    // Sticky by a header: the same user, the same version, at the new share.
    fleet.deploy_canary("classifier", 2, "*", split(50, Some("x-user")));
    wait_for(
        "the new share in the device's report",
        Duration::from_secs(60),
        || {
            let canary = canary_of(&fleet, "edge-1")?;
            (canary.percent == 50 && canary.key.as_deref() == Some("x-user")).then_some(())
        },
    );
    let users: Vec<String> = (0..200).map(|u| format!("user-{u}")).collect();
    let first: Vec<String> = users
        .iter()
        .map(|u| ask(&agent, &v1, "", Some(("x-user", u))).expect("inference"))
        .collect();
    let again: Vec<String> = users
        .iter()
        .map(|u| ask(&agent, &v1, "", Some(("x-user", u))).expect("inference"))
        .collect();
    assert_eq!(first, again, "each user stays on one version");
    let on_canary = first.iter().filter(|v| *v == "2").count();
    assert!((60..=140).contains(&on_canary), "{on_canary} of 200 users");

    // Probation counts the canary's answers only: 100 + 1 + 1 + 2 x on_canary so far, then
    // enough on the canary label to reach 1,000. The device then serves v2 alone.
    let phase = fleet.report("edge-1").unwrap().models["classifier"]
        .update
        .as_ref()
        .map(|u| u.phase);
    assert_eq!(phase, Some(modelcast_proto::report::Phase::Probation));
    for _ in 0..1000 {
        if metadata(&agent, "classifier", "")["versions"] == serde_json::json!(["2"]) {
            break;
        }
        let _ = ask(&agent, &v1, "/versions/canary", None);
    }
    fleet.wait_serving("edge-1", "classifier", 2);
    wait_versions(&agent, "classifier", &["2"]);
    let answers: Vec<String> = (0..50)
        .map(|_| ask(&agent, &v1, "", None).expect("inference"))
        .collect();
    assert!(answers.iter().all(|v| v == "2"), "{answers:?}");
    let missing = ask(&agent, &v1, "/versions/canary", None).unwrap_err();
    assert!(missing.contains("has no canary"), "{missing}");
}

#[test]
fn a_slow_canary_is_dropped_while_the_stable_version_answers_throughout() {
    let fleet = Fleet::embedded();
    let agent = fleet.start_agent_with(
        "edge-1",
        &[],
        "[probation]\nrequests = 60\nseconds = 600\nmax_p99_ratio = 3.0\np99_slack_ms = 0.0\n",
    );
    fleet.wait_registered();
    let v1 = fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);
    for _ in 0..100 {
        assert_eq!(ask(&agent, &v1, "", None).as_deref(), Ok("1"));
    }

    // v2: a deep 32 MB network, far slower per request, as a 25 % canary.
    let path = fleet.dir.path().join("slow.onnx");
    std::fs::write(&path, example_model_of_size(2, 32 << 20)).unwrap();
    fleet.publish_file(&path, "classifier", 2);
    let canary = CanarySpec {
        percent: 25,
        key: None,
    };
    fleet.deploy_canary("classifier", 2, "*", canary);
    wait_versions(&agent, "classifier", &["1", "2"]);

    // Every request is answered, by one version or the other, until the canary is judged.
    let mut answers = Vec::new();
    for _ in 0..400 {
        answers.push(ask(&agent, &v1, "", None).expect("every request answered"));
        if metadata(&agent, "classifier", "")["versions"] == serde_json::json!(["1"]) {
            break;
        }
    }
    let counts = count(&answers);
    println!("until the verdict: {counts:?}");
    assert!(counts.get("2").is_some_and(|n| *n >= 60), "{counts:?}");
    let reason = wait_for("the rollback reported", Duration::from_secs(60), || {
        let e = fleet.report("edge-1")?.last_error?;
        (e.version == Some(2) && e.reason.contains("rolled back")).then_some(e.reason)
    });
    assert!(reason.contains("p99 latency"), "{reason}");
    wait_versions(&agent, "classifier", &["1"]);
    for _ in 0..50 {
        assert_eq!(ask(&agent, &v1, "", None).as_deref(), Ok("1"));
    }
    fleet.wait_serving("edge-1", "classifier", 1);
}

#[test]
fn a_canary_resumes_as_one_after_the_agent_restarts_and_a_promotion_gives_it_all_traffic() {
    let fleet = Fleet::embedded();
    let mut agent = fleet.start_agent_with(
        "edge-1",
        &[],
        "[probation]\nrequests = 100000\nseconds = 600\nmax_p99_ratio = 100.0\n",
    );
    fleet.wait_registered();
    let v1 = fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);
    fleet.publish_example(2, 16);
    let canary = CanarySpec {
        percent: 20,
        key: None,
    };
    fleet.deploy_canary("classifier", 2, "*", canary);
    wait_versions(&agent, "classifier", &["1", "2"]);

    // Killed (a power cut) during the canary's trial: it comes back as a canary.
    agent.kill();
    agent.start();
    wait_versions(&agent, "classifier", &["1", "2"]);
    let answers: Vec<String> = (0..100)
        .map(|_| ask(&agent, &v1, "", None).expect("inference"))
        .collect();
    let counts = count(&answers);
    assert_eq!(counts.get("2"), Some(&20), "{counts:?}");
    assert_eq!(
        ask(&agent, &v1, "/versions/stable", None).as_deref(),
        Ok("1")
    );

    // Deployed again without a split: promoted, all traffic for the rest of its trial.
    fleet.deploy("classifier", 2, "*");
    wait_versions(&agent, "classifier", &["2"]);
    let answers: Vec<String> = (0..50)
        .map(|_| ask(&agent, &v1, "", None).expect("inference"))
        .collect();
    assert!(answers.iter().all(|v| v == "2"), "{answers:?}");
    let phase = fleet.report("edge-1").unwrap().models["classifier"]
        .update
        .as_ref()
        .map(|u| u.phase);
    assert_eq!(phase, Some(modelcast_proto::report::Phase::Probation));
}
