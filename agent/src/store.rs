//! The agent's persistent state: sled for what the agent knows and decides (trust, slots,
//! downloads in progress, the last error), and [`Artifacts`] files for the model bytes.
//!
//! Layout under the store directory: `sled/` (the database) and `artifacts/` (see
//! [`crate::artifacts`]). Trees:
//! - `trust`: the TUF trust state (`state`).
//! - `models`: model name → [`ModelRecord`] (the A/B slots and which one serves).
//! - `pending`: model name → the manifest being downloaded.
//! - `meta`: `last_error`.
//!
//! Everything read back is decoded with errors, never panics: the disk is input too.

use std::path::Path;

use modelcast_proto::manifest::Manifest;
use modelcast_proto::report::ReportedError;
use modelcast_proto::verify::TrustState;
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use crate::artifacts::ArtifactReader;
use crate::artifacts::Artifacts;

/// sled's page cache: small, it holds only records; model bytes live in files.
const CACHE_BYTES: u64 = 1024 * 1024;

/// A store failure.
#[derive(Debug, Error)]
pub enum StoreError {
    /// sled failed (I/O, disk full, corruption sled detected).
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    /// A record on disk does not decode.
    #[error("store record {key} is corrupt: {reason}")]
    Corrupt {
        /// Which record.
        key: String,
        /// Why.
        reason: String,
    },
    /// An artifact file could not be read or written (disk full, I/O error).
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The disk has no room for an artifact (checked when its download starts).
    #[error(
        "not enough disk space: the artifact needs {} MiB, {} MiB are free in {dir}",
        mib(*needed),
        mib(*available)
    )]
    NoSpace {
        /// Bytes the artifact needs.
        needed: u64,
        /// Bytes free for the agent.
        available: u64,
        /// The artifact directory.
        dir: String,
    },
    /// No file holds the artifact.
    #[error("artifact {artifact} is not stored")]
    MissingArtifact {
        /// Artifact digest.
        artifact: String,
    },
    /// Stored bytes do not match the manifest.
    #[error("artifact {artifact}: {reason}")]
    DigestMismatch {
        /// Artifact digest.
        artifact: String,
        /// What differs.
        reason: String,
    },
}

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
    files: Artifacts,
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

/// Bytes in MiB with one decimal, for messages.
fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize")
}

impl Store {
    /// Opens (or creates) the store in `dir`. Only one process may hold it.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir.join("sled"))
            .cache_capacity(CACHE_BYTES)
            .flush_every_ms(Some(500))
            .open()?;
        let telemetry = db.open_tree("telemetry")?;
        Ok(Store {
            trust: db.open_tree("trust")?,
            models: db.open_tree("models")?,
            pending: db.open_tree("pending")?,
            meta: db.open_tree("meta")?,
            telemetry_held: std::sync::Arc::new(std::sync::Mutex::new(held(&telemetry)?)),
            telemetry,
            files: Artifacts::open(&dir.join("artifacts"))?,
            db,
        })
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
        self.trust.insert("state", encode(state))?;
        Ok(())
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

    /// Records a download in progress and reserves the space for its artifact. Returns which
    /// chunks are already on disk.
    pub fn set_pending(&self, manifest: &Manifest) -> Result<Vec<bool>, StoreError> {
        let have = self.files.begin(manifest)?;
        self.pending
            .insert(manifest.name.as_str(), encode(manifest))?;
        Ok(have)
    }

    /// Forgets the download of `name`.
    pub fn clear_pending(&self, name: &str) -> Result<(), StoreError> {
        self.pending.remove(name)?;
        Ok(())
    }

    /// Writes one chunk (already checked against its digest by the caller).
    pub fn put_chunk(
        &self,
        manifest: &Manifest,
        index: u32,
        data: &[u8],
    ) -> Result<(), StoreError> {
        self.files.put_chunk(manifest, index, data)
    }

    /// Which chunks of `manifest` are already stored (resume after restart).
    pub fn received(&self, manifest: &Manifest) -> Result<Vec<bool>, StoreError> {
        self.files.received(manifest)
    }

    /// Checks the whole artifact against its manifest and makes it complete and durable.
    pub fn verify_artifact(&self, manifest: &Manifest) -> Result<(), StoreError> {
        self.files.verify(manifest)
    }

    /// A reader over the stored artifact that checks each chunk's digest as it goes.
    pub fn artifact_reader(&self, manifest: &Manifest) -> Result<ArtifactReader, StoreError> {
        self.files.reader(manifest)
    }

    /// Removes the files of artifacts that neither a slot nor a download refers to.
    /// Returns how many files were removed.
    pub fn collect_garbage(&self) -> Result<usize, StoreError> {
        let mut live: Vec<String> = Vec::new();
        for (_, rec) in self.models()? {
            live.extend(rec.a.iter().chain(rec.b.iter()).map(|m| m.sha256.clone()));
        }
        live.extend(self.all_pending()?.into_iter().map(|m| m.sha256));
        self.files.collect_garbage(&live)
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

    /// Bytes the store occupies on disk: sled and the artifact files.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()? + self.files.size_on_disk()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelcast_proto::report::Slot;
    use std::io::Read;

    fn manifest_for(name: &str, version: u64, bytes: &[u8], chunk: u32) -> Manifest {
        modelcast_proto::verify::fixture::manifest(name, version, bytes, chunk)
    }

    /// Opens the store again after the test dropped it. sled lets go of its file lock when
    /// its last thread has: under emulation (qemu in `cross/test`) that can be a while after
    /// the drop, so this retries for at most ten seconds.
    fn reopen(dir: &Path) -> Store {
        for _ in 0..100 {
            match Store::open(dir) {
                Ok(store) => return store,
                Err(StoreError::Sled(sled::Error::Io(e))) if e.to_string().contains("lock") => {
                    std::thread::sleep(std::time::Duration::from_millis(100))
                }
                Err(e) => panic!("reopening the store: {e}"),
            }
        }
        panic!("the store's lock was still held ten seconds after it was dropped");
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
}
