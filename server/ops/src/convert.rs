//! Conversion on the publisher's side: an ONNX model, typed by tract for the manifest's input
//! specs (symbolic dimensions kept as symbols), becomes the artifact devices load — tract's
//! NNEF (decluttered, tensor names kept, reproducible bytes) or the ONNX file itself — and the
//! artifact is proved before anything is signed: loaded by the device's own engine, run on a
//! deterministic input at the declared shapes and, for NNEF, compared with the ONNX path.
//!
//! What NNEF cannot express, or expresses wrongly, is reported with the reason, so that the
//! publisher can fall back to shipping the ONNX file (see [`Choice::Auto`]).

use modelcast_agent::engine::{HostTensor, LoadedModel, Values};
use modelcast_proto::manifest::{
    DataType, Dim, Manifest, ModelFormat, TensorData, TensorSpec, DEFAULT_CHUNK_SIZE,
};
use modelcast_proto::report::Slot;
use thiserror::Error;
use tract_onnx::prelude::*;

/// Why a model cannot be converted or proved.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConvertError {
    /// tract cannot read or type the ONNX model for these shapes: no device could run it.
    #[error("tract cannot type the model: {0}")]
    Type(String),
    /// tract types the model only with every input dimension fixed.
    #[error("tract cannot plan the model with symbolic dimensions ({reason}); it does with fixed shapes: {hint}")]
    FixedOnly {
        /// Why the symbolic typing failed.
        reason: String,
        /// The `--input-shape` flags that fix the shapes at the declared sizes.
        hint: String,
    },
    /// NNEF cannot express the model (an operator without an NNEF form, say).
    #[error("NNEF cannot express the model: {0}")]
    Nnef(String),
    /// The artifact does not load or run as a device would load and run it.
    #[error("the {format} artifact does not run as devices would run it: {reason}")]
    Load {
        /// Which artifact.
        format: ModelFormat,
        /// What failed.
        reason: String,
    },
    /// The NNEF artifact answers differently from the ONNX model.
    #[error("the NNEF artifact answers differently from the ONNX model: {0}")]
    Mismatch(String),
}

/// Which artifact to ship.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Choice {
    /// NNEF where it converts and proves out, else the ONNX file (saying why).
    #[default]
    Auto,
    /// NNEF, or fail.
    Nnef,
    /// The ONNX file.
    Onnx,
}

/// A format name that is not `auto`, `nnef` or `onnx`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown format {0:?} (auto, nnef or onnx)")]
pub struct UnknownChoice(pub String);

impl std::str::FromStr for Choice {
    type Err = UnknownChoice;

    fn from_str(s: &str) -> Result<Self, UnknownChoice> {
        match s {
            "auto" => Ok(Choice::Auto),
            "nnef" => Ok(Choice::Nnef),
            "onnx" => Ok(Choice::Onnx),
            other => Err(UnknownChoice(other.into())),
        }
    }
}

/// Largest absolute difference allowed between NNEF and ONNX outputs, relative to the
/// largest magnitude of the output (both run in tract: only rewriting differs).
pub const NNEF_TOLERANCE: f64 = 1e-4;

fn type_err(e: TractError) -> ConvertError {
    ConvertError::Type(format!("{e:#}"))
}

/// tract's type for a manifest type.
fn datum(dt: DataType) -> DatumType {
    modelcast_agent::engine::datum(dt)
}

/// The ONNX model typed for `inputs` (graph order): fixed dimensions as sizes, ranges as the
/// model's symbols.
pub fn typed(onnx: &[u8], inputs: &[TensorSpec]) -> Result<TypedModel, ConvertError> {
    let mut model = tract_onnx::onnx()
        .with_ignore_value_info(true)
        .model_for_read(&mut &onnx[..])
        .map_err(type_err)?;
    let outlets = model.input_outlets().map_err(type_err)?.to_vec();
    if outlets.len() != inputs.len() {
        return Err(ConvertError::Type(format!(
            "tract sees {} inputs, the file declares {}",
            outlets.len(),
            inputs.len()
        )));
    }
    for (i, spec) in inputs.iter().enumerate() {
        let dims = modelcast_agent::engine::input_dims(&model.symbols, spec);
        model
            .set_input_fact(i, InferenceFact::dt_shape(datum(spec.datatype), dims))
            .map_err(type_err)?;
    }
    model.into_typed().map_err(type_err)
}

