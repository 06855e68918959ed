//! The attacker's tools: a rogue MQTT client (plain or with a device certificate), forged
//! chunks, stolen keys and forged signed metadata.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use modelcast_proto::manifest::Manifest;
use modelcast_server::keyset;

use crate::Fleet;

/// An attacker with a connection to the broker: a rogue client, a device gone bad, or a
/// compromised server replica, depending on the identity it connects with.
pub struct Rogue {
    client: rumqttc::Client,
    /// Its subscriptions, made again at every connection (the broker may drop one before
    /// its SUBACK: rumqttd sometimes ends a new connection once; with a clean session the
    /// subscription goes with it).
    filters: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    acks: std::sync::mpsc::Receiver<Vec<rumqttc::SubscribeReasonCode>>,
    seen: std::sync::mpsc::Receiver<(String, Vec<u8>)>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    _thread: std::thread::JoinHandle<()>,
}

/// What a rogue does to the chunks it is asked for.
#[derive(Debug, Clone, Copy)]
pub enum ChunkAttack {
    /// Flip a byte in every chunk.
    Tamper,
    /// Serve the artifact one byte short (the last chunk truncated).
    Truncate,
    /// Endless data: every chunk with 64 KiB more than the manifest declares.
    Pad,
    /// Slow retrieval: take the requests and never answer.
    Stall,
    /// A decompression bomb: every chunk compressed with 1 MiB of zeros after it, so that
    /// it inflates far past the length the manifest gives it.
    Bomb,
}

/// MQTT options for a TLS connection to the broker on `port` with the client certificate
/// `identity` from `pki` (issued now if it does not exist yet: a device the fleet CA vouches
/// for), as client `client_id`.
pub fn tls_options(port: u16, pki: &Path, identity: &str, client_id: &str) -> rumqttc::MqttOptions {
    let id = modelcast_server::pki::Identity::in_dir(pki, identity);
    if !id.cert.exists() {
        modelcast_server::pki::issue(pki, identity).expect("issuing a certificate");
    }
    let read = |p: &Path| std::fs::read(p).expect("PKI file");
    let (ca, cert, key) = (read(&pki.join("ca.pem")), read(&id.cert), read(&id.key));
    let tls = modelcast_proto::tls::client_config(
        &ca,
        Some(modelcast_proto::tls::ClientIdentity {
            cert_pem: &cert,
            key_pem: &key,
        }),
    )
    .expect("TLS config");
    let mut opts = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(tls)),
    ));
    opts
}

/// Whether a client with `opts` gets a successful CONNACK within `limit` (a refusal, a
/// failed handshake or silence: `false`).
pub fn connects(opts: rumqttc::MqttOptions, limit: Duration) -> bool {
    use rumqttc::{Event, Packet};
    let (_client, mut connection) = rumqttc::Client::new(opts, 8);
    let end = std::time::Instant::now() + limit;
    while std::time::Instant::now() < end {
        match connection.recv_timeout(Duration::from_millis(500)) {
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                return ack.code == rumqttc::ConnectReturnCode::Success
            }
            Ok(Err(_)) => return false,
            _ => {}
        }
    }
    false
}

/// What the rogue serves chunks of: the true bytes, chunked as their manifest says, and what
/// to do to them.
#[derive(Debug, Clone)]
pub struct RogueArtifact {
    bytes: Vec<u8>,
    chunk_size: u32,
    segments: Vec<u64>,
    attack: ChunkAttack,
}

impl RogueArtifact {
    /// `bytes`, the artifact of `manifest`, served with `attack`.
    pub fn new(
        bytes: Vec<u8>,
        manifest: &modelcast_proto::manifest::Manifest,
        attack: ChunkAttack,
    ) -> Self {
        RogueArtifact {
            bytes,
            chunk_size: manifest.chunk_size,
            segments: manifest.segments.clone(),
            attack,
        }
    }
}

impl Rogue {
    /// Connects to the plain broker on `port`; answers chunk requests for `artifact` (the
    /// true bytes) with the attack applied.
    pub fn connect(port: u16, artifact: Option<RogueArtifact>) -> Rogue {
        // A client id no other rogue of this process has had (a reused one would let a
        // dropped rogue's session and its successor's knock each other off).
        static ROGUES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = ROGUES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("rogue-{}-{n}", std::process::id());
        let opts = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        Self::start(opts, artifact)
    }

    /// Connects over TLS with the client certificate `identity` from `pki` (issued now if
    /// it does not exist yet: a device the fleet CA vouches for).
    pub fn connect_tls(
        port: u16,
        pki: &Path,
        identity: &str,
        artifact: Option<RogueArtifact>,
    ) -> Rogue {
        Self::connect_tls_as(port, pki, identity, identity, artifact)
    }

