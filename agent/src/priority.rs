//! CPU priority of the agent's background threads: work that may wait (staging a new model)
//! yields to work that may not (serving requests).

/// Raises the calling thread's nice value by `nice` (Linux: nice is per thread). It cannot be
/// lowered again without privileges, so call it only on a thread of its own. Failure is
/// ignored: the work still runs, at normal priority.
pub fn lower_thread_priority(nice: i32) {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority take no pointers.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        let current = libc::getpriority(libc::PRIO_PROCESS, tid);
        libc::setpriority(libc::PRIO_PROCESS, tid, current + nice);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_os = "linux")]
    fn only_the_calling_thread_is_lowered() {
        // SAFETY: as above.
        let nice_of = |tid: libc::id_t| unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
        let main = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
        let before = nice_of(main);
        let lowered = std::thread::spawn(move || {
            super::lower_thread_priority(10);
            let me = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
            nice_of(me)
        })
        .join()
        .unwrap();
        assert_eq!(lowered, (before + 10).min(19));
        assert_eq!(nice_of(main), before);
    }
}
