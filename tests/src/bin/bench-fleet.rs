//! Fleet scale benchmark: a model rolled out to N simulated devices (the agent's update
//! machine and verifier on real MQTT connections; see `modelcast_tests::sim`), against the
//! broker's raw throughput measured in the same run.
//!
//! ```text
//! cargo build --release --bins && target/release/bench-fleet
//! BENCH_DEVICES=100,1000 BENCH_SIZE_MB=10 target/release/bench-fleet
//! BENCH_BROKER=mosquitto BENCH_DEVICES=1000,10000 target/release/bench-fleet
//! BENCH_SHARED=0 target/release/bench-fleet   # devices do not listen on shared topics
//! ```
//!
//! For each N it prints the wall time from the rollout's start until every device serves the
//! new version, the server's CPU time and peak RSS, and the ratio of the wall time to
//! N × size / raw broker throughput (one publisher to one subscriber through the same broker,
//! QoS 1, 256 KiB messages, measured before and after the rollout: the faster counts), and how many chunks the server sent (on devices' own topics and
//! once on the artifact's shared topic). The server, its broker and the simulated fleet share
//! this machine's cores, so the figures are for comparing, not absolute.

use std::sync::Arc;
use std::time::{Duration, Instant};

use modelcast_ops::onnx::example_model_of_size;
use modelcast_proto::desired::TrialThresholds;
use modelcast_server::api::RolloutRequest;
use modelcast_server::rollout::{RolloutSpec, RolloutState};
use modelcast_tests::sim::{Sim, SimOptions};
use modelcast_tests::{proc_status_kib, wait_for, Fleet, Mosquitto};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// User + system CPU seconds of process `pid`.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields after the command: state is 0, utime 11, stime 12.
    (ticks(11) + ticks(12)) / 100.0
}

