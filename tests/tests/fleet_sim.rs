//! A rollout to a group of 50 simulated devices (the agent's update machine and verifier on
//! real MQTT connections, no inference) in which one canary fails: the rollout aborts by
//! itself and every device it moved goes back to v1; the devices of later waves never move.

use std::time::Duration;

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
