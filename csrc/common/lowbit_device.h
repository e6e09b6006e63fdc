/* lowbit_device.h -- per-element math that GPU kernels need beyond lowbit_formats.h.
 *
 * Everything here is defined in terms of lowbit_formats.h and is host+device (LOWBIT_HD), so
 * that a host test (csrc/cuda/tests/device_math_test.cpp, run by tests/test_gpu_backends.py)
 * proves it equal to the CPU's definitions without a GPU.
 *
 * Why it exists: the CPU quantizes 8-bit blockwise through a 65536-entry table built by a
 * monotone sweep (fmt::build_lut8). A GPU kernel does not materialize that table (see
 * csrc/cuda/blockwise_8bit.cu for the reasons); it computes the one entry it needs, for the bin
 * fmt::lut8_bin gives, directly from the 255 code midpoints:
 *
 *   lut8_entry_sweep  -- the sweep's entry for ANY code, sorted or not: the first midpoint index
 *                        c with !(mid[c] < v_j), or 255 if there is none. (The sweep's cursor
 *                        stops at bin j on the first midpoint it cannot pass; v_j only grows with
 *                        j, so every earlier midpoint was passable at bin j.) O(255).
 *   lut8_entry_tree   -- the same value in 8 steps, valid when the midpoints are non-decreasing
 *                        and free of NaN (then "mid[c] < v" is true on a prefix and the entry is
 *                        a lower bound), searched in the midpoints laid out as an implicit binary
 *                        tree (breadth-first: node i has children 2i, 2i+1). In shared memory the
 *                        probes of one level then fall in distinct banks for levels 0-5, where a
 *                        search of the sorted array probes bank 31 at every one of its first
 *                        five steps (the conflicts the optimizers and quantize_blockwise paid).
 *
 * Both take the bin index j and use fmt::lut8_bin_value, so the float arithmetic is the CPU's.
 */
#ifndef LOWBIT_DEVICE_H
#define LOWBIT_DEVICE_H

#include <math.h>

#include "lowbit_formats.h"

