//! `pdx bench kv`: KV-transfer bandwidth and latency, in the manner of NIXL's nixlbench.
//!
//! The initiator posts one transfer request of `batch` blocks per iteration; blocks sit at a stride of the
//! largest block size in both buffers (scattered, like KV blocks in a cache). Each row reports GB/s (1e9
//! bytes/s), the p50/p99 latency of one batch from post to done, and the single-thread memcpy bandwidth of the
//! same blocks measured in the same run just before the row, with the ratio. `--layout reused` puts every block
//! of a batch at offset 0 instead (one block's footprint, as `ucx_perftest` measures).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use pdx_transfer::{
    Agent, AgentConfig, Memory, RegisteredMemory, TransportKind, XferDescList, XferOp, XferOptions,
    XferRequest, XferStatus,
};
use serde::Serialize;

use crate::units::{format_size, parse_sizes};

/// Which remote memory the transfers target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RemoteMemory {
    /// pdx-allocated memfd memory (reachable by `shm`).
    Shared,
    /// Caller-owned heap memory (reachable by `cma` and `tcp`).
    Owned,
    /// Memory allocated through UCX (`Agent::allocate_ucx`, needs the `ucx` feature): UCX's shared-memory
    /// transports reach it with direct RMA, as `ucx_perftest`'s buffers.
    Ucx,
    /// Memory the target mapped itself (private anonymous `mmap`, page-aligned, no memfd) and registered by
    /// pointer (`--mem caller`): reachable by `cma`, `tcp` and `ucx`.
    Caller,
}

/// Which local memory the initiator's blocks sit in (`--mem`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum LocalMemory {
    /// A pdx memfd arena (`Agent::allocate`).
    Shared,
    /// A private anonymous mapping registered as it is (`--mem caller`).
    Caller,
}

/// Transfer direction on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OpArg {
    /// Remote → local.
    Read,
    /// Local → remote.
    Write,
}

/// Arguments of `pdx bench kv`.
#[derive(clap::Args, Debug)]
pub struct KvArgs {
    /// Operations, comma-separated.
    #[arg(long, value_enum, default_value = "read,write", value_delimiter = ',')]
    op: Vec<OpArg>,
    /// Transports, comma-separated: auto, local, shm, cma, tcp.
    #[arg(long, default_value = "auto", value_delimiter = ',')]
    transport: Vec<String>,
    /// Block sizes: a doubling range `4KiB..64MiB`, a list `64KiB,1MiB`, or one size.
    #[arg(long, default_value = "4KiB..64MiB")]
    block_size: String,
    /// Blocks per transfer request.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// 1: initiator and target agents in this process; 2: the target in a child process.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
    procs: u8,
    /// Seconds of measurement per row (after a warm-up); at least 3 batches are always timed.
    #[arg(long, default_value_t = 1.0)]
    duration: f64,
    /// Verify every byte of every transfer (outside the timed section).
    #[arg(long)]
    check: bool,
    /// Remote memory kind; default: owned for cma, shared otherwise (`caller` with `--mem caller`).
    #[arg(long, value_enum)]
    remote_memory: Option<RemoteMemory>,
    /// Print rows as a JSON array instead of a table.
    #[arg(long)]
    json: bool,
    /// Memory: host (the host transports), caller (host memory each side maps itself and registers by pointer,
    /// no memfd: `cma`, `tcp`, `ucx`), device (two processes on one GPU through CUDA IPC), pinned (pinned
    /// host <-> GPU). The GPU kinds use `--block-size` as copy sizes and need CUDA.
    #[arg(long, value_enum, default_value = "host")]
    mem: crate::bench_gpu::MemArg,
    /// GPU kinds: timed copies per size (after one warm-up).
    #[arg(long, default_value_t = 20)]
    iters: u32,
    /// GPU kinds: the GPU index.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// `local`/`shm` copies: `auto` (streaming stores for requests of at least 8 MiB, the agent's default),
    /// `memcpy` (never streaming stores) or `streaming` (always).
    #[arg(long, value_enum, default_value = "auto")]
    copy: CopyArg,
    /// `local`/`shm` copies: threads sharing one large request (`AgentConfig::copy_threads`; default: the
    /// agent's, the available cores up to 4).
    #[arg(long)]
    copy_threads: Option<usize>,
    /// Where the blocks of a batch sit: `scattered` (a stride of the largest block size apart, in 1 GiB-class
    /// buffers, as KV blocks in a cache) or `reused` (every block of the batch is the same block at offset 0 on
    /// both sides: the footprint of one block, as `ucx_perftest` puts one buffer again and again).
    #[arg(long, value_enum, default_value = "scattered")]
    layout: LayoutArg,
}

