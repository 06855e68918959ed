//! What a client of the embedded broker may do, decided packet by packet with no I/O: the
//! same rules as the mosquitto ACL that [`crate::acl`] generates, plus one payload bound per
//! topic kind ([`DeviceTopic::device_limit`]) and retained messages only where the protocol
//! uses them ([`DeviceTopic::retained`]).
//!
//! | who | may |
//! | --- | --- |
//! | a fleet server identity | anything under the prefix |
//! | a device (certificate CN `id`) | connect as client id `id` only, with a last will on its `online` topic; publish on its own `state`, `telemetry`, `online`, `requests`, `enrol` (retained only `state` and `online`), each within its kind's bound; subscribe to its own `desired`, `chunks`, `telemetry-acks`, `certificate` and to artifact topics |
//! | a claim (a certificate of the claim CA, CN `batch`) | connect as client id `enrol.<device>` only, with no last will; publish on `<p>/claim/<batch>/<client id>/request` within its bound, never retained; subscribe to the `reply` topic beside it; nothing else |
//!
//! The broker front ([`super::front`]) closes a device's connection at its first refused
//! packet and counts the refusal for that device. An agent never sends such a packet.

use modelcast_proto::topic::{DeviceTopic, Topics};
use rumqttc::mqttbytes::v4::{Connect, Subscribe};
use thiserror::Error;

/// Why a packet was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refusal {
    /// The client id is not the certificate's common name.
    #[error("client id {client_id:?} is not the certificate's name {identity:?}")]
    ClientId {
        /// What the certificate says.
        identity: String,
        /// What the client asked for.
        client_id: String,
    },
    /// A topic (or a last will's) the identity may not publish on.
    #[error("publishing on {topic:?} is not allowed")]
    Publish {
        /// The topic.
        topic: String,
    },
    /// A retained message where the protocol keeps none.
    #[error("a retained message on {topic:?} is not allowed")]
    Retained {
        /// The topic.
        topic: String,
    },
    /// A payload over its topic kind's bound.
    #[error("{bytes} bytes on a {kind:?} topic (at most {limit})")]
    TooLarge {
        /// The kind of topic.
        kind: DeviceTopic,
        /// Its size.
        bytes: usize,
        /// The bound.
        limit: usize,
    },
    /// A packet over the broker's bound (refused from its header, before its body is read).
    #[error("a packet of {bytes} bytes (at most {limit})")]
    Packet {
        /// Its size.
        bytes: usize,
        /// The bound.
        limit: usize,
    },
    /// A filter the identity may not subscribe to.
    #[error("subscribing to {filter:?} is not allowed")]
    Subscribe {
        /// The filter.
        filter: String,
    },
    /// The device is quarantined by an operator ([`crate::quarantine`]).
    #[error("the device is quarantined")]
    Quarantined,
}

impl Refusal {
    /// A short stable name for counting (`client_id`, `publish`, `retained`, `too_large`,
    /// `subscribe`, `quarantined`).
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::ClientId { .. } => "client_id",
            Refusal::Publish { .. } => "publish",
            Refusal::Retained { .. } => "retained",
            Refusal::TooLarge { .. } | Refusal::Packet { .. } => "too_large",
            Refusal::Subscribe { .. } => "subscribe",
            Refusal::Quarantined => "quarantined",
        }
    }
}

/// The rules for one fleet.
#[derive(Debug, Clone)]
pub struct Policy {
    topics: Topics,
    servers: Vec<String>,
}

/// Who a connection is, once its certificate and CONNECT were checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Client {
    /// A fleet server: nothing further is checked.
    Server(String),
    /// A device, by its id.
    Device(String),
    /// A device enrolling with its batch's claim credential: it may only ask for a
    /// certificate and read the answer.
    Claim {
        /// The claim's name (its certificate's common name).
        claim: String,
        /// The connection's client id (`enrol.<device>`).
        client: String,
    },
}

impl Policy {
    /// Rules for topics under `prefix`, with `servers` the identities of the fleet's servers.
    pub fn new(prefix: &str, servers: &[String]) -> Self {
        Policy {
            topics: Topics::new(prefix),
            servers: servers.to_vec(),
        }
    }

