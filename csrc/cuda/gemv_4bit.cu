/* gemv_4bit.cu -- out[m, n] = sum_k A[m, k] * W[n, k] for 1..8 activation rows, W an NF4/FP4 (or
 * any 16-entry code) packed weight of shape (N, K), dequantized on the fly.
 *
 * Semantics (lowbit/backends/reference/matmul_4bit.py): W[n, k] = code[nibble] * absmax[block]
 * with the flat index f = n*K + k (element f in the high nibble of byte f/2 when f is even),
 * products accumulated in float32, then `+ bias` (float) and a cast to A's dtype. The weight
 * values are exactly the reference's; the sum is an FMA chain per lane plus a butterfly over 32
 * lanes, so results differ from the reference's GEMM only by accumulation order (tests state the
 * bound).
 *
 * Launch layout: 128 threads per CTA = 4 groups of 32 lanes; group g of CTA c computes output
 *   feature n = 4c + g for all M rows (M accumulators per lane, MAXM in {1, 4, 8} compiled).
 *   grid.x = ceil(N / 4).
 * Memory access (fast path: K % 32 == 0, A and B 16-byte aligned): lane l walks the chunks
 *   l, l+32, l+64, ... of its row of W, a chunk being 32 weights = 16 bytes = one 128-bit load,
 *   so the 32 lanes of a group stream 512 contiguous bytes of W per step (fully coalesced, every
 *   byte of W read exactly once). The chunk's 32 weights share one absmax (32 | blocksize and the
 *   chunk starts at a multiple of 32). The 32 matching activations per row are 4 (fp16/bf16) or 8
 *   (fp32) 128-bit loads; A is tiny and shared by every CTA, so it is served from L1/L2.
 *   The 16-entry code sits in shared memory, one entry per bank: conflict-free for any nibbles.
 *   sm_80+: W chunks are prefetched kStages-1 chunks ahead with cp.async (16 bytes, L1 bypass)
 *   into a per-lane ring in shared memory -- each lane reads only its own slots, so no barrier is
 *   needed, only cp.async.wait_group. Older targets (and HIP) prefetch one chunk in registers.
 *   bf16 outputs on sm_80+ use the hardware cvt.rn.bf16.f32.
 * Generic path (any K, any alignment): lane l takes k = l, l+32, ...: consecutive lanes read
 *   consecutive packed bytes and activations; one absmax load per weight.
 */
#include "kernels.cuh"

