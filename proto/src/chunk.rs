//! Chunk requests (agent → server) and chunk replies (server → agent).
//!
//! A request names an artifact by its SHA-256 and lists the chunk indices wanted (the agent
//! keeps a bounded window in flight). A reply is a binary frame:
//!
//! ```text
//! magic "MCC1" (4) | artifact sha256 (32) | index u32 BE (4) | length u32 BE (4) | bytes
//! ```

use serde::{Deserialize, Serialize};

use crate::error::DecodeError;
use crate::manifest::MAX_CHUNK_SIZE;

/// Most chunk indices one request may name.
pub const MAX_CHUNKS_PER_REQUEST: usize = 1024;

const MAGIC: &[u8; 4] = b"MCC1";
const HEADER: usize = 4 + 32 + 4 + 4;

/// A request for chunks of one artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRequest {
    /// Payload format version.
    pub format: u32,
    /// Requesting device (the reply goes to its chunk topic).
    pub device: String,
    /// Hex SHA-256 of the artifact.
    pub artifact: String,
    /// Chunk indices wanted.
    pub chunks: Vec<u32>,
}

impl ChunkRequest {
    /// Decodes untrusted bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, DecodeError> {
        let req: ChunkRequest =
            serde_json::from_slice(bytes).map_err(|e| DecodeError::json("chunk request", e))?;
        if req.format != crate::FORMAT_VERSION {
            return Err(DecodeError::Version {
                what: "chunk request",
                found: req.format,
                expected: crate::FORMAT_VERSION,
            });
        }
        if req.chunks.len() > MAX_CHUNKS_PER_REQUEST {
            return Err(DecodeError::Invalid {
                what: "chunk request",
                reason: format!("{} chunks in one request", req.chunks.len()),
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
}

/// One chunk of an artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkReply<'a> {
    /// SHA-256 of the artifact.
    pub artifact: [u8; 32],
    /// Chunk index.
    pub index: u32,
    /// Chunk bytes.
    pub data: &'a [u8],
}

impl<'a> ChunkReply<'a> {
    /// Encodes the frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.data.len());
        out.extend_from_slice(MAGIC);
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
        if &bytes[..4] != MAGIC {
            return Err(DecodeError::Invalid {
                what: "chunk reply",
                reason: "bad magic (not an MCC1 frame)".into(),
            });
        }
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
        let r = ChunkReply {
            artifact: [3; 32],
            index: 7,
            data: b"abc",
        };
        let bytes = r.encode();
        assert_eq!(ChunkReply::decode(&bytes).unwrap(), r);
        assert!(ChunkReply::decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(ChunkReply::decode(&bytes[..10]).is_err());
    }

    #[test]
    fn request_round_trip_and_limits() {
        let r = ChunkRequest {
            format: 1,
            device: "dev-1".into(),
            artifact: "ab".repeat(32),
            chunks: vec![1, 2, 3],
        };
        assert_eq!(ChunkRequest::from_slice(&r.to_vec()).unwrap(), r);
        let mut big = r.clone();
        big.chunks = vec![0; MAX_CHUNKS_PER_REQUEST + 1];
        assert!(ChunkRequest::from_slice(&big.to_vec()).is_err());
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
            let frame = ChunkReply { artifact: [1; 32], index: 0, data: &data }.encode();
            let cut = cut.min(frame.len());
            prop_assert!(ChunkReply::decode(&frame[..frame.len() - cut]).is_err());
        }

        #[test]
        fn request_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = ChunkRequest::from_slice(&bytes);
        }
    }
}
