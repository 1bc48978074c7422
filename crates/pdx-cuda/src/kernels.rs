//! The KV pack/unpack kernels of `kernels/kv_pack.cu`: loading (PTX or NVRTC) and launching.

use std::ffi::{c_void, CString};
use std::path::PathBuf;

use cudarc::driver::{result, sys};
use cudarc::nvrtc;
use pdx_kvlayout::{validate_table, KernelArgs, KvLayout, PackSpec, KERNEL_THREADS};

use crate::device::Device;
use crate::error::{driver_err, CudaError, Result};
use crate::memory::{range, DeviceBuffer, GpuMemory, MemLocation};
use crate::stream::Stream;

/// The kernel source, compiled by NVRTC when no PTX is available.
pub const KV_PACK_CU: &str = include_str!("../../../kernels/kv_pack.cu");
/// PTX built by `nvcc` at build time (empty when `nvcc` was not there).
const KV_PACK_SM80: &str = include_str!(concat!(env!("OUT_DIR"), "/kv_pack.sm_80.ptx"));
const KV_PACK_SM90: &str = include_str!(concat!(env!("OUT_DIR"), "/kv_pack.sm_90.ptx"));

/// Vector widths with a kernel instance each (`kv_pack_<B>`, `kv_unpack_<B>`).
const WIDTHS: [u64; 5] = [16, 8, 4, 2, 1];

/// Where the loaded kernels came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelSource {
    /// A PTX file from the directory named by `PDX_KV_PTX_DIR` (e.g. compiled by `nvcc` on the GPU host).
    PtxFile(PathBuf),
    /// PTX that `nvcc` produced when this binary was built, for the named architecture.
    EmbeddedPtx(&'static str),
    /// The embedded `.cu` source compiled by NVRTC at load time, for `compute_XY` of the device.
    Nvrtc(String),
}

/// The KV kernels loaded on one device (a CUDA module with one pack and one unpack function per vector width).
pub struct KvKernels {
    device: Device,
    module: sys::CUmodule,
    pack: [sys::CUfunction; 5],
    unpack: [sys::CUfunction; 5],
    source: KernelSource,
}

// SAFETY: module and function handles are driver objects usable from any thread with the context current
// (every method binds it); launching is thread-safe in the driver API.
unsafe impl Send for KvKernels {}
// SAFETY: as above; no method needs exclusive access.
unsafe impl Sync for KvKernels {}

impl Drop for KvKernels {
    fn drop(&mut self) {
        if self.device.synchronize().is_ok() {
            // SAFETY: the module was loaded in `load` and is unloaded once, with no launch in flight.
            let _ = unsafe { result::module::unload(self.module) };
        }
    }
}

impl std::fmt::Debug for KvKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KvKernels({:?}, {:?})", self.device, self.source)
    }
}

/// PTX text for `cc`: `PDX_KV_PTX_DIR`, then PTX embedded at build time, then NVRTC.
fn ptx_for(cc: (i32, i32)) -> Result<(String, KernelSource)> {
    // PTX is forward compatible (JIT-compiled by the driver): sm_80 PTX runs on sm_90 too.
    let arch = if cc.0 >= 9 { "sm_90" } else { "sm_80" };
    if cc.0 >= 8 {
        if let Some(dir) = std::env::var_os("PDX_KV_PTX_DIR") {
            let path = PathBuf::from(dir).join(format!("kv_pack.{arch}.ptx"));
            let text = std::fs::read_to_string(&path).map_err(|e| {
                CudaError::Invalid(format!("PDX_KV_PTX_DIR: {}: {e}", path.display()))
            })?;
            return Ok((text, KernelSource::PtxFile(path)));
        }
        let embedded = if arch == "sm_90" {
            KV_PACK_SM90
        } else {
            KV_PACK_SM80
        };
        if !embedded.is_empty() {
            return Ok((embedded.to_string(), KernelSource::EmbeddedPtx(arch)));
        }
    }
    // SAFETY: only tries `dlopen` on NVRTC's library names.
    if !unsafe { nvrtc::sys::is_culib_present() } {
        return Err(CudaError::unavailable(
            "the KV kernels need NVRTC (libnvrtc) or PTX (build with nvcc, or set PDX_KV_PTX_DIR)",
        ));
    }
    let target = format!("compute_{}{}", cc.0, cc.1);
    let opts = nvrtc::CompileOptions {
        options: vec![format!("--gpu-architecture={target}"), "-std=c++17".into()],
        name: Some("kv_pack.cu".into()),
        ..Default::default()
    };
    let ptx = nvrtc::compile_ptx_with_opts(KV_PACK_CU, opts).map_err(|e| CudaError::Compile {
        name: "kv_pack.cu".into(),
        log: e.to_string(),
    })?;
    Ok((ptx.to_src(), KernelSource::Nvrtc(target)))
}

