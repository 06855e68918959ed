//! Signed metadata envelopes and the four TUF documents inside them.
#![no_main]
use libfuzzer_sys::fuzz_target;
use modelcast_proto::metadata::{MetaIndex, Root, Signed, Targets};

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = Signed::from_slice(data) {
        let _ = env.parse::<Root>("root");
        let _ = env.parse::<Targets>("targets");
        let _ = env.parse::<MetaIndex>("snapshot");
        let _ = env.parse::<MetaIndex>("timestamp");
        let _ = env.to_vec();
    }
});
