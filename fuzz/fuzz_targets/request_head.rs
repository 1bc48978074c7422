//! A client's request head and body framing, as `pdx serve` parses them.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = pdx_router::fuzzing::request_head(data);
});
