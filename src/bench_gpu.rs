//! GPU benchmarks: `pdx bench kernels` (KV pack/unpack kernels against per-block `cuMemcpyAsync` and the plain
//! device-to-device copy bandwidth of the same run) and `pdx bench kv --mem device|pinned` (two processes on one
//! GPU through CUDA IPC against an in-process device copy; pinned host ↔ device against one plain
//! `cuMemcpyAsync`). Every rate is GB/s (1e9 bytes/s) of payload bytes, timed with CUDA events; every row
//! carries its same-run reference and the ratio. Without CUDA they fail with the `Unavailable` error.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use pdx_cuda::{
    Device, DeviceBuffer, DeviceTable, Event, GpuMemory, IpcHandle, KvKernels, KvTensors,
    PinnedHostBuffer, Stream,
};
use pdx_kvlayout::{BlockLayout, KvLayout, PackSpec};
use pdx_transfer::{
    Agent, AgentConfig, MemoryKind, RegisteredMemory, TransportKind, XferDescList, XferOp,
    XferOptions, XferRequest,
};
use rand::prelude::*;
use serde::{Deserialize, Serialize};

use crate::units::{format_size, parse_sizes};

/// Arguments of `pdx bench kernels`.
#[derive(clap::Args, Debug)]
pub struct KernelArgs {
    /// Blocks gathered per pack (scattered at random over the pool).
    #[arg(long, default_value_t = 4096)]
    blocks: u32,
    /// Blocks in the KV tensor the blocks are drawn from.
    #[arg(long, default_value_t = 16384)]
    pool_blocks: u32,
    /// Tokens per block.
    #[arg(long, default_value_t = 16)]
    block_size: u32,
    /// KV heads.
    #[arg(long, default_value_t = 8)]
    heads: u32,
    /// Elements per head.
    #[arg(long, default_value_t = 64)]
    head_dim: u32,
    /// Bytes per element (2: fp16/bf16).
    #[arg(long, default_value_t = 2)]
    elem_bytes: u32,
    /// Timed repetitions of each measurement (after one warm-up).
    #[arg(long, default_value_t = 20)]
    iters: u32,
    /// GPU index.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Print rows as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// One row of `pdx bench kernels` (also the JSON schema).
#[derive(Serialize, Debug)]
struct KernelRow {
    what: String,
    /// Payload bytes per repetition.
    bytes: u64,
    gbps: f64,
    /// Same-run plain device-to-device copy of the same byte count (one cuMemcpyAsync).
    d2d_gbps: f64,
    ratio_to_d2d: f64,
    /// How many times faster than one cuMemcpyAsync per block (same run); absent for the references.
    speedup_vs_per_block_memcpy: Option<f64>,
}

/// GB/s of `bytes` per repetition of `f` over `iters` repetitions, timed with events on `s` (one warm-up).
fn time_gbps(
    s: &Stream,
    dev: &Device,
    bytes: u64,
    iters: u32,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    f()?;
    s.synchronize()?;
    let (a, b) = (Event::new(dev)?, Event::new(dev)?);
    s.record(&a)?;
    for _ in 0..iters {
        f()?;
    }
    s.record(&b)?;
    b.synchronize()?;
    let ms = a.elapsed_ms(&b)? as f64;
    Ok(bytes as f64 * iters as f64 / (ms / 1e3) / 1e9)
}

/// `pdx bench kernels`.
pub fn run_kernels(args: KernelArgs) -> Result<()> {
    if args.blocks == 0 || args.blocks > args.pool_blocks || args.iters == 0 {
        bail!("need 0 < --blocks <= --pool-blocks and --iters > 0");
    }
    let dev = Device::new(args.device)?;
    let s = Stream::new(&dev)?;
    let kernels = KvKernels::load(&dev)?;
    let layout = KvLayout::new(
        args.pool_blocks,
        args.block_size,
        args.heads,
        args.head_dim,
        args.elem_bytes,
        BlockLayout::Nhd,
    )?;
    let bb = layout.block_bytes() as usize;
    eprintln!(
        "pdx bench kernels: {} on {}, kernels from {:?}; {} blocks of {} from a pool of {}",
        dev.name()?,
        args.device,
        kernels.source(),
        args.blocks,
        format_size(bb as u64),
        args.pool_blocks
    );
    let tensor = DeviceBuffer::new(&dev, layout.tensor_bytes() as usize)?;
    s.memset(&tensor, 0, tensor.len(), 0x5A)?;
    let tensors = KvTensors::new(&s, layout, &[(tensor.clone(), 0)])?;
    let mut rng = StdRng::seed_from_u64(1);
    let mut ids: Vec<u32> = (0..args.pool_blocks).collect();
    ids.shuffle(&mut rng);
    ids.truncate(args.blocks as usize);
    let table = DeviceTable::new(&s, &ids, args.pool_blocks)?;
    let bytes = args.blocks as u64 * bb as u64;
    let staging = DeviceBuffer::new(&dev, bytes as usize)?;
    let copy_dst = DeviceBuffer::new(&dev, bytes as usize)?;

    // References: one device-to-device copy of the same bytes; one cuMemcpyAsync per block.
    let d2d = time_gbps(&s, &dev, bytes, args.iters, || {
        Ok(s.copy(&copy_dst, 0, &staging, 0, bytes as usize)?)
    })?;
    let per_block = time_gbps(&s, &dev, bytes, args.iters, || {
        for (i, &b) in ids.iter().enumerate() {
            s.copy(&staging, i * bb, &tensor, b as usize * bb, bb)?;
        }
        Ok(())
    })?;
    let mut rows = vec![
        KernelRow {
            what: "d2d cuMemcpyAsync (reference)".into(),
            bytes,
            gbps: d2d,
            d2d_gbps: d2d,
            ratio_to_d2d: 1.0,
            speedup_vs_per_block_memcpy: None,
        },
        KernelRow {
            what: format!("per-block cuMemcpyAsync x{}", args.blocks),
            bytes,
            gbps: per_block,
            d2d_gbps: d2d,
            ratio_to_d2d: per_block / d2d,
            speedup_vs_per_block_memcpy: Some(1.0),
        },
    ];
    let half = (args.heads / 2).max(1);
    let specs = [
        ("pack", PackSpec::full(layout, 1)?),
        ("unpack", PackSpec::full(layout, 1)?),
        (
            "pack nhd->hnd",
            PackSpec::new(layout, 1, 0, args.heads, BlockLayout::Hnd)?,
        ),
        (
            "unpack hnd->nhd",
            PackSpec::new(layout, 1, 0, args.heads, BlockLayout::Hnd)?,
        ),
        (
            "pack heads[0,h/2)",
            PackSpec::new(layout, 1, 0, half, BlockLayout::Nhd)?,
        ),
    ];
    for (name, spec) in specs {
        let moved = spec.staging_bytes(ids.len()).context("size")?;
        let gbps = time_gbps(&s, &dev, moved, args.iters, || {
            if name.starts_with("pack") {
                kernels.pack(&s, &spec, &tensors, &table, &staging, 0)?;
            } else {
                kernels.unpack(&s, &spec, &tensors, &table, &staging, 0)?;
            }
            Ok(())
        })?;
        rows.push(KernelRow {
            what: name.to_string(),
            bytes: moved,
            gbps,
            d2d_gbps: d2d,
            ratio_to_d2d: gbps / d2d,
            speedup_vs_per_block_memcpy: Some(gbps / per_block),
        });
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "{:<32} {:>10} {:>9} {:>9} {:>8} {:>10}",
            "what", "bytes", "GB/s", "d2d GB/s", "vs d2d", "vs memcpy"
        );
        for r in &rows {
            println!(
                "{:<32} {:>10} {:>9.1} {:>9.1} {:>8.2} {:>10}",
                r.what,
                format_size(r.bytes),
                r.gbps,
                r.d2d_gbps,
                r.ratio_to_d2d,
                r.speedup_vs_per_block_memcpy
                    .map_or("-".into(), |x| format!("{x:.1}x"))
            );
        }
    }
    Ok(())
}

