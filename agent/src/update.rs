//! The agent's update logic as a state machine with no I/O, in the manner of quinn-proto and
//! rustls: the driver feeds it events (a verified desired state, a chunk, a stored chunk, a
//! staging result, a request outcome, the link going up or down, the clock) and carries out
//! the [`Action`]s it queues, in order, answering the ones that ask for an answer.
//!
//! Per model it sequences one update at a time:
//!
//! ```text
//! idle → preparing → downloading → (ready) → staging → activating → trial → idle (committed)
//!                                                                         ↘ idle (rolled back)
//! ```
//!
//! The deployment's download policy ([`DownloadPolicy`]) holds an update back: a download
//! pauses on a metered link the deployment does not allow, and outside the maintenance window
//! when the window holds downloads too; a complete download waits, ready, for the window
//! before it is staged (`update/policy.rs`). Held, the phase is [`Phase::Waiting`], with what
//! holds it and until when. A rate limit paces the chunk requests ([`Transfer::set_rate`]).
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
//! Invariants, checked by the proptest in `update/tests.rs` over random event orders with crashes:
//! the serving slot always holds a version that passed staging (or nothing before the first);
//! staging never targets the serving slot or the last good one; a commit only follows a
//! trial judged on enough requests or time; every rollback is reported with its reason; the
//! version floor never goes down; no chunk is requested while the link is down.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use modelcast_proto::desired::{DownloadPolicy, TrialThresholds};
use modelcast_proto::manifest::Manifest;
use modelcast_proto::report::{
    ErrorKind, Held, ModelState, Phase, Slot, SlotContent, UpdateProgress,
};
use tracing::{info, warn};

use crate::metrics::Outcome;
use crate::probation::{Probation, ProbationPolicy, Verdict, Window};
use crate::slots::{Admission, ModelRecord};
use crate::transfer::{Accepted, ChunkError, Transfer};
use policy::WallClock;

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
    /// How much longer than `chunk_timeout` a download's first requests wait for its first
    /// chunk ([`modelcast_proto::chunk::MAX_GATHER`] for a device that listens on shared
    /// topics, whose first asks a server may gather).
    pub first_chunk_patience: Duration,
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
        /// The download is held to a rate: it must not take chunks from the artifact's
        /// shared topic, which come at the pace of the fleet.
        alone: bool,
        /// The base URL the deployment gives for HTTP(S) downloads, if any.
        http: Option<String>,
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

