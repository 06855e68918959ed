//! Resume: a large download is interrupted twice — a network cut between the device and its
//! broker (a TCP proxy the test cuts for two seconds), then a broker restart (mosquitto killed
//! and started again, without state) — and each time it goes on from where it was. The agent's
//! metrics count every chunk byte received (duplicates included) and every chunk asked for
//! twice; the test prints them. Re-fetched bytes — chunk bytes the device received more than
//! once — are bounded by one request window per interruption. Requests asked again are bounded
//! by three windows: the window lost with each link, and after a broker restart possibly one
//! more, asked before the server had subscribed again (those cost a timeout, not bytes).

use std::time::{Duration, Instant};

use modelcast_ops::onnx::example_model_of_size;
use modelcast_tests::proxy::Proxy;
use modelcast_tests::{AgentOptions, Fleet, Mosquitto};

const MIB: u64 = 1024 * 1024;
const WINDOW: u64 = 8;
const STORED: &str = r#"modelcast_downloaded_bytes_total{model="classifier"}"#;
const RECEIVED: &str = r#"modelcast_chunk_received_bytes_total{model="classifier"}"#;
const REFETCHED: &str = r#"modelcast_chunks_refetched_total{model="classifier"}"#;

#[test]
fn a_download_resumes_after_a_network_cut_and_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut mosquitto = Mosquitto::start(dir.path());
    let fleet = Fleet::with_broker(dir, mosquitto.port());
    let proxy = Proxy::start(mosquitto.port());
    let agent = fleet.start_agent_opts(
        "edge-1",
        &[("site", "lab")],
        AgentOptions {
            extra: "[probation]\nrequests = 0\nseconds = 0\n".into(),
            transfer: format!("window = {WINDOW}\n"),
            broker_port: Some(proxy.port()),
            ..AgentOptions::default()
        },
    );
    fleet.wait_registered();
    let v1 = fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);
    assert_eq!(agent.check_golden(&v1), "1");

    let path = fleet.dir.path().join("v2.onnx");
    std::fs::write(&path, example_model_of_size(2, 64 * MIB)).unwrap();
    let v2 = fleet.publish_file(&path, "classifier", 2);
    let size = v2.size;
    let window_bytes = WINDOW * u64::from(v2.chunk_size);
    // The counters include v1's download: count from here.
    let (base_stored, base_received) = (
        agent.metric(STORED).unwrap_or(0.0) as u64,
        agent.metric(RECEIVED).unwrap_or(0.0) as u64,
    );
    let stored = || agent.metric(STORED).unwrap_or(0.0) as u64 - base_stored;
    // Polls every 5 ms until at least `bytes` are stored; returns what is stored then.
    let stored_at_least = |bytes: u64| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let now = stored();
            if now >= bytes {
                return now;
            }
            assert!(Instant::now() < deadline, "{now} of {bytes} bytes stored");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    fleet.deploy("classifier", 2, "*");

    // 1. The network is cut for two seconds a quarter of the way in.
    let at_cut = stored_at_least(size / 4);
    // Facts, not time: the agent has noticed the cut when it tries to connect again (and is
    // refused twice); two attempts later, nothing more may have been stored.
    let refused = proxy.refused();
    proxy.cut();
    let tried = |n: u64| {
        modelcast_tests::wait_for(
            &format!("{n} connection attempts through the cut"),
            Duration::from_secs(30),
            || (proxy.refused() >= refused + n).then_some(()),
        )
    };
    tried(2);
    let during = stored();
    tried(4);
    assert_eq!(stored(), during, "bytes arrived through a cut network");
    assert!(during < size, "the download finished before the cut");
    proxy.restore();

    // 2. The broker is killed and restarted further in.
    let at_restart = stored_at_least(during + (size - during) / 3);
    mosquitto.restart();
    assert!(
        stored() < size,
        "the download finished before the broker restart"
    );

    fleet.wait_serving("edge-1", "classifier", 2);
    assert_eq!(agent.check_golden(&v2), "2");
    let received = agent.metric(RECEIVED).unwrap() as u64 - base_received;
    let refetched = agent.metric(REFETCHED).unwrap_or(0.0) as u64;
    assert_eq!(stored(), size, "every byte stored exactly once");
    let extra = received.saturating_sub(size);
    eprintln!(
        "resume: {size} bytes in {} chunks of {} (window {WINDOW} = {window_bytes} bytes); cut at \
         {at_cut}, broker restart at {at_restart}; received {received} bytes ({extra} more than \
         the artifact), {refetched} chunks asked for again ({} bytes)",
        v2.chunks.len(),
        v2.chunk_size,
        refetched * u64::from(v2.chunk_size)
    );
    assert!(extra <= 2 * window_bytes, "{extra} bytes received twice");
    assert!(
        refetched <= 3 * WINDOW,
        "{refetched} chunks asked again (window {WINDOW})"
    );
}
