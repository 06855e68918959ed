//! The MQTT link: connects with rumqttc, keeps a retained `online` status with a last will,
//! subscribes to this device's desired state, chunk replies and the server's receipts for its
//! telemetry, and to the shared topic of each artifact it downloads
//! (chunks published once for every device), and turns broker traffic into [`LinkEvent`]s.
//! Over TLS (rustls, ring) with a client certificate when the broker is `mqtts://`. It
//! decides nothing; the driver does.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use modelcast_proto::chunk::ChunkRequest;
use modelcast_proto::manifest::MAX_CHUNK_SIZE;
use modelcast_proto::report::DeviceReport;
use modelcast_proto::topic::{DeviceTopic, Topics};
use rumqttc::{
    AsyncClient, Event, LastWill, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;

use crate::config::Config;

/// What the broker told us.
#[derive(Debug)]
pub enum LinkEvent {
    /// (Re)connected and subscribed.
    Connected,
    /// The connection dropped; rumqttc reconnects by itself.
    Disconnected(String),
    /// A desired-state message (untrusted bytes).
    Desired(Bytes),
    /// A chunk reply, on the device's own topic or an artifact's shared topic (untrusted
    /// bytes).
    Chunk(Bytes),
    /// The server's receipt for some of this device's telemetry reports: it has them.
    TelemetryAck(Bytes),
    /// The server's answer to a renewal request (untrusted bytes).
    Certificate(Bytes),
}

/// Sends this device's messages.
#[derive(Clone)]
pub struct Link {
    client: AsyncClient,
    topics: Topics,
    device: String,
    /// The artifact topics listened on (subscribed again after each reconnect), each with
    /// whether it was (re)subscribed since the last request for it.
    artifacts: Arc<Mutex<BTreeMap<String, bool>>>,
    /// A TLS configuration to connect with from the next connection on (a renewed
    /// certificate), taken by the event loop.
    next_tls: Arc<Mutex<Option<rustls::ClientConfig>>>,
}

/// Largest packet the agent accepts: a maximal chunk plus framing.
pub const MAX_INCOMING_PACKET: usize = MAX_CHUNK_SIZE as usize + 64 * 1024;

impl Link {
    /// Starts the MQTT connection (over TLS when `tls` is given); events arrive on the
    /// returned channel.
    pub fn connect(
        cfg: &Config,
        tls: Option<rustls::ClientConfig>,
    ) -> (Link, mpsc::Receiver<LinkEvent>) {
        let broker = cfg.broker_url().expect("validated config");
        let topics = Topics::new(&cfg.topic_prefix);
        let device = cfg.device_id.clone();
        let mut opts = MqttOptions::new(&device, broker.host, broker.port);
        if let Some(tls) = tls {
            opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                std::sync::Arc::new(tls),
            )));
        }
        opts.set_keep_alive(Duration::from_secs(15))
            .set_clean_session(true)
            .set_max_packet_size(MAX_INCOMING_PACKET, 1024 * 1024)
            .set_last_will(LastWill::new(
                topics.device(&device, DeviceTopic::Online),
                "offline",
                QoS::AtLeastOnce,
                true,
            ));
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        // Chunk requests are small messages that must not wait for Nagle's algorithm behind
        // the acknowledgements of earlier ones (a 40 ms delayed-ACK stall per request).
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        let (tx, rx) = mpsc::channel(256);
        let artifacts = Arc::new(Mutex::new(BTreeMap::new()));
        let next_tls = Arc::new(Mutex::new(None::<rustls::ClientConfig>));
        let link = Link {
            client: client.clone(),
            topics: topics.clone(),
            device: device.clone(),
            artifacts: artifacts.clone(),
            next_tls: next_tls.clone(),
        };
        let desired = topics.device(&device, DeviceTopic::Desired);
        let chunks = topics.device(&device, DeviceTopic::Chunks);
        let online = topics.device(&device, DeviceTopic::Online);
        let receipts = topics.device(&device, DeviceTopic::TelemetryAcks);
        let certificates = topics.device(&device, DeviceTopic::Certificate);
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                let polled = eventloop.poll().await;
                // A renewed certificate: the connection is dropped and made again with it.
                if let Some(tls) = next_tls.lock().expect("next TLS lock").take() {
                    eventloop
                        .mqtt_options
                        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                            std::sync::Arc::new(tls),
                        )));
                    if polled.is_ok() {
                        eventloop.clean();
                    }
                }
                let event = match polled {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        backoff = Duration::from_millis(200);
                        // try_*: this task drives the event loop, so it must never wait on it.
                        let _ = client.try_subscribe(&desired, QoS::AtLeastOnce);
                        let _ = client.try_subscribe(&chunks, QoS::AtLeastOnce);
                        // The server's receipts for our telemetry.
                        let _ = client.try_subscribe(&receipts, QoS::AtLeastOnce);
                        let _ = client.try_subscribe(&certificates, QoS::AtLeastOnce);
                        for (topic, joined) in artifacts.lock().expect("artifacts lock").iter_mut()
                        {
                            let _ = client.try_subscribe(topic, QoS::AtLeastOnce);
                            *joined = true;
                        }
                        let _ = client.try_publish(&online, QoS::AtLeastOnce, true, "online");
                        Some(LinkEvent::Connected)
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if p.topic == desired {
                            Some(LinkEvent::Desired(p.payload))
                        } else if p.topic == chunks {
                            Some(LinkEvent::Chunk(p.payload))
                        } else if p.topic == receipts {
                            Some(LinkEvent::TelemetryAck(p.payload))
                        } else if p.topic == certificates {
                            Some(LinkEvent::Certificate(p.payload))
                        } else if topics.is_artifact(&p.topic) {
                            Some(LinkEvent::Chunk(p.payload))
                        } else {
                            None
                        }
                    }
                    Ok(_) => None,
                    Err(e) => {
                        let event = LinkEvent::Disconnected(e.to_string());
                        if tx.send(event).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        None
                    }
                };
                if let Some(event) = event {
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
            }
        });
        (link, rx)
    }

    /// Listens on `artifact`'s shared topic (hex SHA-256), if not already: chunks the server
    /// publishes there for any device arrive as [`LinkEvent::Chunk`]. Called before the
    /// first request, so the subscription is in place before the server answers.
    pub async fn listen(&self, artifact: &str) {
        let topic = self.topics.artifact(artifact);
        // Joined once, when first listened to (and again at every reconnect): marking it at
        // every request made each request a new join, and the server gathered 250 ms for
        // each (a 100 MB update took 2.3 s instead of 0.5 s).
        let new = {
            let mut artifacts = self.artifacts.lock().expect("artifacts lock");
            match artifacts.entry(topic.clone()) {
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(true);
                    true
                }
                std::collections::btree_map::Entry::Occupied(_) => false,
            }
        };
        if new {
            let _ = self.client.subscribe(topic, QoS::AtLeastOnce).await;
        }
    }

    /// Whether `artifact`'s shared topic was (re)subscribed since this was last asked: the
    /// next request says so ([`ChunkRequest::joined`]).
    pub fn take_joined(&self, artifact: &str) -> bool {
        let topic = self.topics.artifact(artifact);
        let mut artifacts = self.artifacts.lock().expect("artifacts lock");
        artifacts.get_mut(&topic).is_some_and(std::mem::take)
    }

    /// Stops listening on every artifact topic but those of `downloading` (nothing to do,
    /// and no message, when it listens on no other).
    pub async fn listen_only(&self, downloading: &BTreeSet<String>) {
        let gone: Vec<String> = {
            let mut artifacts = self.artifacts.lock().expect("artifacts lock");
            let keep: BTreeSet<String> = downloading
                .iter()
                .map(|a| self.topics.artifact(a))
                .collect();
            let gone = artifacts
                .keys()
                .filter(|t| !keep.contains(*t))
                .cloned()
                .collect();
            artifacts.retain(|t, _| keep.contains(t));
            gone
        };
        for topic in gone {
            let _ = self.client.unsubscribe(topic).await;
        }
    }

    /// Asks the server for chunks.
    pub async fn request_chunks(&self, request: &ChunkRequest) {
        let _ = self
            .client
            .publish(
                self.topics.chunk_requests(&self.device),
                QoS::AtLeastOnce,
                false,
                request.to_vec(),
            )
            .await;
    }

    /// Publishes a state report (retained: the server sees the latest even after a restart).
    pub async fn report(&self, report: &DeviceReport) {
        let _ = self
            .client
            .publish(
                self.topics.device(&self.device, DeviceTopic::State),
                QoS::AtLeastOnce,
                true,
                report.to_vec(),
            )
            .await;
    }

    /// Publishes a telemetry report (QoS 1, not retained).
    pub async fn telemetry(&self, report: Vec<u8>) {
        let _ = self
            .client
            .publish(
                self.topics.device(&self.device, DeviceTopic::Telemetry),
                QoS::AtLeastOnce,
                false,
                report,
            )
            .await;
    }

    /// Asks the server to renew this device's certificate (QoS 1, not retained).
    pub async fn renew(&self, request: &modelcast_proto::enrol::EnrolRequest) {
        let _ = self
            .client
            .publish(
                self.topics.device(&self.device, DeviceTopic::Enrol),
                QoS::AtLeastOnce,
                false,
                request.to_vec(),
            )
            .await;
    }

    /// Connects with `tls` from now on: the connection is made again at once (its online
    /// status published again wakes the event loop, which drops it) and proves the new
    /// certificate.
    pub async fn use_tls(&self, tls: rustls::ClientConfig) {
        *self.next_tls.lock().expect("next TLS lock") = Some(tls);
        let online = self.topics.device(&self.device, DeviceTopic::Online);
        let _ = self
            .client
            .publish(online, QoS::AtLeastOnce, true, "online")
            .await;
    }

    /// Marks the device offline and disconnects cleanly.
    pub async fn close(&self) {
        let _ = self
            .client
            .publish(
                self.topics.device(&self.device, DeviceTopic::Online),
                QoS::AtLeastOnce,
                true,
                "offline",
            )
            .await;
        let _ = self.client.disconnect().await;
    }
}
