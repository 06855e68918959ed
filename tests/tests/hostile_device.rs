//! A hostile device with a valid certificate, against mosquitto with the generated TLS and ACL
//! configuration and against the embedded broker's TLS front: whatever it does, the other
//! devices keep getting their updates, the broker's and the server's memory stay within a
//! stated budget, and the attacker is counted by name.
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
    fleet.wait_devices(2);
    let model = |version: u64| fleet.publish_example_of_size("classifier", version, 16 * MIB);
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
        zstd: false,
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

    // The attacker is held: its repeats are merged into the request waiting (one download,
    // one entry), and what is answered beyond its budget is not sent.
    let over = wait_for(
        "the attacker merged or over its budget",
        Duration::from_secs(60),
        || {
            let s = fleet.client.status().ok()?.chunk_requests;
            (s.merged + s.over_budget > 0 && s.requests + s.merged >= REQUESTS as u64).then_some(s)
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
         asked); {} merged into a waiting request; the server sent {} chunks, {} over the \
         attacker's budget; the broker's peak \
         memory grew {} MiB (max_queued_bytes {} MiB), the server's {} MiB; edge-1's {} MiB \
         update done {:.1} s after the attack",
        all.len(),
        v1.size / MIB,
        REQUESTS as u64 * v1.size / MIB,
        over.merged,
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

/// Connects with `identity`'s certificate through the embedded broker's front and returns
/// how long the CONNACK took, or `None` if none came within 10 s.
fn connack(port: u16, pki: &std::path::Path, identity: &str) -> Option<Duration> {
    let started = Instant::now();
    let (_client, mut connection) =
        rumqttc::Client::new(tls_options(port, pki, identity, identity), 8);
    while started.elapsed() < Duration::from_secs(10) {
        match connection.recv_timeout(Duration::from_secs(1)) {
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack))))
                if ack.code == rumqttc::ConnectReturnCode::Success =>
            {
                return Some(started.elapsed())
            }
            Ok(Err(_)) => return None,
            _ => {}
        }
    }
    None
}

/// Connects as `identity`, publishes `bytes` on `topic` (QoS 1) and waits (at most 10 s) for
/// the broker to acknowledge it (true) or close the connection (false).
fn publish_once(
    port: u16,
    pki: &std::path::Path,
    identity: &str,
    topic: &str,
    retain: bool,
    bytes: usize,
) -> bool {
    let mut opts = tls_options(port, pki, identity, identity);
    opts.set_max_packet_size(8 << 20, 8 << 20);
    let (client, mut connection) = rumqttc::Client::new(opts, 8);
    client
        .publish(topic, QoS::AtLeastOnce, retain, vec![b'j'; bytes])
        .unwrap();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        match connection.recv_timeout(Duration::from_secs(1)) {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => return true,
            Ok(Err(_)) => return false,
            _ => {}
        }
    }
    panic!("neither acknowledged nor refused within 10 s");
}

