//! `modelcast`: the operators' command line — keys, publishing, deployments, rollouts, fleet
//! status.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use modelcast_ops::client::Client;
use modelcast_ops::convert::Choice;
use modelcast_ops::onnx;
use modelcast_ops::publish::{publish_file, Fallback, PublishOptions};
use modelcast_ops::shapes::ShapeSpec;
use modelcast_proto::desired::{SamplingSpec, TrialThresholds};
use modelcast_proto::manifest::LatencyBudget;
use modelcast_proto::report::Phase;
use modelcast_server::api::DeployRequest;
use modelcast_server::auth::{Role, Tokens};
use modelcast_server::group::Selector;
use modelcast_server::{keyset, unix_now};

mod publish;
mod rollout;

/// A published version and who acts on it.
#[derive(clap::Args, Debug)]
struct VersionArgs {
    /// Model name.
    #[arg(long)]
    model: String,
    /// Version.
    #[arg(long)]
    version: u64,
    /// Who acts.
    #[arg(long, env = "USER", default_value = "operator")]
    by: String,
}

/// The operators' offline keys that sign targets.
#[derive(clap::Args, Debug)]
struct SigningArgs {
    /// Directory with `root.json` and `targets.key` (or `targets-N.key`: all of them sign).
    #[arg(long, env = "MODELCAST_KEYS", default_value = "./keys")]
    keys: PathBuf,
    /// Sign with these targets key files instead (repeatable; a threshold of them).
    #[arg(long = "targets-key")]
    targets_keys: Vec<PathBuf>,
}

impl SigningArgs {
    /// The targets keys to sign with: the given files, or every `targets*.key` in `keys`.
    fn targets_keys(&self) -> anyhow::Result<Vec<modelcast_proto::keys::SigningKey>> {
        let read = if self.targets_keys.is_empty() {
            keyset::read_role_keys(&self.keys, "targets")?
        } else {
            self.targets_keys
                .iter()
                .map(|p| keyset::read_key(p))
                .collect::<Result<Vec<_>, _>>()?
        };
        if read.is_empty() {
            bail!("no targets key in {}", self.keys.display());
        }
        Ok(read)
    }

    /// The operators' own root (`root.json` in the key directory).
    fn root(&self) -> anyhow::Result<modelcast_proto::metadata::Signed> {
        Ok(keyset::read_root(&self.keys.join("root.json"))?)
    }
}

/// `modelcast token …`.
#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Add a token to a token file; prints the token (once).
    Create {
        /// The server's token file.
        #[arg(long)]
        file: PathBuf,
        /// Who holds it (recorded in the audit log).
        #[arg(long)]
        name: String,
        /// viewer, deployer or admin.
        #[arg(long)]
        role: Role,
    },
}

