//! The agent's update logic as a state machine with no I/O, in the manner of quinn-proto and
//! rustls: the driver feeds it events (a verified desired state, a chunk, a stored chunk, a
//! staging result, a request outcome, the link going up or down, the clock) and carries out
//! the [`Action`]s it queues, in order, answering the ones that ask for an answer.
//!
//! Per model it sequences one update at a time:
//!
//! ```text
//! idle → preparing → downloading → staging → activating → trial → idle (committed)
//!                                                               ↘ idle (rolled back)
//! ```
//!
//! A failure at any step abandons the update: the serving model is untouched, the reason
//! reported. A newer desired version that arrives while one is staged or on trial waits for
//! it to end; one that arrives during a download replaces it.
//!
//! Persistence contract: every action that carries a [`ModelRecord`] is written to the store
//! and flushed by the driver before the driver acts on it (swaps, reports). The machine's copy
//! of each record is what the store holds once those actions are carried out; on start-up the
//! driver rebuilds the machine from the store ([`Updater::new`]).
//!
//! Invariants, checked by the proptest at the bottom over random event orders with crashes:
//! the serving slot always holds a version that passed staging (or nothing before the first);
//! staging never targets the serving slot or the last good one; a commit only follows a
//! trial judged on enough requests or time; every rollback is reported with its reason; the
//! version floor never goes down; no chunk is requested while the link is down.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use modelcast_proto::desired::TrialThresholds;
use modelcast_proto::manifest::Manifest;
use modelcast_proto::report::{ErrorKind, ModelState, Phase, Slot, SlotContent, UpdateProgress};
use tracing::{info, warn};

use crate::metrics::Outcome;
use crate::probation::{Probation, ProbationPolicy, Verdict, Window};
use crate::slots::{Admission, ModelRecord};
use crate::transfer::{Accepted, ChunkError, Transfer};

/// How many bad copies of one chunk end an update.
pub const MAX_BAD_CHUNKS: u32 = 3;
/// Least time between two routine reports (a step of an update).
pub const REPORT_EVERY: Duration = Duration::from_millis(500);
/// Least time between two reports that only carry download progress: a fleet downloading
/// at once must not flood the server with them.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Longest sleep when nothing is scheduled.
const IDLE_WAKE: Duration = Duration::from_secs(30);
/// After a download is given up because its chunks kept arriving damaged (the bytes on the
/// way, not the version), it is tried again after this, doubling with each give-up in a row.
pub const RETRY_AFTER: Duration = Duration::from_secs(30);
/// The longest wait before trying a damaged download again.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// A download given up over damaged chunks, to be tried again.
#[derive(Debug, Clone)]
struct Retry {
    manifest: Manifest,
    thresholds: Option<TrialThresholds>,
    /// Give-ups of this artifact in a row.
    attempts: u32,
    /// When to try again (set at the first tick after the give-up).
    at: Option<Instant>,
    /// The retry is under way.
    running: bool,
}

impl Retry {
    fn wait(&self) -> Duration {
        let doublings = self.attempts.saturating_sub(1).min(16);
        (RETRY_AFTER * (1u32 << doublings)).min(MAX_RETRY_AFTER)
    }
}

/// Why a step the machine asked for failed: the answers of [`Updater::staged`],
/// [`Updater::download_failed`] and [`Updater::chunk_write_failed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What kind of failure: what the fleet decides by.
    pub kind: ErrorKind,
    /// For people.
    pub reason: String,
}

impl Failure {
    /// A failure of `kind`, described by `reason`.
    pub fn new(kind: ErrorKind, reason: impl std::fmt::Display) -> Failure {
        Failure {
            kind,
            reason: reason.to_string(),
        }
    }
}

/// The device's settings the machine works with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The device's probation policy (a manifest or a rollout may override parts of it).
    pub probation: ProbationPolicy,
    /// Chunk requests in flight per download.
    pub window: usize,
    /// A chunk not received this long after its request is asked for again.
    pub chunk_timeout: Duration,
    /// A download with no new chunk for this long is reported as stalled.
    pub stall_after: Duration,
}

/// What the driver must do, in the order queued.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Record `manifest` as the download in progress (flushed), reserve its space and find
    /// which chunks are already on disk; answer [`Updater::download_ready`] or
    /// [`Updater::download_failed`].
    PrepareDownload(Manifest),
    /// Ask the server for chunks of `artifact` (hex SHA-256) of `model`: `chunks` for the
    /// first time, `again` asked before (timed out, or lost with the link).
    RequestChunks {
        /// Model name.
        model: String,
        /// Artifact digest, hex.
        artifact: String,
        /// Chunk indices asked for the first time.
        chunks: Vec<u32>,
        /// Chunk indices asked for again.
        again: Vec<u32>,
    },
    /// Verify the whole artifact, load it for `slot` off the serving path, check its golden
    /// vectors and latency budget; answer [`Updater::staged`].
    Stage {
        /// The version to stage.
        manifest: Manifest,
        /// The slot it goes into (never the serving one or the last good one).
        slot: Slot,
    },
    /// Persist `record`, forget the download, flush; then swap the staged model in, keeping
    /// the replaced one loaded when `on_trial`. Answer [`Updater::activated`] or
    /// [`Updater::activation_failed`] (nothing was swapped).
    Activate {
        /// Model name.
        name: String,
        /// The record with the new version installed.
        record: ModelRecord,
        /// The new version goes on trial; the replaced model is the one to go back to.
        on_trial: bool,
    },
    /// The trial passed: persist `record` and flush; the model kept to go back to can go.
    Commit {
        /// Model name.
        name: String,
        /// The record with the trial committed.
        record: ModelRecord,
    },
    /// The trial failed: swap the kept model back in, persist `record` and flush. The swap
    /// happens even if the write fails (the boot count then rolls back at start-up).
    RollBack {
        /// Model name.
        name: String,
        /// The record with the trial rolled back.
        record: ModelRecord,
    },
    /// Forget the download of `name`, then remove artifacts nothing refers to.
    Abandon {
        /// Model name.
        name: String,
    },
    /// Persist `record` and flush.
    Persist {
        /// Model name.
        name: String,
        /// The record.
        record: ModelRecord,
    },
    /// Remove artifacts that neither a slot nor a download refers to.
    CollectGarbage,
    /// Keep (or, with `None`, forget) across restarts the back-off of `name`'s download
    /// given up over damaged chunks: its artifact, give-ups in a row and the wait from now.
    Backoff {
        /// Model name.
        name: String,
        /// Artifact (hex SHA-256), attempts, wait.
        backoff: Option<(String, u32, Duration)>,
    },
    /// Record this error as the device's last one (persisted) and report it.
    Error {
        /// The model it concerns.
        model: Option<String>,
        /// The version it concerns.
        version: Option<u64>,
        /// What kind.
        kind: ErrorKind,
        /// Why.
        reason: String,
    },
    /// The update phase of `name` changed.
    Phase {
        /// Model name.
        name: String,
        /// The new phase.
        phase: Phase,
    },
    /// An update of `name` ended this way.
    Ended {
        /// Model name.
        name: String,
        /// How.
        outcome: Outcome,
    },
    /// Publish a state report now ([`Updater::model_states`]).
    Report,
}

/// Which model an arriving chunk belongs to, and what to do with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkFate {
    /// No download wants it.
    Unwanted,
    /// Write it to the artifact, then answer [`Updater::chunk_stored`] or
    /// [`Updater::chunk_write_failed`].
    Store(String),
    /// Already stored.
    Duplicate(String),
    /// Not a chunk of this artifact (an index past its end); dropped without a trace.
    Dropped(String),
    /// It failed its length or digest check (the error is queued).
    Rejected(String),
}

/// Where one model's update stands.
#[derive(Debug, Default)]
enum Step {
    /// Nothing in progress.
    #[default]
    Idle,
    /// [`Action::PrepareDownload`] issued.
    Preparing(Manifest),
    /// Fetching chunks.
    Downloading(Transfer),
    /// [`Action::Stage`] issued.
    Staging { manifest: Manifest, slot: Slot },
    /// [`Action::Activate`] issued with `record`.
    Activating {
        manifest: Manifest,
        record: Box<ModelRecord>,
        on_trial: bool,
    },
    /// The active slot serves on trial.
    Trial(Box<Probation>),
}

