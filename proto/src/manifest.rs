//! The model manifest: what modelcast keeps in a TUF target's `custom.modelcast` field.
//!
//! A manifest names the model and its monotonic version, the chunking of the artifact with the
//! SHA-256 of every chunk, the input and output tensors, optional golden vectors, an expiry and
//! free-form registry metadata. Canonical JSON cannot carry floats, so tensors travel as
//! hex of their little-endian bytes and tolerances as decimal strings.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::DecodeError;
pub use crate::layout::{
    check_segments, chunk_digests, segmented_chunk_digests, segments_at, spans, Layout,
    LayoutError, SegmentError, Span, Spans,
};
use crate::metadata::TargetFile;

/// Default chunk size: 256 KiB, inside AWS IoT's 128 B–128 KB spirit but fewer round trips.
pub const DEFAULT_CHUNK_SIZE: u32 = 256 * 1024;
/// Largest chunk size accepted from a manifest.
pub const MAX_CHUNK_SIZE: u32 = 4 * 1024 * 1024;
/// Largest artifact accepted (8 GiB).
pub const MAX_ARTIFACT_BYTES: u64 = 8 << 30;
/// Largest golden file (golden vectors kept beside the artifact, see [`Manifest::golden_file`]):
/// a batch of full-HD FP32 frames, hex-encoded.
pub const MAX_GOLDEN_FILE_BYTES: u64 = 256 << 20;

/// Element types, named as the Open Inference Protocol (KServe v2) names them. Every type
/// here travels as little-endian bytes (BOOL: one byte, 0 or 1; FP16: IEEE 754 half), and
/// BYTES as KServe v2's binary form of it: each element its length as a little-endian u32,
/// then its bytes (see [`split_bytes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DataType {
    /// Boolean, one byte (0 or 1).
    #[serde(rename = "BOOL")]
    Bool,
    /// 8-bit unsigned integer.
    #[serde(rename = "UINT8")]
    Uint8,
    /// 16-bit unsigned integer.
    #[serde(rename = "UINT16")]
    Uint16,
    /// 32-bit unsigned integer.
    #[serde(rename = "UINT32")]
    Uint32,
    /// 64-bit unsigned integer.
    #[serde(rename = "UINT64")]
    Uint64,
    /// 8-bit signed integer.
    #[serde(rename = "INT8")]
    Int8,
    /// 16-bit signed integer.
    #[serde(rename = "INT16")]
    Int16,
    /// 32-bit signed integer.
    #[serde(rename = "INT32")]
    Int32,
    /// 64-bit signed integer.
    #[serde(rename = "INT64")]
    Int64,
    /// 16-bit float (IEEE 754 half precision).
    #[serde(rename = "FP16")]
    Fp16,
    /// 32-bit float.
    #[serde(rename = "FP32")]
    Fp32,
    /// 64-bit float.
    #[serde(rename = "FP64")]
    Fp64,
    /// Byte strings of any length (text, where a model takes or gives strings).
    #[serde(rename = "BYTES")]
    Bytes,
}

impl DataType {
    /// Every type, in KServe v2's order.
    pub const ALL: [DataType; 13] = [
        DataType::Bool,
        DataType::Uint8,
        DataType::Uint16,
        DataType::Uint32,
        DataType::Uint64,
        DataType::Int8,
        DataType::Int16,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp16,
        DataType::Fp32,
        DataType::Fp64,
        DataType::Bytes,
    ];

    /// Bytes per element; `None` for BYTES, whose elements have lengths of their own.
    pub fn size(self) -> Option<usize> {
        match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => Some(1),
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 => Some(2),
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => Some(4),
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => Some(8),
            DataType::Bytes => None,
        }
    }

    /// The KServe v2 name (`FP32`, `UINT8`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    /// Whether a float type.
    pub fn is_float(self) -> bool {
        matches!(self, DataType::Fp16 | DataType::Fp32 | DataType::Fp64)
    }

    /// Decodes one little-endian element (exactly [`DataType::size`] bytes) as f64: exact for
    /// every type but 64-bit integers beyond 2^53. BYTES has no number: NaN.
    pub fn decode_f64(self, b: &[u8]) -> f64 {
        fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
            let mut a = [0u8; N];
            a.copy_from_slice(&b[..N]);
            a
        }
        match self {
            DataType::Bool => f64::from(u8::from(b[0] != 0)),
            DataType::Uint8 => f64::from(b[0]),
            DataType::Int8 => f64::from(b[0] as i8),
            DataType::Uint16 => f64::from(u16::from_le_bytes(arr(b))),
            DataType::Int16 => f64::from(i16::from_le_bytes(arr(b))),
            DataType::Fp16 => f64::from(half::f16::from_bits(u16::from_le_bytes(arr(b))).to_f32()),
            DataType::Uint32 => f64::from(u32::from_le_bytes(arr(b))),
            DataType::Int32 => f64::from(i32::from_le_bytes(arr(b))),
            DataType::Fp32 => f64::from(f32::from_le_bytes(arr(b))),
            DataType::Uint64 => u64::from_le_bytes(arr(b)) as f64,
            DataType::Int64 => i64::from_le_bytes(arr(b)) as f64,
            DataType::Fp64 => f64::from_le_bytes(arr(b)),
            DataType::Bytes => f64::NAN,
        }
    }
}

