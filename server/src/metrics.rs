//! The server's Prometheus metrics on `GET /metrics`: fleet-level gauges computed from the
//! store at each scrape (devices online and offline, devices serving each model version,
//! rollouts by state, active alerts) and the server's own counters (chunk requests, telemetry reports).
//!
//! Label sets are bounded by what operators create: model names and published versions,
//! rollout states; never device ids.

use std::collections::BTreeMap;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::db::DbError;
use crate::fleet::Fleet;
use crate::unix_now;

/// A device counted as online has sent something within this long (or holds a retained
/// `online` status).
pub const ONLINE_WITHIN_SECS: i64 = 300;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    model: String,
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AlertLabels {
    model: String,
    version: String,
    /// [`crate::drift::AlertKind::label`].
    kind: String,
    /// The output the alert concerns (empty for latency and error rate).
    output: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

/// The OpenMetrics text `openmetrics` in Prometheus' text format 0.0.4, for scrapers that
/// ask for `text/plain` (`promtool check metrics`, older Prometheus): a counter's `HELP` and
/// `TYPE` name its `_total` samples, `unknown` is `untyped`, and `UNIT` and `EOF` go.
pub fn to_text_format(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|tag| {
            let rest = line.strip_prefix(tag)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            let tail = if *tag == "# TYPE " && tail == "unknown" {
                "untyped"
            } else {
                tail
            };
            let suffix = if counters.contains(name) {
                "_total"
            } else {
                ""
            };
            Some(format!("{tag}{name}{suffix} {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None if line.starts_with("# UNIT ") || line == "# EOF" => continue,
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// The metrics text, as of now.
pub async fn render(fleet: &Fleet) -> Result<String, DbError> {
    let devices = fleet.db().devices().await?;
    let now = unix_now();
    let mut registry = Registry::with_prefix("modelcast_fleet");

    let by_state = Family::<StateLabels, Gauge>::default();
    let mut serving: BTreeMap<(String, u64), i64> = BTreeMap::new();
    for d in &devices {
        let online = d.online && now - d.last_seen <= ONLINE_WITHIN_SECS;
        let state = if online { "online" } else { "offline" };
        by_state
            .get_or_create(&StateLabels {
                state: state.into(),
            })
            .inc();
        for (model, m) in d.report.iter().flat_map(|r| &r.models) {
            if let Some(v) = m.serving_version() {
                *serving.entry((model.clone(), v)).or_default() += 1;
            }
        }
    }
    for state in ["online", "offline"] {
        // Both states show, at 0 too.
        by_state
            .get_or_create(&StateLabels {
                state: state.into(),
            })
            .inc_by(0);
    }
    registry.register(
        "devices",
        "Devices known to the fleet, by whether they were heard from lately",
        by_state,
    );

    let versions = Family::<VersionLabels, Gauge>::default();
    let served: Vec<(String, u64)> = serving.keys().cloned().collect();
    for ((model, version), n) in serving {
        versions
            .get_or_create(&VersionLabels {
                model,
                version: version.to_string(),
            })
            .set(n);
    }
    registry.register(
        "devices_serving",
        "Devices serving each model version",
        versions,
    );

    let rollouts = Family::<StateLabels, Gauge>::default();
    // Every state shows, at 0 too.
    for state in ["running", "paused", "completed", "aborted", "cancelled"] {
        rollouts
            .get_or_create(&StateLabels {
                state: state.into(),
            })
            .set(0);
    }
    for r in fleet.rollouts() {
        let state = match r.state {
            crate::rollout::RolloutState::Running => "running",
            crate::rollout::RolloutState::Paused => "paused",
            crate::rollout::RolloutState::Completed => "completed",
            crate::rollout::RolloutState::Aborted { .. } => "aborted",
            crate::rollout::RolloutState::Cancelled => "cancelled",
        };
        rollouts
            .get_or_create(&StateLabels {
                state: state.into(),
            })
            .inc();
    }
    registry.register("rollouts", "Rollouts by state", rollouts);

    let alerts = Family::<AlertLabels, Gauge>::default();
    // The alerts without an output show at 0 for every version served, so a dashboard reads
    // "none" rather than "no data" (an output's alerts appear when one is raised).
    for (model, version) in &served {
        for kind in ["latency", "error_rate"] {
            alerts
                .get_or_create(&AlertLabels {
                    model: model.clone(),
                    version: version.to_string(),
                    kind: kind.into(),
                    output: String::new(),
                })
                .set(0);
        }
    }
    for a in fleet.db().alerts().await?.iter().filter(|a| a.active()) {
        alerts
            .get_or_create(&AlertLabels {
                model: a.model.clone(),
                version: a.version.to_string(),
                kind: a.kind.label().into(),
                output: a.kind.output().unwrap_or_default().into(),
            })
            .inc();
    }
    registry.register(
        "alerts",
        "Devices with an active drift or anomaly alert, per model version and kind",
        alerts,
    );

    let status = fleet.status();
    let counter = |v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        c
    };
    let chunks = &status.chunk_requests;
    for (name, help, value) in [
        (
            "chunk_requests",
            "Chunk requests this server answered",
            chunks.requests,
        ),
        ("chunks_sent", "Chunks this server sent", chunks.chunks),
        (
            "chunk_sent_bytes",
            "Bytes of chunks this server sent, on the wire (compressed where it was)",
            chunks.bytes,
        ),
        (
            "chunk_raw_bytes",
            "Bytes of the chunks this server sent, before compression",
            chunks.raw_bytes,
        ),
        (
            "chunks_shared",
            "Chunks this server published once on an artifact's shared topic",
            chunks.shared,
        ),
        (
            "chunks_skipped",
            "Chunks asked for and not sent: a copy on the shared topic was on its way",
            chunks.skipped,
        ),
        (
            "chunk_requests_refused",
            "Chunk requests this server refused",
            chunks.refused,
        ),
        (
            "chunks_over_budget",
            "Chunks asked for on a device's own topic beyond its budget, not sent",
            chunks.over_budget,
        ),
        (
            "state_reports_over_budget",
            "State reports beyond their device's budget, dropped unread",
            status.reports_over_budget,
        ),
        (
            "chunk_requests_busy",
            "Chunk requests dropped because the queue of waiting requests was full (devices ask again)",
            chunks.busy,
        ),
        (
            "chunk_requests_merged",
            "Chunk requests merged into a waiting request of the same device and artifact",
            chunks.merged,
        ),
    ] {
        registry.register(name, help, counter(value));
    }
    for (name, help, value) in [
        (
            "chunk_requests_in_flight",
            "Chunk requests being answered now",
            chunks.in_flight,
        ),
        (
            "chunk_requests_waiting",
            "Chunk requests waiting to be answered",
            chunks.waiting,
        ),
        (
            "chunk_requests_limit",
            "Chunk requests answered at once, at most (--max-chunk-requests)",
            chunks.limit,
        ),
    ] {
        let g = Gauge::<i64>::default();
        g.set(i64::try_from(value).unwrap_or(i64::MAX));
        registry.register(name, help, g);
    }
    let dropped = Family::<ReasonLabels, Counter>::default();
    // Every reason shows, at 0 too (the front's only where there is one).
    let front_reasons = fleet
        .front()
        .map_or(&[][..], |_| &crate::budget::FRONT_REASONS[..]);
    for reason in crate::budget::REASONS.iter().chain(front_reasons) {
        dropped
            .get_or_create(&ReasonLabels {
                reason: (*reason).into(),
            })
            .inc_by(0);
    }
    for (reason, n) in fleet.drops().totals() {
        dropped
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc_by(n);
    }
    registry.register(
        "device_messages_dropped",
        "Device messages dropped or refused (over a budget, over their topic's bound, from a quarantined device, refused by the embedded broker's front), by reason; per device in GET /api/v1/devices",
        dropped,
    );
    if let Some(front) = fleet.front() {
        use std::sync::atomic::Ordering::Relaxed;
        let open = Gauge::<i64>::default();
        open.set(front.open.load(Relaxed) as i64);
        registry.register(
            "broker_front_connections_open",
            "Connections open at the embedded broker's TLS front",
            open,
        );
        let ended = Family::<ResultLabels, Counter>::default();
        for (result, n) in [
            ("admitted", front.admitted.load(Relaxed)),
            ("over_capacity", front.over_capacity.load(Relaxed)),
            ("timed_out", front.timed_out.load(Relaxed)),
            ("failed", front.failed.load(Relaxed)),
            ("refused", front.refused.load(Relaxed)),
        ] {
            ended
                .get_or_create(&ResultLabels {
                    result: result.into(),
                })
                .inc_by(n);
        }
        registry.register(
            "broker_front_connections",
            "Connections the embedded broker's TLS front accepted, by what became of them",
            ended,
        );
    }
    let reports = Family::<ResultLabels, Counter>::default();
    for (result, n) in [
        ("stored", status.telemetry.stored),
        ("duplicate", status.telemetry.duplicates),
        ("rejected", status.telemetry.rejected),
        ("over_budget", status.telemetry.over_budget),
    ] {
        reports
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc_by(n);
    }
    registry.register(
        "telemetry_reports",
        "Telemetry reports this server received, by what it did with them",
        reports,
    );
    let samples = Family::<ResultLabels, Counter>::default();
    for (result, n) in [
        ("stored", status.telemetry.samples_stored),
        ("refused", status.telemetry.samples_refused),
    ] {
        samples
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc_by(n);
    }
    registry.register(
        "samples",
        "Sampled requests this server received, by what it did with them",
        samples,
    );

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .map_err(|e| DbError::Pool(format!("encoding metrics: {e}")))?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_turns_into_the_text_format_prometheus_tools_read() {
        let om = "# HELP modelcast_fleet_chunks_sent Chunks this server sent.\n\
                  # TYPE modelcast_fleet_chunks_sent counter\n\
                  modelcast_fleet_chunks_sent_total 7\n\
                  # HELP modelcast_fleet_devices Devices.\n\
                  # TYPE modelcast_fleet_devices gauge\n\
                  modelcast_fleet_devices{state=\"online\"} 2\n\
                  # HELP x_bytes Bytes.\n\
                  # TYPE x_bytes unknown\n\
                  # UNIT x_bytes bytes\n\
                  x_bytes 1\n\
                  # EOF\n";
        assert_eq!(
            to_text_format(om),
            "# HELP modelcast_fleet_chunks_sent_total Chunks this server sent.\n\
             # TYPE modelcast_fleet_chunks_sent_total counter\n\
             modelcast_fleet_chunks_sent_total 7\n\
             # HELP modelcast_fleet_devices Devices.\n\
             # TYPE modelcast_fleet_devices gauge\n\
             modelcast_fleet_devices{state=\"online\"} 2\n\
             # HELP x_bytes Bytes.\n\
             # TYPE x_bytes untyped\n\
             x_bytes 1\n"
        );
    }
}
