//! Enrolment by claim, decided with no I/O: what the server does with a device's request for
//! a certificate, given what it knows of that device and the operators' rules.
//!
//! | request | device's record | answer |
//! | --- | --- | --- |
//! | over a claim | none | issued if an `--enrol-auto` rule matches the claim and labels, else held for an operator |
//! | over a claim | held | still held (a different key: refused, the id is taken) |
//! | over a claim | enrolled, same key, certificate in the first half of its life | the same certificate sent again (the device lost its reply) |
//! | over a claim | enrolled, same key, certificate valid, past half its life | a new one issued |
//! | over a claim | enrolled, same key, certificate expired (offline past its end) | as `--enrol-expired` says: issued, held, or refused |
//! | over a claim | enrolled with another key | refused: the id is taken |
//! | over its own connection (renewal) | not revoked | issued (the broker vouched for the sender) |
//! | any | rejected or revoked | refused |
//!
//! The shell ([`crate::fleet`]) checks the CSR (its signature, that it names the device),
//! signs with [`crate::pki::CertIssuer`], keeps the [`Enrolment`] record and answers.

use std::collections::BTreeMap;

use modelcast_proto::enrol::Refused;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Certificates kept per device record (the newest): with renewal at two thirds of a
/// certificate's life, at most two are valid at once; older ones are listed for revocation.
pub const KEPT_CERTIFICATES: usize = 8;

/// Where a device stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnrolState {
    /// Asked, held for an operator.
    Pending,
    /// Holds a certificate.
    Enrolled,
    /// An operator rejected it.
    Rejected,
    /// Its certificates were revoked.
    Revoked,
}

/// One certificate issued to a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCert {
    /// Serial number, hex.
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
}

/// An operator's (or a rule's) decision on a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decided {
    /// Who: an operator, or `rule` for an automatic acceptance.
    pub by: String,
    /// Unix seconds.
    pub at: i64,
}

/// What the server keeps of a device's enrolment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolment {
    /// The device id.
    pub device: String,
    /// Where it stands.
    pub state: EnrolState,
    /// The claim it first came with (`None`: it only ever renewed a certificate made by hand).
    #[serde(default)]
    pub claim: Option<String>,
    /// The key its certificates are for (raw public key, hex).
    pub public_key: String,
    /// Its sealing key, hex, as it said when it asked.
    #[serde(default)]
    pub sealing_key: Option<String>,
    /// Its labels, as it said when it asked.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Its latest CSR (PEM): what an operator's acceptance signs.
    pub csr: String,
    /// Unix seconds of its latest request.
    pub requested_at: i64,
    /// Who decided to let it in or keep it out, and when.
    #[serde(default)]
    pub decided: Option<Decided>,
    /// Certificates issued to it, oldest first, at most [`KEPT_CERTIFICATES`].
    #[serde(default)]
    pub certificates: Vec<IssuedCert>,
    /// The newest certificate, PEM: sent again to a device that asks before it is half
    /// through its life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
}

impl Enrolment {
    /// Records a newly issued certificate.
    pub fn issued(&mut self, cert: IssuedCert) {
        self.state = EnrolState::Enrolled;
        self.certificates.push(cert);
        let excess = self.certificates.len().saturating_sub(KEPT_CERTIFICATES);
        self.certificates.drain(..excess);
    }

    /// Whether its newest certificate is still valid at `now` (Unix seconds).
    pub fn valid_at(&self, now: i64) -> bool {
        self.certificates.last().is_some_and(|c| c.not_after > now)
    }

    /// Whether its newest certificate has more than half its life left at `now`.
    pub fn fresh_at(&self, now: i64) -> bool {
        self.certificates
            .last()
            .is_some_and(|c| 2 * (c.not_after - now) > c.not_after - c.not_before)
    }
}

/// What happens to a device whose certificate ran out while it was offline and that asks
/// again over its claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Expired {
    /// Issued a new certificate, as any device that still holds its key.
    Reenrol,
    /// Held for an operator, as a new device.
    #[default]
    Hold,
    /// Refused: it stays out until an operator removes its record.
    Refuse,
}

/// A rule that enrols a device without an operator: its claim (if the rule names one) and
/// every label the rule names must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoRule {
    /// The claim it must come with.
    pub claim: Option<String>,
    /// Labels it must carry.
    pub labels: BTreeMap<String, String>,
}

/// A rule that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0:?}: an enrolment rule is `claim=<batch>` and/or `<label>=<value>`, comma-separated")]
pub struct BadRule(pub String);

impl std::str::FromStr for AutoRule {
    type Err = BadRule;

    fn from_str(s: &str) -> Result<Self, BadRule> {
        let mut rule = AutoRule {
            claim: None,
            labels: BTreeMap::new(),
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| BadRule(s.into()))?;
            let (k, v) = (k.trim(), v.trim());
            if k.is_empty() || v.is_empty() {
                return Err(BadRule(s.into()));
            }
            if k == "claim" {
                rule.claim = Some(v.to_string());
            } else {
                rule.labels.insert(k.to_string(), v.to_string());
            }
        }
        if rule.claim.is_none() && rule.labels.is_empty() {
            return Err(BadRule(s.into()));
        }
        Ok(rule)
    }
}

