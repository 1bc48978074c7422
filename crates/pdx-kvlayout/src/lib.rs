//! Paged KV caches as pdx moves them, without I/O: the layout of a KV tensor, block-table validation, and the
//! CPU reference of the KV kernels of `kernels/kv_pack.cu` (pack = gather, unpack = scatter, NHD ↔ HND transform,
//! head slicing for heterogeneous tensor parallelism).
//!
//! # Tensors
//! An engine keeps, per layer, one K and one V tensor (vLLM's paged cache); pdx treats all of them alike, as
//! `num_tensors` tensors of the same [`KvLayout`], e.g. `2 * num_layers`. A tensor is `num_blocks` blocks of
//! `block_size` tokens, in one of two orders ([`BlockLayout`]):
//! - **NHD** `[num_blocks, block_size, heads, head_dim]` (vLLM's default flash-attention cache);
//! - **HND** `[num_blocks, heads, block_size, head_dim]` (FlashInfer / vLLM's NIXL "HND" layout).
//!
//! Elements are `elem_bytes` wide (2 for fp16/bf16, 1 for fp8) and are copied as bytes: the kernels never
//! interpret them.
//!
//! # Staging buffer
//! [`PackSpec`] describes one gather: for every entry `i` of a block table and every tensor `t`, block
//! `table[i]` of tensor `t`, restricted to heads `[head_start, head_end)`, is written to the staging buffer at
//! `(i * num_tensors + t) * staged_block_bytes` (block-major, so a contiguous range of table entries is a
//! contiguous range of staging bytes and can be sent as one descriptor), in the staging order
//! ([`BlockLayout`] again, over `head_end - head_start` heads). Unpack is the inverse: staging → the same
//! heads of the same blocks. Heterogeneous TP uses the head range: a decode rank with TP 2 reads heads
//! `[0, h/2)` or `[h/2, h)` of a TP 1 prefill (pack with a head slice, unpack over all heads); the other way
//! round, TP 1 decode unpacks each TP 2 prefill's staging into its half of the heads.
//!
//! # Kernel plan
//! [`PackSpec::plan`] computes what the kernels are launched with ([`KernelArgs`]): the vector width (16 bytes
//! when every base address and the row size allow it, else 8/4/2/1) and the longest run of rows that is
//! contiguous in both the tensor and the staging buffer (the whole block when the orders match and all heads
//! are taken). [`emulate_kernel`] executes those arguments exactly as the CUDA kernel does, thread by thread,
//! so the kernel's index arithmetic is tested on the CPU against [`pack_ref`] / [`unpack_ref`].

#![forbid(unsafe_code)]
#![deny(missing_docs)]

use serde::{Deserialize, Serialize};

/// Errors of layout description and validation. All are caller errors (fatal for the request, never retried).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// A dimension is zero or out of its allowed range.
    #[error("invalid KV layout: {0}")]
    Invalid(String),
    /// A size computed from the layout overflows 64 bits (or the address space).
    #[error("KV layout too large: {0}")]
    Overflow(String),
    /// A block table names a block the tensor does not have.
    #[error("block table entry {index} is block {block}, but the tensor has {num_blocks} blocks")]
    BlockOutOfRange {
        /// Position in the table.
        index: usize,
        /// The block id found there.
        block: u32,
        /// Blocks per tensor.
        num_blocks: u32,
    },
    /// A block table for a scatter names a block twice (two writers for the same bytes).
    #[error("block table entries {first} and {second} both name block {block} (a scatter needs distinct blocks)")]
    DuplicateBlock {
        /// First position.
        first: usize,
        /// Second position.
        second: usize,
        /// The block id.
        block: u32,
    },
    /// A buffer is too small for the operation.
    #[error("{what}: {have} bytes, need {need}")]
    BufferTooSmall {
        /// Which buffer.
        what: String,
        /// Its length in bytes.
        have: u64,
        /// Bytes needed.
        need: u64,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, LayoutError>;

/// Order of the dimensions of one KV block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BlockLayout {
    /// `[block_size, heads, head_dim]`: token-major (tensor `[num_blocks, block_size, heads, head_dim]`).
    Nhd,
    /// `[heads, block_size, head_dim]`: head-major (tensor `[num_blocks, heads, block_size, head_dim]`).
    Hnd,
}

