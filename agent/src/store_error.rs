//! Why a store operation failed: the one error type of the store and the artifact files
//! ([`crate::store`], [`crate::artifacts`]), and what kind of error the fleet is told of.

use thiserror::Error;

/// A store failure.
#[derive(Debug, Error)]
pub enum StoreError {
    /// sled failed (I/O, disk full, corruption sled detected).
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    /// A record on disk does not decode.
    #[error("store record {key} is corrupt: {reason}")]
    Corrupt {
        /// Which record.
        key: String,
        /// Why.
        reason: String,
    },
    /// An artifact file could not be read or written (disk full, I/O error).
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The disk has no room for an artifact (checked when its download starts).
    #[error(
        "not enough disk space: the artifact needs {} MiB, {} MiB are free in {dir}",
        mib(*needed),
        mib(*available)
    )]
    NoSpace {
        /// Bytes the artifact needs.
        needed: u64,
        /// Bytes free for the agent.
        available: u64,
        /// The artifact directory.
        dir: String,
    },
    /// No file holds the artifact.
    #[error("artifact {artifact} is not stored")]
    MissingArtifact {
        /// Artifact digest.
        artifact: String,
    },
    /// Another agent (or this one, not yet let go) holds the database.
    #[error("store {path} is in use by another process")]
    Locked {
        /// The database directory.
        path: String,
    },
    /// Stored bytes do not match the manifest.
    #[error("artifact {artifact}: {reason}")]
    DigestMismatch {
        /// Artifact digest.
        artifact: String,
        /// What differs.
        reason: String,
    },
    /// An encrypted artifact cannot be opened here: no key wrap kept for it, no sealing key,
    /// a wrap that does not open, or a chunk that fails authentication.
    #[error("encrypted artifact {artifact}: {reason}")]
    Sealed {
        /// Artifact digest.
        artifact: String,
        /// Why.
        reason: String,
    },
    /// The device's sealing key could not open anything (its token failed): nothing is
    /// known against the artifact.
    #[error("encrypted artifact {artifact}: {reason}")]
    DeviceKey {
        /// Artifact digest.
        artifact: String,
        /// Why.
        reason: String,
    },
}

impl StoreError {
    /// What kind of error the fleet is told of: no room, a digest that does not verify, or a
    /// failure of the store itself.
    pub fn kind(&self) -> modelcast_proto::report::ErrorKind {
        use modelcast_proto::report::ErrorKind;
        match self {
            StoreError::NoSpace { .. } => ErrorKind::NoSpace,
            StoreError::DigestMismatch { .. } | StoreError::Sealed { .. } => {
                ErrorKind::Verification
            }
            StoreError::DeviceKey { .. } => ErrorKind::DeviceKey,
            _ => ErrorKind::Failed,
        }
    }
}

impl From<StoreError> for crate::update::Failure {
    fn from(e: StoreError) -> Self {
        crate::update::Failure::new(e.kind(), e)
    }
}

/// Bytes in MiB with one decimal, for messages.
fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}
