//! The chunk download of one artifact, as a state machine with no I/O.
//!
//! It decides which chunks to ask for (a bounded window in flight, timed-out requests asked
//! again), checks each arriving chunk against the manifest's digest and length, and says when
//! the artifact is complete. A chunk may arrive unasked (published once on the artifact's
//! shared topic for every device downloading it): it is stored like any other. A request
//! times out only when no chunk was stored for the timeout, so a slow but moving stream (a
//! broker serving thousands of devices) is not asked again. A download may be held to a
//! rate: a chunk is asked for only when a token bucket of its bytes allows. The caller stores
//! accepted chunks and sends the requests. Time is an argument; nothing here reads a clock.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use modelcast_proto::manifest::Manifest;
use thiserror::Error;

/// A chunk that must not be stored.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ChunkError {
    /// The index is past the artifact's end.
    #[error("chunk {index} is out of range ({count} chunks)")]
    OutOfRange {
        /// Index received.
        index: u32,
        /// Chunks in the artifact.
        count: u32,
    },
    /// Wrong length for this index.
    #[error("chunk {index} has {found} bytes, manifest says {expected}")]
    Length {
        /// Index.
        index: u32,
        /// Bytes received.
        found: usize,
        /// Bytes expected.
        expected: u32,
    },
    /// The bytes do not hash to the manifest's digest.
    #[error("chunk {index} does not match its signed digest")]
    Digest {
        /// Index.
        index: u32,
    },
    /// A compressed copy that does not inflate to the chunk: not a zstd frame, or longer
    /// than the manifest's length for it (a decompression bomb).
    #[error("compressed chunk {index} {reason}")]
    Inflate {
        /// Index.
        index: u32,
        /// What is wrong with it.
        reason: String,
    },
}

/// What to do with an arriving chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// New and valid: store it.
    Store,
    /// Already have it: drop it.
    Duplicate,
}

/// Download state of one artifact.
#[derive(Debug, Clone)]
pub struct Transfer {
    manifest: Manifest,
    have: Vec<bool>,
    missing: usize,
    in_flight: BTreeMap<u32, Instant>,
    /// Chunks asked for at least once (a second request is a re-fetch).
    asked: Vec<bool>,
    cursor: u32,
    window: usize,
    timeout: Duration,
    received_bytes: u64,
    refetched: u64,
    /// Slow-retrieval defence: how long the download may go without storing a chunk.
    stall_after: Duration,
    /// When the last chunk was stored (or the download started, or a stall was reported).
    progress_at: Option<Instant>,
    /// A chunk was stored since the last [`Transfer::poll_request`].
    progressed: bool,
    /// Time-outs in a row with nothing arriving: the timeout is doubled this many times.
    backoff: u32,
    /// How much longer than the timeout requests wait until the first chunk of the download
    /// arrives (a server gathering devices for a shared copy holds first asks).
    patience: Duration,
    /// A copy of a chunk of the download arrived (stored, or not).
    arrived: bool,
    /// The download's rate limit, if it has one.
    bucket: Option<Bucket>,
}

/// A token bucket of bytes: `rate` a second, holding at most `burst`.
#[derive(Debug, Clone)]
struct Bucket {
    rate: u64,
    burst: f64,
    tokens: f64,
    at: Option<Instant>,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        if let Some(at) = self.at {
            let secs = now.saturating_duration_since(at).as_secs_f64();
            self.tokens = (self.tokens + secs * self.rate as f64).min(self.burst);
        }
        self.at = Some(now);
    }

    /// Takes `bytes` if the bucket holds them.
    fn take(&mut self, bytes: u32) -> bool {
        if self.tokens + 1e-6 < f64::from(bytes) {
            return false;
        }
        self.tokens -= f64::from(bytes);
        true
    }

    /// When the bucket will hold `bytes` (once it was first filled).
    fn ready_at(&self, bytes: u32) -> Option<Instant> {
        let lack = (f64::from(bytes) - self.tokens).max(0.0);
        Some(self.at? + Duration::from_secs_f64(lack / self.rate as f64))
    }
}

