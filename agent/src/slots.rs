//! The A/B slots of one model as a state machine with no I/O: which slot serves, which
//! version is on trial, the last good slot to go back to, the anti-rollback floor. The driver
//! asks it what to do with a new version ([`ModelRecord::admit`]), tells it what happened
//! (installed, committed, rolled back, started up, stopped cleanly) and persists the record
//! (sled, flushed) before it acts on the result. Invariants, checked by a proptest over random
//! event orders: the serving slot always holds a verified version (or nothing before the
//! first); a new version never overwrites the serving slot or the last good one; a commit
//! needs a trial; every rollback returns the trial it ended, for the report; the version floor
//! never goes down, but to a version the serving one's signed manifest allows falling back to
//! (`fallback_to`, an operators' fleet rollback).

use modelcast_proto::desired::TrialThresholds;
use modelcast_proto::manifest::Manifest;
use modelcast_proto::report::Slot;
use serde::{Deserialize, Serialize};

/// The two slots of one model and which one serves.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    /// The serving slot.
    pub active: Option<Slot>,
    /// Slot A's verified manifest.
    pub a: Option<Manifest>,
    /// Slot B's verified manifest.
    pub b: Option<Manifest>,
    /// Highest version ever accepted for this model (anti-rollback).
    pub highest_version: u64,
    /// The active slot is on trial: swapped in, not yet committed.
    #[serde(default)]
    pub trial: Option<Trial>,
    /// SHA-256 of the last version rolled back; it is not installed again.
    #[serde(default)]
    pub failed: Option<String>,
}

/// A version on trial (RAUC's and U-Boot's "try boot", for models).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trial {
    /// The slot on trial (the active one).
    pub slot: Slot,
    /// The last good slot to swap back to.
    pub previous: Slot,
    /// Start-ups of the agent with this trial active and not cleanly stopped.
    pub boots: u32,
    /// The rollout's probation thresholds for this trial, if it set any.
    #[serde(default)]
    pub thresholds: Option<TrialThresholds>,
}

/// What to do with a version the desired state names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Download, verify and stage it into [`ModelRecord::inactive`].
    Install,
    /// It already serves.
    Serving,
    /// It was rolled back before (and reported then): not again.
    Failed,
    /// A trial is running: the last good slot must not be overwritten; try again after it.
    Wait,
    /// Older than (or as old as) what was accepted: a rollback attack or a stale document.
    Rollback {
        /// The floor.
        highest: u64,
    },
}

/// A transition the record refuses (a bug in the caller, never a network input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    /// Staging into the serving slot or the last good one.
    #[error("slot {0} is serving or is the last good slot")]
    Occupied(Slot),
    /// A second trial while one runs.
    #[error("a trial is already running")]
    TrialRunning,
}

impl ModelRecord {
    /// The manifest in `slot`.
    pub fn slot(&self, slot: Slot) -> Option<&Manifest> {
        match slot {
            Slot::A => self.a.as_ref(),
            Slot::B => self.b.as_ref(),
        }
    }

    /// Puts `manifest` into `slot`.
    pub fn set_slot(&mut self, slot: Slot, manifest: Option<Manifest>) {
        match slot {
            Slot::A => self.a = manifest,
            Slot::B => self.b = manifest,
        }
    }

    /// Whether a slot holds `version`.
    pub fn holds(&self, version: u64) -> bool {
        [&self.a, &self.b]
            .into_iter()
            .any(|m| m.as_ref().is_some_and(|m| m.version == version))
    }

    /// The bytes of `slot` are gone (missing or damaged on disk, found when loading): the slot
    /// is emptied. A lost trial slot ends the trial on the last good slot without marking the
    /// version failed (it is about the disk, not the version: it may install again); a lost
    /// last good slot ends the trial as committed (nothing to go back to); a lost serving slot
    /// with no trial leaves nothing serving until the caller finds the other slot loads.
    /// Returns the version that was lost.
    pub fn lose(&mut self, slot: Slot) -> Option<u64> {
        let lost = self.slot(slot).map(|m| m.version)?;
        self.set_slot(slot, None);
        match self.trial {
            Some(t) if t.slot == slot => {
                self.trial = None;
                self.active = Some(t.previous);
            }
            Some(t) if t.previous == slot => self.trial = None,
            _ if self.active == Some(slot) => self.active = None,
            _ => {}
        }
        Some(lost)
    }

