//! Drift and anomaly detection on the devices' telemetry, as a state machine with no I/O:
//! per-model points ([`ModelInterval`]) go in, alerts raised and cleared come out.
//!
//! Each (device, model, version) is one stream. Its points are pooled into samples of at
//! least [`DriftConfig::min_requests`] requests (so a device reporting every second and one
//! reporting every hour are judged on the same evidence). The stream's first
//! [`DriftConfig::baseline_samples`] samples are its baseline: how this version behaves on
//! this device when it starts serving. After that each sample is tested against it:
//!
//! | what | test | raises when |
//! | --- | --- | --- |
//! | latency (p95 of the sample) | Page–Hinkley on `p95 / baseline p95` (capped at 2) | the cumulative excess over `1 + δ` passes `λ` (rises under [`DriftConfig::latency_floor_us`] are ignored) |
//! | error rate | EWMA chart | the EWMA passes the baseline rate plus `max(margin, 3σ)` |
//! | class histogram of a classifier output | population stability index over the last [`DriftConfig::window_samples`] samples | PSI > [`DriftConfig::psi_alert`] |
//! | mean of any other output | shift in baseline standard deviations over the window | > [`DriftConfig::mean_shift_sd`] |
//! | NaN or infinite outputs | rate over the window | above the baseline's rate plus 0.1 % |
//!
//! An alert clears when its statistic is back under half its threshold (PSI under
//! [`DriftConfig::psi_clear`]), judged against a baseline from before the alert: a restarted
//! server rebuilds its streams from recent points, and an alert raised before the restart
//! stays active until that stream's version is replaced. Per version, the fleet's view is the
//! devices alerting on it ([`by_version`]).

use std::collections::{BTreeMap, VecDeque};

use modelcast_proto::telemetry::{LatencyBuckets, ModelTelemetry, OutputStats, TelemetryReport};
use serde::{Deserialize, Serialize};

/// One model's interval on one device: a point of the model's time series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInterval {
    /// Device.
    pub device: String,
    /// The report's sequence number.
    pub seq: u64,
    /// Start of the interval, Unix milliseconds.
    pub from_ms: i64,
    /// End of the interval, Unix milliseconds.
    pub to_ms: i64,
    /// What the model served from one slot.
    pub telemetry: ModelTelemetry,
}

impl ModelInterval {
    /// A report's points, one per model and slot.
    pub fn of(report: &TelemetryReport) -> Vec<ModelInterval> {
        report
            .models
            .iter()
            .map(|m| ModelInterval {
                device: report.device.clone(),
                seq: report.seq,
                from_ms: report.from_ms,
                to_ms: report.to_ms,
                telemetry: m.clone(),
            })
            .collect()
    }
}

/// How streams are judged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftConfig {
    /// Requests a sample needs (points are pooled until they have this many).
    pub min_requests: u64,
    /// Samples that make a stream's baseline.
    pub baseline_samples: usize,
    /// Samples pooled for the output tests.
    pub window_samples: usize,
    /// PSI that raises a class-drift alert (0.25: a significant shift, by the usual rule).
    pub psi_alert: f64,
    /// PSI under which it clears.
    pub psi_clear: f64,
    /// Page–Hinkley's tolerance δ: latency within `1 + δ` of the baseline is normal.
    pub latency_delta: f64,
    /// Page–Hinkley's threshold λ on the cumulative excess.
    pub latency_lambda: f64,
    /// Latency rises smaller than this many microseconds are not anomalies.
    pub latency_floor_us: u64,
    /// EWMA weight of the newest sample.
    pub ewma_alpha: f64,
    /// Least error-rate rise that raises an alert.
    pub error_margin: f64,
    /// Shift of an output's mean, in baseline standard deviations, that raises an alert.
    pub mean_shift_sd: f64,
}

impl Default for DriftConfig {
    fn default() -> Self {
        DriftConfig {
            min_requests: 100,
            baseline_samples: 5,
            window_samples: 3,
            psi_alert: 0.25,
            psi_clear: 0.1,
            latency_delta: 0.1,
            latency_lambda: 2.0,
            latency_floor_us: 500,
            ewma_alpha: 0.3,
            error_margin: 0.02,
            mean_shift_sd: 1.0,
        }
    }
}

