//! Tests of the update machine: scripted scenarios, then a proptest over random event orders
//! with crashes that checks the invariants listed in [`super`].

use std::collections::{BTreeMap, BTreeSet};

use super::*;
use modelcast_proto::desired::WindowMode;
use proptest::prelude::*;

const M: &str = "m";

fn bytes(version: u64) -> Vec<u8> {
    (0..10)
        .map(|i| (version as u8).wrapping_mul(31) ^ i)
        .collect()
}

/// Version `version`; every third one allows a fleet rollback by two versions.
fn manifest(version: u64) -> Manifest {
    let mut m = modelcast_proto::verify::fixture::manifest(M, version, &bytes(version), 4);
    if version.is_multiple_of(3) {
        m.fallback_to = Some(version - 2);
    }
    m
}

fn policy() -> ProbationPolicy {
    ProbationPolicy {
        requests: 5,
        seconds: 10,
        max_trial_boots: 2,
        ..ProbationPolicy::default()
    }
}

fn settings() -> Settings {
    Settings {
        probation: policy(),
        window: 2,
        chunk_timeout: Duration::from_secs(1),
        stall_after: Duration::from_secs(5),
        first_chunk_patience: Duration::ZERO,
    }
}

/// A driver with a simulated disk and engine that carries out every action, answers what
/// asks for an answer, and checks the invariants as it goes.
struct Sim {
    m: Updater,
    now: Instant,
    online: bool,
    /// The store: records and downloads, as flushed.
    disk: BTreeMap<String, ModelRecord>,
    pending: BTreeMap<String, Manifest>,
    chunks: BTreeMap<String, BTreeSet<u32>>,
    /// Artifacts that passed staging (verified, loaded, checked).
    verified: BTreeSet<String>,
    staging: Vec<(Manifest, Slot)>,
    requested: BTreeSet<(String, u32)>,
    /// The engine: what serves, and what is kept to swap back to.
    serving: Option<(Slot, u64)>,
    kept: Option<(Slot, u64)>,
    /// The running trial: when it started, requests it answered, and the requests and
    /// time after which it may be judged.
    trial: Option<(Instant, u32, u32, Duration)>,
    /// Every error reported: model, version, reason and its kind.
    errors: Vec<(Option<String>, Option<u64>, String, ErrorKind)>,
    commits: u32,
    rollbacks: u32,
    /// The next write to the store fails.
    break_write: bool,
    floor: u64,
    /// How far the serving version allows the floor to drop (its signed `fallback_to`).
    fallback_floor: Option<u64>,
    /// The broker's retained desired state: delivered again at every (re)connection.
    retained: Option<Wanted>,
    /// Back-offs of downloads given up over damaged chunks, as the store keeps them.
    backoffs: BTreeMap<String, (String, u32, Instant)>,
    /// The link is metered (the versions desired here do not allow it).
    metered: bool,
}

impl Sim {
    fn new() -> Self {
        let now = Instant::now();
        let mut sim = Sim {
            m: Updater::new(settings(), Vec::new()),
            now,
            online: true,
            disk: BTreeMap::new(),
            pending: BTreeMap::new(),
            chunks: BTreeMap::new(),
            verified: BTreeSet::new(),
            staging: Vec::new(),
            requested: BTreeSet::new(),
            serving: None,
            kept: None,
            trial: None,
            errors: Vec::new(),
            commits: 0,
            rollbacks: 0,
            break_write: false,
            floor: 0,
            fallback_floor: None,
            retained: None,
            backoffs: BTreeMap::new(),
            metered: false,
        };
        sim.m.handle_connected();
        sim
    }

    fn write_ok(&mut self) -> bool {
        !std::mem::take(&mut self.break_write)
    }

    /// What the driver's loop does after an event: the clock, then every action, until
    /// the machine wants nothing before a later time.
    fn run(&mut self) {
        for _ in 0..10 {
            self.m.handle_timeout(self.now);
            self.drain();
            if self.m.next_wake(self.now) > self.now {
                break;
            }
        }
        self.check();
    }

