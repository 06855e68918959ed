//! The TUF client workflow (specification §5) over a desired-state message, followed by the
//! Uptane director check. The TUF checks themselves live in [`crate::trusted`]; this module
//! adds the device's version floors and the director. Pure: the caller passes the trusted state and the time, and gets
//! either a reason to reject or a [`VerifiedDesired`] that only this module can construct.
//!
//! What a device keeps between updates is a [`TrustState`]: its trusted root and the highest
//! versions it has seen of every role. Persisting the returned state is the caller's job.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::desired::RepositoryMetadata;
use crate::desired::{CustomError, DesiredState, DirectorCustom, SamplingSpec, TrialThresholds};
use crate::error::VerifyError;
use crate::manifest::Manifest;
use crate::metadata::TargetFile;
use crate::metadata::{MetaIndex, RoleVerifier, Root, Signed, Targets};
use crate::trusted::{
    check_expiry, check_root_step, SearchStep, TargetSearch, TrustedMetadata, MAX_DELEGATIONS,
};

/// Most delegated roles whose version floors a device keeps: bins it no longer uses are
/// forgotten first (lowest name first), beyond this.
pub const MAX_DELEGATED_FLOORS: usize = 1024;

/// What a device trusts between updates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrustState {
    /// The trusted root envelope.
    pub root: Signed,
    /// Highest timestamp version accepted.
    pub timestamp_version: u64,
    /// Highest snapshot version accepted.
    pub snapshot_version: u64,
    /// Highest repository targets version accepted.
    pub targets_version: u64,
    /// Highest director targets version accepted (the desired-state counter).
    pub director_version: u64,
    /// Highest version accepted of each delegated targets role (hash bin) the device used.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub delegated_versions: BTreeMap<String, u64>,
}

impl TrustState {
    /// Starts from a root shipped with the device (TUF §5.2: the initial root is trusted as
    /// provisioned, but it must still be a well-formed, self-signed root).
    pub fn from_root(root: Signed) -> Result<Self, VerifyError> {
        let doc: Root = root.parse("root")?;
        root.verify::<Root>(&doc.role("root")?, "root")?;
        Ok(TrustState {
            root,
            timestamp_version: 0,
            snapshot_version: 0,
            targets_version: 0,
            director_version: 0,
            delegated_versions: BTreeMap::new(),
        })
    }

    /// The trusted root document.
    pub fn root(&self) -> Result<Root, VerifyError> {
        self.root.parse("root")
    }
}

/// A desired state that passed every check.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedDesired {
    trust: TrustState,
    models: Vec<Manifest>,
    probation: BTreeMap<String, TrialThresholds>,
    sampling: BTreeMap<String, SamplingSpec>,
    download: BTreeMap<String, crate::desired::DownloadPolicy>,
    backend: BTreeMap<String, crate::engine::Backend>,
    shadow: BTreeMap<String, crate::desired::ShadowSpec>,
    canary: BTreeMap<String, crate::desired::CanarySpec>,
    key_wraps: BTreeMap<String, crate::seal::KeyWrap>,
    director_version: u64,
}

impl VerifiedDesired {
    /// The trust state to persist before acting on the models.
    pub fn trust(&self) -> &TrustState {
        &self.trust
    }

    /// The manifests the device should run, one per model name, each in the form its
    /// target names (see [`Manifest::in_form`]).
    pub fn models(&self) -> &[Manifest] {
        &self.models
    }

    /// The content key of `model`'s encrypted artifact, sealed to this device, if its target
    /// carries one.
    pub fn key_wrap(&self, model: &str) -> Option<&crate::seal::KeyWrap> {
        self.key_wraps.get(model)
    }

    /// The backend the deployment pins `model` to, if it does.
    pub fn backend(&self, model: &str) -> Option<crate::engine::Backend> {
        self.backend.get(model).copied()
    }

    /// The shadow phase the deployment asks of `model`'s new version, if any.
    pub fn shadow(&self, model: &str) -> Option<crate::desired::ShadowSpec> {
        self.shadow.get(model).copied()
    }

    /// The traffic split the deployment asks for while `model`'s new version is on
    /// probation, if any.
    pub fn canary(&self, model: &str) -> Option<crate::desired::CanarySpec> {
        self.canary.get(model).cloned()
    }

    /// The rollout's probation thresholds for `model`, when the director set any.
    pub fn probation(&self, model: &str) -> Option<TrialThresholds> {
        self.probation.get(model).copied()
    }

    /// The deployment's sampling of `model`'s inputs and outputs, when the director turned it
    /// on.
    pub fn sampling(&self, model: &str) -> Option<SamplingSpec> {
        self.sampling.get(model).copied()
    }

