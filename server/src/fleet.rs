//! The server's MQTT side: device reports and online status in, chunk replies and retained
//! desired states out. Handlers run off the event loop so it never waits on itself.

use std::sync::Arc;
use std::time::Duration;

use modelcast_proto::chunk::{parse_digest, ChunkReply, ChunkRequest};
use modelcast_proto::desired::TrialThresholds;
use modelcast_proto::manifest::Manifest;
use modelcast_proto::report::DeviceReport;
use modelcast_proto::topic::{DeviceTopic, Topics};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tokio::sync::{mpsc, Mutex};
use tracing::{debug, info, warn};

use crate::db::{Db, DbError, Deployment, DeviceEntry, DirectorEntry};
use crate::group::Selector;
use crate::repo::{RepoError, Repository, ONLINE_LIFETIME_SECS};
use crate::unix_now;

/// A version a device should run, with its deployment's probation thresholds.
pub type Wanted = (Manifest, Option<TrialThresholds>);

/// Where and as whom the server connects to the broker.
pub struct BrokerLink {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// MQTT client id; with mosquitto's `use_username_as_clientid` it must equal the
    /// certificate's common name.
    pub client_id: String,
    /// TLS client configuration (with the server's certificate), for `mqtts://`.
    pub tls: Option<rustls::ClientConfig>,
}

/// The fleet: store, repository and the MQTT client.
pub struct Fleet {
    db: Db,
    repo: Repository,
    topics: Topics,
    client: AsyncClient,
    publishing: Mutex<()>,
}

