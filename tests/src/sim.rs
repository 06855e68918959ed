//! The fleet simulator: N devices in one process, each a light client that speaks the real
//! protocol over its own MQTT connection. Each runs the agent's own update machine
//! ([`modelcast_agent::update::Updater`]) and chunk transfer, and verifies every desired state
//! with the agent's verifier (TUF + director). What a device stores is not kept (chunks are
//! checked against their signed digests, counted and dropped) and it does not run inference:
//! staging succeeds at once unless the device is told to fail, after `stage_delay`. With no
//! traffic, trials end on their time limit.
//!
//! Real devices inflate and hash their chunks on their own CPUs; here they share this
//! machine's with the server and the broker. So a chunk's inflation and SHA-256 are computed
//! once per distinct copy ([`Copies`]): every other device that receives the same bytes
//! (compared byte for byte) takes that result, and a copy that differs is checked afresh.
//!
//! Used by the rollout tests and `bench-fleet`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use modelcast_agent::probation::ProbationPolicy;
use modelcast_agent::update::{Action, ChunkFate, Settings, Updater};
use modelcast_proto::chunk::{ChunkReply, ChunkRequest};
use modelcast_proto::desired::DesiredState;
use modelcast_proto::keys::PublicKey;
use modelcast_proto::metadata::{RoleVerifier, Signed};
use modelcast_proto::report::{DeviceReport, ReportedError};
use modelcast_proto::topic::{DeviceTopic, Topics};
use modelcast_proto::verify::{verify_desired, TrustState};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};

/// How to run a simulated fleet.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Broker host and port.
    pub broker: (String, u16),
    /// Topic prefix.
    pub prefix: String,
    /// Devices.
    pub count: usize,
    /// Device ids are `{id_prefix}{i:05}`.
    pub id_prefix: String,
    /// Labels every device reports.
    pub labels: BTreeMap<String, String>,
    /// How long staging takes.
    pub stage_delay: Duration,
    /// Chunk requests in flight per device.
    pub window: usize,
    /// The devices' own probation policy.
    pub probation: ProbationPolicy,
    /// Connections opened per second (a real fleet does not reconnect all at once).
    pub connect_rate: u32,
    /// Devices listen on each artifact's shared topic while downloading it (as the agent
    /// does by default).
    pub shared: bool,
}

impl SimOptions {
    /// `count` devices on the broker at `port` on loopback, labelled `fleet=sim`.
    pub fn new(port: u16, count: usize) -> Self {
        SimOptions {
            broker: ("127.0.0.1".into(), port),
            prefix: "modelcast".into(),
            count,
            id_prefix: "sim-".into(),
            labels: BTreeMap::from([("fleet".into(), "sim".into())]),
            stage_delay: Duration::from_millis(50),
            window: 16,
            probation: ProbationPolicy::default(),
            connect_rate: 2000,
            shared: true,
        }
    }
}

/// Counters over the whole simulated fleet.
#[derive(Debug, Default)]
pub struct SimStats {
    /// Devices connected now.
    pub connected: AtomicUsize,
    /// Chunk bytes received (duplicates included).
    pub chunk_bytes: AtomicU64,
    /// Desired states that verified.
    pub desired_ok: AtomicU64,
    /// Desired states rejected.
    pub desired_rejected: AtomicU64,
    /// Updates activated.
    pub activated: AtomicU64,
    /// Requests and subscriptions the MQTT client's queue refused (asked again on timeout).
    pub queue_full: AtomicU64,
    /// Chunks asked again after a timeout or a reconnect.
    pub asked_again: AtomicU64,
    /// Of them, asked again before any chunk of the download had arrived.
    pub asked_again_first: AtomicU64,
}

/// A running simulated fleet; stops when dropped.
pub struct Sim {
    runtime: Option<tokio::runtime::Runtime>,
    /// Fleet-wide counters.
    pub stats: Arc<SimStats>,
    /// Devices that fail staging of any version from now on (by id).
    pub failing: Arc<Mutex<BTreeSet<String>>>,
    /// What each device serves: id → (model → version).
    serving: Arc<Mutex<BTreeMap<String, BTreeMap<String, u64>>>>,
    ids: Vec<String>,
}

/// Most distinct chunk copies [`Copies`] remembers (forgotten wholesale past it).
const MAX_COPIES: usize = 4096;

/// Chunk copies already inflated and hashed, by artifact and index: the bytes as they came,
/// and the length and SHA-256 (hex) of what they inflated to (`None`: they did not inflate).
#[derive(Default)]
struct Copies(Mutex<std::collections::HashMap<([u8; 32], u32), Copy>>);

