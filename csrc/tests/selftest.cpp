/* selftest.cpp -- native self-test (built with -DLOWBIT_BUILD_TESTS=ON, run by ctest).
 *
 * Checks what the Python suite cannot see directly and what the sanitizer build should run:
 *   - the format literals against their definitions (FP4 = raw / 12.0f with the sign of zero,
 *     midpoint formula, order, encode on and next to every threshold);
 *   - fp16/bf16 conversions against independent references (sampled; `--exhaustive` walks all
 *     2^32 floats);
 *   - the 8-bit lookup: sweep == counting definition;
 *   - the C ABI: argument validation (sizes, declared buffer lengths, products, enums, pointers,
 *     each refusal with its lowbit_last_error() message), n == 0, known bytes for special blocks, NaN/Inf blocks,
 *     results independent of the thread count and of the caller's FTZ/DAZ state;
 *   - CPU ISA selection (lowbit_cpu_isa*), and every ISA this CPU runs against the scalar build:
 *     identical bytes for quantize/dequantize on fuzzed inputs (thresholds, subnormals, NaN/Inf),
 *     the fp16/bf16 narrowing of each ISA against fmt:: (sampled; `--exhaustive`: all floats);
 *   - gemv_4bit on every ISA against a double-precision sum, on every kernel path, with exactly
 *     sized buffers (masked tail loads under ASan), independent of the thread count;
 *   - what the idle workers prefetch: the product that followed the last time on the same thread
 *     (call_order.h), and each worker's share of it (parallel.h, worker_share).
 * Most ABI checks run once per supported ISA. Exit status 0 when everything passes; each failure
 * prints one line.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "call_order.h"
#include "lowbit_capi.h"
#include "lowbit_formats.h"
#include "lowbit_int8.h"

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace fmt = lowbit::fmt;

/* Every lowbit_cpu_feature bit: restores the default (all supported features in use). */
static const int32_t kAllCpuFeatures =
    LOWBIT_CPU_FEATURE_AVX512_VNNI | LOWBIT_CPU_FEATURE_AMX_BF16 | LOWBIT_CPU_FEATURE_AVX_VNNI;

static int g_failures = 0;
static long g_checks = 0;

