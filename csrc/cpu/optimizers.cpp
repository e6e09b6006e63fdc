/* optimizers.cpp -- fused optimizer steps: 32-bit state, and 8-bit blockwise state.
 *
 * The arithmetic is csrc/common/lowbit_optim.h (shared with csrc/cuda/optimizers.cu): this file
 * only loops. Each loop runs a Vec::W-wide body (VecMath: the same IEEE operations on a
 * register) and finishes with the scalar formulas (HostMath) for the tail; the scalar build is
 * the tail alone. Both give the same bits, so results depend neither on the ISA nor on the
 * thread count.
 *
 * 32-bit: elementwise, parallel over element ranges. With a trust ratio (LAMB/LARS: max_unorm > 0
 *   for adam, momentum, rmsprop) it is two passes: pass 1 computes the new state in registers and
 *   sums the squares of the value the ratio needs in double, in fixed 2^16-element segments summed
 *   in segment order (deterministic; the segment sums live in the calling thread's scratch); pass
 *   2 applies the step with alpha = step_size x ratio.
 * 8-bit: parallel over 256-element state blocks. Per block: dequantize each state (code[q] *
 *   absmax), update the parameter and the states in registers, keep the new state values in a
 *   1 KiB stack buffer per state, then requantize each state buffer exactly as quantize_blockwise
 *   does (absmax, 1/absmax, lut8 bin, lookup). The lookups (65536-entry byte tables of both codes,
 *   from lut8_cache) live in the calling thread's scratch: no allocation once warm.
 * Table lookups (code values when dequantizing, lookup bytes when requantizing) are scalar loads,
 * as in blockwise_8bit.cpp.
 */
/* The math type of lowbit_optim.h's templates is a raw __m256/__m512 here: GCC warns that their
 * vector attributes (alignment, may_alias) do not carry into a template argument. The values are
 * only ever held in registers and locals, never allocated through the template. */
#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif

#include <stddef.h>
#include <string.h>

#include <algorithm>
#include <type_traits>

#include "block_absmax.h"
#include "cpu_kernels.h"
#include "lowbit_optim.h"
#include "lut8_cache.h"
#include "parallel.h"
#include "scratch.h"
#include "simd.h"

namespace lowbit {
namespace cpu {
namespace LOWBIT_CPU_ISA {

namespace {

namespace op = ::lowbit::optim;
using op::HostMath;

#if defined(LOWBIT_SIMD_AVX512) || defined(LOWBIT_SIMD_AVX2)
/* lowbit_optim.h's math interface on a Vec register (the operations the formulas need beyond
 * simd.h's Vec: sqrt, sign, clamp). */
struct VecMath {
    using F = Vec::F;
    using I = Vec::I;
    static F set1(float x) { return Vec::set1(x); }
    static F add(F a, F b) { return Vec::add(a, b); }
    static F mul(F a, F b) { return Vec::mul(a, b); }
    static F div(F a, F b) { return Vec::div(a, b); }
    static F fma(F a, F b, F c) { return Vec::fmadd(a, b, c); }
#if defined(LOWBIT_SIMD_AVX512)
    static F sqrt(F a) { return _mm512_sqrt_ps(a); }
    /* (0 < x) - (x < 0) as float: +1, -1, +0 (also for -0 and NaN), fmt::torch_sign */
    static F sign(F a) {
        const __m512 zero = _mm512_setzero_ps();
        const __m512 pos = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(zero, a, _CMP_LT_OQ), _mm512_set1_ps(1.0f));
        const __m512 neg = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a, zero, _CMP_LT_OQ), _mm512_set1_ps(1.0f));
        return _mm512_sub_ps(pos, neg);
    }
#else
    static F sqrt(F a) { return _mm256_sqrt_ps(a); }
    static F sign(F a) {
        const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
        const __m256 pos = _mm256_and_ps(_mm256_cmp_ps(zero, a, _CMP_LT_OQ), one);
        const __m256 neg = _mm256_and_ps(_mm256_cmp_ps(a, zero, _CMP_LT_OQ), one);
        return _mm256_sub_ps(pos, neg);
    }
#endif
    /* fmt::clamp_unit: Vec::max/min return their second operand when either is NaN, so NaN -> -1 */
    static F clamp_unit(F t) { return Vec::min(Vec::max(t, Vec::set1(-1.0f)), Vec::set1(1.0f)); }
    static I truncate(F u) { return Vec::truncate(u); }
    /* lane masks of the non-finite policy: |x| < Inf (false for NaN: ordered compare) */
#if defined(LOWBIT_SIMD_AVX512)
    using B = __mmask16;
    static B finite(F a) { return _mm512_cmp_ps_mask(_mm512_abs_ps(a), _mm512_set1_ps(INFINITY), _CMP_LT_OQ); }
    static B both(B a, B b) { return static_cast<B>(a & b); }
    static F select(B m, F a, F b) { return _mm512_mask_blend_ps(m, b, a); }
#else
    using B = __m256;
    static B finite(F a) {
        const __m256 abs = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a);
        return _mm256_cmp_ps(abs, _mm256_set1_ps(INFINITY), _CMP_LT_OQ);
    }
    static B both(B a, B b) { return _mm256_and_ps(a, b); }
    static F select(B m, F a, F b) { return _mm256_blendv_ps(b, a, m); }
#endif
};
constexpr int kW = Vec::W;
#endif

