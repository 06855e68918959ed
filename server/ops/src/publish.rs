//! The publisher's side (runs in the operators' CLI, next to their offline keys): turn an ONNX
//! file into the artifact devices load (tract's NNEF by default, or the ONNX file as is), build
//! its manifest — chunk digests, interface, golden vectors computed with tract on that very
//! artifact — and sign the next version of the repository's targets. Conversion happens here,
//! before signing, so what the operators sign is byte for byte what devices run.

use std::collections::BTreeMap;

use modelcast_proto::engine::Backend;
use modelcast_proto::keys::SigningKey;
use modelcast_proto::manifest::{
    segmented_chunk_digests, ArtifactForm, Attachment, GoldenVector, LatencyBudget, Manifest,
    ModelFormat, DEFAULT_CHUNK_SIZE, MAX_GOLDEN_FILE_BYTES,
};
use modelcast_proto::metadata::{format_expiry, Signed};
use thiserror::Error;

use crate::convert::{convert, tensor_data, Choice, ConvertError};
use crate::onnx::{inspect, OnnxError};
use crate::shapes::{self, ShapeError, ShapeSpec};

/// Manifests made here are valid for a year.
pub const MANIFEST_LIFETIME_SECS: i64 = crate::signing::SIGNED_LIFETIME_SECS;
/// Tolerance written into generated golden vectors.
pub const GOLDEN_TOLERANCE: &str = "0.0001";

/// Why a model cannot be published.
#[derive(Debug, Error)]
pub enum PublishError {
    /// The file is not a usable ONNX model.
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    /// The input shapes cannot be settled.
    #[error(transparent)]
    Shapes(#[from] ShapeError),
    /// tract cannot run the model, or its artifact does not prove out.
    #[error(transparent)]
    Convert(#[from] ConvertError),
    /// This version is already in the repository.
    #[error("{name} version {version} is already published")]
    AlreadyPublished {
        /// Model name.
        name: String,
        /// Version.
        version: u64,
    },
    /// The name or version is unusable.
    #[error("{0}")]
    Invalid(String),
}

/// The seed of the reference input the golden vector is made from: the same for every
/// version, so that a device holding one version's golden file has the next one's input
/// already (its chunks are copied, not downloaded; only the answers travel).
pub const REFERENCE_SEED: u64 = 1;

/// What to publish.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// Model name.
    pub name: String,
    /// Version (must exceed every published one).
    pub version: u64,
    /// Chunk size.
    pub chunk_size: u32,
    /// What devices receive: NNEF (converted here), the ONNX file as is, or NNEF where it
    /// proves out and ONNX otherwise.
    pub format: Choice,
    /// The inputs' shapes where the model leaves them symbolic.
    pub shapes: Vec<ShapeSpec>,
    /// Embed a golden vector (when it fits [`GOLDEN_INLINE_BYTES`]).
    pub golden: bool,
    /// Registry metadata.
    pub metadata: BTreeMap<String, String>,
    /// The latency devices must measure in warm-up runs before this version may serve.
    pub latency_budget: Option<LatencyBudget>,
    /// How far back devices running this version may be sent (a fleet rollback).
    pub fallback: Fallback,
    /// Carry the ONNX file too, as a second form beside an NNEF artifact, for devices that
    /// run ONNX Runtime (each device downloads one form: the director picks it).
    pub with_onnx: bool,
    /// The golden vectors' tolerance per backend, in place of [`GOLDEN_TOLERANCE`] there.
    pub tolerance: BTreeMap<Backend, String>,
    /// Encrypt the artifact with a fresh content key ([`seal_prepared`]): the server and
    /// the broker hold ciphertext; each device receives the key sealed to it.
    pub encrypt: bool,
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
            format: Choice::Auto,
            shapes: Vec::new(),
            golden: true,
            metadata: BTreeMap::new(),
            latency_budget: None,
            fallback: Fallback::InService,
            with_onnx: false,
            tolerance: BTreeMap::new(),
            encrypt: false,
        }
    }
}

/// Largest golden vector (input and output bytes) carried inside the signed manifest (which
/// travels in the metadata of every device running the version). A larger one goes into a
/// golden file beside the artifact, which the manifest names by size and hashes.
pub const GOLDEN_INLINE_BYTES: usize = 16 * 1024;

/// Largest `metadata_props` value copied into the manifest's metadata.
pub const METADATA_PROP_BYTES: usize = 1024;