impl BlockLayout {
    /// Byte offset of row `(token, head)` inside one block of `block_size` tokens and `heads` heads, rows of
    /// `row_bytes` (`head_dim * elem_bytes`).
    pub fn row_offset(
        self,
        token: u64,
        head: u64,
        block_size: u64,
        heads: u64,
        row_bytes: u64,
    ) -> u64 {
        match self {
            BlockLayout::Nhd => (token * heads + head) * row_bytes,
            BlockLayout::Hnd => (head * block_size + token) * row_bytes,
        }
    }
}

impl std::str::FromStr for BlockLayout {
    type Err = LayoutError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "nhd" => Ok(BlockLayout::Nhd),
            "hnd" => Ok(BlockLayout::Hnd),
            _ => Err(LayoutError::Invalid(format!(
                "layout {s:?} (expected nhd or hnd)"
            ))),
        }
    }
}

/// The shape of one KV tensor (one layer's K or V). Every size in it is validated to fit in 64 bits and in
/// the address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KvLayout {
    num_blocks: u32,
    block_size: u32,
    heads: u32,
    head_dim: u32,
    elem_bytes: u32,
    layout: BlockLayout,
}

impl KvLayout {
    /// A tensor of `num_blocks` blocks of `block_size` tokens, `heads` KV heads of `head_dim` elements of
    /// `elem_bytes` bytes (1, 2, 4 or 8), in `layout` order. Errors: a zero dimension, another element size,
    /// or a tensor whose byte size overflows.
    pub fn new(
        num_blocks: u32,
        block_size: u32,
        heads: u32,
        head_dim: u32,
        elem_bytes: u32,
        layout: BlockLayout,
    ) -> Result<Self> {
        if num_blocks == 0 || block_size == 0 || heads == 0 || head_dim == 0 {
            return Err(LayoutError::Invalid(format!(
                "zero dimension (num_blocks {num_blocks}, block_size {block_size}, heads {heads}, head_dim {head_dim})"
            )));
        }
        if !matches!(elem_bytes, 1 | 2 | 4 | 8) {
            return Err(LayoutError::Invalid(format!(
                "element size {elem_bytes} (expected 1, 2, 4 or 8 bytes)"
            )));
        }
        let l = KvLayout {
            num_blocks,
            block_size,
            heads,
            head_dim,
            elem_bytes,
            layout,
        };
        let total = [block_size, heads, head_dim, elem_bytes, num_blocks]
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .filter(|&b| usize::try_from(b).is_ok() && b <= isize::MAX as u64)
            .ok_or_else(|| LayoutError::Overflow(format!("{l:?}")))?;
        debug_assert_eq!(total, l.tensor_bytes());
        Ok(l)
    }
    /// Blocks per tensor.
    pub fn num_blocks(&self) -> u32 {
        self.num_blocks
    }
    /// Tokens per block.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }
    /// KV heads (of this rank).
    pub fn heads(&self) -> u32 {
        self.heads
    }
    /// Elements per head.
    pub fn head_dim(&self) -> u32 {
        self.head_dim
    }
    /// Bytes per element.
    pub fn elem_bytes(&self) -> u32 {
        self.elem_bytes
    }
    /// Dimension order.
    pub fn layout(&self) -> BlockLayout {
        self.layout
    }
    /// Bytes of one head of one token (`head_dim * elem_bytes`): the unit both orders keep contiguous.
    pub fn row_bytes(&self) -> u64 {
        self.head_dim as u64 * self.elem_bytes as u64
    }
    /// Bytes of one block (`block_size * heads * row_bytes`).
    pub fn block_bytes(&self) -> u64 {
        self.block_size as u64 * self.heads as u64 * self.row_bytes()
    }
    /// Bytes of the whole tensor (`num_blocks * block_bytes`).
    pub fn tensor_bytes(&self) -> u64 {
        self.num_blocks as u64 * self.block_bytes()
    }
    /// Byte offset of element 0 of `(block, token, head)` in the tensor. Arguments are not checked.
    pub fn offset(&self, block: u32, token: u32, head: u32) -> u64 {
        block as u64 * self.block_bytes()
            + self.layout.row_offset(
                token as u64,
                head as u64,
                self.block_size as u64,
                self.heads as u64,
                self.row_bytes(),
            )
    }
}

