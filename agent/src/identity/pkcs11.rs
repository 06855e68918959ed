//! The device's TLS key in a PKCS#11 token (`[enrol.pkcs11]`; feature `pkcs11`): an ECDSA
//! P-256 key pair made inside the token at the first start (sensitive, never extractable),
//! found again by its label at every later one. The token's module (SoftHSM2, a TPM's
//! PKCS#11 library, a secure element's) is loaded at run time.
//!
//! The key signs CSRs ([`rcgen::SigningKey`]) and TLS handshakes ([`rustls::sign::SigningKey`]);
//! the token computes each ECDSA signature over a SHA-256 digest the agent computes.

use std::sync::{Arc, Mutex};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
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

impl TokenKey {
    /// Opens the token of `cfg` and finds its key pair by label, or makes one there.
    pub fn open(cfg: &Pkcs11Config) -> Result<Arc<Self>, IdentityError> {
        let module = Pkcs11::new(&cfg.module)
            .map_err(|e| IdentityError::Token(format!("loading {}: {e}", cfg.module.display())))?;
        module
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(token)?;
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
        session
            .login(UserType::User, Some(&AuthPin::from(pin.trim().to_string())))
            .map_err(token)?;
        let label = cfg.key_label.as_bytes().to_vec();
        let find = |class| {
            session
                .find_objects(&[Attribute::Class(class), Attribute::Label(label.clone())])
                .map_err(token)
        };
        let (public, private) = match (
            find(ObjectClass::PUBLIC_KEY)?.first(),
            find(ObjectClass::PRIVATE_KEY)?.first(),
        ) {
            (Some(public), Some(private)) => (*public, *private),
            _ => {
                let public = [
                    Attribute::Token(true),
                    Attribute::Private(false),
                    Attribute::Verify(true),
                    Attribute::KeyType(KeyType::EC),
                    Attribute::EcParams(P256.to_vec()),
                    Attribute::Label(label.clone()),
                ];
                let private = [
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Sign(true),
                    Attribute::KeyType(KeyType::EC),
                    Attribute::Label(label.clone()),
                ];
                tracing::info!(token = %cfg.token, label = %cfg.key_label, "making the device key in the PKCS#11 token");
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