namespace lowbit {
namespace gpu {
namespace {

constexpr int kGemvThreads = 128;
constexpr int kFeaturesPerCta = kGemvThreads / kLaneGroup; /* 4 */
constexpr int kStages = 4;                                  /* cp.async ring depth (sm_80+) */
static_assert(kStages >= 2 && kStages <= 8, "cp.async ring depth");

template <class E>
__device__ __forceinline__ typename E::T store_out(float v) {
#if LOWBIT_SM80
    if constexpr (E::kDtype == kBFloat16) {
        unsigned short r;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(v));
        return r;
    }
#endif
    return E::store(v);
}

/* One 32-weight chunk (16 packed bytes, one absmax) against the matching 32 activations of each
 * row: acc[m] += sum_j A[m, k0 + j] * w[j]. */
template <class E, int MAXM>
__device__ __forceinline__ void gemv_chunk(const uint4 packed, float am, const float *code,
                                           const typename E::T *__restrict__ A, int M, int64_t K,
                                           int64_t k0, float (&acc)[MAXM]) {
    uint8_t q[16];
    memcpy(q, &packed, 16);
    float w[32];
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        w[2 * j] = code[q[j] >> 4] * am;
        w[2 * j + 1] = code[q[j] & 15u] * am;
    }
#pragma unroll
    for (int m = 0; m < MAXM; ++m) {
        if (m < M) {
            float a[32];
            load_vec<E, 32>(A + m * K + k0, a);
#pragma unroll
            for (int j = 0; j < 32; ++j) acc[m] = fmaf(a[j], w[j], acc[m]);
        }
    }
}

template <class E, int MAXM, bool FAST>
__global__ void __launch_bounds__(kGemvThreads)
    k_gemv_4bit(const typename E::T *__restrict__ A, int M, const uint8_t *__restrict__ B,
                int64_t N, int64_t K, const float *__restrict__ absmax,
                const float *__restrict__ code_g, int log2bs, const void *__restrict__ bias,
                int bias_dtype, typename E::T *__restrict__ out) {
    __shared__ float code[fmt::kCode4Size];
    if (threadIdx.x < fmt::kCode4Size) code[threadIdx.x] = code_g[threadIdx.x];
    __syncthreads();

    const int lane = static_cast<int>(threadIdx.x) % kLaneGroup;
    const int64_t n = static_cast<int64_t>(blockIdx.x) * kFeaturesPerCta + threadIdx.x / kLaneGroup;
    float acc[MAXM];
#pragma unroll
    for (int m = 0; m < MAXM; ++m) acc[m] = 0.0f;

    if (n < N) {
        const int64_t f_row = n * K;
        if constexpr (FAST) {
            const int64_t chunks = K / 32;
            const uint8_t *brow = B + f_row / 2;
#if LOWBIT_CP_ASYNC
            __shared__ uint4 ring[kStages][kGemvThreads];
            int64_t issue = lane;
#pragma unroll
            for (int s = 0; s < kStages - 1; ++s) {
                if (issue < chunks) cp_async16(&ring[s][threadIdx.x], brow + issue * 16);
                cp_async_commit(); /* possibly empty: keeps the group count uniform */
                issue += kLaneGroup;
            }
            int slot = 0;
            for (int64_t c = lane; c < chunks; c += kLaneGroup) {
                /* refill the slot consumed in the previous step with chunk c + 32*(kStages-1) */
                const int refill = (slot + kStages - 1) % kStages;
                if (issue < chunks) cp_async16(&ring[refill][threadIdx.x], brow + issue * 16);
                cp_async_commit();
                issue += kLaneGroup;
                cp_async_wait<kStages - 1>(); /* chunk c (group `slot`) has landed */
                const uint4 packed = ring[slot][threadIdx.x];
                slot = (slot + 1 == kStages) ? 0 : slot + 1;
                gemv_chunk<E, MAXM>(packed, absmax[(f_row + c * 32) >> log2bs], code, A, M, K, c * 32, acc);
            }
            cp_async_wait<0>();
#else
            int64_t c = lane;
            uint4 next = make_uint4(0u, 0u, 0u, 0u);
            if (c < chunks) load_bytes<16>(brow + c * 16, &next);
            for (; c < chunks; c += kLaneGroup) {
                const uint4 packed = next;
                if (c + kLaneGroup < chunks) load_bytes<16>(brow + (c + kLaneGroup) * 16, &next);
                gemv_chunk<E, MAXM>(packed, absmax[(f_row + c * 32) >> log2bs], code, A, M, K, c * 32, acc);
            }
#endif
        } else {
            for (int64_t k = lane; k < K; k += kLaneGroup) {
                const int64_t f = f_row + k;
                const unsigned byte = B[f >> 1];
                const unsigned nib = (f & 1) ? (byte & 15u) : (byte >> 4);
                const float w = code[nib] * absmax[f >> log2bs];
#pragma unroll
                for (int m = 0; m < MAXM; ++m)
                    if (m < M) acc[m] = fmaf(E::load(A[m * K + k]), w, acc[m]);
            }
        }
    }

#pragma unroll
    for (int m = 0; m < MAXM; ++m)
#pragma unroll
        for (int o = kLaneGroup / 2; o > 0; o >>= 1) acc[m] += lb_shfl_xor(acc[m], o);

    if (n < N && lane == 0) {
        const float bv = bias != nullptr ? load_any(bias, bias_dtype, n) : 0.0f;
#pragma unroll
        for (int m = 0; m < MAXM; ++m)
            if (m < M) out[m * N + n] = store_out<E>(bias != nullptr ? acc[m] + bv : acc[m]);
    }
}

template <class E, int MAXM>
cudaError_t launch_gemv(const void *A, int M, const uint8_t *B, int64_t N, int64_t K,
                        const float *absmax, const float *code, int log2bs, const void *bias,
                        int32_t bias_dtype, void *out, cudaStream_t stream) {
    const int64_t grid = (N + kFeaturesPerCta - 1) / kFeaturesPerCta;
    if (grid > 0x7FFFFFFF) return cudaErrorInvalidValue;
    const auto *a = static_cast<const typename E::T *>(A);
    auto *y = static_cast<typename E::T *>(out);
    const bool fast = K % 32 == 0 && is_aligned(A, 16) && is_aligned(B, 16);
    if (fast)
        LOWBIT_LAUNCH(static_cast<unsigned>(grid), kGemvThreads, stream, k_gemv_4bit<E, MAXM, true>)(
            a, M, B, N, K, absmax, code, log2bs, bias, bias_dtype, y);
    else
        LOWBIT_LAUNCH(static_cast<unsigned>(grid), kGemvThreads, stream, k_gemv_4bit<E, MAXM, false>)(
            a, M, B, N, K, absmax, code, log2bs, bias, bias_dtype, y);
    return cudaGetLastError();
}

} // namespace

cudaError_t gemv_4bit(int32_t dtype, const void *A, int64_t rows, const uint8_t *B, int64_t N,
                      int64_t K, const float *absmax, const float *code, int64_t blocksize,
                      const void *bias, int32_t bias_dtype, void *out, cudaStream_t stream) {
    const int M = static_cast<int>(rows);
    const int log2bs = ilog2(blocksize);
    return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
        using E = decltype(tag);
        if (M <= 1) return launch_gemv<E, 1>(A, M, B, N, K, absmax, code, log2bs, bias, bias_dtype, out, stream);
        if (M <= 4) return launch_gemv<E, 4>(A, M, B, N, K, absmax, code, log2bs, bias, bias_dtype, out, stream);
        return launch_gemv<E, kGemvMaxRows>(A, M, B, N, K, absmax, code, log2bs, bias, bias_dtype, out, stream);
    });
}

} // namespace gpu
} // namespace lowbit
