//! Giving memory back to the system after the large, short-lived allocations of loading a model.
//!
//! glibc keeps freed heap memory in its arenas (and raises its mmap threshold after large
//! frees), so the buffers of reading and planning a 100 MB model would stay resident next to
//! the model itself. `malloc_trim` returns the free pages; elsewhere this is a no-op.

/// Returns free heap memory to the system.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own free lists; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
