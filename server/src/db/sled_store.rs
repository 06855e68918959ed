//! The embedded store: sled trees on local disk, one box, no other process.

use std::path::Path;

use bytes::Bytes;

use modelcast_proto::telemetry::{Sample, TelemetryReport};

use super::chunk_files::ChunkFiles;
use super::{
    decode, encode, ArtifactInfo, AuditEntry, DbError, Deployment, DeviceEntry, DirectorEntry,
    Enrolment, ModelEntry, ModelInterval, Rollout, SampleQuery, Signed, Storage, StoredSample,
};
use crate::drift::Alert;

/// Key of the audit log's head (last position and digest); sorts after every position.
const AUDIT_HEAD: &[u8] = b"~head";

/// The sled store.
#[derive(Clone)]
pub struct SledStore {
    db: sled::Db,
    artifacts: sled::Tree,
    /// Artifact chunks are files ([`ChunkFiles`]); this tree holds only those written before.
    chunks: sled::Tree,
    chunk_files: ChunkFiles,
    registry: sled::Tree,
    repo: sled::Tree,
    devices: sled::Tree,
    /// Enrolment records by device id.
    enrolments: sled::Tree,
    deployments: sled::Tree,
    director: sled::Tree,
    rollouts: sled::Tree,
    audit: sled::Tree,
    /// Reports by device, interval end and sequence number.
    telemetry: sled::Tree,
    /// Per-model points by model, interval end, device, sequence number and slot.
    model_telemetry: sled::Tree,
    /// Drift and anomaly alerts by id.
    alerts: sled::Tree,
    /// Sampled requests by model, sampling time, device and id.
    samples: sled::Tree,
}

/// A time as bytes that sort like the time.
fn time_bytes(ms: i64) -> [u8; 8] {
    ((ms as u64) ^ (1 << 63)).to_be_bytes()
}

/// `name`, a 0 byte, then the time: a series' key prefix up to a time.
fn series_key(name: &str, ms: i64) -> Vec<u8> {
    let mut key = name.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&time_bytes(ms));
    key
}

/// The newest `limit` records of series `name` in `tree` whose time is within
/// `from_ms..=to_ms`, in order.
fn series<T: for<'de> serde::Deserialize<'de>>(
    tree: &sled::Tree,
    name: &str,
    from_ms: i64,
    to_ms: i64,
    limit: usize,
    what: &str,
) -> Result<Vec<T>, DbError> {
    let (from, to) = (
        series_key(name, from_ms),
        series_key(name, to_ms.saturating_add(1)),
    );
    let mut records = tree
        .range(from..to)
        .values()
        .rev()
        .take(limit)
        .map(|v| decode(&format!("{what}/{name}"), &v?))
        .collect::<Result<Vec<T>, _>>()?;
    records.reverse();
    Ok(records)
}

/// A report's key: device, interval end, sequence number.
fn report_key(r: &TelemetryReport) -> Vec<u8> {
    let mut key = series_key(&r.device, r.to_ms);
    key.extend_from_slice(&r.seq.to_be_bytes());
    key
}

/// A point's key: model, interval end, device, sequence number, slot.
fn point_key(p: &ModelInterval) -> Vec<u8> {
    let mut key = series_key(&p.telemetry.model, p.to_ms);
    key.extend_from_slice(p.device.as_bytes());
    key.push(0);
    key.extend_from_slice(&p.seq.to_be_bytes());
    key.push(p.telemetry.slot as u8);
    key
}

/// A sample's key: model, sampling time, device, id. Everything in it is fixed for a sample,
/// so a copy sent again lands on the same key.
fn sample_key(device: &str, s: &Sample) -> Vec<u8> {
    let mut key = series_key(&s.model, s.at_ms);
    key.extend_from_slice(device.as_bytes());
    key.push(0);
    key.extend_from_slice(&s.id.to_be_bytes());
    key
}