#define CHECK(cond, ...)                                                                      \
    do {                                                                                       \
        ++g_checks;                                                                            \
        if (!(cond)) {                                                                         \
            if (++g_failures <= 50) {                                                          \
                printf("FAIL %s:%d: %s -- ", __FILE__, __LINE__, #cond);                       \
                printf(__VA_ARGS__);                                                           \
                printf("\n");                                                                  \
            }                                                                                  \
        }                                                                                      \
    } while (0)

/* `call` returns LOWBIT_ERR_ARGUMENT and lowbit_last_error() contains `words`. */
#define REFUSED(call, words)                                                                   \
    do {                                                                                       \
        const int32_t status_ = (call);                                                        \
        CHECK(status_ == LOWBIT_ERR_ARGUMENT && strstr(lowbit_last_error(), words) != nullptr,  \
              "status %d, last error \"%s\", expected \"%s\"", status_, lowbit_last_error(), words); \
    } while (0)

static uint32_t fbits(float f) { return fmt::float_bits(f); }

/* The 16 code values of a lowbit_quant_type. */
static const float *code4(int qt) { return qt == LOWBIT_NF4 ? fmt::kNF4Code : fmt::kFP4Code; }

/* ---------------------------------------------------------------------------------------- */
static void test_format_literals() {
    for (int i = 0; i < 16; ++i) {
        const float want = fmt::kFP4Raw[i] / 12.0f;
        CHECK(fbits(fmt::kFP4Code[i]) == fbits(want), "FP4 code %d", i);
        CHECK(fbits(fmt::decode_4bit(i, fmt::kFP4)) == fbits(want), "decode FP4 %d", i);
        CHECK(fbits(fmt::decode_4bit(i, fmt::kNF4)) == fbits(fmt::kNF4Code[i]), "decode NF4 %d", i);
    }
    /* the NF4 literals are the float32 values of the given decimal (double) strings */
    const double nf4_doubles[16] = {-1.0, -0.6961928009986877, -0.5250730514526367,
                                    -0.39491748809814453, -0.28444138169288635,
                                    -0.18477343022823334, -0.09105003625154495, 0.0,
                                    0.07958029955625534, 0.16093020141124725,
                                    0.24611230194568634, 0.33791524171829224,
                                    0.44070982933044434, 0.5626170039176941,
                                    0.7229568362236023, 1.0};
    for (int i = 0; i < 16; ++i)
        CHECK((double)fmt::kNF4Code[i] == nf4_doubles[i], "NF4 literal %d is exact", i);

    const uint8_t fp4_order[16] = {11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3};
    for (int i = 0; i < 16; ++i) {
        CHECK(fmt::kFP4Order[i] == fp4_order[i], "FP4 order %d", i);
        CHECK(fmt::kNF4Order[i] == i, "NF4 order %d", i);
    }
    /* both FP4 zeros are +0.0 (bitsandbytes' table), codes 0 and 8 at positions 7 and 8 */
    CHECK(fmt::kFP4Order[7] == 0 && fbits(fmt::kFP4Code[0]) == 0u, "position 7 is code 0, +0");
    CHECK(fmt::kFP4Order[8] == 8 && fbits(fmt::kFP4Code[8]) == 0u, "position 8 is code 8, +0");
    CHECK(fbits(fmt::kFP4Midpoints[7]) == 0u, "FP4 midpoint 7 is +0");

    const struct {
        const float *code, *mids;
        const uint8_t *order;
        int qt;
        const char *name;
    } types[2] = {{fmt::kNF4Code, fmt::kNF4Midpoints, fmt::kNF4Order, fmt::kNF4, "NF4"},
                  {fmt::kFP4Code, fmt::kFP4Midpoints, fmt::kFP4Order, fmt::kFP4, "FP4"}};
    for (const auto &t : types) {
        for (int p = 0; p < 15; ++p) {
            const float m = (t.code[t.order[p]] + t.code[t.order[p + 1]]) / 2.0f;
            CHECK(fbits(t.mids[p]) == fbits(m), "%s midpoint %d", t.name, p);
            /* on a threshold: lower position; just above: upper */
            CHECK(fmt::encode_4bit(m, t.qt) == t.order[p], "%s encode(mid %d)", t.name, p);
            CHECK(fmt::encode_4bit(nextafterf(m, 2.0f), t.qt) == t.order[p + 1],
                  "%s encode(above mid %d)", t.name, p);
        }
        for (int c = 0; c < 16; ++c) /* each code value encodes to a code of the same value */
            CHECK(fmt::decode_4bit(fmt::encode_4bit(t.code[c], t.qt), t.qt) == t.code[c],
                  "%s encode(code %d)", t.name, c);
        CHECK(fmt::encode_4bit(-1.0f, t.qt) == t.order[0], "%s -1", t.name);
        CHECK(fmt::encode_4bit(1.0f, t.qt) == t.order[15], "%s +1", t.name);
        CHECK(fmt::encode_4bit(NAN, t.qt) == t.order[0], "%s NaN", t.name);
    }
    CHECK(fmt::encode_4bit(0.0f, fmt::kFP4) == 0, "FP4 +0");
    CHECK(fmt::encode_4bit(-0.0f, fmt::kFP4) == 0, "FP4 -0");
    CHECK(fmt::encode_4bit(0.001f, fmt::kFP4) == 8, "FP4 0.001 -> code 8");
    CHECK(fmt::encode_4bit(0.0f, fmt::kNF4) == 7, "NF4 0");

    for (int64_t bs = 1; bs <= 8192; ++bs) {
        bool listed = false;
        for (int64_t s : fmt::kBlocksizes) listed |= (s == bs);
        CHECK(fmt::is_supported_blocksize(bs) == listed, "blocksize %lld", (long long)bs);
    }
    CHECK(!fmt::is_supported_blocksize(0) && !fmt::is_supported_blocksize(-64), "bad blocksizes");
    for (int64_t bs = 1; bs <= 2 * LOWBIT_MAX_BLOCKSIZE_8BIT; ++bs) {
        const bool larger = bs > 4096 && bs <= LOWBIT_MAX_BLOCKSIZE_8BIT && (bs & (bs - 1)) == 0;
        CHECK(fmt::is_supported_blocksize_8bit(bs) == (fmt::is_supported_blocksize(bs) || larger),
              "8-bit blocksize %lld", (long long)bs);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Independent bf16 reference: pick the nearer of the two neighbouring bf16 values (doubles),
 * ties to even; the step past the largest finite value is 2^128 (-> Inf). */
static uint16_t bf16_reference(float f) {
    const uint32_t x = fbits(f);
    const uint32_t lo = x >> 16, hi = lo + 1;
    const double vlo = (double)fmt::bits_float(lo << 16);
    const double vhi = ((hi & 0x7FFFu) == 0x7F80u) ? copysign(ldexp(1.0, 128), f)
                                                   : (double)fmt::bits_float(hi << 16);
    const double dlo = fabs((double)f - vlo), dhi = fabs((double)f - vhi);
    if (dlo < dhi) return (uint16_t)lo;
    if (dhi < dlo) return (uint16_t)hi;
    return (lo & 1u) ? (uint16_t)hi : (uint16_t)lo;
}

static void check_float(uint32_t u) {
    const float f = fmt::bits_float(u);
    const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    /* bf16 */
    const uint16_t b = fmt::float_to_bf16_bits(f);
    if (nan) {
        CHECK((b & 0x7FFFu) > 0x7F80u && (b & 0x8000u) == ((u >> 16) & 0x8000u) && (b & 0x40u),
              "bf16 NaN %08x -> %04x", u, b);
    } else if ((u & 0x7FFFFFFFu) == 0x7F800000u) {
        CHECK(b == (u >> 16), "bf16 Inf %08x", u);
    } else {
        const uint16_t r = bf16_reference(f);
        CHECK(b == r, "bf16 %08x -> %04x want %04x", u, b, r);
    }
    /* fp16 */
    const uint16_t h = fmt::float_to_half_bits(f);
#if defined(__FLT16_MAX__)
    const _Float16 hr = (_Float16)f;
    uint16_t hb;
    memcpy(&hb, &hr, 2);
    if (nan)
        CHECK(h == (((u >> 16) & 0x8000u) | 0x7E00u | ((u >> 13) & 0x3FFu)) && (hb & 0x7FFFu) > 0x7C00u,
              "fp16 NaN %08x -> %04x", u, h);
    else
        CHECK(h == hb, "fp16 %08x -> %04x want %04x", u, h, hb);
#else
    (void)h;
#endif
}

static void test_conversions(bool exhaustive) {
    /* fp16 -> float: every pattern, against value arithmetic in double */
    for (uint32_t h = 0; h < 65536; ++h) {
        const float f = fmt::half_bits_to_float((uint16_t)h);
        const uint32_t e = (h >> 10) & 31u, m = h & 1023u;
        const double sign = (h & 0x8000u) ? -1.0 : 1.0;
        if (e == 31) {
            if (m == 0) CHECK(isinf(f) && (signbit(f) != 0) == (sign < 0), "half inf %04x", h);
            else CHECK(isnan(f) && ((fbits(f) >> 13) & 1023u) == m, "half nan %04x", h);
        } else {
            const double v = sign * (e == 0 ? ldexp((double)m, -24) : ldexp(1024.0 + m, (int)e - 25));
            CHECK((double)f == v && (signbit(f) != 0) == (sign < 0), "half %04x", h);
        }
        /* round trip for non-NaN */
        if (!(e == 31 && m != 0))
            CHECK(fmt::float_to_half_bits(f) == h, "half round trip %04x", h);
        CHECK(fbits(fmt::bf16_bits_to_float((uint16_t)h)) == (h << 16), "bf16 -> float %04x", h);
    }
    /* float -> fp16 / bf16 */
    const uint64_t step = exhaustive ? 1 : 997; /* prime stride hits every exponent/mantissa mix */
    for (uint64_t u = 0; u <= 0xFFFFFFFFull; u += step) check_float((uint32_t)u);
    const uint32_t specials[] = {0x00000000u, 0x80000000u, 0x00000001u, 0x007FFFFFu, 0x00800000u,
                                 0x33000000u, 0x33000001u, 0x337FFFFFu, 0x387FC000u, 0x387FE000u,
                                 0x38800000u, 0x477FE000u, 0x477FEFFFu, 0x477FF000u, 0x7F7FFFFFu,
                                 0x7F7F8000u, 0x7F7F7FFFu, 0x7F800000u, 0xFF800000u, 0x7FC00000u,
                                 0xFFC00000u, 0x7F800001u, 0xFFA00001u, 0x3F808000u, 0x3F818000u};
    for (uint32_t u : specials) check_float(u);
    if (!exhaustive) printf("  (conversions sampled every %llu floats; --exhaustive for all)\n",
                            (unsigned long long)step);
}

/* ---------------------------------------------------------------------------------------- */
static void test_lut8() {
    std::mt19937 rng(1234);
    std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
    std::vector<float> sorted_code(256), random_code(256);
    for (auto &v : sorted_code) v = uni(rng);
    std::sort(sorted_code.begin(), sorted_code.end());
    sorted_code[0] = -1.0f;
    sorted_code[255] = 1.0f;
    for (auto &v : random_code) v = uni(rng);
    std::vector<uint8_t> lut(65536);
    float mids[255];
    /* sorted code: the sweep equals the counting definition */
    fmt::build_lut8(sorted_code.data(), mids, lut.data());
    int bad = 0;
    for (uint32_t j = 0; j < 65536; ++j) bad += lut[j] != fmt::lut8_entry(mids, j);
    CHECK(bad == 0, "lut sweep vs definition: %d bins differ", bad);
    /* unsorted code: the sweep stops at the first midpoint not below v (bitsandbytes' table) */
    fmt::build_lut8(random_code.data(), mids, lut.data());
    bad = 0;
    for (uint32_t j = 0; j < 65536; ++j) {
        const float v = fmt::lut8_bin_value(j);
        int c = 0;
        while (c < 255 && mids[c] < v) ++c;
        bad += lut[j] != c;
        if (j > 0) bad += lut[j] < lut[j - 1]; /* monotone */
    }
    CHECK(bad == 0, "unsorted lut: %d bins differ", bad);
    CHECK(fmt::lut8_bin(-1.0f) == 0 && fmt::lut8_bin(1.0f) == 65535 && fmt::lut8_bin(0.0f) == 32768,
          "lut8_bin ends");
    CHECK(fmt::lut8_bin(fmt::clamp_unit(NAN)) == 0, "NaN -> bin 0");
}

/* ---------------------------------------------------------------------------------------- */
static std::vector<float> dynamic_like_code() {
    /* any sorted 256-entry code in [-1, 1] with an exact 0 works for these tests */
    std::vector<float> c(256);
    for (int i = 0; i < 256; ++i) c[i] = (float)(i - 127) / 128.0f;
    c[255] = 1.0f;
    return c;
}

static void test_capi_arguments() {
    CHECK(lowbit_abi_version() == LOWBIT_ABI_VERSION, "abi");
    CHECK(lowbit_build_info() != nullptr && strlen(lowbit_build_info()) > 10, "build info");

    float t[32];
    int32_t count = -1;
    CHECK(lowbit_format_table(LOWBIT_TABLE_FP4_ORDER, t, 32, &count) == LOWBIT_OK && count == 16,
          "table");
    for (int i = 0; i < 16; ++i) CHECK(t[i] == (float)fmt::kFP4Order[i], "fp4 order table %d", i);
    CHECK(lowbit_format_table(LOWBIT_TABLE_BLOCKSIZES, t, 32, &count) == LOWBIT_OK && count == 8 &&
              t[0] == 32.0f && t[7] == 4096.0f, "blocksizes table");
    CHECK(lowbit_format_table(LOWBIT_TABLE_NF4_MIDPOINTS, nullptr, 0, &count) == LOWBIT_OK &&
              count == 15, "length query");
    t[3] = 123.0f;
    CHECK(lowbit_format_table(LOWBIT_TABLE_FP4_CODE, t, 3, &count) == LOWBIT_OK && count == 16 &&
              t[3] == 123.0f && fbits(t[2]) == fbits(fmt::kFP4Code[2]), "capacity respected");
    CHECK(lowbit_format_table(LOWBIT_TABLE_INTERLEAVE, t, 32, &count) == LOWBIT_OK && count == 6 &&
              t[0] == (float)fmt::kInterleaveRows && t[1] == (float)fmt::kInterleaveWordWeights &&
              t[2] == (float)fmt::kFixedChunk && t[3] == (float)fmt::kFixedCodeOne &&
              t[4] == (float)fmt::kFixedActivationOne && t[5] == fmt::kFixedTinyChunk,
          "interleave table");
    CHECK(lowbit_format_table(-1, t, 32, &count) == LOWBIT_ERR_ARGUMENT, "bad table");
    CHECK(lowbit_format_table(0, t, 32, nullptr) == LOWBIT_ERR_ARGUMENT, "null count");
    CHECK(lowbit_format_table(0, nullptr, 4, &count) == LOWBIT_ERR_ARGUMENT, "null out");
    CHECK(lowbit_format_table(0, t, -1, &count) == LOWBIT_ERR_ARGUMENT, "negative capacity");

    CHECK(lowbit_format_table(8, t, 32, &count) == LOWBIT_ERR_ARGUMENT, "bad table");
    CHECK(strcmp(lowbit_last_error(), "lowbit_format_table: table = 8 is not one of 0 .. 7 (lowbit_table)") == 0,
          "last error names the argument: %s", lowbit_last_error());

    float x[64] = {}, am[2] = {};
    uint8_t q[64] = {};
    const std::vector<float> code = dynamic_like_code();
    const float *c8 = code.data(), *c4 = fmt::kNF4Code;
    const int64_t bad_bs[] = {0, -64, 16, 48, 100, 8192, 1 << 20};
    for (int64_t bs : bad_bs) {
        REFUSED(lowbit_quantize_4bit(0, x, 64, bs, 1, q, 32, am, 1, 1), "blocksize");
        REFUSED(lowbit_dequantize_4bit(0, q, 32, am, 1, bs, c4, 16, x, 64, 1), "blocksize");
        if (bs == 8192) {  // a valid 8-bit blocksize (one block here)
            CHECK(lowbit_quantize_blockwise(0, c8, 256, x, 64, bs, q, 64, am, 1, 1) == LOWBIT_OK, "q8 bs 8192");
            CHECK(lowbit_dequantize_blockwise(0, c8, 256, q, 64, am, 1, bs, x, 64, 1) == LOWBIT_OK, "dq8 bs 8192");
            continue;
        }
        REFUSED(lowbit_quantize_blockwise(0, c8, 256, x, 64, bs, q, 64, am, 1, 1), "blocksize");
        REFUSED(lowbit_dequantize_blockwise(0, c8, 256, q, 64, am, 1, bs, x, 64, 1), "blocksize");
    }
    REFUSED(lowbit_quantize_blockwise(0, c8, 256, x, 64, 2 * LOWBIT_MAX_BLOCKSIZE_8BIT, q, 64, am, 1, 1),
            "is not a power of two in [32, 65536]");
    for (int32_t dt : {-1, 3, 100}) {
        REFUSED(lowbit_quantize_4bit(dt, x, 64, 64, 1, q, 32, am, 1, 1), "dtype = ");
        REFUSED(lowbit_dequantize_4bit(dt, q, 32, am, 1, 64, c4, 16, x, 64, 1), "dtype = ");
        REFUSED(lowbit_quantize_blockwise(dt, c8, 256, x, 64, 64, q, 64, am, 1, 1), "dtype = ");
        REFUSED(lowbit_dequantize_blockwise(dt, c8, 256, q, 64, am, 1, 64, x, 64, 1), "dtype = ");
    }
    for (int32_t qt : {-1, 2}) {
        REFUSED(lowbit_quantize_4bit(0, x, 64, 64, qt, q, 32, am, 1, 1), "quant_type");
        REFUSED(lowbit_quantize_4bit(0, nullptr, 0, 64, qt, nullptr, 0, nullptr, 0, 1), "quant_type");  // before n == 0
    }
    /* sizes out of range: negative, or beyond 2^59 */
    for (int64_t n : {int64_t{-1}, int64_t{-5}, (int64_t{1} << 59) + 1, INT64_MAX}) {
        REFUSED(lowbit_quantize_4bit(0, x, n, 64, 1, q, 32, am, 1, 1), "n = ");
        REFUSED(lowbit_dequantize_4bit(0, q, 32, am, 1, 64, c4, 16, x, n, 1), "n = ");
        REFUSED(lowbit_quantize_blockwise(0, c8, 256, x, n, 64, q, 64, am, 1, 1), "n = ");
        REFUSED(lowbit_dequantize_blockwise(0, c8, 256, q, 64, am, 1, 64, x, n, 1), "n = ");
    }
    /* declared lengths must agree with n and blocksize: a too-large n no longer overflows the heap */
    REFUSED(lowbit_dequantize_4bit(0, q, 32, am, 1, 64, c4, 16, x, 1 << 20, 1), "A_len = 32, but (n + 1) / 2 = 524288");
    REFUSED(lowbit_dequantize_4bit(0, q, 32, am, 2, 64, c4, 16, x, 64, 1), "absmax_len = 2, but ceil(n / blocksize) = 1");
    REFUSED(lowbit_dequantize_4bit(0, q, 32, am, 1, 64, c4, 5, x, 64, 1), "code_len = 5");
    REFUSED(lowbit_dequantize_4bit(0, q, 32, am, 1, 32, c4, 16, x, 64, 1), "absmax_len = 1, but ceil(n / blocksize) = 2");
    REFUSED(lowbit_quantize_4bit(0, x, 64, 64, 1, q, 31, am, 1, 1), "out_len = 31, but (n + 1) / 2 = 32");
    REFUSED(lowbit_quantize_4bit(0, x, 63, 64, 1, q, 32, am, 0, 1), "absmax_len = 0");
    REFUSED(lowbit_quantize_blockwise(0, c8, 255, x, 64, 64, q, 64, am, 1, 1), "code_len = 255");
    REFUSED(lowbit_quantize_blockwise(0, c8, 256, x, 64, 64, q, 63, am, 1, 1), "out_len = 63, but n = 64");
    REFUSED(lowbit_quantize_blockwise(0, c8, 256, x, 64, 64, q, 64, am, -1, 1), "absmax_len = -1");
    REFUSED(lowbit_dequantize_blockwise(0, c8, 256, q, 64, am, 1, 64, x, 65, 1), "A_len = 64, but n = 65");
    REFUSED(lowbit_dequantize_blockwise(0, c8, 256, q, 64, am, 2, 64, x, 64, 1), "absmax_len = 2");
    REFUSED(lowbit_dequantize_4bit(0, nullptr, 1, nullptr, 0, 64, nullptr, 16, nullptr, 0, 1), "A_len = 1");  // also for n == 0
    /* n == 0: no-op, null pointers fine */
    CHECK(lowbit_quantize_4bit(0, nullptr, 0, 64, 1, nullptr, 0, nullptr, 0, 4) == LOWBIT_OK, "q4 n=0");
    CHECK(lowbit_dequantize_4bit(2, nullptr, 0, nullptr, 0, 64, nullptr, 16, nullptr, 0, 4) == LOWBIT_OK, "dq4 n=0");
    CHECK(lowbit_quantize_blockwise(1, nullptr, 256, nullptr, 0, 64, nullptr, 0, nullptr, 0, 4) == LOWBIT_OK, "q8 n=0");
    CHECK(lowbit_dequantize_blockwise(0, nullptr, 256, nullptr, 0, nullptr, 0, 64, nullptr, 0, 4) == LOWBIT_OK, "dq8 n=0");
    /* null pointers with n > 0 */
    REFUSED(lowbit_quantize_4bit(0, nullptr, 64, 64, 1, q, 32, am, 1, 1), "A is a null pointer");
    REFUSED(lowbit_quantize_4bit(0, x, 64, 64, 1, nullptr, 32, am, 1, 1), "out is a null pointer");
    REFUSED(lowbit_quantize_4bit(0, x, 64, 64, 1, q, 32, nullptr, 1, 1), "absmax is a null pointer");
    REFUSED(lowbit_dequantize_4bit(0, nullptr, 32, am, 1, 64, c4, 16, x, 64, 1), "A is a null pointer");
    REFUSED(lowbit_dequantize_4bit(0, q, 32, nullptr, 1, 64, c4, 16, x, 64, 1), "absmax is a null pointer");
    REFUSED(lowbit_dequantize_4bit(0, q, 32, am, 1, 64, nullptr, 16, x, 64, 1), "code is a null pointer");
    REFUSED(lowbit_dequantize_4bit(0, q, 32, am, 1, 64, c4, 16, nullptr, 64, 1), "out is a null pointer");
    REFUSED(lowbit_quantize_blockwise(0, nullptr, 256, x, 64, 64, q, 64, am, 1, 1), "code is a null pointer");
    REFUSED(lowbit_quantize_blockwise(0, c8, 256, nullptr, 64, 64, q, 64, am, 1, 1), "A is a null pointer");
    REFUSED(lowbit_quantize_blockwise(0, c8, 256, x, 64, 64, nullptr, 64, am, 1, 1), "out is a null pointer");
    REFUSED(lowbit_quantize_blockwise(0, c8, 256, x, 64, 64, q, 64, nullptr, 1, 1), "absmax is a null pointer");
    REFUSED(lowbit_dequantize_blockwise(0, nullptr, 256, q, 64, am, 1, 64, x, 64, 1), "code is a null pointer");
    REFUSED(lowbit_dequantize_blockwise(0, c8, 256, nullptr, 64, am, 1, 64, x, 64, 1), "A is a null pointer");
    REFUSED(lowbit_dequantize_blockwise(0, c8, 256, q, 64, nullptr, 1, 64, x, 64, 1), "absmax is a null pointer");
    REFUSED(lowbit_dequantize_blockwise(0, c8, 256, q, 64, am, 1, 64, nullptr, 64, 1), "out is a null pointer");
    CHECK(lowbit_quantize_4bit(0, x, 64, 64, 1, q, 32, am, 1, 1) == LOWBIT_OK, "a valid call after refusals");
}

/* Special blocks with known bytes. */
static void test_capi_special_blocks() {
    /* all-zero full block + tail of 3 zeros (n = 67, odd) */
    std::vector<float> x(67, 0.0f);
    std::vector<uint8_t> q(34, 0xAB);
    float am[2] = {-1.0f, -1.0f};
    CHECK(lowbit_quantize_4bit(0, x.data(), 67, 64, LOWBIT_NF4, q.data(), 34, am, 2, 1) == LOWBIT_OK, "q4");
    bool all77 = true;
    for (int i = 0; i < 34; ++i) all77 &= q[i] == 0x77;
    CHECK(all77, "NF4 zeros -> 0x77 (padding nibble too)");
    CHECK(fbits(am[0]) == 0 && am[1] == fmt::kAbsmaxFloor4, "absmax 0 and floored tail %g", am[1]);
    CHECK(lowbit_quantize_4bit(0, x.data(), 67, 64, LOWBIT_FP4, q.data(), 34, am, 2, 1) == LOWBIT_OK, "q4");
    bool all0 = true;
    for (int i = 0; i < 34; ++i) all0 &= q[i] == 0x00;
    CHECK(all0, "FP4 zeros -> 0x00");

    /* NaN / Inf blocks: non-finite absmax, zero bytes; other blocks untouched by it */
    std::vector<float> y(3 * 64 + 5, 0.5f);
    y[10] = NAN;
    y[64 + 7] = -INFINITY;
    y[3 * 64 + 2] = NAN;
    std::vector<uint8_t> q4((y.size() + 1) / 2, 0xAB), q8(y.size(), 0xAB);
    float a4[4], a8[4];
    const std::vector<float> code = dynamic_like_code();
    CHECK(lowbit_quantize_4bit(0, y.data(), (int64_t)y.size(), 64, LOWBIT_NF4, q4.data(), (int64_t)q4.size(), a4, 4, 1) ==
              LOWBIT_OK, "q4 nan");
    CHECK(lowbit_quantize_blockwise(0, code.data(), 256, y.data(), (int64_t)y.size(), 64, q8.data(), (int64_t)q8.size(), a8, 4, 1) ==
              LOWBIT_OK, "q8 nan");
    CHECK(isnan(a4[0]) && isinf(a4[1]) && a4[1] > 0 && a4[2] == 0.5f && isnan(a4[3]), "4bit absmax");
    CHECK(isnan(a8[0]) && isinf(a8[1]) && a8[1] > 0 && a8[2] == 0.5f && isnan(a8[3]), "8bit absmax");
    bool zero4 = true, zero8 = true;
    for (int i = 0; i < 64; ++i) zero4 &= q4[i] == 0;           /* blocks 0,1: bytes 0..63 */
    for (size_t i = 96; i < q4.size(); ++i) zero4 &= q4[i] == 0; /* tail block */
    for (int i = 0; i < 128; ++i) zero8 &= q8[i] == 0;
    for (size_t i = 192; i < q8.size(); ++i) zero8 &= q8[i] == 0;
    CHECK(zero4 && zero8, "non-finite blocks are zero bytes");
    CHECK(q4[64] == 0xFF && q8[128] == code.size() - 1, "finite block quantized (%02x %u)", q4[64], q8[128]);

    /* 8-bit: zero block -> bytes 0, absmax 0 */
    std::vector<uint8_t> z(64, 0xAB);
    float za = -1.0f;
    CHECK(lowbit_quantize_blockwise(0, code.data(), 256, x.data(), 64, 64, z.data(), 64, &za, 1, 1) == LOWBIT_OK, "q8 zero");
    bool zz = za == 0.0f;
    for (uint8_t v : z) zz &= v == 0;
    CHECK(zz, "8-bit zero block");
}

/* Thread count must not change any byte; neither may the caller's FTZ/DAZ state. */
static void test_capi_threads_and_fpenv() {
    const int64_t n = 3 * (1 << 20) + 77;
    std::mt19937 rng(42);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> x(n);
    for (auto &v : x) v = nd(rng);
    for (int64_t i = 0; i < 4096; ++i) x[1000000 + i] = 0.0f; /* some all-zero blocks */
    for (int64_t i = 0; i < 300; ++i) x[2000000 + i] = nd(rng) * 1e-39f; /* subnormal inputs */
    std::vector<uint16_t> xh(n), xb(n);
    for (int64_t i = 0; i < n; ++i) {
        xh[i] = fmt::float_to_half_bits(x[i]);
        xb[i] = fmt::float_to_bf16_bits(x[i]);
    }
    const void *inputs[3] = {x.data(), xh.data(), xb.data()};
    const std::vector<float> code = dynamic_like_code();

    for (int64_t bs : {64, 4096}) {
        const int64_t nb = (n + bs - 1) / bs;
        for (int dt = 0; dt < 3; ++dt) {
            for (int qt = 0; qt < 2; ++qt) {
                std::vector<uint8_t> q1((n + 1) / 2), q2((n + 1) / 2);
                std::vector<float> a1(nb), a2(nb);
                std::vector<float> d1(n), d2(n);
                CHECK(lowbit_quantize_4bit(dt, inputs[dt], n, bs, qt, q1.data(), (n + 1) / 2, a1.data(), nb, 1) == 0, "q4");
                CHECK(lowbit_quantize_4bit(dt, inputs[dt], n, bs, qt, q2.data(), (n + 1) / 2, a2.data(), nb, 7) == 0, "q4 mt");
                CHECK(q1 == q2 && memcmp(a1.data(), a2.data(), nb * 4) == 0, "4bit threads dt=%d qt=%d bs=%lld", dt, qt, (long long)bs);
                CHECK(lowbit_dequantize_4bit(0, q1.data(), (n + 1) / 2, a1.data(), nb, bs, code4(qt), 16, d1.data(), n, 1) == 0, "dq4");
                CHECK(lowbit_dequantize_4bit(0, q1.data(), (n + 1) / 2, a1.data(), nb, bs, code4(qt), 16, d2.data(), n, 5) == 0, "dq4 mt");
                CHECK(memcmp(d1.data(), d2.data(), n * 4) == 0, "dq4 threads");
                /* round trip error bound: |x - dq| <= absmax * (largest half gap). Not for
                 * blocks with absmax below the 1e-38 floor: a full block then scales by the
                 * floor but stores (and dequantizes with) the smaller true absmax. */
                if (dt == 0) {
                    int bad = 0;
                    for (int64_t i = 0; i < n; ++i)
                        bad += a1[i / bs] >= fmt::kAbsmaxFloor4 &&
                               !(fabsf(x[i] - d1[i]) <= a1[i / bs] * 0.35f);
                    CHECK(bad == 0, "4bit round trip: %d elements off", bad);
                }
            }
            std::vector<uint8_t> q1(n), q2(n);
            std::vector<float> a1(nb), a2(nb), d1(n), d2(n);
            CHECK(lowbit_quantize_blockwise(dt, code.data(), 256, inputs[dt], n, bs, q1.data(), n, a1.data(), nb, 1) == 0, "q8");
            CHECK(lowbit_quantize_blockwise(dt, code.data(), 256, inputs[dt], n, bs, q2.data(), n, a2.data(), nb, 16) == 0, "q8 mt");
            CHECK(q1 == q2 && memcmp(a1.data(), a2.data(), nb * 4) == 0, "8bit threads dt=%d", dt);
            CHECK(lowbit_dequantize_blockwise(0, code.data(), 256, q1.data(), n, a1.data(), nb, bs, d1.data(), n, 1) == 0, "dq8");
            CHECK(lowbit_dequantize_blockwise(0, code.data(), 256, q1.data(), n, a1.data(), nb, bs, d2.data(), n, 3) == 0, "dq8 mt");
            CHECK(memcmp(d1.data(), d2.data(), n * 4) == 0, "dq8 threads");
        }
    }

#if defined(__SSE__)
    /* Caller thread with FTZ + DAZ (torch.set_flush_denormal(True)): same bytes, state restored */
    std::vector<float> z(64 + 3, 0.0f);
    z[64] = 3e-39f; /* subnormal tail */
    uint8_t ref[34], got[34];
    float ra[2], ga[2];
    CHECK(lowbit_quantize_4bit(0, z.data(), 67, 64, LOWBIT_NF4, ref, 34, ra, 2, 1) == 0, "q4 ref");
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | (1u << 15) | (1u << 6));
    const int st = lowbit_quantize_4bit(0, z.data(), 67, 64, LOWBIT_NF4, got, 34, ga, 2, 1);
    const unsigned int after = _mm_getcsr();
    _mm_setcsr(csr);
    CHECK(st == 0 && memcmp(ref, got, 34) == 0 && memcmp(ra, ga, 8) == 0, "FTZ/DAZ caller");
    CHECK(after == (csr | (1u << 15) | (1u << 6)), "caller MXCSR restored");
    CHECK(ref[0] == 0x77 && ref[32] == 0xB7 && ra[1] == fmt::kAbsmaxFloor4, "subnormal tail %02x %g", ref[32], ra[1]);
#endif
}

/* Random valid calls with exactly-sized heap buffers: under LOWBIT_SANITIZE any read or write
 * past a buffer is reported. Also re-checks that dequantize(quantize(x)) uses the stored absmax. */
static void test_capi_fuzz() {
    std::mt19937_64 rng(7);
    const std::vector<float> code = dynamic_like_code();
    for (int iter = 0; iter < 3000; ++iter) {
        const int64_t n = (int64_t)(rng() % 9000);
        const int64_t bs = int64_t{32} << (rng() % 8);
        const int32_t dt = (int32_t)(rng() % 3), qt = (int32_t)(rng() % 2);
        const int threads = (int)(rng() % 4) == 0 ? 0 : (int)(rng() % 9);
        const int64_t nb = (n + bs - 1) / bs;
        const size_t esize = dt == 0 ? 4 : 2;
        std::vector<uint8_t> in((size_t)n * esize);
        for (int64_t i = 0; i < n; ++i) {
            const float v = std::ldexp((float)((int64_t)(rng() % 2001) - 1000) / 1000.0f, (int)(rng() % 40) - 20);
            if (dt == 0) memcpy(&in[(size_t)i * 4], &v, 4);
            else {
                const uint16_t h = dt == 1 ? fmt::float_to_half_bits(v) : fmt::float_to_bf16_bits(v);
                memcpy(&in[(size_t)i * 2], &h, 2);
            }
        }
        std::vector<uint8_t> q4((size_t)(n / 2 + n % 2)), q8((size_t)n), out((size_t)n * esize);
        std::vector<float> am((size_t)nb);
        const void *A = n ? in.data() : nullptr;
        CHECK(lowbit_quantize_4bit(dt, A, n, bs, qt, q4.data(), (int64_t)q4.size(), am.data(), nb, threads) == 0, "fuzz q4");
        CHECK(lowbit_dequantize_4bit(dt, q4.data(), (int64_t)q4.size(), am.data(), nb, bs, code4(qt), 16, out.data(), n, threads) == 0, "fuzz dq4");
        CHECK(lowbit_quantize_blockwise(dt, code.data(), 256, A, n, bs, q8.data(), n, am.data(), nb, threads) == 0, "fuzz q8");
        CHECK(lowbit_dequantize_blockwise(dt, code.data(), 256, q8.data(), n, am.data(), nb, bs, out.data(), n, threads) == 0, "fuzz dq8");
    }
}

/* ---------------------------------------------------------------------------------------- */
/* CPU ISAs                                                                                   */

static const char *isa_name(int isa) {
    static const char *names[] = {"scalar", "avx2", "avx512"};
    return isa >= 0 && isa < 3 ? names[isa] : "?";
}

static std::vector<int> supported_isas() {
    std::vector<int> isas;
    for (int isa = LOWBIT_ISA_SCALAR; isa <= LOWBIT_ISA_AVX512; ++isa)
        if (lowbit_cpu_isa_supported(isa)) isas.push_back(isa);
    return isas;
}

static void test_isa_selection() {
    const int initial = lowbit_cpu_isa();
    CHECK(lowbit_cpu_isa_supported(LOWBIT_ISA_SCALAR) == 1, "scalar always supported");
    CHECK(lowbit_cpu_isa_supported(-1) == 0 && lowbit_cpu_isa_supported(3) == 0, "unknown ISAs");
    CHECK(lowbit_cpu_isa_supported(initial) == 1, "initial ISA %d supported", initial);
    for (int isa = initial + 1; isa <= LOWBIT_ISA_AVX512; ++isa)
        CHECK(lowbit_cpu_isa_supported(isa) == 0, "the default is the widest supported ISA (%s)", isa_name(isa));
    CHECK(lowbit_set_cpu_isa(-1) == LOWBIT_ERR_ARGUMENT && lowbit_set_cpu_isa(3) == LOWBIT_ERR_ARGUMENT,
          "unknown ISA rejected");
    CHECK(lowbit_cpu_isa() == initial, "unchanged after a rejected set");
    for (int isa = LOWBIT_ISA_SCALAR; isa <= LOWBIT_ISA_AVX512; ++isa) {
        if (lowbit_cpu_isa_supported(isa)) {
            CHECK(lowbit_set_cpu_isa(isa) == LOWBIT_OK && lowbit_cpu_isa() == isa, "set %s", isa_name(isa));
        } else {
            const int before = lowbit_cpu_isa();
            CHECK(lowbit_set_cpu_isa(isa) == LOWBIT_ERR_UNSUPPORTED && lowbit_cpu_isa() == before,
                  "unsupported %s rejected", isa_name(isa));
        }
    }
    CHECK(lowbit_set_cpu_isa(initial) == LOWBIT_OK, "restore");
    const char *info = lowbit_build_info();
    CHECK(strstr(info, "cpu_isas=scalar") != nullptr, "build info lists the ISAs: %s", info);
}

/* Everything the four blockwise entry points write for one input, as bytes. */
static std::vector<uint8_t> blockwise_outputs(int dt, const void *A, int64_t n, int64_t bs, int qt,
                                              const float *code4, const float *code8, int threads) {
    const int64_t nb = (n + bs - 1) / bs;
    const size_t esize = dt == 0 ? 4 : 2;
    std::vector<uint8_t> q4((size_t)(n + 1) / 2), q8((size_t)n), d4((size_t)n * esize), d8((size_t)n * esize);
    std::vector<float> a4((size_t)nb), a8((size_t)nb);
    CHECK(lowbit_quantize_4bit(dt, A, n, bs, qt, q4.data(), (int64_t)q4.size(), a4.data(), nb, threads) == 0, "q4");
    CHECK(lowbit_quantize_blockwise(dt, code8, 256, A, n, bs, q8.data(), n, a8.data(), nb, threads) == 0, "q8");
    /* dequantize what a caller could (Python rejects non-finite absmax) */
    std::vector<float> f4(a4), f8(a8);
    for (auto *v : {&f4, &f8})
        for (float &a : *v) a = std::isfinite(a) ? a : 1.0f;
    CHECK(lowbit_dequantize_4bit(dt, q4.data(), (int64_t)q4.size(), f4.data(), nb, bs, code4, 16, d4.data(), n, threads) == 0, "dq4");
    CHECK(lowbit_dequantize_blockwise(dt, code8, 256, q8.data(), n, f8.data(), nb, bs, d8.data(), n, threads) == 0, "dq8");
    std::vector<uint8_t> all;
    for (const auto *v : {&q4, &q8, &d4, &d8}) all.insert(all.end(), v->begin(), v->end());
    const auto *p4 = reinterpret_cast<const uint8_t *>(a4.data());
    const auto *p8 = reinterpret_cast<const uint8_t *>(a8.data());
    all.insert(all.end(), p4, p4 + nb * 4);
    all.insert(all.end(), p8, p8 + nb * 4);
    return all;
}

/* Random inputs with the values that decide bytes: exact thresholds (block absmax 1), their float
 * neighbours, code values, zeros of both signs, subnormals, huge values, and now and then a NaN or
 * Inf block; every ISA must give the scalar build's bytes. */
static void test_isas_bit_exact() {
    const std::vector<int> isas = supported_isas();
    std::mt19937_64 rng(11);
    const std::vector<float> code8 = dynamic_like_code();
    for (int iter = 0; iter < 400; ++iter) {
        const int64_t n = (int64_t)(rng() % 5000) + (iter % 7 == 0 ? 70000 : 0);
        const int64_t bs = int64_t{32} << (rng() % 8);
        const int dt = (int)(rng() % 3), qt = (int)(rng() % 2);
        const float *mids = qt == LOWBIT_NF4 ? fmt::kNF4Midpoints : fmt::kFP4Midpoints;
        std::vector<float> x((size_t)n);
        for (int64_t i = 0; i < n; ++i) {
            const uint64_t r = rng();
            const float m = mids[r % 15];
            switch ((r >> 8) % 9) {
            case 0: x[i] = m; break;
            case 1: x[i] = nextafterf(m, 2.0f); break;
            case 2: x[i] = nextafterf(m, -2.0f); break;
            case 3: x[i] = code4(qt)[r % 16]; break;
            case 4: x[i] = (r & 1) ? -0.0f : 0.0f; break;
            case 5: x[i] = fmt::bits_float((uint32_t)(r >> 16) & 0x807FFFFFu); break; /* subnormal */
            case 6: x[i] = std::ldexp((float)((int64_t)(r % 2001) - 1000) / 1000.0f, (int)((r >> 20) % 60) - 30); break;
            case 7: x[i] = 1.0f; break; /* block absmax 1: thresholds stay exact */
            default: x[i] = std::ldexp((float)((int64_t)(r % 2001) - 1000) / 1000.0f, (int)((r >> 20) % 200) - 100); break;
            }
        }
        if (iter % 13 == 0 && n > 0) x[rng() % n] = (iter % 2) ? NAN : -INFINITY;
        std::vector<uint8_t> in((size_t)n * (dt == 0 ? 4 : 2));
        for (int64_t i = 0; i < n; ++i) {
            if (dt == 0) memcpy(&in[(size_t)i * 4], &x[i], 4);
            else {
                const uint16_t h = dt == 1 ? fmt::float_to_half_bits(x[i]) : fmt::float_to_bf16_bits(x[i]);
                memcpy(&in[(size_t)i * 2], &h, 2);
            }
        }
        const void *A = n ? in.data() : nullptr;
        const int threads = (int)(rng() % 3);
        lowbit_set_cpu_isa(LOWBIT_ISA_SCALAR);
        const std::vector<uint8_t> want = blockwise_outputs(dt, A, n, bs, qt, code4(qt), code8.data(), threads);
        for (int isa : isas) {
            lowbit_set_cpu_isa(isa);
            const std::vector<uint8_t> got = blockwise_outputs(dt, A, n, bs, qt, code4(qt), code8.data(), threads);
            CHECK(got == want, "%s differs from scalar: n=%lld bs=%lld dt=%d qt=%d", isa_name(isa), (long long)n,
                  (long long)bs, dt, qt);
        }
    }
    lowbit_set_cpu_isa(isas.back());
}

/* The narrowing of every ISA's dequantize against fmt:: for (almost) every float: a code table of
 * 256 arbitrary floats, absmax 1, so out[i] = to_dtype(code[i] * 1.0f). */
static void test_isa_narrowing(bool exhaustive) {
    const uint64_t step = exhaustive ? 1 : 997;
    std::vector<uint8_t> q(256);
    for (int i = 0; i < 256; ++i) q[i] = (uint8_t)i;
    const float one = 1.0f;
    std::vector<float> code(256);
    std::vector<uint16_t> half(256), bf16(256);
    for (int isa : supported_isas()) {
        lowbit_set_cpu_isa(isa);
        long bad = 0;
        for (uint64_t u = 0; u <= 0xFFFFFFFFull; u += 256 * step) {
            for (int i = 0; i < 256; ++i) code[i] = fmt::bits_float((uint32_t)std::min<uint64_t>(u + i * step, 0xFFFFFFFFull));
            CHECK(lowbit_dequantize_blockwise(1, code.data(), 256, q.data(), 256, &one, 1, 256, half.data(), 256, 1) == 0, "dq fp16");
            CHECK(lowbit_dequantize_blockwise(2, code.data(), 256, q.data(), 256, &one, 1, 256, bf16.data(), 256, 1) == 0, "dq bf16");
            for (int i = 0; i < 256; ++i) {
                const float v = code[i] * one;
                bad += half[i] != fmt::float_to_half_bits(v);
                bad += bf16[i] != fmt::float_to_bf16_bits(v);
            }
        }
        CHECK(bad == 0, "%s narrowing: %ld values differ from fmt::", isa_name(isa), bad);
    }
    lowbit_set_cpu_isa(supported_isas().back());
}

/* ---------------------------------------------------------------------------------------- */
/* gemv_4bit                                                                                  */

static void test_gemv_arguments() {
    float a[8] = {}, am[1] = {1.0f}, out[8] = {};
    uint8_t b[4] = {};
    const float *c = fmt::kNF4Code;
    REFUSED(lowbit_gemv_4bit(3, a, 1, 8, b, 4, am, 1, c, 16, 1, 64, 0, out, 1), "a_dtype = 3");
    REFUSED(lowbit_gemv_4bit(0, a, 1, 8, b, 4, am, 1, c, 16, 1, 64, -1, out, 1), "out_dtype = -1");
    REFUSED(lowbit_gemv_4bit(0, a, 1, 8, b, 4, am, 1, c, 16, 1, 48, 0, out, 1), "blocksize = 48");
    REFUSED(lowbit_gemv_4bit(0, a, -1, 8, b, 4, am, 1, c, 16, 1, 64, 0, out, 1), "M = -1");
    REFUSED(lowbit_gemv_4bit(0, a, 1, 8, b, 4, am, 1, c, 16, -1, 64, 0, out, 1), "N = -1");
    REFUSED(lowbit_gemv_4bit(0, a, 1, 0, b, 4, am, 1, c, 16, 1, 64, 0, out, 1), "K = 0 must be >= 1");
    REFUSED(lowbit_gemv_4bit(0, a, 1, int64_t{1} << 40, b, 4, am, 1, c, 16, int64_t{1} << 40, 64, 0, out, 1),
            "N * K = 1099511627776 * 1099511627776 is too large");
    REFUSED(lowbit_gemv_4bit(0, a, 1, 8, b, 4, am, 1, c, 16, 2, 64, 0, out, 1), "B_len = 4, but (N * K + 1) / 2 = 8");
    REFUSED(lowbit_gemv_4bit(0, a, 1, 8, b, 4, am, 2, c, 16, 1, 64, 0, out, 1), "absmax_len = 2");
    REFUSED(lowbit_gemv_4bit(0, a, 1, 8, b, 4, am, 1, c, 15, 1, 64, 0, out, 1), "code_len = 15");
    CHECK(lowbit_gemv_4bit(0, nullptr, 0, 8, nullptr, 20, nullptr, 1, nullptr, 16, 5, 64, 0, nullptr, 1) == LOWBIT_OK,
          "M == 0");
    CHECK(lowbit_gemv_4bit(0, nullptr, 3, 8, nullptr, 0, nullptr, 0, nullptr, 16, 0, 64, 0, nullptr, 1) == LOWBIT_OK,
          "N == 0");
    REFUSED(lowbit_gemv_4bit(0, nullptr, 1, 8, b, 4, am, 1, c, 16, 1, 64, 0, out, 1), "A is a null pointer");
    REFUSED(lowbit_gemv_4bit(0, a, 1, 8, nullptr, 4, am, 1, c, 16, 1, 64, 0, out, 1), "B is a null pointer");
    REFUSED(lowbit_gemv_4bit(0, a, 1, 8, b, 4, nullptr, 1, c, 16, 1, 64, 0, out, 1), "absmax is a null pointer");
    REFUSED(lowbit_gemv_4bit(0, a, 1, 8, b, 4, am, 1, nullptr, 16, 1, 64, 0, out, 1), "code is a null pointer");
    REFUSED(lowbit_gemv_4bit(0, a, 1, 8, b, 4, am, 1, c, 16, 1, 64, 0, nullptr, 1), "out is a null pointer");
    CHECK(lowbit_gemv_4bit(0, a, 1, 8, b, 4, am, 1, c, 16, 1, 64, 0, out, 1) == LOWBIT_OK, "valid gemv");
}

/* The interleaved layout's entry points reject what they must (K % blocksize included) and do
 * nothing, reading no pointer, for empty problems. */
static void test_interleaved_arguments() {
    float a[64] = {}, am[1] = {1.0f}, am_out[1] = {}, out[1] = {};
    uint8_t b[32] = {}, b_out[32] = {};
    const float *c = fmt::kNF4Code;
    CHECK(lowbit_interleave_4bit(b, 32, am, 1, 1, 64, 64, 0, b_out, 32, am_out, 1, 1) == LOWBIT_OK, "interleave");
    REFUSED(lowbit_interleave_4bit(b, 48, am, 1, 1, 96, 64, 0, b_out, 48, am_out, 1, 1),
            "K = 96 is not a multiple of blocksize = 64");
    REFUSED(lowbit_interleave_4bit(b, 32, am, 1, 1, 64, 48, 0, b_out, 32, am_out, 1, 1), "blocksize = 48");
    REFUSED(lowbit_interleave_4bit(b, 32, am, 1, -1, 64, 64, 0, b_out, 32, am_out, 1, 1), "N = -1");
    REFUSED(lowbit_interleave_4bit(b, 32, am, 1, 1, 0, 64, 0, b_out, 32, am_out, 1, 1), "K = 0 must be >= 1");
    REFUSED(lowbit_interleave_4bit(b, 32, am, 1, 1, 64, 64, 2, b_out, 32, am_out, 1, 1), "inverse = 2");
    REFUSED(lowbit_interleave_4bit(b, 32, am, 1, int64_t{1} << 40, int64_t{1} << 40, 64, 0, b_out, 32, am_out, 1, 1),
            "N * K = 1099511627776 * 1099511627776 is too large");
    REFUSED(lowbit_interleave_4bit(b, 31, am, 1, 1, 64, 64, 0, b_out, 32, am_out, 1, 1), "B_len = 31, but N * K / 2 = 32");
    REFUSED(lowbit_interleave_4bit(b, 32, am, 2, 1, 64, 64, 0, b_out, 32, am_out, 1, 1),
            "absmax_len = 2, but N * K / blocksize = 1");
    REFUSED(lowbit_interleave_4bit(b, 32, am, 1, 1, 64, 64, 0, b_out, 64, am_out, 1, 1), "B_out_len = 64");
    REFUSED(lowbit_interleave_4bit(b, 32, am, 1, 1, 64, 64, 0, b_out, 32, am_out, 0, 1), "absmax_out_len = 0");
    CHECK(lowbit_interleave_4bit(nullptr, 0, nullptr, 0, 0, 64, 64, 1, nullptr, 0, nullptr, 0, 1) == LOWBIT_OK,
          "N == 0");
    REFUSED(lowbit_interleave_4bit(nullptr, 32, am, 1, 1, 64, 64, 0, b_out, 32, am_out, 1, 1), "B is a null pointer");
    REFUSED(lowbit_interleave_4bit(b, 32, am, 1, 1, 64, 64, 0, nullptr, 32, am_out, 1, 1), "B_out is a null pointer");
    REFUSED(lowbit_interleave_4bit(b, 32, am, 1, 1, 64, 64, 0, b_out, 32, nullptr, 1, 1),
            "absmax_out is a null pointer");

    CHECK(lowbit_matmul_4bit_interleaved(0, a, 1, 64, b, 32, am, 1, c, 16, 1, 64, nullptr, 0, 0, 0, 0, out, 1) ==
              LOWBIT_OK, "product");
    CHECK(lowbit_matmul_4bit_interleaved(0, a, 1, 64, b, 32, am, 1, c, 16, 1, 64, am, 1, 0, 1, 0, out, 1) ==
              LOWBIT_OK, "product with bias");
    REFUSED(lowbit_matmul_4bit_interleaved(3, a, 1, 64, b, 32, am, 1, c, 16, 1, 64, nullptr, 0, 0, 0, 0, out, 1),
            "a_dtype = 3");
    REFUSED(lowbit_matmul_4bit_interleaved(0, a, 1, 64, b, 32, am, 1, c, 16, 1, 64, nullptr, 0, 0, 0, -1, out, 1),
            "out_dtype = -1");
    REFUSED(lowbit_matmul_4bit_interleaved(0, a, 1, 64, b, 32, am, 1, c, 16, 1, 64, nullptr, 0, 0, 2, 0, out, 1),
            "precision = 2");
    REFUSED(lowbit_matmul_4bit_interleaved(0, a, 1, 64, b, 32, am, 1, c, 16, 1, 64, am, 1, 5, 0, 0, out, 1),
            "bias_dtype = 5");
    REFUSED(lowbit_matmul_4bit_interleaved(0, a, 1, 96, b, 48, am, 1, c, 16, 1, 64, nullptr, 0, 0, 0, 0, out, 1),
            "K = 96 is not a multiple of blocksize = 64");
    REFUSED(lowbit_matmul_4bit_interleaved(0, a, -1, 64, b, 32, am, 1, c, 16, 1, 64, nullptr, 0, 0, 0, 0, out, 1),
            "M = -1");
    REFUSED(lowbit_matmul_4bit_interleaved(0, a, int64_t{1} << 40, 64, b, 32, am, 1, c, 16, int64_t{1} << 40, 64,
                                           nullptr, 0, 0, 0, 0, out, 1),
            "M * N = 1099511627776 * 1099511627776 is too large");
    REFUSED(lowbit_matmul_4bit_interleaved(0, a, 1, 64, b, 16, am, 1, c, 16, 1, 64, nullptr, 0, 0, 0, 0, out, 1),
            "B_len = 16, but N * K / 2 = 32");
    REFUSED(lowbit_matmul_4bit_interleaved(0, a, 1, 64, b, 32, am, 3, c, 16, 1, 64, nullptr, 0, 0, 0, 0, out, 1),
            "absmax_len = 3");
    REFUSED(lowbit_matmul_4bit_interleaved(0, a, 1, 64, b, 32, am, 1, c, 17, 1, 64, nullptr, 0, 0, 0, 0, out, 1),
            "code_len = 17");
    REFUSED(lowbit_matmul_4bit_interleaved(0, a, 1, 64, b, 32, am, 1, c, 16, 1, 64, am, 2, 0, 0, 0, out, 1),
            "bias_len = 2, but N = 1");
    REFUSED(lowbit_matmul_4bit_interleaved(0, a, 1, 64, b, 32, am, 1, c, 16, 1, 64, nullptr, 1, 0, 0, 0, out, 1),
            "bias_len = 1, but 0 for a null bias = 0");
    CHECK(lowbit_matmul_4bit_interleaved(0, nullptr, 0, 64, nullptr, 32, nullptr, 1, nullptr, 16, 1, 64, nullptr, 0,
                                         0, 0, 0, nullptr, 1) == LOWBIT_OK, "M == 0");
    CHECK(lowbit_matmul_4bit_interleaved(0, nullptr, 3, 64, nullptr, 0, nullptr, 0, nullptr, 16, 0, 64, nullptr, 0,
                                         0, 0, 0, nullptr, 1) == LOWBIT_OK, "N == 0");
    REFUSED(lowbit_matmul_4bit_interleaved(0, nullptr, 1, 64, b, 32, am, 1, c, 16, 1, 64, nullptr, 0, 0, 0, 0, out, 1),
            "A is a null pointer");
    REFUSED(lowbit_matmul_4bit_interleaved(0, a, 1, 64, b, 32, nullptr, 1, c, 16, 1, 64, nullptr, 0, 0, 0, 0, out, 1),
            "absmax is a null pointer");
    REFUSED(lowbit_matmul_4bit_interleaved(0, a, 1, 64, b, 32, am, 1, nullptr, 16, 1, 64, nullptr, 0, 0, 0, 0, out, 1),
            "code is a null pointer");
    REFUSED(lowbit_matmul_4bit_interleaved(0, a, 1, 64, b, 32, am, 1, c, 16, 1, 64, nullptr, 0, 0, 0, 0, nullptr, 1),
            "out is a null pointer");
}

/* One gemv problem with exactly sized heap buffers; checks every ISA against a double sum and the
 * thread count against itself. Tolerance: fp32 sums in any order, 8 sqrt(K) 2^-24 S with
 * S = sum |A W| (see tests/test_parity.py), plus one ulp of a 16-bit output. Where K % bs == 0,
 * the same on the interleaved layout in both precisions, with and without the optional CPU
 * features; the fast one may add the 16-bit fixed point's error (lowbit_formats.h: 2^-14 of
 * max|A row| per activation, 2^-13 of the largest weight of the row per code value) or one bf16
 * rounding of each weight and activation (2^-8 S). */
static void check_gemv(std::mt19937_64 &rng, int64_t M, int64_t N, int64_t K, int64_t bs, int a_dt, int out_dt,
                       int qt) {
    std::normal_distribution<float> nd(0.0f, 1.0f);
    const int64_t nw = N * K, nb = (nw + bs - 1) / bs;
    std::vector<float> w((size_t)nw), a32((size_t)(M * K));
    for (auto &v : w) v = nd(rng);
    for (auto &v : a32) v = nd(rng);
    std::unique_ptr<uint8_t[]> B(new uint8_t[(size_t)(nw + 1) / 2]);
    std::unique_ptr<float[]> absmax(new float[(size_t)nb]);
    CHECK(lowbit_quantize_4bit(0, w.data(), nw, bs, qt, B.get(), (nw + 1) / 2, absmax.get(), nb, 1) == 0, "gemv weight");
    const size_t a_size = a_dt == 0 ? 4 : 2, o_size = out_dt == 0 ? 4 : 2;
    std::unique_ptr<uint8_t[]> A(new uint8_t[(size_t)(M * K) * a_size]);
    std::vector<double> a64((size_t)(M * K));
    for (int64_t i = 0; i < M * K; ++i) {
        if (a_dt == 0) memcpy(&A[(size_t)i * 4], &a32[i], 4);
        else {
            const uint16_t h = a_dt == 1 ? fmt::float_to_half_bits(a32[i]) : fmt::float_to_bf16_bits(a32[i]);
            memcpy(&A[(size_t)i * 2], &h, 2);
        }
        a64[i] = a_dt == 0 ? a32[i] : a_dt == 1 ? fmt::half_bits_to_float(fmt::float_to_half_bits(a32[i]))
                                               : fmt::bf16_bits_to_float(fmt::float_to_bf16_bits(a32[i]));
    }
    std::vector<double> want((size_t)(M * N)), bound((size_t)(M * N)), fast_bound((size_t)(M * N));
    const float *code = code4(qt);
    double code_max = 0;
    for (int i = 0; i < 16; ++i) code_max = std::max(code_max, fabs((double)code[i]));
    for (int64_t n = 0; n < N; ++n)
        for (int64_t m = 0; m < M; ++m) {
            double sum = 0, mag = 0, a_max = 0, a_sum = 0, w_sum = 0, w_max = 0;
            for (int64_t k = 0; k < K; ++k) {
                const int64_t e = n * K + k;
                const unsigned byte = B[(size_t)e / 2];
                const double wv = (double)code[(e & 1) ? (byte & 15u) : (byte >> 4)] * absmax[e / bs];
                sum += a64[m * K + k] * wv;
                mag += fabs(a64[m * K + k] * wv);
                a_max = std::max(a_max, fabs(a64[m * K + k]));
                a_sum += fabs(a64[m * K + k]);
                w_sum += code_max * fabs((double)absmax[e / bs]);
                w_max = std::max(w_max, code_max * fabs((double)absmax[e / bs]));
            }
            want[m * N + n] = sum;
            bound[m * N + n] = 8.0 * sqrt((double)K) * ldexp(1.0, -24) * mag;
            fast_bound[m * N + n] = bound[m * N + n] + ldexp(mag, -8) + ldexp(a_max * w_sum, -14) + ldexp(a_sum * w_max, -13);
        }
    auto value = [&](const uint8_t *o, int64_t i) -> double {
        uint16_t h;
        if (out_dt == 0) {
            float f;
            memcpy(&f, o + i * 4, 4);
            return f;
        }
        memcpy(&h, o + i * 2, 2);
        return out_dt == 1 ? fmt::half_bits_to_float(h) : fmt::bf16_bits_to_float(h);
    };
    const int mant = out_dt == 1 ? 10 : 7;
    for (int isa : supported_isas()) {
        lowbit_set_cpu_isa(isa);
        std::unique_ptr<uint8_t[]> o1(new uint8_t[(size_t)(M * N) * o_size]), o2(new uint8_t[(size_t)(M * N) * o_size]);
        CHECK(lowbit_gemv_4bit(a_dt, A.get(), M, K, B.get(), (nw + 1) / 2, absmax.get(), nb, code, 16, N, bs, out_dt, o1.get(), 1) == 0, "gemv");
        CHECK(lowbit_gemv_4bit(a_dt, A.get(), M, K, B.get(), (nw + 1) / 2, absmax.get(), nb, code, 16, N, bs, out_dt, o2.get(), 7) == 0, "gemv mt");
        CHECK(memcmp(o1.get(), o2.get(), (size_t)(M * N) * o_size) == 0, "%s gemv depends on threads", isa_name(isa));
        int bad = 0;
        for (int64_t i = 0; i < M * N; ++i) {
            const double got = value(o1.get(), i);
            double tol = bound[i];
            if (out_dt != 0) tol += ldexp(1.0, std::max(std::ilogb(std::max(fabs(got), fabs(want[i]))), -14) - mant);
            bad += !(fabs(got - want[i]) <= tol);
        }
        CHECK(bad == 0, "%s gemv M=%lld N=%lld K=%lld bs=%lld a=%d out=%d qt=%d: %d outputs off", isa_name(isa),
              (long long)M, (long long)N, (long long)K, (long long)bs, a_dt, out_dt, qt, bad);
    }
    if (K % bs == 0) {
        std::unique_ptr<uint8_t[]> Bi(new uint8_t[(size_t)nw / 2]);
        std::unique_ptr<float[]> absmax_i(new float[(size_t)nb]);
        CHECK(lowbit_interleave_4bit(B.get(), nw / 2, absmax.get(), nb, N, K, bs, 0, Bi.get(), nw / 2, absmax_i.get(),
                                     nb, 1) == LOWBIT_OK, "interleave");
        for (int isa : supported_isas())
            for (int features : {kAllCpuFeatures, 0})
                for (int precision : {LOWBIT_PRECISION_FLOAT32, LOWBIT_PRECISION_FAST}) {
                    lowbit_set_cpu_isa(isa);
                    lowbit_set_cpu_features(features & lowbit_cpu_features_supported());
                    std::unique_ptr<uint8_t[]> o1(new uint8_t[(size_t)(M * N) * o_size]), o2(new uint8_t[(size_t)(M * N) * o_size]);
                    for (auto *o : {&o1, &o2})
                        CHECK(lowbit_matmul_4bit_interleaved(a_dt, A.get(), M, K, Bi.get(), nw / 2, absmax_i.get(), nb,
                                                             code, 16, N, bs, nullptr, 0, 0, precision, out_dt,
                                                             o->get(), o == &o1 ? 1 : 7) == LOWBIT_OK,
                              "interleaved product");
                    CHECK(memcmp(o1.get(), o2.get(), (size_t)(M * N) * o_size) == 0,
                          "%s interleaved product depends on threads", isa_name(isa));
                    int bad = 0;
                    for (int64_t i = 0; i < M * N; ++i) {
                        const double got = value(o1.get(), i);
                        double tol = precision == LOWBIT_PRECISION_FAST ? fast_bound[i] : bound[i];
                        if (out_dt != 0) tol += ldexp(1.0, std::max(std::ilogb(std::max(fabs(got), fabs(want[i]))), -14) - mant);
                        bad += !(fabs(got - want[i]) <= tol);
                    }
                    CHECK(bad == 0, "%s features=%d precision=%d interleaved M=%lld N=%lld K=%lld bs=%lld a=%d out=%d "
                          "qt=%d: %d outputs off", isa_name(isa), features, precision, (long long)M, (long long)N,
                          (long long)K, (long long)bs, a_dt, out_dt, qt, bad);
                }
        lowbit_set_cpu_features(kAllCpuFeatures);
    }
    lowbit_set_cpu_isa(supported_isas().back());
}

static void test_gemv() {
    std::mt19937_64 rng(5);
    /* K % bs == 0 (whole blocks / per-lane absmax), K % 8 == 0 with partial chunks and blocks
     * straddling rows, K odd (element path); M 1..8 and beyond 8 (several passes). */
    const int64_t shapes[][2] = {{7, 256}, {5, 4096}, {33, 136}, {9, 1000}, {3, 1001}, {1, 40},
                                 {11, 8}, {6, 160}, {3, 576}, {300, 1024}};
    int i = 0;
    for (const auto &shape : shapes)
        for (int64_t bs : {32, 64, 128, 256, 4096}) {
            const int64_t M = 1 + (i % 8) + (i % 11 == 0 ? 9 : 0);
            check_gemv(rng, M, shape[0], shape[1], bs, i % 3, (i / 3) % 3, i % 2);
            ++i;
        }
}

/* ---- optimizers (lowbit_optimizer_update_*) ------------------------------------------------ */

/* One optimizer step through the C ABI on exactly sized heap buffers (ASan sees any overread);
 * returns every byte it wrote (p, states, absmax, unorm). */
static std::vector<uint8_t> optim_outputs(int opt, int dt, int64_t n, bool eight_bit, int64_t step, double wd,
                                          double max_unorm, int threads, uint64_t seed) {
    const bool two = opt == LOWBIT_OPTIM_ADAM || opt == LOWBIT_OPTIM_ADEMAMIX;
    const int64_t copies = opt == LOWBIT_OPTIM_ADEMAMIX ? 2 : 1, nb = (n + 255) / 256;
    const size_t es = dt == 0 ? 4 : 2;
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    auto fill = [&](uint8_t *dst, int64_t count, float scale) {
        for (int64_t i = 0; i < count; ++i) {
            float x = u(rng) * scale;
            if (i % 97 == 5) x = 0.0f;
            if (i % 1009 == 7) x = -0.0f;
            if (dt == 0) memcpy(dst + i * 4, &x, 4);
            else {
                const uint16_t h = dt == 1 ? fmt::float_to_half_bits(x) : fmt::float_to_bf16_bits(x);
                memcpy(dst + i * 2, &h, 2);
            }
        }
    };
    std::unique_ptr<uint8_t[]> g(new uint8_t[(size_t)n * es]), p(new uint8_t[(size_t)n * es]);
    fill(g.get(), n, 0.1f);
    fill(p.get(), n, 1.0f);
    if (n > 300) { /* a NaN gradient and an Inf one: NaN / Inf state blocks must not crash */
        const float nan = NAN, inf = INFINITY;
        if (dt == 0) {
            memcpy(g.get() + 4 * 3, &nan, 4);
            memcpy(g.get() + 4 * 290, &inf, 4);
        }
    }
    lowbit_optim_args args{0.9, 0.999, 0.9999, 5.0, 1e-8, wd, 1e-3, 1.0, step, max_unorm, 10.0};
    std::vector<uint8_t> out;
    auto append = [&](const void *src, size_t bytes) {
        out.insert(out.end(), static_cast<const uint8_t *>(src), static_cast<const uint8_t *>(src) + bytes);
    };
    if (!eight_bit) {
        std::unique_ptr<float[]> s1(new float[(size_t)(copies * n)]), s2(two ? new float[(size_t)n] : nullptr);
        for (int64_t i = 0; i < copies * n; ++i) s1[i] = u(rng) * 0.01f + (opt == LOWBIT_OPTIM_RMSPROP || opt == LOWBIT_OPTIM_ADAGRAD ? 0.02f : 0.0f);
        for (int64_t i = 0; two && i < n; ++i) s2[i] = (u(rng) + 1.0f) * 1e-4f;
        float unorm = -1.0f;
        CHECK(lowbit_optimizer_update_32bit(opt, dt, g.get(), p.get(), n, s1.get(), copies * n, s2.get(), two ? n : 0, &args,
                                            &unorm, threads) ==
                  LOWBIT_OK, "32-bit step opt=%d dt=%d n=%lld", opt, dt, (long long)n);
        append(s1.get(), sizeof(float) * (size_t)(copies * n));
        if (two) append(s2.get(), sizeof(float) * (size_t)n);
        append(&unorm, sizeof unorm);
    } else {
        std::vector<float> signed_code(256), unsigned_code(256);
        for (int i = 0; i < 256; ++i) { /* sorted codes spanning [-1, 1] and [0, 1] */
            signed_code[i] = -1.0f + 2.0f * (float)i / 255.0f;
            unsigned_code[i] = (float)i / 255.0f;
        }
        std::unique_ptr<uint8_t[]> q1(new uint8_t[(size_t)(copies * n)]), q2(two ? new uint8_t[(size_t)n] : nullptr);
        std::unique_ptr<float[]> a1(new float[(size_t)(copies * nb)]), a2(two ? new float[(size_t)nb] : nullptr);
        for (int64_t i = 0; i < copies * n; ++i) q1[i] = (uint8_t)(rng() >> 56);
        for (int64_t i = 0; two && i < n; ++i) q2[i] = (uint8_t)(rng() >> 56);
        for (int64_t b = 0; b < copies * nb; ++b) a1[b] = b == 0 ? 0.0f : 0.01f * (float)(b % 7);
        for (int64_t b = 0; two && b < nb; ++b) a2[b] = 1e-4f * (float)(b % 5);
        CHECK(lowbit_optimizer_update_8bit_blockwise(opt, dt, g.get(), p.get(), n, q1.get(), copies * n, q2.get(),
                                                     two ? n : 0, &args, signed_code.data(), 256, unsigned_code.data(),
                                                     256, a1.get(), copies * nb, a2.get(), two ? nb : 0, threads) == LOWBIT_OK,
              "8-bit step opt=%d dt=%d n=%lld", opt, dt, (long long)n);
        append(q1.get(), (size_t)(copies * n));
        append(a1.get(), sizeof(float) * (size_t)(copies * nb));
        if (two) {
            append(q2.get(), (size_t)n);
            append(a2.get(), sizeof(float) * (size_t)nb);
        }
    }
    append(p.get(), (size_t)n * es);
    return out;
}

static void test_optimizer_arguments() {
    float buf[8] = {};
    uint8_t q[8] = {};
    const float code[256] = {};
    lowbit_optim_args args{0.9, 0.999, 0.0, 0.0, 1e-8, 0.0, 1e-3, 1.0, 1, 0.0, 0.0};
    lowbit_optim_args step0 = args;
    step0.step = 0;
    /* 32-bit: (optimizer, dtype, g, p, n, state1, state1_len, state2, state2_len, args, unorm_vec, threads) */
    REFUSED(lowbit_optimizer_update_32bit(6, 0, buf, buf, 1, buf, 1, buf, 1, &args, nullptr, 1), "optimizer = 6");
    REFUSED(lowbit_optimizer_update_32bit(-1, 0, buf, buf, 1, buf, 1, buf, 1, &args, nullptr, 1), "optimizer = -1");
    REFUSED(lowbit_optimizer_update_32bit(0, 3, buf, buf, 1, buf, 1, buf, 1, &args, nullptr, 1), "dtype = 3");
    REFUSED(lowbit_optimizer_update_32bit(0, 0, buf, buf, -1, buf, 1, buf, 1, &args, nullptr, 1), "n = -1");
    REFUSED(lowbit_optimizer_update_32bit(0, 0, buf, buf, 1, buf, 1, buf, 1, nullptr, nullptr, 1), "args is a null pointer");
    REFUSED(lowbit_optimizer_update_32bit(0, 0, buf, buf, 1, buf, 1, buf, 1, &step0, nullptr, 1), "args->step = 0");
    REFUSED(lowbit_optimizer_update_32bit(0, 0, buf, buf, 8, buf, 4, buf, 8, &args, nullptr, 1), "state1_len = 4, but n = 8");
    REFUSED(lowbit_optimizer_update_32bit(0, 0, buf, buf, 8, buf, 8, buf, 7, &args, nullptr, 1), "state2_len = 7, but n = 8");
    REFUSED(lowbit_optimizer_update_32bit(5, 0, buf, buf, 4, buf, 4, buf, 4, &args, nullptr, 1),
            "state1_len = 4, but 2 * n (ademamix) = 8");
    CHECK(lowbit_optimizer_update_32bit(0, 0, nullptr, nullptr, 0, nullptr, 0, nullptr, 0, &args, nullptr, 1) == LOWBIT_OK,
          "n == 0");
    REFUSED(lowbit_optimizer_update_32bit(0, 0, buf, buf, 1, buf, 1, nullptr, 1, &args, nullptr, 1), "state2 is a null pointer");
    CHECK(lowbit_optimizer_update_32bit(1, 0, buf, buf, 1, buf, 1, nullptr, 0, &args, nullptr, 1) == LOWBIT_OK,
          "momentum without state2");
    CHECK(lowbit_optimizer_update_32bit(1, 0, buf, buf, 1, buf, 1, buf, 99, &args, nullptr, 1) == LOWBIT_OK,
          "momentum ignores state2 and its length");
    REFUSED(lowbit_optimizer_update_32bit(1, 0, nullptr, buf, 1, buf, 1, nullptr, 0, &args, nullptr, 1), "g is a null pointer");
    lowbit_optim_args lamb = args;
    lamb.max_unorm = 1.0;
    REFUSED(lowbit_optimizer_update_32bit(0, 0, buf, buf, 1, buf, 1, buf, 1, &lamb, nullptr, 1), "unorm_vec");
    CHECK(lowbit_optimizer_update_32bit(4, 0, buf, buf, 1, buf, 1, nullptr, 0, &lamb, nullptr, 1) == LOWBIT_OK,
          "lion ignores max_unorm");
    /* 8-bit: (optimizer, dtype, g, p, n, state1, len, state2, len, args, qmap1, len, qmap2, len, absmax1, len,
     * absmax2, len, threads) */
    REFUSED(lowbit_optimizer_update_8bit_blockwise(6, 0, buf, buf, 1, q, 1, q, 1, &args, code, 256, code, 256, buf, 1, buf,
                                                   1, 1), "optimizer = 6");
    REFUSED(lowbit_optimizer_update_8bit_blockwise(0, 0, buf, buf, 1, q, 1, q, 1, &step0, code, 256, code, 256, buf, 1, buf,
                                                   1, 1), "args->step = 0");
    CHECK(lowbit_optimizer_update_8bit_blockwise(0, 0, nullptr, nullptr, 0, nullptr, 0, nullptr, 0, &args, nullptr, 256,
                                                 nullptr, 256, nullptr, 0, nullptr, 0, 1) == LOWBIT_OK, "n == 0");
    REFUSED(lowbit_optimizer_update_8bit_blockwise(0, 0, buf, buf, 8, q, 4, q, 8, &args, code, 256, code, 256, buf, 1, buf,
                                                   1, 1), "state1_len = 4, but n = 8");
    REFUSED(lowbit_optimizer_update_8bit_blockwise(0, 0, buf, buf, 8, q, 8, q, 8, &args, code, 256, code, 256, buf, 2, buf,
                                                   1, 1), "absmax1_len = 2, but ceil(n / 256) = 1");
    REFUSED(lowbit_optimizer_update_8bit_blockwise(0, 0, buf, buf, 8, q, 8, q, 8, &args, code, 16, code, 256, buf, 1, buf,
                                                   1, 1), "qmap1_len = 16");
    REFUSED(lowbit_optimizer_update_8bit_blockwise(0, 0, buf, buf, 8, q, 8, q, 8, &args, code, 256, code, 255, buf, 1, buf,
                                                   1, 1), "qmap2_len = 255");
    REFUSED(lowbit_optimizer_update_8bit_blockwise(0, 0, buf, buf, 8, q, 8, q, 8, &args, code, 256, code, 256, buf, 1, buf,
                                                   0, 1), "absmax2_len = 0");
    REFUSED(lowbit_optimizer_update_8bit_blockwise(5, 0, buf, buf, 4, q, 8, q, 4, &args, code, 256, code, 256, buf, 1, buf,
                                                   1, 1), "absmax1_len = 1, but 2 * ceil(n / 256) (ademamix) = 2");
    REFUSED(lowbit_optimizer_update_8bit_blockwise(0, 0, buf, buf, 1, q, 1, q, 1, &args, code, 256, nullptr, 256, buf, 1,
                                                   buf, 1, 1), "qmap2 is a null pointer");
    REFUSED(lowbit_optimizer_update_8bit_blockwise(0, 0, buf, buf, 1, q, 1, q, 1, &args, code, 256, code, 256, buf, 1,
                                                   nullptr, 1, 1), "absmax2 is a null pointer");
    CHECK(lowbit_optimizer_update_8bit_blockwise(2, 0, buf, buf, 1, q, 1, nullptr, 0, &args, code, 256, nullptr, 0, buf, 1,
                                                 nullptr, 0, 1) == LOWBIT_OK, "rmsprop one state");
    REFUSED(lowbit_optimizer_update_8bit_blockwise(2, 0, buf, buf, 1, q, 1, nullptr, 0, &args, nullptr, 256, nullptr, 0,
                                                   buf, 1, nullptr, 0, 1), "qmap1 is a null pointer");
}

/* Every optimizer, dtype, both state widths: every ISA and thread count writes the scalar build's bytes. */
static void test_optimizers_isas_and_threads() {
    const std::vector<int> isas = supported_isas();
    const int64_t sizes[] = {1, 255, 257, 1000, 70001};
    int iter = 0;
    for (int eight = 0; eight < 2; ++eight)
        for (int opt = 0; opt < 6; ++opt)
            for (int dt = 0; dt < 3; ++dt)
                for (int64_t n : sizes) {
                    ++iter;
                    const int64_t step = iter % 3 == 0 ? 1 : 4;
                    const double wd = iter % 2 ? 0.0 : 0.01;
                    const double max_unorm = (!eight && iter % 4 == 1) ? 0.01 : 0.0;
                    lowbit_set_cpu_isa(LOWBIT_ISA_SCALAR);
                    const std::vector<uint8_t> want = optim_outputs(opt, dt, n, eight, step, wd, max_unorm, 1, n + iter);
                    for (int isa : isas) {
                        lowbit_set_cpu_isa(isa);
                        for (int threads : {1, 2, 7}) {
                            if (n < 70001 && threads > 1) continue;
                            const std::vector<uint8_t> got =
                                optim_outputs(opt, dt, n, eight, step, wd, max_unorm, threads, n + iter);
                            CHECK(got == want, "%s %d-bit opt=%d dt=%d n=%lld threads=%d differs from scalar", isa_name(isa),
                                  eight ? 8 : 32, opt, dt, (long long)n, threads);
                        }
                    }
                }
    lowbit_set_cpu_isa(isas.back());
}

/* ---- LLM.int8 (lowbit_int8_*) ---------------------------------------------------------------- */

static void test_int8_arguments() {
    int8_t a[8] = {}, b[8] = {}, q[8] = {};
    int32_t acc[8] = {}, out32[8] = {};
    float x[8] = {}, stats[8] = {1, 1, 1, 1, 1, 1, 1, 1}, outf[8] = {};
    uint8_t flags[8] = {};
    /* matmul */
    REFUSED(lowbit_int8_linear_matmul(a, -1, 8, b, 1, out32, 1), "M = -1");
    REFUSED(lowbit_int8_linear_matmul(a, 1, 0, b, 1, out32, 1), "K = 0 must be in [1, 131071]");
    REFUSED(lowbit_int8_linear_matmul(a, 1, int64_t{1} << 17, b, 1, out32, 1), "K = 131072 must be in [1, 131071]");
    REFUSED(lowbit_int8_linear_matmul(a, 1, 8, b, -1, out32, 1), "N = -1");
    REFUSED(lowbit_int8_linear_matmul(a, int64_t{1} << 50, 8, b, int64_t{1} << 50, out32, 1), "M * N = ");
    CHECK(lowbit_int8_linear_matmul(nullptr, 0, 8, nullptr, 3, nullptr, 1) == LOWBIT_OK, "matmul M == 0");
    CHECK(lowbit_int8_linear_matmul(nullptr, 3, 8, nullptr, 0, nullptr, 1) == LOWBIT_OK, "matmul N == 0");
    REFUSED(lowbit_int8_linear_matmul(nullptr, 1, 8, b, 1, out32, 1), "A is a null pointer");
    REFUSED(lowbit_int8_linear_matmul(a, 1, 8, nullptr, 1, out32, 1), "B is a null pointer");
    REFUSED(lowbit_int8_linear_matmul(a, 1, 8, b, 1, nullptr, 1), "out is a null pointer");
    /* quantize: (dtype, A, rows, cols, threshold, out, row_stats, len, outlier_flags, len, threads) */
    REFUSED(lowbit_int8_vectorwise_quant(3, x, 1, 8, 0.0f, q, stats, 1, flags, 8, 1), "dtype = 3");
    REFUSED(lowbit_int8_vectorwise_quant(0, x, -1, 8, 0.0f, q, stats, 1, flags, 8, 1), "rows = -1");
    REFUSED(lowbit_int8_vectorwise_quant(0, x, 1, -8, 0.0f, q, stats, 1, flags, 8, 1), "cols = -8");
    REFUSED(lowbit_int8_vectorwise_quant(0, x, int64_t{1} << 40, int64_t{1} << 40, 0.0f, q, stats, 1, flags, 8, 1),
            "rows * cols");
    REFUSED(lowbit_int8_vectorwise_quant(0, x, 1, 8, -1.0f, q, stats, 1, flags, 8, 1), "threshold = -1");
    REFUSED(lowbit_int8_vectorwise_quant(0, x, 1, 8, NAN, q, stats, 1, flags, 8, 1), "threshold = nan");
    CHECK(lowbit_int8_vectorwise_quant(0, x, 1, 8, INFINITY, q, stats, 1, flags, 8, 1) == LOWBIT_OK, "threshold Inf: no outliers");
    REFUSED(lowbit_int8_vectorwise_quant(0, x, 1, 8, 0.0f, q, stats, 2, flags, 8, 1), "row_stats_len = 2, but rows = 1");
    REFUSED(lowbit_int8_vectorwise_quant(0, x, 1, 8, 0.0f, q, stats, 1, flags, 7, 1), "outlier_flags_len = 7, but cols = 8");
    REFUSED(lowbit_int8_vectorwise_quant(0, x, 1, 8, 0.0f, q, stats, 1, nullptr, 8, 1), "0 for a null outlier_flags");
    CHECK(lowbit_int8_vectorwise_quant(0, nullptr, 0, 8, 0.0f, nullptr, nullptr, 0, nullptr, 0, 1) == LOWBIT_OK, "quant empty");
    REFUSED(lowbit_int8_vectorwise_quant(0, nullptr, 1, 8, 0.0f, q, stats, 1, flags, 8, 1), "A is a null pointer");
    REFUSED(lowbit_int8_vectorwise_quant(0, x, 1, 8, 0.0f, nullptr, stats, 1, flags, 8, 1), "out is a null pointer");
    REFUSED(lowbit_int8_vectorwise_quant(0, x, 1, 8, 0.0f, q, nullptr, 1, flags, 8, 1), "row_stats is a null pointer");
    CHECK(lowbit_int8_vectorwise_quant(0, x, 1, 8, 0.0f, q, stats, 1, nullptr, 0, 1) == LOWBIT_OK, "quant without flags");
    REFUSED(lowbit_int8_colwise_quant(0, x, 1, 8, -2.0f, q, stats, 8, 1), "threshold = -2");
    REFUSED(lowbit_int8_colwise_quant(0, x, 1, 8, 0.0f, q, stats, 1, 1), "col_stats_len = 1, but cols = 8");
    REFUSED(lowbit_int8_colwise_quant(0, x, 1, 8, 0.0f, q, nullptr, 8, 1), "col_stats is a null pointer");
    /* dequantize: (A, stats, stats_len, rows, cols, scale, out, threads) */
    REFUSED(lowbit_int8_vectorwise_dequant(q, stats, 1, 1, -1, 1.0f, outf, 1), "cols = -1");
    REFUSED(lowbit_int8_vectorwise_dequant(q, stats, 8, 1, 8, 1.0f, outf, 1), "stats_len = 8, but rows = 1");
    REFUSED(lowbit_int8_vectorwise_dequant(q, nullptr, 1, 1, 8, 1.0f, outf, 1), "stats is a null pointer");
    CHECK(lowbit_int8_vectorwise_dequant(nullptr, nullptr, 0, 0, 8, 1.0f, nullptr, 1) == LOWBIT_OK, "dequant empty");
    /* mm_dequant: (A, row_stats, len, col_stats, len, rows, cols, scale, bias, len, bias_dtype, out_dtype, out, threads) */
    REFUSED(lowbit_int8_mm_dequant(acc, stats, 1, stats, 8, 1, 8, 1.0f, nullptr, 0, 0, 3, outf, 1), "out_dtype = 3");
    REFUSED(lowbit_int8_mm_dequant(acc, stats, 1, stats, 8, 1, 8, 1.0f, stats, 8, 7, 0, outf, 1), "bias_dtype = 7");
    CHECK(lowbit_int8_mm_dequant(acc, stats, 1, stats, 8, 1, 8, 1.0f, nullptr, 0, 7, 0, outf, 1) == LOWBIT_OK,
          "mm_dequant: bias dtype ignored without a bias");
    REFUSED(lowbit_int8_mm_dequant(acc, stats, 1, stats, 8, 1, 8, 1.0f, stats, 4, 0, 0, outf, 1), "bias_len = 4, but cols = 8");
    REFUSED(lowbit_int8_mm_dequant(acc, stats, 1, stats, 8, 1, 8, 1.0f, nullptr, 8, 0, 0, outf, 1), "0 for a null bias");
    REFUSED(lowbit_int8_mm_dequant(acc, stats, 2, stats, 8, 1, 8, 1.0f, nullptr, 0, 0, 0, outf, 1), "row_stats_len = 2");
    REFUSED(lowbit_int8_mm_dequant(acc, stats, 1, stats, 7, 1, 8, 1.0f, nullptr, 0, 0, 0, outf, 1), "col_stats_len = 7");
    REFUSED(lowbit_int8_mm_dequant(acc, nullptr, 1, stats, 8, 1, 8, 1.0f, nullptr, 0, 0, 0, outf, 1),
            "row_stats is a null pointer");
    /* features */
    const int32_t features = lowbit_cpu_features();
    CHECK((features & ~lowbit_cpu_features_supported()) == 0, "features in use are supported");
    CHECK(lowbit_set_cpu_features(-1) == LOWBIT_ERR_ARGUMENT && lowbit_set_cpu_features(8) == LOWBIT_ERR_ARGUMENT,
          "unknown feature bits rejected");
    CHECK(lowbit_cpu_features() == features, "unchanged after a rejected set");
    CHECK(lowbit_set_cpu_features(0) == LOWBIT_OK && lowbit_cpu_features() == 0, "features off");
    CHECK(lowbit_set_cpu_features(kAllCpuFeatures) == LOWBIT_OK && lowbit_cpu_features() == features,
          "features restored");
}

/* The ISA / feature combinations to run: every supported ISA, and avx512 without VNNI too. */
static std::vector<std::pair<int, int>> int8_modes() {
    std::vector<std::pair<int, int>> modes;
    const int all = lowbit_cpu_features_supported();
    for (int isa : supported_isas()) {
        modes.push_back({isa, all});
        if (isa == LOWBIT_ISA_AVX512 && all != 0) modes.push_back({isa, 0});
    }
    return modes;
}

/* int8 GEMM on exactly sized heap buffers against a 64-bit sum, every ISA, 1 and 7 threads. */
static void check_int8_matmul(std::mt19937_64 &rng, int64_t M, int64_t K, int64_t N, bool extremes) {
    std::unique_ptr<int8_t[]> A(new int8_t[(size_t)(M * K)]), B(new int8_t[(size_t)(N * K)]);
    std::uniform_int_distribution<int> d(-128, 127);
    for (int64_t i = 0; i < M * K; ++i) A[i] = extremes ? int8_t{-128} : static_cast<int8_t>(d(rng));
    for (int64_t i = 0; i < N * K; ++i) B[i] = extremes ? int8_t{-128} : static_cast<int8_t>(d(rng));
    std::vector<int32_t> want((size_t)(M * N));
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
            int64_t s = 0;
            for (int64_t k = 0; k < K; ++k) s += int64_t{A[m * K + k]} * B[n * K + k];
            want[m * N + n] = static_cast<int32_t>(s); /* fits: |s| <= 2^14 K < 2^31 here */
        }
    for (auto mode : int8_modes()) {
        lowbit_set_cpu_isa(mode.first);
        lowbit_set_cpu_features(mode.second);
        for (int threads : {1, 7}) {
            std::unique_ptr<int32_t[]> out(new int32_t[(size_t)(M * N)]);
            CHECK(lowbit_int8_linear_matmul(A.get(), M, K, B.get(), N, out.get(), threads) == LOWBIT_OK, "int8 matmul");
            int bad = 0;
            for (int64_t i = 0; i < M * N; ++i) bad += out[i] != want[i];
            CHECK(bad == 0, "%s%s int8 matmul M=%lld K=%lld N=%lld threads=%d: %d outputs differ", isa_name(mode.first),
                  mode.second ? "+vnni" : "", (long long)M, (long long)K, (long long)N, threads, bad);
        }
    }
    lowbit_set_cpu_isa(supported_isas().back());
    lowbit_set_cpu_features(kAllCpuFeatures);
}

/* Quantize (row- and column-wise, with and without outlier columns), dequantize and mm_dequant on
 * every ISA against the per-element definition of lowbit_int8.h. */
static void check_int8_quant(std::mt19937_64 &rng, int dt, int64_t rows, int64_t cols, float threshold) {
    const size_t es = dt == 0 ? 4 : 2;
    const int64_t n = rows * cols;
    std::normal_distribution<float> nd(0.0f, 2.5f);
    std::unique_ptr<uint8_t[]> A(new uint8_t[(size_t)n * es]);
    std::vector<float> x((size_t)n);
    for (int64_t i = 0; i < n; ++i) {
        float v = nd(rng);
        if (i % 37 == 3) v = 0.0f;
        if (i % 53 == 7) v = -0.0f;
        if (rows > 3 && i / cols == 3) v *= 1e-40f; /* a subnormal row: 1 / rowmax overflows */
        if (dt == 0) memcpy(&A[(size_t)i * 4], &v, 4);
        else {
            const uint16_t h = dt == 1 ? fmt::float_to_half_bits(v) : fmt::float_to_bf16_bits(v);
            memcpy(&A[(size_t)i * 2], &h, 2);
            v = dt == 1 ? fmt::half_bits_to_float(h) : fmt::bf16_bits_to_float(h);
        }
        x[(size_t)i] = v;
    }
    auto absf = [](float v) { return fabsf(v); };
    /* the definition */
    std::vector<float> rs((size_t)rows, 0.0f), cs((size_t)cols, 0.0f);
    std::vector<uint8_t> fl((size_t)cols, 0);
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) {
            const float v = absf(x[(size_t)(r * cols + c)]);
            if (fmt::int8_is_outlier(v, threshold)) {
                fl[(size_t)c] = 1;
                continue;
            }
            rs[(size_t)r] = std::max(rs[(size_t)r], v);
            cs[(size_t)c] = std::max(cs[(size_t)c], v);
        }
    std::vector<int8_t> q_rows_flags((size_t)n), q_rows((size_t)n), q_cols((size_t)n);
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) {
            const size_t i = (size_t)(r * cols + c);
            const bool out = fmt::int8_is_outlier(absf(x[i]), threshold);
            q_rows[i] = out ? 0 : fmt::int8_quantize(x[i], fmt::int8_row_scale(rs[(size_t)r]));
            q_rows_flags[i] = fl[(size_t)c] ? 0 : q_rows[i];
            q_cols[i] = out ? 0 : fmt::int8_quantize(x[i], fmt::int8_row_scale(cs[(size_t)c]));
        }
    const float dq_scale = 7.874015718698502e-3f, mm_scale = 6.200124e-05f;
    std::unique_ptr<int32_t[]> acc(new int32_t[(size_t)n]);
    std::uniform_int_distribution<int32_t> di(INT32_MIN, INT32_MAX);
    for (int64_t i = 0; i < n; ++i) acc[i] = di(rng);
    std::unique_ptr<uint16_t[]> bias(new uint16_t[(size_t)cols]);
    for (int64_t c = 0; c < cols; ++c) bias[c] = fmt::float_to_bf16_bits(nd(rng));

    for (auto mode : int8_modes()) {
        lowbit_set_cpu_isa(mode.first);
        lowbit_set_cpu_features(mode.second);
        const char *isa = isa_name(mode.first);
        for (int threads : {1, 7}) {
            std::unique_ptr<int8_t[]> q(new int8_t[(size_t)n]);
            std::unique_ptr<float[]> st(new float[(size_t)std::max(rows, cols)]);
            std::unique_ptr<uint8_t[]> flags(new uint8_t[(size_t)cols]);
            /* row-wise with outlier columns */
            CHECK(lowbit_int8_vectorwise_quant(dt, A.get(), rows, cols, threshold, q.get(), st.get(), rows, flags.get(),
                                               cols, threads) == LOWBIT_OK, "int8 quant");
            CHECK(memcmp(q.get(), q_rows_flags.data(), (size_t)n) == 0 && memcmp(flags.get(), fl.data(), (size_t)cols) == 0 &&
                      memcmp(st.get(), rs.data(), (size_t)rows * 4) == 0,
                  "%s int8 quant dt=%d %lldx%lld t=%g threads=%d", isa, dt, (long long)rows, (long long)cols,
                  (double)threshold, threads);
            /* row-wise, outlier elements only */
            CHECK(lowbit_int8_vectorwise_quant(dt, A.get(), rows, cols, threshold, q.get(), st.get(), rows, nullptr, 0,
                                               threads) == LOWBIT_OK, "int8 quant");
            CHECK(memcmp(q.get(), q_rows.data(), (size_t)n) == 0, "%s int8 quant (no flags) dt=%d %lldx%lld", isa, dt,
                  (long long)rows, (long long)cols);
            /* column-wise */
            CHECK(lowbit_int8_colwise_quant(dt, A.get(), rows, cols, threshold, q.get(), st.get(), cols, threads) == LOWBIT_OK,
                  "int8 colwise");
            CHECK(memcmp(q.get(), q_cols.data(), (size_t)n) == 0 && memcmp(st.get(), cs.data(), (size_t)cols * 4) == 0,
                  "%s int8 colwise dt=%d %lldx%lld t=%g", isa, dt, (long long)rows, (long long)cols, (double)threshold);
            /* dequantize */
            std::unique_ptr<float[]> dq(new float[(size_t)n]);
            CHECK(lowbit_int8_vectorwise_dequant(q_rows.data(), rs.data(), rows, rows, cols, dq_scale, dq.get(), threads) ==
                      LOWBIT_OK, "int8 dequant");
            int bad = 0;
            for (int64_t i = 0; i < n; ++i)
                bad += fbits(dq[i]) != fbits(fmt::int8_dequant(q_rows[(size_t)i], rs[(size_t)(i / cols)], dq_scale));
            CHECK(bad == 0, "%s int8 dequant: %d differ", isa, bad);
            /* mm_dequant into A's dtype with a bf16 bias */
            std::unique_ptr<uint8_t[]> o(new uint8_t[(size_t)n * es]);
            CHECK(lowbit_int8_mm_dequant(acc.get(), rs.data(), rows, cs.data(), cols, rows, cols, mm_scale, bias.get(),
                                         cols, LOWBIT_BFLOAT16, dt, o.get(), threads) == LOWBIT_OK, "mm_dequant");
            bad = 0;
            for (int64_t i = 0; i < n; ++i) {
                const float v = fmt::int8_mm_dequant(acc[i], rs[(size_t)(i / cols)], cs[(size_t)(i % cols)], mm_scale) +
                                fmt::bf16_bits_to_float(bias[i % cols]);
                if (dt == 0) {
                    uint32_t got;
                    memcpy(&got, &o[(size_t)i * 4], 4);
                    bad += got != fbits(v);
                } else {
                    uint16_t got;
                    memcpy(&got, &o[(size_t)i * 2], 2);
                    bad += got != (dt == 1 ? fmt::float_to_half_bits(v) : fmt::float_to_bf16_bits(v));
                }
            }
            CHECK(bad == 0, "%s mm_dequant dt=%d: %d differ", isa, dt, bad);
            std::unique_ptr<float[]> o32(new float[(size_t)n]);
            CHECK(lowbit_int8_mm_dequant(acc.get(), rs.data(), rows, cs.data(), cols, rows, cols, mm_scale, nullptr, 0,
                                         0, LOWBIT_FLOAT32, o32.get(), threads) == LOWBIT_OK, "mm_dequant fp32");
            bad = 0;
            for (int64_t i = 0; i < n; ++i)
                bad += fbits(o32[i]) !=
                       fbits(fmt::int8_mm_dequant(acc[i], rs[(size_t)(i / cols)], cs[(size_t)(i % cols)], mm_scale));
            CHECK(bad == 0, "%s mm_dequant fp32: %d differ", isa, bad);
        }
    }
    lowbit_set_cpu_isa(supported_isas().back());
    lowbit_set_cpu_features(kAllCpuFeatures);
}

