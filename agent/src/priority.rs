//! CPU priority of the agent's background threads: work that may wait (staging a new model)
//! yields to work that may not (serving requests).

/// Moves the calling thread to the background: Linux's `SCHED_IDLE` policy, under which any
/// normal thread that wakes (a request to serve) preempts it at once, and which still gets a
/// small share of a busy CPU, so the work is never starved outright. Where that policy cannot
/// be set, the thread's nice value is raised by 19 instead. It cannot be undone without
/// privileges, so call it only on a thread of its own. Failure is ignored: the work still
/// runs, at normal priority.
pub fn to_background() {
    #[cfg(target_os = "linux")]
    // SAFETY: sched_setscheduler reads the one parameter struct passed; gettid and setpriority
    // take no pointers.
    unsafe {
        let param = libc::sched_param { sched_priority: 0 };
        if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, 19);
        }
    }
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
        // SAFETY: sched_getscheduler takes no pointers.
        let policy = || unsafe { libc::sched_getscheduler(0) };
        let before = policy();
        let moved = std::thread::spawn(move || {
            super::to_background();
            policy()
        })
        .join()
        .unwrap();
        assert_eq!(moved, libc::SCHED_IDLE);
        assert_eq!(policy(), before);
    }

    #[tokio::test]
    async fn background_work_answers_and_its_panics_are_errors() {
        let answer = super::in_background("test", || 6 * 7).await;
        assert_eq!(answer, Ok(42));
        let died = super::in_background("test", || -> u8 { panic!("boom") }).await;
        assert!(died.unwrap_err().contains("died"));
    }
}
