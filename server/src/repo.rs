//! The server side of the TUF repository and the Uptane director.
//!
//! Operators sign `targets` offline and upload it; the server checks it against the trusted
//! root, then signs fresh `snapshot` and `timestamp` documents with its online key. For each
//! device the director signs a `targets` document naming the models that device should run.
//!
//! Models live in hash bins ([`modelcast_proto::bins`]): the top-level targets delegate every
//! path to one of them, and a publish uploads the one bin it changed (signed offline too),
//! so neither a publish nor a device's metadata grows with the repository's history. A
//! device receives the top-level targets and the bins of its own models; the snapshot names
//! every bin's version. A version removed from its bin (retired) leaves the repository.
//!
//! Operators rotate keys by uploading the next root (signed by a threshold of the old and of
//! the new root keys), with the targets re-signed under it. The server keeps every root
//! after the provisioned one and sends that chain with each desired state, so a device
//! provisioned with any earlier root walks the rotations one version at a time.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use modelcast_proto::bins;
use modelcast_proto::desired::{DesiredState, RepositoryMetadata, TargetTerms};
use modelcast_proto::keys::SigningKey;
use modelcast_proto::manifest::Manifest;
use modelcast_proto::metadata::{
    format_expiry, parse_expiry, MetaFile, MetaIndex, Root, Signed, Targets,
};
use thiserror::Error;

use crate::db::{Db, DbError};

/// Lifetime of the server's snapshot, timestamp and director documents.
pub const ONLINE_LIFETIME_SECS: i64 = 7 * 24 * 3600;

/// Key of a delegated role's document in the store.
fn role_key(role: &str) -> String {
    format!("role:{role}")
}

/// What operators upload to change the repository: the top-level targets when they change
/// (first publish, delegation to the bins), and the delegated roles (bins) they re-signed.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct TargetsUpload {
    /// New top-level targets, if they changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<Signed>,
    /// Re-signed delegated roles, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub delegated: BTreeMap<String, Signed>,
}

/// What an accepted upload changed.
#[derive(Debug, Clone, Default)]
pub struct Accepted {
    /// Every manifest the uploaded documents list (new or not).
    pub manifests: Vec<Manifest>,
    /// Target paths the uploaded documents no longer list (removed versions).
    pub removed: Vec<String>,
    /// The top-level targets version now current.
    pub targets_version: u64,
}

/// Why uploaded metadata was refused.
#[derive(Debug, Error)]
pub enum RepoError {
    /// The store failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The document failed verification.
    #[error("targets rejected: {0}")]
    Rejected(String),
    /// Nothing published yet.
    #[error("no targets have been published yet")]
    Empty,
}

/// The repository with the server's online key.
#[derive(Clone)]
pub struct Repository {
    db: Db,
    /// The root devices were provisioned with (`root.json` beside the keys).
    provisioned: Signed,
    /// The newest trusted root (the provisioned one until operators rotate).
    root: Arc<RwLock<Signed>>,
    online: SigningKey,
    /// The escrow key content keys of encrypted versions are sealed to; none: encrypted
    /// versions cannot be published here.
    escrow: Option<Arc<modelcast_proto::seal::OpeningKey>>,
}

fn root_doc(root: &Signed) -> Result<Root, RepoError> {
    root.parse("root")
        .map_err(|e| RepoError::Rejected(e.to_string()))
}

fn check_online_key(doc: &Root, online: &SigningKey) -> Result<(), RepoError> {
    for role in ["snapshot", "timestamp"] {
        let ok = doc
            .roles
            .get(role)
            .is_some_and(|r| r.keyids.contains(&online.public().key_id()));
        if !ok {
            return Err(RepoError::Rejected(format!(
                "root does not delegate {role} to the server key"
            )));
        }
    }
    Ok(())
}

fn version_of_targets(doc: &Signed) -> u64 {
    doc.signed["version"].as_u64().unwrap_or(0)
}

fn meta(file: &str, version: u64) -> BTreeMap<String, MetaFile> {
    BTreeMap::from([(
        file.to_string(),
        MetaFile {
            version,
            length: None,
            hashes: None,
        },
    )])
}

