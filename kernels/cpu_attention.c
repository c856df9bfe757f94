/* Paged causal attention on the CPU, reading K and V in place from the page pool.
 *
 * The op of kernels/attention.py (whose torch reference is the spec): pool row p holds
 * one token's K (kv_heads x head_dim) then its V; position j of sequence i is page
 * page_table[table_rows[i]][j] (the worker's table, kept across steps: only the first c_i
 * entries of a sequence's row are read). New token k of sequence i (n_i new tokens,
 * context c_i) sits at position c_i - n_i + k and attends to positions 0 .. c_i - n_i + k.
 * Query head h reads kv head h / (H / kv_heads) (grouped-query attention); the query heads
 * of one kv head are done together, so each K and V row is read once per token.
 *
 * A call computes the sequences seqs[0 .. num_seqs) of the step, so the caller can send the
 * others elsewhere (kernels/cpu.py sends long prefill chunks to matmuls); the rows of `out`
 * of the sequences not listed are left as they are.
 *
 * Softmax and accumulation are in float32 for every storage type. Sequences run in
 * parallel (OpenMP) when asked for more than one thread.
 *
 * Before a sequence reads K or V, its c_i page ids are checked against the pool's num_pages;
 * a sequence that points outside is skipped and the call returns its index + 1 (0 when all
 * are inside). The caller checks the rest (rows, lengths, token ranges, seqs) once per step.
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

/* Whether every one of the count page ids is a row of the pool. */
static inline int pages_inside(const int64_t *pages, int64_t count, int64_t num_pages) {
    int outside = 0;
    for (int64_t p = 0; p < count; p++) outside |= (uint64_t)pages[p] >= (uint64_t)num_pages;
    return !outside;
}

/* Pages are scattered, so the hardware prefetcher cannot guess the next key: ask for the
 * row AHEAD positions on while this one is used. */
#define AHEAD 4
static inline void prefetch_row(const void *p, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch((const char *)p + b, 0, 1);
}

#define DEFINE_ATTENTION(T, SUFFIX)                                                                             \
int64_t paged_attention_##SUFFIX(                                                                               \
    const T *q, int64_t q_stride_t, T *out, int64_t out_stride_t,                                               \
    const T *pool, int64_t row_dim, int64_t num_pages,                                                          \
    const int64_t *page_table, int64_t table_stride, const int64_t *table_rows,                                 \
    const int64_t *query_start, const int64_t *context_lens, const int64_t *seqs, int64_t num_seqs,             \
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale, int64_t threads)                    \
{                                                                                                               \
    const int64_t ratio = num_heads / num_kv_heads, kv_size = num_kv_heads * head_dim;                          \
    int64_t outside = 0;                                                                                        \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(threads) if(threads > 1 && num_seqs > 1)")       \
    for (int64_t s = 0; s < num_seqs; s++) {                                                                    \
        const int64_t i = seqs[s];                                                                              \
        const int64_t first = query_start[i], n = query_start[i + 1] - first, c = context_lens[i];              \
        const int64_t *pages = page_table + table_rows[i] * table_stride;                                       \
        if (!pages_inside(pages, c, num_pages)) {                                                               \
            _Pragma("omp atomic write")                                                                         \
            outside = i + 1;                                                                                    \
            continue;                                                                                           \
        }                                                                                                       \
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
    return outside;                                                                                             \
}

DEFINE_ATTENTION(float, f32)
DEFINE_ATTENTION(f16, f16)

#if LORAFLEET_NATIVE_BF16
/* the generic loop, for heads wider than the native kernel's 256 */
#define load_bf16_generic load_bf16
#define store_bf16_generic store_bf16
DEFINE_ATTENTION(bf16, bf16_generic)

/* bfloat16 with native dot products (AVX512-BF16). The scores q.k are where the generic loop
 * spends its time: one horizontal sum of 16 lanes per (position, head). Here the query (bf16,
 * unscaled, read in place) meets 16 keys at a time: each key's q.k is a vector of 16 partial
 * sums from vdpbf16ps (exact bf16 products, float32 sums), and one transpose-and-add tree
 * turns the 16 vectors into the 16 scores, about three instructions per score instead of ten.
 * The scale is applied to the float32 scores; softmax and P.V are as in the generic loop. */

/* lane j of the result = the sum of v[j]'s 16 lanes */
static inline __m512 sum16(const __m512 v[16]) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++) /* 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3] of x = v[2i], y = v[2i+1] */
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* 128-bit lane: the lane's sums of v[4i .. 4i+3] */
        b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1]))),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1]))));
    for (int i = 0; i < 2; i++) /* 128-bit lanes: b[2i] over lanes 0+1 and 2+3, then b[2i+1] the same */
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* out = sum_p w[p] V_p for one query head, 16 dims per register; with d16 a constant (4: head_dim
 * 64, 8: 128) the accumulators stay in registers. V_p = v0 + pages[p] * row_dim. */
static inline __attribute__((always_inline)) void pv_bf16(const float *w, int64_t last, const int64_t *pages,
                                                         int64_t row_dim, const bf16 *v0, int64_t head_dim,
                                                         const int64_t d16, bf16 *out) {
    __m512 acc[16];
    for (int64_t ch = 0; ch < d16; ch++) acc[ch] = _mm512_setzero_ps();
    for (int64_t p = 0; p <= last; p++) {
        if (p + AHEAD <= last) prefetch_row(v0 + pages[p + AHEAD] * row_dim, head_dim * (int64_t)sizeof(bf16));
        const bf16 *value = v0 + pages[p] * row_dim;
        const __m512 wp = _mm512_set1_ps(w[p]);
        for (int64_t ch = 0; ch < d16; ch++) {
            const __m256i raw = _mm256_maskz_loadu_epi16((__mmask16)lanes_mask(head_dim - ch * 16), value + ch * 16);
            const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
            acc[ch] = _mm512_fmadd_ps(wp, v, acc[ch]);
        }
    }
    for (int64_t ch = 0; ch < d16; ch++)
        _mm256_mask_storeu_epi16(out + ch * 16, (__mmask16)lanes_mask(head_dim - ch * 16), (__m256i)_mm512_cvtneps_pbh(acc[ch]));
}