/// The inputs with every dimension fixed at its declared size.
pub fn fixed_at_declared(inputs: &[TensorSpec]) -> Vec<TensorSpec> {
    inputs
        .iter()
        .map(|i| TensorSpec::fixed(&i.name, i.datatype, i.shape.clone()))
        .collect()
}

/// The output specs of a typed model: tract's types, each dimension fixed or symbolic (its
/// expression, `N*25`); the declared sizes are filled in by the reference run.
pub fn output_specs(typed: &TypedModel, names: &[String]) -> Result<Vec<TensorSpec>, ConvertError> {
    let outlets = typed.output_outlets().map_err(type_err)?;
    if outlets.len() != names.len() {
        return Err(ConvertError::Type(format!(
            "tract sees {} outputs, the file declares {} tensor outputs",
            outlets.len(),
            names.len()
        )));
    }
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let fact = typed.output_fact(i).map_err(type_err)?;
            let datatype =
                modelcast_agent::engine::datatype_of(fact.datum_type).ok_or_else(|| {
                    ConvertError::Type(format!(
                        "output {name:?} is {:?}, which modelcast does not serve",
                        fact.datum_type
                    ))
                })?;
            let dims: Vec<Dim> = fact
                .shape
                .iter()
                .map(|d| match d.to_i64() {
                    Ok(v) if v >= 0 => Dim::Fixed(v as u64),
                    _ => {
                        let mut s = d.to_string();
                        s.truncate(64);
                        Dim::Symbolic(s)
                    }
                })
                .collect();
            let shape = dims
                .iter()
                .map(|d| match d {
                    Dim::Fixed(f) => *f,
                    _ => 0,
                })
                .collect();
            let dynamic = dims.iter().any(|d| !matches!(d, Dim::Fixed(_)));
            Ok(TensorSpec {
                name: name.clone(),
                datatype,
                shape,
                dims: if dynamic { dims } else { Vec::new() },
            })
        })
        .collect()
}

/// The NNEF tar of a typed model: decluttered, the ONNX file's own properties left out (its
/// `metadata_props` travel in the manifest instead: free text that NNEF's property syntax
/// cannot always carry back), tensor names kept with NNEF's extended identifiers, and the same
/// bytes for the same model (fixed timestamps).
pub fn to_nnef(typed: &TypedModel) -> Result<Vec<u8>, ConvertError> {
    let nnef_err = |e: TractError| ConvertError::Nnef(format!("{e:#}"));
    let mut model = typed.clone().into_decluttered().map_err(nnef_err)?;
    model.properties.retain(|k, _| !k.starts_with("onnx."));
    let mut nnef = tract_nnef::nnef().with_onnx();
    nnef.allow_extended_identifier_syntax(true);
    nnef.write_to_tar_with_config(&model, Vec::new(), false, true)
        .map_err(nnef_err)
}

