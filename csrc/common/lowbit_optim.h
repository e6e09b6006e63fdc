/* lowbit_optim.h -- the arithmetic of the fused optimizer steps, defined once for every native
 * backend (csrc/cpu/optimizers.cpp, csrc/cuda/optimizers.cu).
 *
 * What this holds:
 *  - the step scalars (Params), derived on the host in double exactly as
 *    lowbit/backends/reference/optimizers.py derives them in Python, then rounded to float where
 *    torch rounds a Python scalar for a float32 op (make_params);
 *  - the per-element update of each optimizer, 32-bit state (update32) and 8-bit blockwise state
 *    (update8: the reference's 8-bit formulas differ from its 32-bit ones in where eps, weight
 *    decay and fused multiply-adds enter);
 *  - the 8-bit state's dequantize (dequant8), the per-block requantize decision (requant8_block:
 *    absmax, whether the block is encoded, 1/absmax) and the bin of the 65536-entry "nearest
 *    code" lookup (requant8_bins; lowbit_formats.h defines the lookup itself).
 *
 * The formulas are templates over a "math" type M that supplies one IEEE float32 operation per
 * call: M::F is float for scalar code (HostMath here, a device twin in csrc/cuda) or a SIMD
 * register (csrc/cpu/optimizers.cpp), so the CPU's vector bodies, its scalar tails and the GPU
 * all run the same sequence of operations. M provides: set1, add, mul, div, fma (one rounding),
 * sqrt (correctly rounded), sign (torch.sign: +1, -1, 0 for +-0 and NaN), clamp_unit (clamp to
 * [-1, 1], NaN -> -1), truncate (float -> integer bin, toward zero), and for the non-finite
 * policy a lane mask type M::B with finite (not NaN or +-Inf), both (and) and select (m ? a : b).
 *
 * Non-finite values (README, "Overflow and non-finite values"): in an 8-bit step an element whose
 * new parameter or any new state value is not finite -- a NaN or +-Inf gradient, or a finite one
 * whose square overflows float32 -- keeps its previous parameter and states (update8), so the
 * block's new absmax, and with it every other element of the block, stays finite. bitsandbytes'
 * CUDA kernels skip NaN/Inf gradient elements of the two-state 8-bit optimizers (zeroing their
 * state); this covers every 8-bit optimizer and overflow, and keeps the element's momentum. The
 * 32-bit steps, like torch.optim and bitsandbytes, let a non-finite value reach its own element only.
 *
 * Operation order: the reference is a chain of torch ops on float32 tensors. What each of them
 * computes on the CPU (torch 2.x with AVX2/AVX-512 kernels, checked element by element against
 * torch 2.13):
 *   a.mul_(s)                    a * s
 *   a.add_(b, alpha=s)           fma(b, s, a)            (vec::fmadd; also the scalar tails)
 *   a.add_(b) / a + b            a + b                   (fma(b, 1, a) is exact)
 *   a.addcmul_(b, c, value=s)    fma(s * b, c, a)
 *   a.addcdiv_(b, c, value=s)    a + (s * b) / c         (no fma)
 *   a / s, a / b, a + s          one IEEE op each
 *   a.sqrt()                     see below
 * The one op that is not reproduced bit for bit is torch.sqrt: with MKL (x86 wheels) it runs
 * MKL's vsSqrt in "high accuracy" mode, which is within 0.75 ulp but not correctly rounded
 * (~20% of results are one ulp away from the correctly rounded value; torch builds without MKL
 * round correctly). Every native backend uses the correctly rounded square root. States do not
 * depend on a square root within a step, so one step gives identical states and 8-bit codes; the
 * parameter update of adam, ademamix, rmsprop and adagrad may differ from the reference by about
 * one ulp of the update (tests/test_parity.py states the bound).
 *
 * Build flags: contraction off (-ffp-contract=off; nvcc --fmad=false), no -ffast-math, no
 * FTZ/DAZ. fma() is always an explicit fused multiply-add (fmaf), never a contraction.
 */
#ifndef LOWBIT_OPTIM_H
#define LOWBIT_OPTIM_H

#include <math.h>
#include <stdint.h>

