//! ONNX files on the publisher's side: reading a model's interface as the file declares it
//! (types, fixed and symbolic dimensions, `metadata_props`, operators), making a model
//! self-contained (external data inlined, non-tensor outputs dropped), and generating small real
//! models (for the demo, tests and benchmarks). Conversion is `convert.rs`.

use modelcast_proto::manifest::DataType;
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
}

/// One dimension of a tensor as the ONNX file declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnnxDim {
    /// A size.
    Fixed(u64),
    /// A symbolic size: the file's `dim_param` (made an identifier), or a name made up for an
    /// unnamed one (`x_3` for axis 3 of input `x`).
    Symbol(String),
}

/// A tensor of the model's interface as the ONNX file declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnnxTensor {
    /// Name in the graph.
    pub name: String,
    /// Element type.
    pub datatype: DataType,
    /// Dimensions.
    pub dims: Vec<OnnxDim>,
}

/// A model's interface and provenance, as read from the file.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// Graph inputs (initializers excluded).
    pub inputs: Vec<OnnxTensor>,
    /// Graph outputs that are tensors.
    pub outputs: Vec<OnnxTensor>,
    /// Graph outputs that are not tensors (ONNX-ML `ZipMap` sequences of maps), with why.
    pub dropped_outputs: Vec<(String, NotServed)>,
    /// Default-domain opset version.
    pub opset: Option<i64>,
    /// Producer name and version.
    pub producer: String,
    /// The file's `metadata_props` (class names, character sets, ...).
    pub metadata_props: Vec<(String, String)>,
    /// Operator types the graph uses (main graph only), with their domain when not ONNX's.
    pub ops: std::collections::BTreeSet<String>,
}

/// A symbol name tract and NNEF accept: `[A-Za-z_][A-Za-z0-9_]*`. A name with no letter in
/// it (`?`, `-1`, which some exporters write for "unknown") names nothing: each such
/// dimension gets `fallback()`, a name of its own.
fn symbol_name(raw: &str, fallback: impl FnOnce() -> String) -> String {
    let mut s: String = raw
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if !s.chars().any(|c| c.is_ascii_alphabetic()) || s.len() > 64 {
        s = fallback();
    }
    if s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert(0, '_');
    }
    s
}

/// The KServe v2 type of an ONNX element type, if it has one here.
pub fn datatype_of(elem_type: i32) -> Option<DataType> {
    Some(match PbType::try_from(elem_type).ok()? {
        PbType::Bool => DataType::Bool,
        PbType::Uint8 => DataType::Uint8,
        PbType::Uint16 => DataType::Uint16,
        PbType::Uint32 => DataType::Uint32,
        PbType::Uint64 => DataType::Uint64,
        PbType::Int8 => DataType::Int8,
        PbType::Int16 => DataType::Int16,
        PbType::Int32 => DataType::Int32,
        PbType::Int64 => DataType::Int64,
        PbType::Float16 => DataType::Fp16,
        PbType::Float => DataType::Fp32,
        PbType::Double => DataType::Fp64,
        PbType::String => DataType::Bytes,
        _ => return None,
    })
}

/// Why a graph input or output is not a tensor modelcast serves.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NotServed {
    /// A sequence or a map (the ONNX-ML `ZipMap` output of a classifier, say).
    #[error("not a tensor (a sequence or a map: the ONNX-ML ZipMap output of a classifier, say)")]
    NotATensor,
    /// An element type without a KServe v2 equivalent (complex, bfloat16, float8, ...).
    #[error("element type {0} is not served (KServe v2's types are)")]
    ElementType(String),
    /// The file gives no shape.
    #[error("no shape")]
    NoShape,
}

/// The tensor of a graph input or output, or why it is not one modelcast serves.
fn tensor(value: &pb::ValueInfoProto) -> Result<OnnxTensor, NotServed> {
    let Some(pb::type_proto::Value::TensorType(t)) =
        value.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return Err(NotServed::NotATensor);
    };
    let datatype = datatype_of(t.elem_type).ok_or_else(|| {
        NotServed::ElementType(
            PbType::try_from(t.elem_type)
                .map(|t| t.as_str_name().to_string())
                .unwrap_or_else(|_| t.elem_type.to_string()),
        )
    })?;
    let dims = t.shape.as_ref().ok_or(NotServed::NoShape)?;
    let dims = dims
        .dim
        .iter()
        .enumerate()
        .map(|(axis, d)| {
            let made_up = || symbol_name(&format!("{}_{axis}", value.name), || format!("d_{axis}"));
            match &d.value {
                Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) if *v > 0 => {
                    OnnxDim::Fixed(*v as u64)
                }
                Some(pb::tensor_shape_proto::dimension::Value::DimParam(p)) if !p.is_empty() => {
                    OnnxDim::Symbol(symbol_name(p, made_up))
                }
                _ => OnnxDim::Symbol(made_up()),
            }
        })
        .collect();
    Ok(OnnxTensor {
        name: value.name.clone(),
        datatype,
        dims,
    })
}