/// GPU memory kinds of `pdx bench kv --mem`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemArg {
    /// Pageable/shared host memory (the host transports; the default).
    Host,
    /// Host memory the benchmark maps itself on both sides (private anonymous `mmap`, no memfd) and registers as
    /// it is, as an engine registers its KV cache by pointer or NIXL's users their NumPy arrays: reached by
    /// `cma`, `tcp` and `ucx`, never `shm`.
    Caller,
    /// GPU memory: a second process on the same GPU reads it through CUDA IPC.
    Device,
    /// Pinned host memory ↔ GPU memory.
    Pinned,
}

/// One row of `pdx bench kv --mem device|pinned` (also the JSON schema).
#[derive(Serialize, Deserialize, Debug)]
pub struct GpuKvRow {
    what: String,
    bytes: u64,
    gbps: f64,
    reference: String,
    reference_gbps: f64,
    ratio: f64,
}

/// Chunk of the pinned ↔ device pipeline (two streams alternate chunks, as a staged transport does).
const PIPELINE_CHUNK: usize = 4 << 20;

/// `pdx bench kv --mem device|pinned`: `sizes` per copy, `iters` timed copies each.
pub fn run_kv(mem: MemArg, sizes: &str, iters: u32, device: usize, json: bool) -> Result<()> {
    let sizes = parse_sizes(sizes).map_err(anyhow::Error::msg)?;
    let max = *sizes.iter().max().context("no sizes")? as usize;
    let dev = Device::new(device)?;
    let rows = match mem {
        MemArg::Host | MemArg::Caller => bail!("--mem host|caller is the host benchmark"),
        MemArg::Device => {
            // The exporter: an agent owning a device region; the child reads it through CUDA IPC, raw (the handle)
            // and through its own agent (the metadata), and compares with a device copy inside its process.
            let agent = Agent::new(AgentConfig::new("bench-gpu-exporter"))?;
            let region = agent.allocate_kind(MemoryKind::Device(device as u32), max)?;
            region.fill(0, max, 0x3C)?;
            let handle = serde_json::to_string(
                &region
                    .device_buffer()
                    .context("device region")?
                    .ipc_handle()?,
            )?;
            let md: String = agent
                .local_metadata()?
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let exe = std::env::current_exe().context("locating the pdx binary")?;
            let sizes_arg = sizes
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(",");
            let child = Command::new(exe)
                .args([
                    "bench",
                    "kv-gpu-target",
                    "--device",
                    &device.to_string(),
                    "--iters",
                    &iters.to_string(),
                ])
                .args([
                    "--sizes",
                    &sizes_arg,
                    "--handle",
                    &handle,
                    "--metadata",
                    &md,
                ])
                .args(["--region-addr", &region.addr().to_string()])
                .stdout(Stdio::piped())
                .spawn()
                .context("starting the IPC target process")?;
            let out = child.wait_with_output()?;
            if !out.status.success() {
                bail!("IPC target process failed ({})", out.status);
            }
            let mut rows = Vec::new();
            for line in BufReader::new(&out.stdout[..]).lines() {
                rows.push(serde_json::from_str::<GpuKvRow>(&line?)?);
            }
            drop(region);
            rows
        }
        MemArg::Pinned => {
            let mut rows = pinned_rows(&dev, &sizes, iters)?;
            rows.extend(engine_pinned_rows(device, &sizes, iters)?);
            rows
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "{:<34} {:>9} {:>9} {:<34} {:>9} {:>6}",
            "what", "size", "GB/s", "reference", "ref GB/s", "ratio"
        );
        for r in &rows {
            println!(
                "{:<34} {:>9} {:>9.1} {:<34} {:>9.1} {:>6.2}",
                r.what,
                format_size(r.bytes),
                r.gbps,
                r.reference,
                r.reference_gbps,
                r.ratio
            );
        }
    }
    Ok(())
}

