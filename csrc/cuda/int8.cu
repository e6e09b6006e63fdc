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
 * Launch layout (all three): one CTA of 256 threads per row (grid.x = rows); threads stride
 *   over the row's columns, thread i taking columns i, i+256, ...: each step of a warp reads
 *   32 consecutive elements (coalesced), and the per-column vectors (flags, col_stats, bias)
 *   are read the same way. The row max is a shuffle + shared-memory reduction. Outlier flags
 *   are plain stores of 1 by any row that finds one (benign, idempotent races).
 */
#include "kernels.cuh"
#include "lowbit_int8.h"

namespace lowbit {
namespace gpu {
namespace {

template <class E>
__global__ void __launch_bounds__(kThreads)
    k_int8_row_stats(const typename E::T *__restrict__ A, int64_t cols, float threshold,
                     float *__restrict__ row_stats, uint8_t *__restrict__ flags) {
    const int64_t row = blockIdx.x;
    const typename E::T *a = A + row * cols;
    float m = 0.0f;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = abs_bits(E::load(a[c]));
        if (fmt::int8_is_outlier(v, threshold)) {
            if (flags != nullptr) flags[c] = 1;
        } else {
            m = (v > m) ? v : m;
        }
    }
    m = block_max(m);
    if (threadIdx.x == 0) row_stats[row] = m;
}

template <class E>
__global__ void __launch_bounds__(kThreads)
    k_int8_quantize_rows(const typename E::T *__restrict__ A, int64_t cols, float threshold,
                         const float *__restrict__ row_stats, const uint8_t *__restrict__ flags,
                         int8_t *__restrict__ out) {
    const int64_t row = blockIdx.x;
    const float r = row_stats[row];
    const float scale = fmt::int8_row_scale(r); /* torch: 127.0 / t is t.reciprocal() * 127 */
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
        const float x = E::load(A[row * cols + c]);
        const bool zero = (flags != nullptr && flags[c] != 0) || fmt::int8_is_outlier(abs_bits(x), threshold);
        out[row * cols + c] = zero ? int8_t{0} : fmt::int8_quantize(x, scale);
    }
}

__global__ void __launch_bounds__(kThreads)
    k_int8_vectorwise_dequant(const int8_t *__restrict__ A, const float *__restrict__ stats,
                              int64_t cols, float scale, float *__restrict__ out) {
    const int64_t row = blockIdx.x;
    const float s = stats[row];
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
        out[row * cols + c] = fmt::int8_dequant(A[row * cols + c], s, scale);
}

template <class E>
__global__ void __launch_bounds__(kThreads)
    k_int8_mm_dequant(const int32_t *__restrict__ A, const float *__restrict__ row_stats,
                      const float *__restrict__ col_stats, int64_t cols, float scale,
                      const void *__restrict__ bias, int bias_dtype, typename E::T *__restrict__ out) {
    const int64_t row = blockIdx.x;
    const float rs = row_stats[row];
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = fmt::int8_mm_dequant(A[row * cols + c], rs, col_stats[c], scale);
        if (bias != nullptr) v = v + load_any(bias, bias_dtype, c);
        out[row * cols + c] = E::store(v);
    }
}

bool grid_ok(int64_t rows) { return rows > 0 && rows <= 0x7FFFFFFF; }

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
        const auto *a = static_cast<const typename E::T *>(A);
        const unsigned grid = static_cast<unsigned>(rows);
        LOWBIT_LAUNCH(grid, kThreads, stream, k_int8_row_stats<E>)(a, cols, threshold, row_stats, outlier_flags);
        cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
        LOWBIT_LAUNCH(grid, kThreads, stream, k_int8_quantize_rows<E>)(a, cols, threshold, row_stats, outlier_flags, out);
        return cudaGetLastError();
    });
}

cudaError_t int8_vectorwise_dequant(const int8_t *A, const float *stats, int64_t rows, int64_t cols,
                                    float scale, float *out, cudaStream_t stream) {
    if (!grid_ok(rows)) return cudaErrorInvalidValue;
    LOWBIT_LAUNCH(static_cast<unsigned>(rows), kThreads, stream, k_int8_vectorwise_dequant)(A, stats, cols, scale, out);
    return cudaGetLastError();
}

cudaError_t int8_mm_dequant(const int32_t *A, const float *row_stats, const float *col_stats,
                            int64_t rows, int64_t cols, float scale, const void *bias,
                            int32_t bias_dtype, int32_t out_dtype, void *out, cudaStream_t stream) {
    if (!grid_ok(rows)) return cudaErrorInvalidValue;
    return dispatch_dtype(out_dtype, [&](auto tag) -> cudaError_t {
        using E = decltype(tag);
        LOWBIT_LAUNCH(static_cast<unsigned>(rows), kThreads, stream, k_int8_mm_dequant<E>)(
            A, row_stats, col_stats, cols, scale, bias, bias_dtype, static_cast<typename E::T *>(out));
        return cudaGetLastError();
    });
}

} // namespace gpu
} // namespace lowbit
