//! The C API of pdx's KV transfer engine (`libpdx.so`, `libpdx.a`, header `include/pdx.h` made by cbindgen),
//! NIXL's agent concepts one for one (NIXL `src/api/cpp/nixl.h`; the table is in docs/capi.md):
//!
//! | NIXL C++ | pdx C |
//! |---|---|
//! | `nixlAgent(name, cfg)` / `~nixlAgent` | `pdx_agent_create` / `pdx_agent_destroy` |
//! | `registerMem` / `deregisterMem` | `pdx_register_mem` / `pdx_deregister_mem` |
//! | `getLocalMD` / `loadRemoteMD` / `invalidateRemoteMD` | `pdx_get_local_md` (`_blob`) / `pdx_load_remote_md` / `pdx_invalidate_remote_md` |
//! | side channel | `pdx_fetch_remote_md` |
//! | `nixl_xfer_dlist_t` | `pdx_dlist_*` |
//! | `prepXferDlist` / `releasedDlistH` | `pdx_prep_xfer_dlist` / `pdx_release_dlist_handle` |
//! | `makeXferReq` / `createXferReq` | `pdx_make_xfer_req` / `pdx_create_xfer_req` |
//! | `postXferReq` / `getXferStatus` / `releaseXferReq` | `pdx_post_xfer_req` / `pdx_get_xfer_status` (+ `pdx_wait_xfer_req`) / `pdx_release_xfer_req` |
//! | `getNotifs` / `genNotif` | `pdx_get_notifs` (+ `pdx_wait_notifs`) / `pdx_gen_notif` |
//!
//! Conventions: handles are opaque pointers; every function returns a [`pdx_status`] and writes its results through
//! pointers; a failed call leaves its message in [`pdx_last_error`] (per thread); no panic crosses the boundary
//! (each entry point catches it and returns `PDX_ERR_INTERNAL`); null pointers and bad enum values give
//! `PDX_ERR_INVALID`. Enum arguments are passed as `int32_t`, so a value C made up is an error, never undefined
//! behaviour. Destroying a handle twice, or using it after, is the caller's bug (as with `free`).
//!
//! This crate is an FFI boundary: `unsafe` is allowed here, only where C's pointers are dereferenced (module `ptr`)
//! and where caller memory is registered (`pdx_register_mem`), each block with a `// SAFETY:` comment. It uses only
//! `pdx-transfer`'s public API.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(missing_docs)]
#![allow(non_camel_case_types)]

mod agent;
mod mem;
mod notif;
mod ptr;
mod status;
mod xfer;

pub use agent::{
    pdx_agent, pdx_agent_config, pdx_agent_create, pdx_agent_destroy, pdx_agent_listen_addr,
    pdx_agent_name, pdx_blob, pdx_blob_data, pdx_blob_destroy, pdx_fetch_remote_md,
    pdx_get_local_md, pdx_get_local_md_blob, pdx_invalidate_remote_md, pdx_load_remote_md,
    PDX_AGENT_NAME_BUF,
};
pub use mem::{pdx_deregister_mem, pdx_mem, pdx_mem_kind, pdx_register_mem};
pub use notif::{
    pdx_gen_notif, pdx_get_notifs, pdx_notif_list, pdx_notif_list_destroy, pdx_notif_list_get,
    pdx_notif_list_len, pdx_wait_notifs,
};
pub use status::{pdx_last_error, pdx_status, pdx_status_is_retryable, pdx_status_str, CapiError};
pub use xfer::{
    pdx_create_xfer_req, pdx_dlist, pdx_dlist_add, pdx_dlist_create, pdx_dlist_destroy,
    pdx_dlist_len, pdx_get_xfer_status, pdx_make_xfer_req, pdx_post_xfer_req, pdx_prep_xfer_dlist,
    pdx_prepped, pdx_query_xfer_transport, pdx_release_dlist_handle, pdx_release_xfer_req,
    pdx_wait_xfer_req, pdx_xfer, pdx_xfer_op, PDX_TIMEOUT_INFINITE,
};

/// Version of this library as `"major.minor.patch"` (the pdx workspace version); a static string, never freed.
///
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn pdx_version() -> *const std::ffi::c_char {
    const V: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    V.as_ptr().cast()
}