/// Most doublings of the chunk timeout.
const MAX_BACKOFF: u32 = 3;

/// The chunks to ask for now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Asks {
    /// Asked for the first time.
    pub first: Vec<u32>,
    /// Asked before (timed out, or lost with the connection).
    pub again: Vec<u32>,
}

impl Asks {
    /// Nothing to ask.
    pub fn is_empty(&self) -> bool {
        self.first.is_empty() && self.again.is_empty()
    }
}

/// Length of download chunk `index` (of the artifact or, after it, the golden file).
fn chunk_len(manifest: &Manifest, index: u32) -> Option<u32> {
    let (part, local) = manifest.locate(index)?;
    part.chunk_len(local)
}

/// Default for [`Transfer::with_stall_deadline`].
pub const DEFAULT_STALL: Duration = Duration::from_secs(60);

impl Transfer {
    /// Starts (or resumes) a download, given which chunks are already stored.
    pub fn new(manifest: Manifest, have: Vec<bool>, window: usize, timeout: Duration) -> Self {
        let mut have = have;
        have.resize(manifest.download_chunk_count() as usize, false);
        let received_bytes = have
            .iter()
            .enumerate()
            .filter(|(_, h)| **h)
            .filter_map(|(i, _)| chunk_len(&manifest, i as u32))
            .map(u64::from)
            .sum();
        Transfer {
            missing: have.iter().filter(|h| !**h).count(),
            asked: vec![false; have.len()],
            have,
            manifest,
            in_flight: BTreeMap::new(),
            cursor: 0,
            window: window.max(1),
            timeout,
            received_bytes,
            refetched: 0,
            stall_after: DEFAULT_STALL,
            progress_at: None,
            progressed: false,
            backoff: 0,
            patience: Duration::ZERO,
            arrived: false,
            bucket: None,
        }
    }

    /// Waits `patience` longer than the timeout for the first chunk to arrive (see
    /// [`modelcast_proto::chunk::MAX_GATHER`]).
    pub fn with_first_patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// How long a request waits now before it is asked again.
    fn current_timeout(&self) -> Duration {
        let base = match self.arrived {
            true => self.timeout,
            false => self.timeout + self.patience,
        };
        base * (1 << self.backoff)
    }

    /// Holds the download to `rate` bytes a second (none: as fast as chunks come). The
    /// bucket holds a second of it, or one chunk if more, and starts with one chunk's worth;
    /// the stall deadline stretches to three chunks' time at that rate. Changing the rate
    /// keeps what the bucket holds.
    pub fn set_rate(&mut self, rate: Option<u64>) {
        let Some(rate) = rate.filter(|r| *r > 0) else {
            self.bucket = None;
            return;
        };
        let chunk = f64::from(self.manifest.chunk_size);
        if let Some(b) = &mut self.bucket {
            b.rate = rate;
            b.burst = chunk.max(rate as f64);
            return;
        }
        self.bucket = Some(Bucket {
            rate,
            burst: chunk.max(rate as f64),
            tokens: chunk,
            at: None,
        });
        let slow = Duration::from_secs_f64(3.0 * chunk / rate as f64);
        self.stall_after = self.stall_after.max(slow);
    }

    /// Stops asking for chunks for now (the download is paused): requests in flight are
    /// forgotten, and the stall clock starts again when it resumes.
    pub fn pause(&mut self) {
        self.in_flight.clear();
        self.progress_at = None;
    }

    /// Sets how long the download may go without a stored chunk before
    /// [`Transfer::poll_stalled`] reports it (the slow-retrieval defence).
    pub fn with_stall_deadline(mut self, stall_after: Duration) -> Self {
        self.stall_after = stall_after.max(Duration::from_millis(1));
        self
    }

    /// Reports a stall once per stall period: `Some(idle time)` when no chunk was stored for
    /// the stall deadline. The download goes on; the caller reports it.
    pub fn poll_stalled(&mut self, now: Instant) -> Option<Duration> {
        let since = *self.progress_at.get_or_insert(now);
        let idle = now.saturating_duration_since(since);
        if self.is_complete() || idle < self.stall_after {
            return None;
        }
        self.progress_at = Some(now);
        Some(idle)
    }

