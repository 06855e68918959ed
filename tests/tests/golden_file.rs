//! Golden vectors in a file beside the artifact (`Manifest::golden_file`): devices download
//! it after the artifact, in the same chunk numbering, and check the model against it before
//! it serves. A golden file whose answers the model does not give rejects the version with
//! the reason, and the device keeps serving the one before.

use modelcast_ops::publish::{prepare, PublishOptions};
use modelcast_proto::manifest::{Attachment, Manifest};
use modelcast_tests::Fleet;

/// Publishes the example model at `version` with its golden vector moved into a golden file;
/// `edit` may change the file's vectors first.
fn publish_with_golden_file(
    fleet: &Fleet,
    version: u64,
    edit: impl FnOnce(&mut Vec<modelcast_proto::manifest::GoldenVector>),
) -> Manifest {
    let onnx = modelcast_ops::onnx::example_model(version, 16);
    let now = modelcast_server::unix_now();
    let prepared = prepare(&onnx, &PublishOptions::new("classifier", version), now).unwrap();
    let mut manifest = prepared.manifest;
    let mut vectors = std::mem::take(&mut manifest.golden);
    assert_eq!(vectors.len(), 1);
    edit(&mut vectors);
    let file = serde_json::to_vec(&vectors).unwrap();
    manifest.golden_file = Some(Attachment::of(&file, manifest.chunk_size));
    manifest.validate().unwrap();
    let client = &fleet.client;
    client
        .upload(&manifest.sha256, manifest.chunk_size, &prepared.artifact)
        .unwrap();
    let golden = manifest.golden_file.as_ref().unwrap();
    client
        .upload(&golden.sha256, manifest.chunk_size, &file)
        .unwrap();
    fleet.publish_manifest(&manifest, Some(version - 1));
    manifest
}

#[test]
fn a_golden_file_is_downloaded_and_checked_before_the_version_serves() {
    let fleet = Fleet::embedded();
    let _agent = fleet.start_agent_with("edge-1", &[("site", "lab")], "");
    fleet.wait_registered();
    fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "site=lab");
    fleet.wait_serving("edge-1", "classifier", 1);

    // Version 2's golden file expects answers the model does not give.
    publish_with_golden_file(&fleet, 2, |vectors| {
        for t in &mut vectors[0].outputs {
            let values: Vec<f32> = t
                .values()
                .unwrap()
                .iter()
                .map(|v| *v as f32 + 1.0)
                .collect();
            *t = modelcast_proto::manifest::TensorData::from_f32(&t.name, t.shape.clone(), &values);
        }
    });
    fleet.deploy("classifier", 2, "site=lab");
    let reason = fleet.wait_error("edge-1", "golden vector 0");
    assert!(reason.contains("update rejected"), "{reason}");
    assert_eq!(
        fleet.report("edge-1").unwrap().models["classifier"].serving_version(),
        Some(1)
    );

    // Version 3's golden file is right: downloaded, checked, serving.
    let v3 = publish_with_golden_file(&fleet, 3, |_| {});
    fleet.deploy("classifier", 3, "site=lab");
    fleet.wait_serving("edge-1", "classifier", 3);
    assert!(v3.golden.is_empty() && v3.golden_file.is_some());
}
