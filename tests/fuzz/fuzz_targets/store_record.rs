//! Records read back from the agent's sled store (a corrupt disk is untrusted input too):
//! trust state, model slots and pending downloads, with what the agent derives from them.
#![no_main]
use libfuzzer_sys::fuzz_target;
use modelcast_agent::store::{decode, ModelRecord};
use modelcast_proto::manifest::Manifest;
use modelcast_proto::verify::TrustState;

fuzz_target!(|data: &[u8]| {
    if let Ok(trust) = decode::<TrustState>("trust/state", data) {
        let _ = trust.root();
    }
    if let Ok(record) = decode::<ModelRecord>("models/m", data) {
        let _ = record.serving();
        let _ = record.inactive();
        let mut record = record;
        let _ = record.roll_back();
    }
    if let Ok(pending) = decode::<Manifest>("pending/m", data) {
        let _ = pending.validate();
        let _ = pending.chunk_len(pending.chunk_count().saturating_sub(1));
    }
});
