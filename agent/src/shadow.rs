//! The shadow phase of a new version: before it serves, it answers a share of the live
//! requests beside the serving model, off the serving path, and swaps in only if its answers
//! agree (the deployment's [`ShadowSpec`]).
//!
//! Two parts, in the manner of `update.rs`:
//!
//! - With no I/O and time passed in: [`Mirror`] (which requests to mirror: an exact share),
//!   [`CpuBudget`] (how much CPU the candidate may take), and [`Judge`], which compares each
//!   pair of answers (argmax agreement on classifier outputs, largest and mean absolute
//!   difference on every output, the Kolmogorov–Smirnov distance on regressor outputs, both
//!   models' p99 latency) and gives the verdict once the phase has compared its requests or
//!   run its time.
//! - The runner: [`Feed`], which the serving path offers each answered request to (a sampled
//!   one is copied into a bounded queue, never waited for: a full queue drops it), and
//!   [`start`], a thread of its own at idle priority (raised to background priority if it
//!   is starved, [`Starvation`]) that runs the candidate on what the feed queued and
//!   judges. The serving answer never waits for the candidate, and a candidate that fails is
//!   judged failed at once. One that hangs cannot be stopped from outside its thread: the
//!   driver gives up waiting at the phase's end (plus [`HANG_GRACE`]), drops the feed so
//!   nothing more is queued, and reports it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use modelcast_proto::desired::ShadowSpec;
use modelcast_proto::report::{ErrorKind, ShadowSummary};
use tracing::{info, warn};

use crate::engine::{EngineError, HostTensor, LoadedModel};
use crate::serve::Models;
use crate::update::Failure;

/// Mirrored requests waiting for the candidate at most; more are dropped.
pub const QUEUE: usize = 64;
/// Values of each side kept for the distance between distributions.
pub const MAX_DISTRIBUTION_VALUES: usize = 8192;
/// Latencies of each side kept for the p99.
pub const MAX_LATENCIES: usize = 8192;
/// How long a mirrored request waits for a core free of serving requests before it is
/// dropped.
pub const FREE_CORE_WAIT: Duration = Duration::from_millis(50);
/// How long past the phase's end the driver waits for a verdict before it judges the
/// candidate hung.
pub const HANG_GRACE: Duration = Duration::from_secs(30);
/// How often the figures reports show are brought up to date while a phase runs (their p99s
/// and distribution distance cost more than a comparison: not after each one).
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// A mirrored copy that waited this long in the queue says the candidate does not get the
/// CPU at idle priority ([`Starvation`]).
pub const STARVED_AFTER: Duration = Duration::from_secs(1);

/// Which requests are mirrored: exactly `percent` of them, evenly spread (the n-th request is
/// taken when ⌊n·p/100⌋ moves), shared by every serving thread.
#[derive(Debug)]
pub struct Mirror {
    percent: u64,
    seen: AtomicU64,
}

impl Mirror {
    /// Mirrors `percent` (1..=100) of the requests.
    pub fn new(percent: u32) -> Self {
        Mirror {
            percent: u64::from(percent.clamp(1, 100)),
            seen: AtomicU64::new(0),
        }
    }

    /// Whether this request is mirrored.
    pub fn take(&self) -> bool {
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        (n + 1) * self.percent / 100 > n * self.percent / 100
    }
}

/// CPU time the candidate may take: `percent` of one core since the phase started (the
/// first run always may, so that a phase can start at all).
#[derive(Debug, Clone)]
pub struct CpuBudget {
    percent: u32,
    started: Instant,
    spent: Duration,
}

impl CpuBudget {
    /// A budget of `percent` (1..=100) of one core from `now`.
    pub fn new(percent: u32, now: Instant) -> Self {
        CpuBudget {
            percent: percent.clamp(1, 100),
            started: now,
            spent: Duration::ZERO,
        }
    }