/// Reads the interface of an ONNX model.
pub fn inspect(bytes: &[u8]) -> Result<ModelInfo, OnnxError> {
    let model = pb::ModelProto::decode(bytes).map_err(|e| OnnxError::Decode(e.to_string()))?;
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| OnnxError::Interface("no graph".into()))?;
    let initializers: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs = graph
        .input
        .iter()
        .filter(|i| !initializers.contains(i.name.as_str()))
        .map(|i| {
            tensor(i).map_err(|why| OnnxError::Interface(format!("input {:?}: {why}", i.name)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut outputs = Vec::new();
    let mut dropped_outputs = Vec::new();
    for o in &graph.output {
        match tensor(o) {
            Ok(t) => outputs.push(t),
            Err(why) => dropped_outputs.push((o.name.clone(), why)),
        }
    }
    if inputs.is_empty() {
        return Err(OnnxError::Interface("the model has no inputs".into()));
    }
    if outputs.is_empty() {
        let why: Vec<String> = dropped_outputs
            .iter()
            .map(|(n, w)| format!("output {n:?}: {w}"))
            .collect();
        return Err(OnnxError::Interface(format!(
            "the model has no tensor output ({})",
            why.join("; ")
        )));
    }
    let ops = graph
        .node
        .iter()
        .map(|n| {
            if n.domain.is_empty() || n.domain == "ai.onnx" {
                n.op_type.clone()
            } else {
                format!("{}:{}", n.domain, n.op_type)
            }
        })
        .collect();
    Ok(ModelInfo {
        inputs,
        outputs,
        dropped_outputs,
        opset: model
            .opset_import
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map(|o| o.version),
        producer: format!("{} {}", model.producer_name, model.producer_version)
            .trim()
            .to_string(),
        metadata_props: model
            .metadata_props
            .iter()
            .map(|p| (p.key.clone(), p.value.clone()))
            .collect(),
        ops,
    })
}

/// Largest ONNX file modelcast reads, external data included (protobuf's own limit is 2 GiB).
pub const MAX_ONNX_BYTES: u64 = 2 << 30;

/// Makes a model self-contained: tensors whose weights live in side files (ONNX external data,
/// `location` relative to `dir`) get them inline, graph outputs that are not tensors
/// (ONNX-ML `ZipMap`) are dropped with the nodes only they needed, and classifiers labelled
/// with strings are given to tract in a form it types (see [`STRING_LABELLED`]). Returns the
/// bytes unchanged when there is nothing to do.
pub fn self_contained(bytes: &[u8], dir: &std::path::Path) -> Result<Vec<u8>, OnnxError> {
    let mut model = pb::ModelProto::decode(bytes).map_err(|e| OnnxError::Decode(e.to_string()))?;
    let Some(graph) = model.graph.as_mut() else {
        return Err(OnnxError::Interface("no graph".into()));
    };
    let mut changed = false;
    let mut total = bytes.len() as u64;
    for t in &mut graph.initializer {
        if t.data_location != Some(pb::tensor_proto::DataLocation::External as i32) {
            continue;
        }
        let field = |k: &str| {
            t.external_data
                .iter()
                .find(|e| e.key == k)
                .map(|e| e.value.clone())
        };
        let bad = |why: String| OnnxError::Interface(format!("tensor {:?}: {why}", t.name));
        let location =
            field("location").ok_or_else(|| bad("external data without a location".into()))?;
        let rel = std::path::Path::new(&location);
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(bad(format!(
                "external data location {location:?} leaves the model's folder"
            )));
        }
        let number = |k: &str| -> Result<Option<u64>, OnnxError> {
            field(k)
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| bad(format!("external data {k} {v:?}")))
                })
                .transpose()
        };
        let offset = number("offset")?.unwrap_or(0);
        let path = dir.join(rel);
        let file_len = std::fs::metadata(&path)
            .map_err(|e| bad(format!("{}: {e}", path.display())))?
            .len();
        let length = number("length")?.unwrap_or(file_len.saturating_sub(offset));
        if offset.checked_add(length).is_none_or(|end| end > file_len) {
            return Err(bad(format!(
                "external data runs past the end of {}",
                path.display()
            )));
        }
        total += length;
        if total > MAX_ONNX_BYTES {
            return Err(bad(format!("the model is over {MAX_ONNX_BYTES} bytes")));
        }
        use std::io::{Read, Seek};
        let mut f =
            std::fs::File::open(&path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
        f.seek(std::io::SeekFrom::Start(offset))
            .map_err(|e| bad(e.to_string()))?;
        let mut raw = vec![0; length as usize];
        f.read_exact(&mut raw).map_err(|e| bad(e.to_string()))?;
        t.raw_data = raw;
        t.external_data.clear();
        t.data_location = None;
        changed = true;
    }
    changed |= label_strings_by_lookup(graph);
    let before = graph.output.len();
    graph.output.retain(|o| {
        matches!(
            o.r#type.as_ref().and_then(|t| t.value.as_ref()),
            Some(pb::type_proto::Value::TensorType(_))
        )
    });
    if graph.output.len() != before {
        prune(graph);
        changed = true;
    }
    Ok(if changed {
        model.encode_to_vec()
    } else {
        bytes.to_vec()
    })
}

