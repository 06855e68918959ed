//! What operators sign, offline, to change the repository: the hash bin a version goes into
//! or leaves ([`modelcast_proto::bins`]), and the top-level targets when they first delegate
//! to the bins, come near their expiry, or when the root's targets keys changed (a rotation):
//! the bins are delegated to exactly the root's targets keys and threshold, so after a
//! rotation the next edit re-delegates and re-signs every bin under the new keys, and a
//! revoked key signs nothing any more. Pure edits ([`add`], [`remove`]) over documents the
//! caller verified; [`Repository`] fetches and verifies them through the API, under a root
//! reached from the operators' own, so a server cannot slip targets into what they sign.

use modelcast_proto::bins;
use modelcast_proto::keys::SigningKey;
use modelcast_proto::manifest::Manifest;
use modelcast_proto::metadata::{format_expiry, parse_expiry, Delegations, Root, Signed, Targets};
use thiserror::Error;

use crate::client::{Client, ClientError};
use modelcast_server::repo::TargetsUpload;

/// Lifetime of what operators sign: the top-level targets, the bins and the manifests.
pub const SIGNED_LIFETIME_SECS: i64 = 365 * 24 * 3600;
/// The top-level targets are re-signed by an edit when they would expire within this.
pub const RESIGN_WITHIN_SECS: i64 = SIGNED_LIFETIME_SECS / 2;

/// Why an edit cannot be signed.
#[derive(Debug, Error)]
pub enum SigningError {
    /// The version is in the repository already.
    #[error("{path} is already in the repository")]
    Present {
        /// Target path.
        path: String,
    },
    /// A newer or equal version of the model is in the repository.
    #[error("{name} version {version} is not newer than version {newest} in the repository")]
    NotNewer {
        /// Model name.
        name: String,
        /// Version offered.
        version: u64,
        /// Newest version held.
        newest: u64,
    },
    /// The version to remove is not there.
    #[error("{path} is not in the repository")]
    Absent {
        /// Target path.
        path: String,
    },
    /// Nothing is published yet.
    #[error("nothing is published yet")]
    Empty,
    /// A document from the server does not verify, or does not decode.
    #[error("{what}: {reason}")]
    Untrusted {
        /// Which document.
        what: String,
        /// Why.
        reason: String,
    },
    /// The server.
    #[error(transparent)]
    Api(#[from] ClientError),
}

/// The repository as the operators verified it.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The top-level targets, if any were published.
    pub top: Option<Targets>,
}

/// The delegation the bins must have under `root`: its targets keys and threshold, over
/// the bins of `current` (or [`bins::DEFAULT_BIT_LENGTH`] of them for a new repository).
pub fn wanted_delegation(root: &Root, current: Option<&Targets>) -> Delegations {
    let role = root.roles.get("targets");
    let keys = role
        .map(|r| {
            r.keyids
                .iter()
                .filter_map(|id| Some((id.clone(), root.keys.get(id)?.clone())))
                .collect()
        })
        .unwrap_or_default();
    let bits = current
        .and_then(|t| t.delegations.as_ref()?.succinct_roles.as_ref())
        .map_or(bins::DEFAULT_BIT_LENGTH, |s| s.bit_length);
    bins::delegation(keys, role.map_or(1, |r| r.threshold), bits)
}

/// The next top-level targets, when they must change: created, given the bins'
/// `delegation` (first use, or new keys after a rotation), or re-signed because they
/// expire within [`RESIGN_WITHIN_SECS`]. `None` when the current ones stay.
fn next_top(top: Option<&Targets>, delegation: &Delegations, now: i64) -> Option<Targets> {
    let expiring =
        |t: &Targets| parse_expiry(&t.expires).map_or(true, |e| e - now < RESIGN_WITHIN_SECS);
    match top {
        Some(t) if t.delegations.as_ref() == Some(delegation) && !expiring(t) => None,
        _ => {
            let mut t = top.cloned().unwrap_or_else(|| Targets::new(0, ""));
            t.delegations = Some(delegation.clone());
            t.version += 1;
            t.expires = format_expiry(now + SIGNED_LIFETIME_SECS);
            Some(t)
        }
    }
}

/// Whether `next` delegates the bins to other keys than `top` did: every existing bin must
/// then be re-signed ([`rekey`]).
pub fn rekeys(top: Option<&Targets>, next: Option<&Targets>) -> bool {
    let keys = |t: &Targets| {
        t.delegations
            .as_ref()
            .map(|d| (d.keys.clone(), d.succinct_roles.clone()))
    };
    match (top.and_then(keys), next) {
        (Some(old), Some(next)) => keys(next) != Some(old),
        _ => false,
    }
}

