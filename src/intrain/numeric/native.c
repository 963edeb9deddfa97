/* intrain's elementwise kernels in C: each is one pass over contiguous memory doing what
 * numeric/rounding.py, numeric/requant.py, the update, the averaging, the loss gradient and max
 * pooling do in several PyTorch passes, with the same bits.
 * numeric/native.py compiles this file once per machine and calls it through ctypes; the PyTorch
 * code stays the reference, and tests/test_native.py compares the two bit for bit.
 *
 * Integer ranges (the callers' promises, the same as the PyTorch code's):
 *   - an input of a signed integer type is never that type's minimum, so |a| does not wrap;
 *   - a float input holds exact integers of magnitude below 2**53 (numeric/requant.py's float
 *     path), converted to int64 exactly;
 *   - shifts: 0 <= shift < the bit width of the type the arithmetic runs in (int64 here for
 *     everything but nearest rounding of int16/int32, which runs in the input's own type);
 *     stochastic shifts are at most 31 (the noise is the top bits of one 32-bit draw);
 *   - direct convolutions: int8 operands, at most 32 products per output (C * kh * kw) and at
 *     most 131,071 output positions per plane (Ho * Wo), see that section.
 *   - DFP16's error rows: at most 65,535 positions per sample (an int32 sum of that many values of
 *     magnitude <= 2**15 stays below 2**31).
 * Right shifts of negative values are arithmetic (gcc and clang, every target they support).
 *
 * Threads: each exported kernel that works through many elements takes `threads` (>= 1) last and
 * cuts its elements, rows, planes, samples or channels into that many contiguous ranges, run at
 * once by IN_RANGES on the OpenMP team of PyTorch's own operations: native.py compiles this file
 * with -fopenmp but links no OpenMP library to it, so the team is the runtime PyTorch loaded, whose
 * threads are still spinning from PyTorch's last operation (a second pool of threads beside them,
 * Python's, had each kernel compete with a spinning thread for a core). Every element is computed
 * by the same code whatever the cut, so the bits do not depend on the thread count; built without
 * OpenMP, the ranges run one after another.
 */
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#define PRAGMA(text) _Pragma(#text)
#else
#define PRAGMA(text)
#endif
/* The statement after it once per nonempty range [lo, hi) of [0, units), range_index the range's
 * place in order, `threads` ranges at once (threads >= 1); the rest of the arguments are OpenMP
 * clauses (a reduction). */
#define IN_RANGES(units, threads, lo, hi, ...)                                                         \
    PRAGMA(omp parallel for if((threads) > 1) num_threads(threads) schedule(static, 1) __VA_ARGS__)  \
    for (int range_index = 0; range_index < (threads); range_index++)                                 \
        for (int64_t lo = (int64_t)(units) * range_index / (threads),                                 \
                     hi = (int64_t)(units) * (range_index + 1) / (threads); lo < hi; lo = hi)

/* The omp_get_num_threads this library calls, NULL when built without OpenMP (ranges one after
 * another): the tests check it is the one in the process's global scope, PyTorch's runtime, and
 * not another library's copy of libgomp. */
void *intrain_openmp_entry(void) {
#ifdef _OPENMP
    return (void *)&omp_get_num_threads;
#else
    return NULL;
#endif
}

/* How many threads an IN_RANGES region of `threads` ranges ran on (for the tests). */
int intrain_team_size(int threads) {
    int team = 1;
#ifdef _OPENMP
    IN_RANGES(threads, threads, lo, hi, reduction(max: team)) team = omp_get_num_threads();
#endif
    return team;
}

/* Nearest rounding of a / 2**s, ties away from zero, without adding 2**(s-1) to |a| (which
 * could wrap): with b = a - 1 for a < 0 (else a) and t = b >> (s - 1), the result is
 * t - (t >> 1) (the proof is at numeric/rounding.py's _nearest). */
#define NEAREST(T, BITS, a, s) ((s) == 0 ? (a) : NEAREST_SHIFTED(T, BITS, a, s))
/* The same for s >= 1 only: no test of s, for loops that keep s == 0 apart themselves. */
#define NEAREST_SHIFTED(T, BITS, a, s) \
    ({ T b_ = (T)((a) + ((a) >> ((BITS) - 1))); T t_ = (T)(b_ >> ((s) - 1)); (T)(t_ - (t_ >> 1)); })

#define CLAMP(v, limit) ((v) > (limit) ? (limit) : ((v) < -(limit) ? -(limit) : (v)))

/* ---------------------------------------------------------------- max |a| (as int64) */

/* The minimum and maximum are kept in the input's own type (so the loop runs as many lanes as
 * that type fits in a vector) and widened once at the end, where -low cannot wrap. */
#define MAX_ABS(NAME, T)                                                   \
    static int64_t max_abs_##NAME(const T *a, int64_t n) {                \
        T low = 0, high = 0;                                               \
        for (int64_t i = 0; i < n; i++) {                                  \
            low = a[i] < low ? a[i] : low;                                 \
            high = a[i] > high ? a[i] : high;                              \
        }                                                                  \
        return (int64_t)high > -(int64_t)low ? (int64_t)high : -(int64_t)low; \
    }                                                                      \
    int64_t intrain_max_abs_##NAME(const T *a, int64_t n, int threads) {  \
        int64_t best = 0;                                                  \
        IN_RANGES(n, threads, lo, hi, reduction(max: best)) {              \
            const int64_t m = max_abs_##NAME(a + lo, hi - lo);             \
            best = m > best ? m : best;                                    \
        }                                                                  \
        return best;                                                       \
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
    static void round_nearest_##NAME##_##OUT_NAME(const T *a, O *out, int64_t n, int s,          \
                                                  int64_t limit) {                             \
        const W lim = (W)limit;                                                                \
        for (int64_t i = 0; i < n; i++) {                                                      \
            W v = (W)a[i];                                                                     \
            W r = NEAREST(W, WBITS, v, s);                                                     \
            out[i] = (O)CLAMP(r, lim);                                                         \
        }                                                                                      \
    }                                                                                          \
    void intrain_round_nearest_##NAME##_##OUT_NAME(const T *a, O *out, int64_t n, int s,        \
                                                   int64_t limit, int threads) {               \
        IN_RANGES(n, threads, lo, hi) round_nearest_##NAME##_##OUT_NAME(a + lo, out + lo, hi - lo, s, limit); \
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
/* DFP16's wide (int32) masters and momentum from their int64 sums (numeric/wide.py). */
ROUND_NEAREST(i64, int64_t, int64_t, 64, i32, int32_t)
/* DFP16's headroom shifts of int16 operands (numeric/accumulate.py), in int32 so that any int16
 * value, -32768 included, rounds without wrapping. */
ROUND_NEAREST(i16w, int16_t, int32_t, 32, i16, int16_t)

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
    static void round_stochastic_##NAME##_##OUT_NAME(const T *a, O *out, int64_t n, int s,          \
                                                     int64_t limit, uint32_t k1, uint32_t k2,      \
                                                     uint64_t offset) {                            \
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
    }                                                                                              \
    void intrain_round_stochastic_##NAME##_##OUT_NAME(const T *a, O *out, int64_t n, int s,         \
                                                      int64_t limit, uint32_t k1, uint32_t k2,     \
                                                      uint64_t offset, int threads) {              \
        IN_RANGES(n, threads, lo, hi)                                                              \
            round_stochastic_##NAME##_##OUT_NAME(a + lo, out + lo, hi - lo, s, limit, k1, k2,       \
                                                 offset + (uint64_t)lo);                           \
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
 * first exceeds the second (numeric/rounding.py, mode "pseudo"). The arithmetic runs in the
 * gradient's own type A (int32 or int64), as the PyTorch code's does, so the int32 loop
 * vectorises: |w| <= 2**15 and the step is at most 2**m + 1 <= 2**24 + 1 for the update widths
 * methods/update.py allows, so w - step cannot wrap. */
