/* decode_bench.cpp -- the native decode product against the machine's read bandwidth, with no
 * Python between layers.
 *
 *   [LOWBIT_CPU_ISA=scalar|avx2|avx512] lowbit_decode_bench [threads] [layers]
 *
 * One token (M = 1) through `layers` 4096 x 4096 NF4 layers in the interleaved layout (default:
 * enough for 2.5x the last-level cache, at least 20), float32 and bf16 activations, both
 * precisions, through the C ABI; the read bandwidth is `threads` threads summing a buffer of
 * 2.5x the LLC (at least 1 GiB). Bytes read per layer: the packed weight and its float32 absmax.
 *
 * benchmarks/run.py measures the same stack through lowbit.matmul_4bit, one Python call per layer;
 * the difference between the two is the Python and torch work between the kernels (its cost
 * grows once each layer's weights have streamed through the caches: README, "Performance").
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <thread>
#include <vector>

#include "huge_pages.h"
#include "lowbit_capi.h"

namespace {

constexpr int64_t kN = 4096, kK = 4096, kBlocksize = 64;

double seconds() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int64_t llc_bytes() {
#if defined(_SC_LEVEL3_CACHE_SIZE)
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (l3 > 0) return l3;
#endif
    return int64_t{32} << 20;
}

/* Best of 5 of fn(), in seconds. */
template <class Fn>
double best_of_5(Fn &&fn) {
    fn(); /* warm-up: pages touched, threads started */
    double best = 1e30;
    for (int r = 0; r < 5; ++r) {
        const double t0 = seconds();
        fn();
        best = std::min(best, seconds() - t0);
    }
    return best;
}

/* `threads` threads xor-summing their share of `words`: the rate a stream can be read at. */
double read_bandwidth(const uint64_t *words, size_t count, int threads) {
    std::vector<uint64_t> sums((size_t)threads * 8);
    const double t = best_of_5([&] {
        std::vector<std::thread> pool;
        const size_t share = count / (size_t)threads;
        for (int i = 0; i < threads; ++i)
            pool.emplace_back([&, i] {
                uint64_t a = 0, b = 0, c = 0, d = 0;
                for (size_t j = share * (size_t)i; j + 4 <= share * (size_t)(i + 1); j += 4) {
                    a ^= words[j];
                    b ^= words[j + 1];
                    c ^= words[j + 2];
                    d ^= words[j + 3];
                }
                sums[(size_t)i * 8] = a ^ b ^ c ^ d;
            });
        for (auto &th : pool) th.join();
    });
    return (double)count * 8 / t;
}

/* The ISA LOWBIT_CPU_ISA names (the names of lowbit/backends/cpu/native.py), else the best one;
 * -1 for an unknown name. Unlike the package, which takes the name as a cap, main() refuses an
 * ISA this library or CPU cannot run: a bench should measure what it says. */
int32_t isa_from_env() {
    const char *name = getenv("LOWBIT_CPU_ISA");
    if (name == nullptr || *name == '\0') return lowbit_cpu_isa();
    const char *names[] = {"scalar", "avx2", "avx512"};
    for (int32_t isa = LOWBIT_ISA_AVX512; isa >= LOWBIT_ISA_SCALAR; --isa)
        if (strcmp(name, names[isa]) == 0) return isa;
    return -1;
}

} // namespace

