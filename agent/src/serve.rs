//! The local inference API — the Open Inference Protocol (KServe v2) with JSON tensors — over
//! the set of serving models.
//!
//! [`Models`] holds the serving model of each name behind one `ArcSwap`: a swap is a single
//! atomic pointer exchange, and a request that already holds an `Arc` to the old model
//! finishes on it.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use modelcast_proto::manifest::{DataType, TensorSpec};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::engine::{EngineError, HostTensor, LoadedModel, Values};
use crate::metrics::{ErrorKind, Metrics, SlotLabels};
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

/// Most elements accepted in one request tensor.
const MAX_ELEMENTS: usize = 16 * 1024 * 1024;

/// The serving model of each name.
#[derive(Default)]
pub struct Models {
    inner: ArcSwap<BTreeMap<String, Arc<LoadedModel>>>,
}

impl Models {
    /// The serving model called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<LoadedModel>> {
        self.inner.load().get(name).cloned()
    }

    /// Names of the serving models.
    pub fn names(&self) -> Vec<String> {
        self.inner.load().keys().cloned().collect()
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

/// Shared state of the HTTP handlers.
#[derive(Clone)]
struct Api {
    models: Arc<Models>,
    metrics: Arc<Metrics>,
    telemetry: Arc<Collector>,
    sampler: Arc<Sampler>,
    outcomes: mpsc::Sender<RequestOutcome>,
}

/// The KServe v2 routes and `GET /metrics`; request outcomes go to `outcomes`, and the
/// requests `sampler` draws are kept whole.
pub fn router(
    models: Arc<Models>,
    metrics: Arc<Metrics>,
    telemetry: Arc<Collector>,
    sampler: Arc<Sampler>,
    outcomes: mpsc::Sender<RequestOutcome>,
) -> Router {
    Router::new()
        .route("/metrics", get(prometheus))
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/infer", post(infer))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(model_metadata_v),
        )
        .route("/v2/models/{name}/versions/{version}/infer", post(infer_v))
        .with_state(Api {
            models,
            metrics,
            telemetry,
            sampler,
            outcomes,
        })
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

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, Json(json!({ "error": message.to_string() }))).into_response()
}

async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "modelcast-agent",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": [],
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

fn spec_json(specs: &[TensorSpec]) -> Vec<Value> {
    specs
        .iter()
        .map(|s| json!({ "name": s.name, "datatype": s.datatype, "shape": s.shape }))
        .collect()
}

/// The serving model, or the 404 message.
fn lookup(api: &Api, name: &str, version: Option<&str>) -> Result<Arc<LoadedModel>, String> {
    let model = api
        .models
        .get(name)
        .ok_or_else(|| format!("model {name:?} is not serving"))?;
    if let Some(v) = version {
        if v != model.manifest().version.to_string() {
            return Err(format!(
                "model {name:?} serves version {}, not {v}",
                model.manifest().version
            ));
        }
    }
    Ok(model)
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
            Json(json!({
                "name": m.name,
                "versions": [m.version.to_string()],
                "platform": "onnx_tract",
                "inputs": spec_json(&m.inputs),
                "outputs": spec_json(&m.outputs),
                "parameters": { "slot": model.slot().to_string(), "sha256": m.sha256 },
            }))
            .into_response()
        }
        Err(e) => error(StatusCode::NOT_FOUND, e),
    }
}

#[derive(Deserialize)]
struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    inputs: Vec<RequestInput>,
}

#[derive(Deserialize)]
struct RequestInput {
    name: String,
    shape: Vec<u64>,
    datatype: DataType,
    data: Value,
}

fn flatten(value: &Value, out: &mut Vec<f64>) -> Result<(), String> {
    match value {
        Value::Array(items) => {
            for item in items {
                flatten(item, out)?;
                if out.len() > MAX_ELEMENTS {
                    return Err(format!("more than {MAX_ELEMENTS} elements"));
                }
            }
            Ok(())
        }
        Value::Number(n) => {
            out.push(n.as_f64().ok_or("number out of range")?);
            Ok(())
        }
        Value::Bool(b) => {
            out.push(if *b { 1.0 } else { 0.0 });
            Ok(())
        }
        other => Err(format!("tensor data must be numbers, found {other}")),
    }
}

