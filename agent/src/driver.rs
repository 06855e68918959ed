//! The agent's one loop: it starts serving from the store, then feeds broker events, staging
//! results and timers to the update logic and carries out what it decides.
//!
//! Update pipeline: desired (signed) → verify (TUF + director) → persist trust → download
//! chunks into sled (each checked) → verify the whole artifact → load and optimize with tract
//! off the serving path → golden vectors → persist the slot switch → atomic swap → report.
//! A rejected update is reported with its reason and never touches the serving model.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use modelcast_proto::chunk::{ChunkReply, ChunkRequest};
use modelcast_proto::desired::DesiredState;
use modelcast_proto::keys::PublicKey;
use modelcast_proto::manifest::Manifest;
use modelcast_proto::metadata::{RoleVerifier, Signed};
use modelcast_proto::report::{
    DeviceReport, ModelState, Phase, ReportedError, Slot, SlotContent, UpdateProgress,
};
use modelcast_proto::verify::{verify_desired, TrustState};
use thiserror::Error;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::config::Config;
use crate::engine::LoadedModel;
use crate::link::{Link, LinkEvent};
use crate::metrics::{Metrics, Outcome};
use crate::probation::{Probation, ProbationPolicy, Verdict, Window};
use crate::serve::Models;
use crate::serve::RequestOutcome;
use crate::slots::{Admission, ModelRecord};
use crate::store::{Store, StoreError};
use crate::transfer::{Accepted, ChunkError, Transfer};

/// How many bad copies of one chunk end an update.
const MAX_BAD_CHUNKS: u32 = 3;
/// Least time between two progress reports.
const REPORT_EVERY: Duration = Duration::from_millis(500);
/// Request outcomes queued from the HTTP handlers to the loop; more are dropped.
const OUTCOME_QUEUE: usize = 4096;

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
}

/// Unix seconds now.
fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The outcome of staging one artifact.
struct Staged {
    manifest: Manifest,
    slot: Slot,
    result: Result<Arc<LoadedModel>, String>,
}

/// The running agent.
struct Agent {
    cfg: Config,
    store: Store,
    models: Arc<Models>,
    metrics: Arc<Metrics>,
    link: Link,
    director: RoleVerifier,
    transfers: BTreeMap<String, Transfer>,
    bad_chunks: BTreeMap<(String, u32), u32>,
    progress: BTreeMap<String, UpdateProgress>,
    rejected: BTreeSet<String>,
    staging: JoinSet<Staged>,
    staging_names: BTreeSet<String>,
    last_error: Option<ReportedError>,
    desired_version: u64,
    last_report: Instant,
    report_due: bool,
    /// Connected to the broker: chunk requests go out only then (requests made while the
    /// link is down would be lost or queued, and asked again after it is back).
    online: bool,
    /// The last good model of each model on trial, kept loaded to swap back at once.
    previous: BTreeMap<String, Arc<LoadedModel>>,
    probations: BTreeMap<String, Probation>,
    /// Recent requests of each committed model: the baseline of its successor's trial.
    windows: BTreeMap<String, Window>,
    /// Desired versions that arrived while a trial was running; converged after its verdict.
    deferred: BTreeMap<String, Manifest>,
}

/// What start-up found: trials to resume (with the last good model to swap back to) and
/// rollbacks it made.
#[derive(Default)]
struct Restored {
    trials: Vec<(String, Arc<LoadedModel>)>,
    rolled_back: Vec<(String, u64, String)>,
}

fn load_slot(store: &Store, record: &ModelRecord, slot: Slot) -> Result<LoadedModel, String> {
    let manifest = record.slot(slot).ok_or("empty slot")?;
    let mut reader = store.artifact_reader(manifest).map_err(|e| e.to_string())?;
    LoadedModel::load(manifest, slot, &mut reader).map_err(|e| e.to_string())
}