/// The elements of a BYTES tensor in KServe v2's binary form (each element's length as a
/// little-endian u32, then its bytes), checked to be exactly that.
pub fn split_bytes(data: &[u8]) -> Result<Vec<&[u8]>, DecodeError> {
    let bad = |reason: String| DecodeError::Invalid {
        what: "BYTES tensor",
        reason,
    };
    let mut elements = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            return Err(bad(format!(
                "{} bytes left where an element's 4-byte length should be",
                rest.len()
            )));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if len > tail.len() {
            return Err(bad(format!(
                "element {} is {len} bytes long, {} remain",
                elements.len(),
                tail.len()
            )));
        }
        let (element, tail) = tail.split_at(len);
        elements.push(element);
        rest = tail;
    }
    Ok(elements)
}

/// BYTES elements in KServe v2's binary form (see [`split_bytes`]). An element longer than its
/// u32 length prefix can say is an error.
pub fn join_bytes<'a>(
    elements: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::new();
    for e in elements {
        let len = u32::try_from(e.len()).map_err(|_| DecodeError::Invalid {
            what: "BYTES tensor",
            reason: format!("an element of {} bytes is too long", e.len()),
        })?;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(e);
    }
    Ok(out)
}

impl std::fmt::Display for DataType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DataType {
    type Err = DecodeError;

    fn from_str(s: &str) -> Result<Self, DecodeError> {
        DataType::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| DecodeError::Invalid {
                what: "datatype",
                reason: format!("{s:?} is not a KServe v2 type"),
            })
    }
}

/// A request's tensor whose shape an input does not accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("input {input} has shape {shape:?}, the model takes {accepted}")]
pub struct ShapeMismatch {
    /// The input.
    pub input: String,
    /// The shape given.
    pub shape: Vec<u64>,
    /// What the input accepts, as [`TensorSpec::describe_shape`] writes it.
    pub accepted: String,
}

/// Largest size of one dimension a manifest may allow.
pub const MAX_DIM: u64 = 1 << 24;

/// One dimension of a tensor of a model's interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    /// Exactly this size.
    Fixed(u64),
    /// Any size in a range (inputs): a symbolic dimension of the model, bounded by the
    /// publisher.
    Range(DimRange),
    /// Whatever the model computes (outputs), named as the model names it (`N`, `N*25`).
    Symbolic(String),
}

/// A bounded symbolic dimension of an input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DimRange {
    /// Smallest size accepted.
    pub min: u64,
    /// Largest size accepted.
    pub max: u64,
    /// The model's name for this dimension; inputs that share a name must agree on its size.
    pub symbol: String,
}

/// A named tensor's type and shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// Tensor name in the ONNX graph.
    pub name: String,
    /// Element type.
    pub datatype: DataType,
    /// The concrete shape golden vectors, warm-up and the latency budget use; for a model
    /// without symbolic dimensions, the only shape it takes.
    pub shape: Vec<u64>,
    /// Each dimension as the model declares it, where any is symbolic (empty: exactly
    /// `shape`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dims: Vec<Dim>,
}

impl TensorSpec {
    /// A tensor of exactly `shape`.
    pub fn fixed(name: &str, datatype: DataType, shape: Vec<u64>) -> Self {
        TensorSpec {
            name: name.into(),
            datatype,
            shape,
            dims: Vec::new(),
        }
    }

    /// Number of elements of the declared shape.
    pub fn elements(&self) -> Option<usize> {
        elements(&self.shape)
    }

    /// Dimension `axis` as declared.
    pub fn dim(&self, axis: usize) -> Option<Dim> {
        match self.dims.get(axis) {
            Some(d) => Some(d.clone()),
            None if self.dims.is_empty() => self.shape.get(axis).map(|d| Dim::Fixed(*d)),
            None => None,
        }
    }

    /// Whether some dimension is not fixed.
    pub fn is_dynamic(&self) -> bool {
        self.dims.iter().any(|d| !matches!(d, Dim::Fixed(_)))
    }

    /// The shape as KServe v2 model metadata gives it: `-1` where a dimension varies.
    pub fn metadata_shape(&self) -> Vec<i64> {
        (0..self.shape.len())
            .map(|axis| match self.dim(axis) {
                Some(Dim::Fixed(d)) => d as i64,
                _ => -1,
            })
            .collect()
    }

    /// Checks a request's shape against this input's dimensions.
    pub fn accepts(&self, shape: &[u64]) -> Result<(), ShapeMismatch> {
        let fits = shape.len() == self.shape.len()
            && shape
                .iter()
                .enumerate()
                .all(|(axis, &size)| match self.dim(axis) {
                    Some(Dim::Fixed(d)) => size == d,
                    Some(Dim::Range(r)) => (r.min..=r.max).contains(&size),
                    Some(Dim::Symbolic(_)) | None => false,
                });
        if fits {
            Ok(())
        } else {
            Err(ShapeMismatch {
                input: self.name.clone(),
                shape: shape.to_vec(),
                accepted: self.describe_shape(),
            })
        }
    }

    /// The accepted shapes, as people read them: `[1..8, 3, 224, 224]`.
    pub fn describe_shape(&self) -> String {
        let dims: Vec<String> = (0..self.shape.len())
            .map(|axis| match self.dim(axis) {
                Some(Dim::Fixed(d)) => d.to_string(),
                Some(Dim::Range(r)) => format!("{}..{}", r.min, r.max),
                Some(Dim::Symbolic(s)) => s,
                None => "?".into(),
            })
            .collect();
        format!("[{}]", dims.join(", "))
    }

