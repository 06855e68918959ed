//! Enrolment by claim: devices that carry only their batch's claim credential make their own
//! keys, ask the fleet server for certificates, renew them, and can be revoked.
//!
//! - Through the embedded broker: three devices enrol (two by the server's rule, one held
//!   until an operator accepts it, a fourth rejected); one, its clock moved to day 21 of its
//!   30-day certificate by libfaketime, renews it over its own connection; all three install
//!   an encrypted model over fan-out; one is revoked and
//!   can no longer connect nor decrypt the next version, which the other two serve. The claim
//!   credential can do nothing but enrol: not connect as a device, not publish a report, not
//!   take an enrolled id with another key, not ask for another device's name.
//! - Through mosquitto with the generated configuration's claim listener: a device enrols, a
//!   claim is refused on the devices' listener and on device topics, a revoked device is shut
//!   out.
//! - At day 31 (libfaketime, server and device): a device offline past its certificate's end
//!   enrolling again by policy. In real time: 12-second certificates renewed while running, and a device
//!   stopped past its certificate's end held until an operator accepts it.
//! - A device key made in a SoftHSM2 token (PKCS#11).
//! - Held devices accepted and rejected from the operator console, in Chromium.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use modelcast_proto::enrol::{claim_client_id, EnrolReply, EnrolRequest, Refused};
use modelcast_server::enrol::{EnrolState, Enrolment};
use modelcast_tests::attacker::tls_options;
use modelcast_tests::connects;
use modelcast_tests::{wait_for, AgentOptions, Claim, Fleet, Mosquitto};
use rumqttc::{Event, Packet, QoS};

const COMMITTING: &str = "[probation]\nrequests = 0\nseconds = 0\n";

fn claim_options(pki: &Path, claim: &str, port: Option<u16>) -> AgentOptions {
    AgentOptions {
        extra: COMMITTING.into(),
        claim: Some(Claim::of(pki, claim, port)),
        ..AgentOptions::default()
    }
}

fn enrolment(fleet: &Fleet, device: &str) -> Option<Enrolment> {
    fleet
        .client
        .enrolments()
        .ok()?
        .into_iter()
        .find(|e| e.device == device)
}

/// The files of a device's own identity, made by its agent in its state directory.
fn identity_files(fleet: &Fleet, device: &str) -> (PathBuf, PathBuf) {
    let dir = fleet.dir.path().join(device).join("identity");
    (dir.join("device.pem"), dir.join("device.key"))
}

/// Whether a client presenting `cert`/`key` as `client_id` gets a CONNACK within `limit`.
fn connects_as(
    port: u16,
    ca: &Path,
    cert: &Path,
    key: &Path,
    client_id: &str,
    limit: Duration,
) -> bool {
    let read = |p: &Path| std::fs::read(p).expect("PEM file");
    let tls = modelcast_proto::tls::client_config(
        &read(ca),
        Some(modelcast_proto::tls::ClientIdentity {
            cert_pem: &read(cert),
            key_pem: &read(key),
        }),
    )
    .expect("TLS config");
    let mut opts = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(tls)),
    ));
    connects(opts, limit)
}

/// Asks for a certificate over the claim `claim` as client `client_id` (a hand-made claim
/// connection, as an attacker holding the claim would make); the server's answer.
fn ask_over_claim(
    port: u16,
    pki: &Path,
    claim: &str,
    client_id: &str,
    request: &EnrolRequest,
) -> Option<EnrolReply> {
    let opts = tls_options(port, pki, &format!("claim-{claim}"), client_id);
    let (client, mut connection) = rumqttc::Client::new(opts, 8);
    let t = modelcast_proto::topic::Topics::new("modelcast");
    let reply = t.claim_reply(claim, client_id);
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        match connection.recv_timeout(Duration::from_millis(500)) {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                client.try_subscribe(&reply, QoS::AtLeastOnce).unwrap();
            }
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                client
                    .try_publish(
                        t.claim_request(claim, client_id),
                        QoS::AtLeastOnce,
                        false,
                        request.to_vec(),
                    )
                    .unwrap();
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.topic == reply => {
                return EnrolReply::from_slice(&p.payload).ok();
            }
            Ok(Err(_)) => return None,
            _ => {}
        }
    }
    None
}

