/* lowbit C ABI: the only symbols Python loads (through ctypes).
 *
 * No torch headers, no C++ types: raw pointers, element counts and enums, so that one
 * native library serves every torch version and a broken build degrades to the
 * reference backend instead of crashing the import.
 *
 * Every entry point returns a lowbit_status. Arguments are validated in Python before a
 * pointer is passed; the checks here are a second line of defence against segfaults, not
 * the user-facing error messages.
 *
 * Conventions shared by the quantization entry points (implemented in lowbit_capi.cpp):
 *  - dtype, quant_type, blocksize (32..4096, powers of two) and n >= 0 are checked first
 *    (LOWBIT_ERR_ARGUMENT); then n == 0 returns LOWBIT_OK without touching any pointer (null is
 *    fine for empty tensors); then every pointer must be non-null.
 *  - num_threads <= 1 runs on the calling thread; larger values allow up to that many threads,
 *    but only with at least 2^16 elements per thread. Results never depend on num_threads.
 *  - The caller's FTZ/DAZ or rounding-mode settings are ignored (IEEE round-to-nearest with
 *    subnormals is used, then the caller's state is restored).
 *  - LOWBIT_ERR_UNSUPPORTED from these functions means an internal allocation failed.
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
#define LOWBIT_ABI_VERSION 1

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
} lowbit_table;

LOWBIT_API int32_t lowbit_abi_version(void);
/* Compiler, flags and build type, one human-readable line. */
LOWBIT_API const char *lowbit_build_info(void);
/* Copies up to `capacity` values of a table into `out`; writes the table length to `*count`. */
LOWBIT_API int32_t lowbit_format_table(int32_t table, float *out, int32_t capacity, int32_t *count);

/* 4-bit blockwise quantization of n values of `dtype` at A.
 * out: (n+1)/2 bytes, element 2i in the high nibble of byte i; an odd tail gets a zero low nibble.
 * absmax: ceil(n/blocksize) floats. A block holding NaN or Inf gets a non-finite absmax and zero
 * bytes (Python turns that into a ValueError). */
LOWBIT_API int32_t lowbit_quantize_4bit(int32_t dtype, const void *A, int64_t n, int64_t blocksize,
                                        int32_t quant_type, uint8_t *out, float *absmax,
                                        int32_t num_threads);
/* Inverse: n values of `dtype` written to out, code[nibble] * absmax[block] rounded to nearest even. */
LOWBIT_API int32_t lowbit_dequantize_4bit(int32_t dtype, const uint8_t *A, const float *absmax,
                                          int64_t n, int64_t blocksize, int32_t quant_type,
                                          void *out, int32_t num_threads);

/* 8-bit blockwise quantization against a sorted 256-entry float code (see lowbit_formats.h for the
 * 65536-bin lookup that defines "nearest"). */
LOWBIT_API int32_t lowbit_quantize_blockwise(int32_t dtype, const float *code, const void *A,
                                             int64_t n, int64_t blocksize, uint8_t *out,
                                             float *absmax, int32_t num_threads);
LOWBIT_API int32_t lowbit_dequantize_blockwise(int32_t dtype, const float *code, const uint8_t *A,
                                               const float *absmax, int64_t n, int64_t blocksize,
                                               void *out, int32_t num_threads);

#ifdef __cplusplus
}
#endif

#endif /* LOWBIT_CAPI_H */
