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
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

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

#if defined(__AVX512F__)
/* exp_nonpositive on 16 lanes, the same steps in AVX-512 (gcc does not vectorise the scalar one here) */
static inline __m512 exp_nonpositive16(__m512 x) {
    const __mmask16 zero = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm512_mask_mov_ps(x, zero, _mm512_setzero_ps());
    const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.4426950408889634f), _mm512_set1_ps(0.5f)),
                                          _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f),
                                      _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x));
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    const __m512i two_n = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mul_ps((__mmask16)~zero, p, _mm512_castsi512_ps(two_n));
}
#endif

/* w[0 .. count) = exp(w - max w), in float32, in place; returns their sum (count >= 1). */
static inline float exp_sum(float *w, int64_t count) {
#if defined(__AVX512F__)
    __m512 top16 = _mm512_set1_ps(-INFINITY), total16 = _mm512_setzero_ps();
    for (int64_t p = 0; p < count; p += 16) {
        const __mmask16 m = lanes_mask16(count - p);
        top16 = _mm512_mask_max_ps(top16, m, top16, _mm512_maskz_loadu_ps(m, w + p));
    }
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(top16));
    for (int64_t p = 0; p < count; p += 16) { /* lanes past count are neither stored nor summed */
        const __mmask16 m = lanes_mask16(count - p);
        const __m512 e = exp_nonpositive16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, w + p), top));
        _mm512_mask_storeu_ps(w + p, m, e);
        total16 = _mm512_mask_add_ps(total16, m, total16, e);
    }
    return _mm512_reduce_add_ps(total16);
#else
    float top = -INFINITY, total = 0.0f;
    for (int64_t p = 0; p < count; p++) top = w[p] > top ? w[p] : top;
    for (int64_t p = 0; p < count; p++) {
        w[p] = exp_nonpositive(w[p] - top);
        total += w[p];
    }
    return total;
#endif
}

/* w[0 .. count) = softmax(w[0 .. count)) = exp(w - max w) / sum, in float32 (count >= 1). */
static inline void softmax(float *w, int64_t count) {
    const float inv = 1.0f / exp_sum(w, count);
#if defined(__AVX512F__)
    for (int64_t p = 0; p < count; p += 16) {
        const __mmask16 m = lanes_mask16(count - p);
        _mm512_mask_storeu_ps(w + p, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + p), _mm512_set1_ps(inv)));
    }
#else
    for (int64_t p = 0; p < count; p++) w[p] *= inv;
#endif
}

/* Whether every one of the count page ids is a row of the pool. */
static inline int pages_inside(const int64_t *pages, int64_t count, int64_t num_pages) {
    int outside = 0;
    for (int64_t p = 0; p < count; p++) outside |= (uint64_t)pages[p] >= (uint64_t)num_pages;
    return !outside;
}

/* Pages are scattered, so the hardware prefetcher cannot guess the next key: ask for the
 * row AHEAD positions on while this one is used. */
#define AHEAD 16
static inline void prefetch_row(const void *p, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch((const char *)p + b, 0, 1);
}

/* n values of a q, K or V row as float32, for the generic loop's dot products and sums, which
 * vectorise on float32 rows: float32 is used in place, the others are converted into buf. gcc 12
 * does not vectorise a _Float16 -> float conversion inside a loop once AVX512-FP16 is on (every
 * element became a scalar vcvtsh2ss, and the sums a serial chain: over 10x slower than float32), so
 * float16 rows are converted 16 or 8 values at a time with AVX-512F / F16C. */
static inline const float *row_f32(const float *src, float *buf, int64_t n) {
    (void)buf, (void)n;
    return src;
}
static inline const float *row_bf16(const bf16 *src, float *buf, int64_t n) {
    for (int64_t d = 0; d < n; d++) buf[d] = load_bf16(src + d);
    return buf;
}
static inline const float *row_f16(const f16 *src, float *buf, int64_t n) {
    int64_t d = 0;
#if defined(__AVX512F__)
    for (; d + 16 <= n; d += 16) _mm512_storeu_ps(buf + d, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + d))));
