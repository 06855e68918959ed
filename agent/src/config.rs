//! The agent's configuration: a TOML file, overridden by environment variables and flags.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use modelcast_proto::engine::{Backend as Pin, Engines};
use modelcast_proto::manifest::ModelFormat;
use serde::Deserialize;
use thiserror::Error;

/// A configuration that cannot be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this config.
    #[error("parsing {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// Where the agent's trust comes from.
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// The operators' TUF `root.json` the device is provisioned with.
    pub root: PathBuf,
    /// The director's ed25519 public keys (hex), pinned.
    pub director_keys: Vec<String>,
    /// How many director keys must sign (default 1).
    #[serde(default = "one")]
    pub director_threshold: u32,
}

fn one() -> u32 {
    1
}

/// The agent's TLS material for an `mqtts://` broker (PEM files).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The fleet CA that signed the broker's certificate (the only trust anchor).
    pub ca: PathBuf,
    /// This device's client certificate (common name = device id).
    pub cert: Option<PathBuf>,
    /// Its private key.
    pub key: Option<PathBuf>,
}

/// Enrolment by claim: the device has no certificate made for it by hand, but its batch's
/// claim credential (`modelcast pki claim <batch>`). At its first start it makes its own key,
/// asks the fleet server for a certificate over the claim, and renews it before it ends
/// ([`crate::enrol`], [`crate::identity`]). Needs an `mqtts://` broker and `[tls] ca`, with
/// no `cert` or `key` there.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EnrolConfig {
    /// The claim's name: the batch given to `modelcast pki claim`.
    pub claim: String,
    /// The claim's certificate (PEM).
    pub claim_cert: PathBuf,
    /// Its private key (PEM).
    pub claim_key: PathBuf,
    /// Where to enrol (`mqtts://host:port`): mosquitto's claim listener; by default the
    /// broker itself (the embedded broker takes claims on its one port).
    #[serde(default)]
    pub claim_broker: Option<String>,
    /// Keep the device's TLS key and its sealing key in a PKCS#11 token instead of files
    /// (feature `pkcs11`).
    #[serde(default)]
    pub pkcs11: Option<Pkcs11Config>,
}

/// A PKCS#11 token holding the device's TLS key ([`crate::identity`]) and its sealing key
/// ([`crate::sealing`]).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    /// The token's PKCS#11 module, loaded at run time (SoftHSM2:
    /// `/usr/lib/softhsm/libsofthsm2.so`).
    pub module: PathBuf,
    /// The token's label.
    pub token: String,
    /// A file holding the user PIN (keep it 0600).
    pub pin_file: PathBuf,
    /// The TLS key pair's label in the token (made there at the first start).
    #[serde(default = "default_key_label")]
    pub key_label: String,
    /// The sealing key pair's label in the token (confidential models; made there at the first
    /// start, P-256, for ECDH only). With it, no `sealing.key` file is made or read.
    #[serde(default = "default_sealing_label")]
    pub sealing_label: String,
    /// Keep the sealing key in the token (default). `false` keeps it in `sealing.key` in the
    /// state directory, for a token that cannot do ECDH on P-256 (`CKM_ECDH1_DERIVE`) or
    /// hand back the derived secret: the agent does not start with a sealing key it cannot
    /// use, and says so.
    #[serde(default = "default_true")]
    pub sealing_in_token: bool,
}

fn default_true() -> bool {
    true
}

fn default_sealing_label() -> String {
    "modelcast-sealing".into()
}

fn default_key_label() -> String {
    "modelcast-device".into()
}

/// Chunk transfer tuning.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TransferConfig {
    /// Chunks requested and not yet received, at most.
    pub window: usize,
    /// Seconds without any chunk stored before the ones in flight are requested again.
    pub chunk_timeout_secs: u64,
    /// Seconds without any new chunk before the download is reported as stalled (slow
    /// retrieval); it keeps retrying.
    pub stall_timeout_secs: u64,
    /// Listen on each artifact's shared topic while downloading it, so the server can publish
    /// a chunk once for every device that wants it. Off: every chunk comes on the device's
    /// own topic.
    pub shared_topic: bool,
    /// The device's link is metered (an LTE modem billed by the byte, say) at start: it
    /// downloads only versions whose deployment allows metered links. The local API changes
    /// it at run time (`PUT /v1/link` from the device itself).
    pub metered: bool,
}

