/* Batched LoRA on the CPU, reading A and B from the page pool.
 *
 * The same two ops as kernels/lora.py (whose torch reference is the spec), for the
 * CPU path. Layout (kernels/lora.py): adapter a's weights for one layer are one flat
 * vector chunked into pages; element e sits at pool[page_table[a][e / D]][e % D].
 * Target g has A_g (rank x in_dim, row-major) at a_offset[a][g] and B_g transposed,
 * B_g^T (shards*rank x out_g, row-major), at b_offset[a][g]. A row may cross pages, so
 * rows are walked in pieces that stay inside one page.
 *
 * Work is split into segments: runs of tokens of one adapter (`order` lists the
 * token rows grouped by adapter; segment k is order[seg_start[k] .. seg_start[k+1])).
 * A segment takes one of two paths, by its length:
 * - fewer than `tile_tokens` tokens (decode): dot products. Each piece of a weight row
 *   is read in place from its page once per segment and applied to all its tokens, so a
 *   decode token costs one pass over its adapter: no copy, no padding to a bucket's rank.
 * - at least `tile_tokens` (prefill): a small matrix product. The adapter's weights are
 *   gathered out of the pages once per segment into a contiguous block in the layout the
 *   product wants, then multiplied in blocks of tokens whose sums stay in registers
 *   (bfloat16: AMX tiles where the CPU has them, else vdpbf16ps on bf16 pairs): the copy
 *   costs one pass over the weights, which the segment's many tokens then reuse.
 * Segments write disjoint token rows, so they run in parallel (OpenMP).
 *
 * Accumulation is in float32 for every storage type, and each result is rounded once:
 * s to its type, y to round(y + scale * (s B^T)). The two paths differ only in the order
 * of the sums, so where a segment switches path moves a result by at most an ulp.
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

static inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

/* Elements [e, e + n) of an adapter's vector at one address when they lie in consecutive pool pages (as an
 * adapter loaded in one piece has them), else NULL. */
static inline const void *flat_span(const void *pool, int64_t elem_bytes, const int64_t *table, int64_t num_pages,
                                    int64_t page_dim, int64_t e, int64_t n) {
    const int64_t p0 = e / page_dim, p1 = (e + n - 1) / page_dim;
    if (n <= 0 || p1 >= num_pages) return NULL;
    for (int64_t p = p0 + 1; p <= p1; p++)
        if (table[p] != table[p0] + (p - p0)) return NULL;
    return (const char *)pool + (table[p0] * page_dim + e % page_dim) * elem_bytes;
}

/* Scratch buffers of the calling thread, kept from call to call and grown as needed (up to about a MB
 * per thread): a fresh large allocation comes as new zeroed pages from the kernel every time,
 * which cost more than the products themselves. */
enum { SCRATCH_GATHER, SCRATCH_PANEL, SCRATCH_ACC, SCRATCH_APPLY, SCRATCH_SLOTS };

static void *scratch(int slot, size_t bytes) {
    static _Thread_local struct { void *p; size_t bytes; } kept[SCRATCH_SLOTS];
    if (kept[slot].bytes < bytes) {
        free(kept[slot].p);
        kept[slot].bytes = (size_t)round_up((int64_t)bytes, 4096);
        kept[slot].p = aligned_alloc(64, kept[slot].bytes);
    }
    return kept[slot].p;
}

/* Long segments, every storage type but bfloat16 with native dot products: blocked products in float32 on
 * weights gathered (and converted) out of the pages. The shrink, s (n x sum r) = x (n x in) A^T, takes the A
 * rows of every target side by side and reduces along in_dim, 4 tokens x 4 rows at a time (block_dots);
 * the expand, y (n x out) += scale * v (n x width) B^T, takes B^T as stored and runs in blocks of
 * 8 tokens x 32 outputs (block_product). Either way each weight loaded feeds several tokens' FMAs from
 * registers, where the dot-product loops below keep their sums in memory. */
#define BLOCK_M 8
#define BLOCK_N 32

/* 16 float32 lanes, in whatever vectors the CPU has (GCC's vector extension: one AVX-512 register, two
 * AVX2 ones, ...); aligned(4) and may_alias let it load from any float. */
typedef float lanes16 __attribute__((vector_size(64), aligned(4), may_alias));

/* c[i][l] = sum_k a[i][k] * b[k * b_stride + l] for rows i < BLOCK_M, columns l < BLOCK_N, k < depth. */
static inline void block_product(const float *const a[BLOCK_M], int64_t depth, const float *b, int64_t b_stride,
                                 float c[BLOCK_M][BLOCK_N]) {
    lanes16 acc[BLOCK_M][BLOCK_N / 16];
    for (int i = 0; i < BLOCK_M; i++)
        for (int l = 0; l < BLOCK_N / 16; l++) acc[i][l] = (lanes16){0};
    for (int64_t k = 0; k < depth; k++) {
        const lanes16 *bk = (const lanes16 *)(b + k * b_stride);
        const lanes16 b0 = bk[0], b1 = bk[1];
        for (int i = 0; i < BLOCK_M; i++) {
            acc[i][0] += a[i][k] * b0;
            acc[i][1] += a[i][k] * b1;
        }
    }
    memcpy(c, acc, sizeof acc);
}

/* c[i][j] = sum_k a[i][k] * w[j][k] for tokens i < 4, rows j < 4, k < depth: both along the reduction, so
 * neither is transposed; w's rows are zero-padded to a multiple of 16, a's are read to depth only. */
static inline void block_dots(const float *const a[4], const float *const w[4], int64_t depth, float c[4][4]) {
    lanes16 acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = (lanes16){0};
    int64_t k = 0;
    for (; k + 16 <= depth; k += 16) {
        const lanes16 w0 = *(const lanes16 *)(w[0] + k), w1 = *(const lanes16 *)(w[1] + k);
        const lanes16 w2 = *(const lanes16 *)(w[2] + k), w3 = *(const lanes16 *)(w[3] + k);
        for (int i = 0; i < 4; i++) {
            const lanes16 ai = *(const lanes16 *)(a[i] + k);
            acc[i][0] += ai * w0;
            acc[i][1] += ai * w1;
            acc[i][2] += ai * w2;
            acc[i][3] += ai * w3;
        }
    }
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) {
            float sum = 0.0f;
            for (int l = 0; l < 16; l++) sum += acc[i][j][l];
            for (int64_t q = k; q < depth; q++) sum += a[i][q] * w[j][q];
            c[i][j] = sum;
        }
}

