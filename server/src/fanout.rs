//! Chunk fan-out: for each chunk a device asks for, whether to publish it once on the
//! artifact's shared topic (every device downloading the artifact listens there), send it on
//! the device's own chunk topic, or not at all because a copy already published will reach
//! the device. No I/O; time is an argument.
//!
//! The broker delivers a publication only to the subscribers it has at that moment. A device
//! subscribes to the artifact topic before its first request, so every publication the
//! server makes after receiving a request from it reaches it: the device *joined* then.
//!
//! - A device downloading an artifact alone (no other device listening, none joined for
//!   [`JOIN_QUIET`]) gets its chunks on its own topic at once: there is nobody to gather for.
//! - The first ask for a chunk schedules its shared publication [`GATHER`] later. While
//!   devices keep joining it waits on, until [`JOIN_QUIET`] after the last join but no more
//!   than [`MAX_GATHER`] after the first ask: a wave's desired states reach thousands of
//!   devices over seconds, and every device that joins in time gets this one copy. Their
//!   asks meanwhile are skipped.
//! - A first ask for a chunk published after the device joined is skipped too (the copy is
//!   on its way, perhaps queued behind others at the broker).
//! - A device that joined after the last publication missed it. It gets the chunk on its own
//!   topic, until as many devices have joined since that publication as were listening when
//!   it was made: then publishing again costs no more than sending to each. (Like renting
//!   skis until the rent paid equals the price, this is never more than about twice the
//!   cheapest choice made in hindsight.)
//!
//! When the server publishes desired states naming an artifact, it says which devices it told
//! ([`Fanout::expect`]). Once every device told lately has joined, there is nobody left to
//! gather for: a device downloading alone gets its chunks at once from its first ask, and
//! shared publications go [`GATHER`] after their first ask without waiting for
//! [`JOIN_QUIET`]. Where nothing is known (a chunk replica, or desired states published before
//! a restart), the quiet time decides as above.
//!
//! A device that (re)subscribed says so in its next request ([`ChunkRequest::joined`]: its
//! first, or the first after a reconnect, which loses what the broker had queued for it):
//! it joins anew. A chunk asked again (the device's request timed out) is skipped while a
//! shared copy made after the device joined may still be queued for it at the broker (for
//! [`PATIENCE`]), and otherwise goes on the device's own topic. A device that does not
//! listen (an older agent, or one configured not to) gets everything on its own topic.
//!
//! State is per server: replicas sharing the chunk requests each publish what their share of
//! the requests asks for, so a chunk may be published once per replica.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use modelcast_proto::chunk::ChunkRequest;

/// Where one asked chunk goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// On the artifact's shared topic, once for every device listening, when it is due
    /// ([`Fanout::take_due`]): nothing to send now.
    Shared,
    /// On the asking device's own chunk topic, now.
    Direct,
    /// On the asking device's own chunk topic, now, and nobody else downloads the artifact:
    /// the device's window is all that is in flight for it (the caller may send without
    /// waiting for the broker's acknowledgements).
    Alone,
    /// Nowhere: a shared copy published after the device joined, or due, will reach it.
    Skip,
}

/// How long a scheduled shared publication waits after the last device joined (for the
/// other devices of a group, whose asks arrive within moments of each other).
pub const GATHER: Duration = Duration::from_millis(50);

/// A shared publication waits until no device joined for this long...
pub const JOIN_QUIET: Duration = Duration::from_millis(250);

/// ...but no longer than this from its first ask (devices wait this long for their first
/// chunk before asking again).
pub const MAX_GATHER: Duration = modelcast_proto::chunk::MAX_GATHER;

/// A listener that asked nothing for this long is forgotten (if it asks again it joins anew,
/// which is never wrong, only more cautious).
pub const LISTENER_IDLE: Duration = Duration::from_secs(60);

/// Listeners that asked within this long count as still listening when a chunk is
/// published (the cost of publishing it again).
pub const LISTENER_ACTIVE: Duration = Duration::from_secs(5);

