/* Few-row products with FP8 weights in the released format (float8_e4m3fn values, one fp32 scale per blk x blk
 * block), for decode steps of an FP8-resident model on AVX-512 CPUs: each weight row is read once, as its bytes.
 *
 * out[m][n] = sum over k-blocks b of  ws[n / blk][b] * xs[m][b] * sum_{k in b} x[m][k] * e4m3(w[n][k])
 *
 * with xs = 1 when no activation scales are given (the weight-only product: the dequantized weight's, as
 * fp8_gemm_reference computes it) or, with activations quantized in 1 x blk tiles (act_quant: x then holds their
 * e4m3 values), DeepSeek's FP8 GEMM (fp8_gemm). The sums are fp32: a block's products in 16 lanes, folded into the
 * row's 16 lanes with the block's scale, the lanes added at the end in a fixed tree. A value does not depend on
 * the other rows (batch-invariant).
 *
 * Decoding e4m3: its 7 magnitude bits shifted left by 7 are a binary16 number of value 2^-8 times the e4m3 value
 * (normal and subnormal alike: the exponent biases differ by 8, the 3 mantissa bits land on the top of fp16's 10),
 * with the sign moved to bit 15; vcvtph2ps makes fp32 of it exactly, and the 2^8 goes into the block's scale.
 * 0x7f / 0xff (e4m3fn's NaN) give NaN. */
#include "common.h"

#define FP8_MAXM 8 /* rows per pass over a weight row (their block and row sums stay in registers) */

/* 32 e4m3 values (those of mask; the others 0) -> fp32 in lo (the first 16) and hi, times 2^-8. The magnitude bits
 * shifted left by 7 put the sign on bit 14; adding that bit to itself moves it to bit 15. */
static inline __attribute__((always_inline)) void e4m3x32(const uint8_t *p, __mmask32 mask, __m512 *lo, __m512 *hi) {
    __m512i t = _mm512_slli_epi16(_mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(mask, p)), 7);
    t = _mm512_add_epi16(t, _mm512_and_si512(t, _mm512_set1_epi16(0x4000)));
    /* NaN (magnitude bits all set, which no finite e4m3fn value has): fp16 NaN with the sign */
    const __mmask32 nan = _mm512_cmpeq_epi16_mask(_mm512_and_si512(t, _mm512_set1_epi16(0x3f80)), _mm512_set1_epi16(0x3f80));
    t = _mm512_mask_blend_epi16(nan, t, _mm512_or_si512(t, _mm512_set1_epi16(0x7e00)));
    *lo = _mm512_cvtph_ps(_mm512_castsi512_si256(t));
    *hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(t, 1));
}

static inline __mmask32 lanes32(int64_t n) {
    return n >= 32 ? (__mmask32)0xffffffffu : n <= 0 ? (__mmask32)0 : (__mmask32)((1u << n) - 1);
}

typedef struct {
    const float *x, *xs, *ws;
    const uint8_t *w;
    float *out;
    int64_t M, K, N, blk, lo, hi;
} fp8_t;

/* rows [m0, m0 + mr) of x times weight row n -> out[m][n] */
static inline __attribute__((always_inline)) void fp8_row(const fp8_t *j, int64_t n, int64_t m0, const int mr) {
    const int64_t K = j->K, blk = j->blk, KB = (K + blk - 1) / blk;
    const uint8_t *wr = j->w + n * K;
    const float *wsr = j->ws + (n / blk) * KB;
    __m512 acc[FP8_MAXM], part[FP8_MAXM], part2[FP8_MAXM]; /* two chains a row: an FMA's latency is not the bound */
    for (int i = 0; i < mr; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < KB; b++) {
        const int64_t k0 = b * blk, k1 = k0 + blk < K ? k0 + blk : K;
        for (int i = 0; i < mr; i++) part[i] = part2[i] = _mm512_setzero_ps();
        int64_t k = k0;
        for (; k + 32 <= k1; k += 32) { /* whole 32-value steps, no masks */
            __m512 wl, wh;
            e4m3x32(wr + k, (__mmask32)0xffffffffu, &wl, &wh);
            for (int i = 0; i < mr; i++) {
                const float *xr = j->x + (m0 + i) * K + k;
                part[i] = _mm512_fmadd_ps(wl, _mm512_loadu_ps(xr), part[i]);
                part2[i] = _mm512_fmadd_ps(wh, _mm512_loadu_ps(xr + 16), part2[i]);
            }
        }
        if (k < k1) { /* the block's last values */
            const __mmask32 mask = lanes32(k1 - k);
            __m512 wl, wh;
            e4m3x32(wr + k, mask, &wl, &wh);
            for (int i = 0; i < mr; i++) {
                const float *xr = j->x + (m0 + i) * K + k;
                part[i] = _mm512_fmadd_ps(wl, _mm512_maskz_loadu_ps((__mmask16)mask, xr), part[i]);
                part2[i] = _mm512_fmadd_ps(wh, _mm512_maskz_loadu_ps((__mmask16)(mask >> 16), xr + 16), part2[i]);
            }
        }
        const float s = wsr[b] * 256.0f;
        for (int i = 0; i < mr; i++) {
            const float si = j->xs ? s * j->xs[(m0 + i) * KB + b] : s;
            acc[i] = _mm512_fmadd_ps(_mm512_add_ps(part[i], part2[i]), _mm512_set1_ps(si), acc[i]);
        }
    }
    __m512 v[16];
    float r[16];
    for (int i = 0; i < 16; i++) v[i] = i < mr ? acc[i] : _mm512_setzero_ps();
    _mm512_storeu_ps(r, reduce16(v));
    for (int i = 0; i < mr; i++) j->out[(m0 + i) * j->N + n] = r[i];
}

