//! Per-device budgets: how much of something one device may send per minute (telemetry
//! reports and their bytes), or make the server send it (chunks on its own topic), as token
//! buckets refilled continuously. Sans-IO: time is passed
//! in. One device flooding spends its own budget and nobody else's; what it sends over budget
//! is dropped and counted by the caller.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What one device may send: a burst, then a rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    /// Messages at once.
    pub burst_messages: u32,
    /// Bytes at once.
    pub burst_bytes: u64,
    /// Messages per minute after the burst.
    pub messages: u32,
    /// Bytes per minute after the burst.
    pub bytes: u64,
}

/// Telemetry's default. An agent sends a report a minute of a few KB, and after being offline
/// its whole queue at once — which its own bound keeps under 4 MiB — so the burst takes a
/// full queue (8 MiB, 20,000 reports) and the rate is far above a live agent's (4 MiB and
/// 1,000 reports a minute), while a flooding device is held to that rate.
pub const TELEMETRY: Allowance = Allowance {
    burst_messages: 20_000,
    burst_bytes: 8 << 20,
    messages: 1_000,
    bytes: 4 << 20,
};

/// Chunks a device asks for the first time and gets on its own topic (a device downloading
/// alone gets all of them there). An agent asks for a window of chunks and more as they
/// arrive; a burst of 1 GiB takes a whole model of most sizes at full speed, and 4 GiB a
/// minute (68 MiB/s) after it is more than most devices' links. Chunks published once on an
/// artifact's shared topic are not charged to anyone.
pub const FIRST_ASKS: Allowance = Allowance {
    burst_messages: 65_536,
    burst_bytes: 1 << 30,
    messages: 1_000_000,
    bytes: 4 << 30,
};

/// Chunks a device asks for again (`again`: timed out, or lost with its connection). An
/// agent asks again at most its window (16 MiB by default) per chunk timeout (5 s) and per
/// reconnect: 64 MiB at once and 256 MiB a minute cover a link that drops every few seconds.
/// What it stops: a device asking for every chunk again and again without reading them
/// (amplification: one 300-byte request made the server send 16 MB into the broker).
pub const ASKED_AGAIN: Allowance = Allowance {
    burst_messages: 16_384,
    burst_bytes: 64 << 20,
    messages: 65_536,
    bytes: 256 << 20,
};

/// State reports. An agent reports at most every half second during an update and every
/// five seconds with download progress, a few KB each: 600 at once and 240 a minute (16 MiB
/// each way) are far above that, and hold a device that floods its state topic to it.
pub const STATE_REPORTS: Allowance = Allowance {
    burst_messages: 600,
    burst_bytes: 16 << 20,
    messages: 240,
    bytes: 16 << 20,
};

/// Most devices tracked at once; idle ones (full buckets) are forgotten beyond it, and while
/// none is, a device not tracked yet is refused.
pub const MAX_TRACKED: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    messages: f64,
    bytes: f64,
    at: Instant,
}

/// The buckets of every device.
#[derive(Debug)]
pub struct Budgets {
    allowance: Allowance,
    buckets: HashMap<String, Bucket>,
}

impl Budgets {
    /// Budgets of `allowance` per device.
    pub fn new(allowance: Allowance) -> Self {
        Budgets {
            allowance,
            buckets: HashMap::new(),
        }
    }

    /// Whether `device` may send a message of `bytes` at `now`; spends it if so.
    pub fn admit(&mut self, device: &str, bytes: u64, now: Instant) -> bool {
        let a = self.allowance;
        if self.buckets.len() >= MAX_TRACKED && !self.buckets.contains_key(device) {
            self.forget_full(now);
            if self.buckets.len() >= MAX_TRACKED {
                // Every tracked device is spending: a new one waits (made-up device ids must
                // not grow this without bound).
                return false;
            }
        }
        let bucket = self.buckets.entry(device.to_string()).or_insert(Bucket {
            messages: f64::from(a.burst_messages),
            bytes: a.burst_bytes as f64,
            at: now,
        });
        let minutes = now.saturating_duration_since(bucket.at).as_secs_f64() / 60.0;
        bucket.messages =
            (bucket.messages + minutes * f64::from(a.messages)).min(f64::from(a.burst_messages));
        bucket.bytes = (bucket.bytes + minutes * a.bytes as f64).min(a.burst_bytes as f64);
        bucket.at = now;
        if bucket.messages < 1.0 || bucket.bytes < bytes as f64 {
            return false;
        }
        bucket.messages -= 1.0;
        bucket.bytes -= bytes as f64;
        true
    }