/// Re-signs existing bins (each one version up) into `upload`, leaving those it already
/// carries.
pub fn rekey(
    upload: &mut TargetsUpload,
    existing: Vec<(String, Targets)>,
    keys: &[&SigningKey],
    now: i64,
) {
    for (role, bin) in existing {
        upload.delegated.entry(role).or_insert_with(|| {
            let mut bin = bin;
            bin.version += 1;
            bin.expires = format_expiry(now + SIGNED_LIFETIME_SECS);
            Signed::sign(&bin, keys)
        });
    }
}

/// Signs the upload that adds `manifest` to its bin (`bin`: that bin's current document,
/// verified), with the top-level targets when they change (to `delegation`, see
/// [`wanted_delegation`]). `newest` is the newest version of the model in the repository.
/// When the delegation changes keys, the caller adds every other bin ([`rekey`]).
pub fn add(
    top: Option<&Targets>,
    bin: Option<Targets>,
    newest: Option<u64>,
    manifest: &Manifest,
    delegation: &Delegations,
    keys: &[&SigningKey],
    now: i64,
) -> Result<TargetsUpload, SigningError> {
    let path = manifest.target_path();
    if top.is_some_and(|t| t.targets.contains_key(&path))
        || bin.as_ref().is_some_and(|b| b.targets.contains_key(&path))
    {
        return Err(SigningError::Present { path });
    }
    if let Some(newest) = newest.filter(|&n| n >= manifest.version) {
        return Err(SigningError::NotNewer {
            name: manifest.name.clone(),
            version: manifest.version,
            newest,
        });
    }
    let new_top = next_top(top, delegation, now);
    let layout = new_top
        .as_ref()
        .or(top)
        .expect("a top-level targets exists");
    let role = bins::bin_for(layout, &path).expect("the top-level targets use bins");
    let mut bin = bin.unwrap_or_else(|| Targets::new(0, ""));
    bin.targets.insert(path, manifest.to_target());
    Ok(upload(new_top, role, bin, keys, now))
}

/// Signs the upload that removes `path` from the repository: from its bin, or from the
/// top-level targets of a repository made before bins.
pub fn remove(
    top: &Targets,
    bin: Option<Targets>,
    path: &str,
    delegation: &Delegations,
    keys: &[&SigningKey],
    now: i64,
) -> Result<TargetsUpload, SigningError> {
    let absent = || SigningError::Absent { path: path.into() };
    if top.targets.contains_key(path) {
        let mut t = top.clone();
        t.targets.remove(path);
        let mut t = next_top(Some(&t), delegation, now).unwrap_or(t);
        if t.version == top.version {
            t.version += 1;
        }
        return Ok(TargetsUpload {
            targets: Some(Signed::sign(&t, keys)),
            delegated: Default::default(),
        });
    }
    let mut bin = bin.ok_or_else(absent)?;
    bin.targets.remove(path).ok_or_else(absent)?;
    let role = bins::bin_for(top, path).ok_or_else(absent)?;
    Ok(upload(
        next_top(Some(top), delegation, now),
        role,
        bin,
        keys,
        now,
    ))
}

fn upload(
    top: Option<Targets>,
    role: String,
    mut bin: Targets,
    keys: &[&SigningKey],
    now: i64,
) -> TargetsUpload {
    bin.version += 1;
    bin.expires = format_expiry(now + SIGNED_LIFETIME_SECS);
    TargetsUpload {
        targets: top.map(|t| Signed::sign(&t, keys)),
        delegated: [(role, Signed::sign(&bin, keys))].into(),
    }
}

/// The repository through the API, verified from the operators' own root.
pub struct Repository<'a> {
    client: &'a Client,
    top: Option<Targets>,
    delegation: Delegations,
}

impl<'a> Repository<'a> {
    /// The server's top-level targets, verified under a root reached from `trusted`.
    pub fn open(client: &'a Client, trusted: &Signed) -> Result<Self, SigningError> {
        let untrusted = |what: &str, e: modelcast_proto::VerifyError| SigningError::Untrusted {
            what: what.into(),
            reason: e.to_string(),
        };
        let root: Root = client
            .verified_root(trusted)?
            .parse("root")
            .map_err(|e| untrusted("root", e))?;
        let top = client
            .verified_targets(trusted)?
            .map(|t| t.parse::<Targets>("targets"))
            .transpose()
            .map_err(|e| untrusted("targets", e))?;
        let delegation = wanted_delegation(&root, top.as_ref());
        Ok(Repository {
            client,
            top,
            delegation,
        })
    }

    /// The top-level targets.
    pub fn top(&self) -> Option<&Targets> {
        self.top.as_ref()
    }

