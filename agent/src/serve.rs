//! The local inference API — the Open Inference Protocol (KServe v2) as Triton speaks it: JSON
//! and binary tensors (`kserve.rs` is the codec), model metadata, configuration, readiness and
//! statistics per version — over the set of serving models.
//!
//! [`Models`] holds the serving model of each name behind one `ArcSwap`: a swap is a single
//! atomic pointer exchange, and a request that already holds an `Arc` to the old model
//! finishes on it. A name may also have a [`Canary`]: a new version on probation that
//! answers a share of the requests naming no version ([`route`]). Clients may name a version
//! by number or by label, `stable` (the serving one) or `canary`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use modelcast_proto::desired::CanarySpec;
use modelcast_proto::manifest::{DataType, TensorSpec};
use serde_json::{json, Value};

use crate::config::ServeConfig;
use crate::engine::{EngineError, LoadedModel};
use crate::kserve;
use crate::metrics::{ErrorKind, InferenceLabels, Metrics};
use crate::sampling::Sampler;
use crate::telemetry::{Collector, Summary};
use modelcast_proto::report::Slot;
use tokio::sync::mpsc;

/// How one inference request went, for probation: sent to the driver, dropped when its queue
/// is full (a sample is enough).
#[derive(Debug, Clone)]
pub struct RequestOutcome {
    /// Model name.
    pub model: String,
    /// The slot that answered.
    pub slot: Slot,
    /// Answered (`false`: the model failed; bad requests are not counted).
    pub ok: bool,
    /// Time to run it.
    pub latency: std::time::Duration,
}

/// A new version serving a share of its name's requests beside the stable one, while on
/// probation (a deployment's `custom.canary`).
pub struct Canary {
    /// The new version.
    pub model: Arc<LoadedModel>,
    /// Its share, and the header that keeps clients on one version.
    pub spec: CanarySpec,
    /// Requests split by count so far.
    counted: AtomicU64,
}

impl Canary {
    /// Whether the next request, with `key` the value of the spec's header if it had one,
    /// goes to the canary.
    fn takes(&self, key: Option<&[u8]>) -> bool {
        match key {
            Some(value) if self.spec.key.is_some() => self.spec.by_key(value),
            _ => self
                .spec
                .by_count(self.counted.fetch_add(1, Ordering::Relaxed)),
        }
    }
}

/// The serving model of each name, the new versions serving a share beside them (canaries),
/// and those in a shadow phase.
#[derive(Default)]
pub struct Models {
    inner: ArcSwap<BTreeMap<String, Arc<LoadedModel>>>,
    canaries: ArcSwap<BTreeMap<String, Arc<Canary>>>,
    shadows: ArcSwap<BTreeMap<String, Arc<crate::shadow::Feed>>>,
    /// Models between two versions in a low-memory swap: answered 503 meanwhile.
    swapping: ArcSwap<std::collections::BTreeSet<String>>,
    /// Inference requests running now (a shadow phase's candidate runs only when a core is
    /// free of them).
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
}