impl Repository {
    /// A repository anchored at `root`, signing with `online`. Checks that the root
    /// delegates snapshot and timestamp to that key.
    pub async fn new(db: Db, root: Signed, online: SigningKey) -> Result<Self, RepoError> {
        let provisioned_version = root_doc(&root)?.version;
        // A root rotated since provisioning is in the store.
        let current = match db.repo_doc("root").await? {
            Some(stored) if root_doc(&stored)?.version > provisioned_version => stored,
            _ => root.clone(),
        };
        check_online_key(&root_doc(&current)?, &online)?;
        Ok(Repository {
            db,
            provisioned: root,
            root: Arc::new(RwLock::new(current)),
            online,
            escrow: None,
        })
    }

    /// Holds encrypted versions' content keys sealed to `escrow` (see [`crate::keyset::escrow_key`]).
    pub fn with_escrow(mut self, escrow: modelcast_proto::seal::OpeningKey) -> Self {
        self.escrow = Some(Arc::new(escrow));
        self
    }

    /// The escrow key's public half, which publishers seal content keys to.
    pub fn escrow_key(&self) -> Option<modelcast_proto::seal::SealingKey> {
        self.escrow.as_ref().map(|e| e.sealing_key())
    }

    /// The content key of encrypted artifact `sha256`, from its escrow wrap.
    pub fn open_escrow(
        &self,
        wrap: &modelcast_proto::seal::KeyWrap,
        sha256: &str,
    ) -> Result<modelcast_proto::seal::ContentKey, RepoError> {
        let escrow = self
            .escrow
            .as_ref()
            .ok_or_else(|| RepoError::Rejected("this server has no escrow key".into()))?;
        escrow
            .open(wrap, modelcast_proto::seal::ESCROW, sha256)
            .map_err(|e| RepoError::Rejected(format!("the content key of {sha256}: {e}")))
    }

    /// The content key of encrypted artifact `sha256` (escrowed in `escrow`) sealed to
    /// `device`'s key (hex): the same wrap each time for the same device key (seeded from the
    /// escrow key, the device, its key and the artifact), so a desired state changes only when
    /// the device's key does.
    pub fn wrap_for(
        &self,
        escrow: &modelcast_proto::seal::KeyWrap,
        sha256: &str,
        device: &str,
        device_key: &str,
    ) -> Result<modelcast_proto::seal::KeyWrap, RepoError> {
        let to = modelcast_proto::seal::SealingKey::from_hex(device_key)
            .map_err(|e| RepoError::Rejected(format!("device {device}'s key: {e}")))?;
        let key = self.open_escrow(escrow, sha256)?;
        let secret = self.escrow.as_ref().expect("opened above").to_bytes();
        // A keyed hash: the escrow secret, then what the wrap is for.
        use sha2::Digest;
        let seed: [u8; 32] = sha2::Sha256::new()
            .chain_update(&secret)
            .chain_update(format!("wrap seed\0{device}\0{}\0{sha256}", to.to_hex()))
            .finalize()
            .into();
        Ok(to.wrap_seeded(&key, device, sha256, seed))
    }

    /// The newest trusted root.
    pub fn root(&self) -> Signed {
        self.root.read().expect("root lock").clone()
    }

    /// Every root after version 1 that this server knows, oldest first: what a device
    /// provisioned with any earlier root needs to walk to the newest one (even after the
    /// operators put a newer `root.json` beside the keys for new devices).
    pub async fn root_chain(&self) -> Result<Vec<Signed>, RepoError> {
        let provisioned = root_doc(&self.provisioned)?.version;
        let to = root_doc(&self.root())?.version;
        let mut chain = Vec::new();
        for v in 2..=to {
            match self.db.repo_doc(&format!("root.{v}")).await? {
                Some(r) => chain.push(r),
                None if v == provisioned => chain.push(self.provisioned.clone()),
                // Older than anything this server saw: devices start at or after it.
                None if v < provisioned => chain.clear(),
                None => return Err(RepoError::Rejected(format!("root version {v} missing"))),
            }
        }
        Ok(chain)
    }

