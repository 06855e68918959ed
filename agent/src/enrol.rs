//! Enrolment by claim and certificate renewal, device side.
//!
//! [`Asking`] decides, with no I/O and the time passed in, when to ask the fleet server for a
//! certificate and what an answer means: ask at once; ask again when no answer came within
//! [`ANSWER_WAIT`]; held for an operator, ask again after [`HELD_WAIT`] (an operator's
//! acceptance also arrives by itself on the connection kept open); refused, after
//! [`REFUSED_WAIT`] (an operator may have removed the record since).
//!
//! [`by_claim`] is its shell on a claim connection: the batch's claim credential from
//! `[enrol]`, client id `enrol.<device>`, the request on the claim's topic, until a
//! certificate for the device's own key ([`crate::identity`]) comes back. Renewal uses the same
//! machine over the device's own connection ([`crate::driver`]).

use std::time::{Duration, Instant};

use modelcast_proto::enrol::{claim_client_id, EnrolReply, EnrolRequest, Refused};
use modelcast_proto::topic::Topics;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tracing::{info, warn};

use crate::config::{Config, EnrolConfig};
use crate::identity::{Identity, IdentityError};

/// How long an answer may take before the request is sent again.
pub const ANSWER_WAIT: Duration = Duration::from_secs(15);
/// How long a device held for an operator waits before asking again.
pub const HELD_WAIT: Duration = Duration::from_secs(60);
/// How long a refused device waits before asking again.
pub const REFUSED_WAIT: Duration = Duration::from_secs(300);

/// What an answer meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A certificate: check it and keep it.
    Issued {
        /// PEM.
        certificate: String,
        /// Unix seconds.
        not_before: i64,
        /// Unix seconds.
        not_after: i64,
    },
    /// Held for an operator.
    Held,
    /// Refused, this is why.
    Refused(Refused, String),
    /// Not an answer to this device: ignored.
    Ignored,
}

/// When to ask, and what answers mean.
#[derive(Debug, Clone)]
pub struct Asking {
    device: String,
    next: Instant,
    /// What the last answer was, so each change is logged once.
    last: Option<std::mem::Discriminant<EnrolReply>>,
    /// Requests sent since the last answer.
    unanswered: u32,
}

impl Asking {
    /// Asks for `device` at once.
    pub fn new(device: &str, now: Instant) -> Self {
        Asking {
            device: device.to_string(),
            next: now,
            last: None,
            unanswered: 0,
        }
    }

    /// Requests sent since the last answer (the first one included).
    pub fn unanswered(&self) -> u32 {
        self.unanswered
    }

    /// Whether to ask now.
    pub fn due(&self, now: Instant) -> bool {
        now >= self.next
    }

    /// When it will next be due.
    pub fn next(&self) -> Instant {
        self.next
    }

    /// Asks again no earlier than `at`.
    pub fn defer_until(&mut self, at: Instant) {
        self.next = at;
    }

    /// The request went out at `now`: without an answer, asked again after [`ANSWER_WAIT`].
    pub fn asked(&mut self, now: Instant) {
        self.next = now + ANSWER_WAIT;
        self.unanswered = self.unanswered.saturating_add(1);
    }

    /// An answer arrived at `now` (untrusted bytes).
    pub fn answered(&mut self, bytes: &[u8], now: Instant) -> Answer {
        let reply = match EnrolReply::from_slice(bytes) {
            Ok(r) if r.device() == self.device => r,
            Ok(_) => return Answer::Ignored,
            Err(e) => {
                warn!(error = %e, "enrolment answer that does not read ignored");
                return Answer::Ignored;
            }
        };
        self.unanswered = 0;
        let changed = self.last != Some(std::mem::discriminant(&reply));
        self.last = Some(std::mem::discriminant(&reply));
        match reply {
            EnrolReply::Issued {
                certificate,
                not_before,
                not_after,
                ..
            } => Answer::Issued {
                certificate,
                not_before,
                not_after,
            },
            EnrolReply::Pending { .. } => {
                if changed {
                    info!(device = %self.device, "enrolment held for an operator's decision");
                }
                self.next = now + HELD_WAIT;
                Answer::Held
            }
            EnrolReply::Refused { kind, reason, .. } => {
                warn!(device = %self.device, ?kind, %reason, "enrolment refused");
                self.next = now + REFUSED_WAIT;
                Answer::Refused(kind, reason)
            }
        }
    }
}

