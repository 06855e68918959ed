//! tract, the engine every agent carries: it reads an artifact (NNEF, or ONNX when built with
//! the `onnx` feature), plans it for the manifest's concrete input shapes (one plan per shape
//! for inputs with bounded dimensions, least recently used dropped first), optimizes it,
//! checks its interface against the manifest, and runs requests on the calling thread.

use std::io::Read;
use std::sync::Arc;

use modelcast_proto::manifest::{DataType, Dim, Manifest, ModelFormat, TensorSpec};
use tract_nnef::prelude::*;

use super::{EngineError, HostTensor, PlanUse, Values};

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

/// How tract computes a model's FP16 operations (`[engine] fp16`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fp16 {
    /// In FP32: the model's FP16 weights and operations widened when it loads, its FP16
    /// inputs and outputs cast at the edges, so clients still send and receive FP16. No
    /// build of the agent carries tract's FP16 kernels (x86_64 has none; the aarch64 builds
    /// leave them out for size), and without them tract emulates each FP16 operation: the
    /// corpus' FP16 classifier ran ~1,400x slower than onnxruntime that way. Costs twice
    /// the FP16 weights' memory.
    #[default]
    F32,
    /// As the model says: half the weight memory, but emulated operation by operation.
    F16,
}

/// What [`TractModel::load`] is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TractOptions {
    /// Optimized plans kept for a model whose inputs have ranges (at least one).
    pub plan_cache: usize,
    /// How FP16 operations compute.
    pub fp16: Fp16,
}

impl Default for TractOptions {
    fn default() -> Self {
        TractOptions {
            plan_cache: super::DEFAULT_PLAN_CACHE,
            fp16: Fp16::default(),
        }
    }
}

/// A model as tract runs it.
pub struct TractModel {
    plans: Plans,
    /// Position in the plan's inputs of each manifest input.
    input_positions: Vec<usize>,
    /// FP16 computed as FP32: FP16 inputs and outputs are cast at the edges.
    widened: bool,
}

fn load_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Load(format!("{e:#}"))
}

fn optimize(
    model: TypedModel,
    shapes: &[Vec<u64>],
) -> Result<Arc<TypedRunnableModel>, EngineError> {
    channels_last_for_batches(model, shapes)
        .into_optimized()
        .map_err(load_err)?
        .into_runnable()
        .map_err(load_err)
}

/// Convolutions run channel-last (tract's `conv_nhwc` transform) when an image input's
/// batch (the first of its four dimensions) is above 1: tract's depthwise convolutions on channel-first data
/// slow down more than linearly with the batch (a MobileNet-like classifier of the corpus at
/// batch 2: 33.9 ms against 8.3 ms at batch 1; 0.53x that channel-last), while at batch 1
/// channel-last measured 0.95-1.10x (`bench-tract`), so it is left as it is there. A model
/// the transform fails on is planned as it is.
fn channels_last_for_batches(model: TypedModel, shapes: &[Vec<u64>]) -> TypedModel {
    // Image batches: rank-4 inputs (N, C, H, W) with N above 1.
    if !shapes.iter().any(|s| s.len() == 4 && s[0] > 1) {
        return model;
    }
    let Ok(Some(nhwc)) = tract_nnef::tract_core::transform::get_transform("conv_nhwc") else {
        return model;
    };
    let mut channels_last = model.clone();
    match channels_last.transform(&*nhwc) {
        Ok(()) => channels_last,
        Err(e) => {
            tracing::debug!(error = %format!("{e:#}"), "convolutions left channel-first");
            model
        }
    }
}

/// The instruction sets tract leaves out unless `TRACT_CPU_ISA` in the environment says
/// otherwise: its Intel AMX kernels. On a Xeon with AMX (x86_64, Sapphire Rapids and later)
/// the agent died of SIGSEGV inside `avx512amx_mmm_i32_8x8` while serving a UINT8
/// QLinearConv model (the corpus' orientation_qlinear, 2 crashes in 7 runs; a core dump
/// showed the fault in the kernel, then in Rust's signal handler on its alternate stack,
/// which AMX's 8 KiB of tile state in a signal frame overflows). AVX-512 VNNI and the rest
/// are untouched. x86_64 only: tract refuses another architecture's names.
#[cfg(target_arch = "x86_64")]
pub const ISA_DEFAULT: &str = "-amx-int8,-amx-bf16";

/// Sets tract's process-wide defaults ([`ISA_DEFAULT`] on x86_64) before tract probes the
/// CPU: called before the first model is read (and by the publisher, which runs tract too).
/// A value in the environment (`TRACT_CPU_ISA`) still wins: this is the layer below it.
pub fn set_defaults() {
    #[cfg(target_arch = "x86_64")]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            if let Err(e) =
                tract_nnef::tract_core::knobs::set_config_global("TRACT_CPU_ISA", ISA_DEFAULT)
            {
                tracing::warn!(error = %e, "tract's instruction sets left as probed");
            }
        });
    }
}

