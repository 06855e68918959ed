//! Telemetry store-and-forward. Two agents report every second through TCP proxies to
//! mosquitto; a subscriber on the broker's side records every report as it arrives. Both
//! proxies are cut for six seconds (the broker out of reach), then restored.
//!
//! - `roomy` (a 1 MiB queue) loses nothing: after the cut every sequence number from the first
//!   to the last arrived, in order of first arrival, and duplicates are only re-sends.
//! - `tight` (a queue of 1,000 bytes, about three reports) never holds more than its bound,
//!   drops its oldest reports, and says so: the reports that never arrived are exactly the
//!   ones its last report counts as dropped.
//!
//! `roomy` serves a model, and its reports carry what it served: requests, latency
//! percentiles, and the class histogram of its output.
//!
//! The fleet server stores the first copy of every report: its API, its CLI and its metrics
//! then answer for the fleet (what `roomy` served, across the `site=lab` group). A device
//! that sends only telemetry (no state report) stays seen: its `last_seen` moves.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use modelcast_proto::telemetry::TelemetryReport;
use modelcast_server::telemetry::Question;
use modelcast_tests::proxy::Proxy;
use modelcast_tests::{bin, wait_for, AgentOptions, Fleet, Mosquitto};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

const QUEUED_BYTES: &str = "modelcast_telemetry_queued_bytes";
const QUEUED_REPORTS: &str = "modelcast_telemetry_queued_reports";
const DROPPED: &str = "modelcast_telemetry_dropped_reports";

/// Every report the broker delivered, in arrival order, per device.
type Seen = Arc<Mutex<BTreeMap<String, Vec<TelemetryReport>>>>;

