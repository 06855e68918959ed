//! A device under test: a `modelcast-agent` process with its config, state directory and
//! inference API.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use modelcast_proto::manifest::{Manifest, TensorData};

use crate::{bin, free_port, hammer, wait_for, Fleet, Proc};

/// How an agent differs from the default test agent.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// More TOML appended to its config (e.g. a `[probation]` section).
    pub extra: String,
    /// More keys for its `[transfer]` section (e.g. `window = 8`), one per line.
    pub transfer: String,
    /// The broker port it connects to, when not the fleet's (e.g. through a [`proxy::Proxy`]).
    pub broker_port: Option<u16>,
    /// More environment for its process (e.g. `TZ`, its local time zone).
    pub env: Vec<(String, String)>,
    /// Enrol by claim (`[enrol]`) instead of holding a certificate made by hand.
    pub claim: Option<Claim>,
}

/// A device's claim credential, for enrolment by claim.
#[derive(Debug, Clone)]
pub struct Claim {
    /// The claim's name (its batch).
    pub name: String,
    /// Its files.
    pub identity: modelcast_server::pki::Identity,
    /// The port to enrol at (mosquitto's claim listener), when not the fleet's broker.
    pub port: Option<u16>,
}

impl Claim {
    /// The claim `claim-<name>.pem` in `pki` (from [`modelcast_server::pki::claim`]), enrolled
    /// for at `port` (or the fleet's broker).
    pub fn of(pki: &std::path::Path, name: &str, port: Option<u16>) -> Claim {
        Claim {
            name: name.into(),
            identity: modelcast_server::pki::Identity::in_dir(pki, &format!("claim-{name}")),
            port,
        }
    }
}

impl AgentOptions {
    /// A device that commits every new version at once (no probation).
    pub fn committing() -> Self {
        AgentOptions {
            extra: "[probation]\nrequests = 0\nseconds = 0\n".into(),
            ..AgentOptions::default()
        }
    }
}

/// One device.
pub struct Agent {
    /// Device id.
    pub id: String,
    /// Inference API port.
    pub http_port: u16,
    config: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
    starts: u32,
    env: Vec<(String, String)>,
}

