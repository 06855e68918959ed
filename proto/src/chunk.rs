//! Chunk requests (agent → server) and chunk replies (server → agent).
//!
//! A request names an artifact by its SHA-256 and lists the chunk indices wanted (the agent
//! keeps a bounded window in flight): those asked for the first time, and those asked again.
//! A device that listens on the artifact's shared topic says so; the server may then answer
//! a first ask there, once for every device downloading the artifact (see
//! [`crate::topic::Topics::artifact`]). A chunk asked again is always answered on the
//! device's own chunk topic. A reply is a binary frame, the same on either topic:
//!
//! ```text
//! magic (4) | artifact sha256 (32) | index u32 BE (4) | length u32 BE (4) | bytes
//! ```
//!
//! The magic says how the bytes are encoded ([`Encoding`]): `MCC1` the chunk as it is,
//! `MCZ1` a zstd frame of it, `MCZ4` a zstd frame of it with its bytes grouped by position in
//! four-byte words ([`group4`]: the sign-and-exponent bytes of float32 weights together, which
//! compress better). A device that can inflate says so in its requests (`zstd`); the digest is
//! always over the chunk as it is, and a device inflates no further than the length the
//! manifest gives the chunk.

use serde::{Deserialize, Serialize};

use crate::error::DecodeError;
use crate::manifest::MAX_CHUNK_SIZE;

/// Most chunk indices one request may name.
pub const MAX_CHUNKS_PER_REQUEST: usize = 1024;

/// Largest encoded chunk request (1,024 indices take about 11 KiB).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// The longest a server holds the first ask for a chunk from devices that listen on the
/// artifact's shared topic ([`ChunkRequest::shared`]), gathering the devices a rollout wave
/// tells (its desired states go out over seconds) for one shared copy. Such a device waits
/// this much longer than its chunk timeout for the first chunk of a download before it asks
/// again: asking again would only be skipped while the copy is gathered.
pub const MAX_GATHER: std::time::Duration = std::time::Duration::from_secs(15);

const MAGIC: &[u8; 4] = b"MCC1";
const MAGIC_ZSTD: &[u8; 4] = b"MCZ1";
const MAGIC_ZSTD_GROUPED: &[u8; 4] = b"MCZ4";
const HEADER: usize = 4 + 32 + 4 + 4;

/// How a chunk reply's bytes are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// The chunk as it is.
    Raw,
    /// A zstd frame of the chunk.
    Zstd,
    /// A zstd frame of the chunk's bytes grouped by position in four-byte words
    /// ([`group4`]).
    ZstdGrouped4,
}

impl Encoding {
    fn magic(self) -> &'static [u8; 4] {
        match self {
            Encoding::Raw => MAGIC,
            Encoding::Zstd => MAGIC_ZSTD,
            Encoding::ZstdGrouped4 => MAGIC_ZSTD_GROUPED,
        }
    }
}

/// `data`'s bytes grouped by their position in four-byte words: every word's first byte, then
/// every second byte, and so on; a tail shorter than a word stays at the end. The inverse is
/// [`ungroup4`].
pub fn group4(data: &[u8]) -> Vec<u8> {
    let words = data.len() / 4;
    let mut out = vec![0; data.len()];
    let (planes, tail) = out.split_at_mut(4 * words);
    let (p0, rest) = planes.split_at_mut(words);
    let (p1, rest) = rest.split_at_mut(words);
    let (p2, p3) = rest.split_at_mut(words);
    for (i, w) in data.chunks_exact(4).enumerate() {
        (p0[i], p1[i], p2[i], p3[i]) = (w[0], w[1], w[2], w[3]);
    }
    tail.copy_from_slice(&data[4 * words..]);
    out
}

/// Undoes [`group4`].
pub fn ungroup4(grouped: &[u8]) -> Vec<u8> {
    let words = grouped.len() / 4;
    let mut out = vec![0; grouped.len()];
    let (p0, rest) = grouped.split_at(words);
    let (p1, rest) = rest.split_at(words);
    let (p2, rest) = rest.split_at(words);
    let (p3, tail) = rest.split_at(words);
    for (i, w) in out.chunks_exact_mut(4).enumerate() {
        w.copy_from_slice(&[p0[i], p1[i], p2[i], p3[i]]);
    }
    out[4 * words..].copy_from_slice(tail);
    out
}

