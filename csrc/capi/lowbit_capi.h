/* lowbit C ABI: the only symbols Python loads (through ctypes).
 *
 * No torch headers, no C++ types: raw pointers, element counts and enums, so that one
 * native library serves every torch version and a broken build degrades to the
 * reference backend instead of crashing the import.
 *
 * Every entry point returns a lowbit_status; after LOWBIT_ERR_ARGUMENT, lowbit_last_error() names
 * the argument and what was expected. Python validates arguments first (its messages are the
 * user-facing ones); the checks here make the library safe for any caller: no argument values can
 * make it read or write outside the buffers the caller declared (csrc/common/lowbit_capi_checks.h;
 * csrc/fuzz exercises every entry point under ASan/UBSan).
 *
 * Buffer sizes: every buffer's element count is declared once -- the shape arguments (n; rows x
 * cols; M, K, N) size an op's operands and results, and every other buffer (packed data, absmax,
 * codes, statistics, bias, optimizer state) is followed by its own `<name>_len` (elements of its
 * type) -- and the declarations must agree exactly (e.g. absmax_len == ceil(n / blocksize)).
 *
 * Conventions shared by the quantization entry points (implemented in lowbit_capi.cpp):
 *  - enums, blocksize (32..4096, powers of two; 8-bit blockwise up to LOWBIT_MAX_BLOCKSIZE_8BIT),
 *    sizes (0..2^59) and lengths are checked first
 *    (LOWBIT_ERR_ARGUMENT); then n == 0 returns LOWBIT_OK without touching any pointer (null is
 *    fine for empty tensors); then every pointer must be non-null.
 *  - num_threads <= 1 runs on the calling thread; larger values allow up to that many threads,
 *    but only with at least 2^16 elements per thread. Results never depend on num_threads.
 *  - The caller's FTZ/DAZ or rounding-mode settings are ignored (IEEE round-to-nearest with
 *    subnormals is used, then the caller's state is restored).
 *  - LOWBIT_ERR_UNSUPPORTED from these functions means an internal allocation failed.
 *  - They run the kernels of the current CPU ISA (lowbit_cpu_isa()); every ISA gives the same
 *    bytes, except gemv_4bit, whose fp32 accumulation order depends on the vector width.
 */
#ifndef LOWBIT_CAPI_H
#define LOWBIT_CAPI_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define LOWBIT_API __declspec(dllexport)
#else
#define LOWBIT_API __attribute__((visibility("default")))
#endif

/* Bumped whenever a signature below changes; Python refuses a library with another value. */
#define LOWBIT_ABI_VERSION 4

typedef enum lowbit_status {
    LOWBIT_OK = 0,
    LOWBIT_ERR_ARGUMENT = 1,    /* a size, enum or pointer is out of range */
    LOWBIT_ERR_UNSUPPORTED = 2, /* valid request this build cannot serve */
} lowbit_status;

/* Element type of the floating-point side of an op. */
typedef enum lowbit_dtype {
    LOWBIT_FLOAT32 = 0,
    LOWBIT_FLOAT16 = 1,
    LOWBIT_BFLOAT16 = 2,
} lowbit_dtype;

/* 4-bit codebooks (csrc/common/lowbit_formats.h). Note FP4 code 8 is +0.0, as in bitsandbytes'
 * table (its Python source writes the integer `-0`). */
typedef enum lowbit_quant_type {
    LOWBIT_FP4 = 0,
    LOWBIT_NF4 = 1,
} lowbit_quant_type;

/* Tables exported so that a test can check the Python constants against the C ones. */
typedef enum lowbit_table {
    LOWBIT_TABLE_NF4_CODE = 0,       /* 16 values, code order */
    LOWBIT_TABLE_FP4_CODE = 1,       /* 16 values, code order */
    LOWBIT_TABLE_NF4_MIDPOINTS = 2,  /* 15 values, ascending */
    LOWBIT_TABLE_FP4_MIDPOINTS = 3,  /* 15 values, ascending */
    LOWBIT_TABLE_FP4_ORDER = 4,      /* 16 codes sorted by value (as float) */
    LOWBIT_TABLE_NF4_ORDER = 5,      /* identity (as float) */
    LOWBIT_TABLE_BLOCKSIZES = 6,     /* supported blocksizes (as float) */
    LOWBIT_TABLE_INTERLEAVE = 7,     /* the interleaved layout: rows per group, weights per word, and the
                                        fast product's fixed point: chunk, code one, activation one, tiny chunk */
} lowbit_table;