impl Models {
    /// The serving model called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<LoadedModel>> {
        self.inner.load().get(name).cloned()
    }

    /// Every loaded version that answers requests: the serving ones, then the canaries.
    pub fn answering(&self) -> Vec<Arc<LoadedModel>> {
        let serving = self.inner.load();
        let canaries = self.canaries.load();
        serving
            .values()
            .cloned()
            .chain(canaries.values().map(|c| c.model.clone()))
            .collect()
    }

    /// Names of the serving models.
    pub fn names(&self) -> Vec<String> {
        self.inner.load().keys().cloned().collect()
    }

    /// The count of inference requests running now.
    pub fn in_flight(&self) -> Arc<std::sync::atomic::AtomicUsize> {
        self.in_flight.clone()
    }

    /// The shadow phase the model called `name` is in, if any.
    pub fn shadow(&self, name: &str) -> Option<Arc<crate::shadow::Feed>> {
        self.shadows.load().get(name).cloned()
    }

    /// Starts (`Some`) or ends (`None`) mirroring `name`'s requests to a shadow phase.
    pub fn set_shadow(&self, name: &str, feed: Option<Arc<crate::shadow::Feed>>) {
        self.shadows.rcu(|current| {
            let mut next = (**current).clone();
            match &feed {
                Some(f) => next.insert(name.to_string(), f.clone()),
                None => next.remove(name),
            };
            next
        });
    }

    /// The canary of `name`, if it has one.
    pub fn canary(&self, name: &str) -> Option<Arc<Canary>> {
        self.canaries.load().get(name).cloned()
    }

    /// Has `model` answer `spec`'s share of its name's requests beside the serving one;
    /// returns the canary it replaced.
    pub fn set_canary(&self, model: Arc<LoadedModel>, spec: CanarySpec) -> Option<Arc<Canary>> {
        let name = model.manifest().name.clone();
        let canary = Arc::new(Canary {
            model,
            spec,
            counted: AtomicU64::new(0),
        });
        let mut previous = None;
        self.canaries.rcu(|current| {
            let mut next = (**current).clone();
            previous = next.insert(name.clone(), canary.clone());
            next
        });
        previous
    }

    /// Ends `name`'s split: the canary answers nothing more (requests running on it finish).
    pub fn take_canary(&self, name: &str) -> Option<Arc<Canary>> {
        let mut taken = None;
        self.canaries.rcu(|current| {
            let mut next = (**current).clone();
            taken = next.remove(name);
            next
        });
        taken
    }

    /// Whether `name` is between two versions in a low-memory swap.
    pub fn swapping(&self, name: &str) -> bool {
        self.swapping.load().contains(name)
    }

    /// Marks `name` as between two versions (its requests get 503) or not.
    pub fn set_swapping(&self, name: &str, swapping: bool) {
        self.swapping.rcu(|current| {
            let mut next = (**current).clone();
            if swapping {
                next.insert(name.to_string());
            } else {
                next.remove(name);
            }
            next
        });
    }

    /// Takes the serving model of `name` out: nothing of that name serves until the next
    /// [`Models::swap_in`] (requests already holding it finish on it).
    pub fn take(&self, name: &str) -> Option<Arc<LoadedModel>> {
        let mut taken = None;
        self.inner.rcu(|current| {
            let mut next = (**current).clone();
            taken = next.remove(name);
            next
        });
        taken
    }

    /// Makes `model` the serving one of its name; returns the one it replaced.
    pub fn swap_in(&self, model: Arc<LoadedModel>) -> Option<Arc<LoadedModel>> {
        let name = model.manifest().name.clone();
        let mut previous = None;
        self.inner.rcu(|current| {
            let mut next = (**current).clone();
            previous = next.insert(name.clone(), model.clone());
            next
        });
        previous
    }
}

/// What the inference routes (HTTP and gRPC) share: the serving models and where each
/// request's outcome goes.
#[derive(Clone)]
pub struct Api {
    pub(crate) models: Arc<Models>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) telemetry: Arc<Collector>,
    pub(crate) sampler: Arc<Sampler>,
    pub(crate) outcomes: mpsc::Sender<RequestOutcome>,
    pub(crate) limits: ServeConfig,
    pub(crate) max_tensor_bytes: usize,
    /// Whether the device's link is metered: the local API sets it, the control loop reads
    /// it.
    pub(crate) metered: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Api {
    /// The state of the inference API: request outcomes go to `outcomes`, and the requests
    /// `sampler` draws are kept whole.
    pub fn new(
        models: Arc<Models>,
        metrics: Arc<Metrics>,
        telemetry: Arc<Collector>,
        sampler: Arc<Sampler>,
        outcomes: mpsc::Sender<RequestOutcome>,
        limits: ServeConfig,
        metered: Arc<tokio::sync::watch::Sender<bool>>,
    ) -> Api {
        Api {
            models,
            metrics,
            telemetry,
            sampler,
            outcomes,
            limits,
            max_tensor_bytes: limits.tensor_limit(),
            metered,
        }
    }
}

