//! The device's keys in a PKCS#11 token (`[enrol.pkcs11]`; feature `pkcs11`): P-256 key pairs
//! made inside the token at the first start (sensitive, never extractable), found again by
//! their labels at every later one. The token's module (SoftHSM2, a TPM's PKCS#11 library, a
//! secure element's) is loaded at run time.
//!
//! - The TLS key ([`Usage::Sign`]) signs CSRs ([`rcgen::SigningKey`]) and TLS handshakes
//!   ([`rustls::sign::SigningKey`]); the token computes each ECDSA signature over a SHA-256
//!   digest the agent computes.
//! - The sealing key ([`Usage::Derive`]; confidential models, [`crate::sealing`]) computes
//!   ECDH with the sender's point of each key wrap ([`TokenKey::ecdh`]); the token returns
//!   the shared secret, never the key.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as Pkcs11Error, RvError};
use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use rustls::pki_types::SubjectPublicKeyInfoDer;
use rustls::sign::Signer;
use rustls::{SignatureAlgorithm, SignatureScheme};
use sha2::Digest;

use super::IdentityError;
use crate::config::Pkcs11Config;

/// The named curve P-256 (prime256v1), DER: the key pair's `CKA_EC_PARAMS`.
const P256: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// What a key pair is for: one key, one use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// ECDSA signatures (the TLS identity).
    Sign,
    /// ECDH key agreement (the sealing key).
    Derive,
}

/// A key in a token.
pub struct TokenKey {
    /// The token's library, kept loaded while the session lives.
    _module: Pkcs11,
    session: Mutex<Session>,
    private: ObjectHandle,
    /// The public point, uncompressed (`04 || X || Y`).
    point: Vec<u8>,
    /// Its SubjectPublicKeyInfo, DER.
    spki: Vec<u8>,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey")
            .field("public", &hex::encode(&self.point))
            .finish_non_exhaustive()
    }
}

fn token(e: impl std::fmt::Display) -> IdentityError {
    IdentityError::Token(e.to_string())
}

/// The module at `path`, initialised once for the whole process (PKCS#11 allows one
/// `C_Initialize` per process; the TLS key and the sealing key share it).
fn module(path: &std::path::Path) -> Result<Pkcs11, IdentityError> {
    static MODULES: Mutex<Vec<(PathBuf, Pkcs11)>> = Mutex::new(Vec::new());
    let mut modules = MODULES.lock().expect("PKCS#11 modules lock");
    if let Some((_, module)) = modules.iter().find(|(p, _)| p == path) {
        return Ok(module.clone());
    }
    let module = Pkcs11::new(path)
        .map_err(|e| IdentityError::Token(format!("loading {}: {e}", path.display())))?;
    // Initialised already (the same library under another path): usable as it is.
    match module.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(Pkcs11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(token(e)),
    }
    modules.push((path.to_path_buf(), module.clone()));
    Ok(module)
}

