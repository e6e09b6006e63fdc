/* int8.cu -- LLM.int8 helpers: row-wise int8 quantization with outlier columns, and the float
 * epilogues of the int32 product. The int8 GEMM itself is torch._int_mm, called from Python.
 *
 * Semantics (lowbit/backends/reference/int8.py, every step one float32 operation; the per-element
 * functions fmt::int8_* of csrc/common/lowbit_int8.h, shared with csrc/cpu/int8.cpp):
 *   vectorwise quant, threshold t (already rounded to A's dtype by the caller, so comparing the
 *   float value of x with it is comparing in A's dtype):
 *     outlier element: |x| >= t (t > 0); its column is an outlier column (flag[col] = 1)
 *     row_stats[r] = max |x| over the row's non-outlier elements (0 if none)
 *     scale = row_stats > 0 ? (1 / row_stats) * 127 : 0   (the reference's `127.0 / row_stats`: torch
 *             evaluates a Python number divided by a tensor as tensor.reciprocal() * number)
 *     q = 0 for outlier elements and, when flags are given, every element of an outlier column;
 *         else rint(x * scale) (round half to even, as torch.round), cast to int8 as torch does
 *         on x86: the low byte of the int32 conversion, 0 for +-Inf/NaN (the products of the
 *         +Inf scale of a row whose max is below 2^-128)
 *   vectorwise dequant: out = (float(q) * stats[r]) * scale         (scale = float(1/127))
 *   mm dequant: out = cast(((float(A) * (row[r] * col[c])) * scale) [+ float(bias[c])])
 *                                                                  (scale = float(1/127^2))
 * Launch layout (all): one CTA of 256 threads per row (grid.x = rows). Accesses are vectorized:
 *   when the row length is a multiple of the vector width and the pointers are 16-byte aligned,
 *   thread i takes the VEC consecutive columns [VEC*i, VEC*i + VEC), then VEC*(i + 256), ... with
 *   one 16-byte load of the input (8 fp16/bf16, 4 fp32 or int32, 16 int8) and one store of VEC
 *   outputs; otherwise VEC = 1 (element i, i + 256, ...). A warp's accesses are contiguous either
 *   way. The row max is a shuffle + shared-memory reduction. Outlier flags are plain stores of 1
 *   by any row that finds one (benign, idempotent races).
 * Vectorwise quant reads its input once when no row depends on another (no threshold, or no
 *   column flags) and the row fits the CTA's registers (kOnePassVecs vectors per thread): the
 *   row is loaded, its max taken and its bytes written from the registers. With column flags,
 *   every row's bytes depend on every other row's outliers: one kernel finds row maxima and
 *   outlier columns, a second quantizes (two reads of the input).
 */
#include <initializer_list>

#include "kernels.cuh"
#include "lowbit_int8.h"

