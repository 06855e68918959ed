//! The inference engine: a model loaded from its artifact for one slot, checked against its
//! manifest and golden vectors, warmed up against its latency budget, and run on requests —
//! whatever runs it. The backends are a closed set ([`Backend`]): tract ([`tract`]), which
//! every agent carries, and ONNX Runtime ([`onnxruntime`], agents built with the `ort`
//! feature; its library loaded at run time, its execution providers chosen by configuration).
//! Loading is CPU-heavy and blocking: callers run it off the serving path (`spawn_blocking`).
//!
//! NNEF is what publishers ship by default: the graph is already decluttered for tract and
//! loads without an ONNX parser, which keeps the device binary small.

#[cfg(feature = "ort")]
pub mod onnxruntime;
pub mod tract;

pub use self::tract::{datatype_of, datum, input_dims, set_threads};

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use modelcast_proto::manifest::{DataType, GoldenVector, Manifest, TensorData};
use modelcast_proto::report::{EngineReport, EngineTrial, Slot};
use thiserror::Error;

use crate::config::{Backend as Choice, EngineConfig};

/// Why a model cannot load or a request cannot run.
#[derive(Debug, Error)]
pub enum EngineError {
    /// The backend could not read, type or optimize the model.
    #[error("model does not load: {0}")]
    Load(String),
    /// The model's interface differs from what the manifest promises.
    #[error("model does not match its manifest: {0}")]
    Interface(String),
    /// A golden vector produced the wrong answer.
    #[error("golden vector {index}: {reason}")]
    Golden {
        /// Which vector.
        index: usize,
        /// What differed.
        reason: String,
    },
    /// A request's tensors are unusable.
    #[error("bad request: {0}")]
    BadInput(String),
    /// The backend failed while running.
    #[error("inference failed: {0}")]
    Run(String),
    /// The warm-up runs were slower than the manifest's latency budget.
    #[error("latency budget: p95 {p95_us} µs over {runs} warm-up runs exceeds {budget_us} µs")]
    TooSlow {
        /// Measured p95.
        p95_us: u64,
        /// The manifest's budget.
        budget_us: u64,
        /// Runs measured.
        runs: u32,
    },
}

impl EngineError {
    /// What kind of error the fleet is told of when staging fails with it.
    pub fn kind(&self) -> modelcast_proto::report::ErrorKind {
        use modelcast_proto::report::ErrorKind;
        match self {
            EngineError::Golden { .. } => ErrorKind::GoldenMismatch,
            EngineError::TooSlow { .. } => ErrorKind::LatencyBudget,
            _ => ErrorKind::Staging,
        }
    }
}

impl From<EngineError> for crate::update::Failure {
    fn from(e: EngineError) -> Self {
        crate::update::Failure::new(e.kind(), e)
    }
}

/// Warm-up runs before a swap when the manifest sets no latency budget: the first inferences
/// of a fresh plan are slow (allocation, caches), and they should not be live requests.
pub const DEFAULT_WARMUP_RUNS: u32 = 3;

/// A tensor's elements: little-endian bytes of one datatype (BOOL: 0 or 1 per byte), or for
/// BYTES, KServe v2's binary form (each element's length as a little-endian u32, then its
/// bytes). Every device modelcast builds for is little-endian, so numbers are also the bytes
/// the backends hold.
#[derive(Debug, Clone, PartialEq)]
pub struct Values {
    datatype: DataType,
    bytes: Vec<u8>,
    len: usize,
}

#[cfg(not(target_endian = "little"))]
compile_error!("tensors travel as little-endian bytes; big-endian hosts are not supported");

impl Values {
    /// Elements of `datatype` from their bytes: a whole number of little-endian elements,
    /// BOOL bytes 0 or 1, BYTES elements each with its length.
    pub fn new(datatype: DataType, bytes: Vec<u8>) -> Result<Self, EngineError> {
        let len = match datatype.size() {
            Some(size) if !bytes.len().is_multiple_of(size) => {
                return Err(EngineError::BadInput(format!(
                    "{} bytes are not a whole number of {datatype} elements",
                    bytes.len()
                )))
            }
            Some(size) => bytes.len() / size,
            None => modelcast_proto::manifest::split_bytes(&bytes)
                .map_err(|e| EngineError::BadInput(e.to_string()))?
                .len(),
        };
        if datatype == DataType::Bool && bytes.iter().any(|b| *b > 1) {
            return Err(EngineError::BadInput("BOOL elements must be 0 or 1".into()));
        }
        Ok(Values {
            datatype,
            bytes,
            len,
        })
    }

