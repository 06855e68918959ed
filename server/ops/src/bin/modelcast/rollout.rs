//! `modelcast rollout`: start a rollout in waves, watch it, steer it.

use std::time::Duration;

use anyhow::bail;
use clap::Subcommand;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use modelcast_ops::client::Client;
use modelcast_server::api::RolloutRequest;
use modelcast_server::fleet::RolloutAction;
use modelcast_server::rollout::{DeviceState, Rollout, RolloutSpec, RolloutState, WaveSize};

use crate::{CanaryArgs, DownloadArgs, ProbationArgs, SamplingArgs, ShadowArgs};

/// How often `--follow` asks the server.
const POLL: Duration = Duration::from_millis(500);

// Parsed once per run: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum RolloutCommand {
    /// Roll a published version out to a group in waves.
    Start {
        /// Model name.
        #[arg(long)]
        model: String,
        /// Version.
        #[arg(long)]
        version: u64,
        /// Label selector, e.g. `site=berlin,hw=jetson` (`*` for all).
        #[arg(long)]
        group: String,
        /// Cumulative wave sizes, a count or a share of the group; the first is the canary.
        /// A last wave of 100% is implied.
        #[arg(long, value_delimiter = ',', default_value = "1,10%,50%")]
        waves: Vec<WaveSize>,
        /// Share of a wave (percent) that must commit before the next wave starts.
        #[arg(long, default_value_t = 100)]
        success_percent: u32,
        /// Abort once more devices than this have failed.
        #[arg(long, default_value_t = 0)]
        max_failures: u32,
        /// Abort once failed devices exceed this share (percent) of those moved.
        #[arg(long)]
        max_failure_percent: Option<u32>,
        /// Abort when a wave has not succeeded this many seconds after it started.
        #[arg(long, default_value_t = 3600)]
        wave_timeout: u64,
        /// On abort, leave moved devices on the new version.
        #[arg(long)]
        no_auto_rollback: bool,
        /// Count a moved device as failed when the server raises a drift or anomaly alert on
        /// it for this version (latency, error rate, output distribution).
        #[arg(long)]
        abort_on_alerts: bool,
        /// Probation for the devices it moves, overriding theirs.
        #[command(flatten)]
        probation: ProbationArgs,
        /// Sampling of inputs and outputs on the devices it moves (off by default).
        #[command(flatten)]
        sampling: SamplingArgs,
        /// A shadow phase on every device it moves before the version serves there; a device
        /// whose candidate fails it counts as failed (off by default).
        #[command(flatten)]
        shadow: ShadowArgs,
        /// A traffic split on every device it moves while the version is on probation there
        /// (off by default).
        #[command(flatten)]
        canary: CanaryArgs,
        /// When and how fast the devices it moves download and activate it.
        #[command(flatten)]
        download: DownloadArgs,
        /// Run the version on this backend (`tract`, `onnxruntime`) on the devices it moves,
        /// in place of their configured choice.
        #[arg(long)]
        backend: Option<modelcast_proto::engine::Backend>,
        /// Who starts it.
        #[arg(long, env = "USER", default_value = "operator")]
        by: String,
        /// Watch it until it ends.
        #[arg(long)]
        follow: bool,
    },
    /// Show a rollout (the newest by default): waves, devices, failures.
    Status {
        /// Rollout id.
        id: Option<u64>,
        /// Live progress bars per wave until the rollout ends.
        #[arg(long)]
        follow: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List rollouts.
    List,
    /// Hold the next wave.
    Pause(Steer),
    /// Go on after a pause.
    Resume(Steer),
    /// Stop; moved devices go back to their previous version (unless started with
    /// --no-auto-rollback).
    Abort(Steer),
    /// Stop; moved devices keep the new version.
    Cancel(Steer),
}

/// The rollout an operator acts on, and who acts.
#[derive(clap::Args, Debug)]
pub struct Steer {
    /// Rollout id.
    id: u64,
    /// Who acts.
    #[arg(long, env = "USER", default_value = "operator")]
    by: String,
}