impl Default for TransferConfig {
    fn default() -> Self {
        TransferConfig {
            window: 64,
            chunk_timeout_secs: 5,
            stall_timeout_secs: 60,
            shared_topic: true,
            metered: false,
        }
    }
}

/// The whole agent configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This device's id (MQTT client id and topic segment); defaults to the host name.
    #[serde(default = "default_device_id")]
    pub device_id: String,
    /// Labels by which operators group devices.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Directory of the sled store.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// MQTT broker, `mqtt://host:port`.
    #[serde(default = "default_broker")]
    pub broker: String,
    /// Topic prefix.
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    /// Address of the local inference API.
    #[serde(default = "default_http")]
    pub http_listen: SocketAddr,
    /// Trust anchors.
    pub trust: TrustConfig,
    /// TLS for the broker connection; required by an `mqtts://` broker.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Enrolment by claim, in place of a certificate made by hand.
    #[serde(default)]
    pub enrol: Option<EnrolConfig>,
    /// Transfer tuning.
    #[serde(default)]
    pub transfer: TransferConfig,
    /// How new versions are judged on live traffic before they are committed.
    #[serde(default)]
    pub probation: crate::probation::ProbationPolicy,
    /// Telemetry reports: interval and the store-and-forward queue's bounds.
    #[serde(default)]
    pub telemetry: crate::telemetry::TelemetryConfig,
    /// The inference API's limits.
    #[serde(default)]
    pub serve: ServeConfig,
    /// How the engine runs models.
    #[serde(default)]
    pub engine: EngineConfig,
}

/// How the engine runs models (`[engine]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// What runs ONNX artifacts: `tract` (the default; every agent has it), `onnxruntime`
    /// (agents built with the `ort` feature, with ONNX Runtime's library at
    /// `onnxruntime_library`), or `auto`: each version staged on every backend that can run
    /// it, the fastest at warm-up that passes its golden vectors serving. NNEF artifacts
    /// always run on tract.
    #[serde(default)]
    pub backend: Backend,
    /// ONNX Runtime's shared library (`libonnxruntime.so`), loaded at run time: nothing of it
    /// is linked into the agent. On a Jetson, the library of an ONNX Runtime build for
    /// JetPack (with its CUDA and TensorRT providers).
    #[serde(default)]
    pub onnxruntime_library: Option<PathBuf>,
    /// ONNX Runtime's execution providers in order of preference (`tensorrt`, `cuda`, `cpu`):
    /// one the library or the device lacks is skipped for the next; the CPU is always last.
    #[serde(default = "default_providers")]
    pub providers: Vec<Provider>,
    /// Threads one inference may spread its matrix products over (tract's multithreaded
    /// matmul; agents built with the `multithread` feature). 1, the default, runs each request
    /// on one core and requests side by side: best for throughput; more lowers one request's
    /// latency on a device with idle cores.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Optimized plans kept per model whose inputs have ranges, one per concrete input shape
    /// seen, least recently used dropped first.
    #[serde(default = "default_plan_cache")]
    pub plan_cache: usize,
    /// When a new version does not fit in memory beside the serving one (by the memory its
    /// manifest says it took at publishing, against `MemAvailable` and the agent's memory
    /// cgroups): `true` (the default) swaps them one after the other, answering 503 with
    /// `Retry-After` for that model meanwhile; `false` refuses the version instead.
    #[serde(default = "yes")]
    pub low_memory_swap: bool,
    /// How tract computes FP16 models: `f32` (the default: widened when they load, FP16 still
    /// at the API; this agent has no FP16 kernels, so it is ~1,000x faster) or `f16` (as the
    /// model says, emulated: half the weight memory).
    #[serde(default)]
    pub fp16: crate::engine::tract::Fp16,
    /// The backend came from a deployment's pin, not from this file (set by
    /// [`EngineConfig::pinned`]).
    #[serde(skip)]
    pub pinned: bool,
}

/// What runs ONNX artifacts (`[engine] backend`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// tract, on the CPU.
    #[default]
    Tract,
    /// ONNX Runtime, with its execution providers.
    Onnxruntime,
    /// Measured at staging, per version.
    Auto,
}

/// One of ONNX Runtime's execution providers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// NVIDIA TensorRT.
    Tensorrt,
    /// NVIDIA CUDA.
    Cuda,
    /// The CPU.
    Cpu,
}

fn default_providers() -> Vec<Provider> {
    vec![Provider::Tensorrt, Provider::Cuda, Provider::Cpu]
}

fn yes() -> bool {
    true
}