/// The classifiers of ONNX-ML whose label output tract 0.23 cannot type when the labels are
/// strings (it looks up the winner with a default of "zero", which strings lack), with the
/// attribute that holds their integer labels instead.
const STRING_LABELLED: [(&str, &str); 2] = [
    ("LinearClassifier", "classlabels_ints"),
    ("TreeEnsembleClassifier", "classlabels_int64s"),
];

/// Rewrites each ONNX-ML classifier labelled with strings (what scikit-learn exports for a
/// model trained on class names) into the same classifier labelled 0..n, followed by a
/// `CategoryMapper` from those indices to the strings: the same answers, in operators tract
/// types. Returns whether it changed anything.
fn label_strings_by_lookup(graph: &mut pb::GraphProto) -> bool {
    let mut changed = false;
    let mut nodes = Vec::with_capacity(graph.node.len());
    for mut node in std::mem::take(&mut graph.node) {
        let Some((_, ints)) = STRING_LABELLED
            .iter()
            .find(|(op, _)| node.domain == "ai.onnx.ml" && node.op_type == *op)
        else {
            nodes.push(node);
            continue;
        };
        let at = node
            .attribute
            .iter()
            .position(|a| a.name == "classlabels_strings");
        let label = node.output.first().filter(|l| !l.is_empty()).cloned();
        let (Some(at), Some(label)) = (at, label) else {
            nodes.push(node);
            continue;
        };
        let mut strings = node.attribute.remove(at);
        let n = strings.strings.len() as i64;
        node.attribute.push(pb::AttributeProto {
            name: ints.to_string(),
            r#type: pb::attribute_proto::AttributeType::Ints as i32,
            ints: (0..n).collect(),
            ..Default::default()
        });
        let index = format!("{label}__class_index");
        node.output[0] = index.clone();
        strings.name = "cats_strings".into();
        // The lookup right after its classifier: the nodes stay in topological order.
        nodes.push(node);
        changed = true;
        nodes.push(pb::NodeProto {
            input: vec![index],
            output: vec![label.clone()],
            name: format!("{label}__class_name"),
            op_type: "CategoryMapper".into(),
            domain: "ai.onnx.ml".into(),
            attribute: vec![
                strings,
                pb::AttributeProto {
                    name: "cats_int64s".into(),
                    r#type: pb::attribute_proto::AttributeType::Ints as i32,
                    ints: (0..n).collect(),
                    ..Default::default()
                },
                pb::AttributeProto {
                    name: "default_string".into(),
                    r#type: pb::attribute_proto::AttributeType::String as i32,
                    s: Vec::new(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        });
    }
    graph.node = nodes;
    changed
}

/// Drops the nodes no graph output depends on.
fn prune(graph: &mut pb::GraphProto) {
    let mut needed: std::collections::HashSet<String> =
        graph.output.iter().map(|o| o.name.clone()).collect();
    let mut keep = vec![false; graph.node.len()];
    // Nodes are in topological order: walk back once.
    for (i, node) in graph.node.iter().enumerate().rev() {
        if node.output.iter().any(|o| needed.contains(o)) {
            keep[i] = true;
            needed.extend(node.input.iter().filter(|s| !s.is_empty()).cloned());
            // Subgraphs (If, Loop) may read outer values by name.
            for a in &node.attribute {
                for g in a.g.iter().chain(&a.graphs) {
                    for n in &g.node {
                        needed.extend(n.input.iter().cloned());
                    }
                }
            }
        }
    }
    let mut k = keep.into_iter();
    graph.node.retain(|_| k.next().unwrap_or(true));
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
    deep_model(version, bytes, version)
}

/// `model` as another release of its exporter would write it: the same graph and weights,
/// `producer_version` changed (every tensor after it moves by the difference in length).
pub fn restamped(model: &[u8], producer_version: &str) -> Result<Vec<u8>, OnnxError> {
    let mut model = pb::ModelProto::decode(model).map_err(|e| OnnxError::Decode(e.to_string()))?;
    model.producer_version = producer_version.into();
    Ok(model.encode_to_vec())
}

/// The deep example model of about `bytes` (over 8 MiB) at `version` with only its last layer
/// retrained, as at `head`: every other tensor is `version`'s, byte for byte.
pub fn example_model_fine_tuned(version: u64, bytes: u64, head: u64) -> Vec<u8> {
    deep_model(version, bytes, head)
}

/// A deep MLP of about `bytes`: weights of `version`, the last layer's of `head`.
fn deep_model(version: u64, bytes: u64, head: u64) -> Vec<u8> {
    let w = DEEP_WIDTH;
    let layer_bytes = (4 * (w * w + w)) as u64;
    let layers = (bytes / layer_bytes).max(1) as usize;
    let mut nodes = Vec::new();
    let mut initializers = Vec::new();
    let mut layer = |input: &str, fan_in: usize, fan_out: usize, i: usize, relu: bool| {
        let version = if relu { version } else { head };
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
    fn string_labelled_classifiers_become_index_labels_and_a_lookup() {
        let classifier = pb::NodeProto {
            input: vec!["x".into()],
            output: vec!["label".into(), "scores".into()],
            op_type: "LinearClassifier".into(),
            domain: "ai.onnx.ml".into(),
            attribute: vec![pb::AttributeProto {
                name: "classlabels_strings".into(),
                r#type: pb::attribute_proto::AttributeType::Strings as i32,
                strings: vec![b"cat".to_vec(), b"dog".to_vec()],
                ..Default::default()
            }],
            ..Default::default()
        };
        let reader = node("Identity", &["label"], "out");
        let mut graph = pb::GraphProto {
            node: vec![classifier, reader],
            ..Default::default()
        };
        assert!(label_strings_by_lookup(&mut graph));
        let ops: Vec<&str> = graph.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["LinearClassifier", "CategoryMapper", "Identity"]);
        let (c, lookup) = (&graph.node[0], &graph.node[1]);
        assert_eq!(c.output[0], "label__class_index");
        assert_eq!(c.attribute[0].name, "classlabels_ints");
        assert_eq!(c.attribute[0].ints, [0, 1]);
        assert_eq!(lookup.input, ["label__class_index"]);
        assert_eq!(lookup.output, ["label"]);
        let strings = lookup.attribute.iter().find(|a| a.name == "cats_strings");
        assert_eq!(strings.unwrap().strings, [b"cat".to_vec(), b"dog".to_vec()]);
        // Integer labels are left as they are.
        assert!(!label_strings_by_lookup(&mut graph));
    }

    #[test]
    fn example_model_inspects() {
        let bytes = example_model(1, 16);
        let info = inspect(&bytes).unwrap();
        assert_eq!(info.inputs[0].name, "x");
        assert_eq!(
            info.inputs[0].dims,
            vec![OnnxDim::Fixed(1), OnnxDim::Fixed(4)]
        );
        assert_eq!(
            info.outputs[0].dims,
            vec![OnnxDim::Fixed(1), OnnxDim::Fixed(3)]
        );
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
        assert_eq!(
            info.outputs[0].dims,
            vec![OnnxDim::Fixed(1), OnnxDim::Fixed(3)]
        );
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(inspect(b"\xff\xff\xff garbage").is_err());
        assert!(inspect(&[]).is_err());
    }
}
