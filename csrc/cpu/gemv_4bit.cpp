/* gemv_4bit.cpp -- out = A @ dequantize_4bit(B).T for a few rows of A, without dequantizing B.
 *
 *   out[m, n] = sum_k A[m, k] * code[nibble(n*K + k)] * absmax[(n*K + k) / blocksize]
 *
 * B is the packed 4-bit tensor of the (N, K) weight flattened row-major: weight (n, k) is element
 * e = n*K + k, the high nibble of byte e/2 when e is even, the low nibble when odd. Blocks run over
 * e, so a block straddles two rows when K % blocksize != 0.
 *
 * Decoding. B is read 4 bytes (8 weights) per lane, so with Vec::W lanes one load covers a
 * "chunk" of 8W weights: lane j holds weights 8j..8j+7 of the chunk. In a little-endian dword,
 * the nibble at bits [4s, 4s+4) ("slot" s = 0..7) is weight 8j + (s ^ 1) (byte s/2, low nibble =
 * odd element). Shifting the dwords right by 4s and looking the low 4 bits up in the 16 code
 * values held in registers (simd.h: vpermps) decodes slot s of every lane at once. A is rearranged
 * once per call, into a per-thread fp32 workspace, in that same order:
 *
 *   Ap[m][c*8W + s*W + j] = A[m, c*8W + 8j + (s ^ 1)]     (zero past K)
 *
 * so every decoded vector meets its activations with one load and one FMA whatever A's dtype.
 * Nothing of B is written anywhere: the weights exist only in registers.
 *
 * Scaling. With up to 4 rows of A, products are summed in fp32 per lane and the sums multiplied
 * by absmax once per block (kPrescale below: from 5 rows of A on, each decoded vector is first
 * multiplied by its lanes' absmax, as dequantize_4bit does, and the products go straight into
 * the totals; the same number of operations, fewer registers). The absmax pattern per path:
 *   kBlocks        K % blocksize == 0, blocksize >= 8W: whole blocks are summed, then scaled;
 *   kAlignedLanes  K % blocksize == 0, blocksize < 8W (e.g. the default 64 with AVX-512): a chunk
 *                  spans 8W/blocksize whole blocks; its lane sums are scaled by a vector of
 *                  per-lane absmax values, in a pattern fixed for the whole call;
 *   kLanes         other K % 8 == 0: rows start at a multiple of 8 weights, so a lane's 8 weights
 *                  still lie in one block; the per-lane pattern is computed per chunk.
 *                  In both lane paths a row's last chunk may be partial: it is loaded with a lane
 *                  mask (and A's workspace is zero there);
 *   kElements      K % 8 != 0 (rows start mid-byte; rare shapes): element by element, the same
 *                  block-then-scale order.
 * Accumulation order differs from a plain dot product (and FMA rounds once), so results agree
 * with the reference within what the order explains, not bit for bit.
 *
 * Threads split the N output rows; each output is computed by one thread in an order fixed by M
 * alone, so the result does not depend on the thread count. Rows of A are processed in groups of
 * up to 8 (the totals of a group stay in registers), one pass over B per group. Per group size M
 * (the tuning block below): how many output rows share each load of A (1 for M = 1, so that each
 * thread reads B as one sequential stream), how many independent FMA chains a sum is split into,
 * and, for M = 1, a software prefetch one row of B ahead: one row of A decodes ~16 GB/s per
 * core on Zen 4, fast enough that DRAM latency shows when B streams from memory.
 */
#include <stddef.h>

#include <algorithm>
#include <type_traits>
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
constexpr int64_t kChunk = 8 * W; /* weights per 4W-byte load */
constexpr int kMaxRows = 8;       /* rows of A per pass over B */

/* Output rows per thread: at least this many weights each (a thread start costs ~20-50 us). */
constexpr int64_t kMinWeightsPerThread = int64_t{1} << 18;

/* How a row is summed (see the top of this file). */
enum Path { kBlocks, kAlignedLanes, kLanes, kElements };

