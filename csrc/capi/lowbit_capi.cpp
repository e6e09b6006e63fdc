/* lowbit_capi.cpp -- the extern "C" entry points of liblowbit_cpu (declared in lowbit_capi.h).
 *
 * Each entry point: validates its arguments (second line of defence; Python validates first),
 * pins the floating-point environment (FpEnvGuard: round-to-nearest, no FTZ/DAZ), and calls the
 * kernel of the current CPU ISA (csrc/cpu/dispatch.h). No C++ exception ever crosses this boundary: anything unexpected becomes
 * LOWBIT_ERR_UNSUPPORTED (the only failure a kernel can have is running out of memory).
 *
 * Validation order: enums, blocksize and n >= 0 first; then n == 0 returns LOWBIT_OK without
 * looking at the pointers (torch may hand out null data pointers for empty tensors); then
 * every pointer must be non-null.
 */
#include "lowbit_capi.h"

#include "dispatch.h"
#include "fp_env.h"
#include "lowbit_formats.h"
#include "lowbit_optim.h"

#ifndef LOWBIT_BUILD_INFO
#define LOWBIT_BUILD_INFO "unknown build (LOWBIT_BUILD_INFO not defined)"
#endif

namespace {

namespace fmt = lowbit::fmt;
using lowbit::cpu::kernels;

static_assert(int{LOWBIT_ISA_SCALAR} == int{lowbit::cpu::kIsaScalar} &&
                  int{LOWBIT_ISA_AVX2} == int{lowbit::cpu::kIsaAvx2} &&
                  int{LOWBIT_ISA_AVX512} == int{lowbit::cpu::kIsaAvx512},
              "lowbit_isa and lowbit::cpu::Isa must agree");

/* Largest size product the entry points accept: far beyond any tensor, and sums of a few such
 * values (indices plus padding) cannot overflow int64. */
constexpr int64_t kMaxElements = int64_t{1} << 62;

bool product_fits(int64_t a, int64_t b) { return a == 0 || b <= kMaxElements / a; }

bool valid_dtype(int32_t dtype) {
    return dtype == LOWBIT_FLOAT32 || dtype == LOWBIT_FLOAT16 || dtype == LOWBIT_BFLOAT16;
}
bool valid_quant_type(int32_t qt) { return qt == LOWBIT_FP4 || qt == LOWBIT_NF4; }

/* Shared checks of the blockwise entry points. Returns LOWBIT_OK to proceed; *done is set when
 * the call is a valid no-op (n == 0). */
int32_t check_common(int32_t dtype, int64_t n, int64_t blocksize, bool *done) {
    *done = false;
    if (!valid_dtype(dtype) || n < 0 || !fmt::is_supported_blocksize(blocksize))
        return LOWBIT_ERR_ARGUMENT;
    if (n == 0) *done = true;
    return LOWBIT_OK;
}

/* LLM.int8 entry points: a rows x cols matrix (either may be 0: nothing to do). */
bool valid_int8_shape(int64_t rows, int64_t cols) { return rows >= 0 && cols >= 0 && product_fits(rows, cols); }
/* A threshold of 0 means "no outliers"; NaN, Inf and negative values are rejected. */
bool valid_threshold(float t) { return t >= 0.0f && t <= 3.4028234663852886e38f; }

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

} // namespace

