//! The device's sealing key, for confidential models ([`modelcast_proto::seal`]): a key pair
//! made on the device at its first start, whose private half never leaves it. The public half
//! goes in every state report, and servers seal each encrypted version's content key to it.
//!
//! - By default an X25519 key in [`FILE`] in the state directory (mode 0600).
//! - With `[enrol.pkcs11]` (unless `sealing_in_token = false`), a P-256 key pair made in the
//!   token (`sealing_label`), which computes the ECDH of each key wrap itself
//!   ([`crate::identity::pkcs11`]). Tokens do ECDH on P-256, not X25519; the wrap is HPKE
//!   with DHKEM(P-256) instead.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use modelcast_proto::seal::{ContentKey, KeyWrap, OpeningKey, SealError, SealingKey};

/// The key's file in the state directory: the private key's 32 bytes, hex.
pub const FILE: &str = "sealing.key";

/// Where the device's sealing key is.
pub enum DeviceSealingKey {
    /// In [`FILE`].
    File(OpeningKey),
    /// In a PKCS#11 token.
    #[cfg(feature = "pkcs11")]
    Token {
        /// The key pair (derive).
        key: std::sync::Arc<crate::identity::pkcs11::TokenKey>,
        /// Its public half.
        public: SealingKey,
    },
}

impl std::fmt::Debug for DeviceSealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSealingKey::File(_) => f.write_str("DeviceSealingKey::File(..)"),
            #[cfg(feature = "pkcs11")]
            DeviceSealingKey::Token { public, .. } => {
                write!(f, "DeviceSealingKey::Token({})", public.to_hex())
            }
        }
    }
}

impl DeviceSealingKey {
    /// The public half, which servers seal content keys to.
    pub fn public(&self) -> SealingKey {
        match self {
            DeviceSealingKey::File(key) => key.sealing_key(),
            #[cfg(feature = "pkcs11")]
            DeviceSealingKey::Token { public, .. } => public.clone(),
        }
    }

    /// Opens `wrap`, made for device `holder` and artifact `artifact` (hex SHA-256).
    pub fn open(
        &self,
        wrap: &KeyWrap,
        holder: &str,
        artifact: &str,
    ) -> Result<ContentKey, SealError> {
        match self {
            DeviceSealingKey::File(key) => key.open(wrap, holder, artifact),
            #[cfg(feature = "pkcs11")]
            DeviceSealingKey::Token { key, public } => {
                modelcast_proto::seal::open_p256_with(public, wrap, holder, artifact, |peer| {
                    key.ecdh(peer)
                })
            }
        }
    }
}

/// Why the sealing key could not be read or made.
#[derive(Debug, thiserror::Error)]
pub enum SealingKeyError {
    /// Reading or writing the file failed.
    #[error("sealing key {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The token failed, or is not built in.
    #[error("sealing key in the token: {0}")]
    Token(String),
    /// The file does not hold a key (it is kept, not replaced: encrypted models stored here
    /// open only with the key it held).
    #[error("sealing key {path} is damaged: {reason}")]
    Damaged {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// The device's key: in the token of `token` if there is one (found by its label, or made
/// there on the first start); otherwise read from `state_dir`, or made there (0600).
pub fn load_or_create(
    state_dir: &Path,
    token: Option<&crate::config::Pkcs11Config>,
) -> Result<DeviceSealingKey, SealingKeyError> {
    match token {
        #[cfg(feature = "pkcs11")]
        Some(cfg) => {
            use crate::identity::pkcs11::{TokenKey, Usage};
            let failed = |e: &dyn std::fmt::Display| SealingKeyError::Token(e.to_string());
            let key =
                TokenKey::open(cfg, &cfg.sealing_label, Usage::Derive).map_err(|e| failed(&e))?;
            let public = SealingKey::p256(key.point()).map_err(|e| failed(&e))?;
            // Once at start, with its own point: a token that cannot do ECDH or will not hand
            // back the secret is found now, not at the first encrypted version.
            key.ecdh(key.point()).map_err(|e| {
                failed(&format!(
                    "{e} (set `sealing_in_token = false` in [enrol.pkcs11] to keep the sealing key in a file)"
                ))
            })?;
            Ok(DeviceSealingKey::Token { key, public })
        }
        #[cfg(not(feature = "pkcs11"))]
        Some(_) => Err(SealingKeyError::Token(
            "this agent is built without the pkcs11 feature".into(),
        )),
        None => key_file(state_dir).map(DeviceSealingKey::File),
    }
}

/// The key of [`FILE`] in `state_dir`, made there on the first start.
fn key_file(state_dir: &Path) -> Result<OpeningKey, SealingKeyError> {
    let path = state_dir.join(FILE);
    let io = |source| SealingKeyError::Io {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let damaged = |reason: String| SealingKeyError::Damaged {
                path: path.display().to_string(),
                reason,
            };
            let bytes = hex::decode(text.trim()).map_err(|e| damaged(e.to_string()))?;
            OpeningKey::from_bytes(&bytes).map_err(|e| damaged(e.to_string()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let (key, _) = OpeningKey::generate();
            // Written whole under another name, then renamed: a crash leaves no half key.
            let tmp = state_dir.join(format!("{FILE}.tmp"));
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io)?;
            file.write_all(hex::encode(key.to_bytes()).as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_key_is_made_once_private_to_the_agent_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let made = load_or_create(dir.path(), None).unwrap();
        let mode = std::fs::metadata(dir.path().join(FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = load_or_create(dir.path(), None).unwrap();
        assert_eq!(made.public(), again.public());
        std::fs::write(dir.path().join(FILE), "not a key").unwrap();
        assert!(matches!(
            load_or_create(dir.path(), None),
            Err(SealingKeyError::Damaged { .. })
        ));
    }
}
