//! Key files: generating the operators' offline keys, the server's online key and the signed
//! `root.json` that ties them together.
//!
//! Layout of a key directory made by `modelcast keygen`:
//! - `root.key`, `targets.key`: the operators' offline keys (never copied to the server);
//!   with several keys per role, `root-1.key` … `root-N.key` and `targets-1.key` …, of which
//!   a threshold must sign (each may live with a different operator);
//! - `server.key`: the server's online key (snapshot, timestamp, director);
//! - `root.json`: TUF root, signed by `root.key` (provisioned on every device);
//! - `director.pub`: the director public key, hex (pinned in every agent's config).

use std::path::{Path, PathBuf};

use modelcast_proto::keys::{PublicKey, SigningKey};
use modelcast_proto::metadata::{format_expiry, Root, Signature, Signed};
use rand_core::{OsRng, RngCore};
use thiserror::Error;

/// A key file problem.
#[derive(Debug, Error)]
pub enum KeyError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The content is not a key.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Root metadata made by keygen is valid for five years.
pub const ROOT_LIFETIME_SECS: i64 = 5 * 365 * 24 * 3600;

fn write(path: &Path, text: &str, secret: bool) -> Result<(), KeyError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |source| KeyError::Io {
        path: path.into(),
        source,
    };
    let mode = if secret { 0o600 } else { 0o644 };
    // Created with its final mode: a secret is never readable by others, not even briefly.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    if secret {
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io)?;
    }
    file.write_all(text.as_bytes()).map_err(io)
}

/// Reads a signing key file (64 hex characters).
pub fn read_key(path: &Path) -> Result<SigningKey, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
        path: path.into(),
        source,
    })?;
    SigningKey::from_hex(&text).map_err(|e| KeyError::Invalid {
        path: path.into(),
        reason: e.to_string(),
    })
}

/// The escrow key's file beside the server's keys: an X25519 private key (64 hex
/// characters), which publishers seal each encrypted version's content key to.
pub const ESCROW_FILE: &str = "escrow.key";

/// The server's escrow key (confidential models, [`modelcast_proto::seal`]): read from
/// `dir`, or made there (0600) on first use.
pub fn escrow_key(dir: &Path) -> Result<modelcast_proto::seal::OpeningKey, KeyError> {
    let path = dir.join(ESCROW_FILE);
    let invalid = |reason: String| KeyError::Invalid {
        path: path.clone(),
        reason,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let bytes = hex::decode(text.trim()).map_err(|e| invalid(e.to_string()))?;
            modelcast_proto::seal::OpeningKey::from_bytes(&bytes)
                .map_err(|e| invalid(e.to_string()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let (key, _) = modelcast_proto::seal::OpeningKey::generate();
            write(&path, &hex::encode(key.to_bytes()), true)?;
            Ok(key)
        }
        Err(source) => Err(KeyError::Io { path, source }),
    }
}

/// Reads a signed root document.
pub fn read_root(path: &Path) -> Result<Signed, KeyError> {
    let bytes = std::fs::read(path).map_err(|source| KeyError::Io {
        path: path.into(),
        source,
    })?;
    Signed::from_slice(&bytes).map_err(|e| KeyError::Invalid {
        path: path.into(),
        reason: e.to_string(),
    })
}

fn fresh_key() -> SigningKey {
    let mut secret = [0u8; 32];
    OsRng.fill_bytes(&mut secret);
    SigningKey::from_bytes(&secret)
}

/// How many offline keys each role gets and how many of them must sign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeygenOptions {
    /// Root keys.
    pub root_keys: usize,
    /// Root signatures required.
    pub root_threshold: u32,
    /// Targets (publishing) keys.
    pub targets_keys: usize,
    /// Targets signatures required.
    pub targets_threshold: u32,
}

impl Default for KeygenOptions {
    fn default() -> Self {
        KeygenOptions {
            root_keys: 1,
            root_threshold: 1,
            targets_keys: 1,
            targets_threshold: 1,
        }
    }
}

/// The file name of key `i` (from 1) of `count` keys of `role`.
pub fn key_file(role: &str, i: usize, count: usize) -> String {
    if count == 1 {
        format!("{role}.key")
    } else {
        format!("{role}-{i}.key")
    }
}

/// Every key of `role` in `dir` (`<role>.key` and `<role>-N.key`), by file name.
pub fn read_role_keys(dir: &Path, role: &str) -> Result<Vec<SigningKey>, KeyError> {
    let io = |source| KeyError::Io {
        path: dir.into(),
        source,
    };
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| {
            n == &format!("{role}.key")
                || n.strip_prefix(&format!("{role}-"))
                    .and_then(|r| r.strip_suffix(".key"))
                    .is_some_and(|i| i.parse::<u32>().is_ok())
        })
        .collect();
    names.sort();
    names.iter().map(|n| read_key(&dir.join(n))).collect()
}

