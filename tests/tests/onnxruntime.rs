//! The ONNX Runtime backend: an agent built with the `ort` feature and configured with
//! `[engine] backend = "onnxruntime"` loads ONNX Runtime's library at run time (the one the
//! `onnxruntime` Python package ships), runs an ONNX artifact there on the first execution
//! provider of its preference that works (CUDA is missing on this machine: skipped for the
//! CPU), checks the golden vector tract computed at publishing, and answers KServe v2
//! requests as Triton names it (`onnxruntime_onnx`). NNEF artifacts stay on tract. With
//! `backend = "auto"` each version is staged on both and the faster at warm-up serves; a
//! backend that fails (here: a library that is not ONNX Runtime) is skipped with its reason.

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

fn agent_with(fleet: &Fleet, engine: &str) -> modelcast_tests::Agent {
    let agent = fleet.start_agent_opts(
        "edge-1",
        &[("site", "lab")],
        AgentOptions {
            extra: format!("[probation]\nrequests = 0\nseconds = 0\n[engine]\n{engine}"),
            ..AgentOptions::default()
        },
    );
    fleet.wait_registered();
    agent
}

fn publish_onnx(fleet: &Fleet, version: u64) -> modelcast_proto::manifest::Manifest {
    let path = fleet.dir.path().join(format!("model-{version}.onnx"));
    std::fs::write(&path, modelcast_ops::onnx::example_model(version, 64)).unwrap();
    let mut opts = PublishOptions::new("classifier", version);
    opts.format = Choice::Onnx;
    fleet.publish_with(&path, &opts)
}

/// What edge-1 reports running the classifier.
fn engine_reported(fleet: &Fleet) -> modelcast_proto::report::EngineReport {
    fleet.report("edge-1").unwrap().models["classifier"]
        .engine
        .clone()
        .expect("the engine in the report")
}

#[test]
fn auto_stages_on_both_and_serves_the_faster() {
    let fleet = Fleet::embedded();
    let agent = agent_with(
        &fleet,
        &format!(
            "backend = \"auto\"\nonnxruntime_library = \"{}\"\nproviders = [\"cpu\"]\n",
            corpus::onnxruntime_library().display()
        ),
    );
    let v1 = publish_onnx(&fleet, 1);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);
    assert_eq!(agent.check_golden(&v1), "1");
    let engine = engine_reported(&fleet);
    println!("auto: {engine:?}");
    let backends: Vec<&str> = engine.trials.iter().map(|t| t.backend.as_str()).collect();
    assert_eq!(backends, ["tract", "onnxruntime/cpu"], "{engine:?}");
    assert!(
        engine.trials.iter().all(|t| t.p95_us.is_some()),
        "{engine:?}"
    );
    assert!(
        engine.reason.starts_with("fastest at warm-up"),
        "{engine:?}"
    );
    let (tract, ort) = (
        engine.trials[0].p95_us.unwrap(),
        engine.trials[1].p95_us.unwrap(),
    );
    let expected = if ort * 20 < tract * 19 {
        "onnxruntime/cpu"
    } else {
        "tract"
    };
    assert_eq!(engine.backend, expected, "{engine:?}");
    assert_eq!(
        metadata(&agent, "classifier")["parameters"]["engine"],
        expected
    );
    for backend in ["tract", "onnxruntime/cpu"] {
        let series = format!(
            "modelcast_engine_warmup_p95_microseconds{{model=\"classifier\",backend=\"{backend}\"}}"
        );
        assert!(agent.metric(&series).is_some(), "{series}");
    }
}

#[test]
fn a_backend_that_fails_is_skipped_with_its_reason_and_alone_it_refuses_the_update() {
    // With auto: ONNX Runtime's library is not one; tract serves, the trial says why.
    let fleet = Fleet::embedded();
    let not_a_library = fleet.dir.path().join("libonnxruntime.so");
    std::fs::write(&not_a_library, b"not an ELF file").unwrap();
    let agent = agent_with(
        &fleet,
        &format!(
            "backend = \"auto\"\nonnxruntime_library = \"{}\"\n",
            not_a_library.display()
        ),
    );
    let v1 = publish_onnx(&fleet, 1);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);
    assert_eq!(agent.check_golden(&v1), "1");
    let engine = engine_reported(&fleet);
    assert_eq!(engine.backend, "tract", "{engine:?}");
    let failed = &engine.trials[1];
    assert_eq!(failed.backend, "onnxruntime", "{engine:?}");
    assert!(
        failed
            .error
            .as_deref()
            .is_some_and(|e| e.contains("loading")),
        "{engine:?}"
    );
    drop(agent);

    // Pinned to ONNX Runtime: nothing else may run it, the update is refused with the reason.
    let fleet = Fleet::embedded();
    let _agent = agent_with(
        &fleet,
        &format!(
            "backend = \"onnxruntime\"\nonnxruntime_library = \"{}\"\n",
            not_a_library.display()
        ),
    );
    publish_onnx(&fleet, 1);
    fleet.deploy("classifier", 1, "*");
    let reason = fleet.wait_error("edge-1", "ONNX Runtime");
    assert!(reason.contains("loading"), "{reason}");
}
