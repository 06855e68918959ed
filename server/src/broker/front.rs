//! The embedded broker's front door, when it speaks TLS: it accepts devices' connections,
//! does the TLS handshake, checks each client against its certificate and the fleet's
//! [`Policy`], and relays what is allowed to rumqttd, which listens on loopback only and
//! admits no one without the front's secret.
//!
//! Why not rumqttd's own TLS listener: it does each TLS handshake inside its accept loop
//! with no time limit, so one TCP connection that never sends a byte stopped every later
//! device from connecting, for as long as it stayed open. It caps neither connections nor
//! the time before CONNECT, and it has no topic rules, so any certificate could fill it
//! with retained messages on any topic. Here:
//!
//! - at most `max_connections` connections at once (more are closed as accepted), each
//!   handshake and CONNECT in its own task within `connect_timeout`;
//! - the client id must be the certificate's common name (refused with CONNACK "identifier
//!   rejected" otherwise);
//! - a device's packets are checked against [`Policy`] (its own topics, one bound per topic
//!   kind, retained only where the protocol uses it): its first refused packet closes its
//!   connection and is counted for it ([`Drops`]). An agent never sends one.
//!
//! What the broker sends to a client is copied through unread. The fleet server itself
//! connects to rumqttd directly on loopback, with the secret.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode, Login, Packet};
use rumqttc::tokio_rustls::TlsAcceptor;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::policy::{Client, Policy, Refusal};
use crate::budget::Drops;
use crate::quarantine::Quarantines;

/// Largest CONNECT packet read before the client is known (an agent's is under 200 bytes:
/// its id and a last will of `offline`). Connections not yet admitted hold at most this
/// much each, however many one certificate opens.
const MAX_CONNECT: usize = 4 * 1024;

/// What the front needs.
pub struct FrontConfig {
    /// TLS for devices: the broker's certificate, client certificates from the fleet CA not
    /// on its revocation list.
    pub tls: Arc<super::FrontTls>,
    /// Where rumqttd listens (loopback).
    pub internal: SocketAddr,
    /// The password the front presents for every client it relays.
    pub secret: Arc<str>,
    /// Who may do what.
    pub policy: Policy,
    /// Connections at once.
    pub max_connections: usize,
    /// From accept to a checked CONNECT.
    pub connect_timeout: Duration,
    /// Devices refused at connect, and cut off at their next packet once quarantined.
    pub quarantines: Arc<Quarantines>,
}

/// What the front did since the server started (`/metrics`).
#[derive(Debug, Default)]
pub struct FrontStats {
    /// Connections open now.
    pub open: AtomicU64,
    /// Connections relayed to the broker.
    pub admitted: AtomicU64,
    /// Connections closed as accepted: `max_connections` were open.
    pub over_capacity: AtomicU64,
    /// Connections closed because the handshake and CONNECT took longer than allowed.
    pub timed_out: AtomicU64,
    /// Connections whose TLS handshake or CONNECT failed (no client certificate of the
    /// fleet's CA, not MQTT 3.1.1, …).
    pub failed: AtomicU64,
    /// Connections closed for a packet the policy refused (client id, topic, size,
    /// retained, subscription); per device in [`Drops`].
    pub refused: AtomicU64,
}

/// Accepts on `listener` until `stop` turns true, then closes every connection.
pub async fn run(
    listener: TcpListener,
    cfg: FrontConfig,
    stats: Arc<FrontStats>,
    drops: Arc<Drops>,
    mut stop: watch::Receiver<bool>,
) {
    let cfg = Arc::new(cfg);
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let mut connections = JoinSet::new();
    info!(addr = ?listener.local_addr().ok(), max_connections = cfg.max_connections, "MQTT front listening");
    loop {
        tokio::select! {
            changed = stop.changed() => if changed.is_err() || *stop.borrow() { break },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors, most likely: wait instead of spinning.
                        warn!(error = %e, "MQTT front: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    stats.over_capacity.fetch_add(1, Ordering::Relaxed);
                    debug!(%peer, "MQTT front full: connection closed");
                    continue;
                };
                let (cfg, stats, drops) = (cfg.clone(), stats.clone(), drops.clone());
                connections.spawn(async move {
                    stats.open.fetch_add(1, Ordering::Relaxed);
                    serve(stream, peer, &cfg, &stats, &drops).await;
                    stats.open.fetch_sub(1, Ordering::Relaxed);
                    drop(permit);
                });
            }
        }
    }
    connections.shutdown().await;
}