    fn drain(&mut self) {
        let mut unreported: Option<String> = None;
        while let Some(action) = self.m.poll_action() {
            match action {
                Action::PrepareDownload(manifest) => {
                    let have: Vec<bool> = (0..manifest.chunk_count())
                        .map(|i| {
                            self.chunks
                                .get(&manifest.sha256)
                                .is_some_and(|c| c.contains(&i))
                        })
                        .collect();
                    if self.write_ok() {
                        self.pending.insert(manifest.name.clone(), manifest.clone());
                        self.m
                            .download_ready(&manifest.name, &manifest.sha256, have, 0);
                    } else {
                        self.m.download_failed(
                            &manifest.name,
                            &manifest.sha256,
                            Failure::new(ErrorKind::NoSpace, "no space"),
                        );
                    }
                }
                Action::RequestChunks {
                    artifact,
                    chunks,
                    again,
                    ..
                } => {
                    assert!(self.online, "chunk request while the link is down");
                    let allowed = self.retained.as_ref().is_some_and(|w| w.download.metered);
                    assert!(
                        !self.metered || allowed,
                        "chunk request over a metered link"
                    );
                    for c in chunks.into_iter().chain(again) {
                        self.requested.insert((artifact.clone(), c));
                    }
                }
                Action::Stage { manifest, slot } => {
                    let record = &self.disk.get(M).cloned().unwrap_or_default();
                    assert_ne!(record.active, Some(slot), "staging into the serving slot");
                    assert_ne!(
                        record.trial.map(|t| t.previous),
                        Some(slot),
                        "staging into the last good slot"
                    );
                    self.staging.push((manifest, slot));
                }
                Action::Activate {
                    name,
                    record,
                    on_trial,
                } => {
                    let new = record.serving().expect("activates a version").clone();
                    assert!(self.verified.contains(&new.sha256), "activating unverified");
                    if !self.write_ok() {
                        self.m.activation_failed(&name, "disk".into());
                        continue;
                    }
                    self.disk.insert(name.clone(), record.clone());
                    self.pending.remove(&name);
                    let replaced = self.serving.replace((record.active.unwrap(), new.version));
                    self.kept = if on_trial { replaced } else { None };
                    self.trial = on_trial.then(|| self.judged_after(&record));
                    self.m.activated(&name, self.now);
                }
                Action::Commit { name, record } => {
                    let (started, requests, need, time) =
                        self.trial.take().expect("commit without trial");
                    assert!(
                        requests >= need || self.now >= started + time,
                        "committed after {requests} requests and {:?}",
                        self.now - started
                    );
                    assert!(record.trial.is_none());
                    self.disk.insert(name, record);
                    self.kept = None;
                    self.commits += 1;
                }
                Action::RollBack { name, record } => {
                    self.trial = None;
                    self.serving = self.kept.take();
                    assert!(self.serving.is_some(), "nothing to go back to");
                    self.disk.insert(name.clone(), record);
                    self.rollbacks += 1;
                    unreported = Some(name);
                }
                Action::Abandon { name } => {
                    self.pending.remove(&name);
                }
                Action::Persist { name, record } => {
                    self.disk.insert(name, record);
                }
                Action::CollectGarbage | Action::Phase { .. } | Action::Ended { .. } => {}
                Action::Backoff { name, backoff } => match backoff {
                    Some((sha, attempts, wait)) => {
                        let until = self.now + wait;
                        self.backoffs.insert(name, (sha, attempts, until));
                    }
                    None => {
                        self.backoffs.remove(&name);
                    }
                },
                Action::Error {
                    model,
                    version,
                    kind,
                    reason,
                } => {
                    if model.is_some() && model == unreported {
                        assert!(
                            matches!(kind, ErrorKind::RolledBack | ErrorKind::CrashLoop),
                            "{kind:?}: {reason}"
                        );
                        unreported = None;
                    }
                    self.errors.push((model, version, reason, kind));
                }
                Action::Report => {}
            }
        }
        assert_eq!(unreported, None, "a rollback without its report");
    }

