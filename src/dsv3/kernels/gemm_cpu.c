/* The many-row products of prefill on AVX-512 CPUs, fp32 or bf16 (fp32 arithmetic, bf16 results rounded once):
 * out = x w^T with w in nn.Linear's (N, K) layout (dsv3_gemm), the routed experts of many tokens
 * (dsv3_moe_gemm) and MLA attention over decompressed keys (dsv3_prefill_attend).
 *
 * Each product packs NR columns of w at a time into an fp32 panel, [k][NR] (16 x 16 transposes of widened
 * values), then a register tile of up to MR rows x NR columns runs through the panel with FMAs, each row's x[k]
 * broadcast to every lane. A sum is sum_k x[k] w[k] in ascending k, in fp32 (products of bf16 values are exact
 * in fp32), whatever the other rows or the tiling (batch-invariant). On the CPUs this project measures, PyTorch's
 * CPU bf16 GEMM is ~1.8x slower than its fp32 one (benchmarks/gemm_bench.py) and vdpbf16ps dot products gain
 * nothing over widening (benchmarks/kernels_bench.py --ab bf16-dot), so bf16 products are fp32 FMAs on widened
 * values here (docs/engine.md, "Prefill kernels"). */
#include "common.h"

#define NR 64 /* columns per panel: four vectors */
#define MR 6  /* rows per register tile: 6 x 4 accumulators + 4 panel vectors + 1 broadcast of 32 registers */

/* the panel of columns [n0, n0 + nn) of w (N, K; fp32 or bf16), as fp32 and zero beyond nn: dst[k * NR + j] =
 * w[n0 + j][k], 16 x 16 blocks at a time */
static void pack_panel(const void *w, int64_t K, int64_t n0, int64_t nn, int bf, float *dst) {
    const int64_t es = bf ? 2 : 4;
    __m512 r[16];
    for (int64_t j0 = 0; j0 < NR; j0 += 16)
        for (int64_t k0 = 0; k0 < K; k0 += 16) {
            int64_t kn = K - k0 < 16 ? K - k0 : 16;
            __mmask16 km = lanes(kn);
            for (int j = 0; j < 16; j++)
                r[j] = j0 + j < nn ? loadw_mask((const char *)w + (n0 + j0 + j) * K * es, k0, km, bf) : _mm512_setzero_ps();
            transpose16(r);
            for (int64_t k = 0; k < kn; k++) _mm512_store_ps(dst + (k0 + k) * NR + j0, r[k]);
        }
}

/* fp32 rows a[0..mr) (K values each) times the panel -> o[i][0 .. nn), bf16 (rounded) or fp32 */
static inline __attribute__((always_inline)) void tile(const float *const *a, const float *panel, int64_t K,
                                                        const int mr, int64_t nn, void *const *o, const int bf) {
    __m512 acc[MR][4];
    rows_x64(a, mr, panel, NR, K, acc);
    for (int i = 0; i < mr; i++)
        for (int c = 0; c < 4 && c * 16 < nn; c++) store16(o[i], c * 16, acc[i][c], nn - c * 16, bf);
}

#define TILE(R, BF) \
    static void tile_##R##_##BF(const float *const *a, const float *panel, int64_t K, int64_t nn, void *const *o) { \
        tile(a, panel, K, R, nn, o, BF); \
    }
#define TILES_OF(BF) TILE(1, BF) TILE(2, BF) TILE(3, BF) TILE(4, BF) TILE(5, BF) TILE(6, BF)
TILES_OF(0)
TILES_OF(1)
typedef void (*tile_fn)(const float *const *, const float *, int64_t, int64_t, void *const *);
static const tile_fn TILES[2][MR + 1] = {{NULL, tile_1_0, tile_2_0, tile_3_0, tile_4_0, tile_5_0, tile_6_0},
                                         {NULL, tile_1_1, tile_2_1, tile_3_1, tile_4_1, tile_5_1, tile_6_1}};

/* ------------------------------------------------------------------ out = x w^T */