#define UPDATE_PSEUDO(GNAME, G, BITS, WNAME, W)                                                    \
    static void update_pseudo_##GNAME##_##WNAME(const W *w, const G *g, W *out, int64_t n, int s,   \
                                                int64_t limit) {                                   \
        const int low_width = s >> 1, high_width = s - low_width;                                  \
        const G mask = (G)(((int64_t)1 << s) - 1), low_mask = (G)(((int64_t)1 << low_width) - 1);  \
        const G lim = (G)limit;                                                                    \
        for (int64_t i = 0; i < n; i++) {                                                          \
            G v = g[i];                                                                            \
            G sign = v >> ((BITS) - 1);                                                            \
            G magnitude = (v ^ sign) - sign;                                                       \
            G discarded = magnitude & mask;                                                        \
            G probability = discarded >> low_width;                                                \
            G pseudo_random = (G)((discarded & low_mask) << (high_width - low_width));             \
            G rounded = (G)((magnitude >> s) + (probability > pseudo_random));                     \
            G updated = (G)((G)w[i] - ((rounded ^ sign) - sign));                                  \
            out[i] = (W)CLAMP(updated, lim);                                                       \
        }                                                                                          \
    }                                                                                              \
    void intrain_update_pseudo_##GNAME##_##WNAME(const W *w, const G *g, W *out, int64_t n, int s,  \
                                                 int64_t limit, int threads) {                     \
        IN_RANGES(n, threads, lo, hi)                                                              \
            update_pseudo_##GNAME##_##WNAME(w + lo, g + lo, out + lo, hi - lo, s, limit);           \
    }

UPDATE_PSEUDO(i32, int32_t, 32, i8, int8_t)
UPDATE_PSEUDO(i64, int64_t, 64, i8, int8_t)
UPDATE_PSEUDO(i32, int32_t, 32, i16, int16_t)
UPDATE_PSEUDO(i64, int64_t, 64, i16, int16_t)

/* --------------------------------------- weight averaging: int64 running sums of int8/int16 */

/* total[i] += w[i]; the sums of methods/averaging.py (at most 2**15 per step: no int64 wrap
 * in any run shorter than 2**48 steps). */
#define ADD_INTO_I64(NAME, T)                                                               \
    static void add_into_i64_##NAME(int64_t *total, const T *w, int64_t n) {                \
        for (int64_t i = 0; i < n; i++)                                                     \
            total[i] += (int64_t)w[i];                                                      \
    }                                                                                       \
    void intrain_add_into_i64_##NAME(int64_t *total, const T *w, int64_t n, int threads) {  \
        IN_RANGES(n, threads, lo, hi) add_into_i64_##NAME(total + lo, w + lo, hi - lo);     \
    }

ADD_INTO_I64(i8, int8_t)
ADD_INTO_I64(i16, int16_t)

/* ------------------------------- the integer softmax cross-entropy gradient (methods/loss.py) */

/* Per row of logits v (int8 or int16) with exponent e: t = v * log2e_q15 shifted right by
 * `shift` = 15 - fraction_bits - e (left by at most 32 when negative; right shifts of 64 bits
 * or more act as 63, as PyTorch's do), u = max(t) - t, E = table[u mod 2**f] >> min(u >> f, 62),
 * g = floor(E * 2**prob_bits / sum(E)), minus 2**prob_bits at the target class. Every value is
 * the PyTorch code's: |t| < 2**55 for int8 logits (< 2**63 for 16-bit ones), E <= 2**24, so
 * E * 2**prob_bits < 2**39, and sum(E) >= 2**24 (the row maximum maps to table[0]).
 * With 16-bit logits at exponents above about 30, max(t) - t can pass 2**63: it wraps in both
 * codes alike (u < 0 then gives E = 0, as PyTorch's right shift by a negative amount does).
 * Returns -1 (nothing meaningful written) when a target is outside [0, cols). */
#define SOFTMAX_GRAD(NAME, T)                                                                      \
    int intrain_softmax_grad_##NAME(const T *v, const int64_t *target, const int64_t *table,        \
                                    int64_t *g, int64_t rows, int64_t cols, int64_t shift,          \
                                    int64_t log2e_q15, int fraction_bits, int prob_bits) {         \
        const int right = shift >= 0 ? (shift > 63 ? 63 : (int)shift) : 0;                       \
        const int left = shift < 0 ? (-shift > 32 ? 32 : (int)-shift) : 0;                       \
        const int64_t fraction_mask = ((int64_t)1 << fraction_bits) - 1;                           \
        for (int64_t r = 0; r < rows; r++) {                                                       \
            const T *row = v + r * cols;                                                           \
            int64_t *out = g + r * cols;                                                           \
            if (target[r] < 0 || target[r] >= cols) return -1;                                     \
            int64_t top = INT64_MIN;                                                               \
            for (int64_t j = 0; j < cols; j++) {                                                   \
                int64_t t = (int64_t)row[j] * log2e_q15;                                           \
                t = shift >= 0 ? t >> right : (int64_t)((uint64_t)t << left);                      \
                out[j] = t;                                                                        \
                top = t > top ? t : top;                                                           \
            }                                                                                      \
            int64_t total = 0;                                                                     \
            for (int64_t j = 0; j < cols; j++) {                                                   \
                int64_t u = (int64_t)((uint64_t)top - (uint64_t)out[j]);                           \
                int64_t whole = u >> fraction_bits;                                                \
                int64_t entry = table[u & fraction_mask];                                          \
                out[j] = whole < 0 ? entry >> 63 : entry >> (whole > 62 ? 62 : whole);            \
                total += out[j];                                                                   \
            }                                                                                      \
            for (int64_t j = 0; j < cols; j++)                                                     \
                out[j] = (out[j] << prob_bits) / total;                                            \
            out[target[r]] -= (int64_t)1 << prob_bits;                                             \
        }                                                                                          \
        return 0;                                                                                  \
    }

SOFTMAX_GRAD(i8, int8_t)
SOFTMAX_GRAD(i16, int16_t)

/* ------------------------------------- max pooling, k x k windows with stride k (layers/pooling.py) */

/* x: planes [P, H, W] (P = N * C); maxima [P, H/k, W/k]; argmax (NULL in evaluation): the
 * row-major window position (0 .. k*k-1) of the first maximum, as the PyTorch code keeps it.
 * Rows and columns that do not fill a window are not read. k*k <= 127 (the caller's check). */
