/* int8.cpp -- LLM.int8 on the CPU: the exact int8 x int8 -> int32 product, row-wise (and
 * column-wise) int8 quantization with outliers, and the float epilogues.
 *
 * Per-element semantics: csrc/common/lowbit_int8.h (the reference backend's operations, one
 * float32 operation at a time). The element loops below are that definition and the scalar
 * build; where Vec::W > 1 a vector body runs first with the same IEEE operations per element:
 * multiplies (no FMA), the exact fp16/bf16 widening of simd.h, cvtps2dq under the
 * round-to-nearest-even MXCSR that FpEnvGuard pins (= rint, then the int32 conversion, whose
 * NaN/out-of-range result is 0x80000000), and truncation to the low byte (vpmovdb / a byte
 * shuffle, never a saturating pack: torch keeps the low byte, lowbit_int8.h).
 *
 * ---- int8_linear_matmul: out[m, n] = sum_k A[m, k] * B[n, k] in int32 -----------------------
 * Both operands are K-contiguous (A: M x K, B: N x K, as the weight is stored), so the kernel
 * takes inner products without repacking either: a register tile of MR rows of A by NR = 4 rows
 * of B keeps MR x 4 vector accumulators, each summing lane-wise products over K; at the end of a
 * K block the four accumulators of a row of A are reduced together into one 4-int vector.
 *
 *   avx512 + VNNI  vpdpbusd (u8 x s8, four products summed into each int32 lane, wrapping).
 *                  B is made unsigned by flipping its sign bit: u = b ^ 0x80 = b + 128, so the
 *                  sum is sum_k a*(b + 128) = sum_k a*b + 128 * sum_k a[m, k]; the second term
 *                  (exactly representable: |.| <= 2^14 K) is subtracted per row of A. Every
 *                  product u*a lies in [-32640, 32385] and vpdpbusd adds them with wrap-around
 *                  (no saturation, unlike vpdpbusds), so the int32 result is the true sum mod
 *                  2^32 -- exact whenever the true product fits int32, which the C ABI
 *                  guarantees by refusing K > kInt8MatmulMaxK = 2^17 - 1 (|a*b| <= 2^14).
 *                  -128 * -128 is no special case.
 *                  MR = 6: 24 accumulators + 4 B + 1 A + the 0x80 constant = 30 zmm registers.
 *   avx512 (no VNNI), avx2
 *                  sign-extend bytes to int16 (vpmovsxbw) and vpmaddwd: each int32 lane gets
 *                  a0*b0 + a1*b1 with |a_i*b_i| <= 2^14, so no intermediate can saturate or
 *                  overflow (vpmaddwd's only overflow, (-2^15)^2 * 2, needs int16 -32768, which a
 *                  sign-extended int8 never is). MR = 6 (zmm) / 2 (ymm: 8 accumulators + 4 B +
 *                  1 A + 1 product in 16 registers).
 *   scalar         int32 products summed in uint32 (wrap-around is defined there).
 * K tails: AVX-512 loads them with byte masks (zeros past K: a zero a contributes nothing, which
 * also covers the flipped B lanes, 0x80 there); AVX2 copies them into a zero-padded 16-byte
 * buffer. Every ISA therefore computes the same exact sum.
 *
 * Blocking: K in blocks of kKc = 4096 (one block for most LLM layers; a 4 x kKc tile of B is read
 * from memory once and then from L1/L2 by every row tile of the M block; smaller K blocks measured
 * no faster on Zen 4 and cost more reductions), M in blocks of kMc rows (kMc x kKc bytes of A,
 * 384 KiB, stay in L2). Threads split the tiles of 4 rows of B (the output columns); each thread
 * walks its tiles for one (K block, M block) at a time, so that B streams from memory once per M
 * block. Each output is written by one thread, K blocks in order: results never depend on the
 * thread count.
 *
 * Measured (AMD EPYC Zen 4, one thread): the VNNI tile sustains ~2.6e9 vpdpbusd/s with B in
 * cache, ~2.1e9 at 32 x 4096 x 4096 (B from memory); the int16 tiles (AVX-512, AVX2) are about 2x
 * and 2.3x slower.
 */
#include <stddef.h>
#include <string.h>

#include <algorithm>
#include <new>
#include <type_traits>

#include "cpu_kernels.h"
#include "dispatch.h"
#include "lowbit_int8.h"
#include "parallel.h"
#include "simd.h"

#if defined(LOWBIT_SIMD_AVX512) && (defined(__GNUC__) || defined(__clang__))
#define LOWBIT_INT8_VNNI 1
#define LOWBIT_TARGET_VNNI __attribute__((target("avx512vnni")))
#endif