/* one product over rows already widened to fp32: row m of a is a + m * K; row m of out is out + m * ldo */
typedef struct {
    const float *a;
    const void *w;
    void *out;
    float *buf; /* this thread's panel */
    int64_t ldo, M, K, N;
    int64_t plo, phi, mlo, mhi; /* this thread's panels and rows */
    int bf;
} gemm_t;

static void *gemm_run(void *arg) {
    const gemm_t *g = (const gemm_t *)arg;
    const float *a[MR];
    void *o[MR];
    const int64_t es = g->bf ? 2 : 4;
    for (int64_t pb = g->plo; pb < g->phi; pb++) {
        int64_t n0 = pb * NR, nn = g->N - n0 < NR ? g->N - n0 : NR;
        pack_panel(g->w, g->K, n0, nn, g->bf, g->buf);
        for (int64_t m0 = g->mlo; m0 < g->mhi; m0 += MR) {
            int mr = (int)(g->mhi - m0 < MR ? g->mhi - m0 : MR);
            for (int i = 0; i < mr; i++) {
                a[i] = g->a + (m0 + i) * g->K;
                o[i] = (char *)g->out + ((m0 + i) * g->ldo + n0) * es;
            }
            TILES[g->bf][mr](a, g->buf, g->K, nn, o);
        }
    }
    return NULL;
}

/* a (M, K) fp32 = the rows of x, row m at x + (rows ? rows[m] / rdiv : m) * ldx (elements), widened */
static void widen_rows(const void *x, int64_t ldx, const int64_t *rows, int64_t rdiv, int64_t M, int64_t K, int bf,
                       float *a) {
    const int64_t es = bf ? 2 : 4;
    for (int64_t m = 0; m < M; m++) widen((const char *)x + (rows ? rows[m] / rdiv : m) * ldx * es, bf, K, a + m * K);
}

/* out = a w^T for rows a (M, K) already widened (widen_rows), using buf (nthreads * K * NR floats: the panels). The
 * threads take whole panels where there are enough, else rows (each packing every panel). */
static int gemm_widened(const float *a, const void *w, void *out, int64_t ldo, int64_t M, int64_t K, int64_t N,
                        int nthreads, int bf, float *buf) {
    if (M == 0 || N == 0) return 0;
    const int64_t np = (N + NR - 1) / NR;
    gemm_t jobs[MAXT];
    for (int t = 0; t < nthreads; t++) {
        gemm_t g = {a, w, out, buf + (size_t)t * (size_t)(K * NR), ldo, M, K, N, 0, np, 0, M, bf};
        if (np >= nthreads) split(np, t, nthreads, &g.plo, &g.phi);
        else split(M, t, nthreads, &g.mlo, &g.mhi);
        jobs[t] = g;
    }
    return run_threads(gemm_run, jobs, sizeof(gemm_t), nthreads);
}

static int threads_for(int nthreads, int64_t M, int64_t N) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAXT) nthreads = MAXT;
    if ((N + NR - 1) / NR < nthreads && M < (int64_t)nthreads * MR) nthreads = 1;
    return nthreads;
}

/* out (M, N) = x (M, K) w (N, K)^T, all fp32 (bf = 0) or all bf16 (bf = 1); row m of x at x + m * ldx, of out
 * at out + m * ldo (elements), w contiguous. Returns 0, or -2 when memory could not be had. */
int dsv3_gemm(const void *x, int64_t ldx, const void *w, void *out, int64_t ldo, int64_t M, int64_t K, int64_t N,
              int nthreads, int bf) {
    if (M == 0 || N == 0) return 0;
    nthreads = threads_for(nthreads, M, N);
    float *a = aligned_alloc(64, (size_t)(M * K) * sizeof(float) + 64);
    float *buf = aligned_alloc(64, (size_t)nthreads * (size_t)(K * NR) * sizeof(float) + 64);
    int rc = -2;
    if (a && buf) {
        widen_rows(x, ldx, NULL, 1, M, K, bf, a);
        rc = gemm_widened(a, w, out, ldo, M, K, N, nthreads, bf, buf);
    }
    free(a); free(buf);
    return rc;
}

