//! The operators' HTTP API (axum): upload artifacts, publish signed targets, deploy to
//! groups, list models and devices.
//!
//! | method | path | what |
//! | --- | --- | --- |
//! | GET | `/dashboard` | the dashboard: devices, rollouts (waves, chart over time), registry |
//! | PUT | `/api/v1/artifacts/{sha256}?chunk_size=N[&segments=K]` | upload an artifact (body: K big-endian u64 segment offsets, then its bytes) |
//! | GET | `/api/v1/repository/root` | the newest trusted root |
//! | POST | `/api/v1/repository/root` | rotate to the next root (`RootRequest`) |
//! | GET | `/api/v1/repository/roots` | the rotation chain (every root after version 1) |
//! | GET | `/api/v1/repository/targets` | the current operator-signed targets |
//! | GET | `/api/v1/artifacts` | what an upload may be (`max_bytes`) |
//! | GET, HEAD | `/files/{sha256}` | a stored file (artifact or golden file), with byte ranges; public |
//! | POST | `/api/v1/repository/targets` | publish signed targets and hash bins (`PublishRequest`) |
//! | GET | `/api/v1/repository/targets/{role}` | a hash bin (delegated targets role) |
//! | GET | `/api/v1/models` | the registry |
//! | POST | `/api/v1/deployments` | deploy (`DeployRequest`) |
//! | GET | `/api/v1/deployments` | every deployment |
//! | GET | `/api/v1/devices` | devices with their last report |
//! | POST | `/api/v1/rollouts` | start a rollout in waves (`RolloutRequest`) |
//! | GET | `/api/v1/rollouts` | every rollout |
//! | GET | `/api/v1/rollouts/{id}` | one rollout: waves, devices, timeline |
//! | POST | `/api/v1/rollouts/{id}/{pause,resume,abort,cancel}` | an operator's action (`ActionRequest`) |
//! | GET | `/api/v1/samples` | sampled inputs and outputs (`SampleRequest`; needs `deployer`) |

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use modelcast_proto::chunk::parse_digest;
use modelcast_proto::manifest::MAX_ARTIFACT_BYTES;
use modelcast_proto::metadata::Signed;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::auth::{Caller, Role, Tokens};
use crate::db::{Deployment, Stage};
use crate::fleet::{Fleet, RolloutAction, RolloutError};
use crate::group::Selector;
use crate::registry::{self, RegistryError};
use crate::repo::TargetsUpload;
use crate::rollout::RolloutSpec;
use crate::unix_now;

/// Body of `POST /api/v1/repository/targets`: operator-signed documents (the top-level
/// targets when they change, the hash bins re-signed).
#[derive(Debug, Serialize, Deserialize)]
pub struct PublishRequest {
    /// The signed documents.
    #[serde(flatten)]
    pub upload: TargetsUpload,
    /// Who publishes.
    pub published_by: String,
    /// The content key of each encrypted artifact the upload adds, sealed to the server's
    /// escrow key (`GET /api/v1/repository/escrow-key`), by artifact digest.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub key_escrow: BTreeMap<String, modelcast_proto::seal::KeyWrap>,
}

/// Largest body of `POST /api/v1/repository/targets`: a few re-signed bins (manifests only,
/// never golden data) fit many times over.
pub const PUBLISH_BODY_BYTES: usize = 4 * modelcast_proto::metadata::MAX_METADATA_BYTES;

/// Body of `POST /api/v1/repository/root`: the next root, signed by a threshold of the
/// current and of the new root keys.
#[derive(Debug, Serialize, Deserialize)]
pub struct RootRequest {
    /// The next root.
    pub root: Signed,
    /// The current targets re-signed under it (required when the targets keys change).
    pub targets: Option<Signed>,
    /// Who rotates.
    pub by: String,
}

/// Body of `POST /api/v1/rollouts`.
#[derive(Debug, Serialize, Deserialize)]
pub struct RolloutRequest {
    /// What to roll out, to whom, in which waves.
    #[serde(flatten)]
    pub spec: RolloutSpec,
    /// Who starts it (a token's name wins; may be left out when a token says it).
    #[serde(default)]
    pub by: String,
}

/// Body of `POST /api/v1/rollouts/{id}/{action}`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ActionRequest {
    /// Who acts.
    #[serde(default)]
    pub by: String,
}

/// Body of `POST /api/v1/deployments`.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeployRequest {
    /// Model name.
    pub model: String,
    /// Version.
    pub version: u64,
    /// Label selector.
    pub group: String,
    /// Who deploys (a token's name wins; may be left out when a token says it).
    #[serde(default)]
    pub by: String,
    /// Probation thresholds for the devices it moves (overriding theirs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probation: Option<modelcast_proto::desired::TrialThresholds>,
    /// Sampling of inputs and outputs on the devices it moves (off when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<modelcast_proto::desired::SamplingSpec>,
    /// Download policy of the devices it moves (rate, maintenance window, metered links).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download: Option<modelcast_proto::desired::DownloadPolicy>,
    /// The backend to pin the model to on the devices it moves (`tract`, `onnxruntime`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<modelcast_proto::engine::Backend>,
    /// A shadow phase on each device before the version serves there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<modelcast_proto::desired::ShadowSpec>,
    /// A traffic split on each device while the version is on probation there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<modelcast_proto::desired::CanarySpec>,
}