namespace lowbit {
namespace cpu {
namespace LOWBIT_CPU_ISA {

namespace {

/* ============================================================================================ */
/* Quantization                                                                                 */
/* ============================================================================================ */

/* Marks column c as holding an outlier. Rows run on several threads and may mark the same column;
 * all of them store the same value, so a relaxed atomic store is all that is needed. */
inline void mark_column(uint8_t *flags, int64_t c) {
#if defined(__GNUC__) || defined(__clang__)
    __atomic_store_n(flags + c, static_cast<uint8_t>(1), __ATOMIC_RELAXED);
#else
    flags[c] = 1;
#endif
}

inline float abs_float(float x) { return fmt::bits_float(fmt::float_bits(x) & 0x7FFFFFFFu); }

#if defined(LOWBIT_SIMD_AVX512)
using F = __m512;
using Mask = __mmask16;
inline Mask ge_mask(F v, F t) { return _mm512_cmp_ps_mask(v, t, _CMP_GE_OQ); }
inline F zero_lanes(F v, Mask m) { return _mm512_maskz_mov_ps(static_cast<Mask>(~m), v); }
inline unsigned mask_bits(Mask m) { return m; }
/* Low byte of each int32 of rint(v) (cvtps2dq rounds to nearest even under the pinned MXCSR). */
inline void store_codes(int8_t *o, F v, const uint8_t *flags) {
    __m128i b = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v));
    if (flags != nullptr)
        b = _mm_and_si128(b, _mm_cmpeq_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i *>(flags)), _mm_setzero_si128()));
    _mm_storeu_si128(reinterpret_cast<__m128i *>(o), b);
}
inline F load_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p))));
}
inline F load_i32(const int32_t *p) { return _mm512_cvtepi32_ps(_mm512_loadu_si512(p)); }
#elif defined(LOWBIT_SIMD_AVX2)
using F = __m256;
using Mask = __m256;
inline Mask ge_mask(F v, F t) { return _mm256_cmp_ps(v, t, _CMP_GE_OQ); }
inline F zero_lanes(F v, Mask m) { return _mm256_andnot_ps(m, v); }
inline unsigned mask_bits(Mask m) { return static_cast<unsigned>(_mm256_movemask_ps(m)); }
inline void store_codes(int8_t *o, F v, const uint8_t *flags) {
    const __m256i i = _mm256_and_si256(_mm256_cvtps_epi32(v), _mm256_set1_epi32(0xFF));
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1)); /* 0..255: exact */
    __m128i b = _mm_packus_epi16(w, w);
    if (flags != nullptr)
        b = _mm_and_si128(b, _mm_cmpeq_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(flags)), _mm_setzero_si128()));
    _mm_storel_epi64(reinterpret_cast<__m128i *>(o), b);
}
inline F load_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(p))));
}
inline F load_i32(const int32_t *p) { return _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p))); }
#endif

/* max |x| over the row's regular elements; marks the outlier columns in `flags` (if given). */
template <class E>
float row_absmax(const typename E::T *a, int64_t cols, float threshold, uint8_t *flags) {
    float m = 0.0f;
    int64_t c = 0;
#if defined(LOWBIT_SIMD_AVX512) || defined(LOWBIT_SIMD_AVX2)
    constexpr int W = Vec::W;
    if (cols >= W) {
        const F t = Vec::set1(threshold);
        F mx = Vec::zero();
        for (; c + W <= cols; c += W) {
            F v = Vec::abs(Vec::load(E{}, a + c));
            if (threshold > 0.0f) {
                const Mask o = ge_mask(v, t);
                if (mask_bits(o) != 0) {
                    if (flags != nullptr)
                        for (int j = 0; j < W; ++j)
                            if ((mask_bits(o) >> j) & 1u) mark_column(flags, c + j);
                    v = zero_lanes(v, o);
                }
            }
            mx = Vec::max(v, mx);
        }
        m = Vec::reduce_max(mx);
    }
#endif
    for (; c < cols; ++c) {
        const float v = abs_float(E::load(a[c]));
        if (fmt::int8_is_outlier(v, threshold)) {
            if (flags != nullptr) mark_column(flags, c);
            continue;
        }
        m = (v > m) ? v : m;
    }
    return m;
}

/* One row of codes. flags given: every element of a flagged column is 0 (its outliers included);
 * else with a threshold, the outlier elements are 0. */