template <class Fn>
void dispatch_optimizer(int32_t optimizer, Fn &&fn) {
    switch (optimizer) {
    case op::kMomentum: fn(std::integral_constant<int, op::kMomentum>{}); break;
    case op::kRmsprop: fn(std::integral_constant<int, op::kRmsprop>{}); break;
    case op::kAdagrad: fn(std::integral_constant<int, op::kAdagrad>{}); break;
    case op::kLion: fn(std::integral_constant<int, op::kLion>{}); break;
    case op::kAdemamix: fn(std::integral_constant<int, op::kAdemamix>{}); break;
    default: fn(std::integral_constant<int, op::kAdam>{}); break;
    }
}

/* Calls fn(WD, FIRST) with the step's weight-decay flag and (momentum only) first-step flag as
 * compile-time constants. They are uniform over a call; as template arguments every branch on
 * them folds away. (Also a workaround: GCC 12 if-converts `if (flag) v = v * d` on a runtime bool
 * into an AVX-512 op masked by the bool itself, i.e. lane 0 only.) */
template <int OPT, class Fn>
void dispatch_flags(const op::Params &P, Fn &&fn) {
    const bool wd = P.has_weight_decay != 0, first = OPT == op::kMomentum && P.step == 1;
    if (wd) {
        if (first) fn(std::true_type{}, std::true_type{});
        else fn(std::true_type{}, std::false_type{});
    } else {
        if (first) fn(std::false_type{}, std::true_type{});
        else fn(std::false_type{}, std::false_type{});
    }
}

/* ---- 32-bit -------------------------------------------------------------------------------- */

struct Args32 {
    const void *g;
    void *p;
    float *state1, *state2;
    int64_t n;
    op::Params P;
};

/* Elements [lo, hi). APPLY: write p and the states with step multiplier `alpha`; else return the
 * sum of squares (double, element order) of the trust-ratio value without writing anything. */
