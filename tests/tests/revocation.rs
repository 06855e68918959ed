//! Revoking a device: `modelcast devices revoke` puts its certificate on the revocation list
//! (`crl.pem`, signed by the fleet CA) that the generated mosquitto configuration reads, and
//! quarantines it at the server. From the broker's next reading of the list (mosquitto: at a
//! restart or SIGHUP; the embedded broker's front: at its next connection) the device cannot
//! connect; the next encrypted version reaches the devices still in the fleet, and the revoked
//! one keeps what it had.

use std::time::Duration;

use modelcast_tests::attacker::tls_options;
use modelcast_tests::{wait_for, AgentOptions, Fleet, Mosquitto};

/// Whether a client with `identity`'s certificate gets a CONNACK within `limit`.
fn connects(port: u16, pki: &std::path::Path, identity: &str, limit: Duration) -> bool {
    modelcast_tests::connects(tls_options(port, pki, identity, identity), limit)
}

/// Runs `modelcast devices revoke <device> --pki <pki> <extra>`; its output, once it succeeded.
fn revoke(fleet: &Fleet, pki: &std::path::Path, device: &str, extra: &[&str]) -> String {
    let pki = pki.display().to_string();
    let mut args = vec!["devices", "revoke", device, "--pki", &pki];
    args.extend(extra);
    fleet.cli(&args)
}

#[test]
fn a_revoked_device_cannot_connect_and_the_next_version_reaches_only_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start_tls(dir.path());
    let fleet = Fleet::with_tls_broker(dir, &broker);
    let pki = broker.pki().expect("a TLS broker").to_path_buf();
    let agents: Vec<_> = ["edge-1", "edge-2"]
        .iter()
        .map(|id| fleet.start_agent_opts(id, &[("site", "lab")], AgentOptions::committing()))
        .collect();
    fleet.wait_devices(2);
    for id in ["edge-1", "edge-2"] {
        wait_for("the device's sealing key", Duration::from_secs(30), || {
            fleet.report(id)?.sealing_key
        });
    }
    let publish = |version: u64| fleet.publish_encrypted_of_size("classifier", version, 1 << 20);
    let v1 = publish(1);
    fleet.deploy("classifier", 1, "*");
    for (agent, id) in agents.iter().zip(["edge-1", "edge-2"]) {
        fleet.wait_serving(id, "classifier", 1);
        assert_eq!(agent.check_golden(&v1), "1");
    }

    // The probe connects with a certificate in good standing (it takes edge-2's session for a
    // moment; the agent reconnects).
    assert!(connects(
        broker.port(),
        &pki,
        "edge-2",
        Duration::from_secs(10)
    ));

    let text = revoke(&fleet, &pki, "edge-2", &["--reason", "stolen"]);
    assert!(text.contains("edge-2 revoked"), "{text}");
    let listed = fleet
        .client
        .devices()
        .unwrap()
        .into_iter()
        .find(|d| d.id == "edge-2")
        .and_then(|d| d.quarantine)
        .expect("quarantined at the server");
    assert!(listed.reason.contains("certificate revoked"), "{listed:?}");

    // The broker reads the list again (a restart here; mosquitto also does on SIGHUP).
    broker.restart();
    assert!(
        !connects(broker.port(), &pki, "edge-2", Duration::from_secs(5)),
        "the revoked certificate still connects"
    );
    println!("mosquitto refused the revoked certificate at connect");

    // The next encrypted version reaches the device still in the fleet.
    let v2 = publish(2);
    fleet.deploy("classifier", 2, "*");
    fleet.wait_serving("edge-1", "classifier", 2);
    assert_eq!(agents[0].check_golden(&v2), "2");
    // The revoked one keeps serving what it had, and got nothing new.
    assert_eq!(agents[1].check_golden(&v1), "1");
}

#[test]
fn the_embedded_broker_refuses_a_revoked_certificate_from_its_next_connection() {
    let fleet = Fleet::embedded_tls();
    let pki = fleet.pki.clone().expect("PKI");
    let port = fleet.mqtt_port;
    let agent = fleet.start_agent_opts("edge-1", &[("site", "lab")], AgentOptions::committing());
    fleet.wait_registered();
    // A certificate in good standing connects through the front.
    assert!(connects(port, &pki, "edge-9", Duration::from_secs(10)));

    revoke(&fleet, &pki, "edge-9", &[]);
    // The front reads the list again at the next connection: no restart.
    assert!(
        !connects(port, &pki, "edge-9", Duration::from_secs(5)),
        "the revoked certificate still connects"
    );
    // Everyone else still does.
    fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);
    drop(agent);
}
