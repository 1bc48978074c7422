//! A worker's response head and body framing (Content-Length, chunked, until close), as the router reads it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = pdx_router::fuzzing::upstream_response(data);
});
