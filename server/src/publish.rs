//! The publisher's side (runs in the operators' CLI, next to their offline keys): turn an ONNX
//! file into the artifact devices load (tract's NNEF by default, or the ONNX file as is), build
//! its manifest — chunk digests, interface, golden vectors computed with tract on that very
//! artifact — and sign the next version of the repository's targets. Conversion happens here,
//! before signing, so what the operators sign is byte for byte what devices run.

use std::collections::BTreeMap;

use modelcast_proto::keys::SigningKey;
use modelcast_proto::manifest::{
    chunk_digests, DataType, GoldenVector, LatencyBudget, Manifest, ModelFormat, TensorData,
    DEFAULT_CHUNK_SIZE,
};
use modelcast_proto::metadata::{format_expiry, Signed, Targets};
use thiserror::Error;
use tract_onnx::prelude::*;

use crate::onnx::{inspect, to_nnef, OnnxError};

/// Manifests made here are valid for a year.
pub const MANIFEST_LIFETIME_SECS: i64 = 365 * 24 * 3600;
/// Tolerance written into generated golden vectors.
pub const GOLDEN_TOLERANCE: &str = "0.0001";

/// Why a model cannot be published.
#[derive(Debug, Error)]
pub enum PublishError {
    /// The file is not a usable ONNX model.
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    /// The reference run for golden vectors failed.
    #[error("reference inference failed: {0}")]
    Reference(String),
    /// The name or version is unusable.
    #[error("{0}")]
    Invalid(String),
}

/// What to publish.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// Model name.
    pub name: String,
    /// Version (must exceed every published one).
    pub version: u64,
    /// Chunk size.
    pub chunk_size: u32,
    /// What devices receive: NNEF (converted here) or the ONNX file as is.
    pub format: ModelFormat,
    /// Compute golden vectors with tract.
    pub golden: bool,
    /// Registry metadata.
    pub metadata: BTreeMap<String, String>,
    /// The latency devices must measure in warm-up runs before this version may serve.
    pub latency_budget: Option<LatencyBudget>,
    /// How far back devices running this version may be sent (a fleet rollback).
    pub fallback: Fallback,
}

/// The oldest version devices running a new version may be sent back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// The oldest version a deployment still names (what devices may be running before
    /// this one reaches them); with none, the newest published before. The default.
    InService,
    /// This version.
    To(u64),
    /// None: devices refuse every older version.
    Never,
}

impl PublishOptions {
    /// Defaults for `name` at `version`.
    pub fn new(name: &str, version: u64) -> Self {
        PublishOptions {
            name: name.into(),
            version,
            chunk_size: DEFAULT_CHUNK_SIZE,
            format: ModelFormat::Nnef,
            golden: true,
            metadata: BTreeMap::new(),
            latency_budget: None,
            fallback: Fallback::InService,
        }
    }
}

/// A deterministic input for golden vectors: values in [-1, 1).
fn reference_input(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Plans `artifact` the way a device does: typed for the manifest's input shapes, optimized.
fn reference_plan(
    artifact: &[u8],
    manifest: &Manifest,
) -> Result<std::sync::Arc<TypedRunnableModel>, PublishError> {
    let r = |e: TractError| PublishError::Reference(format!("{e:#}"));
    let typed = match manifest.model_format {
        ModelFormat::Nnef => {
            let model = tract_nnef::nnef()
                .with_onnx()
                .model_for_read(&mut &artifact[..])
                .map_err(r)?;
            let names: Vec<String> = model
                .input_outlets()
                .map_err(r)?
                .iter()
                .map(|o| model.node(o.node).name.clone())
                .collect();
            let wanted: Vec<&str> = manifest.inputs.iter().map(|i| i.name.as_str()).collect();
            if names != wanted {
                return Err(PublishError::Reference(format!(
                    "NNEF conversion renamed the inputs {wanted:?} to {names:?}"
                )));
            }
            model
        }
        ModelFormat::Onnx => {
            let mut model = tract_onnx::onnx()
                .with_ignore_value_info(true)
                .model_for_read(&mut &artifact[..])
                .map_err(r)?;
            for (i, spec) in manifest.inputs.iter().enumerate() {
                let shape: Vec<usize> = spec.shape.iter().map(|d| *d as usize).collect();
                model
                    .set_input_fact(i, InferenceFact::dt_shape(f32::datum_type(), shape))
                    .map_err(r)?;
            }
            model.into_typed().map_err(r)?
        }
    };
    typed
        .into_optimized()
        .map_err(r)?
        .into_runnable()
        .map_err(r)
}

/// One golden vector: a deterministic input and what `artifact` answers to it (FP32 models).
fn golden_vector(
    artifact: &[u8],
    manifest: &Manifest,
) -> Result<Option<GoldenVector>, PublishError> {
    if manifest.inputs.iter().any(|i| i.datatype != DataType::Fp32)
        || manifest
            .outputs
            .iter()
            .any(|o| o.datatype != DataType::Fp32)
    {
        return Ok(None);
    }
    let r = |e: TractError| PublishError::Reference(format!("{e:#}"));
    let plan = reference_plan(artifact, manifest)?;
    let mut inputs = Vec::new();
    let mut tensors = TVec::new();
    for (i, spec) in manifest.inputs.iter().enumerate() {
        let shape: Vec<usize> = spec.shape.iter().map(|d| *d as usize).collect();
        let values = reference_input(shape.iter().product(), manifest.version + i as u64);
        tensors.push(Tensor::from_shape(&shape, &values).map_err(r)?.into());
        inputs.push(TensorData::from_f32(
            &spec.name,
            spec.shape.clone(),
            &values,
        ));
    }
    let result = plan.run(tensors).map_err(r)?;
    let outputs = result
        .iter()
        .zip(&manifest.outputs)
        .map(|(t, spec)| {
            let view = t.to_plain_array_view::<f32>().map_err(r)?;
            let values: Vec<f32> = view.iter().copied().collect();
            Ok(TensorData::from_f32(
                &spec.name,
                spec.shape.clone(),
                &values,
            ))
        })
        .collect::<Result<Vec<_>, PublishError>>()?;
    Ok(Some(GoldenVector {
        inputs,
        outputs,
        tolerance: GOLDEN_TOLERANCE.into(),
    }))
}

/// An artifact ready to upload and its manifest.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// What devices download: NNEF tar or ONNX bytes, as the manifest's format says.
    pub artifact: Vec<u8>,
    /// Its manifest.
    pub manifest: Manifest,
}

