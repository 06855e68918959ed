//! A fleet under test: keys, a `modelcast-server` process (embedded broker, mosquitto or
//! PostgreSQL), its API client, and what the tests do through it (publish, deploy, wait).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use modelcast_ops::client::Client;
use modelcast_ops::onnx;
use modelcast_ops::publish::{publish_file, PublishOptions};
use modelcast_proto::manifest::Manifest;
use modelcast_proto::report::DeviceReport;
use modelcast_server::api::DeployRequest;
use modelcast_server::keyset;

use crate::{bin, free_port, wait_for, Agent, AgentOptions, Mosquitto, Proc};

/// A fleet: keys, a server, and the operators' API client.
pub struct Fleet {
    /// Scratch directory for everything.
    pub dir: tempfile::TempDir,
    /// Key directory from keygen.
    pub keys: PathBuf,
    /// The operator API client.
    pub client: Client,
    /// The broker's port (embedded or external).
    pub mqtt_port: u16,
    /// The transport PKI when the broker speaks TLS (agents get certificates from it).
    pub pki: Option<PathBuf>,
    server: Proc,
    server_args: Vec<std::ffi::OsString>,
    /// More environment for the server's process from its next start.
    server_env: Vec<(String, String)>,
    restarts: u32,
}

impl Fleet {
    /// Keys and a server with its embedded broker.
    pub fn embedded() -> Fleet {
        Self::start_in(tempfile::tempdir().expect("tempdir"), None, None, None, &[])
    }

    /// Keys and a server with its embedded broker, started with these further arguments.
    pub fn embedded_with(args: &[&str]) -> Fleet {
        Self::start_in(
            tempfile::tempdir().expect("tempdir"),
            None,
            None,
            None,
            args,
        )
    }

    /// Keys and a server with its embedded broker, keeping its state in PostgreSQL at `url`.
    pub fn on_postgres(url: &str) -> Fleet {
        Self::start_in(
            tempfile::tempdir().expect("tempdir"),
            None,
            None,
            Some(url),
            &[],
        )
    }

    /// Keys, a transport PKI and a server whose embedded broker speaks TLS only.
    pub fn embedded_tls() -> Fleet {
        Self::embedded_tls_with(&[])
    }

    /// [`Fleet::embedded_tls`] with more server arguments.
    pub fn embedded_tls_with(extra: &[&str]) -> Fleet {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = dir.path().join("pki");
        modelcast_server::pki::init(&pki, &["127.0.0.1".into()]).expect("pki init");
        Self::start_in(dir, None, Some(pki), None, extra)
    }

    /// Keys and a server using the broker on `port`.
    pub fn with_broker(dir: tempfile::TempDir, port: u16) -> Fleet {
        Self::start_in(dir, Some(port), None, None, &[])
    }

    /// [`Fleet::with_broker`] with more server arguments.
    pub fn with_broker_args(dir: tempfile::TempDir, port: u16, extra: &[&str]) -> Fleet {
        Self::start_in(dir, Some(port), None, None, extra)
    }

    /// Keys and a server using the broker on `port`, keeping its state in PostgreSQL at `url`
    /// (chunk replicas can then join it: [`Fleet::start_chunk_replica`]).
    pub fn with_broker_on_postgres(dir: tempfile::TempDir, port: u16, url: &str) -> Fleet {
        Self::start_in(dir, Some(port), None, Some(url), &[])
    }

    /// Keys and a control server holding the database's control lease (`--lease`), using
    /// the broker on `port` and PostgreSQL at `url`; standbys join with
    /// [`Fleet::start_standby`].
    pub fn leased(dir: tempfile::TempDir, port: u16, url: &str) -> Fleet {
        Self::start_in(dir, Some(port), None, Some(url), &["--lease"])
    }

    /// Starts another control server with the same arguments but its own API port and data
    /// directory: with `--lease`, a standby. Returns the process and a client of its API
    /// (which answers health and status while it waits).
    pub fn start_standby(&self, name: &str) -> (Proc, Client) {
        let port = free_port();
        let mut args = self.server_args.clone();
        for (flag, value) in [
            ("--listen", format!("127.0.0.1:{port}")),
            (
                "--data-dir",
                self.dir.path().join(name).display().to_string(),
            ),
        ] {
            let at = args
                .iter()
                .position(|a| a == flag)
                .unwrap_or_else(|| panic!("the server was started with {flag}"));
            args[at + 1] = value.into();
        }
        let mut cmd = Command::new(bin("modelcast-server"));
        cmd.args(&args);
        let proc = Proc::spawn(&mut cmd, self.dir.path().join(format!("{name}.log")));
        let client = Client::new(&format!("http://127.0.0.1:{port}"));
        wait_for("the standby's API", Duration::from_secs(20), || {
            client.status().ok()
        });
        (proc, client)
    }