impl DeployRequest {
    /// `model` v`version` to `group`, with no terms of its own.
    pub fn new(model: &str, version: u64, group: &str) -> Self {
        DeployRequest {
            model: model.into(),
            version,
            group: group.into(),
            by: String::new(),
            probation: None,
            sampling: None,
            download: None,
            backend: None,
            shadow: None,
            canary: None,
        }
    }
}

/// Query of `GET /api/v1/samples`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SampleRequest {
    /// Model name.
    pub model: String,
    /// Only this version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Only this device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Sampled within this many seconds before now.
    #[serde(default = "default_window")]
    pub since_secs: u64,
    /// The newest this many (at most [`MAX_SAMPLES`]).
    #[serde(default = "default_sample_limit")]
    pub limit: usize,
}

/// Most samples one request returns.
pub const MAX_SAMPLES: usize = 10_000;
/// Most bytes of samples one request returns (about; the newest first).
pub const MAX_SAMPLE_RESPONSE_BYTES: usize = 32 * 1024 * 1024;

fn default_sample_limit() -> usize {
    1000
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn bad(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, e.to_string())
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

type ApiResult = Result<Response, ApiError>;

/// Paths anyone may read: the dashboard page itself (its data needs a token), health, the
/// API description.
fn public(path: &str) -> bool {
    matches!(path, "/" | "/api/v1/health" | "/api/v1/openapi.json")
}

/// The role a request needs: reads are for viewers, rotating the root is for admins,
/// everything else (uploads, publishing, deployments, rollouts) for deployers.
pub fn required_role(method: &axum::http::Method, path: &str) -> Role {
    use axum::http::Method;
    if path == "/api/v1/samples" {
        // What devices were asked and answered: data, not fleet state.
        Role::Deployer
    } else if *method == Method::GET || *method == Method::HEAD {
        Role::Viewer
    } else if path == "/api/v1/repository/root" || path.starts_with("/api/v1/enrolments/") {
        // Who may join the fleet is the admins' decision.
        Role::Admin
    } else {
        Role::Deployer
    }
}

/// Checks the bearer token against the role the request needs; hands the caller to the
/// handlers. Without a token file every caller is an anonymous admin.
/// Why a mutation must be refused as possibly forged by a web page the operator's browser
/// has open (CSRF): a request from another origin, or a POST a page could send without the
/// browser asking first (a "simple" request: no JSON content type). Every API client (the
/// CLI, scripts) sends JSON; an open API (no `--tokens`) has no credential a page lacks.
fn forged_from_a_browser(req: &axum::extract::Request) -> Option<(StatusCode, &'static str)> {
    use axum::http::{header, Method};
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return None;
    }
    let headers = req.headers();
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        let same = host.is_some_and(|h| {
            origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"))
                == Some(h)
        });
        if !same {
            return Some((
                StatusCode::FORBIDDEN,
                "a request from another origin may not change anything",
            ));
        }
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.trim_start().starts_with("application/json"));
    if *req.method() == Method::POST && !json {
        return Some((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "a POST must carry JSON (Content-Type: application/json)",
        ));
    }
    None
}

async fn authorize(
    State(tokens): State<Arc<Option<Tokens>>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path().to_string();
    if public(&path) {
        return next.run(req).await;
    }
    let caller = match tokens.as_ref() {
        None => Caller {
            name: None,
            role: Role::Admin,
        },
        Some(tokens) => {
            let presented = req
                .headers()
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            match presented.and_then(|t| tokens.check(t.trim())) {
                Some(c) => c,
                None => {
                    return ApiError(
                        StatusCode::UNAUTHORIZED,
                        "a valid API token is required (Authorization: Bearer …)".into(),
                    )
                    .into_response()
                }
            }
        }
    };
    if let Some((status, why)) = forged_from_a_browser(&req) {
        return ApiError(status, why.into()).into_response();
    }
    let needed = required_role(req.method(), &path);
    if caller.role < needed {
        let who = caller.name.as_deref().unwrap_or("-");
        return ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "{who} is a {}; {} {path} needs {needed}",
                caller.role,
                req.method()
            ),
        )
        .into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// What the API takes.
#[derive(Debug, Clone, Copy)]
pub struct ApiLimits {
    /// Largest artifact an upload may store (at most the protocol's
    /// [`MAX_ARTIFACT_BYTES`]).
    pub max_artifact_bytes: u64,
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            max_artifact_bytes: MAX_ARTIFACT_BYTES,
        }
    }
}

/// Body of `GET /api/v1/artifacts`: what an upload may be.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArtifactLimits {
    /// Largest artifact this server stores, in bytes.
    pub max_bytes: u64,
}