/// Why a connection ended before it was relayed.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error("timed out before CONNECT")]
    TimedOut,
    #[error("{0}")]
    Failed(String),
    #[error("refused: {0}")]
    Refused(Refusal),
}

async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    cfg: &FrontConfig,
    stats: &FrontStats,
    drops: &Drops,
) {
    let _ = stream.set_nodelay(true);
    let admitted = tokio::time::timeout(cfg.connect_timeout, admit(stream, cfg)).await;
    let Admitted {
        tls,
        identity,
        client,
        connect,
        buf,
    } = match admitted {
        Err(_) => {
            stats.timed_out.fetch_add(1, Ordering::Relaxed);
            debug!(%peer, "MQTT front: {}", Ended::TimedOut);
            return;
        }
        Ok(Err((Ended::Refused(refusal), identity))) => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            drops.add(&identity, refusal.kind(), 1);
            warn!(%peer, %identity, %refusal, "MQTT front: connection refused");
            return;
        }
        Ok(Err((e, _))) => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            debug!(%peer, error = %e, "MQTT front: connection failed");
            return;
        }
        Ok(Ok(admitted)) => admitted,
    };
    let upstream = match TcpStream::connect(cfg.internal).await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "MQTT front: the broker is unreachable");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    stats.admitted.fetch_add(1, Ordering::Relaxed);
    let (up_rd, mut up_wr) = upstream.into_split();
    let (mut rd, mut wr) = tokio::io::split(tls);
    let mut first = BytesMut::new();
    if Packet::Connect(connect)
        // Its login (the identity and the secret) added.
        .write(&mut first, MAX_CONNECT + 1024)
        .is_err()
        || up_wr.write_all(&first).await.is_err()
    {
        return;
    }
    // Chunks of up to 4 MiB come this way: copy in large pieces (TLS records of 16 KiB).
    let mut up_rd = tokio::io::BufReader::with_capacity(256 * 1024, up_rd);
    let down = tokio::io::copy_buf(&mut up_rd, &mut wr);
    let up = relay(&mut rd, &mut up_wr, buf, &client, cfg);
    tokio::select! {
        _ = down => {}
        ended = up => {
            if let Err(Ended::Refused(refusal)) = ended {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                drops.add(&identity, refusal.kind(), 1);
                warn!(%peer, %identity, %refusal, "MQTT front: connection closed");
            }
        }
    }
}

/// A connection whose handshake and CONNECT passed.
struct Admitted {
    tls: rumqttc::tokio_rustls::server::TlsStream<TcpStream>,
    /// Its certificate's common name.
    identity: String,
    client: Client,
    /// The CONNECT to relay, with the front's login.
    connect: rumqttc::mqttbytes::v4::Connect,
    /// Bytes read past the CONNECT.
    buf: BytesMut,
}

/// The handshake and CONNECT: who this is, and the CONNECT to relay (with the front's
/// login in place of the client's).
async fn admit(stream: TcpStream, cfg: &FrontConfig) -> Result<Admitted, (Ended, String)> {
    let failed = |e: String| (Ended::Failed(e), String::new());
    let trust = cfg.tls.trust();
    let mut tls = TlsAcceptor::from(trust.config.clone())
        .accept(stream)
        .await
        .map_err(|e| failed(format!("TLS: {e}")))?;
    // A certificate of the claim CA is a claim, named by its common name; any other the
    // verifier passed is the fleet CA's, an identity.
    let (identity, claim) = {
        let (_, conn) = tls.get_ref();
        let cert = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| failed("no client certificate".into()))?;
        let claim = trust
            .claim_ca
            .as_deref()
            .and_then(|ca| crate::pki::claim_name(ca, cert));
        let cn =
            common_name(cert).ok_or_else(|| failed("the certificate has no common name".into()))?;
        (cn, claim)
    };
    let mut buf = BytesMut::with_capacity(1024);
    let packet = read_packet(&mut tls, &mut buf, MAX_CONNECT)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let Some(Packet::Connect(mut connect)) = packet.map(|(p, _)| p) else {
        return Err(failed("the first packet is not CONNECT".into()));
    };
    let checked = match &claim {
        Some(claim) => cfg.policy.connect_claim(claim, &connect),
        None => cfg.policy.connect(&identity, &connect),
    }
    .and_then(|c| match c {
        Client::Device(id) if cfg.quarantines.contains(&id) => Err(Refusal::Quarantined),
        c => Ok(c),
    });
    let client = match checked {
        Ok(c) => c,
        Err(refusal) => {
            let code = match refusal {
                Refusal::ClientId { .. } => ConnectReturnCode::BadClientId,
                _ => ConnectReturnCode::NotAuthorized,
            };
            let mut ack = BytesMut::new();
            let _ = Packet::ConnAck(ConnAck::new(code, false)).write(&mut ack, 16);
            let _ = tls.write_all(&ack).await;
            let _ = tls.shutdown().await;
            return Err((Ended::Refused(refusal), identity));
        }
    };
    // What the front counts and the broker behind it knows the client as: a claim by its
    // client id (many devices share one claim), anyone else by the certificate's name.
    let identity = match &client {
        Client::Claim { client, .. } => client.clone(),
        _ => identity,
    };
    connect.login = Some(Login::new(identity.clone(), &*cfg.secret));
    Ok(Admitted {
        tls,
        identity,
        client,
        connect,
        buf,
    })
}