    /// Kills the server (SIGKILL) if it runs, and starts it again on the same data and ports;
    /// waits until `ready` answers (a standby serves no operator API).
    pub fn restart_server_waiting_for<T>(&mut self, ready: impl FnMut() -> Option<T>) -> T {
        self.respawn_server();
        wait_for("the server again", Duration::from_secs(20), ready)
    }

    /// Kills the server (SIGKILL) and starts it again with the same arguments.
    fn respawn_server(&mut self) {
        self.server.kill();
        self.restarts += 1;
        let log = self
            .dir
            .path()
            .join(format!("server-{}.log", self.restarts));
        let mut cmd = Command::new(bin("modelcast-server"));
        cmd.args(&self.server_args)
            .envs(self.server_env.iter().map(|(k, v)| (k, v)));
        self.server = Proc::spawn(&mut cmd, log);
    }

    /// Restarts the server (as [`Fleet::restart_server`]) with more environment (e.g. a moved
    /// clock).
    pub fn restart_server_with_env(&mut self, env: Vec<(String, String)>) {
        self.server_env = env;
        self.restart_server();
    }

    /// Kills the server (SIGKILL) without starting it again.
    pub fn kill_server(&mut self) {
        self.server.kill();
    }

    /// Stops the server as systemd does (SIGTERM; SIGKILL after 10 s) without starting it
    /// again; its exit status.
    pub fn stop_server(&mut self) -> Option<std::process::ExitStatus> {
        self.server.stop();
        self.server.exited()
    }

    /// Starts a chunk replica (`--role chunks`) beside the server: same keys, database and
    /// broker, MQTT identity `identity`. Returns the process and a client of its API.
    pub fn start_chunk_replica(&self, identity: &str) -> (Proc, Client) {
        let arg = |name: &str| {
            let at = self
                .server_args
                .iter()
                .position(|a| a == name)
                .unwrap_or_else(|| panic!("the server was started with {name}"));
            self.server_args[at + 1].clone()
        };
        let port = free_port();
        let mut cmd = Command::new(bin("modelcast-server"));
        cmd.arg("--role")
            .arg("chunks")
            .arg("--mqtt-identity")
            .arg(identity)
            .arg("--data-dir")
            .arg(self.dir.path().join(identity))
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"));
        for name in ["--keys", "--broker", "--database"] {
            cmd.arg(name).arg(arg(name));
        }
        let proc = Proc::spawn(&mut cmd, self.dir.path().join(format!("{identity}.log")));
        let client = Client::new(&format!("http://127.0.0.1:{port}"));
        wait_for("the replica's API", Duration::from_secs(20), || {
            client.status().ok()
        });
        (proc, client)
    }

    /// Keys and a server using a TLS mosquitto ([`Mosquitto::start_tls`]) started in `dir`.
    pub fn with_tls_broker(dir: tempfile::TempDir, broker: &Mosquitto) -> Fleet {
        Self::with_tls_broker_args(dir, broker, &[])
    }

    /// [`Fleet::with_tls_broker`] with more server arguments.
    pub fn with_tls_broker_args(
        dir: tempfile::TempDir,
        broker: &Mosquitto,
        extra: &[&str],
    ) -> Fleet {
        let pki = broker.pki().expect("a TLS broker").to_path_buf();
        Self::start_in(dir, Some(broker.port()), Some(pki), None, extra)
    }