/// Checks a block table against a tensor of `num_blocks` blocks. With `distinct` (scatters), a block named
/// twice is an error too, since two table entries would write the same bytes.
pub fn validate_table(table: &[u32], num_blocks: u32, distinct: bool) -> Result<()> {
    let mut seen: Vec<u64> = if distinct {
        vec![0; (num_blocks as usize).div_ceil(64)]
    } else {
        Vec::new()
    };
    for (index, &block) in table.iter().enumerate() {
        if block >= num_blocks {
            return Err(LayoutError::BlockOutOfRange {
                index,
                block,
                num_blocks,
            });
        }
        if distinct {
            let (w, b) = (block as usize / 64, block % 64);
            if seen[w] & (1 << b) != 0 {
                let first = table.iter().position(|&x| x == block).unwrap_or(0);
                return Err(LayoutError::DuplicateBlock {
                    first,
                    second: index,
                    block,
                });
            }
            seen[w] |= 1 << b;
        }
    }
    Ok(())
}

/// One gather/scatter between `num_tensors` tensors of one [`KvLayout`] and a staging buffer: heads
/// `[head_start, head_end)` of each listed block, in `staging` order (see the crate docs for the byte layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackSpec {
    tensor: KvLayout,
    num_tensors: u32,
    head_start: u32,
    head_end: u32,
    staging: BlockLayout,
}

/// Threads per CTA of the KV kernels (`kernels/kv_pack.cu`, `PDX_KV_THREADS`).
pub const KERNEL_THREADS: u32 = 256;
/// Vector loads each thread issues before its stores (`PDX_KV_UNROLL`).
pub const KERNEL_UNROLL: u32 = 4;
/// Largest grid y dimension CUDA allows (CTAs per staged block).
const MAX_GRID_Y: u64 = 65_535;
/// Largest grid x dimension CUDA allows (table entries × tensors).
const MAX_GRID_X: u64 = (1 << 31) - 1;

impl PackSpec {
    /// A gather/scatter of heads `[head_start, head_end)` of `num_tensors` tensors shaped `tensor`, staged in
    /// `staging` order. Errors: no tensors, an empty or out-of-range head range.
    pub fn new(
        tensor: KvLayout,
        num_tensors: u32,
        head_start: u32,
        head_end: u32,
        staging: BlockLayout,
    ) -> Result<Self> {
        if num_tensors == 0 {
            return Err(LayoutError::Invalid("no tensors".into()));
        }
        if head_start >= head_end || head_end > tensor.heads {
            return Err(LayoutError::Invalid(format!(
                "head range [{head_start}, {head_end}) of a tensor with {} heads",
                tensor.heads
            )));
        }
        Ok(PackSpec {
            tensor,
            num_tensors,
            head_start,
            head_end,
            staging,
        })
    }
    /// All heads, staged in the tensor's own order (a plain gather).
    pub fn full(tensor: KvLayout, num_tensors: u32) -> Result<Self> {
        Self::new(tensor, num_tensors, 0, tensor.heads, tensor.layout)
    }
    /// The tensors' shape.
    pub fn tensor(&self) -> &KvLayout {
        &self.tensor
    }
    /// Number of tensors (e.g. `2 * layers`).
    pub fn num_tensors(&self) -> u32 {
        self.num_tensors
    }
    /// Heads taken: `[start, end)`.
    pub fn heads(&self) -> std::ops::Range<u32> {
        self.head_start..self.head_end
    }
    /// Order of each staged block.
    pub fn staging_layout(&self) -> BlockLayout {
        self.staging
    }
    /// Heads per staged block.
    pub fn head_count(&self) -> u32 {
        self.head_end - self.head_start
    }
    /// Bytes of one staged block (`block_size * head_count * row_bytes`).
    pub fn staged_block_bytes(&self) -> u64 {
        self.tensor.block_size as u64 * self.head_count() as u64 * self.tensor.row_bytes()
    }
    /// Staging bytes for a table of `entries` blocks (`entries * num_tensors * staged_block_bytes`), or
    /// `None` on overflow.
    pub fn staging_bytes(&self, entries: usize) -> Option<u64> {
        (entries as u64)
            .checked_mul(self.num_tensors as u64)?
            .checked_mul(self.staged_block_bytes())
    }
    /// Byte offset in the staging buffer of row `(token, head - head_start)` of tensor `t`'s copy of table entry `i`.
    fn staging_offset(&self, i: usize, t: u32, token: u32, head_in_slice: u32) -> u64 {
        (i as u64 * self.num_tensors as u64 + t as u64) * self.staged_block_bytes()
            + self.staging.row_offset(
                token as u64,
                head_in_slice as u64,
                self.tensor.block_size as u64,
                self.head_count() as u64,
                self.tensor.row_bytes(),
            )
    }

