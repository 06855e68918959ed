//! The inference API over gRPC: KServe v2's `inference.GRPCInferenceService`
//! (`proto/grpc_predict_v2.proto`), served with tonic on `grpc_listen`, so `tritonclient.grpc`
//! and KServe's clients work as they do against Triton. The same models, limits, metrics,
//! statistics, probation outcomes and sampling as HTTP: inference goes through
//! [`crate::serve::infer_with`]; only the tensors' wire form differs (raw little-endian
//! contents, or the protocol's typed repeated fields).

use std::net::SocketAddr;

use modelcast_proto::manifest::DataType;
use tonic::{Request, Response, Status};

use crate::engine::{HostTensor, Values};
use crate::kserve::{CodecError, InferRequest, RequestedOutput};
use crate::serve::{canary_key, infer_with, lookup, Answer, Api};

/// The generated protocol types and service.
pub mod pb {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("inference");
}

use pb::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};

/// The gRPC service over the serving models.
#[derive(Clone)]
struct Service {
    api: Api,
}

fn metadata_tensors(
    specs: &[modelcast_proto::manifest::TensorSpec],
) -> Vec<pb::model_metadata_response::TensorMetadata> {
    specs
        .iter()
        .map(|s| pb::model_metadata_response::TensorMetadata {
            name: s.name.clone(),
            datatype: s.datatype.name().into(),
            shape: s.metadata_shape(),
        })
        .collect()
}

/// Triton's configuration type of a tensor type.
fn config_type(dt: DataType) -> pb::DataType {
    match dt {
        DataType::Bool => pb::DataType::TypeBool,
        DataType::Uint8 => pb::DataType::TypeUint8,
        DataType::Uint16 => pb::DataType::TypeUint16,
        DataType::Uint32 => pb::DataType::TypeUint32,
        DataType::Uint64 => pb::DataType::TypeUint64,
        DataType::Int8 => pb::DataType::TypeInt8,
        DataType::Int16 => pb::DataType::TypeInt16,
        DataType::Int32 => pb::DataType::TypeInt32,
        DataType::Int64 => pb::DataType::TypeInt64,
        DataType::Fp16 => pb::DataType::TypeFp16,
        DataType::Fp32 => pb::DataType::TypeFp32,
        DataType::Fp64 => pb::DataType::TypeFp64,
        DataType::Bytes => pb::DataType::TypeString,
    }
}

/// The model's configuration as `serve.rs` answers it over HTTP, in Triton's messages.
fn model_config(model: &crate::engine::LoadedModel) -> pb::ModelConfig {
    let m = model.manifest();
    pb::ModelConfig {
        name: m.name.clone(),
        platform: model.platform().into(),
        backend: model.backend().into(),
        version_policy: Some(pb::ModelVersionPolicy {
            policy_choice: Some(pb::model_version_policy::PolicyChoice::Specific(
                pb::model_version_policy::Specific {
                    versions: vec![i64::try_from(m.version).unwrap_or(i64::MAX)],
                },
            )),
        }),
        max_batch_size: 0,
        input: m
            .inputs
            .iter()
            .map(|s| pb::ModelInput {
                name: s.name.clone(),
                data_type: config_type(s.datatype).into(),
                dims: s.metadata_shape(),
            })
            .collect(),
        output: m
            .outputs
            .iter()
            .map(|s| pb::ModelOutput {
                name: s.name.clone(),
                data_type: config_type(s.datatype).into(),
                dims: s.metadata_shape(),
            })
            .collect(),
        parameters: m
            .metadata
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    pb::ModelParameter {
                        string_value: v.clone(),
                    },
                )
            })
            .collect(),
    }
}

/// A model's statistics, as `serve.rs` answers them over HTTP.
fn model_statistics(model: &crate::engine::LoadedModel) -> pb::ModelStatistics {
    use std::sync::atomic::Ordering::Relaxed;
    let s = model.stats();
    let d = |count: u64, ns: u64| Some(pb::StatisticDuration { count, ns });
    let (ok, ok_ns) = (s.success.load(Relaxed), s.success_ns.load(Relaxed));
    pb::ModelStatistics {
        name: model.manifest().name.clone(),
        version: model.manifest().version.to_string(),
        last_inference: s.last_ms.load(Relaxed),
        inference_count: ok,
        execution_count: ok,
        inference_stats: Some(pb::InferStatistics {
            success: d(ok, ok_ns),
            fail: d(s.fail.load(Relaxed), s.fail_ns.load(Relaxed)),
            queue: d(0, 0),
            compute_input: d(0, 0),
            compute_infer: d(ok, ok_ns),
            compute_output: d(0, 0),
            cache_hit: d(s.plan_hits.load(Relaxed), 0),
            cache_miss: d(s.plan_builds.load(Relaxed), 0),
        }),
    }
}

