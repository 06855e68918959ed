//! Operator API access control and the audit log, end to end: with a token file the API
//! refuses callers without a token and callers whose role is too small, records every change
//! under the token's name (whatever name a request body claims), and the log reads back as an
//! unbroken chain through the `modelcast` CLI.

use modelcast_ops::client::{Client, ClientError};
use modelcast_server::api::{DeployRequest, RolloutRequest};
use modelcast_server::fleet::RolloutAction;
use modelcast_server::rollout::RolloutSpec;
use modelcast_tests::{bin, wait_for, Fleet};

fn status(e: ClientError) -> (u16, String) {
    match e {
        ClientError::Api { status, message } => (status, message),
        other => panic!("not an API error: {other}"),
    }
}

#[test]
fn tokens_roles_and_the_audit_log() {
    let mut fleet = Fleet::embedded();
    let _agent = fleet.start_agent_with("edge-1", &[("site", "lab")], "");
    fleet.wait_registered();
    let [_admin, alice, bob] = fleet.require_tokens();
    let base = fleet.client.base().to_string();
    let anonymous = Client::new(&base);
    let viewer = Client::new(&base).with_token(Some(bob.clone()));
    let deployer = Client::new(&base).with_token(Some(alice.clone()));

    // No token, a wrong token: refused. The dashboard page and the API description are public.
    assert_eq!(status(anonymous.devices().unwrap_err()).0, 401);
    let wrong = Client::new(&base).with_token(Some("mc_0000".into()));
    assert_eq!(status(wrong.devices().unwrap_err()).0, 401);
    for path in ["/dashboard", "/api/v1/openapi.json"] {
        let r = ureq::get(format!("{base}{path}")).call().unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }

    // A viewer reads (the device registers again after the restart) but cannot deploy.
    wait_for(
        "edge-1 to report",
        std::time::Duration::from_secs(30),
        || (viewer.devices().ok()?.len() == 1).then_some(()),
    );
    let deploy = |model: &str, version: u64| DeployRequest {
        model: model.into(),
        version,
        group: "site=lab".into(),
        by: "mallory".into(),
        probation: None,
        sampling: None,
        download: None,
        backend: None,
        shadow: None,
        canary: None,
    };
    let (code, message) = status(viewer.deploy(&deploy("classifier", 1)).unwrap_err());
    assert_eq!(code, 403);
    assert!(
        message.contains("bob is a viewer; POST /api/v1/deployments needs deployer"),
        "{message}"
    );
    // Sampled inputs and outputs are the devices' data, not fleet state: a viewer cannot
    // read them.
    let (code, message) = status(
        viewer
            .samples(&modelcast_server::api::SampleRequest {
                model: "classifier".into(),
                version: None,
                device: None,
                since_secs: 3600,
                limit: 10,
            })
            .unwrap_err(),
    );
    assert_eq!(code, 403);
    assert!(
        message.contains("GET /api/v1/samples needs deployer"),
        "{message}"
    );

    // A deployer publishes, deploys and steers rollouts, but cannot rotate the root.
    fleet.client = Client::new(&base).with_token(Some(alice.clone()));
    fleet.publish_example(1, 16);
    deployer.deploy(&deploy("classifier", 1)).unwrap();
    fleet.wait_serving("edge-1", "classifier", 1);
    fleet.publish_example(2, 16);
    let spec = RolloutSpec {
        wave_timeout_secs: 600,
        ..RolloutSpec::new("classifier", 2, "site=lab", &["1"]).unwrap()
    };
    let r = deployer
        .start_rollout(&RolloutRequest {
            spec,
            by: "mallory".into(),
        })
        .unwrap();
    assert_eq!(r.by, "alice", "the token names the caller, not the body");
    deployer
        .act_on_rollout(r.id, RolloutAction::Abort, "mallory")
        .unwrap();
    let root = viewer.root().unwrap();
    let rotate = modelcast_server::api::RootRequest {
        root,
        targets: None,
        by: "alice".into(),
    };
    let (code, message) = status(deployer.rotate_root(&rotate).unwrap_err());
    assert_eq!(code, 403);
    assert!(message.contains("needs admin"), "{message}");

    // The audit log, read by the viewer through the CLI.
    let entries = wait_for(
        "the rollout's end in the log",
        std::time::Duration::from_secs(30),
        || {
            let entries = viewer.audit(0).ok()?;
            entries
                .iter()
                .any(|e| e.action == "rollout.end")
                .then_some(entries)
        },
    );
    let actions: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| (e.who.as_str(), e.action.as_str()))
        .collect();
    for expected in [
        ("alice", "upload"),
        ("alice", "publish"),
        ("alice", "deploy"),
        ("alice", "rollout.start"),
        ("alice", "rollout.abort"),
    ] {
        assert!(
            actions.contains(&expected),
            "{expected:?} not in {actions:?}"
        );
    }
    assert!(
        !actions.iter().any(|(who, _)| *who == "mallory"),
        "{actions:?}"
    );
    let end = entries.iter().find(|e| e.action == "rollout.end").unwrap();
    assert_eq!(end.who, format!("rollout {}", r.id));

    let cli = |args: &[&str]| {
        let out = std::process::Command::new(bin("modelcast"))
            .args(["--server", &base, "--token", &bob])
            .args(args)
            .output()
            .expect("modelcast");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let verified = cli(&["audit", "--verify"]);
    assert!(verified.contains("chain intact"), "{verified}");
    let listing = cli(&["audit"]);
    assert!(listing.contains("rollout.abort"), "{listing}");
}

