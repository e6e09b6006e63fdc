/* cpu_kernels.h -- internal C++ interface of the CPU kernels (reached through dispatch.h).
 *
 * Kernels live in namespace lowbit::cpu::LOWBIT_CPU_ISA. CMakeLists.txt compiles each kernel
 * source once per ISA with -DLOWBIT_CPU_ISA=scalar|avx2|avx512 and that ISA's flags, so every
 * build's symbols are distinct, and dispatch.cpp picks one build at run time (kernel_table.cpp
 * lists each build's entry points). Everything a kernel TU defines is either in that namespace or
 * has internal linkage (the format helpers are `static inline`), so ISA-specific code can never
 * leak into another build (library inline code such as std::min, if left out of line, is kept
 * from the lowest ISA at link time: see CMakeLists.txt).
 *
 * Preconditions (checked by the C ABI before calling): dtype in {0,1,2} (lowbit_dtype),
 * quant_type in {0,1} (lowbit_quant_type), blocksize supported, n > 0 (gemv: M, N, K > 0),
 * pointers valid for the sizes below. Kernels do not throw.
 *
 * Memory layout shared by all kernels:
 *   A / out (the float side): n contiguous elements of dtype; fp16 and bf16 are raw uint16 bits.
 *   Blocks: block b covers elements [b*blocksize, min((b+1)*blocksize, n)); the last block may
 *   be shorter (the "tail"). absmax holds ceil(n / blocksize) float32 values, one per block.
 *   4-bit packed: (n+1)/2 bytes; element 2i is the high nibble of byte i, element 2i+1 the low
 *   nibble; an odd n leaves a padding nibble (the code of 0.0) in the low half of the last byte.
 *   Blocksizes are even, so a block starts on a byte boundary and blocks never share a byte.
 *   8-bit: n bytes, one code index per element.
 */
#ifndef LOWBIT_CPU_KERNELS_H
#define LOWBIT_CPU_KERNELS_H

#include <stdint.h>

#include "lowbit_formats.h"

#ifndef LOWBIT_CPU_ISA
#define LOWBIT_CPU_ISA scalar
#endif

