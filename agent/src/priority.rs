//! CPU priority of the agent's background threads: work that may wait (staging a new model)
//! yields to work that may not (serving requests).

/// Moves the calling thread to the background: nice 10, and on kernels whose scheduler takes
/// a time slice per thread (EEVDF, Linux 6.6 and later) the shortest slice, 0.1 ms. A running
/// thread keeps its CPU until its slice ends, whatever its nice value, so the short slice is
/// what lets a serving thread that wakes take the CPU at once; nice 10 keeps its share small
/// under load but not negligible (nice 19 measured faster swaps but starved staging past a
/// test's minute on a loaded machine), so an update is slowed there, never stalled. It cannot be undone
/// without privileges, so call it only on a thread of its own. Failure is ignored: the work
/// still runs, at normal priority.
pub fn to_background() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority take no pointers; sched_setattr reads one struct of the
    // size it is told, which lives across the call.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, BACKGROUND_NICE);
        let attr = SchedAttr {
            size: std::mem::size_of::<SchedAttr>() as u32,
            sched_nice: BACKGROUND_NICE,
            sched_runtime: BACKGROUND_SLICE_NS,
            ..SchedAttr::default()
        };
        libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0);
    }
}

/// Nice value of background threads.
pub const BACKGROUND_NICE: i32 = 10;
/// Time slice asked for background threads, in nanoseconds (the kernel's least).
const BACKGROUND_SLICE_NS: u64 = 100_000;

/// The kernel's `struct sched_attr` (`sched_setattr(2)`); `sched_runtime` is the time slice of
/// a `SCHED_OTHER` thread.
#[cfg(target_os = "linux")]
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
    sched_util_min: u32,
    sched_util_max: u32,
}

/// Runs `work` on a thread of its own in the background (see [`to_background`]) and awaits its
/// result, so that neither the runtime's workers nor the serving threads wait for it. Errors
/// if the thread cannot be started or dies before answering.
pub async fn in_background<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("modelcast-{name}"))
        .spawn(move || {
            to_background();
            let _ = tx.send(work());
        })
        .map_err(|e| format!("starting the {name} thread: {e}"))?;
    rx.await
        .map_err(|_| format!("the {name} thread died before answering"))
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_os = "linux")]
    fn only_the_calling_thread_goes_to_the_background() {
        // SAFETY: gettid and getpriority take no pointers.
        let nice = || unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::getpriority(libc::PRIO_PROCESS, tid)
        };
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
    async fn background_work_answers_and_its_panics_are_errors() {
        let answer = super::in_background("test", || 6 * 7).await;
        assert_eq!(answer, Ok(42));
        let died = super::in_background("test", || -> u8 { panic!("boom") }).await;
        assert!(died.unwrap_err().contains("died"));
    }
}
