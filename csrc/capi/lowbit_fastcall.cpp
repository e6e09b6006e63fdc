/* _lowbit_fastcall: the decode product's call from Python without ctypes (optional).
 *
 * Decoding a token calls lowbit_matmul_4bit_interleaved once per layer, with 19 arguments.
 * ctypes converts each through its type objects and libffi (~1.5 us a call warm, more after a
 * layer's weights have flushed the caches); the layer's kernel is ~100 us, so that is a percent
 * or two of the decode (docs/design.md, "Per-call cost"). This module is a METH_FASTCALL function
 * that converts the same arguments from Python ints and calls the function at an address that
 * Python takes from the library it loaded with ctypes -- whichever build that is
 * (LOWBIT_CPU_LIBRARY included): the library itself stays free of Python, and without this module
 * lowbit calls the same function through ctypes (lowbit/backends/cpu/native.py).
 *
 * CPython's stable ABI (3.10+), so one build serves every CPython version; no torch.
 */
#ifndef Py_LIMITED_API /* CMake's USE_SABI 3.10 defines it */
#define Py_LIMITED_API 0x030A0000
#endif
#include <Python.h>

#include <climits>
#include <cstdint>

#include "lowbit_capi.h"

namespace {

using ProductFn = decltype(&lowbit_matmul_4bit_interleaved);

constexpr const char *kFunction = "lowbit_matmul_4bit_interleaved";

/* Raises an error naming the argument: OverflowError where the conversion raised one (an int out
 * of range), else TypeError. Returns false, for `if (!to_...(...)) return nullptr;`. */
bool refuse(const char *name, const char *expected) {
    PyObject *type = PyErr_Occurred() && PyErr_ExceptionMatches(PyExc_OverflowError) ? PyExc_OverflowError
                                                                                       : PyExc_TypeError;
    PyErr_Clear();
    PyErr_Format(type, "%s: argument %s must be %s", kFunction, name, expected);
    return false;
}

bool to_i64(PyObject *value, const char *name, int64_t *out) {
    const long long v = PyLong_AsLongLong(value);
    if (v == -1 && PyErr_Occurred()) return refuse(name, "an int in the int64 range");
    *out = static_cast<int64_t>(v);
    return true;
}

bool to_i32(PyObject *value, const char *name, int32_t *out) {
    const long long v = PyLong_AsLongLong(value);
    if ((v == -1 && PyErr_Occurred()) || v < INT32_MIN || v > INT32_MAX) {
        if (!PyErr_Occurred()) PyErr_SetNone(PyExc_OverflowError);
        return refuse(name, "an int in the int32 range");
    }
    *out = static_cast<int32_t>(v);
    return true;
}

/* An address: an int, or None for NULL (as ctypes takes a c_void_p argument). */
bool to_pointer(PyObject *value, const char *name, void **out) {
    if (value == Py_None) {
        *out = nullptr;
        return true;
    }
    if (!PyLong_Check(value)) return refuse(name, "an address (int) or None");
    void *v = PyLong_AsVoidPtr(value);
    if (v == nullptr && PyErr_Occurred()) return refuse(name, "an address (int) or None");
    *out = v;
    return true;
}

/* matmul_4bit_interleaved(function, a_dtype, A, M, K, B, B_len, absmax, absmax_len, code, code_len,
 * N, blocksize, bias, bias_len, bias_dtype, precision, out_dtype, out, num_threads) -> status:
 * `function` is the address of lowbit_matmul_4bit_interleaved, the rest are its arguments in order. */
PyObject *matmul_4bit_interleaved(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 20) {
        PyErr_Format(PyExc_TypeError, "%s takes the function's address and its 19 arguments (20), got %zd",
                     kFunction, nargs);
        return nullptr;
    }
    void *function = nullptr, *A = nullptr, *B = nullptr, *absmax = nullptr, *code = nullptr, *bias = nullptr,
         *out = nullptr;
    int64_t M = 0, K = 0, B_len = 0, absmax_len = 0, code_len = 0, N = 0, blocksize = 0, bias_len = 0;
    int32_t a_dtype = 0, bias_dtype = 0, precision = 0, out_dtype = 0, num_threads = 0;
    if (!to_pointer(args[0], "function", &function) || !to_i32(args[1], "a_dtype", &a_dtype) ||
        !to_pointer(args[2], "A", &A) || !to_i64(args[3], "M", &M) || !to_i64(args[4], "K", &K) ||
        !to_pointer(args[5], "B", &B) || !to_i64(args[6], "B_len", &B_len) ||
        !to_pointer(args[7], "absmax", &absmax) || !to_i64(args[8], "absmax_len", &absmax_len) ||
        !to_pointer(args[9], "code", &code) || !to_i64(args[10], "code_len", &code_len) ||
        !to_i64(args[11], "N", &N) || !to_i64(args[12], "blocksize", &blocksize) ||
        !to_pointer(args[13], "bias", &bias) || !to_i64(args[14], "bias_len", &bias_len) ||
        !to_i32(args[15], "bias_dtype", &bias_dtype) || !to_i32(args[16], "precision", &precision) ||
        !to_i32(args[17], "out_dtype", &out_dtype) || !to_pointer(args[18], "out", &out) ||
        !to_i32(args[19], "num_threads", &num_threads))
        return nullptr;
    if (function == nullptr) {
        PyErr_Format(PyExc_ValueError, "%s: argument function must not be NULL", kFunction);
        return nullptr;
    }
    const auto product = reinterpret_cast<ProductFn>(function);
    int32_t status;
    Py_BEGIN_ALLOW_THREADS /* as ctypes does: other Python threads run during the product */
    status = product(a_dtype, A, M, K, static_cast<const uint8_t *>(B), B_len, static_cast<const float *>(absmax),
                     absmax_len, static_cast<const float *>(code), code_len, N, blocksize, bias, bias_len, bias_dtype,
                     precision, out_dtype, out, num_threads);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(status);
}

PyMethodDef methods[] = {
    {"matmul_4bit_interleaved", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(matmul_4bit_interleaved)),
     METH_FASTCALL, "lowbit_matmul_4bit_interleaved at an address, with its arguments as Python ints."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_lowbit_fastcall", "lowbit's C ABI called without ctypes (csrc/capi/lowbit_fastcall.cpp)",
    0, methods, nullptr, nullptr, nullptr, nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__lowbit_fastcall(void) {
    PyObject *m = PyModule_Create(&module);
    /* the C ABI this was compiled against: Python uses the module only with a library of the same */
    if (m != nullptr && PyModule_AddIntConstant(m, "ABI_VERSION", LOWBIT_ABI_VERSION) != 0) {
        Py_DECREF(m);
        return nullptr;
    }
    return m;
}
