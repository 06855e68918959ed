//! Compressed chunk replies ([`modelcast_proto::chunk::Encoding`]) inflated back to the chunk,
//! never past the length the signed manifest gives it: a reply that would (a decompression
//! bomb), or that is not a zstd frame, is an error, and the caller counts it as a bad copy.
//! Memory is bounded before anything is decoded: the output buffer is the chunk's length, and
//! the frame's window (the decoder's own buffer) may be no larger than a chunk may be.
//!
//! The decoder is zstd's reference library (built from its bundled source with the target's
//! C compiler, as `ring` is): inflating is on the path of every chunk, and a 100 MB update
//! measured here (`bench-update`) took 0.06 s longer with it than uncompressed, 0.25 s longer
//! with `ruzstd`, a decoder in Rust.

use std::borrow::Cow;

use modelcast_proto::chunk::{ungroup4, Encoding};
use zstd::zstd_safe;

/// Largest window a frame may ask for: 2^22 bytes, the largest chunk a manifest may have
/// ([`modelcast_proto::manifest::MAX_CHUNK_SIZE`]).
const WINDOW_LOG_MAX: u32 = 22;

/// Why a compressed copy did not inflate to a chunk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// Its frame says it inflates past the chunk's length.
    #[error("inflates past its {limit} bytes")]
    TooLong {
        /// The chunk's length in the manifest.
        limit: u32,
    },
    /// zstd refused it (zstd's name for why: not a zstd frame, a window over 4 MiB, more
    /// bytes than the chunk's length, ...).
    #[error("does not inflate: {0}")]
    Refused(&'static str),
}

/// The chunk a reply encoded with `encoding` carries, inflated to at most `limit` bytes (the
/// manifest's length for it; the digest check that follows decides the rest).
pub fn inflate(encoding: Encoding, data: &[u8], limit: u32) -> Result<Cow<'_, [u8]>, InflateError> {
    if encoding == Encoding::Raw {
        return Ok(Cow::Borrowed(data));
    }
    if let Ok(Some(size)) = zstd_safe::get_frame_content_size(data) {
        if size > u64::from(limit) {
            return Err(InflateError::TooLong { limit });
        }
    }
    let refused = |code| InflateError::Refused(zstd_safe::get_error_name(code));
    let mut dctx = zstd_safe::DCtx::create();
    dctx.set_parameter(zstd_safe::DParameter::WindowLogMax(WINDOW_LOG_MAX))
        .map_err(refused)?;
    // The buffer is the chunk's length: zstd stops at its end.
    let mut out = Vec::with_capacity(limit as usize);
    dctx.decompress(&mut out, data).map_err(refused)?;
    Ok(Cow::Owned(match encoding {
        Encoding::ZstdGrouped4 => ungroup4(&out),
        _ => out,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelcast_proto::chunk::group4;
    use proptest::prelude::*;

    fn zstd_frame(data: &[u8]) -> Vec<u8> {
        zstd::bulk::compress(data, 3).unwrap()
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
        assert_eq!(e, InflateError::TooLong { limit: 256 * 1024 });
        // One byte too many is too many.
        let over = zstd_frame(&[7u8; 1001]);
        assert_eq!(
            inflate(Encoding::Zstd, &over, 1000),
            Err(InflateError::TooLong { limit: 1000 })
        );
        assert!(inflate(Encoding::Zstd, b"not zstd at all", 1000).is_err());
    }

    #[test]
    fn a_frame_asking_for_a_huge_window_or_hiding_its_size_is_refused() {
        // Magic, a descriptor without single segment or size, a window of 2^(10+20).
        let frame = [0x28, 0xB5, 0x2F, 0xFD, 0x00, 20 << 3, 0, 0, 0];
        assert!(matches!(
            inflate(Encoding::Zstd, &frame, 1000),
            Err(InflateError::Refused(_))
        ));
        // A streamed frame says no size: the chunk's length still bounds it.
        let mut streamed = Vec::new();
        let mut e = zstd::stream::Encoder::new(&mut streamed, 3).unwrap();
        std::io::Write::write_all(&mut e, &[1u8; 5000]).unwrap();
        e.finish().unwrap();
        assert!(matches!(
            zstd_safe::get_frame_content_size(&streamed),
            Ok(None)
        ));
        assert!(matches!(
            inflate(Encoding::Zstd, &streamed, 4999),
            Err(InflateError::Refused(_))
        ));
        assert_eq!(
            inflate(Encoding::Zstd, &streamed, 5000).unwrap().len(),
            5000
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