namespace lowbit {
namespace gpu {
namespace {

/* Vectors of VEC elements per thread the one-pass quantizer keeps in registers: rows up to
 * 256 * 8 * VEC elements (16384 fp16/bf16, 8192 fp32 columns) take the one-pass kernel. */
constexpr int kOnePassVecs = 8;

template <class T>
constexpr int vec_of() { return 16 / static_cast<int>(sizeof(T)); }

/* Loads VEC elements of a row (VEC > 1: one 16-byte load) as floats. */
template <class E, int VEC>
__device__ __forceinline__ void load_row(const typename E::T *row, int64_t c, float (&x)[VEC]) {
    if constexpr (VEC > 1) {
        load_vec<E, VEC>(row + c, x);
    } else {
        x[0] = E::load(row[c]);
    }
}

/* Folds VEC elements (columns c..) into the row max m, flagging outlier columns. */
template <int VEC>
__device__ __forceinline__ void add_row_stats(const float (&x)[VEC], int64_t c, float threshold,
                                              uint8_t *__restrict__ flags, float &m) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        const float ax = abs_bits(x[j]);
        if (fmt::int8_is_outlier(ax, threshold)) {
            if (flags != nullptr) flags[c + j] = 1;
        } else {
            m = (ax > m) ? ax : m;
        }
    }
}

/* Quantizes VEC elements and stores them (VEC > 1: one VEC-byte store). */
template <int VEC>
__device__ __forceinline__ void store_quantized(const float (&x)[VEC], int64_t c, float threshold, float scale,
                                                const uint8_t *__restrict__ flags, int8_t *__restrict__ out) {
    int8_t q[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        const bool zero = (flags != nullptr && flags[c + j] != 0) || fmt::int8_is_outlier(abs_bits(x[j]), threshold);
        q[j] = zero ? int8_t{0} : fmt::int8_quantize(x[j], scale);
    }
    if constexpr (VEC > 1) {
        store_bytes<VEC>(out + c, q);
    } else {
        out[c] = q[0];
    }
}

/* One pass: the row is read once into registers (see the header). */
template <class E, int VEC>
__global__ void __launch_bounds__(kThreads)
    k_int8_quant_one_pass(const typename E::T *__restrict__ A, int64_t cols, float threshold,
                          float *__restrict__ row_stats, uint8_t *__restrict__ flags, int8_t *__restrict__ out) {
    const int64_t row = blockIdx.x;
    const typename E::T *a = A + row * cols;
    float x[kOnePassVecs][VEC];
    float m = 0.0f;
#pragma unroll
    for (int v = 0; v < kOnePassVecs; ++v) {
        const int64_t c = (static_cast<int64_t>(v) * kThreads + threadIdx.x) * VEC;
        if (c < cols) {
            load_row<E, VEC>(a, c, x[v]);
            add_row_stats<VEC>(x[v], c, threshold, flags, m);
        }
    }
    m = block_max(m);
    if (threadIdx.x == 0) row_stats[row] = m;
    const float scale = fmt::int8_row_scale(m);
#pragma unroll
    for (int v = 0; v < kOnePassVecs; ++v) {
        const int64_t c = (static_cast<int64_t>(v) * kThreads + threadIdx.x) * VEC;
        if (c < cols) store_quantized<VEC>(x[v], c, threshold, scale, nullptr, out + row * cols);
    }
}

template <class E, int VEC>
__global__ void __launch_bounds__(kThreads)
    k_int8_row_stats(const typename E::T *__restrict__ A, int64_t cols, float threshold,
                     float *__restrict__ row_stats, uint8_t *__restrict__ flags) {
    const int64_t row = blockIdx.x;
    const typename E::T *a = A + row * cols;
    float m = 0.0f;
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < cols; c += static_cast<int64_t>(kThreads) * VEC) {
        float x[VEC];
        load_row<E, VEC>(a, c, x);
        add_row_stats<VEC>(x, c, threshold, flags, m);
    }
    m = block_max(m);
    if (threadIdx.x == 0) row_stats[row] = m;
}

template <class E, int VEC>
__global__ void __launch_bounds__(kThreads)
    k_int8_quantize_rows(const typename E::T *__restrict__ A, int64_t cols, float threshold,
                         const float *__restrict__ row_stats, const uint8_t *__restrict__ flags,
                         int8_t *__restrict__ out) {
    const int64_t row = blockIdx.x;
    const float scale = fmt::int8_row_scale(row_stats[row]); /* torch: 127.0 / t is t.reciprocal() * 127 */
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < cols; c += static_cast<int64_t>(kThreads) * VEC) {
        float x[VEC];
        load_row<E, VEC>(A + row * cols, c, x);
        store_quantized<VEC>(x, c, threshold, scale, flags, out + row * cols);
    }
}

template <int VEC>
__global__ void __launch_bounds__(kThreads)
    k_int8_vectorwise_dequant(const int8_t *__restrict__ A, const float *__restrict__ stats,
                              int64_t cols, float scale, float *__restrict__ out) {
    const int64_t row = blockIdx.x;
    const float s = stats[row];
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < cols; c += static_cast<int64_t>(kThreads) * VEC) {
        int8_t q[VEC];
        load_bytes<VEC>(A + row * cols + c, q);
        float y[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) y[j] = fmt::int8_dequant(q[j], s, scale);
        store_bytes<4 * VEC>(out + row * cols + c, y);
    }
}

template <class E, int VEC>
__global__ void __launch_bounds__(kThreads)
    k_int8_mm_dequant(const int32_t *__restrict__ A, const float *__restrict__ row_stats,
                      const float *__restrict__ col_stats, int64_t cols, float scale,
                      const void *__restrict__ bias, int bias_dtype, typename E::T *__restrict__ out) {
    const int64_t row = blockIdx.x;
    const float rs = row_stats[row];
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < cols; c += static_cast<int64_t>(kThreads) * VEC) {
        int32_t acc[VEC];
        float cs[VEC];
        load_bytes<4 * VEC>(A + row * cols + c, acc);
        load_bytes<4 * VEC>(col_stats + c, cs);
        typename E::T y[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            float v = fmt::int8_mm_dequant(acc[j], rs, cs[j], scale);
            if (bias != nullptr) v = v + load_any(bias, bias_dtype, c + j);
            y[j] = E::store(v);
        }
        store_bytes<VEC * static_cast<int>(sizeof(typename E::T))>(out + row * cols + c, y);
    }
}

