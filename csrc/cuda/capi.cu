/* capi.cu -- the extern "C" entry points of lowbit_cuda_capi.h: argument checks (second line of
 * defence, shared with the CPU library: csrc/common/lowbit_capi_checks.h), device switching, error
 * reporting, build information. Kernels live in the other .cu files (kernels.cuh lists them). */
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>

#include "kernels.cuh"
#include "lowbit_capi_checks.h"
#include "lowbit_cuda_capi.h"
#include "paged.cuh"

#ifndef LOWBIT_GPU_BUILD_INFO
#define LOWBIT_GPU_BUILD_INFO "lowbit gpu library (no build info: built outside csrc/cuda/CMakeLists.txt)"
#endif
#ifndef LOWBIT_GPU_TARGETS
#define LOWBIT_GPU_TARGETS ""
#endif

namespace lowbit {
namespace gpu {
namespace {

thread_local char g_last_error[1024] = "";

void set_error(const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(g_last_error, sizeof g_last_error, fmt, args);
    va_end(args);
}

int32_t argument_error(const char *fn, const char *what) {
    set_error("%s: invalid argument: %s", fn, what);
    return LOWBIT_CUDA_ERR_ARGUMENT;
}

/* Stores a refusal of the shared checks ("<fn>: <what>") and returns the ARGUMENT status. */
int32_t refuse(const capi::ArgCheck &check) {
    set_error("%s", check.message());
    return LOWBIT_CUDA_ERR_ARGUMENT;
}

int32_t runtime_error(const char *fn, cudaError_t err) {
    set_error("%s: %s: %s", fn, cudaGetErrorName(err), cudaGetErrorString(err));
    return LOWBIT_CUDA_ERR_RUNTIME;
}

int32_t finish(const char *fn, cudaError_t err) {
    return err == cudaSuccess ? static_cast<int32_t>(LOWBIT_CUDA_OK) : runtime_error(fn, err);
}

/* Makes `device` current for the duration of a call and restores the caller's device. */
class DeviceGuard {
  public:
    explicit DeviceGuard(int device) {
        err_ = cudaGetDevice(&previous_);
        if (err_ == cudaSuccess && previous_ != device) {
            err_ = cudaSetDevice(device);
            switched_ = err_ == cudaSuccess;
        }
    }
    ~DeviceGuard() {
        if (switched_) (void)cudaSetDevice(previous_);
    }
    DeviceGuard(const DeviceGuard &) = delete;
    DeviceGuard &operator=(const DeviceGuard &) = delete;
    cudaError_t error() const { return err_; }

  private:
    int previous_ = 0;
    bool switched_ = false;
    cudaError_t err_ = cudaSuccess;
};

cudaStream_t as_stream(void *stream) { return static_cast<cudaStream_t>(stream); }
static_assert(kFloat32 == 0 && kBFloat16 == 2, "dtype numbering of capi::check_dtype");

/* Runs `launch` with `device` current; maps every failure to a status and message. */
template <class Fn>
int32_t on_device(const char *fn, int32_t device, Fn &&launch) {
    if (device < 0) return argument_error(fn, "device < 0");
    DeviceGuard guard(device);
    if (guard.error() != cudaSuccess) return runtime_error(fn, guard.error());
    return finish(fn, launch());
}

/* Step scalars: csrc/common/lowbit_optim.h (the CPU library derives them the same way). */
OptimParams make_params(int32_t optimizer, const lowbit_cuda_optim_args &a) {
    return optim::make_params(optimizer, a.beta1, a.beta2, a.beta3, a.alpha, a.eps, a.weight_decay, a.lr,
                              a.gnorm_scale, a.step, a.max_unorm, a.param_norm);
}

__global__ void k_probe(int *unused) {
    if (unused != nullptr) *unused = 0;
}

} // namespace
} // namespace gpu
} // namespace lowbit

using namespace lowbit::gpu;
using namespace lowbit::capi;
namespace fmt = lowbit::fmt;
namespace optim = lowbit::optim;