/* Instruction sets the CPU kernels are built for; higher is wider. */
typedef enum lowbit_isa {
    LOWBIT_ISA_SCALAR = 0, /* portable C++ (baseline x86-64 or any architecture) */
    LOWBIT_ISA_AVX2 = 1,   /* AVX2 + FMA + F16C */
    LOWBIT_ISA_AVX512 = 2, /* AVX-512 F/BW/VL (+ AVX2, FMA, F16C) */
} lowbit_isa;

LOWBIT_API int32_t lowbit_abi_version(void);
/* What the last call on this thread that returned LOWBIT_ERR_ARGUMENT refused, e.g.
 * "lowbit_dequantize_4bit: absmax_len = 3, but ceil(n / blocksize) = 4" ("" before any). */
LOWBIT_API const char *lowbit_last_error(void);
/* Compiler, flags, build type and the CPU ISAs compiled in, one human-readable line. */
LOWBIT_API const char *lowbit_build_info(void);

/* 1 when `isa` is compiled into this library and this CPU and OS can run it (CPUID + XGETBV),
 * else 0 (also for unknown values). Scalar is always supported. */
LOWBIT_API int32_t lowbit_cpu_isa_supported(int32_t isa);
/* The ISA the kernels use now: at load, the best supported one. */
LOWBIT_API int32_t lowbit_cpu_isa(void);
/* Use `isa` for every later call (process-wide). LOWBIT_ERR_ARGUMENT for an unknown value,
 * LOWBIT_ERR_UNSUPPORTED when it is not compiled in or this CPU cannot run it (nothing changes). */
LOWBIT_API int32_t lowbit_set_cpu_isa(int32_t isa);
/* Copies up to `capacity` values of a table into `out`; writes the table length to `*count`. */
LOWBIT_API int32_t lowbit_format_table(int32_t table, float *out, int32_t capacity, int32_t *count);

/* 4-bit blockwise quantization of the n values of `dtype` at A.
 * out: out_len = (n+1)/2 bytes, element 2i in the high nibble of byte i; an odd tail gets a zero
 * low nibble. absmax: absmax_len = ceil(n/blocksize) floats. A block holding NaN or Inf gets a
 * non-finite absmax and zero bytes (Python turns that into a ValueError). */
LOWBIT_API int32_t lowbit_quantize_4bit(int32_t dtype, const void *A, int64_t n, int64_t blocksize,
                                        int32_t quant_type, uint8_t *out, int64_t out_len,
                                        float *absmax, int64_t absmax_len, int32_t num_threads);
/* Inverse: the n values of `dtype` at out, code[nibble] * absmax[block] rounded to nearest even.
 * A: A_len = (n+1)/2 bytes; absmax: ceil(n/blocksize) floats; code: code_len = 16 values
 * (lowbit_format_table(LOWBIT_TABLE_NF4_CODE/FP4_CODE) or any other). */
LOWBIT_API int32_t lowbit_dequantize_4bit(int32_t dtype, const uint8_t *A, int64_t A_len,
                                          const float *absmax, int64_t absmax_len, int64_t blocksize,
                                          const float *code, int64_t code_len, void *out, int64_t n,
                                          int32_t num_threads);

/* 8-bit blockwise quantization of the n values at A against a sorted code of code_len = 256 floats
 * (see lowbit_formats.h for the 65536-bin lookup that defines "nearest"): out_len = n bytes,
 * absmax_len = ceil(n/blocksize) floats. */
LOWBIT_API int32_t lowbit_quantize_blockwise(int32_t dtype, const float *code, int64_t code_len,
                                             const void *A, int64_t n, int64_t blocksize, uint8_t *out,
                                             int64_t out_len, float *absmax, int64_t absmax_len,
                                             int32_t num_threads);
/* Inverse: the n values of `dtype` at out from A_len = n bytes. */
LOWBIT_API int32_t lowbit_dequantize_blockwise(int32_t dtype, const float *code, int64_t code_len,
                                               const uint8_t *A, int64_t A_len, const float *absmax,
                                               int64_t absmax_len, int64_t blocksize, void *out,
                                               int64_t n, int32_t num_threads);

