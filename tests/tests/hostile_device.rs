//! A hostile device with a valid certificate, against mosquitto with the generated TLS and ACL
//! configuration: whatever it does, the other devices keep getting their updates, the broker's
//! and the server's memory stay within a stated budget, and the attacker is counted.
//!
//! The other cases of the hostile-device suite live beside the part they attack:
//! `flood.rs` (telemetry flood), `oversized.rs` (one message over the server's read limit),
//! `reachable.rs` (connection exhaustion), `attacks.rs` (forgeries, session takeover, CSRF).

use std::time::{Duration, Instant};

use modelcast_proto::chunk::ChunkRequest;
use modelcast_proto::topic::{DeviceTopic, Topics};
use modelcast_tests::{proc_status_kib, tls_options, wait_for, Fleet, Mosquitto};
use rumqttc::{Event, Packet, QoS};

const MIB: u64 = 1024 * 1024;

/// Amplification: a device entitled to a 12 MiB artifact asks for all of its chunks again, 40
/// times in one go, and never reads its subscription (before: mosquitto grew by 16.5 MB per
/// request, to 671 MB). Its chunks are charged to its budget on the server, and mosquitto
/// holds at most `max_queued_bytes` for it; another device's 12 MiB update completes meanwhile.
#[test]
fn a_device_asking_for_everything_again_and_again_cannot_grow_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start_tls(dir.path());
    let fleet = Fleet::with_tls_broker(dir, &broker);
    let pki = broker.pki().expect("PKI").to_path_buf();
    let mut attacker = fleet.start_agent("edge-2", &[("role", "attacker")]);
    let victim = fleet.start_agent("edge-1", &[("role", "victim")]);
    wait_for("two devices", Duration::from_secs(30), || {
        (fleet.client.devices().ok()?.len() == 2).then_some(())
    });
    let model = |version: u64| {
        let path = fleet.dir.path().join(format!("big-v{version}.onnx"));
        let onnx = modelcast_server::onnx::example_model_of_size(version, 16 * MIB);
        std::fs::write(&path, onnx).unwrap();
        fleet.publish_file(&path, "classifier", version)
    };
    let v1 = model(1);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);
    fleet.wait_serving("edge-2", "classifier", 1);
    // edge-2's agent stops; its certificate is the attacker's.
    attacker.stop();

    let topics = Topics::new("modelcast");
    let mut opts = tls_options(broker.port(), &pki, "edge-2", "edge-2");
    opts.set_max_packet_size(8 << 20, 8 << 20);
    let (client, mut connection) = rumqttc::Client::new(opts, 128);
    client
        .subscribe(
            topics.device("edge-2", DeviceTopic::Chunks),
            QoS::AtLeastOnce,
        )
        .unwrap();
    let all: Vec<u32> = (0..v1.download_chunk_count()).collect();
    let request = ChunkRequest {
        format: modelcast_proto::FORMAT_VERSION,
        device: "edge-2".into(),
        artifact: v1.sha256.clone(),
        chunks: Vec::new(),
        again: all.clone(),
        shared: false,
        joined: false,
    };
    const REQUESTS: usize = 40;
    let broker_before = proc_status_kib(broker.pid(), "VmHWM");
    let server_before = proc_status_kib(fleet.server_pid(), "VmHWM");
    for _ in 0..REQUESTS {
        client
            .publish(
                topics.chunk_requests("edge-2"),
                QoS::AtLeastOnce,
                false,
                request.to_vec(),
            )
            .unwrap();
    }
    // Drive the connection until the broker took the subscription and every request, then
    // stop reading: what the server sends piles up at the broker.
    let (mut subscribed, mut acked) = (false, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while (!subscribed || acked < REQUESTS) && Instant::now() < deadline {
        match connection.recv_timeout(Duration::from_secs(1)) {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => subscribed = true,
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            _ => {}
        }
    }
    assert!(subscribed && acked == REQUESTS, "the attack was sent");
    let attack_at = Instant::now();

    // The attacker is counted: its budget ran out.
    let over = wait_for(
        "the attacker over its budget",
        Duration::from_secs(60),
        || {
            let status = fleet.client.status().ok()?;
            (status.chunk_requests.over_budget > 0).then_some(status.chunk_requests)
        },
    );
    // Meanwhile another device's update completes.
    let v2 = model(2);
    fleet.deploy("classifier", 2, "role=victim");
    fleet.wait_serving("edge-1", "classifier", 2);
    assert_eq!(victim.check_golden(&v2), "2");
    let updated_in = attack_at.elapsed();

    let broker_grew = proc_status_kib(broker.pid(), "VmHWM").saturating_sub(broker_before);
    let server_grew = proc_status_kib(fleet.server_pid(), "VmHWM").saturating_sub(server_before);
    let metrics = fleet.client.metrics().unwrap();
    assert!(
        metrics.contains("modelcast_fleet_chunks_over_budget_total"),
        "counted in /metrics"
    );
    println!(
        "amplification: {REQUESTS} requests for all {} chunks of a {} MiB artifact ({} MiB \
         asked); the server sent {} chunks, {} over the attacker's budget; the broker's peak \
         memory grew {} MiB (max_queued_bytes {} MiB), the server's {} MiB; edge-1's {} MiB \
         update done {:.1} s after the attack",
        all.len(),
        v1.size / MIB,
        REQUESTS as u64 * v1.size / MIB,
        over.chunks,
        over.over_budget,
        broker_grew / 1024,
        modelcast_server::acl::CLIENT_QUEUE_BYTES / MIB,
        server_grew / 1024,
        v2.size / MIB,
        updated_in.as_secs_f64()
    );
    // Budget: the broker's queue bound, plus what it has in flight and its own slack.
    assert!(broker_grew < 200 * 1024, "mosquitto grew {broker_grew} KiB");
    assert!(
        server_grew < 200 * 1024,
        "the server grew {server_grew} KiB"
    );
    drop(client);
    drop(connection);
}
