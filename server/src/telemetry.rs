//! Fleet monitoring: the operators' questions of the devices' telemetry ("latency and error
//! rate of model M version V across group G over the last hour"), answered from the points
//! the store keeps per model, device and interval ([`crate::db::ModelInterval`]).
//!
//! Latency percentiles are read from the merged logarithmic buckets of every point
//! ([`LatencyBuckets`]), so a fleet-wide p99 is the p99 of every request the fleet served
//! (within 4.5 %), not an average of devices' percentiles.

use std::collections::{BTreeMap, BTreeSet};

use modelcast_proto::telemetry::{LatencyBuckets, Percentiles};
use serde::{Deserialize, Serialize};

use crate::db::ModelInterval;

/// How long the server keeps telemetry by default.
pub const DEFAULT_RETENTION_DAYS: u64 = 14;
/// Most steps a time series answer has (the step grows to fit).
pub const MAX_STEPS: u64 = 1_000;
/// Most reports one answer about a device holds (a week of reports a minute apart).
pub const MAX_DEVICE_REPORTS: usize = 10_080;
/// Longest window a question may cover.
pub const MAX_WINDOW_SECS: u64 = 90 * 24 * 3600;

/// A question about one model across the fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Question {
    /// Model name.
    pub model: String,
    /// One version (all versions without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Label selector of the devices (all devices without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The window: the last this many seconds.
    #[serde(default = "default_since")]
    pub since_secs: u64,
    /// Width of the time series' steps, seconds (a sixtieth of the window without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_secs: Option<u64>,
}

fn default_since() -> u64 {
    3600
}

/// Requests, errors and latency over some set of points.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    /// Requests answered.
    pub requests: u64,
    /// Requests that failed in the model.
    pub errors: u64,
    /// `errors / requests` (0 without requests).
    pub error_rate: f64,
    /// Latency percentiles of the model's runs, microseconds (absent without latencies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<Percentiles>,
    /// NaN or infinite output values.
    pub non_finite: u64,
}

/// One step of a time series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// Start, Unix milliseconds (points whose interval ended in `[at_ms, at_ms + step)`, and
    /// in the last step the window's end too).
    pub at_ms: i64,
    /// What the points of this step add up to.
    #[serde(flatten)]
    pub totals: Totals,
}

/// The answer to a [`Question`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// The question.
    pub question: Question,
    /// Window start, Unix milliseconds.
    pub from_ms: i64,
    /// Window end, Unix milliseconds.
    pub to_ms: i64,
    /// Step width of `series`, milliseconds.
    pub step_ms: i64,
    /// Devices that reported the model in the window.
    pub devices: u64,
    /// Points (model intervals) in the window.
    pub points: u64,
    /// The whole window.
    pub totals: Totals,
    /// The window per version.
    pub versions: BTreeMap<u64, Totals>,
    /// The window step by step, oldest first (every step, empty ones included).
    pub series: Vec<Step>,
}

/// Requests, errors, latencies and NaN counts, added up.
#[derive(Debug, Default)]
struct Sum {
    requests: u64,
    errors: u64,
    non_finite: u64,
    latency: LatencyBuckets,
    max_us: u64,
}

impl Sum {
    fn add(&mut self, p: &ModelInterval) {
        let t = &p.telemetry;
        self.requests = self.requests.saturating_add(t.requests);
        self.errors = self.errors.saturating_add(t.errors);
        let nan = t
            .outputs
            .iter()
            .fold(0u64, |sum, o| sum.saturating_add(o.non_finite));
        self.non_finite = self.non_finite.saturating_add(nan);
        self.latency.merge(&t.latency_buckets);
        if let Some(l) = t.latency_us {
            self.max_us = self.max_us.max(l.max);
        }
    }

    fn totals(&self) -> Totals {
        let q = |q| self.latency.quantile(q);
        Totals {
            requests: self.requests,
            errors: self.errors,
            error_rate: if self.requests == 0 {
                0.0
            } else {
                self.errors as f64 / self.requests as f64
            },
            latency_us: match (q(0.5), q(0.95), q(0.99)) {
                (Some(p50), Some(p95), Some(p99)) => Some(Percentiles {
                    p50,
                    p95,
                    p99,
                    max: self.max_us.max(p99),
                }),
                _ => None,
            },
            non_finite: self.non_finite,
        }
    }
}

impl Question {
    /// Checks the question; the error says what is wrong.
    pub fn check(&self) -> Result<(), String> {
        if self.since_secs == 0 || self.since_secs > MAX_WINDOW_SECS {
            return Err(format!("since_secs must be 1..={MAX_WINDOW_SECS}"));
        }
        if self.step_secs == Some(0) {
            return Err("step_secs must be at least 1".into());
        }
        if let Some(g) = &self.group {
            crate::group::Selector::parse(g).map_err(|e| e.0)?;
        }
        Ok(())
    }

