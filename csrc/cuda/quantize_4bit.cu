/* quantize_4bit.cu -- NF4/FP4 blockwise quantize and dequantize on the GPU.
 *
 * Semantics: csrc/cpu/quantize_4bit.cpp, bit for bit (lowbit's contract is the CPU's bytes; in
 * particular an all-zero block gives NF4 bytes 0x77 and FP4 bytes 0x00, where bitsandbytes' CUDA
 * kernels write 0 for both -- docs/design.md §4):
 *   full block:  absmax = max|x|;  inv = 1 / max(absmax, 1e-38f);  s = clamp(x * inv, -1, 1)
 *   tail block:  am = max(max|x|, 1e-38f);  absmax = am;  s = clamp(x / am, -1, 1)
 *   nibble = fmt::encode_4bit_reg(s); odd n pads the last low nibble with the code of 0.0;
 *   NaN / +-Inf in a block -> absmax NaN / +Inf and zero bytes.
 *   dequantize: out = to_dtype(code[nibble] * absmax[block]).
 */
#include "kernels.cuh"

namespace lowbit {
namespace gpu {
namespace {

/* Elements per thread for each blocksize: 32->2, 64->2, 128->4, 256->8, 512..2048->8, 4096->16,
 * so a group (the threads of one quantization block) has 16, 32, 32, 32, 64, 128, 256, 256
 * threads. Blocks up to 256 are handled by one 32-lane group (one warp on NVIDIA/RDNA, half a
 * wavefront on CDNA; 16 lanes for blocksize 32) with shuffle-only reductions. */
template <int BS>
struct Split4 {
    static constexpr int kEpt = BS <= 64 ? 2 : (BS == 128 ? 4 : (BS == 4096 ? 16 : 8));
    static constexpr int kGroup = BS / kEpt;
    static_assert(kGroup <= kThreads && kThreads % kGroup == 0, "group must tile the CTA");
};

/* quantize: launch layout
 *   grid.x = ceil(blocks / (kThreads / G)), block = kThreads (256) threads; each group of G threads
 *   owns one quantization block, thread t of the group owns elements [start + t*EPT, +EPT).
 * memory access: a thread reads EPT consecutive inputs (from one 32-bit to four 128-bit loads when `vec`), so a
 *   warp reads one contiguous span; it writes EPT/2 consecutive packed bytes (8..64-bit store);
 *   thread 0 of the group writes the block's absmax. Inputs are read once; no shared memory
 *   except the cross-warp max for blocks of 512 and more. */
template <class E, int BS, int QT>
__global__ void __launch_bounds__(kThreads)
    k_quantize_4bit(const typename E::T *__restrict__ A, int64_t n, int64_t nblocks,
                    uint8_t *__restrict__ out, float *__restrict__ absmax, bool vec) {
    constexpr int EPT = Split4<BS>::kEpt;
    constexpr int G = Split4<BS>::kGroup;
    const int t = static_cast<int>(threadIdx.x) % G;
    const int64_t b = static_cast<int64_t>(blockIdx.x) * (kThreads / G) + threadIdx.x / G;
    const int64_t first = b * BS + static_cast<int64_t>(t) * EPT;

    float x[EPT];
    int cnt = 0; /* how many of my elements are < n */
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
    for (int i = 0; i < EPT; ++i) absmax_add(x[i], m, nan); /* absent elements are 0.0 */
    group_absmax<G>(m, nan);
    if (b >= nblocks) return; /* after the collective reduction */

    const int64_t start = b * BS;
    const bool full = (n - start) >= BS;
    uint8_t bytes[EPT / 2];
    if (nan || m == infinity()) {
        if (t == 0) absmax[b] = nan ? quiet_nan() : m;
#pragma unroll
        for (int j = 0; j < EPT / 2; ++j) bytes[j] = 0;
    } else {
        const float am = (m < fmt::kAbsmaxFloor4) ? fmt::kAbsmaxFloor4 : m; /* std::max(m, floor) */
        if (t == 0) absmax[b] = full ? m : am;
        if (full) {
            const float inv = 1.0f / am;
#pragma unroll
            for (int j = 0; j < EPT / 2; ++j) {
                const uint8_t hi = fmt::encode_4bit_reg(fmt::clamp_unit(x[2 * j] * inv), QT);
                const uint8_t lo = fmt::encode_4bit_reg(fmt::clamp_unit(x[2 * j + 1] * inv), QT);
                bytes[j] = static_cast<uint8_t>((hi << 4) | lo);
            }
        } else {
            const uint8_t pad = fmt::encode_4bit_reg(0.0f, QT);
#pragma unroll
            for (int j = 0; j < EPT / 2; ++j) {
                const uint8_t hi = (2 * j < cnt) ? fmt::encode_4bit_reg(fmt::clamp_unit(x[2 * j] / am), QT) : pad;
                const uint8_t lo = (2 * j + 1 < cnt) ? fmt::encode_4bit_reg(fmt::clamp_unit(x[2 * j + 1] / am), QT) : pad;
                bytes[j] = static_cast<uint8_t>((hi << 4) | lo);
            }
        }
    }

    uint8_t *o = out + first / 2; /* first is even */
    if (vec && cnt == EPT) {
        store_bytes<EPT / 2>(o, bytes);
    } else {
        const int64_t total = (n + 1) / 2;
#pragma unroll
        for (int j = 0; j < EPT / 2; ++j)
            if (first / 2 + j < total) o[j] = bytes[j];
    }
}

template <class E, int BS>
cudaError_t launch_quantize(const void *A, int64_t n, int32_t quant_type, uint8_t *out,
                            float *absmax, cudaStream_t stream) {
    const int64_t nblocks = num_blocks(n, BS);
    constexpr int groups = kThreads / Split4<BS>::kGroup;
    const int64_t grid = (nblocks + groups - 1) / groups;
    if (grid > 0x7FFFFFFF) return cudaErrorInvalidValue;
    const auto *a = static_cast<const typename E::T *>(A);
    const bool vec = is_aligned(A, 16) && is_aligned(out, 16);
    if (quant_type == fmt::kNF4)
        LOWBIT_LAUNCH(static_cast<unsigned>(grid), kThreads, stream, k_quantize_4bit<E, BS, fmt::kNF4>)(a, n, nblocks, out, absmax, vec);
    else
        LOWBIT_LAUNCH(static_cast<unsigned>(grid), kThreads, stream, k_quantize_4bit<E, BS, fmt::kFP4>)(a, n, nblocks, out, absmax, vec);
    return cudaGetLastError();
}

/* dequantize: launch layout
 *   grid-stride loop, kThreads per CTA; one work item = 16 elements = 8 packed bytes.
 * memory access: a thread reads its 8 bytes with one 64-bit load (when aligned) and one absmax
 *   (16 | blocksize, so the 16 elements share a block), and writes 16 outputs with 128-bit
 *   stores (2 for fp16/bf16, 4 for fp32): consecutive threads touch consecutive spans. The
 *   16-entry code sits in shared memory, one entry per bank: any nibble pattern is conflict-free. */
template <class E>
__global__ void __launch_bounds__(kThreads)
    k_dequantize_4bit(const uint8_t *__restrict__ A, const float *__restrict__ absmax, int64_t n,
                      int log2bs, int quant_type, typename E::T *__restrict__ out, bool vec) {
    __shared__ float code[fmt::kCode4Size];
    if (threadIdx.x < fmt::kCode4Size) code[threadIdx.x] = fmt::decode_4bit(threadIdx.x, quant_type);
    __syncthreads();
    const int64_t items = (n + 15) / 16;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < items; c += stride) {
        const int64_t e0 = c * 16;
        const float a = absmax[e0 >> log2bs];
        if (vec && e0 + 16 <= n) {
            uint8_t q[8];
            load_bytes<8>(A + e0 / 2, q);
            typename E::T y[16];
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                y[2 * j] = E::store(code[q[j] >> 4] * a);
                y[2 * j + 1] = E::store(code[q[j] & 15u] * a);
            }
            store_bytes<16 * static_cast<int>(sizeof(typename E::T))>(out + e0, y);
        } else {
            const int len = static_cast<int>((n - e0) < 16 ? (n - e0) : 16);
            for (int i = 0; i < len; ++i) {
                const unsigned byte = A[(e0 + i) / 2];
                const unsigned nib = (i & 1) ? (byte & 15u) : (byte >> 4);
                out[e0 + i] = E::store(code[nib] * a);
            }
        }
    }
}

} // namespace

