//! Streams and events.

use std::ffi::c_void;

use cudarc::driver::{result, sys};

use crate::device::Device;
use crate::error::{check, driver_err, CudaError, Result};
use crate::memory::{range, GpuMemory, MemLocation};

/// A non-blocking CUDA stream of one device. Operations are asynchronous; [`Stream::synchronize`] waits.
pub struct Stream {
    device: Device,
    raw: sys::CUstream,
}

// SAFETY: a CUstream is a driver handle usable from any thread once the context is current, which every method
// ensures (`Device::bind`); the driver API is thread-safe.
unsafe impl Send for Stream {}
// SAFETY: as above; no method needs exclusive access.
unsafe impl Sync for Stream {}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Stream({:?})", self.device)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.device.bind().is_ok() {
            // SAFETY: `raw` was created by cuStreamCreate and is destroyed once; pending work completes first
            // (cuStreamDestroy returns at once and the driver releases the stream when its work is done).
            let _ = unsafe { result::stream::synchronize(self.raw) };
            // SAFETY: as above.
            let _ = unsafe { result::stream::destroy(self.raw) };
        }
    }
}

impl Stream {
    /// A new non-blocking stream on `device`.
    pub fn new(device: &Device) -> Result<Stream> {
        device.bind()?;
        let raw = result::stream::create(result::stream::StreamKind::NonBlocking)
            .map_err(driver_err("cuStreamCreate"))?;
        Ok(Stream {
            device: device.clone(),
            raw,
        })
    }