#elif defined(__F16C__)
    for (; d + 8 <= n; d += 8) _mm256_storeu_ps(buf + d, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + d))));
#endif
    for (; d < n; d++) buf[d] = load_f16(src + d);
    return buf;
}

/* The parameters of every attention entry point (paged_attention_*, chunk_attention_*): kernels/cpu.py
 * calls them alike. */
#define ATTENTION_PARAMS(T)                                                                                     \
    const T *q, int64_t q_stride_t, T *out, int64_t out_stride_t,                                               \
    const T *pool, int64_t row_dim, int64_t num_pages,                                                          \
    const int64_t *page_table, int64_t table_stride, const int64_t *table_rows,                                 \
    const int64_t *query_start, const int64_t *context_lens, const int64_t *seqs, int64_t num_seqs,             \
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale, int64_t threads

#define DEFINE_ATTENTION(T, SUFFIX)                                                                             \
int64_t paged_attention_##SUFFIX(ATTENTION_PARAMS(T))                                                         \
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
        float *acc = malloc(sizeof(float) * ratio * head_dim), *buf = malloc(sizeof(float) * head_dim);         \
        for (int64_t k = 0; k < n; k++) {                                                                       \
            const int64_t t = first + k, last = c - n + k; /* sees positions 0 .. last */                       \
            for (int64_t hk = 0; hk < num_kv_heads; hk++) {                                                     \
                for (int64_t g = 0; g < ratio; g++) {                                                           \
                    const float *qg = row_##SUFFIX(q + t * q_stride_t + (hk * ratio + g) * head_dim, buf, head_dim); \
                    for (int64_t d = 0; d < head_dim; d++) qf[g * head_dim + d] = qg[d] * scale;                \
                }                                                                                               \
                for (int64_t p = 0; p <= last; p++) {                                                           \
                    if (p + AHEAD <= last) prefetch_row(pool + pages[p + AHEAD] * row_dim + hk * head_dim, head_dim * (int64_t)sizeof(T)); \
                    const float *key = row_##SUFFIX(pool + pages[p] * row_dim + hk * head_dim, buf, head_dim);  \
                    for (int64_t g = 0; g < ratio; g++) {                                                       \
                        const float *qg = qf + g * head_dim;                                                    \
                        float sum = 0.0f;                                                                       \
                        _Pragma("omp simd reduction(+:sum)")                                                    \
                        for (int64_t d = 0; d < head_dim; d++) sum += qg[d] * key[d];                           \
                        w[g * c + p] = sum;                                                                     \
                    }                                                                                           \
                }                                                                                               \
                for (int64_t g = 0; g < ratio; g++) softmax(w + g * c, last + 1);                               \
                for (int64_t e = 0; e < ratio * head_dim; e++) acc[e] = 0.0f;                                   \
                for (int64_t p = 0; p <= last; p++) {                                                           \
                    if (p + AHEAD <= last) prefetch_row(pool + pages[p + AHEAD] * row_dim + kv_size + hk * head_dim, head_dim * (int64_t)sizeof(T)); \
                    const float *value = row_##SUFFIX(pool + pages[p] * row_dim + kv_size + hk * head_dim, buf, head_dim); \
                    for (int64_t g = 0; g < ratio; g++) {                                                       \
                        const float wp = w[g * c + p];                                                          \
                        float *ag = acc + g * head_dim;                                                         \
                        _Pragma("omp simd")                                                                     \
                        for (int64_t d = 0; d < head_dim; d++) ag[d] += wp * value[d];                          \
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
        free(buf);                                                                                              \
    }                                                                                                           \
    return outside;                                                                                             \
}

DEFINE_ATTENTION(f16, f16)

#if defined(__AVX512F__)
/* the generic loops, for heads wider than the AVX-512 kernel's (float32: 128, bfloat16: 256) */
#define row_f32_generic row_f32
#define store_f32_generic store_f32
DEFINE_ATTENTION(float, f32_generic)
#if LORAFLEET_NATIVE_BF16
#define row_bf16_generic row_bf16
#define store_bf16_generic store_bf16
DEFINE_ATTENTION(bf16, bf16_generic)
#endif

/* float32, and bfloat16 with native dot products (AVX512-BF16), in AVX-512. The scores q.k are
 * where the generic loop spends its time: one horizontal sum of 16 lanes per (position, head).
 * Here the query (unscaled, read in place) meets 16 keys at a time: each key's q.k is a vector of
 * 16 partial sums (bf16: vdpbf16ps, exact products and float32 sums; float32: FMAs), and one
 * transpose-and-add tree turns the 16 vectors into the 16 scores, about three instructions per
 * score instead of ten. The scale is applied to the float32 scores; softmax as in the generic loop,
 * and P.V with each V row loaded (and widened) once for all the query heads of its kv head.
 * A "chunk" is 64 bytes of a head: 32 bf16 or 16 float32 values. */

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

/* chunk ch of a head at p (masked lanes zero): 32 bf16 or 16 float32 values, as 64 bytes */
static inline __attribute__((always_inline)) __m512i load_chunk(const char *p, int64_t ch, __mmask32 mask, const int is_bf16) {
#if LORAFLEET_NATIVE_BF16
    if (is_bf16) return _mm512_maskz_loadu_epi16(mask, p + ch * 64);
#endif
    return _mm512_maskz_loadu_epi32((__mmask16)mask, p + ch * 64);
}

/* acc + the products of chunk q and chunk k, lane by lane (bf16: pairs of products) */
static inline __attribute__((always_inline)) __m512 dot_chunk(__m512 acc, __m512i q, __m512i k, const int is_bf16) {
#if LORAFLEET_NATIVE_BF16
    if (is_bf16) return _mm512_dpbf16_ps(acc, (__m512bh)q, (__m512bh)k);
#endif
    return _mm512_fmadd_ps(_mm512_castsi512_ps(q), _mm512_castsi512_ps(k), acc);
}

/* 16 values at p (bf16 or float32) as float32, lanes outside m zero; and back, rounded, lanes in m */
static inline __attribute__((always_inline)) __m512 load16(const char *p, __mmask16 m, const int is_bf16) {
#if LORAFLEET_NATIVE_BF16
    if (is_bf16) return load16_bf16((const bf16 *)p, m);
#endif
    return _mm512_maskz_loadu_ps(m, p);
}
static inline __attribute__((always_inline)) void store16(char *p, __m512 v, __mmask16 m, const int is_bf16) {
#if LORAFLEET_NATIVE_BF16
    if (is_bf16) {
        store16_bf16((bf16 *)p, v, m);
        return;
    }
#endif
    _mm512_mask_storeu_ps(p, m, v);
}

/* w_g[j] = scale * q_g . K_j for the m <= 16 keys of one block (key j at k0 + pages[j] * row_bytes) and each
 * of `heads` query heads g (q_g in qv[g * chunks ..], w_g = w + g * c). With chunks a constant, the 16 sums
 * and the loops unroll into registers; a generic loop kept them in memory, a load and a store around every
 * product, and ran the scores at about a third of this speed. Keys past m read key 0 again (inside the
 * pool) and are never stored. */
static inline __attribute__((always_inline)) void qk_block(const __m512i *qv, int64_t heads, const int64_t chunks,
                                                          const __mmask32 *masks, const char *k0, const int64_t *pages,
                                                          int64_t row_bytes, int64_t m, __m512 sc, float *w, int64_t c,
                                                          const int is_bf16) {
    const char *keys[16];
    for (int j = 0; j < 16; j++) keys[j] = k0 + pages[j < m ? j : 0] * row_bytes;
    for (int64_t g = 0; g < heads; g++) {
        __m512 dots[16];
#pragma GCC unroll 16
        for (int j = 0; j < 16; j++) {
            dots[j] = _mm512_setzero_ps();
#pragma GCC unroll 8
            for (int64_t ch = 0; ch < chunks; ch++)
                dots[j] = dot_chunk(dots[j], qv[g * chunks + ch], load_chunk(keys[j], ch, masks[ch], is_bf16), is_bf16);
        }
        _mm512_mask_storeu_ps(w + g * c, (__mmask16)((1u << m) - 1u), _mm512_mul_ps(sum16(dots), sc));
    }
}

/* qk_block with the constant of each head size up to 8 chunks */
static inline __attribute__((always_inline)) void qk_heads(const __m512i *qv, int64_t heads, int64_t chunks,
                                                          const __mmask32 *masks, const char *k0, const int64_t *pages,
                                                          int64_t row_bytes, int64_t m, __m512 sc, float *w, int64_t c,
                                                          const int is_bf16) {
    switch (chunks) {
#define QK_CASE(C) case C: qk_block(qv, heads, C, masks, k0, pages, row_bytes, m, sc, w, c, is_bf16); return;
    QK_CASE(1) QK_CASE(2) QK_CASE(3) QK_CASE(4) QK_CASE(5) QK_CASE(6) QK_CASE(7) QK_CASE(8)
#undef QK_CASE
    }
}

/* out_g = sum_p w_g[p] V_p for `heads` query heads g that share a kv head (w_g = w + g * c,
 * out_g = out + g * head_dim), 16 dims per register, heads * d16 <= 16 accumulators. Each V row
 * is loaded (and widened) once for all the heads; with heads and d16 constants (4: head_dim 64,
 * 8: 128) the accumulators stay in registers. V_p = v0 + pages[p] * row_bytes. */
static inline __attribute__((always_inline)) void pv_block(const float *w, int64_t c, int64_t last, const int64_t *pages,
                                                          int64_t row_bytes, const char *v0, int64_t head_dim,
                                                          const int64_t heads, const int64_t d16, char *out, const int is_bf16) {
    const int64_t esize = is_bf16 ? 2 : 4;
    __m512 acc[16], v[16];
    for (int64_t e = 0; e < heads * d16; e++) acc[e] = _mm512_setzero_ps();
    for (int64_t p = 0; p <= last; p++) {
        if (p + AHEAD <= last) prefetch_row(v0 + pages[p + AHEAD] * row_bytes, head_dim * esize);
        const char *value = v0 + pages[p] * row_bytes;
        for (int64_t ch = 0; ch < d16; ch++) v[ch] = load16(value + ch * 16 * esize, lanes_mask16(head_dim - ch * 16), is_bf16);
        for (int64_t g = 0; g < heads; g++) {
            const __m512 wp = _mm512_set1_ps(w[g * c + p]);
            for (int64_t ch = 0; ch < d16; ch++) acc[g * d16 + ch] = _mm512_fmadd_ps(wp, v[ch], acc[g * d16 + ch]);
        }
    }
    for (int64_t g = 0; g < heads; g++)
        for (int64_t ch = 0; ch < d16; ch++)
            store16(out + (g * head_dim + ch * 16) * esize, acc[g * d16 + ch], lanes_mask16(head_dim - ch * 16), is_bf16);
}

/* pv_block for `heads` <= 16 / d16 query heads, with the constants of the common shapes */
static inline __attribute__((always_inline)) void pv_heads(const float *w, int64_t c, int64_t last, const int64_t *pages,
                                                          int64_t row_bytes, const char *v0, int64_t head_dim, int64_t heads,
                                                          int64_t d16, char *out, const int is_bf16) {
#define PV_CASE(H, D) if (heads == H && d16 == D) { pv_block(w, c, last, pages, row_bytes, v0, head_dim, H, D, out, is_bf16); return; }
    PV_CASE(1, 4) PV_CASE(2, 4) PV_CASE(3, 4) PV_CASE(4, 4) PV_CASE(1, 8) PV_CASE(2, 8)
#undef PV_CASE
    pv_block(w, c, last, pages, row_bytes, v0, head_dim, heads, d16, out, is_bf16);
}

/* The decode kernel in AVX-512, element size by `is_bf16` (heads of at most 8 chunks: the callers check). */
static inline __attribute__((always_inline)) int64_t decode_attention(
    const char *q, int64_t q_stride_t, char *out, int64_t out_stride_t, const char *pool, int64_t row_dim,
    int64_t num_pages, const int64_t *page_table, int64_t table_stride, const int64_t *table_rows,
    const int64_t *query_start, const int64_t *context_lens, const int64_t *seqs, int64_t num_seqs,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale, int64_t threads, const int is_bf16)
{
    const int64_t esize = is_bf16 ? 2 : 4, per_chunk = 64 / esize, row_bytes = row_dim * esize;
    const int64_t ratio = num_heads / num_kv_heads, kv_size = num_kv_heads * head_dim;
    const int64_t chunks = (head_dim + per_chunk - 1) / per_chunk;
    __mmask32 masks[8]; /* the lanes of each chunk of a head */
    for (int64_t ch = 0; ch < chunks; ch++)
        masks[ch] = is_bf16 ? lanes_mask(head_dim - ch * per_chunk) : (__mmask32)lanes_mask16(head_dim - ch * per_chunk);
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
                __m512i qv[ratio * chunks]; /* the query heads of this kv head, read in place */
                for (int64_t g = 0; g < ratio; g++)
                    for (int64_t ch = 0; ch < chunks; ch++)
                        qv[g * chunks + ch] = load_chunk(q + (t * q_stride_t + (hk * ratio + g) * head_dim) * esize, ch,
                                                         masks[ch], is_bf16);
                const __m512 sc = _mm512_set1_ps(scale);
                const char *k0 = pool + hk * head_dim * esize;
                for (int64_t p0 = 0; p0 <= last; p0 += 16) { /* 16 keys, read once for every query head */
                    const int64_t m = last + 1 - p0 < 16 ? last + 1 - p0 : 16;
                    for (int64_t p = p0 + 16; p < p0 + 32 && p <= last; p++)
                        prefetch_row(k0 + pages[p] * row_bytes, head_dim * esize);
                    qk_heads(qv, ratio, chunks, masks, k0, pages + p0, row_bytes, m, sc, w + p0, c, is_bf16);
                }
                for (int64_t g = 0; g < ratio; g++) softmax(w + g * c, last + 1);
                const int64_t d16 = (head_dim + 15) / 16, group = 16 / d16;
                for (int64_t g = 0; g < ratio; g += group) /* P.V, up to `group` heads per pass over V */
                    pv_heads(w + g * c, c, last, pages, row_bytes, pool + (kv_size + hk * head_dim) * esize, head_dim,
                             ratio - g < group ? ratio - g : group, d16,
                             out + (t * out_stride_t + (hk * ratio + g) * head_dim) * esize, is_bf16);
            }
        }
        free(w);
    }
    return outside;
}

