//! Chunks on the wire compressed: a model's chunks travel zstd-compressed where that saves
//! bytes (the server's sent and raw byte counters show how much), the device inflates them and
//! serves the model; a server run with `--no-chunk-compression` sends them as they are; and a
//! decompression bomb (chunks that inflate far past their signed length) is refused with its
//! reason while the serving model answers on.

use std::time::Duration;

use modelcast_ops::onnx::example_model;
use modelcast_ops::publish::{prepare, PublishOptions};
use modelcast_tests::{stolen_keys, wait_for, ChunkAttack, Fleet, Mosquitto, Rogue, RogueArtifact};

const FAR: &str = "2036-01-01T00:00:00Z";
const KIB: u64 = 1024;

#[test]
fn chunks_travel_compressed_and_a_decompression_bomb_is_refused() {
    let fleet = Fleet::embedded();
    let agent = fleet.start_agent("edge-1", &[("site", "lab")]);
    fleet.wait_registered();
    let v1 = fleet.publish_example_of_size("classifier", 1, 1024 * KIB);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);
    assert_eq!(agent.check_golden(&v1), "1");
    let sent = fleet.client.status().unwrap().chunk_requests;
    println!(
        "v1: {} bytes of chunks sent as {} on the wire ({:.1} % saved)",
        sent.raw_bytes,
        sent.bytes,
        100.0 * (sent.raw_bytes - sent.bytes) as f64 / sent.raw_bytes as f64
    );
    assert_eq!(sent.raw_bytes, v1.download_size(), "every chunk once");
    assert!(
        sent.bytes * 20 < sent.raw_bytes * 19,
        "random float weights save at least 5 % grouped: {sent:?}"
    );

    // A rogue answers with chunks that inflate 1 MiB past their length.
    let now = modelcast_server::unix_now();
    let mut opts = PublishOptions::new("classifier", 5);
    opts.chunk_size = 16 * 1024;
    let v5 = prepare(&example_model(5, 2000), &opts, now).unwrap();
    let first = v5.manifest.chunk_len(0).unwrap();
    let keys = stolen_keys(&fleet.keys);
    let rogue = Rogue::connect(
        fleet.mqtt_port,
        Some(RogueArtifact::new(
            v5.artifact,
            &v5.manifest,
            ChunkAttack::Bomb,
        )),
    );
    rogue.publish_desired(
        "edge-1",
        &keys.desired("edge-1", std::slice::from_ref(&v5.manifest), 200, FAR),
    );
    let reason = wait_for("the bomb to be refused", Duration::from_secs(60), || {
        let e = fleet.report("edge-1")?.last_error?;
        (e.version == Some(5) && e.reason.starts_with("update rejected")).then_some(e.reason)
    });
    assert!(
        reason.contains(&format!("inflates past its {first} bytes")),
        "{reason}"
    );
    assert_eq!(agent.check_golden(&v1), "1", "v1 serves on");
    let peak = agent
        .pid()
        .map(|p| modelcast_tests::proc_status_kib(p, "VmHWM:"));
    println!("the agent's peak memory: {peak:?} KiB");
}

#[test]
fn a_server_without_compression_sends_chunks_as_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let mosquitto = Mosquitto::start(dir.path());
    let fleet = Fleet::with_broker_args(dir, mosquitto.port(), &["--no-chunk-compression"]);
    let agent = fleet.start_agent("edge-1", &[("site", "lab")]);
    fleet.wait_registered();
    let v1 = fleet.publish_example_of_size("classifier", 1, 512 * KIB);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);
    assert_eq!(agent.check_golden(&v1), "1");
    let sent = fleet.client.status().unwrap().chunk_requests;
    assert_eq!(
        (sent.bytes, sent.raw_bytes),
        (v1.download_size(), v1.download_size())
    );
}