    /// Forgets devices whose buckets have refilled (they are as if new).
    fn forget_full(&mut self, now: Instant) {
        let a = self.allowance;
        let minutes = (f64::from(a.burst_messages) / f64::from(a.messages.max(1)))
            .max(a.burst_bytes as f64 / a.bytes.max(1) as f64);
        let full = Duration::from_secs_f64(minutes * 60.0);
        self.buckets
            .retain(|_, b| now.saturating_duration_since(b.at) < full);
    }

    /// Devices tracked.
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

/// What was dropped or refused per device since the server started, by reason: what an
/// operator sees beside each device (`GET /api/v1/devices`, `modelcast devices`), so one
/// that floods or misbehaves is found by name. Reasons are short stable names:
/// `chunks_over_budget`, `state_over_budget`, `telemetry_over_budget`, `oversized` (a
/// message over its topic kind's bound, [`modelcast_proto::topic::DeviceTopic::device_limit`]),
/// `quarantined` (a message of a quarantined device), and the broker front's refusals
/// ([`crate::broker::policy::Refusal::kind`]).
/// The reasons the fleet itself drops a device's message for (the broker front's are
/// [`FRONT_REASONS`]): each shows in `/metrics` at 0 until it happens.
pub const REASONS: [&str; 6] = [
    "chunks_over_budget",
    "state_over_budget",
    "telemetry_over_budget",
    "oversized",
    "quarantined",
    "server_busy",
];

/// The embedded broker front's refusals ([`crate::broker::policy::Refusal::kind`]).
pub const FRONT_REASONS: [&str; 5] = ["client_id", "publish", "retained", "too_large", "subscribe"];

#[derive(Debug, Default)]
pub struct Drops {
    by_device: std::sync::Mutex<HashMap<String, std::collections::BTreeMap<&'static str, u64>>>,
}

impl Drops {
    /// Counts `n` of `reason` for `device`. Beyond [`MAX_TRACKED`] devices, a device not
    /// seen yet is counted under `*` (made-up ids must not grow this without bound).
    pub fn add(&self, device: &str, reason: &'static str, n: u64) {
        debug_assert!(
            REASONS.contains(&reason) || FRONT_REASONS.contains(&reason),
            "drop reason {reason:?} is not listed in REASONS or FRONT_REASONS (/metrics shows each at 0)"
        );
        let mut by_device = self.by_device.lock().unwrap_or_else(|e| e.into_inner());
        let key = if by_device.len() >= MAX_TRACKED && !by_device.contains_key(device) {
            "*"
        } else {
            device
        };
        *by_device
            .entry(key.to_string())
            .or_default()
            .entry(reason)
            .or_default() += n;
    }

    /// `device`'s counts by reason.
    pub fn of(&self, device: &str) -> std::collections::BTreeMap<String, u64> {
        let by_device = self.by_device.lock().unwrap_or_else(|e| e.into_inner());
        by_device
            .get(device)
            .map(|m| m.iter().map(|(k, v)| (k.to_string(), *v)).collect())
            .unwrap_or_default()
    }

    /// Every device's counts.
    pub fn all(&self) -> Vec<(String, std::collections::BTreeMap<String, u64>)> {
        let by_device = self.by_device.lock().unwrap_or_else(|e| e.into_inner());
        by_device
            .iter()
            .map(|(d, m)| {
                (
                    d.clone(),
                    m.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                )
            })
            .collect()
    }

