/* kernels.cuh -- internal interface of the GPU kernels (called by capi.cu only) and the device
 * helpers they share: element types, vector loads/stores, group reductions, 8-bit midpoints.
 *
 * Division of labour (the same as csrc/cpu): the per-element arithmetic is lowbit_formats.h /
 * lowbit_device.h, compiled for the device; files here add only the parallel decomposition.
 * Bit-exactness needs the build flags of csrc/cuda/CMakeLists.txt: nvcc --fmad=false -ftz=false
 * -prec-div=true -prec-sqrt=true, clang/hipcc -ffp-contract=off without denormal flushing.
 *
 * Preconditions of every launcher (checked by capi.cu): dtype in {0,1,2} (lowbit_dtype),
 * quant_type in {0,1}, blocksize supported, n > 0, pointers valid for the sizes. Layouts are those
 * of csrc/cpu/cpu_kernels.h: contiguous elements, block b = [b*blocksize, min((b+1)*blocksize, n)),
 * 4-bit packing with element 2i in the high nibble of byte i.
 * Launchers return the launch status (cudaGetLastError); kernels run asynchronously on `stream`.
 */
#ifndef LOWBIT_CUDA_KERNELS_CUH
#define LOWBIT_CUDA_KERNELS_CUH

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "compat.cuh"
#include "lowbit_optim.h"