/* Tuning, per number of rows of A (M). Everything here depends on M only, never on how many
 * output rows share a pass, so every output is summed in the same order wherever the threads'
 * ranges start (the result does not depend on the thread count).
 *
 * kChains: independent FMA chains per (output row, row of A). A sum over a chunk or a block is
 * split by slot into R partial sums (slot S feeds chain S % R), so that a few rows of A still keep
 * both FMA pipes busy instead of waiting on one chain's latency. */
template <int M>
constexpr int kChains = M <= 2 ? 2 : 1;

/* kPrescale: with many rows of A, the decoded weights are multiplied by their absmax first (one
 * multiply per vector of weights, as dequantize_4bit does) and every product goes straight into
 * the row's total: the same number of vector operations as scaling each row's chunk sum, without
 * the M per-chunk accumulators (registers for a second output row instead). */
template <int M>
constexpr bool kPrescale = M >= 5;

/* Output rows per pass (NB). The decoded weights of NB rows of B meet each load of A, so A (M
 * rows, 4 bytes per weight: beyond L1 from M = 2 on) is read once per NB output rows; bounded by
 * the registers (NB * M totals, NB * M * R accumulators unless kPrescale, NB dwords and scales,
 * the code table: 32 vector registers with AVX-512, 16 with AVX2). One row of A reads B as a single
 * sequential stream, which the hardware prefetchers follow best when B comes from DRAM
 * (several interleaved streams 2 KiB apart measured up to 2x slower on AMD Zen 4). */
template <int M>
constexpr int kRowsPerPass = M == 1 || W < 16 ? 1 : 2;

/* Bytes of B prefetched ahead of each row's reads with one row of A, where the loop is fast
 * enough for DRAM latency to show past the hardware prefetcher (more rows of A are bound by the
 * FMAs, and the extra loads only cost them). */
template <int M>
constexpr int64_t kPrefetchBytes = M == 1 ? 2048 : 0;

struct Problem {
    const uint8_t *B;
    const float *absmax;
    Vec::Table16 code;
    const float *code16;
    int64_t N, K, blocksize;
    int log2bs;
    const float *Ap; /* workspace: row m of the group at Ap + m * ap_row */
    int64_t ap_row;
    int32_t out_dtype;
    void *out; /* row m of the group at element m * N */
};

/* Sums of NB output rows x M rows of A, R partial sums each. */
template <int M, int NB, int R>
struct Acc {
    F v[NB][M][R];

    LOWBIT_ALWAYS_INLINE void clear() {
        for (auto &row : v)
            for (auto &chains : row)
                for (F &a : chains) a = Vec::zero();
    }
    /* tot[r][m][0] += (sum of the chains) * scale[r] */
    LOWBIT_ALWAYS_INLINE void scale_into(Acc &tot, const F (&scale)[NB]) const {
        for (int r = 0; r < NB; ++r)
            for (int m = 0; m < M; ++m) tot.v[r][m][0] = Vec::fmadd(chains_sum(r, m), scale[r], tot.v[r][m][0]);
    }
    LOWBIT_ALWAYS_INLINE F chains_sum(int r, int m) const {
        F s = v[r][m][0];
        for (int c = 1; c < R; ++c) s = Vec::add(s, v[r][m][c]);
        return s;
    }
};

/* acc += Ap[m][slot S] * w[r] with w[r] = decode(dwords[r], slot S), times scale[r] when
 * kPrescale (ap: the chunk in row 0 of the workspace). */
template <int S, bool kPrescale, int M, int NB, int R>
LOWBIT_ALWAYS_INLINE void dot_slot(const Problem &p, const I (&dwords)[NB], const F (&scale)[NB], const float *ap,
                                   Acc<M, NB, R> &acc) {
    F w[NB];
    for (int r = 0; r < NB; ++r) {
        w[r] = Vec::lookup(p.code, Vec::shift_right<4 * S>(dwords[r]));
        if (kPrescale) w[r] = Vec::mul(w[r], scale[r]);
    }
    for (int m = 0; m < M; ++m) {
        const F a = Vec::loadu(ap + m * p.ap_row + S * W);
        for (int r = 0; r < NB; ++r) {
            F &c = acc.v[r][m][S % R];
            c = Vec::fmadd(a, w[r], c);
        }
    }
}