impl Step {
    /// The version this step works on, if any.
    fn manifest(&self) -> Option<&Manifest> {
        match self {
            Step::Idle | Step::Trial(_) => None,
            Step::Preparing(m) | Step::Staging { manifest: m, .. } => Some(m),
            Step::Activating { manifest, .. } => Some(manifest),
            Step::Downloading(t) => Some(t.manifest()),
        }
    }
}

/// One model's state.
#[derive(Debug, Default)]
struct ModelUpdate {
    /// What the store holds for it.
    record: ModelRecord,
    /// A model of it is loaded and serving.
    serving: bool,
    step: Step,
    /// A desired version (and its rollout's thresholds) that waits for the current staging
    /// or trial to end.
    deferred: Option<(Manifest, Option<TrialThresholds>)>,
    /// The rollout's probation thresholds for the version being installed.
    thresholds: Option<TrialThresholds>,
    /// Recent requests of the committed serving model: the next trial's baseline.
    window: Window,
    /// The update shown in reports.
    progress: Option<UpdateProgress>,
    /// Bad copies received per chunk index of the current download.
    bad_chunks: BTreeMap<u32, u32>,
}

/// The update logic of every model on the device.
#[derive(Debug)]
pub struct Updater {
    settings: Settings,
    models: BTreeMap<String, ModelUpdate>,
    /// Artifacts that failed this run for a reason about the version itself (its golden
    /// vectors, loading, latency budget): not tried again until a new version is desired.
    rejected: BTreeSet<String>,
    /// Per model, a download given up over damaged chunks, tried again after a back-off.
    retries: BTreeMap<String, Retry>,
    /// Per model, a back-off kept in the store from before a restart, waiting for the
    /// desired state to name its artifact again: artifact, attempts, until.
    held: BTreeMap<String, (String, u32, Instant)>,
    online: bool,
    actions: VecDeque<Action>,
    report_due: bool,
    report_now: bool,
    /// Download progress changed since the last report.
    progress_due: bool,
    last_report: Option<Instant>,
    /// Something changed that [`Updater::handle_timeout`] must see at once (a download
    /// started, the link came back).
    poll_now: bool,
}

impl Updater {
    /// A machine for the store's `records` (name, record, whether a slot of it loaded and
    /// serves), as the driver found them at start-up.
    pub fn new(settings: Settings, records: Vec<(String, ModelRecord, bool)>) -> Self {
        let models = records
            .into_iter()
            .map(|(name, record, serving)| {
                let update = ModelUpdate {
                    record,
                    serving,
                    ..ModelUpdate::default()
                };
                (name, update)
            })
            .collect();
        Updater {
            settings,
            models,
            rejected: BTreeSet::new(),
            retries: BTreeMap::new(),
            held: BTreeMap::new(),
            online: false,
            actions: VecDeque::new(),
            report_due: true,
            report_now: false,
            progress_due: false,
            last_report: None,
            poll_now: false,
        }
    }

    /// The next action to carry out.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The record the machine holds for `name`.
    pub fn record(&self, name: &str) -> Option<&ModelRecord> {
        self.models.get(name).map(|m| &m.record)
    }

    /// Whether `name` is staging the artifact `sha256` (a staging result for anything else
    /// will be ignored).
    pub fn is_staging(&self, name: &str, sha256: &str) -> bool {
        matches!(
            self.models.get(name).map(|m| &m.step),
            Some(Step::Staging { manifest, .. }) if manifest.sha256 == sha256
        )
    }

    /// The artifacts (hex SHA-256) being downloaded now.
    pub fn downloads(&self) -> impl Iterator<Item = &str> {
        self.models.values().filter_map(|m| match &m.step {
            Step::Downloading(t) => Some(t.manifest().sha256.as_str()),
            _ => None,
        })
    }

    /// The manifest of `name`'s download in progress.
    pub fn downloading(&self, name: &str) -> Option<&Manifest> {
        match &self.models.get(name)?.step {
            Step::Downloading(t) => Some(t.manifest()),
            _ => None,
        }
    }

    /// An error outside the machine's steps (a desired state that failed verification):
    /// recorded and reported like its own.
    pub fn note_error(
        &mut self,
        kind: ErrorKind,
        model: Option<&str>,
        version: Option<u64>,
        reason: String,
    ) {
        self.error_of(kind, model, version, reason);
    }

    /// Every model's slots and update, for the state report.
    pub fn model_states(&self) -> BTreeMap<String, ModelState> {
        let content = |m: &Option<Manifest>| {
            m.as_ref().map(|m| SlotContent {
                version: m.version,
                sha256: m.sha256.clone(),
            })
        };
        self.models
            .iter()
            .filter(|(_, m)| m.record != ModelRecord::default() || m.progress.is_some())
            .map(|(name, m)| {
                let state = ModelState {
                    active: m.record.active,
                    a: content(&m.record.a),
                    b: content(&m.record.b),
                    update: m.progress.clone(),
                };
                (name.clone(), state)
            })
            .collect()
    }

    /// When the driver must call [`Updater::handle_timeout`] next at the latest.
    pub fn next_wake(&self, now: Instant) -> Instant {
        if self.poll_now {
            return now;
        }
        let mut wake = now + IDLE_WAKE;
        for m in self.models.values() {
            match &m.step {
                Step::Downloading(t) => {
                    if let Some(at) = t.poll_timeout() {
                        wake = wake.min(at);
                    }
                }
                Step::Trial(p) => wake = wake.min(p.deadline()),
                _ => {}
            }
        }
        for r in self.retries.values().filter(|r| !r.running) {
            wake = wake.min(r.at.unwrap_or(now));
        }
        if self.report_due {
            let at = match self.last_report {
                Some(last) if !self.report_now => last + REPORT_EVERY,
                _ => now,
            };
            wake = wake.min(at);
        }
        if self.progress_due {
            wake = wake.min(self.last_report.map_or(now, |l| l + PROGRESS_EVERY));
        }
        wake
    }

    // ---- start-up ----

    /// Start-up found a back-off of `name`'s download of `sha256` (given up `attempts` times
    /// in a row over damaged chunks) that lasts until `until`: if the desired state names
    /// that artifact, it waits until then.
    pub fn restore_backoff(&mut self, name: &str, sha256: String, attempts: u32, until: Instant) {
        self.held.insert(name.into(), (sha256, attempts, until));
    }

    /// Start-up rolled `name` back (a crash loop, or its trial version no longer loads).
    pub fn report_rollback(&mut self, name: &str, version: u64, reason: String) {
        let kind = ErrorKind::CrashLoop;
        self.set_phase(name, Phase::Failed);
        self.push(Action::Ended {
            name: name.into(),
            outcome: Outcome::RolledBack,
        });
        self.error_of(kind, Some(name), Some(version), reason);
    }

    /// Start-up found `name`'s active slot on trial, with the last good model loaded beside
    /// it: the trial starts again, judged from `now`.
    pub fn resume_trial(&mut self, name: &str, now: Instant) {
        let Some(m) = self.models.get(name) else {
            return;
        };
        let (Some(manifest), Some(trial)) = (m.record.serving(), m.record.trial) else {
            return;
        };
        let policy = self.policy_for(manifest, trial.thresholds);
        let (version, size) = (manifest.version, manifest.size);
        let m = self.models.get_mut(name).expect("looked up above");
        m.step = Step::Trial(Box::new(Probation::new(policy, Window::default(), now)));
        m.progress = Some(progress(version, Phase::Probation, size, size));
        self.set_phase(name, Phase::Probation);
        self.want_report(false);
    }

    /// Start-up found a download in progress with the chunks `have` already on disk.
    pub fn resume_download(&mut self, manifest: Manifest, have: Vec<bool>) {
        info!(model = %manifest.name, version = manifest.version, "resuming download");
        let name = manifest.name.clone();
        let m = self.models.entry(name.clone()).or_default();
        m.step = Step::Preparing(manifest.clone());
        self.download_ready(&name, &manifest.sha256, have);
    }

    // ---- the link ----

    /// Connected to the broker: chunk requests may go out.
    pub fn handle_connected(&mut self) {
        self.online = true;
        self.poll_now = true;
        self.want_report(true);
    }

