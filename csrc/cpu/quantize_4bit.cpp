/* quantize_4bit.cpp -- NF4/FP4 blockwise quantize and dequantize on the CPU (portable scalar).
 *
 * Semantics (bit-exact with bitsandbytes 0.50.2 and lowbit's torch reference):
 *   full block:  absmax = max|x|;  inv = 1 / max(absmax, 1e-38f);  s = clamp(x * inv, -1, 1)
 *   tail block:  am = max(max|x|, 1e-38f);  absmax = am (clamped value stored);
 *                s = clamp(x / am, -1, 1)  (true division, as the reference does for the tail)
 *   nibble = encode_4bit(s) (lowbit_formats.h); packing and layout: see cpu_kernels.h.
 *   A block holding NaN or +-Inf gets absmax NaN (any NaN) or +Inf and all-zero nibbles;
 *   Python turns that into a ValueError.
 *   dequantize: out = to_dtype(code[nibble] * absmax[block]), one float32 multiply.
 */
#include <stddef.h>
#include <string.h>

#include <algorithm>
#include <limits>

#include "cpu_kernels.h"
#include "parallel.h"

namespace lowbit {
namespace cpu {
namespace LOWBIT_CPU_ISA {

namespace {

/* max|x| over a block and whether it holds a NaN. Comparison-based so a NaN never enters m. */
template <class E>
inline float block_absmax(const typename E::T *x, int64_t len, bool *has_nan) {
    float m = 0.0f;
    bool nan = false;
    for (int64_t i = 0; i < len; ++i) {
        const float v = E::load(x[i]);
        nan |= (v != v);
        const float a = fmt::bits_float(fmt::float_bits(v) & 0x7FFFFFFFu);
        m = (a > m) ? a : m;
    }
    *has_nan = nan;
    return m;
}

template <class E>
void quantize_4bit_blocks(const typename E::T *A, int64_t n, int64_t blocksize,
                          int32_t quant_type, uint8_t *out, float *absmax, int64_t b0,
                          int64_t b1) {
    const uint8_t pad = fmt::encode_4bit(0.0f, quant_type); /* code of the padding element */
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * blocksize;
        const int64_t len = std::min(blocksize, n - start);
        const typename E::T *x = A + start;
        uint8_t *o = out + start / 2; /* start is even: the block starts on a byte */
        const int64_t nbytes = (len + 1) / 2;

        bool has_nan = false;
        const float m = block_absmax<E>(x, len, &has_nan);
        if (has_nan || m == std::numeric_limits<float>::infinity()) {
            absmax[b] = has_nan ? std::numeric_limits<float>::quiet_NaN() : m;
            memset(o, 0, static_cast<size_t>(nbytes));
            continue;
        }

        const float am = std::max(m, fmt::kAbsmaxFloor4);
        if (len == blocksize) {
            /* full block: multiply by the reciprocal */
            absmax[b] = m;
            const float inv = 1.0f / am;
            for (int64_t i = 0; i < len; i += 2) { /* blocksize is even */
                const uint8_t hi = fmt::encode_4bit(fmt::clamp_unit(E::load(x[i]) * inv), quant_type);
                const uint8_t lo = fmt::encode_4bit(fmt::clamp_unit(E::load(x[i + 1]) * inv), quant_type);
                o[i / 2] = static_cast<uint8_t>((hi << 4) | lo);
            }
        } else {
            /* tail block: store the floored absmax, divide */
            absmax[b] = am;
            for (int64_t i = 0; i < len; i += 2) {
                const uint8_t hi = fmt::encode_4bit(fmt::clamp_unit(E::load(x[i]) / am), quant_type);
                const uint8_t lo = (i + 1 < len)
                                       ? fmt::encode_4bit(fmt::clamp_unit(E::load(x[i + 1]) / am), quant_type)
                                       : pad;
                o[i / 2] = static_cast<uint8_t>((hi << 4) | lo);
            }
        }
    }
}

template <class E>
void dequantize_4bit_blocks(const uint8_t *A, const float *absmax, int64_t n, int64_t blocksize,
                            const float *code, typename E::T *out, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * blocksize;
        const int64_t len = std::min(blocksize, n - start);
        const uint8_t *q = A + start / 2;
        typename E::T *y = out + start;
        const float a = absmax[b];
        int64_t i = 0;
        for (; i + 1 < len; i += 2) {
            const unsigned byte = q[i / 2];
            y[i] = E::store(code[byte >> 4] * a);
            y[i + 1] = E::store(code[byte & 15u] * a);
        }
        if (i < len) y[i] = E::store(code[q[i / 2] >> 4] * a); /* odd n: last high nibble */
    }
}

} // namespace

void quantize_4bit(int32_t dtype, const void *A, int64_t n, int64_t blocksize, int32_t quant_type,
                   uint8_t *out, float *absmax, int num_threads) {
    dispatch_dtype(dtype, [&](auto tag) {
        using E = decltype(tag);
        const auto *a = static_cast<const typename E::T *>(A);
        parallel_for(0, num_blocks(n, blocksize), num_threads, block_grain(blocksize),
                     [&](int64_t b0, int64_t b1) {
                         quantize_4bit_blocks<E>(a, n, blocksize, quant_type, out, absmax, b0, b1);
                     });
    });
}

void dequantize_4bit(int32_t dtype, const uint8_t *A, const float *absmax, int64_t n,
                     int64_t blocksize, int32_t quant_type, void *out, int num_threads) {
    float code[fmt::kCode4Size];
    fmt::code_4bit(quant_type, code);
    dispatch_dtype(dtype, [&](auto tag) {
        using E = decltype(tag);
        auto *y = static_cast<typename E::T *>(out);
        parallel_for(0, num_blocks(n, blocksize), num_threads, block_grain(blocksize),
                     [&](int64_t b0, int64_t b1) {
                         dequantize_4bit_blocks<E>(A, absmax, n, blocksize, code, y, b0, b1);
                     });
    });
}

} // namespace LOWBIT_CPU_ISA
} // namespace cpu
} // namespace lowbit
