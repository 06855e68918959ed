//! The agent's Prometheus metrics, served as OpenMetrics text on `GET /metrics` of the
//! inference port.
//!
//! Label sets are bounded: per model name (models are few and operator-chosen) and slot
//! (`a`/`b`), never per request or per version string from the network.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use modelcast_proto::report::{Phase, Slot};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// A model served from a slot.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SlotLabels {
    /// Model name.
    pub model: String,
    /// `a` or `b`.
    pub slot: String,
}

impl SlotLabels {
    /// Labels for `model` serving from `slot`.
    pub fn new(model: &str, slot: Slot) -> Self {
        SlotLabels {
            model: model.to_string(),
            slot: slot.to_string(),
        }
    }
}

/// A model version served from a slot: what each request is counted under, so a canary and
/// the version it replaces can be told apart.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InferenceLabels {
    /// Model name.
    pub model: String,
    /// Model version.
    pub version: String,
    /// `a` or `b`.
    pub slot: String,
}

impl InferenceLabels {
    /// Labels for `version` of `model` serving from `slot`.
    pub fn new(model: &str, version: u64, slot: Slot) -> Self {
        InferenceLabels {
            model: model.to_string(),
            version: version.to_string(),
            slot: slot.to_string(),
        }
    }

    /// The same model and slot, without the version.
    pub fn slot(&self) -> SlotLabels {
        SlotLabels {
            model: self.model.clone(),
            slot: self.slot.clone(),
        }
    }
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request was malformed (HTTP 400).
    BadRequest,
    /// The model failed to run it (HTTP 500).
    Failed,
}

impl EncodeLabelValue for ErrorKind {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        use std::fmt::Write;
        encoder.write_str(match self {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::Failed => "failed",
        })
    }
}

/// A failed request of a model in a slot.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Model name.
    pub model: String,
    /// Model version.
    pub version: String,
    /// `a` or `b`.
    pub slot: String,
    /// What went wrong.
    pub kind: ErrorKind,
}

/// Adds `n` to `model`'s counter in `family`.
fn count(family: &Family<ModelLabels, Counter>, model: &str, n: u64) {
    family
        .get_or_create(&ModelLabels {
            model: model.to_string(),
        })
        .inc_by(n);
}

/// A model name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    /// Model name.
    pub model: String,
}

/// A model and an engine that ran it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EngineLabels {
    /// Model name.
    pub model: String,
    /// `tract`, or `onnxruntime/<provider>`.
    pub backend: String,
}

/// How an update ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// Verified, loaded, checked and swapped in.
    Activated,
    /// Passed probation; now the last good model.
    Committed,
    /// Failed probation (or crash-looped); the last good model swapped back.
    RolledBack,
    /// Rejected; the serving model was left alone.
    Rejected,
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        use std::fmt::Write;
        encoder.write_str(match self {
            Outcome::Activated => "activated",
            Outcome::Committed => "committed",
            Outcome::RolledBack => "rolled_back",
            Outcome::Rejected => "rejected",
        })
    }
}

/// An ended update of a model.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// Model name.
    pub model: String,
    /// How it ended.
    pub outcome: Outcome,
}

/// The update phase of a model, one series per phase set to 1 for the current one.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// Model name.
    pub model: String,
    /// `downloading`, `staging`, `probation`, `active` or `failed`.
    pub phase: String,
}

const PHASES: [Phase; 6] = [
    Phase::Downloading,
    Phase::Staging,
    Phase::Probation,
    Phase::Active,
    Phase::Failed,
    Phase::Waiting,
];

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Downloading => "downloading",
        Phase::Staging => "staging",
        Phase::Probation => "probation",
        Phase::Active => "active",
        Phase::Failed => "failed",
        Phase::Waiting => "waiting",
    }
}

