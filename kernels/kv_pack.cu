// KV block gather (pack) and scatter (unpack) between paged KV tensors and a contiguous staging buffer, with
// NHD <-> HND reordering and head slicing for heterogeneous tensor parallelism.
//
// Layouts, the staging format and every launch argument are defined in crates/pdx-kvlayout (Rust): this file
// must stay in step with `KernelArgs` (same field order, all 64-bit) and `KernelArgs::offsets` there, which the
// CPU tests execute thread by thread (`emulate_kernel`) against a reference written from the definitions.
//
// Grid: x = table entry * num_tensors + tensor (one staged block each), y = chunk of a staged block; 256 threads;
// each thread moves PDX_KV_UNROLL units of B bytes (16 when every base address and row allows it; the host picks
// kv_pack_B / kv_unpack_B), loading all of them before storing any, so each thread keeps several memory requests
// in flight.
//
// Self-contained on purpose (no #include): NVRTC compiles this same text at run time when nvcc was not present
// at build time.

#ifdef PDX_KV_HOST
// CPU build of this file for tests (kernels/host/kv_host.cpp): the CUDA keywords vanish, the built-in indices
// become globals the harness sets, and each Unit below moves its bytes with memcpy instead of PTX (checking the
// alignment the GPU would fault on).
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
struct PdxDim3 { unsigned x, y, z; };
extern PdxDim3 blockIdx, threadIdx;
#endif

#define PDX_KV_THREADS 256
#define PDX_KV_UNROLL 4

typedef unsigned long long u64;
typedef unsigned int u32;

// Mirrors pdx_kvlayout::KernelArgs (#[repr(C)], 20 x u64, no padding).
struct KvArgs {
    u64 tensors;            // device address of u64[num_tensors]: tensor base addresses
    u64 table;              // device address of u32[pairs / num_tensors]: block ids
    u64 staging;            // device address of the staging buffer
    u64 pairs;              // table entries * tensors (grid x)
    u64 num_tensors;
    u64 num_blocks;         // blocks per tensor; ids at or above are skipped (the host validated them)
    u64 block_size;         // tokens per block
    u64 heads;              // heads per tensor block
    u64 head_start;         // first head taken
    u64 head_count;         // heads taken
    u64 row_bytes;          // head_dim * elem_bytes
    u64 tensor_hnd;         // 1: tensors are [blocks, heads, block_size, head_dim]; 0: [blocks, block_size, heads, head_dim]
    u64 staging_hnd;        // 1: staged blocks are [head_count, block_size, head_dim]; 0: [block_size, head_count, head_dim]
    u64 run_rows;           // rows per run contiguous in both tensor and staging
    u64 run_units;          // units per run
    u64 units_per_block;    // units per staged block (< 2^26: the host limits chunks to 65535)
    u64 staged_block_bytes;
    u64 block_bytes;        // bytes per tensor block
    u64 unit;               // bytes per unit (selects the kernel instance; informational here)
    u64 chunks;             // CTAs per staged block (grid y)
};

// One unit of B bytes: explicit ld.global / st.global of the full width (a 16-byte unit is one 128-bit access),
// held in 32-bit registers (no struct copies the compiler could split or spill).
template <int B> struct Unit;
#ifdef PDX_KV_HOST
void pdx_kv_host_check_align(const void* p, int b);
template <int B> struct Unit {
    unsigned char bytes[B];
    void load(const char* p) { pdx_kv_host_check_align(p, B); __builtin_memcpy(bytes, p, B); }
    void store(char* p) const { pdx_kv_host_check_align(p, B); __builtin_memcpy(p, bytes, B); }
};
#else
template <> struct Unit<16> {
    u32 x, y, z, w;
    __device__ __forceinline__ void load(const char* p) {
        asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(x), "=r"(y), "=r"(z), "=r"(w) : "l"(p));
    }
    __device__ __forceinline__ void store(char* p) const {
        asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(x), "r"(y), "r"(z), "r"(w) : "memory");
    }
};
template <> struct Unit<8> {
    u32 x, y;
    __device__ __forceinline__ void load(const char* p) {
        asm volatile("ld.global.v2.u32 {%0, %1}, [%2];" : "=r"(x), "=r"(y) : "l"(p));
    }
    __device__ __forceinline__ void store(char* p) const {
        asm volatile("st.global.v2.u32 [%0], {%1, %2};" ::"l"(p), "r"(x), "r"(y) : "memory");
    }
};
template <> struct Unit<4> {
    u32 x;
    __device__ __forceinline__ void load(const char* p) { asm volatile("ld.global.u32 %0, [%1];" : "=r"(x) : "l"(p)); }
    __device__ __forceinline__ void store(char* p) const {
        asm volatile("st.global.u32 [%0], %1;" ::"l"(p), "r"(x) : "memory");
    }
};
template <> struct Unit<2> {
    unsigned short x;
    __device__ __forceinline__ void load(const char* p) { asm volatile("ld.global.u16 %0, [%1];" : "=h"(x) : "l"(p)); }
    __device__ __forceinline__ void store(char* p) const {
        asm volatile("st.global.u16 [%0], %1;" ::"l"(p), "h"(x) : "memory");
    }
};
template <> struct Unit<1> {
    unsigned short x;  // PTX has no 8-bit registers: u8 loads widen into 16 bits
    __device__ __forceinline__ void load(const char* p) { asm volatile("ld.global.u8 %0, [%1];" : "=h"(x) : "l"(p)); }
    __device__ __forceinline__ void store(char* p) const {
        asm volatile("st.global.u8 [%0], %1;" ::"l"(p), "h"(x) : "memory");
    }
};
#endif

