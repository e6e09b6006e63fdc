/* interleaved_4bit.cpp -- the CPU inference layout of a 4-bit weight and the product on it.
 *
 * Layout (defined in lowbit_formats.h, "The interleaved 4-bit layout"): rows in groups of 16,
 * and within a group the 4-byte words (8 weights each) and the absmax stored transposed, so that
 * one 64-byte load holds the same 8 weights of 16 consecutive output rows. interleave_4bit builds
 * it from the standard bytes and undoes it, bit for bit.
 *
 * Product: out[m, n] = sum_b absmax[n, b] * sum_{k in block b} A[m, k] * code[nibble(n, k)]
 * (+ bias[n]), float32 products and sums, rounded once to out_dtype: the contract of gemv_4bit,
 * for any number of rows of A. With the rows of B in the vector lanes, decoding needs no
 * rearranged activations: a word's 8 slots are looked up in the 16 code values held in registers
 * (vpermps, as in gemv_4bit.cpp: the nibble at bits [4s, 4s+4) is weight s ^ 1 of the word) and
 * each meets A[m, k] broadcast from memory, one FMA per 16 rows. The lanes' block sums are scaled
 * by a vector of 16 absmax values -- contiguous in this layout -- once per block, and the 16 lane
 * totals are 16 outputs: no horizontal sums.
 *
 * Per 64 bytes of B and row of A that is 7 shifts, 8 lookups and 8 FMAs (AVX-512): the lookups
 * and shifts are paid once per pass, so rows of A are processed kPassRows at a time and each
 * group's bytes (16 * K / 2: 32 KiB for K = 4096) are reused from L1/L2 by the following passes.
 * Threads split the groups, so each thread reads one sequential range of B; each output is summed
 * in an order fixed by M, K and the ISA alone, so results do not depend on the thread count.
 */
#include <stddef.h>
#include <string.h>

#include <cmath>

#include <algorithm>
#include <utility>

#include "block_absmax.h"
#include "call_order.h"
#include "cpu_kernels.h"
#include "dispatch.h"
#include "parallel.h"
#include "scratch.h"
#include "simd.h"

namespace lowbit {
namespace cpu {
namespace LOWBIT_CPU_ISA {

namespace {

using F = Vec::F;
using I = Vec::I;
constexpr int W = Vec::W;
constexpr int kGroup = fmt::kInterleaveRows;
constexpr int kVecs = kGroup / W; /* vectors of lanes per group */
static_assert(kGroup % W == 0, "a group must be a whole number of vectors");

/* ---- layout -------------------------------------------------------------------------------- */

/* One group of r rows of `words` 4-byte elements: dst[d*r + j] = src[j*words + d] (forward) or
 * back. Tiles of kTile words keep the r source rows' lines in L1 while they are transposed. */
void transpose_group(const uint8_t *src, uint8_t *dst, int64_t r, int64_t words, bool inverse) {
    constexpr int64_t kTile = 64;
    for (int64_t d0 = 0; d0 < words; d0 += kTile) {
        const int64_t d1 = std::min(words, d0 + kTile);
        for (int64_t j = 0; j < r; ++j)
            for (int64_t d = d0; d < d1; ++d) {
                const int64_t row_major = (j * words + d) * 4, interleaved = (d * r + j) * 4;
                memcpy(dst + (inverse ? row_major : interleaved), src + (inverse ? interleaved : row_major), 4);
            }
    }
}

/* ---- product ------------------------------------------------------------------------------- */

/* Rows of A per pass over a group (the totals and block sums of a pass stay in registers). */
constexpr int kPassRows = W == 8 ? 4 : 8;

/* Weights per thread, at least: 1M (512 KiB packed, ~30 us for one row on one core), fewer with
 * more rows of A (a pass of 8 rows costs several times one). Below, the wake-up of a second thread
 * (5-10 us idle; a scheduler time slice when other libraries' threads still spin on the cores, as
 * torch's do between the ops of a model) costs more than it saves. */
constexpr int64_t kMinWeightsPerThread = int64_t{1} << 20;

/* parallel_for's grain, in groups. */
inline int64_t group_grain(int64_t M, int64_t K) {
    return std::max<int64_t>(1, kMinWeightsPerThread / std::min<int64_t>(M, kPassRows) / (kGroup * K));
}

/* Independent FMA chains per (row of A, vector): one row of A with one vector per group needs two
 * to keep both FMA ports busy; more rows or vectors are independent chains themselves (and AVX2's
 * 16 registers hold no more). */
template <int M>
constexpr int kChains = M == 1 && kVecs == 1 ? 2 : 1;

/* Bytes of B fetched ahead of a pass (into L2 by the float32 products, non-temporally by the
 * fixed-point ones: see group_fixed): each thread's groups are one sequential stream, and the loop
 * is fast enough for DRAM latency to show past the hardware prefetchers (without it, 2-4 rows of A
 * through a stack larger than the LLC took 2-2.5x the time of one row; with it on every other line
 * only, -10%: each line needs its prefetch). Measured one token through 20-150 NF4 4096 x 4096
 * layers, 2 threads: on Intel SPR 4-16 KiB stream alike and 2 KiB ~10% slower; on AMD Zen 5 (EPYC
 * 9005) 16 KiB streams 66-69 GB/s where 4 KiB streams 61-63 when the host's memory reads ~90 GB/s
 * (alike at ~55), and 32-64 KiB are slower. Past the end of B is fine: a prefetch never faults. */
constexpr int64_t kPrefetchBytes = 16384;

/* With AVX2's 16 registers, from 3 rows of A on the block sums do not fit beside the totals:
 * each decoded vector is then multiplied by its lanes' absmax first and the products go straight
 * into the totals (one more multiply per vector, paid once for all rows of the pass). */
template <int M>
constexpr bool kPrescale = W == 8 && M >= 3;

struct Gemm {
    const uint8_t *B;
    const float *absmax;
    int64_t N, K, blocks, words_per_block;
    const float *A; /* float32, passes of kPassRows rows: row m0 + m of A, weight k at A[m0 * K + k * rows + m] */
    const void *bias;
    int32_t bias_dtype, out_dtype;
    void *out;
    Vec::Table16 code;
};

template <int M, int R>
struct Sums {
    F v[M][kVecs][R];

