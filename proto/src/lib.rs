//! The wire contract of modelcast, shared by the fleet server, the agent and the operators' CLI.
//!
//! Pure: no async, no sockets, no files, no clock. Time is always an argument.
//!
//! - [`keys`]: ed25519 keys in TUF's key format, key ids, signing.
//! - [`metadata`]: TUF 1.0 documents (`root`, `targets`, `snapshot`, `timestamp`) in signed
//!   envelopes with OLPC canonical-JSON signatures.
//! - [`manifest`]: the modelcast part of a TUF target: chunk digests, tensors, golden vectors.
//! - [`verify`]: the TUF client workflow (spec §5) plus the Uptane director check, producing a
//!   [`verify::VerifiedDesired`] that only the verifier can construct.
//! - [`desired`]: the per-device desired state message.
//! - [`chunk`]: chunk request and chunk reply framing.
//! - [`report`]: the device state report.
//! - [`topic`]: the only place MQTT topic strings are built and parsed.
//! - [`error`]: the errors of every decoder and check.
//!
//! Every decoder takes untrusted bytes and returns an error, never panics.

pub mod chunk;
pub mod desired;
pub mod error;
pub mod keys;
pub mod manifest;
pub mod metadata;
pub mod report;
pub mod topic;
pub mod verify;

pub use error::{DecodeError, VerifyError};

/// The format version carried by every modelcast payload.
pub const FORMAT_VERSION: u32 = 1;

/// Splits a broker address, `mqtt://host:port` or `host:port` (IPv6 hosts in brackets).
pub fn parse_broker_url(url: &str) -> Result<(String, u16), DecodeError> {
    let invalid = |reason: &str| DecodeError::Invalid {
        what: "broker address",
        reason: format!("{url:?}: {reason}"),
    };
    let rest = url.strip_prefix("mqtt://").unwrap_or(url);
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| invalid("needs host:port"))?;
    let port = port
        .trim_end_matches('/')
        .parse()
        .map_err(|_| invalid("bad port"))?;
    Ok((host.trim_matches(['[', ']']).to_string(), port))
}

/// Hex-encoded SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}
