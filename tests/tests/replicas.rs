//! Server replicas: a control server and a chunk replica (`--role chunks`) share one
//! PostgreSQL database and one mosquitto. Devices' chunk requests go to an MQTT shared
//! subscription, so each request is answered by one of the two. Four devices take a
//! multi-chunk update; both servers answer a share of the requests, every device serves the
//! new version, and no request is answered twice: the chunks sent are at least one copy of
//! each (published once on the artifact's shared topic) and at most twice one per device.

use std::time::Duration;

use modelcast_ops::onnx::example_model_of_size;
use modelcast_tests::{wait_for, Fleet, Mosquitto, Postgres};

const DEVICES: [&str; 4] = ["edge-1", "edge-2", "edge-3", "edge-4"];

#[test]
fn a_chunk_replica_answers_its_share_of_chunk_requests() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Mosquitto::start(dir.path());
    let fleet = Fleet::with_broker_on_postgres(dir, broker.port(), &pg.database("fleet"));
    let (_replica, replica) = fleet.start_chunk_replica("modelcast-server-2");
    assert_eq!(replica.status().expect("status").role, "chunks");
    // The replica serves no operator API.
    assert!(replica.devices().is_err());

    let _agents = DEVICES.map(|id| fleet.start_agent_with(id, &[("site", "lab")], ""));
    wait_for("four devices", Duration::from_secs(30), || {
        (fleet.client.devices().ok()?.len() == DEVICES.len()).then_some(())
    });
    // 2 MiB in 256 KiB chunks: 8 chunks, requested a window at a time.
    let path = fleet.dir.path().join("model.onnx");
    std::fs::write(&path, example_model_of_size(1, 2 << 20)).unwrap();
    let v1 = fleet.publish_file(&path, "classifier", 1);
    let chunks = v1.chunks.len() as u64;
    assert!(chunks >= 8, "{chunks} chunks");
    fleet.deploy("classifier", 1, "site=lab");
    for id in DEVICES {
        fleet.wait_serving(id, "classifier", 1);
    }

    let control = fleet.client.status().expect("control status");
    let replica = replica.status().expect("replica status");
    assert_eq!(control.role, "control");
    println!(
        "control answered {} requests ({} chunks), the replica {} ({} chunks); {} devices \
         needed {} chunks each",
        control.chunk_requests.requests,
        control.chunk_requests.chunks,
        replica.chunk_requests.requests,
        replica.chunk_requests.chunks,
        DEVICES.len(),
        chunks
    );
    assert!(
        control.chunk_requests.requests > 0,
        "the control server answered none"
    );
    assert!(
        replica.chunk_requests.requests > 0,
        "the replica answered none"
    );
    let sent = control.chunk_requests.chunks + replica.chunk_requests.chunks;
    let needed = chunks * DEVICES.len() as u64;
    assert!(
        sent >= chunks,
        "{sent} chunks sent for {chunks} in the artifact"
    );
    assert!(sent <= needed * 2, "{sent} chunks sent for {needed} needed");
    assert_eq!(
        control.chunk_requests.refused + replica.chunk_requests.refused,
        0
    );
}