/// The API routes, guarded by `tokens` (open without them).
pub fn router(fleet: Arc<Fleet>, tokens: Option<Tokens>, limits: ApiLimits) -> Router {
    let guard = axum::middleware::from_fn_with_state(Arc::new(tokens), authorize);
    Router::new()
        .route("/", get(|| async { Redirect::to("/dashboard") }))
        .route("/api/v1/health", get(|| async { "ok" }))
        .route("/api/v1/status", get(status))
        .route("/api/v1/whoami", get(whoami))
        .route("/api/v1/fleet", get(fleet_summary))
        .route(
            "/api/v1/artifacts",
            get(move || async move {
                Json(ArtifactLimits {
                    max_bytes: limits.max_artifact_bytes,
                })
            }),
        )
        .route(
            "/api/v1/artifacts/{sha256}",
            put(upload)
                .get(artifact_info)
                .layer(DefaultBodyLimit::max(MAX_ARTIFACT_BYTES as usize)),
        )
        .route("/api/v1/repository/root", get(root).post(rotate_root))
        .route("/api/v1/repository/roots", get(roots))
        .route("/api/v1/repository/escrow-key", get(escrow_key))
        .route(
            "/api/v1/repository/targets",
            get(targets)
                .post(publish)
                .layer(DefaultBodyLimit::max(PUBLISH_BODY_BYTES)),
        )
        .route("/api/v1/repository/targets/{role}", get(delegated_targets))
        .route("/api/v1/models", get(models))
        .route("/api/v1/models/{name}", get(model_history))
        .route(
            "/api/v1/models/{name}/{version}/{action}",
            post(stage_model),
        )
        .route("/api/v1/deployments", get(deployments).post(deploy))
        .route("/api/v1/devices", get(devices))
        .route("/api/v1/devices/{id}", get(device))
        .route("/api/v1/devices/{id}/telemetry", get(device_telemetry))
        .route("/api/v1/devices/{id}/quarantine", post(quarantine))
        .route("/api/v1/enrolments", get(enrolments))
        .route("/api/v1/enrolments/{id}/{action}", post(decide_enrolment))
        .route("/api/v1/telemetry", get(telemetry))
        .route("/api/v1/alerts", get(alerts))
        .route("/api/v1/samples", get(samples))
        .route("/metrics", get(metrics))
        .route("/api/v1/rollouts", get(rollouts).post(start_rollout))
        .route("/api/v1/rollouts/{id}", get(rollout))
        .route("/api/v1/rollouts/{id}/{action}", post(act_on_rollout))
        .route("/api/v1/audit", get(audit))
        .route("/api/v1/openapi.json", get(openapi))
        .layer(guard)
        .layer(Extension(limits))
        // Public, as a static host or CDN holding the same files would be.
        .route("/files/{sha256}", get(crate::files::file))
        .merge(crate::console::router())
        .with_state(fleet)
}

/// The API of a chunk replica ([`crate::fleet::Role::Chunks`]): liveness and status only;
/// operators use the control server's.
pub fn replica_router(fleet: Arc<Fleet>) -> Router {
    Router::new()
        .route("/api/v1/health", get(|| async { "ok" }))
        .route("/api/v1/status", get(status))
        .with_state(fleet)
}

/// The API of a standby control server waiting for the lease ([`crate::lease`]): liveness,
/// and a status whose role is `standby`.
pub fn standby_router(mqtt_identity: String) -> Router {
    let status = crate::fleet::Status {
        role: "standby".into(),
        mqtt_identity,
        chunk_requests: Default::default(),
        telemetry: Default::default(),
        reports_over_budget: 0,
    };
    Router::new()
        .route("/api/v1/health", get(|| async { "ok" }))
        .route(
            "/api/v1/status",
            get(move || {
                let status = status.clone();
                async move { Json(status) }
            }),
        )
}

/// The server's role and the chunk requests it answered.
/// The server's escrow key, which publishers seal each encrypted version's content key to.
async fn escrow_key(State(fleet): State<Arc<Fleet>>) -> ApiResult {
    match fleet.repo().escrow_key() {
        Some(k) => Ok(Json(json!({ "key": k.to_hex() })).into_response()),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            "this server has no escrow key".into(),
        )),
    }
}

async fn status(State(fleet): State<Arc<Fleet>>) -> Json<crate::fleet::Status> {
    Json(fleet.status())
}

/// Whether the server holds an artifact (so a publisher need not send it again).
async fn artifact_info(State(fleet): State<Arc<Fleet>>, Path(sha256): Path<String>) -> ApiResult {
    let digest = parse_digest(&sha256).map_err(bad)?;
    match fleet.db().artifact(&digest).await.map_err(internal)? {
        Some(info) => Ok(Json(json!({
            "sha256": sha256,
            "size": info.size,
            "chunk_size": info.chunk_size,
            "segments": info.segments,
        }))
        .into_response()),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no artifact {sha256}"),
        )),
    }
}

#[derive(Deserialize)]
struct UploadQuery {
    chunk_size: u32,
    /// How many segment offsets precede the artifact in the body.
    #[serde(default)]
    segments: u32,
}

/// Most segment offsets an upload may give.
pub const MAX_UPLOAD_SEGMENTS: u32 = 1 << 16;

/// Reads the `count` big-endian u64 segment offsets that open an upload's body; the rest of
/// the frame they end in.
async fn read_segments(
    body: &mut Body,
    count: u32,
) -> Result<(Vec<u64>, axum::body::Bytes), ApiError> {
    use frames::next_frame;
    if count > MAX_UPLOAD_SEGMENTS {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("{count} segments: at most {MAX_UPLOAD_SEGMENTS}"),
        ));
    }
    let want = count as usize * 8;
    let mut prefix = Vec::with_capacity(want);
    let mut rest = axum::body::Bytes::new();
    while prefix.len() < want {
        let Some(frame) = next_frame(body).await.map_err(bad)? else {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("the body ends inside its {count} segment offsets"),
            ));
        };
        let take = (want - prefix.len()).min(frame.len());
        prefix.extend_from_slice(&frame[..take]);
        rest = frame.slice(take..);
    }
    let segments = prefix
        .chunks_exact(8)
        .map(|b| u64::from_be_bytes(b.try_into().expect("eight bytes")))
        .collect();
    Ok((segments, rest))
}