/// Loads the serving model of every stored model. A trial that has been active through too
/// many start-ups (crashes) is rolled back first; a slot that no longer loads falls back to the
/// other. Runs before the network is touched: offline first.
fn restore(
    store: &Store,
    models: &Models,
    metrics: &Metrics,
    policy: &ProbationPolicy,
) -> Result<Restored, StoreError> {
    let mut restored = Restored::default();
    for (name, mut record) in store.models()? {
        if record.trial.is_some() {
            let version = record.serving().map_or(0, |m| m.version);
            if let Some(reason) = record.start_up(policy.max_trial_boots) {
                warn!(model = %name, version, "trial crash loop; rolling back");
                restored.rolled_back.push((name.clone(), version, reason));
            }
            store.put_model(&name, &record)?;
            store.flush_blocking()?;
        }
        let Some(active) = record.active else {
            continue;
        };
        let mut served = false;
        for slot in [active, active.other()] {
            match load_slot(store, &record, slot) {
                Ok(model) => {
                    let version = model.manifest().version;
                    info!(model = %name, version, %slot, "serving from store");
                    metrics.serving(&name, slot, version);
                    models.swap_in(Arc::new(model));
                    if slot != active {
                        warn!(model = %name, "active slot failed to load; fell back to the other slot");
                        let tried = record.serving().map_or(0, |m| m.version);
                        if record.roll_back().is_some() {
                            restored.rolled_back.push((
                                name.clone(),
                                tried,
                                format!("rolled back: version {tried} on trial no longer loads"),
                            ));
                        } else {
                            record.active = Some(slot);
                        }
                        store.put_model(&name, &record)?;
                    }
                    served = true;
                    break;
                }
                Err(e) => warn!(model = %name, %slot, error = %e, "stored model does not load"),
            }
        }
        if !served {
            warn!(model = %name, "no stored slot loads; nothing serves this model");
        } else if let Some(trial) = record.trial {
            match load_slot(store, &record, trial.previous) {
                Ok(previous) => restored.trials.push((name.clone(), Arc::new(previous))),
                Err(e) => {
                    // Nothing to swap back to: the trial version is as good as it gets.
                    warn!(model = %name, error = %e, "last good slot does not load; committing the trial");
                    record.trial = None;
                    store.put_model(&name, &record)?;
                }
            }
        }
    }
    crate::memory::release_free_memory();
    Ok(restored)
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
    let store = Store::open(&store_path(&cfg.state_dir))?;
    let (_, director) = load_trust(&cfg, &store)?;
    let tls = cfg.tls_client_config()?;
    let models = Arc::new(Models::default());
    let metrics = Arc::new(Metrics::new());
    let restored = {
        let (store, models, metrics) = (store.clone(), models.clone(), metrics.clone());
        let policy = cfg.probation.clone();
        tokio::task::spawn_blocking(move || restore(&store, &models, &metrics, &policy))
            .await
            .map_err(|e| AgentError::Trust(format!("restore task: {e}")))??
    };

    let listener = tokio::net::TcpListener::bind(cfg.http_listen)
        .await
        .map_err(|source| AgentError::Bind {
            addr: cfg.http_listen,
            source,
        })?;
    info!(addr = %cfg.http_listen, "inference API listening");
    let (outcome_tx, mut outcomes) = tokio::sync::mpsc::channel(OUTCOME_QUEUE);
    let app = crate::serve::router(models.clone(), metrics.clone(), outcome_tx);
    let (http_stop, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let http = tokio::spawn(async move {
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

    let (link, mut events) = Link::connect(&cfg, tls);
    let mut agent = Agent {
        last_error: store.last_error()?,
        director,
        transfers: BTreeMap::new(),
        bad_chunks: BTreeMap::new(),
        progress: BTreeMap::new(),
        rejected: BTreeSet::new(),
        staging: JoinSet::new(),
        staging_names: BTreeSet::new(),
        desired_version: store.trust()?.map_or(0, |t| t.director_version),
        last_report: Instant::now(),
        report_due: true,
        online: false,
        cfg,
        store,
        models,
        metrics,
        link,
        previous: BTreeMap::new(),
        probations: BTreeMap::new(),
        windows: BTreeMap::new(),
        deferred: BTreeMap::new(),
    };
    for (name, version, reason) in restored.rolled_back {
        agent.metrics.phase(&name, Phase::Failed);
        agent.metrics.update_ended(&name, Outcome::RolledBack);
        agent.fail(Some(&name), Some(version), reason).await;
    }
    for (name, previous) in restored.trials {
        agent.start_probation(&name, previous);
    }
    agent.resume_downloads()?;

    // Watchdog pings come from this loop and nowhere else: if it wedges, they stop.
    let mut watchdog = crate::systemd::watchdog_interval().map(tokio::time::interval);
    tokio::pin!(shutdown);
    loop {
        let wake = agent.next_wake();
        tokio::select! {
            _ = &mut shutdown => break,
            _ = async { watchdog.as_mut().expect("armed").tick().await }, if watchdog.is_some() => {
                crate::systemd::ping();
            }
            event = events.recv() => match event {
                Some(event) => agent.handle_link(event).await,
                None => break,
            },
            Some(outcome) = outcomes.recv() => agent.handle_outcome(outcome),
            Some(done) = agent.staging.join_next(), if !agent.staging.is_empty() => {
                match done {
                    Ok(staged) => agent.handle_staged(staged).await,
                    Err(e) => warn!(error = %e, "staging task failed"),
                }
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
        agent.judge_trials().await;
        agent.poll_requests().await;
        agent.maybe_report().await;
    }
    info!("shutting down");
    agent.suspend_trials().await;
    crate::systemd::stopping();
    agent.link.close().await;
    let _ = http_stop.send(());
    let _ = http.await;
    agent.store.flush().await?;
    Ok(())
}

/// Where the sled store lives inside the state directory.
pub fn store_path(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("store")
}

impl Agent {
    fn resume_downloads(&mut self) -> Result<(), StoreError> {
        for manifest in self.store.all_pending()? {
            info!(model = %manifest.name, version = manifest.version, "resuming download");
            let have = self.store.received(&manifest)?;
            self.start_transfer(manifest, have);
        }
        Ok(())
    }

    /// Starts fetching what `have` says is missing of `manifest`.
    fn start_transfer(&mut self, manifest: Manifest, have: Vec<bool>) {
        let transfer = Transfer::new(
            manifest.clone(),
            have,
            self.cfg.transfer.window,
            Duration::from_secs(self.cfg.transfer.chunk_timeout_secs),
        )
        .with_stall_deadline(Duration::from_secs(self.cfg.transfer.stall_timeout_secs));
        self.metrics.phase(&manifest.name, Phase::Downloading);
        self.progress.insert(
            manifest.name.clone(),
            UpdateProgress {
                version: manifest.version,
                phase: Phase::Downloading,
                received_bytes: transfer.received_bytes(),
                total_bytes: manifest.size,
            },
        );
        self.report_due = true;
        if transfer.is_complete() {
            // Every byte is already on disk (a restart after the download): stage it.
            self.stage(manifest);
        } else {
            self.transfers.insert(manifest.name.clone(), transfer);
        }
    }

    fn next_wake(&self) -> Instant {
        let mut wake = Instant::now() + Duration::from_secs(30);
        for t in self.transfers.values() {
            if let Some(at) = t.poll_timeout() {
                wake = wake.min(at);
            }
        }
        if self.report_due {
            wake = wake.min(self.last_report + REPORT_EVERY);
        }
        for p in self.probations.values() {
            wake = wake.min(p.deadline());
        }
        wake
    }

    async fn handle_link(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::Connected => {
                info!("connected to broker");
                self.online = true;
                self.report_due = true;
                self.last_report = Instant::now() - REPORT_EVERY;
            }
            LinkEvent::Disconnected(reason) => {
                warn!(%reason, "broker link down");
                self.online = false;
                for t in self.transfers.values_mut() {
                    t.handle_disconnect();
                }
            }
            LinkEvent::Desired(bytes) => {
                if let Err(e) = self.handle_desired(&bytes).await {
                    self.fail(None, None, e).await;
                }
            }
            LinkEvent::Chunk(bytes) => self.handle_chunk(&bytes).await,
        }
    }

    async fn handle_desired(&mut self, bytes: &[u8]) -> Result<(), String> {
        let message =
            DesiredState::from_slice(bytes).map_err(|e| format!("desired state rejected: {e}"))?;
        let trust = self
            .store
            .trust()
            .map_err(|e| e.to_string())?
            .ok_or("no trust state")?;
        let verified = verify_desired(
            &trust,
            &self.director,
            &self.cfg.device_id,
            &message,
            unix_now(),
        )
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
        for manifest in verified.models() {
            if let Err(e) = self.converge(manifest.clone()).await {
                self.fail(Some(&manifest.name), Some(manifest.version), e)
                    .await;
            }
        }
        self.report_due = true;
        Ok(())
    }

    /// Moves one model towards `manifest`.
    async fn converge(&mut self, manifest: Manifest) -> Result<(), String> {
        let name = manifest.name.clone();
        let record = self
            .store
            .model(&name)
            .map_err(|e| e.to_string())?
            .unwrap_or_default();
        match record.admit(&manifest) {
            // Serving, or rolled back and reported then.
            Admission::Serving | Admission::Failed => return Ok(()),
            // One trial at a time: the last good slot must not be overwritten.
            Admission::Wait => {
                self.deferred.insert(name, manifest);
                return Ok(());
            }
            Admission::Rollback { highest } => {
                return Err(format!(
                    "version {} of {name} rejected: version {highest} already installed \
                     (rollback)",
                    manifest.version
                ));
            }
            Admission::Install => {}
        }
        if self.rejected.contains(&manifest.sha256) {
            return Ok(()); // Already failed; reported then. A new version will retry.
        }
        if self
            .transfers
            .get(&name)
            .is_some_and(|t| t.manifest().sha256 == manifest.sha256)
            || self.staging_names.contains(&name)
        {
            return Ok(());
        }
        info!(model = %name, version = manifest.version, size = manifest.size, "update starts");
        let have = self
            .store
            .set_pending(&manifest)
            .map_err(|e| e.to_string())?;
        self.store.flush().await.map_err(|e| e.to_string())?;
        self.start_transfer(manifest, have);
        Ok(())
    }

    async fn handle_chunk(&mut self, bytes: &[u8]) {
        let reply = match ChunkReply::decode(bytes) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "undecodable chunk dropped");
                return;
            }
        };
        let artifact = hex::encode(reply.artifact);
        let Some(name) = self
            .transfers
            .iter()
            .find(|(_, t)| t.manifest().sha256 == artifact)
            .map(|(n, _)| n.clone())
        else {
            return; // Not (or no longer) wanted.
        };
        self.metrics.chunk_received(&name, reply.data.len() as u64);
        let transfer = self.transfers.get_mut(&name).expect("found above");
        match transfer.handle_chunk(reply.index, reply.data) {
            Ok(Accepted::Store) => {
                if let Err(e) = self
                    .store
                    .put_chunk(transfer.manifest(), reply.index, reply.data)
                {
                    let version = transfer.manifest().version;
                    self.abandon(&name, Some(version), format!("storing chunk: {e}"))
                        .await;
                    return;
                }
                transfer.handle_stored(reply.index);
                self.metrics.downloaded(&name, reply.data.len() as u64);
                if let Some(p) = self.progress.get_mut(&name) {
                    p.received_bytes = transfer.received_bytes();
                }
                self.report_due = true;
                if transfer.is_complete() {
                    let transfer = self.transfers.remove(&name).expect("present");
                    self.stage(transfer.manifest().clone());
                }
            }
            Ok(Accepted::Duplicate) => {}
            // An index outside the artifact is not a copy of any chunk: drop it without
            // keeping state for it (hostile replies must not grow memory).
            Err(e @ ChunkError::OutOfRange { .. }) => {
                warn!(model = %name, error = %e, "chunk dropped")
            }
            Err(e) => {
                self.metrics.chunk_rejected();
                let version = transfer.manifest().version;
                let count = self.bad_chunks.entry((artifact, reply.index)).or_insert(0);
                *count += 1;
                warn!(model = %name, error = %e, attempt = *count, "chunk rejected");
                if *count >= MAX_BAD_CHUNKS {
                    self.abandon(&name, Some(version), format!("update rejected: {e}"))
                        .await;
                } else {
                    self.record_error(Some(&name), Some(version), format!("chunk rejected: {e}"));
                }
            }
        }
    }

    /// Verifies, loads and checks an artifact on a blocking thread.
    fn stage(&mut self, manifest: Manifest) {
        let record = self
            .store
            .model(&manifest.name)
            .ok()
            .flatten()
            .unwrap_or_default();
        let slot = record.inactive();
        if let Some(p) = self.progress.get_mut(&manifest.name) {
            p.phase = Phase::Staging;
        }
        self.metrics.phase(&manifest.name, Phase::Staging);
        self.report_due = true;
        self.staging_names.insert(manifest.name.clone());
        let store = self.store.clone();
        info!(model = %manifest.name, version = manifest.version, %slot, "artifact complete; staging");
        self.staging.spawn_blocking(move || {
            let result = (|| {
                store
                    .verify_artifact(&manifest)
                    .map_err(|e| e.to_string())?;
                info!(model = %manifest.name, version = manifest.version, "artifact verified");
                let mut reader = store
                    .artifact_reader(&manifest)
                    .map_err(|e| e.to_string())?;
                let model =
                    LoadedModel::load(&manifest, slot, &mut reader).map_err(|e| e.to_string())?;
                model.check_golden().map_err(|e| e.to_string())?;
                let p95 = model.warm_up().map_err(|e| e.to_string())?;
                info!(model = %manifest.name, version = manifest.version, p95_us = p95.as_micros() as u64, "warmed up");
                Ok(Arc::new(model))
            })();
            crate::memory::release_free_memory();
            Staged {
                manifest,
                slot,
                result,
            }
        });
    }

    async fn handle_staged(&mut self, staged: Staged) {
        let Staged {
            manifest,
            slot,
            result,
        } = staged;
        let name = manifest.name.clone();
        self.staging_names.remove(&name);
        let model = match result {
            Ok(m) => m,
            Err(e) => {
                self.abandon(
                    &name,
                    Some(manifest.version),
                    format!("update rejected: {e}"),
                )
                .await;
                return;
            }
        };
        let previous = self.models.get(&name);
        let on_trial = previous.is_some() && self.policy_for(&manifest).enabled();
        let commit = || -> Result<(), String> {
            let store_err = |e: StoreError| e.to_string();
            let mut record = self
                .store
                .model(&name)
                .map_err(store_err)?
                .unwrap_or_default();
            record
                .install(slot, manifest.clone(), on_trial)
                .map_err(|e| e.to_string())?;
            self.store.put_model(&name, &record).map_err(store_err)?;
            self.store.clear_pending(&name).map_err(store_err)?;
            Ok(())
        };
        if let Err(e) = commit() {
            self.abandon(
                &name,
                Some(manifest.version),
                format!("recording slot: {e}"),
            )
            .await;
            return;
        }
        if let Err(e) = self.store.flush().await {
            self.abandon(
                &name,
                Some(manifest.version),
                format!("flushing store: {e}"),
            )
            .await;
            return;
        }
        let replaced = self.models.swap_in(model);
        info!(
            model = %name,
            version = manifest.version,
            %slot,
            previous = replaced.as_ref().map(|p| p.manifest().version),
            on_trial,
            "swapped: new version serves"
        );
        drop(replaced);
        // The replaced model is freed once its last request finishes; give its pages back.
        crate::memory::release_free_memory();
        if let Some(p) = self.progress.get_mut(&name) {
            p.phase = Phase::Active;
            p.received_bytes = manifest.size;
        }
        self.metrics.serving(&name, slot, manifest.version);
        self.metrics.update_ended(&name, Outcome::Activated);
        match previous.filter(|_| on_trial) {
            Some(previous) => self.start_probation(&name, previous),
            None => self.metrics.phase(&name, Phase::Active),
        }
        self.gc();
        self.report_due = true;
        self.last_report = Instant::now() - REPORT_EVERY;
    }

    /// Gives up on the update of `name`: the serving model is untouched, the partial
    /// artifact is removed, the reason reported.
    async fn abandon(&mut self, name: &str, version: Option<u64>, reason: String) {
        let artifact = match self.transfers.remove(name) {
            Some(t) => Some(t.manifest().sha256.clone()),
            None => self.store.pending(name).ok().flatten().map(|m| m.sha256),
        };
        if let Some(sha) = artifact {
            self.bad_chunks.retain(|(a, _), _| *a != sha);
            self.rejected.insert(sha);
        }
        let _ = self.store.clear_pending(name);
        self.gc();
        if let Some(p) = self.progress.get_mut(name) {
            p.phase = Phase::Failed;
        }
        self.metrics.phase(name, Phase::Failed);
        self.metrics.update_ended(name, Outcome::Rejected);
        self.fail(Some(name), version, reason).await;
    }

    /// The device's probation policy with the manifest's override.
    fn policy_for(&self, manifest: &Manifest) -> ProbationPolicy {
        let mut policy = self.cfg.probation.clone();
        if let Some(spec) = manifest.probation {
            policy.requests = spec.requests;
            policy.seconds = spec.seconds;
        }
        policy
    }

    /// Puts the serving model of `name` on trial, keeping `previous` to swap back.
    fn start_probation(&mut self, name: &str, previous: Arc<LoadedModel>) {
        let Some(trial) = self.models.get(name) else {
            return;
        };
        let manifest = trial.manifest();
        let policy = self.policy_for(manifest);
        info!(
            model = name,
            version = manifest.version,
            requests = policy.requests,
            seconds = policy.seconds,
            "on probation"
        );
        let baseline = self.windows.remove(name).unwrap_or_default();
        self.probations.insert(
            name.to_string(),
            Probation::new(policy, baseline, Instant::now()),
        );
        self.previous.insert(name.to_string(), previous);
        let progress = self
            .progress
            .entry(name.to_string())
            .or_insert_with(|| UpdateProgress {
                version: manifest.version,
                phase: Phase::Probation,
                received_bytes: manifest.size,
                total_bytes: manifest.size,
            });
        progress.phase = Phase::Probation;
        self.metrics.phase(name, Phase::Probation);
        self.report_due = true;
    }

    /// Feeds one request's outcome to the trial of its model, or to its baseline window.
    fn handle_outcome(&mut self, o: RequestOutcome) {
        let on_trial = self.models.get(&o.model).map(|m| m.slot()) == Some(o.slot);
        match self.probations.get_mut(&o.model) {
            Some(p) if on_trial => p.record(o.ok, o.latency),
            Some(_) => {} // A request the last good model finished after the swap.
            None => self
                .windows
                .entry(o.model)
                .or_default()
                .record(o.ok, o.latency),
        }
    }

    /// Commits or rolls back every trial that has its verdict.
    async fn judge_trials(&mut self) {
        let now = Instant::now();
        let verdicts: Vec<(String, Verdict)> = self
            .probations
            .iter()
            .map(|(n, p)| (n.clone(), p.verdict(now)))
            .filter(|(_, v)| *v != Verdict::Continue)
            .collect();
        for (name, verdict) in verdicts {
            let probation = self.probations.remove(&name).expect("listed above");
            let result = match verdict {
                Verdict::Rollback(reason) => self.roll_back(&name, reason).await,
                _ => self.commit_trial(&name, probation.window().clone()).await,
            };
            if let Err(e) = result {
                warn!(model = %name, error = %e, "ending the trial failed");
            }
            if let Some(next) = self.deferred.remove(&name) {
                if let Err(e) = self.converge(next.clone()).await {
                    self.fail(Some(&name), Some(next.version), e).await;
                }
            }
        }
    }

    async fn commit_trial(&mut self, name: &str, window: Window) -> Result<(), StoreError> {
        let mut record = self.store.model(name)?.unwrap_or_default();
        record.commit();
        self.store.put_model(name, &record)?;
        self.store.flush().await?;
        self.previous.remove(name);
        crate::memory::release_free_memory();
        self.windows.insert(name.to_string(), window);
        let version = record.serving().map_or(0, |m| m.version);
        info!(model = name, version, "committed as last good");
        if let Some(p) = self.progress.get_mut(name) {
            p.phase = Phase::Active;
        }
        self.metrics.phase(name, Phase::Active);
        self.metrics.update_ended(name, Outcome::Committed);
        self.report_due = true;
        Ok(())
    }

    /// Swaps the last good model back in, records the tried version as failed, reports why.
    /// The swap happens even if the store cannot record it: the trial is then rolled back again
    /// at start-up by its boot count.
    async fn roll_back(&mut self, name: &str, reason: String) -> Result<(), StoreError> {
        let tried = self.models.get(name).map_or(0, |m| m.manifest().version);
        let persisted = async {
            let mut record = self.store.model(name)?.unwrap_or_default();
            if record.roll_back().is_some() {
                self.store.put_model(name, &record)?;
                self.store.flush().await?;
            }
            Ok::<_, StoreError>(())
        }
        .await;
        let back = self.previous.remove(name);
        let back_version = back.as_ref().map(|m| m.manifest().version);
        if let Some(model) = back {
            self.metrics
                .serving(name, model.slot(), model.manifest().version);
            self.models.swap_in(model);
        }
        crate::memory::release_free_memory();
        if let Some(p) = self.progress.get_mut(name) {
            p.phase = Phase::Failed;
        }
        self.metrics.phase(name, Phase::Failed);
        self.metrics.update_ended(name, Outcome::RolledBack);
        let reason = match back_version {
            Some(v) => format!("rolled back to version {v}: {reason}"),
            None => format!("rolled back: {reason}"),
        };
        self.fail(Some(name), Some(tried), reason).await;
        persisted
    }

    /// On a clean stop, a running trial does not count as a crashed start-up.
    async fn suspend_trials(&mut self) {
        for name in self.probations.keys() {
            if let Ok(Some(mut record)) = self.store.model(name) {
                record.stop_cleanly();
                let _ = self.store.put_model(name, &record);
            }
        }
        let _ = self.store.flush().await;
    }

    fn gc(&self) {
        match self.store.collect_garbage() {
            Ok(0) => {}
            Ok(n) => info!(artifacts = n, "removed unused artifacts"),
            Err(e) => warn!(error = %e, "garbage collection failed"),
        }
    }

    fn record_error(&mut self, model: Option<&str>, version: Option<u64>, reason: String) {
        let error = ReportedError {
            model: model.map(str::to_string),
            version,
            reason,
            at: unix_now(),
        };
        if let Err(e) = self.store.set_last_error(&error) {
            warn!(error = %e, "could not persist last error");
        }
        self.last_error = Some(error);
        self.report_due = true;
    }

    async fn fail(&mut self, model: Option<&str>, version: Option<u64>, reason: String) {
        warn!(model, version, %reason, "update failed");
        self.record_error(model, version, reason);
        let _ = self.store.flush().await;
        self.last_report = Instant::now() - REPORT_EVERY;
    }

    async fn poll_requests(&mut self) {
        let now = Instant::now();
        let mut requests = Vec::new();
        let mut stalled = Vec::new();
        for t in self.transfers.values_mut() {
            if let Some(idle) = t.poll_stalled(now) {
                let m = t.manifest();
                stalled.push((m.name.clone(), m.version, idle, t.received_bytes(), m.size));
            }
            if !self.online {
                continue;
            }
            let refetched = t.refetched_chunks();
            let chunks = t.poll_request(now);
            let name = &t.manifest().name;
            self.metrics
                .chunks_refetched(name, t.refetched_chunks() - refetched);
            if !chunks.is_empty() {
                requests.push(ChunkRequest {
                    format: modelcast_proto::FORMAT_VERSION,
                    device: self.cfg.device_id.clone(),
                    artifact: t.manifest().sha256.clone(),
                    chunks,
                });
            }
        }
        for r in requests {
            self.link.request_chunks(&r).await;
        }
        for (name, version, idle, have, size) in stalled {
            let reason = format!(
                "download stalled: no chunk of {name} v{version} for {}s ({have} of {size} bytes); still retrying",
                idle.as_secs()
            );
            self.fail(Some(&name), Some(version), reason).await;
        }
    }

    fn build_report(&self) -> DeviceReport {
        let mut models = BTreeMap::new();
        for (name, rec) in self.store.models().unwrap_or_default() {
            models.insert(
                name.clone(),
                model_state(&rec, self.progress.get(&name).cloned()),
            );
        }
        for (name, p) in &self.progress {
            models
                .entry(name.clone())
                .or_insert_with(|| model_state(&ModelRecord::default(), Some(p.clone())));
        }
        DeviceReport {
            format: modelcast_proto::FORMAT_VERSION,
            device: self.cfg.device_id.clone(),
            labels: self.cfg.labels.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            models,
            last_error: self.last_error.clone(),
            desired_version: self.desired_version,
            at: unix_now(),
        }
    }

    async fn maybe_report(&mut self) {
        if !self.report_due || self.last_report.elapsed() < REPORT_EVERY {
            return;
        }
        if let Ok(bytes) = self.store.size_on_disk() {
            self.metrics.store_size(bytes);
        }
        let report = self.build_report();
        self.link.report(&report).await;
        self.last_report = Instant::now();
        self.report_due = false;
    }
}

fn model_state(rec: &ModelRecord, update: Option<UpdateProgress>) -> ModelState {
    let content = |m: &Option<Manifest>| {
        m.as_ref().map(|m| SlotContent {
            version: m.version,
            sha256: m.sha256.clone(),
        })
    };
    ModelState {
        active: rec.active,
        a: content(&rec.a),
        b: content(&rec.b),
        update,
    }
}
