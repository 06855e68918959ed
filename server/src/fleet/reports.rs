//! Device state reports and online status: stored in the device's record, fed to the rollouts,
//! and a new or relabelled device gets its desired state.

use modelcast_proto::report::DeviceReport;
use tracing::{info, warn};

use crate::db::DeviceEntry;
use crate::unix_now;

use super::{Fleet, Rejected};

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
            self.feed_rollouts(device, report).await;
        }
        if labels_changed {
            info!(%device, labels = ?entry.labels, "device registered");
            self.publish_desired(device).await?;
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
