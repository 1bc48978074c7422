//! `pdx_transfer._native`: pdx's KV transfer engine ([`pdx_transfer`]) as a Python extension module (PyO3,
//! abi3). The Python package `pdx_transfer` (under `python/`) wraps it twice: a Pythonic API of pdx's own, and
//! `pdx_transfer.nixl`, NIXL's Python API (`nixl._api`) with NIXL's semantics and return values.
//!
//! This crate is an FFI boundary: Python hands it raw addresses (NumPy arrays, tensors, `(addr, len, dev)`
//! tuples). Registering one is the one `unsafe` contract, stated once in [`memory::register_host`]: the caller
//! keeps the memory alive while it is registered, as with NIXL. Everything else goes through pdx-transfer's safe
//! API. Every call that can block (a copy, a socket, a wait) releases the GIL.

mod agent;
mod errors;
mod memory;
mod xfer;

use pyo3::prelude::*;

/// The extension module `pdx_transfer._native`.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<agent::Agent>()?;
    m.add_class::<memory::Registration>()?;
    m.add_class::<xfer::DescList>()?;
    m.add_class::<xfer::PreparedLocal>()?;
    m.add_class::<xfer::PreparedRemote>()?;
    m.add_class::<xfer::XferRequest>()?;
    m.add_function(wrap_pyfunction!(xfer::bench_post_loop, m)?)?;
    errors::add_to(m)?;
    m.add("MAX_NOTIF_BYTES", pdx_transfer::wire::MAX_NOTIF_BYTES)?;
    Ok(())
}
