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

use modelcast_proto::chunk::{parse_digest, ChunkReply, ChunkRequest};
use modelcast_proto::desired::TargetTerms;
use modelcast_proto::manifest::Manifest;
use modelcast_proto::report::DeviceReport;
use modelcast_proto::telemetry::{Sample, TelemetryAck, TelemetryReport};
use modelcast_proto::topic::{DeviceTopic, Topics};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tokio::sync::{mpsc, Mutex};
use tracing::{debug, info, warn};

use crate::db::{Db, DbError, Deployment, DeviceEntry, DirectorEntry, ModelInterval, Quarantine};
use crate::drift::{Alert, Change, Detectors};
use crate::fanout::{Fanout, Route};
use crate::group::Selector;
use crate::repo::{RepoError, Repository, ONLINE_LIFETIME_SECS};
use crate::rollout::{Effect, Rollout, RolloutSpec, RolloutState, Rollouts};
use crate::unix_now;

/// A drift stream without a point for this long is forgotten.
const DRIFT_IDLE_MS: i64 = 24 * 3600 * 1000;
/// Reports whose interval ends further in the future than this are refused (a device's
/// clock gone wrong would otherwise keep them past every retention).
const MAX_CLOCK_AHEAD_MS: i64 = 24 * 3600 * 1000;

/// How much stored telemetry rebuilds the drift detectors at start-up.
const DRIFT_REPLAY_MS: i64 = 3600 * 1000;
/// The files of one download in order, each as its digest and chunk count.
type DownloadFiles = Vec<([u8; 32], u32)>;

/// Most downloads whose chunk sources [`Fleet`] keeps in memory at once.
const MAX_DOWNLOADS_KNOWN: usize = 4096;

/// A version a device should run, with its deployment's terms (probation, sampling).
pub type Wanted = (Manifest, TargetTerms);

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
}

/// Why a decoded telemetry report was not taken.
#[derive(Debug, thiserror::Error)]
enum Refused {
    /// The device's clock is ahead: refused for good (and acknowledged, so it is not sent
    /// again).
    #[error("telemetry #{seq} ends {ahead_ms} ms in the future: the device's clock is wrong")]
    ClockAhead {
        /// The report.
        seq: u64,
        /// How far ahead.
        ahead_ms: i64,
    },
    /// The database failed: the report is not acknowledged, so the device sends it again.
    #[error(transparent)]
    Storage(#[from] DbError),
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
    chunks: std::sync::atomic::AtomicU64,
    chunks_shared: std::sync::atomic::AtomicU64,
    chunks_skipped: std::sync::atomic::AtomicU64,
    /// Which asked chunks go on shared topics; `None` when shared publication is off.
    fanout: Option<std::sync::Mutex<Fanout>>,
    /// Wakes the shared publisher when a publication is scheduled.
    fanout_scheduled: tokio::sync::Notify,
    /// When a chunk replica last reloaded the rollouts (at most once a second, whatever a
    /// device asks for).
    reloaded: std::sync::Mutex<Option<std::time::Instant>>,
    /// Where each entitled download's chunks come from: artifact digest (hex) → the files of
    /// the download in order (the artifact, then its golden file), each with its chunk count.
    parts: std::sync::Mutex<BTreeMap<String, DownloadFiles>>,
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
    /// Every rollout, as stored; locked only between awaits.
    rollouts: std::sync::Mutex<Rollouts>,
    /// Rollouts whose device states changed without a decision: written by the clock.
    dirty_rollouts: std::sync::Mutex<std::collections::BTreeSet<u64>>,
    /// What was dropped of each device's traffic (shared with the embedded broker's front).
    drops: Arc<crate::budget::Drops>,
    /// The embedded broker's front, if it has one.
    front: Option<Arc<crate::broker::front::FrontStats>>,
    /// Quarantined devices (also in their device records).
    quarantined: Arc<crate::quarantine::Quarantines>,
}

/// Why a rollout request failed.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// The request is invalid.
    #[error("{0}")]
    Invalid(String),
    /// No such rollout or model version.
    #[error("{0}")]
    NotFound(String),
    /// The store failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

/// What an operator does to a running rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutAction {
    /// Hold the next wave.
    Pause,
    /// Go on.
    Resume,
    /// Stop; with auto-rollback, send moved devices back.
    Abort,
    /// Stop; moved devices keep the new version.
    Cancel,
}

