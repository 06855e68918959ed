//! Reuse on the device: a new version that differs from the serving one in one tensor (the
//! deep example model with only its last layer retrained) is assembled from the chunks the
//! device already holds; only the chunks that changed travel. Checked by the server's
//! sent-bytes counter, the agent's reused-bytes metric, its state report and the rollout's
//! figures (API, `modelcast rollout status` and the dashboard); the new version then answers its own golden
//! vector. Chunks start at tensors: a model re-exported by another release of its exporter,
//! every tensor moved by a few bytes, still travels as almost nothing.

use std::time::Duration;

use modelcast_ops::convert::Choice;
use modelcast_ops::onnx::{example_model_fine_tuned, example_model_of_size, restamped};
use modelcast_ops::publish::PublishOptions;
use modelcast_server::rollout::{RolloutSpec, RolloutState};
use modelcast_tests::browser::{element, rendered};
use modelcast_tests::{bin, wait_for, AgentOptions, Fleet};

const MIB: u64 = 1024 * 1024;
const REUSED: &str = r#"modelcast_reused_bytes_total{model="classifier"}"#;

/// A fleet with one device, `edge-1`, that commits each version at once.
fn one_device() -> (Fleet, modelcast_tests::Agent) {
    let fleet = Fleet::embedded();
    let agent = fleet.start_agent_opts("edge-1", &[("site", "lab")], AgentOptions::committing());
    fleet.wait_registered();
    (fleet, agent)
}

/// Publishes `onnx` as `classifier` `version`, as `modelcast publish` would.
fn publish(fleet: &Fleet, version: u64, onnx: Vec<u8>) -> modelcast_proto::manifest::Manifest {
    let path = fleet.dir.path().join(format!("v{version}.onnx"));
    std::fs::write(&path, onnx).unwrap();
    fleet.publish_file(&path, "classifier", version)
}

#[test]
fn a_version_that_changes_one_tensor_downloads_only_its_chunks() {
    let (fleet, agent) = one_device();
    let size = 12 * MIB;
    let write = |version: u64, onnx: Vec<u8>| publish(&fleet, version, onnx);
    let v1 = write(1, example_model_of_size(1, size));
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);
    assert_eq!(agent.check_golden(&v1), "1");

    // The chunks' own bytes (what went on the wire was smaller still: compressed).
    let sent = || fleet.client.status().unwrap().chunk_requests.raw_bytes;
    let before = sent();
    // Every tensor of version 1 but the last layer's.
    let v2 = write(2, example_model_fine_tuned(1, size, 2));
    let rollout = fleet.start_rollout(RolloutSpec::new("classifier", 2, "*", &["100%"]).unwrap());
    let rollout = wait_for("the rollout to complete", Duration::from_secs(60), || {
        let r = fleet.client.rollout(rollout.id).ok()?;
        (r.state == RolloutState::Completed).then_some(r)
    });
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
    let t = rollout.transferred();
    assert_eq!((t.received_bytes, t.reused_bytes), (download, reused));
    let out = std::process::Command::new(bin("modelcast"))
        .args(["--server", fleet.client.base(), "rollout", "status"])
        .arg(rollout.id.to_string())
        .output()
        .expect("modelcast rollout status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("MB of it reused"), "{text}");
    // The rollout's page in the console, in headless Chromium.
    let dom = rendered(
        fleet.dir.path(),
        &format!("{}/dashboard/rollouts/{}", fleet.client.base(), rollout.id),
        "data-transferred=",
    );
    let line = element(&dom, "p", "data-transferred", &rollout.id.to_string());
    let shown: u32 = line
        .split("MB reused from what they held (")
        .nth(1)
        .and_then(|rest| rest.split(" %)").next()?.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(shown >= 97, "{line}");
    assert!(
        reused + travelled >= v2.size,
        "every byte of the artifact either reused or sent"
    );
    assert!(
        travelled * 10 <= download,
        "{travelled} of {download} bytes sent: more than the changed tensor's chunks"
    );
}

#[test]
fn a_re_exported_model_whose_tensors_all_moved_downloads_almost_nothing() {
    let fleet = Fleet::embedded();
    let agent = fleet.start_agent_opts("edge-1", &[("site", "lab")], AgentOptions::committing());
    fleet.wait_registered();
    let size = 12 * MIB;
    // The ONNX file as the device receives it: its protobuf moves every tensor when anything
    // before them changes length.
    let write = |version: u64, onnx: Vec<u8>| {
        let path = fleet.dir.path().join(format!("v{version}.onnx"));
        std::fs::write(&path, onnx).unwrap();
        let mut opts = PublishOptions::new("classifier", version);
        opts.format = Choice::Onnx;
        fleet.publish_with(&path, &opts)
    };
    let model = example_model_of_size(1, size);
    let v1 = write(1, restamped(&model, "2.1.0").unwrap());
    assert!(v1.segments.len() >= 3, "{:?}", v1.segments);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);

    let v2 = write(2, restamped(&model, "2.3.1+cu121").unwrap());
    assert_ne!(v1.sha256, v2.sha256);
    let shared = v2.chunks.iter().filter(|c| v1.chunks.contains(c)).count();
    let sent = || fleet.client.status().unwrap().chunk_requests.raw_bytes;
    let before = sent();
    fleet.deploy("classifier", 2, "*");
    fleet.wait_serving("edge-1", "classifier", 2);
    assert_eq!(agent.check_golden(&v2), "2");
    let travelled = sent() - before;
    let reused = agent.metric(REUSED).unwrap_or(0.0) as u64;
    println!(
        "re-exported: {shared} of {} chunks the same; {reused} bytes reused, {travelled} of {} sent ({:.2} %)",
        v2.chunks.len(),
        v2.size,
        100.0 * travelled as f64 / v2.size as f64
    );
    assert!(reused + travelled >= v2.size);
    // Only the chunks before the first large tensor differ.
    assert!(
        travelled * 100 <= v2.size,
        "{travelled} of {} bytes sent: more than the first chunk",
        v2.size
    );
}

