//! Uploads of any size up to the server's limit. A model of several hundred MB publishes
//! (its upload streamed into the store: the server's peak memory stays far below the
//! artifact), deploys and serves; a server with a lower limit refuses a larger artifact with a
//! clear 413 before reading it, and `modelcast publish` says why.

use std::time::Instant;

use modelcast_ops::client::ClientError;
use modelcast_tests::{proc_status_kib, Fleet};

/// The model's size: a deep MLP of 1024-wide layers, like a mid-sized vision backbone.
const MODEL_BYTES: u64 = 320 << 20;

#[test]
fn a_model_of_several_hundred_megabytes_publishes_and_serves() {
    let fleet = Fleet::embedded();
    let agent = fleet.start_agent_with("edge-1", &[("site", "lab")], "");
    fleet.wait_registered();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("large.onnx");
    std::fs::write(
        &path,
        modelcast_ops::onnx::example_model_of_size(1, MODEL_BYTES),
    )
    .unwrap();
    let rss_before = proc_status_kib(fleet.server_pid(), "VmRSS");
    let started = Instant::now();
    let manifest = fleet.publish_file(&path, "large", 1);
    let published = started.elapsed();
    let server_peak = proc_status_kib(fleet.server_pid(), "VmHWM");
    assert!(manifest.size > 300 << 20, "{}", manifest.size);
    // The server holds it now; the device needs the disk space more than the source file does.
    drop(dir);

    let started = Instant::now();
    fleet.deploy("large", 1, "site=lab");
    fleet.wait_serving("edge-1", "large", 1);
    let deployed = started.elapsed();
    assert_eq!(agent.check_golden(&manifest), "1");
    println!(
        "{} MB artifact ({}): published in {:.1} s, served by a device {:.1} s after the deploy \
         (debug build); server memory {} MB before the upload, peak {} MB",
        manifest.size >> 20,
        manifest.model_format,
        published.as_secs_f64(),
        deployed.as_secs_f64(),
        rss_before >> 10,
        server_peak >> 10,
    );
    // Streamed: the server never held the body (nor a large part of it) in memory.
    assert!(
        server_peak * 1024 < manifest.size / 2,
        "server peak {server_peak} KiB for a {} byte artifact",
        manifest.size
    );
}

#[test]
fn an_artifact_over_the_servers_limit_is_refused_before_it_is_read() {
    let fleet = Fleet::embedded_with(&["--max-artifact-bytes", "1000000"]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    // About 2 MB: over the limit.
    std::fs::write(
        &path,
        modelcast_ops::onnx::example_model_of_size(1, 2 << 20),
    )
    .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let sha = modelcast_proto::sha256_hex(&bytes);

    // The client says so without sending the body.
    let err = fleet.client.upload(&sha, 65536, &bytes).unwrap_err();
    match err {
        ClientError::Api { status, message } => {
            assert_eq!(status, 413);
            assert!(message.contains("limit of 1000000 bytes"), "{message}");
        }
        other => panic!("{other}"),
    }
    // curl, as an operator's script would use it (its length declared, `Expect:
    // 100-continue`): the same 413, answered before the body is sent.
    let url = format!(
        "{}/api/v1/artifacts/{sha}?chunk_size=65536",
        fleet.client.base()
    );
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_upload}",
            "-T",
        ])
        .arg(&path)
        .arg(&url)
        .output()
        .expect("curl");
    let answer = String::from_utf8_lossy(&out.stdout).into_owned();
    let (code, sent) = answer.split_once(' ').unwrap();
    assert_eq!(code, "413", "{answer}");
    assert!(
        sent.parse::<f64>().unwrap() < bytes.len() as f64,
        "{answer}"
    );
    // Nothing was stored.
    assert!(fleet
        .client
        .upload(&sha, 65536, &bytes[..900_000])
        .is_err_and(|e| !e.to_string().contains("limit")));

    // The CLI's publish names the limit.
    let out = std::process::Command::new(modelcast_tests::bin("modelcast"))
        .args(["--server", fleet.client.base(), "publish"])
        .arg(&path)
        .args(["--name", "big", "--version", "1", "--format", "onnx"])
        .args(["--keys", fleet.keys.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("over this server's limit of 1000000 bytes"),
        "{err}"
    );
}
