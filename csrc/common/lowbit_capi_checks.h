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

} // namespace capi
} // namespace lowbit

#endif /* LOWBIT_CAPI_CHECKS_H */