/// An artifact ready to upload and its manifest.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// What devices download: NNEF tar or ONNX bytes, as the manifest's format says.
    pub artifact: Vec<u8>,
    /// The artifacts of the manifest's other forms, in the order of [`Manifest::forms`].
    pub forms: Vec<Vec<u8>>,
    /// The golden file, when the golden vector is too large for the manifest
    /// ([`Manifest::golden_file`] names it).
    pub golden_file: Option<Vec<u8>>,
    /// Its manifest.
    pub manifest: Manifest,
    /// Why the artifact is ONNX when NNEF was preferred.
    pub fallback_reason: Option<String>,
    /// Graph outputs left out (not tensors), with why.
    pub dropped_outputs: Vec<(String, crate::onnx::NotServed)>,
    /// `metadata_props` keys too large to copy into the manifest.
    pub props_left_out: Vec<String>,
    /// Largest NNEF-vs-ONNX difference on the reference input, where NNEF was proved.
    pub nnef_max_diff: Option<f64>,
}

/// Prepares an ONNX model (self-contained: see [`crate::onnx::self_contained`]) for
/// publishing: settles its input shapes, converts it to the requested format, proves the
/// artifact with the device engine and builds the manifest of the result.
pub fn prepare(onnx: &[u8], opts: &PublishOptions, now: i64) -> Result<Prepared, PublishError> {
    if !modelcast_proto::manifest::valid_name(&opts.name) {
        return Err(PublishError::Invalid(format!(
            "bad model name {:?}",
            opts.name
        )));
    }
    // Before the conversion, which may take minutes (the manifest checks them again).
    for t in opts.tolerance.values() {
        modelcast_proto::manifest::parse_tolerance(t)
            .map_err(|e| PublishError::Invalid(e.to_string()))?;
    }
    let info = inspect(onnx)?;
    let inputs = shapes::resolve(&info.inputs, &opts.shapes)?;
    let output_names: Vec<String> = info.outputs.iter().map(|o| o.name.clone()).collect();
    // A model whose non-tensor outputs were dropped is published without them.
    let pruned;
    let onnx = if info.dropped_outputs.is_empty() {
        onnx
    } else {
        pruned = crate::onnx::self_contained(onnx, std::path::Path::new("."))?;
        &pruned[..]
    };
    let mut converted = convert(
        &opts.name,
        onnx,
        &inputs,
        &output_names,
        opts.format,
        REFERENCE_SEED,
    );
    let mut fixed_note = None;
    if let (Err(ConvertError::FixedOnly { reason, .. }), true) =
        (&converted, opts.shapes.is_empty())
    {
        // The operator bounded nothing: the symbolic batch was our default, so take the
        // model at its declared shapes instead, and say so.
        fixed_note = Some(format!(
            "inputs fixed at their declared shapes: tract cannot plan the model with a symbolic batch ({reason})"
        ));
        let fixed = crate::convert::fixed_at_declared(&inputs);
        converted = convert(
            &opts.name,
            onnx,
            &fixed,
            &output_names,
            opts.format,
            REFERENCE_SEED,
        );
    }
    let converted = converted?;
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
    if converted.format == ModelFormat::Nnef {
        metadata.insert("source_sha256".into(), modelcast_proto::sha256_hex(onnx));
    }
    if let Some(note) = &fixed_note {
        let mut note = note.clone();
        note.truncate(METADATA_PROP_BYTES);
        metadata.insert("shapes".into(), note);
    }
    if let Some(why) = &converted.fallback_reason {
        let mut why = why.clone();
        why.truncate(METADATA_PROP_BYTES);
        metadata.insert("format_reason".into(), why);
    }
    let mut props_left_out = Vec::new();
    for (k, v) in &info.metadata_props {
        if v.len() <= METADATA_PROP_BYTES && k.len() <= 64 {
            metadata.entry(format!("onnx.{k}")).or_insert(v.clone());
        } else {
            props_left_out.push(k.clone());
        }
    }
    let segments = crate::segments::segments(converted.format, &converted.artifact);
    // The ONNX file beside its NNEF conversion: proved with it (the NNEF answer was checked
    // against the ONNX one on the device engine, for the same interface).
    let mut forms = Vec::new();
    let mut form_bytes = Vec::new();
    if opts.with_onnx && converted.format == ModelFormat::Nnef {
        let segments = crate::segments::segments(ModelFormat::Onnx, onnx);
        forms.push(ArtifactForm::of(
            ModelFormat::Onnx,
            onnx,
            opts.chunk_size,
            segments,
        ));
        form_bytes.push(onnx.to_vec());
    }
    let mut manifest = Manifest {
        format: modelcast_proto::FORMAT_VERSION,
        name: opts.name.clone(),
        version: opts.version,
        model_format: converted.format,
        size: converted.artifact.len() as u64,
        sha256: modelcast_proto::sha256_hex(&converted.artifact),
        chunk_size: opts.chunk_size,
        chunks: segmented_chunk_digests(&converted.artifact, opts.chunk_size, &segments),
        segments,
        inputs: converted.inputs,
        outputs: converted.outputs,
        golden: vec![],
        golden_file: None,
        expires: format_expiry(now + MANIFEST_LIFETIME_SECS),
        metadata,
        probation: None,
        latency_budget: opts.latency_budget,
        memory_bytes: converted.memory_bytes,
        fallback_to: None,
        forms,
        tolerance: opts.tolerance.clone(),
        encryption: None,
    };
    let (input, output) = &converted.reference;
    let golden_bytes: usize = input
        .iter()
        .chain(output)
        .map(|t| t.values.bytes().len())
        .sum();
    let finite = output
        .iter()
        .all(|t| t.values.to_f64().iter().all(|v| v.is_finite()));
    let mut golden_file = None;
    if opts.golden && finite {
        let vector = GoldenVector {
            inputs: tensor_data(input),
            outputs: tensor_data(output),
            tolerance: GOLDEN_TOLERANCE.into(),
        };
        if golden_bytes <= GOLDEN_INLINE_BYTES {
            manifest.golden.push(vector);
        } else {
            let bytes = serde_json::to_vec(&[vector]).expect("golden vectors serialize");
            if bytes.len() as u64 <= MAX_GOLDEN_FILE_BYTES {
                manifest.golden_file = Some(Attachment::of(&bytes, opts.chunk_size));
                golden_file = Some(bytes);
            } else {
                manifest.metadata.insert(
                    "golden".into(),
                    format!("left out: {} bytes exceed the {MAX_GOLDEN_FILE_BYTES} of a golden file; the artifact was proved at publishing", bytes.len()),
                );
            }
        }
    } else if opts.golden {
        manifest.metadata.insert(
            "golden".into(),
            "left out: the reference answer is not finite".into(),
        );
    }
    manifest
        .validate()
        .map_err(|e| PublishError::Invalid(e.to_string()))?;
    Ok(Prepared {
        artifact: converted.artifact,
        forms: form_bytes,
        golden_file,
        manifest,
        fallback_reason: converted.fallback_reason,
        dropped_outputs: info.dropped_outputs,
        props_left_out,
        nnef_max_diff: converted.nnef_max_diff,
    })
}

