//! The damaged-store matrix: a device serving version 2 of a model (version 1 in its other
//! slot) is stopped, one part of its store is damaged — flipped bytes, truncated, deleted or
//! zeroed × the serving artifact, the fallback artifact (the other slot's), every artifact,
//! sled's database file, sled's `conf` — and it
//! is started again with the fleet server reachable. Every time, the agent must start (never
//! exit on a damaged store), and at once either serve a verified model (with that version's
//! exact answer) or say truthfully that it cannot (`/v2/health/ready` 503, no answer claimed);
//! then it must recover by itself: version 2 serves again, every slot it reports is a whole
//! artifact. Lost artifacts are reported to the fleet with the reason.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use modelcast_proto::manifest::Manifest;
use modelcast_tests::{wait_for, Agent, Fleet};

/// Trials commit after one second.
const PROBATION: &str = "[probation]\nrequests = 100000\nseconds = 1\nmax_p99_ratio = 1000.0\n";

#[derive(Debug, Clone, Copy)]
enum Damage {
    Flip,
    Truncate,
    Delete,
    Zero,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    SledDb,
    SledConf,
    ServingArtifact,
    /// The other slot's artifact (version 1, what a fleet rollback returns to).
    FallbackArtifact,
    EveryArtifact,
}

fn damage(path: &Path, how: Damage) {
    let Ok(mut bytes) = std::fs::read(path) else {
        return; // Already gone (an earlier case lost it for good).
    };
    match how {
        Damage::Flip => {
            // 64 bytes spread over the file.
            let len = bytes.len().max(1);
            for k in 0..64 {
                let i = (k * len / 64 + k * 31) % len;
                if let Some(b) = bytes.get_mut(i) {
                    *b ^= 0x5a;
                }
            }
            std::fs::write(path, &bytes).unwrap();
        }
        Damage::Truncate => std::fs::write(path, &bytes[..bytes.len() / 2]).unwrap(),
        Damage::Delete => std::fs::remove_file(path).unwrap(),
        Damage::Zero => {
            bytes.fill(0);
            std::fs::write(path, &bytes).unwrap();
        }
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The files of `target` in the store under `store`.
fn files(store: &Path, target: Target, serving: &Manifest, fallback: &Manifest) -> Vec<PathBuf> {
    let artifacts = store.join("artifacts");
    match target {
        Target::SledDb => vec![store.join("sled/db")],
        Target::SledConf => vec![store.join("sled/conf")],
        Target::ServingArtifact => vec![artifacts.join(&serving.sha256)],
        Target::FallbackArtifact => vec![artifacts.join(&fallback.sha256)],
        Target::EveryArtifact => std::fs::read_dir(&artifacts)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy();
                name.len() == 64 && name.chars().all(|c| c.is_ascii_hexdigit())
            })
            .collect(),
    }
}

/// Right after the restart: either a verified answer (exactly one of the two versions'), or a
/// truthful "not ready".
fn serves_verified_or_says_not(agent: &Agent, versions: &[&Manifest], case: &str) -> String {
    let ready = ureq::get(format!(
        "http://127.0.0.1:{}/v2/health/ready",
        agent_port(agent)
    ))
    .call()
    .is_ok();
    let golden = &versions[0].golden[0];
    match agent.infer("classifier", &golden.inputs) {
        Ok((version, got)) => {
            assert!(ready, "{case}: answers but says it is not ready");
            let manifest = versions
                .iter()
                .find(|m| m.version.to_string() == version)
                .unwrap_or_else(|| panic!("{case}: answer from unknown v{version}"));
            // Each version's own answer to the shared input.
            let want = expected(manifest, &golden.inputs);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-4, "{case}: v{version} answered {got:?}");
            }
            format!("served v{version}")
        }
        Err(e) => {
            assert!(!ready, "{case}: ready but fails: {e}");
            "not ready (503)".into()
        }
    }
}

fn expected(manifest: &Manifest, inputs: &[modelcast_proto::manifest::TensorData]) -> Vec<f64> {
    let onnx = std::fs::read(onnx_path(manifest.version)).unwrap();
    modelcast_tests::reference_output(&onnx, manifest, inputs)
}

fn onnx_path(version: u64) -> PathBuf {
    std::env::temp_dir().join(format!(
        "modelcast-damaged-store-{}-v{version}.onnx",
        std::process::id()
    ))
}

fn agent_port(agent: &Agent) -> u16 {
    agent.http_port
}

