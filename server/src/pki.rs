//! The fleet's transport PKI: a private CA, the broker's server certificate, and one client
//! certificate per identity (the fleet server, each device), as PEM files in one directory.
//!
//! A client certificate's common name is its MQTT identity: mosquitto takes it as the user
//! name (`use_identity_as_username`), and [`crate::acl`] confines each device to its own
//! topics by it. Keys are ECDSA P-256 (rcgen with ring). The CA key signs certificates only;
//! keep it off the broker and the server in production.
//!
//! Files (in the PKI directory): `ca.pem`, `ca.key`, `broker.pem`, `broker.key`,
//! `<name>.pem`, `<name>.key` for every client identity, and the certificate revocation list
//! `crl.pem` (signed by the CA; mosquitto's `crlfile` in the generated configuration) with
//! `revoked.json`, what it lists.
//!
//! Enrolment by claim ([`claim`], [`CertIssuer`]): a second CA, `claim-ca.pem` and
//! `claim-ca.key`, signs the claim credentials `claim-<batch>.pem`/`.key` that device images
//! carry. Brokers trust it only on their enrolment topics (the embedded broker's front tells a
//! claim by its issuer; mosquitto admits it on a listener of its own), so a claim can ask for
//! a device certificate and do nothing else. The fleet server signs device certificates from
//! the CSRs that devices send, with `ca.key`: a server that enrols devices holds the fleet
//! CA's key.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use thiserror::Error;

/// The default identity of the fleet server's MQTT client.
pub const SERVER_IDENTITY: &str = "modelcast-server";

/// How long issued certificates stay valid.
const VALID_DAYS: i64 = 825;
/// How long the CA stays valid.
const CA_VALID_DAYS: i64 = 3650;

/// Why a PKI operation failed.
#[derive(Debug, Error)]
pub enum PkiError {
    /// Reading or writing a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Certificate generation or parsing failed.
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// A name that cannot be an MQTT identity or a file name.
    #[error("{0:?} is not a valid identity (1-64 of [A-Za-z0-9._-])")]
    BadName(String),
    /// `init` or `issue` would overwrite an existing CA or identity.
    #[error("{0} exists: refusing to replace it")]
    Exists(PathBuf),
    /// A file of the PKI does not read as what it should be.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// The claim CA's certificate in the PKI directory.
pub const CLAIM_CA_FILE: &str = "claim-ca.pem";
/// Its key.
const CLAIM_CA_KEY: &str = "claim-ca.key";
/// The claim CA's common name: what a claim certificate's issuer says.
const CLAIM_CA_NAME: &str = "modelcast claim CA";

/// The certificate revocation list's file in the PKI directory.
pub const CRL_FILE: &str = "crl.pem";

/// What the revocation list lists, in the PKI directory (JSON).
const REVOKED_FILE: &str = "revoked.json";

/// How long a revocation list is valid: brokers refuse every client once it has expired, so
/// it is issued again (`modelcast pki revoke` with no new name) well before.
const CRL_VALID_DAYS: i64 = 365;

/// One revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Revoked {
    /// Its identity (common name).
    pub name: String,
    /// Its serial number, hex.
    pub serial: String,
    /// When it was revoked, Unix seconds.
    pub at: i64,
}

/// Revokes `name`'s certificate (if `Some`) and writes the revocation list again, signed by
/// the CA in `dir`: brokers that read it (mosquitto's `crlfile`, the embedded broker's front)
/// refuse that certificate from their next connection on. Returns every revoked certificate.
pub fn revoke(dir: &Path, name: Option<&str>) -> Result<Vec<Revoked>, PkiError> {
    let serials = match name {
        None => Vec::new(),
        Some(name) => {
            if !modelcast_proto::manifest::valid_name(name) {
                return Err(PkiError::BadName(name.into()));
            }
            let id = Identity::in_dir(dir, name);
            let pem = read(&id.cert)?;
            let invalid = |reason: String| PkiError::Invalid {
                path: id.cert.clone(),
                reason,
            };
            let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
                .map_err(|e| invalid(e.to_string()))?;
            let cert = der.parse_x509().map_err(|e| invalid(e.to_string()))?;
            vec![hex::encode(cert.raw_serial())]
        }
    };
    revoke_serials(dir, name.unwrap_or_default(), &serials)
}