#[test]
fn an_open_api_takes_no_change_a_web_page_could_forge() {
    let fleet = Fleet::embedded();
    fleet.publish_example(1, 16);
    let base = fleet.client.base().to_string();
    let body = r#"{"model":"classifier","version":1,"group":"site=lab","by":"page"}"#;
    let post = |content_type: Option<&str>, origin: Option<&str>| {
        let mut r = ureq::post(format!("{base}/api/v1/deployments"))
            .config()
            .http_status_as_error(false)
            .build();
        if let Some(t) = content_type {
            r = r.header("Content-Type", t);
        }
        if let Some(o) = origin {
            r = r.header("Origin", o);
        }
        r.send(body).unwrap().status().as_u16()
    };
    // What a page may send cross-origin without the browser asking first (a "simple"
    // request), and any request from another origin, are refused before they act.
    assert_eq!(post(Some("text/plain"), None), 415);
    assert_eq!(post(Some("application/x-www-form-urlencoded"), None), 415);
    assert_eq!(post(None, None), 415);
    assert_eq!(
        post(Some("application/json"), Some("http://evil.example")),
        403
    );
    assert!(fleet.client.deployments().unwrap().is_empty());
    // The API's own clients (JSON, same origin or none) go through.
    let own = format!("http://{}", base.trim_start_matches("http://"));
    assert_eq!(post(Some("application/json"), Some(&own)), 200);
    assert_eq!(fleet.client.deployments().unwrap().len(), 1);
}

/// Without `--tokens` the API is open, so the server refuses to listen anywhere but loopback:
/// it exits at once with the reason, before it takes a device.
#[test]
fn an_open_api_is_refused_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    modelcast_server::keyset::keygen(&keys, modelcast_server::unix_now()).unwrap();
    let port = modelcast_tests::free_port();
    let mqtt = modelcast_tests::free_port();
    let mut child = std::process::Command::new(bin("modelcast-server"))
        .arg("--data-dir")
        .arg(dir.path().join("server"))
        .arg("--keys")
        .arg(&keys)
        .arg("--listen")
        .arg(format!("0.0.0.0:{port}"))
        .arg("--mqtt-listen")
        .arg(format!("127.0.0.1:{mqtt}"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_for(
        "the server to exit",
        std::time::Duration::from_secs(30),
        || child.try_wait().unwrap(),
    );
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("loopback only"), "{err}");
}