    fn check(&mut self) {
        let disk = self.disk.get(M).cloned().unwrap_or_default();
        let held = self.m.record(M).cloned().unwrap_or_default();
        assert_eq!(
            held, disk,
            "the machine acts on a record the store does not hold"
        );
        if let Some(serving) = disk.serving() {
            assert!(
                self.verified.contains(&serving.sha256),
                "serving unverified"
            );
            assert_eq!(self.serving, Some((disk.active.unwrap(), serving.version)));
        } else {
            assert_eq!(self.serving, None);
        }
        if disk.highest_version < self.floor {
            let allowed = self
                .fallback_floor
                .expect("version floor went down unsigned");
            assert!(
                disk.highest_version >= allowed,
                "fell back past the signed window"
            );
        }
        self.floor = disk.highest_version;
        self.fallback_floor = disk.serving().and_then(|s| s.fallback_to);
    }

    fn desire(&mut self, version: u64) {
        self.desire_with(version, None);
    }

    /// The server publishes a desired state (retained) and the device receives it.
    fn desire_with(&mut self, version: u64, thresholds: Option<TrialThresholds>) {
        let wanted = Wanted {
            manifest: manifest(version),
            thresholds,
            download: Default::default(),
        };
        self.retained = Some(wanted.clone());
        self.m.handle_desired(&[wanted]);
        self.run();
    }

    /// The server publishes `version` with a download policy.
    fn desire_policy(&mut self, version: u64, download: DownloadPolicy) {
        let wanted = Wanted {
            manifest: manifest(version),
            thresholds: None,
            download,
        };
        self.retained = Some(wanted.clone());
        self.m.handle_desired(&[wanted]);
        self.run();
    }

    /// The update `M` reports.
    fn update(&self) -> UpdateProgress {
        self.m.model_states()[M].update.clone().expect("an update")
    }

    /// Delivers the `pick`th outstanding requested chunk, `corrupt` or not.
    fn deliver(&mut self, pick: usize, corrupt: bool) {
        let Some((artifact, index)) = self.requested.iter().nth(pick).cloned() else {
            return;
        };
        self.requested.remove(&(artifact.clone(), index));
        let Some(version) = (1..=8).find(|v| manifest(*v).sha256 == artifact) else {
            return;
        };
        let all = bytes(version);
        let start = index as usize * 4;
        let mut data = all[start..(start + 4).min(all.len())].to_vec();
        if corrupt {
            data[0] ^= 0xff;
        }
        if let ChunkFate::Store(name) = self.m.handle_chunk(&artifact, index, &data) {
            if self.write_ok() {
                self.chunks.entry(artifact).or_default().insert(index);
                self.m.chunk_stored(&name, index);
            } else {
                self.m
                    .chunk_write_failed(&name, Failure::new(ErrorKind::NoSpace, "disk full"));
            }
        }
        self.run();
    }

    fn deliver_all(&mut self) {
        for _ in 0..50 {
            if self.requested.is_empty() {
                break;
            }
            self.deliver(0, false);
        }
    }

    fn finish_staging(&mut self, ok: bool) {
        if self.staging.is_empty() {
            return;
        }
        let (manifest, _) = self.staging.remove(0);
        if ok {
            self.verified.insert(manifest.sha256.clone());
        }
        let result = if ok {
            Ok(())
        } else {
            Err(Failure::new(
                ErrorKind::GoldenMismatch,
                "golden vector 0 differs",
            ))
        };
        self.m.staged(&manifest.name, &manifest.sha256, result);
        self.run();
    }

    fn outcome(&mut self, ok: bool, slow: bool) {
        let Some((slot, _)) = self.serving else {
            return;
        };
        let latency = Duration::from_millis(if slow { 50 } else { 2 });
        if let Some((_, n, _, _)) = self.trial.as_mut() {
            *n += 1;
        }
        self.m.handle_outcome(M, slot, ok, latency);
        self.run();
    }

