//! The server's MQTT side: device reports and online status in, chunk replies (on devices'
//! own topics, or once on an artifact's shared topic: [`crate::fanout`]) and retained desired
//! states out. Handlers run off the event loop so it never waits on itself.
//!
//! It also drives the rollouts ([`crate::rollout`]): device reports and a one-second clock go
//! to each running rollout; every change is persisted (flushed) before its new desired states
//! are published.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use modelcast_proto::topic::Topics;
use rumqttc::{AsyncClient, MqttOptions, TlsConfiguration, Transport};
use tokio::sync::Mutex;

use crate::db::{Db, DbError};
use crate::drift::Detectors;
use crate::fanout::Fanout;
use crate::repo::Repository;
use crate::rollout::Rollouts;

mod alerts;
mod chunks;
mod desired;
mod devices;
mod enrol;
mod link;
mod reports;
mod rollouts;
mod telemetry;

/// Requests queued in the server's MQTT client for its link.
const CLIENT_QUEUE: usize = 64;

/// How long the broker link may go without taking a write or answering a ping (the MQTT
/// keep-alive and the client's write timeout) before the server drops and reopens it.
const LINK_PATIENCE_SECS: u64 = 30;

pub use desired::Wanted;
pub use enrol::EnrolmentError;
pub use link::{Drained, DRAIN_TIMEOUT};
pub use rollouts::{RolloutAction, RolloutError};

/// Why a device's message (state report, online status, telemetry) was not taken; logged.
#[derive(Debug, thiserror::Error)]
enum Rejected {
    /// It does not decode.
    #[error(transparent)]
    Decode(#[from] modelcast_proto::error::DecodeError),
    /// It names another device than the topic it came on.
    #[error("{kind} names {named:?} on another device's topic")]
    WrongDevice {
        /// What it is.
        kind: &'static str,
        /// The device it names.
        named: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] DbError),
    /// Publishing the device's desired state failed.
    #[error(transparent)]
    Repository(#[from] crate::repo::RepoError),
    /// A decoded telemetry report was refused.
    #[error(transparent)]
    Telemetry(#[from] telemetry::Refused),
}

/// The fleet's tasks, running until the stop signal given to [`Fleet::start`].
pub struct Running {
    supervisor: tokio::task::JoinHandle<Drained>,
}

impl Running {
    /// Waits until the fleet's tasks have stopped and drained (at most [`DRAIN_TIMEOUT`]
    /// after the stop signal): what it finished.
    pub async fn drained(self) -> Drained {
        self.supervisor.await.unwrap_or_default()
    }
}

/// Where and as whom the server connects to the broker.
pub struct BrokerLink {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// MQTT client id; with mosquitto's `use_username_as_clientid` it must equal the
    /// certificate's common name.
    pub client_id: String,
    /// TLS client configuration (with the server's certificate), for `mqtts://`.
    pub tls: Option<rustls::ClientConfig>,
    /// A password (the user name is the client id): the embedded broker's secret, when the
    /// server reaches it on loopback behind its TLS front.
    pub password: Option<String>,
    /// Publish a chunk asked for by several devices once on its artifact's shared topic
    /// ([`crate::fanout`]); off, every chunk goes on the asking device's own topic.
    pub shared_chunks: bool,
    /// Send chunks compressed where it saves bytes ([`crate::compress`]).
    pub compress_chunks: bool,
    /// Chunk requests answered at once; more are dropped (and counted) until one ends, and
    /// their devices ask again.
    pub max_chunk_requests: usize,
    /// The topics under the fleet's prefix.
    pub topics: Topics,
}

/// What the fleet shares with the embedded broker's front: what was dropped of each device's
/// traffic, the quarantines both enforce, and what the front did (when the server has one).
#[derive(Debug, Default, Clone)]
pub struct Guards {
    /// Per device, by reason.
    pub drops: Arc<crate::budget::Drops>,
    /// Quarantined devices (loaded from the database at start).
    pub quarantines: Arc<crate::quarantine::Quarantines>,
    /// The front's connections.
    pub front: Option<Arc<crate::broker::front::FrontStats>>,
    /// Enrols devices by claim and renews their certificates, when the server was asked to
    /// (`--enrol`).
    pub enroller: Option<Arc<crate::enrol::Enroller>>,
}

/// What a server process does in a fleet served by several.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything: the operator API, device reports, desired states, rollouts, and chunks.
    /// One per fleet.
    #[default]
    Control,
    /// Chunks only: a replica that answers its share of the devices' chunk requests (an MQTT
    /// shared subscription) from the shared PostgreSQL store. Any number per fleet.
    Chunks,
}

/// What a server has done for the devices' chunk requests since it started.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ChunkStats {
    /// Requests answered.
    pub requests: u64,
    /// Chunks sent (on devices' own topics and shared topics).
    pub chunks: u64,
    /// Their data on the wire, bytes (compressed where it was).
    #[serde(default)]
    pub bytes: u64,
    /// The chunks' own bytes, before compression: `raw_bytes - bytes` is what compression
    /// saved.
    #[serde(default)]
    pub raw_bytes: u64,
    /// Of those, the ones published on an artifact's shared topic, once for every device
    /// listening there.
    #[serde(default)]
    pub shared: u64,
    /// Chunks asked for and not sent, because a copy on the shared topic was on its way.
    #[serde(default)]
    pub skipped: u64,
    /// Requests refused (artifact not deployed to the device, or undecodable).
    pub refused: u64,
    /// Chunks asked for on a device's own topic beyond its budget
    /// ([`crate::budget::FIRST_ASKS`], [`crate::budget::ASKED_AGAIN`]): not sent (the device
    /// asks again later).
    #[serde(default)]
    pub over_budget: u64,
    /// Requests dropped because the queue of waiting requests was full (the device asks
    /// again).
    #[serde(default)]
    pub busy: u64,
    /// Requests waiting for one of the `limit` answering slots (one per device and artifact:
    /// a device asking again while it waits has its request merged).
    #[serde(default)]
    pub waiting: u64,
    /// Requests merged into the waiting request of the same device and artifact.
    #[serde(default)]
    pub merged: u64,
    /// Requests being answered now.
    #[serde(default)]
    pub in_flight: u64,
    /// Requests answered at once, at most (`--max-chunk-requests`).
    #[serde(default)]
    pub limit: u64,
}

