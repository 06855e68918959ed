//! Benchmark: update one device to a 100 MB model through the embedded broker, beside
//! `curl | sha256sum` of the same bytes from a local HTTP server, in the same run; then ten
//! successive 20 MB updates and the store's size on disk.
//!
//! Run: `cargo build --release --bins && target/release/bench-update` (it starts the release
//! binaries beside it). Figures are printed; the machine is shared and noisy, so compare the
//! ratios, not the absolute times. `BENCH_RUNS`, `BENCH_MB`, `BENCH_SMALL_MB` change sizes;
//! `BENCH_TRANSFER` adds keys to the agent's `[transfer]` section; `BENCH_LOGS=<dir>` keeps
//! the agent's and the server's logs. `BENCH_ENCRYPT=1` follows each run with the same-sized
//! model published `--encrypt`, and prints the encrypted/plain ratios of the median time to
//! verified (the update path) and from verified to serving (load, golden check, warm-up).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use modelcast_ops::onnx::example_model_of_size;
use modelcast_tests::{free_port, proc_status_kib, wait_for, Agent, Fleet, Mosquitto};

const MB: u64 = 1024 * 1024;

fn serving_version(agent: &Agent) -> Option<String> {
    let url = format!("http://127.0.0.1:{}/v2/models/classifier", agent.http_port);
    let mut resp = ureq::get(&url).call().ok()?;
    let v: serde_json::Value = resp.body_mut().read_json().ok()?;
    v["versions"][0].as_str().map(str::to_string)
}

struct Run {
    downloaded: Duration,
    verified: Duration,
    active: Duration,
    peak_rss_download_kib: u64,
    peak_rss_before_verified_kib: u64,
    /// RSS when the deploy was sent (the serving model included).
    rss_before_kib: u64,
}

