//! A new version judged on live traffic before it serves (`ShadowSpec`, `agent/src/shadow.rs`):
//! while clients keep asking the device, a version whose answers disagree with the serving
//! model's is rejected in its shadow phase and never answers a single request; one whose
//! answers agree passes, swaps in and commits. The device reports the phase's figures.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use modelcast_ops::onnx::example_model;
use modelcast_proto::desired::ShadowSpec;
use modelcast_proto::manifest::TensorData;
use modelcast_proto::report::ErrorKind;
use modelcast_tests::{wait_for, Fleet};

/// Sets the flag when dropped (however the test ends).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn a_disagreeing_version_is_rejected_in_shadow_and_an_agreeing_one_serves() {
    let fleet = Fleet::embedded();
    let agent =
        fleet.start_agent_with("edge-1", &[], "[probation]\nrequests = 20\nseconds = 600\n");
    fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);

    // Clients: varied inputs (a fixed LCG), every answer's version noted.
    let stop = AtomicBool::new(false);
    let answered: Mutex<Vec<String>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut seed = 7u32;
            let mut next = move || {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 8) as f32 / (1 << 24) as f32 * 4.0 - 2.0
            };
            for _ in 0..200_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let x = [next(), next(), next(), next()];
                if let Ok((version, _)) =
                    agent.infer("classifier", &[TensorData::from_f32("x", vec![1, 4], &x)])
                {
                    answered.lock().unwrap().push(version);
                }
            }
        });
        let _stop = StopOnDrop(&stop);

        // v2: other weights. Half the requests mirrored, 200 compared.
        fleet.publish_example(2, 16);
        let shadow = ShadowSpec {
            sample_percent: 50,
            seconds: 300,
            ..ShadowSpec::new(200)
        };
        fleet.deploy_shadowed("classifier", 2, "*", shadow);
        let (error, summary) = wait_for(
            "v2 rejected in its shadow phase",
            Duration::from_secs(120),
            || {
                let r = fleet.report("edge-1")?;
                let e = r
                    .last_error
                    .clone()
                    .filter(|e| e.kind == ErrorKind::Shadow)?;
                let s = r.models.get("classifier")?.shadow.clone()?;
                Some((e, s))
            },
        );
        println!("v2: {} ({summary:?})", error.reason);
        assert!(
            error.reason.contains("shadow: argmax agreement"),
            "{}",
            error.reason
        );
        assert_eq!(summary.version, 2);
        assert_eq!(summary.verdict.as_deref(), Some("failed"));
        assert_eq!(summary.compared, 200);
        assert!(summary.agreement_permille.unwrap() < 990, "{summary:?}");
        assert!(summary.candidate_p99_us.is_some() && summary.serving_p99_us.is_some());
        let served = answered.lock().unwrap().clone();
        assert!(served.len() > 400, "{} answers", served.len());
        assert!(
            served.iter().all(|v| v == "1"),
            "a rejected candidate answered: {:?}",
            served.iter().filter(|v| *v != "1").count()
        );

        // v3: v1's weights under a new version: its answers agree, so it serves.
        let path = fleet.dir.path().join("v3.onnx");
        std::fs::write(&path, example_model(1, 16)).unwrap();
        fleet.publish_file(&path, "classifier", 3);
        fleet.deploy_shadowed("classifier", 3, "*", shadow);
        fleet.wait_serving("edge-1", "classifier", 3);
        let summary = fleet.report("edge-1").unwrap().models["classifier"]
            .shadow
            .clone()
            .unwrap();
        println!("v3: {summary:?}");
        assert_eq!(summary.version, 3);
        assert_eq!(summary.verdict.as_deref(), Some("passed"));
        assert_eq!(summary.agreement_permille, Some(1000));
        assert_eq!(summary.max_abs_diff, 0.0);
        wait_for("v3 committed", Duration::from_secs(120), || {
            let r = fleet.report("edge-1")?;
            let m = r.models.get("classifier")?;
            (m.update.as_ref()?.phase == modelcast_proto::report::Phase::Active).then_some(())
        });
        let served = answered.lock().unwrap().clone();
        assert!(!served.iter().any(|v| v == "2"), "v2 never served");
        assert!(served.iter().any(|v| v == "3"), "v3 serves");
    });
}