    fn start_in(
        dir: tempfile::TempDir,
        broker: Option<u16>,
        pki: Option<PathBuf>,
        database: Option<&str>,
        extra: &[&str],
    ) -> Fleet {
        let keys = dir.path().join("keys");
        keyset::keygen(&keys, modelcast_server::unix_now()).expect("keygen");
        let api_port = free_port();
        let mqtt_port = broker.unwrap_or_else(free_port);
        let mut cmd = Command::new(bin("modelcast-server"));
        cmd.arg("--data-dir")
            .arg(dir.path().join("server"))
            .arg("--keys")
            .arg(&keys)
            .arg("--listen")
            .arg(format!("127.0.0.1:{api_port}"));
        let scheme = if pki.is_some() { "mqtts" } else { "mqtt" };
        match broker {
            Some(p) => cmd.arg("--broker").arg(format!("{scheme}://127.0.0.1:{p}")),
            None => cmd
                .arg("--mqtt-listen")
                .arg(format!("127.0.0.1:{mqtt_port}")),
        };
        if let Some(pki) = &pki {
            cmd.arg("--pki").arg(pki);
        }
        if let Some(url) = database {
            cmd.arg("--database").arg(url);
        }
        cmd.args(extra);
        let server_args: Vec<std::ffi::OsString> = cmd.get_args().map(|a| a.to_owned()).collect();
        let mut server = Proc::spawn(&mut cmd, dir.path().join("server.log"));
        let client = Client::new(&format!("http://127.0.0.1:{api_port}"));
        wait_for_api(&mut server, &client, "the server API");
        Fleet {
            dir,
            keys,
            client,
            mqtt_port,
            pki,
            server,
            server_args,
            server_env: Vec::new(),
            restarts: 0,
        }
    }

    /// Restarts the server with an API token file holding an admin, a deployer and a viewer
    /// token (named `admin`, `alice`, `bob`); the fleet's client uses the admin token from
    /// then on. Returns the three tokens in that order.
    pub fn require_tokens(&mut self) -> [String; 3] {
        use modelcast_server::auth::{Role, Tokens};
        let path = self.dir.path().join("tokens.toml");
        let mut tokens = Tokens::default();
        let made = [
            ("admin", Role::Admin),
            ("alice", Role::Deployer),
            ("bob", Role::Viewer),
        ]
        .map(|(name, role)| tokens.create(name, role).expect("token"));
        tokens.save(&path).expect("token file");
        self.server_args.push("--tokens".into());
        self.server_args.push(path.into_os_string());
        self.client = Client::new(self.client.base()).with_token(Some(made[0].clone()));
        self.restart_server();
        made
    }

    /// The server's process id.
    pub fn server_pid(&self) -> u32 {
        self.server.child.id()
    }

    /// Kills the server (SIGKILL) and starts it again on the same data and ports.
    pub fn restart_server(&mut self) {
        self.respawn_server();
        wait_for_api(&mut self.server, &self.client, "the server API again");
    }

    /// Runs `modelcast --server <this fleet's API> <args>`; its output, once it succeeded.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(bin("modelcast"))
            .args(["--server", self.client.base()])
            .args(args)
            .output()
            .expect("modelcast");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "modelcast {args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }

    /// Writes the example model at `version` and publishes it.
    pub fn publish_example(&self, version: u64, hidden: usize) -> Manifest {
        let path = self.dir.path().join(format!("example-v{version}.onnx"));
        std::fs::write(&path, onnx::example_model(version, hidden)).expect("model file");
        self.publish_file(&path, "classifier", version)
    }

    /// Writes an example model of about `bytes` (a deep MLP) and publishes it as `name` at
    /// `version`.
    pub fn publish_example_of_size(&self, name: &str, version: u64, bytes: u64) -> Manifest {
        self.publish_example_with(version, bytes, PublishOptions::new(name, version))
    }

    /// [`Fleet::publish_example_of_size`] encrypted (`modelcast publish --encrypt`).
    pub fn publish_encrypted_of_size(&self, name: &str, version: u64, bytes: u64) -> Manifest {
        let mut opts = PublishOptions::new(name, version);
        opts.encrypt = true;
        self.publish_example_with(version, bytes, opts)
    }

    fn publish_example_with(&self, version: u64, bytes: u64, opts: PublishOptions) -> Manifest {
        let path = self
            .dir
            .path()
            .join(format!("{}-{bytes}-v{version}.onnx", opts.name));
        let model = onnx::example_model_of_size(version, bytes);
        std::fs::write(&path, model).expect("model file");
        self.publish_with(&path, &opts)
    }

    /// Publishes an ONNX file as `name` at `version`.
    pub fn publish_file(&self, path: &Path, name: &str, version: u64) -> Manifest {
        self.publish_with(path, &PublishOptions::new(name, version))
    }

