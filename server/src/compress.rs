//! Chunks compressed for the wire ([`Encoding`]): zstd, of the bytes as they are or grouped by
//! position in four-byte words (float32 weights' sign-and-exponent bytes together), whichever
//! is smaller, and only when it saves at least [`MIN_SAVING`] of the chunk. A chunk goes to many
//! devices, so it is packed once, when its artifact is uploaded (`registry.rs`), and the packed
//! copy kept in the store beside it ([`packed_key`]): sending costs no compression.

use bytes::Bytes;
use modelcast_proto::chunk::{group4, Encoding};

/// The zstd level: zstd's default, fast to compress and very fast to inflate.
pub const LEVEL: i32 = 3;
/// Least share of a chunk compression must save for a compressed copy to be sent (1/16):
/// below it, inflating on the device is not worth the bytes.
pub const MIN_SAVING: (usize, usize) = (1, 16);

/// A chunk as it goes on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    /// How `data` is encoded.
    pub encoding: Encoding,
    /// The bytes sent.
    pub data: Bytes,
}

/// The smallest encoding of `chunk`: zstd of it, or of it grouped by four; the chunk as it is
/// when neither saves [`MIN_SAVING`].
pub fn pack(chunk: &Bytes) -> Packed {
    let raw = Packed {
        encoding: Encoding::Raw,
        data: chunk.clone(),
    };
    let candidates = [
        (Encoding::Zstd, zstd::bulk::compress(chunk, LEVEL)),
        (
            Encoding::ZstdGrouped4,
            zstd::bulk::compress(&group4(chunk), LEVEL),
        ),
    ];
    let best = candidates
        .into_iter()
        .filter_map(|(encoding, data)| Some((encoding, data.ok()?)))
        .min_by_key(|(_, data)| data.len());
    let (num, den) = MIN_SAVING;
    match best {
        Some((encoding, data)) if data.len() * den <= chunk.len() * (den - num) => Packed {
            encoding,
            data: Bytes::from(data),
        },
        _ => raw,
    }
}

/// Where the packed copies of a file's chunks are kept in the store: under a digest derived
/// from the file's, beside its chunks as they are. A chunk that packs to nothing smaller has
/// no packed copy.
pub fn packed_key(file: &[u8; 32]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"modelcast packed chunks\0");
    h.update(file);
    h.finalize().into()
}

/// A packed chunk as the store keeps it: one byte for its encoding, then its bytes. `None`
/// for a chunk that goes as it is.
pub fn to_stored(p: &Packed) -> Option<Vec<u8>> {
    let tag = match p.encoding {
        Encoding::Raw => return None,
        Encoding::Zstd => 1u8,
        Encoding::ZstdGrouped4 => 4u8,
    };
    let mut out = Vec::with_capacity(1 + p.data.len());
    out.push(tag);
    out.extend_from_slice(&p.data);
    Some(out)
}

/// A packed chunk read back from the store ([`to_stored`]); `None` if it is not one.
pub fn from_stored(mut stored: Bytes) -> Option<Packed> {
    let encoding = match stored.first()? {
        1 => Encoding::Zstd,
        4 => Encoding::ZstdGrouped4,
        _ => return None,
    };
    Some(Packed {
        encoding,
        data: stored.split_off(1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn floats(n: usize) -> Bytes {
        // Weights of a trained layer: small values around zero.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        Bytes::from(
            (0..n)
                .flat_map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let v = ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
                    v.to_le_bytes()
                })
                .collect::<Vec<u8>>(),
        )
    }

    #[test]
    fn chunks_are_sent_in_their_smallest_encoding_or_as_they_are() {
        let zeros = Bytes::from(vec![0u8; 65536]);
        let p = pack(&zeros);
        assert_ne!(p.encoding, Encoding::Raw);
        assert!(p.data.len() < 1024);
        // Float weights: grouping by four compresses better than the bytes as they are.
        let w = floats(65536);
        let p = pack(&w);
        assert_eq!(p.encoding, Encoding::ZstdGrouped4, "{}", p.data.len());
        let plain = zstd::bulk::compress(&w, LEVEL).unwrap();
        assert!(p.data.len() < plain.len());
        println!(
            "float weights: {} -> {} bytes grouped, {} plain",
            w.len(),
            p.data.len(),
            plain.len()
        );
        // Random bytes do not compress: they go as they are.
        let noise: Bytes = (0..65536u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect::<Vec<u8>>()
            .into();
        let p = pack(&noise);
        if p.encoding == Encoding::Raw {
            assert_eq!(p.data, noise);
        } else {
            assert!(p.data.len() * 16 <= noise.len() * 15);
        }
    }

    #[test]
    fn packed_chunks_round_trip_through_the_store_and_have_a_key_of_their_own() {
        let p = pack(&Bytes::from(vec![0u8; 65536]));
        let stored = to_stored(&p).unwrap();
        assert_eq!(from_stored(Bytes::from(stored)), Some(p));
        let raw = Packed {
            encoding: Encoding::Raw,
            data: Bytes::from_static(b"abc"),
        };
        assert_eq!(to_stored(&raw), None);
        assert_eq!(from_stored(Bytes::from_static(b"\x09abc")), None);
        assert_eq!(from_stored(Bytes::new()), None);
        assert_ne!(packed_key(&[1; 32]), [1; 32]);
        assert_ne!(packed_key(&[1; 32]), packed_key(&[2; 32]));
    }
}