    /// The current document of bin `role`, verified under the top-level targets'
    /// delegation; `None` when it does not exist.
    fn bin(&self, role: &str) -> Result<Option<Targets>, SigningError> {
        let Some(top) = &self.top else {
            return Ok(None);
        };
        let Some(envelope) = self.client.delegated_targets(role)? else {
            return Ok(None);
        };
        let untrusted = |reason: String| SigningError::Untrusted {
            what: role.into(),
            reason,
        };
        let verifier = top
            .delegations
            .as_ref()
            .and_then(|d| d.verifier(role))
            .ok_or_else(|| untrusted("not delegated".into()))?;
        envelope
            .verify::<Targets>(&verifier, "targets")
            .map(Some)
            .map_err(|e| untrusted(e.to_string()))
    }

    /// The current document of the bin that holds `path` (see [`Repository::bin`]).
    pub fn bin_of(&self, path: &str) -> Result<Option<Targets>, SigningError> {
        match self.top.as_ref().and_then(|t| bins::bin_for(t, path)) {
            Some(role) => self.bin(&role),
            None => Ok(None),
        }
    }

    /// Every bin that exists, verified.
    fn all_bins(&self) -> Result<Vec<(String, Targets)>, SigningError> {
        let Some(succinct) = self
            .top
            .as_ref()
            .and_then(|t| t.delegations.as_ref()?.succinct_roles.clone())
        else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for n in 0..(1u32 << succinct.bit_length.min(bins::MAX_BIT_LENGTH)) {
            let role = succinct.role_name(n);
            if let Some(bin) = self.bin(&role)? {
                out.push((role, bin));
            }
        }
        Ok(out)
    }

    /// After a key rotation, every other bin re-signed into `upload`.
    fn complete(
        &self,
        mut upload: TargetsUpload,
        keys: &[&SigningKey],
        now: i64,
    ) -> Result<TargetsUpload, SigningError> {
        let next = upload
            .targets
            .as_ref()
            .map(|t| t.parse::<Targets>("targets"))
            .transpose()
            .map_err(|e| SigningError::Untrusted {
                what: "targets".into(),
                reason: e.to_string(),
            })?;
        if rekeys(self.top.as_ref(), next.as_ref()) {
            rekey(&mut upload, self.all_bins()?, keys, now);
        }
        Ok(upload)
    }

    /// Adds `manifest`: the signed upload ([`add`]); `newest` is the newest version of the
    /// model the registry holds.
    pub fn add(
        &self,
        manifest: &Manifest,
        newest: Option<u64>,
        keys: &[&SigningKey],
        now: i64,
    ) -> Result<TargetsUpload, SigningError> {
        let bin = self.bin_of(&manifest.target_path())?;
        let upload = add(
            self.top.as_ref(),
            bin,
            newest,
            manifest,
            &self.delegation,
            keys,
            now,
        )?;
        self.complete(upload, keys, now)
    }

    /// Re-signs the top-level targets (delegating to the root's current targets keys) and
    /// every bin, each one version up with a fresh expiry: yearly, before they expire, and
    /// after a rotation of the targets keys (a publish does it then too).
    pub fn resign(&self, keys: &[&SigningKey], now: i64) -> Result<TargetsUpload, SigningError> {
        let mut top = self.top.clone().ok_or(SigningError::Empty)?;
        top.delegations = Some(self.delegation.clone());
        top.version += 1;
        top.expires = format_expiry(now + SIGNED_LIFETIME_SECS);
        let mut upload = TargetsUpload {
            targets: Some(Signed::sign(&top, keys)),
            delegated: Default::default(),
        };
        rekey(&mut upload, self.all_bins()?, keys, now);
        Ok(upload)
    }

