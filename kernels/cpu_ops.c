/* The elementwise ops between the matmuls, on the CPU: residual add + RMSNorm, rotary, SwiGLU.
 *
 * The ops of kernels/ops.py, whose torch references are the spec. Torch runs each of them
 * as a chain of whole-tensor ops (convert, square, mean, rsqrt, multiply, convert back, ...),
 * every one a pass over memory; here a token's row is read once, worked on in registers
 * and L1, and written once (the norm reads its row twice, the second time from L1).
 *
 * Arithmetic is float32 for every storage type. Where the torch code rounds an intermediate
 * to bfloat16 (each torch op on bfloat16 computes in float32 and rounds its output), the
 * kernels round it too, so their bfloat16 results are the reference's bits but for rare
 * last-place steps: the norm sums its squares in another order, and exp may differ from
 * torch's in its last bit. Rows are independent: they run in parallel (OpenMP) when there are
 * enough of them. There are no float16 kernels (kernels/cpu.py keeps float16 on torch).
 */
#include <math.h>

/* gcc's tuning for recent Xeons keeps auto-vectorised loops at 256 bits; these loops are what
 * the kernels are, so let them use the full registers where the CPU has 512-bit ones. */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("prefer-vector-width=512")
#endif

#include "cpu_types.h"

/* Below this many elements a call stays on one thread: waking the others costs more. 16384 measured
 * best of 8192/16384/65536 at decode (48 rows of 576: both norms and rotary go parallel, 0.6 ms off a
 * 30 ms step on 2 threads); 16 rows stay on one thread. */
#define PARALLEL_MIN 16384

/* v rounded to the storage type, as a float32 */
static inline float round_f32(float v) { return v; }
static inline float round_bf16(float v) {
    bf16 b;
    store_bf16(&b, v);
    return load_bf16(&b);
}

/* silu(g) = g / (1 + exp(-g)), vectorisable. exp(x), x = -g: x = n ln2 + r with |r| <= ln2 / 2,
 * exp(r) by its Taylor series to r^7 (error below 6e-9, under float32's rounding), times 2^n
 * built in the exponent bits (as 2^(n-1) * 2, so that n = 128 is still a normal float). x is
 * clamped to [-86, 88.8] first, which changes nothing: below, exp(x) < 2^-124 and 1 + exp(x)
 * rounds to 1 either way; above, exp overflows to inf either way (and g / inf = -0, as in torch).
 * The clamps are written as the compares that compile to vminps/vmaxps, and a NaN g comes
 * through the numerator. Keeping this one path (no select after the division) matters: gcc
 * otherwise duplicates the division into each branch of the select. */
static inline float silu_f32(float g) {
    const float ln2_hi = 0.693145751953125f, ln2_lo = 1.428606765330187e-06f;
    float x = -g;
    x = x < 88.8f ? x : 88.8f;
    x = x > -86.0f ? x : -86.0f;
    const float n = rintf(x * 1.4426950408889634f); /* nearest: rintf vectorises, floorf does not */
    const float r = (x - n * ln2_hi) - n * ln2_lo;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { int32_t i; float f; } half_two_n = {.i = ((int32_t)n + 126) << 23};
    return g / (1.0f + p * half_two_n.f * 2.0f);
}

/* round_##SUFFIX(v): v rounded to the storage type, where the torch code rounds. */
#define DEFINE_OPS(T, SUFFIX)                                                                                   \
/* h[t] += delta[t] (unless delta is NULL), then                                                              \
 * out[t] = weight * round(h[t] * rsqrt(mean(h[t]^2) + eps)), the mean over float32 squares of the rounded h. */ \
