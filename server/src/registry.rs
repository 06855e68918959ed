//! The model registry: artifacts stored, operator-signed targets published (versions added,
//! versions left out retired), versions promoted and retired, deployments made, roots
//! rotated. Each operation checks what it is given, stores and flushes, appends to the audit
//! log and publishes the desired states it changes ([`Fleet::publish_all`]). The API's
//! handlers ([`crate::api`]) only parse, authorize and answer.

use modelcast_proto::chunk::parse_digest;
use modelcast_proto::manifest::{Manifest, MAX_CHUNK_SIZE};
use modelcast_proto::metadata::Signed;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::db::{ArtifactInfo, DbError, Deployment, ModelEntry, Stage};
use crate::fleet::Fleet;
use crate::group::Selector;
use crate::repo::{RepoError, TargetsUpload};
use crate::unix_now;

/// Why a registry operation was refused or failed. The API answers 400, 404, 409, 413 and 500
/// for them in that order.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The request is invalid (a bad digest, signature, selector, threshold).
    #[error("{0}")]
    Invalid(String),
    /// No such model version.
    #[error("{0}")]
    NotFound(String),
    /// It contradicts what is stored (a version published as something else, a retired
    /// version deployed, a version removed while devices are meant to run it).
    #[error("{0}")]
    Conflict(String),
    /// An upload over the server's limit.
    #[error("{0}")]
    TooLarge(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] DbError),
    /// The repository failed to store or sign.
    #[error(transparent)]
    Repository(RepoError),
}

/// What a publication changed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Published {
    /// The top-level targets' version.
    pub targets_version: u64,
    /// Target paths added.
    pub added: Vec<String>,
    /// Target paths left out (their versions retired).
    pub removed: Vec<String>,
    /// Devices whose desired state changed.
    pub devices_updated: usize,
}

/// What a root rotation did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootRotated {
    /// The new root's version.
    pub root_version: u64,
    /// Targets kept under it.
    pub targets_kept: usize,
    /// Devices whose desired state changed.
    pub devices_updated: usize,
}

/// One version in a model's history, with the devices that serve it.
#[derive(Debug, Serialize, Deserialize)]
pub struct VersionHistory {
    /// The registry entry.
    #[serde(flatten)]
    pub entry: ModelEntry,
    /// Devices whose last report says they serve it.
    pub devices: Vec<String>,
}

/// Appends to the audit log.
pub async fn record(
    fleet: &Fleet,
    who: &str,
    action: &str,
    details: serde_json::Value,
) -> Result<(), RegistryError> {
    fleet
        .db()
        .append_audit(who, action, details, unix_now())
        .await?;
    Ok(())
}

/// An artifact being uploaded: its bytes stored in chunk-sized records as they come, hashed
/// as they go; kept only if the digest matches ([`Upload::finish`]).
pub struct Upload<'a> {
    fleet: &'a Fleet,
    sha256: String,
    digest: [u8; 32],
    chunk: usize,
    /// Where the chunking restarts.
    segments: Vec<u64>,
    /// The first of `segments` past `chunk_start`.
    next_segment: usize,
    /// Offset of the chunk in `buf`.
    chunk_start: u64,
    limit: u64,
    hasher: Sha256,
    buf: Vec<u8>,
    index: u32,
    size: u64,
}

/// How an upload begins.
pub enum Begun<'a> {
    /// The artifact is stored already (the same file under another name or version).
    Stored(ArtifactInfo),
    /// Its bytes are to come.
    New(Box<Upload<'a>>),
}

