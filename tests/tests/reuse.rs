//! Reuse on the device: a new version that differs from the serving one in one tensor (the
//! deep example model with only its last layer retrained) is assembled from the chunks the
//! device already holds; only the chunks that changed travel. Checked by the server's
//! sent-bytes counter, the agent's reused-bytes metric and its state report; the new version
//! then answers its own golden vector.

use std::time::Duration;

use modelcast_ops::onnx::{example_model_fine_tuned, example_model_of_size};
use modelcast_tests::{wait_for, AgentOptions, Fleet};

const MIB: u64 = 1024 * 1024;
const REUSED: &str = r#"modelcast_reused_bytes_total{model="classifier"}"#;

#[test]
fn a_version_that_changes_one_tensor_downloads_only_its_chunks() {
    let fleet = Fleet::embedded();
    let agent = fleet.start_agent_opts(
        "edge-1",
        &[("site", "lab")],
        AgentOptions {
            extra: "[probation]\nrequests = 0\nseconds = 0\n".into(),
            ..AgentOptions::default()
        },
    );
    fleet.wait_registered();
    let size = 12 * MIB;
    let write = |version: u64, onnx: Vec<u8>| {
        let path = fleet.dir.path().join(format!("v{version}.onnx"));
        std::fs::write(&path, onnx).unwrap();
        fleet.publish_file(&path, "classifier", version)
    };
    let v1 = write(1, example_model_of_size(1, size));
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);
    assert_eq!(agent.check_golden(&v1), "1");

    let sent = || fleet.client.status().unwrap().chunk_requests.bytes;
    let before = sent();
    // Every tensor of version 1 but the last layer's.
    let v2 = write(2, example_model_fine_tuned(1, size, 2));
    fleet.deploy("classifier", 2, "*");
    fleet.wait_serving("edge-1", "classifier", 2);
    assert_eq!(agent.check_golden(&v2), "2");

    let download = v2.download_size();
    let travelled = sent() - before;
    let reused = agent.metric(REUSED).unwrap_or(0.0) as u64;
    let report = wait_for("the report of v2", Duration::from_secs(10), || {
        let model = fleet.report("edge-1")?.models.remove("classifier")?;
        model.update.filter(|u| u.version == 2)
    });
    println!(
        "v2: {download} bytes to download, {reused} reused on the device ({:.1} %), {travelled} sent by the server ({:.1} %)",
        100.0 * reused as f64 / download as f64,
        100.0 * travelled as f64 / download as f64
    );
    assert_eq!(report.reused_bytes, reused, "{report:?}");
    assert!(
        reused + travelled >= v2.size,
        "every byte of the artifact either reused or sent"
    );
    assert!(
        travelled * 10 <= download,
        "{travelled} of {download} bytes sent: more than the changed tensor's chunks"
    );
}