fn subscribe(port: u16) -> Seen {
    let seen: Seen = Arc::default();
    let mut opts = MqttOptions::new("telemetry-watcher", "127.0.0.1", port);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut connection) = Client::new(opts, 16);
    let sink = seen.clone();
    std::thread::spawn(move || {
        for event in connection.iter() {
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.subscribe("modelcast/d/+/telemetry", QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let report = TelemetryReport::from_slice(&p.payload).expect("a valid report");
                    let mut seen = sink.lock().unwrap();
                    seen.entry(report.device.clone()).or_default().push(report);
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });
    seen
}

fn seqs(seen: &Seen, device: &str) -> Vec<u64> {
    seen.lock().unwrap()[device].iter().map(|r| r.seq).collect()
}

#[test]
fn reports_are_queued_through_a_cut_and_arrive_in_order_within_the_queue_bound() {
    let dir = tempfile::tempdir().unwrap();
    let mosquitto = Mosquitto::start(dir.path());
    let seen = subscribe(mosquitto.port());
    let fleet = Fleet::with_broker(dir, mosquitto.port());
    let proxies = [
        Proxy::start(mosquitto.port()),
        Proxy::start(mosquitto.port()),
    ];
    let start = |id: &str, queue_bytes: u64, proxy: &Proxy| {
        fleet.start_agent_opts(
            id,
            &[("site", "lab")],
            AgentOptions {
                extra: format!("[telemetry]\ninterval_secs = 1\nqueue_bytes = {queue_bytes}\n"),
                broker_port: Some(proxy.port()),
                ..AgentOptions::default()
            },
        )
    };
    let roomy = start("roomy", 1 << 20, &proxies[0]);
    let tight = start("tight", 1_000, &proxies[1]);
    wait_for("two devices", Duration::from_secs(30), || {
        (fleet.client.devices().ok()?.len() == 2).then_some(())
    });
    let v1 = fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "site=lab");
    fleet.wait_serving("roomy", "classifier", 1);
    for _ in 0..50 {
        roomy.infer("classifier", &v1.golden[0].inputs).unwrap();
    }
    // The interval holding those requests is reported.
    let served = wait_for("a report with requests", Duration::from_secs(10), || {
        let seen = seen.lock().unwrap();
        let reports = seen.get("roomy")?;
        reports
            .iter()
            .flat_map(|r| r.models.iter())
            .find(|m| m.requests > 0)
            .cloned()
    });
    assert_eq!((served.model.as_str(), served.version), ("classifier", 1));
    assert!(served
        .latency_us
        .is_some_and(|l| l.p50 > 0 && l.p50 <= l.p99));
    let output = &served.outputs[0];
    assert!(output.count > 0 && output.non_finite == 0);
    assert_eq!(
        output.classes.iter().sum::<u64>(),
        served.requests,
        "one class counted per request: {output:?}"
    );

    // Cut both devices off until the facts the test is about have happened: tight's queue
    // dropped a report to keep its bound, and roomy's holds three.
    let before = seqs(&seen, "roomy").len();
    let dropped_before = tight.metric(DROPPED).unwrap_or(0.0);
    for p in &proxies {
        p.cut();
    }
    let mut most_queued: f64 = 0.0;
    wait_for(
        "tight to drop a report and roomy to queue three",
        Duration::from_secs(60),
        || {
            if let Some(bytes) = tight.metric(QUEUED_BYTES) {
                most_queued = most_queued.max(bytes);
            }
            let dropped = tight.metric(DROPPED)? > dropped_before;
            let queued = roomy.metric(QUEUED_REPORTS)? >= 3.0;
            (dropped && queued).then_some(())
        },
    );
    for p in &proxies {
        p.restore();
    }
    assert!(
        most_queued > 0.0,
        "the tight queue held reports during the cut"
    );
    assert!(
        most_queued <= 1_000.0,
        "{most_queued} bytes queued, bound 1000"
    );

    // After the cut, wait for reports built after it, then for the queues to drain: every
    // report of roomy's up to the newest, and tight's missing ones down to those it dropped.
    let last = wait_for("reports after the cut", Duration::from_secs(30), || {
        let r = seqs(&seen, "roomy");
        (r.len() > before + 8).then(|| *r.iter().max().unwrap())
    });
    wait_for("roomy's queue to drain", Duration::from_secs(30), || {
        let got: std::collections::BTreeSet<u64> = seqs(&seen, "roomy").into_iter().collect();
        (1..=last).all(|s| got.contains(&s)).then_some(())
    });
    wait_for("tight's queue to drain", Duration::from_secs(30), || {
        let reports = seen.lock().unwrap().get("tight")?.clone();
        let newest = reports.iter().max_by_key(|r| r.seq)?;
        let got: std::collections::BTreeSet<u64> = reports.iter().map(|r| r.seq).collect();
        let missing = (1..=newest.seq).filter(|s| !got.contains(s)).count() as u64;
        (missing <= newest.dropped).then_some(())
    });

    // roomy: every report from 1 to `last`, first arrivals in order.
    let arrived = seqs(&seen, "roomy");
    let mut first: Vec<u64> = Vec::new();
    for s in &arrived {
        if !first.contains(s) {
            first.push(*s);
        }
    }
    let upto: Vec<u64> = first.iter().copied().filter(|s| *s <= last).collect();
    assert_eq!(
        upto,
        (1..=last).collect::<Vec<u64>>(),
        "roomy's reports in order, none lost"
    );
    let dropped_roomy = seen.lock().unwrap()["roomy"]
        .iter()
        .map(|r| r.dropped)
        .max();
    assert_eq!(dropped_roomy, Some(0));

    // tight: what never arrived is what it says it dropped.
    let reports = seen.lock().unwrap()["tight"].clone();
    let newest = reports.iter().max_by_key(|r| r.seq).unwrap();
    let got: std::collections::BTreeSet<u64> = reports.iter().map(|r| r.seq).collect();
    let missing = (1..=newest.seq).filter(|s| !got.contains(s)).count() as u64;
    assert!(newest.dropped > 0, "the tight queue dropped reports");
    assert_eq!(
        missing, newest.dropped,
        "missing reports are the dropped ones"
    );
    server_view(&fleet, &seen, served.requests);
    println!(
        "roomy: {} reports, {} arrivals ({} re-sent); tight: {} reports, {} dropped, at most \
         {most_queued} bytes queued; a report with one model and one output of {} classes: {} \
         bytes",
        last,
        arrived.len(),
        arrived.len() - first.len(),
        newest.seq,
        newest.dropped,
        output.classes.len(),
        served_size(&seen)
    );
}

