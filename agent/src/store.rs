//! The agent's persistent state: sled for what the agent knows and decides (trust, slots,
//! downloads in progress, the last error), and [`Artifacts`] files for the model bytes.
//!
//! Layout under the store directory: `sled/` (the database) and `artifacts/` (see
//! [`crate::artifacts`]). Trees:
//! - `trust`: the TUF trust state (`state`).
//! - `models`: model name → [`ModelRecord`] (the A/B slots and which one serves).
//! - `pending`: model name → the manifest being downloaded.
//! - `meta`: `last_error`, telemetry and sample counters, `sampling` (the models sampled),
//!   `backends` (the models deployments pin to a backend).
//! - `telemetry`: reports waiting to be sent.
//! - `samples`: sampled requests waiting to be shipped, by id (see [`crate::sampling`]).
//!
//! Everything read back is decoded with errors, never panics: the disk is input too.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;

use modelcast_proto::desired::SamplingSpec;
use modelcast_proto::engine::Backend as Pin;
use modelcast_proto::manifest::{decode_golden_file, GoldenVector, Manifest};
use modelcast_proto::report::ReportedError;
use modelcast_proto::telemetry::Sample;
use modelcast_proto::verify::TrustState;
use serde::{Deserialize, Serialize};

pub use crate::artifacts::ArtifactReader;
use crate::artifacts::Artifacts;
use crate::sampling::sample_bytes;

/// sled's page cache: small, it holds only records; model bytes live in files.
const CACHE_BYTES: u64 = 1024 * 1024;

pub use crate::store_error::StoreError;

pub use crate::slots::{ModelRecord, Trial};

/// The agent's sled store.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    trust: sled::Tree,
    models: sled::Tree,
    pending: sled::Tree,
    meta: sled::Tree,
    /// Telemetry reports waiting to be sent: sequence number → enqueue time (Unix ms, 8
    /// bytes) and the report.
    telemetry: sled::Tree,
    /// Reports and bytes in `telemetry`, counted once at open and kept since (sled counts
    /// only by scanning).
    telemetry_held: std::sync::Arc<std::sync::Mutex<(u64, u64)>>,
    /// Sampled requests waiting to be shipped: id → [`Sample`].
    samples: sled::Tree,
    /// Each model's samples in `samples`, oldest first, with their sizes: built once at open.
    samples_held: std::sync::Arc<std::sync::Mutex<SampleIndex>>,
    files: Artifacts,
    /// The store directory (`sled/`, `artifacts/`, the trust mirror).
    dir: std::path::PathBuf,
    /// The device's key for opening content keys of encrypted artifacts, and its id (what
    /// each key wrap is bound to); none: encrypted artifacts do not open.
    sealing: Option<std::sync::Arc<(crate::sealing::DeviceSealingKey, String)>>,
}

/// A copy of the trust state beside the database, written on every change, so that the
/// version floors survive the database (see [`crate::recovery`]).
const TRUST_MIRROR: &str = "trust.json";

/// The database lives in `sled/` under the store directory.
pub(crate) fn sled_dir(dir: &Path) -> std::path::PathBuf {
    dir.join("sled")
}

/// Fails with [`StoreError::Locked`] when a process holds the database's lock (sled takes an
/// exclusive `flock` on its `db` file): a held database is busy, not damaged.
fn check_unlocked(dir: &Path) -> Result<(), StoreError> {
    let db = sled_dir(dir).join("db");
    let Ok(file) = std::fs::File::open(&db) else {
        return Ok(()); // None yet, or unreadable: sled will say.
    };
    match file.try_lock() {
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked {
            path: db.display().to_string(),
        }),
        _ => Ok(()),
    }
}

/// A download given up over damaged chunks, kept across restarts: it is not tried again
/// before `until` (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backoff {
    /// The artifact (hex SHA-256).
    pub sha256: String,
    /// Give-ups in a row.
    pub attempts: u32,
    /// Unix seconds.
    pub until: i64,
}

/// Per model, the ids and sizes of its stored samples, oldest first.
type SampleIndex = BTreeMap<String, VecDeque<(u64, u64)>>;

/// Indexes the stored samples; a record that does not decode is removed (it could never be
/// shipped) and counted as dropped.
fn index_samples(tree: &sled::Tree, meta: &sled::Tree) -> Result<SampleIndex, StoreError> {
    let mut index = SampleIndex::new();
    let mut corrupt = Vec::new();
    for item in tree.iter() {
        let (key, value) = item?;
        match decode::<Sample>("samples", &value) {
            Ok(s) => index
                .entry(s.model)
                .or_default()
                .push_back((be_u64(&key), value.len() as u64)),
            Err(_) => corrupt.push(key),
        }
    }
    if !corrupt.is_empty() {
        tracing::warn!(records = corrupt.len(), "corrupt samples removed");
        for key in &corrupt {
            tree.remove(key)?;
        }
        add_counter(meta, "samples_dropped", corrupt.len() as u64)?;
    }
    Ok(index)
}

/// Adds `n` to the big-endian counter `key` in `meta`.
fn add_counter(meta: &sled::Tree, key: &str, n: u64) -> Result<u64, StoreError> {
    let now = meta.get(key)?.map_or(0, |v| be_u64(&v)).saturating_add(n);
    meta.insert(key, &now.to_be_bytes())?;
    Ok(now)
}

/// A big-endian `u64` record; anything else reads as 0 (a corrupt counter restarts).
fn be_u64(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

/// Records and bytes in a tree, by scanning it.
fn held(tree: &sled::Tree) -> Result<(u64, u64), StoreError> {
    let (mut n, mut bytes) = (0, 0);
    for value in tree.iter().values() {
        n += 1;
        bytes += value?.len() as u64;
    }
    Ok((n, bytes))
}

/// When a queued telemetry record was queued (Unix ms); 0, long ago, if it is corrupt.
fn queued_at(record: &[u8]) -> i64 {
    record
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, i64::from_be_bytes)
}

/// Decodes one stored record (read back from disk, so untrusted: a corrupt record is an
/// error naming `key`, never a panic).
pub fn decode<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.into(),
        reason: e.to_string(),
    })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize")
}

