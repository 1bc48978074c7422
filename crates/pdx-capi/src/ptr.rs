//! The pointers C hands in: every dereference of one is in this module, behind a null check, with the contract the
//! caller of each C function promised (see the `# Safety` section of each `pdx_*` function).

use std::ffi::c_char;
use std::ptr::NonNull;

use crate::status::{CapiError, Result};

/// A handle's referent, or `PDX_ERR_INVALID` for null.
///
/// # Safety
/// `p` is null or a handle of type `T` that this library returned and that has not been destroyed, and no other
/// thread destroys it during the borrow.
pub(crate) unsafe fn handle<'a, T>(p: *const T, what: &str) -> Result<&'a T> {
    // SAFETY: non-null here; the caller promises a live handle of this type (see above).
    unsafe { p.as_ref() }.ok_or_else(|| CapiError::invalid(format!("{what} is null")))
}

/// A handle's referent for mutation, or `PDX_ERR_INVALID` for null.
///
/// # Safety
/// As [`handle`], and no other call uses the handle during the borrow (the functions that take one say "not
/// concurrently with other calls on the same handle").
pub(crate) unsafe fn handle_mut<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T> {
    // SAFETY: non-null here; a live, exclusively used handle (see above).
    unsafe { p.as_mut() }.ok_or_else(|| CapiError::invalid(format!("{what} is null")))
}

/// Moves a value into a new handle owned by the caller (freed by the matching `*_destroy` / `*_release`).
pub(crate) fn into_handle<T>(v: T) -> *mut T {
    Box::into_raw(Box::new(v))
}

/// Takes a handle back and drops it. Null is a no-op.
///
/// # Safety
/// `p` is null or a handle of type `T` that this library returned, not yet destroyed, used by no other thread;
/// it must not be used after this call (a second destroy is the caller's bug).
pub(crate) unsafe fn destroy<T>(p: *mut T) {
    if !p.is_null() {
        // SAFETY: made by `into_handle` (Box::into_raw) and given back exactly once (see above).
        drop(unsafe { Box::from_raw(p) });
    }
}

/// Takes a handle back as an owned value, or `PDX_ERR_INVALID` for null.
///
/// # Safety
/// As [`destroy`].
pub(crate) unsafe fn take<T>(p: *mut T, what: &str) -> Result<T> {
    if p.is_null() {
        return Err(CapiError::invalid(format!("{what} is null")));
    }
    // SAFETY: made by `into_handle` (Box::into_raw) and given back exactly once (see above).
    Ok(*unsafe { Box::from_raw(p) })
}

/// A NUL-terminated UTF-8 string of at most `max` bytes (without the NUL), or `PDX_ERR_INVALID` for null, a longer
/// string, or bytes that are not UTF-8. Reads at most `max + 1` bytes, so a missing terminator is an error rather
/// than a run through memory.
///
/// # Safety
/// `p` is null or points to a NUL-terminated string, or to at least `max + 1` readable bytes.
pub(crate) unsafe fn str_arg<'a>(p: *const c_char, max: usize, what: &str) -> Result<&'a str> {
    if p.is_null() {
        return Err(CapiError::invalid(format!("{what} is null")));
    }
    let mut len = 0;
    // SAFETY: bytes up to the terminator, or up to `max + 1`, are readable (see above); the loop stops at either.
    while unsafe { p.add(len).read() } != 0 {
        len += 1;
        if len > max {
            return Err(CapiError::invalid(format!(
                "{what} is longer than {max} bytes (or not NUL-terminated)"
            )));
        }
    }
    // SAFETY: the `len` bytes before the terminator were just read; C strings are not written while a call runs.
    let bytes = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) };
    std::str::from_utf8(bytes).map_err(|_| CapiError::invalid(format!("{what} is not UTF-8")))
}

/// An optional string: null gives `None`, otherwise as [`str_arg`].
///
/// # Safety
/// As [`str_arg`].
pub(crate) unsafe fn opt_str_arg<'a>(
    p: *const c_char,
    max: usize,
    what: &str,
) -> Result<Option<&'a str>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: non-null; the caller's promise is passed on (see above).
    unsafe { str_arg(p, max, what) }.map(Some)
}

/// `len` elements at `p` (null is accepted for `len == 0`), or `PDX_ERR_INVALID` for null with `len > 0` or a length
/// no allocation can have.
///
/// # Safety
/// `p` is null or points to `len` initialised `T` that nothing writes during the call.
pub(crate) unsafe fn slice_arg<'a, T>(p: *const T, len: usize, what: &str) -> Result<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(CapiError::invalid(format!("{what} is null")));
    }
    if len.saturating_mul(size_of::<T>()) > isize::MAX as usize {
        return Err(CapiError::invalid(format!(
            "{what}: length {len} too large"
        )));
    }
    if !p.is_aligned() {
        return Err(CapiError::invalid(format!("{what} is misaligned")));
    }
    // SAFETY: non-null, aligned, `len` readable elements within one allocation (see above), size checked.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// An output pointer, checked before the call does anything, so a null one leaves no half-done work behind.
pub(crate) fn out_arg<T>(p: *mut T, what: &str) -> Result<NonNull<T>> {
    NonNull::new(p).ok_or_else(|| CapiError::invalid(format!("{what} (output) is null")))
}

/// Reads an in-out argument's value on entry.
///
/// # Safety
/// `p` points to an initialised, aligned `T`.
pub(crate) unsafe fn read_in<T: Copy>(p: NonNull<T>) -> T {
    // SAFETY: initialised and aligned (see above).
    unsafe { p.as_ptr().read() }
}

/// Writes an output value (without reading or dropping the old contents, which C may have left uninitialised).
///
/// # Safety
/// `out` points to writable, aligned storage for a `T`.
pub(crate) unsafe fn write_out<T>(out: NonNull<T>, v: T) {
    // SAFETY: writable and aligned (see above); `write` does not drop the old bytes.
    unsafe { out.as_ptr().write(v) }
}

/// Copies `bytes` plus a terminating NUL into the caller's buffer `buf` of `cap` bytes, or fails with
/// `PDX_ERR_BUFFER_TOO_SMALL` (writing nothing) when it does not fit.
///
/// # Safety
/// `buf` points to `cap` writable bytes.
pub(crate) unsafe fn write_c_string(buf: NonNull<c_char>, cap: usize, bytes: &[u8]) -> Result<()> {
    if bytes.len() >= cap {
        return Err(CapiError::BufferTooSmall {
            need: bytes.len() + 1,
            have: cap,
        });
    }
    let dst = buf.as_ptr().cast::<u8>();
    // SAFETY: `bytes.len() + 1 <= cap` writable bytes at `buf` (see above); Rust data never overlaps C's buffer.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len());
        dst.add(bytes.len()).write(0);
    }
    Ok(())
}

/// Copies `bytes` into the caller's buffer of `cap` bytes.
///
/// # Safety
/// `buf` points to `cap >= bytes.len()` writable bytes.
pub(crate) unsafe fn write_bytes(buf: NonNull<u8>, bytes: &[u8]) {
    // SAFETY: at least `bytes.len()` writable bytes at `buf` (see above), not overlapping Rust's data.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.as_ptr(), bytes.len()) }
}
