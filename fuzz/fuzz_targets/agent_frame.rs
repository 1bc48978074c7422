//! A KV agent frame from a peer, with every check a connection applies (`wire::decode_frame`), and the control
//! body alone.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pdx_transfer::wire::{decode_frame, Ctrl};

fuzz_target!(|data: &[u8]| {
    if let Ok((_header, _ctrl, used)) = decode_frame(data) {
        assert!(used <= data.len(), "consumed past the input");
    }
    let _ = Ctrl::decode(data);
});