/// Reads a public key: a key file's public half, or a hex ed25519 public key.
pub fn read_public(path: &Path) -> Result<PublicKey, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
        path: path.into(),
        source,
    })?;
    let text = text.trim();
    if let Ok(key) = SigningKey::from_hex(text) {
        return Ok(key.public());
    }
    PublicKey::from_hex(text).map_err(|e| KeyError::Invalid {
        path: path.into(),
        reason: e.to_string(),
    })
}

/// Adds `key`'s signature to an envelope (replacing an older one by the same key): how each
/// holder of a threshold key signs in turn.
pub fn add_signature(envelope: &mut Signed, key: &SigningKey) -> Result<(), KeyError> {
    let bytes =
        modelcast_proto::keys::canonical_json(&envelope.signed).map_err(|e| KeyError::Invalid {
            path: PathBuf::from("<document>"),
            reason: e.to_string(),
        })?;
    let keyid = key.public().key_id();
    envelope.signatures.retain(|s| s.keyid != keyid);
    envelope.signatures.push(Signature {
        keyid,
        sig: key.sign_hex(&bytes),
    });
    Ok(())
}

/// A change of keys or thresholds for the next root.
#[derive(Debug, Clone, Default)]
pub struct RootChange {
    /// Keys to add: role and key.
    pub add: Vec<(String, PublicKey)>,
    /// Keys to revoke: role and key id (or a unique key id prefix).
    pub revoke: Vec<(String, String)>,
    /// New thresholds per role.
    pub thresholds: Vec<(String, u32)>,
    /// New expiry (Unix seconds); otherwise the current one, or now + the root lifetime if
    /// that is sooner than a year away.
    pub expires: Option<i64>,
}

/// The next root after `current` with `change` applied, unsigned (sign it with
/// [`add_signature`] by a threshold of the old and of the new root keys).
pub fn next_root(current: &Signed, change: &RootChange, now: i64) -> Result<Signed, KeyError> {
    let invalid = |reason: String| KeyError::Invalid {
        path: PathBuf::from("root"),
        reason,
    };
    let mut doc: Root = current.parse("root").map_err(|e| invalid(e.to_string()))?;
    doc.version += 1;
    for (role, key) in &change.add {
        let id = key.key_id();
        doc.keys.insert(id.clone(), key.clone());
        let spec = doc
            .roles
            .get_mut(role)
            .ok_or_else(|| invalid(format!("no role {role}")))?;
        if !spec.keyids.contains(&id) {
            spec.keyids.push(id);
        }
    }
    for (role, prefix) in &change.revoke {
        let spec = doc
            .roles
            .get_mut(role)
            .ok_or_else(|| invalid(format!("no role {role}")))?;
        let matching: Vec<String> = spec
            .keyids
            .iter()
            .filter(|id| id.starts_with(prefix.as_str()))
            .cloned()
            .collect();
        let [id] = matching.as_slice() else {
            return Err(invalid(format!(
                "{prefix:?} names {} keys of {role}",
                matching.len()
            )));
        };
        spec.keyids.retain(|k| k != id);
    }
    for (role, threshold) in &change.thresholds {
        doc.roles
            .get_mut(role)
            .ok_or_else(|| invalid(format!("no role {role}")))?
            .threshold = *threshold;
    }
    // Drop keys no role uses any more.
    let used: std::collections::BTreeSet<String> =
        doc.roles.values().flat_map(|r| r.keyids.clone()).collect();
    doc.keys.retain(|id, _| used.contains(id));
    for (role, spec) in &doc.roles {
        if spec.threshold == 0 || spec.keyids.len() < spec.threshold as usize {
            return Err(invalid(format!(
                "{role} would have {} keys for threshold {}",
                spec.keyids.len(),
                spec.threshold
            )));
        }
    }
    let year = 365 * 24 * 3600;
    doc.expires = match change.expires {
        Some(t) => format_expiry(t),
        None => match modelcast_proto::metadata::parse_expiry(&doc.expires) {
            Ok(t) if t > now + year => doc.expires.clone(),
            _ => format_expiry(now + ROOT_LIFETIME_SECS),
        },
    };
    Ok(Signed::sign(&doc, &[]))
}

/// Generates every key and a signed root into `dir`. Returns the director public key (hex).
/// Refuses to overwrite existing keys.
pub fn keygen(dir: &Path, now: i64) -> Result<String, KeyError> {
    keygen_with(dir, now, &KeygenOptions::default())
}

