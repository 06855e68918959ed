//! The device's own TLS identity when it enrols by claim (`[enrol]` in the config): a key pair
//! made on the device at its first start, whose private half never leaves it ([`KEY_FILE`],
//! mode 0600, in `identity/` of the state directory; or in a PKCS#11 token, [`pkcs11`],
//! with `[enrol.pkcs11]` and the `pkcs11` feature), and the certificate the fleet server
//! signed for it ([`CERT_FILE`], with [`META_FILE`]: when it was received and how long it is
//! valid). [`Identity::csr`] asks for a certificate; [`Identity::keep`] checks one (the fleet
//! CA signed it, for this key, valid now) before it replaces the old one; [`renew_at`] says
//! when to ask again.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The directory of the identity in the state directory.
pub const DIR: &str = "identity";
/// The private key (PKCS#8, PEM), mode 0600.
pub const KEY_FILE: &str = "device.key";
/// The certificate (PEM).
pub const CERT_FILE: &str = "device.pem";
/// When it was received and how long it is valid (JSON).
pub const META_FILE: &str = "device.json";

/// Why the identity could not be read, made or kept.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The key file does not hold a key (it is kept, not replaced: the certificates issued
    /// for it are this device's identity).
    #[error("{path} is damaged: {reason}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A certificate the server sent is not one this device can use.
    #[error("the certificate received is refused: {0}")]
    Refused(String),
    /// Making a request failed.
    #[error("certificate request: {0}")]
    Request(String),
    /// The PKCS#11 token failed, or is not built in.
    #[error("PKCS#11 token: {0}")]
    Token(String),
}

#[cfg(feature = "pkcs11")]
pub mod pkcs11;

/// Where the device's private key is.
enum DeviceKey {
    /// In [`KEY_FILE`].
    File {
        key: Box<rcgen::KeyPair>,
        pem: String,
    },
    /// In a PKCS#11 token.
    #[cfg(feature = "pkcs11")]
    Token(Arc<pkcs11::TokenKey>),
}

/// A certificate held, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// Unix seconds it is valid from.
    pub not_before: i64,
    /// Unix seconds it is valid until.
    pub not_after: i64,
    /// Unix seconds it was received.
    pub received: i64,
}

/// When to ask for the next certificate (Unix seconds): two thirds into the life of the one
/// held, counted from its receipt (the server back-dates `not_before` for devices whose clock
/// is behind).
pub fn renew_at(held: &Held) -> i64 {
    held.received + (held.not_after - held.received).max(0) * 2 / 3
}

/// The device's key and certificate.
pub struct Identity {
    dir: PathBuf,
    device: String,
    key: DeviceKey,
    cert: Option<(String, Held)>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("device", &self.device)
            .field("held", &self.cert.as_ref().map(|(_, h)| h))
            .finish_non_exhaustive()
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `text` to `path` whole (beside it, then renamed): a crash leaves the old file or
/// the new one.
fn replace(path: &Path, text: &str, mode: u32) -> Result<(), IdentityError> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

impl Identity {
    /// The identity of `device` in `state_dir`: its key read, or made there on the first
    /// start (or in the PKCS#11 token of `token`); its certificate, if it has one.
    pub fn open(
        state_dir: &Path,
        device: &str,
        token: Option<&crate::config::Pkcs11Config>,
    ) -> Result<Self, IdentityError> {
        let dir = state_dir.join(DIR);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let key = match token {
            #[cfg(feature = "pkcs11")]
            Some(cfg) => DeviceKey::Token(pkcs11::TokenKey::open(
                cfg,
                &cfg.key_label,
                pkcs11::Usage::Sign,
            )?),
            #[cfg(not(feature = "pkcs11"))]
            Some(_) => {
                return Err(IdentityError::Token(
                    "this agent is built without the pkcs11 feature".into(),
                ))
            }
            None => key_file(&dir.join(KEY_FILE))?,
        };
        let cert = match (
            std::fs::read_to_string(dir.join(CERT_FILE)),
            std::fs::read(dir.join(META_FILE)),
        ) {
            (Ok(pem), Ok(meta)) => serde_json::from_slice::<Held>(&meta)
                .ok()
                .map(|held| (pem, held)),
            _ => None,
        };
        Ok(Identity {
            dir,
            device: device.to_string(),
            key,
            cert,
        })
    }

    /// The certificate held, if any.
    pub fn held(&self) -> Option<&Held> {
        self.cert.as_ref().map(|(_, h)| h)
    }

    /// A certificate signing request for this device's key (common name = its id), PEM.
    pub fn csr(&self) -> Result<String, IdentityError> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
            .map_err(|e| IdentityError::Request(e.to_string()))?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, self.device.as_str());
        let csr = match &self.key {
            DeviceKey::File { key, .. } => params.serialize_request(key.as_ref()),
            #[cfg(feature = "pkcs11")]
            DeviceKey::Token(key) => params.serialize_request(key.as_ref()),
        };
        csr.and_then(|csr| csr.pem())
            .map_err(|e| IdentityError::Request(e.to_string()))
    }

    /// The TLS client configuration presenting this identity to a broker of the fleet CA
    /// (`ca_pem`), if it holds a certificate.
    pub fn tls(&self, ca_pem: &[u8]) -> Option<Result<rustls::ClientConfig, IdentityError>> {
        let (cert, _) = self.cert.as_ref()?;
        Some(client_tls(ca_pem, cert, &self.key))
    }

    /// Checks a certificate received for this device (signed by the fleet CA in `ca_pem`, for
    /// this key, valid at `now`), then keeps it in place of the one held.
    pub fn keep(
        &mut self,
        ca_pem: &[u8],
        cert_pem: &str,
        not_before: i64,
        not_after: i64,
        now: i64,
    ) -> Result<rustls::ClientConfig, IdentityError> {
        verify(ca_pem, cert_pem, now)?;
        // rustls refuses a certificate whose key is not ours.
        let tls = client_tls(ca_pem, cert_pem, &self.key)?;
        let held = Held {
            not_before,
            not_after,
            received: now,
        };
        replace(&self.dir.join(CERT_FILE), cert_pem, 0o644)?;
        let meta = serde_json::to_string(&held).expect("times serialize");
        replace(&self.dir.join(META_FILE), &meta, 0o644)?;
        self.cert = Some((cert_pem.to_string(), held));
        Ok(tls)
    }
}