#define DEFINE_DECODE_ATTENTION(T, SUFFIX, BF16, MAX_HEAD)                                                      \
int64_t paged_attention_##SUFFIX(ATTENTION_PARAMS(T))                                                         \
{                                                                                                               \
    if (head_dim > MAX_HEAD)                                                                                    \
        return paged_attention_##SUFFIX##_generic(q, q_stride_t, out, out_stride_t, pool, row_dim, num_pages,   \
                                                  page_table, table_stride, table_rows, query_start,             \
                                                  context_lens, seqs, num_seqs, num_heads, num_kv_heads,         \
                                                  head_dim, scale, threads);                                     \
    return decode_attention((const char *)q, q_stride_t, (char *)out, out_stride_t, (const char *)pool, row_dim,\
                            num_pages, page_table, table_stride, table_rows, query_start, context_lens, seqs,   \
                            num_seqs, num_heads, num_kv_heads, head_dim, scale, threads, BF16);                 \
}

DEFINE_DECODE_ATTENTION(float, f32, 0, 128)
#if LORAFLEET_NATIVE_BF16
DEFINE_DECODE_ATTENTION(bf16, bf16, 1, 256)
#else
DEFINE_ATTENTION(bf16, bf16)
#endif
#else
DEFINE_ATTENTION(float, f32)
DEFINE_ATTENTION(bf16, bf16)
#endif