fn pinned_rows(dev: &Device, sizes: &[u64], iters: u32) -> Result<Vec<GpuKvRow>> {
    let max = *sizes.iter().max().context("no sizes")? as usize;
    let pinned = PinnedHostBuffer::new(dev, max)?;
    let d = DeviceBuffer::new(dev, max)?;
    let (s0, s1) = (Stream::new(dev)?, Stream::new(dev)?);
    let mut rows = Vec::new();
    for &size in sizes {
        let n = size as usize;
        for h2d in [true, false] {
            let (dst, src): (&dyn GpuMemory, &dyn GpuMemory) =
                if h2d { (&d, &pinned) } else { (&pinned, &d) };
            let plain = time_gbps(&s0, dev, size, iters, || Ok(s0.copy(dst, 0, src, 0, n)?))?;
            // The staged-transport path: chunks alternating over two streams, joined at the end.
            let join = Event::new(dev)?;
            let piped = time_gbps(&s0, dev, size, iters, || {
                for (i, off) in (0..n).step_by(PIPELINE_CHUNK).enumerate() {
                    let len = PIPELINE_CHUNK.min(n - off);
                    let st = if i % 2 == 0 { &s0 } else { &s1 };
                    st.copy(dst, off, src, off, len)?;
                }
                s1.record(&join)?;
                s0.wait(&join)?;
                Ok(())
            })?;
            let dir = if h2d {
                "pinned->device"
            } else {
                "device->pinned"
            };
            rows.push(GpuKvRow {
                what: format!("{dir} (4 MiB chunks, 2 streams)"),
                bytes: size,
                gbps: piped,
                reference: format!("{dir} one cuMemcpyAsync"),
                reference_gbps: plain,
                ratio: piped / plain,
            });
        }
    }
    Ok(rows)
}