    /// A connection of the certificate named `identity` asks to connect with `connect`.
    pub fn connect(&self, identity: &str, connect: &Connect) -> Result<Client, Refusal> {
        if connect.client_id != identity {
            return Err(Refusal::ClientId {
                identity: identity.to_string(),
                client_id: connect.client_id.clone(),
            });
        }
        if self.servers.iter().any(|s| s == identity) {
            return Ok(Client::Server(identity.to_string()));
        }
        let client = Client::Device(identity.to_string());
        if let Some(will) = &connect.last_will {
            let topic = will.topic.clone();
            self.check_publish(&client, &topic, will.retain, will.message.len())?;
        }
        Ok(client)
    }

    /// A connection with the claim credential named `claim` asks to connect with `connect`.
    pub fn connect_claim(&self, claim: &str, connect: &Connect) -> Result<Client, Refusal> {
        if modelcast_proto::enrol::device_of_claim_client(&connect.client_id).is_none() {
            return Err(Refusal::ClientId {
                identity: claim.to_string(),
                client_id: connect.client_id.clone(),
            });
        }
        if let Some(will) = &connect.last_will {
            return Err(Refusal::Publish {
                topic: will.topic.clone(),
            });
        }
        Ok(Client::Claim {
            claim: claim.to_string(),
            client: connect.client_id.clone(),
        })
    }

    /// Whether `client` may publish `bytes` on `topic` (retained or not); what a PUBLISH's
    /// header is judged by before its payload is read.
    pub fn check_publish(
        &self,
        client: &Client,
        topic: &str,
        retain: bool,
        bytes: usize,
    ) -> Result<(), Refusal> {
        let refused = || Refusal::Publish {
            topic: topic.to_string(),
        };
        let device = match client {
            Client::Server(_) => return Ok(()),
            Client::Device(id) => id,
            Client::Claim { claim, client } => {
                if topic != self.topics.claim_request(claim, client) {
                    return Err(refused());
                }
                let limit = modelcast_proto::enrol::MAX_ENROL_BYTES;
                if bytes > limit {
                    return Err(Refusal::TooLarge {
                        kind: DeviceTopic::Enrol,
                        bytes,
                        limit,
                    });
                }
                if retain && bytes > 0 {
                    return Err(Refusal::Retained {
                        topic: topic.to_string(),
                    });
                }
                return Ok(());
            }
        };
        let (owner, kind) = self.topics.parse_device(topic).ok_or_else(refused)?;
        if owner != *device {
            return Err(refused());
        }
        let limit = kind.device_limit().ok_or_else(refused)?;
        if bytes > limit {
            return Err(Refusal::TooLarge { kind, bytes, limit });
        }
        // An empty retained message clears one: allowed where a device may publish at all.
        if retain && bytes > 0 && !kind.retained() {
            return Err(Refusal::Retained {
                topic: topic.to_string(),
            });
        }
        Ok(())
    }

    /// `client` subscribes with `subscribe`: every filter must be allowed.
    pub fn subscribe(&self, client: &Client, subscribe: &Subscribe) -> Result<(), Refusal> {
        let device = match client {
            Client::Server(_) => return Ok(()),
            Client::Device(id) => id,
            Client::Claim { claim, client } => {
                let reply = self.topics.claim_reply(claim, client);
                return match subscribe.filters.iter().find(|f| f.path != reply) {
                    Some(f) => Err(Refusal::Subscribe {
                        filter: f.path.clone(),
                    }),
                    None => Ok(()),
                };
            }
        };
        for f in &subscribe.filters {
            if !self.may_read(device, &f.path) {
                return Err(Refusal::Subscribe {
                    filter: f.path.clone(),
                });
            }
        }
        Ok(())
    }

    /// A device may read its own desired state, chunks and receipts, and artifact topics
    /// (one, or all of them with `<p>/a/+`). Nothing with `#`, and no other `+`.
    fn may_read(&self, device: &str, filter: &str) -> bool {
        if filter == self.topics.all_artifacts() || self.topics.is_artifact(filter) {
            return true;
        }
        match self.topics.parse_device(filter) {
            Some((owner, kind)) => {
                owner == device
                    && matches!(
                        kind,
                        DeviceTopic::Desired
                            | DeviceTopic::Chunks
                            | DeviceTopic::TelemetryAcks
                            | DeviceTopic::Certificate
                    )
            }
            None => false,
        }
    }

