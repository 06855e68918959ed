//! A device too small for two models (`agent/src/memory.rs`, `driver.rs::swap_low_memory`):
//! an agent runs in a memory cgroup whose limit holds one model of the size deployed but not
//! two. A new version then swaps in by unloading the serving one first — the model answers
//! 503 with `Retry-After` meanwhile, and nothing else fails — and the window is measured; a
//! new version that fails its checks brings the old one back from its slot. The kernel never
//! has to kill the agent.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use modelcast_ops::publish::PublishOptions;
use modelcast_proto::manifest::{LatencyBudget, Manifest};
use modelcast_tests::cgroup::MemoryCgroup;
use modelcast_tests::{wait_for, AgentOptions, Fleet};

/// Publishing measures a model's memory by this process's peak (as `modelcast publish` does in
/// its own): the tests here take turns, so that one's publish does not count in the other's.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Weights of each version: big enough that the memory of two is plainly more than one.
const MODEL_BYTES: u64 = 48 << 20;

/// Sets the flag when dropped (however the test ends).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Without a memory cgroup of its own the test cannot run: a failure as root (which
/// `tests/run.sh` and CI are, and where the kernel gives one), a loud skip otherwise.
fn skip_unless_root(why: &str) {
    // The effective user id, read from /proc.
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|ids| ids.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    assert!(!root, "running as root, yet {why}");
    eprintln!("SKIPPED (not root): {why}");
}

fn publish(fleet: &Fleet, version: u64, budget: Option<LatencyBudget>) -> Manifest {
    let path = fleet.dir.path().join(format!("big-v{version}.onnx"));
    std::fs::write(
        &path,
        modelcast_ops::onnx::example_model_of_size(version, MODEL_BYTES),
    )
    .unwrap();
    let mut opts = PublishOptions::new("classifier", version);
    opts.latency_budget = budget;
    fleet.publish_with(&path, &opts)
}

#[test]
fn a_model_that_does_not_fit_twice_swaps_in_its_predecessors_place() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let cgroup = match MemoryCgroup::create("modelcast-low-memory") {
        Ok(c) => c,
        Err(why) => return skip_unless_root(&why.to_string()),
    };
    let fleet = Fleet::embedded();
    let agent = fleet.start_agent_opts("edge-1", &[], AgentOptions::committing());
    fleet.wait_registered();
    cgroup.add(agent.pid().expect("agent pid"));

    let v1 = publish(&fleet, 1, None);
    let need = v1
        .memory_bytes
        .expect("publishing measures the memory a model needs");
    println!("v1 needs {} MiB by the publisher's measure", need >> 20);
    assert!(need >= MODEL_BYTES / 2, "{need}");
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);
    assert_eq!(agent.check_golden(&v1), "1");

    // Room for the serving model and half of another: not two.
    let serving = cgroup.usage();
    let limit = serving + need / 2;
    cgroup.set_limit(limit);
    println!(
        "agent charged {} MiB serving v1; limit {} MiB",
        serving >> 20,
        limit >> 20
    );

    // Clients ask throughout; every answer is a version or a 503 with Retry-After.
    let stop = AtomicBool::new(false);
    let answers: Mutex<Vec<String>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let http: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(30)))
                .build()
                .into();
            let golden = &v1.golden[0].inputs[0];
            let body = serde_json::json!({ "inputs": [{
                "name": golden.name, "shape": golden.shape, "datatype": "FP32",
                "data": golden.values().unwrap(),
            }]});
            let url = format!(
                "http://127.0.0.1:{}/v2/models/classifier/infer",
                agent.http_port
            );
            for _ in 0..200_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let answer = match http.post(&url).send_json(&body) {
                    Ok(mut r) if r.status() == 200 => {
                        let v: serde_json::Value = r.body_mut().read_json().unwrap();
                        v["model_version"].as_str().unwrap_or("?").to_string()
                    }
                    Ok(r) if r.status() == 503 => {
                        let retry = r
                            .headers()
                            .get("retry-after")
                            .map(|v| v.to_str().unwrap_or("").to_string());
                        format!("503 retry-after={}", retry.unwrap_or_default())
                    }
                    Ok(r) => format!("{}", r.status()),
                    Err(e) => format!("error {e}"),
                };
                answers.lock().unwrap().push(answer);
            }
        });
        let _stop = StopOnDrop(&stop);

        // v2 does not fit beside v1: swapped in its place.
        publish(&fleet, 2, None);
        fleet.deploy("classifier", 2, "*");
        fleet.wait_serving("edge-1", "classifier", 2);
        let window = wait_for(
            "the swap's window in /metrics",
            Duration::from_secs(30),
            || {
                agent.metric(
                    "modelcast_low_memory_swap_unavailable_milliseconds{model=\"classifier\"}",
                )
            },
        );
        println!("v2 swapped in low memory: unavailable for {window} ms");
        // The device reports it too.
        let reported = wait_for("the window in the report", Duration::from_secs(30), || {
            fleet
                .report("edge-1")?
                .models
                .get("classifier")?
                .low_memory_swap_ms
        });
        assert!(reported > 0, "{reported}");
        assert!(agent.log_has("swapped in low memory", 2));
        wait_for("answers from v2", Duration::from_secs(30), || {
            answers
                .lock()
                .unwrap()
                .iter()
                .any(|a| a == "2")
                .then_some(())
        });

        // v3 fails its checks (a latency budget no model meets) after v2 was unloaded: v2
        // comes back from its slot.
        let budget = LatencyBudget { p95_us: 1, runs: 5 };
        publish(&fleet, 3, Some(budget));
        fleet.deploy("classifier", 3, "*");
        let reason = wait_for("v3 rejected", Duration::from_secs(120), || {
            let e = fleet.report("edge-1")?.last_error?;
            (e.version == Some(3)).then_some(e.reason)
        });
        println!("v3: {reason}");
        assert!(reason.contains("update rejected"), "{reason}");
        assert!(
            std::fs::read_to_string(agent.log_path())
                .unwrap()
                .contains("the low-memory swap failed: the previous version serves again"),
            "v3 was loaded in v2's place and v2 came back"
        );
        let count_v2 = answers.lock().unwrap().len();
        wait_for("answers from v2 again", Duration::from_secs(30), || {
            let a = answers.lock().unwrap();
            (a.len() > count_v2 + 10 && a[a.len() - 1] == "2").then_some(())
        });
    });
    let answers = answers.into_inner().unwrap();
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for a in &answers {
        *kinds.entry(a.clone()).or_default() += 1;
    }
    println!("answers: {kinds:?}");
    for kind in kinds.keys() {
        assert!(
            ["1", "2"].contains(&kind.as_str()) || kind == "503 retry-after=1",
            "unexpected answer {kind:?}: {kinds:?}"
        );
    }
    assert_eq!(cgroup.oom_kills(), 0, "the kernel killed nothing");
    assert!(agent.pid().is_some());
}