cudaError_t quantize_4bit(int32_t dtype, const void *A, int64_t n, int64_t blocksize,
                          int32_t quant_type, uint8_t *out, float *absmax, cudaStream_t stream) {
    return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
        using E = decltype(tag);
        switch (blocksize) {
        case 32: return launch_quantize<E, 32>(A, n, quant_type, out, absmax, stream);
        case 64: return launch_quantize<E, 64>(A, n, quant_type, out, absmax, stream);
        case 128: return launch_quantize<E, 128>(A, n, quant_type, out, absmax, stream);
        case 256: return launch_quantize<E, 256>(A, n, quant_type, out, absmax, stream);
        case 512: return launch_quantize<E, 512>(A, n, quant_type, out, absmax, stream);
        case 1024: return launch_quantize<E, 1024>(A, n, quant_type, out, absmax, stream);
        case 2048: return launch_quantize<E, 2048>(A, n, quant_type, out, absmax, stream);
        case 4096: return launch_quantize<E, 4096>(A, n, quant_type, out, absmax, stream);
        default: return cudaErrorInvalidValue;
        }
    });
}

cudaError_t dequantize_4bit(int32_t dtype, const uint8_t *A, const float *absmax, int64_t n,
                            int64_t blocksize, int32_t quant_type, void *out, cudaStream_t stream) {
    return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
        using E = decltype(tag);
        auto *y = static_cast<typename E::T *>(out);
        const bool vec = is_aligned(A, 8) && is_aligned(out, 16);
        LOWBIT_LAUNCH(grid_for((n + 15) / 16), kThreads, stream, k_dequantize_4bit<E>)(
            A, absmax, n, ilog2(blocksize), quant_type, y, vec);
        return cudaGetLastError();
    });
}

} // namespace gpu
} // namespace lowbit