#define MAX_POOL(NAME, T)                                                                          \
    static void max_pool_##NAME(const T *restrict x, T *restrict maxima, int8_t *restrict argmax,   \
                                int64_t planes, int64_t h, int64_t w, int k) {                     \
        const int64_t ho = h / k, wo = w / k;                                                      \
        for (int64_t p = 0; p < planes; p++) {                                                     \
            const T *plane = x + p * h * w;                                                        \
            for (int64_t r = 0; r < ho; r++) {                                                     \
                const T *top = plane + r * k * w;                                                  \
                T *out = maxima + (p * ho + r) * wo;                                               \
                int8_t *where = argmax ? argmax + (p * ho + r) * wo : 0;                           \
                if (k == 2 && where) {                                                             \
                    /* branch-free selects, so the loop over windows vectorises */                 \
                    const T *bottom = top + w;                                                     \
                    for (int64_t c = 0; c < wo; c++) {                                             \
                        T a = top[2 * c], b = top[2 * c + 1], d = bottom[2 * c], e = bottom[2 * c + 1]; \
                        T ab = a > b ? a : b, de = d > e ? d : e, m = ab > de ? ab : de;           \
                        int8_t position = (int8_t)((a != m) * (1 + (b != m) * (1 + (d != m))));   \
                        out[c] = m;                                                                \
                        where[c] = position;                                                       \
                    }                                                                              \
                    continue;                                                                      \
                }                                                                                  \
                if (k == 2) {                                                                      \
                    const T *bottom = top + w;                                                     \
                    for (int64_t c = 0; c < wo; c++) {                                             \
                        T a = top[2 * c], b = top[2 * c + 1], d = bottom[2 * c], e = bottom[2 * c + 1]; \
                        T ab = a > b ? a : b, de = d > e ? d : e;                                  \
                        out[c] = ab > de ? ab : de;                                                \
                    }                                                                              \
                    continue;                                                                      \
                }                                                                                  \
                for (int64_t c = 0; c < wo; c++) {                                                 \
                    const T *window = top + c * k;                                                 \
                    T best = window[0];                                                            \
                    int position = 0;                                                              \
                    for (int i = 0; i < k; i++)                                                    \
                        for (int j = 0; j < k; j++)                                                \
                            if (window[i * w + j] > best) {                                        \
                                best = window[i * w + j];                                          \
                                position = i * k + j;                                              \
                            }                                                                      \
                    out[c] = best;                                                                 \
                    if (where) where[c] = (int8_t)position;                                        \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    void intrain_max_pool_##NAME(const T *x, T *maxima, int8_t *argmax, int64_t planes, int64_t h,  \
                                 int64_t w, int k, int threads) {                                  \
        const int64_t pooled = (h / k) * (w / k);                                                  \
        IN_RANGES(planes, threads, lo, hi)                                                         \
            max_pool_##NAME(x + lo * h * w, maxima + lo * pooled, argmax ? argmax + lo * pooled : 0, \
                            hi - lo, h, w, k);                                                     \
    }

MAX_POOL(i8, int8_t)
MAX_POOL(i16, int16_t)

/* The error d [P, H/k, W/k] placed at each window's arg-max of a routed [P, H, W] that this
 * writes whole (zero elsewhere, and in the rows and columns no window covered). */
#define MAX_POOL_BACKWARD(NAME, T)                                                                  \
    static void max_pool_backward_##NAME(const T *d, const int8_t *argmax, T *routed,              \
                                         int64_t planes, int64_t h, int64_t w, int k) {            \
        const int64_t ho = h / k, wo = w / k;                                                      \
        for (int64_t i = 0; i < planes * h * w; i++) routed[i] = 0;                                \
        for (int64_t p = 0; p < planes; p++)                                                       \
            for (int64_t r = 0; r < ho; r++)                                                       \
                for (int64_t c = 0; c < wo; c++) {                                                 \
                    int64_t at = (p * ho + r) * wo + c;                                            \
                    int position = argmax[at];                                                     \
                    routed[p * h * w + (r * k + position / k) * w + c * k + position % k] = d[at]; \
                }                                                                                  \
    }                                                                                              \
    void intrain_max_pool_backward_##NAME(const T *d, const int8_t *argmax, T *routed,             \
                                          int64_t planes, int64_t h, int64_t w, int k, int threads) { \
        const int64_t pooled = (h / k) * (w / k);                                                  \
        IN_RANGES(planes, threads, lo, hi)                                                         \
            max_pool_backward_##NAME(d + lo * pooled, argmax + lo * pooled, routed + lo * h * w,   \
                                     hi - lo, h, w, k);                                            \
    }

MAX_POOL_BACKWARD(i8, int8_t)
MAX_POOL_BACKWARD(i16, int16_t)
MAX_POOL_BACKWARD(i32, int32_t)

/* ------------------------- products kept a chunk at a time until their shift is known (kernels/cpu/chunks.py) */

/* Keeping an integer chunk: t = floor(b / 2**k), b = y - 1 for y < 0 (else y), narrowed to the
 * storage type (int32 -> int16 for 8-bit results, int64 -> int32 for 16-bit ones). The caller
 * promises y > the type's minimum (so b does not wrap) and |y| < 2**(Q + k), Q the storage
 * type's magnitude bits, so t fits it (chunks.py's requantize_chunks has the proofs). */
#define FLOOR_SHIFT(NAME, T, BITS, O)                                                 \
    static void floor_shift_##NAME(const T *a, O *out, int64_t n, int k) {            \
        for (int64_t i = 0; i < n; i++) {                                             \
            T b = (T)(a[i] + (a[i] >> ((BITS) - 1)));                                 \
            out[i] = (O)(b >> k);                                                     \
        }                                                                             \
    }                                                                                 \
    void intrain_floor_shift_##NAME(const T *a, O *out, int64_t n, int k, int threads) { \
        IN_RANGES(n, threads, lo, hi) floor_shift_##NAME(a + lo, out + lo, hi - lo, k); \
    }

FLOOR_SHIFT(i32_i16, int32_t, 32, int16_t)
FLOOR_SHIFT(i64_i32, int64_t, 64, int32_t)

/* Rounding a kept chunk by m more bits: floor((t + 2**(m-1)) / 2**m) as u - floor(u / 2) with
 * u = floor(t / 2**(m-1)) for m >= 1; for m = 0 (nothing was shifted, t = b) y itself, t + 1
 * where t < 0. Clipped to +-limit and narrowed. m may exceed the type's width (a chunk far
 * smaller than the largest): shifting by BITS - 1 gives the same u, 0 or -1. */
#define ROUND_KEPT(NAME, T, BITS, O)                                                  \
    static void round_kept_##NAME(const T *t, O *out, int64_t n, int m, int64_t limit) { \
        const T lim = (T)limit;                                                       \
        const int sh = m - 1 < (BITS) - 1 ? m - 1 : (BITS) - 1;                       \
        for (int64_t i = 0; i < n; i++) {                                             \
            T r;                                                                      \
            if (m == 0) {                                                             \
                r = (T)(t[i] - (t[i] >> ((BITS) - 1)));                               \
            } else {                                                                  \
                T u = (T)(t[i] >> sh);                                                \
                r = (T)(u - (u >> 1));                                                \
            }                                                                         \
            out[i] = (O)CLAMP(r, lim);                                                \
        }                                                                             \
    }                                                                                 \
    void intrain_round_kept_##NAME(const T *t, O *out, int64_t n, int m, int64_t limit, \
                                   int threads) {                                     \
        IN_RANGES(n, threads, lo, hi) round_kept_##NAME(t + lo, out + lo, hi - lo, m, limit); \
    }

ROUND_KEPT(i16_i8, int16_t, 16, int8_t)
ROUND_KEPT(i32_i16, int32_t, 32, int16_t)

/* ------------------------------- int16 products from their int8 halves (kernels/int16_gemm.py) */

/* out (+)= 65536 hh + 256 (c1 + c2) + ll + rows[r] + cols[j] for row r < m and column j < n, the
 * four int32 parts at [r * ld + j] of their pointers. hw = 1: out is the row-major [m, n]
 * matrix. hw > 1: rows are (sample, position) pairs, r = sample * hw + position, and out is
 * [samples, n, hw] (NCHW), written through tiles (below). Products by 65536 and 256 rather than
 * left shifts: the values are signed. */
#define HALVES_TOTAL(r, j) \
    ((int64_t)hh[(r) * ld + (j)] * 65536 + ((int64_t)c1[(r) * ld + (j)] + c2[(r) * ld + (j)]) * 256 \
     + ll[(r) * ld + (j)] + rows[r] + cols[j])

static void combine_halves(const int32_t *hh, const int32_t *c1, const int32_t *c2, const int32_t *ll,
                           int64_t ld, const int64_t *rows, const int64_t *cols, int64_t *out,
                           int64_t m, int64_t n, int64_t hw, int accumulate) {
    if (hw == 1) {
        for (int64_t r = 0; r < m; r++) {
            int64_t *o = out + r * n;
            if (accumulate)
                for (int64_t j = 0; j < n; j++) o[j] += HALVES_TOTAL(r, j);
            else
                for (int64_t j = 0; j < n; j++) o[j] = HALVES_TOTAL(r, j);
        }
        return;
    }
    /* Tiles of TILE positions x TILE columns: the totals are made along a row (contiguous reads
     * of the parts, in vectors) into a small buffer, then written out along positions (contiguous
     * writes); reading the parts down a column (stride ld) was a gather per element. 16 x 16 is
     * not tuned: a row of a tile is one 64-byte line of each int32 part, and the int64 tile (2
     * KiB) stays in L1. */
    enum { TILE = 16 };
    int64_t tile[TILE][TILE];
    for (int64_t sample = 0; sample < m / hw; sample++) {
        int64_t *o = out + sample * n * hw;
        for (int64_t p0 = 0; p0 < hw; p0 += TILE) {
            const int64_t pn = p0 + TILE < hw ? TILE : hw - p0;
            for (int64_t j0 = 0; j0 < n; j0 += TILE) {
                const int64_t jn = j0 + TILE < n ? TILE : n - j0;
                for (int64_t p = 0; p < pn; p++) {
                    const int64_t r = sample * hw + p0 + p;
                    for (int64_t j = 0; j < jn; j++) tile[p][j] = HALVES_TOTAL(r, j0 + j);
                }
                for (int64_t j = 0; j < jn; j++) {
                    int64_t *oj = o + (j0 + j) * hw + p0;
                    if (accumulate)
                        for (int64_t p = 0; p < pn; p++) oj[p] += tile[p][j];
                    else
                        for (int64_t p = 0; p < pn; p++) oj[p] = tile[p][j];
                }
            }
        }
    }
}

