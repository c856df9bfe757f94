/* Batched LoRA on the CPU, reading A and B straight from the page pool.
 *
 * The same two ops as kernels/lora.py (whose torch reference is the spec), for the
 * CPU path: no gather of adapter pages into a scratch copy and no padding to a
 * bucket's rank, so each adapter's weights are read once per step, in place.
 *
 * Layout (kernels/lora.py): adapter a's weights for one layer are one flat vector
 * chunked into pages; element e sits at pool[page_table[a][e / D]][e % D]. Target g
 * has A_g (rank x in_dim, row-major) at a_offset[a][g] and B_g transposed, B_g^T
 * (shards*rank x out_g, row-major), at b_offset[a][g]. A row may cross pages, so rows
 * are walked in pieces that stay inside one page.
 *
 * Work is split into segments: runs of tokens of one adapter (`order` lists the
 * token rows grouped by adapter; segment k is order[seg_start[k] .. seg_start[k+1])).
 * Each piece of a weight row is read once per segment and applied to all its tokens,
 * so a prefill reuses the row from L1 and a decode token costs one pass over its
 * adapter. Segments write disjoint token rows, so they run in parallel (OpenMP).
 *
 * Accumulation is in float32 for every storage type; results are rounded once.
 */
#include <stdlib.h>

#include "cpu_types.h"

/* A walk along one adapter's flat vector, page by page: it stands `left` elements before
 * the end of page `page` of the adapter's page list. Divisions happen once per block, not
 * per row. Pages are scattered, so the hardware prefetcher cannot follow a page change:
 * entering a page asks for the whole next one. */
typedef struct {
    const int64_t *table;
    const char *pool;
    int64_t page_dim, page, left, num_pages, page_bytes;
} cursor;

static inline void prefetch_page(const cursor *c, int64_t page) {
    if (page >= c->num_pages) return;
    const char *p = c->pool + c->table[page] * c->page_bytes;
    for (int64_t b = 0; b < c->page_bytes; b += 64) __builtin_prefetch(p + b, 0, 0);
}

static inline cursor cursor_at(const void *pool, int64_t elem_bytes, const int64_t *table, int64_t num_pages,
                               int64_t page_dim, int64_t e) {
    cursor c = {table, (const char *)pool, page_dim, e / page_dim, page_dim - e % page_dim, num_pages,
                page_dim * elem_bytes};
    prefetch_page(&c, c.page + 1);
    return c;
}

#define CURSOR_PTR(T, c) ((const T *)(c).pool + (c).table[(c).page] * (c).page_dim + ((c).page_dim - (c).left))

static inline void cursor_advance(cursor *c, int64_t n) {
    c->left -= n;
    if (c->left == 0) {
        c->page++;
        c->left = c->page_dim;
        prefetch_page(c, c->page + 1);
    }
}

/* Moves n elements on, across any number of pages, without reading them. */
static inline void cursor_skip(cursor *c, int64_t n) {
    if (n < c->left) {
        c->left -= n;
        return;
    }
    n -= c->left;
    c->page += 1 + n / c->page_dim;
    c->left = c->page_dim - n % c->page_dim;
    prefetch_page(c, c->page + 1);
}

