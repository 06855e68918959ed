//! `modelcast`: the operators' command line — keys, publishing, deployments, rollouts, fleet
//! status.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use modelcast_ops::client::Client;
use modelcast_ops::convert::Choice;
use modelcast_ops::onnx;
use modelcast_ops::publish::{publish_file, Fallback, PublishOptions};
use modelcast_ops::shapes::ShapeSpec;
use modelcast_proto::desired::{
    CanarySpec, DownloadPolicy, SamplingSpec, ShadowSpec, TrialThresholds, WindowMode,
};
use modelcast_proto::manifest::LatencyBudget;
use modelcast_server::api::DeployRequest;
use modelcast_server::auth::{Role, Tokens};
use modelcast_server::{keyset, unix_now};

mod devices;
mod monitoring;
mod pki;
mod publish;
mod repository;
mod rollout;

use devices::{devices_command, DeviceAction};
use monitoring::{follow, print_telemetry, rfc3339_ms, sample_line};
use pki::{pki_command, PkiCommand};
use repository::{resign, root_command, RootCommand};

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
        /// Carry the ONNX file as a second form beside the NNEF artifact, for devices that
        /// run ONNX Runtime (`[engine] backend = "onnxruntime"` or `"auto"`): each device
        /// downloads only the form it runs.
        #[arg(long)]
        with_onnx: bool,
        /// The golden vectors' tolerance on one backend, `backend=value` (repeatable), e.g.
        /// `onnxruntime=1e-3`: another engine rounds differently than tract, which computed
        /// them (default: 1e-4 on every backend).
        #[arg(long = "tolerance", value_parser = parse_kv)]
        tolerance: Vec<(String, String)>,
        /// Encrypt the model with a fresh key: the server, the broker and the devices' disks
        /// hold ciphertext; each device the version is sent to receives the key sealed to its
        /// own (see docs/security.md).
        #[arg(long)]
        encrypt: bool,
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
        /// A shadow phase on each device before the version serves (off by default).
        #[command(flatten)]
        shadow: ShadowArgs,
        /// A traffic split on each device while the version is on probation (off by default).
        #[command(flatten)]
        canary: CanaryArgs,
        /// When and how fast the devices this moves download and activate it.
        #[command(flatten)]
        download: DownloadArgs,
        /// Run the version on this backend (`tract`, `onnxruntime`) on the devices it moves,
        /// in place of their configured choice (a device without that backend keeps its own).
        #[arg(long)]
        backend: Option<modelcast_proto::engine::Backend>,
    },
    /// Roll a version out to a group in waves; watch, pause, resume, abort.
    #[command(subcommand)]
    Rollout(rollout::RolloutCommand),
    /// List devices with what they run, and what was dropped of their traffic; or act on one.
    Devices {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<DeviceAction>,
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

/// A shadow phase: the new version answers a share of live requests beside the serving one,
/// off the serving path, and swaps in only if its answers agree. Off unless `--shadow` is
/// given.
#[derive(Debug, clap::Args)]
struct ShadowArgs {
    /// Answers each device compares before the version may serve.
    #[arg(long)]
    shadow: Option<u32>,
    /// Longest shadow phase, seconds (judged on what was compared by then).
    #[arg(long, default_value_t = 3600, requires = "shadow")]
    shadow_seconds: u64,
    /// Share of live requests mirrored to the candidate (0.01..1).
    #[arg(long, value_parser = fraction, default_value_t = 0.1, requires = "shadow")]
    shadow_sample: f64,
    /// Most CPU the candidate may take, as a share of one core (0.01..1).
    #[arg(long, value_parser = fraction, default_value_t = 0.5, requires = "shadow")]
    shadow_cpu: f64,
    /// Least argmax agreement on classifier outputs (0..1).
    #[arg(long, value_parser = fraction, default_value_t = 0.99, requires = "shadow")]
    shadow_min_agreement: f64,
    /// Largest mean absolute difference allowed on any output.
    #[arg(long, requires = "shadow")]
    shadow_max_mean_diff: Option<f64>,
    /// Largest Kolmogorov–Smirnov distance on regressor outputs (0..1).
    #[arg(long, value_parser = fraction, default_value_t = 0.2, requires = "shadow")]
    shadow_max_ks: f64,
    /// Largest candidate p99 latency, as a multiple of the serving model's (at least 1).
    #[arg(long, value_parser = ratio, requires = "shadow")]
    shadow_max_p99_ratio: Option<f64>,
}

impl ShadowArgs {
    fn spec(&self) -> anyhow::Result<Option<ShadowSpec>> {
        let Some(requests) = self.shadow else {
            return Ok(None);
        };
        if self
            .shadow_max_mean_diff
            .is_some_and(|d| !d.is_finite() || d < 0.0)
        {
            anyhow::bail!("--shadow-max-mean-diff must be a number of 0 or more");
        }
        let spec = ShadowSpec {
            requests,
            seconds: self.shadow_seconds,
            sample_percent: (self.shadow_sample * 100.0).round() as u32,
            cpu_percent: (self.shadow_cpu * 100.0).round() as u32,
            min_agreement_permille: (self.shadow_min_agreement * 1000.0).round() as u32,
            max_mean_abs_diff_millionths: self
                .shadow_max_mean_diff
                .map(|d| (d * 1e6).round() as u64),
            max_ks_permille: (self.shadow_max_ks * 1000.0).round() as u32,
            max_p99_percent: self
                .shadow_max_p99_ratio
                .map(|r| (r * 100.0).round() as u32),
        };
        spec.validate()?;
        Ok(Some(spec))
    }
}

/// A traffic split: while on probation, the new version answers a share of the requests
/// beside the last good one, judged on that share alone, and takes all traffic once
/// probation commits it. Off unless `--canary` is given.
#[derive(Debug, clap::Args)]
struct CanaryArgs {
    /// Share of requests the new version answers on each device (`10%`, or `0.1`).
    #[arg(long, value_parser = share)]
    canary: Option<u32>,
    /// A request header whose value keeps each client on one version (sticky); requests
    /// without it are split by count.
    #[arg(long, requires = "canary")]
    canary_key: Option<String>,
}

impl CanaryArgs {
    fn spec(&self) -> anyhow::Result<Option<CanarySpec>> {
        let Some(percent) = self.canary else {
            return Ok(None);
        };
        let spec = CanarySpec {
            percent,
            key: self.canary_key.as_ref().map(|k| k.to_ascii_lowercase()),
        };
        spec.validate()?;
        Ok(Some(spec))
    }
}

/// A share as a whole percent: `10%` or `0.1`.
fn share(text: &str) -> Result<u32, String> {
    let percent = match text.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map_err(|e| format!("{e}"))?,
        None => text.parse::<f64>().map_err(|e| format!("{e}"))? * 100.0,
    };
    let rounded = percent.round();
    if !(1.0..=99.0).contains(&rounded) || (percent - rounded).abs() > 1e-9 {
        return Err("must be a whole percent within 1%..99% (10%, or 0.1)".into());
    }
    Ok(rounded as u32)
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

/// A deployment's download policy: any time, at any rate, not over metered links, unless
/// these say otherwise.
#[derive(Debug, clap::Args)]
struct DownloadArgs {
    /// Largest download rate per device, bytes a second (`500k`, `2M`, `1MiB`: k, M, G are
    /// powers of 1000, KiB, MiB, GiB of 1024).
    #[arg(long, value_parser = byte_rate)]
    max_rate: Option<u64>,
    /// Maintenance window, in the device's local time unless --window-utc-offset is given:
    /// `mon-fri 02:00-04:00`, `daily 22:00-02:00`, several joined by `;`.
    #[arg(long)]
    window: Option<String>,
    /// What the window holds back: `activate` (download any time, activate only in the
    /// window) or `download` (download and activate only in the window).
    #[arg(long, default_value = "activate", value_parser = window_mode, requires = "window")]
    window_mode: WindowMode,
    /// Read the window at this offset from UTC (`+02:00`, `-05:30`) instead of the device's
    /// time zone.
    #[arg(long, value_parser = utc_offset, requires = "window", allow_hyphen_values = true)]
    window_utc_offset: Option<i32>,
    /// Devices may download it over a metered link.
    #[arg(long)]
    metered: bool,
    /// Devices fetch the chunks over HTTP(S) from this base URL, where every file of the
    /// download is served by its SHA-256 with range requests (this server's
    /// `http://HOST:PORT/files`, or a static host or CDN holding copies); MQTT carries them
    /// when that fails.
    #[arg(long, value_name = "URL")]
    http: Option<String>,
}

impl DownloadArgs {
    fn policy(&self) -> anyhow::Result<Option<DownloadPolicy>> {
        let policy = DownloadPolicy {
            max_rate: self.max_rate,
            window: self
                .window
                .as_deref()
                .map(modelcast_proto::window::MaintenanceWindow::parse)
                .transpose()?,
            window_mode: self.window_mode,
            utc_offset_minutes: self.window_utc_offset,
            metered: self.metered,
            http: self.http.clone(),
        };
        policy.validate()?;
        Ok((!policy.is_default()).then_some(policy))
    }
}

/// `500k`, `2M`, `1MiB`, `4096` as bytes.
fn byte_rate(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{text:?} is not a number of bytes"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "k" | "K" | "kB" => 1000,
        "M" | "MB" => 1000 * 1000,
        "G" | "GB" => 1000 * 1000 * 1000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => return Err(format!("unknown unit {other:?} (k, M, G, KiB, MiB, GiB)")),
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("{text:?} is too large"))
}