impl AutoRule {
    fn matches(&self, claim: &str, labels: &BTreeMap<String, String>) -> bool {
        self.claim.as_deref().is_none_or(|c| c == claim)
            && self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// The operators' enrolment rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrolPolicy {
    /// Devices these rules match are enrolled at once; others wait for an operator.
    pub auto: Vec<AutoRule>,
    /// How long a device certificate is valid, seconds.
    pub valid_secs: i64,
    /// What happens to a device offline past its certificate's end.
    pub expired: Expired,
    /// Devices waiting for an operator, at most: past this, a device not yet known that asks
    /// over a claim is refused (`unavailable`) until operators decide on some, so what one
    /// claim holder can make the server keep is bounded ([`DEFAULT_MAX_PENDING`]).
    pub max_pending: usize,
}

/// [`EnrolPolicy::max_pending`] unless `--enrol-max-pending` says otherwise.
pub const DEFAULT_MAX_PENDING: usize = 10_000;

/// How a request came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// Over the claim credential of this name.
    Claim(String),
    /// Over the device's own authenticated connection (a renewal).
    Device,
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Sign its CSR.
    Issue,
    /// Send its newest certificate again (it asked again with the key it is for, early in
    /// that certificate's life: its reply was lost).
    Resend,
    /// Keep it waiting for an operator.
    Hold,
    /// Refuse it.
    Refuse(Refused, String),
}

/// Decides a request for `key` (the CSR's public key, hex) with `labels`, arriving `via`,
/// given the device's record, at `now` (Unix seconds).
pub fn decide(
    policy: &EnrolPolicy,
    via: &Via,
    key: &str,
    labels: &BTreeMap<String, String>,
    record: Option<&Enrolment>,
    now: i64,
) -> Decision {
    if let Some(r) = record {
        match r.state {
            EnrolState::Rejected => {
                return Decision::Refuse(
                    Refused::Rejected,
                    "an operator rejected this device".into(),
                )
            }
            EnrolState::Revoked => {
                return Decision::Refuse(
                    Refused::Revoked,
                    "this device's certificates were revoked".into(),
                )
            }
            EnrolState::Pending | EnrolState::Enrolled => {}
        }
    }
    let claim = match via {
        // The broker vouched for the sender: it may renew, with a new key if it wants one.
        Via::Device => return Decision::Issue,
        Via::Claim(claim) => claim,
    };
    match record {
        None => {
            if policy.auto.iter().any(|r| r.matches(claim, labels)) {
                Decision::Issue
            } else {
                Decision::Hold
            }
        }
        Some(r) if r.public_key != key => Decision::Refuse(
            Refused::Taken,
            format!("{} is enrolled with another key", r.device),
        ),
        Some(r) if r.state == EnrolState::Pending => Decision::Hold,
        Some(r) if r.fresh_at(now) => Decision::Resend,
        Some(r) if r.valid_at(now) => Decision::Issue,
        Some(r) => match policy.expired {
            Expired::Reenrol => Decision::Issue,
            Expired::Hold => Decision::Hold,
            Expired::Refuse => Decision::Refuse(
                Refused::Expired,
                format!(
                    "{}'s certificate expired while it was offline; an operator must remove its record",
                    r.device
                ),
            ),
        },
    }
}

/// What a server that enrols devices holds: the rules and the CA that signs.
#[derive(Debug)]
pub struct Enroller {
    /// The operators' rules.
    pub policy: EnrolPolicy,
    /// Signs device certificates.
    pub issuer: crate::pki::CertIssuer,
    /// The PKI directory: its revocation list lists the certificates of revoked devices.
    pub pki_dir: std::path::PathBuf,
}