#[test]
fn a_trial_that_fails_after_a_low_memory_swap_loads_the_last_good_version_in_its_place() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let cgroup = match MemoryCgroup::create("modelcast-low-memory-trial") {
        Ok(c) => c,
        Err(why) => return skip_unless_root(&why.to_string()),
    };
    let fleet = Fleet::embedded();
    let agent = fleet.start_agent_with(
        "edge-1",
        &[],
        "[probation]\nrequests = 40\nseconds = 600\nmax_p99_ratio = 1.5\np99_slack_ms = 0.0\n",
    );
    fleet.wait_registered();
    cgroup.add(agent.pid().expect("agent pid"));

    // v1: 24 MB of weights; v2: 96 MB, about four times slower per request, too big to sit
    // beside v1 but not to take its place.
    let size = |version, bytes| {
        let path = fleet.dir.path().join(format!("trial-v{version}.onnx"));
        std::fs::write(
            &path,
            modelcast_ops::onnx::example_model_of_size(version, bytes),
        )
        .unwrap();
        fleet.publish_file(&path, "classifier", version)
    };
    let v1 = size(1, 24 << 20);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);
    for _ in 0..100 {
        assert_eq!(agent.check_golden(&v1), "1");
    }
    let v2 = size(2, 96 << 20);
    let need = v2.memory_bytes.expect("measured");
    // Beside v1 it needs its measure and the 20 % margin; in v1's place, v1's is freed too.
    cgroup.set_limit(cgroup.usage() + need + need / 10);
    fleet.deploy("classifier", 2, "*");
    fleet.wait_serving("edge-1", "classifier", 2);
    assert!(agent.log_has("swapped in low memory", 2));

    // On trial, too slow: rolled back, and v1 loaded again in v2's place.
    let mut answered = Vec::new();
    for _ in 0..200 {
        match agent.infer("classifier", &v1.golden[0].inputs) {
            Ok((version, _)) => answered.push(version),
            Err(e) if e.starts_with("503") => answered.push("503".into()),
            Err(e) => panic!("{e}"),
        }
        if answered.last().map(String::as_str) == Some("1") {
            break;
        }
    }
    let reason = wait_for("the rollback reported", Duration::from_secs(60), || {
        let e = fleet.report("edge-1")?.last_error?;
        (e.version == Some(2) && e.reason.contains("rolled back")).then_some(e.reason)
    });
    assert!(reason.contains("p99 latency"), "{reason}");
    fleet.wait_serving("edge-1", "classifier", 1);
    assert_eq!(agent.check_golden(&v1), "1");
    assert!(
        std::fs::read_to_string(agent.log_path())
            .unwrap()
            .contains("loaded and checked in low memory model=classifier version=1 ok=true"),
        "v1 came back by a low-memory swap"
    );
    assert_eq!(cgroup.oom_kills(), 0, "the kernel killed nothing");
}