struct Copy {
    encoding: modelcast_proto::chunk::Encoding,
    wire: bytes::Bytes,
    checked: Option<(usize, String)>,
}

impl Copies {
    /// What `wire`, a copy of chunk `index` of `artifact` in `encoding`, inflates to (no further than
    /// `len`): its length and SHA-256, computed unless the same bytes were seen before.
    fn check<'a>(
        &self,
        artifact: [u8; 32],
        index: u32,
        encoding: modelcast_proto::chunk::Encoding,
        wire: &bytes::Bytes,
        inflate: impl FnOnce() -> Option<std::borrow::Cow<'a, [u8]>>,
    ) -> Option<(usize, String)> {
        let key = (artifact, index);
        if let Some(c) = self.0.lock().expect("copies lock").get(&key) {
            if c.encoding == encoding && c.wire == *wire {
                return c.checked.clone();
            }
        }
        let checked = inflate().map(|d| (d.len(), modelcast_proto::sha256_hex(&d)));
        let mut copies = self.0.lock().expect("copies lock");
        if copies.len() >= MAX_COPIES {
            copies.clear();
        }
        copies.insert(
            key,
            Copy {
                encoding,
                wire: wire.clone(),
                checked: checked.clone(),
            },
        );
        checked
    }
}

struct Trust {
    root: Signed,
    director: RoleVerifier,
}

