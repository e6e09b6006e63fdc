/* lowbit GPU C ABI: the symbols Python loads (ctypes) from liblowbit_cuda12.so, liblowbit_cuda13.so or liblowbit_hip.so.
 *
 * The same header serves both libraries (the HIP build is the same sources through compat.cuh);
 * "cuda" in the names means "this GPU library". No torch headers, no C++ types, no runtime
 * types: device pointers are `void *` / typed pointers, a stream is a `void *` holding a
 * cudaStream_t / hipStream_t (Python passes torch.cuda.current_stream().cuda_stream; 0 is the
 * legacy default stream), and `device` is the ordinal of the GPU the pointers live on (the call
 * switches to it and back).
 *
 * Every entry point returns a lowbit_cuda_status. On failure lowbit_cuda_last_error() returns a
 * readable message for the calling thread (argument, runtime error name and text). Arguments are
 * validated in Python first; the checks here (csrc/common/lowbit_capi_checks.h, shared with the CPU
 * library) protect any caller: every buffer's element count is declared once -- by the shape
 * arguments for an op's operands and results, by its own `<name>_len` for every other buffer
 * (packed data, absmax, codes, statistics, bias, optimizer state) -- and must agree exactly with
 * what the shape implies, so no argument values make a kernel index past a declared buffer.
 * Kernels are asynchronous: a LOWBIT_CUDA_OK return means "launched"; an error in a kernel shows
 * up at the next synchronizing call, as for any CUDA work.
 *
 * Conventions of the data entry points (layouts as in csrc/capi/lowbit_capi.h):
 *  - dtype: lowbit_dtype of lowbit_capi.h (0 float32, 1 float16, 2 bfloat16);
 *  - quant_type: 0 FP4, 1 NF4; blocksize: 32..4096, a power of two;
 *  - sizes are in [0, 2^59]; n == 0 (or rows == 0) returns OK without touching any pointer.
 */
#ifndef LOWBIT_CUDA_CAPI_H
#define LOWBIT_CUDA_CAPI_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define LOWBIT_CUDA_API __declspec(dllexport)
#else
#define LOWBIT_CUDA_API __attribute__((visibility("default")))
#endif

/* Bumped whenever a signature below changes; Python refuses a library with another value. */
#define LOWBIT_CUDA_ABI_VERSION 2

typedef enum lowbit_cuda_status {
    LOWBIT_CUDA_OK = 0,
    LOWBIT_CUDA_ERR_ARGUMENT = 1,    /* a size, enum or pointer is out of range */
    LOWBIT_CUDA_ERR_UNSUPPORTED = 2, /* valid request this build or device cannot serve */
    LOWBIT_CUDA_ERR_RUNTIME = 3,     /* the CUDA/HIP runtime reported an error (see last_error) */
} lowbit_cuda_status;

/* Optimizers of the two optimizer entry points (aliases resolved by the caller:
 * adamw, lamb -> ADAM; lars -> MOMENTUM). */
typedef enum lowbit_cuda_optimizer {
    LOWBIT_CUDA_ADAM = 0,
    LOWBIT_CUDA_MOMENTUM = 1,
    LOWBIT_CUDA_RMSPROP = 2,
    LOWBIT_CUDA_ADAGRAD = 3,
    LOWBIT_CUDA_LION = 4,
    LOWBIT_CUDA_ADEMAMIX = 5,
} lowbit_cuda_optimizer;

/* Hyper-parameters of one step, as the op receives them (Python floats are doubles). The library
 * derives 1 - beta, the bias corrections etc. in double as the reference does. */
typedef struct lowbit_cuda_optim_args {
    double beta1, beta2, beta3, alpha, eps, weight_decay, lr, gnorm_scale;
    double max_unorm;  /* > 0: LAMB/LARS trust ratio (32-bit adam, momentum, rmsprop) */
    double param_norm; /* ||p||, for the trust ratio */
    int64_t step;      /* >= 1 */
} lowbit_cuda_optim_args;

/* ---- identity and health ---------------------------------------------------------------------- */
LOWBIT_CUDA_API int32_t lowbit_cuda_abi_version(void);
/* One human-readable line: version, platform, compiler, runtime version, targets, flags. */
LOWBIT_CUDA_API const char *lowbit_cuda_build_info(void);
/* "cuda" or "hip". */
LOWBIT_CUDA_API const char *lowbit_cuda_platform(void);
/* The device code in this library, space-separated: "sm_75 sm_80 ... compute_120" (SASS and PTX)
 * for CUDA, "gfx906 gfx90a ..." for HIP. */