/// The embedded broker with TLS against one device certificate used as a weapon (cases 4, 5
/// and 6 of the issue on the embedded broker), then an operator's quarantine:
///
/// - idle TCP connections that never start TLS: before, the first one stopped every later
///   device from connecting (rumqttd's TLS handshake ran inside its accept loop); now a device
///   connects at once beside them, the front holds at most `--mqtt-max-connections`, and each
///   is closed after `--mqtt-connect-timeout-secs`;
/// - 60 retained messages of 4 MiB on arbitrary topics (before: the server process grew
///   173 → 528 MB), a state report over its kind's bound, a desired state for another
///   device and retained telemetry: each refused at its header, the connection closed,
///   counted for the device;
///   nothing is retained, and another device's update completes;
/// - a quarantined device is cut off by the front and refused at every reconnect (counted)
///   until it is released, and no rollout takes it as a member.
#[test]
fn a_hostile_certificate_cannot_stop_or_fill_the_embedded_broker() {
    const CAP: usize = 24;
    let cap = CAP.to_string();
    let fleet = Fleet::embedded_tls_with(&[
        "--mqtt-max-connections",
        &cap,
        "--mqtt-connect-timeout-secs",
        "3",
        "--broker-server-identity",
        "observer",
    ]);
    let pki = fleet.pki.clone().expect("PKI");
    let port = fleet.mqtt_port;
    let victim = fleet.start_agent_with(
        "edge-1",
        &[("role", "victim")],
        "[probation]\nrequests = 1\nseconds = 1\n",
    );
    fleet.wait_registered();
    fleet.publish_example(1, 64);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);

    // Idle connections, below the cap: a device still connects at once.
    let connect = || std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut idle: Vec<std::net::TcpStream> = (0..CAP / 2).map(|_| connect()).collect();
    let beside_idle = connack(port, &pki, "edge-3").expect("a device connects beside idle ones");
    // Over the cap: the rest are closed as accepted, and every one within the timeout.
    idle.extend((0..CAP + CAP / 2).map(|_| connect()));
    let opened = Instant::now();
    for s in &mut idle {
        use std::io::Read;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut byte = [0u8; 1];
        assert!(
            matches!(s.read(&mut byte), Ok(0) | Err(_)),
            "the front closed an idle connection"
        );
    }
    let all_closed = opened.elapsed();
    let after_idle = connack(port, &pki, "edge-3").expect("a device connects after them");
    let front_count = |metrics: &str, result: &str| -> u64 {
        let key = format!("modelcast_fleet_broker_front_connections_total{{result=\"{result}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&key)?.trim().parse().ok())
            .unwrap_or(0)
    };
    let metrics = fleet.client.metrics().unwrap();
    let front = |result: &str| front_count(&metrics, result);
    assert!(front("over_capacity") >= (CAP / 2) as u64, "{metrics}");
    // Every idle connection was either closed at the cap or timed out.
    assert!(
        front("over_capacity") + front("timed_out") >= idle.len() as u64,
        "{metrics}"
    );

    // Junk from edge-2's certificate, each message on a fresh connection (the first refused
    // packet ends one).
    const JUNK: usize = 60;
    let server_before = proc_status_kib(fleet.server_pid(), "VmHWM");
    let junk_started = Instant::now();
    for i in 0..JUNK {
        let acked = publish_once(port, &pki, "edge-2", &format!("junk/{i}"), true, 4 << 20);
        assert!(!acked, "retained junk was taken");
    }
    let junk_took = junk_started.elapsed();
    let state = "modelcast/d/edge-2/state";
    assert!(!publish_once(port, &pki, "edge-2", state, true, 2 << 20));
    let desired = "modelcast/d/edge-1/desired";
    assert!(!publish_once(port, &pki, "edge-2", desired, true, 1024));
    let telemetry = "modelcast/d/edge-2/telemetry";
    assert!(!publish_once(port, &pki, "edge-2", telemetry, true, 1024));
    // Meanwhile the victim updates.
    let v2 = fleet.publish_example(2, 64);
    fleet.deploy("classifier", 2, "role=victim");
    fleet.wait_serving("edge-1", "classifier", 2);
    assert_eq!(victim.check_golden(&v2), "2");
    let server_grew = proc_status_kib(fleet.server_pid(), "VmHWM").saturating_sub(server_before);

    // Nothing was retained: a server identity subscribing to junk/# gets its own marker (a
    // retained message, delivered with any others at subscription) and nothing else.
    let observer = modelcast_tests::Rogue::connect_tls(port, &pki, "observer", None);
    observer.publish_raw("junk/marker", true, b"marker".to_vec());
    assert!(observer.subscribe("junk/#"));
    let seen = wait_for("the marker", Duration::from_secs(10), || {
        let seen = observer.seen();
        (!seen.is_empty()).then_some(seen)
    });
    assert_eq!(
        seen.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(),
        ["junk/marker"]
    );
    observer.publish_raw("junk/marker", true, Vec::new());

    // Counted for the certificate's device, which never registered.
    let dropped = wait_for("edge-2's refusals", Duration::from_secs(10), || {
        let d = fleet.client.devices().ok()?;
        let d = d.into_iter().find(|d| d.id == "edge-2")?;
        (d.dropped.values().sum::<u64>() >= JUNK as u64 + 3).then_some(d.dropped)
    });
    // Junk topics and another device's desired state: not its topics.
    assert_eq!(
        dropped.get("publish"),
        Some(&(JUNK as u64 + 1)),
        "{dropped:?}"
    );
    assert_eq!(dropped.get("too_large"), Some(&1), "{dropped:?}");
    assert_eq!(dropped.get("retained"), Some(&1), "{dropped:?}");

    // Quarantine: edge-1 is cut off, refused at every reconnect, until it is released.
    let refused_before = front_count(&fleet.client.metrics().unwrap(), "refused");
    fleet
        .client
        .quarantine("edge-1", true, "hostile-device test", "ops")
        .unwrap();
    let v3 = fleet.publish_example(3, 64);
    fleet.deploy("classifier", 3, "role=victim");
    // Cut off at its next packet, then refused at a reconnect: two refusals at the front.
    wait_for(
        "edge-1 cut off and refused",
        Duration::from_secs(60),
        || {
            let d = fleet.client.devices().ok()?;
            let d = d.into_iter().find(|d| d.id == "edge-1")?;
            let refused = front_count(&fleet.client.metrics().ok()?, "refused");
            (d.quarantine.is_some()
                && d.dropped.get("quarantined").copied().unwrap_or(0) >= 2
                && refused >= refused_before + 2)
                .then_some(())
        },
    );
    assert_eq!(
        victim.check_golden(&v2),
        "2",
        "still on v2 while quarantined"
    );
    // Nor is it a member of a rollout (its reports would never pass a wave).
    let spec = modelcast_server::rollout::RolloutSpec::new("classifier", 3, "role=victim", &["1"])
        .unwrap();
    let refused = fleet
        .client
        .start_rollout(&modelcast_server::api::RolloutRequest {
            spec,
            by: "ops".into(),
        })
        .expect_err("no member");
    assert!(
        refused.to_string().contains("no device matches"),
        "{refused}"
    );
    fleet.client.quarantine("edge-1", false, "", "ops").unwrap();
    fleet.wait_serving("edge-1", "classifier", 3);
    assert_eq!(victim.check_golden(&v3), "3");
    let audit = fleet.client.audit(0).unwrap();
    assert!(audit.iter().any(|e| e.action == "device.quarantine"));
    assert!(audit.iter().any(|e| e.action == "device.release"));

    println!(
        "embedded broker: a device connected in {:.0} ms beside {} idle connections (before: \
         never); {} idle connections all closed in {:.1} s ({} over the cap of {CAP}), a device \
         connected {:.0} ms after; {JUNK} retained 4 MiB messages on junk topics refused in \
         {:.1} s, none retained, the server's peak memory grew {} MiB (before: 355 MB); \
         edge-2's refusals {dropped:?}",
        beside_idle.as_secs_f64() * 1000.0,
        CAP / 2,
        idle.len(),
        all_closed.as_secs_f64(),
        front("over_capacity"),
        after_idle.as_secs_f64() * 1000.0,
        junk_took.as_secs_f64(),
        server_grew / 1024,
    );
    // Budget: the front reads no more than a refused packet's header.
    assert!(server_grew < 64 * 1024, "the server grew {server_grew} KiB");
}