    fn advance(&mut self, ms: u64) {
        self.now += Duration::from_millis(ms);
        self.run();
    }

    fn set_online(&mut self, online: bool) {
        self.online = online;
        if online {
            self.m.handle_connected();
            if let Some(wanted) = self.retained.clone() {
                self.m.handle_desired(&[wanted]);
            }
        } else {
            self.m.handle_disconnected();
            self.requested.clear();
        }
        self.run();
    }

    /// The process dies (after a clean stop, when `clean`) and starts again from the
    /// store, as `recovery::restore` does.
    fn restart(&mut self, clean: bool) {
        if clean {
            self.m.stop();
            self.run();
        }
        let mut records = Vec::new();
        let mut rolled_back = None;
        let mut trial = false;
        if let Some(mut record) = self.disk.get(M).cloned() {
            if record.trial.is_some() {
                let version = record.serving().map_or(0, |v| v.version);
                if let Some(reason) = record.start_up(policy().max_trial_boots) {
                    rolled_back = Some((version, reason));
                }
                self.disk.insert(M.into(), record.clone());
            }
            trial = record.trial.is_some();
            self.serving = record
                .serving()
                .map(|v| (record.active.unwrap(), v.version));
            self.kept = record
                .trial
                .and_then(|t| record.slot(t.previous).map(|v| (t.previous, v.version)));
            records.push((M.to_string(), record, self.serving.is_some()));
        }
        let mut m = Updater::new(settings(), records);
        m.set_metered(self.metered);
        for (name, (sha, attempts, until)) in &self.backoffs {
            m.restore_backoff(name, sha.clone(), *attempts, *until);
        }
        if let Some((version, reason)) = rolled_back {
            m.report_rollback(M, version, reason);
        }
        self.trial = None;
        if trial {
            m.resume_trial(M, self.now);
            self.trial = Some(self.judged_after(&self.disk[M]));
        }
        self.m = m;
        self.staging.clear();
        self.requested.clear();
        self.online = false;
        if let Some(manifest) = self.pending.get(M).cloned() {
            let have = (0..manifest.chunk_count())
                .map(|i| {
                    self.chunks
                        .get(&manifest.sha256)
                        .is_some_and(|c| c.contains(&i))
                })
                .collect();
            self.m.resume_download(manifest, have);
        }
        self.run();
    }

    /// A trial of `record` starting now: the requests and time it needs before a verdict.
    fn judged_after(&self, record: &ModelRecord) -> (Instant, u32, u32, Duration) {
        let t = record.trial.and_then(|t| t.thresholds).unwrap_or_default();
        let need = t.requests.unwrap_or(policy().requests);
        let time = Duration::from_secs(t.seconds.unwrap_or(policy().seconds));
        (self.now, 0, need, time)
    }

    /// Version `version` desired, fetched and staged successfully.
    fn install(&mut self, version: u64) {
        self.desire(version);
        self.deliver_all();
        self.finish_staging(true);
    }

    fn serving_version(&self) -> Option<u64> {
        self.serving.map(|(_, v)| v)
    }
}

#[test]
fn first_version_installs_without_trial_then_the_next_one_commits() {
    let mut sim = Sim::new();
    sim.install(1);
    assert_eq!(sim.serving_version(), Some(1));
    assert_eq!(sim.trial, None, "nothing to go back to: no trial");

    sim.install(2);
    assert_eq!(sim.serving_version(), Some(2));
    assert!(sim.trial.is_some());
    for _ in 0..5 {
        sim.outcome(true, false);
    }
    assert_eq!(sim.commits, 1);
    assert_eq!(sim.disk[M].trial, None);
}

