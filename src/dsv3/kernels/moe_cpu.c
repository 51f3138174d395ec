/* Few-row products of decode steps on x86 CPUs with AVX-512 (dsv3.kernels.cpu builds and loads this).
 *
 * A decode step multiplies a few rows (one per sequence) by each weight matrix: the products read the
 * weights once and are bound by memory bandwidth. Eager PyTorch's small-M GEMMs read them below that
 * bandwidth, and for the routed experts it spends more on dispatching the small products, and on the
 * sort / gather / scatter around them, than on the products. Two kernels:
 *
 *   dsv3_linear: out = x w^T for M rows (the projections of attention and of the dense MLPs; bf16 weights
 *                packed by dsv3_pack_bf16);
 *   dsv3_moe:    the routed experts of T tokens: every chosen expert's three matrices are read
 *                once, in order, for all of that expert's tokens:
 *                  h_p   = silu(w1_e x_t) * (w3_e x_t)             for each (token t, expert e) pair p
 *                  out_t = sum over t's experts e, ascending, of g_te * (w2_e h_p)
 *
 * The rows are packed ([k / 16][m][16], zero-padded in k) so the inner loop reads one stream of them
 * (rows 2 KB apart would share L1 sets with each other and with the weight rows). Each output value is
 * one dot product evaluated the same way whatever the other rows are (a 16-wide accumulator per value,
 * fixed order of its partial sums and of their reduction): a row's result does not depend on the batch.
 * dsv3_linear in bf16 takes its weight packed instead (dsv3_pack_bf16) and sums each value in order over k
 * in a lane of its own (see linear_bf16): no reduction, and at 16 rows ~1.5x the rate.
 *
 * dtypes: fp32, or bf16 (weights, rows and outputs in bf16; products and sums in fp32, each output rounded
 * to bf16 once, as PyTorch's bf16 GEMMs do; the experts round their intermediate values to bf16 where
 * the PyTorch path materialises them in bf16).
 *
 * Threads: the matrix rows are split across nthreads OpenMP threads (for the experts: phase 1 the w1/w3
 * rows, then phase 2 the w2 rows); the arithmetic of a value does not depend on the split.
 */
#include "common.h"

#define MAXM 8 /* rows computed together (their accumulators stay in registers) */
#ifndef PREFETCH
#define PREFETCH 1024 /* values ahead in a weight row stream (4 KB of fp32; 512-1536 measured alike on `small`) */
#endif
#ifndef FAR_BYTES
/* how far ahead in a thread's own sequence of weight rows (across experts) the rows are fetched into L2. The
 * near prefetch above runs out of L1 fill buffers; the hardware's L2 streamer alone falls behind once a few
 * instructions per line sit between the loads. 16-32 KB measured alike; see dots_rm. */
#define FAR_BYTES 32768
#endif

/* whether the far fetch runs (dsv3_far_fetch: for A/B comparisons, benchmarks/kernels_bench.py --ab far-fetch; it
 * changes no value) */
static int g_far = 1;

int dsv3_far_fetch(int on) {
    int prev = g_far;
    if (on >= 0) g_far = on != 0;
    return prev;
}

/* rows[0..M) (K values each, fp32 or bf16) packed for the dot products: dp = 0, [kblocks(K)][M][16] fp32; dp = 1
 * (bf16 dot products), [(K + 31) / 32][M][32] bf16 (fp32 rows then hold bf16 numbers, converted exactly). The
 * block is zero-padded; either layout fits in kblocks(K) * 16 * M floats. */
static void pack(const void *const *rows, int bf, int dp, int M, int64_t K, float *dst) {
    const int64_t w = dp ? 32 : 16, nb = (K + w - 1) / w;
    for (int64_t b = 0; b < nb; b++) {
        int64_t k = b * w, n = K - k < w ? K - k : w;
        for (int m = 0; m < M; m++) {
            const char *src = rows[m];
            if (dp) {
                uint16_t *d = (uint16_t *)dst + (b * M + m) * 32;
                for (int64_t i = 0; i < n; i++) d[i] = bf ? ((const uint16_t *)src)[k + i] : f2bf(((const float *)src)[k + i]);
                memset(d + n, 0, (size_t)(32 - n) * 2);
            } else {
                float *d = dst + (b * M + m) * 16;
                for (int64_t i = 0; i < n; i++) d[i] = bf ? bf2f(((const uint16_t *)src)[k + i]) : ((const float *)src)[k + i];
                memset(d + n, 0, (size_t)(16 - n) * sizeof(float));
            }
        }
    }
}