/// Size of roomy's last report that carried a model's figures.
fn served_size(seen: &Seen) -> usize {
    seen.lock().unwrap()["roomy"]
        .iter()
        .rev()
        .find(|r| !r.models.is_empty())
        .map_or(0, |r| r.to_vec().len())
}

/// The server kept one copy of every report that arrived, in order, and answers for the fleet.
fn server_view(fleet: &Fleet, seen: &Seen, served: u64) {
    let seen = seen.lock().unwrap().clone();
    for (device, reports) in &seen {
        let distinct: std::collections::BTreeSet<u64> = reports.iter().map(|r| r.seq).collect();
        // The server may lag the watcher by a report or two.
        let stored = wait_for("the server's copy", Duration::from_secs(10), || {
            let stored = fleet.client.device_telemetry(device, 3600).ok()?;
            let seqs: std::collections::BTreeSet<u64> = stored.iter().map(|r| r.seq).collect();
            distinct.is_subset(&seqs).then_some(stored)
        });
        let seqs: Vec<u64> = stored.iter().map(|r| r.seq).collect();
        let mut sorted = seqs.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(seqs, sorted, "{device}: one copy each, in order");
    }
    let status = fleet.client.status().unwrap();
    assert_eq!(status.telemetry.rejected, 0);
    assert!(status.telemetry.stored >= seen.values().map(Vec::len).min().unwrap() as u64);

    let question = Question {
        model: "classifier".into(),
        version: Some(1),
        group: Some("site=lab".into()),
        since_secs: 3600,
        step_secs: Some(60),
    };
    let answer = fleet.client.telemetry(&question).unwrap();
    assert_eq!(answer.devices, 1, "only roomy was asked for inferences");
    assert!(answer.totals.requests >= served && answer.totals.requests >= 50);
    assert_eq!(answer.totals.errors, 0);
    let latency = answer.totals.latency_us.expect("latencies");
    assert!(latency.p50 > 0 && latency.p50 <= latency.p99, "{latency:?}");
    let elsewhere = Question {
        group: Some("site=elsewhere".into()),
        ..question
    };
    assert_eq!(fleet.client.telemetry(&elsewhere).unwrap().devices, 0);

    let out = std::process::Command::new(bin("modelcast"))
        .args([
            "--server",
            fleet.client.base(),
            "telemetry",
            "--model",
            "classifier",
        ])
        .args(["--version", "1", "--group", "site=lab", "--since", "1h"])
        .output()
        .expect("modelcast telemetry");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("classifier v1 on site=lab over the last 1h: 1 devices"),
        "{text}"
    );
    assert!(text.contains(&answer.totals.requests.to_string()), "{text}");

    let metrics = fleet.client.metrics().unwrap();
    for line in [
        "modelcast_fleet_devices{state=\"online\"} 2",
        "modelcast_fleet_devices_serving{model=\"classifier\",version=\"1\"} 2",
        "modelcast_fleet_telemetry_reports_total{result=\"rejected\"} 0",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    println!(
        "the server's answer for the fleet: {}",
        serde_json::to_string(&answer.totals).unwrap()
    );
}

