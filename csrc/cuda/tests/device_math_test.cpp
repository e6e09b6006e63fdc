/* device_math_test.cpp -- host proof that csrc/common/lowbit_device.h equals the CPU definitions.
 *
 * The GPU kernels quantize 8-bit blockwise without the CPU's 65536-entry table: they compute the
 * entry of each bin from the code's midpoints (lowbit_device.h). This checks, for every one of
 * the 65536 bins, that both ways of computing an entry agree with fmt::build_lut8 (the CPU's
 * table): the O(255) sweep form for sorted and unsorted codes, the 8-step tree search for sorted
 * ones (and that the tree holds every midpoint exactly once).
 * Codes: the signed and unsigned dynamic maps (given on the command line as 512 floats by
 * tests/test_gpu_backends.py, so they are exactly lowbit's), a linear code, codes with repeated
 * values, random unsorted codes, a code holding NaN. Also checks torch_sign.
 * Build: c++ -std=c++17 -O2 -ffp-contract=off -I csrc/common device_math_test.cpp
 * Exit status 0 and "ok" on success.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include <random>
#include <vector>

#include "lowbit_device.h"

using namespace lowbit::fmt;

static int check_code(const char *name, const float *code) {
    std::vector<float> mid(256);
    std::vector<uint8_t> lut(kLut8Size);
    build_lut8(code, mid.data(), lut.data());
    const bool sorted = midpoints8_sorted(mid.data());
    std::vector<float> tree(256, NAN);
    std::vector<int> seen(255, 0);
    for (int i = 1; i < 256; ++i) {
        tree[i] = mid[lut8_tree_source(i)];
        ++seen[lut8_tree_source(i)];
    }
    int bad = 0;
    for (int c = 0; c < 255; ++c)
        if (seen[c] != 1 && bad++ < 5) fprintf(stderr, "%s: midpoint %d is in the tree %d times\n", name, c, seen[c]);
    for (uint32_t j = 0; j < static_cast<uint32_t>(kLut8Size); ++j) {
        const uint8_t sweep = lut8_entry_sweep(mid.data(), j);
        if (sweep != lut[j] && bad++ < 5)
            fprintf(stderr, "%s: bin %u sweep entry %d, table %d\n", name, j, sweep, lut[j]);
        if (sorted) {
            const uint8_t fast = lut8_entry_tree(tree.data(), j);
            if (fast != lut[j] && bad++ < 5)
                fprintf(stderr, "%s: bin %u tree entry %d, table %d\n", name, j, fast, lut[j]);
        }
    }
    printf("%-22s sorted=%d %s\n", name, sorted ? 1 : 0, bad ? "FAIL" : "ok");
    return bad;
}

int main(int argc, char **argv) {
    int bad = 0;
    float code[256];
    if (argc == 513) { /* signed then unsigned dynamic map */
        for (int k = 0; k < 2; ++k) {
            for (int i = 0; i < 256; ++i) code[i] = strtof(argv[1 + 256 * k + i], nullptr);
            bad += check_code(k == 0 ? "dynamic signed" : "dynamic unsigned", code);
        }
    } else if (argc != 1) {
        fprintf(stderr, "usage: %s [512 floats: signed and unsigned dynamic maps]\n", argv[0]);
        return 2;
    }
    for (int i = 0; i < 256; ++i) code[i] = -1.0f + 2.0f * static_cast<float>(i) / 255.0f;
    bad += check_code("linear", code);
    for (int i = 0; i < 256; ++i) code[i] = static_cast<float>(i / 16) / 8.0f - 1.0f; /* repeats */
    bad += check_code("repeated values", code);
    std::mt19937 rng(1234);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (int r = 0; r < 6; ++r) {
        for (int i = 0; i < 256; ++i) code[i] = u(rng);
        if (r % 2) /* mostly sorted with a few swaps */
            for (int i = 0; i < 256; ++i) code[i] = -1.0f + 2.0f * static_cast<float>(i) / 255.0f + (i % 37 == 0 ? 0.3f : 0.0f);
        bad += check_code(r % 2 ? "nearly sorted" : "random unsorted", code);
    }
    for (int i = 0; i < 256; ++i) code[i] = -1.0f + 2.0f * static_cast<float>(i) / 255.0f;
    code[100] = NAN;
    bad += check_code("sorted with NaN", code);

    /* encode_4bit_reg == encode_4bit: around every threshold, a grid over [-1.5, 1.5], specials */
    {
        std::vector<float> vals = {0.0f, -0.0f, NAN, -NAN, INFINITY, -INFINITY, 1e-38f, -1e-38f, 1e-45f};
        for (int q = 0; q < 2; ++q) {
            const float *mids = q == kNF4 ? kNF4Midpoints : kFP4Midpoints;
            for (int i = 0; i < kMidpoint4Size; ++i) {
                float v = mids[i];
                for (int k = 0; k < 4; ++k) v = nextafterf(v, -INFINITY);
                for (int k = 0; k < 9; ++k, v = nextafterf(v, INFINITY)) vals.push_back(v);
            }
        }
        for (int i = -300000; i <= 300000; ++i) vals.push_back(static_cast<float>(i) * 5e-6f);
        long mismatches = 0;
        for (int q = 0; q < 2; ++q)
            for (float v : vals)
                if (encode_4bit_reg(v, q) != encode_4bit(v, q) && mismatches++ < 5)
                    fprintf(stderr, "encode_4bit_reg(%a, %d) = %d, encode_4bit %d\n", v, q, encode_4bit_reg(v, q), encode_4bit(v, q));
        printf("%-22s %s (%zu values x 2 types)\n", "encode_4bit_reg", mismatches ? "FAIL" : "ok", vals.size());
        bad += static_cast<int>(mismatches);
    }

    /* sqrt_rn_from_approx == sqrtf for approximations 1 ulp low, exact, 1 ulp high: every float
     * whose bit pattern is a multiple of 97 (~22M per approximation, all binades), 128 patterns
     * around every power of two, and specials. */
    {
        long mismatches = 0, checked = 0;
        for (int delta = -1; delta <= 1; ++delta) {
            auto approx = [delta](float v) {
                const float r = sqrtf(v);
                if (!(r > 0.0f) || r == INFINITY) return r;
                return bits_float(float_bits(r) + static_cast<uint32_t>(delta));
            };
            for (uint64_t u = 0; u <= 0x7F800000u; u += 97) {
                const float x = bits_float(static_cast<uint32_t>(u));
                const float got = sqrt_rn_from_approx(x, approx), want = sqrtf(x);
                ++checked;
                if (float_bits(got) != float_bits(want) && mismatches++ < 5)
                    fprintf(stderr, "sqrt_rn_from_approx(%a) [approx %+d ulp] = %a, sqrtf %a\n", x, delta, got, want);
            }
            for (uint32_t e = 0; e < 255; ++e) /* 64 patterns on each side of every power of two */
                for (uint32_t k = 0; k < 128; ++k) {
                    const uint32_t bits = (e << 23) + k - 64u;
                    if ((e << 23) < 64u || bits >= 0x7F800000u) continue;
                    const float x = bits_float(bits);
                    const float got = sqrt_rn_from_approx(x, approx), want = sqrtf(x);
                    ++checked;
                    if (float_bits(got) != float_bits(want) && mismatches++ < 5)
                        fprintf(stderr, "sqrt_rn_from_approx(%a) [approx %+d ulp] = %a, sqrtf %a\n", x, delta, got, want);
                }
            const float specials[] = {0.0f, -0.0f, -1.0f, INFINITY, -INFINITY, NAN, 1e-45f, 0x1.0p-96f, 0x1.fffffep127f, 4.0f, 2.0f};
            for (float x : specials) {
                const float got = sqrt_rn_from_approx(x, approx), want = sqrtf(x);
                const bool same = float_bits(got) == float_bits(want) || (got != got && want != want);
                if (!same && mismatches++ < 10)
                    fprintf(stderr, "sqrt_rn_from_approx(%a) [approx %+d ulp] = %a, sqrtf %a\n", x, delta, got, want);
            }
        }
        printf("%-22s %s (%ld values)\n", "sqrt_rn_from_approx", mismatches ? "FAIL" : "ok", checked);
        bad += static_cast<int>(mismatches);
    }

    const float xs[] = {1.0f, -1.0f, 0.0f, -0.0f, NAN, 1e-45f, -INFINITY};
    const float want[] = {1.0f, -1.0f, 0.0f, 0.0f, 0.0f, 1.0f, -1.0f};
    for (int i = 0; i < 7; ++i) {
        const float s = torch_sign(xs[i]);
        if (!(s == want[i]) || (want[i] == 0.0f && signbit(s))) {
            fprintf(stderr, "torch_sign(%g) = %g, want %g\n", xs[i], s, want[i]);
            ++bad;
        }
    }
    printf("%s\n", bad ? "FAIL" : "ok");
    return bad ? 1 : 0;
}
