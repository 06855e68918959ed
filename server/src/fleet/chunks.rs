//! Chunk serving: a request is checked against what the device is entitled to, routed by the
//! fan-out planner ([`crate::fanout`]) to the device's own topic or the artifact's shared
//! topic, charged to the device's budget, and sent.

use std::time::Duration;

use modelcast_proto::chunk::{parse_digest, ChunkReply, ChunkRequest};
use modelcast_proto::manifest::Manifest;
use modelcast_proto::topic::DeviceTopic;
use rumqttc::QoS;
use tracing::{debug, warn};

use crate::db::DbError;
use crate::fanout::Route;

use super::{Fleet, Role, Wanted};

/// The files of one download in order, each as its digest and chunk count.
pub(super) type DownloadFiles = Vec<([u8; 32], u32)>;

/// Most downloads whose chunk sources [`Fleet`] keeps in memory at once.
const MAX_DOWNLOADS_KNOWN: usize = 4096;

impl Fleet {
    /// The chunk count of `artifact` if `device` is deployed a model whose artifact it is:
    /// chunks go only to devices entitled to them.
    ///
    /// A chunk replica learns of rollouts from the store: on a miss it reloads them (at most
    /// once a second), since the control server may have just moved the device.
    async fn entitled(&self, device: &str, artifact: &str) -> Result<Option<u32>, DbError> {
        let Some(entry) = self.db.device(device).await? else {
            return Ok(None);
        };
        let chunks = |wanted: Vec<Wanted>| {
            let wanted = wanted
                .iter()
                .find(|(m, t)| m.sha256_in(t.form) == Some(artifact))?;
            let m = super::desired::download_of(wanted);
            self.remember_parts(&m);
            Some(m.download_chunk_count())
        };
        if let Some(count) = chunks(self.wanted(&entry).await?) {
            return Ok(Some(count));
        }
        if self.role == Role::Chunks && self.may_reload() {
            let stored: crate::rollout::Rollouts = self
                .db
                .rollouts()
                .await?
                .into_iter()
                .map(|r| (r.id, r))
                .collect();
            *self.stored_rollouts.lock().expect("rollouts lock") = stored.clone();
            *self.rollouts.lock().expect("rollouts lock") = stored;
            return Ok(chunks(self.wanted(&entry).await?));
        }
        Ok(None)
    }

    /// Records where the chunks of `m`'s download come from (bounded: forgotten wholesale
    /// past [`MAX_DOWNLOADS_KNOWN`], then learnt again from the next requests).
    fn remember_parts(&self, m: &Manifest) {
        let parts = m
            .parts()
            .iter()
            .filter_map(|p| Some((parse_digest(p.sha256).ok()?, p.chunk_count())))
            .collect();
        let mut known = self.parts.lock().expect("parts lock");
        if known.len() >= MAX_DOWNLOADS_KNOWN && !known.contains_key(&m.sha256) {
            known.clear();
        }
        known.insert(m.sha256.clone(), parts);
    }

    /// The file and the index in it of download chunk `index` of `artifact`.
    fn locate(&self, artifact: &str, digest: &[u8; 32], index: u32) -> ([u8; 32], u32) {
        let known = self.parts.lock().expect("parts lock");
        let mut rest = index;
        for (part, count) in known.get(artifact).into_iter().flatten() {
            if rest < *count {
                return (*part, rest);
            }
            rest -= count;
        }
        (*digest, index)
    }