/* Threads take ranges of samples (of rows for hw = 1). */
void intrain_combine_halves(const int32_t *hh, const int32_t *c1, const int32_t *c2, const int32_t *ll,
                            int64_t ld, const int64_t *rows, const int64_t *cols, int64_t *out,
                            int64_t m, int64_t n, int64_t hw, int accumulate, int threads) {
    IN_RANGES(m / hw, threads, lo, hi) {
        const int64_t first = lo * hw;
        combine_halves(hh + first * ld, c1 + first * ld, c2 + first * ld, ll + first * ld, ld, rows + first,
                       cols, out + first * n, (hi - lo) * hw, n, hw, accumulate);
    }
}

/* The transpose of the 8 x 8 bytes at src (rows of 8) into 8 rows of 8 bytes, ds apart, at dst:
 * three rounds of swaps between 64-bit rows (bytes, then pairs, then quadruples). Splitting an
 * NCHW chunk value by value into channels-last halves stores each byte c apart, which ran 1.3-1.9x
 * slower than splitting 8 x 8 blocks and transposing them (a throwaway timing loop on VGG-small-7's
 * shapes at 8 samples, one thread of the Zen 4 of BENCHMARKS.md with training runs beside it). */
static inline void transpose_8x8(const uint8_t *src, uint8_t *dst, int64_t ds) {
    uint64_t r[8];
    memcpy(r, src, sizeof r);
    for (int i = 0; i < 8; i += 2) {
        const uint64_t t = ((r[i] >> 8) ^ r[i + 1]) & 0x00FF00FF00FF00FFULL;
        r[i] ^= t << 8;
        r[i + 1] ^= t;
    }
    for (int i = 0; i < 8; i += 4)
        for (int j = i; j < i + 2; j++) {
            const uint64_t t = ((r[j] >> 16) ^ r[j + 2]) & 0x0000FFFF0000FFFFULL;
            r[j] ^= t << 16;
            r[j + 2] ^= t;
        }
    for (int j = 0; j < 4; j++) {
        const uint64_t t = ((r[j] >> 32) ^ r[j + 4]) & 0x00000000FFFFFFFFULL;
        r[j] ^= t << 32;
        r[j + 4] ^= t;
    }
    for (int i = 0; i < 8; i++) memcpy(dst + i * ds, &r[i], 8);
}

/* One pass from an int16 chunk x [n, C, H, W] (element strides sn, sc, sh, sw) to both int8 halves
 * of its values shifted right by s with nearest rounding, written channels last into hi and lo
 * [n, H + 2ph, W + 2pw, C] with the padding holding the halves of 0 (0 and -128): the shift, the
 * split, the transpose and the padding that were six PyTorch passes. The halves of r are
 * hi = r >> 8 and lo = (r & 255) - 128, so that r = 256 hi + lo + 128 (int16_gemm.split_halves).
 * The shift runs in int32, where -32768 rounds without wrapping; its result stays within
 * [-32768, 32767] (|x| <= 2**15 and s >= 1, or s = 0), so hi lies in [-128, 127]. */
static void split_halves_padded(const int16_t *x, int64_t sn, int64_t sc, int64_t sh, int64_t sw, int64_t n,
                                int64_t c, int64_t h, int64_t wd, int64_t ph, int64_t pw, int s, int8_t *hi,
                                int8_t *lo) {
    const int64_t hp = h + 2 * ph, row = (wd + 2 * pw) * c;
#define HALVES_OF(dst_hi, dst_lo, r)                  \
    do {                                              \
        const int32_t r_ = (r);                       \
        (dst_hi) = (int8_t)(r_ >> 8);                 \
        (dst_lo) = (int8_t)((uint8_t)r_ ^ 0x80);      \
    } while (0)
#define SPLIT_INTO(dst_hi, dst_lo, v) HALVES_OF(dst_hi, dst_lo, NEAREST(int32_t, 32, (int32_t)(v), s))
    for (int64_t sample = 0; sample < n; sample++) {
        int8_t *hs = hi + sample * hp * row, *ls = lo + sample * hp * row;
        for (int64_t y = 0; y < hp; y++) {
            if (y >= ph && y < ph + h) {  /* the left and right padding of an input row */
                memset(hs + y * row, 0, pw * c);
                memset(ls + y * row, 0x80, pw * c);
                memset(hs + y * row + (pw + wd) * c, 0, pw * c);
                memset(ls + y * row + (pw + wd) * c, 0x80, pw * c);
            } else {
                memset(hs + y * row, 0, row);
                memset(ls + y * row, 0x80, row);
            }
        }
        for (int64_t y = 0; y < h; y++) {
            const int16_t *src = x + sample * sn + y * sh;
            int8_t *hr = hs + (y + ph) * row + pw * c, *lr = ls + (y + ph) * row + pw * c;
            if (sc < sw) {  /* channels last already: both sides contiguous along channels */
                for (int64_t col = 0; col < wd; col++)
                    for (int64_t ci = 0; ci < c; ci++)
                        SPLIT_INTO(hr[col * c + ci], lr[col * c + ci], src[col * sw + ci * sc]);
            } else {  /* NCHW: blocks of 8 channels x 8 columns, each split then transposed */
                const int64_t c8 = c - c % 8, w8 = sw == 1 ? wd - wd % 8 : 0;  /* unit stride: loads in vectors */
                for (int64_t c0 = 0; c0 < c8; c0 += 8)
                    for (int64_t x0 = 0; x0 < w8; x0 += 8) {
                        uint8_t bh[8][8], bl[8][8];
                        /* s == 0 apart: NEAREST's test of s inside this unrolled block kept it out
                         * of vectors (a call on 8 x 128 x 32 x 32 took 2.6 ms instead of 1.0) */
                        if (s == 0)
                            for (int ci = 0; ci < 8; ci++)
                                for (int col = 0; col < 8; col++)
                                    HALVES_OF(bh[ci][col], bl[ci][col], (int32_t)src[(c0 + ci) * sc + x0 + col]);
                        else
                            for (int ci = 0; ci < 8; ci++)
                                for (int col = 0; col < 8; col++) {
                                    const int32_t v = src[(c0 + ci) * sc + x0 + col];
                                    HALVES_OF(bh[ci][col], bl[ci][col], NEAREST_SHIFTED(int32_t, 32, v, s));
                                }
                        transpose_8x8(&bh[0][0], (uint8_t *)hr + x0 * c + c0, c);
                        transpose_8x8(&bl[0][0], (uint8_t *)lr + x0 * c + c0, c);
                    }
                for (int64_t ci = 0; ci < c; ci++)  /* what the blocks left: the last columns and channels */
                    for (int64_t col = ci < c8 ? w8 : 0; col < wd; col++)
                        SPLIT_INTO(hr[col * c + ci], lr[col * c + ci], src[ci * sc + col * sw]);
            }
        }
    }
#undef SPLIT_INTO
#undef HALVES_OF
}

