//! The inference engine: tract loads an artifact (NNEF, or ONNX when built with the `onnx`
//! feature), plans it for the manifest's concrete input shapes, optimizes it, checks it
//! against the manifest and its golden vectors, and runs requests. Loading is CPU-heavy and
//! blocking: callers run it off the serving path (`spawn_blocking`).
//!
//! NNEF is what publishers ship by default: the graph is already decluttered for tract and
//! loads without an ONNX parser, which keeps the device binary small.

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use modelcast_proto::manifest::{
    DataType, Dim, GoldenVector, Manifest, ModelFormat, TensorData, TensorSpec,
};
use modelcast_proto::report::Slot;
use thiserror::Error;
use tract_nnef::prelude::*;

/// Why a model cannot load or a request cannot run.
#[derive(Debug, Error)]
pub enum EngineError {
    /// tract could not read, type or optimize the model.
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
    /// tract failed while running.
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
/// tract holds.
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

/// tract's type for a manifest type.
pub fn datum(dt: DataType) -> DatumType {
    match dt {
        DataType::Bool => DatumType::Bool,
        DataType::Uint8 => DatumType::U8,
        DataType::Uint16 => DatumType::U16,
        DataType::Uint32 => DatumType::U32,
        DataType::Uint64 => DatumType::U64,
        DataType::Int8 => DatumType::I8,
        DataType::Int16 => DatumType::I16,
        DataType::Int32 => DatumType::I32,
        DataType::Int64 => DatumType::I64,
        DataType::Fp16 => DatumType::F16,
        DataType::Fp32 => DatumType::F32,
        DataType::Fp64 => DatumType::F64,
        DataType::Bytes => DatumType::String,
    }
}

/// The manifest type of a tract type (quantized types as their storage; tract's symbolic
/// integers, concrete once run, as INT64), if it has one.
pub fn datatype_of(dt: DatumType) -> Option<DataType> {
    if dt == DatumType::TDim {
        return Some(DataType::Int64);
    }
    DataType::ALL
        .into_iter()
        .find(|d| datum(*d) == dt.unquantized())
}

fn shape_usize(shape: &[u64]) -> Result<Vec<usize>, EngineError> {
    shape
        .iter()
        .map(|d| {
            usize::try_from(*d).map_err(|_| EngineError::BadInput("dimension too large".into()))
        })
        .collect()
}

/// Plans kept per model when its inputs have symbolic dimensions.
pub const DEFAULT_PLAN_CACHE: usize = 8;

/// Lets one inference spread its matrix products over `threads` threads (tract's
/// multithreaded matmul, in a pool of its own) when above 1; agents built without the
/// `multithread` feature always run one thread per inference.
pub fn set_threads(threads: usize) {
    #[cfg(feature = "multithread")]
    if threads > 1 {
        use tract_linalg::multithread::{set_default_executor, Executor};
        set_default_executor(Executor::multithread_with_name(threads, "modelcast-mm"));
    }
    #[cfg(not(feature = "multithread"))]
    let _ = threads;
}

/// One optimized plan per concrete input shape, least recently used dropped first.
struct PlanCache {
    /// The decluttered model, its input dimensions still symbolic.
    template: TypedModel,
    /// For each manifest input, the symbol of each of its dimensions that has one.
    symbols: Vec<Vec<Option<Symbol>>>,
    /// Plans by the inputs' shapes (manifest order).
    plans: std::sync::Mutex<lru::LruCache<Vec<Vec<u64>>, Arc<TypedRunnableModel>>>,
}

/// How a model runs.
enum Plans {
    /// Every input dimension fixed: one plan.
    Fixed(Arc<TypedRunnableModel>),
    /// Symbolic input dimensions: plans made on demand.
    PerShape(Box<PlanCache>),
}

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
    plans: Plans,
    /// Position in the plan's inputs of each manifest input.
    input_positions: Vec<usize>,
    stats: RunStats,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("name", &self.manifest.name)
            .field("version", &self.manifest.version)
            .field("slot", &self.slot)
            .finish()
    }
}

fn load_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Load(format!("{e:#}"))
}