#[test]
fn a_failing_trial_rolls_back_and_reports_and_is_not_retried() {
    let mut sim = Sim::new();
    sim.install(1);
    sim.install(2);
    sim.outcome(false, false);
    assert_eq!(sim.rollbacks, 1);
    assert_eq!(sim.serving_version(), Some(1));
    let (_, version, reason, kind) = sim.errors.last().unwrap();
    assert_eq!(*version, Some(2));
    assert_eq!(*kind, ErrorKind::RolledBack);
    assert!(reason.starts_with("rolled back to version 1"), "{reason}");
    sim.desire(2);
    assert!(
        sim.requested.is_empty(),
        "a rolled-back version is not fetched again"
    );
}

#[test]
fn a_download_given_up_over_damaged_chunks_is_tried_again_after_a_back_off() {
    let mut sim = Sim::new();
    sim.install(1);
    sim.desire(2);
    let sha = manifest(2).sha256;
    let damaged: Vec<u8> = bytes(2)[..4].iter().map(|b| b ^ 0xff).collect();
    for round in 1..=2u32 {
        // Forged copies of one chunk: the download is given up, the version not refused.
        for _ in 0..MAX_BAD_CHUNKS {
            sim.m.handle_chunk(&sha, 0, &damaged);
        }
        sim.run();
        let wait = RETRY_AFTER.as_secs() * u64::from(round);
        let (_, version, reason, kind) = sim.errors.last().unwrap().clone();
        assert_eq!(version, Some(2));
        // Not a verdict on the version: a rollout does not count it as failed.
        assert_eq!(kind, ErrorKind::Chunk);
        assert!(kind.is_transient());
        assert!(
            reason.ends_with(&format!("trying again in {wait} s")),
            "{reason}"
        );
        assert_eq!(sim.serving_version(), Some(1));
        assert_eq!(sim.backoffs[M].1, round, "kept in the store");
        // The desired state again (a reconnect, or a restart: the back-off is kept in the
        // store) does not restart it before the back-off.
        sim.requested.clear();
        if round == 2 {
            sim.advance(1000);
            sim.restart(true);
            sim.set_online(true); // The retained desired state names v2 again.
            sim.advance(wait * 1000 - 1100);
        } else {
            sim.set_online(false);
            sim.set_online(true);
            sim.advance(wait * 1000 - 100);
        }
        assert!(
            sim.requested.is_empty(),
            "round {round}: asked before the back-off"
        );
        sim.advance(200);
        assert!(!sim.requested.is_empty(), "round {round}: not tried again");
    }
    // The genuine chunks install it; the back-off is forgotten.
    sim.deliver_all();
    sim.finish_staging(true);
    assert_eq!(sim.serving_version(), Some(2));
    assert!(sim.backoffs.is_empty());
}

#[test]
fn a_rejected_staging_keeps_the_old_model_and_a_new_version_waits_for_the_trial() {
    let mut sim = Sim::new();
    sim.install(1);
    sim.desire(2);
    sim.deliver_all();
    sim.finish_staging(false);
    assert_eq!(sim.serving_version(), Some(1));
    assert!(sim.errors.last().unwrap().2.contains("golden vector"));
    assert_eq!(sim.errors.last().unwrap().3, ErrorKind::GoldenMismatch);
    assert!(
        sim.pending.is_empty(),
        "the abandoned download is forgotten"
    );

    sim.install(3);
    assert!(sim.trial.is_some());
    sim.desire(4); // Deferred: the last good slot must not be overwritten.
    assert!(sim.requested.is_empty());
    sim.advance(10_000); // The trial's time is up: committed, then 4 starts.
    assert_eq!(sim.commits, 1);
    assert!(!sim.requested.is_empty());
    sim.deliver_all();
    sim.finish_staging(true);
    assert_eq!(sim.serving_version(), Some(4));
}

#[test]
fn the_desired_state_going_back_to_the_serving_version_drops_the_download() {
    let mut sim = Sim::new();
    sim.install(1);
    sim.desire(2);
    assert!(sim.pending.contains_key(M));
    sim.desire(1);
    assert!(!sim.pending.contains_key(M));
    sim.requested.clear();
    sim.advance(5_000);
    assert!(sim.requested.is_empty(), "no more requests for version 2");
}