    /// The manifest's length of download chunk `index`, if the download has one.
    pub fn chunk_len(&self, index: u32) -> Option<u32> {
        chunk_len(&self.manifest, index)
    }

    /// The manifest being fetched.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Whether every chunk is stored.
    pub fn is_complete(&self) -> bool {
        self.missing == 0
    }

    /// Bytes stored so far.
    pub fn received_bytes(&self) -> u64 {
        self.received_bytes
    }

    /// Chunk requests that asked again for a chunk asked for before (timed out, or lost with
    /// the connection): a measure of waste.
    #[cfg(test)]
    pub fn refetched_chunks(&self) -> u64 {
        self.refetched
    }

    /// Forgets what is in flight (the link dropped: those requests are lost).
    pub fn handle_disconnect(&mut self) {
        self.in_flight.clear();
    }

    /// A copy of a chunk arrived, whatever it holds (a damaged or undecodable one too):
    /// something answers, so a congested link is not the problem (no more backing off) and
    /// no server is holding the first asks any more.
    pub fn answered(&mut self) {
        self.backoff = 0;
        self.arrived = true;
    }

    /// Checks an arriving chunk.
    #[cfg(test)]
    pub fn handle_chunk(&mut self, index: u32, data: &[u8]) -> Result<Accepted, ChunkError> {
        self.handle_copy(index, data.len(), || modelcast_proto::sha256_hex(data))
    }

    /// Checks an arriving copy of chunk `index` by its length and its SHA-256 (hex), which
    /// `sha256` computes only if the copy is not a duplicate (a caller that already hashed
    /// the same bytes gives that digest).
    pub fn handle_copy(
        &mut self,
        index: u32,
        len: usize,
        sha256: impl FnOnce() -> String,
    ) -> Result<Accepted, ChunkError> {
        let count = self.manifest.download_chunk_count();
        let (part, local) = self
            .manifest
            .locate(index)
            .ok_or(ChunkError::OutOfRange { index, count })?;
        let expected = part
            .chunk_len(local)
            .ok_or(ChunkError::OutOfRange { index, count })?;
        // Something answers (see [`Transfer::answered`]; `part` borrows the manifest).
        self.backoff = 0;
        self.arrived = true;
        if self.have[index as usize] {
            self.in_flight.remove(&index);
            return Ok(Accepted::Duplicate);
        }
        if len != expected as usize {
            return Err(ChunkError::Length {
                index,
                found: len,
                expected,
            });
        }
        if sha256() != part.chunks[local as usize] {
            return Err(ChunkError::Digest { index });
        }
        Ok(Accepted::Store)
    }

    /// Records that a chunk accepted by [`Transfer::handle_chunk`] is now stored.
    pub fn handle_stored(&mut self, index: u32) {
        self.in_flight.remove(&index);
        self.arrived = true;
        if let Some(h) = self.have.get_mut(index as usize) {
            if !*h {
                *h = true;
                self.progressed = true;
                self.missing -= 1;
                self.received_bytes += u64::from(chunk_len(&self.manifest, index).unwrap_or(0));
            }
        }
    }

