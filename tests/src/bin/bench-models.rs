//! Benchmark: every serving model of the real-model corpus on one device, against
//! onnxruntime on the same inputs in the same run (`tests/corpus/bench.py`): the engine's
//! single-thread time as a ratio of onnxruntime's (one thread), and what HTTP with binary
//! tensors and gRPC add on top of the engine, through Triton's own clients.
//!
//! Run: `bash tests/corpus/setup.sh && cargo build --release --bins && target/release/bench-models`
//! (it starts the release binaries beside it). The machine is shared and noisy: read the
//! ratios, not the times. `BENCH_SECONDS` sets the time spent per model (default 3);
//! `BENCH_THREADS` the threads one inference may use on both sides (default 1: the device's
//! `[engine] threads`, onnxruntime's intra-op threads).

use modelcast_tests::{corpus, Fleet};

fn main() {
    let threads: usize = std::env::var("BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(1);
    let fleet = Fleet::embedded();
    let (agent, grpc_port) = corpus::start_agent_with_grpc(
        &fleet,
        "bench-1",
        ("site", "bench"),
        &format!("[engine]\nthreads = {threads}\n"),
    );
    let serving = corpus::publish_and_serve(&fleet, "site=bench", "bench-1");
    let out = corpus::run_script("bench.py", &agent, grpc_port, &serving);
    assert!(out.status.success(), "bench.py failed");
}
