//! The agent's one loop, the thin shell around [`crate::update`]: it starts serving from the
//! store, then feeds broker events, staging results, request outcomes and the clock to the
//! update machine and carries out its actions with sled, tract and MQTT.
//!
//! Update pipeline: desired (signed) → verify (TUF + director) → persist trust → download
//! chunks (each checked) → verify the whole artifact → load and optimize with tract off the
//! serving path → golden vectors and warm-up → persist the slot switch → atomic swap →
//! probation → commit or roll back. A rejected update is reported with its reason and never
//! touches the serving model.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use modelcast_proto::chunk::{ChunkReply, ChunkRequest};
use modelcast_proto::desired::{CanarySpec, DesiredState, SamplingSpec, ShadowSpec};
use modelcast_proto::engine::Backend as Pin;
use modelcast_proto::keys::PublicKey;
use modelcast_proto::manifest::Manifest;
use modelcast_proto::metadata::{RoleVerifier, Signed};
use modelcast_proto::report::{CanaryState, DeviceReport, ErrorKind, ReportedError, Slot};
use modelcast_proto::verify::{verify_desired, TrustState};
use thiserror::Error;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::engine::LoadedModel;
use crate::link::{Link, LinkEvent};
use crate::metrics::Metrics;
use crate::recovery::Restored;
use crate::sampling::Sampler;
use crate::serve::Models;
use crate::serve::RequestOutcome;
use crate::slots::ModelRecord;
use crate::store::{Store, StoreError};
use crate::telemetry::{Collector, Forwarder};
use crate::update::{Action, ChunkFate, Failure, Settings, Updater};

/// Request outcomes queued from the HTTP handlers to the loop; more are dropped.
const OUTCOME_QUEUE: usize = 4096;
/// How often samples move from the serve path's buffer to the store.
const SAMPLES_EVERY: Duration = Duration::from_secs(2);
/// How often a device enrolled by claim looks at its certificate's age.
const CERTIFICATE_EVERY: Duration = Duration::from_secs(5);
/// How often a device reports while a shadow phase runs (its figures move with every
/// compared request, and nothing else would report them until the phase ends).
const SHADOW_REPORT_EVERY: Duration = Duration::from_secs(5);