extern "C" {

int32_t lowbit_cuda_abi_version(void) { return LOWBIT_CUDA_ABI_VERSION; }
const char *lowbit_cuda_build_info(void) { return LOWBIT_GPU_BUILD_INFO; }
const char *lowbit_cuda_platform(void) { return LOWBIT_PLATFORM_NAME; }
const char *lowbit_cuda_targets(void) { return LOWBIT_GPU_TARGETS; }
const char *lowbit_cuda_last_error(void) { return g_last_error; }

int32_t lowbit_cuda_device_check(int32_t device) {
    const char *fn = "lowbit_cuda_device_check";
    int runtime = 0, driver = 0, count = 0;
    (void)cudaRuntimeGetVersion(&runtime);
    (void)cudaDriverGetVersion(&driver);
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
        set_error("the %s of this library (version %d) cannot start: %s: %s (driver version %d)",
                  LOWBIT_RUNTIME_VERSION_NAME, runtime, cudaGetErrorName(err), cudaGetErrorString(err), driver);
        return LOWBIT_CUDA_ERR_RUNTIME;
    }
    if (device < 0 || device >= count) {
        set_error("%s: device %d does not exist (%d visible)", fn, device, count);
        return LOWBIT_CUDA_ERR_ARGUMENT;
    }
    DeviceGuard guard(device);
    if (guard.error() != cudaSuccess) return runtime_error(fn, guard.error());
    cudaFuncAttributes attributes;
    err = cudaFuncGetAttributes(&attributes, reinterpret_cast<const void *>(&k_probe));
    if (err != cudaSuccess) {
        set_error("no kernel image in this library runs on device %d (library targets: %s): %s: %s",
                  device, LOWBIT_GPU_TARGETS, cudaGetErrorName(err), cudaGetErrorString(err));
        return LOWBIT_CUDA_ERR_UNSUPPORTED;
    }
    return LOWBIT_CUDA_OK;
}

/* ---- 4-bit -------------------------------------------------------------------------------------- */
int32_t lowbit_cuda_quantize_4bit(int32_t dtype, const void *A, int64_t n, int64_t blocksize,
                                  int32_t quant_type, uint8_t *out, int64_t out_len, float *absmax,
                                  int64_t absmax_len, int32_t device, void *stream) {
    const char *fn = "lowbit_cuda_quantize_4bit";
    ArgCheck c(fn);
    if (check_quant_type(check_blockwise(c, dtype, n, blocksize), quant_type).failed()) return refuse(c);
    c.length("out_len", out_len, packed4_len(n), "(n + 1) / 2")
        .length("absmax_len", absmax_len, lowbit::capi::num_blocks(n, blocksize), "ceil(n / blocksize)");
    if (c.failed()) return refuse(c);
    if (n == 0) return LOWBIT_CUDA_OK;
    if (c.pointer("A", A).pointer("out", out).pointer("absmax", absmax).failed()) return refuse(c);
    return on_device(fn, device, [&] {
        return quantize_4bit(dtype, A, n, blocksize, quant_type, out, absmax, as_stream(stream));
    });
}

int32_t lowbit_cuda_dequantize_4bit(int32_t dtype, const uint8_t *A, int64_t A_len, const float *absmax,
                                    int64_t absmax_len, int64_t blocksize, int32_t quant_type, void *out,
                                    int64_t n, int32_t device, void *stream) {
    const char *fn = "lowbit_cuda_dequantize_4bit";
    ArgCheck c(fn);
    if (check_quant_type(check_blockwise(c, dtype, n, blocksize), quant_type).failed()) return refuse(c);
    c.length("A_len", A_len, packed4_len(n), "(n + 1) / 2")
        .length("absmax_len", absmax_len, lowbit::capi::num_blocks(n, blocksize), "ceil(n / blocksize)");
    if (c.failed()) return refuse(c);
    if (n == 0) return LOWBIT_CUDA_OK;
    if (c.pointer("A", A).pointer("absmax", absmax).pointer("out", out).failed()) return refuse(c);
    return on_device(fn, device, [&] {
        return dequantize_4bit(dtype, A, absmax, n, blocksize, quant_type, out, as_stream(stream));
    });
}