template <class E>
void quantize_row(const typename E::T *a, int64_t cols, float threshold, float scale, const uint8_t *flags,
                  int8_t *o) {
    const bool zero_outliers = flags == nullptr && threshold > 0.0f;
    int64_t c = 0;
#if defined(LOWBIT_SIMD_AVX512) || defined(LOWBIT_SIMD_AVX2)
    constexpr int W = Vec::W;
    const F t = Vec::set1(threshold), s = Vec::set1(scale);
    for (; c + W <= cols; c += W) {
        F x = Vec::load(E{}, a + c);
        if (zero_outliers) x = zero_lanes(x, ge_mask(Vec::abs(x), t));
        store_codes(o + c, Vec::mul(x, s), flags != nullptr ? flags + c : nullptr);
    }
#endif
    for (; c < cols; ++c) {
        const float x = E::load(a[c]);
        const bool zero = flags != nullptr ? flags[c] != 0 : (zero_outliers && fmt::int8_is_outlier(abs_float(x), threshold));
        o[c] = zero ? int8_t{0} : fmt::int8_quantize(x, scale);
    }
}

/* Column statistics of columns [c0, c1) over all rows: max |x| of the regular elements. */
template <class E>
void column_absmax(const typename E::T *A, int64_t rows, int64_t cols, float threshold, float *stats, int64_t c0,
                   int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) stats[c] = 0.0f;
    for (int64_t r = 0; r < rows; ++r) {
        const typename E::T *a = A + r * cols;
        int64_t c = c0;
#if defined(LOWBIT_SIMD_AVX512) || defined(LOWBIT_SIMD_AVX2)
        constexpr int W = Vec::W;
        const F t = Vec::set1(threshold);
        for (; c + W <= c1; c += W) {
            F v = Vec::abs(Vec::load(E{}, a + c));
            if (threshold > 0.0f) v = zero_lanes(v, ge_mask(v, t));
            Vec::store(ElemF32{}, stats + c, Vec::max(v, Vec::loadu(stats + c)));
        }
#endif
        for (; c < c1; ++c) {
            const float v = abs_float(E::load(a[c]));
            if (!fmt::int8_is_outlier(v, threshold)) stats[c] = (v > stats[c]) ? v : stats[c];
        }
    }
}

/* One row of codes against per-column statistics (outlier elements 0). */
template <class E>
void quantize_row_by_columns(const typename E::T *a, int64_t cols, float threshold, const float *stats, int8_t *o) {
    int64_t c = 0;
#if defined(LOWBIT_SIMD_AVX512) || defined(LOWBIT_SIMD_AVX2)
    constexpr int W = Vec::W;
    const F t = Vec::set1(threshold), zero = Vec::zero(), one = Vec::set1(1.0f), k127 = Vec::set1(127.0f);
    for (; c + W <= cols; c += W) {
        F x = Vec::load(E{}, a + c);
        if (threshold > 0.0f) x = zero_lanes(x, ge_mask(Vec::abs(x), t));
        /* fmt::int8_row_scale per lane: stat > 0 ? (1 / stat) * 127 : 0 */
        const F st = Vec::loadu(stats + c);
        const F sc = Vec::mul(Vec::div(one, st), k127);
#if defined(LOWBIT_SIMD_AVX512)
        const F scale = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(st, zero, _CMP_GT_OQ), sc);
#else
        const F scale = _mm256_and_ps(_mm256_cmp_ps(st, zero, _CMP_GT_OQ), sc);
#endif
        store_codes(o + c, Vec::mul(x, scale), nullptr);
    }
#endif
    for (; c < cols; ++c) {
        const float x = E::load(a[c]);
        o[c] = fmt::int8_is_outlier(abs_float(x), threshold) ? int8_t{0}
                                                             : fmt::int8_quantize(x, fmt::int8_row_scale(stats[c]));
    }
}

inline int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, kMinElementsPerThread / cols); }

/* ============================================================================================ */
/* int8 x int8 -> int32                                                                         */
/* ============================================================================================ */

constexpr int kNr = 4;            /* rows of B per tile */
constexpr int64_t kKc = 4096;     /* K block */
constexpr int64_t kMc = 96;       /* rows of A per M block (a multiple of every MR) */
#if defined(LOWBIT_SIMD_AVX512)
constexpr int64_t kPrefetch = 1024; /* bytes ahead in each row of B (prefetches past a row's end are harmless) */
#endif
/* Tiles of B per thread at least this many multiply-adds (a thread wake-up costs ~5-10 us). */
constexpr int64_t kMinMacsPerThread = int64_t{1} << 21;

struct Gemm {
    const int8_t *A, *B;
    int64_t M, K, N;
    int32_t *out;
    const int32_t *row_corr; /* VNNI: 128 * sum_k A[m, k] per row, else nullptr */
};

