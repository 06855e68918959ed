//! The attack suite: the threats TUF and Uptane list, each played against a real agent with a
//! real store, through Debian's mosquitto over TLS with client certificates and the project's
//! ACL (`modelcast pki mosquitto`). Each attack must end with the update rejected (by the
//! agent, with the reason in its state report and the server's log, or by the broker's ACL,
//! in the broker's log) and the running model still answering with its old output.
//!
//! The attackers: a compromised server replica (`modelcast-server-2`, holding the server's
//! online key but not the operators' offline keys), a device gone bad (`intruder`, a valid
//! device certificate), and for the chunk attacks a holder of every key, so that only the
//! byte checks stand in the way. `docs/security.md` maps each test to its threat.

use std::path::Path;
use std::time::Duration;

use modelcast_ops::onnx::example_model;
use modelcast_ops::publish::{prepare, Fallback, PublishOptions};
use modelcast_proto::manifest::Manifest;
use modelcast_proto::verify::fixture::Keys;
use modelcast_tests::{
    desired_topic, stolen_keys, wait_for, Agent, ChunkAttack, Fleet, Forger, Mosquitto, Rogue,
    RogueArtifact,
};

const FAR: &str = "2036-01-01T00:00:00Z";
const PAST: &str = "2020-01-01T00:00:00Z";

/// Runs `attack`, then waits for `agent` to report a new error containing `needle`, checks
/// that the server logged it, and that `agent` still answers `model`'s golden vector from
/// `version`. Returns the reason.
fn rejected(
    fleet: &Fleet,
    agent: &Agent,
    (model, version): (&Manifest, &str),
    needle: &str,
    attack: impl FnOnce(),
) -> String {
    let before = fleet.report(&agent.id).and_then(|r| r.last_error);
    attack();
    let reason = wait_for(
        &format!("{} to report a new error containing {needle:?}", agent.id),
        Duration::from_secs(60),
        || {
            let e = fleet.report(&agent.id)?.last_error?;
            (Some(&e) != before.as_ref() && e.reason.contains(needle)).then_some(e.reason)
        },
    );
    wait_for(
        &format!("the server to log {needle:?}"),
        Duration::from_secs(20),
        || fleet.server_logged(needle).then_some(()),
    );
    assert_eq!(agent.check_golden(model), version, "after: {reason}");
    eprintln!("attack outcome: {reason}");
    reason
}

