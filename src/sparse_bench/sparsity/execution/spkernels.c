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

/* spmm over one tile of NV vectors for row i; sddmm likewise. The loops over `v` have a
 * constant trip count, so the compiler keeps acc[] / d[] in registers. */
#define DEFINE_TILE(NV)                                                                          \
    static inline void spmm_tile##NV(const int64_t *indptr, const int32_t *indices,              \
                                     const float *values, const float *xt, int64_t B, int64_t i, \
                                     int64_t b0, float init, float *out) {                       \
        vf acc[NV];                                                                              \
        for (int v = 0; v < NV; v++) acc[v] = (vf){0} + init;                                    \
        const int64_t end = indptr[i + 1];                                                       \
        for (int64_t k = indptr[i]; k < end; k++) {                                              \
            const vf w = (vf){0} + values[k];                                                    \
            const float *x = xt + (int64_t)indices[k] * B + b0;                                  \
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
                if (w == 8 * VL) spmm_tile8(indptr, indices, values, xn, B, i, b0, init, out);
                else if (w == 4 * VL) spmm_tile4(indptr, indices, values, xn, B, i, b0, init, out);
                else if (w == 2 * VL) spmm_tile2(indptr, indices, values, xn, B, i, b0, init, out);
                else if (w == VL) spmm_tile1(indptr, indices, values, xn, B, i, b0, init, out);
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

/* dst (cols x n, leading dimension RT) = the transpose of src's n rows (leading dimension ld). */
static void pack_tile(const float *src, int64_t ld, int64_t n, int64_t cols, float *dst) {
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
        const int64_t c1 = c0 + 16 < cols ? c0 + 16 : cols;
        for (int64_t r = 0; r < n; r++) {
            const float *s = src + r * ld;
            for (int64_t c = c0; c < c1; c++) dst[c * RT + r] = s[c];
        }
    }
}

/* dst's n rows (leading dimension ld) = the transpose of src (cols x n, leading dimension RT). */
static void unpack_tile(const float *src, int64_t n, int64_t cols, float *dst, int64_t ld) {
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
        const int64_t c1 = c0 + 16 < cols ? c0 + 16 : cols;
        for (int64_t r = 0; r < n; r++) {
            float *d = dst + r * ld;
            for (int64_t c = c0; c < c1; c++) d[c] = src[c * RT + r];
        }
    }
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