/* ------------------------------------------------------------------ routed experts of many tokens */

/* The routed experts of many tokens, with dsv3_moe's arguments and values (h = silu(w1 x) * (w3 x), in bf16 each
 * product rounded as the PyTorch path materialises it; y = w2 h; each token's sum of g * y over its experts in
 * ascending expert order in fp32, rounded once in bf16), the products as the GEMMs above over each expert's
 * tokens. Returns 0, -1 for an expert id out of range, -2 when memory could not be had. */
int dsv3_moe_gemm(const void *x, const void *w1, const void *w3, const void *w2, const int64_t *idx, const float *gw,
                  void *out, int64_t T, int64_t D, int64_t I, int64_t K, int64_t E, int nthreads, int bf) {
    const int64_t P = T * K, es = bf ? 2 : 4;
    for (int64_t p = 0; p < P; p++)
        if (idx[p] < 0 || idx[p] >= E) return -1;
    memset(out, 0, (size_t)(T * D * es));
    if (P == 0) return 0;
    int rc = 0;
    int64_t *begin = calloc((size_t)E + 1, sizeof(int64_t)), *fill = malloc((size_t)E * sizeof(int64_t));
    int64_t *spairs = malloc((size_t)P * sizeof(int64_t));
    char *h1 = malloc((size_t)(P * I * es)), *h3 = malloc((size_t)(P * I * es)), *y = malloc((size_t)(P * D * es));
    float *acc = bf ? calloc((size_t)(T * D), sizeof(float)) : (float *)out, *a = NULL, *buf = NULL;
    if (!begin || !fill || !spairs || !h1 || !h3 || !y || !acc) { rc = -2; goto done; }
    for (int64_t p = 0; p < P; p++) begin[idx[p] + 1]++;
    for (int64_t e = 0; e < E; e++) begin[e + 1] += begin[e];
    memcpy(fill, begin, (size_t)E * sizeof(int64_t));
    for (int64_t p = 0; p < P; p++) spairs[fill[idx[p]]++] = p; /* stable: token order within an expert */
    int64_t most = 0, KD = D > I ? D : I;
    for (int64_t e = 0; e < E; e++) most = begin[e + 1] - begin[e] > most ? begin[e + 1] - begin[e] : most;
    nthreads = threads_for(nthreads, most, I < D ? I : D);
    a = aligned_alloc(64, (size_t)(most * KD) * sizeof(float) + 64);
    buf = aligned_alloc(64, (size_t)nthreads * (size_t)(KD * NR) * sizeof(float) + 64);
    if (!a || !buf) { rc = -2; goto done; }
    const int64_t wb = I * D * es; /* bytes of one expert's projection */
    for (int64_t e = 0; e < E && rc == 0; e++) {
        int64_t q0 = begin[e], n = begin[e + 1] - q0;
        if (n == 0) continue;
        const char *e1 = (const char *)w1 + e * wb, *e3 = (const char *)w3 + e * wb, *e2 = (const char *)w2 + e * wb;
        char *g1 = h1 + q0 * I * es, *g3 = h3 + q0 * I * es;
        widen_rows(x, D, spairs + q0, K, n, D, bf, a); /* the expert's token rows, once for w1 and w3 */
        if ((rc = gemm_widened(a, e1, g1, I, n, D, I, nthreads, bf, buf)) != 0) break;
        if ((rc = gemm_widened(a, e3, g3, I, n, D, I, nthreads, bf, buf)) != 0) break;
        gated_rows(g1, g3, n * I, bf, bf);
        widen_rows(g1, I, NULL, 1, n, I, bf, a);
        rc = gemm_widened(a, e2, y + q0 * D * es, D, n, I, D, nthreads, bf, buf);
    }
    if (rc != 0) goto done;
    for (int64_t q = 0; q < P; q++) { /* experts ascending, so each token's sum in ascending expert order */
        int64_t p = spairs[q];
        float *o = acc + (p / K) * D, g = gw[p];
        const char *yq = y + q * D * es;
        if (bf)
            for (int64_t d = 0; d < D; d++) o[d] += g * bf2f(((const uint16_t *)yq)[d]);
        else
            for (int64_t d = 0; d < D; d++) o[d] += g * ((const float *)yq)[d];
    }
    if (bf)
        for (int64_t i = 0; i < T * D; i++) ((uint16_t *)out)[i] = f2bf(acc[i]);
done:
    if (bf) free(acc);
    free(begin); free(fill); free(spairs); free(h1); free(h3); free(y); free(a); free(buf);
    return rc;
}

