//! Telemetry: what each model serves per interval ([`Collector`], fed by the HTTP handlers),
//! what the agent costs its host ([`system`]), and store-and-forward of the reports
//! ([`Forwarder`]): each report is queued in sled first, bounded by bytes and age (oldest
//! dropped first, drops counted into the next report), and sent in order, at least once,
//! while the broker is reachable.
//!
//! Delivery is confirmed by the fleet server itself, not by the broker: a report leaves the
//! queue when the server's receipt names it ([`TelemetryAck`] on the device's
//! `telemetry-acks` topic). A report with no receipt `resend_after_secs` after it was sent
//! (lost with a connection, published while the server was away and its session with it, or
//! a broker restart) is sent again; the server keeps the first copy of each sequence number
//! and acknowledges every copy.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use modelcast_proto::report::Slot;
use modelcast_proto::telemetry::{
    LatencyBuckets, ModelTelemetry, OutputStats, Percentiles, SystemTelemetry, TelemetryAck,
    TelemetryReport, MAX_CLASSES, MAX_REPORT_SAMPLE_BYTES,
};

use crate::engine::HostTensor;
use crate::store::{Store, StoreError};

/// Reports sent and not yet confirmed, at most, per connection.
const SEND_WINDOW: usize = 16;
/// Largest latency the histogram tells apart, microseconds (longer runs count as this).
const MAX_LATENCY_US: u64 = 60_000_000;

/// How telemetry is gathered, kept and sent (`[telemetry]` in the agent's configuration).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Seconds between reports; 0 turns telemetry off.
    #[serde(default = "default_interval")]
    pub interval_secs: u64,
    /// Most bytes the queue keeps while the broker is out of reach.
    #[serde(default = "default_queue_bytes")]
    pub queue_bytes: u64,
    /// Oldest report the queue keeps, seconds.
    #[serde(default = "default_queue_age")]
    pub queue_max_age_secs: u64,
    /// Seconds after which a report the server has not acknowledged is sent again.
    #[serde(default = "default_resend_after")]
    pub resend_after_secs: u64,
}

fn default_interval() -> u64 {
    60
}
fn default_queue_bytes() -> u64 {
    4 * 1024 * 1024
}
fn default_queue_age() -> u64 {
    7 * 24 * 3600
}
fn default_resend_after() -> u64 {
    60
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            interval_secs: default_interval(),
            queue_bytes: default_queue_bytes(),
            queue_max_age_secs: default_queue_age(),
            resend_after_secs: default_resend_after(),
        }
    }
}

/// Running summary of one output tensor (Welford's mean and variance).
#[derive(Debug, Clone)]
struct Running {
    name: String,
    count: u64,
    mean: f64,
    m2: f64,
    min: f64,
    max: f64,
    non_finite: u64,
    classes: Vec<u64>,
}

impl Running {
    fn new(name: &str) -> Self {
        Running {
            name: name.into(),
            count: 0,
            mean: 0.0,
            m2: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            non_finite: 0,
            classes: Vec::new(),
        }
    }

    fn add(&mut self, tensor: &HostTensor) {
        // Strings have no mean or range; their requests are still counted.
        if tensor.values.datatype() == modelcast_proto::manifest::DataType::Bytes {
            return;
        }
        let values = tensor.values.to_f64();
        for &v in &values {
            if !v.is_finite() {
                self.non_finite += 1;
                continue;
            }
            self.count += 1;
            let delta = v - self.mean;
            self.mean += delta / self.count as f64;
            self.m2 += delta * (v - self.mean);
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
        // A classifier's scores: rows of 2..=MAX_CLASSES values; count each row's best.
        let width = tensor.shape.last().copied().unwrap_or(0) as usize;
        if (2..=MAX_CLASSES).contains(&width) && values.len().is_multiple_of(width) {
            if self.classes.len() < width {
                self.classes.resize(width, 0);
            }
            for row in values.chunks(width) {
                let best = row
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.is_finite())
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(i, _)| i);
                if let Some(i) = best {
                    self.classes[i] += 1;
                }
            }
        }
    }

    /// Folds `other` (values seen elsewhere) into this summary (Chan et al.'s pairwise
    /// update of mean and variance).
    fn merge(&mut self, other: &Running) {
        if other.count > 0 {
            let n = self.count + other.count;
            let delta = other.mean - self.mean;
            self.mean += delta * other.count as f64 / n as f64;
            self.m2 +=
                other.m2 + delta * delta * (self.count as f64 * other.count as f64) / n as f64;
            self.count = n;
            self.min = self.min.min(other.min);
            self.max = self.max.max(other.max);
        }
        self.non_finite += other.non_finite;
        if self.classes.len() < other.classes.len() {
            self.classes.resize(other.classes.len(), 0);
        }
        for (mine, theirs) in self.classes.iter_mut().zip(&other.classes) {
            *mine += theirs;
        }
    }

    fn stats(&self) -> OutputStats {
        let some = self.count > 0;
        OutputStats {
            name: self.name.clone(),
            count: self.count,
            mean: if some { self.mean } else { 0.0 },
            variance: if some {
                self.m2 / self.count as f64
            } else {
                0.0
            },
            min: if some { self.min } else { 0.0 },
            max: if some { self.max } else { 0.0 },
            non_finite: self.non_finite,
            classes: self.classes.clone(),
        }
    }
}