/// Why enrolment could not go on.
#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    /// The identity's files.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A file of `[enrol]` or `[tls]` could not be read, or does not make a TLS setup.
    #[error("{0}")]
    Setup(String),
}

/// The request this device sends: a CSR for its key, its sealing key and labels.
pub fn request(
    cfg: &Config,
    identity: &Identity,
    sealing_key: Option<String>,
) -> Result<EnrolRequest, EnrolError> {
    Ok(EnrolRequest {
        device: cfg.device_id.clone(),
        csr: identity.csr()?,
        sealing_key,
        labels: cfg.labels.clone(),
    })
}

/// Enrols over the claim in `claim` until the fleet server sends a certificate for this
/// device's key, which is kept in `identity`; returns the TLS configuration that presents it
/// to the fleet CA's brokers (`ca_pem`). Runs until then (pinging the systemd watchdog):
/// the caller races it with its shutdown signal.
pub async fn by_claim(
    cfg: &Config,
    claim: &EnrolConfig,
    identity: &mut Identity,
    ca_pem: &[u8],
    sealing_key: Option<String>,
) -> Result<rustls::ClientConfig, EnrolError> {
    let setup = |e: &dyn std::fmt::Display| EnrolError::Setup(format!("[enrol]: {e}"));
    let read =
        |p: &std::path::Path| std::fs::read(p).map_err(|e| setup(&format!("{}: {e}", p.display())));
    let (cert, key) = (read(&claim.claim_cert)?, read(&claim.claim_key)?);
    let tls = modelcast_proto::tls::client_config(
        ca_pem,
        Some(modelcast_proto::tls::ClientIdentity {
            cert_pem: &cert,
            key_pem: &key,
        }),
    )
    .map_err(|e| setup(&e))?;
    let url = claim.claim_broker.as_deref().unwrap_or(&cfg.broker);
    let broker = modelcast_proto::BrokerUrl::parse(url).map_err(|e| setup(&e))?;
    let client_id = claim_client_id(&cfg.device_id);
    let topics = Topics::new(&cfg.topic_prefix);
    let (request_topic, reply_topic) = (
        topics.claim_request(&claim.claim, &client_id),
        topics.claim_reply(&claim.claim, &client_id),
    );
    let request = request(cfg, identity, sealing_key)?.to_vec();
    let mut opts = MqttOptions::new(&client_id, broker.host, broker.port);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        std::sync::Arc::new(tls),
    )))
    .set_keep_alive(Duration::from_secs(30))
    .set_clean_session(true);
    let (client, mut eventloop) = AsyncClient::new(opts, 8);
    info!(device = %cfg.device_id, claim = %claim.claim, broker = %url, "enrolling by claim");
    let mut asking = Asking::new(&cfg.device_id, Instant::now());
    let mut subscribed = false;
    let mut backoff = Duration::from_millis(500);
    loop {
        crate::systemd::ping();
        let now = Instant::now();
        if subscribed && asking.due(now) {
            let _ = client.try_publish(&request_topic, QoS::AtLeastOnce, false, request.clone());
            asking.asked(now);
            let n = asking.unanswered();
            if n == 2 || (n > 2 && n.is_multiple_of(20)) {
                warn!(device = %cfg.device_id, requests = n - 1, "no answer to enrolment yet: does the fleet server enrol devices (--enrol)?");
            }
        }
        // Waiting for an answer, the poll gives way when it is time to ask again. Never while
        // connecting: a poll cut short drops the TLS handshake under way, and on a slow link
        // each new one would be cut short too.
        let event = if subscribed {
            let wait = asking
                .next()
                .saturating_duration_since(now)
                .max(Duration::from_millis(50));
            match tokio::time::timeout(wait, eventloop.poll()).await {
                Err(_) => continue,
                Ok(e) => e,
            }
        } else {
            eventloop.poll().await
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(500);
                subscribed = false;
                let _ = client.try_subscribe(&reply_topic, QoS::AtLeastOnce);
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                subscribed = true;
                // Asked at once on each new connection.
                asking.defer_until(Instant::now());
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == reply_topic => {
                let now = Instant::now();
                if let Answer::Issued {
                    certificate,
                    not_before,
                    not_after,
                } = asking.answered(&p.payload, now)
                {
                    match identity.keep(
                        ca_pem,
                        &certificate,
                        not_before,
                        not_after,
                        crate::clock::unix_secs(),
                    ) {
                        Ok(tls) => {
                            info!(device = %cfg.device_id, not_after, "enrolled: device certificate received");
                            let _ = client.try_disconnect();
                            return Ok(tls);
                        }
                        Err(e) => {
                            warn!(error = %e, "certificate received refused; asking again later");
                            asking.defer_until(now + REFUSED_WAIT);
                        }
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                subscribed = false;
                warn!(error = %e, "claim connection failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// A device enrolled by claim, as its control loop sees it: its identity, the fleet CA, and
/// the renewal in progress.
pub struct Enrolled {
    identity: Identity,
    ca: Vec<u8>,
    claim: EnrolConfig,
    renewal: Option<Asking>,
}

/// What the certificate needs now.
#[derive(Debug)]
pub enum Due {
    /// Nothing.
    Nothing,
    /// Send this renewal request over the device's own connection.
    Renew(EnrolRequest),
    /// The certificate ran out and the broker link is down: enrol again over the claim
    /// ([`Enrolled::reenrol`]; the server's `--enrol-expired` decides).
    Reenrol,
}

impl Enrolled {
    /// The identity of the device `cfg` describes (`[enrol]` set): its certificate if it
    /// holds one still valid, else one enrolled for by claim first (which waits until the
    /// server answers with a certificate: race it with the shutdown signal). Returns the TLS
    /// configuration for the broker.
    pub async fn start(
        cfg: &Config,
        sealing_key: Option<String>,
    ) -> Result<(Enrolled, rustls::ClientConfig), EnrolError> {
        let claim = cfg
            .enrol
            .clone()
            .ok_or_else(|| EnrolError::Setup("no [enrol] section".into()))?;
        let ca_path = cfg
            .tls
            .as_ref()
            .map(|t| t.ca.clone())
            .ok_or_else(|| EnrolError::Setup("[enrol] needs [tls] ca".into()))?;
        let ca = std::fs::read(&ca_path)
            .map_err(|e| EnrolError::Setup(format!("{}: {e}", ca_path.display())))?;
        let mut identity = Identity::open(&cfg.state_dir, &cfg.device_id, claim.pkcs11.as_ref())?;
        let now = crate::clock::unix_secs();
        let held = identity
            .held()
            .filter(|h| h.not_after > now)
            .and_then(|_| identity.tls(&ca))
            .transpose()?;
        let tls = match held {
            Some(tls) => tls,
            None => {
                if identity.held().is_some() {
                    warn!(device = %cfg.device_id, "the device certificate has expired: enrolling again by claim");
                }
                by_claim(cfg, &claim, &mut identity, &ca, sealing_key).await?
            }
        };
        let enrolled = Enrolled {
            identity,
            ca,
            claim,
            renewal: None,
        };
        Ok((enrolled, tls))
    }

    /// The certificate held: valid until (Unix seconds).
    pub fn not_after(&self) -> Option<i64> {
        self.identity.held().map(|h| h.not_after)
    }

    /// What to do at `now` (Unix `unix`), with the broker link up or not.
    pub fn due(
        &mut self,
        cfg: &Config,
        sealing_key: Option<String>,
        now: Instant,
        unix: i64,
        link_up: bool,
    ) -> Due {
        let Some(held) = self.identity.held() else {
            return Due::Reenrol;
        };
        if unix >= held.not_after && !link_up {
            return Due::Reenrol;
        }
        if unix < crate::identity::renew_at(held) {
            self.renewal = None;
            return Due::Nothing;
        }
        let asking = self
            .renewal
            .get_or_insert_with(|| Asking::new(&cfg.device_id, now));
        if !link_up || !asking.due(now) {
            return Due::Nothing;
        }
        match request(cfg, &self.identity, sealing_key) {
            Ok(r) => {
                asking.asked(now);
                info!(device = %cfg.device_id, not_after = held.not_after, "asking to renew the device certificate");
                Due::Renew(r)
            }
            Err(e) => {
                warn!(error = %e, "renewal request not made");
                asking.defer_until(now + REFUSED_WAIT);
                Due::Nothing
            }
        }
    }

    /// The server answered a renewal (untrusted bytes): a new certificate, checked and kept,
    /// returns the TLS configuration to connect with from now on.
    pub fn answered(
        &mut self,
        bytes: &[u8],
        now: Instant,
        unix: i64,
    ) -> Option<rustls::ClientConfig> {
        let asking = self.renewal.as_mut()?;
        let Answer::Issued {
            certificate,
            not_before,
            not_after,
        } = asking.answered(bytes, now)
        else {
            return None;
        };
        match self
            .identity
            .keep(&self.ca, &certificate, not_before, not_after, unix)
        {
            Ok(tls) => {
                info!(not_after, "device certificate renewed");
                self.renewal = None;
                Some(tls)
            }
            Err(e) => {
                warn!(error = %e, "renewed certificate refused; asking again later");
                asking.defer_until(now + REFUSED_WAIT);
                None
            }
        }
    }

    /// Enrols again by claim (the certificate ran out while the device could not renew it).
    pub async fn reenrol(
        &mut self,
        cfg: &Config,
        sealing_key: Option<String>,
    ) -> Result<rustls::ClientConfig, EnrolError> {
        self.renewal = None;
        by_claim(cfg, &self.claim, &mut self.identity, &self.ca, sealing_key).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asks_again_when_unanswered_held_or_refused_and_ignores_other_devices() {
        let t0 = Instant::now();
        let mut a = Asking::new("edge-1", t0);
        assert!(a.due(t0));
        a.asked(t0);
        assert_eq!(a.unanswered(), 1);
        assert!(!a.due(t0 + ANSWER_WAIT - Duration::from_millis(1)));
        assert!(a.due(t0 + ANSWER_WAIT));
        let held = EnrolReply::Pending {
            device: "edge-1".into(),
        };
        assert_eq!(a.answered(&held.to_vec(), t0), Answer::Held);
        assert_eq!(a.next(), t0 + HELD_WAIT);
        assert_eq!(a.unanswered(), 0);
        let refused = EnrolReply::Refused {
            device: "edge-1".into(),
            kind: Refused::Rejected,
            reason: "no".into(),
        };
        assert!(matches!(
            a.answered(&refused.to_vec(), t0),
            Answer::Refused(Refused::Rejected, _)
        ));
        assert_eq!(a.next(), t0 + REFUSED_WAIT);
        let theirs = EnrolReply::Pending {
            device: "edge-2".into(),
        };
        assert_eq!(a.answered(&theirs.to_vec(), t0), Answer::Ignored);
        assert_eq!(a.answered(b"\xff not json", t0), Answer::Ignored);
        assert_eq!(
            a.next(),
            t0 + REFUSED_WAIT,
            "ignored answers change nothing"
        );
        let issued = EnrolReply::Issued {
            device: "edge-1".into(),
            certificate: "PEM".into(),
            not_before: 1,
            not_after: 2,
        };
        assert!(matches!(
            a.answered(&issued.to_vec(), t0),
            Answer::Issued { not_after: 2, .. }
        ));
    }
}