    /// The chunks to request now: timed-out ones again, then new ones up to the window once
    /// half of it is free. A request in flight times out when neither it nor any stored
    /// chunk is as recent as the timeout; the timeout doubles with each time-out in a row
    /// with no chunk arriving (up to 8 times), as a congested broker needs. Until the first
    /// chunk arrives, it is longer by the patience ([`Transfer::with_first_patience`]).
    pub fn poll_request(&mut self, now: Instant) -> Asks {
        if self.progressed || self.progress_at.is_none() {
            self.progress_at = Some(now);
            self.progressed = false;
            self.backoff = 0;
        }
        let progress_at = self.progress_at.unwrap_or(now);
        let timeout = self.current_timeout();
        if let Some(b) = &mut self.bucket {
            b.refill(now);
        }
        let mut out = Vec::new();
        for (index, sent) in self.in_flight.iter_mut() {
            if now.saturating_duration_since((*sent).max(progress_at)) >= timeout {
                // Asked again within the rate too; what it cannot afford waits, still due.
                let len = chunk_len(&self.manifest, *index).unwrap_or(0);
                if self.bucket.as_mut().is_some_and(|b| !b.take(len)) {
                    break;
                }
                *sent = now;
                out.push(*index);
            }
        }
        if !out.is_empty() {
            self.backoff = (self.backoff + 1).min(MAX_BACKOFF);
        }
        // The window refills once half of it has arrived: one request for many chunks rather
        // than one per chunk (each costs the broker and the server a message).
        let refill = self.in_flight.len() <= self.window / 2;
        let count = self.manifest.download_chunk_count();
        let mut scanned = 0;
        while refill && self.in_flight.len() < self.window && self.missing > self.in_flight.len() {
            if scanned > count {
                break;
            }
            let index = self.cursor;
            self.cursor = (self.cursor + 1) % count.max(1);
            scanned += 1;
            if !self.have[index as usize] && !self.in_flight.contains_key(&index) {
                let len = chunk_len(&self.manifest, index).unwrap_or(0);
                if self.bucket.as_mut().is_some_and(|b| !b.take(len)) {
                    // Over the rate: this chunk is the next one asked for.
                    self.cursor = index;
                    break;
                }
                self.in_flight.insert(index, now);
                out.push(index);
            }
        }
        let mut asks = Asks::default();
        for index in out {
            let asked = &mut self.asked[index as usize];
            if *asked {
                self.refetched += 1;
                asks.again.push(index);
            } else {
                asks.first.push(index);
            }
            *asked = true;
        }
        asks
    }

    /// When the earliest request in flight times out, or the stall deadline passes.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let stall = self.progress_at.map(|t| t + self.stall_after);
        let timeout = self.current_timeout();
        let retry = self.in_flight.values().min().map(|t| {
            let since = match self.progress_at {
                Some(p) => (*t).max(p),
                None => *t,
            };
            since + timeout
        });
        // Held to a rate: nothing is asked (again) before the bucket affords a chunk.
        let afford = self
            .bucket
            .as_ref()
            .and_then(|b| b.ready_at(self.manifest.chunk_size));
        let retry = match (retry, afford) {
            (Some(r), Some(a)) => Some(r.max(a)),
            (r, _) => r,
        };
        let ask = afford.filter(|_| self.missing > self.in_flight.len());
        [retry, stall, ask].into_iter().flatten().min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn manifest(bytes: &[u8], chunk: u32) -> Manifest {
        modelcast_proto::verify::fixture::manifest("m", 1, bytes, chunk)
    }

    fn first(chunks: &[u32]) -> Asks {
        Asks {
            first: chunks.to_vec(),
            again: vec![],
        }
    }

    fn again(chunks: &[u32]) -> Asks {
        Asks {
            first: vec![],
            again: chunks.to_vec(),
        }
    }

    #[test]
    fn the_golden_file_downloads_after_the_artifact_in_one_numbering() {
        let artifact: Vec<u8> = (0..100).collect();
        let golden = b"[golden vectors, forty-five bytes of them...]".to_vec();
        let mut m = manifest(&artifact, 32);
        m.golden_file = Some(modelcast_proto::manifest::Attachment::of(&golden, 32));
        // 4 chunks of artifact, 2 of golden file.
        let mut t = Transfer::new(m.clone(), vec![], 16, Duration::from_secs(5));
        let now = Instant::now();
        assert_eq!(t.poll_request(now), first(&[0, 1, 2, 3, 4, 5]));
        assert_eq!(t.handle_chunk(4, &golden[..32]), Ok(Accepted::Store));
        assert_eq!(t.handle_chunk(5, &golden[32..]), Ok(Accepted::Store));
        // The golden part's digests, not the artifact's.
        assert_eq!(
            t.handle_chunk(4, &artifact[..32]),
            Err(ChunkError::Digest { index: 4 })
        );
        assert!(matches!(
            t.handle_chunk(5, &golden[..20]),
            Err(ChunkError::Length { .. })
        ));
        assert!(matches!(
            t.handle_chunk(6, b"x"),
            Err(ChunkError::OutOfRange { index: 6, count: 6 })
        ));
        for (i, c) in artifact.chunks(32).enumerate() {
            assert_eq!(t.handle_chunk(i as u32, c), Ok(Accepted::Store));
            t.handle_stored(i as u32);
        }
        assert!(!t.is_complete());
        t.handle_stored(4);
        t.handle_stored(5);
        assert!(t.is_complete());
        assert_eq!(t.received_bytes(), 100 + golden.len() as u64);
    }

