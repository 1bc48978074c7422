//! A KV agent frame from a peer: the fixed header, then the control payload.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pdx_transfer::wire::{Ctrl, Header, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if let Some(h) = data.first_chunk::<HEADER_LEN>() {
        let _ = Header::decode(h);
        let _ = Ctrl::decode(&data[HEADER_LEN..]);
    }
    let _ = Ctrl::decode(data);
});
