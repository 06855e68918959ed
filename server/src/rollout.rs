//! Rollouts: one model version moved to a device group in phased waves, as a state machine
//! with no I/O. Device reports and the clock go in; which devices must get a new desired
//! state comes out. The fleet persists the [`Rollout`] after every change and publishes what
//! it says, so a rollout survives a server restart where it stood.
//!
//! A rollout takes a snapshot of the group when it starts and orders its devices by a hash of
//! the rollout id and the device id, so waves spread over sites. Waves are cumulative sizes
//! (`1`, `10%`, `50%`, `100%`): the first is the canary. A wave starts when the one before it
//! has enough devices committed (after their probation); more failed devices than the abort
//! threshold, or a wave that does not succeed in time, aborts the rollout, and with
//! auto-rollback every device it moved is sent back to the version it ran before. Operators
//! can pause, resume, abort and cancel.
//!
//! Invariants, checked by the proptest at the bottom: devices are only moved wave by wave, in
//! order; no wave starts while paused, after the abort threshold is passed, or before the
//! previous wave met its success criterion; after an abort with auto-rollback every moved
//! device is sent back; an ended rollout moves nothing more.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use modelcast_proto::desired::{SamplingSpec, TargetTerms, TrialThresholds};
use modelcast_proto::report::{DeviceReport, Phase};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Samples kept in a rollout's timeline (older ones are thinned out).
const TIMELINE: usize = 512;

/// The cumulative size of a wave: a count of devices or a share of the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum WaveSize {
    /// This many devices in all.
    Count(u32),
    /// This percentage of the group in all (1..=100).
    Percent(u32),
}

impl WaveSize {
    /// Devices this wave reaches in a group of `n`.
    fn of(self, n: usize) -> usize {
        match self {
            WaveSize::Count(c) => (c as usize).min(n),
            WaveSize::Percent(p) => (n * p as usize).div_ceil(100).clamp(n.min(1), n),
        }
    }
}

impl FromStr for WaveSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let bad = || format!("wave size {s:?}: a count such as 5 or a share such as 10%");
        match s.strip_suffix('%') {
            Some(p) => match p.trim().parse::<u32>() {
                Ok(p) if (1..=100).contains(&p) => Ok(WaveSize::Percent(p)),
                _ => Err(bad()),
            },
            None => match s.parse::<u32>() {
                Ok(c) if c > 0 => Ok(WaveSize::Count(c)),
                _ => Err(bad()),
            },
        }
    }
}

impl TryFrom<String> for WaveSize {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<WaveSize> for String {
    fn from(w: WaveSize) -> String {
        w.to_string()
    }
}

impl fmt::Display for WaveSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaveSize::Count(c) => write!(f, "{c}"),
            WaveSize::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// What an operator asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    /// Model name.
    pub model: String,
    /// The version to roll out.
    pub version: u64,
    /// Label selector of the group.
    pub group: String,
    /// Cumulative wave sizes; the first is the canary. A last wave of 100% is implied.
    pub waves: Vec<WaveSize>,
    /// Share of a wave's devices (percent) that must commit before the next wave starts.
    #[serde(default = "full")]
    pub success_percent: u32,
    /// Abort once more devices than this have failed.
    #[serde(default)]
    pub max_failures: u32,
    /// Abort once failed devices exceed this percentage of the devices moved.
    #[serde(default)]
    pub max_failure_percent: Option<u32>,
    /// Abort when a wave has not succeeded this many seconds after it started.
    #[serde(default = "default_wave_timeout")]
    pub wave_timeout_secs: u64,
    /// On abort, send every device moved back to the version it ran before.
    #[serde(default = "yes")]
    pub auto_rollback: bool,
    /// Probation thresholds for the devices moved (overriding theirs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probation: Option<TrialThresholds>,
    /// Sampling of inputs and outputs on the devices moved (off when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<SamplingSpec>,
    /// Download policy of the devices moved (rate, maintenance window, metered links). A
    /// device the policy holds back counts as pending, and a wave does not time out while
    /// one of its devices waits for its window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download: Option<modelcast_proto::desired::DownloadPolicy>,
    /// A moved device on which the server raises a drift or anomaly alert for this version
    /// ([`crate::drift`]) counts as failed, even after it committed.
    #[serde(default)]
    pub abort_on_alerts: bool,
    /// The backend the moved devices run the version on, in place of their own choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<modelcast_proto::engine::Backend>,
    /// A shadow phase on every moved device before the version serves there: a device whose
    /// candidate fails it counts as failed (and never served the version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<modelcast_proto::desired::ShadowSpec>,
    /// A traffic split on every moved device while the version is on probation there: it
    /// answers that share beside the last good version, judged on it alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<modelcast_proto::desired::CanarySpec>,
}

fn full() -> u32 {
    100
}

fn yes() -> bool {
    true
}

fn default_wave_timeout() -> u64 {
    3600
}

impl RolloutSpec {
    /// `model` at `version` to `group` in `waves` (such as `["1", "10%"]`), with the
    /// defaults: every device of a wave must commit, the first failure aborts, an hour per
    /// wave, auto-rollback on, the devices' own probation.
    pub fn new(model: &str, version: u64, group: &str, waves: &[&str]) -> Result<Self, String> {
        Ok(RolloutSpec {
            model: model.into(),
            version,
            group: group.into(),
            waves: waves.iter().map(|w| w.parse()).collect::<Result<_, _>>()?,
            success_percent: full(),
            max_failures: 0,
            max_failure_percent: None,
            wave_timeout_secs: default_wave_timeout(),
            auto_rollback: true,
            probation: None,
            sampling: None,
            download: None,
            abort_on_alerts: false,
            backend: None,
            shadow: None,
            canary: None,
        })
    }