/// [`keygen`] with several root and targets keys and thresholds.
pub fn keygen_with(dir: &Path, now: i64, opts: &KeygenOptions) -> Result<String, KeyError> {
    if opts.root_keys == 0
        || opts.targets_keys == 0
        || !(1..=opts.root_keys as u32).contains(&opts.root_threshold)
        || !(1..=opts.targets_keys as u32).contains(&opts.targets_threshold)
    {
        return Err(KeyError::Invalid {
            path: dir.into(),
            reason: "thresholds must be between 1 and the number of keys".into(),
        });
    }
    std::fs::create_dir_all(dir).map_err(|source| KeyError::Io {
        path: dir.into(),
        source,
    })?;
    if dir.join("root.json").exists() {
        return Err(KeyError::Invalid {
            path: dir.join("root.json"),
            reason: "keys already exist here; refusing to overwrite".into(),
        });
    }
    let roots: Vec<SigningKey> = (0..opts.root_keys).map(|_| fresh_key()).collect();
    let targets: Vec<SigningKey> = (0..opts.targets_keys).map(|_| fresh_key()).collect();
    let server = fresh_key();
    let mut doc = Root::new(
        1,
        &format_expiry(now + ROOT_LIFETIME_SECS),
        &roots[0].public(),
        &targets[0].public(),
        &server.public(),
        &server.public(),
    );
    for (role, keys, threshold) in [
        ("root", &roots, opts.root_threshold),
        ("targets", &targets, opts.targets_threshold),
    ] {
        let spec = doc.roles.get_mut(role).expect("Root::new lists every role");
        for k in &keys[1..] {
            doc.keys.insert(k.public().key_id(), k.public());
            spec.keyids.push(k.public().key_id());
        }
        spec.threshold = threshold;
    }
    let signers: Vec<&SigningKey> = roots.iter().collect();
    let signed = Signed::sign(&doc, &signers);
    for (role, keys) in [("root", &roots), ("targets", &targets)] {
        for (i, k) in keys.iter().enumerate() {
            write(
                &dir.join(key_file(role, i + 1, keys.len())),
                &k.to_hex(),
                true,
            )?;
        }
    }
    write(&dir.join("server.key"), &server.to_hex(), true)?;
    let root_json = serde_json::to_string_pretty(&signed).expect("json");
    write(&dir.join("root.json"), &root_json, false)?;
    let director = server.public().keyval.public;
    write(&dir.join("director.pub"), &director, false)?;
    Ok(director)
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelcast_proto::verify::TrustState;

    #[test]
    fn keygen_writes_a_consistent_set() {
        let dir = tempfile::tempdir().unwrap();
        let director = keygen(dir.path(), 1_700_000_000).unwrap();
        let root = read_root(&dir.path().join("root.json")).unwrap();
        TrustState::from_root(root).unwrap();
        let server = read_key(&dir.path().join("server.key")).unwrap();
        assert_eq!(server.public().keyval.public, director);
        assert!(keygen(dir.path(), 0).is_err());
    }

    #[test]
    fn thresholds_and_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let opts = KeygenOptions {
            root_keys: 3,
            root_threshold: 2,
            targets_keys: 2,
            targets_threshold: 2,
        };
        keygen_with(dir.path(), 1_700_000_000, &opts).unwrap();
        let root = read_root(&dir.path().join("root.json")).unwrap();
        TrustState::from_root(root.clone()).unwrap();
        let roots = read_role_keys(dir.path(), "root").unwrap();
        let targets = read_role_keys(dir.path(), "targets").unwrap();
        assert_eq!((roots.len(), targets.len()), (3, 2));
        // Rotate: revoke targets key 1, add a new one, threshold 2 kept.
        let new_key = fresh_key();
        let change = RootChange {
            add: vec![("targets".into(), new_key.public())],
            revoke: vec![("targets".into(), targets[0].public().key_id())],
            ..Default::default()
        };
        let mut next = next_root(&root, &change, 1_700_000_000).unwrap();
        add_signature(&mut next, &roots[0]).unwrap();
        // One of three root keys is below the threshold of two.
        assert!(modelcast_proto::verify::update_root(&root, std::slice::from_ref(&next)).is_err());
        add_signature(&mut next, &roots[2]).unwrap();
        add_signature(&mut next, &roots[2]).unwrap(); // The same key twice counts once.
        assert_eq!(next.signatures.len(), 2);
        let rotated =
            modelcast_proto::verify::update_root(&root, std::slice::from_ref(&next)).unwrap();
        let doc: Root = rotated.parse("root").unwrap();
        assert_eq!(doc.version, 2);
        let ids = &doc.roles["targets"].keyids;
        assert!(!ids.contains(&targets[0].public().key_id()));
        assert!(ids.contains(&new_key.public().key_id()));
        // A threshold above the key count is refused.
        let too_high = RootChange {
            thresholds: vec![("targets".into(), 3)],
            ..Default::default()
        };
        assert!(next_root(&rotated, &too_high, 0).is_err());
    }
}
