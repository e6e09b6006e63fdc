/* blockwise_8bit.cu -- 8-bit blockwise quantize and dequantize against a 256-entry float code.
 *
 * Semantics: csrc/cpu/blockwise_8bit.cpp, bit for bit:
 *   per block (full or tail alike): absmax = max|x|
 *     NaN or +-Inf in the block -> absmax NaN / +Inf, bytes 0; absmax == 0 -> bytes 0
 *     else inv = 1 / absmax; byte = entry(bin(clamp(x * inv, -1, 1)))
 *   dequantize: out = to_dtype(code[q] * absmax[block]).
 *
 * The lookup: the CPU builds a 65536-entry table per code (fmt::build_lut8) and indexes it with
 * fmt::lut8_bin. Here each CTA keeps only the code's 255 midpoints (twice: 2 KiB of shared
 * memory, computed with fmt::midpoint8) and computes the table entry of each value's bin on the
 * spot (lowbit_device.h): an 8-step search of the midpoints laid out as a breadth-first tree when
 * they are sorted (every code lowbit and bitsandbytes create) -- the lanes' probes of one step
 * then fall in distinct banks for the first six steps, where a search of the sorted array probed
 * bank 31 five times -- and the sweep's O(255) definition otherwise. Same bins, same
 * entries, same bytes -- device_math_test.cpp proves the entry functions equal the CPU table
 * for all 65536 bins. Why not the table itself:
 *   - in global memory it would need a build kernel + scratch buffer per call, or a cache keyed
 *     by the code's contents, which lives on the device (comparing it means a device->host copy
 *     and a sync per call);
 *   - in shared memory it would take 64 KiB per CTA (1-3 CTAs per SM instead of 8+) and
 *     building it (65536 entries x 8 steps) costs more than quantizing a 4096-value block;
 *   - the search's 8 shared-memory reads per value overlap across the EPT independent values
 *     of a thread and across warps; the op stays bound by global memory traffic.
 */
#include "kernels.cuh"