template <int OPT, bool APPLY, class E, bool WD, bool FIRST>
double range32(const Args32 &a, float alpha, int64_t lo, int64_t hi) {
    constexpr bool kTwo = OPT == op::kAdam || OPT == op::kAdemamix;
    const auto *g = static_cast<const typename E::T *>(a.g);
    auto *p = static_cast<typename E::T *>(a.p);
    float *s1 = a.state1, *s1b = a.state1 + a.n, *s2 = a.state2;
    constexpr bool wd = WD, first = FIRST;
    double sq = 0.0;
    int64_t i = lo;
#if defined(LOWBIT_SIMD_AVX512) || defined(LOWBIT_SIMD_AVX2)
    {
        using V = Vec;
        const V::F va = V::set1(alpha);
        alignas(64) float vals[kW];
        for (; i + kW <= hi; i += kW) {
            V::F pv = V::load(E{}, p + i);
            V::F v1 = V::loadu(s1 + i);
            V::F v1b = OPT == op::kAdemamix ? V::loadu(s1b + i) : V::zero();
            V::F v2 = kTwo ? V::loadu(s2 + i) : V::zero();
            const V::F u = op::update32<VecMath, OPT>(a.P, wd, first, V::load(E{}, g + i), pv, v1, v1b, v2, va);
            if constexpr (APPLY) {
                V::store(E{}, p + i, pv);
                V::store(ElemF32{}, s1 + i, v1);
                if constexpr (OPT == op::kAdemamix) V::store(ElemF32{}, s1b + i, v1b);
                if constexpr (kTwo) V::store(ElemF32{}, s2 + i, v2);
            } else {
                V::store(ElemF32{}, vals, u);
                for (int j = 0; j < kW; ++j) sq += static_cast<double>(vals[j]) * static_cast<double>(vals[j]);
            }
        }
    }
#endif
    for (; i < hi; ++i) {
        float pv = E::load(p[i]);
        float v1 = s1[i];
        float v1b = OPT == op::kAdemamix ? s1b[i] : 0.0f;
        float v2 = kTwo ? s2[i] : 0.0f;
        const float u = op::update32<HostMath, OPT>(a.P, wd, first, E::load(g[i]), pv, v1, v1b, v2, alpha);
        if constexpr (APPLY) {
            p[i] = E::store(pv);
            s1[i] = v1;
            if constexpr (OPT == op::kAdemamix) s1b[i] = v1b;
            if constexpr (kTwo) s2[i] = v2;
        } else {
            sq += static_cast<double>(u) * static_cast<double>(u);
        }
    }
    return sq;
}

constexpr int64_t kNormSegment = int64_t{1} << 16;

template <int OPT, class E, bool WD, bool FIRST>
bool run32(const Args32 &a, float *unorm_vec, int num_threads) {
    float alpha = static_cast<float>(a.P.step_size);
    if (op::can_trust_ratio(OPT) && a.P.trust_ratio) {
        const int64_t segments = num_blocks(a.n, kNormSegment);
        /* doubles in the calling thread's float scratch (64-byte aligned) */
        double *sums = reinterpret_cast<double *>(thread_scratch(static_cast<size_t>(2 * segments)));
        if (sums == nullptr) return false;
        parallel_for(0, segments, num_threads, 1, [&](int64_t s0, int64_t s1) {
            for (int64_t s = s0; s < s1; ++s)
                sums[s] = range32<OPT, false, E, WD, FIRST>(a, 0.0f, s * kNormSegment, std::min(a.n, (s + 1) * kNormSegment));
        });
        double norm_sq = 0.0;
        for (int64_t s = 0; s < segments; ++s) norm_sq += sums[s];
        const double ratio = op::trust_ratio(a.P, norm_sq, unorm_vec);
        alpha = static_cast<float>(a.P.step_size * ratio);
    }
    parallel_for(0, a.n, num_threads, kMinElementsPerThread,
                 [&](int64_t lo, int64_t hi) { range32<OPT, true, E, WD, FIRST>(a, alpha, lo, hi); });
    return true;
}

/* ---- 8-bit blockwise ----------------------------------------------------------------------- */

struct Args8 {
    const void *g;
    void *p;
    uint8_t *state1, *state2;
    int64_t n, nblocks;
    op::Params P;
    const float *code1, *code2; /* 256 floats each */
    const uint8_t *lut1, *lut2; /* 65536 bytes each */
    float *absmax1, *absmax2;
};

