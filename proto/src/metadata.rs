//! TUF 1.0 metadata documents and their signed envelopes.
//!
//! A [`Signed`] keeps the `signed` part as the JSON value it arrived as, so signatures are
//! checked over exactly the bytes the signer canonicalised (fields this build does not know
//! included), and parses the typed document only from that value.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{DecodeError, VerifyError};
use crate::keys::{canonical_json, PublicKey, SigningKey};

/// The TUF specification version written into documents this project makes.
pub const SPEC_VERSION: &str = "1.0.31";

/// Upper bound on any metadata document this project decodes (endless-data defence).
pub const MAX_METADATA_BYTES: usize = 4 * 1024 * 1024;

/// One signature in an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// Key id of the signing key.
    pub keyid: String,
    /// Hex ed25519 signature over the canonical JSON of `signed`.
    pub sig: String,
}

/// A signed envelope: `{"signed": …, "signatures": […]}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signed {
    /// The document, exactly as received.
    pub signed: serde_json::Value,
    /// Its signatures.
    pub signatures: Vec<Signature>,
}

/// A role's keys and threshold, as listed in root (or a delegation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleKeys {
    /// Key ids allowed to sign for the role.
    pub keyids: Vec<String>,
    /// How many distinct keys must sign.
    pub threshold: u32,
}

/// The `root` role: the trust anchor listing every top-level role's keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Root {
    /// Always `root`.
    #[serde(rename = "_type")]
    pub kind: String,
    /// TUF spec version.
    pub spec_version: String,
    /// Monotonic version.
    pub version: u64,
    /// Expiry, `YYYY-MM-DDTHH:MM:SSZ`.
    pub expires: String,
    /// Whether the repository serves `N.role.json` files.
    #[serde(default)]
    pub consistent_snapshot: bool,
    /// Key id → key.
    pub keys: BTreeMap<String, PublicKey>,
    /// Role name → keys and threshold.
    pub roles: BTreeMap<String, RoleKeys>,
}

/// A file named by snapshot or timestamp.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaFile {
    /// Version of the named document.
    pub version: u64,
    /// Its length in bytes, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u64>,
    /// Its hashes, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hashes: Option<BTreeMap<String, String>>,
}

/// The `snapshot` and `timestamp` roles: versions of other metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaIndex {
    /// `snapshot` or `timestamp`.
    #[serde(rename = "_type")]
    pub kind: String,
    /// TUF spec version.
    pub spec_version: String,
    /// Monotonic version.
    pub version: u64,
    /// Expiry.
    pub expires: String,
    /// File name (`targets.json`, `snapshot.json`) → what it must be.
    pub meta: BTreeMap<String, MetaFile>,
}

/// One target: a file with its length and hashes, and custom data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetFile {
    /// Length in bytes.
    pub length: u64,
    /// Algorithm → hex digest.
    pub hashes: BTreeMap<String, String>,
    /// Free-form data; modelcast keeps its manifest under `modelcast`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom: Option<serde_json::Value>,
}

/// A delegated role (parsed so documents with delegations decode; not followed yet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delegations {
    /// Key id → key.
    pub keys: BTreeMap<String, PublicKey>,
    /// Delegated roles, in order.
    pub roles: Vec<serde_json::Value>,
}

/// The `targets` role: the files (models) the repository vouches for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Targets {
    /// Always `targets`.
    #[serde(rename = "_type")]
    pub kind: String,
    /// TUF spec version.
    pub spec_version: String,
    /// Monotonic version.
    pub version: u64,
    /// Expiry.
    pub expires: String,
    /// Target path → file.
    pub targets: BTreeMap<String, TargetFile>,
    /// Delegations, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegations: Option<Delegations>,
}

/// What every TUF document has in common.
pub trait Document: Serialize + DeserializeOwned {
    /// The document's `_type` field as written.
    fn kind(&self) -> &str;
    /// Its version.
    fn version(&self) -> u64;
    /// Its expiry string.
    fn expires(&self) -> &str;
}

macro_rules! document {
    ($t:ty) => {
        impl Document for $t {
            fn kind(&self) -> &str {
                &self.kind
            }
            fn version(&self) -> u64 {
                self.version
            }
            fn expires(&self) -> &str {
                &self.expires
            }
        }
    };
}
document!(Root);
document!(Targets);
document!(MetaIndex);

