//! Key files: generating the operators' offline keys, the server's online key and the signed
//! `root.json` that ties them together.
//!
//! Layout of a key directory made by `modelcast keygen`:
//! - `root.key`, `targets.key`: the operators' offline keys (never copied to the server);
//! - `server.key`: the server's online key (snapshot, timestamp, director);
//! - `root.json`: TUF root, signed by `root.key` (provisioned on every device);
//! - `director.pub`: the director public key, hex (pinned in every agent's config).

use std::path::{Path, PathBuf};

use modelcast_proto::keys::SigningKey;
use modelcast_proto::metadata::{format_expiry, Root, Signed};
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
    let io = |source| KeyError::Io {
        path: path.into(),
        source,
    };
    std::fs::write(path, text).map_err(io)?;
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    Ok(())
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

/// Generates every key and a signed root into `dir`. Returns the director public key (hex).
/// Refuses to overwrite existing keys.
pub fn keygen(dir: &Path, now: i64) -> Result<String, KeyError> {
    std::fs::create_dir_all(dir).map_err(|source| KeyError::Io {
        path: dir.into(),
        source,
    })?;
    let root_path = dir.join("root.key");
    if root_path.exists() {
        return Err(KeyError::Invalid {
            path: root_path,
            reason: "keys already exist here; refusing to overwrite".into(),
        });
    }
    let (root, targets, server) = (fresh_key(), fresh_key(), fresh_key());
    let doc = Root::new(
        1,
        &format_expiry(now + ROOT_LIFETIME_SECS),
        &root.public(),
        &targets.public(),
        &server.public(),
        &server.public(),
    );
    let signed = Signed::sign(&doc, &[&root]);
    write(&root_path, &root.to_hex(), true)?;
    write(&dir.join("targets.key"), &targets.to_hex(), true)?;
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
}