/* Tokens are taken four at a time, so each weight loaded from the page feeds four FMAs. */
#define DEFINE_LORA(T, SUFFIX)                                                                                  \
void lora_shrink_##SUFFIX(                                                                                      \
    const T *x, int64_t x_stride, int64_t in_dim,                                                               \
    const T *pool, int64_t page_dim, const int64_t *page_table, int64_t max_pages,                              \
    const int64_t *order, const int64_t *seg_start, const int64_t *seg_adapter, int64_t num_segs,               \
    const int64_t *a_offset, const int64_t *rank, int64_t num_targets,                                          \
    T *s, int64_t max_rank, int64_t threads)                                                                    \
{                                                                                                               \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(threads) if(threads > 1 && num_segs > 1)")       \
    for (int64_t k = 0; k < num_segs; k++) {                                                                    \
        const int64_t a = seg_adapter[k], first = seg_start[k], n = seg_start[k + 1] - first;                   \
        /* the segment's activations, in float32, side by side */                                             \
        float *xs = malloc(sizeof(float) * n * in_dim), *acc = malloc(sizeof(float) * n);                       \
        for (int64_t i = 0; i < n; i++)                                                                         \
            for (int64_t c = 0; c < in_dim; c++) xs[i * in_dim + c] = load_##SUFFIX(x + order[first + i] * x_stride + c); \
        for (int64_t g = 0; g < num_targets; g++) {                                                             \
            const int64_t r = rank[a * num_targets + g];                                                        \
            if (r <= 0) continue;                                                                               \
            cursor cur = cursor_at(pool, sizeof(T), page_table + a * max_pages, max_pages, page_dim,            \
                                   a_offset[a * num_targets + g]);                                              \
            for (int64_t j = 0; j < r; j++) {                                                                   \
                for (int64_t i = 0; i < n; i++) acc[i] = 0.0f;                                                  \
                for (int64_t col = 0; col < in_dim;) { /* row j of A_g, in pieces that stay in one page */     \
                    const int64_t len = cur.left < in_dim - col ? cur.left : in_dim - col;                      \
                    const T *w = CURSOR_PTR(T, cur);                                                            \
                    int64_t i = 0;                                                                              \
                    for (; i + 4 <= n; i += 4) {                                                                \
                        const float *x0 = xs + i * in_dim + col, *x1 = x0 + in_dim, *x2 = x1 + in_dim, *x3 = x2 + in_dim; \
                        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;                                       \
                        _Pragma("omp simd reduction(+:s0, s1, s2, s3)")                                         \
                        for (int64_t c = 0; c < len; c++) {                                                     \
                            const float wc = load_##SUFFIX(w + c);                                              \
                            s0 += x0[c] * wc;                                                                   \
                            s1 += x1[c] * wc;                                                                   \
                            s2 += x2[c] * wc;                                                                   \
                            s3 += x3[c] * wc;                                                                   \
                        }                                                                                       \
                        acc[i] += s0;                                                                           \
                        acc[i + 1] += s1;                                                                       \
                        acc[i + 2] += s2;                                                                       \
                        acc[i + 3] += s3;                                                                       \
                    }                                                                                           \
                    for (; i < n; i++) {                                                                        \
                        const float *xt = xs + i * in_dim + col;                                                \
                        float sum = 0.0f;                                                                       \
                        _Pragma("omp simd reduction(+:sum)")                                                    \
                        for (int64_t c = 0; c < len; c++) sum += xt[c] * load_##SUFFIX(w + c);                  \
                        acc[i] += sum;                                                                          \
                    }                                                                                           \
                    cursor_advance(&cur, len);                                                                  \
                    col += len;                                                                                 \
                }                                                                                               \
                for (int64_t i = 0; i < n; i++)                                                                 \
                    store_##SUFFIX(s + (order[first + i] * num_targets + g) * max_rank + j, acc[i]);            \
            }                                                                                                   \
        }                                                                                                       \
        free(xs);                                                                                               \
        free(acc);                                                                                              \
    }                                                                                                           \
}                                                                                                               \
                                                                                                                \
void lora_expand_##SUFFIX(                                                                                      \
    T *y, int64_t y_stride, const int64_t *out_offset, const int64_t *out_dim,                                  \
    const T *s, int64_t max_rank, int64_t shards,                                                               \
    const T *pool, int64_t page_dim, const int64_t *page_table, int64_t max_pages,                              \
    const int64_t *order, const int64_t *seg_start, const int64_t *seg_adapter, int64_t num_segs,               \
    const int64_t *b_offset, const int64_t *rank, const float *scale, int64_t num_targets, int64_t threads)     \
{                                                                                                               \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(threads) if(threads > 1 && num_segs > 1)")       \
    for (int64_t k = 0; k < num_segs; k++) {                                                                    \
        const int64_t a = seg_adapter[k], first = seg_start[k], n = seg_start[k + 1] - first;                   \
        for (int64_t g = 0; g < num_targets; g++) {                                                             \
            const int64_t r = rank[a * num_targets + g];                                                        \
            if (r <= 0) continue;                                                                               \
            const int64_t width = shards * r, out = out_dim[g];                                                 \
            const float sc = scale[a * num_targets + g];                                                        \
            /* each token's shrink output, the shards side by side: v[j * r + c] = s[t, g, j * R + c] */        \
            float *v = malloc(sizeof(float) * n * width), *acc = malloc(sizeof(float) * n * out);               \
            for (int64_t i = 0; i < n; i++) {                                                                   \
                const T *st = s + (order[first + i] * num_targets + g) * shards * max_rank;                     \
                for (int64_t j = 0; j < shards; j++)                                                            \
                    for (int64_t c = 0; c < r; c++) v[i * width + j * r + c] = load_##SUFFIX(st + j * max_rank + c); \
            }                                                                                                   \
            /* B_g^T is stored: row c (out_g long, contiguous) is added, times v[c], to each token's */ \
            /* delta, so every inner loop is a long vectorised axpy and each weight is read once.     */ \
            for (int64_t i = 0; i < n * out; i++) acc[i] = 0.0f;                                                \
            cursor cur = cursor_at(pool, sizeof(T), page_table + a * max_pages, max_pages, page_dim,            \
                                   b_offset[a * num_targets + g]);                                              \
            for (int64_t c = 0; c < width; c++) {                                                               \
                for (int64_t o = 0; o < out;) { /* row c of B_g^T, in pieces that stay in one page */          \
                    const int64_t len = cur.left < out - o ? cur.left : out - o;                                \
                    const T *w = CURSOR_PTR(T, cur);                                                            \
                    int64_t i = 0;                                                                              \
                    for (; i + 4 <= n; i += 4) {                                                                \
                        const float v0 = v[i * width + c], v1 = v[(i + 1) * width + c];                         \
                        const float v2 = v[(i + 2) * width + c], v3 = v[(i + 3) * width + c];                   \
                        float *d0 = acc + i * out + o, *d1 = d0 + out, *d2 = d1 + out, *d3 = d2 + out;          \
                        _Pragma("omp simd")                                                                     \
                        for (int64_t q = 0; q < len; q++) {                                                     \
                            const float wq = load_##SUFFIX(w + q);                                              \
                            d0[q] += v0 * wq;                                                                   \
                            d1[q] += v1 * wq;                                                                   \
                            d2[q] += v2 * wq;                                                                   \
                            d3[q] += v3 * wq;                                                                   \
                        }                                                                                       \
                    }                                                                                           \
                    for (; i < n; i++) {                                                                        \
                        const float vc = v[i * width + c];                                                      \
                        float *d = acc + i * out + o;                                                           \
                        _Pragma("omp simd")                                                                     \
                        for (int64_t q = 0; q < len; q++) d[q] += vc * load_##SUFFIX(w + q);                    \
                    }                                                                                           \
                    cursor_advance(&cur, len);                                                                  \
                    o += len;                                                                                   \
                }                                                                                               \
            }                                                                                                   \
            for (int64_t i = 0; i < n; i++) {                                                                   \
                T *yt = y + order[first + i] * y_stride + out_offset[g];                                        \
                const float *d = acc + i * out;                                                                 \
                for (int64_t o = 0; o < out; o++) store_##SUFFIX(yt + o, load_##SUFFIX(yt + o) + d[o] * sc);    \
            }                                                                                                   \
            free(v);                                                                                            \
            free(acc);                                                                                          \
        }                                                                                                       \
    }                                                                                                           \
}