/* ---- 8-bit blockwise ---------------------------------------------------------------------------- */
int32_t lowbit_cuda_quantize_blockwise(int32_t dtype, const float *code, int64_t code_len, const void *A, int64_t n,
                                       int64_t blocksize, uint8_t *out, int64_t out_len, float *absmax,
                                       int64_t absmax_len, int32_t device, void *stream) {
    const char *fn = "lowbit_cuda_quantize_blockwise";
    ArgCheck c(fn);
    if (check_blockwise(c, dtype, n, blocksize).failed()) return refuse(c);
    c.length("code_len", code_len, fmt::kCode8Size, "the size of an 8-bit code")
        .length("out_len", out_len, n, "n")
        .length("absmax_len", absmax_len, lowbit::capi::num_blocks(n, blocksize), "ceil(n / blocksize)");
    if (c.failed()) return refuse(c);
    if (n == 0) return LOWBIT_CUDA_OK;
    if (c.pointer("code", code).pointer("A", A).pointer("out", out).pointer("absmax", absmax).failed())
        return refuse(c);
    return on_device(fn, device, [&] {
        return quantize_blockwise(dtype, code, A, n, blocksize, out, absmax, as_stream(stream));
    });
}

int32_t lowbit_cuda_dequantize_blockwise(int32_t dtype, const float *code, int64_t code_len, const uint8_t *A,
                                         int64_t A_len, const float *absmax, int64_t absmax_len, int64_t blocksize,
                                         void *out, int64_t n, int32_t device, void *stream) {
    const char *fn = "lowbit_cuda_dequantize_blockwise";
    ArgCheck c(fn);
    if (check_blockwise(c, dtype, n, blocksize).failed()) return refuse(c);
    c.length("code_len", code_len, fmt::kCode8Size, "the size of an 8-bit code")
        .length("A_len", A_len, n, "n")
        .length("absmax_len", absmax_len, lowbit::capi::num_blocks(n, blocksize), "ceil(n / blocksize)");
    if (c.failed()) return refuse(c);
    if (n == 0) return LOWBIT_CUDA_OK;
    if (c.pointer("code", code).pointer("A", A).pointer("absmax", absmax).pointer("out", out).failed())
        return refuse(c);
    return on_device(fn, device, [&] {
        return dequantize_blockwise(dtype, code, A, absmax, n, blocksize, out, as_stream(stream));
    });
}

/* ---- gemv --------------------------------------------------------------------------------------- */
int32_t lowbit_cuda_gemv_4bit_max_rows(void) { return kGemvMaxRows; }

int32_t lowbit_cuda_gemv_4bit(int32_t dtype, const void *A, int64_t rows, const uint8_t *B, int64_t B_len,
                              int64_t N, int64_t K, const float *absmax, int64_t absmax_len, const float *code,
                              int64_t code_len, int64_t blocksize, const void *bias, int64_t bias_len,
                              int32_t bias_dtype, void *out, int32_t device, void *stream) {
    const char *fn = "lowbit_cuda_gemv_4bit";
    ArgCheck c(fn);
    check_blocksize(check_dtype(c, "dtype", dtype), blocksize)
        .expect(rows >= 0 && rows <= kGemvMaxRows, "rows = %lld must be in [0, %d]", static_cast<long long>(rows),
                kGemvMaxRows)
        .count("N", N).count("K", K)
        .expect(K >= 1, "K = %lld must be >= 1", static_cast<long long>(K));
    if (bias != nullptr) check_dtype(c, "bias_dtype", bias_dtype);
    if (c.failed() || c.product("N", N, "K", K).failed()) return refuse(c);
    c.length("B_len", B_len, packed4_len(N * K), "(N * K + 1) / 2")
        .length("absmax_len", absmax_len, lowbit::capi::num_blocks(N * K, blocksize), "ceil(N * K / blocksize)")
        .length("code_len", code_len, fmt::kCode4Size, "the size of a 4-bit code");
    check_optional(c, "bias_len", bias, bias_len, N, "N", "0 for a null bias");
    if (c.failed()) return refuse(c);
    if (rows == 0 || N == 0) return LOWBIT_CUDA_OK;
    if (c.pointer("A", A).pointer("B", B).pointer("absmax", absmax).pointer("code", code).pointer("out", out).failed())
        return refuse(c);
    return on_device(fn, device, [&] {
        return gemv_4bit(dtype, A, rows, B, N, K, absmax, code, blocksize, bias, bias_dtype, out,
                         as_stream(stream));
    });
}