/// An operator's decision on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let a pending device in: its CSR is signed.
    Accept,
    /// Keep a pending device out.
    Reject,
    /// Put every certificate issued to the device on the revocation list and quarantine it.
    Revoke,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(expired: Expired) -> EnrolPolicy {
        EnrolPolicy {
            auto: vec!["claim=batch-1,site=lab".parse().unwrap()],
            valid_secs: 30 * 86_400,
            expired,
            max_pending: DEFAULT_MAX_PENDING,
        }
    }

    fn labels(site: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("site".to_string(), site.to_string())])
    }

    fn record(state: EnrolState, key: &str, not_after: i64) -> Enrolment {
        Enrolment {
            device: "edge-1".into(),
            state,
            claim: Some("batch-1".into()),
            public_key: key.into(),
            sealing_key: None,
            labels: labels("lab"),
            csr: String::new(),
            requested_at: 0,
            decided: None,
            certificates: vec![IssuedCert {
                serial: "01".into(),
                not_before: 0,
                not_after,
            }],
            certificate: Some("PEM".into()),
        }
    }

    #[test]
    fn rules_parse_and_refuse_nonsense() {
        let r: AutoRule = "claim=b, site=lab".parse().unwrap();
        assert_eq!(r.claim.as_deref(), Some("b"));
        assert_eq!(r.labels, labels("lab"));
        for bad in ["", "claim", "=x", "site=", ","] {
            assert!(bad.parse::<AutoRule>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn new_devices_are_enrolled_by_rule_or_held() {
        let p = policy(Expired::Hold);
        let claim = Via::Claim("batch-1".into());
        assert_eq!(
            decide(&p, &claim, "k", &labels("lab"), None, 0),
            Decision::Issue
        );
        assert_eq!(
            decide(&p, &claim, "k", &labels("shop"), None, 0),
            Decision::Hold
        );
        let other = Via::Claim("batch-2".into());
        assert_eq!(
            decide(&p, &other, "k", &labels("lab"), None, 0),
            Decision::Hold
        );
    }

    #[test]
    fn an_enrolled_id_is_not_taken_by_another_key() {
        let p = policy(Expired::Reenrol);
        let claim = Via::Claim("batch-1".into());
        let r = record(EnrolState::Enrolled, "k", 100);
        assert!(matches!(
            decide(&p, &claim, "other", &labels("lab"), Some(&r), 50),
            Decision::Refuse(Refused::Taken, _)
        ));
        // The same key, its reply lost: issued again.
        assert_eq!(
            decide(&p, &claim, "k", &labels("lab"), Some(&r), 50),
            Decision::Issue
        );
        let held = record(EnrolState::Pending, "k", 0);
        assert_eq!(
            decide(&p, &claim, "k", &labels("lab"), Some(&held), 50),
            Decision::Hold
        );
    }

    #[test]
    fn a_device_offline_past_its_certificate_follows_the_policy() {
        let claim = Via::Claim("batch-1".into());
        let r = record(EnrolState::Enrolled, "k", 100);
        let at = |e| decide(&policy(e), &claim, "k", &labels("lab"), Some(&r), 200);
        assert_eq!(at(Expired::Reenrol), Decision::Issue);
        assert_eq!(at(Expired::Hold), Decision::Hold);
        assert!(matches!(
            at(Expired::Refuse),
            Decision::Refuse(Refused::Expired, _)
        ));
    }

    #[test]
    fn renewals_pass_unless_rejected_or_revoked() {
        let p = policy(Expired::Refuse);
        let r = record(EnrolState::Enrolled, "k", 100);
        assert_eq!(
            decide(&p, &Via::Device, "new", &labels("x"), Some(&r), 500),
            Decision::Issue
        );
        for (state, kind) in [
            (EnrolState::Revoked, Refused::Revoked),
            (EnrolState::Rejected, Refused::Rejected),
        ] {
            let r = record(state, "k", 100);
            for via in [Via::Device, Via::Claim("batch-1".into())] {
                assert!(matches!(
                    decide(&p, &via, "k", &labels("lab"), Some(&r), 50),
                    Decision::Refuse(k, _) if k == kind
                ));
            }
        }
    }

    #[test]
    fn records_keep_the_newest_certificates() {
        let mut r = record(EnrolState::Pending, "k", 0);
        for i in 0..20 {
            r.issued(IssuedCert {
                serial: format!("{i:02x}"),
                not_before: i,
                not_after: i + 10,
            });
        }
        assert_eq!(r.state, EnrolState::Enrolled);
        assert_eq!(r.certificates.len(), KEPT_CERTIFICATES);
        assert_eq!(r.certificates.last().unwrap().serial, "13");
        assert!(r.valid_at(25) && !r.valid_at(29));
    }

    proptest! {
        /// Whatever the record and the request, a claim never gets a certificate for a key
        /// other than the one an id is enrolled with, nor for a rejected or revoked device.
        #[test]
        fn a_claim_never_takes_over_an_enrolled_device(
            state in prop_oneof![
                Just(EnrolState::Pending),
                Just(EnrolState::Enrolled),
                Just(EnrolState::Rejected),
                Just(EnrolState::Revoked)
            ],
            same_key in any::<bool>(),
            not_after in 0i64..200,
            now in 0i64..200,
            expired in prop_oneof![Just(Expired::Reenrol), Just(Expired::Hold), Just(Expired::Refuse)],
            site in prop_oneof![Just("lab"), Just("shop")],
        ) {
            let r = record(state, "k", not_after);
            let key = if same_key { "k" } else { "other" };
            let d = decide(&policy(expired), &Via::Claim("batch-1".into()), key, &labels(site), Some(&r), now);
            if matches!(d, Decision::Issue | Decision::Resend) {
                prop_assert!(same_key);
                prop_assert_eq!(state, EnrolState::Enrolled);
            }
        }
    }
}