namespace lowbit {
namespace gpu {
namespace {

/* Elements per thread: 32->2, 64->2, 128->4, 256->8, 512..2048->8, 4096->16 (groups of 16..256
 * threads, as in quantize_4bit.cu). */
template <int BS>
struct Split8 {
    static constexpr int kEpt = BS <= 64 ? 2 : (BS == 128 ? 4 : (BS == 4096 ? 16 : 8));
    static constexpr int kGroup = BS / kEpt;
    static_assert(kGroup <= kThreads && kThreads % kGroup == 0, "group must tile the CTA");
};

/* quantize: launch layout
 *   grid.x = ceil(blocks / (kThreads / G)), kThreads per CTA; a group of G threads owns one
 *   quantization block (G <= 32: one warp or less, shuffle-only max), thread t owns elements
 *   [start + t*EPT, +EPT).
 * memory access: each CTA first reads the 1 KiB code (L2-resident after the first CTAs) into
 *   shared midpoints; a thread then reads EPT consecutive inputs (vector load when `vec`) and
 *   writes EPT consecutive bytes (16..128-bit store); thread 0 of a group writes the absmax. */
template <class E, int BS>
__global__ void __launch_bounds__(kThreads)
    k_quantize_blockwise(const float *__restrict__ code, const typename E::T *__restrict__ A,
                         int64_t n, int64_t nblocks, uint8_t *__restrict__ out,
                         float *__restrict__ absmax, bool vec) {
    constexpr int EPT = Split8<BS>::kEpt;
    constexpr int G = Split8<BS>::kGroup;
    __shared__ Midpoints8 mid;
    const bool sorted = load_midpoints8(code, mid);

    const int t = static_cast<int>(threadIdx.x) % G;
    const int64_t b = static_cast<int64_t>(blockIdx.x) * (kThreads / G) + threadIdx.x / G;
    const int64_t first = b * BS + static_cast<int64_t>(t) * EPT;
    float x[EPT];
    int cnt = 0;
    if (b < nblocks && first + EPT <= n) {
        cnt = EPT;
        if (vec) {
            load_vec<E, EPT>(A + first, x);
        } else {
#pragma unroll
            for (int i = 0; i < EPT; ++i) x[i] = E::load(A[first + i]);
        }
    } else {
        if (b < nblocks && first < n) cnt = static_cast<int>(n - first);
#pragma unroll
        for (int i = 0; i < EPT; ++i) x[i] = (i < cnt) ? E::load(A[first + i]) : 0.0f;
    }
    float m = 0.0f;
    int nan = 0;
#pragma unroll
    for (int i = 0; i < EPT; ++i) absmax_add(x[i], m, nan);
    group_absmax<G>(m, nan);
    if (b >= nblocks) return;

    const Block8 blk = block8(m, nan);
    if (t == 0) absmax[b] = blk.absmax;
    uint8_t q[EPT];
#pragma unroll
    for (int i = 0; i < EPT; ++i) q[i] = blk.encode ? fmt::encode_8bit(x[i], blk.inv, mid.in_order, mid.tree, sorted) : 0;
    if (vec && cnt == EPT) {
        store_bytes<EPT>(out + first, q);
    } else {
#pragma unroll
        for (int i = 0; i < EPT; ++i)
            if (i < cnt) out[first + i] = q[i];
    }
}

template <class E, int BS>
cudaError_t launch_quantize(const float *code, const void *A, int64_t n, uint8_t *out,
                            float *absmax, cudaStream_t stream) {
    const int64_t nblocks = num_blocks(n, BS);
    constexpr int groups = kThreads / Split8<BS>::kGroup;
    const int64_t grid = (nblocks + groups - 1) / groups;
    if (grid > 0x7FFFFFFF) return cudaErrorInvalidValue;
    const bool vec = is_aligned(A, 16) && is_aligned(out, 16);
    LOWBIT_LAUNCH(static_cast<unsigned>(grid), kThreads, stream, k_quantize_blockwise<E, BS>)(
        code, static_cast<const typename E::T *>(A), n, nblocks, out, absmax, vec);
    return cudaGetLastError();
}

/* dequantize: launch layout
 *   grid-stride loop, kThreads per CTA; one work item = 16 elements (16 | blocksize: one absmax).
 * memory access: one 128-bit load of 16 code indices, 16 lookups in the shared 256-entry code
 *   (random indices: some bank conflicts, as in bitsandbytes), 2-4 128-bit stores. */
template <class E>
__global__ void __launch_bounds__(kThreads)
    k_dequantize_blockwise(const float *__restrict__ code_g, const uint8_t *__restrict__ A,
                           const float *__restrict__ absmax, int64_t n, int log2bs,
                           typename E::T *__restrict__ out, bool vec) {
    __shared__ float code[fmt::kCode8Size];
    for (int i = static_cast<int>(threadIdx.x); i < fmt::kCode8Size; i += static_cast<int>(blockDim.x))
        code[i] = code_g[i];
    __syncthreads();
    const int64_t items = (n + 15) / 16;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < items; c += stride) {
        const int64_t e0 = c * 16;
        const float a = absmax[e0 >> log2bs];
        if (vec && e0 + 16 <= n) {
            uint8_t q[16];
            load_bytes<16>(A + e0, q);
            typename E::T y[16];
#pragma unroll
            for (int j = 0; j < 16; ++j) y[j] = E::store(code[q[j]] * a);
            store_bytes<16 * static_cast<int>(sizeof(typename E::T))>(out + e0, y);
        } else {
            const int len = static_cast<int>((n - e0) < 16 ? (n - e0) : 16);
            for (int i = 0; i < len; ++i) out[e0 + i] = E::store(code[A[e0 + i]] * a);
        }
    }
}

} // namespace

cudaError_t quantize_blockwise(int32_t dtype, const float *code, const void *A, int64_t n,
                               int64_t blocksize, uint8_t *out, float *absmax, cudaStream_t stream) {
    return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
        using E = decltype(tag);
        switch (blocksize) {
        case 32: return launch_quantize<E, 32>(code, A, n, out, absmax, stream);
        case 64: return launch_quantize<E, 64>(code, A, n, out, absmax, stream);
        case 128: return launch_quantize<E, 128>(code, A, n, out, absmax, stream);
        case 256: return launch_quantize<E, 256>(code, A, n, out, absmax, stream);
        case 512: return launch_quantize<E, 512>(code, A, n, out, absmax, stream);
        case 1024: return launch_quantize<E, 1024>(code, A, n, out, absmax, stream);
        case 2048: return launch_quantize<E, 2048>(code, A, n, out, absmax, stream);
        case 4096: return launch_quantize<E, 4096>(code, A, n, out, absmax, stream);
        default: return cudaErrorInvalidValue;
        }
    });
}

cudaError_t dequantize_blockwise(int32_t dtype, const float *code, const uint8_t *A,
                                 const float *absmax, int64_t n, int64_t blocksize, void *out,
                                 cudaStream_t stream) {
    return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
        using E = decltype(tag);
        const bool vec = is_aligned(A, 16) && is_aligned(out, 16);
        LOWBIT_LAUNCH(grid_for((n + 15) / 16), kThreads, stream, k_dequantize_blockwise<E>)(
            code, A, absmax, n, ilog2(blocksize), static_cast<typename E::T *>(out), vec);
        return cudaGetLastError();
    });
}

} // namespace gpu
} // namespace lowbit