#[test]
fn a_rollouts_thresholds_judge_the_trial_and_survive_a_restart() {
    let mut sim = Sim::new();
    sim.install(1);
    let t = TrialThresholds {
        requests: Some(2),
        max_p99_percent: Some(400),
        ..TrialThresholds::default()
    };
    sim.desire_with(2, Some(t));
    sim.deliver_all();
    sim.finish_staging(true);
    assert_eq!(sim.disk[M].trial.unwrap().thresholds, Some(t));
    sim.restart(false);
    sim.outcome(true, false);
    assert_eq!(sim.commits, 0);
    sim.outcome(true, false);
    assert_eq!(
        sim.commits, 1,
        "judged after the rollout's 2 requests, not the device's 5"
    );
}

#[test]
fn a_fleet_rollback_ends_a_trial_or_installs_the_older_version_it_allows() {
    let mut sim = Sim::new();
    for v in [1, 2] {
        sim.desire(v);
        sim.deliver_all();
        sim.finish_staging(true);
        sim.advance(10_000);
    }
    sim.desire(3); // Allows falling back to 1.
    sim.deliver_all();
    sim.finish_staging(true);
    assert!(sim.trial.is_some());
    sim.desire(2); // The last good version: the trial ends at once.
    assert_eq!(sim.serving_version(), Some(2));
    assert!(sim
        .errors
        .last()
        .unwrap()
        .2
        .contains("went back to version 2"));
    sim.desire(1);
    assert!(
        sim.errors.last().unwrap().2.contains("(rollback)"),
        "2 allows no fallback"
    );
    assert_eq!(sim.errors.last().unwrap().3, ErrorKind::Downgrade);

    sim.install(4);
    sim.advance(10_000);
    sim.desire(6); // Allows falling back to 4.
    sim.deliver_all();
    sim.finish_staging(true);
    sim.advance(10_000);
    assert_eq!(sim.serving_version(), Some(6));
    sim.desire(4);
    assert!(
        sim.requested.is_empty(),
        "4 is still on disk in the other slot"
    );
    sim.finish_staging(true);
    assert_eq!(sim.serving_version(), Some(4));
    assert_eq!(sim.disk[M].highest_version, 4);
    sim.desire(3);
    assert!(sim.errors.last().unwrap().2.contains("(rollback)"));
}

#[test]
fn the_desired_state_going_back_while_staging_drops_the_staged_version() {
    let mut sim = Sim::new();
    sim.install(1);
    sim.desire(2);
    sim.deliver_all();
    assert_eq!(sim.staging.len(), 1, "v2 is staging");
    sim.desire(1); // A fleet rollback before v2 ever served.
    sim.finish_staging(true);
    assert_eq!(sim.serving_version(), Some(1), "v2 must not be swapped in");
    assert!(sim.pending.is_empty());
    sim.desire(2); // Wanted again later: it installs.
    sim.deliver_all();
    sim.finish_staging(true);
    assert_eq!(sim.serving_version(), Some(2));
}

#[test]
fn a_crash_during_trial_resumes_it_and_a_crash_loop_rolls_back() {
    let mut sim = Sim::new();
    sim.install(1);
    sim.install(2);
    sim.restart(false);
    sim.restart(true); // A clean stop does not count.
    assert_eq!(sim.serving_version(), Some(2));
    sim.restart(false);
    assert_eq!(sim.serving_version(), Some(2));
    sim.restart(false); // Third start-up with the trial: past max_trial_boots = 2.
    assert_eq!(sim.serving_version(), Some(1));
    assert!(sim.errors.last().unwrap().2.contains("crash loop"));
    assert_eq!(sim.errors.last().unwrap().3, ErrorKind::CrashLoop);
}

