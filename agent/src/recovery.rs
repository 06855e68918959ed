//! Opening the store when the disk was damaged: a database that fails to open or to read back
//! is moved aside (kept for forensics, counted) and rebuilt from what survives on disk; one
//! that opens but has lost records (sled reads a damaged log as a shorter history) gets the
//! same files adopted for the models it no longer knows.
//!
//! What survives: the trust state mirrored beside the database ([`Store::mirrored_trust`], or
//! the pinned root when that is gone too), and each complete artifact with the manifest the
//! device accepted it under, kept beside it ([`Store::keep_manifest`]). Each artifact is
//! hashed again against its manifest before it is adopted; the newest verified version of each
//! model serves from slot A, the one before it (if any) waits in slot B, and the version floor
//! is the newest adopted. Rolled-back versions have their manifest removed when they are rolled
//! back, so a rebuild never adopts one. A trial running when the database was lost is adopted
//! as if committed (its probation is not resumed).
//!
//! Damaged artifacts are the other half of healing, in [`crate::driver`]: a slot that does not
//! load and whose file no longer matches its digest is emptied ([`ModelRecord::lose`]) and the
//! version is downloaded again from the signed desired state.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use modelcast_proto::manifest::Manifest;
use modelcast_proto::report::Slot;
use tracing::{info, warn};

use crate::slots::ModelRecord;
use crate::store::{decode, sled_dir, Store, StoreError};

/// How the store was rebuilt at this start, for the log and the fleet.
#[derive(Debug, Clone, PartialEq)]
pub struct Rebuilt {
    /// Why: what failed when the database was opened or read back.
    pub reason: String,
    /// Where the damaged database was moved (`None` when there was nothing to move: the
    /// database was missing or empty while artifacts were on disk).
    pub kept_at: Option<PathBuf>,
    /// The versions adopted from the artifact files, by model.
    pub adopted: Vec<(String, u64)>,
    /// Rebuilds of this store so far, this one included.
    pub rebuilds: u64,
}

impl Rebuilt {
    /// One line for the device's error report.
    pub fn describe(&self) -> String {
        let adopted = if self.adopted.is_empty() {
            "no verified artifact".to_string()
        } else {
            let names: Vec<String> = self
                .adopted
                .iter()
                .map(|(name, v)| format!("{name} v{v}"))
                .collect();
            names.join(", ")
        };
        match &self.kept_at {
            Some(at) => format!(
                "store database damaged ({}): moved aside to {}, rebuilt from {adopted}",
                self.reason,
                at.display()
            ),
            None => format!("store database {}: adopted {adopted}", self.reason),
        }
    }
}

/// The counter of rebuilds, a file beside the database (which a rebuild replaces).
const REBUILDS: &str = "rebuilds";

/// Opens the store in `dir`, rebuilding it if its database is damaged. Fails only when the
/// store is busy ([`StoreError::Locked`]) or the disk refuses the fresh database.
///
/// sled does not always say its file was damaged: flipped or zeroed bytes in its log can read
/// back as a shorter history (sled takes them for a write torn by a power cut). So whatever the
/// database opens with, a model it has no record of is adopted from the verified artifact
/// files, and a trust state older than its mirror is replaced by the mirror.
pub fn open(dir: &Path) -> Result<(Store, Option<Rebuilt>), StoreError> {
    let damage = match Store::open(dir) {
        Ok(store) => match store.check() {
            Ok(()) => return heal(store, dir, None),
            Err(e) => e.to_string(),
        },
        Err(e @ StoreError::Locked { .. }) => return Err(e),
        Err(e) => e.to_string(),
    };
    warn!(reason = %damage, "store database damaged; moving it aside and rebuilding");
    let kept_at = move_aside(dir)?;
    let store = Store::open(dir)?;
    heal(store, dir, Some((damage, kept_at)))
}

/// Fills in what the database lacks from the files beside it; `damaged` says why and where
/// the old database went when this is a fresh one.
fn heal(
    store: Store,
    dir: &Path,
    damaged: Option<(String, PathBuf)>,
) -> Result<(Store, Option<Rebuilt>), StoreError> {
    if let Some(mirror) = store.mirrored_trust() {
        let newer =
            |t: &modelcast_proto::verify::TrustState| (t.timestamp_version, t.director_version);
        if store.trust()?.is_none_or(|t| newer(&t) < newer(&mirror)) {
            info!("trust state restored from its mirror");
            store.set_trust(&mirror)?;
        }
    }
    let adopted = adopt(&store)?;
    let rebuilt = match damaged {
        Some((reason, kept_at)) => Rebuilt {
            reason,
            kept_at: Some(kept_at),
            adopted,
            rebuilds: count_rebuild(dir),
        },
        None if !adopted.is_empty() => Rebuilt {
            reason: "had lost the records of models on disk".into(),
            kept_at: None,
            adopted,
            rebuilds: count_rebuild(dir),
        },
        None => return Ok((store, None)),
    };
    Ok((store, Some(rebuilt)))
}

