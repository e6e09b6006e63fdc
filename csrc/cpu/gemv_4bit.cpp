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
 * Scaling. Products are summed in fp32 per lane and multiplied by absmax once per block:
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
 * Threads split the N output rows; each output is computed by one thread in a fixed order, so the
 * result does not depend on the thread count. Rows of A are processed in groups of up to 8 (the
 * accumulators of a group stay in registers), one pass over B per group.
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

/* Independent FMA chains per row of A when a sum runs over many chunks (a whole block), so that a
 * few rows still hide the FMA latency. A sum over one chunk needs one: successive chunks are
 * independent and the out-of-order core overlaps them. */
template <int M>
constexpr int kChains = M == 1 ? 4 : (M == 2 ? 2 : 1);

/* Output rows per pass. With several rows of A, two output rows share every load of A (A comes
 * from L2 half as often); one row when that would not fit the 16 AVX2 registers. */
template <int M>
constexpr int kRowsPerPass = (M == 1 || (W == 8 && M > 4)) ? 1 : 2;

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
    /* tot[r][m] += (sum of the chains) * scale[r] */
    LOWBIT_ALWAYS_INLINE void scale_into(F (&tot)[NB][M], const F (&scale)[NB]) const {
        for (int r = 0; r < NB; ++r)
            for (int m = 0; m < M; ++m) {
                F s = v[r][m][0];
                for (int c = 1; c < R; ++c) s = Vec::add(s, v[r][m][c]);
                tot[r][m] = Vec::fmadd(s, scale[r], tot[r][m]);
            }
    }
};

/* acc += Ap[m][slot S] * decode(dwords[r], slot S) (ap: the chunk in row 0 of the workspace). */
template <int S, int M, int NB, int R>
LOWBIT_ALWAYS_INLINE void dot_slot(const Problem &p, const I (&dwords)[NB], const float *ap, Acc<M, NB, R> &acc) {
    F w[NB];
    for (int r = 0; r < NB; ++r) w[r] = Vec::lookup(p.code, Vec::shift_right<4 * S>(dwords[r]));
    for (int m = 0; m < M; ++m) {
        const F a = Vec::loadu(ap + m * p.ap_row + S * W);
        for (int r = 0; r < NB; ++r) {
            F &c = acc.v[r][m][S % R];
            c = Vec::fmadd(a, w[r], c);
        }
    }
}

/* The 8 slots of one chunk. */
template <int M, int NB, int R, int... S>
LOWBIT_ALWAYS_INLINE void dot_chunk(const Problem &p, const I (&dwords)[NB], const float *ap, Acc<M, NB, R> &acc,
                                    std::integer_sequence<int, S...>) {
    (dot_slot<S>(p, dwords, ap, acc), ...);
}

template <int M, int NB, int R>
LOWBIT_ALWAYS_INLINE void dot_chunk(const Problem &p, const I (&dwords)[NB], const float *ap, Acc<M, NB, R> &acc) {
    dot_chunk(p, dwords, ap, acc, std::make_integer_sequence<int, 8>{});
}

inline void store_out(const Problem &p, int64_t i, float v) {
    switch (p.out_dtype) {
    case kFloat16: static_cast<uint16_t *>(p.out)[i] = ElemF16::store(v); break;
    case kBFloat16: static_cast<uint16_t *>(p.out)[i] = ElemBF16::store(v); break;
    default: static_cast<float *>(p.out)[i] = v; break;
    }
}

template <int M, int NB>
inline void store_rows(const Problem &p, int64_t n, const F (&tot)[NB][M]) {
    for (int r = 0; r < NB; ++r)
        for (int m = 0; m < M; ++m) store_out(p, m * p.N + n + r, Vec::reduce_add(tot[r][m]));
}

/* Output rows n..n+NB-1, K % blocksize == 0, blocksize >= kChunk: whole blocks, then scaled. */
template <int M, int NB>
void pass_blocks(const Problem &p, int64_t n) {
    const int64_t blocks = p.K / p.blocksize;
    F tot[NB][M];
    for (auto &row : tot)
        for (F &t : row) t = Vec::zero();
    for (int64_t b = 0; b < blocks; ++b) {
        Acc<M, NB, kChains<M>> acc;
        acc.clear();
        for (int64_t k = b * p.blocksize; k < (b + 1) * p.blocksize; k += kChunk) {
            I dwords[NB];
            for (int r = 0; r < NB; ++r) dwords[r] = Vec::load_dwords(p.B + ((n + r) * p.K + k) / 2);
            dot_chunk(p, dwords, p.Ap + k, acc);
        }
        F scale[NB];
        for (int r = 0; r < NB; ++r) scale[r] = Vec::set1(p.absmax[(n + r) * blocks + b]);
        acc.scale_into(tot, scale);
    }
    store_rows<M, NB>(p, n, tot);
}

/* Output rows n..n+NB-1, K % 8 == 0: each chunk's lane sums scaled by the per-lane absmax. A
 * row starts at a multiple of 8 weights, so no lane straddles a block edge. kAligned (K %
 * blocksize == 0): every chunk starts where a block does, so the lanes' block pattern is fixed. */
template <int M, int NB, bool kAligned>
void pass_lanes(const Problem &p, int64_t n) {
    const I aligned_blocks = Vec::lane_blocks(0, p.log2bs);
    F tot[NB][M];
    for (auto &row : tot)
        for (F &t : row) t = Vec::zero();
    for (int64_t k = 0; k < p.K; k += kChunk) {
        const int lanes = static_cast<int>(std::min<int64_t>(W, (p.K - k) / 8));
        I dwords[NB];
        F scale[NB];
        for (int r = 0; r < NB; ++r) {
            const int64_t e = (n + r) * p.K + k;
            const int64_t offset = e & (p.blocksize - 1); /* 0 when kAligned */
            const int count = static_cast<int>((offset + 8 * (lanes - 1)) >> p.log2bs) + 1; /* blocks touched */
            dwords[r] = lanes == W ? Vec::load_dwords(p.B + e / 2) : Vec::load_dwords(p.B + e / 2, lanes);
            scale[r] = Vec::absmax_lanes(p.absmax + (e >> p.log2bs),
                                         kAligned ? aligned_blocks : Vec::lane_blocks(offset, p.log2bs), count);
        }
        Acc<M, NB, 1> acc;
        acc.clear();
        dot_chunk(p, dwords, p.Ap + k, acc);
        acc.scale_into(tot, scale);
    }
    store_rows<M, NB>(p, n, tot);
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