namespace lowbit {
namespace optim {
struct Params; /* csrc/common/lowbit_optim.h */
}
namespace cpu {
namespace LOWBIT_CPU_ISA {

/* ---- element types of the float side, numbered as lowbit_dtype ---- */
enum : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct ElemF32 {
    using T = float;
    static inline float load(T v) { return v; }
    static inline T store(float f) { return f; }
};
struct ElemF16 {
    using T = uint16_t; /* IEEE binary16 bits */
    static inline float load(T v) { return fmt::half_bits_to_float(v); }
    static inline T store(float f) { return fmt::float_to_half_bits(f); }
};
struct ElemBF16 {
    using T = uint16_t; /* bfloat16 bits */
    static inline float load(T v) { return fmt::bf16_bits_to_float(v); }
    static inline T store(float f) { return fmt::float_to_bf16_bits(f); }
};

/* Calls fn(ElemXX{}) for a validated dtype. */
template <class Fn>
inline void dispatch_dtype(int32_t dtype, Fn &&fn) {
    switch (dtype) {
    case kFloat16: fn(ElemF16{}); break;
    case kBFloat16: fn(ElemBF16{}); break;
    default: fn(ElemF32{}); break;
    }
}

/* Element i of a float-side array of a validated dtype, widened exactly / stored rounded to
 * nearest even (for kernels that touch a few elements per row, e.g. their outputs and bias). */
inline float load_element(int32_t dtype, const void *p, int64_t i) {
    switch (dtype) {
    case kFloat16: return ElemF16::load(static_cast<const uint16_t *>(p)[i]);
    case kBFloat16: return ElemBF16::load(static_cast<const uint16_t *>(p)[i]);
    default: return static_cast<const float *>(p)[i];
    }
}
inline void store_element(int32_t dtype, void *p, int64_t i, float v) {
    switch (dtype) {
    case kFloat16: static_cast<uint16_t *>(p)[i] = ElemF16::store(v); break;
    case kBFloat16: static_cast<uint16_t *>(p)[i] = ElemBF16::store(v); break;
    default: static_cast<float *>(p)[i] = v; break;
    }
}

/* Number of blocks, ceil(n / blocksize), without overflow. */
inline int64_t num_blocks(int64_t n, int64_t blocksize) {
    return n / blocksize + (n % blocksize != 0 ? 1 : 0);
}

/* ---- 4-bit (quantize_4bit.cpp) ---- */

/* A: n elements -> out: (n+1)/2 packed bytes, absmax: num_blocks floats. */
void quantize_4bit(int32_t dtype, const void *A, int64_t n, int64_t blocksize, int32_t quant_type,
                   uint8_t *out, float *absmax, int num_threads);

/* A: (n+1)/2 packed bytes, absmax: num_blocks floats, code: 16 floats -> out: n elements,
 * out[i] = code[nibble i] * absmax[i / blocksize]. */
void dequantize_4bit(int32_t dtype, const uint8_t *A, const float *absmax, int64_t n,
                     int64_t blocksize, const float *code, void *out, int num_threads);

/* ---- 4-bit matrix-vector product (gemv_4bit.cpp) ---- */

/* out[m, n] = sum_k A[m, k] * code[nibble(n*K + k)] * absmax[(n*K + k) / blocksize], fp32
 * accumulation. A: M x K elements of a_dtype; B: (N*K+1)/2 packed bytes of the (N, K) weight
 * flattened row-major; absmax: num_blocks(N*K) floats; code: 16 floats; out: M x N elements of
 * out_dtype. Meant for a few rows of A (each group of 8 rows is one pass over B). Returns false
 * only when the per-thread activation workspace cannot be allocated (nothing written). */
bool gemv_4bit(int32_t a_dtype, const void *A, int64_t M, int64_t K, const uint8_t *B,
               const float *absmax, const float *code, int64_t N, int64_t blocksize,
               int32_t out_dtype, void *out, int num_threads);

/* ---- the interleaved 4-bit layout (interleaved_4bit.cpp; lowbit_formats.h defines it) ---- */

/* B: the (N*K)/2 packed bytes and absmax: the N*K/blocksize floats of an (N, K) weight with
 * K % blocksize == 0, to the interleaved layout in B_out / absmax_out (inverse: back). Outputs
 * must not overlap the inputs. */
void interleave_4bit(const uint8_t *B, const float *absmax, int64_t N, int64_t K, int64_t blocksize, bool inverse,
                     uint8_t *B_out, float *absmax_out, int num_threads);

/* out[m, n] = sum_k A[m, k] * code[nibble(n, k)] * absmax[n, k / blocksize] (+ bias[n]), float32
 * products and sums rounded once to out_dtype, with B and absmax in the interleaved layout
 * (K % blocksize == 0). A: M x K of a_dtype; bias: N values of bias_dtype or null; out: M x N.
 * fast: the products may be computed in 16-bit fixed point (AVX512-VNNI, AVX2: code values to
 * 2^-13 of the largest, A to 2^-14 of the largest magnitude in each 64 weights, exact integer
 * sums) or, from a few rows of A on, in bf16 on AMX tiles (each weight code * absmax and each
 * element of A rounded once to bf16, float32 sums). Returns false only when the rearranged copy
 * of A cannot be allocated (nothing written). */
bool matmul_4bit_interleaved(int32_t a_dtype, const void *A, int64_t M, int64_t K, const uint8_t *B,
                             const float *absmax, const float *code, int64_t N, int64_t blocksize, const void *bias,
                             int32_t bias_dtype, bool fast, int32_t out_dtype, void *out, int num_threads);

/* ---- 8-bit blockwise (blockwise_8bit.cpp) ---- */

/* code: 256 floats; A: n elements -> out: n bytes, absmax: num_blocks floats.
 * Returns false only when the 64 KiB lookup table cannot be allocated (nothing written). */
bool quantize_blockwise(int32_t dtype, const float *code, const void *A, int64_t n,
                        int64_t blocksize, uint8_t *out, float *absmax, int num_threads);

/* code: 256 floats; A: n bytes, absmax: num_blocks floats -> out: n elements. */
void dequantize_blockwise(int32_t dtype, const float *code, const uint8_t *A, const float *absmax,
                          int64_t n, int64_t blocksize, void *out, int num_threads);

/* ---- LLM.int8 (int8.cpp; per-element math: lowbit_int8.h) ---- */

/* out[m, n] = sum_k A[m, k] * B[n, k], exact in int32 (wrapping mod 2^32 only where the true sum
 * does not fit, as the reference's int32 matmul). A: M x K int8, B: N x K int8, out: M x N int32,
 * all row-major. M, N, K > 0. Returns false only when a per-call buffer of M ints cannot be
 * allocated (nothing written). */
bool int8_linear_matmul(const int8_t *A, int64_t M, int64_t K, const int8_t *B, int64_t N, int32_t *out,
                        int num_threads);

/* Row-wise int8 quantization of A (rows x cols of dtype): row_stats[r] = max |x| over the row's
 * regular elements (|x| >= threshold is an outlier when threshold > 0; threshold already rounded to
 * A's dtype), out = int8_quantize(x, int8_row_scale(row_stats[r])), outliers 0. flags (cols bytes)
 * may be null; when given, it is overwritten with 1 for every column holding an outlier and 0
 * elsewhere, and every element of a flagged column is coded 0. rows, cols > 0. */
void int8_vectorwise_quant(int32_t dtype, const void *A, int64_t rows, int64_t cols, float threshold, int8_t *out,
                           float *row_stats, uint8_t *flags, int num_threads);

/* The same per column: col_stats[c] = max |x| over column c's regular elements, out[r, c] =
 * int8_quantize(x, int8_row_scale(col_stats[c])), outliers 0 (out keeps A's row-major layout). */
void int8_colwise_quant(int32_t dtype, const void *A, int64_t rows, int64_t cols, float threshold, int8_t *out,
                        float *col_stats, int num_threads);

/* out[r, c] = int8_dequant(A[r, c], stats[r], scale), float32. */
void int8_vectorwise_dequant(const int8_t *A, const float *stats, int64_t rows, int64_t cols, float scale, float *out,
                             int num_threads);

/* out[r, c] = to out_dtype(int8_mm_dequant(A[r, c], row_stats[r], col_stats[c], scale) [+ bias[c]]),
 * the bias (cols values of bias_dtype, or null) widened to float32 and added in float32. */
void int8_mm_dequant(const int32_t *A, const float *row_stats, const float *col_stats, int64_t rows, int64_t cols,
                     float scale, const void *bias, int32_t bias_dtype, int32_t out_dtype, void *out,
                     int num_threads);

/* ---- optimizers (optimizers.cpp; arithmetic: csrc/common/lowbit_optim.h) ---- */

/* One 32-bit step over n parameters: g, p n elements of dtype; state1 n floats (2n for ademamix:
 * m1 then m2); state2 n floats (adam, ademamix). optimizer: optim::Optimizer. unorm_vec: 1 float,
 * written when params.trust_ratio. Returns false only when the trust-ratio scratch cannot be
 * allocated (nothing written). */
bool optimizer_update_32bit(int32_t optimizer, int32_t dtype, const void *g, void *p, float *state1,
                            float *state2, int64_t n, const optim::Params &params, float *unorm_vec,
                            int num_threads);

/* One 8-bit blockwise step (256-element blocks): state1 n bytes (2n for ademamix), absmax1
 * num_blocks(n, 256) floats (twice that for ademamix), qmap1 256 floats; state2/absmax2/qmap2 the
 * same for adam and ademamix. Returns false only when the lookup scratch cannot be allocated. */
bool optimizer_update_8bit_blockwise(int32_t optimizer, int32_t dtype, const void *g, void *p,
                                     uint8_t *state1, uint8_t *state2, int64_t n,
                                     const optim::Params &params, const float *qmap1,
                                     const float *qmap2, float *absmax1, float *absmax2,
                                     int num_threads);

} // namespace LOWBIT_CPU_ISA
} // namespace cpu
} // namespace lowbit

#endif /* LOWBIT_CPU_KERNELS_H */