/// Moves the database aside as `sled.damaged` (one kept: an older one is removed first).
fn move_aside(dir: &Path) -> Result<PathBuf, StoreError> {
    let from = sled_dir(dir);
    let to = dir.join("sled.damaged");
    let io = |path: &Path, source| StoreError::Io {
        path: path.display().to_string(),
        source,
    };
    match std::fs::remove_dir_all(&to) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&to, e)),
        _ => {}
    }
    std::fs::rename(&from, &to).map_err(|e| io(&from, e))?;
    Ok(to)
}

/// Adopts, for each model the database has no record of, its verified artifact files: the
/// newest version serves, the one before waits in the other slot. Returns what was adopted.
fn adopt(store: &Store) -> Result<Vec<(String, u64)>, StoreError> {
    let known: Vec<String> = store.models()?.into_iter().map(|(name, _)| name).collect();
    let mut versions: BTreeMap<String, Vec<Manifest>> = BTreeMap::new();
    for bytes in store.kept_manifests()? {
        let manifest: Manifest = match decode("kept manifest", &bytes) {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "kept manifest does not decode; skipped");
                continue;
            }
        };
        if known.contains(&manifest.name) {
            continue;
        }
        match store.verify_artifact(&manifest) {
            Ok(()) => versions
                .entry(manifest.name.clone())
                .or_default()
                .push(manifest),
            Err(e) => {
                warn!(model = %manifest.name, version = manifest.version, error = %e, "artifact not adopted");
                store.forget_manifest(&manifest.sha256)?;
            }
        }
    }
    let mut adopted = Vec::new();
    for (name, mut manifests) in versions {
        manifests.sort_by_key(|m| std::cmp::Reverse(m.version));
        manifests.dedup_by_key(|m| m.version);
        let mut newest = manifests.into_iter();
        let record = records(newest.next(), newest.next());
        if let Some(m) = record.serving() {
            info!(model = %name, version = m.version, "adopted from the artifact files");
            adopted.push((name.clone(), m.version));
        }
        store.put_model(&name, &record)?;
    }
    store.flush_blocking()?;
    Ok(adopted)
}

/// The record of a rebuilt model: the newest version serves from A, the one before waits in B.
fn records(newest: Option<Manifest>, before: Option<Manifest>) -> ModelRecord {
    ModelRecord {
        active: newest.as_ref().map(|_| Slot::A),
        highest_version: newest.as_ref().map_or(0, |m| m.version),
        a: newest,
        b: before,
        ..ModelRecord::default()
    }
}

/// Adds one to the rebuild counter beside the database; returns the count.
fn count_rebuild(dir: &Path) -> u64 {
    let path = dir.join(REBUILDS);
    let count = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0)
        .saturating_add(1);
    if let Err(e) = crate::artifacts::write_atomically(&path, count.to_string().as_bytes()) {
        warn!(error = %e, "rebuild counter not written");
    }
    count
}

