//! The end-to-end harness: real processes (`modelcast-server`, `modelcast-agent`, mosquitto)
//! on free 127.0.0.1 ports, real sled directories, real ONNX models. Every wait is bounded.
//!
//! - [`Fleet`]: keys, a server (embedded broker or an external one), agents, publishing.
//! - [`Agent`]: one device process with its store, inference port and config.
//! - [`Mosquitto`]: Debian's broker, started on a free port.
//! - [`Rogue`]: an attacker on the broker who signs or serves what it likes.
//! - [`proxy`]: a TCP proxy a test can cut (a network cut without privileges).
//! - [`hammer`]: clients loading a device's inference API, answers kept with their latency.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use modelcast_ops::client::Client;
use modelcast_ops::onnx;
use modelcast_ops::publish::{publish_file, PublishOptions};
use modelcast_proto::manifest::{Manifest, TensorData};
use modelcast_proto::report::DeviceReport;
use modelcast_server::keyset;

pub mod browser;
pub mod corpus;
pub mod hammer;
pub mod proxy;
pub mod sim;

/// Path of a workspace binary, building the binaries once if they are missing.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let mut dir = exe.parent().expect("target dir");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target profile dir");
    }
    let path = dir.join(name);
    if !path.exists() {
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
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "building the binaries failed");
    }
    assert!(path.exists(), "{} not found", path.display());
    path
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

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
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

/// Debian's mosquitto on a free port.
pub struct Mosquitto {
    proc: Proc,
    conf: PathBuf,
    port: u16,
    pki: Option<PathBuf>,
    log: PathBuf,
}

fn mosquitto_exe() -> &'static str {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("mosquitto is installed (tests/run.sh installs it)")
}

impl Mosquitto {
    /// Starts mosquitto with a config of its own in `dir`.
    pub fn start(dir: &Path) -> Mosquitto {
        let port = free_port();
        let conf = dir.join(format!("mosquitto-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 max_queued_messages {}\nmax_queued_bytes {}\n",
                modelcast_server::acl::SERVER_QUEUE,
                modelcast_server::acl::CLIENT_QUEUE_BYTES
            ),
        )
        .expect("mosquitto config");
        Self::spawn(dir, port, &conf, None)
    }

    /// Starts mosquitto with TLS, client certificates and the project's ACL
    /// (`modelcast pki mosquitto`), with a new PKI in `dir/pki`. Server identities:
    /// `modelcast-server` and `modelcast-server-2` (a replica; the attack tests' compromised
    /// server).
    pub fn start_tls(dir: &Path) -> Mosquitto {
        use modelcast_server::{acl, pki};
        let port = free_port();
        let pki_dir = dir.join("pki");
        pki::init(&pki_dir, &["127.0.0.1".into()]).expect("pki init");
        // Started as root, mosquitto drops to its own user before reading the key: a test PKI
        // can let everyone read it (in production: chown the key to the broker's user).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            pki_dir.join("broker.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod broker.key");
        let servers = [
            pki::SERVER_IDENTITY.to_string(),
            "modelcast-server-2".into(),
        ];
        pki::issue(&pki_dir, &servers[1]).expect("replica identity");
        let acl_file = dir.join(format!("mosquitto-{port}.acl"));
        std::fs::write(&acl_file, acl::acl("modelcast", &servers)).expect("acl");
        let mut text = acl::mosquitto_conf(&acl::MosquittoSetup {
            listen_host: "127.0.0.1",
            port,
            pki_dir: &pki_dir,
            acl_file: &acl_file,
        });
        text.push_str("persistence false\nlog_type all\n");
        let conf = dir.join(format!("mosquitto-{port}.conf"));
        std::fs::write(&conf, text).expect("mosquitto config");
        Self::spawn(dir, port, &conf, Some(pki_dir))
    }

