//! A deployment's download policy on a real agent: a maintenance window in the device's own
//! time zone (the agent runs with `TZ`), a metered link (the agent's configuration and its
//! local API), and a rate limit. Held updates report `waiting` with what holds them; nothing
//! travels while a download is held, which the server's sent-bytes counter shows.

use std::time::{Duration, Instant};

use modelcast_proto::desired::{DownloadPolicy, WindowMode};
use modelcast_proto::report::{Held, Phase, UpdateProgress};
use modelcast_proto::window::MaintenanceWindow;
use modelcast_server::unix_now;
use modelcast_tests::{wait_for, AgentOptions, Fleet};

const NO_PROBATION: &str = "[probation]\nrequests = 0\nseconds = 0\n";
const KIB: u64 = 1024;

/// `HH:MM:SS` of Unix second `t` at `offset` seconds from UTC.
fn hms(t: i64, offset: i64) -> String {
    let s = (t + offset).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// A window that opens at Unix second `opens` and lasts an hour, written at `offset`.
fn window_at(opens: i64, offset: i64) -> MaintenanceWindow {
    let spec = format!("daily {}-{}", hms(opens, offset), hms(opens + 3600, offset));
    MaintenanceWindow::parse(&spec).expect("a window")
}

/// The update of `version` `device` reports, once `ok` says it is the one waited for.
fn wait_update(
    fleet: &Fleet,
    device: &str,
    what: &str,
    ok: impl Fn(&UpdateProgress) -> bool,
) -> UpdateProgress {
    wait_for(what, Duration::from_secs(60), || {
        let update = fleet.report(device)?.models.remove("classifier")?.update?;
        ok(&update).then_some(update)
    })
}

#[test]
fn an_update_outside_its_window_downloads_then_activates_when_the_window_opens() {
    let fleet = Fleet::embedded();
    // The device's local time is UTC+3; the window is written in it.
    let agent = fleet.start_agent_opts(
        "edge-1",
        &[("site", "lab")],
        AgentOptions {
            extra: NO_PROBATION.into(),
            env: vec![("TZ".into(), "EAT-3".into())],
            ..AgentOptions::default()
        },
    );
    fleet.wait_registered();
    let v1 = fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);
    fleet.publish_example(2, 16);
    let opens = unix_now() + 25;
    let policy = DownloadPolicy {
        window: Some(window_at(opens, 3 * 3600)),
        ..DownloadPolicy::default()
    };
    fleet.deploy_policy("classifier", 2, "*", policy);
    // Downloaded at once (the window holds only the activation), then held.
    let held = wait_update(&fleet, "edge-1", "v2 downloaded, waiting", |u| {
        u.version == 2 && u.phase == Phase::Waiting && u.received_bytes == u.total_bytes
    });
    assert_eq!(
        held.held,
        Some(Held::Window {
            until: opens as u64,
            activation_only: true
        }),
        "the window is read in the device's time zone"
    );
    assert!(
        unix_now() < opens,
        "the test's set-up took longer than the 25 s it allows before the window opens"
    );
    assert_eq!(agent.check_golden(&v1), "1", "v1 serves while v2 waits");
    fleet.wait_serving("edge-1", "classifier", 2);
    let at = unix_now();
    println!("v2 serves {} s after its window opened", at - opens);
    assert!(at >= opens, "activated before the window opened");
}

#[test]
fn a_metered_link_holds_downloads_the_deployment_does_not_allow() {
    let fleet = Fleet::embedded();
    let agent = fleet.start_agent_opts(
        "edge-1",
        &[("site", "lab")],
        AgentOptions {
            extra: NO_PROBATION.into(),
            transfer: "metered = true\n".into(),
            ..AgentOptions::default()
        },
    );
    fleet.wait_registered();
    assert!(agent.metered(), "as configured");
    let sent = || fleet.client.status().unwrap().chunk_requests.bytes;
    fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "*");
    let held = wait_update(&fleet, "edge-1", "v1 held by the metered link", |u| {
        u.version == 1 && u.phase == Phase::Waiting
    });
    assert_eq!(held.held, Some(Held::Metered));
    assert_eq!((held.received_bytes, sent()), (0, 0), "nothing travelled");

    // The link is no longer metered: the download goes on.
    agent.set_metered(false);
    assert!(!agent.metered());
    fleet.wait_serving("edge-1", "classifier", 1);

    // Metered again; a deployment that allows metered links goes through.
    agent.set_metered(true);
    let v2 = fleet.publish_example(2, 16);
    let metered_ok = DownloadPolicy {
        metered: true,
        ..DownloadPolicy::default()
    };
    fleet.deploy_policy("classifier", 2, "*", metered_ok.clone());
    fleet.wait_serving("edge-1", "classifier", 2);
    assert_eq!(agent.check_golden(&v2), "2");

    // A window that holds downloads too, and opens in an hour: nothing travels.
    let before = sent();
    fleet.publish_example(3, 16);
    let opens = unix_now() + 3600;
    let windowed = DownloadPolicy {
        window: Some(window_at(opens, 0)),
        window_mode: WindowMode::Download,
        utc_offset_minutes: Some(0),
        ..metered_ok
    };
    fleet.deploy_policy("classifier", 3, "*", windowed);
    let held = wait_update(&fleet, "edge-1", "v3 waiting for its window", |u| {
        u.version == 3 && u.phase == Phase::Waiting
    });
    assert_eq!(
        held.held,
        Some(Held::Window {
            until: opens as u64,
            activation_only: false
        })
    );
    assert_eq!(
        (held.received_bytes, sent()),
        (0, before),
        "nothing travelled"
    );
    assert_eq!(agent.check_golden(&v2), "2", "v2 serves on");
}

#[test]
fn a_download_held_to_a_rate_takes_at_least_its_size_over_the_rate() {
    let fleet = Fleet::embedded();
    let _agent = fleet.start_agent_with("edge-1", &[("site", "lab")], NO_PROBATION);
    fleet.wait_registered();
    let rate = 256 * KIB;
    let v1 = fleet.publish_example_of_size("classifier", 1, 2048 * KIB);
    let started = Instant::now();
    fleet.deploy_policy(
        "classifier",
        1,
        "*",
        DownloadPolicy {
            max_rate: Some(rate),
            ..DownloadPolicy::default()
        },
    );
    fleet.wait_serving("edge-1", "classifier", 1);
    let took = started.elapsed();
    let size = v1.download_size();
    // The bucket starts with one chunk; the rest comes at the rate at most.
    let least = Duration::from_secs_f64((size - u64::from(v1.chunk_size)) as f64 / rate as f64);
    println!(
        "{size} bytes at {rate} bytes/s took {took:?} ({:.0} bytes/s; at least {least:?})",
        size as f64 / took.as_secs_f64()
    );
    assert!(took >= least, "{took:?} is faster than the rate allows");
}