LOWBIT_CUDA_API const char *lowbit_cuda_targets(void);
/* Message of the last failure on this thread ("" if none). Valid until the next call. */
LOWBIT_CUDA_API const char *lowbit_cuda_last_error(void);
/* Initializes the runtime on `device` and checks that this library has a kernel image the device
 * can run. Fails (RUNTIME / UNSUPPORTED, with last_error) e.g. when the driver is older than the
 * library's runtime or the device's architecture was not compiled in. */
LOWBIT_CUDA_API int32_t lowbit_cuda_device_check(int32_t device);

/* ---- 4-bit blockwise ----------------------------------------------------------------------------
 * quantize: the n values at A -> out (out_len = (n+1)/2 bytes), absmax (absmax_len = ceil(n/blocksize));
 * dequantize: A (A_len = (n+1)/2 bytes), absmax -> the n values at out. */
LOWBIT_CUDA_API int32_t lowbit_cuda_quantize_4bit(int32_t dtype, const void *A, int64_t n,
                                                  int64_t blocksize, int32_t quant_type,
                                                  uint8_t *out, int64_t out_len, float *absmax,
                                                  int64_t absmax_len, int32_t device, void *stream);
LOWBIT_CUDA_API int32_t lowbit_cuda_dequantize_4bit(int32_t dtype, const uint8_t *A, int64_t A_len,
                                                    const float *absmax, int64_t absmax_len,
                                                    int64_t blocksize, int32_t quant_type, void *out,
                                                    int64_t n, int32_t device, void *stream);

/* ---- 8-bit blockwise (code: code_len = 256 floats on the device) ----------------------------------
 * quantize: the n values at A -> out (out_len = n bytes), absmax (absmax_len = ceil(n/blocksize));
 * dequantize: A (A_len = n bytes), absmax -> the n values at out. */
LOWBIT_CUDA_API int32_t lowbit_cuda_quantize_blockwise(int32_t dtype, const float *code, int64_t code_len,
                                                       const void *A, int64_t n, int64_t blocksize,
                                                       uint8_t *out, int64_t out_len, float *absmax,
                                                       int64_t absmax_len, int32_t device, void *stream);
LOWBIT_CUDA_API int32_t lowbit_cuda_dequantize_blockwise(int32_t dtype, const float *code, int64_t code_len,
                                                         const uint8_t *A, int64_t A_len, const float *absmax,
                                                         int64_t absmax_len, int64_t blocksize, void *out,
                                                         int64_t n, int32_t device, void *stream);

/* ---- 4-bit matrix-vector product ------------------------------------------------------------------
 * out[m, n] = sum_k A[m, k] * W[n, k] (+ bias[n]) for m < rows (1..8), W the packed (N, K) weight
 * (B_len = (N*K+1)/2 bytes) with absmax (absmax_len = ceil(N*K/blocksize)) and a float code
 * (code_len = 16) on the device. A (rows x K), out (rows x N): dtype; bias: bias_len = N values of
 * bias_dtype, or NULL with length 0. */
LOWBIT_CUDA_API int32_t lowbit_cuda_gemv_4bit(int32_t dtype, const void *A, int64_t rows,
                                              const uint8_t *B, int64_t B_len, int64_t N, int64_t K,
                                              const float *absmax, int64_t absmax_len, const float *code,
                                              int64_t code_len, int64_t blocksize, const void *bias,
                                              int64_t bias_len, int32_t bias_dtype, void *out,
                                              int32_t device, void *stream);
/* Largest `rows` lowbit_cuda_gemv_4bit accepts. */
LOWBIT_CUDA_API int32_t lowbit_cuda_gemv_4bit_max_rows(void);

/* ---- LLM.int8 ------------------------------------------------------------------------------------
 * vectorwise quant of a (rows, cols) matrix (row_stats_len = rows); threshold >= 0 and finite,
 * > 0 marks |x| >= threshold as outliers. outlier_flags (outlier_flags_len = cols bytes, or NULL
 * with length 0): set to 1 for outlier columns, whose q are all zeroed; with NULL only the outlier
 * elements are zeroed (the column-wise half of double quant). */
