//! The inference engine: tract loads an artifact (NNEF, or ONNX when built with the `onnx`
//! feature), plans it for the manifest's concrete input shapes, optimizes it, checks it
//! against the manifest and its golden vectors, and runs requests. Loading is CPU-heavy and
//! blocking: callers run it off the serving path (`spawn_blocking`).
//!
//! NNEF is what publishers ship by default: the graph is already decluttered for tract and
//! loads without an ONNX parser, which keeps the device binary small.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use modelcast_proto::manifest::{DataType, Manifest, ModelFormat, TensorData, TensorSpec};
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

/// Warm-up runs before a swap when the manifest sets no latency budget: the first inferences
/// of a fresh plan are slow (allocation, caches), and they should not be live requests.
pub const DEFAULT_WARMUP_RUNS: u32 = 3;

/// Typed tensor values.
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    /// FP32.
    F32(Vec<f32>),
    /// INT64.
    I64(Vec<i64>),
    /// INT32.
    I32(Vec<i32>),
}

impl Values {
    /// Element count.
    pub fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::I64(v) => v.len(),
            Values::I32(v) => v.len(),
        }
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type.
    pub fn datatype(&self) -> DataType {
        match self {
            Values::F32(_) => DataType::Fp32,
            Values::I64(_) => DataType::Int64,
            Values::I32(_) => DataType::Int32,
        }
    }

    /// Converts JSON-ish numbers into `datatype`, rejecting values that do not fit.
    pub fn from_f64(datatype: DataType, values: &[f64]) -> Result<Self, EngineError> {
        let int = |v: f64| -> Result<i64, EngineError> {
            if v.fract() != 0.0 || !v.is_finite() || v.abs() > 9.007e15 {
                return Err(EngineError::BadInput(format!("{v} is not an integer")));
            }
            Ok(v as i64)
        };
        Ok(match datatype {
            DataType::Fp32 => Values::F32(values.iter().map(|v| *v as f32).collect()),
            DataType::Int64 => {
                Values::I64(values.iter().map(|v| int(*v)).collect::<Result<_, _>>()?)
            }
            DataType::Int32 => Values::I32(
                values
                    .iter()
                    .map(|v| {
                        int(*v).and_then(|i| {
                            i32::try_from(i)
                                .map_err(|_| EngineError::BadInput(format!("{i} overflows INT32")))
                        })
                    })
                    .collect::<Result<_, _>>()?,
            ),
        })
    }

    /// The values as f64, for JSON and comparisons.
    pub fn to_f64(&self) -> Vec<f64> {
        match self {
            Values::F32(v) => v.iter().map(|x| f64::from(*x)).collect(),
            Values::I64(v) => v.iter().map(|x| *x as f64).collect(),
            Values::I32(v) => v.iter().map(|x| f64::from(*x)).collect(),
        }
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
        let values = t
            .values()
            .map_err(|e| EngineError::BadInput(e.to_string()))?;
        Ok(HostTensor {
            name: t.name.clone(),
            shape: t.shape.clone(),
            values: Values::from_f64(t.datatype, &values)?,
        })
    }
}

fn datum(dt: DataType) -> DatumType {
    match dt {
        DataType::Fp32 => DatumType::F32,
        DataType::Int64 => DatumType::I64,
        DataType::Int32 => DatumType::I32,
    }
}

fn shape_usize(shape: &[u64]) -> Result<Vec<usize>, EngineError> {
    shape
        .iter()
        .map(|d| {
            usize::try_from(*d).map_err(|_| EngineError::BadInput("dimension too large".into()))
        })
        .collect()
}