/// Revokes the certificates of `serials` (hex), issued to `name` (the fleet server keeps the
/// serials of those it signed from devices' CSRs), and writes the revocation list again.
/// Returns every revoked certificate.
pub fn revoke_serials(
    dir: &Path,
    name: &str,
    serials: &[String],
) -> Result<Vec<Revoked>, PkiError> {
    let list_path = dir.join(REVOKED_FILE);
    let mut revoked: Vec<Revoked> = match std::fs::read(&list_path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| PkiError::Invalid {
            path: list_path.clone(),
            reason: e.to_string(),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => {
            return Err(PkiError::Io {
                path: list_path,
                source,
            })
        }
    };
    for serial in serials {
        if hex::decode(serial).is_err() {
            return Err(PkiError::Invalid {
                path: list_path,
                reason: format!("serial {serial:?} is not hex"),
            });
        }
        if !revoked.iter().any(|r| r.serial == *serial) {
            revoked.push(Revoked {
                name: name.into(),
                serial: serial.clone(),
                at: time::OffsetDateTime::now_utc().unix_timestamp(),
            });
        }
    }
    let ca_key = KeyPair::from_pem(&read(&dir.join("ca.key"))?)?;
    let issuer = Issuer::from_ca_cert_pem(&read(&dir.join("ca.pem"))?, ca_key)?;
    write_crl(dir, &issuer, &revoked)?;
    let json = serde_json::to_string_pretty(&revoked).expect("a list serializes");
    replace(&list_path, &json)?;
    Ok(revoked)
}

fn write_crl(
    dir: &Path,
    issuer: &Issuer<'_, KeyPair>,
    revoked: &[Revoked],
) -> Result<(), PkiError> {
    let now = time::OffsetDateTime::now_utc();
    let mut certs = Vec::with_capacity(revoked.len());
    for r in revoked {
        let serial = hex::decode(&r.serial).map_err(|e| PkiError::Invalid {
            path: dir.join(REVOKED_FILE),
            reason: e.to_string(),
        })?;
        certs.push(rcgen::RevokedCertParams {
            serial_number: rcgen::SerialNumber::from_slice(&serial),
            revocation_time: time::OffsetDateTime::from_unix_timestamp(r.at).unwrap_or(now),
            reason_code: None,
            invalidity_date: None,
        });
    }
    let crl = rcgen::CertificateRevocationListParams {
        this_update: now - time::Duration::hours(1),
        next_update: now + time::Duration::days(CRL_VALID_DAYS),
        // Each list supersedes the one before: seconds since the epoch increase.
        crl_number: rcgen::SerialNumber::from_slice(&now.unix_timestamp().to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs: certs,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    }
    .signed_by(issuer)?;
    replace(&dir.join(CRL_FILE), &crl.pem()?)
}

/// Paths of one identity's certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Its certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key: PathBuf,
}

impl Identity {
    /// The files of `name` in `dir`.
    pub fn in_dir(dir: &Path, name: &str) -> Identity {
        Identity {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        }
    }
}

/// Writes a new file (never replaces one); private keys are created with mode 0600.
fn write(path: &Path, text: &str, private: bool) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| PkiError::Io {
        path: path.into(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)
}

/// Replaces a public file whole (written beside it, then renamed): a broker reading it at
/// that moment sees the old list or the new one.
fn replace(path: &Path, text: &str) -> Result<(), PkiError> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    write(&tmp, text, false)?;
    std::fs::rename(&tmp, path).map_err(|source| PkiError::Io {
        path: path.into(),
        source,
    })
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.into(),
        source,
    })
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

