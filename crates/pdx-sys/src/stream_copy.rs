//! Copies with non-temporal ("streaming") stores, for KV blocks that are written once and read later by
//! someone else (a peer process, a GPU copy engine).
//!
//! A plain `memcpy` of data that does not fit in the cache reads every destination cache line before writing it
//! (read for ownership) and leaves the written lines in this core's cache, evicting what was there. Streaming
//! stores write whole lines through write-combining buffers instead, so a batch of large blocks that does not
//! stay cached copies faster than with glibc's `memcpy` on one thread (figures: `docs/benchmarks.md`, "KV
//! transfer", "Third session: streaming stores"). glibc switches to streaming stores itself only for single
//! copies above roughly three quarters of the last-level cache, which one KV block never is.
//!
//! Streaming stores are weakly ordered, so [`copy_nonoverlapping_streaming`] ends with `sfence`: when it
//! returns, the bytes are visible to other cores and processes in the usual order, and a completion or
//! notification published afterwards cannot overtake them.

/// Copies `len` bytes from `src` to `dst` with streaming stores where the CPU has AVX2 (detected once at run
/// time), else with `ptr::copy_nonoverlapping`.
///
/// # Safety
/// `src .. src + len` must be valid for reads and `dst .. dst + len` valid for writes, and the two ranges must
/// not overlap.
pub(crate) unsafe fn copy_nonoverlapping_streaming(src: *const u8, dst: *mut u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present (checked just above); the caller's contract covers the ranges.
            unsafe { copy_avx2(src, dst, len) };
            return;
        }
    }
    // SAFETY: the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
}

/// Bytes per loop iteration: two cache lines, four 32-byte stores.
#[cfg(target_arch = "x86_64")]
const UNROLL: usize = 128;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn copy_avx2(src: *const u8, dst: *mut u8, len: usize) {
    use std::arch::x86_64::{__m256i, _mm256_loadu_si256, _mm256_stream_si256, _mm_sfence};
    // `vmovntdq` needs a 32-byte aligned destination: copy the bytes before the first aligned address plainly.
    let head = dst.align_offset(32).min(len);
    // SAFETY: `head <= len`, so both ranges lie within the caller's ranges, which do not overlap.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, head) };
    let mut at = head;
    while len - at >= UNROLL {
        // SAFETY: `at + UNROLL <= len`, so the four 32-byte loads and stores stay inside the caller's ranges;
        // loads are unaligned loads; `dst + at` is 32-byte aligned because `dst + head` is and `at - head` is a
        // multiple of `UNROLL`.
        unsafe {
            let s = src.add(at).cast::<__m256i>();
            let d = dst.add(at).cast::<__m256i>();
            let a = _mm256_loadu_si256(s);
            let b = _mm256_loadu_si256(s.add(1));
            let c = _mm256_loadu_si256(s.add(2));
            let e = _mm256_loadu_si256(s.add(3));
            _mm256_stream_si256(d, a);
            _mm256_stream_si256(d.add(1), b);
            _mm256_stream_si256(d.add(2), c);
            _mm256_stream_si256(d.add(3), e);
        }
        at += UNROLL;
    }
    // SAFETY: `at <= len`: the tail lies inside the caller's ranges.
    unsafe { std::ptr::copy_nonoverlapping(src.add(at), dst.add(at), len - at) };
    // Order the streaming stores before anything this thread does next (publishing a completion).
    _mm_sfence();
}