/// Prepares an ONNX model for publishing: converts it to the requested format and builds the
/// manifest of the result.
pub fn prepare(onnx: &[u8], opts: &PublishOptions, now: i64) -> Result<Prepared, PublishError> {
    if !modelcast_proto::manifest::valid_name(&opts.name) {
        return Err(PublishError::Invalid(format!(
            "bad model name {:?}",
            opts.name
        )));
    }
    let info = inspect(onnx)?;
    let mut metadata = opts.metadata.clone();
    metadata
        .entry("framework".into())
        .or_insert_with(|| "onnx".into());
    if let Some(opset) = info.opset {
        metadata
            .entry("opset".into())
            .or_insert_with(|| opset.to_string());
    }
    if !info.producer.is_empty() {
        metadata
            .entry("producer".into())
            .or_insert(info.producer.clone());
    }
    let artifact = match opts.format {
        ModelFormat::Onnx => onnx.to_vec(),
        ModelFormat::Nnef => {
            metadata.insert("source_sha256".into(), modelcast_proto::sha256_hex(onnx));
            to_nnef(onnx, &info.inputs)?
        }
    };
    let mut manifest = Manifest {
        format: modelcast_proto::FORMAT_VERSION,
        name: opts.name.clone(),
        version: opts.version,
        model_format: opts.format,
        size: artifact.len() as u64,
        sha256: modelcast_proto::sha256_hex(&artifact),
        chunk_size: opts.chunk_size,
        chunks: chunk_digests(&artifact, opts.chunk_size),
        inputs: info.inputs,
        outputs: info.outputs,
        golden: vec![],
        expires: format_expiry(now + MANIFEST_LIFETIME_SECS),
        metadata,
        probation: None,
        latency_budget: opts.latency_budget,
        fallback_to: None,
    };
    if opts.golden {
        manifest.golden.extend(golden_vector(&artifact, &manifest)?);
    }
    manifest
        .validate()
        .map_err(|e| PublishError::Invalid(e.to_string()))?;
    Ok(Prepared { artifact, manifest })
}

/// The newest version of `name` in signed `targets`.
fn newest_version(targets: &Signed, name: &str) -> Result<Option<u64>, PublishError> {
    let targets = targets
        .parse::<Targets>("targets")
        .map_err(|e| PublishError::Invalid(format!("current targets: {e}")))?;
    Ok(newest_in(&targets, name))
}

fn newest_in(targets: &Targets, name: &str) -> Option<u64> {
    targets
        .targets
        .values()
        .filter_map(|t| t.custom.as_ref()?.get("modelcast"))
        .filter(|m| m.get("name").and_then(|n| n.as_str()) == Some(name))
        .filter_map(|m| m.get("version")?.as_u64())
        .max()
}