#[test]
fn a_rollout_gated_on_shadow_aborts_when_its_canary_disagrees() {
    let fleet = Fleet::embedded();
    let agents: Vec<_> = ["edge-1", "edge-2", "edge-3"]
        .into_iter()
        .map(|id| fleet.start_agent_with(id, &[("hw", "jetson")], ""))
        .collect();
    fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "hw=jetson");
    for id in ["edge-1", "edge-2", "edge-3"] {
        fleet.wait_serving(id, "classifier", 1);
    }
    fleet.publish_example(2, 16);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut seed = 11u32;
            for _ in 0..200_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                for agent in &agents {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    let v = (seed >> 8) as f32 / (1 << 24) as f32 * 4.0 - 2.0;
                    let _ = agent.infer(
                        "classifier",
                        &[TensorData::from_f32(
                            "x",
                            vec![1, 4],
                            &[v, -v, v * 0.5, 1.0],
                        )],
                    );
                }
            }
        });
        let _stop = StopOnDrop(&stop);
        // Through the CLI, as an operator would: every moved device shadows v2 first.
        let started = fleet.cli(&[
            "rollout",
            "start",
            "--model",
            "classifier",
            "--version",
            "2",
            "--group",
            "hw=jetson",
            "--waves",
            "1,100%",
            "--shadow",
            "100",
            "--shadow-sample",
            "0.5",
        ]);
        println!("{started}");
        let r = wait_for("the rollout to abort", Duration::from_secs(120), || {
            let r = fleet.client.rollouts().ok()?.pop()?;
            r.state.is_over().then_some(r)
        });
        assert!(
            matches!(
                r.state,
                modelcast_server::rollout::RolloutState::Aborted { .. }
            ),
            "{:?}",
            r.state
        );
        let canary = r.wave_members(0).next().unwrap();
        assert!(
            canary
                .failure
                .as_deref()
                .unwrap_or("")
                .contains("shadow: argmax agreement"),
            "{canary:?}"
        );
        let wave = r.wave_shadow(0).expect("the canary's shadow figures");
        assert_eq!((wave.passed, wave.failed), (0, 1), "{wave:?}");
        assert!(wave.min_agreement_permille.unwrap() < 990);
        let status = fleet.cli(&["rollout", "status", &r.id.to_string()]);
        println!("{status}");
        assert!(status.contains("shadow: 0 passed, 1 failed"), "{status}");
        // Nobody served v2: the canary never swapped, the others never moved.
        for id in ["edge-1", "edge-2", "edge-3"] {
            fleet.wait_serving(id, "classifier", 1);
        }
    });
}

#[test]
fn a_shadow_phase_stops_when_the_desired_state_moves_on() {
    let fleet = Fleet::embedded();
    let agent = fleet.start_agent_with("edge-1", &[], "[probation]\nrequests = 0\nseconds = 0\n");
    let v1 = fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);
    fleet.publish_example(2, 16);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for _ in 0..200_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let _ = agent.infer("classifier", &v1.golden[0].inputs);
            }
        });
        let _stop = StopOnDrop(&stop);
        // A phase of an hour that would compare a million answers.
        fleet.deploy_shadowed(
            "classifier",
            2,
            "*",
            ShadowSpec {
                requests: 1_000_000,
                ..ShadowSpec::new(1)
            },
        );
        let shadow = || {
            fleet
                .report("edge-1")?
                .models
                .get("classifier")?
                .shadow
                .clone()
        };
        wait_for("the phase running", Duration::from_secs(60), || {
            shadow().filter(|s| s.compared > 0 && s.verdict.is_none())
        });
        // The operator changes their mind: v1 everywhere again.
        fleet.deploy("classifier", 1, "*");
        let s = wait_for("the phase cancelled", Duration::from_secs(60), || {
            shadow().filter(|s| s.verdict.is_some())
        });
        assert_eq!(s.verdict.as_deref(), Some("cancelled"), "{s:?}");
        // And the next version goes through at once, not an hour later.
        fleet.publish_example(3, 16);
        fleet.deploy("classifier", 3, "*");
        fleet.wait_serving("edge-1", "classifier", 3);
    });
}