/// Client → broker: a server's bytes are copied; a device's packets are read one by one,
/// checked, and passed on as they came.
async fn relay<R, W>(
    rd: &mut R,
    up: &mut W,
    mut buf: BytesMut,
    client: &Client,
    cfg: &FrontConfig,
) -> Result<(), Ended>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if let Client::Server(_) = client {
        up.write_all(&buf)
            .await
            .map_err(|e| Ended::Failed(e.to_string()))?;
        tokio::io::copy(rd, up)
            .await
            .map_err(|e| Ended::Failed(e.to_string()))?;
        return Ok(());
    }
    // Quarantined while connected: cut off at its next packet, a PUBLISH from its header.
    let quarantined = || match client {
        Client::Device(id) if cfg.quarantines.contains(id) => Err(Refusal::Quarantined),
        _ => Ok(()),
    };
    loop {
        let early = |h: &PublishHeader| {
            quarantined()?;
            cfg.policy
                .check_publish(client, &h.topic, h.retain, h.payload)
        };
        let read = read_checked(rd, &mut buf, cfg.policy.max_device_packet(), early).await;
        let Some((packet, frame)) = read.map_err(|e| match e {
            ReadError::Refused(refusal) => Ended::Refused(refusal),
            ReadError::Mqtt(rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(bytes)) => {
                Ended::Refused(Refusal::Packet {
                    bytes,
                    limit: cfg.policy.max_device_packet(),
                })
            }
            e => Ended::Failed(e.to_string()),
        })?
        else {
            return Ok(());
        };
        quarantined().map_err(Ended::Refused)?;
        match &packet {
            // A PUBLISH was judged by its header already (`early`).
            Packet::Subscribe(s) => cfg.policy.subscribe(client, s).map_err(Ended::Refused)?,
            Packet::Connect(_) => return Err(Ended::Failed("a second CONNECT".into())),
            _ => {}
        }
        up.write_all(&frame)
            .await
            .map_err(|e| Ended::Failed(e.to_string()))?;
    }
}

/// Why a packet could not be read.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("read: {0}")]
    Io(#[from] std::io::Error),
    #[error("MQTT: {0:?}")]
    Mqtt(rumqttc::mqttbytes::Error),
    #[error("refused: {0}")]
    Refused(Refusal),
}

/// What the first bytes of a PUBLISH say: enough to judge it before its payload arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PublishHeader {
    /// Its topic.
    pub topic: String,
    /// Its retain flag.
    pub retain: bool,
    /// Its payload's size.
    pub payload: usize,
}

impl PublishHeader {
    /// The header of the PUBLISH at the start of `buf`, once its topic is there; `None`
    /// for another packet, or too few bytes yet (a malformed one is left to the decoder).
    fn peek(buf: &[u8]) -> Option<PublishHeader> {
        let first = *buf.first()?;
        if first >> 4 != 3 {
            return None;
        }
        let (mut remaining, mut at, mut shift) = (0usize, 1usize, 0u32);
        loop {
            let b = *buf.get(at)?;
            remaining |= usize::from(b & 0x7f) << shift;
            at += 1;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 21 {
                return None;
            }
        }
        let len = usize::from(u16::from_be_bytes([*buf.get(at)?, *buf.get(at + 1)?]));
        let topic = buf.get(at + 2..at + 2 + len)?;
        let qos = (first >> 1) & 3;
        let id = if qos > 0 { 2 } else { 0 };
        Some(PublishHeader {
            topic: String::from_utf8_lossy(topic).into_owned(),
            retain: first & 1 == 1,
            payload: remaining.saturating_sub(2 + len + id),
        })
    }
}

