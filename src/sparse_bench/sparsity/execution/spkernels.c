/* Sparse x dense kernels for sparse_bench's sparse layers: plain C with GCC/Clang vector
 * extensions and no torch headers, compiled on first use (see sparse_bench/sparse/kernels.py).
 *
 * Layout: activations are feature-major ("transposed"): X^T is (features, B) row-major, so the
 * batch of one feature is one contiguous row of B floats. A sparse weight W (rows x cols) is
 * CSR: indptr[rows + 1] (int64), indices[nnz] (int32 column ids), values[nnz] (float32).
 *
 *   sb_spmm:  Y^T[i, :] = bias[i] + sum_k values[k] * X^T[indices[k], :]   (AXPYs of length B).
 *             The input gradient is the same kernel on the transposed structure (CSR of W^T).
 *   sb_sddmm: out[k] = sum_b DY^T[i, b] * X^T[indices[k], b]               (dot products of
 *             length B): the gradient of the active weights, and of nothing else.
 *
 * Both take nb batches of such matrices at a fixed stride: a Linear passes nb = 1 (B = batch
 * size), a Conv2d one per sample with B = its output positions, so unfolded patches
 * (N, C_in*kh*kw, L) and outputs (N, C_out, L) are used in place, without a transpose.
 *
 * The batch is cut into column tiles of NV vectors of VL floats (NV = 8, then 4, 2, 1 for the
 * rest, then a scalar tail). Within a tile one row's NV accumulators (spmm) or its NV vectors
 * of DY^T (sddmm) stay in registers while the row's nonzeros stream past, and the tile of X^T
 * (cols x tile floats) stays in cache across the rows. Rows are split over OpenMP threads when
 * the file is compiled with -fopenmp (each row is written by one thread only).
 */
#include <stdint.h>
#include <string.h>

/* The build's key (a hash of this file, the flags, the compiler and the CPU), given at compile time:
 * the loader checks it, so a foreign or stale library under the cache's name is never used. */
#ifndef SB_KEY
#define SB_KEY "unkeyed"
#endif
const char *sb_key(void) { return SB_KEY; }

/* floats per vector: one register of the target (AVX-512: 16; AVX2 and narrower: 8, so a tile's
 * eight accumulators stay in the 16 ymm registers instead of spilling as 16-float pairs) */
#if defined(__AVX512F__)
#define VL 16
#else
#define VL 8
#endif

typedef float vf __attribute__((vector_size(VL * sizeof(float))));

static inline vf loadu(const float *p) {
    vf v;
    memcpy(&v, p, sizeof(v));
    return v;
}

static inline void storeu(float *p, vf v) { memcpy(p, &v, sizeof(v)); }

static inline float hsum(vf v) {
    float s = 0.0f;
    for (int t = 0; t < VL; t++) s += v[t];
    return s;
}

/* spmm over one tile of NV vectors for one row (its cnt nonzeros' column ids and values; xt the
 * tile's first column, rows ld apart); sddmm over one tile for row i. The loops over `v` have a
 * constant trip count, so the compiler keeps acc[] / d[] in registers. */
#define DEFINE_TILE(NV)                                                                          \
    static inline void spmm_tile##NV(const int32_t *ind, const float *val, int64_t cnt,           \
                                     const float *xt, int64_t ld, float init, float *out) {      \
        vf acc[NV];                                                                              \
        for (int v = 0; v < NV; v++) acc[v] = (vf){0} + init;                                    \
        for (int64_t k = 0; k < cnt; k++) {                                                      \
            const vf w = (vf){0} + val[k];                                                       \
            const float *x = xt + (int64_t)ind[k] * ld;                                          \
            for (int v = 0; v < NV; v++) acc[v] += w * loadu(x + v * VL);                        \
        }                                                                                        \
        for (int v = 0; v < NV; v++) storeu(out + v * VL, acc[v]);                               \
    }                                                                                            \
    static inline void sddmm_tile##NV(const int64_t *indptr, const int32_t *indices,             \
                                      const float *dyt, const float *xt, int64_t B, int64_t i,   \
                                      int64_t b0, float *out) {                                  \
        vf d[NV];                                                                                \
        for (int v = 0; v < NV; v++) d[v] = loadu(dyt + i * B + b0 + v * VL);                    \
        const int64_t end = indptr[i + 1];                                                       \
        for (int64_t k = indptr[i]; k < end; k++) {                                              \
            const float *x = xt + (int64_t)indices[k] * B + b0;                                  \
            vf s0 = d[0] * loadu(x), s1 = (vf){0};                                               \
            for (int v = 1; v < NV; v++) {                                                       \
                if (v & 1) s1 += d[v] * loadu(x + v * VL);                                       \
                else s0 += d[v] * loadu(x + v * VL);                                             \
            }                                                                                    \
            out[k] += hsum(s0 + s1);                                                             \
        }                                                                                        \
    }

DEFINE_TILE(8)
DEFINE_TILE(4)
DEFINE_TILE(2)
DEFINE_TILE(1)

static inline void spmm_scalar(const int64_t *indptr, const int32_t *indices, const float *values,
                               const float *xt, int64_t B, int64_t i, int64_t b0, int64_t n,
                               float init, float *out) {
    for (int64_t t = 0; t < n; t++) out[t] = init;
    for (int64_t k = indptr[i]; k < indptr[i + 1]; k++) {
        const float w = values[k];
        const float *x = xt + (int64_t)indices[k] * B + b0;
        for (int64_t t = 0; t < n; t++) out[t] += w * x[t];
    }
}

static inline void sddmm_scalar(const int64_t *indptr, const int32_t *indices, const float *dyt,
                                const float *xt, int64_t B, int64_t i, int64_t b0, int64_t n,
                                float *out) {
    const float *d = dyt + i * B + b0;
    for (int64_t k = indptr[i]; k < indptr[i + 1]; k++) {
        const float *x = xt + (int64_t)indices[k] * B + b0;
        float s = 0.0f;
        for (int64_t t = 0; t < n; t++) s += d[t] * x[t];
        out[k] += s;
    }
}