    fn spawn(dir: &Path, port: u16, conf: &Path, pki: Option<PathBuf>) -> Mosquitto {
        let log = dir.join(format!("mosquitto-{port}.log"));
        let proc = Proc::spawn(
            Command::new(mosquitto_exe()).arg("-c").arg(conf),
            log.clone(),
        );
        wait_for("mosquitto to listen", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Mosquitto {
            proc,
            conf: conf.into(),
            port,
            pki,
            log,
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    /// Kills it (SIGKILL: no goodbye to clients) and starts it again on the same port, with
    /// the same configuration and no state (persistence is off).
    pub fn restart(&mut self) {
        self.proc.kill();
        let restarted = Self::spawn(
            self.log.parent().expect("log dir"),
            self.port,
            &self.conf,
            self.pki.clone(),
        );
        *self = restarted;
    }

    /// The PKI directory of a TLS broker.
    pub fn pki(&self) -> Option<&Path> {
        self.pki.as_deref()
    }

    /// Everything the broker logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops it.
    pub fn stop(&mut self) {
        self.proc.kill();
    }
}

/// A PostgreSQL server of Debian's packages on a free loopback port, with a cluster of its own
/// in a scratch directory; stopped (immediately) when dropped.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl Postgres {
    /// Creates a cluster and starts it; its superuser is `modelcast`, trusted on loopback.
    pub fn start() -> Postgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL is installed (tests/run.sh installs it)")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("initdb").exists())
            .max()
            .expect("a PostgreSQL version with initdb");
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        // PostgreSQL refuses to run as root: as root, run it as Debian's `postgres` user.
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(ok.success(), "chown of the cluster directory failed");
        }
        let run = |exe: &str, args: &[&std::ffi::OsStr]| {
            let mut cmd = if root {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(bin.join(exe));
                c
            } else {
                Command::new(bin.join(exe))
            };
            let out = cmd.args(args).output().expect("PostgreSQL tool");
            assert!(
                out.status.success(),
                "{exe} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let data = dir.path().join("data");
        run(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                "modelcast".as_ref(),
                "-A".as_ref(),
                "trust".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
            ],
        );
        let options = format!("-h 127.0.0.1 -p {port} -k {}", dir.path().display());
        run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-o".as_ref(),
                options.as_ref(),
                "-l".as_ref(),
                dir.path().join("postgres.log").as_os_str(),
                "-w".as_ref(),
                "start".as_ref(),
            ],
        );
        Postgres { dir, bin, port }
    }

    /// A URL of a new, empty database on it.
    pub fn database(&self, name: &str) -> String {
        self.sql("postgres", &format!("CREATE DATABASE {name}"));
        format!("postgres://modelcast@127.0.0.1:{}/{name}", self.port)
    }

    /// Runs one SQL statement in database `name`; returns psql's unaligned output.
    pub fn sql(&self, name: &str, statement: &str) -> String {
        let out = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "modelcast",
                "-At",
                "-d",
                name,
                "-c",
            ])
            .arg(statement)
            .arg("-p")
            .arg(self.port.to_string())
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "{statement}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let mut cmd = if unsafe { libc::geteuid() } == 0 {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"])
                .arg(self.bin.join("pg_ctl"));
            c
        } else {
            Command::new(self.bin.join("pg_ctl"))
        };
        let _ = cmd
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

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
        cmd.args(&self.server_args);
        self.server = Proc::spawn(&mut cmd, log);
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
        let pki = broker.pki().expect("a TLS broker").to_path_buf();
        Self::start_in(dir, Some(broker.port()), Some(pki), None, &[])
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
        let server = Proc::spawn(&mut cmd, dir.path().join("server.log"));
        let client = Client::new(&format!("http://127.0.0.1:{api_port}"));
        wait_for("the server API", Duration::from_secs(20), || {
            client.devices().ok()
        });
        Fleet {
            dir,
            keys,
            client,
            mqtt_port,
            pki,
            server,
            server_args,
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
        wait_for("the server API again", Duration::from_secs(20), || {
            self.client.devices().ok()
        });
    }

    /// Writes the example model at `version` and publishes it.
    pub fn publish_example(&self, version: u64, hidden: usize) -> Manifest {
        let path = self.dir.path().join(format!("example-v{version}.onnx"));
        std::fs::write(&path, onnx::example_model(version, hidden)).expect("model file");
        self.publish_file(&path, "classifier", version)
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
        self.deploy_request(model, version, group, probation, None);
    }

    /// Deploys with sampling of inputs and outputs turned on (`None`: off).
    pub fn deploy_sampled(
        &self,
        model: &str,
        version: u64,
        group: &str,
        sampling: Option<modelcast_proto::desired::SamplingSpec>,
    ) {
        self.deploy_request(model, version, group, None, sampling);
    }

    fn deploy_request(
        &self,
        model: &str,
        version: u64,
        group: &str,
        probation: Option<modelcast_proto::desired::TrialThresholds>,
        sampling: Option<modelcast_proto::desired::SamplingSpec>,
    ) {
        self.client
            .deploy(&modelcast_server::api::DeployRequest {
                model: model.into(),
                version,
                group: group.into(),
                by: "e2e".into(),
                probation,
                sampling,
            })
            .expect("deploy");
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
        wait_for("device registered", Duration::from_secs(30), || {
            (!self.client.devices().ok()?.is_empty()).then_some(())
        });
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

/// How an agent differs from the default test agent.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// More TOML appended to its config (e.g. a `[probation]` section).
    pub extra: String,
    /// More keys for its `[transfer]` section (e.g. `window = 8`), one per line.
    pub transfer: String,
    /// The broker port it connects to, when not the fleet's (e.g. through a [`proxy::Proxy`]).
    pub broker_port: Option<u16>,
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
}