#include "lowbit_device.h"
#include "lowbit_formats.h"

namespace lowbit {
namespace optim {

/* Optimizers after alias resolution (adamw, lamb -> adam; lars -> momentum). Same numbering as
 * lowbit_optimizer (csrc/capi/lowbit_capi.h) and lowbit_cuda_optimizer. */
enum Optimizer : int32_t { kAdam = 0, kMomentum = 1, kRmsprop = 2, kAdagrad = 3, kLion = 4, kAdemamix = 5 };
constexpr int32_t kNumOptimizers = 6;

/* Elements per absmax of 8-bit optimizer state (formats.NESTED_BLOCKSIZE). */
constexpr int kBlock8 = 256;

/* Whether the optimizer has a second state (state2, qmap2, absmax2). */
LOWBIT_HD static inline bool has_state2(int32_t optimizer) {
    return optimizer == kAdam || optimizer == kAdemamix;
}
/* Whether the 32-bit step applies a trust ratio when max_unorm > 0 (LAMB = adam, LARS =
 * momentum, and rmsprop, as in the reference). */
LOWBIT_HD static inline bool can_trust_ratio(int32_t optimizer) {
    return optimizer == kAdam || optimizer == kMomentum || optimizer == kRmsprop;
}

/* Step scalars. Floats are what torch uses when a Python scalar meets a float32 tensor. */
struct Params {
    float beta1, beta2, beta3, alpha, eps, weight_decay, gnorm_scale;
    float one_minus_beta1, one_minus_beta2, one_minus_beta3;
    float correction1, correction2; /* 1 - beta1^step, sqrt(1 - beta2^step) */
    float decay;                    /* 1 - lr * weight_decay */
    float neg_lr;                   /* -lr */
    float eps_correction2;          /* eps * correction2 (32-bit adam) */
    float neg_lr_over_c1;           /* -lr / correction1 (8-bit adam) */
    double step_size;               /* 32-bit: adam -lr*c2/c1, others -lr (x trust ratio) */
    double unorm_limit;             /* max_unorm * param_norm */
    int step;
    int has_weight_decay; /* weight_decay > 0 */
    int trust_ratio;      /* max_unorm > 0 and can_trust_ratio(optimizer) */
};

/* Host only: the reference's Python arithmetic, in double (Python floats), same order. */
static inline Params make_params(int32_t optimizer, double beta1, double beta2, double beta3, double alpha,
                                 double eps, double weight_decay, double lr, double gnorm_scale, int64_t step,
                                 double max_unorm, double param_norm) {
    Params P{};
    P.beta1 = static_cast<float>(beta1);
    P.beta2 = static_cast<float>(beta2);
    P.beta3 = static_cast<float>(beta3);
    P.alpha = static_cast<float>(alpha);
    P.eps = static_cast<float>(eps);
    P.weight_decay = static_cast<float>(weight_decay);
    P.gnorm_scale = static_cast<float>(gnorm_scale);
    P.one_minus_beta1 = static_cast<float>(1.0 - beta1);
    P.one_minus_beta2 = static_cast<float>(1.0 - beta2);
    P.one_minus_beta3 = static_cast<float>(1.0 - beta3);
    const double s = static_cast<double>(step);
    const double c1 = 1.0 - pow(beta1, s);       /* correction1 = 1.0 - beta1**step */
    const double c2 = sqrt(1.0 - pow(beta2, s)); /* correction2 = math.sqrt(1.0 - beta2**step) */
    P.correction1 = static_cast<float>(c1);
    P.correction2 = static_cast<float>(c2);
    P.decay = static_cast<float>(1.0 - lr * weight_decay);
    P.neg_lr = static_cast<float>(-lr);
    P.eps_correction2 = static_cast<float>(eps * c2);
    P.neg_lr_over_c1 = static_cast<float>(-lr / c1);
    P.step_size = optimizer == kAdam ? (-lr * c2) / c1 : -lr;
    P.unorm_limit = max_unorm * param_norm;
    P.step = step > 0x7FFFFFFF ? 0x7FFFFFFF : static_cast<int>(step);
    P.has_weight_decay = weight_decay > 0.0 ? 1 : 0;
    P.trust_ratio = (max_unorm > 0.0 && can_trust_ratio(optimizer)) ? 1 : 0;
    return P;
}

/* The trust ratio of LAMB/LARS from the sum of squared update values: the reference takes the
 * float32 norm (torch.norm(...).item()) and compares it in double. *unorm receives the float norm
 * (the reference's unorm_vec). */
LOWBIT_HD static inline double trust_ratio(const Params &P, double norm_sq, float *unorm) {
    float u = static_cast<float>(sqrt(norm_sq));
    if (u != u) u = fmt::bits_float(0x7FC00000u); /* which NaN a sum keeps depends on operand order */
    *unorm = u;
    const double ud = static_cast<double>(u);
    return ud > P.unorm_limit ? P.unorm_limit / ud : 1.0;
}

/* A step scalar as an M::F value (a register broadcast for SIMD math; compilers hoist it out of
 * the loops, so the formulas below read Params directly). */
#define K(field) M::set1(P.field) /* undefined at the end of this header */

/* ---- 32-bit state ------------------------------------------------------------------------- */

/* One element (or one vector of elements) of a 32-bit step; the reference's optimizer_update_32bit.
 * s1b is ademamix's second momentum (state1[1]); s2 the second state. step_alpha is the float
 * multiplier of the update (adam: (-lr*c2/c1) x trust ratio; momentum/rmsprop: -lr x trust ratio).
 * Returns the value whose norm the trust ratio needs (adam and rmsprop: the update, momentum: the
 * new state1; others: anything). */
template <class M, int OPT>
LOWBIT_HD static inline typename M::F update32(const Params &P, bool weight_decay, bool first_step,
                                               typename M::F g, typename M::F &p, typename M::F &s1,
                                               typename M::F &s1b, typename M::F &s2,
                                               typename M::F step_alpha) {
    g = M::mul(g, K(gnorm_scale)); /* grad = g.float() * gnorm_scale */
    if constexpr (OPT == kAdam) {
        s1 = M::fma(g, K(one_minus_beta1), M::mul(s1, K(beta1)));                 /* mul_(b1).add_(g, alpha=1-b1) */
        s2 = M::fma(M::mul(K(one_minus_beta2), g), g, M::mul(s2, K(beta2)));     /* mul_(b2).addcmul_(g, g, value=1-b2) */
        if (weight_decay) p = M::mul(p, K(decay));
        const typename M::F update = M::div(s1, M::add(M::sqrt(s2), K(eps_correction2)));
        p = M::fma(update, step_alpha, p);                                      /* add_(update, alpha=step_size) */
        return update;
    } else if constexpr (OPT == kAdemamix) {
        s1 = M::fma(g, K(one_minus_beta1), M::mul(s1, K(beta1)));                 /* m1 */
        s1b = M::fma(g, K(one_minus_beta3), M::mul(s1b, K(beta3)));               /* m2 */
        s2 = M::fma(M::mul(K(one_minus_beta2), g), g, M::mul(s2, K(beta2)));     /* nu */
        if (weight_decay) p = M::mul(p, K(decay));
        const typename M::F update = M::div(M::add(M::div(s1, K(correction1)), M::mul(K(alpha), s1b)),
                                            M::add(M::div(M::sqrt(s2), K(correction2)), K(eps)));
        p = M::fma(update, K(neg_lr), p);
        return update;
    } else if constexpr (OPT == kMomentum) {
        if (weight_decay) g = M::fma(p, K(weight_decay), g); /* grad.add(p, alpha=wd) */
        s1 = first_step ? g : M::add(M::mul(s1, K(beta1)), g);
        p = M::fma(s1, step_alpha, p);
        return s1;
    } else if constexpr (OPT == kLion) {
        if (weight_decay) p = M::mul(p, K(decay));
        p = M::fma(M::sign(M::fma(g, K(one_minus_beta1), M::mul(s1, K(beta1)))), K(neg_lr), p);
        s1 = M::fma(g, K(one_minus_beta2), M::mul(s1, K(beta2)));
        return s1;
    } else if constexpr (OPT == kRmsprop) {
        if (weight_decay) g = M::fma(p, K(weight_decay), g);
        s1 = M::fma(M::mul(K(one_minus_beta1), g), g, M::mul(s1, K(beta1)));
        const typename M::F update = M::div(g, M::add(M::sqrt(s1), K(eps)));
        p = M::fma(update, step_alpha, p);
        return update;
    } else { /* kAdagrad */
        static_assert(OPT == kAdagrad, "unknown optimizer");
        if (weight_decay) g = M::fma(p, K(weight_decay), g);
        s1 = M::fma(g, g, s1); /* addcmul_(g, g, value=1.0): fma(1 * g, g, s1) */
        const typename M::F update = M::div(g, M::add(M::sqrt(s1), K(eps)));
        p = M::fma(update, K(neg_lr), p);
        return update;
    }
}

/* ---- 8-bit blockwise state ------------------------------------------------------------------ */

/* The new values of one element of an 8-bit step, before the non-finite policy (update8). */
template <class M, int OPT>
LOWBIT_HD static inline void update8_values(const Params &P, bool weight_decay, bool first_step,
                                            typename M::F g, typename M::F &p, typename M::F &s1,
                                            typename M::F &s1b, typename M::F &s2) {
    g = M::mul(g, K(gnorm_scale));
    if constexpr (OPT == kAdam) {
        s1 = M::fma(g, K(one_minus_beta1), M::mul(s1, K(beta1)));
        s2 = M::fma(M::mul(K(one_minus_beta2), g), g, M::mul(s2, K(beta2)));
        const typename M::F denom = M::add(M::div(M::sqrt(s2), K(correction2)), K(eps));
        if (weight_decay) p = M::mul(p, K(decay));
        p = M::add(p, M::div(M::mul(K(neg_lr_over_c1), s1), denom)); /* addcdiv_(s1, denom, value=-lr/c1) */
    } else if constexpr (OPT == kAdemamix) {
        s1 = M::fma(g, K(one_minus_beta1), M::mul(s1, K(beta1)));
        s1b = M::fma(g, K(one_minus_beta3), M::mul(s1b, K(beta3)));
        s2 = M::fma(M::mul(K(one_minus_beta2), g), g, M::mul(s2, K(beta2)));
        const typename M::F update = M::div(M::add(M::div(s1, K(correction1)), M::mul(K(alpha), s1b)),
                                            M::add(M::div(M::sqrt(s2), K(correction2)), K(eps)));
        if (weight_decay) p = M::mul(p, K(decay));
        p = M::fma(update, K(neg_lr), p);
    } else if constexpr (OPT == kMomentum) {
        g = M::fma(p, K(weight_decay), g); /* grad.add_(p, alpha=wd), unconditional */
        s1 = first_step ? g : M::add(M::mul(s1, K(beta1)), g);
        p = M::fma(s1, K(neg_lr), p);
    } else if constexpr (OPT == kLion) {
        if (weight_decay) p = M::mul(p, K(decay));
        /* sign(s1.mul(b1) + grad.mul(1-b1)): two products, one add */
        p = M::fma(M::sign(M::add(M::mul(s1, K(beta1)), M::mul(g, K(one_minus_beta1)))), K(neg_lr), p);
        s1 = M::fma(g, K(one_minus_beta2), M::mul(s1, K(beta2)));
    } else if constexpr (OPT == kRmsprop) {
        g = M::fma(p, K(weight_decay), g);
        s1 = M::fma(M::mul(K(one_minus_beta1), g), g, M::mul(s1, K(beta1)));
        p = M::add(p, M::div(M::mul(K(neg_lr), g), M::add(M::sqrt(s1), K(eps)))); /* addcdiv_ */
    } else { /* kAdagrad */
        static_assert(OPT == kAdagrad, "unknown optimizer");
        g = M::fma(p, K(weight_decay), g);
        s1 = M::fma(g, g, s1);
        p = M::add(p, M::div(M::mul(K(neg_lr), g), M::add(M::sqrt(s1), K(eps))));
    }
}

/* One element of an 8-bit step on dequantized state; the reference's
 * optimizer_update_8bit_blockwise (momentum, rmsprop and adagrad add weight decay even when it
 * is 0, as the reference does: that turns -0 gradients into +0 and Inf parameters into NaN).
 * An element whose new p, s1, s1b (ademamix) or s2 is not finite keeps its old values. */
template <class M, int OPT>
LOWBIT_HD static inline void update8(const Params &P, bool weight_decay, bool first_step,
                                     typename M::F g, typename M::F &p, typename M::F &s1, typename M::F &s1b,
                                     typename M::F &s2) {
    const typename M::F p0 = p, s10 = s1, s1b0 = s1b, s20 = s2;
    update8_values<M, OPT>(P, weight_decay, first_step, g, p, s1, s1b, s2);
    typename M::B keep = M::both(M::finite(p), M::finite(s1));
    if constexpr (OPT == kAdemamix) keep = M::both(keep, M::finite(s1b));
    if constexpr (OPT == kAdam || OPT == kAdemamix) keep = M::both(keep, M::finite(s2));
    p = M::select(keep, p, p0);
    s1 = M::select(keep, s1, s10);
    s1b = M::select(keep, s1b, s1b0);
    s2 = M::select(keep, s2, s20);
}

/* Dequantized state value: code[q] * absmax of its block (one rounding). */
LOWBIT_HD static inline float dequant8(const float *code, uint8_t q, float absmax) { return code[q] * absmax; }

/* What a state block stores after the update, from max |x| over its new values (NaN excluded)
 * and whether any was NaN; exactly quantize_blockwise's rules: NaN -> NaN absmax, +Inf or 0 ->
 * that absmax, and in those cases every byte is 0; else the values are encoded with inv = 1/m. */
struct Requant8 {
    float absmax;
    bool encode;
    float inv;
};
LOWBIT_HD static inline Requant8 requant8_block(float m, bool nan) {
    if (nan) return {fmt::bits_float(0x7FC00000u), false, 0.0f};
    if (m == fmt::bits_float(0x7F800000u) || m == 0.0f) return {m, false, 0.0f};
    return {m, true, 1.0f / m};
}

/* Bin (0..65535) of the 8-bit lookup for a value of an encoded block: fmt::lut8_bin of
 * fmt::clamp_unit(x * inv), each step rounded separately. */
template <class M>
LOWBIT_HD static inline typename M::I requant8_bins(typename M::F x, typename M::F inv) {
    const typename M::F one = M::set1(1.0f), half = M::set1(0.5f), top = M::set1(65535.0f);
    const typename M::F t = M::clamp_unit(M::mul(x, inv));
    return M::truncate(M::add(M::mul(M::mul(M::add(t, one), half), top), half));
}

#undef K

/* ---- scalar math (host; the GPU defines its twin with its correctly rounded sqrt) ----------- */

template <class Sqrt>
struct FloatMathT {
    using F = float;
    using I = uint32_t;
    using B = bool;
    LOWBIT_HD static F set1(float x) { return x; }
    LOWBIT_HD static F add(F a, F b) { return a + b; }
    LOWBIT_HD static F mul(F a, F b) { return a * b; }
    LOWBIT_HD static F div(F a, F b) { return a / b; }
    LOWBIT_HD static F fma(F a, F b, F c) { return fmaf(a, b, c); }
    LOWBIT_HD static F sqrt(F a) { return Sqrt::sqrt(a); }
    LOWBIT_HD static F sign(F a) { return fmt::torch_sign(a); }
    LOWBIT_HD static F clamp_unit(F t) { return fmt::clamp_unit(t); }
    LOWBIT_HD static I truncate(F u) { return static_cast<uint32_t>(u); }
    LOWBIT_HD static B finite(F a) { return fabsf(a) <= 3.40282346638528859812e38f; }
    LOWBIT_HD static B both(B a, B b) { return a && b; }
    LOWBIT_HD static F select(B m, F a, F b) { return m ? a : b; }
};

/* IEEE sqrtf: correctly rounded on every host compiler lowbit supports. */
struct HostSqrt {
    LOWBIT_HD static float sqrt(float x) { return sqrtf(x); }
};
using HostMath = FloatMathT<HostSqrt>;

} // namespace optim
} // namespace lowbit

#endif /* LOWBIT_OPTIM_H */
