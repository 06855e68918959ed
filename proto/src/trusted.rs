//! The TUF client core (specification §5): the metadata a client trusts, updated one document
//! at a time from untrusted bytes, in the manner of python-tuf's `TrustedMetadataSet`.
//!
//! Pure: each update takes the fetched bytes and the time (Unix seconds) and returns a typed
//! [`VerifyError`] or changes the trusted set; fetching, storing and the order of requests are
//! the caller's (a shell such as the agent's `modelcast-tuf-client`, or
//! [`crate::verify::verify_desired`]). It must not read files, sockets or the clock.
//!
//! The client workflow a caller drives:
//!
//! 1. [`TrustedMetadata::new`] with the locally trusted root (§5.2: self-signed, not checked
//!    for expiry);
//! 2. [`TrustedMetadata::update_root`] with `N+1.root.json`, `N+2.root.json`, … until the
//!    repository has none (§5.3), at most [`MAX_ROOT_ROTATIONS`];
//! 3. [`TrustedMetadata::update_timestamp`]: first with the local copy (which then guards
//!    against rollback), then with the fetched one (§5.4);
//! 4. [`TrustedMetadata::reload_snapshot`] with the local copy, and only if that is not valid as
//!    the final snapshot, [`TrustedMetadata::update_snapshot`] with the fetched one (§5.5);
//! 5. the same for `targets` ([`TrustedMetadata::update_targets`], §5.6) and, while a
//!    [`TargetSearch`] asks for them, delegated roles
//!    ([`TrustedMetadata::update_delegated_targets`], §5.6.7).
//!
//! As in python-tuf, a timestamp or snapshot that verifies but is not valid as the *final*
//! one (expired, or a snapshot of another version than the timestamp names) stays trusted for
//! rollback checks and the update returns the error; the caller persists a document only
//! when its update returned `Ok`.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::{DecodeError, VerifyError};
use crate::keys::PublicKey;
use crate::metadata::{
    parse_expiry, Document, MetaFile, MetaIndex, RoleVerifier, Root, Signed, TargetFile, Targets,
    MAX_METADATA_BYTES,
};

/// The four top-level roles every root must list.
pub const TOP_LEVEL_ROLES: [&str; 4] = ["root", "timestamp", "snapshot", "targets"];
/// Most root versions a client steps through in one refresh (python-tuf's default).
pub const MAX_ROOT_ROTATIONS: u64 = 256;
/// Most roles a [`TargetSearch`] visits for one target (python-tuf's default).
pub const MAX_DELEGATIONS: usize = 32;
/// Download bound for a root document.
pub const DEFAULT_ROOT_MAX_LENGTH: u64 = 512_000;
/// Download bound for the timestamp.
pub const DEFAULT_TIMESTAMP_MAX_LENGTH: u64 = 16_384;
/// Download bound for the snapshot when the timestamp gives no length.
pub const DEFAULT_SNAPSHOT_MAX_LENGTH: u64 = 2_000_000;
/// Download bound for a targets role when the snapshot gives no length.
pub const DEFAULT_TARGETS_MAX_LENGTH: u64 = MAX_METADATA_BYTES as u64;

/// What an accepted timestamp update did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    /// The new document is now trusted: persist it.
    Accepted,
    /// The same version as the trusted one: the trusted one is kept (nothing to persist).
    Unchanged,
}

/// A metadata file to fetch: its path under the repository's metadata URL (role names
/// percent-encoded) and the most bytes to accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    /// E.g. `2.root.json`, `timestamp.json`, `7.snapshot.json`.
    pub path: String,
    /// Length bound: the length the referring metadata gives, else a default.
    pub max_length: u64,
}

/// A targets role and the delegators through which it has been verified.
#[derive(Debug, Clone)]
struct TrustedTargets {
    doc: Targets,
    delegators: BTreeSet<String>,
}

/// The metadata a TUF client trusts: the root, and the timestamp, snapshot, targets and
/// delegated targets verified under it so far.
#[derive(Debug, Clone)]
pub struct TrustedMetadata {
    root: Root,
    timestamp: Option<MetaIndex>,
    snapshot: Option<MetaIndex>,
    targets: BTreeMap<String, TrustedTargets>,
}

/// Untrusted input: either the bytes as fetched (lengths and hashes can be checked) or an
/// already-decoded envelope (documents carried inside another message).
enum Input<'a> {
    Bytes(&'a [u8]),
    Envelope(&'a Signed),
}

impl Input<'_> {
    fn envelope(&self) -> Result<Signed, VerifyError> {
        match self {
            Input::Bytes(bytes) => Ok(Signed::from_slice(bytes)?),
            Input::Envelope(env) => Ok((*env).clone()),
        }
    }

    fn check_meta(&self, file: &str, meta: &MetaFile) -> Result<(), VerifyError> {
        match self {
            Input::Bytes(bytes) => meta.verify(file, bytes),
            Input::Envelope(_) if meta.pins_content() => Err(VerifyError::Integrity {
                what: file.into(),
                reason: "length/hashes given but the document's bytes are not available".into(),
            }),
            Input::Envelope(_) => Ok(()),
        }
    }
}

impl TrustedMetadata {
    /// Starts from a locally trusted root (§5.2): it must be a well-formed root signed by a
    /// threshold of its own root keys. Its expiry is checked later, once no newer root exists.
    pub fn new(root_bytes: &[u8]) -> Result<Self, VerifyError> {
        Self::from_root_envelope(&Signed::from_slice(root_bytes)?)
    }

    /// [`TrustedMetadata::new`] from a decoded envelope.
    pub fn from_root_envelope(root: &Signed) -> Result<Self, VerifyError> {
        let doc: Root = root.parse("root")?;
        let root: Root = load(root, &doc.role("root")?, "root")?;
        validate_root(&root)?;
        Ok(TrustedMetadata {
            root,
            timestamp: None,
            snapshot: None,
            targets: BTreeMap::new(),
        })
    }

    /// The trusted root.
    pub fn root(&self) -> &Root {
        &self.root
    }