/* ---- optimizer helpers ----------------------------------------------------------------- */
namespace {

bool valid_optim_call(int32_t optimizer, int32_t dtype, int64_t n, const lowbit_optim_args *args) {
    return optimizer >= LOWBIT_OPTIM_ADAM && optimizer <= LOWBIT_OPTIM_ADEMAMIX && valid_dtype(dtype) &&
           n >= 0 && n <= kMaxElements / 2 && args != nullptr && args->step >= 1;
}

lowbit::optim::Params optim_params(int32_t optimizer, const lowbit_optim_args &a) {
    return lowbit::optim::make_params(optimizer, a.beta1, a.beta2, a.beta3, a.alpha, a.eps, a.weight_decay, a.lr,
                                      a.gnorm_scale, a.step, a.max_unorm, a.param_norm);
}

static_assert(int{LOWBIT_OPTIM_ADAM} == int{lowbit::optim::kAdam} &&
                  int{LOWBIT_OPTIM_MOMENTUM} == int{lowbit::optim::kMomentum} &&
                  int{LOWBIT_OPTIM_RMSPROP} == int{lowbit::optim::kRmsprop} &&
                  int{LOWBIT_OPTIM_ADAGRAD} == int{lowbit::optim::kAdagrad} &&
                  int{LOWBIT_OPTIM_LION} == int{lowbit::optim::kLion} &&
                  int{LOWBIT_OPTIM_ADEMAMIX} == int{lowbit::optim::kAdemamix},
              "lowbit_optimizer and lowbit::optim::Optimizer must agree");

} // namespace

extern "C" {

LOWBIT_API int32_t lowbit_abi_version(void) { return LOWBIT_ABI_VERSION; }

LOWBIT_API const char *lowbit_build_info(void) { return LOWBIT_BUILD_INFO; }

LOWBIT_API int32_t lowbit_cpu_isa_supported(int32_t isa) {
    return lowbit::cpu::isa_supported(isa) ? 1 : 0;
}

LOWBIT_API int32_t lowbit_cpu_isa(void) { return lowbit::cpu::current_isa(); }

LOWBIT_API int32_t lowbit_set_cpu_isa(int32_t isa) {
    if (isa < 0 || isa >= lowbit::cpu::kNumIsas) return LOWBIT_ERR_ARGUMENT;
    return lowbit::cpu::set_isa(isa) ? LOWBIT_OK : LOWBIT_ERR_UNSUPPORTED;
}

LOWBIT_API int32_t lowbit_format_table(int32_t table, float *out, int32_t capacity, int32_t *count) {
    if (count == nullptr || capacity < 0 || (out == nullptr && capacity > 0))
        return LOWBIT_ERR_ARGUMENT;
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
        const int layout[] = {fmt::kInterleaveRows, fmt::kInterleaveWordWeights};
        copy_table(layout, 2, out, capacity, count);
        break;
    }
    default: return LOWBIT_ERR_ARGUMENT;
    }
    return LOWBIT_OK;
}

LOWBIT_API int32_t lowbit_quantize_4bit(int32_t dtype, const void *A, int64_t n, int64_t blocksize,
                                        int32_t quant_type, uint8_t *out, float *absmax,
                                        int32_t num_threads) {
    bool done = false;
    const int32_t st = check_common(dtype, n, blocksize, &done);
    if (st != LOWBIT_OK || !valid_quant_type(quant_type)) return LOWBIT_ERR_ARGUMENT;
    if (done) return LOWBIT_OK;
    if (A == nullptr || out == nullptr || absmax == nullptr) return LOWBIT_ERR_ARGUMENT;
    return guarded([&] {
        kernels().quantize_4bit(dtype, A, n, blocksize, quant_type, out, absmax, num_threads);
        return int32_t{LOWBIT_OK};
    });
}

LOWBIT_API int32_t lowbit_dequantize_4bit(int32_t dtype, const uint8_t *A, const float *absmax,
                                          int64_t n, int64_t blocksize, const float *code,
                                          void *out, int32_t num_threads) {
    bool done = false;
    const int32_t st = check_common(dtype, n, blocksize, &done);
    if (st != LOWBIT_OK) return st;
    if (done) return LOWBIT_OK;
    if (A == nullptr || absmax == nullptr || code == nullptr || out == nullptr) return LOWBIT_ERR_ARGUMENT;
    return guarded([&] {
        kernels().dequantize_4bit(dtype, A, absmax, n, blocksize, code, out, num_threads);
        return int32_t{LOWBIT_OK};
    });
}