    /// FP32 values.
    pub fn from_f32(values: &[f32]) -> Self {
        Values {
            datatype: DataType::Fp32,
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            len: values.len(),
        }
    }

    /// Zeros of `datatype` (BYTES: empty strings).
    pub fn zeros(datatype: DataType, elements: usize) -> Self {
        Values {
            datatype,
            bytes: vec![0; elements * datatype.size().unwrap_or(4)],
            len: elements,
        }
    }

    /// Element count.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The element type.
    pub fn datatype(&self) -> DataType {
        self.datatype
    }

    /// The elements' bytes: little-endian numbers, or BYTES in KServe v2's binary form.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The elements of a BYTES tensor (none for a numeric one).
    pub fn strings(&self) -> Vec<&[u8]> {
        if self.datatype != DataType::Bytes {
            return Vec::new();
        }
        // Checked when made.
        modelcast_proto::manifest::split_bytes(&self.bytes).unwrap_or_default()
    }

    /// The values as f64, for telemetry and comparisons (64-bit integers beyond 2^53 round).
    /// BYTES has no numbers: empty.
    pub fn to_f64(&self) -> Vec<f64> {
        let Some(size) = self.datatype.size() else {
            return Vec::new();
        };
        self.bytes
            .chunks_exact(size)
            .map(|c| self.datatype.decode_f64(c))
            .collect()
    }
}

/// A named tensor on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Tensor name.
    pub name: String,
    /// Shape.
    pub shape: Vec<u64>,
    /// Values.
    pub values: Values,
}

impl HostTensor {
    /// A manifest tensor (golden vector data) as a host tensor.
    pub fn from_data(t: &TensorData) -> Result<Self, EngineError> {
        let bytes = t
            .bytes()
            .map_err(|e| EngineError::BadInput(e.to_string()))?;
        Ok(HostTensor {
            name: t.name.clone(),
            shape: t.shape.clone(),
            values: Values::new(t.datatype, bytes)?,
        })
    }
}

/// Plans kept per model when its inputs have symbolic dimensions.
pub const DEFAULT_PLAN_CACHE: usize = 8;

/// How a run found its plan, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanUse {
    /// The plan was made for this request's shapes (a cache miss).
    pub built: bool,
    /// Plans held after the run (1 for a model of fixed shapes).
    pub cached: usize,
}

/// What a serving model has answered, as Triton's statistics extension reports it.
#[derive(Debug, Default)]
pub struct RunStats {
    /// Requests answered.
    pub success: AtomicU64,
    /// Their total time, ns.
    pub success_ns: AtomicU64,
    /// Requests the model failed (bad requests are not counted).
    pub fail: AtomicU64,
    /// Their total time, ns.
    pub fail_ns: AtomicU64,
    /// Runs that found their plan cached.
    pub plan_hits: AtomicU64,
    /// Runs that made a plan for their shapes.
    pub plan_builds: AtomicU64,
    /// When the last request was answered, ms since the Unix epoch.
    pub last_ms: AtomicU64,
}

impl RunStats {
    /// Counts one request.
    pub fn record(&self, ok: bool, took: Duration, plan: Option<PlanUse>, now_ms: u64) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let (n, t) = if ok {
            (&self.success, &self.success_ns)
        } else {
            (&self.fail, &self.fail_ns)
        };
        n.fetch_add(1, Ordering::Relaxed);
        t.fetch_add(ns, Ordering::Relaxed);
        match plan {
            Some(PlanUse { built: true, .. }) => self.plan_builds.fetch_add(1, Ordering::Relaxed),
            Some(_) => self.plan_hits.fetch_add(1, Ordering::Relaxed),
            None => 0,
        };
        self.last_ms.store(now_ms, Ordering::Relaxed);
    }
}

