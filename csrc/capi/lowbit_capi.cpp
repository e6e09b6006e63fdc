/* lowbit_capi.cpp -- the extern "C" entry points of liblowbit_cpu (declared in lowbit_capi.h).
 *
 * Each entry point: validates its arguments (second line of defence; Python validates first),
 * pins the floating-point environment (FpEnvGuard: round-to-nearest, no FTZ/DAZ), and calls the
 * kernel of the current CPU ISA (csrc/cpu/dispatch.h). No C++ exception ever crosses this boundary: anything unexpected becomes
 * LOWBIT_ERR_UNSUPPORTED (the only failure a kernel can have is running out of memory).
 *
 * Validation order (csrc/common/lowbit_capi_checks.h): enums, blocksize and sizes first, then the
 * declared buffer lengths against the shape; then an empty problem returns LOWBIT_OK without
 * looking at the pointers (torch may hand out null data pointers for empty tensors); then every
 * pointer must be non-null. A refusal returns LOWBIT_ERR_ARGUMENT with lowbit_last_error() set.
 */
#include "lowbit_capi.h"

#include <stdio.h>

#include "dispatch.h"
#include "fp_env.h"
#include "huge_pages.h"
#include "lowbit_capi_checks.h"
#include "lowbit_formats.h"
#include "lowbit_int8.h"
#include "lowbit_optim.h"

#ifndef LOWBIT_BUILD_INFO
#define LOWBIT_BUILD_INFO "unknown build (LOWBIT_BUILD_INFO not defined)"
#endif

namespace {

namespace fmt = lowbit::fmt;
using namespace lowbit::capi;
using lowbit::cpu::advise_huge_pages;
using lowbit::cpu::kernels;

static_assert(int{LOWBIT_ISA_SCALAR} == int{lowbit::cpu::kIsaScalar} &&
                  int{LOWBIT_ISA_AVX2} == int{lowbit::cpu::kIsaAvx2} &&
                  int{LOWBIT_ISA_AVX512} == int{lowbit::cpu::kIsaAvx512},
              "lowbit_isa and lowbit::cpu::Isa must agree");
static_assert(int{LOWBIT_OPTIM_ADAM} == int{lowbit::optim::kAdam} &&
                  int{LOWBIT_OPTIM_MOMENTUM} == int{lowbit::optim::kMomentum} &&
                  int{LOWBIT_OPTIM_RMSPROP} == int{lowbit::optim::kRmsprop} &&
                  int{LOWBIT_OPTIM_ADAGRAD} == int{lowbit::optim::kAdagrad} &&
                  int{LOWBIT_OPTIM_LION} == int{lowbit::optim::kLion} &&
                  int{LOWBIT_OPTIM_ADEMAMIX} == int{lowbit::optim::kAdemamix},
              "lowbit_optimizer and lowbit::optim::Optimizer must agree");
static_assert(LOWBIT_FLOAT32 == 0 && LOWBIT_FLOAT16 == 1 && LOWBIT_BFLOAT16 == 2 && int{LOWBIT_FP4} == fmt::kFP4 &&
                  int{LOWBIT_NF4} == fmt::kNF4,
              "lowbit_dtype / lowbit_quant_type and the checks of lowbit_capi_checks.h must agree");

thread_local char g_last_error[512] = "";

/* Stores the refusal for lowbit_last_error() and returns LOWBIT_ERR_ARGUMENT. */
int32_t refuse(const ArgCheck &check) {
    snprintf(g_last_error, sizeof g_last_error, "%s", check.message());
    return LOWBIT_ERR_ARGUMENT;
}

template <class Fn>
int32_t guarded(Fn &&fn) {
    try {
        lowbit::cpu::FpEnvGuard env;
        return fn();
    } catch (...) {
        return LOWBIT_ERR_UNSUPPORTED;
    }
}

/* Copies a table into out (up to capacity), reports its length. */
template <class T>
void copy_table(const T *src, int32_t len, float *out, int32_t capacity, int32_t *count) {
    for (int32_t i = 0; i < len && i < capacity; ++i) out[i] = static_cast<float>(src[i]);
    *count = len;
}

/* N, K and blocksize of a weight in the interleaved layout: whole blocks per row, N * K bounded. */
ArgCheck &check_interleaved_weight(ArgCheck &c, int64_t N, int64_t K, int64_t blocksize) {
    check_blocksize(c, blocksize).count("N", N).count("K", K)
        .expect(K >= 1, "K = %lld must be >= 1", static_cast<long long>(K));
    if (c.failed()) return c;
    return c.expect(K % blocksize == 0, "K = %lld is not a multiple of blocksize = %lld (the interleaved layout)",
                    static_cast<long long>(K), static_cast<long long>(blocksize))
        .product("N", N, "K", K);
}
/* Lengths of the packed bytes and the absmax of that weight (the layout keeps the sizes). */
ArgCheck &check_interleaved_lengths(ArgCheck &c, const char *bytes_name, int64_t bytes_len, const char *absmax_name,
                                    int64_t absmax_len, int64_t N, int64_t K, int64_t blocksize) {
    return c.length(bytes_name, bytes_len, N * K / 2, "N * K / 2")
        .length(absmax_name, absmax_len, N * K / blocksize, "N * K / blocksize");
}

lowbit::optim::Params optim_params(int32_t optimizer, const lowbit_optim_args &a) {
    return lowbit::optim::make_params(optimizer, a.beta1, a.beta2, a.beta3, a.alpha, a.eps, a.weight_decay, a.lr,
                                      a.gnorm_scale, a.step, a.max_unorm, a.param_norm);
}

} // namespace