    /// Whether one more candidate run may start at `now`.
    pub fn allows(&self, now: Instant) -> bool {
        let allowed = now.saturating_duration_since(self.started) * self.percent / 100;
        self.spent.is_zero() || self.spent <= allowed
    }

    /// A run took `d`.
    pub fn spend(&mut self, d: Duration) {
        self.spent += d;
    }
}

/// Whether the candidate, at idle priority, gets the CPU time it needs: a mirrored copy that
/// waited [`STARVED_AFTER`] in the queue before the candidate took it says it does not (a
/// copy waits for those before it, each at most [`FREE_CORE_WAIT`] and a run, a few
/// milliseconds on a device that has time to spare). The phase would compare little or
/// nothing: it is raised, once. A busy device that still leaves it time keeps it idle: a
/// serving request preempts it at once there. (Measured otherwise first, by its thread's share
/// of a CPU while it runs: serving requests preempting it lowered that share on a machine
/// where it compared every copy, and raised it for nothing.)
#[derive(Debug, Clone)]
pub struct Starvation {
    idle: bool,
}

impl Starvation {
    /// Watching a candidate that starts at idle priority (`idle`), or not (never raised).
    pub fn new(idle: bool) -> Self {
        Starvation { idle }
    }

    /// The candidate took a copy that `waited` in the queue. True once, when it is to be
    /// raised.
    pub fn took(&mut self, waited: Duration) -> bool {
        let starved = self.idle && waited >= STARVED_AFTER;
        if starved {
            self.idle = false;
        }
        starved
    }
}

/// How a shadow phase ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The candidate may serve.
    Pass(ShadowSummary),
    /// It may not; why.
    Fail(String, ShadowSummary),
}

/// The comparison of a candidate's answers with the serving model's.
#[derive(Debug, Clone)]
pub struct Judge {
    spec: ShadowSpec,
    version: u64,
    started: Instant,
    compared: u32,
    dropped: u64,
    rows: u64,
    agreed: u64,
    max_abs: f64,
    sum_abs: f64,
    values: u64,
    serving_values: Vec<f64>,
    candidate_values: Vec<f64>,
    serving_us: Vec<u64>,
    candidate_us: Vec<u64>,
    failure: Option<String>,
}

impl Judge {
    /// A phase of `spec` for candidate `version`, from `now`.
    pub fn new(spec: ShadowSpec, version: u64, now: Instant) -> Self {
        Judge {
            spec,
            version,
            started: now,
            compared: 0,
            dropped: 0,
            rows: 0,
            agreed: 0,
            max_abs: 0.0,
            sum_abs: 0.0,
            values: 0,
            serving_values: Vec::new(),
            candidate_values: Vec::new(),
            serving_us: Vec::new(),
            candidate_us: Vec::new(),
            failure: None,
        }
    }

    /// Mirrored requests dropped in all so far (the feed's count).
    pub fn set_dropped(&mut self, dropped: u64) {
        self.dropped = dropped;
    }

