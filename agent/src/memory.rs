//! Memory: how much a model needs and how much the device has for it.
//!
//! A new version normally loads beside the serving one (A/B). On a small device it may not
//! fit: the manifest says what the model took when it was published
//! ([`Manifest::memory_bytes`], measured with [`peak_growth`]); the device reads what it has
//! ([`available`]: the kernel's `MemAvailable`, and the headroom under every memory cgroup
//! limit above the agent, v1 or v2), and [`plan`] decides: beside the serving model, or the
//! low-memory swap (unload, load, check, serve: `driver.rs`), or not at all. The parsers are
//! pure; the reads of `/proc` and `/sys` are at the edge.
//!
//! [`Manifest::memory_bytes`]: modelcast_proto::manifest::Manifest::memory_bytes

use std::path::{Path, PathBuf};

/// Headroom kept beyond what a model was measured to need: engines and allocators differ
/// between the publisher and the device.
pub const MARGIN_PERCENT: u64 = 20;

/// How a new version can be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Beside the serving model (the A/B swap), or nothing is known against it.
    Beside,
    /// It does not fit beside the serving model: serve nothing for the shortest time,
    /// unload, load, check, serve.
    LowMemory {
        /// What the model needs, bytes (with the margin).
        needed: u64,
        /// What the device has, bytes.
        available: u64,
    },
    /// It does not fit beside the serving model and the low-memory swap is off.
    Refuse {
        /// What the model needs, bytes (with the margin).
        needed: u64,
        /// What the device has, bytes.
        available: u64,
    },
    /// It does not fit even in the serving model's place (what that one was measured to take,
    /// freed): loading it would only end in the kernel's reclaim or its OOM killer.
    TooBig {
        /// What the model needs, bytes (with the margin).
        needed: u64,
        /// What the device would have with the serving model unloaded, bytes.
        available: u64,
    },
}

/// Where a version goes: beside the serving one when `needed` (the manifest's measure, if
/// any) plus [`MARGIN_PERCENT`] fits in `available` (if known) or when nothing serves to be
/// unloaded; else, if it fits once the serving model (measured to take `serving_needs`, if
/// known) is unloaded, the low-memory swap if `low_memory_swap` allows it.
pub fn plan(
    needed: Option<u64>,
    available: Option<u64>,
    serving: Option<Option<u64>>,
    low_memory_swap: bool,
) -> Plan {
    let (Some(needed), Some(available)) = (needed, available) else {
        return Plan::Beside;
    };
    let needed = needed.saturating_add(needed / 100 * MARGIN_PERCENT);
    let Some(serving_needs) = serving else {
        return Plan::Beside;
    };
    if needed <= available {
        return Plan::Beside;
    }
    if let Some(freed) = serving_needs {
        let in_its_place = available.saturating_add(freed);
        if needed > in_its_place {
            return Plan::TooBig {
                needed,
                available: in_its_place,
            };
        }
    }
    if low_memory_swap {
        Plan::LowMemory { needed, available }
    } else {
        Plan::Refuse { needed, available }
    }
}

/// Bytes as MiB, for messages.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The memory this process may still take: the least of the kernel's `MemAvailable` and, for
/// every memory cgroup above the agent with a limit, the limit less its working set (usage
/// less inactive file pages, which the kernel reclaims first). `None` when none is readable.
pub fn available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| mem_available(&t));
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let limited = cgroup_dirs(&cgroups, &mountinfo)
        .into_iter()
        .filter_map(|(dir, version)| headroom(&dir, version))
        .min();
    match (meminfo, limited) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The cgroup hierarchies' versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// cgroup v1, the `memory` controller's hierarchy.
    V1,
    /// cgroup v2, the unified hierarchy.
    V2,
}

/// `MemAvailable` of `/proc/meminfo`, bytes.
pub fn mem_available(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix("MemAvailable:")?;
        let kb: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
        kb.checked_mul(1024)
    })
}