/* The 8 slots of one chunk. */
template <bool kPrescale, int M, int NB, int R, int... S>
LOWBIT_ALWAYS_INLINE void dot_chunk(const Problem &p, const I (&dwords)[NB], const F (&scale)[NB], const float *ap,
                                    Acc<M, NB, R> &acc, std::integer_sequence<int, S...>) {
    (dot_slot<S, kPrescale>(p, dwords, scale, ap, acc), ...);
}

/* One chunk of NB rows: into tot directly (kPrescale), else summed apart, then scaled into tot. */
template <int M, int NB, int R>
LOWBIT_ALWAYS_INLINE void dot_chunk(const Problem &p, const I (&dwords)[NB], const F (&scale)[NB], const float *ap,
                                    Acc<M, NB, R> &tot) {
    if constexpr (kPrescale<M>) {
        dot_chunk<true>(p, dwords, scale, ap, tot, std::make_integer_sequence<int, 8>{});
    } else {
        Acc<M, NB, R> acc;
        acc.clear();
        dot_chunk<false>(p, dwords, scale, ap, acc, std::make_integer_sequence<int, 8>{});
        acc.scale_into(tot, scale);
    }
}

inline void store_out(const Problem &p, int64_t i, float v) { store_element(p.out_dtype, p.out, i, v); }

template <int M, int NB, int R>
inline void store_rows(const Problem &p, int64_t n, const Acc<M, NB, R> &tot) {
    for (int r = 0; r < NB; ++r)
        for (int m = 0; m < M; ++m) store_out(p, m * p.N + n + r, Vec::reduce_add(tot.chains_sum(r, m)));
}

/* The dwords of a row of B at weight k of the row (the first `lanes` only when kPartial),
 * prefetching kPrefetchBytes ahead (past the row's end is fine: a prefetch never faults). */
template <int M, bool kPartial>
LOWBIT_ALWAYS_INLINE I row_dwords(const uint8_t *row, int64_t k, int lanes) {
    if (kPrefetchBytes<M> > 0) prefetch(reinterpret_cast<uintptr_t>(row) + static_cast<uintptr_t>(k / 2 + kPrefetchBytes<M>));
    return kPartial ? Vec::load_dwords(row + k / 2, lanes) : Vec::load_dwords(row + k / 2);
}

/* Output rows n..n+NB-1, K % blocksize == 0, blocksize >= kChunk: whole blocks, then scaled. */
template <int M, int NB>
void pass_blocks(const Problem &p, int64_t n) {
    constexpr int R = kChains<M>;
    const int64_t blocks = p.K / p.blocksize;
    Acc<M, NB, R> tot;
    tot.clear();
    for (int64_t b = 0; b < blocks; ++b) {
        F scale[NB];
        for (int r = 0; r < NB; ++r) scale[r] = Vec::set1(p.absmax[(n + r) * blocks + b]);
        Acc<M, NB, R> acc;
        Acc<M, NB, R> &sums = kPrescale<M> ? tot : acc; /* kPrescale: weights scaled, summed into tot */
        if (!kPrescale<M>) acc.clear();
        for (int64_t k = b * p.blocksize; k < (b + 1) * p.blocksize; k += kChunk) {
            I dwords[NB];
            for (int r = 0; r < NB; ++r) dwords[r] = row_dwords<M, false>(p.B + (n + r) * p.K / 2, k, W);
            dot_chunk<kPrescale<M>>(p, dwords, scale, p.Ap + k, sums, std::make_integer_sequence<int, 8>{});
        }
        if (!kPrescale<M>) acc.scale_into(tot, scale);
    }
    store_rows(p, n, tot);
}