/* res[r][m] = the sum of acc[r][m]'s lanes, for R * M <= 16 accumulators: one reduce16 tree whatever R and M
 * are (unused slots are zeros, and x + 0 = x), so a value's summation order does not depend on the batch */
static inline __attribute__((always_inline)) void reduce_acc(__m512 acc[2][MAXM], const int R, const int M,
                                                             float res[][MAXM]) {
    __m512 v[16];
    float s[16];
    for (int i = 0; i < 16; i++) v[i] = i < R * M ? acc[i / M][i % M] : _mm512_setzero_ps();
    _mm512_storeu_ps(s, reduce16(v));
    for (int i = 0; i < R * M; i++) res[i / M][i % M] = s[i];
}

/* dot products of R weight rows w[r] (K values each, fp32 or bf16) with the M packed rows xp ->
 * res[r][m]; R, M and the weight dtype are compile-time constants in each specialisation below. far[r]: a row of
 * the same size read later (a row ahead in the caller's order; w[r] itself when there is none), fetched into L2
 * meanwhile, one line per 64 bytes of w[r] read */
static inline __attribute__((always_inline)) void dots_rm(const void *const *w, const void *const *far, const int R,
                                                          const float *xp, const int M, int64_t K, float res[][MAXM],
                                                          const int bf) {
    __m512 acc[2][MAXM];
    const int64_t es = bf ? 2 : 4;
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) acc[r][m] = _mm512_setzero_ps();
    int64_t full = K / 16, b = 0;
    for (; b < full; b++) {
        __m512 wv[2];
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)w[r] + (b * 16 + PREFETCH) * es, _MM_HINT_T0);
            if (!bf || !(b & 1)) _mm_prefetch((const char *)far[r] + b * 16 * es, _MM_HINT_T1); /* each line once */
            wv[r] = loadw(w[r], b * 16, bf);
        }
        for (int m = 0; m < M; m++) {
            __m512 xv = _mm512_loadu_ps(xp + (b * M + m) * 16);
            for (int r = 0; r < R; r++) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
        }
    }
    if (full * 16 < K) {
        __mmask16 mask = lanes(K - full * 16);
        __m512 wv[2];
        for (int r = 0; r < R; r++) wv[r] = loadw_mask(w[r], b * 16, mask, bf);
        for (int m = 0; m < M; m++) {
            __m512 xv = _mm512_loadu_ps(xp + (b * M + m) * 16);
            for (int r = 0; r < R; r++) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
        }
    }
    reduce_acc(acc, R, M, res);
}

typedef void (*dots_fn)(const void *const *, const void *const *, const float *, int64_t, float[][MAXM]);
#define DOTS(B, R, M) static void dots_##B##_##R##_##M(const void *const *w, const void *const *far, const float *xp, \
                                                      int64_t K, float res[][MAXM]) { dots_rm(w, far, R, xp, M, K, res, B); }
#define DOTS_M(B, R) DOTS(B, R, 1) DOTS(B, R, 2) DOTS(B, R, 3) DOTS(B, R, 4) DOTS(B, R, 5) DOTS(B, R, 6) \
    DOTS(B, R, 7) DOTS(B, R, 8)
DOTS_M(0, 1)
DOTS_M(0, 2)
DOTS_M(1, 1)
DOTS_M(1, 2)
#define DOTS_ROW(B, R) {NULL, dots_##B##_##R##_1, dots_##B##_##R##_2, dots_##B##_##R##_3, dots_##B##_##R##_4, \
    dots_##B##_##R##_5, dots_##B##_##R##_6, dots_##B##_##R##_7, dots_##B##_##R##_8}
/* DOTS_BY[bf][R - 1][M]: R weight rows (1 or 2) of dtype bf (0 fp32, 1 bf16) with M packed rows */
static const dots_fn DOTS_BY[2][2][MAXM + 1] = {{DOTS_ROW(0, 1), DOTS_ROW(0, 2)}, {DOTS_ROW(1, 1), DOTS_ROW(1, 2)}};

