//! `modelcast-server`: the fleet server with its embedded broker.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use modelcast_server::ServerConfig;

/// The modelcast fleet server.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Directory of the server's store.
    #[arg(long, env = "MODELCAST_DATA_DIR", default_value = "./modelcast-data")]
    data_dir: PathBuf,
    /// The store: a PostgreSQL URL (`postgres://user@host/db`), shared by server replicas.
    /// Without it the server keeps an embedded store in `--data-dir`.
    #[arg(long, env = "MODELCAST_DATABASE")]
    database: Option<String>,
    /// Directory with `server.key` and `root.json` (from `modelcast keygen`).
    #[arg(long, env = "MODELCAST_KEYS", default_value = "./keys")]
    keys: PathBuf,
    /// Operator API address.
    #[arg(long, env = "MODELCAST_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Use an external broker (`mqtt://host:port`, or `mqtts://host:port` with `--pki`)
    /// instead of the embedded one.
    #[arg(long, env = "MODELCAST_BROKER")]
    broker: Option<String>,
    /// Where the embedded broker listens.
    #[arg(long, env = "MODELCAST_MQTT_LISTEN", default_value = "127.0.0.1:1883")]
    mqtt_listen: SocketAddr,
    /// Topic prefix.
    #[arg(long, env = "MODELCAST_TOPIC_PREFIX", default_value = "modelcast")]
    topic_prefix: String,
    /// Transport PKI directory (`modelcast pki init`): the embedded broker then speaks TLS
    /// only, with client certificates; required for an `mqtts://` external broker.
    #[arg(long, env = "MODELCAST_PKI")]
    pki: Option<PathBuf>,
    /// The server's MQTT identity: its client certificate's common name in the PKI.
    #[arg(long, env = "MODELCAST_MQTT_IDENTITY", default_value = modelcast_server::pki::SERVER_IDENTITY)]
    mqtt_identity: String,
    /// API token file (`modelcast token create`): every API call then needs a bearer token
    /// with the role it requires. Without it the API is open (loopback demos and tests).
    #[arg(long, env = "MODELCAST_TOKENS")]
    tokens: Option<PathBuf>,
    /// `control` (the default) does everything; `chunks` runs a replica that answers its
    /// share of the devices' chunk requests beside a control server, sharing its
    /// `--database` and `--broker` (give it its own `--mqtt-identity`).
    #[arg(long, env = "MODELCAST_ROLE", value_enum, default_value = "control")]
    role: modelcast_server::fleet::Role,
    /// Days the fleet's telemetry is kept.
    #[arg(long, env = "MODELCAST_TELEMETRY_RETENTION_DAYS", default_value_t = modelcast_server::telemetry::DEFAULT_RETENTION_DAYS)]
    telemetry_retention_days: u64,
    /// Requests a drift sample needs (a device's telemetry is pooled until it has this many).
    #[arg(long, env = "MODELCAST_DRIFT_MIN_REQUESTS", default_value_t = 100)]
    drift_min_requests: u64,
    /// Samples that make a device's baseline for a model version (its first ones).
    #[arg(long, env = "MODELCAST_DRIFT_BASELINE_SAMPLES", default_value_t = 5)]
    drift_baseline_samples: usize,
    /// Act as the control server only while holding the database's control lease (a
    /// PostgreSQL advisory lock); until then wait as a standby, answering health and status.
    /// Run two or more control servers with `--lease` on one `--database` for failover.
    #[arg(long, env = "MODELCAST_LEASE")]
    lease: bool,
    /// Send every chunk on the asking device's own topic instead of publishing chunks that
    /// several devices want once on the artifact's shared topic (`<prefix>/a/<sha256>`),
    /// which every device may read: for fleets whose devices must not read each other's
    /// models.
    #[arg(long, env = "MODELCAST_NO_SHARED_CHUNKS")]
    no_shared_chunks: bool,
    /// Send chunks as they are, never zstd-compressed (by default a chunk that compression
    /// shrinks by a sixteenth or more goes compressed to devices that can inflate it).
    #[arg(long, env = "MODELCAST_NO_CHUNK_COMPRESSION")]
    no_chunk_compression: bool,
    /// Chunk requests answered at once; more wait in a queue of one entry per device and
    /// artifact (asked again while waiting: merged), so that a flood of requests costs
    /// bounded memory.
    #[arg(long, env = "MODELCAST_MAX_CHUNK_REQUESTS", default_value_t = 256)]
    max_chunk_requests: usize,
    /// Largest artifact (model file) the API stores, in bytes; uploads stream to the store,
    /// a larger one is refused with 413. At most 8 GiB (the protocol's bound).
    #[arg(long, env = "MODELCAST_MAX_ARTIFACT_BYTES", default_value_t = modelcast_proto::manifest::MAX_ARTIFACT_BYTES)]
    max_artifact_bytes: u64,
    /// Operator API connections at once (loopback peers get 32 more once they are taken).
    #[arg(long, env = "MODELCAST_HTTP_MAX_CONNECTIONS", default_value_t = 1024)]
    http_max_connections: usize,
    /// Seconds a request's headers may take to arrive.
    #[arg(long, env = "MODELCAST_HTTP_HEADER_TIMEOUT_SECS", default_value_t = 10)]
    http_header_timeout_secs: u64,
    /// Device connections the embedded broker takes at once (with `--pki`; apart from the
    /// API's).
    #[arg(long, env = "MODELCAST_MQTT_MAX_CONNECTIONS", default_value_t = 10_000)]
    mqtt_max_connections: usize,
    /// Seconds a device connecting to the embedded broker (with `--pki`) has for its TLS
    /// handshake and CONNECT.
    #[arg(
        long,
        env = "MODELCAST_MQTT_CONNECT_TIMEOUT_SECS",
        default_value_t = 10
    )]
    mqtt_connect_timeout_secs: u64,
    /// Identity of another fleet server (a chunk replica) connecting to the embedded broker
    /// (repeatable): not confined to a device's topics.
    #[arg(
        long = "broker-server-identity",
        env = "MODELCAST_BROKER_SERVER_IDENTITIES",
        value_delimiter = ','
    )]
    broker_server_identities: Vec<String>,
    /// Enrol devices that ask over a claim credential (`modelcast pki claim`) and renew
    /// device certificates: the fleet CA's key in `--pki` signs them. Devices no
    /// `--enrol-auto` rule matches wait for `modelcast devices accept|reject`.
    #[arg(long, env = "MODELCAST_ENROL")]
    enrol: bool,
    /// A rule that enrols matching devices at once (repeatable): `claim=<batch>` and/or
    /// `<label>=<value>`, comma-separated, all of which must match.
    #[arg(
        long = "enrol-auto",
        env = "MODELCAST_ENROL_AUTO",
        value_delimiter = ';'
    )]
    enrol_auto: Vec<modelcast_server::enrol::AutoRule>,
    /// How long device certificates are valid (`30d`, `12h`, `90s`); agents renew them
    /// after two thirds of that.
    #[arg(long, env = "MODELCAST_CERT_VALIDITY", default_value = "30d", value_parser = humantime::parse_duration)]
    cert_validity: std::time::Duration,
    /// A device whose certificate ran out while it was offline, asking again over its
    /// claim: `reenrol` (a new certificate for the key it holds), `hold` (for an operator)
    /// or `refuse`.
    #[arg(
        long,
        env = "MODELCAST_ENROL_EXPIRED",
        value_enum,
        default_value = "hold"
    )]
    enrol_expired: modelcast_server::enrol::Expired,
    /// Devices waiting for an operator's decision, at most: past this a new device asking
    /// over a claim is refused (`unavailable`) until operators accept or reject some.
    #[arg(
        long,
        env = "MODELCAST_ENROL_MAX_PENDING",
        default_value_t = modelcast_server::enrol::DEFAULT_MAX_PENDING
    )]
    enrol_max_pending: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttd=warn,sled=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let cfg = ServerConfig {
        data_dir: args.data_dir,
        database: args.database,
        keys_dir: args.keys,
        broker: args.broker,
        mqtt_listen: args.mqtt_listen,
        topic_prefix: args.topic_prefix,
        pki: args.pki,
        mqtt_identity: args.mqtt_identity,
        tokens: args.tokens,
        role: args.role,
        lease: args.lease,
        enrol: args.enrol.then(|| modelcast_server::enrol::EnrolPolicy {
            auto: args.enrol_auto,
            valid_secs: i64::try_from(args.cert_validity.as_secs())
                .unwrap_or(i64::MAX)
                .max(10),
            expired: args.enrol_expired,
            max_pending: args.enrol_max_pending,
        }),
        shared_chunks: !args.no_shared_chunks,
        compress_chunks: !args.no_chunk_compression,
        max_chunk_requests: args.max_chunk_requests.max(1),
        max_artifact_bytes: args.max_artifact_bytes,
        http: modelcast_server::http::HttpLimits {
            max_connections: args.http_max_connections,
            header_timeout: std::time::Duration::from_secs(args.http_header_timeout_secs.max(1)),
            ..Default::default()
        },
        mqtt: modelcast_server::MqttLimits {
            max_connections: args.mqtt_max_connections.max(1),
            connect_timeout: std::time::Duration::from_secs(args.mqtt_connect_timeout_secs.max(1)),
            servers: args.broker_server_identities,
        },
        monitoring: modelcast_server::Monitoring {
            retention_days: args.telemetry_retention_days,
            drift: modelcast_server::drift::DriftConfig {
                min_requests: args.drift_min_requests,
                baseline_samples: args.drift_baseline_samples,
                ..Default::default()
            },
        },
    };
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    modelcast_server::run(cfg, listener, shutdown).await?;
    Ok(())
}