impl<'a> Upload<'a> {
    /// Begins uploading the artifact `sha256` in chunks of `chunk_size` restarting at
    /// `segments` ([`modelcast_proto::manifest::spans`]), at most `limit` bytes (`declared`, if
    /// the client said its size, is checked before a byte is read).
    pub async fn begin(
        fleet: &'a Fleet,
        sha256: &str,
        chunk_size: u32,
        segments: Vec<u64>,
        limit: u64,
        declared: Option<u64>,
    ) -> Result<Begun<'a>, RegistryError> {
        let digest = parse_digest(sha256).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        if chunk_size == 0 || chunk_size > MAX_CHUNK_SIZE {
            return Err(RegistryError::Invalid(format!(
                "chunk_size must be 1..={MAX_CHUNK_SIZE}"
            )));
        }
        modelcast_proto::manifest::check_segments(u64::MAX, &segments)
            .map_err(|e| RegistryError::Invalid(e.to_string()))?;
        if let Some(n) = declared.filter(|&n| n > limit) {
            return Err(too_large(&format!("an artifact of {n} bytes"), limit));
        }
        if let Some(info) = fleet.db().artifact(&digest).await? {
            return Ok(Begun::Stored(info));
        }
        Ok(Begun::New(Box::new(Upload {
            fleet,
            sha256: sha256.to_string(),
            digest,
            chunk: chunk_size as usize,
            segments,
            next_segment: 0,
            chunk_start: 0,
            limit,
            hasher: Sha256::new(),
            buf: Vec::with_capacity(chunk_size as usize),
            index: 0,
            size: 0,
        })))
    }

    /// Takes the next bytes of the body.
    pub async fn push(&mut self, bytes: &[u8]) -> Result<(), RegistryError> {
        self.size += bytes.len() as u64;
        if self.size > self.limit {
            return Err(too_large("the artifact", self.limit));
        }
        self.hasher.update(bytes);
        let mut rest = bytes;
        while !rest.is_empty() {
            let want = self.current_len();
            let take = (want - self.buf.len()).min(rest.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.buf.len() == want {
                self.put_chunk().await?;
                self.index += 1;
                self.chunk_start += want as u64;
                self.buf.clear();
                while self
                    .segments
                    .get(self.next_segment)
                    .is_some_and(|&s| s <= self.chunk_start)
                {
                    self.next_segment += 1;
                }
            }
        }
        Ok(())
    }

    /// The length the chunk in `buf` will have unless the body ends first.
    fn current_len(&self) -> usize {
        match self.segments.get(self.next_segment) {
            Some(&next) => (next - self.chunk_start).min(self.chunk as u64) as usize,
            None => self.chunk,
        }
    }

    /// Checks the digest and keeps the artifact (flushed, and in the audit log as `who`'s);
    /// its size. What does not match is removed.
    pub async fn finish(mut self, who: &str) -> Result<u64, RegistryError> {
        let kept = self.keep().await;
        if kept.is_err() {
            self.abandon().await;
            return kept;
        }
        record(
            self.fleet,
            who,
            "upload",
            json!({ "sha256": self.sha256, "size": self.size }),
        )
        .await?;
        tracing::info!(sha256 = %self.sha256, size = self.size, "artifact stored");
        kept
    }

    async fn keep(&mut self) -> Result<u64, RegistryError> {
        if !self.buf.is_empty() {
            self.put_chunk().await?;
        }
        let db = self.fleet.db();
        let hasher = std::mem::take(&mut self.hasher);
        if hex::encode(hasher.finalize()) != self.sha256 {
            return Err(RegistryError::Invalid(
                "uploaded bytes do not match the sha256 in the path".into(),
            ));
        }
        if self.size == 0 {
            return Err(RegistryError::Invalid("empty artifact".into()));
        }
        modelcast_proto::manifest::check_segments(self.size, &self.segments)
            .map_err(|e| RegistryError::Invalid(e.to_string()))?;
        db.put_artifact(
            &self.digest,
            &ArtifactInfo {
                size: self.size,
                chunk_size: self.chunk as u32,
                segments: std::mem::take(&mut self.segments),
            },
        )
        .await?;
        db.flush().await?;
        Ok(self.size)
    }

    /// Stores the chunk in `buf`, and its packed copy where compression shrinks it
    /// ([`crate::compress`]; packed on a blocking thread).
    async fn put_chunk(&self) -> Result<(), RegistryError> {
        let db = self.fleet.db();
        db.put_chunk(&self.digest, self.index, &self.buf).await?;
        if !self.fleet.compresses() {
            return Ok(());
        }
        let chunk = bytes::Bytes::copy_from_slice(&self.buf);
        let packed = tokio::task::spawn_blocking(move || crate::compress::pack(&chunk))
            .await
            .ok()
            .and_then(|p| crate::compress::to_stored(&p));
        if let Some(stored) = packed {
            let key = crate::compress::packed_key(&self.digest);
            db.put_chunk(&key, self.index, &stored).await?;
        }
        Ok(())
    }

    /// Removes what was stored of it (the body failed or was refused).
    pub async fn abandon(self) {
        let _ = self.fleet.db().remove_artifact(&self.digest).await;
        let packed = crate::compress::packed_key(&self.digest);
        let _ = self.fleet.db().remove_artifact(&packed).await;
    }
}