/// Operate a modelcast fleet.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// The fleet server's operator API.
    #[arg(
        long,
        global = true,
        env = "MODELCAST_SERVER",
        default_value = "http://127.0.0.1:7070"
    )]
    server: String,
    /// API token (`modelcast token create`), for a server run with `--tokens`.
    #[arg(long, global = true, env = "MODELCAST_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate root, targets and server keys and a signed root.json.
    Keygen {
        /// Output directory.
        #[arg(long, default_value = "./keys")]
        out: PathBuf,
        /// Number of root keys (`root-N.key` when more than one).
        #[arg(long, default_value_t = 1)]
        root_keys: usize,
        /// Root signatures required.
        #[arg(long, default_value_t = 1)]
        root_threshold: u32,
        /// Number of targets (publishing) keys.
        #[arg(long, default_value_t = 1)]
        targets_keys: usize,
        /// Targets signatures required.
        #[arg(long, default_value_t = 1)]
        targets_threshold: u32,
    },
    /// Operators' root metadata: inspect, rotate keys, sign with a threshold, push.
    #[command(subcommand)]
    Root(RootCommand),
    /// Generate one ed25519 key file (for adding to root); prints its public key.
    Key {
        /// Output file (hex secret, mode 0600).
        #[arg(long)]
        out: PathBuf,
    },
    /// The transport PKI: CA, broker and client certificates, mosquitto configuration.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Write a small real ONNX classifier (x: [1,4] → y: [1,3]); weights depend on the version.
    ExampleModel {
        /// Version (changes the weights).
        #[arg(long)]
        version: u64,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Approximate file size in bytes.
        #[arg(long, default_value_t = 64 * 1024)]
        size: u64,
    },
    /// Convert an ONNX file to the artifact devices receive and prove it, as `publish` does
    /// before signing: fails on anything publish would refuse.
    Convert {
        /// The ONNX file.
        model: PathBuf,
        /// Output file (`.nnef.tar`, or `.onnx` when the ONNX file ships).
        #[arg(long)]
        out: PathBuf,
        /// `auto` (NNEF where it proves out, else ONNX), `nnef` or `onnx`.
        #[arg(long, default_value = "auto")]
        format: Choice,
        /// Shape of an input with symbolic dimensions: `name=1..8,3,224,224` (repeatable;
        /// `a..b` a range, `?` any size, `@n` the size checked).
        #[arg(long = "input-shape")]
        input_shape: Vec<ShapeSpec>,
    },
    /// Sign a model version with the operators' targets key and upload it.
    Publish {
        /// The ONNX file.
        model: PathBuf,
        /// Model name.
        #[arg(long)]
        name: String,
        /// Version (greater than every published one).
        #[arg(long)]
        version: u64,
        #[command(flatten)]
        signing: SigningArgs,
        /// Who publishes (recorded in the registry).
        #[arg(long, env = "USER", default_value = "operator")]
        by: String,
        /// Registry metadata, `key=value` (repeatable).
        #[arg(long = "meta", value_parser = parse_kv)]
        meta: Vec<(String, String)>,
        /// Do not compute golden vectors.
        #[arg(long)]
        no_golden: bool,
        /// What devices receive: `nnef` (converted here; loads without an ONNX parser),
        /// `onnx` (the file as is; needs agents built with the `onnx` feature), or `auto`:
        /// NNEF where it converts and answers as the ONNX model does, else ONNX.
        #[arg(long, default_value = "auto")]
        format: Choice,
        /// Shape of an input with symbolic dimensions: `name=1..8,3,224,224` (repeatable;
        /// `a..b` a range, `?` any size, `@n` the size checked and used for golden vectors).
        /// A symbolic first dimension defaults to a batch of 1..8.
        #[arg(long = "input-shape")]
        input_shape: Vec<ShapeSpec>,
        /// Devices reject this version unless the p95 of their warm-up runs is within this
        /// many milliseconds (checked before the swap).
        #[arg(long)]
        p95_budget_ms: Option<f64>,
        /// Warm-up runs measured for the latency budget.
        #[arg(long, default_value_t = 20, requires = "p95_budget_ms")]
        warmup_runs: u32,
        /// The oldest version devices running this one may be sent back to by a fleet
        /// rollback (default: the oldest version a deployment still names, else the newest
        /// published before this one).
        #[arg(long, conflicts_with = "no_fallback")]
        fallback_to: Option<u64>,
        /// Devices running this version refuse every older one, fleet rollbacks included.
        #[arg(long)]
        no_fallback: bool,
    },
    /// Deploy a published version to a device group.
    Deploy {
        /// Model name.
        #[arg(long)]
        model: String,
        /// Version.
        #[arg(long)]
        version: u64,
        /// Label selector, e.g. `site=berlin,hw=jetson` (`*` for all).
        #[arg(long)]
        group: String,
        /// Who deploys.
        #[arg(long, env = "USER", default_value = "operator")]
        by: String,
        /// Probation for the devices this moves, overriding theirs.
        #[command(flatten)]
        probation: ProbationArgs,
        /// Sampling of inputs and outputs on the devices this moves (off by default).
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Roll a version out to a group in waves; watch, pause, resume, abort.
    #[command(subcommand)]
    Rollout(rollout::RolloutCommand),
    /// List devices with what they run, and what was dropped of their traffic.
    Devices {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Quarantine a device: everything it sends (reports, telemetry, chunk requests) is
    /// dropped unread until it is released. Written to the audit log.
    Quarantine {
        /// Device id.
        device: String,
        /// Release it instead.
        #[arg(long)]
        release: bool,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
        /// Who acts (a token's name wins).
        #[arg(long, default_value = "operator")]
        by: String,
    },
    /// Latency and error rate of a model (one version, or all) across a group of devices over
    /// a window, from the devices' telemetry.
    Telemetry {
        /// Model name.
        #[arg(long)]
        model: String,
        /// One version (all without it).
        #[arg(long)]
        version: Option<u64>,
        /// Label selector of the devices (all without it).
        #[arg(long)]
        group: Option<String>,
        /// The window: the last this long (`1h`, `30m`, `2d`).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        since: std::time::Duration,
        /// Width of the time series' steps (default: a sixtieth of the window).
        #[arg(long, value_parser = humantime::parse_duration)]
        step: Option<std::time::Duration>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Drift and anomaly alerts: per device, and per version (how many devices raise each).
    Alerts {
        /// One model's.
        #[arg(long)]
        model: Option<String>,
        /// One version's.
        #[arg(long, requires = "model")]
        version: Option<u64>,
        /// Cleared alerts too.
        #[arg(long)]
        all: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Download sampled inputs and outputs, one JSON object per line: the device, the
    /// version, when, and the inputs and outputs as Open Inference Protocol tensors (the
    /// inputs can be sent to `/v2/models/{name}/infer` as they are). Needs `deployer`.
    Samples {
        /// Model name.
        #[arg(long)]
        model: String,
        /// One version (all without it).
        #[arg(long)]
        version: Option<u64>,
        /// One device (all without it).
        #[arg(long)]
        device: Option<String>,
        /// The window: the last this long (`1h`, `30m`, `2d`).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        since: std::time::Duration,
        /// The newest this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// List published model versions.
    Models {
        /// One model's history: every version, its stage, the devices serving it.
        model: Option<String>,
    },
    /// Promote a version to production (the previous production version becomes a
    /// candidate again).
    Promote(VersionArgs),
    /// Retire a version: it can no longer be deployed or rolled out. With `--remove`, it
    /// also leaves the signed repository (its hash bin is re-signed without it), so devices'
    /// metadata no longer carries it; refused while a deployment or rollout names it.
    Retire {
        #[command(flatten)]
        version: VersionArgs,
        /// Remove the version from the signed repository too (needs the targets keys).
        #[arg(long)]
        remove: bool,
        #[command(flatten)]
        signing: SigningArgs,
    },
    /// Re-sign the top-level targets and every hash bin with fresh expiries (what operators
    /// sign lasts a year; `publish` and `retire --remove` refresh only what they touch).
    Resign {
        #[command(flatten)]
        signing: SigningArgs,
        /// Who signs.
        #[arg(long, env = "USER", default_value = "operator")]
        by: String,
    },
    /// API tokens for a server run with `--tokens FILE`.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The audit log: who published, deployed, rolled out, aborted, and when.
    Audit {
        /// From this position on.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Check that the log is one unbroken chain (every entry names its predecessor's
        /// digest).
        #[arg(long)]
        verify: bool,
    },
    /// Follow an update across a group until every device serves it (or fails).
    Status {
        /// Model name.
        #[arg(long)]
        model: String,
        /// Version to wait for.
        #[arg(long)]
        version: u64,
        /// Label selector.
        #[arg(long, default_value = "*")]
        group: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
}

#[derive(Subcommand, Debug)]
enum RootCommand {
    /// Print a root's version, expiry, roles, keys and thresholds.
    Show {
        /// The root file (default: the server's current root).
        root: Option<PathBuf>,
    },
    /// Write the next root version with keys added, revoked or thresholds changed
    /// (unsigned: sign it with `root sign` by a threshold of old and new root keys).
    Rotate {
        /// The current root (default: the server's, verified from `--trusted`).
        #[arg(long)]
        from: Option<PathBuf>,
        /// The operators' own root file, from which the server's chain is verified.
        #[arg(long, default_value = "./keys/root.json")]
        trusted: PathBuf,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Add a key: `ROLE=FILE` (a key file or a hex public key file; repeatable).
        #[arg(long = "add", value_parser = parse_kv)]
        add: Vec<(String, String)>,
        /// Revoke a key: `ROLE=KEYID` (a unique key id prefix is enough; repeatable).
        #[arg(long = "revoke", value_parser = parse_kv)]
        revoke: Vec<(String, String)>,
        /// Set a threshold: `ROLE=N` (repeatable).
        #[arg(long = "threshold", value_parser = parse_kv)]
        threshold: Vec<(String, String)>,
        /// Expiry in days from now.
        #[arg(long)]
        expires_days: Option<i64>,
    },
    /// Add the signature of one key file to a root (each holder signs in turn).
    Sign {
        /// The root file (signed in place).
        root: PathBuf,
        /// The key file.
        #[arg(long)]
        key: PathBuf,
    },
    /// Make the server trust the next root and send it to every device, with the targets
    /// re-signed by the given targets keys when those changed.
    Push {
        /// The signed next root.
        root: PathBuf,
        /// Targets key files to re-sign the current targets with (repeatable).
        #[arg(long = "targets-key")]
        targets_keys: Vec<PathBuf>,
        /// The operators' own root file, from which the server's targets are verified
        /// before they are re-signed.
        #[arg(long, default_value = "./keys/root.json")]
        trusted: PathBuf,
        /// Who rotates.
        #[arg(long, env = "USER", default_value = "operator")]
        by: String,
    },
}

/// Re-signs the top-level targets and every hash bin with `keys` (the repository verified
/// from the operators' `root`) and hands them to the server; returns how many bins.
fn resign(
    client: &Client,
    root: &modelcast_proto::metadata::Signed,
    keys: &[modelcast_proto::keys::SigningKey],
    by: String,
) -> anyhow::Result<usize> {
    let signers: Vec<_> = keys.iter().collect();
    let repo = modelcast_ops::signing::Repository::open(client, root)?;
    let upload = repo.resign(&signers, unix_now())?;
    let bins = upload.delegated.len();
    client.publish(&modelcast_server::api::PublishRequest {
        upload,
        published_by: by,
    })?;
    Ok(bins)
}

fn root_command(client: &Client, cmd: RootCommand) -> anyhow::Result<()> {
    use modelcast_proto::metadata::{Root, Signed, Targets};
    let load = |path: &Option<PathBuf>| -> anyhow::Result<Signed> {
        Ok(match path {
            Some(p) => keyset::read_root(p)?,
            None => client.root()?,
        })
    };
    let write = |path: &PathBuf, root: &Signed| -> anyhow::Result<()> {
        std::fs::write(path, serde_json::to_string_pretty(root)?)
            .with_context(|| format!("writing {}", path.display()))
    };
    match cmd {
        RootCommand::Show { root } => {
            let env = load(&root)?;
            let doc: Root = env.parse("root")?;
            println!("root version {} expires {}", doc.version, doc.expires);
            for (role, spec) in &doc.roles {
                println!(
                    "  {role}: {} of {} key(s)",
                    spec.threshold,
                    spec.keyids.len()
                );
                for id in &spec.keyids {
                    let signed = env.signatures.iter().any(|s| &s.keyid == id);
                    let mark = if role == "root" && signed {
                        " (signed this root)"
                    } else {
                        ""
                    };
                    println!("    {id}{mark}");
                }
            }
        }
        RootCommand::Rotate {
            from,
            trusted,
            out,
            add,
            revoke,
            threshold,
            expires_days,
        } => {
            let current = match &from {
                Some(p) => keyset::read_root(p)?,
                None => client.verified_root(&keyset::read_root(&trusted)?)?,
            };
            let change = keyset::RootChange {
                add: add
                    .into_iter()
                    .map(|(role, file)| Ok((role, keyset::read_public(file.as_ref())?)))
                    .collect::<anyhow::Result<_>>()?,
                revoke,
                thresholds: threshold
                    .into_iter()
                    .map(|(role, n)| Ok((role, n.parse()?)))
                    .collect::<anyhow::Result<_>>()?,
                expires: expires_days.map(|d| unix_now() + d * 24 * 3600),
            };
            let next = keyset::next_root(&current, &change, unix_now())?;
            write(&out, &next)?;
            let doc: Root = next.parse("root")?;
            println!(
                "{}: root version {} (unsigned): sign it with a threshold of the old and of the new root keys",
                out.display(),
                doc.version
            );
        }
        RootCommand::Sign { root, key } => {
            let mut env = keyset::read_root(&root)?;
            let key = keyset::read_key(&key)?;
            keyset::add_signature(&mut env, &key)?;
            write(&root, &env)?;
            println!("{}: {} signature(s)", root.display(), env.signatures.len());
        }
        RootCommand::Push {
            root,
            targets_keys,
            trusted,
            by,
        } => {
            let next = keyset::read_root(&root)?;
            let targets = if targets_keys.is_empty() {
                None
            } else {
                let keys = targets_keys
                    .iter()
                    .map(|p| keyset::read_key(p))
                    .collect::<Result<Vec<_>, _>>()?;
                let current = client
                    .verified_targets(&keyset::read_root(&trusted)?)?
                    .context("no targets published yet")?;
                let mut doc: Targets = current.parse("targets")?;
                doc.version += 1;
                let signers: Vec<_> = keys.iter().collect();
                Some(Signed::sign(&doc, &signers))
            };
            let new_keys = targets.is_some();
            let answer = client.rotate_root(&modelcast_server::api::RootRequest {
                root: next,
                targets,
                by: by.clone(),
            })?;
            println!("{answer}");
            if new_keys {
                // The bins follow the new targets keys at once: a revoked key signs nothing.
                let keys = targets_keys
                    .iter()
                    .map(|p| keyset::read_key(p))
                    .collect::<Result<Vec<_>, _>>()?;
                let bins = resign(client, &keyset::read_root(&trusted)?, &keys, by)?;
                println!("re-signed the top-level targets and {bins} bin(s) with the new keys");
            }
        }
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
enum PkiCommand {
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
    },
}

fn pki_command(cmd: PkiCommand) -> anyhow::Result<()> {
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
        PkiCommand::Mosquitto {
            dir,
            out,
            prefix,
            listen,
            port,
            server_identities,
        } => {
            std::fs::create_dir_all(&out)?;
            let acl_file = std::path::absolute(out.join("modelcast.acl"))?;
            let pki_dir = std::path::absolute(&dir)?;
            std::fs::write(&acl_file, acl::acl(&prefix, &server_identities))?;
            let conf = acl::mosquitto_conf(&acl::MosquittoSetup {
                listen_host: &listen,
                port,
                pki_dir: &pki_dir,
                acl_file: &acl_file,
            });
            let conf_file = out.join("modelcast.conf");
            std::fs::write(&conf_file, conf)?;
            println!("{} {}", conf_file.display(), acl_file.display());
        }
    }
    Ok(())
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

/// A deployment's probation thresholds (each overrides the device's setting).
#[derive(Debug, clap::Args)]
struct ProbationArgs {
    /// Requests after which a device judges the new version.
    #[arg(long)]
    probation_requests: Option<u32>,
    /// Seconds after which a device judges the new version, however few requests came.
    #[arg(long)]
    probation_seconds: Option<u64>,
    /// Largest failed-request rate tolerated above the previous version's (0.02 = 2 points).
    #[arg(long, value_parser = fraction)]
    max_error_rate: Option<f64>,
    /// Largest p99 latency tolerated, as a multiple of the previous version's (at least 1).
    #[arg(long, value_parser = ratio)]
    max_p99_ratio: Option<f64>,
}

/// A deployment's sampling of inputs and outputs: off unless `--sample-rate` is given.
#[derive(Debug, clap::Args)]
struct SamplingArgs {
    /// Fraction of requests each device keeps whole, inputs and outputs, and ships with its
    /// telemetry (0.001..1; 0.01 = one in a hundred). Off without it.
    #[arg(long, value_parser = fraction)]
    sample_rate: Option<f64>,
    /// Most bytes of samples a device holds for the model while they wait to be shipped
    /// (oldest dropped first).
    #[arg(long, default_value_t = 1024 * 1024, requires = "sample_rate")]
    sample_budget: u64,
}

impl SamplingArgs {
    fn spec(&self) -> anyhow::Result<Option<SamplingSpec>> {
        let Some(rate) = self.sample_rate else {
            return Ok(None);
        };
        let spec = SamplingSpec {
            rate_permille: (rate * 1000.0).round() as u32,
            budget_bytes: self.sample_budget,
        };
        spec.validate().map_err(anyhow::Error::msg)?;
        Ok(Some(spec))
    }
}

impl ProbationArgs {
    fn thresholds(&self) -> Option<TrialThresholds> {
        let t = TrialThresholds {
            requests: self.probation_requests,
            seconds: self.probation_seconds,
            max_error_permille: self.max_error_rate.map(|r| (r * 1000.0).round() as u32),
            max_p99_percent: self.max_p99_ratio.map(|r| (r * 100.0).round() as u32),
        };
        (!t.is_empty()).then_some(t)
    }
}

fn fraction(text: &str) -> Result<f64, String> {
    let v: f64 = text.parse().map_err(|e| format!("{e}"))?;
    (0.0..=1.0)
        .contains(&v)
        .then_some(v)
        .ok_or_else(|| "must be within 0..1".into())
}

fn ratio(text: &str) -> Result<f64, String> {
    let v: f64 = text.parse().map_err(|e| format!("{e}"))?;
    (1.0..=1000.0)
        .contains(&v)
        .then_some(v)
        .ok_or_else(|| "must be within 1..1000".into())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let client = Client::new(&cli.server).with_token(cli.token.clone());
    match cli.command {
        Command::Pki(cmd) => pki_command(cmd)?,
        Command::Root(cmd) => root_command(&client, cmd)?,
        Command::Key { out } => {
            let mut secret = [0u8; 32];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut secret);
            let key = modelcast_proto::keys::SigningKey::from_bytes(&secret);
            if out.exists() {
                bail!("{} exists; refusing to overwrite a key", out.display());
            }
            std::fs::write(&out, key.to_hex())?;
            std::fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            println!("{} {}", key.public().key_id(), key.public().keyval.public);
        }
        Command::Keygen {
            out,
            root_keys,
            root_threshold,
            targets_keys,
            targets_threshold,
        } => {
            let opts = keyset::KeygenOptions {
                root_keys,
                root_threshold,
                targets_keys,
                targets_threshold,
            };
            let director = keyset::keygen_with(&out, unix_now(), &opts)?;
            println!("keys written to {}", out.display());
            println!(
                "  root*.key, targets*.key  operators' offline keys ({root_threshold} of {root_keys} root, {targets_threshold} of {targets_keys} targets): keep them off the server"
            );
            println!(
                "  server.key             the server's online key (snapshot, timestamp, director)"
            );
            println!("  root.json              provision on every device");
            println!("director public key (pin in agent config): {director}");
        }
        Command::ExampleModel { version, out, size } => {
            let bytes = onnx::example_model_of_size(version, size);
            std::fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
            println!(
                "wrote {} ({} bytes, version {version})",
                out.display(),
                bytes.len()
            );
        }
        Command::Convert {
            model,
            out,
            format,
            input_shape,
        } => {
            let bytes =
                std::fs::read(&model).with_context(|| format!("reading {}", model.display()))?;
            let dir = model.parent().unwrap_or(std::path::Path::new("."));
            let bytes = onnx::self_contained(&bytes, dir)?;
            let mut opts = PublishOptions::new("convert", 1);
            opts.format = format;
            opts.shapes = input_shape;
            let prepared = modelcast_ops::publish::prepare(&bytes, &opts, unix_now())?;
            publish::report(&prepared);
            std::fs::write(&out, &prepared.artifact)
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "wrote {} ({} bytes {} from {} bytes ONNX)",
                out.display(),
                prepared.artifact.len(),
                prepared.manifest.model_format,
                bytes.len()
            );
        }
        Command::Publish {
            model,
            name,
            version,
            signing,
            by,
            meta,
            no_golden,
            format,
            p95_budget_ms,
            warmup_runs,
            fallback_to,
            no_fallback,
            input_shape,
        } => {
            let key = signing.targets_keys()?;
            let mut opts = PublishOptions::new(&name, version);
            opts.golden = !no_golden;
            opts.format = format;
            opts.metadata = meta.into_iter().collect();
            opts.fallback = match (fallback_to, no_fallback) {
                (_, true) => Fallback::Never,
                (Some(v), false) => Fallback::To(v),
                (None, false) => Fallback::InService,
            };
            if let Some(ms) = p95_budget_ms {
                if !(ms > 0.0 && ms.is_finite()) {
                    bail!("--p95-budget-ms must be a positive number of milliseconds");
                }
                opts.latency_budget = Some(LatencyBudget {
                    p95_us: (ms * 1000.0).round().max(1.0) as u64,
                    runs: warmup_runs,
                });
            }
            opts.shapes = input_shape;
            let root = signing.root()?;
            let prepared = publish_file(&client, &model, &opts, &key, &root, &by, unix_now())?;
            publish::report(&prepared);
            let manifest = prepared.manifest;
            println!(
                "published {name} v{version} as {}: {} bytes, {} chunk(s), sha256 {}…, {}",
                manifest.model_format,
                manifest.size,
                manifest.chunks.len(),
                &manifest.sha256[..16],
                match &manifest.golden_file {
                    Some(g) => format!("golden vector in a file of {} bytes beside it", g.size),
                    None => format!("{} golden vector(s) in the manifest", manifest.golden.len()),
                },
            );
        }
        Command::Deploy {
            model,
            version,
            group,
            by,
            probation,
            sampling,
        } => {
            let answer = client.deploy(&DeployRequest {
                model: model.clone(),
                version,
                group: group.clone(),
                by,
                probation: probation.thresholds(),
                sampling: sampling.spec()?,
            })?;
            println!(
                "deployed {model} v{version} to group '{group}': {} device(s) given a new desired state",
                answer["devices_updated"]
            );
        }
        Command::Rollout(command) => rollout::run(&client, command)?,
        Command::Token(TokenCommand::Create { file, name, role }) => {
            let mut tokens = Tokens::load(&file)?;
            let token = tokens.create(&name, role)?;
            tokens.save(&file)?;
            eprintln!(
                "token for {name} ({role}) added to {}; it is shown once:",
                file.display()
            );
            println!("{token}");
        }
        Command::Audit {
            since,
            json,
            verify,
        } => {
            let entries = client.audit(if verify { 0 } else { since })?;
            if verify {
                match modelcast_server::audit::verify_chain(&entries) {
                    Ok(()) => println!("audit log: {} entries, chain intact", entries.len()),
                    Err(e) => bail!("audit log chain broken: {e}"),
                }
            } else if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                for e in entries {
                    let at = time::OffsetDateTime::from_unix_timestamp(e.at)
                        .map(|t| t.format(&time::format_description::well_known::Rfc3339))
                        .ok()
                        .and_then(Result::ok)
                        .unwrap_or_else(|| e.at.to_string());
                    println!(
                        "{:>5}  {at}  {:<12} {:<16} {}",
                        e.seq, e.who, e.action, e.details
                    );
                }
            }
        }
        Command::Telemetry {
            model,
            version,
            group,
            since,
            step,
            json,
        } => {
            let question = modelcast_server::telemetry::Question {
                model,
                version,
                group,
                since_secs: since.as_secs().max(1),
                step_secs: step.map(|s| s.as_secs().max(1)),
            };
            let answer = client.telemetry(&question)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                print_telemetry(&answer);
            }
        }
        Command::Samples {
            model,
            version,
            device,
            since,
            limit,
            out,
        } => {
            let samples = client.samples(&modelcast_server::api::SampleRequest {
                model,
                version,
                device,
                since_secs: since.as_secs().max(1),
                limit,
            })?;
            let mut text = String::new();
            for s in &samples {
                text.push_str(&serde_json::to_string(&sample_line(s)?)?);
                text.push('\n');
            }
            match out {
                Some(path) => {
                    std::fs::write(&path, text)?;
                    eprintln!("{} sample(s) written to {}", samples.len(), path.display());
                }
                None => print!("{text}"),
            }
        }
        Command::Alerts {
            model,
            version,
            all,
            json,
        } => {
            let list = client.alerts(&modelcast_server::api::AlertQuery {
                model,
                version,
                all,
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            if list.alerts.is_empty() {
                println!("no {}alerts", if all { "" } else { "active " });
            }
            for v in &list.versions {
                let kinds: Vec<String> =
                    v.kinds.iter().map(|(k, n)| format!("{k} on {n}")).collect();
                println!(
                    "{} v{}: {} device(s) alerting: {}",
                    v.model,
                    v.version,
                    v.devices,
                    kinds.join(", ")
                );
            }
            for a in &list.alerts {
                let state = match a.cleared_ms {
                    None => "ACTIVE".to_string(),
                    Some(at) => format!("cleared {}", rfc3339_ms(at)),
                };
                println!(
                    "{:>5}  {}  {:<16} {} v{}  {:<24} {}  [{}; {} {:.3} > {:.3}]",
                    a.id,
                    rfc3339_ms(a.raised_ms),
                    a.device,
                    a.model,
                    a.version,
                    a.kind.to_string(),
                    a.message,
                    state,
                    a.test,
                    a.value,
                    a.threshold
                );
            }
        }
        Command::Devices { json } => {
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
        Command::Quarantine {
            device,
            release,
            reason,
            by,
        } => {
            client.quarantine(&device, !release, &reason, &by)?;
            match release {
                true => println!("{device} released"),
                false => println!("{device} quarantined: what it sends is dropped"),
            }
        }
        Command::Promote(VersionArgs { model, version, by }) => {
            client.stage_model(&model, version, "promote", &by)?;
            println!("{model} v{version} is in production");
        }
        Command::Resign { signing, by } => {
            let bins = resign(&client, &signing.root()?, &signing.targets_keys()?, by)?;
            println!("re-signed the top-level targets and {bins} bin(s)");
        }
        Command::Retire {
            version: VersionArgs { model, version, by },
            remove,
            signing,
        } => {
            if remove {
                let signers = signing.targets_keys()?;
                let path = client
                    .model_history(&model)?
                    .into_iter()
                    .find(|v| v.entry.manifest.version == version)
                    .with_context(|| format!("{model} v{version} is not published"))?
                    .entry
                    .manifest
                    .target_path();
                let root = signing.root()?;
                let repo = modelcast_ops::signing::Repository::open(&client, &root)?;
                let signers: Vec<_> = signers.iter().collect();
                let upload = repo.remove(&path, &signers, unix_now())?;
                client.publish(&modelcast_server::api::PublishRequest {
                    upload,
                    published_by: by.clone(),
                })?;
                println!("{path} removed from the repository");
            }
            client.stage_model(&model, version, "retire", &by)?;
            println!("{model} v{version} is retired");
        }
        Command::Models { model: Some(name) } => {
            println!(
                "{:>7} {:<11} {:>12} {:<20} {:>8}  devices",
                "version", "stage", "bytes", "published", "serving"
            );
            for v in client.model_history(&name)? {
                let m = &v.entry.manifest;
                let at = time::OffsetDateTime::from_unix_timestamp(v.entry.published_at)
                    .ok()
                    .and_then(|t| {
                        t.format(&time::format_description::well_known::Rfc3339)
                            .ok()
                    })
                    .unwrap_or_default();
                let mut shown: Vec<&str> = v.devices.iter().map(String::as_str).take(5).collect();
                if v.devices.len() > 5 {
                    shown.push("…");
                }
                println!(
                    "{:>7} {:<11} {:>12} {:<20} {:>8}  {}",
                    m.version,
                    format!("{:?}", v.entry.stage).to_lowercase(),
                    m.size,
                    at,
                    v.devices.len(),
                    shown.join(" ")
                );
            }
        }
        Command::Models { model: None } => {
            println!(
                "{:<16} {:>7} {:>12} {:<18} {:<12} metadata",
                "model", "version", "bytes", "sha256", "by"
            );
            for m in client.models()? {
                let meta: Vec<String> = m
                    .manifest
                    .metadata
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                println!(
                    "{:<16} {:>7} {:>12} {:<18} {:<12} {}",
                    m.manifest.name,
                    m.manifest.version,
                    m.manifest.size,
                    &m.manifest.sha256[..16],
                    m.published_by,
                    meta.join(",")
                );
            }
        }
        Command::Status {
            model,
            version,
            group,
            timeout,
        } => follow(&client, &model, version, &group, timeout)?,
    }
    Ok(())
}

/// Shows one progress bar per device of the group until every one serves `version`.
fn follow(
    client: &Client,
    model: &str,
    version: u64,
    group: &str,
    timeout: u64,
) -> anyhow::Result<()> {
    let selector = Selector::parse(group)?;
    let bars = MultiProgress::new();
    let style =
        ProgressStyle::with_template("{prefix:<14} [{bar:32}] {bytes:>10}/{total_bytes:<10} {msg}")
            .expect("valid template")
            .progress_chars("=> ");
    let mut shown: BTreeMap<String, ProgressBar> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(timeout);
    loop {
        let devices: Vec<_> = client
            .devices()?
            .into_iter()
            .filter(|d| selector.matches(&d.labels))
            .collect();
        let mut done = 0;
        let mut failed = 0;
        for d in &devices {
            let bar = shown.entry(d.id.clone()).or_insert_with(|| {
                let b = bars.add(ProgressBar::new(1));
                b.set_style(style.clone());
                b.set_prefix(d.id.clone());
                b
            });
            let state = d.report.as_ref().and_then(|r| r.models.get(model));
            let serving = state.and_then(|s| s.serving_version());
            let update = state
                .and_then(|s| s.update.as_ref())
                .filter(|u| u.version == version);
            if let Some(u) = update {
                bar.set_length(u.total_bytes.max(1));
                bar.set_position(u.received_bytes);
            }
            let on_trial = update.is_some_and(|u| u.phase == Phase::Probation);
            if serving == Some(version) {
                bar.set_length(bar.length().unwrap_or(1).max(1));
                bar.set_position(bar.length().unwrap_or(1));
                bar.set_message(if on_trial {
                    format!("serving v{version} (on probation)")
                } else {
                    format!("serving v{version}")
                });
                done += 1;
            } else if let Some(u) = update {
                let reason = d
                    .report
                    .as_ref()
                    .and_then(|r| r.last_error.as_ref())
                    .map(|e| e.reason.clone())
                    .unwrap_or_default();
                bar.set_message(match u.phase {
                    Phase::Downloading => "downloading".to_string(),
                    Phase::Staging => "verifying, loading, checking golden vectors".to_string(),
                    Phase::Probation | Phase::Active => format!("serving v{version}"),
                    Phase::Failed => format!("FAILED: {reason}"),
                });
                if u.phase == Phase::Failed {
                    failed += 1;
                }
            } else {
                bar.set_message(format!(
                    "waiting (serving {})",
                    serving.map_or("-".into(), |v| format!("v{v}"))
                ));
            }
        }
        if !devices.is_empty() && done + failed == devices.len() {
            for b in shown.values() {
                b.finish();
            }
            if failed > 0 {
                bail!(
                    "{failed} of {} device(s) failed to install {model} v{version}",
                    devices.len()
                );
            }
            println!(
                "all {} device(s) in '{group}' serve {model} v{version}",
                devices.len()
            );
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "timed out: {done} of {} device(s) serve {model} v{version}",
                devices.len()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A telemetry answer as a table: the window, each version, then each step with requests.
fn print_telemetry(a: &modelcast_server::telemetry::Answer) {
    use modelcast_server::telemetry::Totals;
    let q = &a.question;
    println!(
        "{} {} on {} over the last {}: {} devices, {} reports",
        q.model,
        q.version
            .map_or("(all versions)".into(), |v| format!("v{v}")),
        q.group.as_deref().unwrap_or("every device"),
        humantime::format_duration(std::time::Duration::from_secs(q.since_secs)),
        a.devices,
        a.points
    );
    let row = |what: &str, t: &Totals| {
        let (p50, p95, p99) = t
            .latency_us
            .map_or(("-".into(), "-".into(), "-".into()), |l| {
                let ms = |us: u64| format!("{:.3}", us as f64 / 1000.0);
                (ms(l.p50), ms(l.p95), ms(l.p99))
            });
        println!(
            "{what:<22} {:>10} {:>8} {:>9.4}% {:>9} {:>9} {:>9} {:>6}",
            t.requests,
            t.errors,
            t.error_rate * 100.0,
            p50,
            p95,
            p99,
            t.non_finite
        );
    };
    println!(
        "{:<22} {:>10} {:>8} {:>10} {:>9} {:>9} {:>9} {:>6}",
        "", "requests", "errors", "error rate", "p50 ms", "p95 ms", "p99 ms", "NaN"
    );
    row("window", &a.totals);
    for (v, t) in &a.versions {
        row(&format!("  v{v}"), t);
    }
    for s in a.series.iter().filter(|s| s.totals.requests > 0) {
        let at = time::OffsetDateTime::from_unix_timestamp(s.at_ms / 1000)
            .ok()
            .and_then(|t| {
                t.format(time::macros::format_description!(
                    "[year]-[month]-[day] [hour]:[minute]:[second]"
                ))
                .ok()
            })
            .unwrap_or_else(|| s.at_ms.to_string());
        row(&at, &s.totals);
    }
}

/// Unix milliseconds as RFC 3339 (UTC, seconds).
fn rfc3339_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

/// One sample as a line of `modelcast samples`: tensors as the Open Inference Protocol writes
/// them (numbers, not the stored little-endian hex).
fn sample_line(s: &modelcast_server::db::StoredSample) -> anyhow::Result<serde_json::Value> {
    let tensors = |ts: &[modelcast_proto::manifest::TensorData]| -> anyhow::Result<Vec<_>> {
        ts.iter()
            .map(|t| {
                Ok(serde_json::json!({
                    "name": t.name,
                    "datatype": t.datatype,
                    "shape": t.shape,
                    "data": modelcast_agent::kserve::data_value(
                        &modelcast_agent::engine::HostTensor::from_data(t)?.values
                    ),
                }))
            })
            .collect()
    };
    let x = &s.sample;
    Ok(serde_json::json!({
        "device": s.device,
        "model": x.model,
        "version": x.version,
        "slot": x.slot,
        "id": x.id,
        "at_ms": x.at_ms,
        "inputs": tensors(&x.inputs)?,
        "outputs": tensors(&x.outputs)?,
    }))
}