fn version(v: &str) -> Option<&str> {
    (!v.is_empty()).then_some(v)
}

/// Little-endian bytes of an input given as the protocol's typed contents.
fn typed_bytes(
    name: &str,
    dt: DataType,
    c: &pb::InferTensorContents,
    max: usize,
) -> Result<Vec<u8>, CodecError> {
    let err = |m: String| CodecError(format!("input {name}: {m}"));
    let count = match dt {
        DataType::Bool => c.bool_contents.len(),
        DataType::Int8 | DataType::Int16 | DataType::Int32 => c.int_contents.len(),
        DataType::Int64 => c.int64_contents.len(),
        DataType::Uint8 | DataType::Uint16 | DataType::Uint32 => c.uint_contents.len(),
        DataType::Uint64 => c.uint64_contents.len(),
        DataType::Fp32 => c.fp32_contents.len(),
        DataType::Fp64 => c.fp64_contents.len(),
        DataType::Fp16 => return Err(err("FP16 travels only as raw contents".into())),
        DataType::Bytes => {
            let total = c
                .bytes_contents
                .iter()
                .fold(0usize, |n, b| n.saturating_add(b.len()).saturating_add(4));
            if total > max {
                return Err(err(format!("more than the limit of {max} bytes")));
            }
            return modelcast_proto::manifest::join_bytes(
                c.bytes_contents.iter().map(Vec::as_slice),
            )
            .map_err(|e| err(e.to_string()));
        }
    };
    let size = dt.size().unwrap_or(1);
    if count.saturating_mul(size) > max {
        return Err(err(format!("more than the limit of {max} bytes")));
    }
    let mut out = Vec::with_capacity(count * size);
    macro_rules! narrow {
        ($src:expr, $t:ty) => {
            for v in $src {
                let v = <$t>::try_from(*v).map_err(|_| err(format!("{v} does not fit {dt}")))?;
                out.extend_from_slice(&v.to_le_bytes());
            }
        };
    }
    match dt {
        DataType::Bool => out.extend(c.bool_contents.iter().map(|b| u8::from(*b))),
        DataType::Int8 => narrow!(&c.int_contents, i8),
        DataType::Int16 => narrow!(&c.int_contents, i16),
        DataType::Int32 => narrow!(&c.int_contents, i32),
        DataType::Int64 => narrow!(&c.int64_contents, i64),
        DataType::Uint8 => narrow!(&c.uint_contents, u8),
        DataType::Uint16 => narrow!(&c.uint_contents, u16),
        DataType::Uint32 => narrow!(&c.uint_contents, u32),
        DataType::Uint64 => narrow!(&c.uint64_contents, u64),
        DataType::Fp32 => c
            .fp32_contents
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DataType::Fp64 => c
            .fp64_contents
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DataType::Fp16 | DataType::Bytes => {}
    }
    Ok(out)
}