/// Nothing is lost between agent and server: inference requests are counted by the device
/// and reported while the fleet server is killed, while mosquitto restarts with the server
/// still away (the agent reconnects first; the broker keeps nothing for a server that is
/// not there), and after both are back. Every request sent is in the fleet's count, once:
/// a report leaves the device's queue only on the server's own receipt.
#[test]
fn every_request_is_counted_once_through_the_servers_absence_and_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut mosquitto = Mosquitto::start(dir.path());
    let mut fleet = Fleet::with_broker(dir, mosquitto.port());
    let agent = fleet.start_agent_opts(
        "edge-1",
        &[],
        AgentOptions {
            extra: "[telemetry]\ninterval_secs = 1\nresend_after_secs = 3\n".into(),
            ..AgentOptions::default()
        },
    );
    fleet.wait_registered();
    let v1 = fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);
    let mut sent = 0u64;
    let mut burst = |n: u64| {
        for _ in 0..n {
            agent.infer("classifier", &v1.golden[0].inputs).unwrap();
        }
        sent += n;
    };
    let queued = || {
        agent
            .metric("modelcast_telemetry_queued_reports")
            .unwrap_or(0.0) as u64
    };
    let counted = |fleet: &Fleet| {
        let question = Question {
            model: "classifier".into(),
            version: Some(1),
            group: None,
            since_secs: 3600,
            step_secs: Some(60),
        };
        fleet
            .client
            .telemetry(&question)
            .ok()
            .map(|a| a.totals.requests)
    };
    burst(100);

    // The server away: reports wait on the device, unacknowledged.
    fleet.kill_server();
    burst(100);
    let held = wait_for(
        "reports held for the absent server",
        Duration::from_secs(30),
        || {
            let q = queued();
            (q >= 4).then_some(q)
        },
    );
    // The broker restarts while the server is still away; the agent reconnects to it.
    mosquitto.restart();
    burst(100);
    wait_for(
        "more reports held after the broker restart",
        Duration::from_secs(30),
        || (queued() >= held + 3).then_some(()),
    );
    let most = queued();
    fleet.restart_server();
    burst(100);
    let total = wait_for("every request counted", Duration::from_secs(60), || {
        (counted(&fleet)? == sent).then_some(sent)
    });
    // Drained, and still counted once (re-sent copies are not counted twice).
    wait_for("the queue drained", Duration::from_secs(30), || {
        (queued() <= 1).then_some(())
    });
    assert_eq!(counted(&fleet), Some(sent), "counted once");
    let status = fleet.client.status().unwrap();
    println!(
        "through the server's absence and a broker restart: {total} requests sent, {total} \
         counted; at most {most} reports held; since its restart the server stored {} reports, {} duplicates",
        status.telemetry.stored, status.telemetry.duplicates
    );
}

#[test]
fn a_device_that_only_sends_telemetry_stays_seen() {
    let fleet = Fleet::embedded();
    let _agent = fleet.start_agent_with(
        "edge-1",
        &[("site", "lab")],
        "[telemetry]\ninterval_secs = 1\n",
    );
    fleet.wait_registered();
    let reported = |fleet: &Fleet| {
        let d = fleet
            .client
            .devices()
            .ok()?
            .into_iter()
            .find(|d| d.id == "edge-1")?;
        Some((d.last_seen, d.report?.at))
    };
    let (first_seen, report_at) = reported(&fleet).expect("edge-1");
    // No model, no update: the device sends no new state report, only telemetry.
    let (seen, at) = wait_for(
        "last_seen to move on telemetry",
        Duration::from_secs(60),
        || reported(&fleet).filter(|(seen, _)| *seen > first_seen + 10),
    );
    assert_eq!(
        at, report_at,
        "no state report in between: telemetry moved it"
    );
    println!("last seen moved from {first_seen} to {seen} on telemetry alone");

    // The server's /metrics as a scraper that asks for text/plain reads it: Prometheus' own
    // checker finds nothing wrong, and every device state shows, at 0 too.
    let text = ureq::get(format!("{}/metrics", fleet.client.base()))
        .header("Accept", "text/plain")
        .call()
        .expect("/metrics")
        .body_mut()
        .read_to_string()
        .expect("text");
    assert!(
        text.contains("modelcast_fleet_devices{state=\"online\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("modelcast_fleet_rollouts{state=\"running\"} 0"),
        "{text}"
    );
    let mut check = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (tests/run.sh installs Debian's prometheus package)");
    std::io::Write::write_all(check.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
