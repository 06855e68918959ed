//! Enrolment and certificate renewal: what a device asks for and what the server answers.
//!
//! A device that has no certificate of its own connects with its batch's *claim* credential (a
//! client certificate from the claim CA, which brokers admit to the enrolment topics only),
//! as client id `enrol.<device id>` ([`claim_client_id`]), and asks on
//! `<p>/claim/<claim>/<client id>/request` ([`crate::topic::Topics::claim_request`]) with an
//! [`EnrolRequest`]: a PKCS#10 certificate signing request for a key it made itself (common
//! name = its id), its sealing key and its labels. The server answers on the `reply` topic
//! beside it with an [`EnrolReply`]: the certificate, or "held for an operator", or refused
//! with the reason. A device renews the same way over its own connection, on its `enrol` and
//! `certificate` topics ([`crate::topic::DeviceTopic::Enrol`]).
//!
//! Private keys never travel: a request carries only public keys, and the signature of the
//! CSR proves the sender holds the key it names.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Largest request or reply (a CSR is under 1 KiB, a certificate under 2 KiB; labels are
/// bounded by this).
pub const MAX_ENROL_BYTES: usize = 16 * 1024;

/// Client ids of claim connections start with this, then the device id: a claim connection
/// never takes a device's own session.
pub const CLAIM_CLIENT_PREFIX: &str = "enrol.";

/// The client id a device uses on its claim connection.
pub fn claim_client_id(device: &str) -> String {
    format!("{CLAIM_CLIENT_PREFIX}{device}")
}

/// The device a claim connection's client id names, if it is one.
pub fn device_of_claim_client(client_id: &str) -> Option<&str> {
    client_id
        .strip_prefix(CLAIM_CLIENT_PREFIX)
        .filter(|d| crate::manifest::valid_name(d))
}

/// Why enrolment bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EnrolError {
    /// Over [`MAX_ENROL_BYTES`].
    #[error("{0} bytes (at most {MAX_ENROL_BYTES})")]
    TooLarge(usize),
    /// Not the JSON expected.
    #[error("not an enrolment message: {0}")]
    Json(String),
    /// A device id that cannot be one.
    #[error("{0:?} is not a valid device id")]
    BadDevice(String),
    /// Over the bounds of its parts (labels).
    #[error("{0}")]
    Bounds(&'static str),
}

/// Most labels in a request, and the longest label key or value.
const MAX_LABELS: usize = 32;
const MAX_LABEL_BYTES: usize = 128;

/// A device asks for a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrolRequest {
    /// The device id it asks to be (the CSR's common name must be the same).
    pub device: String,
    /// The certificate signing request, PEM (PKCS#10), signed with the device's new key.
    pub csr: String,
    /// The device's X25519 sealing key, hex: content keys of encrypted models are wrapped
    /// to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealing_key: Option<String>,
    /// Its labels, what the server's acceptance rules match.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl EnrolRequest {
    /// Reads a request from untrusted bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, EnrolError> {
        if bytes.len() > MAX_ENROL_BYTES {
            return Err(EnrolError::TooLarge(bytes.len()));
        }
        let r: EnrolRequest =
            serde_json::from_slice(bytes).map_err(|e| EnrolError::Json(e.to_string()))?;
        if !crate::manifest::valid_name(&r.device) {
            return Err(EnrolError::BadDevice(r.device));
        }
        if r.labels.len() > MAX_LABELS
            || r.labels
                .iter()
                .any(|(k, v)| k.len() > MAX_LABEL_BYTES || v.len() > MAX_LABEL_BYTES)
        {
            return Err(EnrolError::Bounds("too many labels, or one too long"));
        }
        Ok(r)
    }

    /// The request's bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a request serializes")
    }
}

/// Why a request was refused, for the device to act on (the text is for people).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refused {
    /// An operator rejected this device.
    Rejected,
    /// The device's certificates were revoked.
    Revoked,
    /// The id is enrolled with another key.
    Taken,
    /// Its certificate ran out while it was offline and the server's policy keeps such
    /// devices out.
    Expired,
    /// The request itself is wrong (a CSR that does not parse, names another device, …).
    Invalid,
    /// The server cannot issue certificates (it holds no CA key).
    Unavailable,
}

/// The server's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case", deny_unknown_fields)]
pub enum EnrolReply {
    /// A certificate for the device's key.
    Issued {
        /// The device.
        device: String,
        /// Its certificate, PEM.
        certificate: String,
        /// Unix seconds it is valid from.
        not_before: i64,
        /// Unix seconds it is valid until.
        not_after: i64,
    },
    /// Held until an operator accepts or rejects the device; ask again later.
    Pending {
        /// The device.
        device: String,
    },
    /// Refused.
    Refused {
        /// The device.
        device: String,
        /// What kind of refusal.
        kind: Refused,
        /// Why, for people.
        reason: String,
    },
}

impl EnrolReply {
    /// Reads a reply from untrusted bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, EnrolError> {
        if bytes.len() > MAX_ENROL_BYTES {
            return Err(EnrolError::TooLarge(bytes.len()));
        }
        serde_json::from_slice(bytes).map_err(|e| EnrolError::Json(e.to_string()))
    }

    /// The reply's bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a reply serializes")
    }

    /// The device it answers.
    pub fn device(&self) -> &str {
        match self {
            EnrolReply::Issued { device, .. }
            | EnrolReply::Pending { device }
            | EnrolReply::Refused { device, .. } => device,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_and_replies_round_trip_and_bad_ones_are_refused() {
        let r = EnrolRequest {
            device: "edge-1".into(),
            csr: "-----BEGIN CERTIFICATE REQUEST-----".into(),
            sealing_key: Some("ab".repeat(32)),
            labels: BTreeMap::from([("site".into(), "lab".into())]),
        };
        assert_eq!(EnrolRequest::from_slice(&r.to_vec()), Ok(r.clone()));
        let bad = EnrolRequest {
            device: "a/b".into(),
            ..r.clone()
        };
        assert!(matches!(
            EnrolRequest::from_slice(&bad.to_vec()),
            Err(EnrolError::BadDevice(_))
        ));
        let many = EnrolRequest {
            labels: (0..40).map(|i| (i.to_string(), String::new())).collect(),
            ..r
        };
        assert!(matches!(
            EnrolRequest::from_slice(&many.to_vec()),
            Err(EnrolError::Bounds(_))
        ));
        assert!(matches!(
            EnrolRequest::from_slice(&vec![b' '; MAX_ENROL_BYTES + 1]),
            Err(EnrolError::TooLarge(_))
        ));
        let reply = EnrolReply::Refused {
            device: "edge-1".into(),
            kind: Refused::Taken,
            reason: "enrolled with another key".into(),
        };
        assert_eq!(EnrolReply::from_slice(&reply.to_vec()), Ok(reply));
        assert_eq!(
            device_of_claim_client(&claim_client_id("edge-1")),
            Some("edge-1")
        );
        assert_eq!(device_of_claim_client("edge-1"), None);
        assert_eq!(device_of_claim_client("enrol."), None);
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = EnrolRequest::from_slice(&bytes);
            let _ = EnrolReply::from_slice(&bytes);
        }
    }
}
