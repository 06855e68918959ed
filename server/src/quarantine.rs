//! Operators' quarantines of devices (`modelcast quarantine`): while a device is quarantined,
//! everything it sends is dropped unread and counted ([`crate::budget::Drops`]), and no rollout
//! takes it as a member. The embedded broker's front ([`crate::broker::front`]) also refuses
//! it at connect and cuts a connected one off at its next packet. Held in memory for the check on every message, and stored in each
//! device's record ([`crate::db::DeviceEntry::quarantine`]) so that it outlasts a restart; the
//! memory is what an operator set last, and every write of a device's record carries it.

use std::collections::BTreeMap;
use std::sync::RwLock;

use crate::db::{DeviceEntry, Quarantine};

/// Every quarantined device.
#[derive(Debug, Default)]
pub struct Quarantines {
    by_device: RwLock<BTreeMap<String, Quarantine>>,
}

impl Quarantines {
    /// The quarantines stored in `devices`' records.
    pub fn from_records(devices: Vec<DeviceEntry>) -> Self {
        let by_device = devices
            .into_iter()
            .filter_map(|d| Some((d.id, d.quarantine?)))
            .collect();
        Quarantines {
            by_device: RwLock::new(by_device),
        }
    }

    /// `device`'s quarantine, if it is quarantined.
    pub fn of(&self, device: &str) -> Option<Quarantine> {
        self.by_device
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(device)
            .cloned()
    }

    /// Whether `device` is quarantined.
    pub fn contains(&self, device: &str) -> bool {
        self.by_device
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(device)
    }

    /// Quarantines `device` (`Some`) or releases it (`None`); returns what it replaces.
    pub fn set(&self, device: &str, quarantine: Option<Quarantine>) -> Option<Quarantine> {
        let mut all = self.by_device.write().unwrap_or_else(|e| e.into_inner());
        match quarantine {
            Some(q) => all.insert(device.to_string(), q),
            None => all.remove(device),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_quarantines_are_loaded_and_set_replaces() {
        let q = Quarantine {
            by: "ops".into(),
            at: 1,
            reason: "floods".into(),
        };
        let entry = |id: &str, quarantine: Option<Quarantine>| DeviceEntry {
            id: id.into(),
            labels: Default::default(),
            report: None,
            last_seen: 0,
            online: false,
            quarantine,
            dropped: Default::default(),
        };
        let all = Quarantines::from_records(vec![entry("a", Some(q.clone())), entry("b", None)]);
        assert!(all.contains("a") && !all.contains("b"));
        assert_eq!(all.set("a", None), Some(q.clone()));
        assert_eq!(all.of("a"), None);
        assert_eq!(all.set("b", Some(q.clone())), None);
        assert_eq!(all.of("b"), Some(q));
    }
}
