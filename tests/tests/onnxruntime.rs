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

/// The SHA-256 of the artifact `device` serves `classifier` from, once it serves `version`
/// from an artifact accepted by `want`.
fn wait_serving_artifact(
    fleet: &Fleet,
    device: &str,
    version: u64,
    want: impl Fn(&str, &modelcast_proto::report::EngineReport) -> bool,
) -> (String, modelcast_proto::report::EngineReport) {
    modelcast_tests::wait_for(
        &format!("{device} to serve classifier v{version} as wanted"),
        std::time::Duration::from_secs(60),
        || {
            let state = fleet.report(device)?.models.remove("classifier")?;
            let slot = match state.active? {
                modelcast_proto::report::Slot::A => state.a.as_ref(),
                modelcast_proto::report::Slot::B => state.b.as_ref(),
            }?;
            let engine = state.engine.clone()?;
            (slot.version == version && want(&slot.sha256, &engine))
                .then(|| (slot.sha256.clone(), engine))
        },
    )
}

#[test]
fn each_device_downloads_the_form_its_backend_runs_and_a_deployment_pin_switches_it() {
    use modelcast_proto::engine::Backend;
    use modelcast_proto::manifest::ModelFormat;

    let fleet = Fleet::embedded();
    let extra = |engine: &str| AgentOptions {
        extra: format!("[probation]\nrequests = 0\nseconds = 0\n[engine]\n{engine}"),
        ..AgentOptions::default()
    };
    // edge-1 runs tract only; edge-2 measures tract against ONNX Runtime.
    let tract = fleet.start_agent_opts("edge-1", &[("site", "lab")], extra(""));
    let auto = fleet.start_agent_opts(
        "edge-2",
        &[("site", "lab")],
        extra(&format!(
            "backend = \"auto\"\nonnxruntime_library = \"{}\"\nproviders = [\"cpu\"]\n",
            corpus::onnxruntime_library().display()
        )),
    );
    // The director knows what each runs from its report.
    modelcast_tests::wait_for(
        "both devices' engines",
        std::time::Duration::from_secs(30),
        || {
            ["edge-1", "edge-2"]
                .iter()
                .all(|d| fleet.report(d).is_some_and(|r| r.engines.is_some()))
                .then_some(())
        },
    );
    let edge2 = fleet.report("edge-2").unwrap().engines.unwrap();
    assert_eq!(edge2.prefer[0], ModelFormat::Onnx, "{edge2:?}");
    assert!(
        edge2.backends.contains_key(&Backend::Onnxruntime),
        "{edge2:?}"
    );

    // One version in two forms: NNEF, and the ONNX file it was converted from; ONNX
    // Runtime's golden tolerance stated in the manifest.
    let path = fleet.dir.path().join("model.onnx");
    std::fs::write(&path, modelcast_ops::onnx::example_model(1, 64)).unwrap();
    let mut opts = PublishOptions::new("classifier", 1);
    opts.with_onnx = true;
    opts.tolerance.insert(Backend::Onnxruntime, "0.001".into());
    let v1 = fleet.publish_with(&path, &opts);
    assert_eq!(v1.formats(), [ModelFormat::Nnef, ModelFormat::Onnx]);
    assert_eq!(v1.tolerance_on(Backend::Onnxruntime), Some(0.001));
    let onnx = v1.forms[0].sha256.clone();
    assert_eq!(
        onnx,
        modelcast_proto::sha256_hex(&std::fs::read(&path).unwrap())
    );

    fleet.deploy("classifier", 1, "*");
    let (sha, engine) = wait_serving_artifact(&fleet, "edge-1", 1, |_, _| true);
    assert_eq!(sha, v1.sha256, "edge-1 runs tract: the NNEF form");
    assert_eq!(engine.backend, "tract");
    let (sha, engine) = wait_serving_artifact(&fleet, "edge-2", 1, |_, _| true);
    assert_eq!(sha, onnx, "edge-2 runs ONNX Runtime: the ONNX form");
    let tried: Vec<&str> = engine.trials.iter().map(|t| t.backend.as_str()).collect();
    assert_eq!(tried, ["tract", "onnxruntime/cpu"], "{engine:?}");
    assert!(
        engine.trials.iter().all(|t| t.error.is_none()),
        "{engine:?}"
    );
    // Each downloaded its own form only.
    let downloaded = |agent: &modelcast_tests::Agent| {
        agent
            .metric("modelcast_downloaded_bytes_total{model=\"classifier\"}")
            .unwrap_or(0.0) as u64
    };
    assert_eq!(downloaded(&tract), v1.download_size());
    assert_eq!(
        downloaded(&auto),
        v1.in_form(ModelFormat::Onnx).unwrap().download_size()
    );
    assert_eq!(tract.check_golden(&v1), "1");
    assert_eq!(auto.check_golden(&v1), "1");

    // The operator pins the group to tract: edge-2 fetches the NNEF form and runs it on tract
    // without measuring; edge-1 stays as it was.
    fleet.deploy_pinned("classifier", 1, "*", Backend::Tract);
    let (sha, engine) = wait_serving_artifact(&fleet, "edge-2", 1, |sha, _| sha == v1.sha256);
    assert_eq!(engine.backend, "tract", "{engine:?}");
    assert_eq!(engine.reason, "pinned by the deployment", "{engine:?}");
    assert_eq!(sha, v1.sha256);
    assert_eq!(
        metadata(&auto, "classifier")["platform"],
        "onnx_tract",
        "the NNEF form on tract"
    );
    let (sha, _) = wait_serving_artifact(&fleet, "edge-1", 1, |_, _| true);
    assert_eq!(sha, v1.sha256);
    assert_eq!(
        downloaded(&tract),
        v1.download_size(),
        "nothing more for edge-1"
    );
}
