//! `modelcast pki …`: the transport PKI (CA, broker and device certificates) and the mosquitto
//! configuration that confines each device to its own topics.

use std::path::PathBuf;

use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub(crate) enum PkiCommand {
    /// Create a CA, the broker's certificate and the fleet server's client certificate.
    Init {
        /// PKI directory.
        #[arg(long, default_value = "./pki")]
        dir: PathBuf,
        /// Host names or IP addresses devices use to reach the broker (repeatable).
        #[arg(long = "broker-name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        broker_names: Vec<String>,
    },
    /// Issue a client certificate; its common name is the device id (or a server replica's
    /// identity).
    Issue {
        /// PKI directory.
        #[arg(long, default_value = "./pki")]
        dir: PathBuf,
        /// The identity (device id).
        name: String,
    },
    /// Revoke a client certificate: it is added to the revocation list (`crl.pem`, signed by
    /// the CA), which the generated mosquitto configuration reads (`crlfile`; restart or
    /// signal the broker to read it again). Without a name, the list is issued again as it is
    /// (it is valid for a year).
    Revoke {
        /// PKI directory (with the CA key).
        #[arg(long, default_value = "./pki")]
        dir: PathBuf,
        /// The identity (device id) whose certificate is revoked.
        name: Option<String>,
    },
    /// Write a mosquitto configuration and ACL confining each device to its own topics.
    Mosquitto {
        /// PKI directory (as the broker will see it).
        #[arg(long, default_value = "./pki")]
        dir: PathBuf,
        /// Output directory for `modelcast.conf` and `modelcast.acl`.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Topic prefix.
        #[arg(long, default_value = "modelcast")]
        prefix: String,
        /// Listen address.
        #[arg(long, default_value = "0.0.0.0")]
        listen: String,
        /// Port.
        #[arg(long, default_value_t = 8883)]
        port: u16,
        /// Identities of the fleet server and its replicas (repeatable).
        #[arg(long = "server-identity", default_values_t = [modelcast_server::pki::SERVER_IDENTITY.to_string()])]
        server_identities: Vec<String>,
        /// A second listener on this port for devices enrolling by claim (needs the claim CA:
        /// `modelcast pki claim` first); writes `modelcast-claims.acl` beside.
        #[arg(long)]
        claim_port: Option<u16>,
    },
    /// Issue the claim credential of a batch of devices (`claim-<batch>.pem`/`.key`, signed
    /// by the claim CA, made on first use): device images carry it, and with it a device may
    /// only ask the fleet server (`--enrol`) for a certificate of its own.
    Claim {
        /// PKI directory.
        #[arg(long, default_value = "./pki")]
        dir: PathBuf,
        /// The batch's name (the claim's common name, which `--enrol-auto claim=<batch>`
        /// matches).
        batch: String,
    },
}

pub(crate) fn pki_command(cmd: PkiCommand) -> anyhow::Result<()> {
    use modelcast_server::{acl, pki};
    match cmd {
        PkiCommand::Init { dir, broker_names } => {
            pki::init(&dir, &broker_names)?;
            println!(
                "{}: ca.pem, ca.key (keep offline), broker.pem/.key for {}, {}.pem/.key",
                dir.display(),
                broker_names.join(", "),
                pki::SERVER_IDENTITY
            );
        }
        PkiCommand::Issue { dir, name } => {
            let id = pki::issue(&dir, &name)?;
            println!("{} {}", id.cert.display(), id.key.display());
        }
        PkiCommand::Claim { dir, batch } => {
            let id = pki::claim(&dir, &batch)?;
            println!(
                "{} {} (trusted by brokers through {})",
                id.cert.display(),
                id.key.display(),
                dir.join(pki::CLAIM_CA_FILE).display()
            );
        }
        PkiCommand::Revoke { dir, name } => {
            let revoked = pki::revoke(&dir, name.as_deref())?;
            println!(
                "{}: {} certificate(s) revoked ({})",
                dir.join(pki::CRL_FILE).display(),
                revoked.len(),
                revoked
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        PkiCommand::Mosquitto {
            dir,
            out,
            prefix,
            listen,
            port,
            server_identities,
            claim_port,
        } => {
            std::fs::create_dir_all(&out)?;
            let acl_file = std::path::absolute(out.join("modelcast.acl"))?;
            let pki_dir = std::path::absolute(&dir)?;
            std::fs::write(&acl_file, acl::acl(&prefix, &server_identities))?;
            let claim_acl = match claim_port {
                Some(_) => {
                    let path = std::path::absolute(out.join("modelcast-claims.acl"))?;
                    std::fs::write(&path, acl::claim_acl(&prefix))?;
                    Some(path)
                }
                None => None,
            };
            let conf = acl::mosquitto_conf(&acl::MosquittoSetup {
                listen_host: &listen,
                port,
                pki_dir: &pki_dir,
                acl_file: &acl_file,
                claims: claim_acl.as_deref().zip(claim_port).map(|(a, p)| (p, a)),
            });
            let conf_file = out.join("modelcast.conf");
            std::fs::write(&conf_file, conf)?;
            println!("{} {}", conf_file.display(), acl_file.display());
        }
    }
    Ok(())
}
