//! A device that floods the server with telemetry spends its own budget only
//! (`server/src/budget.rs`: a burst of 8 MiB, then 4 MiB a minute): what it sends over budget is
//! dropped unread and counted (`/api/v1/status`, `modelcast_fleet_telemetry_reports_total
//! {result="over_budget"}`), and another device is deployed to meanwhile.

use std::time::Duration;

use modelcast_proto::telemetry::TelemetryReport;
use modelcast_tests::{proc_status_kib, wait_for, Fleet, Mosquitto, Rogue};

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[test]
fn a_telemetry_flood_is_dropped_over_the_devices_budget() {
    let fleet = Fleet::embedded();
    let _agent = fleet.start_agent_with("edge-1", &[("site", "lab")], "");
    fleet.wait_registered();
    let rogue = Rogue::connect(fleet.mqtt_port, None);
    let topic = modelcast_proto::topic::Topics::new("modelcast")
        .device("flood-1", modelcast_proto::topic::DeviceTopic::Telemetry);
    // 300 reports with fresh sequence numbers, each padded to ~60 KB with a large host name
    // in the system section, as fast as the broker takes them.
    let store = fleet.dir.path().join("server");
    let (store_before, memory_before) = (
        dir_bytes(&store),
        proc_status_kib(fleet.server_pid(), "VmHWM"),
    );
    let now = modelcast_server::unix_now_ms();
    for seq in 1..=300u64 {
        let report = TelemetryReport {
            format: modelcast_proto::FORMAT_VERSION,
            device: "flood-1".into(),
            seq,
            from_ms: now - 1000,
            to_ms: now,
            dropped: 0,
            models: vec![],
            system: Default::default(),
            samples: vec![],
            samples_dropped: 0,
        };
        let mut bytes = serde_json::to_vec(&report).unwrap();
        bytes.extend(std::iter::repeat_n(b' ', 60_000));
        rogue.publish_raw(&topic, false, bytes);
    }
    let status = || fleet.client.status().ok().map(|s| s.telemetry);
    let t = wait_for("the flood to be counted", Duration::from_secs(60), || {
        status().filter(|t| t.stored + t.over_budget + t.rejected >= 300)
    });
    println!(
        "300 reports of 60 KB from one device: {} stored, {} over budget, {} rejected",
        t.stored, t.over_budget, t.rejected
    );
    // The burst (8 MiB: 139 such reports) and no more, give or take a few seconds' refill.
    assert!(t.stored <= 160, "{} stored", t.stored);
    assert!(t.over_budget >= 140, "{} over budget", t.over_budget);
    let metrics = fleet.client.metrics().unwrap();
    assert!(
        metrics.contains("result=\"over_budget\""),
        "no over_budget series"
    );
    // The flooder is named: its drops are listed with it.
    let flooder = fleet.client.devices().unwrap();
    let flooder = flooder.iter().find(|d| d.id == "flood-1").expect("listed");
    assert_eq!(
        flooder.dropped.get("telemetry_over_budget"),
        Some(&t.over_budget),
        "{:?}",
        flooder.dropped
    );
    // Budgets: what was stored of the flood (the burst, 8 MiB, plus the store's own overhead),
    // and the server's peak memory (before: the store grew 44 → 104 MB in 5 s).
    let store_grew = dir_bytes(&store).saturating_sub(store_before);
    let memory_grew = proc_status_kib(fleet.server_pid(), "VmHWM").saturating_sub(memory_before);
    println!(
        "the server's store grew {} MiB, its peak memory {} MiB",
        store_grew >> 20,
        memory_grew >> 10
    );
    assert!(store_grew < 48 << 20, "the store grew {store_grew} bytes");
    assert!(memory_grew < 128 << 10, "the server grew {memory_grew} KiB");
    // Everyone else is served.
    fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "site=lab");
    fleet.wait_serving("edge-1", "classifier", 1);
}

