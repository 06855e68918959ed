//! The embedded MQTT broker (rumqttd), so one command runs a whole fleet. Any external
//! broker (mosquitto, EMQX, …) can replace it.
//!
//! Without a PKI it listens in plain MQTT on the given address, for loopback demos and
//! tests: anyone who reaches it may do anything.
//!
//! With a PKI, devices connect to the broker's front ([`front`]), which speaks TLS with client
//! certificates of the fleet CA, binds each client id to its certificate's common name and
//! confines each device to its own topics by the same rules as mosquitto's generated ACL
//! ([`policy`]); rumqttd itself listens on loopback only and admits only the front and the
//! fleet server, by a secret made at each start.

pub mod front;
pub mod policy;

use std::collections::HashMap;
use std::net::SocketAddr;

use std::path::Path;
use std::sync::Arc;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Largest MQTT payload the embedded broker accepts: a 4 MiB chunk plus framing.
pub const MAX_PAYLOAD: usize = 4 * 1024 * 1024 + 64 * 1024;

/// rumqttd's configuration: one plain MQTT 3.1.1 listener on `listen`.
fn config(listen: SocketAddr) -> Config {
    let server = ServerSettings {
        name: "modelcast-v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: MAX_PAYLOAD,
            max_inflight_count: 256,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 256,
            // The router keeps a commit log per filter: bound it (chunks are large). Each
            // device has its own chunk topic, so this is per device that downloads: up to
            // 64 MiB, enough for an agent's default window (64 chunks of 256 KiB) without
            // losing chunks to the log's rollover, but 1,000 devices fetching an 8 MB model at
            // once took the server to 20 GB (bench-fleet). Large fleets: mosquitto.
            max_segment_size: 16 * 1024 * 1024,
            max_segment_count: 4,
            ..Default::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    }
}

/// The embedded broker's limits and rules.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// Where devices connect.
    pub listen: SocketAddr,
    /// The transport PKI (`ca.pem`, `broker.pem`, `broker.key`): TLS through the front.
    pub pki: Option<std::path::PathBuf>,
    /// The topic prefix.
    pub prefix: String,
    /// Identities of the fleet's servers (not confined to a device's topics).
    pub servers: Vec<String>,
    /// Device connections at once (the front's cap, apart from the API's).
    pub max_connections: usize,
    /// From accept to a checked CONNECT.
    pub connect_timeout: std::time::Duration,
}

/// Where the fleet server's own link reaches a started embedded broker.
#[derive(Debug, Clone)]
pub struct Embedded {
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// The password of the loopback listener behind the front (with a PKI); the user name
    /// is the client id.
    pub secret: Option<String>,
}

/// Starts the broker on its own threads (and, with a PKI, its front as a task of the
/// current runtime, until `stop`); it runs until the process exits.
pub fn start(
    cfg: &EmbeddedConfig,
    stats: Arc<front::FrontStats>,
    drops: Arc<crate::budget::Drops>,
    quarantines: Arc<crate::quarantine::Quarantines>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<Embedded> {
    let Some(pki) = &cfg.pki else {
        start_rumqttd(config(cfg.listen))?;
        return Ok(Embedded {
            host: cfg.listen.ip().to_string(),
            port: cfg.listen.port(),
            secret: None,
        });
    };
    let tls = Arc::new(FrontTls::new(pki)?);
    // Bind the devices' address first: a taken port fails here, clearly.
    let std_listener = std::net::TcpListener::bind(cfg.listen)?;
    std_listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(std_listener)?;
    let internal = {
        let probe = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
        probe.local_addr()?
    };
    let mut raw = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut raw);
    let secret: Arc<str> = hex::encode(raw).into();
    let mut rumqttd = config(internal);
    for server in rumqttd.v4.iter_mut().flat_map(|v| v.values_mut()) {
        let secret = secret.clone();
        server.connections.set_auth_handler(
            move |client_id: String, user: String, pass: String| {
                let ok = user == client_id && constant_time_eq(pass.as_bytes(), secret.as_bytes());
                async move { ok }
            },
        );
    }
    start_rumqttd(rumqttd)?;
    let front_cfg = front::FrontConfig {
        tls,
        internal,
        secret: secret.clone(),
        policy: policy::Policy::new(&cfg.prefix, &cfg.servers),
        max_connections: cfg.max_connections,
        connect_timeout: cfg.connect_timeout,
        quarantines,
    };
    tokio::spawn(front::run(listener, front_cfg, stats, drops, stop));
    Ok(Embedded {
        host: internal.ip().to_string(),
        port: internal.port(),
        secret: Some(secret.to_string()),
    })
}

