//! The model registry: each version's history with the devices serving it, promotion to
//! production (one at a time per model) and retirement (no new deployment or rollout may
//! name a retired version), through the API and the `modelcast` CLI, in the audit log.

use modelcast_ops::client::ClientError;
use modelcast_server::db::Stage;
use modelcast_server::rollout::RolloutSpec;
use modelcast_tests::{bin, Fleet};

#[test]
fn versions_are_promoted_retired_and_show_where_they_run() {
    let fleet = Fleet::embedded();
    let _agent = fleet.start_agent_with("edge-1", &[("site", "lab")], "");
    fleet.wait_registered();
    fleet.publish_example(1, 16);
    fleet.publish_example(2, 16);
    fleet.deploy("classifier", 1, "site=lab");
    fleet.wait_serving("edge-1", "classifier", 1);

    let cli = |args: &[&str]| {
        let out = std::process::Command::new(bin("modelcast"))
            .args(["--server", fleet.client.base()])
            .args(args)
            .args(["--by", "carol"].iter().filter(|_| args[0] != "models"))
            .output()
            .expect("modelcast");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    cli(&["promote", "--model", "classifier", "--version", "1"]);
    cli(&["retire", "--model", "classifier", "--version", "2"]);

    // A retired version cannot go out, by deployment or rollout.
    let refused = |e: ClientError| match e {
        ClientError::Api { status, message } => (status, message),
        other => panic!("{other}"),
    };
    let err = fleet
        .client
        .deploy(&modelcast_server::api::DeployRequest {
            model: "classifier".into(),
            version: 2,
            group: "site=lab".into(),
            by: "e2e".into(),
            probation: None,
            sampling: None,
            download: None,
            backend: None,
            shadow: None,
            canary: None,
        })
        .unwrap_err();
    assert_eq!(
        refused(err),
        (409, "model classifier version 2 is retired".into())
    );
    let err = fleet
        .client
        .start_rollout(&modelcast_server::api::RolloutRequest {
            spec: RolloutSpec::new("classifier", 2, "site=lab", &["1"]).unwrap(),
            by: "e2e".into(),
        })
        .unwrap_err();
    assert_eq!(refused(err).0, 409);

    let history = fleet.client.model_history("classifier").unwrap();
    let v = |n: u64| {
        history
            .iter()
            .find(|h| h.entry.manifest.version == n)
            .unwrap()
    };
    assert_eq!(v(1).entry.stage, Stage::Production);
    assert_eq!(v(1).devices, vec!["edge-1".to_string()]);
    assert_eq!(v(1).entry.staged_by.as_ref().unwrap().0, "carol");
    assert_eq!(v(2).entry.stage, Stage::Retired);
    assert!(v(2).devices.is_empty());
    assert!(v(1).entry.manifest.metadata.contains_key("opset"));

    // One production version per model.
    fleet.publish_example(3, 16);
    cli(&["promote", "--model", "classifier", "--version", "3"]);
    let history = fleet.client.model_history("classifier").unwrap();
    let stage = |n: u64| {
        history
            .iter()
            .find(|h| h.entry.manifest.version == n)
            .unwrap()
            .entry
            .stage
    };
    assert_eq!(
        (stage(1), stage(2), stage(3)),
        (Stage::Candidate, Stage::Retired, Stage::Production)
    );

    let listing = cli(&["models", "classifier"]);
    assert!(
        listing.contains("production") && listing.contains("edge-1"),
        "{listing}"
    );
    let actions: Vec<String> = fleet
        .client
        .audit(0)
        .unwrap()
        .into_iter()
        .filter(|e| e.who == "carol")
        .map(|e| e.action)
        .collect();
    assert_eq!(actions, ["model.promote", "model.retire", "model.promote"]);
}

#[test]
fn the_same_file_publishes_again_under_a_new_name_and_a_taken_version_is_named_as_such() {
    let fleet = Fleet::embedded();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    std::fs::write(&path, modelcast_ops::onnx::example_model(1, 16)).unwrap();
    let first = fleet.publish_file(&path, "classifier", 1);
    // The artifact is held already: publishing it under another name acknowledges it instead
    // of breaking the connection.
    let again = fleet.publish_file(&path, "detector", 1);
    assert_eq!(first.sha256, again.sha256);
    let held = fleet
        .client
        .upload(&first.sha256, first.chunk_size, b"not even these bytes")
        .expect("a held artifact is acknowledged");
    assert_eq!(held["stored"], "already");
    // A raw PUT of the whole body to a held artifact is read to its end and answered.
    let bytes = std::fs::read(&path).unwrap();
    let url = format!(
        "{}/api/v1/artifacts/{}?chunk_size={}",
        fleet.client.base(),
        first.sha256,
        first.chunk_size
    );
    let answer: serde_json::Value = ureq::put(&url)
        .send(&bytes[..])
        .expect("answered")
        .body_mut()
        .read_json()
        .unwrap();
    assert_eq!(answer["stored"], "already");
    // Publishing a version that exists says so.
    let keys = modelcast_server::keyset::read_role_keys(&fleet.keys, "targets").unwrap();
    let root = modelcast_server::keyset::read_root(&fleet.keys.join("root.json")).unwrap();
    let err = modelcast_ops::publish::publish_file(
        &fleet.client,
        &path,
        &modelcast_ops::publish::PublishOptions::new("classifier", 1),
        &keys,
        &root,
        "e2e",
        modelcast_server::unix_now(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            modelcast_ops::publish::PublishError::AlreadyPublished { version: 1, .. }
        ),
        "{err}"
    );
    assert_eq!(err.to_string(), "classifier version 1 is already published");
}

#[test]
fn an_upload_says_where_its_chunking_restarts_and_a_bad_layout_is_refused() {
    let fleet = Fleet::embedded();
    let artifact: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    let sha = modelcast_proto::sha256_hex(&artifact);
    let put = |segments: &[u64], declared: usize, body_len: usize| {
        let mut body: Vec<u8> = segments.iter().flat_map(|s| s.to_be_bytes()).collect();
        body.extend_from_slice(&artifact[..body_len]);
        let url = format!(
            "{}/api/v1/artifacts/{sha}?chunk_size=300&segments={declared}",
            fleet.client.base()
        );
        match ureq::put(&url)
            .config()
            .http_status_as_error(false)
            .build()
            .send(&body[..])
        {
            Ok(mut r) => (r.status().as_u16(), r.body_mut().read_to_string().unwrap()),
            Err(e) => panic!("{e}"),
        }
    };
    for (segments, declared, len, says) in [
        (vec![500, 400], 2, 1000, "overlap"),
        (vec![0], 1, 1000, "overlap"),
        (vec![400, 1000], 2, 1000, "past the end"),
        (vec![400], 3, 0, "ends inside"),
    ] {
        let (status, text) = put(&segments, declared, len);
        assert_eq!(status, 400, "{segments:?}: {text}");
        assert!(text.contains(says), "{segments:?}: {text}");
        assert!(fleet.client.artifact(&sha).is_err(), "nothing kept");
    }
    let (status, text) = put(&[400, 450], 2, 1000);
    assert_eq!(status, 201, "{text}");
    let held = fleet.client.artifact(&sha).unwrap();
    assert_eq!(held["segments"], serde_json::json!([400, 450]));
    assert_eq!(held["chunk_size"], 300);

    // A file held in another layout (uploaded by an older publisher, in fixed chunks) is
    // published in that layout: the manifest describes the chunks the server holds.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    let model = modelcast_ops::onnx::example_model_of_size(1, 9 << 20);
    std::fs::write(&path, &model).unwrap();
    let mut opts = modelcast_ops::publish::PublishOptions::new("classifier", 1);
    opts.format = modelcast_ops::convert::Choice::Onnx;
    fleet
        .client
        .upload(
            &modelcast_proto::sha256_hex(&model),
            opts.chunk_size,
            &model,
        )
        .unwrap();
    let manifest = fleet.publish_with(&path, &opts);
    assert_eq!(manifest.segments, Vec::<u64>::new());
    assert_eq!(
        manifest.chunks,
        modelcast_proto::manifest::chunk_digests(&model, manifest.chunk_size)
    );
    // Published afresh, the same bytes chunk at their tensors.
    opts.name = "detector".into();
    let other = modelcast_ops::onnx::restamped(&model, "9").unwrap();
    std::fs::write(&path, other).unwrap();
    assert!(!fleet.publish_with(&path, &opts).segments.is_empty());
}