    /// The stream's device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    pub(crate) fn raw(&self) -> sys::CUstream {
        self.raw
    }

    /// Pinned host memory may only be used by streams of the device that pinned it: that device synchronises
    /// before the memory is unpinned and unmapped.
    fn check_pinned(&self, m: &dyn GpuMemory) -> Result<()> {
        match m.location() {
            MemLocation::PinnedHost(d) if d != self.device.ordinal() => {
                Err(CudaError::Invalid(format!(
                    "pinned memory of device {d} used by a stream of device {}",
                    self.device.ordinal()
                )))
            }
            _ => Ok(()),
        }
    }

    /// Copies `len` bytes from `src[src_off..]` to `dst[dst_off..]`: device to device (same or peer GPU), host
    /// (pinned) to device, device to host or host to host, chosen by the driver from the addresses (unified
    /// addressing). Between two devices it uses `cuMemcpyPeerAsync`, which goes over NVLink/PCIe P2P when peer
    /// access is enabled and is staged by the driver otherwise. Errors: out-of-bounds ranges.
    pub fn copy(
        &self,
        dst: &dyn GpuMemory,
        dst_off: usize,
        src: &dyn GpuMemory,
        src_off: usize,
        len: usize,
    ) -> Result<()> {
        let d = range(dst, dst_off, len, "copy destination")?;
        let s = range(src, src_off, len, "copy source")?;
        self.check_pinned(dst)?;
        self.check_pinned(src)?;
        if len == 0 {
            return Ok(());
        }
        self.device.bind()?;
        match (dst.location(), src.location()) {
            (MemLocation::Device(a), MemLocation::Device(b)) if a != b => {
                // SAFETY: both ranges are inside live allocations (checked above; buffers synchronise before
                // they are freed); contexts are retained primary contexts.
                check("cuMemcpyPeerAsync", unsafe {
                    sys::cuMemcpyPeerAsync(
                        d,
                        dst.device().cu_ctx(),
                        s,
                        src.device().cu_ctx(),
                        len,
                        self.raw,
                    )
                })
            }
            // SAFETY: both ranges are inside live allocations (checked above), device or pinned host memory
            // that the driver addresses by unified address; pinned memory outlives the copy (its Drop waits for
            // this device, checked by `check_pinned`).
            _ => check("cuMemcpyAsync", unsafe {
                sys::cuMemcpyAsync(d, s, len, self.raw)
            }),
        }
    }

    /// Fills `[off, off+len)` of `dst` with `byte`.
    pub fn memset(&self, dst: &dyn GpuMemory, off: usize, len: usize, byte: u8) -> Result<()> {
        let d = range(dst, off, len, "memset")?;
        self.check_pinned(dst)?;
        self.device.bind()?;
        // SAFETY: the range is inside a live allocation (checked).
        check("cuMemsetD8Async", unsafe {
            sys::cuMemsetD8Async(d, byte, len, self.raw)
        })
    }

    /// Copies `data` into `dst[off..]` and waits for it (and for everything queued before it on this stream).
    pub fn upload(&self, dst: &dyn GpuMemory, off: usize, data: &[u8]) -> Result<()> {
        let d = range(dst, off, data.len(), "upload")?;
        self.synchronize()?;
        if data.is_empty() {
            return Ok(());
        }
        // SAFETY: the destination range is inside a live allocation; `data` is a live host slice for the
        // duration of this synchronous call (waited below before returning).
        check("cuMemcpyHtoDAsync", unsafe {
            sys::cuMemcpyHtoDAsync_v2(d, data.as_ptr() as *const c_void, data.len(), self.raw)
        })?;
        self.synchronize()
    }

    /// Copies `src[off..off+out.len()]` into `out` and waits for it (after everything queued before it).
    pub fn download(&self, src: &dyn GpuMemory, off: usize, out: &mut [u8]) -> Result<()> {
        let s = range(src, off, out.len(), "download")?;
        self.synchronize()?;
        if out.is_empty() {
            return Ok(());
        }
        // SAFETY: the source range is inside a live allocation; `out` is a live, exclusively borrowed host slice
        // until the synchronisation below returns.
        check("cuMemcpyDtoHAsync", unsafe {
            sys::cuMemcpyDtoHAsync_v2(out.as_mut_ptr() as *mut c_void, s, out.len(), self.raw)
        })?;
        self.synchronize()
    }

    /// Waits until all work queued on this stream has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.device.bind()?;
        // SAFETY: `raw` is a live stream.
        unsafe { result::stream::synchronize(self.raw) }.map_err(driver_err("cuStreamSynchronize"))
    }

    /// Records `event` at the current end of this stream.
    pub fn record(&self, event: &Event) -> Result<()> {
        self.device.bind()?;
        // SAFETY: both handles are live and belong to this device.
        unsafe { result::event::record(event.raw, self.raw) }.map_err(driver_err("cuEventRecord"))
    }

    /// Makes later work on this stream wait for `event` (recorded on any stream).
    pub fn wait(&self, event: &Event) -> Result<()> {
        self.device.bind()?;
        // SAFETY: both handles are live.
        unsafe {
            result::stream::wait_event(
                self.raw,
                event.raw,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .map_err(driver_err("cuStreamWaitEvent"))
    }
}

/// A CUDA event with timing, for ordering streams and measuring GPU time.
pub struct Event {
    device: Device,
    raw: sys::CUevent,
}

// SAFETY: an event handle is usable from any thread with the context current (ensured by every method).
unsafe impl Send for Event {}
// SAFETY: as above.
unsafe impl Sync for Event {}

impl Drop for Event {
    fn drop(&mut self) {
        if self.device.bind().is_ok() {
            // SAFETY: `raw` was created by cuEventCreate and is destroyed once.
            let _ = unsafe { result::event::destroy(self.raw) };
        }
    }
}

impl Event {
    /// A new timing event on `device`.
    pub fn new(device: &Device) -> Result<Event> {
        device.bind()?;
        let raw = result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
            .map_err(driver_err("cuEventCreate"))?;
        Ok(Event {
            device: device.clone(),
            raw,
        })
    }
    /// Waits until the event has completed.
    pub fn synchronize(&self) -> Result<()> {
        self.device.bind()?;
        // SAFETY: `raw` is a live event.
        unsafe { result::event::synchronize(self.raw) }.map_err(driver_err("cuEventSynchronize"))
    }
    /// Milliseconds of GPU time from `self` to `end` (both recorded and completed).
    pub fn elapsed_ms(&self, end: &Event) -> Result<f32> {
        self.device.bind()?;
        // SAFETY: both events are live.
        unsafe { result::event::elapsed(self.raw, end.raw) }
            .map_err(driver_err("cuEventElapsedTime"))
    }
}
