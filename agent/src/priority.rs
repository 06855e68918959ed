//! CPU priority of the agent's background threads: work that may wait (the control plane,
//! staging a new model) yields to work that may not (serving requests).
//!
//! Two levels. The control plane (broker link, downloads, store writes, telemetry) runs at
//! [`BACKGROUND_NICE`]. Heavy one-off work (verifying a desired state, staging a model) starts
//! lower still, and is raised to [`BACKGROUND_NICE`] if it is not done after [`RAISE_AFTER`]:
//! on a device with spare CPU it finishes before that and costs the serving threads nothing;
//! on a saturated one it would otherwise starve, and the raise bounds that.
//!
//! "Lower still" is Linux's `SCHED_IDLE` policy when the raise is allowed: a serving thread
//! that wakes preempts an idle-policy thread at once, and the kernel places wake-ups on a CPU
//! running only idle-policy work as if it were free. Leaving `SCHED_IDLE`, like raising a
//! nice value, needs `CAP_SYS_NICE` or an `RLIMIT_NICE` that allows it (the systemd unit sets
//! `LimitNICE=+10`). Without either, heavy work starts at [`IDLE_NICE`] instead and stays
//! there, since a thread stuck in `SCHED_IDLE` could starve for good.
//!
//! Both levels also take the kernel's shortest time slice, 0.1 ms (EEVDF, Linux 6.6 and
//! later): a running thread keeps its CPU until its slice ends, whatever its nice value, so
//! the short slice is what lets a serving thread that wakes take the CPU at once.

use std::time::Duration;

/// Nice value of the control plane, and of heavy work that ran past [`RAISE_AFTER`].
pub const BACKGROUND_NICE: i32 = 10;
/// Nice value heavy work starts at.
pub const IDLE_NICE: i32 = 19;
/// How long heavy work runs at its starting priority before it is raised.
pub const RAISE_AFTER: Duration = Duration::from_secs(5);
/// Time slice asked for background threads, in nanoseconds (the kernel's least).
const BACKGROUND_SLICE_NS: u64 = 100_000;

/// Moves the calling thread to the background at [`BACKGROUND_NICE`] with the short slice. It
/// cannot be undone without privileges, so call it only on a thread of its own. Failure is
/// ignored: the work still runs, at normal priority.
pub fn to_background() {
    set_nice(current_thread(), BACKGROUND_NICE);
}

/// Moves the calling thread to `SCHED_IDLE` where it may leave it again ([`raise`]): it runs on
/// CPU time nothing else wants, and a serving thread that wakes takes its CPU at once.
/// Elsewhere (no `CAP_SYS_NICE`, no `RLIMIT_NICE`) to [`BACKGROUND_NICE`], as
/// [`to_background`], rather than to a nice 19 it could never leave. Whether it went idle.
/// Call it only on a thread of its own.
pub fn to_idle_or_background() -> bool {
    if may_raise() {
        to_idle(current_thread());
        true
    } else {
        to_background();
        false
    }
}

/// Raises the calling thread to [`BACKGROUND_NICE`] (from [`to_idle_or_background`]); whether
/// the kernel allowed it.
pub fn raise() -> bool {
    set_nice(current_thread(), BACKGROUND_NICE)
}

/// The calling thread's id, as the scheduler knows it.
fn current_thread() -> i32 {
    crate::sys::current_thread()
}

/// Sets thread `tid`'s nice value and the short slice, under `SCHED_OTHER`; returns whether the
/// kernel allowed it (kernels before 4.13 have no slice: the nice value alone still helps).
fn set_nice(tid: i32, nice: i32) -> bool {
    crate::sys::set_scheduling(
        tid,
        crate::sys::Scheduling {
            idle: false,
            nice,
            slice_ns: BACKGROUND_SLICE_NS,
        },
    )
}

/// Moves thread `tid` to [`IDLE_NICE`], and then to `SCHED_IDLE` if it may leave it again.
fn to_idle(tid: i32) {
    // First the nice value, which SCHED_IDLE keeps: leaving SCHED_IDLE checks RLIMIT_NICE
    // against it, and 19 is within any limit.
    set_nice(tid, IDLE_NICE);
    if may_raise() {
        // On failure the thread stays at nice 19.
        crate::sys::set_scheduling(
            tid,
            crate::sys::Scheduling {
                idle: true,
                nice: IDLE_NICE,
                slice_ns: 0,
            },
        );
    }
}