/// One version a verified desired state names, with the terms its deployment or rollout set.
#[derive(Debug, Clone, PartialEq)]
pub struct Wanted {
    /// The version.
    pub manifest: Manifest,
    /// The rollout's probation thresholds, if it set any.
    pub thresholds: Option<TrialThresholds>,
    /// The download policy (the default: any time, any rate, no metered links).
    pub download: DownloadPolicy,
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
    /// Fetching chunks (paused while the download policy holds it).
    Downloading(Box<Transfer>),
    /// Downloaded, waiting for the maintenance window before staging.
    Ready(Manifest),
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
            Step::Preparing(m) | Step::Ready(m) | Step::Staging { manifest: m, .. } => Some(m),
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
    /// The download policy of the version the desired state names.
    download: DownloadPolicy,
    /// What holds the update back now, if anything (the download is paused, or the
    /// complete one waits).
    held: Option<Held>,
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
    /// The link is metered (set by the device's configuration or local API).
    metered: bool,
    /// The wall clock, for maintenance windows.
    wall: Option<WallClock>,
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
            metered: false,
            wall: None,
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
                    engine: None,
                    shadow: None,
                    canary: None,
                    low_memory_swap_ms: None,
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
                Step::Downloading(t) if m.held.is_none() => {
                    if let Some(at) = t.poll_timeout() {
                        wake = wake.min(at);
                    }
                }
                Step::Trial(p) => wake = wake.min(p.deadline()),
                _ => {}
            }
            // A window opening or closing changes what the policy holds.
            if matches!(m.step, Step::Downloading(_) | Step::Ready(_)) {
                if let Some(at) = self.window_change(&m.download, now) {
                    wake = wake.min(at);
                }
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
        m.progress = Some(UpdateProgress {
            reused_bytes: reused(&m.progress),
            ..progress(version, Phase::Probation, size, size)
        });
        self.set_phase(name, Phase::Probation);
        self.want_report(false);
    }

    /// Start-up found a download in progress with the chunks `have` already on disk.
    pub fn resume_download(&mut self, manifest: Manifest, have: Vec<bool>) {
        info!(model = %manifest.name, version = manifest.version, "resuming download");
        let name = manifest.name.clone();
        let m = self.models.entry(name.clone()).or_default();
        m.step = Step::Preparing(manifest.clone());
        self.download_ready(&name, &manifest.sha256, have, 0);
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

    /// The chunks of `artifact` asked for are lost (their HTTP fetches failed): they are asked
    /// for again at the next poll.
    pub fn chunks_lost(&mut self, artifact: &str) {
        for m in self.models.values_mut() {
            if let Step::Downloading(t) = &mut m.step {
                if t.manifest().sha256 == artifact {
                    t.handle_disconnect();
                    self.poll_now = true;
                }
            }
        }
    }

    /// A verified desired state names these versions, each with its terms.
    pub fn handle_desired(&mut self, models: &[Wanted]) {
        for w in models {
            let m = self.models.entry(w.manifest.name.clone()).or_default();
            if m.download != w.download {
                m.download = w.download.clone();
                self.poll_now = true;
            }
            self.converge(w.manifest.clone(), w.thresholds);
        }
        self.want_report(false);
    }

    // ---- downloads ----

    /// The answer to [`Action::PrepareDownload`]: the chunks `have` are already on disk.
    ///
    /// `reused_bytes` of what it has were copied from artifacts the device already held.
    pub fn download_ready(&mut self, name: &str, sha256: &str, have: Vec<bool>, reused_bytes: u64) {
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
            .with_stall_deadline(s.stall_after)
            .with_first_patience(s.first_chunk_patience);
        m.progress = Some(UpdateProgress {
            reused_bytes,
            ..progress(
                manifest.version,
                Phase::Downloading,
                transfer.received_bytes(),
                manifest.download_size(),
            )
        });
        m.bad_chunks.clear();
        let complete = transfer.is_complete();
        let mut transfer = transfer;
        transfer.set_rate(m.download.max_rate);
        m.step = Step::Downloading(Box::new(transfer));
        m.held = None;
        self.poll_now = true;
        self.set_phase(name, Phase::Downloading);
        self.want_report(false);
        if complete {
            // Every byte is already on disk (a restart after the download): stage it.
            self.downloaded(name);
        }
    }

    /// The answer to [`Action::PrepareDownload`]: it could not start (no space, store error).
    pub fn download_failed(&mut self, name: &str, sha256: &str, failure: Failure) {
        if self.current(name, sha256).is_some() {
            self.abandon(name, failure.kind, failure.reason);
        }
    }

    /// The length the manifest gives chunk `index` of the download of `artifact` (hex
    /// SHA-256): how far a compressed copy of it may inflate. `None` if no download wants it.
    pub fn chunk_len(&self, artifact: &str, index: u32) -> Option<u32> {
        self.models.values().find_map(|m| match &m.step {
            Step::Downloading(t) if t.manifest().sha256 == artifact => t.chunk_len(index),
            _ => None,
        })
    }

    /// A compressed copy of chunk `index` of `artifact` did not inflate to a chunk (`error`):
    /// a bad copy, as one that fails its digest.
    pub fn chunk_undecodable(
        &mut self,
        artifact: &str,
        index: u32,
        error: ChunkError,
    ) -> ChunkFate {
        let Some(name) = self
            .models
            .iter_mut()
            .find_map(|(name, m)| match &mut m.step {
                Step::Downloading(t) if t.manifest().sha256 == artifact => {
                    t.answered();
                    Some(name.clone())
                }
                _ => None,
            })
        else {
            return ChunkFate::Unwanted;
        };
        self.bad_copy(&name, index, error);
        ChunkFate::Rejected(name)
    }

    /// A chunk of `artifact` (hex SHA-256) arrived.
    pub fn handle_chunk(&mut self, artifact: &str, index: u32, data: &[u8]) -> ChunkFate {
        self.handle_copy(artifact, index, data.len(), || {
            modelcast_proto::sha256_hex(data)
        })
    }

    /// A copy of chunk `index` of `artifact` arrived, of `len` bytes whose SHA-256 (hex)
    /// `sha256` gives (see [`Transfer::handle_copy`]).
    pub fn handle_copy(
        &mut self,
        artifact: &str,
        index: u32,
        len: usize,
        sha256: impl FnOnce() -> String,
    ) -> ChunkFate {
        let Some((name, m)) = self.models.iter_mut().find(
            |(_, m)| matches!(&m.step, Step::Downloading(t) if t.manifest().sha256 == artifact),
        ) else {
            return ChunkFate::Unwanted;
        };
        let name = name.clone();
        let Step::Downloading(transfer) = &mut m.step else {
            unreachable!("matched above");
        };
        let e = match transfer.handle_copy(index, len, sha256) {
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
        self.bad_copy(&name, index, e);
        ChunkFate::Rejected(name)
    }

    /// A damaged copy of chunk `index` of `name`'s download: reported, and the download given
    /// up for now at the [`MAX_BAD_CHUNKS`]th of the same chunk.
    fn bad_copy(&mut self, name: &str, index: u32, e: ChunkError) {
        let Some(m) = self.models.get_mut(name) else {
            return;
        };
        let version = m.step.manifest().map(|m| m.version);
        let count = m.bad_chunks.entry(index).or_insert(0);
        *count += 1;
        let count = *count;
        warn!(model = %name, error = %e, attempt = count, "chunk rejected");
        if count >= MAX_BAD_CHUNKS {
            self.give_up_for_now(name, format!("update rejected: {e}"));
        } else {
            self.error_of(
                ErrorKind::Chunk,
                Some(name),
                version,
                format!("chunk rejected: {e}"),
            );
        }
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
            self.downloaded(name);
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

    /// [`Updater::activated`] for a version that serves a share beside the last good one (a
    /// canary): its trial is judged against what the last good one does from now on, not
    /// against what it did before.
    pub fn activated_beside(&mut self, name: &str, now: Instant) {
        self.activated(name, now);
        if let Some(Step::Trial(p)) = self.models.get_mut(name).map(|m| &mut m.step) {
            p.fresh_baseline();
        }
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
        m.progress = Some(UpdateProgress {
            reused_bytes: reused(&m.progress),
            ..progress(
                manifest.version,
                Phase::Active,
                manifest.size,
                manifest.size,
            )
        });
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

    /// The answer to [`Action::Activate`] when the version could not be loaded or checked in
    /// the serving one's place (a low-memory swap): rejected as a staging failure would be;
    /// nothing was persisted, and the version it was to replace serves again.
    pub fn activation_rejected(&mut self, name: &str, failure: Failure) {
        if matches!(
            self.models.get(name).map(|m| &m.step),
            Some(Step::Activating { .. })
        ) {
            let reason = format!("update rejected: {}", failure.reason);
            self.abandon(name, failure.kind, reason);
        }
    }

    // ---- serving and probation ----

    /// One request finished on `model`'s `slot`.
    pub fn handle_outcome(&mut self, model: &str, slot: Slot, ok: bool, latency: Duration) {
        let Some(m) = self.models.get_mut(model) else {
            return;
        };
        if m.record.active != Some(slot) {
            // The last good model, serving beside a canary on trial: the trial's baseline.
            // Otherwise a request that finished on a model swapped out since.
            if let (Step::Trial(p), Some(trial)) = (&mut m.step, &m.record.trial) {
                if trial.previous == slot {
                    p.record_baseline(ok, latency);
                }
            }
            return;
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
        self.apply_policies(now);
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
            Step::Preparing(_) | Step::Downloading(_) | Step::Ready(_) | Step::Staging { .. }
        ) {
            return;
        }
        info!(model = name, "update no longer desired; dropped");
        m.step = Step::Idle;
        m.held = None;
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
        m.held = None;
        m.bad_chunks.clear();
        if let Some(p) = m.progress.as_mut() {
            p.phase = Phase::Failed;
            p.held = None;
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

    /// The download of `name` is complete: staged now, or ready until the window opens.
    fn downloaded(&mut self, name: &str) {
        let Some(m) = self.models.get_mut(name) else {
            return;
        };
        let Some(manifest) = m.step.manifest().cloned() else {
            return;
        };
        if m.download.window.is_none() {
            self.stage(name);
            return;
        }
        // Staged by the next tick's `apply_policies` if the window is open, else when it opens.
        m.step = Step::Ready(manifest);
        m.held = None;
        self.poll_now = true;
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
        m.held = None;
        if let Some(p) = m.progress.as_mut() {
            p.phase = Phase::Staging;
            p.held = None;
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
            if m.held.is_some() {
                continue; // Paused by the download policy.
            }
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
                    alone: m.download.max_rate.is_some(),
                    http: m.download.http.clone(),
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

/// The bytes an update reused, carried from one phase's progress to the next.
fn reused(progress: &Option<UpdateProgress>) -> u64 {
    progress.as_ref().map_or(0, |p| p.reused_bytes)
}

fn progress(version: u64, phase: Phase, received_bytes: u64, total_bytes: u64) -> UpdateProgress {
    UpdateProgress {
        version,
        phase,
        received_bytes,
        total_bytes,
        reused_bytes: 0,
        held: None,
    }
}

mod policy;
#[cfg(test)]
mod tests;