impl TractModel {
    /// Reads a model in the manifest's format, plans it for the manifest's declared input
    /// shapes and optimizes it, keeping up to `options.plan_cache` plans (at least one) for
    /// models whose inputs have symbolic dimensions.
    pub fn load(
        manifest: &Manifest,
        reader: &mut dyn Read,
        options: TractOptions,
    ) -> Result<Self, EngineError> {
        set_defaults();
        let plan_cache = options.plan_cache;
        let (mut model, input_positions) = match manifest.model_format {
            ModelFormat::Nnef => read_nnef(manifest, reader)?,
            ModelFormat::Onnx => read_onnx(manifest, reader)?,
        };
        let symbols = input_symbols(manifest, &model, &input_positions)?;
        check_output_types(manifest, &model)?;
        let widened = options.fp16 == Fp16::F32 && computes_fp16(&model);
        if widened {
            model
                .transform(
                    &tract_nnef::tract_core::floats::FloatPrecisionTranslator::new(
                        DatumType::F16,
                        DatumType::F32,
                    ),
                )
                .map_err(load_err)?;
        }
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
            let declared: Vec<Vec<u64>> = manifest.inputs.iter().map(|i| i.shape.clone()).collect();
            let plan = optimize(model, &declared)?;
            check_output_shapes(manifest, &plan)?;
            Plans::Fixed(plan)
        };
        if let Plans::PerShape(cache) = &plans {
            // The declared shapes must plan, and the model must answer them as declared.
            let declared: Vec<Vec<u64>> = manifest.inputs.iter().map(|i| i.shape.clone()).collect();
            let (plan, _) = Self::plan_for(manifest, cache, &declared)?;
            check_output_shapes(manifest, &plan)?;
        }
        Ok(TractModel {
            plans,
            input_positions,
            widened,
        })
    }

    /// Whether FP16 computes as FP32 in this model (see [`Fp16::F32`]).
    pub fn widened(&self) -> bool {
        self.widened
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
        manifest: &Manifest,
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
        for ((spec, syms), shape) in manifest.inputs.iter().zip(&cache.symbols).zip(shapes) {
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
        let concrete = cache.template.set_symbols(&values).map_err(|e| {
            EngineError::BadInput(format!("the model cannot run shapes {shapes:?}: {e:#}"))
        })?;
        let plan = channels_last_for_batches(concrete, shapes)
            .into_optimized()
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

    /// Runs one request (as many inputs as the manifest lists), saying how it found its plan.
    pub fn run(
        &self,
        manifest: &Manifest,
        inputs: &[HostTensor],
    ) -> Result<(Vec<HostTensor>, PlanUse), EngineError> {
        let mut ordered: Vec<Option<TValue>> = vec![None; self.input_positions.len()];
        let mut shapes = Vec::with_capacity(inputs.len());
        for (spec, pos) in manifest.inputs.iter().zip(&self.input_positions) {
            let given = inputs
                .iter()
                .find(|t| t.name == spec.name)
                .ok_or_else(|| EngineError::BadInput(format!("missing input {:?}", spec.name)))?;
            let mut value = to_tract(spec, given)?;
            if self.widened && spec.datatype == DataType::Fp16 {
                value = cast(value, DatumType::F32)?;
            }
            ordered[*pos] = Some(value);
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
            Plans::PerShape(cache) => Self::plan_for(manifest, cache, &shapes)?,
        };
        let values: TVec<TValue> = ordered
            .into_iter()
            .map(|v| v.expect("every position filled"))
            .collect();
        let outputs = plan
            .run(values)
            .map_err(|e| EngineError::Run(format!("{e:#}")))?;
        let outputs = outputs
            .into_iter()
            .zip(&manifest.outputs)
            .map(|(t, spec)| {
                let t = if self.widened && spec.datatype == DataType::Fp16 {
                    cast(t, DatumType::F16)?
                } else {
                    t
                };
                from_tract(spec, &t)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((outputs, used))
    }
}

/// Whether any of the model's values is FP16 (its inputs, weights or intermediate results).
fn computes_fp16(model: &TypedModel) -> bool {
    model
        .nodes
        .iter()
        .flat_map(|node| &node.outputs)
        .any(|output| output.fact.datum_type == DatumType::F16)
}

/// A value as another floating-point type (FP16 at the edges of a widened model).
fn cast(value: TValue, to: DatumType) -> Result<TValue, EngineError> {
    let tensor = value
        .cast_to_dt(to)
        .map_err(|e| EngineError::Run(format!("casting to {to:?}: {e:#}")))?
        .into_owned();
    Ok(tensor.into())
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
    super::check_input(spec, t)?;
    let shape = shape_usize(&t.shape)?;
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
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn tract_leaves_out_its_amx_kernels() {
        super::set_defaults();
        if std::env::var_os("TRACT_CPU_ISA").is_some() {
            return; // The operator's value wins; nothing of ours to check.
        }
        let isa = tract_linalg::isa::native();
        for amx in [
            tract_linalg::isa::Isa::X86_64AmxInt8,
            tract_linalg::isa::Isa::X86_64AmxBf16,
        ] {
            assert!(!isa.has(amx), "{isa:?}");
        }
    }
}