/// Rebuilds of the store in `dir` so far.
pub fn rebuilds(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join(REBUILDS))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(version: u64, bytes: &[u8]) -> Manifest {
        modelcast_proto::verify::fixture::manifest("m", version, bytes, 64)
    }

    fn trust() -> modelcast_proto::verify::TrustState {
        let keys = modelcast_proto::verify::fixture::Keys::from_seed(7);
        modelcast_proto::verify::TrustState::from_root(keys.root("2035-01-01T00:00:00Z")).unwrap()
    }

    /// Stores `bytes` as a complete artifact accepted under `m`.
    fn accept(store: &Store, m: &Manifest, bytes: &[u8]) {
        store.set_pending(m).unwrap();
        for (i, c) in bytes.chunks(64).enumerate() {
            store.put_chunk(m, i as u32, c).unwrap();
        }
        store.verify_artifact(m).unwrap();
        store.keep_manifest(m).unwrap();
        store.clear_pending(&m.name).unwrap();
    }

    /// [`open`] once the dropped store's sled threads let go of its lock (at most ten
    /// seconds: slow under emulation).
    fn reopen(dir: &Path) -> (Store, Option<Rebuilt>) {
        for _ in 0..100 {
            match open(dir) {
                Err(StoreError::Locked { .. }) => {
                    std::thread::sleep(std::time::Duration::from_millis(100))
                }
                other => return other.unwrap(),
            }
        }
        panic!("the store's lock was still held ten seconds after it was dropped");
    }

    /// A store serving version 2 of `m` with version 1 in the other slot.
    fn two_versions(dir: &Path) -> (Vec<u8>, Vec<u8>) {
        let (one, two) = (vec![1u8; 300], vec![2u8; 300]);
        let store = Store::open(dir).unwrap();
        accept(&store, &manifest(1, &one), &one);
        accept(&store, &manifest(2, &two), &two);
        let mut record = ModelRecord::default();
        record.install(Slot::A, manifest(1, &one), false).unwrap();
        record.install(Slot::B, manifest(2, &two), false).unwrap();
        store.put_model("m", &record).unwrap();
        store.set_trust(&trust()).unwrap();
        store.flush_blocking().unwrap();
        (one, two)
    }

    #[test]
    fn a_healthy_store_opens_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        two_versions(dir.path());
        let (store, rebuilt) = reopen(dir.path());
        assert_eq!(rebuilt, None);
        assert_eq!(
            store
                .model("m")
                .unwrap()
                .unwrap()
                .serving()
                .unwrap()
                .version,
            2
        );
    }

    #[test]
    fn a_damaged_database_is_moved_aside_and_rebuilt_from_the_verified_artifacts() {
        let dir = tempfile::tempdir().unwrap();
        let (_, two) = two_versions(dir.path());
        std::fs::write(sled_dir(dir.path()).join("conf"), b"garbage\0\xff").unwrap();
        let (store, rebuilt) = reopen(dir.path());
        let rebuilt = rebuilt.expect("rebuilt");
        assert_eq!(rebuilt.adopted, vec![("m".to_string(), 2)]);
        assert_eq!(rebuilt.rebuilds, 1);
        assert!(
            dir.path().join("sled.damaged").join("conf").exists(),
            "kept"
        );
        assert!(
            rebuilt.describe().contains("moved aside"),
            "{}",
            rebuilt.describe()
        );
        let record = store.model("m").unwrap().unwrap();
        assert_eq!(record.serving().unwrap().version, 2);
        assert_eq!(record.slot(Slot::B).unwrap().version, 1);
        assert_eq!(record.highest_version, 2, "the floor survives");
        assert_eq!(store.trust().unwrap(), Some(trust()), "from the mirror");
        let mut read = Vec::new();
        std::io::Read::read_to_end(
            &mut store.artifact_reader(&manifest(2, &two)).unwrap(),
            &mut read,
        )
        .unwrap();
        assert_eq!(read, two);
        drop(store);
        // A second rebuild replaces the kept copy and counts.
        std::fs::write(sled_dir(dir.path()).join("conf"), [0u8; 64]).unwrap();
        let (_, rebuilt) = reopen(dir.path());
        assert_eq!(rebuilt.unwrap().rebuilds, 2);
        assert_eq!(rebuilds(dir.path()), 2);
    }

    #[test]
    fn a_deleted_database_adopts_the_artifacts_but_not_a_damaged_one() {
        let dir = tempfile::tempdir().unwrap();
        let (_, two) = two_versions(dir.path());
        // Version 2's bytes damaged: only version 1 is adopted, and its floor is 1.
        let file = dir.path().join("artifacts").join(manifest(2, &two).sha256);
        std::fs::write(&file, vec![9u8; 300]).unwrap();
        std::fs::remove_dir_all(sled_dir(dir.path())).unwrap();
        let (store, rebuilt) = reopen(dir.path());
        let rebuilt = rebuilt.expect("rebuilt");
        assert_eq!(
            (rebuilt.kept_at, rebuilt.adopted),
            (None, vec![("m".to_string(), 1)])
        );
        let record = store.model("m").unwrap().unwrap();
        assert_eq!(
            (record.serving().unwrap().version, record.b.clone()),
            (1, None)
        );
        assert_eq!(
            store.kept_manifests().unwrap().len(),
            1,
            "the damaged one forgotten"
        );
    }
}