/// Streams the body into the registry ([`registry::Upload`]): chunk-sized records, hashed as
/// they come; kept only if the digest matches the path.
async fn upload(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
    Extension(limits): Extension<ApiLimits>,
    Path(sha256): Path<String>,
    Query(q): Query<UploadQuery>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> ApiResult {
    use frames::next_frame;
    let limit = limits.max_artifact_bytes;
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .map(|n| n.saturating_sub(u64::from(q.segments) * 8));
    let mut body = body;
    let (segments, first) = read_segments(&mut body, q.segments).await?;
    let begun = registry::Upload::begin(&fleet, &sha256, q.chunk_size, segments, limit, declared)
        .await
        .map_err(registry_error)?;
    let mut upload = match begun {
        registry::Begun::Stored(info) => {
            // Read the body to its end before answering: a client still sending would see
            // its connection reset instead of this answer.
            let mut drained = first.len() as u64;
            while let Some(bytes) = next_frame(&mut body).await.map_err(bad)? {
                drained += bytes.len() as u64;
                if drained > limit {
                    return Err(ApiError(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("the artifact is over this server's limit of {limit} bytes (--max-artifact-bytes)"),
                    ));
                }
            }
            return Ok((
                StatusCode::OK,
                Json(json!({ "sha256": sha256, "size": info.size, "stored": "already" })),
            )
                .into_response());
        }
        registry::Begun::New(upload) => upload,
    };
    if let Err(e) = upload.push(&first).await.map_err(registry_error) {
        upload.abandon().await;
        return Err(e);
    }
    loop {
        let pushed = match next_frame(&mut body).await {
            Ok(Some(bytes)) => upload.push(&bytes).await.map_err(registry_error),
            Ok(None) => break,
            Err(e) => Err(bad(e)),
        };
        if let Err(e) = pushed {
            upload.abandon().await;
            return Err(e);
        }
    }
    let size = upload
        .finish(&caller.name_or("-"))
        .await
        .map_err(registry_error)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "sha256": sha256, "size": size })),
    )
        .into_response())
}

async fn root(State(fleet): State<Arc<Fleet>>) -> Json<Signed> {
    Json(fleet.repo().root())
}

async fn roots(State(fleet): State<Arc<Fleet>>) -> ApiResult {
    Ok(Json(fleet.repo().root_chain().await.map_err(internal)?).into_response())
}

async fn rotate_root(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Bytes,
) -> ApiResult {
    let req: RootRequest = serde_json::from_slice(&body).map_err(bad)?;
    let who = caller.name_or(&req.by);
    let rotated = registry::rotate_root(&fleet, &req.root, req.targets.as_ref(), &who)
        .await
        .map_err(registry_error)?;
    Ok(Json(rotated).into_response())
}

async fn targets(State(fleet): State<Arc<Fleet>>) -> ApiResult {
    match fleet.repo().targets().await.map_err(internal)? {
        Some(t) => Ok(Json(t).into_response()),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            "no targets published yet".into(),
        )),
    }
}

/// A delegated targets role (a hash bin), as last signed.
async fn delegated_targets(State(fleet): State<Arc<Fleet>>, Path(role): Path<String>) -> ApiResult {
    match fleet.repo().delegated(&role).await.map_err(internal)? {
        Some(t) => Ok(Json(t).into_response()),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no targets role {role:?} has been published"),
        )),
    }
}

async fn publish(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Bytes,
) -> ApiResult {
    let req: PublishRequest = serde_json::from_slice(&body).map_err(bad)?;
    let who = caller.name_or(&req.published_by);
    let published = registry::publish(&fleet, &req.upload, &req.key_escrow, &who)
        .await
        .map_err(registry_error)?;
    Ok(Json(published).into_response())
}

pub use crate::registry::VersionHistory;

async fn model_history(State(fleet): State<Arc<Fleet>>, Path(name): Path<String>) -> ApiResult {
    let history = registry::history(&fleet, &name)
        .await
        .map_err(registry_error)?;
    Ok(Json(history).into_response())
}

/// Promotes a version to production (the one before it goes back to candidate) or retires
/// it (no new deployment or rollout may name it).
async fn stage_model(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
    Path((name, version, action)): Path<(String, u64, String)>,
    body: axum::body::Bytes,
) -> ApiResult {
    let stage = match action.as_str() {
        "promote" => Stage::Production,
        "retire" => Stage::Retired,
        _ => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no action {action:?}: promote or retire"),
            ))
        }
    };
    let req: ActionRequest = if body.is_empty() {
        ActionRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(bad)?
    };
    let who = caller.name_or(&req.by);
    let entry = registry::stage(&fleet, &name, version, stage, &who)
        .await
        .map_err(registry_error)?;
    Ok(Json(entry).into_response())
}