/// Lets this process (and the server it starts) hold many sockets.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Bytes per second the broker moves from one publisher to one subscriber.
fn raw_broker_throughput(port: u16, total: usize) -> f64 {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        const MSG: usize = 256 * 1024;
        let count = total.div_ceil(MSG);
        let connect = |id: &str| {
            let mut o = MqttOptions::new(id, "127.0.0.1", port);
            o.set_max_packet_size(MSG + 4096, MSG + 4096)
                .set_inflight(64)
                .set_keep_alive(Duration::from_secs(30));
            AsyncClient::new(o, 256)
        };
        let (sub, mut sub_loop) = connect("bench-raw-sub");
        let (publisher, mut pub_loop) = connect("bench-raw-pub");
        sub.subscribe("bench/raw", QoS::AtLeastOnce).await.unwrap();
        // Wait for the subscription to be acknowledged.
        loop {
            if let Ok(Event::Incoming(Packet::SubAck(_))) = sub_loop.poll().await {
                break;
            }
        }
        tokio::spawn(async move { while pub_loop.poll().await.is_ok() {} });
        let received = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = received.clone();
        let receiver = tokio::spawn(async move {
            while counter.load(std::sync::atomic::Ordering::Relaxed) < count {
                if let Ok(Event::Incoming(Packet::Publish(_))) = sub_loop.poll().await {
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
        // A window of messages in flight, as devices keep (the broker drops what a consumer
        // falls too far behind on).
        const WINDOW: usize = 16;
        let payload = bytes::Bytes::from(vec![0xA5u8; MSG]);
        let started = Instant::now();
        for sent in 0..count {
            while sent >= received.load(std::sync::atomic::Ordering::Relaxed) + WINDOW {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            publisher
                .publish_bytes("bench/raw", QoS::AtLeastOnce, false, payload.clone())
                .await
                .unwrap();
        }
        let _ = receiver.await;
        let elapsed = started.elapsed().as_secs_f64();
        (count * MSG) as f64 / elapsed
    })
}

struct Row {
    devices: usize,
    wall: f64,
    ideal: f64,
    server_cpu: f64,
    server_rss_mib: f64,
    received_gib: f64,
    chunks: usize,
    sent: u64,
    shared: u64,
}

fn run(devices: usize, size: usize, mosquitto: bool, shared: bool) -> Row {
    // With mosquitto, the server runs beside it; its CPU and memory are added to the server's.
    let scratch = tempfile::tempdir().unwrap();
    let broker = mosquitto.then(|| Mosquitto::start(scratch.path()));
    let fleet = match &broker {
        Some(b) => Fleet::with_broker(tempfile::tempdir().unwrap(), b.port()),
        None => Fleet::embedded(),
    };
    let pids: Vec<u32> = std::iter::once(fleet.server_pid())
        .chain(broker.as_ref().map(Mosquitto::pid))
        .collect();
    let cpu = || pids.iter().map(|p| cpu_secs(*p)).sum::<f64>();
    let rss = || {
        pids.iter()
            .map(|p| proc_status_kib(*p, "VmHWM:"))
            .sum::<u64>()
    };
    let mut opts = SimOptions::new(fleet.mqtt_port, devices);
    opts.window = env("BENCH_WINDOW", 8);
    opts.shared = shared;
    let sim = Arc::new(Sim::start(opts, &fleet.keys));
    let limit = Duration::from_secs(60 + devices as u64 / 20);
    wait_for("the simulated fleet to register", limit, || {
        std::thread::sleep(Duration::from_millis(500));
        (fleet.client.devices().ok()?.len() == devices).then_some(())
    });
    fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "fleet=sim");
    wait_for("the fleet on v1", limit, || {
        std::thread::sleep(Duration::from_millis(200));
        (sim.serving("classifier", 1) == devices).then_some(())
    });

    let raw_bytes = (256 << 20).min(devices * size);
    let raw_before = raw_broker_throughput(fleet.mqtt_port, raw_bytes);
    let path = fleet.dir.path().join("big.onnx");
    std::fs::write(&path, example_model_of_size(2, size as u64)).unwrap();
    let v2 = fleet.publish_file(&path, "classifier", 2);
    let bytes = v2.size as usize;

    let sent0 = fleet.client.status().unwrap().chunk_requests;
    let cpu0 = cpu();
    let sim_cpu0 = cpu_secs(std::process::id());
    let received0 = sim
        .stats
        .chunk_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    let spec = RolloutSpec {
        wave_timeout_secs: 24 * 3600,
        // No trial: the time measured is delivery, verification and activation.
        probation: Some(TrialThresholds {
            requests: Some(0),
            seconds: Some(0),
            ..TrialThresholds::default()
        }),
        ..RolloutSpec::new("classifier", 2, "fleet=sim", &["100%"]).unwrap()
    };
    let desired0 = sim
        .stats
        .desired_ok
        .load(std::sync::atomic::Ordering::Relaxed);
    let started = Instant::now();
    let r = fleet
        .client
        .start_rollout(&RolloutRequest {
            spec,
            by: "bench".into(),
        })
        .unwrap();
    let mut last = Instant::now();
    let mut told = None;
    wait_for("every device on v2", Duration::from_secs(6 * 3600), || {
        std::thread::sleep(Duration::from_millis(100));
        let desired = sim
            .stats
            .desired_ok
            .load(std::sync::atomic::Ordering::Relaxed)
            - desired0;
        if told.is_none() && desired >= devices as u64 {
            told = Some(started.elapsed().as_secs_f64());
        }
        let n = sim.serving("classifier", 2);
        if last.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "  {n}/{devices} on v2 after {:.0}s",
                started.elapsed().as_secs_f64()
            );
            last = Instant::now();
        }
        (n == devices).then_some(())
    });
    let wall = started.elapsed().as_secs_f64();
    let server_cpu = cpu() - cpu0;
    let sim_cpu = cpu_secs(std::process::id()) - sim_cpu0;
    let server_rss_mib = rss() as f64 / 1024.0;
    let received = sim
        .stats
        .chunk_bytes
        .load(std::sync::atomic::Ordering::Relaxed)
        - received0;
    let sent = fleet.client.status().unwrap().chunk_requests;
    if let Some(t) = told {
        eprintln!(
            "  every device had verified its desired state {t:.1}s after the rollout started"
        );
    }
    let asked_again = sim
        .stats
        .asked_again
        .load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "  the devices asked {asked_again} chunks again ({:.2} % of N × chunks; {} before their \
         first chunk came); {} requests were lost to a full client queue",
        100.0 * asked_again as f64 / (devices * v2.download_chunk_count() as usize) as f64,
        sim.stats
            .asked_again_first
            .load(std::sync::atomic::Ordering::Relaxed),
        sim.stats
            .queue_full
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    if let Some(b) = &broker {
        for line in b.log().lines().filter(|l| l.contains("dropped")) {
            eprintln!("  mosquitto: {line}");
        }
    }
    let done = Instant::now();
    wait_for("the rollout to complete", Duration::from_secs(1800), || {
        std::thread::sleep(Duration::from_millis(500));
        let state = fleet.client.rollout(r.id).ok()?.state;
        (state == RolloutState::Completed).then_some(())
    });
    eprintln!(
        "  the server marked the rollout completed {:.1}s after the last device",
        done.elapsed().as_secs_f64()
    );
    // Measured again after the rollout (this machine is shared): the ideal takes the faster.
    let raw_after = raw_broker_throughput(fleet.mqtt_port, raw_bytes);
    let raw = raw_before.max(raw_after);
    let ideal = (devices * bytes) as f64 / raw;
    eprintln!(
        "  raw broker throughput {:.0} MB/s before the rollout, {:.0} MB/s after (the ideal takes \
         the faster); artifact {:.1} MB; the simulated devices used {sim_cpu:.1}s of cpu",
        raw_before / 1e6,
        raw_after / 1e6,
        bytes as f64 / 1e6
    );
    Row {
        devices,
        wall,
        ideal,
        server_cpu,
        server_rss_mib,
        received_gib: received as f64 / (1u64 << 30) as f64,
        chunks: v2.download_chunk_count() as usize,
        sent: sent.chunks - sent0.chunks,
        shared: sent.shared - sent0.shared,
    }
}