#[test]
fn every_attack_is_rejected_and_the_old_model_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start_tls(dir.path());
    let pki = broker.pki().unwrap().to_path_buf();
    let port = broker.port();
    let fleet = Fleet::with_tls_broker(dir, &broker);
    let quick = "[probation]\nrequests = 1\nseconds = 1\n";
    let edge1 = fleet.start_agent_with("edge-1", &[("site", "lab"), ("ring", "a")], quick);
    let edge2 = fleet.start_agent_with("edge-2", &[("site", "lab"), ("ring", "b")], quick);
    wait_for("two devices registered", Duration::from_secs(30), || {
        (fleet.client.devices().ok()?.len() == 2).then_some(())
    });
    let v1 = fleet.publish_example(1, 64);
    fleet.deploy("classifier", 1, "site=lab");
    fleet.wait_serving("edge-1", "classifier", 1);
    fleet.wait_serving("edge-2", "classifier", 1);

    // The compromised replica reads the retained desired states it is allowed to read.
    let server2 = Rogue::connect_tls(port, &pki, "modelcast-server-2", None);
    assert!(server2.subscribe(&desired_topic("edge-2")));
    let legit_edge2 = wait_for(
        "edge-2's retained desired state",
        Duration::from_secs(10),
        || {
            server2
                .seen()
                .into_iter()
                .find(|(topic, _)| *topic == desired_topic("edge-2"))
                .map(|(_, payload)| payload)
        },
    );
    let forger = Forger::steal(&fleet);
    let mut counter = 1000;
    let mut next = || {
        counter += 10;
        counter
    };

    // 1. Arbitrary model: the compromised server signs a model the operators never signed.
    let now = modelcast_server::unix_now();
    let mut opts = PublishOptions::new("classifier", 5);
    opts.chunk_size = 16 * 1024;
    let evil = prepare(&example_model(5, 2000), &opts, now).unwrap();
    let (v5, v5_bytes) = (evil.manifest, evil.artifact);
    let at_v1 = (&v1, "1");
    let desired = forger.desired("edge-1", std::slice::from_ref(&v5), next(), FAR);
    let reason = rejected(
        &fleet,
        &edge1,
        at_v1,
        "not in the repository's signed targets",
        || server2.publish_desired("edge-1", &desired),
    );
    assert!(reason.starts_with("desired state rejected"), "{reason}");

    // 2. Metadata signed by keys the device does not trust at all, and unsigned metadata.
    let stranger = Keys::from_seed(77).desired("edge-1", std::slice::from_ref(&v5), next(), FAR);
    rejected(
        &fleet,
        &edge1,
        at_v1,
        "timestamp: 0 valid signature(s)",
        || server2.publish_desired("edge-1", &stranger),
    );
    let mut unsigned = forger.desired("edge-1", std::slice::from_ref(&v1), next(), FAR);
    unsigned.repository.targets.signatures.clear();
    rejected(
        &fleet,
        &edge1,
        at_v1,
        "targets: 0 valid signature(s)",
        || server2.publish_desired("edge-1", &unsigned),
    );

    // 3. Freeze: metadata that has expired (a server that stopped re-signing, or replays).
    let expired = forger.desired("edge-1", std::slice::from_ref(&v1), next(), PAST);
    rejected(&fleet, &edge1, at_v1, "metadata expired at 2020", || {
        server2.publish_desired("edge-1", &expired)
    });

    // 4. Mix-and-match / replay: edge-2's genuine desired state delivered to edge-1.
    rejected(&fleet, &edge1, at_v1, "delivered to \"edge-1\"", || {
        server2.publish_raw(&desired_topic("edge-1"), true, legit_edge2)
    });

    // 5. Malformed envelopes: garbage, truncated JSON, a huge document.
    rejected(&fleet, &edge1, at_v1, "EOF while parsing", || {
        server2.publish_raw(
            &desired_topic("edge-1"),
            true,
            b"{\"format\":1,\"dev".to_vec(),
        )
    });
    // 3 MiB of nesting inside a free-form JSON value: the parser's depth bound holds.
    let mut deep = br#"{"format":1,"device":"edge-1","director":{"signed":"#.to_vec();
    deep.resize(3 << 20, b'[');
    rejected(&fleet, &edge1, at_v1, "recursion limit", || {
        server2.publish_raw(&desired_topic("edge-1"), true, deep)
    });

    // 6. Rollback: a validly signed desired state naming an older model version (v2's
    // operators allowed no fleet rollback from it).
    let path = fleet.dir.path().join("v2.onnx");
    std::fs::write(&path, example_model(2, 64)).unwrap();
    let mut opts = PublishOptions::new("classifier", 2);
    opts.fallback = Fallback::Never;
    let v2 = fleet.publish_with(&path, &opts);
    fleet.deploy("classifier", 2, "ring=b");
    fleet.wait_serving("edge-2", "classifier", 2);
    let forger = Forger::steal(&fleet);
    let at_v2 = (&v2, "2");
    let older = forger.desired("edge-2", std::slice::from_ref(&v1), next(), FAR);
    rejected(&fleet, &edge2, at_v2, "(rollback)", || {
        server2.publish_desired("edge-2", &older)
    });
    // And an old desired-state document replayed (metadata rollback).
    let replay = forger.desired("edge-2", std::slice::from_ref(&v2), 3, FAR);
    rejected(
        &fleet,
        &edge2,
        at_v2,
        "is older than trusted version",
        || server2.publish_desired("edge-2", &replay),
    );

    // 7. Endless data: chunks longer than the manifest declares (keys are no help here).
    let keys = stolen_keys(&fleet.keys);
    let thief = |attack| {
        Rogue::connect_tls(
            port,
            &pki,
            "modelcast-server-2",
            Some(RogueArtifact::new(v5_bytes.clone(), &v5, attack)),
        )
    };
    drop(server2);
    let rogue = thief(ChunkAttack::Pad);
    let desired = keys.desired("edge-1", std::slice::from_ref(&v5), next(), FAR);
    let reason = rejected(&fleet, &edge1, at_v1, "update rejected: chunk", || {
        rogue.publish_desired("edge-1", &desired)
    });
    let first = v5.chunk_len(0).unwrap();
    assert!(
        reason.contains(&format!("bytes, manifest says {first}")),
        "{reason}"
    );
    drop(rogue);

    // 8. Slow retrieval: chunk requests are swallowed; the device reports the stall.
    let mut opts6 = opts.clone();
    opts6.version = 6;
    let v6 = prepare(&example_model(6, 2000), &opts6, now)
        .unwrap()
        .manifest;
    let rogue = thief(ChunkAttack::Stall);
    let desired = keys.desired("edge-1", &[v6], next(), FAR);
    rejected(
        &fleet,
        &edge1,
        at_v1,
        "download stalled: no chunk of classifier v6",
        || rogue.publish_desired("edge-1", &desired),
    );
    drop(rogue);

    // 9. A device gone bad: another device's topics are closed to it by the broker's ACL.
    let intruder = Rogue::connect_tls(port, &pki, "intruder", None);
    // mosquitto 2.0 may grant the SUBACK and then deliver nothing the ACL does not allow:
    // what counts is that no message of another device arrives, retained ones included.
    let granted = intruder.subscribe(&desired_topic("edge-1"));
    let wildcard = intruder.subscribe("modelcast/#");
    eprintln!("attack outcome: intruder SUBACK for edge-1/desired granted={granted}, modelcast/# granted={wildcard}");
    // The positive marker: a message on the intruder's own desired topic, published by the
    // server's identity after the subscriptions. Once it has arrived, whatever the broker
    // delivers for those subscriptions (retained messages at once) has arrived too.
    let own = desired_topic("intruder");
    let server = Rogue::connect_tls(port, &pki, "modelcast-server-2", None);
    server.publish_raw(&own, false, b"marker".to_vec());
    let mut seen: Vec<String> = Vec::new();
    wait_for(
        "the intruder to receive its own topic's marker",
        Duration::from_secs(10),
        || {
            seen.extend(intruder.seen().into_iter().map(|(t, _)| t));
            seen.contains(&own).then_some(())
        },
    );
    drop(server);
    assert!(
        seen.iter().all(|t| !t.contains("/d/edge-")),
        "an intruder read other devices' messages: {seen:?}"
    );
    // Forged retained desired states (its own and another device's) and a forged report.
    intruder.publish_raw(&desired_topic("edge-1"), true, b"forged".to_vec());
    intruder.publish_raw(&desired_topic("intruder"), true, b"forged".to_vec());
    intruder.publish_raw("modelcast/d/edge-1/state", true, b"forged".to_vec());
    // Chunk requests on edge-1's behalf: on edge-1's topic the broker refuses them, and on
    // the intruder's own topic the server drops a request naming another device.
    let on_behalf = modelcast_proto::chunk::ChunkRequest {
        format: modelcast_proto::FORMAT_VERSION,
        device: "edge-1".into(),
        artifact: v1.sha256.clone(),
        chunks: vec![0],
        again: vec![],
        shared: false,
        joined: false,
        zstd: false,
    };
    intruder.publish_raw("modelcast/d/edge-1/requests", false, on_behalf.to_vec());
    intruder.publish_raw("modelcast/d/intruder/requests", false, on_behalf.to_vec());
    // A forged chunk on the artifact's shared topic, which every device may read.
    let forged = modelcast_proto::chunk::ChunkReply {
        artifact: modelcast_proto::chunk::parse_digest(&v1.sha256).unwrap(),
        index: 0,
        encoding: modelcast_proto::chunk::Encoding::Raw,
        data: b"forged",
    };
    intruder.publish_raw(
        &format!("modelcast/a/{}", v1.sha256),
        false,
        forged.encode(),
    );
    wait_for(
        "the broker to deny the forgeries",
        Duration::from_secs(10),
        || {
            let log = broker.log();
            (log.matches("Denied PUBLISH from intruder").count() >= 5).then_some(())
        },
    );
    wait_for(
        "the server to drop the spoofed request",
        Duration::from_secs(10),
        || {
            fleet
                .server_logged("chunk request naming another device dropped")
                .then_some(())
        },
    );
    // Every forgery was denied at the broker (five above) or dropped by the server (waited
    // on): nothing is in flight towards edge-1.
    assert_eq!(edge1.check_golden(&v1), "1");
    let report = fleet.report("edge-1").unwrap();
    assert!(
        !report.last_error.unwrap().reason.contains("forged"),
        "a forged message reached edge-1"
    );
    drop(edge2);
}