    /// Makes `next` the trusted root: TUF §5.3's rules (exactly one version newer, signed by
    /// a threshold of the current root's root keys and of its own), still delegating
    /// snapshot and timestamp to this server, not expired. `targets`, when given, are the
    /// operators' targets re-signed under the new root (needed when the targets keys
    /// change); they become current in the same step.
    pub async fn accept_root(
        &self,
        next: &Signed,
        targets: Option<&Signed>,
        now: i64,
    ) -> Result<Vec<Manifest>, RepoError> {
        let reject = |e: String| RepoError::Rejected(e);
        let current = self.root();
        let current_version = root_doc(&current)?.version;
        let rotated = modelcast_proto::verify::update_root(&current, std::slice::from_ref(next))
            .map_err(|e| reject(format!("root: {e}")))?;
        let doc = root_doc(&rotated)?;
        if doc.version != current_version + 1 {
            return Err(reject(format!(
                "root version {} is not the next after {current_version}",
                doc.version
            )));
        }
        if parse_expiry(&doc.expires).map_err(|e| reject(e.to_string()))? <= now {
            return Err(reject(format!("root expired at {}", doc.expires)));
        }
        check_online_key(&doc, &self.online)?;
        let targets = match targets {
            Some(t) => Some((t, self.check_targets(&doc, t, now).await?.1)),
            None => {
                // The current targets must still verify under the new root.
                if let Some(t) = self.targets().await? {
                    let verifier = doc.role("targets").map_err(|e| reject(e.to_string()))?;
                    t.verify::<Targets>(&verifier, "targets").map_err(|e| {
                        reject(format!(
                            "the current targets do not verify under root {}: {e}; re-sign them",
                            doc.version
                        ))
                    })?;
                }
                None
            }
        };
        self.db
            .put_repo_doc(&format!("root.{}", doc.version), &rotated)
            .await?;
        self.db.put_repo_doc("root", &rotated).await?;
        *self.root.write().expect("root lock") = rotated;
        let manifests = match targets {
            Some((envelope, manifests)) => {
                self.db.put_repo_doc("targets", envelope).await?;
                manifests
            }
            None => Vec::new(),
        };
        if self.db.repo_doc("targets").await?.is_some() {
            self.refresh(now).await?;
        }
        Ok(manifests)
    }

    /// Checks operator-signed targets and makes them current: signature by root's targets
    /// role, a higher version than the current one, not expired, every manifest consistent.
    pub async fn accept_targets(
        &self,
        envelope: &Signed,
        now: i64,
    ) -> Result<Vec<Manifest>, RepoError> {
        let upload = TargetsUpload {
            targets: Some(envelope.clone()),
            delegated: BTreeMap::new(),
        };
        let checked = self.check_upload(&upload, now).await?;
        self.store_upload(&upload, now).await?;
        Ok(checked.manifests)
    }

    /// Checks an upload without storing it: the top-level targets (if given) as
    /// [`Repository::accept_targets`] does; each delegated role named by the top-level
    /// delegation, signed by its keys, newer than the stored one, not expired, listing only
    /// paths delegated to it, every manifest consistent.
    pub async fn check_upload(
        &self,
        upload: &TargetsUpload,
        now: i64,
    ) -> Result<Accepted, RepoError> {
        let reject = |e: String| RepoError::Rejected(e);
        let root = root_doc(&self.root())?;
        let stored_top = self.top().await?;
        let mut accepted = Accepted::default();
        // The upload delegates the bins to new keys (after a rotation).
        let mut rekeyed = false;
        let top = match &upload.targets {
            Some(envelope) => {
                let (top, manifests) = self.check_targets(&root, envelope, now).await?;
                if let Some(old) = &stored_top {
                    accepted.removed.extend(
                        old.targets
                            .keys()
                            .filter(|p| !top.targets.contains_key(*p))
                            .cloned(),
                    );
                    let layout = |t: &Targets| {
                        t.delegations
                            .as_ref()
                            .and_then(|d| d.succinct_roles.as_ref())
                            .map(|s| (s.bit_length, s.name_prefix.clone()))
                    };
                    if layout(old).is_some() && layout(old) != layout(&top) {
                        return Err(reject(
                            "the top-level targets may not change the number or names of their hash bins"
                                .into(),
                        ));
                    }
                    rekeyed = old.delegations.is_some() && old.delegations != top.delegations;
                }
                accepted.manifests = manifests;
                top
            }
            None => stored_top.clone().ok_or(RepoError::Empty)?,
        };
        accepted.targets_version = top.version;
        if let Some(bits) = top
            .delegations
            .as_ref()
            .and_then(|d| d.succinct_roles.as_ref())
            .map(|s| s.bit_length)
        {
            if bits > bins::MAX_BIT_LENGTH {
                return Err(reject(format!(
                    "{bits}-bit hash bins: at most {} bits",
                    bins::MAX_BIT_LENGTH
                )));
            }
        }
        for (role, envelope) in &upload.delegated {
            if !bins::is_bin(&top, role) {
                return Err(reject(format!(
                    "{role} is not a bin the targets delegate to"
                )));
            }
            let verifier = top
                .delegations
                .as_ref()
                .and_then(|d| d.verifier(role))
                .ok_or_else(|| reject(format!("{role} is not delegated")))?;
            let doc: Targets = envelope
                .verify(&verifier, "targets")
                .map_err(|e| reject(format!("{role}: {e}")))?;
            let stored = self.delegated(role).await?;
            if let Some(stored) = &stored {
                let stored: Targets = stored
                    .parse("targets")
                    .map_err(|e| reject(format!("stored {role}: {e}")))?;
                if doc.version <= stored.version {
                    return Err(reject(format!(
                        "{role}: version {} is not newer than current {}",
                        doc.version, stored.version
                    )));
                }
                accepted.removed.extend(
                    stored
                        .targets
                        .keys()
                        .filter(|p| !doc.targets.contains_key(*p))
                        .cloned(),
                );
            }
            if parse_expiry(&doc.expires).map_err(|e| reject(e.to_string()))? <= now {
                return Err(reject(format!("{role}: expired at {}", doc.expires)));
            }
            if doc.delegations.is_some() {
                return Err(reject(format!("{role}: a bin delegates no further")));
            }
            for (path, t) in &doc.targets {
                if bins::bin_for(&top, path).as_deref() != Some(role.as_str()) {
                    return Err(reject(format!("{path} does not belong in {role}")));
                }
                accepted
                    .manifests
                    .push(Manifest::from_target(path, t).map_err(|e| reject(e.to_string()))?);
            }
        }
        if let Some(succinct) = top
            .delegations
            .as_ref()
            .and_then(|d| d.succinct_roles.as_ref())
            .filter(|_| rekeyed)
        {
            // Every bin the upload leaves as it is must verify under the new keys.
            for n in 0..(1u32 << succinct.bit_length.min(bins::MAX_BIT_LENGTH)) {
                let role = succinct.role_name(n);
                if upload.delegated.contains_key(&role) {
                    continue;
                }
                let Some(stored) = self.delegated(&role).await? else {
                    continue;
                };
                let verifier = top.delegations.as_ref().and_then(|d| d.verifier(&role));
                if verifier.is_none_or(|v| stored.verify::<Targets>(&v, "targets").is_err()) {
                    return Err(reject(format!(
                        "the bins are delegated to new keys but {role} is not re-signed with them"
                    )));
                }
            }
        }
        Ok(accepted)
    }