static void test_int8() {
    /* the -128 * -128 extreme; torch's float -> int8 cast of +-Inf/NaN (0) */
    CHECK(fmt::int8_quantize(1.0f, INFINITY) == 0 && fmt::int8_quantize(0.0f, INFINITY) == 0 &&
              fmt::int8_quantize(-1.0f, INFINITY) == 0, "int8_quantize of an infinite scale is 0");
    CHECK(fmt::int8_quantize(2.5f, 1.0f) == 2 && fmt::int8_quantize(-2.5f, 1.0f) == -2 &&
              fmt::int8_quantize(126.5f, 1.0f) == 126 && fmt::int8_quantize(-127.0f, 1.0f) == -127,
          "int8_quantize rounds half to even");
    CHECK(fbits(fmt::int8_row_scale(0.0f)) == 0 && fmt::int8_row_scale(1e-40f) == INFINITY,
          "int8_row_scale of 0 and of a subnormal");
    std::mt19937_64 rng(8);
    const int64_t shapes[][3] = {{1, 1, 1}, {3, 5, 7}, {6, 64, 4}, {7, 65, 9}, {13, 129, 17}, {2, 300, 5},
                                 {20, 1000, 3}, {97, 70, 6}, {2, 4096 + 100, 5}};
    for (const auto &s : shapes) check_int8_matmul(rng, s[0], s[1], s[2], false);
    check_int8_matmul(rng, 7, 200, 5, true);
    check_int8_matmul(rng, 1, (int64_t{1} << 17) - 1, 2, true); /* 2^14 (2^17 - 1) < 2^31 */
    const int64_t qshapes[][2] = {{1, 1}, {3, 16}, {5, 100}, {9, 33}, {2, 257}};
    int i = 0;
    for (const auto &s : qshapes)
        for (float t : {0.0f, 6.0f, 2.0f}) check_int8_quant(rng, i++ % 3, s[0], s[1], t);
}

