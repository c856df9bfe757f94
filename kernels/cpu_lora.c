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
DEFINE_LORA(bf16, bf16)
DEFINE_LORA(f16, f16)