impl Agent {
    fn new(fleet: &Fleet, id: &str, labels: &[(&str, &str)], options: AgentOptions) -> Agent {
        let AgentOptions {
            extra,
            transfer,
            broker_port,
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
        let (scheme, tls) = match &fleet.pki {
            Some(pki) => {
                let cert = modelcast_server::pki::issue(pki, id).expect("device certificate");
                let tls = format!(
                    "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                    pki.join("ca.pem").display(),
                    cert.cert.display(),
                    cert.key.display()
                );
                ("mqtts", tls)
            }
            None => ("mqtt", String::new()),
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
                .env("RUST_LOG", "info,sled=warn"),
            log,
        );
        self.proc = Some(proc);
        let url = format!("http://127.0.0.1:{}/v2/health/live", self.http_port);
        wait_for(&format!("{} API", self.id), Duration::from_secs(30), || {
            ureq::get(&url).call().ok()
        });
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

/// An attacker with a connection to the broker: a rogue client, a device gone bad, or a
/// compromised server replica, depending on the identity it connects with.
pub struct Rogue {
    client: rumqttc::Client,
    /// Its subscriptions, made again at every connection (the broker may drop one before
    /// its SUBACK: rumqttd sometimes ends a new connection once; with a clean session the
    /// subscription goes with it).
    filters: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    acks: std::sync::mpsc::Receiver<Vec<rumqttc::SubscribeReasonCode>>,
    seen: std::sync::mpsc::Receiver<(String, Vec<u8>)>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    _thread: std::thread::JoinHandle<()>,
}

/// What a rogue does to the chunks it is asked for.
#[derive(Debug, Clone, Copy)]
pub enum ChunkAttack {
    /// Flip a byte in every chunk.
    Tamper,
    /// Serve the artifact one byte short (the last chunk truncated).
    Truncate,
    /// Endless data: every chunk with 64 KiB more than the manifest declares.
    Pad,
    /// Slow retrieval: take the requests and never answer.
    Stall,
}

/// MQTT options for a TLS connection to the broker on `port` with the client certificate
/// `identity` from `pki` (issued now if it does not exist yet: a device the fleet CA vouches
/// for), as client `client_id`.
pub fn tls_options(port: u16, pki: &Path, identity: &str, client_id: &str) -> rumqttc::MqttOptions {
    let id = modelcast_server::pki::Identity::in_dir(pki, identity);
    if !id.cert.exists() {
        modelcast_server::pki::issue(pki, identity).expect("issuing a certificate");
    }
    let read = |p: &Path| std::fs::read(p).expect("PKI file");
    let (ca, cert, key) = (read(&pki.join("ca.pem")), read(&id.cert), read(&id.key));
    let tls = modelcast_proto::tls::client_config(
        &ca,
        Some(modelcast_proto::tls::ClientIdentity {
            cert_pem: &cert,
            key_pem: &key,
        }),
    )
    .expect("TLS config");
    let mut opts = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(tls)),
    ));
    opts
}

/// A chunk the rogue serves for `artifact`: its bytes, chunk size and what to do to them.
pub type RogueArtifact = (Vec<u8>, u32, ChunkAttack);

impl Rogue {
    /// Connects to the plain broker on `port`; answers chunk requests for `artifact` (the
    /// true bytes) with the attack applied.
    pub fn connect(port: u16, artifact: Option<RogueArtifact>) -> Rogue {
        // A client id no other rogue of this process has had (a reused one would let a
        // dropped rogue's session and its successor's knock each other off).
        static ROGUES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = ROGUES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("rogue-{}-{n}", std::process::id());
        let opts = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        Self::start(opts, artifact)
    }