    /// The deployment's download policy for `model` (rate, maintenance window, metered
    /// links), when the director set one.
    pub fn download(&self, model: &str) -> Option<&crate::desired::DownloadPolicy> {
        self.download.get(model)
    }

    /// The director document's version (the desired-state counter).
    pub fn director_version(&self) -> u64 {
        self.director_version
    }
}

fn check_not_older(role: &str, found: u64, trusted: u64) -> Result<(), VerifyError> {
    if found < trusted {
        return Err(VerifyError::Rollback {
            role: role.into(),
            found,
            trusted,
        });
    }
    Ok(())
}

fn meta_version(index: &MetaIndex, file: &str, role: &str) -> Result<u64, VerifyError> {
    index
        .meta
        .get(file)
        .map(|m| m.version)
        .ok_or_else(|| VerifyError::Mismatch {
            role: role.into(),
            reason: format!("no entry for {file}"),
        })
}

/// Updates the trusted root through a rotation chain (TUF §5.3): each new root must be the
/// next version and be signed by a threshold of the old root's root keys and of its own.
/// Roots not newer than the trusted one (a re-delivered chain) are checked and skipped.
pub fn update_root(trusted: &Signed, chain: &[Signed]) -> Result<Signed, VerifyError> {
    let mut current = trusted.clone();
    let mut current_doc: Root = current.parse("root")?;
    for next in chain {
        let offered: Root = next.parse("root")?;
        if offered.version < current_doc.version {
            // Already walked past (a re-delivered chain): never go back. Its signatures were
            // made by its predecessor's keys, not the current root's, so they are not checked
            // again here.
            continue;
        }
        if offered.version == current_doc.version {
            if next.signed != current.signed {
                return Err(VerifyError::Mismatch {
                    role: "root".into(),
                    reason: format!(
                        "version {} differs from the trusted root of that version",
                        offered.version
                    ),
                });
            }
            continue;
        }
        current_doc = check_root_step(&current_doc, next)?;
        current = next.clone();
    }
    Ok(current)
}