LOWBIT_API int32_t lowbit_quantize_blockwise(int32_t dtype, const float *code, const void *A,
                                             int64_t n, int64_t blocksize, uint8_t *out,
                                             float *absmax, int32_t num_threads) {
    bool done = false;
    const int32_t st = check_common(dtype, n, blocksize, &done);
    if (st != LOWBIT_OK) return st;
    if (done) return LOWBIT_OK;
    if (code == nullptr || A == nullptr || out == nullptr || absmax == nullptr)
        return LOWBIT_ERR_ARGUMENT;
    return guarded([&] {
        const bool ok =
            kernels().quantize_blockwise(dtype, code, A, n, blocksize, out, absmax, num_threads);
        return int32_t{ok ? LOWBIT_OK : LOWBIT_ERR_UNSUPPORTED};
    });
}

LOWBIT_API int32_t lowbit_dequantize_blockwise(int32_t dtype, const float *code, const uint8_t *A,
                                               const float *absmax, int64_t n, int64_t blocksize,
                                               void *out, int32_t num_threads) {
    bool done = false;
    const int32_t st = check_common(dtype, n, blocksize, &done);
    if (st != LOWBIT_OK) return st;
    if (done) return LOWBIT_OK;
    if (code == nullptr || A == nullptr || absmax == nullptr || out == nullptr)
        return LOWBIT_ERR_ARGUMENT;
    return guarded([&] {
        kernels().dequantize_blockwise(dtype, code, A, absmax, n, blocksize, out, num_threads);
        return int32_t{LOWBIT_OK};
    });
}

LOWBIT_API int32_t lowbit_gemv_4bit(int32_t a_dtype, const void *A, int64_t M, int64_t K,
                                    const uint8_t *B, const float *absmax, const float *code,
                                    int64_t N, int64_t blocksize, int32_t out_dtype, void *out,
                                    int32_t num_threads) {
    if (!valid_dtype(a_dtype) || !valid_dtype(out_dtype) || !fmt::is_supported_blocksize(blocksize) ||
        M < 0 || N < 0 || K < 1 || !product_fits(M, K) || !product_fits(N, K) || !product_fits(M, N))
        return LOWBIT_ERR_ARGUMENT;
    if (M == 0 || N == 0) return LOWBIT_OK;
    if (A == nullptr || B == nullptr || absmax == nullptr || code == nullptr || out == nullptr)
        return LOWBIT_ERR_ARGUMENT;
    return guarded([&] {
        const bool ok = kernels().gemv_4bit(a_dtype, A, M, K, B, absmax, code, N, blocksize, out_dtype,
                                            out, num_threads);
        return int32_t{ok ? LOWBIT_OK : LOWBIT_ERR_UNSUPPORTED};
    });
}

LOWBIT_API int32_t lowbit_interleave_4bit(const uint8_t *B, const float *absmax, int64_t N, int64_t K,
                                          int64_t blocksize, int32_t inverse, uint8_t *B_out, float *absmax_out,
                                          int32_t num_threads) {
    if (!fmt::is_supported_blocksize(blocksize) || N < 0 || K < 1 || K % blocksize != 0 || !product_fits(N, K))
        return LOWBIT_ERR_ARGUMENT;
    if (N == 0) return LOWBIT_OK;
    if (B == nullptr || absmax == nullptr || B_out == nullptr || absmax_out == nullptr) return LOWBIT_ERR_ARGUMENT;
    return guarded([&] {
        kernels().interleave_4bit(B, absmax, N, K, blocksize, inverse != 0, B_out, absmax_out, num_threads);
        return int32_t{LOWBIT_OK};
    });
}