#define DEFINE_BLOCKED(T, SUFFIX)                                                                               \
/* The shrink of one segment: n tokens (rows[0..n) of x) through every target of the adapter's group. */     \
static void shrink_segment_blocked_##SUFFIX(                                                                    \
    const T *x, int64_t x_stride, int64_t in_dim, const T *pool, int64_t page_dim, const int64_t *table,        \
    int64_t max_pages, const int64_t *rows, int64_t n, const int64_t *a_offset, const int64_t *rank,            \
    int64_t num_targets, T *s, int64_t max_rank)                                                                \
{                                                                                                               \
    int64_t cols = 0; /* the targets' A rows, side by side */                                                 \
    for (int64_t g = 0; g < num_targets; g++) cols += rank[g] > 0 ? rank[g] : 0;                               \
    const int64_t c_pad = round_up(cols, 4), k_pad = round_up(in_dim, 16);                                      \
    float *a_cat = scratch(SCRATCH_PANEL, sizeof(float) * c_pad * k_pad); /* zero-padded rows of k_pad */     \
    memset(a_cat + cols * k_pad, 0, sizeof(float) * (c_pad - cols) * k_pad);                                    \
    for (int64_t g = 0, c = 0; g < num_targets; g++) {                                                          \
        if (rank[g] <= 0) continue;                                                                             \
        cursor cur = cursor_at(pool, sizeof(T), table, max_pages, page_dim, a_offset[g]);                      \
        for (int64_t j = 0; j < rank[g]; j++, c++) {                                                            \
            float *row = a_cat + c * k_pad;                                                                     \
            for (int64_t col = 0; col < in_dim;) { /* row j of A_g, in pieces that stay in one page */         \
                const int64_t len = cur.left < in_dim - col ? cur.left : in_dim - col;                          \
                const T *w = CURSOR_PTR(T, cur);                                                                \
                for (int64_t e = 0; e < len; e++) row[col + e] = load_##SUFFIX(w + e);                         \
                cursor_advance(&cur, len);                                                                      \
                col += len;                                                                                     \
            }                                                                                                   \
            for (int64_t e = in_dim; e < k_pad; e++) row[e] = 0.0f;                                             \
        }                                                                                                       \
    }                                                                                                           \
    /* four tokens' rows of x in float32: float32 rows are read in place, others converted; rows past n are zeros */ \
    const int convert = sizeof(T) != sizeof(float);                                                             \
    float *xs = scratch(SCRATCH_GATHER, sizeof(float) * (convert ? 4 : 1) * in_dim + 1);                        \
    for (int64_t i0 = 0; i0 < n; i0 += 4) {                                                                     \
        const float *a[4];                                                                                      \
        for (int64_t i = 0; i < 4; i++) {                                                                       \
            const T *xt = x + rows[i0 + (i0 + i < n ? i : 0)] * x_stride;                                       \
            if (!convert && i0 + i < n) {                                                                       \
                a[i] = (const float *)(const void *)xt;                                                         \
                continue;                                                                                       \
            }                                                                                                   \
            float *row = xs + (convert ? i : 0) * in_dim;                                                       \
            for (int64_t k = 0; k < in_dim; k++) row[k] = i0 + i < n ? load_##SUFFIX(xt + k) : 0.0f;            \
            a[i] = row;                                                                                         \
        }                                                                                                       \
        for (int64_t g = 0, c0 = 0; g < num_targets; g++) { /* four rows of A at a time, target by target */  \
            if (rank[g] <= 0) continue;                                                                         \
            for (int64_t j0 = 0; j0 < rank[g]; j0 += 4) {                                                       \
                const float *w[4];                                                                              \
                for (int j = 0; j < 4; j++) w[j] = a_cat + (c0 + j0 + j) * k_pad;                               \
                float c[4][4];                                                                                  \
                block_dots(a, w, in_dim, c);                                                                    \
                for (int64_t i = 0; i < 4 && i0 + i < n; i++)                                                   \
                    for (int64_t j = 0; j < 4 && j0 + j < rank[g]; j++)                                         \
                        store_##SUFFIX(s + (rows[i0 + i] * num_targets + g) * max_rank + j0 + j, c[i][j]);     \
            }                                                                                                   \
            c0 += rank[g];                                                                                      \
        }                                                                                                       \
    }                                                                                                           \
}                                                                                                               \
                                                                                                                \
/* The expand of one segment for one target: y[rows, :out] += scale * v B^T, v the segment's shrink outputs   \
 * (the shards side by side), B^T (width x out) read from the pages at `cur`. */                              \
static void expand_segment_blocked_##SUFFIX(                                                                    \
    T *y, int64_t y_stride, int64_t out, const T *s, int64_t s_row, int64_t max_rank, int64_t shards,          \
    cursor cur, const int64_t *rows, int64_t n, int64_t r, float scale)                                         \
{                                                                                                               \
    const int64_t width = shards * r, o_pad = round_up(out, BLOCK_N), n_pad = round_up(n, BLOCK_M);             \
    float *b_t = scratch(SCRATCH_PANEL, sizeof(float) * width * o_pad);                                         \
    for (int64_t c = 0; c < width; c++) {                                                                       \
        for (int64_t o = 0; o < out;) { /* row c of B^T, in pieces that stay in one page */                   \
            const int64_t len = cur.left < out - o ? cur.left : out - o;                                        \
            const T *w = CURSOR_PTR(T, cur);                                                                    \
            for (int64_t e = 0; e < len; e++) b_t[c * o_pad + o + e] = load_##SUFFIX(w + e);                   \
            cursor_advance(&cur, len);                                                                          \
            o += len;                                                                                           \
        }                                                                                                       \
        for (int64_t o = out; o < o_pad; o++) b_t[c * o_pad + o] = 0.0f;                                       \
    }                                                                                                           \
    float *v = scratch(SCRATCH_GATHER, sizeof(float) * n_pad * width); /* v[i][j * r + c] = s[t, g, j * R + c] */ \
    for (int64_t i = 0; i < n_pad; i++)                                                                         \
        for (int64_t j = 0; j < shards; j++)                                                                    \
            for (int64_t c = 0; c < r; c++)                                                                     \
                v[i * width + j * r + c] = i < n ? load_##SUFFIX(s + rows[i] * s_row + j * max_rank + c) : 0.0f; \
    for (int64_t i0 = 0; i0 < n; i0 += BLOCK_M)                                                                 \
        for (int64_t o0 = 0; o0 < out; o0 += BLOCK_N) {                                                         \
            float c[BLOCK_M][BLOCK_N];                                                                          \
            const float *a[BLOCK_M];                                                                            \
            for (int i = 0; i < BLOCK_M; i++) a[i] = v + (i0 + i) * width;                                      \
            block_product(a, width, b_t + o0, o_pad, c);                                                        \
            const int64_t len = out - o0 < BLOCK_N ? out - o0 : BLOCK_N;                                        \
            for (int64_t i = 0; i < BLOCK_M && i0 + i < n; i++) {                                               \
                T *yt = y + rows[i0 + i] * y_stride + o0;                                                       \
                for (int64_t l = 0; l < len; l++) store_##SUFFIX(yt + l, load_##SUFFIX(yt + l) + c[i][l] * scale); \
            }                                                                                                   \
        }                                                                                                       \
}

