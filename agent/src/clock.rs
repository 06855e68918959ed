//! The wall clock, read in one place and in one unit: Unix milliseconds. Seconds (what signed
//! metadata expiries and reports carry) are derived from it. The update machine and the
//! transfers take `Instant`s passed in instead: they never read a clock themselves.

/// Unix milliseconds now (0 if the clock is before 1970).
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Unix seconds now.
pub fn unix_secs() -> i64 {
    unix_ms() / 1000
}

#[cfg(test)]
mod tests {
    #[test]
    fn seconds_are_the_milliseconds_read_once() {
        let (ms, s) = (super::unix_ms(), super::unix_secs());
        // 2026 or later, and the same clock.
        assert!(ms > 1_767_225_600_000, "{ms}");
        assert!((s - ms / 1000).abs() <= 1);
    }
}
