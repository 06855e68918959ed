//! Keys in TUF's key format, key ids (SHA-256 of the key's canonical JSON) and signatures over
//! canonical JSON.
//!
//! modelcast signs with ed25519 (`keytype`/`scheme` `ed25519`, public key in hex). To verify
//! metadata from other TUF repositories it also accepts the other key types of the TUF
//! specification, with the public key as a PEM `PUBLIC KEY` (SubjectPublicKeyInfo):
//! `rsa`/`rsassa-pss-sha256` (and `rsa-pkcs1v15-sha256`) and
//! `ecdsa`/`ecdsa-sha2-nistp256` (DER signatures; the deprecated keytype
//! `ecdsa-sha2-nistp256` too), verified with `ring`. A key of any other type never verifies:
//! it is ignored, not an error, so a threshold can still be met by the keys this build knows.

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

    /// Whether this build can verify signatures of this key's type and scheme.
    pub fn is_supported(&self) -> bool {
        self.algorithm().is_some()
    }

    fn algorithm(&self) -> Option<Algorithm> {
        match (self.keytype.as_str(), self.scheme.as_str()) {
            ("ed25519", "ed25519") => Some(Algorithm::Ed25519),
            ("rsa", "rsassa-pss-sha256") => Some(Algorithm::RsaPss),
            ("rsa", "rsa-pkcs1v15-sha256") => Some(Algorithm::RsaPkcs1),
            ("ecdsa" | "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp256") => Some(Algorithm::EcdsaP256),
            _ => None,
        }
    }

    /// Whether `sig_hex` is this key's signature over `message`. False for a key of an
    /// unsupported type, a malformed key or a malformed signature: never a panic.
    pub fn verifies(&self, message: &[u8], sig_hex: &str) -> bool {
        match self.algorithm() {
            Some(Algorithm::Ed25519) => self.verifies_ed25519(message, sig_hex),
            Some(alg) => {
                let Ok(sig) = hex::decode(sig_hex) else {
                    return false;
                };
                let Some(raw) = spki_key(&self.keyval.public, alg) else {
                    return false;
                };
                let params: &dyn ring::signature::VerificationAlgorithm = match alg {
                    Algorithm::RsaPss => &ring::signature::RSA_PSS_2048_8192_SHA256,
                    Algorithm::RsaPkcs1 => &ring::signature::RSA_PKCS1_2048_8192_SHA256,
                    Algorithm::EcdsaP256 | Algorithm::Ed25519 => {
                        &ring::signature::ECDSA_P256_SHA256_ASN1
                    }
                };
                ring::signature::UnparsedPublicKey::new(params, raw)
                    .verify(message, &sig)
                    .is_ok()
            }
            None => false,
        }
    }

    fn verifies_ed25519(&self, message: &[u8], sig_hex: &str) -> bool {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    Ed25519,
    RsaPss,
    RsaPkcs1,
    EcdsaP256,
}

const RSA_ENCRYPTION: spki::ObjectIdentifier =
    spki::ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const EC_PUBLIC_KEY: spki::ObjectIdentifier =
    spki::ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const PRIME256V1: spki::ObjectIdentifier =
    spki::ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");