/// A CSR for a fresh key, with `cn` as its common name.
fn csr(cn: &str) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn request(device: &str, csr: String) -> EnrolRequest {
    EnrolRequest {
        device: device.into(),
        csr,
        sealing_key: None,
        labels: [("site".to_string(), "lab".to_string())].into(),
    }
}

#[test]
fn three_devices_enrol_by_claim_renew_and_a_revoked_one_is_shut_out() {
    let fleet = Fleet::embedded_tls_with(&[
        "--enrol",
        "--enrol-auto",
        "claim=line-1,site=lab",
        "--cert-validity",
        "30d",
    ]);
    let pki = fleet.pki.clone().expect("PKI");
    let port = fleet.mqtt_port;
    // Made after the server started: the broker's front trusts it from its next connection.
    modelcast_server::pki::claim(&pki, "line-1").unwrap();
    let start = |id: &str, site: &str| {
        fleet.start_agent_opts(id, &[("site", site)], claim_options(&pki, "line-1", None))
    };
    let mut edge1 = start("edge-1", "lab");
    let edge2 = start("edge-2", "lab");
    let edge3 = start("edge-3", "shop");
    let _edge4 = start("edge-4", "shop");
    for id in ["edge-1", "edge-2"] {
        wait_for(
            &format!("{id} enrolled by rule and reporting"),
            Duration::from_secs(60),
            || fleet.report(id),
        );
    }
    for id in ["edge-3", "edge-4"] {
        wait_for(&format!("{id} held"), Duration::from_secs(30), || {
            (enrolment(&fleet, id)?.state == EnrolState::Pending).then_some(())
        });
        assert!(
            fleet.report(id).is_none(),
            "{id} reports before it is accepted"
        );
    }
    let listed = fleet.cli(&["devices", "enrolments"]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("edge-3") && l.contains("pending") && l.contains("site=shop")),
        "{listed}"
    );
    let auto = enrolment(&fleet, "edge-1").unwrap();
    assert_eq!(auto.decided.as_ref().unwrap().by, "rule");
    assert_eq!(auto.claim.as_deref(), Some("line-1"));

    // The operator lets edge-3 in and keeps edge-4 out.
    let text = fleet.cli(&["devices", "accept", "edge-3", "--by", "olga"]);
    assert!(text.contains("edge-3 accepted"), "{text}");
    fleet.cli(&["devices", "reject", "edge-4"]);
    wait_for("edge-3 reporting", Duration::from_secs(60), || {
        fleet.report("edge-3")
    });
    assert_eq!(
        enrolment(&fleet, "edge-4").unwrap().state,
        EnrolState::Rejected
    );
    let audit = fleet.client.audit(1).unwrap();
    for action in [
        "device.enrol.issued",
        "device.enrol.held",
        "device.enrol.accepted",
        "device.enrol.rejected",
    ] {
        assert!(
            audit.iter().any(|e| e.action == action),
            "no {action} in the audit log"
        );
    }
    assert!(audit
        .iter()
        .any(|e| e.action == "device.enrol.accepted" && e.who == "olga"));

    // The device's key was made on it and stays there: 0600, and nowhere on the server.
    let (_, key) = identity_files(&fleet, "edge-1");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let key_pem = std::fs::read_to_string(&key).unwrap();
    let secret_line = key_pem.lines().nth(1).unwrap().to_string();
    for dir in [fleet.dir.path().join("server"), pki.clone()] {
        for entry in walk(&dir) {
            let bytes = std::fs::read(&entry).unwrap_or_default();
            assert!(
                !String::from_utf8_lossy(&bytes).contains(&secret_line),
                "the device's private key is in {}",
                entry.display()
            );
        }
    }

    // The claim can enrol and nothing else.
    assert!(
        !connects(
            tls_options(port, &pki, "claim-line-1", "edge-9"),
            Duration::from_secs(5)
        ),
        "a claim connected as a device id"
    );
    // Another key for an enrolled id; a CSR naming another device than the asking one.
    let refusal = |device: &str, named: &str| match ask_over_claim(
        port,
        &pki,
        "line-1",
        &claim_client_id(device),
        &request(device, csr(named)),
    ) {
        Some(EnrolReply::Refused { kind, .. }) => Some(kind),
        _ => None,
    };
    assert_eq!(refusal("edge-1", "edge-1"), Some(Refused::Taken));
    assert_eq!(refusal("edge-8", "edge-1"), Some(Refused::Invalid));
    // With edge-2's own key (its reply lost, say): the same certificate again, no new serial.
    let (_, key2) = identity_files(&fleet, "edge-2");
    let key2 = rcgen::KeyPair::from_pem(&std::fs::read_to_string(key2).unwrap()).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "edge-2");
    let own = params.serialize_request(&key2).unwrap().pem().unwrap();
    let before = enrolment(&fleet, "edge-2").unwrap().certificates;
    let again = ask_over_claim(
        port,
        &pki,
        "line-1",
        &claim_client_id("edge-2"),
        &request("edge-2", own),
    );
    let (cert2, _) = identity_files(&fleet, "edge-2");
    match again {
        Some(EnrolReply::Issued { certificate, .. }) => {
            assert_eq!(certificate, std::fs::read_to_string(cert2).unwrap())
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(enrolment(&fleet, "edge-2").unwrap().certificates, before);
    {
        // A report published over a claim connection: the front closes it, the server never
        // hears of the device.
        let opts = tls_options(port, &pki, "claim-line-1", &claim_client_id("edge-7"));
        let (client, mut connection) = rumqttc::Client::new(opts, 8);
        let mut closed = false;
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end && !closed {
            match connection.recv_timeout(Duration::from_millis(500)) {
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                    client
                        .try_publish("modelcast/d/edge-7/state", QoS::AtLeastOnce, true, "{}")
                        .unwrap();
                }
                Ok(Err(_)) => closed = true,
                _ => {}
            }
        }
        assert!(
            closed,
            "the front kept a claim connection that published a report"
        );
        assert!(fleet.report("edge-7").is_none());
    }

    // Day 21 (libfaketime moves edge-1's clock): two thirds of its 30-day certificate's life
    // are over; it renews over its own connection and connects again with the new one.
    edge1.stop();
    edge1.set_env(faketime("+21d"));
    edge1.start();
    wait_for("edge-1 renewed at day 21", Duration::from_secs(60), || {
        (enrolment(&fleet, "edge-1")?.certificates.len() >= 2).then_some(())
    });
    wait_for(
        "edge-1 connected with its renewed certificate",
        Duration::from_secs(30),
        || {
            let log = std::fs::read_to_string(edge1.log_path()).ok()?;
            let renewed = log.find("device certificate renewed")?;
            log[renewed..].contains("connected to broker").then_some(())
        },
    );
    let renewed = enrolment(&fleet, "edge-1").unwrap();
    assert!(renewed.certificates[1].not_after > renewed.certificates[0].not_after);
    // Back on the real clock (a device 21 days ahead would rightly find the server's signed
    // timestamp expired), with the renewed certificate.
    edge1.stop();
    edge1.set_env(Vec::new());
    edge1.start();
    wait_for(
        "edge-1 back on its renewed certificate",
        Duration::from_secs(30),
        || {
            let log = std::fs::read_to_string(edge1.log_path()).ok()?;
            log.contains("connected to broker").then_some(())
        },
    );
    let agents = [&edge1, &edge2, &edge3];

    // An encrypted model over fan-out reaches all three.
    let v1 = fleet.publish_encrypted_of_size("classifier", 1, 1 << 20);
    fleet.deploy("classifier", 1, "*");
    for (agent, id) in agents.iter().zip(["edge-1", "edge-2", "edge-3"]) {
        fleet.wait_serving(id, "classifier", 1);
        assert_eq!(agent.check_golden(&v1), "1");
    }

    // Revoked: its certificates on the list, quarantined; cut off at its next packet, and its
    // next connection refused.
    let text = fleet.cli(&["devices", "revoke", "edge-2", "--reason", "stolen"]);
    assert!(text.contains("edge-2 revoked"), "{text}");
    assert_eq!(
        enrolment(&fleet, "edge-2").unwrap().state,
        EnrolState::Revoked
    );
    let (cert, key) = identity_files(&fleet, "edge-2");
    assert!(
        !connects_as(
            port,
            &pki.join("ca.pem"),
            &cert,
            &key,
            "edge-2",
            Duration::from_secs(5)
        ),
        "the revoked device still connects"
    );
    // Nor can it come back over the claim with its key.
    let back = ask_over_claim(
        port,
        &pki,
        "line-1",
        &claim_client_id("edge-2"),
        &request("edge-2", csr("edge-2")),
    );
    assert!(matches!(back, Some(EnrolReply::Refused { .. })), "{back:?}");

    // The next encrypted version reaches the two others; the revoked one keeps what it had.
    let v2 = fleet.publish_encrypted_of_size("classifier", 2, 1 << 20);
    fleet.deploy("classifier", 2, "*");
    for (agent, id) in [(&edge1, "edge-1"), (&edge3, "edge-3")] {
        fleet.wait_serving(id, "classifier", 2);
        assert_eq!(agent.check_golden(&v2), "2");
    }
    assert_eq!(edge2.check_golden(&v1), "1");
}