    /// The trusted timestamp, if any.
    pub fn timestamp(&self) -> Option<&MetaIndex> {
        self.timestamp.as_ref()
    }

    /// The trusted snapshot, if any.
    pub fn snapshot(&self) -> Option<&MetaIndex> {
        self.snapshot.as_ref()
    }

    /// The trusted top-level targets, if loaded.
    pub fn targets(&self) -> Option<&Targets> {
        self.delegated("targets")
    }

    /// A trusted targets role (`targets` or a delegated role), if loaded.
    pub fn delegated(&self, role: &str) -> Option<&Targets> {
        self.targets.get(role).map(|t| &t.doc)
    }

    /// Whether `role` is trusted as verified against the delegation of `delegator` (`root`
    /// for the top-level `targets`). A role reached through another delegator must be
    /// verified again against that delegator's keys.
    pub fn is_trusted_via(&self, role: &str, delegator: &str) -> bool {
        self.targets
            .get(role)
            .is_some_and(|t| t.delegators.contains(delegator))
    }

    /// §5.3: the next root, `N+1`, signed by a threshold of the trusted root's root keys and
    /// of its own. If it changes the timestamp or snapshot keys, the trusted timestamp and
    /// snapshot (and targets) are dropped, so a repository can recover from a fast-forward
    /// attack (§5.3.11); if it changes the targets keys, the trusted targets are dropped.
    pub fn update_root(&mut self, bytes: &[u8]) -> Result<(), VerifyError> {
        self.update_root_input(Input::Bytes(bytes))
    }

    /// [`TrustedMetadata::update_root`] from a decoded envelope.
    pub fn update_root_envelope(&mut self, env: &Signed) -> Result<(), VerifyError> {
        self.update_root_input(Input::Envelope(env))
    }

    fn update_root_input(&mut self, input: Input<'_>) -> Result<(), VerifyError> {
        let env = input.envelope()?;
        let new = check_root_step(&self.root, &env)?;
        let changed = |role: &str| role_keys(&self.root, role) != role_keys(&new, role);
        if changed("timestamp") || changed("snapshot") {
            self.timestamp = None;
            self.snapshot = None;
            self.targets.clear();
        } else if changed("targets") {
            self.targets.clear();
        }
        self.root = new;
        Ok(())
    }

    /// §5.4: a timestamp signed by the root's timestamp keys, not older than the trusted one
    /// and naming a snapshot version not older than the trusted timestamp's. Fails first if the
    /// final root has expired (§5.3.10). An equal version keeps the trusted one
    /// ([`Update::Unchanged`]). An expired timestamp stays trusted for rollback checks but is
    /// reported as [`VerifyError::Expired`].
    pub fn update_timestamp(&mut self, bytes: &[u8], now: i64) -> Result<Update, VerifyError> {
        self.update_timestamp_input(Input::Bytes(bytes), now)
    }

    /// [`TrustedMetadata::update_timestamp`] from a decoded envelope.
    pub fn update_timestamp_envelope(
        &mut self,
        env: &Signed,
        now: i64,
    ) -> Result<Update, VerifyError> {
        self.update_timestamp_input(Input::Envelope(env), now)
    }

    fn update_timestamp_input(
        &mut self,
        input: Input<'_>,
        now: i64,
    ) -> Result<Update, VerifyError> {
        if self.snapshot.is_some() {
            return Err(VerifyError::Order("timestamp update after snapshot"));
        }
        check_expiry("root", &self.root.expires, now)?;
        let env = input.envelope()?;
        let new: MetaIndex = load(&env, &self.root.role("timestamp")?, "timestamp")?;
        let new_snapshot = meta_entry(&new, "snapshot.json", "timestamp")?.version;
        if let Some(old) = &self.timestamp {
            if new.version < old.version {
                return Err(VerifyError::Rollback {
                    role: "timestamp".into(),
                    found: new.version,
                    trusted: old.version,
                });
            }
            if new.version == old.version {
                return Ok(Update::Unchanged);
            }
            let old_snapshot = meta_entry(old, "snapshot.json", "timestamp")?.version;
            if new_snapshot < old_snapshot {
                return Err(VerifyError::Rollback {
                    role: "snapshot".into(),
                    found: new_snapshot,
                    trusted: old_snapshot,
                });
            }
        }
        self.timestamp = Some(new);
        self.check_final_timestamp(now)?;
        Ok(Update::Accepted)
    }

    /// §5.5: a snapshot matching the timestamp's length and hashes (if given), signed by the
    /// root's snapshot keys, that neither drops nor rolls back any entry of the trusted
    /// snapshot. It stays trusted (for rollback checks) even if it then fails as the final
    /// snapshot: expired, or not the version the timestamp names.
    pub fn update_snapshot(&mut self, bytes: &[u8], now: i64) -> Result<(), VerifyError> {
        self.update_snapshot_input(Input::Bytes(bytes), now, true)
    }

    /// [`TrustedMetadata::update_snapshot`] for the locally stored copy: its length and hashes
    /// were checked when it was fetched, and the timestamp may since name a newer one. `Ok`
    /// means it is still the final snapshot and need not be fetched again.
    pub fn reload_snapshot(&mut self, bytes: &[u8], now: i64) -> Result<(), VerifyError> {
        self.update_snapshot_input(Input::Bytes(bytes), now, false)
    }

    /// [`TrustedMetadata::update_snapshot`] from a decoded envelope.
    pub fn update_snapshot_envelope(&mut self, env: &Signed, now: i64) -> Result<(), VerifyError> {
        self.update_snapshot_input(Input::Envelope(env), now, true)
    }

