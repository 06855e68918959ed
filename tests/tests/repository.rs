//! The signed repository stays small as it grows. Versions live in hash bins
//! (`modelcast_proto::bins`): a publish re-signs one bin, a device receives the top-level
//! targets and the bins of its own models. 1,000 published versions keep both under stated
//! bounds; a retired version removed with `modelcast retire --remove` leaves the metadata, and
//! one still deployed cannot be removed.

use std::time::{Duration, Instant};

use modelcast_proto::metadata::{Signed, Targets};
use modelcast_proto::verify::fixture;
use modelcast_tests::{bin, desired_topic, wait_for, Fleet, Rogue};

/// Versions published.
const VERSIONS: u64 = 1000;
/// Bound on one publish request (the re-signed bin and who publishes).
const PUBLISH_BOUND: usize = 16 * 1024;
/// Bound on one device's desired state (root chain, timestamp, snapshot of 256 bins,
/// top-level targets, its bin, the director's targets).
const DESIRED_BOUND: usize = 64 * 1024;

/// The retained desired state of `device`, as the broker holds it.
fn desired_bytes(fleet: &Fleet, device: &str) -> Vec<u8> {
    let rogue = Rogue::connect(fleet.mqtt_port, None);
    assert!(rogue.subscribe(&desired_topic(device)));
    wait_for(
        "the retained desired state",
        Duration::from_secs(20),
        || rogue.seen().pop().map(|(_, payload)| payload),
    )
}

/// Every document a device would need without bins: the top-level targets and every bin.
fn whole_repository_bytes(fleet: &Fleet) -> usize {
    let top = fleet.client.targets().unwrap().unwrap();
    let doc: Targets = top.parse("targets").unwrap();
    let succinct = doc.delegations.unwrap().succinct_roles.unwrap();
    let mut total = top.to_vec().len();
    for bin in 0..(1u32 << succinct.bit_length) {
        if let Some(d) = fleet
            .client
            .delegated_targets(&succinct.role_name(bin))
            .unwrap()
        {
            total += d.to_vec().len();
        }
    }
    total
}

#[test]
fn a_thousand_versions_keep_a_publish_and_a_devices_metadata_small() {
    let fleet = Fleet::embedded();
    let _agent = fleet.start_agent_with("edge-1", &[("site", "lab")], "");
    fleet.wait_registered();
    // 1,000 versions of ten models, each a small artifact, published as `modelcast publish`
    // does (upload, verified repository, one bin signed), as fast as the API takes them.
    let mut largest_publish = 0;
    let mut times = Vec::new();
    for v in 1..=VERSIONS {
        let bytes = format!("artifact of version {v}").into_bytes();
        let m = fixture::manifest(&format!("m{}", v % 10), v, &bytes, 64);
        let started = Instant::now();
        fleet
            .client
            .upload(&m.sha256, m.chunk_size, &bytes)
            .unwrap();
        largest_publish = largest_publish.max(fleet.publish_manifest(&m, v.checked_sub(10)));
        times.push(started.elapsed());
    }
    let median = |t: &[Duration]| {
        let mut t = t.to_vec();
        t.sort();
        t[t.len() / 2]
    };
    let (first, last) = (median(&times[..100]), median(&times[times.len() - 100..]));

    // A real model on the device, among them.
    fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "site=lab");
    fleet.wait_serving("edge-1", "classifier", 1);
    let desired = desired_bytes(&fleet, "edge-1");
    let whole = whole_repository_bytes(&fleet);
    println!(
        "{VERSIONS} versions: largest publish request {largest_publish} B (bound {PUBLISH_BOUND}), \
         device desired state {} B (bound {DESIRED_BOUND}); all targets metadata {whole} B; \
         median publish {:.1} ms for the first 100, {:.1} ms for the last 100 (debug build)",
        desired.len(),
        first.as_secs_f64() * 1e3,
        last.as_secs_f64() * 1e3,
    );
    assert!(largest_publish <= PUBLISH_BOUND, "{largest_publish}");
    assert!(desired.len() <= DESIRED_BOUND, "{}", desired.len());
    // What the bins save: the whole history would be many times a device's share.
    assert!(whole > 8 * desired.len(), "{whole} vs {}", desired.len());
}

#[test]
fn a_retired_version_leaves_the_repository_unless_a_device_is_meant_to_run_it() {
    let fleet = Fleet::embedded();
    let _agent = fleet.start_agent_with("edge-1", &[("site", "lab")], "");
    fleet.wait_registered();
    fleet.publish_example(1, 16);
    let v2 = fleet.publish_example(2, 16);
    fleet.deploy("classifier", 1, "site=lab");
    fleet.wait_serving("edge-1", "classifier", 1);

    let cli = |args: &[&str]| {
        std::process::Command::new(bin("modelcast"))
            .args(["--server", fleet.client.base()])
            .args(args)
            .args(["--keys", fleet.keys.to_str().unwrap()])
            .args(["--by", "carol"])
            .output()
            .expect("modelcast")
    };
    let bin_of = |path: &str| -> String {
        let top = fleet.client.targets().unwrap().unwrap();
        let top: Targets = top.parse("targets").unwrap();
        modelcast_proto::bins::bin_for(&top, path).unwrap()
    };
    let in_repository = |path: &str| -> bool {
        let role = bin_of(path);
        let bin: Option<Signed> = fleet.client.delegated_targets(&role).unwrap();
        bin.is_some_and(|b| {
            b.parse::<Targets>("targets")
                .unwrap()
                .targets
                .contains_key(path)
        })
    };
    assert!(in_repository(&v2.target_path()));
    let out = cli(&[
        "retire",
        "--model",
        "classifier",
        "--version",
        "2",
        "--remove",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!in_repository(&v2.target_path()));
    let history = fleet.client.model_history("classifier").unwrap();
    let stage = |v: u64| {
        history
            .iter()
            .find(|h| h.entry.manifest.version == v)
            .map(|h| h.entry.stage)
    };
    assert_eq!(stage(2), Some(modelcast_server::db::Stage::Retired));

    // The deployed version stays, and the device keeps serving it on fresh metadata.
    let out = cli(&[
        "retire",
        "--model",
        "classifier",
        "--version",
        "1",
        "--remove",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("still meant to run on device edge-1"), "{err}");
    assert!(in_repository("models/classifier/1.nnef.tar"));

    // A yearly re-signing touches every bin; devices go on updating over it.
    let version_of_bin = || {
        let role = bin_of("models/classifier/1.nnef.tar");
        let bin = fleet.client.delegated_targets(&role).unwrap().unwrap();
        bin.signed["version"].as_u64().unwrap()
    };
    let before = version_of_bin();
    let out = cli(&["resign"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(version_of_bin(), before + 1);
    let v3 = fleet.publish_example(3, 16);
    fleet.deploy("classifier", 3, "site=lab");
    fleet.wait_serving("edge-1", "classifier", v3.version);
}