#[test]
fn past_the_limit_of_devices_waiting_for_an_operator_a_new_one_is_refused_until_one_is_decided() {
    let fleet = Fleet::embedded_tls_with(&["--enrol", "--enrol-max-pending", "2"]);
    let pki = fleet.pki.clone().expect("PKI");
    modelcast_server::pki::claim(&pki, "line-9").unwrap();
    // Each device's request, made once: asking again, a device sends its own key again.
    let requests: std::collections::BTreeMap<&str, EnrolRequest> = ["edge-a", "edge-b", "edge-c"]
        .into_iter()
        .map(|d| (d, request(d, csr(d))))
        .collect();
    let ask = |device: &str| {
        ask_over_claim(
            fleet.mqtt_port,
            &pki,
            "line-9",
            &claim_client_id(device),
            &requests[device],
        )
    };
    for device in ["edge-a", "edge-b"] {
        let reply = ask(device);
        assert!(
            matches!(reply, Some(EnrolReply::Pending { .. })),
            "{device}: {reply:?}"
        );
    }
    // A third would make three waiting: refused, and not kept.
    let reply = ask("edge-c");
    assert!(
        matches!(
            reply,
            Some(EnrolReply::Refused {
                kind: Refused::Unavailable,
                ..
            })
        ),
        "{reply:?}"
    );
    assert!(
        enrolment(&fleet, "edge-c").is_none(),
        "a refused device kept"
    );
    // One already waiting may ask again (its reply lost, say): it is not counted twice.
    let reply = ask("edge-a");
    assert!(
        matches!(reply, Some(EnrolReply::Pending { .. })),
        "{reply:?}"
    );
    // An operator decides on one: there is room again.
    let text = fleet.cli(&["devices", "reject", "edge-a"]);
    assert!(text.contains("edge-a"), "{text}");
    let reply = ask("edge-c");
    assert!(
        matches!(reply, Some(EnrolReply::Pending { .. })),
        "{reply:?}"
    );
    assert_eq!(
        enrolment(&fleet, "edge-c").map(|e| e.state),
        Some(EnrolState::Pending)
    );
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

#[test]
fn mosquitto_takes_claims_on_their_own_listener_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start_tls_claims(dir.path(), &["line-2"]);
    let claim_port = broker.claim_port().expect("a claim listener");
    let fleet =
        Fleet::with_tls_broker_args(dir, &broker, &["--enrol", "--enrol-auto", "claim=line-2"]);
    let pki = broker.pki().expect("PKI").to_path_buf();
    let agent = fleet.start_agent_opts(
        "edge-1",
        &[("site", "lab")],
        claim_options(&pki, "line-2", Some(claim_port)),
    );
    wait_for(
        "edge-1 enrolled and reporting",
        Duration::from_secs(60),
        || fleet.report("edge-1"),
    );
    let v1 = fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);
    assert_eq!(agent.check_golden(&v1), "1");

    // The claim does not pass the devices' listener; on its own, it may only enrol.
    assert!(
        !connects(
            tls_options(broker.port(), &pki, "claim-line-2", "edge-9"),
            Duration::from_secs(5)
        ),
        "a claim connected on the devices' listener"
    );
    let reply = ask_over_claim(
        claim_port,
        &pki,
        "line-2",
        &claim_client_id("edge-8"),
        &request("edge-8", csr("edge-8")),
    );
    assert!(
        matches!(reply, Some(EnrolReply::Issued { .. })),
        "{reply:?}"
    );
    {
        // mosquitto's ACL admits any subscription and checks reads at delivery: edge-1's
        // retained desired state, which its own subscription gets at once, never comes.
        let opts = tls_options(claim_port, &pki, "claim-line-2", &claim_client_id("edge-1"));
        let (client, mut connection) = rumqttc::Client::new(opts, 8);
        let mut delivered = None;
        let mut subscribed_at = None;
        let end = Instant::now() + Duration::from_secs(15);
        while Instant::now() < end {
            if subscribed_at.is_some_and(|t: Instant| t.elapsed() > Duration::from_secs(3)) {
                break;
            }
            match connection.recv_timeout(Duration::from_millis(200)) {
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                    client
                        .try_subscribe("modelcast/d/edge-1/desired", QoS::AtLeastOnce)
                        .unwrap();
                }
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => subscribed_at = Some(Instant::now()),
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => delivered = Some(p.topic),
                Ok(Err(_)) => break,
                _ => {}
            }
        }
        assert!(
            subscribed_at.is_some(),
            "the claim connection never subscribed"
        );
        assert_eq!(delivered, None, "a claim read a device's desired state");
    }
    fleet.cli(&["devices", "revoke", "edge-1"]);
    // mosquitto reads the list again at a restart (or SIGHUP).
    broker.restart();
    let (cert, key) = identity_files(&fleet, "edge-1");
    assert!(
        !connects_as(
            broker.port(),
            &pki.join("ca.pem"),
            &cert,
            &key,
            "edge-1",
            Duration::from_secs(5)
        ),
        "the revoked device still connects"
    );
}