impl Agent {
    pub(crate) fn new(
        fleet: &Fleet,
        id: &str,
        labels: &[(&str, &str)],
        options: AgentOptions,
    ) -> Agent {
        let AgentOptions {
            extra,
            transfer,
            broker_port,
            env,
            claim,
        } = options;
        let http_port = free_port();
        let dir = fleet.dir.path();
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k} = \"{v}\""))
            .collect();
        let director =
            std::fs::read_to_string(fleet.keys.join("director.pub")).expect("director.pub");
        let config = dir.join(format!("{id}.toml"));
        let (scheme, tls) = match (&fleet.pki, &claim) {
            (Some(pki), Some(claim)) => {
                let at = claim
                    .port
                    .map(|p| format!("claim_broker = \"mqtts://127.0.0.1:{p}\"\n"))
                    .unwrap_or_default();
                let tls = format!(
                    "[tls]\nca = \"{}\"\n[enrol]\nclaim = \"{}\"\nclaim_cert = \"{}\"\nclaim_key = \"{}\"\n{at}",
                    pki.join("ca.pem").display(),
                    claim.name,
                    claim.identity.cert.display(),
                    claim.identity.key.display()
                );
                ("mqtts", tls)
            }
            (None, Some(_)) => panic!("enrolment by claim needs a fleet with a PKI"),
            (Some(pki), None) => {
                let cert = modelcast_server::pki::issue(pki, id).expect("device certificate");
                let tls = format!(
                    "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                    pki.join("ca.pem").display(),
                    cert.cert.display(),
                    cert.key.display()
                );
                ("mqtts", tls)
            }
            (None, None) => ("mqtt", String::new()),
        };
        std::fs::write(
            &config,
            format!(
                "device_id = \"{id}\"\nlabels = {{ {} }}\nstate_dir = \"{}\"\nbroker = \"{scheme}://127.0.0.1:{}\"\nhttp_listen = \"127.0.0.1:{http_port}\"\n[trust]\nroot = \"{}\"\ndirector_keys = [\"{}\"]\n[transfer]\nchunk_timeout_secs = 2\nstall_timeout_secs = 5\n{transfer}{tls}{extra}",
                labels.join(", "),
                dir.join(id).display(),
                broker_port.unwrap_or(fleet.mqtt_port),
                fleet.keys.join("root.json").display(),
                director.trim()
            ),
        )
        .expect("agent config");
        let mut agent = Agent {
            id: id.into(),
            http_port,
            config,
            log: dir.join(format!("{id}.log")),
            proc: None,
            starts: 0,
            env,
        };
        agent.start();
        agent
    }

    /// Starts (or restarts) the process and waits for its API.
    pub fn start(&mut self) {
        self.starts += 1;
        let log = self.log_path();
        // `MODELCAST_AGENT_BIN` runs another build of the agent (e.g. the device profile).
        let exe = std::env::var_os("MODELCAST_AGENT_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| bin("modelcast-agent"));
        let proc = Proc::spawn(
            Command::new(exe)
                .arg("--config")
                .arg(&self.config)
                .env("RUST_LOG", "info,sled=warn")
                .envs(self.env.iter().map(|(k, v)| (k, v))),
            log,
        );
        self.proc = Some(proc);
        let url = format!("http://127.0.0.1:{}/v2/health/live", self.http_port);
        wait_for(&format!("{} API", self.id), Duration::from_secs(30), || {
            ureq::get(&url).call().ok()
        });
    }

    /// Sets the environment of its process from its next start (e.g. a moved clock).
    pub fn set_env(&mut self, env: Vec<(String, String)>) {
        self.env = env;
    }

    /// Kills the process with SIGKILL (a crash, a power cut) without restarting it.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// How the process ended, if it has (a crash shows as the signal that ended it).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.proc.as_mut()?.exited()
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.child.id())
    }

    /// The current process's log file.
    pub fn log_path(&self) -> PathBuf {
        self.log.with_extension(format!("{}.log", self.starts))
    }

    /// Whether its log has a line saying `what` about `version` (`version=N`).
    pub fn log_has(&self, what: &str, version: u64) -> bool {
        let needle = format!("version={version}");
        std::fs::read_to_string(self.log_path())
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains(what) && l.contains(&needle))
    }

    /// Stops the process gracefully.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    /// Sends a KServe v2 JSON inference request built from tensors; returns the version that
    /// answered and the first output's values, or the error body.
    pub fn infer(&self, model: &str, inputs: &[TensorData]) -> Result<(String, Vec<f64>), String> {
        hammer::InferClient::new(self.http_port, model, inputs).call()
    }

    /// Says through the device's local API whether its link is metered.
    pub fn set_metered(&self, metered: bool) {
        ureq::put(format!("http://127.0.0.1:{}/v1/link", self.http_port))
            .send_json(serde_json::json!({ "metered": metered }))
            .expect("PUT /v1/link");
    }

    /// Whether the device's local API says its link is metered.
    pub fn metered(&self) -> bool {
        let v: serde_json::Value =
            ureq::get(format!("http://127.0.0.1:{}/v1/link", self.http_port))
                .call()
                .expect("GET /v1/link")
                .body_mut()
                .read_json()
                .expect("JSON");
        v["metered"] == true
    }

    /// The value of one Prometheus sample from its `/metrics`, e.g.
    /// `modelcast_downloaded_bytes_total{model="classifier"}`; `None` if absent.
    pub fn metric(&self, sample: &str) -> Option<f64> {
        let text = ureq::get(format!("http://127.0.0.1:{}/metrics", self.http_port))
            .call()
            .ok()?
            .body_mut()
            .read_to_string()
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Runs the manifest's golden vector and checks the answer; returns the version.
    pub fn check_golden(&self, manifest: &Manifest) -> String {
        let golden = &manifest.golden[0];
        let (version, got) = self
            .infer(&manifest.name, &golden.inputs)
            .unwrap_or_else(|e| panic!("{} infer: {e}", self.id));
        let want = golden.outputs[0].values().expect("golden values");
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() < 1e-4,
                "{}: got {got:?}, want {want:?}",
                self.id
            );
        }
        version
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}