    LOWBIT_ALWAYS_INLINE void clear() {
        for (auto &row : v)
            for (auto &vec : row)
                for (F &a : vec) a = Vec::zero();
    }
    LOWBIT_ALWAYS_INLINE F total(int m, int vec) const {
        F s = v[m][vec][0];
        for (int c = 1; c < R; ++c) s = Vec::add(s, v[m][vec][c]);
        return s;
    }
};

/* sums[m][vec] += A[m, k + (S ^ 1)] * code[slot S of x] (times scale when kPrescale). */
template <int S, int M, int R, bool kScaled>
LOWBIT_ALWAYS_INLINE void word_slot(const Gemm &g, I x, F scale, const float *a, int vec, Sums<M, R> &sums) {
    F w = Vec::lookup(g.code, Vec::shift_right<4 * S>(x));
    if (kScaled) w = Vec::mul(w, scale);
    for (int m = 0; m < M; ++m) {
        F &c = sums.v[m][vec][S % R];
        c = Vec::fmadd(Vec::set1(a[(S ^ 1) * M + m]), w, c);
    }
}

template <int M, int R, bool kScaled, int... S>
LOWBIT_ALWAYS_INLINE void word(const Gemm &g, I x, F scale, const float *a, int vec, Sums<M, R> &sums,
                               std::integer_sequence<int, S...>) {
    (word_slot<S, M, R, kScaled>(g, x, scale, a, vec, sums), ...);
}

/* out[m, n] = sum (+ bias[n]), rounded once to out_dtype. */
inline void store_out(const Gemm &g, int64_t m, int64_t n, float sum) {
    store_element(g.out_dtype, g.out, m * g.N + n, g.bias != nullptr ? sum + load_element(g.bias_dtype, g.bias, n) : sum);
}

/* Rows m0..m0+M-1 of A times the group of rows n0.. of B (kTail: the last, r < 16 rows). */
template <int M, bool kTail>
void group_pass(const Gemm &g, int64_t n0, int64_t m0) {
    constexpr int R = kChains<M>;
    const int r = kTail ? static_cast<int>(g.N - n0) : kGroup;
    int lanes[kVecs];
    for (int vec = 0; vec < kVecs; ++vec) lanes[vec] = std::max(0, std::min(W, r - vec * W));
    const uint8_t *b = g.B + n0 * (g.K / 2);
    const float *absmax = g.absmax + n0 * g.blocks;
    const float *a = g.A + m0 * g.K; /* this pass's rows, k-major */
    const int64_t step = 4 * int64_t{r}; /* bytes from one word of the group's rows to the next */

    Sums<M, 1> tot;
    tot.clear();
    for (int64_t blk = 0; blk < g.blocks; ++blk) {
        F scale[kVecs];
        for (int vec = 0; vec < kVecs; ++vec)
            scale[vec] = kTail ? Vec::load_floats(absmax + blk * r + vec * W, lanes[vec])
                               : Vec::loadu(absmax + blk * kGroup + vec * W);
        Sums<M, R> acc;
        if (!kPrescale<M>) acc.clear();
        for (int64_t d = blk * g.words_per_block; d < (blk + 1) * g.words_per_block; ++d) {
            const uint8_t *bd = b + d * step;
            prefetch<Cache::kL2>(reinterpret_cast<uintptr_t>(bd) + kPrefetchBytes);
            for (int vec = 0; vec < kVecs; ++vec) {
                if (kTail && lanes[vec] == 0) continue;
                const I x = kTail ? Vec::load_dwords(bd + 4 * W * vec, lanes[vec]) : Vec::load_dwords(bd + 4 * W * vec);
                if constexpr (kPrescale<M>)
                    word<M, 1, true>(g, x, scale[vec], a + 8 * d * M, vec, tot, std::make_integer_sequence<int, 8>{});
                else
                    word<M, R, false>(g, x, scale[vec], a + 8 * d * M, vec, acc, std::make_integer_sequence<int, 8>{});
            }
        }
        if constexpr (!kPrescale<M>)
            for (int m = 0; m < M; ++m)
                for (int vec = 0; vec < kVecs; ++vec)
                    tot.v[m][vec][0] = Vec::fmadd(acc.total(m, vec), scale[vec], tot.v[m][vec][0]);
    }

    for (int m = 0; m < M; ++m)
        for (int vec = 0; vec < kVecs; ++vec) {
            float lane[W];
            Vec::storeu(lane, tot.v[m][vec][0]);
            for (int j = 0; j < lanes[vec]; ++j) store_out(g, m0 + m, n0 + vec * W + j, lane[j]);
        }
}

/* Calls fn(std::integral_constant<int, rows>{}) for rows in 1..kPassRows. */
template <class Fn>
inline void dispatch_pass_rows(int rows, Fn &&fn) {
    switch (rows) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 5: if constexpr (kPassRows > 4) fn(std::integral_constant<int, 5>{}); break;
    case 6: if constexpr (kPassRows > 4) fn(std::integral_constant<int, 6>{}); break;
    case 7: if constexpr (kPassRows > 4) fn(std::integral_constant<int, 7>{}); break;
    default: if constexpr (kPassRows > 4) fn(std::integral_constant<int, 8>{}); break;
    }
}

/* Groups [g0, g1): every pass of rows of A over each group before the next group. */
void groups(const Gemm &g, int64_t M, int64_t g0, int64_t g1) {
    for (int64_t grp = g0; grp < g1; ++grp) {
        const int64_t n0 = grp * kGroup;
        const bool tail = g.N - n0 < kGroup;
        for (int64_t m0 = 0; m0 < M; m0 += kPassRows)
            dispatch_pass_rows(static_cast<int>(std::min<int64_t>(kPassRows, M - m0)), [&](auto rows) {
                constexpr int R = decltype(rows)::value;
                tail ? group_pass<R, true>(g, n0, m0) : group_pass<R, false>(g, n0, m0);
            });
    }
}

/* A as float32 (exact widening), each pass's rows k-major: a pass's FMAs then read the
 * activations they broadcast at fixed offsets from one pointer. */
template <class E>
void pack_rows(const typename E::T *A, int64_t M, int64_t K, float *out) {
    for (int64_t m0 = 0; m0 < M; m0 += kPassRows) {
        const int64_t rows = std::min<int64_t>(kPassRows, M - m0);
        for (int64_t m = 0; m < rows; ++m)
            for (int64_t k = 0; k < K; ++k) out[m0 * K + k * rows + m] = E::load(A[(m0 + m) * K + k]);
    }
}

#if defined(LOWBIT_SIMD_AVX512) && (defined(__GNUC__) || defined(__clang__))
#define LOWBIT_INTERLEAVED_AMX 1
#define LOWBIT_TARGET_AMX __attribute__((target("amx-tile,amx-bf16,avx512bf16")))

/* ---- AMX (bf16 precision) -------------------------------------------------------------------
 *
 * In the fast precision (LOWBIT_PRECISION_FAST), from kAmxMinRows rows of A on, the product
 * runs on AMX tiles: tdpbf16ps multiplies a 16 x 32 bf16 tile of A by a tile of 32 weights of the
 * group's 16 rows, 16 x 16 x 32 multiply-adds into float32 in one instruction, so the FMA work
 * that grows with M disappears and the cost is decoding the weights once per pass of up to 64
 * rows of A. A B tile row holds, for each of the 16 output rows (the lanes, as in the FMA path),
 * a pair of weights: slots t and t + 4 of one word (weights t ^ 1 and 4 + (t ^ 1)), each code
 * value times its block's absmax in float32, rounded once to bf16 (vcvtne2ps2bf16: round to
 * nearest even; like all AVX512-BF16/AMX arithmetic it flushes subnormals, which only a block
 * absmax below ~1e-38 produces); the 16 rows of a B tile are 4 words x 4 pairs. A is rounded to
 * bf16 and rearranged once per call into the same pair order, so a tile of A is a plain strided
 * load. Sums stay in float32 in the tile registers until the group's end.
 */
/* Below, the 16-bit fixed-point path is faster (150 NF4 4096x4096 layers on Intel SPR, 2 threads:
 * 6 rows 125 vs 148 ms, 8 rows 144 vs 145, 12 rows 202 vs 148). */
constexpr int kAmxMinRows = 8;
constexpr int kTileRows = 16;                      /* rows of A per C tile */
constexpr int kTileWeights = 32;                   /* weights of a row per B tile: 4 words */
constexpr int kAmxPassTiles = 4;                   /* C tiles per pass: 64 rows of A */

struct TileConfig {
    uint8_t palette, start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* Tiles 0-3: C (16 rows of A x 16 output rows, float32), 4: the decoded weights, 5: A. */
LOWBIT_TARGET_AMX void amx_begin() {
    TileConfig config{};
    config.palette = 1;
    for (int t = 0; t < 6; ++t) {
        config.rows[t] = kTileRows;
        config.colsb[t] = 64;
    }
    /* GCC 12 does not see _tile_loadconfig read the struct and drops the stores above */
    __asm__ volatile("ldtilecfg %0" : : "m"(config));
}

LOWBIT_TARGET_AMX void amx_end() { _tile_release(); }

/* A as bf16 pairs in the order of the B tiles' rows -- pair 4d + t of a row = (A[8d + (t ^ 1)],
 * A[8d + 4 + (t ^ 1)]) -- stored tile by tile: the 16 x 32 tile of rows 16i.. and weights 32c..
 * is 1 KiB at (i * K / 32 + c) KiB, so a pass reads its tiles as one sequential stream. Rows past
 * M are zero. */
template <class E>
void pack_tiles(const typename E::T *A, int64_t M, int64_t K, uint16_t *out) {
    const int64_t padded = (M + kTileRows - 1) / kTileRows * kTileRows, chunks = K / kTileWeights;
    for (int64_t m = 0; m < padded; ++m)
        for (int64_t d = 0; d < K / 8; ++d)
            for (int t = 0; t < 4; ++t)
                for (int half = 0; half < 2; ++half) {
                    const float v = m < M ? E::load(A[m * K + 8 * d + 4 * half + (t ^ 1)]) : 0.0f;
                    const int64_t tile = (m / kTileRows) * chunks + d / 4;
                    out[(tile * kTileRows + m % kTileRows) * kTileWeights + 8 * (d % 4) + 2 * t + half] =
                        fmt::float_to_bf16_bits(v);
                }
}

/* The B tile of weights 32c..32c+31 of the group's rows (lanes), scaled and rounded to bf16. */
template <bool kTail>
LOWBIT_TARGET_AMX LOWBIT_ALWAYS_INLINE void decode_tile(const Gemm &g, const uint8_t *b, int64_t step, int lanes,
                                                        __m512 scale, int64_t c, uint8_t *tile) {
    /* word j of the conversion holds slot t of lane j, word 16 + j slot t + 4: interleave them */
    const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                           6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int word = 0; word < 4; ++word) {
        const uint8_t *at = b + (4 * c + word) * step;
        const __m512i x = kTail ? Vec::load_dwords(at, lanes) : Vec::load_dwords(at);
        __m512 w[8];
        w[0] = Vec::lookup(g.code, x);
        w[1] = Vec::lookup(g.code, Vec::shift_right<4>(x));
        w[2] = Vec::lookup(g.code, Vec::shift_right<8>(x));
        w[3] = Vec::lookup(g.code, Vec::shift_right<12>(x));
        w[4] = Vec::lookup(g.code, Vec::shift_right<16>(x));
        w[5] = Vec::lookup(g.code, Vec::shift_right<20>(x));
        w[6] = Vec::lookup(g.code, Vec::shift_right<24>(x));
        w[7] = Vec::lookup(g.code, Vec::shift_right<28>(x));
        for (int t = 0; t < 4; ++t) {
            const __m512bh bf = _mm512_cvtne2ps_pbh(_mm512_mul_ps(w[t + 4], scale), _mm512_mul_ps(w[t], scale));
            _mm512_store_si512(tile + (4 * word + t) * 64, _mm512_permutexvar_epi16(pairs, (__m512i)bf));
        }
    }
}

/* decode_tile for chunk c with its block's absmax. */
template <bool kTail>
LOWBIT_TARGET_AMX LOWBIT_ALWAYS_INLINE void decode_chunk(const Gemm &g, const uint8_t *b, const float *absmax,
                                                         int64_t step, int r, int64_t c, int64_t chunks_per_block,
                                                         uint8_t *tile) {
    const int64_t blk = c / chunks_per_block;
    const __m512 scale = kTail ? Vec::load_floats(absmax + blk * r, r) : Vec::loadu(absmax + blk * kGroup);
    decode_tile<kTail>(g, b, step, r, scale, c, tile);
}

/* Rows m0.. (MT tiles of 16; the packed A is zero past M) times the group of rows n0.. of B. */
template <int MT, bool kTail>
LOWBIT_TARGET_AMX void group_amx(const Gemm &g, const uint16_t *ap, int64_t M, int64_t n0, int64_t m0) {
    const int r = kTail ? static_cast<int>(g.N - n0) : kGroup;
    const uint8_t *b = g.B + n0 * (g.K / 2);
    const float *absmax = g.absmax + n0 * g.blocks;
    const int64_t step = 4 * int64_t{r};
    const int64_t chunks = g.K / kTileWeights;
    /* decoded tiles are stored kTileLead chunks before the tile loads that read them: AMX loads
     * wait for the stores, which then have had time to complete */
    constexpr int kTileLead = 2;
    alignas(64) uint8_t tiles[kTileLead + 1][kTileRows * 64];
    _tile_zero(0);
    if constexpr (MT > 1) _tile_zero(1);
    if constexpr (MT > 2) _tile_zero(2);
    if constexpr (MT > 3) _tile_zero(3);
    const int64_t chunks_per_block = g.words_per_block / 4;
    for (int64_t c = 0; c < std::min<int64_t>(kTileLead, chunks); ++c)
        decode_chunk<kTail>(g, b, absmax, step, r, c, chunks_per_block, tiles[c % (kTileLead + 1)]);
    for (int64_t c = 0; c < chunks; ++c) {
        if (c + kTileLead < chunks)
            decode_chunk<kTail>(g, b, absmax, step, r, c + kTileLead, chunks_per_block,
                                tiles[(c + kTileLead) % (kTileLead + 1)]);
        _tile_loadd(4, tiles[c % (kTileLead + 1)], 64);
        const uint16_t *a = ap + ((m0 / kTileRows) * chunks + c) * (kTileRows * kTileWeights); /* tile (m0/16, c) */
        const int64_t next = chunks * kTileRows * kTileWeights;                              /* to tile (+1, c) */
        _tile_loadd(5, a, 64);
        _tile_dpbf16ps(0, 5, 4);
        if constexpr (MT > 1) {
            _tile_loadd(5, a + next, 64);
            _tile_dpbf16ps(1, 5, 4);
        }
        if constexpr (MT > 2) {
            _tile_loadd(5, a + 2 * next, 64);
            _tile_dpbf16ps(2, 5, 4);
        }
        if constexpr (MT > 3) {
            _tile_loadd(5, a + 3 * next, 64);
            _tile_dpbf16ps(3, 5, 4);
        }
    }
    alignas(64) float sums[kAmxPassTiles][kTileRows][kGroup];
    _tile_stored(0, sums[0], 64);
    if constexpr (MT > 1) _tile_stored(1, sums[1], 64);
    if constexpr (MT > 2) _tile_stored(2, sums[2], 64);
    if constexpr (MT > 3) _tile_stored(3, sums[3], 64);
    for (int64_t m = m0; m < std::min<int64_t>(M, m0 + MT * kTileRows); ++m) {
        const float *row = sums[(m - m0) / kTileRows][(m - m0) % kTileRows];
        for (int j = 0; j < r; ++j) store_out(g, m, n0 + j, row[j]);
    }
}

/* Groups [g0, g1) on AMX; the thread configures its tiles for the range. */
void groups_amx(const Gemm &g, const uint16_t *ap, int64_t M, int64_t g0, int64_t g1) {
    amx_begin();
    for (int64_t grp = g0; grp < g1; ++grp) {
        const int64_t n0 = grp * kGroup;
        const bool tail = g.N - n0 < kGroup;
        for (int64_t m0 = 0; m0 < M; m0 += kAmxPassTiles * kTileRows) {
            const int64_t tiles = std::min<int64_t>(kAmxPassTiles, (M - m0 + kTileRows - 1) / kTileRows);
            switch (tiles) {
            case 1: tail ? group_amx<1, true>(g, ap, M, n0, m0) : group_amx<1, false>(g, ap, M, n0, m0); break;
            case 2: tail ? group_amx<2, true>(g, ap, M, n0, m0) : group_amx<2, false>(g, ap, M, n0, m0); break;
            case 3: tail ? group_amx<3, true>(g, ap, M, n0, m0) : group_amx<3, false>(g, ap, M, n0, m0); break;
            default: tail ? group_amx<4, true>(g, ap, M, n0, m0) : group_amx<4, false>(g, ap, M, n0, m0); break;
            }
        }
    }
    amx_end();
}
#endif


#if (defined(LOWBIT_SIMD_AVX512) || defined(LOWBIT_SIMD_AVX2)) && (defined(__GNUC__) || defined(__clang__))
#define LOWBIT_INTERLEAVED_FIXED 1

/* ---- 16-bit fixed point (fast precision) -----------------------------------------------------
 *
 * The float32 path above decodes each weight to a float with a lookup and spends one FMA on it:
 * 23 uops per 64 bytes of B and row of A on AVX-512 (7 shifts, 8 vpermps, 8 FMAs), 94 on AVX2
 * (its 16-entry lookup is two vpermps and a blend). That runs at about one core's DRAM read rate,
 * so memory stalls and compute add up instead of overlapping. In 16-bit integers one instruction
 * multiplies twice as many weights and a lookup yields two weights per 32-bit lane:
 *   - a code value is an int16, round(code / max|code| * 4096): error <= 2^-13 of the largest
 *     code, fixed per table (NF4's 16 values move by at most 1.2e-4);
 *   - A is rounded per row and chunk of kChunk weights to int16 against the chunk's largest
 *     magnitude, round(a * 8191 / amax): error <= amax * 2^-14;
 *   - int16 products summed exactly in int32 lanes per chunk (at most 64 products of
 *     4096 * 8191 each: < 2^31), then converted to float32 and scaled by the chunk's factor,
 *     and the block's sum by its absmax, as in the float32 path.
 * NaN or infinity in a chunk of A makes its factor NaN: every output of that row is NaN.
 * Each ISA's fixed_word below decodes a word of the group's rows into int16 pairs and multiplies
 * them by pairs of A, which pack_fixed lays out in the ISA's kPairOrder; the rest is shared.
 * Measured on Intel SPR, one row in L2: 6.95 cycles per 64 bytes (AVX-512) against 11.8 for
 * float32 products; AVX2 2.65x faster than its float32 products. Both then stream B from DRAM at
 * the read bandwidth.
 */
constexpr int64_t kChunk = fmt::kFixedChunk;                /* weights of A per scale (or the block) */
constexpr float kCodeOne = fmt::kFixedCodeOne;               /* the largest code magnitude, as an int16 */
constexpr float kActivationOne = fmt::kFixedActivationOne;   /* a chunk's largest |a|, as an int16 */
constexpr float kTinyChunk = fmt::kFixedTinyChunk;           /* 2^-64 */

inline int16_t to_int16(float v) { return static_cast<int16_t>(std::nearbyint(v)); }

#if defined(LOWBIT_SIMD_AVX512)
#define LOWBIT_TARGET_FIXED __attribute__((target("avx512vnni")))
constexpr int kFixedPassRows = 4; /* 4 accumulators a row: 16 + 8 of the 32 registers */

/* AVX512-VNNI. vpermw looks up the 16-bit halves of a word: shifted right by 4t, the low 5 bits
 * of each half are slot t (low half) and slot 4 + t (high half) -- the table holds the 16 values
 * twice, so the fifth bit does not matter -- and each lane then holds the pair (slot t,
 * slot 4 + t) of its row: weights t ^ 1 and 4 + (t ^ 1). vpdpwssd multiplies it by the matching
 * pair of A, broadcast from memory, and adds both products to the lane. Per 64 bytes: 3 shifts,
 * 4 vpermw and 4 vpdpwssd per row of A (11 uops for one row). */
constexpr int kPairOrder[8] = {1, 5, 0, 4, 3, 7, 2, 6};

struct FixedTable {
    __m512i v;
};

inline FixedTable fixed_table(const int16_t *w16) {
    alignas(64) int16_t t[32];
    for (int i = 0; i < 32; ++i) t[i] = w16[i & 15];
    return {_mm512_load_si512(t)};
}

/* acc + both products of each int16 pair of w and the pair at p: asm, because GCC 12 neither
 * folds the broadcast into vpdpwssd nor keeps the accumulators in place (a broadcast and a
 * register copy per instruction, measured 1.3x slower). */
LOWBIT_TARGET_FIXED LOWBIT_ALWAYS_INLINE __m512i dot_pairs(__m512i acc, __m512i w, const int16_t *p) {
    __asm__("vpdpwssd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*reinterpret_cast<const uint32_t *>(p)));
    return acc;
}

struct FixedAcc {
    __m512i v[4]; /* one per pair t */
    LOWBIT_TARGET_FIXED LOWBIT_ALWAYS_INLINE void clear() {
        for (auto &a : v) a = _mm512_setzero_si512();
    }
    /* The chunk's sum per lane (row), as float32. */
    LOWBIT_TARGET_FIXED LOWBIT_ALWAYS_INLINE F total() const {
        return _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_add_epi32(v[0], v[1]), _mm512_add_epi32(v[2], v[3])));
    }
};

/* acc[m] += the word x of the group's rows times the pairs of row m of A at a + 8m. */
template <int M, bool kAvxVnni>
LOWBIT_TARGET_FIXED LOWBIT_ALWAYS_INLINE void fixed_word(I x, const FixedTable &table, const int16_t *a, FixedAcc *acc) {
    static_assert(!kAvxVnni, "AVX-VNNI serves the avx2 build");
    for (int t = 0; t < 4; ++t) {
        const __m512i w = _mm512_permutexvar_epi16(t == 0 ? x : _mm512_srli_epi16(x, 4 * t), table.v);
        for (int m = 0; m < M; ++m) acc[m].v[t] = dot_pairs(acc[m].v[t], w, a + 8 * m + 2 * t);
    }
}

inline bool fixed_available() { return (cpu_features() & kFeatureAvx512Vnni) != 0; }
constexpr bool kHasAvxVnniPath = false; /* VNNI is this path's baseline */
inline bool avx_vnni_available() { return false; }

/* The int16 values of A's words d and d + 1 (lanes 0-7, 8-15 of v, rounded in the current
 * rounding mode, as nearbyint) stored in kPairOrder at word and word + stride. */
LOWBIT_ALWAYS_INLINE void store_pairs(F v, __m128i order, int16_t *word, int64_t stride) {
    const __m256i q = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(v)); /* |v| <= kActivationOne: no saturation */
    const __m256i ordered = _mm256_shuffle_epi8(q, _mm256_broadcastsi128_si256(order));
    _mm_storeu_si128(reinterpret_cast<__m128i *>(word), _mm256_castsi256_si128(ordered));
    _mm_storeu_si128(reinterpret_cast<__m128i *>(word + stride), _mm256_extracti128_si256(ordered, 1));
}

#else /* AVX2 */
#define LOWBIT_TARGET_FIXED
constexpr int kFixedPassRows = 2; /* 4 accumulators a row (2 per vector of 8 rows) in 16 registers */

/* AVX2. The nibbles of each byte, masked (low: slots 2b, high: slots 2b + 1 of byte b), index
 * two vpshufb tables, the low and the high bytes of the int16 values; interleaving them
 * (vpunpcklbw/hbw, within 128-bit lanes) makes int16 weights, dword pairs of one row: the low
 * unpack holds rows 0, 1 (4, 5 in the upper lane), two dwords each, the high one rows 2, 3 (6, 7).
 * Dword 2i of a row holds bytes 0-1, dword 2i + 1 bytes 2-3, so vpmaddwd meets them with A's
 * 4 int16 (weights 1, 3, 5, 7 for low nibbles, 0, 2, 4, 6 for high ones: slot s is weight s ^ 1)
 * broadcast as a qword. Per chunk, vphaddd of the two accumulators puts rows 0..7 in order.
 * Per 32 bytes: 3 uops of nibbles, 8 shuffles, and 4 vpmaddwd + 4 vpaddd per row of A. */
constexpr int kPairOrder[8] = {1, 3, 5, 7, 0, 2, 4, 6};

struct FixedTable {
    __m256i lo, hi, nibble;
};

inline FixedTable fixed_table(const int16_t *w16) {
    alignas(32) uint8_t lo[32], hi[32];
    for (int i = 0; i < 32; ++i) {
        const uint16_t bits = static_cast<uint16_t>(w16[i & 15]);
        lo[i] = static_cast<uint8_t>(bits & 0xff);
        hi[i] = static_cast<uint8_t>(bits >> 8);
    }
    return {_mm256_load_si256(reinterpret_cast<const __m256i *>(lo)),
            _mm256_load_si256(reinterpret_cast<const __m256i *>(hi)), _mm256_set1_epi8(0x0f)};
}

struct FixedAcc {
    __m256i v[2]; /* rows 0, 1, 4, 5 and rows 2, 3, 6, 7, two lanes each */
    LOWBIT_ALWAYS_INLINE void clear() { v[0] = v[1] = _mm256_setzero_si256(); }
    LOWBIT_ALWAYS_INLINE F total() const { return _mm256_cvtepi32_ps(_mm256_hadd_epi32(v[0], v[1])); }
};

/* acc + both products of each int16 pair of w and p, per dword lane: vpmaddwd then vpaddd, or
 * AVX-VNNI's vpdpwssd, which does both (asm, VEX-encoded: this build does not enable the
 * extension, and the EVEX form would need AVX-512; 8 of the 38 uops per 64 bytes and row, and one
 * token through 20 NF4 layers 163 us a layer against 197 on AMD Zen 5, benchmarks/native_ab.py). */
template <bool kAvxVnni>
LOWBIT_ALWAYS_INLINE __m256i dot_pairs(__m256i acc, __m256i w, __m256i p) {
    if constexpr (kAvxVnni) {
        __asm__("%{vex%} vpdpwssd %2, %1, %0" : "+x"(acc) : "x"(w), "x"(p));
        return acc;
    } else {
        return _mm256_add_epi32(acc, _mm256_madd_epi16(w, p));
    }
}

template <int M, bool kAvxVnni>
LOWBIT_ALWAYS_INLINE void fixed_word(I x, const FixedTable &table, const int16_t *a, FixedAcc *acc) {
    for (int half = 0; half < 2; ++half) {
        const __m256i idx = _mm256_and_si256(half == 0 ? x : _mm256_srli_epi16(x, 4), table.nibble);
        const __m256i lo = _mm256_shuffle_epi8(table.lo, idx), hi = _mm256_shuffle_epi8(table.hi, idx);
        const __m256i rows01 = _mm256_unpacklo_epi8(lo, hi), rows23 = _mm256_unpackhi_epi8(lo, hi);
        for (int m = 0; m < M; ++m) {
            int64_t q;
            memcpy(&q, a + 8 * m + 4 * half, 8);
            const __m256i pairs = _mm256_set1_epi64x(q);
            acc[m].v[0] = dot_pairs<kAvxVnni>(acc[m].v[0], rows01, pairs);
            acc[m].v[1] = dot_pairs<kAvxVnni>(acc[m].v[1], rows23, pairs);
        }
    }
}

inline bool fixed_available() { return true; }
constexpr bool kHasAvxVnniPath = true;
inline bool avx_vnni_available() { return (cpu_features() & kFeatureAvxVnni) != 0; }

/* The int16 values of A's word d (the lanes of v, rounded in the current rounding mode, as
 * nearbyint) stored in kPairOrder at word. */
LOWBIT_ALWAYS_INLINE void store_pairs(F v, __m128i order, int16_t *word, int64_t) {
    const __m256i q = _mm256_cvtps_epi32(v);
    const __m128i h = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i *>(word), _mm_shuffle_epi8(h, order));
}
#endif