/* Threads take ranges of samples. */
void intrain_split_halves_padded(const int16_t *x, int64_t sn, int64_t sc, int64_t sh, int64_t sw, int64_t n,
                                 int64_t c, int64_t h, int64_t wd, int64_t ph, int64_t pw, int s, int8_t *hi,
                                 int8_t *lo, int threads) {
    const int64_t per_sample = (h + 2 * ph) * (wd + 2 * pw) * c;
    IN_RANGES(n, threads, first, last)
        split_halves_padded(x + first * sn, sn, sc, sh, sw, last - first, c, h, wd, ph, pw, s, hi + first * per_sample,
                            lo + first * per_sample);
}

/* im2col of a padded channels-last int8 tensor [n, hp, wp, C] into rows of (kh, kw, C) runs,
 * out [n, ho, wo, kh, kw, C]: the kw taps of a kernel row are kw * C contiguous bytes of the
 * input whatever the stride, so each is one copy. */
static void channels_last_columns(const int8_t *padded, int64_t n, int64_t hp, int64_t wp, int64_t c, int64_t kh,
                                  int64_t kw, int64_t sh, int64_t sw, int64_t ho, int64_t wo, int8_t *out) {
    const int64_t run = kw * c;
    for (int64_t sample = 0; sample < n; sample++)
        for (int64_t a = 0; a < ho; a++)
            for (int64_t b = 0; b < wo; b++)
                for (int64_t i = 0; i < kh; i++, out += run)
                    memcpy(out, padded + ((sample * hp + a * sh + i) * wp + b * sw) * c, run);
}

/* Threads take ranges of samples. */
void intrain_channels_last_columns(const int8_t *padded, int64_t n, int64_t hp, int64_t wp, int64_t c, int64_t kh,
                                   int64_t kw, int64_t sh, int64_t sw, int64_t ho, int64_t wo, int8_t *out,
                                   int threads) {
    IN_RANGES(n, threads, lo, hi)
        channels_last_columns(padded + lo * hp * wp * c, hi - lo, hp, wp, c, kh, kw, sh, sw, ho, wo,
                              out + lo * ho * wo * kh * kw * c);
}

/* The errors of a block of output channels of a chunk of samples for a weight gradient,
 * d [n, width, hw] (element strides sn, so; the hw positions contiguous), shifted right by s with
 * nearest rounding and split into halves as above, written as rows of n hw values in (sample,
 * position) order: channel o's high halves at hi + o n hw, its low halves at lo + o n hw; sums[o]
 * (int64) gets the sum of channel o's shifted values added (|sum| <= n hw 2**15). */
static void split_error_rows(const int16_t *d, int64_t sn, int64_t so, int64_t n, int64_t width, int64_t hw,
                             int s, int8_t *hi, int8_t *lo, int64_t *sums) {
    const int64_t ld = n * hw;
    for (int64_t o = 0; o < width; o++) {
        int8_t *hr = hi + o * ld, *lr = lo + o * ld;
        int64_t total = 0;
        for (int64_t sample = 0; sample < n; sample++) {
            const int16_t *src = d + sample * sn + o * so;
            int32_t part = 0;  /* hw <= 65,535 values (the caller's bound) of magnitude <= 2**15 */
            for (int64_t t = 0; t < hw; t++) {
                const int32_t v = src[t], r = NEAREST(int32_t, 32, v, s);
                hr[sample * hw + t] = (int8_t)(r >> 8);
                lr[sample * hw + t] = (int8_t)((uint8_t)r ^ 0x80);
                part += r;
            }
            total += part;
        }
        sums[o] += total;
    }
}

/* Threads take ranges of channels. */
void intrain_split_error_rows(const int16_t *d, int64_t sn, int64_t so, int64_t n, int64_t width, int64_t hw,
                              int s, int8_t *hi, int8_t *lo, int64_t *sums, int threads) {
    const int64_t ld = n * hw;
    IN_RANGES(width, threads, first, last)
        split_error_rows(d + first * so, sn, so, n, last - first, hw, s, hi + first * ld, lo + first * ld,
                         sums + first);
}

/* ------------------------------------- DFP16's wide (int32) masters and momentum (numeric/wide.py) */

/* v * 2**s for s >= 0 (s <= 30: below 2**61), else v / 2**min(-s, 62) rounded to nearest. */
static inline int64_t wide_align(int32_t v, int s) {
    if (s >= 0) return (int64_t)v * ((int64_t)1 << s);
    const int r = -s > 62 ? 62 : -s;
    return NEAREST(int64_t, 64, (int64_t)v, r);
}

/* max |align(a, sa) + align(b, sb)|: the first pass of wide.add (no int64 temporaries). */
static int64_t wide_add_max(const int32_t *a, int sa, const int32_t *b, int sb, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t t = wide_align(a[i], sa) + wide_align(b[i], sb);
        t = t < 0 ? -t : t;
        best = t > best ? t : best;
    }
    return best;
}

/* The sums again, rounded to nearest by `shift` and clipped to +-(2**31 - 1). */
static void wide_add_round(const int32_t *a, int sa, const int32_t *b, int sb, int shift, int32_t *out,
                           int64_t n) {
    const int64_t lim = 2147483647;
    for (int64_t i = 0; i < n; i++) {
        const int64_t t = wide_align(a[i], sa) + wide_align(b[i], sb);
        const int64_t r = NEAREST(int64_t, 64, t, shift);
        out[i] = (int32_t)CLAMP(r, lim);
    }
}

/* v * f rounded to nearest by `shift` and clipped: wide.scale (the caller takes the shift from
 * max |v| * |f|, which is max |v * f|). */
static void wide_scale_round(const int32_t *v, int64_t f, int shift, int32_t *out, int64_t n) {
    const int64_t lim = 2147483647;
    for (int64_t i = 0; i < n; i++) {
        const int64_t t = (int64_t)v[i] * f;
        const int64_t r = NEAREST(int64_t, 64, t, shift);
        out[i] = (int32_t)CLAMP(r, lim);
    }
}

int64_t intrain_wide_add_max(const int32_t *a, int sa, const int32_t *b, int sb, int64_t n, int threads) {
    int64_t best = 0;
    IN_RANGES(n, threads, lo, hi, reduction(max: best)) {
        const int64_t m = wide_add_max(a + lo, sa, b + lo, sb, hi - lo);
        best = m > best ? m : best;
    }
    return best;
}

void intrain_wide_add_round(const int32_t *a, int sa, const int32_t *b, int sb, int shift, int32_t *out,
                            int64_t n, int threads) {
    IN_RANGES(n, threads, lo, hi) wide_add_round(a + lo, sa, b + lo, sb, shift, out + lo, hi - lo);
}

void intrain_wide_scale_round(const int32_t *v, int64_t f, int shift, int32_t *out, int64_t n, int threads) {
    IN_RANGES(n, threads, lo, hi) wide_scale_round(v + lo, f, shift, out + lo, hi - lo);
}

/* ---------------------------- the integer AdamW's quotient (methods/adamw_fixed.py) */

/* v * f / 2**31 rounded to nearest for 0 <= v <= 2**62, 0 <= f < 2**31, in two exact halves
 * (methods/adamw_fixed.py's _scale64): below 2**62. */
static inline int64_t scale64(int64_t v, int64_t f) {
    return (v >> 31) * f + (((v & 0x7fffffff) * f + ((int64_t)1 << 30)) >> 31);
}

static inline int64_t round_right(int64_t v, int s) {  /* v >= 0, 0 <= s < 63 */
    return s > 0 ? (v + ((int64_t)1 << (s - 1))) >> s : v;
}

/* Per element: b2 V + (1 - b2) g**2 before normalisation: each term scaled (scale64), the finer
 * one shifted right by its s (at most one of the shifts is nonzero; a shift of 63 or more leaves
 * 0), summed (below 2**63). Returns the largest sum. */
static int64_t adamw_second_moment(const int64_t *second, const int32_t *grad, int64_t keep, int64_t take,
                                   int s_kept, int s_taken, int64_t *out, int64_t n) {
    int64_t largest = 0;
    for (int64_t k = 0; k < n; k++) {
        int64_t g = grad[k];
        int64_t kept = s_kept < 63 ? round_right(scale64(second[k], keep), s_kept) : 0;
        int64_t taken = s_taken < 63 ? round_right(scale64(g * g, take), s_taken) : 0;
        int64_t v = kept + taken;
        out[k] = v;
        if (v > largest) largest = v;
    }
    return largest;
}