/// The agent's clock moved by `offset` (libfaketime; monotonic time untouched).
fn faketime(offset: &str) -> Vec<(String, String)> {
    let lib = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib",
    ]
    .iter()
    .map(|d| format!("{d}/faketime/libfaketime.so.1"))
    .find(|p| Path::new(p).exists())
    .expect("libfaketime is installed (tests/run.sh installs it)");
    vec![
        ("LD_PRELOAD".into(), lib),
        ("FAKETIME".into(), offset.into()),
        ("DONT_FAKE_MONOTONIC".into(), "1".into()),
    ]
}

#[test]
fn at_day_31_a_device_offline_past_its_certificate_enrols_again_by_policy() {
    let mut fleet = Fleet::embedded_tls_with(&[
        "--enrol",
        "--enrol-auto",
        "claim=line-3",
        "--cert-validity",
        "30d",
        "--enrol-expired",
        "reenrol",
    ]);
    let pki = fleet.pki.clone().expect("PKI");
    modelcast_server::pki::claim(&pki, "line-3").unwrap();
    let mut agent = fleet.start_agent_opts("edge-2", &[], claim_options(&pki, "line-3", None));
    wait_for("edge-2 enrolled", Duration::from_secs(60), || {
        fleet.report("edge-2")
    });
    let first = enrolment(&fleet, "edge-2").unwrap().certificates[0].clone();
    assert!(first.not_after - first.not_before >= 30 * 86_400);

    // Day 31: edge-2 was off past its certificate's end, and the server's clock says so too
    // (it runs at day 31 from here on). Its policy (`--enrol-expired reenrol`) lets it enrol
    // again over its claim, with the key it holds.
    agent.stop();
    let day31 = faketime("+31d");
    fleet.restart_server_with_env(day31.clone());
    agent.set_env(day31);
    agent.start();
    wait_for("edge-2 enrolled again", Duration::from_secs(60), || {
        let log = std::fs::read_to_string(agent.log_path()).ok()?;
        (log.contains("has expired: enrolling again by claim")
            && log.contains("enrolled: device certificate received"))
        .then_some(())
    });
    let again = enrolment(&fleet, "edge-2").unwrap();
    assert_eq!(again.certificates.len(), 2);
    assert_eq!(again.state, EnrolState::Enrolled);
    let v1 = fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-2", "classifier", 1);
    assert_eq!(agent.check_golden(&v1), "1");
}