/* ---- int8 --------------------------------------------------------------------------------------- */
int32_t lowbit_cuda_int8_vectorwise_quant(int32_t dtype, const void *A, int64_t rows, int64_t cols,
                                          float threshold, int8_t *out, float *row_stats, int64_t row_stats_len,
                                          uint8_t *outlier_flags, int64_t outlier_flags_len, int32_t device,
                                          void *stream) {
    const char *fn = "lowbit_cuda_int8_vectorwise_quant";
    ArgCheck c(fn);
    check_dtype(c, "dtype", dtype);
    if (check_threshold(check_matrix(c, rows, cols), threshold).failed()) return refuse(c);
    c.length("row_stats_len", row_stats_len, rows, "rows");
    check_optional(c, "outlier_flags_len", outlier_flags, outlier_flags_len, cols, "cols", "0 for a null outlier_flags");
    if (c.failed()) return refuse(c);
    if (rows == 0 || cols == 0) return LOWBIT_CUDA_OK;
    if (c.pointer("A", A).pointer("out", out).pointer("row_stats", row_stats).failed()) return refuse(c);
    return on_device(fn, device, [&] {
        return int8_vectorwise_quant(dtype, A, rows, cols, threshold, out, row_stats, outlier_flags,
                                     as_stream(stream));
    });
}

int32_t lowbit_cuda_int8_vectorwise_dequant(const int8_t *A, const float *stats, int64_t stats_len, int64_t rows,
                                            int64_t cols, float scale, float *out, int32_t device, void *stream) {
    const char *fn = "lowbit_cuda_int8_vectorwise_dequant";
    ArgCheck c(fn);
    if (check_matrix(c, rows, cols).failed() || c.length("stats_len", stats_len, rows, "rows").failed())
        return refuse(c);
    if (rows == 0 || cols == 0) return LOWBIT_CUDA_OK;
    if (c.pointer("A", A).pointer("stats", stats).pointer("out", out).failed()) return refuse(c);
    return on_device(fn, device, [&] {
        return int8_vectorwise_dequant(A, stats, rows, cols, scale, out, as_stream(stream));
    });
}

int32_t lowbit_cuda_int8_mm_dequant(const int32_t *A, const float *row_stats, int64_t row_stats_len,
                                    const float *col_stats, int64_t col_stats_len, int64_t rows, int64_t cols,
                                    float scale, const void *bias, int64_t bias_len, int32_t bias_dtype,
                                    int32_t out_dtype, void *out, int32_t device, void *stream) {
    const char *fn = "lowbit_cuda_int8_mm_dequant";
    ArgCheck c(fn);
    check_dtype(c, "out_dtype", out_dtype);
    if (bias != nullptr) check_dtype(c, "bias_dtype", bias_dtype);
    if (check_matrix(c, rows, cols).failed()) return refuse(c);
    c.length("row_stats_len", row_stats_len, rows, "rows").length("col_stats_len", col_stats_len, cols, "cols");
    check_optional(c, "bias_len", bias, bias_len, cols, "cols", "0 for a null bias");
    if (c.failed()) return refuse(c);
    if (rows == 0 || cols == 0) return LOWBIT_CUDA_OK;
    if (c.pointer("A", A).pointer("row_stats", row_stats).pointer("col_stats", col_stats).pointer("out", out).failed())
        return refuse(c);
    return on_device(fn, device, [&] {
        return int8_mm_dequant(A, row_stats, col_stats, rows, cols, scale, bias, bias_dtype, out_dtype,
                               out, as_stream(stream));
    });
}