impl Fleet {
    /// Connects to the broker through `link` and starts handling fleet traffic: all of it in
    /// the [`Role::Control`] role, only its share of chunk requests as a [`Role::Chunks`]
    /// replica.
    pub async fn start(
        db: Db,
        repo: Repository,
        topics: Topics,
        link: BrokerLink,
        role: Role,
        monitoring: crate::Monitoring,
        guards: Guards,
    ) -> Result<Arc<Fleet>, DbError> {
        let Guards {
            drops,
            quarantines: quarantined,
            front,
        } = guards;
        let rollouts = db
            .rollouts()
            .await?
            .into_iter()
            .map(|r| (r.id, r))
            .collect();
        let identity = link.client_id.clone();
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
        opts.set_keep_alive(Duration::from_secs(15))
            .set_clean_session(true)
            // Whatever the brokers let a device publish (the embedded one and the generated
            // mosquitto configuration both allow MAX_PAYLOAD), the server can read: a larger
            // message would end its connection, again at every reconnect.
            .set_max_packet_size(
                crate::broker::MAX_PAYLOAD + 1024,
                crate::broker::MAX_PAYLOAD,
            )
            .set_inflight(256);
        let (client, mut eventloop) = AsyncClient::new(opts, 1024);
        let fleet = Arc::new(Fleet {
            db,
            repo,
            topics,
            client,
            role,
            identity,
            requests: Default::default(),
            chunks: Default::default(),
            chunks_shared: Default::default(),
            chunks_skipped: Default::default(),
            fanout,
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
            rollouts: std::sync::Mutex::new(rollouts),
            dirty_rollouts: Default::default(),
            drops,
            front,
            quarantined,
        });
        let (tx, mut rx) = mpsc::channel::<(String, bytes::Bytes)>(1024);
        let subscriber = fleet.clone();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        info!("server connected to broker");
                        let t = &subscriber.topics;
                        let c = &subscriber.client;
                        if subscriber.role == Role::Control {
                            let _ = c
                                .try_subscribe(t.all_devices(DeviceTopic::State), QoS::AtLeastOnce);
                            let _ = c.try_subscribe(
                                t.all_devices(DeviceTopic::Online),
                                QoS::AtLeastOnce,
                            );
                            let _ = c.try_subscribe(
                                t.all_devices(DeviceTopic::Telemetry),
                                QoS::AtLeastOnce,
                            );
                        }
                        let _ = c.try_subscribe(
                            t.chunk_requests_shared("modelcast-server"),
                            QoS::AtLeastOnce,
                        );
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if !subscriber.admit(&p.topic, p.payload.len()) {
                            continue;
                        }
                        // Chunk requests never wait behind reports.
                        if subscriber.dispatch_request(&p.topic, &p.payload) {
                            continue;
                        }
                        if tx.send((p.topic, p.payload)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        warn!(error = %e, "server broker link down");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
        let handler = fleet.clone();
        tokio::spawn(async move {
            while let Some((topic, payload)) = rx.recv().await {
                handler.handle(&topic, &payload).await;
            }
        });
        if fleet.fanout.is_some() {
            let publisher = fleet.clone();
            tokio::spawn(async move { publisher.publish_shared().await });
        }
        if role == Role::Chunks {
            return Ok(fleet);
        }
        if let Err(e) = fleet.replay_drift().await {
            warn!(error = %e, "rebuilding the drift detectors failed; they start empty");
        }
        let refresher = fleet.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            for minute in 0u64.. {
                tick.tick().await;
                if let Err(e) = refresher.refresh_if_due().await {
                    warn!(error = %e, "refreshing timestamp failed");
                }
                if minute % 60 == 0 {
                    refresher.prune_telemetry().await;
                }
            }
        });
        let clock = fleet.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                clock.tick_rollouts().await;
            }
        });
        Ok(fleet)
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
                shared: self.chunks_shared.load(Relaxed),
                skipped: self.chunks_skipped.load(Relaxed),
                refused: self.refused.load(Relaxed),
                over_budget: self.chunks_over_budget.load(Relaxed),
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

    /// Removes telemetry older than the retention.
    async fn prune_telemetry(&self) {
        let keep = self.telemetry_retention_secs;
        let before = unix_now()
            .saturating_sub(i64::try_from(keep).unwrap_or(i64::MAX))
            .saturating_mul(1000);
        match self.db.prune_telemetry(before).await {
            Ok(0) => {}
            Ok(n) => info!(reports = n, "removed telemetry past its retention"),
            Err(e) => warn!(error = %e, "pruning telemetry failed"),
        }
        let idle = crate::unix_now_ms() - DRIFT_IDLE_MS;
        let forgotten = self.drift.lock().expect("drift lock").forget_idle(idle);
        if forgotten > 0 {
            info!(streams = forgotten, "forgot idle drift streams");
        }
    }

    /// Stores a device's telemetry report (the first copy of each), and the samples it
    /// carries.
    async fn handle_telemetry(&self, device: &str, payload: &[u8]) -> Result<(), String> {
        use std::sync::atomic::Ordering::Relaxed;
        let admitted = self.telemetry_budgets.lock().expect("budgets lock").admit(
            device,
            payload.len() as u64,
            std::time::Instant::now(),
        );
        if !admitted {
            // Dropped unread; counted, and logged at most once per report it concerns.
            self.telemetry_over_budget.fetch_add(1, Relaxed);
            self.drops.add(device, "telemetry_over_budget", 1);
            debug!(%device, bytes = payload.len(), "telemetry over the device's budget dropped");
            return Ok(());
        }
        let report = match TelemetryReport::from_slice(payload) {
            Ok(r) if r.device == device => r,
            Ok(r) => {
                self.telemetry_rejected.fetch_add(1, Relaxed);
                return Err(format!(
                    "telemetry names {:?} on {device}'s topic",
                    r.device
                ));
            }
            Err(e) => {
                self.telemetry_rejected.fetch_add(1, Relaxed);
                return Err(format!("telemetry: {e}"));
            }
        };
        let seq = report.seq;
        let taken = self.take_telemetry(device, report).await;
        // The receipt: the device drops the report from its queue. Not when storing failed
        // (it sends the report again later).
        if !matches!(taken, Err(Refused::Storage(_))) {
            let ack = TelemetryAck::new(device, vec![seq]).to_vec();
            let topic = self.topics.device(device, DeviceTopic::TelemetryAcks);
            if let Err(e) = self
                .client
                .publish(topic, QoS::AtLeastOnce, false, ack)
                .await
            {
                debug!(%device, seq, error = %e, "telemetry receipt not sent");
            }
        }
        taken.map_err(|e| e.to_string())
    }

    /// Stores one decoded report of `device` and feeds drift detection.
    async fn take_telemetry(
        &self,
        device: &str,
        mut report: TelemetryReport,
    ) -> Result<(), Refused> {
        use std::sync::atomic::Ordering::Relaxed;
        if report.to_ms > crate::unix_now_ms().saturating_add(MAX_CLOCK_AHEAD_MS) {
            self.telemetry_rejected.fetch_add(1, Relaxed);
            return Err(Refused::ClockAhead {
                seq: report.seq,
                ahead_ms: report.to_ms - crate::unix_now_ms(),
            });
        }
        // Samples are kept apart from the time series; a re-sent report's samples are stored
        // again (each is kept once), in case the first copy's were not.
        let samples = std::mem::take(&mut report.samples);
        if !samples.is_empty() {
            self.store_samples(device, samples)
                .await
                .map_err(Refused::Storage)?;
        }
        if !self
            .db
            .add_telemetry(&report)
            .await
            .map_err(Refused::Storage)?
        {
            self.telemetry_duplicates.fetch_add(1, Relaxed);
            return Ok(());
        }
        debug!(%device, seq = report.seq, "telemetry stored");
        self.telemetry_stored.fetch_add(1, Relaxed);
        let changes: Vec<Change> = {
            let mut drift = self.drift.lock().expect("drift lock");
            ModelInterval::of(&report)
                .iter()
                .flat_map(|p| drift.observe(p))
                .collect()
        };
        self.apply_drift(changes).await;
        Ok(())
    }

    /// Stores the samples of models that `device`'s deployments sample now; drops the rest (a
    /// device that samples unasked, or a deployment that stopped sampling).
    async fn store_samples(&self, device: &str, samples: Vec<Sample>) -> Result<(), DbError> {
        use std::sync::atomic::Ordering::Relaxed;
        let sampled: std::collections::BTreeSet<String> = match self.db.device(device).await? {
            Some(entry) => self
                .wanted(&entry)
                .await?
                .into_iter()
                .filter(|(_, terms)| terms.sampling.is_some())
                .map(|(m, _)| m.name)
                .collect(),
            None => Default::default(),
        };
        let (keep, refuse): (Vec<Sample>, Vec<Sample>) = samples
            .into_iter()
            .partition(|s| sampled.contains(&s.model));
        if !refuse.is_empty() {
            warn!(%device, samples = refuse.len(), "samples of a model not sampled; dropped");
            self.samples_refused.fetch_add(refuse.len() as u64, Relaxed);
        }
        let added = self
            .db
            .add_samples(device, crate::unix_now_ms(), &keep)
            .await?;
        self.samples_stored.fetch_add(added, Relaxed);
        Ok(())
    }

    /// Rebuilds the drift detectors from the stored alerts and the last hour of telemetry (a
    /// restarted server goes on from there; alerts it had not stored yet are raised). The
    /// points are read a slice at a time ([`crate::telemetry::slices`]), so memory stays
    /// bounded with a large fleet.
    async fn replay_drift(&self) -> Result<(), DbError> {
        let alerts = self.db.alerts().await?;
        {
            let mut drift = self.drift.lock().expect("drift lock");
            for a in &alerts {
                drift.restore(a);
            }
        }
        let to = crate::unix_now_ms();
        let mut names: Vec<String> = self
            .db
            .models()
            .await?
            .into_iter()
            .map(|m| m.manifest.name)
            .collect();
        names.dedup();
        let mut replayed = 0;
        for name in &names {
            for (from, until) in crate::telemetry::slices(to - DRIFT_REPLAY_MS, to) {
                let mut points = self.db.model_telemetry(name, from, until).await?;
                points.sort_by_key(|p| p.to_ms);
                replayed += points.len();
                let changes: Vec<Change> = {
                    let mut drift = self.drift.lock().expect("drift lock");
                    points.iter().flat_map(|p| drift.observe(p)).collect()
                };
                self.apply_drift(changes).await;
            }
        }
        info!(
            points = replayed,
            alerts = alerts.iter().filter(|a| a.active()).count(),
            "drift detectors rebuilt"
        );
        Ok(())
    }

    /// Stores raised and cleared alerts, and tells the rollouts of the versions concerned.
    async fn apply_drift(&self, changes: Vec<Change>) {
        for change in changes {
            if let Err(e) = self.apply_drift_change(change).await {
                warn!(error = %e, "recording an alert failed");
            }
        }
    }

    async fn apply_drift_change(&self, change: Change) -> Result<(), DbError> {
        match change {
            Change::Raised(mut alert) => {
                alert.id = self.db.next_id().await?;
                self.db.put_alert(&alert).await?;
                warn!(
                    device = %alert.device,
                    model = %alert.model,
                    version = alert.version,
                    kind = %alert.kind,
                    test = %alert.test,
                    value = alert.value,
                    "alert raised: {}",
                    alert.message
                );
                self.alert_rollouts(&alert).await;
            }
            Change::Cleared {
                device,
                model,
                version,
                kind,
                at_ms,
            } => {
                for mut alert in self.db.alerts().await? {
                    if alert.active()
                        && alert.device == device
                        && alert.model == model
                        && alert.version == version
                        && alert.kind == kind
                    {
                        alert.cleared_ms = Some(at_ms);
                        self.db.put_alert(&alert).await?;
                        info!(%device, %model, version, %kind, "alert cleared");
                    }
                }
            }
        }
        Ok(())
    }

    /// Fails the alerting device in every running rollout of the alert's version that aborts
    /// on alerts.
    async fn alert_rollouts(&self, alert: &Alert) {
        let now = unix_now();
        let reason = format!("alert: {}: {}", alert.kind, alert.message);
        let changed: Vec<(Rollout, Vec<Effect>)> = {
            let mut all = self.rollouts.lock().expect("rollouts lock");
            all.values_mut()
                .filter(|r| r.spec.model == alert.model && r.spec.version == alert.version)
                .filter_map(|r| {
                    let (changed, effects) = r.handle_alert(now, &alert.device, &reason);
                    changed.then(|| (r.clone(), effects))
                })
                .collect()
        };
        for (rollout, effects) in changed {
            info!(rollout = rollout.id, device = %alert.device, "rollout counts the alerting device as failed");
            if let Err(e) = self.commit_rollout(&rollout, effects).await {
                warn!(rollout = rollout.id, error = %e, "recording a rollout failed");
            }
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

    /// Whether a message of `bytes` on `topic` is read at all: not from a quarantined device,
    /// and within its topic kind's bound ([`DeviceTopic::device_limit`]; the brokers bound
    /// packets by the largest kind only). What is not read is counted for its device.
    fn admit(&self, topic: &str, bytes: usize) -> bool {
        let Some((device, kind)) = self.topics.parse_device(topic) else {
            return true;
        };
        if self.is_quarantined(&device) {
            self.drops.add(&device, "quarantined", 1);
            return false;
        }
        if kind.device_limit().is_some_and(|limit| bytes > limit) {
            self.drops.add(&device, "oversized", 1);
            debug!(%device, ?kind, bytes, "message over its topic's bound dropped");
            return false;
        }
        true
    }

    /// Whether `device` is quarantined.
    pub fn is_quarantined(&self, device: &str) -> bool {
        self.quarantined.contains(device)
    }

    /// Quarantines `device` (`Some`) or releases it (`None`): while quarantined, everything
    /// it sends (reports, telemetry, chunk requests) is dropped unread and counted. Kept in
    /// its device record, so it outlasts a restart.
    pub async fn quarantine(
        &self,
        device: &str,
        quarantine: Option<Quarantine>,
    ) -> Result<DeviceEntry, DbError> {
        // Memory first: a report handled meanwhile writes the record with the new state.
        let before = self.quarantined.set(device, quarantine.clone());
        let stored = async {
            let mut entry = self.db.device(device).await?.unwrap_or(DeviceEntry {
                id: device.to_string(),
                labels: Default::default(),
                report: None,
                last_seen: 0,
                online: false,
                quarantine: None,
                dropped: Default::default(),
            });
            entry.quarantine = quarantine;
            self.db.put_device(&entry).await?;
            Ok(entry)
        }
        .await;
        if stored.is_err() {
            // Not kept: as it was.
            self.quarantined.set(device, before);
        }
        stored
    }

    /// Every device as stored, with its quarantine and what was dropped of its traffic;
    /// identities that never reported but had traffic dropped (a certificate refused at the
    /// broker's front, say) are listed too.
    pub async fn devices(&self) -> Result<Vec<DeviceEntry>, DbError> {
        let mut devices = self.db.devices().await?;
        let mut known = std::collections::BTreeSet::new();
        for d in &mut devices {
            d.dropped = self.drops.of(&d.id);
            known.insert(d.id.clone());
        }
        for (id, dropped) in self.drops.all() {
            if !known.contains(&id) {
                devices.push(DeviceEntry {
                    id,
                    labels: Default::default(),
                    report: None,
                    last_seen: 0,
                    online: false,
                    quarantine: None,
                    dropped,
                });
            }
        }
        Ok(devices)
    }

    /// What was dropped of each device's traffic.
    pub fn drops(&self) -> &crate::budget::Drops {
        &self.drops
    }

    /// What the embedded broker's front did, if there is one.
    pub fn front(&self) -> Option<&crate::broker::front::FrontStats> {
        self.front.as_deref()
    }

    /// Starts answering a chunk request, if that is what `topic` carries.
    fn dispatch_request(self: &Arc<Self>, topic: &str, payload: &[u8]) -> bool {
        let Some((device, DeviceTopic::Requests)) = self.topics.parse_device(topic) else {
            return false;
        };
        match ChunkRequest::from_slice(payload) {
            // The topic is the sender (the broker's ACL binds it); the request must agree.
            Ok(req) if req.device == device => {
                let fleet = self.clone();
                tokio::spawn(async move { fleet.serve_chunks(req).await });
            }
            Ok(req) => {
                warn!(%device, named = %req.device, "chunk request naming another device dropped")
            }
            Err(e) => warn!(%device, error = %e, "bad chunk request dropped"),
        }
        true
    }

    async fn handle(self: &Arc<Self>, topic: &str, payload: &[u8]) {
        let Some((device, kind)) = self.topics.parse_device(topic) else {
            return;
        };
        if kind == DeviceTopic::State && !payload.is_empty() {
            let admitted = self.report_budgets.lock().expect("budgets lock").admit(
                &device,
                payload.len() as u64,
                std::time::Instant::now(),
            );
            if !admitted {
                use std::sync::atomic::Ordering::Relaxed;
                self.reports_over_budget.fetch_add(1, Relaxed);
                self.drops.add(&device, "state_over_budget", 1);
                debug!(%device, bytes = payload.len(), "state report over the device's budget dropped");
                return;
            }
        }
        let result = match kind {
            DeviceTopic::State => self.handle_report(&device, payload).await,
            DeviceTopic::Online => self.handle_online(&device, payload).await,
            DeviceTopic::Telemetry => self.handle_telemetry(&device, payload).await,
            _ => Ok(()),
        };
        if let Err(e) = result {
            warn!(%device, error = %e, "device message rejected");
        }
    }

    async fn handle_report(&self, device: &str, payload: &[u8]) -> Result<(), String> {
        if payload.is_empty() {
            return Ok(()); // A cleared retained message.
        }
        let report = DeviceReport::from_slice(payload).map_err(|e| e.to_string())?;
        if report.device != device {
            return Err(format!(
                "report names {:?} on {device}'s topic",
                report.device
            ));
        }
        let previous = self.db.device(device).await.map_err(|e| e.to_string())?;
        let labels_changed = previous.as_ref().is_none_or(|p| p.labels != report.labels);
        let known_error = previous
            .as_ref()
            .and_then(|p| p.report.as_ref()?.last_error.as_ref());
        if let Some(e) = &report.last_error {
            if known_error != Some(e) {
                warn!(
                    %device,
                    model = e.model.as_deref().unwrap_or("-"),
                    version = e.version.unwrap_or(0),
                    reason = %e.reason,
                    "device rejected or rolled back an update"
                );
            }
        }
        let entry = DeviceEntry {
            id: device.into(),
            labels: report.labels.clone(),
            online: previous.as_ref().is_none_or(|p| p.online),
            last_seen: unix_now(),
            report: Some(report),
            quarantine: self.quarantined.of(device),
            dropped: Default::default(),
        };
        self.db
            .put_device(&entry)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(report) = &entry.report {
            self.feed_rollouts(device, report).await;
        }
        if labels_changed {
            info!(%device, labels = ?entry.labels, "device registered");
            self.publish_desired(device)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    async fn handle_online(&self, device: &str, payload: &[u8]) -> Result<(), String> {
        let Some(mut entry) = self.db.device(device).await.map_err(|e| e.to_string())? else {
            return Ok(());
        };
        entry.online = payload == b"online";
        entry.last_seen = unix_now();
        entry.quarantine = self.quarantined.of(device);
        self.db.put_device(&entry).await.map_err(|e| e.to_string())
    }

    /// The chunk count of `artifact` if `device` is deployed a model whose artifact it is:
    /// chunks go only to devices entitled to them.
    ///
    /// A chunk replica learns of rollouts from the store: on a miss it reloads them (at most
    /// once a second), since the control server may have just moved the device.
    async fn entitled(&self, device: &str, artifact: &str) -> Result<Option<u32>, DbError> {
        let Some(entry) = self.db.device(device).await? else {
            return Ok(None);
        };
        let chunks = |wanted: Vec<Wanted>| {
            let (m, _) = wanted.iter().find(|(m, _)| m.sha256 == artifact)?;
            self.remember_parts(m);
            Some(m.download_chunk_count())
        };
        if let Some(count) = chunks(self.wanted(&entry).await?) {
            return Ok(Some(count));
        }
        if self.role == Role::Chunks && self.may_reload() {
            let stored = self.db.rollouts().await?;
            *self.rollouts.lock().expect("rollouts lock") =
                stored.into_iter().map(|r| (r.id, r)).collect();
            return Ok(chunks(self.wanted(&entry).await?));
        }
        Ok(None)
    }

    /// Records where the chunks of `m`'s download come from (bounded: forgotten wholesale
    /// past [`MAX_DOWNLOADS_KNOWN`], then learnt again from the next requests).
    fn remember_parts(&self, m: &Manifest) {
        let parts = m
            .parts()
            .iter()
            .filter_map(|p| Some((parse_digest(p.sha256).ok()?, p.chunk_count())))
            .collect();
        let mut known = self.parts.lock().expect("parts lock");
        if known.len() >= MAX_DOWNLOADS_KNOWN && !known.contains_key(&m.sha256) {
            known.clear();
        }
        known.insert(m.sha256.clone(), parts);
    }

    /// The file and the index in it of download chunk `index` of `artifact`.
    fn locate(&self, artifact: &str, digest: &[u8; 32], index: u32) -> ([u8; 32], u32) {
        let known = self.parts.lock().expect("parts lock");
        let mut rest = index;
        for (part, count) in known.get(artifact).into_iter().flatten() {
            if rest < *count {
                return (*part, rest);
            }
            rest -= count;
        }
        (*digest, index)
    }

    /// Whether a chunk replica may reload the rollouts now; if so, counts this as the reload.
    fn may_reload(&self) -> bool {
        let mut last = self.reloaded.lock().expect("reload lock");
        let now = std::time::Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            return false;
        }
        *last = Some(now);
        true
    }

    async fn serve_chunks(&self, mut req: ChunkRequest) {
        use std::sync::atomic::Ordering::Relaxed;
        let Ok(digest) = parse_digest(&req.artifact) else {
            self.refused.fetch_add(1, Relaxed);
            return;
        };
        match self.entitled(&req.device, &req.artifact).await {
            Ok(Some(count)) => {
                self.requests.fetch_add(1, Relaxed);
                // Made-up or repeated indices neither grow the fan-out state nor send twice.
                req.keep_within(count);
            }
            Ok(None) => {
                self.refused.fetch_add(1, Relaxed);
                warn!(device = %req.device, artifact = %req.artifact, "chunk request for an artifact not deployed to that device refused");
                return;
            }
            Err(e) => {
                warn!(error = %e, "checking a chunk request");
                return;
            }
        }
        let routes = match &self.fanout {
            Some(f) => f
                .lock()
                .expect("fanout lock")
                .route(std::time::Instant::now(), &req),
            None => req.indices().map(|i| (i, Route::Direct)).collect(),
        };
        let own = self.topics.device(&req.device, DeviceTopic::Chunks);
        let mut scheduled = false;
        for (index, route) in routes {
            match route {
                Route::Skip => {
                    self.chunks_skipped.fetch_add(1, Relaxed);
                }
                Route::Shared => scheduled = true,
                Route::Direct => {
                    let charge = Some((req.device.as_str(), req.again.contains(&index)));
                    if !self
                        .send_chunk(&own, &req.artifact, &digest, index, charge)
                        .await
                    {
                        break;
                    }
                }
            }
        }
        if scheduled {
            self.fanout_scheduled.notify_one();
        }
    }

    /// Publishes the shared chunks as they fall due ([`Fanout::take_due`]), for ever.
    async fn publish_shared(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(fanout) = &self.fanout else {
            return;
        };
        loop {
            let next = fanout.lock().expect("fanout lock").next_due();
            match next {
                Some(at) => tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {}
                    _ = self.fanout_scheduled.notified() => {}
                },
                None => self.fanout_scheduled.notified().await,
            }
            let due = fanout
                .lock()
                .expect("fanout lock")
                .take_due(std::time::Instant::now());
            for (artifact, index) in due {
                let Ok(digest) = parse_digest(&artifact) else {
                    continue;
                };
                let topic = self.topics.artifact(&artifact);
                if self
                    .send_chunk(&topic, &artifact, &digest, index, None)
                    .await
                {
                    self.chunks_shared.fetch_add(1, Relaxed);
                }
            }
        }
    }

    /// Publishes chunk `index` of `artifact` on `topic`, charged to the budget of the device
    /// `charge` names (for a chunk it asked again, or the first time) if given; false if the
    /// broker link is gone or the device is over its budget (the rest of its request is not
    /// sent either).
    async fn send_chunk(
        &self,
        topic: &str,
        artifact: &str,
        digest: &[u8; 32],
        index: u32,
        charge: Option<(&str, bool)>,
    ) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let (file, at) = self.locate(artifact, digest, index);
        let data = match self.db.chunk(&file, at).await {
            Ok(Some(d)) => d,
            Ok(None) => {
                debug!(%artifact, index, "requested chunk not held");
                return true;
            }
            Err(e) => {
                warn!(error = %e, "reading chunk");
                return false;
            }
        };
        if let Some((device, again)) = charge {
            let budgets = match again {
                true => &self.asked_again,
                false => &self.first_asks,
            };
            let admitted = budgets.lock().expect("budgets lock").admit(
                device,
                data.len() as u64,
                std::time::Instant::now(),
            );
            if !admitted {
                self.chunks_over_budget.fetch_add(1, Relaxed);
                self.drops.add(device, "chunks_over_budget", 1);
                debug!(%device, %artifact, index, "chunk over the device's budget not sent");
                return false;
            }
        }
        let frame = ChunkReply {
            artifact: *digest,
            index,
            data: &data,
        }
        .encode();
        if self
            .client
            .publish(topic, QoS::AtLeastOnce, false, frame)
            .await
            .is_err()
        {
            return false;
        }
        self.chunks.fetch_add(1, Relaxed);
        true
    }

    /// The manifests `device` should run, each with its terms: per model, the latest of the
    /// deployments whose group selects it and the rollouts that moved it.
    pub async fn wanted(&self, device: &DeviceEntry) -> Result<Vec<Wanted>, DbError> {
        let mut per_model: BTreeMap<String, (u64, u64, TargetTerms)> = BTreeMap::new();
        let mut offer = |model: &str, seq: u64, version: u64, t: TargetTerms| {
            let entry = per_model
                .entry(model.to_string())
                .or_insert((seq, version, t));
            if seq >= entry.0 {
                *entry = (seq, version, t);
            }
        };
        for d in self.db.deployments().await? {
            if Selector::parse(&d.group).is_ok_and(|s| s.matches(&device.labels)) {
                let terms = TargetTerms {
                    probation: d.probation,
                    sampling: d.sampling,
                };
                offer(&d.model, d.seq, d.version, terms);
            }
        }
        for r in self.rollouts.lock().expect("rollouts lock").values() {
            if let Some((version, t)) = r.assignment(&device.id) {
                offer(&r.spec.model, r.id, version, t);
            }
        }
        let mut out = Vec::new();
        for (name, (_, version, t)) in per_model {
            if let Some(entry) = self.db.model(&name, version).await? {
                out.push((entry.manifest, t));
            }
        }
        Ok(out)
    }

    /// Every rollout, oldest first.
    pub fn rollouts(&self) -> Vec<Rollout> {
        let all = self.rollouts.lock().expect("rollouts lock");
        all.values().cloned().collect()
    }

    /// Rollout `id`.
    pub fn rollout(&self, id: u64) -> Option<Rollout> {
        self.rollouts
            .lock()
            .expect("rollouts lock")
            .get(&id)
            .cloned()
    }

    /// Starts rolling `spec` out: the group as it is now, in waves; the canary moves at once.
    pub async fn start_rollout(
        &self,
        spec: RolloutSpec,
        by: &str,
    ) -> Result<Rollout, RolloutError> {
        spec.validate().map_err(RolloutError::Invalid)?;
        let selector = Selector::parse(&spec.group).map_err(|e| RolloutError::Invalid(e.0))?;
        if self.db.model(&spec.model, spec.version).await?.is_none() {
            return Err(RolloutError::NotFound(format!(
                "model {} version {} is not published",
                spec.model, spec.version
            )));
        }
        let mut members = Vec::new();
        for d in self.db.devices().await? {
            // A quarantined device's reports are dropped: it could never pass a wave.
            if selector.matches(&d.labels) && !self.is_quarantined(&d.id) {
                let now = self
                    .wanted(&d)
                    .await?
                    .into_iter()
                    .find(|(m, _)| m.name == spec.model)
                    .map(|(m, _)| m.version);
                members.push((d.id, now));
            }
        }
        if members.is_empty() {
            return Err(RolloutError::Invalid(format!(
                "no device matches group {:?}",
                spec.group
            )));
        }
        let id = self.db.next_id().await?;
        let (rollout, effects) = Rollout::start(id, spec, by, unix_now(), members);
        self.db
            .append_audit(
                by,
                "rollout.start",
                serde_json::json!({
                    "rollout": id,
                    "model": rollout.spec.model,
                    "version": rollout.spec.version,
                    "group": rollout.spec.group,
                    "waves": rollout.spec.waves,
                    "devices": rollout.members.len(),
                    "sampling": rollout.spec.sampling,
                }),
                unix_now(),
            )
            .await?;
        info!(
            rollout = id,
            model = %rollout.spec.model,
            version = rollout.spec.version,
            group = %rollout.spec.group,
            devices = rollout.members.len(),
            waves = ?rollout.wave_sizes,
            %by,
            "rollout started"
        );
        self.commit_rollout(&rollout, effects).await?;
        Ok(rollout)
    }

    /// An operator's action on rollout `id`.
    pub async fn act_on_rollout(
        &self,
        id: u64,
        action: RolloutAction,
        by: &str,
    ) -> Result<Rollout, RolloutError> {
        let now = unix_now();
        let (rollout, effects) = {
            let mut all = self.rollouts.lock().expect("rollouts lock");
            let r = all
                .get_mut(&id)
                .ok_or_else(|| RolloutError::NotFound(format!("no rollout {id}")))?;
            let effects = match action {
                RolloutAction::Pause => r.pause(now),
                RolloutAction::Resume => r.resume(now),
                RolloutAction::Abort => r.abort(now, format!("aborted by {by}")),
                RolloutAction::Cancel => r.cancel(now),
            };
            (r.clone(), effects)
        };
        info!(rollout = id, ?action, %by, state = ?rollout.state, "rollout changed by an operator");
        let name = serde_json::to_value(action).unwrap_or_default();
        self.db
            .append_audit(
                by,
                &format!("rollout.{}", name.as_str().unwrap_or("action")),
                serde_json::json!({ "rollout": id, "state": rollout.state }),
                now,
            )
            .await?;
        self.commit_rollout(&rollout, effects).await?;
        Ok(rollout)
    }

    /// Feeds a device's report to the rollouts it is part of. A decision (a wave, an abort,
    /// the end) is persisted and flushed before it is carried out; a device's new state
    /// alone is written by the clock within a second (after a crash, the devices' retained
    /// reports, delivered again, restore it).
    async fn feed_rollouts(&self, device: &str, report: &modelcast_proto::report::DeviceReport) {
        let now = unix_now();
        let changed: Vec<(Rollout, Vec<Effect>)> = {
            let mut all = self.rollouts.lock().expect("rollouts lock");
            let mut dirty = self.dirty_rollouts.lock().expect("dirty lock");
            all.values_mut()
                .filter(|r| !matches!(r.state, RolloutState::Completed | RolloutState::Cancelled))
                .filter_map(|r| {
                    let before = r.member(device)?.state.clone();
                    let effects = r.handle_report(now, device, report);
                    if !effects.is_empty() {
                        return Some((r.clone(), effects));
                    }
                    if r.member(device)?.state != before {
                        dirty.insert(r.id);
                    }
                    None
                })
                .collect()
        };
        for (rollout, effects) in changed {
            if let Err(e) = self.commit_rollout(&rollout, effects).await {
                warn!(rollout = rollout.id, error = %e, "recording a rollout failed");
            }
        }
    }

    /// The rollouts' clock: wave timeouts, and writing device states that changed.
    async fn tick_rollouts(&self) {
        let now = unix_now();
        let dirty = std::mem::take(&mut *self.dirty_rollouts.lock().expect("dirty lock"));
        if !dirty.is_empty() {
            for id in dirty {
                let rollout = self.rollout(id);
                if let Some(r) = rollout {
                    if let Err(e) = self.db.put_rollout(&r).await {
                        warn!(rollout = id, error = %e, "recording a rollout failed");
                    }
                }
            }
            if let Err(e) = self.db.flush().await {
                warn!(error = %e, "flushing rollouts failed");
            }
        }
        let due: Vec<(Rollout, Vec<Effect>)> = {
            let mut all = self.rollouts.lock().expect("rollouts lock");
            all.values_mut()
                .filter(|r| r.next_timeout().is_some_and(|t| t <= now))
                .map(|r| {
                    let effects = r.handle_timeout(now);
                    (r.clone(), effects)
                })
                .collect()
        };
        for (rollout, effects) in due {
            if let Err(e) = self.commit_rollout(&rollout, effects).await {
                warn!(rollout = rollout.id, error = %e, "recording a rollout failed");
            }
        }
    }

    /// Persists `rollout` (flushed), then carries out its effects. What a rollout's end
    /// leaves (its audit entry, the group's deployment) is written before the rollout is
    /// recorded as ended, and the operators see it ended only then: a crash in between ends
    /// it again after the restart rather than losing them.
    async fn commit_rollout(
        &self,
        rollout: &Rollout,
        effects: Vec<Effect>,
    ) -> Result<(), RolloutError> {
        let mut retarget = Vec::new();
        for effect in effects {
            match effect {
                Effect::Retarget(devices) => retarget.extend(devices),
                Effect::Ended(state) => {
                    info!(rollout = rollout.id, ?state, "rollout ended");
                    self.db
                        .append_audit(
                            &format!("rollout {}", rollout.id),
                            "rollout.end",
                            serde_json::json!({ "rollout": rollout.id, "state": state }),
                            unix_now(),
                        )
                        .await?;
                    if state == RolloutState::Completed {
                        // The group keeps the version: devices that join it later get it too.
                        let s = &rollout.spec;
                        self.db
                            .add_deployment(Deployment {
                                seq: 0,
                                model: s.model.clone(),
                                version: s.version,
                                group: s.group.clone(),
                                by: format!("rollout {}", rollout.id),
                                at: unix_now(),
                                probation: s.probation,
                                sampling: s.sampling,
                            })
                            .await?;
                    }
                }
            }
        }
        self.db.put_rollout(rollout).await?;
        self.db.flush().await?;
        self.rollouts
            .lock()
            .expect("rollouts lock")
            .insert(rollout.id, rollout.clone());
        for device in retarget {
            if let Err(e) = self.publish_desired(&device).await {
                warn!(rollout = rollout.id, %device, error = %e, "publishing desired state failed");
            }
        }
        Ok(())
    }

    /// Publishes `device`'s desired state if it changed since the last publication.
    pub async fn publish_desired(&self, device: &str) -> Result<bool, RepoError> {
        let _guard = self.publishing.lock().await;
        let Some(entry) = self.db.device(device).await? else {
            return Ok(false);
        };
        let models = self.wanted(&entry).await?;
        if models.is_empty() {
            return Ok(false);
        }
        let ts = self.repo.timestamp().await?.map_or(0, |t| t.version);
        let mut paths: Vec<String> = models
            .iter()
            .map(|(m, t)| {
                let mut path = m.target_path();
                if let Some(p) = t.probation {
                    path.push_str(&serde_json::json!(p).to_string());
                }
                if let Some(s) = t.sampling {
                    path.push_str(&format!("sampling{}", serde_json::json!(s)));
                }
                path
            })
            .collect();
        paths.sort();
        let content = format!("{}@{ts}", paths.join(","));
        let last = self.db.director(device).await?;
        if last.content == content {
            return Ok(false);
        }
        let version = last.version + 1;
        let desired = self
            .repo
            .desired(device, &models, version, unix_now())
            .await?;
        let topic = self.topics.device(device, DeviceTopic::Desired);
        self.client
            .publish(topic, QoS::AtLeastOnce, true, desired.to_vec())
            .await
            .map_err(|e| RepoError::Rejected(format!("publishing: {e}")))?;
        self.db
            .put_director(device, &DirectorEntry { version, content })
            .await?;
        info!(%device, version, models = ?paths, "desired state published");
        Ok(true)
    }

    /// Re-evaluates every device (after a deployment or a repository change).
    pub async fn publish_all(&self) -> Result<usize, RepoError> {
        let mut changed = 0;
        for d in self.db.devices().await? {
            if self.publish_desired(&d.id).await? {
                changed += 1;
            }
        }
        Ok(changed)
    }

    async fn refresh_if_due(&self) -> Result<(), RepoError> {
        let Some(ts) = self.repo.timestamp().await? else {
            return Ok(());
        };
        let expires = modelcast_proto::metadata::parse_expiry(&ts.expires).unwrap_or(0);
        if expires - unix_now() < ONLINE_LIFETIME_SECS / 2 {
            self.repo.refresh(unix_now()).await?;
            self.publish_all().await?;
        }
        Ok(())
    }
}