int64_t paged_attention_bf16(
    const bf16 *q, int64_t q_stride_t, bf16 *out, int64_t out_stride_t,
    const bf16 *pool, int64_t row_dim, int64_t num_pages,
    const int64_t *page_table, int64_t table_stride, const int64_t *table_rows,
    const int64_t *query_start, const int64_t *context_lens, const int64_t *seqs, int64_t num_seqs,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale, int64_t threads)
{
    if (head_dim > 256)
        return paged_attention_bf16_generic(q, q_stride_t, out, out_stride_t, pool, row_dim, num_pages,
                                            page_table, table_stride, table_rows, query_start, context_lens,
                                            seqs, num_seqs, num_heads, num_kv_heads, head_dim, scale, threads);
    const int64_t ratio = num_heads / num_kv_heads, kv_size = num_kv_heads * head_dim;
    const int64_t chunks = (head_dim + 31) / 32;
    int64_t outside = 0;
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(threads) if(threads > 1 && num_seqs > 1)")
    for (int64_t s = 0; s < num_seqs; s++) {
        const int64_t i = seqs[s];
        const int64_t first = query_start[i], n = query_start[i + 1] - first, c = context_lens[i];
        const int64_t *pages = page_table + table_rows[i] * table_stride;
        if (!pages_inside(pages, c, num_pages)) {
            _Pragma("omp atomic write")
            outside = i + 1;
            continue;
        }
        float *w = malloc(sizeof(float) * ratio * c);
        for (int64_t k = 0; k < n; k++) {
            const int64_t t = first + k, last = c - n + k; /* sees positions 0 .. last */
            for (int64_t hk = 0; hk < num_kv_heads; hk++) {
                __m512bh qv[ratio * chunks]; /* the query heads of this kv head, read in place */
                for (int64_t g = 0; g < ratio; g++)
                    for (int64_t ch = 0; ch < chunks; ch++)
                        qv[g * chunks + ch] = (__m512bh)_mm512_maskz_loadu_epi16(lanes_mask(head_dim - ch * 32),
                            q + t * q_stride_t + (hk * ratio + g) * head_dim + ch * 32);
                const __m512 sc = _mm512_set1_ps(scale);
                for (int64_t p0 = 0; p0 <= last; p0 += 16) { /* 16 keys, read once for every query head */
                    const int64_t m = last + 1 - p0 < 16 ? last + 1 - p0 : 16;
                    for (int64_t p = p0 + 16; p < p0 + 32 && p <= last; p++)
                        prefetch_row(pool + pages[p] * row_dim + hk * head_dim, head_dim * (int64_t)sizeof(bf16));
                    for (int64_t g = 0; g < ratio; g++) {
                        __m512 dots[16];
                        for (int64_t j = 0; j < 16; j++) {
                            dots[j] = _mm512_setzero_ps();
                            if (j >= m) continue;
                            const bf16 *key = pool + pages[p0 + j] * row_dim + hk * head_dim;
                            for (int64_t ch = 0; ch < chunks; ch++)
                                dots[j] = _mm512_dpbf16_ps(dots[j], qv[g * chunks + ch],
                                    (__m512bh)_mm512_maskz_loadu_epi16(lanes_mask(head_dim - ch * 32), key + ch * 32));
                        }
                        _mm512_mask_storeu_ps(w + g * c + p0, (__mmask16)((1u << m) - 1u), _mm512_mul_ps(sum16(dots), sc));
                    }
                }
                for (int64_t g = 0; g < ratio; g++) {
                    float *wg = w + g * c;
                    __m512 top16 = _mm512_set1_ps(-INFINITY);
                    for (int64_t p = 0; p <= last; p += 16) {
                        const __mmask16 mask = (__mmask16)lanes_mask(last + 1 - p < 16 ? last + 1 - p : 16);
                        top16 = _mm512_mask_max_ps(top16, mask, top16, _mm512_maskz_loadu_ps(mask, wg + p));
                    }
                    const float top = _mm512_reduce_max_ps(top16);
                    float total = 0.0f;
                    _Pragma("omp simd reduction(+:total)")
                    for (int64_t p = 0; p <= last; p++) {
                        wg[p] = exp_nonpositive(wg[p] - top);
                        total += wg[p];
                    }
                    const float inv = 1.0f / total;
                    for (int64_t p = 0; p <= last; p++) wg[p] *= inv;
                }
                const int64_t d16 = (head_dim + 15) / 16;
                for (int64_t g = 0; g < ratio; g++) { /* P.V with the head's accumulators in registers */
                    bf16 *o = out + t * out_stride_t + (hk * ratio + g) * head_dim;
                    const bf16 *v0 = pool + kv_size + hk * head_dim;
                    if (d16 == 4) pv_bf16(w + g * c, last, pages, row_dim, v0, head_dim, 4, o);
                    else if (d16 == 8) pv_bf16(w + g * c, last, pages, row_dim, v0, head_dim, 8, o);
                    else pv_bf16(w + g * c, last, pages, row_dim, v0, head_dim, d16, o);
                }
            }
        }
        free(w);
    }
    return outside;
}
#else
DEFINE_ATTENTION(bf16, bf16)
#endif