/* out = A @ W.T with W = dequantize_4bit(B) of shape (N, K), without materializing W:
 * out[m, n] = sum_k A[m, k] * code[nibble(n*K + k)] * absmax[(n*K + k) / blocksize], fp32 sums.
 * A: M x K row-major of a_dtype; B: B_len = (N*K+1)/2 packed bytes of W flattened row-major
 * (blocks run over the flat index and may straddle rows); absmax: ceil(N*K/blocksize) floats;
 * code: 16 floats; out: M x N row-major of out_dtype (rounded to nearest even). Made for a few
 * rows: every 8 rows of A are one pass over B. LOWBIT_ERR_ARGUMENT: a dtype or blocksize out of
 * range, M < 0, N < 0, K < 1, M*K, N*K or M*N too large, or a length that disagrees; M == 0 or
 * N == 0 returns LOWBIT_OK without reading any pointer. LOWBIT_ERR_UNSUPPORTED: the workspace
 * could not be allocated. */
LOWBIT_API int32_t lowbit_gemv_4bit(int32_t a_dtype, const void *A, int64_t M, int64_t K,
                                    const uint8_t *B, int64_t B_len, const float *absmax,
                                    int64_t absmax_len, const float *code, int64_t code_len, int64_t N,
                                    int64_t blocksize, int32_t out_dtype, void *out, int32_t num_threads);

/* ---- the interleaved 4-bit layout (CPU inference; defined in lowbit_formats.h) ---------- */
/* Rows in groups of 16, and within a group the 4-byte words of the packed bytes (8 weights each)
 * and the absmax stored transposed; sizes unchanged. Requires K % blocksize == 0. */

/* The packed bytes B (B_len = N*K/2) and absmax (absmax_len = N*K/blocksize floats) of an (N, K)
 * weight to the interleaved layout in B_out / absmax_out (the same lengths: B_out_len,
 * absmax_out_len); inverse = 1: from it, back to the standard layout (bit-exact both ways).
 * Outputs must not overlap inputs. LOWBIT_ERR_ARGUMENT: blocksize out of range, N < 0, K < 1,
 * K % blocksize != 0, N*K too large, inverse not 0 or 1, or a length that disagrees; N == 0 reads
 * no pointer. */
LOWBIT_API int32_t lowbit_interleave_4bit(const uint8_t *B, int64_t B_len, const float *absmax, int64_t absmax_len,
                                          int64_t N, int64_t K, int64_t blocksize, int32_t inverse, uint8_t *B_out,
                                          int64_t B_out_len, float *absmax_out, int64_t absmax_out_len,
                                          int32_t num_threads);

/* How exact a product on the interleaved layout must be. */
typedef enum lowbit_precision {
    LOWBIT_PRECISION_FLOAT32 = 0, /* float32 products and sums (the contract of lowbit_gemv_4bit) */
    LOWBIT_PRECISION_FAST = 1,    /* weights and A may be rounded: 16-bit fixed point or bf16 (docs/design.md) */
} lowbit_precision;

/* out = A @ W.T (+ bias) with W the (N, K) weight whose B and absmax are in the interleaved layout:
 * out[m, n] = sum_k A[m, k] * code[nibble(n, k)] * absmax[n, k / blocksize] (+ bias[n]), rounded
 * once to out_dtype. A: M x K row-major of a_dtype; B: B_len = N*K/2 bytes; absmax: absmax_len =
 * N*K/blocksize floats; code: code_len = 16 floats; bias (bias_len = N values of bias_dtype) is
 * optional (NULL, length 0); out: M x N row-major of out_dtype. Any M. LOWBIT_ERR_ARGUMENT: a
 * dtype, precision or blocksize out of range, K % blocksize != 0, M < 0, N < 0, K < 1, M*K, N*K or
 * M*N too large, or a length that disagrees; M == 0 or N == 0 returns LOWBIT_OK without reading
 * any pointer. LOWBIT_ERR_UNSUPPORTED: a workspace could not be allocated. */