LOWBIT_API int32_t lowbit_matmul_4bit_interleaved(int32_t a_dtype, const void *A, int64_t M, int64_t K,
                                                  const uint8_t *B, const float *absmax, const float *code,
                                                  int64_t N, int64_t blocksize, const void *bias, int32_t bias_dtype,
                                                  int32_t precision, int32_t out_dtype, void *out,
                                                  int32_t num_threads) {
    if (!valid_dtype(a_dtype) || !valid_dtype(out_dtype) || (bias != nullptr && !valid_dtype(bias_dtype)) ||
        (precision != LOWBIT_PRECISION_FLOAT32 && precision != LOWBIT_PRECISION_BF16) ||
        !fmt::is_supported_blocksize(blocksize) || M < 0 || N < 0 || K < 1 || K % blocksize != 0 ||
        !product_fits(M, K) || !product_fits(N, K) || !product_fits(M, N))
        return LOWBIT_ERR_ARGUMENT;
    if (M == 0 || N == 0) return LOWBIT_OK;
    if (A == nullptr || B == nullptr || absmax == nullptr || code == nullptr || out == nullptr)
        return LOWBIT_ERR_ARGUMENT;
    return guarded([&] {
        const bool ok = kernels().matmul_4bit_interleaved(a_dtype, A, M, K, B, absmax, code, N, blocksize, bias,
                                                          bias_dtype, precision == LOWBIT_PRECISION_BF16, out_dtype,
                                                          out, num_threads);
        return int32_t{ok ? LOWBIT_OK : LOWBIT_ERR_UNSUPPORTED};
    });
}

LOWBIT_API int32_t lowbit_cpu_features_supported(void) {
    return static_cast<int32_t>(lowbit::cpu::cpu_features_supported());
}

LOWBIT_API int32_t lowbit_cpu_features(void) { return static_cast<int32_t>(lowbit::cpu::cpu_features()); }

LOWBIT_API int32_t lowbit_set_cpu_features(int32_t mask) {
    if (mask < 0 || (static_cast<uint32_t>(mask) & ~uint32_t{lowbit::cpu::kAllFeatures}) != 0)
        return LOWBIT_ERR_ARGUMENT;
    lowbit::cpu::set_cpu_features(static_cast<uint32_t>(mask));
    return LOWBIT_OK;
}

LOWBIT_API int32_t lowbit_int8_linear_matmul(const int8_t *A, int64_t M, int64_t K, const int8_t *B, int64_t N,
                                             int32_t *out, int32_t num_threads) {
    if (M < 0 || N < 0 || K < 1 || !product_fits(M, K) || !product_fits(N, K) || !product_fits(M, N))
        return LOWBIT_ERR_ARGUMENT;
    if (M == 0 || N == 0) return LOWBIT_OK;
    if (A == nullptr || B == nullptr || out == nullptr) return LOWBIT_ERR_ARGUMENT;
    return guarded([&] {
        const bool ok = kernels().int8_linear_matmul(A, M, K, B, N, out, num_threads);
        return int32_t{ok ? LOWBIT_OK : LOWBIT_ERR_UNSUPPORTED};
    });
}

LOWBIT_API int32_t lowbit_int8_vectorwise_quant(int32_t dtype, const void *A, int64_t rows, int64_t cols,
                                                float threshold, int8_t *out, float *row_stats,
                                                uint8_t *outlier_flags, int32_t num_threads) {
    if (!valid_dtype(dtype) || !valid_int8_shape(rows, cols) || !valid_threshold(threshold))
        return LOWBIT_ERR_ARGUMENT;
    if (rows == 0 || cols == 0) return LOWBIT_OK;
    if (A == nullptr || out == nullptr || row_stats == nullptr) return LOWBIT_ERR_ARGUMENT;
    return guarded([&] {
        kernels().int8_vectorwise_quant(dtype, A, rows, cols, threshold, out, row_stats, outlier_flags, num_threads);
        return int32_t{LOWBIT_OK};
    });
}

LOWBIT_API int32_t lowbit_int8_colwise_quant(int32_t dtype, const void *A, int64_t rows, int64_t cols,
                                             float threshold, int8_t *out, float *col_stats, int32_t num_threads) {
    if (!valid_dtype(dtype) || !valid_int8_shape(rows, cols) || !valid_threshold(threshold))
        return LOWBIT_ERR_ARGUMENT;
    if (rows == 0 || cols == 0) return LOWBIT_OK;
    if (A == nullptr || out == nullptr || col_stats == nullptr) return LOWBIT_ERR_ARGUMENT;
    return guarded([&] {
        kernels().int8_colwise_quant(dtype, A, rows, cols, threshold, out, col_stats, num_threads);
        return int32_t{LOWBIT_OK};
    });
}