    /// One mirrored request: the serving model's answer and latency, and the candidate's
    /// (or the error it failed with).
    pub fn compare(
        &mut self,
        serving: &[HostTensor],
        serving_latency: Duration,
        candidate: Result<&[HostTensor], &EngineError>,
        candidate_latency: Duration,
    ) {
        if self.failure.is_some() {
            return;
        }
        let candidate = match candidate {
            Ok(c) => c,
            Err(e) => {
                self.failure = Some(format!("the candidate failed on a live request: {e}"));
                return;
            }
        };
        if candidate.len() != serving.len() {
            self.failure = Some(format!(
                "the candidate gives {} outputs, the serving model {}",
                candidate.len(),
                serving.len()
            ));
            return;
        }
        for (i, s) in serving.iter().enumerate() {
            // By name, else at the same place.
            let c = candidate
                .iter()
                .find(|c| c.name == s.name)
                .unwrap_or(&candidate[i]);
            if c.shape != s.shape {
                self.failure = Some(format!(
                    "output {}: the candidate's shape {:?} differs from the serving model's {:?}",
                    s.name, c.shape, s.shape
                ));
                return;
            }
            let (sv, cv) = (s.values.to_f64(), c.values.to_f64());
            if sv.len() != cv.len() {
                self.failure = Some(format!("output {}: values differ in number", s.name));
                return;
            }
            for (a, b) in sv.iter().zip(&cv) {
                let d = (a - b).abs();
                let d = if d.is_finite() {
                    d
                } else if a.to_bits() == b.to_bits() {
                    0.0
                } else {
                    f64::INFINITY
                };
                self.max_abs = self.max_abs.max(d);
                self.sum_abs += d;
                self.values += 1;
            }
            let classes = s.shape.last().copied().unwrap_or(0) as usize;
            if classes >= 2 && !sv.is_empty() {
                for (a, b) in sv.chunks(classes).zip(cv.chunks(classes)) {
                    self.rows += 1;
                    self.agreed += u64::from(argmax(a) == argmax(b));
                }
            } else {
                for (a, b) in sv.iter().zip(&cv) {
                    if self.serving_values.len() < MAX_DISTRIBUTION_VALUES {
                        self.serving_values.push(*a);
                        self.candidate_values.push(*b);
                    }
                }
            }
        }
        self.compared += 1;
        if self.serving_us.len() < MAX_LATENCIES {
            self.serving_us.push(serving_latency.as_micros() as u64);
            self.candidate_us.push(candidate_latency.as_micros() as u64);
        }
    }

    /// The verdict at `now`, once there is one: at the first failure, when the phase has
    /// compared its requests, or when its time is up.
    pub fn verdict(&self, now: Instant) -> Option<Verdict> {
        if let Some(why) = &self.failure {
            return Some(self.fail(why.clone()));
        }
        let out_of_time =
            now.saturating_duration_since(self.started) >= Duration::from_secs(self.spec.seconds);
        if self.compared < self.spec.requests && !out_of_time {
            return None;
        }
        if self.compared == 0 {
            return Some(self.fail(format!(
                "no live request to compare in {} s",
                self.spec.seconds
            )));
        }
        let s = self.summary(None);
        if let Some(permille) = s.agreement_permille {
            if permille < self.spec.min_agreement_permille {
                return Some(self.fail(format!(
                    "argmax agreement {:.1}% over {} answers is below {:.1}%",
                    permille as f64 / 10.0,
                    s.compared,
                    self.spec.min_agreement_permille as f64 / 10.0
                )));
            }
        }
        if let Some(most) = self.spec.max_mean_abs_diff_millionths {
            let most = most as f64 / 1e6;
            if s.mean_abs_diff > most {
                return Some(self.fail(format!(
                    "mean absolute difference {:.3e} exceeds {most:.3e}",
                    s.mean_abs_diff
                )));
            }
        }
        let max_ks = f64::from(self.spec.max_ks_permille) / 1000.0;
        if let Some(ks) = s.ks.filter(|ks| *ks > max_ks) {
            return Some(self.fail(format!(
                "the answers' distributions differ: Kolmogorov–Smirnov distance {ks:.3} exceeds {max_ks:.3}"
            )));
        }
        if let (Some(most), Some(serving), Some(candidate)) = (
            self.spec.max_p99_percent,
            s.serving_p99_us,
            s.candidate_p99_us,
        ) {
            if candidate * 100 > serving.max(1) * u64::from(most) {
                return Some(self.fail(format!(
                    "the candidate's p99 {candidate} µs exceeds {most}% of the serving model's {serving} µs"
                )));
            }
        }
        Some(Verdict::Pass(self.summary(Some("passed"))))
    }

    fn fail(&self, why: String) -> Verdict {
        Verdict::Fail(why, self.summary(Some("failed")))
    }

