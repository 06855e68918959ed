//! Device state reports, as the server decodes them.
#![no_main]
use libfuzzer_sys::fuzz_target;
use modelcast_proto::report::DeviceReport;

fuzz_target!(|data: &[u8]| {
    if let Ok(report) = DeviceReport::from_slice(data) {
        let _ = DeviceReport::from_slice(&report.to_vec()).expect("a decoded report re-encodes");
    }
});
