/* simd.h -- the vector operations the CPU kernels are written against, for the ISA this
 * translation unit is compiled for.
 *
 * Every kernel source is compiled once per ISA (CMakeLists.txt): scalar (plain x86-64 or any
 * other architecture), avx2 (-mavx2 -mfma -mf16c) and avx512 (adds -mavx512f/bw/vl). This header
 * picks the matching `Vec` from the compiler's target macros, so a kernel is written once against
 * Vec and each build gets its own width:
 *
 *   Vec::W == 16 (AVX-512), 8 (AVX2) or 1 (scalar: F = float, I = uint32_t).
 *
 * The scalar Vec only has what gemv_4bit needs; the quantize/dequantize kernels keep their
 * element-by-element loops (the definition, lowbit_formats.h) for the scalar build and for tails,
 * and run a Vec::W-wide body first where W > 1.
 *
 * Everything here lives in namespace lowbit::cpu::LOWBIT_CPU_ISA, so an out-of-line copy compiled
 * with AVX-512 can never be linked into the scalar or AVX2 code path.
 *
 * Bit-exactness of the vector bodies with the scalar definition (quantize/dequantize): only IEEE
 * operations with a single correctly rounded result are used (mul, div, add, compares), min/max are
 * used only where their NaN rule is the scalar ternary's (noted below), fp16/bf16 widening is
 * exact, and narrowing rounds to nearest even with the same NaN handling as fmt::float_to_*_bits
 * (F16C vcvtps2ph with rounding immediate 0 = RNE; bf16 by integer arithmetic, because
 * AVX512-BF16's vcvtneps2bf16 flushes subnormal inputs and outputs to zero, which the scalar
 * conversion does not). FMA appears only in gemv_4bit, whose result is not bit-exact by contract.
 */
#ifndef LOWBIT_CPU_SIMD_H
#define LOWBIT_CPU_SIMD_H

#include <stdint.h>
#include <string.h>

#include "cpu_kernels.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__FMA__) && \
    defined(__F16C__)
#define LOWBIT_SIMD_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LOWBIT_SIMD_AVX2 1
#endif

#if defined(LOWBIT_SIMD_AVX512) || defined(LOWBIT_SIMD_AVX2)
/* GCC 12's AVX-512 header builds "undefined" vectors as `__m512 __Y = __Y;`, which
 * -W(maybe-)uninitialized reports wherever they are inlined (GCC PR 105593, fixed in GCC 13). */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

/* For the few helpers of an inner loop that GCC would otherwise leave out of line (their size
 * after unrolling exceeds its inlining limits). */
#if defined(__GNUC__) || defined(__clang__)
#define LOWBIT_ALWAYS_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define LOWBIT_ALWAYS_INLINE __forceinline
#else
#define LOWBIT_ALWAYS_INLINE inline
#endif

namespace lowbit {
namespace cpu {
namespace LOWBIT_CPU_ISA {

/* Where a prefetch brings its line: into L1 (T0), into L2 (T1: a stream read far ahead then
 * does not hold the few L1 fill buffers for the whole memory latency; measured on Intel SPR, one
 * core streaming 4-bit weights 10-15% faster than into L1 at the same distance), or close to the
 * core with a hint that it will not be reused (prefetchnta: data read once, which then displaces
 * little of what the code around the kernel keeps in the caches). */
enum class Cache { kL1, kL2, kNonTemporal };

/* A hint to bring the cache line holding address `at` into the caches ahead of its loads. Only a
 * hint: the address is never dereferenced, so it may lie past the end of the data. */
template <Cache kTo = Cache::kL1>
inline void prefetch(uintptr_t at) {
#if defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch(reinterpret_cast<const void *>(at), 0, kTo == Cache::kL1 ? 3 : kTo == Cache::kL2 ? 2 : 0);
#else
    (void)at;
#endif
}

/* Four bytes as a little-endian dword, whatever the host byte order (compiles to one load). */
inline uint32_t load_le32(const uint8_t *p) {
    return uint32_t{p[0]} | (uint32_t{p[1]} << 8) | (uint32_t{p[2]} << 16) | (uint32_t{p[3]} << 24);
}

#if defined(LOWBIT_SIMD_AVX512)

struct Vec {
    static constexpr int W = 16;
    using F = __m512;
    using I = __m512i;
    using Mask = __mmask16;
    struct Table16 {
        __m512 v;
    };