/// One request's outputs, summarized where the model ran, so that the collector's lock is
/// held only to merge them, whatever the size of the outputs.
pub struct Summary(Vec<Running>);

impl Summary {
    /// Summarizes `outputs`.
    pub fn of(outputs: &[HostTensor]) -> Summary {
        Summary(
            outputs
                .iter()
                .map(|t| {
                    let mut r = Running::new(&t.name);
                    r.add(t);
                    r
                })
                .collect(),
        )
    }
}

/// One model and slot's interval.
struct Window {
    version: u64,
    requests: u64,
    errors: u64,
    latency: Histogram<u64>,
    outputs: Vec<Running>,
}

impl Window {
    fn new(version: u64) -> Self {
        Window {
            version,
            requests: 0,
            errors: 0,
            latency: Histogram::new_with_bounds(1, MAX_LATENCY_US, 2).expect("valid bounds"),
            outputs: Vec::new(),
        }
    }
}

/// What each model served since the last report.
#[derive(Default)]
pub struct Collector {
    windows: Mutex<BTreeMap<(String, Slot), Window>>,
}

impl Collector {
    fn with_window(&self, model: &str, slot: Slot, version: u64, f: impl FnOnce(&mut Window)) {
        let mut windows = self.windows.lock().expect("telemetry lock");
        let window = windows
            .entry((model.to_string(), slot))
            .or_insert_with(|| Window::new(version));
        if window.version != version {
            *window = Window::new(version);
        }
        f(window);
    }

    /// A request answered in `latency` with outputs summarized as `outputs`.
    pub fn served(
        &self,
        model: &str,
        slot: Slot,
        version: u64,
        latency: Duration,
        outputs: &Summary,
    ) {
        self.with_window(model, slot, version, |w| {
            w.requests += 1;
            let us = (latency.as_micros() as u64).clamp(1, MAX_LATENCY_US);
            let _ = w.latency.record(us);
            if w.outputs.len() != outputs.0.len() {
                w.outputs = outputs.0.iter().map(|r| Running::new(&r.name)).collect();
            }
            for (running, request) in w.outputs.iter_mut().zip(&outputs.0) {
                running.merge(request);
            }
        });
    }

    /// A request the model failed.
    pub fn failed(&self, model: &str, slot: Slot, version: u64) {
        self.with_window(model, slot, version, |w| {
            w.requests += 1;
            w.errors += 1;
        });
    }

    /// The interval's figures per model and slot; starts the next interval.
    pub fn take(&self) -> Vec<ModelTelemetry> {
        let windows = std::mem::take(&mut *self.windows.lock().expect("telemetry lock"));
        windows
            .into_iter()
            .map(|((model, slot), w)| ModelTelemetry {
                model,
                version: w.version,
                slot,
                requests: w.requests,
                errors: w.errors,
                latency_us: (!w.latency.is_empty()).then(|| Percentiles {
                    p50: w.latency.value_at_quantile(0.5),
                    p95: w.latency.value_at_quantile(0.95),
                    p99: w.latency.value_at_quantile(0.99),
                    max: w.latency.max(),
                }),
                latency_buckets: {
                    let mut b = LatencyBuckets::default();
                    for v in w.latency.iter_recorded() {
                        b.add(v.value_iterated_to(), v.count_at_value());
                    }
                    b
                },
                outputs: w.outputs.iter().map(Running::stats).collect(),
            })
            .collect()
    }
}

/// The agent's CPU time so far (user and system, ms) and resident memory (bytes), from
/// `/proc/self`; zeros where that is unavailable.
pub fn system() -> (u64, u64) {
    #[cfg(target_os = "linux")]
    {
        let (tick, page) = crate::sys::clock_ticks_and_page_size();
        let cpu = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| {
                // Fields after the command name (which may hold spaces) in parentheses.
                let rest = s.get(s.rfind(')')? + 2..)?;
                let f: Vec<&str> = rest.split(' ').collect();
                Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
            })
            .map_or(0, |ticks| ticks * 1000 / tick);
        let rss = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split(' ').nth(1)?.parse::<u64>().ok())
            .map_or(0, |pages| pages * page);
        (cpu, rss)
    }
    #[cfg(not(target_os = "linux"))]
    (0, 0)
}