fn named(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// A client's name: its common name, and an organization derived from it (32 hex digits of
/// the name's SHA-256). The organization bound client ids to certificates when rumqttd did
/// the TLS itself (it keys sessions by `organization.client_id`); the embedded broker's front
/// ([`crate::broker::front`]) now refuses any client id but the common name, as mosquitto
/// does with the generated configuration, and certificates keep the organization so that
/// ones issued before and after read alike.
pub fn client_name(cn: &str) -> DistinguishedName {
    let mut dn = named(cn);
    let digest = modelcast_proto::sha256_hex(cn.as_bytes());
    dn.push(DnType::OrganizationName, &digest[..32]);
    dn
}

/// Creates a CA and the broker's certificate for `broker_names` (host names or IP
/// addresses the devices dial), plus the fleet server's client identity.
pub fn init(dir: &Path, broker_names: &[String]) -> Result<(), PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.into(),
        source,
    })?;
    let ca_path = dir.join("ca.pem");
    if ca_path.exists() {
        return Err(PkiError::Exists(ca_path));
    }
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name = named("modelcast fleet CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca, CA_VALID_DAYS);
    let ca_cert = ca.self_signed(&ca_key)?;
    write(&dir.join("ca.key"), &ca_key.serialize_pem(), true)?;
    write(&ca_path, &ca_cert.pem(), false)?;

    let issuer = Issuer::new(ca, ca_key);
    write_crl(dir, &issuer, &[])?;
    let mut broker = CertificateParams::new(broker_names.to_vec())?;
    broker.distinguished_name = named("modelcast broker");
    broker.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    issue_with(&issuer, broker, &Identity::in_dir(dir, "broker"))?;
    issue(dir, SERVER_IDENTITY)?;
    Ok(())
}

/// Issues a client certificate whose common name is `name` (a device id or a server
/// replica's identity), signed by the CA in `dir`; returns its files.
pub fn issue(dir: &Path, name: &str) -> Result<Identity, PkiError> {
    if !modelcast_proto::manifest::valid_name(name) || name == "broker" || name == "ca" {
        return Err(PkiError::BadName(name.into()));
    }
    let ca_key = KeyPair::from_pem(&read(&dir.join("ca.key"))?)?;
    let issuer = Issuer::from_ca_cert_pem(&read(&dir.join("ca.pem"))?, ca_key)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = client_name(name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let id = Identity::in_dir(dir, name);
    // Never re-issue over an identity: a device named like the server (or an existing
    // device) would take its place in the ACL.
    for f in [&id.cert, &id.key] {
        if f.exists() {
            return Err(PkiError::Exists(f.clone()));
        }
    }
    issue_with(&issuer, params, &id)?;
    Ok(id)
}

fn issue_with(
    issuer: &Issuer<'_, KeyPair>,
    mut params: CertificateParams,
    id: &Identity,
) -> Result<(), PkiError> {
    validity(&mut params, VALID_DAYS);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    write(&id.key, &key.serialize_pem(), true)?;
    write(&id.cert, &cert.pem(), false)?;
    Ok(())
}

/// Issues the claim credential of a batch of devices, `claim-<batch>.pem` and `.key`, signed
/// by the claim CA (made on first use); returns its files. Its common name is `batch`.
pub fn claim(dir: &Path, batch: &str) -> Result<Identity, PkiError> {
    if !modelcast_proto::manifest::valid_name(batch) {
        return Err(PkiError::BadName(batch.into()));
    }
    let (ca_pem, key_path) = (dir.join(CLAIM_CA_FILE), dir.join(CLAIM_CA_KEY));
    if !ca_pem.exists() {
        let key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.distinguished_name = named(CLAIM_CA_NAME);
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut ca, CA_VALID_DAYS);
        let cert = ca.self_signed(&key)?;
        write(&key_path, &key.serialize_pem(), true)?;
        write(&ca_pem, &cert.pem(), false)?;
    }
    let key = KeyPair::from_pem(&read(&key_path)?)?;
    let issuer = Issuer::from_ca_cert_pem(&read(&ca_pem)?, key)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = named(batch);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let id = Identity::in_dir(dir, &format!("claim-{batch}"));
    for f in [&id.cert, &id.key] {
        if f.exists() {
            return Err(PkiError::Exists(f.clone()));
        }
    }
    issue_with(&issuer, params, &id)?;
    Ok(id)
}

/// Whether `cert` (DER) was issued by the claim CA in `dir`, and if so its claim's name (its
/// common name). Called on certificates a TLS verifier already checked against the fleet and
/// claim CAs, whose names differ: the issuer's name tells which signed it.
pub fn claim_name(claim_ca_der: &[u8], cert_der: &[u8]) -> Option<String> {
    let (_, ca) = x509_parser::parse_x509_certificate(claim_ca_der).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    if cert.issuer().as_raw() != ca.subject().as_raw() {
        return None;
    }
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    modelcast_proto::manifest::valid_name(cn).then(|| cn.to_string())
}

/// A device certificate signed from a device's own CSR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// The certificate, PEM.
    pub pem: String,
    /// Its serial number, hex.
    pub serial: String,
    /// Unix seconds it is valid from and until.
    pub not_before: i64,
    /// Until.
    pub not_after: i64,
    /// The device's public key (SubjectPublicKeyInfo, DER), hex: what renewals must keep.
    pub public_key: String,
}