/* A stream of one range: `bytes` from `base`. */
static lowbit::cpu::NextStream one_range(const void *base, int64_t bytes) {
    lowbit::cpu::NextStream s;
    s.count = 1;
    s.base[0] = base;
    s.bytes[0] = bytes;
    return s;
}

static bool same_stream(const lowbit::cpu::NextStream &a, const lowbit::cpu::NextStream &b) {
    if (a.count != b.count) return false;
    for (int r = 0; r < a.count; ++r)
        if (a.base[r] != b.base[r] || a.bytes[r] != b.bytes[r]) return false;
    return true;
}

static void test_call_order() {
    using lowbit::cpu::follow;
    static const char layer[3][64] = {};
    const auto stream = [](int i) { return one_range(layer[i], 100 + i); };
    CHECK(follow(layer[0], stream(0)).count == 0, "a product never seen before has no successor");
    CHECK(follow(layer[1], stream(1)).count == 0, "nor has the second");
    CHECK(follow(layer[2], stream(2)).count == 0, "nor the third");
    CHECK(same_stream(follow(layer[0], stream(0)), stream(1)), "layer 0 was followed by layer 1");
    CHECK(same_stream(follow(layer[1], stream(1)), stream(2)), "layer 1 was followed by layer 2");
    CHECK(same_stream(follow(layer[1], stream(1)), stream(1)), "called again, layer 1 followed itself");
    CHECK(same_stream(follow(layer[0], stream(0)), stream(1)), "layer 0 still leads to layer 1");
    std::thread other([&] { /* another thread's order is its own */
        CHECK(follow(layer[0], stream(0)).count == 0, "a new thread has learned nothing");
        follow(layer[2], stream(2));
        CHECK(same_stream(follow(layer[0], stream(0)), stream(2)), "on that thread, layer 0 led to layer 2");
    });
    other.join();
    CHECK(same_stream(follow(layer[2], stream(2)), stream(0)), "here layer 0 followed layer 2");
    CHECK(same_stream(follow(layer[0], stream(0)), stream(2)), "and layer 2 followed layer 0 (this thread's order)");
}