    /// The broker link is down: requests in flight are lost; none go out until it is back.
    pub fn handle_disconnected(&mut self) {
        self.online = false;
        for m in self.models.values_mut() {
            if let Step::Downloading(t) = &mut m.step {
                t.handle_disconnect();
            }
        }
    }

    /// A verified desired state names these versions, each with its rollout's probation
    /// thresholds if it set any.
    pub fn handle_desired(&mut self, models: &[(Manifest, Option<TrialThresholds>)]) {
        for (manifest, thresholds) in models {
            self.converge(manifest.clone(), *thresholds);
        }
        self.want_report(false);
    }

    // ---- downloads ----

    /// The answer to [`Action::PrepareDownload`]: the chunks `have` are already on disk.
    pub fn download_ready(&mut self, name: &str, sha256: &str, have: Vec<bool>) {
        let Some(m) = self.models.get_mut(name) else {
            return;
        };
        let Step::Preparing(manifest) = &m.step else {
            return;
        };
        if manifest.sha256 != sha256 {
            return;
        }
        let manifest = manifest.clone();
        let s = &self.settings;
        let transfer = Transfer::new(manifest.clone(), have, s.window, s.chunk_timeout)
            .with_stall_deadline(s.stall_after);
        m.progress = Some(progress(
            manifest.version,
            Phase::Downloading,
            transfer.received_bytes(),
            manifest.download_size(),
        ));
        m.bad_chunks.clear();
        let complete = transfer.is_complete();
        m.step = Step::Downloading(transfer);
        self.poll_now = true;
        self.set_phase(name, Phase::Downloading);
        self.want_report(false);
        if complete {
            // Every byte is already on disk (a restart after the download): stage it.
            self.stage(name);
        }
    }

    /// The answer to [`Action::PrepareDownload`]: it could not start (no space, store error).
    pub fn download_failed(&mut self, name: &str, sha256: &str, failure: Failure) {
        if self.current(name, sha256).is_some() {
            self.abandon(name, failure.kind, failure.reason);
        }
    }

    /// A chunk of `artifact` (hex SHA-256) arrived.
    pub fn handle_chunk(&mut self, artifact: &str, index: u32, data: &[u8]) -> ChunkFate {
        let Some((name, m)) = self.models.iter_mut().find(
            |(_, m)| matches!(&m.step, Step::Downloading(t) if t.manifest().sha256 == artifact),
        ) else {
            return ChunkFate::Unwanted;
        };
        let name = name.clone();
        let Step::Downloading(transfer) = &mut m.step else {
            unreachable!("matched above");
        };
        let version = transfer.manifest().version;
        let e = match transfer.handle_chunk(index, data) {
            Ok(Accepted::Store) => return ChunkFate::Store(name),
            Ok(Accepted::Duplicate) => return ChunkFate::Duplicate(name),
            // An index outside the artifact is not a copy of any chunk: no state is kept for
            // it (hostile replies must not grow memory).
            Err(e @ ChunkError::OutOfRange { .. }) => {
                warn!(model = %name, error = %e, "chunk dropped");
                return ChunkFate::Dropped(name);
            }
            Err(e) => e,
        };
        let count = m.bad_chunks.entry(index).or_insert(0);
        *count += 1;
        let count = *count;
        warn!(model = %name, error = %e, attempt = count, "chunk rejected");
        if count >= MAX_BAD_CHUNKS {
            self.give_up_for_now(&name, format!("update rejected: {e}"));
        } else {
            self.error_of(
                ErrorKind::Chunk,
                Some(&name),
                Some(version),
                format!("chunk rejected: {e}"),
            );
        }
        ChunkFate::Rejected(name)
    }

    /// The answer to [`ChunkFate::Store`]: the chunk is written.
    pub fn chunk_stored(&mut self, name: &str, index: u32) {
        let Some(m) = self.models.get_mut(name) else {
            return;
        };
        let Step::Downloading(transfer) = &mut m.step else {
            return;
        };
        transfer.handle_stored(index);
        if let Some(p) = m.progress.as_mut() {
            p.received_bytes = transfer.received_bytes();
        }
        let complete = transfer.is_complete();
        self.progress_due = true;
        if complete {
            self.stage(name);
        }
    }

    /// The answer to [`ChunkFate::Store`]: writing the chunk failed.
    pub fn chunk_write_failed(&mut self, name: &str, failure: Failure) {
        if matches!(
            self.models.get(name).map(|m| &m.step),
            Some(Step::Downloading(_))
        ) {
            let reason = format!("storing chunk: {}", failure.reason);
            self.abandon(name, failure.kind, reason);
        }
    }

    // ---- staging and activation ----

    /// The answer to [`Action::Stage`]: `Ok` when the artifact verified, loaded and passed
    /// its checks; what failed otherwise.
    pub fn staged(&mut self, name: &str, sha256: &str, result: Result<(), Failure>) {
        let Some(m) = self.models.get(name) else {
            return;
        };
        let Step::Staging { manifest, slot } = &m.step else {
            return;
        };
        if manifest.sha256 != sha256 {
            return;
        }
        if let Err(e) = result {
            self.abandon(name, e.kind, format!("update rejected: {}", e.reason));
            return;
        }
        let (manifest, slot) = (manifest.clone(), *slot);
        let on_trial = m.serving && self.policy_for(&manifest, m.thresholds).enabled();
        let mut record = m.record.clone();
        if let Err(e) = record.install(slot, manifest.clone(), on_trial) {
            self.abandon(name, ErrorKind::Failed, format!("recording slot: {e}"));
            return;
        }
        if let Some(trial) = record.trial.as_mut() {
            trial.thresholds = m.thresholds;
        }
        let m = self.models.get_mut(name).expect("looked up above");
        m.step = Step::Activating {
            manifest,
            record: Box::new(record.clone()),
            on_trial,
        };
        self.push(Action::Activate {
            name: name.into(),
            record,
            on_trial,
        });
    }

    /// The answer to [`Action::Activate`]: the new version is persisted and serves.
    pub fn activated(&mut self, name: &str, now: Instant) {
        let Some(m) = self.models.get_mut(name) else {
            return;
        };
        let Step::Activating { .. } = &m.step else {
            return;
        };
        let Step::Activating {
            manifest,
            record,
            on_trial,
        } = std::mem::take(&mut m.step)
        else {
            unreachable!("matched above");
        };
        m.record = *record;
        m.serving = true;
        m.progress = Some(progress(
            manifest.version,
            Phase::Active,
            manifest.size,
            manifest.size,
        ));
        self.push(Action::Ended {
            name: name.into(),
            outcome: Outcome::Activated,
        });
        self.push(Action::CollectGarbage);
        if on_trial {
            let thresholds = self.models[name].record.trial.and_then(|t| t.thresholds);
            let policy = self.policy_for(&manifest, thresholds);
            info!(
                model = name,
                version = manifest.version,
                requests = policy.requests,
                seconds = policy.seconds,
                "on probation"
            );
            let m = self.models.get_mut(name).expect("looked up above");
            let baseline = std::mem::take(&mut m.window);
            m.step = Step::Trial(Box::new(Probation::new(policy, baseline, now)));
            if let Some(p) = m.progress.as_mut() {
                p.phase = Phase::Probation;
            }
            self.set_phase(name, Phase::Probation);
        } else {
            let m = self.models.get_mut(name).expect("looked up above");
            m.window = Window::default();
            self.set_phase(name, Phase::Active);
            self.next_deferred(name);
        }
        self.want_report(true);
    }

    /// The answer to [`Action::Activate`]: the record could not be persisted; nothing was
    /// swapped.
    pub fn activation_failed(&mut self, name: &str, reason: String) {
        if matches!(
            self.models.get(name).map(|m| &m.step),
            Some(Step::Activating { .. })
        ) {
            self.abandon(name, ErrorKind::Failed, format!("recording slot: {reason}"));
        }
    }

    // ---- serving and probation ----

    /// One request finished on `model`'s `slot`.
    pub fn handle_outcome(&mut self, model: &str, slot: Slot, ok: bool, latency: Duration) {
        let Some(m) = self.models.get_mut(model) else {
            return;
        };
        if m.record.active != Some(slot) {
            return; // Finished on a model swapped out since.
        }
        match &mut m.step {
            Step::Trial(p) => p.record(ok, latency),
            _ => m.window.record(ok, latency),
        }
    }