/// The key in `path`, or a new one made there (0600).
fn key_file(path: &Path) -> Result<DeviceKey, IdentityError> {
    match std::fs::read_to_string(path) {
        Ok(pem) => {
            let key = rcgen::KeyPair::from_pem(&pem).map_err(|e| IdentityError::Damaged {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
            Ok(DeviceKey::File {
                key: Box::new(key),
                pem,
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key =
                rcgen::KeyPair::generate().map_err(|e| IdentityError::Request(e.to_string()))?;
            let pem = key.serialize_pem();
            replace(path, &pem, 0o600)?;
            Ok(DeviceKey::File {
                key: Box::new(key),
                pem,
            })
        }
        Err(e) => Err(io(path)(e)),
    }
}

fn client_tls(
    ca_pem: &[u8],
    cert_pem: &str,
    key: &DeviceKey,
) -> Result<rustls::ClientConfig, IdentityError> {
    match key {
        DeviceKey::File { pem, .. } => modelcast_proto::tls::client_config(
            ca_pem,
            Some(modelcast_proto::tls::ClientIdentity {
                cert_pem: cert_pem.as_bytes(),
                key_pem: pem.as_bytes(),
            }),
        ),
        #[cfg(feature = "pkcs11")]
        DeviceKey::Token(key) => {
            modelcast_proto::tls::client_config_with_signer(ca_pem, cert_pem.as_bytes(), key.tls())
        }
    }
    .map_err(|e| IdentityError::Refused(e.to_string()))
}

/// Whether `cert_pem` is a client certificate the fleet CA (`ca_pem`) signed, valid at `now`.
fn verify(ca_pem: &[u8], cert_pem: &str, now: i64) -> Result<(), IdentityError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, UnixTime};
    let refused = |e: &dyn std::fmt::Display| IdentityError::Refused(e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(ca.map_err(|e| refused(&e))?)
            .map_err(|e| refused(&e))?;
    }
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| refused(&e))?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| refused(&e))?;
    let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now.max(0) as u64));
    verifier
        .verify_client_cert(&cert, &[], at)
        .map(|_| ())
        .map_err(|e| refused(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A CA that signs what a CSR asks for, as the fleet server does.
    fn ca() -> (rcgen::Issuer<'static, rcgen::KeyPair>, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test CA");
        let cert = params.self_signed(&key).unwrap();
        (rcgen::Issuer::new(params, key), cert.pem())
    }

    fn sign(
        issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
        csr: &str,
        from: i64,
        until: i64,
    ) -> String {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr).unwrap();
        csr.params.not_before = time::OffsetDateTime::from_unix_timestamp(from).unwrap();
        csr.params.not_after = time::OffsetDateTime::from_unix_timestamp(until).unwrap();
        csr.params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        csr.signed_by(issuer).unwrap().pem()
    }

    #[test]
    fn the_key_is_made_once_and_a_certificate_kept_only_if_it_is_ours_and_valid() {
        let state = tempfile::tempdir().unwrap();
        let mut id = Identity::open(state.path(), "edge-1", None).unwrap();
        let key = state.path().join(DIR).join(KEY_FILE);
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(id.held().is_none() && id.tls(b"").is_none());
        let (issuer, ca_pem) = ca();
        let now = 1_800_000_000;
        let cert = sign(&issuer, &id.csr().unwrap(), now - 10, now + 90);

        // Another device's key, an expired certificate, another CA: refused, nothing kept.
        let other = Identity::open(tempfile::tempdir().unwrap().path(), "edge-2", None).unwrap();
        let theirs = sign(&issuer, &other.csr().unwrap(), now - 10, now + 90);
        assert!(id.keep(ca_pem.as_bytes(), &theirs, 0, 0, now).is_err());
        assert!(id.keep(ca_pem.as_bytes(), &cert, 0, 0, now + 100).is_err());
        let (_, stranger) = ca();
        assert!(id.keep(stranger.as_bytes(), &cert, 0, 0, now).is_err());
        assert!(id.held().is_none());

        id.keep(ca_pem.as_bytes(), &cert, now - 10, now + 90, now)
            .unwrap();
        assert_eq!(renew_at(id.held().unwrap()), now + 60);
        // Read back after a restart, with the same key.
        let again = Identity::open(state.path(), "edge-1", None).unwrap();
        assert_eq!(again.held(), id.held());
        assert!(again.tls(ca_pem.as_bytes()).unwrap().is_ok());
        let pem = |i: &Identity| match &i.key {
            DeviceKey::File { pem, .. } => pem.clone(),
            #[cfg(feature = "pkcs11")]
            DeviceKey::Token(_) => unreachable!(),
        };
        assert_eq!(pem(&again), pem(&id));

        std::fs::write(&key, "not a key").unwrap();
        assert!(matches!(
            Identity::open(state.path(), "edge-1", None),
            Err(IdentityError::Damaged { .. })
        ));
    }
}
