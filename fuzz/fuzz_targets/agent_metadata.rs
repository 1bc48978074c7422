//! A peer agent's metadata (the side-channel reply a decode reads before it touches any memory).
#![no_main]
use libfuzzer_sys::fuzz_target;
use pdx_transfer::AgentMetadata;

fuzz_target!(|data: &[u8]| {
    if let Ok((md, _ext)) = AgentMetadata::decode_ext(data) {
        // Lookups on whatever regions the peer claims must stay bounds-checked.
        let _ = md.find_region(u64::MAX - 1, 2);
        let _ = md.find_region(0, u64::MAX);
    }
});
