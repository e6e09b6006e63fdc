/* lut8_cache.cpp -- small LRU cache of 8-bit blockwise lookup tables (see lut8_cache.h). */
#include "lut8_cache.h"

#include <stdlib.h>
#include <string.h>

#include <mutex>

#include "fp_env.h"
#include "lowbit_formats.h"

namespace lowbit {
namespace cpu {

namespace {

struct Entry {
    float code[fmt::kCode8Size]; /* key: compared bit for bit */
    uint8_t lut[fmt::kLut8Size];
    uint64_t last_use;
};

constexpr int kCapacity = 8;

std::mutex g_mutex;
Entry *g_entries[kCapacity] = {}; /* malloc'ed; kept for the life of the process */
uint64_t g_clock = 0;

} // namespace

void lut8_get(const float *code256, uint8_t *lut_out) {
    FpEnvGuard guard; /* the table is float arithmetic: pin the environment */
    float midpoints[fmt::kMidpoint8Size];
    std::lock_guard<std::mutex> lock(g_mutex);

    int victim = 0;
    for (int i = 0; i < kCapacity; ++i) {
        Entry *e = g_entries[i];
        if (e != nullptr && memcmp(e->code, code256, sizeof e->code) == 0) {
            e->last_use = ++g_clock;
            memcpy(lut_out, e->lut, sizeof e->lut);
            return;
        }
        /* prefer an empty slot, else the least recently used one */
        if (g_entries[victim] != nullptr &&
            (e == nullptr || e->last_use < g_entries[victim]->last_use))
            victim = i;
    }

    Entry *e = g_entries[victim];
    if (e == nullptr) e = static_cast<Entry *>(malloc(sizeof(Entry)));
    if (e == nullptr) { /* out of memory: build straight into the output, cache nothing */
        fmt::build_lut8(code256, midpoints, lut_out);
        return;
    }
    g_entries[victim] = e;
    memcpy(e->code, code256, sizeof e->code);
    fmt::build_lut8(code256, midpoints, e->lut);
    e->last_use = ++g_clock;
    memcpy(lut_out, e->lut, sizeof e->lut);
}

} // namespace cpu
} // namespace lowbit