/// How long a shared copy made after a device joined is trusted to reach it: a device that
/// asks for the chunk later than this gets its own copy (the broker may have dropped it).
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Most devices expected to join one artifact that are remembered at once (past it, the
/// quiet time decides).
const MAX_EXPECTED: usize = 100_000;

/// How often forgotten listeners and artifacts are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The fan-out state of every artifact being downloaded.
#[derive(Debug, Default)]
pub struct Fanout {
    artifacts: HashMap<String, Artifact>,
    /// Scheduled shared publications (when due, artifact, chunk), in the order they fall due.
    due: BTreeSet<(Instant, String, u32)>,
    swept: Option<Instant>,
}

#[derive(Debug, Default)]
struct Artifact {
    /// The join number the next device to join gets.
    next_join: u64,
    /// When the last device joined.
    joined_at: Option<Instant>,
    listeners: HashMap<String, Listener>,
    chunks: HashMap<u32, Shared>,
    /// Devices told to download the artifact that have not joined yet, with when they were
    /// told; forgotten [`MAX_GATHER`] later.
    expected: HashMap<String, Instant>,
    /// When a device was last told to download it.
    told_at: Option<Instant>,
    /// When a device was told that [`MAX_EXPECTED`] left untracked.
    overflowed_at: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Listener {
    joined: u64,
    asked: Instant,
}

/// A chunk's shared publication.
#[derive(Debug, Clone, Copy)]
enum Shared {
    /// Scheduled (first asked at `asked`): every device that joins before it is made gets
    /// it.
    Due { asked: Instant },
    /// Made at `at`: devices whose join number is below `joins` were listening,
    /// `listening` of them active.
    Made {
        joins: u64,
        listening: u64,
        at: Instant,
    },
}

impl Fanout {
    /// An empty plan.
    pub fn new() -> Self {
        Fanout::default()
    }

    /// Records that `device` was just told to download `artifact` (a desired state naming it
    /// was published): a device expected to join.
    pub fn expect(&mut self, now: Instant, artifact: &str, device: &str) {
        self.sweep(now);
        let a = self.artifacts.entry(artifact.to_string()).or_default();
        a.told_at = Some(now);
        if a.listeners.contains_key(device) {
            return;
        }
        if a.expected.len() >= MAX_EXPECTED && !a.expected.contains_key(device) {
            // Too many to track: who is still to join is not known (the quiet time decides).
            a.overflowed_at = Some(now);
            return;
        }
        a.expected.insert(device.to_string(), now);
    }

    /// Where each chunk of `request` goes, first asks then the ones asked again, in the
    /// request's order. The caller sends the [`Route::Direct`] ones now, and the shared ones
    /// when [`Fanout::take_due`] says (the request was checked: the device is entitled to the
    /// artifact).
    pub fn route(&mut self, now: Instant, request: &ChunkRequest) -> Vec<(u32, Route)> {
        self.sweep(now);
        let direct = |i: &u32| (*i, Route::Direct);
        if !request.shared {
            return request
                .chunks
                .iter()
                .chain(&request.again)
                .map(direct)
                .collect();
        }
        let artifact = self.artifacts.entry(request.artifact.clone()).or_default();
        let listener = match artifact.listeners.get_mut(&request.device) {
            Some(l) if !request.joined => {
                l.asked = now;
                *l
            }
            _ => {
                let l = Listener {
                    joined: artifact.next_join,
                    asked: now,
                };
                let gathering = artifact.gathering(now);
                artifact.next_join += 1;
                artifact.joined_at = Some(now);
                artifact.expected.remove(&request.device);
                artifact.listeners.insert(request.device.clone(), l);
                if gathering && !artifact.gathering(now) {
                    // The last device told has joined: what waited for it falls due now.
                    let waiting: Vec<_> = self
                        .due
                        .iter()
                        .filter(|(at, name, _)| *at > now && *name == request.artifact)
                        .cloned()
                        .collect();
                    for (at, name, index) in waiting {
                        self.due.remove(&(at, name.clone(), index));
                        let asked = match artifact.chunks.get(&index) {
                            Some(Shared::Due { asked }) => *asked,
                            _ => now,
                        };
                        self.due.insert(((asked + GATHER).max(now), name, index));
                    }
                }
                l
            }
        };
        let mut out = Vec::with_capacity(request.chunks.len() + request.again.len());
        let covered = |shared: Option<&Shared>| match shared {
            Some(Shared::Due { .. }) => true,
            Some(Shared::Made { joins, at, .. }) => {
                listener.joined < *joins && now.saturating_duration_since(*at) < PATIENCE
            }
            None => false,
        };
        // The only device downloading the artifact, and nobody else to gather for: waiting
        // would only slow it down (one device's 100 MB update took 2.3 s gathered, 0.5 s
        // sent at once). A device joining later gets the shared copies from then on.
        let alone = artifact.listeners.len() == 1 && !artifact.gathering(now);
        for &index in &request.chunks {
            let shared = artifact.chunks.get(&index);
            let route = match shared {
                _ if covered(shared) => Route::Skip,
                Some(Shared::Made {
                    joins, listening, ..
                }) if artifact.next_join - joins < *listening => Route::Direct,
                _ if alone => Route::Alone,
                _ => {
                    artifact.chunks.insert(index, Shared::Due { asked: now });
                    self.due
                        .insert((now + GATHER, request.artifact.clone(), index));
                    Route::Shared
                }
            };
            out.push((index, route));
        }
        for &index in &request.again {
            let route = if covered(artifact.chunks.get(&index)) {
                Route::Skip
            } else if alone {
                Route::Alone
            } else {
                Route::Direct
            };
            out.push((index, route));
        }
        out
    }

    /// When the next scheduled shared publication falls due.
    pub fn next_due(&self) -> Option<Instant> {
        self.due.first().map(|(at, ..)| *at)
    }

    /// The shared publications due by `now` (artifact, chunk index), recorded as made: the
    /// caller publishes each on the artifact's topic.
    pub fn take_due(&mut self, now: Instant) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        let mut later = Vec::new();
        while self.due.first().is_some_and(|(at, ..)| *at <= now) {
            let (_, name, index) = self.due.pop_first().expect("checked");
            let Some(artifact) = self.artifacts.get_mut(&name) else {
                continue; // Nobody listens any more.
            };
            let Some(Shared::Due { asked }) = artifact.chunks.get(&index) else {
                continue;
            };
            // Devices are still joining: wait for them, within the limit.
            let quiet = match artifact.gathering(now) {
                true => artifact.joined_at.map_or(now, |t| t + JOIN_QUIET),
                false => now,
            };
            let until = quiet.min(*asked + MAX_GATHER);
            if until > now {
                later.push((until, name, index));
                continue;
            }
            let made = Shared::Made {
                joins: artifact.next_join,
                listening: artifact.active(now),
                at: now,
            };
            artifact.chunks.insert(index, made);
            out.push((name, index));
        }
        self.due.extend(later);
        out
    }

    /// Devices listening on `artifact` now.
    #[cfg(test)]
    fn listeners(&self, artifact: &str) -> usize {
        self.artifacts
            .get(artifact)
            .map_or(0, |a| a.listeners.len())
    }

    /// Forgets listeners idle for [`LISTENER_IDLE`], and artifacts nobody listens to.
    fn sweep(&mut self, now: Instant) {
        if self
            .swept
            .is_some_and(|t| now.saturating_duration_since(t) < SWEEP_EVERY)
        {
            return;
        }
        self.swept = Some(now);
        self.artifacts.retain(|_, a| {
            a.listeners
                .retain(|_, l| now.saturating_duration_since(l.asked) < LISTENER_IDLE);
            a.expected
                .retain(|_, told| now.saturating_duration_since(*told) < MAX_GATHER);
            !a.listeners.is_empty() || !a.expected.is_empty()
        });
    }
}

impl Artifact {
    /// Whether devices may still be joining, so that a publication should wait for them:
    /// some told lately have not joined, or, where nobody was told lately (nothing known),
    /// one joined within [`JOIN_QUIET`].
    fn gathering(&self, now: Instant) -> bool {
        let lately = |t: Instant| now.saturating_duration_since(t) < MAX_GATHER;
        if self.told_at.is_some_and(lately) && !self.overflowed_at.is_some_and(lately) {
            return self.expected.values().any(|t| lately(*t));
        }
        self.joined_at
            .is_some_and(|t| now.saturating_duration_since(t) < JOIN_QUIET)
    }

    /// Listeners that asked within [`LISTENER_ACTIVE`].
    fn active(&self, now: Instant) -> u64 {
        self.listeners
            .values()
            .filter(|l| now.saturating_duration_since(l.asked) < LISTENER_ACTIVE)
            .count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn ask(device: &str, chunks: &[u32], again: &[u32]) -> ChunkRequest {
        ChunkRequest {
            format: modelcast_proto::FORMAT_VERSION,
            device: device.into(),
            artifact: "ab".repeat(32),
            chunks: chunks.to_vec(),
            again: again.to_vec(),
            shared: true,
            joined: false,
            zstd: false,
        }
    }

    fn routes(r: &[(u32, Route)]) -> Vec<Route> {
        r.iter().map(|(_, r)| *r).collect()
    }

    #[test]
    fn a_device_downloading_alone_gets_its_chunks_at_once_until_another_joins() {
        let mut f = Fanout::new();
        let t = Instant::now();
        // Its first asks are gathered: its group may be joining.
        assert_eq!(
            routes(&f.route(t, &ask("a", &[0], &[]))),
            vec![Route::Shared]
        );
        // Alone past the quiet time: sent at once.
        let later = t + JOIN_QUIET;
        assert_eq!(
            routes(&f.route(later, &ask("a", &[1, 2], &[]))),
            vec![Route::Alone, Route::Alone]
        );
        assert_eq!(f.take_due(later), vec![("ab".repeat(32), 0)]);
        // Another device joins: shared again, for both.
        let mut b = ask("b", &[3], &[]);
        b.joined = true;
        assert_eq!(routes(&f.route(later, &b)), vec![Route::Shared]);
        let much_later = later + JOIN_QUIET;
        assert_eq!(
            routes(&f.route(much_later, &ask("a", &[4], &[]))),
            vec![Route::Shared]
        );
    }

    #[test]
    fn a_device_told_alone_gets_its_chunks_at_once_from_its_first_ask() {
        let mut f = Fanout::new();
        let t = Instant::now();
        let sha = "ab".repeat(32);
        f.expect(t, &sha, "a");
        let mut first = ask("a", &[0, 1], &[]);
        first.joined = true;
        assert_eq!(
            routes(&f.route(t, &first)),
            vec![Route::Alone, Route::Alone]
        );
        assert_eq!(f.next_due(), None);
    }

    #[test]
    fn once_every_device_told_has_joined_publications_wait_no_quiet_time() {
        let mut f = Fanout::new();
        let t = Instant::now();
        let sha = "ab".repeat(32);
        for d in ["a", "b", "c"] {
            f.expect(t, &sha, d);
        }
        assert_eq!(
            routes(&f.route(t, &ask("a", &[0], &[]))),
            vec![Route::Shared]
        );
        let b_at = t + GATHER / 2;
        assert_eq!(
            routes(&f.route(b_at, &ask("b", &[0], &[]))),
            vec![Route::Skip]
        );
        // c has not joined: the quiet time after b's join holds.
        assert!(f.take_due(t + GATHER).is_empty());
        let c_at = t + GATHER;
        assert_eq!(
            routes(&f.route(c_at, &ask("c", &[0], &[]))),
            vec![Route::Skip]
        );
        // Everyone told is in: published at once, not JOIN_QUIET after c's join.
        assert_eq!(f.take_due(c_at), vec![(sha.clone(), 0)]);
        // A device told that never joins: the quiet time decides again, as when nothing is
        // known, until MAX_GATHER after it was told.
        f.expect(c_at, &sha, "d");
        assert_eq!(
            routes(&f.route(c_at, &ask("a", &[1], &[]))),
            vec![Route::Shared]
        );
        assert!(f.take_due(c_at + GATHER).is_empty());
        assert_eq!(f.take_due(c_at + JOIN_QUIET).len(), 1);
    }

    #[test]
    fn expected_devices_are_forgotten_and_bounded() {
        let mut f = Fanout::new();
        let t = Instant::now();
        let sha = "ab".repeat(32);
        f.expect(t, &sha, "late");
        // Nobody listens, but a device is expected: the artifact is kept...
        f.sweep(t + SWEEP_EVERY);
        assert!(f.artifacts.contains_key(&sha));
        // ...until MAX_GATHER after it was told.
        f.sweep(t + MAX_GATHER + SWEEP_EVERY);
        assert!(f.artifacts.is_empty());
        for i in 0..MAX_EXPECTED + 10 {
            f.expect(t, &sha, &format!("d{i}"));
        }
        assert_eq!(f.artifacts[&sha].expected.len(), MAX_EXPECTED);
        // Untracked devices told: who is still to join is unknown, the quiet time decides.
        assert_eq!(
            routes(&f.route(t, &ask("d0", &[0], &[]))),
            vec![Route::Shared]
        );
        let a = &f.artifacts[&sha];
        assert!(a.gathering(t));
        assert!(!a.gathering(t + JOIN_QUIET));
    }

    #[test]
    fn a_group_asking_together_gets_one_publication() {
        let mut f = Fanout::new();
        let t = Instant::now();
        let a = f.route(t, &ask("a", &[0, 1], &[]));
        assert_eq!(a, vec![(0, Route::Shared), (1, Route::Shared)]);
        assert_eq!(f.next_due(), Some(t + GATHER));
        // b asks before they fall due: it joined before the publication, so it gets it.
        let b = f.route(t + GATHER / 2, &ask("b", &[0, 1], &[]));
        assert_eq!(b, vec![(0, Route::Skip), (1, Route::Skip)]);
        assert!(f.take_due(t).is_empty());
        // b joined at GATHER / 2: the publication waits JOIN_QUIET after that.
        assert!(f.take_due(t + GATHER).is_empty());
        let sha = "ab".repeat(32);
        let made = t + GATHER / 2 + JOIN_QUIET;
        assert_eq!(f.take_due(made), vec![(sha.clone(), 0), (sha.clone(), 1)]);
        assert_eq!(f.next_due(), None);
        // c joins after it: it missed them, and sending to c alone is cheaper than to two.
        let c = f.route(made, &ask("c", &[0, 1], &[]));
        assert_eq!(routes(&c), vec![Route::Direct, Route::Direct]);
        // Chunk 2, first asked by c, is scheduled; a, already listening, gets it.
        assert_eq!(
            routes(&f.route(t, &ask("c", &[2], &[]))),
            vec![Route::Shared]
        );
        assert_eq!(routes(&f.route(t, &ask("a", &[2], &[]))), vec![Route::Skip]);
        assert_eq!(f.listeners(&sha), 3);
    }

    #[test]
    fn a_publication_waits_while_devices_keep_joining_within_a_limit() {
        let mut f = Fanout::new();
        let t = Instant::now();
        f.route(t, &ask("d0", &[0], &[]));
        // A device joins every 40 ms: the publication waits for them, up to MAX_GATHER.
        let mut at = t;
        let mut made = None;
        for i in 1..1000 {
            at += Duration::from_millis(40);
            if !f.take_due(at).is_empty() {
                made = Some(at);
                break;
            }
            assert_eq!(
                routes(&f.route(at, &ask(&format!("d{i}"), &[0], &[]))),
                vec![Route::Skip]
            );
        }
        let made = made.expect("published");
        assert!(made >= t + MAX_GATHER && made < t + MAX_GATHER + Duration::from_millis(100));
        // Once joins stop, the next one goes GATHER after its first ask.
        let t2 = made + Duration::from_secs(1);
        f.route(t2, &ask("d0", &[1], &[]));
        assert!(f.take_due(t2 + GATHER / 2).is_empty());
        assert_eq!(f.take_due(t2 + GATHER).len(), 1);
    }

    #[test]
    fn asked_again_waits_for_a_copy_on_its_way_unless_the_device_rejoined() {
        let mut f = Fanout::new();
        let t = Instant::now();
        f.route(t, &ask("a", &[0, 1], &[]));
        f.take_due(t + JOIN_QUIET);
        let t = t + JOIN_QUIET;
        // a timed out on 0: the shared copy made after it joined may still be queued.
        assert_eq!(f.route(t, &ask("a", &[], &[0])), vec![(0, Route::Skip)]);
        // Past the patience, it gets its own copy (alone: nobody else downloads).
        let late = t + PATIENCE;
        assert_eq!(f.route(late, &ask("a", &[], &[0])), vec![(0, Route::Alone)]);
        // After a reconnect (joined), what was queued is lost: its own copy at once.
        let mut rejoined = ask("a", &[], &[1]);
        rejoined.joined = true;
        assert_eq!(f.route(t, &rejoined), vec![(1, Route::Direct)]);
        // A chunk never published goes direct when asked again.
        assert_eq!(f.route(t, &ask("a", &[], &[7])), vec![(7, Route::Direct)]);
    }

    #[test]
    fn devices_that_do_not_listen_get_everything_direct() {
        let mut f = Fanout::new();
        let mut r = ask("old", &[0, 1], &[2]);
        r.shared = false;
        assert_eq!(routes(&f.route(Instant::now(), &r)), vec![Route::Direct; 3]);
        assert_eq!(f.listeners(&r.artifact), 0);
        assert_eq!(f.next_due(), None);
    }

    #[test]
    fn late_joiners_get_a_publication_again_once_they_outnumber_its_listeners() {
        let mut f = Fanout::new();
        let t = Instant::now();
        for d in ["a", "b", "c"] {
            f.route(t, &ask(d, &[0], &[]));
        }
        // Published to 3 active listeners.
        assert_eq!(f.take_due(t + JOIN_QUIET).len(), 1);
        let t = t + JOIN_QUIET;
        // The next two joiners get it direct; the third makes three: published again.
        assert_eq!(
            routes(&f.route(t, &ask("d", &[0], &[]))),
            vec![Route::Direct]
        );
        assert_eq!(
            routes(&f.route(t, &ask("e", &[0], &[]))),
            vec![Route::Direct]
        );
        assert_eq!(
            routes(&f.route(t, &ask("f", &[0], &[]))),
            vec![Route::Shared]
        );
        assert_eq!(routes(&f.route(t, &ask("g", &[0], &[]))), vec![Route::Skip]);
    }

    #[test]
    fn idle_listeners_and_artifacts_are_forgotten() {
        let mut f = Fanout::new();
        let t = Instant::now();
        f.route(t, &ask("a", &[0], &[]));
        f.take_due(t + JOIN_QUIET);
        let later = t + LISTENER_IDLE + Duration::from_secs(1);
        // a is forgotten: it joins anew, so the old publication is not trusted to reach it.
        assert_eq!(
            routes(&f.route(later, &ask("a", &[0], &[]))),
            vec![Route::Shared]
        );
        f.sweep(later + LISTENER_IDLE + SWEEP_EVERY);
        assert!(f.artifacts.is_empty());
        // A publication due for a forgotten artifact is dropped.
        assert!(f.take_due(later + LISTENER_IDLE * 3).is_empty());
    }

    proptest! {
        /// Against a model broker that delivers a shared publication to every device
        /// listening when it is made: whatever the order of joins, asks and publications, a
        /// skipped chunk always reaches its device, and no device gets a chunk it asks for
        /// the first time directly more than once.
        #[test]
        fn a_skipped_chunk_always_reaches_its_device(
            steps in proptest::collection::vec(
                (0u8..6, 0u32..6, any::<bool>(), any::<bool>(), 0u64..80, 0u8..4), 1..200),
        ) {
            let mut f = Fanout::new();
            let mut now = Instant::now();
            let mut listening: BTreeSet<String> = BTreeSet::new();
            // What each device has, and the shared copies it is owed (skipped, not yet made).
            let mut got: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
            let mut owed: BTreeSet<(String, u32)> = BTreeSet::new();
            let mut direct: BTreeMap<(String, u32), u32> = BTreeMap::new();
            let mut asked: BTreeSet<(String, u32)> = BTreeSet::new();
            let publish = |f: &mut Fanout, now, listening: &BTreeSet<String>,
                               got: &mut BTreeMap<String, BTreeSet<u32>>| {
                for (_, index) in f.take_due(now) {
                    for l in listening {
                        got.entry(l.clone()).or_default().insert(index);
                    }
                }
            };
            for (d, chunk, again, joined, ms, tell) in steps {
                now += Duration::from_millis(ms);
                publish(&mut f, now, &listening, &mut got);
                let device = format!("d{d}");
                // The server tells a device to download (one step in four).
                if tell == 0 {
                    f.expect(now, &"ab".repeat(32), &device);
                    continue;
                }
                // A device subscribes before its request reaches the server, and asks for a
                // chunk for the first time once.
                listening.insert(device.clone());
                let again = again || !asked.insert((device.clone(), chunk));
                let mut req = if again { ask(&device, &[], &[chunk]) } else { ask(&device, &[chunk], &[]) };
                // A reconnect: the device subscribed again (copies are delivered at once in
                // this model, so nothing owed is lost).
                req.joined = joined;
                for (index, route) in f.route(now, &req) {
                    match route {
                        Route::Shared | Route::Skip => {
                            owed.insert((device.clone(), index));
                        }
                        Route::Direct | Route::Alone => {
                            got.entry(device.clone()).or_default().insert(index);
                            if !again {
                                *direct.entry((device.clone(), index)).or_default() += 1;
                            }
                        }
                    }
                }
            }
            publish(&mut f, now + MAX_GATHER, &listening, &mut got);
            for (device, index) in owed {
                prop_assert!(
                    got.get(&device).is_some_and(|g| g.contains(&index)),
                    "{} was owed {} and never got it", device, index
                );
            }
            prop_assert!(direct.values().all(|n| *n <= 1));
        }
    }
}
