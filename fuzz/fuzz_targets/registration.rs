//! A worker registration body (`POST /v1/workers`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = pdx_router::fuzzing::registration(data);
});