/// Why a CSR was not signed.
#[derive(Debug, Error)]
pub enum CsrError {
    /// Not a CSR, or its signature does not verify with the key it names.
    #[error("not a signed certificate request: {0}")]
    Invalid(String),
    /// Its common name is not the device it came from.
    #[error("the request names {named:?}, not {device:?}")]
    OtherName {
        /// What the CSR's subject says.
        named: String,
        /// The device that sent it.
        device: String,
    },
    /// Signing failed.
    #[error(transparent)]
    Pki(#[from] PkiError),
}

/// Signs device certificates with the fleet CA (`ca.pem`, `ca.key` in a PKI directory).
pub struct CertIssuer {
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertIssuer")
    }
}

impl CertIssuer {
    /// The CA in `dir`.
    pub fn open(dir: &Path) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(&read(&dir.join("ca.key"))?)?;
        let issuer = Issuer::from_ca_cert_pem(&read(&dir.join("ca.pem"))?, key)?;
        Ok(CertIssuer { issuer })
    }

    /// Reads a CSR whose signature verifies with the key it names: the request, that key
    /// (SubjectPublicKeyInfo, DER, hex) and the common name it asks for.
    fn read_csr(
        csr_pem: &str,
    ) -> Result<(rcgen::CertificateSigningRequestParams, String, String), CsrError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CsrError::Invalid(e.to_string()))?;
        let cn = match csr.params.distinguished_name.get(&DnType::CommonName) {
            Some(rcgen::DnValue::Utf8String(s)) => s.clone(),
            Some(rcgen::DnValue::PrintableString(s)) => s.as_str().to_string(),
            _ => String::new(),
        };
        let public_key = hex::encode(rcgen::PublicKeyData::der_bytes(&csr.public_key));
        Ok((csr, public_key, cn))
    }

    /// The public key a CSR names (SubjectPublicKeyInfo, DER, hex), once its signature
    /// verified, and the common name it asks for.
    pub fn inspect(csr_pem: &str) -> Result<(String, String), CsrError> {
        Self::read_csr(csr_pem).map(|(_, key, cn)| (key, cn))
    }

    /// Signs `device`'s CSR: a client certificate for the key it names, with common name
    /// `device`, valid from `now` (Unix seconds, an hour back for clocks behind) for
    /// `valid_secs`. The CSR's own subject must name `device`; nothing else of it is kept.
    pub fn sign(
        &self,
        csr_pem: &str,
        device: &str,
        now: i64,
        valid_secs: i64,
    ) -> Result<Issued, CsrError> {
        let (csr, public_key, cn) = Self::read_csr(csr_pem)?;
        if cn != device {
            return Err(CsrError::OtherName {
                named: cn,
                device: device.into(),
            });
        }
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(PkiError::Cert)?;
        params.distinguished_name = client_name(device);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let serial: [u8; 16] = rand_serial();
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let start = time::OffsetDateTime::from_unix_timestamp(now - 3600)
            .map_err(|e| CsrError::Invalid(e.to_string()))?;
        let end = time::OffsetDateTime::from_unix_timestamp(now + valid_secs)
            .map_err(|e| CsrError::Invalid(e.to_string()))?;
        params.not_before = start;
        params.not_after = end;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(PkiError::Cert)?;
        Ok(Issued {
            pem: cert.pem(),
            serial: hex::encode(serial),
            not_before: start.unix_timestamp(),
            not_after: end.unix_timestamp(),
            public_key,
        })
    }
}