    fn update_snapshot_input(
        &mut self,
        input: Input<'_>,
        now: i64,
        check_meta: bool,
    ) -> Result<(), VerifyError> {
        let Some(timestamp) = &self.timestamp else {
            return Err(VerifyError::Order("snapshot update before timestamp"));
        };
        if !self.targets.is_empty() {
            return Err(VerifyError::Order("snapshot update after targets"));
        }
        let meta = meta_entry(timestamp, "snapshot.json", "timestamp")?.clone();
        self.check_final_timestamp(now)?;
        if check_meta {
            input.check_meta("snapshot.json", &meta)?;
        }
        let env = input.envelope()?;
        let new: MetaIndex = load(&env, &self.root.role("snapshot")?, "snapshot")?;
        if let Some(old) = &self.snapshot {
            for (file, info) in &old.meta {
                let Some(next) = new.meta.get(file) else {
                    return Err(VerifyError::Mismatch {
                        role: "snapshot".into(),
                        reason: format!("{file} is no longer listed"),
                    });
                };
                if next.version < info.version {
                    return Err(VerifyError::Rollback {
                        role: file.trim_end_matches(".json").into(),
                        found: next.version,
                        trusted: info.version,
                    });
                }
            }
        }
        self.snapshot = Some(new);
        self.check_final_snapshot(now)
    }

    /// §5.6: the top-level targets (delegated by the root).
    pub fn update_targets(&mut self, bytes: &[u8], now: i64) -> Result<(), VerifyError> {
        self.update_delegated_targets(bytes, "targets", "root", now)
    }

    /// [`TrustedMetadata::update_targets`] from a decoded envelope.
    pub fn update_targets_envelope(&mut self, env: &Signed, now: i64) -> Result<(), VerifyError> {
        self.update_targets_input(Input::Envelope(env), "targets", "root", now)
    }

    /// §5.6 for `role` as delegated by `delegator` (already trusted; `root` for `targets`):
    /// listed in the final snapshot, matching that entry's length and hashes (if given) and
    /// version, signed by a threshold of the keys the delegator names for it, not expired.
    pub fn update_delegated_targets(
        &mut self,
        bytes: &[u8],
        role: &str,
        delegator: &str,
        now: i64,
    ) -> Result<(), VerifyError> {
        self.update_targets_input(Input::Bytes(bytes), role, delegator, now)
    }

    /// [`TrustedMetadata::update_delegated_targets`] from a decoded envelope.
    pub fn update_delegated_targets_envelope(
        &mut self,
        env: &Signed,
        role: &str,
        delegator: &str,
        now: i64,
    ) -> Result<(), VerifyError> {
        self.update_targets_input(Input::Envelope(env), role, delegator, now)
    }

    fn update_targets_input(
        &mut self,
        input: Input<'_>,
        role: &str,
        delegator: &str,
        now: i64,
    ) -> Result<(), VerifyError> {
        self.check_final_snapshot(now)?;
        let verifier = self.delegation(role, delegator)?;
        let file = format!("{role}.json");
        let meta = self
            .snapshot
            .as_ref()
            .and_then(|s| s.meta.get(&file))
            .cloned()
            .ok_or_else(|| VerifyError::Mismatch {
                role: role.into(),
                reason: format!("the snapshot does not list {file}"),
            })?;
        input.check_meta(&file, &meta)?;
        let env = input.envelope()?;
        let new: Targets = load(&env, &verifier, "targets")?;
        validate_delegations(&new)?;
        if new.version != meta.version {
            return Err(VerifyError::Mismatch {
                role: role.into(),
                reason: format!(
                    "version {} but the snapshot names {}",
                    new.version, meta.version
                ),
            });
        }
        check_expiry(role, &new.expires, now)?;
        match self.targets.get_mut(role) {
            Some(t) if t.doc == new => {
                t.delegators.insert(delegator.into());
            }
            _ => {
                self.targets.insert(
                    role.into(),
                    TrustedTargets {
                        doc: new,
                        delegators: BTreeSet::from([delegator.to_string()]),
                    },
                );
            }
        }
        Ok(())
    }

    /// Who may sign for `role` according to `delegator`.
    fn delegation(&self, role: &str, delegator: &str) -> Result<RoleVerifier, VerifyError> {
        if delegator == "root" {
            if role != "targets" {
                return Err(VerifyError::Mismatch {
                    role: role.into(),
                    reason: "the root delegates only the top-level roles".into(),
                });
            }
            return self.root.role("targets");
        }
        let parent = self
            .delegated(delegator)
            .ok_or(VerifyError::Order("delegated role before its delegator"))?;
        parent
            .delegations
            .as_ref()
            .and_then(|d| d.verifier(role))
            .ok_or_else(|| VerifyError::Mismatch {
                role: role.into(),
                reason: format!("not delegated by {delegator}"),
            })
    }

    fn check_final_timestamp(&self, now: i64) -> Result<(), VerifyError> {
        let timestamp = self
            .timestamp
            .as_ref()
            .ok_or(VerifyError::Order("no timestamp"))?;
        check_expiry("timestamp", &timestamp.expires, now)
    }

    fn check_final_snapshot(&self, now: i64) -> Result<(), VerifyError> {
        let (Some(timestamp), Some(snapshot)) = (&self.timestamp, &self.snapshot) else {
            return Err(VerifyError::Order("no snapshot"));
        };
        check_expiry("snapshot", &snapshot.expires, now)?;
        let named = meta_entry(timestamp, "snapshot.json", "timestamp")?.version;
        if snapshot.version != named {
            return Err(VerifyError::Mismatch {
                role: "snapshot".into(),
                reason: format!(
                    "version {} but the timestamp names {named}",
                    snapshot.version
                ),
            });
        }
        Ok(())
    }

    /// The next root to fetch: `N+1.root.json`.
    pub fn next_root_request(&self) -> MetaRequest {
        MetaRequest {
            path: metadata_path("root", Some(self.root.version.saturating_add(1))),
            max_length: DEFAULT_ROOT_MAX_LENGTH,
        }
    }

    /// The timestamp to fetch: always `timestamp.json`.
    pub fn timestamp_request(&self) -> MetaRequest {
        MetaRequest {
            path: metadata_path("timestamp", None),
            max_length: DEFAULT_TIMESTAMP_MAX_LENGTH,
        }
    }

    /// The snapshot the trusted timestamp names (`V.snapshot.json` under consistent snapshots).
    pub fn snapshot_request(&self) -> Result<MetaRequest, VerifyError> {
        let timestamp = self
            .timestamp
            .as_ref()
            .ok_or(VerifyError::Order("snapshot request before timestamp"))?;
        let meta = meta_entry(timestamp, "snapshot.json", "timestamp")?;
        Ok(self.request("snapshot", meta, DEFAULT_SNAPSHOT_MAX_LENGTH))
    }

