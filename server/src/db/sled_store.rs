//! The embedded store: sled trees on local disk, one box, no other process.

use std::path::Path;

use bytes::Bytes;

use super::{
    decode, encode, ArtifactInfo, AuditEntry, DbError, Deployment, DeviceEntry, DirectorEntry,
    ModelEntry, Rollout, Signed, Storage,
};

/// Key of the audit log's head (last position and digest); sorts after every position.
const AUDIT_HEAD: &[u8] = b"~head";

/// The sled store.
#[derive(Clone)]
pub struct SledStore {
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
}

#[async_trait::async_trait]
impl Storage for SledStore {
    async fn flush(&self) -> Result<(), DbError> {
        self.db.flush_async().await?;
        Ok(())
    }

    async fn put_chunk(&self, artifact: &[u8; 32], index: u32, data: &[u8]) -> Result<(), DbError> {
        self.chunks.insert(chunk_key(artifact, index), data)?;
        Ok(())
    }

    async fn put_artifact(&self, artifact: &[u8; 32], info: &ArtifactInfo) -> Result<(), DbError> {
        self.artifacts.insert(artifact, encode(info))?;
        Ok(())
    }

    async fn remove_artifact(&self, artifact: &[u8; 32]) -> Result<(), DbError> {
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
}