/// A deterministic input of `spec`'s declared shape: floats in [-1, 1), bytes over their
/// whole range, other integers 0 (indices and lengths must stay valid), BOOL true, BYTES
/// one-digit numerals (text a model may parse as a number or look up as a word).
pub fn reference_input(spec: &TensorSpec, seed: u64) -> Result<HostTensor, ConvertError> {
    let n = spec.elements().filter(|n| *n <= 1 << 28).ok_or_else(|| {
        ConvertError::Type(format!(
            "input {} at {:?} is too large",
            spec.name, spec.shape
        ))
    })?;
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x >> 40
    };
    let unit = |r: u64| (r as f64 / (1u64 << 24) as f64) * 2.0 - 1.0;
    let mut bytes = Vec::with_capacity(n * spec.datatype.size().unwrap_or(5));
    for _ in 0..n {
        match spec.datatype {
            DataType::Fp16 => {
                bytes.extend_from_slice(&half::f16::from_f64(unit(next())).to_le_bytes())
            }
            DataType::Fp32 => bytes.extend_from_slice(&(unit(next()) as f32).to_le_bytes()),
            DataType::Fp64 => bytes.extend_from_slice(&unit(next()).to_le_bytes()),
            DataType::Uint8 | DataType::Int8 => bytes.push(next() as u8),
            DataType::Bool => bytes.push(1),
            DataType::Bytes => {
                bytes.extend_from_slice(&1u32.to_le_bytes());
                bytes.push(b'0' + (next() % 10) as u8);
            }
            other => bytes.extend(std::iter::repeat_n(0, other.size().unwrap_or(0))),
        }
    }
    Ok(HostTensor {
        name: spec.name.clone(),
        shape: spec.shape.clone(),
        values: Values::new(spec.datatype, bytes).map_err(|e| ConvertError::Type(e.to_string()))?,
    })
}

/// A draft manifest for `artifact`, enough for the device engine to load it.
pub fn draft(
    name: &str,
    artifact: &[u8],
    format: ModelFormat,
    inputs: &[TensorSpec],
    outputs: &[TensorSpec],
) -> Manifest {
    Manifest {
        format: modelcast_proto::FORMAT_VERSION,
        name: name.into(),
        version: 1,
        model_format: format,
        size: artifact.len() as u64,
        sha256: modelcast_proto::sha256_hex(artifact),
        chunk_size: DEFAULT_CHUNK_SIZE,
        segments: vec![],
        chunks: modelcast_proto::manifest::chunk_digests(artifact, DEFAULT_CHUNK_SIZE),
        inputs: inputs.to_vec(),
        outputs: outputs.to_vec(),
        golden: vec![],
        golden_file: None,
        expires: "2099-01-01T00:00:00Z".into(),
        metadata: Default::default(),
        probation: None,
        latency_budget: None,
        memory_bytes: None,
        fallback_to: None,
        forms: Vec::new(),
        encryption: None,
        tolerance: Default::default(),
    }
}

/// Loads `artifact` with the device's engine and runs `inputs` through it.
pub fn run_as_device(
    manifest: &Manifest,
    artifact: &[u8],
    inputs: &[HostTensor],
) -> Result<Vec<HostTensor>, ConvertError> {
    let fail = |reason: String| ConvertError::Load {
        format: manifest.model_format,
        reason,
    };
    let model = LoadedModel::load(manifest, Slot::A, &mut &artifact[..])
        .map_err(|e| fail(e.to_string()))?;
    model.run(inputs).map_err(|e| fail(e.to_string()))
}

/// Compares two runs' outputs: same shapes, and values within [`NNEF_TOLERANCE`] of the
/// larger magnitude (exact for integers). Returns the largest absolute difference.
pub fn compare(a: &[HostTensor], b: &[HostTensor]) -> Result<f64, ConvertError> {
    let mut worst = 0f64;
    for (x, y) in a.iter().zip(b) {
        if x.shape != y.shape || x.values.datatype() != y.values.datatype() {
            return Err(ConvertError::Mismatch(format!(
                "output {} is {} {:?} from NNEF and {} {:?} from ONNX",
                x.name,
                x.values.datatype(),
                x.shape,
                y.values.datatype(),
                y.shape
            )));
        }
        if x.values.datatype() == DataType::Bytes {
            if x.values.bytes() != y.values.bytes() {
                return Err(ConvertError::Mismatch(format!(
                    "output {}'s strings differ between NNEF and ONNX",
                    x.name
                )));
            }
            continue;
        }
        let (xv, yv) = (x.values.to_f64(), y.values.to_f64());
        let scale = yv
            .iter()
            .fold(1f64, |m, v| if v.is_finite() { m.max(v.abs()) } else { m });
        let tolerance = if x.values.datatype().is_float() {
            NNEF_TOLERANCE * scale
        } else {
            0.0
        };
        for (i, (p, q)) in xv.iter().zip(&yv).enumerate() {
            let diff = (p - q).abs();
            let same_nan = p.is_nan() && q.is_nan();
            if !same_nan && (diff.is_nan() || diff > tolerance) {
                return Err(ConvertError::Mismatch(format!(
                    "output {}[{i}] is {p} from NNEF and {q} from ONNX",
                    x.name
                )));
            }
            if diff.is_finite() {
                worst = worst.max(diff);
            }
        }
    }
    Ok(worst)
}