/// Runs one `modelcast rollout` command.
pub fn run(client: &Client, command: RolloutCommand) -> anyhow::Result<()> {
    match command {
        RolloutCommand::Start {
            model,
            version,
            group,
            waves,
            success_percent,
            max_failures,
            max_failure_percent,
            wave_timeout,
            no_auto_rollback,
            abort_on_alerts,
            probation,
            sampling,
            shadow,
            canary,
            download,
            backend,
            by,
            follow,
        } => {
            let spec = RolloutSpec {
                model,
                version,
                group,
                waves,
                success_percent,
                max_failures,
                max_failure_percent,
                wave_timeout_secs: wave_timeout,
                auto_rollback: !no_auto_rollback,
                probation: probation.thresholds(),
                sampling: sampling.spec()?,
                download: download.policy()?,
                abort_on_alerts,
                backend,
                shadow: shadow.spec()?,
                canary: canary.spec()?,
            };
            let r = client.start_rollout(&RolloutRequest { spec, by })?;
            println!(
                "rollout {} started: {} v{} to {} device(s) in waves of {:?}",
                r.id,
                r.spec.model,
                r.spec.version,
                r.members.len(),
                r.wave_sizes
            );
            if follow {
                return watch(client, r.id);
            }
            print_status(&r);
        }
        RolloutCommand::Status { id, follow, json } => {
            let id = match id {
                Some(id) => id,
                None => match client.rollouts()?.last() {
                    Some(r) => r.id,
                    None => bail!("no rollout yet"),
                },
            };
            if follow {
                return watch(client, id);
            }
            let r = client.rollout(id)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print_status(&r);
            }
        }
        RolloutCommand::List => {
            println!(
                "{:<6} {:<16} {:<8} {:<20} {:<10} {:>8} {:>9} {:>6}  by",
                "id", "model", "version", "group", "state", "devices", "committed", "failed"
            );
            for r in client.rollouts()? {
                let c = r.counts(0);
                println!(
                    "{:<6} {:<16} {:<8} {:<20} {:<10} {:>8} {:>9} {:>6}  {}",
                    r.id,
                    r.spec.model,
                    r.spec.version,
                    r.spec.group,
                    state_name(&r.state),
                    r.members.len(),
                    c.committed,
                    c.failed,
                    r.by
                );
            }
        }
        RolloutCommand::Pause(s) => act(client, s, RolloutAction::Pause)?,
        RolloutCommand::Resume(s) => act(client, s, RolloutAction::Resume)?,
        RolloutCommand::Abort(s) => act(client, s, RolloutAction::Abort)?,
        RolloutCommand::Cancel(s) => act(client, s, RolloutAction::Cancel)?,
    }
    Ok(())
}

fn act(client: &Client, steer: Steer, action: RolloutAction) -> anyhow::Result<()> {
    let r = client.act_on_rollout(steer.id, action, &steer.by)?;
    println!("rollout {}: {}", steer.id, state_line(&r.state));
    Ok(())
}

fn state_name(state: &RolloutState) -> &'static str {
    match state {
        RolloutState::Running => "running",
        RolloutState::Paused => "paused",
        RolloutState::Completed => "completed",
        RolloutState::Aborted { .. } => "aborted",
        RolloutState::Cancelled => "cancelled",
    }
}

fn state_line(state: &RolloutState) -> String {
    match state {
        RolloutState::Aborted { reason } => format!("aborted: {reason}"),
        s => state_name(s).to_string(),
    }
}

fn wave_name(wave: usize) -> String {
    if wave == 0 {
        "canary".into()
    } else {
        format!("wave {}", wave + 1)
    }
}

