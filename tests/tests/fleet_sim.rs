//! A rollout to a group of 50 simulated devices (the agent's update machine and verifier on
//! real MQTT connections, no inference) in which one canary fails: the rollout aborts by
//! itself and every device it moved goes back to v1; the devices of later waves never move.
//! And a group taking one model at once is served mostly through the artifact's shared topic.

use std::sync::atomic::Ordering;
use std::time::Duration;

use modelcast_ops::onnx::example_model_of_size;
use modelcast_proto::desired::TrialThresholds;
use modelcast_server::rollout::{DeviceState, RolloutSpec, RolloutState};
use modelcast_tests::sim::{Sim, SimOptions};
use modelcast_tests::{wait_for, Fleet};

const DEVICES: usize = 50;

#[test]
fn a_failing_canary_in_a_simulated_fleet_aborts_and_rolls_back() {
    let fleet = Fleet::embedded();
    let mut opts = SimOptions::new(fleet.mqtt_port, DEVICES);
    opts.stage_delay = Duration::from_millis(500);
    let sim = Sim::start(opts, &fleet.keys);
    wait_for(
        "every simulated device to register",
        Duration::from_secs(60),
        || (fleet.client.devices().ok()?.len() == DEVICES).then_some(()),
    );
    fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "fleet=sim");
    wait_for("the fleet on v1", Duration::from_secs(60), || {
        (sim.serving("classifier", 1) == DEVICES).then_some(())
    });

    fleet.publish_example(2, 16);
    let spec = RolloutSpec {
        wave_timeout_secs: 600,
        probation: Some(TrialThresholds {
            seconds: Some(1),
            ..TrialThresholds::default()
        }),
        ..RolloutSpec::new("classifier", 2, "fleet=sim", &["10%", "50%"]).unwrap()
    };
    let r = fleet.start_rollout(spec);
    assert_eq!(r.wave_sizes, vec![5, 25, 50]);
    let canaries: Vec<String> = r.wave_members(0).map(|m| m.device.clone()).collect();
    // The third canary fails its golden vector (set before its staging ends).
    let bad = canaries[2].clone();
    sim.failing.lock().unwrap().insert(bad.clone());

    let reason = wait_for(
        "the rollout to abort",
        Duration::from_secs(60),
        || match fleet.client.rollout(r.id).ok()?.state {
            RolloutState::Aborted { reason } => Some(reason),
            _ => None,
        },
    );
    assert!(reason.contains("1 device(s) failed"), "{reason}");
    wait_for("every device back on v1", Duration::from_secs(60), || {
        (sim.serving("classifier", 1) == DEVICES).then_some(())
    });
    let r = wait_for(
        "the canaries reported back",
        Duration::from_secs(60),
        || {
            let r = fleet.client.rollout(r.id).ok()?;
            let back = r.wave_members(0).all(|m| m.state == DeviceState::Reverted);
            back.then_some(r)
        },
    );
    let failure = r.member(&bad).unwrap().failure.clone().unwrap();
    assert!(failure.contains("golden vector 0 differs"), "{failure}");
    for m in r.members.iter().filter(|m| m.wave > 0) {
        assert_eq!(m.state, DeviceState::Waiting, "{} moved", m.device);
        assert_eq!(sim.version_of(&m.device, "classifier"), Some(1));
    }
}

/// Chunks published once on the artifact's shared topic reach the whole group: 40 devices
/// take an 8-chunk model while the server sends a fraction of 40 × 8 chunks, and no device
/// receives much more than it needs.
#[test]
fn a_shared_artifact_topic_serves_a_group_with_a_fraction_of_the_chunks() {
    const GROUP: usize = 40;
    let fleet = Fleet::embedded();
    let sim = Sim::start(SimOptions::new(fleet.mqtt_port, GROUP), &fleet.keys);
    wait_for(
        "every simulated device to register",
        Duration::from_secs(60),
        || (fleet.client.devices().ok()?.len() == GROUP).then_some(()),
    );
    // 2 MiB in 256 KiB chunks: every device asks for all 8 at once (window 16).
    let path = fleet.dir.path().join("model.onnx");
    std::fs::write(&path, example_model_of_size(1, 2 << 20)).unwrap();
    let v1 = fleet.publish_file(&path, "classifier", 1);
    let chunks = v1.chunks.len() as u64;
    fleet.deploy("classifier", 1, "fleet=sim");
    wait_for("the group on v1", Duration::from_secs(120), || {
        (sim.serving("classifier", 1) == GROUP).then_some(())
    });
    let sent = fleet.client.status().expect("status").chunk_requests;
    let received = sim.stats.chunk_bytes.load(Ordering::Relaxed) as f64;
    let needed = (GROUP as u64 * v1.size) as f64;
    println!(
        "{GROUP} devices × {chunks} chunks: the server sent {} chunks ({} on the shared topic, \
         {} asks skipped); the devices received {:.2}× the bytes they needed",
        sent.chunks,
        sent.shared,
        sent.skipped,
        received / needed
    );
    assert!(sent.shared > 0, "nothing went on the shared topic");
    assert!(
        sent.chunks * 4 <= GROUP as u64 * chunks,
        "{} chunks sent for {GROUP} devices × {chunks}",
        sent.chunks
    );
    assert!(received <= 2.5 * needed, "received {received} for {needed}");
}