/// The raw public key inside a PEM SubjectPublicKeyInfo, as `ring` takes it (PKCS#1
/// `RSAPublicKey` for RSA, the uncompressed point for P-256), if the PEM holds a key of the
/// algorithm `alg` expects.
fn spki_key(pem: &str, alg: Algorithm) -> Option<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::SubjectPublicKeyInfoDer::from_pem_slice(pem.as_bytes()).ok()?;
    let info = spki::SubjectPublicKeyInfoRef::try_from(der.as_ref()).ok()?;
    let (oid, params) = info.algorithm.oids().ok()?;
    let expected = match alg {
        Algorithm::RsaPss | Algorithm::RsaPkcs1 => oid == RSA_ENCRYPTION,
        Algorithm::EcdsaP256 => oid == EC_PUBLIC_KEY && params == Some(PRIME256V1),
        Algorithm::Ed25519 => false,
    };
    if !expected {
        return None;
    }
    info.subject_public_key.as_bytes().map(<[u8]>::to_vec)
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

    /// Vectors made with Python's `cryptography` (P-256 ECDSA with a DER signature; RSA-2048
    /// PSS with SHA-256, MGF1-SHA-256 and a 32-byte salt), as securesystemslib signs.
    const MESSAGE: &[u8] = br#"{"_type":"targets","version":1}"#;
    const EC_PEM: &str = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEQLtW1DlXZnNSzL0DxHr7gIitSJC/\nllV2joOQpidTFE+tTtgVevIo4RS5w4jccn40dVYK8ajgTDvr6ePMIgoJEA==\n-----END PUBLIC KEY-----\n";
    const EC_SIG: &str = concat!(
        "3045022100e9c97eaf454c879eaf9cf816ca1a58573f039c4343a1cbfd9934378bb5dd1165022071625acdbc",
        "eb065474470a12ac9f270ebef067a28e4ed06218a46e3e784685d4",
    );
    const RSA_PEM: &str = "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA33iJ9kQhUABrINtaJq8J\ngwUObzMH3T9vqyB0Lq7nluGhjeeUZBIciXbLI96FpvbSuCAh3Vm8bdY3fZAM28Bh\nfsCc/TWCB5fWC9B4xBtW5cizJ0pDNCdFh8GbsLb+H9tfmdA/wX5NXZLb5jdgqDM7\n37nRrxHordGiu5IgJ6IO/gCkRGCqdunqL2xEP3Ye9K8b3Kj22ZDh/aEANJ4hqLTu\nWyZiAKanVT8pLaazKtcegp6xEA4TWgMEowno5FhxD/PxSAWHoQ4h+n8XUbWs0fgb\nF9cevokYnwq8Ybi45aO8TkWm8DJl3GAgtDsIpOT9kfDfI2I1NoS5nIOMOUGo8Wro\nxwIDAQAB\n-----END PUBLIC KEY-----\n";
    const RSA_SIG: &str = concat!(
        "3bbed27501f36db417b91ac5b27409ba1466073c93ec6386ebe369dc64da23641982edd36419b0415a15cc71",
        "94367d4dc32b583dc1bb18ce083f7d0decb315f019d032166c89360b703a4f5310ea5eda23e8ac34bced9361",
        "a95273115bf20715fc319548ff17e919bb5292a77d105908b1e9e8fc5eed4d5b82f1726d474184a52b197e94",
        "104b10d037a44c135cec1fbe2b193fdc43c380dbd1913dd5a13c264763992862aaf05cd00dd58fa572320be2",
        "c2918eac1964af50df753cd405edd39ccc11d279e638d2c105d44e1ea4cbbc8dd76fa9fb6c62b8450d9a6e16",
        "779d2f8cf22343c9f651211adfaeef7b8b47942768eb0cad7ab94055859ddf45a6861da2",
    );

    fn pem_key(keytype: &str, scheme: &str, pem: &str) -> PublicKey {
        PublicKey {
            keytype: keytype.into(),
            scheme: scheme.into(),
            keyval: KeyVal { public: pem.into() },
        }
    }

    #[test]
    fn ecdsa_and_rsa_pss_keys_verify() {
        let ec = pem_key("ecdsa", "ecdsa-sha2-nistp256", EC_PEM);
        assert!(ec.is_supported());
        assert!(ec.verifies(MESSAGE, EC_SIG));
        assert!(!ec.verifies(b"other", EC_SIG));
        assert!(!ec.verifies(MESSAGE, ""));
        assert!(
            pem_key("ecdsa-sha2-nistp256", "ecdsa-sha2-nistp256", EC_PEM).verifies(MESSAGE, EC_SIG)
        );
        let rsa = pem_key("rsa", "rsassa-pss-sha256", RSA_PEM);
        assert!(rsa.verifies(MESSAGE, RSA_SIG));
        assert!(!rsa.verifies(b"other", RSA_SIG));
        // A key under another algorithm's label, or an unknown type, never verifies.
        assert!(!pem_key("rsa", "rsassa-pss-sha256", EC_PEM).verifies(MESSAGE, EC_SIG));
        assert!(!pem_key("ecdsa", "ecdsa-sha2-nistp256", RSA_PEM).verifies(MESSAGE, RSA_SIG));
        assert!(!pem_key("rsa", "rsa-pkcs1v15-sha256", RSA_PEM).verifies(MESSAGE, RSA_SIG));
        let unknown = pem_key("dsa", "dsa-sha1", RSA_PEM);
        assert!(!unknown.is_supported() && !unknown.verifies(MESSAGE, RSA_SIG));
        assert!(!pem_key("ecdsa", "ecdsa-sha2-nistp256", "not a pem").verifies(MESSAGE, EC_SIG));
    }

    #[test]
    fn canonical_json_sorts_keys_and_rejects_floats() {
        let v = serde_json::json!({"b": 1, "a": "x"});
        assert_eq!(canonical_json(&v).unwrap(), br#"{"a":"x","b":1}"#);
        assert!(canonical_json(&serde_json::json!({"f": 1.5})).is_err());
    }

    proptest::proptest! {
        #[test]
        fn junk_keys_and_signatures_never_verify_or_panic(
            keytype in "(rsa|ecdsa|ed25519|x)",
            public in ".{0,300}",
            sig in "[0-9a-f]{0,200}",
        ) {
            let scheme = match keytype.as_str() {
                "rsa" => "rsassa-pss-sha256",
                "ecdsa" => "ecdsa-sha2-nistp256",
                other => other,
            };
            let key = pem_key(&keytype, scheme, &public);
            proptest::prop_assert!(!key.verifies(MESSAGE, &sig));
        }
    }
}
