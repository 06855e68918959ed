//! Every operating-system call the agent makes through `libc`, each a safe function with its
//! failure spelled out: the only module (with one tract call in `engine.rs`) allowed `unsafe`.
//! Elsewhere the calls do nothing and report so.

use std::fs::File;
use std::path::Path;
use std::time::Duration;

/// Bytes an unprivileged process may still write on the file system holding `path`; `None`
/// when it cannot be told.
#[allow(unsafe_code)]
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a NUL-terminated path and a buffer statvfs fills on success.
    let rc = unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled the buffer.
    let stat = unsafe { stat.assume_init() };
    // The field types differ between targets (u32 on armv7): a widening conversion there.
    #[allow(clippy::useless_conversion)]
    let (blocks, size) = (u64::from(stat.f_bavail), u64::from(stat.f_frsize));
    Some(blocks.saturating_mul(size))
}

/// Reserves `len` bytes for `file`, so that writing them later cannot run out of space
/// (`posix_fallocate`; elsewhere the file is only extended).
#[allow(unsafe_code)]
pub fn reserve(file: &File, len: u64) -> std::io::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::fd::AsRawFd;
        let len = libc::off_t::try_from(len).map_err(std::io::Error::other)?;
        // SAFETY: a valid open descriptor and a non-negative range.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        Ok(())
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    file.set_len(len)
}

/// The local time zone's offset from UTC at Unix second `unix`, in seconds east (the C
/// library's `localtime_r`, which reads `TZ` or `/etc/localtime`); 0 when it cannot tell.
#[allow(unsafe_code)]
pub fn local_offset(unix: i64) -> i32 {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // `time_t` is 32 bits on some armv7 systems.
        #[allow(irrefutable_let_patterns)]
        let Ok(t) = libc::time_t::try_from(unix) else {
            return 0;
        };
        let mut tm = std::mem::MaybeUninit::<libc::tm>::uninit();
        // SAFETY: a valid time and a buffer localtime_r fills on success (non-null return).
        let filled = unsafe { !libc::localtime_r(&t, tm.as_mut_ptr()).is_null() };
        if !filled {
            return 0;
        }
        // SAFETY: localtime_r succeeded, so it filled the buffer.
        let tm = unsafe { tm.assume_init() };
        // A `long` on every target (i32 on armv7).
        #[allow(clippy::useless_conversion)]
        i32::try_from(i64::from(tm.tm_gmtoff)).unwrap_or(0)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = unix;
        0
    }
}

/// Returns free heap memory to the system (glibc's `malloc_trim`): glibc keeps freed memory
/// in its arenas, so the buffers of reading and planning a 100 MB model would stay resident
/// next to the model itself.
#[allow(unsafe_code)]
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own free lists; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// CPU time the calling thread has used (`CLOCK_THREAD_CPUTIME_ID`).
#[allow(unsafe_code)]
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which lives across the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    // The field types differ between targets.
    #[allow(clippy::unnecessary_cast)]
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The kernel's clock ticks per second and page size, bytes (each at least 1).
#[allow(unsafe_code)]
pub fn clock_ticks_and_page_size() -> (u64, u64) {
    // SAFETY: sysconf takes no pointers.
    let (tick, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (tick.max(1) as u64, page.max(1) as u64)
}

/// The calling thread's id, as the scheduler knows it (0 elsewhere than Linux).
#[allow(unsafe_code)]
pub fn current_thread() -> i32 {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid takes no arguments.
    unsafe {
        libc::syscall(libc::SYS_gettid) as i32
    }
    #[cfg(not(target_os = "linux"))]
    0
}

/// A thread's scheduling: its policy (`SCHED_OTHER` or `SCHED_IDLE`), nice value and time
/// slice.
#[derive(Debug, Clone, Copy)]
pub struct Scheduling {
    /// `SCHED_IDLE` rather than `SCHED_OTHER`.
    pub idle: bool,
    /// Its nice value.
    pub nice: i32,
    /// The time slice asked for, nanoseconds (0: the kernel's default).
    pub slice_ns: u64,
}

/// Sets thread `tid`'s scheduling (`sched_setattr`); without it (kernels before 4.13, other
/// systems), a `SCHED_OTHER` thread's nice value alone (`setpriority`). Whether the kernel
/// allowed it.
#[allow(unsafe_code)]
pub fn set_scheduling(tid: i32, s: Scheduling) -> bool {
    #[cfg(target_os = "linux")]
    {
        let attr = SchedAttr {
            size: std::mem::size_of::<SchedAttr>() as u32,
            sched_policy: if s.idle { libc::SCHED_IDLE as u32 } else { 0 },
            sched_nice: s.nice,
            sched_runtime: s.slice_ns,
            ..SchedAttr::default()
        };
        // SAFETY: sched_setattr reads one struct of the size it is told, which lives across
        // the call.
        let set =
            unsafe { libc::syscall(libc::SYS_sched_setattr, tid, &attr as *const SchedAttr, 0) };
        if set == 0 {
            return true;
        }
        // SAFETY: setpriority takes no pointers.
        !s.idle && unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, s.nice) } == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (tid, s);
        false
    }
}

/// The soft `RLIMIT_NICE` of this process (how far it may raise a thread: nice = 20 − limit);
/// `None` when it cannot be read.
#[allow(unsafe_code)]
pub fn nice_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NICE, &mut limit) } != 0 {
        return None;
    }
    // rlim_t is not u64 on every target.
    #[allow(clippy::unnecessary_cast)]
    Some(limit.rlim_cur as u64)
}

/// The calling thread's nice value and whether its policy is `SCHED_IDLE` (for tests).
#[allow(unsafe_code)]
#[cfg(test)]
pub fn own_scheduling() -> (bool, i32) {
    #[cfg(target_os = "linux")]
    {
        let tid = current_thread() as libc::id_t;
        // SAFETY: sched_getscheduler and getpriority take no pointers; 0 is the calling
        // thread.
        unsafe {
            (
                libc::sched_getscheduler(0) == libc::SCHED_IDLE,
                libc::getpriority(libc::PRIO_PROCESS, tid),
            )
        }
    }
    #[cfg(not(target_os = "linux"))]
    (false, 0)
}

/// Whether the process runs as root (for tests).
#[allow(unsafe_code)]
#[cfg(test)]
pub fn is_root() -> bool {
    // SAFETY: geteuid takes no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_directorys_file_system_has_free_bytes_and_a_missing_path_has_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).is_some_and(|b| b > 0));
        assert_eq!(free_bytes(&dir.path().join("missing")), None);
    }

    #[test]
    fn a_reserved_file_has_its_length() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::create(dir.path().join("f")).unwrap();
        reserve(&file, 4096).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 4096);
    }

    #[test]
    fn a_busy_thread_uses_cpu_time() {
        let before = thread_cpu_time();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        assert!(thread_cpu_time() > before);
    }
}