/// The next targets: `current` (if any) plus `manifest`, version + 1, signed with `keys`.
pub fn sign_next_targets(
    current: Option<&Signed>,
    manifest: &Manifest,
    keys: &[&SigningKey],
    now: i64,
) -> Result<Signed, PublishError> {
    let mut targets = match current {
        Some(s) => s
            .parse::<Targets>("targets")
            .map_err(|e| PublishError::Invalid(format!("current targets: {e}")))?,
        None => Targets::new(0, ""),
    };
    let path = manifest.target_path();
    if targets.targets.contains_key(&path) {
        return Err(PublishError::Invalid(format!(
            "{path} is already published"
        )));
    }
    if let Some(newest) = newest_in(&targets, &manifest.name) {
        if manifest.version <= newest {
            return Err(PublishError::Invalid(format!(
                "version {} of {} is not newer than published version {newest}",
                manifest.version, manifest.name
            )));
        }
    }
    targets.targets.insert(path, manifest.to_target());
    targets.version += 1;
    targets.expires = format_expiry(now + MANIFEST_LIFETIME_SECS);
    Ok(Signed::sign(&targets, keys))
}

/// Publishes an ONNX file: prepares its artifact and manifest, uploads the artifact, signs the
/// next targets with the operators' `targets_keys` (a threshold of them) and hands them to
/// the server. The current targets are verified first, from `trusted_root` (the operators'
/// root file) through the server's chain of rotations.
pub fn publish_file(
    client: &crate::client::Client,
    path: &std::path::Path,
    opts: &PublishOptions,
    targets_keys: &[SigningKey],
    trusted_root: &Signed,
    by: &str,
    now: i64,
) -> Result<Manifest, PublishError> {
    let io = |e: std::io::Error| PublishError::Invalid(format!("{}: {e}", path.display()));
    let onnx = std::fs::read(path).map_err(io)?;
    let Prepared { artifact, manifest } = prepare(&onnx, opts, now)?;
    drop(onnx);
    let api = |e: crate::client::ClientError| PublishError::Invalid(e.to_string());
    client
        .upload(&manifest.sha256, manifest.chunk_size, &artifact)
        .map_err(api)?;
    // Re-sign only what a threshold of the targets keys signed before, under a root reached
    // from the operators' own.
    let current = client.verified_targets(trusted_root).map_err(api)?;
    let mut manifest = manifest;
    manifest.fallback_to = match opts.fallback {
        Fallback::InService => {
            let deployed = client
                .deployments()
                .map_err(api)?
                .into_iter()
                .filter(|d| d.model == manifest.name && d.version < manifest.version)
                .map(|d| d.version)
                .min();
            match (deployed, &current) {
                (Some(v), _) => Some(v),
                (None, Some(targets)) => newest_version(targets, &manifest.name)?,
                (None, None) => None,
            }
        }
        Fallback::To(v) => Some(v),
        Fallback::Never => None,
    };
    manifest
        .validate()
        .map_err(|e| PublishError::Invalid(e.to_string()))?;
    let keys: Vec<&SigningKey> = targets_keys.iter().collect();
    let targets = sign_next_targets(current.as_ref(), &manifest, &keys, now)?;
    client
        .publish(&crate::api::PublishRequest {
            targets,
            published_by: by.into(),
        })
        .map_err(api)?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::example_model;

    #[test]
    fn nnef_and_onnx_artifacts_answer_alike() {
        let bytes = example_model(3, 32);
        let mut opts = PublishOptions::new("clf", 3);
        let nnef = prepare(&bytes, &opts, 1_700_000_000).unwrap();
        assert_eq!(nnef.manifest.model_format, ModelFormat::Nnef);
        assert_eq!(nnef.manifest.target_path(), "models/clf/3.nnef.tar");
        assert_eq!(
            nnef.manifest.metadata["source_sha256"],
            modelcast_proto::sha256_hex(&bytes)
        );
        opts.format = ModelFormat::Onnx;
        let onnx = prepare(&bytes, &opts, 1_700_000_000).unwrap();
        assert_eq!(onnx.artifact, bytes);
        assert_eq!(onnx.manifest.target_path(), "models/clf/3.onnx");
        let (a, b) = (&nnef.manifest.golden[0], &onnx.manifest.golden[0]);
        assert_eq!(a.inputs, b.inputs);
        for (x, y) in a.outputs[0]
            .values()
            .unwrap()
            .iter()
            .zip(b.outputs[0].values().unwrap())
        {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }

    #[test]
    fn manifest_with_golden_vector() {
        let bytes = example_model(3, 32);
        let m = prepare(&bytes, &PublishOptions::new("clf", 3), 1_700_000_000)
            .unwrap()
            .manifest;
        assert_eq!(m.golden.len(), 1);
        assert_eq!(m.golden[0].outputs[0].values().unwrap().len(), 3);
        let key = SigningKey::from_bytes(&[1; 32]);
        let t1 = sign_next_targets(None, &m, &[&key], 0).unwrap();
        assert!(sign_next_targets(Some(&t1), &m, &[&key], 0).is_err());
        let mut older = m.clone();
        older.version = 2;
        assert!(sign_next_targets(Some(&t1), &older, &[&key], 0).is_err());
    }
}