#[test]
fn a_device_offline_past_its_certificate_is_held_by_policy_until_accepted() {
    // Real time: certificates of 12 s; the device is stopped past its certificate's end.
    let fleet = Fleet::embedded_tls_with(&[
        "--enrol",
        "--enrol-auto",
        "claim=line-4",
        "--cert-validity",
        "12s",
        "--enrol-expired",
        "hold",
    ]);
    let pki = fleet.pki.clone().expect("PKI");
    modelcast_server::pki::claim(&pki, "line-4").unwrap();
    let mut agent = fleet.start_agent_opts("edge-1", &[], claim_options(&pki, "line-4", None));
    wait_for("edge-1 enrolled", Duration::from_secs(60), || {
        fleet.report("edge-1")
    });
    agent.stop();
    let ends = enrolment(&fleet, "edge-1")
        .unwrap()
        .certificates
        .last()
        .unwrap()
        .not_after;
    wait_for("its certificate to end", Duration::from_secs(30), || {
        (modelcast_server::unix_now() > ends).then_some(())
    });
    agent.start();
    wait_for(
        "edge-1 held for an operator",
        Duration::from_secs(60),
        || (enrolment(&fleet, "edge-1")?.state == EnrolState::Pending).then_some(()),
    );
    fleet.cli(&["devices", "accept", "edge-1"]);
    wait_for("edge-1 back", Duration::from_secs(60), || {
        let log = std::fs::read_to_string(agent.log_path()).ok()?;
        log.contains("enrolled: device certificate received")
            .then_some(())
    });
    let v1 = fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);
    assert_eq!(agent.check_golden(&v1), "1");
}