/* The ops for every type but native bfloat16: segments of at least tile_tokens tokens go to the blocked
 * products above; in shorter ones tokens are taken four at a time, so each weight loaded from the page
 * feeds four FMAs. */
#define DEFINE_LORA(T, SUFFIX)                                                                                  \
void lora_shrink_##SUFFIX(                                                                                      \
    const T *x, int64_t x_stride, int64_t in_dim,                                                               \
    const T *pool, int64_t page_dim, const int64_t *page_table, int64_t max_pages,                              \
    const int64_t *order, const int64_t *seg_start, const int64_t *seg_adapter, int64_t num_segs,               \
    const int64_t *a_offset, const int64_t *rank, int64_t num_targets,                                          \
    T *s, int64_t max_rank, int64_t tile_tokens, int64_t threads)                                               \
{                                                                                                               \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(threads) if(threads > 1 && num_segs > 1)")       \
    for (int64_t k = 0; k < num_segs; k++) {                                                                    \
        const int64_t a = seg_adapter[k], first = seg_start[k], n = seg_start[k + 1] - first;                   \
        if (n >= tile_tokens) {                                                                                 \
            shrink_segment_blocked_##SUFFIX(x, x_stride, in_dim, pool, page_dim, page_table + a * max_pages,    \
                                            max_pages, order + first, n, a_offset + a * num_targets,            \
                                            rank + a * num_targets, num_targets, s, max_rank);                  \
            continue;                                                                                           \
        }                                                                                                       \
        /* the segment's activations, in float32, side by side */                                             \
        float *xs = scratch(SCRATCH_GATHER, sizeof(float) * n * in_dim);                                        \
        float *acc = scratch(SCRATCH_ACC, sizeof(float) * n);                                                   \
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
    }                                                                                                           \
}                                                                                                               \
                                                                                                                \
void lora_expand_##SUFFIX(                                                                                      \
    T *y, int64_t y_stride, const int64_t *out_offset, const int64_t *out_dim,                                  \
    const T *s, int64_t max_rank, int64_t shards,                                                               \
    const T *pool, int64_t page_dim, const int64_t *page_table, int64_t max_pages,                              \
    const int64_t *order, const int64_t *seg_start, const int64_t *seg_adapter, int64_t num_segs,               \
    const int64_t *b_offset, const int64_t *rank, const float *scale, int64_t num_targets, int64_t tile_tokens, \
    int64_t threads)                                                                                            \
{                                                                                                               \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(threads) if(threads > 1 && num_segs > 1)")       \
    for (int64_t k = 0; k < num_segs; k++) {                                                                    \
        const int64_t a = seg_adapter[k], first = seg_start[k], n = seg_start[k + 1] - first;                   \
        for (int64_t g = 0; g < num_targets; g++) {                                                             \
            const int64_t r = rank[a * num_targets + g];                                                        \
            if (r <= 0) continue;                                                                               \
            if (n >= tile_tokens) {                                                                             \
                const cursor cur = cursor_at(pool, sizeof(T), page_table + a * max_pages, max_pages, page_dim,  \
                                             b_offset[a * num_targets + g]);                                    \
                expand_segment_blocked_##SUFFIX(y + out_offset[g], y_stride, out_dim[g], s + g * shards * max_rank, \
                                                num_targets * shards * max_rank, max_rank, shards, cur,         \
                                                order + first, n, r, scale[a * num_targets + g]);               \
                continue;                                                                                       \
            }                                                                                                   \
            const int64_t width = shards * r, out = out_dim[g];                                                 \
            const float sc = scale[a * num_targets + g];                                                        \
            /* each token's shrink output, the shards side by side: v[j * r + c] = s[t, g, j * R + c] */        \
            float *v = scratch(SCRATCH_GATHER, sizeof(float) * n * width);                                      \
            float *acc = scratch(SCRATCH_ACC, sizeof(float) * n * out);                                         \
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
        }                                                                                                       \
    }                                                                                                           \
}

DEFINE_BLOCKED(float, f32)
DEFINE_LORA(float, f32)
DEFINE_BLOCKED(f16, f16)
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

/* n <= 32 elements at p into the low lanes, zeros above (n <= 0: none, and p is not read). 32 are a
 * plain load: on the AMD EPYC, masked loads that miss the cache made a decode step's expand (two rows
 * of B^T read side by side) 1.7x slower. */
static inline __m512i load_flat_bf16(const bf16 *p, int64_t n) {
    return n >= 32 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16(lanes_mask(n), p);
}