/// A model loaded, optimized and checked, ready to serve from one slot.
pub struct LoadedModel {
    manifest: Manifest,
    slot: Slot,
    plan: Arc<TypedRunnableModel>,
    /// Position in the plan's inputs of each manifest input.
    input_positions: Vec<usize>,
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

impl LoadedModel {
    /// Reads a model in the manifest's format, plans it for the manifest's input shapes and
    /// optimizes it.
    pub fn load(
        manifest: &Manifest,
        slot: Slot,
        reader: &mut dyn Read,
    ) -> Result<Self, EngineError> {
        let (model, input_positions) = match manifest.model_format {
            ModelFormat::Nnef => read_nnef(manifest, reader)?,
            ModelFormat::Onnx => read_onnx(manifest, reader)?,
        };
        let typed = model.into_optimized().map_err(load_err)?;
        let outputs = typed.output_outlets().map_err(load_err)?.len();
        if outputs != manifest.outputs.len() {
            return Err(EngineError::Interface(format!(
                "model has {outputs} outputs, manifest lists {}",
                manifest.outputs.len()
            )));
        }
        for (i, spec) in manifest.outputs.iter().enumerate() {
            let fact = typed.output_fact(i).map_err(load_err)?;
            if fact.datum_type != datum(spec.datatype) {
                return Err(EngineError::Interface(format!(
                    "output {} is {:?}, manifest says {:?}",
                    spec.name, fact.datum_type, spec.datatype
                )));
            }
            let shape: Option<Vec<usize>> = fact.shape.as_concrete().map(|s| s.to_vec());
            if shape.as_deref() != Some(&shape_usize(&spec.shape)?[..]) {
                return Err(EngineError::Interface(format!(
                    "output {} has shape {:?}, manifest says {:?}",
                    spec.name, fact.shape, spec.shape
                )));
            }
        }
        let plan = typed.into_runnable().map_err(load_err)?;
        Ok(LoadedModel {
            manifest: manifest.clone(),
            slot,
            plan,
            input_positions,
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

    /// Runs one request. Inputs are matched by name and checked against the manifest.
    pub fn run(&self, inputs: &[HostTensor]) -> Result<Vec<HostTensor>, EngineError> {
        let mut ordered: Vec<Option<TValue>> = vec![None; self.input_positions.len()];
        for (spec, pos) in self.manifest.inputs.iter().zip(&self.input_positions) {
            let given = inputs
                .iter()
                .find(|t| t.name == spec.name)
                .ok_or_else(|| EngineError::BadInput(format!("missing input {:?}", spec.name)))?;
            ordered[*pos] = Some(to_tract(spec, given)?);
        }
        if inputs.len() != self.manifest.inputs.len() {
            return Err(EngineError::BadInput(format!(
                "{} inputs given, model takes {}",
                inputs.len(),
                self.manifest.inputs.len()
            )));
        }
        let values: TVec<TValue> = ordered
            .into_iter()
            .map(|v| v.expect("every position filled"))
            .collect();
        let outputs = self
            .plan
            .run(values)
            .map_err(|e| EngineError::Run(format!("{e:#}")))?;
        outputs
            .iter()
            .zip(&self.manifest.outputs)
            .map(|(t, spec)| from_tract(spec, t))
            .collect()
    }

    /// Runs every golden vector of the manifest; any difference beyond tolerance, or a
    /// NaN/Inf output, is an error.
    pub fn check_golden(&self) -> Result<(), EngineError> {
        for (index, golden) in self.manifest.golden.iter().enumerate() {
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

    /// Warm-up input: the first golden vector's, or zeros of every input's shape.
    fn warmup_inputs(&self) -> Result<Vec<HostTensor>, EngineError> {
        if let Some(golden) = self.manifest.golden.first() {
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
                    values: Values::from_f64(spec.datatype, &vec![0.0; n])?,
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
    pub fn warm_up(&self) -> Result<Duration, EngineError> {
        let budget = self.manifest.latency_budget;
        let runs = budget.map_or(DEFAULT_WARMUP_RUNS, |b| b.runs).max(1);
        let inputs = self.warmup_inputs()?;
        let mut took = Vec::with_capacity(runs as usize);
        for _ in 0..runs {
            let started = thread_cpu_time();
            self.run(&inputs)?;
            took.push(thread_cpu_time().saturating_sub(started));
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

/// CPU time the calling thread has used (`CLOCK_THREAD_CPUTIME_ID`).
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which lives across the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
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

/// Reads an NNEF tar; its inputs must already have the manifest's types and shapes.
fn read_nnef(
    manifest: &Manifest,
    reader: &mut dyn Read,
) -> Result<(TypedModel, Vec<usize>), EngineError> {
    let nnef = tract_nnef::nnef();
    #[cfg(feature = "onnx-ops")]
    let nnef = tract_onnx_opl::WithOnnx::with_onnx(nnef);
    let model = nnef.model_for_read(reader).map_err(load_err)?;
    let names: Vec<String> = model
        .input_outlets()
        .map_err(load_err)?
        .iter()
        .map(|o| model.node(o.node).name.clone())
        .collect();
    let positions = input_positions(manifest, &names)?;
    for (spec, pos) in manifest.inputs.iter().zip(&positions) {
        let fact = model.input_fact(*pos).map_err(load_err)?;
        let shape: Option<Vec<usize>> = fact.shape.as_concrete().map(|s| s.to_vec());
        if fact.datum_type != datum(spec.datatype)
            || shape.as_deref() != Some(&shape_usize(&spec.shape)?[..])
        {
            return Err(EngineError::Interface(format!(
                "input {} is {:?} {:?}, manifest says {:?} {:?}",
                spec.name, fact.datum_type, fact.shape, spec.datatype, spec.shape
            )));
        }
    }
    Ok((model, positions))
}

/// Reads an ONNX protobuf and types it for the manifest's input shapes.
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
        let shape = shape_usize(&spec.shape)?;
        model
            .set_input_fact(*pos, InferenceFact::dt_shape(datum(spec.datatype), shape))
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
    if t.shape != spec.shape {
        return Err(EngineError::BadInput(format!(
            "input {} has shape {:?}, model takes {:?}",
            spec.name, t.shape, spec.shape
        )));
    }
    if t.values.datatype() != spec.datatype {
        return Err(EngineError::BadInput(format!(
            "input {} is {:?}, model takes {:?}",
            spec.name,
            t.values.datatype(),
            spec.datatype
        )));
    }
    let shape = shape_usize(&t.shape)?;
    if spec.elements() != Some(t.values.len()) {
        return Err(EngineError::BadInput(format!(
            "input {} has {} values for shape {:?}",
            spec.name,
            t.values.len(),
            spec.shape
        )));
    }
    let tensor = match &t.values {
        Values::F32(v) => Tensor::from_shape(&shape, v),
        Values::I64(v) => Tensor::from_shape(&shape, v),
        Values::I32(v) => Tensor::from_shape(&shape, v),
    }
    .map_err(|e| EngineError::BadInput(e.to_string()))?;
    Ok(tensor.into())
}

fn from_tract(spec: &TensorSpec, t: &Tensor) -> Result<HostTensor, EngineError> {
    let run = |e: TractError| EngineError::Run(format!("{e:#}"));
    let values = match spec.datatype {
        DataType::Fp32 => Values::F32(
            t.to_plain_array_view::<f32>()
                .map_err(run)?
                .iter()
                .copied()
                .collect(),
        ),
        DataType::Int64 => Values::I64(
            t.to_plain_array_view::<i64>()
                .map_err(run)?
                .iter()
                .copied()
                .collect(),
        ),
        DataType::Int32 => Values::I32(
            t.to_plain_array_view::<i32>()
                .map_err(run)?
                .iter()
                .copied()
                .collect(),
        ),
    };
    Ok(HostTensor {
        name: spec.name.clone(),
        shape: t.shape().iter().map(|d| *d as u64).collect(),
        values,
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
            values: Values::F32(vec![0.5, -1.0, 2.0, 0.25]),
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