int64_t intrain_adamw_second_moment(const int64_t *second, const int32_t *grad, int64_t keep, int64_t take,
                                    int s_kept, int s_taken, int64_t *out, int64_t n, int threads) {
    int64_t largest = 0;
    IN_RANGES(n, threads, lo, hi, reduction(max : largest)) {
        int64_t part = adamw_second_moment(second + lo, grad + lo, keep, take, s_kept, s_taken, out + lo, hi - lo);
        if (part > largest) largest = part;
    }
    return largest;
}

/* floor(sqrt(n)) for 0 <= n < 2**63: Newton's iteration from 2**ceil(b/2) (b the bit length),
 * as numeric/rounding.py's isqrt; every start above the root ends at the same floor. */
static inline int64_t isqrt_floor(int64_t n) {
    if (n < 2) return n;
    int b = 64 - __builtin_clzll((uint64_t)n);
    int64_t x = (int64_t)1 << ((b + 1) >> 1);
    for (;;) {
        int64_t y = (x + n / x) >> 1;
        if (y >= x) return x;
        x = y;
    }
}

/* Per element: R = round(sqrt(V)) (V <= 2**62, so R <= 2**31), D = max(round(R * root / 2**s) +
 * eps, 1) (R * root < 2**62, 0 <= s < 63, D <= 2**31 + eps, eps < 2**32), Q = round(M * 2**30 / D),
 * ties away from zero (|M| < 2**31: 2 |M| 2**30 + D < 2**63). */
static void adamw_quotient(const int64_t *second, const int32_t *first, int64_t root, int s, int64_t eps,
                           int64_t *out, int64_t n) {
    for (int64_t k = 0; k < n; k++) {
        int64_t v = second[k], r = isqrt_floor(v);
        r += (v - r * r > r);
        int64_t scaled = r * root;
        int64_t d = (s > 0 ? (scaled + ((int64_t)1 << (s - 1))) >> s : scaled) + eps;
        if (d < 1) d = 1;
        int64_t m = (int64_t)first[k] << 30, a = m < 0 ? -m : m;
        int64_t q = (2 * a + d) / (2 * d);
        out[k] = m < 0 ? -q : q;
    }
}

void intrain_adamw_quotient(const int64_t *second, const int32_t *first, int64_t root, int s, int64_t eps,
                            int64_t *out, int64_t n, int threads) {
    IN_RANGES(n, threads, lo, hi) adamw_quotient(second + lo, first + lo, root, s, eps, out + lo, hi - lo);
}

/* ------------------------------------------------ one step of the integer LSTM (layers/recurrent.py) */

/* IntLSTM.forward's elementwise work of one step, for n rows of `hidden` units (gates i, f, g, o
 * side by side in rows of 4 * hidden): z = u + q11(rec) (+ the forget offset on f), clipped to
 * +-32767; the gate values from the Q14 tables (sigmoid for i, f, o; tanh for g) into `gates`;
 * c' = nearest(f c + nearest(i g, 3), 14) clipped to +-32767; tanh(c') from the table; h' =
 * nearest(o tanh(c'), 21) clipped to +-127. q11(v) is to_fixed: for shift >= 0 v clipped to +-2**16
 * and multiplied by 2**shift (a shift past 40 pushes every non-zero value past the clip as 40
 * does), else nearest(v, -shift) (past 63 every |v| < 2**62 rounds to 0, as it does at 63),
 * clipped to +-32767.
 * Ranges: |u| <= 32767 (to_fixed's output); |rec| < 2**62; the table entries |.| <= 2**14, so
 * f c < 2**29, i g < 2**28, o tanh(c') < 2**28, all in int64. */
static inline int64_t lstm_q11(int64_t v, int shift) {
    int64_t out;
    if (shift >= 0) {
        v = CLAMP(v, (int64_t)65536);
        out = v * ((int64_t)1 << (shift > 40 ? 40 : shift));
    } else {
        int s = -shift > 63 ? 63 : -shift;
        out = NEAREST_SHIFTED(int64_t, 64, v, s);
    }
    return CLAMP(out, (int64_t)32767);
}

#define LSTM_STEP_FORWARD(RN, RT)                                                                           \
    static void lstm_step_forward_##RN(const int64_t *u, int64_t u_row, const RT *rec, int rec_shift,          \
                                       int64_t forget_offset, const int64_t *c, const int16_t *sigmoid,        \
                                       const int16_t *tanh_table, int16_t *gates, int16_t *tanh_c,             \
                                       int64_t *c_next, int8_t *h_next, int64_t rows, int64_t hidden) {        \
        const int16_t *sig = sigmoid + 32767, *th = tanh_table + 32767; /* indexed by the Q11 value */        \
        for (int64_t r = 0; r < rows; r++) {                                                                \
            const int64_t *ur = u + r * u_row;                                                              \
            const RT *rr = rec + r * 4 * hidden;                                                            \
            int16_t *gr = gates + r * 4 * hidden;                                                           \
            for (int64_t k = 0; k < 4 * hidden; k++) {                                                      \
                int64_t z = ur[k] + lstm_q11((int64_t)rr[k], rec_shift);                                    \
                if (k >= hidden && k < 2 * hidden) z += forget_offset;                                      \
                z = CLAMP(z, (int64_t)32767);                                                               \
                gr[k] = (k >= 2 * hidden && k < 3 * hidden) ? th[z] : sig[z];                               \
            }                                                                                               \
            for (int64_t j = 0; j < hidden; j++) {                                                          \
                int64_t i = gr[j], f = gr[hidden + j], g = gr[2 * hidden + j], o = gr[3 * hidden + j];      \
                int64_t ig = NEAREST_SHIFTED(int64_t, 64, i * g, 3);                                        \
                int64_t cell = NEAREST_SHIFTED(int64_t, 64, f * c[r * hidden + j] + ig, 14);                \
                cell = CLAMP(cell, (int64_t)32767);                                                         \
                int64_t t = th[cell];                                                                       \
                int64_t h = NEAREST_SHIFTED(int64_t, 64, o * t, 21);                                        \
                c_next[r * hidden + j] = cell;                                                              \
                tanh_c[r * hidden + j] = (int16_t)t;                                                        \
                h_next[r * hidden + j] = (int8_t)CLAMP(h, (int64_t)127);                                    \
            }                                                                                               \
        }                                                                                                   \
    }                                                                                                       \
    void intrain_lstm_step_forward_##RN(const int64_t *u, int64_t u_row, const RT *rec, int rec_shift,         \
                                        int64_t forget_offset, const int64_t *c, const int16_t *sigmoid,       \
                                        const int16_t *tanh_table, int16_t *gates, int16_t *tanh_c,            \
                                        int64_t *c_next, int8_t *h_next, int64_t rows, int64_t hidden,         \
                                        int threads) {                                                         \
        IN_RANGES(rows, threads, lo, hi)                                                                    \
            lstm_step_forward_##RN(u + lo * u_row, u_row, rec + lo * 4 * hidden, rec_shift, forget_offset,   \
                                   c + lo * hidden, sigmoid, tanh_table, gates + lo * 4 * hidden,            \
                                   tanh_c + lo * hidden, c_next + lo * hidden, h_next + lo * hidden, hi - lo,  \
                                   hidden);                                                                 \
    }
LSTM_STEP_FORWARD(i32, int32_t)
LSTM_STEP_FORWARD(i64, int64_t)

