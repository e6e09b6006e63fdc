/* lowbit_capi_checks.h -- argument checks of the C ABIs (csrc/capi for the CPU library,
 * csrc/cuda/capi.cu for the GPU one), so that both refuse the same calls with the same words.
 *
 * The C ABI is the last line of defence for a caller that is not lowbit's Python layer: nothing
 * a caller passes may make the library read or write outside the buffers it declared. Every
 * buffer's element count is declared exactly once -- by the shape arguments (n; rows x cols;
 * M, K, N) for an op's operands and results, by its own `<name>_len` argument for every other
 * buffer (packed data, absmax, codes, statistics, bias, optimizer state) -- and the checks here
 * require the declarations to agree exactly, so an `n` larger than the packed data or an absmax
 * of another blocksize is refused instead of overflowing the heap.
 *
 * Host code only, O(1) per call. ArgCheck keeps the first failure's message; the entry point
 * stores it for its library's last-error function and returns the ARGUMENT status.
 */
#ifndef LOWBIT_CAPI_CHECKS_H
#define LOWBIT_CAPI_CHECKS_H

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>

#include "lowbit_formats.h"
#include "lowbit_int8.h"
#include "lowbit_optim.h"

namespace lowbit {
namespace capi {

/* Largest element count of any buffer or shape product: far beyond any tensor, small enough that
 * a byte offset (at most 8 bytes an element) and sums of a few such values fit int64. */
constexpr int64_t kMaxElements = int64_t{1} << 59;

/* a * b <= kMaxElements for a, b in [0, kMaxElements]. */
inline bool product_fits(int64_t a, int64_t b) { return a == 0 || b <= kMaxElements / a; }
/* Bytes holding n packed 4-bit values. */
inline int64_t packed4_len(int64_t n) { return n / 2 + n % 2; }
/* ceil(n / blocksize) for n >= 0, blocksize > 0. */
inline int64_t num_blocks(int64_t n, int64_t blocksize) { return n / blocksize + (n % blocksize != 0); }

class ArgCheck {
  public:
    explicit ArgCheck(const char *fn) : fn_(fn) { message_[0] = '\0'; }

    bool failed() const { return failed_; }
    /* "<fn>: <what failed>", valid while this object lives. */
    const char *message() const { return message_; }

    /* Records "<fn>: <printf text>" unless `ok` (only the first failure is kept). */
    ArgCheck &expect(bool ok, const char *format, ...) {
        if (ok || failed_) return *this;
        failed_ = true;
        int used = snprintf(message_, sizeof message_, "%s: ", fn_);
        if (used < 0 || used >= static_cast<int>(sizeof message_)) return *this;
        va_list args;
        va_start(args, format);
        vsnprintf(message_ + used, sizeof message_ - static_cast<size_t>(used), format, args);
        va_end(args);
        return *this;
    }
    /* 0 <= value <= kMaxElements. */
    ArgCheck &count(const char *name, int64_t value) {
        return expect(value >= 0 && value <= kMaxElements, "%s = %lld is out of range [0, 2^59]", name,
                      static_cast<long long>(value));
    }
    /* rows * cols (both already counted) <= kMaxElements. */
    ArgCheck &product(const char *a_name, int64_t a, const char *b_name, int64_t b) {
        return expect(product_fits(a, b), "%s * %s = %lld * %lld is too large", a_name, b_name,
                      static_cast<long long>(a), static_cast<long long>(b));
    }
    /* A buffer's declared element count equals what the shape implies (`rule` says how). */
    ArgCheck &length(const char *name, int64_t declared, int64_t required, const char *rule) {
        return expect(declared == required, "%s = %lld, but %s = %lld", name, static_cast<long long>(declared),
                      rule, static_cast<long long>(required));
    }
    ArgCheck &pointer(const char *name, const void *p) { return expect(p != nullptr, "%s is a null pointer", name); }
    /* An enum argument: `ok` tells whether `value` is one of the `valid` ones. */
    ArgCheck &enumeration(const char *name, int32_t value, bool ok, const char *valid) {
        return expect(ok, "%s = %d is not one of %s", name, static_cast<int>(value), valid);
    }