/* bf16 on CPUs with AVX512-BF16: the products as vdpbf16ps dot products (each instruction multiplies 32 bf16
 * pairs exactly and adds them, two per fp32 lane, into 16 fp32 sums), half the instructions of widening every
 * value first. The rows are then packed as bf16, [k / 32][m][32], and every row count takes this path, so a
 * row's result still does not depend on the batch. (DPBF16PS treats subnormal bf16 inputs as zero.) */
static int g_dp = -1;

static int dp_on(void) {
    if (g_dp < 0) g_dp = __builtin_cpu_supports("avx512bf16") ? 1 : 0;
    return g_dp;
}

/* whether bf16 products use the dot-product instruction; on >= 0 sets it (where the CPU has it), -1 only reads
 * it. Returns the setting before the call. */
int dsv3_bf16_dot(int on) {
    int prev = dp_on();
    if (on >= 0) g_dp = on && __builtin_cpu_supports("avx512bf16");
    return prev;
}

__attribute__((target("avx512bf16"))) static inline __attribute__((always_inline)) void dots_dp_rm(
    const void *const *w, const void *const *far, const int R, const uint16_t *xp, const int M, int64_t K,
    float res[][MAXM]) {
    __m512 acc[2][MAXM];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) acc[r][m] = _mm512_setzero_ps();
    int64_t full = K / 32, b = 0;
    for (; b < full; b++) {
        __m512bh wv[2];
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)w[r] + (b * 32 + PREFETCH) * 2, _MM_HINT_T0);
            _mm_prefetch((const char *)far[r] + b * 64, _MM_HINT_T1);
            wv[r] = (__m512bh)_mm512_loadu_si512((const uint16_t *)w[r] + b * 32);
        }
        for (int m = 0; m < M; m++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(xp + (b * M + m) * 32);
            for (int r = 0; r < R; r++) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv[r], xv);
        }
    }
    if (full * 32 < K) {
        __mmask32 mask = (__mmask32)((1ull << (K - full * 32)) - 1);
        __m512bh wv[2];
        for (int r = 0; r < R; r++) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, (const uint16_t *)w[r] + b * 32);
        for (int m = 0; m < M; m++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(xp + (b * M + m) * 32);
            for (int r = 0; r < R; r++) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv[r], xv);
        }
    }
    reduce_acc(acc, R, M, res);
}

#define DOTS_DP(R, M) __attribute__((target("avx512bf16"))) static void dots_dp_##R##_##M( \
    const void *const *w, const void *const *far, const float *xp, int64_t K, float res[][MAXM]) { \
        dots_dp_rm(w, far, R, (const uint16_t *)xp, M, K, res); }
#define DOTS_DP_M(R) DOTS_DP(R, 1) DOTS_DP(R, 2) DOTS_DP(R, 3) DOTS_DP(R, 4) DOTS_DP(R, 5) DOTS_DP(R, 6) DOTS_DP(R, 7) \
    DOTS_DP(R, 8)
DOTS_DP_M(1)
DOTS_DP_M(2)
#define DOTS_DP_ROW(R) {NULL, dots_dp_##R##_1, dots_dp_##R##_2, dots_dp_##R##_3, dots_dp_##R##_4, dots_dp_##R##_5, \
    dots_dp_##R##_6, dots_dp_##R##_7, dots_dp_##R##_8}
static const dots_fn DOTS_DP_BY[2][MAXM + 1] = {DOTS_DP_ROW(1), DOTS_DP_ROW(2)};

/* the dot products of R weight rows of dtype bf with M rows packed for that dtype (dp: packed by pack with dp = 1) */
static inline dots_fn dots_for(int bf, int dp, int R, int M) { return dp ? DOTS_DP_BY[R - 1][M] : DOTS_BY[bf][R - 1][M]; }

/* ------------------------------------------------------------------ routed experts */

/* The (token, expert) pairs sorted by expert, each expert's run padded to a multiple of MAXM:
 * padded index q holds pair spairs[q] (= t * K + k) for q in [begin[e], begin[e] + count[e]); chunk
 * q / MAXM of the packed rows holds its MAXM rows. */
typedef struct {
    const float *xp, *gw, *hp;
    const char *w1, *w3, *w2; /* fp32 or bf16 (es bytes per value) */
    float *out, *h, *h3;      /* out: fp32 (T, D) sums; h, h3: (NP, I) the products of w1 and w3, then h the gated */
    const int64_t *begin, *count, *spairs;
    int64_t D, I, K, E, lo, hi; /* this thread's rows of the phase: [lo, hi) of I (phase 1) or of D (2) */
    int bf, dp; /* dp: bf16 products as dot products (rows packed by pack with dp = 1) */
} moe_t;

