//! The server with its state in PostgreSQL (Debian's server, started by the test on a free
//! loopback port): two devices take an update by deployment and then a rollout, the server is
//! killed and started again on the same database, and the devices, the registry, the rollout
//! and the audit log are all still there, the audit log's chain whole.

use std::time::Duration;

use modelcast_server::audit::verify_chain;
use modelcast_server::rollout::{RolloutSpec, RolloutState};
use modelcast_tests::{wait_for, Fleet, Postgres};

/// Trials end after two seconds, so the rollout's canary wave commits quickly.
const PROBATION: &str = "[probation]\nrequests = 1000\nseconds = 2\n";

#[test]
fn updates_and_rollouts_run_with_the_state_in_postgresql_and_survive_a_server_restart() {
    let pg = Postgres::start();
    let mut fleet = Fleet::on_postgres(&pg.database("fleet"));
    let _agents =
        ["edge-1", "edge-2"].map(|id| fleet.start_agent_with(id, &[("site", "lab")], PROBATION));
    wait_for("two devices", Duration::from_secs(30), || {
        (fleet.client.devices().ok()?.len() == 2).then_some(())
    });
    let v1 = fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "site=lab");
    for id in ["edge-1", "edge-2"] {
        fleet.wait_serving(id, "classifier", 1);
    }
    fleet.publish_example(2, 16);
    let rollout =
        fleet.start_rollout(RolloutSpec::new("classifier", 2, "site=lab", &["1"]).unwrap());
    for id in ["edge-1", "edge-2"] {
        fleet.wait_serving(id, "classifier", 2);
    }
    wait_for("the rollout completes", Duration::from_secs(60), || {
        let r = fleet.client.rollout(rollout.id).ok()?;
        (r.state == RolloutState::Completed).then_some(())
    });

    fleet.restart_server();
    let devices = fleet.client.devices().expect("devices after the restart");
    assert_eq!(devices.len(), 2);
    let versions: Vec<u64> = fleet
        .client
        .models()
        .expect("registry")
        .iter()
        .map(|m| m.manifest.version)
        .collect();
    assert_eq!(versions, [1, 2]);
    assert_eq!(
        fleet.client.rollout(rollout.id).expect("rollout").state,
        RolloutState::Completed
    );
    let audit = fleet.client.audit(1).expect("audit");
    verify_chain(&audit).expect("the audit chain is whole");
    let actions: Vec<&str> = audit.iter().map(|e| e.action.as_str()).collect();
    for action in ["publish", "deploy", "rollout.start", "rollout.end"] {
        assert!(actions.contains(&action), "{action} in {actions:?}");
    }
    // A device still gets chunks and desired state from the restarted server.
    let v3 = fleet.publish_example(3, 16);
    fleet.deploy("classifier", 3, "site=lab");
    for id in ["edge-1", "edge-2"] {
        fleet.wait_serving(id, "classifier", 3);
    }
    assert_ne!(v1.sha256, v3.sha256);
}
