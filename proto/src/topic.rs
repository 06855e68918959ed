//! MQTT topic names: the only place they are built or parsed.
//!
//! Everything lives under a configurable prefix. Device topics sit under `<p>/d/{device}/` so
//! a broker ACL can confine a device to its own subtree. Artifact topics `<p>/a/{sha256}`
//! carry chunks published once for every device downloading that artifact.

/// The kinds of per-device topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceTopic {
    /// Retained desired state (server → agent).
    Desired,
    /// Chunk replies (server → agent).
    Chunks,
    /// State reports (agent → server).
    State,
    /// Telemetry (agent → server).
    Telemetry,
    /// Receipts of stored telemetry (server → agent): a report leaves the device's queue only
    /// once the server has it.
    TelemetryAcks,
    /// Retained online/offline status, with a last will.
    Online,
    /// Chunk requests (agent → server): on the device's own topic, so a broker ACL binds
    /// the sender to the device it names.
    Requests,
    /// Certificate renewal requests (agent → server, [`crate::enrol::EnrolRequest`]).
    Enrol,
    /// The server's answers to them (server → agent, [`crate::enrol::EnrolReply`]).
    Certificate,
}

impl DeviceTopic {
    /// Largest payload a device may publish on this kind of topic, or `None` for the kinds
    /// only the fleet server writes. One bound per kind, shared by the agent that writes,
    /// the broker front that checks ([`crate::topic`] users on the server) and the server
    /// that reads; brokers themselves bound every packet by the largest kind (a chunk).
    pub fn device_limit(self) -> Option<usize> {
        match self {
            DeviceTopic::State => Some(crate::report::MAX_REPORT_BYTES),
            DeviceTopic::Telemetry => Some(crate::telemetry::MAX_TELEMETRY_BYTES),
            DeviceTopic::Requests => Some(crate::chunk::MAX_REQUEST_BYTES),
            DeviceTopic::Online => Some(MAX_ONLINE_BYTES),
            DeviceTopic::Enrol => Some(crate::enrol::MAX_ENROL_BYTES),
            DeviceTopic::Desired
            | DeviceTopic::Chunks
            | DeviceTopic::TelemetryAcks
            | DeviceTopic::Certificate => None,
        }
    }

    /// Whether a message on this kind of topic may be retained: the desired state (by the
    /// server), a device's latest state report and its online status. Nothing else is.
    pub fn retained(self) -> bool {
        matches!(
            self,
            DeviceTopic::Desired | DeviceTopic::State | DeviceTopic::Online
        )
    }

    /// Every kind.
    pub const ALL: [DeviceTopic; 9] = [
        DeviceTopic::Desired,
        DeviceTopic::Chunks,
        DeviceTopic::State,
        DeviceTopic::Telemetry,
        DeviceTopic::TelemetryAcks,
        DeviceTopic::Online,
        DeviceTopic::Requests,
        DeviceTopic::Enrol,
        DeviceTopic::Certificate,
    ];

    fn suffix(self) -> &'static str {
        match self {
            DeviceTopic::Desired => "desired",
            DeviceTopic::Chunks => "chunks",
            DeviceTopic::State => "state",
            DeviceTopic::Telemetry => "telemetry",
            DeviceTopic::TelemetryAcks => "telemetry-acks",
            DeviceTopic::Online => "online",
            DeviceTopic::Requests => "requests",
            DeviceTopic::Enrol => "enrol",
            DeviceTopic::Certificate => "certificate",
        }
    }

    fn from_suffix(s: &str) -> Option<Self> {
        Some(match s {
            "desired" => DeviceTopic::Desired,
            "chunks" => DeviceTopic::Chunks,
            "state" => DeviceTopic::State,
            "telemetry" => DeviceTopic::Telemetry,
            "telemetry-acks" => DeviceTopic::TelemetryAcks,
            "online" => DeviceTopic::Online,
            "requests" => DeviceTopic::Requests,
            "enrol" => DeviceTopic::Enrol,
            "certificate" => DeviceTopic::Certificate,
            _ => return None,
        })
    }
}

/// Largest online status (`online` or `offline`).
pub const MAX_ONLINE_BYTES: usize = 64;