/* sums[i] (4 ints: the NR outputs of row i of the tile) -> out, = on the first K block, += after;
 * the first K block also subtracts the row's correction. Unsigned: wrap-around is intended. */
inline void store_tile_row(const Gemm &g, int64_t m, int64_t n0, int nvalid, bool first, const uint32_t (&sums)[kNr]) {
    int32_t *o = g.out + m * g.N + n0;
    const uint32_t corr = g.row_corr != nullptr ? static_cast<uint32_t>(g.row_corr[m]) : 0u;
    for (int j = 0; j < nvalid; ++j) {
        const uint32_t v = first ? sums[j] - corr : static_cast<uint32_t>(o[j]) + sums[j];
        o[j] = static_cast<int32_t>(v);
    }
}

/* The vector tiles keep their MR x 4 accumulators in named variables c<i><j> (declared for the
 * largest MR; unused ones are dead code), write them to a stack array once at the end, and reduce
 * them from there behind a compiler barrier. GCC 12 otherwise spills accumulators inside the K
 * loop (an array of 24 zmm accumulators, a lambda capturing them, a second copy of the loop body
 * for the tail, or the reductions right after the loop all make it do so), which halves the
 * speed. */
#define LOWBIT_TILE_ACCUMULATORS(V, zero)                                                         \
    [[maybe_unused]] V c00 = zero, c01 = zero, c02 = zero, c03 = zero, c10 = zero, c11 = zero,   \
                       c12 = zero, c13 = zero, c20 = zero, c21 = zero, c22 = zero, c23 = zero,   \
                       c30 = zero, c31 = zero, c32 = zero, c33 = zero, c40 = zero, c41 = zero,   \
                       c42 = zero, c43 = zero, c50 = zero, c51 = zero, c52 = zero, c53 = zero
#define LOWBIT_TILE_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define LOWBIT_TILE_SPILL(i)                                                                        \
    if constexpr (MR > i) {                                                                        \
        tmp[4 * i] = c##i##0;                                                                      \
        tmp[4 * i + 1] = c##i##1;                                                                  \
        tmp[4 * i + 2] = c##i##2;                                                                  \
        tmp[4 * i + 3] = c##i##3;                                                                  \
    }
/* Accumulators -> tmp, then row i's 4 sums reduced and stored (store_tile_row). */
#define LOWBIT_TILE_FINISH(V)                                                                       \
    {                                                                                              \
        alignas(64) V tmp[MR * kNr];                                                               \
        LOWBIT_TILE_ROWS(LOWBIT_TILE_SPILL)                                                        \
        __asm__ volatile("" ::: "memory");                                                         \
        for (int i = 0; i < MR; ++i) {                                                             \
            uint32_t sums[kNr];                                                                    \
            _mm_storeu_si128(reinterpret_cast<__m128i *>(sums),                                    \
                             reduce4(tmp[4 * i], tmp[4 * i + 1], tmp[4 * i + 2], tmp[4 * i + 3])); \
            store_tile_row(g, m0 + i, n0, nvalid, k0 == 0, sums);                                  \
        }                                                                                          \
    }

#if defined(LOWBIT_SIMD_AVX512)
/* Sums of the 16 lanes of each of a, b, c, d -> lanes 0..3. */
LOWBIT_ALWAYS_INLINE __m128i reduce4(__m512i a, __m512i b, __m512i c, __m512i d) {
    const __m256i a2 = _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1));
    const __m256i b2 = _mm256_add_epi32(_mm512_castsi512_si256(b), _mm512_extracti64x4_epi64(b, 1));
    const __m256i c2 = _mm256_add_epi32(_mm512_castsi512_si256(c), _mm512_extracti64x4_epi64(c, 1));
    const __m256i d2 = _mm256_add_epi32(_mm512_castsi512_si256(d), _mm512_extracti64x4_epi64(d, 1));
    const __m256i t = _mm256_hadd_epi32(_mm256_hadd_epi32(a2, b2), _mm256_hadd_epi32(c2, d2));
    return _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
}

/* VNNI tile: rows m0..m0+MR-1 of A x the 4 rows b[] of B over [k0, k1), 64 bytes a step.
 * kMasked: [k0, k1) is a K tail shorter than 64 bytes, loaded under a byte mask (zero A lanes past
 * K contribute nothing); otherwise k1 - k0 is a multiple of 64 and the loads are plain (masked
 * loads in the main loop cost ~10% on Zen 4). Each instantiation has a single loop: with two
 * copies of the body, GCC 12 stores every accumulator to the stack on every step. */