#[test]
fn the_same_file_as_a_new_version_installs_without_a_byte() {
    let fleet = Fleet::embedded();
    let agent = fleet.start_agent_opts("edge-1", &[("site", "lab")], AgentOptions::committing());
    fleet.wait_registered();
    let path = fleet.dir.path().join("model.onnx");
    std::fs::write(&path, example_model_of_size(1, 2 * MIB)).unwrap();
    let v1 = fleet.publish_file(&path, "classifier", 1);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);
    // Re-published unchanged (say, for a new probation or golden vectors): a new version of
    // the same bytes.
    let v2 = fleet.publish_file(&path, "classifier", 2);
    assert_eq!(v1.sha256, v2.sha256);
    let sent = || fleet.client.status().unwrap().chunk_requests.raw_bytes;
    let before = sent();
    fleet.deploy("classifier", 2, "*");
    fleet.wait_serving("edge-1", "classifier", 2);
    assert_eq!(agent.check_golden(&v2), "2");
    assert_eq!(sent(), before, "nothing sent");
}

#[test]
fn a_download_replaced_midway_passes_what_it_received_to_the_new_one() {
    use modelcast_proto::desired::DownloadPolicy;
    let (fleet, agent) = one_device();
    let size = 12 * MIB;
    let write = |version: u64, onnx: Vec<u8>| publish(&fleet, version, onnx);
    write(1, example_model_of_size(1, 2 * MIB));
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);

    // v2 shares nothing with v1; it downloads slowly (1 MiB/s), and v3 (v2 with its last
    // layer retrained) replaces it once part of it is on the device.
    let v2 = write(2, example_model_of_size(2, size));
    let v3 = write(3, example_model_fine_tuned(2, size, 3));
    let shared: u64 = v3
        .chunks
        .iter()
        .zip(v3.parts()[0].spans())
        .filter(|(c, _)| v2.chunks.contains(c))
        .map(|(_, s)| u64::from(s.len))
        .sum();
    assert!(shared * 10 >= v3.size * 9, "v3 shares most of v2");
    let slow = DownloadPolicy {
        max_rate: Some(MIB),
        ..DownloadPolicy::default()
    };
    fleet.deploy_policy("classifier", 2, "*", slow);
    let received = wait_for("half of v2 on the device", Duration::from_secs(60), || {
        let u = fleet
            .report("edge-1")?
            .models
            .remove("classifier")?
            .update?;
        (u.version == 2 && u.received_bytes * 2 >= u.total_bytes).then_some(u.received_bytes)
    });
    let sent = || fleet.client.status().unwrap().chunk_requests.raw_bytes;
    let before = sent();
    fleet.deploy("classifier", 3, "*");
    fleet.wait_serving("edge-1", "classifier", 3);
    assert_eq!(agent.check_golden(&v3), "3");
    let travelled = sent() - before;
    let reused = agent.metric(REUSED).unwrap_or(0.0) as u64;
    println!(
        "v2 had {received} of {} bytes when v3 replaced it: {reused} reused, {travelled} of {} sent for v3",
        v2.size, v3.size
    );
    // What v2 had received of the tensors v3 shares came from its partial file (a report
    // lags the download, so at least that much).
    assert!(
        reused >= received.min(shared) / 2,
        "{reused} reused of {received} received"
    );
    assert!(reused + travelled >= v3.size);
    assert!(
        travelled < v3.size - received / 2,
        "{travelled} sent: the partial download was not reused"
    );
}