/// Topic builder for one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    /// Topics under `prefix` (trailing slashes are ignored).
    pub fn new(prefix: &str) -> Self {
        Topics {
            prefix: prefix.trim_end_matches('/').to_string(),
        }
    }

    /// `<p>/d/{device}/{kind}`.
    pub fn device(&self, device: &str, kind: DeviceTopic) -> String {
        format!("{}/d/{device}/{}", self.prefix, kind.suffix())
    }

    /// `<p>/d/+/{kind}`: the filter a server subscribes to for every device.
    pub fn all_devices(&self, kind: DeviceTopic) -> String {
        format!("{}/d/+/{}", self.prefix, kind.suffix())
    }

    /// `<p>/d/{device}/requests`: where `device` asks for chunks.
    pub fn chunk_requests(&self, device: &str) -> String {
        self.device(device, DeviceTopic::Requests)
    }

    /// `$share/{group}/<p>/d/+/requests`: server replicas share every device's requests.
    pub fn chunk_requests_shared(&self, group: &str) -> String {
        format!("$share/{group}/{}", self.all_devices(DeviceTopic::Requests))
    }

    /// `<p>/a/{artifact}`: chunks of the artifact (hex SHA-256) published once for every
    /// device that listens, instead of once per device.
    pub fn artifact(&self, artifact: &str) -> String {
        format!("{}/a/{artifact}", self.prefix)
    }

    /// `<p>/a/+`: every artifact topic (what a device may read).
    pub fn all_artifacts(&self) -> String {
        format!("{}/a/+", self.prefix)
    }

    /// Whether `topic` is an artifact topic.
    pub fn is_artifact(&self, topic: &str) -> bool {
        topic
            .strip_prefix(&self.prefix)
            .and_then(|rest| rest.strip_prefix("/a/"))
            .is_some_and(|sha| sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()))
    }

    /// `<p>/claim/{claim}/{client}/request`: where a device with only its batch's claim
    /// credential (`claim`, the credential's common name) asks to enrol, connected as
    /// `client` ([`crate::enrol::claim_client_id`]). Brokers bind both segments: the claim
    /// to the certificate, the client to the connection.
    pub fn claim_request(&self, claim: &str, client: &str) -> String {
        format!("{}/claim/{claim}/{client}/request", self.prefix)
    }

    /// `<p>/claim/{claim}/{client}/reply`: the server's answer to that request.
    pub fn claim_reply(&self, claim: &str, client: &str) -> String {
        format!("{}/claim/{claim}/{client}/reply", self.prefix)
    }

    /// `<p>/claim/+/+/request`: every claim request (what the server subscribes to).
    pub fn all_claim_requests(&self) -> String {
        format!("{}/claim/+/+/request", self.prefix)
    }

    /// Splits a claim request topic into the claim and the client id.
    pub fn parse_claim_request(&self, topic: &str) -> Option<(String, String)> {
        let rest = topic
            .strip_prefix(&self.prefix)?
            .strip_prefix("/claim/")?
            .strip_suffix("/request")?;
        let (claim, client) = rest.split_once('/')?;
        let ok = |s: &str| crate::manifest::valid_name(s);
        (ok(claim) && ok(client)).then(|| (claim.to_string(), client.to_string()))
    }

    /// Splits a device topic into device id and kind.
    pub fn parse_device(&self, topic: &str) -> Option<(String, DeviceTopic)> {
        let rest = topic.strip_prefix(&self.prefix)?.strip_prefix("/d/")?;
        let (device, suffix) = rest.split_once('/')?;
        if !crate::manifest::valid_name(device) {
            return None;
        }
        Some((device.to_string(), DeviceTopic::from_suffix(suffix)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_and_parse() {
        let t = Topics::new("mc/");
        let s = t.device("dev-1", DeviceTopic::State);
        assert_eq!(s, "mc/d/dev-1/state");
        assert_eq!(
            t.parse_device(&s),
            Some(("dev-1".to_string(), DeviceTopic::State))
        );
        assert_eq!(t.parse_device("mc/d/dev-1/nope"), None);
        assert_eq!(t.parse_device("other/d/dev-1/state"), None);
        assert_eq!(t.parse_device("mc/d/+/state"), None);
        assert_eq!(t.all_devices(DeviceTopic::State), "mc/d/+/state");
        assert_eq!(t.chunk_requests_shared("srv"), "$share/srv/mc/d/+/requests");
        let sha = "ab".repeat(32);
        assert_eq!(t.artifact(&sha), format!("mc/a/{sha}"));
        assert!(t.is_artifact(&t.artifact(&sha)));
        assert!(!t.is_artifact("mc/a/+"));
        assert!(!t.is_artifact(&format!("other/a/{sha}")));
        assert_eq!(t.parse_device(&t.artifact(&sha)), None);
        assert_eq!(t.all_artifacts(), "mc/a/+");
        let claim = t.claim_request("batch-7", "enrol.edge-1");
        assert_eq!(claim, "mc/claim/batch-7/enrol.edge-1/request");
        assert_eq!(
            t.parse_claim_request(&claim),
            Some(("batch-7".into(), "enrol.edge-1".into()))
        );
        assert_eq!(t.parse_claim_request("mc/claim/+/+/request"), None);
        assert_eq!(t.parse_claim_request("mc/claim/a/b/c/request"), None);
        assert_eq!(t.parse_device(&claim), None);
        assert_eq!(t.claim_reply("b", "c"), "mc/claim/b/c/reply");
        for kind in DeviceTopic::ALL {
            let topic = t.device("edge-1", kind);
            assert_eq!(t.parse_device(&topic), Some(("edge-1".into(), kind)));
        }
    }
}