    /// Checks the numbers.
    pub fn validate(&self) -> Result<(), String> {
        if self.waves.is_empty() {
            return Err("a rollout needs at least one wave".into());
        }
        if !(1..=100).contains(&self.success_percent) {
            return Err("success_percent must be within 1..=100".into());
        }
        if self.max_failure_percent.is_some_and(|p| p > 100) {
            return Err("max_failure_percent must be within 0..=100".into());
        }
        if self.wave_timeout_secs == 0 {
            return Err("wave_timeout_secs must be at least 1".into());
        }
        if let Some(t) = &self.probation {
            t.validate()?;
        }
        if let Some(s) = &self.sampling {
            s.validate()?;
        }
        if let Some(p) = &self.download {
            p.validate().map_err(|e| e.to_string())?;
        }
        if let Some(s) = &self.shadow {
            s.validate().map_err(|e| e.to_string())?;
        }
        if let Some(c) = &self.canary {
            c.validate().map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// Where a rollout stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum RolloutState {
    /// Moving devices.
    Running,
    /// Stopped by an operator; resumes where it was.
    Paused,
    /// Every wave succeeded.
    Completed,
    /// Stopped by its abort criteria or an operator; moved devices sent back if asked.
    Aborted {
        /// Why.
        reason: String,
    },
    /// Stopped by an operator; moved devices keep the new version.
    Cancelled,
}

impl RolloutState {
    /// No more devices will be moved.
    pub fn is_over(&self) -> bool {
        matches!(
            self,
            RolloutState::Completed | RolloutState::Aborted { .. } | RolloutState::Cancelled
        )
    }
}

/// Where one device of the rollout stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum DeviceState {
    /// Its wave has not started.
    Waiting,
    /// Given the new version; not yet committed.
    Updating,
    /// Serving the new version after its probation.
    Committed,
    /// Rejected the new version or rolled it back.
    Failed {
        /// What the device reported.
        reason: String,
    },
    /// Sent back to its previous version by the rollout's abort.
    Reverting,
    /// Serving its previous version again.
    Reverted,
}

/// One device of the rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Device id.
    pub device: String,
    /// The wave that moves it (0 is the canary).
    pub wave: usize,
    /// The version it should run before the rollout (what it goes back to).
    pub previous: Option<u64>,
    /// Where it stands.
    #[serde(flatten)]
    pub state: DeviceState,
    /// Why it failed, if it did (kept after it is sent back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// What its update of the rollout's version took, as last reported with a change of
    /// state (final once committed).
    #[serde(default, skip_serializing_if = "Transferred::is_empty")]
    pub transferred: Transferred,
    /// Its download policy holds its update back, as it last reported: a maintenance window
    /// (until then, Unix seconds) or a metered link. It counts as updating.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<modelcast_proto::report::Held>,
    /// The shadow phase of the rollout's version on it, as it last reported (with
    /// [`RolloutSpec::shadow`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<modelcast_proto::report::ShadowSummary>,
}

/// A wave's shadow phases ([`Rollout::wave_shadow`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaveShadow {
    /// Phases under way.
    pub running: usize,
    /// Phases passed.
    pub passed: usize,
    /// Phases failed.
    pub failed: usize,
    /// The lowest argmax agreement among them, per thousand.
    pub min_agreement_permille: Option<u32>,
}

/// Bytes an update brought to a device: all it has of the download, and the part of it
/// copied from artifacts the device already held (the rest travelled).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transferred {
    /// Bytes of the download on the device.
    pub received_bytes: u64,
    /// Of those, bytes copied on the device rather than downloaded.
    pub reused_bytes: u64,
}

impl Transferred {
    /// Nothing reported.
    pub fn is_empty(&self) -> bool {
        *self == Transferred::default()
    }
}

impl std::ops::Add for Transferred {
    type Output = Transferred;

    fn add(self, other: Transferred) -> Transferred {
        Transferred {
            received_bytes: self.received_bytes + other.received_bytes,
            reused_bytes: self.reused_bytes + other.reused_bytes,
        }
    }
}

/// Counts of devices by state at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Unix seconds.
    pub at: i64,
    /// Wave running.
    pub wave: usize,
    /// Waiting for their wave.
    pub waiting: usize,
    /// Given the new version, not committed.
    pub updating: usize,
    /// Committed.
    pub committed: usize,
    /// Failed, whether sent back since or not (a failed canary of an aborted rollout is
    /// counted here and in `reverted`).
    pub failed: usize,
    /// Sent back or back on their previous version.
    pub reverted: usize,
}

/// What the fleet must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Publish a new desired state to these devices (see [`Rollout::assignment`]).
    Retarget(Vec<String>),
    /// The rollout ended this way (for the audit log; on completion the group keeps the
    /// version as its deployment).
    Ended(RolloutState),
}

