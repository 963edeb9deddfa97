/* intrain's elementwise rounding kernels in C: each is one pass over contiguous memory doing what
 * numeric/rounding.py and numeric/requant.py do in several PyTorch passes, with the same bits.
 * numeric/native.py compiles this file once per machine and calls it through ctypes; the PyTorch
 * code stays the reference, and tests/test_native.py compares the two bit for bit.
 *
 * Integer ranges (the callers' promises, the same as the PyTorch code's):
 *   - an input of a signed integer type is never that type's minimum, so |a| does not wrap;
 *   - a float input holds exact integers of magnitude below 2**53 (numeric/requant.py's float
 *     path), converted to int64 exactly;
 *   - shifts: 0 <= shift < the bit width of the type the arithmetic runs in (int64 here for
 *     everything but nearest rounding of int16/int32, which runs in the input's own type);
 *     stochastic shifts are at most 31 (the noise is the top bits of one 32-bit draw).
 * Right shifts of negative values are arithmetic (gcc and clang, every target they support).
 */
#include <stdint.h>

/* Nearest rounding of a / 2**s, ties away from zero, without adding 2**(s-1) to |a| (which
 * could wrap): with b = a - 1 for a < 0 (else a) and t = b >> (s - 1), the result is
 * t - (t >> 1) (the proof is at numeric/rounding.py's _nearest). */
#define NEAREST(T, BITS, a, s) \
    ((s) == 0 ? (a) : ({ T b_ = (T)((a) + ((a) >> ((BITS) - 1))); T t_ = (T)(b_ >> ((s) - 1)); (T)(t_ - (t_ >> 1)); }))

#define CLAMP(v, limit) ((v) > (limit) ? (limit) : ((v) < -(limit) ? -(limit) : (v)))

/* ---------------------------------------------------------------- max |a| (as int64) */

#define MAX_ABS(NAME, T)                                                   \
    int64_t intrain_max_abs_##NAME(const T *a, int64_t n) {               \
        int64_t low = 0, high = 0;                                         \
        for (int64_t i = 0; i < n; i++) {                                  \
            int64_t v = (int64_t)a[i];                                     \
            low = v < low ? v : low;                                       \
            high = v > high ? v : high;                                    \
        }                                                                  \
        return high > -low ? high : -low;                                  \
    }

MAX_ABS(i8, int8_t)
MAX_ABS(i16, int16_t)
MAX_ABS(i32, int32_t)
MAX_ABS(i64, int64_t)
MAX_ABS(f32, float)
MAX_ABS(f64, double)

/* ------------------------------------------- nearest rounding, clip to +-limit, narrow store */

/* W: the type the rounding runs in (the input's for integers: no widening, so the loop
 * vectorises; int64 for floats, whose values are exact integers below 2**53). */
#define ROUND_NEAREST(NAME, T, W, WBITS, OUT_NAME, O)                                          \
    void intrain_round_nearest_##NAME##_##OUT_NAME(const T *a, O *out, int64_t n, int s,        \
                                                   int64_t limit) {                            \
        const W lim = (W)limit;                                                                \
        for (int64_t i = 0; i < n; i++) {                                                      \
            W v = (W)a[i];                                                                     \
            W r = NEAREST(W, WBITS, v, s);                                                     \
            out[i] = (O)CLAMP(r, lim);                                                         \
        }                                                                                      \
    }

ROUND_NEAREST(i16, int16_t, int16_t, 16, i8, int8_t)
ROUND_NEAREST(i32, int32_t, int32_t, 32, i8, int8_t)
ROUND_NEAREST(i64, int64_t, int64_t, 64, i8, int8_t)
ROUND_NEAREST(f32, float, int64_t, 64, i8, int8_t)
ROUND_NEAREST(f64, double, int64_t, 64, i8, int8_t)
ROUND_NEAREST(i16, int16_t, int16_t, 16, i16, int16_t)
ROUND_NEAREST(i32, int32_t, int32_t, 32, i16, int16_t)
ROUND_NEAREST(i64, int64_t, int64_t, 64, i16, int16_t)
ROUND_NEAREST(f32, float, int64_t, 64, i16, int16_t)
ROUND_NEAREST(f64, double, int64_t, 64, i16, int16_t)

/* ------------------------------------------------- stochastic rounding with the counter hash */

/* numeric/rng.py's mix32: the same multipliers; uint32 arithmetic is the PyTorch code's
 * "multiply, then keep the low 32 bits". */
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x2C1B3C6Du;
    x ^= x >> 16;
    return x;
}