/* The byte shuffle that puts a word's 8 int16 in kPairOrder. */
inline __m128i pair_order_bytes() {
    alignas(16) int8_t bytes[16];
    for (int i = 0; i < 8; ++i) {
        bytes[2 * i] = static_cast<int8_t>(2 * kPairOrder[i]);
        bytes[2 * i + 1] = static_cast<int8_t>(2 * kPairOrder[i] + 1);
    }
    return _mm_load_si128(reinterpret_cast<const __m128i *>(bytes));
}

/* A (M rows) as int16 pairs and chunk factors, pass by pass (kFixedPassRows rows): the 8 int16
 * of word d and row m of a pass at pairs[(d * rows + m) * 8] in kPairOrder, the factor of chunk
 * c and row m at scale[c * rows + m] (amax / 8191 * max|code| / 4096); pass p starts at
 * pairs + p * kFixedPassRows * K and scale + p * kFixedPassRows * K / chunk. A chunk (32 or 64
 * weights) is a whole number of vectors. */
template <class E>
void pack_fixed(const typename E::T *A, int64_t M, int64_t K, int64_t chunk, float code_max, int16_t *pairs,
                float *scale) {
    static_assert(W % 8 == 0, "a vector of A is whole words");
    const __m128i order = pair_order_bytes();
    for (int64_t m0 = 0; m0 < M; m0 += kFixedPassRows) {
        const int64_t rows = std::min<int64_t>(kFixedPassRows, M - m0);
        int16_t *p = pairs + m0 * K;
        float *s = scale + m0 * (K / chunk);
        for (int64_t m = 0; m < rows; ++m) {
            const typename E::T *a = A + (m0 + m) * K;
            for (int64_t c = 0; c < K / chunk; ++c) {
                bool nan;
                const float amax = block_absmax<E>(a + c * chunk, chunk, &nan);
                const bool finite = !nan && amax <= 3.4028235e38f;
                /* below 2^-64, 8191 / amax could overflow: the chunk is scaled by 2^64 first (exactly) */
                const float pre = amax < kTinyChunk ? 1.0f / kTinyChunk : 1.0f;
                const float inv = amax > 0.0f && finite ? kActivationOne / (amax * pre) : 0.0f;
                s[c * rows + m] = finite ? amax / kActivationOne * (code_max / kCodeOne) : std::nanf("");
                const F vpre = Vec::set1(pre), vinv = Vec::set1(inv);
                for (int64_t k = c * chunk; k < (c + 1) * chunk; k += W)
                    /* not finite: zeros (the factor carries the NaN) */
                    store_pairs(finite ? Vec::mul(Vec::mul(Vec::load(E{}, a + k), vpre), vinv) : Vec::zero(), order,
                                p + (k / 8 * rows + m) * 8, rows * 8);
            }
        }
    }
}