/// Runs the full check of a desired-state message for `device` at Unix time `now`: the TUF
/// workflow through [`TrustedMetadata`] (the same core the conformance client drives), the
/// device's version floors, then the Uptane director check.
pub fn verify_desired(
    trust: &TrustState,
    director: &RoleVerifier,
    device: &str,
    message: &DesiredState,
    now: i64,
) -> Result<VerifiedDesired, VerifyError> {
    if message.device != device {
        return Err(VerifyError::WrongDevice {
            expected: device.into(),
            found: message.device.clone(),
        });
    }
    let repo = &message.repository;

    // §5.3: root, with rotation; the final root must not have expired (checked by the
    // timestamp step, §5.3.10).
    let root_env = update_root(&trust.root, &repo.root)?;
    let mut set = TrustedMetadata::from_root_envelope(&root_env)?;
    // §5.3.11, fast-forward recovery: when a rotation replaced the timestamp or snapshot
    // keys, the versions signed by the old keys no longer bound the new ones.
    let (mut floor_timestamp, mut floor_snapshot) =
        (trust.timestamp_version, trust.snapshot_version);
    if root_env != trust.root {
        let (old, new): (Root, Root) = (trust.root.parse("root")?, root_env.parse("root")?);
        let keys = |r: &Root, role: &str| r.roles.get(role).map(|k| k.keyids.clone());
        if keys(&old, "timestamp") != keys(&new, "timestamp")
            || keys(&old, "snapshot") != keys(&new, "snapshot")
        {
            floor_timestamp = 0;
            floor_snapshot = 0;
        }
    }

    // §5.4: timestamp, then the device's floors (a rollback is reported before an expiry).
    let step = set.update_timestamp_envelope(&repo.timestamp, now);
    if let Some(timestamp) = set.timestamp() {
        check_not_older("timestamp", timestamp.version, floor_timestamp)?;
        let named = meta_version(timestamp, "snapshot.json", "timestamp")?;
        check_not_older("snapshot", named, floor_snapshot)?;
    }
    step?;

    // §5.5: snapshot, the version the timestamp names.
    let step = set.update_snapshot_envelope(&repo.snapshot, now);
    if let Some(snapshot) = set.snapshot() {
        let named = meta_version(snapshot, "targets.json", "snapshot")?;
        check_not_older("targets", named, trust.targets_version)?;
    }
    step?;

    // §5.6: targets, the version the snapshot names.
    set.update_targets_envelope(&repo.targets, now)?;
    let (Some(timestamp), Some(snapshot), Some(targets)) =
        (set.timestamp(), set.snapshot(), set.targets())
    else {
        return Err(VerifyError::Order(
            "targets verified without timestamp and snapshot",
        ));
    };
    let (timestamp_version, snapshot_version, targets_version) =
        (timestamp.version, snapshot.version, targets.version);
    let mut delegated = trust.delegated_versions.clone();

    // Uptane: the director's per-device targets, each of which the repository must hold
    // byte for byte (same length, same hashes, same manifest).
    let wanted: Targets = message.director.verify(director, "targets")?;
    check_not_older("director", wanted.version, trust.director_version)?;
    check_expiry("director", &wanted.expires, now)?;
    let mut models: Vec<Manifest> = Vec::new();
    let mut probation = BTreeMap::new();
    let mut sampling = BTreeMap::new();
    let mut download = BTreeMap::new();
    let mut backend = BTreeMap::new();
    let mut shadow = BTreeMap::new();
    let mut canary = BTreeMap::new();
    let mut key_wraps = BTreeMap::new();
    for (path, target) in &wanted.targets {
        let custom = match DirectorCustom::from_value(target.custom.as_ref()) {
            Ok(c) if c.device == device => c,
            Ok(c) => {
                return Err(VerifyError::WrongDevice {
                    expected: device.into(),
                    found: c.device,
                })
            }
            Err(CustomError::NoDevice) => {
                return Err(VerifyError::WrongDevice {
                    expected: device.into(),
                    found: "<none>".into(),
                })
            }
            Err(CustomError::Terms(reason)) => {
                return Err(VerifyError::Mismatch {
                    role: "director".into(),
                    reason: format!("{path}: {reason}"),
                })
            }
        };
        let repo_target = &find_target(&mut set, repo, path, trust, &mut delegated, now)?;
        if repo_target.length != target.length || repo_target.hashes != target.hashes {
            return Err(VerifyError::Mismatch {
                role: "director".into(),
                reason: format!("{path} differs from the repository's target"),
            });
        }
        let mut manifest = Manifest::from_target(path, repo_target)?;
        if let Some(form) = custom.terms.form {
            manifest = manifest
                .in_form(form)
                .ok_or_else(|| VerifyError::Mismatch {
                    role: "director".into(),
                    reason: format!("{path} comes in no {form} form"),
                })?;
        }
        check_expiry(&format!("manifest {path}"), &manifest.expires, now)?;
        if models.iter().any(|m| m.name == manifest.name) {
            return Err(VerifyError::Mismatch {
                role: "director".into(),
                reason: format!("two versions of model {} at once", manifest.name),
            });
        }
        if let Some(thresholds) = custom.terms.probation {
            probation.insert(manifest.name.clone(), thresholds);
        }
        if let Some(policy) = custom.terms.download {
            download.insert(manifest.name.clone(), policy);
        }
        if let Some(spec) = custom.terms.sampling {
            sampling.insert(manifest.name.clone(), spec);
        }
        if let Some(pin) = custom.terms.backend {
            backend.insert(manifest.name.clone(), pin);
        }
        if let Some(spec) = custom.terms.shadow {
            shadow.insert(manifest.name.clone(), spec);
        }
        if let Some(spec) = custom.terms.canary {
            canary.insert(manifest.name.clone(), spec);
        }
        if let Some(wrap) = custom.terms.key_wrap {
            key_wraps.insert(manifest.name.clone(), wrap);
        }
        models.push(manifest);
    }

    Ok(VerifiedDesired {
        trust: TrustState {
            root: root_env,
            timestamp_version,
            snapshot_version,
            targets_version,
            director_version: wanted.version,
            delegated_versions: delegated,
        },
        models,
        probation,
        sampling,
        download,
        backend,
        shadow,
        canary,
        key_wraps,
        director_version: wanted.version,
    })
}

/// The repository's target at `path` (TUF §5.6.7): in the top-level targets or in the
/// delegated role (hash bin) the search leads to, loaded from the message's `delegated`
/// documents, each checked against the snapshot, its delegator's keys and the device's
/// version floor for it (raised in `floors`).
fn find_target(
    set: &mut TrustedMetadata,
    repo: &RepositoryMetadata,
    path: &str,
    trust: &TrustState,
    floors: &mut BTreeMap<String, u64>,
    now: i64,
) -> Result<TargetFile, VerifyError> {
    let mut search = TargetSearch::new(path);
    for _ in 0..=MAX_DELEGATIONS {
        let (role, delegator) = match search.step(set) {
            SearchStep::Found(target) => return Ok(target),
            SearchStep::NotFound => break,
            SearchStep::Load { role, delegator } => (role, delegator),
        };
        let Some(env) = repo.delegated.get(&role) else {
            // The server left out the role that would hold it: as good as not there.
            break;
        };
        set.update_delegated_targets_envelope(env, &role, &delegator, now)?;
        let found = set.delegated(&role).map_or(0, |t| t.version);
        let floor = trust.delegated_versions.get(&role).copied().unwrap_or(0);
        check_not_older(&role, found, floor)?;
        floors.insert(role, found);
        while floors.len() > MAX_DELEGATED_FLOORS {
            floors.pop_first();
        }
    }
    Err(VerifyError::UnknownTarget { path: path.into() })
}

