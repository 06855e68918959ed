//! Chunk requests (devices → server, JSON) and chunk replies (server → devices, binary frame).
#![no_main]
use libfuzzer_sys::fuzz_target;
use modelcast_proto::chunk::{ChunkReply, ChunkRequest};

fuzz_target!(|data: &[u8]| {
    let _ = ChunkRequest::from_slice(data);
    if let Ok(reply) = ChunkReply::decode(data) {
        assert_eq!(ChunkReply::decode(&reply.encode()).ok(), Some(reply));
    }
});