/// What conversion made and proved.
#[derive(Debug, Clone)]
pub struct Converted {
    /// What devices download.
    pub artifact: Vec<u8>,
    /// Its format.
    pub format: ModelFormat,
    /// Why it is ONNX when NNEF was preferred.
    pub fallback_reason: Option<String>,
    /// Input specs.
    pub inputs: Vec<TensorSpec>,
    /// Output specs, declared shapes from the reference run.
    pub outputs: Vec<TensorSpec>,
    /// The reference input and the artifact's answer to it (the golden vector's content).
    pub reference: (Vec<HostTensor>, Vec<HostTensor>),
    /// Largest difference between NNEF and ONNX outputs, when NNEF was proved.
    pub nnef_max_diff: Option<f64>,
    /// What loading the artifact on the device engine and answering the reference input
    /// took: this process's peak resident growth, bytes ([`modelcast_agent::memory::peak_growth`]).
    pub memory_bytes: Option<u64>,
}

/// An NNEF artifact proved on the device engine: its bytes, its answer to the reference
/// input, its largest difference from the ONNX path's, and the memory it took.
type ProvedNnef = (Vec<u8>, Vec<HostTensor>, f64, Option<u64>);

/// Converts and proves: types the ONNX model for `inputs`, makes the artifact `choice` asks
/// for, loads it with the device engine and runs the reference input through it (and for
/// NNEF, through the ONNX path too, and compares).
pub fn convert(
    name: &str,
    onnx: &[u8],
    inputs: &[TensorSpec],
    output_names: &[String],
    choice: Choice,
    seed: u64,
) -> Result<Converted, ConvertError> {
    // tract runs here as on the devices: the same kernels.
    modelcast_agent::engine::tract::set_defaults();
    let typed = match typed(onnx, inputs) {
        Ok(t) => t,
        Err(ConvertError::Type(reason)) if inputs.iter().any(TensorSpec::is_dynamic) => {
            let fixed = fixed_at_declared(inputs);
            typed(onnx, &fixed).map_err(|_| ConvertError::Type(reason.clone()))?;
            let hint: Vec<String> = fixed
                .iter()
                .map(|i| {
                    let dims: Vec<String> = i.shape.iter().map(u64::to_string).collect();
                    format!("--input-shape {}={}", i.name, dims.join(","))
                })
                .collect();
            return Err(ConvertError::FixedOnly {
                reason,
                hint: hint.join(" "),
            });
        }
        Err(e) => return Err(e),
    };
    let outputs = output_specs(&typed, output_names)?;
    let reference: Vec<HostTensor> = inputs
        .iter()
        .enumerate()
        .map(|(i, spec)| reference_input(spec, seed + i as u64))
        .collect::<Result<_, _>>()?;
    let onnx_answer = |outputs: &[TensorSpec]| {
        let manifest = draft(name, onnx, ModelFormat::Onnx, inputs, outputs);
        let (answer, memory) =
            modelcast_agent::memory::peak_growth(|| run_as_device(&manifest, onnx, &reference));
        answer.map(|a| (a, memory))
    };
    let with_shapes = |answer: &[HostTensor]| -> Vec<TensorSpec> {
        outputs
            .iter()
            .zip(answer)
            .map(|(spec, got)| TensorSpec {
                shape: got.shape.clone(),
                ..spec.clone()
            })
            .collect()
    };
    let nnef_attempt = || -> Result<ProvedNnef, ConvertError> {
        let artifact = to_nnef(&typed)?;
        let manifest = draft(name, &artifact, ModelFormat::Nnef, inputs, &outputs);
        let (answer, memory) = modelcast_agent::memory::peak_growth(|| {
            run_as_device(&manifest, &artifact, &reference)
        });
        let answer = answer?;
        let (expected, _) = onnx_answer(&outputs)?;
        let diff = compare(&answer, &expected)?;
        Ok((artifact, answer, diff, memory))
    };
    match choice {
        Choice::Onnx => {
            let (answer, memory_bytes) = onnx_answer(&outputs)?;
            Ok(Converted {
                artifact: onnx.to_vec(),
                format: ModelFormat::Onnx,
                fallback_reason: None,
                inputs: inputs.to_vec(),
                outputs: with_shapes(&answer),
                reference: (reference, answer),
                nnef_max_diff: None,
                memory_bytes,
            })
        }
        Choice::Nnef | Choice::Auto => match nnef_attempt() {
            Ok((artifact, answer, diff, memory_bytes)) => Ok(Converted {
                artifact,
                format: ModelFormat::Nnef,
                fallback_reason: None,
                inputs: inputs.to_vec(),
                outputs: with_shapes(&answer),
                reference: (reference, answer),
                nnef_max_diff: Some(diff),
                memory_bytes,
            }),
            Err(e) if choice == Choice::Nnef => Err(e),
            Err(why) => {
                let (answer, memory_bytes) = onnx_answer(&outputs)?;
                Ok(Converted {
                    artifact: onnx.to_vec(),
                    format: ModelFormat::Onnx,
                    fallback_reason: Some(why.to_string()),
                    inputs: inputs.to_vec(),
                    outputs: with_shapes(&answer),
                    reference: (reference, answer),
                    nnef_max_diff: None,
                    memory_bytes,
                })
            }
        },
    }
}

