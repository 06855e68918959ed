//! systemd glue: `READY=1` once the store's models serve, `STATUS=` lines, and watchdog
//! pings. Every call is a no-op when the agent does not run under systemd.

use std::time::Duration;

use sd_notify::NotifyState;

/// Tells systemd the agent is ready, with a status line.
pub fn ready(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Updates the status line `systemctl status` shows.
pub fn status(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Status(status)]);
}

/// Tells systemd the agent is stopping.
pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

/// How often to ping the watchdog (half its timeout), if systemd armed one.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|timeout| timeout / 2)
}

/// One watchdog ping. Call it only from the main loop, so a wedged loop stops pinging.
pub fn ping() {
    let _ = sd_notify::notify(&[NotifyState::Watchdog]);
}