/// A gRPC inference request as the codec's request.
pub fn decode(
    req: pb::ModelInferRequest,
    max_tensor_bytes: usize,
) -> Result<InferRequest, CodecError> {
    let raw = !req.raw_input_contents.is_empty();
    if raw && req.raw_input_contents.len() != req.inputs.len() {
        return Err(CodecError(format!(
            "{} raw_input_contents for {} inputs",
            req.raw_input_contents.len(),
            req.inputs.len()
        )));
    }
    let mut contents = req.raw_input_contents.into_iter();
    let mut inputs = Vec::with_capacity(req.inputs.len());
    for input in req.inputs {
        let dt: DataType = input
            .datatype
            .parse()
            .map_err(|e| CodecError(format!("input {}: {e}", input.name)))?;
        let bytes = if raw {
            if input.contents.is_some() {
                return Err(CodecError(format!(
                    "input {}: both contents and raw_input_contents",
                    input.name
                )));
            }
            let b = contents.next().unwrap_or_default();
            if b.len() > max_tensor_bytes {
                return Err(CodecError(format!(
                    "input {}: {} bytes exceed the limit of {max_tensor_bytes}",
                    input.name,
                    b.len()
                )));
            }
            b
        } else {
            let c = input
                .contents
                .as_ref()
                .ok_or_else(|| CodecError(format!("input {}: no contents", input.name)))?;
            typed_bytes(&input.name, dt, c, max_tensor_bytes)?
        };
        let shape = input
            .shape
            .iter()
            .map(|d| {
                u64::try_from(*d).map_err(|_| {
                    CodecError(format!("input {}: shape {:?}", input.name, input.shape))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let values =
            Values::new(dt, bytes).map_err(|e| CodecError(format!("input {}: {e}", input.name)))?;
        inputs.push(HostTensor {
            name: input.name,
            shape,
            values,
        });
    }
    Ok(InferRequest {
        id: (!req.id.is_empty()).then_some(req.id),
        inputs,
        outputs: req
            .outputs
            .into_iter()
            .map(|o| RequestedOutput {
                name: o.name,
                binary: Some(true),
            })
            .collect(),
        binary_output: true,
    })
}

/// The response to `request`: every chosen output as raw little-endian contents.
fn encode(
    model: &crate::engine::LoadedModel,
    request: &InferRequest,
    outputs: &[HostTensor],
) -> Result<pb::ModelInferResponse, CodecError> {
    let chosen = crate::kserve::select_outputs(outputs, request)?;
    let m = model.manifest();
    Ok(pb::ModelInferResponse {
        model_name: m.name.clone(),
        model_version: m.version.to_string(),
        id: request.id.clone().unwrap_or_default(),
        parameters: Default::default(),
        outputs: chosen
            .iter()
            .map(|(t, _)| pb::model_infer_response::InferOutputTensor {
                name: t.name.clone(),
                datatype: t.values.datatype().name().into(),
                shape: t.shape.iter().map(|d| *d as i64).collect(),
                parameters: Default::default(),
                contents: None,
            })
            .collect(),
        raw_output_contents: chosen
            .iter()
            .map(|(t, _)| t.values.bytes().to_vec())
            .collect(),
    })
}

#[tonic::async_trait]
impl GrpcInferenceService for Service {
    async fn server_live(
        &self,
        _: Request<pb::ServerLiveRequest>,
    ) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        Ok(Response::new(pb::ServerReadyResponse {
            ready: !self.api.models.names().is_empty(),
        }))
    }

    async fn model_ready(
        &self,
        req: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(pb::ModelReadyResponse {
            ready: lookup(&self.api, &r.name, version(&r.version)).is_ok(),
        }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: crate::serve::SERVER_NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: crate::kserve::EXTENSIONS
                .iter()
                .filter(|e| **e != "binary_tensor_data")
                .map(|e| e.to_string())
                .collect(),
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let r = req.into_inner();
        let model = lookup(&self.api, &r.name, version(&r.version))
            .map_err(|e| Status::not_found(e.to_string()))?;
        let m = model.manifest();
        Ok(Response::new(pb::ModelMetadataResponse {
            name: m.name.clone(),
            versions: vec![m.version.to_string()],
            platform: model.platform().into(),
            inputs: metadata_tensors(&m.inputs),
            outputs: metadata_tensors(&m.outputs),
        }))
    }

    async fn model_config(
        &self,
        req: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        let r = req.into_inner();
        let model = lookup(&self.api, &r.name, version(&r.version))
            .map_err(|e| Status::not_found(e.to_string()))?;
        Ok(Response::new(pb::ModelConfigResponse {
            config: Some(model_config(&model)),
        }))
    }

    async fn model_statistics(
        &self,
        req: Request<pb::ModelStatisticsRequest>,
    ) -> Result<Response<pb::ModelStatisticsResponse>, Status> {
        let r = req.into_inner();
        let model_stats = if r.name.is_empty() {
            let models = self.api.models.answering();
            models.iter().map(|m| model_statistics(m)).collect()
        } else {
            let model = lookup(&self.api, &r.name, version(&r.version))
                .map_err(|e| Status::not_found(e.to_string()))?;
            vec![model_statistics(&model)]
        };
        Ok(Response::new(pb::ModelStatisticsResponse { model_stats }))
    }

    async fn repository_index(
        &self,
        _: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        let models = self.api.models.answering();
        Ok(Response::new(pb::RepositoryIndexResponse {
            models: models
                .iter()
                .map(|m| pb::repository_index_response::ModelIndex {
                    name: m.manifest().name.clone(),
                    version: m.manifest().version.to_string(),
                    state: "READY".into(),
                    reason: String::new(),
                })
                .collect(),
        }))
    }

    async fn model_infer(
        &self,
        req: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let key = canary_key(&self.api, &req.get_ref().model_name)
            .and_then(|k| Some(req.metadata().get(k.as_str())?.as_bytes().to_vec()));
        let r = req.into_inner();
        let (name, version) = (r.model_name.clone(), r.model_version.clone());
        let max = self.api.max_tensor_bytes;
        match infer_with(
            &self.api,
            &name,
            (!version.is_empty()).then_some(version.as_str()),
            key.as_deref(),
            move || decode(r, max),
            encode,
        )
        .await
        {
            Answer::Done(response) => Ok(Response::new(response)),
            Answer::NotFound(e) => Err(Status::not_found(e)),
            Answer::Unavailable(e) => Err(Status::unavailable(e)),
            Answer::Bad(e) => Err(Status::invalid_argument(e)),
            Answer::Failed(e) => Err(Status::internal(e)),
        }
    }
}

/// The running gRPC server.
pub struct GrpcServer {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl GrpcServer {
    /// Stops taking requests and waits for the ones in flight.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Binds `addr` and serves the API there until stopped.
pub async fn spawn(addr: SocketAddr, api: Api) -> std::io::Result<GrpcServer> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let limit = api.limits.max_body_bytes;
    let service = GrpcInferenceServiceServer::new(Service { api })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tracing::info!(%addr, "inference API listening (gRPC)");
    let task = tokio::spawn(async move {
        // Small answers go out at once, not when Nagle's algorithm lets them.
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await
        {
            tracing::warn!(error = %e, "gRPC server ended");
        }
    });
    Ok(GrpcServer { stop, task })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn input(
        name: &str,
        dt: &str,
        shape: Vec<i64>,
        contents: Option<pb::InferTensorContents>,
    ) -> pb::model_infer_request::InferInputTensor {
        pb::model_infer_request::InferInputTensor {
            name: name.into(),
            datatype: dt.into(),
            shape,
            parameters: Default::default(),
            contents,
        }
    }

    #[test]
    fn raw_and_typed_contents_decode_alike() {
        let raw = pb::ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![input("x", "INT64", vec![2], None)],
            raw_input_contents: vec![[(1i64 << 60) + 1, -3]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()],
            id: "7".into(),
            ..Default::default()
        };
        let typed = pb::ModelInferRequest {
            inputs: vec![input(
                "x",
                "INT64",
                vec![2],
                Some(pb::InferTensorContents {
                    int64_contents: vec![(1 << 60) + 1, -3],
                    ..Default::default()
                }),
            )],
            ..raw.clone()
        };
        let typed = pb::ModelInferRequest {
            raw_input_contents: vec![],
            ..typed
        };
        let a = decode(raw, 1 << 20).unwrap();
        let b = decode(typed, 1 << 20).unwrap();
        assert_eq!(a.inputs, b.inputs);
        assert_eq!(a.id.as_deref(), Some("7"));
        // Narrow types are range-checked; FP16 is raw only; limits hold.
        let u8_overflow = pb::ModelInferRequest {
            inputs: vec![input(
                "x",
                "UINT8",
                vec![1],
                Some(pb::InferTensorContents {
                    uint_contents: vec![300],
                    ..Default::default()
                }),
            )],
            ..Default::default()
        };
        assert!(decode(u8_overflow, 1 << 20).is_err());
        let half = pb::ModelInferRequest {
            inputs: vec![input(
                "x",
                "FP16",
                vec![1],
                Some(pb::InferTensorContents::default()),
            )],
            ..Default::default()
        };
        assert!(decode(half, 1 << 20).is_err());
        let big = pb::ModelInferRequest {
            inputs: vec![input("x", "FP32", vec![4], None)],
            raw_input_contents: vec![vec![0; 16]],
            ..Default::default()
        };
        assert!(decode(big.clone(), 8).is_err());
        assert!(decode(big, 16).is_ok());
        let miscount = pb::ModelInferRequest {
            inputs: vec![
                input("x", "FP32", vec![1], None),
                input("y", "FP32", vec![1], None),
            ],
            raw_input_contents: vec![vec![0; 4]],
            ..Default::default()
        };
        assert!(decode(miscount, 1 << 20).is_err());
    }

    #[test]
    fn bytes_come_typed_or_raw_alike() {
        let typed = pb::ModelInferRequest {
            inputs: vec![input(
                "w",
                "BYTES",
                vec![2],
                Some(pb::InferTensorContents {
                    bytes_contents: vec![b"fleet".to_vec(), vec![]],
                    ..Default::default()
                }),
            )],
            ..Default::default()
        };
        let raw = pb::ModelInferRequest {
            inputs: vec![input("w", "BYTES", vec![2], None)],
            raw_input_contents: vec![vec![5, 0, 0, 0, b'f', b'l', b'e', b'e', b't', 0, 0, 0, 0]],
            ..Default::default()
        };
        let a = decode(typed.clone(), 1 << 20).unwrap();
        assert_eq!(a.inputs, decode(raw, 1 << 20).unwrap().inputs);
        assert_eq!(a.inputs[0].values.strings(), vec![&b"fleet"[..], b""]);
        // Each element's length counts against the limit.
        assert!(decode(typed.clone(), 12).is_err());
        assert!(decode(typed, 13).is_ok());
        let torn = pb::ModelInferRequest {
            inputs: vec![input("w", "BYTES", vec![1], None)],
            raw_input_contents: vec![vec![9, 0, 0, 0, b'x']],
            ..Default::default()
        };
        assert!(decode(torn, 1 << 20).is_err());
        assert_eq!(config_type(DataType::Bytes), pb::DataType::TypeString);
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            use prost::Message;
            if let Ok(req) = pb::ModelInferRequest::decode(&bytes[..]) {
                let _ = decode(req, 1 << 16);
            }
        }
    }
}
