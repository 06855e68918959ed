//! Rollout driving: the planner ([`crate::rollout`]) gets operators' actions, device reports
//! and the clock; every change is persisted (flushed) before its effects are carried out.

use tracing::{info, warn};

use crate::db::{DbError, Deployment};
use crate::group::Selector;
use crate::rollout::{Effect, Rollout, RolloutSpec, RolloutState};
use crate::unix_now;

use super::Fleet;

/// Why a rollout request failed.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// The request is invalid.
    #[error("{0}")]
    Invalid(String),
    /// No such rollout or model version.
    #[error("{0}")]
    NotFound(String),
    /// The store failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

/// What an operator does to a running rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutAction {
    /// Hold the next wave.
    Pause,
    /// Go on.
    Resume,
    /// Stop; with auto-rollback, send moved devices back.
    Abort,
    /// Stop; moved devices keep the new version.
    Cancel,
}

impl Fleet {
    /// Every rollout as stored, oldest first.
    pub fn rollouts(&self) -> Vec<Rollout> {
        let all = self.stored_rollouts.lock().expect("rollouts lock");
        all.values().cloned().collect()
    }

    /// Rollout `id` as stored.
    pub fn rollout(&self, id: u64) -> Option<Rollout> {
        self.stored_rollouts
            .lock()
            .expect("rollouts lock")
            .get(&id)
            .cloned()
    }

    /// Rollout `id` as the planner left it.
    fn working(&self, id: u64) -> Option<Rollout> {
        self.rollouts
            .lock()
            .expect("rollouts lock")
            .get(&id)
            .cloned()
    }

    /// Starts rolling `spec` out: the group as it is now, in waves; the canary moves at once.
    pub async fn start_rollout(
        &self,
        spec: RolloutSpec,
        by: &str,
    ) -> Result<Rollout, RolloutError> {
        spec.validate().map_err(RolloutError::Invalid)?;
        let selector = Selector::parse(&spec.group).map_err(|e| RolloutError::Invalid(e.0))?;
        if self.db.model(&spec.model, spec.version).await?.is_none() {
            return Err(RolloutError::NotFound(format!(
                "model {} version {} is not published",
                spec.model, spec.version
            )));
        }
        let mut members = Vec::new();
        for d in self.db.devices().await? {
            // A quarantined device's reports are dropped: it could never pass a wave.
            if selector.matches(&d.labels) && !self.is_quarantined(&d.id) {
                let now = self
                    .wanted(&d)
                    .await?
                    .into_iter()
                    .find(|(m, _)| m.name == spec.model)
                    .map(|(m, _)| m.version);
                members.push((d.id, now));
            }
        }
        if members.is_empty() {
            return Err(RolloutError::Invalid(format!(
                "no device matches group {:?}",
                spec.group
            )));
        }
        let _persisting = self.persisting.lock().await;
        let id = self.db.next_id().await?;
        let (rollout, effects) = Rollout::start(id, spec, by, unix_now(), members);
        self.db
            .append_audit(
                by,
                "rollout.start",
                serde_json::json!({
                    "rollout": id,
                    "model": rollout.spec.model,
                    "version": rollout.spec.version,
                    "group": rollout.spec.group,
                    "waves": rollout.spec.waves,
                    "devices": rollout.members.len(),
                    "sampling": rollout.spec.sampling,
                    "download": rollout.spec.download,
                }),
                unix_now(),
            )
            .await?;
        info!(
            rollout = id,
            model = %rollout.spec.model,
            version = rollout.spec.version,
            group = %rollout.spec.group,
            devices = rollout.members.len(),
            waves = ?rollout.wave_sizes,
            %by,
            "rollout started"
        );
        self.commit_rollout(&rollout, effects).await?;
        Ok(rollout)
    }

    /// An operator's action on rollout `id`.
    pub async fn act_on_rollout(
        &self,
        id: u64,
        action: RolloutAction,
        by: &str,
    ) -> Result<Rollout, RolloutError> {
        let now = unix_now();
        let _persisting = self.persisting.lock().await;
        let (rollout, effects) = {
            let mut all = self.rollouts.lock().expect("rollouts lock");
            let r = all
                .get_mut(&id)
                .ok_or_else(|| RolloutError::NotFound(format!("no rollout {id}")))?;
            let effects = match action {
                RolloutAction::Pause => r.pause(now),
                RolloutAction::Resume => r.resume(now),
                RolloutAction::Abort => r.abort(now, format!("aborted by {by}")),
                RolloutAction::Cancel => r.cancel(now),
            };
            (r.clone(), effects)
        };
        info!(rollout = id, ?action, %by, state = ?rollout.state, "rollout changed by an operator");
        let name = serde_json::to_value(action).unwrap_or_default();
        self.db
            .append_audit(
                by,
                &format!("rollout.{}", name.as_str().unwrap_or("action")),
                serde_json::json!({ "rollout": id, "state": rollout.state }),
                now,
            )
            .await?;
        self.commit_rollout(&rollout, effects).await?;
        Ok(rollout)
    }