/* rows ahead for dots' far fetch: the row n rows after row i of the pass over chunk c of expert e, in this
 * thread's order of reads (every expert with tokens in ascending order, each of its chunks reading rows
 * [lo, hi) of the expert's matrix), as base + expert * mat + row * row_bytes; dflt where there is none */
static const void *row_ahead(const moe_t *j, const char *base, int64_t mat, int64_t row_bytes, int64_t e, int64_t c,
                             int64_t i, int64_t n, const void *dflt) {
    if (!g_far) return dflt;
    while (i + n >= j->hi) {
        n -= j->hi - i; /* now counted from the next pass's first row */
        i = j->lo;
        c += MAXM;
        if (c >= j->begin[e] + j->count[e]) {
            do e++;
            while (e < j->E && j->count[e] == 0);
            if (e >= j->E) return dflt;
            c = j->begin[e];
        }
    }
    return base + e * mat + (i + n) * row_bytes;
}

static inline int64_t far_rows(int64_t row_bytes) { return row_bytes >= FAR_BYTES ? 1 : FAR_BYTES / row_bytes; }

/* h_q[i] = silu(w1_e[i] . x_t) * (w3_e[i] . x_t) for this thread's i (bf16: each of the two products,
 * the silu and the result rounded to bf16, as the PyTorch path materialises them): the products first, then
 * each row's span gated 16 at a time */
static void *moe_phase1(void *arg) {
    const moe_t *j = (const moe_t *)arg;
    float res[2][MAXM];
    const int64_t chunk = kblocks(j->D) * 16 * MAXM, es = j->bf ? 2 : 4, rb = j->D * es, mat = j->I * rb;
    const int64_t ahead = far_rows(rb);
    for (int64_t e = 0; e < j->E; e++) {
        int64_t q0 = j->begin[e], q1 = q0 + j->count[e];
        const char *w1 = j->w1 + e * j->I * j->D * es, *w3 = j->w3 + e * j->I * j->D * es;
        for (int64_t c = q0; c < q1; c += MAXM) {
            int M = (int)(q1 - c < MAXM ? q1 - c : MAXM);
            const float *xp = j->xp + (c / MAXM) * chunk;
            dots_fn dots = dots_for(j->bf, j->dp, 2, M);
            for (int64_t i = j->lo; i < j->hi; i++) {
                const void *w[2] = {w1 + i * j->D * es, w3 + i * j->D * es};
                const void *far[2] = {row_ahead(j, j->w1, mat, rb, e, c, i, ahead, w[0]),
                                      row_ahead(j, j->w3, mat, rb, e, c, i, ahead, w[1])};
                dots(w, far, xp, j->D, res);
                for (int m = 0; m < M; m++) {
                    j->h[(c + m) * j->I + i] = res[0][m];
                    j->h3[(c + m) * j->I + i] = res[1][m];
                }
            }
            for (int m = 0; m < M; m++)
                gated_rows(j->h + (c + m) * j->I + j->lo, j->h3 + (c + m) * j->I + j->lo, j->hi - j->lo, 0, j->bf);
        }
    }
    return NULL;
}

/* out_t[d] += g_q * (w2_e[d] . h_q) for this thread's d, experts in ascending order */
static void *moe_phase2(void *arg) {
    const moe_t *j = (const moe_t *)arg;
    float res[2][MAXM];
    const int64_t chunk = kblocks(j->I) * 16 * MAXM, es = j->bf ? 2 : 4, rb = j->I * es, mat = j->D * rb;
    const int64_t ahead = far_rows(rb);
    for (int64_t e = 0; e < j->E; e++) {
        int64_t q0 = j->begin[e], q1 = q0 + j->count[e];
        const char *w2 = j->w2 + e * j->D * j->I * es;
        for (int64_t c = q0; c < q1; c += MAXM) {
            int M = (int)(q1 - c < MAXM ? q1 - c : MAXM);
            const float *hp = j->hp + (c / MAXM) * chunk;
            for (int64_t d = j->lo; d < j->hi; d += 2) {
                int R = j->hi - d >= 2 ? 2 : 1;
                const void *w[2] = {w2 + d * j->I * es, w2 + (d + R - 1) * j->I * es};
                const void *far[2] = {row_ahead(j, j->w2, mat, rb, e, c, d, ahead, w[0]),
                                      row_ahead(j, j->w2, mat, rb, e, c, d + R - 1, ahead, w[1])};
                dots_for(j->bf, j->dp, R, M)(w, far, hp, j->I, res);
                for (int m = 0; m < M; m++) {
                    int64_t p = j->spairs[c + m];
                    float *o = j->out + (p / j->K) * j->D + d;
                    for (int r = 0; r < R; r++) o[r] += j->gw[p] * (j->bf ? round_bf(res[r][m]) : res[r][m]);
                }
            }
        }
    }
    return NULL;
}