impl Root {
    /// A new root document naming one key per top-level role.
    pub fn new(
        version: u64,
        expires: &str,
        root: &PublicKey,
        targets: &PublicKey,
        snapshot: &PublicKey,
        timestamp: &PublicKey,
    ) -> Self {
        let mut keys = BTreeMap::new();
        let mut roles = BTreeMap::new();
        for (role, key) in [
            ("root", root),
            ("targets", targets),
            ("snapshot", snapshot),
            ("timestamp", timestamp),
        ] {
            keys.insert(key.key_id(), key.clone());
            roles.insert(
                role.to_string(),
                RoleKeys {
                    keyids: vec![key.key_id()],
                    threshold: 1,
                },
            );
        }
        Root {
            kind: "root".into(),
            spec_version: SPEC_VERSION.into(),
            version,
            expires: expires.into(),
            consistent_snapshot: false,
            keys,
            roles,
        }
    }

    /// The keys and threshold of `role`, as a verifier.
    pub fn role(&self, role: &str) -> Result<RoleVerifier, VerifyError> {
        let spec = self.roles.get(role).ok_or_else(|| VerifyError::Mismatch {
            role: "root".into(),
            reason: format!("root lists no {role} role"),
        })?;
        let keys = spec
            .keyids
            .iter()
            .filter_map(|id| self.keys.get(id).map(|k| (id.clone(), k.clone())))
            .collect();
        Ok(RoleVerifier {
            role: role.into(),
            keys,
            threshold: spec.threshold,
        })
    }
}

impl Targets {
    /// An empty targets document.
    pub fn new(version: u64, expires: &str) -> Self {
        Targets {
            kind: "targets".into(),
            spec_version: SPEC_VERSION.into(),
            version,
            expires: expires.into(),
            targets: BTreeMap::new(),
            delegations: None,
        }
    }
}

impl MetaIndex {
    /// A snapshot (`kind = "snapshot"`) or timestamp (`kind = "timestamp"`) document.
    pub fn new(kind: &str, version: u64, expires: &str, meta: BTreeMap<String, MetaFile>) -> Self {
        MetaIndex {
            kind: kind.into(),
            spec_version: SPEC_VERSION.into(),
            version,
            expires: expires.into(),
            meta,
        }
    }
}

/// Who may sign for one role, and how many of them must.
#[derive(Debug, Clone)]
pub struct RoleVerifier {
    role: String,
    keys: Vec<(String, PublicKey)>,
    threshold: u32,
}

impl RoleVerifier {
    /// A verifier from explicit keys (the director keys pinned in an agent's config).
    pub fn new(role: &str, keys: Vec<PublicKey>, threshold: u32) -> Self {
        RoleVerifier {
            role: role.into(),
            keys: keys.into_iter().map(|k| (k.key_id(), k)).collect(),
            threshold,
        }
    }

    /// The role's name.
    pub fn role(&self) -> &str {
        &self.role
    }

    /// Checks that a threshold of distinct authorised keys signed `envelope`.
    pub fn check(&self, envelope: &Signed) -> Result<(), VerifyError> {
        let message = canonical_json(&envelope.signed)?;
        let mut signers: Vec<&str> = Vec::new();
        for sig in &envelope.signatures {
            if signers.contains(&sig.keyid.as_str()) {
                continue;
            }
            let Some((_, key)) = self.keys.iter().find(|(id, _)| *id == sig.keyid) else {
                continue;
            };
            if key.verifies(&message, &sig.sig) {
                signers.push(&sig.keyid);
            }
        }
        if self.threshold == 0 || (signers.len() as u64) < u64::from(self.threshold) {
            return Err(VerifyError::Threshold {
                role: self.role.clone(),
                valid: signers.len(),
                threshold: self.threshold,
            });
        }
        Ok(())
    }
}

impl Signed {
    /// Signs a document with each of `keys`.
    pub fn sign<T: Serialize>(doc: &T, keys: &[&SigningKey]) -> Self {
        let signed = serde_json::to_value(doc).expect("documents serialize");
        let message = canonical_json(&signed).expect("documents carry no floats");
        let signatures = keys
            .iter()
            .map(|k| Signature {
                keyid: k.public().key_id(),
                sig: k.sign_hex(&message),
            })
            .collect();
        Signed { signed, signatures }
    }

