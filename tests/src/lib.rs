//! The end-to-end harness: real processes (`modelcast-server`, `modelcast-agent`, mosquitto)
//! on free 127.0.0.1 ports, real sled directories, real ONNX models. Every wait is bounded.
//!
//! - [`Fleet`]: keys, a server (embedded broker or an external one), agents, publishing.
//! - [`Agent`]: one device process with its store, inference port and config.
//! - [`Mosquitto`], [`Postgres`], [`Nginx`]: Debian's broker, database and web server, started on free ports
//!   (`services.rs`).
//! - [`Rogue`], [`Forger`]: an attacker on the broker who signs or serves what it likes
//!   (`attacker.rs`).
//! - [`proxy`]: a TCP proxy a test can cut (a network cut without privileges).
//! - [`hammer`]: clients loading a device's inference API, answers kept with their latency.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use modelcast_proto::manifest::{Manifest, TensorData};

pub mod agent;
pub mod attacker;
pub mod browser;
pub mod cgroup;
pub mod corpus;
pub mod fleet;
pub mod hammer;
pub mod proxy;
pub mod services;
pub mod sim;

pub use agent::{Agent, AgentOptions, Claim};
pub use attacker::*;
pub use fleet::Fleet;
pub use services::{Mosquitto, Nginx, Postgres};

/// Features of the agent the tests drive (this crate turns them on in the workspace's build).
const AGENT_FEATURES: [&str; 2] = ["ort", "pkcs11"];

/// Path of a workspace binary, building the binaries once if they are missing. The agent
/// must be a build with every feature the tests drive ([`AGENT_FEATURES`]): one without
/// (a `cargo build -p modelcast-agent` of its own, say) is built again, and the harness says so.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let mut dir = exe.parent().expect("target dir");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target profile dir");
    }
    let path = dir.join(name);
    let release = dir.ends_with("release");
    if !path.exists() {
        build_binaries(release);
    }
    assert!(path.exists(), "{} not found", path.display());
    if name == "modelcast-agent" {
        static CHECKED: std::sync::Once = std::sync::Once::new();
        CHECKED.call_once(|| {
            let lacks = |version: &str| -> Vec<&str> {
                AGENT_FEATURES
                    .into_iter()
                    .filter(|f| !agent_features(version).contains(f))
                    .collect()
            };
            let version = agent_version(&path);
            if !lacks(&version).is_empty() {
                let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
                eprintln!(
                    "harness: {} ({version:?}, modified {modified:?}) lacks {:?}; building it again",
                    path.display(),
                    lacks(&version)
                );
                build_binaries(release);
                let version = agent_version(&path);
                assert!(
                    lacks(&version).is_empty(),
                    "{} still lacks {:?}: {version}",
                    path.display(),
                    lacks(&version)
                );
            }
        });
    }
    path
}

/// The features `modelcast-agent --version` lists: `… (backends: …; features: a, b)`.
fn agent_features(version: &str) -> Vec<&str> {
    version
        .rsplit_once("features: ")
        .map(|(_, f)| f.trim_end_matches(')').split(", ").collect())
        .unwrap_or_default()
}

/// What `modelcast-agent --version` says of the build at `path`. Asked up to three times: on
/// a machine busy with a whole suite, starting a process can fail (and a build judged to lack
/// features would be built again under the running tests).
fn agent_version(path: &Path) -> String {
    for _ in 0..3 {
        match Command::new(path).arg("--version").output() {
            Ok(o) if o.status.success() => {
                return String::from_utf8_lossy(&o.stdout).trim().to_string()
            }
            Ok(o) => eprintln!(
                "harness: {} --version: {}: {}",
                path.display(),
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("harness: {} --version: {e}", path.display()),
        }
    }
    String::new()
}

/// Builds the agent (with the backends the tests drive) and the server.
fn build_binaries(release: bool) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "-p",
        "modelcast-agent",
        "-p",
        "modelcast-server",
        "--bins",
    ]);
    for feature in AGENT_FEATURES {
        cmd.args(["--features", &format!("modelcast-agent/{feature}")]);
    }
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("running cargo build");
    assert!(status.success(), "building the binaries failed");
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS:`, `VmHWM:`); 0 when unreadable.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// A free TCP port on 127.0.0.1 for a server a test starts.
///
/// A port the kernel picks (`bind(…:0)`) comes from the ephemeral range, which outgoing
/// connections and other tests' listeners draw from too: between the moment it is released
/// here and the moment the server binds it, someone else may take it. So ports are handed
/// out from below the ephemeral range instead, each once per process, starting at an offset
/// of the process's own (two test binaries at once pick apart), skipping any port that is
/// busy now. Where the ephemeral range leaves no room below it, the kernel picks.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let bound = |port: u16| TcpListener::bind(("127.0.0.1", port)).is_ok();
    let (first, last) = reserved_ports();
    if last > first {
        let span = u32::from(last - first);
        let offset = std::process::id().wrapping_mul(7_919) % span;
        for _ in 0..span {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let port = first + ((offset + n) % span) as u16;
            if bound(port) {
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The ports [`free_port`] hands out: up to 12,000 ports ending below the ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`, 32768–60999 by default), not under 10,000.
fn reserved_ports() -> (u16, u16) {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let last = ephemeral_start.saturating_sub(1);
    let first = last.saturating_sub(12_000).max(10_000);
    (first, last.max(first))
}

/// Polls `f` every 100 ms until it returns `Some`, at most `timeout`; panics with `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A child process, killed when dropped; its stderr goes to a log file.
pub struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(cmd: &mut Command, log: PathBuf) -> Proc {
        let file = std::fs::File::create(&log).expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        Proc { child, log }
    }

    /// Asks the process to stop (SIGTERM) and waits up to 10 s, then kills it.
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
    }

    /// Its exit status, if it has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The last lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} ---\n{}", self.log.display(), self.log_tail(40));
        }
        self.kill();
    }
}

/// What the ONNX model `onnx`, published as `manifest`, answers to `inputs` (first output),
/// computed in this process with tract from the ONNX file itself: an expectation that does not
/// come from the device under test.
pub fn reference_output(onnx: &[u8], manifest: &Manifest, inputs: &[TensorData]) -> Vec<f64> {
    use modelcast_agent::engine::{HostTensor, LoadedModel};
    let mut as_onnx = manifest.clone();
    as_onnx.model_format = modelcast_proto::manifest::ModelFormat::Onnx;
    let model = LoadedModel::load(&as_onnx, modelcast_proto::report::Slot::A, &mut &onnx[..])
        .expect("reference model loads");
    let inputs: Vec<HostTensor> = inputs
        .iter()
        .map(|t| HostTensor::from_data(t).expect("tensor values"))
        .collect();
    model.run(&inputs).expect("reference run")[0]
        .values
        .to_f64()
}

/// Labels as a map.
pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn ports_are_handed_out_once_each_and_below_the_ephemeral_range() {
        let (first, last) = super::reserved_ports();
        let ports: Vec<u16> = (0..200).map(|_| super::free_port()).collect();
        let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port handed out twice");
        assert!(
            ports.iter().all(|p| (first..last).contains(p)),
            "{ports:?} outside {first}..{last}"
        );
    }
}