    /// Publishes an ONNX file with every option.
    pub fn publish_with(&self, path: &Path, opts: &PublishOptions) -> Manifest {
        let keys = keyset::read_role_keys(&self.keys, "targets").expect("targets keys");
        let root = keyset::read_root(&self.keys.join("root.json")).expect("root.json");
        publish_file(
            &self.client,
            path,
            opts,
            &keys,
            &root,
            "e2e",
            modelcast_server::unix_now(),
        )
        .expect("publish")
        .manifest
    }

    /// Publishes `manifest`, whose files are uploaded already, as `modelcast publish` signs
    /// it: the repository verified from the operators' root, the version's hash bin re-signed
    /// with this fleet's targets keys (`newest`: the model's newest published version).
    /// Returns the size of the publish request in bytes.
    pub fn publish_manifest(&self, manifest: &Manifest, newest: Option<u64>) -> usize {
        let keys = keyset::read_role_keys(&self.keys, "targets").expect("targets keys");
        let signers: Vec<_> = keys.iter().collect();
        let root = keyset::read_root(&self.keys.join("root.json")).expect("root.json");
        let upload = modelcast_ops::signing::Repository::open(&self.client, &root)
            .expect("the repository verifies")
            .add(manifest, newest, &signers, modelcast_server::unix_now())
            .expect("signing the addition");
        let request = modelcast_server::api::PublishRequest {
            upload,
            published_by: "e2e".into(),
            key_escrow: Default::default(),
        };
        let size = serde_json::to_vec(&request).expect("a request").len();
        self.client.publish(&request).expect("publish");
        size
    }

    /// Deploys `model` `version` to `group`.
    pub fn deploy(&self, model: &str, version: u64, group: &str) {
        self.deploy_with(model, version, group, None);
    }

    /// Deploys with a rollout's probation thresholds.
    pub fn deploy_with(
        &self,
        model: &str,
        version: u64,
        group: &str,
        probation: Option<modelcast_proto::desired::TrialThresholds>,
    ) {
        self.send_deploy(DeployRequest {
            probation,
            ..Self::deployment(model, version, group)
        });
    }

    /// Deploys with a download policy (rate, maintenance window, metered links).
    pub fn deploy_policy(
        &self,
        model: &str,
        version: u64,
        group: &str,
        download: modelcast_proto::desired::DownloadPolicy,
    ) {
        self.send_deploy(DeployRequest {
            download: Some(download),
            ..Self::deployment(model, version, group)
        });
    }

    /// Deploys with sampling of inputs and outputs turned on (`None`: off).
    pub fn deploy_sampled(
        &self,
        model: &str,
        version: u64,
        group: &str,
        sampling: Option<modelcast_proto::desired::SamplingSpec>,
    ) {
        self.send_deploy(DeployRequest {
            sampling,
            ..Self::deployment(model, version, group)
        });
    }

    /// Deploys `model` v`version` to `group` as `e2e`, pinned to `backend`.
    pub fn deploy_pinned(
        &self,
        model: &str,
        version: u64,
        group: &str,
        backend: modelcast_proto::engine::Backend,
    ) {
        self.send_deploy(DeployRequest {
            backend: Some(backend),
            ..Self::deployment(model, version, group)
        });
    }

    /// Deploys with a shadow phase on each device before the version serves there.
    pub fn deploy_shadowed(
        &self,
        model: &str,
        version: u64,
        group: &str,
        shadow: modelcast_proto::desired::ShadowSpec,
    ) {
        self.send_deploy(DeployRequest {
            shadow: Some(shadow),
            ..Self::deployment(model, version, group)
        });
    }

    /// Deploys with a traffic split while the version is on probation.
    pub fn deploy_canary(
        &self,
        model: &str,
        version: u64,
        group: &str,
        canary: modelcast_proto::desired::CanarySpec,
    ) {
        self.send_deploy(DeployRequest {
            canary: Some(canary),
            ..Self::deployment(model, version, group)
        });
    }

    /// A deployment by `e2e` with no terms of its own.
    fn deployment(model: &str, version: u64, group: &str) -> DeployRequest {
        DeployRequest {
            by: "e2e".into(),
            ..DeployRequest::new(model, version, group)
        }
    }

