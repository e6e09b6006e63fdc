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

#include <algorithm>
#include <utility>

#include "cpu_kernels.h"
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

/* Output rows per thread: at least this many weights each (a thread start costs ~20-50 us). */
constexpr int64_t kMinWeightsPerThread = int64_t{1} << 18;

/* Rows of A per pass over a group (the totals and block sums of a pass stay in registers). */
constexpr int kPassRows = W == 8 ? 4 : 8;

/* Independent FMA chains per (row of A, vector): one row of A needs two to keep both FMA ports
 * busy; more rows are independent chains themselves. */
template <int M>
constexpr int kChains = M == 1 ? 2 : 1;

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

inline float bias_at(const Gemm &g, int64_t n) {
    switch (g.bias_dtype) {
    case kFloat16: return fmt::half_bits_to_float(static_cast<const uint16_t *>(g.bias)[n]);
    case kBFloat16: return fmt::bf16_bits_to_float(static_cast<const uint16_t *>(g.bias)[n]);
    default: return static_cast<const float *>(g.bias)[n];
    }
}

inline void store_out(const Gemm &g, int64_t i, float v) {
    switch (g.out_dtype) {
    case kFloat16: static_cast<uint16_t *>(g.out)[i] = fmt::float_to_half_bits(v); break;
    case kBFloat16: static_cast<uint16_t *>(g.out)[i] = fmt::float_to_bf16_bits(v); break;
    default: static_cast<float *>(g.out)[i] = v; break;
    }
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
            for (int j = 0; j < lanes[vec]; ++j) {
                const int64_t n = n0 + vec * W + j;
                store_out(g, (m0 + m) * g.N + n, g.bias != nullptr ? lane[j] + bias_at(g, n) : lane[j]);
            }
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
                             int32_t bias_dtype, int32_t out_dtype, void *out, int num_threads) {
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
    const Gemm g{B, absmax, N, K, K / blocksize, blocksize / fmt::kInterleaveWordWeights, a, bias, bias_dtype,
                 out_dtype, out, Vec::table16(code)};
    const int64_t grain = std::max<int64_t>(1, kMinWeightsPerThread / (kGroup * K));
    parallel_for(0, (N + kGroup - 1) / kGroup, num_threads, grain,
                 [&](int64_t g0, int64_t g1) { groups(g, M, g0, g1); });
    return true;
}

} // namespace LOWBIT_CPU_ISA
} // namespace cpu
} // namespace lowbit