/* pack every expert's run of padded indices q, chunk by chunk (chunk q / MAXM of dst): row q is at
 * base + (map ? map[q] / div : q) * stride bytes, len values of dtype bf */
static void pack_runs(const int64_t *begin, const int64_t *count, int64_t E, const char *base, int64_t stride,
                      const int64_t *map, int64_t div, int bf, int dp, int64_t len, float *dst) {
    const void *rows[MAXM];
    for (int64_t e = 0; e < E; e++)
        for (int64_t c = begin[e]; c < begin[e] + count[e]; c += MAXM) {
            int M = (int)(begin[e] + count[e] - c < MAXM ? begin[e] + count[e] - c : MAXM);
            for (int m = 0; m < M; m++) rows[m] = base + (map ? map[c + m] / div : c + m) * stride;
            pack(rows, bf, dp, M, len, dst + (c / MAXM) * kblocks(len) * 16 * MAXM);
        }
}

/* x (T, D); w1, w3 (E, I, D); w2 (E, D, I), all fp32 (bf = 0) or all bf16 (bf = 1); idx (T, K) int64 expert
 * ids and gw (T, K) fp32 gate weights of each token; out (T, D) in the same dtype is overwritten.
 * Returns 0, -1 for an expert id out of range, -2 when memory could not be had (out is then
 * undefined). */
int dsv3_moe(const void *x, const void *w1, const void *w3, const void *w2, const int64_t *idx, const float *gw,
             void *out, int64_t T, int64_t D, int64_t I, int64_t K, int64_t E, int nthreads, int bf) {
    int64_t P = T * K;
    const int64_t es = bf ? 2 : 4;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAXT) nthreads = MAXT;
    for (int64_t p = 0; p < P; p++)
        if (idx[p] < 0 || idx[p] >= E) return -1;
    memset(out, 0, (size_t)(T * D * es));
    if (P == 0) return 0;
    int rc = 0;
    int64_t *count = calloc((size_t)E, sizeof(int64_t)), *begin = malloc((size_t)(E + 1) * sizeof(int64_t));
    int64_t *fill = malloc((size_t)E * sizeof(int64_t)), *spairs = NULL;
    float *xp = NULL, *hp = NULL, *h = NULL, *h3 = NULL, *acc = NULL;
    if (!count || !begin || !fill) { rc = -2; goto done; }
    for (int64_t p = 0; p < P; p++) count[idx[p]]++;
    begin[0] = 0;
    for (int64_t e = 0; e < E; e++) begin[e + 1] = begin[e] + (count[e] + MAXM - 1) / MAXM * MAXM;
    int64_t NP = begin[E], nch = NP / MAXM;
    spairs = malloc((size_t)NP * sizeof(int64_t));
    xp = aligned_alloc(64, (size_t)(nch * kblocks(D) * 16 * MAXM) * sizeof(float));
    hp = aligned_alloc(64, (size_t)(nch * kblocks(I) * 16 * MAXM) * sizeof(float));
    h = malloc((size_t)(NP * I) * sizeof(float));
    h3 = malloc((size_t)(NP * I) * sizeof(float));
    acc = bf ? calloc((size_t)(T * D), sizeof(float)) : (float *)out;
    if (!spairs || !xp || !hp || !h || !h3 || !acc) { rc = -2; goto done; }
    memcpy(fill, begin, (size_t)E * sizeof(int64_t));
    for (int64_t p = 0; p < P; p++) spairs[fill[idx[p]]++] = p; /* stable: token order within an expert */
    const int dp = bf && dp_on();
    pack_runs(begin, count, E, (const char *)x, D * es, spairs, K, bf, dp, D, xp); /* token rows */
    moe_t jobs[MAXT];
    for (int t = 0; t < nthreads; t++) {
        moe_t jb = {xp, gw, hp, w1, w3, w2, acc, h, h3, begin, count, spairs, D, I, K, E, 0, 0, bf, dp};
        split(I, t, nthreads, &jb.lo, &jb.hi);
        jobs[t] = jb;
    }
    if ((rc = run_threads(moe_phase1, jobs, sizeof(moe_t), nthreads)) != 0) goto done;
    pack_runs(begin, count, E, (const char *)h, I * (int64_t)sizeof(float), NULL, 1, 0, dp, I, hp); /* h rows */
    for (int t = 0; t < nthreads; t++) split(D, t, nthreads, &jobs[t].lo, &jobs[t].hi);
    if ((rc = run_threads(moe_phase2, jobs, sizeof(moe_t), nthreads)) != 0) goto done;
    if (bf)
        for (int64_t i = 0; i < T * D; i++) ((uint16_t *)out)[i] = f2bf(acc[i]);