fn optimize(model: TypedModel) -> Result<Arc<TypedRunnableModel>, EngineError> {
    model
        .into_optimized()
        .map_err(load_err)?
        .into_runnable()
        .map_err(load_err)
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
        let (model, input_positions) = match manifest.model_format {
            ModelFormat::Nnef => read_nnef(manifest, reader)?,
            ModelFormat::Onnx => read_onnx(manifest, reader)?,
        };
        let symbols = input_symbols(manifest, &model, &input_positions)?;
        check_output_types(manifest, &model)?;
        let dynamic = symbols.iter().flatten().any(Option::is_some);
        let plans = if dynamic {
            let template = model.into_decluttered().map_err(load_err)?;
            let capacity = std::num::NonZeroUsize::new(plan_cache.max(1)).expect("at least 1");
            Plans::PerShape(Box::new(PlanCache {
                template,
                symbols,
                plans: std::sync::Mutex::new(lru::LruCache::new(capacity)),
            }))
        } else {
            let plan = optimize(model)?;
            check_output_shapes(manifest, &plan)?;
            Plans::Fixed(plan)
        };
        let loaded = LoadedModel {
            manifest: manifest.clone(),
            slot,
            plans,
            input_positions,
            stats: RunStats::default(),
        };
        if let Plans::PerShape(cache) = &loaded.plans {
            // The declared shapes must plan, and the model must answer them as declared.
            let declared: Vec<Vec<u64>> = manifest.inputs.iter().map(|i| i.shape.clone()).collect();
            let (plan, _) = loaded.plan_for(cache, &declared)?;
            check_output_shapes(manifest, &plan)?;
        }
        Ok(loaded)
    }

    /// The manifest this model was loaded from.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The slot it serves from.
    pub fn slot(&self) -> Slot {
        self.slot
    }

    /// What it has answered.
    pub fn stats(&self) -> &RunStats {
        &self.stats
    }

    /// Plans it holds now.
    pub fn plans_cached(&self) -> usize {
        match &self.plans {
            Plans::Fixed(_) => 1,
            Plans::PerShape(cache) => cache.plans.lock().map_or(0, |p| p.len()),
        }
    }

    /// The plan for these input shapes (manifest order), made and cached on a miss.
    fn plan_for(
        &self,
        cache: &PlanCache,
        shapes: &[Vec<u64>],
    ) -> Result<(Arc<TypedRunnableModel>, PlanUse), EngineError> {
        let lock = || cache.plans.lock().unwrap_or_else(|p| p.into_inner());
        {
            let mut plans = lock();
            if let Some(plan) = plans.get(shapes).cloned() {
                let cached = plans.len();
                return Ok((
                    plan,
                    PlanUse {
                        built: false,
                        cached,
                    },
                ));
            }
        }
        let mut values: std::collections::HashMap<Symbol, TDim> = Default::default();
        for ((spec, syms), shape) in self.manifest.inputs.iter().zip(&cache.symbols).zip(shapes) {
            for (sym, &size) in syms.iter().zip(shape) {
                let Some(sym) = sym else { continue };
                let size = TDim::Val(size as i64);
                match values.get(sym) {
                    Some(bound) if *bound != size => {
                        return Err(EngineError::BadInput(format!(
                            "input {} gives dimension {sym} the size {size}, another input {bound}",
                            spec.name
                        )))
                    }
                    _ => {
                        values.insert(sym.clone(), size);
                    }
                }
            }
        }
        // A shape the ranges allow but the model cannot compute (a width that does not divide
        // its strides, say) is the request's fault, not the model's.
        let plan = cache
            .template
            .set_symbols(&values)
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .map_err(|e| {
                EngineError::BadInput(format!("the model cannot run shapes {shapes:?}: {e:#}"))
            })?;
        let mut plans = lock();
        plans.put(shapes.to_vec(), plan.clone());
        Ok((
            plan,
            PlanUse {
                built: true,
                cached: plans.len(),
            },
        ))
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
        let mut ordered: Vec<Option<TValue>> = vec![None; self.input_positions.len()];
        let mut shapes = Vec::with_capacity(inputs.len());
        for (spec, pos) in self.manifest.inputs.iter().zip(&self.input_positions) {
            let given = inputs
                .iter()
                .find(|t| t.name == spec.name)
                .ok_or_else(|| EngineError::BadInput(format!("missing input {:?}", spec.name)))?;
            ordered[*pos] = Some(to_tract(spec, given)?);
            shapes.push(given.shape.clone());
        }
        let (plan, used) = match &self.plans {
            Plans::Fixed(plan) => (
                plan.clone(),
                PlanUse {
                    built: false,
                    cached: 1,
                },
            ),
            Plans::PerShape(cache) => self.plan_for(cache, &shapes)?,
        };
        let values: TVec<TValue> = ordered
            .into_iter()
            .map(|v| v.expect("every position filled"))
            .collect();
        let outputs = plan
            .run(values)
            .map_err(|e| EngineError::Run(format!("{e:#}")))?;
        let outputs = outputs
            .iter()
            .zip(&self.manifest.outputs)
            .map(|(t, spec)| from_tract(spec, t))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((outputs, used))
    }

    /// Runs every golden vector of the manifest, then those of its golden file (`file`, read
    /// by the caller); any difference beyond tolerance, or a NaN/Inf output, is an error.
    pub fn check_golden(&self, file: &[GoldenVector]) -> Result<(), EngineError> {
        for (index, golden) in self.manifest.golden.iter().chain(file).enumerate() {
            let g = |reason: String| EngineError::Golden { index, reason };
            let tolerance = golden.tolerance().map_err(|e| g(e.to_string()))?;
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
    /// Each run is timed in the CPU time of the calling thread (tract runs a model on the
    /// thread that asks), not by the wall clock: the budget is what the model costs, and it
    /// holds whatever else the device is doing. So warm-up can run in the background while
    /// requests are served, and a busy device does not reject a version that fits.
    pub fn warm_up(&self, file: &[GoldenVector]) -> Result<Duration, EngineError> {
        let budget = self.manifest.latency_budget;
        let runs = budget.map_or(DEFAULT_WARMUP_RUNS, |b| b.runs).max(1);
        let inputs = self.warmup_inputs(file)?;
        let mut took = Vec::with_capacity(runs as usize);
        for _ in 0..runs {
            let started = crate::sys::thread_cpu_time();
            self.run(&inputs)?;
            took.push(crate::sys::thread_cpu_time().saturating_sub(started));
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

/// Where each manifest input sits among the model's inputs, matched by name.
fn input_positions(manifest: &Manifest, names: &[String]) -> Result<Vec<usize>, EngineError> {
    if names.len() != manifest.inputs.len() {
        return Err(EngineError::Interface(format!(
            "model has inputs {names:?}, manifest lists {}",
            manifest.inputs.len()
        )));
    }
    manifest
        .inputs
        .iter()
        .map(|spec| {
            names.iter().position(|n| *n == spec.name).ok_or_else(|| {
                EngineError::Interface(format!(
                    "no input named {:?} (model has {names:?})",
                    spec.name
                ))
            })
        })
        .collect()
}

/// An input's dimensions for tract: fixed ones as sizes, bounded ones as the symbol the
/// manifest names (the same symbol for inputs that share it).
pub fn input_dims(symbols: &SymbolScope, spec: &TensorSpec) -> Vec<TDim> {
    (0..spec.shape.len())
        .map(|axis| match spec.dim(axis) {
            Some(Dim::Range(r)) => symbols.sym(&r.symbol).into(),
            _ => TDim::Val(spec.shape[axis] as i64),
        })
        .collect()
}

fn input_names(model: &TypedModel) -> Result<Vec<String>, EngineError> {
    Ok(model
        .input_outlets()
        .map_err(load_err)?
        .iter()
        .map(|o| model.node(o.node).name.clone())
        .collect())
}

/// Checks each model input against its manifest spec (type, rank, fixed dimensions) and
/// returns the symbol of each dimension the manifest bounds.
fn input_symbols(
    manifest: &Manifest,
    model: &TypedModel,
    positions: &[usize],
) -> Result<Vec<Vec<Option<Symbol>>>, EngineError> {
    manifest
        .inputs
        .iter()
        .zip(positions)
        .map(|(spec, pos)| {
            let fact = model.input_fact(*pos).map_err(load_err)?;
            let mismatch = || {
                EngineError::Interface(format!(
                    "input {} is {:?} {:?}, manifest says {} {}",
                    spec.name,
                    fact.datum_type,
                    fact.shape,
                    spec.datatype,
                    spec.describe_shape()
                ))
            };
            if fact.datum_type.unquantized() != datum(spec.datatype)
                || fact.shape.rank() != spec.shape.len()
            {
                return Err(mismatch());
            }
            fact.shape
                .iter()
                .enumerate()
                .map(|(axis, dim)| match (dim, spec.dim(axis)) {
                    (TDim::Val(v), Some(Dim::Fixed(f))) if *v >= 0 && *v as u64 == f => Ok(None),
                    (TDim::Sym(s), Some(Dim::Range(_))) => Ok(Some(s.clone())),
                    _ => Err(mismatch()),
                })
                .collect()
        })
        .collect()
}

/// Checks the model's output count and types against the manifest.
fn check_output_types(manifest: &Manifest, model: &TypedModel) -> Result<(), EngineError> {
    let outputs = model.output_outlets().map_err(load_err)?.len();
    if outputs != manifest.outputs.len() {
        return Err(EngineError::Interface(format!(
            "model has {outputs} outputs, manifest lists {}",
            manifest.outputs.len()
        )));
    }
    for (i, spec) in manifest.outputs.iter().enumerate() {
        let fact = model.output_fact(i).map_err(load_err)?;
        if datatype_of(fact.datum_type) != Some(spec.datatype) {
            return Err(EngineError::Interface(format!(
                "output {} is {:?}, manifest says {}",
                spec.name, fact.datum_type, spec.datatype
            )));
        }
    }
    Ok(())
}

/// Checks a plan's output shapes at the declared input shapes against the manifest.
fn check_output_shapes(manifest: &Manifest, plan: &TypedRunnableModel) -> Result<(), EngineError> {
    let model = plan.model();
    for (i, spec) in manifest.outputs.iter().enumerate() {
        let fact = model.output_fact(i).map_err(load_err)?;
        let Some(shape) = fact.shape.as_concrete() else {
            // Data-dependent (a detector's box count): checked when it runs.
            continue;
        };
        let fits = shape.len() == spec.shape.len()
            && shape
                .iter()
                .enumerate()
                .all(|(axis, &d)| match spec.dim(axis) {
                    Some(Dim::Fixed(f)) => d as u64 == f,
                    Some(_) => true,
                    None => false,
                });
        if !fits {
            return Err(EngineError::Interface(format!(
                "output {} has shape {:?}, manifest says {}",
                spec.name,
                fact.shape,
                spec.describe_shape()
            )));
        }
    }
    Ok(())
}

/// Reads an NNEF tar; its inputs must have the manifest's types and dimensions.
fn read_nnef(
    manifest: &Manifest,
    reader: &mut dyn Read,
) -> Result<(TypedModel, Vec<usize>), EngineError> {
    let nnef = tract_nnef::nnef();
    #[cfg(feature = "onnx-ops")]
    let nnef = tract_onnx_opl::WithOnnx::with_onnx(nnef);
    let model = nnef.model_for_read(reader).map_err(load_err)?;
    let positions = input_positions(manifest, &input_names(&model)?)?;
    Ok((model, positions))
}

/// Reads an ONNX protobuf and types it for the manifest's input types and dimensions (each
/// bounded dimension a symbol of the manifest's name for it).
#[cfg(feature = "onnx")]
fn read_onnx(
    manifest: &Manifest,
    reader: &mut dyn Read,
) -> Result<(TypedModel, Vec<usize>), EngineError> {
    use tract_onnx::prelude::{InferenceFact, InferenceModelExt};
    let mut model = tract_onnx::onnx()
        .with_ignore_value_info(true)
        .model_for_read(reader)
        .map_err(load_err)?;
    let names: Vec<String> = model
        .input_outlets()
        .map_err(load_err)?
        .iter()
        .map(|o| model.node(o.node).name.clone())
        .collect();
    let positions = input_positions(manifest, &names)?;
    for (spec, pos) in manifest.inputs.iter().zip(&positions) {
        let dims = input_dims(&model.symbols, spec);
        model
            .set_input_fact(*pos, InferenceFact::dt_shape(datum(spec.datatype), dims))
            .map_err(load_err)?;
    }
    Ok((model.into_typed().map_err(load_err)?, positions))
}

/// Without the `onnx` feature the device carries no ONNX parser.
#[cfg(not(feature = "onnx"))]
fn read_onnx(
    _manifest: &Manifest,
    _reader: &mut dyn Read,
) -> Result<(TypedModel, Vec<usize>), EngineError> {
    Err(EngineError::Load(
        "this agent is built without ONNX support; publish the model as NNEF \
         (modelcast publish --format nnef)"
            .into(),
    ))
}

fn to_tract(spec: &TensorSpec, t: &HostTensor) -> Result<TValue, EngineError> {
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
    let shape = shape_usize(&t.shape)?;
    if modelcast_proto::manifest::elements(&t.shape) != Some(t.values.len()) {
        return Err(EngineError::BadInput(format!(
            "input {} has {} values for shape {:?}",
            spec.name,
            t.values.len(),
            t.shape
        )));
    }
    if spec.datatype == DataType::Bytes {
        let strings = t
            .values
            .strings()
            .into_iter()
            .enumerate()
            .map(|(i, b)| {
                String::from_utf8(b.to_vec()).map_err(|_| {
                    EngineError::BadInput(format!(
                        "input {} element {i} is not UTF-8 text, which the model's strings must be",
                        spec.name
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let array = tract_ndarray::ArrayD::from_shape_vec(shape, strings)
            .map_err(|e| EngineError::BadInput(format!("input {}: {e}", spec.name)))?;
        return Ok(Tensor::from(array).into());
    }
    // SAFETY: the type is a plain number or BOOL (whose bytes `Values::new` checked to be 0
    // or 1), so any whole number of elements' bytes is a valid tensor; tract checks that
    // the bytes fill the shape before it allocates.
    #[allow(unsafe_code)]
    let tensor = unsafe { Tensor::from_raw_dt(datum(spec.datatype), &shape, t.values.bytes()) }
        .map_err(|e| EngineError::BadInput(format!("{e:#}")))?;
    Ok(tensor.into())
}

fn from_tract(spec: &TensorSpec, t: &Tensor) -> Result<HostTensor, EngineError> {
    if datatype_of(t.datum_type()) != Some(spec.datatype) {
        return Err(EngineError::Run(format!(
            "output {} came out {:?}, manifest says {}",
            spec.name,
            t.datum_type(),
            spec.datatype
        )));
    }
    let as_i64;
    let t = if t.datum_type() == DatumType::TDim {
        as_i64 = t
            .cast_to::<i64>()
            .map_err(|e| EngineError::Run(format!("output {}: {e:#}", spec.name)))?;
        &*as_i64
    } else {
        t
    };
    let bytes = if spec.datatype == DataType::Bytes {
        let strings = t
            .to_plain_array_view::<String>()
            .map_err(|e| EngineError::Run(format!("output {}: {e:#}", spec.name)))?;
        // Row-major, whatever the view's strides.
        modelcast_proto::manifest::join_bytes(strings.iter().map(|s| s.as_bytes()))
            .map_err(|e| EngineError::Run(format!("output {}: {e}", spec.name)))?
    } else {
        t.as_plain_ram()
            .map(|_| t.as_bytes().to_vec())
            .ok_or_else(|| EngineError::Run(format!("output {} is not in memory", spec.name)))?
    };
    Ok(HostTensor {
        name: spec.name.clone(),
        shape: t.shape().iter().map(|d| *d as u64).collect(),
        values: Values::new(spec.datatype, bytes)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
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
