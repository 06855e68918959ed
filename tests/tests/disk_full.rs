//! A full disk: the device's state directory is a small tmpfs this test mounts (as root, the
//! way CI runs; the test says so and fails otherwise). An update larger than the free space is
//! rejected when its download starts, with the sizes in the reason; nothing of it stays on
//! disk; the old model keeps answering; a later update that fits installs; superseded
//! artifacts are collected.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use modelcast_ops::onnx::example_model_of_size;
use modelcast_tests::{wait_for, Fleet};

const MIB: u64 = 1024 * 1024;

/// A tmpfs of `size` bytes at `dir`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: u64) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "this test mounts a tmpfs and needs root (CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.into())
    }

    /// Bytes in use.
    fn used(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=used", "-B1"])
            .arg(&self.0)
            .output()
            .expect("df");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df output")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The artifact files (complete and partial) in the store, not the manifests kept beside
/// them.
fn artifact_files(store: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(store.join("store").join("artifacts"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| !name.ends_with(".manifest"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn an_update_that_does_not_fit_is_rejected_and_the_old_model_serves() {
    let fleet = Fleet::embedded();
    let store = fleet.dir.path().join("edge-1");
    let disk = Tmpfs::mount(&store, 24 * MIB);
    // No probation: each version commits at once, so the next one may replace the other slot.
    let no_trial = "[probation]\nrequests = 0\nseconds = 0\n";
    let agent = fleet.start_agent_with("edge-1", &[("site", "lab")], no_trial);
    fleet.wait_registered();
    let v1 = fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);
    let used_before = disk.used();

    // v2: 32 MiB on a 24 MiB disk.
    let path = fleet.dir.path().join("v2.onnx");
    std::fs::write(&path, example_model_of_size(2, 32 * MIB)).unwrap();
    fleet.publish_file(&path, "classifier", 2);
    fleet.deploy("classifier", 2, "*");
    let reason = fleet.wait_error("edge-1", "not enough disk space");
    assert!(reason.contains("MiB are free"), "{reason}");
    let error = fleet.report("edge-1").unwrap().last_error.unwrap();
    assert_eq!(error.version, Some(2), "{error:?}");
    assert_eq!(agent.check_golden(&v1), "1");
    // Nothing of v2 is left: no partial file, the space is back.
    let files = artifact_files(&store);
    assert_eq!(files, vec![v1.sha256.clone()], "{files:?}");
    let used_after = disk.used();
    assert!(
        used_after < used_before + 2 * MIB,
        "{used_before} bytes used before the update, {used_after} after"
    );

    // v3 fits; then v4 replaces v1's slot, and v1's artifact is collected.
    let v3 = fleet.publish_example(3, 16 * 1024);
    fleet.deploy("classifier", 3, "*");
    fleet.wait_serving("edge-1", "classifier", 3);
    assert_eq!(agent.check_golden(&v3), "3");
    let v4 = fleet.publish_example(4, 16);
    fleet.deploy("classifier", 4, "*");
    fleet.wait_serving("edge-1", "classifier", 4);
    assert_eq!(agent.check_golden(&v4), "4");
    let mut live = vec![v3.sha256.clone(), v4.sha256.clone()];
    live.sort();
    let files = wait_for("v1's artifact collected", Duration::from_secs(10), || {
        let files = artifact_files(&store);
        (files == live).then_some(files)
    });
    assert_eq!(files.len(), 2);

    // v5: another process has filled the disk but for v5's size (and 64 KiB). Its download
    // reserves exactly what is left, so the disk is full while the chunks land and while the
    // store records the result: the update either completes or fails with a reason, and a
    // verified model answers either way.
    let v5 = fleet.publish_example(5, 64 * 1024);
    let free = 24 * MIB - disk.used();
    let filler = store.join("filler");
    let fill = free.saturating_sub(v5.size + 64 * 1024);
    std::fs::write(&filler, vec![0xA5u8; fill as usize]).unwrap();
    eprintln!(
        "disk: {free} bytes free, {fill} of filler, v5 is {} bytes",
        v5.size
    );
    fleet.deploy("classifier", 5, "*");
    let outcome = wait_for("v5 installed or rejected", Duration::from_secs(60), || {
        let report = fleet.report("edge-1")?;
        if report.models.get("classifier")?.serving_version() == Some(5) {
            return Some(Ok(()));
        }
        let e = report.last_error?;
        (e.version == Some(5)).then_some(Err(e.reason))
    });
    eprintln!("disk full during the download: {outcome:?}");
    match outcome {
        Ok(()) => assert_eq!(agent.check_golden(&v5), "5"),
        Err(_) => assert_eq!(agent.check_golden(&v4), "4"),
    }
    drop(agent);
}