fn default_threads() -> usize {
    1
}

fn default_plan_cache() -> usize {
    crate::engine::DEFAULT_PLAN_CACHE
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            backend: Backend::default(),
            onnxruntime_library: None,
            providers: default_providers(),
            threads: default_threads(),
            plan_cache: default_plan_cache(),
            fp16: Default::default(),
            low_memory_swap: true,
            pinned: false,
        }
    }
}

impl EngineConfig {
    /// Whether ONNX Runtime can run here: built in, and its library configured.
    pub fn has_onnxruntime(&self) -> bool {
        cfg!(feature = "ort") && self.onnxruntime_library.is_some()
    }

    /// What this agent runs, for its report: each backend with the artifact forms it loads,
    /// and the forms it would rather receive under this configuration (the director sends
    /// the first a version comes in).
    pub fn engines(&self) -> Engines {
        let mut tract = vec![ModelFormat::Nnef];
        if cfg!(feature = "onnx") {
            tract.push(ModelFormat::Onnx);
        }
        let mut backends = BTreeMap::from([(Pin::Tract, tract.clone())]);
        let prefer = if self.has_onnxruntime() {
            backends.insert(Pin::Onnxruntime, vec![ModelFormat::Onnx]);
            match self.backend {
                Backend::Tract => tract,
                // ONNX for ONNX Runtime; under `auto` tract is measured on the same bytes.
                Backend::Onnxruntime | Backend::Auto => vec![ModelFormat::Onnx, ModelFormat::Nnef],
            }
        } else {
            tract
        };
        Engines { prefer, backends }
    }

    /// This configuration under a deployment's `pin`: its backend in place of the configured
    /// one, when this agent has it (a pin to a backend it lacks leaves the configured choice).
    pub fn pinned(&self, pin: Option<Pin>) -> EngineConfig {
        let mut cfg = self.clone();
        let backend = match pin {
            Some(Pin::Tract) => Backend::Tract,
            Some(Pin::Onnxruntime) if self.has_onnxruntime() => Backend::Onnxruntime,
            _ => return cfg,
        };
        cfg.backend = backend;
        cfg.pinned = true;
        cfg
    }
}

/// Limits of the local inference API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// Largest request body accepted, JSON header and binary tensors together (default
    /// 128 MiB: four 1080p RGB frames as FP32, or forty as UINT8).
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Largest single input tensor, in bytes (default: the body limit).
    #[serde(default)]
    pub max_tensor_bytes: Option<usize>,
    /// Address of the same API over gRPC (KServe v2's `inference.GRPCInferenceService`, as
    /// `tritonclient.grpc` speaks it; agents built with the `grpc` feature). Off when unset.
    #[serde(default)]
    pub grpc_listen: Option<SocketAddr>,
}

fn default_max_body() -> usize {
    128 << 20
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            max_body_bytes: default_max_body(),
            max_tensor_bytes: None,
            grpc_listen: None,
        }
    }
}

impl ServeConfig {
    /// The per-tensor limit in force.
    pub fn tensor_limit(&self) -> usize {
        self.max_tensor_bytes
            .unwrap_or(self.max_body_bytes)
            .min(self.max_body_bytes)
    }
}

fn default_device_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/modelcast")
}
fn default_broker() -> String {
    "mqtt://127.0.0.1:1883".into()
}
fn default_prefix() -> String {
    "modelcast".into()
}
fn default_http() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

