/* fuzz_capi.cpp -- libFuzzer target for every exported entry point of liblowbit_cpu (lowbit_capi.h).
 *
 * Built with clang -fsanitize=fuzzer,address,undefined (CMake option LOWBIT_FUZZ, `nox -s fuzz`); the
 * library itself is built with the same sanitizers and coverage instrumentation. The first input
 * byte picks the entry point (Entry), the second the CPU ISA whose kernels run; the rest
 * (FuzzedDataProvider) gives the arguments:
 *  - shape arguments (n, rows, cols, M, K, N, blocksize, ...) are mostly small, sometimes an edge
 *    value (negative, 2^59 + 1, INT64_MAX, 2^17, ...);
 *  - every other buffer's declared length is mostly the one the shape implies, sometimes off by a
 *    little or anything;
 *  - every buffer is a heap allocation of exactly its declared (or shape-implied) size, so ASan
 *    reports any access past it; a size that cannot be allocated (beyond kMaxElements) is passed as
 *    a null pointer, so the library must refuse the call rather than touch it -- the fuzzer never
 *    lies about a buffer's size, only the library can be wrong;
 *  - any pointer may be null; buffer contents, codes, hyper-parameters, thresholds and scales are
 *    raw input bytes (NaN, Inf, subnormals, unsorted codes).
 * Oracles: the sanitizers (out-of-bounds access, undefined behaviour, leaks), plus: a refused call
 * (LOWBIT_ERR_ARGUMENT) writes nothing and sets a message naming its function; a status is one of
 * lowbit_status. A finding aborts (the input is saved by libFuzzer).
 * At exit the target prints how many calls of each entry point were accepted and refused
 * ("lowbit fuzz: <entry> ok=<n> refused=<n>"), so a run can show that every entry point was reached
 * beyond its checks.
 */
#include <fuzzer/FuzzedDataProvider.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <limits>
#include <memory>
#include <vector>

#include "lowbit_capi.h"

namespace {

/* Largest buffer (elements) the target allocates; anything larger is passed as NULL. Small enough
 * that one execution stays well under a millisecond, large enough for the threaded paths
 * (2^16 elements per thread) to run now and then. */
constexpr int64_t kMaxElements = int64_t{1} << 17;

enum Entry {
    kInfo, /* abi_version, last_error, build_info, cpu_isa_supported, cpu_isa, cpu_features(_supported) */
    kSetCpuIsa,
    kSetCpuFeatures,
    kFormatTable,
    kQuantize4bit,
    kDequantize4bit,
    kQuantizeBlockwise,
    kDequantizeBlockwise,
    kGemv4bit,
    kInterleave4bit,
    kMatmul4bitInterleaved,
    kInt8LinearMatmul,
    kInt8VectorwiseQuant,
    kInt8ColwiseQuant,
    kInt8VectorwiseDequant,
    kInt8MmDequant,
    kOptimizer32bit,
    kOptimizer8bit,
    kNumEntries,
};
const char *const kEntryNames[kNumEntries] = {
    "info", "set_cpu_isa", "set_cpu_features", "format_table", "quantize_4bit", "dequantize_4bit",
    "quantize_blockwise", "dequantize_blockwise", "gemv_4bit", "interleave_4bit", "matmul_4bit_interleaved",
    "int8_linear_matmul", "int8_vectorwise_quant",
    "int8_colwise_quant", "int8_vectorwise_dequant", "int8_mm_dequant", "optimizer_update_32bit",
    "optimizer_update_8bit_blockwise",
};

/* Calls per entry point and outcome (0 ok, 1 refused, 2 unsupported), printed at exit. */
long g_outcomes[kNumEntries][3];

struct Summary {
    ~Summary() {
        long total = 0;
        for (int e = 0; e < kNumEntries; ++e) total += g_outcomes[e][0] + g_outcomes[e][1] + g_outcomes[e][2];
        if (total == 0) return;
        for (int e = 0; e < kNumEntries; ++e)
            fprintf(stderr, "lowbit fuzz: %s ok=%ld refused=%ld unsupported=%ld\n", kEntryNames[e], g_outcomes[e][0],
                    g_outcomes[e][1], g_outcomes[e][2]);
    }
} g_summary;

[[noreturn]] void finding(const char *what, int entry) {
    fprintf(stderr, "lowbit fuzz finding: %s: %s (last error: \"%s\")\n", kEntryNames[entry], what, lowbit_last_error());
    abort();
}

/* a * b, or -1 when either is negative or the product exceeds kMaxElements. */
int64_t alloc_product(int64_t a, int64_t b) {
    if (a < 0 || b < 0) return -1;
    if (a != 0 && b > kMaxElements / a) return -1;
    return a * b;
}

class Fuzz {
  public:
    Fuzz(const uint8_t *data, size_t size) : d_(data, size) {}