#[test]
fn an_admin_accepts_and_rejects_held_devices_from_the_console() {
    // No rule: every claim waits for an operator; the admin decides on the console's overview.
    let mut fleet = Fleet::embedded_tls_with(&["--enrol"]);
    let [admin, _, _] = fleet.require_tokens();
    let pki = fleet.pki.clone().expect("PKI");
    modelcast_server::pki::claim(&pki, "line-6").unwrap();
    let agents: Vec<_> = ["edge-1", "edge-2"]
        .into_iter()
        .map(|id| fleet.start_agent_opts(id, &[], claim_options(&pki, "line-6", None)))
        .collect();
    for id in ["edge-1", "edge-2"] {
        wait_for(
            &format!("{id} held for an operator"),
            Duration::from_secs(60),
            || (enrolment(&fleet, id)?.state == EnrolState::Pending).then_some(()),
        );
    }
    let out = modelcast_tests::browser::console_script(
        "enrol.mjs",
        &[
            ("CONSOLE_URL", fleet.client.base().to_string()),
            ("TOKEN", admin),
            ("ACCEPT", "edge-1".into()),
            ("REJECT", "edge-2".into()),
        ],
        Duration::from_secs(300),
    );
    assert!(out.contains("console: ok"), "{out}");
    // At once when the accept reaches the device on its claim connection; else at its next
    // ask (HELD_WAIT, a minute).
    wait_for(
        "edge-1 enrolled and reporting",
        Duration::from_secs(150),
        || fleet.report("edge-1"),
    );
    assert_eq!(
        enrolment(&fleet, "edge-2").unwrap().state,
        EnrolState::Rejected
    );
    let audit = fleet.client.audit(0).unwrap();
    for action in ["device.enrol.accepted", "device.enrol.rejected"] {
        assert!(
            audit.iter().any(|e| e.action == action && e.who == "admin"),
            "{action} by admin: {audit:?}"
        );
    }
    drop(agents);
}