/// Placement of a batch's blocks (`--layout`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum LayoutArg {
    /// One block every `stride` bytes.
    Scattered,
    /// All blocks at offset 0.
    Reused,
}

/// How `local`/`shm` transfers copy (`AgentConfig::streaming_copy_min_bytes`).
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum CopyArg {
    /// The agent's default threshold.
    Auto,
    /// Plain `memcpy` only.
    Memcpy,
    /// Non-temporal stores for every request.
    Streaming,
}

/// Arguments of the hidden target process.
#[derive(clap::Args, Debug)]
pub struct TargetArgs {
    /// Bytes of pdx-allocated (memfd) memory to register (0: none).
    #[arg(long)]
    shared_bytes: usize,
    /// Bytes of caller-owned memory to register (0: none).
    #[arg(long)]
    owned_bytes: usize,
    /// Allocate the owned region through UCX instead of the heap (`--remote-memory ucx`).
    #[arg(long)]
    owned_ucx: bool,
    /// Map the owned region privately (`mmap`) and register it by pointer instead of the heap (`--mem caller`).
    #[arg(long, conflicts_with = "owned_ucx")]
    owned_caller: bool,
    /// Fill both regions with the check pattern.
    #[arg(long)]
    pattern: bool,
}

/// One result row (also the `--json` schema).
#[derive(Serialize, Debug)]
struct Row {
    op: &'static str,
    transport: String,
    remote_memory: RemoteMemory,
    /// `shared` (a pdx memfd arena) or `caller` (`--mem caller`).
    local_memory: LocalMemory,
    procs: u8,
    /// Bytes.
    block_size: u64,
    batch_size: usize,
    iterations: u64,
    /// 1e9 bytes per second.
    gbps: f64,
    p50_us: f64,
    p99_us: f64,
    /// Single-thread memcpy of the same blocks, same run.
    memcpy_gbps: f64,
    ratio: f64,
    /// The machine's copy ceiling in the same run: the same blocks copied with streaming stores by one thread per
    /// core, in one process (no transfer engine). Rows of host-copy transports (`local`, `shm`, `cma`) whose
    /// request is at least the default `streaming_copy_min_bytes` (8 MiB) only.
    ceiling_gbps: Option<f64>,
    checked: bool,
    /// `scattered` or `reused` (`--layout`).
    layout: LayoutArg,
}

/// Seed of the target's regions; the initiator's blocks use `LOCAL_SEED` (and the iteration for writes).
const TARGET_SEED: u64 = 0x007A_26E7;

/// The host memory of a host region (the host benchmark registers nothing else).
fn host(m: &RegisteredMemory) -> Result<&Memory> {
    m.memory().context("benchmark region is not host memory")
}

/// Fills `len` bytes at `offset` of `mem` with the pattern of `seed` (one 64-bit mix per 8 bytes).
fn fill_pattern(mem: &Memory, offset: usize, len: usize, seed: u64) -> Result<()> {
    fill_pattern_from(mem, offset, len, seed, 0)
}

/// [`fill_pattern`] for a buffer whose block 0 (pattern offset 0) starts at byte `origin` of `mem`.
fn fill_pattern_from(
    mem: &Memory,
    offset: usize,
    len: usize,
    seed: u64,
    origin: usize,
) -> Result<()> {
    let mut buf = Vec::with_capacity(1 << 20);
    let mut done = 0;
    while done < len {
        let n = (len - done).min(1 << 20);
        pattern_into(&mut buf, (offset + done - origin) as u64, n, seed);
        mem.write_at(offset + done, &buf)?;
        done += n;
    }
    Ok(())
}