#if defined(__AVX512F__)
/* Prefill chunks, blocked like a matrix product, K and V read through the pages (float32, and
 * bfloat16 where the CPU has native bfloat16 dot products).
 *
 * The same op as paged_attention_* for sequences with many new tokens (kernels/cpu.py sends chunks
 * of MATMUL_MIN_TOKENS or more here): decode reads each key once per token, which is all there is
 * to do for one token, but a chunk of n tokens would read every key n times, one score at a time.
 * Here the work of one sequence, kv head and block of CHUNK_TOKENS new tokens is one task (tasks run
 * in parallel). Its keys are copied once into `kp` as 4-byte units (bf16: pairs of dims, for
 * vdpbf16ps; float32: one dim), 32 keys per block, [block][unit][key]. CHUNK_ROWS query rows (a row
 * is one new token's query head) are scored against 32 keys at a time, each query unit broadcast,
 * 2 * CHUNK_ROWS accumulators in registers and no horizontal sums. The rows' scores (scaled,
 * float32) go to `w`; each row's softmax runs in float32 up to its own last visible key, and P.V
 * sums the rows' unnormalised weights times V in float32, 64 dims (four registers) per row at a time,
 * each V row loaded (and widened) once for all the rows; the sums are divided by the rows' totals
 * when stored. Returns as paged_attention_*. */