bool grid_ok(int64_t rows) { return rows > 0 && rows <= 0x7FFFFFFF; }

/* Whether a row-wise kernel may take VEC-wide accesses: whole vectors per row, aligned rows. */
bool vectorizable(int64_t cols, int vec, std::initializer_list<const void *> pointers) {
    if (cols % vec != 0) return false;
    for (const void *p : pointers)
        if (p != nullptr && !is_aligned(p, 16)) return false;
    return true;
}

} // namespace

cudaError_t int8_vectorwise_quant(int32_t dtype, const void *A, int64_t rows, int64_t cols,
                                  float threshold, int8_t *out, float *row_stats,
                                  uint8_t *outlier_flags, cudaStream_t stream) {
    if (!grid_ok(rows)) return cudaErrorInvalidValue;
    if (outlier_flags != nullptr) {
        const cudaError_t err = cudaMemsetAsync(outlier_flags, 0, static_cast<size_t>(cols), stream);
        if (err != cudaSuccess) return err;
    }
    return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
        using E = decltype(tag);
        constexpr int VEC = vec_of<typename E::T>();
        const auto *a = static_cast<const typename E::T *>(A);
        const unsigned grid = static_cast<unsigned>(rows);
        /* the int8 output needs VEC-byte alignment only: 16-byte rows of the input imply it */
        const bool vec = vectorizable(cols, VEC, {A, out});
        const bool independent_rows = outlier_flags == nullptr || threshold == 0.0f;
        if (independent_rows && cols <= static_cast<int64_t>(kThreads) * kOnePassVecs * (vec ? VEC : 1)) {
            if (vec)
                LOWBIT_LAUNCH(grid, kThreads, stream, k_int8_quant_one_pass<E, VEC>)(a, cols, threshold, row_stats, outlier_flags, out);
            else
                LOWBIT_LAUNCH(grid, kThreads, stream, k_int8_quant_one_pass<E, 1>)(a, cols, threshold, row_stats, outlier_flags, out);
            return cudaGetLastError();
        }
        if (vec)
            LOWBIT_LAUNCH(grid, kThreads, stream, k_int8_row_stats<E, VEC>)(a, cols, threshold, row_stats, outlier_flags);
        else
            LOWBIT_LAUNCH(grid, kThreads, stream, k_int8_row_stats<E, 1>)(a, cols, threshold, row_stats, outlier_flags);
        cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
        if (vec)
            LOWBIT_LAUNCH(grid, kThreads, stream, k_int8_quantize_rows<E, VEC>)(a, cols, threshold, row_stats, outlier_flags, out);
        else
            LOWBIT_LAUNCH(grid, kThreads, stream, k_int8_quantize_rows<E, 1>)(a, cols, threshold, row_stats, outlier_flags, out);
        return cudaGetLastError();
    });
}

cudaError_t int8_vectorwise_dequant(const int8_t *A, const float *stats, int64_t rows, int64_t cols,
                                    float scale, float *out, cudaStream_t stream) {
    if (!grid_ok(rows)) return cudaErrorInvalidValue;
    const unsigned grid = static_cast<unsigned>(rows);
    if (vectorizable(cols, 16, {A, out}))
        LOWBIT_LAUNCH(grid, kThreads, stream, k_int8_vectorwise_dequant<16>)(A, stats, cols, scale, out);
    else
        LOWBIT_LAUNCH(grid, kThreads, stream, k_int8_vectorwise_dequant<1>)(A, stats, cols, scale, out);
    return cudaGetLastError();
}

cudaError_t int8_mm_dequant(const int32_t *A, const float *row_stats, const float *col_stats,
                            int64_t rows, int64_t cols, float scale, const void *bias,
                            int32_t bias_dtype, int32_t out_dtype, void *out, cudaStream_t stream) {
    if (!grid_ok(rows)) return cudaErrorInvalidValue;
    return dispatch_dtype(out_dtype, [&](auto tag) -> cudaError_t {
        using E = decltype(tag);
        auto *y = static_cast<typename E::T *>(out);
        const unsigned grid = static_cast<unsigned>(rows);
        /* 4 int32 in, 4 outputs (8 or 16 bytes) out */
        if (vectorizable(cols, 4, {A, col_stats, out}))
            LOWBIT_LAUNCH(grid, kThreads, stream, k_int8_mm_dequant<E, 4>)(A, row_stats, col_stats, cols, scale, bias, bias_dtype, y);
        else
            LOWBIT_LAUNCH(grid, kThreads, stream, k_int8_mm_dequant<E, 1>)(A, row_stats, col_stats, cols, scale, bias, bias_dtype, y);
        return cudaGetLastError();
    });
}

} // namespace gpu
} // namespace lowbit
