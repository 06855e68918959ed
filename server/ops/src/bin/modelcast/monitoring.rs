//! What `modelcast deploy --follow`, `telemetry`, `alerts` and `samples` print: progress bars
//! per device, latency tables, times, sampled requests as JSON lines.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::bail;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use modelcast_ops::client::Client;
use modelcast_proto::report::Phase;
use modelcast_server::group::Selector;

/// Shows one progress bar per device of the group until every one serves `version`.
pub(crate) fn follow(
    client: &Client,
    model: &str,
    version: u64,
    group: &str,
    timeout: u64,
) -> anyhow::Result<()> {
    let selector = Selector::parse(group)?;
    let bars = MultiProgress::new();
    let style =
        ProgressStyle::with_template("{prefix:<14} [{bar:32}] {bytes:>10}/{total_bytes:<10} {msg}")
            .expect("valid template")
            .progress_chars("=> ");
    let mut shown: BTreeMap<String, ProgressBar> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(timeout);
    loop {
        let devices: Vec<_> = client
            .devices()?
            .into_iter()
            .filter(|d| selector.matches(&d.labels))
            .collect();
        let mut done = 0;
        let mut failed = 0;
        for d in &devices {
            let bar = shown.entry(d.id.clone()).or_insert_with(|| {
                let b = bars.add(ProgressBar::new(1));
                b.set_style(style.clone());
                b.set_prefix(d.id.clone());
                b
            });
            let state = d.report.as_ref().and_then(|r| r.models.get(model));
            let serving = state.and_then(|s| s.serving_version());
            let update = state
                .and_then(|s| s.update.as_ref())
                .filter(|u| u.version == version);
            if let Some(u) = update {
                bar.set_length(u.total_bytes.max(1));
                bar.set_position(u.received_bytes);
            }
            let on_trial = update.is_some_and(|u| u.phase == Phase::Probation);
            if serving == Some(version) {
                bar.set_length(bar.length().unwrap_or(1).max(1));
                bar.set_position(bar.length().unwrap_or(1));
                bar.set_message(if on_trial {
                    format!("serving v{version} (on probation)")
                } else {
                    format!("serving v{version}")
                });
                done += 1;
            } else if let Some(u) = update {
                let reason = d
                    .report
                    .as_ref()
                    .and_then(|r| r.last_error.as_ref())
                    .map(|e| e.reason.clone())
                    .unwrap_or_default();
                bar.set_message(match u.phase {
                    Phase::Downloading => "downloading".to_string(),
                    Phase::Staging => "verifying, loading, checking golden vectors".to_string(),
                    Phase::Probation | Phase::Active => format!("serving v{version}"),
                    Phase::Failed => format!("FAILED: {reason}"),
                    Phase::Waiting => match u.held {
                        Some(held) => held.to_string(),
                        None => "waiting".to_string(),
                    },
                });
                if u.phase == Phase::Failed {
                    failed += 1;
                }
            } else {
                bar.set_message(format!(
                    "waiting (serving {})",
                    serving.map_or("-".into(), |v| format!("v{v}"))
                ));
            }
        }
        if !devices.is_empty() && done + failed == devices.len() {
            for b in shown.values() {
                b.finish();
            }
            if failed > 0 {
                bail!(
                    "{failed} of {} device(s) failed to install {model} v{version}",
                    devices.len()
                );
            }
            println!(
                "all {} device(s) in '{group}' serve {model} v{version}",
                devices.len()
            );
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "timed out: {done} of {} device(s) serve {model} v{version}",
                devices.len()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A telemetry answer as a table: the window, each version, then each step with requests.
pub(crate) fn print_telemetry(a: &modelcast_server::telemetry::Answer) {
    use modelcast_server::telemetry::Totals;
    let q = &a.question;
    println!(
        "{} {} on {} over the last {}: {} devices, {} reports",
        q.model,
        q.version
            .map_or("(all versions)".into(), |v| format!("v{v}")),
        q.group.as_deref().unwrap_or("every device"),
        humantime::format_duration(std::time::Duration::from_secs(q.since_secs)),
        a.devices,
        a.points
    );
    let row = |what: &str, t: &Totals| {
        let (p50, p95, p99) = t
            .latency_us
            .map_or(("-".into(), "-".into(), "-".into()), |l| {
                let ms = |us: u64| format!("{:.3}", us as f64 / 1000.0);
                (ms(l.p50), ms(l.p95), ms(l.p99))
            });
        println!(
            "{what:<22} {:>10} {:>8} {:>9.4}% {:>9} {:>9} {:>9} {:>6}",
            t.requests,
            t.errors,
            t.error_rate * 100.0,
            p50,
            p95,
            p99,
            t.non_finite
        );
    };
    println!(
        "{:<22} {:>10} {:>8} {:>10} {:>9} {:>9} {:>9} {:>6}",
        "", "requests", "errors", "error rate", "p50 ms", "p95 ms", "p99 ms", "NaN"
    );
    row("window", &a.totals);
    for (v, t) in &a.versions {
        row(&format!("  v{v}"), t);
    }
    for s in a.series.iter().filter(|s| s.totals.requests > 0) {
        let at = time::OffsetDateTime::from_unix_timestamp(s.at_ms / 1000)
            .ok()
            .and_then(|t| {
                t.format(time::macros::format_description!(
                    "[year]-[month]-[day] [hour]:[minute]:[second]"
                ))
                .ok()
            })
            .unwrap_or_else(|| s.at_ms.to_string());
        row(&at, &s.totals);
    }
}

/// Unix milliseconds as RFC 3339 (UTC, seconds).
pub(crate) fn rfc3339_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

/// One sample as a line of `modelcast samples`: tensors as the Open Inference Protocol writes
/// them (numbers, not the stored little-endian hex).
pub(crate) fn sample_line(
    s: &modelcast_server::db::StoredSample,
) -> anyhow::Result<serde_json::Value> {
    let tensors = |ts: &[modelcast_proto::manifest::TensorData]| -> anyhow::Result<Vec<_>> {
        ts.iter()
            .map(|t| {
                Ok(serde_json::json!({
                    "name": t.name,
                    "datatype": t.datatype,
                    "shape": t.shape,
                    "data": modelcast_agent::kserve::data_value(
                        &modelcast_agent::engine::HostTensor::from_data(t)?.values
                    ),
                }))
            })
            .collect()
    };
    let x = &s.sample;
    Ok(serde_json::json!({
        "device": s.device,
        "model": x.model,
        "version": x.version,
        "slot": x.slot,
        "id": x.id,
        "at_ms": x.at_ms,
        "inputs": tensors(&x.inputs)?,
        "outputs": tensors(&x.outputs)?,
    }))
}