done:
    if (bf) free(acc);
    free(count); free(begin); free(fill); free(spairs); free(xp); free(hp); free(h); free(h3);
    return rc;
}

/* ------------------------------------------------------------------ y = x w^T for a few rows */

/* bf16: w packed once (dsv3_pack_bf16) as [ceil(N / 16)][Kp / 2][16][2] (Kp = K rounded up to even, zero
 * padded): one 64-byte load holds k = 2i, 2i + 1 of 16 outputs, widened exactly to two fp32 vectors. Each output
 * is one fp32 sum over k in ascending order, a fused multiply-add per term, in a lane of its own: no reduction,
 * and the rows' values broadcast, so a tile of NB blocks of 16 outputs x MR rows costs one weight load per 2 * MR
 * multiply-adds. At 16 rows it runs the `small` preset's projections 1.5x as fast as the dot products reduced per
 * output (dsv3_linear's other form), weights read from memory (benchmarks/gemm_bench.py --decode). The order of a
 * value's sum does not depend on the rows or the tile, so a row's result does not depend on the batch; it is the
 * order of the prefill GEMM (gemm_cpu.c), so decode and prefill give a row the same values. */
void dsv3_pack_bf16(const uint16_t *w, int64_t N, int64_t K, uint16_t *dst) {
    const int64_t K2 = (K + 1) / 2, nb = (N + 15) / 16;
    memset(dst, 0, (size_t)(nb * K2 * 64));
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k++) dst[((n / 16) * K2 + k / 2) * 32 + (n % 16) * 2 + k % 2] = w[n * K + k];
}

typedef struct {
    const float *xf; /* the rows widened to fp32, (M, 2 * K2) */
    const uint16_t *wp;
    uint16_t *out;
    int64_t M, K2, N, lo, hi; /* this thread's blocks of 16 outputs [lo, hi) */
} lb_t;

/* NB blocks from b x MR rows from m0 (NB, MR compile-time constants in each specialisation below) */
static inline __attribute__((always_inline)) void lb_tile(const lb_t *j, int64_t b, const int NB, int64_t m0,
                                                          const int MR) {
    __m512 acc[4][16];
    const uint16_t *wb[4];
    const int64_t K2 = j->K2, Kp = 2 * K2, bs = K2 * 32; /* values a block */
    /* the first row group streams the weights: it fetches ahead, into L2 whole tiles ahead as long as they are
     * this thread's (past the end of a small matrix they would only cost bandwidth) */
    const int64_t tiles = (FAR_BYTES + NB * bs * 2 - 1) / (NB * bs * 2);
    const int fetch = m0 == 0, fetch_far = fetch && g_far && b + (tiles + 1) * NB <= j->hi;
    const int64_t far = tiles * NB * bs * 2; /* bytes */
    for (int c = 0; c < NB; c++) {
        wb[c] = j->wp + (b + c) * bs;
        for (int m = 0; m < MR; m++) acc[c][m] = _mm512_setzero_ps();
    }
    const float *x = j->xf + m0 * Kp;
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000u);
    for (int64_t i = 0; i < K2; i++) {
        __m512 we[4], wo[4];
        for (int c = 0; c < NB; c++) {
            if (fetch) _mm_prefetch((const char *)(wb[c] + i * 32) + 2048, _MM_HINT_T0);
            if (fetch_far) _mm_prefetch((const char *)(wb[c] + i * 32) + far, _MM_HINT_T1);
            __m512i v = _mm512_loadu_si512(wb[c] + i * 32);
            we[c] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            wo[c] = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
        }
        for (int m = 0; m < MR; m++) {
            __m512 xe = _mm512_set1_ps(x[m * Kp + 2 * i]), xo = _mm512_set1_ps(x[m * Kp + 2 * i + 1]);
            for (int c = 0; c < NB; c++) acc[c][m] = _mm512_fmadd_ps(wo[c], xo, _mm512_fmadd_ps(we[c], xe, acc[c][m]));
        }
    }
    for (int c = 0; c < NB; c++)
        for (int m = 0; m < MR; m++) store16(j->out + (m0 + m) * j->N, (b + c) * 16, acc[c][m], j->N - (b + c) * 16, 1);
}