/// A model loaded, optimized and checked, ready to serve from one slot.
pub struct LoadedModel {
    manifest: Manifest,
    slot: Slot,
    backend: Backend,
    stats: RunStats,
    /// Why this backend runs it, and what else was tried ([`stage`]).
    choice: Option<EngineReport>,
    /// Threads one inference may use (`[engine] threads`): above 1, warm-up is timed by the
    /// wall clock ([`LoadedModel::warm_up`]).
    threads: usize,
}

/// What runs a model.
enum Backend {
    /// tract, on the CPU.
    Tract(tract::TractModel),
    /// ONNX Runtime, on the execution provider it chose.
    #[cfg(feature = "ort")]
    Onnxruntime(onnxruntime::OrtModel),
}

impl Backend {
    fn run(
        &self,
        manifest: &Manifest,
        inputs: &[HostTensor],
    ) -> Result<(Vec<HostTensor>, PlanUse), EngineError> {
        match self {
            Backend::Tract(m) => m.run(manifest, inputs),
            #[cfg(feature = "ort")]
            Backend::Onnxruntime(m) => m.run(manifest, inputs),
        }
    }
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("backend", &self.backend_name())
            .field("name", &self.manifest.name)
            .field("version", &self.manifest.version)
            .field("slot", &self.slot)
            .finish()
    }
}

impl LoadedModel {
    /// Reads a model in the manifest's format, plans it for the manifest's declared input
    /// shapes and optimizes it, keeping up to [`DEFAULT_PLAN_CACHE`] plans.
    pub fn load(
        manifest: &Manifest,
        slot: Slot,
        reader: &mut dyn Read,
    ) -> Result<Self, EngineError> {
        Self::load_with(manifest, slot, reader, DEFAULT_PLAN_CACHE)
    }

    /// [`LoadedModel::load`], keeping up to `plan_cache` plans (at least one) for models
    /// whose inputs have symbolic dimensions.
    pub fn load_with(
        manifest: &Manifest,
        slot: Slot,
        reader: &mut dyn Read,
        plan_cache: usize,
    ) -> Result<Self, EngineError> {
        let options = tract::TractOptions {
            plan_cache,
            ..Default::default()
        };
        let backend = Backend::Tract(tract::TractModel::load(manifest, reader, options)?);
        Ok(Self::serving(manifest, slot, backend, 1))
    }

    fn serving(manifest: &Manifest, slot: Slot, backend: Backend, threads: usize) -> Self {
        LoadedModel {
            manifest: manifest.clone(),
            slot,
            backend,
            stats: RunStats::default(),
            choice: None,
            threads: threads.max(1),
        }
    }

    /// Loads the model on the backend `engine` names for it, without measuring: ONNX Runtime
    /// for an ONNX artifact when configured (`[engine] backend = "onnxruntime"`), tract
    /// otherwise (and for `auto`, which measures only at [`stage`]).
    pub fn load_on(
        manifest: &Manifest,
        slot: Slot,
        reader: &mut dyn Read,
        engine: &EngineConfig,
    ) -> Result<Self, EngineError> {
        let candidate = match engine.backend {
            Choice::Onnxruntime if runs_on_onnxruntime(manifest) => Candidate::Onnxruntime,
            _ => Candidate::Tract,
        };
        Self::load_as(candidate, manifest, slot, reader, engine)
    }

    fn load_as(
        candidate: Candidate,
        manifest: &Manifest,
        slot: Slot,
        reader: &mut dyn Read,
        engine: &EngineConfig,
    ) -> Result<Self, EngineError> {
        let backend = match candidate {
            Candidate::Tract => Backend::Tract(tract::TractModel::load(
                manifest,
                reader,
                tract::TractOptions {
                    plan_cache: engine.plan_cache,
                    fp16: engine.fp16,
                },
            )?),
            #[cfg(feature = "ort")]
            Candidate::Onnxruntime => {
                Backend::Onnxruntime(onnxruntime::OrtModel::load(manifest, reader, engine)?)
            }
            #[cfg(not(feature = "ort"))]
            Candidate::Onnxruntime => {
                return Err(EngineError::Load(
                    "this agent is built without ONNX Runtime (the `ort` feature)".into(),
                ))
            }
        };
        Ok(Self::serving(manifest, slot, backend, engine.threads))
    }

