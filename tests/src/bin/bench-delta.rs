//! Benchmark: what a new version of a real model costs to send to a device that holds the
//! previous one. The model is a real one of 20 MB (`tests/corpus/delta.tsv`: a YOLOX detector
//! shipped in a PyPI package); its versions are made as an ML team would
//! (`tests/corpus/variants.py`): (a) the same weights re-published by a newer exporter, (b)
//! only the last layer retrained, (c) every weight fine-tuned, (d) an FP16 variant.
//!
//! Each version is published as `modelcast publish` would and deployed to a device (release
//! agent, embedded broker, loopback) serving the first: the server's counters give the bytes
//! sent, as stored (no compression) and on the wire (compressed), the device's report what it
//! reused from its own slots. Beside them, in the same run and on the same artifact pairs
//! (old → new): `zstd --patch-from` (levels 3 and 19, long mode) and `xdelta3 -9`, and what
//! fixed-size chunks (no tensor alignment) would have had to send. Time: from the deploy to
//! the artifact complete on the device and to serving, beside a device with nothing to reuse
//! downloading version (b) whole.
//!
//! Run: `bash tests/corpus/delta.sh && cargo build --release --bins && target/release/bench-delta`
//! (`delta.sh` installs zstd and xdelta3 from Debian and fetches the model; the bench runs it
//! too). `BENCH_VARIANTS=abc` measures only those (preparing the FP16 variant, (d), takes
//! minutes on x86, which has no FP16 kernels: `BENCH_SERVE_WAIT_SECS`, 600 by default, bounds
//! each wait for the artifact and for serving). Prints a table; nothing is asserted.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use modelcast_ops::publish::{prepare, Prepared, PublishOptions};
use modelcast_proto::manifest::{chunk_digests, Manifest};
use modelcast_tests::{wait_for, Agent, AgentOptions, Fleet};

const NAME: &str = "detector";

const VARIANTS: [(&str, &str); 4] = [
    ("a", "(a) same weights re-published"),
    ("b", "(b) last layer retrained"),
    ("c", "(c) every weight fine-tuned"),
    ("d", "(d) FP16 variant"),
];

