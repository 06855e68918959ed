//! The fleet's tasks and its MQTT event loop: one supervisor ([`supervise`]) polls the broker
//! link, decides what is read at all ([`Fleet::admit`]), answers chunk requests at once (at
//! most `max_chunk_requests` at a time) and hands everything else to the handler in order;
//! every task of the fleet runs in its [`JoinSet`] and ends on the one shutdown signal. On
//! shutdown it drains: the handler finishes its queue (reports and telemetry stored), chunk
//! replies in flight are sent, the broker link is polled until all of it is written, then
//! closed with a DISCONNECT.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use modelcast_proto::chunk::ChunkRequest;
use modelcast_proto::topic::DeviceTopic;
use rumqttc::{Event, EventLoop, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::{Fleet, Role};

/// Messages waiting for the handler (reports, online status, telemetry).
const HANDLER_QUEUE: usize = 1024;
/// How long a drain may take before what is left is dropped.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What the drain at shutdown finished.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drained {
    /// Tasks still running when the shutdown signal came (the handler, chunk replies, the
    /// shared publisher and the clocks).
    pub tasks: usize,
    /// Messages queued for the handler then, all handled unless `complete` is false.
    pub queued: usize,
    /// Whether everything finished and the DISCONNECT was written within [`DRAIN_TIMEOUT`].
    pub complete: bool,
    /// How long it took.
    pub elapsed: Duration,
}

/// Runs every task of `fleet` until `stop` turns true, then drains them.
pub(super) async fn supervise(
    fleet: Arc<Fleet>,
    eventloop: EventLoop,
    mut stop: watch::Receiver<bool>,
) -> Drained {
    let mut tasks = JoinSet::new();
    let (tx, mut rx) = mpsc::channel::<(String, bytes::Bytes)>(HANDLER_QUEUE);
    {
        let fleet = fleet.clone();
        tasks.spawn(async move {
            while let Some((topic, payload)) = rx.recv().await {
                fleet.handle(&topic, &payload).await;
            }
        });
    }
    if fleet.fanout.is_some() {
        let (fleet, stop) = (fleet.clone(), stop.clone());
        tasks.spawn(async move { fleet.publish_shared(stop).await });
    }
    if fleet.role == Role::Control {
        if let Err(e) = fleet.replay_drift().await {
            warn!(error = %e, "rebuilding the drift detectors failed; they start empty");
        }
        let (refresher, mut stop_refresh) = (fleet.clone(), stop.clone());
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            for minute in 0u64.. {
                tokio::select! {
                    _ = stopped(&mut stop_refresh) => return,
                    _ = tick.tick() => {}
                }
                if let Err(e) = refresher.refresh_if_due().await {
                    warn!(error = %e, "refreshing timestamp failed");
                }
                if minute % 60 == 0 {
                    refresher.prune_telemetry().await;
                }
            }
        });
        let (clock, mut stop_clock) = (fleet.clone(), stop.clone());
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stopped(&mut stop_clock) => return,
                    _ = tick.tick() => {}
                }
                clock.tick_rollouts().await;
            }
        });
    }
    let permits = Arc::new(Semaphore::new(fleet.max_chunk_requests));
    let mut link = Poller::spawn(eventloop);
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            event = link.events.recv() => match event {
                Some(Ok(event)) => {
                    if !fleet.on_event(event, &tx, &permits, &mut tasks) {
                        break;
                    }
                }
                Some(Err(e)) => warn!(error = %e, "server broker link down"),
                None => break,
            },
        }
    }
    let drained = drain(&fleet, &mut link, tasks, tx).await;
    link.poller.abort();
    drained
}

/// The broker link's event loop on a task of its own, its events passed on in order. A
/// poll is never cancelled half-way (rumqttc's is not cancel-safe: a request taken from the
/// client's queue and not yet written would be lost), whatever the supervisor's `select!`
/// does meanwhile.
struct Poller {
    events: mpsc::Receiver<Result<Event, rumqttc::ConnectionError>>,
    poller: tokio::task::JoinHandle<()>,
}

