/* quantize_4bit.cpp -- NF4/FP4 blockwise quantize and dequantize on the CPU (one build per ISA).
 *
 * Semantics (bit-exact with bitsandbytes 0.50.2 and lowbit's torch reference):
 *   full block:  absmax = max|x|;  inv = 1 / max(absmax, 1e-38f);  s = clamp(x * inv, -1, 1)
 *   tail block:  am = max(max|x|, 1e-38f);  absmax = am (clamped value stored);
 *                s = clamp(x / am, -1, 1)  (true division, as the reference does for the tail)
 *   nibble = encode_4bit(s) (lowbit_formats.h); packing and layout: see cpu_kernels.h.
 *   A block holding NaN or +-Inf gets absmax NaN (any NaN) or +Inf and all-zero nibbles;
 *   Python turns that into a ValueError.
 *   dequantize: out = to_dtype(code[nibble] * absmax[block]), one float32 multiply.
 *
 * The element-by-element loops are the definition (and the scalar build); where Vec::W > 1 a
 * vector body runs first over whole vectors and performs the same IEEE operation per element:
 * one reciprocal per block, multiply (or divide in the tail), clamp, count of midpoints strictly
 * below (simd.h).
 */
#include <stddef.h>
#include <string.h>

#include <algorithm>
#include <limits>

#include "block_absmax.h"
#include "cpu_kernels.h"
#include "parallel.h"
#include "simd.h"

namespace lowbit {
namespace cpu {
namespace LOWBIT_CPU_ISA {

namespace {

/* The vector encoder: the 15 midpoints broadcast, and FP4's position -> code table. */
template <class V>
struct Encoder4 {
    typename V::F mids[fmt::kMidpoint4Size];
    typename V::Table16 order;
    bool nf4;

    explicit Encoder4(int32_t quant_type) : nf4(quant_type == fmt::kNF4) {
        const float *m = nf4 ? fmt::kNF4Midpoints : fmt::kFP4Midpoints;
        for (int i = 0; i < fmt::kMidpoint4Size; ++i) mids[i] = V::set1(m[i]);
        float order_bits[fmt::kCode4Size]; /* integers carried as float bit patterns */
        for (int i = 0; i < fmt::kCode4Size; ++i) order_bits[i] = fmt::bits_float(fmt::kFP4Order[i]);
        order = V::table16(order_bits);
    }
    /* codes of clamped scaled values (NF4's order is the identity) */
    typename V::I operator()(typename V::F s) const {
        const typename V::I position = V::count_below(mids, s);
        return nf4 ? position : V::lookup_bits(order, position);
    }
};

/* Nibbles of x[0..len) scaled by f (x * f, or x / f for the tail block), two per byte into o. */
template <class E, bool kDivide, class V = Vec>
void encode_block(const typename E::T *x, int64_t len, float f, int32_t quant_type, uint8_t *o) {
    int64_t i = 0;
    if constexpr (V::W > 1) {
        const Encoder4<V> encode(quant_type);
        const typename V::F vf = V::set1(f), lo = V::set1(-1.0f), hi = V::set1(1.0f);
        for (; i + V::W <= len; i += V::W) {
            const typename V::F v = V::load(E{}, x + i);
            const typename V::F s = kDivide ? V::div(v, vf) : V::mul(v, vf);
            V::store_nibbles(o + i / 2, encode(V::min(V::max(s, lo), hi))); /* = fmt::clamp_unit */
        }
    }
    const uint8_t pad = fmt::encode_4bit(0.0f, quant_type); /* code of the padding element */
    auto code = [&](int64_t k) {
        const float v = E::load(x[k]);
        return fmt::encode_4bit(fmt::clamp_unit(kDivide ? v / f : v * f), quant_type);
    };
    for (; i < len; i += 2) /* i is even: W and blocks are */
        o[i / 2] = static_cast<uint8_t>((code(i) << 4) | (i + 1 < len ? code(i + 1) : pad));
}

template <class E>
void quantize_4bit_blocks(const typename E::T *A, int64_t n, int64_t blocksize,
                          int32_t quant_type, uint8_t *out, float *absmax, int64_t b0,
                          int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * blocksize;
        const int64_t len = std::min(blocksize, n - start);
        const typename E::T *x = A + start;
        uint8_t *o = out + start / 2; /* start is even: the block starts on a byte */

        bool has_nan = false;
        const float m = block_absmax<E>(x, len, &has_nan);
        if (has_nan || m == std::numeric_limits<float>::infinity()) {
            absmax[b] = has_nan ? std::numeric_limits<float>::quiet_NaN() : m;
            memset(o, 0, static_cast<size_t>((len + 1) / 2));
            continue;
        }

        const float am = std::max(m, fmt::kAbsmaxFloor4);
        if (len == blocksize) { /* full block: multiply by the reciprocal */
            absmax[b] = m;
            encode_block<E, false>(x, len, 1.0f / am, quant_type, o);
        } else { /* tail block: store the floored absmax, divide */
            absmax[b] = am;
            encode_block<E, true>(x, len, am, quant_type, o);
        }
    }
}

template <class E, class V = Vec>
void dequantize_4bit_blocks(const uint8_t *A, const float *absmax, int64_t n, int64_t blocksize,
                            const float *code, typename E::T *out, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * blocksize;
        const int64_t len = std::min(blocksize, n - start);
        const uint8_t *q = A + start / 2;
        typename E::T *y = out + start;
        const float a = absmax[b];
        int64_t i = 0;
        if constexpr (V::W > 1) {
            const typename V::Table16 table = V::table16(code);
            const typename V::F va = V::set1(a);
            for (; i + V::W <= len; i += V::W)
                V::store(E{}, y + i, V::mul(V::lookup(table, V::load_nibbles(q + i / 2)), va));
        }
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
                     int64_t blocksize, const float *code, void *out, int num_threads) {
    float table[fmt::kCode4Size];
    memcpy(table, code, sizeof table);
    dispatch_dtype(dtype, [&](auto tag) {
        using E = decltype(tag);
        auto *y = static_cast<typename E::T *>(out);
        parallel_for(0, num_blocks(n, blocksize), num_threads, block_grain(blocksize),
                     [&](int64_t b0, int64_t b1) {
                         dequantize_4bit_blocks<E>(A, absmax, n, blocksize, table, y, b0, b1);
                     });
    });
}

} // namespace LOWBIT_CPU_ISA
} // namespace cpu
} // namespace lowbit