namespace lowbit {
namespace gpu {

/* Threads per CTA for every kernel but gemv: a multiple of 64 so it is whole warps on every
 * target, and 8 groups of 32 lanes. */
constexpr int kThreads = 256;
constexpr int kPieces = kThreads / kLaneGroup; /* 32-lane pieces per CTA */

/* ---- element types of the float side, numbered as lowbit_dtype --------------------------------- */
enum : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct ElemF32 {
    using T = float;
    static constexpr int32_t kDtype = kFloat32;
    static __device__ __forceinline__ float load(T v) { return v; }
    static __device__ __forceinline__ T store(float f) { return f; }
};
struct ElemF16 {
    using T = uint16_t; /* IEEE binary16 bits */
    static constexpr int32_t kDtype = kFloat16;
    static __device__ __forceinline__ float load(T v) { return fmt::half_bits_to_float(v); }
    static __device__ __forceinline__ T store(float f) { return fmt::float_to_half_bits(f); }
};
struct ElemBF16 {
    using T = uint16_t; /* bfloat16 bits */
    static constexpr int32_t kDtype = kBFloat16;
    static __device__ __forceinline__ float load(T v) { return fmt::bf16_bits_to_float(v); }
    static __device__ __forceinline__ T store(float f) { return fmt::float_to_bf16_bits(f); }
};

/* Calls fn(ElemXX{}) for a validated dtype (host). */
template <class Fn>
inline cudaError_t dispatch_dtype(int32_t dtype, Fn &&fn) {
    switch (dtype) {
    case kFloat16: return fn(ElemF16{});
    case kBFloat16: return fn(ElemBF16{});
    default: return fn(ElemF32{});
    }
}

/* Loads a float-side value of any dtype (bias vectors, whose dtype may differ from the data's). */
__device__ __forceinline__ float load_any(const void *p, int32_t dtype, int64_t i) {
    if (dtype == kFloat16) return fmt::half_bits_to_float(static_cast<const uint16_t *>(p)[i]);
    if (dtype == kBFloat16) return fmt::bf16_bits_to_float(static_cast<const uint16_t *>(p)[i]);
    return static_cast<const float *>(p)[i];
}

inline int64_t num_blocks(int64_t n, int64_t blocksize) {
    return n / blocksize + (n % blocksize != 0 ? 1 : 0);
}
inline int ilog2(int64_t v) { /* v a power of two */
    int r = 0;
    while ((int64_t{1} << r) < v) ++r;
    return r;
}
inline bool is_aligned(const void *p, size_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }
/* Grid for a grid-stride loop over `items` work items of one thread each. */
inline unsigned grid_for(int64_t items, int threads = kThreads) {
    const int64_t blocks = (items + threads - 1) / threads;
    const int64_t cap = int64_t{1} << 20;
    return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

/* ---- raw vector memory access ------------------------------------------------------------------ */
/* Copies BYTES bytes with the widest naturally aligned accesses (16-byte uint4 at most); the
 * caller guarantees alignment to min(BYTES, 16). Compiles to 32/64/128-bit loads or stores. */
template <int BYTES>
__device__ __forceinline__ void load_bytes(const void *src, void *dst) {
    LOWBIT_CHECK_ALIGNED(src, BYTES < 16 ? BYTES : 16);
    if constexpr (BYTES % 16 == 0) {
#pragma unroll
        for (int i = 0; i < BYTES / 16; ++i) {
            const uint4 v = static_cast<const uint4 *>(src)[i];
            memcpy(static_cast<char *>(dst) + 16 * i, &v, 16);
        }
    } else if constexpr (BYTES == 8) {
        const uint2 v = *static_cast<const uint2 *>(src);
        memcpy(dst, &v, 8);
    } else if constexpr (BYTES == 4) {
        const uint32_t v = *static_cast<const uint32_t *>(src);
        memcpy(dst, &v, 4);
    } else if constexpr (BYTES == 2) {
        const uint16_t v = *static_cast<const uint16_t *>(src);
        memcpy(dst, &v, 2);
    } else {
        static_assert(BYTES == 1, "load_bytes: 1, 2, 4, 8 or a multiple of 16 bytes");
        *static_cast<uint8_t *>(dst) = *static_cast<const uint8_t *>(src);
    }
}
template <int BYTES>
__device__ __forceinline__ void store_bytes(void *dst, const void *src) {
    LOWBIT_CHECK_ALIGNED(dst, BYTES < 16 ? BYTES : 16);
    if constexpr (BYTES % 16 == 0) {
#pragma unroll
        for (int i = 0; i < BYTES / 16; ++i) {
            uint4 v;
            memcpy(&v, static_cast<const char *>(src) + 16 * i, 16);
            static_cast<uint4 *>(dst)[i] = v;
        }
    } else if constexpr (BYTES == 8) {
        uint2 v;
        memcpy(&v, src, 8);
        *static_cast<uint2 *>(dst) = v;
    } else if constexpr (BYTES == 4) {
        uint32_t v;
        memcpy(&v, src, 4);
        *static_cast<uint32_t *>(dst) = v;
    } else if constexpr (BYTES == 2) {
        uint16_t v;
        memcpy(&v, src, 2);
        *static_cast<uint16_t *>(dst) = v;
    } else {
        static_assert(BYTES == 1, "store_bytes: 1, 2, 4, 8 or a multiple of 16 bytes");
        *static_cast<uint8_t *>(dst) = *static_cast<const uint8_t *>(src);
    }
}

/* EPT consecutive elements starting at p (p aligned to min(EPT*sizeof(T), 16)) as floats. */
template <class E, int EPT>
__device__ __forceinline__ void load_vec(const typename E::T *p, float (&x)[EPT]) {
    typename E::T raw[EPT];
    load_bytes<EPT * static_cast<int>(sizeof(typename E::T))>(p, raw);
#pragma unroll
    for (int i = 0; i < EPT; ++i) x[i] = E::load(raw[i]);
}

/* ---- reductions ------------------------------------------------------------------------------ */
__device__ __forceinline__ float abs_bits(float v) {
    return fmt::bits_float(fmt::float_bits(v) & 0x7FFFFFFFu);
}
__device__ __forceinline__ float quiet_nan() { return fmt::bits_float(0x7FC00000u); }
__device__ __forceinline__ float infinity() { return fmt::bits_float(0x7F800000u); }

/* Accumulates one value into (max |x|, NaN seen), as csrc/cpu does: NaN never enters the max. */
__device__ __forceinline__ void absmax_add(float v, float &m, int &nan) {
    nan |= (v != v) ? 1 : 0;
    const float a = abs_bits(v);
    m = (a > m) ? a : m;
}

/* (max, any-NaN) over each group of G consecutive threads of a kThreads CTA; every thread of the
 * CTA must call it (it may __syncthreads). The max is order-independent, so the result is exact.
 * G <= 32: butterfly shuffles inside the group. G > 32: shuffles per 32-lane piece, then the
 * group's pieces through shared memory, combined in a fixed order. */
template <int G>
__device__ __forceinline__ void group_absmax(float &m, int &nan) {
    static_assert(G >= 1 && G <= kThreads && (G & (G - 1)) == 0, "group size");
    constexpr int W = G < kLaneGroup ? G : kLaneGroup;
#pragma unroll
    for (int o = W / 2; o > 0; o >>= 1) {
        const float om = lb_shfl_xor(m, o);
        const int on = lb_shfl_xor(nan, o);
        m = (om > m) ? om : m;
        nan |= on;
    }
    if constexpr (G > kLaneGroup) {
        __shared__ float sh_m[kPieces];
        __shared__ int sh_nan[kPieces];
        const int piece = static_cast<int>(threadIdx.x) / kLaneGroup;
        if (static_cast<int>(threadIdx.x) % kLaneGroup == 0) {
            sh_m[piece] = m;
            sh_nan[piece] = nan;
        }
        __syncthreads();
        const int first = (static_cast<int>(threadIdx.x) / G) * (G / kLaneGroup);
        m = 0.0f;
        nan = 0;
#pragma unroll
        for (int i = 0; i < G / kLaneGroup; ++i) {
            const float om = sh_m[first + i];
            m = (om > m) ? om : m;
            nan |= sh_nan[first + i];
        }
        __syncthreads(); /* the arrays may be reused by a later call */
    }
}

/* Sum of a double over the whole CTA (result valid in thread 0). Every thread must call it. */
__device__ __forceinline__ double block_sum(double v) {
    __shared__ double sh[kPieces];
#pragma unroll
    for (int o = kLaneGroup / 2; o > 0; o >>= 1) v += lb_shfl_xor(v, o);
    const int piece = static_cast<int>(threadIdx.x) / kLaneGroup;
    if (static_cast<int>(threadIdx.x) % kLaneGroup == 0) sh[piece] = v;
    __syncthreads();
    double total = 0.0;
    if (threadIdx.x == 0)
        for (int i = 0; i < static_cast<int>(blockDim.x) / kLaneGroup; ++i) total += sh[i];
    __syncthreads();
    return total;
}

/* Max over the whole CTA (result valid in every thread). Every thread must call it. */
__device__ __forceinline__ float block_max(float m) {
    __shared__ float sh[kPieces];
#pragma unroll
    for (int o = kLaneGroup / 2; o > 0; o >>= 1) {
        const float om = lb_shfl_xor(m, o);
        m = (om > m) ? om : m;
    }
    const int piece = static_cast<int>(threadIdx.x) / kLaneGroup;
    if (static_cast<int>(threadIdx.x) % kLaneGroup == 0) sh[piece] = m;
    __syncthreads();
    float r = 0.0f;
    for (int i = 0; i < static_cast<int>(blockDim.x) / kLaneGroup; ++i) r = (sh[i] > r) ? sh[i] : r;
    __syncthreads();
    return r;
}

/* ---- 8-bit blockwise helpers ------------------------------------------------------------------ */
/* The shared tables of the 8-bit lookup (lowbit_device.h): the code's 255 midpoints in order (the
 * sweep of an unsorted code) and as the implicit search tree of lut8_entry_tree (sorted codes). */
struct Midpoints8 {
    float in_order[fmt::kCode8Size];
    float tree[fmt::kCode8Size];
};

/* Fills m from a 256-entry code (midpoints computed as fmt::midpoint8 does) and returns whether
 * the tree search may be used (midpoints non-decreasing, no NaN). Every thread must call it. */
__device__ __forceinline__ bool load_midpoints8(const float *__restrict__ code, Midpoints8 &m) {
    for (int i = static_cast<int>(threadIdx.x); i < fmt::kCode8Size; i += static_cast<int>(blockDim.x)) {
        m.in_order[i] = (i < fmt::kMidpoint8Size) ? fmt::midpoint8(code, i) : infinity();
        m.tree[i] = (i > 0) ? fmt::midpoint8(code, fmt::lut8_tree_source(i)) : infinity();
    }
    __syncthreads();
    int ok = 1;
    for (int i = static_cast<int>(threadIdx.x); i + 1 < fmt::kMidpoint8Size; i += static_cast<int>(blockDim.x))
        ok &= (m.in_order[i] <= m.in_order[i + 1]) ? 1 : 0;
    return __syncthreads_and(ok) != 0;
}

/* Byte of an 8-bit bin through the tables (sorted: tree search; else the sweep). */
__device__ __forceinline__ uint8_t lookup8(const Midpoints8 &m, bool sorted, uint32_t bin) {
    return sorted ? fmt::lut8_entry_tree(m.tree, bin) : fmt::lut8_entry_sweep(m.in_order, bin);
}

/* What an 8-bit block with (max |x| = m, NaN seen) stores and whether its values are encoded,
 * exactly as csrc/cpu/blockwise_8bit.cpp: NaN -> NaN absmax, +Inf or 0 -> that absmax, bytes 0. */
struct Block8 {
    float absmax;
    bool encode;
    float inv;
};
__device__ __forceinline__ Block8 block8(float m, int nan) {
    if (nan) return {quiet_nan(), false, 0.0f};
    if (m == infinity() || m == 0.0f) return {m, false, 0.0f};
    return {m, true, 1.0f / m};
}

/* ---- launchers (one per op; see each .cu file for the launch layout) --------------------------- */
cudaError_t quantize_4bit(int32_t dtype, const void *A, int64_t n, int64_t blocksize,
                          int32_t quant_type, uint8_t *out, float *absmax, cudaStream_t stream);
cudaError_t dequantize_4bit(int32_t dtype, const uint8_t *A, const float *absmax, int64_t n,
                            int64_t blocksize, int32_t quant_type, void *out, cudaStream_t stream);
cudaError_t quantize_blockwise(int32_t dtype, const float *code, const void *A, int64_t n,
                               int64_t blocksize, uint8_t *out, float *absmax, cudaStream_t stream);
cudaError_t dequantize_blockwise(int32_t dtype, const float *code, const uint8_t *A,
                                 const float *absmax, int64_t n, int64_t blocksize, void *out,
                                 cudaStream_t stream);
/* rows in [1, kGemvMaxRows]. */
constexpr int kGemvMaxRows = 8;
cudaError_t gemv_4bit(int32_t dtype, const void *A, int64_t rows, const uint8_t *B, int64_t N,
                      int64_t K, const float *absmax, const float *code, int64_t blocksize,
                      const void *bias, int32_t bias_dtype, void *out, cudaStream_t stream);
cudaError_t int8_vectorwise_quant(int32_t dtype, const void *A, int64_t rows, int64_t cols,
                                  float threshold, int8_t *out, float *row_stats,
                                  uint8_t *outlier_flags, cudaStream_t stream);
cudaError_t int8_vectorwise_dequant(const int8_t *A, const float *stats, int64_t rows, int64_t cols,
                                    float scale, float *out, cudaStream_t stream);
cudaError_t int8_mm_dequant(const int32_t *A, const float *row_stats, const float *col_stats,
                            int64_t rows, int64_t cols, float scale, const void *bias,
                            int32_t bias_dtype, int32_t out_dtype, void *out, cudaStream_t stream);

/* Optimizers, numbered as lowbit_cuda_optimizer. */
enum : int32_t { kAdam = 0, kMomentum = 1, kRmsprop = 2, kAdagrad = 3, kLion = 4, kAdemamix = 5 };

/* Step scalars (csrc/common/lowbit_optim.h: derived on the host in double exactly as
 * lowbit/backends/reference/optimizers.py derives them, shared with the CPU kernels). */
using OptimParams = ::lowbit::optim::Params;
static_assert(int{kAdam} == int{optim::kAdam} && int{kMomentum} == int{optim::kMomentum} &&
                  int{kRmsprop} == int{optim::kRmsprop} && int{kAdagrad} == int{optim::kAdagrad} &&
                  int{kLion} == int{optim::kLion} && int{kAdemamix} == int{optim::kAdemamix},
              "lowbit_cuda_optimizer and lowbit::optim::Optimizer must agree");
cudaError_t optimizer_32bit(int32_t optimizer, int32_t dtype, const void *g, void *p, float *state1,
                            float *state2, int64_t n, const OptimParams &params, float *unorm_vec,
                            double *scratch, cudaStream_t stream);
cudaError_t optimizer_8bit_blockwise(int32_t optimizer, int32_t dtype, const void *g, void *p,
                                     uint8_t *state1, uint8_t *state2, int64_t n,
                                     const OptimParams &params, const float *qmap1,
                                     const float *qmap2, float *absmax1, float *absmax2,
                                     cudaStream_t stream);

} // namespace gpu
} // namespace lowbit

#endif /* LOWBIT_CUDA_KERNELS_CUH */