impl Fleet {
    /// Connects to the broker through `link` and starts handling fleet traffic.
    pub fn start(db: Db, repo: Repository, topics: Topics, link: BrokerLink) -> Arc<Fleet> {
        let mut opts = MqttOptions::new(link.client_id, link.host, link.port);
        if let Some(tls) = link.tls {
            opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(tls),
            )));
        }
        opts.set_keep_alive(Duration::from_secs(15))
            .set_clean_session(true)
            .set_max_packet_size(1024 * 1024, crate::broker::MAX_PAYLOAD)
            .set_inflight(256);
        let (client, mut eventloop) = AsyncClient::new(opts, 1024);
        let fleet = Arc::new(Fleet {
            db,
            repo,
            topics,
            client,
            publishing: Mutex::new(()),
        });
        let (tx, mut rx) = mpsc::channel::<(String, bytes::Bytes)>(1024);
        let subscriber = fleet.clone();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        info!("server connected to broker");
                        let t = &subscriber.topics;
                        let c = &subscriber.client;
                        let _ =
                            c.try_subscribe(t.all_devices(DeviceTopic::State), QoS::AtLeastOnce);
                        let _ =
                            c.try_subscribe(t.all_devices(DeviceTopic::Online), QoS::AtLeastOnce);
                        let _ = c.try_subscribe(
                            t.chunk_requests_shared("modelcast-server"),
                            QoS::AtLeastOnce,
                        );
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send((p.topic, p.payload)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        warn!(error = %e, "server broker link down");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
        let handler = fleet.clone();
        tokio::spawn(async move {
            while let Some((topic, payload)) = rx.recv().await {
                handler.handle(&topic, &payload).await;
            }
        });
        let refresher = fleet.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                if let Err(e) = refresher.refresh_if_due().await {
                    warn!(error = %e, "refreshing timestamp failed");
                }
            }
        });
        fleet
    }

    /// The store.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The repository.
    pub fn repo(&self) -> &Repository {
        &self.repo
    }

    async fn handle(self: &Arc<Self>, topic: &str, payload: &[u8]) {
        let Some((device, kind)) = self.topics.parse_device(topic) else {
            return;
        };
        if kind == DeviceTopic::Requests {
            match ChunkRequest::from_slice(payload) {
                // The topic is the sender (the broker's ACL binds it); the request must agree.
                Ok(req) if req.device == device => {
                    let fleet = self.clone();
                    tokio::spawn(async move { fleet.serve_chunks(req).await });
                }
                Ok(req) => {
                    warn!(%device, named = %req.device, "chunk request naming another device dropped")
                }
                Err(e) => warn!(%device, error = %e, "bad chunk request dropped"),
            }
            return;
        }
        let result = match kind {
            DeviceTopic::State => self.handle_report(&device, payload).await,
            DeviceTopic::Online => self.handle_online(&device, payload),
            _ => Ok(()),
        };
        if let Err(e) = result {
            warn!(%device, error = %e, "device message rejected");
        }
    }

    async fn handle_report(&self, device: &str, payload: &[u8]) -> Result<(), String> {
        if payload.is_empty() {
            return Ok(()); // A cleared retained message.
        }
        let report = DeviceReport::from_slice(payload).map_err(|e| e.to_string())?;
        if report.device != device {
            return Err(format!(
                "report names {:?} on {device}'s topic",
                report.device
            ));
        }
        let previous = self.db.device(device).map_err(|e| e.to_string())?;
        let labels_changed = previous.as_ref().is_none_or(|p| p.labels != report.labels);
        let known_error = previous
            .as_ref()
            .and_then(|p| p.report.as_ref()?.last_error.as_ref());
        if let Some(e) = &report.last_error {
            if known_error != Some(e) {
                warn!(
                    %device,
                    model = e.model.as_deref().unwrap_or("-"),
                    version = e.version.unwrap_or(0),
                    reason = %e.reason,
                    "device rejected or rolled back an update"
                );
            }
        }
        let entry = DeviceEntry {
            id: device.into(),
            labels: report.labels.clone(),
            online: previous.as_ref().is_none_or(|p| p.online),
            last_seen: unix_now(),
            report: Some(report),
        };
        self.db.put_device(&entry).map_err(|e| e.to_string())?;
        if labels_changed {
            info!(%device, labels = ?entry.labels, "device registered");
            self.publish_desired(device)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn handle_online(&self, device: &str, payload: &[u8]) -> Result<(), String> {
        let Some(mut entry) = self.db.device(device).map_err(|e| e.to_string())? else {
            return Ok(());
        };
        entry.online = payload == b"online";
        entry.last_seen = unix_now();
        self.db.put_device(&entry).map_err(|e| e.to_string())
    }

    /// Whether `device` is deployed a model whose artifact is `artifact`: chunks go only to
    /// devices entitled to them.
    fn entitled(&self, device: &str, artifact: &str) -> Result<bool, DbError> {
        let Some(entry) = self.db.device(device)? else {
            return Ok(false);
        };
        Ok(self
            .wanted(&entry)?
            .iter()
            .any(|(m, _)| m.sha256 == artifact))
    }

    async fn serve_chunks(&self, req: ChunkRequest) {
        let Ok(digest) = parse_digest(&req.artifact) else {
            return;
        };
        match self.entitled(&req.device, &req.artifact) {
            Ok(true) => {}
            Ok(false) => {
                warn!(device = %req.device, artifact = %req.artifact, "chunk request for an artifact not deployed to that device refused");
                return;
            }
            Err(e) => {
                warn!(error = %e, "checking a chunk request");
                return;
            }
        }
        let topic = self.topics.device(&req.device, DeviceTopic::Chunks);
        for index in req.chunks {
            let data = match self.db.chunk(&digest, index) {
                Ok(Some(d)) => d,
                Ok(None) => {
                    debug!(artifact = %req.artifact, index, "requested chunk not held");
                    continue;
                }
                Err(e) => {
                    warn!(error = %e, "reading chunk");
                    return;
                }
            };
            let frame = ChunkReply {
                artifact: digest,
                index,
                data: &data,
            }
            .encode();
            if self
                .client
                .publish(&topic, QoS::AtLeastOnce, false, frame)
                .await
                .is_err()
            {
                return;
            }
        }
    }

    /// The manifests `device` should run, each with its deployment's probation thresholds:
    /// per model, the latest deployment whose group selects it.
    pub fn wanted(&self, device: &DeviceEntry) -> Result<Vec<Wanted>, DbError> {
        let mut per_model: std::collections::BTreeMap<String, Deployment> = Default::default();
        for d in self.db.deployments()? {
            if Selector::parse(&d.group).is_ok_and(|s| s.matches(&device.labels)) {
                per_model.insert(d.model.clone(), d);
            }
        }
        let mut out = Vec::new();
        for (name, d) in per_model {
            if let Some(entry) = self.db.model(&name, d.version)? {
                out.push((entry.manifest, d.probation));
            }
        }
        Ok(out)
    }

    /// Publishes `device`'s desired state if it changed since the last publication.
    pub async fn publish_desired(&self, device: &str) -> Result<bool, RepoError> {
        let _guard = self.publishing.lock().await;
        let Some(entry) = self.db.device(device)? else {
            return Ok(false);
        };
        let models = self.wanted(&entry)?;
        if models.is_empty() {
            return Ok(false);
        }
        let ts = self.repo.timestamp()?.map_or(0, |t| t.version);
        let mut paths: Vec<String> = models
            .iter()
            .map(|(m, t)| match t {
                Some(t) => format!("{}{}", m.target_path(), serde_json::json!(t)),
                None => m.target_path(),
            })
            .collect();
        paths.sort();
        let content = format!("{}@{ts}", paths.join(","));
        let last = self.db.director(device)?;
        if last.content == content {
            return Ok(false);
        }
        let version = last.version + 1;
        let desired = self.repo.desired(device, &models, version, unix_now())?;
        let topic = self.topics.device(device, DeviceTopic::Desired);
        self.client
            .publish(topic, QoS::AtLeastOnce, true, desired.to_vec())
            .await
            .map_err(|e| RepoError::Rejected(format!("publishing: {e}")))?;
        self.db
            .put_director(device, &DirectorEntry { version, content })?;
        info!(%device, version, models = ?paths, "desired state published");
        Ok(true)
    }

    /// Re-evaluates every device (after a deployment or a repository change).
    pub async fn publish_all(&self) -> Result<usize, RepoError> {
        let mut changed = 0;
        for d in self.db.devices()? {
            if self.publish_desired(&d.id).await? {
                changed += 1;
            }
        }
        Ok(changed)
    }

    async fn refresh_if_due(&self) -> Result<(), RepoError> {
        let Some(ts) = self.repo.timestamp()? else {
            return Ok(());
        };
        let expires = modelcast_proto::metadata::parse_expiry(&ts.expires).unwrap_or(0);
        if expires - unix_now() < ONLINE_LIFETIME_SECS / 2 {
            self.repo.refresh(unix_now())?;
            self.publish_all().await?;
        }
        Ok(())
    }
}