#[test]
fn a_damaged_store_serves_a_verified_model_or_says_it_cannot_and_heals() {
    let fleet = Fleet::embedded();
    let store = fleet.dir.path().join("edge-1/store");
    let mut agent = fleet.start_agent_with("edge-1", &[], PROBATION);
    fleet.wait_registered();
    let mut published = Vec::new();
    for version in [1, 2] {
        let onnx = modelcast_ops::onnx::example_model_of_size(version, 256 * 1024);
        std::fs::write(onnx_path(version), &onnx).unwrap();
        published.push(fleet.publish_file(&onnx_path(version), "classifier", version));
        fleet.deploy("classifier", version, "*");
        fleet.wait_serving("edge-1", "classifier", version);
    }
    let (v1, v2) = (&published[0], &published[1]);
    // Committed, with version 1 in the other slot.
    wait_for("v2 committed", Duration::from_secs(30), || {
        let model = fleet.report("edge-1")?.models.remove("classifier")?;
        (model
            .update
            .is_none_or(|u| u.phase == modelcast_proto::report::Phase::Active)
            && model.a.is_some()
            && model.b.is_some())
        .then_some(())
    });

    let mut table = Vec::new();
    let mut rebuilds_before = 0.0;
    for target in [
        Target::SledDb,
        Target::SledConf,
        Target::ServingArtifact,
        Target::FallbackArtifact,
        Target::EveryArtifact,
    ] {
        for how in [Damage::Flip, Damage::Truncate, Damage::Delete, Damage::Zero] {
            let case = format!("{how:?} × {target:?}");
            agent.stop();
            // Files an earlier case lost for good (the fallback, which no desired state
            // names again) cannot be damaged twice.
            let present: Vec<PathBuf> = files(&store, target, v2, v1)
                .into_iter()
                .filter(|p| p.exists())
                .collect();
            for path in &present {
                damage(path, how);
            }
            // Reports carry Unix seconds: the restart is in a later second than anything the
            // stopped agent reported, so that its last report cannot pass for a new one.
            let stopped = unix_now();
            wait_for("the next second", Duration::from_secs(5), || {
                (unix_now() > stopped).then_some(())
            });
            let restarted = unix_now();
            agent.start(); // Panics if the API never answers (the agent exited).
            let at_start = serves_verified_or_says_not(&agent, &[v2, v1], &case);
            // Heals: version 2 serves again, reported after the restart, slots whole.
            let healed = std::time::Instant::now();
            wait_for(
                &format!("{case}: v2 serves again"),
                Duration::from_secs(60),
                || {
                    let report = fleet.report("edge-1")?;
                    let model = report.models.get("classifier")?;
                    (report.at >= restarted
                        && model.serving_version() == Some(2)
                        && model
                            .update
                            .as_ref()
                            .is_none_or(|u| u.phase == modelcast_proto::report::Phase::Active))
                    .then_some(())
                },
            );
            assert_eq!(agent.check_golden(v2), "2", "{case}");
            let report = fleet.report("edge-1").unwrap();
            let model = &report.models["classifier"];
            for slot in [&model.a, &model.b].into_iter().flatten() {
                let bytes = std::fs::read(store.join("artifacts").join(&slot.sha256))
                    .unwrap_or_else(|e| panic!("{case}: slot v{} has no file: {e}", slot.version));
                assert_eq!(
                    modelcast_proto::sha256_hex(&bytes),
                    slot.sha256,
                    "{case}: slot v{} damaged",
                    slot.version
                );
            }
            let told = report.last_error.map(|e| e.reason).unwrap_or_default();
            if !present.is_empty()
                && matches!(
                    target,
                    Target::ServingArtifact | Target::FallbackArtifact | Target::EveryArtifact
                )
            {
                assert!(
                    told.contains("lost on disk"),
                    "{case}: the fleet was not told: {told:?}"
                );
            }
            let lost = agent
                .metric("modelcast_artifacts_lost_total")
                .unwrap_or(0.0);
            let rebuilds = agent.metric("modelcast_store_rebuilds").unwrap_or(0.0);
            if rebuilds > rebuilds_before {
                assert!(
                    told.contains("store database"),
                    "{case}: rebuilt, but the fleet was not told: {told:?}"
                );
            }
            rebuilds_before = rebuilds;
            table.push(format!(
                "{case:<28} at start: {at_start:<16} healed in {:>5.1} s; lost {lost}, rebuilds {rebuilds}; told: {}",
                healed.elapsed().as_secs_f64(),
                told.chars().take(90).collect::<String>()
            ));
        }
    }
    for line in &table {
        eprintln!("damaged store: {line}");
    }
    for version in [1, 2] {
        let _ = std::fs::remove_file(onnx_path(version));
    }
}