    /// The targets role `role` as the trusted snapshot names it.
    pub fn targets_request(&self, role: &str) -> Result<MetaRequest, VerifyError> {
        let snapshot = self
            .snapshot
            .as_ref()
            .ok_or(VerifyError::Order("targets request before snapshot"))?;
        let meta =
            snapshot
                .meta
                .get(&format!("{role}.json"))
                .ok_or_else(|| VerifyError::Mismatch {
                    role: role.into(),
                    reason: "delegated but not listed in the snapshot".into(),
                })?;
        Ok(self.request(role, meta, DEFAULT_TARGETS_MAX_LENGTH))
    }

    fn request(&self, role: &str, meta: &MetaFile, default_max: u64) -> MetaRequest {
        let version = self.root.consistent_snapshot.then_some(meta.version);
        MetaRequest {
            path: metadata_path(role, version),
            max_length: meta.length.unwrap_or(default_max),
        }
    }

    /// The path of a target file under the repository's targets URL: `dir/<hash>.<name>` under
    /// consistent snapshots (the first listed hash), else the target path itself.
    pub fn target_url_path(&self, target_path: &str, target: &TargetFile) -> String {
        match target.hashes.values().next() {
            Some(hash) if self.root.consistent_snapshot => {
                let (dir, name) = match target_path.rsplit_once('/') {
                    Some((dir, name)) => (format!("{dir}/"), name),
                    None => (String::new(), target_path),
                };
                format!("{dir}{hash}.{name}")
            }
            _ => target_path.to_string(),
        }
    }
}

/// The file name of a metadata document: `<version>.<role>.json` or `<role>.json`, with the
/// role name percent-encoded (so `../x` or `a/b` stay one path segment, in URLs and on disk).
pub fn metadata_path(role: &str, version: Option<u64>) -> String {
    match version {
        Some(v) => format!("{v}.{}.json", quote(role)),
        None => format!("{}.json", quote(role)),
    }
}

/// Percent-encodes every byte except ASCII letters, digits and `_.-~` (as Python's
/// `urllib.parse.quote(s, safe="")`).
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One step of a root rotation (§5.3.4–5.3.5): `next` must be signed by a threshold of the
/// trusted root's root keys and of its own, be a well-formed root and be version `N+1`.
pub(crate) fn check_root_step(current: &Root, next: &Signed) -> Result<Root, VerifyError> {
    let candidate: Root = load(next, &current.role("root")?, "root")?;
    validate_root(&candidate)?;
    if candidate.version != current.version.saturating_add(1) {
        return Err(VerifyError::RootChain {
            trusted: current.version,
            found: candidate.version,
        });
    }
    candidate.role("root")?.check(next)?;
    Ok(candidate)
}

/// Signature checks and parsing shared by every role: key ids unique among the signatures
/// (§4: "The keyid MUST be unique"), a threshold of distinct authorised keys (unknown key ids
/// and unsupported key types count for nothing), then the document and its `_type`.
fn load<T: Document>(
    env: &Signed,
    verifier: &RoleVerifier,
    kind: &'static str,
) -> Result<T, VerifyError> {
    let mut seen = BTreeSet::new();
    for sig in &env.signatures {
        if !seen.insert(sig.keyid.as_str()) {
            return Err(DecodeError::Invalid {
                what: "signatures",
                reason: format!("key id {} signs twice", sig.keyid),
            }
            .into());
        }
    }
    let doc: T = env.verify(verifier, kind)?;
    if doc.version() == 0 {
        return Err(DecodeError::Invalid {
            what: "version",
            reason: format!("{kind} version must be at least 1"),
        }
        .into());
    }
    Ok(doc)
}

fn validate_root(root: &Root) -> Result<(), VerifyError> {
    for role in TOP_LEVEL_ROLES {
        let spec = root.roles.get(role).ok_or_else(|| VerifyError::Mismatch {
            role: "root".into(),
            reason: format!("root lists no {role} role"),
        })?;
        if spec.threshold == 0 {
            return Err(DecodeError::Invalid {
                what: "threshold",
                reason: format!("{role} threshold must be at least 1"),
            }
            .into());
        }
    }
    Ok(())
}

fn validate_delegations(targets: &Targets) -> Result<(), VerifyError> {
    let invalid = |reason: String| -> VerifyError {
        DecodeError::Invalid {
            what: "delegations",
            reason,
        }
        .into()
    };
    let Some(d) = &targets.delegations else {
        return Ok(());
    };
    match (&d.roles, &d.succinct_roles) {
        (Some(roles), None) => {
            let mut names = BTreeSet::new();
            for r in roles {
                if r.name.is_empty() || TOP_LEVEL_ROLES.contains(&r.name.as_str()) {
                    return Err(invalid(format!("role name {:?} is reserved", r.name)));
                }
                if !names.insert(r.name.as_str()) {
                    return Err(invalid(format!("role {:?} delegated twice", r.name)));
                }
                if r.paths.is_some() == r.path_hash_prefixes.is_some() {
                    return Err(invalid(format!(
                        "role {:?} needs exactly one of paths and path_hash_prefixes",
                        r.name
                    )));
                }
            }
            Ok(())
        }
        (None, Some(s)) if (1..=32).contains(&s.bit_length) => Ok(()),
        (None, Some(s)) => Err(invalid(format!(
            "bit_length {} out of 1..=32",
            s.bit_length
        ))),
        _ => Err(invalid(
            "needs exactly one of roles and succinct_roles".into(),
        )),
    }
}

/// The keys and threshold of `role` in `root`, for comparing two roots.
fn role_keys(root: &Root, role: &str) -> Option<(BTreeMap<String, PublicKey>, u32)> {
    let spec = root.roles.get(role)?;
    let keys = spec
        .keyids
        .iter()
        .filter_map(|id| root.keys.get(id).map(|k| (id.clone(), k.clone())))
        .collect();
    Some((keys, spec.threshold))
}

