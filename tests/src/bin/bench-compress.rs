//! Benchmark: what chunk compression saves on the real-model corpus (`tests/corpus/`, fetched
//! by `tests/corpus/setup.sh`). Each model that serves is prepared as `modelcast publish` would
//! (NNEF or ONNX, as published), cut into its chunks, and each chunk packed as the server sends
//! it (`modelcast_server::compress::pack`: zstd of the chunk, or of it grouped by four bytes,
//! the smaller, only when it saves a sixteenth). Beside it, in the same run: zstd at the same
//! level over the whole artifact, the most a whole-file compressor gets.
//!
//! Run: `cargo build --release --bins && target/release/bench-compress`. Prints a table and
//! the total; nothing is asserted.

use std::time::Instant;

use bytes::Bytes;
use modelcast_ops::publish::prepare;
use modelcast_proto::chunk::Encoding;
use modelcast_server::compress::{pack, LEVEL};
use modelcast_tests::corpus;

fn main() {
    let dir = corpus::models_dir();
    let now = modelcast_server::unix_now();
    let (mut all, mut wire, mut whole) = (0u64, 0u64, 0u64);
    println!(
        "{:22} {:>6} {:>12} {:>8} {:>8} {:>8} {:>9} {:>9}",
        "model", "format", "bytes", "sent %", "grouped", "plain", "file %", "MB/s"
    );
    for row in corpus::rows().into_iter().filter(|r| r.serves()) {
        let Ok(onnx) = std::fs::read(dir.join(format!("{}.onnx", row.id))) else {
            println!("{:22} not fetched (tests/corpus/setup.sh)", row.id);
            continue;
        };
        let Ok(onnx) = modelcast_ops::onnx::self_contained(&onnx, &dir) else {
            continue;
        };
        let prepared = match prepare(&onnx, &row.options(), now) {
            Ok(p) => p,
            Err(e) => {
                println!("{:22} not prepared: {e}", row.id);
                continue;
            }
        };
        let artifact = prepared.artifact;
        let chunk = prepared.manifest.chunk_size as usize;
        let started = Instant::now();
        let (mut sent, mut grouped, mut plain) = (0u64, 0u32, 0u32);
        for c in artifact.chunks(chunk) {
            let p = pack(&Bytes::copy_from_slice(c));
            sent += p.data.len() as u64;
            match p.encoding {
                Encoding::ZstdGrouped4 => grouped += 1,
                Encoding::Zstd => plain += 1,
                Encoding::Raw => {}
            }
        }
        let secs = started.elapsed().as_secs_f64();
        let file = zstd::bulk::compress(&artifact, LEVEL).map_or(0, |z| z.len()) as u64;
        let n = artifact.len() as u64;
        println!(
            "{:22} {:>6} {:>12} {:>7.1}% {:>8} {:>8} {:>8.1}% {:>9.0}",
            row.id,
            format!("{:?}", prepared.manifest.model_format).to_lowercase(),
            n,
            100.0 * sent as f64 / n as f64,
            grouped,
            plain,
            100.0 * file as f64 / n as f64,
            n as f64 / secs / 1e6
        );
        all += n;
        wire += sent;
        whole += file;
    }
    if all > 0 {
        println!(
            "total: {all} bytes sent as {wire} ({:.1} %); zstd -{LEVEL} of each whole file: {:.1} %",
            100.0 * wire as f64 / all as f64,
            100.0 * whole as f64 / all as f64
        );
    }
}