    /// Decodes an envelope from untrusted bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_METADATA_BYTES {
            return Err(DecodeError::Invalid {
                what: "metadata",
                reason: format!("{} bytes exceeds {MAX_METADATA_BYTES}", bytes.len()),
            });
        }
        serde_json::from_slice(bytes).map_err(|e| DecodeError::json("signed metadata", e))
    }

    /// The envelope as JSON bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("json values serialize")
    }

    /// Checks the signatures against `verifier`, then parses the document and checks its
    /// `_type`. Signatures come first: nothing is parsed from an unauthenticated document.
    pub fn verify<T: Document>(
        &self,
        verifier: &RoleVerifier,
        expected_type: &'static str,
    ) -> Result<T, VerifyError> {
        verifier.check(self)?;
        self.parse(expected_type)
    }

    /// Parses the document without checking signatures (for reading one's own trusted copy).
    pub fn parse<T: Document>(&self, expected_type: &'static str) -> Result<T, VerifyError> {
        let doc: T = serde_json::from_value(self.signed.clone())
            .map_err(|e| DecodeError::json(expected_type, e))?;
        if doc.kind() != expected_type {
            return Err(VerifyError::WrongType {
                expected: expected_type,
                found: doc.kind().into(),
            });
        }
        Ok(doc)
    }
}

/// Parses a TUF expiry (`YYYY-MM-DDTHH:MM:SSZ`) into Unix seconds.
pub fn parse_expiry(expires: &str) -> Result<i64, DecodeError> {
    time::OffsetDateTime::parse(expires, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|e| DecodeError::Invalid {
            what: "expires",
            reason: format!("{expires:?}: {e}"),
        })
}

/// Formats Unix seconds as a TUF expiry.
pub fn format_expiry(unix: i64) -> String {
    let t =
        time::OffsetDateTime::from_unix_timestamp(unix).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    t.format(&fmt).expect("a valid date formats")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    #[test]
    fn root_round_trips_and_verifies() {
        let (r, t, s, ts) = (key(1), key(2), key(3), key(4));
        let root = Root::new(
            1,
            "2030-01-01T00:00:00Z",
            &r.public(),
            &t.public(),
            &s.public(),
            &ts.public(),
        );
        let env = Signed::sign(&root, &[&r]);
        let back = Signed::from_slice(&env.to_vec()).unwrap();
        let verifier = root.role("root").unwrap();
        let parsed: Root = back.verify(&verifier, "root").unwrap();
        assert_eq!(parsed, root);
        // Signed by the wrong key: rejected.
        let forged = Signed::sign(&root, &[&t]);
        assert!(matches!(
            forged.verify::<Root>(&verifier, "root"),
            Err(VerifyError::Threshold { .. })
        ));
        // The same signature twice does not reach a threshold of two.
        let mut twice = env.clone();
        twice.signatures.push(twice.signatures[0].clone());
        let v2 = RoleVerifier::new("root", vec![r.public(), t.public()], 2);
        assert!(v2.check(&twice).is_err());
    }

    #[test]
    fn tampered_document_fails() {
        let k = key(9);
        let doc = Targets::new(3, "2030-01-01T00:00:00Z");
        let mut env = Signed::sign(&doc, &[&k]);
        env.signed["version"] = serde_json::json!(4);
        let v = RoleVerifier::new("targets", vec![k.public()], 1);
        assert!(env.verify::<Targets>(&v, "targets").is_err());
    }

    #[test]
    fn expiry_round_trip() {
        let t = parse_expiry("2030-01-01T00:00:00Z").unwrap();
        assert_eq!(format_expiry(t), "2030-01-01T00:00:00Z");
        assert!(parse_expiry("tomorrow").is_err());
    }

    proptest! {
        #[test]
        fn signed_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(env) = Signed::from_slice(&bytes) {
                let _ = env.parse::<Root>("root");
                let _ = env.parse::<Targets>("targets");
                let _ = env.parse::<MetaIndex>("snapshot");
            }
        }

        #[test]
        fn signed_decoder_survives_mutations(pos in 0usize..400, byte in any::<u8>()) {
            let k = key(5);
            let env = Signed::sign(&Targets::new(1, "2030-01-01T00:00:00Z"), &[&k]);
            let mut bytes = env.to_vec();
            let i = pos % bytes.len();
            bytes[i] = byte;
            if let Ok(env) = Signed::from_slice(&bytes) {
                let v = RoleVerifier::new("targets", vec![k.public()], 1);
                let _ = env.verify::<Targets>(&v, "targets");
            }
        }
    }
}