    /// What runs it and why (set at [`stage`]; a model loaded otherwise says its backend).
    pub fn engine_report(&self) -> EngineReport {
        self.choice.clone().unwrap_or_else(|| EngineReport {
            backend: self.backend_name().into(),
            reason: "loaded at start".into(),
            trials: Vec::new(),
        })
    }

    /// The manifest this model was loaded from.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The slot it serves from.
    pub fn slot(&self) -> Slot {
        self.slot
    }

    /// What runs it: `tract`, or `onnxruntime/<provider>`.
    pub fn backend_name(&self) -> &'static str {
        match &self.backend {
            Backend::Tract(_) => "tract",
            #[cfg(feature = "ort")]
            Backend::Onnxruntime(m) => m.name(),
        }
    }

    /// Whether its FP16 operations compute in FP32 (tract's `[engine] fp16 = "f32"` on a
    /// model that has them).
    pub fn fp16_widened(&self) -> bool {
        match &self.backend {
            Backend::Tract(m) => m.widened(),
            #[cfg(feature = "ort")]
            Backend::Onnxruntime(_) => false,
        }
    }

    /// Its platform, in Triton's names (format and engine): `onnx_tract`, `onnxruntime_onnx`.
    pub fn platform(&self) -> &'static str {
        match &self.backend {
            Backend::Tract(_) => "onnx_tract",
            #[cfg(feature = "ort")]
            Backend::Onnxruntime(_) => "onnxruntime_onnx",
        }
    }

    /// Its backend, in Triton's names: `tract`, `onnxruntime`.
    pub fn backend(&self) -> &'static str {
        match &self.backend {
            Backend::Tract(_) => "tract",
            #[cfg(feature = "ort")]
            Backend::Onnxruntime(_) => "onnxruntime",
        }
    }

    /// What it has answered.
    pub fn stats(&self) -> &RunStats {
        &self.stats
    }

    /// Plans it holds now.
    pub fn plans_cached(&self) -> usize {
        match &self.backend {
            Backend::Tract(m) => m.plans_cached(),
            #[cfg(feature = "ort")]
            Backend::Onnxruntime(_) => 1,
        }
    }

    /// Runs one request. Inputs are matched by name and checked against the manifest.
    pub fn run(&self, inputs: &[HostTensor]) -> Result<Vec<HostTensor>, EngineError> {
        self.run_counted(inputs).map(|(outputs, _)| outputs)
    }

    /// [`LoadedModel::run`], saying how it found its plan.
    pub fn run_counted(
        &self,
        inputs: &[HostTensor],
    ) -> Result<(Vec<HostTensor>, PlanUse), EngineError> {
        if inputs.len() != self.manifest.inputs.len() {
            return Err(EngineError::BadInput(format!(
                "{} inputs given, model takes {}",
                inputs.len(),
                self.manifest.inputs.len()
            )));
        }
        self.backend.run(&self.manifest, inputs)
    }

    /// The backend as the fleet names it (for a deployment's pin and the manifest's
    /// tolerances).
    pub fn backend_kind(&self) -> modelcast_proto::engine::Backend {
        match &self.backend {
            Backend::Tract(_) => modelcast_proto::engine::Backend::Tract,
            #[cfg(feature = "ort")]
            Backend::Onnxruntime(_) => modelcast_proto::engine::Backend::Onnxruntime,
        }
    }

    /// Runs every golden vector of the manifest, then those of its golden file (`file`, read
    /// by the caller); any difference beyond tolerance (the manifest's for this backend where
    /// it states one, else the vector's own), or a NaN/Inf output, is an error.
    pub fn check_golden(&self, file: &[GoldenVector]) -> Result<(), EngineError> {
        let on_backend = self.manifest.tolerance_on(self.backend_kind());
        for (index, golden) in self.manifest.golden.iter().chain(file).enumerate() {
            let g = |reason: String| EngineError::Golden { index, reason };
            let tolerance = match on_backend {
                Some(t) => t,
                None => golden.tolerance().map_err(|e| g(e.to_string()))?,
            };
            let inputs = golden
                .inputs
                .iter()
                .map(HostTensor::from_data)
                .collect::<Result<Vec<_>, EngineError>>()
                .map_err(|e| g(e.to_string()))?;
            let outputs = self.run(&inputs).map_err(|e| g(e.to_string()))?;
            for expected in &golden.outputs {
                let got = outputs
                    .iter()
                    .find(|o| o.name == expected.name)
                    .ok_or_else(|| g(format!("no output {:?}", expected.name)))?;
                if expected.datatype == DataType::Bytes {
                    let want = expected.bytes().map_err(|e| g(e.to_string()))?;
                    if got.values.datatype() != DataType::Bytes || got.values.bytes() != want {
                        return Err(g(format!(
                            "{} differs from the expected strings",
                            expected.name
                        )));
                    }
                    continue;
                }
                let want = expected.values().map_err(|e| g(e.to_string()))?;
                let have = got.values.to_f64();
                if have.len() != want.len() {
                    return Err(g(format!(
                        "{} has {} values, expected {}",
                        expected.name,
                        have.len(),
                        want.len()
                    )));
                }
                for (i, (h, w)) in have.iter().zip(&want).enumerate() {
                    if !h.is_finite() {
                        return Err(g(format!("{}[{i}] is {h}", expected.name)));
                    }
                    if (h - w).abs() > tolerance {
                        return Err(g(format!(
                            "{}[{i}] = {h}, expected {w} ± {tolerance}",
                            expected.name
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Warm-up input: the first golden vector's (inline, else of the golden file `file`), or
    /// zeros of every input's declared shape.
    fn warmup_inputs(&self, file: &[GoldenVector]) -> Result<Vec<HostTensor>, EngineError> {
        if let Some(golden) = self.manifest.golden.first().or(file.first()) {
            return golden.inputs.iter().map(HostTensor::from_data).collect();
        }
        self.manifest
            .inputs
            .iter()
            .map(|spec| {
                let n = spec
                    .elements()
                    .ok_or_else(|| EngineError::Interface(format!("{} is too large", spec.name)))?;
                Ok(HostTensor {
                    name: spec.name.clone(),
                    shape: spec.shape.clone(),
                    values: Values::zeros(spec.datatype, n),
                })
            })
            .collect()
    }

    /// Runs the model on its warm-up input (the manifest's latency budget's run count, or
    /// [`DEFAULT_WARMUP_RUNS`]) before it serves, and checks the p95 of those runs against the
    /// budget. Returns the p95.
    ///
    /// With one thread per inference (the default), each run is timed in the CPU time of the
    /// calling thread (both engines run a model on the thread that asks), not by the wall
    /// clock: the budget is what the model costs, and it holds whatever else the device is
    /// doing. So warm-up can run in the background while requests are served, and a busy
    /// device does not reject a version that fits. With more threads (`[engine] threads`),
    /// the work spreads to threads the calling one's CPU time does not see, so runs are timed
    /// by the wall clock: at 2 threads, CPU time made tract look 5× faster than ONNX Runtime
    /// on a model where it was 2.7× slower, and `auto` chose it.
    pub fn warm_up(&self, file: &[GoldenVector]) -> Result<Duration, EngineError> {
        let budget = self.manifest.latency_budget;
        let runs = budget.map_or(DEFAULT_WARMUP_RUNS, |b| b.runs).max(1);
        let inputs = self.warmup_inputs(file)?;
        let mut took = Vec::with_capacity(runs as usize);
        let wall = self.threads > 1;
        for _ in 0..runs {
            let (cpu, clock) = (crate::sys::thread_cpu_time(), std::time::Instant::now());
            self.run(&inputs)?;
            took.push(if wall {
                clock.elapsed()
            } else {
                crate::sys::thread_cpu_time().saturating_sub(cpu)
            });
        }
        took.sort();
        // Nearest rank.
        let rank = ((0.95 * runs as f64).ceil() as usize).clamp(1, took.len());
        let p95 = took[rank - 1];
        if let Some(b) = budget {
            let p95_us = p95.as_micros() as u64;
            if p95_us > b.p95_us {
                return Err(EngineError::TooSlow {
                    p95_us,
                    budget_us: b.p95_us,
                    runs,
                });
            }
        }
        Ok(p95)
    }
}

/// Checks a request's tensor against the manifest input it is given for: a shape the input
/// accepts, its datatype, and as many values as the shape holds.
fn check_input(
    spec: &modelcast_proto::manifest::TensorSpec,
    t: &HostTensor,
) -> Result<(), EngineError> {
    spec.accepts(&t.shape)
        .map_err(|e| EngineError::BadInput(e.to_string()))?;
    if t.values.datatype() != spec.datatype {
        return Err(EngineError::BadInput(format!(
            "input {} is {}, model takes {}",
            spec.name,
            t.values.datatype(),
            spec.datatype
        )));
    }
    if modelcast_proto::manifest::elements(&t.shape) != Some(t.values.len()) {
        return Err(EngineError::BadInput(format!(
            "input {} has {} values for shape {:?}",
            spec.name,
            t.values.len(),
            t.shape
        )));
    }
    Ok(())
}

/// A backend that may run a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Candidate {
    Tract,
    Onnxruntime,
}

impl Candidate {
    fn name(self) -> &'static str {
        match self {
            Candidate::Tract => "tract",
            Candidate::Onnxruntime => "onnxruntime",
        }
    }
}

/// Whether ONNX Runtime can run this version: an ONNX artifact without BYTES tensors.
fn runs_on_onnxruntime(manifest: &Manifest) -> bool {
    manifest.model_format == modelcast_proto::manifest::ModelFormat::Onnx
        && !(manifest.inputs.iter())
            .chain(&manifest.outputs)
            .any(|t| t.datatype == DataType::Bytes)
}

/// Two warm-up p95s closer than this share (1/20) are a tie, which goes to tract (it needs
/// less memory).
const TIE: (u128, u128) = (19, 20);

/// Stages a version for `slot`: loads it, checks its golden vectors (`golden`: the golden
/// file's, beside the manifest's own) and warms it up against its latency budget, on the
/// backend `engine` names — or, with `backend = "auto"`, on every backend that can run it
/// (tract; ONNX Runtime for an ONNX artifact, in agents built with `ort` and given its
/// library), keeping the fastest at warm-up that passes (a tie goes to tract). A backend that
/// fails is skipped with its reason; the version is refused only when none passes. `open`
/// gives the artifact's bytes afresh for each backend. Returns the model (its
/// [`LoadedModel::engine_report`] says what was chosen and why) and its warm-up p95.
pub fn stage<R: Read, E: Into<crate::update::Failure>>(
    manifest: &Manifest,
    slot: Slot,
    mut open: impl FnMut() -> Result<R, E>,
    golden: &[GoldenVector],
    engine: &EngineConfig,
) -> Result<(LoadedModel, Duration), crate::update::Failure> {
    let onnxruntime = runs_on_onnxruntime(manifest);
    let configured = if engine.pinned {
        "pinned by the deployment"
    } else {
        "configured"
    };
    let (candidates, reason) = match engine.backend {
        Choice::Tract => (vec![Candidate::Tract], configured),
        Choice::Onnxruntime if onnxruntime => (vec![Candidate::Onnxruntime], configured),
        Choice::Onnxruntime => (
            vec![Candidate::Tract],
            "ONNX Runtime runs ONNX artifacts without BYTES tensors only",
        ),
        Choice::Auto if onnxruntime && engine.has_onnxruntime() => {
            (vec![Candidate::Tract, Candidate::Onnxruntime], "")
        }
        Choice::Auto => (
            vec![Candidate::Tract],
            "the only backend for this artifact here",
        ),
    };
    let mut trials = Vec::new();
    let mut best: Option<(LoadedModel, Duration)> = None;
    let mut first_error: Option<EngineError> = None;
    for candidate in candidates {
        let mut reader = open().map_err(Into::into)?;
        let tried =
            LoadedModel::load_as(candidate, manifest, slot, &mut reader, engine).and_then(|m| {
                m.check_golden(golden)?;
                let p95 = m.warm_up(golden)?;
                Ok((m, p95))
            });
        match tried {
            Ok((model, p95)) => {
                trials.push(EngineTrial {
                    backend: model.backend_name().into(),
                    p95_us: Some(p95.as_micros() as u64),
                    error: None,
                });
                let faster = best
                    .as_ref()
                    .is_none_or(|(_, b)| p95.as_nanos() * TIE.1 < b.as_nanos() * TIE.0);
                if faster {
                    best = Some((model, p95));
                }
            }
            Err(e) => {
                trials.push(EngineTrial {
                    backend: candidate.name().into(),
                    p95_us: None,
                    error: Some(e.to_string()),
                });
                first_error.get_or_insert(e);
            }
        }
    }
    let Some((mut model, p95)) = best else {
        let error = first_error.expect("a candidate was tried");
        let mut failure: crate::update::Failure = error.into();
        if trials.len() > 1 {
            let all: Vec<String> = trials
                .iter()
                .map(|t| format!("{}: {}", t.backend, t.error.as_deref().unwrap_or("passed")))
                .collect();
            failure = crate::update::Failure::new(failure.kind, all.join("; "));
        }
        return Err(failure);
    };
    let reason = if trials.len() > 1 {
        let others: Vec<String> = trials
            .iter()
            .filter(|t| t.backend != model.backend_name())
            .map(|t| match (t.p95_us, &t.error) {
                (Some(us), _) => format!("{} {us} µs", t.backend),
                (None, Some(e)) => format!("{} failed: {e}", t.backend),
                (None, None) => t.backend.clone(),
            })
            .collect();
        format!(
            "fastest at warm-up: {} µs p95 ({}; a tie within 5 % goes to tract)",
            p95.as_micros(),
            others.join(", ")
        )
    } else {
        reason.to_string()
    };
    model.choice = Some(EngineReport {
        backend: model.backend_name().into(),
        reason,
        trials,
    });
    Ok((model, p95))
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelcast_proto::manifest::{ModelFormat, TensorSpec};
    use modelcast_proto::verify::fixture;

    const V2_ONNX: &[u8] = include_bytes!("../tests/fixtures/classifier-v2.onnx");
    const V2_NNEF: &[u8] = include_bytes!("../tests/fixtures/classifier-v2.nnef.tar");

    fn manifest(bytes: &[u8], format: ModelFormat) -> Manifest {
        let mut m = fixture::manifest("classifier", 2, bytes, 1024);
        m.model_format = format;
        m.inputs[0].shape = vec![1, 4];
        m.outputs[0].shape = vec![1, 3];
        m
    }

    fn input() -> Vec<HostTensor> {
        vec![HostTensor {
            name: "x".into(),
            shape: vec![1, 4],
            values: Values::from_f32(&[0.5, -1.0, 2.0, 0.25]),
        }]
    }

    #[test]
    fn nnef_loads_and_runs() {
        let m = manifest(V2_NNEF, ModelFormat::Nnef);
        let model = LoadedModel::load(&m, Slot::A, &mut &V2_NNEF[..]).unwrap();
        let out = model.run(&input()).unwrap();
        assert_eq!(out[0].shape, vec![1, 3]);
        #[cfg(feature = "onnx")]
        {
            let m = manifest(V2_ONNX, ModelFormat::Onnx);
            let onnx = LoadedModel::load(&m, Slot::B, &mut &V2_ONNX[..]).unwrap();
            let reference = onnx.run(&input()).unwrap();
            for (a, b) in out[0]
                .values
                .to_f64()
                .iter()
                .zip(reference[0].values.to_f64())
            {
                assert!((a - b).abs() < 1e-5, "NNEF {a} vs ONNX {b}");
            }
        }
    }

    #[test]
    fn interface_mismatches_and_garbage_are_errors() {
        let mut m = manifest(V2_NNEF, ModelFormat::Nnef);
        m.inputs[0].shape = vec![1, 5];
        let err = LoadedModel::load(&m, Slot::A, &mut &V2_NNEF[..]).unwrap_err();
        assert!(matches!(err, EngineError::Interface(_)), "{err}");
        m.inputs[0].shape = vec![1, 4];
        m.inputs[0].name = "z".into();
        let err = LoadedModel::load(&m, Slot::A, &mut &V2_NNEF[..]).unwrap_err();
        assert!(err.to_string().contains("no input named"), "{err}");
        for garbage in [&b""[..], b"\x1f\x8b not gzip", &[0u8; 1024]] {
            assert!(LoadedModel::load(&m, Slot::A, &mut &garbage[..]).is_err());
        }
    }

    /// An NNEF model computing `y = x * w + b` in FP16, its input and output FP16.
    fn fp16_model() -> (Manifest, Vec<u8>) {
        use tract_nnef::prelude::*;
        use tract_nnef::tract_core::ops::math;
        let half = |v: [f32; 4]| v.map(f16::from_f32);
        let mut model = TypedModel::default();
        let x = model.add_source("x", f16::fact([1, 4])).unwrap();
        let w = model
            .add_const("w", tensor2(&[half([0.5, -1.5, 2.0, 0.25])]))
            .unwrap();
        let b = model.add_const("b", tensor2(&[half([1.0; 4])])).unwrap();
        let xw = model.wire_node("xw", math::mul(), &[x, w]).unwrap();
        let y = model.wire_node("y", math::add(), &[xw[0], b]).unwrap();
        model.select_output_outlets(&y).unwrap();
        let mut tar = Vec::new();
        tract_nnef::nnef().write_to_tar(&model, &mut tar).unwrap();
        let mut m = fixture::manifest("half", 1, &tar, 1024);
        m.model_format = ModelFormat::Nnef;
        m.inputs = vec![TensorSpec::fixed("x", DataType::Fp16, vec![1, 4])];
        m.outputs = vec![TensorSpec::fixed("y", DataType::Fp16, vec![1, 4])];
        (m, tar)
    }

    #[test]
    fn fp16_models_compute_in_fp32_and_keep_fp16_at_the_api() {
        use tract_nnef::prelude::f16;
        let (m, tar) = fp16_model();
        let x: Vec<u8> = [1.0f32, 2.0, -0.5, 4.0]
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect();
        let input = vec![HostTensor {
            name: "x".into(),
            shape: vec![1, 4],
            values: Values::new(DataType::Fp16, x).unwrap(),
        }];
        let mut answers = Vec::new();
        for (fp16, widened) in [(tract::Fp16::F32, true), (tract::Fp16::F16, false)] {
            let engine = EngineConfig {
                fp16,
                ..Default::default()
            };
            let model = LoadedModel::load_on(&m, Slot::A, &mut &tar[..], &engine).unwrap();
            assert_eq!(model.fp16_widened(), widened);
            let out = model.run(&input).unwrap();
            assert_eq!(out[0].values.datatype(), DataType::Fp16);
            assert_eq!(out[0].shape, vec![1, 4]);
            answers.push(out[0].values.to_f64());
        }
        assert_eq!(answers[0], vec![1.5, -2.0, 0.0, 2.0]);
        assert_eq!(answers[0], answers[1]);
        // A model without FP16 is not touched.
        let plain = manifest(V2_NNEF, ModelFormat::Nnef);
        let model = LoadedModel::load(&plain, Slot::A, &mut &V2_NNEF[..]).unwrap();
        assert!(!model.fp16_widened());
    }

    #[cfg(not(feature = "onnx"))]
    #[test]
    fn onnx_needs_the_onnx_feature() {
        let m = manifest(V2_ONNX, ModelFormat::Onnx);
        let err = LoadedModel::load(&m, Slot::A, &mut &V2_ONNX[..]).unwrap_err();
        assert!(
            err.to_string().contains("publish the model as NNEF"),
            "{err}"
        );
    }
}