/// Key compromise, the TUF way: operators rotate the root to revoke a stolen targets key and
/// raise the targets threshold to two keys; the devices follow the rotation through the
/// server; a thief holding the revoked key, or only one of the two new keys, cannot get a
/// model installed. Over the embedded broker with TLS and client certificates; the forger
/// holds a second fleet server's certificate (with a device's, the broker's front would
/// refuse its desired states before any device saw them): the signatures stand alone.
#[test]
fn revoked_keys_and_unmet_thresholds_are_refused_after_a_root_rotation() {
    use modelcast_proto::keys::SigningKey;
    use modelcast_proto::metadata::{Signed, Targets};
    use modelcast_server::keyset;

    // The forger is a compromised fleet server: a second server identity, which the
    // embedded broker lets publish desired states (a device's certificate may not).
    let fleet = Fleet::embedded_tls_with(&["--broker-server-identity", "modelcast-server-2"]);
    let edge = fleet.start_agent_with(
        "edge-1",
        &[("site", "lab")],
        "[probation]\nrequests = 1\nseconds = 1\n",
    );
    fleet.wait_registered();
    let v1 = fleet.publish_example(1, 64);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);
    let revoked = keyset::read_key(&fleet.keys.join("targets.key")).unwrap();

    // The operators rotate: targets key 1 revoked, keys 2 and 3 added, two of them required.
    let (k2, k3) = (
        SigningKey::from_bytes(&[21; 32]),
        SigningKey::from_bytes(&[22; 32]),
    );
    let root = keyset::read_root(&fleet.keys.join("root.json")).unwrap();
    let change = keyset::RootChange {
        add: vec![
            ("targets".into(), k2.public()),
            ("targets".into(), k3.public()),
        ],
        revoke: vec![("targets".into(), revoked.public().key_id())],
        thresholds: vec![("targets".into(), 2)],
        expires: None,
    };
    let now = modelcast_server::unix_now();
    let mut next = keyset::next_root(&root, &change, now).unwrap();
    keyset::add_signature(
        &mut next,
        &keyset::read_key(&fleet.keys.join("root.key")).unwrap(),
    )
    .unwrap();
    let current_targets = || -> Targets {
        let signed = fleet.client.targets().unwrap().unwrap();
        signed.parse("targets").unwrap()
    };
    let mut targets = current_targets();
    targets.version += 1;
    let resigned = Signed::sign(&targets, &[&k2, &k3]);
    // Re-signed by one new key only: the server refuses the rotation as it is.
    let short = modelcast_server::api::RootRequest {
        root: next.clone(),
        targets: Some(Signed::sign(&targets, &[&k2])),
        by: "e2e".into(),
    };
    let err = fleet.client.rotate_root(&short).unwrap_err().to_string();
    assert!(err.contains("threshold 2"), "{err}");
    fleet
        .client
        .rotate_root(&modelcast_server::api::RootRequest {
            root: next,
            targets: Some(resigned),
            by: "e2e".into(),
        })
        .unwrap();
    // Their key directory now holds the new targets keys; v2 needs both.
    std::fs::remove_file(fleet.keys.join("targets.key")).unwrap();
    std::fs::write(fleet.keys.join("targets-2.key"), k2.to_hex()).unwrap();
    std::fs::write(fleet.keys.join("targets-3.key"), k3.to_hex()).unwrap();
    let v2 = fleet.publish_example(2, 64);
    fleet.deploy("classifier", 2, "*");
    // Serving v2 proves the device walked to root version 2 (root 1 knows neither key).
    fleet.wait_serving("edge-1", "classifier", 2);
    assert_eq!(edge.check_golden(&v2), "2");

    // A second rotation replaces the root key itself (signed by the old and the new one).
    // From now on every desired state carries the chain [v2, v3]; the device must keep
    // accepting it although v2 was signed by a key root 3 no longer lists.
    let new_root_key = SigningKey::from_bytes(&[23; 32]);
    let current = fleet
        .client
        .verified_root(&keyset::read_root(&fleet.keys.join("root.json")).unwrap())
        .unwrap();
    let old_root_key = keyset::read_key(&fleet.keys.join("root.key")).unwrap();
    let change = keyset::RootChange {
        add: vec![("root".into(), new_root_key.public())],
        revoke: vec![("root".into(), old_root_key.public().key_id())],
        ..Default::default()
    };
    let mut v3_root = keyset::next_root(&current, &change, now).unwrap();
    keyset::add_signature(&mut v3_root, &old_root_key).unwrap();
    keyset::add_signature(&mut v3_root, &new_root_key).unwrap();
    fleet
        .client
        .rotate_root(&modelcast_server::api::RootRequest {
            root: v3_root,
            targets: None,
            by: "e2e".into(),
        })
        .unwrap();
    let v4 = fleet.publish_example(4, 64);
    fleet.deploy("classifier", 4, "*");
    fleet.wait_serving("edge-1", "classifier", 4);

    let pki = fleet.pki.clone().unwrap();
    let intruder = Rogue::connect_tls(fleet.mqtt_port, &pki, "modelcast-server-2", None);
    let mut opts = PublishOptions::new("classifier", 5);
    opts.chunk_size = 16 * 1024;
    let evil = prepare(&example_model(5, 64), &opts, now).unwrap().manifest;
    let mut forged = current_targets();
    forged.version += 1;
    forged.targets.insert(evil.target_path(), evil.to_target());
    let models = std::slice::from_ref(&evil);

    // Signed with the revoked key (and the stolen online key for the rest).
    let forger = Forger::steal(&fleet).with_targets(Signed::sign(&forged, &[&revoked]));
    intruder.publish_desired("edge-1", &forger.desired("edge-1", models, 10_000, FAR));
    let reason = fleet.wait_error("edge-1", "targets: 0 valid signature(s) of threshold 2");
    assert_eq!(edge.check_golden(&v4), "4", "{reason}");

    // One of the two required keys: threshold not met.
    let forger = Forger::steal(&fleet).with_targets(Signed::sign(&forged, &[&k2]));
    intruder.publish_desired("edge-1", &forger.desired("edge-1", models, 10_010, FAR));
    let reason = fleet.wait_error("edge-1", "targets: 1 valid signature(s) of threshold 2");
    assert_eq!(edge.check_golden(&v4), "4", "{reason}");
    // That key's signature given twice does not make two.
    let mut twice = Signed::sign(&forged, &[&k2]);
    twice.signatures.push(twice.signatures[0].clone());
    let forger = Forger::steal(&fleet).with_targets(twice);
    intruder.publish_desired("edge-1", &forger.desired("edge-1", models, 10_020, FAR));
    let reason = fleet.wait_error("edge-1", "signs twice");
    assert_eq!(edge.check_golden(&v4), "4", "{reason}");
    assert!(fleet.server_logged("valid signature(s) of threshold 2"));
    assert_eq!(
        fleet.report("edge-1").unwrap().models["classifier"].serving_version(),
        Some(4)
    );
    drop(v1);
}