fn start_rumqttd(config: Config) -> std::io::Result<()> {
    // Fail early and clearly if the port is taken: rumqttd would only log it.
    for server in config.v4.iter().flat_map(|v| v.values()) {
        drop(std::net::TcpListener::bind(server.listen)?);
    }
    let mut broker = Broker::new(config);
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })?;
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The front's TLS configuration, made again when the revocation list in the PKI directory
/// changes (`modelcast devices revoke`) or a claim CA appears (`modelcast pki claim`): a
/// revoked certificate is refused from the next connection on, without a restart.
pub struct FrontTls {
    dir: std::path::PathBuf,
    /// The files' modification times the configuration was made with, and the configuration.
    current: std::sync::Mutex<(Watched, Arc<Trust>)>,
}

/// The modification times of the revocation list and the claim CA.
type Watched = (Option<std::time::SystemTime>, Option<std::time::SystemTime>);

/// What the front's TLS trusts.
pub struct Trust {
    /// The server configuration: fleet and claim CAs as roots, the revocation list.
    pub config: Arc<rustls::ServerConfig>,
    /// The claim CA's certificate (DER), if there is one: a client certificate it issued
    /// is a claim ([`crate::pki::claim_name`]).
    pub claim_ca: Option<Vec<u8>>,
}

impl FrontTls {
    fn new(dir: &Path) -> std::io::Result<Self> {
        let watched = watched(dir);
        Ok(FrontTls {
            dir: dir.to_path_buf(),
            current: std::sync::Mutex::new((watched, Arc::new(server_tls(dir)?))),
        })
    }

    /// The trust for a new connection (one `stat` of each watched file each time).
    pub fn trust(&self) -> Arc<Trust> {
        let now = watched(&self.dir);
        let mut current = self.current.lock().expect("front TLS lock");
        if current.0 != now {
            match server_tls(&self.dir) {
                Ok(trust) => {
                    tracing::info!(dir = %self.dir.display(), "revocation list and claim CA read again");
                    *current = (now, Arc::new(trust));
                }
                // The list being replaced, or damaged: the configuration made before stays.
                Err(e) => {
                    tracing::warn!(error = %e, "revocation list not read; the previous one applies")
                }
            }
        }
        current.1.clone()
    }
}

fn watched(dir: &Path) -> Watched {
    let modified = |f: &str| {
        std::fs::metadata(dir.join(f))
            .and_then(|m| m.modified())
            .ok()
    };
    (
        modified(crate::pki::CRL_FILE),
        modified(crate::pki::CLAIM_CA_FILE),
    )
}

/// TLS for the front: the broker's certificate, and client certificates of the fleet CA (or
/// the claim CA, if there is one) required, none that the revocation list (`crl.pem`, if
/// there is one) names.
fn server_tls(dir: &Path) -> std::io::Result<Trust> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
    let invalid = |what: &str, e: &dyn std::fmt::Display| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {what}: {e}", dir.display()),
        )
    };
    let read = |f: &str| {
        std::fs::read(dir.join(f))
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.join(f).display())))
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&read("ca.pem")?) {
        let cert = cert.map_err(|e| invalid("ca.pem", &e))?;
        roots.add(cert).map_err(|e| invalid("ca.pem", &e))?;
    }
    let claim = crate::pki::CLAIM_CA_FILE;
    let claim_ca = match std::fs::read(dir.join(claim)) {
        Ok(pem) => {
            let der = CertificateDer::from_pem_slice(&pem).map_err(|e| invalid(claim, &e))?;
            roots.add(der.clone()).map_err(|e| invalid(claim, &e))?;
            Some(der.to_vec())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let chain = CertificateDer::pem_slice_iter(&read("broker.pem")?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("broker.pem", &e))?;
    let key = PrivateKeyDer::from_pem_slice(&read("broker.key")?)
        .map_err(|e| invalid("broker.key", &e))?;
    let crls = match std::fs::read(dir.join(crate::pki::CRL_FILE)) {
        Ok(pem) => CertificateRevocationListDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(crate::pki::CRL_FILE, &e))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    );
    if !crls.is_empty() {
        verifier = verifier
            .with_crls(crls)
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status();
    }
    let verifier = verifier.build().map_err(|e| invalid("ca.pem", &e))?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("TLS", &e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| invalid("broker.pem", &e))?;
    Ok(Trust {
        config: Arc::new(config),
        claim_ca,
    })
}
