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

} // extern "C"
