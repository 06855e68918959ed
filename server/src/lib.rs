//! modelcast-server: the fleet server daemon. It runs no model and links no inference engine;
//! the operators' tooling (the `modelcast` CLI, conversion, publishing, offline signing, the
//! API client) is the `modelcast-ops` crate beside it (`server/ops/`).
//!
//! - [`broker`]: the embedded MQTT broker (rumqttd), plain, or with a PKI behind its TLS front
//!   ([`broker::front`]) that binds client ids to certificates and confines each device to its
//!   topics ([`broker::policy`]).
//! - [`pki`], [`acl`]: the transport PKI (CA, broker and client certificates, claim
//!   credentials, device certificates signed from CSRs) and the mosquitto configuration that
//!   confines each device to its own topics; [`enrol`]: enrolment by claim and renewal, decided
//!   with no I/O ([`fleet`] carries it out).
//! - [`db`]: the server's sled store — artifacts, registry, repository, devices, deployments,
//!   rollouts, audit log.
//! - [`repo`]: the TUF repository (snapshot/timestamp signing, hash bins) and the Uptane
//!   director.
//! - [`fleet`]: MQTT traffic — reports in, chunks and desired states out, rollouts driven,
//!   every task drained at shutdown; [`budget`]: what one device may send per minute, and
//!   what was dropped of each device's traffic; [`quarantine`]: devices an operator cut off;
//!   [`fanout`]: the planner of chunks published once for many devices.
//! - [`registry`]: the model registry's operations — artifacts stored, targets published,
//!   versions promoted and retired, deployments, root rotations — behind the API's handlers.
//! - [`files`]: every stored file over HTTP by its digest, with byte ranges (devices whose
//!   deployment says `http` fetch their chunks there).
//! - [`group`]: label selectors for device groups.
//! - [`rollout`]: the sans-IO rollout planner (waves, abort criteria, auto-rollback).
//! - [`api`], [`auth`], [`audit`]: the operators' HTTP API, its tokens and roles, the
//!   append-only audit log; [`console`]: the operator console (a single-page app built from
//!   `server/console/`, embedded) under `/dashboard`; [`http`]: its server, with bounded connections and a
//!   header timeout.
//! - [`clock`]: the wall clock, read in one place, in one unit (Unix milliseconds).
//! - [`keyset`]: the repository's keys (made by operators, read by the server at start).
//! - [`lease`]: the control lease of servers sharing a PostgreSQL database.
//! - [`drift`], [`telemetry`], [`metrics`]: drift and anomaly detection, the telemetry
//!   queries, `/metrics`.

#![forbid(unsafe_code)]

pub mod acl;
pub mod api;
pub mod audit;
pub mod auth;
pub(crate) mod broker;
pub(crate) mod budget;
pub(crate) mod chunk_queue;
pub(crate) mod clock;
pub mod compress;
pub mod console;
pub mod db;
pub mod drift;
pub mod enrol;
pub(crate) mod fanout;
pub mod files;
pub mod fleet;
pub mod group;
pub mod http;
pub mod keyset;
pub(crate) mod lease;
pub(crate) mod metrics;
pub mod pki;
pub(crate) mod quarantine;
pub(crate) mod registry;
pub mod repo;
pub mod rollout;
pub mod telemetry;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;

use thiserror::Error;

pub use clock::{unix_now, unix_now_ms};

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where the embedded store lives (unless `database` names another).
    pub data_dir: PathBuf,
    /// The store: a `postgres://` URL; `None` keeps an embedded sled store in `data_dir`.
    pub database: Option<String>,
    /// Directory holding `server.key` and `root.json`.
    pub keys_dir: PathBuf,
    /// External broker (`mqtt://host:port`); `None` embeds one.
    pub broker: Option<String>,
    /// Where the embedded broker listens.
    pub mqtt_listen: SocketAddr,
    /// Topic prefix.
    pub topic_prefix: String,
    /// The transport PKI directory (`modelcast pki init`): with it the embedded broker speaks
    /// TLS only and the server connects with its client certificate.
    pub pki: Option<PathBuf>,
    /// The server's MQTT identity in the PKI (certificate common name and client id).
    pub mqtt_identity: String,
    /// The API token file; `None` leaves the API open.
    pub tokens: Option<PathBuf>,
    /// What this process does: everything, or its share of chunk requests beside a control
    /// server (which needs `database` and an external `broker`).
    pub role: fleet::Role,
    /// How the fleet's telemetry is kept and watched.
    pub monitoring: Monitoring,
    /// Run as the control server only while holding the database's control lease
    /// ([`lease`]), as a standby until then (needs a PostgreSQL `database`).
    pub lease: bool,
    /// Publish chunks that several devices ask for once on the artifact's shared topic
    /// ([`fanout`]). Every device that may read the shared topics can then read every
    /// artifact published there: turn it off where models must stay confidential between
    /// devices on one broker.
    pub shared_chunks: bool,
    /// Send chunks zstd-compressed where that saves a sixteenth or more ([`compress`]) to
    /// devices that can inflate them, and on the shared topics.
    pub compress_chunks: bool,
    /// Chunk requests answered at once; more are dropped (counted in `/metrics`) until one
    /// ends, and their devices ask again.
    pub max_chunk_requests: usize,
    /// Largest artifact the API stores (uploads are streamed to the store; a larger one
    /// is refused with 413).
    pub max_artifact_bytes: u64,
    /// What the operator API's HTTP server takes (connections, header timeout).
    pub http: http::HttpLimits,
    /// What the embedded broker takes from devices (with a PKI: its front's connection cap
    /// and time to a checked CONNECT, apart from the API's).
    pub mqtt: MqttLimits,
    /// Enrol devices by claim and renew their certificates ([`enrol`]), signing with the CA
    /// key in `pki`; `None` does neither.
    pub enrol: Option<enrol::EnrolPolicy>,
}

