//! The devices as operators see them: quarantines ([`crate::quarantine`]) and the device list
//! with what was dropped of each one's traffic.

use crate::db::{DbError, DeviceEntry, Quarantine};

use super::Fleet;

impl Fleet {
    /// Whether `device` is quarantined.
    pub fn is_quarantined(&self, device: &str) -> bool {
        self.quarantined.contains(device)
    }

    /// Quarantines `device` (`Some`) or releases it (`None`): while quarantined, everything
    /// it sends (reports, telemetry, chunk requests) is dropped unread and counted. Kept in
    /// its device record, so it outlasts a restart.
    pub async fn quarantine(
        &self,
        device: &str,
        quarantine: Option<Quarantine>,
    ) -> Result<DeviceEntry, DbError> {
        // Memory first: a report handled meanwhile writes the record with the new state.
        let before = self.quarantined.set(device, quarantine.clone());
        let stored = async {
            let mut entry = self.db.device(device).await?.unwrap_or(DeviceEntry {
                id: device.to_string(),
                labels: Default::default(),
                report: None,
                last_seen: 0,
                online: false,
                quarantine: None,
                dropped: Default::default(),
            });
            entry.quarantine = quarantine;
            self.db.put_device(&entry).await?;
            Ok(entry)
        }
        .await;
        if stored.is_err() {
            // Not kept: as it was.
            self.quarantined.set(device, before);
        }
        stored
    }

    /// Every device as stored, with its quarantine and what was dropped of its traffic;
    /// identities that never reported but had traffic dropped (a certificate refused at the
    /// broker's front, say) are listed too.
    pub async fn devices(&self) -> Result<Vec<DeviceEntry>, DbError> {
        let mut devices = self.db.devices().await?;
        let mut known = std::collections::BTreeSet::new();
        for d in &mut devices {
            d.dropped = self.drops.of(&d.id);
            known.insert(d.id.clone());
        }
        for (id, dropped) in self.drops.all() {
            if !known.contains(&id) {
                devices.push(DeviceEntry {
                    id,
                    labels: Default::default(),
                    report: None,
                    last_seen: 0,
                    online: false,
                    quarantine: None,
                    dropped,
                });
            }
        }
        Ok(devices)
    }
}