impl Sim {
    /// Starts the fleet, trusting the keys in `keys` (`root.json`, `director.pub`).
    pub fn start(opts: SimOptions, keys: &Path) -> Sim {
        let root = modelcast_server::keyset::read_root(&keys.join("root.json")).expect("root.json");
        let director = std::fs::read_to_string(keys.join("director.pub")).expect("director.pub");
        let director = PublicKey::from_hex(director.trim()).expect("director key");
        let trust = Arc::new(Trust {
            root,
            director: RoleVerifier::new("director", vec![director], 1),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let stats = Arc::new(SimStats::default());
        let failing = Arc::new(Mutex::new(BTreeSet::new()));
        let serving = Arc::new(Mutex::new(BTreeMap::new()));
        let ids: Vec<String> = (0..opts.count)
            .map(|i| format!("{}{i:05}", opts.id_prefix))
            .collect();
        let opts = Arc::new(opts);
        let copies = Arc::new(Copies::default());
        {
            let (ids, stats, failing, serving) =
                (ids.clone(), stats.clone(), failing.clone(), serving.clone());
            runtime.spawn(async move {
                let pause = Duration::from_secs(1) / opts.connect_rate.max(1);
                for id in ids {
                    let device = Device {
                        id,
                        opts: opts.clone(),
                        trust: trust.clone(),
                        stats: stats.clone(),
                        failing: failing.clone(),
                        serving: serving.clone(),
                        copies: copies.clone(),
                    };
                    tokio::spawn(device.run());
                    tokio::time::sleep(pause).await;
                }
            });
        }
        Sim {
            runtime: Some(runtime),
            stats,
            failing,
            serving,
            ids,
        }
    }

    /// The device ids.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// How many devices serve `model` at `version`.
    pub fn serving(&self, model: &str, version: u64) -> usize {
        let serving = self.serving.lock().expect("serving lock");
        serving
            .values()
            .filter(|m| m.get(model) == Some(&version))
            .count()
    }

    /// The version `device` serves of `model`.
    pub fn version_of(&self, device: &str, model: &str) -> Option<u64> {
        let serving = self.serving.lock().expect("serving lock");
        serving.get(device)?.get(model).copied()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// One simulated device.
struct Device {
    id: String,
    opts: Arc<SimOptions>,
    trust: Arc<Trust>,
    stats: Arc<SimStats>,
    failing: Arc<Mutex<BTreeSet<String>>>,
    serving: Arc<Mutex<BTreeMap<String, BTreeMap<String, u64>>>>,
    copies: Arc<Copies>,
}

impl Device {
    /// Records what serves of `name` after a swap.
    fn now_serving(&self, name: &str, record: &modelcast_agent::slots::ModelRecord) {
        if let Some(m) = record.serving() {
            self.serving
                .lock()
                .expect("serving lock")
                .entry(self.id.clone())
                .or_default()
                .insert(name.to_string(), m.version);
        }
    }

    async fn run(self) {
        let topics = Topics::new(&self.opts.prefix);
        let (host, port) = self.opts.broker.clone();
        let mut mqtt = MqttOptions::new(&self.id, host, port);
        let online = topics.device(&self.id, DeviceTopic::Online);
        mqtt.set_keep_alive(Duration::from_secs(60))
            .set_clean_session(true)
            .set_max_packet_size(modelcast_agent::link::MAX_INCOMING_PACKET, 1024 * 1024)
            .set_last_will(LastWill::new(&online, "offline", QoS::AtLeastOnce, true));
        let (client, mut eventloop) = AsyncClient::new(mqtt, 64);
        // The event loop runs in its own task (polling it inside a select could drop a
        // packet half read); its events come here.
        let (tx, mut events) = tokio::sync::mpsc::channel::<Result<Event, String>>(64);
        tokio::spawn(async move {
            loop {
                let event = eventloop.poll().await.map_err(|e| e.to_string());
                let failed = event.is_err();
                if tx.send(event).await.is_err() {
                    return;
                }
                if failed {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        });
        let desired = topics.device(&self.id, DeviceTopic::Desired);
        let chunks = topics.device(&self.id, DeviceTopic::Chunks);
        let settings = Settings {
            probation: self.opts.probation.clone(),
            window: self.opts.window,
            chunk_timeout: Duration::from_secs(10),
            stall_after: Duration::from_secs(120),
            first_chunk_patience: match self.opts.shared {
                true => modelcast_proto::chunk::MAX_GATHER,
                false => Duration::ZERO,
            },
        };
        let mut updater = Updater::new(settings, Vec::new());
        let mut trust = TrustState::from_root(self.trust.root.clone()).expect("root");
        let mut last_error: Option<ReportedError> = None;
        let mut desired_version = 0;
        let mut staging: Vec<(Instant, String, String)> = Vec::new();
        let mut connected = false;
        let mut listening: BTreeSet<String> = BTreeSet::new();
        // Artifact topics (re)subscribed since the last request for them.
        let mut fresh: BTreeSet<String> = BTreeSet::new();
        // Downloads a chunk of which arrived.
        let mut arrived: BTreeSet<String> = BTreeSet::new();
        loop {
            let now = Instant::now();
            let mut wake = updater.next_wake(now);
            if let Some((at, ..)) = staging.first() {
                wake = wake.min(*at);
            }
            tokio::select! {
                event = events.recv() => match event {
                    None => return,
                    Some(event) => match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.try_subscribe(&desired, QoS::AtLeastOnce);
                        let _ = client.try_subscribe(&chunks, QoS::AtLeastOnce);
                        for artifact in &listening {
                            let _ = client.try_subscribe(topics.artifact(artifact), QoS::AtLeastOnce);
                            fresh.insert(artifact.clone());
                        }
                        let _ = client.try_publish(&online, QoS::AtLeastOnce, true, "online");
                        if !connected {
                            self.stats.connected.fetch_add(1, Ordering::Relaxed);
                            connected = true;
                        }
                        updater.handle_connected();
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic == desired => {
                        let now_unix = modelcast_server::unix_now();
                        let verified = DesiredState::from_slice(&p.payload)
                            .map_err(|e| e.to_string())
                            .and_then(|m| {
                                verify_desired(&trust, &self.trust.director, &self.id, &m, now_unix)
                                    .map_err(|e| e.to_string())
                            });
                        match verified {
                            Ok(v) => {
                                self.stats.desired_ok.fetch_add(1, Ordering::Relaxed);
                                trust = v.trust().clone();
                                desired_version = v.director_version();
                                let wanted: Vec<_> = v
                                    .models()
                                    .iter()
                                    .map(|m| modelcast_agent::update::Wanted {
                                        manifest: m.clone(),
                                        thresholds: v.probation(&m.name),
                                        download: v.download(&m.name).cloned().unwrap_or_default(),
                                    })
                                    .collect();
                                updater.handle_desired(&wanted);
                            }
                            Err(e) => {
                                self.stats.desired_rejected.fetch_add(1, Ordering::Relaxed);
                                updater.note_error(modelcast_proto::report::ErrorKind::Failed, None, None, format!("desired state rejected: {e}"));
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p)))
                        if p.topic == chunks || topics.is_artifact(&p.topic) =>
                    {
                        if let Ok(reply) = ChunkReply::decode(&p.payload) {
                            self.stats
                                .chunk_bytes
                                .fetch_add(reply.data.len() as u64, Ordering::Relaxed);
                            let artifact = hex::encode(reply.artifact);
                            // Inflated as the agent does, no further than the chunk's length.
                            let checked = updater.chunk_len(&artifact, reply.index).and_then(|l| {
                                let wire = p.payload.slice_ref(reply.data);
                                self.copies.check(reply.artifact, reply.index, reply.encoding, &wire, || {
                                    modelcast_agent::inflate::inflate(reply.encoding, reply.data, l)
                                        .ok()
                                })
                            });
                            if let Some((len, sha256)) = checked {
                                if let ChunkFate::Store(name) =
                                    updater.handle_copy(&artifact, reply.index, len, || sha256)
                                {
                                    arrived.insert(artifact);
                                    updater.chunk_stored(&name, reply.index);
                                }
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => updater.handle_disconnected(),
                    },
                },
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
            let now = Instant::now();
            while staging.first().is_some_and(|(at, ..)| *at <= now) {
                let (_, name, sha) = staging.remove(0);
                let fail = self
                    .failing
                    .lock()
                    .expect("failing lock")
                    .contains(&self.id);
                let result = if fail {
                    Err(modelcast_agent::update::Failure::new(
                        modelcast_proto::report::ErrorKind::GoldenMismatch,
                        "golden vector 0 differs from the manifest (simulated)",
                    ))
                } else {
                    Ok(())
                };
                updater.staged(&name, &sha, result);
            }
            updater.handle_timeout(now);
            while let Some(action) = updater.poll_action() {
                match action {
                    Action::PrepareDownload(m) => {
                        let have = vec![false; m.chunks.len()];
                        updater.download_ready(&m.name, &m.sha256, have, 0);
                    }
                    Action::RequestChunks {
                        artifact,
                        chunks,
                        again,
                        ..
                    } => {
                        let shared = self.opts.shared;
                        if shared && listening.insert(artifact.clone()) {
                            fresh.insert(artifact.clone());
                            let subscribe =
                                client.try_subscribe(topics.artifact(&artifact), QoS::AtLeastOnce);
                            if subscribe.is_err() {
                                self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        let joined = fresh.remove(&artifact);
                        self.stats
                            .asked_again
                            .fetch_add(again.len() as u64, Ordering::Relaxed);
                        if !arrived.contains(&artifact) {
                            self.stats
                                .asked_again_first
                                .fetch_add(again.len() as u64, Ordering::Relaxed);
                        }
                        let request = ChunkRequest {
                            format: modelcast_proto::FORMAT_VERSION,
                            device: self.id.clone(),
                            artifact,
                            chunks,
                            again,
                            shared,
                            joined,
                            zstd: true,
                        };
                        // try_: this task also drives the event loop, so it must never wait
                        // on it. A request lost to a full queue is asked again on timeout.
                        let sent = client.try_publish(
                            topics.chunk_requests(&self.id),
                            QoS::AtLeastOnce,
                            false,
                            request.to_vec(),
                        );
                        if sent.is_err() {
                            self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Action::Stage { manifest, .. } => {
                        staging.push((now + self.opts.stage_delay, manifest.name, manifest.sha256));
                    }
                    Action::Activate { name, record, .. } => {
                        self.now_serving(&name, &record);
                        self.stats.activated.fetch_add(1, Ordering::Relaxed);
                        updater.activated(&name, Instant::now());
                    }
                    Action::RollBack { name, record } => self.now_serving(&name, &record),
                    Action::Error {
                        model,
                        version,
                        kind,
                        reason,
                    } => {
                        last_error = Some(ReportedError {
                            model,
                            version,
                            kind,
                            reason,
                            at: modelcast_server::unix_now(),
                        });
                    }
                    Action::Report => {
                        let report = DeviceReport {
                            format: modelcast_proto::FORMAT_VERSION,
                            device: self.id.clone(),
                            labels: self.opts.labels.clone(),
                            agent_version: "sim".into(),
                            models: updater.model_states(),
                            last_error: last_error.clone(),
                            desired_version,
                            at: modelcast_server::unix_now(),
                            engines: None,
                            sealing_key: None,
                        };
                        let _ = client.try_publish(
                            topics.device(&self.id, DeviceTopic::State),
                            QoS::AtLeastOnce,
                            true,
                            report.to_vec(),
                        );
                    }
                    Action::Commit { .. }
                    | Action::Abandon { .. }
                    | Action::Persist { .. }
                    | Action::CollectGarbage
                    | Action::Backoff { .. }
                    | Action::Phase { .. }
                    | Action::Ended { .. } => {}
                }
            }
            if !listening.is_empty() {
                let downloading: BTreeSet<&str> = updater.downloads().collect();
                fresh.retain(|a| downloading.contains(a.as_str()));
                listening.retain(|a| {
                    let keep = downloading.contains(a.as_str());
                    if !keep {
                        let _ = client.try_unsubscribe(topics.artifact(a));
                    }
                    keep
                });
            }
        }
    }
}