fn latency_histogram() -> Histogram {
    // 50 µs … ~13 s in ×2 steps.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 19))
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    inferences: Family<InferenceLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    latency: Family<InferenceLabels, Histogram, fn() -> Histogram>,
    serving_version: Family<SlotLabels, Gauge>,
    update_phase: Family<PhaseLabels, Gauge>,
    updates: Family<OutcomeLabels, Counter>,
    downloaded: Family<ModelLabels, Counter>,
    reused: Family<ModelLabels, Counter>,
    chunk_bytes: Family<ModelLabels, Counter>,
    refetched: Family<ModelLabels, Counter>,
    chunks_rejected: Counter,
    http_chunks: Counter,
    http_fallbacks: Counter,
    engine_warmup: Family<EngineLabels, Gauge<u64, AtomicU64>>,
    store_bytes: Gauge<u64, AtomicU64>,
    store_rebuilds: Gauge<u64, AtomicU64>,
    artifacts_lost: Counter,
    telemetry_queued: Gauge<u64, AtomicU64>,
    telemetry_queued_bytes: Gauge<u64, AtomicU64>,
    telemetry_dropped: Gauge<u64, AtomicU64>,
    plan_runs: Family<PlanLabels, Counter>,
    plans_cached: Family<SlotLabels, Gauge>,
    unavailable: Family<ModelLabels, Gauge<u64, AtomicU64>>,
}

