//! Benchmark: how well a canary holds its share. One agent (the release build beside this
//! binary) serves v1 with v2 as a 10 % canary; 10,000 requests that name no version, then
//! 10,000 requests from 10,000 distinct users keyed by a header, then 100 users asking 100
//! times each. Prints each share against the 10 % asked for, and whether every user stayed on
//! one version.
//!
//! Run: `cargo build --release --bins && target/release/bench-split` (`BENCH_REQUESTS`,
//! default 10,000; `BENCH_PERCENT`, default 10).

use std::collections::BTreeMap;
use std::time::Duration;

use modelcast_proto::desired::CanarySpec;
use modelcast_tests::hammer::InferClient;
use modelcast_tests::{wait_for, AgentOptions, Fleet};

fn main() {
    let n: usize = std::env::var("BENCH_REQUESTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let percent: u32 = std::env::var("BENCH_PERCENT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let fleet = Fleet::embedded();
    let options = AgentOptions {
        // Long enough a trial that the canary is still one at the end.
        extra: "[probation]\nrequests = 1000000\nseconds = 3600\nmax_p99_ratio = 1000.0\n".into(),
        ..AgentOptions::default()
    };
    let agent = fleet.start_agent_opts("bench-1", &[], options);
    fleet.wait_registered();
    let v1 = fleet.publish_example(1, 16);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("bench-1", "classifier", 1);
    fleet.publish_example(2, 16);

    let client = InferClient::new(agent.http_port, "classifier", &v1.golden[0].inputs);
    let ask = |user: Option<&str>| -> String {
        client
            .call_with(user.map(|u| ("x-user", u)))
            .expect("inference")
            .0
    };
    let wait_split = |key: Option<&str>| {
        fleet.deploy_canary(
            "classifier",
            2,
            "*",
            CanarySpec {
                percent,
                key: key.map(String::from),
            },
        );
        wait_for("the split", Duration::from_secs(60), || {
            let c = fleet
                .report("bench-1")?
                .models
                .get("classifier")?
                .canary
                .clone()?;
            (c.key.as_deref() == key).then_some(())
        });
    };
    let share = |answers: &[String]| {
        answers.iter().filter(|v| *v == "2").count() as f64 * 100.0 / answers.len() as f64
    };

    wait_split(None);
    let counted: Vec<String> = (0..n).map(|_| ask(None)).collect();
    println!(
        "by count: {n} requests, {:.2} % on the canary (asked {percent} %)",
        share(&counted)
    );

    wait_split(Some("x-user"));
    let keyed: Vec<String> = (0..n).map(|u| ask(Some(&format!("user-{u}")))).collect();
    println!(
        "sticky by x-user: {n} users, {:.2} % on the canary (asked {percent} %)",
        share(&keyed)
    );
    let mut seen: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for round in 0..100 {
        for u in 0..100 {
            let user = format!("user-{u}");
            let v = ask(Some(&user));
            *seen.entry(user).or_default().entry(v).or_default() += 1;
            let _ = round;
        }
    }
    let moved = seen.values().filter(|versions| versions.len() > 1).count();
    let on_canary = seen.values().filter(|v| v.contains_key("2")).count();
    println!("100 users x 100 requests: {moved} users saw both versions; {on_canary} of 100 on the canary");
}
