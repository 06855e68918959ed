//! `modelcast-tuf-client`: the client-under-test command line of the public TUF conformance
//! suite (its CLIENT-CLI.md: `init`, `refresh`, `download`), driving the project's own TUF core,
//! `modelcast_proto::trusted`, so the suite measures the verifier devices run.
//!
//! A thin shell: arguments (clap), HTTP GETs (ureq, each bounded by the length the metadata
//! gives or a default), files (the trusted metadata under `--metadata-dir` as `root.json`,
//! `timestamp.json`, `<role>.json` with percent-encoded role names, each written atomically and
//! only once the core trusts it; artifacts under `--target-dir`, named by their percent-encoded
//! target path and not fetched again while they match their hashes). Every check is the core's.
//! Exit status 0 on success, 1 on any failure. Not shipped to devices.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use modelcast_proto::trusted::{
    metadata_path, quote, MetaRequest, SearchStep, TargetSearch, TrustedMetadata, Update,
    MAX_ROOT_ROTATIONS,
};

/// Command line of the TUF conformance suite's client CLI.
#[derive(Debug, Parser)]
#[command(about = "TUF client for the tuf-conformance suite, over modelcast's TUF core")]
struct Cli {
    /// Where the trusted metadata lives.
    #[arg(long)]
    metadata_dir: PathBuf,
    /// Base URL of the repository's metadata.
    #[arg(long)]
    metadata_url: Option<String>,
    /// Target path to download (repeatable; processed in order).
    #[arg(long = "target-name")]
    target_names: Vec<String>,
    /// Base URL of the repository's targets.
    #[arg(long)]
    target_base_url: Option<String>,
    /// Where downloaded targets are stored.
    #[arg(long)]
    target_dir: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Trust the given root file (copied as is; it is verified on first use).
    Init {
        /// The initial trusted root.
        trusted_root: PathBuf,
    },
    /// Update the top-level metadata (TUF client workflow §5.1–5.6).
    Refresh,
    /// Refresh, then find, download and verify each `--target-name`.
    Download,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("modelcast-tuf-client: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init { trusted_root } => {
            let bytes = fs::read(&trusted_root)
                .with_context(|| format!("reading {}", trusted_root.display()))?;
            fs::create_dir_all(&cli.metadata_dir)?;
            write_atomic(&cli.metadata_dir.join("root.json"), &bytes)
        }
        Command::Refresh => {
            let url = cli.metadata_url.context("--metadata-url is required")?;
            Client::refreshed(&cli.metadata_dir, &url).map(|_| ())
        }
        Command::Download => {
            let url = cli.metadata_url.context("--metadata-url is required")?;
            let base = cli
                .target_base_url
                .context("--target-base-url is required")?;
            let dir = cli.target_dir.context("--target-dir is required")?;
            if cli.target_names.is_empty() {
                bail!("no --target-name given");
            }
            let mut client = Client::refreshed(&cli.metadata_dir, &url)?;
            for name in &cli.target_names {
                client
                    .download(name, &base, &dir)
                    .with_context(|| format!("target {name:?}"))?;
            }
            Ok(())
        }
    }
}

/// One updater: the trusted set, where it is stored and where the repository is.
struct Client {
    dir: PathBuf,
    metadata_url: String,
    http: ureq::Agent,
    trusted: TrustedMetadata,
    now: i64,
}