fn setup() -> PathBuf {
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/delta.sh"))
        .output()
        .expect("bash tests/corpus/delta.sh");
    assert!(
        out.status.success(),
        "tests/corpus/delta.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let base = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(base.lines().last().expect("the model's path").trim())
}

/// The size of `tool`'s patch from `old` to `new` (files in `dir`).
fn patch(dir: &Path, tool: &str, old: &Path, new: &Path) -> Option<u64> {
    let out = dir.join("patch");
    let _ = std::fs::remove_file(&out);
    let mut cmd = match tool {
        "zstd-3" | "zstd-19" => {
            let mut c = Command::new("zstd");
            c.args(["-q", "-f", "--long=27", &format!("-{}", &tool[5..])])
                .arg(format!("--patch-from={}", old.display()))
                .arg(new)
                .arg("-o")
                .arg(&out);
            c
        }
        _ => {
            let mut c = Command::new("xdelta3");
            c.args(["-e", "-9", "-f", "-s"]).arg(old).arg(new).arg(&out);
            c
        }
    };
    let ok = cmd
        .stderr(std::process::Stdio::null())
        .status()
        .ok()?
        .success();
    ok.then(|| std::fs::metadata(&out).ok().map(|m| m.len()))
        .flatten()
}

/// What a device downloads for a version: its artifact, then its golden file.
fn download(p: &Prepared) -> Vec<u8> {
    let mut bytes = p.artifact.clone();
    bytes.extend_from_slice(p.golden_file.as_deref().unwrap_or_default());
    bytes
}

/// Bytes of `new`'s download whose chunks no chunk of `old`'s has (what a device holding
/// `old` fetches).
fn missing(old: &Manifest, new: &Manifest) -> u64 {
    let held: HashSet<&String> = old.parts().iter().flat_map(|p| p.chunks).collect();
    new.parts()
        .iter()
        .flat_map(|p| p.chunks.iter().zip(p.spans()))
        .filter(|(d, _)| !held.contains(d))
        .map(|(_, s)| u64::from(s.len))
        .sum()
}

/// The same, had both artifacts been cut in fixed chunks from their start.
fn missing_fixed(old: &Prepared, new: &Prepared) -> u64 {
    let chunk = new.manifest.chunk_size;
    let cut = |p: &Prepared| {
        let mut all = chunk_digests(&p.artifact, chunk);
        all.extend(p.manifest.golden_file.iter().flat_map(|g| g.chunks.clone()));
        all
    };
    let held: HashSet<String> = cut(old).into_iter().collect();
    let new_bytes = download(new);
    let lens = new.artifact.chunks(chunk as usize).map(<[u8]>::len).chain(
        new.manifest.golden_file.iter().flat_map(|g| {
            g.chunks
                .iter()
                .enumerate()
                .map(|(i, _)| (g.size as usize - i * chunk as usize).min(chunk as usize))
        }),
    );
    debug_assert_eq!(lens.clone().sum::<usize>(), new_bytes.len());
    cut(new)
        .iter()
        .zip(lens)
        .filter(|(d, _)| !held.contains(*d))
        .map(|(_, len)| len as u64)
        .sum()
}

/// How long each wait may take (`BENCH_SERVE_WAIT_SECS`; staging an FP16 model on a CPU with
/// no FP16 kernels takes longer than the default).
fn patience() -> Duration {
    let secs = std::env::var("BENCH_SERVE_WAIT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    Duration::from_secs(secs)
}

/// Deploys `version` to `group` and times it on `agent`: to the artifact complete, to serving.
fn timed(fleet: &Fleet, agent: &Agent, device: &str, version: u64, group: &str) -> (f64, f64) {
    let start = Instant::now();
    fleet.deploy(NAME, version, group);
    let complete = wait_for("the artifact", patience(), || {
        agent
            .log_has("artifact complete", version)
            .then(|| start.elapsed().as_secs_f64())
    });
    wait_for("serving", patience(), || {
        let r = fleet.report(device)?;
        (r.models.get(NAME)?.serving_version() == Some(version)).then_some(())
    });
    (complete, start.elapsed().as_secs_f64())
}

fn pct(part: u64, whole: u64) -> String {
    format!("{:.2}", 100.0 * part as f64 / whole.max(1) as f64)
}

fn main() {
    let base = setup();
    let dir = base
        .parent()
        .and_then(Path::parent)
        .expect("the cache")
        .join("delta")
        .join(base.file_stem().expect("a file name"));
    let now = modelcast_server::unix_now();
    let work = tempfile::tempdir().expect("a temporary directory");

    // The artifacts as devices receive them, for the baselines.
    let opts = |version| PublishOptions::new(NAME, version);
    let onnx = std::fs::read(&base).expect("the model");
    let v1 = prepare(&onnx, &opts(1), now).expect("the model prepares");
    let v1_path = work.path().join("v1.download");
    std::fs::write(&v1_path, download(&v1)).expect("write");
    println!(
        "model: {} ({} bytes of ONNX), published as {} of {} bytes in {} chunks, {} segments; \
         golden file {} bytes",
        base.display(),
        onnx.len(),
        v1.manifest.model_format,
        v1.manifest.size,
        v1.manifest.chunks.len(),
        v1.manifest.segments.len(),
        v1.manifest.golden_file.as_ref().map_or(0, |g| g.size)
    );

    let fleet = Fleet::embedded();
    let agent_opts = || AgentOptions::committing();
    let agents: Vec<(String, Agent)> = VARIANTS
        .iter()
        .chain([&("full", "")])
        .map(|(v, _)| {
            let id = format!("edge-{v}");
            let agent = fleet.start_agent_opts(&id, &[("variant", v)], agent_opts());
            (id, agent)
        })
        .collect();
    fleet.wait_registered();
    fleet.publish_file(&base, NAME, 1);
    for (v, _) in VARIANTS {
        fleet.deploy(NAME, 1, &format!("variant={v}"));
    }
    for (id, _) in &agents[..VARIANTS.len()] {
        fleet.wait_serving(id, NAME, 1);
    }

    println!(
        "\n{:31} {:>6} {:>10} | {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7} | {:>7} | {:>6} {:>6}",
        "new version (old: v1)",
        "format",
        "download",
        "raw %",
        "wire %",
        "reused",
        "zstd-3",
        "zstd-19",
        "xdelta3",
        "fixed %",
        "done s",
        "serve s"
    );
    let mut b_times = None;
    let only = std::env::var("BENCH_VARIANTS").unwrap_or_else(|_| "abcd".into());
    for (i, (v, what)) in VARIANTS.iter().enumerate() {
        if !only.contains(v) {
            continue;
        }
        let version = i as u64 + 2;
        let path = dir.join(format!("{v}.onnx"));
        let new = match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| prepare(&b, &opts(version), now).map_err(|e| e.to_string()))
        {
            Ok(p) => p,
            Err(e) => {
                println!("{what:31} not prepared: {e}");
                continue;
            }
        };
        let new_path = work.path().join(format!("{v}.download"));
        std::fs::write(&new_path, download(&new)).expect("write");
        let size = new.manifest.download_size();
        let baseline = |tool| {
            patch(work.path(), tool, &v1_path, &new_path)
                .map_or_else(|| "-".to_string(), |n| pct(n, size))
        };
        let (z3, z19, x) = (baseline("zstd-3"), baseline("zstd-19"), baseline("xdelta3"));
        let fixed = missing_fixed(&v1, &new);
        let aligned = missing(&v1.manifest, &new.manifest);

        let manifest = fleet.publish_file(&path, NAME, version);
        assert_eq!(
            manifest.sha256, new.manifest.sha256,
            "publishing is reproducible"
        );
        let sent = || fleet.client.status().expect("status").chunk_requests;
        let before = sent();
        let (id, agent) = &agents[i];
        let (done, serve) = timed(&fleet, agent, id, version, &format!("variant={v}"));
        let after = sent();
        let reused = fleet
            .report(id)
            .and_then(|r| r.models.get(NAME)?.update.clone())
            .map_or(0, |u| u.reused_bytes);
        println!(
            "{what:31} {:>6} {size:>10} | {:>7} {:>7} {:>7} | {z3:>7} {z19:>7} {x:>7} | {:>7} | {done:>6.2} {serve:>6.2}",
            manifest.model_format.to_string(),
            pct(after.raw_bytes - before.raw_bytes, size),
            pct(after.bytes - before.bytes, size),
            pct(reused, size),
            pct(fixed, size),
        );
        if aligned != after.raw_bytes - before.raw_bytes {
            println!(
                "{:31} (the manifests alone say {} % to fetch)",
                "",
                pct(aligned, size)
            );
        }
        if *v == "b" {
            b_times = Some((version, done, serve, size));
        }
    }
    if let Some((version, done, serve, size)) = b_times {
        let (id, agent) = agents.last().expect("the fresh device");
        let before = fleet.client.status().expect("status").chunk_requests;
        let (full_done, full_serve) = timed(&fleet, agent, id, version, "variant=full");
        let after = fleet.client.status().expect("status").chunk_requests;
        println!(
            "\n(b) on a device with nothing to reuse: {} % of {size} bytes on the wire, artifact \
             complete after {full_done:.2} s, serving after {full_serve:.2} s",
            pct(after.bytes - before.bytes, size),
        );
        println!(
            "(b) delta ÷ full download: {:.2} to the artifact complete, {:.2} to serving",
            done / full_done,
            serve / full_serve
        );
    }
    println!(
        "\ndownload: the new version's artifact and golden file; raw %: chunks sent as stored, \
         wire %: as sent (compressed), reused: copied from the device's slots, all ÷ the \
         download; zstd-3/zstd-19/xdelta3: their patch from the old download to the new ÷ the \
         new; fixed %: what artifact chunks cut from the start (no tensor alignment) would \
         fetch; done/serve s: from the deploy to the download complete / to serving."
    );
}