    /// Rows (of `row_bytes`) that follow one another in staging order and are also contiguous in the tensor:
    /// the whole block when orders match and all heads are taken, the head slice of one token (NHD) or all
    /// sliced heads (HND) when orders match, one row otherwise.
    pub fn run_rows(&self) -> u64 {
        let t = &self.tensor;
        let hc = self.head_count() as u64;
        match (t.layout, self.staging) {
            (BlockLayout::Nhd, BlockLayout::Nhd) if hc == t.heads as u64 => {
                t.block_size as u64 * hc
            }
            (BlockLayout::Nhd, BlockLayout::Nhd) => hc,
            // HND keeps each head's tokens together, so any head range is one contiguous span of the block.
            (BlockLayout::Hnd, BlockLayout::Hnd) => t.block_size as u64 * hc,
            _ => 1,
        }
    }

    /// The launch arguments of the KV kernels for a table of `entries` blocks. `align` is the bitwise OR of
    /// every base address involved (tensors and staging): the vector width is the largest of 16, 8, 4, 2, 1
    /// bytes that divides it and the run length. Pointers in the result are left 0 for the caller to fill.
    /// Errors: a grid CUDA cannot launch (more than 2^31-1 table entries × tensors, or a staged block that
    /// needs more than 65535 CTAs at the chosen width).
    pub fn plan(&self, entries: usize, align: u64) -> Result<KernelArgs> {
        let run_bytes = self.run_rows() * self.tensor.row_bytes();
        // Runs start at multiples of the block size when a run is a whole block, of the row size otherwise;
        // a unit must divide those starts, the run length and every base address.
        let whole_block = run_bytes == self.tensor.block_bytes();
        let starts = if whole_block {
            run_bytes
        } else {
            self.tensor.row_bytes()
        };
        let unit = [16u64, 8, 4, 2, 1]
            .into_iter()
            .find(|u| (align | run_bytes | starts) % u == 0)
            .unwrap_or(1);
        let pairs = (entries as u64)
            .checked_mul(self.num_tensors as u64)
            .filter(|&p| p <= MAX_GRID_X)
            .ok_or_else(|| {
                LayoutError::Overflow(format!("{entries} entries × {} tensors", self.num_tensors))
            })?;
        let units_per_block = self.staged_block_bytes() / unit;
        let per_cta = (KERNEL_THREADS * KERNEL_UNROLL) as u64;
        let chunks = units_per_block.div_ceil(per_cta);
        if chunks > MAX_GRID_Y {
            return Err(LayoutError::Overflow(format!(
                "staged block of {} bytes needs {chunks} CTAs at {unit}-byte width",
                self.staged_block_bytes()
            )));
        }
        let t = &self.tensor;
        Ok(KernelArgs {
            tensors: 0,
            table: 0,
            staging: 0,
            pairs,
            num_tensors: self.num_tensors as u64,
            num_blocks: t.num_blocks as u64,
            block_size: t.block_size as u64,
            heads: t.heads as u64,
            head_start: self.head_start as u64,
            head_count: self.head_count() as u64,
            row_bytes: t.row_bytes(),
            tensor_hnd: (t.layout == BlockLayout::Hnd) as u64,
            staging_hnd: (self.staging == BlockLayout::Hnd) as u64,
            run_rows: self.run_rows(),
            run_units: run_bytes / unit,
            units_per_block,
            staged_block_bytes: self.staged_block_bytes(),
            block_bytes: t.block_bytes(),
            unit,
            chunks,
        })
    }
}