fn window_mode(text: &str) -> Result<WindowMode, String> {
    match text {
        "activate" => Ok(WindowMode::Activate),
        "download" => Ok(WindowMode::Download),
        _ => Err("must be activate or download".into()),
    }
}

/// `+02:00`, `-05:30`, `0` as minutes east of UTC.
fn utc_offset(text: &str) -> Result<i32, String> {
    let bad = || format!("{text:?} is not an offset like +02:00 or -05:30");
    let (sign, rest) = match text.strip_prefix('-') {
        Some(rest) => (-1, rest),
        None => (1, text.strip_prefix('+').unwrap_or(text)),
    };
    let (h, m) = rest.split_once(':').unwrap_or((rest, "0"));
    let (h, m): (i32, i32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if !(0..60).contains(&m) {
        return Err(bad());
    }
    Ok(sign * (h * 60 + m))
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
            with_onnx,
            tolerance,
            encrypt,
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
            opts.with_onnx = with_onnx;
            opts.encrypt = encrypt;
            for (backend, value) in tolerance {
                // The value is checked with the manifest it goes into.
                opts.tolerance.insert(backend.parse()?, value);
            }
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
            for form in &manifest.forms {
                println!(
                    "  and as {}: {} bytes, {} chunk(s), sha256 {}…",
                    form.model_format,
                    form.size,
                    form.chunks.len(),
                    &form.sha256[..16]
                );
            }
        }
        Command::Deploy {
            model,
            version,
            group,
            by,
            probation,
            sampling,
            shadow,
            canary,
            download,
            backend,
        } => {
            let answer = client.deploy(&DeployRequest {
                model: model.clone(),
                version,
                group: group.clone(),
                by,
                probation: probation.thresholds(),
                sampling: sampling.spec()?,
                download: download.policy()?,
                backend,
                shadow: shadow.spec()?,
                canary: canary.spec()?,
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
        Command::Devices { json, action } => devices_command(&client, json, action)?,
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
                    key_escrow: Default::default(),
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