/// Why the agent could not start or had to stop.
#[derive(Debug, Error)]
pub enum AgentError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The provisioned trust anchors are unusable.
    #[error("trust anchors: {0}")]
    Trust(String),
    /// The HTTP listener could not bind.
    #[error("binding {addr}: {source}")]
    Bind {
        /// Address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS material for the broker is unusable.
    #[error(transparent)]
    Tls(#[from] crate::config::ConfigError),
    /// The control plane's thread or runtime could not start, or died.
    #[error("control runtime: {0}")]
    Runtime(std::io::Error),
    /// The device's sealing key could not be read or made.
    #[error(transparent)]
    SealingKey(#[from] crate::sealing::SealingKeyError),
    /// Enrolment by claim cannot proceed (its files, or the device's key).
    #[error(transparent)]
    Enrol(#[from] crate::enrol::EnrolError),
}

mod low_memory;

use low_memory::OnDisk;

use crate::clock::unix_secs as unix_now;

/// The outcome of staging one artifact.
struct Staged {
    name: String,
    sha256: String,
    result: Result<Staging, Failure>,
}

/// A version that passed staging.
enum Staging {
    /// Loaded and checked beside the serving model.
    Loaded(Arc<LoadedModel>),
    /// Verified on disk only: it does not fit in memory beside the serving model, so it is
    /// loaded and checked in its place ([`Agent::swap_low_memory`]).
    OnDisk(Box<OnDisk>),
}

/// Each model of a verified desired state with one of its terms, where the deployment set it.
fn by_model<T>(
    verified: &modelcast_proto::verify::VerifiedDesired,
    term: impl Fn(&str) -> Option<T>,
) -> BTreeMap<String, T> {
    verified
        .models()
        .iter()
        .filter_map(|m| Some((m.name.clone(), term(&m.name)?)))
        .collect()
}

/// The running agent: the update machine and the parts it drives.
struct Agent {
    cfg: Config,
    store: Store,
    models: Arc<Models>,
    metrics: Arc<Metrics>,
    link: Link,
    director: RoleVerifier,
    updater: Updater,
    staging: JoinSet<Staged>,
    /// Each staging under way: the artifact it stages and its task.
    staging_tasks: BTreeMap<String, (String, tokio::task::AbortHandle)>,
    /// Models that passed staging, waiting for their [`Action::Activate`].
    staged: BTreeMap<String, Staging>,
    /// The last good model of each model on trial, kept loaded to swap back at once (a
    /// trial as a canary needs none: the last good model still serves).
    previous: BTreeMap<String, Arc<LoadedModel>>,
    last_error: Option<ReportedError>,
    desired_version: u64,
    /// The backends deployments pin models to (the last verified desired state's).
    pins: BTreeMap<String, Pin>,
    /// The shadow phases deployments ask of new versions (the last verified desired state's).
    shadows: BTreeMap<String, ShadowSpec>,
    /// Each model's last shadow phase: its figures, while it runs and after (for reports).
    shadow_progress: Arc<crate::shadow::Phases>,
    /// The version a low-memory swap unloaded, by model: to load it again if the new one
    /// fails.
    unloaded: BTreeMap<String, (Manifest, Slot)>,
    /// The traffic splits deployments ask for while new versions are on probation (the last
    /// verified desired state's).
    canaries: BTreeMap<String, CanarySpec>,
    /// What the models served this interval.
    collector: Arc<Collector>,
    /// Requests kept whole where a deployment samples them.
    sampler: Arc<Sampler>,
    /// Telemetry's store-and-forward.
    telemetry: Forwarder,
    /// Chunk fetches over HTTP(S), for downloads whose deployment gives a base URL.
    fetcher: crate::fetch::Fetcher,
    /// Downloads (by artifact digest) whose HTTP fetches failed: MQTT carries them.
    http_failed: std::collections::HashSet<String>,
    /// The device's sealing key's public half (hex), in every report.
    sealing_key: Option<String>,
    /// Its own certificate, when it enrols by claim (`[enrol]`), and its renewal.
    enrolled: Option<crate::enrol::Enrolled>,
    /// Whether the broker link is up.
    link_up: bool,
}

fn load_trust(cfg: &Config, store: &Store) -> Result<(TrustState, RoleVerifier), AgentError> {
    let trust = match store.trust()? {
        Some(t) => t,
        None => {
            let bytes = std::fs::read(&cfg.trust.root).map_err(|e| {
                AgentError::Trust(format!("reading {}: {e}", cfg.trust.root.display()))
            })?;
            let root = Signed::from_slice(&bytes).map_err(|e| AgentError::Trust(e.to_string()))?;
            let t = TrustState::from_root(root).map_err(|e| AgentError::Trust(e.to_string()))?;
            store.set_trust(&t)?;
            t
        }
    };
    let keys = cfg
        .trust
        .director_keys
        .iter()
        .map(|k| PublicKey::from_hex(k))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| AgentError::Trust(format!("director key: {e}")))?;
    Ok((
        trust,
        RoleVerifier::new("director", keys, cfg.trust.director_threshold),
    ))
}

/// Runs the agent until `shutdown` completes. `ready` is called, with what serves, once the
/// store's models serve (or it is known there are none) and the inference API listens.
pub async fn run(
    cfg: Config,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(&[String]),
) -> Result<(), AgentError> {
    std::fs::create_dir_all(&cfg.state_dir).map_err(|e| StoreError::Sled(e.into()))?;
    crate::engine::set_threads(cfg.engine.threads);
    // Opened from a background thread: sled's flusher thread inherits its priority.
    let path = store_path(&cfg.state_dir);
    let (store, rebuilt) = std::thread::Builder::new()
        .name("modelcast-open".into())
        .spawn(move || {
            crate::priority::to_background();
            crate::recovery::open(&path)
        })
        .map_err(AgentError::Runtime)?
        .join()
        .map_err(|_| AgentError::Runtime(std::io::Error::other("opening the store panicked")))??;
    let token = cfg
        .enrol
        .as_ref()
        .and_then(|e| e.pkcs11.as_ref())
        .filter(|t| t.sealing_in_token);
    let sealing = crate::sealing::load_or_create(&cfg.state_dir, token)?;
    let store = store.with_sealing_key(sealing, &cfg.device_id);
    let (_, director) = load_trust(&cfg, &store)?;
    let tls = cfg.tls_client_config()?;
    let models = Arc::new(Models::default());
    let metrics = Arc::new(Metrics::new());
    metrics.store_rebuilds(crate::recovery::rebuilds(&store_path(&cfg.state_dir)));
    let restored = {
        let (store, models, metrics) = (store.clone(), models.clone(), metrics.clone());
        let (policy, engine) = (cfg.probation.clone(), cfg.engine.clone());
        tokio::task::spawn_blocking(move || {
            crate::recovery::restore(&store, &models, &metrics, &policy, &engine)
        })
        .await
        .map_err(|e| AgentError::Runtime(std::io::Error::other(format!("restore task: {e}"))))??
    };

    let listener = tokio::net::TcpListener::bind(cfg.http_listen)
        .await
        .map_err(|source| AgentError::Bind {
            addr: cfg.http_listen,
            source,
        })?;
    info!(addr = %cfg.http_listen, "inference API listening");
    let (outcome_tx, outcomes) = tokio::sync::mpsc::channel(OUTCOME_QUEUE);
    let collector = Arc::new(Collector::default());
    let sampler = Sampler::new();
    sampler.set_policies(store.sampling()?);
    let metered = Arc::new(tokio::sync::watch::Sender::new(cfg.transfer.metered));
    let api = crate::serve::Api::new(
        models.clone(),
        metrics.clone(),
        collector.clone(),
        sampler.clone(),
        outcome_tx,
        cfg.serve,
        metered.clone(),
    );
    #[cfg(not(feature = "grpc"))]
    if cfg.serve.grpc_listen.is_some() {
        tracing::warn!(
            "serve.grpc_listen is set, but this agent is built without the grpc feature"
        );
    }
    #[cfg(feature = "grpc")]
    let grpc = match cfg.serve.grpc_listen {
        Some(addr) => Some(
            crate::grpc::spawn(addr, api.clone())
                .await
                .map_err(|source| AgentError::Bind { addr, source })?,
        ),
        None => None,
    };
    let app = crate::serve::router(api);
    let (http_stop, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let http = tokio::spawn(async move {
        // Small answers go out at once, not when Nagle's algorithm lets them.
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = http_stopped.await;
            })
            .await;
    });
    let serving: Vec<String> = models
        .names()
        .iter()
        .filter_map(|n| models.get(n))
        .map(|m| format!("{} v{}", m.manifest().name, m.manifest().version))
        .collect();
    ready(&serving);

    // The control plane (broker link, downloads, store writes, telemetry, staging) runs on a
    // runtime of its own on a background thread, so its work never delays a request.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let parts = ControlParts {
        cfg,
        store,
        models,
        metrics,
        collector,
        sampler,
        director,
        tls,
        restored,
        rebuilt,
        outcomes,
        metered: metered.subscribe(),
    };
    std::thread::Builder::new()
        .name("modelcast-control".into())
        .spawn(move || {
            crate::priority::to_background();
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_start(crate::priority::to_background)
                .build()
                .map_err(AgentError::Runtime)
                .and_then(|rt| rt.block_on(control(parts, stop_rx)));
            let _ = done_tx.send(result);
        })
        .map_err(AgentError::Runtime)?;
    tokio::pin!(shutdown);
    tokio::pin!(done_rx);
    let result = tokio::select! {
        _ = &mut shutdown => {
            let _ = stop_tx.send(());
            done_rx.await
        }
        r = &mut done_rx => r,
    };
    let _ = http_stop.send(());
    let _ = http.await;
    #[cfg(feature = "grpc")]
    if let Some(grpc) = grpc {
        grpc.stop().await;
    }
    result.unwrap_or_else(|_| {
        Err(AgentError::Runtime(std::io::Error::other(
            "the control thread died",
        )))
    })
}

/// What the control loop takes over from [`run`].
struct ControlParts {
    cfg: Config,
    store: Store,
    models: Arc<Models>,
    metrics: Arc<Metrics>,
    collector: Arc<Collector>,
    sampler: Arc<Sampler>,
    director: RoleVerifier,
    tls: Option<rustls::ClientConfig>,
    restored: Restored,
    /// How the store was rebuilt at this start, if it was.
    rebuilt: Option<crate::recovery::Rebuilt>,
    outcomes: tokio::sync::mpsc::Receiver<RequestOutcome>,
    /// Whether the link is metered, as the local API last said.
    metered: tokio::sync::watch::Receiver<bool>,
}