async fn models(State(fleet): State<Arc<Fleet>>) -> ApiResult {
    let entries = fleet.db().models().await.map_err(internal)?;
    Ok(Json(entries).into_response())
}

async fn deploy(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Bytes,
) -> ApiResult {
    let req: DeployRequest = serde_json::from_slice(&body).map_err(bad)?;
    let (d, updated) = registry::deploy(
        &fleet,
        Deployment {
            seq: 0,
            model: req.model,
            version: req.version,
            group: req.group,
            by: caller.name_or(&req.by),
            at: unix_now(),
            probation: req.probation,
            sampling: req.sampling,
            download: req.download,
            backend: req.backend,
            shadow: req.shadow,
            canary: req.canary,
        },
    )
    .await
    .map_err(registry_error)?;
    Ok(Json(json!({ "deployment": d, "devices_updated": updated })).into_response())
}

/// The answer to a refused or failed registry operation.
fn registry_error(e: RegistryError) -> ApiError {
    let status = match &e {
        RegistryError::Invalid(_) => StatusCode::BAD_REQUEST,
        RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
        RegistryError::Conflict(_) => StatusCode::CONFLICT,
        RegistryError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        RegistryError::Store(_) | RegistryError::Repository(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError(status, e.to_string())
}

#[derive(Deserialize)]
struct AuditQuery {
    #[serde(default)]
    since: u64,
    /// Only entries whose details name this device.
    #[serde(default)]
    device: Option<String>,
}

async fn audit(State(fleet): State<Arc<Fleet>>, Query(q): Query<AuditQuery>) -> ApiResult {
    let mut entries = fleet.db().audit(q.since).await.map_err(internal)?;
    if let Some(device) = &q.device {
        entries.retain(|e| names(&e.details, device));
    }
    Ok(Json(entries).into_response())
}

/// Whether `value` holds the string `id` anywhere (a device named in an audit entry's details).
fn names(value: &serde_json::Value, id: &str) -> bool {
    match value {
        serde_json::Value::String(s) => s == id,
        serde_json::Value::Array(a) => a.iter().any(|v| names(v, id)),
        serde_json::Value::Object(o) => o.values().any(|v| names(v, id)),
        _ => false,
    }
}

/// The API's OpenAPI 3 description.
async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

fn rollout_error(e: RolloutError) -> ApiError {
    match e {
        RolloutError::Invalid(m) => ApiError(StatusCode::BAD_REQUEST, m),
        RolloutError::NotFound(m) => ApiError(StatusCode::NOT_FOUND, m),
        RolloutError::Db(e) => internal(e),
    }
}

async fn start_rollout(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Bytes,
) -> ApiResult {
    let req: RolloutRequest = serde_json::from_slice(&body).map_err(bad)?;
    registry::check_not_retired(&fleet, &req.spec.model, req.spec.version)
        .await
        .map_err(registry_error)?;
    let who = caller.name_or(&req.by);
    let rollout = fleet
        .start_rollout(req.spec, &who)
        .await
        .map_err(rollout_error)?;
    Ok((StatusCode::CREATED, Json(rollout)).into_response())
}

async fn rollouts(State(fleet): State<Arc<Fleet>>) -> ApiResult {
    Ok(Json(fleet.rollouts()).into_response())
}

async fn rollout(State(fleet): State<Arc<Fleet>>, Path(id): Path<u64>) -> ApiResult {
    let r = fleet
        .rollout(id)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no rollout {id}")))?;
    Ok(Json(r).into_response())
}

async fn act_on_rollout(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
    Path((id, action)): Path<(u64, String)>,
    body: axum::body::Bytes,
) -> ApiResult {
    let action: RolloutAction = serde_json::from_value(json!(action)).map_err(|_| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no action {action:?}: pause, resume, abort or cancel"),
        )
    })?;
    let req: ActionRequest = if body.is_empty() {
        ActionRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(bad)?
    };
    let r = fleet
        .act_on_rollout(id, action, &caller.name_or(&req.by))
        .await
        .map_err(rollout_error)?;
    Ok(Json(r).into_response())
}

async fn deployments(State(fleet): State<Arc<Fleet>>) -> ApiResult {
    Ok(Json(fleet.db().deployments().await.map_err(internal)?).into_response())
}

/// `GET /api/v1/devices`: every device, or a page of them.
#[derive(Debug, Default, Deserialize)]
pub struct DeviceQuery {
    /// Skip this many (in id order).
    #[serde(default)]
    pub offset: usize,
    /// At most this many (1..=[`MAX_DEVICE_PAGE`]); all when absent.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Only devices whose id or a label (`key=value`) contains this.
    #[serde(default)]
    pub q: Option<String>,
}

/// The largest page of devices one request may ask for.
pub const MAX_DEVICE_PAGE: usize = 1000;