fn too_large(what: &str, limit: u64) -> RegistryError {
    RegistryError::TooLarge(format!(
        "{what} is over this server's limit of {limit} bytes (--max-artifact-bytes)"
    ))
}

/// Every target's files (the artifact of each of its forms and its golden file) must be
/// uploaded, in the chunk size its manifest says.
pub async fn check_artifacts(fleet: &Fleet, manifests: &[Manifest]) -> Result<(), RegistryError> {
    for m in manifests {
        let path = m.target_path();
        for part in m.parts().into_iter().chain(m.form_layouts()) {
            let digest =
                parse_digest(part.sha256).map_err(|e| RegistryError::Invalid(e.to_string()))?;
            match fleet.db().artifact(&digest).await? {
                Some(a)
                    if a.size == part.size
                        && a.chunk_size == part.chunk_size
                        && a.segments == part.segments => {}
                Some(_) => {
                    return Err(RegistryError::Invalid(format!(
                        "{path}: stored file {}'s layout differs from its manifest",
                        part.sha256
                    )))
                }
                None => {
                    return Err(RegistryError::Invalid(format!(
                        "{path}: file {} not uploaded",
                        part.sha256
                    )))
                }
            }
        }
    }
    Ok(())
}

/// Publishes operator-signed targets: the versions they add become candidates, the ones they
/// leave out are retired (refused while a deployment or rollout still names one for a device).
pub async fn publish(
    fleet: &Fleet,
    upload: &TargetsUpload,
    key_escrow: &std::collections::BTreeMap<String, modelcast_proto::seal::KeyWrap>,
    who: &str,
) -> Result<Published, RegistryError> {
    let db = fleet.db();
    let now = unix_now();
    let checked = fleet
        .repo()
        .check_upload(upload, now)
        .await
        .map_err(|e| RegistryError::Invalid(e.to_string()))?;
    let mut new = Vec::new();
    for m in checked.manifests {
        match db.model(&m.name, m.version).await? {
            None => new.push(m),
            Some(e) if e.manifest.target_path() == m.target_path() => {}
            Some(e) => {
                return Err(RegistryError::Conflict(format!(
                    "{} version {} is already published (as {})",
                    m.name,
                    m.version,
                    e.manifest.target_path()
                )))
            }
        }
    }
    check_artifacts(fleet, &new).await?;
    // An encrypted version comes with its content key sealed to this server, which opens.
    for m in new.iter().filter(|m| m.encryption.is_some()) {
        let wrap = key_escrow.get(&m.sha256).ok_or_else(|| {
            RegistryError::Invalid(format!(
                "{} is encrypted but its content key did not come sealed to this server",
                m.target_path()
            ))
        })?;
        fleet
            .repo()
            .open_escrow(wrap, &m.sha256)
            .map_err(|e| RegistryError::Invalid(e.to_string()))?;
    }
    // A version leaves the repository only when no device is meant to run it.
    if !checked.removed.is_empty() {
        for d in db.devices().await? {
            for (m, _) in fleet.wanted(&d).await? {
                if checked.removed.contains(&m.target_path()) {
                    return Err(RegistryError::Conflict(format!(
                        "{} is still meant to run on device {} (a deployment or rollout names \
                         it): deploy another version first",
                        m.target_path(),
                        d.id
                    )));
                }
            }
        }
    }
    fleet
        .repo()
        .store_upload(upload, now)
        .await
        .map_err(RegistryError::Repository)?;
    let mut added = Vec::new();
    for m in new {
        added.push(m.target_path());
        db.put_model(&ModelEntry {
            key_escrow: m
                .encryption
                .as_ref()
                .and_then(|_| key_escrow.get(&m.sha256).cloned()),
            manifest: m,
            published_by: who.to_string(),
            published_at: now,
            stage: Stage::Candidate,
            staged_by: None,
        })
        .await?;
    }
    if !checked.removed.is_empty() {
        for mut entry in db.models().await? {
            if checked.removed.contains(&entry.manifest.target_path())
                && entry.stage != Stage::Retired
            {
                entry.stage = Stage::Retired;
                entry.staged_by = Some((who.to_string(), now));
                db.put_model(&entry).await?;
            }
        }
    }
    db.flush().await?;
    tracing::info!(?added, removed = ?checked.removed, by = %who, "targets published");
    record(
        fleet,
        who,
        "publish",
        json!({
            "targets_version": checked.targets_version,
            "added": added,
            "removed": checked.removed,
            "roles": upload.delegated.keys().collect::<Vec<_>>(),
        }),
    )
    .await?;
    let devices_updated = fleet
        .publish_all()
        .await
        .map_err(RegistryError::Repository)?;
    Ok(Published {
        targets_version: checked.targets_version,
        added,
        removed: checked.removed,
        devices_updated,
    })
}

