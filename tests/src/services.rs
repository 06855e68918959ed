//! The real servers the tests run: mosquitto (plain, or with TLS and the project's ACL) and
//! PostgreSQL, and nginx serving files, each in a directory of its own on a free loopback port.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{free_port, wait_for, Proc};

/// Debian's mosquitto on a free port.
pub struct Mosquitto {
    proc: Proc,
    conf: PathBuf,
    port: u16,
    pki: Option<PathBuf>,
    log: PathBuf,
    claim_port: Option<u16>,
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
        Self::start_tls_claims(dir, &[])
    }

    /// [`Mosquitto::start_tls`] with the claim credentials of `batches` issued in its PKI
    /// (`claim-<batch>.pem`) and, with any, a second listener for devices enrolling by claim
    /// ([`Mosquitto::claim_port`]).
    pub fn start_tls_claims(dir: &Path, batches: &[&str]) -> Mosquitto {
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
        for batch in batches {
            pki::claim(&pki_dir, batch).expect("claim credential");
        }
        let claim_acl = dir.join(format!("mosquitto-{port}-claims.acl"));
        std::fs::write(&claim_acl, acl::claim_acl("modelcast")).expect("claim acl");
        let claim_port = (!batches.is_empty()).then(free_port);
        let mut text = acl::mosquitto_conf(&acl::MosquittoSetup {
            listen_host: "127.0.0.1",
            port,
            pki_dir: &pki_dir,
            acl_file: &acl_file,
            claims: claim_port.map(|p| (p, claim_acl.as_path())),
        });
        text.push_str("persistence false\nlog_type all\n");
        let conf = dir.join(format!("mosquitto-{port}.conf"));
        std::fs::write(&conf, text).expect("mosquitto config");
        let mut m = Self::spawn(dir, port, &conf, Some(pki_dir));
        m.claim_port = claim_port;
        m
    }

    /// The listener of devices enrolling by claim, if it has one.
    pub fn claim_port(&self) -> Option<u16> {
        self.claim_port
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
            claim_port: None,
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
        let mut restarted = Self::spawn(
            self.log.parent().expect("log dir"),
            self.port,
            &self.conf,
            self.pki.clone(),
        );
        restarted.claim_port = self.claim_port;
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

/// Debian's nginx, serving a directory of files as a static host or CDN would (byte ranges
/// included), on a free port.
pub struct Nginx {
    _proc: Proc,
    port: u16,
    tls: bool,
}

impl Nginx {
    /// Serves `root`'s files under `http://127.0.0.1:PORT/models/`; its config, logs and
    /// temporary files in `dir`.
    pub fn serve(dir: &Path, root: &Path) -> Nginx {
        Self::start(dir, root, None)
    }

    /// [`Nginx::serve`] over HTTPS (`https://127.0.0.1:PORT/models/`) with the certificate
    /// chain `cert` and its key `key` (PEM).
    pub fn serve_tls(dir: &Path, root: &Path, cert: &Path, key: &Path) -> Nginx {
        Self::start(dir, root, Some((cert, key)))
    }

    fn start(dir: &Path, root: &Path, tls: Option<(&Path, &Path)>) -> Nginx {
        let port = free_port();
        let (listen, certs) = match tls {
            Some((cert, key)) => (
                format!("{port} ssl"),
                format!(
                    "    ssl_certificate {};\n    ssl_certificate_key {};\n",
                    cert.display(),
                    key.display()
                ),
            ),
            None => (port.to_string(), String::new()),
        };
        let here = dir.join(format!("nginx-{port}"));
        std::fs::create_dir_all(here.join("tmp")).expect("nginx dir");
        let conf = here.join("nginx.conf");
        let d = here.display();
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nuser root;\nworker_processes 1;\npid {d}/nginx.pid;\n\
                 error_log {d}/error.log;\nevents {{ worker_connections 64; }}\n\
                 http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/tmp;\n\
                   proxy_temp_path {d}/tmp;\n  fastcgi_temp_path {d}/tmp;\n\
                   uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n\
                   server {{\n    listen 127.0.0.1:{listen};\n{certs}\
                     location /models/ {{ alias {}/; }}\n  }}\n}}\n",
                root.display()
            ),
        )
        .expect("nginx config");
        let exe = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("nginx is installed (tests/run.sh installs it)");
        let proc = Proc::spawn(
            Command::new(exe).arg("-p").arg(&here).arg("-c").arg(&conf),
            here.join("stderr.log"),
        );
        wait_for("nginx to listen", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Nginx {
            _proc: proc,
            port,
            tls: tls.is_some(),
        }
    }

    /// The base URL of the files it serves.
    pub fn base(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}/models", self.port)
    }

    /// How many requests it answered with `status` (from its access log).
    pub fn answered(&self, dir: &Path, status: u16) -> usize {
        let log = dir.join(format!("nginx-{}", self.port)).join("access.log");
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&format!("\" {status} ")))
            .count()
    }
}