impl Store {
    /// Opens (or creates) the store in `dir`. Only one process may hold it.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        check_unlocked(dir)?;
        let db = sled::Config::new()
            .path(sled_dir(dir))
            .cache_capacity(CACHE_BYTES)
            .flush_every_ms(Some(500))
            .open()?;
        let telemetry = db.open_tree("telemetry")?;
        let (samples, meta) = (db.open_tree("samples")?, db.open_tree("meta")?);
        Ok(Store {
            trust: db.open_tree("trust")?,
            models: db.open_tree("models")?,
            pending: db.open_tree("pending")?,
            telemetry_held: std::sync::Arc::new(std::sync::Mutex::new(held(&telemetry)?)),
            telemetry,
            samples_held: std::sync::Arc::new(std::sync::Mutex::new(index_samples(
                &samples, &meta,
            )?)),
            samples,
            meta,
            files: Artifacts::open(&dir.join("artifacts"))?,
            dir: dir.into(),
            sealing: None,
            db,
        })
    }

    /// Reads back every record the agent needs to start (trust, slots, downloads, the last
    /// error, the sampling policies): an error here means the database cannot be used.
    pub fn check(&self) -> Result<(), StoreError> {
        self.trust()?;
        self.models()?;
        self.all_pending()?;
        self.last_error()?;
        self.sampling()?;
        self.pins()?;
        self.shadows()?;
        self.canaries()?;
        Ok(())
    }

    /// The trust state mirrored beside the database, if one was written and decodes.
    pub fn mirrored_trust(&self) -> Option<TrustState> {
        let bytes = std::fs::read(self.dir.join(TRUST_MIRROR)).ok()?;
        decode(TRUST_MIRROR, &bytes).ok()
    }

    /// Keeps `manifest` beside its artifact: what the device accepted, for a rebuild.
    pub fn keep_manifest(&self, manifest: &Manifest) -> Result<(), StoreError> {
        self.files
            .keep_manifest(&manifest.sha256, &encode(manifest))
    }

    /// Keeps `manifest` beside its artifact unless one is kept there already (an agent from
    /// before kept none): one `stat` per slot at start-up, not a synced write.
    pub fn keep_manifest_once(&self, manifest: &Manifest) -> Result<(), StoreError> {
        if self.files.keeps_manifest(&manifest.sha256) {
            return Ok(());
        }
        self.keep_manifest(manifest)
    }

    /// Forgets the manifest kept beside `sha256` (a version rolled back is not adopted).
    pub fn forget_manifest(&self, sha256: &str) -> Result<(), StoreError> {
        self.files.forget_manifest(sha256)
    }

    /// The manifests kept beside artifacts (see [`Store::keep_manifest`]), as bytes.
    pub fn kept_manifests(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        self.files.kept_manifests()
    }

    /// Makes everything written so far durable. Call before acting on a state change.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// [`Store::flush`] for blocking contexts (start-up, staging threads).
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// The persisted trust state.
    pub fn trust(&self) -> Result<Option<TrustState>, StoreError> {
        self.trust
            .get("state")?
            .map(|v| decode("trust/state", &v))
            .transpose()
    }

    /// Replaces the trust state.
    pub fn set_trust(&self, state: &TrustState) -> Result<(), StoreError> {
        let bytes = encode(state);
        self.trust.insert("state", bytes.as_slice())?;
        crate::artifacts::write_atomically(&self.dir.join(TRUST_MIRROR), &bytes)
    }

    /// One model's slots.
    pub fn model(&self, name: &str) -> Result<Option<ModelRecord>, StoreError> {
        self.models
            .get(name)?
            .map(|v| decode(&format!("models/{name}"), &v))
            .transpose()
    }

    /// Every model's slots.
    pub fn models(&self) -> Result<Vec<(String, ModelRecord)>, StoreError> {
        self.models
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let name = String::from_utf8_lossy(&k).into_owned();
                let rec = decode(&format!("models/{name}"), &v)?;
                Ok((name, rec))
            })
            .collect()
    }

    /// Replaces one model's slots.
    pub fn put_model(&self, name: &str, record: &ModelRecord) -> Result<(), StoreError> {
        self.models.insert(name, encode(record))?;
        Ok(())
    }

    /// The download in progress for `name`.
    pub fn pending(&self, name: &str) -> Result<Option<Manifest>, StoreError> {
        self.pending
            .get(name)?
            .map(|v| decode(&format!("pending/{name}"), &v))
            .transpose()
    }

    /// Every download in progress.
    pub fn all_pending(&self) -> Result<Vec<Manifest>, StoreError> {
        self.pending
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&format!("pending/{}", String::from_utf8_lossy(&k)), &v)
            })
            .collect()
    }

    /// Records a download in progress and reserves the space for its files (the artifact,
    /// and the golden file when the manifest has one). Returns which chunks of the download
    /// ([`Manifest::parts`], one numbering) are already on disk.
    pub fn set_pending(&self, manifest: &Manifest) -> Result<Vec<bool>, StoreError> {
        let mut have = Vec::new();
        for part in manifest.parts() {
            have.extend(self.files.begin(&part)?);
        }
        self.pending
            .insert(manifest.name.as_str(), encode(manifest))?;
        Ok(have)
    }

    /// Copies into `manifest`'s download (its artifact and golden file) every chunk `have`
    /// lacks that a file the device holds has with the same digest and length: any model's
    /// slots (artifacts and golden files), the other downloads in progress, and `superseded`,
    /// the download this one replaces (what it received so far). Each chunk is read, checked
    /// against the digest, and written. Marks them in `have` (numbered through the download,
    /// [`Manifest::parts`]); returns the bytes copied. A chunk that cannot be read, or whose
    /// bytes differ (a partial file's chunk not received yet), is left to download.
    pub fn reuse(
        &self,
        manifest: &Manifest,
        superseded: Option<&Manifest>,
        have: &mut [bool],
    ) -> Result<u64, StoreError> {
        let wanted: Vec<&str> = manifest.parts().iter().map(|p| p.sha256).collect();
        let records = self.models()?;
        let pending = self.all_pending()?;
        let held = records
            .iter()
            .flat_map(|(_, record)| [&record.a, &record.b])
            .flatten()
            .chain(pending.iter().filter(|p| p.sha256 != manifest.sha256))
            .chain(superseded);
        // Where each digest can be read: (file, offset, length).
        let mut sources: std::collections::HashMap<&str, (&str, u64, u32)> = Default::default();
        for m in held {
            for layout in m.parts() {
                if wanted.iter().any(|w| w.eq_ignore_ascii_case(layout.sha256)) {
                    continue;
                }
                for (digest, span) in layout.chunks.iter().zip(layout.spans()) {
                    sources.entry(digest.as_str()).or_insert((
                        layout.sha256,
                        span.offset,
                        span.len,
                    ));
                }
            }
        }
        let mut reused = 0;
        let mut first = 0usize;
        for target in manifest.parts() {
            for (i, (digest, span)) in target.chunks.iter().zip(target.spans()).enumerate() {
                let index = first + i;
                if have.get(index).is_none_or(|h| *h) {
                    continue;
                }
                let Some(&(from, offset, len)) = sources.get(digest.as_str()) else {
                    continue;
                };
                if span.len != len {
                    continue;
                }
                let Some(bytes) = self.files.read_held(from, offset, len) else {
                    continue;
                };
                if modelcast_proto::sha256_hex(&bytes) != *digest {
                    continue;
                }
                self.files.put_chunk(&target, i as u32, &bytes)?;
                have[index] = true;
                reused += u64::from(len);
            }
            first += target.chunks.len();
        }
        Ok(reused)
    }

    /// Forgets the download of `name`.
    pub fn clear_pending(&self, name: &str) -> Result<(), StoreError> {
        self.pending.remove(name)?;
        Ok(())
    }

    /// Writes download chunk `index` (already checked against its digest by the caller)
    /// into the file it belongs to.
    pub fn put_chunk(
        &self,
        manifest: &Manifest,
        index: u32,
        data: &[u8],
    ) -> Result<(), StoreError> {
        let (part, local) = manifest
            .locate(index)
            .ok_or_else(|| StoreError::DigestMismatch {
                artifact: manifest.sha256.clone(),
                reason: format!("chunk {index} is past the download's end"),
            })?;
        self.files.put_chunk(&part, local, data)
    }

    /// Which chunks of `manifest`'s download are already stored (resume after restart).
    pub fn received(&self, manifest: &Manifest) -> Result<Vec<bool>, StoreError> {
        let mut have = Vec::new();
        for part in manifest.parts() {
            have.extend(self.files.received(&part)?);
        }
        Ok(have)
    }

    /// Checks every file of the download (the artifact and its golden file) against the
    /// manifest and makes them complete and durable.
    pub fn verify_artifact(&self, manifest: &Manifest) -> Result<(), StoreError> {
        for part in manifest.parts() {
            self.files.verify(&part)?;
        }
        Ok(())
    }

    /// A reader over the stored artifact that checks each chunk's digest as it goes, and
    /// decrypts each chunk of an encrypted artifact in memory ([`Store::content_key`]).
    pub fn artifact_reader(&self, manifest: &Manifest) -> Result<ArtifactReader, StoreError> {
        let reader = self.files.reader(&manifest.artifact())?;
        match manifest.encryption {
            None => Ok(reader),
            Some(_) => Ok(reader.opening(self.content_key(manifest)?)),
        }
    }

    /// Opens encrypted artifacts with `key`, the device's, bound to device id `device`.
    pub fn with_sealing_key(mut self, key: crate::sealing::DeviceSealingKey, device: &str) -> Self {
        self.sealing = Some(std::sync::Arc::new((key, device.to_string())));
        self
    }

    /// The public half of the device's sealing key, if it has one.
    pub fn sealing_key(&self) -> Option<modelcast_proto::seal::SealingKey> {
        self.sealing.as_ref().map(|s| s.0.public())
    }

    /// Keeps the key wrap of the encrypted artifact `sha256` (for its staging, a restart and a
    /// rollback), replacing what was kept.
    pub fn keep_key_wrap(
        &self,
        sha256: &str,
        wrap: &modelcast_proto::seal::KeyWrap,
    ) -> Result<(), StoreError> {
        let key = format!("wrap/{}", sha256.to_ascii_lowercase());
        self.meta.insert(key, encode(wrap))?;
        Ok(())
    }

    /// The key wrap kept for the encrypted artifact `sha256`, if any.
    pub fn key_wrap(
        &self,
        sha256: &str,
    ) -> Result<Option<modelcast_proto::seal::KeyWrap>, StoreError> {
        let key = format!("wrap/{}", sha256.to_ascii_lowercase());
        match self.meta.get(&key)? {
            Some(v) => Ok(Some(decode(&key, &v)?)),
            None => Ok(None),
        }
    }

    /// The content key of `manifest`'s encrypted artifact: its kept wrap opened with the
    /// device's key.
    pub fn content_key(
        &self,
        manifest: &Manifest,
    ) -> Result<modelcast_proto::seal::ContentKey, StoreError> {
        let sealed = |reason: String| StoreError::Sealed {
            artifact: manifest.sha256.clone(),
            reason,
        };
        let key = format!("wrap/{}", manifest.sha256.to_ascii_lowercase());
        let wrap: modelcast_proto::seal::KeyWrap = match self.meta.get(&key)? {
            Some(v) => decode(&key, &v)?,
            None => return Err(sealed("no key wrap for this device came with it".into())),
        };
        self.open_key_wrap(manifest, &wrap)
    }

    /// The content key of `manifest`'s encrypted artifact in `wrap`, opened with the
    /// device's key.
    pub fn open_key_wrap(
        &self,
        manifest: &Manifest,
        wrap: &modelcast_proto::seal::KeyWrap,
    ) -> Result<modelcast_proto::seal::ContentKey, StoreError> {
        let sealed = |reason: String| StoreError::Sealed {
            artifact: manifest.sha256.clone(),
            reason,
        };
        let Some(sealing) = &self.sealing else {
            return Err(sealed("this agent has no sealing key".into()));
        };
        let (opening, device) = &**sealing;
        opening
            .open(wrap, device, &manifest.sha256)
            .map_err(|e| match e {
                modelcast_proto::seal::SealError::Device(_) => StoreError::DeviceKey {
                    artifact: manifest.sha256.clone(),
                    reason: e.to_string(),
                },
                e => sealed(e.to_string()),
            })
    }

    /// The golden vectors of `manifest`'s golden file (verified by
    /// [`Store::verify_artifact`]; each chunk checked again as it is read), none without one.
    pub fn golden_file(&self, manifest: &Manifest) -> Result<Vec<GoldenVector>, StoreError> {
        let Some(part) = manifest.parts().get(1).copied() else {
            return Ok(Vec::new());
        };
        let mut bytes = Vec::with_capacity(part.size as usize);
        std::io::Read::read_to_end(&mut self.files.reader(&part)?, &mut bytes).map_err(|e| {
            StoreError::DigestMismatch {
                artifact: part.sha256.to_string(),
                reason: e.to_string(),
            }
        })?;
        decode_golden_file(&bytes).map_err(|e| StoreError::Corrupt {
            key: format!("golden file {}", part.sha256),
            reason: e.to_string(),
        })
    }

    /// Removes the files of artifacts (and golden files) that neither a slot nor a download
    /// refers to. Returns how many files were removed.
    pub fn collect_garbage(&self) -> Result<usize, StoreError> {
        let mut live: Vec<String> = Vec::new();
        let mut keep = |m: &Manifest| live.extend(m.parts().iter().map(|p| p.sha256.to_string()));
        for (_, rec) in self.models()? {
            rec.a.iter().chain(rec.b.iter()).for_each(&mut keep);
        }
        self.all_pending()?.iter().for_each(&mut keep);
        self.files.collect_garbage(&live)
    }

    /// Keeps (or, with `None`, forgets) the back-off of `name`'s download given up over
    /// damaged chunks.
    pub fn set_backoff(&self, name: &str, backoff: Option<&Backoff>) -> Result<(), StoreError> {
        let key = format!("backoff/{name}");
        match backoff {
            Some(b) => self.meta.insert(key, encode(b))?,
            None => self.meta.remove(key)?,
        };
        Ok(())
    }

    /// Every back-off kept, by model (a record that does not decode is skipped: the download
    /// is then tried at once, as before back-offs were kept).
    pub fn backoffs(&self) -> Result<Vec<(String, Backoff)>, StoreError> {
        let mut out = Vec::new();
        for item in self.meta.scan_prefix("backoff/") {
            let (key, value) = item?;
            let name = String::from_utf8_lossy(&key["backoff/".len()..]).into_owned();
            match decode::<Backoff>("meta/backoff", &value) {
                Ok(b) => out.push((name, b)),
                Err(e) => tracing::warn!(model = %name, error = %e, "kept back-off skipped"),
            }
        }
        Ok(out)
    }

    /// Records the last error.
    pub fn set_last_error(&self, error: &ReportedError) -> Result<(), StoreError> {
        self.meta.insert("last_error", encode(error))?;
        Ok(())
    }

    /// The last error recorded.
    pub fn last_error(&self) -> Result<Option<ReportedError>, StoreError> {
        self.meta
            .get("last_error")?
            .map(|v| decode("meta/last_error", &v))
            .transpose()
    }

    /// Queues a telemetry report for sending; `build` makes it from its sequence number and
    /// the count of reports dropped so far. Before it goes in, the oldest reports are dropped
    /// until the queue holds at most `max_bytes` with it (guessing its size from the newest
    /// queued) and none older than `max_age_ms`. Returns the report's sequence number.
    pub fn queue_telemetry(
        &self,
        now_ms: i64,
        max_bytes: u64,
        max_age_ms: i64,
        build: impl FnOnce(u64, u64, u64) -> Vec<u8>,
    ) -> Result<u64, StoreError> {
        let counter = |key: &str| -> Result<u64, StoreError> {
            Ok(self.meta.get(key)?.map_or(0, |v| be_u64(&v)))
        };
        let mut dropped = counter("telemetry_dropped")?;
        let guess = self.telemetry.last()?.map_or(0, |(_, v)| v.len() as u64);
        let mut held = self.telemetry_held.lock().expect("telemetry count lock");
        while let Some((key, value)) = self.telemetry.first()? {
            let at = queued_at(&value);
            if held.1 + guess <= max_bytes && now_ms - at <= max_age_ms {
                break;
            }
            self.telemetry.remove(key)?;
            *held = (
                held.0.saturating_sub(1),
                held.1.saturating_sub(value.len() as u64),
            );
            dropped += 1;
        }
        let seq = counter("telemetry_seq")? + 1;
        let mut value = now_ms.to_be_bytes().to_vec();
        value.extend(build(seq, dropped, held.0 + 1));
        // Still too large (a report larger than the last): make room behind it.
        while held.1 + value.len() as u64 > max_bytes {
            let Some((key, old)) = self.telemetry.first()? else {
                break;
            };
            self.telemetry.remove(key)?;
            *held = (
                held.0.saturating_sub(1),
                held.1.saturating_sub(old.len() as u64),
            );
            dropped += 1;
        }
        *held = (held.0 + 1, held.1 + value.len() as u64);
        self.telemetry.insert(seq.to_be_bytes(), value)?;
        self.meta.insert("telemetry_seq", &seq.to_be_bytes())?;
        self.meta
            .insert("telemetry_dropped", &dropped.to_be_bytes())?;
        Ok(seq)
    }

    /// Queued telemetry reports after sequence number `after`, oldest first, at most `n`.
    pub fn queued_telemetry(
        &self,
        after: u64,
        n: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for item in self.telemetry.range((after + 1).to_be_bytes()..).take(n) {
            let (key, value) = item?;
            // A corrupt record is sent as it is: the receiver's decoder rejects it.
            out.push((be_u64(&key), value.get(8..).unwrap_or_default().to_vec()));
        }
        Ok(out)
    }

    /// Removes a delivered report from the queue.
    pub fn telemetry_delivered(&self, seq: u64) -> Result<(), StoreError> {
        let mut held = self.telemetry_held.lock().expect("telemetry count lock");
        if let Some(old) = self.telemetry.remove(seq.to_be_bytes())? {
            *held = (
                held.0.saturating_sub(1),
                held.1.saturating_sub(old.len() as u64),
            );
        }
        Ok(())
    }

    /// Reports and bytes in the telemetry queue, and reports dropped from it so far.
    pub fn telemetry_queue(&self) -> Result<(u64, u64, u64), StoreError> {
        let dropped = self
            .meta
            .get("telemetry_dropped")?
            .map_or(0, |v| be_u64(&v));
        let (reports, bytes) = *self.telemetry_held.lock().expect("telemetry count lock");
        Ok((reports, bytes, dropped))
    }

    /// The backends deployments pin models to, as the last desired state said (`meta`
    /// `backends`), for staging again after a restart.
    pub fn pins(&self) -> Result<BTreeMap<String, Pin>, StoreError> {
        match self.meta.get("backends")? {
            Some(bytes) => decode("backends", &bytes),
            None => Ok(BTreeMap::new()),
        }
    }

    /// Keeps the pins of the desired state just verified.
    pub fn set_pins(&self, pins: &BTreeMap<String, Pin>) -> Result<(), StoreError> {
        self.meta.insert("backends", encode(pins))?;
        Ok(())
    }

    /// The shadow phases deployments ask of models' new versions, as the last desired state
    /// said (`meta` `shadows`): a version staged again after a restart still goes through
    /// its shadow phase before it serves.
    pub fn shadows(
        &self,
    ) -> Result<BTreeMap<String, modelcast_proto::desired::ShadowSpec>, StoreError> {
        match self.meta.get("shadows")? {
            Some(bytes) => decode("shadows", &bytes),
            None => Ok(BTreeMap::new()),
        }
    }

    /// Keeps the shadow phases of the desired state just verified.
    pub fn set_shadows(
        &self,
        shadows: &BTreeMap<String, modelcast_proto::desired::ShadowSpec>,
    ) -> Result<(), StoreError> {
        self.meta.insert("shadows", encode(shadows))?;
        Ok(())
    }

    /// The traffic splits deployments ask for while models' new versions are on probation,
    /// as the last desired state said (`meta` `canaries`): a trial resumed after a restart
    /// keeps its share.
    pub fn canaries(
        &self,
    ) -> Result<BTreeMap<String, modelcast_proto::desired::CanarySpec>, StoreError> {
        match self.meta.get("canaries")? {
            Some(bytes) => decode("canaries", &bytes),
            None => Ok(BTreeMap::new()),
        }
    }

    /// Keeps the traffic splits of the desired state just verified.
    pub fn set_canaries(
        &self,
        canaries: &BTreeMap<String, modelcast_proto::desired::CanarySpec>,
    ) -> Result<(), StoreError> {
        self.meta.insert("canaries", encode(canaries))?;
        Ok(())
    }

    /// The models sampled, as the last verified desired state said (none if never).
    pub fn sampling(&self) -> Result<BTreeMap<String, SamplingSpec>, StoreError> {
        match self.meta.get("sampling")? {
            Some(bytes) => decode("sampling", &bytes),
            None => Ok(BTreeMap::new()),
        }
    }

    /// Records the models sampled and deletes the stored samples of every other model, and
    /// of a model whose budget shrank, its oldest until it fits.
    pub fn set_sampling(
        &self,
        policies: &BTreeMap<String, SamplingSpec>,
    ) -> Result<(), StoreError> {
        self.meta.insert("sampling", encode(policies))?;
        let mut index = self.samples_held.lock().expect("samples lock");
        let gone: Vec<String> = index
            .keys()
            .filter(|m| !policies.contains_key(*m))
            .cloned()
            .collect();
        for model in gone {
            for (id, _) in index.remove(&model).unwrap_or_default() {
                self.samples.remove(id.to_be_bytes())?;
            }
        }
        for (model, spec) in policies {
            self.trim_samples(&mut index, model, spec.budget_bytes)?;
        }
        Ok(())
    }

    /// Drops `model`'s oldest samples until they fit `budget`; returns how many.
    fn trim_samples(
        &self,
        index: &mut SampleIndex,
        model: &str,
        budget: u64,
    ) -> Result<u64, StoreError> {
        let Some(held) = index.get_mut(model) else {
            return Ok(0);
        };
        let mut bytes: u64 = held.iter().map(|(_, n)| n).sum();
        let mut dropped = 0;
        while bytes > budget {
            let Some((id, n)) = held.pop_front() else {
                break;
            };
            self.samples.remove(id.to_be_bytes())?;
            bytes -= n;
            dropped += 1;
        }
        Ok(dropped)
    }

    /// Stores freshly taken samples (assigning their ids) of the models sampled in
    /// `policies`; each model's oldest are dropped to stay within its budget. `dropped` more
    /// were lost before they got here. A sample of a model no longer sampled is discarded.
    pub fn keep_samples(
        &self,
        samples: Vec<Sample>,
        dropped: u64,
        policies: &BTreeMap<String, SamplingSpec>,
    ) -> Result<(), StoreError> {
        let mut index = self.samples_held.lock().expect("samples lock");
        let mut id = self.meta.get("sample_seq")?.map_or(0, |v| be_u64(&v));
        let mut lost = dropped;
        let mut touched = BTreeMap::new();
        for mut sample in samples {
            let Some(spec) = policies.get(&sample.model) else {
                continue;
            };
            id += 1;
            sample.id = id;
            let bytes = encode(&sample);
            index
                .entry(sample.model.clone())
                .or_default()
                .push_back((id, bytes.len() as u64));
            self.samples.insert(id.to_be_bytes(), bytes)?;
            touched.insert(sample.model, spec.budget_bytes);
        }
        for (model, budget) in touched {
            lost += self.trim_samples(&mut index, &model, budget)?;
        }
        self.meta.insert("sample_seq", &id.to_be_bytes())?;
        if lost > 0 {
            add_counter(&self.meta, "samples_dropped", lost)?;
        }
        Ok(())
    }

    /// The oldest stored samples, up to `max_bytes` of them (as [`sample_bytes`] counts). A
    /// record that no longer decodes is removed and counted as dropped: it could never be
    /// shipped, and must not hold back the reports.
    pub fn samples_to_ship(&self, max_bytes: usize) -> Result<Vec<Sample>, StoreError> {
        let (mut out, mut bytes) = (Vec::new(), 0);
        for item in self.samples.iter() {
            let (key, value) = item?;
            let sample: Sample = match decode(&format!("samples/{}", be_u64(&key)), &value) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "corrupt sample removed");
                    let mut index = self.samples_held.lock().expect("samples lock");
                    for held in index.values_mut() {
                        held.retain(|(id, _)| *id != be_u64(&key));
                    }
                    self.samples.remove(&key)?;
                    add_counter(&self.meta, "samples_dropped", 1)?;
                    continue;
                }
            };
            bytes += sample_bytes(&sample);
            if bytes > max_bytes {
                break;
            }
            out.push(sample);
        }
        Ok(out)
    }

    /// Removes samples that joined the telemetry queue.
    pub fn samples_shipped(&self, samples: &[Sample]) -> Result<(), StoreError> {
        let mut index = self.samples_held.lock().expect("samples lock");
        for s in samples {
            self.samples.remove(s.id.to_be_bytes())?;
            if let Some(held) = index.get_mut(&s.model) {
                // Shipped oldest first, so each is the front of its model's samples.
                if held.front().is_some_and(|(id, _)| *id == s.id) {
                    held.pop_front();
                } else {
                    held.retain(|(id, _)| *id != s.id);
                }
            }
        }
        index.retain(|_, held| !held.is_empty());
        Ok(())
    }

    /// Samples stored and their bytes, and samples dropped so far.
    pub fn sample_counts(&self) -> Result<(u64, u64, u64), StoreError> {
        let index = self.samples_held.lock().expect("samples lock");
        let (n, bytes) = index
            .values()
            .flatten()
            .fold((0, 0), |(n, b), (_, len)| (n + 1, b + len));
        Ok((n, bytes, self.samples_dropped()?))
    }

    /// Samples dropped so far, over the device's lifetime.
    pub fn samples_dropped(&self) -> Result<u64, StoreError> {
        Ok(self.meta.get("samples_dropped")?.map_or(0, |v| be_u64(&v)))
    }

    /// Bytes the store occupies on disk: sled and the artifact files.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()? + self.files.size_on_disk()?)
    }
}

