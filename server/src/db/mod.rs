//! The server's embedded store (sled): artifacts in chunks, the model registry, the TUF
//! repository's current metadata, devices, deployments, rollouts and per-device director
//! counters.

use std::collections::BTreeMap;
use std::path::Path;

use modelcast_proto::desired::TrialThresholds;
use modelcast_proto::manifest::Manifest;
use modelcast_proto::metadata::Signed;
use modelcast_proto::report::DeviceReport;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::audit::AuditEntry;
use crate::rollout::Rollout;

/// Key of the audit log's head (last position and digest); sorts after every position.
const AUDIT_HEAD: &[u8] = b"~head";

/// A store failure.
#[derive(Debug, Error)]
pub enum DbError {
    /// sled failed.
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    /// A record does not decode.
    #[error("store record {key} is corrupt: {reason}")]
    Corrupt {
        /// Which record.
        key: String,
        /// Why.
        reason: String,
    },
}

/// A stored artifact's layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactInfo {
    /// Bytes.
    pub size: u64,
    /// Chunk size it is stored (and served) in.
    pub chunk_size: u32,
}

/// One published model version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEntry {
    /// The signed manifest's content.
    pub manifest: Manifest,
    /// Who published it.
    pub published_by: String,
    /// Unix seconds.
    pub published_at: i64,
    /// Where it stands in the registry.
    #[serde(default)]
    pub stage: Stage,
    /// Who moved it to that stage, and when (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged_by: Option<(String, i64)>,
}

/// A version's stage in the registry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Published; not yet vouched for.
    #[default]
    Candidate,
    /// Promoted: the version operators run in production.
    Production,
    /// Retired: it can no longer be deployed or rolled out.
    Retired,
}

/// A device as the server knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceEntry {
    /// Device id.
    pub id: String,
    /// Labels from its last report.
    pub labels: BTreeMap<String, String>,
    /// Its last state report.
    pub report: Option<DeviceReport>,
    /// Unix seconds of the last message.
    pub last_seen: i64,
    /// Its retained online status.
    pub online: bool,
}

/// An operator's order: run `model` at `version` on every device of `group`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    /// Order of deployments; later ones win per model.
    pub seq: u64,
    /// Model name.
    pub model: String,
    /// Version.
    pub version: u64,
    /// Label selector.
    pub group: String,
    /// Who deployed.
    pub by: String,
    /// Unix seconds.
    pub at: i64,
    /// Probation thresholds for the devices it moves (overriding theirs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probation: Option<TrialThresholds>,
}

/// What was last published to a device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectorEntry {
    /// Version of the last director document (the device's counter).
    pub version: u64,
    /// What it said: target paths and the repository timestamp version.
    pub content: String,
}