LOWBIT_API int32_t lowbit_matmul_4bit_interleaved(int32_t a_dtype, const void *A, int64_t M, int64_t K,
                                                  const uint8_t *B, int64_t B_len, const float *absmax,
                                                  int64_t absmax_len, const float *code, int64_t code_len, int64_t N,
                                                  int64_t blocksize, const void *bias, int64_t bias_len,
                                                  int32_t bias_dtype, int32_t precision, int32_t out_dtype, void *out,
                                                  int32_t num_threads);

/* ---- CPU extensions -------------------------------------------------------------------- */
/* Optional instruction-set extensions (bit flags) that an ISA build uses where the CPU has them,
 * beyond that ISA's baseline; results never depend on them. */
typedef enum lowbit_cpu_feature {
    LOWBIT_CPU_FEATURE_AVX512_VNNI = 1, /* vpdpbusd in the avx512 int8 GEMM */
    LOWBIT_CPU_FEATURE_AMX_BF16 = 2,    /* AMX tiles in the avx512 interleaved 4-bit product (bf16 precision) */
    LOWBIT_CPU_FEATURE_AVX_VNNI = 4,    /* vpdpwssd on ymm in the avx2 interleaved 4-bit product (fast precision) */
} lowbit_cpu_feature;

/* The features this CPU supports (for an ISA build compiled in). */
LOWBIT_API int32_t lowbit_cpu_features_supported(void);
/* The features in use now: the supported ones within the mask of lowbit_set_cpu_features. */
LOWBIT_API int32_t lowbit_cpu_features(void);
/* Use only the features in `mask` (process-wide; default all). LOWBIT_ERR_ARGUMENT for unknown
 * bits (nothing changes). */
LOWBIT_API int32_t lowbit_set_cpu_features(int32_t mask);

/* ---- LLM.int8 (per-element math: csrc/common/lowbit_int8.h) --------------------------------
 * Matrices are row-major and contiguous. Sizes < 0 (or products too large) are
 * LOWBIT_ERR_ARGUMENT; an empty problem returns LOWBIT_OK without reading any pointer; then
 * every pointer must be non-null (except those documented as optional). */

/* out (M x N int32) = A (M x K int8) @ B (N x K int8).T, exact: 1 <= K <= 2^17 - 1
 * (kInt8MatmulMaxK of lowbit_int8.h), so that no int32 sum can overflow. LOWBIT_ERR_UNSUPPORTED: a
 * buffer of M ints could not be allocated. */
LOWBIT_API int32_t lowbit_int8_linear_matmul(const int8_t *A, int64_t M, int64_t K, const int8_t *B, int64_t N,
                                             int32_t *out, int32_t num_threads);
/* Row-wise quantization of A (rows x cols of dtype): row_stats[r] (row_stats_len = rows) = max |x|
 * over the row's regular elements, out[r, c] = the int8 code (lowbit_int8.h). threshold >= 0 (0 or
 * +Inf: no outliers), already rounded to A's dtype; |x| >= threshold > 0 is an outlier.
 * outlier_flags (outlier_flags_len = cols bytes) is optional (NULL, length 0): when given it
 * receives 1 for every column holding an outlier, 0 elsewhere, and every element of such a column
 * is coded 0; without it only the outlier elements are 0. */
LOWBIT_API int32_t lowbit_int8_vectorwise_quant(int32_t dtype, const void *A, int64_t rows, int64_t cols,
                                                float threshold, int8_t *out, float *row_stats,
                                                int64_t row_stats_len, uint8_t *outlier_flags,
                                                int64_t outlier_flags_len, int32_t num_threads);
/* The same per column (outlier elements 0): col_stats (col_stats_len = cols floats), out in A's layout. */
LOWBIT_API int32_t lowbit_int8_colwise_quant(int32_t dtype, const void *A, int64_t rows, int64_t cols,
                                             float threshold, int8_t *out, float *col_stats, int64_t col_stats_len,
                                             int32_t num_threads);
/* out (float32) = (float(A) * stats[r]) * scale; stats_len = rows. */
LOWBIT_API int32_t lowbit_int8_vectorwise_dequant(const int8_t *A, const float *stats, int64_t stats_len,
                                                  int64_t rows, int64_t cols, float scale, float *out,
                                                  int32_t num_threads);
