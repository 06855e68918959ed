//! Maintenance windows: when a device may download or activate an update, in its own local
//! time (or at an offset from UTC the deployment gives).
//!
//! A window is written as cron would select days and times, in one line:
//!
//! ```text
//! mon-fri 02:00-04:30        weekdays, 02:00 to 04:30
//! daily 22:00-02:00          every night, past midnight (the window belongs to its start day)
//! sat,sun 00:00-23:59:59; wed 12:00-13:00    several windows, separated by ";"
//! 03:00-04:00                no days: every day
//! ```
//!
//! Day names are `mon` … `sun` (ranges may wrap: `sat-mon`), or `daily`. Times are
//! `HH:MM[:SS]`; an end at or before the start runs into the next day; a window of no length
//! is refused, since it would never open. No I/O and no clock: times are passed in as local
//! seconds since the Unix epoch (UTC seconds plus the offset).

use serde::{Deserialize, Serialize};

/// Seconds in a day.
const DAY: i64 = 24 * 3600;
/// Most windows in one spec.
const MAX_ENTRIES: usize = 16;
/// Longest spec accepted.
const MAX_SPEC_BYTES: usize = 256;
const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// A window spec that cannot be used; the message names what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("maintenance window {spec:?}: {reason}")]
pub struct WindowError {
    /// The spec as given.
    pub spec: String,
    /// What is wrong.
    pub reason: String,
}

/// One window: on each of `days`, from `start` for `length` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    /// Bit 0 is Monday … bit 6 Sunday.
    days: u8,
    /// Seconds after local midnight.
    start: i64,
    /// Seconds, 1 ..= one day.
    length: i64,
}

/// A parsed maintenance window: one or more [`Entry`]s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MaintenanceWindow {
    spec: String,
    entries: Vec<Entry>,
}

impl TryFrom<String> for MaintenanceWindow {
    type Error = WindowError;

    fn try_from(spec: String) -> Result<Self, WindowError> {
        MaintenanceWindow::parse(&spec)
    }
}

impl From<MaintenanceWindow> for String {
    fn from(w: MaintenanceWindow) -> String {
        w.spec
    }
}

impl std::fmt::Display for MaintenanceWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.spec)
    }
}

/// Where a local time stands against a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowState {
    /// Open; it closes after this many seconds.
    Open {
        /// Seconds until it closes.
        closes_in: i64,
    },
    /// Closed; it opens after this many seconds.
    Closed {
        /// Seconds until it opens.
        opens_in: i64,
    },
}

impl WindowState {
    /// Whether open.
    pub fn is_open(self) -> bool {
        matches!(self, WindowState::Open { .. })
    }
}

fn day_index(name: &str) -> Option<u32> {
    DAYS.iter().position(|d| *d == name).map(|i| i as u32)
}

/// `HH:MM` or `HH:MM:SS` as seconds after midnight.
fn time_of_day(s: &str) -> Option<i64> {
    let parts: Vec<&str> = s.split(':').collect();
    if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.len() != 2) {
        return None;
    }
    let n = |p: &str, max: i64| p.parse::<i64>().ok().filter(|v| (0..=max).contains(v));
    let h = n(parts[0], 23)?;
    let m = n(parts[1], 59)?;
    let s = match parts.get(2) {
        Some(p) => n(p, 59)?,
        None => 0,
    };
    Some(h * 3600 + m * 60 + s)
}

/// The day set of `s` (bit 0 Monday); `Err` names the part that is not a day.
fn parse_days(s: &str) -> Result<u8, &str> {
    if s == "daily" {
        return Ok(0x7f);
    }
    let mut days = 0u8;
    for part in s.split(',') {
        let bad = || part;
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day_index(a).ok_or_else(bad)?, day_index(b).ok_or_else(bad)?);
                let mut d = a;
                loop {
                    days |= 1 << d;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => days |= 1 << day_index(part).ok_or_else(bad)?,
        }
    }
    Ok(days)
}

