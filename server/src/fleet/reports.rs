//! Device state reports and online status: stored in the device's record, fed to the rollouts,
//! and a new or relabelled device gets its desired state.

use modelcast_proto::report::DeviceReport;
use tracing::{info, warn};

use crate::db::{DbError, DeviceEntry};
use crate::unix_now;

use super::{Fleet, Rejected};

/// Least time between two writes of a device's `last_seen` for its telemetry.
pub const SEEN_EVERY_SECS: i64 = 10;
/// Most devices whose last such write is remembered (then forgotten wholesale).
const SEEN_REMEMBERED: usize = 100_000;

impl Fleet {
    pub(super) async fn handle_report(&self, device: &str, payload: &[u8]) -> Result<(), Rejected> {
        if payload.is_empty() {
            return Ok(()); // A cleared retained message.
        }
        let report = DeviceReport::from_slice(payload)?;
        if report.device != device {
            return Err(Rejected::WrongDevice {
                kind: "report",
                named: report.device,
            });
        }
        let previous = self.db.device(device).await?;
        let labels_changed = previous.as_ref().is_none_or(|p| p.labels != report.labels);
        // What it runs decides the form of each version the director sends it.
        let engines_changed = previous
            .as_ref()
            .and_then(|p| p.report.as_ref())
            .is_none_or(|p| p.engines != report.engines);
        // The key its encrypted versions' content keys are sealed to (a new one when the
        // device lost its key file, say): wrapped again.
        let sealing_changed = previous
            .as_ref()
            .and_then(|p| p.report.as_ref())
            .is_none_or(|p| p.sealing_key != report.sealing_key);
        // What each model serves: alerts go stale only when that changes.
        let serving = |r: &DeviceReport| -> Vec<(String, Option<u64>)> {
            r.models
                .iter()
                .map(|(m, s)| (m.clone(), s.serving_version()))
                .collect()
        };
        let serving_changed = previous
            .as_ref()
            .and_then(|p| p.report.as_ref())
            .is_none_or(|p| serving(p) != serving(&report));
        let known_error = previous
            .as_ref()
            .and_then(|p| p.report.as_ref()?.last_error.as_ref());
        if let Some(e) = &report.last_error {
            if known_error != Some(e) {
                warn!(
                    %device,
                    model = e.model.as_deref().unwrap_or("-"),
                    version = e.version.unwrap_or(0),
                    reason = %e.reason,
                    "device rejected or rolled back an update"
                );
            }
        }
        let entry = DeviceEntry {
            id: device.into(),
            labels: report.labels.clone(),
            online: previous.as_ref().is_none_or(|p| p.online),
            last_seen: unix_now(),
            report: Some(report),
            quarantine: self.quarantined.of(device),
            dropped: Default::default(),
        };
        self.db.put_device(&entry).await?;
        if let Some(report) = &entry.report {
            if serving_changed {
                self.clear_stale_alerts(device, report).await?;
            }
            self.feed_rollouts(device, report).await;
        }
        if labels_changed {
            info!(%device, labels = ?entry.labels, "device registered");
        }
        if labels_changed || engines_changed || sealing_changed {
            self.publish_desired(device).await?;
        }
        Ok(())
    }

    /// Clears `device`'s alerts for versions it no longer serves (it was rolled back, or moved
    /// on): no telemetry of that version will come to clear them.
    async fn clear_stale_alerts(&self, device: &str, report: &DeviceReport) -> Result<(), DbError> {
        let alerts = self.db.alerts().await?;
        let serving = |model: &str| report.models.get(model)?.serving_version();
        let now_ms = crate::unix_now_ms();
        for alert in crate::drift::stale(&alerts, device, serving) {
            let mut alert = alert.clone();
            alert.cleared_ms = Some(now_ms);
            self.db.put_alert(&alert).await?;
            info!(%device, model = %alert.model, version = alert.version, kind = %alert.kind, "alert cleared: the device no longer serves that version");
        }
        Ok(())
    }

    /// `device` was heard from (a telemetry report): its `last_seen` moves, written at most
    /// every [`SEEN_EVERY_SECS`], so a fleet that only sends telemetry still shows as seen.
    pub(super) async fn seen(&self, device: &str) -> Result<(), DbError> {
        let now = unix_now();
        {
            let mut written = self.seen_written.lock().expect("seen lock");
            if written
                .get(device)
                .is_some_and(|at| now - at < SEEN_EVERY_SECS)
            {
                return Ok(());
            }
            if written.len() >= SEEN_REMEMBERED {
                written.clear();
            }
            written.insert(device.to_string(), now);
        }
        let Some(mut entry) = self.db.device(device).await? else {
            return Ok(());
        };
        if entry.last_seen < now {
            entry.last_seen = now;
            self.db.put_device(&entry).await?;
        }
        Ok(())
    }

    pub(super) async fn handle_online(&self, device: &str, payload: &[u8]) -> Result<(), Rejected> {
        let Some(mut entry) = self.db.device(device).await? else {
            return Ok(());
        };
        entry.online = payload == b"online";
        entry.last_seen = unix_now();
        entry.quarantine = self.quarantined.of(device);
        Ok(self.db.put_device(&entry).await?)
    }
}
