//! ed25519 keys in TUF's key format (`keytype`/`scheme` `ed25519`, public key in hex), key ids
//! (SHA-256 of the key's canonical JSON) and signatures over canonical JSON.

use ed25519_dalek::{Signer, Verifier};
use serde::{Deserialize, Serialize};

use crate::error::DecodeError;

/// A public key as TUF writes it in `root.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicKey {
    /// Always `ed25519` here.
    pub keytype: String,
    /// Always `ed25519` here.
    pub scheme: String,
    /// The key material.
    pub keyval: KeyVal,
}

/// The public half of a key, hex encoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyVal {
    /// 32 bytes, lower-case hex.
    pub public: String,
}

impl PublicKey {
    /// The TUF form of an ed25519 verifying key.
    pub fn from_ed25519(key: &ed25519_dalek::VerifyingKey) -> Self {
        PublicKey {
            keytype: "ed25519".into(),
            scheme: "ed25519".into(),
            keyval: KeyVal {
                public: hex::encode(key.as_bytes()),
            },
        }
    }

    /// Parses a bare hex public key (as pinned in an agent's config).
    pub fn from_hex(public: &str) -> Result<Self, DecodeError> {
        let key = PublicKey {
            keytype: "ed25519".into(),
            scheme: "ed25519".into(),
            keyval: KeyVal {
                public: public.trim().to_ascii_lowercase(),
            },
        };
        key.verifying_key()?;
        Ok(key)
    }

    /// The TUF key id: hex SHA-256 of the key's canonical JSON.
    pub fn key_id(&self) -> String {
        let value = serde_json::to_value(self).expect("a key serializes");
        crate::sha256_hex(&canonical_json(&value).expect("a key has no floats"))
    }

    /// The ed25519 key, if this is a well-formed ed25519 key.
    pub fn verifying_key(&self) -> Result<ed25519_dalek::VerifyingKey, DecodeError> {
        if self.keytype != "ed25519" || self.scheme != "ed25519" {
            return Err(DecodeError::Invalid {
                what: "key",
                reason: format!(
                    "unsupported keytype/scheme {}/{}",
                    self.keytype, self.scheme
                ),
            });
        }
        let bytes: [u8; 32] = hex::decode(&self.keyval.public)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| DecodeError::Invalid {
                what: "key",
                reason: "public key is not 32 bytes of hex".into(),
            })?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|e| DecodeError::Invalid {
            what: "key",
            reason: e.to_string(),
        })
    }

    /// Whether `sig_hex` is this key's signature over `message`.
    pub fn verifies(&self, message: &[u8], sig_hex: &str) -> bool {
        let Ok(key) = self.verifying_key() else {
            return false;
        };
        let Some(sig) = hex::decode(sig_hex)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
        else {
            return false;
        };
        key.verify(message, &ed25519_dalek::Signature::from_bytes(&sig))
            .is_ok()
    }
}

/// A private signing key with its TUF key id.
#[derive(Clone)]
pub struct SigningKey {
    key: ed25519_dalek::SigningKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("key_id", &self.public().key_id())
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Wraps 32 secret bytes.
    pub fn from_bytes(secret: &[u8; 32]) -> Self {
        SigningKey {
            key: ed25519_dalek::SigningKey::from_bytes(secret),
        }
    }

    /// Parses a key file's content: 64 hex characters of secret key.
    pub fn from_hex(text: &str) -> Result<Self, DecodeError> {
        let bytes: [u8; 32] = hex::decode(text.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| DecodeError::Invalid {
                what: "signing key",
                reason: "expected 64 hex characters".into(),
            })?;
        Ok(Self::from_bytes(&bytes))
    }

    /// The secret, hex encoded, for a key file.
    pub fn to_hex(&self) -> String {
        hex::encode(self.key.to_bytes())
    }

    /// The public key in TUF form.
    pub fn public(&self) -> PublicKey {
        PublicKey::from_ed25519(&self.key.verifying_key())
    }

    /// Signs `message`, returning the hex signature.
    pub fn sign_hex(&self, message: &[u8]) -> String {
        hex::encode(self.key.sign(message).to_bytes())
    }
}

/// OLPC canonical JSON of a value, as TUF signs it. Fails on floating-point numbers, which
/// canonical JSON cannot carry.
pub fn canonical_json(value: &serde_json::Value) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::new();
    let mut ser =
        serde_json::Serializer::with_formatter(&mut out, olpc_cjson::CanonicalFormatter::new());
    value
        .serialize(&mut ser)
        .map_err(|e| DecodeError::Invalid {
            what: "canonical json",
            reason: e.to_string(),
        })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify_round_trip() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let sig = key.sign_hex(b"hello");
        assert!(key.public().verifies(b"hello", &sig));
        assert!(!key.public().verifies(b"hellO", &sig));
        assert!(!key.public().verifies(b"hello", "zz"));
        assert_eq!(key.public().key_id().len(), 64);
        let again = SigningKey::from_hex(&key.to_hex()).unwrap();
        assert_eq!(again.public(), key.public());
    }

    #[test]
    fn bad_keys_are_errors() {
        assert!(PublicKey::from_hex("abcd").is_err());
        assert!(SigningKey::from_hex("not hex").is_err());
        let mut k = SigningKey::from_bytes(&[1; 32]).public();
        k.keytype = "rsa".into();
        assert!(k.verifying_key().is_err());
    }

    #[test]
    fn canonical_json_sorts_keys_and_rejects_floats() {
        let v = serde_json::json!({"b": 1, "a": "x"});
        assert_eq!(canonical_json(&v).unwrap(), br#"{"a":"x","b":1}"#);
        assert!(canonical_json(&serde_json::json!({"f": 1.5})).is_err());
    }
}
