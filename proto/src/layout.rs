//! How an artifact is cut into chunks: its [`Layout`] (size, chunk size, the offsets where the
//! chunking restarts, one digest per chunk), the [`spans`] of its chunks, the checks of a
//! stated layout, and the digests a publisher computes. A chunk starts at each large tensor
//! ([`segments_at`]), so that a tensor that did not change between two versions has the same
//! chunks; [`crate::manifest`] states a layout for each file a device downloads.

use crate::manifest::MAX_ARTIFACT_BYTES;

/// One file of a download, in chunks: the artifact or its golden file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout<'a> {
    /// Hex SHA-256 of the whole file (its name on disk and on the wire).
    pub sha256: &'a str,
    /// Length in bytes.
    pub size: u64,
    /// Chunk size (the last chunk of each segment may be shorter).
    pub chunk_size: u32,
    /// Offsets at which the chunking restarts ([`crate::manifest::Manifest::segments`]); empty: none.
    pub segments: &'a [u64],
    /// Hex SHA-256 of every chunk.
    pub chunks: &'a [String],
}

impl Layout<'_> {
    /// Number of chunks.
    pub fn chunk_count(&self) -> u32 {
        self.chunks.len() as u32
    }

    /// Checks an artifact's layout as a manifest states it: its size in range, its segments,
    /// one chunk digest per chunk they make, every digest hex SHA-256.
    pub(crate) fn check(&self) -> Result<(), LayoutError> {
        if self.size == 0 || self.size > MAX_ARTIFACT_BYTES {
            return Err(LayoutError::Size(self.size));
        }
        check_segments(self.size, self.segments)?;
        if self.segments.len() >= self.chunks.len().max(1) {
            return Err(LayoutError::Segments {
                segments: self.segments.len(),
                chunks: self.chunks.len(),
            });
        }
        let expected = self.spans().take(self.chunks.len() + 1).count();
        if self.chunks.len() != expected {
            return Err(LayoutError::Digests {
                digests: self.chunks.len(),
                size: self.size,
                chunk_size: self.chunk_size,
                segments: self.segments.len(),
            });
        }
        for d in std::iter::once(self.sha256).chain(self.chunks.iter().map(String::as_str)) {
            if d.len() != 64 || !d.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(LayoutError::Digest(d.to_string()));
            }
        }
        Ok(())
    }

    /// Where chunk `index` lies in the file.
    pub fn span(&self, index: u32) -> Option<Span> {
        if index >= self.chunk_count() {
            return None;
        }
        let chunk = u64::from(self.chunk_size.max(1));
        let mut rest = u64::from(index);
        let mut start = 0;
        for end in self.segments.iter().copied().chain([self.size]) {
            let end = end.min(self.size);
            if end <= start {
                continue; // Not ascending: as `spans` does, skipped.
            }
            let count = (end - start).div_ceil(chunk);
            if rest < count {
                let offset = start + rest * chunk;
                return Some(Span {
                    offset,
                    len: (end - offset).min(chunk) as u32,
                });
            }
            rest -= count;
            start = end;
        }
        None
    }

    /// Exact length of chunk `index`.
    pub fn chunk_len(&self, index: u32) -> Option<u32> {
        self.span(index).map(|s| s.len)
    }

    /// Every chunk's place in the file, in order.
    pub fn spans(&self) -> Spans<'_> {
        spans(self.size, self.chunk_size, self.segments)
    }
}

/// Where one chunk lies in its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Offset of its first byte.
    pub offset: u64,
    /// Its length.
    pub len: u32,
}

/// The chunks of a file of `size` bytes: `chunk_size` long from the start and from each of
/// `segments` (ascending offsets inside the file), each segment's last chunk shorter.
pub fn spans(size: u64, chunk_size: u32, segments: &[u64]) -> Spans<'_> {
    Spans {
        size,
        chunk_size: u64::from(chunk_size.max(1)),
        segments,
        offset: 0,
    }
}

/// The iterator of [`spans`].
#[derive(Debug, Clone)]
pub struct Spans<'a> {
    size: u64,
    chunk_size: u64,
    segments: &'a [u64],
    offset: u64,
}

