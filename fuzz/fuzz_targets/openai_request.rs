//! A client's OpenAI completion body (chat and text).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = pdx_router::fuzzing::completion_body(data, true);
    let _ = pdx_router::fuzzing::completion_body(data, false);
});