    static F zero() { return _mm512_setzero_ps(); }
    static F set1(float x) { return _mm512_set1_ps(x); }
    static F loadu(const float *p) { return _mm512_loadu_ps(p); }
    static F add(F a, F b) { return _mm512_add_ps(a, b); }
    static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
    static F div(F a, F b) { return _mm512_div_ps(a, b); }
    static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
    /* (a > b) ? a : b lane by lane, b when either is NaN: the scalar `m = (a > m) ? a : m`. */
    static F max(F a, F b) { return _mm512_max_ps(a, b); }
    /* (a < b) ? a : b, b when either is NaN. */
    static F min(F a, F b) { return _mm512_min_ps(a, b); }
    static F abs(F a) {
        return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), _mm512_set1_epi32(0x7FFFFFFF)));
    }
    static Mask nan_mask(F a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
    static Mask no_lanes() { return 0; }
    static Mask mask_or(Mask a, Mask b) { return static_cast<Mask>(a | b); }
    static bool any(Mask m) { return m != 0; }
    static float reduce_max(F a) { return _mm512_reduce_max_ps(a); }
    static float reduce_add(F a) { return _mm512_reduce_add_ps(a); }

    /* ---- element loads and stores (exact widening; RNE narrowing) ---- */
    static F load(ElemF32, const float *p) { return _mm512_loadu_ps(p); }
    static F load(ElemF16, const uint16_t *p) {
        return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p)));
    }
    static F load(ElemBF16, const uint16_t *p) {
        const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p)));
        return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
    }
    static void store(ElemF32, float *p, F v) { _mm512_storeu_ps(p, v); }
    static void store(ElemF16, uint16_t *p, F v) {
        _mm256_storeu_si256(reinterpret_cast<__m256i *>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
    static void store(ElemBF16, uint16_t *p, F v) {
        /* fmt::float_to_bf16_bits: (x + 0x7FFF + lsb) >> 16; NaN -> (x >> 16) | 0x40 */
        const __m512i x = _mm512_castps_si512(v);
        const __m512i hi = _mm512_srli_epi32(x, 16);
        const __m512i bias = _mm512_add_epi32(_mm512_and_si512(hi, _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7FFF));
        const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(x, bias), 16);
        const __m512i quiet = _mm512_or_si512(hi, _mm512_set1_epi32(0x40));
        const __m512i r = _mm512_mask_mov_epi32(rounded, nan_mask(v), quiet);
        _mm256_storeu_si256(reinterpret_cast<__m256i *>(p), _mm512_cvtepi32_epi16(r));
    }

    /* ---- 16-entry tables in registers ---- */
    static Table16 table16(const float *t) { return {_mm512_loadu_ps(t)}; }
    /* t[idx & 15] per lane (vpermps looks at the low 4 bits only). */
    static F lookup(const Table16 &t, I idx) { return _mm512_permutexvar_ps(idx, t.v); }
    static I lookup_bits(const Table16 &t, I idx) { return _mm512_castps_si512(lookup(t, idx)); }

    /* ---- 4-bit packing ---- */
    /* Number of thresholds t[0..14] strictly below s, per lane (NaN never counts). */
    static I count_below(const F *t15, F s) {
        const __m512i one = _mm512_set1_epi32(1);
        __m512i c = _mm512_setzero_si512();
        for (int i = 0; i < 15; ++i) c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(t15[i], s, _CMP_LT_OQ), c, one);
        return c;
    }
    /* 16 codes (0..15, one per lane) -> 8 bytes, lane 2i in the high nibble of byte i. In each
     * 64-bit lane (c[2i] | c[2i+1] << 32), (x << 4) | (x >> 32) has that byte at the bottom. */
    static void store_nibbles(uint8_t *o, I c) {
        const __m512i t = _mm512_or_si512(_mm512_slli_epi64(c, 4), _mm512_srli_epi64(c, 32));
        _mm_storel_epi64(reinterpret_cast<__m128i *>(o), _mm512_cvtepi64_epi8(t));
    }
    /* 8 bytes -> 16 lanes, lane 2i = high nibble of byte i, lane 2i+1 = its low nibble (the bits
     * above the nibble are not cleared: lookup() ignores them). */
    static I load_nibbles(const uint8_t *q) {
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i *>(q));
        const __m512i v = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b));
        return _mm512_srlv_epi32(v, _mm512_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0));
    }

    /* ---- 8-bit blockwise ---- */
    static I truncate(F u) { return _mm512_cvttps_epi32(u); }
    static void store_ints(int32_t *p, I v) { _mm512_storeu_si512(p, v); }

    /* ---- gemv_4bit ---- */
    static I load_dwords(const uint8_t *p) { return _mm512_loadu_si512(p); }
    /* The first `lanes` dwords, zeros above (nothing past them is read). */
    static I load_dwords(const uint8_t *p, int lanes) {
        return _mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << lanes) - 1u), p);
    }
    template <int S>
    static I shift_right(I v) {
        return _mm512_srli_epi32(v, S);
    }
    /* Lane j: (r + 8j) >> log2bs, the block (counted from the chunk's first) holding weight 8j
     * of a chunk whose first weight is r elements into its block. */
    static I lane_blocks(int64_t r, int log2bs) {
        const __m512i first = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(r)),
                                               _mm512_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80,
                                                                 88, 96, 104, 112, 120));
        return _mm512_srl_epi32(first, _mm_cvtsi32_si128(log2bs));
    }
    /* Lane j: p[blocks[j]]; reads p[0..count) only (count <= 16). */
    static F absmax_lanes(const float *p, I blocks, int count) {
        return _mm512_permutexvar_ps(blocks, _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1u), p));
    }

    /* ---- interleaved gemm ---- */
    /* The first `lanes` floats, zeros above (nothing past them is read). */
    static F load_floats(const float *p, int lanes) {
        return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << lanes) - 1u), p);
    }
    static void storeu(float *p, F v) { _mm512_storeu_ps(p, v); }
};