/// A rollout and everything it decided so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// Id (ordered with deployments: a later deployment or rollout wins).
    pub id: u64,
    /// What was asked.
    pub spec: RolloutSpec,
    /// Who started it.
    pub by: String,
    /// Unix seconds.
    pub created: i64,
    /// When it ended (completed, aborted or cancelled), Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<i64>,
    /// Where it stands.
    #[serde(flatten)]
    pub state: RolloutState,
    /// Cumulative device counts of each wave.
    pub wave_sizes: Vec<usize>,
    /// The wave running (or last run).
    pub wave: usize,
    /// When that wave started (Unix seconds).
    pub wave_started: i64,
    /// The group at start, in rollout order.
    pub members: Vec<Member>,
    /// Counts over time, for progress charts.
    pub timeline: Vec<Counts>,
}

/// What a device's report says about the rollout's version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// Serving it, probation passed.
    Committed,
    /// Working on it (downloading, staging, on trial) or not started.
    Updating,
    /// Rejected or rolled back, with the device's reason.
    Failed(String),
    /// Serving this other version and not working on the rollout's.
    Serving(Option<u64>),
}

/// Reads `report` for `model` at `version`; errors older than `since` (Unix seconds) are old
/// news.
pub fn observe(report: &DeviceReport, model: &str, version: u64, since: i64) -> Observed {
    let state = report.models.get(model);
    let serving = state.and_then(|s| s.serving_version());
    let update = state.and_then(|s| s.update.as_ref());
    let error = report
        .last_error
        .as_ref()
        .filter(|e| e.model.as_deref() == Some(model) && e.version == Some(version));
    let reason = || error.map_or("failed".to_string(), |e| e.reason.clone());
    match update.filter(|u| u.version == version) {
        Some(u) if u.phase == Phase::Failed => return Observed::Failed(reason()),
        Some(u) if u.phase != Phase::Active => return Observed::Updating,
        _ => {}
    }
    if serving == Some(version) {
        return Observed::Committed;
    }
    if error.is_some_and(|e| e.at >= since && !e.kind.is_transient()) {
        return Observed::Failed(reason());
    }
    Observed::Serving(serving)
}

/// Orders devices by a hash of the rollout id and the device id.
fn order_key(id: u64, device: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(id.to_be_bytes());
    h.update(device.as_bytes());
    h.finalize().into()
}

impl Rollout {
    /// Starts rollout `id` of `spec` over `members` (device, version it should run now) at
    /// `now`: the canary wave is moved at once.
    pub fn start(
        id: u64,
        spec: RolloutSpec,
        by: &str,
        now: i64,
        members: Vec<(String, Option<u64>)>,
    ) -> (Rollout, Vec<Effect>) {
        let mut members = members;
        members.sort_by_cached_key(|(d, _)| order_key(id, d));
        let n = members.len();
        let mut wave_sizes: Vec<usize> = Vec::new();
        for w in spec
            .waves
            .iter()
            .chain(std::iter::once(&WaveSize::Percent(100)))
        {
            let size = w.of(n).max(wave_sizes.last().copied().unwrap_or(0));
            if wave_sizes.last() != Some(&size) {
                wave_sizes.push(size);
            }
        }
        if wave_sizes.is_empty() {
            wave_sizes.push(0);
        }
        let members = members
            .into_iter()
            .enumerate()
            .map(|(i, (device, previous))| Member {
                device,
                wave: wave_sizes.iter().position(|&s| i < s).unwrap_or(0),
                previous,
                state: DeviceState::Waiting,
                failure: None,
                transferred: Transferred::default(),
                held: None,
                shadow: None,
            })
            .collect();
        let mut rollout = Rollout {
            id,
            spec,
            by: by.into(),
            created: now,
            ended: None,
            state: RolloutState::Running,
            wave_sizes,
            wave: 0,
            wave_started: now,
            members,
            timeline: Vec::new(),
        };
        let mut effects = vec![Effect::Retarget(rollout.move_wave(0))];
        effects.extend(rollout.step(now));
        (rollout, effects)
    }

    /// The version (and its terms) the rollout wants `device` to run, if it decides for that
    /// device. A device sent back runs its previous version on its own terms, unsampled.
    pub fn assignment(&self, device: &str) -> Option<(u64, TargetTerms)> {
        let m = self.members.iter().find(|m| m.device == device)?;
        match m.state {
            DeviceState::Waiting => None,
            DeviceState::Reverting | DeviceState::Reverted => {
                m.previous.map(|v| (v, TargetTerms::default()))
            }
            _ => Some((
                self.spec.version,
                TargetTerms {
                    probation: self.spec.probation,
                    sampling: self.spec.sampling,
                    download: self.spec.download.clone(),
                    backend: self.spec.backend,
                    shadow: self.spec.shadow,
                    canary: self.spec.canary.clone(),
                    form: None,
                    key_wrap: None,
                },
            )),
        }
    }