template <int MR, bool kMasked>
LOWBIT_TARGET_VNNI void tile_vnni(const Gemm &g, int64_t m0, const int8_t *const (&b)[kNr], int64_t n0, int nvalid,
                                  int64_t k0, int64_t k1) {
    const __m512i zero = _mm512_setzero_si512();
    LOWBIT_TILE_ACCUMULATORS(__m512i, zero);
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    const int64_t lda = g.K;
    const int8_t *a = g.A + m0 * lda;
    const int8_t *b0 = b[0], *b1 = b[1], *b2 = b[2], *b3 = b[3];
    const __mmask64 mask = kMasked ? ~uint64_t{0} >> (64 - (k1 - k0)) : ~__mmask64{0};
    (void)mask;
#define LOWBIT_LOAD(p) (kMasked ? _mm512_maskz_loadu_epi8(mask, p) : _mm512_loadu_si512(p))
    /* no lambda here: captured by reference, the accumulators would live in memory */
#define LOWBIT_ROW(i)                                                                               \
    if constexpr (MR > i) {                                                                        \
        const __m512i s = LOWBIT_LOAD(a + i * lda + k);                                            \
        c##i##0 = _mm512_dpbusd_epi32(c##i##0, u0, s);                                             \
        c##i##1 = _mm512_dpbusd_epi32(c##i##1, u1, s);                                             \
        c##i##2 = _mm512_dpbusd_epi32(c##i##2, u2, s);                                             \
        c##i##3 = _mm512_dpbusd_epi32(c##i##3, u3, s);                                             \
    }
    for (int64_t k = k0; k < k1; k += 64) {
        if constexpr (!kMasked && MR <= 2) { /* few rows of A: the loop waits on B, fetch it ahead */
            _mm_prefetch(reinterpret_cast<const char *>(b0 + k + kPrefetch), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char *>(b1 + k + kPrefetch), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char *>(b2 + k + kPrefetch), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char *>(b3 + k + kPrefetch), _MM_HINT_T0);
        }
        const __m512i u0 = _mm512_xor_si512(LOWBIT_LOAD(b0 + k), flip);
        const __m512i u1 = _mm512_xor_si512(LOWBIT_LOAD(b1 + k), flip);
        const __m512i u2 = _mm512_xor_si512(LOWBIT_LOAD(b2 + k), flip);
        const __m512i u3 = _mm512_xor_si512(LOWBIT_LOAD(b3 + k), flip);
        LOWBIT_TILE_ROWS(LOWBIT_ROW)
    }
#undef LOWBIT_ROW
#undef LOWBIT_LOAD
    LOWBIT_TILE_FINISH(__m512i)
}

/* int16 tile (AVX-512 without VNNI): 32 bytes a step, sign-extended; tail under a byte mask. */
template <int MR>
void tile_madd(const Gemm &g, int64_t m0, const int8_t *const (&b)[kNr], int64_t n0, int nvalid, int64_t k0,
               int64_t k1) {
    const __m512i zero = _mm512_setzero_si512();
    LOWBIT_TILE_ACCUMULATORS(__m512i, zero);
    const int8_t *a = g.A + m0 * g.K;
    const int8_t *b0 = b[0], *b1 = b[1], *b2 = b[2], *b3 = b[3];
#define LOWBIT_STEP(mask)                                                                          \
    {                                                                                              \
        const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, b0 + k));           \
        const __m512i w1 = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, b1 + k));           \
        const __m512i w2 = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, b2 + k));           \
        const __m512i w3 = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, b3 + k));           \
        LOWBIT_TILE_ROWS(LOWBIT_ROW)                                                               \
    }
#define LOWBIT_ROW(i)                                                                               \
    if constexpr (MR > i) {                                                                        \
        const __m512i s = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, a + i * g.K + k));    \
        c##i##0 = _mm512_add_epi32(c##i##0, _mm512_madd_epi16(s, w0));                             \
        c##i##1 = _mm512_add_epi32(c##i##1, _mm512_madd_epi16(s, w1));                             \
        c##i##2 = _mm512_add_epi32(c##i##2, _mm512_madd_epi16(s, w2));                             \
        c##i##3 = _mm512_add_epi32(c##i##3, _mm512_madd_epi16(s, w3));                             \
    }
    int64_t k = k0;
    for (; k + 32 <= k1; k += 32) {
        const __mmask32 mask = ~__mmask32{0};
        LOWBIT_STEP(mask)
    }
    if (k < k1) {
        const __mmask32 mask = ~uint32_t{0} >> (32 - (k1 - k));
        LOWBIT_STEP(mask)
    }
#undef LOWBIT_ROW
#undef LOWBIT_STEP
    LOWBIT_TILE_FINISH(__m512i)
}

