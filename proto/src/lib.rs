//! The wire contract of modelcast, shared by the fleet server, the agent and the operators' CLI.
//!
//! Pure: no async, no sockets, no files, no clock. Time is always an argument.
//!
//! - [`keys`]: ed25519 keys in TUF's key format, key ids, signing.
//! - [`metadata`]: TUF 1.0 documents (`root`, `targets`, `snapshot`, `timestamp`) in signed
//!   envelopes with OLPC canonical-JSON signatures.
//! - [`bins`]: the repository's layout: every target in one of the hash bins the top-level
//!   targets delegate to, so that publishing and a device's download stay small.
//! - [`manifest`]: the modelcast part of a TUF target: chunk digests, tensors, golden vectors.
//! - [`layout`]: how an artifact is cut into chunks (tensor-aligned segments, chunk digests).
//! - [`trusted`]: the TUF client core (spec §5): the trusted metadata set, updated from bytes
//!   and the time, and the delegation search. Used by [`verify`] and by the agent's TUF
//!   conformance client.
//! - [`verify`]: the TUF client workflow (spec §5) plus the Uptane director check, producing a
//!   [`verify::VerifiedDesired`] that only the verifier can construct.
//! - [`desired`]: the per-device desired state message.
//! - [`engine`]: inference backends, what a device runs, which form of a model it receives.
//! - [`chunk`]: chunk request and chunk reply framing.
//! - [`enrol`]: enrolment by claim and certificate renewal (CSR in, certificate out).
//! - [`report`]: the device state report.
//! - [`topic`]: the only place MQTT topic strings are built and parsed.
//! - `tls` (feature `tls`): the transport profile, MQTT over TLS with client certificates.
//! - [`error`]: the errors of every decoder and check.
//!
//! Every decoder takes untrusted bytes and returns an error, never panics.

#![forbid(unsafe_code)]

pub mod bins;
pub mod chunk;
pub mod desired;
pub mod engine;
pub mod enrol;
pub mod error;
pub mod keys;
pub mod layout;
pub mod manifest;
pub mod metadata;
pub mod report;
pub mod seal;
pub mod telemetry;
#[cfg(feature = "tls")]
pub mod tls;
pub mod topic;
pub mod trusted;
pub mod verify;
pub mod window;

pub use error::{DecodeError, VerifyError};

/// The format version carried by every modelcast payload.
pub const FORMAT_VERSION: u32 = 1;

/// A broker address: `mqtt://host:port`, `mqtts://host:port` (MQTT over TLS) or `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Whether the connection is MQTT over TLS (`mqtts://`).
    pub tls: bool,
}

impl BrokerUrl {
    /// Parses a broker address (IPv6 hosts in brackets).
    pub fn parse(url: &str) -> Result<Self, DecodeError> {
        let invalid = |reason: &str| DecodeError::Invalid {
            what: "broker address",
            reason: format!("{url:?}: {reason}"),
        };
        let (rest, tls) = match url.split_once("://") {
            Some(("mqtt", rest)) => (rest, false),
            Some(("mqtts", rest)) => (rest, true),
            Some((scheme, _)) => {
                return Err(invalid(&format!("scheme {scheme:?} is not mqtt or mqtts")))
            }
            None => (url, false),
        };
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| invalid("needs host:port"))?;
        let port = port
            .trim_end_matches('/')
            .parse()
            .map_err(|_| invalid("bad port"))?;
        let host = host.trim_matches(['[', ']']);
        if host.is_empty() {
            return Err(invalid("empty host"));
        }
        Ok(BrokerUrl {
            host: host.to_string(),
            port,
            tls,
        })
    }
}

/// Hex-encoded SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[cfg(test)]
mod broker_url_tests {
    use super::*;

    #[test]
    fn parses_schemes() {
        let b = BrokerUrl::parse("mqtts://fleet.example:8883").unwrap();
        assert_eq!(
            (b.host.as_str(), b.port, b.tls),
            ("fleet.example", 8883, true)
        );
        let b = BrokerUrl::parse("mqtt://[::1]:1883/").unwrap();
        assert_eq!((b.host.as_str(), b.port, b.tls), ("::1", 1883, false));
        assert!(!BrokerUrl::parse("127.0.0.1:1883").unwrap().tls);
        assert!(BrokerUrl::parse("ws://h:1").is_err());
        assert!(BrokerUrl::parse("mqtts://:8883").is_err());
        assert!(BrokerUrl::parse("mqtts://h").is_err());
    }
}