/// Runs `open` (of a store a test just dropped) until the store's lock is free. sled lets go
/// of its file lock when its last thread has: under emulation (qemu in `cross/test`) that can
/// be a while after the drop, so this polls the lock for at most ten seconds.
#[cfg(test)]
pub(crate) fn once_unlocked<T>(mut open: impl FnMut() -> Result<T, StoreError>) -> T {
    for _ in 0..100 {
        match open() {
            Err(StoreError::Locked { .. }) => {
                std::thread::sleep(std::time::Duration::from_millis(100))
            }
            other => return other.unwrap_or_else(|e| panic!("reopening the store: {e}")),
        }
    }
    panic!("the store's lock was still held ten seconds after it was dropped");
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelcast_proto::report::Slot;
    use std::io::Read;

    fn manifest_for(name: &str, version: u64, bytes: &[u8], chunk: u32) -> Manifest {
        modelcast_proto::verify::fixture::manifest(name, version, bytes, chunk)
    }

    /// Opens the store again after the test dropped it.
    fn reopen(dir: &Path) -> Store {
        once_unlocked(|| Store::open(dir))
    }

    #[test]
    fn a_golden_file_downloads_after_the_artifact_and_is_kept_with_it() {
        use modelcast_proto::manifest::{Attachment, TensorData};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let artifact = vec![5u8; 150];
        let tensor = |v: f32| TensorData::from_f32("y", vec![1], &[v]);
        let golden = vec![GoldenVector {
            inputs: vec![tensor(1.0)],
            outputs: vec![tensor(2.0)],
            tolerance: "0.001".into(),
        }];
        let file = serde_json::to_vec(&golden).unwrap();
        let mut m = manifest_for("g", 1, &artifact, 64);
        m.golden_file = Some(Attachment::of(&file, 64));
        m.validate().unwrap();
        // One numbering: 3 chunks of artifact, then the golden file's.
        let download: Vec<u8> = artifact.iter().chain(&file).copied().collect();
        let have = store.set_pending(&m).unwrap();
        assert_eq!(have.len() as u32, m.download_chunk_count());
        assert_eq!(m.download_chunk_count(), 3 + file.len().div_ceil(64) as u32);
        let mut index = 0;
        for part in [&artifact[..], &file[..]] {
            for c in part.chunks(64) {
                store.put_chunk(&m, index, c).unwrap();
                index += 1;
            }
        }
        assert!(store.put_chunk(&m, index, b"past the end").is_err());
        assert!(store.received(&m).unwrap().iter().all(|h| *h));
        store.verify_artifact(&m).unwrap();
        assert_eq!(store.golden_file(&m).unwrap(), golden);
        let mut read = Vec::new();
        store
            .artifact_reader(&m)
            .unwrap()
            .read_to_end(&mut read)
            .unwrap();
        assert_eq!(read, artifact);
        assert_eq!(download.len() as u64, m.download_size());

        // Kept while a download refers to it; collected once nothing does.
        store.collect_garbage().unwrap();
        assert_eq!(store.golden_file(&m).unwrap(), golden);
        store.clear_pending("g").unwrap();
        assert_eq!(store.collect_garbage().unwrap(), 2);
        assert!(store.golden_file(&m).is_err());
    }

    #[test]
    fn chunks_a_slot_holds_are_copied_into_a_new_download_golden_file_too() {
        use modelcast_proto::manifest::Attachment;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let with = |version: u64, artifact: &[u8], golden: &[u8]| {
            let mut m = manifest_for("g", version, artifact, 64);
            m.golden_file = Some(Attachment::of(golden, 64));
            m
        };
        let a1: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
        let g1: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        let v1 = with(1, &a1, &g1);
        store.set_pending(&v1).unwrap();
        let mut index = 0;
        for part in [&a1[..], &g1[..]] {
            for c in part.chunks(64) {
                store.put_chunk(&v1, index, c).unwrap();
                index += 1;
            }
        }
        store.verify_artifact(&v1).unwrap();
        let record = ModelRecord {
            a: Some(v1.clone()),
            active: Some(Slot::A),
            ..ModelRecord::default()
        };
        store.put_model("g", &record).unwrap();
        store.clear_pending("g").unwrap();

        // v2: the artifact's last chunk and the golden file's tail changed.
        let (mut a2, mut g2) = (a1.clone(), g1.clone());
        a2[199] ^= 1;
        g2[299] ^= 1;
        let v2 = with(2, &a2, &g2);
        let mut have = store.set_pending(&v2).unwrap();
        let reused = store.reuse(&v2, None, &mut have).unwrap();
        // Artifact: chunks 0..3 of 4; golden file: 0..4 of 5 (the last 44 bytes changed).
        assert_eq!(
            have,
            [true, true, true, false, true, true, true, true, false]
        );
        assert_eq!(reused, 192 + 256);
        store.put_chunk(&v2, 3, &a2[192..]).unwrap();
        store.put_chunk(&v2, 8, &g2[256..]).unwrap();
        store.verify_artifact(&v2).unwrap();
    }

    #[test]
    fn a_download_replaced_midway_gives_the_new_one_what_it_had_received() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // v1's download got chunks 0 and 2 of 4 before v2 replaced it.
        let a1: Vec<u8> = (0..256u32).map(|i| (i * 3) as u8).collect();
        let v1 = manifest_for("m", 1, &a1, 64);
        store.set_pending(&v1).unwrap();
        store.put_chunk(&v1, 0, &a1[..64]).unwrap();
        store.put_chunk(&v1, 2, &a1[128..192]).unwrap();

        // v2 shares chunks 0, 1 and 2 with v1; its last chunk is new.
        let mut a2 = a1.clone();
        a2[255] ^= 1;
        let v2 = manifest_for("m", 2, &a2, 64);
        let superseded = store.pending("m").unwrap();
        let mut have = store.set_pending(&v2).unwrap();
        assert_eq!(have, [false; 4]);
        let reused = store.reuse(&v2, superseded.as_ref(), &mut have).unwrap();
        // Chunk 1 was never received: its place in v1's partial file does not match.
        assert_eq!(have, [true, false, true, false]);
        assert_eq!(reused, 128);
        // Without the replaced download named, nothing is found (it is no longer pending).
        let mut again = vec![false; 4];
        assert_eq!(store.reuse(&v2, None, &mut again).unwrap(), 0);
        store.put_chunk(&v2, 1, &a2[64..128]).unwrap();
        store.put_chunk(&v2, 3, &a2[192..]).unwrap();
        store.verify_artifact(&v2).unwrap();
        // v1's partial file is garbage once nothing refers to it.
        store.clear_pending("m").unwrap();
        assert!(store.collect_garbage().unwrap() >= 1);
    }

    #[test]
    fn back_offs_are_kept_across_a_reopen_and_a_corrupt_one_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let b = Backoff {
            sha256: "ab".repeat(32),
            attempts: 2,
            until: 1_800_000_000,
        };
        store.set_backoff("m", Some(&b)).unwrap();
        store.set_backoff("gone", Some(&b)).unwrap();
        store.set_backoff("gone", None).unwrap();
        store.meta.insert("backoff/bad", b"{not json").unwrap();
        store.flush_blocking().unwrap();
        drop(store);
        let store = reopen(dir.path());
        assert_eq!(store.backoffs().unwrap(), vec![("m".to_string(), b)]);
    }

    fn put_all(store: &Store, m: &Manifest, bytes: &[u8]) {
        for (i, c) in bytes.chunks(m.chunk_size as usize).enumerate() {
            store.put_chunk(m, i as u32, c).unwrap();
        }
    }

    #[test]
    fn artifact_round_trip_resume_and_tamper() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let bytes: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let m = manifest_for("m", 1, &bytes, 64);
        store.set_pending(&m).unwrap();
        store.put_chunk(&m, 3, &bytes[192..256]).unwrap();
        assert!(
            store.put_chunk(&m, 3, &bytes[..10]).is_err(),
            "wrong length"
        );
        assert!(
            store.put_chunk(&m, 99, &bytes[..64]).is_err(),
            "no such chunk"
        );
        let have = store.received(&m).unwrap();
        assert_eq!(have.iter().filter(|h| **h).count(), 1);
        assert!(have[3]);
        assert!(matches!(
            store.verify_artifact(&m),
            Err(StoreError::DigestMismatch { .. })
        ));
        put_all(&store, &m, &bytes);
        store.verify_artifact(&m).unwrap();
        let mut back = Vec::new();
        store
            .artifact_reader(&m)
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, bytes);
        assert!(store.received(&m).unwrap().iter().all(|h| *h));
        // A chunk altered on disk after completion is caught by readers and re-verification.
        let file = dir.path().join("artifacts").join(&m.sha256);
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 64], 5 * 64).unwrap();
        assert!(store.verify_artifact(&m).is_err());
        let err = store
            .artifact_reader(&m)
            .unwrap()
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("chunk 5"), "{err}");
    }

    #[test]
    fn resume_counts_only_chunks_whose_bytes_match() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let bytes: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        let m = manifest_for("m", 1, &bytes, 64);
        store.set_pending(&m).unwrap();
        store.put_chunk(&m, 0, &bytes[..64]).unwrap();
        store.put_chunk(&m, 4, &bytes[256..]).unwrap();
        // A torn write (power cut): chunk 2 half written.
        let part = dir
            .path()
            .join("artifacts")
            .join(format!("{}.part", m.sha256));
        let f = std::fs::OpenOptions::new().write(true).open(&part).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &bytes[128..160], 128).unwrap();
        drop(store);
        let store = reopen(dir.path());
        assert_eq!(
            store.received(&m).unwrap(),
            vec![true, false, false, false, true]
        );
        // Starting the same download again resumes from what is on disk.
        assert_eq!(
            store.set_pending(&m).unwrap(),
            vec![true, false, false, false, true]
        );
        // A new download starts from nothing, without hashing its reserved (zeroed) file.
        let zeros = vec![0u8; 128];
        let z = manifest_for("z", 1, &zeros, 64);
        assert_eq!(store.set_pending(&z).unwrap(), vec![false, false]);
    }

    #[test]
    fn garbage_collection_keeps_slots_and_pending() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (b1, b2, b3) = (vec![1u8; 100], vec![2u8; 100], vec![3u8; 100]);
        let (m1, m2, m3) = (
            manifest_for("m", 1, &b1, 32),
            manifest_for("m", 2, &b2, 32),
            manifest_for("m", 3, &b3, 32),
        );
        for (m, b) in [(&m1, &b1), (&m2, &b2), (&m3, &b3)] {
            store.set_pending(m).unwrap();
            put_all(&store, m, b);
        }
        store.clear_pending("m").unwrap();
        store.set_pending(&m3).unwrap();
        let rec = ModelRecord {
            active: Some(Slot::A),
            a: Some(m2.clone()),
            b: None,
            highest_version: 2,
            ..Default::default()
        };
        store.put_model("m", &rec).unwrap();
        store.verify_artifact(&m2).unwrap();
        assert_eq!(store.collect_garbage().unwrap(), 1);
        assert!(store.received(&m1).unwrap().iter().all(|h| !h));
        store.verify_artifact(&m2).unwrap();
        store.verify_artifact(&m3).unwrap();
        assert_eq!(store.model("m").unwrap(), Some(rec));
    }

    #[test]
    fn corrupt_records_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.models.insert("m", &b"{not json"[..]).unwrap();
        assert!(matches!(store.model("m"), Err(StoreError::Corrupt { .. })));
        assert!(store.models().is_err());
    }

    fn sample(model: &str, values: usize) -> Sample {
        Sample {
            id: 0,
            model: model.into(),
            version: 1,
            slot: Slot::A,
            at_ms: 5,
            inputs: vec![modelcast_proto::manifest::TensorData::from_f32(
                "x",
                vec![values as u64],
                &vec![0.5; values],
            )],
            outputs: vec![],
        }
    }

    fn spec(budget_bytes: u64) -> SamplingSpec {
        SamplingSpec {
            rate_permille: 1000,
            budget_bytes,
        }
    }

    #[test]
    fn samples_stay_within_each_models_budget_and_leave_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let policies = BTreeMap::from([
            ("a".to_string(), spec(4096)),
            ("b".to_string(), spec(65536)),
        ]);
        store.set_sampling(&policies).unwrap();
        assert_eq!(store.sampling().unwrap(), policies);
        // 30 samples of about 500 bytes each for a (4 KiB budget), 3 for b, 2 for a model not
        // sampled; 4 lost on the serve path.
        let mut batch: Vec<Sample> = (0..30).map(|_| sample("a", 50)).collect();
        batch.extend((0..3).map(|_| sample("b", 50)));
        batch.extend((0..2).map(|_| sample("c", 50)));
        store.keep_samples(batch, 4, &policies).unwrap();
        let (held, bytes, dropped) = store.sample_counts().unwrap();
        let a_bytes = bytes - 3 * (bytes / held);
        assert!(a_bytes <= 4096, "{a_bytes}");
        assert_eq!(held + dropped, 33 + 4, "every sample kept or counted");
        // Ids are assigned in order; the oldest of a went; they ship oldest first.
        let shipped = store.samples_to_ship(usize::MAX).unwrap();
        let ids: Vec<u64> = shipped.iter().map(|s| s.id).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        assert_eq!(*ids.last().unwrap(), 33);
        assert!(ids[0] > 1, "the oldest of a were dropped");
        // A byte cap takes a prefix.
        let first = store.samples_to_ship(1500).unwrap();
        assert!(!first.is_empty() && first.len() < shipped.len());
        assert_eq!(first[..], shipped[..first.len()]);
        store.samples_shipped(&first).unwrap();
        assert_eq!(store.sample_counts().unwrap().0, held - first.len() as u64);

        // The index survives a reopen.
        let left = store.samples_to_ship(usize::MAX).unwrap();
        drop(store);
        let store = reopen(dir.path());
        assert_eq!(store.samples_to_ship(usize::MAX).unwrap(), left);
        assert_eq!(store.sample_counts().unwrap().0, left.len() as u64);

        // Sampling a turned off: its samples are deleted at once; b's stay.
        let only_b = BTreeMap::from([("b".to_string(), spec(65536))]);
        store.set_sampling(&only_b).unwrap();
        let left = store.samples_to_ship(usize::MAX).unwrap();
        assert_eq!(left.len(), 3);
        assert!(left.iter().all(|s| s.model == "b"));
        // A smaller budget trims b to fit.
        store
            .set_sampling(&BTreeMap::from([("b".to_string(), spec(1024))]))
            .unwrap();
        assert!(store.sample_counts().unwrap().1 <= 1024);
    }

    #[test]
    fn a_corrupt_sample_is_dropped_and_does_not_hold_back_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let policies = BTreeMap::from([("a".to_string(), spec(65536))]);
        store.set_sampling(&policies).unwrap();
        store
            .keep_samples(vec![sample("a", 4), sample("a", 4)], 0, &policies)
            .unwrap();
        store
            .samples
            .insert(1u64.to_be_bytes(), &b"{not json"[..])
            .unwrap();
        let shipped = store.samples_to_ship(usize::MAX).unwrap();
        assert_eq!(shipped.iter().map(|s| s.id).collect::<Vec<_>>(), vec![2]);
        let (held, _, dropped) = store.sample_counts().unwrap();
        assert_eq!((held, dropped), (1, 1), "the corrupt one gone and counted");
    }
}