impl Config {
    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.into(),
                source,
            },
            e => e,
        })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            source: Box::new(e),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that TOML's types do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !modelcast_proto::manifest::valid_name(&self.device_id) {
            return Err(ConfigError::Invalid(format!(
                "device_id {:?} must be 1-64 of [A-Za-z0-9._-]",
                self.device_id
            )));
        }
        let p = &self.probation;
        if !(0.0..=1.0).contains(&p.max_error_rate)
            || !(1.0..).contains(&p.max_p99_ratio)
            || !(0.0..=60_000.0).contains(&p.p99_slack_ms)
        {
            return Err(ConfigError::Invalid(
                "probation: max_error_rate must be within 0..1, max_p99_ratio at least 1 and \
                 p99_slack_ms within 0..60000"
                    .into(),
            ));
        }
        if self.trust.director_keys.is_empty() {
            return Err(ConfigError::Invalid("trust.director_keys is empty".into()));
        }
        if self.transfer.chunk_timeout_secs == 0
            || self.transfer.stall_timeout_secs < self.transfer.chunk_timeout_secs
        {
            return Err(ConfigError::Invalid(
                "transfer: chunk_timeout_secs must be at least 1 and stall_timeout_secs at least chunk_timeout_secs".into(),
            ));
        }
        if !(1..=256).contains(&self.engine.threads)
            || !(1..=1024).contains(&self.engine.plan_cache)
        {
            return Err(ConfigError::Invalid(
                "engine: threads must be 1..=256 and plan_cache 1..=1024".into(),
            ));
        }
        if self.engine.threads > 1 && !cfg!(feature = "multithread") {
            return Err(ConfigError::Invalid(
                "engine.threads > 1 needs an agent built with the `multithread` feature".into(),
            ));
        }
        if self.transfer.window == 0 || self.transfer.window > 256 {
            return Err(ConfigError::Invalid(
                "transfer.window must be 1..=256".into(),
            ));
        }
        let broker = self.broker_url()?;
        match (&self.tls, broker.tls) {
            (None, true) => {
                return Err(ConfigError::Invalid(
                    "an mqtts:// broker needs a [tls] section with at least `ca`".into(),
                ))
            }
            (Some(_), false) => {
                return Err(ConfigError::Invalid(
                    "[tls] is set but the broker address is not mqtts://".into(),
                ))
            }
            (Some(t), true) if t.cert.is_some() != t.key.is_some() => {
                return Err(ConfigError::Invalid(
                    "tls.cert and tls.key go together".into(),
                ))
            }
            _ => {}
        }
        if let Some(e) = &self.enrol {
            match &self.tls {
                Some(t) if broker.tls && t.cert.is_none() => {}
                _ => {
                    return Err(ConfigError::Invalid(
                        "[enrol] needs an mqtts:// broker and [tls] with `ca` only (the device's \
                         certificate comes from enrolment)"
                            .into(),
                    ))
                }
            }
            if !modelcast_proto::manifest::valid_name(&e.claim) {
                return Err(ConfigError::Invalid(format!(
                    "enrol.claim {:?} must be 1-64 of [A-Za-z0-9._-]",
                    e.claim
                )));
            }
            if e.pkcs11.is_some() && !cfg!(feature = "pkcs11") {
                return Err(ConfigError::Invalid(
                    "enrol.pkcs11 needs an agent built with the `pkcs11` feature".into(),
                ));
            }
            if let Some(t) = e.pkcs11.as_ref().filter(|t| t.sealing_in_token) {
                if t.sealing_label == t.key_label {
                    return Err(ConfigError::Invalid(format!(
                        "enrol.pkcs11: the sealing key and the TLS key need labels of their own (both are {:?})",
                        t.key_label
                    )));
                }
            }
            if let Some(url) = &e.claim_broker {
                let claim = modelcast_proto::BrokerUrl::parse(url)
                    .map_err(|e| ConfigError::Invalid(format!("enrol.claim_broker: {e}")))?;
                if !claim.tls {
                    return Err(ConfigError::Invalid(
                        "enrol.claim_broker must be mqtts://".into(),
                    ));
                }
            }
        }
        if self.engine.backend == Backend::Onnxruntime {
            if !cfg!(feature = "ort") {
                return Err(ConfigError::Invalid(
                    "engine.backend = \"onnxruntime\" needs an agent built with the `ort` feature"
                        .into(),
                ));
            }
            if self.engine.onnxruntime_library.is_none() {
                return Err(ConfigError::Invalid(
                    "engine.backend = \"onnxruntime\" needs engine.onnxruntime_library (the path \
                     of libonnxruntime.so)"
                        .into(),
                ));
            }
        }
        Ok(())
    }

    /// The broker's address and whether it speaks TLS.
    pub fn broker_url(&self) -> Result<modelcast_proto::BrokerUrl, ConfigError> {
        modelcast_proto::BrokerUrl::parse(&self.broker)
            .map_err(|e| ConfigError::Invalid(e.to_string()))
    }

    /// The rustls client configuration for an `mqtts://` broker (reads the PEM files).
    pub fn tls_client_config(&self) -> Result<Option<rustls::ClientConfig>, ConfigError> {
        let Some(tls) = &self.tls else {
            return Ok(None);
        };
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| ConfigError::Read {
                path: path.into(),
                source,
            })
        };
        let ca = read(&tls.ca)?;
        let identity = match (&tls.cert, &tls.key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            _ => None,
        };
        let identity = identity
            .as_ref()
            .map(|(cert, key)| modelcast_proto::tls::ClientIdentity {
                cert_pem: cert,
                key_pem: key,
            });
        modelcast_proto::tls::client_config(&ca, identity)
            .map(Some)
            .map_err(|e| ConfigError::Invalid(format!("tls: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_config() {
        let cfg = Config::from_toml(
            r#"
            device_id = "jetson-1"
            labels = { site = "berlin" }
            state_dir = "/tmp/x"
            broker = "mqtt://10.0.0.1:1884"
            [trust]
            root = "/etc/modelcast/root.json"
            director_keys = ["00"]
            "#,
        )
        .unwrap();
        let broker = cfg.broker_url().unwrap();
        assert_eq!((broker.host.as_str(), broker.port), ("10.0.0.1", 1884));
        assert_eq!(cfg.labels["site"], "berlin");
        assert_eq!(cfg.transfer.window, 64);
    }

    #[test]
    fn the_engine_section_bounds_threads_and_the_plan_cache() {
        let base = "device_id = 'a'\n[trust]\nroot='r'\ndirector_keys=['0']\n";
        let cfg = Config::from_toml(base).unwrap();
        assert_eq!(cfg.engine, EngineConfig::default());
        assert_eq!((cfg.engine.threads, cfg.engine.plan_cache), (1, 8));
        let with = |engine: &str| Config::from_toml(&format!("{base}[engine]\n{engine}\n"));
        assert_eq!(with("plan_cache = 32").unwrap().engine.plan_cache, 32);
        assert_eq!(with("threads = 4").is_ok(), cfg!(feature = "multithread"));
        for bad in [
            "threads = 0",
            "plan_cache = 0",
            "plan_cache = 5000",
            "surprise = 1",
        ] {
            assert!(with(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rejects_bad_values() {
        assert!(
            Config::from_toml("device_id = 'a/b'\n[trust]\nroot='r'\ndirector_keys=['0']").is_err()
        );
        assert!(Config::from_toml(
            "device_id = 'a'\nnope = 1\n[trust]\nroot='r'\ndirector_keys=['0']"
        )
        .is_err());
        let parse = modelcast_proto::BrokerUrl::parse;
        assert!(parse("mqtt://host").is_err());
        let base = "device_id = 'a'\n[trust]\nroot='r'\ndirector_keys=['0']\n";
        let tls = Config::from_toml(&format!("broker = 'mqtts://h:8883'\n{base}"));
        assert!(tls.unwrap_err().to_string().contains("[tls]"));
        let half = "[tls]\nca = 'ca.pem'\ncert = 'c.pem'\n";
        assert!(Config::from_toml(&format!("broker = 'mqtts://h:8883'\n{base}{half}")).is_err());
        let ok = "[tls]\nca = 'ca.pem'\ncert = 'c.pem'\nkey = 'c.key'\n";
        assert!(Config::from_toml(&format!("broker = 'mqtts://h:8883'\n{base}{ok}")).is_ok());
        assert!(Config::from_toml(&format!("broker = 'mqtt://h:1883'\n{base}{ok}")).is_err());
        assert_eq!(parse("[::1]:1883").unwrap().host, "::1");
    }

    #[test]
    #[cfg(feature = "pkcs11")]
    fn a_token_s_two_keys_need_labels_of_their_own() {
        let base = "device_id = 'a'\nbroker = 'mqtts://h:8883'\n[trust]\nroot='r'\ndirector_keys=['0']\n[tls]\nca = 'ca.pem'\n[enrol]\nclaim = 'line-1'\nclaim_cert = 'c.pem'\nclaim_key = 'c.key'\n[enrol.pkcs11]\nmodule = 'm.so'\ntoken = 't'\npin_file = 'pin'\n";
        let cfg = Config::from_toml(base).unwrap();
        let token = cfg.enrol.unwrap().pkcs11.unwrap();
        assert_eq!(
            (
                token.key_label.as_str(),
                token.sealing_label.as_str(),
                token.sealing_in_token
            ),
            ("modelcast-device", "modelcast-sealing", true)
        );
        let same = format!("{base}sealing_label = 'modelcast-device'\n");
        assert!(Config::from_toml(&same)
            .unwrap_err()
            .to_string()
            .contains("labels of their own"));
        // With the sealing key in a file, the label is not used.
        assert!(Config::from_toml(&format!("{same}sealing_in_token = false\n")).is_ok());
    }
}
