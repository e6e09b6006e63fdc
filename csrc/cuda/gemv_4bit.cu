/* gemv_4bit.cu -- out[m, n] = sum_k A[m, k] * W[n, k] for 1..8 activation rows, W an NF4/FP4 (or
 * any 16-entry code) packed weight of shape (N, K), dequantized on the fly.
 *
 * Semantics (lowbit/backends/reference/matmul_4bit.py): W[n, k] = code[nibble] * absmax[block]
 * with the flat index f = n*K + k (element f in the high nibble of byte f/2 when f is even),
 * products accumulated in float32, then `+ bias` (float) and one rounding to A's dtype. The weight
 * values are exactly the reference's; the sum is an FMA chain per lane, a butterfly over 32 lanes
 * and a fixed-order sum over the feature's lane groups, so results differ from the reference's
 * GEMM only by accumulation order (tests state the bound) and are the same from run to run.
 *
 * Launch layout: 256 threads per CTA = 8 groups of 32 lanes. A feature n (a row of W) is computed
 *   by W_ consecutive groups (W_ in {1, 2, 4}: chosen on the host so that the grid has at least
 *   kWavesTarget CTAs per SM -- N = 4096 on a 132-SM H100 gives 512 CTAs with W_ = 1, a small N
 *   splits K over 2 or 4 groups instead of leaving SMs idle); a CTA computes 8 / W_ features.
 *   grid.x = ceil(N * W_ / 8).
 * Fast path (K % 32 == 0, A and B 16-byte aligned): K is walked in tiles of kTileK = 1024.
 *   - Activations: the CTA stages the tile's MAXM x 1024 activations ONCE, converted to float
 *     (hardware fp16 conversion on the GPU: HADD2.F32 on sm_80+, v_cvt_f32_f16 on AMD), into
 *     shared memory laid out as 32-float chunks padded to 36 floats, so the float4 reads below
 *     hit distinct banks for any W_. Every feature of the CTA reads them from there: no
 *     per-feature reload or reconversion.
 *   - Weights: the feature's 32*W_ lanes split the tile's 32 chunks of 32 weights: lane L takes
 *     16/W_ contiguous bytes (32/W_ weights) of chunk L/W_, so a group reads 512 contiguous bytes
 *     per tile (coalesced, every byte of W read once). The next tile's bytes and absmax are
 *     loaded into registers before the current tile is computed (one tile of prefetch).
 *   - The lane's weights share one absmax (blocksize >= 32 and the piece is aligned). The
 *     16-entry code sits in shared memory, one entry per bank: conflict-free for any nibbles.
 * Generic path (any K, any alignment): lane L of the feature takes k = L, L + 32*W_, ...; the
 *   activations come from global memory (one load per product), one absmax load per weight.
 * bf16 outputs on sm_80+ use the hardware cvt.rn.bf16.f32, fp16 outputs cvt.rn.f16.f32.
 */
#include <atomic>

#include "kernels.cuh"