/// Whether this process may raise a thread to [`BACKGROUND_NICE`]: it holds `CAP_SYS_NICE`, or
/// its `RLIMIT_NICE` reaches that far (nice = 20 − limit).
fn may_raise() -> bool {
    static MAY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *MAY.get_or_init(|| {
        const CAP_SYS_NICE: u32 = 23;
        let capable = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
                u64::from_str_radix(hex.trim(), 16).ok()
            })
            .is_some_and(|caps| caps & (1 << CAP_SYS_NICE) != 0);
        let limited = crate::sys::nice_limit().is_some_and(|l| l >= (20 - BACKGROUND_NICE) as u64);
        capable || limited
    })
}

/// Runs `work` on a thread of its own at idle priority, raised to [`BACKGROUND_NICE`] after
/// [`RAISE_AFTER`], and awaits its result, so that neither the runtime's workers nor the
/// serving threads wait for it. Errors if the thread cannot be started or dies before
/// answering.
pub async fn in_background<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    in_background_raised_after(name, RAISE_AFTER, work).await
}

/// Stack of a thread that loads, optimizes or runs a model (background work here, and the
/// runtime's blocking threads, see `main.rs`). tract recurses over the model's graph; with
/// the default 2 MiB the debug agent died of SIGSEGV, with no Rust message, while staging a
/// quantized model in 2 of 3 corpus runs (a likely overflow past the guard page); with a
/// larger stack, 5 of 5 passed. Reserved, not committed: pages are used only as touched (and
/// 16 MiB keeps a 32-bit device's address space for its threads).
pub const WORK_STACK: usize = 16 * 1024 * 1024;

/// [`in_background`], raised after `raise_after`.
async fn in_background_raised_after<T: Send + 'static>(
    name: &str,
    raise_after: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (tid_tx, tid_rx) = tokio::sync::oneshot::channel();
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("modelcast-{name}"))
        .stack_size(WORK_STACK)
        .spawn(move || {
            let tid = current_thread();
            to_idle(tid);
            let _ = tid_tx.send(tid);
            let _ = tx.send(work());
        })
        .map_err(|e| format!("starting the {name} thread: {e}"))?;
    let died = |_| format!("the {name} thread died before answering");
    // Sent first thing, so this wait is short.
    let tid = tid_rx.await.map_err(died)?;
    tokio::select! {
        answer = &mut rx => return answer.map_err(died),
        _ = tokio::time::sleep(raise_after) => {}
    }
    let raised = set_nice(tid, BACKGROUND_NICE);
    tracing::debug!(
        thread = name,
        raised,
        "background work still running; raising it"
    );
    rx.await.map_err(died)
}

#[cfg(test)]
mod tests {
    use crate::sys::own_scheduling;

    fn nice() -> i32 {
        own_scheduling().1
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn only_the_calling_thread_goes_to_the_background() {
        let before = nice();
        let moved = std::thread::spawn(move || {
            super::to_background();
            nice()
        })
        .join()
        .unwrap();
        assert_eq!(moved, super::BACKGROUND_NICE);
        assert_eq!(nice(), before);
    }

    #[tokio::test]
    #[cfg(target_os = "linux")]
    async fn background_work_answers_and_its_panics_are_errors() {
        let answer = super::in_background("test", own_scheduling).await;
        // SCHED_IDLE only where the work may leave it again; nice 19 otherwise.
        assert_eq!(answer, Ok((super::may_raise(), super::IDLE_NICE)));
        let died = super::in_background("test", || -> u8 { panic!("boom") }).await;
        assert!(died.unwrap_err().contains("died"));
    }

    #[tokio::test]
    #[cfg(target_os = "linux")]
    async fn long_background_work_is_raised() {
        // The work waits until well after the raise, then reports its priority.
        let raise_after = std::time::Duration::from_millis(100);
        let raised = super::in_background_raised_after("test", raise_after, move || {
            std::thread::sleep(raise_after * 3);
            own_scheduling()
        })
        .await;
        // Raising needs CAP_SYS_NICE or RLIMIT_NICE; without them the work stays at nice 19.
        // CI runs as root, so there this checks the raise out of SCHED_IDLE.
        let expected = if super::may_raise() {
            super::BACKGROUND_NICE
        } else {
            super::IDLE_NICE
        };
        assert_eq!(raised, Ok((false, expected)));
        if crate::sys::is_root() {
            assert!(super::may_raise(), "root may raise");
        }
    }
}