impl Poller {
    fn spawn(mut eventloop: EventLoop) -> Poller {
        let (tx, events) = mpsc::channel(64);
        let poller = tokio::spawn(async move {
            loop {
                let event = eventloop.poll().await;
                let failed = event.is_err();
                if tx.send(event).await.is_err() {
                    return;
                }
                if failed {
                    // rumqttc reconnects at the next poll.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        });
        Poller { events, poller }
    }
}

/// Completes once `stop` is true (or its sender is gone).
pub(super) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Lets every task finish while the link is polled (their publications go out through it),
/// then writes a DISCONNECT; bounded by [`DRAIN_TIMEOUT`].
async fn drain(
    fleet: &Fleet,
    link: &mut Poller,
    mut tasks: JoinSet<()>,
    tx: mpsc::Sender<(String, bytes::Bytes)>,
) -> Drained {
    let started = Instant::now();
    let mut drained = Drained {
        tasks: tasks.len(),
        queued: HANDLER_QUEUE - tx.capacity(),
        ..Drained::default()
    };
    // The handler ends once it has handled what is queued.
    drop(tx);
    let deadline = tokio::time::sleep(DRAIN_TIMEOUT);
    tokio::pin!(deadline);
    let (mut disconnecting, mut disconnected) = (false, false);
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            joined = tasks.join_next(), if !tasks.is_empty() => {
                if let Some(Err(e)) = joined {
                    warn!(error = %e, "a fleet task failed while draining");
                }
            }
            event = link.events.recv() => match event {
                // Read on until the broker closes the connection: a socket closed with
                // acknowledgements unread is reset, and the broker may lose what it had not
                // read yet.
                Some(Ok(Event::Outgoing(Outgoing::Disconnect))) => disconnected = true,
                Some(Ok(_)) => {}
                Some(Err(_)) if disconnected => {
                    drained.complete = true;
                    break;
                }
                Some(Err(e)) => {
                    warn!(error = %e, "the broker link is down while draining");
                    break;
                }
                None => break,
            },
        }
        // Once every task is done: the DISCONNECT goes after all they published.
        if tasks.is_empty() && !disconnecting {
            disconnecting = true;
            if let Err(e) = fleet.client.try_disconnect() {
                warn!(error = %e, "closing the broker link");
                break;
            }
        }
    }
    tasks.shutdown().await;
    drained.elapsed = started.elapsed();
    drained
}

impl Fleet {
    /// Handles one event of the broker link; false if the handler is gone.
    fn on_event(
        self: &Arc<Self>,
        event: Event,
        tx: &mpsc::Sender<(String, bytes::Bytes)>,
        permits: &Arc<Semaphore>,
        tasks: &mut JoinSet<()>,
    ) -> bool {
        match event {
            Event::Incoming(Packet::ConnAck(_)) => {
                info!("server connected to broker");
                self.subscribe();
                true
            }
            Event::Incoming(Packet::Publish(p)) => {
                if !self.admit(&p.topic, p.payload.len()) {
                    return true;
                }
                // Chunk requests never wait behind reports.
                if let Some(req) = self.chunk_request(&p.topic, &p.payload) {
                    match permits.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let fleet = self.clone();
                            tasks.spawn(async move { fleet.serve(req, permit).await });
                        }
                        Err(_) => {
                            // The device asks again when its chunks do not come.
                            self.chunk_requests_busy.fetch_add(1, Relaxed);
                            debug!(device = %req.device, "chunk request over the limit dropped");
                        }
                    }
                    return true;
                }
                if self
                    .topics
                    .parse_device(&p.topic)
                    .is_some_and(|(_, k)| k == DeviceTopic::Requests)
                {
                    return true;
                }
                // Never waits for the handler: it may itself be waiting for the broker link,
                // which waits for this loop. What a full queue cannot take is dropped and
                // counted for its device (telemetry is sent again unacknowledged; a device
                // reports its state again).
                match tx.try_send((p.topic, p.payload)) {
                    Ok(()) => true,
                    Err(mpsc::error::TrySendError::Full((topic, _))) => {
                        if let Some((device, _)) = self.topics.parse_device(&topic) {
                            self.drops.add(&device, "server_busy", 1);
                        }
                        true
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                }
            }
            _ => true,
        }
    }

    /// Subscribes to what its role reads (again at every connection: the session is clean).
    fn subscribe(&self) {
        let (t, c) = (&self.topics, &self.client);
        if self.role == Role::Control {
            for kind in [
                DeviceTopic::State,
                DeviceTopic::Online,
                DeviceTopic::Telemetry,
            ] {
                let _ = c.try_subscribe(t.all_devices(kind), QoS::AtLeastOnce);
            }
        }
        let _ = c.try_subscribe(
            t.chunk_requests_shared("modelcast-server"),
            QoS::AtLeastOnce,
        );
    }

    /// Answers one chunk request, holding one of the `max_chunk_requests` permits.
    async fn serve(&self, req: ChunkRequest, permit: OwnedSemaphorePermit) {
        self.chunk_requests_in_flight.fetch_add(1, Relaxed);
        self.serve_chunks(req).await;
        self.chunk_requests_in_flight.fetch_sub(1, Relaxed);
        drop(permit);
    }

    /// Whether a message of `bytes` on `topic` is read at all: not from a quarantined device,
    /// and within its topic kind's bound ([`DeviceTopic::device_limit`]; the brokers bound
    /// packets by the largest kind only). What is not read is counted for its device.
    pub(super) fn admit(&self, topic: &str, bytes: usize) -> bool {
        let Some((device, kind)) = self.topics.parse_device(topic) else {
            return true;
        };
        if self.is_quarantined(&device) {
            self.drops.add(&device, "quarantined", 1);
            return false;
        }
        if kind.device_limit().is_some_and(|limit| bytes > limit) {
            self.drops.add(&device, "oversized", 1);
            debug!(%device, ?kind, bytes, "message over its topic's bound dropped");
            return false;
        }
        true
    }

    /// The chunk request `topic` carries, if it is a device's requests topic and the request
    /// decodes and names that device (what does not is dropped, logged).
    fn chunk_request(&self, topic: &str, payload: &[u8]) -> Option<ChunkRequest> {
        let Some((device, DeviceTopic::Requests)) = self.topics.parse_device(topic) else {
            return None;
        };
        match ChunkRequest::from_slice(payload) {
            // The topic is the sender (the broker's ACL binds it); the request must agree.
            Ok(req) if req.device == device => return Some(req),
            Ok(req) => {
                warn!(%device, named = %req.device, "chunk request naming another device dropped")
            }
            Err(e) => warn!(%device, error = %e, "bad chunk request dropped"),
        }
        None
    }

    pub(super) async fn handle(self: &Arc<Self>, topic: &str, payload: &[u8]) {
        let Some((device, kind)) = self.topics.parse_device(topic) else {
            return;
        };
        if kind == DeviceTopic::State && !payload.is_empty() {
            let admitted = self.report_budgets.lock().expect("budgets lock").admit(
                &device,
                payload.len() as u64,
                std::time::Instant::now(),
            );
            if !admitted {
                use std::sync::atomic::Ordering::Relaxed;
                self.reports_over_budget.fetch_add(1, Relaxed);
                self.drops.add(&device, "state_over_budget", 1);
                debug!(%device, bytes = payload.len(), "state report over the device's budget dropped");
                return;
            }
        }
        let result = match kind {
            DeviceTopic::State => self.handle_report(&device, payload).await,
            DeviceTopic::Online => self.handle_online(&device, payload).await,
            DeviceTopic::Telemetry => self.handle_telemetry(&device, payload).await,
            _ => Ok(()),
        };
        if let Err(e) = result {
            warn!(%device, error = %e, "device message rejected");
        }
    }
}