/* GCC 12's induction-variable rewriting makes it copy each accumulator to another register and
 * back around every vpdpwssd of the loop below (6 extra uops per 64 bytes, ~1.3x slower). */
#if defined(__GNUC__) && !defined(__clang__)
#define LOWBIT_NO_IVOPTS __attribute__((optimize("no-ivopts")))
#else
#define LOWBIT_NO_IVOPTS
#endif

/* Rows m0..m0+M-1 of A (one pass: pairs and scale at its start) times the group of rows n0.. of B. */
template <int M, bool kTail, bool kAvxVnni>
LOWBIT_TARGET_FIXED LOWBIT_NO_IVOPTS void group_fixed(const Gemm &g, const FixedTable &table, const int16_t *pairs, const float *scale,
                                     int64_t chunk, int64_t n0, int64_t m0) {
    const int r = kTail ? static_cast<int>(g.N - n0) : kGroup;
    int lanes[kVecs];
    for (int vec = 0; vec < kVecs; ++vec) lanes[vec] = std::max(0, std::min(W, r - vec * W));
    const uint8_t *b = g.B + n0 * (g.K / 2);
    const float *absmax = g.absmax + n0 * g.blocks;
    const int64_t step = 4 * int64_t{r};
    const int64_t words_per_chunk = chunk / 8, chunks_per_block = g.words_per_block / words_per_chunk;
    const int64_t absmax_lead = kPrefetchBytes / g.words_per_block; /* B: 4 * r bytes a word, absmax: 4 * r a block */
    F tot[M][kVecs];
    for (auto &row : tot)
        for (F &v : row) v = Vec::zero();
    int64_t d = 0, c = 0;
    FixedAcc acc[kVecs][M];
    for (int64_t blk = 0; blk < g.blocks; ++blk) {
        F sum[M][kVecs];
        for (auto &row : sum)
            for (F &v : row) v = Vec::zero();
        for (int64_t cc = 0; cc < chunks_per_block; ++cc, ++c) {
            for (auto &vec : acc)
                for (FixedAcc &a : vec) a.clear();
            for (const int64_t end = d + words_per_chunk; d < end; ++d) {
                const uint8_t *bd = b + d * step;
                /* non-temporally: each line is read once, and displaces less of the caches (AMD Zen 5,
                 * benchmarks/native_ab.py: one row 115 us a layer against 118 into L1, four rows 188
                 * against 195 into L2, two rows alike; not measured on Intel, where an L1 hint held
                 * the fill buffers of gemv_4bit's stream: see Cache) */
                prefetch<Cache::kNonTemporal>(reinterpret_cast<uintptr_t>(bd) + kPrefetchBytes);
                for (int vec = 0; vec < kVecs; ++vec) {
                    if (kTail && lanes[vec] == 0) continue;
                    const I x = kTail ? Vec::load_dwords(bd + 4 * W * vec, lanes[vec]) : Vec::load_dwords(bd + 4 * W * vec);
                    fixed_word<M, kAvxVnni>(x, table, pairs + d * M * 8, acc[vec]);
                }
            }
            for (int m = 0; m < M; ++m)
                for (int vec = 0; vec < kVecs; ++vec)
                    sum[m][vec] = Vec::fmadd(acc[vec][m].total(), Vec::set1(scale[c * M + m]), sum[m][vec]);
        }
        /* the absmax stream too (one line a block for a whole group), as far ahead in time as B's */
        prefetch<Cache::kNonTemporal>(reinterpret_cast<uintptr_t>(absmax + blk * r) + absmax_lead);
        for (int vec = 0; vec < kVecs; ++vec) {
            const F block_scale = kTail ? Vec::load_floats(absmax + blk * r + vec * W, lanes[vec])
                                        : Vec::loadu(absmax + blk * kGroup + vec * W);
            for (int m = 0; m < M; ++m) tot[m][vec] = Vec::fmadd(sum[m][vec], block_scale, tot[m][vec]);
        }
    }
    for (int m = 0; m < M; ++m)
        for (int vec = 0; vec < kVecs; ++vec) {
            float lane[W];
            Vec::storeu(lane, tot[m][vec]);
            for (int j = 0; j < lanes[vec]; ++j) store_out(g, m0 + m, n0 + vec * W + j, lane[j]);
        }
}