/// Test and tooling support: a complete, consistent set of signing keys and a function that
/// builds a desired-state message, as the server and operators would.
pub mod fixture {
    use std::collections::BTreeMap;

    use super::*;
    use crate::desired::RepositoryMetadata;
    use crate::keys::SigningKey;
    use crate::manifest::{chunk_digests, DataType, TensorSpec};
    use crate::metadata::MetaFile;

    /// A consistent manifest for `bytes`: one FP32 input `x: [1]`, one output `y: [1]`,
    /// no golden vectors, expiring in 2035.
    pub fn manifest(name: &str, version: u64, bytes: &[u8], chunk_size: u32) -> Manifest {
        let tensor = |n: &str| TensorSpec {
            name: n.into(),
            datatype: DataType::Fp32,
            shape: vec![1],
            dims: vec![],
        };
        Manifest {
            format: crate::FORMAT_VERSION,
            name: name.into(),
            version,
            model_format: crate::manifest::ModelFormat::Onnx,
            size: bytes.len() as u64,
            sha256: crate::sha256_hex(bytes),
            chunk_size,
            segments: vec![],
            chunks: chunk_digests(bytes, chunk_size),
            inputs: vec![tensor("x")],
            outputs: vec![tensor("y")],
            golden: vec![],
            golden_file: None,
            expires: "2035-01-01T00:00:00Z".into(),
            metadata: Default::default(),
            probation: None,
            latency_budget: None,
            memory_bytes: None,
            fallback_to: None,
            forms: Vec::new(),
            encryption: None,
            tolerance: Default::default(),
        }
    }

    /// One key per role plus the director's.
    #[derive(Debug, Clone)]
    pub struct Keys {
        /// Root key.
        pub root: SigningKey,
        /// Operators' targets key.
        pub targets: SigningKey,
        /// Snapshot key.
        pub snapshot: SigningKey,
        /// Timestamp key.
        pub timestamp: SigningKey,
        /// Director key.
        pub director: SigningKey,
    }

    impl Keys {
        /// Deterministic keys from a seed byte.
        pub fn from_seed(seed: u8) -> Self {
            let k = |n: u8| SigningKey::from_bytes(&[seed.wrapping_add(n); 32]);
            Keys {
                root: k(1),
                targets: k(2),
                snapshot: k(3),
                timestamp: k(4),
                director: k(5),
            }
        }

        /// Version-1 root, signed.
        pub fn root(&self, expires: &str) -> Signed {
            let root = Root::new(
                1,
                expires,
                &self.root.public(),
                &self.targets.public(),
                &self.snapshot.public(),
                &self.timestamp.public(),
            );
            Signed::sign(&root, &[&self.root])
        }

        /// The director verifier a device pins.
        pub fn director_verifier(&self) -> RoleVerifier {
            RoleVerifier::new("director", vec![self.director.public()], 1)
        }

        /// A desired state for `device` running `models`, all metadata at `version`.
        pub fn desired(
            &self,
            device: &str,
            models: &[Manifest],
            version: u64,
            expires: &str,
        ) -> DesiredState {
            let mut targets = Targets::new(version, expires);
            for m in models {
                targets.targets.insert(m.target_path(), m.to_target());
            }
            let targets = Signed::sign(&targets, &[&self.targets]);
            self.desired_over(&targets, device, models, version, expires)
        }

        /// A desired state as a repository laid out in hash bins ([`crate::bins`]) sends it:
        /// top-level targets at `version` delegating to bins signed by the targets key, each
        /// model in its bin (at `version` too), and only those bins in the message.
        pub fn desired_in_bins(
            &self,
            device: &str,
            models: &[Manifest],
            version: u64,
            expires: &str,
        ) -> DesiredState {
            let mut top = Targets::new(version, expires);
            let key = self.targets.public();
            top.delegations = Some(crate::bins::delegation(
                [(key.key_id(), key)].into(),
                1,
                crate::bins::DEFAULT_BIT_LENGTH,
            ));
            let mut bins: BTreeMap<String, Targets> = BTreeMap::new();
            for m in models {
                let bin = crate::bins::bin_for(&top, &m.target_path()).expect("binned");
                bins.entry(bin)
                    .or_insert_with(|| Targets::new(version, expires))
                    .targets
                    .insert(m.target_path(), m.to_target());
            }
            let delegated = bins
                .into_iter()
                .map(|(role, doc)| (role, Signed::sign(&doc, &[&self.targets])))
                .collect();
            let top = Signed::sign(&top, &[&self.targets]);
            self.desired_with(&top, delegated, device, models, version, expires)
        }

