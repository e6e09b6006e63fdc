/* lowbit_formats.h -- the quantization formats, defined once for every native backend.
 *
 * What this holds: the NF4/FP4 codebooks, their value order and decision thresholds, the set of
 * supported blocksizes, the 8-bit blockwise "nearest code" lookup definition, and the scalar
 * float <-> fp16/bf16 conversions. Everything here is the byte-level contract with
 * bitsandbytes 0.50.2; the kernels in csrc/cpu (and later csrc/cuda) only loop over it.
 *
 * Why it is written this way:
 *  - Header-only and usable from host C++ and, later, CUDA/HIP device code. Functions are
 *    `LOWBIT_HD static inline`: `static` gives them internal linkage, so that when a kernel
 *    source is compiled several times with different ISA flags (-mavx2, -mavx512f, ...) the
 *    linker can never merge an AVX-512 out-of-line copy into the scalar build.
 *  - Functions used on a device never read namespace-scope arrays (a host variable is not
 *    visible from device code); they use function-local constant arrays built from the
 *    LOWBIT_*_LIST macros below. Those macros also let device code define its own
 *    __constant__ copies from the same literals.
 *  - Bit-exactness: every operation is a single IEEE float32 operation rounded to nearest-even.
 *    Build with contraction off (-ffp-contract=off; nvcc --fmad=false), never with -ffast-math,
 *    and with subnormals preserved (no FTZ/DAZ: 1e-38f below is a subnormal).
 */
#ifndef LOWBIT_FORMATS_H
#define LOWBIT_FORMATS_H

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LOWBIT_HD __host__ __device__
#else
#define LOWBIT_HD
#endif

/* Host builds: float expressions must be evaluated in float32 (x86-64 SSE, AArch64). A target
 * that evaluates in extended precision (x87) would produce different bytes. */
#if !defined(__CUDA_ARCH__) && !defined(__HIP_DEVICE_COMPILE__) && defined(__FLT_EVAL_METHOD__)
#if __FLT_EVAL_METHOD__ != 0
#error "lowbit needs float32 evaluation (FLT_EVAL_METHOD == 0); on x86 build with -mfpmath=sse"
#endif
#endif

/* ------------------------------------------------------------------------------------------ */
/* Literal tables. Decimal literals with enough digits to denote exactly the float32 values.   */

/* NF4 codebook, index 0..15 (already sorted ascending, so its order is the identity). */
#define LOWBIT_NF4_CODE_LIST                                                                   \
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,                  \
        -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,             \
        0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f,                      \
        0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f,  \
        1.0f

/* FP4 (E2M1 variant, bit 3 = sign) raw values in code order; the codebook is raw / 12 in
 * float32 (bitsandbytes normalises by the largest magnitude, 12).
 * Code 8 (sign bit, zero magnitude) is +0.0, NOT -0.0: bitsandbytes 0.50.2 spells it `-0` in
 * a Python list of floats, which is the *integer* 0, so its table (get_4bit_type("fp4")) holds
 * +0.0 there and every bitsandbytes dequantize path returns +0.0 for nibble 8. Writing -0.0f
 * here would flip the sign of those zeros in dequantized output and in the saved quant_map. */
#define LOWBIT_FP4_RAW_LIST                                                                    \
    0.0f, 0.0625f, 8.0f, 12.0f, 4.0f, 6.0f, 2.0f, 3.0f, 0.0f, -0.0625f, -8.0f, -12.0f, -4.0f,   \
        -6.0f, -2.0f, -3.0f
#define LOWBIT_FP4_CODE_LIST                                                                   \
    0.0f, 0.00520833349f, 0.666666687f, 1.0f, 0.333333343f, 0.5f, 0.166666672f, 0.25f, 0.0f,   \
        -0.00520833349f, -0.666666687f, -1.0f, -0.333333343f, -0.5f, -0.166666672f, -0.25f

/* Code indices sorted by code value. The two FP4 zeros (codes 0 and 8, equal values) matter
 * for bytes: position 7 is code 0 and position 8 is code 8 (what bitsandbytes' argsort gives),
 * so 0.0 quantizes to code 0 and anything in (0, 0.0026] to code 8. */
#define LOWBIT_NF4_ORDER_LIST 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
#define LOWBIT_FP4_ORDER_LIST 11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3

/* midpoints[p] = (code[order[p]] + code[order[p+1]]) / 2.0f in float32, p = 0..14. */
#define LOWBIT_NF4_MIDPOINT_LIST                                                               \
    -0.848096371f, -0.610632896f, -0.45999527f, -0.33967942f, -0.234607399f, -0.137911737f,    \
        -0.0455250181f, 0.0397901498f, 0.120255247f, 0.203521252f, 0.292013764f,               \
        0.389312536f, 0.501663446f, 0.64278692f, 0.861478448f
