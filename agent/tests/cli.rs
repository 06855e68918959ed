//! The agent binary refuses unusable configuration with a clear message and a failure exit.

use std::process::Command;

/// The agent binary; through the emulator when the tests run under one (cross/test).
fn agent() -> Command {
    let bin = env!("CARGO_BIN_EXE_modelcast-agent");
    match std::env::var("MODELCAST_TEST_RUNNER") {
        Ok(runner) if !runner.is_empty() => {
            let mut parts = runner.split_whitespace();
            let mut cmd = Command::new(parts.next().expect("runner program"));
            cmd.args(parts).arg(bin);
            cmd
        }
        _ => Command::new(bin),
    }
}

#[test]
fn the_version_says_what_the_build_runs() {
    let out = agent().arg("--version").output().unwrap();
    assert!(out.status.success());
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(
        version.starts_with(&format!("modelcast-agent {}", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    assert!(version.contains("backends: tract"), "{version}");
    assert_eq!(
        version.contains("onnxruntime"),
        cfg!(feature = "ort"),
        "{version}"
    );
}

#[test]
fn missing_config_is_a_clear_error() {
    let out = agent()
        .args(["--config", "/nonexistent/agent.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/agent.toml"), "{err}");
}

#[test]
fn unusable_trust_root_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.json");
    std::fs::write(&root, b"{ not json").unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "device_id = 'd1'\nstate_dir = '{}'\nhttp_listen = '127.0.0.1:0'\n[trust]\nroot = '{}'\ndirector_keys = ['{}']\n",
            dir.path().join("state").display(),
            root.display(),
            "11".repeat(32)
        ),
    )
    .unwrap();
    let out = agent().arg("--config").arg(&cfg).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("trust anchors"), "{err}");
}