    /// Connects over TLS with the client certificate `identity` from `pki` (issued now if
    /// it does not exist yet: a device the fleet CA vouches for).
    pub fn connect_tls(
        port: u16,
        pki: &Path,
        identity: &str,
        artifact: Option<RogueArtifact>,
    ) -> Rogue {
        Self::connect_tls_as(port, pki, identity, identity, artifact)
    }

    /// [`Rogue::connect_tls`] with a client id other than its certificate's name (a session
    /// takeover attempt).
    pub fn connect_tls_as(
        port: u16,
        pki: &Path,
        identity: &str,
        client_id: &str,
        artifact: Option<RogueArtifact>,
    ) -> Rogue {
        Self::start(tls_options(port, pki, identity, client_id), artifact)
    }

    fn start(mut opts: rumqttc::MqttOptions, artifact: Option<RogueArtifact>) -> Rogue {
        use modelcast_proto::chunk::{ChunkReply, ChunkRequest};
        use modelcast_proto::topic::{DeviceTopic, Topics};
        use rumqttc::{Event, Packet, QoS};
        opts.set_max_packet_size(8 << 20, 8 << 20);
        let (client, mut connection) = rumqttc::Client::new(opts, 64);
        let topics = Topics::new("modelcast");
        let answers = artifact.is_some();
        let filters = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        if answers {
            filters
                .lock()
                .unwrap()
                .push(topics.all_devices(DeviceTopic::Requests));
        }
        let resubscribe = (client.clone(), filters.clone());
        let (ack_tx, acks) = std::sync::mpsc::channel();
        let (seen_tx, seen) = std::sync::mpsc::channel();
        let replier = client.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            for event in connection.iter() {
                // A dropped rogue must not reconnect (and kick its successor off the broker).
                if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let p = match event {
                    Ok(Event::Incoming(Packet::Publish(p))) => p,
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let (client, filters) = &resubscribe;
                        for filter in filters.lock().unwrap().iter() {
                            let _ = client.try_subscribe(filter, QoS::AtLeastOnce);
                        }
                        continue;
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        let _ = ack_tx.send(ack.return_codes);
                        continue;
                    }
                    Ok(_) => continue,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                let is_request = matches!(
                    topics.parse_device(&p.topic),
                    Some((_, DeviceTopic::Requests))
                );
                if !is_request {
                    let _ = seen_tx.send((p.topic.clone(), p.payload.to_vec()));
                    continue;
                }
                let (Some((bytes, chunk_size, attack)), Ok(req)) =
                    (&artifact, ChunkRequest::from_slice(&p.payload))
                else {
                    continue;
                };
                let Ok(digest) = modelcast_proto::chunk::parse_digest(&req.artifact) else {
                    continue;
                };
                for index in req.indices() {
                    let start = index as usize * *chunk_size as usize;
                    if start >= bytes.len() {
                        continue;
                    }
                    let end = (start + *chunk_size as usize).min(bytes.len());
                    let mut data = bytes[start..end].to_vec();
                    match attack {
                        ChunkAttack::Tamper => data[0] ^= 0xff,
                        ChunkAttack::Truncate if end == bytes.len() => {
                            data.pop();
                        }
                        ChunkAttack::Truncate => {}
                        ChunkAttack::Pad => data.extend(std::iter::repeat_n(0u8, 64 * 1024)),
                        ChunkAttack::Stall => continue,
                    }
                    let frame = ChunkReply {
                        artifact: digest,
                        index,
                        data: &data,
                    }
                    .encode();
                    let topic = topics.device(&req.device, DeviceTopic::Chunks);
                    let _ = replier.try_publish(topic, QoS::AtLeastOnce, false, frame);
                }
            }
        });
        // The rogue answers only once the broker has taken its subscription to the requests.
        if answers {
            acks.recv_timeout(Duration::from_secs(10))
                .expect("the rogue's SUBACK within 10 s");
        }
        Rogue {
            client,
            filters,
            acks,
            seen,
            stop,
            _thread: thread,
        }
    }

    /// Publishes a retained desired state for `device`.
    pub fn publish_desired(&self, device: &str, desired: &modelcast_proto::desired::DesiredState) {
        self.publish_raw(&desired_topic(device), true, desired.to_vec());
    }

    /// Publishes any bytes on any topic (QoS 1).
    pub fn publish_raw(&self, topic: &str, retained: bool, payload: Vec<u8>) {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, retained, payload)
            .expect("publish");
    }

    /// Subscribes to `filter` and returns whether the broker granted it (bounded wait).
    pub fn subscribe(&self, filter: &str) -> bool {
        self.try_subscribe(filter, Duration::from_secs(10))
            .expect("a SUBACK within 10 s")
    }

    /// Subscribes to `filter`: whether the broker granted it, or `None` if no SUBACK came
    /// within `wait` (a broker that refused the connection, or closed it).
    pub fn try_subscribe(&self, filter: &str, wait: Duration) -> Option<bool> {
        self.filters.lock().unwrap().push(filter.to_string());
        self.client
            .subscribe(filter, rumqttc::QoS::AtLeastOnce)
            .expect("subscribe");
        let codes = self.acks.recv_timeout(wait).ok()?;
        Some(
            codes
                .iter()
                .all(|c| !matches!(c, rumqttc::SubscribeReasonCode::Failure)),
        )
    }

    /// Every message delivered to this rogue since the last call (chunk requests aside):
    /// topic and payload.
    pub fn seen(&self) -> Vec<(String, Vec<u8>)> {
        self.seen.try_iter().collect()
    }
}

