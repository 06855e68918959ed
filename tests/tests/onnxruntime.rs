//! The ONNX Runtime backend: an agent built with the `ort` feature and configured with
//! `[engine] backend = "onnxruntime"` loads ONNX Runtime's library at run time (the one the
//! `onnxruntime` Python package ships), runs an ONNX artifact there on the first execution
//! provider of its preference that works (CUDA is missing on this machine: skipped for the
//! CPU), checks the golden vector tract computed at publishing, and answers KServe v2
//! requests as Triton names it (`onnxruntime_onnx`). NNEF artifacts stay on tract.

use modelcast_ops::convert::Choice;
use modelcast_ops::publish::PublishOptions;
use modelcast_tests::{corpus, AgentOptions, Fleet};

fn metadata(agent: &modelcast_tests::Agent, model: &str) -> serde_json::Value {
    ureq::get(format!(
        "http://127.0.0.1:{}/v2/models/{model}",
        agent.http_port
    ))
    .call()
    .unwrap()
    .body_mut()
    .read_json()
    .unwrap()
}

#[test]
fn onnx_artifacts_run_on_onnx_runtime_and_nnef_ones_on_tract() {
    let library = corpus::onnxruntime_library();
    let fleet = Fleet::embedded();
    let agent = fleet.start_agent_opts(
        "edge-1",
        &[("site", "lab")],
        AgentOptions {
            extra: format!(
                "[probation]\nrequests = 0\nseconds = 0\n[engine]\nbackend = \"onnxruntime\"\n\
                 onnxruntime_library = \"{}\"\nproviders = [\"cuda\", \"cpu\"]\n",
                library.display()
            ),
            ..AgentOptions::default()
        },
    );
    fleet.wait_registered();

    // As ONNX: on ONNX Runtime's CPU provider (no CUDA here).
    let path = fleet.dir.path().join("model.onnx");
    std::fs::write(&path, modelcast_ops::onnx::example_model(1, 64)).unwrap();
    let mut opts = PublishOptions::new("classifier", 1);
    opts.format = Choice::Onnx;
    let v1 = fleet.publish_with(&path, &opts);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);
    assert_eq!(
        agent.check_golden(&v1),
        "1",
        "tract's golden answer, within tolerance"
    );
    let m = metadata(&agent, "classifier");
    assert_eq!(m["platform"], "onnxruntime_onnx", "{m}");
    assert_eq!(m["parameters"]["engine"], "onnxruntime/cpu", "{m}");
    let log = std::fs::read_to_string(agent.log_path()).unwrap();
    assert!(log.contains("ONNX Runtime loaded"), "{log}");
    assert!(
        log.contains("execution providers skipped"),
        "CUDA skipped: {log}"
    );

    // As NNEF: tract, whatever the configuration says.
    std::fs::write(&path, modelcast_ops::onnx::example_model(2, 64)).unwrap();
    let v2 = fleet.publish_file(&path, "classifier", 2);
    fleet.deploy("classifier", 2, "*");
    fleet.wait_serving("edge-1", "classifier", 2);
    assert_eq!(agent.check_golden(&v2), "2");
    let m = metadata(&agent, "classifier");
    assert_eq!(m["platform"], "onnx_tract", "{m}");
}

#[test]
fn a_library_that_is_not_onnx_runtime_fails_staging_with_the_reason() {
    let fleet = Fleet::embedded();
    let not_a_library = fleet.dir.path().join("libonnxruntime.so");
    std::fs::write(&not_a_library, b"not an ELF file").unwrap();
    let _agent = fleet.start_agent_opts(
        "edge-1",
        &[("site", "lab")],
        AgentOptions {
            extra: format!(
                "[engine]\nbackend = \"onnxruntime\"\nonnxruntime_library = \"{}\"\n",
                not_a_library.display()
            ),
            ..AgentOptions::default()
        },
    );
    fleet.wait_registered();
    let path = fleet.dir.path().join("model.onnx");
    std::fs::write(&path, modelcast_ops::onnx::example_model(1, 16)).unwrap();
    let mut opts = PublishOptions::new("classifier", 1);
    opts.format = Choice::Onnx;
    fleet.publish_with(&path, &opts);
    fleet.deploy("classifier", 1, "*");
    let reason = fleet.wait_error("edge-1", "ONNX Runtime");
    assert!(reason.contains("loading"), "{reason}");
}
