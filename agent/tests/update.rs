//! The agent in-process against a real mosquitto: a signed desired state, chunks over MQTT,
//! staging and the swap, then a restart with the broker gone. It plays the server itself with
//! the proto crate's fixture keys. Runs natively and under qemu (`cross/test`): mosquitto is a
//! host program, started on a free 127.0.0.1 port. Version 1 ships as ONNX, version 2 as the
//! NNEF tar `modelcast convert` makes of `classifier-v2.onnx`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use modelcast_agent::config::{Config, TransferConfig, TrustConfig};
use modelcast_agent::engine::{HostTensor, LoadedModel, Values};
use modelcast_proto::chunk::{parse_digest, ChunkReply, ChunkRequest};
use modelcast_proto::manifest::{
    chunk_digests, DataType, GoldenVector, Manifest, ModelFormat, TensorData, TensorSpec,
};
use modelcast_proto::report::Slot;
use modelcast_proto::topic::{DeviceTopic, Topics};
use modelcast_proto::verify::fixture::Keys;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FAR: &str = "2036-01-01T00:00:00Z";
const V1: &[u8] = include_bytes!("fixtures/classifier-v1.onnx");
const V2: &[u8] = include_bytes!("fixtures/classifier-v2.nnef.tar");
const INPUT: [f32; 4] = [0.5, -1.0, 2.0, 0.25];

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mosquitto(dir: &Path) -> (Broker, u16) {
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\n"),
    )
    .unwrap();
    let exe = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("mosquitto is installed (tests/run.sh installs it)");
    let child = Command::new(exe)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "mosquitto did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    (Broker(child), port)
}

fn reference_output(bytes: &[u8], manifest: &Manifest) -> Vec<f32> {
    let model = LoadedModel::load(manifest, Slot::A, &mut &bytes[..]).unwrap();
    let out = model
        .run(&[HostTensor {
            name: "x".into(),
            shape: vec![1, 4],
            values: Values::from_f32(&INPUT),
        }])
        .unwrap();
    out[0].values.to_f64().iter().map(|v| *v as f32).collect()
}

/// A manifest with small chunks (several per model) and a golden vector.
fn manifest(bytes: &[u8], version: u64, model_format: ModelFormat) -> Manifest {
    let mut m = Manifest {
        format: 1,
        name: "classifier".into(),
        version,
        model_format,
        size: bytes.len() as u64,
        sha256: modelcast_proto::sha256_hex(bytes),
        chunk_size: 1024,
        segments: vec![],
        chunks: chunk_digests(bytes, 1024),
        inputs: vec![TensorSpec {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape: vec![1, 4],
            dims: vec![],
        }],
        outputs: vec![TensorSpec {
            name: "y".into(),
            datatype: DataType::Fp32,
            shape: vec![1, 3],
            dims: vec![],
        }],
        golden: vec![],
        golden_file: None,
        expires: FAR.into(),
        metadata: BTreeMap::new(),
        probation: None,
        latency_budget: None,
        memory_bytes: None,
        fallback_to: None,
        forms: Vec::new(),
        encryption: None,
        tolerance: Default::default(),
    };
    let out = reference_output(bytes, &m);
    m.golden.push(GoldenVector {
        inputs: vec![TensorData::from_f32("x", vec![1, 4], &INPUT)],
        outputs: vec![TensorData::from_f32("y", vec![1, 3], &out)],
        tolerance: "0.0001".into(),
    });
    m
}

/// Plays the fleet server: answers chunk requests for the artifacts it holds.
async fn chunk_server(port: u16, artifacts: Vec<Vec<u8>>) -> AsyncClient {
    let mut opts = MqttOptions::new(format!("test-server-{port}"), "127.0.0.1", port);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 256);
    let topics = Topics::new("modelcast");
    client
        .subscribe(topics.all_devices(DeviceTopic::Requests), QoS::AtLeastOnce)
        .await
        .unwrap();
    let replier = client.clone();
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            let Event::Incoming(Packet::Publish(p)) = event else {
                continue;
            };
            let Ok(req) = ChunkRequest::from_slice(&p.payload) else {
                continue;
            };
            let digest = parse_digest(&req.artifact).unwrap();
            let Some(bytes) = artifacts
                .iter()
                .find(|a| modelcast_proto::sha256_hex(a) == req.artifact)
            else {
                continue;
            };
            let topic = topics.device(&req.device, DeviceTopic::Chunks);
            for index in req.chunks {
                let start = index as usize * 1024;
                let data = &bytes[start..(start + 1024).min(bytes.len())];
                let frame = ChunkReply {
                    artifact: digest,
                    index,
                    encoding: modelcast_proto::chunk::Encoding::Raw,
                    data,
                }
                .encode();
                let _ = replier.try_publish(&topic, QoS::AtLeastOnce, false, frame);
            }
        }
    });
    client
}