        /// A desired state for `device` running `models` over already signed repository
        /// `targets` (what a holder of only the online keys can make): snapshot, timestamp
        /// and director at `version`, signed with this set's snapshot, timestamp and director
        /// keys; the snapshot names the targets' own version.
        pub fn desired_over(
            &self,
            targets: &Signed,
            device: &str,
            models: &[Manifest],
            version: u64,
            expires: &str,
        ) -> DesiredState {
            self.desired_with(targets, BTreeMap::new(), device, models, version, expires)
        }

        /// [`Keys::desired_over`] with `delegated` targets roles, which the snapshot lists
        /// at their own versions.
        pub fn desired_with(
            &self,
            targets: &Signed,
            delegated: BTreeMap<String, Signed>,
            device: &str,
            models: &[Manifest],
            version: u64,
            expires: &str,
        ) -> DesiredState {
            let mut director = Targets::new(version, expires);
            for m in models {
                let mut t = m.to_target();
                t.custom = Some(serde_json::json!({ "device": device }));
                director.targets.insert(m.target_path(), t);
            }
            let targets_version = targets.signed["version"].as_u64().unwrap_or(0);
            let entry = |version: u64| MetaFile {
                version,
                length: None,
                hashes: None,
            };
            let meta =
                |file: &str, version: u64| BTreeMap::from([(file.to_string(), entry(version))]);
            let mut listed = meta("targets.json", targets_version);
            for (role, doc) in &delegated {
                listed.insert(
                    format!("{role}.json"),
                    entry(doc.signed["version"].as_u64().unwrap_or(0)),
                );
            }
            let snapshot = MetaIndex::new("snapshot", version, expires, listed);
            let timestamp = MetaIndex::new(
                "timestamp",
                version,
                expires,
                meta("snapshot.json", version),
            );
            DesiredState {
                format: crate::FORMAT_VERSION,
                device: device.into(),
                director: Signed::sign(&director, &[&self.director]),
                repository: RepositoryMetadata {
                    root: vec![],
                    timestamp: Signed::sign(&timestamp, &[&self.timestamp]),
                    snapshot: Signed::sign(&snapshot, &[&self.snapshot]),
                    targets: targets.clone(),
                    delegated,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixture::Keys;
    use super::*;
    use crate::metadata::parse_expiry;

    const FAR: &str = "2035-01-01T00:00:00Z";

    fn now() -> i64 {
        parse_expiry("2026-11-23T00:00:00Z").unwrap()
    }

    fn manifest(version: u64) -> Manifest {
        super::fixture::manifest("m", version, &[version as u8; 10], 4)
    }

    fn trust(keys: &Keys) -> TrustState {
        TrustState::from_root(keys.root(FAR)).unwrap()
    }

    #[test]
    fn accepts_a_consistent_desired_state() {
        let keys = Keys::from_seed(0);
        let msg = keys.desired("dev", &[manifest(1)], 1, FAR);
        let v =
            verify_desired(&trust(&keys), &keys.director_verifier(), "dev", &msg, now()).unwrap();
        assert_eq!(v.models(), &[manifest(1)]);
        assert_eq!(v.trust().director_version, 1);
    }

    #[test]
    fn targets_in_hash_bins_are_found_and_their_versions_never_go_back() {
        let keys = Keys::from_seed(0);
        let models = [manifest(1), super::fixture::manifest("n", 4, b"other", 4)];
        let msg = keys.desired_in_bins("dev", &models, 3, FAR);
        // Only the bins of the device's two targets travel.
        assert!((1..=2).contains(&msg.repository.delegated.len()));
        let director = keys.director_verifier();
        let v = verify_desired(&trust(&keys), &director, "dev", &msg, now()).unwrap();
        assert_eq!(v.models(), &models);
        let floors = &v.trust().delegated_versions;
        assert_eq!(floors.len(), msg.repository.delegated.len());
        assert!(floors.values().all(|&v| v == 3));

        // An older bin (validly signed, with a snapshot naming it) is a rollback.
        let mut later = v.trust().clone();
        later.director_version = 0;
        let old = keys.desired_in_bins("dev", &models, 2, FAR);
        let mut newer_top = old.clone();
        newer_top.repository = keys.desired_in_bins("dev", &models, 5, FAR).repository;
        newer_top.repository.delegated = old.repository.delegated.clone();
        // Re-sign the snapshot so that it names the old bins: only the floor stops it.
        let err = verify_desired(
            &later,
            &director,
            "dev",
            &resnapshot(&keys, newer_top, &models),
            now(),
        );
        assert!(
            matches!(err, Err(VerifyError::Rollback { ref role, found: 2, trusted: 3 }) if role.starts_with("bins-")),
            "{err:?}"
        );

        // A bin left out, or signed by a key the delegation does not name: no target.
        let mut missing = msg.clone();
        missing.repository.delegated.clear();
        assert!(matches!(
            verify_desired(&trust(&keys), &director, "dev", &missing, now()),
            Err(VerifyError::UnknownTarget { .. })
        ));
        let mut forged = msg.clone();
        let other = Keys::from_seed(9);
        for doc in forged.repository.delegated.values_mut() {
            *doc = Signed::sign(&doc.parse::<Targets>("targets").unwrap(), &[&other.targets]);
        }
        assert!(verify_desired(&trust(&keys), &director, "dev", &forged, now()).is_err());
    }

    /// `msg` (for `models`) with a snapshot and timestamp re-signed one version up to name
    /// the delegated documents it carries, at their own versions.
    fn resnapshot(keys: &Keys, msg: DesiredState, models: &[Manifest]) -> DesiredState {
        let version = msg.repository.snapshot.signed["version"].as_u64().unwrap() + 1;
        let mut out = keys.desired_with(
            &msg.repository.targets,
            msg.repository.delegated.clone(),
            "dev",
            models,
            version,
            FAR,
        );
        out.director = msg.director;
        out
    }

    /// `msg` with its director document re-signed after `edit`.
    fn edit_director(keys: &Keys, msg: &mut DesiredState, edit: impl FnOnce(&mut Targets)) {
        let mut director: Targets = msg.director.parse("targets").unwrap();
        edit(&mut director);
        msg.director = Signed::sign(&director, &[&keys.director]);
    }

    #[test]
    fn a_rollouts_probation_thresholds_come_from_the_signed_director_target() {
        let keys = Keys::from_seed(0);
        let mut msg = keys.desired("dev", &[manifest(1)], 1, FAR);
        let path = manifest(1).target_path();
        edit_director(&keys, &mut msg, |d| {
            let custom = d.targets.get_mut(&path).unwrap().custom.as_mut().unwrap();
            custom["probation"] = serde_json::json!({"requests": 7, "max_p99_percent": 150});
        });
        let v =
            verify_desired(&trust(&keys), &keys.director_verifier(), "dev", &msg, now()).unwrap();
        let t = v.probation("m").unwrap();
        assert_eq!(
            (t.requests, t.seconds, t.max_p99_percent),
            (Some(7), None, Some(150))
        );

        for bad in [
            serde_json::json!({"max_p99_percent": 50}),
            serde_json::json!({"max_error_permille": 1001}),
            serde_json::json!({"requests": -1}),
            serde_json::json!({"surprise": 1}),
        ] {
            let mut msg = keys.desired("dev", &[manifest(1)], 1, FAR);
            edit_director(&keys, &mut msg, |d| {
                let custom = d.targets.get_mut(&path).unwrap().custom.as_mut().unwrap();
                custom["probation"] = bad.clone();
            });
            let err = verify_desired(&trust(&keys), &keys.director_verifier(), "dev", &msg, now())
                .unwrap_err();
            assert!(matches!(err, VerifyError::Mismatch { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn the_director_names_the_form_a_device_downloads_and_the_backend_it_runs() {
        use crate::manifest::{ArtifactForm, ModelFormat};
        let keys = Keys::from_seed(0);
        let mut m = manifest(1);
        let nnef = b"the same model as NNEF";
        m.forms.push(ArtifactForm::of(
            ModelFormat::Nnef,
            nnef,
            m.chunk_size,
            vec![],
        ));
        let path = m.target_path();
        let with = |m: &Manifest, custom: serde_json::Value| {
            let mut msg = keys.desired("dev", std::slice::from_ref(m), 1, FAR);
            edit_director(&keys, &mut msg, |d| {
                let c = d.targets.get_mut(&path).unwrap().custom.as_mut().unwrap();
                for (k, v) in custom.as_object().unwrap() {
                    c[k] = v.clone();
                }
            });
            verify_desired(&trust(&keys), &keys.director_verifier(), "dev", &msg, now())
        };
        // No form named: the manifest's own artifact; no pin.
        let v = with(&m, serde_json::json!({})).unwrap();
        assert_eq!(v.models()[0].sha256, m.sha256);
        assert_eq!(v.backend("m"), None);
        let v = with(&m, serde_json::json!({"form": "nnef", "backend": "tract"})).unwrap();
        assert_eq!(v.models()[0].sha256, crate::sha256_hex(nnef));
        assert_eq!(v.models()[0].model_format, ModelFormat::Nnef);
        assert!(v.models()[0].forms.is_empty());
        assert_eq!(v.backend("m"), Some(crate::engine::Backend::Tract));
        // A form the signed manifest does not carry, a backend nobody has: refused.
        m.forms.clear();
        for bad in [
            serde_json::json!({"form": "nnef"}),
            serde_json::json!({"backend": "cuda"}),
        ] {
            let err = with(&m, bad.clone()).unwrap_err();
            assert!(matches!(err, VerifyError::Mismatch { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn sampling_is_off_unless_the_signed_director_target_turns_it_on() {
        let keys = Keys::from_seed(0);
        let msg = keys.desired("dev", &[manifest(1)], 1, FAR);
        let v =
            verify_desired(&trust(&keys), &keys.director_verifier(), "dev", &msg, now()).unwrap();
        assert_eq!(v.sampling("m"), None);

        let path = manifest(1).target_path();
        let mut msg = keys.desired("dev", &[manifest(1)], 1, FAR);
        edit_director(&keys, &mut msg, |d| {
            let custom = d.targets.get_mut(&path).unwrap().custom.as_mut().unwrap();
            custom["sampling"] = serde_json::json!({"rate_permille": 5, "budget_bytes": 65536});
        });
        let v =
            verify_desired(&trust(&keys), &keys.director_verifier(), "dev", &msg, now()).unwrap();
        assert_eq!(
            v.sampling("m"),
            Some(SamplingSpec {
                rate_permille: 5,
                budget_bytes: 65536
            })
        );

        for bad in [
            serde_json::json!({"rate_permille": 0, "budget_bytes": 65536}),
            serde_json::json!({"rate_permille": 5, "budget_bytes": 1_000_000_000_u64}),
            serde_json::json!({"rate_permille": 5}),
            serde_json::json!({"rate_permille": 5, "budget_bytes": 65536, "everything": true}),
        ] {
            let mut msg = keys.desired("dev", &[manifest(1)], 1, FAR);
            edit_director(&keys, &mut msg, |d| {
                let custom = d.targets.get_mut(&path).unwrap().custom.as_mut().unwrap();
                custom["sampling"] = bad.clone();
            });
            let err = verify_desired(&trust(&keys), &keys.director_verifier(), "dev", &msg, now())
                .unwrap_err();
            assert!(matches!(err, VerifyError::Mismatch { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn rejects_unknown_signer() {
        let keys = Keys::from_seed(0);
        let evil = Keys::from_seed(100);
        let msg = evil.desired("dev", &[manifest(1)], 1, FAR);
        let err = verify_desired(&trust(&keys), &keys.director_verifier(), "dev", &msg, now())
            .unwrap_err();
        assert!(matches!(err, VerifyError::Threshold { .. }), "{err}");
    }

    #[test]
    fn rejects_director_target_missing_from_repository() {
        let keys = Keys::from_seed(0);
        let mut msg = keys.desired("dev", &[manifest(1)], 1, FAR);
        let mut other = keys.desired("dev", &[manifest(2)], 1, FAR);
        // The director asks for v2 but the operators only signed v1.
        msg.director = std::mem::replace(&mut other.director, msg.director.clone());
        let err = verify_desired(&trust(&keys), &keys.director_verifier(), "dev", &msg, now())
            .unwrap_err();
        assert!(matches!(err, VerifyError::UnknownTarget { .. }), "{err}");
    }

    #[test]
    fn rejects_other_device_expired_and_rollback() {
        let keys = Keys::from_seed(0);
        let t = trust(&keys);
        let dir = keys.director_verifier();
        let msg = keys.desired("other", &[manifest(1)], 1, FAR);
        assert!(matches!(
            verify_desired(&t, &dir, "dev", &msg, now()),
            Err(VerifyError::WrongDevice { .. })
        ));
        let stale = keys.desired("dev", &[manifest(1)], 1, "2026-01-01T00:00:00Z");
        assert!(matches!(
            verify_desired(&t, &dir, "dev", &stale, now()),
            Err(VerifyError::Expired { .. })
        ));
        let newer = verify_desired(
            &t,
            &dir,
            "dev",
            &keys.desired("dev", &[manifest(2)], 5, FAR),
            now(),
        )
        .unwrap();
        let old = keys.desired("dev", &[manifest(1)], 4, FAR);
        assert!(matches!(
            verify_desired(newer.trust(), &dir, "dev", &old, now()),
            Err(VerifyError::Rollback { .. })
        ));
    }

    #[test]
    fn root_rotation_needs_old_and_new_keys() {
        let keys = Keys::from_seed(0);
        let new_keys = Keys::from_seed(50);
        let mut root2: Root = keys.root(FAR).parse("root").unwrap();
        root2.version = 2;
        let new_root_key = new_keys.root.public();
        root2
            .keys
            .insert(new_root_key.key_id(), new_root_key.clone());
        root2.roles.get_mut("root").unwrap().keyids = vec![new_root_key.key_id()];
        let both = Signed::sign(&root2, &[&keys.root, &new_keys.root]);
        let rotated = update_root(&keys.root(FAR), std::slice::from_ref(&both)).unwrap();
        assert_eq!(rotated.parse::<Root>("root").unwrap().version, 2);
        let only_new = Signed::sign(&root2, &[&new_keys.root]);
        assert!(update_root(&keys.root(FAR), &[only_new]).is_err());
        let only_old = Signed::sign(&root2, &[&keys.root]);
        assert!(update_root(&keys.root(FAR), &[only_old]).is_err());
        let mut root4 = root2.clone();
        root4.version = 4;
        let skip = Signed::sign(&root4, &[&keys.root, &new_keys.root]);
        assert!(matches!(
            update_root(&keys.root(FAR), &[skip]),
            Err(VerifyError::RootChain { .. })
        ));
    }

    #[test]
    fn a_redelivered_chain_of_rotated_root_keys_is_still_accepted() {
        let (k1, k2, k3) = (Keys::from_seed(0), Keys::from_seed(50), Keys::from_seed(90));
        let v1 = k1.root(FAR);
        let step = |prev: &Signed,
                    new_key: &crate::keys::SigningKey,
                    old_key: &crate::keys::SigningKey| {
            let mut doc: Root = prev.parse("root").unwrap();
            doc.version += 1;
            let id = new_key.public().key_id();
            doc.keys.insert(id.clone(), new_key.public());
            doc.roles.get_mut("root").unwrap().keyids = vec![id];
            Signed::sign(&doc, &[old_key, new_key])
        };
        let v2 = step(&v1, &k2.root, &k1.root);
        let v3 = step(&v2, &k3.root, &k2.root);
        let chain = [v2.clone(), v3.clone()];
        let trusted = update_root(&v1, &chain).unwrap();
        assert_eq!(trusted, v3);
        // The server sends the whole chain with every message: walking it again from v3
        // must not check v2 against v3's keys.
        assert_eq!(update_root(&trusted, &chain).unwrap(), v3);
        // A different document claiming the trusted version is refused.
        let mut forged: Root = v3.parse("root").unwrap();
        forged.expires = "2099-01-01T00:00:00Z".into();
        let forged = Signed::sign(&forged, &[&k3.root]);
        assert!(matches!(
            update_root(&trusted, &[forged]),
            Err(VerifyError::Mismatch { .. })
        ));
    }

    #[test]
    fn rotating_the_timestamp_key_recovers_from_a_fast_forward() {
        let keys = Keys::from_seed(0);
        let dir = keys.director_verifier();
        // A stolen timestamp/snapshot key pushed the versions far ahead.
        let ahead = verify_desired(
            &trust(&keys),
            &dir,
            "dev",
            &keys.desired("dev", &[manifest(1)], 1 << 40, FAR),
            now(),
        )
        .unwrap();
        let normal = keys.desired("dev", &[manifest(2)], 7, FAR);
        assert!(matches!(
            verify_desired(ahead.trust(), &dir, "dev", &normal, now()),
            Err(VerifyError::Rollback { .. })
        ));
        // The operators rotate the timestamp and snapshot keys in root v2.
        let fresh = Keys::from_seed(30);
        let mut root2: Root = keys.root(FAR).parse("root").unwrap();
        root2.version = 2;
        for (role, key) in [
            ("timestamp", &fresh.timestamp),
            ("snapshot", &fresh.snapshot),
        ] {
            let id = key.public().key_id();
            root2.keys.insert(id.clone(), key.public());
            root2.roles.get_mut(role).unwrap().keyids = vec![id];
        }
        let root2 = Signed::sign(&root2, &[&keys.root]);
        let recovered_keys = Keys {
            timestamp: fresh.timestamp.clone(),
            snapshot: fresh.snapshot.clone(),
            ..keys.clone()
        };
        let mut msg = recovered_keys.desired("dev", &[manifest(2)], 1 << 41, FAR);
        // Low timestamp/snapshot versions again; director and targets keep counting.
        let mut again = recovered_keys.desired("dev", &[manifest(2)], 3, FAR);
        again.director = msg.director.clone();
        again.repository.targets = msg.repository.targets.clone();
        let targets_version = msg.repository.targets.signed["version"].as_u64().unwrap();
        let snap: MetaIndex = again.repository.snapshot.parse("snapshot").unwrap();
        let mut snap = snap;
        snap.meta.get_mut("targets.json").unwrap().version = targets_version;
        again.repository.snapshot = Signed::sign(&snap, &[&fresh.snapshot]);
        again.repository.root = vec![root2];
        msg = again;
        let v = verify_desired(ahead.trust(), &dir, "dev", &msg, now()).unwrap();
        assert_eq!(v.trust().timestamp_version, 3);
    }
}
