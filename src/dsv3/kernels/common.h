/* Helpers shared by the kernels of this folder (dsv3.kernels.cpu compiles every .c file here into one
 * library): bf16 <-> fp32, widening loads, and the OpenMP fan-out. */
#pragma once
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAXT 64

static inline int64_t kblocks(int64_t k) { return (k + 15) / 16; }

static inline float bf2f(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f2bf(float f) { /* round to nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float round_bf(float f) { return bf2f(f2bf(f)); }

/* s[j] = sum of the 16 lanes of v[j], j < 16, as one vector: a fixed tree of lane-pair additions */
static inline __m512 reduce16(const __m512 v[16]) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++) /* per 128-bit lane: [v0 0+2, v1 0+2, v0 1+3, v1 1+3] */
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) { /* per 128-bit lane: the lane's sums of 4 consecutive v */
        __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
        b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; i++) /* pairs of 128-bit lanes added */
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88), _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

/* fp32 -> bf16 by round to nearest even, 16 at a time, as f2bf (NaN stays NaN) */
static inline __m256i to_bf16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                     _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    __mmask16 nan = _mm512_cmp_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                          _mm512_set1_epi32(0x7f800000), _MM_CMPINT_NLE);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

static inline __m512 round_bf16(__m512 v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(v)), 16));
}

static inline __attribute__((always_inline)) __m512 loadw(const void *w, int64_t k, const int bf) {
    if (bf)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w + k))), 16));
    return _mm512_loadu_ps((const float *)w + k);
}

static inline __attribute__((always_inline)) __m512 loadw_mask(const void *w, int64_t k, __mmask16 mask, const int bf) {
    if (bf)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, (const uint16_t *)w + k)), 16));
    return _mm512_maskz_loadu_ps(mask, (const float *)w + k);
}

/* e^x, ~1 ulp: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial of r (the Cephes expf coefficients), times
 * 2^n; below -87.3 (e^x < 1.2e-38) it returns 0, above ~88.7 +inf (the scaling overflows) */
static inline __m512 vexp(__m512 x) {
    __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_LT_OQ);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps((__mmask16)~tiny, _mm512_scalef_ps(p, n));
}

/* the first n of 16 lanes (all 16 for n >= 16, none for n <= 0) */
static inline __mmask16 lanes(int64_t n) {
    return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

/* store the first n (<= 16) values of v at o + i (bf16, rounded, or fp32) */
static inline void store16(void *o, int64_t i, __m512 v, int64_t n, int bf) {
    __mmask16 m = lanes(n);
    if (bf) _mm256_mask_storeu_epi16((uint16_t *)o + i, m, to_bf16(v));
    else _mm512_mask_storeu_ps((float *)o + i, m, v);
}

/* silu(a) * b, 16 at a time, as the PyTorch path computes a SwiGLU's gated product: in bf16 the two products a
 * and b, the silu and the result are each materialised, so each is rounded to bf16; e^x by vexp */
static inline __m512 gated16(__m512 a, __m512 b, int bf) {
    if (bf) {
        a = round_bf16(a);
        b = round_bf16(b);
    }
    __m512 s = _mm512_div_ps(a, _mm512_add_ps(_mm512_set1_ps(1.0f), vexp(_mm512_sub_ps(_mm512_setzero_ps(), a))));
    __m512 r = _mm512_mul_ps(bf ? round_bf16(s) : s, b);
    return bf ? round_bf16(r) : r;
}

/* h1[i] = gated16(h1[i], h3[i]) for i < n: values stored in dtype sbf (bf16 or fp32), rounded as dtype bf */
static inline void gated_rows(void *h1, const void *h3, int64_t n, int sbf, int bf) {
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = lanes(n - i);
        store16(h1, i, gated16(loadw_mask(h1, i, m, sbf), loadw_mask(h3, i, m, sbf), bf), n - i, sbf);
    }
}

/* r[i][j] -> r[j][i], 16 x 16 */
static inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
        __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
    }
    for (int h = 0; h < 2; h++)
        for (int j = 0; j < 4; j++) {
            t[8 * h + j] = _mm512_shuffle_f32x4(r[8 * h + j], r[8 * h + j + 4], 0x88);
            t[8 * h + j + 4] = _mm512_shuffle_f32x4(r[8 * h + j], r[8 * h + j + 4], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
    }
}

/* acc[r][c] = sum_i x[r][i] W[i * ldw + 16 c ..] for rows r < R and the 64 columns of W from its start (4 vectors):
 * each sum from zero in ascending i, one fused multiply-add a term, whatever R; a load of W serves the R rows
 * (the register tile of the prefill GEMM and of the attention's absorptions) */
static inline __attribute__((always_inline)) void rows_x64(const float *const *x, const int R, const float *W,
                                                           int64_t ldw, int64_t n, __m512 acc[][4]) {
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i++) {
        const float *w = W + i * ldw;
        const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16), w2 = _mm512_loadu_ps(w + 32),
                     w3 = _mm512_loadu_ps(w + 48);
        for (int r = 0; r < R; r++) {
            const __m512 xv = _mm512_set1_ps(x[r][i]);
            acc[r][0] = _mm512_fmadd_ps(xv, w0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(xv, w1, acc[r][1]);
            acc[r][2] = _mm512_fmadd_ps(xv, w2, acc[r][2]);
            acc[r][3] = _mm512_fmadd_ps(xv, w3, acc[r][3]);
        }
    }
}

/* dst[0..n) = src[0..n) as fp32 (bf16 widened exactly, fp32 copied) */
static inline void widen(const void *src, int bf, int64_t n, float *dst) {
    if (!bf) {
        memcpy(dst, src, (size_t)n * sizeof(float));
        return;
    }
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, loadw(src, i, 1));
    if (i < n) _mm512_mask_storeu_ps(dst + i, lanes(n - i), loadw_mask(src, i, lanes(n - i), 1));
}

/* sum_i a[i] w[i] for fp32 a and w of dtype bf: 16 lanes, then one fixed tree */
static inline float dot_w(const float *a, const void *w, int64_t n, int bf) {
    __m512 acc = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), loadw(w, k, bf), acc);
    if (k < n) acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(lanes(n - k), a + k), loadw_mask(w, k, lanes(n - k), bf), acc);
    return _mm512_reduce_add_ps(acc);
}

static inline void split(int64_t n, int t, int nt, int64_t *lo, int64_t *hi) {
    *lo = n * t / nt;
    *hi = n * (t + 1) / nt;
}

/* run fn(&jobs[t]) for t < nthreads, in parallel: an OpenMP region (in the process that loaded PyTorch,
 * the OpenMP runtime and thread pool PyTorch's own kernels use: its symbols are already loaded) */
static inline int run_threads(void *(*fn)(void *), void *jobs, size_t size, int nthreads) {
    if (nthreads == 1) {
        fn(jobs);
        return 0;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static, 1)
    for (int t = 0; t < nthreads; t++) fn((char *)jobs + t * size);
    return 0;
}


/* entry points other kernels call */
int dsv3_linear(const void *x, const void *w, void *out, int64_t M, int64_t K, int64_t N, int nthreads, int bf);
int dsv3_rmsnorm(const void *x, int64_t xs, const void *w, void *out, int64_t M, int64_t D, float eps, int nthreads,
                 int bf);
int dsv3_moe(const void *x, const void *w1, const void *w3, const void *w2, const int64_t *idx, const float *gw,
             void *out, int64_t T, int64_t D, int64_t I, int64_t K, int64_t E, int nthreads, int bf);