    /// Stores a checked upload (the bins first, then the top-level targets) and signs the
    /// snapshot and timestamp that name it.
    pub async fn store_upload(&self, upload: &TargetsUpload, now: i64) -> Result<(), RepoError> {
        for (role, envelope) in &upload.delegated {
            self.db.put_repo_doc(&role_key(role), envelope).await?;
        }
        if let Some(top) = &upload.targets {
            self.db.put_repo_doc("targets", top).await?;
        }
        self.refresh(now).await
    }

    async fn check_targets(
        &self,
        root: &Root,
        envelope: &Signed,
        now: i64,
    ) -> Result<(Targets, Vec<Manifest>), RepoError> {
        let reject = |e: String| RepoError::Rejected(e);
        let verifier = root.role("targets").map_err(|e| reject(e.to_string()))?;
        let targets: Targets = envelope
            .verify(&verifier, "targets")
            .map_err(|e| reject(e.to_string()))?;
        if let Some(current) = self.top().await? {
            if targets.version <= current.version {
                return Err(reject(format!(
                    "version {} is not newer than current {}",
                    targets.version, current.version
                )));
            }
        }
        if parse_expiry(&targets.expires).map_err(|e| reject(e.to_string()))? <= now {
            return Err(reject(format!("expired at {}", targets.expires)));
        }
        let manifests = targets
            .targets
            .iter()
            .map(|(path, t)| Manifest::from_target(path, t).map_err(|e| reject(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((targets, manifests))
    }

    /// The current top-level targets, decoded.
    async fn top(&self) -> Result<Option<Targets>, RepoError> {
        self.db
            .repo_doc("targets")
            .await?
            .map(|t| {
                t.parse("targets")
                    .map_err(|e| RepoError::Rejected(format!("stored targets: {e}")))
            })
            .transpose()
    }

    /// A delegated role's current document (a hash bin), if it exists.
    pub async fn delegated(&self, role: &str) -> Result<Option<Signed>, RepoError> {
        Ok(self.db.repo_doc(&role_key(role)).await?)
    }

    /// Signs a new snapshot and timestamp naming the current targets.
    pub async fn refresh(&self, now: i64) -> Result<(), RepoError> {
        let targets: Targets = self
            .db
            .repo_doc("targets")
            .await?
            .ok_or(RepoError::Empty)?
            .parse("targets")
            .map_err(|e| RepoError::Rejected(e.to_string()))?;
        let version_of = |doc: Option<Signed>, role: &'static str| -> u64 {
            doc.and_then(|s| s.parse::<MetaIndex>(role).ok())
                .map_or(0, |m| m.version)
        };
        let expires = format_expiry(now + ONLINE_LIFETIME_SECS);
        let snapshot_version = version_of(self.db.repo_doc("snapshot").await?, "snapshot") + 1;
        let mut listed = meta("targets.json", targets.version);
        // Every bin that exists, at its stored version (read back, so a publish cut short
        // between its documents is still named as stored).
        if let Some(succinct) = targets
            .delegations
            .as_ref()
            .and_then(|d| d.succinct_roles.as_ref())
            .filter(|s| s.bit_length <= bins::MAX_BIT_LENGTH)
        {
            for bin in 0..(1u32 << succinct.bit_length) {
                let role = succinct.role_name(bin);
                if let Some(doc) = self.delegated(&role).await? {
                    listed.extend(meta(&format!("{role}.json"), version_of_targets(&doc)));
                }
            }
        }
        let snapshot = MetaIndex::new("snapshot", snapshot_version, &expires, listed);
        let timestamp = MetaIndex::new(
            "timestamp",
            version_of(self.db.repo_doc("timestamp").await?, "timestamp") + 1,
            &expires,
            meta("snapshot.json", snapshot_version),
        );
        self.db
            .put_repo_doc("snapshot", &Signed::sign(&snapshot, &[&self.online]))
            .await?;
        self.db
            .put_repo_doc("timestamp", &Signed::sign(&timestamp, &[&self.online]))
            .await?;
        Ok(())
    }

    /// The operators' current signed targets.
    pub async fn targets(&self) -> Result<Option<Signed>, RepoError> {
        Ok(self.db.repo_doc("targets").await?)
    }

    /// Timestamp version and expiry (for deciding when to re-sign).
    pub async fn timestamp(&self) -> Result<Option<MetaIndex>, RepoError> {
        Ok(self
            .db
            .repo_doc("timestamp")
            .await?
            .and_then(|s| s.parse("timestamp").ok()))
    }

    /// The repository metadata a device needs for the targets at `paths`: the root chain,
    /// timestamp, snapshot, top-level targets, and the bins that hold those paths.
    pub async fn metadata(&self, paths: &[String]) -> Result<RepositoryMetadata, RepoError> {
        let get = |role: &'static str| async move {
            self.db.repo_doc(role).await?.ok_or(RepoError::Empty)
        };
        let targets = get("targets").await?;
        let top: Targets = targets
            .parse("targets")
            .map_err(|e| RepoError::Rejected(format!("stored targets: {e}")))?;
        let mut delegated = BTreeMap::new();
        for path in paths.iter().filter(|p| !top.targets.contains_key(*p)) {
            let Some(role) = bins::bin_for(&top, path) else {
                continue;
            };
            if delegated.contains_key(&role) {
                continue;
            }
            if let Some(doc) = self.delegated(&role).await? {
                delegated.insert(role, doc);
            }
        }
        Ok(RepositoryMetadata {
            root: self.root_chain().await?,
            timestamp: get("timestamp").await?,
            snapshot: get("snapshot").await?,
            targets,
            delegated,
        })
    }

    /// Signs the desired state of `device`: run `models`, each with its terms (judged on trial
    /// by its rollout's thresholds if set, sampled if its deployment says so); counter
    /// `version`.
    pub async fn desired(
        &self,
        device: &str,
        models: &[(Manifest, TargetTerms)],
        version: u64,
        now: i64,
    ) -> Result<DesiredState, RepoError> {
        let mut director = Targets::new(version, &format_expiry(now + ONLINE_LIFETIME_SECS));
        for (m, terms) in models {
            let mut target = m.to_target();
            let custom = modelcast_proto::desired::DirectorCustom {
                device: device.to_string(),
                terms: terms.clone(),
            };
            target.custom = Some(custom.to_value());
            director.targets.insert(m.target_path(), target);
        }
        Ok(DesiredState {
            format: modelcast_proto::FORMAT_VERSION,
            device: device.into(),
            director: Signed::sign(&director, &[&self.online]),
            repository: self
                .metadata(
                    &models
                        .iter()
                        .map(|(m, _)| m.target_path())
                        .collect::<Vec<_>>(),
                )
                .await?,
        })
    }
}