impl KvKernels {
    /// Loads the kernels on `device` (PTX from `PDX_KV_PTX_DIR`, PTX built in, or NVRTC; see [`KernelSource`]).
    /// Errors: [`CudaError::Unavailable`] without CUDA or without any way to get PTX; [`CudaError::Compile`].
    pub fn load(device: &Device) -> Result<KvKernels> {
        let cc = device.compute_capability()?;
        let (ptx, source) = ptx_for(cc)?;
        let image =
            CString::new(ptx).map_err(|_| CudaError::Invalid("PTX contains a NUL byte".into()))?;
        device.bind()?;
        // SAFETY: `image` is a NUL-terminated PTX text, alive for the call; the module is unloaded in Drop.
        let module = unsafe { result::module::load_data(image.as_ptr() as *const c_void) }
            .map_err(driver_err("cuModuleLoadData"))?;
        let mut k = KvKernels {
            device: device.clone(),
            module,
            pack: [std::ptr::null_mut(); 5],
            unpack: [std::ptr::null_mut(); 5],
            source,
        };
        for (i, w) in WIDTHS.iter().enumerate() {
            for (pack, slot) in [(true, &mut k.pack[i]), (false, &mut k.unpack[i])] {
                let name = format!("kv_{}_{w}", if pack { "pack" } else { "unpack" });
                let cname =
                    CString::new(name).map_err(|_| CudaError::Invalid("kernel name".into()))?;
                // SAFETY: `module` is a live module of this context.
                *slot = unsafe { result::module::get_function(module, cname) }
                    .map_err(driver_err("cuModuleGetFunction"))?;
            }
        }
        Ok(k)
    }

    /// Where the PTX came from.
    pub fn source(&self) -> &KernelSource {
        &self.source
    }

    /// The device the kernels are loaded on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Gathers, for each entry of `table` and each tensor, the spec's heads of that block into `staging`
    /// (from byte `staging_off`, `spec.staging_bytes(table.len())` bytes) on `stream`. Errors: mismatched
    /// spec/tensors/table, a staging range out of bounds, memory of another device.
    pub fn pack(
        &self,
        stream: &Stream,
        spec: &PackSpec,
        tensors: &KvTensors,
        table: &DeviceTable,
        staging: &dyn GpuMemory,
        staging_off: usize,
    ) -> Result<()> {
        self.launch(true, stream, spec, tensors, table, staging, staging_off)
    }

    /// The inverse of [`KvKernels::pack`]: scatters `staging` into the spec's heads of the listed blocks.
    /// Errors: as `pack`, plus a table that names a block twice (two writers).
    pub fn unpack(
        &self,
        stream: &Stream,
        spec: &PackSpec,
        tensors: &KvTensors,
        table: &DeviceTable,
        staging: &dyn GpuMemory,
        staging_off: usize,
    ) -> Result<()> {
        if !table.distinct {
            return Err(CudaError::Invalid(
                "unpack needs a table of distinct blocks".into(),
            ));
        }
        self.launch(false, stream, spec, tensors, table, staging, staging_off)
    }

    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        pack: bool,
        stream: &Stream,
        spec: &PackSpec,
        tensors: &KvTensors,
        table: &DeviceTable,
        staging: &dyn GpuMemory,
        staging_off: usize,
    ) -> Result<()> {
        if spec.tensor() != &tensors.layout || spec.num_tensors() as usize != tensors.count {
            return Err(CudaError::Invalid(
                "spec does not match the tensors' layout or count".into(),
            ));
        }
        if table.num_blocks != tensors.layout.num_blocks() {
            return Err(CudaError::Invalid(
                "table was validated for another block count".into(),
            ));
        }
        for d in [stream.device(), &tensors.device, table.buf.device()] {
            if d != &self.device {
                return Err(CudaError::Invalid(format!(
                    "{d:?} used with kernels of {:?}",
                    self.device
                )));
            }
        }
        if !matches!(staging.location(), MemLocation::Device(_)) {
            return Err(CudaError::Invalid(
                "the staging buffer must be device memory".into(),
            ));
        }
        if table.len == 0 {
            return Ok(());
        }
        let bytes = spec
            .staging_bytes(table.len)
            .and_then(|b| usize::try_from(b).ok())
            .ok_or_else(|| CudaError::Invalid("staging size overflows".into()))?;
        let staging_addr = range(staging, staging_off, bytes, "staging")?;
        let mut args: KernelArgs = spec.plan(table.len, tensors.align | staging_addr)?;
        args.tensors = tensors.ptrs.addr();
        args.table = table.buf.addr();
        args.staging = staging_addr;
        let slot = WIDTHS
            .iter()
            .position(|&w| w == args.unit)
            .ok_or_else(|| CudaError::Invalid(format!("no kernel for {}-byte units", args.unit)))?;
        let f = if pack {
            self.pack[slot]
        } else {
            self.unpack[slot]
        };
        let mut params = [&mut args as *mut KernelArgs as *mut c_void];
        self.device.bind()?;
        // SAFETY: `f` is a kernel of this module taking one `KvArgs` by value, whose layout `KernelArgs` mirrors
        // (#[repr(C)], 20 u64); `params` outlives the call (the driver copies arguments at launch). Every address
        // in `args` is inside a live allocation: tensors and the pointer array are held by `tensors` (validated
        // lengths), the table by `table`, the staging range was checked above, and all of them synchronise their
        // device before being freed. The grid is what `plan` validated: pairs <= 2^31-1, chunks <= 65535.
        unsafe {
            result::launch_kernel(
                f,
                (args.pairs as u32, args.chunks as u32, 1),
                (KERNEL_THREADS, 1, 1),
                0,
                stream.raw(),
                &mut params,
            )
        }
        .map_err(driver_err("cuLaunchKernel"))
    }
}