/// What an alert is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum AlertKind {
    /// The model's run time rose.
    Latency,
    /// More requests fail.
    ErrorRate,
    /// The class histogram of an output moved.
    ClassDrift {
        /// Output name.
        output: String,
    },
    /// The mean of an output moved.
    OutputShift {
        /// Output name.
        output: String,
    },
    /// An output has NaN or infinite values.
    NonFinite {
        /// Output name.
        output: String,
    },
}

impl AlertKind {
    /// Its name for machines (a metric label): `latency`, `error_rate`, `class_drift`,
    /// `output_shift`, `non_finite`.
    pub fn label(&self) -> &'static str {
        match self {
            AlertKind::Latency => "latency",
            AlertKind::ErrorRate => "error_rate",
            AlertKind::ClassDrift { .. } => "class_drift",
            AlertKind::OutputShift { .. } => "output_shift",
            AlertKind::NonFinite { .. } => "non_finite",
        }
    }

    /// The output it concerns, if it concerns one.
    pub fn output(&self) -> Option<&str> {
        match self {
            AlertKind::Latency | AlertKind::ErrorRate => None,
            AlertKind::ClassDrift { output }
            | AlertKind::OutputShift { output }
            | AlertKind::NonFinite { output } => Some(output),
        }
    }
}

impl std::fmt::Display for AlertKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AlertKind::Latency => write!(f, "latency"),
            AlertKind::ErrorRate => write!(f, "error rate"),
            AlertKind::ClassDrift { output } => write!(f, "class drift of {output}"),
            AlertKind::OutputShift { output } => write!(f, "shift of {output}"),
            AlertKind::NonFinite { output } => write!(f, "NaN/Inf in {output}"),
        }
    }
}

/// An alert on one device's stream of one model version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// Id, unique (assigned by the store's id sequence); 0 until stored.
    pub id: u64,
    /// Device.
    pub device: String,
    /// Model name.
    pub model: String,
    /// Version.
    pub version: u64,
    /// What it is about.
    #[serde(flatten)]
    pub kind: AlertKind,
    /// The test that raised it (`page-hinkley`, `ewma`, `psi`, `mean-shift`, `rate`).
    pub test: String,
    /// The statistic when raised.
    pub value: f64,
    /// Its threshold.
    pub threshold: f64,
    /// What a person reads.
    pub message: String,
    /// When raised: the end of the interval that raised it, Unix milliseconds.
    pub raised_ms: i64,
    /// When cleared, if it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleared_ms: Option<i64>,
}

impl Alert {
    /// Whether it has not cleared.
    pub fn active(&self) -> bool {
        self.cleared_ms.is_none()
    }
}

/// What a point changed.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A new alert (id 0: the caller stores it).
    Raised(Alert),
    /// The stream's alert of this kind cleared at this time.
    Cleared {
        /// Device.
        device: String,
        /// Model.
        model: String,
        /// Version.
        version: u64,
        /// Kind.
        kind: AlertKind,
        /// Unix milliseconds.
        at_ms: i64,
    },
}

/// One output's figures over a sample.
#[derive(Debug, Clone, Default, PartialEq)]
struct OutputSum {
    count: u64,
    mean: f64,
    m2: f64,
    non_finite: u64,
    classes: Vec<u64>,
}

impl OutputSum {
    fn add(&mut self, o: &OutputStats) {
        // Chan et al.'s pairwise combination of means and variances.
        let (n_a, n_b) = (self.count as f64, o.count as f64);
        let n = n_a + n_b;
        if n > 0.0 {
            let delta = o.mean - self.mean;
            self.mean += delta * n_b / n;
            self.m2 += o.variance * n_b + delta * delta * n_a * n_b / n;
        }
        self.count = self.count.saturating_add(o.count);
        self.non_finite = self.non_finite.saturating_add(o.non_finite);
        if self.classes.len() < o.classes.len() {
            self.classes.resize(o.classes.len(), 0);
        }
        for (c, n) in self.classes.iter_mut().zip(&o.classes) {
            *c = c.saturating_add(*n);
        }
    }

    fn merge(&mut self, other: &OutputSum) {
        self.add(&OutputStats {
            name: String::new(),
            count: other.count,
            mean: other.mean,
            variance: if other.count > 0 {
                other.m2 / other.count as f64
            } else {
                0.0
            },
            min: 0.0,
            max: 0.0,
            non_finite: other.non_finite,
            classes: other.classes.clone(),
        });
    }