/// Devices with their last report, in id order; `X-Total-Count` says how many match in all
/// when a page was asked for.
async fn devices(State(fleet): State<Arc<Fleet>>, Query(q): Query<DeviceQuery>) -> ApiResult {
    let mut all = fleet.devices().await.map_err(internal)?;
    if let Some(needle) = q.q.as_deref().filter(|n| !n.is_empty()) {
        all.retain(|d| {
            d.id.contains(needle)
                || d.labels
                    .iter()
                    .any(|(k, v)| format!("{k}={v}").contains(needle))
        });
    }
    let Some(limit) = q.limit else {
        return Ok(Json(all).into_response());
    };
    if !(1..=MAX_DEVICE_PAGE).contains(&limit) {
        return Err(bad(format!("limit must be 1..={MAX_DEVICE_PAGE}")));
    }
    all.sort_by(|a, b| a.id.cmp(&b.id));
    let total = all.len();
    let page: Vec<_> = all.into_iter().skip(q.offset).take(limit).collect();
    Ok((
        [(
            axum::http::header::HeaderName::from_static("x-total-count"),
            total.to_string(),
        )],
        Json(page),
    )
        .into_response())
}

/// One device with its last report.
async fn device(State(fleet): State<Arc<Fleet>>, Path(id): Path<String>) -> ApiResult {
    fleet
        .devices()
        .await
        .map_err(internal)?
        .into_iter()
        .find(|d| d.id == id)
        .map(|d| Json(d).into_response())
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no device {id:?}")))
}

/// `GET /api/v1/whoami`: the caller's token name and role, and what this server does, so a
/// page can offer only what the caller may do (the API checks again regardless).
#[derive(Debug, Serialize, Deserialize)]
pub struct Whoami {
    /// The token's name; `None` when the API is open (no token file).
    pub name: Option<String>,
    /// Its role.
    pub role: Role,
    /// Whether the API needs tokens.
    pub tokens: bool,
    /// Whether the server enrols devices (`--enrol`).
    pub enrol: bool,
}

async fn whoami(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
) -> Json<Whoami> {
    Json(Whoami {
        tokens: caller.name.is_some(),
        name: caller.name,
        role: caller.role,
        enrol: fleet.enrols(),
    })
}

/// `GET /api/v1/fleet`: the fleet counted, so that a page need not read every device.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FleetSummary {
    /// Devices known.
    pub devices: usize,
    /// Of them, online.
    pub online: usize,
    /// Devices per state: `active`, `updating`, `waiting`, `failed`, `no model`, `unknown`.
    pub states: BTreeMap<String, usize>,
    /// Devices quarantined.
    pub quarantined: usize,
    /// Per model, devices serving each version.
    pub serving: BTreeMap<String, BTreeMap<u64, usize>>,
}

impl FleetSummary {
    /// Counts `devices`.
    pub fn of(devices: &[crate::db::DeviceEntry]) -> Self {
        use modelcast_proto::report::Phase;
        let mut s = FleetSummary {
            devices: devices.len(),
            ..Default::default()
        };
        for d in devices {
            s.online += usize::from(d.online);
            s.quarantined += usize::from(d.quarantine.is_some());
            let state = match &d.report {
                None => "unknown",
                Some(r) if r.models.is_empty() => "no model",
                Some(r) => {
                    let phases = r
                        .models
                        .values()
                        .filter_map(|m| m.update.as_ref().map(|u| u.phase));
                    // The worst of its models': failed, then moving, then held back.
                    let rank = |p: Phase| match p {
                        Phase::Failed => 3,
                        Phase::Downloading | Phase::Staging | Phase::Probation => 2,
                        Phase::Waiting => 1,
                        Phase::Active => 0,
                    };
                    match phases.max_by_key(|p| rank(*p)) {
                        Some(Phase::Failed) => "failed",
                        Some(Phase::Downloading | Phase::Staging | Phase::Probation) => "updating",
                        Some(Phase::Waiting) => "waiting",
                        _ => "active",
                    }
                }
            };
            *s.states.entry(state.into()).or_default() += 1;
            for (name, m) in d.report.iter().flat_map(|r| &r.models) {
                if let Some(v) = m.serving_version() {
                    *s.serving
                        .entry(name.clone())
                        .or_default()
                        .entry(v)
                        .or_default() += 1;
                }
            }
        }
        s
    }
}

async fn fleet_summary(State(fleet): State<Arc<Fleet>>) -> ApiResult {
    let devices = fleet.devices().await.map_err(internal)?;
    Ok(Json(FleetSummary::of(&devices)).into_response())
}

/// Body of `POST /api/v1/devices/{id}/quarantine`.
#[derive(Debug, Serialize, Deserialize)]
pub struct QuarantineRequest {
    /// `true` quarantines the device, `false` releases it.
    pub quarantined: bool,
    /// Why (kept with the quarantine and in the audit log).
    #[serde(default)]
    pub reason: String,
    /// Who acts (a token's name wins).
    #[serde(default)]
    pub by: String,
}

/// Quarantines or releases a device: while quarantined, what it sends is dropped unread.
async fn quarantine(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Json(req): Json<QuarantineRequest>,
) -> ApiResult {
    if !modelcast_proto::manifest::valid_name(&id) {
        return Err(bad(format!("bad device id {id:?}")));
    }
    let by = caller.name_or(&req.by);
    let q = req.quarantined.then(|| crate::db::Quarantine {
        by: by.clone(),
        at: unix_now(),
        reason: req.reason.clone(),
    });
    let action = if req.quarantined {
        "device.quarantine"
    } else {
        "device.release"
    };
    registry::record(
        &fleet,
        &by,
        action,
        json!({ "device": id, "reason": req.reason }),
    )
    .await
    .map_err(registry_error)?;
    let entry = fleet.quarantine(&id, q).await.map_err(internal)?;
    tracing::warn!(device = %id, %by, reason = %req.reason, quarantined = req.quarantined, "device quarantine changed");
    Ok(Json(entry).into_response())
}