/// Packs host tensors as manifest tensor data.
pub fn tensor_data(tensors: &[HostTensor]) -> Vec<TensorData> {
    tensors
        .iter()
        .map(|t| TensorData {
            name: t.name.clone(),
            datatype: t.values.datatype(),
            shape: t.shape.clone(),
            data: hex::encode(t.values.bytes()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::{example_model, inspect};
    use crate::shapes;

    fn specs(onnx: &[u8]) -> (Vec<TensorSpec>, Vec<String>) {
        let info = inspect(onnx).unwrap();
        let inputs = shapes::resolve(&info.inputs, &[]).unwrap();
        (
            inputs,
            info.outputs.iter().map(|o| o.name.clone()).collect(),
        )
    }

    #[test]
    fn nnef_is_reproducible_and_proved() {
        let onnx = example_model(3, 32);
        let (inputs, outputs) = specs(&onnx);
        let a = convert("m", &onnx, &inputs, &outputs, Choice::Auto, 1).unwrap();
        let b = convert("m", &onnx, &inputs, &outputs, Choice::Auto, 1).unwrap();
        assert_eq!(a.format, ModelFormat::Nnef);
        assert_eq!(a.artifact, b.artifact, "same ONNX, same NNEF bytes");
        assert!(a.nnef_max_diff.unwrap() <= 1e-5);
        assert_eq!(a.outputs[0].shape, vec![1, 3]);
        let o = convert("m", &onnx, &inputs, &outputs, Choice::Onnx, 1).unwrap();
        assert_eq!(o.artifact, onnx);
        compare(&a.reference.1, &o.reference.1).unwrap();
    }

    #[test]
    fn comparison_catches_differences() {
        let t = |v: &[f32]| HostTensor {
            name: "y".into(),
            shape: vec![v.len() as u64],
            values: Values::from_f32(v),
        };
        assert!(compare(&[t(&[1.0, 2.0])], &[t(&[1.0, 2.0001])]).is_ok());
        assert!(compare(&[t(&[1.0, 2.0])], &[t(&[1.0, 2.1])]).is_err());
        assert!(compare(&[t(&[1.0])], &[t(&[1.0, 2.0])]).is_err());
    }
}
