/* capi.cu -- the extern "C" entry points of lowbit_cuda_capi.h: argument checks (second line of
 * defence), device switching, error reporting, build information. Kernels live in the other .cu
 * files (kernels.cuh lists them). */
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>

#include "kernels.cuh"
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
bool valid_dtype(int32_t dtype) { return dtype >= kFloat32 && dtype <= kBFloat16; }
bool valid_quant_type(int32_t qt) { return qt == fmt::kFP4 || qt == fmt::kNF4; }

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
                                  int32_t quant_type, uint8_t *out, float *absmax, int32_t device,
                                  void *stream) {
    const char *fn = "lowbit_cuda_quantize_4bit";
    if (!valid_dtype(dtype) || !valid_quant_type(quant_type) || !lowbit::fmt::is_supported_blocksize(blocksize) || n < 0)
        return argument_error(fn, "dtype, quant_type, blocksize or n out of range");
    if (n == 0) return LOWBIT_CUDA_OK;
    if (A == nullptr || out == nullptr || absmax == nullptr) return argument_error(fn, "null pointer");
    return on_device(fn, device, [&] {
        return quantize_4bit(dtype, A, n, blocksize, quant_type, out, absmax, as_stream(stream));
    });
}

int32_t lowbit_cuda_dequantize_4bit(int32_t dtype, const uint8_t *A, const float *absmax, int64_t n,
                                    int64_t blocksize, int32_t quant_type, void *out, int32_t device,
                                    void *stream) {
    const char *fn = "lowbit_cuda_dequantize_4bit";
    if (!valid_dtype(dtype) || !valid_quant_type(quant_type) || !lowbit::fmt::is_supported_blocksize(blocksize) || n < 0)
        return argument_error(fn, "dtype, quant_type, blocksize or n out of range");
    if (n == 0) return LOWBIT_CUDA_OK;
    if (A == nullptr || out == nullptr || absmax == nullptr) return argument_error(fn, "null pointer");
    return on_device(fn, device, [&] {
        return dequantize_4bit(dtype, A, absmax, n, blocksize, quant_type, out, as_stream(stream));
    });
}

/* ---- 8-bit blockwise ---------------------------------------------------------------------------- */
int32_t lowbit_cuda_quantize_blockwise(int32_t dtype, const float *code, const void *A, int64_t n,
                                       int64_t blocksize, uint8_t *out, float *absmax, int32_t device,
                                       void *stream) {
    const char *fn = "lowbit_cuda_quantize_blockwise";
    if (!valid_dtype(dtype) || !lowbit::fmt::is_supported_blocksize(blocksize) || n < 0)
        return argument_error(fn, "dtype, blocksize or n out of range");
    if (n == 0) return LOWBIT_CUDA_OK;
    if (code == nullptr || A == nullptr || out == nullptr || absmax == nullptr)
        return argument_error(fn, "null pointer");
    return on_device(fn, device, [&] {
        return quantize_blockwise(dtype, code, A, n, blocksize, out, absmax, as_stream(stream));
    });
}

int32_t lowbit_cuda_dequantize_blockwise(int32_t dtype, const float *code, const uint8_t *A,
                                         const float *absmax, int64_t n, int64_t blocksize, void *out,
                                         int32_t device, void *stream) {
    const char *fn = "lowbit_cuda_dequantize_blockwise";
    if (!valid_dtype(dtype) || !lowbit::fmt::is_supported_blocksize(blocksize) || n < 0)
        return argument_error(fn, "dtype, blocksize or n out of range");
    if (n == 0) return LOWBIT_CUDA_OK;
    if (code == nullptr || A == nullptr || out == nullptr || absmax == nullptr)
        return argument_error(fn, "null pointer");
    return on_device(fn, device, [&] {
        return dequantize_blockwise(dtype, code, A, absmax, n, blocksize, out, as_stream(stream));
    });
}

/* ---- gemv --------------------------------------------------------------------------------------- */
int32_t lowbit_cuda_gemv_4bit_max_rows(void) { return kGemvMaxRows; }

int32_t lowbit_cuda_gemv_4bit(int32_t dtype, const void *A, int64_t rows, const uint8_t *B, int64_t N,
                              int64_t K, const float *absmax, const float *code, int64_t blocksize,
                              const void *bias, int32_t bias_dtype, void *out, int32_t device,
                              void *stream) {
    const char *fn = "lowbit_cuda_gemv_4bit";
    if (!valid_dtype(dtype) || !lowbit::fmt::is_supported_blocksize(blocksize) || N < 0 || K < 0)
        return argument_error(fn, "dtype, blocksize, N or K out of range");
    if (rows < 0 || rows > kGemvMaxRows) return argument_error(fn, "rows must be in [0, 8]");
    if (bias != nullptr && !valid_dtype(bias_dtype)) return argument_error(fn, "bias_dtype out of range");
    if (rows == 0 || N == 0) return LOWBIT_CUDA_OK;
    if (K == 0) return argument_error(fn, "K == 0");
    if (A == nullptr || B == nullptr || absmax == nullptr || code == nullptr || out == nullptr)
        return argument_error(fn, "null pointer");
    return on_device(fn, device, [&] {
        return gemv_4bit(dtype, A, rows, B, N, K, absmax, code, blocksize, bias, bias_dtype, out,
                         as_stream(stream));
    });
}