constexpr int kMr = 6;
#elif defined(LOWBIT_SIMD_AVX2)
LOWBIT_ALWAYS_INLINE __m128i reduce4(__m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i t = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
    return _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
}

/* int16 tile (AVX2): 16 bytes a step, sign-extended; the last 1..15 bytes from zero-padded copies. */
template <int MR>
void tile_madd(const Gemm &g, int64_t m0, const int8_t *const (&b)[kNr], int64_t n0, int nvalid, int64_t k0,
               int64_t k1) {
    const __m256i zero = _mm256_setzero_si256();
    LOWBIT_TILE_ACCUMULATORS(__m256i, zero);
    const int8_t *a = g.A + m0 * g.K;
    const int8_t *b0 = b[0], *b1 = b[1], *b2 = b[2], *b3 = b[3];
    /* one step of 16 bytes: B rows at bp<j> + k, A row i at ap + i * lda + k */
#define LOWBIT_LOAD(p) _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)))
#define LOWBIT_STEP(bp0, bp1, bp2, bp3, ap, lda, k)                                                \
    {                                                                                              \
        const __m256i w0 = LOWBIT_LOAD(bp0 + k), w1 = LOWBIT_LOAD(bp1 + k);                        \
        const __m256i w2 = LOWBIT_LOAD(bp2 + k), w3 = LOWBIT_LOAD(bp3 + k);                        \
        const int8_t *row0 = ap + k;                                                               \
        const int64_t stride = lda;                                                                \
        LOWBIT_TILE_ROWS(LOWBIT_ROW)                                                               \
    }
#define LOWBIT_ROW(i)                                                                               \
    if constexpr (MR > i) {                                                                        \
        const __m256i s = LOWBIT_LOAD(row0 + i * stride);                                          \
        c##i##0 = _mm256_add_epi32(c##i##0, _mm256_madd_epi16(s, w0));                             \
        c##i##1 = _mm256_add_epi32(c##i##1, _mm256_madd_epi16(s, w1));                             \
        c##i##2 = _mm256_add_epi32(c##i##2, _mm256_madd_epi16(s, w2));                             \
        c##i##3 = _mm256_add_epi32(c##i##3, _mm256_madd_epi16(s, w3));                             \
    }
    int64_t k = k0;
    for (; k + 16 <= k1; k += 16) LOWBIT_STEP(b0, b1, b2, b3, a, g.K, k)
    if (k < k1) { /* the last 1..15 bytes from zero-padded copies */
        int8_t pb[kNr][16] = {}, pa[MR][16] = {};
        const size_t len = static_cast<size_t>(k1 - k);
        for (int j = 0; j < kNr; ++j) memcpy(pb[j], b[j] + k, len);
        for (int i = 0; i < MR; ++i) memcpy(pa[i], a + i * g.K + k, len);
        const int8_t *pa0 = pa[0];
        const int64_t zero_k = 0;
        LOWBIT_STEP(pb[0], pb[1], pb[2], pb[3], pa0, 16, zero_k)
    }
#undef LOWBIT_ROW
#undef LOWBIT_STEP
#undef LOWBIT_LOAD
    LOWBIT_TILE_FINISH(__m256i)
}

constexpr int kMr = 2;
#else
template <int MR>
void tile_scalar(const Gemm &g, int64_t m0, const int8_t *const (&b)[kNr], int64_t n0, int nvalid, int64_t k0,
                 int64_t k1) {
    uint32_t acc[MR][kNr] = {};
    for (int i = 0; i < MR; ++i) {
        const int8_t *a = g.A + (m0 + i) * g.K;
        for (int j = 0; j < kNr; ++j) {
            uint32_t s = 0;
            for (int64_t k = k0; k < k1; ++k) s += static_cast<uint32_t>(int32_t{a[k]} * int32_t{b[j][k]});
            acc[i][j] = s;
        }
    }
    for (int i = 0; i < MR; ++i) store_tile_row(g, m0 + i, n0, nvalid, k0 == 0, acc[i]);
}

constexpr int kMr = 4;
#endif

/* Calls fn(std::integral_constant<int, rows>{}) for rows in 1..kMr. */
template <class Fn>
inline void dispatch_mr(int rows, Fn &&fn) {
    switch (rows) {
#if defined(LOWBIT_SIMD_AVX512)
    case 6: fn(std::integral_constant<int, 6>{}); break;
    case 5: fn(std::integral_constant<int, 5>{}); break;
#endif
#if !defined(LOWBIT_SIMD_AVX2)
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
#endif
    case 2: fn(std::integral_constant<int, 2>{}); break;
    default: fn(std::integral_constant<int, 1>{}); break;
    }
}