/// Removes the records of `tree` whose key (a name, a 0 byte, then a time) is older than
/// `before_ms`; returns how many.
fn prune_series(tree: &sled::Tree, before_ms: i64) -> Result<u64, DbError> {
    let mut batch = sled::Batch::default();
    let mut removed = 0;
    for key in tree.iter().keys() {
        let key = key?;
        let Some(end) = key.iter().position(|&b| b == 0) else {
            continue;
        };
        let at = key
            .get(end + 1..end + 9)
            .and_then(|t| <[u8; 8]>::try_from(t).ok());
        if at.is_some_and(|t| t < time_bytes(before_ms)) {
            batch.remove(key);
            removed += 1;
        }
    }
    tree.apply_batch(batch)?;
    Ok(removed)
}

fn registry_key(name: &str, version: u64) -> Vec<u8> {
    let mut key = name.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&version.to_be_bytes());
    key
}

fn chunk_key(artifact: &[u8; 32], index: u32) -> [u8; 36] {
    let mut key = [0u8; 36];
    key[..32].copy_from_slice(artifact);
    key[32..].copy_from_slice(&index.to_be_bytes());
    key
}

impl SledStore {
    /// Opens (or creates) the store.
    pub fn open(dir: &Path) -> Result<Self, DbError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(32 * 1024 * 1024)
            .open()?;
        Ok(SledStore {
            artifacts: db.open_tree("artifacts")?,
            chunks: db.open_tree("chunks")?,
            chunk_files: ChunkFiles::new(&dir.join("chunks")),
            registry: db.open_tree("registry")?,
            repo: db.open_tree("repo")?,
            devices: db.open_tree("devices")?,
            enrolments: db.open_tree("enrolments")?,
            deployments: db.open_tree("deployments")?,
            director: db.open_tree("director")?,
            rollouts: db.open_tree("rollouts")?,
            audit: db.open_tree("audit")?,
            telemetry: db.open_tree("telemetry")?,
            model_telemetry: db.open_tree("model_telemetry")?,
            alerts: db.open_tree("alerts")?,
            samples: db.open_tree("samples")?,
            db,
        })
    }
}

#[async_trait::async_trait]
impl Storage for SledStore {
    async fn flush(&self) -> Result<(), DbError> {
        self.db.flush_async().await?;
        Ok(())
    }

    async fn put_chunk(&self, artifact: &[u8; 32], index: u32, data: &[u8]) -> Result<(), DbError> {
        self.chunk_files.put(artifact, index, data).await
    }

    async fn put_artifact(&self, artifact: &[u8; 32], info: &ArtifactInfo) -> Result<(), DbError> {
        self.chunk_files.sync(artifact).await?;
        self.artifacts.insert(artifact, encode(info))?;
        Ok(())
    }

    async fn remove_artifact(&self, artifact: &[u8; 32]) -> Result<(), DbError> {
        self.chunk_files.remove(artifact).await?;
        let mut batch = sled::Batch::default();
        for key in self.chunks.scan_prefix(artifact).keys() {
            batch.remove(key?);
        }
        self.chunks.apply_batch(batch)?;
        self.artifacts.remove(artifact)?;
        Ok(())
    }

    async fn artifact(&self, artifact: &[u8; 32]) -> Result<Option<ArtifactInfo>, DbError> {
        self.artifacts
            .get(artifact)?
            .map(|v| decode(&format!("artifacts/{}", hex::encode(artifact)), &v))
            .transpose()
    }

    async fn chunk(&self, artifact: &[u8; 32], index: u32) -> Result<Option<Bytes>, DbError> {
        if let Some(bytes) = self.chunk_files.get(artifact, index).await? {
            return Ok(Some(bytes));
        }
        Ok(self
            .chunks
            .get(chunk_key(artifact, index))?
            .map(|v| Bytes::copy_from_slice(&v)))
    }

    async fn put_model(&self, entry: &ModelEntry) -> Result<(), DbError> {
        let key = registry_key(&entry.manifest.name, entry.manifest.version);
        self.registry.insert(key, encode(entry))?;
        Ok(())
    }

    async fn model(&self, name: &str, version: u64) -> Result<Option<ModelEntry>, DbError> {
        self.registry
            .get(registry_key(name, version))?
            .map(|v| decode(&format!("registry/{name}/{version}"), &v))
            .transpose()
    }