/* Groups [g0, g1): every pass of rows of A over each group before the next group. */
template <bool kAvxVnni>
LOWBIT_TARGET_FIXED void groups_fixed(const Gemm &g, const FixedTable &table, const int16_t *pairs,
                                      const float *scale, int64_t chunk, int64_t M, int64_t g0, int64_t g1) {
    for (int64_t grp = g0; grp < g1; ++grp) {
        const int64_t n0 = grp * kGroup;
        const bool tail = g.N - n0 < kGroup;
        for (int64_t m0 = 0; m0 < M; m0 += kFixedPassRows) {
            const int16_t *p = pairs + m0 * g.K;
            const float *s = scale + m0 * (g.K / chunk);
            dispatch_pass_rows(static_cast<int>(std::min<int64_t>(kFixedPassRows, M - m0)), [&](auto rows) {
                constexpr int R = decltype(rows)::value;
                if constexpr (R <= kFixedPassRows)
                    tail ? group_fixed<R, true, kAvxVnni>(g, table, p, s, chunk, n0, m0)
                         : group_fixed<R, false, kAvxVnni>(g, table, p, s, chunk, n0, m0);
            });
        }
    }
}

/* Whether every code value is finite: a NaN or infinite one has no fixed-point form (the float32
 * products then serve the fast precision, and carry it into the outputs). */