void add_rms_norm_##SUFFIX(                                                                                     \
    T *h, int64_t h_stride, const T *delta, int64_t delta_stride, const T *weight,                              \
    T *out, int64_t out_stride, int64_t rows, int64_t dim, float eps, int64_t threads)                          \
{                                                                                                               \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(threads > 1 && rows * dim >= PARALLEL_MIN)") \
    for (int64_t t = 0; t < rows; t++) {                                                                        \
        T *ht = h + t * h_stride, *yt = out + t * out_stride;                                                   \
        float squares = 0.0f;                                                                                   \
        if (delta) {                                                                                            \
            const T *dt = delta + t * delta_stride;                                                             \
            _Pragma("omp simd reduction(+:squares)")                                                            \
            for (int64_t c = 0; c < dim; c++) {                                                                 \
                const float v = round_##SUFFIX(load_##SUFFIX(ht + c) + load_##SUFFIX(dt + c));                  \
                store_##SUFFIX(ht + c, v);                                                                      \
                squares += v * v;                                                                               \
            }                                                                                                   \
        } else {                                                                                                \
            _Pragma("omp simd reduction(+:squares)")                                                            \
            for (int64_t c = 0; c < dim; c++) {                                                                 \
                const float v = load_##SUFFIX(ht + c);                                                          \
                squares += v * v;                                                                               \
            }                                                                                                   \
        }                                                                                                       \
        const float scale = 1.0f / sqrtf(squares / (float)dim + eps);                                           \
        _Pragma("omp simd")                                                                                     \
        for (int64_t c = 0; c < dim; c++)                                                                       \
            store_##SUFFIX(yt + c, load_##SUFFIX(weight + c) * round_##SUFFIX(load_##SUFFIX(ht + c) * scale));  \
    }                                                                                                           \
}                                                                                                               \
                                                                                                                \
/* One head, halves layout, in place: x = x * cos + cat(-x2, x1) * sin, each product and the sum rounded. */  \
static inline void rotate_head_##SUFFIX(T *x, const T *cos, const T *sin, int64_t half) {                       \
    _Pragma("omp simd")                                                                                         \
    for (int64_t i = 0; i < half; i++) {                                                                        \
        const float x1 = load_##SUFFIX(x + i), x2 = load_##SUFFIX(x + half + i);                                \
        const float y1 = round_##SUFFIX(x1 * load_##SUFFIX(cos + i)) + round_##SUFFIX(-x2 * load_##SUFFIX(sin + i)); \
        const float y2 = round_##SUFFIX(x2 * load_##SUFFIX(cos + half + i)) + round_##SUFFIX(x1 * load_##SUFFIX(sin + half + i)); \
        store_##SUFFIX(x + i, y1);                                                                              \
        store_##SUFFIX(x + half + i, y2);                                                                       \
    }                                                                                                           \
}                                                                                                               \
                                                                                                                \
/* Rotary embedding of q (rows x q_heads x head_dim) and k (rows x k_heads x head_dim), in place;            \
 * token t uses row t of cos and sin (head_dim each). Heads are contiguous, at any strides. */             \
void rotary_##SUFFIX(                                                                                           \
    T *q, int64_t q_stride_t, int64_t q_stride_h, int64_t q_heads,                                              \
    T *k, int64_t k_stride_t, int64_t k_stride_h, int64_t k_heads,                                              \
    const T *cos, const T *sin, int64_t cs_stride, int64_t rows, int64_t head_dim, int64_t threads)             \
{                                                                                                               \
    const int64_t half = head_dim / 2;                                                                          \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(threads > 1 && rows * (q_heads + k_heads) * head_dim >= PARALLEL_MIN)") \
    for (int64_t t = 0; t < rows; t++) {                                                                        \
        const T *ct = cos + t * cs_stride, *st = sin + t * cs_stride;                                           \
        for (int64_t j = 0; j < q_heads; j++) rotate_head_##SUFFIX(q + t * q_stride_t + j * q_stride_h, ct, st, half); \
        for (int64_t j = 0; j < k_heads; j++) rotate_head_##SUFFIX(k + t * k_stride_t + j * k_stride_h, ct, st, half); \
    }                                                                                                           \
}                                                                                                               \
                                                                                                                \
/* out[t] = round(silu(gate)) * up, where row t of gate_up is gate (inter) then up (inter). */                 \
void silu_mul_##SUFFIX(                                                                                         \
    const T *gate_up, int64_t gate_up_stride, T *out, int64_t out_stride, int64_t rows, int64_t inter,          \
    int64_t threads)                                                                                            \
{                                                                                                               \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(threads > 1 && rows * inter >= PARALLEL_MIN)") \
    for (int64_t t = 0; t < rows; t++) {                                                                        \
        const T *gate = gate_up + t * gate_up_stride, *up = gate + inter;                                       \
        T *yt = out + t * out_stride;                                                                           \
        _Pragma("omp simd")                                                                                     \
        for (int64_t j = 0; j < inter; j++) {                                                                   \
            const float g = load_##SUFFIX(gate + j);                                                            \
            store_##SUFFIX(yt + j, round_##SUFFIX(silu_f32(g)) * load_##SUFFIX(up + j));                        \
        }                                                                                                       \
    }                                                                                                           \
}

DEFINE_OPS(float, f32)

#if LORAFLEET_NATIVE_BF16
/* bfloat16 with the CPU's conversion (AVX512-BF16): vcvtneps2bf16 rounds 16 floats to nearest even
 * in one instruction, where the generic loops spend seven integer operations per rounding, and
 * these ops round up to four times per element. It is torch's rounding except for float32
 * subnormals (below 2^-126), which it flushes to zero. 16 elements per step, the last ones masked. */

static inline __m512 round16_bf16(__m512 v) { return widen16_bf16(narrow16_bf16(v)); }

void add_rms_norm_bf16(
    bf16 *h, int64_t h_stride, const bf16 *delta, int64_t delta_stride, const bf16 *weight,
    bf16 *out, int64_t out_stride, int64_t rows, int64_t dim, float eps, int64_t threads)
{
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(threads > 1 && rows * dim >= PARALLEL_MIN)")
    for (int64_t t = 0; t < rows; t++) {
        bf16 *ht = h + t * h_stride, *yt = out + t * out_stride;
        __m512 squares = _mm512_setzero_ps();
        for (int64_t c = 0; c < dim; c += 16) {
            const __mmask16 m = lanes_mask16(dim - c);
            __m512 v = load16_bf16(ht + c, m);
            if (delta) { /* the residual stream, rounded and written back */
                const __m256i sum = narrow16_bf16(_mm512_add_ps(v, load16_bf16(delta + t * delta_stride + c, m)));
                _mm256_mask_storeu_epi16(ht + c, m, sum);
                v = widen16_bf16(sum);
            }
            squares = _mm512_fmadd_ps(v, v, squares);
        }
        const __m512 scale = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)dim + eps));
        for (int64_t c = 0; c < dim; c += 16) {
            const __mmask16 m = lanes_mask16(dim - c);
            const __m512 normed = round16_bf16(_mm512_mul_ps(load16_bf16(ht + c, m), scale));
            store16_bf16(yt + c, _mm512_mul_ps(load16_bf16(weight + c, m), normed), m);
        }
    }
}