impl TokenKey {
    /// Opens the token of `cfg` and finds the key pair labelled `label` there, or makes one
    /// for `usage`.
    pub fn open(cfg: &Pkcs11Config, label: &str, usage: Usage) -> Result<Arc<Self>, IdentityError> {
        let module = module(&cfg.module)?;
        let mut slot = None;
        for s in module.get_slots_with_token().map_err(token)? {
            if module.get_token_info(s).map_err(token)?.label() == cfg.token {
                slot = Some(s);
                break;
            }
        }
        let slot =
            slot.ok_or_else(|| IdentityError::Token(format!("no token labelled {:?}", cfg.token)))?;
        let session = module.open_rw_session(slot).map_err(token)?;
        let pin = std::fs::read_to_string(&cfg.pin_file).map_err(|source| IdentityError::Io {
            path: cfg.pin_file.clone(),
            source,
        })?;
        // Logging in is per token, not per session: the second key's session finds it done.
        match session.login(UserType::User, Some(&AuthPin::from(pin.trim().to_string()))) {
            Ok(()) | Err(Pkcs11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => return Err(token(e)),
        }
        let label = label.as_bytes().to_vec();
        let find = |class| {
            session
                .find_objects(&[Attribute::Class(class), Attribute::Label(label.clone())])
                .map_err(token)
        };
        let (public, private) = match (
            find(ObjectClass::PUBLIC_KEY)?.first(),
            find(ObjectClass::PRIVATE_KEY)?.first(),
        ) {
            (Some(public), Some(private)) => {
                // Found by its label: it must be a key for this use (a label given to the
                // other key, or to a key made by hand for something else, is refused here).
                let (asked, may) = match usage {
                    Usage::Sign => (AttributeType::Sign, "sign"),
                    Usage::Derive => (AttributeType::Derive, "derive"),
                };
                let allowed = session
                    .get_attributes(*private, &[asked])
                    .map_err(token)?
                    .iter()
                    .any(|a| matches!(a, Attribute::Sign(true) | Attribute::Derive(true)));
                if !allowed {
                    return Err(token(format!(
                        "the key labelled {:?} may not {may}",
                        String::from_utf8_lossy(&label)
                    )));
                }
                (*public, *private)
            }
            _ => {
                // One key, one use: every other use is switched off (tokens differ in what
                // they allow by default).
                let sign = usage == Usage::Sign;
                let derive = usage == Usage::Derive;
                let public = [
                    Attribute::Token(true),
                    Attribute::Private(false),
                    Attribute::Verify(sign),
                    Attribute::Derive(derive),
                    Attribute::Encrypt(false),
                    Attribute::Wrap(false),
                    Attribute::KeyType(KeyType::EC),
                    Attribute::EcParams(P256.to_vec()),
                    Attribute::Label(label.clone()),
                ];
                let private = [
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Sign(sign),
                    Attribute::Derive(derive),
                    Attribute::Decrypt(false),
                    Attribute::Unwrap(false),
                    Attribute::KeyType(KeyType::EC),
                    Attribute::Label(label.clone()),
                ];
                tracing::info!(
                    token = %cfg.token,
                    label = %String::from_utf8_lossy(&label),
                    ?usage,
                    "making the device key in the PKCS#11 token"
                );
                session
                    .generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
                    .map_err(token)?
            }
        };
        let point = match session
            .get_attributes(public, &[AttributeType::EcPoint])
            .map_err(token)?
            .as_slice()
        {
            [Attribute::EcPoint(der)] => uncompressed(der)?,
            _ => return Err(token("the public key has no EC point")),
        };
        let mut key = TokenKey {
            _module: module,
            session: Mutex::new(session),
            private,
            point,
            spki: Vec::new(),
        };
        key.spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        Ok(Arc::new(key))
    }

    /// The public point, uncompressed (`04 || X || Y`).
    pub fn point(&self) -> &[u8] {
        &self.point
    }

    /// ECDH of this (derive) key with `peer`, an uncompressed P-256 point: the shared point's
    /// X coordinate (`CKM_ECDH1_DERIVE` without a KDF). The token derives it as a session
    /// object that is read once and destroyed.
    pub fn ecdh(&self, peer: &[u8]) -> Result<[u8; 32], IdentityError> {
        let session = self.session.lock().expect("token session lock");
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::Token(false),
            Attribute::Sensitive(false),
            Attribute::Extractable(true),
            Attribute::ValueLen(32.into()),
        ];
        let mechanism = Mechanism::Ecdh1Derive(Ecdh1DeriveParams::new(EcKdf::null(), peer));
        let secret = session
            .derive_key(&mechanism, self.private, &template)
            .map_err(token)?;
        let value = session.get_attributes(secret, &[AttributeType::Value]);
        if let Err(e) = session.destroy_object(secret) {
            tracing::warn!(error = %e, "the token kept a derived secret (a session object: it goes with the session)");
        }
        let mut value = value.map_err(token)?;
        let secret = match value.as_slice() {
            [Attribute::Value(v)] => <[u8; 32]>::try_from(v.as_slice())
                .map_err(|_| token(format!("a shared secret of {} bytes", v.len()))),
            _ => Err(token("the derived secret has no value")),
        };
        for a in value.iter_mut() {
            if let Attribute::Value(v) = a {
                zeroize::Zeroize::zeroize(v);
            }
        }
        secret
    }

    /// An ECDSA P-256 signature of SHA-256(`msg`), DER (as X.509 and TLS carry it).
    fn sign_der(&self, msg: &[u8]) -> Result<Vec<u8>, IdentityError> {
        let digest = sha2::Sha256::digest(msg);
        let rs = self
            .session
            .lock()
            .expect("token session lock")
            .sign(&Mechanism::Ecdsa, self.private, &digest)
            .map_err(token)?;
        if rs.len() != 64 {
            return Err(token(format!("a signature of {} bytes", rs.len())));
        }
        let (r, s) = rs.split_at(32);
        Ok(yasna::construct_der(|w| {
            w.write_sequence(|w| {
                w.next().write_bigint_bytes(r, true);
                w.next().write_bigint_bytes(s, true);
            })
        }))
    }

    /// The TLS signer of this key.
    pub fn tls(self: &Arc<Self>) -> Arc<dyn rustls::sign::SigningKey> {
        Arc::new(TlsKey(self.clone()))
    }
}

/// The public point of a `CKA_EC_POINT`: DER OCTET STRING around it (the standard) or bare
/// (some tokens).
fn uncompressed(der: &[u8]) -> Result<Vec<u8>, IdentityError> {
    match der {
        [0x04, 0x41, point @ ..] if point.len() == 65 && point[0] == 0x04 => Ok(point.to_vec()),
        point if point.len() == 65 && point[0] == 0x04 => Ok(point.to_vec()),
        _ => Err(token(format!("an EC point of {} bytes", der.len()))),
    }
}

impl rcgen::PublicKeyData for TokenKey {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for TokenKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.sign_der(msg).map_err(|e| {
            tracing::warn!(error = %e, "the token did not sign");
            rcgen::Error::RemoteKeyError
        })
    }
}

/// The key as rustls signs TLS handshakes with it.
#[derive(Debug, Clone)]
struct TlsKey(Arc<TokenKey>);

impl rustls::sign::SigningKey for TlsKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| Box::new(self.clone()) as Box<dyn Signer>)
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(self.0.spki.as_slice()))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ECDSA
    }
}

impl Signer for TlsKey {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.0
            .sign_der(message)
            .map_err(|e| rustls::Error::General(e.to_string()))
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ECDSA_NISTP256_SHA256
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec_points_are_read_wrapped_or_bare() {
        let mut point = vec![0x04];
        point.extend([7u8; 64]);
        let mut wrapped = vec![0x04, 0x41];
        wrapped.extend(&point);
        assert_eq!(uncompressed(&wrapped).unwrap(), point);
        assert_eq!(uncompressed(&point).unwrap(), point);
        assert!(uncompressed(&point[..33]).is_err());
        assert!(uncompressed(&[]).is_err());
    }
}