/* The widest column tile (8, 4, 2 or 1 vectors) that fits in what is left of a row; under one
 * vector, the remainder itself (the scalar tail). */
static inline int64_t tile_width(int64_t left) {
    return left >= 8 * VL ? 8 * VL : left >= 4 * VL ? 4 * VL : left >= 2 * VL ? 2 * VL : left >= VL ? VL : left;
}

/* For each of nb batches n: yt_n (rows x B) = W xt_n (+ bias), xt_n (cols x B); batch n of xt
 * starts at xt + n * x_stride and of yt at yt + n * y_stride. bias may be NULL. */
void sb_spmm(int64_t nb, int64_t rows, int64_t B, const int64_t *indptr, const int32_t *indices,
             const float *values, const float *xt, int64_t x_stride, const float *bias, float *yt,
             int64_t y_stride, int nthreads) {
    for (int64_t n = 0; n < nb; n++) {
        const float *xn = xt + n * x_stride;
        float *yn = yt + n * y_stride;
        int64_t b0 = 0;
        while (b0 < B) {
            const int64_t left = B - b0;
            const int64_t w = tile_width(left);
#pragma omp parallel for schedule(dynamic, 32) num_threads(nthreads) if (nthreads > 1)
            for (int64_t i = 0; i < rows; i++) {
                const float init = bias ? bias[i] : 0.0f;
                float *out = yn + i * B + b0;
                const int32_t *ind = indices + indptr[i];
                const float *val = values + indptr[i];
                const int64_t cnt = indptr[i + 1] - indptr[i];
                if (w == 8 * VL) spmm_tile8(ind, val, cnt, xn + b0, B, init, out);
                else if (w == 4 * VL) spmm_tile4(ind, val, cnt, xn + b0, B, init, out);
                else if (w == 2 * VL) spmm_tile2(ind, val, cnt, xn + b0, B, init, out);
                else if (w == VL) spmm_tile1(ind, val, cnt, xn + b0, B, init, out);
                else spmm_scalar(indptr, indices, values, xn, B, i, b0, w, init, out);
            }
            b0 += w;
        }
    }
}

/* out[k] += sum_n dot(dyt_n[i, :], xt_n[indices[k], :]) for every nonzero k of every row i. */
static void sddmm_add(int64_t nb, int64_t rows, int64_t B, const int64_t *indptr, const int32_t *indices,
                      const float *dyt, int64_t dy_stride, const float *xt, int64_t x_stride, float *out,
                      int nthreads) {
    for (int64_t n = 0; n < nb; n++) {
        const float *dn = dyt + n * dy_stride;
        const float *xn = xt + n * x_stride;
        int64_t b0 = 0;
        while (b0 < B) {
            const int64_t left = B - b0;
            const int64_t w = tile_width(left);
#pragma omp parallel for schedule(dynamic, 32) num_threads(nthreads) if (nthreads > 1)
            for (int64_t i = 0; i < rows; i++) {
                if (w == 8 * VL) sddmm_tile8(indptr, indices, dn, xn, B, i, b0, out);
                else if (w == 4 * VL) sddmm_tile4(indptr, indices, dn, xn, B, i, b0, out);
                else if (w == 2 * VL) sddmm_tile2(indptr, indices, dn, xn, B, i, b0, out);
                else if (w == VL) sddmm_tile1(indptr, indices, dn, xn, B, i, b0, out);
                else sddmm_scalar(indptr, indices, dn, xn, B, i, b0, w, out);
            }
            b0 += w;
        }
    }
}

/* out[k] = sum_n dot(dyt_n[i, :], xt_n[indices[k], :]) for every nonzero k of every row i. */
void sb_sddmm(int64_t nb, int64_t rows, int64_t B, const int64_t *indptr, const int32_t *indices,
              const float *dyt, int64_t dy_stride, const float *xt, int64_t x_stride, float *out,
              int nthreads) {
    memset(out, 0, (size_t)indptr[rows] * sizeof(float));
    sddmm_add(nb, rows, B, indptr, indices, dyt, dy_stride, xt, x_stride, out, nthreads);
}

/* --- row-major (token-major) activations: X is (M, cols) row-major, as a Linear sees a
 * (batch, tokens, features) input. Rather than transposing whole matrices (a pass over memory
 * each way, each step), tiles of RT rows are transposed into a small buffer that stays in cache
 * and the feature-major kernels above run on the tile (B = RT: one 8-vector column tile).
 *
 *   sb_spmm_rows:  Y (M, rows) = X W^T (+ bias); the input gradient is the same on W^T's CSR.
 *   sb_sddmm_rows: out[k] = sum_m DY[m, i] X[m, indices[k]]: the active weights' gradient. */
#define RT (8 * VL)
int64_t sb_row_tile(void) { return RT; } /* the callers size the work buffer (cols + rows) * RT */

/* 8 x 8 transposes in registers, for the tiles below (8-float vectors whatever VL) */
typedef float v8 __attribute__((vector_size(8 * sizeof(float))));
typedef int32_t i8 __attribute__((vector_size(8 * sizeof(int32_t))));
#if defined(__clang__)
#define SHUF8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUF8(a, b, ...) __builtin_shuffle(a, b, (i8){__VA_ARGS__})
#endif