    /// A report from `device` arrived.
    pub fn handle_report(&mut self, now: i64, device: &str, report: &DeviceReport) -> Vec<Effect> {
        let (model, version, since) = (&self.spec.model, self.spec.version, self.created);
        let observed = observe(report, model, version, since);
        let serving = report.models.get(model).and_then(|s| s.serving_version());
        let Some(m) = self.members.iter_mut().find(|m| m.device == device) else {
            return Vec::new();
        };
        let update = report
            .models
            .get(model)
            .and_then(|s| s.update.as_ref())
            .filter(|u| u.version == version);
        let held = update.and_then(|u| u.held.filter(|_| u.phase == Phase::Waiting));
        if m.state != DeviceState::Waiting {
            m.held = held;
            if let Some(s) = report
                .models
                .get(model)
                .and_then(|s| s.shadow.as_ref())
                .filter(|s| s.version == version)
            {
                m.shadow = Some(s.clone());
            }
        }
        let next = match (&m.state, observed) {
            (DeviceState::Waiting, _) => return Vec::new(),
            (DeviceState::Reverting, _) if serving.is_some() && serving == m.previous => {
                DeviceState::Reverted
            }
            (DeviceState::Reverting | DeviceState::Reverted, _) => return Vec::new(),
            (_, Observed::Committed) => DeviceState::Committed,
            (_, Observed::Failed(reason)) => DeviceState::Failed { reason },
            // Once failed, failed: a device that rolled back reports its old version next.
            (DeviceState::Failed { .. }, _) => return Vec::new(),
            (_, Observed::Updating | Observed::Serving(_)) => DeviceState::Updating,
        };
        if m.state == next {
            return Vec::new();
        }
        if let DeviceState::Failed { reason } = &next {
            m.failure = Some(reason.clone());
        }
        if let Some(u) = update {
            m.transferred = Transferred {
                received_bytes: u.received_bytes,
                reused_bytes: u.reused_bytes,
            };
        }
        m.state = next;
        self.step(now)
    }

    /// The server raised an alert on `device` for the rollout's version: with
    /// `abort_on_alerts`, a device already moved (updating or committed) fails with `reason`.
    /// Returns whether the device's state changed, and the effects.
    pub fn handle_alert(&mut self, now: i64, device: &str, reason: &str) -> (bool, Vec<Effect>) {
        if !self.spec.abort_on_alerts || self.state.is_over() {
            return (false, Vec::new());
        }
        let Some(m) = self.members.iter_mut().find(|m| m.device == device) else {
            return (false, Vec::new());
        };
        if !matches!(m.state, DeviceState::Updating | DeviceState::Committed) {
            return (false, Vec::new());
        }
        m.failure = Some(reason.into());
        m.state = DeviceState::Failed {
            reason: reason.into(),
        };
        (true, self.step(now))
    }

    /// The clock.
    pub fn handle_timeout(&mut self, now: i64) -> Vec<Effect> {
        self.step(now)
    }

    /// When [`Rollout::handle_timeout`] must be called next at the latest.
    pub fn next_timeout(&self) -> Option<i64> {
        (self.state == RolloutState::Running)
            .then(|| self.wave_started + self.spec.wave_timeout_secs as i64)
    }

    /// An operator pauses it: no new wave starts.
    pub fn pause(&mut self, now: i64) -> Vec<Effect> {
        if self.state == RolloutState::Running {
            self.state = RolloutState::Paused;
            self.sample(now);
        }
        Vec::new()
    }

    /// An operator resumes it; the running wave's timeout starts again.
    pub fn resume(&mut self, now: i64) -> Vec<Effect> {
        if self.state != RolloutState::Paused {
            return Vec::new();
        }
        self.state = RolloutState::Running;
        self.wave_started = now;
        self.step(now)
    }

    /// An operator (or the criteria) aborts it.
    pub fn abort(&mut self, now: i64, reason: String) -> Vec<Effect> {
        if self.state.is_over() {
            return Vec::new();
        }
        self.state = RolloutState::Aborted { reason };
        self.ended = Some(now);
        let mut effects = Vec::new();
        if self.spec.auto_rollback {
            let mut back = Vec::new();
            for m in &mut self.members {
                if m.state != DeviceState::Waiting && m.previous.is_some() {
                    m.state = DeviceState::Reverting;
                    back.push(m.device.clone());
                }
            }
            effects.push(Effect::Retarget(back));
        }
        effects.push(Effect::Ended(self.state.clone()));
        self.sample(now);
        effects
    }

    /// An operator cancels it: nothing more moves; moved devices keep the new version.
    pub fn cancel(&mut self, now: i64) -> Vec<Effect> {
        if self.state.is_over() {
            return Vec::new();
        }
        self.state = RolloutState::Cancelled;
        self.ended = Some(now);
        self.sample(now);
        vec![Effect::Ended(RolloutState::Cancelled)]
    }

    /// What the members' updates took, added up.
    pub fn transferred(&self) -> Transferred {
        self.members
            .iter()
            .fold(Transferred::default(), |t, m| t + m.transferred)
    }

    /// Device counts now.
    pub fn counts(&self, at: i64) -> Counts {
        let mut c = Counts {
            at,
            wave: self.wave,
            ..Counts::default()
        };
        for m in &self.members {
            match m.state {
                DeviceState::Waiting => c.waiting += 1,
                DeviceState::Updating => c.updating += 1,
                DeviceState::Committed => c.committed += 1,
                DeviceState::Failed { .. } => c.failed += 1,
                DeviceState::Reverting | DeviceState::Reverted => {
                    c.reverted += 1;
                    c.failed += usize::from(m.failure.is_some());
                }
            }
        }
        c
    }