    /// Checks the dimensions against the declared shape; `input` says whether requests give
    /// this tensor (then every dimension is fixed or bounded).
    fn validate(&self, input: bool) -> Result<(), DecodeError> {
        let invalid = |reason: String| DecodeError::Invalid {
            what: "tensor",
            reason,
        };
        if self.dims.is_empty() {
            return Ok(());
        }
        if self.dims.len() != self.shape.len() {
            return Err(invalid(format!(
                "tensor {}: {} dimensions for a shape of {}",
                self.name,
                self.dims.len(),
                self.shape.len()
            )));
        }
        for (d, &at) in self.dims.iter().zip(&self.shape) {
            let ok = match d {
                Dim::Fixed(f) => *f == at,
                Dim::Range(r) => {
                    r.min >= 1
                        && r.min <= at
                        && at <= r.max
                        && r.max <= MAX_DIM
                        && !r.symbol.is_empty()
                        && r.symbol.len() <= 64
                }
                Dim::Symbolic(s) => !input && !s.is_empty() && s.len() <= 64,
            };
            if !ok {
                return Err(invalid(format!(
                    "tensor {}: dimension {d:?} does not fit declared size {at}",
                    self.name
                )));
            }
        }
        Ok(())
    }
}

/// Number of elements of `shape`, if it fits in memory's counting.
pub fn elements(shape: &[u64]) -> Option<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(usize::try_from(d).ok()?))
}

/// A tensor's values: little-endian bytes, hex encoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorData {
    /// Which tensor.
    pub name: String,
    /// Element type.
    pub datatype: DataType,
    /// Shape.
    pub shape: Vec<u64>,
    /// Little-endian element bytes, hex.
    pub data: String,
}

impl TensorData {
    /// Packs f32 values.
    pub fn from_f32(name: &str, shape: Vec<u64>, values: &[f32]) -> Self {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        TensorData {
            name: name.into(),
            datatype: DataType::Fp32,
            shape,
            data: hex::encode(bytes),
        }
    }

    /// The little-endian element bytes, checked against the type and shape.
    pub fn bytes(&self) -> Result<Vec<u8>, DecodeError> {
        let bytes = hex::decode(&self.data).map_err(|e| DecodeError::Invalid {
            what: "tensor data",
            reason: e.to_string(),
        })?;
        let (expected, got) = match self.datatype.size() {
            Some(size) => (
                elements(&self.shape).and_then(|n| n.checked_mul(size)),
                bytes.len(),
            ),
            None => (elements(&self.shape), split_bytes(&bytes)?.len()),
        };
        if expected != Some(got) {
            return Err(DecodeError::Invalid {
                what: "tensor data",
                reason: format!(
                    "{} has {got} {}, shape {:?} needs {:?}",
                    self.name,
                    if self.datatype == DataType::Bytes {
                        "elements"
                    } else {
                        "bytes"
                    },
                    self.shape,
                    expected
                ),
            });
        }
        Ok(bytes)
    }

    /// The values as f64 (whatever the numeric element type), checked against the shape.
    /// BYTES has no numbers: an error.
    pub fn values(&self) -> Result<Vec<f64>, DecodeError> {
        let Some(size) = self.datatype.size() else {
            return Err(DecodeError::Invalid {
                what: "tensor data",
                reason: format!("{} is BYTES, not numbers", self.name),
            });
        };
        Ok(self
            .bytes()?
            .chunks_exact(size)
            .map(|c| self.datatype.decode_f64(c))
            .collect())
    }
}

/// An input with the output it must produce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GoldenVector {
    /// Inputs to feed.
    pub inputs: Vec<TensorData>,
    /// Outputs expected.
    pub outputs: Vec<TensorData>,
    /// Largest allowed absolute difference per element, as a decimal string.
    pub tolerance: String,
}

/// Decodes a golden file ([`Manifest::golden_file`]): the JSON of a list of golden vectors,
/// each with a valid tolerance.
pub fn decode_golden_file(bytes: &[u8]) -> Result<Vec<GoldenVector>, DecodeError> {
    if bytes.len() as u64 > MAX_GOLDEN_FILE_BYTES {
        return Err(DecodeError::Invalid {
            what: "golden file",
            reason: format!("{} bytes is too large", bytes.len()),
        });
    }
    let vectors: Vec<GoldenVector> =
        serde_json::from_slice(bytes).map_err(|e| DecodeError::json("golden file", e))?;
    for g in &vectors {
        g.tolerance()?;
    }
    Ok(vectors)
}

impl GoldenVector {
    /// The tolerance as a number.
    pub fn tolerance(&self) -> Result<f64, DecodeError> {
        parse_tolerance(&self.tolerance)
    }
}

/// A tolerance: a decimal string of a finite, non-negative number.
pub fn parse_tolerance(text: &str) -> Result<f64, DecodeError> {
    text.parse::<f64>()
        .ok()
        .filter(|t| t.is_finite() && *t >= 0.0)
        .ok_or_else(|| DecodeError::Invalid {
            what: "tolerance",
            reason: format!("{text:?} is not a non-negative number"),
        })
}

/// A file that travels beside the artifact, content-addressed: its size, SHA-256 and the
/// SHA-256 of each of its chunks (in the manifest's chunk size).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Length in bytes.
    pub size: u64,
    /// Hex SHA-256 of the whole file.
    pub sha256: String,
    /// Hex SHA-256 of every chunk, in order.
    pub chunks: Vec<String>,
}