/* ------------------------------------------------------------------ MLA attention of many queries (naive form) */

/* The attention of prefill over decompressed keys and values, per (batch row, head): the keys' panels
 * (k = [k_nope of kvb, the shared rotated pe], NR keys each), the values' panels and the widened queries are
 * packed once, then each tile of MR queries gets its scores against the keys up to the last one any of its
 * rows may see (a causal prefill skips the rest), a softmax in fp32, and its outputs as P V through the same
 * register tiles; the output is rounded to bf16 once. */
typedef struct {
    const char *qn, *qp, *kvb, *pe;
    const uint8_t *mask;
    char *out;
    int64_t qn_sb, qn_ss, qn_sh, qp_sb, qp_ss, qp_sh, kv_sb, kv_sl, kv_sh, pe_sb, pe_sl;
    int64_t B, S, L, H, nope, R, V, lo, hi;
    float scale;
    int bf;
    float *qa, *kp, *vp, *sc; /* this thread's scratch */
} pattn_t;

/* keys the query row (b, s) may see: [0, lim) with the mask's holes (mask NULL: causal, lim = s + 1) */
static inline int64_t key_limit(const pattn_t *j, int64_t b, int64_t s) {
    if (!j->mask) return s + 1 < j->L ? s + 1 : j->L;
    const uint8_t *mr = j->mask + (b * j->S + s) * j->L;
    int64_t lim = j->L;
    while (lim > 0 && !mr[lim - 1]) lim--;
    return lim;
}