/* n <= 32 elements of one row (walking `c` across pages) into the low lanes, zeros above. */
static inline __m512i load_row_bf16(cursor *c, int64_t n) {
    const bf16 *p = CURSOR_PTR(bf16, *c);
    if (c->left >= n) {
        const __m512i v = load_flat_bf16(p, n);
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

/* Long segments: a segment of many tokens is a small matrix product: shrink s (n x sum r) = x (n x in)
 * A^T, expand y (n x out) += scale * v (n x width) B^T. Its tokens go 16 to a block, and the adapter's
 * weights are read once per segment from the pages and packed into a "panel" in the layout that the
 * products take for their second operand (row q holds, for each of 16 columns, the pair of reduction
 * indices 2q, 2q + 1). Packing is the gather out of the pages; the operand rows of x are read in place
 * when they are 16 consecutive rows, and copied into a zero-padded block otherwise. The product runs on
 * AMX tiles (tdpbf16ps: a 16 x 32 bf16 tile times a 32 x 16 one into 16 x 16 float32 accumulators)
 * where the CPU and the process have them, and in AVX512-BF16 registers elsewhere (vdpbf16ps on a
 * panel row against a broadcast pair of x). Accumulation is float32, each result is rounded once, as
 * in the dot-product path: only the order of the sums differs. */

#define TILE_ROWS 16 /* tokens per tile; also float32 columns per accumulator tile */
#define TILE_K 32    /* bf16 elements of the reduction per tile product */

/* Short segments whose A_g lies in one piece (a decode step's): `rows` rows of A_g (w, in_dim apart)
 * against `nt` tokens' x, each 32-element piece of a row loaded once for every token, into
 * ss[t][j .. j + rows). Always inlined with constant rows and nt, so the rows x nt sums stay in
 * registers: with two tokens of one adapter in a step, a loop over the tokens read A_g twice, the
 * second time from L2 (bench/kernels.py --decode-tokens 2). */
static inline __attribute__((always_inline)) void dot_rows(const bf16 *w, int64_t in_dim, const bf16 *const *xs,
                                                           bf16 *const *ss, int64_t j, const int nt, const int rows) {
    __m512 acc[4][4];
    for (int t = 0; t < nt; t++)
        for (int q = 0; q < rows; q++) acc[t][q] = _mm512_setzero_ps();
    for (int64_t col = 0; col < in_dim; col += 32) {
        __m512bh xv[4];
        for (int t = 0; t < nt; t++) xv[t] = (__m512bh)load_flat_bf16(xs[t] + col, in_dim - col);
        for (int q = 0; q < rows; q++) {
            /* the same line four rows on (past A_g, the next target's A or B, read next; a prefetch never
             * faults): 5.1 -> 4.0 ms at 1 thread, 2.9 -> 2.4 at 2 */
            __builtin_prefetch(w + (q + 4) * in_dim + col, 0, 3);
            const __m512bh wq = (__m512bh)load_flat_bf16(w + q * in_dim + col, in_dim - col);
            for (int t = 0; t < nt; t++) acc[t][q] = _mm512_dpbf16_ps(acc[t][q], xv[t], wq);
        }
    }
    for (int t = 0; t < nt; t++)
        for (int q = 0; q < rows; q++) store_bf16(ss[t] + j + q, _mm512_reduce_add_ps(acc[t][q]));
}

/* All r rows of A_g at `a` for nt (1-4) tokens: four rows at a time, then one at a time. */
static inline __attribute__((always_inline)) void shrink_flat(const bf16 *a, int64_t r, int64_t in_dim,
                                                              const bf16 *const *xs, bf16 *const *ss, const int nt) {
    int64_t j = 0;
    for (; j + 4 <= r; j += 4) dot_rows(a + j * in_dim, in_dim, xs, ss, j, nt, 4);
    for (; j < r; j++) dot_rows(a + j * in_dim, in_dim, xs, ss, j, nt, 1);
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && !defined(LORAFLEET_NO_AMX)
#define LORAFLEET_AMX 1
#include <sys/syscall.h>
#include <unistd.h>

static int amx_ready; /* Linux hands the tile registers to a process that asks (lorafleet_amx_init) */

int lorafleet_amx_init(void) {
    if (!amx_ready) amx_ready = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return amx_ready;
}

/* Every tile register is 16 rows of 64 bytes. Tiles 0-3 accumulate, 4 holds x or v, 5-7 the panel. */
static void tiles_begin(void) {
    struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int i = 0; i < 8; i++) {
        config.colsb[i] = 64;
        config.rows[i] = TILE_ROWS;
    }
    _tile_loadconfig(&config);
}

/* panel_product (below) on AMX tiles, for all 16 rows. */
static void tile_product(const bf16 *a, int64_t a_stride, int64_t k_blocks, const uint32_t *panel,
                         int64_t panel_stride, int nb, float *out, int64_t out_stride) {
    const int64_t pb = panel_stride * 4, ob = out_stride * 4;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t kb = 0; kb < k_blocks; kb++) {
        const uint32_t *p = panel + kb * (TILE_K / 2) * panel_stride;
        _tile_loadd(4, a + kb * TILE_K, a_stride);
        _tile_loadd(5, p, pb);
        _tile_dpbf16ps(0, 4, 5);
        if (nb > 1) {
            _tile_loadd(6, p + 16, pb);
            _tile_dpbf16ps(1, 4, 6);
        }
        if (nb > 2) {
            _tile_loadd(7, p + 32, pb);
            _tile_dpbf16ps(2, 4, 7);
        }
        if (nb > 3) {
            _tile_loadd(5, p + 48, pb);
            _tile_dpbf16ps(3, 4, 5);
        }
    }
    _tile_stored(0, out, ob);
    if (nb > 1) _tile_stored(1, out + 16, ob);
    if (nb > 2) _tile_stored(2, out + 32, ob);
    if (nb > 3) _tile_stored(3, out + 48, ob);
}

#else
#define LORAFLEET_AMX 0
#define amx_ready 0
int lorafleet_amx_init(void) { return 0; }
#endif

/* Rows i < 4 of the product below for nb column blocks: 16 float32 accumulators; each panel vector loaded
 * feeds four rows' vdpbf16ps, each broadcast pair of a feeds nb of them. */
static inline __attribute__((always_inline)) void rows4_product(const char *a, int64_t a_stride, int64_t pairs,
                                                                const uint32_t *panel, int64_t panel_stride,
                                                                const int nb, float *out, int64_t out_stride) {
    __m512 acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int b = 0; b < nb; b++) acc[i][b] = _mm512_setzero_ps();
    for (int64_t q = 0; q < pairs; q++) {
        const uint32_t *p = panel + q * panel_stride;
        __m512bh w[4];
        for (int b = 0; b < nb; b++) w[b] = (__m512bh)_mm512_loadu_si512(p + 16 * b);
        for (int i = 0; i < 4; i++) {
            int32_t pair;
            memcpy(&pair, a + i * a_stride + 4 * q, sizeof pair);
            const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
            for (int b = 0; b < nb; b++) acc[i][b] = _mm512_dpbf16_ps(acc[i][b], w[b], x);
        }
    }
    for (int i = 0; i < 4; i++)
        for (int b = 0; b < nb; b++) _mm512_storeu_ps(out + i * out_stride + 16 * b, acc[i][b]);
}

/* out[i][c] = sum_k a[i][k] * B[k][c] for rows i < 16, columns c < 16 nb (nb <= 4) and k < depth: a is bf16
 * with rows a_stride bytes apart, zero from depth to a multiple of 32; B is the panel (rows of
 * panel_stride uint32, row q holding the pairs (B[2q][c], B[2q+1][c]), zero rows past depth); out is
 * float32 with rows out_stride floats apart. On AMX tiles when `tiles` (the caller configured them),
 * 32 of k at a time; in registers otherwise, a pair of k at a time, and then only the first `rows`
 * rows (rounded up to 4) are computed. */
static void panel_product(int tiles, const bf16 *a, int64_t a_stride, int64_t rows, int64_t depth,
                          const uint32_t *panel, int64_t panel_stride, int nb, float *out, int64_t out_stride) {
#if LORAFLEET_AMX
    if (tiles) {
        tile_product(a, a_stride, round_up(depth, TILE_K) / TILE_K, panel, panel_stride, nb, out, out_stride);
        return;
    }
#endif
    (void)tiles;
    const int64_t pairs = (depth + 1) / 2;
    for (int64_t i = 0; i < rows; i += 4) {
        const char *ai = (const char *)a + i * a_stride;
        float *oi = out + i * out_stride;
        switch (nb) { /* constant block counts: the accumulators stay in registers */
        case 1: rows4_product(ai, a_stride, pairs, panel, panel_stride, 1, oi, out_stride); break;
        case 2: rows4_product(ai, a_stride, pairs, panel, panel_stride, 2, oi, out_stride); break;
        case 3: rows4_product(ai, a_stride, pairs, panel, panel_stride, 3, oi, out_stride); break;
        default: rows4_product(ai, a_stride, pairs, panel, panel_stride, 4, oi, out_stride); break;
        }
    }
}

