//! A target file's `custom.modelcast` manifest: decoded, validated, and every accessor the
//! agent calls on it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use modelcast_proto::manifest::Manifest;
use modelcast_proto::metadata::TargetFile;

fuzz_target!(|data: &[u8]| {
    let Ok(target) = serde_json::from_slice::<TargetFile>(data) else {
        return;
    };
    let Ok(m) = Manifest::from_target("models/classifier/1.nnef.tar", &target) else {
        return;
    };
    let _ = m.validate();
    let _ = m.target_path();
    let count = m.chunk_count();
    for i in [0, 1, count.saturating_sub(1), count, u32::MAX] {
        let _ = m.chunk_len(i);
    }
    for t in m.inputs.iter().chain(&m.outputs) {
        let _ = t.elements();
    }
    for g in &m.golden {
        let _ = g.tolerance();
        for t in g.inputs.iter().chain(&g.outputs) {
            let _ = t.values();
        }
    }
});