/// The KServe v2 routes, `GET /metrics` and the device's own `/v1/link`. Bodies over the
/// limits' `max_body_bytes` get a 413. Serve it with the peers' addresses
/// (`into_make_service_with_connect_info::<SocketAddr>`).
pub fn router(api: Api) -> Router {
    let max_body = api.limits.max_body_bytes;
    Router::new()
        .route("/metrics", get(prometheus))
        .route("/v1/link", get(link_state).put(set_link))
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(ready))
        .route("/v2/repository/index", post(repository_index))
        .route(
            "/v2/repository/models/{name}/{action}",
            post(|| async {
                error(
                    StatusCode::BAD_REQUEST,
                    "models are loaded and unloaded by the fleet (modelcast deploy), not by clients",
                )
            }),
        )
        .route("/v2/models/stats", get(all_stats))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/config", get(model_config))
        .route("/v2/models/{name}/stats", get(model_stats))
        .route("/v2/models/{name}/infer", post(infer))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(model_metadata_v),
        )
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(model_ready_v),
        )
        .route(
            "/v2/models/{name}/versions/{version}/config",
            get(model_config_v),
        )
        .route(
            "/v2/models/{name}/versions/{version}/stats",
            get(model_stats_v),
        )
        .route("/v2/models/{name}/versions/{version}/infer", post(infer_v))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(api)
}

async fn prometheus(State(api): State<Api>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        api.metrics.encode(),
    )
        .into_response()
}

/// Whether the device's link is metered.
async fn link_state(State(api): State<Api>) -> Json<Value> {
    Json(json!({ "metered": *api.metered.borrow() }))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkState {
    metered: bool,
}

/// Says whether the device's link is metered (a network manager's hook, say): downloads
/// their deployments do not allow over a metered link pause until it is not. Only the device
/// itself (a loopback peer) may say so.
async fn set_link(
    State(api): State<Api>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    body: Bytes,
) -> Response {
    if !peer.ip().is_loopback() {
        return error(
            StatusCode::FORBIDDEN,
            "only the device itself may say whether its link is metered",
        );
    }
    match serde_json::from_slice::<LinkState>(&body) {
        Ok(state) => {
            api.metered.send_replace(state.metered);
            Json(json!({ "metered": state.metered })).into_response()
        }
        Err(e) => error(
            StatusCode::BAD_REQUEST,
            format!("expected {{\"metered\": true|false}}: {e}"),
        ),
    }
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, Json(json!({ "error": message.to_string() }))).into_response()
}

/// The server's name in its metadata.
pub(crate) const SERVER_NAME: &str = "modelcast-agent";

async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": SERVER_NAME,
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": kserve::EXTENSIONS,
    }))
}

