//! ONNX files on the publisher's side: reading a model's interface (for its manifest),
//! converting it to tract's NNEF for devices, and generating small real models (for the demo,
//! tests and benchmarks).

use modelcast_proto::manifest::{DataType, TensorSpec};
use prost::Message;
use thiserror::Error;
use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType as PbType;

/// An ONNX file that cannot be published as is.
#[derive(Debug, Error)]
pub enum OnnxError {
    /// Not an ONNX protobuf.
    #[error("not an ONNX model: {0}")]
    Decode(String),
    /// The model has no graph or an unusable interface.
    #[error("unsupported model interface: {0}")]
    Interface(String),
    /// tract could not type, declutter or serialize the model.
    #[error("converting to NNEF: {0}")]
    Convert(String),
}

/// Converts an ONNX model to tract's NNEF (an uncompressed tar), typed for the concrete shapes
/// of `inputs` (in graph order) and decluttered: what devices load without an ONNX parser.
pub fn to_nnef(bytes: &[u8], inputs: &[TensorSpec]) -> Result<Vec<u8>, OnnxError> {
    use tract_onnx::prelude::*;
    let err = |e: TractError| OnnxError::Convert(format!("{e:#}"));
    let mut model = tract_onnx::onnx()
        .with_ignore_value_info(true)
        .model_for_read(&mut &bytes[..])
        .map_err(err)?;
    for (i, spec) in inputs.iter().enumerate() {
        let shape: Vec<usize> = spec.shape.iter().map(|d| *d as usize).collect();
        let datum = match spec.datatype {
            DataType::Fp32 => DatumType::F32,
            DataType::Int64 => DatumType::I64,
            DataType::Int32 => DatumType::I32,
        };
        model
            .set_input_fact(i, InferenceFact::dt_shape(datum, shape))
            .map_err(err)?;
    }
    let typed = model
        .into_typed()
        .map_err(err)?
        .into_decluttered()
        .map_err(err)?;
    tract_nnef::nnef()
        .with_onnx()
        .write_to_tar(&typed, Vec::new())
        .map_err(err)
}

/// A model's interface and provenance, as read from the file.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// Graph inputs (initializers excluded).
    pub inputs: Vec<TensorSpec>,
    /// Graph outputs.
    pub outputs: Vec<TensorSpec>,
    /// Default-domain opset version.
    pub opset: Option<i64>,
    /// Producer name and version.
    pub producer: String,
}

fn spec(value: &pb::ValueInfoProto) -> Result<TensorSpec, OnnxError> {
    let bad = |why: &str| OnnxError::Interface(format!("tensor {:?}: {why}", value.name));
    let Some(pb::type_proto::Value::TensorType(t)) =
        value.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return Err(bad("not a tensor"));
    };
    let datatype = match PbType::try_from(t.elem_type) {
        Ok(PbType::Float) => DataType::Fp32,
        Ok(PbType::Int64) => DataType::Int64,
        Ok(PbType::Int32) => DataType::Int32,
        other => return Err(bad(&format!("element type {other:?} is not supported yet"))),
    };
    let dims = t.shape.as_ref().ok_or_else(|| bad("no shape"))?;
    let shape = dims
        .dim
        .iter()
        .map(|d| match &d.value {
            Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) if *v > 0 => Ok(*v as u64),
            _ => Err(bad("symbolic dimension: publish needs concrete shapes")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TensorSpec {
        name: value.name.clone(),
        datatype,
        shape,
    })
}

/// Reads the interface of an ONNX model.
pub fn inspect(bytes: &[u8]) -> Result<ModelInfo, OnnxError> {
    let model = pb::ModelProto::decode(bytes).map_err(|e| OnnxError::Decode(e.to_string()))?;
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| OnnxError::Interface("no graph".into()))?;
    let initializers: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs = graph
        .input
        .iter()
        .filter(|i| !initializers.contains(&i.name.as_str()))
        .map(spec)
        .collect::<Result<Vec<_>, _>>()?;
    let outputs = graph
        .output
        .iter()
        .map(spec)
        .collect::<Result<Vec<_>, _>>()?;
    if inputs.is_empty() || outputs.is_empty() {
        return Err(OnnxError::Interface(
            "a model needs inputs and outputs".into(),
        ));
    }
    Ok(ModelInfo {
        inputs,
        outputs,
        opset: model
            .opset_import
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map(|o| o.version),
        producer: format!("{} {}", model.producer_name, model.producer_version)
            .trim()
            .to_string(),
    })
}

fn value_info(name: &str, dims: &[i64]) -> pb::ValueInfoProto {
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            denotation: String::new(),
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: PbType::Float as i32,
                shape: Some(pb::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| pb::tensor_shape_proto::Dimension {
                            denotation: String::new(),
                            value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(*d)),
                        })
                        .collect(),
                }),
            })),
        }),
        doc_string: String::new(),
    }
}

fn initializer(name: &str, dims: &[i64], values: &[f32]) -> pb::TensorProto {
    pb::TensorProto {
        dims: dims.to_vec(),
        data_type: PbType::Float as i32,
        name: name.into(),
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], output: &str) -> pb::NodeProto {
    pb::NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        name: output.into(),
        op_type: op.into(),
        ..Default::default()
    }
}

/// Inputs of the example model.
pub const EXAMPLE_INPUTS: usize = 4;
/// Classes the example model scores.
pub const EXAMPLE_CLASSES: usize = 3;