/* One chunk of pass_lanes at weight k of the rows. */
template <int M, int NB, int R, bool kAligned, bool kPartial>
LOWBIT_ALWAYS_INLINE void lanes_chunk(const Problem &p, int64_t n, int64_t k, I aligned_blocks, int aligned_count,
                                      Acc<M, NB, R> &tot) {
    const int lanes = kPartial ? static_cast<int>((p.K - k) / 8) : W;
    I dwords[NB];
    F scale[NB];
    for (int r = 0; r < NB; ++r) {
        const int64_t e = (n + r) * p.K + k;
        dwords[r] = row_dwords<M, kPartial>(p.B + (n + r) * p.K / 2, k, lanes);
        const float *absmax = p.absmax + (e >> p.log2bs);
        if (kAligned && !kPartial) {
            scale[r] = Vec::absmax_lanes(absmax, aligned_blocks, aligned_count);
        } else {
            const int64_t offset = e & (p.blocksize - 1); /* 0 when kAligned */
            const int count = static_cast<int>((offset + 8 * (lanes - 1)) >> p.log2bs) + 1; /* blocks touched */
            scale[r] = Vec::absmax_lanes(absmax, kAligned ? aligned_blocks : Vec::lane_blocks(offset, p.log2bs), count);
        }
    }
    dot_chunk(p, dwords, scale, p.Ap + k, tot);
}

/* Output rows n..n+NB-1, K % 8 == 0: each chunk's lane sums scaled by the per-lane absmax. A
 * row starts at a multiple of 8 weights, so no lane straddles a block edge. kAligned (K %
 * blocksize == 0): every chunk starts where a block does, so the lanes' block pattern is fixed
 * and a whole chunk always touches kChunk / blocksize blocks. */
template <int M, int NB, bool kAligned>
void pass_lanes(const Problem &p, int64_t n) {
    constexpr int R = kChains<M>;
    const I aligned_blocks = Vec::lane_blocks(0, p.log2bs);
    const int aligned_count = static_cast<int>(kChunk >> p.log2bs);
    Acc<M, NB, R> tot;
    tot.clear();
    const int64_t whole = p.K - p.K % kChunk;
    for (int64_t k = 0; k < whole; k += kChunk)
        lanes_chunk<M, NB, R, kAligned, false>(p, n, k, aligned_blocks, aligned_count, tot);
    if (whole < p.K) lanes_chunk<M, NB, R, kAligned, true>(p, n, whole, aligned_blocks, aligned_count, tot);
    store_rows(p, n, tot);
}

/* Output rows [n0, n1): passes of kRowsPerPass<M> rows, then single rows. */
template <int M, Path kPath>
void rows_vector(const Problem &p, int64_t n0, int64_t n1) {
    auto pass = [&](auto nb, int64_t n) {
        constexpr int NB = decltype(nb)::value;
        if constexpr (kPath == kBlocks) pass_blocks<M, NB>(p, n);
        else pass_lanes<M, NB, kPath == kAlignedLanes>(p, n);
    };
    constexpr int NB = kRowsPerPass<M>;
    int64_t n = n0;
    for (; n + NB <= n1; n += NB) pass(std::integral_constant<int, NB>{}, n);
    for (; n < n1; ++n) pass(std::integral_constant<int, 1>{}, n);
}

/* Any K: element by element (Ap holds A in its natural order). */
template <int M>
void rows_elements(const Problem &p, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
        const int64_t e0 = n * p.K;
        float tot[M] = {};
        for (int64_t k = 0; k < p.K;) {
            const int64_t b = (e0 + k) >> p.log2bs;
            const int64_t end = std::min(p.K, ((b + 1) << p.log2bs) - e0);
            float acc[M] = {};
            for (; k < end; ++k) {
                const int64_t e = e0 + k;
                const unsigned byte = p.B[e / 2];
                const float w = p.code16[(e & 1) ? (byte & 15u) : (byte >> 4)];
                for (int m = 0; m < M; ++m) acc[m] += p.Ap[m * p.ap_row + k] * w;
            }
            for (int m = 0; m < M; ++m) tot[m] += acc[m] * p.absmax[b];
        }
        for (int m = 0; m < M; ++m) store_out(p, m * p.N + n, tot[m]);
    }
}