/// What a server has done with the devices' telemetry reports since it started.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct TelemetryStats {
    /// Reports stored.
    pub stored: u64,
    /// Copies of reports already stored (re-sent by devices), dropped.
    pub duplicates: u64,
    /// Reports that did not decode or named another device, dropped.
    pub rejected: u64,
    /// Reports over their device's budget ([`crate::budget::TELEMETRY`]), dropped unread.
    #[serde(default)]
    pub over_budget: u64,
    /// Sampled requests stored.
    #[serde(default)]
    pub samples_stored: u64,
    /// Sampled requests dropped: the device's deployment does not sample that model (any
    /// more).
    #[serde(default)]
    pub samples_refused: u64,
}

/// A server's role and work, as `GET /api/v1/status` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Status {
    /// `control` or `chunks`.
    pub role: String,
    /// Its MQTT client id.
    pub mqtt_identity: String,
    /// Chunk requests it answered.
    pub chunk_requests: ChunkStats,
    /// Telemetry reports it received (a control server only).
    #[serde(default)]
    pub telemetry: TelemetryStats,
    /// State reports over their device's budget ([`crate::budget::STATE_REPORTS`]), dropped
    /// unread.
    #[serde(default)]
    pub reports_over_budget: u64,
}

/// The fleet: store, repository and the MQTT client.
pub struct Fleet {
    db: Db,
    repo: Repository,
    topics: Topics,
    client: AsyncClient,
    role: Role,
    identity: String,
    requests: std::sync::atomic::AtomicU64,
    /// Chunk requests answered at once, at most.
    max_chunk_requests: usize,
    /// Chunk requests being answered now.
    chunk_requests_in_flight: std::sync::atomic::AtomicU64,
    /// Chunk requests dropped because the queue of waiting ones was full.
    chunk_requests_busy: std::sync::atomic::AtomicU64,
    /// Chunk requests merged into a waiting one.
    chunk_requests_merged: std::sync::atomic::AtomicU64,
    /// Chunk requests waiting for one of the `max_chunk_requests` slots.
    chunk_queue: std::sync::Mutex<crate::chunk_queue::ChunkQueue>,
    /// Told when a chunk request is queued.
    chunk_queued: tokio::sync::Notify,
    chunks: std::sync::atomic::AtomicU64,
    chunk_bytes: std::sync::atomic::AtomicU64,
    chunks_shared: std::sync::atomic::AtomicU64,
    chunks_skipped: std::sync::atomic::AtomicU64,
    /// Which asked chunks go on shared topics; `None` when shared publication is off.
    fanout: Option<std::sync::Mutex<Fanout>>,
    /// Chunks are packed at upload and sent compressed ([`crate::compress`]).
    compress_chunks: bool,
    /// The chunks' own bytes, before compression (`chunk_bytes` is what went on the wire).
    chunk_raw_bytes: std::sync::atomic::AtomicU64,
    /// Wakes the shared publisher when a publication is scheduled.
    fanout_scheduled: tokio::sync::Notify,
    /// When a chunk replica last reloaded the rollouts (at most once a second, whatever a
    /// device asks for).
    reloaded: std::sync::Mutex<Option<std::time::Instant>>,
    /// Where each entitled download's chunks come from: artifact digest (hex) → the files of
    /// the download in order (the artifact, then its golden file), each with its chunk count.
    parts: std::sync::Mutex<BTreeMap<String, chunks::DownloadFiles>>,
    refused: std::sync::atomic::AtomicU64,
    telemetry_stored: std::sync::atomic::AtomicU64,
    telemetry_duplicates: std::sync::atomic::AtomicU64,
    telemetry_rejected: std::sync::atomic::AtomicU64,
    telemetry_over_budget: std::sync::atomic::AtomicU64,
    /// What each device may still send of telemetry this minute.
    telemetry_budgets: std::sync::Mutex<crate::budget::Budgets>,
    /// Chunks asked beyond their device's budget.
    chunks_over_budget: std::sync::atomic::AtomicU64,
    /// State reports beyond their device's budget, and the budgets.
    reports_over_budget: std::sync::atomic::AtomicU64,
    report_budgets: std::sync::Mutex<crate::budget::Budgets>,
    /// Per device: chunks asked the first time, and asked again, sent on its own topic.
    first_asks: std::sync::Mutex<crate::budget::Budgets>,
    asked_again: std::sync::Mutex<crate::budget::Budgets>,
    samples_stored: std::sync::atomic::AtomicU64,
    samples_refused: std::sync::atomic::AtomicU64,
    /// How long telemetry is kept, seconds.
    telemetry_retention_secs: u64,
    /// Drift and anomaly detectors, fed by every new telemetry report.
    drift: std::sync::Mutex<Detectors>,
    publishing: Mutex<()>,
    /// Every rollout as the planner last left it (its decisions included before they are
    /// stored); locked only between awaits.
    rollouts: std::sync::Mutex<Rollouts>,
    /// Every rollout as last stored: what the API and `/metrics` show, so an operator never
    /// sees a decision a crash could take back.
    stored_rollouts: std::sync::Mutex<Rollouts>,
    /// Held while a rollout is decided on and stored, and while the clock stores device
    /// states: no write of a rollout overtakes another.
    persisting: Mutex<()>,
    /// Rollouts whose device states changed without a decision: written by the clock.
    dirty_rollouts: std::sync::Mutex<std::collections::BTreeSet<u64>>,
    /// What was dropped of each device's traffic (shared with the embedded broker's front).
    drops: Arc<crate::budget::Drops>,
    /// The embedded broker's front, if it has one.
    front: Option<Arc<crate::broker::front::FrontStats>>,
    /// Quarantined devices (also in their device records).
    quarantined: Arc<crate::quarantine::Quarantines>,
    /// When each device's `last_seen` was last written because of its telemetry (at most
    /// every [`reports::SEEN_EVERY_SECS`]).
    seen_written: std::sync::Mutex<std::collections::HashMap<String, i64>>,
    /// Enrols devices, if this server does.
    enroller: Option<Arc<crate::enrol::Enroller>>,
    /// Held while an enrolment record is read, decided on and written; it holds how many
    /// devices wait for an operator (counted from the store at the first request).
    enrolling: Mutex<Option<usize>>,
}