/* IntLSTM.backward's elementwise work of one step back (layers/recurrent.py), for n = rows * hidden
 * units: every requantisation is requantize's (numeric/requant.py: the shift is the bit length of
 * the largest magnitude above bits - 1, nearest rounding, the clip), every sum add_aligned's.
 *   1. from_h = requant16(dh o (2**28 - tanh(c)**2)),  exponent e_dh - 42
 *   2. dc = add_aligned16(from_h, dc_next)
 *   3. the gate errors dz_i = dc g i(2**14 - i), dz_f = dc c_prev f(2**14 - f) (exponent e_dc - 39),
 *      dz_g = dc i (2**28 - g**2), dz_o = dh tanh(c) o(2**14 - o), each requant16, then _align:
 *      each brought to the largest of the four exponents (nearest, a gap capped at 40) and the four
 *      requant8 together into dz [rows, 4 hidden] (i, f, g, o side by side)
 *   4. dc_prev = requant16(dc f), exponent e_dc - 14.
 * exps[0], exps[1] get the exponents of dz and dc_prev. Ranges: |dh|, |dc| <= 2**15, gate values
 * and tanh(c) |.| <= 2**14, |c_prev| <= 2**15: the products are below 2**57, an aligned sum
 * (a gap of at most 45 bits, ADD_MAX_GAP) below 2**61. The gate values are read with row stride
 * gate_row (views of the forward kernel's [rows, 4 hidden] gates, or [rows, hidden] tensors).
 * Returns 0, or 1 when the scratch memory could not be had. */
static inline int bit_length64(int64_t largest) { return largest ? 64 - __builtin_clzll((uint64_t)largest) : 0; }

static inline int requant_shift(int64_t largest, int bits) {
    int b = bit_length64(largest);
    return b > bits - 1 ? b - (bits - 1) : 0;
}

static inline int64_t round_clip(int64_t v, int s, int64_t limit) {
    int64_t r = NEAREST(int64_t, 64, v, s);
    return CLAMP(r, limit);
}

static inline int64_t abs64(int64_t v) { return v < 0 ? -v : v; }

int intrain_lstm_step_backward(const int16_t *dh, int64_t dh_e, const int16_t *dc_next, int64_t dc_next_e,
                               const int16_t *gi, const int16_t *gf, const int16_t *gg, const int16_t *go,
                               int64_t gate_row, const int16_t *tanh_c, const int16_t *c_prev, int64_t rows,
                               int64_t hidden, int8_t *dz, int16_t *dc_prev, int64_t *exps) {
    const int64_t n = rows * hidden, one = (int64_t)1 << 14, one2 = (int64_t)1 << 28;
    int64_t *scratch = malloc(sizeof(int64_t) * 5 * (size_t)(n ? n : 1));
    if (!scratch) return 1;
    int64_t *wide = scratch, *parts = scratch + n; /* parts: the four gate errors, n each */
    int16_t *dc = (int16_t *)dc_prev;                   /* step 2's dc, overwritten by step 4 in place */
#define AT(p, k) ((p)[((k) / hidden) * gate_row + (k) % hidden])
    /* 1. from_h */
    int64_t largest = 0;
    for (int64_t k = 0; k < n; k++) {
        int64_t t = tanh_c[k];
        wide[k] = (int64_t)dh[k] * AT(go, k) * (one2 - t * t);
        int64_t a = abs64(wide[k]);
        largest = a > largest ? a : largest;
    }
    int s = requant_shift(largest, 16);
    int64_t fh_e = dh_e - 42 + s, fh_nonzero = 0, dc_nonzero = 0;
    for (int64_t k = 0; k < n; k++) {
        wide[k] = round_clip(wide[k], s, 32767);
        fh_nonzero |= wide[k];
        dc_nonzero |= dc_next[k];
    }
    /* 2. dc = from_h + dc_next, aligned exactly and rounded once */
    int64_t ea = fh_nonzero ? fh_e : dc_next_e;
    int64_t eb = dc_nonzero ? dc_next_e : ea;
    int64_t low = ea < eb ? ea : eb, high = ea < eb ? eb : ea;
    int64_t base = low > high - 45 ? low : high - 45;
    int64_t sa = ea - base, sb = eb - base;
    largest = 0;
    for (int64_t k = 0; k < n; k++) {
        int64_t a = wide[k], b = dc_next[k];
        a = sa < 0 ? (a > 0) - (a < 0) : a * ((int64_t)1 << sa);
        b = sb < 0 ? (b > 0) - (b < 0) : b * ((int64_t)1 << sb);
        wide[k] = a + b;
        int64_t m = abs64(wide[k]);
        largest = m > largest ? m : largest;
    }
    s = requant_shift(largest, 16);
    int64_t dc_e = base + s;
    for (int64_t k = 0; k < n; k++) dc[k] = (int16_t)round_clip(wide[k], s, 32767);
    /* 3. the gate errors, each rounded to 16 bits, then the four to 8 bits at one exponent */
    int64_t part_e[4] = {dc_e - 42, dc_e - 11 - 28, dc_e - 42, dh_e - 42};
    int64_t part_largest[4] = {0, 0, 0, 0};
    for (int64_t k = 0; k < n; k++) {
        int64_t d = dc[k], i = AT(gi, k), f = AT(gf, k), g = AT(gg, k), o = AT(go, k);
        int64_t v[4] = {d * g * (i * (one - i)), d * c_prev[k] * (f * (one - f)), d * i * (one2 - g * g),
                        (int64_t)dh[k] * tanh_c[k] * (o * (one - o))};
        for (int q = 0; q < 4; q++) {
            parts[q * n + k] = v[q];
            int64_t m = abs64(v[q]);
            part_largest[q] = m > part_largest[q] ? m : part_largest[q];
        }
    }
    int part_shift[4];
    int64_t top = INT64_MIN;
    for (int q = 0; q < 4; q++) {
        part_shift[q] = requant_shift(part_largest[q], 16);
        part_e[q] += part_shift[q];
        top = part_e[q] > top ? part_e[q] : top;
    }
    largest = 0;
    for (int q = 0; q < 4; q++) {
        int64_t gap = top - part_e[q];
        int to_top = gap > 40 ? 40 : (int)gap;
        for (int64_t k = 0; k < n; k++) {
            int64_t v = round_clip(parts[q * n + k], part_shift[q], 32767);
            v = NEAREST(int64_t, 64, v, to_top);
            parts[q * n + k] = v;
            int64_t m = abs64(v);
            largest = m > largest ? m : largest;
        }
    }
    s = requant_shift(largest, 8);
    exps[0] = top + s;
    for (int q = 0; q < 4; q++)
        for (int64_t k = 0; k < n; k++)
            dz[(k / hidden) * 4 * hidden + q * hidden + k % hidden] = (int8_t)round_clip(parts[q * n + k], s, 127);
    /* 4. dc_prev = dc f */
    largest = 0;
    for (int64_t k = 0; k < n; k++) {
        wide[k] = (int64_t)dc[k] * AT(gf, k);
        int64_t m = abs64(wide[k]);
        largest = m > largest ? m : largest;
    }
    s = requant_shift(largest, 16);
    exps[1] = dc_e - 14 + s;
    for (int64_t k = 0; k < n; k++) dc_prev[k] = (int16_t)round_clip(wide[k], s, 32767);
#undef AT
    free(scratch);
    return 0;
}

/* ---------------------------- direct convolutions of few input channels (kernels/cpu/backend.py) */

/* A stride-1 convolution whose kernel covers few values (C * kh * kw <= 32: a first layer on
 * 1 or 3 image channels) is a poor GEMM: im2col copies every input value kh * kw times to feed
 * a reduction too short to pay for it, and oneDNN's float kernels run such layers at a few
 * GMAC/s. Here each input plane is zero-padded once into an int16 buffer of rows wp = W + 2 pw
 * wide, and every output plane is computed over the flat index t = y * wp + x of that buffer
 * (x < wp, so wp - Wo columns per row are computed and thrown away): for each tap (i, j) the
 * contribution is one long vector loop acc[t] += w[i, j] * pad[t + i * wp + j].
 *
 * Integer ranges: operands are int8, so a product has magnitude at most 2**14 (-128 * -128).
 * Forward: an output is a sum of C * kh * kw <= 32 products (the discarded columns too), at
 * most 2**19 in int32. Weight gradient: the errors are copied into the same flat layout with
 * zeros in the discarded columns, so a sample's sum for one weight has at most Ho * Wo <=
 * 131,071 nonzero products, below 2**31 in magnitude; samples are added in int64. The buffers
 * have kw spare elements after the last row, as far as t + i * wp + j reaches. */