static void test_worker_share() {
    using lowbit::cpu::NextStream;
    using lowbit::cpu::worker_share;
    const char *a = reinterpret_cast<const char *>(uintptr_t{1} << 30), *b = a + (int64_t{64} << 20);
    NextStream next;
    next.count = 2;
    next.base[0] = a;
    next.bytes[0] = int64_t{1} << 20;
    next.base[1] = b;
    next.bytes[1] = int64_t{8} << 20;
    /* two threads: the worker's first chunk starts half-way; a budget of 1/16 of the stream */
    NextStream s = worker_share(next, 1, 2, int64_t{9} << 16);
    CHECK(s.count == 2 && s.base[0] == a + (int64_t{1} << 19) && s.bytes[0] == int64_t{1} << 16 &&
              s.base[1] == b + (int64_t{4} << 20) && s.bytes[1] == int64_t{1} << 19,
          "2 threads: from the middle of each range, the budget in proportion");
    /* four threads: worker 2's first chunk starts 1 - (3/4)^2 = 7/16 of the way in */
    s = worker_share(next, 2, 4, int64_t{1} << 30);
    CHECK(s.base[0] == a + 7 * (int64_t{1} << 16) && s.bytes[0] == 9 * (int64_t{1} << 16) &&
              s.base[1] == b + 7 * (int64_t{1} << 19) && s.bytes[1] == 9 * (int64_t{1} << 19),
          "4 threads, worker 2: from 7/16 to each range's end when the budget exceeds the stream");
    /* a range that starts off a line: the share starts at the line holding its first byte */
    next = one_range(a + 100, 1000);
    s = worker_share(next, 1, 2, 64);
    CHECK(s.base[0] == a + 576 && s.bytes[0] == 64 + (600 - 576), "off a line: from the line of byte 500");
    next.bytes[0] = 0;
    CHECK(worker_share(next, 1, 2, 64).bytes[0] == 0, "an empty range: nothing");
}

int main(int argc, char **argv) {
    const bool exhaustive = argc > 1 && strcmp(argv[1], "--exhaustive") == 0;
    printf("lowbit self-test; build: %s\n", lowbit_build_info());
    test_format_literals();
    test_conversions(exhaustive);
    test_lut8();
    test_isa_selection();
    for (int isa : supported_isas()) { /* the ABI tests on every ISA's kernels */
        printf("  ABI checks with the %s kernels\n", isa_name(isa));
        lowbit_set_cpu_isa(isa);
        test_capi_arguments();
        test_capi_special_blocks();
        test_capi_threads_and_fpenv();
        test_capi_fuzz();
    }
    test_isas_bit_exact();
    test_isa_narrowing(exhaustive);
    test_gemv_arguments();
    test_interleaved_arguments();
    test_gemv();
    test_int8_arguments();
    test_int8();
    test_optimizer_arguments();
    test_optimizers_isas_and_threads();
    test_call_order();
    test_worker_share();
    printf("%ld checks, %d failures\n", g_checks, g_failures);
    return g_failures == 0 ? 0 : 1;
}
