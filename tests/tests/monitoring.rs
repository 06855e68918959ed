//! The monitoring pieces in `deploy/`: Prometheus' configuration and alerting rules, checked
//! and unit-tested with Prometheus' own `promtool` (Debian's package, installed by
//! `tests/run.sh`), and the Grafana dashboard, whose every query is valid PromQL (checked by
//! promtool as recording rules) and, like every rule, names only metrics that a real fleet
//! server and a real agent export.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use modelcast_tests::Fleet;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool (Debian's prometheus package; tests/run.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// Every query of the Grafana dashboard (panels and template variables), `$model` bound.
fn dashboard_queries() -> Vec<String> {
    let text = std::fs::read_to_string(deploy().join("grafana/modelcast.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push(target["expr"].as_str().expect("a PromQL expr").to_string());
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        // `label_values(metric, label)`: Grafana's helper, not PromQL; its metric is checked.
        let q = var["query"]["query"].as_str().expect("a variable query");
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.split(',').next())
            .expect("label_values(metric, label)");
        queries.push(inner.to_string());
    }
    queries
        .into_iter()
        .map(|q| q.replace("$model", "classifier"))
        .collect()
}

/// The `modelcast_…` names a PromQL text refers to.
fn metric_names(promql: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = promql.as_bytes();
    let mut i = 0;
    while let Some(at) = promql[i..].find("modelcast_") {
        let start = i + at;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = promql[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(promql.len(), |e| start + e);
        if boundary {
            names.insert(promql[start..end].to_string());
        }
        i = end;
    }
    names
}

/// The series names a `/metrics` page exports (in the text format a Prometheus scrape asks
/// for): every sample's name, and for each declared family the names its samples take.
fn exported(url: &str) -> BTreeSet<String> {
    let text = ureq::get(url)
        .header("Accept", "text/plain;version=0.0.4")
        .call()
        .unwrap_or_else(|e| panic!("{url}: {e}"))
        .body_mut()
        .read_to_string()
        .unwrap();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let base = name.strip_suffix("_total").unwrap_or(name);
            match kind {
                "counter" => {
                    names.insert(format!("{base}_total"));
                }
                "histogram" => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
                _ => {
                    names.insert(name.to_string());
                }
            }
        } else if !line.starts_with('#') {
            if let Some(name) = line.split(['{', ' ']).next().filter(|n| !n.is_empty()) {
                names.insert(name.to_string());
            }
        }
    }
    names
}

#[test]
fn prometheus_configuration_and_rules_check_and_their_unit_tests_pass() {
    let dir = deploy().join("prometheus");
    promtool(&["check", "config", "prometheus.yml"], &dir);
    let rules = promtool(&["check", "rules", "rules.yml"], &dir);
    assert!(rules.contains("SUCCESS"), "{rules}");
    let tests = promtool(&["test", "rules", "rules_test.yml"], &dir);
    assert!(tests.contains("SUCCESS"), "{tests}");
}

#[test]
fn every_dashboard_query_is_promql() {
    let queries = dashboard_queries();
    assert!(queries.len() >= 10, "{queries:?}");
    let dir = tempfile::tempdir().unwrap();
    let rules: Vec<serde_json::Value> = queries
        .iter()
        .enumerate()
        .map(|(i, q)| serde_json::json!({ "record": format!("grafana:query_{i}"), "expr": q }))
        .collect();
    // JSON is YAML: one group of recording rules, one per query.
    let file = serde_json::json!({ "groups": [{ "name": "grafana", "rules": rules }] });
    std::fs::write(dir.path().join("queries.yml"), file.to_string()).unwrap();
    promtool(&["check", "rules", "queries.yml"], dir.path());
}

#[test]
fn rules_and_dashboard_name_only_metrics_a_server_and_an_agent_export() {
    let mut wanted =
        metric_names(&std::fs::read_to_string(deploy().join("prometheus/rules.yml")).unwrap());
    for q in dashboard_queries() {
        wanted.extend(metric_names(&q));
    }
    assert!(wanted.len() >= 12, "{wanted:?}");

    // A fleet with a device serving a model that has answered a request and refused one.
    let fleet = Fleet::embedded();
    let agent = fleet.start_agent("edge-1", &[("site", "lab")]);
    fleet.wait_registered();
    let v1 = fleet.publish_example(1, 8);
    fleet.deploy("classifier", 1, "*");
    fleet.wait_serving("edge-1", "classifier", 1);
    assert_eq!(agent.check_golden(&v1), "1");
    let bad = ureq::post(format!(
        "http://127.0.0.1:{}/v2/models/classifier/infer",
        agent.http_port
    ))
    .send_json(serde_json::json!({ "inputs": [] }));
    assert!(bad.is_err(), "an empty request is refused");

    let mut have = exported(&format!("{}/metrics", fleet.client.base()));
    have.extend(exported(&format!(
        "http://127.0.0.1:{}/metrics",
        agent.http_port
    )));
    let missing: Vec<&String> = wanted.iter().filter(|n| !have.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "queried but not exported: {missing:?}\nexported: {have:?}"
    );
}