impl Iterator for Spans<'_> {
    type Item = Span;

    fn next(&mut self) -> Option<Span> {
        if self.offset >= self.size {
            return None;
        }
        while self.segments.first().is_some_and(|&s| s <= self.offset) {
            self.segments = &self.segments[1..];
        }
        let end = self
            .segments
            .first()
            .copied()
            .unwrap_or(self.size)
            .min(self.size);
        let len = (end - self.offset).min(self.chunk_size);
        let span = Span {
            offset: self.offset,
            len: len as u32,
        };
        self.offset += len;
        Some(span)
    }
}

/// Segment offsets that cannot describe a file's chunking.
/// An artifact's layout, as a manifest states it, that cannot be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// The size is 0 or past [`MAX_ARTIFACT_BYTES`].
    #[error("artifact size {0} out of range")]
    Size(u64),
    /// The segments do not fit the file.
    #[error(transparent)]
    Segment(#[from] SegmentError),
    /// More segments than chunks.
    #[error("{segments} segments for {chunks} chunks")]
    Segments {
        /// Segments stated.
        segments: usize,
        /// Chunk digests stated.
        chunks: usize,
    },
    /// Not one digest per chunk.
    #[error("{digests} chunk digests for {size} bytes in chunks of {chunk_size} and {segments} segments")]
    Digests {
        /// Digests stated.
        digests: usize,
        /// The file's size.
        size: u64,
        /// Its chunk size.
        chunk_size: u32,
        /// Its segments.
        segments: usize,
    },
    /// A digest that is not hex SHA-256.
    #[error("digest {0:?} is not hex SHA-256")]
    Digest(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    /// An offset not past the one before it (or 0).
    #[error(
        "segment offsets overlap or repeat: {at} after {after} (they must ascend from past 0)"
    )]
    Overlap {
        /// The offset.
        at: u64,
        /// The one before it (0 for the first).
        after: u64,
    },
    /// An offset at or past the end of the file.
    #[error("segment offset {at} is past the end of a file of {size} bytes")]
    PastEnd {
        /// The offset.
        at: u64,
        /// The file's length.
        size: u64,
    },
}

/// Checks segment offsets: ascending, each inside a file of `size` bytes and past its start.
pub fn check_segments(size: u64, segments: &[u64]) -> Result<(), SegmentError> {
    let mut last = 0;
    for &at in segments {
        if at <= last {
            return Err(SegmentError::Overlap { at, after: last });
        }
        if at >= size {
            return Err(SegmentError::PastEnd { at, size });
        }
        last = at;
    }
    Ok(())
}

/// Offsets at which a file's chunking restarts, chosen by the publisher from the file's
/// structure. A device can reuse a chunk it holds only at the same digest, so chunks that
/// start where a tensor starts stay identical when anything before the tensor changes size.
///
/// `starts` are the offsets of the tensors' first bytes (any order, duplicates allowed);
/// `min_segment` the least length of a tensor worth a segment of its own (smaller ones travel
/// with what precedes them: a chunk per tiny tensor costs more than it saves).
pub fn segments_at(size: u64, starts: &[(u64, u64)], min_segment: u64) -> Vec<u64> {
    let mut out: Vec<u64> = starts
        .iter()
        .filter(|&&(start, len)| len >= min_segment && start > 0 && start < size)
        .map(|&(start, _)| start)
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Splits `bytes` into chunks and returns their hex digests (for publishers and tests).
pub fn chunk_digests(bytes: &[u8], chunk_size: u32) -> Vec<String> {
    segmented_chunk_digests(bytes, chunk_size, &[])
}

/// The hex digests of `bytes`' chunks, restarting at `segments` ([`spans`]).
pub fn segmented_chunk_digests(bytes: &[u8], chunk_size: u32, segments: &[u64]) -> Vec<String> {
    spans(bytes.len() as u64, chunk_size, segments)
        .map(|s| crate::sha256_hex(&bytes[s.offset as usize..][..s.len as usize]))
        .collect()
}