typedef void (*lb_fn)(const lb_t *, int64_t, int64_t);
#define LB(NB, MR) static void lb_##NB##_##MR(const lb_t *j, int64_t b, int64_t m0) { lb_tile(j, b, NB, m0, MR); }
LB(1, 1) LB(1, 2) LB(1, 3) LB(1, 4) LB(1, 5) LB(1, 6) LB(1, 7) LB(1, 8) LB(1, 9) LB(1, 10) LB(1, 11) LB(1, 12) LB(1, 13)
LB(1, 14) LB(1, 15) LB(1, 16)
LB(2, 1) LB(2, 2) LB(2, 3) LB(2, 4) LB(2, 5) LB(2, 6) LB(2, 7) LB(2, 8)
LB(4, 1) LB(4, 2) LB(4, 3) LB(4, 4)
static const lb_fn LB1[17] = {NULL, lb_1_1, lb_1_2, lb_1_3, lb_1_4, lb_1_5, lb_1_6, lb_1_7, lb_1_8, lb_1_9, lb_1_10,
                              lb_1_11, lb_1_12, lb_1_13, lb_1_14, lb_1_15, lb_1_16};
static const lb_fn LB2[9] = {NULL, lb_2_1, lb_2_2, lb_2_3, lb_2_4, lb_2_5, lb_2_6, lb_2_7, lb_2_8};
static const lb_fn LB4[5] = {NULL, lb_4_1, lb_4_2, lb_4_3, lb_4_4};

/* the blocks per tile for M rows: more blocks where there are fewer rows to share a weight load with */
static inline int lb_blocks(int64_t M) { return M <= 4 ? 4 : M <= 16 ? 2 : 1; }

static void *lb_run(void *arg) {
    const lb_t *j = (const lb_t *)arg;
    const int NB = lb_blocks(j->M);
    for (int64_t b = j->lo; b < j->hi;) {
        const int nb = j->hi - b >= NB ? NB : 1; /* the thread's last blocks one at a time */
        const int rg = nb == 2 ? 8 : 16; /* rows per group */
        for (int64_t m0 = 0; m0 < j->M; m0 += rg) { /* the tile's weights stay in L1 across the row groups */
            const int mr = (int)(j->M - m0 < rg ? j->M - m0 : rg);
            (nb == 4 ? LB4[mr] : nb == 2 ? LB2[mr] : LB1[mr])(j, b, m0);
        }
        b += nb;
    }
    return NULL;
}

/* out (M, N) bf16 = x (M, K) bf16 times w (N, K)^T packed by dsv3_pack_bf16 */
static int linear_bf16(const uint16_t *x, const uint16_t *wp, uint16_t *out, int64_t M, int64_t K, int64_t N,
                       int nthreads) {
    const int64_t K2 = (K + 1) / 2, nb = (N + 15) / 16;
    float *xf = aligned_alloc(64, (size_t)(M * 2 * K2) * sizeof(float));
    if (!xf) return -2;
    for (int64_t m = 0; m < M; m++) {
        widen(x + m * K, 1, K, xf + m * 2 * K2);
        if (K % 2) xf[m * 2 * K2 + K] = 0.0f;
    }
    const int NB = lb_blocks(M);
    lb_t jobs[MAXT];
    for (int t = 0; t < nthreads; t++) { /* whole tiles per thread */
        lb_t jb = {xf, wp, out, M, K2, N, 0, 0};
        split((nb + NB - 1) / NB, t, nthreads, &jb.lo, &jb.hi);
        jb.lo *= NB;
        jb.hi = jb.hi * NB < nb ? jb.hi * NB : nb;
        jobs[t] = jb;
    }
    int rc = run_threads(lb_run, jobs, sizeof(lb_t), nthreads);
    free(xf);
    return rc;
}