/// A random positive serial number (the top bit clear: DER integers are signed).
fn rand_serial() -> [u8; 16] {
    use rand_core::RngCore;
    let mut serial = [0u8; 16];
    rand_core::OsRng.fill_bytes(&mut serial);
    serial[0] &= 0x7f;
    serial[0] |= 0x01;
    serial
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revoked_certificate_is_listed_in_a_crl_the_ca_signed() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &["127.0.0.1".into()]).unwrap();
        let serials = |dir: &Path| {
            let pem = std::fs::read(dir.join(CRL_FILE)).unwrap();
            let (_, der) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
            let (_, crl) = x509_parser::parse_x509_crl(&der.contents).unwrap();
            crl.iter_revoked_certificates()
                .map(|r| hex::encode(r.raw_serial()))
                .collect::<Vec<_>>()
        };
        assert!(serials(dir.path()).is_empty(), "init writes an empty list");
        issue(dir.path(), "jetson-1").unwrap();
        issue(dir.path(), "jetson-2").unwrap();
        let revoked = revoke(dir.path(), Some("jetson-2")).unwrap();
        assert_eq!(revoked.len(), 1);
        assert_eq!(serials(dir.path()), vec![revoked[0].serial.clone()]);
        // Again: listed once; without a name, issued again as it is.
        assert_eq!(revoke(dir.path(), Some("jetson-2")).unwrap().len(), 1);
        assert_eq!(revoke(dir.path(), None).unwrap(), revoked);
        assert!(matches!(
            revoke(dir.path(), Some("nobody")),
            Err(PkiError::Io { .. })
        ));
    }

    #[test]
    fn claims_are_told_from_devices_and_csrs_are_signed_only_for_their_own_name() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &["127.0.0.1".into()]).unwrap();
        let claim_id = claim(dir.path(), "batch-1").unwrap();
        assert!(matches!(
            claim(dir.path(), "batch-1"),
            Err(PkiError::Exists(_))
        ));
        claim(dir.path(), "batch-2").unwrap();
        let der = |path: &Path| {
            let pem = std::fs::read(path).unwrap();
            let (_, der) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
            der.contents
        };
        let claim_ca = der(&dir.path().join(CLAIM_CA_FILE));
        assert_eq!(
            claim_name(&claim_ca, &der(&claim_id.cert)).as_deref(),
            Some("batch-1")
        );
        let device = issue(dir.path(), "edge-9").unwrap();
        assert_eq!(claim_name(&claim_ca, &der(&device.cert)), None);

        let issuer = CertIssuer::open(dir.path()).unwrap();
        let key = KeyPair::generate().unwrap();
        let csr_for = |cn: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name = named(cn);
            params.serialize_request(&key).unwrap().pem().unwrap()
        };
        let now = 1_800_000_000;
        let issued = issuer.sign(&csr_for("edge-1"), "edge-1", now, 90).unwrap();
        assert_eq!(issued.not_after, now + 90);
        assert_eq!(issued.public_key, hex::encode(key.public_key_raw()));
        let (_, cert) = x509_parser::pem::parse_x509_pem(issued.pem.as_bytes()).unwrap();
        let cert = cert.parse_x509().unwrap();
        let cn = cert.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), "edge-1");
        assert_eq!(hex::encode(cert.raw_serial()), issued.serial);
        // Another device's name, garbage, a request whose signature does not hold.
        assert!(matches!(
            issuer.sign(&csr_for("edge-2"), "edge-1", now, 90),
            Err(CsrError::OtherName { .. })
        ));
        assert!(matches!(
            issuer.sign("not a csr", "edge-1", now, 90),
            Err(CsrError::Invalid(_))
        ));
        // One character of the last base64 line changed: the signature's bytes.
        let good = csr_for("edge-1");
        let mut lines: Vec<String> = good.lines().map(String::from).collect();
        let body = lines.len() - 2;
        let c = lines[body].remove(1);
        lines[body].insert(1, if c == 'A' { 'B' } else { 'A' });
        let forged = lines.join("\n");
        assert!(matches!(
            issuer.sign(&forged, "edge-1", now, 90),
            Err(CsrError::Invalid(_))
        ));
    }

    #[test]
    fn init_then_issue_makes_a_usable_client_identity() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &["127.0.0.1".into(), "localhost".into()]).unwrap();
        assert!(matches!(init(dir.path(), &[]), Err(PkiError::Exists(_))));
        let id = issue(dir.path(), "jetson-1").unwrap();
        let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
        let (cert, key) = (
            std::fs::read(&id.cert).unwrap(),
            std::fs::read(&id.key).unwrap(),
        );
        modelcast_proto::tls::client_config(
            &ca,
            Some(modelcast_proto::tls::ClientIdentity {
                cert_pem: &cert,
                key_pem: &key,
            }),
        )
        .unwrap();
        assert!(matches!(
            issue(dir.path(), "a/b"),
            Err(PkiError::BadName(_))
        ));
        assert!(matches!(
            issue(dir.path(), "broker"),
            Err(PkiError::BadName(_))
        ));
    }
}