void rotary_bf16(
    bf16 *q, int64_t q_stride_t, int64_t q_stride_h, int64_t q_heads,
    bf16 *k, int64_t k_stride_t, int64_t k_stride_h, int64_t k_heads,
    const bf16 *cos, const bf16 *sin, int64_t cs_stride, int64_t rows, int64_t head_dim, int64_t threads)
{
    const int64_t half = head_dim / 2;
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(threads > 1 && rows * (q_heads + k_heads) * head_dim >= PARALLEL_MIN)")
    for (int64_t t = 0; t < rows; t++) {
        const bf16 *ct = cos + t * cs_stride, *st = sin + t * cs_stride;
        for (int64_t j = 0; j < q_heads + k_heads; j++) {
            bf16 *x = j < q_heads ? q + t * q_stride_t + j * q_stride_h : k + t * k_stride_t + (j - q_heads) * k_stride_h;
            for (int64_t i = 0; i < half; i += 16) { /* x = x * cos + cat(-x2, x1) * sin, rounded as torch rounds */
                const __mmask16 m = lanes_mask16(half - i);
                const __m512 x1 = load16_bf16(x + i, m), x2 = load16_bf16(x + half + i, m);
                const __m512 y1 = _mm512_sub_ps(round16_bf16(_mm512_mul_ps(x1, load16_bf16(ct + i, m))),
                                                round16_bf16(_mm512_mul_ps(x2, load16_bf16(st + i, m))));
                const __m512 y2 = _mm512_add_ps(round16_bf16(_mm512_mul_ps(x2, load16_bf16(ct + half + i, m))),
                                                round16_bf16(_mm512_mul_ps(x1, load16_bf16(st + half + i, m))));
                store16_bf16(x + i, y1, m);
                store16_bf16(x + half + i, y2, m);
            }
        }
    }
}

/* silu_f32 above, 16 lanes at a time (2^n by vscalefps: the same values) */
static inline __m512 silu16(__m512 g) {
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 x = _mm512_sub_ps(_mm512_setzero_ps(), g);
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.8f)), _mm512_set1_ps(-86.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, one);
    p = _mm512_fmadd_ps(p, r, one);
    return _mm512_div_ps(g, _mm512_add_ps(one, _mm512_scalef_ps(p, n)));
}

void silu_mul_bf16(
    const bf16 *gate_up, int64_t gate_up_stride, bf16 *out, int64_t out_stride, int64_t rows, int64_t inter,
    int64_t threads)
{
    _Pragma("omp parallel for schedule(static) num_threads(threads) if(threads > 1 && rows * inter >= PARALLEL_MIN)")
    for (int64_t t = 0; t < rows; t++) {
        const bf16 *gate = gate_up + t * gate_up_stride, *up = gate + inter;
        bf16 *yt = out + t * out_stride;
        for (int64_t j = 0; j < inter; j += 16) {
            const __mmask16 m = lanes_mask16(inter - j);
            const __m512 act = round16_bf16(silu16(load16_bf16(gate + j, m)));
            store16_bf16(yt + j, _mm512_mul_ps(act, load16_bf16(up + j, m)), m);
        }
    }
}
#else
DEFINE_OPS(bf16, bf16)
#endif