/// Session takeover, on both brokers with client certificates: two devices with valid
/// certificates connect with the server's client id and with another device's. The embedded
/// broker's front refuses both at CONNECT ("identifier rejected", counted for the
/// certificate's device); mosquitto with the generated configuration replaces the client id
/// with the certificate's name (`use_username_as_clientid`), so they connect as themselves.
/// Either way neither the server's link nor edge-1's drops, and an update still goes through.
fn a_certificate_cannot_take_over_another_identitys_session(
    fleet: &Fleet,
    pki: &Path,
    refused_at_connect: bool,
) {
    let edge = fleet.start_agent_with("edge-1", &[], "[probation]\nrequests = 1\nseconds = 1\n");
    fleet.wait_registered();
    fleet.publish_example(1, 64);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);
    let agent_drops = || {
        std::fs::read_to_string(edge.log_path())
            .unwrap_or_default()
            .matches("broker link down")
            .count()
    };
    let (server_before, agent_before) = (
        fleet.server_log_count("server broker link down"),
        agent_drops(),
    );
    let rogues: Vec<Rogue> = [
        ("edge-2", modelcast_server::pki::SERVER_IDENTITY),
        ("edge-3", "edge-1"),
    ]
    .into_iter()
    .map(|(cert, id)| Rogue::connect_tls_as(fleet.mqtt_port, pki, cert, id, None))
    .collect();
    let filter = |dev: &str| format!("modelcast/d/{dev}/desired");
    for (rogue, dev) in rogues.iter().zip(["edge-2", "edge-3"]) {
        if refused_at_connect {
            // Never served: no SUBACK, and the refusals are counted for the certificate.
            assert_eq!(
                rogue.try_subscribe(&filter(dev), Duration::from_secs(2)),
                None
            );
            wait_for(
                &format!("{dev}'s refusals counted"),
                Duration::from_secs(10),
                || {
                    fleet.client.devices().ok().and_then(|d| {
                        d.into_iter().find(|d| {
                            d.id == dev && d.dropped.get("client_id").copied().unwrap_or(0) > 0
                        })
                    })
                },
            );
        } else {
            // Connected and served by the broker as itself (a SUBACK).
            assert!(rogue.subscribe(&filter(dev)));
        }
    }
    let v2 = fleet.publish_example(2, 64);
    fleet.deploy("classifier", 2, "*");
    fleet.wait_serving("edge-1", "classifier", 2);
    assert_eq!(edge.check_golden(&v2), "2");
    let (server_after, agent_after) = (
        fleet.server_log_count("server broker link down"),
        agent_drops(),
    );
    eprintln!(
        "takeover: server link drops {server_before} → {server_after}, edge-1 link drops {agent_before} → {agent_after}"
    );
    assert_eq!(
        server_after, server_before,
        "the server's session was taken over"
    );
    assert_eq!(agent_after, agent_before, "edge-1's session was taken over");
}

#[test]
fn a_certificate_cannot_take_over_a_session_on_the_embedded_broker() {
    let fleet = Fleet::embedded_tls();
    let pki = fleet.pki.clone().expect("PKI");
    a_certificate_cannot_take_over_another_identitys_session(&fleet, &pki, true);
}

#[test]
fn a_certificate_cannot_take_over_a_session_on_mosquitto() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start_tls(dir.path());
    let pki = broker.pki().expect("PKI").to_path_buf();
    let fleet = Fleet::with_tls_broker(dir, &broker);
    a_certificate_cannot_take_over_another_identitys_session(&fleet, &pki, false);
}