    /// [`Rogue::connect_tls`] with a client id other than its certificate's name (a session
    /// takeover attempt).
    pub fn connect_tls_as(
        port: u16,
        pki: &Path,
        identity: &str,
        client_id: &str,
        artifact: Option<RogueArtifact>,
    ) -> Rogue {
        Self::start(tls_options(port, pki, identity, client_id), artifact)
    }

    fn start(mut opts: rumqttc::MqttOptions, artifact: Option<RogueArtifact>) -> Rogue {
        use modelcast_proto::chunk::{ChunkReply, ChunkRequest};
        use modelcast_proto::topic::{DeviceTopic, Topics};
        use rumqttc::{Event, Packet, QoS};
        opts.set_max_packet_size(8 << 20, 8 << 20);
        let (client, mut connection) = rumqttc::Client::new(opts, 64);
        let topics = Topics::new("modelcast");
        let answers = artifact.is_some();
        let filters = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        if answers {
            filters
                .lock()
                .unwrap()
                .push(topics.all_devices(DeviceTopic::Requests));
        }
        let resubscribe = (client.clone(), filters.clone());
        let (ack_tx, acks) = std::sync::mpsc::channel();
        let (seen_tx, seen) = std::sync::mpsc::channel();
        let replier = client.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            for event in connection.iter() {
                // A dropped rogue must not reconnect (and kick its successor off the broker).
                if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let p = match event {
                    Ok(Event::Incoming(Packet::Publish(p))) => p,
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let (client, filters) = &resubscribe;
                        for filter in filters.lock().unwrap().iter() {
                            let _ = client.try_subscribe(filter, QoS::AtLeastOnce);
                        }
                        continue;
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        let _ = ack_tx.send(ack.return_codes);
                        continue;
                    }
                    Ok(_) => continue,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                let is_request = matches!(
                    topics.parse_device(&p.topic),
                    Some((_, DeviceTopic::Requests))
                );
                if !is_request {
                    let _ = seen_tx.send((p.topic.clone(), p.payload.to_vec()));
                    continue;
                }
                let (Some(served), Ok(req)) = (&artifact, ChunkRequest::from_slice(&p.payload))
                else {
                    continue;
                };
                let bytes = &served.bytes;
                let spans: Vec<_> = modelcast_proto::manifest::spans(
                    bytes.len() as u64,
                    served.chunk_size,
                    &served.segments,
                )
                .collect();
                let Ok(digest) = modelcast_proto::chunk::parse_digest(&req.artifact) else {
                    continue;
                };
                for index in req.indices() {
                    let Some(span) = spans.get(index as usize) else {
                        continue;
                    };
                    let (start, end) = (
                        span.offset as usize,
                        (span.offset + u64::from(span.len)) as usize,
                    );
                    let mut data = bytes[start..end].to_vec();
                    let mut encoding = modelcast_proto::chunk::Encoding::Raw;
                    match served.attack {
                        ChunkAttack::Tamper => data[0] ^= 0xff,
                        ChunkAttack::Truncate if end == bytes.len() => {
                            data.pop();
                        }
                        ChunkAttack::Truncate => {}
                        ChunkAttack::Pad => data.extend(std::iter::repeat_n(0u8, 64 * 1024)),
                        ChunkAttack::Stall => continue,
                        ChunkAttack::Bomb => {
                            data.extend(std::iter::repeat_n(0u8, 1 << 20));
                            data = zstd::bulk::compress(&data, 3).expect("zstd");
                            encoding = modelcast_proto::chunk::Encoding::Zstd;
                        }
                    }
                    let frame = ChunkReply {
                        artifact: digest,
                        index,
                        encoding,
                        data: &data,
                    }
                    .encode();
                    let topic = topics.device(&req.device, DeviceTopic::Chunks);
                    let _ = replier.try_publish(topic, QoS::AtLeastOnce, false, frame);
                }
            }
        });
        // The rogue answers only once the broker has taken its subscription to the requests.
        if answers {
            acks.recv_timeout(Duration::from_secs(10))
                .expect("the rogue's SUBACK within 10 s");
        }
        Rogue {
            client,
            filters,
            acks,
            seen,
            stop,
            _thread: thread,
        }
    }

    /// Publishes a retained desired state for `device`.
    pub fn publish_desired(&self, device: &str, desired: &modelcast_proto::desired::DesiredState) {
        self.publish_raw(&desired_topic(device), true, desired.to_vec());
    }

    /// Publishes any bytes on any topic (QoS 1).
    pub fn publish_raw(&self, topic: &str, retained: bool, payload: Vec<u8>) {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, retained, payload)
            .expect("publish");
    }

    /// Subscribes to `filter` and returns whether the broker granted it (bounded wait).
    pub fn subscribe(&self, filter: &str) -> bool {
        self.try_subscribe(filter, Duration::from_secs(10))
            .expect("a SUBACK within 10 s")
    }

    /// Subscribes to `filter`: whether the broker granted it, or `None` if no SUBACK came
    /// within `wait` (a broker that refused the connection, or closed it).
    pub fn try_subscribe(&self, filter: &str, wait: Duration) -> Option<bool> {
        self.filters.lock().unwrap().push(filter.to_string());
        self.client
            .subscribe(filter, rumqttc::QoS::AtLeastOnce)
            .expect("subscribe");
        let codes = self.acks.recv_timeout(wait).ok()?;
        Some(
            codes
                .iter()
                .all(|c| !matches!(c, rumqttc::SubscribeReasonCode::Failure)),
        )
    }

    /// Every message delivered to this rogue since the last call (chunk requests aside):
    /// topic and payload.
    pub fn seen(&self) -> Vec<(String, Vec<u8>)> {
        self.seen.try_iter().collect()
    }
}

