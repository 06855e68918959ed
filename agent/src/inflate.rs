//! Compressed chunk replies ([`modelcast_proto::chunk::Encoding`]) inflated back to the chunk,
//! never past the length the signed manifest gives it: a reply that would (a decompression
//! bomb), or that is not a zstd frame, is an error, and the caller counts it as a bad copy.
//! Memory is bounded before anything is decoded: the frame's window (the decoder's buffer) may
//! be no larger than a chunk may be.

use std::borrow::Cow;
use std::io::Read;

use modelcast_proto::chunk::{ungroup4, Encoding};
use modelcast_proto::manifest::MAX_CHUNK_SIZE;

/// Why a compressed copy did not inflate to a chunk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// It would inflate past the chunk's length.
    #[error("inflates past its {limit} bytes")]
    TooLong {
        /// The chunk's length in the manifest.
        limit: u32,
    },
    /// Its frame asks for a larger window than any chunk needs.
    #[error("asks for a {window}-byte window (at most {MAX_CHUNK_SIZE})")]
    Window {
        /// The window asked for.
        window: u64,
    },
    /// Not a zstd frame.
    #[error("is not a zstd frame: {0}")]
    Corrupt(String),
}

/// The chunk a reply encoded with `encoding` carries, inflated to at most `limit` bytes (the
/// manifest's length for it; the digest check that follows decides the rest).
pub fn inflate(encoding: Encoding, data: &[u8], limit: u32) -> Result<Cow<'_, [u8]>, InflateError> {
    if encoding == Encoding::Raw {
        return Ok(Cow::Borrowed(data));
    }
    let window = window_size(data).ok_or_else(|| InflateError::Corrupt("bad header".into()))?;
    if window > u64::from(MAX_CHUNK_SIZE) {
        return Err(InflateError::Window { window });
    }
    let mut decoder = ruzstd::decoding::StreamingDecoder::new(data)
        .map_err(|e| InflateError::Corrupt(e.to_string()))?;
    let mut out = Vec::with_capacity(limit as usize);
    (&mut decoder)
        .take(u64::from(limit) + 1)
        .read_to_end(&mut out)
        .map_err(|e| InflateError::Corrupt(e.to_string()))?;
    if out.len() > limit as usize {
        return Err(InflateError::TooLong { limit });
    }
    Ok(Cow::Owned(match encoding {
        Encoding::ZstdGrouped4 => ungroup4(&out),
        _ => out,
    }))
}

/// The window size a zstd frame's header asks for (RFC 8878, 3.1.1.1): the window
/// descriptor's, or for a single-segment frame its content size. `None` if the header is
/// cut short or not a zstd frame's.
fn window_size(frame: &[u8]) -> Option<u64> {
    const MAGIC: u32 = 0xFD2F_B528;
    let magic = u32::from_le_bytes(frame.get(..4)?.try_into().ok()?);
    if magic != MAGIC {
        return None;
    }
    let descriptor = *frame.get(4)?;
    let single_segment = descriptor & 0x20 != 0;
    if !single_segment {
        let w = *frame.get(5)?;
        let log = 10 + u32::from(w >> 3);
        let base = 1u64.checked_shl(log)?;
        return Some(base + (base / 8) * u64::from(w & 7));
    }
    let dict_bytes = [0usize, 1, 2, 4][usize::from(descriptor & 3)];
    let at = 5 + dict_bytes;
    let size = match descriptor >> 6 {
        0 => u64::from(*frame.get(at)?),
        1 => u64::from(u16::from_le_bytes(frame.get(at..at + 2)?.try_into().ok()?)) + 256,
        2 => u64::from(u32::from_le_bytes(frame.get(at..at + 4)?.try_into().ok()?)),
        _ => u64::from_le_bytes(frame.get(at..at + 8)?.try_into().ok()?),
    };
    Some(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelcast_proto::chunk::group4;
    use proptest::prelude::*;

    fn zstd_frame(data: &[u8]) -> Vec<u8> {
        ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
    }

    #[test]
    fn compressed_chunks_inflate_to_what_was_compressed() {
        let chunk: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let z = zstd_frame(&chunk);
        assert!(z.len() < chunk.len() / 10);
        assert_eq!(inflate(Encoding::Zstd, &z, 70_000).unwrap(), &chunk[..]);
        let g = zstd_frame(&group4(&chunk));
        assert_eq!(
            inflate(Encoding::ZstdGrouped4, &g, 70_000).unwrap(),
            &chunk[..]
        );
        assert_eq!(inflate(Encoding::Raw, &chunk, 70_000).unwrap(), &chunk[..]);
    }

    #[test]
    fn a_decompression_bomb_stops_at_the_chunks_length() {
        // 64 MiB of zeros compress to a few KiB; the chunk is 256 KiB.
        let bomb = zstd_frame(&vec![0u8; 64 << 20]);
        assert!(bomb.len() < 64 * 1024, "{}", bomb.len());
        let e = inflate(Encoding::Zstd, &bomb, 256 * 1024).unwrap_err();
        assert!(
            matches!(
                e,
                InflateError::TooLong { .. } | InflateError::Window { .. }
            ),
            "{e}"
        );
        // One byte too many is too many.
        let over = zstd_frame(&[7u8; 1001]);
        assert_eq!(
            inflate(Encoding::Zstd, &over, 1000),
            Err(InflateError::TooLong { limit: 1000 })
        );
        assert!(inflate(Encoding::Zstd, b"not zstd at all", 1000).is_err());
    }

    #[test]
    fn a_frame_asking_for_a_huge_window_is_refused_before_decoding() {
        // Magic, a descriptor without single segment, a window descriptor of 2^(10+20).
        let frame = [0x28, 0xB5, 0x2F, 0xFD, 0x00, 20 << 3, 0, 0, 0];
        assert_eq!(
            inflate(Encoding::Zstd, &frame, 1000),
            Err(InflateError::Window { window: 1 << 30 })
        );
    }

    proptest! {
        #[test]
        fn inflating_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256), limit in 0u32..4096) {
            let _ = inflate(Encoding::Zstd, &bytes, limit);
            let _ = inflate(Encoding::ZstdGrouped4, &bytes, limit);
        }

        #[test]
        fn what_is_compressed_inflates_back(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let z = zstd_frame(&data);
            prop_assert_eq!(inflate(Encoding::Zstd, &z, data.len() as u32).unwrap(), &data[..]);
        }
    }
}
