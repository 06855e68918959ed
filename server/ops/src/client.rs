//! A blocking client for the operator API, used by the `modelcast` CLI and the tests.

use std::time::Duration;

use modelcast_proto::metadata::Signed;
use serde::de::DeserializeOwned;
use thiserror::Error;

use modelcast_server::api::{
    ActionRequest, DeployRequest, PublishRequest, RolloutRequest, VersionHistory,
};
use modelcast_server::audit::AuditEntry;
use modelcast_server::db::{Deployment, DeviceEntry, ModelEntry};
use modelcast_server::fleet::RolloutAction;
use modelcast_server::rollout::Rollout;

/// A failed API call.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The server could not be reached or answered garbage.
    #[error("{0}")]
    Transport(String),
    /// The server refused, with its reason.
    #[error("server answered {status}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// What the server returned does not verify from the operators' own trust anchor.
    #[error("the server's {what} is not trusted: {reason}")]
    Untrusted {
        /// `root` or `targets`.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

fn transport(e: impl std::fmt::Display) -> ClientError {
    ClientError::Transport(e.to_string())
}

/// The operator API at one base URL.
pub struct Client {
    base: String,
    agent: ureq::Agent,
    token: Option<String>,
}

impl Client {
    /// A client for `base` (e.g. `http://127.0.0.1:7070`).
    pub fn new(base: &str) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(600)))
            .build()
            .into();
        Client {
            base: base.trim_end_matches('/').to_string(),
            agent,
            token: None,
        }
    }

    /// The same client, sending `token` as its bearer token.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token.filter(|t| !t.is_empty());
        self
    }

    fn bearer(&self) -> Option<String> {
        self.token.as_ref().map(|t| format!("Bearer {t}"))
    }

    fn get(&self, path: &str) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        let r = self.agent.get(format!("{}{path}", self.base));
        match self.bearer() {
            Some(b) => r.header("Authorization", b),
            None => r,
        }
    }

    fn post(&self, path: &str) -> ureq::RequestBuilder<ureq::typestate::WithBody> {
        let r = self.agent.post(format!("{}{path}", self.base));
        match self.bearer() {
            Some(b) => r.header("Authorization", b),
            None => r,
        }
    }

    fn put(&self, path: &str) -> ureq::RequestBuilder<ureq::typestate::WithBody> {
        let r = self.agent.put(format!("{}{path}", self.base));
        match self.bearer() {
            Some(b) => r.header("Authorization", b),
            None => r,
        }
    }

    /// The API's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn read<T: DeserializeOwned>(
        response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T, ClientError> {
        let mut response = response.map_err(transport)?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            let text = response.body_mut().read_to_string().unwrap_or_default();
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v.get("error")?.as_str().map(str::to_string))
                .unwrap_or(text);
            return Err(ClientError::Api { status, message });
        }
        response
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_json()
            .map_err(transport)
    }

    /// The current operator-signed targets, if any.
    pub fn targets(&self) -> Result<Option<Signed>, ClientError> {
        match Self::read(self.get("/api/v1/repository/targets").call()) {
            Ok(t) => Ok(Some(t)),
            Err(ClientError::Api { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A delegated targets role (hash bin) as the server holds it, if it exists.
    pub fn delegated_targets(&self, role: &str) -> Result<Option<Signed>, ClientError> {
        match Self::read(
            self.get(&format!("/api/v1/repository/targets/{role}"))
                .call(),
        ) {
            Ok(t) => Ok(Some(t)),
            Err(ClientError::Api { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The newest trusted root.
    pub fn root(&self) -> Result<Signed, ClientError> {
        Self::read(self.get("/api/v1/repository/root").call())
    }

    /// The chain of rotations the server serves (every root after version 1).
    pub fn roots(&self) -> Result<Vec<Signed>, ClientError> {
        Self::read(self.get("/api/v1/repository/roots").call())
    }

    /// The server's current root, trusted only by walking its chain of rotations from
    /// `trusted` (the operators' own root file): a compromised server cannot slip keys into
    /// what operators sign next.
    pub fn verified_root(&self, trusted: &Signed) -> Result<Signed, ClientError> {
        let untrusted = |reason: String| ClientError::Untrusted {
            what: "root",
            reason,
        };
        let chain = self.roots()?;
        let current = modelcast_proto::verify::update_root(trusted, &chain)
            .map_err(|e| untrusted(e.to_string()))?;
        if self.root()? != current {
            return Err(untrusted("it differs from the chain it serves".into()));
        }
        Ok(current)
    }

    /// The current targets, verified under [`Client::verified_root`]: what operators re-sign
    /// must be what they (a threshold of their targets keys) signed before.
    pub fn verified_targets(&self, trusted: &Signed) -> Result<Option<Signed>, ClientError> {
        let root = self.verified_root(trusted)?;
        let Some(targets) = self.targets()? else {
            return Ok(None);
        };
        let check = || -> Result<(), modelcast_proto::VerifyError> {
            let doc: modelcast_proto::metadata::Root = root.parse("root")?;
            targets
                .verify::<modelcast_proto::metadata::Targets>(&doc.role("targets")?, "targets")?;
            Ok(())
        };
        check().map_err(|e| ClientError::Untrusted {
            what: "targets",
            reason: e.to_string(),
        })?;
        Ok(Some(targets))
    }

    /// Rotates the repository to the next root.
    pub fn rotate_root(
        &self,
        request: &modelcast_server::api::RootRequest,
    ) -> Result<serde_json::Value, ClientError> {
        Self::read(self.post("/api/v1/repository/root").send_json(request))
    }

    /// What the server holds of artifact `sha256`: its size and the layout of its chunks.
    pub fn artifact(&self, sha256: &str) -> Result<serde_json::Value, ClientError> {
        Self::read(self.get(&format!("/api/v1/artifacts/{sha256}")).call())
    }

    /// Uploads an artifact in chunks of `chunk_size` from its start.
    pub fn upload(
        &self,
        sha256: &str,
        chunk_size: u32,
        artifact: &[u8],
    ) -> Result<serde_json::Value, ClientError> {
        self.upload_segmented(sha256, chunk_size, &[], artifact)
    }

    /// Uploads an artifact in chunks of `chunk_size` restarting at `segments`
    /// ([`modelcast_proto::manifest::spans`]). An artifact the server holds already is not
    /// sent: the answer says `"stored": "already"`, with the layout it is held in.
    pub fn upload_segmented(
        &self,
        sha256: &str,
        chunk_size: u32,
        segments: &[u64],
        artifact: &[u8],
    ) -> Result<serde_json::Value, ClientError> {
        // An artifact the server holds already (the same file under a new name or version)
        // is not sent again.
        if let Ok(held) = self.artifact(sha256) {
            return Ok(serde_json::json!({
                "sha256": sha256,
                "size": held["size"],
                "chunk_size": held["chunk_size"],
                "segments": held["segments"],
                "stored": "already",
            }));
        }
        // Over the server's limit: said before sending a byte.
        if let Ok(limits) = Self::read::<modelcast_server::api::ArtifactLimits>(
            self.get("/api/v1/artifacts").call(),
        ) {
            if artifact.len() as u64 > limits.max_bytes {
                return Err(ClientError::Api {
                    status: 413,
                    message: format!(
                        "an artifact of {} bytes is over this server's limit of {} bytes (--max-artifact-bytes)",
                        artifact.len(),
                        limits.max_bytes
                    ),
                });
            }
        }
        if segments.is_empty() {
            let path = format!("/api/v1/artifacts/{sha256}?chunk_size={chunk_size}");
            return Self::read(self.put(&path).send(artifact));
        }
        // The body: the segment offsets, then the artifact.
        let path = format!(
            "/api/v1/artifacts/{sha256}?chunk_size={chunk_size}&segments={}",
            segments.len()
        );
        let prefix: Vec<u8> = segments.iter().flat_map(|s| s.to_be_bytes()).collect();
        let length = prefix.len() + artifact.len();
        let mut body = std::io::Read::chain(&prefix[..], artifact);
        Self::read(
            self.put(&path)
                .header("Content-Length", length.to_string())
                .send(ureq::SendBody::from_reader(&mut body)),
        )
    }

    /// Publishes signed targets.
    pub fn publish(&self, request: &PublishRequest) -> Result<serde_json::Value, ClientError> {
        Self::read(self.post("/api/v1/repository/targets").send_json(request))
    }

    /// Deploys a version to a group.
    pub fn deploy(&self, request: &DeployRequest) -> Result<serde_json::Value, ClientError> {
        Self::read(self.post("/api/v1/deployments").send_json(request))
    }

    /// Starts a rollout.
    pub fn start_rollout(&self, request: &RolloutRequest) -> Result<Rollout, ClientError> {
        Self::read(self.post("/api/v1/rollouts").send_json(request))
    }

    /// Every rollout.
    pub fn rollouts(&self) -> Result<Vec<Rollout>, ClientError> {
        Self::read(self.get("/api/v1/rollouts").call())
    }

    /// Rollout `id`.
    pub fn rollout(&self, id: u64) -> Result<Rollout, ClientError> {
        Self::read(self.get(&format!("/api/v1/rollouts/{id}")).call())
    }

    /// Pauses, resumes, aborts or cancels rollout `id`.
    pub fn act_on_rollout(
        &self,
        id: u64,
        action: RolloutAction,
        by: &str,
    ) -> Result<Rollout, ClientError> {
        let action = serde_json::to_value(action).expect("actions serialize");
        let action = action.as_str().expect("a string");
        Self::read(
            self.post(&format!("/api/v1/rollouts/{id}/{action}"))
                .send_json(ActionRequest { by: by.into() }),
        )
    }

    /// Every deployment, oldest first.
    pub fn deployments(&self) -> Result<Vec<Deployment>, ClientError> {
        Self::read(self.get("/api/v1/deployments").call())
    }

    /// The audit log from position `since` on.
    pub fn audit(&self, since: u64) -> Result<Vec<AuditEntry>, ClientError> {
        Self::read(self.get(&format!("/api/v1/audit?since={since}")).call())
    }

    /// A model's history: every version with its stage and the devices serving it.
    pub fn model_history(&self, name: &str) -> Result<Vec<VersionHistory>, ClientError> {
        Self::read(self.get(&format!("/api/v1/models/{name}")).call())
    }

    /// Promotes (`promote`) or retires (`retire`) a version.
    pub fn stage_model(
        &self,
        name: &str,
        version: u64,
        action: &str,
        by: &str,
    ) -> Result<ModelEntry, ClientError> {
        Self::read(
            self.post(&format!("/api/v1/models/{name}/{version}/{action}"))
                .send_json(ActionRequest { by: by.into() }),
        )
    }

    /// Every device.
    pub fn devices(&self) -> Result<Vec<DeviceEntry>, ClientError> {
        Self::read(self.get("/api/v1/devices").call())
    }

    /// Quarantines `device` (with `reason`) or, with `quarantined` false, releases it.
    pub fn quarantine(
        &self,
        device: &str,
        quarantined: bool,
        reason: &str,
        by: &str,
    ) -> Result<DeviceEntry, ClientError> {
        Self::read(
            self.post(&format!("/api/v1/devices/{device}/quarantine"))
                .send_json(modelcast_server::api::QuarantineRequest {
                    quarantined,
                    reason: reason.into(),
                    by: by.into(),
                }),
        )
    }

    /// Every device that asked to enrol, and where it stands.
    pub fn enrolments(&self) -> Result<Vec<modelcast_server::enrol::Enrolment>, ClientError> {
        Self::read(self.get("/api/v1/enrolments").call())
    }

    /// An operator's decision on an enrolment: `accept`, `reject` or `revoke`.
    pub fn decide_enrolment(
        &self,
        device: &str,
        action: &str,
        reason: &str,
        by: &str,
    ) -> Result<modelcast_server::enrol::Enrolment, ClientError> {
        Self::read(
            self.post(&format!("/api/v1/enrolments/{device}/{action}"))
                .send_json(modelcast_server::api::EnrolmentDecision {
                    reason: reason.into(),
                    by: by.into(),
                }),
        )
    }

    /// The registry.
    pub fn models(&self) -> Result<Vec<ModelEntry>, ClientError> {
        Self::read(self.get("/api/v1/models").call())
    }

    /// The server's escrow key, which content keys of encrypted versions are sealed to.
    pub fn escrow_key(&self) -> Result<modelcast_proto::seal::SealingKey, ClientError> {
        let answer: serde_json::Value =
            Self::read(self.get("/api/v1/repository/escrow-key").call())?;
        let hex = answer["key"].as_str().unwrap_or_default();
        modelcast_proto::seal::SealingKey::from_hex(hex).map_err(transport)
    }

    /// The server's role and the chunk requests it answered.
    pub fn status(&self) -> Result<modelcast_server::fleet::Status, ClientError> {
        Self::read(self.get("/api/v1/status").call())
    }

    /// Latency and error rate of a model across a group over a window.
    pub fn telemetry(
        &self,
        q: &modelcast_server::telemetry::Question,
    ) -> Result<modelcast_server::telemetry::Answer, ClientError> {
        let mut r = self
            .get("/api/v1/telemetry")
            .query("model", &q.model)
            .query("since_secs", q.since_secs.to_string());
        if let Some(v) = q.version {
            r = r.query("version", v.to_string());
        }
        if let Some(g) = &q.group {
            r = r.query("group", g);
        }
        if let Some(s) = q.step_secs {
            r = r.query("step_secs", s.to_string());
        }
        Self::read(r.call())
    }

    /// One device's telemetry reports over the last `since_secs`.
    pub fn device_telemetry(
        &self,
        device: &str,
        since_secs: u64,
    ) -> Result<Vec<modelcast_proto::telemetry::TelemetryReport>, ClientError> {
        Self::read(
            self.get(&format!("/api/v1/devices/{device}/telemetry"))
                .query("since_secs", since_secs.to_string())
                .call(),
        )
    }

    /// Drift and anomaly alerts.
    pub fn alerts(
        &self,
        q: &modelcast_server::api::AlertQuery,
    ) -> Result<modelcast_server::api::AlertList, ClientError> {
        let mut r = self.get("/api/v1/alerts").query("all", q.all.to_string());
        if let Some(m) = &q.model {
            r = r.query("model", m);
        }
        if let Some(v) = q.version {
            r = r.query("version", v.to_string());
        }
        Self::read(r.call())
    }

    /// Sampled inputs and outputs (needs the `deployer` role).
    pub fn samples(
        &self,
        q: &modelcast_server::api::SampleRequest,
    ) -> Result<Vec<modelcast_server::db::StoredSample>, ClientError> {
        let mut r = self
            .get("/api/v1/samples")
            .query("model", &q.model)
            .query("since_secs", q.since_secs.to_string())
            .query("limit", q.limit.to_string());
        if let Some(v) = q.version {
            r = r.query("version", v.to_string());
        }
        if let Some(d) = &q.device {
            r = r.query("device", d);
        }
        Self::read(r.call())
    }

    /// The server's Prometheus metrics text.
    pub fn metrics(&self) -> Result<String, ClientError> {
        let mut response = self.get("/metrics").call().map_err(transport)?;
        let status = response.status().as_u16();
        let body = response.body_mut().read_to_string().map_err(transport)?;
        if status >= 300 {
            return Err(ClientError::Api {
                status,
                message: body,
            });
        }
        Ok(body)
    }
}