    /// The figures so far.
    pub fn summary(&self, verdict: Option<&str>) -> ShadowSummary {
        ShadowSummary {
            version: self.version,
            compared: self.compared,
            wanted: self.spec.requests,
            dropped: self.dropped,
            agreement_permille: (self.rows > 0).then(|| (self.agreed * 1000 / self.rows) as u32),
            max_abs_diff: self.max_abs,
            mean_abs_diff: if self.values == 0 {
                0.0
            } else {
                self.sum_abs / self.values as f64
            },
            ks: (!self.serving_values.is_empty())
                .then(|| ks_distance(&self.serving_values, &self.candidate_values)),
            serving_p99_us: p99(&self.serving_us),
            candidate_p99_us: p99(&self.candidate_us),
            verdict: verdict.map(String::from),
        }
    }
}

/// Index of the largest value (the first of equals; NaN is never the largest).
fn argmax(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] || values[best].is_nan() && !v.is_nan() {
            best = i;
        }
    }
    best
}

/// Nearest-rank p99 (selected, not sorted: linear time).
fn p99(us: &[u64]) -> Option<u64> {
    if us.is_empty() {
        return None;
    }
    let mut values = us.to_vec();
    let rank = (values.len() * 99).div_ceil(100).max(1);
    Some(*values.select_nth_unstable(rank - 1).1)
}

/// The two-sample Kolmogorov–Smirnov distance: the largest gap between the two empirical
/// distribution functions (NaNs sort last).
pub fn ks_distance(a: &[f64], b: &[f64]) -> f64 {
    if a.is_empty() || b.is_empty() {
        return 0.0;
    }
    let sort = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(|x, y| x.total_cmp(y));
        s
    };
    let (a, b) = (sort(a), sort(b));
    let (mut i, mut j, mut d) = (0usize, 0usize, 0f64);
    while i < a.len() && j < b.len() {
        let x = if a[i].total_cmp(&b[j]).is_le() {
            a[i]
        } else {
            b[j]
        };
        while i < a.len() && a[i].total_cmp(&x).is_le() {
            i += 1;
        }
        while j < b.len() && b[j].total_cmp(&x).is_le() {
            j += 1;
        }
        d = d.max((i as f64 / a.len() as f64 - j as f64 / b.len() as f64).abs());
    }
    d
}

/// One mirrored request: its inputs, the serving model's answer and latency, and when it was
/// queued.
struct Mirrored {
    inputs: Vec<HostTensor>,
    outputs: Vec<HostTensor>,
    latency: Duration,
    queued: Instant,
}

/// What the serving path sees of a shadow phase: it offers each answered request, and a
/// sampled one is queued for the candidate (never waited for).
pub struct Feed {
    /// The candidate version.
    pub version: u64,
    mirror: Mirror,
    queue: SyncSender<Mirrored>,
    dropped: AtomicU64,
}