/// Rotates to the next root (`targets`: the current targets re-signed under it, needed when
/// the targets keys change; their artifacts must be stored).
pub async fn rotate_root(
    fleet: &Fleet,
    root: &Signed,
    targets: Option<&Signed>,
    who: &str,
) -> Result<RootRotated, RegistryError> {
    if let Some(t) = targets {
        let parsed: modelcast_proto::metadata::Targets = t
            .parse("targets")
            .map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let manifests = parsed
            .targets
            .iter()
            .map(|(path, t)| Manifest::from_target(path, t))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| RegistryError::Invalid(e.to_string()))?;
        check_artifacts(fleet, &manifests).await?;
    }
    let kept = fleet
        .repo()
        .accept_root(root, targets, unix_now())
        .await
        .map_err(|e| RegistryError::Invalid(e.to_string()))?;
    let root_version = fleet.repo().root().signed["version"].as_u64().unwrap_or(0);
    fleet.db().flush().await?;
    tracing::warn!(version = root_version, by = %who, "root rotated");
    record(
        fleet,
        who,
        "root.rotate",
        json!({ "root_version": root_version }),
    )
    .await?;
    let devices_updated = fleet
        .publish_all()
        .await
        .map_err(RegistryError::Repository)?;
    Ok(RootRotated {
        root_version,
        targets_kept: kept.len(),
        devices_updated,
    })
}

/// Every published version of model `name`, with the devices that serve each.
pub async fn history(fleet: &Fleet, name: &str) -> Result<Vec<VersionHistory>, RegistryError> {
    let db = fleet.db();
    let devices = db.devices().await?;
    let history: Vec<VersionHistory> = db
        .models()
        .await?
        .into_iter()
        .filter(|e| e.manifest.name == name)
        .map(|entry| {
            let version = entry.manifest.version;
            let devices = devices
                .iter()
                .filter(|d| {
                    d.report
                        .as_ref()
                        .and_then(|r| r.models.get(name)?.serving_version())
                        == Some(version)
                })
                .map(|d| d.id.clone())
                .collect();
            VersionHistory { entry, devices }
        })
        .collect();
    if history.is_empty() {
        return Err(RegistryError::NotFound(format!(
            "no model {name:?} is published"
        )));
    }
    Ok(history)
}