typedef struct {
    const float *xp;
    const char *w;
    void *out;
    int64_t M, K, N, lo, hi;
    int bf, dp; /* dp: bf16 products as dot products (rows packed by pack with dp = 1) */
} lin_t;

static void *lin_run(void *arg) {
    const lin_t *j = (const lin_t *)arg;
    float res[2][MAXM];
    const int64_t chunk = kblocks(j->K) * 16 * MAXM, es = j->bf ? 2 : 4, ahead = far_rows(j->K * es);
    for (int64_t n = j->lo; n < j->hi; n += 2) { /* two weight rows at a time, in L1 across the chunks */
        int R = j->hi - n >= 2 ? 2 : 1;
        const void *w[2] = {j->w + n * j->K * es, j->w + (n + R - 1) * j->K * es};
        /* rows ahead (this thread's) into L2 during the first chunk; the rows themselves (in L1) after */
        const int fa = g_far && n + R - 1 + ahead < j->hi;
        const void *far[2] = {fa ? j->w + (n + ahead) * j->K * es : w[0], fa ? j->w + (n + R - 1 + ahead) * j->K * es : w[1]};
        for (int64_t m0 = 0; m0 < j->M; m0 += MAXM) {
            int M = (int)(j->M - m0 < MAXM ? j->M - m0 : MAXM);
            dots_for(j->bf, j->dp, R, M)(w, m0 == 0 ? far : w, j->xp + (m0 / MAXM) * chunk, j->K, res);
            for (int m = 0; m < M; m++)
                for (int r = 0; r < R; r++) {
                    int64_t o = (m0 + m) * j->N + n + r;
                    if (j->bf) ((uint16_t *)j->out)[o] = f2bf(res[r][m]);
                    else ((float *)j->out)[o] = res[r][m];
                }
        }
    }
    return NULL;
}

/* whether dsv3_linear takes bf16 weights packed (the default) or as they are (the dot products below, for A/B
 * comparisons: the caller passes the weights accordingly, dsv3.kernels.cpu.bf16_packed); on >= 0 sets it, -1 only
 * reads it. Returns the setting before the call. */
static int g_packed = 1;

int dsv3_bf16_packed(int on) {
    int prev = g_packed;
    if (on >= 0) g_packed = on != 0;
    return prev;
}

/* out (M, N) = x (M, K) w (N, K)^T, all contiguous, all fp32 (bf = 0), or all bf16 (bf = 1) with w packed by
 * dsv3_pack_bf16 (or as it is where dsv3_bf16_packed(0) was set). Returns 0, or -2 when memory could not be had
 * (out is then undefined). */
int dsv3_linear(const void *x, const void *w, void *out, int64_t M, int64_t K, int64_t N, int nthreads, int bf) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAXT) nthreads = MAXT;
    if (M == 0) return 0;
    if (bf && g_packed) return linear_bf16(x, w, out, M, K, N, nthreads);
    const int64_t nch = (M + MAXM - 1) / MAXM, chunk = kblocks(K) * 16 * MAXM, es = bf ? 2 : 4;
    const int dp = bf && dp_on();
    float *xp = aligned_alloc(64, (size_t)(nch * chunk) * sizeof(float));
    if (!xp) return -2;
    const void *rows[MAXM];
    for (int64_t m0 = 0; m0 < M; m0 += MAXM) {
        int n = (int)(M - m0 < MAXM ? M - m0 : MAXM);
        for (int m = 0; m < n; m++) rows[m] = (const char *)x + (m0 + m) * K * es;
        pack(rows, bf, dp, n, K, xp + (m0 / MAXM) * chunk);
    }
    lin_t jobs[MAXT];
    for (int t = 0; t < nthreads; t++) {
        lin_t jb = {xp, (const char *)w, out, M, K, N, 0, 0, bf, dp};
        split(N, t, nthreads, &jb.lo, &jb.hi);
        jobs[t] = jb;
    }
    int rc = run_threads(lin_run, jobs, sizeof(lin_t), nthreads);
    free(xp);
    return rc;
}