DEFINE_LORA(float, f32)
DEFINE_LORA(f16, f16)

#if LORAFLEET_NATIVE_BF16
/* bfloat16 with native dot products (AVX512-BF16): vdpbf16ps multiplies 32 pairs of bf16 exactly
 * and adds them into 16 float32 lanes, so neither the activations nor the weights are converted
 * or copied; accumulation stays in float32 and each result is rounded once, as above.
 *
 * Shrink: a row of A_g and a token's x are both contiguous along in_dim, the reduction axis, so
 * each 32-element piece of the row is one load that feeds four tokens' dot products.
 * Expand: the reduction runs over the rank, across rows of B_g^T, so rows c and c+1 are
 * interleaved (unpacklo/hi) into pairs and multiplied by the broadcast pair (v[c], v[c+1]). The
 * interleave permutes the outputs within each 32-block; the accumulators keep that order and are
 * put back once, when added into y. */

/* n <= 32 elements of one row (walking `c` across pages) into the low lanes, zeros above. */
static inline __m512i load_row_bf16(cursor *c, int64_t n) {
    const bf16 *p = CURSOR_PTR(bf16, *c);
    if (c->left >= n) {
        const __m512i v = _mm512_maskz_loadu_epi16(lanes_mask(n), p);
        cursor_advance(c, n);
        return v;
    }
    __m512i v = _mm512_setzero_si512();
    for (int64_t filled = 0; filled < n;) { /* the 32 elements straddle page ends */
        const int64_t take = c->left < n - filled ? c->left : n - filled;
        v = _mm512_mask_expandloadu_epi16(v, (__mmask32)(lanes_mask(take) << filled), CURSOR_PTR(bf16, *c));
        cursor_advance(c, take);
        filled += take;
    }
    return v;
}