inline bool finite_code(const float *code) {
    for (int i = 0; i < fmt::kCode4Size; ++i)
        if (!(std::fabs(code[i]) <= 3.4028235e38f)) return false;
    return true;
}

/* The fast-precision product (see above) for a finite code; false when the scratch for A cannot
 * be allocated. */
bool matmul_fixed(const Gemm &g, int32_t a_dtype, const void *A, int64_t M, const float *code, int64_t blocksize,
                  int num_threads, int64_t grain, const NextStream &next) {
    const int64_t K = g.K, chunk = std::min(blocksize, kChunk);
    /* the int16 pairs (M * K halves of a float) and M * K / chunk factors */
    float *scratch = thread_scratch(static_cast<size_t>((M * K + 1) / 2 + M * (K / chunk)));
    if (scratch == nullptr) return false;
    float *scale = scratch + (M * K + 1) / 2;
    int16_t *pairs = reinterpret_cast<int16_t *>(scratch);
    float code_max = 0.0f;
    for (int i = 0; i < fmt::kCode4Size; ++i) code_max = std::max(code_max, std::fabs(code[i]));
    int16_t w16[fmt::kCode4Size];
    for (int i = 0; i < fmt::kCode4Size; ++i) w16[i] = code_max > 0.0f ? to_int16(code[i] / code_max * kCodeOne) : 0;
    dispatch_dtype(a_dtype, [&](auto tag) {
        using E = decltype(tag);
        pack_fixed<E>(static_cast<const typename E::T *>(A), M, K, chunk, code_max, pairs, scale);
    });
    const FixedTable table = fixed_table(w16);
    const auto run = [&](auto avx_vnni) {
        parallel_for(0, (g.N + kGroup - 1) / kGroup, num_threads, grain, [&](int64_t g0, int64_t g1) {
            groups_fixed<decltype(avx_vnni)::value>(g, table, pairs, scale, chunk, M, g0, g1);
        }, &next);
    };
    /* the avx512 build instantiates one variant only */
    avx_vnni_available() ? run(std::bool_constant<kHasAvxVnniPath>{}) : run(std::false_type{});
    return true;
}
#endif

} // namespace