    async fn models(&self) -> Result<Vec<ModelEntry>, DbError> {
        self.registry
            .iter()
            .values()
            .map(|v| decode("registry", &v?))
            .collect()
    }

    async fn repo_doc(&self, role: &str) -> Result<Option<Signed>, DbError> {
        self.repo
            .get(role)?
            .map(|v| decode(&format!("repo/{role}"), &v))
            .transpose()
    }

    async fn put_repo_doc(&self, role: &str, doc: &Signed) -> Result<(), DbError> {
        self.repo.insert(role, encode(doc))?;
        Ok(())
    }

    async fn device(&self, id: &str) -> Result<Option<DeviceEntry>, DbError> {
        self.devices
            .get(id)?
            .map(|v| decode(&format!("devices/{id}"), &v))
            .transpose()
    }

    async fn enrolment(&self, id: &str) -> Result<Option<Enrolment>, DbError> {
        self.enrolments
            .get(id)?
            .map(|v| decode(&format!("enrolments/{id}"), &v))
            .transpose()
    }

    async fn enrolments(&self) -> Result<Vec<Enrolment>, DbError> {
        self.enrolments
            .iter()
            .values()
            .map(|v| decode("enrolments", &v?))
            .collect()
    }

    async fn put_enrolment(&self, entry: &Enrolment) -> Result<(), DbError> {
        self.enrolments
            .insert(entry.device.as_str(), encode(entry))?;
        Ok(())
    }

    async fn devices(&self) -> Result<Vec<DeviceEntry>, DbError> {
        self.devices
            .iter()
            .values()
            .map(|v| decode("devices", &v?))
            .collect()
    }

    async fn put_device(&self, entry: &DeviceEntry) -> Result<(), DbError> {
        self.devices.insert(entry.id.as_str(), encode(entry))?;
        Ok(())
    }

    async fn add_deployment(&self, mut d: Deployment) -> Result<Deployment, DbError> {
        d.seq = self.db.generate_id()?;
        self.deployments.insert(d.seq.to_be_bytes(), encode(&d))?;
        Ok(d)
    }

    async fn next_id(&self) -> Result<u64, DbError> {
        Ok(self.db.generate_id()?)
    }

    async fn put_rollout(&self, rollout: &Rollout) -> Result<(), DbError> {
        self.rollouts
            .insert(rollout.id.to_be_bytes(), encode(rollout))?;
        Ok(())
    }

    async fn rollouts(&self) -> Result<Vec<Rollout>, DbError> {
        self.rollouts
            .iter()
            .values()
            .map(|v| decode("rollouts", &v?))
            .collect()
    }