/// The embedded broker's limits, with a PKI ([`broker::front`]).
#[derive(Debug, Clone)]
pub struct MqttLimits {
    /// Device connections at once.
    pub max_connections: usize,
    /// Time from accept to a checked CONNECT (TLS handshake included).
    pub connect_timeout: std::time::Duration,
    /// Identities of other fleet servers (chunk replicas) that connect to the embedded
    /// broker: not confined to a device's topics. The server's own is always one.
    pub servers: Vec<String>,
}

impl Default for MqttLimits {
    fn default() -> Self {
        MqttLimits {
            max_connections: 10_000,
            connect_timeout: std::time::Duration::from_secs(10),
            servers: Vec::new(),
        }
    }
}

/// How the server keeps and watches the fleet's telemetry.
#[derive(Debug, Clone)]
pub struct Monitoring {
    /// Days telemetry is kept.
    pub retention_days: u64,
    /// How drift and anomalies are detected.
    pub drift: drift::DriftConfig,
}

impl Default for Monitoring {
    fn default() -> Self {
        Monitoring {
            retention_days: telemetry::DEFAULT_RETENTION_DAYS,
            drift: drift::DriftConfig::default(),
        }
    }
}

/// Why the server could not run.
#[derive(Debug, Error)]
pub enum ServerError {
    /// Keys unusable.
    #[error(transparent)]
    Keys(#[from] keyset::KeyError),
    /// Store failure.
    #[error(transparent)]
    Db(#[from] db::DbError),
    /// Repository inconsistent with the keys.
    #[error(transparent)]
    Repo(#[from] repo::RepoError),
    /// Network setup failed.
    #[error("{0}")]
    Io(String),
    /// The control lease may be another server's now: this one stopped.
    #[error("control lease lost: {0}")]
    LeaseLost(String),
}

/// The server's TLS client configuration from the PKI directory.
fn client_tls(dir: &std::path::Path, identity: &str) -> Result<rustls::ClientConfig, ServerError> {
    let read = |p: PathBuf| {
        std::fs::read(&p).map_err(|e| ServerError::Io(format!("{}: {e}", p.display())))
    };
    let id = pki::Identity::in_dir(dir, identity);
    let (ca, cert, key) = (read(dir.join("ca.pem"))?, read(id.cert)?, read(id.key)?);
    modelcast_proto::tls::client_config(
        &ca,
        Some(modelcast_proto::tls::ClientIdentity {
            cert_pem: &cert,
            key_pem: &key,
        }),
    )
    .map_err(|e| ServerError::Io(e.to_string()))
}

/// Runs the server on `listener` until `shutdown` completes.
pub async fn run(
    cfg: ServerConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    if cfg.role == fleet::Role::Chunks && (cfg.database.is_none() || cfg.broker.is_none()) {
        return Err(ServerError::Io(
            "a chunk replica shares the control server's PostgreSQL database and broker: \
             give --database and --broker"
                .into(),
        ));
    }
    if !(1..=modelcast_proto::manifest::MAX_ARTIFACT_BYTES).contains(&cfg.max_artifact_bytes) {
        return Err(ServerError::Io(format!(
            "--max-artifact-bytes must be 1..={}",
            modelcast_proto::manifest::MAX_ARTIFACT_BYTES
        )));
    }
    // Open mode is for one box: an open operator API is never offered to the network
    // (checked before anything starts; a chunk replica's API only reads).
    let exposed = listener
        .local_addr()
        .map(|a| !a.ip().is_loopback())
        .unwrap_or(true);
    if cfg.role == fleet::Role::Control && cfg.tokens.is_none() && exposed {
        return Err(ServerError::Io(
            "without --tokens the operator API listens on loopback only: give --tokens \
             (modelcast token create), or --listen 127.0.0.1:PORT"
                .into(),
        ));
    }
    match http::raise_open_files() {
        Some(n) => tracing::info!(open_files = n, "open-file limit"),
        None => tracing::warn!("the open-file limit could not be read"),
    }
    let mut stopping = stop_signal(shutdown);
    let (listener, lease) = if cfg.lease {
        match standby(&cfg, listener, &mut stopping).await? {
            Some(held) => held,
            None => return Ok(()),
        }
    } else {
        (listener, None)
    };
    let lost = async move {
        match lease {
            Some(lease) => lease.lost().await,
            None => std::future::pending().await,
        }
    };
    let db = match &cfg.database {
        Some(url) => db::connect(url).await?,
        None => db::open_embedded(&cfg.data_dir.join("store"))?,
    };
    let root = keyset::read_root(&cfg.keys_dir.join("root.json"))?;
    let online = keyset::read_key(&cfg.keys_dir.join("server.key"))?;
    let repo = repo::Repository::new(db.clone(), root, online)
        .await?
        .with_escrow(keyset::escrow_key(&cfg.keys_dir)?);
    let drops = std::sync::Arc::new(budget::Drops::default());
    let quarantines =
        std::sync::Arc::new(quarantine::Quarantines::from_records(db.devices().await?));
    let front_stats = std::sync::Arc::new(broker::front::FrontStats::default());
    let (broker, secret) = match &cfg.broker {
        Some(url) => (
            modelcast_proto::BrokerUrl::parse(url).map_err(|e| ServerError::Io(e.to_string()))?,
            None,
        ),
        None => {
            let mut servers = vec![cfg.mqtt_identity.clone()];
            servers.extend(cfg.mqtt.servers.iter().cloned());
            let embedded = broker::EmbeddedConfig {
                listen: cfg.mqtt_listen,
                pki: cfg.pki.clone(),
                prefix: cfg.topic_prefix.clone(),
                servers,
                max_connections: cfg.mqtt.max_connections,
                connect_timeout: cfg.mqtt.connect_timeout,
            };
            let started = broker::start(
                &embedded,
                front_stats.clone(),
                drops.clone(),
                quarantines.clone(),
                stopping.clone(),
            )
            .map_err(|e| ServerError::Io(format!("embedded broker on {}: {e}", cfg.mqtt_listen)))?;
            tracing::info!(addr = %cfg.mqtt_listen, tls = cfg.pki.is_some(), "embedded MQTT broker listening");
            let url = modelcast_proto::BrokerUrl {
                host: started.host,
                port: started.port,
                tls: false,
            };
            (url, started.secret)
        }
    };
    let tls = match (&cfg.pki, broker.tls) {
        (Some(dir), true) => Some(client_tls(dir, &cfg.mqtt_identity)?),
        (None, true) => {
            return Err(ServerError::Io(
                "an mqtts:// broker needs --pki (the CA and the server's client certificate)"
                    .into(),
            ))
        }
        (_, false) => None,
    };
    let enroller =
        match (&cfg.enrol, &cfg.pki) {
            (None, _) => None,
            (Some(policy), Some(dir)) => Some(std::sync::Arc::new(enrol::Enroller {
                policy: policy.clone(),
                issuer: pki::CertIssuer::open(dir).map_err(|e| ServerError::Io(e.to_string()))?,
                pki_dir: dir.clone(),
            })),
            (Some(_), None) => return Err(ServerError::Io(
                "--enrol needs --pki (the fleet CA's certificate and key sign device certificates)"
                    .into(),
            )),
        };
    let link = fleet::BrokerLink {
        host: broker.host,
        port: broker.port,
        client_id: cfg.mqtt_identity.clone(),
        tls,
        password: secret,
        shared_chunks: cfg.shared_chunks,
        compress_chunks: cfg.compress_chunks,
        max_chunk_requests: cfg.max_chunk_requests,
        topics: modelcast_proto::topic::Topics::new(&cfg.topic_prefix),
    };
    let (fleet, running) = fleet::Fleet::start(
        db.clone(),
        repo,
        link,
        cfg.role,
        cfg.monitoring,
        fleet::Guards {
            drops,
            quarantines,
            front: (cfg.broker.is_none() && cfg.pki.is_some()).then_some(front_stats),
            enroller,
        },
        stopping.clone(),
    )
    .await?;
    let shutdown = {
        let mut stopping = stopping.clone();
        async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        }
    };
    if cfg.role == fleet::Role::Chunks {
        tracing::info!(addr = ?listener.local_addr().ok(), identity = %cfg.mqtt_identity, "chunk replica: answering its share of chunk requests");
        axum::serve(listener, api::replica_router(fleet.clone()))
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|e| ServerError::Io(e.to_string()))?;
        log_drained(running.drained().await, &fleet);
        return Ok(());
    }
    let tokens = match &cfg.tokens {
        Some(path) => {
            let tokens = auth::Tokens::load(path).map_err(|e| ServerError::Io(e.to_string()))?;
            if tokens.tokens.is_empty() {
                tracing::warn!(path = %path.display(), "the token file holds no token: every API call will be refused");
            }
            Some(tokens)
        }
        None => {
            tracing::warn!("no --tokens: the operator API is open to every local user");
            None
        }
    };
    let limits = api::ApiLimits {
        max_artifact_bytes: cfg.max_artifact_bytes,
    };
    let app = api::router(fleet.clone(), tokens, limits);
    tracing::info!(
        addr = ?listener.local_addr().ok(),
        max_connections = cfg.http.max_connections,
        header_timeout_s = cfg.http.header_timeout.as_secs(),
        "operator API listening"
    );
    let stats = std::sync::Arc::new(http::HttpStats::default());
    let serving = http::serve(listener, app, cfg.http, stats, shutdown);
    tokio::select! {
        served = serving => served.map_err(|e| ServerError::Io(e.to_string()))?,
        reason = lost => {
            tracing::error!(%reason, "control lease lost: stopping so that one control server acts");
            return Err(ServerError::LeaseLost(reason));
        }
    }
    log_drained(running.drained().await, &fleet);
    db.flush().await?;
    Ok(())
}

/// Says what the fleet's drain at shutdown finished, and what it sent in all.
fn log_drained(drained: fleet::Drained, fleet: &fleet::Fleet) {
    let fleet::Drained {
        tasks,
        queued,
        complete,
        elapsed,
    } = drained;
    let ms = elapsed.as_millis() as u64;
    let sent = fleet.status().chunk_requests;
    let (chunks_sent, chunk_bytes_sent) = (sent.chunks, sent.bytes);
    if complete {
        tracing::info!(
            tasks,
            queued,
            ms,
            chunks_sent,
            chunk_bytes_sent,
            "fleet drained: every task finished, the broker link closed"
        );
    } else {
        tracing::warn!(
            tasks,
            queued,
            ms,
            chunks_sent,
            chunk_bytes_sent,
            "fleet not fully drained: what was left is dropped"
        );
    }
}

/// Turns the shutdown future into a flag that several waits can watch.
fn stop_signal(
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    rx
}

/// Waits as a standby until this server holds the control lease, answering health and
/// status (role `standby`) on the API's address meanwhile. Returns the listener and the
/// lease, or `None` if the server was told to stop first.
async fn standby(
    cfg: &ServerConfig,
    listener: tokio::net::TcpListener,
    stopping: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<Option<(tokio::net::TcpListener, Option<lease::Lease>)>, ServerError> {
    let (Some(url), fleet::Role::Control) = (&cfg.database, cfg.role) else {
        return Err(ServerError::Io(
            "--lease is for control servers sharing a PostgreSQL --database".into(),
        ));
    };
    let io = |e: std::io::Error| ServerError::Io(format!("the API socket: {e}"));
    // The standby's API answers on a duplicate of the socket, dropped when the lease is
    // taken; connections that arrive meanwhile wait in the socket's backlog.
    let socket = listener.into_std().map_err(io)?;
    let waiting = tokio::net::TcpListener::from_std(socket.try_clone().map_err(io)?).map_err(io)?;
    let listener = tokio::net::TcpListener::from_std(socket).map_err(io)?;
    let (taken_tx, taken_rx) = tokio::sync::oneshot::channel::<()>();
    let router = api::standby_router(cfg.mqtt_identity.clone());
    let standby_api = tokio::spawn(async move {
        axum::serve(waiting, router)
            .with_graceful_shutdown(async {
                let _ = taken_rx.await;
            })
            .await
    });
    let acquired = tokio::select! {
        lease = lease::Lease::acquire(url, || {
            tracing::info!("standby: another server holds the control lease; waiting for it")
        }) => lease?,
        _ = stopping.wait_for(|stop| *stop) => return Ok(None),
    };
    let _ = taken_tx.send(());
    let _ = standby_api.await;
    Ok(Some((listener, Some(acquired))))
}