impl MaintenanceWindow {
    /// Parses a spec (see the module's documentation).
    pub fn parse(spec: &str) -> Result<MaintenanceWindow, WindowError> {
        let fail = |reason: String| WindowError {
            spec: spec.chars().take(64).collect(),
            reason,
        };
        if spec.len() > MAX_SPEC_BYTES {
            return Err(fail(format!("longer than {MAX_SPEC_BYTES} bytes")));
        }
        let mut entries = Vec::new();
        for entry in spec.split(';').map(str::trim) {
            if entries.len() == MAX_ENTRIES {
                return Err(fail(format!("more than {MAX_ENTRIES} windows")));
            }
            let entry = entry.to_ascii_lowercase();
            let (days, times) = match entry.rsplit_once(char::is_whitespace) {
                Some((days, times)) => (
                    parse_days(days.trim()).map_err(|part| {
                        fail(format!(
                            "{part:?} is not a day (mon … sun, a range mon-fri, or daily)"
                        ))
                    })?,
                    times,
                ),
                None => (0x7f, entry.as_str()),
            };
            let (from, to) = times
                .split_once('-')
                .ok_or_else(|| fail(format!("{times:?} is not a time range HH:MM-HH:MM")))?;
            let t = |s: &str| {
                time_of_day(s).ok_or_else(|| fail(format!("{s:?} is not a time HH:MM[:SS]")))
            };
            let (start, end) = (t(from)?, t(to)?);
            if start == end {
                return Err(fail(format!(
                    "{times} has no length, so the window would never open"
                )));
            }
            let length = (end - start).rem_euclid(DAY);
            entries.push(Entry {
                days,
                start,
                length,
            });
        }
        Ok(MaintenanceWindow {
            spec: spec.trim().to_string(),
            entries,
        })
    }