    /// Whether a chunk replica may reload the rollouts now; if so, counts this as the reload.
    fn may_reload(&self) -> bool {
        let mut last = self.reloaded.lock().expect("reload lock");
        let now = std::time::Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            return false;
        }
        *last = Some(now);
        true
    }

    pub(super) async fn serve_chunks(&self, mut req: ChunkRequest) {
        use std::sync::atomic::Ordering::Relaxed;
        let Ok(digest) = parse_digest(&req.artifact) else {
            self.refused.fetch_add(1, Relaxed);
            return;
        };
        match self.entitled(&req.device, &req.artifact).await {
            Ok(Some(count)) => {
                self.requests.fetch_add(1, Relaxed);
                // Made-up or repeated indices neither grow the fan-out state nor send twice.
                req.keep_within(count);
            }
            Ok(None) => {
                self.refused.fetch_add(1, Relaxed);
                warn!(device = %req.device, artifact = %req.artifact, "chunk request for an artifact not deployed to that device refused");
                return;
            }
            Err(e) => {
                warn!(error = %e, "checking a chunk request");
                return;
            }
        }
        let routes = match &self.fanout {
            Some(f) => f
                .lock()
                .expect("fanout lock")
                .route(std::time::Instant::now(), &req),
            None => req.indices().map(|i| (i, Route::Direct)).collect(),
        };
        let own = self.topics.device(&req.device, DeviceTopic::Chunks);
        let mut scheduled = false;
        for (index, route) in routes {
            match route {
                Route::Skip => {
                    self.chunks_skipped.fetch_add(1, Relaxed);
                }
                Route::Shared => scheduled = true,
                Route::Direct | Route::Alone => {
                    let again = req.again.contains(&index);
                    let charge = Some((req.device.as_str(), again));
                    // Asked again: sent as it is, whatever went wrong with a packed copy.
                    let inflates = req.zstd && !again;
                    let qos = match route {
                        Route::Alone => QoS::AtMostOnce,
                        _ => QoS::AtLeastOnce,
                    };
                    if !self
                        .send_chunk(&own, &req.artifact, &digest, index, charge, qos, inflates)
                        .await
                    {
                        break;
                    }
                }
            }
        }
        if scheduled {
            self.fanout_scheduled.notify_one();
        }
    }

    /// Publishes the shared chunks as they fall due ([`Fanout::take_due`]), until `stop`.
    pub(super) async fn publish_shared(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(fanout) = &self.fanout else {
            return;
        };
        loop {
            let next = fanout.lock().expect("fanout lock").next_due();
            let due = async {
                match next {
                    Some(at) => tokio::select! {
                        _ = tokio::time::sleep_until(at.into()) => {}
                        _ = self.fanout_scheduled.notified() => {}
                    },
                    None => self.fanout_scheduled.notified().await,
                }
            };
            tokio::select! {
                // Devices ask again for what was scheduled and not sent.
                _ = super::link::stopped(&mut stop) => return,
                _ = due => {}
            }
            let due = fanout
                .lock()
                .expect("fanout lock")
                .take_due(std::time::Instant::now());
            for (artifact, index) in due {
                let Ok(digest) = parse_digest(&artifact) else {
                    continue;
                };
                let topic = self.topics.artifact(&artifact);
                // Compressed: every device that listens on shared topics inflates (a device
                // too old to would ask again on its own topic, where it gets the chunk as it
                // is).
                if self
                    .send_chunk(
                        &topic,
                        &artifact,
                        &digest,
                        index,
                        None,
                        QoS::AtLeastOnce,
                        true,
                    )
                    .await
                {
                    self.chunks_shared.fetch_add(1, Relaxed);
                }
            }
        }
    }

    /// Publishes chunk `index` of `artifact` on `topic` at `qos`, charged to the budget of the
    /// device `charge` names (for a chunk it asked again, or the first time) if given; false if
    /// the broker link is gone or the device is over its budget (the rest of its request is not
    /// sent either).
    ///
    /// A device downloading an artifact alone ([`Route::Alone`]) gets its chunks at QoS 0: it
    /// asked for them within its window, checks each against its digest and asks again for what
    /// does not come, so a broker's acknowledgement adds only a small packet per chunk. Those
    /// held each next request back 20-40 ms (the broker's small packets to the server wait, by
    /// Nagle's algorithm, for the server's delayed ACK of the one before; neither rumqttd nor
    /// mosquitto by default sets TCP_NODELAY). Everything else goes at QoS 1, which paces the
    /// server to what the broker takes, whose per-subscriber queues and inflight limits then
    /// apply (a shared publication at QoS 0 becomes a packet per subscriber at once).
    ///
    /// With compression on and `inflates` (the receiver can inflate), the chunk goes packed
    /// as it was at upload, if it packed to anything smaller ([`crate::compress`]).
    #[allow(clippy::too_many_arguments)]
    async fn send_chunk(
        &self,
        topic: &str,
        artifact: &str,
        digest: &[u8; 32],
        index: u32,
        charge: Option<(&str, bool)>,
        qos: QoS,
        inflates: bool,
    ) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let (file, at) = self.locate(artifact, digest, index);
        let data = match self.db.chunk(&file, at).await {
            Ok(Some(d)) => d,
            Ok(None) => {
                debug!(%artifact, index, "requested chunk not held");
                return true;
            }
            Err(e) => {
                warn!(error = %e, "reading chunk");
                return false;
            }
        };
        let raw_len = data.len() as u64;
        let stored = match self.compress_chunks && inflates {
            true => self
                .db
                .chunk(&crate::compress::packed_key(&file), at)
                .await
                .ok()
                .flatten()
                .and_then(crate::compress::from_stored),
            false => None,
        };
        let packed = stored.unwrap_or(crate::compress::Packed {
            encoding: modelcast_proto::chunk::Encoding::Raw,
            data,
        });
        let data = packed.data;
        if let Some((device, again)) = charge {
            let budgets = match again {
                true => &self.asked_again,
                false => &self.first_asks,
            };
            let admitted = budgets.lock().expect("budgets lock").admit(
                device,
                data.len() as u64,
                std::time::Instant::now(),
            );
            if !admitted {
                self.chunks_over_budget.fetch_add(1, Relaxed);
                self.drops.add(device, "chunks_over_budget", 1);
                debug!(%device, %artifact, index, "chunk over the device's budget not sent");
                return false;
            }
        }
        let frame = ChunkReply {
            artifact: *digest,
            index,
            encoding: packed.encoding,
            data: &data,
        }
        .encode();
        if self.client.publish(topic, qos, false, frame).await.is_err() {
            return false;
        }
        self.chunks.fetch_add(1, Relaxed);
        self.chunk_bytes.fetch_add(data.len() as u64, Relaxed);
        self.chunk_raw_bytes.fetch_add(raw_len, Relaxed);
        true
    }
}