/// SoftHSM2's PKCS#11 module (tests/run.sh installs it).
const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";

#[test]
fn device_keys_made_in_a_softhsm2_token_sign_its_tls_and_open_its_encrypted_models() {
    let fleet = Fleet::embedded_tls_with(&["--enrol", "--enrol-auto", "claim=line-5"]);
    let pki = fleet.pki.clone().expect("PKI");
    modelcast_server::pki::claim(&pki, "line-5").unwrap();
    // A token of its own: SoftHSM2 configured to keep it in the test's directory.
    let hsm = fleet.dir.path().join("softhsm");
    std::fs::create_dir_all(hsm.join("tokens")).unwrap();
    let conf = hsm.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\n",
            hsm.join("tokens").display()
        ),
    )
    .unwrap();
    let objects = |hsm: &Path| {
        walk(&hsm.join("tokens"))
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "object"))
            .count()
    };
    let init = std::process::Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            "modelcast",
            "--pin",
            "1234",
            "--so-pin",
            "5678",
        ])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .expect("softhsm2-util (tests/run.sh installs softhsm2)");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let empty = objects(&hsm);
    let pin = hsm.join("pin");
    std::fs::write(&pin, "1234\n").unwrap();
    let token = format!(
        "[enrol.pkcs11]\nmodule = \"{SOFTHSM}\"\ntoken = \"modelcast\"\npin_file = \"{}\"\n",
        pin.display()
    );
    let mut options = claim_options(&pki, "line-5", None);
    options.extra.push_str(&token);
    options.env = vec![("SOFTHSM2_CONF".into(), conf.display().to_string())];
    let mut agent = fleet.start_agent_opts("edge-1", &[], options);
    wait_for(
        "edge-1 enrolled with its token's key",
        Duration::from_secs(60),
        || fleet.report("edge-1"),
    );
    let state = fleet.dir.path().join("edge-1").join("identity");
    assert!(state.join("device.pem").exists());
    assert!(
        !state.join("device.key").exists(),
        "a key file next to the token"
    );
    // Both key pairs live in the token (SoftHSM2 keeps each object in a file of its own):
    // the TLS key that signed the handshakes carrying the report, and the sealing key.
    assert_eq!(
        objects(&hsm),
        empty + 4,
        "two key pairs' objects in the token"
    );
    assert!(
        !fleet.dir.path().join("edge-1").join("sealing.key").exists(),
        "a sealing key file next to the token"
    );
    // The sealing key the device reports is the token's P-256 key (65 bytes, uncompressed).
    let sealing = fleet
        .report("edge-1")
        .and_then(|r| r.sealing_key)
        .expect("a sealing key in the report");
    assert_eq!(sealing.len(), 130, "{sealing}");
    // An encrypted model: its content key wrapped to that key, opened by the token's ECDH.
    let v1 = fleet.publish_encrypted_of_size("classifier", 1, 1 << 20);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);
    assert_eq!(agent.check_golden(&v1), "1");
    // Started again, it finds the same key in the token and connects with its certificate.
    let first = std::fs::read_to_string(agent.log_path()).unwrap_or_default();
    agent.stop();
    agent.start();
    wait_for("edge-1 connected again", Duration::from_secs(30), || {
        let log = std::fs::read_to_string(agent.log_path()).ok()?;
        log.contains("connected to broker").then_some(())
    });
    let log = std::fs::read_to_string(agent.log_path()).unwrap();
    assert!(!log.contains("enrolling by claim"), "{log}");
    assert!(!log.contains("making the device key"), "{log}");
    assert_eq!(enrolment(&fleet, "edge-1").unwrap().certificates.len(), 1);
    // Its encrypted slot opens again with the token's key.
    assert_eq!(agent.check_golden(&v1), "1", "served again after a restart");
    assert_eq!(objects(&hsm), empty + 4, "no new objects in the token");
    for line in first
        .lines()
        .filter(|l| l.contains("token") || l.contains("enrolled"))
    {
        println!("{line}");
    }
}
