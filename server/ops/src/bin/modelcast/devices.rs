//! `modelcast devices …`: the device list, and what operators do to one device — revoke it,
//! or decide on its enrolment by claim (list, accept, reject).

use clap::Subcommand;
use modelcast_ops::client::Client;

use crate::monitoring::rfc3339_ms;

/// What `modelcast devices` does to one device.
#[derive(Subcommand, Debug)]
pub(crate) enum DeviceAction {
    /// Revoke a device: its certificates go on the revocation list the broker reads
    /// (`crl.pem` in the PKI directory), and the server quarantines it (what it sends is
    /// dropped; it is wrapped no content key of an encrypted version). A device enrolled by
    /// claim is revoked by the server, which signed its certificates; one whose certificate
    /// was made by hand (`modelcast pki issue`), with `--pki`.
    Revoke {
        /// Device id.
        device: String,
        /// PKI directory with the CA key, for a certificate made by hand.
        #[arg(long)]
        pki: Option<std::path::PathBuf>,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
        /// Who acts (a token's name wins).
        #[arg(long, default_value = "operator")]
        by: String,
    },
    /// Devices that asked to enrol by claim: pending, enrolled, rejected, revoked.
    Enrolments,
    /// Let a device waiting for a decision in: the server signs its request and sends it
    /// its certificate at once.
    Accept {
        /// Device id.
        device: String,
        /// Who acts (a token's name wins).
        #[arg(long, default_value = "operator")]
        by: String,
    },
    /// Keep a device waiting for a decision out: it is told so, and refused from then on.
    Reject {
        /// Device id.
        device: String,
        /// Who acts (a token's name wins).
        #[arg(long, default_value = "operator")]
        by: String,
    },
}

/// Runs `modelcast devices` (with `--json`, the list as JSON) or one of its actions.
pub(crate) fn devices_command(
    client: &Client,
    json: bool,
    action: Option<DeviceAction>,
) -> anyhow::Result<()> {
    match action {
        Some(DeviceAction::Revoke {
            device,
            pki,
            reason,
            by,
        }) => {
            // The broker refuses its certificate (from the list it reads), the server drops
            // what it sends and wraps it no content key.
            let Some(pki) = pki else {
                let entry = client.decide_enrolment(&device, "revoke", &reason, &by)?;
                println!(
                    "{device} revoked: the server's revocation list lists its {} certificate(s) (the broker refuses it once it reads the list again); the server drops what it sends and wraps it no key",
                    entry.certificates.len()
                );
                return Ok(());
            };
            let revoked = modelcast_server::pki::revoke(&pki, Some(&device))?;
            let reason = match reason.is_empty() {
                true => "certificate revoked".to_string(),
                false => format!("certificate revoked: {reason}"),
            };
            client.quarantine(&device, true, &reason, &by)?;
            println!(
                "{device} revoked: {} lists {} certificate(s) (the broker refuses it once it reads the list again); the server drops what it sends and wraps it no key",
                pki.join(modelcast_server::pki::CRL_FILE).display(),
                revoked.len()
            );
        }
        Some(DeviceAction::Enrolments) => {
            let list = client.enrolments()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            println!(
                "{:<16} {:<9} {:<12} {:<28} {:<26} decided by",
                "device", "state", "claim", "labels", "certificate until"
            );
            for e in list {
                let labels: Vec<String> =
                    e.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let until = e
                    .certificates
                    .last()
                    .map_or("-".to_string(), |c| rfc3339_ms(c.not_after * 1000));
                println!(
                    "{:<16} {:<9} {:<12} {:<28} {:<26} {}",
                    e.device,
                    format!("{:?}", e.state).to_lowercase(),
                    e.claim.as_deref().unwrap_or("-"),
                    labels.join(","),
                    until,
                    e.decided.as_ref().map_or("-", |d| d.by.as_str())
                );
            }
        }
        Some(DeviceAction::Accept { device, by }) => {
            let e = client.decide_enrolment(&device, "accept", "", &by)?;
            let until = e.certificates.last().map_or(0, |c| c.not_after);
            println!(
                "{device} accepted: certificate sent, valid until {}",
                rfc3339_ms(until * 1000)
            );
        }
        Some(DeviceAction::Reject { device, by }) => {
            client.decide_enrolment(&device, "reject", "", &by)?;
            println!("{device} rejected: told so, and refused from now on");
        }
        None => {
            let devices = client.devices()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&devices)?);
                return Ok(());
            }
            println!(
                "{:<16} {:<8} {:<28} {:<28} {:<24} last error",
                "device", "online", "labels", "serving", "dropped"
            );
            for d in devices {
                let labels: Vec<String> =
                    d.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let (serving, error) = match &d.report {
                    Some(r) => (
                        r.models
                            .iter()
                            .map(|(n, s)| match (s.serving_version(), s.active) {
                                (Some(v), Some(slot)) => format!("{n} v{v} ({slot})"),
                                _ => format!("{n} -"),
                            })
                            .collect::<Vec<_>>()
                            .join(" "),
                        r.last_error
                            .as_ref()
                            .map(|e| e.reason.clone())
                            .unwrap_or_default(),
                    ),
                    None => (String::new(), String::new()),
                };
                let online = match (&d.quarantine, d.online) {
                    (Some(_), _) => "quarantined",
                    (None, true) => "true",
                    (None, false) => "false",
                };
                let dropped: Vec<String> =
                    d.dropped.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!(
                    "{:<16} {:<8} {:<28} {:<28} {:<24} {}",
                    d.id,
                    online,
                    labels.join(","),
                    serving,
                    dropped.join(","),
                    error
                );
            }
        }
    }
    Ok(())
}
