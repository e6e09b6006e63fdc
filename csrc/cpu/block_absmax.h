/* block_absmax.h -- max|x| over one block, shared by the 4-bit and 8-bit quantizers.
 *
 * Comparison-based (m = (a > m) ? a : m), so a NaN never enters m; whether the block holds a NaN
 * is reported separately. The maximum of non-NaN values does not depend on the order they are
 * visited in, so the vector body (Vec::W lanes, then a lane reduction) gives the scalar result.
 */
#ifndef LOWBIT_CPU_BLOCK_ABSMAX_H
#define LOWBIT_CPU_BLOCK_ABSMAX_H

#include <stdint.h>

#include "cpu_kernels.h"
#include "simd.h"

namespace lowbit {
namespace cpu {
namespace LOWBIT_CPU_ISA {

template <class E, class V = Vec>
inline float block_absmax(const typename E::T *x, int64_t len, bool *has_nan) {
    float m = 0.0f;
    bool nan = false;
    int64_t i = 0;
    if constexpr (V::W > 1) {
        typename V::F vm = V::zero();
        typename V::Mask vnan = V::no_lanes();
        for (; i + V::W <= len; i += V::W) {
            const typename V::F v = V::load(E{}, x + i);
            vnan = V::mask_or(vnan, V::nan_mask(v));
            vm = V::max(V::abs(v), vm);
        }
        m = V::reduce_max(vm);
        nan = V::any(vnan);
    }
    for (; i < len; ++i) {
        const float v = E::load(x[i]);
        nan |= (v != v);
        const float a = fmt::bits_float(fmt::float_bits(v) & 0x7FFFFFFFu);
        m = (a > m) ? a : m;
    }
    *has_nan = nan;
    return m;
}

} // namespace LOWBIT_CPU_ISA
} // namespace cpu
} // namespace lowbit

#endif /* LOWBIT_CPU_BLOCK_ABSMAX_H */
