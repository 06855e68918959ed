//! The model manifest: what modelcast keeps in a TUF target's `custom.modelcast` field.
//!
//! A manifest names the model and its monotonic version, the chunking of the artifact with the
//! SHA-256 of every chunk, the input and output tensors, optional golden vectors, an expiry and
//! free-form registry metadata. Canonical JSON cannot carry floats, so tensors travel as
//! hex of their little-endian bytes and tolerances as decimal strings.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::DecodeError;
use crate::metadata::TargetFile;

/// Default chunk size: 256 KiB, inside AWS IoT's 128 B–128 KB spirit but fewer round trips.
pub const DEFAULT_CHUNK_SIZE: u32 = 256 * 1024;
/// Largest chunk size accepted from a manifest.
pub const MAX_CHUNK_SIZE: u32 = 4 * 1024 * 1024;
/// Largest artifact accepted (8 GiB).
pub const MAX_ARTIFACT_BYTES: u64 = 8 << 30;

/// Element types, named as the Open Inference Protocol (KServe v2) names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataType {
    /// 32-bit float.
    #[serde(rename = "FP32")]
    Fp32,
    /// 64-bit signed integer.
    #[serde(rename = "INT64")]
    Int64,
    /// 32-bit signed integer.
    #[serde(rename = "INT32")]
    Int32,
}

impl DataType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DataType::Fp32 | DataType::Int32 => 4,
            DataType::Int64 => 8,
        }
    }
}

/// A named tensor's type and concrete shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// Tensor name in the ONNX graph.
    pub name: String,
    /// Element type.
    pub datatype: DataType,
    /// Concrete shape.
    pub shape: Vec<u64>,
}

impl TensorSpec {
    /// Number of elements.
    pub fn elements(&self) -> Option<usize> {
        self.shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(usize::try_from(d).ok()?))
    }
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

    /// The values as f64 (whatever the element type), checked against the shape.
    pub fn values(&self) -> Result<Vec<f64>, DecodeError> {
        let bytes = hex::decode(&self.data).map_err(|e| DecodeError::Invalid {
            what: "tensor data",
            reason: e.to_string(),
        })?;
        let size = self.datatype.size();
        let expected = TensorSpec {
            name: self.name.clone(),
            datatype: self.datatype,
            shape: self.shape.clone(),
        }
        .elements()
        .and_then(|n| n.checked_mul(size));
        if expected != Some(bytes.len()) {
            return Err(DecodeError::Invalid {
                what: "tensor data",
                reason: format!(
                    "{} has {} bytes, shape {:?} needs {:?}",
                    self.name,
                    bytes.len(),
                    self.shape,
                    expected
                ),
            });
        }
        Ok(bytes
            .chunks_exact(size)
            .map(|c| match self.datatype {
                DataType::Fp32 => f64::from(f32::from_le_bytes(c.try_into().expect("4 bytes"))),
                DataType::Int32 => f64::from(i32::from_le_bytes(c.try_into().expect("4 bytes"))),
                DataType::Int64 => i64::from_le_bytes(c.try_into().expect("8 bytes")) as f64,
            })
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

impl GoldenVector {
    /// The tolerance as a number.
    pub fn tolerance(&self) -> Result<f64, DecodeError> {
        self.tolerance
            .parse::<f64>()
            .ok()
            .filter(|t| t.is_finite() && *t >= 0.0)
            .ok_or_else(|| DecodeError::Invalid {
                what: "tolerance",
                reason: format!("{:?} is not a non-negative number", self.tolerance),
            })
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
    /// Hex SHA-256 of every chunk, in order.
    pub chunks: Vec<String>,
    /// Input tensors.
    pub inputs: Vec<TensorSpec>,
    /// Output tensors.
    pub outputs: Vec<TensorSpec>,
    /// Golden vectors to check before the model may serve.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub golden: Vec<GoldenVector>,
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
    /// The oldest version a device running this one may be sent back to (a fleet rollback):
    /// the operators' signed consent to a downgrade, which devices otherwise refuse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_to: Option<u64>,
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

    /// Number of chunks the artifact splits into.
    pub fn chunk_count(&self) -> u32 {
        self.chunks.len() as u32
    }

    /// Exact length of chunk `index`.
    pub fn chunk_len(&self, index: u32) -> Option<u32> {
        let start = u64::from(index).checked_mul(u64::from(self.chunk_size))?;
        if index >= self.chunk_count() || start >= self.size {
            return None;
        }
        Some((self.size - start).min(u64::from(self.chunk_size)) as u32)
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
        if self.size == 0 || self.size > MAX_ARTIFACT_BYTES {
            return Err(invalid(format!("artifact size {} out of range", self.size)));
        }
        if self.chunk_size == 0 || self.chunk_size > MAX_CHUNK_SIZE {
            return Err(invalid(format!(
                "chunk size {} out of range",
                self.chunk_size
            )));
        }
        let expected = self.size.div_ceil(u64::from(self.chunk_size));
        if self.chunks.len() as u64 != expected {
            return Err(invalid(format!(
                "{} chunk digests for {} bytes in chunks of {}",
                self.chunks.len(),
                self.size,
                self.chunk_size
            )));
        }
        for d in std::iter::once(&self.sha256).chain(&self.chunks) {
            if d.len() != 64 || !d.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid(format!("digest {d:?} is not hex SHA-256")));
            }
        }
        if self.inputs.is_empty() || self.outputs.is_empty() {
            return Err(invalid("a model needs inputs and outputs".into()));
        }
        for g in &self.golden {
            g.tolerance()?;
        }
        if let Some(b) = self.latency_budget {
            if b.p95_us == 0 || !(1..=1000).contains(&b.runs) {
                return Err(invalid(format!(
                    "latency budget of {} µs over {} runs out of range",
                    b.p95_us, b.runs
                )));
            }
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

/// Splits `bytes` into chunks and returns their hex digests (for publishers and tests).
pub fn chunk_digests(bytes: &[u8], chunk_size: u32) -> Vec<String> {
    bytes
        .chunks(chunk_size.max(1) as usize)
        .map(crate::sha256_hex)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn sample(bytes: &[u8]) -> Manifest {
        Manifest {
            format: 1,
            name: "m".into(),
            version: 2,
            model_format: ModelFormat::Onnx,
            size: bytes.len() as u64,
            sha256: crate::sha256_hex(bytes),
            chunk_size: 4,
            chunks: chunk_digests(bytes, 4),
            inputs: vec![TensorSpec {
                name: "x".into(),
                datatype: DataType::Fp32,
                shape: vec![1, 2],
            }],
            outputs: vec![TensorSpec {
                name: "y".into(),
                datatype: DataType::Fp32,
                shape: vec![1, 1],
            }],
            golden: vec![GoldenVector {
                inputs: vec![TensorData::from_f32("x", vec![1, 2], &[1.0, 2.0])],
                outputs: vec![TensorData::from_f32("y", vec![1, 1], &[3.0])],
                tolerance: "1e-4".into(),
            }],
            expires: "2030-01-01T00:00:00Z".into(),
            metadata: BTreeMap::from([("framework".into(), "onnx".into())]),
            probation: None,
            latency_budget: None,
            fallback_to: None,
        }
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

    proptest! {
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
