//! A desired-state message as it arrives over MQTT, decoded and verified against a valid
//! trust anchor.
#![no_main]
use libfuzzer_sys::fuzz_target;
use modelcast_fuzz::{director, trust, DEVICE, NOW};
use modelcast_proto::desired::DesiredState;
use modelcast_proto::verify::verify_desired;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = DesiredState::from_slice(data) {
        let _ = verify_desired(&trust(), director(), DEVICE, &msg, NOW);
    }
});