/* ---- int8 --------------------------------------------------------------------------------------- */
int32_t lowbit_cuda_int8_vectorwise_quant(int32_t dtype, const void *A, int64_t rows, int64_t cols,
                                          float threshold, int8_t *out, float *row_stats,
                                          uint8_t *outlier_flags, int32_t device, void *stream) {
    const char *fn = "lowbit_cuda_int8_vectorwise_quant";
    if (!valid_dtype(dtype) || rows < 0 || cols < 0 || !(threshold >= 0.0f))
        return argument_error(fn, "dtype, rows, cols or threshold out of range");
    if (rows == 0 || cols == 0) return LOWBIT_CUDA_OK;
    if (A == nullptr || out == nullptr || row_stats == nullptr) return argument_error(fn, "null pointer");
    return on_device(fn, device, [&] {
        return int8_vectorwise_quant(dtype, A, rows, cols, threshold, out, row_stats, outlier_flags,
                                     as_stream(stream));
    });
}

int32_t lowbit_cuda_int8_vectorwise_dequant(const int8_t *A, const float *stats, int64_t rows,
                                            int64_t cols, float scale, float *out, int32_t device,
                                            void *stream) {
    const char *fn = "lowbit_cuda_int8_vectorwise_dequant";
    if (rows < 0 || cols < 0) return argument_error(fn, "rows or cols < 0");
    if (rows == 0 || cols == 0) return LOWBIT_CUDA_OK;
    if (A == nullptr || stats == nullptr || out == nullptr) return argument_error(fn, "null pointer");
    return on_device(fn, device, [&] {
        return int8_vectorwise_dequant(A, stats, rows, cols, scale, out, as_stream(stream));
    });
}

int32_t lowbit_cuda_int8_mm_dequant(const int32_t *A, const float *row_stats, const float *col_stats,
                                    int64_t rows, int64_t cols, float scale, const void *bias,
                                    int32_t bias_dtype, int32_t out_dtype, void *out, int32_t device,
                                    void *stream) {
    const char *fn = "lowbit_cuda_int8_mm_dequant";
    if (rows < 0 || cols < 0 || !valid_dtype(out_dtype) || (bias != nullptr && !valid_dtype(bias_dtype)))
        return argument_error(fn, "rows, cols or a dtype out of range");
    if (rows == 0 || cols == 0) return LOWBIT_CUDA_OK;
    if (A == nullptr || row_stats == nullptr || col_stats == nullptr || out == nullptr)
        return argument_error(fn, "null pointer");
    return on_device(fn, device, [&] {
        return int8_mm_dequant(A, row_stats, col_stats, rows, cols, scale, bias, bias_dtype, out_dtype,
                               out, as_stream(stream));
    });
}

/* ---- optimizers --------------------------------------------------------------------------------- */
int32_t lowbit_cuda_optimizer_update_32bit(int32_t optimizer, int32_t dtype, const void *g, void *p,
                                           float *state1, float *state2, int64_t n,
                                           const lowbit_cuda_optim_args *args, float *unorm_vec,
                                           double *scratch, int32_t device, void *stream) {
    const char *fn = "lowbit_cuda_optimizer_update_32bit";
    if (optimizer < kAdam || optimizer > kAdemamix || !valid_dtype(dtype) || n < 0 || args == nullptr || args->step < 1)
        return argument_error(fn, "optimizer, dtype, n, args or step out of range");
    if (n == 0) return LOWBIT_CUDA_OK;
    const bool two = optimizer == kAdam || optimizer == kAdemamix;
    if (g == nullptr || p == nullptr || state1 == nullptr || (two && state2 == nullptr))
        return argument_error(fn, "null pointer");
    const OptimParams params = make_params(optimizer, *args);
    if (params.trust_ratio && (unorm_vec == nullptr || scratch == nullptr))
        return argument_error(fn, "max_unorm > 0 needs unorm_vec and scratch");
    return on_device(fn, device, [&] {
        return optimizer_32bit(optimizer, dtype, g, p, state1, state2, n, params, unorm_vec, scratch,
                               as_stream(stream));
    });
}

int32_t lowbit_cuda_optimizer_update_8bit_blockwise(int32_t optimizer, int32_t dtype, const void *g,
                                                    void *p, uint8_t *state1, uint8_t *state2,
                                                    int64_t n, const lowbit_cuda_optim_args *args,
                                                    const float *qmap1, const float *qmap2,
                                                    float *absmax1, float *absmax2, int32_t device,
                                                    void *stream) {
    const char *fn = "lowbit_cuda_optimizer_update_8bit_blockwise";
    if (optimizer < kAdam || optimizer > kAdemamix || !valid_dtype(dtype) || n < 0 || args == nullptr || args->step < 1)
        return argument_error(fn, "optimizer, dtype, n, args or step out of range");
    if (n == 0) return LOWBIT_CUDA_OK;
    const bool two = optimizer == kAdam || optimizer == kAdemamix;
    if (g == nullptr || p == nullptr || state1 == nullptr || qmap1 == nullptr || absmax1 == nullptr ||
        (two && (state2 == nullptr || qmap2 == nullptr || absmax2 == nullptr)))
        return argument_error(fn, "null pointer");
    const OptimParams params = make_params(optimizer, *args);
    return on_device(fn, device, [&] {
        return optimizer_8bit_blockwise(optimizer, dtype, g, p, state1, state2, n, params, qmap1, qmap2,
                                        absmax1, absmax2, as_stream(stream));
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