    #[test]
    fn a_moving_stream_holds_off_timeouts_and_unasked_chunks_are_kept() {
        let bytes: Vec<u8> = (0..100).collect();
        let mut t = Transfer::new(manifest(&bytes, 10), vec![], 2, Duration::from_secs(5));
        let t0 = Instant::now();
        assert_eq!(t.poll_request(t0), first(&[0, 1]));
        // Chunk 7 arrives unasked (published for another device): stored, never asked.
        assert_eq!(t.handle_chunk(7, &bytes[70..80]), Ok(Accepted::Store));
        t.handle_stored(7);
        let t4 = t0 + Duration::from_secs(4);
        assert!(t.poll_request(t4).is_empty());
        // Six seconds after the asks, but only two after the last stored chunk: no re-ask.
        let t6 = t0 + Duration::from_secs(6);
        assert!(t.poll_request(t6).is_empty());
        assert_eq!(t.poll_timeout(), Some(t4 + Duration::from_secs(5)));
        let t9 = t4 + Duration::from_secs(5);
        assert_eq!(t.poll_request(t9), again(&[0, 1]));
        // No chunk since: the next time-out comes twice as late.
        assert_eq!(t.poll_timeout(), Some(t9 + Duration::from_secs(10)));
        assert!(t.poll_request(t9 + Duration::from_secs(9)).is_empty());
        for i in [0u32, 1] {
            let at = 10 * i as usize;
            assert_eq!(t.handle_chunk(i, &bytes[at..at + 10]), Ok(Accepted::Store));
            t.handle_stored(i);
        }
        let asks = t.poll_request(t6 + Duration::from_secs(4));
        assert_eq!(asks, first(&[2, 3]), "7 is never asked");
        assert_eq!(t.refetched_chunks(), 2);
    }

    #[test]
    fn window_bounds_requests_and_timeouts_repeat_them() {
        let bytes = vec![7u8; 100];
        let mut t = Transfer::new(manifest(&bytes, 10), vec![], 3, Duration::from_secs(5));
        let t0 = Instant::now();
        assert_eq!(t.poll_request(t0), first(&[0, 1, 2]));
        assert!(t.poll_request(t0).is_empty());
        assert_eq!(t.handle_chunk(1, &bytes[10..20]), Ok(Accepted::Store));
        t.handle_stored(1);
        // Two of three still in flight: the window waits until half of it is free.
        assert!(t.poll_request(t0).is_empty());
        assert_eq!(t.handle_chunk(0, &bytes[..10]), Ok(Accepted::Store));
        t.handle_stored(0);
        assert_eq!(t.poll_request(t0), first(&[3, 4]));
        assert_eq!(t.poll_timeout(), Some(t0 + Duration::from_secs(5)));
        let later = t0 + Duration::from_secs(6);
        assert_eq!(t.poll_request(later), again(&[2, 3, 4]));
        assert_eq!(t.refetched_chunks(), 3);
    }