fn meta_entry<'a>(
    index: &'a MetaIndex,
    file: &str,
    role: &str,
) -> Result<&'a MetaFile, VerifyError> {
    index.meta.get(file).ok_or_else(|| VerifyError::Mismatch {
        role: role.into(),
        reason: format!("no entry for {file}"),
    })
}

/// Fails if `expires` is not after `now` (a document is expired from its expiry instant on).
pub(crate) fn check_expiry(role: &str, expires: &str, now: i64) -> Result<(), VerifyError> {
    if parse_expiry(expires)? <= now {
        return Err(VerifyError::Expired {
            role: role.into(),
            expires: expires.into(),
        });
    }
    Ok(())
}

/// What a [`TargetSearch`] needs next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SearchStep {
    /// Load `role` as delegated by `delegator` (local copy or fetch, then
    /// [`TrustedMetadata::update_delegated_targets`]), then step again.
    Load {
        /// The role to load.
        role: String,
        /// Its delegator on this search path (`root` for `targets`).
        delegator: String,
    },
    /// The target, as the first role trusted for it on the search path lists it.
    Found(TargetFile),
    /// No role trusted for the path lists the target (or the search hit [`MAX_DELEGATIONS`]).
    NotFound,
}

/// The search for one target through the delegation graph (§5.6.7): pre-order depth-first
/// from `targets`, children in the order their delegator lists them, only roles trusted for
/// the path, no backtracking past a terminating role, each role name visited once, at most
/// [`MAX_DELEGATIONS`] roles. Sans-IO: [`TargetSearch::step`] says which role to load next.
#[derive(Debug, Clone)]
pub struct TargetSearch {
    target: String,
    stack: Vec<(String, String)>,
    visited: BTreeSet<String>,
}

impl TargetSearch {
    /// A search for `target_path`.
    pub fn new(target_path: &str) -> Self {
        TargetSearch {
            target: target_path.into(),
            stack: vec![("targets".into(), "root".into())],
            visited: BTreeSet::new(),
        }
    }