/// Store-and-forward of telemetry reports.
pub struct Forwarder {
    config: TelemetryConfig,
    device: String,
    state_dir: std::path::PathBuf,
    interval_started_ms: i64,
    cpu_at_start_ms: u64,
    /// Sent on this connection and not yet acknowledged, with when they were sent (Unix ms):
    /// sent again when the link comes back or `resend_after_secs` passed.
    in_flight: BTreeMap<u64, i64>,
    online: bool,
}

impl Forwarder {
    /// A forwarder for `device`, its interval starting now.
    pub fn new(config: TelemetryConfig, device: &str, state_dir: &std::path::Path) -> Self {
        Forwarder {
            config,
            device: device.into(),
            state_dir: state_dir.into(),
            interval_started_ms: crate::clock::unix_ms(),
            cpu_at_start_ms: system().0,
            in_flight: BTreeMap::new(),
            online: false,
        }
    }

    /// Time between reports, if telemetry is on.
    pub fn interval(&self) -> Option<Duration> {
        (self.config.interval_secs > 0).then(|| Duration::from_secs(self.config.interval_secs))
    }

    /// Ends the interval: queues its report. Returns its sequence number and size in bytes.
    pub fn end_interval(
        &mut self,
        store: &Store,
        collector: &Collector,
    ) -> Result<(u64, usize), StoreError> {
        let now = crate::clock::unix_ms();
        let (cpu, rss) = system();
        let models = collector.take();
        let store_bytes = store.size_on_disk().unwrap_or(0);
        let mut size = 0;
        let (from_ms, cpu_ms) = (
            self.interval_started_ms,
            cpu.saturating_sub(self.cpu_at_start_ms),
        );
        // Samples ride out only while the link is up: offline, they wait in their own
        // budget rather than crowd reports out of the queue.
        let samples = if self.online {
            store.samples_to_ship(MAX_REPORT_SAMPLE_BYTES)?
        } else {
            Vec::new()
        };
        let samples_dropped = store.samples_dropped()?;
        let seq = store.queue_telemetry(
            now,
            self.config.queue_bytes,
            self.config.queue_max_age_secs.saturating_mul(1000) as i64,
            |seq, dropped, queued| {
                let bytes = TelemetryReport {
                    format: modelcast_proto::FORMAT_VERSION,
                    device: self.device.clone(),
                    seq,
                    from_ms,
                    to_ms: now.max(from_ms),
                    dropped,
                    models,
                    system: SystemTelemetry {
                        cpu_ms,
                        rss_bytes: rss,
                        store_bytes,
                        disk_free_bytes: crate::sys::free_bytes(&self.state_dir).unwrap_or(0),
                        queued,
                    },
                    samples: samples.clone(),
                    samples_dropped,
                }
                .to_vec();
                size = bytes.len();
                bytes
            },
        )?;
        store.samples_shipped(&samples)?;
        self.interval_started_ms = now;
        self.cpu_at_start_ms = cpu;
        Ok((seq, size))
    }

    /// The link is up: everything queued goes out again.
    pub fn connected(&mut self) {
        self.online = true;
        self.in_flight.clear();
    }

    /// The link is down: nothing goes out; what was in flight may be lost.
    pub fn disconnected(&mut self) {
        self.online = false;
        self.in_flight.clear();
    }