    async fn append_audit(
        &self,
        who: &str,
        action: &str,
        details: serde_json::Value,
        at: i64,
    ) -> Result<AuditEntry, DbError> {
        use sled::transaction::{ConflictableTransactionError, TransactionError};
        let result = self.audit.transaction(|tx| {
            let head: Option<(u64, String)> = match tx.get(AUDIT_HEAD)? {
                Some(v) => {
                    Some(decode("audit/head", &v).map_err(ConflictableTransactionError::Abort)?)
                }
                None => None,
            };
            let entry = AuditEntry::following(head, who, action, &details, at);
            tx.insert(&entry.seq.to_be_bytes(), encode(&entry))?;
            tx.insert(AUDIT_HEAD, encode(&(entry.seq, entry.digest())))?;
            Ok(entry)
        });
        match result {
            Ok(entry) => Ok(entry),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    async fn audit(&self, since: u64) -> Result<Vec<AuditEntry>, DbError> {
        self.audit
            .range(since.max(1).to_be_bytes().to_vec()..AUDIT_HEAD.to_vec())
            .values()
            .map(|v| decode("audit", &v?))
            .collect()
    }

    async fn deployments(&self) -> Result<Vec<Deployment>, DbError> {
        self.deployments
            .iter()
            .values()
            .map(|v| decode("deployments", &v?))
            .collect()
    }

    async fn director(&self, device: &str) -> Result<DirectorEntry, DbError> {
        Ok(self
            .director
            .get(device)?
            .map(|v| decode(&format!("director/{device}"), &v))
            .transpose()?
            .unwrap_or_default())
    }

    async fn put_director(&self, device: &str, entry: &DirectorEntry) -> Result<(), DbError> {
        self.director.insert(device, encode(entry))?;
        Ok(())
    }

    async fn add_telemetry(&self, report: &TelemetryReport) -> Result<bool, DbError> {
        use sled::transaction::{TransactionError, Transactional};
        let key = report_key(report);
        let value = encode(report);
        let points: Vec<(Vec<u8>, Vec<u8>)> = ModelInterval::of(report)
            .iter()
            .map(|p| (point_key(p), encode(p)))
            .collect();
        let trees = (&self.telemetry, &self.model_telemetry);
        let result = trees.transaction(|(reports, series)| {
            if reports.get(&key)?.is_some() {
                return Ok(false);
            }
            reports.insert(key.as_slice(), value.as_slice())?;
            for (k, v) in &points {
                series.insert(k.as_slice(), v.as_slice())?;
            }
            Ok(true)
        });
        match result {
            Ok(added) => Ok(added),
            Err(TransactionError::Abort(())) => Ok(false),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    async fn model_telemetry(
        &self,
        model: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<ModelInterval>, DbError> {
        series(
            &self.model_telemetry,
            model,
            from_ms,
            to_ms,
            usize::MAX,
            "model_telemetry",
        )
    }

    async fn device_telemetry(
        &self,
        device: &str,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<TelemetryReport>, DbError> {
        series(&self.telemetry, device, from_ms, to_ms, limit, "telemetry")
    }

    async fn prune_telemetry(&self, before_ms: i64) -> Result<u64, DbError> {
        // Keys start with a name (which has no 0 byte), a 0 byte, then the time.
        let removed = prune_series(&self.telemetry, before_ms)?;
        prune_series(&self.model_telemetry, before_ms)?;
        prune_series(&self.samples, before_ms)?;
        let mut batch = sled::Batch::default();
        for entry in self.alerts.iter() {
            let (key, value) = entry?;
            let alert: Alert = decode("alerts", &value)?;
            if alert.cleared_ms.is_some_and(|at| at < before_ms) {
                batch.remove(key);
            }
        }
        self.alerts.apply_batch(batch)?;
        Ok(removed)
    }

    async fn add_samples(
        &self,
        device: &str,
        received_ms: i64,
        samples: &[Sample],
    ) -> Result<u64, DbError> {
        let mut added = 0;
        for sample in samples {
            let stored = StoredSample::new(device, received_ms, sample);
            let fresh = self.samples.compare_and_swap(
                sample_key(device, sample),
                None::<&[u8]>,
                Some(encode(&stored)),
            )?;
            added += u64::from(fresh.is_ok());
        }
        Ok(added)
    }

    async fn samples(&self, query: &SampleQuery) -> Result<Vec<StoredSample>, DbError> {
        let (from, to) = (
            series_key(&query.model, query.from_ms),
            series_key(&query.model, query.to_ms.saturating_add(1)),
        );
        let (mut found, mut bytes) = (Vec::new(), 0);
        for value in self.samples.range(from..to).values().rev() {
            if found.len() >= query.limit || bytes >= query.max_bytes {
                break;
            }
            let value = value?;
            let stored: StoredSample = decode(&format!("samples/{}", query.model), &value)?;
            if query.matches(&stored) {
                bytes += value.len();
                found.push(stored);
            }
        }
        found.reverse();
        Ok(found)
    }

    async fn put_alert(&self, alert: &Alert) -> Result<(), DbError> {
        self.alerts.insert(alert.id.to_be_bytes(), encode(alert))?;
        Ok(())
    }

    async fn alerts(&self) -> Result<Vec<Alert>, DbError> {
        self.alerts
            .iter()
            .values()
            .map(|v| decode("alerts", &v?))
            .collect()
    }
}
