//! Enrolment and renewal over MQTT: claim requests (`<p>/claim/<claim>/<client>/request`) and
//! renewals on devices' own `enrol` topics in, certificates or refusals out; the operators'
//! accept and reject. Decisions are [`crate::enrol::decide`]'s; this reads, signs, stores and
//! answers.

use modelcast_proto::enrol::{
    claim_client_id, device_of_claim_client, EnrolReply, EnrolRequest, Refused,
};
use modelcast_proto::topic::DeviceTopic;
use rumqttc::QoS;
use serde_json::json;
use tracing::{info, warn};

use super::{Fleet, Rejected};
use crate::clock::unix_now;
use crate::db::DbError;
use crate::enrol::{
    decide, Decided, Decision, EnrolState, Enroller, Enrolment, IssuedCert, Verdict, Via,
};

/// Signs `csr` for `entry`'s device and records the certificate in it; the answer to send.
fn sign_into(
    enroller: &Enroller,
    entry: &mut Enrolment,
    csr: &str,
    now: i64,
) -> Result<EnrolReply, crate::pki::CsrError> {
    let issued = enroller
        .issuer
        .sign(csr, &entry.device, now, enroller.policy.valid_secs)?;
    entry.public_key = issued.public_key;
    entry.certificate = Some(issued.pem.clone());
    entry.issued(IssuedCert {
        serial: issued.serial,
        not_before: issued.not_before,
        not_after: issued.not_after,
    });
    Ok(EnrolReply::Issued {
        device: entry.device.clone(),
        certificate: issued.pem,
        not_before: issued.not_before,
        not_after: issued.not_after,
    })
}

/// Why an operator's decision on an enrolment was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum EnrolmentError {
    /// This server does not enrol devices.
    #[error("this server does not enrol devices (start it with --enrol)")]
    Disabled,
    /// No such device has asked.
    #[error("no enrolment request from {0:?}")]
    Unknown(String),
    /// Not waiting for a decision.
    #[error("{device:?} is {state:?}, not pending")]
    NotPending {
        /// The device.
        device: String,
        /// Where it stands.
        state: EnrolState,
    },
    /// Its CSR could not be signed.
    #[error(transparent)]
    Csr(#[from] crate::pki::CsrError),
    /// The revocation list could not be written.
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] DbError),
}

impl Fleet {
    /// A request over a claim credential: `claim` (its common name, bound by the broker) and
    /// `client`, the connection's client id (`enrol.<device>`).
    pub(super) async fn handle_claim(
        &self,
        claim: &str,
        client: &str,
        payload: &[u8],
    ) -> Result<(), Rejected> {
        let Some(device) = device_of_claim_client(client) else {
            warn!(%claim, %client, "claim request from a client id that names no device dropped");
            return Ok(());
        };
        let request = match EnrolRequest::from_slice(payload) {
            Ok(r) if r.device == device => r,
            Ok(r) => {
                return Err(Rejected::WrongDevice {
                    kind: "enrolment request",
                    named: r.device,
                })
            }
            Err(e) => {
                warn!(%claim, %device, error = %e, "bad enrolment request dropped");
                return Ok(());
            }
        };
        let reply = self.enrol(Via::Claim(claim.to_string()), request).await?;
        self.answer(&self.topics.claim_reply(claim, client), &reply);
        Ok(())
    }

    /// A renewal on `device`'s own topic (the broker bound the sender to it).
    pub(super) async fn handle_renewal(
        &self,
        device: &str,
        payload: &[u8],
    ) -> Result<(), Rejected> {
        let request = match EnrolRequest::from_slice(payload) {
            Ok(r) if r.device == device => r,
            Ok(r) => {
                return Err(Rejected::WrongDevice {
                    kind: "renewal request",
                    named: r.device,
                })
            }
            Err(e) => {
                warn!(%device, error = %e, "bad renewal request dropped");
                return Ok(());
            }
        };
        let reply = self.enrol(Via::Device, request).await?;
        self.answer(
            &self.topics.device(device, DeviceTopic::Certificate),
            &reply,
        );
        Ok(())
    }

    fn answer(&self, topic: &str, reply: &EnrolReply) {
        // Never waits: the handler must not wait on the link it is fed by.
        if let Err(e) = self
            .client
            .try_publish(topic, QoS::AtLeastOnce, false, reply.to_vec())
        {
            warn!(device = %reply.device(), error = %e, "enrolment answer not sent; the device asks again");
        }
    }