async fn http(port: u16, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

/// Infers `INPUT`; returns the serving version and the output.
async fn infer(port: u16) -> Option<(String, Vec<f64>)> {
    let body = format!(
        r#"{{"inputs":[{{"name":"x","shape":[1,4],"datatype":"FP32","data":{INPUT:?}}}]}}"#
    );
    let (status, text) = http(port, "POST", "/v2/models/classifier/infer", &body).await?;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let data = v["outputs"][0]["data"]
        .as_array()?
        .iter()
        .filter_map(|x| x.as_f64())
        .collect();
    Some((v["model_version"].as_str()?.to_string(), data))
}

async fn wait_version(port: u16, version: &str) -> Vec<f64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((v, out)) = infer(port).await {
            if v == version {
                return out;
            }
        }
        assert!(Instant::now() < deadline, "v{version} never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn config(dir: &Path, keys: &Keys, broker: u16, http: u16) -> Config {
    let root = dir.join("root.json");
    std::fs::write(&root, keys.root(FAR).to_vec()).unwrap();
    Config {
        device_id: "dev-1".into(),
        labels: BTreeMap::new(),
        state_dir: dir.join("state"),
        broker: format!("mqtt://127.0.0.1:{broker}"),
        topic_prefix: "modelcast".into(),
        http_listen: ([127, 0, 0, 1], http).into(),
        trust: TrustConfig {
            root,
            director_keys: vec![keys.director.public().keyval.public],
            director_threshold: 1,
        },
        transfer: TransferConfig {
            window: 4,
            chunk_timeout_secs: 2,
            stall_timeout_secs: 60,
            shared_topic: true,
            metered: false,
        },
        tls: None,
        enrol: None,
        probation: Default::default(),
        telemetry: Default::default(),
        serve: Default::default(),
        engine: Default::default(),
    }
}

struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

fn start(cfg: Config) -> Running {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        modelcast_agent::driver::run(
            cfg,
            async {
                let _ = stopped.await;
            },
            |_| {},
        )
        .await
        .expect("agent runs");
    });
    Running { stop, task }
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("agent stops")
            .expect("agent task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installs_swaps_and_serves_offline_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, port) = mosquitto(dir.path());
    let keys = Keys::from_seed(9);
    let (m1, m2) = (
        manifest(V1, 1, ModelFormat::Onnx),
        manifest(V2, 2, ModelFormat::Nnef),
    );
    let server = chunk_server(port, vec![V1.to_vec(), V2.to_vec()]).await;
    let desired = Topics::new("modelcast").device("dev-1", DeviceTopic::Desired);
    let http_port = free_port();
    let cfg = config(dir.path(), &keys, port, http_port);

    let agent = start(cfg.clone());
    server
        .publish(
            &desired,
            QoS::AtLeastOnce,
            true,
            keys.desired("dev-1", std::slice::from_ref(&m1), 1, FAR)
                .to_vec(),
        )
        .await
        .unwrap();
    let out1 = wait_version(http_port, "1").await;
    assert_eq!(out1.len(), 3);

    server
        .publish(
            &desired,
            QoS::AtLeastOnce,
            true,
            keys.desired("dev-1", std::slice::from_ref(&m2), 2, FAR)
                .to_vec(),
        )
        .await
        .unwrap();
    let out2 = wait_version(http_port, "2").await;
    assert_ne!(out1, out2, "v2 answers differently");

    // A request with the wrong shape is a 400 and changes nothing.
    let (status, _) = http(
        http_port,
        "POST",
        "/v2/models/classifier/infer",
        r#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1,2]}]}"#,
    )
    .await
    .unwrap();
    assert_eq!(status, 400);

    // Prometheus sees both updates, the serving slot, the bytes and the bad request.
    let (status, text) = http(http_port, "GET", "/metrics", "").await.unwrap();
    assert_eq!(status, 200);
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    assert_eq!(
        value(r#"modelcast_serving_version{model="classifier",slot="b"}"#),
        2.0
    );
    assert_eq!(
        value(r#"modelcast_updates_total{model="classifier",outcome="activated"}"#),
        2.0
    );
    assert_eq!(
        value(r#"modelcast_downloaded_bytes_total{model="classifier"}"#),
        (V1.len() + V2.len()) as f64
    );
    assert_eq!(
        value(
            r#"modelcast_inference_errors_total{model="classifier",version="2",slot="b",kind="bad_request"}"#
        ),
        1.0
    );
    let answered = value(r#"modelcast_inferences_total{model="classifier",version="2",slot="b"}"#);
    assert!(answered >= 1.0);
    assert_eq!(
        value(
            r#"modelcast_inference_duration_seconds_count{model="classifier",version="2",slot="b"}"#
        ),
        answered
    );
    assert!(value("modelcast_store_bytes") > 0.0);

    agent.stop().await;
    drop(broker);
    let agent = start(cfg);
    // No broker: the last good model serves from the store.
    assert_eq!(wait_version(http_port, "2").await, out2);
    agent.stop().await;
}