/* Tiles [t0, t1) of B (tile t = rows 4t..4t+3, the last one possibly partial). */
void gemm_tiles(const Gemm &g, bool vnni, int64_t t0, int64_t t1) {
    for (int64_t k0 = 0; k0 < g.K; k0 += kKc) {
        const int64_t k1 = std::min(g.K, k0 + kKc);
        for (int64_t mb = 0; mb < g.M; mb += kMc) {
            const int64_t mb1 = std::min(g.M, mb + kMc);
            for (int64_t t = t0; t < t1; ++t) {
                const int64_t n0 = t * kNr;
                const int nvalid = static_cast<int>(std::min<int64_t>(kNr, g.N - n0));
                const int8_t *b[kNr];
                for (int j = 0; j < kNr; ++j) b[j] = g.B + (n0 + std::min(j, nvalid - 1)) * g.K; /* repeat the last row */
                for (int64_t m0 = mb; m0 < mb1; m0 += kMr) {
                    const int rows = static_cast<int>(std::min<int64_t>(kMr, mb1 - m0));
                    dispatch_mr(rows, [&](auto r) {
                        constexpr int MR = decltype(r)::value;
#if defined(LOWBIT_SIMD_AVX512)
                        if (vnni) { /* whole 64-byte steps, then the K tail (accumulated) */
                            const int64_t kmain = k0 + (k1 - k0) / 64 * 64;
                            if (kmain > k0) tile_vnni<MR, false>(g, m0, b, n0, nvalid, k0, kmain);
                            if (kmain < k1) tile_vnni<MR, true>(g, m0, b, n0, nvalid, kmain, k1);
                        } else {
                            tile_madd<MR>(g, m0, b, n0, nvalid, k0, k1);
                        }
#elif defined(LOWBIT_SIMD_AVX2)
                        (void)vnni;
                        tile_madd<MR>(g, m0, b, n0, nvalid, k0, k1);
#else
                        (void)vnni;
                        tile_scalar<MR>(g, m0, b, n0, nvalid, k0, k1);
#endif
                    });
                }
            }
        }
    }
}

} // namespace

/* ============================================================================================ */
/* Entry points (cpu_kernels.h)                                                                 */
/* ============================================================================================ */

bool int8_linear_matmul(const int8_t *A, int64_t M, int64_t K, const int8_t *B, int64_t N, int32_t *out,
                        int num_threads) {
#if defined(LOWBIT_INT8_VNNI)
    const bool vnni = (cpu_features() & kFeatureAvx512Vnni) != 0;
#else
    const bool vnni = false;
#endif
    int32_t *corr = nullptr;
    if (vnni) {
        corr = new (std::nothrow) int32_t[static_cast<size_t>(M)];
        if (corr == nullptr) return false;
        for (int64_t m = 0; m < M; ++m) {
            const int8_t *a = A + m * K;
            uint32_t s = 0;
            for (int64_t k = 0; k < K; ++k) s += static_cast<uint32_t>(int32_t{a[k]});
            corr[m] = static_cast<int32_t>(s * 128u);
        }
    }
    const Gemm g{A, B, M, K, N, out, corr};
    const int64_t tiles = (N + kNr - 1) / kNr;
    const int64_t macs_per_tile = M * std::min<int64_t>(K, kMinMacsPerThread) * kNr;
    const int64_t grain = std::max<int64_t>(1, kMinMacsPerThread / std::max<int64_t>(1, macs_per_tile));
    parallel_for(0, tiles, num_threads, grain, [&](int64_t t0, int64_t t1) { gemm_tiles(g, vnni, t0, t1); });
    delete[] corr;
    return true;
}

void int8_vectorwise_quant(int32_t dtype, const void *A, int64_t rows, int64_t cols, float threshold, int8_t *out,
                           float *row_stats, uint8_t *flags, int num_threads) {
    dispatch_dtype(dtype, [&](auto tag) {
        using E = decltype(tag);
        const auto *a = static_cast<const typename E::T *>(A);
        const int64_t grain = row_grain(cols);
        if (flags != nullptr) {
            /* two passes: the outlier columns of every row must be known before any row is coded */
            memset(flags, 0, static_cast<size_t>(cols));
            parallel_for(0, rows, num_threads, grain, [&](int64_t r0, int64_t r1) {
                for (int64_t r = r0; r < r1; ++r) row_stats[r] = row_absmax<E>(a + r * cols, cols, threshold, flags);
            });
            parallel_for(0, rows, num_threads, grain, [&](int64_t r0, int64_t r1) {
                for (int64_t r = r0; r < r1; ++r)
                    quantize_row<E>(a + r * cols, cols, threshold, fmt::int8_row_scale(row_stats[r]), flags,
                                    out + r * cols);
            });
            return;
        }
        parallel_for(0, rows, num_threads, grain, [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r) {
                const float m = row_absmax<E>(a + r * cols, cols, threshold, nullptr);
                row_stats[r] = m;
                quantize_row<E>(a + r * cols, cols, threshold, fmt::int8_row_scale(m), nullptr, out + r * cols);
            }
        });
    });
}