/* W dequantized state values q[0..W) of a block with absmax `a`. */
#if defined(LOWBIT_SIMD_AVX512) || defined(LOWBIT_SIMD_AVX2)
LOWBIT_ALWAYS_INLINE Vec::F dequant_vec(const float *code, const uint8_t *q, Vec::F a) {
    alignas(64) float v[kW];
    for (int j = 0; j < kW; ++j) v[j] = code[q[j]];
    return Vec::mul(Vec::loadu(v), a);
}
#endif

/* New values x[0..len) of one state block -> its bytes and absmax (quantize_blockwise's rules). */
void requantize_block(const float *x, int64_t len, const uint8_t *lut, uint8_t *out, float *absmax) {
    bool nan = false;
    const float m = block_absmax<ElemF32>(x, len, &nan);
    const op::Requant8 r = op::requant8_block(m, nan);
    *absmax = r.absmax;
    if (!r.encode) {
        memset(out, 0, static_cast<size_t>(len));
        return;
    }
    int64_t i = 0;
#if defined(LOWBIT_SIMD_AVX512) || defined(LOWBIT_SIMD_AVX2)
    const Vec::F vinv = Vec::set1(r.inv);
    alignas(64) int32_t bins[kW];
    for (; i + kW <= len; i += kW) {
        Vec::store_ints(bins, op::requant8_bins<VecMath>(Vec::loadu(x + i), vinv));
        for (int j = 0; j < kW; ++j) out[i + j] = lut[bins[j]];
    }
#endif
    for (; i < len; ++i) out[i] = lut[op::requant8_bins<HostMath>(x[i], r.inv)];
}

template <int OPT, class E, bool WD, bool FIRST>
void blocks8(const Args8 &a, int64_t b0, int64_t b1) {
    constexpr bool kTwo = OPT == op::kAdam || OPT == op::kAdemamix;
    constexpr bool kMix = OPT == op::kAdemamix;
    const auto *g = static_cast<const typename E::T *>(a.g);
    auto *p = static_cast<typename E::T *>(a.p);
    constexpr bool wd = WD, first = FIRST;
    alignas(64) float n1[op::kBlock8], n1b[op::kBlock8], n2[op::kBlock8];
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * op::kBlock8;
        const int64_t len = std::min<int64_t>(op::kBlock8, a.n - start);
        const uint8_t *q1 = a.state1 + start;
        const uint8_t *q1b = kMix ? a.state1 + a.n + start : nullptr;
        const uint8_t *q2 = kTwo ? a.state2 + start : nullptr;
        const float a1 = a.absmax1[b];
        const float a1b = kMix ? a.absmax1[a.nblocks + b] : 0.0f;
        const float a2 = kTwo ? a.absmax2[b] : 0.0f;
        const typename E::T *gb = g + start;
        typename E::T *pb = p + start;
        int64_t i = 0;
#if defined(LOWBIT_SIMD_AVX512) || defined(LOWBIT_SIMD_AVX2)
        {
            using V = Vec;
            const V::F va1 = V::set1(a1), va1b = V::set1(a1b), va2 = V::set1(a2);
            for (; i + kW <= len; i += kW) {
                V::F v1 = dequant_vec(a.code1, q1 + i, va1);
                V::F v1b = kMix ? dequant_vec(a.code1, q1b + i, va1b) : V::zero();
                V::F v2 = kTwo ? dequant_vec(a.code2, q2 + i, va2) : V::zero();
                V::F pv = V::load(E{}, pb + i);
                op::update8<VecMath, OPT>(a.P, wd, first, V::load(E{}, gb + i), pv, v1, v1b, v2);
                V::store(E{}, pb + i, pv);
                V::store(ElemF32{}, n1 + i, v1);
                if constexpr (kMix) V::store(ElemF32{}, n1b + i, v1b);
                if constexpr (kTwo) V::store(ElemF32{}, n2 + i, v2);
            }
        }
#endif
        for (; i < len; ++i) {
            float v1 = op::dequant8(a.code1, q1[i], a1);
            float v1b = kMix ? op::dequant8(a.code1, q1b[i], a1b) : 0.0f;
            float v2 = kTwo ? op::dequant8(a.code2, q2[i], a2) : 0.0f;
            float pv = E::load(pb[i]);
            op::update8<HostMath, OPT>(a.P, wd, first, E::load(gb[i]), pv, v1, v1b, v2);
            pb[i] = E::store(pv);
            n1[i] = v1;
            if constexpr (kMix) n1b[i] = v1b;
            if constexpr (kTwo) n2[i] = v2;
        }
        requantize_block(n1, len, a.lut1, a.state1 + start, &a.absmax1[b]);
        if constexpr (kMix) requantize_block(n1b, len, a.lut1, a.state1 + a.n + start, &a.absmax1[a.nblocks + b]);
        if constexpr (kTwo) requantize_block(n2, len, a.lut2, a.state2 + start, &a.absmax2[b]);
    }
}

} // namespace