/// Moves version `version` of `name` to `stage`: promoted to production (the production
/// version before it goes back to candidate) or retired (no new deployment or rollout may
/// name it).
pub async fn stage(
    fleet: &Fleet,
    name: &str,
    version: u64,
    stage: Stage,
    who: &str,
) -> Result<ModelEntry, RegistryError> {
    let db = fleet.db();
    let mut entry = db.model(name, version).await?.ok_or_else(|| {
        RegistryError::NotFound(format!("model {name} version {version} is not published"))
    })?;
    let now = unix_now();
    if stage == Stage::Production {
        for mut other in db.models().await? {
            if other.manifest.name == name
                && other.manifest.version != version
                && other.stage == Stage::Production
            {
                other.stage = Stage::Candidate;
                other.staged_by = Some((who.to_string(), now));
                db.put_model(&other).await?;
            }
        }
    }
    entry.stage = stage;
    entry.staged_by = Some((who.to_string(), now));
    db.put_model(&entry).await?;
    db.flush().await?;
    let action = match stage {
        Stage::Production => "model.promote",
        Stage::Retired => "model.retire",
        Stage::Candidate => "model.candidate",
    };
    record(
        fleet,
        who,
        action,
        json!({ "model": name, "version": version }),
    )
    .await?;
    Ok(entry)
}

/// Refuses a retired version.
pub async fn check_not_retired(
    fleet: &Fleet,
    model: &str,
    version: u64,
) -> Result<(), RegistryError> {
    match fleet.db().model(model, version).await? {
        Some(e) if e.stage == Stage::Retired => Err(RegistryError::Conflict(format!(
            "model {model} version {version} is retired"
        ))),
        _ => Ok(()),
    }
}

/// Deploys `d` (its `seq` is given by the store): a published, not retired version to a
/// group; the desired states it changes are published. The deployment as stored and the
/// number of devices it moved.
pub async fn deploy(fleet: &Fleet, d: Deployment) -> Result<(Deployment, usize), RegistryError> {
    check_not_retired(fleet, &d.model, d.version).await?;
    Selector::parse(&d.group).map_err(|e| RegistryError::Invalid(e.to_string()))?;
    if let Some(t) = &d.probation {
        t.validate()
            .map_err(|e| RegistryError::Invalid(e.to_string()))?;
    }
    if let Some(s) = &d.sampling {
        s.validate()
            .map_err(|e| RegistryError::Invalid(e.to_string()))?;
    }
    if let Some(p) = &d.download {
        p.validate()
            .map_err(|e| RegistryError::Invalid(e.to_string()))?;
    }
    if let Some(s) = &d.shadow {
        s.validate()
            .map_err(|e| RegistryError::Invalid(e.to_string()))?;
    }
    if let Some(c) = &d.canary {
        c.validate()
            .map_err(|e| RegistryError::Invalid(e.to_string()))?;
    }
    if fleet.db().model(&d.model, d.version).await?.is_none() {
        return Err(RegistryError::NotFound(format!(
            "model {} version {} is not published",
            d.model, d.version
        )));
    }
    let d = fleet.db().add_deployment(d).await?;
    fleet.db().flush().await?;
    let updated = fleet
        .publish_all()
        .await
        .map_err(RegistryError::Repository)?;
    tracing::info!(model = %d.model, version = d.version, group = %d.group, devices = updated, "deployed");
    record(
        fleet,
        &d.by,
        "deploy",
        json!({
            "model": d.model,
            "version": d.version,
            "group": d.group,
            "probation": d.probation,
            "sampling": d.sampling,
            "download": d.download,
        }),
    )
    .await?;
    Ok((d, updated))
}