/// A request for chunks of one artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRequest {
    /// Payload format version.
    pub format: u32,
    /// Requesting device (the reply goes to its chunk topic).
    pub device: String,
    /// Hex SHA-256 of the artifact.
    pub artifact: String,
    /// Chunk indices wanted, asked for the first time.
    pub chunks: Vec<u32>,
    /// Chunk indices asked for again (timed out, or lost with the connection): answered on
    /// the device's own chunk topic.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub again: Vec<u32>,
    /// The device listens on the artifact's shared topic, so a first ask may be answered
    /// there (or not at all, when it was just published there).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
    /// The device (re)subscribed to the artifact's shared topic since its previous request
    /// for the artifact (its first request, or after a reconnect): shared copies published
    /// before may not reach it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub joined: bool,
    /// The device inflates compressed replies ([`Encoding`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub zstd: bool,
}

impl ChunkRequest {
    /// Decodes untrusted bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_REQUEST_BYTES {
            return Err(DecodeError::Invalid {
                what: "chunk request",
                reason: format!("{} bytes is too large", bytes.len()),
            });
        }
        let req: ChunkRequest =
            serde_json::from_slice(bytes).map_err(|e| DecodeError::json("chunk request", e))?;
        if req.format != crate::FORMAT_VERSION {
            return Err(DecodeError::Version {
                what: "chunk request",
                found: req.format,
                expected: crate::FORMAT_VERSION,
            });
        }
        let asked = req.chunks.len() + req.again.len();
        if asked > MAX_CHUNKS_PER_REQUEST {
            return Err(DecodeError::Invalid {
                what: "chunk request",
                reason: format!("{asked} chunks in one request"),
            });
        }
        parse_digest(&req.artifact)?;
        if !crate::manifest::valid_name(&req.device) {
            return Err(DecodeError::Invalid {
                what: "chunk request",
                reason: format!("bad device id {:?}", req.device),
            });
        }
        Ok(req)
    }

    /// Encodes to JSON bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("requests serialize")
    }

    /// Every index asked: first asks, then the ones asked again.
    pub fn indices(&self) -> impl Iterator<Item = u32> + '_ {
        self.chunks.iter().chain(&self.again).copied()
    }

    /// Keeps only indices of an artifact of `count` chunks, each once (a first ask wins over
    /// an ask again): what a server answers, whatever the sender repeated or made up.
    pub fn keep_within(&mut self, count: u32) {
        let mut seen = std::collections::HashSet::new();
        self.chunks.retain(|i| *i < count && seen.insert(*i));
        self.again.retain(|i| *i < count && seen.insert(*i));
    }
}

/// One chunk of an artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkReply<'a> {
    /// SHA-256 of the artifact.
    pub artifact: [u8; 32],
    /// Chunk index.
    pub index: u32,
    /// How `data` is encoded.
    pub encoding: Encoding,
    /// Chunk bytes, as `encoding` says.
    pub data: &'a [u8],
}

impl<'a> ChunkReply<'a> {
    /// Encodes the frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.data.len());
        out.extend_from_slice(self.encoding.magic());
        out.extend_from_slice(&self.artifact);
        out.extend_from_slice(&self.index.to_be_bytes());
        out.extend_from_slice(&(self.data.len() as u32).to_be_bytes());
        out.extend_from_slice(self.data);
        out
    }

    /// Decodes a frame from untrusted bytes, borrowing the chunk.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        if bytes.len() < HEADER {
            return Err(DecodeError::Truncated {
                what: "chunk reply",
                need: HEADER,
                have: bytes.len(),
            });
        }
        let encoding = match &bytes[..4] {
            m if m == MAGIC => Encoding::Raw,
            m if m == MAGIC_ZSTD => Encoding::Zstd,
            m if m == MAGIC_ZSTD_GROUPED => Encoding::ZstdGrouped4,
            _ => {
                return Err(DecodeError::Invalid {
                    what: "chunk reply",
                    reason: "bad magic (not an MCC1, MCZ1 or MCZ4 frame)".into(),
                })
            }
        };
        let artifact: [u8; 32] = bytes[4..36].try_into().expect("32 bytes");
        let index = u32::from_be_bytes(bytes[36..40].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(bytes[40..44].try_into().expect("4 bytes"));
        if len > MAX_CHUNK_SIZE {
            return Err(DecodeError::Invalid {
                what: "chunk reply",
                reason: format!("chunk of {len} bytes exceeds {MAX_CHUNK_SIZE}"),
            });
        }
        let data = &bytes[HEADER..];
        if data.len() != len as usize {
            return Err(DecodeError::Truncated {
                what: "chunk reply",
                need: HEADER + len as usize,
                have: bytes.len(),
            });
        }
        Ok(ChunkReply {
            artifact,
            index,
            encoding,
            data,
        })
    }
}

