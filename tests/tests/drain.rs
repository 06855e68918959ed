//! A server told to stop (SIGTERM, as systemd does) drains before it exits: the chunk
//! replies it has taken on are all sent, the broker link is written out and closed with a
//! DISCONNECT, and it says so. Before, it exited with replies still queued in its MQTT client,
//! and a device downloading at that moment lost them (so did a first version of the drain
//! whose `select!` cancelled rumqttc's poll half-way through writing a reply).

use std::time::Duration;

use modelcast_tests::{wait_for, AgentOptions, Fleet, Mosquitto};

/// Large enough that the download is still going when the server is stopped.
const MODEL_BYTES: u64 = 160 << 20;

#[test]
fn a_stopped_server_sends_every_chunk_reply_it_took_on_before_it_exits() {
    // Every chunk on the device's own topic: what the server sent is what the device gets.
    // On mosquitto: an embedded broker would stop with the server, and what it had not
    // passed on yet with it.
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path());
    let mut fleet = Fleet::with_broker_args(dir, broker.port(), &["--no-shared-chunks"]);
    // A device asking for the largest window (256 chunks, 64 MiB) at once: the server has
    // many replies on their way when it is stopped.
    let agent = fleet.start_agent_opts(
        "edge-1",
        &[("site", "lab")],
        AgentOptions {
            transfer: "window = 256\n".into(),
            ..AgentOptions::default()
        },
    );
    fleet.wait_registered();
    let manifest = fleet.publish_example_of_size("large", 1, MODEL_BYTES);
    fleet.deploy("large", 1, "site=lab");
    let received = || agent.metric(r#"modelcast_chunk_received_bytes_total{model="large"}"#);
    wait_for("the download to start", Duration::from_secs(60), || {
        received().filter(|b| *b > 0.0)
    });
    let status = fleet.stop_server().expect("the server exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    let log = fleet.server_log();
    let line = log
        .lines()
        .find(|l| l.contains("fleet drained"))
        .unwrap_or_else(|| panic!("no drain logged:\n{log}"));
    assert!(line.contains("every task finished"), "{line}");
    // A clean DISCONNECT, not a dropped connection.
    wait_for(
        "the broker to log the server's DISCONNECT",
        Duration::from_secs(5),
        || {
            broker
                .log()
                .contains("Client modelcast-server disconnected.")
                .then_some(())
        },
    );
    let field = |name: &str| -> u64 {
        let at = line.find(&format!("{name}=")).expect(name) + name.len() + 1;
        line[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .expect(name)
    };
    let sent = field("chunk_bytes_sent");
    assert!(sent < manifest.size, "stopped before the download ended");
    // Every byte the server counted as sent reaches the device.
    let got = wait_for(
        &format!("the device to receive the {sent} bytes sent ({line})"),
        Duration::from_secs(20),
        || received().filter(|b| *b as u64 >= sent),
    );
    assert_eq!(got as u64, sent, "the device got more than the server sent");
    println!(
        "stopped mid-download: {} of {} MiB sent and all received; drain: {line}",
        sent >> 20,
        manifest.size >> 20
    );
}