#[test]
fn a_download_resumes_after_a_crash_and_offline_asks_for_nothing() {
    let mut sim = Sim::new();
    sim.desire(1);
    sim.deliver(0, false);
    sim.restart(false);
    assert!(sim.requested.is_empty(), "offline after the restart");
    sim.advance(2_000);
    assert!(sim.requested.is_empty());
    sim.set_online(true);
    assert_eq!(sim.requested.len(), 2, "the two chunks still missing");
    sim.deliver_all();
    sim.finish_staging(true);
    assert_eq!(sim.serving_version(), Some(1));
}

#[test]
fn a_metered_link_holds_a_download_its_policy_does_not_allow() {
    let mut sim = Sim::new();
    sim.install(1);
    sim.metered = true;
    sim.m.set_metered(true);
    sim.desire(2);
    assert!(
        sim.requested.is_empty(),
        "nothing asked over a metered link"
    );
    let u = sim.update();
    assert_eq!(
        (u.version, u.phase, u.held),
        (2, Phase::Waiting, Some(Held::Metered))
    );
    sim.metered = false;
    sim.m.set_metered(false);
    sim.run();
    assert!(!sim.requested.is_empty(), "asked once it is not metered");
    assert_eq!(sim.update().phase, Phase::Downloading);
    // Metered again halfway: what was asked may still come; nothing more is asked.
    sim.deliver(0, false);
    sim.metered = true;
    sim.m.set_metered(true);
    sim.run();
    sim.requested.clear();
    sim.advance(60_000);
    assert!(sim.requested.is_empty(), "paused");
    assert!(
        sim.errors.iter().all(|e| e.3 != ErrorKind::Stalled),
        "a paused download is not stalled: {:?}",
        sim.errors
    );
    // A deployment that allows metered links goes on at once.
    sim.desire_policy(
        2,
        DownloadPolicy {
            metered: true,
            ..DownloadPolicy::default()
        },
    );
    assert!(!sim.requested.is_empty());
    sim.deliver_all();
    sim.finish_staging(true);
    assert_eq!(sim.serving_version(), Some(2));
}

#[test]
fn a_complete_download_waits_for_its_window_then_stages() {
    let mut sim = Sim::new();
    sim.install(1);
    // Monday 1970-01-05, 01:00 UTC; the device's local time is UTC+2, so 03:00.
    let monday_1am = 4 * 86_400 + 3600;
    sim.m.set_wall_clock(sim.now, monday_1am, 7200);
    let window = modelcast_proto::window::MaintenanceWindow::parse("mon 04:00-05:00").unwrap();
    sim.desire_policy(
        2,
        DownloadPolicy {
            window: Some(window.clone()),
            ..DownloadPolicy::default()
        },
    );
    sim.deliver_all();
    assert!(sim.staging.is_empty(), "downloaded, not staged");
    let held = Held::Window {
        until: monday_1am as u64 + 3600,
        activation_only: true,
    };
    assert_eq!(
        (sim.update().phase, sim.update().held),
        (Phase::Waiting, Some(held))
    );
    assert!(sim.m.next_wake(sim.now) <= sim.now + Duration::from_secs(3600));
    sim.advance(3_599_000);
    assert!(sim.staging.is_empty(), "a second early");
    sim.advance(1_000);
    assert_eq!(sim.staging.len(), 1, "staged as the window opens");
    sim.finish_staging(true);
    assert_eq!(sim.serving_version(), Some(2));
    for _ in 0..5 {
        sim.outcome(true, false);
    }
    assert_eq!(sim.commits, 1);

    // In download mode, nothing is asked before the window; read at a given offset.
    sim.desire_policy(
        3,
        DownloadPolicy {
            window: Some(window),
            window_mode: WindowMode::Download,
            utc_offset_minutes: Some(0),
            ..DownloadPolicy::default()
        },
    );
    assert!(sim.requested.is_empty(), "04:00 UTC is two hours off");
    let u = sim.update();
    assert_eq!(
        (u.version, u.phase, u.held),
        (
            3,
            Phase::Waiting,
            Some(Held::Window {
                until: monday_1am as u64 + 3 * 3600,
                activation_only: false
            })
        )
    );
    sim.advance(2 * 3_600_000 - 1_000);
    assert!(sim.requested.is_empty(), "a second early");
    sim.advance(1_000);
    assert!(!sim.requested.is_empty(), "asked once the window opened");
}