    fn sd(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            (self.m2 / self.count as f64).max(0.0).sqrt()
        }
    }

    fn non_finite_rate(&self) -> f64 {
        let all = self.count.saturating_add(self.non_finite);
        if all == 0 {
            0.0
        } else {
            self.non_finite as f64 / all as f64
        }
    }
}

/// Points pooled until they hold enough requests.
#[derive(Debug, Clone, Default, PartialEq)]
struct Sample {
    requests: u64,
    errors: u64,
    latency: LatencyBuckets,
    /// p95 of intervals without buckets (older agents), request-weighted.
    p95_fallback: Option<(u64, u64)>,
    outputs: BTreeMap<String, OutputSum>,
    to_ms: i64,
}

impl Sample {
    fn add(&mut self, p: &ModelInterval) {
        let t = &p.telemetry;
        self.requests = self.requests.saturating_add(t.requests);
        self.errors = self.errors.saturating_add(t.errors);
        self.latency.merge(&t.latency_buckets);
        if t.latency_buckets.is_empty() {
            if let Some(l) = t.latency_us {
                let (sum, n) = self.p95_fallback.unwrap_or((0, 0));
                self.p95_fallback = Some((
                    sum.saturating_add(l.p95.saturating_mul(t.requests)),
                    n.saturating_add(t.requests),
                ));
            }
        }
        for o in &t.outputs {
            self.outputs.entry(o.name.clone()).or_default().add(o);
        }
        self.to_ms = self.to_ms.max(p.to_ms);
    }

    fn merge(&mut self, other: &Sample) {
        self.requests = self.requests.saturating_add(other.requests);
        self.errors = self.errors.saturating_add(other.errors);
        self.latency.merge(&other.latency);
        for (name, o) in &other.outputs {
            self.outputs.entry(name.clone()).or_default().merge(o);
        }
        self.to_ms = self.to_ms.max(other.to_ms);
    }

    fn p95_us(&self) -> Option<f64> {
        self.latency.quantile(0.95).map(|v| v as f64).or_else(|| {
            self.p95_fallback
                .filter(|&(_, n)| n > 0)
                .map(|(sum, n)| sum as f64 / n as f64)
        })
    }

    fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }
}

/// Population stability index of `current` against `baseline` (class counts), with each
/// share smoothed by half a count so empty classes stay finite.
pub fn psi(baseline: &[u64], current: &[u64]) -> f64 {
    let k = baseline.len().max(current.len());
    if k == 0 {
        return 0.0;
    }
    let share = |counts: &[u64], i: usize| {
        let total = counts.iter().fold(0u64, |sum, &n| sum.saturating_add(n));
        (counts.get(i).copied().unwrap_or(0) as f64 + 0.5) / (total as f64 + 0.5 * k as f64)
    };
    (0..k)
        .map(|i| {
            let (p, q) = (share(baseline, i), share(current, i));
            (q - p) * (q / p).ln()
        })
        .sum()
}

/// Page–Hinkley test for an upward change of a series around 1.
#[derive(Debug, Clone, Default, PartialEq)]
struct PageHinkley {
    cumulative: f64,
    least: f64,
}

impl PageHinkley {
    /// Adds `x`; returns the test statistic.
    fn add(&mut self, x: f64, delta: f64) -> f64 {
        self.cumulative += x - 1.0 - delta;
        self.least = self.least.min(self.cumulative);
        self.cumulative - self.least
    }
}

/// One device's stream of one model version.
#[derive(Debug, Clone, Default)]
struct Stream {
    pending: Sample,
    baseline: Option<Sample>,
    baseline_samples: usize,
    /// End of the baseline's last sample (Unix ms).
    baseline_to_ms: i64,
    window: VecDeque<Sample>,
    latency: PageHinkley,
    latency_ratio_ewma: f64,
    error_ewma: Option<f64>,
    /// Active alerts, with when they were raised (Unix ms).
    active: BTreeMap<AlertKind, i64>,
    last_to_ms: i64,
}

/// Most streams (model versions) one device may have: devices report what they like, and
/// points of further versions are not judged (a device runs a few models, and a version's
/// stream is forgotten once idle, see [`Detectors::forget_idle`]).
pub const MAX_STREAMS_PER_DEVICE: usize = 64;

/// Every stream's detectors.
#[derive(Debug, Default)]
pub struct Detectors {
    config: DriftConfig,
    streams: BTreeMap<(String, String, u64), Stream>,
}