#define LOWBIT_FP4_MIDPOINT_LIST                                                               \
    -0.833333373f, -0.583333373f, -0.416666687f, -0.291666687f, -0.208333343f, -0.0859375f,    \
        -0.00260416674f, 0.0f, 0.00260416674f, 0.0859375f, 0.208333343f, 0.291666687f,         \
        0.416666687f, 0.583333373f, 0.833333373f

#define LOWBIT_BLOCKSIZE_LIST 32, 64, 128, 256, 512, 1024, 2048, 4096
/* 8-bit blockwise also takes the larger powers of two up to this one (bitsandbytes' CPU path
 * accepts large blocks; its tests use 16384). The CPU kernels run them; the GPU backends hand them
 * to the reference kernel. */
#define LOWBIT_MAX_BLOCKSIZE_8BIT 65536

namespace lowbit {
namespace fmt {

/* Same numbering as lowbit_quant_type in csrc/capi/lowbit_capi.h. */
enum QuantType4 : int32_t { kFP4 = 0, kNF4 = 1 };

constexpr int kCode4Size = 16;     /* entries of a 4-bit codebook */
constexpr int kMidpoint4Size = 15; /* thresholds between sorted neighbours */
constexpr int kNumBlocksizes = 8;
constexpr int kCode8Size = 256;     /* entries of an 8-bit blockwise code */
constexpr int kMidpoint8Size = 255;
constexpr int kLut8Size = 65536;    /* bins of the 8-bit "nearest code" lookup */

/* Smallest absmax the 4-bit quantizer divides by. 1e-38f is a float32 subnormal
 * (9.99999935e-39), so 1/kAbsmaxFloor4 = 1.00000007e38 stays finite. */
constexpr float kAbsmaxFloor4 = 1e-38f;

/* Host-side copies (for tables exported through the C ABI, tests and setup code). Device code
 * must use the LOWBIT_HD functions below or its own copies made from the _LIST macros. */
inline constexpr float kNF4Code[] = {LOWBIT_NF4_CODE_LIST};
inline constexpr float kFP4Code[] = {LOWBIT_FP4_CODE_LIST};
inline constexpr float kFP4Raw[] = {LOWBIT_FP4_RAW_LIST};
inline constexpr uint8_t kNF4Order[] = {LOWBIT_NF4_ORDER_LIST};
inline constexpr uint8_t kFP4Order[] = {LOWBIT_FP4_ORDER_LIST};
inline constexpr float kNF4Midpoints[] = {LOWBIT_NF4_MIDPOINT_LIST};
inline constexpr float kFP4Midpoints[] = {LOWBIT_FP4_MIDPOINT_LIST};
inline constexpr int64_t kBlocksizes[] = {LOWBIT_BLOCKSIZE_LIST};

static_assert(sizeof(kNF4Code) / sizeof(kNF4Code[0]) == kCode4Size, "NF4 code size");
static_assert(sizeof(kFP4Code) / sizeof(kFP4Code[0]) == kCode4Size, "FP4 code size");
static_assert(sizeof(kFP4Raw) / sizeof(kFP4Raw[0]) == kCode4Size, "FP4 raw size");
static_assert(sizeof(kNF4Order) / sizeof(kNF4Order[0]) == kCode4Size, "NF4 order size");
static_assert(sizeof(kFP4Order) / sizeof(kFP4Order[0]) == kCode4Size, "FP4 order size");
static_assert(sizeof(kNF4Midpoints) / sizeof(kNF4Midpoints[0]) == kMidpoint4Size, "NF4 mids");
static_assert(sizeof(kFP4Midpoints) / sizeof(kFP4Midpoints[0]) == kMidpoint4Size, "FP4 mids");
static_assert(sizeof(kBlocksizes) / sizeof(kBlocksizes[0]) == kNumBlocksizes, "blocksizes");

/* Compile-time proofs that the literals above are what their definitions say (float32 constant
 * folding is exact IEEE arithmetic). The sign of zero is invisible to ==; the self-test checks
 * the bits. */
namespace detail {
constexpr bool fp4_code_is_raw_over_12() {
    for (int i = 0; i < kCode4Size; ++i)
        if (!(kFP4Code[i] == kFP4Raw[i] / 12.0f)) return false;
    return true;
}
constexpr bool is_sorting_permutation(const float *code, const uint8_t *order) {
    bool seen[kCode4Size] = {};
    for (int p = 0; p < kCode4Size; ++p) {
        if (order[p] >= kCode4Size || seen[order[p]]) return false;
        seen[order[p]] = true;
        if (p > 0 && !(code[order[p - 1]] <= code[order[p]])) return false;
    }
    return true;
}
constexpr bool midpoints_match(const float *code, const uint8_t *order, const float *mids) {
    for (int p = 0; p < kMidpoint4Size; ++p) {
        if (!(mids[p] == (code[order[p]] + code[order[p + 1]]) / 2.0f)) return false;
        if (p > 0 && !(mids[p - 1] < mids[p])) return false; /* strictly ascending */
    }
    return true;
}
constexpr bool blocksizes_ok() {
    for (int i = 0; i < kNumBlocksizes; ++i)
        if (kBlocksizes[i] != (int64_t{32} << i)) return false;
    return true;
}
} // namespace detail
static_assert(detail::fp4_code_is_raw_over_12(), "FP4 literals must equal (float)raw / 12.0f");
static_assert(detail::is_sorting_permutation(kNF4Code, kNF4Order), "NF4 order");
static_assert(detail::is_sorting_permutation(kFP4Code, kFP4Order), "FP4 order");
static_assert(detail::midpoints_match(kNF4Code, kNF4Order, kNF4Midpoints), "NF4 midpoints");
static_assert(detail::midpoints_match(kFP4Code, kFP4Order, kFP4Midpoints), "FP4 midpoints");
static_assert(detail::blocksizes_ok(), "blocksizes are 32 << i");

/* ------------------------------------------------------------------------------------------ */
/* Bit casts (memcpy is the defined way in C++17 and is a builtin in device code too).          */

LOWBIT_HD static inline uint32_t float_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}
LOWBIT_HD static inline float bits_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* ------------------------------------------------------------------------------------------ */
/* Blocksizes                                                                                  */

/* True for 32, 64, ..., 4096: the set used by both the 4-bit and the 8-bit blockwise formats. */
LOWBIT_HD static inline bool is_supported_blocksize(int64_t blocksize) {
    return blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0;
}

/* The 8-bit blockwise blocksizes: the above and 8192 ... LOWBIT_MAX_BLOCKSIZE_8BIT. */
LOWBIT_HD static inline bool is_supported_blocksize_8bit(int64_t blocksize) {
    return blocksize >= 32 && blocksize <= LOWBIT_MAX_BLOCKSIZE_8BIT && (blocksize & (blocksize - 1)) == 0;
}

/* ------------------------------------------------------------------------------------------ */
/* 4-bit (NF4 / FP4) per-element math                                                          */

/* Position of s among the sorted code values: the number of midpoints m with m < s (strict,
 * so a value exactly on a threshold takes the lower position; NaN gives 0). */
LOWBIT_HD static inline int position_4bit(float s, const float *midpoints) {
    int p = 0;
    for (int i = 0; i < kMidpoint4Size; ++i) p += (midpoints[i] < s) ? 1 : 0;
    return p;
}

/* Code index (nibble) for a scaled value s in [-1, 1]: order[position]. */
LOWBIT_HD static inline uint8_t encode_4bit(float s, int quant_type) {
    if (quant_type == kNF4) {
        const float mids[kMidpoint4Size] = {LOWBIT_NF4_MIDPOINT_LIST};
        return static_cast<uint8_t>(position_4bit(s, mids)); /* NF4 order is the identity */
    }
    const float mids[kMidpoint4Size] = {LOWBIT_FP4_MIDPOINT_LIST};
    const uint8_t order[kCode4Size] = {LOWBIT_FP4_ORDER_LIST};
    return order[position_4bit(s, mids)];
}

/* Code value of a nibble (0..15). */
LOWBIT_HD static inline float decode_4bit(unsigned nibble, int quant_type) {
    const float nf4[kCode4Size] = {LOWBIT_NF4_CODE_LIST};
    const float fp4[kCode4Size] = {LOWBIT_FP4_CODE_LIST};
    return quant_type == kNF4 ? nf4[nibble & 15u] : fp4[nibble & 15u];
}

/* Copies the 16 code values of a quant type (kernels hoist them into a local table). */
LOWBIT_HD static inline void code_4bit(int quant_type, float *out16) {
    for (unsigned i = 0; i < kCode4Size; ++i) out16[i] = decode_4bit(i, quant_type);
}

/* Clamp to [-1, 1]. Written so that NaN maps to -1 (no NaN reaches an integer conversion). */
LOWBIT_HD static inline float clamp_unit(float t) {
    t = (t > -1.0f) ? t : -1.0f;
    return (t < 1.0f) ? t : 1.0f;
}

/* ------------------------------------------------------------------------------------------ */
/* The interleaved 4-bit layout (CPU inference)                                                */
/*                                                                                             */
/* A rearrangement of the packed bytes and the absmax of an (N, K) weight with K % blocksize   */
/* == 0, built when a layer is placed for CPU inference and undone bit-exactly for saving     */
/* (lowbit/core/formats.py holds the same definition for Python). Rows are taken in groups of  */
/* kInterleaveRows (the last group holds the r = N - n0 <= kInterleaveRows rows left); within   */
/* a group starting at row n0, the (r, K/8) matrix of 4-byte words (8 weights each, bytes as   */
/* in the standard layout) is stored transposed, and so is the (r, K/blocksize) absmax matrix: */
/*   word d of row n0+j       -> word  n0*K/8 + d*r + j           (d < K/8, j < r)            */
/*   absmax b of row n0+j     -> float n0*K/blocksize + b*r + j   (b < K/blocksize)            */
/* Sizes do not change. One 64-byte load then holds the same 8 weights of 16 consecutive rows, */
/* which a kernel decodes into 16 lanes that all meet one broadcast activation.               */
constexpr int kInterleaveRows = 16;
constexpr int kInterleaveWordWeights = 8; /* weights per 4-byte word */

/* The fast product on this layout (docs/design.md section 10) may run in 16-bit fixed point:
 * each code value as round(code / max|code| * kFixedCodeOne), each element of A as
 * round(a * kFixedActivationOne / amax) with amax the largest magnitude among the kFixedChunk
 * elements of its row it shares a chunk with (or the block, when smaller), products summed
 * exactly per chunk: 64 products of 4096 * 8191 fit an int32. */
constexpr int kFixedChunk = 64;
constexpr int kFixedCodeOne = 4096;
constexpr int kFixedActivationOne = 8191;
/* A chunk whose amax is below this is multiplied by its inverse (2^64, exact) before rounding:
 * 8191 / amax would overflow float32 for subnormal amax. */
constexpr float kFixedTinyChunk = 5.42101086242752217e-20f; /* 2^-64 */
static_assert(kFixedTinyChunk * 18446744073709551616.0f == 1.0f, "2^-64");
static_assert(double{kFixedChunk} * kFixedCodeOne * kFixedActivationOne < 2147483648.0,
              "a chunk's products must fit an int32");

/* Offset of word d of row n (as above) in the interleaved layout of an N-row weight whose rows
 * hold `words` words (K/8; or blocks K/blocksize for the absmax: the same map). */
LOWBIT_HD static inline int64_t interleaved_index(int64_t n, int64_t d, int64_t N, int64_t words) {
    const int64_t n0 = n - n % kInterleaveRows;
    const int64_t r = (N - n0 < kInterleaveRows) ? N - n0 : kInterleaveRows;
    return n0 * words + d * r + (n - n0);
}

/* ------------------------------------------------------------------------------------------ */
/* 8-bit blockwise: the "nearest code" lookup of bitsandbytes 0.50.2 on CPU                    */
/*                                                                                             */
/* The scaled value t = clamp(x * (1/absmax), -1, 1) is snapped to one of 65536 bins; bin j    */
/* stands for v_j = -1 + 2j/65535 and maps to the number of code midpoints below v_j (for a    */
/* sorted code; see build_lut8 for unsorted ones). This is not exactly "nearest code": bins    */
/* are 3.05e-5 wide, so e.g. 0.0 lands in bin 32768 and gets the code just above 1.5e-5, not   */
/* the code 0.0 -- but it is what the bytes are. An all-zero block is special-cased (bytes 0). */

/* midpoint8[i] = 0.5f * (code[i] + code[i+1]), i = 0..254. */
LOWBIT_HD static inline float midpoint8(const float *code, int i) {
    return 0.5f * (code[i] + code[i + 1]);
}

/* Value that bin j of the lookup stands for. Operation order is part of the format. */
LOWBIT_HD static inline float lut8_bin_value(uint32_t j) {
    return -1.0f + (2.0f * static_cast<float>(j)) / 65535.0f;
}

/* One lookup entry by its definition: the number of midpoints strictly below the bin value.
 * Equal to build_lut8's entry whenever the midpoints are non-decreasing (any sorted code), which
 * is every code lowbit and bitsandbytes create; usable per bin on a device. O(255). */
LOWBIT_HD static inline uint8_t lut8_entry(const float *midpoints255, uint32_t j) {
    const float v = lut8_bin_value(j);
    int count = 0;
    for (int i = 0; i < kMidpoint8Size; ++i) count += (midpoints255[i] < v) ? 1 : 0;
    return static_cast<uint8_t>(count);
}

/* Bin of a scaled value t (already clamped to [-1, 1]; each op rounded separately, then a
 * truncating conversion; the result is <= 65535). */
LOWBIT_HD static inline uint32_t lut8_bin(float t) {
    const float u = ((t + 1.0f) * 0.5f) * 65535.0f + 0.5f;
    return static_cast<uint32_t>(u);
}

/* Fills midpoints255[255] and lut[65536] for a 256-entry code with a monotone sweep: a cursor
 * over the midpoints advances while midpoint[cursor] < v_j, and lut[j] is the cursor. For a
 * sorted code this is exactly lut8_entry (the count). For an unsorted code the count and the
 * sweep differ; the sweep is what bitsandbytes 0.50.2 computes (checked against it with random
 * unsorted codes), so the sweep is the definition here. */
static inline void build_lut8(const float *code256, float *midpoints255, uint8_t *lut) {
    for (int i = 0; i < kMidpoint8Size; ++i) midpoints255[i] = midpoint8(code256, i);
    int cursor = 0;
    for (uint32_t j = 0; j < static_cast<uint32_t>(kLut8Size); ++j) {
        const float v = lut8_bin_value(j);
        while (cursor < kMidpoint8Size && midpoints255[cursor] < v) ++cursor;
        lut[j] = static_cast<uint8_t>(cursor);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* float <-> fp16 / bf16 (bit patterns held in uint16_t)                                        */

/* fp16 -> float, exact for every input (subnormals, Inf, NaN payloads). */
LOWBIT_HD static inline float half_bits_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1Fu;
    const uint32_t mant = h & 0x3FFu;
    if (exp == 0x1Fu) return bits_float(sign | 0x7F800000u | (mant << 13)); /* Inf / NaN */
    if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
    /* zero or subnormal: mant * 2^-24, exact in float32 (product is a power-of-two scaling) */
    const float mag = static_cast<float>(mant) * 5.9604644775390625e-08f;
    return bits_float(sign | float_bits(mag));
}

/* float -> fp16, round to nearest even, integer arithmetic only (independent of FP flags).
 * Overflow -> Inf; subnormal results rounded correctly; NaN -> quiet NaN keeping the sign and
 * the top payload bits (what F16C's vcvtps2ph and torch produce). */
LOWBIT_HD static inline uint16_t float_to_half_bits(float f) {
    const uint32_t x = float_bits(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7FFFFFFFu;
    if (ax >= 0x7F800000u) { /* Inf or NaN */
        if (ax == 0x7F800000u) return static_cast<uint16_t>(sign | 0x7C00u);
        return static_cast<uint16_t>(sign | 0x7E00u | ((ax >> 13) & 0x3FFu));
    }
    if (ax >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u); /* >= 65520 -> Inf */
    if (ax >= 0x38800000u) {                                             /* normal fp16 */
        const uint32_t odd = (ax >> 13) & 1u;
        ax = ax - 0x38000000u + 0xFFFu + odd; /* rebias exponent 127 -> 15, add rounding bias */
        return static_cast<uint16_t>(sign | (ax >> 13));
    }
    if (ax <= 0x33000000u) return static_cast<uint16_t>(sign); /* <= 2^-25 rounds to zero */
    /* fp16 subnormal: value = m * 2^(e-150), in units of 2^-24 that is m >> (126 - e). */
    const uint32_t e = ax >> 23;
    const uint32_t m = (ax & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - e; /* 14..24 */
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (r & 1u))) ++r; /* may carry into 0x400: correct */
    return static_cast<uint16_t>(sign | r);
}

/* bf16 -> float, exact. */
LOWBIT_HD static inline float bf16_bits_to_float(uint16_t b) {
    return bits_float(static_cast<uint32_t>(b) << 16);
}

/* float -> bf16, round to nearest even; Inf stays Inf, overflow rounds to Inf, subnormals are
 * rounded like any other value; NaN -> quiet NaN keeping sign and top payload bits (as
 * AVX512-BF16's vcvtneps2bf16; note torch's own CPU paths differ among themselves for NaN:
 * 0x7FC0 scalar, 0xFFFF vectorized). */
LOWBIT_HD static inline uint16_t float_to_bf16_bits(float f) {
    const uint32_t x = float_bits(f);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x0040u);
    const uint32_t rounding = 0x7FFFu + ((x >> 16) & 1u);
    return static_cast<uint16_t>((x + rounding) >> 16);
}

} // namespace fmt
} // namespace lowbit

#endif /* LOWBIT_FORMATS_H */