    /// Decides `request`, arriving `via`, and keeps the outcome: the answer to send.
    async fn enrol(&self, via: Via, request: EnrolRequest) -> Result<EnrolReply, DbError> {
        let device = request.device.clone();
        let refused = |kind, reason: String| EnrolReply::Refused {
            device: device.clone(),
            kind,
            reason,
        };
        let Some(enroller) = &self.enroller else {
            return Ok(refused(
                Refused::Unavailable,
                "this server does not enrol devices".into(),
            ));
        };
        let (key, named) = match crate::pki::CertIssuer::inspect(&request.csr) {
            Ok(k) => k,
            Err(e) => return Ok(refused(Refused::Invalid, e.to_string())),
        };
        if named != device {
            return Ok(refused(
                Refused::Invalid,
                format!("the request names {named:?}, not {device:?}"),
            ));
        }
        let mut pending = self.enrolling.lock().await;
        let now = unix_now();
        let record = self.db.enrolment(&device).await?;
        let decision = decide(
            &enroller.policy,
            &via,
            &key,
            &request.labels,
            record.as_ref(),
            now,
        );
        let claim = match &via {
            Via::Claim(c) => Some(c.clone()),
            Via::Device => None,
        };
        if let (Decision::Resend, Some(r)) = (&decision, &record) {
            if let (Some(pem), Some(last)) = (&r.certificate, r.certificates.last()) {
                info!(%device, serial = %last.serial, "device certificate sent again");
                return Ok(EnrolReply::Issued {
                    device: device.clone(),
                    certificate: pem.clone(),
                    not_before: last.not_before,
                    not_after: last.not_after,
                });
            }
        }
        if let Decision::Refuse(kind, reason) = decision {
            info!(%device, ?kind, %reason, "enrolment refused");
            return Ok(refused(kind, reason));
        }
        let was_pending = record.as_ref().map(|r| r.state) == Some(EnrolState::Pending);
        let waiting = match *pending {
            Some(n) => n,
            None => self
                .db
                .enrolments()
                .await?
                .iter()
                .filter(|e| e.state == EnrolState::Pending)
                .count(),
        };
        if decision == Decision::Hold && !was_pending && waiting >= enroller.policy.max_pending {
            warn!(%device, waiting, "enrolment refused: too many devices wait for an operator");
            return Ok(refused(
                Refused::Unavailable,
                format!("{waiting} devices already wait for an operator's decision"),
            ));
        }
        let mut entry = record.unwrap_or_else(|| Enrolment {
            device: device.clone(),
            state: EnrolState::Pending,
            claim: claim.clone(),
            public_key: key.clone(),
            sealing_key: None,
            labels: Default::default(),
            csr: String::new(),
            requested_at: now,
            decided: None,
            certificates: Vec::new(),
            certificate: None,
        });
        // What the device said of itself, as of this request.
        entry.csr = request.csr;
        entry.requested_at = now;
        entry.labels = request.labels;
        entry.sealing_key = request.sealing_key;
        if entry.claim.is_none() {
            entry.claim = claim;
        }
        let (reply, action) = match decision {
            Decision::Hold => {
                entry.state = EnrolState::Pending;
                let reply = EnrolReply::Pending {
                    device: device.clone(),
                };
                (reply, (!was_pending).then_some("device.enrol.held"))
            }
            // Issued (or to send again, but not kept: a new one); refusals returned above.
            Decision::Issue | Decision::Resend | Decision::Refuse(..) => {
                let csr = entry.csr.clone();
                let reply = match sign_into(enroller, &mut entry, &csr, now) {
                    Ok(r) => r,
                    Err(e) => return Ok(refused(Refused::Invalid, e.to_string())),
                };
                if entry.decided.is_none() {
                    entry.decided = Some(Decided {
                        by: "rule".into(),
                        at: now,
                    });
                }
                let serial = entry.certificates.last().map(|c| c.serial.clone());
                info!(%device, serial = ?serial, renewal = (via == Via::Device), "device certificate issued");
                let action = match via {
                    Via::Device => "device.certificate.renewed",
                    Via::Claim(_) => "device.enrol.issued",
                };
                (reply, Some(action))
            }
        };
        // Durable before the device hears of it: a record lost in a crash would free the
        // device's id for another key.
        self.db.put_enrolment(&entry).await?;
        self.db.flush().await?;
        let is_pending = entry.state == EnrolState::Pending;
        *pending =
            Some((waiting + usize::from(is_pending)).saturating_sub(usize::from(was_pending)));
        if let Some(action) = action {
            if is_pending {
                info!(%device, claim = ?entry.claim, "enrolment held for an operator");
            }
            self.audit(action, &entry).await;
        }
        Ok(reply)
    }