/// How a run found its plan.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PlanLabels {
    /// Model name.
    pub model: String,
    /// `a` or `b`.
    pub slot: String,
    /// `hit` (cached) or `miss` (made for the request's shapes).
    pub result: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("modelcast");
        let inferences = Family::<InferenceLabels, Counter>::default();
        registry.register(
            "inferences",
            "Inference requests answered",
            inferences.clone(),
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "inference_errors",
            "Inference requests that failed",
            errors.clone(),
        );
        let latency = Family::<InferenceLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register_with_unit(
            "inference_duration",
            "Time to run one inference, from parsed request to outputs",
            Unit::Seconds,
            latency.clone(),
        );
        let serving_version = Family::<SlotLabels, Gauge>::default();
        registry.register(
            "serving_version",
            "Version of the model that serves, by slot",
            serving_version.clone(),
        );
        let update_phase = Family::<PhaseLabels, Gauge>::default();
        registry.register(
            "update_phase",
            "1 for the current phase of the model's latest update",
            update_phase.clone(),
        );
        let updates = Family::<OutcomeLabels, Counter>::default();
        registry.register("updates", "Updates that ended, by outcome", updates.clone());
        let downloaded = Family::<ModelLabels, Counter>::default();
        registry.register_with_unit(
            "downloaded",
            "Verified artifact bytes received and stored (inflated, where they came compressed)",
            Unit::Bytes,
            downloaded.clone(),
        );
        let reused = Family::<ModelLabels, Counter>::default();
        registry.register_with_unit(
            "reused",
            "Artifact bytes copied from artifacts already on the device instead of downloaded",
            Unit::Bytes,
            reused.clone(),
        );
        let chunk_bytes = Family::<ModelLabels, Counter>::default();
        registry.register_with_unit(
            "chunk_received",
            "Chunk bytes received for downloads in progress, as they came on the wire (compressed or not), duplicates and rejected ones included",
            Unit::Bytes,
            chunk_bytes.clone(),
        );
        let refetched = Family::<ModelLabels, Counter>::default();
        registry.register(
            "chunks_refetched",
            "Chunks requested again (timed out, or lost with the connection)",
            refetched.clone(),
        );
        let chunks_rejected = Counter::default();
        registry.register(
            "chunks_rejected",
            "Chunk replies that failed their digest or size check",
            chunks_rejected.clone(),
        );
        let http_chunks = Counter::default();
        registry.register(
            "http_chunks",
            "Chunks fetched over HTTP(S) (the deployment gave a base URL)",
            http_chunks.clone(),
        );
        let http_fallbacks = Counter::default();
        registry.register(
            "http_fallbacks",
            "Downloads that went on over MQTT because an HTTP fetch failed",
            http_fallbacks.clone(),
        );
        let engine_warmup = Family::<EngineLabels, Gauge<u64, AtomicU64>>::default();
        registry.register_with_unit(
            "engine_warmup_p95",
            "The p95 of the latest staged version's warm-up runs on each engine that passed (CPU time of the calling thread)",
            prometheus_client::registry::Unit::Other("microseconds".into()),
            engine_warmup.clone(),
        );
        let store_bytes = Gauge::<u64, AtomicU64>::default();
        registry.register_with_unit(
            "store",
            "Size of the sled store on disk",
            Unit::Bytes,
            store_bytes.clone(),
        );
        let store_rebuilds = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "store_rebuilds",
            "Times the store's database was found damaged or empty and rebuilt from the verified artifact files",
            store_rebuilds.clone(),
        );
        let artifacts_lost = Counter::default();
        registry.register(
            "artifacts_lost",
            "Stored artifacts found missing or damaged at start-up (downloaded again)",
            artifacts_lost.clone(),
        );
        let telemetry_queued = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "telemetry_queued_reports",
            "Telemetry reports waiting in the store-and-forward queue",
            telemetry_queued.clone(),
        );
        let telemetry_queued_bytes = Gauge::<u64, AtomicU64>::default();
        registry.register_with_unit(
            "telemetry_queued",
            "Size of the telemetry queue",
            Unit::Bytes,
            telemetry_queued_bytes.clone(),
        );
        let telemetry_dropped = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "telemetry_dropped_reports",
            "Telemetry reports the queue dropped (oldest first) to keep its bounds, ever",
            telemetry_dropped.clone(),
        );
        let plan_runs = Family::<PlanLabels, Counter>::default();
        registry.register(
            "plan_cache_runs",
            "Inference runs by whether the optimized plan for their input shapes was cached",
            plan_runs.clone(),
        );
        let plans_cached = Family::<SlotLabels, Gauge>::default();
        registry.register(
            "plan_cache_plans",
            "Optimized plans a model holds, one per input shape seen (bounded, least recently used dropped)",
            plans_cached.clone(),
        );
        let unavailable = Family::<ModelLabels, Gauge<u64, AtomicU64>>::default();
        registry.register_with_unit(
            "low_memory_swap_unavailable",
            "How long the latest low-memory swap of each model answered nothing (503): unload, load, checks",
            prometheus_client::registry::Unit::Other("milliseconds".into()),
            unavailable.clone(),
        );
        Metrics {
            registry,
            unavailable,
            plan_runs,
            plans_cached,
            telemetry_queued,
            telemetry_queued_bytes,
            telemetry_dropped,
            inferences,
            errors,
            latency,
            serving_version,
            update_phase,
            updates,
            downloaded,
            reused,
            chunk_bytes,
            refetched,
            chunks_rejected,
            http_chunks,
            http_fallbacks,
            engine_warmup,
            store_bytes,
            store_rebuilds,
            artifacts_lost,
        }
    }

    /// Records how long the latest low-memory swap of `model` answered nothing.
    pub fn low_memory_swap(&self, model: &str, unavailable: Duration) {
        self.unavailable
            .get_or_create(&ModelLabels {
                model: model.into(),
            })
            .set(unavailable.as_millis() as u64);
    }

    /// How long the latest low-memory swap of `model` answered nothing, ms, if it had one.
    pub fn last_low_memory_swap(&self, model: &str) -> Option<u64> {
        // Read back without creating a series for a model that never had one.
        let labels = ModelLabels {
            model: model.into(),
        };
        self.unavailable.get(&labels).map(|g| g.get())
    }

    /// Counts one answered inference and its duration.
    pub fn inference(&self, labels: &InferenceLabels, took: Duration) {
        self.inferences.get_or_create(labels).inc();
        self.latency
            .get_or_create(labels)
            .observe(took.as_secs_f64());
    }

    /// Counts how a run found its plan.
    pub fn plans(&self, labels: &SlotLabels, used: crate::engine::PlanUse) {
        self.plan_runs
            .get_or_create(&PlanLabels {
                model: labels.model.clone(),
                slot: labels.slot.clone(),
                result: if used.built { "miss" } else { "hit" }.into(),
            })
            .inc();
        self.plans_cached
            .get_or_create(labels)
            .set(i64::try_from(used.cached).unwrap_or(i64::MAX));
    }

    /// Counts one failed inference.
    pub fn inference_error(&self, labels: &InferenceLabels, kind: ErrorKind) {
        self.errors
            .get_or_create(&ErrorLabels {
                model: labels.model.clone(),
                version: labels.version.clone(),
                slot: labels.slot.clone(),
                kind,
            })
            .inc();
    }

    /// Records that `version` of `model` now serves from `slot` (and the other slot not).
    pub fn serving(&self, model: &str, slot: Slot, version: u64) {
        let version = i64::try_from(version).unwrap_or(i64::MAX);
        self.serving_version
            .get_or_create(&SlotLabels::new(model, slot))
            .set(version);
        self.serving_version
            .remove(&SlotLabels::new(model, slot.other()));
    }

    /// Sets the current update phase of `model`.
    pub fn phase(&self, model: &str, phase: Phase) {
        for p in PHASES {
            self.update_phase
                .get_or_create(&PhaseLabels {
                    model: model.to_string(),
                    phase: phase_name(p).to_string(),
                })
                .set(i64::from(p == phase));
        }
    }

    /// Counts an ended update.
    pub fn update_ended(&self, model: &str, outcome: Outcome) {
        self.updates
            .get_or_create(&OutcomeLabels {
                model: model.to_string(),
                outcome,
            })
            .inc();
    }

    /// Counts verified bytes received for `model`.
    pub fn downloaded(&self, model: &str, bytes: u64) {
        count(&self.downloaded, model, bytes);
        // Both of a model's download series show once it downloads, the other at 0.
        count(&self.reused, model, 0);
    }

    /// Counts bytes a download of `model` copied from artifacts already on the device.
    pub fn reused(&self, model: &str, bytes: u64) {
        count(&self.reused, model, bytes);
        count(&self.downloaded, model, 0);
    }

    /// Counts the bytes of a chunk reply for a download in progress.
    pub fn chunk_received(&self, model: &str, bytes: u64) {
        count(&self.chunk_bytes, model, bytes);
    }

    /// Counts chunks requested again.
    pub fn chunks_refetched(&self, model: &str, chunks: u64) {
        if chunks > 0 {
            count(&self.refetched, model, chunks);
        }
    }

    /// The warm-up p95 of each engine a staged version of `model` passed on.
    pub fn engine_trials(&self, model: &str, trials: &[modelcast_proto::report::EngineTrial]) {
        for t in trials {
            if let Some(us) = t.p95_us {
                self.engine_warmup
                    .get_or_create(&EngineLabels {
                        model: model.into(),
                        backend: t.backend.clone(),
                    })
                    .set(us);
            }
        }
    }

    /// Counts a chunk fetched over HTTP.
    pub fn http_chunk(&self) {
        self.http_chunks.inc();
    }

    /// Counts a download that fell back from HTTP to MQTT.
    pub fn http_fallback(&self) {
        self.http_fallbacks.inc();
    }

    /// Counts a rejected chunk reply.
    pub fn chunk_rejected(&self) {
        self.chunks_rejected.inc();
    }

    /// Sets the store's size on disk.
    pub fn store_size(&self, bytes: u64) {
        self.store_bytes.set(bytes);
    }

    /// Rebuilds of the store's database so far.
    pub fn store_rebuilds(&self, count: u64) {
        self.store_rebuilds.set(count);
    }

    /// One stored artifact was found missing or damaged.
    pub fn artifact_lost(&self) {
        self.artifacts_lost.inc();
    }

    /// The telemetry queue: reports and bytes held, reports dropped ever.
    pub fn telemetry_queue(&self, reports: u64, bytes: u64, dropped: u64) {
        self.telemetry_queued.set(reports);
        self.telemetry_queued_bytes.set(bytes);
        self.telemetry_dropped.set(dropped);
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_counters_histograms_and_gauges() {
        let m = Metrics::new();
        let l = InferenceLabels::new("classifier", 2, Slot::B);
        m.inference(&l, Duration::from_micros(300));
        m.inference(&l, Duration::from_millis(2));
        m.inference_error(&l, ErrorKind::BadRequest);
        m.serving("classifier", Slot::A, 1);
        m.serving("classifier", Slot::B, 2);
        m.phase("classifier", Phase::Active);
        m.update_ended("classifier", Outcome::Activated);
        m.downloaded("classifier", 4096);
        m.store_size(1 << 20);
        let text = m.encode();
        for line in [
            r#"modelcast_inferences_total{model="classifier",version="2",slot="b"} 2"#,
            r#"modelcast_inference_errors_total{model="classifier",version="2",slot="b",kind="bad_request"} 1"#,
            r#"modelcast_inference_duration_seconds_count{model="classifier",version="2",slot="b"} 2"#,
            r#"modelcast_serving_version{model="classifier",slot="b"} 2"#,
            r#"modelcast_update_phase{model="classifier",phase="active"} 1"#,
            r#"modelcast_update_phase{model="classifier",phase="failed"} 0"#,
            r#"modelcast_updates_total{model="classifier",outcome="activated"} 1"#,
            r#"modelcast_downloaded_bytes_total{model="classifier"} 4096"#,
            r#"modelcast_store_bytes 1048576"#,
            "# EOF",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(
            !text.contains(r#"serving_version{model="classifier",slot="a"}"#),
            "the slot that no longer serves is dropped:\n{text}"
        );
    }
}