/* Brackets a segment's products: AMX tiles are configured for the thread, and released after. */
static inline void products_begin(int tiles) {
#if LORAFLEET_AMX
    if (tiles) tiles_begin();
#endif
    (void)tiles;
}

static inline void products_end(int tiles) {
#if LORAFLEET_AMX
    if (tiles) _tile_release();
#endif
    (void)tiles;
}

/* The 16 x 16 matrix of 32-bit elements in r[0..16) (row i in r[i]) transposed in place. */
static inline void transpose_16x16_epi32(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) { /* pairs of rows interleaved: 2 x 2 blocks */
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) { /* 4 x 4 blocks within each 128-bit lane */
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    /* r[4 b + j] now holds, in lane l, column 4 l + j of rows 4 b .. 4 b + 3: move the lanes */
    for (int j = 0; j < 4; j++) {
        const __m512i v0 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88), v1 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xdd);
        const __m512i v2 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88), v3 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xdd);
        t[j] = _mm512_shuffle_i32x4(v0, v2, 0x88);
        t[8 + j] = _mm512_shuffle_i32x4(v0, v2, 0xdd);
        t[4 + j] = _mm512_shuffle_i32x4(v1, v3, 0x88);
        t[12 + j] = _mm512_shuffle_i32x4(v1, v3, 0xdd);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* The shrink of one segment: n tokens (rows[0..n) of x) through every target of adapter a's group. */
static void shrink_segment_panel(int tiles, const bf16 *x, int64_t x_stride, int64_t in_dim, const bf16 *pool,
                                 int64_t page_dim, const int64_t *table, int64_t max_pages, const int64_t *rows,
                                 int64_t n, const int64_t *a_offset, const int64_t *rank, int64_t num_targets, bf16 *s,
                                 int64_t max_rank) {
    int64_t cols = 0; /* the product's columns: the targets' ranks side by side */
    for (int64_t g = 0; g < num_targets; g++) cols += rank[g] > 0 ? rank[g] : 0;
    const int64_t k_pad = round_up(in_dim, TILE_K), c_pad = round_up(cols, TILE_ROWS);
    /* The panel is A_cat^T in pairs, A_cat being the targets' A rows side by side: row q, column c holds
     * (A_cat[c][2q], A_cat[c][2q + 1]). Sixteen rows are walked out of the pages at once, 32 elements each,
     * and transposed as a 16 x 16 block of 32-bit pairs; rows past `cols` and columns past in_dim are zeros. */
    uint32_t *panel = scratch(SCRATCH_PANEL, sizeof(uint32_t) * (k_pad / 2) * c_pad);
    for (int64_t c0 = 0, g = 0, j = 0; c0 < c_pad; c0 += 16) {
        cursor row[16];
        int live = 0;
        for (; live < 16 && c0 + live < cols; live++, j++) { /* column c0 + live is row j of A_g */
            while (j >= rank[g]) {
                g++;
                j = 0;
            }
            row[live] = cursor_at(pool, sizeof(bf16), table, max_pages, page_dim, a_offset[g] + j * in_dim);
        }
        for (int64_t col = 0; col < k_pad; col += TILE_K) {
            const int64_t len = in_dim - col < TILE_K ? in_dim - col : TILE_K;
            __m512i block[16];
            for (int i = 0; i < 16; i++) block[i] = i < live && len > 0 ? load_row_bf16(&row[i], len) : _mm512_setzero_si512();
            transpose_16x16_epi32(block);
            for (int q = 0; q < 16; q++) _mm512_store_si512(panel + (col / 2 + q) * c_pad + c0, block[q]);
        }
    }
    bf16 *block = scratch(SCRATCH_GATHER, sizeof(bf16) * TILE_ROWS * k_pad);
    float *acc = scratch(SCRATCH_ACC, sizeof(float) * TILE_ROWS * c_pad);
    for (int64_t i0 = 0; i0 < n; i0 += TILE_ROWS) {
        const int64_t m = n - i0 < TILE_ROWS ? n - i0 : TILE_ROWS;
        int consecutive = m == TILE_ROWS && in_dim == k_pad;
        for (int64_t i = 1; consecutive && i < m; i++) consecutive = rows[i0 + i] == rows[i0] + i;
        const bf16 *a = x + rows[i0] * x_stride;
        int64_t a_stride = x_stride * (int64_t)sizeof(bf16);
        if (!consecutive) { /* the block's rows of x, zero-padded to 16 x k_pad */
            memset(block, 0, sizeof(bf16) * TILE_ROWS * k_pad);
            for (int64_t i = 0; i < m; i++) memcpy(block + i * k_pad, x + rows[i0 + i] * x_stride, sizeof(bf16) * in_dim);
            a = block;
            a_stride = k_pad * (int64_t)sizeof(bf16);
        }
        for (int64_t b = 0; b < c_pad / TILE_ROWS; b += 4) {
            const int64_t nb = c_pad / TILE_ROWS - b < 4 ? c_pad / TILE_ROWS - b : 4;
            panel_product(tiles, a, a_stride, m, in_dim, panel + b * TILE_ROWS, c_pad, (int)nb, acc + b * TILE_ROWS, c_pad);
        }
        for (int64_t i = 0; i < m; i++) /* row i of the product, target by target, into s[t, g, :r] */
            for (int64_t g = 0, c = 0; g < num_targets; g++) {
                if (rank[g] <= 0) continue;
                bf16 *st = s + (rows[i0 + i] * num_targets + g) * max_rank;
                for (int64_t j = 0; j < rank[g]; j += 16) {
                    const __mmask16 mask = lanes_mask16(rank[g] - j);
                    const __m256bh v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, acc + i * c_pad + c + j));
                    _mm256_mask_storeu_epi16(st + j, mask, (__m256i)v);
                }
                c += rank[g];
            }
    }
}

/* The expand of one segment for one target: y[rows, :out] += scale * v B^T, v the segment's shrink outputs
 * (the shards side by side), B^T (width x out) read from the pages. */