    async fn audit(&self, action: &str, entry: &Enrolment) {
        let details = json!({
            "device": entry.device,
            "claim": entry.claim,
            "labels": entry.labels,
            "serial": entry.certificates.last().map(|c| &c.serial),
        });
        let by = entry.decided.as_ref().map_or("device", |d| d.by.as_str());
        if let Err(e) = self.db.append_audit(by, action, details, unix_now()).await {
            warn!(device = %entry.device, error = %e, "enrolment not written to the audit log");
        }
    }

    /// Every enrolment record.
    pub async fn enrolments(&self) -> Result<Vec<Enrolment>, DbError> {
        self.db.enrolments().await
    }

    /// An operator's `verdict` on `device`. Accepted (it must be pending), its CSR is signed
    /// and the certificate sent on its claim's reply topic at once; rejected (pending too), it
    /// is told so and every later request is refused; revoked (in any state), every
    /// certificate issued to it goes on the revocation list brokers read, the server
    /// quarantines it (what it sends is dropped; it is wrapped no content key) and every
    /// later request is refused.
    pub async fn decide_enrolment(
        &self,
        device: &str,
        verdict: Verdict,
        by: &str,
        reason: &str,
    ) -> Result<Enrolment, EnrolmentError> {
        let enroller = self.enroller.as_ref().ok_or(EnrolmentError::Disabled)?;
        let mut waiting = self.enrolling.lock().await;
        let mut entry = self
            .db
            .enrolment(device)
            .await?
            .ok_or_else(|| EnrolmentError::Unknown(device.into()))?;
        let pending = entry.state == EnrolState::Pending;
        if (verdict != Verdict::Revoke && !pending) || entry.state == EnrolState::Revoked {
            return Err(EnrolmentError::NotPending {
                device: device.into(),
                state: entry.state,
            });
        }
        let now = unix_now();
        entry.decided = Some(Decided {
            by: by.into(),
            at: now,
        });
        let reply = match verdict {
            Verdict::Accept => {
                let csr = entry.csr.clone();
                Some(sign_into(enroller, &mut entry, &csr, now)?)
            }
            Verdict::Reject => {
                entry.state = EnrolState::Rejected;
                Some(EnrolReply::Refused {
                    device: device.into(),
                    kind: Refused::Rejected,
                    reason: format!("{by} rejected this device"),
                })
            }
            Verdict::Revoke => {
                let serials: Vec<String> = entry
                    .certificates
                    .iter()
                    .map(|c| c.serial.clone())
                    .collect();
                crate::pki::revoke_serials(&enroller.pki_dir, device, &serials)?;
                entry.state = EnrolState::Revoked;
                let why = match reason.is_empty() {
                    true => "certificate revoked".to_string(),
                    false => format!("certificate revoked: {reason}"),
                };
                self.quarantine(
                    device,
                    Some(crate::db::Quarantine {
                        by: by.into(),
                        at: now,
                        reason: why,
                    }),
                )
                .await?;
                None
            }
        };
        self.db.put_enrolment(&entry).await?;
        self.db.flush().await?;
        // Counted again at the next request.
        if pending {
            *waiting = None;
        }
        self.audit(
            match verdict {
                Verdict::Accept => "device.enrol.accepted",
                Verdict::Reject => "device.enrol.rejected",
                Verdict::Revoke => "device.revoked",
            },
            &entry,
        )
        .await;
        info!(%device, %by, ?verdict, "enrolment decided");
        if let (Some(claim), Some(reply)) = (&entry.claim, reply) {
            self.answer(
                &self.topics.claim_reply(claim, &claim_client_id(device)),
                &reply,
            );
        }
        Ok(entry)
    }

    /// Whether this server enrols devices.
    pub fn enrols(&self) -> bool {
        self.enroller.is_some()
    }
}