  private:
    const char *fn_;
    bool failed_ = false;
    char message_[320];
};

/* ---- checks shared by the entry points of both libraries ---------------------------------------- */

/* lowbit_dtype: 0 float32, 1 float16, 2 bfloat16. */
inline ArgCheck &check_dtype(ArgCheck &c, const char *name, int32_t dtype) {
    return c.enumeration(name, dtype, dtype >= 0 && dtype <= 2, "0 (float32), 1 (float16), 2 (bfloat16)");
}
inline ArgCheck &check_quant_type(ArgCheck &c, int32_t quant_type) {
    return c.enumeration("quant_type", quant_type, quant_type == fmt::kFP4 || quant_type == fmt::kNF4,
                         "0 (fp4), 1 (nf4)");
}
inline ArgCheck &check_blocksize(ArgCheck &c, int64_t blocksize) {
    return c.expect(fmt::is_supported_blocksize(blocksize), "blocksize = %lld is not a power of two in [32, 4096]",
                    static_cast<long long>(blocksize));
}
/* dtype, n and blocksize of a blockwise (de)quantization. */
inline ArgCheck &check_blockwise(ArgCheck &c, int32_t dtype, int64_t n, int64_t blocksize) {
    return check_blocksize(check_dtype(c, "dtype", dtype).count("n", n), blocksize);
}
/* The same for 8-bit blockwise, which also takes the larger blocks up to LOWBIT_MAX_BLOCKSIZE_8BIT. */
inline ArgCheck &check_blockwise_8bit(ArgCheck &c, int32_t dtype, int64_t n, int64_t blocksize) {
    return check_dtype(c, "dtype", dtype)
        .count("n", n)
        .expect(fmt::is_supported_blocksize_8bit(blocksize), "blocksize = %lld is not a power of two in [32, %d]",
                static_cast<long long>(blocksize), LOWBIT_MAX_BLOCKSIZE_8BIT);
}
/* A rows x cols matrix (either may be 0: nothing to do). */
inline ArgCheck &check_matrix(ArgCheck &c, int64_t rows, int64_t cols) {
    return c.count("rows", rows).count("cols", cols).product("rows", rows, "cols", cols);
}
/* LLM.int8 outlier threshold: 0 (and +Inf) mean "no outliers"; NaN and negative values are refused. */
inline ArgCheck &check_threshold(ArgCheck &c, float threshold) {
    return c.expect(threshold >= 0.0f, "threshold = %g must be >= 0", static_cast<double>(threshold));
}
/* An optional buffer of `required` elements: NULL with length 0, or a pointer with exactly that length. */
inline ArgCheck &check_optional(ArgCheck &c, const char *len_name, const void *p, int64_t len, int64_t required,
                                const char *rule, const char *null_rule) {
    return c.length(len_name, len, p == nullptr ? 0 : required, p == nullptr ? null_rule : rule);
}

/* optimizer, dtype, n and the step of an optimizer entry point (`step` is args->step; args may be NULL). */
template <class Args>
ArgCheck &check_optimizer_call(ArgCheck &c, int32_t optimizer, int32_t dtype, int64_t n, const Args *args) {
    c.enumeration("optimizer", optimizer, optimizer >= optim::kAdam && optimizer <= optim::kAdemamix,
                  "0 (adam) .. 5 (ademamix)");
    check_dtype(c, "dtype", dtype).count("n", n).pointer("args", args);
    return c.expect(args == nullptr || args->step >= 1, "args->step = %lld must be >= 1",
                    static_cast<long long>(args == nullptr ? 0 : args->step));
}
/* State lengths of a 32-bit step: state1 n floats (2n for ademamix), state2 n floats when used. */
inline ArgCheck &check_optimizer_32bit_lengths(ArgCheck &c, int32_t optimizer, int64_t n, int64_t state1_len,
                                               int64_t state2_len) {
    const bool ademamix = optimizer == optim::kAdemamix;
    c.length("state1_len", state1_len, ademamix ? 2 * n : n, ademamix ? "2 * n (ademamix)" : "n");
    return optim::has_state2(optimizer) ? c.length("state2_len", state2_len, n, "n") : c;
}
/* State lengths of an 8-bit blockwise step (256 values per absmax; ademamix keeps m1 and m2 in state1). */
inline ArgCheck &check_optimizer_8bit_lengths(ArgCheck &c, int32_t optimizer, int64_t n, int64_t state1_len,
                                              int64_t state2_len, int64_t qmap1_len, int64_t qmap2_len,
                                              int64_t absmax1_len, int64_t absmax2_len) {
    const bool ademamix = optimizer == optim::kAdemamix;
    const int64_t copies = ademamix ? 2 : 1, blocks = num_blocks(n, optim::kBlock8);
    c.length("state1_len", state1_len, copies * n, ademamix ? "2 * n (ademamix)" : "n")
        .length("absmax1_len", absmax1_len, copies * blocks, ademamix ? "2 * ceil(n / 256) (ademamix)" : "ceil(n / 256)")
        .length("qmap1_len", qmap1_len, fmt::kCode8Size, "the size of an 8-bit code");
    if (!optim::has_state2(optimizer)) return c;
    return c.length("state2_len", state2_len, n, "n")
        .length("absmax2_len", absmax2_len, blocks, "ceil(n / 256)")
        .length("qmap2_len", qmap2_len, fmt::kCode8Size, "the size of an 8-bit code");
}

} // namespace capi
} // namespace lowbit

#endif /* LOWBIT_CAPI_CHECKS_H */
