//! The transport profile every modelcast MQTT client uses: TLS 1.3 or 1.2 with rustls and the
//! `ring` provider, the fleet's own CA as the only trust anchor, and a client certificate that
//! names the device (its common name is the device id, which mosquitto's ACL maps to
//! `<prefix>/d/<id>/#`).
//!
//! Pure: PEM bytes in, a [`rustls::ClientConfig`] out. Reading the files is the caller's job.
//! TLS is defence in depth; an agent's trust in a model comes from its signed metadata alone.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use thiserror::Error;

/// Why a TLS configuration could not be built.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TlsError {
    /// A PEM input held no usable item of the kind needed.
    #[error("{what}: {reason}")]
    Pem {
        /// Which input (`CA certificate`, `client certificate`, `client key`).
        what: &'static str,
        /// What was wrong with it.
        reason: String,
    },
    /// rustls refused the material (e.g. a key that does not match the certificate).
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

/// A client certificate chain and its private key, PEM encoded.
#[derive(Debug, Clone, Copy)]
pub struct ClientIdentity<'a> {
    /// The certificate, optionally followed by intermediates.
    pub cert_pem: &'a [u8],
    /// Its private key (PKCS#8, SEC1 or PKCS#1).
    pub key_pem: &'a [u8],
}

fn certificates(what: &'static str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            reason: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// A client configuration trusting only the CA certificates in `ca_pem`, presenting
/// `identity` when given.
pub fn client_config(
    ca_pem: &[u8],
    identity: Option<ClientIdentity<'_>>,
) -> Result<ClientConfig, TlsError> {
    let builder = builder(ca_pem)?;
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some(id) => {
            let chain = certificates("client certificate", id.cert_pem)?;
            let key = PrivateKeyDer::from_pem_slice(id.key_pem).map_err(|e| TlsError::Pem {
                what: "client key",
                reason: e.to_string(),
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::Rustls(e.to_string()))
        }
    }
}

/// A client configuration trusting only the CA certificates in `ca_pem`, presenting the
/// certificate `cert_pem` for a key that signs elsewhere (a PKCS#11 token): refused unless
/// the key's public half is the certificate's.
pub fn client_config_with_signer(
    ca_pem: &[u8],
    cert_pem: &[u8],
    key: Arc<dyn rustls::sign::SigningKey>,
) -> Result<ClientConfig, TlsError> {
    let builder = builder(ca_pem)?;
    let chain = certificates("client certificate", cert_pem)?;
    let certified = rustls::sign::CertifiedKey::new(chain, key);
    certified
        .keys_match()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    Ok(
        builder
            .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified))),
    )
}

fn builder(
    ca_pem: &[u8],
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates("CA certificate", ca_pem)? {
        roots.add(cert).map_err(|e| TlsError::Pem {
            what: "CA certificate",
            reason: e.to_string(),
        })?;
    }
    Ok(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Rustls(e.to_string()))?
            .with_root_certificates(roots),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_a_clear_error() {
        let err = client_config(b"not pem", None).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::Pem {
                    what: "CA certificate",
                    ..
                }
            ),
            "{err}"
        );
        let truncated = b"-----BEGIN CERTIFICATE-----\nMIIB\n";
        assert!(client_config(truncated, None).is_err());
    }

    #[test]
    fn builds_with_a_matching_identity_and_refuses_a_mismatched_key() {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, &ca_key);
        let dev_key = rcgen::KeyPair::generate().unwrap();
        let dev = rcgen::CertificateParams::new(vec!["dev-1".to_string()])
            .unwrap()
            .signed_by(&dev_key, &issuer)
            .unwrap();
        let ca_pem = ca_cert.pem();
        let (cert_pem, key_pem) = (dev.pem(), dev_key.serialize_pem());
        let id = ClientIdentity {
            cert_pem: cert_pem.as_bytes(),
            key_pem: key_pem.as_bytes(),
        };
        let cfg = client_config(ca_pem.as_bytes(), Some(id)).unwrap();
        assert!(cfg.client_auth_cert_resolver.has_certs());
        let other = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let wrong = ClientIdentity {
            key_pem: other.as_bytes(),
            ..id
        };
        assert!(client_config(ca_pem.as_bytes(), Some(wrong)).is_err());
    }
}
