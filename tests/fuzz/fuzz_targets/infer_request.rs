//! KServe v2 inference request bodies, as the agent's HTTP API parses them.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = modelcast_agent::serve::parse_request(data);
});