    /// The member for `device`.
    pub fn member(&self, device: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.device == device)
    }

    /// Members of wave `wave` (those it adds).
    pub fn wave_members(&self, wave: usize) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(move |m| m.wave == wave)
    }

    /// The shadow phases of a wave's devices so far: how many passed and failed, and the
    /// lowest argmax agreement among them (per thousand; none without a classifier output).
    pub fn wave_shadow(&self, wave: usize) -> Option<WaveShadow> {
        let phases: Vec<_> = self
            .wave_members(wave)
            .filter_map(|m| m.shadow.as_ref())
            .collect();
        if phases.is_empty() {
            return None;
        }
        let verdict = |v: &str| {
            phases
                .iter()
                .filter(|s| s.verdict.as_deref() == Some(v))
                .count()
        };
        Some(WaveShadow {
            running: phases.iter().filter(|s| s.verdict.is_none()).count(),
            passed: verdict("passed"),
            failed: verdict("failed"),
            min_agreement_permille: phases.iter().filter_map(|s| s.agreement_permille).min(),
        })
    }

    /// Marks wave `wave`'s devices as moved; returns them.
    fn move_wave(&mut self, wave: usize) -> Vec<String> {
        let mut moved = Vec::new();
        for m in self.members.iter_mut().filter(|m| m.wave == wave) {
            if m.state == DeviceState::Waiting {
                m.state = DeviceState::Updating;
                moved.push(m.device.clone());
            }
        }
        moved
    }

    fn failed(&self) -> usize {
        self.members
            .iter()
            .filter(|m| matches!(m.state, DeviceState::Failed { .. }))
            .count()
    }

    fn moved(&self) -> usize {
        self.members
            .iter()
            .filter(|m| m.state != DeviceState::Waiting)
            .count()
    }

    /// Whether wave `wave` met the success criterion.
    fn wave_succeeded(&self, wave: usize) -> bool {
        let size = self.wave_members(wave).count();
        let committed = self
            .wave_members(wave)
            .filter(|m| m.state == DeviceState::Committed)
            .count();
        committed * 100 >= size * self.spec.success_percent as usize
    }

    /// The abort criterion, if passed.
    fn past_threshold(&self) -> Option<String> {
        let failed = self.failed();
        if failed > self.spec.max_failures as usize {
            return Some(format!(
                "{failed} device(s) failed (at most {} allowed)",
                self.spec.max_failures
            ));
        }
        let moved = self.moved();
        if let Some(p) = self.spec.max_failure_percent {
            if moved > 0 && failed * 100 > moved * p as usize {
                return Some(format!(
                    "{failed} of {moved} device(s) failed (more than {p}%)"
                ));
            }
        }
        None
    }

    /// Applies the criteria: abort, next wave, completion.
    fn step(&mut self, now: i64) -> Vec<Effect> {
        let mut effects = Vec::new();
        while self.state == RolloutState::Running {
            if let Some(reason) = self.past_threshold() {
                self.sample(now); // The failures, before the devices are sent back.
                effects.extend(self.abort(now, reason));
                break;
            }
            if !self.wave_succeeded(self.wave) {
                // Devices waiting for their maintenance window are not late.
                let windowed = self.wave_members(self.wave).any(|m| {
                    m.state == DeviceState::Updating
                        && matches!(m.held, Some(modelcast_proto::report::Held::Window { .. }))
                });
                if !windowed && now >= self.wave_started + self.spec.wave_timeout_secs as i64 {
                    let size = self.wave_members(self.wave).count();
                    let committed = self
                        .wave_members(self.wave)
                        .filter(|m| m.state == DeviceState::Committed)
                        .count();
                    let reason = format!(
                        "wave {} timed out after {}s: {committed} of {size} device(s) committed, \
                         {}% needed",
                        self.wave + 1,
                        self.spec.wave_timeout_secs,
                        self.spec.success_percent
                    );
                    effects.extend(self.abort(now, reason));
                }
                break;
            }
            if self.wave + 1 >= self.wave_sizes.len() {
                self.state = RolloutState::Completed;
                self.ended = Some(now);
                effects.push(Effect::Ended(RolloutState::Completed));
                break;
            }
            self.wave += 1;
            self.wave_started = now;
            let moved = self.move_wave(self.wave);
            effects.push(Effect::Retarget(moved));
        }
        self.sample(now);
        effects
    }

    /// Appends the counts now to the timeline if they changed.
    fn sample(&mut self, now: i64) {
        let c = self.counts(now);
        let same = self
            .timeline
            .last()
            .is_some_and(|l| Counts { at: now, ..*l } == c);
        if same {
            return;
        }
        if self.timeline.len() >= TIMELINE {
            // Keep the first sample and every other one after it.
            let mut i = 0;
            self.timeline.retain(|_| {
                i += 1;
                i == 1 || i % 2 == 0
            });
        }
        self.timeline.push(c);
    }
}

/// The group members of a rollout as the fleet knows them: device id and the version it
/// should run now (`None` if no deployment names the model for it).
pub type Members = Vec<(String, Option<u64>)>;

