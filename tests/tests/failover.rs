//! Control-server failover: two control servers started with `--lease` share one PostgreSQL
//! database and one mosquitto. The first holds the control lease (a PostgreSQL advisory lock);
//! the second waits as a standby, answering health and status only.
//!
//! - The control server is killed (SIGKILL): the standby takes the lease and acts as the
//!   control server, with everything the first one stored (registry, deployments, audit log):
//!   a new version deployed through it reaches the device. Prints the failover time.
//! - The first server, started again, waits as a standby.
//! - The new control server's database session is cut (`pg_terminate_backend`): it may no
//!   longer hold the lease, so it stops at once, with an error, rather than act beside the
//!   standby that takes over.

use std::time::{Duration, Instant};

use modelcast_ops::client::Client;
use modelcast_tests::{wait_for, Fleet, Mosquitto, Postgres};

fn role(client: &Client) -> Option<String> {
    client.status().ok().map(|s| s.role)
}

/// The database's clock now.
fn db_now(pg: &Postgres) -> String {
    pg.sql("fleet", "SELECT now()")
}

/// Waits until a server waiting for the lease has asked for it again since `since` (the
/// database's clock): the positive fact before asserting that it still waits.
fn wait_for_a_lease_attempt(pg: &Postgres, since: &str) {
    wait_for(
        "a standby to ask for the lease again",
        Duration::from_secs(20),
        || {
            let n = pg.sql(
                "fleet",
                &format!(
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE \
                     'SELECT pg_try_advisory_lock%' AND query_start > '{since}'"
                ),
            );
            (n.trim().parse::<u32>().ok()? >= 1).then_some(())
        },
    );
}

#[test]
fn a_standby_takes_over_when_the_control_server_dies_and_a_lost_lease_stops_its_holder() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Mosquitto::start(dir.path());
    let url = pg.database("fleet");
    let mut fleet = Fleet::leased(dir, broker.port(), &url);
    let first = Client::new(fleet.client.base());
    assert_eq!(role(&first).as_deref(), Some("control"));
    let (mut second_proc, second) = fleet.start_standby("second");
    assert_eq!(role(&second).as_deref(), Some("standby"));
    // A standby serves no operator API.
    assert!(second.devices().is_err());

    let _agent = fleet.start_agent_with("edge-1", &[("site", "lab")], "");
    fleet.wait_registered();
    fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "site=lab");
    fleet.wait_serving("edge-1", "classifier", 1);
    let since = db_now(&pg);
    wait_for_a_lease_attempt(&pg, &since);
    assert_eq!(
        role(&second).as_deref(),
        Some("standby"),
        "one control server"
    );

    // The control server dies: the standby takes over.
    fleet.kill_server();
    let killed = Instant::now();
    wait_for("the standby to take over", Duration::from_secs(30), || {
        (role(&second).as_deref() == Some("control")).then_some(())
    });
    let took = killed.elapsed();
    wait_for(
        "the new control server's API",
        Duration::from_secs(20),
        || second.devices().ok(),
    );
    println!("failover: the standby acted as the control server {took:?} after the kill");
    assert!(took < Duration::from_secs(15), "{took:?}");

    // It has everything the first stored, and deploys.
    fleet.client = Client::new(second.base());
    let audit = fleet.client.audit(0).expect("audit");
    assert!(
        audit.iter().any(|e| e.action == "deploy"),
        "the first server's deployment is in the shared audit log"
    );
    fleet.publish_example(2, 16);
    fleet.deploy("classifier", 2, "site=lab");
    fleet.wait_serving("edge-1", "classifier", 2);

    // The first server comes back: it waits.
    fleet.restart_server_waiting_for(|| (role(&first).as_deref() == Some("standby")).then_some(()));
    let since = db_now(&pg);
    wait_for_a_lease_attempt(&pg, &since);
    assert_eq!(role(&first).as_deref(), Some("standby"));
    assert_eq!(role(&second).as_deref(), Some("control"));

    // The holder's session is cut: it stops; the standby takes over.
    let holder = pg.sql(
        "fleet",
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1",
    );
    assert!(
        !holder.is_empty() && !holder.contains('\n'),
        "one lease: {holder:?}"
    );
    let cut = Instant::now();
    pg.sql("fleet", &format!("SELECT pg_terminate_backend({holder})"));
    let status = wait_for("the holder to stop", Duration::from_secs(20), || {
        second_proc.exited()
    });
    assert!(!status.success(), "a lost lease is an error: {status}");
    println!(
        "the holder stopped {:?} after its session was cut",
        cut.elapsed()
    );
    wait_for(
        "the first server to take over again",
        Duration::from_secs(30),
        || (role(&first).as_deref() == Some("control")).then_some(()),
    );
    fleet.client = first;
    wait_for("the operator API", Duration::from_secs(20), || {
        fleet.client.devices().ok()
    });
    fleet.deploy("classifier", 1, "site=lab");
    fleet.wait_serving("edge-1", "classifier", 1);
}