static void pattn_head(const pattn_t *j, int64_t b, int64_t h) {
    const int64_t es = j->bf ? 2 : 4, Dq = j->nope + j->R, L = j->L, nkp = (L + NR - 1) / NR;
    const int64_t nvp = (j->V + NR - 1) / NR, Lp = nkp * NR; /* Lp: a multiple of NR, so of 16 */
    /* queries, widened: qa[s] = [q_nope, q_pe] */
    for (int64_t s = 0; s < j->S; s++) {
        widen(j->qn + (b * j->qn_sb + s * j->qn_ss + h * j->qn_sh) * es, j->bf, j->nope, j->qa + s * Dq);
        widen(j->qp + (b * j->qp_sb + s * j->qp_ss + h * j->qp_sh) * es, j->bf, j->R, j->qa + s * Dq + j->nope);
    }
    /* key panels kp[p][d][jj] (16 keys at a time: their rows widened, then 16 x 16 transposes) and value
     * panels vp[c][l][jj], zero-padded */
    float rows[16][1024];
    __m512 r[16];
    for (int64_t l0 = 0; l0 < Lp; l0 += 16) {
        for (int64_t i = 0; i < 16; i++) {
            int64_t l = l0 + i;
            if (l < L) {
                const char *kv = j->kvb + (b * j->kv_sb + l * j->kv_sl + h * j->kv_sh) * es;
                widen(kv, j->bf, j->nope, rows[i]);
                widen(j->pe + (b * j->pe_sb + l * j->pe_sl) * es, j->bf, j->R, rows[i] + j->nope);
                for (int64_t c = 0; c < nvp; c++) {
                    float *dst = j->vp + (c * Lp + l) * NR;
                    int64_t n = j->V - c * NR < NR ? j->V - c * NR : NR;
                    widen(kv + (j->nope + c * NR) * es, j->bf, n, dst);
                    if (n < NR) memset(dst + n, 0, (size_t)(NR - n) * sizeof(float));
                }
            } else {
                memset(rows[i], 0, (size_t)Dq * sizeof(float));
                for (int64_t c = 0; c < nvp; c++) memset(j->vp + (c * Lp + l) * NR, 0, NR * sizeof(float));
            }
        }
        float *kd = j->kp + (l0 / NR) * Dq * NR + l0 % NR;
        for (int64_t d0 = 0; d0 < Dq; d0 += 16) {
            int64_t dn = Dq - d0 < 16 ? Dq - d0 : 16;
            __mmask16 dm = lanes(dn);
            for (int i = 0; i < 16; i++) r[i] = _mm512_maskz_loadu_ps(dm, rows[i] + d0);
            transpose16(r);
            for (int64_t d = 0; d < dn; d++) _mm512_store_ps(kd + (d0 + d) * NR, r[d]);
        }
    }
    const float *a[MR];
    void *o[MR];
    int64_t lim[MR];
    for (int64_t s0 = 0; s0 < j->S; s0 += MR) {
        int mr = (int)(j->S - s0 < MR ? j->S - s0 : MR);
        int64_t le = 0;
        for (int i = 0; i < mr; i++) {
            lim[i] = key_limit(j, b, s0 + i);
            le = lim[i] > le ? lim[i] : le;
            a[i] = j->qa + (s0 + i) * Dq;
            o[i] = j->sc + i * Lp;
        }
        if (le == 0) { /* no key visible to any row: zeros */
            for (int i = 0; i < mr; i++)
                memset(j->out + ((b * j->S + s0 + i) * j->H + h) * j->V * es, 0, (size_t)(j->V * es));
            continue;
        }
        for (int64_t p = 0; p * NR < le; p++) {
            void *op[MR];
            for (int i = 0; i < mr; i++) op[i] = (float *)o[i] + p * NR;
            TILES[0][mr](a, j->kp + p * Dq * NR, Dq, le - p * NR < NR ? le - p * NR : NR, op);
        }
        /* softmax over [0, le) of each row, the keys it may not see at 0 */
        for (int i = 0; i < mr; i++) {
            float *sr = j->sc + i * Lp;
            const uint8_t *mrow = j->mask ? j->mask + (b * j->S + s0 + i) * L : NULL;
            __m512 mx = _mm512_set1_ps(-INFINITY);
            for (int64_t l = 0; l < le; l += 16) {
                __mmask16 m = lanes(le - l);
                __mmask16 see = lanes(lim[i] - l);
                if (mrow) see &= _mm512_test_epi32_mask(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, mrow + l)),
                                                        _mm512_set1_epi32(0xff));
                __m512 v = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), see & m,
                                              _mm512_mul_ps(_mm512_loadu_ps(sr + l), _mm512_set1_ps(j->scale)));
                _mm512_storeu_ps(sr + l, v);
                mx = _mm512_max_ps(mx, v);
            }
            float mv = _mm512_reduce_max_ps(mx);
            if (mv == -INFINITY) { /* this row sees no key: zeros */
                memset(sr, 0, (size_t)le * sizeof(float));
                continue;
            }
            __m512 sum = _mm512_setzero_ps(), mvv = _mm512_set1_ps(mv);
            for (int64_t l = 0; l < le; l += 16) {
                __m512 e = vexp(_mm512_sub_ps(_mm512_loadu_ps(sr + l), mvv)); /* -inf - m -> 0 */
                __mmask16 m = lanes(le - l);
                e = _mm512_maskz_mov_ps(m, e);
                _mm512_storeu_ps(sr + l, e);
                sum = _mm512_add_ps(sum, e);
            }
            __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
            for (int64_t l = 0; l < le; l += 16) _mm512_storeu_ps(sr + l, _mm512_mul_ps(_mm512_loadu_ps(sr + l), inv));
        }
        for (int i = 0; i < mr; i++) a[i] = j->sc + i * Lp;
        for (int64_t c = 0; c < nvp; c++) {
            void *oo[MR];
            for (int i = 0; i < mr; i++) oo[i] = j->out + (((b * j->S + s0 + i) * j->H + h) * j->V + c * NR) * es;
            TILES[j->bf][mr](a, j->vp + c * Lp * NR, le, j->V - c * NR < NR ? j->V - c * NR : NR, oo);
        }
    }
}

