//! The real-model corpus (`tests/corpus/models.tsv`, fetched by `tests/corpus/setup.sh`):
//! its rows, where the models and the Python environment are, and publishing the ones that
//! serve to a fleet as an operator would. Used by `tests/corpus.rs` and `bench-models`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use modelcast_ops::publish::PublishOptions;
use modelcast_proto::report::Phase;

use crate::{free_port, wait_for, Agent, Fleet};

/// One model of the corpus.
pub struct Row {
    /// Its id: model name and file name in the cache.
    pub id: String,
    /// Where it comes from, as `package version`.
    pub source: String,
    /// The `modelcast publish` flags it needs.
    pub publish_args: Vec<String>,
    /// `serve`, `differs:<why>` or `refuse:<words>`.
    pub expect: String,
}

impl Row {
    /// Whether it is published and served (as known to agree with onnxruntime or not).
    pub fn serves(&self) -> bool {
        self.expect == "serve" || self.expect.starts_with("differs:")
    }

    /// The publish options its flags say.
    pub fn options(&self) -> PublishOptions {
        let mut opts = PublishOptions::new(&self.id, 1);
        let mut args = self.publish_args.iter();
        while let Some(flag) = args.next() {
            let value = args.next().expect("flag value");
            match flag.as_str() {
                "--input-shape" => opts.shapes.push(value.parse().expect("shape spec")),
                "--format" => opts.format = value.parse().expect("format"),
                other => panic!("models.tsv: unknown publish flag {other}"),
            }
        }
        opts
    }
}

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The cache folder (`MODELCAST_CACHE`, else `.cache` in the repository).
pub fn cache() -> PathBuf {
    std::env::var_os("MODELCAST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".cache"))
}

/// The fetched models' folder; panics with what to run when it is missing.
pub fn models_dir() -> PathBuf {
    let dir = cache().join("corpus");
    assert!(
        python().exists() && dir.is_dir(),
        "the corpus is not fetched: run tests/corpus/setup.sh (tests/run.sh does)"
    );
    dir
}

/// The corpus' Python (onnxruntime, tritonclient).
pub fn python() -> PathBuf {
    cache().join("python/bin/python")
}

/// ONNX Runtime's shared library, as the `onnxruntime` Python package of the corpus'
/// environment ships it (`onnxruntime/capi/libonnxruntime.so.*`).
pub fn onnxruntime_library() -> PathBuf {
    let lib = cache().join("python").join("lib");
    let found = std::fs::read_dir(&lib)
        .into_iter()
        .flatten()
        .flatten()
        .map(|py| py.path().join("site-packages/onnxruntime/capi"))
        .flat_map(|capi| std::fs::read_dir(capi).into_iter().flatten().flatten())
        .map(|f| f.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so"))
        });
    found.unwrap_or_else(|| {
        panic!(
            "no libonnxruntime.so under {}: run tests/corpus/setup.sh (tests/run.sh does)",
            lib.display()
        )
    })
}

/// The rows of `models.tsv`.
pub fn rows() -> Vec<Row> {
    let text = std::fs::read_to_string(repo().join("tests/corpus/models.tsv")).expect("models.tsv");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 10, "models.tsv row {l:?}");
            Row {
                id: f[0].into(),
                source: format!("{} {}", f[1], f[2]),
                publish_args: match f[6] {
                    "-" => vec![],
                    args => args.split_whitespace().map(String::from).collect(),
                },
                expect: f[8].into(),
            }
        })
        .collect()
}

/// Publishes every serving row to `fleet`, deploys it to `group`, and waits until `device`
/// serves them all (failing fast on a model the device rejects). Returns their ids.
pub fn publish_and_serve(fleet: &Fleet, group: &str, device: &str) -> Vec<String> {
    publish_and_serve_as(fleet, group, device, |_| {})
}

/// [`publish_and_serve`], every model's publishing options changed by `adjust` (a format, a
/// second form, tolerances).
pub fn publish_and_serve_as(
    fleet: &Fleet,
    group: &str,
    device: &str,
    adjust: impl Fn(&mut modelcast_ops::publish::PublishOptions),
) -> Vec<String> {
    let dir = models_dir();
    let mut serving = Vec::new();
    let mut golden_files = 0;
    for row in rows().into_iter().filter(Row::serves) {
        let mut opts = row.options();
        adjust(&mut opts);
        let m = fleet.publish_with(&dir.join(format!("{}.onnx", row.id)), &opts);
        // Every device checks the model's golden vector before it serves: in the manifest
        // when small, else in a golden file downloaded beside the artifact.
        let golden = match (&m.golden_file, m.golden.len()) {
            (Some(g), _) => {
                golden_files += 1;
                format!("golden file of {} bytes", g.size)
            }
            (None, 1) => "golden vector in the manifest".to_string(),
            _ => panic!(
                "{} published without a golden vector: {:?}",
                row.id,
                m.metadata.get("golden")
            ),
        };
        println!(
            "{:22} published as {} ({} bytes, {golden}), inputs {}",
            row.id,
            m.model_format,
            m.size,
            m.inputs
                .iter()
                .map(|i| format!("{} {} {}", i.name, i.datatype, i.describe_shape()))
                .collect::<Vec<_>>()
                .join("; ")
        );
        fleet.deploy(&row.id, 1, group);
        serving.push(row.id);
    }
    for id in &serving {
        // Staging runs at background priority (nice 10 and lower): with the rest of the suite
        // busy on a 2-core machine, the FP16 model (no FP16 kernels on x86, seconds a run)
        // once took over 300 s to stage.
        wait_for(
            &format!("{device} to serve {id}"),
            Duration::from_secs(600),
            || {
                let r = fleet.report(device)?;
                let state = r.models.get(id)?;
                // A rejected update ends in the failed phase (a stalled download only retries).
                if state.update.as_ref().map(|u| u.phase) == Some(Phase::Failed) {
                    let why = r.last_error.as_ref().map_or("", |e| e.reason.as_str());
                    panic!("{device} rejected {id}: {why}");
                }
                (state.serving_version() == Some(1)).then_some(())
            },
        );
    }
    // The image models' golden vectors (a 224×224 frame is 600 KB) travel as files.
    assert!(golden_files >= 3, "{golden_files} golden files");
    serving
}

/// Starts device `id` in `group` (`key=value`) with the gRPC API on too and `extra` TOML in
/// its configuration; returns it and its gRPC port, once the server knows it.
pub fn start_agent_with_grpc(
    fleet: &Fleet,
    id: &str,
    group: (&str, &str),
    extra: &str,
) -> (Agent, u16) {
    let grpc_port = free_port();
    let agent = fleet.start_agent_with(
        id,
        &[group],
        &format!("[serve]\ngrpc_listen = \"127.0.0.1:{grpc_port}\"\n{extra}"),
    );
    fleet.wait_registered();
    (agent, grpc_port)
}

/// Runs one of the corpus' Python scripts against `agent` (HTTP and gRPC) for the `serving`
/// models; returns its exit status, having let it print.
pub fn run_script(
    script: &str,
    agent: &Agent,
    grpc_port: u16,
    serving: &[String],
) -> std::process::Output {
    std::process::Command::new(python())
        .arg(repo().join("tests/corpus").join(script))
        .arg(format!("127.0.0.1:{}", agent.http_port))
        .arg(format!("127.0.0.1:{grpc_port}"))
        .arg(repo().join("tests/corpus/models.tsv"))
        .arg(models_dir())
        .args(serving)
        .stdout(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("the corpus' Python runs")
}