/* Element i takes the noise of stream position offset + i (< 2**32, checked by the caller):
 * the top s bits of mix32(mix32(position ^ k1) ^ k2), as rng.uniform_bits draws them. */
#define ROUND_STOCHASTIC(NAME, T, OUT_NAME, O)                                                     \
    void intrain_round_stochastic_##NAME##_##OUT_NAME(const T *a, O *out, int64_t n, int s,         \
                                                      int64_t limit, uint32_t k1, uint32_t k2,     \
                                                      uint64_t offset) {                           \
        const int64_t low_mask = ((int64_t)1 << s) - 1;                                            \
        for (int64_t i = 0; i < n; i++) {                                                          \
            int64_t v = (int64_t)a[i];                                                             \
            int64_t sign = v >> 63;                                                                \
            int64_t magnitude = (v ^ sign) - sign;                                                 \
            uint32_t word = mix32(mix32((uint32_t)(offset + (uint64_t)i) ^ k1) ^ k2);              \
            int64_t noise = s == 0 ? 0 : (int64_t)(word >> (32 - s));                              \
            int64_t rounded = (magnitude >> s) + (((magnitude & low_mask) + noise) >> s);          \
            int64_t r = (rounded ^ sign) - sign;                                                   \
            out[i] = (O)CLAMP(r, limit);                                                           \
        }                                                                                          \
    }

ROUND_STOCHASTIC(i16, int16_t, i8, int8_t)
ROUND_STOCHASTIC(i32, int32_t, i8, int8_t)
ROUND_STOCHASTIC(i64, int64_t, i8, int8_t)
ROUND_STOCHASTIC(i16, int16_t, i16, int16_t)
ROUND_STOCHASTIC(i32, int32_t, i16, int16_t)
ROUND_STOCHASTIC(i64, int64_t, i16, int16_t)

/* --------------------------------- NITI's integer update: w - pseudo_round(g / 2**s), clipped */

/* The discarded s bits of |g| split into the upper ceil(s/2) (the probability) and the lower
 * floor(s/2) (the pseudo-random number, doubled for odd s); the magnitude rounds up when the
 * first exceeds the second (numeric/rounding.py, mode "pseudo"). |w| <= 2**15 and the step is at
 * most 2**m + 1 for the update widths methods/update.py allows, far inside int64. */
#define UPDATE_PSEUDO(GNAME, G, WNAME, W)                                                          \
    void intrain_update_pseudo_##GNAME##_##WNAME(const W *w, const G *g, W *out, int64_t n, int s,  \
                                                 int64_t limit) {                                  \
        const int low_width = s >> 1, high_width = s - low_width;                                  \
        const int64_t mask = ((int64_t)1 << s) - 1, low_mask = ((int64_t)1 << low_width) - 1;      \
        for (int64_t i = 0; i < n; i++) {                                                          \
            int64_t v = (int64_t)g[i];                                                             \
            int64_t sign = v >> 63;                                                                \
            int64_t magnitude = (v ^ sign) - sign;                                                 \
            int64_t discarded = magnitude & mask;                                                  \
            int64_t probability = discarded >> low_width;                                          \
            int64_t pseudo_random = (discarded & low_mask) << (high_width - low_width);            \
            int64_t rounded = (magnitude >> s) + (probability > pseudo_random);                    \
            int64_t updated = (int64_t)w[i] - ((rounded ^ sign) - sign);                           \
            out[i] = (W)CLAMP(updated, limit);                                                     \
        }                                                                                          \
    }

UPDATE_PSEUDO(i32, int32_t, i8, int8_t)
UPDATE_PSEUDO(i64, int64_t, i8, int8_t)
UPDATE_PSEUDO(i32, int32_t, i16, int16_t)
UPDATE_PSEUDO(i64, int64_t, i16, int16_t)

/* --------------------------------------- weight averaging: int64 running sums of int8/int16 */

/* total[i] += w[i]; the sums of methods/averaging.py (at most 2**15 per step: no int64 wrap
 * in any run shorter than 2**48 steps). */
#define ADD_INTO_I64(NAME, T)                                                   \
    void intrain_add_into_i64_##NAME(int64_t *total, const T *w, int64_t n) {   \
        for (int64_t i = 0; i < n; i++)                                         \
            total[i] += (int64_t)w[i];                                          \
    }

ADD_INTO_I64(i8, int8_t)
ADD_INTO_I64(i16, int16_t)