/// The retained desired-state topic of `device` under the default prefix.
pub fn desired_topic(device: &str) -> String {
    modelcast_proto::topic::Topics::new("modelcast")
        .device(device, modelcast_proto::topic::DeviceTopic::Desired)
}

impl Drop for Rogue {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.client.disconnect();
    }
}

/// The fleet's real keys, as an attacker who stole them (or a test) would hold them.
pub fn stolen_keys(keys: &Path) -> modelcast_proto::verify::fixture::Keys {
    let read = |f: &str| keyset::read_key(&keys.join(f)).expect("key file");
    modelcast_proto::verify::fixture::Keys {
        root: read("root.key"),
        targets: read("targets.key"),
        snapshot: read("server.key"),
        timestamp: read("server.key"),
        director: read("server.key"),
    }
}

/// A compromised fleet server: it holds the server's online key (snapshot, timestamp,
/// director) but not the operators' offline keys, so it can only re-sign what the operators
/// already signed, with whatever versions, expiries and devices it likes.
pub struct Forger {
    online: modelcast_proto::keys::SigningKey,
    /// The operators' signed targets, as the server holds them.
    pub targets: modelcast_proto::metadata::Signed,
    /// The operators' signed hash bins, as the server holds them.
    pub bins: BTreeMap<String, modelcast_proto::metadata::Signed>,
}

impl Forger {
    /// Steals the online key from `keys` and the current targets from the server.
    pub fn steal(fleet: &Fleet) -> Forger {
        let targets = fleet
            .client
            .targets()
            .expect("targets from the API")
            .expect("published targets");
        let top: modelcast_proto::metadata::Targets = targets.parse("targets").expect("targets");
        let mut bins = BTreeMap::new();
        if let Some(s) = top.delegations.and_then(|d| d.succinct_roles) {
            for bin in 0..(1u32 << s.bit_length) {
                let role = s.role_name(bin);
                if let Some(doc) = fleet.client.delegated_targets(&role).expect("a bin") {
                    bins.insert(role, doc);
                }
            }
        }
        Forger {
            online: keyset::read_key(&fleet.keys.join("server.key")).expect("server key"),
            targets,
            bins,
        }
    }

    /// The same forger presenting `targets` (e.g. signed with a stolen or revoked key) as
    /// the operators'.
    pub fn with_targets(self, targets: modelcast_proto::metadata::Signed) -> Forger {
        Forger { targets, ..self }
    }

    /// A desired state for `device` naming `models`, with metadata version `version` and
    /// snapshot/timestamp/director expiring at `expires`.
    pub fn desired(
        &self,
        device: &str,
        models: &[Manifest],
        version: u64,
        expires: &str,
    ) -> modelcast_proto::desired::DesiredState {
        // Only the online roles' keys are used; the offline ones never leave the operators.
        let online = modelcast_proto::verify::fixture::Keys {
            root: self.online.clone(),
            targets: self.online.clone(),
            snapshot: self.online.clone(),
            timestamp: self.online.clone(),
            director: self.online.clone(),
        };
        let top: Option<modelcast_proto::metadata::Targets> = self.targets.parse("targets").ok();
        let delegated = models
            .iter()
            .filter_map(|m| modelcast_proto::bins::bin_for(top.as_ref()?, &m.target_path()))
            .filter_map(|role| Some((role.clone(), self.bins.get(&role)?.clone())))
            .collect();
        online.desired_with(&self.targets, delegated, device, models, version, expires)
    }
}
