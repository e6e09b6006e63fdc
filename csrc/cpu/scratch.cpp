/* scratch.cpp -- the per-thread buffer of scratch.h. */
#include "scratch.h"

#include <stdlib.h>
#if defined(_WIN32)
#include <malloc.h>
#endif

namespace lowbit {
namespace cpu {

namespace {

constexpr size_t kAlign = 64; /* a cache line: full-width AVX-512 loads never split one */

void *allocate(size_t bytes) {
#if defined(_WIN32)
    return _aligned_malloc(bytes, kAlign);
#else
    return aligned_alloc(kAlign, bytes);
#endif
}

void release(void *p) {
#if defined(_WIN32)
    _aligned_free(p);
#else
    free(p);
#endif
}

struct Buffer {
    float *data = nullptr;
    size_t capacity = 0; /* floats */
    ~Buffer() { release(data); }
};

thread_local Buffer t_buffer;

} // namespace

float *thread_scratch(size_t count) {
    Buffer &b = t_buffer;
    if (count <= b.capacity) return b.data;
    if (count > (static_cast<size_t>(-1) - kAlign) / sizeof(float)) return nullptr;
    const size_t bytes = (count * sizeof(float) + kAlign - 1) / kAlign * kAlign;
    float *data = static_cast<float *>(allocate(bytes));
    if (data == nullptr) return nullptr;
    release(b.data);
    b.data = data;
    b.capacity = bytes / sizeof(float);
    return data;
}

} // namespace cpu
} // namespace lowbit
