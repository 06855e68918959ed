//! Chunk requests (devices → server, JSON) and chunk replies (server → devices, binary frame),
//! with what a compressed reply inflates to (never past the chunk's length).
#![no_main]
use libfuzzer_sys::fuzz_target;
use modelcast_proto::chunk::{ChunkReply, ChunkRequest};

/// The chunk length the inflated copies are held to.
const LIMIT: u32 = 4096;

fuzz_target!(|data: &[u8]| {
    let _ = ChunkRequest::from_slice(data);
    if let Ok(reply) = ChunkReply::decode(data) {
        assert_eq!(ChunkReply::decode(&reply.encode()).ok(), Some(reply.clone()));
        if let Ok(chunk) = modelcast_agent::inflate::inflate(reply.encoding, reply.data, LIMIT) {
            assert!(chunk.len() <= LIMIT as usize || chunk.len() == reply.data.len());
        }
    }
});