/// Counts of one wave's devices: (size, committed, updating, failed, reverted).
fn wave_counts(r: &Rollout, wave: usize) -> (usize, usize, usize, usize, usize) {
    let mut c = (0, 0, 0, 0, 0);
    for m in r.wave_members(wave) {
        c.0 += 1;
        match m.state {
            DeviceState::Committed => c.1 += 1,
            DeviceState::Updating => c.2 += 1,
            DeviceState::Failed { .. } => c.3 += 1,
            DeviceState::Reverting | DeviceState::Reverted => c.4 += 1,
            DeviceState::Waiting => {}
        }
    }
    c
}

fn wave_message(r: &Rollout, wave: usize) -> String {
    let (_, _, updating, failed, reverted) = wave_counts(r, wave);
    let mut parts = Vec::new();
    if wave > r.wave {
        parts.push("waiting".to_string());
    }
    if updating > 0 {
        parts.push(format!("{updating} updating"));
    }
    if failed > 0 {
        parts.push(format!("{failed} failed"));
    }
    if reverted > 0 {
        parts.push(format!("{reverted} sent back"));
    }
    parts.join(", ")
}

fn print_status(r: &Rollout) {
    println!(
        "rollout {}: {} v{} to group '{}' by {} — {}",
        r.id,
        r.spec.model,
        r.spec.version,
        r.spec.group,
        r.by,
        state_line(&r.state)
    );
    for wave in 0..r.wave_sizes.len() {
        let (size, committed, ..) = wave_counts(r, wave);
        println!(
            "  {:<8} {committed:>5}/{size:<5} committed  {}",
            wave_name(wave),
            wave_message(r, wave)
        );
        if let Some(s) = r.wave_shadow(wave) {
            let agreement = s
                .min_agreement_permille
                .map(|p| format!(", lowest argmax agreement {:.1}%", p as f64 / 10.0))
                .unwrap_or_default();
            println!(
                "           shadow: {} passed, {} failed, {} running{agreement}",
                s.passed, s.failed, s.running
            );
        }
    }
    let t = r.transferred();
    if t.received_bytes > 0 {
        println!(
            "  bytes: {:.1} MB on the devices, {:.1} MB of it reused from what they held ({:.0} %), {:.1} MB downloaded",
            t.received_bytes as f64 / 1e6,
            t.reused_bytes as f64 / 1e6,
            100.0 * t.reused_bytes as f64 / t.received_bytes as f64,
            (t.received_bytes - t.reused_bytes.min(t.received_bytes)) as f64 / 1e6
        );
    }
    for m in &r.members {
        if let Some(reason) = &m.failure {
            println!("  failed: {}: {reason}", m.device);
        }
    }
}

/// Progress bars per wave, refreshed until the rollout ends.
fn watch(client: &Client, id: u64) -> anyhow::Result<()> {
    let bars = MultiProgress::new();
    let style =
        ProgressStyle::with_template("{prefix:>8} [{bar:40.green/red}] {pos:>5}/{len:<5} {msg}")
            .expect("template")
            .progress_chars("=> ");
    let header = bars.add(ProgressBar::new_spinner());
    let mut waves: Vec<ProgressBar> = Vec::new();
    loop {
        let r = client.rollout(id)?;
        header.set_message(format!(
            "rollout {}: {} v{} to '{}' — {}",
            r.id,
            r.spec.model,
            r.spec.version,
            r.spec.group,
            state_line(&r.state)
        ));
        header.tick();
        for wave in 0..r.wave_sizes.len() {
            let (size, committed, ..) = wave_counts(&r, wave);
            if waves.len() <= wave {
                let bar = bars.add(ProgressBar::new(size as u64));
                bar.set_style(style.clone());
                bar.set_prefix(wave_name(wave));
                waves.push(bar);
            }
            waves[wave].set_position(committed as u64);
            waves[wave].set_message(wave_message(&r, wave));
        }
        if r.state.is_over() {
            for bar in &waves {
                bar.abandon();
            }
            header.finish();
            drop(bars);
            print_status(&r);
            return Ok(());
        }
        std::thread::sleep(POLL);
    }
}