/// Parses a hex SHA-256.
pub fn parse_digest(hex_digest: &str) -> Result<[u8; 32], DecodeError> {
    hex::decode(hex_digest)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| DecodeError::Invalid {
            what: "digest",
            reason: format!("{hex_digest:?} is not a hex SHA-256"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reply_round_trip() {
        for encoding in [Encoding::Raw, Encoding::Zstd, Encoding::ZstdGrouped4] {
            let r = ChunkReply {
                artifact: [3; 32],
                index: 7,
                encoding,
                data: b"abc",
            };
            let bytes = r.encode();
            assert_eq!(ChunkReply::decode(&bytes).unwrap(), r);
            assert!(ChunkReply::decode(&bytes[..bytes.len() - 1]).is_err());
            assert!(ChunkReply::decode(&bytes[..10]).is_err());
        }
        let mut other = ChunkReply {
            artifact: [3; 32],
            index: 7,
            encoding: Encoding::Raw,
            data: b"abc",
        }
        .encode();
        other[..4].copy_from_slice(b"MCX9");
        assert!(ChunkReply::decode(&other).is_err());
    }

    #[test]
    fn grouping_puts_each_byte_position_together() {
        let data = [1, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(group4(&data), [1, 5, 2, 6, 3, 7, 4, 8, 9]);
        assert_eq!(ungroup4(&group4(&data)), data);
    }

    #[test]
    fn request_round_trip_and_limits() {
        let r = ChunkRequest {
            format: 1,
            device: "dev-1".into(),
            artifact: "ab".repeat(32),
            chunks: vec![1, 2, 3],
            again: vec![],
            shared: false,
            joined: false,
            zstd: false,
        };
        assert_eq!(ChunkRequest::from_slice(&r.to_vec()).unwrap(), r);
        // The fields a device that predates the shared topic leaves out.
        assert!(!String::from_utf8(r.to_vec()).unwrap().contains("shared"));
        let both = ChunkRequest {
            again: vec![0],
            shared: true,
            joined: true,
            ..r.clone()
        };
        assert_eq!(ChunkRequest::from_slice(&both.to_vec()).unwrap(), both);
        assert_eq!(both.indices().collect::<Vec<_>>(), vec![1, 2, 3, 0]);
        let mut messy = ChunkRequest {
            chunks: vec![3, 9, 3, 1],
            again: vec![1, 4, 4, 12],
            ..r.clone()
        };
        messy.keep_within(10);
        assert_eq!((messy.chunks, messy.again), (vec![3, 9, 1], vec![4]));
        let mut big = r.clone();
        big.chunks = vec![0; MAX_CHUNKS_PER_REQUEST + 1];
        assert!(ChunkRequest::from_slice(&big.to_vec()).is_err());
        let mut split = r.clone();
        split.chunks = vec![0; MAX_CHUNKS_PER_REQUEST / 2 + 1];
        split.again = vec![0; MAX_CHUNKS_PER_REQUEST / 2];
        assert!(ChunkRequest::from_slice(&split.to_vec()).is_err());
        let mut bad = r;
        bad.device = "a/b".into();
        assert!(ChunkRequest::from_slice(&bad.to_vec()).is_err());
    }

    proptest! {
        #[test]
        fn reply_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = ChunkReply::decode(&bytes);
        }

        #[test]
        fn reply_decoder_rejects_every_truncation(data in proptest::collection::vec(any::<u8>(), 0..64), cut in 1usize..200) {
            let frame = ChunkReply { artifact: [1; 32], index: 0, encoding: Encoding::Zstd, data: &data }.encode();
            let cut = cut.min(frame.len());
            prop_assert!(ChunkReply::decode(&frame[..frame.len() - cut]).is_err());
        }

        #[test]
        fn grouping_round_trips(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assert_eq!(ungroup4(&group4(&data)), data);
        }

        #[test]
        fn request_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = ChunkRequest::from_slice(&bytes);
        }
    }
}