LOWBIT_CUDA_API int32_t lowbit_cuda_int8_vectorwise_quant(int32_t dtype, const void *A,
                                                          int64_t rows, int64_t cols,
                                                          float threshold, int8_t *out,
                                                          float *row_stats, int64_t row_stats_len,
                                                          uint8_t *outlier_flags, int64_t outlier_flags_len,
                                                          int32_t device, void *stream);
/* out (float32) = (float(A) * stats[row]) * scale; stats_len = rows. */
LOWBIT_CUDA_API int32_t lowbit_cuda_int8_vectorwise_dequant(const int8_t *A, const float *stats,
                                                            int64_t stats_len, int64_t rows, int64_t cols,
                                                            float scale, float *out, int32_t device,
                                                            void *stream);
/* out (out_dtype) = ((float(A) * (row_stats[r] * col_stats[c])) * scale) [+ bias[c]];
 * row_stats_len = rows, col_stats_len = cols, bias_len = cols (or NULL with length 0). */
LOWBIT_CUDA_API int32_t lowbit_cuda_int8_mm_dequant(const int32_t *A, const float *row_stats,
                                                    int64_t row_stats_len, const float *col_stats,
                                                    int64_t col_stats_len, int64_t rows, int64_t cols,
                                                    float scale, const void *bias, int64_t bias_len,
                                                    int32_t bias_dtype, int32_t out_dtype, void *out,
                                                    int32_t device, void *stream);

/* ---- optimizers ----------------------------------------------------------------------------------
 * n parameters; g, p: dtype; ADEMAMIX's state1 holds 2n values (m1 then m2). The states an
 * optimizer does not use (state2 etc. of one-state optimizers) are ignored, pointer and length.
 * 32-bit: state1/state2 float32 (state1_len = n, 2n for ADEMAMIX; state2_len = n). With
 * args->max_unorm > 0 (adam, momentum, rmsprop), unorm_vec (1 float) receives the update norm and
 * `scratch` (1 double of device memory) is used for it.
 * 8-bit blockwise: state bytes with 256-value blocks (state1_len = n, 2n for ADEMAMIX; state2_len
 * = n); absmax1_len = ceil(n/256) (twice that for ADEMAMIX), absmax2_len = ceil(n/256); qmap1/qmap2:
 * 256-entry codes. Non-finite values: csrc/common/lowbit_optim.h. */
LOWBIT_CUDA_API int32_t lowbit_cuda_optimizer_update_32bit(
    int32_t optimizer, int32_t dtype, const void *g, void *p, int64_t n, float *state1, int64_t state1_len,
    float *state2, int64_t state2_len, const lowbit_cuda_optim_args *args, float *unorm_vec, double *scratch,
    int32_t device, void *stream);
LOWBIT_CUDA_API int32_t lowbit_cuda_optimizer_update_8bit_blockwise(
    int32_t optimizer, int32_t dtype, const void *g, void *p, int64_t n, uint8_t *state1, int64_t state1_len,
    uint8_t *state2, int64_t state2_len, const lowbit_cuda_optim_args *args, const float *qmap1,
    int64_t qmap1_len, const float *qmap2, int64_t qmap2_len, float *absmax1, int64_t absmax1_len,
    float *absmax2, int64_t absmax2_len, int32_t device, void *stream);

/* ---- paged (managed) memory ---------------------------------------------------------------------- */
/* *supported = 1 when `device` can access managed memory concurrently with the host (paging). */
LOWBIT_CUDA_API int32_t lowbit_cuda_managed_supported(int32_t device, int32_t *supported);
/* Allocates `bytes` of managed memory (cudaMallocManaged, attach global) while `device` is current. */
LOWBIT_CUDA_API int32_t lowbit_cuda_managed_alloc(int64_t bytes, int32_t device, void **out);
LOWBIT_CUDA_API int32_t lowbit_cuda_managed_free(void *ptr);
/* Asynchronously migrates [ptr, ptr + bytes) to `device`, or to the host when device < 0. */
LOWBIT_CUDA_API int32_t lowbit_cuda_prefetch(const void *ptr, int64_t bytes, int32_t device,
                                             void *stream);

#ifdef __cplusplus
}
#endif

#endif /* LOWBIT_CUDA_CAPI_H */
