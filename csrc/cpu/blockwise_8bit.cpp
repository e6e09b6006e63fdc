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
 */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <limits>

#include "cpu_kernels.h"
#include "lut8_cache.h"
#include "parallel.h"

namespace lowbit {
namespace cpu {
namespace LOWBIT_CPU_ISA {

namespace {

template <class E>
void quantize_blockwise_blocks(const uint8_t *lut, const typename E::T *A, int64_t n,
                               int64_t blocksize, uint8_t *out, float *absmax, int64_t b0,
                               int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * blocksize;
        const int64_t len = std::min(blocksize, n - start);
        const typename E::T *x = A + start;
        uint8_t *o = out + start;

        float m = 0.0f;
        bool has_nan = false;
        for (int64_t i = 0; i < len; ++i) {
            const float v = E::load(x[i]);
            has_nan |= (v != v);
            const float a = fmt::bits_float(fmt::float_bits(v) & 0x7FFFFFFFu);
            m = (a > m) ? a : m;
        }
        if (has_nan || m == std::numeric_limits<float>::infinity() || m == 0.0f) {
            absmax[b] = has_nan ? std::numeric_limits<float>::quiet_NaN() : m;
            memset(o, 0, static_cast<size_t>(len));
            continue;
        }
        absmax[b] = m;
        const float inv = 1.0f / m;
        for (int64_t i = 0; i < len; ++i)
            o[i] = lut[fmt::lut8_bin(fmt::clamp_unit(E::load(x[i]) * inv))];
    }
}

template <class E>
void dequantize_blockwise_blocks(const float *code, const uint8_t *A, const float *absmax,
                                 int64_t n, int64_t blocksize, typename E::T *out, int64_t b0,
                                 int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * blocksize;
        const int64_t len = std::min(blocksize, n - start);
        const float a = absmax[b];
        for (int64_t i = start; i < start + len; ++i) out[i] = E::store(code[A[i]] * a);
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
