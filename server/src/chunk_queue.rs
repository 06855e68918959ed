//! Chunk requests waiting for the server to answer them: first come, first served, one entry
//! per device and artifact. A device that asks again while its request waits (it timed out)
//! has the new indices merged into the waiting entry, so a fleet that asks in bursts faster
//! than the broker takes chunks queues at most one entry per download instead of losing
//! requests, and the waiting entries cannot grow with repeats. No I/O.

use std::collections::{HashMap, VecDeque};

use modelcast_proto::chunk::ChunkRequest;

/// Most requests (downloads) a server keeps waiting: ten for each device of a fleet of
/// 10,000 downloading at once, a few megabytes.
pub const MAX_WAITING: usize = 100_000;

/// Most chunk indices one waiting entry holds (a device's window is far less; what a hostile
/// device adds past it is dropped: it asks again when its chunks do not come).
pub const MAX_INDICES: usize = 4096;

/// What became of a request pushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued at the back.
    Queued,
    /// Merged into the entry of the same device and artifact already waiting.
    Merged,
    /// Not queued: the queue holds its bound of entries.
    Full,
}

/// The waiting requests.
#[derive(Debug)]
pub struct ChunkQueue {
    order: VecDeque<(String, String)>,
    waiting: HashMap<(String, String), ChunkRequest>,
    bound: usize,
}

impl ChunkQueue {
    /// An empty queue of at most `bound` entries (downloads).
    pub fn new(bound: usize) -> Self {
        ChunkQueue {
            order: VecDeque::new(),
            waiting: HashMap::new(),
            bound: bound.max(1),
        }
    }

    /// Entries waiting.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Queues `req`, or merges it into the waiting entry of its device and artifact: indices
    /// not already there are added (a first ask stays a first ask), and a (re)subscription
    /// it reports is kept.
    pub fn push(&mut self, req: ChunkRequest) -> Pushed {
        let key = (req.device.clone(), req.artifact.clone());
        let (w, pushed) = match self.waiting.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => (e.into_mut(), Pushed::Merged),
            std::collections::hash_map::Entry::Vacant(e) => {
                if self.order.len() >= self.bound {
                    return Pushed::Full;
                }
                self.order.push_back(e.key().clone());
                let entry = ChunkRequest {
                    format: req.format,
                    device: req.device.clone(),
                    artifact: req.artifact.clone(),
                    chunks: Vec::new(),
                    again: Vec::new(),
                    shared: req.shared,
                    joined: req.joined,
                    zstd: req.zstd,
                };
                (e.insert(entry), Pushed::Queued)
            }
        };
        for i in req.chunks {
            if w.chunks.len() + w.again.len() >= MAX_INDICES {
                break;
            }
            if !w.chunks.contains(&i) {
                // A first ask wins over an ask again for the same chunk.
                w.again.retain(|a| *a != i);
                w.chunks.push(i);
            }
        }
        for i in req.again {
            if w.chunks.len() + w.again.len() >= MAX_INDICES {
                break;
            }
            if !w.chunks.contains(&i) && !w.again.contains(&i) {
                w.again.push(i);
            }
        }
        w.joined |= req.joined;
        w.shared = req.shared;
        w.zstd = req.zstd;
        pushed
    }

    /// The request that has waited longest.
    pub fn pop(&mut self) -> Option<ChunkRequest> {
        let key = self.order.pop_front()?;
        self.waiting.remove(&key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ask(device: &str, chunks: &[u32], again: &[u32]) -> ChunkRequest {
        ChunkRequest {
            format: modelcast_proto::FORMAT_VERSION,
            device: device.into(),
            artifact: "ab".repeat(32),
            chunks: chunks.to_vec(),
            again: again.to_vec(),
            shared: true,
            joined: false,
            zstd: true,
        }
    }

    #[test]
    fn requests_leave_in_order_and_a_device_asking_again_is_merged_into_its_place() {
        let mut q = ChunkQueue::new(10);
        assert_eq!(q.push(ask("a", &[0, 1], &[])), Pushed::Queued);
        assert_eq!(q.push(ask("b", &[0], &[])), Pushed::Queued);
        let mut again = ask("a", &[2], &[0, 1, 5]);
        again.joined = true;
        assert_eq!(q.push(again), Pushed::Merged);
        assert_eq!(q.len(), 2);
        let a = q.pop().unwrap();
        assert_eq!(
            (a.device.as_str(), a.chunks, a.again),
            ("a", vec![0, 1, 2], vec![5])
        );
        assert!(a.joined, "a (re)subscription is never forgotten");
        assert_eq!(q.pop().unwrap().device, "b");
        assert!(q.pop().is_none());
        // The same device on another artifact is another download.
        let mut other = ask("a", &[0], &[]);
        other.artifact = "cd".repeat(32);
        q.push(ask("a", &[0], &[]));
        assert_eq!(q.push(other), Pushed::Queued);
    }

    #[test]
    fn a_full_queue_refuses_new_downloads_but_still_merges() {
        let mut q = ChunkQueue::new(2);
        q.push(ask("a", &[0], &[]));
        q.push(ask("b", &[0], &[]));
        assert_eq!(q.push(ask("c", &[0], &[])), Pushed::Full);
        assert_eq!(q.push(ask("a", &[1], &[])), Pushed::Merged);
        assert_eq!(q.len(), 2);
    }

    proptest! {
        /// Whatever devices send, an entry never holds an index twice or more than
        /// MAX_INDICES, and nothing asked (within the bound) is lost.
        #[test]
        fn entries_stay_bounded_and_keep_what_was_asked(
            asks in proptest::collection::vec(
                (0u8..3, proptest::collection::vec(0u32..6000, 0..800), proptest::collection::vec(0u32..6000, 0..800)),
                1..12,
            )
        ) {
            let mut q = ChunkQueue::new(2);
            let mut asked: HashMap<String, std::collections::BTreeSet<u32>> = HashMap::new();
            for (d, chunks, again) in asks {
                let device = format!("d{d}");
                if q.push(ask(&device, &chunks, &again)) == Pushed::Full {
                    continue;
                }
                asked.entry(device).or_default().extend(chunks.iter().chain(&again));
            }
            while let Some(r) = q.pop() {
                let all: Vec<u32> = r.chunks.iter().chain(&r.again).copied().collect();
                let distinct: std::collections::BTreeSet<u32> = all.iter().copied().collect();
                prop_assert_eq!(distinct.len(), all.len(), "an index twice");
                prop_assert!(all.len() <= MAX_INDICES);
                let wanted = &asked[&r.device];
                prop_assert!(distinct.is_subset(wanted));
                if all.len() < MAX_INDICES {
                    prop_assert_eq!(&distinct, wanted, "an index lost below the bound");
                }
            }
        }
    }
}