impl Fleet {
    /// Whether chunks are packed at upload and sent compressed ([`crate::compress`]).
    pub fn compresses(&self) -> bool {
        self.compress_chunks
    }
}

impl Fleet {
    /// Connects to the broker through `link` and starts handling fleet traffic: all of it in
    /// the [`Role::Control`] role, only its share of chunk requests as a [`Role::Chunks`]
    /// replica. Its tasks run until `stop` turns true; [`Running::drained`] waits for them.
    pub async fn start(
        db: Db,
        repo: Repository,
        link: BrokerLink,
        role: Role,
        monitoring: crate::Monitoring,
        guards: Guards,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(Arc<Fleet>, Running), DbError> {
        let Guards {
            drops,
            quarantines: quarantined,
            front,
            enroller,
        } = guards;
        let rollouts: crate::rollout::Rollouts = db
            .rollouts()
            .await?
            .into_iter()
            .map(|r| (r.id, r))
            .collect();
        let identity = link.client_id.clone();
        let topics = link.topics;
        let fanout = link
            .shared_chunks
            .then(|| std::sync::Mutex::new(Fanout::new()));
        let mut opts = MqttOptions::new(link.client_id.clone(), link.host, link.port);
        if let Some(password) = link.password {
            opts.set_credentials(link.client_id, password);
        }
        if let Some(tls) = link.tls {
            opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(tls),
            )));
        }
        // A broker busy fanning chunks out to thousands of devices may not read the server's
        // socket, nor answer its ping, for seconds: that is load, not a dead link (with 5 s and
        // 15 s, 10,000 devices had the link dropped and every request in flight lost).
        opts.set_keep_alive(Duration::from_secs(LINK_PATIENCE_SECS))
            .set_clean_session(true)
            // Whatever the brokers let a device publish (the embedded one and the generated
            // mosquitto configuration both allow MAX_PAYLOAD), the server can read: a larger
            // message would end its connection, again at every reconnect.
            .set_max_packet_size(
                crate::broker::MAX_PAYLOAD + 1024,
                crate::broker::MAX_PAYLOAD,
            )
            .set_inflight(256);
        // Requests (chunk replies of up to 4 MiB among them) waiting for the link: what the
        // MQTT client holds besides the 256 in flight.
        let (client, mut eventloop) = AsyncClient::new(opts, CLIENT_QUEUE);
        // Small messages (acknowledgements, desired states) go out at once, not held by
        // Nagle's algorithm until earlier ones are acknowledged.
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        network.set_connection_timeout(LINK_PATIENCE_SECS);
        eventloop.set_network_options(network);
        let fleet = Arc::new(Fleet {
            db,
            repo,
            topics,
            client,
            role,
            identity,
            requests: Default::default(),
            max_chunk_requests: link.max_chunk_requests.max(1),
            chunk_requests_in_flight: Default::default(),
            chunk_requests_busy: Default::default(),
            chunk_requests_merged: Default::default(),
            chunk_queue: std::sync::Mutex::new(crate::chunk_queue::ChunkQueue::new(
                crate::chunk_queue::MAX_WAITING,
            )),
            chunk_queued: Default::default(),
            chunks: Default::default(),
            chunk_bytes: Default::default(),
            chunks_shared: Default::default(),
            chunks_skipped: Default::default(),
            fanout,
            compress_chunks: link.compress_chunks,
            chunk_raw_bytes: Default::default(),
            fanout_scheduled: Default::default(),
            reloaded: Default::default(),
            parts: Default::default(),
            refused: Default::default(),
            telemetry_stored: Default::default(),
            telemetry_duplicates: Default::default(),
            samples_stored: Default::default(),
            samples_refused: Default::default(),
            telemetry_rejected: Default::default(),
            telemetry_over_budget: Default::default(),
            chunks_over_budget: Default::default(),
            reports_over_budget: Default::default(),
            report_budgets: std::sync::Mutex::new(crate::budget::Budgets::new(
                crate::budget::STATE_REPORTS,
            )),
            first_asks: std::sync::Mutex::new(crate::budget::Budgets::new(
                crate::budget::FIRST_ASKS,
            )),
            asked_again: std::sync::Mutex::new(crate::budget::Budgets::new(
                crate::budget::ASKED_AGAIN,
            )),
            telemetry_budgets: std::sync::Mutex::new(crate::budget::Budgets::new(
                crate::budget::TELEMETRY,
            )),
            telemetry_retention_secs: monitoring.retention_days.saturating_mul(86_400),
            drift: std::sync::Mutex::new(Detectors::new(monitoring.drift)),
            publishing: Mutex::new(()),
            stored_rollouts: std::sync::Mutex::new(rollouts.clone()),
            rollouts: std::sync::Mutex::new(rollouts),
            persisting: Mutex::new(()),
            dirty_rollouts: Default::default(),
            drops,
            front,
            quarantined,
            seen_written: Default::default(),
            enroller,
            enrolling: Mutex::new(None),
        });
        let supervisor = tokio::spawn(link::supervise(fleet.clone(), eventloop, stop));
        Ok((fleet, Running { supervisor }))
    }

    /// Its role and what it did for chunk requests.
    pub fn status(&self) -> Status {
        use std::sync::atomic::Ordering::Relaxed;
        Status {
            role: match self.role {
                Role::Control => "control",
                Role::Chunks => "chunks",
            }
            .into(),
            mqtt_identity: self.identity.clone(),
            chunk_requests: ChunkStats {
                requests: self.requests.load(Relaxed),
                chunks: self.chunks.load(Relaxed),
                bytes: self.chunk_bytes.load(Relaxed),
                raw_bytes: self.chunk_raw_bytes.load(Relaxed),
                shared: self.chunks_shared.load(Relaxed),
                skipped: self.chunks_skipped.load(Relaxed),
                refused: self.refused.load(Relaxed),
                over_budget: self.chunks_over_budget.load(Relaxed),
                busy: self.chunk_requests_busy.load(Relaxed),
                merged: self.chunk_requests_merged.load(Relaxed),
                waiting: self.chunk_queue.lock().expect("chunk queue lock").len() as u64,
                in_flight: self.chunk_requests_in_flight.load(Relaxed),
                limit: self.max_chunk_requests as u64,
            },
            telemetry: TelemetryStats {
                stored: self.telemetry_stored.load(Relaxed),
                duplicates: self.telemetry_duplicates.load(Relaxed),
                rejected: self.telemetry_rejected.load(Relaxed),
                over_budget: self.telemetry_over_budget.load(Relaxed),
                samples_stored: self.samples_stored.load(Relaxed),
                samples_refused: self.samples_refused.load(Relaxed),
            },
            reports_over_budget: self.reports_over_budget.load(Relaxed),
        }
    }

    /// The store.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The repository.
    pub fn repo(&self) -> &Repository {
        &self.repo
    }

    /// What was dropped of each device's traffic.
    pub fn drops(&self) -> &crate::budget::Drops {
        &self.drops
    }

    /// What the embedded broker's front did, if there is one.
    pub fn front(&self) -> Option<&crate::broker::front::FrontStats> {
        self.front.as_deref()
    }
}
