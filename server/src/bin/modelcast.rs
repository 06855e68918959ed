//! `modelcast`: the operators' command line — keys, publishing, deployments, fleet status.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use modelcast_proto::manifest::ModelFormat;
use modelcast_proto::report::Phase;
use modelcast_server::api::DeployRequest;
use modelcast_server::client::Client;
use modelcast_server::group::Selector;
use modelcast_server::publish::{publish_file, PublishOptions};
use modelcast_server::{keyset, onnx, unix_now};

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
    },
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
    /// Convert an ONNX file to the NNEF tar devices receive (what `publish` does before signing).
    Convert {
        /// The ONNX file.
        model: PathBuf,
        /// Output file (`.nnef.tar`).
        #[arg(long)]
        out: PathBuf,
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
        /// Directory with `targets.key`.
        #[arg(long, env = "MODELCAST_KEYS", default_value = "./keys")]
        keys: PathBuf,
        /// Who publishes (recorded in the registry).
        #[arg(long, env = "USER", default_value = "operator")]
        by: String,
        /// Registry metadata, `key=value` (repeatable).
        #[arg(long = "meta", value_parser = parse_kv)]
        meta: Vec<(String, String)>,
        /// Do not compute golden vectors.
        #[arg(long)]
        no_golden: bool,
        /// What devices receive: `nnef` (converted here; loads without an ONNX parser) or
        /// `onnx` (the file as is; needs agents built with the `onnx` feature).
        #[arg(long, default_value = "nnef")]
        format: ModelFormat,
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
    },
    /// List devices with what they run.
    Devices {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List published model versions.
    Models,
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

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let client = Client::new(&cli.server);
    match cli.command {
        Command::Keygen { out } => {
            let director = keyset::keygen(&out, unix_now())?;
            println!("keys written to {}", out.display());
            println!("  root.key, targets.key  operators' offline keys: keep them off the server");
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
        Command::Convert { model, out } => {
            let bytes =
                std::fs::read(&model).with_context(|| format!("reading {}", model.display()))?;
            let info = onnx::inspect(&bytes)?;
            let nnef = onnx::to_nnef(&bytes, &info.inputs)?;
            std::fs::write(&out, &nnef).with_context(|| format!("writing {}", out.display()))?;
            println!(
                "wrote {} ({} bytes NNEF from {} bytes ONNX)",
                out.display(),
                nnef.len(),
                bytes.len()
            );
        }
        Command::Publish {
            model,
            name,
            version,
            keys,
            by,
            meta,
            no_golden,
            format,
        } => {
            let key = keyset::read_key(&keys.join("targets.key"))?;
            let mut opts = PublishOptions::new(&name, version);
            opts.golden = !no_golden;
            opts.format = format;
            opts.metadata = meta.into_iter().collect();
            let manifest = publish_file(&client, &model, &opts, &key, &by, unix_now())?;
            println!(
                "published {name} v{version} as {}: {} bytes, {} chunk(s), sha256 {}…, {} golden vector(s)",
                manifest.model_format,
                manifest.size,
                manifest.chunks.len(),
                &manifest.sha256[..16],
                manifest.golden.len(),
            );
        }
        Command::Deploy {
            model,
            version,
            group,
            by,
        } => {
            let answer = client.deploy(&DeployRequest {
                model: model.clone(),
                version,
                group: group.clone(),
                by,
            })?;
            println!(
                "deployed {model} v{version} to group '{group}': {} device(s) given a new desired state",
                answer["devices_updated"]
            );
        }
        Command::Devices { json } => {
            let devices = client.devices()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&devices)?);
                return Ok(());
            }
            println!(
                "{:<16} {:<8} {:<28} {:<28} last error",
                "device", "online", "labels", "serving"
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
                println!(
                    "{:<16} {:<8} {:<28} {:<28} {}",
                    d.id,
                    d.online,
                    labels.join(","),
                    serving,
                    error
                );
            }
        }
        Command::Models => {
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