/// Parses a KServe v2 JSON inference request (untrusted bytes from local clients) into the
/// request id and its input tensors.
pub fn parse_request(body: &[u8]) -> Result<(Option<String>, Vec<HostTensor>), String> {
    let req: InferRequest =
        serde_json::from_slice(body).map_err(|e| format!("invalid request: {e}"))?;
    let mut tensors = Vec::with_capacity(req.inputs.len());
    for input in req.inputs {
        let mut flat = Vec::new();
        flatten(&input.data, &mut flat).map_err(|e| format!("input {}: {e}", input.name))?;
        let values = Values::from_f64(input.datatype, &flat)
            .map_err(|e| format!("input {}: {e}", input.name))?;
        tensors.push(HostTensor {
            name: input.name,
            shape: input.shape,
            values,
        });
    }
    Ok((req.id, tensors))
}

async fn infer(State(api): State<Api>, Path(name): Path<String>, body: Bytes) -> Response {
    run_infer(api, name, None, body).await
}

async fn infer_v(
    State(api): State<Api>,
    Path((name, version)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    run_infer(api, name, Some(version), body).await
}

async fn run_infer(api: Api, name: String, version: Option<String>, body: Bytes) -> Response {
    let model = match lookup(&api, &name, version.as_deref()) {
        Ok(m) => m,
        Err(e) => return error(StatusCode::NOT_FOUND, e),
    };
    let labels = SlotLabels::new(&model.manifest().name, model.slot());
    let (id, inputs) = match parse_request(&body) {
        Ok(r) => r,
        Err(e) => {
            api.metrics.inference_error(&labels, ErrorKind::BadRequest);
            return error(StatusCode::BAD_REQUEST, e);
        }
    };
    let served = model.clone();
    let sampler = api.sampler.draw(&name).then(|| api.sampler.clone());
    // The model's own time, measured on the blocking thread: waiting for a thread or a core
    // is the host's load, not the model's speed, and would blur the comparison probation makes.
    // Telemetry's summary of the outputs (and a sample, if drawn) is made here too, off the
    // runtime's workers.
    let run = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let outputs = served.run(&inputs);
        let took = started.elapsed();
        let summary = outputs.as_ref().ok().map(|o| Summary::of(o));
        if let (Some(sampler), Ok(outputs)) = (sampler, &outputs) {
            let m = served.manifest();
            sampler.keep(&m.name, m.version, served.slot(), &inputs, outputs);
        }
        (outputs, took, summary)
    });
    let (result, latency, summary) = match run.await {
        Ok((outputs, latency, summary)) => (Ok(outputs), latency, summary),
        Err(e) => (Err(e), std::time::Duration::ZERO, None),
    };
    // A bad request says nothing about the model.
    if !matches!(&result, Ok(Err(EngineError::BadInput(_)))) {
        let _ = api.outcomes.try_send(RequestOutcome {
            model: model.manifest().name.clone(),
            slot: model.slot(),
            ok: matches!(&result, Ok(Ok(_))),
            latency,
        });
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
    match result {
        Ok(Ok(outputs)) => {
            api.metrics.inference(&labels, latency);
            let outputs: Vec<Value> = outputs
                .iter()
                .map(|t| {
                    json!({
                        "name": t.name,
                        "datatype": t.values.datatype(),
                        "shape": t.shape,
                        "data": t.values.to_f64(),
                    })
                })
                .collect();
            let mut body = json!({
                "model_name": model.manifest().name,
                "model_version": model.manifest().version.to_string(),
                "outputs": outputs,
            });
            if let Some(id) = id {
                body["id"] = json!(id);
            }
            Json(body).into_response()
        }
        Ok(Err(e @ EngineError::BadInput(_))) => {
            api.metrics.inference_error(&labels, ErrorKind::BadRequest);
            error(StatusCode::BAD_REQUEST, e)
        }
        Ok(Err(e)) => {
            api.metrics.inference_error(&labels, ErrorKind::Failed);
            error(StatusCode::INTERNAL_SERVER_ERROR, e)
        }
        Err(e) => {
            api.metrics.inference_error(&labels, ErrorKind::Failed);
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("inference task failed: {e}"),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_flat_and_nested_requests() {
        let (id, t) = parse_request(
            br#"{"id":"7","inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[[1,2.5]]}]}"#,
        )
        .unwrap();
        assert_eq!(id.as_deref(), Some("7"));
        assert_eq!(t[0].values, Values::F32(vec![1.0, 2.5]));
        assert!(parse_request(
            br#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT64","data":[1.5]}]}"#
        )
        .is_err());
        assert!(parse_request(
            br#"{"inputs":[{"name":"x","shape":[1],"datatype":"BYTES","data":["a"]}]}"#
        )
        .is_err());
        assert!(parse_request(b"nope").is_err());
    }

    proptest! {
        #[test]
        fn request_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_request(&bytes);
        }
    }
}