/// The server's store.
#[derive(Clone)]
pub struct Db {
    db: sled::Db,
    artifacts: sled::Tree,
    chunks: sled::Tree,
    registry: sled::Tree,
    repo: sled::Tree,
    devices: sled::Tree,
    deployments: sled::Tree,
    director: sled::Tree,
    rollouts: sled::Tree,
    audit: sled::Tree,
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T, DbError> {
    serde_json::from_slice(bytes).map_err(|e| DbError::Corrupt {
        key: key.into(),
        reason: e.to_string(),
    })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize")
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

impl Db {
    /// Opens (or creates) the store.
    pub fn open(dir: &Path) -> Result<Self, DbError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(32 * 1024 * 1024)
            .open()?;
        Ok(Db {
            artifacts: db.open_tree("artifacts")?,
            chunks: db.open_tree("chunks")?,
            registry: db.open_tree("registry")?,
            repo: db.open_tree("repo")?,
            devices: db.open_tree("devices")?,
            deployments: db.open_tree("deployments")?,
            director: db.open_tree("director")?,
            rollouts: db.open_tree("rollouts")?,
            audit: db.open_tree("audit")?,
            db,
        })
    }

    /// Makes everything durable.
    pub async fn flush(&self) -> Result<(), DbError> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// Stores one chunk of an artifact being uploaded.
    pub fn put_chunk(&self, artifact: &[u8; 32], index: u32, data: &[u8]) -> Result<(), DbError> {
        self.chunks.insert(chunk_key(artifact, index), data)?;
        Ok(())
    }

    /// Marks an artifact complete (after its digest was checked).
    pub fn put_artifact(&self, artifact: &[u8; 32], info: &ArtifactInfo) -> Result<(), DbError> {
        self.artifacts.insert(artifact, encode(info))?;
        Ok(())
    }

    /// Removes an artifact's chunks (a failed upload).
    pub fn remove_artifact(&self, artifact: &[u8; 32]) -> Result<(), DbError> {
        let mut batch = sled::Batch::default();
        for key in self.chunks.scan_prefix(artifact).keys() {
            batch.remove(key?);
        }
        self.chunks.apply_batch(batch)?;
        self.artifacts.remove(artifact)?;
        Ok(())
    }

    /// A complete artifact's layout.
    pub fn artifact(&self, artifact: &[u8; 32]) -> Result<Option<ArtifactInfo>, DbError> {
        self.artifacts
            .get(artifact)?
            .map(|v| decode(&format!("artifacts/{}", hex::encode(artifact)), &v))
            .transpose()
    }

    /// One chunk of a complete artifact.
    pub fn chunk(&self, artifact: &[u8; 32], index: u32) -> Result<Option<sled::IVec>, DbError> {
        Ok(self.chunks.get(chunk_key(artifact, index))?)
    }

    /// Records a published version.
    pub fn put_model(&self, entry: &ModelEntry) -> Result<(), DbError> {
        let key = registry_key(&entry.manifest.name, entry.manifest.version);
        self.registry.insert(key, encode(entry))?;
        Ok(())
    }

    /// One published version.
    pub fn model(&self, name: &str, version: u64) -> Result<Option<ModelEntry>, DbError> {
        self.registry
            .get(registry_key(name, version))?
            .map(|v| decode(&format!("registry/{name}/{version}"), &v))
            .transpose()
    }

    /// Every published version, by name then version.
    pub fn models(&self) -> Result<Vec<ModelEntry>, DbError> {
        self.registry
            .iter()
            .values()
            .map(|v| decode("registry", &v?))
            .collect()
    }

    /// A repository document (`targets`, `snapshot`, `timestamp`).
    pub fn repo_doc(&self, role: &str) -> Result<Option<Signed>, DbError> {
        self.repo
            .get(role)?
            .map(|v| decode(&format!("repo/{role}"), &v))
            .transpose()
    }

    /// Replaces a repository document.
    pub fn put_repo_doc(&self, role: &str, doc: &Signed) -> Result<(), DbError> {
        self.repo.insert(role, encode(doc))?;
        Ok(())
    }

    /// One device.
    pub fn device(&self, id: &str) -> Result<Option<DeviceEntry>, DbError> {
        self.devices
            .get(id)?
            .map(|v| decode(&format!("devices/{id}"), &v))
            .transpose()
    }

    /// Every device.
    pub fn devices(&self) -> Result<Vec<DeviceEntry>, DbError> {
        self.devices
            .iter()
            .values()
            .map(|v| decode("devices", &v?))
            .collect()
    }

    /// Records a device.
    pub fn put_device(&self, entry: &DeviceEntry) -> Result<(), DbError> {
        self.devices.insert(entry.id.as_str(), encode(entry))?;
        Ok(())
    }

    /// Appends a deployment, assigning its sequence number.
    pub fn add_deployment(&self, mut d: Deployment) -> Result<Deployment, DbError> {
        d.seq = self.db.generate_id()?;
        self.deployments.insert(d.seq.to_be_bytes(), encode(&d))?;
        Ok(d)
    }

    /// A new id, ordered with deployments (later ones win).
    pub fn next_id(&self) -> Result<u64, DbError> {
        Ok(self.db.generate_id()?)
    }

    /// Stores a rollout (flush before acting on it).
    pub fn put_rollout(&self, rollout: &Rollout) -> Result<(), DbError> {
        self.rollouts
            .insert(rollout.id.to_be_bytes(), encode(rollout))?;
        Ok(())
    }

    /// Every rollout, oldest first.
    pub fn rollouts(&self) -> Result<Vec<Rollout>, DbError> {
        self.rollouts
            .iter()
            .values()
            .map(|v| decode("rollouts", &v?))
            .collect()
    }

    /// Appends an entry to the audit log (one transaction: its position and its link to the
    /// previous entry cannot race with another append).
    pub fn append_audit(
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
            let (seq, prev) = head.map_or((1, String::new()), |(s, d)| (s + 1, d));
            let entry = AuditEntry {
                seq,
                at,
                who: who.into(),
                action: action.into(),
                details: details.clone(),
                prev,
            };
            tx.insert(&seq.to_be_bytes(), encode(&entry))?;
            tx.insert(AUDIT_HEAD, encode(&(seq, entry.digest())))?;
            Ok(entry)
        });
        match result {
            Ok(entry) => Ok(entry),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    /// The audit log from position `since` on (1 is the first entry).
    pub fn audit(&self, since: u64) -> Result<Vec<AuditEntry>, DbError> {
        self.audit
            .range(since.max(1).to_be_bytes().to_vec()..AUDIT_HEAD.to_vec())
            .values()
            .map(|v| decode("audit", &v?))
            .collect()
    }

    /// Every deployment, oldest first.
    pub fn deployments(&self) -> Result<Vec<Deployment>, DbError> {
        self.deployments
            .iter()
            .values()
            .map(|v| decode("deployments", &v?))
            .collect()
    }

    /// What was last published to `device`.
    pub fn director(&self, device: &str) -> Result<DirectorEntry, DbError> {
        Ok(self
            .director
            .get(device)?
            .map(|v| decode(&format!("director/{device}"), &v))
            .transpose()?
            .unwrap_or_default())
    }

    /// Records what was published to `device`.
    pub fn put_director(&self, device: &str, entry: &DirectorEntry) -> Result<(), DbError> {
        self.director.insert(device, encode(entry))?;
        Ok(())
    }
}