int main(int argc, char **argv) {
    const int threads = argc > 1 ? atoi(argv[1]) : 2;
    const int64_t per_layer = kN * kK / 2 + kN * kK / kBlocksize * 4;
    const int64_t layers = argc > 2 ? atoll(argv[2]) : std::max<int64_t>(20, 5 * llc_bytes() / 2 / per_layer + 1);
    if (threads < 1 || layers < 1) {
        fprintf(stderr, "usage: lowbit_decode_bench [threads >= 1] [layers >= 1]\n");
        return 2;
    }
    const int32_t isa = isa_from_env();
    if (isa < 0 || lowbit_set_cpu_isa(isa) != LOWBIT_OK) {
        fprintf(stderr, "LOWBIT_CPU_ISA=%s: not an ISA this library and CPU run (scalar, avx2, avx512)\n",
                getenv("LOWBIT_CPU_ISA"));
        return 2;
    }
    printf("lowbit decode bench: %s; ISA %d (0 scalar, 1 avx2, 2 avx512); %lld layers of %lldx%lld NF4 "
           "(%.0f MiB read per token), %d threads, LLC %.0f MiB\n",
           lowbit_build_info(), isa, (long long)layers, (long long)kN, (long long)kK,
           layers * per_layer / 1048576.0, threads, llc_bytes() / 1048576.0);

    std::vector<float> weight((size_t)(kN * kK));
    uint64_t state = 88172645463325252ull; /* xorshift: uniform in [-1, 1) */
    for (float &w : weight) {
        state ^= state << 13, state ^= state >> 7, state ^= state << 17;
        w = (float)(state >> 40) / (float)(1 << 23) - 1.0f;
    }
    std::vector<uint8_t> packed((size_t)(kN * kK / 2));
    std::vector<float> absmax((size_t)(kN * kK / kBlocksize));
    if (lowbit_quantize_4bit(LOWBIT_FLOAT32, weight.data(), kN * kK, kBlocksize, LOWBIT_NF4, packed.data(),
                             (int64_t)packed.size(), absmax.data(), (int64_t)absmax.size(), threads) != LOWBIT_OK)
        return 1;
    /* not yet written (new[] without initializer), as torch.empty gives them: the layout change
     * asks for huge pages (csrc/cpu/huge_pages.h) before its writes touch the pages */
    std::vector<std::unique_ptr<uint8_t[]>> B;
    std::vector<std::unique_ptr<float[]>> S;
    for (int64_t l = 0; l < layers; ++l) {
        B.emplace_back(new uint8_t[packed.size()]);
        S.emplace_back(new float[absmax.size()]);
        if (lowbit_interleave_4bit(packed.data(), (int64_t)packed.size(), absmax.data(), (int64_t)absmax.size(), kN,
                                   kK, kBlocksize, 0, B.back().get(), (int64_t)packed.size(), S.back().get(),
                                   (int64_t)absmax.size(), threads) != LOWBIT_OK)
            return 1;
    }
    float code[16];
    int32_t count = 0;
    lowbit_format_table(LOWBIT_TABLE_NF4_CODE, code, 16, &count);

    /* measured twice, the faster taken: the machine's capability, which load only lowers */
    /* in huge pages like the weights: the best stream the machine can read */
    const size_t words_count = (size_t)std::max<int64_t>(int64_t{1} << 30, 5 * llc_bytes() / 2) / 8;
    std::unique_ptr<uint64_t[]> words(new uint64_t[words_count]);
    lowbit::cpu::advise_huge_pages(words.get(), words_count * sizeof(uint64_t));
    std::fill(words.get(), words.get() + words_count, uint64_t{1});
    const double read = std::max(read_bandwidth(words.get(), words_count, threads), read_bandwidth(words.get(), words_count, threads));
    words.reset();
    printf("read bandwidth: %.1f GB/s\n", read / 1e9);

    std::vector<float> x32((size_t)kK, 0.01f), out32((size_t)kN);
    std::vector<uint16_t> x16((size_t)kK, 0x3c24), out16((size_t)kN); /* bf16 0.01 */
    for (int dtype : {LOWBIT_FLOAT32, LOWBIT_BFLOAT16})
        for (int precision : {LOWBIT_PRECISION_FAST, LOWBIT_PRECISION_FLOAT32}) {
            const void *x = dtype == LOWBIT_FLOAT32 ? (const void *)x32.data() : (const void *)x16.data();
            void *out = dtype == LOWBIT_FLOAT32 ? (void *)out32.data() : (void *)out16.data();
            int32_t status = LOWBIT_OK;
            const double t = best_of_5([&] {
                for (int64_t l = 0; l < layers; ++l)
                    status |= lowbit_matmul_4bit_interleaved(
                        dtype, x, 1, kK, B[(size_t)l].get(), (int64_t)packed.size(), S[(size_t)l].get(),
                        (int64_t)absmax.size(), code, 16, kN, kBlocksize, nullptr, 0, 0, precision, dtype, out, threads);
            });
            if (status != LOWBIT_OK) return 1;
            const double rate = (double)(layers * per_layer) / t;
            printf("1 token, %s activations, %-7s precision: %7.1f ms  %5.1f GB/s  %3.0f%% of read bandwidth\n",
                   dtype == LOWBIT_FLOAT32 ? "fp32" : "bf16", precision == LOWBIT_PRECISION_FAST ? "fast" : "float32",
                   t * 1e3, rate / 1e9, 100 * rate / read);
        }
    return 0;
}