/// The next packet, decoded, with its bytes as they came; `None` at a clean end of stream.
async fn read_packet<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<(Packet, bytes::Bytes)>, ReadError> {
    read_checked(rd, buf, max, |_| Ok(())).await
}

/// [`read_packet`], with `early` asked about a PUBLISH as soon as its topic has arrived
/// (before its payload is read): a refused one costs the front no more than its header.
async fn read_checked<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    max: usize,
    early: impl Fn(&PublishHeader) -> Result<(), Refusal>,
) -> Result<Option<(Packet, bytes::Bytes)>, ReadError> {
    loop {
        if let Some(header) = PublishHeader::peek(buf) {
            early(&header).map_err(ReadError::Refused)?;
        }
        match rumqttc::mqttbytes::check(buf.iter(), max) {
            Ok(header) => {
                let frame = buf.split_to(header.frame_length()).freeze();
                let mut copy = BytesMut::from(&frame[..]);
                let packet = Packet::read(&mut copy, max).map_err(ReadError::Mqtt)?;
                return Ok(Some((packet, frame)));
            }
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(n)) => {
                buf.reserve(n.min(1 << 20));
                if rd.read_buf(buf).await? == 0 {
                    return if buf.is_empty() {
                        Ok(None)
                    } else {
                        Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into()))
                    };
                }
            }
            Err(e) => return Err(ReadError::Mqtt(e)),
        }
    }
}

/// The certificate's common name (its first, as mosquitto's `use_identity_as_username`).
fn common_name(cert: &rustls::pki_types::CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn read_all(bytes: &[u8], max: usize) -> Result<Vec<Packet>, ReadError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut rd = bytes;
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            while let Some((p, _)) = read_packet(&mut rd, &mut buf, max).await? {
                out.push(p);
            }
            Ok(out)
        })
    }

    #[test]
    fn packets_are_read_whole_and_bounded() {
        let mut bytes = BytesMut::new();
        let mut publish = rumqttc::mqttbytes::v4::Publish::new(
            "mc/d/edge-1/state",
            rumqttc::mqttbytes::QoS::AtLeastOnce,
            vec![7u8; 3000],
        );
        publish.pkid = 1;
        Packet::Publish(publish.clone())
            .write(&mut bytes, 1 << 20)
            .unwrap();
        Packet::PingReq.write(&mut bytes, 16).unwrap();
        let packets = read_all(&bytes, 1 << 20).unwrap();
        assert_eq!(packets, vec![Packet::Publish(publish), Packet::PingReq]);
        // Over the bound: refused from the header, before the payload is read.
        assert!(matches!(
            read_all(&bytes, 1000),
            Err(ReadError::Mqtt(
                rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(_)
            ))
        ));
        // Cut short.
        assert!(read_all(&bytes[..100], 1 << 20).is_err());
    }

    #[test]
    fn the_common_name_is_read_from_a_fleet_certificate() {
        let dir = tempfile::tempdir().unwrap();
        crate::pki::init(dir.path(), &["localhost".into()]).unwrap();
        let id = crate::pki::issue(dir.path(), "edge-7").unwrap();
        let pem = std::fs::read(&id.cert).unwrap();
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
        assert_eq!(common_name(&der).as_deref(), Some("edge-7"));
    }

    #[test]
    fn a_publish_is_judged_from_its_first_bytes() {
        let mut publish = rumqttc::mqttbytes::v4::Publish::new(
            "junk/1",
            rumqttc::mqttbytes::QoS::AtLeastOnce,
            vec![0u8; 300_000],
        );
        publish.pkid = 9;
        publish.retain = true;
        let mut bytes = BytesMut::new();
        Packet::Publish(publish).write(&mut bytes, 1 << 20).unwrap();
        let header = PublishHeader {
            topic: "junk/1".into(),
            retain: true,
            payload: 300_000,
        };
        // The fixed header (4 bytes for this size), the topic's length and the topic: enough.
        assert_eq!(
            PublishHeader::peek(&bytes[..4 + 2 + 6]),
            Some(header.clone())
        );
        assert_eq!(PublishHeader::peek(&bytes[..4 + 2 + 5]), None);
        assert_eq!(PublishHeader::peek(&bytes), Some(header));
        let mut ping = BytesMut::new();
        Packet::PingReq.write(&mut ping, 16).unwrap();
        assert_eq!(PublishHeader::peek(&ping), None);
    }

    proptest! {
        #[test]
        fn peeking_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = PublishHeader::peek(&bytes);
        }

        #[test]
        fn the_reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = read_all(&bytes, 4096);
        }
    }
}
