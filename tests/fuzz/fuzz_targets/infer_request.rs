//! KServe v2 inference request bodies, as the agent's HTTP API parses them: JSON, and binary
//! tensors behind a JSON header whose length (`Inference-Header-Content-Length`) the first two
//! bytes give.
#![no_main]
use libfuzzer_sys::fuzz_target;

/// The per-tensor limit the fuzzer runs under (the agent's is configured; 1 MiB bounds memory).
const MAX_TENSOR: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let _ = modelcast_agent::kserve::parse_request(data, None, MAX_TENSOR);
    if let [a, b, rest @ ..] = data {
        let header = usize::from(u16::from_le_bytes([*a, *b]));
        let _ = modelcast_agent::kserve::parse_request(rest, Some(header), MAX_TENSOR);
    }
});