extern "C" {

LOWBIT_API int32_t lowbit_abi_version(void) { return LOWBIT_ABI_VERSION; }

LOWBIT_API const char *lowbit_last_error(void) { return g_last_error; }

LOWBIT_API const char *lowbit_build_info(void) { return LOWBIT_BUILD_INFO; }

LOWBIT_API int32_t lowbit_cpu_isa_supported(int32_t isa) {
    return lowbit::cpu::isa_supported(isa) ? 1 : 0;
}

LOWBIT_API int32_t lowbit_cpu_isa(void) { return lowbit::cpu::current_isa(); }

LOWBIT_API int32_t lowbit_set_cpu_isa(int32_t isa) {
    ArgCheck c("lowbit_set_cpu_isa");
    if (c.enumeration("isa", isa, isa >= 0 && isa < lowbit::cpu::kNumIsas, "0 (scalar), 1 (avx2), 2 (avx512)").failed())
        return refuse(c);
    return lowbit::cpu::set_isa(isa) ? LOWBIT_OK : LOWBIT_ERR_UNSUPPORTED;
}

LOWBIT_API int32_t lowbit_format_table(int32_t table, float *out, int32_t capacity, int32_t *count) {
    ArgCheck c("lowbit_format_table");
    c.pointer("count", count).expect(capacity >= 0, "capacity = %d must be >= 0", static_cast<int>(capacity));
    if (capacity > 0) c.pointer("out", out);
    if (c.failed()) return refuse(c);
    switch (table) {
    case LOWBIT_TABLE_NF4_CODE: copy_table(fmt::kNF4Code, fmt::kCode4Size, out, capacity, count); break;
    case LOWBIT_TABLE_FP4_CODE: copy_table(fmt::kFP4Code, fmt::kCode4Size, out, capacity, count); break;
    case LOWBIT_TABLE_NF4_MIDPOINTS:
        copy_table(fmt::kNF4Midpoints, fmt::kMidpoint4Size, out, capacity, count);
        break;
    case LOWBIT_TABLE_FP4_MIDPOINTS:
        copy_table(fmt::kFP4Midpoints, fmt::kMidpoint4Size, out, capacity, count);
        break;
    case LOWBIT_TABLE_FP4_ORDER: copy_table(fmt::kFP4Order, fmt::kCode4Size, out, capacity, count); break;
    case LOWBIT_TABLE_NF4_ORDER: copy_table(fmt::kNF4Order, fmt::kCode4Size, out, capacity, count); break;
    case LOWBIT_TABLE_BLOCKSIZES:
        copy_table(fmt::kBlocksizes, fmt::kNumBlocksizes, out, capacity, count);
        break;
    case LOWBIT_TABLE_INTERLEAVE: {
        const float layout[] = {fmt::kInterleaveRows, fmt::kInterleaveWordWeights, fmt::kFixedChunk,
                                fmt::kFixedCodeOne,  fmt::kFixedActivationOne,   fmt::kFixedTinyChunk};
        copy_table(layout, 6, out, capacity, count);
        break;
    }
    default: return refuse(c.enumeration("table", table, false, "0 .. 7 (lowbit_table)"));
    }
    return LOWBIT_OK;
}

LOWBIT_API int32_t lowbit_quantize_4bit(int32_t dtype, const void *A, int64_t n, int64_t blocksize,
                                        int32_t quant_type, uint8_t *out, int64_t out_len,
                                        float *absmax, int64_t absmax_len, int32_t num_threads) {
    ArgCheck c("lowbit_quantize_4bit");
    if (check_quant_type(check_blockwise(c, dtype, n, blocksize), quant_type).failed()) return refuse(c);
    c.length("out_len", out_len, packed4_len(n), "(n + 1) / 2")
        .length("absmax_len", absmax_len, num_blocks(n, blocksize), "ceil(n / blocksize)");
    if (c.failed()) return refuse(c);
    if (n == 0) return LOWBIT_OK;
    if (c.pointer("A", A).pointer("out", out).pointer("absmax", absmax).failed()) return refuse(c);
    return guarded([&] {
        kernels().quantize_4bit(dtype, A, n, blocksize, quant_type, out, absmax, num_threads);
        return int32_t{LOWBIT_OK};
    });
}

LOWBIT_API int32_t lowbit_dequantize_4bit(int32_t dtype, const uint8_t *A, int64_t A_len,
                                          const float *absmax, int64_t absmax_len, int64_t blocksize,
                                          const float *code, int64_t code_len, void *out, int64_t n,
                                          int32_t num_threads) {
    ArgCheck c("lowbit_dequantize_4bit");
    if (check_blockwise(c, dtype, n, blocksize).failed()) return refuse(c);
    c.length("A_len", A_len, packed4_len(n), "(n + 1) / 2")
        .length("absmax_len", absmax_len, num_blocks(n, blocksize), "ceil(n / blocksize)")
        .length("code_len", code_len, fmt::kCode4Size, "the size of a 4-bit code");
    if (c.failed()) return refuse(c);
    if (n == 0) return LOWBIT_OK;
    if (c.pointer("A", A).pointer("absmax", absmax).pointer("code", code).pointer("out", out).failed())
        return refuse(c);
    return guarded([&] {
        kernels().dequantize_4bit(dtype, A, absmax, n, blocksize, code, out, num_threads);
        return int32_t{LOWBIT_OK};
    });
}

LOWBIT_API int32_t lowbit_quantize_blockwise(int32_t dtype, const float *code, int64_t code_len,
                                             const void *A, int64_t n, int64_t blocksize, uint8_t *out,
                                             int64_t out_len, float *absmax, int64_t absmax_len,
                                             int32_t num_threads) {
    ArgCheck c("lowbit_quantize_blockwise");
    if (check_blockwise_8bit(c, dtype, n, blocksize).failed()) return refuse(c);
    c.length("code_len", code_len, fmt::kCode8Size, "the size of an 8-bit code")
        .length("out_len", out_len, n, "n")
        .length("absmax_len", absmax_len, num_blocks(n, blocksize), "ceil(n / blocksize)");
    if (c.failed()) return refuse(c);
    if (n == 0) return LOWBIT_OK;
    if (c.pointer("code", code).pointer("A", A).pointer("out", out).pointer("absmax", absmax).failed())
        return refuse(c);
    return guarded([&] {
        const bool ok = kernels().quantize_blockwise(dtype, code, A, n, blocksize, out, absmax, num_threads);
        return int32_t{ok ? LOWBIT_OK : LOWBIT_ERR_UNSUPPORTED};
    });
}

LOWBIT_API int32_t lowbit_dequantize_blockwise(int32_t dtype, const float *code, int64_t code_len,
                                               const uint8_t *A, int64_t A_len, const float *absmax,
                                               int64_t absmax_len, int64_t blocksize, void *out,
                                               int64_t n, int32_t num_threads) {
    ArgCheck c("lowbit_dequantize_blockwise");
    if (check_blockwise_8bit(c, dtype, n, blocksize).failed()) return refuse(c);
    c.length("code_len", code_len, fmt::kCode8Size, "the size of an 8-bit code")
        .length("A_len", A_len, n, "n")
        .length("absmax_len", absmax_len, num_blocks(n, blocksize), "ceil(n / blocksize)");
    if (c.failed()) return refuse(c);
    if (n == 0) return LOWBIT_OK;
    if (c.pointer("code", code).pointer("A", A).pointer("absmax", absmax).pointer("out", out).failed())
        return refuse(c);
    return guarded([&] {
        kernels().dequantize_blockwise(dtype, code, A, absmax, n, blocksize, out, num_threads);
        return int32_t{LOWBIT_OK};
    });
}

LOWBIT_API int32_t lowbit_gemv_4bit(int32_t a_dtype, const void *A, int64_t M, int64_t K,
                                    const uint8_t *B, int64_t B_len, const float *absmax,
                                    int64_t absmax_len, const float *code, int64_t code_len, int64_t N,
                                    int64_t blocksize, int32_t out_dtype, void *out, int32_t num_threads) {
    ArgCheck c("lowbit_gemv_4bit");
    check_dtype(c, "a_dtype", a_dtype);
    check_blocksize(check_dtype(c, "out_dtype", out_dtype), blocksize)
        .count("M", M).count("N", N).count("K", K)
        .expect(K >= 1, "K = %lld must be >= 1", static_cast<long long>(K));
    if (c.failed()) return refuse(c);
    c.product("M", M, "K", K).product("N", N, "K", K).product("M", M, "N", N);
    if (c.failed()) return refuse(c);
    c.length("B_len", B_len, packed4_len(N * K), "(N * K + 1) / 2")
        .length("absmax_len", absmax_len, num_blocks(N * K, blocksize), "ceil(N * K / blocksize)")
        .length("code_len", code_len, fmt::kCode4Size, "the size of a 4-bit code");
    if (c.failed()) return refuse(c);
    if (M == 0 || N == 0) return LOWBIT_OK;
    if (c.pointer("A", A).pointer("B", B).pointer("absmax", absmax).pointer("code", code).pointer("out", out).failed())
        return refuse(c);
    return guarded([&] {
        const bool ok = kernels().gemv_4bit(a_dtype, A, M, K, B, absmax, code, N, blocksize, out_dtype,
                                            out, num_threads);
        return int32_t{ok ? LOWBIT_OK : LOWBIT_ERR_UNSUPPORTED};
    });
}

LOWBIT_API int32_t lowbit_interleave_4bit(const uint8_t *B, int64_t B_len, const float *absmax, int64_t absmax_len,
                                          int64_t N, int64_t K, int64_t blocksize, int32_t inverse, uint8_t *B_out,
                                          int64_t B_out_len, float *absmax_out, int64_t absmax_out_len,
                                          int32_t num_threads) {
    ArgCheck c("lowbit_interleave_4bit");
    check_interleaved_weight(c, N, K, blocksize)
        .enumeration("inverse", inverse, inverse == 0 || inverse == 1, "0 (to the interleaved layout), 1 (back)");
    if (c.failed()) return refuse(c);
    check_interleaved_lengths(c, "B_len", B_len, "absmax_len", absmax_len, N, K, blocksize);
    if (check_interleaved_lengths(c, "B_out_len", B_out_len, "absmax_out_len", absmax_out_len, N, K, blocksize)
            .failed())
        return refuse(c);
    if (N == 0) return LOWBIT_OK;
    if (c.pointer("B", B).pointer("absmax", absmax).pointer("B_out", B_out).pointer("absmax_out", absmax_out).failed())
        return refuse(c);
    return guarded([&] {
        if (inverse == 0) { /* the layout products stream: before the writes below touch its pages */
            advise_huge_pages(B_out, static_cast<size_t>(B_out_len));
            advise_huge_pages(absmax_out, static_cast<size_t>(absmax_out_len) * sizeof(float));
        }
        kernels().interleave_4bit(B, absmax, N, K, blocksize, inverse != 0, B_out, absmax_out, num_threads);
        return int32_t{LOWBIT_OK};
    });
}

LOWBIT_API int32_t lowbit_matmul_4bit_interleaved(int32_t a_dtype, const void *A, int64_t M, int64_t K,
                                                  const uint8_t *B, int64_t B_len, const float *absmax,
                                                  int64_t absmax_len, const float *code, int64_t code_len, int64_t N,
                                                  int64_t blocksize, const void *bias, int64_t bias_len,
                                                  int32_t bias_dtype, int32_t precision, int32_t out_dtype, void *out,
                                                  int32_t num_threads) {
    ArgCheck c("lowbit_matmul_4bit_interleaved");
    check_dtype(c, "a_dtype", a_dtype);
    check_dtype(c, "out_dtype", out_dtype);
    if (bias != nullptr) check_dtype(c, "bias_dtype", bias_dtype);
    c.enumeration("precision", precision, precision == LOWBIT_PRECISION_FLOAT32 || precision == LOWBIT_PRECISION_FAST,
                  "0 (float32), 1 (fast)");
    if (check_interleaved_weight(c, N, K, blocksize).count("M", M).failed()) return refuse(c);
    if (c.product("M", M, "K", K).product("M", M, "N", N).failed()) return refuse(c);
    check_interleaved_lengths(c, "B_len", B_len, "absmax_len", absmax_len, N, K, blocksize)
        .length("code_len", code_len, fmt::kCode4Size, "the size of a 4-bit code");
    check_optional(c, "bias_len", bias, bias_len, N, "N", "0 for a null bias");
    if (c.failed()) return refuse(c);
    if (M == 0 || N == 0) return LOWBIT_OK;
    if (c.pointer("A", A).pointer("B", B).pointer("absmax", absmax).pointer("code", code).pointer("out", out).failed())
        return refuse(c);
    return guarded([&] {
        const bool ok = kernels().matmul_4bit_interleaved(a_dtype, A, M, K, B, absmax, code, N, blocksize, bias,
                                                          bias_dtype, precision == LOWBIT_PRECISION_FAST, out_dtype,
                                                          out, num_threads);
        return int32_t{ok ? LOWBIT_OK : LOWBIT_ERR_UNSUPPORTED};
    });
}

LOWBIT_API int32_t lowbit_cpu_features_supported(void) {
    return static_cast<int32_t>(lowbit::cpu::cpu_features_supported());
}

LOWBIT_API int32_t lowbit_cpu_features(void) { return static_cast<int32_t>(lowbit::cpu::cpu_features()); }

LOWBIT_API int32_t lowbit_set_cpu_features(int32_t mask) {
    ArgCheck c("lowbit_set_cpu_features");
    if (c.expect(mask >= 0 && (static_cast<uint32_t>(mask) & ~uint32_t{lowbit::cpu::kAllFeatures}) == 0,
                 "mask = %d has bits of no lowbit_cpu_feature", static_cast<int>(mask))
            .failed())
        return refuse(c);
    lowbit::cpu::set_cpu_features(static_cast<uint32_t>(mask));
    return LOWBIT_OK;
}

LOWBIT_API int32_t lowbit_int8_linear_matmul(const int8_t *A, int64_t M, int64_t K, const int8_t *B, int64_t N,
                                             int32_t *out, int32_t num_threads) {
    ArgCheck c("lowbit_int8_linear_matmul");
    c.count("M", M).count("N", N)
        .expect(K >= 1 && K <= fmt::kInt8MatmulMaxK,
                "K = %lld must be in [1, %lld] (beyond, the int32 sum of int8 products can overflow)",
                static_cast<long long>(K), static_cast<long long>(fmt::kInt8MatmulMaxK));
    if (c.failed()) return refuse(c);
    if (c.product("M", M, "K", K).product("N", N, "K", K).product("M", M, "N", N).failed()) return refuse(c);
    if (M == 0 || N == 0) return LOWBIT_OK;
    if (c.pointer("A", A).pointer("B", B).pointer("out", out).failed()) return refuse(c);
    return guarded([&] {
        const bool ok = kernels().int8_linear_matmul(A, M, K, B, N, out, num_threads);
        return int32_t{ok ? LOWBIT_OK : LOWBIT_ERR_UNSUPPORTED};
    });
}

LOWBIT_API int32_t lowbit_int8_vectorwise_quant(int32_t dtype, const void *A, int64_t rows, int64_t cols,
                                                float threshold, int8_t *out, float *row_stats,
                                                int64_t row_stats_len, uint8_t *outlier_flags,
                                                int64_t outlier_flags_len, int32_t num_threads) {
    ArgCheck c("lowbit_int8_vectorwise_quant");
    check_dtype(c, "dtype", dtype);
    if (check_threshold(check_matrix(c, rows, cols), threshold).failed()) return refuse(c);
    c.length("row_stats_len", row_stats_len, rows, "rows");
    check_optional(c, "outlier_flags_len", outlier_flags, outlier_flags_len, cols, "cols", "0 for a null outlier_flags");
    if (c.failed()) return refuse(c);
    if (rows == 0 || cols == 0) return LOWBIT_OK;
    if (c.pointer("A", A).pointer("out", out).pointer("row_stats", row_stats).failed()) return refuse(c);
    return guarded([&] {
        kernels().int8_vectorwise_quant(dtype, A, rows, cols, threshold, out, row_stats, outlier_flags, num_threads);
        return int32_t{LOWBIT_OK};
    });
}

LOWBIT_API int32_t lowbit_int8_colwise_quant(int32_t dtype, const void *A, int64_t rows, int64_t cols,
                                             float threshold, int8_t *out, float *col_stats, int64_t col_stats_len,
                                             int32_t num_threads) {
    ArgCheck c("lowbit_int8_colwise_quant");
    check_dtype(c, "dtype", dtype);
    if (check_threshold(check_matrix(c, rows, cols), threshold).failed()) return refuse(c);
    if (c.length("col_stats_len", col_stats_len, cols, "cols").failed()) return refuse(c);
    if (rows == 0 || cols == 0) return LOWBIT_OK;
    if (c.pointer("A", A).pointer("out", out).pointer("col_stats", col_stats).failed()) return refuse(c);
    return guarded([&] {
        kernels().int8_colwise_quant(dtype, A, rows, cols, threshold, out, col_stats, num_threads);
        return int32_t{LOWBIT_OK};
    });
}

LOWBIT_API int32_t lowbit_int8_vectorwise_dequant(const int8_t *A, const float *stats, int64_t stats_len,
                                                  int64_t rows, int64_t cols, float scale, float *out,
                                                  int32_t num_threads) {
    ArgCheck c("lowbit_int8_vectorwise_dequant");
    if (check_matrix(c, rows, cols).failed()) return refuse(c);
    if (c.length("stats_len", stats_len, rows, "rows").failed()) return refuse(c);
    if (rows == 0 || cols == 0) return LOWBIT_OK;
    if (c.pointer("A", A).pointer("stats", stats).pointer("out", out).failed()) return refuse(c);
    return guarded([&] {
        kernels().int8_vectorwise_dequant(A, stats, rows, cols, scale, out, num_threads);
        return int32_t{LOWBIT_OK};
    });
}

LOWBIT_API int32_t lowbit_int8_mm_dequant(const int32_t *A, const float *row_stats, int64_t row_stats_len,
                                          const float *col_stats, int64_t col_stats_len, int64_t rows,
                                          int64_t cols, float scale, const void *bias, int64_t bias_len,
                                          int32_t bias_dtype, int32_t out_dtype, void *out, int32_t num_threads) {
    ArgCheck c("lowbit_int8_mm_dequant");
    check_dtype(c, "out_dtype", out_dtype);
    if (bias != nullptr) check_dtype(c, "bias_dtype", bias_dtype);
    if (check_matrix(c, rows, cols).failed()) return refuse(c);
    c.length("row_stats_len", row_stats_len, rows, "rows")
        .length("col_stats_len", col_stats_len, cols, "cols");
    check_optional(c, "bias_len", bias, bias_len, cols, "cols", "0 for a null bias");
    if (c.failed()) return refuse(c);
    if (rows == 0 || cols == 0) return LOWBIT_OK;
    if (c.pointer("A", A).pointer("row_stats", row_stats).pointer("col_stats", col_stats).pointer("out", out).failed())
        return refuse(c);
    return guarded([&] {
        kernels().int8_mm_dequant(A, row_stats, col_stats, rows, cols, scale, bias, bias_dtype, out_dtype, out,
                                  num_threads);
        return int32_t{LOWBIT_OK};
    });
}

LOWBIT_API int32_t lowbit_optimizer_update_32bit(int32_t optimizer, int32_t dtype, const void *g, void *p,
                                                 int64_t n, float *state1, int64_t state1_len, float *state2,
                                                 int64_t state2_len, const lowbit_optim_args *args,
                                                 float *unorm_vec, int32_t num_threads) {
    ArgCheck c("lowbit_optimizer_update_32bit");
    if (check_optimizer_call(c, optimizer, dtype, n, args).failed()) return refuse(c);
    if (check_optimizer_32bit_lengths(c, optimizer, n, state1_len, state2_len).failed()) return refuse(c);
    const bool two = lowbit::optim::has_state2(optimizer);
    if (n == 0) return LOWBIT_OK;
    const lowbit::optim::Params params = optim_params(optimizer, *args);
    c.pointer("g", g).pointer("p", p).pointer("state1", state1);
    if (two) c.pointer("state2", state2);
    if (params.trust_ratio) c.pointer("unorm_vec (max_unorm > 0)", unorm_vec);
    if (c.failed()) return refuse(c);
    return guarded([&] {
        const bool ok = kernels().optimizer_update_32bit(optimizer, dtype, g, p, state1, two ? state2 : nullptr, n,
                                                         params, unorm_vec, num_threads);
        return int32_t{ok ? LOWBIT_OK : LOWBIT_ERR_UNSUPPORTED};
    });
}

LOWBIT_API int32_t lowbit_optimizer_update_8bit_blockwise(
    int32_t optimizer, int32_t dtype, const void *g, void *p, int64_t n, uint8_t *state1, int64_t state1_len,
    uint8_t *state2, int64_t state2_len, const lowbit_optim_args *args, const float *qmap1, int64_t qmap1_len,
    const float *qmap2, int64_t qmap2_len, float *absmax1, int64_t absmax1_len, float *absmax2,
    int64_t absmax2_len, int32_t num_threads) {
    ArgCheck c("lowbit_optimizer_update_8bit_blockwise");
    if (check_optimizer_call(c, optimizer, dtype, n, args).failed()) return refuse(c);
    if (check_optimizer_8bit_lengths(c, optimizer, n, state1_len, state2_len, qmap1_len, qmap2_len, absmax1_len,
                                     absmax2_len)
            .failed())
        return refuse(c);
    const bool two = lowbit::optim::has_state2(optimizer);
    if (n == 0) return LOWBIT_OK;
    c.pointer("g", g).pointer("p", p).pointer("state1", state1).pointer("qmap1", qmap1).pointer("absmax1", absmax1);
    if (two) c.pointer("state2", state2).pointer("qmap2", qmap2).pointer("absmax2", absmax2);
    if (c.failed()) return refuse(c);
    const lowbit::optim::Params params = optim_params(optimizer, *args);
    return guarded([&] {
        const bool ok = kernels().optimizer_update_8bit_blockwise(optimizer, dtype, g, p, state1, two ? state2 : nullptr,
                                                                  n, params, qmap1, two ? qmap2 : nullptr, absmax1,
                                                                  two ? absmax2 : nullptr, num_threads);
        return int32_t{ok ? LOWBIT_OK : LOWBIT_ERR_UNSUPPORTED};
    });
}

} // extern "C"
