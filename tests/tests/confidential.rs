//! Confidential models end to end: `modelcast publish --encrypt` (through the publisher's
//! library) encrypts a model with a fresh content key and seals that key to the server's
//! escrow key; the server wraps it for each device the version is sent to, to the key the
//! device made on its first start and reports; two devices download the ciphertext through
//! the shared topic, serve it and answer its golden vector. The model is in clear on no disk:
//! neither the devices' state directories nor the server's store hold a byte string every
//! NNEF artifact carries in clear. A device restarted with its server down serves the
//! encrypted version from its slot again.

use std::path::Path;

use modelcast_ops::publish::{prepare, PublishOptions};
use modelcast_tests::{wait_for, AgentOptions, Fleet};

/// In every NNEF artifact, in clear: the name of its graph file in the tar.
const MARKER: &[u8] = b"graph.nnef";

/// Files under `dir` that contain `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if std::fs::read(&path)
                .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
            {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

#[test]
fn an_encrypted_model_serves_on_two_devices_and_is_in_clear_on_no_disk() {
    let mut fleet = Fleet::embedded();
    let mut agents: Vec<_> = ["edge-1", "edge-2"]
        .iter()
        .map(|id| fleet.start_agent_opts(id, &[("site", "lab")], AgentOptions::committing()))
        .collect();
    fleet.wait_devices(2);
    // Each device reports the public half of the key it made.
    let keys: Vec<String> = ["edge-1", "edge-2"]
        .iter()
        .map(|id| {
            wait_for(
                "the device's sealing key",
                std::time::Duration::from_secs(30),
                || fleet.report(id)?.sealing_key,
            )
        })
        .collect();
    assert_ne!(keys[0], keys[1]);
    for id in ["edge-1", "edge-2"] {
        let mode = std::fs::metadata(fleet.dir.path().join(id).join("sealing.key"))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }

    let path = fleet.dir.path().join("model.onnx");
    let onnx = modelcast_ops::onnx::example_model_of_size(1, 2 << 20);
    std::fs::write(&path, &onnx).unwrap();
    let mut opts = PublishOptions::new("classifier", 1);
    // The marker is there in clear in the artifact the publisher makes before encrypting.
    let clear = prepare(&onnx, &opts, modelcast_server::unix_now()).unwrap();
    assert!(clear.artifact.windows(MARKER.len()).any(|w| w == MARKER));
    opts.encrypt = true;
    let v1 = fleet.publish_with(&path, &opts);
    let encryption = v1.encryption.clone().expect("an encrypted manifest");
    assert_eq!(encryption.plain_size, clear.manifest.size);
    assert_ne!(v1.sha256, clear.manifest.sha256);

    fleet.deploy("classifier", 1, "site=lab");
    for (agent, id) in agents.iter().zip(["edge-1", "edge-2"]) {
        fleet.wait_serving(id, "classifier", 1);
        assert_eq!(
            agent.check_golden(&v1),
            "1",
            "{id} answers from the decrypted model"
        );
    }
    // Fan-out still sends one ciphertext to both.
    let status = fleet.client.status().unwrap().chunk_requests;
    println!(
        "{} chunks of {} sent on the shared topic, {} on the devices' own",
        status.shared,
        v1.download_chunk_count(),
        status.chunks - status.shared
    );

    // No disk holds the model in clear: not the devices', not the server's.
    for id in ["edge-1", "edge-2"] {
        let found = files_holding(&fleet.dir.path().join(id), MARKER);
        assert!(
            found.is_empty(),
            "{id}'s state holds the model in clear: {found:?}"
        );
    }
    let found = files_holding(&fleet.dir.path().join("server"), MARKER);
    assert!(
        found.is_empty(),
        "the server holds the model in clear: {found:?}"
    );

    // Offline: the server is gone; a restarted device opens its encrypted slot again.
    fleet.stop_server();
    agents[0].stop();
    agents[0].start();
    assert_eq!(
        agents[0].check_golden(&v1),
        "1",
        "served again after a restart, offline"
    );
}

#[test]
fn a_device_that_lost_its_sealing_key_serves_its_encrypted_model_again_once_rewrapped() {
    let fleet = Fleet::embedded();
    let mut agent = fleet.start_agent_opts("edge-1", &[], AgentOptions::committing());
    fleet.wait_registered();
    let first = wait_for(
        "the device's sealing key",
        std::time::Duration::from_secs(30),
        || fleet.report("edge-1")?.sealing_key,
    );
    let v1 = fleet.publish_encrypted_of_size("classifier", 1, 1 << 20);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);
    assert_eq!(agent.check_golden(&v1), "1");

    // Its key file is lost while it is stopped: it makes a new key, and the wrap it kept no
    // longer opens, so its installed version does not load at start.
    agent.stop();
    std::fs::remove_file(fleet.dir.path().join("edge-1").join("sealing.key")).unwrap();
    agent.start();
    let second = wait_for(
        "the device's new sealing key reported",
        std::time::Duration::from_secs(30),
        || fleet.report("edge-1")?.sealing_key.filter(|k| *k != first),
    );
    assert_ne!(first, second);
    // The server wraps the content key again to the new key, and the device serves the
    // version from its slot again, without downloading it.
    wait_for(
        "edge-1 serving v1 again",
        std::time::Duration::from_secs(60),
        || agent.infer("classifier", &v1.golden[0].inputs).ok(),
    );
    assert_eq!(agent.check_golden(&v1), "1");
    let log = std::fs::read_to_string(agent.log_path()).unwrap();
    assert!(
        log.contains("opens with its new key wrap: serving it again"),
        "{log}"
    );
}