    /// Reports to send at `now_ms`, oldest first: those in flight longer than
    /// `resend_after_secs` with no receipt again, then queued ones not in flight, within the
    /// window.
    pub fn to_send(&mut self, store: &Store, now_ms: i64) -> Result<Vec<Vec<u8>>, StoreError> {
        if !self.online {
            return Ok(Vec::new());
        }
        let resend_after = (self.config.resend_after_secs.saturating_mul(1000)) as i64;
        let overdue: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, &sent)| now_ms.saturating_sub(sent) >= resend_after)
            .map(|(&seq, _)| seq)
            .collect();
        let mut out = Vec::new();
        for seq in overdue {
            match store.queued_telemetry(seq - 1, 1)?.pop() {
                Some((found, bytes)) if found == seq => {
                    self.in_flight.insert(seq, now_ms);
                    out.push(bytes);
                }
                // Dropped from the queue meanwhile (its bound or age).
                _ => {
                    self.in_flight.remove(&seq);
                }
            }
        }
        if self.in_flight.len() < SEND_WINDOW {
            let after = self.in_flight.keys().next_back().copied().unwrap_or(0);
            let room = SEND_WINDOW - self.in_flight.len();
            let next = store.queued_telemetry(after, room)?;
            for (seq, bytes) in next {
                self.in_flight.insert(seq, now_ms);
                out.push(bytes);
            }
        }
        Ok(out)
    }

    /// The server's receipt: the reports it names are delivered.
    pub fn acknowledged(&mut self, store: &Store, bytes: &[u8]) -> Result<(), StoreError> {
        let Ok(ack) = TelemetryAck::from_slice(bytes) else {
            return Ok(());
        };
        if ack.device != self.device {
            return Ok(());
        }
        for seq in ack.seqs {
            self.in_flight.remove(&seq);
            store.telemetry_delivered(seq)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Values;

    fn scores(values: &[f32]) -> HostTensor {
        HostTensor {
            name: "scores".into(),
            shape: vec![1, values.len() as u64],
            values: Values::from_f32(values),
        }
    }

    #[test]
    fn a_window_summarizes_latency_outputs_and_classes() {
        let c = Collector::default();
        for i in 0..100u64 {
            let best = (i % 4) as usize;
            let mut v = [0.1f32; 4];
            v[best] = 0.7;
            c.served(
                "m",
                Slot::A,
                2,
                Duration::from_micros(100 + i),
                &Summary::of(&[scores(&v)]),
            );
        }
        c.served(
            "m",
            Slot::A,
            2,
            Duration::from_micros(5000),
            &Summary::of(&[scores(&[f32::NAN, 1.0, 0.0, 0.0])]),
        );
        c.failed("m", Slot::A, 2);
        let t = c.take();
        assert_eq!(t.len(), 1);
        let m = &t[0];
        assert_eq!((m.version, m.requests, m.errors), (2, 102, 1));
        let lat = m.latency_us.unwrap();
        assert!((145..=155).contains(&lat.p50), "{lat:?}");
        assert!(lat.max >= 4990, "{lat:?}");
        let out = &m.outputs[0];
        assert_eq!(out.non_finite, 1);
        assert_eq!(out.count, 403);
        assert_eq!(out.classes, vec![25, 26, 25, 25]);
        assert!((out.min - 0.0).abs() < 1e-9 && (out.max - 1.0).abs() < 1e-9);
        let mean = (100.0 * (0.7 + 0.3) + 1.0) / 403.0;
        assert!((out.mean - mean).abs() < 1e-6, "{} vs {mean}", out.mean);
        // The next interval starts empty; a new version starts a new window.
        assert!(c.take().is_empty());
        c.failed("m", Slot::A, 2);
        c.failed("m", Slot::A, 3);
        assert_eq!(c.take()[0].requests, 1);
    }

    #[test]
    fn the_queue_keeps_its_bound_counts_drops_and_sends_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let config = TelemetryConfig {
            interval_secs: 1,
            queue_bytes: 4_000,
            queue_max_age_secs: 3600,
            resend_after_secs: 10,
        };
        let mut f = Forwarder::new(config, "edge-1", dir.path());
        let c = Collector::default();
        let mut sizes = Vec::new();
        for _ in 0..30 {
            c.served(
                "m",
                Slot::B,
                1,
                Duration::from_micros(50),
                &Summary::of(&[scores(&[0.2, 0.8])]),
            );
            let (_, size) = f.end_interval(&store, &c).unwrap();
            sizes.push(size);
            let (_, bytes, _) = store.telemetry_queue().unwrap();
            assert!(bytes <= 4_000, "{bytes} bytes queued");
        }
        let (queued, _, dropped) = store.telemetry_queue().unwrap();
        assert_eq!(queued + dropped, 30);
        assert!(dropped > 0);
        // Offline: nothing goes out. Online: the oldest kept first, a window at a time.
        assert!(f.to_send(&store, 0).unwrap().is_empty());
        f.connected();
        let sent: Vec<TelemetryReport> = f
            .to_send(&store, 0)
            .unwrap()
            .iter()
            .map(|b| TelemetryReport::from_slice(b).unwrap())
            .collect();
        let seqs: Vec<u64> = sent.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, ((dropped + 1)..=30).collect::<Vec<u64>>());
        assert_eq!(sent.last().unwrap().dropped, dropped);
        // Acknowledged reports leave the queue; another device's receipt changes nothing.
        let ack = |device: &str, seqs: Vec<u64>| TelemetryAck::new(device, seqs).to_vec();
        f.acknowledged(&store, &ack("edge-1", vec![sent[0].seq]))
            .unwrap();
        f.acknowledged(&store, &ack("edge-2", vec![sent[1].seq]))
            .unwrap();
        f.acknowledged(&store, b"not a receipt").unwrap();
        assert!(f.to_send(&store, 9_999).unwrap().is_empty());
        // With no receipt for 10 s, the rest go again (the server was away).
        let again = f.to_send(&store, 10_000).unwrap();
        assert_eq!(again.len(), seqs.len() - 1);
        assert!(f.to_send(&store, 10_001).unwrap().is_empty());
        // The link dropping sends them again at once.
        f.disconnected();
        f.connected();
        assert_eq!(f.to_send(&store, 10_002).unwrap().len(), seqs.len() - 1);
        println!("report sizes: {sizes:?}");
    }
}