/// Every device that asked to enrol: pending, enrolled, rejected or revoked.
async fn enrolments(State(fleet): State<Arc<Fleet>>) -> ApiResult {
    if !fleet.enrols() {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "this server does not enrol devices (start it with --enrol)".into(),
        ));
    }
    Ok(Json(fleet.enrolments().await.map_err(internal)?).into_response())
}

/// Body of `POST /api/v1/enrolments/{id}/{action}` (optional).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct EnrolmentDecision {
    /// Why (kept in the quarantine of a revoked device).
    #[serde(default)]
    pub reason: String,
    /// Who acts (a token's name wins).
    #[serde(default)]
    pub by: String,
}

/// Accepts or rejects a device waiting for a decision, or revokes an enrolled one.
async fn decide_enrolment(
    State(fleet): State<Arc<Fleet>>,
    Extension(caller): Extension<Caller>,
    Path((id, action)): Path<(String, String)>,
    body: Option<Json<EnrolmentDecision>>,
) -> ApiResult {
    if !modelcast_proto::manifest::valid_name(&id) {
        return Err(bad(format!("bad device id {id:?}")));
    }
    use crate::enrol::Verdict;
    let verdict = match action.as_str() {
        "accept" => Verdict::Accept,
        "reject" => Verdict::Reject,
        "revoke" => Verdict::Revoke,
        other => {
            return Err(bad(format!(
                "unknown action {other:?}: accept, reject or revoke"
            )))
        }
    };
    let req = body.map(|Json(b)| b).unwrap_or_default();
    let by = caller.name_or(&req.by);
    use crate::fleet::EnrolmentError as E;
    match fleet.decide_enrolment(&id, verdict, &by, &req.reason).await {
        Ok(entry) => Ok(Json(entry).into_response()),
        Err(e @ (E::Disabled | E::Unknown(_))) => {
            Err(ApiError(StatusCode::NOT_FOUND, e.to_string()))
        }
        Err(e @ E::NotPending { .. }) => Err(ApiError(StatusCode::CONFLICT, e.to_string())),
        Err(e @ E::Csr(_)) => Err(ApiError(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())),
        Err(E::Store(e)) => Err(internal(e)),
        Err(E::Pki(e)) => Err(internal(e)),
    }
}

/// Latency and error rate of a model (one version, or all) across a group over a window.
///
/// Only published versions count (devices could report any), and the window is read a slice
/// at a time, so a long window over a large fleet holds one slice's points at once.
async fn telemetry(
    State(fleet): State<Arc<Fleet>>,
    Query(question): Query<crate::telemetry::Question>,
) -> ApiResult {
    question.check().map_err(bad)?;
    let group = match &question.group {
        Some(g) => Some(Selector::parse(g).map_err(bad)?),
        None => None,
    };
    let labels: BTreeMap<String, BTreeMap<String, String>> = match group {
        Some(_) => fleet
            .db()
            .devices()
            .await
            .map_err(internal)?
            .into_iter()
            .map(|d| (d.id, d.labels))
            .collect(),
        None => BTreeMap::new(),
    };
    let published: std::collections::BTreeSet<u64> = fleet
        .db()
        .models()
        .await
        .map_err(internal)?
        .into_iter()
        .filter(|m| m.manifest.name == question.model)
        .map(|m| m.manifest.version)
        .collect();
    let accept = |device: &str, version: u64| {
        published.contains(&version)
            && match &group {
                None => true,
                Some(g) => labels.get(device).is_some_and(|l| g.matches(l)),
            }
    };
    let mut answer = crate::telemetry::Aggregator::new(&question, crate::unix_now_ms());
    let (from, to) = answer.window();
    for (a, b) in crate::telemetry::slices(from, to) {
        let points = fleet
            .db()
            .model_telemetry(&question.model, a, b)
            .await
            .map_err(internal)?;
        for p in &points {
            answer.add(p, accept);
        }
    }
    Ok(Json(answer.finish()).into_response())
}

#[derive(Deserialize)]
struct WindowQuery {
    #[serde(default = "default_window")]
    since_secs: u64,
}

fn default_window() -> u64 {
    3600
}

/// Which alerts to list.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct AlertQuery {
    /// One model's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// One version's (with `model`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Cleared ones too.
    #[serde(default)]
    pub all: bool,
}

/// Alerts, and the active ones grouped per version.
#[derive(Debug, Serialize, Deserialize)]
pub struct AlertList {
    /// The alerts asked for, oldest first.
    pub alerts: Vec<crate::drift::Alert>,
    /// Active alerts per version: how many devices raise each kind.
    pub versions: Vec<crate::drift::VersionAlerts>,
}

/// Drift and anomaly alerts per device, and per version.
async fn alerts(State(fleet): State<Arc<Fleet>>, Query(q): Query<AlertQuery>) -> ApiResult {
    let alerts: Vec<crate::drift::Alert> = fleet
        .db()
        .alerts()
        .await
        .map_err(internal)?
        .into_iter()
        .filter(|a| q.model.as_ref().is_none_or(|m| *m == a.model))
        .filter(|a| q.version.is_none_or(|v| v == a.version))
        .filter(|a| q.all || a.active())
        .collect();
    let versions = crate::drift::by_version(&alerts);
    Ok(Json(AlertList { alerts, versions }).into_response())
}

