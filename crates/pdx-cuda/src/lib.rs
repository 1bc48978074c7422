//! pdx's one safe wrapper over CUDA: every CUDA `unsafe` call of pdx lives in this crate, each with a
//! `// SAFETY:` comment, behind a safe API. It uses [`cudarc`]'s driver API and NVRTC bindings, loaded at run
//! time (`dynamic-loading`), so the workspace builds and runs on machines with no CUDA at all: there, every entry
//! point returns [`CudaError::Unavailable`] (cudarc itself would panic on a missing `libcuda`; [`driver`] checks
//! `is_culib_present()` first).
//!
//! - [`Device`]: a GPU (its primary context), [`device_count`];
//! - [`Stream`], [`Event`]: asynchronous copies, memsets, kernel launches, timing;
//! - [`DeviceBuffer`] (`cuMemAlloc`, or the caller's device memory by pointer: [`DeviceBuffer::from_raw`], the one
//!   `unsafe` contract of engine-owned GPU memory), [`PinnedHostBuffer`] (a memfd arena of `pdx-sys`, page-locked with
//!   `cuMemHostRegister`, so same-host peers can also map it), [`IpcMemory`] (another process's allocation opened
//!   from an [`IpcHandle`] with `cuIpcOpenMemHandle`);
//! - [`KvKernels`]: the KV pack/unpack kernels of `kernels/kv_pack.cu` (PTX from `nvcc` at build time, a PTX
//!   file named by `PDX_KV_PTX_DIR`, or NVRTC at run time), launched from a [`pdx_kvlayout::PackSpec`].
//!
//! # Memory model
//! GPU memory is never a Rust reference: it is named by device address and reached only through the driver
//! (copies, kernels), so the device writing it concurrently cannot break Rust's aliasing rules. The host memory
//! the GPU writes (pinned buffers) is likewise only accessed through raw-pointer copies (`pdx-sys`). Every
//! asynchronous operation is bounds-checked when it is issued, and every buffer synchronises its device before it
//! is freed, so a copy or kernel in flight never touches freed memory.

#![deny(missing_docs)]

mod device;
mod error;
mod kernels;
mod memory;
mod stream;

pub use device::{device_count, driver, Device};
pub use error::{CudaError, Result};
pub use kernels::{DeviceTable, KernelSource, KvKernels, KvTensors};
pub use memory::{DeviceBuffer, GpuMemory, IpcHandle, IpcMemory, MemLocation, PinnedHostBuffer};
pub use stream::{Event, Stream};

/// The line GPU tests print when they skip on a machine without CUDA (and what `benches/gpu/run.sh` greps for).
pub const SKIP_NO_CUDA: &str = "skipped: no CUDA driver (libcuda) found";
