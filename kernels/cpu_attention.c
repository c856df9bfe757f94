/* Paged causal attention on the CPU, reading K and V in place from the page pool.
 *
 * The op of kernels/attention.py (whose torch reference is the spec): pool row p holds
 * one token's K (kv_heads x head_dim) then its V; position j of sequence i is page
 * page_table[i][j]. New token k of sequence i (n_i new tokens, context c_i) sits at
 * position c_i - n_i + k and attends to positions 0 .. c_i - n_i + k. Query head h
 * reads kv head h / (H / kv_heads) (grouped-query attention); the query heads of one
 * kv head are done together, so each K and V row is read once per token.
 *
 * Softmax and accumulation are in float32 for every storage type. Sequences run in
 * parallel (OpenMP) when asked for more than one thread.
 */
#include <math.h>
#include <stdlib.h>

#include "cpu_types.h"

/* exp(x) for x <= 0, vectorisable (libm's expf is a call per element): x = n ln2 + r with
 * |r| <= ln2 / 2, exp(r) by its Taylor series to r^7 (error below 6e-9, under float32's
 * rounding), times 2^n built in the exponent bits. Below -87, exp underflows to 0. */
static inline float exp_nonpositive(float x) {
    const float ln2_hi = 0.693145751953125f, ln2_lo = 1.428606765330187e-06f;
    const int zero = x < -87.0f;
    x = zero ? 0.0f : x;
    const float n = floorf(x * 1.4426950408889634f + 0.5f);
    const float r = (x - n * ln2_hi) - n * ln2_lo;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { int32_t i; float f; } two_n = {.i = ((int32_t)n + 127) << 23};
    return zero ? 0.0f : p * two_n.f;
}

/* Pages are scattered, so the hardware prefetcher cannot guess the next key: ask for the
 * row AHEAD positions on while this one is used. */
#define AHEAD 4
static inline void prefetch_row(const void *p, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch((const char *)p + b, 0, 1);
}

#define DEFINE_ATTENTION(T, SUFFIX)                                                                             \
void paged_attention_##SUFFIX(                                                                                  \
    const T *q, int64_t q_stride_t, T *out, int64_t out_stride_t,                                               \
    const T *pool, int64_t row_dim, const int64_t *page_table, int64_t max_context,                             \
    const int64_t *query_start, const int64_t *context_lens, int64_t num_seqs,                                  \
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale, int64_t threads)                    \
{                                                                                                               \
    const int64_t ratio = num_heads / num_kv_heads, kv_size = num_kv_heads * head_dim;                          \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(threads) if(threads > 1 && num_seqs > 1)")       \
    for (int64_t i = 0; i < num_seqs; i++) {                                                                    \
        const int64_t first = query_start[i], n = query_start[i + 1] - first, c = context_lens[i];              \
        const int64_t *pages = page_table + i * max_context;                                                    \
        float *w = malloc(sizeof(float) * ratio * c), *qf = malloc(sizeof(float) * ratio * head_dim);           \
        float *acc = malloc(sizeof(float) * ratio * head_dim);                                                  \
        for (int64_t k = 0; k < n; k++) {                                                                       \
            const int64_t t = first + k, last = c - n + k; /* sees positions 0 .. last */                       \
            for (int64_t hk = 0; hk < num_kv_heads; hk++) {                                                     \
                for (int64_t g = 0; g < ratio; g++)                                                             \
                    for (int64_t d = 0; d < head_dim; d++)                                                      \
                        qf[g * head_dim + d] = load_##SUFFIX(q + t * q_stride_t + (hk * ratio + g) * head_dim + d) * scale; \
                for (int64_t p = 0; p <= last; p++) {                                                           \
                    if (p + AHEAD <= last) prefetch_row(pool + pages[p + AHEAD] * row_dim + hk * head_dim, head_dim * (int64_t)sizeof(T)); \
                    const T *key = pool + pages[p] * row_dim + hk * head_dim;                                   \
                    for (int64_t g = 0; g < ratio; g++) {                                                       \
                        const float *qg = qf + g * head_dim;                                                    \
                        float sum = 0.0f;                                                                       \
                        _Pragma("omp simd reduction(+:sum)")                                                    \
                        for (int64_t d = 0; d < head_dim; d++) sum += qg[d] * load_##SUFFIX(key + d);      \
                        w[g * c + p] = sum;                                                                     \
                    }                                                                                           \
                }                                                                                               \
                for (int64_t g = 0; g < ratio; g++) {                                                           \
                    float *wg = w + g * c, top = -INFINITY, total = 0.0f;                                       \
                    for (int64_t p = 0; p <= last; p++) top = wg[p] > top ? wg[p] : top;                        \
                    _Pragma("omp simd reduction(+:total)")                                                      \
                    for (int64_t p = 0; p <= last; p++) {                                                       \
                        wg[p] = exp_nonpositive(wg[p] - top);                                                   \
                        total += wg[p];                                                                         \
                    }                                                                                           \
                    const float inv = 1.0f / total;                                                             \
                    for (int64_t p = 0; p <= last; p++) wg[p] *= inv;                                           \
                }                                                                                               \
                for (int64_t e = 0; e < ratio * head_dim; e++) acc[e] = 0.0f;                                   \
                for (int64_t p = 0; p <= last; p++) {                                                           \
                    if (p + AHEAD <= last) prefetch_row(pool + pages[p + AHEAD] * row_dim + kv_size + hk * head_dim, head_dim * (int64_t)sizeof(T)); \
                    const T *value = pool + pages[p] * row_dim + kv_size + hk * head_dim;                       \
                    for (int64_t g = 0; g < ratio; g++) {                                                       \
                        const float wp = w[g * c + p];                                                          \
                        float *ag = acc + g * head_dim;                                                         \
                        _Pragma("omp simd")                                                                     \
                        for (int64_t d = 0; d < head_dim; d++) ag[d] += wp * load_##SUFFIX(value + d);     \
                    }                                                                                           \
                }                                                                                               \
                for (int64_t g = 0; g < ratio; g++)                                                             \
                    for (int64_t d = 0; d < head_dim; d++)                                                      \
                        store_##SUFFIX(out + t * out_stride_t + (hk * ratio + g) * head_dim + d, acc[g * head_dim + d]); \
            }                                                                                                   \
        }                                                                                                       \
        free(w);                                                                                                \
        free(qf);                                                                                               \
        free(acc);                                                                                              \
    }                                                                                                           \
}

DEFINE_ATTENTION(float, f32)
DEFINE_ATTENTION(bf16, bf16)
DEFINE_ATTENTION(f16, f16)