    /// The clock: judges trials, asks for chunks, notices stalls, sends reports when due.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.poll_now = false;
        self.retry_due(now);
        self.judge_trials(now);
        self.poll_transfers(now);
        let since = |every| self.last_report.is_none_or(|l| now >= l + every);
        let routine = self.report_due && (self.report_now || since(REPORT_EVERY));
        let progress = self.progress_due && since(PROGRESS_EVERY);
        if routine || progress {
            self.push(Action::Report);
            self.last_report = Some(now);
            self.report_due = false;
            self.report_now = false;
            self.progress_due = false;
        }
    }

    /// The agent stops cleanly: running trials do not count this start-up as a crash.
    pub fn stop(&mut self) {
        let mut persist = Vec::new();
        for (name, m) in &mut self.models {
            if let Step::Trial(_) = m.step {
                m.record.stop_cleanly();
                persist.push(Action::Persist {
                    name: name.clone(),
                    record: m.record.clone(),
                });
            }
        }
        self.actions.extend(persist);
    }

    // ---- internals ----

    fn push(&mut self, action: Action) {
        self.actions.push_back(action);
    }

    fn want_report(&mut self, now: bool) {
        self.report_due = true;
        self.report_now |= now;
    }

    fn set_phase(&mut self, name: &str, phase: Phase) {
        self.push(Action::Phase {
            name: name.into(),
            phase,
        });
    }

    /// Records and reports an error of `kind`.
    fn error_of(
        &mut self,
        kind: ErrorKind,
        model: Option<&str>,
        version: Option<u64>,
        reason: String,
    ) {
        warn!(model, version, ?kind, %reason, "update error");
        self.push(Action::Error {
            model: model.map(str::to_string),
            version,
            kind,
            reason,
        });
        self.want_report(true);
    }

    /// The device's policy, with the manifest's override, with the rollout's.
    fn policy_for(&self, manifest: &Manifest, rollout: Option<TrialThresholds>) -> ProbationPolicy {
        let mut policy = self.settings.probation.clone();
        if let Some(spec) = manifest.probation {
            policy.requests = spec.requests;
            policy.seconds = spec.seconds;
        }
        if let Some(t) = rollout {
            policy.requests = t.requests.unwrap_or(policy.requests);
            policy.seconds = t.seconds.unwrap_or(policy.seconds);
            if let Some(permille) = t.max_error_permille {
                policy.max_error_rate = f64::from(permille) / 1000.0;
            }
            if let Some(percent) = t.max_p99_percent {
                policy.max_p99_ratio = f64::from(percent) / 100.0;
            }
        }
        policy
    }

    /// The manifest `name`'s current step works on, if it is `sha256`.
    fn current(&self, name: &str, sha256: &str) -> Option<&Manifest> {
        self.models
            .get(name)?
            .step
            .manifest()
            .filter(|m| m.sha256 == sha256)
    }

    /// Moves one model towards `manifest`, judged on trial by the rollout's `thresholds`.
    fn converge(&mut self, manifest: Manifest, thresholds: Option<TrialThresholds>) {
        let name = manifest.name.clone();
        let m = self.models.entry(name.clone()).or_default();
        match m.record.admit(&manifest) {
            // Serving, or rolled back and reported then: a download of anything else is no
            // longer wanted.
            Admission::Serving | Admission::Failed => {
                m.deferred = None;
                self.cancel_update(&name);
                return;
            }
            // One trial at a time: the last good slot must not be overwritten. The desired
            // state going back to the last good version (a fleet rollback the trial version's
            // operators allowed) ends the trial now.
            Admission::Wait => {
                let previous = m.record.trial.and_then(|t| m.record.slot(t.previous));
                let allowed = m
                    .record
                    .serving()
                    .and_then(|s| s.fallback_to)
                    .is_some_and(|f| manifest.version >= f);
                if allowed && previous.is_some_and(|p| p.sha256 == manifest.sha256) {
                    let reason = format!(
                        "the desired state went back to version {}",
                        manifest.version
                    );
                    self.end_trial(&name, Verdict::Rollback(reason), Window::default());
                } else {
                    m.deferred = Some((manifest, thresholds));
                }
                return;
            }
            Admission::Rollback { highest } => {
                self.error_of(
                    ErrorKind::Downgrade,
                    Some(&name),
                    Some(manifest.version),
                    format!(
                        "version {} of {name} rejected: version {highest} already installed \
                         (rollback)",
                        manifest.version
                    ),
                );
                return;
            }
            Admission::Install => {}
        }
        if self.rejected.contains(&manifest.sha256) {
            return; // Already failed; reported then. A new version will retry.
        }
        if let Some((sha256, attempts, until)) = self.held.remove(&name) {
            if sha256 == manifest.sha256 {
                // Given up before a restart: the back-off runs on.
                let retry = Retry {
                    manifest,
                    thresholds,
                    attempts,
                    at: Some(until),
                    running: false,
                };
                self.retries.insert(name, retry);
                self.poll_now = true;
                return;
            }
            self.push(Action::Backoff {
                name: name.clone(),
                backoff: None,
            });
        }
        match self.retries.get_mut(&name) {
            // Given up over damaged chunks: tried again when its back-off ends.
            Some(r) if r.manifest.sha256 == manifest.sha256 && !r.running => {
                r.thresholds = thresholds;
                return;
            }
            Some(r) if r.manifest.sha256 != manifest.sha256 => {
                self.retries.remove(&name);
                self.push(Action::Backoff {
                    name: name.clone(),
                    backoff: None,
                });
            }
            _ => {}
        }
        let m = self.models.entry(name.clone()).or_default();
        let same = m.step.manifest().map(|c| &c.sha256) == Some(&manifest.sha256);
        match &m.step {
            Step::Preparing(_) | Step::Downloading(_) | Step::Staging { .. } if same => {
                m.thresholds = thresholds; // The rollout may have changed them.
                m.deferred = None; // The latest desired state wins.
                return;
            }
            Step::Staging { .. } | Step::Activating { .. } | Step::Trial(_) => {
                if !same {
                    m.deferred = Some((manifest, thresholds));
                }
                return;
            }
            _ => {}
        }
        info!(model = %name, version = manifest.version, size = manifest.size, "update starts");
        m.deferred = None;
        m.thresholds = thresholds;
        m.progress = Some(progress(
            manifest.version,
            Phase::Downloading,
            0,
            manifest.download_size(),
        ));
        m.step = Step::Preparing(manifest.clone());
        self.push(Action::PrepareDownload(manifest));
    }

    /// Drops an update no longer desired (not an error).
    fn cancel_update(&mut self, name: &str) {
        let Some(m) = self.models.get_mut(name) else {
            return;
        };
        // A staging in progress is dropped too: its result, when it comes, matches no step
        // and is ignored. (Activating is answered before any other event.)
        if !matches!(
            m.step,
            Step::Preparing(_) | Step::Downloading(_) | Step::Staging { .. }
        ) {
            return;
        }
        info!(model = name, "update no longer desired; dropped");
        m.step = Step::Idle;
        m.progress = None;
        let phase = if m.record.trial.is_some() {
            Phase::Probation
        } else {
            Phase::Active
        };
        self.push(Action::Abandon { name: name.into() });
        self.set_phase(name, phase);
    }

    /// Converges to the version that waited for the step that just ended.
    fn next_deferred(&mut self, name: &str) {
        if let Some((next, thresholds)) = self.models.get_mut(name).and_then(|m| m.deferred.take())
        {
            self.converge(next, thresholds);
        }
    }

    /// Gives up on the update of `name`: the serving model is untouched, the partial
    /// artifact removed, the reason reported.
    fn abandon(&mut self, name: &str, kind: ErrorKind, reason: String) {
        let Some(m) = self.models.get_mut(name) else {
            return;
        };
        let version = m.step.manifest().map(|v| v.version);
        if let Some(manifest) = m.step.manifest() {
            self.rejected.insert(manifest.sha256.clone());
        }
        m.step = Step::Idle;
        m.bad_chunks.clear();
        if let Some(p) = m.progress.as_mut() {
            p.phase = Phase::Failed;
        }
        self.push(Action::Abandon { name: name.into() });
        self.set_phase(name, Phase::Failed);
        self.push(Action::Ended {
            name: name.into(),
            outcome: Outcome::Rejected,
        });
        self.error_of(kind, Some(name), version, reason);
        self.next_deferred(name);
    }

    /// Gives up on the download of `name` because its chunks kept arriving damaged: as
    /// [`Updater::abandon`], but the version is not refused. It is tried again after a
    /// back-off ([`RETRY_AFTER`], doubling up to [`MAX_RETRY_AFTER`]), unless another version
    /// is wanted by then.
    fn give_up_for_now(&mut self, name: &str, reason: String) {
        let Some(m) = self.models.get(name) else {
            return;
        };
        let Some(manifest) = m.step.manifest().cloned() else {
            return;
        };
        let thresholds = m.thresholds;
        let attempts = self
            .retries
            .get(name)
            .filter(|r| r.manifest.sha256 == manifest.sha256)
            .map_or(0, |r| r.attempts)
            + 1;
        let retry = Retry {
            manifest,
            thresholds,
            attempts,
            at: None,
            running: false,
        };
        let reason = format!("{reason}; trying again in {} s", retry.wait().as_secs());
        let sha = retry.manifest.sha256.clone();
        self.abandon(name, ErrorKind::Chunk, reason);
        self.rejected.remove(&sha);
        // A version that waited behind this download took its place: nothing to retry.
        let backoff = if matches!(self.models.get(name).map(|m| &m.step), Some(Step::Idle)) {
            let kept = (sha, retry.attempts, retry.wait());
            self.retries.insert(name.into(), retry);
            Some(kept)
        } else {
            self.retries.remove(name);
            None
        };
        self.push(Action::Backoff {
            name: name.into(),
            backoff,
        });
    }

    /// Starts the retries whose back-off has ended (and times those that just began).
    fn retry_due(&mut self, now: Instant) {
        let mut due = Vec::new();
        for r in self.retries.values_mut().filter(|r| !r.running) {
            let at = *r.at.get_or_insert(now + r.wait());
            if now >= at {
                r.running = true;
                due.push((r.manifest.clone(), r.thresholds));
            }
        }
        for (manifest, thresholds) in due {
            info!(model = %manifest.name, version = manifest.version, "trying the damaged download again");
            self.converge(manifest, thresholds);
            self.want_report(false);
        }
    }

    fn stage(&mut self, name: &str) {
        if self.retries.remove(name).is_some() {
            self.push(Action::Backoff {
                name: name.into(),
                backoff: None,
            });
        }
        let Some(m) = self.models.get_mut(name) else {
            return;
        };
        let Some(manifest) = m.step.manifest().cloned() else {
            return;
        };
        let slot = m.record.inactive();
        info!(model = name, version = manifest.version, %slot, "artifact complete; staging");
        m.step = Step::Staging {
            manifest: manifest.clone(),
            slot,
        };
        if let Some(p) = m.progress.as_mut() {
            p.phase = Phase::Staging;
        }
        self.set_phase(name, Phase::Staging);
        self.push(Action::Stage { manifest, slot });
        self.want_report(false);
    }

    fn judge_trials(&mut self, now: Instant) {
        let verdicts: Vec<(String, Verdict, Window)> = self
            .models
            .iter()
            .filter_map(|(name, m)| match &m.step {
                Step::Trial(p) => Some((name.clone(), p.verdict(now), p.window().clone())),
                _ => None,
            })
            .filter(|(_, v, _)| *v != Verdict::Continue)
            .collect();
        for (name, verdict, window) in verdicts {
            self.end_trial(&name, verdict, window);
        }
    }

    /// Commits or rolls back `name`'s trial, then converges to a version that waited for it.
    fn end_trial(&mut self, name: &str, verdict: Verdict, window: Window) {
        let Some(m) = self.models.get_mut(name) else {
            return;
        };
        m.step = Step::Idle;
        let tried = m.record.serving().map_or(0, |v| v.version);
        match verdict {
            Verdict::Rollback(reason) => {
                m.record.roll_back();
                let back = m.record.serving().map(|v| v.version);
                if let Some(p) = m.progress.as_mut() {
                    p.phase = Phase::Failed;
                }
                let record = m.record.clone();
                self.push(Action::RollBack {
                    name: name.into(),
                    record,
                });
                self.set_phase(name, Phase::Failed);
                self.push(Action::Ended {
                    name: name.into(),
                    outcome: Outcome::RolledBack,
                });
                let reason = match back {
                    Some(v) => format!("rolled back to version {v}: {reason}"),
                    None => format!("rolled back: {reason}"),
                };
                self.error_of(ErrorKind::RolledBack, Some(name), Some(tried), reason);
            }
            _ => {
                m.record.commit();
                m.window = window;
                if let Some(p) = m.progress.as_mut() {
                    p.phase = Phase::Active;
                }
                info!(model = %name, version = tried, "committed as last good");
                let record = m.record.clone();
                self.push(Action::Commit {
                    name: name.into(),
                    record,
                });
                self.set_phase(name, Phase::Active);
                self.push(Action::Ended {
                    name: name.into(),
                    outcome: Outcome::Committed,
                });
                self.want_report(true);
            }
        }
        self.next_deferred(name);
    }

    fn poll_transfers(&mut self, now: Instant) {
        let mut queued = Vec::new();
        for (name, m) in &mut self.models {
            let Step::Downloading(t) = &mut m.step else {
                continue;
            };
            if let Some(idle) = t.poll_stalled(now) {
                let v = t.manifest();
                let reason = format!(
                    "download stalled: no chunk of {name} v{} for {}s ({} of {} bytes); still \
                     retrying",
                    v.version,
                    idle.as_secs(),
                    t.received_bytes(),
                    v.size
                );
                queued.push(Err((name.clone(), v.version, reason)));
            }
            if !self.online {
                continue;
            }
            let asks = t.poll_request(now);
            if !asks.is_empty() {
                queued.push(Ok(Action::RequestChunks {
                    model: name.clone(),
                    artifact: t.manifest().sha256.clone(),
                    chunks: asks.first,
                    again: asks.again,
                }));
            }
        }
        for q in queued {
            match q {
                Ok(action) => self.push(action),
                Err((name, version, reason)) => {
                    self.error_of(ErrorKind::Stalled, Some(&name), Some(version), reason)
                }
            }
        }
    }
}