#define CHUNK_ROWS 6
#define CHUNK_TOKENS 32

/* w[r][j] = scale * q_r . K_j for the CHUNK_ROWS rows r (the query's units at qp[r]) and the 32 keys
 * of packed block kb (units units of 32 keys each) */
static inline __attribute__((always_inline)) void qk_rows(const int32_t *const qp[CHUNK_ROWS], const int32_t *kb,
                                                         int64_t units, __m512 sc, float *w, int64_t w_stride,
                                                         const int bf16_pairs) {
    __m512 acc[CHUNK_ROWS][2];
    for (int r = 0; r < CHUNK_ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t u = 0; u < units; u++) {
        const __m512i k0 = _mm512_loadu_si512(kb + u * 32), k1 = _mm512_loadu_si512(kb + u * 32 + 16);
#pragma GCC unroll 6
        for (int r = 0; r < CHUNK_ROWS; r++) {
            int32_t unit;
            memcpy(&unit, qp[r] + u, sizeof unit);
            const __m512i a = _mm512_set1_epi32(unit);
            acc[r][0] = dot_chunk(acc[r][0], a, k0, bf16_pairs);
            acc[r][1] = dot_chunk(acc[r][1], a, k1, bf16_pairs);
        }
    }
    for (int r = 0; r < CHUNK_ROWS; r++) {
        _mm512_storeu_ps(w + r * w_stride, _mm512_mul_ps(acc[r][0], sc));
        _mm512_storeu_ps(w + r * w_stride + 16, _mm512_mul_ps(acc[r][1], sc));
    }
}

