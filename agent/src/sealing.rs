//! The device's sealing key, for confidential models ([`modelcast_proto::seal`]): an X25519
//! key pair made on the device at its first start. The private half stays in
//! [`FILE`] in the state directory (mode 0600) and never leaves the device; the public half
//! goes in every state report, and servers seal each encrypted version's content key to it.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use modelcast_proto::seal::OpeningKey;

/// The key's file in the state directory: the private key's 32 bytes, hex.
pub const FILE: &str = "sealing.key";

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

/// The device's key: read from `state_dir`, or made there (0600) on the first start.
pub fn load_or_create(state_dir: &Path) -> Result<OpeningKey, SealingKeyError> {
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
        let made = load_or_create(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join(FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = load_or_create(dir.path()).unwrap();
        assert_eq!(made.sealing_key(), again.sealing_key());
        std::fs::write(dir.path().join(FILE), "not a key").unwrap();
        assert!(matches!(
            load_or_create(dir.path()),
            Err(SealingKeyError::Damaged { .. })
        ));
    }
}