/// The parameter block of every KV kernel, passed by value; `#[repr(C)]` and all `u64`, so it has the same
/// layout as `struct KvArgs` in `kernels/kv_pack.cu` (no padding on either side).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelArgs {
    /// Device address of an array of `num_tensors` tensor base addresses (`u64`).
    pub tensors: u64,
    /// Device address of the block table (`u32` ids, `pairs / num_tensors` entries).
    pub table: u64,
    /// Device address of the staging buffer.
    pub staging: u64,
    /// Table entries × tensors (grid x).
    pub pairs: u64,
    /// Tensors.
    pub num_tensors: u64,
    /// Blocks per tensor (ids at or above it are skipped by the kernel; the host validates first).
    pub num_blocks: u64,
    /// Tokens per block.
    pub block_size: u64,
    /// Heads per tensor block.
    pub heads: u64,
    /// First head taken.
    pub head_start: u64,
    /// Heads taken.
    pub head_count: u64,
    /// `head_dim * elem_bytes`.
    pub row_bytes: u64,
    /// 1 when tensors are HND.
    pub tensor_hnd: u64,
    /// 1 when staged blocks are HND.
    pub staging_hnd: u64,
    /// Rows per contiguous run ([`PackSpec::run_rows`]).
    pub run_rows: u64,
    /// Vector units per run.
    pub run_units: u64,
    /// Vector units per staged block.
    pub units_per_block: u64,
    /// Bytes per staged block.
    pub staged_block_bytes: u64,
    /// Bytes per tensor block.
    pub block_bytes: u64,
    /// Vector width in bytes (16, 8, 4, 2 or 1): which kernel instance to launch.
    pub unit: u64,
    /// CTAs per staged block (grid y).
    pub chunks: u64,
}

impl KernelArgs {
    /// Byte offsets (inside tensor `t`'s block `block`, inside the staged block of pair `p`) of vector unit `u`
    /// of a staged block. Mirrors `kv_offsets` in `kernels/kv_pack.cu` operation for operation.
    pub fn offsets(&self, block: u64, u: u64) -> (u64, u64) {
        let (run, within) = if self.run_units == self.units_per_block {
            (0, u)
        } else {
            let run = u / self.run_units;
            (run, u - run * self.run_units)
        };
        let row = run * self.run_rows;
        let (token, hs) = if self.staging_hnd != 0 {
            let hs = row / self.block_size;
            (row - hs * self.block_size, hs)
        } else {
            let token = row / self.head_count;
            (token, row - token * self.head_count)
        };
        let head = self.head_start + hs;
        let trow = if self.tensor_hnd != 0 {
            head * self.block_size + token
        } else {
            token * self.heads + head
        };
        let tensor_off = block * self.block_bytes + trow * self.row_bytes + within * self.unit;
        (tensor_off, u * self.unit)
    }
}

fn check_len(what: impl Into<String>, have: usize, need: u64) -> Result<()> {
    if (have as u64) < need {
        return Err(LayoutError::BufferTooSmall {
            what: what.into(),
            have: have as u64,
            need,
        });
    }
    Ok(())
}

fn check_buffers(
    spec: &PackSpec,
    tensor_lens: &[usize],
    table: &[u32],
    staging_len: usize,
    distinct: bool,
) -> Result<()> {
    if tensor_lens.len() != spec.num_tensors as usize {
        return Err(LayoutError::Invalid(format!(
            "{} tensors given, spec has {}",
            tensor_lens.len(),
            spec.num_tensors
        )));
    }
    for (t, &len) in tensor_lens.iter().enumerate() {
        check_len(format!("tensor {t}"), len, spec.tensor.tensor_bytes())?;
    }
    validate_table(table, spec.tensor.num_blocks, distinct)?;
    let need = spec
        .staging_bytes(table.len())
        .ok_or_else(|| LayoutError::Overflow("staging size".into()))?;
    check_len("staging buffer", staging_len, need)
}