/// The retained desired-state topic of `device` under the default prefix.
pub fn desired_topic(device: &str) -> String {
    modelcast_proto::topic::Topics::new("modelcast")
        .device(device, modelcast_proto::topic::DeviceTopic::Desired)
}

impl Drop for Rogue {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.client.disconnect();
    }
}

/// The fleet's real keys, as an attacker who stole them (or a test) would hold them.
pub fn stolen_keys(keys: &Path) -> modelcast_proto::verify::fixture::Keys {
    let read = |f: &str| keyset::read_key(&keys.join(f)).expect("key file");
    modelcast_proto::verify::fixture::Keys {
        root: read("root.key"),
        targets: read("targets.key"),
        snapshot: read("server.key"),
        timestamp: read("server.key"),
        director: read("server.key"),
    }
}

/// A compromised fleet server: it holds the server's online key (snapshot, timestamp,
/// director) but not the operators' offline keys, so it can only re-sign what the operators
/// already signed, with whatever versions, expiries and devices it likes.
pub struct Forger {
    online: modelcast_proto::keys::SigningKey,
    /// The operators' signed targets, as the server holds them.
    pub targets: modelcast_proto::metadata::Signed,
    /// The operators' signed hash bins, as the server holds them.
    pub bins: BTreeMap<String, modelcast_proto::metadata::Signed>,
}

impl Forger {
    /// Steals the online key from `keys` and the current targets from the server.
    pub fn steal(fleet: &Fleet) -> Forger {
        let targets = fleet
            .client
            .targets()
            .expect("targets from the API")
            .expect("published targets");
        let top: modelcast_proto::metadata::Targets = targets.parse("targets").expect("targets");
        let mut bins = BTreeMap::new();
        if let Some(s) = top.delegations.and_then(|d| d.succinct_roles) {
            for bin in 0..(1u32 << s.bit_length) {
                let role = s.role_name(bin);
                if let Some(doc) = fleet.client.delegated_targets(&role).expect("a bin") {
                    bins.insert(role, doc);
                }
            }
        }
        Forger {
            online: keyset::read_key(&fleet.keys.join("server.key")).expect("server key"),
            targets,
            bins,
        }
    }

    /// The same forger presenting `targets` (e.g. signed with a stolen or revoked key) as
    /// the operators'.
    pub fn with_targets(self, targets: modelcast_proto::metadata::Signed) -> Forger {
        Forger { targets, ..self }
    }

    /// A desired state for `device` naming `models`, with metadata version `version` and
    /// snapshot/timestamp/director expiring at `expires`.
    pub fn desired(
        &self,
        device: &str,
        models: &[Manifest],
        version: u64,
        expires: &str,
    ) -> modelcast_proto::desired::DesiredState {
        // Only the online roles' keys are used; the offline ones never leave the operators.
        let online = modelcast_proto::verify::fixture::Keys {
            root: self.online.clone(),
            targets: self.online.clone(),
            snapshot: self.online.clone(),
            timestamp: self.online.clone(),
            director: self.online.clone(),
        };
        let top: Option<modelcast_proto::metadata::Targets> = self.targets.parse("targets").ok();
        let delegated = models
            .iter()
            .filter_map(|m| modelcast_proto::bins::bin_for(top.as_ref()?, &m.target_path()))
            .filter_map(|role| Some((role.clone(), self.bins.get(&role)?.clone())))
            .collect();
        online.desired_with(&self.targets, delegated, device, models, version, expires)
    }
}