/// A device that floods its state topic spends its own budget only
/// (`budget::STATE_REPORTS`: 600 at once, then 240 a minute): the rest is dropped unread and
/// counted, and another device is deployed to meanwhile.
#[test]
fn a_state_report_flood_is_dropped_over_the_devices_budget() {
    use modelcast_proto::report::DeviceReport;
    let fleet = Fleet::embedded();
    let _agent = fleet.start_agent_with("edge-1", &[("site", "lab")], "");
    fleet.wait_registered();
    let rogue = Rogue::connect(fleet.mqtt_port, None);
    let topic = modelcast_proto::topic::Topics::new("modelcast")
        .device("flood-2", modelcast_proto::topic::DeviceTopic::State);
    const SENT: u64 = 2000;
    let memory_before = proc_status_kib(fleet.server_pid(), "VmHWM");
    for at in 0..SENT {
        let report = DeviceReport {
            format: modelcast_proto::FORMAT_VERSION,
            device: "flood-2".into(),
            labels: Default::default(),
            agent_version: "0.1.0".into(),
            models: Default::default(),
            last_error: None,
            desired_version: 0,
            at: at as i64,
            engines: None,
            sealing_key: None,
        };
        rogue.publish_raw(&topic, false, report.to_vec());
    }
    let over = wait_for("the flood to be counted", Duration::from_secs(60), || {
        let over = fleet.client.status().ok()?.reports_over_budget;
        (over >= SENT - 700).then_some(over)
    });
    let memory_grew = proc_status_kib(fleet.server_pid(), "VmHWM").saturating_sub(memory_before);
    println!(
        "{SENT} state reports from one device: {over} over budget; the server's peak memory \
         grew {} MiB",
        memory_grew >> 10
    );
    assert!(memory_grew < 64 << 10, "the server grew {memory_grew} KiB");
    let flooder = fleet.client.devices().unwrap();
    let flooder = flooder.iter().find(|d| d.id == "flood-2").expect("listed");
    // Counted by name too (at least what the status said; later drops may have landed).
    let named = flooder
        .dropped
        .get("state_over_budget")
        .copied()
        .unwrap_or(0);
    assert!(named >= over, "{named} named, {over} counted");
    // The burst (600) and a few seconds' refill at most were read.
    assert!(over <= SENT - 600, "{over} over budget");
    assert!(fleet
        .client
        .metrics()
        .unwrap()
        .contains("modelcast_fleet_state_reports_over_budget_total"));
    // Everyone else is served.
    fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "site=lab");
    fleet.wait_serving("edge-1", "classifier", 1);
}

/// A flood of chunk requests from a device entitled to a 16 MiB artifact (each request for
/// every chunk, as a first ask) is answered at most `--max-chunk-requests` at a time: while
/// one of its requests waits, the next ones are merged into it (`merged`), so the flood
/// queues one entry, the server's memory stays within a budget, and another device is
/// updated meanwhile. Before, every request was a task of its own, each holding a chunk
/// while its reply waited for the broker link, up to the device's budget (1 GiB), and the
/// server's MQTT client queued up to 1,024 replies.
#[test]
fn a_chunk_request_flood_is_answered_a_few_at_a_time() {
    const MIB: u64 = 1 << 20;
    const REQUESTS: usize = 2_000;
    // On mosquitto: the embedded broker would share the server's process and memory.
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let fleet = Fleet::with_broker_args(
        dir,
        broker.port(),
        &["--max-chunk-requests", "8", "--no-shared-chunks"],
    );
    let victim = fleet.start_agent_with("edge-1", &[("role", "victim")], "");
    let mut flooder = fleet.start_agent_with("edge-2", &[("role", "flooder")], "");
    fleet.wait_devices(2);
    let model = |version: u64| fleet.publish_example_of_size("classifier", version, 16 * MIB);
    let v1 = model(1);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-2", "classifier", 1);
    // edge-2's agent stops; its identity floods.
    flooder.stop();
    let request = modelcast_proto::chunk::ChunkRequest {
        format: modelcast_proto::FORMAT_VERSION,
        device: "edge-2".into(),
        artifact: v1.sha256.clone(),
        chunks: (0..v1.download_chunk_count()).collect(),
        again: Vec::new(),
        shared: false,
        joined: false,
        zstd: false,
    }
    .to_vec();
    let topic = modelcast_proto::topic::Topics::new("modelcast").chunk_requests("edge-2");
    let memory_before = proc_status_kib(fleet.server_pid(), "VmHWM");
    let rogue = Rogue::connect(broker.port(), None);
    for _ in 0..REQUESTS {
        rogue.publish_raw(&topic, false, request.clone());
    }
    let merged = wait_for(
        "requests merged while one waits",
        Duration::from_secs(30),
        || {
            let s = fleet.client.status().ok()?.chunk_requests;
            (s.merged > 0).then_some(s)
        },
    );
    // Meanwhile another device is updated.
    let v2 = model(2);
    fleet.deploy("classifier", 2, "role=victim");
    fleet.wait_serving("edge-1", "classifier", 2);
    assert_eq!(victim.check_golden(&v2), "2");
    let sent = fleet.client.status().unwrap().chunk_requests;
    let memory_grew = proc_status_kib(fleet.server_pid(), "VmHWM").saturating_sub(memory_before);
    let metrics = fleet.client.metrics().unwrap();
    assert!(
        metrics.contains("modelcast_fleet_chunk_requests_limit 8"),
        "the limit in /metrics"
    );
    println!(
        "{REQUESTS} requests for all {} chunks of a 16 MiB artifact: {} answered, {} merged \
         into a waiting one (limit 8), {} chunks sent in all; the server's peak memory grew \
         {} MiB; another device updated meanwhile",
        v1.download_chunk_count(),
        sent.requests,
        sent.merged,
        sent.chunks,
        memory_grew >> 10
    );
    assert!(merged.merged > 0);
    assert_eq!(
        sent.busy, 0,
        "one waiting entry per download: nothing dropped"
    );
    // 8 replies in progress and the MQTT client's queue (64 requests) of chunks at most,
    // besides v2's publication (streamed) and its download by edge-1 (measured: 42 MiB; with
    // the client's queue at 1,024 requests, as before, 270 MiB).
    assert!(memory_grew < 128 << 10, "the server grew {memory_grew} KiB");
}