/* Rows [m0, m0 + rows) of A as fp32 into ap, in the order the path reads them. */
template <class E>
void pack_rows(const typename E::T *A, int64_t K, int rows, Path path, float *ap, int64_t ap_row) {
    for (int m = 0; m < rows; ++m) {
        const typename E::T *a = A + m * K;
        float *dst = ap + m * ap_row;
        if (path == kElements) {
            for (int64_t k = 0; k < K; ++k) dst[k] = E::load(a[k]);
            continue;
        }
        for (int64_t c = 0; c < ap_row; c += kChunk)
            for (int s = 0; s < 8; ++s)
                for (int j = 0; j < W; ++j) {
                    const int64_t k = c + 8 * j + (s ^ 1);
                    dst[c + s * W + j] = k < K ? E::load(a[k]) : 0.0f;
                }
    }
}

/* Calls fn(std::integral_constant<int, rows>{}) for rows in 1..kMaxRows. */
template <class Fn>
inline void dispatch_rows(int rows, Fn &&fn) {
    switch (rows) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 5: fn(std::integral_constant<int, 5>{}); break;
    case 6: fn(std::integral_constant<int, 6>{}); break;
    case 7: fn(std::integral_constant<int, 7>{}); break;
    default: fn(std::integral_constant<int, 8>{}); break;
    }
}

inline size_t dtype_size(int32_t dtype) { return dtype == kFloat32 ? 4 : 2; }

} // namespace

bool gemv_4bit(int32_t a_dtype, const void *A, int64_t M, int64_t K, const uint8_t *B,
               const float *absmax, const float *code, int64_t N, int64_t blocksize,
               int32_t out_dtype, void *out, int num_threads) {
    const Path path = K % blocksize == 0 ? (blocksize >= kChunk ? kBlocks : kAlignedLanes)
                                         : (K % 8 == 0 ? kLanes : kElements);
    const int64_t ap_row = path == kElements ? K : (K + kChunk - 1) / kChunk * kChunk;
    float *ap = thread_scratch(static_cast<size_t>(std::min<int64_t>(M, kMaxRows) * ap_row));
    if (ap == nullptr) return false;

    int log2bs = 0;
    while ((int64_t{1} << log2bs) < blocksize) ++log2bs;
    Problem p{B, absmax, Vec::table16(code), code, N, K, blocksize, log2bs, ap, ap_row, out_dtype, out};
    const int64_t grain = std::max<int64_t>(1, kMinWeightsPerThread / K);

    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, M - m0));
        dispatch_dtype(a_dtype, [&](auto tag) {
            using E = decltype(tag);
            pack_rows<E>(static_cast<const typename E::T *>(A) + m0 * K, K, rows, path, ap, ap_row);
        });
        p.out = static_cast<char *>(out) + static_cast<size_t>(m0 * N) * dtype_size(out_dtype);
        dispatch_rows(rows, [&](auto r) {
            constexpr int R = decltype(r)::value;
            void (*run)(const Problem &, int64_t, int64_t) = path == kBlocks        ? rows_vector<R, kBlocks>
                                                             : path == kAlignedLanes ? rows_vector<R, kAlignedLanes>
                                                             : path == kLanes        ? rows_vector<R, kLanes>
                                                                                     : rows_elements<R>;
            parallel_for(0, N, num_threads, grain, [&](int64_t lo, int64_t hi) { run(p, lo, hi); });
        });
    }
    return true;
}

} // namespace LOWBIT_CPU_ISA
} // namespace cpu
} // namespace lowbit