#elif defined(LOWBIT_SIMD_AVX2)

struct Vec {
    static constexpr int W = 8;
    using F = __m256;
    using I = __m256i;
    using Mask = __m256; /* all-ones lanes */
    struct Table16 {
        __m256 lo, hi;
    };

    static F zero() { return _mm256_setzero_ps(); }
    static F set1(float x) { return _mm256_set1_ps(x); }
    static F loadu(const float *p) { return _mm256_loadu_ps(p); }
    static F add(F a, F b) { return _mm256_add_ps(a, b); }
    static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
    static F div(F a, F b) { return _mm256_div_ps(a, b); }
    static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
    /* (a > b) ? a : b lane by lane, b when either is NaN: the scalar `m = (a > m) ? a : m`. */
    static F max(F a, F b) { return _mm256_max_ps(a, b); }
    /* (a < b) ? a : b, b when either is NaN. */
    static F min(F a, F b) { return _mm256_min_ps(a, b); }
    static F abs(F a) { return _mm256_castsi256_ps(_mm256_and_si256(_mm256_castps_si256(a), _mm256_set1_epi32(0x7FFFFFFF))); }
    static Mask nan_mask(F a) { return _mm256_cmp_ps(a, a, _CMP_UNORD_Q); }
    static Mask no_lanes() { return _mm256_setzero_ps(); }
    static Mask mask_or(Mask a, Mask b) { return _mm256_or_ps(a, b); }
    static bool any(Mask m) { return _mm256_movemask_ps(m) != 0; }
    static float reduce_max(F a) {
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        m = _mm_max_ss(m, _mm_movehdup_ps(m));
        return _mm_cvtss_f32(m);
    }
    static float reduce_add(F a) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        return _mm_cvtss_f32(s);
    }

    /* ---- element loads and stores (exact widening; RNE narrowing) ---- */
    static F load(ElemF32, const float *p) { return _mm256_loadu_ps(p); }
    static F load(ElemF16, const uint16_t *p) {
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
    }
    static F load(ElemBF16, const uint16_t *p) {
        const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
    }
    static void store(ElemF32, float *p, F v) { _mm256_storeu_ps(p, v); }
    static void store(ElemF16, uint16_t *p, F v) {
        _mm_storeu_si128(reinterpret_cast<__m128i *>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
    static void store(ElemBF16, uint16_t *p, F v) {
        /* fmt::float_to_bf16_bits: (x + 0x7FFF + lsb) >> 16; NaN -> (x >> 16) | 0x40 */
        const __m256i x = _mm256_castps_si256(v);
        const __m256i hi = _mm256_srli_epi32(x, 16);
        const __m256i bias = _mm256_add_epi32(_mm256_and_si256(hi, _mm256_set1_epi32(1)), _mm256_set1_epi32(0x7FFF));
        const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(x, bias), 16);
        const __m256i quiet = _mm256_or_si256(hi, _mm256_set1_epi32(0x40));
        const __m256i r = _mm256_blendv_epi8(rounded, quiet, _mm256_castps_si256(nan_mask(v)));
        const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
        _mm_storeu_si128(reinterpret_cast<__m128i *>(p), packed);
    }

    /* ---- 16-entry tables in registers ---- */
    static Table16 table16(const float *t) { return {_mm256_loadu_ps(t), _mm256_loadu_ps(t + 8)}; }
    /* t[idx & 15] per lane: vpermps looks at the low 3 bits; bit 3, shifted into the sign, picks
     * the half. */
    static F lookup(const Table16 &t, I idx) {
        const __m256 lo = _mm256_permutevar8x32_ps(t.lo, idx);
        const __m256 hi = _mm256_permutevar8x32_ps(t.hi, idx);
        return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    }
    static I lookup_bits(const Table16 &t, I idx) { return _mm256_castps_si256(lookup(t, idx)); }

    /* ---- 4-bit packing ---- */
    /* Number of thresholds t[0..14] strictly below s, per lane (NaN never counts). */
    static I count_below(const F *t15, F s) {
        __m256i c = _mm256_setzero_si256();
        for (int i = 0; i < 15; ++i) c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps(t15[i], s, _CMP_LT_OQ)));
        return c;
    }
    /* 8 codes (0..15, one per lane) -> 4 bytes, lane 2i in the high nibble of byte i. In each
     * 64-bit lane (c[2i] | c[2i+1] << 32), (x << 4) | (x >> 32) has that byte at the bottom;
     * vpshufb gathers bytes 0 and 8 of each 128-bit half into bytes 0-1 (low half) / 2-3 (high). */
    static void store_nibbles(uint8_t *o, I c) {
        const __m256i t = _mm256_or_si256(_mm256_slli_epi64(c, 4), _mm256_srli_epi64(c, 32));
        const __m256i g = _mm256_shuffle_epi8(
            t, _mm256_setr_epi8(0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,  //
                                -1, -1, 0, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1));
        const uint32_t v = static_cast<uint32_t>(
            _mm_cvtsi128_si32(_mm_or_si128(_mm256_castsi256_si128(g), _mm256_extracti128_si256(g, 1))));
        memcpy(o, &v, 4);
    }
    /* 4 bytes -> 8 lanes, lane 2i = high nibble of byte i, lane 2i+1 = its low nibble (the bits
     * above the nibble are not cleared: lookup() ignores them). */
    static I load_nibbles(const uint8_t *q) {
        uint32_t bytes;
        memcpy(&bytes, q, 4);
        const __m128i b = _mm_cvtsi32_si128(static_cast<int>(bytes));
        const __m256i v = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(b, b));
        return _mm256_srlv_epi32(v, _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0));
    }

    /* ---- 8-bit blockwise ---- */
    static I truncate(F u) { return _mm256_cvttps_epi32(u); }
    static void store_ints(int32_t *p, I v) { _mm256_storeu_si256(reinterpret_cast<__m256i *>(p), v); }

    /* ---- gemv_4bit ---- */
    static I load_dwords(const uint8_t *p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p)); }
    /* The first `lanes` dwords, zeros above (nothing past them is read). */
    static I load_dwords(const uint8_t *p, int lanes) {
        const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        return _mm256_maskload_epi32(reinterpret_cast<const int *>(p), m);
    }
    template <int S>
    static I shift_right(I v) {
        return _mm256_srli_epi32(v, S);
    }
    /* Lane j: (r + 8j) >> log2bs, the block (counted from the chunk's first) holding weight 8j
     * of a chunk whose first weight is r elements into its block. */
    static I lane_blocks(int64_t r, int log2bs) {
        const __m256i first = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(r)),
                                               _mm256_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56));
        return _mm256_srl_epi32(first, _mm_cvtsi32_si128(log2bs));
    }
    /* Lane j: p[blocks[j]]; reads p[0..count) only (count <= 8). */
    static F absmax_lanes(const float *p, I blocks, int count) {
        const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        return _mm256_permutevar8x32_ps(_mm256_maskload_ps(p, m), blocks);
    }

    /* ---- interleaved gemm ---- */
    /* The first `lanes` floats, zeros above (nothing past them is read). */
    static F load_floats(const float *p, int lanes) {
        return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    }
    static void storeu(float *p, F v) { _mm256_storeu_ps(p, v); }
};

