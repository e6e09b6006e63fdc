/* blockwise_8bit.cpp -- 8-bit blockwise quantize and dequantize against a 256-entry float code.
 *
 * Semantics (bit-exact with bitsandbytes 0.50.2 on CPU; the lookup is defined in
 * lowbit_formats.h):
 *   per block (full or tail alike): absmax = max|x|
 *     NaN or +-Inf in the block -> absmax NaN / +Inf, bytes 0 (Python raises a ValueError)
 *     absmax == 0               -> bytes 0
 *     else inv = 1 / absmax; byte = lut[bin(clamp(x * inv, -1, 1))]
 *   A subnormal absmax below ~2.9e-39 makes inv = +Inf; then 0 * inv is NaN, which clamp_unit
 *   sends to -1 (bin 0), the byte bitsandbytes produces for it.
 *   dequantize: out = to_dtype(code[q] * absmax[block]).
 * Layout: n bytes, one per element; absmax one float per block (see cpu_kernels.h).
 *
 * The element-by-element loops are the definition (and the scalar build); where Vec::W > 1 a
 * vector body runs first with the same IEEE operations per element (simd.h): multiply by the
 * block's reciprocal, clamp, the four separately rounded steps of lut8_bin and truncation; and
 * for dequantize the multiply by absmax and the fp16/bf16 rounding. The table lookups themselves
 * (64 Ki-entry byte table, 256-entry code) stay scalar loads: the tables do not fit in registers
 * and vector gathers are slower than scalar loads on several CPUs (about 2x on Zen 4).
 */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <limits>

#include "block_absmax.h"
#include "cpu_kernels.h"
#include "lut8_cache.h"
#include "parallel.h"
#include "simd.h"

namespace lowbit {
namespace cpu {
namespace LOWBIT_CPU_ISA {

namespace {

template <class E, class V = Vec>
void quantize_blockwise_blocks(const uint8_t *lut, const typename E::T *A, int64_t n,
                               int64_t blocksize, uint8_t *out, float *absmax, int64_t b0,
                               int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * blocksize;
        const int64_t len = std::min(blocksize, n - start);
        const typename E::T *x = A + start;
        uint8_t *o = out + start;

        bool has_nan = false;
        const float m = block_absmax<E>(x, len, &has_nan);
        if (has_nan || m == std::numeric_limits<float>::infinity() || m == 0.0f) {
            absmax[b] = has_nan ? std::numeric_limits<float>::quiet_NaN() : m;
            memset(o, 0, static_cast<size_t>(len));
            continue;
        }
        absmax[b] = m;
        const float inv = 1.0f / m;
        int64_t i = 0;
        if constexpr (V::W > 1) {
            const typename V::F vinv = V::set1(inv), one = V::set1(1.0f), minus_one = V::set1(-1.0f),
                                half = V::set1(0.5f), top = V::set1(65535.0f);
            alignas(64) int32_t bins[V::W]; /* looked up with scalar loads (see the top of this file) */
            for (; i + V::W <= len; i += V::W) {
                const typename V::F t = V::min(V::max(V::mul(V::load(E{}, x + i), vinv), minus_one), one);
                /* fmt::lut8_bin: ((t + 1) * 0.5) * 65535 + 0.5, each step rounded, then truncated */
                const typename V::F u = V::add(V::mul(V::mul(V::add(t, one), half), top), half);
                V::store_ints(bins, V::truncate(u));
                for (int j = 0; j < V::W; ++j) o[i + j] = lut[bins[j]];
            }
        }
        for (; i < len; ++i) o[i] = lut[fmt::lut8_bin(fmt::clamp_unit(E::load(x[i]) * inv))];
    }
}

template <class E, class V = Vec>
void dequantize_blockwise_blocks(const float *code, const uint8_t *A, const float *absmax,
                                 int64_t n, int64_t blocksize, typename E::T *out, int64_t b0,
                                 int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * blocksize;
        const int64_t end = start + std::min(blocksize, n - start);
        const float a = absmax[b];
        int64_t i = start;
        if constexpr (V::W > 1) {
            const typename V::F va = V::set1(a);
            alignas(64) float values[V::W];
            for (; i + V::W <= end; i += V::W) {
                for (int j = 0; j < V::W; ++j) values[j] = code[A[i + j]];
                V::store(E{}, out + i, V::mul(V::loadu(values), va));
            }
        }
        for (; i < end; ++i) out[i] = E::store(code[A[i]] * a);
    }
}

} // namespace

bool quantize_blockwise(int32_t dtype, const float *code, const void *A, int64_t n,
                        int64_t blocksize, uint8_t *out, float *absmax, int num_threads) {
    /* 64 KiB: heap, not stack (Python threads may run on small stacks). */
    uint8_t *lut = static_cast<uint8_t *>(malloc(fmt::kLut8Size));
    if (lut == nullptr) return false;
    lut8_get(code, lut);
    dispatch_dtype(dtype, [&](auto tag) {
        using E = decltype(tag);
        const auto *a = static_cast<const typename E::T *>(A);
        parallel_for(0, num_blocks(n, blocksize), num_threads, block_grain(blocksize),
                     [&](int64_t b0, int64_t b1) {
                         quantize_blockwise_blocks<E>(lut, a, n, blocksize, out, absmax, b0, b1);
                     });
    });
    free(lut);
    return true;
}

void dequantize_blockwise(int32_t dtype, const float *code, const uint8_t *A, const float *absmax,
                          int64_t n, int64_t blocksize, void *out, int num_threads) {
    float table[fmt::kCode8Size];
    memcpy(table, code, sizeof table);
    dispatch_dtype(dtype, [&](auto tag) {
        using E = decltype(tag);
        auto *y = static_cast<typename E::T *>(out);
        parallel_for(0, num_blocks(n, blocksize), num_threads, block_grain(blocksize),
                     [&](int64_t b0, int64_t b1) {
                         dequantize_blockwise_blocks<E>(table, A, absmax, n, blocksize, y, b0, b1);
                     });
    });
}

} // namespace LOWBIT_CPU_ISA
} // namespace cpu
} // namespace lowbit