static void pad_planes(const int8_t *x, int16_t *pad, int64_t planes, int64_t h, int64_t wd,
                       int64_t ph, int64_t pw, int64_t wp, int64_t plane) {
    for (int64_t q = 0; q < planes; q++)
        for (int64_t y = 0; y < h; y++) {
            int16_t *row = pad + q * plane + (y + ph) * wp + pw;
            const int8_t *src = x + (q * h + y) * wd;
            for (int64_t c = 0; c < wd; c++) row[c] = src[c];
        }
}

/* The padded-plane geometry both kernels share: rows wp wide, ho output rows, wo output columns,
 * plane elements per padded input plane (with kw spare), span flat output positions per plane. */
typedef struct {
    int64_t wp, ho, wo, plane, span;
} direct_shape;

static direct_shape direct_shape_of(int64_t h, int64_t wd, int64_t kh, int64_t kw, int64_t ph, int64_t pw) {
    direct_shape g;
    g.wp = wd + 2 * pw;
    g.ho = h + 2 * ph - kh + 1;
    g.wo = g.wp - kw + 1;
    g.plane = (h + 2 * ph) * g.wp + kw;
    g.span = g.ho * g.wp;
    return g;
}

/* Zeroed buffers of a and b bytes, or both NULL (nothing left allocated) when either fails. */
static int zeroed_pair(void **first, size_t a, void **second, size_t b) {
    *first = calloc(a, 1);
    *second = calloc(b, 1);
    if (*first != NULL && *second != NULL) return 0;
    free(*first);
    free(*second);
    return -1;
}

/* out[s, o] for samples [0, n): x int8 [n, c, h, wd], w int8 [o, c, kh, kw], out int32
 * [n, o, ho, wo]. Returns 0, or -1 when a buffer could not be allocated (nothing written). */
static int conv_direct_forward(const int8_t *x, const int8_t *w, int32_t *out, int64_t n, int64_t c,
                               int64_t h, int64_t wd, int64_t o, int64_t kh, int64_t kw, int64_t ph,
                               int64_t pw) {
    const direct_shape g = direct_shape_of(h, wd, kh, kw, ph, pw);
    const int64_t wp = g.wp, ho = g.ho, wo = g.wo, plane = g.plane, span = g.span;
    int16_t *pad;
    int32_t *acc;
    if (zeroed_pair((void **)&pad, c * plane * sizeof(int16_t), (void **)&acc, span * sizeof(int32_t)))
        return -1;
    for (int64_t s = 0; s < n; s++) {
        pad_planes(x + s * c * h * wd, pad, c, h, wd, ph, pw, wp, plane);
        for (int64_t oc = 0; oc < o; oc++) {
            memset(acc, 0, span * sizeof(int32_t));
            for (int64_t ci = 0; ci < c; ci++)
                for (int64_t i = 0; i < kh; i++)
                    for (int64_t j = 0; j < kw; j++) {
                        const int32_t weight = w[((oc * c + ci) * kh + i) * kw + j];
                        const int16_t *src = pad + ci * plane + i * wp + j;
                        for (int64_t t = 0; t < span; t++) acc[t] += weight * src[t];
                    }
            int32_t *dst = out + (s * o + oc) * ho * wo;
            for (int64_t y = 0; y < ho; y++) memcpy(dst + y * wo, acc + y * wp, wo * sizeof(int32_t));
        }
    }
    free(pad);
    free(acc);
    return 0;
}

/* dw[o, c, i, j] = sum over samples [0, n) and positions of d[s, o, y, x] * xpad[s, c, y + i, x + j]
 * (d int8 [n, o, ho, wo], x int8 [n, c, h, wd]), into int64 dw [o, c, kh, kw] (overwritten).
 * Returns 0, or -1 when a buffer could not be allocated (dw untouched). */
static int conv_direct_weight_grad(const int8_t *d, const int8_t *x, int64_t *dw, int64_t n, int64_t c,
                                   int64_t h, int64_t wd, int64_t o, int64_t kh, int64_t kw, int64_t ph,
                                   int64_t pw) {
    const direct_shape g = direct_shape_of(h, wd, kh, kw, ph, pw);
    const int64_t wp = g.wp, ho = g.ho, wo = g.wo, plane = g.plane, span = g.span;
    int16_t *pad, *errors;
    if (zeroed_pair((void **)&pad, c * plane * sizeof(int16_t), (void **)&errors, o * span * sizeof(int16_t)))
        return -1;
    memset(dw, 0, o * c * kh * kw * sizeof(int64_t));
    for (int64_t s = 0; s < n; s++) {
        pad_planes(x + s * c * h * wd, pad, c, h, wd, ph, pw, wp, plane);
        for (int64_t oc = 0; oc < o; oc++)
            for (int64_t y = 0; y < ho; y++) {
                int16_t *row = errors + oc * span + y * wp;
                const int8_t *src = d + ((s * o + oc) * ho + y) * wo;
                for (int64_t col = 0; col < wo; col++) row[col] = src[col];
            }
        for (int64_t oc = 0; oc < o; oc++)
            for (int64_t ci = 0; ci < c; ci++)
                for (int64_t i = 0; i < kh; i++)
                    for (int64_t j = 0; j < kw; j++) {
                        const int16_t *src = pad + ci * plane + i * wp + j, *err = errors + oc * span;
                        int32_t total = 0;
                        for (int64_t t = 0; t < span; t++) total += err[t] * src[t];
                        dw[((oc * c + ci) * kh + i) * kw + j] += total;
                    }
    }
    free(pad);
    free(errors);
    return 0;
}

/* Threads take ranges of samples; each range has its own buffers (nothing is written when one
 * could not be allocated, -1 returned: the caller raises, so partial outputs are never used). */
int intrain_conv_direct_forward(const int8_t *x, const int8_t *w, int32_t *out, int64_t n, int64_t c,
                                int64_t h, int64_t wd, int64_t o, int64_t kh, int64_t kw, int64_t ph,
                                int64_t pw, int threads) {
    const direct_shape g = direct_shape_of(h, wd, kh, kw, ph, pw);
    int failed = 0;
    IN_RANGES(n, threads, lo, hi, reduction(|: failed))
        failed |= conv_direct_forward(x + lo * c * h * wd, w, out + lo * o * g.ho * g.wo, hi - lo, c, h, wd, o, kh,
                                      kw, ph, pw);
    return failed ? -1 : 0;
}

/* Threads take ranges of samples into int64 sums of their own, added into dw in range order
 * (integer sums: the same for any cut). */
int intrain_conv_direct_weight_grad(const int8_t *d, const int8_t *x, int64_t *dw, int64_t n, int64_t c,
                                    int64_t h, int64_t wd, int64_t o, int64_t kh, int64_t kw, int64_t ph,
                                    int64_t pw, int threads) {
    const direct_shape g = direct_shape_of(h, wd, kh, kw, ph, pw);
    const int64_t size = o * c * kh * kw;
    if (threads == 1) return conv_direct_weight_grad(d, x, dw, n, c, h, wd, o, kh, kw, ph, pw);
    int64_t *parts = calloc((size_t)threads * size, sizeof(int64_t));  /* ranges left empty add 0 */
    if (parts == NULL) return -1;
    int failed = 0;
    IN_RANGES(n, threads, lo, hi, reduction(|: failed))
        failed |= conv_direct_weight_grad(d + lo * o * g.ho * g.wo, x + lo * c * h * wd, parts + range_index * size, hi - lo,
                                          c, h, wd, o, kh, kw, ph, pw);
    if (!failed) {
        memset(dw, 0, size * sizeof(int64_t));
        for (int part = 0; part < threads; part++)
            for (int64_t k = 0; k < size; k++) dw[k] += parts[part * size + k];
    }
    free(parts);
    return failed ? -1 : 0;
}