    #[test]
    fn the_first_chunk_is_waited_for_longer_then_the_timeout_is_as_configured() {
        let bytes = vec![7u8; 40];
        let timeout = Duration::from_secs(5);
        let patience = modelcast_proto::chunk::MAX_GATHER;
        let mut t =
            Transfer::new(manifest(&bytes, 10), vec![], 2, timeout).with_first_patience(patience);
        let t0 = Instant::now();
        assert_eq!(t.poll_request(t0), first(&[0, 1]));
        // A server gathering a shared copy holds the first asks: no ask again meanwhile.
        assert_eq!(t.poll_timeout(), Some(t0 + timeout + patience));
        assert!(t
            .poll_request(t0 + timeout + Duration::from_secs(1))
            .is_empty());
        let t1 = t0 + timeout + patience;
        assert_eq!(t.poll_request(t1), again(&[0, 1]));
        // Once a chunk came, the plain timeout applies.
        assert_eq!(t.handle_chunk(0, &bytes[..10]), Ok(Accepted::Store));
        t.handle_stored(0);
        assert_eq!(t.poll_request(t1), first(&[2]));
        assert_eq!(t.poll_timeout(), Some(t1 + timeout));
    }

    #[test]
    fn requests_lost_with_the_connection_are_asked_again_once() {
        let bytes: Vec<u8> = (0..60).collect();
        let t0 = Instant::now();
        let mut t = Transfer::new(manifest(&bytes, 10), vec![], 2, Duration::from_secs(5));
        assert_eq!(t.poll_request(t0), first(&[0, 1]));
        assert_eq!(t.handle_chunk(0, &bytes[..10]), Ok(Accepted::Store));
        t.handle_stored(0);
        t.handle_disconnect();
        // Chunk 1 was lost with the link: asked again (once), after the new ones in the window.
        assert_eq!(t.poll_request(t0), first(&[2, 3]));
        for i in [2u32, 3, 4, 5] {
            let at = 10 * i as usize;
            if i == 4 {
                assert_eq!(t.poll_request(t0), first(&[4, 5]));
            }
            assert_eq!(t.handle_chunk(i, &bytes[at..at + 10]), Ok(Accepted::Store));
            t.handle_stored(i);
        }
        assert_eq!(t.poll_request(t0), again(&[1]));
        assert_eq!(t.refetched_chunks(), 1);
        // A late copy of a stored chunk is a duplicate, not a second store.
        assert_eq!(t.handle_chunk(2, &bytes[20..30]), Ok(Accepted::Duplicate));
    }

    #[test]
    fn a_download_without_progress_is_reported_once_per_period() {
        let bytes = vec![7u8; 30];
        let mut t = Transfer::new(manifest(&bytes, 10), vec![], 3, Duration::from_secs(5))
            .with_stall_deadline(Duration::from_secs(20));
        let t0 = Instant::now();
        assert_eq!(t.poll_request(t0), first(&[0, 1, 2]));
        assert_eq!(t.poll_stalled(t0 + Duration::from_secs(19)), None);
        assert_eq!(t.handle_chunk(0, &bytes[..10]), Ok(Accepted::Store));
        t.handle_stored(0);
        let t1 = t0 + Duration::from_secs(15);
        t.poll_request(t1); // Progress noticed: the clock restarts at t1.
        assert_eq!(t.poll_stalled(t0 + Duration::from_secs(30)), None);
        let stalled = t1 + Duration::from_secs(21);
        assert_eq!(t.poll_stalled(stalled), Some(Duration::from_secs(21)));
        assert_eq!(t.poll_stalled(stalled + Duration::from_secs(1)), None);
        assert!(t.poll_timeout().unwrap() <= stalled + Duration::from_secs(20));
    }

    #[test]
    fn bad_chunks_are_rejected() {
        let bytes = vec![7u8; 25];
        let mut t = Transfer::new(manifest(&bytes, 10), vec![], 3, Duration::from_secs(5));
        assert!(matches!(
            t.handle_chunk(9, &[]),
            Err(ChunkError::OutOfRange { .. })
        ));
        assert!(matches!(
            t.handle_chunk(2, &[7; 10]),
            Err(ChunkError::Length { .. })
        ));
        assert!(matches!(
            t.handle_chunk(0, &[8; 10]),
            Err(ChunkError::Digest { .. })
        ));
        assert_eq!(t.handle_chunk(2, &[7; 5]), Ok(Accepted::Store));
    }