impl Attachment {
    /// The attachment for `bytes` in chunks of `chunk_size`.
    pub fn of(bytes: &[u8], chunk_size: u32) -> Self {
        Attachment {
            size: bytes.len() as u64,
            sha256: crate::sha256_hex(bytes),
            chunks: chunk_digests(bytes, chunk_size),
        }
    }
}

/// modelcast's manifest for one model version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version.
    pub format: u32,
    /// Model name.
    pub name: String,
    /// Monotonic version of this model.
    pub version: u64,
    /// How the artifact encodes the model graph.
    #[serde(default)]
    pub model_format: ModelFormat,
    /// Artifact length in bytes.
    pub size: u64,
    /// Hex SHA-256 of the whole artifact.
    pub sha256: String,
    /// Chunk size in bytes (the last chunk may be shorter).
    pub chunk_size: u32,
    /// Offsets at which the artifact's chunking restarts: each large tensor's first byte
    /// ([`segments_at`]), ascending, inside the artifact. Chunks run `chunk_size` long from
    /// the start and from each of these, the last before the next shorter, so a tensor that
    /// did not change between versions has the same chunks, whatever moved before it. Empty:
    /// fixed chunks from the start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segments: Vec<u64>,
    /// Hex SHA-256 of every chunk, in order.
    pub chunks: Vec<String>,
    /// Input tensors.
    pub inputs: Vec<TensorSpec>,
    /// Output tensors.
    pub outputs: Vec<TensorSpec>,
    /// Golden vectors to check before the model may serve (small ones, carried here).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub golden: Vec<GoldenVector>,
    /// Golden vectors too large for metadata, in a file of their own that devices download
    /// after the artifact (in the same numbering of chunks, see [`Manifest::parts`]): the JSON
    /// of a list of [`GoldenVector`]s, named here by size and hashes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub golden_file: Option<Attachment>,
    /// When this manifest stops being valid (`YYYY-MM-DDTHH:MM:SSZ`).
    pub expires: String,
    /// Free-form registry metadata (framework, opset, training data, metrics), strings only.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// How long this version serves on trial before devices commit it (overrides their
    /// configuration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probation: Option<ProbationSpec>,
    /// The latency a device must measure before this version may serve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_budget: Option<LatencyBudget>,
    /// Memory the model took to load and answer once when it was published: the publisher's
    /// peak resident growth, bytes. A device checks it against the memory it has before it
    /// loads the version beside the serving one; without it, it does not check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// The oldest version a device running this one may be sent back to (a fleet rollback):
    /// the operators' signed consent to a downgrade, which devices otherwise refuse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_to: Option<u64>,
    /// The same model in other forms than the artifact above (ONNX beside NNEF, for devices
    /// that run ONNX Runtime), signed with it; a device downloads one form, the one its
    /// target names (see [`crate::engine::choose_form`] and [`Manifest::in_form`]). The golden
    /// vectors hold for every form.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forms: Vec<ArtifactForm>,
    /// The golden vectors' tolerance on a given backend, as a decimal string, in place of
    /// each vector's own (another engine rounds differently than the one that computed them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tolerance: BTreeMap<crate::engine::Backend, String>,
    /// The artifact is encrypted ([`crate::seal`]): `size`, `chunk_size`, `segments`, the
    /// digests and `sha256` are those of the ciphertext; each device receives the content key
    /// sealed to it in its target ([`crate::desired::TargetTerms::key_wrap`]). One form only;
    /// the golden vectors and golden file stay in clear.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<crate::seal::Encryption>,
}

/// One more form of a manifest's model: an artifact of its own in another format, chunked in
/// the manifest's chunk size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactForm {
    /// How this artifact encodes the model graph.
    pub model_format: ModelFormat,
    /// Length in bytes.
    pub size: u64,
    /// Hex SHA-256 of the whole artifact.
    pub sha256: String,
    /// Where its chunking restarts (see [`Manifest::segments`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segments: Vec<u64>,
    /// Hex SHA-256 of every chunk, in order.
    pub chunks: Vec<String>,
}

/// Most forms a manifest may carry besides its own artifact.
pub const MAX_FORMS: usize = 4;

impl ArtifactForm {
    /// `bytes` as a form in `format`, chunked in `chunk_size` restarting at `segments`.
    pub fn of(format: ModelFormat, bytes: &[u8], chunk_size: u32, segments: Vec<u64>) -> Self {
        ArtifactForm {
            model_format: format,
            size: bytes.len() as u64,
            sha256: crate::sha256_hex(bytes),
            chunks: segmented_chunk_digests(bytes, chunk_size, &segments),
            segments,
        }
    }
}

/// A latency budget checked before the swap: over `runs` warm-up inferences on the device,
/// the 95th percentile of their CPU time must not exceed `p95_us` microseconds (integers: canonical JSON has no
/// floats).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyBudget {
    /// Largest p95 latency allowed, in microseconds.
    pub p95_us: u64,
    /// Warm-up runs measured (1..=1000).
    pub runs: u32,
}

/// A manifest's probation override: the trial ends after this many requests or seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbationSpec {
    /// Requests after which the trial is judged.
    pub requests: u32,
    /// Seconds after which the trial is judged.
    pub seconds: u64,
}

/// How an artifact encodes its model graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// An ONNX protobuf, as exported by the training framework.
    #[default]
    Onnx,
    /// tract's NNEF: an uncompressed tar of `graph.nnef` and its tensor `.dat` files, already
    /// decluttered for tract. Devices load it without an ONNX parser.
    Nnef,
}