/// Generates a real ONNX classifier: `y = relu(x · W1 + b1) · W2`, with `x: [1, 4]` and
/// `y: [1, 3]`. Weights are a deterministic function of `version`, so every version answers
/// differently; `hidden` sets the width, and with it the file size (≈ 32 × hidden bytes).
pub fn example_model(version: u64, hidden: usize) -> Vec<u8> {
    let hidden = hidden.max(1);
    let w1: Vec<f32> = (0..EXAMPLE_INPUTS * hidden)
        .map(|i| weight(version, 1, i))
        .collect();
    let b1: Vec<f32> = (0..hidden).map(|i| 0.5 * weight(version, 2, i)).collect();
    let scale = 2.0 / (hidden as f32).sqrt();
    let w2: Vec<f32> = (0..hidden * EXAMPLE_CLASSES)
        .map(|i| scale * weight(version, 3, i))
        .collect();
    let h = hidden as i64;
    let graph = pb::GraphProto {
        name: format!("modelcast-example-v{version}"),
        node: vec![
            node("MatMul", &["x", "w1"], "xw1"),
            node("Add", &["xw1", "b1"], "h"),
            node("Relu", &["h"], "hr"),
            node("MatMul", &["hr", "w2"], "y"),
        ],
        initializer: vec![
            initializer("w1", &[EXAMPLE_INPUTS as i64, h], &w1),
            initializer("b1", &[h], &b1),
            initializer("w2", &[h, EXAMPLE_CLASSES as i64], &w2),
        ],
        input: vec![value_info("x", &[1, EXAMPLE_INPUTS as i64])],
        output: vec![value_info("y", &[1, EXAMPLE_CLASSES as i64])],
        ..Default::default()
    };
    model_proto(version, graph).encode_to_vec()
}

/// A deterministic pseudo-random weight in [-1, 1) for (version, tensor, index).
fn weight(version: u64, tensor: u64, index: usize) -> f32 {
    let mut x = (index as u64) ^ (version << 40) ^ (tensor << 56);
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// The hidden width that makes the two-layer example model about `bytes` long.
pub fn hidden_for_size(bytes: u64) -> usize {
    ((bytes / 32).max(8)) as usize
}

/// Width of the hidden layers of large example models.
const DEEP_WIDTH: usize = 1024;

/// An example model of about `bytes` (same interface as [`example_model`]). Up to 8 MiB it is
/// the two-layer model; beyond, a deep MLP of 1024-wide layers (`relu(h · Wᵢ + bᵢ)`), shaped
/// like real networks — square weight matrices — rather than one absurdly wide layer.
pub fn example_model_of_size(version: u64, bytes: u64) -> Vec<u8> {
    if bytes <= 8 * 1024 * 1024 {
        return example_model(version, hidden_for_size(bytes));
    }
    let w = DEEP_WIDTH;
    let layer_bytes = (4 * (w * w + w)) as u64;
    let layers = (bytes / layer_bytes).max(1) as usize;
    let mut nodes = Vec::new();
    let mut initializers = Vec::new();
    let mut layer = |input: &str, fan_in: usize, fan_out: usize, i: usize, relu: bool| {
        // He-style uniform bound keeps activations in range through many layers.
        let bound = (6.0 / fan_in as f32).sqrt();
        let weights: Vec<f32> = (0..fan_in * fan_out)
            .map(|j| bound * weight(version, 10 + i as u64, j))
            .collect();
        let bias: Vec<f32> = (0..fan_out)
            .map(|j| 0.1 * weight(version, 1000 + i as u64, j))
            .collect();
        let (wn, bn) = (format!("w{i}"), format!("b{i}"));
        initializers.push(initializer(&wn, &[fan_in as i64, fan_out as i64], &weights));
        initializers.push(initializer(&bn, &[fan_out as i64], &bias));
        let (mm, out) = (format!("mm{i}"), format!("h{i}"));
        nodes.push(node("MatMul", &[input, &wn], &mm));
        if relu {
            let pre = format!("pre{i}");
            nodes.push(node("Add", &[&mm, &bn], &pre));
            nodes.push(node("Relu", &[&pre], &out));
        } else {
            nodes.push(node("Add", &[&mm, &bn], "y"));
        }
        out
    };
    let mut h = layer("x", EXAMPLE_INPUTS, w, 0, true);
    for i in 1..=layers {
        h = layer(&h, w, w, i, true);
    }
    layer(&h, w, EXAMPLE_CLASSES, layers + 1, false);
    let graph = pb::GraphProto {
        name: format!("modelcast-example-deep-v{version}"),
        node: nodes,
        initializer: initializers,
        input: vec![value_info("x", &[1, EXAMPLE_INPUTS as i64])],
        output: vec![value_info("y", &[1, EXAMPLE_CLASSES as i64])],
        ..Default::default()
    };
    model_proto(version, graph).encode_to_vec()
}

fn model_proto(version: u64, graph: pb::GraphProto) -> pb::ModelProto {
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        producer_name: "modelcast".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        model_version: version as i64,
        graph: Some(graph),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_model_inspects() {
        let bytes = example_model(1, 16);
        let info = inspect(&bytes).unwrap();
        assert_eq!(info.inputs[0].name, "x");
        assert_eq!(info.inputs[0].shape, vec![1, 4]);
        assert_eq!(info.outputs[0].shape, vec![1, 3]);
        assert_eq!(info.opset, Some(13));
        assert_ne!(example_model(1, 16), example_model(2, 16));
        let big = example_model(1, hidden_for_size(1_000_000));
        assert!((900_000..1_100_000).contains(&big.len()), "{}", big.len());
        let deep = example_model_of_size(1, 20_000_000);
        assert!(
            (16_000_000..21_000_000).contains(&deep.len()),
            "{}",
            deep.len()
        );
        let info = inspect(&deep).unwrap();
        assert_eq!(info.outputs[0].shape, vec![1, 3]);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(inspect(b"\xff\xff\xff garbage").is_err());
        assert!(inspect(&[]).is_err());
    }
}