async fn ready(State(api): State<Api>) -> StatusCode {
    if api.models.names().is_empty() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

async fn model_ready(State(api): State<Api>, Path(name): Path<String>) -> StatusCode {
    if api.models.get(&name).is_some() {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    }
}

async fn model_ready_v(
    State(api): State<Api>,
    Path((name, version)): Path<(String, String)>,
) -> StatusCode {
    if lookup(&api, &name, Some(&version)).is_ok() {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    }
}

/// The serving models, as Triton's repository index lists them.
async fn repository_index(State(api): State<Api>) -> Json<Value> {
    let models: Vec<Value> = api
        .models
        .answering()
        .iter()
        .map(|m| {
            json!({
                "name": m.manifest().name,
                "version": m.manifest().version.to_string(),
                "state": "READY",
            })
        })
        .collect();
    Json(Value::Array(models))
}

fn spec_json(specs: &[TensorSpec]) -> Vec<Value> {
    specs
        .iter()
        .map(|s| json!({ "name": s.name, "datatype": s.datatype, "shape": s.metadata_shape() }))
        .collect()
}

/// Triton's name for a type in a model configuration.
fn config_type(dt: DataType) -> String {
    match dt {
        DataType::Bytes => "TYPE_STRING".into(),
        dt => format!("TYPE_{}", dt.name()),
    }
}

fn config_json(specs: &[TensorSpec]) -> Vec<Value> {
    specs
        .iter()
        .map(|s| json!({ "name": s.name, "data_type": config_type(s.datatype), "dims": s.metadata_shape() }))
        .collect()
}

/// Why no loaded model answers a name and version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Missing {
    /// Nothing of that name serves.
    #[error("model {0:?} is not serving")]
    NotServing(String),
    /// The model is between two versions in a low-memory swap (answered 503).
    #[error("model {0:?} is between two versions (low-memory swap): retry shortly")]
    Swapping(String),
    /// The label `canary`, and the model has none.
    #[error("model {0:?} has no canary")]
    NoCanary(String),
    /// A version that is not loaded.
    #[error("model {name:?} serves {serving}, not {asked}")]
    NotLoaded {
        /// The model.
        name: String,
        /// What it serves (`version 1`, or `versions 1 (stable) and 2 (canary)`).
        serving: String,
        /// The version asked for.
        asked: String,
    },
}

/// The model `version` names (a number, or the label `stable` or `canary`), or the serving
/// one.
pub(crate) fn lookup(
    api: &Api,
    name: &str,
    version: Option<&str>,
) -> Result<Arc<LoadedModel>, Missing> {
    let model = api
        .models
        .get(name)
        .ok_or_else(|| match api.models.swapping(name) {
            true => Missing::Swapping(name.into()),
            false => Missing::NotServing(name.into()),
        })?;
    let canary = api.models.canary(name);
    let Some(v) = version else {
        return Ok(model);
    };
    let stable = model.manifest().version;
    match v {
        "stable" => Ok(model),
        "canary" => canary
            .map(|c| c.model.clone())
            .ok_or_else(|| Missing::NoCanary(name.into())),
        v if v == stable.to_string() => Ok(model),
        v => match canary {
            Some(c) if v == c.model.manifest().version.to_string() => Ok(c.model.clone()),
            canary => Err(Missing::NotLoaded {
                name: name.into(),
                serving: match canary {
                    Some(c) => format!(
                        "versions {stable} (stable) and {} (canary)",
                        c.model.manifest().version
                    ),
                    None => format!("version {stable}"),
                },
                asked: v.into(),
            }),
        },
    }
}

/// The model that answers an inference request: the one `version` names, else the canary
/// for its share (by `key`, the value of the canary's header if the request has it), else
/// the serving one.
pub(crate) fn route(
    api: &Api,
    name: &str,
    version: Option<&str>,
    key: Option<&[u8]>,
) -> Result<Arc<LoadedModel>, Missing> {
    if version.is_none() {
        if let Some(canary) = api.models.canary(name) {
            if api.models.get(name).is_some() && canary.takes(key) {
                return Ok(canary.model.clone());
            }
        }
    }
    lookup(api, name, version)
}

/// The header a canary of `name` is keyed by, if it has one.
pub(crate) fn canary_key(api: &Api, name: &str) -> Option<String> {
    api.models.canary(name)?.spec.key.clone()
}

async fn model_metadata(State(api): State<Api>, Path(name): Path<String>) -> Response {
    metadata(&api, &name, None)
}

async fn model_metadata_v(
    State(api): State<Api>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    metadata(&api, &name, Some(&version))
}

