//! The wall clock, read in one place and in one unit: Unix milliseconds. Seconds (what the
//! stored records and signed metadata carry) are derived from it. The planners (rollouts,
//! fan-out, drift) take the time as an argument instead of reading a clock.

/// Unix milliseconds now (0 if the clock is before 1970).
pub fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    unix_now_ms() / 1000
}
