//! The server's state behind one storage interface ([`Storage`]): artifacts in chunks, the
//! model registry, the TUF repository's current metadata, devices, deployments, rollouts, the
//! audit log, per-device director counters, and telemetry as time series per device and per
//! model version.
//!
//! Two implementations: sled, embedded, the default for one box ([`open_embedded`]);
//! PostgreSQL, for a fleet served by several server replicas ([`connect`]).

mod chunk_files;
mod postgres;
mod sled_store;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use modelcast_proto::desired::{SamplingSpec, TrialThresholds};
use modelcast_proto::manifest::Manifest;
use modelcast_proto::metadata::Signed;
use modelcast_proto::report::DeviceReport;
use modelcast_proto::telemetry::{Sample, TelemetryReport};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::audit::AuditEntry;
use crate::drift::Alert;
pub use crate::drift::ModelInterval;
pub use crate::enrol::Enrolment;
use crate::rollout::Rollout;

/// A store failure.
#[derive(Debug, Error)]
pub enum DbError {
    /// sled failed.
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    /// PostgreSQL failed.
    #[error("database: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// The embedded store's artifact files failed.
    #[error("artifact files: {0}")]
    Files(String),
    /// No database connection could be had, or an operation gave up.
    #[error("database: {0}")]
    Pool(String),
    /// A record does not decode.
    #[error("store record {key} is corrupt: {reason}")]
    Corrupt {
        /// Which record.
        key: String,
        /// Why.
        reason: String,
    },
}

/// A stored artifact's layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactInfo {
    /// Bytes.
    pub size: u64,
    /// Chunk size it is stored (and served) in.
    pub chunk_size: u32,
    /// Offsets at which its chunking restarts ([`modelcast_proto::manifest::spans`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segments: Vec<u64>,
}

/// One published model version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEntry {
    /// The signed manifest's content.
    pub manifest: Manifest,
    /// Who published it.
    pub published_by: String,
    /// Unix seconds.
    pub published_at: i64,
    /// Where it stands in the registry.
    #[serde(default)]
    pub stage: Stage,
    /// Who moved it to that stage, and when (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged_by: Option<(String, i64)>,
    /// An encrypted version's content key sealed to the server's escrow key (never the key
    /// itself): what the director wraps for each device it sends the version to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_escrow: Option<modelcast_proto::seal::KeyWrap>,
}

/// A version's stage in the registry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Published; not yet vouched for.
    #[default]
    Candidate,
    /// Promoted: the version operators run in production.
    Production,
    /// Retired: it can no longer be deployed or rolled out.
    Retired,
}

/// A device as the server knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceEntry {
    /// Device id.
    pub id: String,
    /// Labels from its last report.
    pub labels: BTreeMap<String, String>,
    /// Its last state report.
    pub report: Option<DeviceReport>,
    /// Unix seconds of the last message.
    pub last_seen: i64,
    /// Its retained online status.
    pub online: bool,
    /// Set by an operator: everything the device sends is dropped unread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<Quarantine>,
    /// What was dropped of its traffic since the server started, by reason
    /// ([`crate::budget::Drops`]): filled in when devices are listed, never stored.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dropped: BTreeMap<String, u64>,
}

/// An operator's quarantine of a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantine {
    /// Who.
    pub by: String,
    /// Unix seconds.
    pub at: i64,
    /// Why.
    #[serde(default)]
    pub reason: String,
}

/// An operator's order: run `model` at `version` on every device of `group`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    /// Order of deployments; later ones win per model.
    pub seq: u64,
    /// Model name.
    pub model: String,
    /// Version.
    pub version: u64,
    /// Label selector.
    pub group: String,
    /// Who deployed.
    pub by: String,
    /// Unix seconds.
    pub at: i64,
    /// Probation thresholds for the devices it moves (overriding theirs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probation: Option<TrialThresholds>,
    /// Sampling of inputs and outputs on the devices it moves (off when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<SamplingSpec>,
    /// Download policy of the devices it moves (rate, maintenance window, metered links).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download: Option<modelcast_proto::desired::DownloadPolicy>,
    /// The backend it pins the model to on the devices it moves (their own choice when
    /// absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<modelcast_proto::engine::Backend>,
    /// A shadow phase on each device before the version serves there (none when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<modelcast_proto::desired::ShadowSpec>,
    /// A traffic split on each device while the version is on probation there (none when
    /// absent: it takes all traffic when it swaps in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<modelcast_proto::desired::CanarySpec>,
}

