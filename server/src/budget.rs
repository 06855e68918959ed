//! Per-device budgets: how much of something one device may send per minute (telemetry
//! reports and their bytes), as token buckets refilled continuously. Sans-IO: time is passed
//! in. One device flooding spends its own budget and nobody else's; what it sends over budget
//! is dropped and counted by the caller.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What one device may send per minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    /// Messages per minute (also the burst).
    pub messages: u32,
    /// Bytes per minute (also the burst).
    pub bytes: u64,
}

/// Telemetry's default: a report every second and 4 MiB a minute, far above what an agent
/// sends (a report per interval, 10 s by default, of a few KB plus its samples).
pub const TELEMETRY: Allowance = Allowance {
    messages: 60,
    bytes: 4 << 20,
};

/// Most devices tracked at once; idle ones (full buckets) are forgotten beyond it.
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
        }
        let bucket = self.buckets.entry(device.to_string()).or_insert(Bucket {
            messages: f64::from(a.messages),
            bytes: a.bytes as f64,
            at: now,
        });
        let minutes = now.saturating_duration_since(bucket.at).as_secs_f64() / 60.0;
        bucket.messages =
            (bucket.messages + minutes * f64::from(a.messages)).min(f64::from(a.messages));
        bucket.bytes = (bucket.bytes + minutes * a.bytes as f64).min(a.bytes as f64);
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
        let full = Duration::from_secs(60);
        self.buckets
            .retain(|_, b| now.saturating_duration_since(b.at) < full);
    }

    /// Devices tracked.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SMALL: Allowance = Allowance {
        messages: 10,
        bytes: 1000,
    };

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
