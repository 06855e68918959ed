//! Errors of decoding untrusted bytes and of verifying signed metadata.

use thiserror::Error;

/// Bytes that could not be decoded into a modelcast payload.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// Not valid JSON for the expected document.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// Which payload was being decoded.
        what: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// A payload of a format version this build does not speak.
    #[error("unsupported {what} format version {found} (expected {expected})")]
    Version {
        /// Which payload was being decoded.
        what: &'static str,
        /// The version in the payload.
        found: u32,
        /// The version this build speaks.
        expected: u32,
    },
    /// A binary frame shorter than its header says.
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        /// Which frame was being decoded.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// A value outside what the contract allows.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// Which field.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

impl DecodeError {
    pub(crate) fn json(what: &'static str, e: serde_json::Error) -> Self {
        DecodeError::Malformed {
            what,
            reason: e.to_string(),
        }
    }
}

/// Signed metadata that must not be trusted, with the reason.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum VerifyError {
    /// The document could not be decoded.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// Fewer valid signatures from the role's keys than its threshold.
    #[error("{role}: {valid} valid signature(s) of threshold {threshold}")]
    Threshold {
        /// The role whose signatures were checked.
        role: String,
        /// Valid signatures found from distinct authorised keys.
        valid: usize,
        /// The role's threshold.
        threshold: u32,
    },
    /// The document is of another role than expected.
    #[error("expected a {expected} document, got {found}")]
    WrongType {
        /// Expected `_type`.
        expected: &'static str,
        /// Found `_type`.
        found: String,
    },
    /// The document has expired (freeze attack or a stale server).
    #[error("{role} metadata expired at {expires}")]
    Expired {
        /// The role.
        role: String,
        /// Its expiry, as written in it.
        expires: String,
    },
    /// A version lower than one already trusted (rollback attack).
    #[error("{role} version {found} is older than trusted version {trusted}")]
    Rollback {
        /// The role or model.
        role: String,
        /// The version offered.
        found: u64,
        /// The version already trusted.
        trusted: u64,
    },
    /// A document does not match what the metadata that names it says.
    #[error("{role} does not match its reference: {reason}")]
    Mismatch {
        /// The role being checked.
        role: String,
        /// What differs.
        reason: String,
    },
    /// The desired state is addressed to another device.
    #[error("desired state for device {found:?} delivered to {expected:?}")]
    WrongDevice {
        /// This device.
        expected: String,
        /// The device named in the document.
        found: String,
    },
    /// The director names a target the operators' repository does not hold.
    #[error("target {path} is not in the repository's signed targets")]
    UnknownTarget {
        /// Target path.
        path: String,
    },
    /// A root rotation that is not a one-version step.
    #[error("root rotation to version {found} after {trusted} is not a single step")]
    RootChain {
        /// Trusted root version.
        trusted: u64,
        /// Offered version.
        found: u64,
    },
    /// Bytes that do not match the length or hashes their reference gives (or whose hash
    /// algorithm this build cannot compute).
    #[error("{what}: length or hash mismatch: {reason}")]
    Integrity {
        /// The file checked (a metadata file name or a target path).
        what: String,
        /// What differs.
        reason: String,
    },
    /// A call out of the TUF client workflow's order (e.g. snapshot before timestamp): a bug in
    /// the caller, reported instead of panicking.
    #[error("out of order: {0}")]
    Order(&'static str),
}
