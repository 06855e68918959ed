//! `modelcast-agent`: config from TOML, environment and flags; logs through tracing.

use std::path::PathBuf;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser};
use modelcast_agent::config::Config;

/// The modelcast device agent.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Config file (TOML).
    #[arg(
        long,
        short,
        env = "MODELCAST_CONFIG",
        default_value = "/etc/modelcast/agent.toml"
    )]
    config: PathBuf,
    /// Overrides `device_id`.
    #[arg(long, env = "MODELCAST_DEVICE_ID")]
    device_id: Option<String>,
    /// Overrides `state_dir`.
    #[arg(long, env = "MODELCAST_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Overrides `broker` (`mqtt://host:port`).
    #[arg(long, env = "MODELCAST_BROKER")]
    broker: Option<String>,
    /// Overrides `http_listen`.
    #[arg(long, env = "MODELCAST_HTTP_LISTEN")]
    http_listen: Option<std::net::SocketAddr>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sled=warn,tract=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // `--version`: the version and what this build runs (its backends and features).
    let info: &'static str = Box::leak(modelcast_agent::build_info().into_boxed_str());
    let matches = Args::command().version(info).get_matches();
    let args = Args::from_arg_matches(&matches)?;
    let mut cfg = Config::from_file(&args.config)?;
    if let Some(v) = args.device_id {
        cfg.device_id = v;
    }
    if let Some(v) = args.state_dir {
        cfg.state_dir = v;
    }
    if let Some(v) = args.broker {
        cfg.broker = v;
    }
    if let Some(v) = args.http_listen {
        cfg.http_listen = v;
    }
    cfg.validate()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_stack_size(modelcast_agent::priority::WORK_STACK)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        modelcast_agent::driver::run(cfg, shutdown, |serving| {
            let status = if serving.is_empty() {
                "ready: no model installed yet".to_string()
            } else {
                format!("ready: serving {}", serving.join(", "))
            };
            tracing::info!("{status}");
            modelcast_agent::systemd::ready(&status);
        })
        .await
    })?;
    Ok(())
}