// Byte offsets of unit `u` of a staged block: inside the tensor (from its base, block `block`) and inside the
// staged block. Mirrors KernelArgs::offsets. All quotients fit in 32 bits (u < units_per_block < 2^26, and a
// row index is at most the unit index whenever a run is shorter than the block), so 32-bit division is exact.
__device__ __forceinline__ void kv_offsets(const KvArgs& a, u64 block, u32 u, u64& toff, u64& soff) {
    u32 run = 0, within = u;
    if (a.run_units != a.units_per_block) {
        const u32 ru = (u32)a.run_units;
        run = u / ru;
        within = u - run * ru;
    }
    const u32 row = run * (u32)a.run_rows;
    u32 token, hs;
    if (a.staging_hnd) {
        const u32 bs = (u32)a.block_size;
        hs = row / bs;
        token = row - hs * bs;
    } else {
        const u32 hc = (u32)a.head_count;
        token = row / hc;
        hs = row - token * hc;
    }
    const u64 head = a.head_start + hs;
    const u64 trow = a.tensor_hnd ? head * a.block_size + token : (u64)token * a.heads + head;
    toff = block * a.block_bytes + trow * a.row_bytes + (u64)within * a.unit;
    soff = (u64)u * a.unit;
}

template <int B, bool PACK>
__device__ __forceinline__ void kv_copy(const KvArgs& a) {
    const u64 p = blockIdx.x;
    if (p >= a.pairs) return;
    const u64 i = p / a.num_tensors;
    const u64 t = p - i * a.num_tensors;
    const u64 block = reinterpret_cast<const u32*>(a.table)[i];
    if (block >= a.num_blocks) return;
    char* tensor = reinterpret_cast<char*>(reinterpret_cast<const u64*>(a.tensors)[t]);
    char* stage = reinterpret_cast<char*>(a.staging) + p * a.staged_block_bytes;
    const u32 units = (u32)a.units_per_block;
    const u32 base = blockIdx.y * (PDX_KV_THREADS * PDX_KV_UNROLL) + threadIdx.x;

    // All loads first, then all stores: PDX_KV_UNROLL requests in flight per thread.
    Unit<B> regs[PDX_KV_UNROLL];
    char* dst[PDX_KV_UNROLL];
#pragma unroll
    for (int k = 0; k < PDX_KV_UNROLL; ++k) {
        const u32 u = base + k * PDX_KV_THREADS;
        dst[k] = nullptr;
        if (u < units) {
            u64 toff, soff;
            kv_offsets(a, block, u, toff, soff);
            if (PACK) {
                regs[k].load(tensor + toff);
                dst[k] = stage + soff;
            } else {
                regs[k].load(stage + soff);
                dst[k] = tensor + toff;
            }
        }
    }
#pragma unroll
    for (int k = 0; k < PDX_KV_UNROLL; ++k) {
        if (dst[k] != nullptr) regs[k].store(dst[k]);
    }
}

#define PDX_KV_KERNELS(B)                                                                                        \
    extern "C" __global__ void __launch_bounds__(PDX_KV_THREADS) kv_pack_##B(const KvArgs a) {               \
        kv_copy<B, true>(a);                                                                                     \
    }                                                                                                            \
    extern "C" __global__ void __launch_bounds__(PDX_KV_THREADS) kv_unpack_##B(const KvArgs a) {             \
        kv_copy<B, false>(a);                                                                                    \
    }

PDX_KV_KERNELS(16)
PDX_KV_KERNELS(8)
PDX_KV_KERNELS(4)
PDX_KV_KERNELS(2)
PDX_KV_KERNELS(1)
