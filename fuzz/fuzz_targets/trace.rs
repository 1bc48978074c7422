//! A request trace (Mooncake jsonl, Azure CSV), as `pdx replay` reads a file.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = pdx_replay::trace::parse(text);
    }
});