    /// The serving manifest.
    pub fn serving(&self) -> Option<&Manifest> {
        self.slot(self.active?)
    }

    /// The slot a new version is staged into.
    pub fn inactive(&self) -> Slot {
        self.active.map_or(Slot::A, Slot::other)
    }

    /// Decides what to do with `manifest`, named by a verified desired state. A version older
    /// than the serving one is refused (a rollback attack) unless the serving version's signed
    /// manifest allows falling back that far (`fallback_to`: an operators' fleet rollback).
    pub fn admit(&self, manifest: &Manifest) -> Admission {
        // The same bytes as a new version (re-published weights, new golden vectors or
        // probation) install as that version: nothing downloads, the file is shared.
        if self
            .serving()
            .is_some_and(|m| m.sha256 == manifest.sha256 && m.version == manifest.version)
        {
            return Admission::Serving;
        }
        if self.failed.as_ref() == Some(&manifest.sha256) {
            return Admission::Failed;
        }
        if self.trial.is_some() {
            return Admission::Wait;
        }
        let serving = self.serving();
        // The newest accepted version again, when no slot holds it any more (its bytes were
        // lost on disk): the floor guards against older versions, not against healing. Or
        // the serving version in another of its signed forms (the director sends the form a
        // deployment's backend runs): the same model, not an older one.
        if manifest.version > self.highest_version
            || (manifest.version == self.highest_version
                && (serving.is_none() || !self.holds(manifest.version)))
            || serving.is_some_and(|s| {
                s.version == manifest.version && s.model_format != manifest.model_format
            })
        {
            return Admission::Install;
        }
        match serving {
            // A fleet rollback, within the window the serving version's operators signed.
            Some(s)
                if manifest.version < s.version
                    && s.fallback_to.is_some_and(|f| manifest.version >= f) =>
            {
                Admission::Install
            }
            _ => Admission::Rollback {
                highest: self.highest_version,
            },
        }
    }

    /// A verified, loaded and checked version now serves from `slot`; `on_trial` keeps the
    /// slot that served before as the one to go back to until [`ModelRecord::commit`].
    pub fn install(
        &mut self,
        slot: Slot,
        manifest: Manifest,
        on_trial: bool,
    ) -> Result<(), SlotError> {
        if self.trial.is_some() {
            return Err(SlotError::TrialRunning);
        }
        if self.active == Some(slot) {
            return Err(SlotError::Occupied(slot));
        }
        // A signed fallback lowers the floor to the version fallen back to: the operators'
        // consent makes it the newest trusted one. Anything else only raises it.
        let fallback = self.serving().is_some_and(|s| manifest.version < s.version);
        self.highest_version = if fallback {
            manifest.version
        } else {
            self.highest_version.max(manifest.version)
        };
        self.set_slot(slot, Some(manifest));
        self.trial = match (on_trial, self.active) {
            (true, Some(previous)) => Some(Trial {
                slot,
                previous,
                boots: 0,
                thresholds: None,
            }),
            _ => None,
        };
        self.active = Some(slot);
        Ok(())
    }

    /// The trial passed probation: the version on trial is the last good one. Returns the
    /// committed version, or `None` when nothing was on trial.
    pub fn commit(&mut self) -> Option<u64> {
        self.trial.take()?;
        self.serving().map(|m| m.version)
    }

    /// Ends the trial by going back to the previous slot; the tried version is remembered
    /// as failed. Returns the trial that ended.
    pub fn roll_back(&mut self) -> Option<Trial> {
        let trial = self.trial.take()?;
        self.failed = self.slot(trial.slot).map(|m| m.sha256.clone());
        self.active = Some(trial.previous);
        Some(trial)
    }

