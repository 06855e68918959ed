//! End to end: a real server, real brokers (embedded rumqttd and mosquitto), real agents with
//! sled stores, real tract inference on generated ONNX models.

use std::time::Duration;

use modelcast_ops::onnx::example_model;
use modelcast_ops::publish::{prepare, PublishOptions};
use modelcast_proto::verify::fixture::Keys;
use modelcast_tests::{stolen_keys, wait_for, ChunkAttack, Fleet, Mosquitto, Rogue, RogueArtifact};

const FAR: &str = "2036-01-01T00:00:00Z";

#[test]
fn v1_then_v2_to_a_group_through_the_embedded_broker() {
    let fleet = Fleet::embedded();
    let berlin = [("site", "berlin"), ("hw", "jetson")];
    let a = fleet.start_agent("jetson-1", &berlin);
    let b = fleet.start_agent("jetson-2", &berlin);
    let p = fleet.start_agent("pi-1", &[("site", "paris")]);
    wait_for("three devices registered", Duration::from_secs(30), || {
        (fleet.client.devices().ok()?.len() == 3).then_some(())
    });

    let v1 = fleet.publish_example(1, 64);
    fleet.deploy("classifier", 1, "site=berlin");
    fleet.wait_serving("jetson-1", "classifier", 1);
    fleet.wait_serving("jetson-2", "classifier", 1);
    assert_eq!(a.check_golden(&v1), "1");
    assert_eq!(b.check_golden(&v1), "1");
    // Not in the group: nothing deployed there.
    let err = p.infer("classifier", &v1.golden[0].inputs).unwrap_err();
    assert!(err.starts_with("404"), "{err}");

    let v2 = fleet.publish_example(2, 64);
    fleet.deploy("classifier", 2, "site=berlin");
    fleet.wait_serving("jetson-1", "classifier", 2);
    fleet.wait_serving("jetson-2", "classifier", 2);
    assert_eq!(a.check_golden(&v2), "2");
    assert_eq!(b.check_golden(&v2), "2");
    // The same input that v1 answered now gets v2's (different) answer.
    let (version, out) = a.infer("classifier", &v1.golden[0].inputs).unwrap();
    assert_eq!(version, "2");
    let v1_out = v1.golden[0].outputs[0].values().unwrap();
    assert!(
        out.iter().zip(&v1_out).any(|(x, y)| (x - y).abs() > 1e-3),
        "{out:?} vs {v1_out:?}"
    );

    // The report shows both slots: v1 kept for rollback, v2 active.
    let report = fleet.report("jetson-1").unwrap();
    let state = &report.models["classifier"];
    assert_eq!(state.serving_version(), Some(2));
    assert_eq!(
        [
            state.a.as_ref().map(|s| s.version),
            state.b.as_ref().map(|s| s.version)
        ],
        [Some(1), Some(2)]
    );

    // Bad requests get a 400 with a message; the model keeps answering.
    let url = format!(
        "http://127.0.0.1:{}/v2/models/classifier/infer",
        a.http_port
    );
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    for body in [
        "not json",
        r#"{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1]}]}"#,
    ] {
        let resp = agent.post(&url).send(body).unwrap();
        assert_eq!(resp.status().as_u16(), 400, "{body}");
    }
    assert_eq!(a.check_golden(&v2), "2");
}

#[test]
fn restarted_with_the_broker_gone_it_serves_its_last_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut mosquitto = Mosquitto::start(dir.path());
    let fleet = Fleet::with_broker(dir, mosquitto.port());
    let mut agent = fleet.start_agent("edge-1", &[("site", "lab")]);
    fleet.wait_registered();
    let v1 = fleet.publish_example(1, 64);
    fleet.deploy("classifier", 1, "site=lab");
    fleet.wait_serving("edge-1", "classifier", 1);
    assert_eq!(agent.check_golden(&v1), "1");

    agent.stop();
    mosquitto.stop();
    agent.start();
    // Offline first: no broker, and the last good model serves from the store.
    assert_eq!(agent.check_golden(&v1), "1");
}

#[test]
fn hostile_updates_are_rejected_with_a_reason_and_the_model_keeps_serving() {
    let fleet = Fleet::embedded();
    let agent = fleet.start_agent("edge-1", &[("site", "lab")]);
    fleet.wait_registered();
    let v1 = fleet.publish_example(1, 64);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);

    let now = modelcast_server::unix_now();
    let mut opts = PublishOptions::new("classifier", 5);
    opts.chunk_size = 16 * 1024;
    let v5 = prepare(&example_model(5, 2000), &opts, now).unwrap();
    let (v5, v5_bytes) = (v5.manifest, v5.artifact);
    assert!(v5.chunks.len() > 2);

    // 1. Metadata signed by keys the device does not trust.
    let rogue = Rogue::connect(fleet.mqtt_port, None);
    rogue.publish_desired(
        "edge-1",
        &Keys::from_seed(77).desired("edge-1", std::slice::from_ref(&v5), 100, FAR),
    );
    let reason = fleet.wait_error("edge-1", "desired state rejected");
    assert!(reason.contains("signature"), "{reason}");
    assert_eq!(agent.check_golden(&v1), "1");
    drop(rogue);

    // 2. Correctly signed, but the bytes are tampered with in transit.
    let keys = stolen_keys(&fleet.keys);
    let rogue = Rogue::connect(
        fleet.mqtt_port,
        Some(RogueArtifact::new(
            v5_bytes.clone(),
            &v5,
            ChunkAttack::Tamper,
        )),
    );
    rogue.publish_desired(
        "edge-1",
        &keys.desired("edge-1", std::slice::from_ref(&v5), 200, FAR),
    );
    let reason = fleet.wait_error("edge-1", "update rejected");
    assert!(
        reason.contains("does not match its signed digest"),
        "{reason}"
    );
    assert_eq!(agent.check_golden(&v1), "1");
    drop(rogue);

    // 3. A truncated artifact.
    let mut opts6 = opts.clone();
    opts6.version = 6;
    let v6 = prepare(&example_model(6, 2000), &opts6, now).unwrap();
    let (v6, v6_bytes) = (v6.manifest, v6.artifact);
    let rogue = Rogue::connect(
        fleet.mqtt_port,
        Some(RogueArtifact::new(v6_bytes, &v6, ChunkAttack::Truncate)),
    );
    rogue.publish_desired("edge-1", &keys.desired("edge-1", &[v6], 300, FAR));
    let reason = wait_for("v6 to be rejected", Duration::from_secs(60), || {
        let e = fleet.report("edge-1")?.last_error?;
        (e.version == Some(6) && e.reason.starts_with("update rejected")).then_some(e.reason)
    });
    assert!(reason.contains("bytes, manifest says"), "{reason}");
    assert_eq!(agent.check_golden(&v1), "1");
    let report = fleet.report("edge-1").unwrap();
    assert_eq!(report.models["classifier"].serving_version(), Some(1));
}