    fn send_deploy(&self, request: DeployRequest) {
        self.client.deploy(&request).expect("deploy");
    }

    /// Starts a rollout as `e2e`.
    pub fn start_rollout(
        &self,
        spec: modelcast_server::rollout::RolloutSpec,
    ) -> modelcast_server::rollout::Rollout {
        self.client
            .start_rollout(&modelcast_server::api::RolloutRequest {
                spec,
                by: "e2e".into(),
            })
            .expect("rollout starts")
    }

    /// The last report of `device`.
    pub fn report(&self, device: &str) -> Option<DeviceReport> {
        self.client
            .devices()
            .ok()?
            .into_iter()
            .find(|d| d.id == device)?
            .report
    }

    /// Waits until some device has registered with the server.
    pub fn wait_registered(&self) {
        self.wait_devices(1);
    }

    /// Waits until at least `n` devices have registered.
    pub fn wait_devices(&self, n: usize) {
        wait_for(
            &format!("{n} devices registered"),
            Duration::from_secs(30),
            || (self.client.devices().ok()?.len() >= n).then_some(()),
        );
    }

    /// Waits until `device` reports `model` serving `version`.
    pub fn wait_serving(&self, device: &str, model: &str, version: u64) {
        wait_for(
            &format!("{device} to serve {model} v{version}"),
            Duration::from_secs(60),
            || {
                let r = self.report(device)?;
                (r.models.get(model)?.serving_version() == Some(version)).then_some(())
            },
        );
    }

    /// Waits until `device`'s last error contains `needle`; returns the reason.
    pub fn wait_error(&self, device: &str, needle: &str) -> String {
        // The errors seen while waiting, for the failure message.
        let mut seen: Vec<String> = Vec::new();
        let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_for(
                &format!("{device} to report an error containing {needle:?}"),
                Duration::from_secs(60),
                || {
                    let reason = self.report(device)?.last_error?.reason;
                    if seen.last() != Some(&reason) && seen.len() < 20 {
                        seen.push(reason.clone());
                    }
                    reason.contains(needle).then_some(reason)
                },
            )
        }));
        match found {
            Ok(reason) => reason,
            Err(_) => panic!(
                "timed out after 60 s waiting for {device} to report an error containing {needle:?}; it reported: {seen:#?}"
            ),
        }
    }

    /// Starts an agent `id` with `labels`, connected to this fleet's broker.
    pub fn start_agent(&self, id: &str, labels: &[(&str, &str)]) -> Agent {
        Agent::new(self, id, labels, AgentOptions::default())
    }

    /// [`Fleet::start_agent`] with more TOML appended to its config (e.g. a `[probation]`
    /// section).
    pub fn start_agent_with(&self, id: &str, labels: &[(&str, &str)], toml: &str) -> Agent {
        let options = AgentOptions {
            extra: toml.into(),
            ..AgentOptions::default()
        };
        Agent::new(self, id, labels, options)
    }

    /// [`Fleet::start_agent`] with every option.
    pub fn start_agent_opts(
        &self,
        id: &str,
        labels: &[(&str, &str)],
        options: AgentOptions,
    ) -> Agent {
        Agent::new(self, id, labels, options)
    }

    /// The server's log tail.
    pub fn server_log(&self) -> String {
        self.server.log_tail(60)
    }

    /// How many times the server's whole log contains `needle`.
    pub fn server_log_count(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.server.log)
            .unwrap_or_default()
            .matches(needle)
            .count()
    }

    /// Whether the server's whole log contains `needle`.
    pub fn server_logged(&self, needle: &str) -> bool {
        std::fs::read_to_string(&self.server.log)
            .unwrap_or_default()
            .contains(needle)
    }
}

/// Waits up to 20 s for the server's API; a server that ended before it answered fails the
/// wait at once with its exit status and log, one still running with its process id.
fn wait_for_api(server: &mut Proc, client: &Client, what: &str) {
    let waiting = format!("{what} (the server, pid {}, still runs)", server.child.id());
    wait_for(&waiting, Duration::from_secs(20), || {
        if let Some(status) = server.exited() {
            panic!(
                "the server ended ({status}) before {what} answered; its log:\n{}",
                std::fs::read_to_string(&server.log).unwrap_or_default()
            );
        }
        client.devices().ok()
    });
}
