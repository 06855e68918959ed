//! The download policy's side of the update machine ([`DownloadPolicy`]): what holds an
//! update back now (a metered link the deployment does not allow, a closed maintenance
//! window), and the pausing, resuming and staging that follows from it at every tick. The
//! wall clock is passed in like the rest of the machine's time.

use std::time::{Duration, Instant};

use modelcast_proto::desired::{DownloadPolicy, WindowMode};
use modelcast_proto::report::{Held, Phase};
use modelcast_proto::window::WindowState;
use tracing::info;

use super::{Step, Updater};

/// The wall clock as the driver last read it: Unix seconds at `at`, and the device's offset
/// from UTC then (its local time zone).
#[derive(Debug, Clone, Copy)]
pub(super) struct WallClock {
    at: Instant,
    unix: i64,
    local_offset: i32,
}

impl WallClock {
    /// Unix seconds at `now`.
    fn unix_at(&self, now: Instant) -> i64 {
        self.unix + now.saturating_duration_since(self.at).as_secs() as i64
    }
}

/// What the policy is asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Gate {
    /// Fetching chunks.
    Download,
    /// Staging and activating a complete download.
    Activate,
}

impl Updater {
    /// The link is metered (or no longer is): downloads the policy does not allow over it
    /// pause, and resume when it is not.
    pub fn set_metered(&mut self, metered: bool) {
        if self.metered != metered {
            info!(metered, "link metering changed");
            self.metered = metered;
            self.poll_now = true;
        }
    }

    /// The wall clock read at `now`: Unix seconds, and the device's local offset from UTC in
    /// seconds. Maintenance windows are read against it.
    pub fn set_wall_clock(&mut self, now: Instant, unix: i64, local_offset: i32) {
        self.wall = Some(WallClock {
            at: now,
            unix,
            local_offset,
        });
    }

    /// Where the policy of `name` stands now for `gate`: what holds it back, if anything.
    pub(super) fn gate(&self, name: &str, gate: Gate, now: Instant) -> Option<Held> {
        let m = self.models.get(name)?;
        let policy = &m.download;
        if gate == Gate::Download && self.metered && !policy.metered {
            return Some(Held::Metered);
        }
        let window = policy.window.as_ref()?;
        if gate == Gate::Download && policy.window_mode == WindowMode::Activate {
            return None;
        }
        let wall = self.wall?;
        let offset = policy
            .utc_offset_minutes
            .map_or(i64::from(wall.local_offset), |m| i64::from(m) * 60);
        let unix = wall.unix_at(now);
        match window.state(unix + offset) {
            WindowState::Open { .. } => None,
            WindowState::Closed { opens_in } => Some(Held::Window {
                until: u64::try_from(unix + opens_in).unwrap_or(0),
                activation_only: policy.window_mode == WindowMode::Activate,
            }),
        }
    }

    /// When the window of `policy` next opens or closes, if it has one.
    pub(super) fn window_change(&self, policy: &DownloadPolicy, now: Instant) -> Option<Instant> {
        let window = policy.window.as_ref()?;
        let wall = self.wall?;
        let offset = policy
            .utc_offset_minutes
            .map_or(i64::from(wall.local_offset), |m| i64::from(m) * 60);
        let secs = match window.state(wall.unix_at(now) + offset) {
            WindowState::Open { closes_in } => closes_in,
            WindowState::Closed { opens_in } => opens_in,
        };
        Some(now + Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
    }

    /// Pauses or resumes downloads, and stages ready ones, as each model's policy says now.
    pub(super) fn apply_policies(&mut self, now: Instant) {
        let names: Vec<String> = self
            .models
            .iter()
            .filter(|(_, m)| matches!(m.step, Step::Downloading(_) | Step::Ready(_)))
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            let ready = matches!(self.models[&name].step, Step::Ready(_));
            let gate = if ready {
                Gate::Activate
            } else {
                Gate::Download
            };
            let held = self.gate(&name, gate, now);
            let m = self.models.get_mut(&name).expect("listed above");
            if let Step::Downloading(t) = &mut m.step {
                t.set_rate(m.download.max_rate);
            }
            if ready && held.is_none() {
                info!(model = %name, "maintenance window open");
                self.stage(&name);
                continue;
            }
            if m.held == held {
                continue;
            }
            match &held {
                Some(h) => {
                    info!(model = %name, held = %h, "update held back");
                    if let Step::Downloading(t) = &mut m.step {
                        t.pause();
                    }
                }
                None => info!(model = %name, "download resumes"),
            }
            m.held = held;
            if let Some(p) = m.progress.as_mut() {
                p.held = held;
                p.phase = match held {
                    Some(_) => Phase::Waiting,
                    None => Phase::Downloading,
                };
            }
            let phase = if held.is_some() {
                Phase::Waiting
            } else {
                Phase::Downloading
            };
            self.set_phase(&name, phase);
            self.want_report(true);
        }
    }
}