#[derive(Debug, Clone)]
enum Event {
    /// The desired version moves by this much from the last one (1..=8), with a
    /// rollout's trial length or not.
    Desired(i64, Option<u32>),
    Deliver {
        pick: usize,
        corrupt: bool,
    },
    /// Every chunk asked for arrives.
    DeliverAll,
    Staged(bool),
    Outcome {
        ok: bool,
        slow: bool,
    },
    Advance(u64),
    Link(bool),
    /// The link becomes metered, or stops being.
    Metered(bool),
    Restart {
        clean: bool,
    },
    BreakWrite,
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        3 => (
            prop_oneof![4 => Just(1i64), 1 => Just(0), 1 => Just(-1), 1 => Just(2)],
            prop::option::of(0u32..4),
        )
            .prop_map(|(step, requests)| Event::Desired(step, requests)),
        3 => (0usize..3, prop::bool::weighted(0.2))
            .prop_map(|(pick, corrupt)| Event::Deliver { pick, corrupt }),
        4 => Just(Event::DeliverAll),
        3 => prop::bool::weighted(0.8).prop_map(Event::Staged),
        6 => (prop::bool::weighted(0.9), prop::bool::weighted(0.2))
            .prop_map(|(ok, slow)| Event::Outcome { ok, slow }),
        3 => (0u64..4_000).prop_map(Event::Advance),
        1 => any::<bool>().prop_map(Event::Link),
        1 => any::<bool>().prop_map(Event::Metered),
        1 => any::<bool>().prop_map(|clean| Event::Restart { clean }),
        1 => Just(Event::BreakWrite),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Any order of events, crashes included: the invariants checked by [`Sim`] hold
    /// after every step.
    #[test]
    fn invariants_hold_in_any_event_order(events in prop::collection::vec(event(), 1..160)) {
        let mut sim = Sim::new();
        let mut desired = 0i64;
        for e in events {
            match e {
                Event::Desired(step, requests) => {
                    desired = (desired + step).clamp(1, 8);
                    let t = requests.map(|r| TrialThresholds {
                        requests: Some(r),
                        ..TrialThresholds::default()
                    });
                    sim.desire_with(desired as u64, t);
                }
                Event::DeliverAll => sim.deliver_all(),
                Event::Deliver { pick, corrupt } => sim.deliver(pick, corrupt),
                Event::Staged(ok) => sim.finish_staging(ok),
                Event::Outcome { ok, slow } => sim.outcome(ok, slow),
                Event::Advance(ms) => sim.advance(ms),
                Event::Link(up) => sim.set_online(up),
                Event::Metered(metered) => {
                    sim.metered = metered;
                    sim.m.set_metered(metered);
                    sim.run();
                }
                Event::Restart { clean } => sim.restart(clean),
                Event::BreakWrite => sim.break_write = true,
            }
        }
        // Then the world settles: the link is up, every chunk arrives, staging passes,
        // trials run out. The device converges to the last desired version, or has
        // reported why not (rejected, rolled back, refused as a rollback).
        sim.break_write = false;
        sim.metered = false;
        sim.m.set_metered(false);
        sim.set_online(true);
        for _ in 0..12 {
            sim.deliver_all();
            while !sim.staging.is_empty() {
                sim.finish_staging(true);
            }
            sim.advance(11_000);
        }
        if desired > 0 && sim.serving_version() != Some(desired as u64) {
            let reported = sim.errors.iter().any(|(_, v, _, _)| *v == Some(desired as u64));
            prop_assert!(
                reported,
                "serving {:?}, desired {} and nothing said why",
                sim.serving_version(),
                desired
            );
        }
    }
}
