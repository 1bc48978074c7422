//! Helpers shared by the integration tests.
#![allow(dead_code)]

use pdx_transfer::RegisteredMemory;

/// The byte every test region holds at `offset` before anything writes it.
pub fn pattern_byte(seed: u64, offset: usize) -> u8 {
    let x = (offset as u64 ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 29) as u8
}

/// The pattern bytes of `[offset, offset+len)`.
pub fn pattern(seed: u64, offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len)
        .map(|i| pattern_byte(seed, i))
        .collect()
}

/// Fills a whole region with the pattern of `seed`.
pub fn fill_pattern(mem: &RegisteredMemory, seed: u64) {
    mem.write(0, &pattern(seed, 0, mem.len())).unwrap();
}

/// Copies `len` bytes at `offset` out of a region.
pub fn read_back(mem: &RegisteredMemory, offset: usize, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    mem.read(offset, &mut out).unwrap();
    out
}