static inline void transpose8(v8 *r) {
    v8 t[8], u[8];
    for (int q = 0; q < 8; q += 2) { /* interleave pairs of rows */
        t[q] = SHUF8(r[q], r[q + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[q + 1] = SHUF8(r[q], r[q + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int q = 0; q < 8; q += 4) { /* then pairs of pairs */
        u[q] = SHUF8(t[q], t[q + 2], 0, 1, 8, 9, 4, 5, 12, 13);
        u[q + 1] = SHUF8(t[q], t[q + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        u[q + 2] = SHUF8(t[q + 1], t[q + 3], 0, 1, 8, 9, 4, 5, 12, 13);
        u[q + 3] = SHUF8(t[q + 1], t[q + 3], 2, 3, 10, 11, 6, 7, 14, 15);
    }
    for (int q = 0; q < 4; q++) { /* then the halves */
        r[q] = SHUF8(u[q], u[q + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        r[q + 4] = SHUF8(u[q], u[q + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
}

/* dst (c x n, leading dimension ld_d) = the transpose of src (n x c, leading dimension ld_s):
 * 8 x 8 blocks in registers, the edges element by element */
static void transpose_into(const float *src, int64_t ld_s, int64_t n, int64_t c, float *dst, int64_t ld_d) {
    const int64_t n8 = n & ~(int64_t)7, c8 = c & ~(int64_t)7;
    for (int64_t c0 = 0; c0 < c8; c0 += 8)
        for (int64_t r0 = 0; r0 < n8; r0 += 8) {
            v8 r[8];
            for (int q = 0; q < 8; q++) memcpy(&r[q], src + (r0 + q) * ld_s + c0, sizeof(v8));
            transpose8(r);
            for (int q = 0; q < 8; q++) memcpy(dst + (c0 + q) * ld_d + r0, &r[q], sizeof(v8));
        }
    for (int64_t r = 0; r < n; r++)
        for (int64_t j = r < n8 ? c8 : 0; j < c; j++) dst[j * ld_d + r] = src[r * ld_s + j];
}

/* dst (cols x n, leading dimension RT) = the transpose of src's n rows (leading dimension ld). */
static void pack_tile(const float *src, int64_t ld, int64_t n, int64_t cols, float *dst) {
    transpose_into(src, ld, n, cols, dst, RT);
}

/* dst's n rows (leading dimension ld) = the transpose of src (cols x n, leading dimension RT). */
static void unpack_tile(const float *src, int64_t n, int64_t cols, float *dst, int64_t ld) {
    transpose_into(src, RT, cols, n, dst, ld);
}

void sb_spmm_rows(int64_t M, int64_t rows, int64_t cols, const int64_t *indptr, const int32_t *indices,
                  const float *values, const float *x, const float *bias, float *y, float *work, int nthreads) {
    float *xt = work, *yt = work + cols * RT;
    for (int64_t m0 = 0; m0 < M; m0 += RT) {
        const int64_t n = M - m0 < RT ? M - m0 : RT;
        pack_tile(x + m0 * cols, cols, n, cols, xt);
        if (n == RT) {
            sb_spmm(1, rows, RT, indptr, indices, values, xt, 0, bias, yt, 0, nthreads);
        } else { /* the last, short tile: the scalar path on its n columns of the RT-wide buffer */
            for (int64_t i = 0; i < rows; i++)
                spmm_scalar(indptr, indices, values, xt, RT, i, 0, n, bias ? bias[i] : 0.0f, yt + i * RT);
        }
        unpack_tile(yt, n, rows, y + m0 * rows, rows);
    }
}

void sb_sddmm_rows(int64_t M, int64_t rows, int64_t cols, const int64_t *indptr, const int32_t *indices,
                   const float *dy, const float *x, float *out, float *work, int nthreads) {
    float *xt = work, *dt = work + cols * RT;
    memset(out, 0, (size_t)indptr[rows] * sizeof(float));
    for (int64_t m0 = 0; m0 < M; m0 += RT) {
        const int64_t n = M - m0 < RT ? M - m0 : RT;
        pack_tile(x + m0 * cols, cols, n, cols, xt);
        pack_tile(dy + m0 * rows, rows, n, rows, dt);
        if (n == RT) {
            sddmm_add(1, rows, RT, indptr, indices, dt, 0, xt, 0, out, nthreads);
        } else {
            for (int64_t i = 0; i < rows; i++) sddmm_scalar(indptr, indices, dt, xt, RT, i, 0, n, out);
        }
    }
}

/* --- Linear layers on 2-d inputs: W's rows as CSR (indptr, idx, vals), or condensed where every
 * row has the same number k of nonzeros (or none: SRigL's ablated units): idx (r x k, int32 column
 * ids) and vals (r x k) for its r rows that have them, no row pointers. Neither needs a structure
 * of W^T (the input gradient is scattered). The activations (B x cols) come as they are: row-major
 * (`rm`), or feature-major (cols x B, the output of a sparse layer before); the output is
 * feature-major, yt (rows x B). The batch is cut into tiles of RT: a row-major operand's tile is
 * transposed into a buffer in cache (8 x 8 blocks in registers) rather than the whole matrix into
 * memory; the backward forms the weight and the input gradient in one pass over each tile, each
 * row of the output gradient read once for both. (The kernels above remain for convolutions'
 * patch matrices, 1x1 convolutions and (batch, tokens, features) inputs.) */
#ifdef _OPENMP
#include <omp.h>
#define THREAD_ID omp_get_thread_num()
#define TEAM(n) (n)
#else /* built without OpenMP: one thread, whatever the caller asks */
#define THREAD_ID 0
#define TEAM(n) 1
#endif
#define ROW_CHUNK 64 /* rows of the output gradient transposed at a time */

static inline int64_t linear_per_thread(int64_t cols) { return (2 * cols + ROW_CHUNK + 1) * RT; }

/* floats of work the two kernels below need: each thread's tile buffers, then the weight
 * gradient's sums of all threads but the first */
int64_t sb_linear_work(int64_t nnz, int64_t cols, int nthreads) {
    nthreads = TEAM(nthreads);
    return nthreads * linear_per_thread(cols) + (int64_t)(nthreads - 1) * nnz;
}

/* The tile of batch columns [b0, b0 + n) of rows [c0, c1) of a matrix with C rows, stored
 * row-major as (B x C) when rm, else (C x B): a pointer to row c0 of it as a (c1 - c0) x RT
 * matrix with rows *ld apart. A full feature-major tile is the matrix itself; otherwise it is
 * copied into buf (transposed when rm), zero beyond column n. */
static const float *tile_of(const float *a, int rm, int64_t B, int64_t C, int64_t c0, int64_t c1, int64_t b0,
                            int64_t n, float *buf, int64_t *ld) {
    if (!rm && n == RT) {
        *ld = B;
        return a + c0 * B + b0;
    }
    *ld = RT;
    if (rm) pack_tile(a + b0 * C + c0, C, n, c1 - c0, buf);
    else
        for (int64_t c = c0; c < c1; c++) memcpy(buf + (c - c0) * RT, a + c * B + b0, (size_t)n * sizeof(float));
    if (n < RT)
        for (int64_t c = 0; c < c1 - c0; c++) memset(buf + c * RT + n, 0, (size_t)(RT - n) * sizeof(float));
    return buf;
}

/* W's rows as these kernels read them: CSR (indptr; r = rows, k unused), or condensed (indptr
 * NULL): k nonzeros in each of the r rows listed in live, ascending (NULL: every row), the other
 * rows none (SRigL's ablated units). Row j of the list is output row live_row(w, j); its nonzeros
 * are idx / vals [row_start(w, j), row_start(w, j + 1)). */
typedef struct {
    const int64_t *indptr;
    const int32_t *live;
    int64_t r, k;
    const int32_t *idx;
    const float *vals;
} wrows;

static inline int64_t live_row(const wrows *w, int64_t j) { return w->live ? w->live[j] : j; }

static inline int64_t row_start(const wrows *w, int64_t j) { return w->indptr ? w->indptr[j] : j * w->k; }

/* the first listed row whose output row is o or later */
static inline int64_t first_live(const wrows *w, int64_t o) {
    if (!w->live) return o < w->r ? o : w->r;
    int64_t lo = 0, hi = w->r;
    while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (w->live[mid] < o) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* Threads: with at least as many batch tiles as threads, each takes whole tiles (statically, so
 * sums are reproducible for a thread count), with its own buffers and its own weight-gradient
 * sums, added at the end; with fewer (small batches), the tiles go one at a time and the threads
 * split the rows (statically in the backward), each scattering into its own input-gradient
 * buffer, added up per tile. */
static inline int by_tiles(int64_t B, int nthreads) { return nthreads == 1 || (B + RT - 1) / RT >= nthreads; }

/* the output rows [i0, i1) of one tile, from listed row j on (tmp: RT floats, for a short tile) */
static void linear_fwd_rows(const wrows *w, int64_t i0, int64_t i1, int64_t j, const float *xt, int64_t ld,
                            const float *bias, float *yt, int64_t B, int64_t b0, int64_t n, float *tmp) {
    for (int64_t i = i0; i < i1; i++) {
        float *out = yt + i * B + b0;
        const float init = bias ? bias[i] : 0.0f;
        if (j < w->r && live_row(w, j) == i) {
            const int64_t e0 = row_start(w, j);
            spmm_tile8(w->idx + e0, w->vals + e0, row_start(w, j + 1) - e0, xt, ld, init, n == RT ? out : tmp);
            if (n < RT) memcpy(out, tmp, (size_t)n * sizeof(float));
            j++;
        } else {
            for (int64_t q = 0; q < n; q++) out[q] = init;
        }
    }
}

/* yt (rows x B) = W x (+ bias) */
void sb_linear_fwd(int64_t B, int64_t rows, int64_t cols, int64_t k, const int64_t *indptr, const int32_t *live,
                   int64_t r, const int32_t *idx, const float *vals, const float *x, int x_rm, const float *bias,
                   float *yt, float *work, int nthreads) {
    const wrows w = {indptr, live, r, k, idx, vals};
    const int64_t tiles = (B + RT - 1) / RT, per = linear_per_thread(cols);
    nthreads = TEAM(nthreads);
    if (by_tiles(B, nthreads)) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
        for (int64_t t = 0; t < tiles; t++) {
            float *buf = work + THREAD_ID * per;
            const int64_t b0 = t * RT, n = B - b0 < RT ? B - b0 : RT;
            int64_t ld;
            const float *xt = tile_of(x, x_rm, B, cols, 0, cols, b0, n, buf, &ld);
            linear_fwd_rows(&w, 0, rows, 0, xt, ld, bias, yt, B, b0, n, buf + cols * RT);
        }
        return;
    }
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t b0 = t * RT, n = B - b0 < RT ? B - b0 : RT;
        int64_t ld;
        const float *xt = tile_of(x, x_rm, B, cols, 0, cols, b0, n, work, &ld);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
        for (int64_t i0 = 0; i0 < rows; i0 += ROW_CHUNK) {
            const int64_t i1 = i0 + ROW_CHUNK < rows ? i0 + ROW_CHUNK : rows;
            linear_fwd_rows(&w, i0, i1, first_live(&w, i0), xt, ld, bias, yt, B, b0, n,
                            work + THREAD_ID * per + cols * RT);
        }
    }
}

/* For the listed rows from j on whose output rows lie in [o0, o1) of one tile: dv[e] +=
 * dot(dy[i], x[idx[e]]) (dv not NULL) and dx[idx[e]] += vals[e] dy[i] (dx not NULL) for each of
 * their nonzeros e; rows of the tile RT (dx), ldd (dy, from row o0), ldx (x) apart. */
static inline void linear_bwd_rows(const wrows *w, int64_t o0, int64_t o1, int64_t j, const float *dy, int64_t ldd,
                                   const float *xt, int64_t ldx, float *dv, float *dx) {
    for (; j < w->r && live_row(w, j) < o1; j++) {
        vf d[8];
        for (int v = 0; v < 8; v++) d[v] = loadu(dy + (live_row(w, j) - o0) * ldd + v * VL);
        const int64_t e1 = row_start(w, j + 1);
        for (int64_t e = row_start(w, j); e < e1; e++) {
            if (dv) {
                const float *xr = xt + (int64_t)w->idx[e] * ldx;
                vf s0 = d[0] * loadu(xr), s1 = d[1] * loadu(xr + VL);
                for (int v = 2; v < 8; v += 2) {
                    s0 += d[v] * loadu(xr + v * VL);
                    s1 += d[v + 1] * loadu(xr + (v + 1) * VL);
                }
                dv[e] += hsum(s0 + s1);
            }
            if (dx) {
                float *dr = dx + (int64_t)w->idx[e] * RT;
                const vf s = (vf){0} + w->vals[e];
                for (int v = 0; v < 8; v++) storeu(dr + v * VL, loadu(dr + v * VL) + s * d[v]);
            }
        }
    }
}

/* the output-gradient rows [o0, o1) of one tile (dy packed into dbuf where it must be) */
static inline void linear_bwd_chunk(const wrows *w, int64_t o0, int64_t o1, const float *dy, int dy_rm, int64_t B,
                                    int64_t rows, int64_t b0, int64_t n, float *dbuf, const float *xt, int64_t ldx,
                                    float *dv, float *dx) {
    int64_t ldd;
    const float *dt = tile_of(dy, dy_rm, B, rows, o0, o1, b0, n, dbuf, &ldd);
    const int64_t j = first_live(w, o0);
    /* three copies of the loop, each with the branches resolved */
    if (dv && dx) linear_bwd_rows(w, o0, o1, j, dt, ldd, xt, ldx, dv, dx);
    else if (dv) linear_bwd_rows(w, o0, o1, j, dt, ldd, xt, ldx, dv, NULL);
    else linear_bwd_rows(w, o0, o1, j, dt, ldd, NULL, 0, NULL, dx);
}

/* dv (r x k) = the gradient of vals, and dxt (cols x B) = W^T dy, either may be NULL; dy is
 * the output gradient (B x rows) row-major when dy_rm, else (rows x B). */
void sb_linear_bwd(int64_t B, int64_t rows, int64_t cols, int64_t k, const int64_t *indptr, const int32_t *live,
                   int64_t r, const int32_t *idx, const float *vals, const float *x, int x_rm, const float *dy,
                   int dy_rm, float *dv, float *dxt, float *work, int nthreads) {
    const wrows w = {indptr, live, r, k, idx, vals};
    const int64_t tiles = (B + RT - 1) / RT, per = linear_per_thread(cols), nnz = row_start(&w, r);
    nthreads = TEAM(nthreads);
    float *sums = work + (int64_t)nthreads * per;
    if (dv) memset(dv, 0, (size_t)nnz * sizeof(float));
    if (by_tiles(B, nthreads)) {
        if (dv) memset(sums, 0, (size_t)(nthreads - 1) * nnz * sizeof(float));
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
        for (int64_t t = 0; t < tiles; t++) {
            const int tid = THREAD_ID;
            float *xbuf = work + tid * per, *dx = xbuf + cols * RT, *dbuf = dx + cols * RT;
            float *dvt = dv == NULL ? NULL : tid == 0 ? dv : sums + (tid - 1) * nnz;
            const int64_t b0 = t * RT, n = B - b0 < RT ? B - b0 : RT;
            int64_t ldx = 0;
            const float *xt = dv ? tile_of(x, x_rm, B, cols, 0, cols, b0, n, xbuf, &ldx) : NULL;
            if (dxt) memset(dx, 0, (size_t)(cols * RT) * sizeof(float));
            for (int64_t o0 = 0; o0 < rows; o0 += ROW_CHUNK)
                linear_bwd_chunk(&w, o0, o0 + ROW_CHUNK < rows ? o0 + ROW_CHUNK : rows, dy, dy_rm, B, rows, b0, n,
                                 dbuf, xt, ldx, dvt, dxt ? dx : NULL);
            if (dxt)
                for (int64_t c = 0; c < cols; c++) memcpy(dxt + c * B + b0, dx + c * RT, (size_t)n * sizeof(float));
        }
        if (dv)
            for (int u = 1; u < nthreads; u++)
                for (int64_t j = 0; j < nnz; j++) dv[j] += sums[(u - 1) * nnz + j];
        return;
    }
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t b0 = t * RT, n = B - b0 < RT ? B - b0 : RT;
        int64_t ldx = 0;
        const float *xt = dv ? tile_of(x, x_rm, B, cols, 0, cols, b0, n, work, &ldx) : NULL;
#pragma omp parallel num_threads(nthreads)
        {
            const int tid = THREAD_ID;
            float *dx = work + tid * per + cols * RT, *dbuf = dx + cols * RT;
            if (dxt) memset(dx, 0, (size_t)(cols * RT) * sizeof(float));
            /* rows apart: dv written directly; statically, so each thread's input-gradient sums (and
             * so their total) are the same from run to run */
#pragma omp for schedule(static)
            for (int64_t o0 = 0; o0 < rows; o0 += ROW_CHUNK)
                linear_bwd_chunk(&w, o0, o0 + ROW_CHUNK < rows ? o0 + ROW_CHUNK : rows, dy, dy_rm, B, rows, b0, n,
                                 dbuf, xt, ldx, dv, dxt ? dx : NULL);
            if (dxt) {
#pragma omp for schedule(static)
                for (int64_t c = 0; c < cols; c++) {
                    float *out = dxt + c * B + b0;
                    memcpy(out, work + cols * RT + c * RT, (size_t)n * sizeof(float));
                    for (int u = 1; u < nthreads; u++) {
                        const float *src = work + u * per + cols * RT + c * RT;
                        for (int64_t q = 0; q < n; q++) out[q] += src[q];
                    }
                }
            }
        }
    }
}

/* --- direct convolution (stride 1, dilation 1), activations as (C, H, W, N): N innermost ------
 * No padded copy of the input exists: the padding is the set of reads the kernels skip. A
 * nonzero k at (o, c, i, j) of a kernel with padding (p0, p1) shifts rows by dh = i - p0 and
 * columns by s = j - p1. For output row h it reads input row h + dh (none when that row is
 * outside [0, H)), and along the run of L = W_out * N floats of that output row, positions
 * t in [lo, hi) read the input row's float t + s * N (lo = max(0, -s) N, hi = min(W_out, W - s) N;
 * the run's other positions meet the padding). Both runs are contiguous: every product is an
 * AXPY or a dot product over contiguous memory, and no patches are unfolded.
 *
 * A layer's geometry is one int64 array geo (4, nnz) in its nonzeros' order: off = ((c H + dh) W
 * + s) N (so input row h + dh's run starts at h * row + off, row = W * N), dh, lo, hi. */

static inline int row_out(int64_t r, int64_t H) { return r < 0 || r >= H; }

/* d[t] += s * g[t] for t in [t0, t1) (the input gradients' AXPYs) */
static inline void axpy_run(float *d, const float *g, float s, int64_t t0, int64_t t1) {
    const vf sv = (vf){0} + s;
    int64_t t = t0;
    for (; t + VL <= t1; t += VL) storeu(d + t, loadu(d + t) + sv * loadu(g + t));
    for (; t < t1; t++) d[t] += s * g[t];
}

/* Accumulates dot(g[t0:t1], x[t0:t1]) into two vector sums and a scalar tail (the weight
 * gradients' dot products, summed over many runs before one horizontal sum) */
static inline void dot_run(const float *g, const float *x, int64_t t0, int64_t t1, vf *s0, vf *s1, float *tail) {
    int64_t t = t0;
    for (; t + 2 * VL <= t1; t += 2 * VL) {
        *s0 += loadu(g + t) * loadu(x + t);
        *s1 += loadu(g + t + VL) * loadu(x + t + VL);
    }
    for (; t + VL <= t1; t += VL) *s0 += loadu(g + t) * loadu(x + t);
    for (; t < t1; t++) *tail += g[t] * x[t];
}

/* Adds to out[0 : b1 - b0] the nonzeros of row o over the part of [b0, b1) inside their [lo, hi)
 * (all of them when `only_partial` is 0, else those that do not cover [b0, b1) whole). */
static void conv_part(const int64_t *indptr, const int64_t *geo, int64_t nnz, const float *values,
                      const float *x, int64_t h, int64_t H, int64_t row, int64_t o, int64_t b0,
                      int64_t b1, int only_partial, float *out) {
    const int64_t *off = geo, *dh = geo + nnz, *lo = dh + nnz, *hi = lo + nnz;
    for (int64_t k = indptr[o]; k < indptr[o + 1]; k++) {
        if (row_out(h + dh[k], H)) continue;
        if (only_partial && b0 >= lo[k] && b1 <= hi[k]) continue;
        const int64_t t0 = b0 > lo[k] ? b0 : lo[k], t1 = b1 < hi[k] ? b1 : hi[k];
        const float s = values[k];
        const int64_t base = h * row + off[k];
        for (int64_t t = t0; t < t1; t++) out[t - b0] += s * x[base + t];
    }
}

/* y[o, h, b0 : b0 + w] for a tile of w = NV * VL floats: the nonzeros whose [lo, hi) covers the
 * tile run vectorised; those that cover part of it (batch sizes that are not a multiple of the
 * tile) add theirs afterwards, element by element. */
#define DEFINE_CONV_TILE(NV)                                                                     \
    static inline void conv_tile##NV(const int64_t *indptr, const int64_t *geo, int64_t nnz,      \
                                     const float *values, const float *x, int64_t h, int64_t H,    \
                                     int64_t row, int64_t o, int64_t b0, float init, float *out) { \
        const int64_t *off = geo, *dh = geo + nnz, *lo = dh + nnz, *hi = lo + nnz;                 \
        const int64_t b1 = b0 + NV * VL;                                                           \
        vf acc[NV];                                                                                \
        int partial = 0;                                                                           \
        for (int v = 0; v < NV; v++) acc[v] = (vf){0} + init;                                      \
        const int64_t end = indptr[o + 1];                                                         \
        for (int64_t k = indptr[o]; k < end; k++) {                                                \
            if (row_out(h + dh[k], H)) continue;                                                   \
            if (b0 < lo[k] || b1 > hi[k]) {                                                        \
                partial |= b0 < hi[k] && b1 > lo[k];                                               \
                continue;                                                                          \
            }                                                                                      \
            const vf s = (vf){0} + values[k];                                                      \
            const float *xk = x + (h * row + off[k] + b0);                                         \
            for (int v = 0; v < NV; v++) acc[v] += s * loadu(xk + v * VL);                         \
        }                                                                                          \
        for (int v = 0; v < NV; v++) storeu(out + v * VL, acc[v]);                                 \
        if (partial) conv_part(indptr, geo, nnz, values, x, h, H, row, o, b0, b1, 1, out);         \
    }

DEFINE_CONV_TILE(8)
DEFINE_CONV_TILE(4)
DEFINE_CONV_TILE(2)
DEFINE_CONV_TILE(1)

/* y (rows, H_out, L) with L = W_out * N from x (C, H, W, N), row = W * N:
 * y[o, h, t] = bias[o] + sum_k v_k x[h * row + off_k + t] over the nonzeros whose row h + dh_k is
 * inside the input and t inside [lo_k, hi_k). */
void sb_conv_fwd(int64_t rows, int64_t h_out, int64_t L, int64_t H, int64_t row, const int64_t *indptr,
                 const int64_t *geo, const float *values, const float *x, const float *bias, float *y,
                 int nthreads) {
    const int64_t nnz = indptr[rows];
    for (int64_t h = 0; h < h_out; h++) {
        int64_t b0 = 0;
        while (b0 < L) {
            const int64_t left = L - b0;
            const int64_t w = tile_width(left);
#pragma omp parallel for schedule(dynamic, 8) num_threads(nthreads) if (nthreads > 1)
            for (int64_t o = 0; o < rows; o++) {
                const float init = bias ? bias[o] : 0.0f;
                float *out = y + (o * h_out + h) * L + b0;
                if (w == 8 * VL) conv_tile8(indptr, geo, nnz, values, x, h, H, row, o, b0, init, out);
                else if (w == 4 * VL) conv_tile4(indptr, geo, nnz, values, x, h, H, row, o, b0, init, out);
                else if (w == 2 * VL) conv_tile2(indptr, geo, nnz, values, x, h, H, row, o, b0, init, out);
                else if (w == VL) conv_tile1(indptr, geo, nnz, values, x, h, H, row, o, b0, init, out);
                else {
                    for (int64_t t = 0; t < w; t++) out[t] = init;
                    conv_part(indptr, geo, nnz, values, x, h, H, row, o, b0, b0 + w, 0, out);
                }
            }
            b0 += w;
        }
    }
}

/* dx (cols, H, W, N), zeroed by the caller, from dy (rows, H_out, L): for every input channel c
 * (the transposed structure: its nonzeros k, t_geo as geo with off relative to the channel's
 * base, t_src[k] = o, t_vals[k] = v) and every output row h whose input row h + dh is inside:
 * dx[c][h * row + off_k + t] += v * dy[o, h, t] for t in [lo_k, hi_k). Each channel is written by
 * one thread. */
void sb_conv_dgrad(int64_t cols, int64_t h_out, int64_t L, int64_t H, int64_t row, int64_t chan,
                   const int64_t *t_indptr, const int64_t *t_geo, const int32_t *t_src,
                   const float *t_vals, const float *dy, float *dx, int nthreads) {
    const int64_t nnz = t_indptr[cols];
    const int64_t *off = t_geo, *dh = t_geo + nnz, *lo = dh + nnz, *hi = lo + nnz;
#pragma omp parallel for schedule(dynamic, 4) num_threads(nthreads) if (nthreads > 1)
    for (int64_t c = 0; c < cols; c++) {
        float *dc = dx + c * chan;
        for (int64_t k = t_indptr[c]; k < t_indptr[c + 1]; k++) {
            const float *src = dy + (int64_t)t_src[k] * h_out * L;
            const int64_t h0 = dh[k] < 0 ? -dh[k] : 0, h1 = H - dh[k] < h_out ? H - dh[k] : h_out;
            for (int64_t h = h0; h < h1; h++) axpy_run(dc + (h * row + off[k]), src + h * L, t_vals[k], lo[k], hi[k]);
        }
    }
}

/* out[k] = sum over the output rows h whose input row h + dh_k is inside of
 * dot(dy[o, h, lo_k : hi_k], x[h * row + off_k + lo_k : ... + hi_k]), for every nonzero k of row o. */
void sb_conv_wgrad(int64_t rows, int64_t h_out, int64_t L, int64_t H, int64_t row, const int64_t *indptr,
                   const int64_t *geo, const float *dy, const float *x, float *out, int nthreads) {
    const int64_t nnz = indptr[rows];
    const int64_t *off = geo, *dh = geo + nnz, *lo = dh + nnz, *hi = lo + nnz;
#pragma omp parallel for schedule(dynamic, 8) num_threads(nthreads) if (nthreads > 1)
    for (int64_t o = 0; o < rows; o++) {
        for (int64_t k = indptr[o]; k < indptr[o + 1]; k++) {
            vf s0 = (vf){0}, s1 = (vf){0};
            float tail = 0.0f;
            const int64_t h0 = dh[k] < 0 ? -dh[k] : 0, h1 = H - dh[k] < h_out ? H - dh[k] : h_out;
            for (int64_t h = h0; h < h1; h++)
                dot_run(dy + (o * h_out + h) * L, x + (h * row + off[k]), lo[k], hi[k], &s0, &s1, &tail);
            out[k] = hsum(s0 + s1) + tail;
        }
    }
}

/* --- direct strided convolution (any stride, dilation 1) on (C, H, W, N) activations ----------
 * With a stride the output run of a row is no longer one shifted input run, but each output
 * position (h, w) still reads, for nonzero k, the N contiguous floats of the input at row
 * sh h + dh and column sw w + s. geo (4, nnz) holds off = ((c H + dh) W + s) N and dh as above,
 * and the output columns [wlo, whi) whose input column is inside [0, W). Tiles cut the batch of
 * one output position, so a nonzero covers a tile whole or not at all. */

#define DEFINE_SCONV_TILE(NV)                                                                     \
    static inline void sconv_tile##NV(const int64_t *indptr, const int64_t *geo, int64_t nnz,      \
                                      const float *values, const float *xhw, int64_t r0, int64_t H, \
                                      int64_t w, int64_t o, float init, float *out) {              \
        const int64_t *off = geo, *dh = geo + nnz, *wlo = dh + nnz, *whi = wlo + nnz;              \
        vf acc[NV];                                                                                \
        for (int v = 0; v < NV; v++) acc[v] = (vf){0} + init;                                      \
        const int64_t end = indptr[o + 1];                                                         \
        for (int64_t k = indptr[o]; k < end; k++) {                                                \
            if (row_out(r0 + dh[k], H) || w < wlo[k] || w >= whi[k]) continue;                      \
            const vf s = (vf){0} + values[k];                                                      \
            const float *xk = xhw + off[k];                                                        \
            for (int v = 0; v < NV; v++) acc[v] += s * loadu(xk + v * VL);                         \
        }                                                                                          \
        for (int v = 0; v < NV; v++) storeu(out + v * VL, acc[v]);                                 \
    }

DEFINE_SCONV_TILE(8)
DEFINE_SCONV_TILE(4)
DEFINE_SCONV_TILE(2)
DEFINE_SCONV_TILE(1)

/* y (rows, H_out, W_out, N) from x (C, H, W, N), row = W * N, strides (sh, sw). */
void sb_conv_fwd_strided(int64_t rows, int64_t h_out, int64_t w_out, int64_t N, int64_t H, int64_t row,
                         int64_t sh, int64_t sw, const int64_t *indptr, const int64_t *geo,
                         const float *values, const float *x, const float *bias, float *y, int nthreads) {
    const int64_t nnz = indptr[rows];
    const int64_t *off = geo, *dh = geo + nnz, *wlo = dh + nnz, *whi = wlo + nnz;
    for (int64_t h = 0; h < h_out; h++) {
        for (int64_t w = 0; w < w_out; w++) {
            int64_t b0 = 0;
            while (b0 < N) {
                const int64_t bw = tile_width(N - b0);
                const float *xhw = x + (sh * h * row + sw * w * N + b0);
#pragma omp parallel for schedule(dynamic, 8) num_threads(nthreads) if (nthreads > 1)
                for (int64_t o = 0; o < rows; o++) {
                    const float init = bias ? bias[o] : 0.0f;
                    float *out = y + ((o * h_out + h) * w_out + w) * N + b0;
                    if (bw == 8 * VL) sconv_tile8(indptr, geo, nnz, values, xhw, sh * h, H, w, o, init, out);
                    else if (bw == 4 * VL) sconv_tile4(indptr, geo, nnz, values, xhw, sh * h, H, w, o, init, out);
                    else if (bw == 2 * VL) sconv_tile2(indptr, geo, nnz, values, xhw, sh * h, H, w, o, init, out);
                    else if (bw == VL) sconv_tile1(indptr, geo, nnz, values, xhw, sh * h, H, w, o, init, out);
                    else {
                        for (int64_t t = 0; t < bw; t++) out[t] = init;
                        for (int64_t k = indptr[o]; k < indptr[o + 1]; k++) {
                            if (row_out(sh * h + dh[k], H) || w < wlo[k] || w >= whi[k]) continue;
                            const float s = values[k];
                            for (int64_t t = 0; t < bw; t++) out[t] += s * xhw[off[k] + t];
                        }
                    }
                }
                b0 += bw;
            }
        }
    }
}

/* dx (cols, H, W, N), zeroed by the caller, from dy (rows, H_out, W_out, N); t_geo, t_src and
 * t_vals as for sb_conv_dgrad (off within one input channel). */
void sb_conv_dgrad_strided(int64_t cols, int64_t h_out, int64_t w_out, int64_t N, int64_t H, int64_t row,
                           int64_t chan, int64_t sh, int64_t sw, const int64_t *t_indptr, const int64_t *t_geo,
                           const int32_t *t_src, const float *t_vals, const float *dy, float *dx, int nthreads) {
    const int64_t nnz = t_indptr[cols];
    const int64_t *off = t_geo, *dh = t_geo + nnz, *wlo = dh + nnz, *whi = wlo + nnz;
#pragma omp parallel for schedule(dynamic, 4) num_threads(nthreads) if (nthreads > 1)
    for (int64_t c = 0; c < cols; c++) {
        float *dc = dx + c * chan;
        for (int64_t k = t_indptr[c]; k < t_indptr[c + 1]; k++) {
            const float *src = dy + (int64_t)t_src[k] * h_out * w_out * N;
            for (int64_t h = 0; h < h_out; h++) {
                if (row_out(sh * h + dh[k], H)) continue;
                for (int64_t w = wlo[k]; w < whi[k]; w++)
                    axpy_run(dc + (sh * h * row + off[k] + sw * w * N), src + (h * w_out + w) * N, t_vals[k], 0, N);
            }
        }
    }
}

/* out[k] = sum over output positions (h, w) whose input position is inside of
 * dot(dy[o, h, w, :], x[sh h row + off_k + sw w N + :N]), for every nonzero k of row o. */
void sb_conv_wgrad_strided(int64_t rows, int64_t h_out, int64_t w_out, int64_t N, int64_t H, int64_t row,
                           int64_t sh, int64_t sw, const int64_t *indptr, const int64_t *geo, const float *dy,
                           const float *x, float *out, int nthreads) {
    const int64_t nnz = indptr[rows];
    const int64_t *off = geo, *dh = geo + nnz, *wlo = dh + nnz, *whi = wlo + nnz;
#pragma omp parallel for schedule(dynamic, 8) num_threads(nthreads) if (nthreads > 1)
    for (int64_t o = 0; o < rows; o++) {
        for (int64_t k = indptr[o]; k < indptr[o + 1]; k++) {
            vf s0 = (vf){0}, s1 = (vf){0};
            float tail = 0.0f;
            for (int64_t h = 0; h < h_out; h++) {
                if (row_out(sh * h + dh[k], H)) continue;
                for (int64_t w = wlo[k]; w < whi[k]; w++)
                    dot_run(dy + ((o * h_out + h) * w_out + w) * N, x + (sh * h * row + off[k] + sw * w * N), 0, N,
                            &s0, &s1, &tail);
            }
            out[k] = hsum(s0 + s1) + tail;
        }
    }
}

/* --- batch norm on channel-major activations: each of C channels one contiguous run of L --------
 * torch's CPU batch norm collects training statistics one value at a time (Welford); these run
 * over vectors: per channel the sum and the sum of squares in one pass (float vectors over blocks
 * of 4096 values, then double), and the normalisation y = x * scale + shift in another. */
void sb_bn_stats(int64_t C, int64_t L, const float *x, double *sum, double *sumsq, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t c = 0; c < C; c++) {
        const float *xc = x + c * L;
        double s = 0.0, q = 0.0;
        for (int64_t b = 0; b < L; b += 4096) {
            const int64_t e = b + 4096 < L ? b + 4096 : L;
            vf s0 = (vf){0}, s1 = (vf){0}, q0 = (vf){0}, q1 = (vf){0};
            float ts = 0.0f, tq = 0.0f;
            int64_t t = b;
            for (; t + 2 * VL <= e; t += 2 * VL) {
                const vf u = loadu(xc + t), v = loadu(xc + t + VL);
                s0 += u;
                s1 += v;
                q0 += u * u;
                q1 += v * v;
            }
            for (; t < e; t++) {
                ts += xc[t];
                tq += xc[t] * xc[t];
            }
            s += (double)hsum(s0 + s1) + ts;
            q += (double)hsum(q0 + q1) + tq;
        }
        sum[c] = s;
        sumsq[c] = q;
    }
}

void sb_bn_apply(int64_t C, int64_t L, const float *x, const float *scale, const float *shift, float *y,
                 int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t c = 0; c < C; c++) {
        const vf a = (vf){0} + scale[c], b = (vf){0} + shift[c];
        const float *xc = x + c * L;
        float *yc = y + c * L;
        int64_t t = 0;
        for (; t + VL <= L; t += VL) storeu(yc + t, loadu(xc + t) * a + b);
        for (; t < L; t++) yc[t] = xc[t] * scale[c] + shift[c];
    }
}