    /// The largest packet a device may send: its largest topic kind's bound plus room for
    /// the topic and framing. What the front reads of a device's packet at most.
    pub fn max_device_packet(&self) -> usize {
        DeviceTopic::ALL
            .iter()
            .filter_map(|k| k.device_limit())
            .max()
            .unwrap_or(0)
            + 64 * 1024
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::v4::{LastWill, SubscribeFilter};
    use rumqttc::mqttbytes::QoS;

    fn policy() -> Policy {
        Policy::new("mc", &["modelcast-server".to_string()])
    }

    fn subscribe(filter: &str) -> Subscribe {
        Subscribe::new_many([SubscribeFilter::new(filter.to_string(), QoS::AtLeastOnce)])
    }

    #[test]
    fn the_client_id_is_the_certificates_name() {
        let p = policy();
        let server = Connect::new("modelcast-server");
        assert_eq!(
            p.connect("modelcast-server", &server),
            Ok(Client::Server("modelcast-server".into()))
        );
        // A device's certificate cannot take the server's session, nor another device's.
        assert_eq!(
            p.connect("edge-1", &server).unwrap_err().kind(),
            "client_id"
        );
        let other = Connect::new("edge-2");
        assert_eq!(p.connect("edge-1", &other).unwrap_err().kind(), "client_id");
        assert_eq!(
            p.connect("edge-1", &Connect::new("edge-1")),
            Ok(Client::Device("edge-1".into()))
        );
    }

    #[test]
    fn a_claim_may_only_ask_to_enrol_and_read_the_answer() {
        let p = policy();
        // Its client id names a device, never is one: no device's session is taken.
        assert_eq!(
            p.connect_claim("batch-1", &Connect::new("edge-1"))
                .unwrap_err()
                .kind(),
            "client_id"
        );
        let claim = p
            .connect_claim("batch-1", &Connect::new("enrol.edge-1"))
            .unwrap();
        let request = "mc/claim/batch-1/enrol.edge-1/request";
        assert_eq!(p.check_publish(&claim, request, false, 900), Ok(()));
        assert_eq!(
            p.check_publish(&claim, request, false, 1 << 20)
                .unwrap_err()
                .kind(),
            "too_large"
        );
        assert_eq!(
            p.check_publish(&claim, request, true, 900)
                .unwrap_err()
                .kind(),
            "retained"
        );
        // Not as a device, not as another claim or client, not anything else.
        for topic in [
            "mc/d/edge-1/state",
            "mc/d/enrol.edge-1/state",
            "mc/d/edge-1/enrol",
            "mc/claim/batch-2/enrol.edge-1/request",
            "mc/claim/batch-1/enrol.edge-2/request",
            "mc/a/00",
        ] {
            assert_eq!(
                p.check_publish(&claim, topic, false, 10)
                    .unwrap_err()
                    .kind(),
                "publish",
                "{topic}"
            );
        }
        assert_eq!(
            p.subscribe(&claim, &subscribe("mc/claim/batch-1/enrol.edge-1/reply")),
            Ok(())
        );
        for filter in [
            "mc/d/edge-1/desired",
            "mc/d/edge-1/certificate",
            "mc/a/+",
            "mc/claim/batch-1/+/reply",
            "mc/claim/batch-1/enrol.edge-2/reply",
        ] {
            assert_eq!(
                p.subscribe(&claim, &subscribe(filter)).unwrap_err().kind(),
                "subscribe",
                "{filter}"
            );
        }
        let mut will = Connect::new("enrol.edge-1");
        will.last_will = Some(LastWill::new(
            "mc/d/edge-1/online",
            "offline",
            QoS::AtLeastOnce,
            true,
        ));
        assert_eq!(
            p.connect_claim("batch-1", &will).unwrap_err().kind(),
            "publish"
        );
    }

    #[test]
    fn a_last_will_goes_only_on_the_devices_online_topic() {
        let p = policy();
        let mut c = Connect::new("edge-1");
        c.last_will = Some(LastWill::new(
            "mc/d/edge-1/online",
            "offline",
            QoS::AtLeastOnce,
            true,
        ));
        assert!(p.connect("edge-1", &c).is_ok());
        c.last_will = Some(LastWill::new(
            "mc/d/edge-2/online",
            "offline",
            QoS::AtLeastOnce,
            true,
        ));
        assert_eq!(p.connect("edge-1", &c).unwrap_err().kind(), "publish");
        c.last_will = Some(LastWill::new(
            "junk",
            vec![0u8; 100],
            QoS::AtLeastOnce,
            true,
        ));
        assert_eq!(p.connect("edge-1", &c).unwrap_err().kind(), "publish");
    }

    #[test]
    fn a_device_writes_its_own_topics_within_their_bounds() {
        let p = policy();
        let dev = Client::Device("edge-1".into());
        for kind in ["state", "telemetry", "online", "requests"] {
            let topic = format!("mc/d/edge-1/{kind}");
            assert_eq!(p.check_publish(&dev, &topic, false, 10), Ok(()), "{kind}");
        }
        for topic in [
            "mc/d/edge-2/state",
            "mc/d/edge-1/desired",
            "mc/d/edge-1/chunks",
            "mc/d/edge-1/telemetry-acks",
            "mc/a/0000000000000000000000000000000000000000000000000000000000000000",
            "junk/anything",
            "mc/d/edge-1/state/more",
        ] {
            let e = p.check_publish(&dev, topic, false, 10).unwrap_err();
            assert_eq!(e.kind(), "publish", "{topic}");
        }
        assert!(matches!(
            p.check_publish(&dev, "mc/d/edge-1/state", true, 2 << 20),
            Err(Refusal::TooLarge {
                kind: DeviceTopic::State,
                ..
            })
        ));
        assert_eq!(
            p.check_publish(&dev, "mc/d/edge-1/state", true, 100),
            Ok(())
        );
        assert_eq!(p.check_publish(&dev, "mc/d/edge-1/online", true, 6), Ok(()));
        let e = p
            .check_publish(&dev, "mc/d/edge-1/telemetry", true, 100)
            .unwrap_err();
        assert_eq!(e.kind(), "retained");
        // Clearing a retained message is allowed.
        assert_eq!(
            p.check_publish(&dev, "mc/d/edge-1/requests", true, 0),
            Ok(())
        );
        // The server may do anything.
        let server = Client::Server("modelcast-server".into());
        assert_eq!(
            p.check_publish(&server, "mc/d/edge-1/desired", true, 10),
            Ok(())
        );
    }

    #[test]
    fn a_device_reads_its_own_topics_and_artifacts() {
        let p = policy();
        let dev = Client::Device("edge-1".into());
        let sha = "ab".repeat(32);
        for f in [
            "mc/d/edge-1/desired".to_string(),
            "mc/d/edge-1/chunks".to_string(),
            "mc/d/edge-1/telemetry-acks".to_string(),
            "mc/a/+".to_string(),
            format!("mc/a/{sha}"),
        ] {
            assert_eq!(p.subscribe(&dev, &subscribe(&f)), Ok(()), "{f}");
        }
        for f in [
            "#",
            "mc/#",
            "mc/d/+/desired",
            "mc/d/edge-2/desired",
            "mc/d/edge-1/state",
            "mc/d/edge-1/#",
            "mc/a/#",
            "$share/g/mc/d/+/requests",
        ] {
            assert_eq!(
                p.subscribe(&dev, &subscribe(f)).unwrap_err().kind(),
                "subscribe",
                "{f}"
            );
        }
        let mut two = subscribe("mc/d/edge-1/desired");
        two.filters
            .push(SubscribeFilter::new("#".into(), QoS::AtMostOnce));
        assert!(p.subscribe(&dev, &two).is_err());
        let server = Client::Server("modelcast-server".into());
        assert_eq!(p.subscribe(&server, &subscribe("#")), Ok(()));
    }
}
