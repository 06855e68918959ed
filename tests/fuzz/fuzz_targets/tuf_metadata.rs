//! The TUF client core (`TrustedMetadata`) fed untrusted bytes in each role's position:
//! a root to start from, then root, timestamp, snapshot and targets updates.
#![no_main]
use libfuzzer_sys::fuzz_target;
use modelcast_fuzz::{root, NOW};
use modelcast_proto::trusted::TrustedMetadata;

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    if which == 0 {
        let _ = TrustedMetadata::new(bytes);
        return;
    }
    let mut trusted = TrustedMetadata::new(&root().to_vec()).expect("fixture root");
    let _ = match which % 4 {
        0 => trusted.update_root(bytes).map(|_| ()),
        1 => trusted.update_timestamp(bytes, NOW).map(|_| ()),
        2 => trusted.update_snapshot(bytes, NOW),
        _ => trusted.update_targets(bytes, NOW),
    };
});