bool optimizer_update_32bit(int32_t optimizer, int32_t dtype, const void *g, void *p, float *state1,
                            float *state2, int64_t n, const optim::Params &params, float *unorm_vec,
                            int num_threads) {
    const Args32 a{g, p, state1, state2, n, params};
    bool ok = true;
    dispatch_optimizer(optimizer, [&](auto opt) {
        constexpr int kOpt = decltype(opt)::value;
        dispatch_dtype(dtype, [&](auto tag) {
            dispatch_flags<kOpt>(params, [&](auto wd, auto first) {
                ok = run32<kOpt, decltype(tag), decltype(wd)::value, decltype(first)::value>(a, unorm_vec, num_threads);
            });
        });
    });
    return ok;
}

bool optimizer_update_8bit_blockwise(int32_t optimizer, int32_t dtype, const void *g, void *p,
                                     uint8_t *state1, uint8_t *state2, int64_t n,
                                     const optim::Params &params, const float *qmap1,
                                     const float *qmap2, float *absmax1, float *absmax2,
                                     int num_threads) {
    const bool two = op::has_state2(optimizer);
    /* calling thread's scratch: [code1 | code2 | lut1 | lut2] (workers only read it) */
    constexpr size_t kCodeFloats = fmt::kCode8Size, kLutFloats = fmt::kLut8Size / sizeof(float);
    float *scratch = thread_scratch(2 * kCodeFloats + 2 * kLutFloats);
    if (scratch == nullptr) return false;
    float *code1 = scratch, *code2 = scratch + kCodeFloats;
    uint8_t *lut1 = reinterpret_cast<uint8_t *>(scratch + 2 * kCodeFloats);
    uint8_t *lut2 = lut1 + fmt::kLut8Size;
    memcpy(code1, qmap1, sizeof(float) * kCodeFloats);
    lut8_get(qmap1, lut1);
    if (two) {
        memcpy(code2, qmap2, sizeof(float) * kCodeFloats);
        lut8_get(qmap2, lut2);
    }
    const Args8 a{g, p, state1, state2, n, num_blocks(n, op::kBlock8), params, code1, code2, lut1, lut2,
                  absmax1, absmax2};
    dispatch_optimizer(optimizer, [&](auto opt) {
        constexpr int kOpt = decltype(opt)::value;
        dispatch_dtype(dtype, [&](auto tag) {
            dispatch_flags<kOpt>(params, [&](auto wd, auto first) {
                parallel_for(0, a.nblocks, num_threads, block_grain(op::kBlock8), [&](int64_t b0, int64_t b1) {
                    blocks8<kOpt, decltype(tag), decltype(wd)::value, decltype(first)::value>(a, b0, b1);
                });
            });
        });
    });
    return true;
}

} // namespace LOWBIT_CPU_ISA
} // namespace cpu
} // namespace lowbit