void int8_colwise_quant(int32_t dtype, const void *A, int64_t rows, int64_t cols, float threshold, int8_t *out,
                        float *col_stats, int num_threads) {
    dispatch_dtype(dtype, [&](auto tag) {
        using E = decltype(tag);
        const auto *a = static_cast<const typename E::T *>(A);
        /* statistics: threads split the columns in slabs of 64 (whole cache lines of col_stats) */
        constexpr int64_t kSlab = 64;
        const int64_t slabs = (cols + kSlab - 1) / kSlab;
        const int64_t slab_grain = std::max<int64_t>(1, kMinElementsPerThread / (kSlab * rows));
        parallel_for(0, slabs, num_threads, slab_grain, [&](int64_t s0, int64_t s1) {
            column_absmax<E>(a, rows, cols, threshold, col_stats, s0 * kSlab, std::min(cols, s1 * kSlab));
        });
        parallel_for(0, rows, num_threads, row_grain(cols), [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r)
                quantize_row_by_columns<E>(a + r * cols, cols, threshold, col_stats, out + r * cols);
        });
    });
}

void int8_vectorwise_dequant(const int8_t *A, const float *stats, int64_t rows, int64_t cols, float scale, float *out,
                             int num_threads) {
    parallel_for(0, rows, num_threads, row_grain(cols), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const int8_t *a = A + r * cols;
            float *o = out + r * cols;
            const float st = stats[r];
            int64_t c = 0;
#if defined(LOWBIT_SIMD_AVX512) || defined(LOWBIT_SIMD_AVX2)
            const F s = Vec::set1(st), sc = Vec::set1(scale);
            for (; c + Vec::W <= cols; c += Vec::W) Vec::store(ElemF32{}, o + c, Vec::mul(Vec::mul(load_i8(a + c), s), sc));
#endif
            for (; c < cols; ++c) o[c] = fmt::int8_dequant(a[c], st, scale);
        }
    });
}

void int8_mm_dequant(const int32_t *A, const float *row_stats, const float *col_stats, int64_t rows, int64_t cols,
                     float scale, const void *bias, int32_t bias_dtype, int32_t out_dtype, void *out,
                     int num_threads) {
    dispatch_dtype(out_dtype, [&](auto out_tag) {
        using O = decltype(out_tag);
        /* bias: no bias is a bias of kind "none"; otherwise its dtype picks the loader */
        auto run = [&](auto bias_tag, auto has_bias) {
            using Bt = decltype(bias_tag);
            constexpr bool kBias = decltype(has_bias)::value;
            const auto *bp = static_cast<const typename Bt::T *>(bias);
            auto *op = static_cast<typename O::T *>(out);
            parallel_for(0, rows, num_threads, row_grain(cols), [&](int64_t r0, int64_t r1) {
                for (int64_t r = r0; r < r1; ++r) {
                    const int32_t *a = A + r * cols;
                    typename O::T *o = op + r * cols;
                    const float rs = row_stats[r];
                    int64_t c = 0;
#if defined(LOWBIT_SIMD_AVX512) || defined(LOWBIT_SIMD_AVX2)
                    const F rv = Vec::set1(rs), sc = Vec::set1(scale);
                    for (; c + Vec::W <= cols; c += Vec::W) {
                        F v = Vec::mul(Vec::mul(load_i32(a + c), Vec::mul(rv, Vec::loadu(col_stats + c))), sc);
                        if constexpr (kBias) v = Vec::add(v, Vec::load(Bt{}, bp + c));
                        Vec::store(O{}, o + c, v);
                    }
#endif
                    for (; c < cols; ++c) {
                        float v = fmt::int8_mm_dequant(a[c], rs, col_stats[c], scale);
                        if constexpr (kBias) v = v + Bt::load(bp[c]);
                        o[c] = O::store(v);
                    }
                }
            });
        };
        if (bias == nullptr) run(ElemF32{}, std::false_type{});
        else dispatch_dtype(bias_dtype, [&](auto bias_tag) { run(bias_tag, std::true_type{}); });
    });
}

} // namespace LOWBIT_CPU_ISA
} // namespace cpu
} // namespace lowbit