    /// The window this question covers when asked at `now_ms`.
    pub fn window(&self, now_ms: i64) -> (i64, i64) {
        let span = i64::try_from(self.since_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        (now_ms.saturating_sub(span), now_ms)
    }

    /// Step width, milliseconds: as asked, but at most [`MAX_STEPS`] steps.
    fn step_ms(&self) -> i64 {
        let window = self.since_secs.max(1);
        let asked = self.step_secs.unwrap_or(window.div_ceil(60)).max(1);
        let step = asked.max(window.div_ceil(MAX_STEPS));
        i64::try_from(step.saturating_mul(1000)).unwrap_or(i64::MAX)
    }
}

/// Width of the time slices in which long windows are read from the store, so that a
/// question over days of a large fleet never holds more than a slice's points at once.
pub const SLICE_MS: i64 = 10 * 60 * 1000;

/// `from_ms..=to_ms` in consecutive inclusive slices of [`SLICE_MS`].
pub fn slices(from_ms: i64, to_ms: i64) -> impl Iterator<Item = (i64, i64)> {
    let mut next = Some(from_ms).filter(|&f| f <= to_ms);
    std::iter::from_fn(move || {
        let from = next?;
        let until = from.saturating_add(SLICE_MS - 1).min(to_ms);
        next = (until < to_ms).then(|| until + 1);
        Some((from, until))
    })
}

/// An answer being built from points fed a few at a time ([`Aggregator::add`]).
#[derive(Debug)]
pub struct Aggregator {
    question: Question,
    from_ms: i64,
    to_ms: i64,
    step_ms: i64,
    whole: Sum,
    versions: BTreeMap<u64, Sum>,
    series: Vec<Sum>,
    devices: BTreeSet<String>,
    points: u64,
}

impl Aggregator {
    /// An empty answer to `question` asked at `now_ms`.
    pub fn new(question: &Question, now_ms: i64) -> Self {
        let (from_ms, to_ms) = question.window(now_ms);
        let step_ms = question.step_ms();
        // The last step ends at the window's end (and holds it).
        let steps = usize::try_from(((to_ms - from_ms) as u64).div_ceil(step_ms as u64))
            .unwrap_or(1)
            .max(1);
        Aggregator {
            question: question.clone(),
            from_ms,
            to_ms,
            step_ms,
            whole: Sum::default(),
            versions: BTreeMap::new(),
            series: (0..steps).map(|_| Sum::default()).collect(),
            devices: BTreeSet::new(),
            points: 0,
        }
    }

    /// The window, as the store is asked for it.
    pub fn window(&self) -> (i64, i64) {
        (self.from_ms, self.to_ms)
    }

    /// Counts `p` if it answers the question: in the window, of the model (and version), and
    /// from a device (and version) `accept` takes.
    pub fn add(&mut self, p: &ModelInterval, accept: impl Fn(&str, u64) -> bool) {
        let t = &p.telemetry;
        if p.to_ms < self.from_ms
            || p.to_ms > self.to_ms
            || t.model != self.question.model
            || self.question.version.is_some_and(|v| v != t.version)
            || !accept(&p.device, t.version)
        {
            return;
        }
        self.points += 1;
        if !self.devices.contains(&p.device) {
            self.devices.insert(p.device.clone());
        }
        self.whole.add(p);
        self.versions.entry(t.version).or_default().add(p);
        let at = usize::try_from((p.to_ms - self.from_ms) / self.step_ms).unwrap_or(0);
        let last = self.series.len() - 1;
        self.series[at.min(last)].add(p);
    }