fn progress(version: u64, phase: Phase, received_bytes: u64, total_bytes: u64) -> UpdateProgress {
    UpdateProgress {
        version,
        phase,
        received_bytes,
        total_bytes,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use proptest::prelude::*;

    const M: &str = "m";

    fn bytes(version: u64) -> Vec<u8> {
        (0..10)
            .map(|i| (version as u8).wrapping_mul(31) ^ i)
            .collect()
    }

    /// Version `version`; every third one allows a fleet rollback by two versions.
    fn manifest(version: u64) -> Manifest {
        let mut m = modelcast_proto::verify::fixture::manifest(M, version, &bytes(version), 4);
        if version.is_multiple_of(3) {
            m.fallback_to = Some(version - 2);
        }
        m
    }

    fn policy() -> ProbationPolicy {
        ProbationPolicy {
            requests: 5,
            seconds: 10,
            max_trial_boots: 2,
            ..ProbationPolicy::default()
        }
    }

    fn settings() -> Settings {
        Settings {
            probation: policy(),
            window: 2,
            chunk_timeout: Duration::from_secs(1),
            stall_after: Duration::from_secs(5),
        }
    }

    /// A driver with a simulated disk and engine that carries out every action, answers what
    /// asks for an answer, and checks the invariants as it goes.
    struct Sim {
        m: Updater,
        now: Instant,
        online: bool,
        /// The store: records and downloads, as flushed.
        disk: BTreeMap<String, ModelRecord>,
        pending: BTreeMap<String, Manifest>,
        chunks: BTreeMap<String, BTreeSet<u32>>,
        /// Artifacts that passed staging (verified, loaded, checked).
        verified: BTreeSet<String>,
        staging: Vec<(Manifest, Slot)>,
        requested: BTreeSet<(String, u32)>,
        /// The engine: what serves, and what is kept to swap back to.
        serving: Option<(Slot, u64)>,
        kept: Option<(Slot, u64)>,
        /// The running trial: when it started, requests it answered, and the requests and
        /// time after which it may be judged.
        trial: Option<(Instant, u32, u32, Duration)>,
        /// Every error reported: model, version, reason and its kind.
        errors: Vec<(Option<String>, Option<u64>, String, ErrorKind)>,
        commits: u32,
        rollbacks: u32,
        /// The next write to the store fails.
        break_write: bool,
        floor: u64,
        /// How far the serving version allows the floor to drop (its signed `fallback_to`).
        fallback_floor: Option<u64>,
        /// The broker's retained desired state: delivered again at every (re)connection.
        retained: Option<(Manifest, Option<TrialThresholds>)>,
        /// Back-offs of downloads given up over damaged chunks, as the store keeps them.
        backoffs: BTreeMap<String, (String, u32, Instant)>,
    }

    impl Sim {
        fn new() -> Self {
            let now = Instant::now();
            let mut sim = Sim {
                m: Updater::new(settings(), Vec::new()),
                now,
                online: true,
                disk: BTreeMap::new(),
                pending: BTreeMap::new(),
                chunks: BTreeMap::new(),
                verified: BTreeSet::new(),
                staging: Vec::new(),
                requested: BTreeSet::new(),
                serving: None,
                kept: None,
                trial: None,
                errors: Vec::new(),
                commits: 0,
                rollbacks: 0,
                break_write: false,
                floor: 0,
                fallback_floor: None,
                retained: None,
                backoffs: BTreeMap::new(),
            };
            sim.m.handle_connected();
            sim
        }

        fn write_ok(&mut self) -> bool {
            !std::mem::take(&mut self.break_write)
        }

        /// What the driver's loop does after an event: the clock, then every action, until
        /// the machine wants nothing before a later time.
        fn run(&mut self) {
            for _ in 0..10 {
                self.m.handle_timeout(self.now);
                self.drain();
                if self.m.next_wake(self.now) > self.now {
                    break;
                }
            }
            self.check();
        }

        fn drain(&mut self) {
            let mut unreported: Option<String> = None;
            while let Some(action) = self.m.poll_action() {
                match action {
                    Action::PrepareDownload(manifest) => {
                        let have: Vec<bool> = (0..manifest.chunk_count())
                            .map(|i| {
                                self.chunks
                                    .get(&manifest.sha256)
                                    .is_some_and(|c| c.contains(&i))
                            })
                            .collect();
                        if self.write_ok() {
                            self.pending.insert(manifest.name.clone(), manifest.clone());
                            self.m
                                .download_ready(&manifest.name, &manifest.sha256, have);
                        } else {
                            self.m.download_failed(
                                &manifest.name,
                                &manifest.sha256,
                                Failure::new(ErrorKind::NoSpace, "no space"),
                            );
                        }
                    }
                    Action::RequestChunks {
                        artifact,
                        chunks,
                        again,
                        ..
                    } => {
                        assert!(self.online, "chunk request while the link is down");
                        for c in chunks.into_iter().chain(again) {
                            self.requested.insert((artifact.clone(), c));
                        }
                    }
                    Action::Stage { manifest, slot } => {
                        let record = &self.disk.get(M).cloned().unwrap_or_default();
                        assert_ne!(record.active, Some(slot), "staging into the serving slot");
                        assert_ne!(
                            record.trial.map(|t| t.previous),
                            Some(slot),
                            "staging into the last good slot"
                        );
                        self.staging.push((manifest, slot));
                    }
                    Action::Activate {
                        name,
                        record,
                        on_trial,
                    } => {
                        let new = record.serving().expect("activates a version").clone();
                        assert!(self.verified.contains(&new.sha256), "activating unverified");
                        if !self.write_ok() {
                            self.m.activation_failed(&name, "disk".into());
                            continue;
                        }
                        self.disk.insert(name.clone(), record.clone());
                        self.pending.remove(&name);
                        let replaced = self.serving.replace((record.active.unwrap(), new.version));
                        self.kept = if on_trial { replaced } else { None };
                        self.trial = on_trial.then(|| self.judged_after(&record));
                        self.m.activated(&name, self.now);
                    }
                    Action::Commit { name, record } => {
                        let (started, requests, need, time) =
                            self.trial.take().expect("commit without trial");
                        assert!(
                            requests >= need || self.now >= started + time,
                            "committed after {requests} requests and {:?}",
                            self.now - started
                        );
                        assert!(record.trial.is_none());
                        self.disk.insert(name, record);
                        self.kept = None;
                        self.commits += 1;
                    }
                    Action::RollBack { name, record } => {
                        self.trial = None;
                        self.serving = self.kept.take();
                        assert!(self.serving.is_some(), "nothing to go back to");
                        self.disk.insert(name.clone(), record);
                        self.rollbacks += 1;
                        unreported = Some(name);
                    }
                    Action::Abandon { name } => {
                        self.pending.remove(&name);
                    }
                    Action::Persist { name, record } => {
                        self.disk.insert(name, record);
                    }
                    Action::CollectGarbage | Action::Phase { .. } | Action::Ended { .. } => {}
                    Action::Backoff { name, backoff } => match backoff {
                        Some((sha, attempts, wait)) => {
                            let until = self.now + wait;
                            self.backoffs.insert(name, (sha, attempts, until));
                        }
                        None => {
                            self.backoffs.remove(&name);
                        }
                    },
                    Action::Error {
                        model,
                        version,
                        kind,
                        reason,
                    } => {
                        if model.is_some() && model == unreported {
                            assert!(
                                matches!(kind, ErrorKind::RolledBack | ErrorKind::CrashLoop),
                                "{kind:?}: {reason}"
                            );
                            unreported = None;
                        }
                        self.errors.push((model, version, reason, kind));
                    }
                    Action::Report => {}
                }
            }
            assert_eq!(unreported, None, "a rollback without its report");
        }

        fn check(&mut self) {
            let disk = self.disk.get(M).cloned().unwrap_or_default();
            let held = self.m.record(M).cloned().unwrap_or_default();
            assert_eq!(
                held, disk,
                "the machine acts on a record the store does not hold"
            );
            if let Some(serving) = disk.serving() {
                assert!(
                    self.verified.contains(&serving.sha256),
                    "serving unverified"
                );
                assert_eq!(self.serving, Some((disk.active.unwrap(), serving.version)));
            } else {
                assert_eq!(self.serving, None);
            }
            if disk.highest_version < self.floor {
                let allowed = self
                    .fallback_floor
                    .expect("version floor went down unsigned");
                assert!(
                    disk.highest_version >= allowed,
                    "fell back past the signed window"
                );
            }
            self.floor = disk.highest_version;
            self.fallback_floor = disk.serving().and_then(|s| s.fallback_to);
        }

        fn desire(&mut self, version: u64) {
            self.desire_with(version, None);
        }

        /// The server publishes a desired state (retained) and the device receives it.
        fn desire_with(&mut self, version: u64, thresholds: Option<TrialThresholds>) {
            let wanted = (manifest(version), thresholds);
            self.retained = Some(wanted.clone());
            self.m.handle_desired(&[wanted]);
            self.run();
        }

        /// Delivers the `pick`th outstanding requested chunk, `corrupt` or not.
        fn deliver(&mut self, pick: usize, corrupt: bool) {
            let Some((artifact, index)) = self.requested.iter().nth(pick).cloned() else {
                return;
            };
            self.requested.remove(&(artifact.clone(), index));
            let Some(version) = (1..=8).find(|v| manifest(*v).sha256 == artifact) else {
                return;
            };
            let all = bytes(version);
            let start = index as usize * 4;
            let mut data = all[start..(start + 4).min(all.len())].to_vec();
            if corrupt {
                data[0] ^= 0xff;
            }
            if let ChunkFate::Store(name) = self.m.handle_chunk(&artifact, index, &data) {
                if self.write_ok() {
                    self.chunks.entry(artifact).or_default().insert(index);
                    self.m.chunk_stored(&name, index);
                } else {
                    self.m
                        .chunk_write_failed(&name, Failure::new(ErrorKind::NoSpace, "disk full"));
                }
            }
            self.run();
        }

        fn deliver_all(&mut self) {
            for _ in 0..50 {
                if self.requested.is_empty() {
                    break;
                }
                self.deliver(0, false);
            }
        }

        fn finish_staging(&mut self, ok: bool) {
            if self.staging.is_empty() {
                return;
            }
            let (manifest, _) = self.staging.remove(0);
            if ok {
                self.verified.insert(manifest.sha256.clone());
            }
            let result = if ok {
                Ok(())
            } else {
                Err(Failure::new(
                    ErrorKind::GoldenMismatch,
                    "golden vector 0 differs",
                ))
            };
            self.m.staged(&manifest.name, &manifest.sha256, result);
            self.run();
        }

        fn outcome(&mut self, ok: bool, slow: bool) {
            let Some((slot, _)) = self.serving else {
                return;
            };
            let latency = Duration::from_millis(if slow { 50 } else { 2 });
            if let Some((_, n, _, _)) = self.trial.as_mut() {
                *n += 1;
            }
            self.m.handle_outcome(M, slot, ok, latency);
            self.run();
        }

        fn advance(&mut self, ms: u64) {
            self.now += Duration::from_millis(ms);
            self.run();
        }

        fn set_online(&mut self, online: bool) {
            self.online = online;
            if online {
                self.m.handle_connected();
                if let Some(wanted) = self.retained.clone() {
                    self.m.handle_desired(&[wanted]);
                }
            } else {
                self.m.handle_disconnected();
                self.requested.clear();
            }
            self.run();
        }

        /// The process dies (after a clean stop, when `clean`) and starts again from the
        /// store, as `recovery::restore` does.
        fn restart(&mut self, clean: bool) {
            if clean {
                self.m.stop();
                self.run();
            }
            let mut records = Vec::new();
            let mut rolled_back = None;
            let mut trial = false;
            if let Some(mut record) = self.disk.get(M).cloned() {
                if record.trial.is_some() {
                    let version = record.serving().map_or(0, |v| v.version);
                    if let Some(reason) = record.start_up(policy().max_trial_boots) {
                        rolled_back = Some((version, reason));
                    }
                    self.disk.insert(M.into(), record.clone());
                }
                trial = record.trial.is_some();
                self.serving = record
                    .serving()
                    .map(|v| (record.active.unwrap(), v.version));
                self.kept = record
                    .trial
                    .and_then(|t| record.slot(t.previous).map(|v| (t.previous, v.version)));
                records.push((M.to_string(), record, self.serving.is_some()));
            }
            let mut m = Updater::new(settings(), records);
            for (name, (sha, attempts, until)) in &self.backoffs {
                m.restore_backoff(name, sha.clone(), *attempts, *until);
            }
            if let Some((version, reason)) = rolled_back {
                m.report_rollback(M, version, reason);
            }
            self.trial = None;
            if trial {
                m.resume_trial(M, self.now);
                self.trial = Some(self.judged_after(&self.disk[M]));
            }
            self.m = m;
            self.staging.clear();
            self.requested.clear();
            self.online = false;
            if let Some(manifest) = self.pending.get(M).cloned() {
                let have = (0..manifest.chunk_count())
                    .map(|i| {
                        self.chunks
                            .get(&manifest.sha256)
                            .is_some_and(|c| c.contains(&i))
                    })
                    .collect();
                self.m.resume_download(manifest, have);
            }
            self.run();
        }

        /// A trial of `record` starting now: the requests and time it needs before a verdict.
        fn judged_after(&self, record: &ModelRecord) -> (Instant, u32, u32, Duration) {
            let t = record.trial.and_then(|t| t.thresholds).unwrap_or_default();
            let need = t.requests.unwrap_or(policy().requests);
            let time = Duration::from_secs(t.seconds.unwrap_or(policy().seconds));
            (self.now, 0, need, time)
        }

        /// Version `version` desired, fetched and staged successfully.
        fn install(&mut self, version: u64) {
            self.desire(version);
            self.deliver_all();
            self.finish_staging(true);
        }

        fn serving_version(&self) -> Option<u64> {
            self.serving.map(|(_, v)| v)
        }
    }

    #[test]
    fn first_version_installs_without_trial_then_the_next_one_commits() {
        let mut sim = Sim::new();
        sim.install(1);
        assert_eq!(sim.serving_version(), Some(1));
        assert_eq!(sim.trial, None, "nothing to go back to: no trial");

        sim.install(2);
        assert_eq!(sim.serving_version(), Some(2));
        assert!(sim.trial.is_some());
        for _ in 0..5 {
            sim.outcome(true, false);
        }
        assert_eq!(sim.commits, 1);
        assert_eq!(sim.disk[M].trial, None);
    }

    #[test]
    fn a_failing_trial_rolls_back_and_reports_and_is_not_retried() {
        let mut sim = Sim::new();
        sim.install(1);
        sim.install(2);
        sim.outcome(false, false);
        assert_eq!(sim.rollbacks, 1);
        assert_eq!(sim.serving_version(), Some(1));
        let (_, version, reason, kind) = sim.errors.last().unwrap();
        assert_eq!(*version, Some(2));
        assert_eq!(*kind, ErrorKind::RolledBack);
        assert!(reason.starts_with("rolled back to version 1"), "{reason}");
        sim.desire(2);
        assert!(
            sim.requested.is_empty(),
            "a rolled-back version is not fetched again"
        );
    }

    #[test]
    fn a_download_given_up_over_damaged_chunks_is_tried_again_after_a_back_off() {
        let mut sim = Sim::new();
        sim.install(1);
        sim.desire(2);
        let sha = manifest(2).sha256;
        let damaged: Vec<u8> = bytes(2)[..4].iter().map(|b| b ^ 0xff).collect();
        for round in 1..=2u32 {
            // Forged copies of one chunk: the download is given up, the version not refused.
            for _ in 0..MAX_BAD_CHUNKS {
                sim.m.handle_chunk(&sha, 0, &damaged);
            }
            sim.run();
            let wait = RETRY_AFTER.as_secs() * u64::from(round);
            let (_, version, reason, kind) = sim.errors.last().unwrap().clone();
            assert_eq!(version, Some(2));
            // Not a verdict on the version: a rollout does not count it as failed.
            assert_eq!(kind, ErrorKind::Chunk);
            assert!(kind.is_transient());
            assert!(
                reason.ends_with(&format!("trying again in {wait} s")),
                "{reason}"
            );
            assert_eq!(sim.serving_version(), Some(1));
            assert_eq!(sim.backoffs[M].1, round, "kept in the store");
            // The desired state again (a reconnect, or a restart: the back-off is kept in the
            // store) does not restart it before the back-off.
            sim.requested.clear();
            if round == 2 {
                sim.advance(1000);
                sim.restart(true);
                sim.set_online(true); // The retained desired state names v2 again.
                sim.advance(wait * 1000 - 1100);
            } else {
                sim.set_online(false);
                sim.set_online(true);
                sim.advance(wait * 1000 - 100);
            }
            assert!(
                sim.requested.is_empty(),
                "round {round}: asked before the back-off"
            );
            sim.advance(200);
            assert!(!sim.requested.is_empty(), "round {round}: not tried again");
        }
        // The genuine chunks install it; the back-off is forgotten.
        sim.deliver_all();
        sim.finish_staging(true);
        assert_eq!(sim.serving_version(), Some(2));
        assert!(sim.backoffs.is_empty());
    }

    #[test]
    fn a_rejected_staging_keeps_the_old_model_and_a_new_version_waits_for_the_trial() {
        let mut sim = Sim::new();
        sim.install(1);
        sim.desire(2);
        sim.deliver_all();
        sim.finish_staging(false);
        assert_eq!(sim.serving_version(), Some(1));
        assert!(sim.errors.last().unwrap().2.contains("golden vector"));
        assert_eq!(sim.errors.last().unwrap().3, ErrorKind::GoldenMismatch);
        assert!(
            sim.pending.is_empty(),
            "the abandoned download is forgotten"
        );

        sim.install(3);
        assert!(sim.trial.is_some());
        sim.desire(4); // Deferred: the last good slot must not be overwritten.
        assert!(sim.requested.is_empty());
        sim.advance(10_000); // The trial's time is up: committed, then 4 starts.
        assert_eq!(sim.commits, 1);
        assert!(!sim.requested.is_empty());
        sim.deliver_all();
        sim.finish_staging(true);
        assert_eq!(sim.serving_version(), Some(4));
    }

    #[test]
    fn the_desired_state_going_back_to_the_serving_version_drops_the_download() {
        let mut sim = Sim::new();
        sim.install(1);
        sim.desire(2);
        assert!(sim.pending.contains_key(M));
        sim.desire(1);
        assert!(!sim.pending.contains_key(M));
        sim.requested.clear();
        sim.advance(5_000);
        assert!(sim.requested.is_empty(), "no more requests for version 2");
    }

    #[test]
    fn a_rollouts_thresholds_judge_the_trial_and_survive_a_restart() {
        let mut sim = Sim::new();
        sim.install(1);
        let t = TrialThresholds {
            requests: Some(2),
            max_p99_percent: Some(400),
            ..TrialThresholds::default()
        };
        sim.desire_with(2, Some(t));
        sim.deliver_all();
        sim.finish_staging(true);
        assert_eq!(sim.disk[M].trial.unwrap().thresholds, Some(t));
        sim.restart(false);
        sim.outcome(true, false);
        assert_eq!(sim.commits, 0);
        sim.outcome(true, false);
        assert_eq!(
            sim.commits, 1,
            "judged after the rollout's 2 requests, not the device's 5"
        );
    }

    #[test]
    fn a_fleet_rollback_ends_a_trial_or_installs_the_older_version_it_allows() {
        let mut sim = Sim::new();
        for v in [1, 2] {
            sim.desire(v);
            sim.deliver_all();
            sim.finish_staging(true);
            sim.advance(10_000);
        }
        sim.desire(3); // Allows falling back to 1.
        sim.deliver_all();
        sim.finish_staging(true);
        assert!(sim.trial.is_some());
        sim.desire(2); // The last good version: the trial ends at once.
        assert_eq!(sim.serving_version(), Some(2));
        assert!(sim
            .errors
            .last()
            .unwrap()
            .2
            .contains("went back to version 2"));
        sim.desire(1);
        assert!(
            sim.errors.last().unwrap().2.contains("(rollback)"),
            "2 allows no fallback"
        );
        assert_eq!(sim.errors.last().unwrap().3, ErrorKind::Downgrade);

        sim.install(4);
        sim.advance(10_000);
        sim.desire(6); // Allows falling back to 4.
        sim.deliver_all();
        sim.finish_staging(true);
        sim.advance(10_000);
        assert_eq!(sim.serving_version(), Some(6));
        sim.desire(4);
        assert!(
            sim.requested.is_empty(),
            "4 is still on disk in the other slot"
        );
        sim.finish_staging(true);
        assert_eq!(sim.serving_version(), Some(4));
        assert_eq!(sim.disk[M].highest_version, 4);
        sim.desire(3);
        assert!(sim.errors.last().unwrap().2.contains("(rollback)"));
    }

    #[test]
    fn the_desired_state_going_back_while_staging_drops_the_staged_version() {
        let mut sim = Sim::new();
        sim.install(1);
        sim.desire(2);
        sim.deliver_all();
        assert_eq!(sim.staging.len(), 1, "v2 is staging");
        sim.desire(1); // A fleet rollback before v2 ever served.
        sim.finish_staging(true);
        assert_eq!(sim.serving_version(), Some(1), "v2 must not be swapped in");
        assert!(sim.pending.is_empty());
        sim.desire(2); // Wanted again later: it installs.
        sim.deliver_all();
        sim.finish_staging(true);
        assert_eq!(sim.serving_version(), Some(2));
    }

    #[test]
    fn a_crash_during_trial_resumes_it_and_a_crash_loop_rolls_back() {
        let mut sim = Sim::new();
        sim.install(1);
        sim.install(2);
        sim.restart(false);
        sim.restart(true); // A clean stop does not count.
        assert_eq!(sim.serving_version(), Some(2));
        sim.restart(false);
        assert_eq!(sim.serving_version(), Some(2));
        sim.restart(false); // Third start-up with the trial: past max_trial_boots = 2.
        assert_eq!(sim.serving_version(), Some(1));
        assert!(sim.errors.last().unwrap().2.contains("crash loop"));
        assert_eq!(sim.errors.last().unwrap().3, ErrorKind::CrashLoop);
    }

    #[test]
    fn a_download_resumes_after_a_crash_and_offline_asks_for_nothing() {
        let mut sim = Sim::new();
        sim.desire(1);
        sim.deliver(0, false);
        sim.restart(false);
        assert!(sim.requested.is_empty(), "offline after the restart");
        sim.advance(2_000);
        assert!(sim.requested.is_empty());
        sim.set_online(true);
        assert_eq!(sim.requested.len(), 2, "the two chunks still missing");
        sim.deliver_all();
        sim.finish_staging(true);
        assert_eq!(sim.serving_version(), Some(1));
    }

    #[derive(Debug, Clone)]
    enum Event {
        /// The desired version moves by this much from the last one (1..=8), with a
        /// rollout's trial length or not.
        Desired(i64, Option<u32>),
        Deliver {
            pick: usize,
            corrupt: bool,
        },
        /// Every chunk asked for arrives.
        DeliverAll,
        Staged(bool),
        Outcome {
            ok: bool,
            slow: bool,
        },
        Advance(u64),
        Link(bool),
        Restart {
            clean: bool,
        },
        BreakWrite,
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            3 => (
                prop_oneof![4 => Just(1i64), 1 => Just(0), 1 => Just(-1), 1 => Just(2)],
                prop::option::of(0u32..4),
            )
                .prop_map(|(step, requests)| Event::Desired(step, requests)),
            3 => (0usize..3, prop::bool::weighted(0.2))
                .prop_map(|(pick, corrupt)| Event::Deliver { pick, corrupt }),
            4 => Just(Event::DeliverAll),
            3 => prop::bool::weighted(0.8).prop_map(Event::Staged),
            6 => (prop::bool::weighted(0.9), prop::bool::weighted(0.2))
                .prop_map(|(ok, slow)| Event::Outcome { ok, slow }),
            3 => (0u64..4_000).prop_map(Event::Advance),
            1 => any::<bool>().prop_map(Event::Link),
            1 => any::<bool>().prop_map(|clean| Event::Restart { clean }),
            1 => Just(Event::BreakWrite),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Any order of events, crashes included: the invariants checked by [`Sim`] hold
        /// after every step.
        #[test]
        fn invariants_hold_in_any_event_order(events in prop::collection::vec(event(), 1..160)) {
            let mut sim = Sim::new();
            let mut desired = 0i64;
            for e in events {
                match e {
                    Event::Desired(step, requests) => {
                        desired = (desired + step).clamp(1, 8);
                        let t = requests.map(|r| TrialThresholds {
                            requests: Some(r),
                            ..TrialThresholds::default()
                        });
                        sim.desire_with(desired as u64, t);
                    }
                    Event::DeliverAll => sim.deliver_all(),
                    Event::Deliver { pick, corrupt } => sim.deliver(pick, corrupt),
                    Event::Staged(ok) => sim.finish_staging(ok),
                    Event::Outcome { ok, slow } => sim.outcome(ok, slow),
                    Event::Advance(ms) => sim.advance(ms),
                    Event::Link(up) => sim.set_online(up),
                    Event::Restart { clean } => sim.restart(clean),
                    Event::BreakWrite => sim.break_write = true,
                }
            }
            // Then the world settles: the link is up, every chunk arrives, staging passes,
            // trials run out. The device converges to the last desired version, or has
            // reported why not (rejected, rolled back, refused as a rollback).
            sim.break_write = false;
            sim.set_online(true);
            for _ in 0..12 {
                sim.deliver_all();
                while !sim.staging.is_empty() {
                    sim.finish_staging(true);
                }
                sim.advance(11_000);
            }
            if desired > 0 && sim.serving_version() != Some(desired as u64) {
                let reported = sim.errors.iter().any(|(_, v, _, _)| *v == Some(desired as u64));
                prop_assert!(
                    reported,
                    "serving {:?}, desired {} and nothing said why",
                    sim.serving_version(),
                    desired
                );
            }
        }
    }
}
