// Runs kernels/kv_pack.cu on the CPU, for tests on machines without a GPU (crates/pdx-cuda/tests/kernel_on_cpu.rs):
// the same kv_copy / kv_offsets code, every CTA and thread of the grid executed in turn, Unit loads and stores
// done with memcpy and checked for the alignment the GPU requires.
//
// stdin (little-endian): u64 unit, pack, num_tensors, tensor_bytes, table_len, staging_bytes, then the 20 u64 of
// KvArgs (pointer fields ignored), then u64 tensor offset (from a 256-aligned base) per tensor, u64 staging
// offset, the tensors' bytes, the table (u32 each), the staging bytes. stdout: tensors' bytes, staging bytes.
// Exit status 3 on a misaligned access, 2 on bad input.
#define PDX_KV_HOST
#include "../kv_pack.cu"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

PdxDim3 blockIdx, threadIdx;

void pdx_kv_host_check_align(const void* p, int b) {
    if (reinterpret_cast<uintptr_t>(p) % b != 0) {
        std::fprintf(stderr, "misaligned %d-byte access at %p\n", b, p);
        std::exit(3);
    }
}

static void read_exact(void* dst, size_t n) {
    if (n && std::fread(dst, 1, n, stdin) != n) {
        std::fprintf(stderr, "short input\n");
        std::exit(2);
    }
}

static u64 read_u64() {
    u64 v;
    read_exact(&v, 8);
    return v;
}

static char* alloc256(size_t n) {
    void* p = std::aligned_alloc(256, (n + 255) / 256 * 256 + 256);
    if (!p) std::exit(2);
    return static_cast<char*>(p);
}

int main() {
    const u64 unit = read_u64(), pack = read_u64(), nt = read_u64(), tb = read_u64(), tl = read_u64(), sb = read_u64();
    KvArgs a;
    read_exact(&a, sizeof a);
    std::vector<u64> toff(nt);
    for (auto& o : toff) o = read_u64();
    const u64 soff = read_u64();
    std::vector<char*> tensors(nt);
    std::vector<u64> addrs(nt);
    for (u64 t = 0; t < nt; ++t) {
        tensors[t] = alloc256(toff[t] + tb);
        read_exact(tensors[t] + toff[t], tb);
        addrs[t] = reinterpret_cast<u64>(tensors[t] + toff[t]);
    }
    std::vector<u32> table(tl + 1);
    read_exact(table.data(), tl * 4);
    char* staging = alloc256(soff + sb);
    read_exact(staging + soff, sb);
    a.tensors = reinterpret_cast<u64>(addrs.data());
    a.table = reinterpret_cast<u64>(table.data());
    a.staging = reinterpret_cast<u64>(staging + soff);

    void (*k)(const KvArgs) = nullptr;
    switch (unit) {
        case 16: k = pack ? kv_pack_16 : kv_unpack_16; break;
        case 8: k = pack ? kv_pack_8 : kv_unpack_8; break;
        case 4: k = pack ? kv_pack_4 : kv_unpack_4; break;
        case 2: k = pack ? kv_pack_2 : kv_unpack_2; break;
        case 1: k = pack ? kv_pack_1 : kv_unpack_1; break;
        default: return 2;
    }
    for (u64 x = 0; x < a.pairs; ++x)
        for (u64 y = 0; y < a.chunks; ++y)
            for (unsigned t = 0; t < PDX_KV_THREADS; ++t) {
                blockIdx = {unsigned(x), unsigned(y), 0};
                threadIdx = {t, 0, 0};
                k(a);
            }
    for (u64 t = 0; t < nt; ++t) std::fwrite(tensors[t] + toff[t], 1, tb, stdout);
    std::fwrite(staging + soff, 1, sb, stdout);
    return 0;
}