    /// Every device's counts summed by reason.
    pub fn totals(&self) -> std::collections::BTreeMap<&'static str, u64> {
        let by_device = self.by_device.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = std::collections::BTreeMap::new();
        for m in by_device.values() {
            for (k, v) in m {
                *out.entry(*k).or_default() += v;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SMALL: Allowance = Allowance {
        burst_messages: 10,
        burst_bytes: 1000,
        messages: 10,
        bytes: 1000,
    };

    #[test]
    fn a_full_queue_goes_through_at_once_and_a_flood_is_held_to_the_rate() {
        let mut b = Budgets::new(TELEMETRY);
        let t0 = Instant::now();
        // A week offline: an agent's whole queue (its bound: 4 MiB) of 2 KB reports.
        let queue = (4 << 20) / 2048;
        assert_eq!(
            (0..queue).filter(|_| b.admit("back", 2048, t0)).count(),
            queue
        );
        // A flood of 60 KB reports: the burst (8 MiB), then 4 MiB a minute.
        let burst = (0..1000).filter(|_| b.admit("loud", 60_000, t0)).count();
        assert_eq!(burst, (8 << 20) / 60_000);
        let later = t0 + Duration::from_secs(60);
        let minute = (0..1000).filter(|_| b.admit("loud", 60_000, later)).count();
        assert!((69..=70).contains(&minute), "{minute}");
    }

    #[test]
    fn a_device_asking_for_chunks_again_and_again_is_held_to_the_rate() {
        let (mut first, mut again) = (Budgets::new(FIRST_ASKS), Budgets::new(ASKED_AGAIN));
        let t0 = Instant::now();
        const CHUNK: u64 = 256 * 1024;
        // A 100 MiB model goes at once, and a lost window of 16 MiB is asked again at once.
        assert_eq!(
            (0..400)
                .filter(|_| first.admit("edge-1", CHUNK, t0))
                .count(),
            400
        );
        assert_eq!(
            (0..64).filter(|_| again.admit("edge-1", CHUNK, t0)).count(),
            64
        );
        // 40 requests asking all 65 chunks of a 16 MiB artifact again: 64 MiB of them.
        let sent = (0..40 * 65)
            .filter(|_| again.admit("loud", CHUNK, t0))
            .count() as u64;
        assert_eq!(sent * CHUNK, 64 << 20);
        // Then 256 MiB a minute: one second gives 4 MiB.
        let later = t0 + Duration::from_secs(1);
        let second = (0..1000)
            .filter(|_| again.admit("loud", CHUNK, later))
            .count() as u64;
        assert_eq!(second, (256u64 << 20) / 60 / CHUNK);
    }

    #[test]
    fn a_flooding_device_spends_its_own_budget_only() {
        let mut b = Budgets::new(SMALL);
        let t0 = Instant::now();
        let admitted = (0..100).filter(|_| b.admit("loud", 10, t0)).count();
        assert_eq!(admitted, 10);
        assert!(b.admit("quiet", 10, t0));
        // Bytes bound too: one large message takes the rest.
        assert!(b.admit("big", 990, t0));
        assert!(!b.admit("big", 20, t0));
        // It refills over the minute: 6 s gives one message back.
        assert!(!b.admit("loud", 10, t0 + Duration::from_secs(5)));
        assert!(b.admit("loud", 10, t0 + Duration::from_secs(11)));
    }

    #[test]
    fn the_devices_tracked_are_bounded() {
        let mut b = Budgets::new(SMALL);
        let t0 = Instant::now();
        for n in 0..MAX_TRACKED {
            assert!(b.admit(&n.to_string(), 1, t0));
        }
        // All of them spending: a new id is refused, not tracked.
        assert!(!b.admit("one more", 1, t0));
        assert_eq!(b.tracked(), MAX_TRACKED);
        // Once they are idle (buckets full again), they make room.
        assert!(b.admit("one more", 1, t0 + Duration::from_secs(61)));
        assert_eq!(b.tracked(), 1);
    }

    proptest! {
        /// Whatever the arrivals, no device gets more than its burst plus the refill of the
        /// time that passed.
        #[test]
        fn never_more_than_the_allowance(steps in prop::collection::vec((0u64..3000, 0u64..400), 1..300)) {
            let mut b = Budgets::new(SMALL);
            let t0 = Instant::now();
            let (mut elapsed_ms, mut count, mut bytes) = (0u64, 0u64, 0u64);
            for (dt, size) in steps {
                elapsed_ms += dt;
                if b.admit("d", size, t0 + Duration::from_millis(elapsed_ms)) {
                    count += 1;
                    bytes += size;
                }
            }
            let minutes = elapsed_ms as f64 / 60_000.0;
            prop_assert!(count as f64 <= 10.0 + 10.0 * minutes + 1e-6);
            prop_assert!(bytes as f64 <= 1000.0 + 1000.0 * minutes + 1e-6);
        }
    }
}
