//! A memory cgroup of the test's own, to run an agent under a memory limit as a small device
//! would: a child of the test process's own memory cgroup, cgroup v1 (`memory` controller) or
//! v2 (where the parent delegates `memory`). Removed when dropped (after the processes in it
//! ended).

use std::path::{Path, PathBuf};

/// Why no memory cgroup could be made: each place tried, and what it answered.
#[derive(Debug, Clone)]
pub struct NoCgroup {
    /// `place: reason`, one per hierarchy tried.
    pub tried: Vec<String>,
}

impl std::fmt::Display for NoCgroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no memory cgroup could be made: {}",
            self.tried.join("; ")
        )
    }
}

impl std::error::Error for NoCgroup {}

/// A memory cgroup made for one test.
pub struct MemoryCgroup {
    dir: PathBuf,
    v2: bool,
}

impl MemoryCgroup {
    /// Makes `name` under this process's memory cgroup, without a limit yet; the reason when
    /// this machine gives the test none (not root, no memory controller mounted writable).
    pub fn create(name: &str) -> Result<MemoryCgroup, NoCgroup> {
        let read = |file: &str| {
            std::fs::read_to_string(file).map_err(|e| NoCgroup {
                tried: vec![format!("{file}: {e}")],
            })
        };
        let (cgroups, mountinfo) = (read("/proc/self/cgroup")?, read("/proc/self/mountinfo")?);
        let dirs = modelcast_agent::memory::cgroup_dirs(&cgroups, &mountinfo);
        let mut tried = Vec::new();
        // The own cgroup of each hierarchy comes first in the list (ancestors follow).
        let mut seen = std::collections::BTreeSet::new();
        for (own, version) in dirs {
            if !seen.insert(version == modelcast_agent::memory::CgroupVersion::V2) {
                continue;
            }
            let v2 = version == modelcast_agent::memory::CgroupVersion::V2;
            let dir = own.join(format!("{name}-{}", std::process::id()));
            match std::fs::create_dir(&dir) {
                Ok(()) => {
                    let limit = if v2 {
                        "memory.max"
                    } else {
                        "memory.limit_in_bytes"
                    };
                    if dir.join(limit).exists() {
                        if !v2 {
                            // Memory the process already holds moves with it (v1 only).
                            let _ =
                                std::fs::write(dir.join("memory.move_charge_at_immigrate"), "1");
                        }
                        return Ok(MemoryCgroup { dir, v2 });
                    }
                    let _ = std::fs::remove_dir(&dir);
                    tried.push(format!("{}: no memory controller", own.display()));
                }
                Err(e) => tried.push(format!("{}: {e}", own.display())),
            }
        }
        Err(NoCgroup { tried })
    }

    /// Moves process `pid` (and its threads) into it.
    pub fn add(&self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("moving {pid} into {}: {e}", self.dir.display()));
    }

    /// Sets its limit, bytes.
    pub fn set_limit(&self, bytes: u64) {
        let file = if self.v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        std::fs::write(self.dir.join(file), bytes.to_string())
            .unwrap_or_else(|e| panic!("setting {file} to {bytes}: {e}"));
    }

    /// Memory charged to it now, bytes.
    pub fn usage(&self) -> u64 {
        self.read(if self.v2 {
            "memory.current"
        } else {
            "memory.usage_in_bytes"
        })
    }

    /// Times its processes hit the limit (v1 `memory.failcnt`; v2 the `max` event).
    pub fn limit_hits(&self) -> u64 {
        if self.v2 {
            let events =
                std::fs::read_to_string(self.dir.join("memory.events")).unwrap_or_default();
            modelcast_agent::memory::stat_value(&events, "max").unwrap_or(0)
        } else {
            self.read("memory.failcnt")
        }
    }

    /// Processes the kernel's OOM killer ended in it.
    pub fn oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        let text = std::fs::read_to_string(self.dir.join(file)).unwrap_or_default();
        modelcast_agent::memory::stat_value(&text, "oom_kill").unwrap_or(0)
    }

    fn read(&self, file: &str) -> u64 {
        std::fs::read_to_string(self.dir.join(file))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("reading {}", self.dir.join(file).display()))
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for MemoryCgroup {
    /// Drop it after the processes in it were killed and reaped (declare it before them): an
    /// empty cgroup is removed at once.
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            eprintln!("left behind: {}: {e}", self.dir.display());
        }
    }
}