/// The KV tensors of one engine (e.g. K and V of every layer) on one device, with the device-side array of
/// their addresses that the kernels read. Holds the buffers alive.
pub struct KvTensors {
    device: Device,
    layout: KvLayout,
    count: usize,
    /// OR of every tensor address (for the vector width).
    align: u64,
    ptrs: DeviceBuffer,
    _buffers: Vec<DeviceBuffer>,
}

impl KvTensors {
    /// Tensors at `(buffer, byte offset)`, each `layout.tensor_bytes()` long, all on `stream`'s device.
    /// Uploads the address array on `stream` (waits). Errors: no tensors, a short buffer, another device.
    pub fn new(
        stream: &Stream,
        layout: KvLayout,
        tensors: &[(DeviceBuffer, usize)],
    ) -> Result<KvTensors> {
        if tensors.is_empty() {
            return Err(CudaError::Invalid("no tensors".into()));
        }
        let device = stream.device().clone();
        let mut addrs = Vec::with_capacity(tensors.len() * 8);
        let mut align = 0;
        for (i, (buf, off)) in tensors.iter().enumerate() {
            if buf.device() != &device {
                return Err(CudaError::Invalid(format!(
                    "tensor {i} is on another device"
                )));
            }
            let len = usize::try_from(layout.tensor_bytes())
                .map_err(|_| CudaError::Invalid("tensor size".into()))?;
            let a = range(buf, *off, len, &format!("tensor {i}"))?;
            align |= a;
            addrs.extend_from_slice(&a.to_le_bytes());
        }
        let ptrs = DeviceBuffer::new(&device, addrs.len())?;
        stream.upload(&ptrs, 0, &addrs)?;
        Ok(KvTensors {
            device,
            layout,
            count: tensors.len(),
            align,
            ptrs,
            _buffers: tensors.iter().map(|(b, _)| b.clone()).collect(),
        })
    }
    /// The tensors' layout.
    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }
    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.count
    }
    /// Always false.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// A block table validated on the host and uploaded to the device.
pub struct DeviceTable {
    buf: DeviceBuffer,
    len: usize,
    num_blocks: u32,
    distinct: bool,
}

impl DeviceTable {
    /// Validates `table` against `num_blocks` (errors on out-of-range ids, never a kernel fault) and uploads it
    /// on `stream` (waits). Tables naming a block twice can be packed but not unpacked.
    pub fn new(stream: &Stream, table: &[u32], num_blocks: u32) -> Result<DeviceTable> {
        validate_table(table, num_blocks, false)?;
        let distinct = validate_table(table, num_blocks, true).is_ok();
        let bytes: Vec<u8> = table.iter().flat_map(|b| b.to_le_bytes()).collect();
        let buf = DeviceBuffer::new(stream.device(), bytes.len().max(4))?;
        stream.upload(&buf, 0, &bytes)?;
        Ok(DeviceTable {
            buf,
            len: table.len(),
            num_blocks,
            distinct,
        })
    }
    /// Entries.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True for an empty table.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_args_match_the_cuda_struct() {
        // `struct KvArgs` in kernels/kv_pack.cu: 20 unsigned long long fields, in this order.
        assert_eq!(std::mem::size_of::<KernelArgs>(), 20 * 8);
        let fields = KV_PACK_CU
            .split("struct KvArgs {")
            .nth(1)
            .and_then(|s| s.split("};").next())
            .expect("KvArgs in kv_pack.cu");
        let names: Vec<&str> = fields
            .lines()
            .filter_map(|l| l.trim().strip_prefix("u64 "))
            .map(|l| l.split(';').next().unwrap_or("").trim())
            .collect();
        let want = [
            "tensors",
            "table",
            "staging",
            "pairs",
            "num_tensors",
            "num_blocks",
            "block_size",
            "heads",
            "head_start",
            "head_count",
            "row_bytes",
            "tensor_hnd",
            "staging_hnd",
            "run_rows",
            "run_units",
            "units_per_block",
            "staged_block_bytes",
            "block_bytes",
            "unit",
            "chunks",
        ];
        assert_eq!(names, want);
        // Every width has its two kernels in the source.
        for w in WIDTHS {
            assert!(
                KV_PACK_CU.contains(&format!("PDX_KV_KERNELS({w})")),
                "width {w}"
            );
        }
        assert!(KV_PACK_CU.contains(&format!("#define PDX_KV_THREADS {KERNEL_THREADS}")));
        assert!(KV_PACK_CU.contains(&format!(
            "#define PDX_KV_UNROLL {}",
            pdx_kvlayout::KERNEL_UNROLL
        )));
    }
}
