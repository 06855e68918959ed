//! modelcast-server: the fleet server and the operators' tooling.
//!
//! - [`broker`]: the embedded MQTT broker (rumqttd).
//! - [`db`]: the server's sled store — artifacts, registry, repository, devices, deployments.
//! - [`repo`]: the TUF repository (snapshot/timestamp signing) and the Uptane director.
//! - [`fleet`]: MQTT traffic — reports in, chunks and desired states out.
//! - [`group`]: label selectors for device groups.
//! - [`api`]: the operators' HTTP API.
//! - [`keyset`], [`publish`], [`onnx`], [`client`]: the operators' side — keys, manifests,
//!   example models and the API client the `modelcast` CLI uses.

pub mod api;
pub mod broker;
pub mod client;
pub mod db;
pub mod fleet;
pub mod group;
pub mod keyset;
pub mod onnx;
pub mod publish;
pub mod repo;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;

use thiserror::Error;

/// Unix seconds now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where the store lives.
    pub data_dir: PathBuf,
    /// Directory holding `server.key` and `root.json`.
    pub keys_dir: PathBuf,
    /// External broker (`mqtt://host:port`); `None` embeds one.
    pub broker: Option<String>,
    /// Where the embedded broker listens.
    pub mqtt_listen: SocketAddr,
    /// Topic prefix.
    pub topic_prefix: String,
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
}

/// Runs the server on `listener` until `shutdown` completes.
pub async fn run(
    cfg: ServerConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let db = db::Db::open(&cfg.data_dir.join("store"))?;
    let root = keyset::read_root(&cfg.keys_dir.join("root.json"))?;
    let online = keyset::read_key(&cfg.keys_dir.join("server.key"))?;
    let repo = repo::Repository::new(db.clone(), root, online)?;
    let (host, port) = match &cfg.broker {
        Some(url) => {
            modelcast_proto::parse_broker_url(url).map_err(|e| ServerError::Io(e.to_string()))?
        }
        None => {
            broker::start(cfg.mqtt_listen).map_err(|e| {
                ServerError::Io(format!("embedded broker on {}: {e}", cfg.mqtt_listen))
            })?;
            tracing::info!(addr = %cfg.mqtt_listen, "embedded MQTT broker listening");
            (cfg.mqtt_listen.ip().to_string(), cfg.mqtt_listen.port())
        }
    };
    let topics = modelcast_proto::topic::Topics::new(&cfg.topic_prefix);
    let fleet = fleet::Fleet::start(db.clone(), repo, topics, &host, port);
    let app = api::router(fleet);
    tracing::info!(addr = ?listener.local_addr().ok(), "operator API listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| ServerError::Io(e.to_string()))?;
    db.flush().await?;
    Ok(())
}