namespace lowbit {
namespace gpu {
namespace {

constexpr int kGemvThreads = 256;
constexpr int kGemvGroups = kGemvThreads / kLaneGroup; /* 8 */
constexpr int kTileK = 1024;                            /* activations staged per tile */
constexpr int kTileChunks = kTileK / 32;                /* 32-weight chunks per tile */
constexpr int kChunkStride = 36;                        /* floats per staged chunk: 32 + 4 pad */
constexpr int kWavesTarget = 3;                         /* CTAs per SM the split aims for */

/* Activation (fp16 bits) to float with the hardware conversion where there is one; exact. */
template <class E>
__device__ __forceinline__ float load_fast(typename E::T v) {
    if constexpr (E::kDtype == kFloat16) {
#if defined(__CUDA_ARCH__) && !defined(__HIP_DEVICE_COMPILE__)
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
        return f;
#elif defined(__HIP_DEVICE_COMPILE__)
        return static_cast<float>(__builtin_bit_cast(_Float16, v));
#endif
    }
    return E::load(v);
}

template <class E>
__device__ __forceinline__ typename E::T store_out(float v) {
#if LOWBIT_SM80
    if constexpr (E::kDtype == kBFloat16) {
        unsigned short r;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(v));
        return r;
    }
#endif
#if defined(__CUDA_ARCH__) && !defined(__HIP_DEVICE_COMPILE__)
    if constexpr (E::kDtype == kFloat16) {
        unsigned short r;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(v));
        return r;
    }
#endif
    return E::store(v);
}

/* Stages activations [k0, k0 + tile_k) of rows 0..M-1 into sA (chunk-padded floats). Every thread
 * of the CTA calls it between two barriers. 16-byte loads: 8 fp16/bf16 or 4 fp32 values. */
template <class E, int MAXM>
__device__ __forceinline__ void stage_tile(const typename E::T *__restrict__ A, int M, int64_t K, int64_t k0,
                                           int tile_k, float *sA) {
    constexpr int VEC = 16 / static_cast<int>(sizeof(typename E::T));
    const int per_row = tile_k / VEC;
    for (int i = static_cast<int>(threadIdx.x); i < M * per_row; i += kGemvThreads) {
        const int m = i / per_row;
        const int e = (i % per_row) * VEC; /* element within the tile */
        typename E::T raw[VEC];
        load_bytes<16>(A + m * K + k0 + e, raw);
        float *dst = sA + (m * kTileChunks + e / 32) * kChunkStride + e % 32;
#pragma unroll
        for (int j = 0; j < VEC; ++j) dst[j] = load_fast<E>(raw[j]);
    }
}

/* acc[m] += sum over the lane's PIECE weights (packed bytes q, one absmax) and the staged
 * activations of the same k. */
template <int MAXM, int PIECE>
__device__ __forceinline__ void piece_dot(const uint8_t (&q)[PIECE / 2], float am, const float *code,
                                          const float *sA, int chunk, int offset, int M, float (&acc)[MAXM]) {
    float w[PIECE];
#pragma unroll
    for (int j = 0; j < PIECE / 2; ++j) {
        w[2 * j] = code[q[j] >> 4] * am;
        w[2 * j + 1] = code[q[j] & 15u] * am;
    }
#pragma unroll
    for (int m = 0; m < MAXM; ++m) {
        if (m < M) {
            const float *a = sA + (m * kTileChunks + chunk) * kChunkStride + offset;
#pragma unroll
            for (int j = 0; j < PIECE; j += 4) {
                const float4 v = *reinterpret_cast<const float4 *>(a + j); /* one 128-bit shared load */
                acc[m] = fmaf(v.x, w[j], acc[m]);
                acc[m] = fmaf(v.y, w[j + 1], acc[m]);
                acc[m] = fmaf(v.z, w[j + 2], acc[m]);
                acc[m] = fmaf(v.w, w[j + 3], acc[m]);
            }
        }
    }
}

template <class E, int MAXM, int WG, bool FAST>
__global__ void __launch_bounds__(kGemvThreads)
    k_gemv_4bit(const typename E::T *__restrict__ A, int M, const uint8_t *__restrict__ B,
                int64_t N, int64_t K, const float *__restrict__ absmax,
                const float *__restrict__ code_g, int log2bs, const void *__restrict__ bias,
                int bias_dtype, typename E::T *__restrict__ out) {
    constexpr int kFeatures = kGemvGroups / WG; /* features per CTA */
    constexpr int kLanes = kLaneGroup * WG;     /* lanes per feature */
    __shared__ float code[fmt::kCode4Size];
    __shared__ float partial[kGemvGroups][MAXM];
    if (threadIdx.x < fmt::kCode4Size) code[threadIdx.x] = code_g[threadIdx.x];

    const int group = static_cast<int>(threadIdx.x) / kLaneGroup;
    const int lane = static_cast<int>(threadIdx.x) % kLaneGroup;
    const int L = (group % WG) * kLaneGroup + lane; /* lane within the feature */
    const int64_t n = static_cast<int64_t>(blockIdx.x) * kFeatures + group / WG;
    const bool active = n < N;
    const int64_t f_row = active ? n * K : 0;
    float acc[MAXM];
#pragma unroll
    for (int m = 0; m < MAXM; ++m) acc[m] = 0.0f;

    if constexpr (FAST) {
        constexpr int PIECE = 32 / WG; /* weights per lane per tile */
        constexpr int BYTES = PIECE / 2;
        __shared__ float4 sA4[MAXM * kTileChunks * kChunkStride / 4]; /* float4: 16-byte aligned */
        float *sA = reinterpret_cast<float *>(sA4);
        const int chunk = L / WG;               /* chunk of the tile */
        const int offset = (L % WG) * PIECE;    /* first weight within the chunk */
        const int64_t tiles = (K + kTileK - 1) / kTileK;
        /* the lane's piece of tile t: weights [t*kTileK + chunk*32 + offset, +PIECE) */
        auto piece_k = [&](int64_t t) { return t * kTileK + chunk * 32 + offset; };
        uint8_t q_next[BYTES] = {};
        float am_next = 0.0f;
        if (active && piece_k(0) < K) {
            load_bytes<BYTES>(B + (f_row + piece_k(0)) / 2, q_next);
            am_next = absmax[(f_row + piece_k(0)) >> log2bs];
        }
        for (int64_t t = 0; t < tiles; ++t) {
            uint8_t q[BYTES];
            memcpy(q, q_next, BYTES);
            const float am = am_next;
            const bool mine = active && piece_k(t) < K;
            if (active && piece_k(t + 1) < K) { /* prefetch the next tile's piece */
                load_bytes<BYTES>(B + (f_row + piece_k(t + 1)) / 2, q_next);
                am_next = absmax[(f_row + piece_k(t + 1)) >> log2bs];
            }
            const int64_t k0 = t * kTileK;
            const int tile_k = static_cast<int>((K - k0) < kTileK ? (K - k0) : kTileK);
            __syncthreads(); /* everyone is done with the previous tile (and code[] is written) */
            stage_tile<E, MAXM>(A, M, K, k0, tile_k, sA);
            __syncthreads();
            if (mine) piece_dot<MAXM, PIECE>(q, am, code, sA, chunk, offset, M, acc);
        }
    } else {
        __syncthreads(); /* code[] */
        if (active) {
            for (int64_t k = L; k < K; k += kLanes) {
                const int64_t f = f_row + k;
                const unsigned byte = B[f >> 1];
                const unsigned nib = (f & 1) ? (byte & 15u) : (byte >> 4);
                const float w = code[nib] * absmax[f >> log2bs];
#pragma unroll
                for (int m = 0; m < MAXM; ++m)
                    if (m < M) acc[m] = fmaf(load_fast<E>(A[m * K + k]), w, acc[m]);
            }
        }
    }

#pragma unroll
    for (int m = 0; m < MAXM; ++m)
#pragma unroll
        for (int o = kLaneGroup / 2; o > 0; o >>= 1) acc[m] += lb_shfl_xor(acc[m], o);
    if constexpr (WG > 1) { /* the feature's groups, summed in a fixed order */
        if (lane == 0)
#pragma unroll
            for (int m = 0; m < MAXM; ++m) partial[group][m] = acc[m];
        __syncthreads();
        if (lane == 0 && group % WG == 0)
#pragma unroll
            for (int m = 0; m < MAXM; ++m)
#pragma unroll
                for (int g = 1; g < WG; ++g) acc[m] += partial[group + g][m];
    }

    if (active && lane == 0 && group % WG == 0) {
        const float bv = bias != nullptr ? load_any(bias, bias_dtype, n) : 0.0f;
#pragma unroll
        for (int m = 0; m < MAXM; ++m)
            if (m < M) out[m * N + n] = store_out<E>(bias != nullptr ? acc[m] + bv : acc[m]);
    }
}

/* Streaming multiprocessors of the current device, cached per device ordinal. */
int sm_count() {
    static std::atomic<int> cache[64];
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return 1;
    int sms = cache[device].load(std::memory_order_relaxed);
    if (sms == 0) {
        if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms < 1) sms = 1;
        cache[device].store(sms, std::memory_order_relaxed);
    }
    return sms;
}