/// The directories of the agent's memory cgroup and of each ancestor, with their version:
/// from `/proc/self/cgroup` (`N:memory:/path` for v1, `0::/path` for v2) and where
/// `/proc/self/mountinfo` says each hierarchy is mounted.
pub fn cgroup_dirs(cgroups: &str, mountinfo: &str) -> Vec<(PathBuf, CgroupVersion)> {
    let mut dirs = Vec::new();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let version = if controllers.is_empty() {
            CgroupVersion::V2
        } else if controllers.split(',').any(|c| c == "memory") {
            CgroupVersion::V1
        } else {
            continue;
        };
        let Some((root, mount)) = mount_of(mountinfo, version) else {
            continue;
        };
        // The cgroup and every ancestor up to the mount's root (a container's mount may
        // show a subtree: its root is left out of the path under the mount point).
        let path = match path.strip_prefix(root.as_str()) {
            Some(below) if root != "/" => below,
            _ => path,
        };
        let mut rel = Path::new(path.trim_start_matches('/')).to_path_buf();
        loop {
            if rel
                .components()
                .any(|c| c == std::path::Component::ParentDir)
            {
                break;
            }
            dirs.push((mount.join(&rel), version));
            if !rel.pop() {
                break;
            }
        }
    }
    dirs
}

/// Where the hierarchy of `version` is mounted, and the root of the hierarchy the mount
/// shows, by `/proc/self/mountinfo`'s lines (`id parent dev root mount-point … - fstype
/// source options`).
fn mount_of(mountinfo: &str, version: CgroupVersion) -> Option<(String, PathBuf)> {
    mountinfo.lines().find_map(|l| {
        let (before, after) = l.split_once(" - ")?;
        let mut after = after.split_whitespace();
        let fstype = after.next()?;
        let options = after.nth(1).unwrap_or("");
        let mut fields = before.split_whitespace();
        let root = fields.nth(3)?;
        let point = fields.next()?;
        let matches = match version {
            CgroupVersion::V2 => fstype == "cgroup2",
            CgroupVersion::V1 => fstype == "cgroup" && options.split(',').any(|o| o == "memory"),
        };
        matches.then(|| (root.to_string(), PathBuf::from(point)))
    })
}

/// A cgroup's limit less its working set, if it has a limit.
fn headroom(dir: &Path, version: CgroupVersion) -> Option<u64> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let (limit, usage, inactive) = match version {
        CgroupVersion::V2 => (
            read("memory.max")?,
            read("memory.current")?,
            stat_value(&read("memory.stat").unwrap_or_default(), "inactive_file"),
        ),
        CgroupVersion::V1 => (
            read("memory.limit_in_bytes")?,
            read("memory.usage_in_bytes")?,
            stat_value(
                &read("memory.stat").unwrap_or_default(),
                "total_inactive_file",
            ),
        ),
    };
    headroom_of(&limit, &usage, inactive)
}

/// The headroom under a cgroup `limit` (`max` or a v1 "no limit" of near 2^63: none) with
/// `usage` bytes charged, `inactive` of them reclaimable file pages.
pub fn headroom_of(limit: &str, usage: &str, inactive: Option<u64>) -> Option<u64> {
    let limit: u64 = limit.trim().parse().ok()?;
    if limit >= 1 << 62 {
        return None;
    }
    let usage: u64 = usage.trim().parse().ok()?;
    let working = usage.saturating_sub(inactive.unwrap_or(0));
    Some(limit.saturating_sub(working))
}