fn main() {
    raise_fd_limit();
    let counts: Vec<usize> = std::env::var("BENCH_DEVICES")
        .unwrap_or_else(|_| "100,1000".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    let size = env("BENCH_SIZE_MB", 10usize) << 20;
    let mosquitto = std::env::var("BENCH_BROKER").is_ok_and(|b| b == "mosquitto");
    let shared = env("BENCH_SHARED", 1u8) != 0;
    let broker = if mosquitto {
        "mosquitto"
    } else {
        "embedded rumqttd"
    };
    let mut rows = Vec::new();
    for n in counts {
        eprintln!(
            "bench-fleet: {n} devices, {} MiB model, {broker}",
            size >> 20
        );
        let r = run(n, size, mosquitto, shared);
        eprintln!(
            "  {n} devices: {:.1}s (ideal {:.1}s, ratio {:.2}), server+broker cpu {:.1}s, peak {:.0} MiB",
            r.wall,
            r.ideal,
            r.wall / r.ideal,
            r.server_cpu,
            r.server_rss_mib
        );
        rows.push(r);
    }
    println!(
        "broker: {broker}; devices {} the artifact's shared topic",
        if shared {
            "listen on"
        } else {
            "do not listen on"
        }
    );
    println!(
        "{:>8} {:>9} {:>9} {:>7} {:>12} {:>14} {:>12} {:>12} {:>16} {:>8}",
        "devices",
        "wall s",
        "ideal s",
        "ratio",
        "server cpu s",
        "cpu ms/device",
        "server MiB",
        "received GiB",
        "chunks sent/N×C",
        "shared"
    );
    for r in &rows {
        println!(
            "{:>8} {:>9.1} {:>9.1} {:>7.2} {:>12.1} {:>14.1} {:>12.0} {:>12.2} {:>16.4} {:>8}",
            r.devices,
            r.wall,
            r.ideal,
            r.wall / r.ideal,
            r.server_cpu,
            1e3 * r.server_cpu / r.devices as f64,
            r.server_rss_mib,
            r.received_gib,
            r.sent as f64 / (r.devices * r.chunks) as f64,
            r.shared
        );
    }
}