static void expand_segment_panel(int tiles, bf16 *y, int64_t y_stride, int64_t out, const bf16 *s, int64_t s_row,
                                 int64_t max_rank, int64_t shards, cursor cur, const int64_t *rows, int64_t n,
                                 int64_t r, float scale) {
    const int64_t width = shards * r, w_pad = round_up(width, TILE_K), o_pad = round_up(out, 32);
    uint32_t *panel = scratch(SCRATCH_PANEL, sizeof(uint32_t) * (w_pad / 2) * o_pad);
    memset(panel + (width + 1) / 2 * o_pad, 0, sizeof(uint32_t) * (w_pad / 2 - (width + 1) / 2) * o_pad);
    /* panel row c / 2 interleaves rows c and c + 1 of B^T: word 2o is row c's output o, word 2o + 1 row c + 1's */
    int16_t lo_idx[32], hi_idx[32];
    for (int o = 0; o < 16; o++) {
        lo_idx[2 * o] = (int16_t)o;
        lo_idx[2 * o + 1] = (int16_t)(32 + o);
        hi_idx[2 * o] = (int16_t)(16 + o);
        hi_idx[2 * o + 1] = (int16_t)(48 + o);
    }
    const __m512i lo = _mm512_loadu_si512(lo_idx), hi = _mm512_loadu_si512(hi_idx);
    for (int64_t c = 0; c < width; c += 2) {
        cursor next = cur; /* row c + 1 starts where row c ends */
        cursor_skip(&next, out);
        uint32_t *row = panel + (c / 2) * o_pad;
        for (int64_t o = 0; o < out; o += 32) {
            const int64_t len = out - o < 32 ? out - o : 32;
            const __m512i w0 = load_row_bf16(&cur, len);
            const __m512i w1 = c + 1 < width ? load_row_bf16(&next, len) : _mm512_setzero_si512();
            _mm512_store_si512(row + o, _mm512_permutex2var_epi16(w0, lo, w1));
            _mm512_store_si512(row + o + 16, _mm512_permutex2var_epi16(w0, hi, w1));
        }
        cur = next;
    }
    bf16 *v = scratch(SCRATCH_GATHER, sizeof(bf16) * TILE_ROWS * w_pad);
    float *acc = scratch(SCRATCH_ACC, sizeof(float) * TILE_ROWS * 64);
    const __m512 sc = _mm512_set1_ps(scale);
    const int64_t col_blocks = (out + 15) / 16;
    for (int64_t i0 = 0; i0 < n; i0 += TILE_ROWS) {
        const int64_t m = n - i0 < TILE_ROWS ? n - i0 : TILE_ROWS;
        memset(v, 0, sizeof(bf16) * TILE_ROWS * w_pad);
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < shards; j++)
                memcpy(v + i * w_pad + j * r, s + rows[i0 + i] * s_row + j * max_rank, sizeof(bf16) * r);
        for (int64_t b = 0; b < col_blocks; b += 4) { /* 64 outputs of 16 tokens, then into y */
            const int64_t nb = col_blocks - b < 4 ? col_blocks - b : 4, cols = out - b * 16 < 64 ? out - b * 16 : 64;
            panel_product(tiles, v, w_pad * (int64_t)sizeof(bf16), m, width, panel + b * 16, o_pad, (int)nb, acc, 64);
            for (int64_t i = 0; i < m; i++) { /* y = round(y + scale * delta), 32 outputs at a time */
                bf16 *yt = y + rows[i0 + i] * y_stride + b * 16;
                const float *d = acc + i * 64;
                for (int64_t q = 0; q < cols; q += 32) {
                    const __mmask32 mask = lanes_mask(cols - q);
                    const __m512i yv = _mm512_maskz_loadu_epi16(mask, yt + q);
                    const __m512 lo = _mm512_fmadd_ps(_mm512_load_ps(d + q), sc, widen16_bf16(_mm512_castsi512_si256(yv)));
                    const __m512 hi = _mm512_fmadd_ps(_mm512_load_ps(d + q + 16), sc, widen16_bf16(_mm512_extracti64x4_epi64(yv, 1)));
                    _mm512_mask_storeu_epi16(yt + q, mask, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
                }
            }
        }
    }
}
void lora_shrink_bf16(
    const bf16 *x, int64_t x_stride, int64_t in_dim,
    const bf16 *pool, int64_t page_dim, const int64_t *page_table, int64_t max_pages,
    const int64_t *order, const int64_t *seg_start, const int64_t *seg_adapter, int64_t num_segs,
    const int64_t *a_offset, const int64_t *rank, int64_t num_targets,
    bf16 *s, int64_t max_rank, int64_t tile_tokens, int64_t threads)
{
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(threads) if(threads > 1 && num_segs > 1)")
    for (int64_t k = 0; k < num_segs; k++) {
        const int64_t a = seg_adapter[k], first = seg_start[k], n = seg_start[k + 1] - first;
        if (n >= tile_tokens) {
            const int tiles = LORAFLEET_AMX && amx_ready;
            products_begin(tiles);
            shrink_segment_panel(tiles, x, x_stride, in_dim, pool, page_dim, page_table + a * max_pages, max_pages,
                                 order + first, n, a_offset + a * num_targets, rank + a * num_targets, num_targets, s,
                                 max_rank);
            products_end(tiles);
            continue;
        }
        for (int64_t g = 0; g < num_targets; g++) {
            const int64_t r = rank[a * num_targets + g];
            if (r <= 0) continue;
            const bf16 *flat = flat_span(pool, sizeof(bf16), page_table + a * max_pages, max_pages, page_dim,
                                         a_offset[a * num_targets + g], r * in_dim);
            if (flat) { /* A_g in one piece: each piece of its rows read once for up to four tokens */
                for (int64_t i0 = 0; i0 < n; i0 += 4) {
                    const int nt = n - i0 < 4 ? (int)(n - i0) : 4;
                    const bf16 *xs[4];
                    bf16 *ss[4];
                    for (int t = 0; t < nt; t++) {
                        xs[t] = x + order[first + i0 + t] * x_stride;
                        ss[t] = s + (order[first + i0 + t] * num_targets + g) * max_rank;
                    }
                    switch (nt) { /* constant token counts: the sums stay in registers */
                    case 1: shrink_flat(flat, r, in_dim, xs, ss, 1); break;
                    case 2: shrink_flat(flat, r, in_dim, xs, ss, 2); break;
                    case 3: shrink_flat(flat, r, in_dim, xs, ss, 3); break;
                    default: shrink_flat(flat, r, in_dim, xs, ss, 4);
                    }
                }
                continue;
            }
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

/* Asks for every cache line of [p, p + bytes) (nothing for a NULL p; a prefetch never faults). */
static inline void prefetch_span(const void *p, int64_t bytes) {
    if (!p) return;
    for (int64_t at = 0; at < bytes; at += 64) __builtin_prefetch((const char *)p + at, 0, 3);
}

/* nt (1 or 2) tokens' expand over nb blocks of 32 outputs from block b0 on (blocks past `out` read
 * nothing), B^T (width x out) at one address; token t's (v[c], v[c+1]) pairs at v + t * pairs. The
 * 2 x nt x nb accumulators stay in registers across every row pair (always inlined with constant nt and
 * nb: 1 x 6 or 2 x 3), and go to acc (token t's interleaved sums at acc + t * blocks * 32, as the loop
 * below keeps them) at the end. Two tokens of one adapter share each load of B^T; the loop with its sums
 * in memory took 2.2-2.6x as long for two tokens as this one for one (bench/kernels.py --from-memory
 * --decode-tokens 2 and 1). */
#define ONE_TOKEN_BLOCKS 6
static inline __attribute__((always_inline)) void expand_tokens(const bf16 *bt, int64_t width, int64_t out,
                                                                const uint32_t *v, int64_t pairs, int64_t b0,
                                                                int64_t blocks, float *acc, const int nt, const int nb) {
    __m512 lo_acc[2][ONE_TOKEN_BLOCKS], hi_acc[2][ONE_TOKEN_BLOCKS];
    for (int t = 0; t < nt; t++)
        for (int b = 0; b < nb; b++) lo_acc[t][b] = hi_acc[t][b] = _mm512_setzero_ps();
    for (int64_t c = 0; c < width; c += 2) {
        __m512bh vv[2];
        for (int t = 0; t < nt; t++) vv[t] = (__m512bh)_mm512_set1_epi32((int32_t)v[t * pairs + c / 2]);
        const bf16 *r0 = bt + c * out, *r1 = r0 + out;
        for (int b = 0; b < nb; b++) {
            const int64_t o = (b0 + b) * 32, len = out - o, len1 = c + 1 < width ? len : 0;
            const __m512i w0 = load_flat_bf16(r0 + o, len), w1 = load_flat_bf16(r1 + o, len1);
            const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(w0, w1), hi = (__m512bh)_mm512_unpackhi_epi16(w0, w1);
            for (int t = 0; t < nt; t++) {
                lo_acc[t][b] = _mm512_dpbf16_ps(lo_acc[t][b], lo, vv[t]);
                hi_acc[t][b] = _mm512_dpbf16_ps(hi_acc[t][b], hi, vv[t]);
            }
        }
    }
    for (int t = 0; t < nt; t++)
        for (int b = 0; b < nb && (b0 + b) * 32 < out; b++) {
            _mm512_store_ps(acc + (t * blocks + b0 + b) * 32, lo_acc[t][b]);
            _mm512_store_ps(acc + (t * blocks + b0 + b) * 32 + 16, hi_acc[t][b]);
        }
}

/* The next segment for the calling thread (segments past the last mean: none left). */
static inline int64_t claim(int64_t *claimed) { return __atomic_fetch_add(claimed, 1, __ATOMIC_RELAXED); }

/* Tokens per pass over B_g^T in the expand: their float32 accumulators (16 x out) stay in L2. */
#define EXPAND_TOKENS 16

void lora_expand_bf16(
    bf16 *y, int64_t y_stride, const int64_t *out_offset, const int64_t *out_dim,
    const bf16 *s, int64_t max_rank, int64_t shards,
    const bf16 *pool, int64_t page_dim, const int64_t *page_table, int64_t max_pages,
    const int64_t *order, const int64_t *seg_start, const int64_t *seg_adapter, int64_t num_segs,
    const int64_t *b_offset, const int64_t *rank, const float *scale, int64_t num_targets, int64_t tile_tokens,
    int64_t threads)
{
    /* lane l of the first/second half of an un-permuted 32-block comes from this lane of lo|hi */
    int32_t first_idx[16], second_idx[16];
    for (int o = 0; o < 32; o++) {
        const int from = (o % 8 < 4 ? 0 : 16) + (o / 8) * 4 + o % 4;
        if (o < 16) first_idx[o] = from; else second_idx[o - 16] = from;
    }
    const __m512i idx0 = _mm512_loadu_si512(first_idx), idx1 = _mm512_loadu_si512(second_idx);
    int64_t claimed = 0; /* segments handed out in order, one to each thread that asks: a dynamic schedule */
    _Pragma("omp parallel num_threads(threads) if(threads > 1 && num_segs > 1)")
    for (int64_t k = claim(&claimed), k_next; k < num_segs; k = k_next) {
        k_next = claim(&claimed); /* this thread's next segment, claimed before it starts k: it prefetches for it */
        const int64_t a = seg_adapter[k], first = seg_start[k], n_all = seg_start[k + 1] - first;
        if (n_all >= tile_tokens) {
            const int tiles = LORAFLEET_AMX && amx_ready;
            products_begin(tiles);
            for (int64_t g = 0; g < num_targets; g++) {
                const int64_t r = rank[a * num_targets + g];
                if (r <= 0) continue;
                const cursor cur = cursor_at(pool, sizeof(bf16), page_table + a * max_pages, max_pages, page_dim,
                                             b_offset[a * num_targets + g]);
                expand_segment_panel(tiles, y + out_offset[g], y_stride, out_dim[g], s + g * shards * max_rank,
                                     num_targets * shards * max_rank, max_rank, shards, cur, order + first, n_all, r,
                                     scale[a * num_targets + g]);
            }
            products_end(tiles);
            continue;
        }
        for (int64_t g = 0; g < num_targets; g++) {
            const int64_t r = rank[a * num_targets + g];
            if (r <= 0) continue;
            const int64_t width = shards * r, pairs = (width + 1) / 2, out = out_dim[g], blocks = (out + 31) / 32;
            const __m512 sc = _mm512_set1_ps(scale[a * num_targets + g]);
            /* the thread's kept buffers: a malloc and free per segment and target cost about a sixth of a decode step's expand */
            uint32_t *v = scratch(SCRATCH_GATHER, sizeof(uint32_t) * EXPAND_TOKENS * pairs); /* (v[c], v[c+1]) per token */
            float *acc = scratch(SCRATCH_ACC, sizeof(float) * EXPAND_TOKENS * blocks * 32);
            /* B_g^T in one piece (the adapter's pages in a run): plain loads; else a walk page by page */
            const bf16 *flat = flat_span(pool, sizeof(bf16), page_table + a * max_pages, max_pages, page_dim,
                                         b_offset[a * num_targets + g], width * out);
            for (int64_t i0 = 0; i0 < n_all; i0 += EXPAND_TOKENS) {
                const int64_t n = n_all - i0 < EXPAND_TOKENS ? n_all - i0 : EXPAND_TOKENS;
                for (int64_t i = 0; i < n; i++) {
                    const bf16 *st = s + (order[first + i0 + i] * num_targets + g) * shards * max_rank;
                    bf16 *vi = (bf16 *)(v + i * pairs);
                    for (int64_t j = 0; j < shards; j++)
                        for (int64_t c = 0; c < r; c++) vi[j * r + c] = st[j * max_rank + c];
                    if (width % 2) vi[width] = 0;
                }
                if (flat) { /* one or two tokens at a time: their sums stay in registers, and overwrite acc */
                    /* ask now for all of the B^T expanded next: this adapter's next target, or the first of
                     * this thread's next segment. A decode step reads too little of a target for the hardware
                     * prefetcher to get going (bench/kernels.py --from-memory): 3.3 -> 2.5 ms at 1 thread; at
                     * 2, across segments (each thread's next one claimed ahead), 2.01 -> 1.69 ms */
                    int64_t a2 = a, g2 = g + 1;
                    if (g2 == num_targets && k_next < num_segs) {
                        a2 = seg_adapter[k_next];
                        g2 = 0;
                    }
                    const int64_t r2 = g2 < num_targets ? rank[a2 * num_targets + g2] : 0;
                    if (r2 > 0) {
                        const int64_t elems = shards * r2 * out_dim[g2];
                        prefetch_span(flat_span(pool, sizeof(bf16), page_table + a2 * max_pages, max_pages, page_dim,
                                                b_offset[a2 * num_targets + g2], elems), elems * sizeof(bf16));
                    }
                    int64_t t0 = 0;
                    for (; t0 + 2 <= n; t0 += 2)
                        for (int64_t b0 = 0; b0 < blocks; b0 += ONE_TOKEN_BLOCKS / 2)
                            expand_tokens(flat, width, out, v + t0 * pairs, pairs, b0, blocks, acc + t0 * blocks * 32, 2,
                                          ONE_TOKEN_BLOCKS / 2);
                    if (t0 < n)
                        for (int64_t b0 = 0; b0 < blocks; b0 += ONE_TOKEN_BLOCKS)
                            expand_tokens(flat, width, out, v + t0 * pairs, pairs, b0, blocks, acc + t0 * blocks * 32, 1,
                                          ONE_TOKEN_BLOCKS);
                } else { /* B_g^T across pages: walked row by row, the tokens' sums in acc */
                    for (int64_t e = 0; e < n * blocks * 32; e += 16) _mm512_store_ps(acc + e, _mm512_setzero_ps());
                    cursor cur = cursor_at(pool, sizeof(bf16), page_table + a * max_pages, max_pages, page_dim,
                                           b_offset[a * num_targets + g]);
                    for (int64_t c = 0; c < width; c += 2) {
                        cursor next = cur; /* row c + 1 starts where row c ends */
                        cursor_skip(&next, out);
                        for (int64_t b = 0; b < blocks; b++) {
                            const int64_t len = out - b * 32 < 32 ? out - b * 32 : 32, len1 = c + 1 < width ? len : 0;
                            const __m512i w0 = load_row_bf16(&cur, len);
                            const __m512i w1 = len1 ? load_row_bf16(&next, len) : _mm512_setzero_si512();
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
                }
                for (int64_t i = 0; i < n; i++) {
                    bf16 *yt = y + order[first + i0 + i] * y_stride + out_offset[g];
                    for (int64_t b = 0; b < blocks; b++) {
                        const float *d = acc + (i * blocks + b) * 32;
                        const __m512 lo = _mm512_load_ps(d), hi = _mm512_load_ps(d + 16);
                        const int64_t len = out - b * 32 < 32 ? out - b * 32 : 32;
                        const __mmask32 mask = lanes_mask(len);
                        const __m512i yb = _mm512_maskz_loadu_epi16(mask, yt + b * 32);
                        const __m512 y0 = widen16_bf16(_mm512_castsi512_si256(yb));
                        const __m512 y1 = widen16_bf16(_mm512_extracti64x4_epi64(yb, 1));
                        const __m512 r0 = _mm512_fmadd_ps(_mm512_permutex2var_ps(lo, idx0, hi), sc, y0);
                        const __m512 r1 = _mm512_fmadd_ps(_mm512_permutex2var_ps(lo, idx1, hi), sc, y1);
                        _mm512_mask_storeu_epi16(yt + b * 32, mask, (__m512i)_mm512_cvtne2ps_pbh(r1, r0));
                    }
                }
            }
        }
    }
}
#else
DEFINE_BLOCKED(bf16, bf16)
DEFINE_LORA(bf16, bf16)
int lorafleet_amx_init(void) { return 0; }
#endif

/* Shrink, then expand, in one call: a group whose shrink output needs no collective before its expand
 * (tensor parallelism 1; kernels/lora.py's lora_apply). Two ctypes calls of ~20 arguments each cost Python
 * several microseconds per group and layer, next to kernels of 20-70 us in a decode step, so the step's
 * fixed arguments come packed in m (kernels/cpu.py's GroupArgs.apply_meta, built once per step and group):
 * m[0] tokens, in_dim, page_dim, page_table, max_pages, order, seg_start, seg_adapter, num_segs, a_offset,
 * b_offset, rank, scale, num_targets, max_rank, out_offset, out_dim, m[17] tile_tokens (pointers as int64).
 * s (tokens x num_targets x max_rank) is the calling thread's scratch, zeroed as lora_shrink's caller
 * zeroes it. The results are those of the two ops called one after the other. */
#define P(type, i) ((type)(intptr_t)m[i])
#define DEFINE_APPLY(T, SUFFIX)                                                                                  \
void lora_apply_##SUFFIX(const int64_t *m, T *y, int64_t y_stride, const T *x, int64_t x_stride, const T *pool,  \
                         int64_t threads) {                                                                      \
    const size_t s_bytes = sizeof(T) * (size_t)(m[0] * m[13] * m[14]);                                          \
    T *s = scratch(SCRATCH_APPLY, s_bytes);                                                                      \
    memset(s, 0, s_bytes);                                                                                       \
    lora_shrink_##SUFFIX(x, x_stride, m[1], pool, m[2], P(const int64_t *, 3), m[4], P(const int64_t *, 5),      \
                         P(const int64_t *, 6), P(const int64_t *, 7), m[8], P(const int64_t *, 9),              \
                         P(const int64_t *, 11), m[13], s, m[14], m[17], threads);                               \
    lora_expand_##SUFFIX(y, y_stride, P(const int64_t *, 15), P(const int64_t *, 16), s, m[14], 1, pool, m[2],   \
                         P(const int64_t *, 3), m[4], P(const int64_t *, 5), P(const int64_t *, 6),              \
                         P(const int64_t *, 7), m[8], P(const int64_t *, 10), P(const int64_t *, 11),            \
                         P(const float *, 12), m[13], m[17], threads);                                           \
}
DEFINE_APPLY(float, f32)
DEFINE_APPLY(f16, f16)
DEFINE_APPLY(bf16, bf16)
#undef P

/* 1 when the bfloat16 kernels above use native dot products (kernels/cpu.py asks, the tests check). */
int lorafleet_native_bf16(void) { return LORAFLEET_NATIVE_BF16; }