template <class E, int MAXM, int WG>
void launch_gemv(bool fast, const typename E::T *a, int M, const uint8_t *B, int64_t N, int64_t K,
                 const float *absmax, const float *code, int log2bs, const void *bias, int32_t bias_dtype,
                 typename E::T *y, cudaStream_t stream) {
    const unsigned grid = static_cast<unsigned>((N * WG + kGemvGroups - 1) / kGemvGroups);
    if (fast)
        LOWBIT_LAUNCH(grid, kGemvThreads, stream, k_gemv_4bit<E, MAXM, WG, true>)(
            a, M, B, N, K, absmax, code, log2bs, bias, bias_dtype, y);
    else
        LOWBIT_LAUNCH(grid, kGemvThreads, stream, k_gemv_4bit<E, MAXM, WG, false>)(
            a, M, B, N, K, absmax, code, log2bs, bias, bias_dtype, y);
}

template <class E, int MAXM>
cudaError_t dispatch_split(const void *A, int M, const uint8_t *B, int64_t N, int64_t K,
                           const float *absmax, const float *code, int log2bs, const void *bias,
                           int32_t bias_dtype, void *out, cudaStream_t stream) {
    if ((N * 4 + kGemvGroups - 1) / kGemvGroups > 0x7FFFFFFF) return cudaErrorInvalidValue;
    const auto *a = static_cast<const typename E::T *>(A);
    auto *y = static_cast<typename E::T *>(out);
    const bool fast = K % 32 == 0 && is_aligned(A, 16) && is_aligned(B, 16);
    const int64_t target = static_cast<int64_t>(kWavesTarget) * sm_count();
    const int64_t ctas1 = (N + kGemvGroups - 1) / kGemvGroups;
    if (ctas1 >= target)
        launch_gemv<E, MAXM, 1>(fast, a, M, B, N, K, absmax, code, log2bs, bias, bias_dtype, y, stream);
    else if (2 * ctas1 >= target)
        launch_gemv<E, MAXM, 2>(fast, a, M, B, N, K, absmax, code, log2bs, bias, bias_dtype, y, stream);
    else
        launch_gemv<E, MAXM, 4>(fast, a, M, B, N, K, absmax, code, log2bs, bias, bias_dtype, y, stream);
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
        if (M <= 1) return dispatch_split<E, 1>(A, M, B, N, K, absmax, code, log2bs, bias, bias_dtype, out, stream);
        if (M <= 4) return dispatch_split<E, 4>(A, M, B, N, K, absmax, code, log2bs, bias, bias_dtype, out, stream);
        return dispatch_split<E, kGemvMaxRows>(A, M, B, N, K, absmax, code, log2bs, bias, bias_dtype, out, stream);
    });
}

} // namespace gpu
} // namespace lowbit