/// What was last published to a device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectorEntry {
    /// Version of the last director document (the device's counter).
    pub version: u64,
    /// What it said: target paths and the repository timestamp version.
    pub content: String,
}

/// A sampled request as the server keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSample {
    /// The device that sampled it.
    pub device: String,
    /// When the server received it, Unix milliseconds.
    pub received_ms: i64,
    /// The request and the model's answer.
    pub sample: Sample,
}

impl StoredSample {
    /// `sample` from `device`, received now (`received_ms`).
    pub fn new(device: &str, received_ms: i64, sample: &Sample) -> Self {
        StoredSample {
            device: device.into(),
            received_ms,
            sample: sample.clone(),
        }
    }
}

/// Which samples to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleQuery {
    /// Model name.
    pub model: String,
    /// Only this version.
    pub version: Option<u64>,
    /// Only this device.
    pub device: Option<String>,
    /// Sampled at or after, Unix milliseconds.
    pub from_ms: i64,
    /// Sampled at or before, Unix milliseconds.
    pub to_ms: i64,
    /// The newest this many.
    pub limit: usize,
    /// And no more than about this many bytes of stored samples: the newest sample that goes
    /// past it is the last one returned.
    pub max_bytes: usize,
}

impl SampleQuery {
    /// Whether `s` answers the query.
    pub fn matches(&self, s: &StoredSample) -> bool {
        s.sample.model == self.model
            && self.version.is_none_or(|v| v == s.sample.version)
            && self.device.as_ref().is_none_or(|d| *d == s.device)
            && (self.from_ms..=self.to_ms).contains(&s.sample.at_ms)
    }
}

