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
//! Damaged artifacts are the other half of healing, in `restore` (which loads what the store
//! holds at start-up, before the network is touched): a slot that does not load and whose file
//! no longer matches its digest is emptied ([`ModelRecord::lose`]) and the version is
//! downloaded again from the signed desired state.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use modelcast_proto::manifest::Manifest;
use modelcast_proto::report::Slot;
use tracing::{info, warn};

use crate::config::EngineConfig;
use crate::engine::LoadedModel;
use crate::metrics::Metrics;
use crate::probation::ProbationPolicy;
use crate::serve::Models;
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
    let count = rebuilds(dir).saturating_add(1);
    let path = dir.join(REBUILDS);
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

// ---- start-up: loading what the store holds ----

/// What start-up found: every stored record (and whether it serves), trials to resume (with
/// the last good model to swap back to, unless it does not fit in memory beside the trial),
/// rollbacks it made, versions whose bytes were lost on disk, models of which nothing loads,
/// and downloads to resume.
#[derive(Default)]
pub(crate) struct Restored {
    pub(crate) records: Vec<(String, ModelRecord, bool)>,
    pub(crate) trials: Vec<(String, Option<Arc<LoadedModel>>)>,
    pub(crate) rolled_back: Vec<(String, u64, String)>,
    pub(crate) lost: Vec<(String, u64, String)>,
    pub(crate) unloadable: Vec<(String, u64, String)>,
    pub(crate) downloads: Vec<(Manifest, Vec<bool>)>,
}

/// Why a stored slot did not load.
#[derive(Debug, thiserror::Error)]
enum SlotLoadError {
    /// The slot holds nothing.
    #[error("empty slot")]
    Empty,
    /// The artifact could not be read back from the store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The engine refused the bytes it read.
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    /// Staged again (`[engine] backend = "auto"`), no backend passed.
    #[error("staging: {0}")]
    Staging(String),
}

fn load_slot(
    store: &Store,
    record: &ModelRecord,
    slot: Slot,
    engine: &EngineConfig,
) -> Result<LoadedModel, SlotLoadError> {
    let manifest = record.slot(slot).ok_or(SlotLoadError::Empty)?;
    if engine.backend == crate::config::Backend::Auto {
        // Measured again, as at staging: the choice is not kept across restarts.
        let golden = store.golden_file(manifest)?;
        let open = || store.artifact_reader(manifest);
        return crate::engine::stage(manifest, slot, open, &golden, engine)
            .map(|(model, _)| model)
            .map_err(|f| SlotLoadError::Staging(f.reason));
    }
    let mut reader = store.artifact_reader(manifest)?;
    Ok(LoadedModel::load_on(manifest, slot, &mut reader, engine)?)
}

