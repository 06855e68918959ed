//! ONNX Runtime, for agents built with the `ort` feature and configured with
//! `[engine] backend = "onnxruntime"`: ONNX artifacts run there, on the first execution
//! provider of the configured preference (`tensorrt`, `cuda`, `cpu`) that registers on this
//! device and loads the model; one that is missing (the library was built without it, the
//! device has no GPU) is skipped for the next, and the CPU always works. The library
//! (`onnxruntime_library`) is loaded once, at the first model, by the `ort` crate: nothing of
//! ONNX Runtime is linked into the agent, so the ARM cross-builds are as they were.

use std::io::Read;
use std::sync::{Mutex, OnceLock};

use modelcast_proto::manifest::{DataType, Manifest, TensorSpec};
use ort::ep::{self, ExecutionProviderDispatch};
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};
use tracing::{info, warn};

use super::{EngineError, HostTensor, PlanUse, Values};
use crate::config::{EngineConfig, Provider};

/// The library, loaded once per process (ONNX Runtime allows one environment).
static RUNTIME: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

fn environment(cfg: &EngineConfig) -> Result<&'static ort::environment::Environment, EngineError> {
    RUNTIME
        .get_or_init(|| {
            let lib = cfg
                .onnxruntime_library
                .as_ref()
                .ok_or("engine.onnxruntime_library is not set")?;
            let env = ort::init_from(lib)
                .map_err(|e| format!("loading {}: {e}", lib.display()))?
                .with_name("modelcast")
                .build()
                .map_err(|e| format!("starting ONNX Runtime from {}: {e}", lib.display()))?;
            info!(library = %lib.display(), "ONNX Runtime loaded");
            Ok(env)
        })
        .as_ref()
        .map_err(|e| EngineError::Load(format!("ONNX Runtime: {e}")))
}

fn dispatch(p: Provider) -> ExecutionProviderDispatch {
    match p {
        Provider::Tensorrt => ep::TensorRT::default().build(),
        Provider::Cuda => ep::CUDA::default().build(),
        Provider::Cpu => ep::CPU::default().build(),
    }
    .error_on_failure()
}

fn provider_name(p: Provider) -> &'static str {
    match p {
        Provider::Tensorrt => "onnxruntime/tensorrt",
        Provider::Cuda => "onnxruntime/cuda",
        Provider::Cpu => "onnxruntime/cpu",
    }
}

/// A model as ONNX Runtime runs it.
pub struct OrtModel {
    /// Running needs the session mutably: one request at a time per model.
    session: Mutex<Session>,
    name: &'static str,
}

impl OrtModel {
    /// Loads an ONNX artifact on the first provider of `cfg.providers` (then the CPU) that
    /// takes it, and checks its interface against the manifest.
    pub fn load(
        manifest: &Manifest,
        reader: &mut dyn Read,
        cfg: &EngineConfig,
    ) -> Result<Self, EngineError> {
        let env = environment(cfg)?;
        let mut bytes = Vec::new();
        reader
            .take(manifest.size.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|e| EngineError::Load(e.to_string()))?;
        if bytes.len() as u64 != manifest.size {
            return Err(EngineError::Load(format!(
                "the artifact has {} bytes, its manifest says {}",
                bytes.len(),
                manifest.size
            )));
        }
        let mut tried = Vec::new();
        let preference = cfg.providers.iter().copied().chain([Provider::Cpu]);
        for provider in preference {
            if tried.iter().any(|(p, _)| *p == provider) {
                continue;
            }
            let session = Session::builder(env)
                .map_err(|e| e.to_string())
                .and_then(|b| {
                    b.with_execution_providers([dispatch(provider)])
                        .map_err(|e| e.to_string())
                })
                .and_then(|b| {
                    b.with_intra_threads(cfg.threads.max(1))
                        .map_err(|e| e.to_string())
                })
                .and_then(|mut b| b.commit_from_memory(&bytes).map_err(|e| e.to_string()));
            match session {
                Ok(session) => {
                    check_interface(manifest, &session)?;
                    if !tried.is_empty() {
                        warn!(model = %manifest.name, skipped = ?tried, provider = provider_name(provider), "execution providers skipped");
                    }
                    return Ok(OrtModel {
                        session: Mutex::new(session),
                        name: provider_name(provider),
                    });
                }
                Err(e) => tried.push((provider, e)),
            }
        }
        Err(EngineError::Load(format!(
            "ONNX Runtime could not load the model on any provider: {tried:?}"
        )))
    }