LOWBIT_API int32_t lowbit_int8_vectorwise_dequant(const int8_t *A, const float *stats, int64_t rows, int64_t cols,
                                                  float scale, float *out, int32_t num_threads) {
    if (!valid_int8_shape(rows, cols)) return LOWBIT_ERR_ARGUMENT;
    if (rows == 0 || cols == 0) return LOWBIT_OK;
    if (A == nullptr || stats == nullptr || out == nullptr) return LOWBIT_ERR_ARGUMENT;
    return guarded([&] {
        kernels().int8_vectorwise_dequant(A, stats, rows, cols, scale, out, num_threads);
        return int32_t{LOWBIT_OK};
    });
}

LOWBIT_API int32_t lowbit_int8_mm_dequant(const int32_t *A, const float *row_stats, const float *col_stats,
                                          int64_t rows, int64_t cols, float scale, const void *bias,
                                          int32_t bias_dtype, int32_t out_dtype, void *out, int32_t num_threads) {
    if (!valid_dtype(out_dtype) || (bias != nullptr && !valid_dtype(bias_dtype)) || !valid_int8_shape(rows, cols))
        return LOWBIT_ERR_ARGUMENT;
    if (rows == 0 || cols == 0) return LOWBIT_OK;
    if (A == nullptr || row_stats == nullptr || col_stats == nullptr || out == nullptr) return LOWBIT_ERR_ARGUMENT;
    return guarded([&] {
        kernels().int8_mm_dequant(A, row_stats, col_stats, rows, cols, scale, bias, bias_dtype, out_dtype, out,
                                  num_threads);
        return int32_t{LOWBIT_OK};
    });
}


LOWBIT_API int32_t lowbit_optimizer_update_32bit(int32_t optimizer, int32_t dtype, const void *g, void *p,
                                                 float *state1, float *state2, int64_t n,
                                                 const lowbit_optim_args *args, float *unorm_vec,
                                                 int32_t num_threads) {
    if (!valid_optim_call(optimizer, dtype, n, args)) return LOWBIT_ERR_ARGUMENT;
    if (n == 0) return LOWBIT_OK;
    const lowbit::optim::Params params = optim_params(optimizer, *args);
    if (g == nullptr || p == nullptr || state1 == nullptr ||
        (lowbit::optim::has_state2(optimizer) && state2 == nullptr) || (params.trust_ratio && unorm_vec == nullptr))
        return LOWBIT_ERR_ARGUMENT;
    return guarded([&] {
        const bool ok = kernels().optimizer_update_32bit(optimizer, dtype, g, p, state1, state2, n, params,
                                                         unorm_vec, num_threads);
        return int32_t{ok ? LOWBIT_OK : LOWBIT_ERR_UNSUPPORTED};
    });
}

LOWBIT_API int32_t lowbit_optimizer_update_8bit_blockwise(int32_t optimizer, int32_t dtype, const void *g,
                                                          void *p, uint8_t *state1, uint8_t *state2, int64_t n,
                                                          const lowbit_optim_args *args, const float *qmap1,
                                                          const float *qmap2, float *absmax1, float *absmax2,
                                                          int32_t num_threads) {
    if (!valid_optim_call(optimizer, dtype, n, args)) return LOWBIT_ERR_ARGUMENT;
    if (n == 0) return LOWBIT_OK;
    const bool two = lowbit::optim::has_state2(optimizer);
    if (g == nullptr || p == nullptr || state1 == nullptr || qmap1 == nullptr || absmax1 == nullptr ||
        (two && (state2 == nullptr || qmap2 == nullptr || absmax2 == nullptr)))
        return LOWBIT_ERR_ARGUMENT;
    const lowbit::optim::Params params = optim_params(optimizer, *args);
    return guarded([&] {
        const bool ok = kernels().optimizer_update_8bit_blockwise(optimizer, dtype, g, p, state1, two ? state2 : nullptr,
                                                                  n, params, qmap1, two ? qmap2 : nullptr, absmax1,
                                                                  two ? absmax2 : nullptr, num_threads);
        return int32_t{ok ? LOWBIT_OK : LOWBIT_ERR_UNSUPPORTED};
    });
}

} // extern "C"