/// Deploys `version` (already published) and times it to "verified" and "serving".
fn timed_update(fleet: &Fleet, agent: &Agent, version: u64) -> Run {
    let pid = agent.pid().expect("agent running");
    let rss_before_kib = proc_status_kib(pid, "VmRSS:");
    let start = Instant::now();
    fleet.deploy("classifier", version, "*");
    let mut peak = 0;
    let mut download_peak = None;
    let mut downloaded = Duration::ZERO;
    let mut verified = None;
    let deadline = start + Duration::from_secs(600);
    loop {
        assert!(Instant::now() < deadline, "update to v{version} timed out");
        if verified.is_none() {
            peak = peak.max(proc_status_kib(pid, "VmRSS:"));
            if download_peak.is_none() && agent.log_has("artifact complete", version) {
                download_peak = Some(peak);
                downloaded = start.elapsed();
            }
            if agent.log_has("artifact verified", version) {
                verified = Some(start.elapsed());
            }
        }
        if let Some(verified) =
            verified.filter(|_| serving_version(agent).as_deref() == Some(&version.to_string()))
        {
            return Run {
                downloaded,
                verified,
                active: start.elapsed(),
                peak_rss_download_kib: download_peak.unwrap_or(peak),
                peak_rss_before_verified_kib: peak,
                rss_before_kib,
            };
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn baseline(dir: &std::path::Path, file: &str) -> Duration {
    let port = free_port();
    let mut server = Command::new("python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
            "--directory",
        ])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 http.server");
    wait_for("http.server", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    let cmd = format!("curl -sf http://127.0.0.1:{port}/{file} | sha256sum > /dev/null");
    let start = Instant::now();
    let status = Command::new("bash")
        .args(["-c", &cmd])
        .status()
        .expect("curl");
    let took = start.elapsed();
    let _ = server.kill();
    let _ = server.wait();
    assert!(status.success(), "baseline failed");
    took
}

fn dir_size(path: &std::path::Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            total += if meta.is_dir() {
                dir_size(&e.path())
            } else {
                meta.len()
            };
        }
    }
    total
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let runs: u64 = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let size: u64 = std::env::var("BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
        * MB;
    // BENCH_BROKER=mosquitto runs the same through Debian's mosquitto instead.
    let external = std::env::var("BENCH_BROKER").is_ok_and(|b| b == "mosquitto");
    let scratch = tempfile::tempdir().expect("tempdir");
    let mosquitto = external.then(|| Mosquitto::start(scratch.path()));
    let fleet = match &mosquitto {
        Some(m) => Fleet::with_broker(tempfile::tempdir().expect("tempdir"), m.port()),
        None => Fleet::embedded(),
    };
    // Probation ends a second after each swap, so that every run measures an update rather
    // than the wait for the previous one's trial. `BENCH_TRANSFER` adds keys to the agent's
    // `[transfer]` section (e.g. `window = 128`).
    let agent = fleet.start_agent_opts(
        "bench-1",
        &[("site", "bench")],
        modelcast_tests::AgentOptions {
            extra: "[probation]\nseconds = 1\nrequests = 1000000\n".into(),
            transfer: std::env::var("BENCH_TRANSFER").map_or(String::new(), |t| t + "\n"),
            ..modelcast_tests::AgentOptions::default()
        },
    );
    fleet.wait_registered();
    fleet.publish_example(1, 64);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("bench-1", "classifier", 1);
    let pid = agent.pid().expect("agent running");
    let idle_kib = proc_status_kib(pid, "VmRSS:");

    println!(
        "== one device, {} MB model, {} broker, loopback",
        size / MB,
        if external {
            "mosquitto"
        } else {
            "embedded rumqttd"
        },
    );
    let mut verified = Vec::new();
    let mut active = Vec::new();
    let mut peak = 0;
    let mut download_peak = 0;
    let mut growth = 0;
    let mut baselines = Vec::new();
    let mut last_file = String::new();
    let encrypt = std::env::var("BENCH_ENCRYPT").is_ok_and(|v| v == "1");
    let (mut sealed_verified, mut sealed_load, mut plain_load) =
        (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let version = 10 + 2 * i;
        let file = format!("big-v{version}.onnx");
        let path = fleet.dir.path().join(&file);
        let bytes = example_model_of_size(version, size);
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(&bytes))
            .expect("model file");
        drop(bytes);
        let artifact = fleet.publish_file(&path, "classifier", version).size;
        let run = timed_update(&fleet, &agent, version);
        let base = baseline(fleet.dir.path(), &file);
        println!(
            "run {i}: modelcast deploy→downloaded {:.2}s, →verified {:.2}s, →serving {:.2}s; curl|sha256sum {:.2}s; artifact {} bytes",
            run.downloaded.as_secs_f64(),
            run.verified.as_secs_f64(),
            run.active.as_secs_f64(),
            base.as_secs_f64(),
            artifact
        );
        verified.push(run.verified);
        active.push(run.active);
        plain_load.push(run.active - run.verified);
        if encrypt {
            // The same size, another model, encrypted: no chunk to reuse either way.
            let sealed_path = fleet
                .dir
                .path()
                .join(format!("sealed-v{}.onnx", version + 1));
            std::fs::write(&sealed_path, example_model_of_size(version + 1, size))
                .expect("model file");
            let mut opts = modelcast_ops::publish::PublishOptions::new("classifier", version + 1);
            opts.encrypt = true;
            fleet.publish_with(&sealed_path, &opts);
            let _ = std::fs::remove_file(&sealed_path);
            let sealed = timed_update(&fleet, &agent, version + 1);
            println!(
                "run {i}, encrypted: deploy→verified {:.2}s, verified→serving {:.2}s",
                sealed.verified.as_secs_f64(),
                (sealed.active - sealed.verified).as_secs_f64()
            );
            sealed_verified.push(sealed.verified);
            sealed_load.push(sealed.active - sealed.verified);
        }
        peak = peak.max(run.peak_rss_before_verified_kib);
        download_peak = download_peak.max(run.peak_rss_download_kib);
        growth = growth.max(
            run.peak_rss_before_verified_kib
                .saturating_sub(run.rss_before_kib),
        );
        baselines.push(base);
        if i + 1 < runs {
            let _ = std::fs::remove_file(&path);
        }
        last_file = file;
    }
    let _ = last_file;
    // `BENCH_LOGS=<dir>` keeps the agent's and the server's logs (their timestamps say where
    // the time went).
    if let Ok(logs) = std::env::var("BENCH_LOGS") {
        let logs = std::path::Path::new(&logs);
        std::fs::create_dir_all(logs).expect("BENCH_LOGS directory");
        for (from, to) in [
            (agent.log_path(), "agent.log"),
            (fleet.dir.path().join("server.log"), "server.log"),
        ] {
            let _ = std::fs::copy(from, logs.join(to));
        }
    }
    let (mv, ma, mb) = (median(verified), median(active), median(baselines));
    println!(
        "median: modelcast {:.2}s to verified, {:.2}s to serving; baseline {:.2}s",
        mv.as_secs_f64(),
        ma.as_secs_f64(),
        mb.as_secs_f64()
    );
    println!(
        "speed ratio (baseline time / modelcast time to verified): {:.2}  (goal >= 0.7)",
        mb.as_secs_f64() / mv.as_secs_f64()
    );
    if encrypt {
        let (sv, sl, pl) = (
            median(sealed_verified),
            median(sealed_load),
            median(plain_load),
        );
        println!(
            "encrypted/plain: to verified {:.2} ({:.2}s / {:.2}s), verified to serving {:.2} ({:.2}s / {:.2}s)  (goal <= 1.1 each)",
            sv.as_secs_f64() / mv.as_secs_f64(),
            sv.as_secs_f64(),
            mv.as_secs_f64(),
            sl.as_secs_f64() / pl.as_secs_f64(),
            sl.as_secs_f64(),
            pl.as_secs_f64()
        );
    }
    println!(
        "agent RSS: idle {:.1} MB, peak during download {:.1} MB, during download+verify {:.1} MB (+{:.1} MB over the RSS before the deploy, serving model included; goal <= +64 MB), high-water incl. tract load {:.1} MB",
        idle_kib as f64 / 1024.0,
        download_peak as f64 / 1024.0,
        peak as f64 / 1024.0,
        growth as f64 / 1024.0,
        proc_status_kib(pid, "VmHWM:") as f64 / 1024.0
    );

    let small: u64 = std::env::var("BENCH_SMALL_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
        * MB;
    println!(
        "== ten successive {} MB updates: store size on disk",
        small / MB
    );
    let mut last_size = 0;
    for i in 0..10 {
        let version = 100 + i;
        let path = fleet.dir.path().join(format!("small-v{version}.onnx"));
        let bytes = example_model_of_size(version, small);
        last_size = bytes.len() as u64;
        std::fs::write(&path, &bytes).expect("model file");
        fleet.publish_file(&path, "classifier", version);
        fleet.deploy("classifier", version, "*");
        wait_for("small update", Duration::from_secs(300), || {
            (serving_version(&agent).as_deref() == Some(&version.to_string())).then_some(())
        });
        let _ = std::fs::remove_file(&path);
    }
    // Let sled's periodic flush settle before measuring.
    std::thread::sleep(Duration::from_secs(2));
    let store = dir_size(&fleet.dir.path().join("bench-1").join("store"));
    println!(
        "store on disk {:.1} MB for two slots of {:.1} MB = {:.1} MB: space amplification {:.2}x (goal <= 2x)",
        store as f64 / MB as f64,
        last_size as f64 / MB as f64,
        2.0 * last_size as f64 / MB as f64,
        store as f64 / (2.0 * last_size as f64)
    );
}