/// CPU reference of the gather: for each table entry `i` and tensor `t`, heads `[head_start, head_end)` of block
/// `table[i]` of `tensors[t]` go to the staging buffer (crate docs give the layout). Written from the
/// definitions, row by row, independently of [`KernelArgs`]. Errors: wrong tensor count, short buffers,
/// out-of-range block ids.
pub fn pack_ref(
    spec: &PackSpec,
    tensors: &[&[u8]],
    table: &[u32],
    staging: &mut [u8],
) -> Result<()> {
    let lens: Vec<usize> = tensors.iter().map(|t| t.len()).collect();
    check_buffers(spec, &lens, table, staging.len(), false)?;
    let rb = spec.tensor.row_bytes() as usize;
    for (i, &block) in table.iter().enumerate() {
        for (t, tensor) in tensors.iter().enumerate() {
            for token in 0..spec.tensor.block_size {
                for h in spec.heads() {
                    let src = spec.tensor.offset(block, token, h) as usize;
                    let dst = spec.staging_offset(i, t as u32, token, h - spec.head_start) as usize;
                    staging[dst..dst + rb].copy_from_slice(&tensor[src..src + rb]);
                }
            }
        }
    }
    Ok(())
}

/// CPU reference of the scatter, the inverse of [`pack_ref`]: only heads `[head_start, head_end)` of the listed
/// blocks are written. Errors: as [`pack_ref`], plus a block listed twice.
pub fn unpack_ref(
    spec: &PackSpec,
    staging: &[u8],
    table: &[u32],
    tensors: &mut [&mut [u8]],
) -> Result<()> {
    let lens: Vec<usize> = tensors.iter().map(|t| t.len()).collect();
    check_buffers(spec, &lens, table, staging.len(), true)?;
    let rb = spec.tensor.row_bytes() as usize;
    for (i, &block) in table.iter().enumerate() {
        for (t, tensor) in tensors.iter_mut().enumerate() {
            for token in 0..spec.tensor.block_size {
                for h in spec.heads() {
                    let dst = spec.tensor.offset(block, token, h) as usize;
                    let src = spec.staging_offset(i, t as u32, token, h - spec.head_start) as usize;
                    tensor[dst..dst + rb].copy_from_slice(&staging[src..src + rb]);
                }
            }
        }
    }
    Ok(())
}

/// Runs the kernel's index space on the CPU exactly as `kernels/kv_pack.cu` does (grid `pairs × chunks`,
/// [`KERNEL_THREADS`] threads, [`KERNEL_UNROLL`] units each, [`KernelArgs::offsets`] per unit), copying
/// `args.unit` bytes per unit. `pack` selects gather or scatter. Validates like [`pack_ref`] first; the
/// pointer fields of `args` are ignored. Used by tests to check the kernel's arithmetic without a GPU.
pub fn emulate_kernel(
    spec: &PackSpec,
    args: &KernelArgs,
    pack: bool,
    tensors: &mut [&mut [u8]],
    table: &[u32],
    staging: &mut [u8],
) -> Result<()> {
    let lens: Vec<usize> = tensors.iter().map(|t| t.len()).collect();
    check_buffers(spec, &lens, table, staging.len(), !pack)?;
    let unit = args.unit as usize;
    let per_cta = (KERNEL_THREADS * KERNEL_UNROLL) as u64;
    for p in 0..args.pairs {
        let (i, t) = (p / args.num_tensors, (p % args.num_tensors) as usize);
        let block = table[i as usize] as u64;
        if block >= args.num_blocks {
            continue;
        }
        let stage_base = p * args.staged_block_bytes;
        for chunk in 0..args.chunks {
            for tid in 0..KERNEL_THREADS as u64 {
                for k in 0..KERNEL_UNROLL as u64 {
                    let u = chunk * per_cta + k * KERNEL_THREADS as u64 + tid;
                    if u >= args.units_per_block {
                        continue;
                    }
                    let (toff, soff) = args.offsets(block, u);
                    // The GPU faults on a misaligned vector access; relative to aligned bases, so does this.
                    if toff % args.unit != 0 || (stage_base + soff) % args.unit != 0 {
                        return Err(LayoutError::Invalid(format!(
                            "misaligned {}-byte access at tensor offset {toff}, staging offset {}",
                            args.unit,
                            stage_base + soff
                        )));
                    }
                    let (toff, soff) = (toff as usize, (stage_base + soff) as usize);
                    if pack {
                        staging[soff..soff + unit].copy_from_slice(&tensors[t][toff..toff + unit]);
                    } else {
                        tensors[t][toff..toff + unit].copy_from_slice(&staging[soff..soff + unit]);
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