    /// Where local time `local` (seconds since the Unix epoch, in local time) stands.
    pub fn state(&self, local: i64) -> WindowState {
        // Every opening from the day before (a window past midnight) to a week and a day on,
        // in order; then merged where they touch or overlap.
        let today = local.div_euclid(DAY);
        let mut spans: Vec<(i64, i64)> = Vec::new();
        for day in today - 1..=today + 8 {
            // 1970-01-01 was a Thursday (index 3 from Monday).
            let weekday = (day + 3).rem_euclid(7);
            for e in &self.entries {
                if e.days & (1 << weekday) != 0 {
                    let from = day * DAY + e.start;
                    spans.push((from, from + e.length));
                }
            }
        }
        spans.sort_unstable();
        let mut merged: Vec<(i64, i64)> = Vec::new();
        for (from, to) in spans {
            match merged.last_mut() {
                Some(last) if from <= last.1 => last.1 = last.1.max(to),
                _ => merged.push((from, to)),
            }
        }
        for (from, to) in merged {
            if local < from {
                return WindowState::Closed {
                    opens_in: from - local,
                };
            }
            if local < to {
                return WindowState::Open {
                    closes_in: to - local,
                };
            }
        }
        // Not reached: every parsed window opens at least once a week.
        WindowState::Closed { opens_in: 7 * DAY }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Local seconds of a day after 1970-01-05 (a Monday) at `h:m`.
    fn at(days_after_monday: i64, h: i64, m: i64) -> i64 {
        (4 + days_after_monday) * DAY + h * 3600 + m * 60
    }

    #[test]
    fn weekday_windows_open_and_close_on_their_days() {
        let w = MaintenanceWindow::parse("mon-fri 02:00-04:30").unwrap();
        assert_eq!(w.state(at(0, 1, 0)), WindowState::Closed { opens_in: 3600 });
        assert_eq!(w.state(at(0, 2, 0)), WindowState::Open { closes_in: 9000 });
        assert_eq!(
            w.state(at(0, 4, 30)),
            WindowState::Closed {
                opens_in: DAY - 9000
            }
        );
        // Friday night to Monday 02:00.
        assert_eq!(
            w.state(at(4, 5, 0)),
            WindowState::Closed {
                opens_in: 2 * DAY + 21 * 3600
            }
        );
        assert!(!w.state(at(5, 3, 0)).is_open(), "Saturday");
    }

    #[test]
    fn a_window_past_midnight_belongs_to_its_start_day() {
        let w = MaintenanceWindow::parse("fri 22:00-02:00").unwrap();
        assert!(w.state(at(4, 23, 0)).is_open());
        assert_eq!(
            w.state(at(5, 1, 0)),
            WindowState::Open { closes_in: 3600 },
            "Saturday 01:00 is Friday's window"
        );
        assert!(!w.state(at(0, 1, 0)).is_open(), "Monday 01:00 is not");
    }

    #[test]
    fn windows_that_touch_merge_and_several_are_allowed() {
        let w = MaintenanceWindow::parse("daily 22:00-00:00; daily 00:00:00-01:00").unwrap();
        assert_eq!(w.state(at(2, 23, 0)), WindowState::Open { closes_in: 7200 });
        let w = MaintenanceWindow::parse("sat,sun 00:00-23:59:59; WED 12:00-13:00").unwrap();
        assert!(w.state(at(2, 12, 30)).is_open());
        assert!(w.state(at(6, 12, 30)).is_open());
        assert!(!w.state(at(3, 12, 30)).is_open());
        let w = MaintenanceWindow::parse("sat-mon 10:00-11:00").unwrap();
        assert!(
            w.state(at(0, 10, 30)).is_open(),
            "the range wraps to Monday"
        );
        assert!(!w.state(at(1, 10, 30)).is_open());
        let every_day = MaintenanceWindow::parse("03:00-04:00").unwrap();
        assert!(every_day.state(at(3, 3, 0)).is_open());
    }

    #[test]
    fn specs_that_never_open_or_do_not_parse_are_refused_by_name() {
        for (spec, words) in [
            ("03:00-03:00", "never open"),
            ("mon 25:00-26:00", "not a time"),
            ("mon 2:00-3:00", "not a time"),
            ("someday 02:00-03:00", "not a day"),
            ("mon 02:00", "not a time range"),
            ("", "not a time range"),
            ("mon-fri 02:00-03:00;", "not a time range"),
        ] {
            let e = MaintenanceWindow::parse(spec).unwrap_err();
            assert!(e.to_string().contains(words), "{spec:?}: {e}");
        }
        let long = "daily 01:00-02:00;".repeat(20);
        assert!(MaintenanceWindow::parse(&long).is_err());
        // Through serde, as a deployment carries it.
        let w: MaintenanceWindow = serde_json::from_str("\"mon 01:00-02:00\"").unwrap();
        assert_eq!(serde_json::to_string(&w).unwrap(), "\"mon 01:00-02:00\"");
        assert!(serde_json::from_str::<MaintenanceWindow>("\"01:00-01:00\"").is_err());
    }

    proptest! {
        #[test]
        fn the_state_agrees_with_itself_one_step_on(
            days in 1u8..128, start in 0i64..DAY, length in 1i64..DAY, t in -10 * DAY..4000 * DAY,
        ) {
            let end = (start + length) % DAY;
            let spec = format!(
                "{} {:02}:{:02}:{:02}-{:02}:{:02}:{:02}",
                (0..7).filter(|d| days & (1 << d) != 0).map(|d| DAYS[d]).collect::<Vec<_>>().join(","),
                start / 3600, start / 60 % 60, start % 60, end / 3600, end / 60 % 60, end % 60,
            );
            let w = MaintenanceWindow::parse(&spec).unwrap();
            match w.state(t) {
                WindowState::Open { closes_in } => {
                    prop_assert!(closes_in > 0 && closes_in <= DAY * 7);
                    prop_assert!(w.state(t + closes_in - 1).is_open());
                    prop_assert!(!w.state(t + closes_in).is_open());
                }
                WindowState::Closed { opens_in } => {
                    prop_assert!(opens_in > 0 && opens_in <= DAY * 7);
                    prop_assert!(!w.state(t + opens_in - 1).is_open());
                    prop_assert!(w.state(t + opens_in).is_open());
                }
            }
        }

        #[test]
        fn parsing_never_panics(s in ".{0,40}") {
            let _ = MaintenanceWindow::parse(&s);
        }
    }
}
