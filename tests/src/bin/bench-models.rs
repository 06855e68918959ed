//! Benchmark: every serving model of the real-model corpus on one device, against
//! onnxruntime on the same inputs in the same run (`tests/corpus/bench.py`): the engine's
//! single-thread time as a ratio of onnxruntime's (one thread), and what HTTP with binary
//! tensors and gRPC add on top of the engine, through Triton's own clients.
//!
//! Run: `bash tests/corpus/setup.sh && cargo build --release --bins && target/release/bench-models`
//! (it starts the release binaries beside it). The machine is shared and noisy: read the
//! ratios, not the times. `BENCH_SECONDS` sets the time spent per model (default 3);
//! `BENCH_THREADS` the threads one inference may use on both sides (default 1: the device's
//! `[engine] threads`, onnxruntime's intra-op threads). `BENCH_BACKEND=onnxruntime` publishes
//! every model as ONNX and runs it on the device's ONNX Runtime backend (the library of the
//! corpus' `onnxruntime` package, CPU provider) instead of tract; `BENCH_BACKEND=auto` lets the
//! device measure both at staging and serve the faster that passes (its choice is printed):
//! models are then published as NNEF with the ONNX file as a second form (`--with-onnx`), of
//! which the device downloads the ONNX one. Both state ONNX Runtime's golden tolerance in the
//! manifest, `BENCH_TOLERANCE` (default 1e-3). `BENCH_FP16=f16` has tract compute FP16 models
//! as they say (`[engine] fp16 = "f16"`, emulated) instead of in FP32 (the default).

use modelcast_tests::{corpus, Fleet};

fn main() {
    let threads: usize = std::env::var("BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(1);
    let chosen = std::env::var("BENCH_BACKEND").unwrap_or_default();
    let onnxruntime = chosen == "onnxruntime" || chosen == "auto";
    let fleet = Fleet::embedded();
    let backend = if onnxruntime {
        format!(
            "backend = \"{chosen}\"\nonnxruntime_library = \"{}\"\nproviders = [\"cpu\"]\n",
            corpus::onnxruntime_library().display()
        )
    } else {
        String::new()
    };
    let fp16 = std::env::var("BENCH_FP16").unwrap_or_else(|_| "f32".into());
    let (agent, grpc_port) = corpus::start_agent_with_grpc(
        &fleet,
        "bench-1",
        ("site", "bench"),
        &format!("[engine]\nthreads = {threads}\nfp16 = \"{fp16}\"\n{backend}"),
    );
    // ONNX Runtime's golden tolerance, stated in each manifest (it rounds otherwise than
    // tract, which computed the golden vectors).
    let tolerance = std::env::var("BENCH_TOLERANCE").unwrap_or_else(|_| "1e-3".into());
    let serving = corpus::publish_and_serve_as(&fleet, "site=bench", "bench-1", |opts| {
        match chosen.as_str() {
            "onnxruntime" => opts.format = modelcast_ops::convert::Choice::Onnx,
            // Published as an operator would for a mixed fleet: NNEF with the ONNX file as a
            // second form; this device asks for the ONNX one and measures both engines on it.
            "auto" => opts.with_onnx = true,
            _ => return,
        }
        opts.tolerance.insert(
            modelcast_proto::engine::Backend::Onnxruntime,
            tolerance.clone(),
        );
    });
    for id in &serving {
        if let Some(e) = fleet
            .report("bench-1")
            .and_then(|r| r.models.get(id)?.engine.clone())
        {
            println!("{id:22} runs on {}: {}", e.backend, e.reason);
        }
    }
    let out = corpus::run_script("bench.py", &agent, grpc_port, &serving);
    assert!(out.status.success(), "bench.py failed");
}