#else /* scalar: what gemv_4bit needs, one lane */

struct Vec {
    static constexpr int W = 1;
    using F = float;
    using I = uint32_t;
    struct Table16 {
        float v[16];
    };

    static F zero() { return 0.0f; }
    static F set1(float x) { return x; }
    static F loadu(const float *p) { return *p; }
    static F add(F a, F b) { return a + b; }
    static F mul(F a, F b) { return a * b; }
    /* Two roundings (contraction is off): software fma would be far slower without the hardware. */
    static F fmadd(F a, F b, F c) { return a * b + c; }
    static float reduce_add(F a) { return a; }

    static Table16 table16(const float *t) {
        Table16 r;
        memcpy(r.v, t, sizeof r.v);
        return r;
    }
    static F lookup(const Table16 &t, I idx) { return t.v[idx & 15u]; }

    static I load_dwords(const uint8_t *p) { return load_le32(p); }
    /* The first `lanes` (0 or 1) dwords, zero for none (nothing past them is read). */
    static I load_dwords(const uint8_t *p, int lanes) { return lanes > 0 ? load_le32(p) : 0u; }
    template <int S>
    static I shift_right(I v) {
        return v >> S;
    }
    static I lane_blocks(int64_t r, int log2bs) { return static_cast<I>(r >> log2bs); }
    static F absmax_lanes(const float *p, I blocks, int /*count: 1*/) { return p[blocks]; }

    /* The first `lanes` (0 or 1) floats, zero for none: a tail group's lanes past its rows read nothing. */
    static F load_floats(const float *p, int lanes) { return lanes > 0 ? *p : 0.0f; }
    static void storeu(float *p, F v) { *p = v; }
};

#endif

} // namespace LOWBIT_CPU_ISA
} // namespace cpu
} // namespace lowbit

#endif /* LOWBIT_CPU_SIMD_H */