    #[test]
    fn resume_requests_only_missing_chunks() {
        let bytes = vec![1u8; 50];
        let have = vec![true, false, true, false, true];
        let mut t = Transfer::new(manifest(&bytes, 10), have, 8, Duration::from_secs(5));
        assert_eq!(t.received_bytes(), 30);
        assert_eq!(t.poll_request(Instant::now()), first(&[1, 3]));
    }

    #[test]
    fn a_rate_paces_the_requests_and_a_pause_forgets_what_was_in_flight() {
        // 64 chunks of 32 bytes at 64 bytes a second: the bucket starts with one chunk.
        let artifact: Vec<u8> = (0..2048u32).map(|i| i as u8).collect();
        let m = manifest(&artifact, 32);
        let mut t = Transfer::new(m, vec![], 16, Duration::from_secs(60));
        t.set_rate(Some(64));
        let start = Instant::now();
        assert_eq!(t.poll_request(start), first(&[0]));
        let second = start + Duration::from_millis(499);
        assert_eq!(
            t.poll_request(second),
            Asks::default(),
            "32 bytes take half a second"
        );
        assert_eq!(t.poll_timeout(), Some(start + Duration::from_millis(500)));
        assert_eq!(
            t.poll_request(start + Duration::from_millis(500)),
            first(&[1])
        );
        // Until 10.5 s: the first chunk, then the rate's 64 bytes a second.
        let mut asked = 2;
        for ms in (600..=10_500).step_by(100) {
            let asks = t.poll_request(start + Duration::from_millis(ms));
            for i in asks.first {
                t.handle_chunk(i, &artifact[i as usize * 32..][..32])
                    .unwrap();
                t.handle_stored(i);
                asked += 1;
            }
        }
        assert_eq!(asked * 32, 32 + 64 * 21 / 2, "{asked} chunks");
        // Paused: nothing in flight, and the stall clock starts again on resuming.
        t.pause();
        let later = start + Duration::from_secs(100);
        assert_eq!(t.poll_stalled(later), None);
        assert!(!t.poll_request(later).first.is_empty());
        // No rate: as fast as the window allows.
        t.set_rate(None);
        assert!(t.poll_request(later).first.len() > 1);
    }

    proptest! {
        /// Whatever order chunks arrive in, with duplicates, the transfer completes exactly
        /// when every chunk is stored, never exceeds its window, and counts bytes right.
        #[test]
        fn completes_under_any_arrival_order(
            len in 1usize..300,
            chunk in 1u32..40,
            window in 1usize..6,
            picks in proptest::collection::vec(any::<u16>(), 0..400),
        ) {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let m = manifest(&bytes, chunk);
            let count = m.chunk_count();
            let mut t = Transfer::new(m, vec![], window, Duration::from_secs(1));
            let now = Instant::now();
            let mut outstanding: Vec<u32> = Vec::new();
            for p in picks {
                let asks = t.poll_request(now);
                outstanding.extend(asks.first.into_iter().chain(asks.again));
                prop_assert!(outstanding.len() <= window);
                if outstanding.is_empty() { break; }
                let i = outstanding.remove(p as usize % outstanding.len());
                let s = (i * chunk) as usize;
                let data = &bytes[s..(s + chunk as usize).min(len)];
                if t.handle_chunk(i, data).unwrap() == Accepted::Store {
                    t.handle_stored(i);
                }
            }
            while !t.is_complete() {
                let asks = t.poll_request(now);
                outstanding.extend(asks.first.into_iter().chain(asks.again));
                let i = outstanding.pop().unwrap();
                let s = (i * chunk) as usize;
                if t.handle_chunk(i, &bytes[s..(s + chunk as usize).min(len)]).unwrap() == Accepted::Store {
                    t.handle_stored(i);
                }
            }
            prop_assert_eq!(t.received_bytes(), len as u64);
            prop_assert!(count > 0);
        }
    }
}