    /// Advances the search with what `trusted` holds now.
    pub fn step(&mut self, trusted: &TrustedMetadata) -> SearchStep {
        while self.visited.len() <= MAX_DELEGATIONS {
            let Some((role, delegator)) = self.stack.last().cloned() else {
                break;
            };
            if self.visited.contains(&role) {
                self.stack.pop();
                continue;
            }
            if !trusted.is_trusted_via(&role, &delegator) {
                return SearchStep::Load { role, delegator };
            }
            self.stack.pop();
            let Some(doc) = trusted.delegated(&role) else {
                continue;
            };
            if let Some(target) = doc.targets.get(&self.target) {
                return SearchStep::Found(target.clone());
            }
            self.visited.insert(role.clone());
            if let Some(delegations) = &doc.delegations {
                let mut children = Vec::new();
                for (child, terminating) in delegations.roles_for_target(&self.target) {
                    children.push((child, role.clone()));
                    if terminating {
                        self.stack.clear();
                        break;
                    }
                }
                self.stack.extend(children.into_iter().rev());
            }
        }
        SearchStep::NotFound
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SigningKey;
    use crate::metadata::{DelegatedRole, Delegations, SuccinctRoles};
    use proptest::prelude::*;

    const FAR: &str = "2035-01-01T00:00:00Z";
    const NOW: i64 = 1_800_000_000;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    /// A small repository: one key per top-level role, all metadata at version 1.
    struct Repo {
        root: Root,
        root_keys: Vec<SigningKey>,
        timestamp: MetaIndex,
        snapshot: MetaIndex,
        targets: Targets,
        ts_key: SigningKey,
        sn_key: SigningKey,
        tg_key: SigningKey,
    }

    fn meta(version: u64) -> MetaFile {
        MetaFile {
            version,
            length: None,
            hashes: None,
        }
    }

    impl Repo {
        fn new() -> Self {
            let (r, t, s, ts) = (key(1), key(2), key(3), key(4));
            let root = Root::new(1, FAR, &r.public(), &t.public(), &s.public(), &ts.public());
            Repo {
                root,
                root_keys: vec![r],
                timestamp: MetaIndex::new(
                    "timestamp",
                    1,
                    FAR,
                    BTreeMap::from([("snapshot.json".into(), meta(1))]),
                ),
                snapshot: MetaIndex::new(
                    "snapshot",
                    1,
                    FAR,
                    BTreeMap::from([("targets.json".into(), meta(1))]),
                ),
                targets: Targets::new(1, FAR),
                ts_key: ts,
                sn_key: s,
                tg_key: t,
            }
        }

        fn root_bytes(&self) -> Vec<u8> {
            let keys: Vec<&SigningKey> = self.root_keys.iter().collect();
            Signed::sign(&self.root, &keys).to_vec()
        }
        fn ts(&self) -> Vec<u8> {
            Signed::sign(&self.timestamp, &[&self.ts_key]).to_vec()
        }
        fn sn(&self) -> Vec<u8> {
            Signed::sign(&self.snapshot, &[&self.sn_key]).to_vec()
        }
        fn tg(&self) -> Vec<u8> {
            Signed::sign(&self.targets, &[&self.tg_key]).to_vec()
        }

        fn refresh(&self, set: &mut TrustedMetadata) -> Result<(), VerifyError> {
            set.update_timestamp(&self.ts(), NOW)?;
            set.update_snapshot(&self.sn(), NOW)?;
            set.update_targets(&self.tg(), NOW)
        }
    }

    #[test]
    fn happy_path_and_requests() {
        let repo = Repo::new();
        let mut set = TrustedMetadata::new(&repo.root_bytes()).unwrap();
        assert_eq!(set.next_root_request().path, "2.root.json");
        repo.refresh(&mut set).unwrap();
        assert_eq!(set.targets().unwrap().version, 1);
        assert_eq!(set.snapshot_request().unwrap().path, "snapshot.json");
        assert_eq!(
            set.targets_request("targets").unwrap(),
            MetaRequest {
                path: "targets.json".into(),
                max_length: DEFAULT_TARGETS_MAX_LENGTH
            }
        );
    }

    #[test]
    fn order_is_enforced_without_panics() {
        let repo = Repo::new();
        let mut set = TrustedMetadata::new(&repo.root_bytes()).unwrap();
        assert!(matches!(
            set.update_snapshot(&repo.sn(), NOW),
            Err(VerifyError::Order(_))
        ));
        assert!(matches!(
            set.update_targets(&repo.tg(), NOW),
            Err(VerifyError::Order(_))
        ));
    }

    #[test]
    fn timestamp_rollback_equal_and_snapshot_rollback() {
        let mut repo = Repo::new();
        repo.timestamp.version = 3;
        repo.timestamp.meta.insert("snapshot.json".into(), meta(3));
        let mut set = TrustedMetadata::new(&repo.root_bytes()).unwrap();
        assert_eq!(set.update_timestamp(&repo.ts(), NOW), Ok(Update::Accepted));
        assert_eq!(set.update_timestamp(&repo.ts(), NOW), Ok(Update::Unchanged));
        repo.timestamp.version = 2;
        assert!(matches!(
            set.update_timestamp(&repo.ts(), NOW),
            Err(VerifyError::Rollback { .. })
        ));
        repo.timestamp.version = 4;
        repo.timestamp.meta.insert("snapshot.json".into(), meta(2));
        assert!(matches!(
            set.update_timestamp(&repo.ts(), NOW),
            Err(VerifyError::Rollback { .. })
        ));
    }

    #[test]
    fn expired_timestamp_stays_for_rollback_checks() {
        let mut repo = Repo::new();
        repo.timestamp.version = 5;
        repo.timestamp.expires = "2020-01-01T00:00:00Z".into();
        let mut set = TrustedMetadata::new(&repo.root_bytes()).unwrap();
        assert!(matches!(
            set.update_timestamp(&repo.ts(), NOW),
            Err(VerifyError::Expired { .. })
        ));
        repo.timestamp.version = 4;
        repo.timestamp.expires = FAR.into();
        assert!(matches!(
            set.update_timestamp(&repo.ts(), NOW),
            Err(VerifyError::Rollback { .. })
        ));
    }

    #[test]
    fn snapshot_entries_must_not_vanish_or_go_back() {
        // Trusted locally: snapshot 1 listing targets 2.
        let mut repo = Repo::new();
        repo.snapshot.meta.insert("targets.json".into(), meta(2));
        // The repository now: timestamp 2 naming snapshot 2, whose targets went back to 1.
        let mut next = Repo::new();
        next.timestamp.version = 2;
        next.timestamp.meta.insert("snapshot.json".into(), meta(2));
        next.snapshot.version = 2;
        let mut set = TrustedMetadata::new(&repo.root_bytes()).unwrap();
        set.update_timestamp(&next.ts(), NOW).unwrap();
        // The local snapshot is not final (timestamp names 2) but guards the fetched one.
        assert!(matches!(
            set.reload_snapshot(&repo.sn(), NOW),
            Err(VerifyError::Mismatch { .. })
        ));
        assert!(matches!(
            set.update_snapshot(&next.sn(), NOW),
            Err(VerifyError::Rollback { .. })
        ));
        next.snapshot.meta.clear();
        assert!(matches!(
            set.update_snapshot(&next.sn(), NOW),
            Err(VerifyError::Mismatch { .. })
        ));
        next.snapshot.meta.insert("targets.json".into(), meta(2));
        set.update_snapshot(&next.sn(), NOW).unwrap();
        // Timestamp again once a snapshot is loaded: refused.
        assert!(matches!(
            set.update_timestamp(&next.ts(), NOW),
            Err(VerifyError::Order(_))
        ));
    }

    #[test]
    fn lengths_and_hashes_of_meta_entries_are_checked() {
        let mut repo = Repo::new();
        let sn = repo.sn();
        let mut entry = meta(1);
        entry.length = Some(sn.len() as u64);
        entry.hashes = Some(BTreeMap::from([(
            "sha256".to_string(),
            crate::sha256_hex(&sn),
        )]));
        repo.timestamp
            .meta
            .insert("snapshot.json".into(), entry.clone());
        let mut set = TrustedMetadata::new(&repo.root_bytes()).unwrap();
        set.update_timestamp(&repo.ts(), NOW).unwrap();
        let mut bad = sn.clone();
        bad.push(b' ');
        assert!(matches!(
            set.update_snapshot(&bad, NOW),
            Err(VerifyError::Integrity { .. })
        ));
        set.update_snapshot(&sn, NOW).unwrap();
        // An envelope cannot prove its hashes: refused.
        let mut set = TrustedMetadata::new(&repo.root_bytes()).unwrap();
        set.update_timestamp(&repo.ts(), NOW).unwrap();
        let env = Signed::from_slice(&sn).unwrap();
        assert!(set.update_snapshot_envelope(&env, NOW).is_err());
    }

    #[test]
    fn duplicate_signatures_are_refused_and_count_once() {
        let repo = Repo::new();
        let mut set = TrustedMetadata::new(&repo.root_bytes()).unwrap();
        let mut env = Signed::sign(&repo.timestamp, &[&repo.ts_key]);
        env.signatures.push(env.signatures[0].clone());
        assert!(set.update_timestamp(&env.to_vec(), NOW).is_err());
        // Unknown key ids and junk signatures are ignored when a threshold is met.
        let mut env = Signed::sign(&repo.timestamp, &[&repo.ts_key, &key(77)]);
        env.signatures.push(crate::metadata::Signature {
            keyid: "ab".repeat(32),
            sig: String::new(),
        });
        assert_eq!(
            set.update_timestamp(&env.to_vec(), NOW),
            Ok(Update::Accepted)
        );
    }

    fn rotate(
        repo: &mut Repo,
        new_root_keys: Vec<SigningKey>,
        threshold: u32,
        signers: &[&SigningKey],
    ) -> Vec<u8> {
        repo.root.version += 1;
        let spec = repo.root.roles.get_mut("root").unwrap();
        spec.keyids = new_root_keys.iter().map(|k| k.public().key_id()).collect();
        spec.threshold = threshold;
        for k in &new_root_keys {
            repo.root.keys.insert(k.public().key_id(), k.public());
        }
        repo.root_keys = new_root_keys;
        Signed::sign(&repo.root, signers).to_vec()
    }

    #[test]
    fn root_rotation_needs_both_thresholds_and_one_step() {
        let mut repo = Repo::new();
        let mut set = TrustedMetadata::new(&repo.root_bytes()).unwrap();
        let (old, new) = (key(1), key(9));
        let bytes = rotate(&mut repo, vec![new.clone()], 1, &[&new]);
        assert!(matches!(
            set.update_root(&bytes),
            Err(VerifyError::Threshold { .. })
        ));
        let bytes = Signed::sign(&repo.root, &[&old]).to_vec();
        assert!(matches!(
            set.update_root(&bytes),
            Err(VerifyError::Threshold { .. })
        ));
        let bytes = Signed::sign(&repo.root, &[&old, &new]).to_vec();
        set.update_root(&bytes).unwrap();
        assert_eq!(set.root().version, 2);
        // Replaying version 2 or skipping to 4 is refused.
        assert!(matches!(
            set.update_root(&bytes),
            Err(VerifyError::RootChain { .. })
        ));
        repo.root.version = 4;
        let skip = Signed::sign(&repo.root, &[&new]).to_vec();
        assert!(matches!(
            set.update_root(&skip),
            Err(VerifyError::RootChain { .. })
        ));
    }

    #[test]
    fn rotating_timestamp_keys_drops_trusted_timestamp() {
        let mut repo = Repo::new();
        let mut set = TrustedMetadata::new(&repo.root_bytes()).unwrap();
        repo.timestamp.version = 100;
        set.update_timestamp(&repo.ts(), NOW).unwrap();
        let new_ts = key(40);
        repo.root.version = 2;
        repo.root
            .keys
            .insert(new_ts.public().key_id(), new_ts.public());
        repo.root.roles.get_mut("timestamp").unwrap().keyids = vec![new_ts.public().key_id()];
        let r = key(1);
        set.update_root(&Signed::sign(&repo.root, &[&r]).to_vec())
            .unwrap();
        assert!(set.timestamp().is_none());
        repo.ts_key = new_ts;
        repo.timestamp.version = 1;
        assert_eq!(set.update_timestamp(&repo.ts(), NOW), Ok(Update::Accepted));
    }

    #[test]
    fn expired_root_blocks_timestamp() {
        let mut repo = Repo::new();
        repo.root.expires = "2020-01-01T00:00:00Z".into();
        let mut set = TrustedMetadata::new(&repo.root_bytes()).unwrap();
        assert!(matches!(
            set.update_timestamp(&repo.ts(), NOW),
            Err(VerifyError::Expired { .. })
        ));
    }

    fn delegated(
        name: &str,
        keys: &[&SigningKey],
        paths: &[&str],
        terminating: bool,
    ) -> DelegatedRole {
        DelegatedRole {
            name: name.into(),
            keyids: keys.iter().map(|k| k.public().key_id()).collect(),
            threshold: 1,
            terminating,
            paths: Some(paths.iter().map(|p| p.to_string()).collect()),
            path_hash_prefixes: None,
        }
    }

    #[test]
    fn delegation_search_is_preorder_dfs_and_rechecks_other_delegators() {
        // targets -> A (*), B (*); A -> C (*); C is also delegated by B with another key.
        let mut repo = Repo::new();
        let (ka, kb, kc, kc2) = (key(20), key(21), key(22), key(23));
        let keys = |ks: &[&SigningKey]| {
            ks.iter()
                .map(|k| (k.public().key_id(), k.public()))
                .collect()
        };
        repo.targets.delegations = Some(Delegations {
            keys: keys(&[&ka, &kb]),
            roles: Some(vec![
                delegated("A", &[&ka], &["*"], false),
                delegated("B", &[&kb], &["*"], false),
            ]),
            succinct_roles: None,
        });
        let mut a = Targets::new(1, FAR);
        a.delegations = Some(Delegations {
            keys: keys(&[&kc]),
            roles: Some(vec![delegated("C", &[&kc], &["*"], false)]),
            succinct_roles: None,
        });
        let mut b = Targets::new(1, FAR);
        b.delegations = Some(Delegations {
            keys: keys(&[&kc2]),
            roles: Some(vec![delegated("C", &[&kc2], &["*"], false)]),
            succinct_roles: None,
        });
        let c = Targets::new(1, FAR);
        for r in ["A", "B", "C"] {
            repo.snapshot.meta.insert(format!("{r}.json"), meta(1));
        }
        let mut set = TrustedMetadata::new(&repo.root_bytes()).unwrap();
        repo.refresh(&mut set).unwrap();
        let docs: BTreeMap<&str, Vec<u8>> = BTreeMap::from([
            ("A", Signed::sign(&a, &[&ka]).to_vec()),
            ("B", Signed::sign(&b, &[&kb]).to_vec()),
            ("C", Signed::sign(&c, &[&kc]).to_vec()),
        ]);
        let mut search = TargetSearch::new("missing");
        let mut order = Vec::new();
        let mut failures = Vec::new();
        loop {
            match search.step(&set) {
                SearchStep::Load { role, delegator } => {
                    order.push(role.clone());
                    if let Err(e) =
                        set.update_delegated_targets(&docs[role.as_str()], &role, &delegator, NOW)
                    {
                        failures.push((role, delegator, e));
                        break;
                    }
                }
                SearchStep::Found(_) => panic!("nothing to find"),
                SearchStep::NotFound => break,
            }
        }
        assert_eq!(order, ["A", "C", "B"]);
        assert!(failures.is_empty(), "{failures:?}");
        // C, signed only by A's key for it, does not verify through B.
        assert!(set.is_trusted_via("C", "A"));
        assert!(set
            .update_delegated_targets(&docs["C"], "C", "B", NOW)
            .is_err());
        assert!(!set.is_trusted_via("C", "B"));
        // Not delegated at all, or not in the snapshot: refused.
        assert!(set
            .update_delegated_targets(&docs["C"], "C", "targets", NOW)
            .is_err());
        assert!(set.targets_request("Z").is_err());
    }

    #[test]
    fn terminating_role_stops_backtracking() {
        let mut repo = Repo::new();
        let ka = key(30);
        let keys: BTreeMap<_, _> = [(ka.public().key_id(), ka.public())].into();
        repo.targets.delegations = Some(Delegations {
            keys,
            roles: Some(vec![
                delegated("A", &[&ka], &["*.txt"], true),
                delegated("B", &[&ka], &["*"], false),
            ]),
            succinct_roles: None,
        });
        repo.snapshot.meta.insert("A.json".into(), meta(1));
        repo.snapshot.meta.insert("B.json".into(), meta(1));
        let mut set = TrustedMetadata::new(&repo.root_bytes()).unwrap();
        repo.refresh(&mut set).unwrap();
        let a = Signed::sign(&Targets::new(1, FAR), &[&ka]).to_vec();
        let mut search = TargetSearch::new("x.txt");
        assert_eq!(
            search.step(&set),
            SearchStep::Load {
                role: "A".into(),
                delegator: "targets".into()
            }
        );
        set.update_delegated_targets(&a, "A", "targets", NOW)
            .unwrap();
        assert_eq!(search.step(&set), SearchStep::NotFound);
    }

    #[test]
    fn succinct_bins() {
        let s = SuccinctRoles {
            keyids: vec![],
            threshold: 1,
            bit_length: 8,
            name_prefix: "bin".into(),
        };
        let role = s.role_for_target("file.txt").unwrap();
        assert!(role.starts_with("bin-") && role.len() == 6, "{role}");
        assert!(s.is_delegated_role(&role));
        assert!(!s.is_delegated_role("bin-100"));
        assert!(!s.is_delegated_role("other-00"));
        let s = SuccinctRoles { bit_length: 0, ..s };
        assert_eq!(s.role_for_target("x"), None);
    }

    #[test]
    fn patterns_and_names() {
        use crate::metadata::path_matches;
        assert!(path_matches("*.md", "README.md"));
        assert!(!path_matches("*.md", "releases/README.md"));
        assert!(path_matches("releases/*/*", "releases/x/y"));
        assert!(path_matches("foo-?.tgz", "foo-1.tgz"));
        assert!(!path_matches("foo-?.tgz", "foo-alpha.tgz"));
        assert!(!path_matches("*.md", "README.MD"));
        assert!(path_matches("[a-c]x[!0-9]", "bxz"));
        assert!(!path_matches("[a-c]x[!0-9]", "bx1"));
        assert!(path_matches("a[b", "a[b"));
        assert!(path_matches("*", ""));
        assert_eq!(quote("../a b?"), "..%2Fa%20b%3F");
        assert_eq!(metadata_path("#", Some(1)), "1.%23.json");
    }

    #[test]
    fn consistent_snapshot_names() {
        let mut repo = Repo::new();
        repo.root.consistent_snapshot = true;
        let mut set = TrustedMetadata::new(&repo.root_bytes()).unwrap();
        repo.refresh(&mut set).unwrap();
        assert_eq!(set.snapshot_request().unwrap().path, "1.snapshot.json");
        let t = TargetFile {
            length: 1,
            hashes: BTreeMap::from([("sha256".into(), "ab".into())]),
            custom: None,
        };
        assert_eq!(set.target_url_path("a/b/c.txt", &t), "a/b/ab.c.txt");
        assert_eq!(set.target_url_path("c.txt", &t), "ab.c.txt");
    }

    #[test]
    fn target_verification() {
        let data = b"hello";
        let mut t = TargetFile {
            length: 5,
            hashes: BTreeMap::from([("sha256".into(), crate::sha256_hex(data))]),
            custom: None,
        };
        t.verify("t", data).unwrap();
        assert!(t.verify("t", b"hellO").is_err());
        assert!(t.verify("t", b"hello!").is_err());
        t.hashes.insert("md5".into(), "00".into());
        assert!(t.verify("t", data).is_err());
        t.hashes.clear();
        assert!(t.verify("t", data).is_err());
    }

    proptest! {
        #[test]
        fn updates_never_panic_on_junk(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let repo = Repo::new();
            let _ = TrustedMetadata::new(&bytes);
            let mut set = TrustedMetadata::new(&repo.root_bytes()).unwrap();
            let _ = set.update_root(&bytes);
            let _ = set.update_timestamp(&bytes, NOW);
            let mut set = TrustedMetadata::new(&repo.root_bytes()).unwrap();
            set.update_timestamp(&repo.ts(), NOW).unwrap();
            let _ = set.update_snapshot(&bytes, NOW);
            let _ = set.reload_snapshot(&bytes, NOW);
            let _ = set.update_targets(&bytes, NOW);
        }

        #[test]
        fn threshold_counts_distinct_authorised_keys(n_keys in 1usize..5, threshold in 1u32..5, signers in proptest::collection::vec(0usize..6, 0..8)) {
            let keys: Vec<SigningKey> = (0..n_keys).map(|i| key(50 + i as u8)).collect();
            let v = RoleVerifier::new("r", keys.iter().map(|k| k.public()).collect(), threshold);
            let all: Vec<SigningKey> = (0..6).map(|i| key(50 + i as u8)).collect();
            let chosen: Vec<&SigningKey> = signers.iter().map(|i| &all[*i]).collect();
            let env = Signed::sign(&Targets::new(1, FAR), &chosen);
            let distinct: BTreeSet<usize> = signers.iter().copied().filter(|i| *i < n_keys).collect();
            prop_assert_eq!(v.check(&env).is_ok(), distinct.len() as u32 >= threshold);
        }

        #[test]
        fn path_matching_never_panics(pattern in "[a-c*?\\[\\]!/-]{0,12}", path in "[a-c/\\[-]{0,12}") {
            let _ = crate::metadata::path_matches(&pattern, &path);
        }
    }
}