void interleave_4bit(const uint8_t *B, const float *absmax, int64_t N, int64_t K, int64_t blocksize, bool inverse,
                     uint8_t *B_out, float *absmax_out, int num_threads) {
    const int64_t words = K / fmt::kInterleaveWordWeights, blocks = K / blocksize;
    const int64_t grain = std::max<int64_t>(1, kMinElementsPerThread / (kGroup * K));
    parallel_for(0, (N + kGroup - 1) / kGroup, num_threads, grain, [&](int64_t g0, int64_t g1) {
        for (int64_t grp = g0; grp < g1; ++grp) {
            const int64_t n0 = grp * kGroup, r = std::min<int64_t>(kGroup, N - n0);
            transpose_group(B + n0 * (K / 2), B_out + n0 * (K / 2), r, words, inverse);
            transpose_group(reinterpret_cast<const uint8_t *>(absmax + n0 * blocks),
                            reinterpret_cast<uint8_t *>(absmax_out + n0 * blocks), r, blocks, inverse);
        }
    });
}

bool matmul_4bit_interleaved(int32_t a_dtype, const void *A, int64_t M, int64_t K, const uint8_t *B,
                             const float *absmax, const float *code, int64_t N, int64_t blocksize, const void *bias,
                             int32_t bias_dtype, bool fast, int32_t out_dtype, void *out, int num_threads) {
    const int64_t grain = group_grain(M, K);
    const int64_t groups_total = (N + kGroup - 1) / kGroup;
    Gemm g{B, absmax, N, K, K / blocksize, blocksize / fmt::kInterleaveWordWeights, nullptr, bias, bias_dtype,
           out_dtype, out, Vec::table16(code)}; /* A: set below, for the float32 path */
    /* this product streams its absmax and weights; the workers, once their chunks are done,
     * prefetch what the product that followed it last time on this thread streams (call_order.h) */
    const NextStream next =
        follow(B, NextStream{{absmax, B}, {N * g.blocks * static_cast<int64_t>(sizeof(float)), N * (K / 2)}, 2});
#if defined(LOWBIT_INTERLEAVED_AMX)
    if (fast && M >= kAmxMinRows && (cpu_features() & kFeatureAmxBf16) != 0) {
        const int64_t padded = (M + kTileRows - 1) / kTileRows * kTileRows;
        uint16_t *packed = reinterpret_cast<uint16_t *>(thread_scratch(static_cast<size_t>(padded * K / 2)));
        if (packed == nullptr) return false;
        dispatch_dtype(a_dtype, [&](auto tag) {
            using E = decltype(tag);
            pack_tiles<E>(static_cast<const typename E::T *>(A), M, K, packed);
        });
        parallel_for(0, groups_total, num_threads, grain, [&](int64_t g0, int64_t g1) { groups_amx(g, packed, M, g0, g1); }, &next);
        return true;
    }
#endif
#if defined(LOWBIT_INTERLEAVED_FIXED)
    if (fast && fixed_available() && finite_code(code))
        return matmul_fixed(g, a_dtype, A, M, code, blocksize, num_threads, grain, next);
#endif
    (void)fast; /* the scalar build has no fast path: float32 products satisfy that contract too */
    const float *a = static_cast<const float *>(A); /* one row: already in order */
    if (a_dtype != kFloat32 || M > 1) {
        float *packed = thread_scratch(static_cast<size_t>(M * K));
        if (packed == nullptr) return false;
        dispatch_dtype(a_dtype, [&](auto tag) {
            using E = decltype(tag);
            pack_rows<E>(static_cast<const typename E::T *>(A), M, K, packed);
        });
        a = packed;
    }
    g.A = a;
    parallel_for(0, groups_total, num_threads, grain, [&](int64_t g0, int64_t g1) { groups(g, M, g0, g1); }, &next);
    return true;
}

} // namespace LOWBIT_CPU_ISA
} // namespace cpu
} // namespace lowbit