/* out (out_dtype) = (float(A) * (row_stats[r] * col_stats[c])) * scale [+ float(bias[c])], rounded
 * once to out_dtype; row_stats_len = rows, col_stats_len = cols. bias (bias_len = cols values of
 * bias_dtype) is optional (NULL, length 0). */
LOWBIT_API int32_t lowbit_int8_mm_dequant(const int32_t *A, const float *row_stats, int64_t row_stats_len,
                                          const float *col_stats, int64_t col_stats_len, int64_t rows,
                                          int64_t cols, float scale, const void *bias, int64_t bias_len,
                                          int32_t bias_dtype, int32_t out_dtype, void *out, int32_t num_threads);

/* ---- optimizers (per-element arithmetic: csrc/common/lowbit_optim.h) ----------------------
 * One fused step over the n parameters of one tensor, in place. Formulas, operation order and
 * step scalars are those of lowbit/backends/reference/optimizers.py (aliases resolved by the
 * caller: adamw, lamb -> ADAM; lars -> MOMENTUM). Validation: optimizer, dtype, n, args non-null
 * with step >= 1, the lengths of the states the optimizer uses (LOWBIT_ERR_ARGUMENT; those it
 * does not use are ignored, pointer and length); n == 0 returns LOWBIT_OK without reading any
 * pointer; then every pointer the optimizer uses must be non-null. LOWBIT_ERR_UNSUPPORTED: an
 * internal scratch buffer could not be allocated (nothing written).
 * Non-finite values: csrc/common/lowbit_optim.h (README, "Overflow and non-finite values"). */
typedef enum lowbit_optimizer {
    LOWBIT_OPTIM_ADAM = 0,     /* two states; LAMB with max_unorm > 0 (32-bit) */
    LOWBIT_OPTIM_MOMENTUM = 1, /* one state; LARS with max_unorm > 0 (32-bit) */
    LOWBIT_OPTIM_RMSPROP = 2,  /* one state */
    LOWBIT_OPTIM_ADAGRAD = 3,  /* one state */
    LOWBIT_OPTIM_LION = 4,     /* one state */
    LOWBIT_OPTIM_ADEMAMIX = 5, /* state1 holds two (m1 then m2, n each), plus state2 */
} lowbit_optimizer;

/* The step's hyper-parameters, as the Python floats/ints the reference receives. */
typedef struct lowbit_optim_args {
    double beta1, beta2, beta3, alpha, eps, weight_decay, lr, gnorm_scale;
    int64_t step;                  /* >= 1 */
    double max_unorm, param_norm;  /* 32-bit trust ratio (LAMB/LARS/rmsprop) when max_unorm > 0 */
} lowbit_optim_args;

/* g, p: n values of dtype (p updated); state1: state1_len = n floats (2n for ADEMAMIX); state2:
 * state2_len = n floats (ADAM, ADEMAMIX). unorm_vec: 1 float receiving the update norm, required
 * when max_unorm > 0 for ADAM, MOMENTUM or RMSPROP. */
LOWBIT_API int32_t lowbit_optimizer_update_32bit(int32_t optimizer, int32_t dtype, const void *g, void *p,
                                                 int64_t n, float *state1, int64_t state1_len, float *state2,
                                                 int64_t state2_len, const lowbit_optim_args *args,
                                                 float *unorm_vec, int32_t num_threads);
/* 8-bit blockwise state, 256 values per block: state1 n bytes (2n for ADEMAMIX), absmax1
 * ceil(n/256) floats (twice for ADEMAMIX), qmap1 256 floats (the code, sorted); state2, absmax2,
 * qmap2 likewise for ADAM and ADEMAMIX. Each state is dequantized, updated and requantized exactly
 * as lowbit_quantize_blockwise would quantize the new values. */
LOWBIT_API int32_t lowbit_optimizer_update_8bit_blockwise(
    int32_t optimizer, int32_t dtype, const void *g, void *p, int64_t n, uint8_t *state1, int64_t state1_len,
    uint8_t *state2, int64_t state2_len, const lowbit_optim_args *args, const float *qmap1, int64_t qmap1_len,
    const float *qmap2, int64_t qmap2_len, float *absmax1, int64_t absmax1_len, float *absmax2,
    int64_t absmax2_len, int32_t num_threads);

#ifdef __cplusplus
}
#endif

#endif /* LOWBIT_CAPI_H */