impl Feed {
    /// An answered request: queued for the candidate if the share takes it and the queue
    /// has room.
    pub fn offer(&self, inputs: &[HostTensor], outputs: &[HostTensor], latency: Duration) {
        if !self.mirror.take() {
            return;
        }
        let m = Mirrored {
            inputs: inputs.to_vec(),
            outputs: outputs.to_vec(),
            latency,
            queued: Instant::now(),
        };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.queue.try_send(m) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A running shadow phase, as the driver holds it.
pub struct Running {
    /// What the serving path offers requests to.
    pub feed: Arc<Feed>,
    /// The figures so far (for reports).
    pub progress: Arc<Mutex<ShadowSummary>>,
    /// The verdict, once there is one.
    pub verdict: tokio::sync::oneshot::Receiver<Verdict>,
}

/// Starts the shadow phase of `candidate` on a thread of its own at idle priority
/// ([`crate::priority::to_idle_self`]: `SCHED_IDLE`, so that a serving thread that wakes takes
/// the CPU from the candidate at once rather than at the end of its time slice). On a device
/// too busy to leave it CPU time ([`Starvation`]), it is raised to background priority
/// (nice 10, [`crate::priority::raise`]), since a phase that compares nothing fails. Where
/// the agent may not raise a thread again, it runs at background priority from the start. `serving` counts
/// the inference requests running now: the candidate runs a mirrored request only when fewer
/// than the machine's cores are busy with them (waiting up to [`FREE_CORE_WAIT`], else the
/// copy is dropped), so that it does not take a core a serving request needs.
pub fn start(
    candidate: Arc<LoadedModel>,
    spec: ShadowSpec,
    serving: Arc<std::sync::atomic::AtomicUsize>,
) -> Running {
    let (queue, receive) = sync_channel(QUEUE);
    let version = candidate.manifest().version;
    let feed = Arc::new(Feed {
        version,
        mirror: Mirror::new(spec.sample_percent),
        queue,
        dropped: AtomicU64::new(0),
    });
    let judge = Judge::new(spec, version, Instant::now());
    let progress = Arc::new(Mutex::new(judge.summary(None)));
    let (tell, verdict) = tokio::sync::oneshot::channel();
    let (f, p) = (feed.clone(), progress.clone());
    let spawned = std::thread::Builder::new()
        .name("modelcast-shadow".into())
        .stack_size(crate::priority::WORK_STACK)
        .spawn(move || run(candidate, spec, judge, receive, (f, serving), p, tell));
    if let Err(e) = spawned {
        warn!(error = %e, "the shadow thread did not start");
    }
    Running {
        feed,
        progress,
        verdict,
    }
}

fn run(
    candidate: Arc<LoadedModel>,
    spec: ShadowSpec,
    mut judge: Judge,
    receive: Receiver<Mirrored>,
    (feed, serving): (Arc<Feed>, Arc<std::sync::atomic::AtomicUsize>),
    progress: Arc<Mutex<ShadowSummary>>,
    tell: tokio::sync::oneshot::Sender<Verdict>,
) {
    let mut starvation = Starvation::new(crate::priority::to_idle_or_background());
    let mut budget = CpuBudget::new(spec.cpu_percent, Instant::now());
    let mut over_budget = 0u64;
    // When the figures were last brought up to date (none yet: the first comparison shows).
    let mut shown: Option<Instant> = None;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let core_free = || {
        let until = Instant::now() + FREE_CORE_WAIT;
        loop {
            if serving.load(Ordering::Relaxed) < cores {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    };
    loop {
        if tell.is_closed() {
            return;
        }
        let received = receive.recv_timeout(Duration::from_millis(250));
        if let Ok(m) = &received {
            let waited = m.queued.elapsed();
            if starvation.took(waited) {
                let allowed = crate::priority::raise();
                info!(
                    version = feed.version,
                    allowed,
                    waited_ms = waited.as_millis() as u64,
                    "a mirrored copy waited long for the shadow candidate at idle priority; raising it"
                );
            }
        }
        match received {
            Ok(m) if budget.allows(Instant::now()) && core_free() => {
                let started = Instant::now();
                let answer = candidate.run(&m.inputs);
                let took = started.elapsed();
                budget.spend(took);
                judge.compare(&m.outputs, m.latency, answer.as_deref(), took);
            }
            Ok(_) => over_budget += 1,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        judge.set_dropped(feed.dropped.load(Ordering::Relaxed) + over_budget);
        let now = Instant::now();
        if shown.is_none_or(|at| now.saturating_duration_since(at) >= PROGRESS_EVERY) {
            if let Ok(mut p) = progress.lock() {
                *p = judge.summary(None);
            }
            shown = Some(now);
        }
        if let Some(v) = judge.verdict(now) {
            if let Ok(mut p) = progress.lock() {
                *p = match &v {
                    Verdict::Pass(s) | Verdict::Fail(_, s) => s.clone(),
                };
            }
            let _ = tell.send(v);
            return;
        }
    }
}

/// Each model's last shadow phase: its figures, while it runs and after (for reports).
pub type Phases = Mutex<BTreeMap<String, Arc<Mutex<ShadowSummary>>>>;

/// The shadow phase of a staged `candidate` : live requests mirrored
/// to it until the judge's verdict, which decides whether it may go on to serve. The serving
/// model is never touched; a candidate that hangs is given up at the phase's end plus
/// [`HANG_GRACE`].
pub async fn phase(
    models: Arc<Models>,
    progress: &Phases,
    candidate: Arc<LoadedModel>,
    spec: ShadowSpec,
) -> Result<Arc<LoadedModel>, Failure> {
    let (name, version) = (
        candidate.manifest().name.clone(),
        candidate.manifest().version,
    );
    let running = start(candidate.clone(), spec, models.in_flight());
    if let Ok(mut p) = progress.lock() {
        p.insert(name.clone(), running.progress.clone());
    }
    info!(model = %name, version, requests = spec.requests, seconds = spec.seconds, sample_percent = spec.sample_percent, "shadow phase starts: live requests mirrored to the new version");
    models.set_shadow(&name, Some(running.feed.clone()));
    // Mirroring stops however the phase ends: a verdict, a hang, or the task stopped (the
    // desired state moved on: the phase is reported cancelled).
    struct Unmirror(Arc<Models>, String, Arc<Mutex<ShadowSummary>>);
    impl Drop for Unmirror {
        fn drop(&mut self) {
            self.0.set_shadow(&self.1, None);
            if let Ok(mut p) = self.2.lock() {
                p.verdict.get_or_insert_with(|| "cancelled".into());
            }
        }
    }
    let unmirror = Unmirror(models, name.clone(), running.progress.clone());
    let limit = Duration::from_secs(spec.seconds) + HANG_GRACE;
    let verdict = tokio::time::timeout(limit, running.verdict).await;
    drop(unmirror);
    let fail = |why: String| Failure::new(ErrorKind::Shadow, format!("shadow: {why}"));
    match verdict {
        Ok(Ok(Verdict::Pass(s))) => {
            info!(model = %name, version, compared = s.compared, agreement_permille = ?s.agreement_permille, mean_abs_diff = s.mean_abs_diff, "shadow phase passed");
            Ok(candidate)
        }
        Ok(Ok(Verdict::Fail(why, s))) => {
            warn!(model = %name, version, compared = s.compared, %why, "shadow phase failed: the new version never serves");
            Err(fail(why))
        }
        Ok(Err(_)) => Err(fail("the phase's thread ended without a verdict".into())),
        Err(_) => {
            if let Ok(mut p) = running.progress.lock() {
                p.verdict = Some("failed".into());
            }
            Err(fail(format!(
                "the candidate hung: no verdict {} s after the phase's end",
                HANG_GRACE.as_secs()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Values;
    use proptest::prelude::*;

    fn tensor(name: &str, shape: &[u64], v: &[f32]) -> HostTensor {
        HostTensor {
            name: name.into(),
            shape: shape.to_vec(),
            values: Values::from_f32(v),
        }
    }

    fn spec(requests: u32) -> ShadowSpec {
        ShadowSpec::new(requests)
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn identical_answers_pass_once_enough_are_compared() {
        let t0 = Instant::now();
        let mut j = Judge::new(spec(3), 2, t0);
        let out = [tensor("y", &[1, 3], &[0.1, 0.7, 0.2])];
        for i in 0..3 {
            assert_eq!(j.verdict(t0), None, "after {i}");
            j.compare(&out, MS, Ok(&out), MS);
        }
        let Some(Verdict::Pass(s)) = j.verdict(t0) else {
            panic!("{:?}", j.verdict(t0))
        };
        assert_eq!(s.compared, 3);
        assert_eq!(s.agreement_permille, Some(1000));
        assert_eq!(s.max_abs_diff, 0.0);
        assert_eq!(s.verdict.as_deref(), Some("passed"));
    }

    #[test]
    fn a_classifier_that_picks_other_classes_fails() {
        let t0 = Instant::now();
        let mut j = Judge::new(spec(10), 2, t0);
        let serving = [tensor("y", &[2, 3], &[0.1, 0.7, 0.2, 0.5, 0.3, 0.2])];
        let other = [tensor("y", &[2, 3], &[0.8, 0.1, 0.1, 0.5, 0.3, 0.2])];
        for _ in 0..10 {
            j.compare(&serving, MS, Ok(&other), MS);
        }
        let Some(Verdict::Fail(why, s)) = j.verdict(t0) else {
            panic!()
        };
        assert_eq!(s.agreement_permille, Some(500));
        assert!(why.contains("argmax agreement 50.0%"), "{why}");
    }

    #[test]
    fn regressors_are_judged_on_their_distributions_and_mean_difference() {
        let t0 = Instant::now();
        let mut shifted = Judge::new(spec(50), 2, t0);
        let mut close = Judge::new(
            ShadowSpec {
                max_mean_abs_diff_millionths: Some(10_000),
                ..spec(50)
            },
            2,
            t0,
        );
        for i in 0..50 {
            let x = i as f32 / 50.0;
            let serving = [tensor("v", &[1, 1], &[x])];
            shifted.compare(&serving, MS, Ok(&[tensor("v", &[1, 1], &[x + 0.5])]), MS);
            close.compare(&serving, MS, Ok(&[tensor("v", &[1, 1], &[x + 0.001])]), MS);
        }
        let Some(Verdict::Fail(why, s)) = shifted.verdict(t0) else {
            panic!()
        };
        assert!(why.contains("Kolmogorov"), "{why}");
        assert!(s.ks.unwrap() > 0.4);
        assert!(matches!(close.verdict(t0), Some(Verdict::Pass(_))));
    }

    #[test]
    fn a_failing_candidate_or_another_shape_fails_at_once() {
        let t0 = Instant::now();
        let out = [tensor("y", &[1, 3], &[0.1, 0.7, 0.2])];
        let mut j = Judge::new(spec(1000), 2, t0);
        j.compare(&out, MS, Err(&EngineError::BadInput("boom".into())), MS);
        assert!(
            matches!(j.verdict(t0), Some(Verdict::Fail(why, _)) if why.contains("failed on a live request: bad request: boom"))
        );
        let mut j = Judge::new(spec(1000), 2, t0);
        j.compare(&out, MS, Ok(&[tensor("y", &[1, 4], &[0.; 4])]), MS);
        assert!(matches!(j.verdict(t0), Some(Verdict::Fail(why, _)) if why.contains("shape")));
    }

    #[test]
    fn out_of_time_it_judges_what_it_compared_and_nothing_fails() {
        let t0 = Instant::now();
        let late = t0 + Duration::from_secs(3600);
        let j = Judge::new(spec(100), 2, t0);
        assert!(
            matches!(j.verdict(late), Some(Verdict::Fail(why, _)) if why.contains("no live request"))
        );
        let mut j = Judge::new(spec(100), 2, t0);
        let out = [tensor("y", &[1, 3], &[0.1, 0.7, 0.2])];
        j.compare(&out, MS, Ok(&out), MS);
        assert_eq!(j.verdict(t0 + Duration::from_secs(3599)), None);
        assert!(matches!(j.verdict(late), Some(Verdict::Pass(_))));
    }

    #[test]
    fn a_slow_candidate_fails_the_latency_bound() {
        let t0 = Instant::now();
        let mut j = Judge::new(
            ShadowSpec {
                max_p99_percent: Some(150),
                ..spec(20)
            },
            2,
            t0,
        );
        let out = [tensor("y", &[1, 3], &[0.1, 0.7, 0.2])];
        for _ in 0..20 {
            j.compare(&out, MS, Ok(&out), 3 * MS);
        }
        assert!(matches!(j.verdict(t0), Some(Verdict::Fail(why, _)) if why.contains("p99")));
    }

    #[test]
    fn a_nan_on_one_side_is_an_infinite_difference() {
        let t0 = Instant::now();
        let mut j = Judge::new(spec(1), 2, t0);
        j.compare(
            &[tensor("v", &[1, 1], &[1.0])],
            MS,
            Ok(&[tensor("v", &[1, 1], &[f32::NAN])]),
            MS,
        );
        assert_eq!(j.summary(None).max_abs_diff, f64::INFINITY);
    }

    #[test]
    fn a_candidate_starved_at_idle_priority_is_raised_once() {
        let ms = Duration::from_millis;
        let mut s = Starvation::new(true);
        // Copies taken promptly, or after a backlog of a few: never.
        for waited in [0, 1, 50, 400, 999] {
            assert!(!s.took(ms(waited)));
        }
        // A copy that waited a second: raised, and only once.
        assert!(s.took(STARVED_AFTER));
        assert!(!s.took(ms(5000)));
        // Not at idle priority to begin with: nothing to raise.
        assert!(!Starvation::new(false).took(ms(5000)));
    }

    #[test]
    fn the_budget_holds_the_candidate_to_its_share_of_a_core() {
        let t0 = Instant::now();
        let mut b = CpuBudget::new(10, t0);
        assert!(b.allows(t0), "the first run may start");
        b.spend(Duration::from_millis(100));
        assert!(!b.allows(t0 + Duration::from_millis(100)));
        // 10% of 2 s is 200 ms: 100 spent.
        assert!(b.allows(t0 + Duration::from_secs(2)));
    }

    proptest! {
        #[test]
        fn the_p99_is_the_nearest_rank_of_the_sorted_values(
            values in proptest::collection::vec(0u64..1000, 1..500),
        ) {
            let mut sorted = values.clone();
            sorted.sort_unstable();
            let rank = (sorted.len() * 99).div_ceil(100);
            prop_assert_eq!(p99(&values), Some(sorted[rank - 1]));
        }

        #[test]
        fn the_mirror_takes_its_share_within_one_request(percent in 1u32..=100, n in 1u64..20_000) {
            let m = Mirror::new(percent);
            let taken = (0..n).filter(|_| m.take()).count() as u64;
            let want = n * u64::from(percent) / 100;
            prop_assert!(taken.abs_diff(want) <= 1, "{taken} of {n} at {percent}%");
        }

        #[test]
        fn equal_answers_always_pass_and_never_early(
            rows in proptest::collection::vec(proptest::collection::vec(-1e3f32..1e3, 4), 1..40),
            requests in 1u32..60,
        ) {
            let t0 = Instant::now();
            let mut j = Judge::new(spec(requests), 2, t0);
            for (i, r) in rows.iter().enumerate() {
                let out = [tensor("y", &[1, 4], r)];
                prop_assert_eq!(j.verdict(t0).is_some(), i as u32 >= requests);
                j.compare(&out, MS, Ok(&out), MS);
            }
            if rows.len() as u32 >= requests {
                prop_assert!(matches!(j.verdict(t0), Some(Verdict::Pass(_))));
            }
        }

        #[test]
        fn the_ks_distance_is_within_zero_and_one_and_zero_for_equal_samples(
            a in proptest::collection::vec(-1e6f64..1e6, 1..200),
            b in proptest::collection::vec(-1e6f64..1e6, 1..200),
        ) {
            let d = ks_distance(&a, &b);
            prop_assert!((0.0..=1.0).contains(&d));
            prop_assert_eq!(ks_distance(&a, &a), 0.0);
        }
    }
}