    /// `onnxruntime/<provider>`.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Runs one request.
    pub fn run(
        &self,
        manifest: &Manifest,
        inputs: &[HostTensor],
    ) -> Result<(Vec<HostTensor>, PlanUse), EngineError> {
        let mut values: Vec<(String, SessionInputValue<'static>)> = Vec::new();
        for spec in &manifest.inputs {
            let given = inputs
                .iter()
                .find(|t| t.name == spec.name)
                .ok_or_else(|| EngineError::BadInput(format!("missing input {:?}", spec.name)))?;
            values.push((spec.name.clone(), to_ort(spec, given)?.into()));
        }
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let outputs = session
            .run(values)
            .map_err(|e| EngineError::Run(e.to_string()))?;
        let answers = manifest
            .outputs
            .iter()
            .map(|spec| {
                let value = outputs.get(&spec.name).ok_or_else(|| {
                    EngineError::Run(format!("no output {:?} came out", spec.name))
                })?;
                from_ort(spec, value)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((
            answers,
            PlanUse {
                built: false,
                cached: 1,
            },
        ))
    }
}

/// ONNX Runtime's element type of a manifest type (none for BYTES: such models run on tract).
fn element(dt: DataType) -> Option<TensorElementType> {
    Some(match dt {
        DataType::Bool => TensorElementType::Bool,
        DataType::Uint8 => TensorElementType::Uint8,
        DataType::Uint16 => TensorElementType::Uint16,
        DataType::Uint32 => TensorElementType::Uint32,
        DataType::Uint64 => TensorElementType::Uint64,
        DataType::Int8 => TensorElementType::Int8,
        DataType::Int16 => TensorElementType::Int16,
        DataType::Int32 => TensorElementType::Int32,
        DataType::Int64 => TensorElementType::Int64,
        DataType::Fp16 => TensorElementType::Float16,
        DataType::Fp32 => TensorElementType::Float32,
        DataType::Fp64 => TensorElementType::Float64,
        DataType::Bytes => return None,
    })
}

/// Every manifest input and output is one of the session's, of the same element type.
fn check_interface(manifest: &Manifest, session: &Session) -> Result<(), EngineError> {
    let sides = [
        ("input", &manifest.inputs, session.inputs()),
        ("output", &manifest.outputs, session.outputs()),
    ];
    for (side, specs, outlets) in sides {
        if specs.len() != outlets.len() {
            return Err(EngineError::Interface(format!(
                "the model has {} {side}s, the manifest lists {}",
                outlets.len(),
                specs.len()
            )));
        }
        for spec in specs {
            let outlet = outlets
                .iter()
                .find(|o| o.name() == spec.name)
                .ok_or_else(|| {
                    EngineError::Interface(format!("no {side} named {:?}", spec.name))
                })?;
            let found = match outlet.dtype() {
                ValueType::Tensor { ty, .. } => Some(*ty),
                _ => None,
            };
            if found.is_none() || found != element(spec.datatype) {
                return Err(EngineError::Interface(format!(
                    "{side} {} is {:?}, the manifest says {}",
                    spec.name,
                    outlet.dtype(),
                    spec.datatype
                )));
            }
        }
    }
    Ok(())
}

fn to_ort(spec: &TensorSpec, t: &HostTensor) -> Result<DynValue, EngineError> {
    super::check_input(spec, t)?;
    let shape: Vec<i64> = t
        .shape
        .iter()
        .map(|&d| i64::try_from(d).map_err(|_| EngineError::BadInput("dimension too large".into())))
        .collect::<Result<_, _>>()?;
    let bytes = t.values.bytes();
    macro_rules! tensor {
        ($ty:ty) => {{
            let v: Vec<$ty> = bytes
                .chunks_exact(std::mem::size_of::<$ty>())
                .map(|c| <$ty>::from_le_bytes(c.try_into().expect("a whole element")))
                .collect();
            Tensor::from_array((shape, v)).map(|t| t.into_dyn())
        }};
    }
    let value = match spec.datatype {
        DataType::Bool => {
            Tensor::from_array((shape, bytes.iter().map(|b| *b != 0).collect::<Vec<_>>()))
                .map(|t| t.into_dyn())
        }
        DataType::Uint8 => tensor!(u8),
        DataType::Uint16 => tensor!(u16),
        DataType::Uint32 => tensor!(u32),
        DataType::Uint64 => tensor!(u64),
        DataType::Int8 => tensor!(i8),
        DataType::Int16 => tensor!(i16),
        DataType::Int32 => tensor!(i32),
        DataType::Int64 => tensor!(i64),
        DataType::Fp16 => tensor!(half::f16),
        DataType::Fp32 => tensor!(f32),
        DataType::Fp64 => tensor!(f64),
        DataType::Bytes => {
            return Err(EngineError::BadInput(
                "BYTES tensors run on tract, not ONNX Runtime".into(),
            ))
        }
    };
    value.map_err(|e| EngineError::BadInput(format!("input {}: {e}", spec.name)))
}

fn from_ort(spec: &TensorSpec, v: &DynValue) -> Result<HostTensor, EngineError> {
    let err = |e: ort::Error| EngineError::Run(format!("output {}: {e}", spec.name));
    macro_rules! bytes {
        ($ty:ty) => {{
            let (shape, data) = v.try_extract_tensor::<$ty>().map_err(err)?;
            let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
            (shape.to_vec(), bytes)
        }};
    }
    let (shape, bytes) = match spec.datatype {
        DataType::Bool => {
            let (shape, data) = v.try_extract_tensor::<bool>().map_err(err)?;
            (shape.to_vec(), data.iter().map(|b| u8::from(*b)).collect())
        }
        DataType::Uint8 => bytes!(u8),
        DataType::Uint16 => bytes!(u16),
        DataType::Uint32 => bytes!(u32),
        DataType::Uint64 => bytes!(u64),
        DataType::Int8 => bytes!(i8),
        DataType::Int16 => bytes!(i16),
        DataType::Int32 => bytes!(i32),
        DataType::Int64 => bytes!(i64),
        DataType::Fp16 => bytes!(half::f16),
        DataType::Fp32 => bytes!(f32),
        DataType::Fp64 => bytes!(f64),
        DataType::Bytes => {
            return Err(EngineError::Run(
                "BYTES tensors run on tract, not ONNX Runtime".into(),
            ))
        }
    };
    Ok(HostTensor {
        name: spec.name.clone(),
        shape: shape.iter().map(|&d| d.max(0) as u64).collect(),
        values: Values::new(spec.datatype, bytes)?,
    })
}