/// Seconds per request of `req` over `iters` posts (one warm-up); every post completes inside the call
/// (`cuda` requests wait for their stream).
fn time_requests(req: &XferRequest, iters: u32) -> Result<f64> {
    req.post()?;
    let t = Instant::now();
    for _ in 0..iters {
        req.post()?;
    }
    Ok(t.elapsed().as_secs_f64() / iters as f64)
}

/// Seconds per synchronised copy (`cuMemcpyAsync` + stream synchronise, wall clock), the same-run reference of
/// engine requests, which also wait for their copy.
fn time_sync_copies(s: &Stream, iters: u32, mut copy: impl FnMut() -> Result<()>) -> Result<f64> {
    copy()?;
    s.synchronize()?;
    let t = Instant::now();
    for _ in 0..iters {
        copy()?;
        s.synchronize()?;
    }
    Ok(t.elapsed().as_secs_f64() / iters as f64)
}

fn whole(m: &RegisteredMemory, len: usize) -> Result<XferDescList> {
    Ok(XferDescList {
        kind: m.kind(),
        descs: vec![m.desc(0, len)?],
    })
}

/// Transfer-engine rows of `--mem pinned`: one agent's pinned region ↔ another's device region in this process
/// (transport `cuda`), against a plain synchronised copy between the same buffers.
fn engine_pinned_rows(device: usize, sizes: &[u64], iters: u32) -> Result<Vec<GpuKvRow>> {
    let max = *sizes.iter().max().context("no sizes")? as usize;
    let a = Agent::new(AgentConfig::new("bench-pinned-a"))?;
    let b = Agent::new(AgentConfig::new("bench-pinned-b"))?;
    let pinned = a.allocate_kind(MemoryKind::PinnedHost, max)?;
    let dev_mem = b.allocate_kind(MemoryKind::Device(device as u32), max)?;
    a.load_remote(&b.local_metadata()?)?;
    let dev = Device::new(device)?;
    let s = Stream::new(&dev)?;
    // The same buffers, for the reference: the device region's buffer and a pinned buffer of the same size.
    let dbuf = dev_mem.device_buffer().context("device region")?.clone();
    let pbuf = PinnedHostBuffer::new(&dev, max)?;
    let mut rows = Vec::new();
    for &size in sizes {
        let n = size as usize;
        for op in [XferOp::Write, XferOp::Read] {
            let req = a.create_xfer_from_descs(
                op,
                &XferDescList {
                    kind: MemoryKind::PinnedHost,
                    descs: vec![pinned.desc(0, n)?],
                },
                "bench-pinned-b",
                &XferDescList {
                    kind: dev_mem.kind(),
                    descs: vec![dev_mem.desc(0, n)?],
                },
                XferOptions {
                    transport: Some(TransportKind::Cuda),
                    ..Default::default()
                },
            )?;
            let engine = time_requests(&req, iters)?;
            let plain = time_sync_copies(&s, iters, || {
                match op {
                    XferOp::Write => s.copy(&dbuf, 0, &pbuf, 0, n)?,
                    XferOp::Read => s.copy(&pbuf, 0, &dbuf, 0, n)?,
                }
                Ok(())
            })?;
            let dir = if op == XferOp::Write {
                "pinned->device"
            } else {
                "device->pinned"
            };
            rows.push(GpuKvRow {
                what: format!("engine {dir} (cuda transport)"),
                bytes: size,
                gbps: size as f64 / engine / 1e9,
                reference: format!("{dir} cuMemcpyAsync+sync"),
                reference_gbps: size as f64 / plain / 1e9,
                ratio: plain / engine,
            });
        }
    }
    Ok(rows)
}