void lora_shrink_bf16(
    const bf16 *x, int64_t x_stride, int64_t in_dim,
    const bf16 *pool, int64_t page_dim, const int64_t *page_table, int64_t max_pages,
    const int64_t *order, const int64_t *seg_start, const int64_t *seg_adapter, int64_t num_segs,
    const int64_t *a_offset, const int64_t *rank, int64_t num_targets,
    bf16 *s, int64_t max_rank, int64_t threads)
{
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(threads) if(threads > 1 && num_segs > 1)")
    for (int64_t k = 0; k < num_segs; k++) {
        const int64_t a = seg_adapter[k], first = seg_start[k], n = seg_start[k + 1] - first;
        for (int64_t g = 0; g < num_targets; g++) {
            const int64_t r = rank[a * num_targets + g];
            if (r <= 0) continue;
            cursor row = cursor_at(pool, sizeof(bf16), page_table + a * max_pages, max_pages, page_dim,
                                   a_offset[a * num_targets + g]);
            for (int64_t j = 0; j < r; j++) {
                const cursor start = row;
                cursor cur = start;
                int64_t i = 0;
                for (; i + 4 <= n; i += 4) { /* four tokens per pass over row j of A_g */
                    const bf16 *x0 = x + order[first + i] * x_stride, *x1 = x + order[first + i + 1] * x_stride;
                    const bf16 *x2 = x + order[first + i + 2] * x_stride, *x3 = x + order[first + i + 3] * x_stride;
                    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
                    cur = start;
                    for (int64_t col = 0; col < in_dim; col += 32) {
                        const int64_t len = in_dim - col < 32 ? in_dim - col : 32;
                        const __mmask32 mask = lanes_mask(len);
                        const __m512bh w = (__m512bh)load_row_bf16(&cur, len);
                        acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_maskz_loadu_epi16(mask, x0 + col), w);
                        acc1 = _mm512_dpbf16_ps(acc1, (__m512bh)_mm512_maskz_loadu_epi16(mask, x1 + col), w);
                        acc2 = _mm512_dpbf16_ps(acc2, (__m512bh)_mm512_maskz_loadu_epi16(mask, x2 + col), w);
                        acc3 = _mm512_dpbf16_ps(acc3, (__m512bh)_mm512_maskz_loadu_epi16(mask, x3 + col), w);
                    }
                    store_bf16(s + (order[first + i] * num_targets + g) * max_rank + j, _mm512_reduce_add_ps(acc0));
                    store_bf16(s + (order[first + i + 1] * num_targets + g) * max_rank + j, _mm512_reduce_add_ps(acc1));
                    store_bf16(s + (order[first + i + 2] * num_targets + g) * max_rank + j, _mm512_reduce_add_ps(acc2));
                    store_bf16(s + (order[first + i + 3] * num_targets + g) * max_rank + j, _mm512_reduce_add_ps(acc3));
                }
                for (; i < n; i++) { /* the rest one by one: a decode token costs one pass, no idle lanes */
                    const bf16 *xt = x + order[first + i] * x_stride;
                    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0; /* two chains: the adds overlap */
                    cur = start;
                    int64_t col = 0;
                    for (; col + 64 <= in_dim; col += 64) {
                        acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(xt + col), (__m512bh)load_row_bf16(&cur, 32));
                        acc1 = _mm512_dpbf16_ps(acc1, (__m512bh)_mm512_loadu_si512(xt + col + 32), (__m512bh)load_row_bf16(&cur, 32));
                    }
                    for (; col < in_dim; col += 32) {
                        const int64_t len = in_dim - col < 32 ? in_dim - col : 32;
                        acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_maskz_loadu_epi16(lanes_mask(len), xt + col),
                                                (__m512bh)load_row_bf16(&cur, len));
                    }
                    store_bf16(s + (order[first + i] * num_targets + g) * max_rank + j,
                               _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)));
                }
                row = cur; /* the walk is now at row j + 1 */
            }
        }
    }
}

/* Tokens per pass over B_g^T in the expand: their float32 accumulators (16 x out) stay in L2. */
#define EXPAND_TOKENS 16