    FuzzedDataProvider &data() { return d_; }

    /* True one time in `one_in` (false once the input is used up, when every choice takes its
     * common branch). */
    bool rare(int one_in) { return d_.ConsumeIntegralInRange<int>(1, one_in) == one_in; }

    /* A shape argument: mostly in [0, typical], sometimes an edge value. */
    int64_t shape(int64_t typical) {
        static const int64_t kEdges[] = {-1,
                                         -65536,
                                         std::numeric_limits<int64_t>::min(),
                                         std::numeric_limits<int64_t>::max(),
                                         (int64_t{1} << 59) + 1,
                                         int64_t{1} << 59,
                                         int64_t{1} << 62,
                                         int64_t{1} << 31,
                                         (int64_t{1} << 32) + 1,
                                         int64_t{1} << 17,
                                         (int64_t{1} << 17) - 1,
                                         kMaxElements + 1};
        if (rare(16))
            return kEdges[d_.ConsumeIntegralInRange<size_t>(0, sizeof kEdges / sizeof kEdges[0] - 1)];
        return d_.ConsumeIntegralInRange<int64_t>(0, typical);
    }
    /* A blocksize: mostly a supported one. */
    int64_t blocksize() {
        if (rare(8)) return shape(5000);
        return int64_t{32} << d_.ConsumeIntegralInRange<int>(0, 7);
    }
    /* A row length: mostly 1 to `max_blocks` whole blocks of `blocksize` (what the interleaved layout
     * needs), sometimes any shape. */
    int64_t whole_blocks(int64_t blocksize, int64_t max_blocks) {
        int64_t k;
        if (rare(8) || __builtin_mul_overflow(blocksize, d_.ConsumeIntegralInRange<int64_t>(1, max_blocks), &k))
            return shape(300);
        return k;
    }
    /* An enum argument: mostly in [0, count), sometimes anything. */
    int32_t choice(int32_t count) {
        if (rare(16)) return d_.ConsumeIntegral<int32_t>();
        return d_.ConsumeIntegralInRange<int32_t>(0, count - 1);
    }
    /* The declared length of a buffer whose shape implies `implied` elements. */
    int64_t length(int64_t implied) {
        switch (d_.ConsumeIntegralInRange<int>(0, 15)) {
        case 15: return shape(300);
        case 14: {
            int64_t near;
            return __builtin_add_overflow(implied, d_.ConsumeIntegralInRange<int64_t>(-2, 2), &near) ? implied : near;
        }
        default: return implied;
        }
    }
    float scalar_float() { return d_.ConsumeFloatingPoint<float>(); }
    double scalar_double() {
        if (d_.ConsumeBool()) return d_.ConsumeFloatingPointInRange<double>(-2.0, 2.0);
        return d_.ConsumeFloatingPoint<double>();
    }
    int32_t threads() { return d_.ConsumeIntegralInRange<int32_t>(-1, 4); }

    /* A heap buffer of exactly `count` elements of `elem` bytes filled from the input (NULL when
     * `count` cannot be allocated, or 1 time in 40 to test the null checks). Owned by this object
     * until the end of the execution. */
    void *buffer(int64_t count, size_t elem) {
        if (count < 0 || count > kMaxElements || rare(40)) return nullptr;
        const size_t bytes = static_cast<size_t>(count) * elem;
        buffers_.emplace_back(new uint8_t[bytes], bytes);
        uint8_t *p = buffers_.back().data.get();
        const std::vector<uint8_t> fill = d_.ConsumeBytes<uint8_t>(d_.ConsumeIntegralInRange<size_t>(0, 64));
        for (size_t i = 0; i < bytes; ++i) p[i] = fill.empty() ? static_cast<uint8_t>(i * 37u) : fill[i % fill.size()];
        return p;
    }
    /* A code of `count` floats: a sorted ramp over [-1, 1] (what a caller passes), or raw bytes. */
    float *code(int64_t count) {
        auto *c = static_cast<float *>(buffer(count, sizeof(float)));
        if (c != nullptr && d_.ConsumeBool())
            for (int64_t i = 0; i < count; ++i) c[i] = -1.0f + 2.0f * static_cast<float>(i) / static_cast<float>(count - 1);
        return c;
    }