/// One `key value` line of a cgroup's `memory.stat`.
pub fn stat_value(stat: &str, key: &str) -> Option<u64> {
    stat.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

/// Runs `f` and says by how much this process's peak resident memory grew meanwhile
/// (`VmHWM` after, less `VmRSS` before, the peak reset first through `/proc/self/clear_refs`):
/// what a model takes to load and answer, measured at publishing. `None` where Linux's
/// counters are not there to read. Memory the allocator holds free is given back first, so
/// that reusing it does not hide growth; other threads' allocations count too: measure in a
/// process that does little else.
pub fn peak_growth<T>(f: impl FnOnce() -> T) -> (T, Option<u64>) {
    // Memory freed earlier and kept by the allocator would be reused unseen.
    crate::sys::release_free_memory();
    let status = || std::fs::read_to_string("/proc/self/status").ok();
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let before = status().and_then(|s| status_kb(&s, "VmRSS:"));
    let out = f();
    let peak = status().and_then(|s| status_kb(&s, "VmHWM:"));
    let grew = match (reset, before, peak) {
        (true, Some(before), Some(peak)) => Some(peak.saturating_sub(before)),
        _ => None,
    };
    (out, grew)
}

/// A `Key: N kB` line of `/proc/self/status`, bytes.
fn status_kb(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let kb: u64 = l
            .strip_prefix(key)?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()?;
        kb.checked_mul(1024)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn meminfo_and_cgroup_files_parse() {
        let meminfo = "MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(mem_available(meminfo), Some(2048 * 1024));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(headroom_of("max\n", "100", None), None);
        assert_eq!(headroom_of("9223372036854771712", "100", None), None);
        assert_eq!(headroom_of("1000", "600", Some(100)), Some(500));
        assert_eq!(headroom_of("1000", "1600", None), Some(0));
        let stat = "cache 10\ntotal_inactive_file 4096\ninactive_file 7\n";
        assert_eq!(stat_value(stat, "total_inactive_file"), Some(4096));
        assert_eq!(stat_value(stat, "inactive_file"), Some(7));
    }

    #[test]
    fn the_agents_cgroups_and_their_ancestors_are_found_in_either_version() {
        let mountinfo = "\
25 30 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw
31 25 0:27 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
38 25 0:34 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        let cgroups = "4:memory:/a/b\n1:cpu:/\n0::/c\n";
        let dirs = cgroup_dirs(cgroups, mountinfo);
        assert_eq!(
            dirs,
            vec![
                (
                    PathBuf::from("/sys/fs/cgroup/memory/a/b"),
                    CgroupVersion::V1
                ),
                (PathBuf::from("/sys/fs/cgroup/memory/a"), CgroupVersion::V1),
                (PathBuf::from("/sys/fs/cgroup/memory/"), CgroupVersion::V1),
                (PathBuf::from("/sys/fs/cgroup/unified/c"), CgroupVersion::V2),
                (PathBuf::from("/sys/fs/cgroup/unified/"), CgroupVersion::V2),
            ]
        );
        // A path that climbs out is not followed.
        assert!(cgroup_dirs("0::/../x\n", mountinfo).is_empty());
        // A container's mount of a subtree: the subtree is not repeated under it.
        let contained =
            "40 30 0:27 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(
            cgroup_dirs("4:memory:/docker/abc/app\n", contained)[0],
            (
                PathBuf::from("/sys/fs/cgroup/memory/app"),
                CgroupVersion::V1
            )
        );
    }

    #[test]
    fn a_model_goes_beside_when_it_fits_or_nothing_is_known() {
        let serving = Some(None);
        assert_eq!(plan(None, Some(1), serving, true), Plan::Beside);
        assert_eq!(plan(Some(100), None, serving, true), Plan::Beside);
        assert_eq!(plan(Some(100), Some(120), serving, true), Plan::Beside);
        assert_eq!(
            plan(Some(100), Some(119), serving, true),
            Plan::LowMemory {
                needed: 120,
                available: 119
            }
        );
        assert_eq!(
            plan(Some(100), Some(50), serving, false),
            Plan::Refuse {
                needed: 120,
                available: 50
            }
        );
        // Nothing serves: nothing to unload, so it loads as usual.
        assert_eq!(plan(Some(100), Some(50), None, false), Plan::Beside);
        // In the serving model's place: it fits once 80 are freed, not once 60 are.
        assert_eq!(
            plan(Some(100), Some(50), Some(Some(80)), true),
            Plan::LowMemory {
                needed: 120,
                available: 50
            }
        );
        assert_eq!(
            plan(Some(100), Some(50), Some(Some(60)), true),
            Plan::TooBig {
                needed: 120,
                available: 110
            }
        );
    }

    #[test]
    fn the_peak_of_a_large_allocation_is_seen() {
        let (len, grew) = peak_growth(|| {
            let v = vec![1u8; 64 << 20];
            std::hint::black_box(&v).len()
        });
        assert_eq!(len, 64 << 20);
        if let Some(grew) = grew {
            assert!(grew >= 60 << 20, "{grew}");
        }
    }

    proptest! {
        #[test]
        fn parsers_never_panic(text in ".{0,200}") {
            let _ = mem_available(&text);
            let _ = cgroup_dirs(&text, &text);
            let _ = stat_value(&text, "inactive_file");
            let _ = headroom_of(&text, &text, None);
        }
    }
}
