//! The operators' CLI: keys, example models, and clear failures.

use std::process::Command;

fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_modelcast"))
}

#[test]
fn keygen_and_example_model() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let out = cli()
        .arg("keygen")
        .arg("--out")
        .arg(&keys)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "root.key",
        "targets.key",
        "server.key",
        "root.json",
        "director.pub",
    ] {
        assert!(keys.join(f).exists(), "{f}");
    }
    // Never overwrite keys.
    let again = cli()
        .arg("keygen")
        .arg("--out")
        .arg(&keys)
        .output()
        .unwrap();
    assert!(!again.status.success());

    let model = dir.path().join("m.onnx");
    let out = cli()
        .args([
            "example-model",
            "--version",
            "2",
            "--size",
            "100000",
            "--out",
        ])
        .arg(&model)
        .output()
        .unwrap();
    assert!(out.status.success());
    let len = std::fs::metadata(&model).unwrap().len();
    assert!((90_000..110_000).contains(&len), "{len}");
}

#[test]
fn unreachable_server_is_a_clear_error() {
    let out = cli()
        .args(["--server", "http://127.0.0.1:9", "devices"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).is_empty());
}