impl ModelFormat {
    /// File extension of artifacts in this format.
    pub fn extension(self) -> &'static str {
        match self {
            ModelFormat::Onnx => "onnx",
            ModelFormat::Nnef => "nnef.tar",
        }
    }
}

impl std::fmt::Display for ModelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ModelFormat::Onnx => "onnx",
            ModelFormat::Nnef => "nnef",
        })
    }
}

impl std::str::FromStr for ModelFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "onnx" => Ok(ModelFormat::Onnx),
            "nnef" => Ok(ModelFormat::Nnef),
            other => Err(format!("unknown model format {other:?} (onnx or nnef)")),
        }
    }
}

impl Manifest {
    /// The TUF target path of this model version.
    pub fn target_path(&self) -> String {
        target_path(&self.name, self.version, self.model_format)
    }

    /// The formats this version comes in: its artifact's first, then its other forms'.
    pub fn formats(&self) -> Vec<ModelFormat> {
        std::iter::once(self.model_format)
            .chain(self.forms.iter().map(|f| f.model_format))
            .collect()
    }

    /// The artifacts of the other forms, in the manifest's chunk size.
    pub fn form_layouts(&self) -> impl Iterator<Item = Layout<'_>> {
        self.forms.iter().map(|f| Layout {
            sha256: &f.sha256,
            size: f.size,
            chunk_size: self.chunk_size,
            segments: &f.segments,
            chunks: &f.chunks,
        })
    }

    /// The SHA-256 of the artifact a device downloading the `form` form fetches (the
    /// manifest's own artifact for `None`), if the version comes in it.
    pub fn sha256_in(&self, form: Option<ModelFormat>) -> Option<&str> {
        match form {
            None => Some(&self.sha256),
            Some(f) if f == self.model_format => Some(&self.sha256),
            Some(f) => self
                .forms
                .iter()
                .find(|x| x.model_format == f)
                .map(|x| x.sha256.as_str()),
        }
    }

    /// This version as a device that downloads its `format` form sees it: that form as the
    /// artifact, no other forms. `None` when the version does not come in that format.
    pub fn in_form(&self, format: ModelFormat) -> Option<Manifest> {
        let mut view = self.clone();
        view.forms = Vec::new();
        if format == self.model_format {
            return Some(view);
        }
        let form = self.forms.iter().find(|f| f.model_format == format)?;
        view.model_format = form.model_format;
        view.size = form.size;
        view.sha256 = form.sha256.clone();
        view.segments = form.segments.clone();
        view.chunks = form.chunks.clone();
        Some(view)
    }

    /// The golden vectors' tolerance on `backend`, when the manifest states one for it
    /// (validated: a non-negative number).
    pub fn tolerance_on(&self, backend: crate::engine::Backend) -> Option<f64> {
        self.tolerance
            .get(&backend)
            .and_then(|t| parse_tolerance(t).ok())
    }

    /// Number of chunks the artifact splits into.
    pub fn chunk_count(&self) -> u32 {
        self.chunks.len() as u32
    }

    /// The artifact as a [`Layout`].
    pub fn artifact(&self) -> Layout<'_> {
        Layout {
            sha256: &self.sha256,
            size: self.size,
            chunk_size: self.chunk_size,
            segments: &self.segments,
            chunks: &self.chunks,
        }
    }

    /// What a device downloads for this version, in order: the artifact, then the golden
    /// file if there is one. Chunk indices on the wire run through them in that order.
    pub fn parts(&self) -> Vec<Layout<'_>> {
        let mut parts = vec![self.artifact()];
        if let Some(g) = &self.golden_file {
            parts.push(Layout {
                sha256: &g.sha256,
                size: g.size,
                chunk_size: self.chunk_size,
                segments: &[],
                chunks: &g.chunks,
            });
        }
        parts
    }

    /// Chunks of the whole download (artifact and golden file).
    pub fn download_chunk_count(&self) -> u32 {
        self.parts().iter().map(|p| p.chunk_count()).sum()
    }

    /// Bytes of the whole download.
    pub fn download_size(&self) -> u64 {
        self.parts().iter().map(|p| p.size).sum()
    }

    /// The part that download chunk `index` belongs to, and its index within that part.
    pub fn locate(&self, index: u32) -> Option<(Layout<'_>, u32)> {
        let mut rest = index;
        for part in self.parts() {
            if rest < part.chunk_count() {
                return Some((part, rest));
            }
            rest -= part.chunk_count();
        }
        None
    }

    /// Exact length of chunk `index`.
    pub fn chunk_len(&self, index: u32) -> Option<u32> {
        self.artifact().chunk_len(index)
    }

    /// Checks internal consistency: name, sizes, chunk count, digests.
    pub fn validate(&self) -> Result<(), DecodeError> {
        let invalid = |reason: String| DecodeError::Invalid {
            what: "manifest",
            reason,
        };
        if self.format != crate::FORMAT_VERSION {
            return Err(DecodeError::Version {
                what: "manifest",
                found: self.format,
                expected: crate::FORMAT_VERSION,
            });
        }
        if !valid_name(&self.name) {
            return Err(invalid(format!("bad model name {:?}", self.name)));
        }
        if self.chunk_size == 0 || self.chunk_size > MAX_CHUNK_SIZE {
            return Err(invalid(format!(
                "chunk size {} out of range",
                self.chunk_size
            )));
        }
        self.artifact()
            .check()
            .map_err(|e| invalid(e.to_string()))?;
        if self.forms.len() > MAX_FORMS {
            return Err(invalid(format!(
                "{} forms, at most {MAX_FORMS}",
                self.forms.len()
            )));
        }
        let formats = self.formats();
        for (i, f) in formats.iter().enumerate() {
            if formats[..i].contains(f) {
                return Err(invalid(format!("two artifacts in format {f}")));
            }
        }
        for (form, layout) in self.forms.iter().zip(self.form_layouts()) {
            layout
                .check()
                .map_err(|reason| invalid(format!("its {} form: {reason}", form.model_format)))?;
        }
        if let Some(e) = &self.encryption {
            e.check(self.size, self.chunk_size, &self.segments)
                .map_err(|reason| invalid(format!("encryption: {reason}")))?;
            if !self.forms.is_empty() {
                return Err(invalid("an encrypted model has one form".into()));
            }
        }
        if self.inputs.is_empty() || self.outputs.is_empty() {
            return Err(invalid("a model needs inputs and outputs".into()));
        }
        for t in &self.inputs {
            t.validate(true)?;
        }
        for t in &self.outputs {
            t.validate(false)?;
        }
        for g in &self.golden {
            g.tolerance()?;
        }
        if let Some(g) = &self.golden_file {
            if g.size == 0 || g.size > MAX_GOLDEN_FILE_BYTES {
                return Err(invalid(format!("golden file size {} out of range", g.size)));
            }
            if g.chunks.len() as u64 != g.size.div_ceil(u64::from(self.chunk_size)) {
                return Err(invalid(format!(
                    "{} chunk digests for a golden file of {} bytes",
                    g.chunks.len(),
                    g.size
                )));
            }
            for d in std::iter::once(&g.sha256).chain(&g.chunks) {
                if d.len() != 64 || !d.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(invalid(format!("digest {d:?} is not hex SHA-256")));
                }
            }
        }
        if let Some(b) = self.latency_budget {
            if b.p95_us == 0 || !(1..=1000).contains(&b.runs) {
                return Err(invalid(format!(
                    "latency budget of {} µs over {} runs out of range",
                    b.p95_us, b.runs
                )));
            }
        }
        for t in self.tolerance.values() {
            parse_tolerance(t)?;
        }
        if let Some(f) = self.fallback_to {
            if f >= self.version {
                return Err(invalid(format!(
                    "fallback version {f} is not older than version {}",
                    self.version
                )));
            }
        }
        crate::metadata::parse_expiry(&self.expires)?;
        Ok(())
    }

    /// Builds the TUF target entry that carries this manifest.
    pub fn to_target(&self) -> TargetFile {
        let mut hashes = BTreeMap::new();
        hashes.insert("sha256".to_string(), self.sha256.clone());
        TargetFile {
            length: self.size,
            hashes,
            custom: Some(serde_json::json!({ "modelcast": self })),
        }
    }

    /// Extracts and validates the manifest from a TUF target, checking that it agrees with
    /// the target's own length, hash and path.
    pub fn from_target(path: &str, target: &TargetFile) -> Result<Self, DecodeError> {
        let custom = target
            .custom
            .as_ref()
            .and_then(|c| c.get("modelcast"))
            .ok_or_else(|| DecodeError::Invalid {
                what: "target",
                reason: format!("{path} carries no modelcast manifest"),
            })?;
        let manifest: Manifest =
            serde_json::from_value(custom.clone()).map_err(|e| DecodeError::json("manifest", e))?;
        manifest.validate()?;
        let mismatch = |reason: String| DecodeError::Invalid {
            what: "target",
            reason,
        };
        if manifest.target_path() != path {
            return Err(mismatch(format!(
                "path {path} does not match manifest {}",
                manifest.target_path()
            )));
        }
        if target.length != manifest.size {
            return Err(mismatch(format!(
                "target length {} differs from manifest size {}",
                target.length, manifest.size
            )));
        }
        if target.hashes.get("sha256") != Some(&manifest.sha256) {
            return Err(mismatch("target sha256 differs from manifest".into()));
        }
        Ok(manifest)
    }
}