/// One device's telemetry reports over a window: the newest
/// [`crate::telemetry::MAX_DEVICE_REPORTS`] of them.
async fn device_telemetry(
    State(fleet): State<Arc<Fleet>>,
    Path(id): Path<String>,
    Query(q): Query<WindowQuery>,
) -> ApiResult {
    if q.since_secs == 0 || q.since_secs > crate::telemetry::MAX_WINDOW_SECS {
        return Err(bad(format!(
            "since_secs must be 1..={}",
            crate::telemetry::MAX_WINDOW_SECS
        )));
    }
    let now = crate::unix_now_ms();
    let from = now.saturating_sub(q.since_secs as i64 * 1000);
    let reports = fleet
        .db()
        .device_telemetry(&id, from, now, crate::telemetry::MAX_DEVICE_REPORTS)
        .await
        .map_err(internal)?;
    Ok(Json(reports).into_response())
}

/// Sampled inputs and outputs of one model, newest `limit` over the window, oldest first.
async fn samples(State(fleet): State<Arc<Fleet>>, Query(q): Query<SampleRequest>) -> ApiResult {
    if q.since_secs == 0 || q.since_secs > crate::telemetry::MAX_WINDOW_SECS {
        return Err(bad(format!(
            "since_secs must be 1..={}",
            crate::telemetry::MAX_WINDOW_SECS
        )));
    }
    if !(1..=MAX_SAMPLES).contains(&q.limit) {
        return Err(bad(format!("limit must be 1..={MAX_SAMPLES}")));
    }
    let now = crate::unix_now_ms();
    let query = crate::db::SampleQuery {
        model: q.model,
        version: q.version,
        device: q.device,
        from_ms: now.saturating_sub(q.since_secs as i64 * 1000),
        to_ms: now,
        limit: q.limit,
        max_bytes: MAX_SAMPLE_RESPONSE_BYTES,
    };
    let samples = fleet.db().samples(&query).await.map_err(internal)?;
    Ok(Json(samples).into_response())
}

/// Fleet-level gauges and the server's counters: OpenMetrics to a scraper that accepts it
/// (Prometheus does), else Prometheus' text format 0.0.4 (`promtool check metrics`, `curl`).
async fn metrics(State(fleet): State<Arc<Fleet>>, headers: axum::http::HeaderMap) -> ApiResult {
    let text = crate::metrics::render(&fleet).await.map_err(internal)?;
    let openmetrics = headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let (content_type, body) = if openmetrics {
        (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            text,
        )
    } else {
        (
            "text/plain; version=0.0.4; charset=utf-8",
            crate::metrics::to_text_format(&text),
        )
    };
    Ok(([(axum::http::header::CONTENT_TYPE, content_type)], body).into_response())
}

/// Reads an axum body frame by frame.
mod frames {
    use axum::body::{Body, Bytes};
    use http_body_util::BodyExt;

    pub async fn next_frame(body: &mut Body) -> Result<Option<Bytes>, axum::Error> {
        loop {
            match body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(e),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// (method, path) of every route this file declares in [`router`].
    fn declared() -> BTreeSet<(String, String)> {
        let source = include_str!("api.rs");
        let body = &source[source.find("pub fn router(").unwrap()..];
        let body = &body[..body.find("\n}\n").unwrap()];
        let mut out = BTreeSet::new();
        for call in body.split(".route(").skip(1) {
            let path = call.split('"').nth(1).unwrap().to_string();
            let args = &call[call.find(',').unwrap()..];
            for method in ["get", "post", "put", "delete"] {
                let direct = args.contains(&format!(" {method}("));
                let chained = args.contains(&format!(".{method}("));
                if direct || chained {
                    out.insert((method.to_string(), path.clone()));
                }
            }
        }
        out
    }

    #[test]
    fn the_openapi_document_describes_every_route_and_no_other() {
        let doc: serde_json::Value = serde_json::from_str(include_str!("openapi.json")).unwrap();
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                documented.insert((method.clone(), path.clone()));
            }
        }
        let declared = declared();
        assert!(declared.len() >= 15, "{declared:?}");
        assert_eq!(documented, declared);
    }

    #[test]
    fn roles_follow_what_a_request_changes() {
        use axum::http::Method;
        assert_eq!(required_role(&Method::GET, "/api/v1/devices"), Role::Viewer);
        assert_eq!(
            required_role(&Method::POST, "/api/v1/rollouts"),
            Role::Deployer
        );
        assert_eq!(
            required_role(&Method::PUT, "/api/v1/artifacts/x"),
            Role::Deployer
        );
        assert_eq!(
            required_role(&Method::POST, "/api/v1/repository/root"),
            Role::Admin
        );
        assert_eq!(
            required_role(&Method::POST, "/api/v1/enrolments/edge-1/accept"),
            Role::Admin
        );
        assert_eq!(
            required_role(&Method::GET, "/api/v1/enrolments"),
            Role::Viewer
        );
        assert!(public("/") && !public("/api/v1/audit") && !public("/api/v1/whoami"));
    }
}