/// Arguments of the hidden IPC target of `pdx bench kv --mem device`.
#[derive(clap::Args, Debug)]
pub struct GpuTargetArgs {
    /// The exporter's IPC handle (JSON).
    #[arg(long)]
    handle: String,
    /// Copy sizes in bytes, comma-separated.
    #[arg(long)]
    sizes: String,
    /// Timed copies per size.
    #[arg(long)]
    iters: u32,
    /// GPU index.
    #[arg(long)]
    device: usize,
    /// The exporter agent's metadata (hex), for the transfer-engine rows.
    #[arg(long)]
    metadata: String,
    /// Address of the exporter's device region.
    #[arg(long)]
    region_addr: u64,
}

/// The IPC side: opens the exporter's memory and, per size, times copies out of it (IPC D2D) and an in-process
/// device copy of the same size; prints one JSON row per line.
pub fn run_gpu_target(args: GpuTargetArgs) -> Result<()> {
    let dev = Device::new(args.device)?;
    let handle: IpcHandle = serde_json::from_str(&args.handle)?;
    let peer = handle.open(&dev)?;
    let sizes = parse_sizes(&args.sizes).map_err(anyhow::Error::msg)?;
    let max = *sizes.iter().max().context("no sizes")? as usize;
    if max > peer.len() {
        bail!("exporter memory is smaller than the largest size");
    }
    let (a, b) = (DeviceBuffer::new(&dev, max)?, DeviceBuffer::new(&dev, max)?);
    let s = Stream::new(&dev)?;
    for &size in &sizes {
        let n = size as usize;
        let local = time_gbps(&s, &dev, size, args.iters, || Ok(s.copy(&b, 0, &a, 0, n)?))?;
        let read = time_gbps(&s, &dev, size, args.iters, || {
            Ok(s.copy(&a, 0, &peer, 0, n)?)
        })?;
        let write = time_gbps(&s, &dev, size, args.iters, || {
            Ok(s.copy(&peer, 0, &a, 0, n)?)
        })?;
        for (what, gbps) in [
            ("ipc d2d read (peer -> own)", read),
            ("ipc d2d write (own -> peer)", write),
        ] {
            let row = GpuKvRow {
                what: what.into(),
                bytes: size,
                gbps,
                reference: "in-process d2d cuMemcpyAsync".into(),
                reference_gbps: local,
                ratio: gbps / local,
            };
            println!("{}", serde_json::to_string(&row)?);
        }
    }
    // The same through the transfer engine: an agent here loads the exporter's metadata (CUDA IPC handles, version
    // 3) and READs/WRITEs its device region with the `cuda` transport; reference: a synchronised in-process copy.
    let md: Vec<u8> = (0..args.metadata.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(args.metadata.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<std::result::Result<_, _>>()
        .context("--metadata is not hex")?;
    let agent = Agent::new(AgentConfig::new("bench-gpu-importer"))?;
    let exporter = agent.load_remote(&md)?;
    let mine = agent.allocate_kind(MemoryKind::Device(args.device as u32), max)?;
    for &size in &sizes {
        let n = size as usize;
        let remote = XferDescList {
            kind: MemoryKind::Device(handle.device()),
            descs: vec![pdx_transfer::XferDesc {
                addr: args.region_addr,
                len: size,
                dev_id: handle.device(),
            }],
        };
        let plain = time_sync_copies(&s, args.iters, || Ok(s.copy(&b, 0, &a, 0, n)?))?;
        for op in [XferOp::Read, XferOp::Write] {
            let req = agent.create_xfer_from_descs(
                op,
                &whole(&mine, n)?,
                &exporter,
                &remote,
                XferOptions::default(),
            )?;
            if req.transport() != TransportKind::Cuda {
                bail!("expected the cuda transport, got {}", req.transport());
            }
            let engine = time_requests(&req, args.iters)?;
            let row = GpuKvRow {
                what: format!(
                    "engine ipc {} (cuda transport)",
                    if op == XferOp::Read { "read" } else { "write" }
                ),
                bytes: size,
                gbps: size as f64 / engine / 1e9,
                reference: "in-process d2d cuMemcpyAsync+sync".into(),
                reference_gbps: size as f64 / plain / 1e9,
                ratio: plain / engine,
            };
            println!("{}", serde_json::to_string(&row)?);
        }
    }
    // Check the bytes went through the mapping (outside timing): the exporter filled 0x3C, we wrote `a` over it.
    let mut probe = vec![0u8; 64];
    s.memset(&a, 0, 64, 0x77)?;
    s.copy(&peer, 0, &a, 0, 64)?;
    s.download(&peer, 0, &mut probe)?;
    if probe.iter().any(|&x| x != 0x77) {
        bail!("IPC write did not land in the exporter's memory");
    }
    Ok(())
}