    /// Feeds a device's report to the rollouts it is part of. A decision (a wave, an abort,
    /// the end) is persisted and flushed before it is carried out; a device's new state
    /// alone is written by the clock within a second (after a crash, the devices' retained
    /// reports, delivered again, restore it).
    pub(super) async fn feed_rollouts(
        &self,
        device: &str,
        report: &modelcast_proto::report::DeviceReport,
    ) {
        let now = unix_now();
        let _persisting = self.persisting.lock().await;
        let changed: Vec<(Rollout, Vec<Effect>)> = {
            let mut all = self.rollouts.lock().expect("rollouts lock");
            let mut dirty = self.dirty_rollouts.lock().expect("dirty lock");
            all.values_mut()
                .filter(|r| !matches!(r.state, RolloutState::Completed | RolloutState::Cancelled))
                .filter_map(|r| {
                    let before = r.member(device)?.state.clone();
                    let effects = r.handle_report(now, device, report);
                    if !effects.is_empty() {
                        return Some((r.clone(), effects));
                    }
                    if r.member(device)?.state != before {
                        dirty.insert(r.id);
                    }
                    None
                })
                .collect()
        };
        for (rollout, effects) in changed {
            if let Err(e) = self.commit_rollout(&rollout, effects).await {
                warn!(rollout = rollout.id, error = %e, "recording a rollout failed");
            }
        }
    }

    /// The rollouts' clock: wave timeouts, and writing device states that changed.
    pub(super) async fn tick_rollouts(&self) {
        let now = unix_now();
        let _persisting = self.persisting.lock().await;
        let dirty = std::mem::take(&mut *self.dirty_rollouts.lock().expect("dirty lock"));
        if !dirty.is_empty() {
            for id in dirty {
                let rollout = self.working(id);
                if let Some(r) = rollout {
                    match self.db.put_rollout(&r).await {
                        Ok(()) => {
                            self.stored_rollouts
                                .lock()
                                .expect("rollouts lock")
                                .insert(id, r);
                        }
                        Err(e) => warn!(rollout = id, error = %e, "recording a rollout failed"),
                    }
                }
            }
            if let Err(e) = self.db.flush().await {
                warn!(error = %e, "flushing rollouts failed");
            }
        }
        let due: Vec<(Rollout, Vec<Effect>)> = {
            let mut all = self.rollouts.lock().expect("rollouts lock");
            all.values_mut()
                .filter(|r| r.next_timeout().is_some_and(|t| t <= now))
                .map(|r| {
                    let effects = r.handle_timeout(now);
                    (r.clone(), effects)
                })
                .collect()
        };
        for (rollout, effects) in due {
            if let Err(e) = self.commit_rollout(&rollout, effects).await {
                warn!(rollout = rollout.id, error = %e, "recording a rollout failed");
            }
        }
    }

    /// Persists `rollout` (flushed), then carries out its effects. What a rollout's end
    /// leaves (its audit entry, the group's deployment) is written before the rollout is
    /// recorded as ended, and the operators see it ended only then: a crash in between ends
    /// it again after the restart rather than losing them.
    pub(super) async fn commit_rollout(
        &self,
        rollout: &Rollout,
        effects: Vec<Effect>,
    ) -> Result<(), RolloutError> {
        let mut retarget = Vec::new();
        for effect in effects {
            match effect {
                Effect::Retarget(devices) => retarget.extend(devices),
                Effect::Ended(state) => {
                    info!(rollout = rollout.id, ?state, "rollout ended");
                    self.db
                        .append_audit(
                            &format!("rollout {}", rollout.id),
                            "rollout.end",
                            serde_json::json!({ "rollout": rollout.id, "state": state }),
                            unix_now(),
                        )
                        .await?;
                    if state == RolloutState::Completed {
                        // The group keeps the version: devices that join it later get it too.
                        let s = &rollout.spec;
                        self.db
                            .add_deployment(Deployment {
                                seq: 0,
                                model: s.model.clone(),
                                version: s.version,
                                group: s.group.clone(),
                                by: format!("rollout {}", rollout.id),
                                at: unix_now(),
                                probation: s.probation,
                                sampling: s.sampling,
                                download: s.download.clone(),
                                backend: s.backend,
                                shadow: s.shadow,
                                canary: s.canary.clone(),
                            })
                            .await?;
                    }
                }
            }
        }
        self.db.put_rollout(rollout).await?;
        self.db.flush().await?;
        self.rollouts
            .lock()
            .expect("rollouts lock")
            .insert(rollout.id, rollout.clone());
        self.stored_rollouts
            .lock()
            .expect("rollouts lock")
            .insert(rollout.id, rollout.clone());
        for device in retarget {
            if let Err(e) = self.publish_desired(&device).await {
                warn!(rollout = rollout.id, %device, error = %e, "publishing desired state failed");
            }
        }
        Ok(())
    }
}