/// Loads the serving model of every stored model and finds the downloads to resume. A trial
/// that has been active through too many start-ups (crashes) is rolled back first. A slot that
/// does not load is checked against its digest: if its bytes are gone or damaged the slot is
/// emptied ([`ModelRecord::lose`]) so that the desired state installs the version again;
/// either way the other slot is tried. The slots not loaded (the fallbacks) are hashed later,
/// in the background ([`check_fallbacks`]). Runs before the network is touched: offline first.
pub(crate) fn restore(
    store: &Store,
    models: &Models,
    metrics: &Metrics,
    policy: &ProbationPolicy,
    engine: &EngineConfig,
) -> Result<Restored, StoreError> {
    let mut restored = Restored::default();
    let pins = store.pins()?;
    for (name, mut record) in store.models()? {
        let engine = &engine.pinned(pins.get(&name).copied());
        if record.trial.is_some() {
            let version = record.serving().map_or(0, |m| m.version);
            if let Some(reason) = record.start_up(policy.max_trial_boots) {
                warn!(model = %name, version, "trial crash loop; rolling back");
                restored.rolled_back.push((name.clone(), version, reason));
                if let Some(failed) = &record.failed {
                    store.forget_manifest(failed)?;
                }
            }
            store.put_model(&name, &record)?;
            store.flush_blocking()?;
        }
        let Some(active) = record.active else {
            restored.records.push((name, record, false));
            continue;
        };
        let found = record.clone();
        let mut served = None;
        for slot in [active, active.other()] {
            let Some(manifest) = record.slot(slot).cloned() else {
                continue;
            };
            match load_slot(store, &record, slot, engine) {
                Ok(model) => {
                    // What the device accepted, kept beside the artifact for a rebuild.
                    store.keep_manifest_once(&manifest)?;
                    served = Some(model);
                    break;
                }
                Err(e) => {
                    warn!(model = %name, %slot, error = %e, "stored model does not load");
                    if let Err(damage) = store.verify_artifact(&manifest) {
                        warn!(model = %name, %slot, version = manifest.version, error = %damage, "stored artifact lost; it will be downloaded again");
                        metrics.artifact_lost();
                        record.lose(slot);
                        restored.lost.push((
                            name.clone(),
                            manifest.version,
                            format!(
                                "version {} of {name} (slot {slot}) lost on disk: {damage}; \
                                 downloading it again",
                                manifest.version
                            ),
                        ));
                    } else if record.active == Some(slot) {
                        restored.unloadable.push((
                            name.clone(),
                            manifest.version,
                            format!("version {} of {name} does not load: {e}", manifest.version),
                        ));
                    }
                }
            }
        }
        let served = match served {
            Some(model) => {
                let (slot, version) = (model.slot(), model.manifest().version);
                info!(model = %name, version, %slot, "serving from store");
                metrics.serving(&name, slot, version);
                models.swap_in(Arc::new(model));
                if record.active != Some(slot) {
                    warn!(model = %name, "active slot failed to load; fell back to the other slot");
                    let tried = record.serving().map_or(0, |m| m.version);
                    if record.roll_back().is_some() {
                        restored.rolled_back.push((
                            name.clone(),
                            tried,
                            format!("rolled back: version {tried} on trial no longer loads"),
                        ));
                    } else {
                        record.active = Some(slot);
                    }
                }
                true
            }
            None => {
                warn!(model = %name, "no stored slot loads; nothing serves this model");
                false
            }
        };
        if served {
            if let Some(trial) = record.trial {
                // On a device too small for two, the last good version stays on disk: a
                // rollback loads it in the trial's place (the low-memory swap).
                let need = record.slot(trial.previous).and_then(|m| m.memory_bytes);
                let plan = crate::memory::plan(need, crate::memory::available(), Some(None), true);
                if engine.low_memory_swap && plan != crate::memory::Plan::Beside {
                    info!(model = %name, "the last good version is not loaded beside the trial (low memory); a rollback loads it in its place");
                    restored.trials.push((name.clone(), None));
                } else {
                    match load_slot(store, &record, trial.previous, engine) {
                        Ok(previous) => restored
                            .trials
                            .push((name.clone(), Some(Arc::new(previous)))),
                        Err(e) => {
                            // Nothing to swap back to: the trial version is as good as it gets.
                            warn!(model = %name, error = %e, "last good slot does not load; committing the trial");
                            record.trial = None;
                        }
                    }
                }
            }
        }
        if record != found {
            store.put_model(&name, &record)?;
        }
        restored.records.push((name, record, served));
    }
    store.flush_blocking()?;
    for manifest in store.all_pending()? {
        let have = store.received(&manifest)?;
        restored.downloads.push((manifest, have));
    }
    crate::sys::release_free_memory();
    Ok(restored)
}

/// Hashes in full the slots not loaded by [`restore`] (the versions a fleet rollback may
/// return to) of every model that serves and is not on trial. Run on the control thread once
/// the inference API serves, before the update machine takes the records over: serving never
/// waits for it.
pub(crate) fn check_fallbacks(
    store: &Store,
    restored: &mut Restored,
    metrics: &Metrics,
) -> Result<(), StoreError> {
    let mut lost = Vec::new();
    for (name, record, served) in &mut restored.records {
        if *served && record.trial.is_none() {
            if let Some(gone) = check_fallback(store, name, record, metrics)? {
                store.put_model(name, record)?;
                lost.push(gone);
            }
        }
    }
    if !lost.is_empty() {
        store.flush_blocking()?;
    }
    restored.lost.extend(lost);
    Ok(())
}

/// Hashes the slot `record` does not serve against its signed digest; a damaged or missing
/// artifact empties the slot ([`ModelRecord::lose`]), so that a rollback never reaches for
/// bytes that are gone (the version is downloaded again if a desired state names it), and is
/// returned as lost (model, version, reason) for the report.
fn check_fallback(
    store: &Store,
    name: &str,
    record: &mut ModelRecord,
    metrics: &Metrics,
) -> Result<Option<(String, u64, String)>, StoreError> {
    let Some(slot) = record.active.map(Slot::other) else {
        return Ok(None);
    };
    let Some(manifest) = record.slot(slot).cloned() else {
        return Ok(None);
    };
    let Err(damage) = store.verify_artifact(&manifest) else {
        store.keep_manifest_once(&manifest)?;
        return Ok(None);
    };
    warn!(model = %name, %slot, version = manifest.version, error = %damage, "stored fallback artifact lost");
    metrics.artifact_lost();
    record.lose(slot);
    let reason = format!(
        "version {} of {name} (slot {slot}, the fallback) lost on disk: {damage}; \
         it is downloaded again if a desired state names it",
        manifest.version
    );
    Ok(Some((name.to_string(), manifest.version, reason)))
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

    fn reopen(dir: &Path) -> (Store, Option<Rebuilt>) {
        crate::store::once_unlocked(|| open(dir))
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