impl Client {
    /// Loads the local root and runs the top-level refresh (root, timestamp, snapshot,
    /// targets).
    fn refreshed(dir: &Path, metadata_url: &str) -> anyhow::Result<Self> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| anyhow!("clock before 1970"))?
            .as_secs();
        let root = fs::read(dir.join("root.json")).context("reading the trusted root")?;
        let trusted = TrustedMetadata::new(&root).context("trusted root")?;
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build();
        let mut client = Client {
            dir: dir.to_path_buf(),
            metadata_url: with_slash(metadata_url),
            http: ureq::Agent::new_with_config(config),
            trusted,
            now: i64::try_from(now)?,
        };
        client.refresh()?;
        Ok(client)
    }

    fn refresh(&mut self) -> anyhow::Result<()> {
        // §5.3: newer roots, one version at a time, until the repository has none.
        for _ in 0..MAX_ROOT_ROTATIONS {
            let request = self.trusted.next_root_request();
            let Some(bytes) = self.fetch_meta(&request)? else {
                break;
            };
            self.trusted
                .update_root(&bytes)
                .with_context(|| format!("root {}", request.path))?;
            self.persist("root", &bytes)?;
        }

        // §5.4: the local timestamp (if still verifiable) guards against rollback.
        if let Some(local) = self.local("timestamp") {
            if let Err(e) = self.trusted.update_timestamp(&local, self.now) {
                eprintln!("local timestamp not valid as final: {e}");
            }
        }
        let request = self.trusted.timestamp_request();
        let bytes = self.fetch_required(&request)?;
        if self
            .trusted
            .update_timestamp(&bytes, self.now)
            .context("timestamp")?
            == Update::Accepted
        {
            self.persist("timestamp", &bytes)?;
        }

        // §5.5: the local snapshot is kept if it is still the final one.
        let local_ok = self
            .local("snapshot")
            .map(|local| self.trusted.reload_snapshot(&local, self.now))
            .is_some_and(|r| {
                if let Err(e) = &r {
                    eprintln!("local snapshot not valid as final: {e}");
                }
                r.is_ok()
            });
        if !local_ok {
            let request = self.trusted.snapshot_request()?;
            let bytes = self.fetch_required(&request)?;
            self.trusted
                .update_snapshot(&bytes, self.now)
                .context("snapshot")?;
            self.persist("snapshot", &bytes)?;
        }

        // §5.6: top-level targets.
        self.load_targets("targets", "root")
    }

    /// Makes `role` trusted as delegated by `delegator`: the local copy if it still verifies,
    /// else the version the snapshot names.
    fn load_targets(&mut self, role: &str, delegator: &str) -> anyhow::Result<()> {
        if let Some(local) = self.local(role) {
            match self
                .trusted
                .update_delegated_targets(&local, role, delegator, self.now)
            {
                Ok(()) => return Ok(()),
                Err(e) => eprintln!("local {role} not valid: {e}"),
            }
        }
        let request = self.trusted.targets_request(role)?;
        let bytes = self.fetch_required(&request)?;
        self.trusted
            .update_delegated_targets(&bytes, role, delegator, self.now)
            .with_context(|| format!("{role} (delegated by {delegator})"))?;
        self.persist(role, &bytes)
    }

    /// Finds `name` through the delegations, then stores it under `dir` unless a verified copy
    /// is already there.
    fn download(&mut self, name: &str, base_url: &str, dir: &Path) -> anyhow::Result<()> {
        let mut search = TargetSearch::new(name);
        let target = loop {
            match search.step(&self.trusted) {
                SearchStep::Load { role, delegator } => self.load_targets(&role, &delegator)?,
                SearchStep::Found(target) => break target,
                SearchStep::NotFound => bail!("not found in the trusted targets"),
            }
        };
        let path = dir.join(quote(name));
        let cached = fs::metadata(&path).is_ok_and(|m| m.len() == target.length)
            && fs::read(&path).is_ok_and(|bytes| target.verify(name, &bytes).is_ok());
        if cached {
            eprintln!("{name}: already downloaded");
            return Ok(());
        }
        let url = format!(
            "{}{}",
            with_slash(base_url),
            url_escape(&self.trusted.target_url_path(name, &target))
        );
        let bytes = self
            .get(&url, target.length)?
            .ok_or_else(|| anyhow!("{url}: not found"))?;
        target.verify(name, &bytes)?;
        fs::create_dir_all(dir)?;
        write_atomic(&path, &bytes)
    }

    fn local(&self, role: &str) -> Option<Vec<u8>> {
        fs::read(self.dir.join(metadata_path(role, None))).ok()
    }

    fn persist(&self, role: &str, bytes: &[u8]) -> anyhow::Result<()> {
        write_atomic(&self.dir.join(metadata_path(role, None)), bytes)
    }

    /// A metadata file, or `None` if the repository answers 404 or 403.
    fn fetch_meta(&self, request: &MetaRequest) -> anyhow::Result<Option<Vec<u8>>> {
        let url = format!("{}{}", self.metadata_url, request.path);
        self.get(&url, request.max_length)
    }

    fn fetch_required(&self, request: &MetaRequest) -> anyhow::Result<Vec<u8>> {
        self.fetch_meta(request)?
            .ok_or_else(|| anyhow!("{}: not found", request.path))
    }

    /// GET `url`, reading at most `max_length` bytes (more is an error: endless data).
    fn get(&self, url: &str, max_length: u64) -> anyhow::Result<Option<Vec<u8>>> {
        eprintln!("GET {url}");
        let mut response = self
            .http
            .get(url)
            .call()
            .with_context(|| format!("GET {url}"))?;
        match response.status().as_u16() {
            200 => {}
            403 | 404 => return Ok(None),
            other => bail!("GET {url}: HTTP {other}"),
        }
        let bytes = response
            .body_mut()
            .with_config()
            .limit(max_length)
            .read_to_vec()
            .with_context(|| format!("GET {url}: body (limit {max_length} bytes)"))?;
        Ok(Some(bytes))
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so a
/// reader sees the old file or the new one, never half of one.
fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("{}: no file name", path.display()))?;
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

fn with_slash(url: &str) -> String {
    if url.ends_with('/') {
        url.to_string()
    } else {
        format!("{url}/")
    }
}

/// Percent-encodes what cannot stand in a URL path as is (spaces, controls, non-ASCII, `?`,
/// `#` …), keeping `/` and the characters a path may carry.
fn url_escape(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/%".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