    /// The answer.
    pub fn finish(self) -> Answer {
        Answer {
            from_ms: self.from_ms,
            to_ms: self.to_ms,
            step_ms: self.step_ms,
            devices: self.devices.len() as u64,
            points: self.points,
            totals: self.whole.totals(),
            versions: self
                .versions
                .iter()
                .map(|(v, s)| (*v, s.totals()))
                .collect(),
            series: self
                .series
                .iter()
                .enumerate()
                .map(|(i, s)| Step {
                    at_ms: self.from_ms + i as i64 * self.step_ms,
                    totals: s.totals(),
                })
                .collect(),
            question: self.question,
        }
    }
}

/// Answers `question` at `now_ms` from the model's `points` (any order, any window: those
/// outside it, of other versions or refused by `accept` are left out).
pub fn answer(
    question: &Question,
    now_ms: i64,
    points: &[ModelInterval],
    accept: impl Fn(&str, u64) -> bool,
) -> Answer {
    let mut a = Aggregator::new(question, now_ms);
    for p in points {
        a.add(p, &accept);
    }
    a.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelcast_proto::report::Slot;
    use modelcast_proto::telemetry::ModelTelemetry;
    use proptest::prelude::*;

    fn point(
        device: &str,
        version: u64,
        to_ms: i64,
        latencies: &[u64],
        errors: u64,
    ) -> ModelInterval {
        let mut buckets = LatencyBuckets::default();
        latencies.iter().for_each(|&us| buckets.add(us, 1));
        ModelInterval {
            device: device.into(),
            seq: 1,
            from_ms: to_ms - 60_000,
            to_ms,
            telemetry: ModelTelemetry {
                model: "classifier".into(),
                version,
                slot: Slot::A,
                requests: latencies.len() as u64 + errors,
                errors,
                latency_us: latencies.iter().max().map(|&max| Percentiles {
                    p50: 0,
                    p95: 0,
                    p99: 0,
                    max,
                }),
                latency_buckets: buckets,
                outputs: vec![],
            },
        }
    }

    fn question(version: Option<u64>) -> Question {
        Question {
            model: "classifier".into(),
            version,
            group: None,
            since_secs: 3600,
            step_secs: Some(600),
        }
    }

    #[test]
    fn answers_one_version_across_a_group_over_the_window() {
        let now = 10_000_000;
        let slow: Vec<u64> = vec![1000; 10];
        let fast: Vec<u64> = vec![100; 90];
        let points = vec![
            point("a", 2, now - 1_000, &fast, 0),
            point("b", 2, now - 2_000_000, &slow, 10),
            point("c", 2, now - 1_000, &slow, 0), // not in the group
            point("a", 1, now - 1_000, &slow, 0), // another version
            point("a", 2, now - 4_000_000, &slow, 0), // before the window
        ];
        let a = answer(&question(Some(2)), now, &points, |d, _| d != "c");
        assert_eq!(a.devices, 2);
        assert_eq!(a.points, 2);
        assert_eq!(a.totals.requests, 110);
        assert_eq!(a.totals.errors, 10);
        assert!((a.totals.error_rate - 10.0 / 110.0).abs() < 1e-12);
        let l = a.totals.latency_us.unwrap();
        // 90 fast and 10 slow runs: the median is fast, the p95 and p99 slow (within 4.5 %).
        assert!((96..=104).contains(&l.p50), "{l:?}");
        assert!(
            (955..=1045).contains(&l.p95) && (955..=1045).contains(&l.p99),
            "{l:?}"
        );
        assert_eq!(l.max, 1000);
        assert_eq!(a.series.len(), 6);
        assert_eq!(a.series.iter().map(|s| s.totals.requests).sum::<u64>(), 110);
        assert_eq!(a.series.last().unwrap().totals.requests, 90);
        assert_eq!(a.versions.keys().copied().collect::<Vec<_>>(), vec![2]);
        let all = answer(&question(None), now, &points, |_, _| true);
        assert_eq!(all.versions.len(), 2);
        assert_eq!(all.devices, 3);
    }

    #[test]
    fn questions_are_checked() {
        let mut q = question(None);
        assert!(q.check().is_ok());
        q.since_secs = 0;
        assert!(q.check().is_err());
        q.since_secs = 60;
        q.group = Some("=oops".into());
        assert!(q.check().is_err());
        q.group = None;
        q.step_secs = Some(0);
        assert!(q.check().is_err());
    }

    #[test]
    fn slices_cover_the_window_once() {
        let s: Vec<_> = slices(0, 2 * SLICE_MS).collect();
        assert_eq!(
            s,
            vec![
                (0, SLICE_MS - 1),
                (SLICE_MS, 2 * SLICE_MS - 1),
                (2 * SLICE_MS, 2 * SLICE_MS)
            ]
        );
        assert_eq!(slices(5, 5).collect::<Vec<_>>(), vec![(5, 5)]);
        assert_eq!(slices(6, 5).count(), 0);
        assert_eq!(
            slices(i64::MAX - 3, i64::MAX).collect::<Vec<_>>(),
            vec![(i64::MAX - 3, i64::MAX)]
        );
    }

    proptest! {
        #[test]
        fn every_point_in_the_window_lands_in_one_step(
            ends in proptest::collection::vec(0i64..7_200_000, 0..50),
            since in 1u64..7200,
            step in proptest::option::of(1u64..4000),
        ) {
            let now = 7_200_000;
            let points: Vec<_> = ends.iter().map(|&t| point("d", 1, t, &[50], 0)).collect();
            let q = Question { since_secs: since, step_secs: step, ..question(None) };
            let a = answer(&q, now, &points, |_, _| true);
            let inside = ends.iter().filter(|&&t| t >= now - since as i64 * 1000).count() as u64;
            prop_assert_eq!(a.totals.requests, inside);
            prop_assert_eq!(a.series.iter().map(|s| s.totals.requests).sum::<u64>(), inside);
            prop_assert!(a.series.len() as u64 <= MAX_STEPS);
        }
    }
}