/* V_j[d0 .. d0 + 64) as float32 (value: its first element, 2 or 4 bytes each), lanes outside m zero */
static inline __attribute__((always_inline)) void v_row(const char *value, const __mmask16 m[4], __m512 v[4],
                                                       const int bf16_pairs) {
    for (int ch = 0; ch < 4; ch++) v[ch] = load16(value + ch * 16 * (bf16_pairs ? 2 : 4), m[ch], bf16_pairs);
}

/* acc[r] = sum_{j <= last[r]} w[r][j] V_j[d0 .. d0 + 64) for the CHUNK_ROWS rows (last[] ascending),
 * stored to o[r] times inv[r] for the first `rows` rows. Keys every row sees take one pass of FMAs;
 * the few seen by only the later rows of the block are added to those rows alone, so a row never
 * touches a later key's V (0 * inf would be NaN). v0: V of position 0's page at d0; esize: 2 or 4. */
static inline __attribute__((always_inline)) void pv_rows(const float *w, int64_t w_stride, const int64_t last[CHUNK_ROWS],
                                                         const int64_t *pages, int64_t row_bytes, const char *v0,
                                                         const __mmask16 m[4], const float inv[CHUNK_ROWS],
                                                         char *const o[CHUNK_ROWS], int rows, const int bf16_pairs) {
    __m512 acc[CHUNK_ROWS][4], v[4];
    for (int r = 0; r < CHUNK_ROWS; r++) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = _mm512_setzero_ps();
    const int64_t common = last[0] + 1, keys = last[CHUNK_ROWS - 1] + 1;
    for (int64_t j = 0; j < common; j++) {
        if (j + AHEAD < keys) prefetch_row(v0 + pages[j + AHEAD] * row_bytes, bf16_pairs ? 128 : 256);
        v_row(v0 + pages[j] * row_bytes, m, v, bf16_pairs);
#pragma GCC unroll 6
        for (int r = 0; r < CHUNK_ROWS; r++) {
            const __m512 wr = _mm512_set1_ps(w[r * w_stride + j]);
            for (int ch = 0; ch < 4; ch++) acc[r][ch] = _mm512_fmadd_ps(wr, v[ch], acc[r][ch]);
        }
    }
    for (int64_t j = common; j < keys; j++) {
        v_row(v0 + pages[j] * row_bytes, m, v, bf16_pairs);
        for (int r = 0; r < CHUNK_ROWS; r++) {
            if (j > last[r]) continue;
            const __m512 wr = _mm512_set1_ps(w[r * w_stride + j]);
            for (int ch = 0; ch < 4; ch++) acc[r][ch] = _mm512_fmadd_ps(wr, v[ch], acc[r][ch]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int ch = 0; ch < 4; ch++)
            store16(o[r] + ch * 16 * (bf16_pairs ? 2 : 4), _mm512_mul_ps(acc[r][ch], _mm512_set1_ps(inv[r])), m[ch], bf16_pairs);
}

static inline __attribute__((always_inline)) int64_t chunk_attention(
    const char *q, int64_t q_stride_t, char *out, int64_t out_stride_t,
    const char *pool, int64_t row_dim, int64_t num_pages,
    const int64_t *page_table, int64_t table_stride, const int64_t *table_rows,
    const int64_t *query_start, const int64_t *context_lens, const int64_t *seqs, int64_t num_seqs,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale, int64_t threads, const int bf16_pairs)
{
    const int64_t esize = bf16_pairs ? 2 : 4, units = bf16_pairs ? head_dim / 2 : head_dim;
    const int64_t ratio = num_heads / num_kv_heads, kv_size = num_kv_heads * head_dim, row_bytes = row_dim * esize;
    /* tasks: (sequence, kv head, block of CHUNK_TOKENS new tokens); first_task[s] is sequence s's first */
    int64_t *first_task = malloc(sizeof(int64_t) * (num_seqs + 1)), max_keys = 0;
    first_task[0] = 0;
    for (int64_t s = 0; s < num_seqs; s++) {
        const int64_t i = seqs[s], n = query_start[i + 1] - query_start[i];
        first_task[s + 1] = first_task[s] + num_kv_heads * ((n + CHUNK_TOKENS - 1) / CHUNK_TOKENS);
        max_keys = context_lens[i] > max_keys ? context_lens[i] : max_keys;
    }
    const int64_t num_tasks = first_task[num_seqs], padded = (max_keys + 31) / 32 * 32;
    int64_t outside = 0;
    _Pragma("omp parallel num_threads(threads) if(threads > 1 && num_tasks > 1)")
    {
        /* this thread's keys (packed) and scores, sized for the longest context of the call */
        int32_t *kp = aligned_alloc(64, sizeof(int32_t) * units * padded);
        float *w = aligned_alloc(64, sizeof(float) * CHUNK_ROWS * padded);
        int64_t s = 0;
        _Pragma("omp for schedule(dynamic, 1)")
        for (int64_t task = 0; task < num_tasks; task++) {
            while (first_task[s + 1] <= task) s++;
            while (first_task[s] > task) s--;
            const int64_t i = seqs[s], local = task - first_task[s];
            const int64_t hk = local % num_kv_heads, block = local / num_kv_heads;
            const int64_t first = query_start[i], n = query_start[i + 1] - first, c = context_lens[i];
            const int64_t k0 = block * CHUNK_TOKENS, k1 = k0 + CHUNK_TOKENS < n ? k0 + CHUNK_TOKENS : n;
            const int64_t keys = c - n + k1; /* the block's last token sees positions 0 .. keys - 1 */
            const int64_t *pages = page_table + table_rows[i] * table_stride;
            if (!pages_inside(pages, keys, num_pages)) {
                _Pragma("omp atomic write")
                outside = i + 1;
                continue;
            }
            const int64_t blocks = (keys + 31) / 32;
            for (int64_t j = 0; j < blocks * 32; j++) { /* K of this kv head; keys past `keys` zero */
                int32_t *dst = kp + (j / 32) * units * 32 + j % 32;
                if (j < keys) {
                    const char *src = pool + pages[j] * row_bytes + hk * head_dim * esize;
                    for (int64_t u = 0; u < units; u++) memcpy(dst + u * 32, src + u * 4, sizeof(int32_t));
                } else {
                    for (int64_t u = 0; u < units; u++) dst[u * 32] = 0;
                }
            }
            const __m512 sc = _mm512_set1_ps(scale);
            const int64_t rows = (k1 - k0) * ratio; /* row r: token k0 + r / ratio, query head hk * ratio + r % ratio */
            for (int64_t r0 = 0; r0 < rows; r0 += CHUNK_ROWS) {
                const int m = rows - r0 < CHUNK_ROWS ? (int)(rows - r0) : CHUNK_ROWS;
                const int32_t *qp[CHUNK_ROWS];
                char *o[CHUNK_ROWS];
                int64_t last[CHUNK_ROWS];
                for (int r = 0; r < CHUNK_ROWS; r++) { /* rows past m repeat row m - 1; they are not stored */
                    const int64_t row = r0 + (r < m ? r : m - 1), k = k0 + row / ratio, t = first + k;
                    const int64_t head = hk * ratio + row % ratio;
                    qp[r] = (const int32_t *)(q + (t * q_stride_t + head * head_dim) * esize);
                    o[r] = out + (t * out_stride_t + head * head_dim) * esize;
                    last[r] = c - n + k;
                }
                const int64_t seen = last[CHUNK_ROWS - 1] + 1; /* keys any row of the block sees */
                for (int64_t b = 0; b < (seen + 31) / 32; b++)
                    qk_rows(qp, kp + b * units * 32, units, sc, w + b * 32, padded, bf16_pairs);
                float inv[CHUNK_ROWS];
                for (int r = 0; r < CHUNK_ROWS; r++) /* the weights, unnormalised: the totals divide the sums */
                    inv[r] = 1.0f / exp_sum(w + r * padded, last[r] + 1);
                for (int64_t d0 = 0; d0 < head_dim; d0 += 64) {
                    __mmask16 mk[4];
                    for (int ch = 0; ch < 4; ch++) mk[ch] = lanes_mask16(head_dim - d0 - ch * 16);
                    char *od[CHUNK_ROWS];
                    for (int r = 0; r < CHUNK_ROWS; r++) od[r] = o[r] + d0 * esize;
                    pv_rows(w, padded, last, pages, row_bytes, pool + (kv_size + hk * head_dim + d0) * esize, mk, inv, od, m,
                            bf16_pairs);
                }
            }
        }
        free(kp);
        free(w);
    }
    free(first_task);
    return outside;
}

#define DEFINE_CHUNK_ATTENTION(T, SUFFIX, BF16_PAIRS)                                                          \
int64_t chunk_attention_##SUFFIX(ATTENTION_PARAMS(T))                                                         \
{                                                                                                               \
    return chunk_attention((const char *)q, q_stride_t, (char *)out, out_stride_t, (const char *)pool, row_dim, \
                           num_pages, page_table, table_stride, table_rows, query_start, context_lens, seqs,    \
                           num_seqs, num_heads, num_kv_heads, head_dim, scale, threads, BF16_PAIRS);           \
}

DEFINE_CHUNK_ATTENTION(float, f32, 0)
#if LORAFLEET_NATIVE_BF16
DEFINE_CHUNK_ATTENTION(bf16, bf16, 1) /* bf16 head_dim must be even (pairs); the caller checks */
#endif
#endif