void lora_expand_bf16(
    bf16 *y, int64_t y_stride, const int64_t *out_offset, const int64_t *out_dim,
    const bf16 *s, int64_t max_rank, int64_t shards,
    const bf16 *pool, int64_t page_dim, const int64_t *page_table, int64_t max_pages,
    const int64_t *order, const int64_t *seg_start, const int64_t *seg_adapter, int64_t num_segs,
    const int64_t *b_offset, const int64_t *rank, const float *scale, int64_t num_targets, int64_t threads)
{
    /* lane l of the first/second half of an un-permuted 32-block comes from this lane of lo|hi */
    int32_t first_idx[16], second_idx[16];
    for (int o = 0; o < 32; o++) {
        const int from = (o % 8 < 4 ? 0 : 16) + (o / 8) * 4 + o % 4;
        if (o < 16) first_idx[o] = from; else second_idx[o - 16] = from;
    }
    const __m512i idx0 = _mm512_loadu_si512(first_idx), idx1 = _mm512_loadu_si512(second_idx);
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(threads) if(threads > 1 && num_segs > 1)")
    for (int64_t k = 0; k < num_segs; k++) {
        const int64_t a = seg_adapter[k], first = seg_start[k], n_all = seg_start[k + 1] - first;
        for (int64_t g = 0; g < num_targets; g++) {
            const int64_t r = rank[a * num_targets + g];
            if (r <= 0) continue;
            const int64_t width = shards * r, pairs = (width + 1) / 2, out = out_dim[g], blocks = (out + 31) / 32;
            const __m512 sc = _mm512_set1_ps(scale[a * num_targets + g]);
            uint32_t *v = malloc(sizeof(uint32_t) * EXPAND_TOKENS * pairs); /* (v[c], v[c+1]) per token */
            float *acc = aligned_alloc(64, sizeof(float) * EXPAND_TOKENS * blocks * 32);
            for (int64_t i0 = 0; i0 < n_all; i0 += EXPAND_TOKENS) {
                const int64_t n = n_all - i0 < EXPAND_TOKENS ? n_all - i0 : EXPAND_TOKENS;
                for (int64_t i = 0; i < n; i++) {
                    const bf16 *st = s + (order[first + i0 + i] * num_targets + g) * shards * max_rank;
                    bf16 *vi = (bf16 *)(v + i * pairs);
                    for (int64_t j = 0; j < shards; j++)
                        for (int64_t c = 0; c < r; c++) vi[j * r + c] = st[j * max_rank + c];
                    if (width % 2) vi[width] = 0;
                }
                for (int64_t e = 0; e < n * blocks * 32; e += 16) _mm512_store_ps(acc + e, _mm512_setzero_ps());
                cursor cur = cursor_at(pool, sizeof(bf16), page_table + a * max_pages, max_pages, page_dim,
                                       b_offset[a * num_targets + g]);
                for (int64_t c = 0; c < width; c += 2) {
                    cursor next = cur; /* row c + 1 starts where row c ends */
                    cursor_skip(&next, out);
                    for (int64_t b = 0; b < blocks; b++) {
                        const int64_t len = out - b * 32 < 32 ? out - b * 32 : 32;
                        const __m512i w0 = load_row_bf16(&cur, len);
                        const __m512i w1 = c + 1 < width ? load_row_bf16(&next, len) : _mm512_setzero_si512();
                        const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(w0, w1);
                        const __m512bh hi = (__m512bh)_mm512_unpackhi_epi16(w0, w1);
                        for (int64_t i = 0; i < n; i++) {
                            const __m512bh vv = (__m512bh)_mm512_set1_epi32((int32_t)v[i * pairs + c / 2]);
                            float *d = acc + (i * blocks + b) * 32;
                            _mm512_store_ps(d, _mm512_dpbf16_ps(_mm512_load_ps(d), lo, vv));
                            _mm512_store_ps(d + 16, _mm512_dpbf16_ps(_mm512_load_ps(d + 16), hi, vv));
                        }
                    }
                    cur = next; /* now at row c + 2 */
                }
                for (int64_t i = 0; i < n; i++) {
                    bf16 *yt = y + order[first + i0 + i] * y_stride + out_offset[g];
                    for (int64_t b = 0; b < blocks; b++) {
                        const float *d = acc + (i * blocks + b) * 32;
                        const __m512 lo = _mm512_load_ps(d), hi = _mm512_load_ps(d + 16);
                        const int64_t len = out - b * 32 < 32 ? out - b * 32 : 32;
                        const __mmask32 mask = lanes_mask(len);
                        const __m512i yb = _mm512_maskz_loadu_epi16(mask, yt + b * 32);
                        /* bf16 -> float32: the 16 bits go to the top of each lane */
                        const __m512 y0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(yb)), 16));
                        const __m512 y1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(yb, 1)), 16));
                        const __m512 r0 = _mm512_fmadd_ps(_mm512_permutex2var_ps(lo, idx0, hi), sc, y0);
                        const __m512 r1 = _mm512_fmadd_ps(_mm512_permutex2var_ps(lo, idx1, hi), sc, y1);
                        _mm512_mask_storeu_epi16(yt + b * 32, mask, (__m512i)_mm512_cvtne2ps_pbh(r1, r0));
                    }
                }
            }
            free(v);
            free(acc);
        }
    }
}
#else
DEFINE_LORA(bf16, bf16)
#endif

/* 1 when the bfloat16 kernels above use native dot products (kernels/cpu.py asks, the tests check). */
int lorafleet_native_bf16(void) { return LORAFLEET_NATIVE_BF16; }