    /* Copies of every buffer, to check that a refused call wrote nothing. */
    void snapshot() {
        for (auto &b : buffers_) b.before.assign(b.data.get(), b.data.get() + b.bytes);
    }
    bool unchanged() const {
        for (const auto &b : buffers_)
            if (b.bytes != 0 && memcmp(b.before.data(), b.data.get(), b.bytes) != 0) return false;
        return true;
    }

  private:
    struct Owned {
        Owned(uint8_t *p, size_t n) : data(p), bytes(n) {}
        std::unique_ptr<uint8_t[]> data;
        size_t bytes;
        std::vector<uint8_t> before;
    };
    FuzzedDataProvider d_;
    std::vector<Owned> buffers_;
};

constexpr size_t kDtypeSize[3] = {4, 2, 2};
size_t dtype_size(int32_t dtype) { return dtype >= 0 && dtype < 3 ? kDtypeSize[dtype] : 4; }
int64_t packed4(int64_t n) { return n < 0 ? n : n / 2 + n % 2; }
int64_t blocks(int64_t n, int64_t blocksize) { return blocksize > 0 && n >= 0 ? n / blocksize + (n % blocksize != 0) : 1; }

/* Runs one entry point; returns its status. */
int32_t run(int entry, Fuzz &f) {
    FuzzedDataProvider &d = f.data();
    switch (entry) {
    case kInfo: {
        const int32_t isa = f.choice(3);
        if (lowbit_abi_version() != LOWBIT_ABI_VERSION || lowbit_build_info() == nullptr || lowbit_last_error() == nullptr)
            finding("identity", entry);
        const int32_t supported = lowbit_cpu_isa_supported(isa);
        if ((supported != 0 && supported != 1) || lowbit_cpu_isa_supported(lowbit_cpu_isa()) != 1)
            finding("ISA support", entry);
        if ((lowbit_cpu_features() & ~lowbit_cpu_features_supported()) != 0) finding("features", entry);
        return LOWBIT_OK;
    }
    case kSetCpuIsa: return lowbit_set_cpu_isa(f.choice(3));
    case kSetCpuFeatures: return lowbit_set_cpu_features(f.choice(4));
    case kFormatTable: {
        const int32_t table = f.choice(8), capacity = static_cast<int32_t>(f.shape(300));
        auto *out = static_cast<float *>(f.buffer(capacity, sizeof(float)));
        auto *count = static_cast<int32_t *>(f.buffer(1, sizeof(int32_t)));
        f.snapshot();
        return lowbit_format_table(table, out, capacity, count);
    }
    case kQuantize4bit: {
        const int32_t dtype = f.choice(3), quant_type = f.choice(2);
        const int64_t n = f.shape(3000), blocksize = f.blocksize();
        const int64_t out_len = f.length(packed4(n)), absmax_len = f.length(blocks(n, blocksize));
        const void *A = f.buffer(n, dtype_size(dtype));
        auto *out = static_cast<uint8_t *>(f.buffer(out_len, 1));
        auto *absmax = static_cast<float *>(f.buffer(absmax_len, 4));
        f.snapshot();
        return lowbit_quantize_4bit(dtype, A, n, blocksize, quant_type, out, out_len, absmax, absmax_len, f.threads());
    }
    case kDequantize4bit: {
        const int32_t dtype = f.choice(3);
        const int64_t n = f.shape(3000), blocksize = f.blocksize();
        const int64_t A_len = f.length(packed4(n)), absmax_len = f.length(blocks(n, blocksize)), code_len = f.length(16);
        auto *A = static_cast<const uint8_t *>(f.buffer(A_len, 1));
        auto *absmax = static_cast<const float *>(f.buffer(absmax_len, 4));
        const float *code = f.code(code_len);
        void *out = f.buffer(n, dtype_size(dtype));
        f.snapshot();
        return lowbit_dequantize_4bit(dtype, A, A_len, absmax, absmax_len, blocksize, code, code_len, out, n, f.threads());
    }
    case kQuantizeBlockwise: {
        const int32_t dtype = f.choice(3);
        const int64_t n = f.shape(3000), blocksize = f.blocksize();
        const int64_t code_len = f.length(256), out_len = f.length(n), absmax_len = f.length(blocks(n, blocksize));
        const float *code = f.code(code_len);
        const void *A = f.buffer(n, dtype_size(dtype));
        auto *out = static_cast<uint8_t *>(f.buffer(out_len, 1));
        auto *absmax = static_cast<float *>(f.buffer(absmax_len, 4));
        f.snapshot();
        return lowbit_quantize_blockwise(dtype, code, code_len, A, n, blocksize, out, out_len, absmax, absmax_len,
                                         f.threads());
    }
    case kDequantizeBlockwise: {
        const int32_t dtype = f.choice(3);
        const int64_t n = f.shape(3000), blocksize = f.blocksize();
        const int64_t code_len = f.length(256), A_len = f.length(n), absmax_len = f.length(blocks(n, blocksize));
        const float *code = f.code(code_len);
        auto *A = static_cast<const uint8_t *>(f.buffer(A_len, 1));
        auto *absmax = static_cast<const float *>(f.buffer(absmax_len, 4));
        void *out = f.buffer(n, dtype_size(dtype));
        f.snapshot();
        return lowbit_dequantize_blockwise(dtype, code, code_len, A, A_len, absmax, absmax_len, blocksize, out, n,
                                           f.threads());
    }
    case kGemv4bit: {
        const int32_t a_dtype = f.choice(3), out_dtype = f.choice(3);
        const int64_t M = f.shape(10), K = f.shape(300), N = f.shape(40), blocksize = f.blocksize();
        const int64_t nk = alloc_product(N, K);
        const int64_t B_len = f.length(packed4(nk)), absmax_len = f.length(blocks(nk, blocksize)), code_len = f.length(16);
        const void *A = f.buffer(alloc_product(M, K), dtype_size(a_dtype));
        auto *B = static_cast<const uint8_t *>(f.buffer(B_len, 1));
        auto *absmax = static_cast<const float *>(f.buffer(absmax_len, 4));
        const float *code = f.code(code_len);
        void *out = f.buffer(alloc_product(M, N), dtype_size(out_dtype));
        f.snapshot();
        return lowbit_gemv_4bit(a_dtype, A, M, K, B, B_len, absmax, absmax_len, code, code_len, N, blocksize,
                                out_dtype, out, f.threads());
    }
    case kInterleave4bit: {
        const int32_t inverse = f.choice(2);
        const int64_t N = f.shape(40), blocksize = f.blocksize(), K = f.whole_blocks(blocksize, 2);
        const int64_t nk = alloc_product(N, K);
        const int64_t B_len = f.length(packed4(nk)), absmax_len = f.length(blocks(nk, blocksize));
        const int64_t B_out_len = f.length(packed4(nk)), absmax_out_len = f.length(blocks(nk, blocksize));
        auto *B = static_cast<const uint8_t *>(f.buffer(B_len, 1));
        auto *absmax = static_cast<const float *>(f.buffer(absmax_len, 4));
        auto *B_out = static_cast<uint8_t *>(f.buffer(B_out_len, 1));
        auto *absmax_out = static_cast<float *>(f.buffer(absmax_out_len, 4));
        f.snapshot();
        return lowbit_interleave_4bit(B, B_len, absmax, absmax_len, N, K, blocksize, inverse, B_out, B_out_len,
                                      absmax_out, absmax_out_len, f.threads());
    }
    case kMatmul4bitInterleaved: {
        const int32_t a_dtype = f.choice(3), out_dtype = f.choice(3), bias_dtype = f.choice(3), precision = f.choice(2);
        const int64_t M = f.shape(20), N = f.shape(40), blocksize = f.blocksize(), K = f.whole_blocks(blocksize, 2);
        const int64_t nk = alloc_product(N, K);
        const int64_t B_len = f.length(packed4(nk)), absmax_len = f.length(blocks(nk, blocksize)), code_len = f.length(16);
        const bool with_bias = d.ConsumeBool();
        const int64_t bias_len = with_bias ? f.length(N) : 0;
        const void *A = f.buffer(alloc_product(M, K), dtype_size(a_dtype));
        auto *B = static_cast<const uint8_t *>(f.buffer(B_len, 1));
        auto *absmax = static_cast<const float *>(f.buffer(absmax_len, 4));
        const float *code = f.code(code_len);
        const void *bias = with_bias ? f.buffer(bias_len, dtype_size(bias_dtype)) : nullptr;
        void *out = f.buffer(alloc_product(M, N), dtype_size(out_dtype));
        f.snapshot();
        return lowbit_matmul_4bit_interleaved(a_dtype, A, M, K, B, B_len, absmax, absmax_len, code, code_len, N,
                                              blocksize, bias, bias_len, bias_dtype, precision, out_dtype, out,
                                              f.threads());
    }
    case kInt8LinearMatmul: {
        const int64_t M = f.shape(40), K = f.shape(300), N = f.shape(40);
        auto *A = static_cast<const int8_t *>(f.buffer(alloc_product(M, K), 1));
        auto *B = static_cast<const int8_t *>(f.buffer(alloc_product(N, K), 1));
        auto *out = static_cast<int32_t *>(f.buffer(alloc_product(M, N), 4));
        f.snapshot();
        return lowbit_int8_linear_matmul(A, M, K, B, N, out, f.threads());
    }
    case kInt8VectorwiseQuant:
    case kInt8ColwiseQuant: {
        const int32_t dtype = f.choice(3);
        const int64_t rows = f.shape(60), cols = f.shape(200);
        const float threshold = d.ConsumeBool() ? 0.0f : f.scalar_float();
        const bool by_row = entry == kInt8VectorwiseQuant;
        const int64_t stats_len = f.length(by_row ? rows : cols);
        const bool with_flags = by_row && d.ConsumeBool();
        const int64_t flags_len = with_flags ? f.length(cols) : 0;
        const void *A = f.buffer(alloc_product(rows, cols), dtype_size(dtype));
        auto *out = static_cast<int8_t *>(f.buffer(alloc_product(rows, cols), 1));
        auto *stats = static_cast<float *>(f.buffer(stats_len, 4));
        auto *flags = with_flags ? static_cast<uint8_t *>(f.buffer(flags_len, 1)) : nullptr;
        f.snapshot();
        if (by_row)
            return lowbit_int8_vectorwise_quant(dtype, A, rows, cols, threshold, out, stats, stats_len, flags,
                                                flags_len, f.threads());
        return lowbit_int8_colwise_quant(dtype, A, rows, cols, threshold, out, stats, stats_len, f.threads());
    }
    case kInt8VectorwiseDequant: {
        const int64_t rows = f.shape(60), cols = f.shape(200), stats_len = f.length(rows);
        auto *A = static_cast<const int8_t *>(f.buffer(alloc_product(rows, cols), 1));
        auto *stats = static_cast<const float *>(f.buffer(stats_len, 4));
        auto *out = static_cast<float *>(f.buffer(alloc_product(rows, cols), 4));
        const float scale = f.scalar_float();
        f.snapshot();
        return lowbit_int8_vectorwise_dequant(A, stats, stats_len, rows, cols, scale, out, f.threads());
    }
    case kInt8MmDequant: {
        const int32_t bias_dtype = f.choice(3), out_dtype = f.choice(3);
        const int64_t rows = f.shape(60), cols = f.shape(200);
        const int64_t row_len = f.length(rows), col_len = f.length(cols);
        const bool with_bias = d.ConsumeBool();
        const int64_t bias_len = with_bias ? f.length(cols) : 0;
        auto *A = static_cast<const int32_t *>(f.buffer(alloc_product(rows, cols), 4));
        auto *row_stats = static_cast<const float *>(f.buffer(row_len, 4));
        auto *col_stats = static_cast<const float *>(f.buffer(col_len, 4));
        const void *bias = with_bias ? f.buffer(bias_len, dtype_size(bias_dtype)) : nullptr;
        void *out = f.buffer(alloc_product(rows, cols), dtype_size(out_dtype));
        const float scale = f.scalar_float();
        f.snapshot();
        return lowbit_int8_mm_dequant(A, row_stats, row_len, col_stats, col_len, rows, cols, scale, bias, bias_len,
                                      bias_dtype, out_dtype, out, f.threads());
    }
    case kOptimizer32bit:
    case kOptimizer8bit: {
        const int32_t optimizer = f.choice(6), dtype = f.choice(3);
        const int64_t n = f.shape(3000);
        const int64_t copies = optimizer == LOWBIT_OPTIM_ADEMAMIX ? 2 : 1;
        lowbit_optim_args args{};
        args.beta1 = f.scalar_double();
        args.beta2 = f.scalar_double();
        args.beta3 = f.scalar_double();
        args.alpha = f.scalar_double();
        args.eps = f.scalar_double();
        args.weight_decay = f.scalar_double();
        args.lr = f.scalar_double();
        args.gnorm_scale = f.scalar_double();
        args.step = f.rare(16) ? d.ConsumeIntegral<int64_t>() : d.ConsumeIntegralInRange<int64_t>(1, 100);
        args.max_unorm = d.ConsumeBool() ? 0.0 : f.scalar_double();
        args.param_norm = f.scalar_double();
        const lowbit_optim_args *args_ptr = f.rare(40) ? nullptr : &args;
        const void *g = f.buffer(n, dtype_size(dtype));
        void *p = f.buffer(n, dtype_size(dtype));
        const int64_t state1_len = f.length(alloc_product(copies, n)), state2_len = f.length(n);
        if (entry == kOptimizer32bit) {
            auto *state1 = static_cast<float *>(f.buffer(state1_len, 4));
            auto *state2 = static_cast<float *>(f.buffer(state2_len, 4));
            auto *unorm = static_cast<float *>(f.buffer(1, 4));
            f.snapshot();
            return lowbit_optimizer_update_32bit(optimizer, dtype, g, p, n, state1, state1_len, state2, state2_len,
                                                 args_ptr, unorm, f.threads());
        }
        const int64_t nb = blocks(n, 256);
        const int64_t qmap1_len = f.length(256), qmap2_len = f.length(256);
        const int64_t absmax1_len = f.length(alloc_product(copies, nb)), absmax2_len = f.length(nb);
        auto *state1 = static_cast<uint8_t *>(f.buffer(state1_len, 1));
        auto *state2 = static_cast<uint8_t *>(f.buffer(state2_len, 1));
        const float *qmap1 = f.code(qmap1_len), *qmap2 = f.code(qmap2_len);
        auto *absmax1 = static_cast<float *>(f.buffer(absmax1_len, 4));
        auto *absmax2 = static_cast<float *>(f.buffer(absmax2_len, 4));
        f.snapshot();
        return lowbit_optimizer_update_8bit_blockwise(optimizer, dtype, g, p, n, state1, state1_len, state2,
                                                      state2_len, args_ptr, qmap1, qmap1_len, qmap2, qmap2_len,
                                                      absmax1, absmax1_len, absmax2, absmax2_len, f.threads());
    }
    }
    return LOWBIT_OK;
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2) return 0;
    const int entry = data[0] % kNumEntries;
    /* the kernels of one of the ISAs (scalar when this CPU cannot run it), with or without the
     * optional extensions: each execution depends on its input only */
    if (lowbit_set_cpu_isa(data[1] % 3) != LOWBIT_OK) lowbit_set_cpu_isa(LOWBIT_ISA_SCALAR);
    lowbit_set_cpu_features((data[1] >> 2) &
                            (LOWBIT_CPU_FEATURE_AVX512_VNNI | LOWBIT_CPU_FEATURE_AMX_BF16 | LOWBIT_CPU_FEATURE_AVX_VNNI));
    Fuzz f(data + 2, size - 2);
    lowbit_last_error();
    const int32_t status = run(entry, f);
    if (status != LOWBIT_OK && status != LOWBIT_ERR_ARGUMENT && status != LOWBIT_ERR_UNSUPPORTED)
        finding("status out of lowbit_status", entry);
    if (status == LOWBIT_ERR_ARGUMENT) {
        if (strncmp(lowbit_last_error(), "lowbit_", 7) != 0) finding("a refusal without a message", entry);
        if (!f.unchanged()) finding("a refused call wrote to a buffer", entry);
    }
    ++g_outcomes[entry][status];
    return 0;
}