/// Encrypts a prepared artifact with a fresh content key ([`modelcast_proto::seal`]): from
/// here on the artifact is the ciphertext, and the manifest describes it (size, chunks,
/// digests; the golden file, which stays in clear, is chunked as the ciphertext is). Returns
/// the content key sealed to the server's `escrow` key; the key itself is dropped (zeroed).
pub fn seal_prepared(
    prepared: &mut Prepared,
    escrow: &modelcast_proto::seal::SealingKey,
) -> Result<modelcast_proto::seal::KeyWrap, PublishError> {
    use modelcast_proto::seal::{sealed_layout, ContentKey, Encryption, ESCROW};
    if !prepared.forms.is_empty() {
        return Err(PublishError::Invalid(
            "an encrypted model comes in one form: publish it without --with-onnx".into(),
        ));
    }
    let m = &mut prepared.manifest;
    let key = ContentKey::generate();
    let sealed = key.seal_artifact(&prepared.artifact, m.chunk_size, &m.segments);
    let (size, chunk_size, segments) = sealed_layout(m.size, m.chunk_size, &m.segments);
    m.encryption = Some(Encryption::new(m.size, m.chunk_size));
    m.size = size;
    m.chunk_size = chunk_size;
    m.chunks = segmented_chunk_digests(&sealed, chunk_size, &segments);
    m.segments = segments;
    m.sha256 = modelcast_proto::sha256_hex(&sealed);
    if let (Some(bytes), Some(g)) = (&prepared.golden_file, &mut m.golden_file) {
        *g = Attachment::of(bytes, chunk_size);
    }
    m.validate()
        .map_err(|e| PublishError::Invalid(e.to_string()))?;
    prepared.artifact = sealed;
    Ok(escrow.wrap(&key, ESCROW, &m.sha256))
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
) -> Result<Prepared, PublishError> {
    let io = |e: std::io::Error| PublishError::Invalid(format!("{}: {e}", path.display()));
    let api = |e: crate::client::ClientError| PublishError::Invalid(e.to_string());
    let signing = |e: crate::signing::SigningError| match e {
        crate::signing::SigningError::Present { .. } => PublishError::AlreadyPublished {
            name: opts.name.clone(),
            version: opts.version,
        },
        e => PublishError::Invalid(e.to_string()),
    };
    // Re-sign only what a threshold of the targets keys signed before, under a root reached
    // from the operators' own.
    let repo = crate::signing::Repository::open(client, trusted_root).map_err(signing)?;
    let versions: Vec<u64> = match client.model_history(&opts.name) {
        Ok(history) => history.iter().map(|h| h.entry.manifest.version).collect(),
        Err(crate::client::ClientError::Api { status: 404, .. }) => Vec::new(),
        Err(e) => return Err(api(e)),
    };
    if versions.contains(&opts.version) {
        return Err(PublishError::AlreadyPublished {
            name: opts.name.clone(),
            version: opts.version,
        });
    }
    let newest = versions.iter().copied().max();
    let onnx = std::fs::read(path).map_err(io)?;
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let onnx = crate::onnx::self_contained(&onnx, dir)?;
    let mut prepared = prepare(&onnx, opts, now)?;
    drop(onnx);
    let escrow_wrap = match opts.encrypt {
        true => {
            let escrow = client.escrow_key().map_err(api)?;
            Some(seal_prepared(&mut prepared, &escrow)?)
        }
        false => None,
    };
    let mut manifest = prepared.manifest.clone();
    let sent = client
        .upload_segmented(
            &manifest.sha256,
            manifest.chunk_size,
            &manifest.segments,
            &prepared.artifact,
        )
        .map_err(api)?;
    // Held already, in another layout (published before, or by another version of this
    // tool): the manifest describes the chunks as the server holds them.
    if let Some((chunk_size, segments)) = held_layout(&sent) {
        if (chunk_size, &segments) != (manifest.chunk_size, &manifest.segments) {
            manifest.chunks = segmented_chunk_digests(&prepared.artifact, chunk_size, &segments);
            manifest.chunk_size = chunk_size;
            manifest.segments = segments;
            if let (Some(bytes), Some(g)) = (&prepared.golden_file, &mut manifest.golden_file) {
                *g = Attachment::of(bytes, chunk_size);
            }
        }
    }
    prepared.artifact = Vec::new();
    for (form, bytes) in manifest.forms.iter_mut().zip(&prepared.forms) {
        if manifest.chunk_size != opts.chunk_size {
            // The artifact is held in another chunk size: the forms follow it.
            form.chunks = segmented_chunk_digests(bytes, manifest.chunk_size, &form.segments);
        }
        let sent = client
            .upload_segmented(&form.sha256, manifest.chunk_size, &form.segments, bytes)
            .map_err(api)?;
        let Some((held_chunk_size, segments)) = held_layout(&sent) else {
            continue;
        };
        // Held already: in the manifest's chunk size (one numbering for every form), its
        // chunks described as the server holds them.
        if held_chunk_size != manifest.chunk_size {
            return Err(PublishError::Invalid(format!(
                "the server holds the {} form ({}) in chunks of {held_chunk_size} bytes, the {} artifact in chunks of {}: publish without --with-onnx",
                form.model_format, form.sha256, manifest.model_format, manifest.chunk_size,
            )));
        }
        if segments != form.segments {
            form.chunks = segmented_chunk_digests(bytes, manifest.chunk_size, &segments);
            form.segments = segments;
        }
    }
    prepared.forms = Vec::new();
    if let (Some(bytes), Some(g)) = (&prepared.golden_file, &manifest.golden_file) {
        client
            .upload(&g.sha256, manifest.chunk_size, bytes)
            .map_err(api)?;
    }
    prepared.golden_file = None;
    manifest.fallback_to = match opts.fallback {
        Fallback::InService => {
            let deployed = client
                .deployments()
                .map_err(api)?
                .into_iter()
                .filter(|d| d.model == manifest.name && d.version < manifest.version)
                .map(|d| d.version)
                .min();
            deployed.or(newest)
        }
        Fallback::To(v) => Some(v),
        Fallback::Never => None,
    };
    manifest
        .validate()
        .map_err(|e| PublishError::Invalid(e.to_string()))?;
    let keys: Vec<&SigningKey> = targets_keys.iter().collect();
    let upload = repo.add(&manifest, newest, &keys, now).map_err(signing)?;
    client
        .publish(&modelcast_server::api::PublishRequest {
            upload,
            published_by: by.into(),
            key_escrow: escrow_wrap
                .map(|w| (manifest.sha256.clone(), w))
                .into_iter()
                .collect(),
        })
        .map_err(api)?;
    prepared.manifest = manifest;
    Ok(prepared)
}

/// The layout (chunk size and segments) the server holds a file in, from its answer to an
/// upload, when it held the file already (`None` for a file just stored, in the layout sent).
fn held_layout(sent: &serde_json::Value) -> Option<(u32, Vec<u64>)> {
    let chunk_size = sent["chunk_size"]
        .as_u64()
        .and_then(|c| u32::try_from(c).ok())?;
    let segments = serde_json::from_value::<Vec<u64>>(sent["segments"].clone())
        .ok()
        .or_else(|| sent["segments"].is_null().then(Vec::new))?;
    Some((chunk_size, segments))
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
        opts.format = Choice::Onnx;
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
    }
}
