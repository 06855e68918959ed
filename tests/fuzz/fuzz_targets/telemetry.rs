//! Telemetry reports, as a receiver (and the agent, for its own copies back) decodes them.
#![no_main]
use libfuzzer_sys::fuzz_target;
use modelcast_proto::telemetry::TelemetryReport;

fuzz_target!(|data: &[u8]| {
    if let Ok(report) = TelemetryReport::from_slice(data) {
        let again = TelemetryReport::from_slice(&report.to_vec());
        assert!(again.is_ok(), "a decoded report re-encodes");
    }
});