namespace lowbit {
namespace fmt {

/* encode_4bit without a dynamically indexed table: position_4bit (the arithmetic) is the same
 * call, and FP4's order permutation is read from a 64-bit constant (nibble p = order[p]). A GPU
 * keeps a dynamically indexed local array in slow local memory; a shift stays in registers.
 * Equal to encode_4bit for every input (device_math_test.cpp checks it). */
namespace detail {
constexpr uint64_t pack_order4(const uint8_t (&order)[kCode4Size]) {
    uint64_t packed = 0;
    for (int p = 0; p < kCode4Size; ++p) packed |= static_cast<uint64_t>(order[p] & 15u) << (4 * p);
    return packed;
}
constexpr uint8_t kFP4OrderForPacking[kCode4Size] = {LOWBIT_FP4_ORDER_LIST};
} // namespace detail
constexpr uint64_t kFP4OrderPacked = detail::pack_order4(detail::kFP4OrderForPacking);

LOWBIT_HD static inline uint8_t encode_4bit_reg(float s, int quant_type) {
    if (quant_type == kNF4) {
        const float mids[kMidpoint4Size] = {LOWBIT_NF4_MIDPOINT_LIST};
        return static_cast<uint8_t>(position_4bit(s, mids)); /* NF4 order is the identity */
    }
    const float mids[kMidpoint4Size] = {LOWBIT_FP4_MIDPOINT_LIST};
    return static_cast<uint8_t>((kFP4OrderPacked >> (4 * position_4bit(s, mids))) & 15u);
}

/* Entry of the 8-bit lookup for bin j, as build_lut8's sweep computes it, for any code. */
LOWBIT_HD static inline uint8_t lut8_entry_sweep(const float *mid255, uint32_t j) {
    const float v = lut8_bin_value(j);
    int c = 0;
    while (c < kMidpoint8Size && mid255[c] < v) ++c;
    return static_cast<uint8_t>(c);
}

/* Index of the midpoint that node i (1..255) of the search tree holds: node i is on level
 * k = floor(log2 i) at position p = i - 2^k, and the in-order position of that node in a complete
 * tree of 255 nodes is (2p + 1) * 2^(7-k) - 1 (the root holds midpoint 127, the leaves 0, 2, 4...). */
LOWBIT_HD static inline int lut8_tree_source(int i) {
    int k = 0;
    while ((2 << k) <= i) ++k;
    return ((2 * (i - (1 << k)) + 1) << (7 - k)) - 1;
}

/* Entry of the 8-bit lookup for bin j when the 255 midpoints are non-decreasing without NaN,
 * given as tree256[i] = midpoint lut8_tree_source(i) (tree256[0] unused). Branch-free descent:
 * 8 dependent loads; right moves pass a node and its left subtree, so the leaf reached, minus
 * 256, counts the midpoints below v. */
LOWBIT_HD static inline uint8_t lut8_entry_tree(const float *tree256, uint32_t j) {
    const float v = lut8_bin_value(j);
    int i = 1;
    for (int level = 0; level < 8; ++level) i = 2 * i + ((tree256[i] < v) ? 1 : 0);
    return static_cast<uint8_t>(i - 256);
}

/* Whether lut8_entry_sorted may be used for these 255 midpoints: each one <= its successor
 * (a NaN fails the comparison, so a NaN anywhere makes this false). */
LOWBIT_HD static inline bool midpoints8_sorted(const float *mid255) {
    for (int i = 0; i + 1 < kMidpoint8Size; ++i)
        if (!(mid255[i] <= mid255[i + 1])) return false;
    return true;
}

/* Byte of one value of an 8-bit blockwise block with absmax m (finite, > 0) and inv = 1/m:
 * what csrc/cpu/blockwise_8bit.cpp writes through its table. `sorted` selects the tree search
 * (tree256), else the sweep over the midpoints in order (mid255). */
LOWBIT_HD static inline uint8_t encode_8bit(float x, float inv, const float *mid255, const float *tree256, bool sorted) {
    const uint32_t bin = lut8_bin(clamp_unit(x * inv));
    return sorted ? lut8_entry_tree(tree256, bin) : lut8_entry_sweep(mid255, bin);
}

/* Correctly rounded float32 square root from a hardware approximation that is within 1 ulp
 * (AMD's v_sqrt_f32, which is what sqrtf compiles to with ROCm 5.x's clang 15): LLVM 17's AMDGPU
 * expansion. Inputs below 2^-96 are scaled by 2^32 (result by 2^-16, both exact) so that the
 * residuals stay normal; the two FMA residuals then pick the right neighbour of the
 * approximation. device_math_test.cpp checks it against sqrtf with approximations one ulp low,
 * exact and one ulp high. */
template <class Approx>
LOWBIT_HD static inline float sqrt_rn_from_approx(float x, Approx sqrt_approx) {
    const bool scale = x < 0x1.0p-96f;
    const float xs = scale ? x * 0x1.0p+32f : x;
    float s = sqrt_approx(xs);
    if (!(xs > 0.0f) || xs == bits_float(0x7F800000u)) return s; /* +-0, negative, NaN, +Inf */
    const float down = bits_float(float_bits(s) - 1u);
    const float up = bits_float(float_bits(s) + 1u);
    const float below = fmaf(-down, s, xs); /* xs - down * s, one rounding */
    const float above = fmaf(-up, s, xs);   /* xs - up * s */
    s = (below <= 0.0f) ? down : s;
    s = (above > 0.0f) ? up : s;
    return scale ? s * 0x1.0p-16f : s;
}

/* Sign as torch.sign computes it on the CPU: +1, -1, or 0 for +-0 and NaN. */
LOWBIT_HD static inline float torch_sign(float x) {
    return static_cast<float>((0.0f < x ? 1 : 0) - (x < 0.0f ? 1 : 0));
}

} // namespace fmt
} // namespace lowbit

#endif /* LOWBIT_DEVICE_H */