/// A test's verdict on one statistic.
struct Verdict {
    kind: AlertKind,
    test: &'static str,
    value: f64,
    threshold: f64,
    raise: bool,
    clear: bool,
    message: String,
}

impl Detectors {
    /// Detectors judging by `config`.
    pub fn new(config: DriftConfig) -> Self {
        Detectors {
            config,
            streams: BTreeMap::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &DriftConfig {
        &self.config
    }

    /// Marks an alert stored earlier as active, so that replaying its stream does not raise
    /// it again.
    pub fn restore(&mut self, alert: &Alert) {
        if alert.active() {
            let key = (alert.device.clone(), alert.model.clone(), alert.version);
            let stream = self.streams.entry(key).or_default();
            stream.active.insert(alert.kind.clone(), alert.raised_ms);
        }
    }

    /// Forgets the streams without a point since `before_ms` (a replaced version, a device
    /// gone); a stream that comes back forms a new baseline. Returns how many were forgotten.
    pub fn forget_idle(&mut self, before_ms: i64) -> usize {
        let before = self.streams.len();
        self.streams
            .retain(|_, s| s.last_to_ms >= before_ms || !s.active.is_empty());
        before - self.streams.len()
    }

    /// Feeds one point (points of a stream in time order; older ones are ignored).
    pub fn observe(&mut self, p: &ModelInterval) -> Vec<Change> {
        let t = &p.telemetry;
        let key = (p.device.clone(), t.model.clone(), t.version);
        let config = self.config.clone();
        if !self.streams.contains_key(&key) {
            let first = (p.device.clone(), String::new(), 0);
            let of_device = self
                .streams
                .range(first..)
                .take_while(|((d, _, _), _)| *d == p.device)
                .count();
            if of_device >= MAX_STREAMS_PER_DEVICE {
                return Vec::new();
            }
        }
        let stream = self.streams.entry(key).or_default();
        if p.to_ms <= stream.last_to_ms {
            return Vec::new();
        }
        stream.last_to_ms = p.to_ms;
        stream.pending.add(p);
        if stream.pending.requests < config.min_requests.max(1) {
            return Vec::new();
        }
        let sample = std::mem::take(&mut stream.pending);
        let Some(baseline) = &mut stream.baseline else {
            stream.baseline_to_ms = sample.to_ms;
            stream.baseline = Some(sample);
            stream.baseline_samples = 1;
            return Vec::new();
        };
        if stream.baseline_samples < config.baseline_samples.max(1) {
            stream.baseline_to_ms = sample.to_ms;
            baseline.merge(&sample);
            stream.baseline_samples += 1;
            return Vec::new();
        }
        let baseline = baseline.clone();
        stream.window.push_back(sample.clone());
        while stream.window.len() > config.window_samples.max(1) {
            stream.window.pop_front();
        }
        let mut window = Sample::default();
        for s in &stream.window {
            window.merge(s);
        }
        let verdicts = judge(&config, stream, &baseline, &sample, &window);
        let mut changes = Vec::new();
        for v in verdicts {
            let raised_at = stream.active.get(&v.kind).copied();
            if raised_at.is_none() && v.raise {
                stream.active.insert(v.kind.clone(), p.to_ms);
                changes.push(Change::Raised(Alert {
                    id: 0,
                    device: p.device.clone(),
                    model: t.model.clone(),
                    version: t.version,
                    kind: v.kind,
                    test: v.test.into(),
                    value: v.value,
                    threshold: v.threshold,
                    message: v.message,
                    raised_ms: p.to_ms,
                    cleared_ms: None,
                }));
            } else if raised_at.is_some_and(|at| stream.baseline_to_ms < at && at < p.to_ms)
                && v.clear
            {
                // Only against a baseline from before the alert: a restarted server rebuilds
                // baselines from recent points, which may already be the drifted ones.
                stream.active.remove(&v.kind);
                if v.kind == AlertKind::Latency {
                    stream.latency = PageHinkley::default();
                }
                changes.push(Change::Cleared {
                    device: p.device.clone(),
                    model: t.model.clone(),
                    version: t.version,
                    kind: v.kind,
                    at_ms: p.to_ms,
                });
            }
        }
        changes
    }
}

/// Every test on one new sample.
fn judge(
    c: &DriftConfig,
    stream: &mut Stream,
    baseline: &Sample,
    sample: &Sample,
    window: &Sample,
) -> Vec<Verdict> {
    let mut verdicts = Vec::new();

    // Latency: Page–Hinkley on the ratio to the baseline's p95.
    if let (Some(base), Some(now)) = (baseline.p95_us(), sample.p95_us()) {
        let base = base.max(1.0);
        // One sample adds at most 0.9 to the statistic, so it takes several in a row to
        // raise (λ 2: three): a burst of load on the device is not an anomaly.
        let ratio = if now - base < c.latency_floor_us as f64 {
            1.0
        } else {
            (now / base).min(2.0)
        };
        let statistic = stream.latency.add(ratio, c.latency_delta);
        stream.latency_ratio_ewma = c.ewma_alpha * ratio
            + (1.0 - c.ewma_alpha)
                * if stream.latency_ratio_ewma == 0.0 {
                    1.0
                } else {
                    stream.latency_ratio_ewma
                };
        verdicts.push(Verdict {
            kind: AlertKind::Latency,
            test: "page-hinkley",
            value: statistic,
            threshold: c.latency_lambda,
            raise: statistic > c.latency_lambda,
            clear: stream.latency_ratio_ewma < 1.0 + c.latency_delta,
            message: format!("p95 {:.0} µs against a baseline of {base:.0} µs", now),
        });
    }

    // Error rate: an EWMA chart.
    let base = baseline.error_rate();
    let rate = sample.error_rate();
    let ewma = match stream.error_ewma {
        Some(e) => c.ewma_alpha * rate + (1.0 - c.ewma_alpha) * e,
        None => rate,
    };
    stream.error_ewma = Some(ewma);
    let sigma = (base * (1.0 - base) / sample.requests.max(1) as f64).sqrt();
    let margin = c.error_margin.max(3.0 * sigma);
    verdicts.push(Verdict {
        kind: AlertKind::ErrorRate,
        test: "ewma",
        value: ewma,
        threshold: base + margin,
        raise: ewma > base + margin,
        clear: ewma < base + margin / 2.0,
        message: format!(
            "error rate {:.2} % (smoothed) against a baseline of {:.2} %",
            ewma * 100.0,
            base * 100.0
        ),
    });

    // Outputs over the window.
    for (name, now) in &window.outputs {
        let Some(then) = baseline.outputs.get(name) else {
            continue;
        };
        if !then.classes.is_empty() && now.classes.iter().any(|&n| n > 0) {
            let value = psi(&then.classes, &now.classes);
            verdicts.push(Verdict {
                kind: AlertKind::ClassDrift {
                    output: name.clone(),
                },
                test: "psi",
                value,
                threshold: c.psi_alert,
                raise: value > c.psi_alert,
                clear: value < c.psi_clear,
                message: format!(
                    "class shares {} against a baseline of {} (PSI {value:.3})",
                    shares(&now.classes),
                    shares(&then.classes)
                ),
            });
        } else if then.classes.is_empty() && then.sd() > 0.0 && now.count > 0 {
            let value = (now.mean - then.mean).abs() / then.sd();
            verdicts.push(Verdict {
                kind: AlertKind::OutputShift {
                    output: name.clone(),
                },
                test: "mean-shift",
                value,
                threshold: c.mean_shift_sd,
                raise: value > c.mean_shift_sd,
                clear: value < c.mean_shift_sd / 2.0,
                message: format!(
                    "mean {:.4} against a baseline of {:.4} ± {:.4}",
                    now.mean,
                    then.mean,
                    then.sd()
                ),
            });
        }
        let (rate, base) = (now.non_finite_rate(), then.non_finite_rate());
        verdicts.push(Verdict {
            kind: AlertKind::NonFinite {
                output: name.clone(),
            },
            test: "rate",
            value: rate,
            threshold: base + 0.001,
            raise: rate > base + 0.001,
            clear: rate <= base + 0.0005,
            message: format!("{:.3} % of values NaN or infinite", rate * 100.0),
        });
    }
    verdicts
}

/// Class shares as percentages, e.g. `[50%, 50%, 0%]`.
fn shares(counts: &[u64]) -> String {
    let total = counts.iter().map(|&n| n as f64).sum::<f64>().max(1.0);
    let parts: Vec<String> = counts
        .iter()
        .map(|&n| format!("{:.0}%", n as f64 * 100.0 / total))
        .collect();
    format!("[{}]", parts.join(", "))
}

/// The fleet's view of one version: how many devices alert, of what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionAlerts {
    /// Model.
    pub model: String,
    /// Version.
    pub version: u64,
    /// Active alerts by kind (as text, e.g. `latency`) and how many devices raise each.
    pub kinds: BTreeMap<String, u64>,
    /// Devices with at least one active alert.
    pub devices: u64,
}

/// The active alerts of `device` for a version it no longer serves (`serving` says which
/// version of a model it serves now): nothing will ever clear them by telemetry.
pub fn stale<'a>(
    alerts: &'a [Alert],
    device: &str,
    serving: impl Fn(&str) -> Option<u64>,
) -> Vec<&'a Alert> {
    alerts
        .iter()
        .filter(|a| a.active() && a.device == device)
        .filter(|a| serving(&a.model) != Some(a.version))
        .collect()
}