/* ---- optimizers --------------------------------------------------------------------------------- */
int32_t lowbit_cuda_optimizer_update_32bit(int32_t optimizer, int32_t dtype, const void *g, void *p, int64_t n,
                                           float *state1, int64_t state1_len, float *state2, int64_t state2_len,
                                           const lowbit_cuda_optim_args *args, float *unorm_vec, double *scratch,
                                           int32_t device, void *stream) {
    const char *fn = "lowbit_cuda_optimizer_update_32bit";
    ArgCheck c(fn);
    if (check_optimizer_call(c, optimizer, dtype, n, args).failed() ||
        check_optimizer_32bit_lengths(c, optimizer, n, state1_len, state2_len).failed())
        return refuse(c);
    if (n == 0) return LOWBIT_CUDA_OK;
    const bool two = optim::has_state2(optimizer);
    const OptimParams params = make_params(optimizer, *args);
    c.pointer("g", g).pointer("p", p).pointer("state1", state1);
    if (two) c.pointer("state2", state2);
    if (params.trust_ratio) c.pointer("unorm_vec (max_unorm > 0)", unorm_vec).pointer("scratch (max_unorm > 0)", scratch);
    if (c.failed()) return refuse(c);
    return on_device(fn, device, [&] {
        return optimizer_32bit(optimizer, dtype, g, p, state1, two ? state2 : nullptr, n, params, unorm_vec, scratch,
                               as_stream(stream));
    });
}

int32_t lowbit_cuda_optimizer_update_8bit_blockwise(int32_t optimizer, int32_t dtype, const void *g, void *p,
                                                    int64_t n, uint8_t *state1, int64_t state1_len, uint8_t *state2,
                                                    int64_t state2_len, const lowbit_cuda_optim_args *args,
                                                    const float *qmap1, int64_t qmap1_len, const float *qmap2,
                                                    int64_t qmap2_len, float *absmax1, int64_t absmax1_len,
                                                    float *absmax2, int64_t absmax2_len, int32_t device,
                                                    void *stream) {
    const char *fn = "lowbit_cuda_optimizer_update_8bit_blockwise";
    ArgCheck c(fn);
    if (check_optimizer_call(c, optimizer, dtype, n, args).failed() ||
        check_optimizer_8bit_lengths(c, optimizer, n, state1_len, state2_len, qmap1_len, qmap2_len, absmax1_len,
                                     absmax2_len)
            .failed())
        return refuse(c);
    if (n == 0) return LOWBIT_CUDA_OK;
    const bool two = optim::has_state2(optimizer);
    c.pointer("g", g).pointer("p", p).pointer("state1", state1).pointer("qmap1", qmap1).pointer("absmax1", absmax1);
    if (two) c.pointer("state2", state2).pointer("qmap2", qmap2).pointer("absmax2", absmax2);
    if (c.failed()) return refuse(c);
    const OptimParams params = make_params(optimizer, *args);
    return on_device(fn, device, [&] {
        return optimizer_8bit_blockwise(optimizer, dtype, g, p, state1, two ? state2 : nullptr, n, params, qmap1,
                                        two ? qmap2 : nullptr, absmax1, two ? absmax2 : nullptr, as_stream(stream));
    });
}

/* ---- managed memory ----------------------------------------------------------------------------- */
int32_t lowbit_cuda_managed_supported(int32_t device, int32_t *supported) {
    const char *fn = "lowbit_cuda_managed_supported";
    if (supported == nullptr || device < 0) return argument_error(fn, "null pointer or device < 0");
    int value = 0;
    const cudaError_t err = managed_supported(device, &value);
    *supported = value;
    return finish(fn, err);
}

int32_t lowbit_cuda_managed_alloc(int64_t bytes, int32_t device, void **out) {
    const char *fn = "lowbit_cuda_managed_alloc";
    if (out == nullptr || bytes < 0) return argument_error(fn, "null pointer or bytes < 0");
    *out = nullptr;
    return on_device(fn, device, [&] { return managed_alloc(static_cast<size_t>(bytes), out); });
}

int32_t lowbit_cuda_managed_free(void *ptr) {
    if (ptr == nullptr) return LOWBIT_CUDA_OK;
    return finish("lowbit_cuda_managed_free", managed_free(ptr));
}

int32_t lowbit_cuda_prefetch(const void *ptr, int64_t bytes, int32_t device, void *stream) {
    const char *fn = "lowbit_cuda_prefetch";
    if (bytes < 0) return argument_error(fn, "bytes < 0");
    if (bytes == 0) return LOWBIT_CUDA_OK;
    if (ptr == nullptr) return argument_error(fn, "null pointer");
    if (device < 0) return finish(fn, prefetch(ptr, static_cast<size_t>(bytes), -1, as_stream(stream)));
    return on_device(fn, device, [&] { return prefetch(ptr, static_cast<size_t>(bytes), device, as_stream(stream)); });
}

} /* extern "C" */
