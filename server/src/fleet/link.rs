//! The fleet's tasks and its MQTT event loop: one supervisor ([`supervise`]) polls the broker
//! link, decides what is read at all ([`Fleet::admit`]), queues chunk requests for its
//! `max_chunk_requests` answerers ([`crate::chunk_queue`]) and hands everything else to the
//! handler in order;
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
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::{Fleet, Role};
use crate::chunk_queue::Pushed;

/// Messages waiting for the handler (reports, online status, telemetry), at most.
const HANDLER_QUEUE: usize = 65_536;
/// Their payloads, bytes at most (a state report is a few KB; 10,000 devices reporting at
/// once queue tens of MB).
const HANDLER_QUEUE_BYTES: usize = 64 << 20;
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
    let (tx, mut rx) = Queue::new();
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
    for _ in 0..fleet.max_chunk_requests {
        let (fleet, stop) = (fleet.clone(), stop.clone());
        tasks.spawn(async move { fleet.answer_chunk_requests(stop).await });
    }
    let mut link = Poller::spawn(eventloop);
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            event = link.events.recv() => match event {
                Some(Ok(event)) => {
                    if !fleet.on_event(event, &tx) {
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

/// The handler's queue: bounded by count and bytes, and never waited on. The link must not
/// wait for the handler, which may itself be waiting for the link (its publications go out
/// through the MQTT client's queue, which only the link's poll empties).
struct Queue {
    tx: mpsc::UnboundedSender<(String, bytes::Bytes, usize)>,
    /// Messages and bytes it holds at most.
    bounds: (usize, usize),
    /// Messages and bytes queued now.
    held: Arc<Held>,
}

/// Messages and bytes in a [`Queue`].
type Held = (
    std::sync::atomic::AtomicUsize,
    std::sync::atomic::AtomicUsize,
);

/// The handler's end of a [`Queue`].
struct Dequeue {
    rx: mpsc::UnboundedReceiver<(String, bytes::Bytes, usize)>,
    held: Arc<Held>,
}

impl Queue {
    fn new() -> (Queue, Dequeue) {
        Queue::with_bounds(HANDLER_QUEUE, HANDLER_QUEUE_BYTES)
    }

    fn with_bounds(messages: usize, bytes: usize) -> (Queue, Dequeue) {
        let (tx, rx) = mpsc::unbounded_channel();
        let held: Arc<Held> = Arc::default();
        (
            Queue {
                tx,
                bounds: (messages, bytes),
                held: held.clone(),
            },
            Dequeue { rx, held },
        )
    }

    /// Queues a message unless the queue is full (`Err(true)`) or its handler gone
    /// (`Err(false)`).
    fn push(&self, topic: String, payload: bytes::Bytes) -> Result<(), bool> {
        let bytes = payload.len();
        let (count, size) = (&self.held.0, &self.held.1);
        if count.load(Relaxed) >= self.bounds.0
            || size.load(Relaxed).saturating_add(bytes) > self.bounds.1
        {
            return Err(true);
        }
        // Counted before it can be taken off (the handler subtracts it).
        count.fetch_add(1, Relaxed);
        size.fetch_add(bytes, Relaxed);
        if self.tx.send((topic, payload, bytes)).is_err() {
            count.fetch_sub(1, Relaxed);
            size.fetch_sub(bytes, Relaxed);
            return Err(false);
        }
        Ok(())
    }

    /// Messages queued now.
    fn len(&self) -> usize {
        self.held.0.load(Relaxed)
    }
}

impl Dequeue {
    async fn recv(&mut self) -> Option<(String, bytes::Bytes)> {
        let (topic, payload, bytes) = self.rx.recv().await?;
        self.held.0.fetch_sub(1, Relaxed);
        self.held.1.fetch_sub(bytes, Relaxed);
        Some((topic, payload))
    }
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
async fn drain(fleet: &Fleet, link: &mut Poller, mut tasks: JoinSet<()>, tx: Queue) -> Drained {
    let started = Instant::now();
    let mut drained = Drained {
        tasks: tasks.len(),
        queued: tx.len(),
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
    fn on_event(self: &Arc<Self>, event: Event, tx: &Queue) -> bool {
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
                    let device = req.device.clone();
                    let pushed = self.chunk_queue.lock().expect("chunk queue lock").push(req);
                    match pushed {
                        Pushed::Queued => self.chunk_queued.notify_one(),
                        Pushed::Merged => {
                            self.chunk_requests_merged.fetch_add(1, Relaxed);
                        }
                        Pushed::Full => {
                            // The device asks again when its chunks do not come.
                            self.chunk_requests_busy.fetch_add(1, Relaxed);
                            debug!(%device, "chunk request dropped: the queue is full");
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
                // Never waits for the handler (see [`Queue`]). What a full queue cannot take
                // is dropped and counted for its device: telemetry is sent again until
                // acknowledged; a state report is not until the device's state changes.
                let device = self.topics.parse_device(&p.topic).map(|(d, _)| d);
                match tx.push(p.topic, p.payload) {
                    Ok(()) => true,
                    Err(true) => {
                        if let Some(device) = device {
                            self.drops.add(&device, "server_busy", 1);
                        }
                        debug!("the handler's queue is full: a device message dropped");
                        true
                    }
                    Err(false) => false,
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
            if self.enroller.is_some() {
                let _ = c.try_subscribe(t.all_claim_requests(), QoS::AtLeastOnce);
                let _ = c.try_subscribe(t.all_devices(DeviceTopic::Enrol), QoS::AtLeastOnce);
            }
        }
        let _ = c.try_subscribe(
            t.chunk_requests_shared("modelcast-server"),
            QoS::AtLeastOnce,
        );
    }

    /// One of the `max_chunk_requests` answerers: takes the request that has waited longest
    /// ([`crate::chunk_queue`]) and answers it, until `stop` (the request being answered then
    /// is finished; those still waiting are dropped, and their devices ask again).
    async fn answer_chunk_requests(&self, mut stop: watch::Receiver<bool>) {
        loop {
            let next = self.chunk_queue.lock().expect("chunk queue lock").pop();
            match next {
                Some(req) => {
                    self.chunk_requests_in_flight.fetch_add(1, Relaxed);
                    self.serve_chunks(req).await;
                    self.chunk_requests_in_flight.fetch_sub(1, Relaxed);
                }
                None => tokio::select! {
                    _ = stopped(&mut stop) => return,
                    _ = self.chunk_queued.notified() => {}
                },
            }
            if *stop.borrow() {
                return;
            }
        }
    }

    /// Whether a message of `bytes` on `topic` is read at all: not from a quarantined device,
    /// and within its topic kind's bound ([`DeviceTopic::device_limit`]; the brokers bound
    /// packets by the largest kind only). What is not read is counted for its device.
    pub(super) fn admit(&self, topic: &str, bytes: usize) -> bool {
        let Some((device, kind)) = self.topics.parse_device(topic) else {
            if let Some((_, client)) = self.topics.parse_claim_request(topic) {
                if bytes > modelcast_proto::enrol::MAX_ENROL_BYTES {
                    self.drops.add(&client, "oversized", 1);
                    return false;
                }
            }
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
            if let Some((claim, client)) = self.topics.parse_claim_request(topic) {
                // Claims share one budget per client id, as devices do per id.
                let admitted = self.report_budgets.lock().expect("budgets lock").admit(
                    &client,
                    payload.len() as u64,
                    std::time::Instant::now(),
                );
                if !admitted {
                    self.drops.add(&client, "enrol_over_budget", 1);
                    return;
                }
                if let Err(e) = self.handle_claim(&claim, &client, payload).await {
                    warn!(%claim, %client, error = %e, "enrolment request rejected");
                }
            }
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
            DeviceTopic::Enrol => self.handle_renewal(&device, payload).await,
            _ => Ok(()),
        };
        if let Err(e) = result {
            warn!(%device, error = %e, "device message rejected");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_handlers_queue_is_bounded_by_messages_and_bytes_and_never_waits() {
        let (q, mut d) = Queue::with_bounds(3, 10);
        let msg = |n: usize| bytes::Bytes::from(vec![0u8; n]);
        assert_eq!(q.push("a".into(), msg(4)), Ok(()));
        assert_eq!(q.push("b".into(), msg(4)), Ok(()));
        // 12 bytes would be over 10.
        assert_eq!(q.push("c".into(), msg(4)), Err(true));
        assert_eq!(q.push("c".into(), msg(2)), Ok(()));
        // 3 messages held.
        assert_eq!(q.push("d".into(), msg(0)), Err(true));
        assert_eq!(q.len(), 3);
        assert_eq!(d.recv().await.map(|(t, _)| t).as_deref(), Some("a"));
        assert_eq!(q.push("d".into(), msg(0)), Ok(()));
        let (q, d) = Queue::with_bounds(3, 10);
        drop(d);
        assert_eq!(q.push("e".into(), msg(0)), Err(false));
        assert_eq!(q.len(), 0);
    }
}