    /// Removes `path`: the signed upload ([`remove`]).
    pub fn remove(
        &self,
        path: &str,
        keys: &[&SigningKey],
        now: i64,
    ) -> Result<TargetsUpload, SigningError> {
        let top = self
            .top
            .as_ref()
            .ok_or_else(|| SigningError::Absent { path: path.into() })?;
        let upload = remove(top, self.bin_of(path)?, path, &self.delegation, keys, now)?;
        self.complete(upload, keys, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelcast_proto::verify::fixture::manifest;

    const NOW: i64 = 1_800_000_000;

    fn delegation(key: &SigningKey) -> Delegations {
        bins::delegation(
            [(key.public().key_id(), key.public())].into(),
            1,
            bins::DEFAULT_BIT_LENGTH,
        )
    }

    #[test]
    fn the_first_publish_delegates_to_bins_and_later_ones_sign_one_bin() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let keys = [&key];
        let d = delegation(&key);
        let m1 = manifest("m", 1, b"one", 2);
        let first = add(None, None, None, &m1, &d, &keys, NOW).unwrap();
        let top: Targets = first.targets.as_ref().unwrap().parse("targets").unwrap();
        assert!(top.targets.is_empty());
        assert_eq!(top.version, 1);
        let (role, bin) = first.delegated.iter().next().unwrap();
        assert_eq!(bins::bin_for(&top, &m1.target_path()).as_ref(), Some(role));
        let bin: Targets = bin.parse("targets").unwrap();

        // The next version: only its bin, the top-level targets stay.
        let m2 = manifest("m", 2, b"two", 2);
        let same_bin = bins::bin_for(&top, &m2.target_path()).as_ref() == Some(role);
        let current = same_bin.then(|| bin.clone());
        let next = add(Some(&top), current, Some(1), &m2, &d, &keys, NOW + 10).unwrap();
        assert!(next.targets.is_none());
        assert_eq!(next.delegated.len(), 1);

        // Taken and older versions are refused; a top-level targets near expiry is re-signed.
        assert!(matches!(
            add(Some(&top), Some(bin.clone()), Some(1), &m1, &d, &keys, NOW),
            Err(SigningError::Present { .. })
        ));
        assert!(matches!(
            add(Some(&top), None, Some(2), &m2, &d, &keys, NOW),
            Err(SigningError::NotNewer { newest: 2, .. })
        ));
        let late = add(
            Some(&top),
            None,
            Some(1),
            &m2,
            &d,
            &keys,
            NOW + SIGNED_LIFETIME_SECS - 100,
        )
        .unwrap();
        assert_eq!(
            late.targets
                .unwrap()
                .parse::<Targets>("targets")
                .unwrap()
                .version,
            2
        );

        // Removal takes the target out of its bin, with a new version.
        let gone = remove(&top, Some(bin), &m1.target_path(), &d, &keys, NOW).unwrap();
        let emptied: Targets = gone.delegated[role].parse("targets").unwrap();
        assert!(emptied.targets.is_empty());
        assert_eq!(emptied.version, 2);
        assert!(matches!(
            remove(&top, None, &m1.target_path(), &d, &keys, NOW),
            Err(SigningError::Absent { .. })
        ));
    }

    #[test]
    fn a_repository_made_before_bins_keeps_its_targets_and_gains_the_delegation() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let old = manifest("m", 1, b"one", 2);
        let mut top = Targets::new(4, &format_expiry(NOW + SIGNED_LIFETIME_SECS));
        top.targets.insert(old.target_path(), old.to_target());
        let d = delegation(&key);
        let up = add(
            Some(&top),
            None,
            Some(1),
            &manifest("m", 2, b"two", 2),
            &d,
            &[&key],
            NOW,
        )
        .unwrap();
        let next: Targets = up.targets.unwrap().parse("targets").unwrap();
        assert_eq!(next.version, 5);
        assert!(next.targets.contains_key(&old.target_path()));
        assert!(next.delegations.is_some());
        // The old version leaves from the top-level targets.
        let gone = remove(&next, None, &old.target_path(), &d, &[&key], NOW).unwrap();
        let after: Targets = gone.targets.unwrap().parse("targets").unwrap();
        assert!(after.targets.is_empty());
        assert_eq!(after.version, 6);
    }

    #[test]
    fn new_targets_keys_re_delegate_the_bins_and_re_sign_every_one() {
        let (old, new) = (
            SigningKey::from_bytes(&[7; 32]),
            SigningKey::from_bytes(&[8; 32]),
        );
        let m1 = manifest("m", 1, b"one", 2);
        let first = add(None, None, None, &m1, &delegation(&old), &[&old], NOW).unwrap();
        let top: Targets = first.targets.unwrap().parse("targets").unwrap();
        let (role, bin) = first.delegated.into_iter().next().unwrap();
        let bin: Targets = bin.parse("targets").unwrap();
        let m2 = manifest("m", 2, b"two", 2);
        let mut up = add(
            Some(&top),
            None,
            Some(1),
            &m2,
            &delegation(&new),
            &[&new],
            NOW,
        )
        .unwrap();
        let next: Targets = up.targets.as_ref().unwrap().parse("targets").unwrap();
        assert!(rekeys(Some(&top), Some(&next)));
        assert!(!rekeys(Some(&next), Some(&next)));
        rekey(&mut up, vec![(role.clone(), bin)], &[&new], NOW);
        // Both bins now verify under the new delegation only.
        let verifier = next.delegations.as_ref().unwrap().verifier(&role).unwrap();
        up.delegated[&role]
            .verify::<Targets>(&verifier, "targets")
            .unwrap();
        let stale = top.delegations.as_ref().unwrap().verifier(&role).unwrap();
        assert!(up.delegated[&role]
            .verify::<Targets>(&stale, "targets")
            .is_err());
    }
}