#define FP8_ROW(R) static void fp8_row_##R(const fp8_t *j, int64_t n, int64_t m0) { fp8_row(j, n, m0, R); }
FP8_ROW(1) FP8_ROW(2) FP8_ROW(3) FP8_ROW(4) FP8_ROW(5) FP8_ROW(6) FP8_ROW(7) FP8_ROW(8)
typedef void (*fp8_row_fn)(const fp8_t *, int64_t, int64_t);
static const fp8_row_fn FP8_ROWS[FP8_MAXM + 1] = {NULL, fp8_row_1, fp8_row_2, fp8_row_3, fp8_row_4,
                                                  fp8_row_5, fp8_row_6, fp8_row_7, fp8_row_8};

static void *fp8_run(void *arg) {
    const fp8_t *j = (const fp8_t *)arg;
    for (int64_t n = j->lo; n < j->hi; n++) {
        for (int64_t m0 = 0; m0 < j->M; m0 += FP8_MAXM) {
            const int mr = (int)(j->M - m0 < FP8_MAXM ? j->M - m0 : FP8_MAXM);
            FP8_ROWS[mr](j, n, m0); /* the second pass over a row reads it from L1 */
        }
    }
    return NULL;
}

/* ------------------------------------------------------------------ activations in 1 x blk tiles */

/* v (|v| <= 448) rounded to the nearest e4m3 value, ties to even: v scaled by 2^(3 - e) (exact), e = floor(log2 |v|)
 * but at least -6 (e4m3's subnormals share the quantum 2^-9), rounded to an integer, scaled back */
static inline __m512 round_e4m3(__m512 v) {
    const __m512 e = _mm512_max_ps(_mm512_getexp_ps(v), _mm512_set1_ps(-6.0f));
    const __m512 sh = _mm512_sub_ps(_mm512_set1_ps(3.0f), e);
    const __m512 t = _mm512_roundscale_ps(_mm512_scalef_ps(v, sh), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_scalef_ps(t, _mm512_sub_ps(_mm512_setzero_ps(), sh));
}

/* dsv3.fp8.quant.act_quant of x (M, K; fp32 or bf16 by bf) in 1 x blk tiles: xs (M, ceil(K / blk)) the tiles' scales
 * (amax / 448 in fp32, at least the smallest normal fp32; 1 for a tile of zeros or with a NaN; with ue8m0, rounded
 * up to a power of two) and xq (M, K) fp32 the e4m3 values of x / scale (clamped to +-448), as act_quant gives them.
 * Returns 0, or -3 for blk not a positive multiple of 16. */
int dsv3_fp8_act_quant(const void *x, int64_t M, int64_t K, int64_t blk, int ue8m0, int bf, float *xq, float *xs) {
    if (blk <= 0 || blk % 16) return -3;
    const int64_t KB = (K + blk - 1) / blk;
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < KB; b++) {
            const int64_t k0 = b * blk, k1 = k0 + blk < K ? k0 + blk : K;
            __m512 amax = _mm512_setzero_ps();
            __mmask16 nan = 0;
            for (int64_t k = k0; k < k1; k += 16) {
                const __m512 v = loadw_mask(x, m * K + k, lanes(k1 - k), bf);
                nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
                amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
            }
            const float a = _mm512_reduce_max_ps(amax);
            float s = a / 448.0f;
            if (s < 1.17549435e-38f) s = 1.17549435e-38f;
            if (!(a > 0) || nan) s = 1.0f;
            if (ue8m0) { /* the smallest power of two >= s (frexp: s = f 2^e, f in [0.5, 1)) */
                int e;
                const float f = frexpf(s, &e);
                s = ldexpf(1.0f, f == 0.5f ? e - 1 : e);
            }
            xs[m * KB + b] = s;
            const __m512 sv = _mm512_set1_ps(s), lim = _mm512_set1_ps(448.0f);
            for (int64_t k = k0; k < k1; k += 16) {
                const __mmask16 mask = lanes(k1 - k);
                __m512 v = _mm512_div_ps(loadw_mask(x, m * K + k, mask, bf), sv);
                /* clamp as torch.clamp does (a NaN stays NaN) */
                v = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, lim, _CMP_GT_OQ), v, lim);
                v = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, _mm512_sub_ps(_mm512_setzero_ps(), lim), _CMP_LT_OQ), v,
                                         _mm512_sub_ps(_mm512_setzero_ps(), lim));
                _mm512_mask_storeu_ps(xq + m * K + k, mask, round_e4m3(v));
            }
        }
    return 0;
}

/* ------------------------------------------------------------------ the product */

/* out (M, N) fp32 = x (M, K) fp32 times w (N, K) e4m3 bytes with block scales ws (ceil(N / blk), ceil(K / blk))
 * and, if xs is not NULL, activation scales xs (M, ceil(K / blk)); all contiguous. Returns 0, or -3 for
 * unsupported sizes (blk not a positive multiple of 16). */
int dsv3_fp8_linear(const float *x, const float *xs, const uint8_t *w, const float *ws, float *out, int64_t M,
                    int64_t K, int64_t N, int64_t blk, int nthreads) {
    if (blk <= 0 || blk % 16) return -3;
    if (M == 0 || N == 0) return 0;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAXT) nthreads = MAXT;
    if (N < 64 * nthreads) nthreads = 1;
    fp8_t jobs[MAXT];
    for (int t = 0; t < nthreads; t++) {
        fp8_t j = {x, xs, ws, w, out, M, K, N, blk, 0, 0};
        split(N, t, nthreads, &j.lo, &j.hi);
        jobs[t] = j;
    }
    return run_threads(fp8_run, jobs, sizeof(fp8_t), nthreads);
}