fn metadata(api: &Api, name: &str, version: Option<&str>) -> Response {
    match lookup(api, name, version) {
        Ok(model) => {
            let m = model.manifest();
            // Every version of the name that answers: the serving one, and its canary.
            let mut versions = vec![];
            if let Some(stable) = api.models.get(name) {
                versions.push(stable.manifest().version.to_string());
            }
            let canary = api.models.canary(name);
            if let Some(c) = &canary {
                versions.push(c.model.manifest().version.to_string());
            }
            let is_canary = canary.is_some_and(|c| Arc::ptr_eq(&c.model, &model));
            let mut body = json!({
                "name": m.name,
                "versions": versions,
                "platform": model.platform(),
                "inputs": spec_json(&m.inputs),
                "outputs": spec_json(&m.outputs),
                "parameters": {
                    "slot": model.slot().to_string(),
                    "sha256": m.sha256,
                    "engine": model.backend_name(),
                    "label": if is_canary { "canary" } else { "stable" },
                },
            });
            if model.fp16_widened() {
                // Its FP16 operations compute in FP32 (`[engine] fp16`).
                body["parameters"]["fp16_computed_as"] = json!("FP32");
            }
            Json(body).into_response()
        }
        Err(e) => error(StatusCode::NOT_FOUND, e),
    }
}

async fn model_config(State(api): State<Api>, Path(name): Path<String>) -> Response {
    config(&api, &name, None)
}

async fn model_config_v(
    State(api): State<Api>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    config(&api, &name, Some(&version))
}

/// The model's configuration in the shape of Triton's: the batch dimension, where a model has
/// one, is part of `dims` (`max_batch_size` 0), as for a Triton model without implicit
/// batching.
fn config(api: &Api, name: &str, version: Option<&str>) -> Response {
    match lookup(api, name, version) {
        Ok(model) => {
            let m = model.manifest();
            Json(json!({
                "name": m.name,
                "platform": model.platform(),
                "backend": model.backend(),
                "version_policy": { "specific": { "versions": [m.version.to_string()] } },
                "max_batch_size": 0,
                "input": config_json(&m.inputs),
                "output": config_json(&m.outputs),
                "parameters": m.metadata.iter().map(|(k, v)| (k.clone(), json!({ "string_value": v }))).collect::<serde_json::Map<_, _>>(),
            }))
            .into_response()
        }
        Err(e) => error(StatusCode::NOT_FOUND, e),
    }
}

fn duration_json(count: u64, ns: u64) -> Value {
    json!({ "count": count, "ns": ns })
}

fn stats_json(model: &LoadedModel) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    let s = model.stats();
    let (ok, ok_ns) = (s.success.load(Relaxed), s.success_ns.load(Relaxed));
    let (fail, fail_ns) = (s.fail.load(Relaxed), s.fail_ns.load(Relaxed));
    json!({
        "name": model.manifest().name,
        "version": model.manifest().version.to_string(),
        "last_inference": s.last_ms.load(Relaxed),
        "inference_count": ok,
        "execution_count": ok,
        "inference_stats": {
            "success": duration_json(ok, ok_ns),
            "fail": duration_json(fail, fail_ns),
            "queue": duration_json(0, 0),
            "compute_input": duration_json(0, 0),
            "compute_infer": duration_json(ok, ok_ns),
            "compute_output": duration_json(0, 0),
            "cache_hit": duration_json(s.plan_hits.load(Relaxed), 0),
            "cache_miss": duration_json(s.plan_builds.load(Relaxed), 0),
        },
        "batch_stats": [],
    })
}

async fn all_stats(State(api): State<Api>) -> Json<Value> {
    let stats: Vec<Value> = api
        .models
        .answering()
        .iter()
        .map(|m| stats_json(m))
        .collect();
    Json(json!({ "model_stats": stats }))
}

async fn model_stats(State(api): State<Api>, Path(name): Path<String>) -> Response {
    stats(&api, &name, None)
}

async fn model_stats_v(
    State(api): State<Api>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    stats(&api, &name, Some(&version))
}

fn stats(api: &Api, name: &str, version: Option<&str>) -> Response {
    match lookup(api, name, version) {
        Ok(model) => Json(json!({ "model_stats": [stats_json(&model)] })).into_response(),
        Err(e) => error(StatusCode::NOT_FOUND, e),
    }
}