/// The pattern bytes for absolute offsets `[start, start+n)`.
fn pattern_into(buf: &mut Vec<u8>, start: u64, n: usize, seed: u64) {
    buf.clear();
    let first_word = start / 8;
    let skip = (start % 8) as usize;
    let words = (skip + n).div_ceil(8) as u64;
    for w in first_word..first_word + words {
        let x = (w ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        buf.extend_from_slice(&(x ^ (x >> 31)).to_le_bytes());
    }
    buf.drain(..skip);
    buf.truncate(n);
}

/// Checks `len` bytes at `local_off` of `mem` against the pattern of `seed` at absolute offset `pattern_off`.
fn verify(mem: &Memory, local_off: usize, len: usize, pattern_off: usize, seed: u64) -> Result<()> {
    let (mut got, mut want) = (vec![0u8; len.min(1 << 20)], Vec::new());
    let mut done = 0;
    while done < len {
        let n = (len - done).min(1 << 20);
        got.resize(n, 0);
        mem.read_at(local_off + done, &mut got)?;
        pattern_into(&mut want, (pattern_off + done) as u64, n, seed);
        if got != want {
            let i = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
            bail!(
                "byte {} of a block differs: got {:#04x}, expected {:#04x}",
                done + i,
                got[i],
                want[i]
            );
        }
        done += n;
    }
    Ok(())
}

/// The target agent's side, wherever it runs.
struct TargetInfo {
    name: String,
    shared: u64,
    owned: u64,
}

/// The target process of `--procs 2`.
struct TargetProcess {
    child: Child,
}

impl Drop for TargetProcess {
    fn drop(&mut self) {
        drop(self.child.stdin.take()); // the target exits when its stdin closes
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse_transports(names: &[String]) -> Result<Vec<Option<TransportKind>>> {
    names
        .iter()
        .map(|n| match n.as_str() {
            "auto" => Ok(None),
            other => other
                .parse::<TransportKind>()
                .map(Some)
                .map_err(anyhow::Error::msg),
        })
        .collect()
}

fn remote_memory_for(t: Option<TransportKind>, forced: Option<RemoteMemory>) -> RemoteMemory {
    forced.unwrap_or(match t {
        Some(TransportKind::Cma) => RemoteMemory::Owned,
        _ => RemoteMemory::Shared,
    })
}

/// How the target allocates its owned (non-memfd) region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OwnedKind {
    /// A heap `Vec`, blocks from its first page boundary.
    Heap,
    /// `Agent::allocate_ucx`.
    Ucx,
    /// A private anonymous mapping registered by pointer (`--mem caller`).
    Caller,
}

/// Checks the `--mem caller` combination: caller memory on both sides, never `shm` (no memfd to map).
fn caller_remote_memory(
    transports: &[Option<TransportKind>],
    forced: Option<RemoteMemory>,
) -> Result<RemoteMemory> {
    if forced.is_some_and(|m| m != RemoteMemory::Caller) {
        bail!("--mem caller registers caller memory on both sides; drop --remote-memory");
    }
    if transports.contains(&Some(TransportKind::Shm)) {
        bail!("--mem caller: shm maps memfd arenas; caller memory is reached by cma, tcp or ucx");
    }
    Ok(RemoteMemory::Caller)
}

/// Runs `pdx bench kv`.
pub fn run(args: KvArgs) -> Result<()> {
    use crate::bench_gpu::MemArg;
    if !matches!(args.mem, MemArg::Host | MemArg::Caller) {
        return crate::bench_gpu::run_kv(
            args.mem,
            &args.block_size,
            args.iters,
            args.device,
            args.json,
        );
    }
    let sizes = parse_sizes(&args.block_size).map_err(anyhow::Error::msg)?;
    let transports = parse_transports(&args.transport)?;
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let stride = *sizes.iter().max().context("no block sizes")? as usize;
    // Distance between the blocks of a batch; `reused` puts every block at offset 0, in one block of room.
    let block_stride = match args.layout {
        LayoutArg::Scattered => stride,
        LayoutArg::Reused => 0,
    };
    let region = block_stride
        .checked_mul(args.batch_size)
        .context("batch × block size overflows")?
        .max(stride);
    let caller = args.mem == MemArg::Caller;
    if !caller && args.remote_memory == Some(RemoteMemory::Caller) {
        // Only `--mem caller` makes the target map its own memory: rows would name memory the run never used.
        bail!("--remote-memory caller needs --mem caller");
    }
    let kinds: Vec<RemoteMemory> = if caller {
        let kind = caller_remote_memory(&transports, args.remote_memory)?;
        vec![kind; transports.len()]
    } else {
        transports
            .iter()
            .map(|t| remote_memory_for(*t, args.remote_memory))
            .collect()
    };
    let need = |k| if kinds.contains(&k) { region } else { 0 };
    let owned_kind = if caller {
        OwnedKind::Caller
    } else if kinds.contains(&RemoteMemory::Ucx) {
        OwnedKind::Ucx
    } else {
        OwnedKind::Heap
    };
    if owned_kind == OwnedKind::Ucx && kinds.contains(&RemoteMemory::Owned) {
        bail!("--remote-memory ucx cannot be combined with owned memory (cma) in one run");
    }
    let shared_bytes = need(RemoteMemory::Shared);
    let owned_bytes = need(RemoteMemory::Owned)
        .max(need(RemoteMemory::Ucx))
        .max(need(RemoteMemory::Caller));
    eprintln!(
        "pdx bench kv: {} process(es), batch {}, {}, {} per buffer",
        args.procs,
        args.batch_size,
        match args.layout {
            LayoutArg::Scattered => format!("stride {}", format_size(stride as u64)),
            LayoutArg::Reused => "every block at offset 0".to_string(),
        },
        format_size(region as u64)
    );

    // Target side.
    let mut in_process_target = None;
    let mut _target_process = None;
    let target: TargetInfo;
    let mut initiator_config = AgentConfig::new("bench-initiator");
    match args.copy {
        CopyArg::Auto => {}
        CopyArg::Memcpy => initiator_config.streaming_copy_min_bytes = u64::MAX,
        CopyArg::Streaming => initiator_config.streaming_copy_min_bytes = 0,
    }
    if let Some(t) = args.copy_threads {
        initiator_config.copy_threads = t.max(1);
    }
    let initiator = Agent::new(initiator_config)?;
    if args.procs == 1 {
        let agent = Agent::new(AgentConfig::new("bench-target"))?;
        let (shared, owned) =
            target_regions(&agent, shared_bytes, owned_bytes, owned_kind, args.check)?;
        target = TargetInfo {
            name: agent.name().to_string(),
            shared: shared.as_ref().map_or(0, |m| m.addr()),
            owned: owned.as_ref().map_or(0, OwnedTarget::base),
        };
        initiator.load_remote(&agent.local_metadata()?)?;
        in_process_target = Some((agent, shared, owned));
    } else {
        let exe = std::env::current_exe().context("locating the pdx binary")?;
        let mut cmd = Command::new(exe);
        cmd.args(["bench", "kv-target", "--shared-bytes"])
            .arg(shared_bytes.to_string())
            .arg("--owned-bytes")
            .arg(owned_bytes.to_string());
        if args.check {
            cmd.arg("--pattern");
        }
        match owned_kind {
            OwnedKind::Heap => {}
            OwnedKind::Ucx => {
                cmd.arg("--owned-ucx");
            }
            OwnedKind::Caller => {
                cmd.arg("--owned-caller");
            }
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the target process")?;
        let stdout = child.stdout.take().context("target stdout")?;
        let proc_guard = TargetProcess { child };
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() != 4 || f[0] != "READY" {
            bail!("target process did not start (said {line:?})");
        }
        let name = initiator.fetch_remote(f[1])?;
        target = TargetInfo {
            name,
            shared: f[2].parse()?,
            owned: f[3].parse()?,
        };
        _target_process = Some(proc_guard);
    }

    // The initiator's blocks: a pdx memfd arena, or (`--mem caller`) memory it maps itself and registers by pointer.
    let (local, local_kind) = if caller {
        let mem = Memory::anonymous(region, true)?;
        let local = initiator.register(mem, pdx_transfer::MemoryKind::Host)?;
        (local, LocalMemory::Caller)
    } else {
        (initiator.allocate(region)?, LocalMemory::Shared)
    };
    let reference_src = Memory::memfd("pdx-bench-memcpy", region, true)?;
    let scratch = if args.check {
        Some(initiator.allocate(region)?)
    } else {
        None
    };

    let rows_total = (transports.len() * args.op.len() * sizes.len()) as u64;
    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(rows_total)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut rows = Vec::new();
    for (ti, &transport) in transports.iter().enumerate() {
        let remote_kind = kinds[ti];
        let remote_base = match remote_kind {
            RemoteMemory::Shared => target.shared,
            RemoteMemory::Owned | RemoteMemory::Ucx | RemoteMemory::Caller => target.owned,
        };
        for &op in &args.op {
            for &bs in &sizes {
                bar.set_message(format!(
                    "{} {:?} {}",
                    transport.map_or("auto", TransportKind::name),
                    op,
                    format_size(bs)
                ));
                let spec = RowSpec {
                    op: match op {
                        OpArg::Read => XferOp::Read,
                        OpArg::Write => XferOp::Write,
                    },
                    transport,
                    remote_kind,
                    local_kind,
                    block: bs as usize,
                    stride: block_stride,
                    remote_base,
                };
                let row = run_row(
                    &args,
                    &initiator,
                    &target,
                    &local,
                    &reference_src,
                    scratch.as_ref(),
                    &spec,
                )
                .with_context(|| {
                    format!(
                        "{} {:?} {}",
                        transport.map_or("auto", TransportKind::name),
                        op,
                        format_size(bs)
                    )
                })?;
                rows.push(row);
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    drop(in_process_target);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&rows);
    }
    Ok(())
}

struct RowSpec {
    op: XferOp,
    transport: Option<TransportKind>,
    remote_kind: RemoteMemory,
    local_kind: LocalMemory,
    block: usize,
    stride: usize,
    remote_base: u64,
}

fn make_request(
    initiator: &Agent,
    target: &TargetInfo,
    local_base: u64,
    spec: &RowSpec,
    batch: usize,
    op: XferOp,
    transport: Option<TransportKind>,
) -> Result<XferRequest> {
    let blocks = |base: u64| {
        XferDescList::host_from(
            (0..batch).map(|i| (base + (i * spec.stride) as u64, spec.block as u64)),
        )
    };
    Ok(initiator.create_xfer_from_descs(
        op,
        &blocks(local_base),
        &target.name,
        &blocks(spec.remote_base),
        XferOptions {
            transport,
            notif: None,
        },
    )?)
}

fn post_and_wait(req: &XferRequest) -> Result<()> {
    if req.post()? == XferStatus::InProgress {
        req.wait(None)?;
    }
    Ok(())
}

/// Single-thread memcpy of the same blocks (same stride), for about `secs`: GB/s.
fn memcpy_reference(src: &Memory, dst: &Memory, spec: &RowSpec, batch: usize, secs: f64) -> f64 {
    // The same copy the `local` and `shm` transports run, so the ratio isolates the engine's overhead.
    let copy_batch = || {
        for i in 0..batch {
            let off = i * spec.stride;
            let _ = pdx_transfer::copy_host(src, off, dst, off, spec.block);
        }
    };
    copy_batch(); // warm-up
    let (start, mut n) = (Instant::now(), 0u64);
    while n < 3 || start.elapsed().as_secs_f64() < secs {
        copy_batch();
        n += 1;
    }
    (n * (batch * spec.block) as u64) as f64 / start.elapsed().as_secs_f64() / 1e9
}

/// The same copy as [`memcpy_reference`] with streaming stores on every core at once: each of `threads` threads
/// copies its share of every block, batch after batch, for `secs`; GB/s of all of them together. On a VM whose
/// memory bandwidth varies with its neighbours this moves run to run, and every host-copy row moves with it.
fn ceiling_reference(
    src: &Memory,
    dst: &Memory,
    spec: &RowSpec,
    batch: usize,
    secs: f64,
) -> Result<f64> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let share = spec.block.div_ceil(threads);
    let start = Instant::now();
    let bytes: u64 = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (at, len) = (t * share, share.min(spec.block.saturating_sub(t * share)));
                scope.spawn(move || -> Result<u64> {
                    let mut done = 0u64;
                    while done == 0 || start.elapsed().as_secs_f64() < secs {
                        for i in 0..batch {
                            let off = i * spec.stride + at;
                            pdx_transfer::copy_host_streaming(src, off, dst, off, len)?;
                        }
                        done += (batch * len) as u64;
                    }
                    Ok(done)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .map_err(|_| anyhow::anyhow!("copy ceiling thread panicked"))?
            })
            .sum::<Result<u64>>()
    })?;
    Ok(bytes as f64 / start.elapsed().as_secs_f64() / 1e9)
}

fn run_row(
    args: &KvArgs,
    initiator: &Agent,
    target: &TargetInfo,
    local: &RegisteredMemory,
    reference_src: &Memory,
    scratch: Option<&RegisteredMemory>,
    spec: &RowSpec,
) -> Result<Row> {
    let batch = args.batch_size;
    let req = make_request(
        initiator,
        target,
        local.addr(),
        spec,
        batch,
        spec.op,
        spec.transport,
    )?;
    // Verification of writes reads the blocks back over TCP, a transport independent of most under test.
    let readback = match (args.check, spec.op, scratch) {
        (true, XferOp::Write, Some(s)) => Some(make_request(
            initiator,
            target,
            s.addr(),
            spec,
            batch,
            XferOp::Read,
            Some(TransportKind::Tcp),
        )?),
        _ => None,
    };
    let memcpy_gbps = memcpy_reference(reference_src, host(local)?, spec, batch, args.duration);
    // Only where the engine itself copies with streaming stores by default (requests of 8 MiB or more): smaller
    // batches stay in the cache, where plain `memcpy` is the reference.
    let streamed =
        (batch * spec.block) as u64 >= AgentConfig::new("reference").streaming_copy_min_bytes;
    let host_copy = matches!(
        req.transport(),
        TransportKind::Local | TransportKind::Shm | TransportKind::Cma
    );
    let ceiling_gbps = (host_copy && streamed)
        .then(|| ceiling_reference(reference_src, host(local)?, spec, batch, args.duration))
        .transpose()?;
    for _ in 0..2 {
        post_and_wait(&req)?; // warm-up: connections, page tables, caches
    }
    let mut hist = Histogram::<u64>::new(3)?;
    let (mut busy, mut n) = (Duration::ZERO, 0u64);
    let wall = Instant::now();
    while n < 3 || wall.elapsed().as_secs_f64() < args.duration {
        if args.check {
            prepare_check(local, spec, batch, n)?;
        }
        let t0 = Instant::now();
        post_and_wait(&req)?;
        let dt = t0.elapsed();
        busy += dt;
        hist.record(dt.as_nanos().max(1) as u64)?;
        n += 1;
        if args.check {
            check_blocks(local, scratch, readback.as_ref(), spec, batch, n - 1)?;
        }
    }
    if args.check && spec.op == XferOp::Write {
        // Put the target's pattern back (it is position-based), so later READ rows can check against it.
        for i in 0..batch {
            let off = i * spec.stride;
            fill_pattern(host(local)?, off, spec.block, TARGET_SEED)?;
        }
        post_and_wait(&req)?;
    }
    let bytes = n * (batch * spec.block) as u64;
    let gbps = bytes as f64 / busy.as_secs_f64() / 1e9;
    Ok(Row {
        op: match spec.op {
            XferOp::Read => "read",
            XferOp::Write => "write",
        },
        transport: req.transport().to_string(),
        remote_memory: spec.remote_kind,
        local_memory: spec.local_kind,
        procs: args.procs,
        block_size: spec.block as u64,
        batch_size: batch,
        iterations: n,
        gbps,
        p50_us: hist.value_at_quantile(0.5) as f64 / 1e3,
        p99_us: hist.value_at_quantile(0.99) as f64 / 1e3,
        memcpy_gbps,
        ratio: gbps / memcpy_gbps,
        ceiling_gbps,
        checked: args.check,
        layout: args.layout,
    })
}

/// Before a checked iteration: poison the local blocks (READ) or write fresh content into them (WRITE).
fn prepare_check(local: &RegisteredMemory, spec: &RowSpec, batch: usize, iter: u64) -> Result<()> {
    for i in 0..batch {
        let off = i * spec.stride;
        match spec.op {
            XferOp::Read => local.fill(off, spec.block, 0xEE)?,
            XferOp::Write => fill_pattern(host(local)?, off, spec.block, iter + 1)?,
        }
    }
    Ok(())
}

fn check_blocks(
    local: &RegisteredMemory,
    scratch: Option<&RegisteredMemory>,
    readback: Option<&XferRequest>,
    spec: &RowSpec,
    batch: usize,
    iter: u64,
) -> Result<()> {
    match (spec.op, readback, scratch) {
        (XferOp::Read, _, _) => {
            for i in 0..batch {
                let off = i * spec.stride;
                verify(host(local)?, off, spec.block, off, TARGET_SEED)
                    .with_context(|| format!("READ block {i}"))?;
            }
        }
        (XferOp::Write, Some(rb), Some(s)) => {
            post_and_wait(rb)?;
            for i in 0..batch {
                let off = i * spec.stride;
                verify(host(s)?, off, spec.block, off, iter + 1)
                    .with_context(|| format!("WRITE block {i}"))?;
            }
        }
        _ => bail!("write check needs a scratch region"),
    }
    Ok(())
}

fn target_regions(
    agent: &Agent,
    shared_bytes: usize,
    owned_bytes: usize,
    owned_kind: OwnedKind,
    pattern: bool,
) -> Result<(Option<RegisteredMemory>, Option<OwnedTarget>)> {
    let shared = (shared_bytes > 0)
        .then(|| agent.allocate(shared_bytes))
        .transpose()?;
    let owned = (owned_bytes > 0)
        .then(|| -> Result<OwnedTarget> {
            if owned_kind == OwnedKind::Caller {
                // As an engine maps its KV cache: page-aligned, faulted in, no memfd, registered as it is.
                let mem = Memory::anonymous(owned_bytes, true)?;
                return Ok(OwnedTarget {
                    mem: agent.register(mem, pdx_transfer::MemoryKind::Host)?,
                    pad: 0,
                });
            }
            if owned_kind == OwnedKind::Ucx {
                #[cfg(feature = "ucx")]
                return Ok(OwnedTarget {
                    mem: agent.allocate_ucx(owned_bytes)?, // page-aligned and zero-filled: every page is in
                    pad: 0,
                });
                #[cfg(not(feature = "ucx"))]
                bail!("--remote-memory ucx needs pdx built with --features ucx");
            }
            // A heap Vec starts 16 bytes into its allocation; the blocks start at the first page boundary
            // instead, as a real KV cache does. The kernel's copy into a destination that is not 64-byte aligned
            // runs several times slower (docs/benchmarks.md, the `cma` WRITE alignment note), which would make `cma`
            // WRITE rows measure the allocator, not the transport.
            let buf = vec![0u8; owned_bytes + PAGE];
            let pad = (PAGE - buf.as_ptr() as usize % PAGE) % PAGE;
            let mem = agent.register_vec(buf)?;
            mem.fill(0, mem.len(), 1)?; // fault every page in now
            Ok(OwnedTarget { mem, pad })
        })
        .transpose()?;
    if pattern {
        if let Some(m) = &shared {
            fill_pattern(host(m)?, 0, m.len(), TARGET_SEED)?;
        }
        if let Some(o) = &owned {
            fill_pattern_from(host(&o.mem)?, o.pad, owned_bytes, TARGET_SEED, o.pad)?;
        }
    }
    Ok((shared, owned))
}

const PAGE: usize = 4096;

/// The target's caller-owned region and where its page-aligned blocks start.
struct OwnedTarget {
    mem: RegisteredMemory,
    /// Bytes from the region's start to the first page boundary, where block 0 starts.
    pad: usize,
}

impl OwnedTarget {
    /// Address of block 0.
    fn base(&self) -> u64 {
        self.mem.addr() + self.pad as u64
    }
}

/// Runs the hidden `pdx bench kv-target`: registers memory, prints `READY <listen> <shared> <owned>`, and
/// serves until its standard input closes.
pub fn run_target(args: TargetArgs) -> Result<()> {
    let agent = Agent::new(AgentConfig::new("bench-target"))?;
    let (shared, owned) = target_regions(
        &agent,
        args.shared_bytes,
        args.owned_bytes,
        if args.owned_caller {
            OwnedKind::Caller
        } else if args.owned_ucx {
            OwnedKind::Ucx
        } else {
            OwnedKind::Heap
        },
        args.pattern,
    )?;
    let addr = agent.listen_addr().context("target has no listener")?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "READY {addr} {} {}",
        shared.as_ref().map_or(0, |m| m.addr()),
        owned.as_ref().map_or(0, OwnedTarget::base)
    )?;
    out.flush()?;
    drop(out);
    std::io::copy(&mut std::io::stdin(), &mut std::io::sink())?;
    Ok(())
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<6} {:<9} {:>6} {:>6} {:>9} {:>5} {:>9} {:>10} {:>10} {:>11} {:>6} {:>12}",
        "op",
        "transport",
        "local",
        "remote",
        "block",
        "batch",
        "GB/s",
        "p50 µs",
        "p99 µs",
        "memcpy GB/s",
        "ratio",
        "ceiling GB/s"
    );
    for r in rows {
        println!(
            "{:<6} {:<9} {:>6} {:>6} {:>9} {:>5} {:>9.2} {:>10.1} {:>10.1} {:>11.2} {:>6.2} {:>12}",
            r.op,
            r.transport,
            match r.local_memory {
                LocalMemory::Shared => "shared",
                LocalMemory::Caller => "caller",
            },
            match r.remote_memory {
                RemoteMemory::Shared => "shared",
                RemoteMemory::Owned => "owned",
                RemoteMemory::Ucx => "ucx",
                RemoteMemory::Caller => "caller",
            },
            format_size(r.block_size),
            r.batch_size,
            r.gbps,
            r.p50_us,
            r.p99_us,
            r.memcpy_gbps,
            r.ratio,
            r.ceiling_gbps
                .map_or("-".to_string(), |c| format!("{c:.2}"))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_position_based_at_any_offset() {
        let mut whole = Vec::new();
        pattern_into(&mut whole, 0, 100, 9);
        let mut part = Vec::new();
        pattern_into(&mut part, 13, 50, 9);
        assert_eq!(part, whole[13..63]);
        let mem = Memory::from_vec(vec![0; 100]).unwrap();
        fill_pattern(&mem, 5, 90, 9).unwrap();
        verify(&mem, 5, 90, 5, 9).unwrap();
        assert!(verify(&mem, 5, 90, 6, 9).is_err());
        assert!(verify(&mem, 5, 90, 5, 10).is_err());
    }

    #[test]
    fn copy_ceiling_copies_every_block_and_reports_bad_ranges() {
        let spec = |block, stride| RowSpec {
            op: XferOp::Read,
            transport: Some(TransportKind::Shm),
            remote_kind: RemoteMemory::Shared,
            local_kind: LocalMemory::Shared,
            block,
            stride,
            remote_base: 0,
        };
        let src = Memory::from_vec(vec![0; 4096]).unwrap();
        fill_pattern(&src, 0, 4096, 3).unwrap();
        let dst = Memory::from_vec(vec![0; 4096]).unwrap();
        // Four blocks of 1000 bytes at a 1024-byte stride, shared among the threads by byte ranges.
        assert!(ceiling_reference(&src, &dst, &spec(1000, 1024), 4, 0.0).unwrap() > 0.0);
        for i in 0..4 {
            verify(&dst, i * 1024, 1000, i * 1024, 3).unwrap();
        }
        // A batch that runs past the buffers is an error, not a figure.
        assert!(ceiling_reference(&src, &dst, &spec(1000, 1024), 5, 0.0).is_err());
    }
}