static void *pattn_run(void *arg) {
    const pattn_t *j = (const pattn_t *)arg;
    for (int64_t bh = j->lo; bh < j->hi; bh++) pattn_head(j, bh / j->H, bh % j->H);
    return NULL;
}

/* out (B, S, H, V) contiguous = softmax(scale * q k^T) v per head, q = [q_nope (B, S, H, nope), q_pe (B, S, H, R)],
 * k = [kvb[..., :nope], pe broadcast over heads], v = kvb[..., nope:], for kvb (B, L, H, nope + V) and pe (B, L, R),
 * all addressed by the element strides given; mask (B, S, L) bool contiguous, or NULL for causal with L == S. All
 * fp32 (bf = 0) or bf16 (bf = 1); scores and softmax in fp32. A query row that may see no key gets zeros.
 * Returns 0, -2 when memory could not be had, -3 when nope + R or V exceeds 1024 or the sizes do not fit. */
int dsv3_prefill_attend(const void *qn, int64_t qn_sb, int64_t qn_ss, int64_t qn_sh, const void *qp, int64_t qp_sb,
                        int64_t qp_ss, int64_t qp_sh, const void *kvb, int64_t kv_sb, int64_t kv_sl, int64_t kv_sh,
                        const void *pe, int64_t pe_sb, int64_t pe_sl, const uint8_t *mask, void *out, int64_t B,
                        int64_t S, int64_t L, int64_t H, int64_t nope, int64_t R, int64_t V, float scale, int nthreads,
                        int bf) {
    if (nope + R > 1024 || V > 1024 || (!mask && L != S) || B < 0 || S < 0 || L < 0 || H < 0) return -3;
    if (B * S * H == 0) return 0;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAXT) nthreads = MAXT;
    if (nthreads > B * H) nthreads = (int)(B * H);
    const int64_t Lp = (L + NR - 1) / NR * NR, Dq = nope + R, nvp = (V + NR - 1) / NR;
    const size_t per = ((size_t)(S * Dq + Lp * Dq + nvp * Lp * NR + MR * Lp) + 15) / 16 * 16; /* 64-byte multiples */
    float *scratch = aligned_alloc(64, (size_t)nthreads * per * sizeof(float) + 64);
    if (!scratch) return -2;
    pattn_t jobs[MAXT];
    for (int t = 0; t < nthreads; t++) {
        float *base = scratch + (size_t)t * per;
        pattn_t jb = {(const char *)qn, (const char *)qp, (const char *)kvb, (const char *)pe, mask, (char *)out,
                      qn_sb, qn_ss, qn_sh, qp_sb, qp_ss, qp_sh, kv_sb, kv_sl, kv_sh, pe_sb, pe_sl,
                      B, S, L, H, nope, R, V, 0, 0, scale, bf, NULL, NULL, NULL, NULL};
        /* 64-byte aligned pieces: the panels are read with aligned loads */
        jb.kp = base;
        jb.vp = jb.kp + Lp * Dq;
        jb.sc = jb.vp + nvp * Lp * NR;
        jb.qa = jb.sc + MR * Lp;
        split(B * H, t, nthreads, &jb.lo, &jb.hi);
        jobs[t] = jb;
    }
    int rc = run_threads(pattn_run, jobs, sizeof(pattn_t), nthreads);
    free(scratch);
    return rc;
}
