//! Drift intake: the detectors ([`crate::drift`]) rebuilt at start, their alerts stored and
//! cleared, and running rollouts told of an alerting device.

use tracing::{info, warn};

use crate::db::DbError;
use crate::drift::{Alert, Change};
use crate::rollout::{Effect, Rollout};
use crate::unix_now;

use super::Fleet;

/// How much stored telemetry rebuilds the drift detectors at start-up.
const DRIFT_REPLAY_MS: i64 = 3600 * 1000;

impl Fleet {
    /// Rebuilds the drift detectors from the stored alerts and the last hour of telemetry (a
    /// restarted server goes on from there; alerts it had not stored yet are raised). The
    /// points are read a slice at a time ([`crate::telemetry::slices`]), so memory stays
    /// bounded with a large fleet.
    pub(super) async fn replay_drift(&self) -> Result<(), DbError> {
        let alerts = self.db.alerts().await?;
        {
            let mut drift = self.drift.lock().expect("drift lock");
            for a in &alerts {
                drift.restore(a);
            }
        }
        let to = crate::unix_now_ms();
        let mut names: Vec<String> = self
            .db
            .models()
            .await?
            .into_iter()
            .map(|m| m.manifest.name)
            .collect();
        names.dedup();
        let mut replayed = 0;
        for name in &names {
            for (from, until) in crate::telemetry::slices(to - DRIFT_REPLAY_MS, to) {
                let mut points = self.db.model_telemetry(name, from, until).await?;
                points.sort_by_key(|p| p.to_ms);
                replayed += points.len();
                let changes: Vec<Change> = {
                    let mut drift = self.drift.lock().expect("drift lock");
                    points.iter().flat_map(|p| drift.observe(p)).collect()
                };
                self.apply_drift(changes).await;
            }
        }
        info!(
            points = replayed,
            alerts = alerts.iter().filter(|a| a.active()).count(),
            "drift detectors rebuilt"
        );
        Ok(())
    }

    /// Stores raised and cleared alerts, and tells the rollouts of the versions concerned.
    pub(super) async fn apply_drift(&self, changes: Vec<Change>) {
        for change in changes {
            if let Err(e) = self.apply_drift_change(change).await {
                warn!(error = %e, "recording an alert failed");
            }
        }
    }

    async fn apply_drift_change(&self, change: Change) -> Result<(), DbError> {
        match change {
            Change::Raised(mut alert) => {
                alert.id = self.db.next_id().await?;
                self.db.put_alert(&alert).await?;
                warn!(
                    device = %alert.device,
                    model = %alert.model,
                    version = alert.version,
                    kind = %alert.kind,
                    test = %alert.test,
                    value = alert.value,
                    "alert raised: {}",
                    alert.message
                );
                self.alert_rollouts(&alert).await;
            }
            Change::Cleared {
                device,
                model,
                version,
                kind,
                at_ms,
            } => {
                for mut alert in self.db.alerts().await? {
                    if alert.active()
                        && alert.device == device
                        && alert.model == model
                        && alert.version == version
                        && alert.kind == kind
                    {
                        alert.cleared_ms = Some(at_ms);
                        self.db.put_alert(&alert).await?;
                        info!(%device, %model, version, %kind, "alert cleared");
                    }
                }
            }
        }
        Ok(())
    }

    /// Fails the alerting device in every running rollout of the alert's version that aborts
    /// on alerts.
    async fn alert_rollouts(&self, alert: &Alert) {
        let now = unix_now();
        let reason = format!("alert: {}: {}", alert.kind, alert.message);
        let _persisting = self.persisting.lock().await;
        let changed: Vec<(Rollout, Vec<Effect>)> = {
            let mut all = self.rollouts.lock().expect("rollouts lock");
            all.values_mut()
                .filter(|r| r.spec.model == alert.model && r.spec.version == alert.version)
                .filter_map(|r| {
                    let (changed, effects) = r.handle_alert(now, &alert.device, &reason);
                    changed.then(|| (r.clone(), effects))
                })
                .collect()
        };
        for (rollout, effects) in changed {
            info!(rollout = rollout.id, device = %alert.device, "rollout counts the alerting device as failed");
            if let Err(e) = self.commit_rollout(&rollout, effects).await {
                warn!(rollout = rollout.id, error = %e, "recording a rollout failed");
            }
        }
    }
}