/// The control loop: feeds broker events, staging results, request outcomes and the clock to
/// the update machine until `stop` fires or the link ends.
async fn control(
    parts: ControlParts,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> Result<(), AgentError> {
    let ControlParts {
        cfg,
        store,
        models,
        metrics,
        collector,
        sampler,
        director,
        tls,
        mut restored,
        rebuilt,
        mut outcomes,
        mut metered,
    } = parts;
    // The fallback slots are hashed here, while the API already serves.
    restored = {
        let (store, metrics) = (store.clone(), metrics.clone());
        tokio::task::spawn_blocking(move || {
            crate::recovery::check_fallbacks(&store, &mut restored, &metrics).map(|()| restored)
        })
        .await
        .map_err(|e| {
            AgentError::Runtime(std::io::Error::other(format!("fallback check task: {e}")))
        })??
    };
    let settings = Settings {
        probation: cfg.probation.clone(),
        window: cfg.transfer.window,
        chunk_timeout: Duration::from_secs(cfg.transfer.chunk_timeout_secs),
        stall_after: Duration::from_secs(cfg.transfer.stall_timeout_secs),
        first_chunk_patience: match cfg.transfer.shared_topic {
            true => modelcast_proto::chunk::MAX_GATHER,
            false => Duration::ZERO,
        },
    };
    let sealing_key = store.sealing_key().map(|k| k.to_hex());
    tokio::pin!(stop);
    // Enrolling by claim: the device's own certificate first (the API serves meanwhile).
    let (tls, enrolled) = match &cfg.enrol {
        None => (tls, None),
        Some(_) => {
            let started = crate::enrol::Enrolled::start(&cfg, sealing_key.clone());
            tokio::select! {
                _ = &mut stop => {
                    store.flush().await?;
                    return Ok(());
                }
                started = started => {
                    let (enrolled, tls) = started?;
                    (Some(tls), Some(enrolled))
                }
            }
        }
    };
    let (fetcher, mut fetched) = crate::fetch::Fetcher::start(tls.clone());
    let (link, mut events) = Link::connect(&cfg, tls);
    let mut agent = Agent {
        last_error: store.last_error()?,
        director,
        updater: Updater::new(settings, restored.records),
        staging: JoinSet::new(),
        staging_tasks: BTreeMap::new(),
        staged: BTreeMap::new(),
        previous: BTreeMap::new(),
        desired_version: store.trust()?.map_or(0, |t| t.director_version),
        pins: store.pins()?,
        shadows: store.shadows()?,
        shadow_progress: Default::default(),
        unloaded: BTreeMap::new(),
        canaries: store.canaries()?,
        collector,
        sampler,
        telemetry: Forwarder::new(cfg.telemetry.clone(), &cfg.device_id, &cfg.state_dir),
        cfg,
        store,
        models,
        metrics,
        link,
        fetcher,
        http_failed: Default::default(),
        sealing_key,
        enrolled,
        link_up: false,
    };
    if let Some(rebuilt) = rebuilt {
        agent
            .updater
            .note_error(ErrorKind::Healing, None, None, rebuilt.describe());
    }
    for (name, version, reason) in restored.lost {
        let v = Some(version);
        agent
            .updater
            .note_error(ErrorKind::Healing, Some(&name), v, reason);
    }
    for (name, version, reason) in restored.unloadable {
        let v = Some(version);
        agent
            .updater
            .note_error(ErrorKind::Staging, Some(&name), v, reason);
    }
    for (name, version, reason) in restored.rolled_back {
        agent.updater.report_rollback(&name, version, reason);
    }
    for (name, b) in agent.store.backoffs()? {
        // Read from disk: a far-off or corrupt time waits no longer than the longest back-off
        // (and cannot overflow the clock).
        let left = Duration::from_secs(b.until.saturating_sub(unix_now()).max(0) as u64)
            .min(crate::update::MAX_RETRY_AFTER);
        let until = Instant::now() + left;
        agent
            .updater
            .restore_backoff(&name, b.sha256, b.attempts, until);
    }
    for (name, previous) in restored.trials {
        // A canary resumes as one: the last good model serves, the trial its share.
        match (previous, agent.canaries.get(&name), agent.models.get(&name)) {
            (None, _, _) => {}
            (Some(previous), Some(spec), Some(trial)) => {
                agent
                    .metrics
                    .serving(&name, previous.slot(), previous.manifest().version);
                agent.models.swap_in(previous);
                agent.models.set_canary(trial, spec.clone());
            }
            (Some(previous), _, _) => {
                agent.previous.insert(name.clone(), previous);
            }
        }
        agent.updater.resume_trial(&name, Instant::now());
    }
    for (manifest, have) in restored.downloads {
        agent.updater.resume_download(manifest, have);
    }
    agent.updater.set_metered(*metered.borrow_and_update());
    agent.act().await;

    // Watchdog pings come from this loop and nowhere else: if it wedges, they stop.
    let mut watchdog = crate::systemd::watchdog_interval().map(tokio::time::interval);
    let mut telemetry_tick = agent.telemetry.interval().map(|every| {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    });
    let mut samples_tick = tokio::time::interval(SAMPLES_EVERY);
    samples_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut certificate_tick = tokio::time::interval(CERTIFICATE_EVERY);
    certificate_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shadow_tick = tokio::time::interval(SHADOW_REPORT_EVERY);
    shadow_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let wake = agent.updater.next_wake(Instant::now());
        tokio::select! {
            _ = &mut stop => break,
            _ = async { watchdog.as_mut().expect("armed").tick().await }, if watchdog.is_some() => {
                crate::systemd::ping();
            }
            _ = async { telemetry_tick.as_mut().expect("armed").tick().await }, if telemetry_tick.is_some() => {
                agent.end_telemetry_interval().await;
            }
            _ = samples_tick.tick() => agent.store_samples(),
            _ = shadow_tick.tick() => {
                if agent.shadow_running() {
                    agent.report().await;
                }
            }
            _ = certificate_tick.tick(), if agent.enrolled.is_some() => {
                let (now, unix) = (Instant::now(), unix_now());
                let enrolled = agent.enrolled.as_mut().expect("enrolled");
                match enrolled.due(&agent.cfg, agent.sealing_key.clone(), now, unix, agent.link_up) {
                    crate::enrol::Due::Nothing => {}
                    crate::enrol::Due::Renew(request) => agent.link.renew(&request).await,
                    crate::enrol::Due::Reenrol => {
                        let reenrolled = enrolled.reenrol(&agent.cfg, agent.sealing_key.clone());
                        tokio::select! {
                            _ = &mut stop => break,
                            r = reenrolled => match r {
                                Ok(tls) => agent.link.use_tls(tls).await,
                                Err(e) => warn!(error = %e, "enrolling again failed"),
                            },
                        }
                    }
                }
            }
            event = events.recv() => match event {
                Some(event) => agent.handle_link(event).await,
                None => break,
            },
            Some(o) = outcomes.recv() => agent.handle_outcome(o),
            Some(f) = fetched.recv() => agent.handle_fetched(f),
            Ok(()) = metered.changed() => {
                let now_metered = *metered.borrow_and_update();
                agent.updater.set_metered(now_metered);
            }
            Some(done) = agent.staging.join_next(), if !agent.staging.is_empty() => {
                match done {
                    Ok(staged) => agent.handle_staged(staged),
                    Err(e) => warn!(error = %e, "staging task failed"),
                }
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
        let (now, unix) = (Instant::now(), crate::clock::unix_secs());
        agent
            .updater
            .set_wall_clock(now, unix, crate::sys::local_offset(unix));
        agent.updater.handle_timeout(now);
        agent.act().await;
    }
    info!("shutting down");
    agent.updater.stop();
    agent.act().await;
    crate::systemd::stopping();
    agent.link.close().await;
    agent.store.flush().await?;
    Ok(())
}

/// Where the sled store lives inside the state directory.
pub fn store_path(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("store")
}

impl Agent {
    /// Moves the samples the serve path kept into the store, within each model's budget.
    fn store_samples(&mut self) {
        let (taken, dropped) = self.sampler.take();
        if taken.is_empty() && dropped == 0 {
            return;
        }
        if let Err(e) = self
            .store
            .keep_samples(taken, dropped, &self.sampler.policies())
        {
            warn!(error = %e, "samples not stored");
        }
    }

    /// Ends a telemetry interval: its report joins the queue, and the queue goes out if it
    /// can.
    async fn end_telemetry_interval(&mut self) {
        self.store_samples();
        match self.telemetry.end_interval(&self.store, &self.collector) {
            Ok((seq, bytes)) => debug!(seq, bytes, "telemetry report queued"),
            Err(e) => warn!(error = %e, "telemetry report not queued"),
        }
        self.send_telemetry().await;
    }

    /// Sends what the telemetry queue may send now; updates its gauges.
    async fn send_telemetry(&mut self) {
        match self.telemetry.to_send(&self.store, crate::clock::unix_ms()) {
            Ok(reports) => {
                for report in reports {
                    self.link.telemetry(report).await;
                }
            }
            Err(e) => warn!(error = %e, "telemetry queue"),
        }
        if let Ok((reports, bytes, dropped)) = self.store.telemetry_queue() {
            self.metrics.telemetry_queue(reports, bytes, dropped);
        }
    }

    async fn handle_link(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::Certificate(bytes) => {
                let (now, unix) = (Instant::now(), unix_now());
                let renewed = self
                    .enrolled
                    .as_mut()
                    .and_then(|e| e.answered(&bytes, now, unix));
                if let Some(tls) = renewed {
                    self.link.use_tls(tls).await;
                }
            }
            LinkEvent::Connected => {
                self.link_up = true;
                info!("connected to broker");
                self.updater.handle_connected();
                self.telemetry.connected();
                self.send_telemetry().await;
            }
            LinkEvent::TelemetryAck(bytes) => {
                if let Err(e) = self.telemetry.acknowledged(&self.store, &bytes) {
                    warn!(error = %e, "telemetry queue");
                }
                self.send_telemetry().await;
            }
            LinkEvent::Disconnected(reason) => {
                self.link_up = false;
                warn!(%reason, "broker link down");
                self.telemetry.disconnected();
                self.updater.handle_disconnected();
            }
            LinkEvent::Desired(bytes) => {
                if let Err(e) = self.handle_desired(&bytes).await {
                    // A desired state that does not decode or verify.
                    self.updater
                        .note_error(ErrorKind::Verification, None, None, e);
                }
            }
            LinkEvent::Chunk(bytes) => self.handle_chunk(&bytes),
        }
    }

    async fn handle_desired(&mut self, bytes: &[u8]) -> Result<(), String> {
        let trust = self
            .store
            .trust()
            .map_err(|e| e.to_string())?
            .ok_or("no trust state")?;
        // Milliseconds of parsing, canonical JSON and signature checks: in the background, off
        // the runtime's workers that also answer inference requests.
        let (director, device) = (self.director.clone(), self.cfg.device_id.clone());
        let bytes = bytes.to_vec();
        let verified = crate::priority::in_background("verify", move || {
            let message = DesiredState::from_slice(&bytes).map_err(|e| e.to_string())?;
            verify_desired(&trust, &director, &device, &message, unix_now())
                .map_err(|e| e.to_string())
        })
        .await?
        .map_err(|e| format!("desired state rejected: {e}"))?;
        self.store
            .set_trust(verified.trust())
            .map_err(|e| e.to_string())?;
        self.store.flush().await.map_err(|e| e.to_string())?;
        self.desired_version = verified.director_version();
        info!(
            version = verified.director_version(),
            models = verified.models().len(),
            "desired state verified"
        );
        let sampling: BTreeMap<String, SamplingSpec> =
            by_model(&verified, |m| verified.sampling(m));
        // What is held of a model no longer sampled is deleted with the policy.
        self.store_samples();
        self.store
            .set_sampling(&sampling)
            .map_err(|e| e.to_string())?;
        self.sampler.set_policies(sampling);
        let pins: BTreeMap<String, Pin> = by_model(&verified, |m| verified.backend(m));
        for (model, pin) in &pins {
            if *pin == Pin::Onnxruntime && !self.cfg.engine.has_onnxruntime() {
                warn!(%model, "the deployment pins ONNX Runtime, which this agent does not have: the configured backend runs it");
            }
        }
        self.store.set_pins(&pins).map_err(|e| e.to_string())?;
        self.pins = pins;
        let shadows: BTreeMap<String, ShadowSpec> = by_model(&verified, |m| verified.shadow(m));
        self.store
            .set_shadows(&shadows)
            .map_err(|e| e.to_string())?;
        self.shadows = shadows;
        let canaries: BTreeMap<String, CanarySpec> = by_model(&verified, |m| verified.canary(m));
        self.store
            .set_canaries(&canaries)
            .map_err(|e| e.to_string())?;
        self.canaries = canaries;
        let wanted: BTreeMap<String, u64> = verified
            .models()
            .iter()
            .map(|m| (m.name.clone(), m.version))
            .collect();
        self.follow_canaries(&wanted);
        // An encrypted version whose content key does not open here is refused before a
        // byte of it downloads; what serves is untouched.
        let mut refused = Vec::new();
        let mut rewrapped = Vec::new();
        for m in verified.models().iter().filter(|m| m.encryption.is_some()) {
            // A wrap is kept only once it opens (a bad one never replaces a good one); without
            // a new one that opens, the one kept must.
            let fresh = verified
                .key_wrap(&m.name)
                .map(|wrap| self.store.open_key_wrap(m, wrap).map(|_| wrap));
            let opened = match fresh {
                Some(Ok(wrap)) => {
                    if self.store.key_wrap(&m.sha256).ok().flatten().as_ref() != Some(wrap) {
                        rewrapped.push(m.clone());
                    }
                    self.store.keep_key_wrap(&m.sha256, wrap)
                }
                Some(Err(e)) => self.store.content_key(m).map(drop).map_err(|_| e),
                None => self.store.content_key(m).map(drop),
            };
            if let Err(e) = opened {
                warn!(model = %m.name, version = m.version, error = %e, "encrypted version refused");
                refused.push((m.name.clone(), m.version, e));
            }
        }
        for (name, version, e) in refused.iter() {
            self.record_error(Some(name.clone()), Some(*version), e.kind(), e.to_string())
                .await;
        }
        for m in rewrapped {
            self.serve_rewrapped(&m).await;
        }
        let desired: Vec<_> = verified
            .models()
            .iter()
            .filter(|m| !refused.iter().any(|(name, ..)| *name == m.name))
            .map(|m| crate::update::Wanted {
                manifest: m.clone(),
                thresholds: verified.probation(&m.name),
                download: verified.download(&m.name).cloned().unwrap_or_default(),
            })
            .collect();
        self.updater.handle_desired(&desired);
        Ok(())
    }

    /// An encrypted version that came with a new key wrap: if it is installed and nothing
    /// serves it (its wrap did not open at start: the device's sealing key changed, say), it is
    /// loaded from its slot and serves again.
    async fn serve_rewrapped(&mut self, m: &Manifest) {
        if self.models.get(&m.name).is_some() || self.models.swapping(&m.name) {
            return;
        }
        let Ok(Some(record)) = self.store.model(&m.name) else {
            return;
        };
        let Some(slot) = record
            .active
            .filter(|s| record.slot(*s).is_some_and(|x| x.sha256 == m.sha256))
        else {
            return;
        };
        match self.load_checked(m.clone(), slot).await {
            Ok(model) => {
                self.models.swap_in(model);
                self.metrics.serving(&m.name, slot, m.version);
                info!(model = %m.name, version = m.version, %slot, "the installed version opens with its new key wrap: serving it again");
            }
            Err(e) => {
                let reason = format!(
                    "version {} opens with its new key wrap but does not load: {}",
                    m.version, e.reason
                );
                warn!(model = %m.name, %reason);
                self.updater
                    .note_error(e.kind, Some(&m.name), Some(m.version), reason);
            }
        }
    }

    fn handle_chunk(&mut self, bytes: &[u8]) {
        let reply = match ChunkReply::decode(bytes) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "undecodable chunk dropped");
                return;
            }
        };
        let artifact = hex::encode(reply.artifact);
        // On the wire: what the link carried.
        let len = reply.data.len() as u64;
        // A compressed copy of a chunk some download wants is inflated, never past the
        // manifest's length for it; anything else goes on as it came (and is dropped).
        let limit = self.updater.chunk_len(&artifact, reply.index);
        let data = match limit.map(|l| crate::inflate::inflate(reply.encoding, reply.data, l)) {
            Some(Ok(data)) => data,
            Some(Err(e)) => {
                let error = crate::transfer::ChunkError::Inflate {
                    index: reply.index,
                    reason: e.to_string(),
                };
                if let ChunkFate::Rejected(name) =
                    self.updater
                        .chunk_undecodable(&artifact, reply.index, error)
                {
                    self.metrics.chunk_received(&name, len);
                    self.metrics.chunk_rejected();
                }
                return;
            }
            None => std::borrow::Cow::Borrowed(reply.data),
        };
        self.accept_chunk(&artifact, reply.index, &data, len);
    }

    /// A chunk of `artifact`'s download that arrived (`wire` bytes on the link), checked by
    /// the download machine and stored if it is wanted and valid.
    fn accept_chunk(&mut self, artifact: &str, index: u32, data: &[u8], wire: u64) {
        match self.updater.handle_chunk(artifact, index, data) {
            ChunkFate::Unwanted => {}
            ChunkFate::Duplicate(name) | ChunkFate::Dropped(name) => {
                self.metrics.chunk_received(&name, wire)
            }
            ChunkFate::Rejected(name) => {
                self.metrics.chunk_received(&name, wire);
                self.metrics.chunk_rejected();
            }
            ChunkFate::Store(name) => {
                self.metrics.chunk_received(&name, wire);
                let Some(manifest) = self.updater.downloading(&name) else {
                    return;
                };
                match self.store.put_chunk(manifest, index, data) {
                    Ok(()) => {
                        self.metrics.downloaded(&name, data.len() as u64);
                        self.updater.chunk_stored(&name, index);
                    }
                    Err(e) => self.updater.chunk_write_failed(&name, e.into()),
                }
            }
        }
    }

    /// A chunk fetched over HTTP, or a fetch that failed: the download then goes on over
    /// MQTT (the chunks in flight are asked again there).
    fn handle_fetched(&mut self, fetched: crate::fetch::Fetched) {
        match fetched {
            crate::fetch::Fetched::Chunk {
                artifact,
                index,
                data,
            } => {
                let wire = data.len() as u64;
                self.metrics.http_chunk();
                self.accept_chunk(&artifact, index, &data, wire);
            }
            crate::fetch::Fetched::Failed {
                artifact,
                index,
                error,
            } => {
                if self.http_failed.insert(artifact.clone()) {
                    warn!(%artifact, chunk = index, %error, "HTTP download failed: falling back to MQTT");
                    self.metrics.http_fallback();
                }
                self.updater.chunks_lost(&artifact);
            }
        }
    }

    /// Queues the fetch of `chunks` of `model`'s download of `artifact` from `base`.
    fn fetch_over_http<'a>(
        &mut self,
        model: &str,
        base: &str,
        artifact: &str,
        chunks: impl Iterator<Item = &'a u32>,
    ) {
        let Some(manifest) = self.updater.downloading(model) else {
            return;
        };
        let base = base.trim_end_matches('/');
        let mut jobs = Vec::new();
        for &index in chunks {
            let Some((part, local)) = manifest.locate(index) else {
                continue;
            };
            let Some(span) = part.span(local) else {
                continue;
            };
            jobs.push(crate::fetch::Job {
                artifact: artifact.to_string(),
                index,
                url: format!("{base}/{}", part.sha256),
                offset: span.offset,
                len: span.len,
                file_size: part.size,
            });
        }
        for job in jobs {
            // A full queue: the chunk times out and is asked again.
            self.fetcher.fetch(job);
        }
    }

    fn handle_outcome(&mut self, o: RequestOutcome) {
        self.updater
            .handle_outcome(&o.model, o.slot, o.ok, o.latency);
    }

    fn handle_staged(&mut self, staged: Staged) {
        let Staged {
            name,
            sha256,
            result,
        } = staged;
        if self
            .staging_tasks
            .get(&name)
            .is_some_and(|(s, _)| *s == sha256)
        {
            self.staging_tasks.remove(&name);
        }
        let wanted = self.updater.is_staging(&name, &sha256);
        let result = result.map(|model| {
            if wanted {
                self.staged.insert(name.clone(), model);
            }
        });
        self.updater.staged(&name, &sha256, result);
    }

    /// Carries out the update machine's actions, in order, until it has none.
    async fn act(&mut self) {
        while let Some(action) = self.updater.poll_action() {
            match action {
                Action::PrepareDownload(manifest) => self.prepare_download(manifest).await,
                Action::RequestChunks {
                    model,
                    artifact,
                    chunks,
                    again,
                    alone,
                    http,
                } => {
                    self.metrics.chunks_refetched(&model, again.len() as u64);
                    let http = http.filter(|_| !self.http_failed.contains(&artifact));
                    if let Some(base) = http {
                        self.fetch_over_http(&model, &base, &artifact, chunks.iter().chain(&again));
                        continue;
                    }
                    let shared = self.cfg.transfer.shared_topic && !alone;
                    if shared {
                        self.link.listen(&artifact).await;
                    }
                    let joined = shared && self.link.take_joined(&artifact);
                    let request = ChunkRequest {
                        format: modelcast_proto::FORMAT_VERSION,
                        device: self.cfg.device_id.clone(),
                        artifact,
                        chunks,
                        again,
                        shared,
                        joined,
                        zstd: true,
                    };
                    self.link.request_chunks(&request).await;
                }
                Action::Stage { manifest, slot } => self.stage(manifest, slot),
                Action::Activate {
                    name,
                    record,
                    on_trial,
                } => self.activate(name, record, on_trial).await,
                Action::Commit { name, record } => {
                    if let Err(e) = self.persist(&name, &record).await {
                        warn!(model = %name, error = %e, "recording the commit failed");
                    }
                    // A canary that passed takes all traffic.
                    if let Some(canary) = self.models.canary(&name) {
                        let model = canary.model.clone();
                        self.metrics
                            .serving(&name, model.slot(), model.manifest().version);
                        info!(model = %name, version = model.manifest().version, "canary committed: it takes all traffic");
                        self.models.swap_in(model);
                        self.models.take_canary(&name);
                    }
                    self.previous.remove(&name);
                    crate::sys::release_free_memory();
                }
                Action::RollBack { name, record } => {
                    // A rebuilt store must never adopt the version rolled back.
                    if let Some(failed) = &record.failed {
                        if let Err(e) = self.store.forget_manifest(failed) {
                            warn!(model = %name, error = %e, "forgetting the rolled-back manifest failed");
                        }
                    }
                    // A canary is dropped; the last good model never stopped serving.
                    if self.models.take_canary(&name).is_some() {
                        info!(model = %name, "canary dropped: the stable version takes all traffic");
                    } else if let Some(model) = self.previous.remove(&name) {
                        self.metrics
                            .serving(&name, model.slot(), model.manifest().version);
                        self.models.swap_in(model);
                    } else if let (Some(slot), Some(back)) = (record.active, record.serving()) {
                        let back = OnDisk {
                            manifest: back.clone(),
                            slot,
                        };
                        self.roll_back_low_memory(&name, back).await;
                    }
                    crate::sys::release_free_memory();
                    if let Err(e) = self.persist(&name, &record).await {
                        warn!(model = %name, error = %e, "recording the rollback failed");
                    }
                }
                Action::Abandon { name } => {
                    self.staged.remove(&name);
                    if let Err(e) = self.store.clear_pending(&name) {
                        warn!(model = %name, error = %e, "forgetting the download failed");
                    }
                    self.collect_garbage();
                }
                Action::Persist { name, record } => {
                    if let Err(e) = self.persist(&name, &record).await {
                        warn!(model = %name, error = %e, "recording the model failed");
                    }
                }
                Action::CollectGarbage => self.collect_garbage(),
                Action::Backoff { name, backoff } => {
                    let kept = backoff.map(|(sha256, attempts, wait)| crate::store::Backoff {
                        sha256,
                        attempts,
                        until: unix_now().saturating_add(wait.as_secs() as i64),
                    });
                    if let Err(e) = self.store.set_backoff(&name, kept.as_ref()) {
                        warn!(model = %name, error = %e, "keeping the back-off failed");
                    }
                }
                Action::Error {
                    model,
                    version,
                    kind,
                    reason,
                } => self.record_error(model, version, kind, reason).await,
                Action::Phase { name, phase } => self.metrics.phase(&name, phase),
                Action::Ended { name, outcome } => self.metrics.update_ended(&name, outcome),
                Action::Report => self.report().await,
            }
        }
        let downloading: BTreeSet<String> = self.updater.downloads().map(String::from).collect();
        self.link.listen_only(&downloading).await;
        // A staging the machine dropped (the desired state moved on) stops at once: one in
        // its shadow phase would otherwise keep a candidate loaded and mirrored for as long
        // as the phase lasts.
        let updater = &self.updater;
        let mut stopped = Vec::new();
        self.staging_tasks.retain(|name, (sha256, task)| {
            let wanted = updater.is_staging(name, sha256);
            if !wanted {
                info!(model = %name, "staging no longer wanted: stopped");
                task.abort();
                stopped.push(name.clone());
            }
            wanted
        });
        if !stopped.is_empty() {
            let phases = self
                .shadow_progress
                .lock()
                .map(|p| p.clone())
                .unwrap_or_default();
            for name in &stopped {
                if let Some(Ok(mut p)) = phases.get(name).map(|p| p.lock()) {
                    p.verdict.get_or_insert_with(|| "cancelled".into());
                }
            }
            self.report().await;
        }
    }

    async fn persist(&self, name: &str, record: &ModelRecord) -> Result<(), StoreError> {
        self.store.put_model(name, record)?;
        self.store.flush().await
    }

    /// Persists a record with a new version installed and forgets its download, flushed.
    async fn persist_installed(&self, name: &str, record: &ModelRecord) -> Result<(), StoreError> {
        self.store.put_model(name, record)?;
        self.store.clear_pending(name)?;
        self.store.flush().await
    }

    async fn prepare_download(&mut self, manifest: Manifest) {
        // What the download needs that the device already holds is copied, not downloaded,
        // including what a download this one replaces had received.
        let superseded = match self.store.pending(&manifest.name) {
            Ok(p) => p.filter(|p| p.sha256 != manifest.sha256),
            Err(e) => {
                warn!(model = %manifest.name, error = %e, "the download in progress is unreadable; not reused");
                None
            }
        };
        let prepared = self.store.set_pending(&manifest).and_then(|mut have| {
            let reused = self
                .store
                .reuse(&manifest, superseded.as_ref(), &mut have)?;
            Ok((have, reused))
        });
        let result = match prepared {
            Ok(ready) => self.store.flush().await.map(|()| ready),
            Err(e) => Err(e),
        };
        match result {
            Ok((have, reused)) => {
                if reused > 0 {
                    info!(model = %manifest.name, version = manifest.version, reused_bytes = reused, "chunks reused from stored artifacts");
                    self.metrics.reused(&manifest.name, reused);
                }
                self.updater
                    .download_ready(&manifest.name, &manifest.sha256, have, reused)
            }
            Err(e) => self
                .updater
                .download_failed(&manifest.name, &manifest.sha256, e.into()),
        }
    }

    /// Verifies, loads and checks an artifact in the background.
    ///
    /// Hashing, loading, optimizing, the golden check and the warm-up that checks the latency
    /// budget (in CPU time, see [`LoadedModel::warm_up`]) run on a background thread (see
    /// [`crate::priority`]), so that on a small device the serving threads keep their latency
    /// while a new version stages.
    fn stage(&mut self, manifest: Manifest, slot: Slot) {
        let store = self.store.clone();
        let (name, sha256) = (manifest.name.clone(), manifest.sha256.clone());
        let engine = (self.cfg.engine).pinned(self.pins.get(&manifest.name).copied());
        let metrics = self.metrics.clone();
        let shadow = self.shadows.get(&manifest.name).copied();
        // Beside the serving model if it fits (or nothing says it does not).
        let serving = self.models.get(&name).map(|m| m.manifest().memory_bytes);
        let available = crate::memory::available();
        let plan = crate::memory::plan(
            manifest.memory_bytes,
            available,
            serving,
            engine.low_memory_swap,
        );
        if plan != crate::memory::Plan::Beside {
            let two_models = match (shadow, self.canaries.get(&name)) {
                (Some(_), _) => Some("a shadow phase"),
                (None, Some(_)) => Some("a canary"),
                (None, None) => None,
            };
            let result = match (plan, two_models) {
                (crate::memory::Plan::LowMemory { needed, available }, None) => {
                    info!(model = %name, version = manifest.version, needed = %crate::memory::mib(needed), available = %crate::memory::mib(available), "does not fit beside the serving model: a low-memory swap");
                    Ok(Staging::OnDisk(Box::new(OnDisk { manifest, slot })))
                }
                (crate::memory::Plan::TooBig { needed, available }, _) => Err(Failure::new(
                    ErrorKind::Staging,
                    format!(
                        "needs {}, and the device would have {} even with the serving version unloaded",
                        crate::memory::mib(needed),
                        crate::memory::mib(available),
                    ),
                )),
                (
                    crate::memory::Plan::LowMemory { needed, available }
                    | crate::memory::Plan::Refuse { needed, available },
                    why,
                ) => Err(Failure::new(
                    ErrorKind::Staging,
                    format!(
                        "needs {} beside the serving model, {} available, and {}",
                        crate::memory::mib(needed),
                        crate::memory::mib(available),
                        match why {
                            Some(phase) => format!("{phase} needs both in memory"),
                            None => "the low-memory swap is off ([engine] low_memory_swap)".into(),
                        }
                    ),
                )),
                (crate::memory::Plan::Beside, _) => unreachable!("checked above"),
            };
            let task_name = (name.clone(), sha256.clone());
            let task = self.staging.spawn(async move {
                // Verified as staging verifies; loaded and checked in the serving one's place.
                let result = match result {
                    Ok(Staging::OnDisk(on_disk)) => {
                        let check = move || {
                            store.verify_artifact(&on_disk.manifest)?;
                            store.golden_file(&on_disk.manifest)?;
                            Ok(Staging::OnDisk(on_disk))
                        };
                        crate::priority::in_background("verify", check)
                            .await
                            .map_err(|e| Failure::new(ErrorKind::Staging, e))
                            .and_then(|r: Result<Staging, Failure>| r)
                    }
                    other => other,
                };
                Staged {
                    name,
                    sha256,
                    result,
                }
            });
            self.staging_tasks.insert(task_name.0, (task_name.1, task));
            return;
        }
        let (models, progress) = (self.models.clone(), self.shadow_progress.clone());
        let load = move || {
            let loaded = (|| {
                store.verify_artifact(&manifest)?;
                info!(model = %manifest.name, version = manifest.version, "artifact verified");
                let golden = store.golden_file(&manifest)?;
                let open = || store.artifact_reader(&manifest);
                let (model, p95) = crate::engine::stage(&manifest, slot, open, &golden, &engine)?;
                let choice = model.engine_report();
                metrics.engine_trials(&manifest.name, &choice.trials);
                info!(model = %manifest.name, version = manifest.version, backend = %choice.backend, reason = %choice.reason, p95_us = p95.as_micros() as u64, "warmed up");
                Ok(Arc::new(model))
            })();
            crate::sys::release_free_memory();
            loaded
        };
        let task_name = (name.clone(), sha256.clone());
        let task = self.staging.spawn(async move {
            let result = crate::priority::in_background("stage", load)
                .await
                .map_err(|e| Failure::new(ErrorKind::Staging, e))
                .and_then(|r| r);
            let result = match (result, shadow) {
                (Ok(candidate), Some(spec)) => {
                    crate::shadow::phase(models, &progress, candidate, spec).await
                }
                (result, _) => result,
            }
            .map(Staging::Loaded);
            Staged {
                name,
                sha256,
                result,
            }
        });
        self.staging_tasks.insert(task_name.0, (task_name.1, task));
    }

    /// Persists the slot switch, then swaps the staged model in.
    async fn activate(&mut self, name: String, record: ModelRecord, on_trial: bool) {
        let model = match self.staged.remove(&name) {
            None => {
                self.updater
                    .activation_failed(&name, "the staged model is gone".into());
                return;
            }
            Some(Staging::Loaded(model)) => model,
            Some(Staging::OnDisk(on_disk)) => {
                return self
                    .activate_low_memory(name, record, on_trial, *on_disk)
                    .await;
            }
        };
        // Kept for a rebuild of the store; restore keeps it again at the next start if this
        // fails (a disk full to the last block), so it does not stop the update.
        if let Err(e) = self.store.keep_manifest(model.manifest()) {
            warn!(model = %name, error = %e, "keeping the manifest beside its artifact failed");
        }
        if let Err(e) = self.persist_installed(&name, &record).await {
            self.updater.activation_failed(&name, e.to_string());
            return;
        }
        let (slot, version) = (model.slot(), model.manifest().version);
        // On trial with a split asked for: it answers its share beside the serving model.
        let split = self.canaries.get(&name).filter(|_| on_trial);
        if let (Some(spec), Some(stable)) = (split, self.models.get(&name)) {
            info!(
                model = %name,
                version,
                %slot,
                stable = stable.manifest().version,
                percent = spec.percent,
                key = spec.key.as_deref().unwrap_or("-"),
                "canary: the new version answers its share beside the stable one while on probation"
            );
            self.models.set_canary(model, spec.clone());
            crate::sys::release_free_memory();
            self.updater.activated_beside(&name, Instant::now());
            return;
        }
        let replaced = self.models.swap_in(model);
        info!(
            model = %name,
            version,
            %slot,
            previous = replaced.as_ref().map(|p| p.manifest().version),
            on_trial,
            "swapped: new version serves"
        );
        match replaced {
            Some(previous) if on_trial => {
                self.previous.insert(name.clone(), previous);
            }
            // The replaced model is freed once its last request finishes.
            replaced => drop(replaced),
        }
        crate::sys::release_free_memory();
        self.metrics.serving(&name, slot, version);
        self.updater.activated(&name, Instant::now());
    }

    fn collect_garbage(&self) {
        match self.store.collect_garbage() {
            Ok(0) => {}
            Ok(n) => info!(artifacts = n, "removed unused artifacts"),
            Err(e) => warn!(error = %e, "garbage collection failed"),
        }
    }

    async fn record_error(
        &mut self,
        model: Option<String>,
        version: Option<u64>,
        kind: ErrorKind,
        reason: String,
    ) {
        let error = ReportedError {
            model,
            version,
            kind,
            reason,
            at: unix_now(),
        };
        if let Err(e) = self.store.set_last_error(&error) {
            warn!(error = %e, "could not persist last error");
        }
        let _ = self.store.flush().await;
        self.last_error = Some(error);
    }

    /// Applies the desired state's splits to the canaries serving whose version it still
    /// wants (`wanted`: each model's desired version): a new share at once; a split no longer
    /// asked for (the deployment promoted the version) gives the canary all traffic for the
    /// rest of its probation, the last good model kept to go back to. A canary whose version
    /// the desired state moved away from is left to its trial (the updater defers the move).
    fn follow_canaries(&mut self, wanted: &BTreeMap<String, u64>) {
        for name in self.models.names() {
            let Some(canary) = self.models.canary(&name) else {
                continue;
            };
            if wanted.get(&name) != Some(&canary.model.manifest().version) {
                continue;
            }
            match self.canaries.get(&name) {
                Some(spec) if *spec == canary.spec => {}
                Some(spec) => {
                    info!(model = %name, percent = spec.percent, "canary share changed");
                    self.models.set_canary(canary.model.clone(), spec.clone());
                }
                None => {
                    let model = canary.model.clone();
                    info!(model = %name, version = model.manifest().version, "canary promoted: it takes all traffic for the rest of its probation");
                    self.metrics
                        .serving(&name, model.slot(), model.manifest().version);
                    if let Some(stable) = self.models.swap_in(model) {
                        self.previous.insert(name.clone(), stable);
                    }
                    self.models.take_canary(&name);
                }
            }
        }
    }

    /// Whether a shadow phase is under way.
    fn shadow_running(&self) -> bool {
        self.shadow_progress.lock().is_ok_and(|p| {
            p.values()
                .any(|s| s.lock().is_ok_and(|s| s.verdict.is_none()))
        })
    }

    async fn report(&mut self) {
        if let Ok(bytes) = self.store.size_on_disk() {
            self.metrics.store_size(bytes);
        }
        let mut models = self.updater.model_states();
        let shadows = self
            .shadow_progress
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default();
        for (name, state) in &mut models {
            state.engine = self.models.get(name).map(|m| m.engine_report());
            state.shadow = shadows
                .get(name)
                .and_then(|s| s.lock().ok().map(|s| s.clone()));
            state.low_memory_swap_ms = self.metrics.last_low_memory_swap(name);
            state.canary = self.models.canary(name).map(|c| CanaryState {
                version: c.model.manifest().version,
                percent: c.spec.percent,
                key: c.spec.key.clone(),
            });
        }
        let report = DeviceReport {
            format: modelcast_proto::FORMAT_VERSION,
            device: self.cfg.device_id.clone(),
            labels: self.cfg.labels.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            models,
            last_error: self.last_error.clone(),
            desired_version: self.desired_version,
            at: unix_now(),
            engines: Some(self.cfg.engine.engines()),
            sealing_key: self.sealing_key.clone(),
        };
        self.link.report(&report).await;
    }
}