/// `models/<name>/<version>.<extension of format>`.
pub fn target_path(name: &str, version: u64, format: ModelFormat) -> String {
    format!("models/{name}/{version}.{}", format.extension())
}

/// Model names: 1–64 of `[A-Za-z0-9._-]`, not starting with a dot.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bytes_elements_split_as_joined_and_torn_ones_are_refused() {
        let joined = join_bytes([&b"ab"[..], b"", b"\xff"]).unwrap();
        assert_eq!(
            joined,
            [2, 0, 0, 0, b'a', b'b', 0, 0, 0, 0, 1, 0, 0, 0, 0xff]
        );
        assert_eq!(
            split_bytes(&joined).unwrap(),
            vec![&b"ab"[..], b"", b"\xff"]
        );
        assert!(split_bytes(&joined[..joined.len() - 1]).is_err());
        assert!(split_bytes(&[1, 0]).is_err());
        assert!(split_bytes(&[]).unwrap().is_empty());
        let t = TensorData {
            name: "w".into(),
            datatype: DataType::Bytes,
            shape: vec![3],
            data: hex::encode(&joined),
        };
        assert_eq!(t.bytes().unwrap(), joined);
        assert!(t.values().is_err(), "strings are not numbers");
        let t = TensorData {
            shape: vec![2],
            ..t
        };
        assert!(t.bytes().is_err(), "3 elements for a shape of 2");
        assert_eq!("BYTES".parse::<DataType>().unwrap(), DataType::Bytes);
        assert_eq!(DataType::Bytes.size(), None);
    }

    proptest! {
        #[test]
        fn bytes_elements_round_trip(elements in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..20)) {
            let joined = join_bytes(elements.iter().map(Vec::as_slice)).unwrap();
            let split = split_bytes(&joined).unwrap();
            prop_assert_eq!(split, elements.iter().map(Vec::as_slice).collect::<Vec<_>>());
        }

        #[test]
        fn bytes_splitting_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = split_bytes(&bytes);
        }
    }

    pub(crate) fn sample(bytes: &[u8]) -> Manifest {
        Manifest {
            format: 1,
            name: "m".into(),
            version: 2,
            model_format: ModelFormat::Onnx,
            size: bytes.len() as u64,
            sha256: crate::sha256_hex(bytes),
            chunk_size: 4,
            segments: vec![],
            chunks: chunk_digests(bytes, 4),
            inputs: vec![TensorSpec {
                name: "x".into(),
                datatype: DataType::Fp32,
                shape: vec![1, 2],
                dims: vec![],
            }],
            outputs: vec![TensorSpec {
                name: "y".into(),
                datatype: DataType::Fp32,
                shape: vec![1, 1],
                dims: vec![],
            }],
            golden_file: None,
            golden: vec![GoldenVector {
                inputs: vec![TensorData::from_f32("x", vec![1, 2], &[1.0, 2.0])],
                outputs: vec![TensorData::from_f32("y", vec![1, 1], &[3.0])],
                tolerance: "1e-4".into(),
            }],
            expires: "2030-01-01T00:00:00Z".into(),
            metadata: BTreeMap::from([("framework".into(), "onnx".into())]),
            probation: None,
            latency_budget: None,
            memory_bytes: None,
            fallback_to: None,
            forms: Vec::new(),
            encryption: None,
            tolerance: Default::default(),
        }
    }

    #[test]
    fn a_form_is_seen_as_the_artifact_and_every_form_is_checked() {
        let mut m = sample(b"0123456789");
        let other = b"another encoding";
        m.forms
            .push(ArtifactForm::of(ModelFormat::Nnef, other, 4, vec![]));
        m.tolerance
            .insert(crate::engine::Backend::Onnxruntime, "0.01".into());
        m.validate().unwrap();
        assert_eq!(m.formats(), [ModelFormat::Onnx, ModelFormat::Nnef]);
        assert_eq!(
            m.tolerance_on(crate::engine::Backend::Onnxruntime),
            Some(0.01)
        );
        assert_eq!(m.tolerance_on(crate::engine::Backend::Tract), None);
        let nnef = m.in_form(ModelFormat::Nnef).unwrap();
        assert_eq!(
            (nnef.size, &nnef.sha256[..], nnef.chunk_count()),
            (16, &crate::sha256_hex(other)[..], 4)
        );
        assert!(nnef.forms.is_empty());
        assert_eq!(
            nnef.golden, m.golden,
            "the golden vectors hold for every form"
        );
        nnef.validate().unwrap();
        let own = m.in_form(ModelFormat::Onnx).unwrap();
        assert_eq!((own.sha256, own.forms.len()), (m.sha256.clone(), 0));
        // The target still names the manifest's own artifact, with every form signed in it.
        let t = m.to_target();
        assert_eq!(Manifest::from_target("models/m/2.onnx", &t).unwrap(), m);

        let mut twice = m.clone();
        twice.forms[0].model_format = ModelFormat::Onnx;
        assert!(twice.validate().is_err(), "two artifacts in one format");
        let mut short = m.clone();
        short.forms[0].chunks.pop();
        let e = short.validate().unwrap_err().to_string();
        assert!(e.contains("nnef form"), "{e}");
        let mut loose = m.clone();
        loose
            .tolerance
            .insert(crate::engine::Backend::Tract, "-1".into());
        assert!(loose.validate().is_err());
        assert_eq!(sample(b"0123456789").in_form(ModelFormat::Nnef), None);
    }

    #[test]
    fn manifest_round_trips_through_target() {
        let m = sample(b"0123456789");
        let t = m.to_target();
        assert_eq!(Manifest::from_target("models/m/2.onnx", &t).unwrap(), m);
        assert!(Manifest::from_target("models/m/3.onnx", &t).is_err());
        assert_eq!(m.chunk_count(), 3);
        assert_eq!(m.chunk_len(2), Some(2));
        assert_eq!(m.chunk_len(3), None);
        let v = m.golden[0].inputs[0].values().unwrap();
        assert_eq!(v, vec![1.0, 2.0]);
        // The manifest survives canonical JSON (no floats).
        crate::keys::canonical_json(&serde_json::to_value(&m).unwrap()).unwrap();
    }

    #[test]
    fn a_golden_file_follows_the_artifact_in_the_download() {
        let mut m = sample(&[1u8; 100]);
        assert_eq!(m.parts().len(), 1);
        let file = vec![b'g'; 2 * m.chunk_size as usize + 1];
        m.golden_file = Some(Attachment::of(&file, m.chunk_size));
        m.validate().unwrap();
        let n = m.chunk_count();
        assert_eq!(m.download_chunk_count(), n + 3);
        assert_eq!(m.download_size(), 100 + file.len() as u64);
        let (part, local) = m.locate(n + 2).unwrap();
        assert_eq!(
            (part.sha256, local, part.chunk_len(local)),
            (m.golden_file.as_ref().unwrap().sha256.as_str(), 2, Some(1))
        );
        assert_eq!(m.locate(n - 1).unwrap().0.sha256, m.sha256);
        assert_eq!(m.locate(n + 3), None);

        // Its layout must hold together, and it is bounded.
        let mut bad = m.clone();
        bad.golden_file.as_mut().unwrap().chunks.pop();
        assert!(bad.validate().is_err());
        let mut big = m.clone();
        big.golden_file.as_mut().unwrap().size = MAX_GOLDEN_FILE_BYTES + 1;
        assert!(big.validate().is_err());
        assert!(decode_golden_file(b"not json").is_err());
        assert!(decode_golden_file(br#"[{"inputs":[],"outputs":[],"tolerance":"-1"}]"#).is_err());
        assert_eq!(decode_golden_file(b"[]").unwrap(), vec![]);
    }

    #[test]
    fn inconsistent_manifests_are_rejected() {
        let mut m = sample(b"0123456789");
        m.chunks.pop();
        assert!(m.validate().is_err());
        let mut m = sample(b"0123456789");
        m.name = "../etc".into();
        assert!(m.validate().is_err());
        let mut m = sample(b"0123456789");
        m.golden[0].tolerance = "NaN".into();
        assert!(m.validate().is_err());
        let mut m = sample(b"0123456789");
        m.chunk_size = 0;
        assert!(m.validate().is_err());
    }

    #[test]
    fn chunking_restarts_at_each_segment() {
        let bytes: Vec<u8> = (0..23u8).collect();
        let mut m = sample(&bytes);
        m.segments = vec![5, 6, 14];
        m.chunks = segmented_chunk_digests(&bytes, 4, &m.segments);
        m.validate().unwrap();
        let spans: Vec<(u64, u32)> = m.artifact().spans().map(|s| (s.offset, s.len)).collect();
        assert_eq!(
            spans,
            [
                (0, 4),
                (4, 1),
                (5, 1),
                (6, 4),
                (10, 4),
                (14, 4),
                (18, 4),
                (22, 1)
            ]
        );
        for (i, &(offset, len)) in spans.iter().enumerate() {
            assert_eq!(m.artifact().span(i as u32), Some(Span { offset, len }));
        }
        assert_eq!(m.artifact().span(spans.len() as u32), None);

        // A tensor's chunks do not depend on what precedes it.
        let mut longer = vec![99u8; 3];
        longer.extend_from_slice(&bytes);
        let moved = segmented_chunk_digests(&longer, 4, &[17]);
        assert_eq!(moved[moved.len() - 3..], m.chunks[m.chunks.len() - 3..]);
    }

    #[test]
    fn segments_that_overlap_or_leave_the_artifact_are_refused() {
        let bytes = [7u8; 20];
        for (segments, says) in [
            (vec![8, 8], "overlap"),
            (vec![12, 8], "overlap"),
            (vec![0], "overlap"),
            (vec![20], "past the end"),
            (vec![4, 30], "past the end"),
        ] {
            let mut m = sample(&bytes);
            m.segments = segments.clone();
            m.chunks = segmented_chunk_digests(&bytes, 4, &segments);
            let err = m.validate().unwrap_err().to_string();
            assert!(err.contains(says), "{segments:?}: {err}");
        }
        // The digests must follow the segments.
        let mut m = sample(&bytes);
        m.segments = vec![6];
        assert!(m.validate().is_err());
        m.chunks = segmented_chunk_digests(&bytes, 4, &m.segments);
        m.validate().unwrap();
    }

    #[test]
    fn segments_start_at_large_tensors_only() {
        let starts = [(0, 100), (300, 5000), (100, 10), (5300, 4096), (300, 5000)];
        assert_eq!(segments_at(10_000, &starts, 4096), vec![300, 5300]);
        assert_eq!(segments_at(5300, &starts, 4096), vec![300]);
    }

    proptest! {
        #[test]
        fn spans_cover_the_file_once_in_order(
            size in 1u64..5000,
            chunk in 1u32..300,
            mut segments in proptest::collection::vec(any::<u64>(), 0..20),
        ) {
            for s in &mut segments {
                *s %= size + 10;
            }
            let spans: Vec<Span> = spans(size, chunk, &segments).collect();
            let mut next = 0;
            for s in &spans {
                prop_assert_eq!(s.offset, next);
                prop_assert!(s.len >= 1 && s.len <= chunk);
                next += u64::from(s.len);
            }
            prop_assert_eq!(next, size);
            if check_segments(size, &segments).is_ok() {
                let layout = Layout {
                    sha256: "",
                    size,
                    chunk_size: chunk,
                    segments: &segments,
                    chunks: &vec![String::new(); spans.len()],
                };
                for (i, s) in spans.iter().enumerate() {
                    prop_assert_eq!(layout.span(i as u32), Some(*s));
                }
                for &seg in &segments {
                    prop_assert!(spans.iter().any(|s| s.offset == seg));
                }
            }
        }

        #[test]
        fn manifest_decoder_never_panics(custom in any::<String>(), len in any::<u64>()) {
            let t = TargetFile {
                length: len,
                hashes: BTreeMap::new(),
                custom: serde_json::from_str(&custom).ok(),
            };
            let _ = Manifest::from_target("models/m/1.onnx", &t);
        }

        #[test]
        fn tensor_data_never_panics(data in "[0-9a-f]{0,40}", shape in proptest::collection::vec(any::<u64>(), 0..4)) {
            let t = TensorData { name: "x".into(), datatype: DataType::Int64, shape, data };
            let _ = t.values();
        }
    }
}