async fn infer(
    State(api): State<Api>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    run_infer(api, name, None, headers, body).await
}

async fn infer_v(
    State(api): State<Api>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    run_infer(api, name, Some(version), headers, body).await
}

fn now_ms() -> u64 {
    u64::try_from(crate::clock::unix_ms()).unwrap_or(0)
}

async fn run_infer(
    api: Api,
    name: String,
    version: Option<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header_length = match headers.get(kserve::HEADER_LENGTH) {
        None => None,
        Some(v) => match v.to_str().ok().and_then(|s| s.trim().parse::<usize>().ok()) {
            Some(n) => Some(n),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("{} is not a length", kserve::HEADER_LENGTH),
                )
            }
        },
    };
    let max_tensor = api.max_tensor_bytes;
    let key = canary_key(&api, &name).and_then(|k| Some(headers.get(k)?.as_bytes().to_vec()));
    let answer = infer_with(
        &api,
        &name,
        version.as_deref(),
        key.as_deref(),
        move || kserve::parse_request(&body, header_length, max_tensor),
        |model, request, outputs| {
            let chosen = kserve::select_outputs(outputs, request)?;
            let m = model.manifest();
            kserve::encode_response(&m.name, m.version, request, &chosen)
        },
    )
    .await;
    match answer {
        Answer::Done(response) => match response.header_length {
            Some(n) => (
                [
                    (
                        axum::http::header::CONTENT_TYPE,
                        "application/octet-stream".to_string(),
                    ),
                    (
                        axum::http::HeaderName::from_static(kserve::HEADER_LENGTH),
                        n.to_string(),
                    ),
                ],
                response.body,
            )
                .into_response(),
            None => (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                response.body,
            )
                .into_response(),
        },
        Answer::NotFound(e) => error(StatusCode::NOT_FOUND, e),
        Answer::Unavailable(e) => {
            let mut response = error(StatusCode::SERVICE_UNAVAILABLE, e);
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
            response
        }
        Answer::Bad(e) => error(StatusCode::BAD_REQUEST, e),
        Answer::Failed(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// How one inference request ended, whatever protocol carried it.
pub(crate) enum Answer<R> {
    /// Answered; the encoded response.
    Done(R),
    /// No such model or version serves.
    NotFound(String),
    /// The model is between two versions (a low-memory swap): HTTP 503 with `Retry-After`,
    /// gRPC UNAVAILABLE.
    Unavailable(String),
    /// The request was malformed (HTTP 400, gRPC INVALID_ARGUMENT).
    Bad(String),
    /// The model failed to run it (HTTP 500, gRPC INTERNAL).
    Failed(String),
}

/// Runs one inference for any protocol: `decode` makes the request from its bytes and
/// `encode` the response from the outputs, both on the blocking thread that runs the model
/// (large tensors are work too), and everything else — metrics, probation outcomes, Triton
/// statistics, telemetry, sampling — is the same for HTTP and gRPC.
pub(crate) async fn infer_with<R: Send + 'static>(
    api: &Api,
    name: &str,
    version: Option<&str>,
    key: Option<&[u8]>,
    decode: impl FnOnce() -> Result<kserve::InferRequest, kserve::CodecError> + Send + 'static,
    encode: impl FnOnce(
            &LoadedModel,
            &kserve::InferRequest,
            &[crate::engine::HostTensor],
        ) -> Result<R, kserve::CodecError>
        + Send
        + 'static,
) -> Answer<R> {
    // Read before and after: a swap that starts or ends in between still answers 503.
    let swapping = api.models.swapping(name);
    let model = match route(api, name, version, key) {
        Ok(m) => m,
        Err(e) if swapping || matches!(e, Missing::Swapping(_)) => {
            return Answer::Unavailable(e.to_string())
        }
        Err(e) => return Answer::NotFound(e.to_string()),
    };
    let labels = InferenceLabels::new(
        &model.manifest().name,
        model.manifest().version,
        model.slot(),
    );
    let served = model.clone();
    let sampler = api.sampler.clone();
    let shadow = api.models.shadow(name);
    let in_flight = api.models.in_flight();
    let run = tokio::task::spawn_blocking(move || {
        // Counted while it runs: a shadow candidate waits for a free core.
        struct Running(Arc<std::sync::atomic::AtomicUsize>);
        impl Drop for Running {
            fn drop(&mut self) {
                self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        in_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _running = Running(in_flight);
        let request = decode()?;
        let drawn = sampler.draw(&served.manifest().name);
        let started = std::time::Instant::now();
        let outputs = served.run_counted(&request.inputs);
        let took = started.elapsed();
        // A share goes to the version in its shadow phase: copied into its queue, never
        // waited for.
        if let (Some(feed), Ok((outputs, _))) = (&shadow, &outputs) {
            feed.offer(&request.inputs, outputs, took);
        }
        let summary = outputs.as_ref().ok().map(|(o, _)| Summary::of(o));
        if let (true, Ok((outputs, _))) = (drawn, &outputs) {
            let m = served.manifest();
            sampler.keep(&m.name, m.version, served.slot(), &request.inputs, outputs);
        }
        let response = match &outputs {
            Ok((outputs, _)) => Some(encode(&served, &request, outputs)),
            Err(_) => None,
        };
        Ok::<_, kserve::CodecError>((outputs.map(|(_, used)| used), response, took, summary))
    });
    let (result, response, latency, summary) = match run.await {
        Ok(Ok((outputs, response, latency, summary))) => (Ok(outputs), response, latency, summary),
        Ok(Err(e)) => {
            api.metrics.inference_error(&labels, ErrorKind::BadRequest);
            return Answer::Bad(e.to_string());
        }
        Err(e) => (Err(e), None, std::time::Duration::ZERO, None),
    };
    // A bad request says nothing about the model.
    if !matches!(&result, Ok(Err(EngineError::BadInput(_)))) {
        let ok = matches!(&result, Ok(Ok(_)));
        let _ = api.outcomes.try_send(RequestOutcome {
            model: model.manifest().name.clone(),
            slot: model.slot(),
            ok,
            latency,
        });
        let plan = match &result {
            Ok(Ok(used)) => Some(*used),
            _ => None,
        };
        model.stats().record(ok, latency, plan, now_ms());
        if let Some(used) = plan {
            api.metrics.plans(&labels.slot(), used);
        }
    }
    let (name, slot, version) = (
        &model.manifest().name,
        model.slot(),
        model.manifest().version,
    );
    match (&result, &summary) {
        (Ok(Ok(_)), Some(summary)) => api.telemetry.served(name, slot, version, latency, summary),
        (Ok(Err(EngineError::BadInput(_))), _) => {}
        _ => api.telemetry.failed(name, slot, version),
    }
    match (result, response) {
        (Ok(Ok(_)), Some(Ok(response))) => {
            api.metrics.inference(&labels, latency);
            Answer::Done(response)
        }
        (Ok(Ok(_)), Some(Err(e))) => {
            api.metrics.inference_error(&labels, ErrorKind::BadRequest);
            Answer::Bad(e.to_string())
        }
        (Ok(Err(e @ EngineError::BadInput(_))), _) => {
            api.metrics.inference_error(&labels, ErrorKind::BadRequest);
            Answer::Bad(e.to_string())
        }
        (Ok(Err(e)), _) => {
            api.metrics.inference_error(&labels, ErrorKind::Failed);
            Answer::Failed(e.to_string())
        }
        (Ok(Ok(_)), None) => {
            api.metrics.inference_error(&labels, ErrorKind::Failed);
            Answer::Failed("no response encoded".into())
        }
        (Err(e), _) => {
            api.metrics.inference_error(&labels, ErrorKind::Failed);
            Answer::Failed(format!("inference task failed: {e}"))
        }
    }
}