/// The server's store: what every part of the server reads and writes, whatever holds it.
///
/// Writes are durable once [`Storage::flush`] returns (sled batches them; PostgreSQL commits
/// each one). Decisions that will be published (a rollout's next wave) are flushed first.
#[async_trait::async_trait]
pub trait Storage: Send + Sync {
    /// Makes every write so far durable.
    async fn flush(&self) -> Result<(), DbError>;
    /// Stores one chunk of an artifact being uploaded.
    async fn put_chunk(&self, artifact: &[u8; 32], index: u32, data: &[u8]) -> Result<(), DbError>;
    /// Marks an artifact complete (after its digest was checked).
    async fn put_artifact(&self, artifact: &[u8; 32], info: &ArtifactInfo) -> Result<(), DbError>;
    /// Removes an artifact and its chunks (a failed upload).
    async fn remove_artifact(&self, artifact: &[u8; 32]) -> Result<(), DbError>;
    /// A complete artifact's layout.
    async fn artifact(&self, artifact: &[u8; 32]) -> Result<Option<ArtifactInfo>, DbError>;
    /// One chunk of an artifact.
    async fn chunk(&self, artifact: &[u8; 32], index: u32) -> Result<Option<Bytes>, DbError>;
    /// Records a published version, or replaces its entry (a stage change).
    async fn put_model(&self, entry: &ModelEntry) -> Result<(), DbError>;
    /// One published version.
    async fn model(&self, name: &str, version: u64) -> Result<Option<ModelEntry>, DbError>;
    /// Every published version, by name then version.
    async fn models(&self) -> Result<Vec<ModelEntry>, DbError>;
    /// A repository document (`root`, `root.N`, `targets`, `snapshot`, `timestamp`).
    async fn repo_doc(&self, role: &str) -> Result<Option<Signed>, DbError>;
    /// Replaces a repository document.
    async fn put_repo_doc(&self, role: &str, doc: &Signed) -> Result<(), DbError>;
    /// One device.
    async fn device(&self, id: &str) -> Result<Option<DeviceEntry>, DbError>;
    /// Every device, by id.
    async fn devices(&self) -> Result<Vec<DeviceEntry>, DbError>;
    /// Records a device.
    async fn put_device(&self, entry: &DeviceEntry) -> Result<(), DbError>;
    /// One device's enrolment record.
    async fn enrolment(&self, id: &str) -> Result<Option<Enrolment>, DbError>;
    /// Every enrolment record, by device id.
    async fn enrolments(&self) -> Result<Vec<Enrolment>, DbError>;
    /// Records (or replaces) a device's enrolment record.
    async fn put_enrolment(&self, entry: &Enrolment) -> Result<(), DbError>;
    /// Appends a deployment, assigning its sequence number (from [`Storage::next_id`]).
    async fn add_deployment(&self, d: Deployment) -> Result<Deployment, DbError>;
    /// A new id, unique and increasing, shared by deployments and rollouts (later ones win).
    async fn next_id(&self) -> Result<u64, DbError>;
    /// Stores a rollout (flush before acting on it).
    async fn put_rollout(&self, rollout: &Rollout) -> Result<(), DbError>;
    /// Every rollout, oldest first.
    async fn rollouts(&self) -> Result<Vec<Rollout>, DbError>;
    /// Appends an entry to the audit log, atomically: its position and its link to the
    /// previous entry cannot race with another append, from this server or another replica.
    async fn append_audit(
        &self,
        who: &str,
        action: &str,
        details: serde_json::Value,
        at: i64,
    ) -> Result<AuditEntry, DbError>;
    /// The audit log from position `since` on (1 is the first entry).
    async fn audit(&self, since: u64) -> Result<Vec<AuditEntry>, DbError>;
    /// Every deployment, oldest first.
    async fn deployments(&self) -> Result<Vec<Deployment>, DbError>;
    /// What was last published to `device`.
    async fn director(&self, device: &str) -> Result<DirectorEntry, DbError>;
    /// Records what was published to `device`.
    async fn put_director(&self, device: &str, entry: &DirectorEntry) -> Result<(), DbError>;
    /// Stores a telemetry report and its points per model, atomically. Returns false if the
    /// report (device, sequence number, interval end) is already stored: devices send a report
    /// again until its delivery is confirmed, and the first copy is kept.
    async fn add_telemetry(&self, report: &TelemetryReport) -> Result<bool, DbError>;
    /// Model `model`'s points (every version, device and slot) whose interval ended within
    /// `from_ms..=to_ms`, by interval end.
    async fn model_telemetry(
        &self,
        model: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<ModelInterval>, DbError>;
    /// A device's newest `limit` reports whose interval ended within `from_ms..=to_ms`, by
    /// interval end.
    async fn device_telemetry(
        &self,
        device: &str,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<TelemetryReport>, DbError>;
    /// Removes telemetry whose interval ended before `before_ms`, samples taken before then,
    /// and alerts cleared before then; returns the reports removed.
    async fn prune_telemetry(&self, before_ms: i64) -> Result<u64, DbError>;
    /// Stores `device`'s samples; a sample already stored (same device and id) is kept as it
    /// is. Returns how many were new.
    async fn add_samples(
        &self,
        device: &str,
        received_ms: i64,
        samples: &[Sample],
    ) -> Result<u64, DbError>;
    /// The newest samples that answer `query`, within its limits, oldest first (by sampling
    /// time, then device and id).
    async fn samples(&self, query: &SampleQuery) -> Result<Vec<StoredSample>, DbError>;
    /// Stores an alert, new or changed (cleared), by its id.
    async fn put_alert(&self, alert: &Alert) -> Result<(), DbError>;
    /// Every alert, by id.
    async fn alerts(&self) -> Result<Vec<Alert>, DbError>;
}

/// The server's store, shared.
pub type Db = Arc<dyn Storage>;

/// Opens (or creates) the embedded sled store in `dir`.
pub fn open_embedded(dir: &Path) -> Result<Db, DbError> {
    Ok(Arc::new(sled_store::SledStore::open(dir)?))
}

/// Connects to a PostgreSQL database (`postgres://user@host:port/name`), creating the schema
/// if it is missing.
pub async fn connect(url: &str) -> Result<Db, DbError> {
    Ok(Arc::new(postgres::PgStore::connect(url).await?))
}

/// Decodes a stored JSON record; `key` names it in the error.
fn decode<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T, DbError> {
    serde_json::from_slice(bytes).map_err(|e| DbError::Corrupt {
        key: key.into(),
        reason: e.to_string(),
    })
}

/// Encodes a record as JSON.
fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize")
}