/// Rollouts by id.
pub type Rollouts = BTreeMap<u64, Rollout>;

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use modelcast_proto::report::{ModelState, ReportedError, Slot, SlotContent, UpdateProgress};
    use proptest::prelude::*;

    fn spec(waves: &[&str], max_failures: u32) -> RolloutSpec {
        RolloutSpec {
            model: "m".into(),
            version: 2,
            group: "*".into(),
            waves: waves.iter().map(|w| w.parse().unwrap()).collect(),
            success_percent: 100,
            max_failures,
            max_failure_percent: None,
            wave_timeout_secs: 600,
            auto_rollback: true,
            probation: None,
            sampling: None,
            download: None,
            abort_on_alerts: true,
            backend: None,
            shadow: None,
            canary: None,
        }
    }

    fn devices(n: usize) -> Members {
        (0..n).map(|i| (format!("d{i:03}"), Some(1))).collect()
    }

    /// A report of `device` serving `serving`, with an update of `version` in `phase`.
    fn report(device: &str, serving: u64, update: Option<(u64, Phase)>) -> DeviceReport {
        let mut models = BTreeMap::new();
        models.insert(
            "m".to_string(),
            ModelState {
                active: Some(Slot::A),
                a: Some(SlotContent {
                    version: serving,
                    sha256: String::new(),
                }),
                b: None,
                update: update.map(|(version, phase)| UpdateProgress {
                    version,
                    phase,
                    received_bytes: 0,
                    total_bytes: 0,
                    reused_bytes: 0,
                    held: None,
                }),
                engine: None,
                shadow: None,
                canary: None,
                low_memory_swap_ms: None,
            },
        );
        let last_error = match update {
            Some((v, Phase::Failed)) => Some(ReportedError {
                model: Some("m".into()),
                version: Some(v),
                kind: modelcast_proto::report::ErrorKind::Failed,
                reason: "rolled back to version 1: p99 latency".into(),
                at: 100,
            }),
            _ => None,
        };
        DeviceReport {
            format: 1,
            device: device.into(),
            labels: BTreeMap::new(),
            agent_version: String::new(),
            models,
            last_error,
            desired_version: 0,
            at: 100,
            engines: None,
            sealing_key: None,
        }
    }

    fn moved(effects: &[Effect]) -> Vec<String> {
        effects
            .iter()
            .flat_map(|e| match e {
                Effect::Retarget(d) => d.clone(),
                _ => vec![],
            })
            .collect()
    }

    #[test]
    fn only_a_verdict_on_the_version_counts_as_failed_never_a_passing_error() {
        use modelcast_proto::report::ErrorKind;
        let with = |kind: ErrorKind| {
            let mut r = report("d", 1, Some((2, Phase::Downloading)));
            r.last_error = Some(ReportedError {
                model: Some("m".into()),
                version: Some(2),
                kind,
                reason: "the words do not matter".into(),
                at: 100,
            });
            r.models.get_mut("m").unwrap().update = None;
            observe(&r, "m", 2, 50)
        };
        for passing in [
            ErrorKind::Stalled,
            ErrorKind::Healing,
            ErrorKind::Chunk,
            ErrorKind::NoSpace,
            ErrorKind::DeviceKey,
        ] {
            assert_eq!(with(passing), Observed::Serving(Some(1)), "{passing:?}");
        }
        for verdict in [
            ErrorKind::Verification,
            ErrorKind::Staging,
            ErrorKind::GoldenMismatch,
            ErrorKind::LatencyBudget,
            ErrorKind::Shadow,
            ErrorKind::Downgrade,
            ErrorKind::RolledBack,
            ErrorKind::CrashLoop,
            ErrorKind::Failed,
        ] {
            assert_eq!(
                with(verdict),
                Observed::Failed("the words do not matter".into()),
                "{verdict:?}"
            );
        }
    }

    #[test]
    fn wave_sizes_parse_and_resolve() {
        assert_eq!("5".parse::<WaveSize>(), Ok(WaveSize::Count(5)));
        assert_eq!("10%".parse::<WaveSize>(), Ok(WaveSize::Percent(10)));
        for bad in ["0", "0%", "101%", "x", "-1", ""] {
            assert!(bad.parse::<WaveSize>().is_err(), "{bad}");
        }
        let (r, _) = Rollout::start(1, spec(&["1", "10%", "50%"], 0), "op", 0, devices(40));
        assert_eq!(r.wave_sizes, vec![1, 4, 20, 40]);
        let (r, _) = Rollout::start(1, spec(&["100", "10%"], 0), "op", 0, devices(3));
        assert_eq!(r.wave_sizes, vec![3]);
    }

    #[test]
    fn what_each_update_took_is_kept_with_its_member_and_added_up() {
        let (mut r, effects) = Rollout::start(7, spec(&["100%"], 0), "op", 0, devices(2));
        let moved = moved(&effects);
        let took = |device: &str, reused: u64| {
            let mut rep = report(device, 2, Some((2, Phase::Active)));
            let u = rep.models.get_mut("m").unwrap().update.as_mut().unwrap();
            (u.received_bytes, u.total_bytes, u.reused_bytes) = (1000, 1000, reused);
            rep
        };
        r.handle_report(10, &moved[0], &took(&moved[0], 900));
        r.handle_report(11, &moved[1], &took(&moved[1], 0));
        assert_eq!(
            r.member(&moved[0]).unwrap().transferred,
            Transferred {
                received_bytes: 1000,
                reused_bytes: 900
            }
        );
        assert_eq!(
            r.transferred(),
            Transferred {
                received_bytes: 2000,
                reused_bytes: 900
            }
        );
        // Kept with the rollout as stored; absent from older stored rollouts.
        let back: Rollout = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back.transferred(), r.transferred());
    }

    #[test]
    fn waves_follow_commits_and_the_rollout_completes() {
        let (mut r, effects) = Rollout::start(7, spec(&["1", "50%"], 0), "op", 0, devices(4));
        let canary = moved(&effects);
        assert_eq!(canary.len(), 1);
        let e = r.handle_report(
            10,
            &canary[0],
            &report(&canary[0], 2, Some((2, Phase::Probation))),
        );
        assert!(e.is_empty(), "on trial: not yet");
        let e = r.handle_report(20, &canary[0], &report(&canary[0], 2, None));
        let second = moved(&e);
        assert_eq!(second.len(), 1, "50% of 4 is 2 in all");
        r.handle_report(
            30,
            &second[0],
            &report(&second[0], 2, Some((2, Phase::Active))),
        );
        let rest: Vec<String> = r
            .members
            .iter()
            .filter(|m| m.state == DeviceState::Updating)
            .map(|m| m.device.clone())
            .collect();
        assert_eq!(rest.len(), 2);
        r.handle_report(40, &rest[0], &report(&rest[0], 2, None));
        let e = r.handle_report(50, &rest[1], &report(&rest[1], 2, None));
        assert_eq!(e, vec![Effect::Ended(RolloutState::Completed)]);
        assert_eq!(r.assignment(&rest[1]), Some((2, TargetTerms::default())));
        assert_eq!(r.timeline.last().unwrap().committed, 4);
    }

    #[test]
    fn a_failing_canary_aborts_and_sends_every_moved_device_back() {
        let (mut r, effects) = Rollout::start(3, spec(&["2"], 0), "op", 0, devices(5));
        let canaries = moved(&effects);
        assert_eq!(canaries.len(), 2);
        r.handle_report(10, &canaries[0], &report(&canaries[0], 2, None));
        assert_eq!(r.state, RolloutState::Running);
        let e = r.handle_report(
            20,
            &canaries[1],
            &report(&canaries[1], 1, Some((2, Phase::Failed))),
        );
        let RolloutState::Aborted { reason } = &r.state else {
            panic!("{:?}", r.state);
        };
        assert!(reason.contains("1 device(s) failed"), "{reason}");
        assert_eq!((r.created, r.ended), (0, Some(20)));
        let c = r.counts(20);
        assert_eq!(
            (c.failed, c.reverted),
            (1, 2),
            "the failed canary is sent back, and failed"
        );
        let mut back = moved(&e);
        back.sort();
        let mut expected = canaries.clone();
        expected.sort();
        assert_eq!(back, expected);
        assert_eq!(
            r.assignment(&canaries[0]),
            Some((1, TargetTerms::default()))
        );
        r.handle_report(30, &canaries[0], &report(&canaries[0], 1, None));
        let m = r.members.iter().find(|m| m.device == canaries[0]).unwrap();
        assert_eq!(m.state, DeviceState::Reverted);
        let waiting = r
            .members
            .iter()
            .find(|m| m.state == DeviceState::Waiting)
            .unwrap();
        assert_eq!(r.assignment(&waiting.device), None, "never moved");
    }

    #[test]
    fn a_wave_that_does_not_succeed_in_time_aborts() {
        let (mut r, _) = Rollout::start(1, spec(&["1"], 0), "op", 0, devices(3));
        assert_eq!(r.next_timeout(), Some(600));
        assert!(r.handle_timeout(599).is_empty());
        r.handle_timeout(600);
        assert!(
            matches!(&r.state, RolloutState::Aborted { reason } if reason.contains("timed out"))
        );
    }

    #[test]
    fn a_wave_waiting_for_its_maintenance_window_does_not_time_out() {
        let (mut r, effects) = Rollout::start(1, spec(&["1"], 0), "op", 0, devices(3));
        let canary = moved(&effects).remove(0);
        let mut waiting = report(&canary, 1, Some((2, Phase::Waiting)));
        let held = modelcast_proto::report::Held::Window {
            until: 5000,
            activation_only: true,
        };
        let update = waiting
            .models
            .get_mut("m")
            .unwrap()
            .update
            .as_mut()
            .unwrap();
        update.held = Some(held);
        r.handle_report(10, &canary, &waiting);
        assert!(r.handle_timeout(700).is_empty(), "held by its window");
        assert_eq!(r.state, RolloutState::Running);
        let m = r.members.iter().find(|m| m.device == canary).unwrap();
        assert_eq!((&m.state, m.held), (&DeviceState::Updating, Some(held)));
        assert_eq!(r.counts(700).updating, 1, "pending, not failed");
        // Out of the window and still not committed: late after all.
        r.handle_report(
            5001,
            &canary,
            &report(&canary, 1, Some((2, Phase::Staging))),
        );
        r.handle_timeout(5002);
        assert!(
            matches!(&r.state, RolloutState::Aborted { reason } if reason.contains("timed out"))
        );
    }

    #[test]
    fn pause_holds_the_next_wave_and_resume_releases_it() {
        let (mut r, effects) = Rollout::start(1, spec(&["1"], 0), "op", 0, devices(3));
        let canary = moved(&effects).remove(0);
        r.pause(5);
        assert!(r
            .handle_report(10, &canary, &report(&canary, 2, None))
            .is_empty());
        assert!(
            r.handle_timeout(10_000).is_empty(),
            "no timeout while paused"
        );
        let e = r.resume(20_000);
        assert_eq!(moved(&e).len(), 2);
        assert_eq!(r.wave_started, 20_000);
    }

    #[test]
    fn the_spec_round_trips_as_json_with_wave_strings() {
        let s = spec(&["1", "25%"], 2);
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.contains(r#""waves":["1","25%"]"#), "{text}");
        assert_eq!(serde_json::from_str::<RolloutSpec>(&text).unwrap(), s);
        let (r, _) = Rollout::start(1, s, "op", 0, devices(5));
        let back: Rollout = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[derive(Debug, Clone)]
    enum Event {
        /// Device `i` (of the moved ones) reports: 0 updating, 1 on trial, 2 committed,
        /// 3 failed, 4 serving the old version.
        Report(usize, u8),
        /// An alert on device `i` (of the moved ones).
        Alert(usize),
        Tick(i64),
        Pause,
        Resume,
        Abort,
        Cancel,
    }

    fn event() -> impl Strategy<Value = Event> {
        let status =
            prop_oneof![3 => Just(0u8), 3 => Just(1), 10 => Just(2), 1 => Just(3), 3 => Just(4)];
        prop_oneof![
            100 => (0usize..30, status).prop_map(|(i, s)| Event::Report(i, s)),
            3 => (0usize..30).prop_map(Event::Alert),
            10 => (1i64..120).prop_map(Event::Tick),
            2 => Just(Event::Pause),
            4 => Just(Event::Resume),
        ]
    }

    fn wave() -> impl Strategy<Value = String> {
        prop_oneof![
            (1u32..5).prop_map(|c| c.to_string()),
            (1u32..=100).prop_map(|p| format!("{p}%")),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn waves_move_in_order_and_stop_on_failure(
            n in 0usize..30,
            waves in prop::collection::vec(wave(), 1..5),
            max_failures in 0u32..3,
            success in prop_oneof![Just(100u32), 50u32..100],
            auto_rollback in any::<bool>(),
            events in prop::collection::vec(event(), 0..200),
            stop in prop::option::weighted(0.3, (0usize..200, any::<bool>())),
        ) {
            let mut events = events;
            if let Some((at, abort)) = stop {
                let at = at.min(events.len());
                events.insert(at, if abort { Event::Abort } else { Event::Cancel });
            }
            let mut s = spec(&[], max_failures);
            s.waves = waves.iter().map(|w| w.parse().unwrap()).collect();
            s.success_percent = success;
            s.auto_rollback = auto_rollback;
            let (mut r, effects) = Rollout::start(9, s, "op", 0, devices(n));
            let mut now = 0;
            let mut retargeted: BTreeSet<String> = moved(&effects).into_iter().collect();
            for e in events {
                let was = r.clone();
                let effects = match e {
                    Event::Report(i, s) => {
                        // Mostly devices already moved; sometimes one still waiting.
                        let ids: Vec<String> = r
                            .members
                            .iter()
                            .filter(|m| i % 10 == 0 || m.state != DeviceState::Waiting)
                            .map(|m| m.device.clone())
                            .collect();
                        if ids.is_empty() {
                            continue;
                        }
                        let d = &ids[i % ids.len()];
                        let rep = match s {
                            0 => report(d, 1, Some((2, Phase::Downloading))),
                            1 => report(d, 2, Some((2, Phase::Probation))),
                            2 => report(d, 2, None),
                            3 => report(d, 1, Some((2, Phase::Failed))),
                            _ => report(d, 1, None),
                        };
                        r.handle_report(now, d, &rep)
                    }
                    Event::Alert(i) => {
                        let ids: Vec<String> = r
                            .members
                            .iter()
                            .filter(|m| m.state != DeviceState::Waiting)
                            .map(|m| m.device.clone())
                            .collect();
                        if ids.is_empty() {
                            continue;
                        }
                        r.handle_alert(now, &ids[i % ids.len()], "alert: class drift").1
                    }
                    Event::Tick(dt) => { now += dt; r.handle_timeout(now) }
                    Event::Pause => r.pause(now),
                    Event::Resume => r.resume(now),
                    Event::Abort => r.abort(now, "operator".into()),
                    Event::Cancel => r.cancel(now),
                };
                let newly = moved(&effects);
                retargeted.extend(newly.iter().cloned());
                // Waves move only while running, in order, each after the one before it
                // succeeded.
                if r.wave > was.wave {
                    prop_assert!(
                        was.state == RolloutState::Running
                            || (was.state == RolloutState::Paused && matches!(e, Event::Resume))
                    );
                    for w in was.wave..r.wave {
                        prop_assert!(r.wave_succeeded(w), "wave {} had not succeeded", w);
                    }
                }
                // Exactly the devices of the waves started have moved.
                for m in &r.members {
                    prop_assert_eq!(m.state == DeviceState::Waiting, m.wave > r.wave);
                    if m.wave > r.wave {
                        prop_assert_eq!(r.assignment(&m.device), None);
                    }
                }
                if was.state.is_over() {
                    prop_assert_eq!(&r.state, &was.state, "an ended rollout stays ended");
                    prop_assert!(newly.is_empty());
                }
                // Past the threshold while running means aborted.
                if r.failed() > r.spec.max_failures as usize
                    && (was.state == RolloutState::Running || was.state == RolloutState::Paused
                        && matches!(e, Event::Resume))
                {
                    let stopped = matches!(r.state, RolloutState::Aborted { .. })
                        || r.state == RolloutState::Cancelled;
                    prop_assert!(stopped, "past the threshold but {:?}", r.state);
                }
                if matches!(r.state, RolloutState::Aborted { .. }) && r.spec.auto_rollback {
                    for m in r.members.iter().filter(|m| m.state != DeviceState::Waiting) {
                        prop_assert_eq!(r.assignment(&m.device), Some((1, TargetTerms::default())));
                    }
                }
                // Every device the rollout decides for was retargeted.
                for m in &r.members {
                    if r.assignment(&m.device).is_some() {
                        prop_assert!(retargeted.contains(&m.device));
                    }
                }
                prop_assert!(r.timeline.len() <= TIMELINE);
            }
        }
    }
}