    /// The agent starts with this record: a running trial counts one more start-up; past
    /// `max_boots` it is rolled back (a crash loop). Returns the rollback's reason.
    pub fn start_up(&mut self, max_boots: u32) -> Option<String> {
        let trial = self.trial.as_mut()?;
        trial.boots += 1;
        let boots = trial.boots;
        if boots <= max_boots {
            return None;
        }
        let version = self.serving().map_or(0, |m| m.version);
        self.roll_back();
        Some(format!(
            "rolled back: version {version} was on trial through {boots} start-ups (crash loop)"
        ))
    }

    /// The agent stops cleanly: this start-up does not count as a crash.
    pub fn stop_cleanly(&mut self) {
        if let Some(t) = self.trial.as_mut() {
            t.boots = t.boots.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn version(v: u64) -> Manifest {
        modelcast_proto::verify::fixture::manifest("m", v, &v.to_le_bytes(), 4)
    }

    #[test]
    fn a_trial_commits_or_rolls_back_to_the_last_good_slot() {
        let mut r = ModelRecord::default();
        assert_eq!(r.admit(&version(1)), Admission::Install);
        r.install(r.inactive(), version(1), true).unwrap();
        assert_eq!(r.trial, None, "nothing to go back to: no trial");
        r.install(r.inactive(), version(2), true).unwrap();
        assert_eq!(r.admit(&version(3)), Admission::Wait);
        assert_eq!(r.commit(), Some(2));
        r.install(r.inactive(), version(3), true).unwrap();
        let trial = r.roll_back().unwrap();
        assert_eq!(r.serving().unwrap().version, 2);
        assert_eq!(r.slot(trial.slot).unwrap().version, 3);
        assert_eq!(r.admit(&version(3)), Admission::Failed);
        assert_eq!(r.admit(&version(1)), Admission::Rollback { highest: 3 });
        assert_eq!(r.admit(&version(4)), Admission::Install);
    }

    #[test]
    fn the_same_bytes_as_a_new_version_install_as_that_version() {
        let mut r = ModelRecord::default();
        r.install(Slot::A, version(1), false).unwrap();
        let mut again = version(1);
        again.version = 2;
        assert_eq!(r.admit(&again), Admission::Install);
        r.install(r.inactive(), again.clone(), true).unwrap();
        assert_eq!(r.admit(&again), Admission::Serving);
        assert_eq!(
            r.admit(&version(1)),
            Admission::Wait,
            "v1 stays the last good slot"
        );
    }

    #[test]
    fn the_serving_version_in_another_form_installs_and_an_older_one_does_not() {
        use modelcast_proto::manifest::ModelFormat;
        let mut r = ModelRecord::default();
        r.install(Slot::A, version(2), false).unwrap();
        let mut other_form = modelcast_proto::verify::fixture::manifest("m", 2, b"nnef", 4);
        other_form.model_format = ModelFormat::Nnef;
        assert_eq!(r.admit(&other_form), Admission::Install);
        r.install(r.inactive(), other_form.clone(), false).unwrap();
        assert_eq!(r.admit(&other_form), Admission::Serving);
        assert_eq!(r.admit(&version(2)), Admission::Install, "and back");
        let mut older = version(1);
        older.model_format = ModelFormat::Nnef;
        assert_eq!(r.admit(&older), Admission::Rollback { highest: 2 });
    }

    #[test]
    fn a_version_whose_bytes_were_lost_installs_again_and_nothing_older_does() {
        let mut r = ModelRecord::default();
        r.install(Slot::A, version(1), false).unwrap();
        r.install(Slot::B, version(2), false).unwrap();
        assert_eq!(r.lose(Slot::B), Some(2));
        assert_eq!((r.active, r.serving()), (None, None));
        assert_eq!(r.admit(&version(2)), Admission::Install, "healing");
        assert_eq!(r.admit(&version(1)), Admission::Rollback { highest: 2 });
        // The driver found slot A still loads: it serves while 2 comes back.
        r.active = Some(Slot::A);
        assert_eq!(r.admit(&version(2)), Admission::Install);
        assert_eq!(r.admit(&version(1)), Admission::Serving);

        // A trial whose bytes are lost ends on the last good slot, not marked failed.
        r.install(Slot::B, version(3), true).unwrap();
        assert_eq!(r.lose(Slot::B), Some(3));
        assert_eq!(
            (r.active, r.trial, r.failed.clone()),
            (Some(Slot::A), None, None)
        );
        assert_eq!(r.admit(&version(3)), Admission::Install);
        // The last good slot lost under a trial: the trial stays, with nothing to go back to.
        r.install(Slot::B, version(3), true).unwrap();
        r.lose(Slot::A);
        assert_eq!((r.active, r.trial), (Some(Slot::B), None));
        assert_eq!(r.lose(Slot::A), None, "an empty slot loses nothing");
    }

    #[test]
    fn a_crash_loop_rolls_back_at_the_start_up_past_the_limit() {
        let mut r = ModelRecord::default();
        r.install(Slot::A, version(1), true).unwrap();
        r.install(Slot::B, version(2), true).unwrap();
        assert_eq!(r.start_up(2), None);
        r.stop_cleanly(); // A clean stop does not count.
        assert_eq!(r.start_up(2), None);
        assert_eq!(r.start_up(2), None);
        let reason = r.start_up(2).unwrap();
        assert!(reason.contains("version 2") && reason.contains("3 start-ups"));
        assert_eq!(r.serving().unwrap().version, 1);
    }

    #[test]
    fn an_older_version_installs_only_within_the_signed_fallback_window() {
        let mut r = ModelRecord::default();
        r.install(Slot::A, version(2), false).unwrap();
        let mut v3 = version(3);
        v3.fallback_to = Some(2);
        r.install(Slot::B, v3, false).unwrap();
        assert_eq!(r.admit(&version(1)), Admission::Rollback { highest: 3 });
        assert_eq!(
            r.admit(&version(2)),
            Admission::Install,
            "the operators allowed 3 → 2"
        );
        r.install(Slot::A, version(2), false).unwrap();
        assert_eq!(
            r.highest_version, 2,
            "the floor follows the signed fallback"
        );
        assert_eq!(
            r.admit(&version(1)),
            Admission::Rollback { highest: 2 },
            "2 allows none"
        );
        let mut v3 = version(3);
        v3.fallback_to = Some(2);
        assert_eq!(
            r.admit(&v3),
            Admission::Install,
            "forward again after the fleet rollback"
        );
    }

    #[derive(Debug, Clone)]
    enum Event {
        /// A new version, verified and staged, swapped in (on trial or not).
        Install {
            on_trial: bool,
        },
        /// A version the desired state names again (an older one, or the failed one).
        Offer {
            back: u64,
        },
        Commit,
        RollBack,
        StartUp {
            max_boots: u32,
        },
        CleanStop,
        /// A rejected update: nothing changes.
        Reject,
        /// The bytes of a slot were lost on disk.
        Lose {
            slot: Slot,
        },
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            4 => any::<bool>().prop_map(|on_trial| Event::Install { on_trial }),
            2 => (0u64..4).prop_map(|back| Event::Offer { back }),
            2 => Just(Event::Commit),
            2 => Just(Event::RollBack),
            2 => (0u32..3).prop_map(|max_boots| Event::StartUp { max_boots }),
            1 => Just(Event::CleanStop),
            1 => Just(Event::Reject),
            1 => prop_oneof![Just(Slot::A), Just(Slot::B)].prop_map(|slot| Event::Lose { slot }),
        ]
    }

    proptest! {
        #[test]
        fn slot_invariants_hold_in_any_event_order(
            events in proptest::collection::vec(event(), 1..60)
        ) {
            let mut r = ModelRecord::default();
            let mut next = 1u64;
            // The versions that were committed or installed without a trial, in order.
            let mut last_good: Option<u64> = None;
            let (mut rollbacks, mut reported) = (0, 0);
            // The serving slot's bytes were lost and nothing installed since.
            let mut emptied = false;
            for e in events {
                let floor = r.highest_version;
                let before = r.clone();
                match e {
                    Event::Install { on_trial } => {
                        let m = version(next);
                        if r.admit(&m) == Admission::Install {
                            let slot = r.inactive();
                            // Never the serving slot, never the last good one.
                            prop_assert_ne!(Some(slot), r.active);
                            r.install(slot, m, on_trial).unwrap();
                            next += 1;
                            if r.trial.is_none() {
                                last_good = r.serving().map(|m| m.version);
                            }
                        } else {
                            prop_assert!(r.trial.is_some());
                            prop_assert_eq!(r.install(r.inactive(), m, on_trial),
                                Err(SlotError::TrialRunning));
                        }
                    }
                    Event::Offer { back } => {
                        let v = next.saturating_sub(1 + back);
                        if v > 0 {
                            let m = version(v);
                            match r.admit(&m) {
                                Admission::Install => prop_assert!(v > r.highest_version
                                    || (v == r.highest_version
                                        && (r.serving().is_none() || !r.holds(v)))),
                                Admission::Serving => prop_assert_eq!(
                                    r.serving().map(|s| s.version), Some(v)),
                                _ => {}
                            }
                        }
                    }
                    Event::Commit => {
                        let had_trial = r.trial.is_some();
                        let committed = r.commit();
                        prop_assert_eq!(committed.is_some(), had_trial);
                        if committed.is_some() {
                            last_good = committed;
                        }
                    }
                    Event::RollBack => {
                        if let Some(trial) = r.roll_back() {
                            rollbacks += 1;
                            reported += 1;
                            prop_assert_eq!(r.active, Some(trial.previous));
                            prop_assert_eq!(r.serving().map(|m| m.version), last_good);
                        }
                    }
                    Event::StartUp { max_boots } => {
                        let on_trial = r.trial.is_some();
                        if let Some(reason) = r.start_up(max_boots) {
                            prop_assert!(on_trial);
                            prop_assert!(reason.contains("crash loop"));
                            rollbacks += 1;
                            reported += 1;
                            prop_assert_eq!(r.serving().map(|m| m.version), last_good);
                        }
                    }
                    Event::CleanStop => r.stop_cleanly(),
                    Event::Reject => prop_assert_eq!(&r, &before),
                    Event::Lose { slot } => {
                        let trial = r.trial;
                        let lost = r.lose(slot);
                        prop_assert_eq!(lost, before.slot(slot).map(|m| m.version));
                        prop_assert!(r.slot(slot).is_none());
                        prop_assert_eq!(&r.failed, &before.failed, "the disk, not the version");
                        match trial {
                            Some(t) if lost.is_some() && t.previous == slot => {
                                last_good = r.serving().map(|m| m.version);
                            }
                            None if lost.is_some() && before.active == Some(slot) => {
                                last_good = None;
                                emptied = true;
                            }
                            _ => {}
                        }
                        if lost.is_some() {
                            // The lost version may install again; nothing older may.
                            let top = version(r.highest_version);
                            let failed = r.failed.as_ref() == Some(&top.sha256);
                            if !r.holds(r.highest_version) && r.trial.is_none() && !failed {
                                prop_assert_eq!(r.admit(&top), Admission::Install);
                            }
                        }
                    }
                }
                if r.active.is_some() {
                    emptied = false;
                }
                // The serving slot holds a verified version once anything was installed,
                // unless its bytes were lost since.
                prop_assert_eq!(r.active.is_some(), next > 1 && !emptied);
                if let Some(active) = r.active {
                    prop_assert!(r.slot(active).is_some());
                }
                if let Some(t) = r.trial {
                    prop_assert_eq!(Some(t.slot), r.active);
                    prop_assert_ne!(t.slot, t.previous);
                    prop_assert!(r.slot(t.previous).is_some());
                }
                prop_assert!(r.highest_version >= floor);
            }
            prop_assert_eq!(rollbacks, reported);
        }
    }
}
