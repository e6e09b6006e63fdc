/* lowbit_int8.h -- LLM.int8 per-element math, defined once for every native backend.
 *
 * The definition is the reference backend (lowbit/backends/reference/int8.py) as torch evaluates
 * it on the CPU, one float32 operation at a time (build with contraction off, as everything in
 * csrc/common):
 *
 *   outlier       |x| >= t, t > 0, where t is the threshold rounded to A's dtype (the reference
 *                 compares in A's dtype; comparing the exact float widening of x with the widened
 *                 rounded t is the same comparison)
 *   row scale     rowmax > 0 ? (1 / rowmax) * 127 : 0      (`127.0 / row_stats`: torch evaluates
 *                 a Python number divided by a tensor as tensor.reciprocal() * number)
 *   quantize      rint(x * scale) (round half to even, torch.round), then torch's float -> int8
 *                 cast on x86: the low byte of the int32 conversion, whose out-of-range and NaN
 *                 result is 0x80000000 (low byte 0). Only the tiny-rowmax case reaches that
 *                 branch: rowmax < 2^-128 makes 1 / rowmax overflow to +Inf, x * Inf is +-Inf
 *                 (or NaN for x == 0), and torch writes 0 -- and so does this.
 *   dequantize    (float(q) * stat) * scale                  (scale = float32(1/127))
 *   mm dequant    (float(acc) * (row * col)) * scale         (scale = float32(1/127^2)); the
 *                 int32 -> float32 conversion rounds to nearest even, as static_cast does.
 *
 * `LOWBIT_HD static inline` for the reasons given in lowbit_formats.h (internal linkage in every
 * per-ISA build; callable from CUDA/HIP device code).
 */
#ifndef LOWBIT_INT8_H
#define LOWBIT_INT8_H

#include <math.h>
#include <stdint.h>

#include "lowbit_formats.h"

namespace lowbit {
namespace fmt {

/* Largest K of int8_linear_matmul (formats.INT8_MATMUL_MAX_K): the int32 sum of K int8 products is
 * exact while K * 2^14 < 2^31; beyond, (-128)(-128) summed 2^17 times wraps to -2^31. */
constexpr int64_t kInt8MatmulMaxK = (int64_t{1} << 17) - 1;

/* Whether an element with |x| == abs_x (as float) is an outlier at the (dtype-rounded) threshold. */
LOWBIT_HD static inline bool int8_is_outlier(float abs_x, float threshold) {
    return threshold > 0.0f && abs_x >= threshold;
}

/* The quantization scale of a row (or column) whose absmax over its regular elements is `stat`. */
LOWBIT_HD static inline float int8_row_scale(float stat) {
    return stat > 0.0f ? (1.0f / stat) * 127.0f : 0.0f;
}

/* The low byte of x86's float -> int32 conversion of an integral float r (0x80000000 for NaN and
 * values outside int32). */
LOWBIT_HD static inline int8_t int8_from_integral(float r) {
    if (!(r >= -2147483648.0f && r < 2147483648.0f)) return 0;
    return static_cast<int8_t>(static_cast<uint8_t>(static_cast<uint32_t>(static_cast<int32_t>(r)) & 0xFFu));
}

/* One int8 code: rint(x * scale) cast as torch casts it. */
LOWBIT_HD static inline int8_t int8_quantize(float x, float scale) {
    return int8_from_integral(rintf(x * scale));
}

/* int8_vectorwise_dequant of one element. */
LOWBIT_HD static inline float int8_dequant(int8_t q, float stat, float scale) {
    return (static_cast<float>(q) * stat) * scale;
}

/* int8_mm_dequant of one int32 product before the optional bias (added in float32 after). */
LOWBIT_HD static inline float int8_mm_dequant(int32_t acc, float row_stat, float col_stat, float scale) {
    return (static_cast<float>(acc) * (row_stat * col_stat)) * scale;
}

} // namespace fmt
} // namespace lowbit

#endif /* LOWBIT_INT8_H */