/// Active alerts grouped per version.
pub fn by_version(alerts: &[Alert]) -> Vec<VersionAlerts> {
    /// Per version: the devices raising each kind, and the devices alerting at all.
    type Tally<'a> = (BTreeMap<String, u64>, std::collections::BTreeSet<&'a str>);
    let mut out: BTreeMap<(String, u64), Tally> = BTreeMap::new();
    for a in alerts.iter().filter(|a| a.active()) {
        let (kinds, devices) = out.entry((a.model.clone(), a.version)).or_default();
        *kinds.entry(a.kind.to_string()).or_default() += 1;
        devices.insert(&a.device);
    }
    out.into_iter()
        .map(|((model, version), (kinds, devices))| VersionAlerts {
            model,
            version,
            kinds,
            devices: devices.len() as u64,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts_of_a_version_the_device_no_longer_serves_are_stale() {
        let alert = |id: u64, device: &str, version: u64, cleared: bool| Alert {
            id,
            device: device.into(),
            model: "m".into(),
            version,
            kind: AlertKind::Latency,
            test: "page-hinkley".into(),
            value: 2.0,
            threshold: 1.0,
            message: "slower".into(),
            raised_ms: 1,
            cleared_ms: cleared.then_some(2),
        };
        let alerts = [
            alert(1, "d1", 1, false),
            alert(2, "d1", 2, false),
            alert(3, "d1", 1, true),
            alert(4, "d2", 1, false),
        ];
        let ids = |v: Vec<&Alert>| v.iter().map(|a| a.id).collect::<Vec<_>>();
        // d1 serves v2 now: its active v1 alert is stale, not its v2 one, not d2's.
        assert_eq!(ids(stale(&alerts, "d1", |_| Some(2))), [1]);
        // A device that serves nothing of the model any more.
        assert_eq!(ids(stale(&alerts, "d1", |_| None)), [1, 2]);
        assert_eq!(ids(stale(&alerts, "d2", |_| Some(1))), Vec::<u64>::new());
    }

    #[test]
    fn alert_kinds_have_machine_labels_and_name_their_output() {
        let out = || "probabilities".to_string();
        let kinds = [
            (AlertKind::Latency, "latency", None),
            (AlertKind::ErrorRate, "error_rate", None),
            (
                AlertKind::ClassDrift { output: out() },
                "class_drift",
                Some("probabilities"),
            ),
            (
                AlertKind::OutputShift { output: out() },
                "output_shift",
                Some("probabilities"),
            ),
            (
                AlertKind::NonFinite { output: out() },
                "non_finite",
                Some("probabilities"),
            ),
        ];
        for (kind, label, output) in kinds {
            assert_eq!((kind.label(), kind.output()), (label, output), "{kind}");
            // The label is the serialized tag: one name for the API and the metric.
            assert_eq!(serde_json::to_value(&kind).unwrap()["kind"], label);
        }
    }
    use modelcast_proto::report::Slot;
    use proptest::prelude::*;

    /// A point: `requests` at `latency_us`, `errors` of them failed, classes counted.
    fn point(to_ms: i64, latency_us: u64, errors: u64, classes: &[u64]) -> ModelInterval {
        let requests: u64 = classes.iter().sum::<u64>().max(100);
        let mut latency_buckets = LatencyBuckets::default();
        latency_buckets.add(latency_us, requests - errors);
        ModelInterval {
            device: "edge-1".into(),
            seq: to_ms as u64,
            from_ms: to_ms - 1000,
            to_ms,
            telemetry: ModelTelemetry {
                model: "classifier".into(),
                version: 2,
                slot: Slot::B,
                requests,
                errors,
                latency_us: None,
                latency_buckets,
                outputs: vec![OutputStats {
                    name: "y".into(),
                    count: requests * 3,
                    mean: 0.33,
                    variance: 0.01,
                    min: 0.0,
                    max: 1.0,
                    non_finite: 0,
                    classes: classes.to_vec(),
                }],
            },
        }
    }

    fn run(points: impl IntoIterator<Item = ModelInterval>) -> Vec<Change> {
        let mut d = Detectors::new(DriftConfig::default());
        points.into_iter().flat_map(|p| d.observe(&p)).collect()
    }

    fn kinds(changes: &[Change]) -> Vec<String> {
        changes
            .iter()
            .map(|c| match c {
                Change::Raised(a) => format!("+{}", a.kind),
                Change::Cleared { kind, .. } => format!("-{kind}"),
            })
            .collect()
    }

    #[test]
    fn a_stable_stream_raises_nothing() {
        let changes =
            run((1..=50).map(|i| point(i * 1000, 2000 + (i as u64 % 3) * 50, 0, &[50, 48, 2])));
        assert_eq!(kinds(&changes), Vec::<String>::new());
    }

    #[test]
    fn a_shifted_class_histogram_raises_then_clears() {
        let stable = (1..=10).map(|i| point(i * 1000, 2000, 0, &[50, 50, 0]));
        let shifted = (11..=14).map(|i| point(i * 1000, 2000, 0, &[5, 95, 0]));
        let back = (15..=20).map(|i| point(i * 1000, 2000, 0, &[50, 50, 0]));
        let changes = run(stable.chain(shifted).chain(back));
        assert_eq!(
            kinds(&changes),
            vec!["+class drift of y", "-class drift of y"]
        );
        let Change::Raised(a) = &changes[0] else {
            panic!()
        };
        assert!(a.value > 0.25, "{a:?}");
        assert!(
            a.message.contains("against a baseline of [50%, 50%, 0%]"),
            "{a:?}"
        );
    }

    #[test]
    fn latency_and_errors_raise() {
        let stable = (1..=10).map(|i| point(i * 1000, 2000, 1, &[50, 50, 0]));
        let slow = (11..=13).map(|i| point(i * 1000, 8000, 1, &[50, 50, 0]));
        let failing = (14..=16).map(|i| point(i * 1000, 8000, 20, &[50, 50, 0]));
        let changes = run(stable.chain(slow).chain(failing));
        assert_eq!(kinds(&changes), vec!["+latency", "+error rate"]);
        // A rise under the floor (500 µs) is not an anomaly.
        let small = (11..=30).map(|i| point(i * 1000, 2400, 1, &[50, 50, 0]));
        let stable = (1..=10).map(|i| point(i * 1000, 2000, 1, &[50, 50, 0]));
        assert!(run(stable.chain(small)).is_empty());
    }

    #[test]
    fn small_points_are_pooled_and_old_ones_ignored() {
        let mut d = Detectors::new(DriftConfig::default());
        let mut p = point(1000, 100, 0, &[1, 0, 0]);
        p.telemetry.requests = 10;
        assert!(d.observe(&p).is_empty());
        let stream = &d.streams[&("edge-1".into(), "classifier".into(), 2)];
        assert_eq!(stream.pending.requests, 10);
        assert!(stream.baseline.is_none());
        p.to_ms = 500;
        d.observe(&p);
        assert_eq!(d.streams.values().next().unwrap().pending.requests, 10);
    }

    #[test]
    fn restored_alerts_are_not_raised_twice() {
        let mut d = Detectors::new(DriftConfig::default());
        let stable = (1..=10).map(|i| point(i * 1000, 2000, 0, &[50, 50, 0]));
        let shifted = (11..=14).map(|i| point(i * 1000, 2000, 0, &[5, 95, 0]));
        let raised: Vec<Change> = stable.chain(shifted).flat_map(|p| d.observe(&p)).collect();
        let Change::Raised(alert) = &raised[0] else {
            panic!()
        };
        let mut again = Detectors::new(DriftConfig::default());
        again.restore(alert);
        let stable = (1..=10).map(|i| point(i * 1000, 2000, 0, &[50, 50, 0]));
        let shifted = (11..=14).map(|i| point(i * 1000, 2000, 0, &[5, 95, 0]));
        let changes: Vec<Change> = stable
            .chain(shifted)
            .flat_map(|p| again.observe(&p))
            .collect();
        assert_eq!(changes, vec![]);
    }

    #[test]
    fn a_restored_alert_is_not_cleared_against_a_baseline_of_drifted_points() {
        let stable = (1..=10).map(|i| point(i * 1000, 2000, 0, &[50, 50, 0]));
        let shifted = (11..=14).map(|i| point(i * 1000, 2000, 0, &[5, 95, 0]));
        let mut d = Detectors::new(DriftConfig::default());
        let raised: Vec<Change> = stable.chain(shifted).flat_map(|p| d.observe(&p)).collect();
        let Change::Raised(alert) = &raised[0] else {
            panic!()
        };
        // After a restart only the drifted points are left to replay, and more follow.
        let mut again = Detectors::new(DriftConfig::default());
        again.restore(alert);
        let later = (11..=30).map(|i| point(i * 1000, 2000, 0, &[5, 95, 0]));
        let changes: Vec<Change> = later.flat_map(|p| again.observe(&p)).collect();
        assert_eq!(changes, vec![]);
    }

    #[test]
    fn streams_are_bounded_per_device_and_idle_ones_forgotten() {
        let mut d = Detectors::new(DriftConfig::default());
        for v in 0..MAX_STREAMS_PER_DEVICE as u64 + 10 {
            let mut p = point(1000, 2000, 0, &[50, 50, 0]);
            p.telemetry.version = v;
            d.observe(&p);
        }
        assert_eq!(d.streams.len(), MAX_STREAMS_PER_DEVICE);
        let mut other = point(5000, 2000, 0, &[50, 50, 0]);
        other.device = "edge-2".into();
        d.observe(&other);
        assert_eq!(d.forget_idle(2000), MAX_STREAMS_PER_DEVICE);
        assert_eq!(d.streams.len(), 1);
    }

    #[test]
    fn absurd_counts_do_not_overflow() {
        let mut d = Detectors::new(DriftConfig {
            min_requests: 1,
            baseline_samples: 1,
            ..DriftConfig::default()
        });
        for i in 1..=6 {
            let mut p = point(i * 1000, 2000, 0, &[50, 50, 0]);
            let t = &mut p.telemetry;
            t.requests = u64::MAX;
            t.errors = u64::MAX / 2;
            t.latency_buckets = LatencyBuckets(vec![(1, u64::MAX), (2, u64::MAX)]);
            t.outputs[0].count = u64::MAX;
            t.outputs[0].non_finite = u64::MAX;
            t.outputs[0].classes = vec![u64::MAX, u64::MAX, 1];
            d.observe(&p);
        }
    }

    #[test]
    fn psi_is_zero_for_the_same_shares_and_grows_with_the_shift() {
        assert!(psi(&[10, 20, 30], &[20, 40, 60]).abs() < 1e-3);
        let small = psi(&[50, 50], &[45, 55]);
        let large = psi(&[50, 50], &[10, 90]);
        assert!(
            small > 0.0 && small < 0.1 && large > 0.25,
            "{small} {large}"
        );
        assert!(psi(&[100, 0], &[0, 100]).is_finite());
    }

    proptest! {
        #[test]
        fn alerts_alternate_raised_and_cleared_per_kind(
            steps in proptest::collection::vec((1u64..20_000, 0u64..60, 0u64..100, 0u64..100), 1..80)
        ) {
            let mut d = Detectors::new(DriftConfig { min_requests: 50, baseline_samples: 2, ..DriftConfig::default() });
            let mut on: BTreeMap<AlertKind, bool> = BTreeMap::new();
            for (i, (latency, errors, a, b)) in steps.into_iter().enumerate() {
                let p = point(i as i64 * 1000 + 1000, latency, errors, &[a, b, 0]);
                for c in d.observe(&p) {
                    match c {
                        Change::Raised(alert) => {
                            prop_assert!(!on.get(&alert.kind).copied().unwrap_or(false));
                            prop_assert!(alert.value.is_finite());
                            on.insert(alert.kind, true);
                        }
                        Change::Cleared { kind, .. } => {
                            prop_assert!(on.get(&kind).copied().unwrap_or(false));
                            on.insert(kind, false);
                        }
                    }
                }
            }
        }
    }
}
