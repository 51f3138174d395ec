/* The candidate search of the greedy head screen (dsv3/infer/screen.py, GreedyHead._candidates) in one call:
 * the same fp32 arithmetic as the PyTorch twin, in the same order, so the same candidates, without the ~40
 * tensor ops (and the passes over the (R, V) approximate logits) the twin takes per step. */
#include "common.h"

#define VB 16 /* the int8 product's vocabulary rows per packed block (below) */
#define VG 3  /* blocks per tile: 48 rows */
#define I8_TILE_ROWS (VB * VG)

typedef struct {
    const float *a, *t, *f, *c, *m; /* a (R, V); terms t (3, R); factors f (3, V); chunk factors c (3, n); maxima m (3) */
    const float *cmx; /* the chunk maxima of a (R, ncm), from dsv3_head_i8, or NULL (computed here) */
    int64_t ncm;
    int64_t R, V, CH;
    float band, eps; /* bf16 band (0 for fp32 heads) and the 2^-20 rounding slack */
    int64_t *row_of, *ids;
    float *av; /* scratch of cap values */
    int64_t cap;
} screen_t;

static inline float bnd(const float *f, int64_t V, int64_t i, float t0, float t1, float t2) {
    return f[i] * t0 + f[V + i] * t1 + f[2 * V + i] * t2;
}

/* the candidates of row r appended at out[*n ...], cm: scratch of V / CH floats; returns 0, or -2 when more than
 * cap in all */
static int screen_row(const screen_t *s, int64_t r, float *cm, int64_t *n) {
    const int64_t V = s->V, CH = s->CH, nch = V / CH, body = nch * CH;
    const float *a = s->a + r * V;
    const float t0 = s->t[r], t1 = s->t[s->R + r], t2 = s->t[2 * s->R + r];
    /* the chunks' maxima (CH a multiple of 16: vectors), then k: the first argmax of a; a row with a NaN
     * gets no candidates (the caller then computes it in full) */
    __mmask16 nan = 0;
    if (s->cmx) { /* given: NaN where a chunk holds one (the last, partial one included) */
        cm = (float *)s->cmx + r * s->ncm;
        for (int64_t j = 0; j < s->ncm; j++)
            if (cm[j] != cm[j]) nan = 1;
    }
    for (int64_t j = 0; j < nch && !s->cmx; j++) {
        const float *v = a + j * CH;
        __m512 mx = _mm512_loadu_ps(v);
        nan |= _mm512_cmp_ps_mask(mx, mx, _CMP_UNORD_Q);
        for (int64_t i = 16; i < CH; i += 16) {
            __m512 x = _mm512_loadu_ps(v + i);
            nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
            mx = _mm512_max_ps(mx, x);
        }
        cm[j] = _mm512_reduce_max_ps(mx);
    }
    for (int64_t i = body; i < V; i++)
        if (a[i] != a[i]) nan = 1;
    if (nan) return 0;
    int64_t k = -1;
    float best = -INFINITY;
    for (int64_t j = 0; j < nch; j++)
        if (cm[j] > best || k < 0) { best = cm[j]; k = j; }
    if (k >= 0) {
        const float *v = a + k * CH;
        int64_t i = 0;
        while (v[i] != best) i++;
        k = k * CH + i;
    }
    for (int64_t i = body; i < V; i++)
        if (k < 0 || a[i] > a[k]) k = i;
    const float ak = a[k];
    const float bmax = s->m[0] * t0 + s->m[1] * t1 + s->m[2] * t2;
    float slack = s->eps * (fabsf(ak) + 4.0f * bmax);
    if (s->band > 0) slack = slack + s->band * (fabsf(ak) + bmax);
    const float thr = ak - bnd(s->f, V, k, t0, t1, t2) - slack;
    if (!(thr == thr) || isinf(thr)) return 0;
    const int64_t start = *n;
    const float *c0 = s->c, *c1 = s->c + nch, *c2 = s->c + 2 * nch;
    for (int64_t j = 0; j < nch; j++) {
        const float *v = a + j * CH;
        const float bch = t0 * c0[j] + t1 * c1[j] + t2 * c2[j];
        if (!(cm[j] + bch >= thr)) continue;
        for (int64_t i = 0; i < CH; i++)
            if (v[i] + bch >= thr) {
                if (*n >= s->cap) return -2;
                s->row_of[*n] = r;
                s->ids[*n] = j * CH + i;
                s->av[(*n)++] = v[i];
            }
    }
    for (int64_t i = body; i < V; i++) /* the tail: each row's own bound */
        if (a[i] + bnd(s->f, V, i, t0, t1, t2) >= thr) {
            if (*n >= s->cap) return -2;
            s->row_of[*n] = r;
            s->ids[*n] = i;
            s->av[(*n)++] = a[i];
        }
    /* the exact max_k (a_k - b_k) over the pairs found, then the pairs that can reach it */
    float lower = -INFINITY;
    for (int64_t q = start; q < *n; q++) {
        float lo = s->av[q] - bnd(s->f, V, s->ids[q], t0, t1, t2);
        lower = lo > lower ? lo : lower;
    }
    int64_t w = start;
    for (int64_t q = start; q < *n; q++)
        if (s->av[q] + bnd(s->f, V, s->ids[q], t0, t1, t2) >= lower - slack) {
            s->ids[w] = s->ids[q];
            s->av[w] = s->av[q];
            s->row_of[w++] = r;
        }
    *n = w;
    return 0;
}

/* a (R, V) contiguous fp32; t (3, R), f (3, V), c (3, V / CH), m (3) fp32 as above; band: the bf16 band (0 for an
 * fp32 head); eps: the rounding slack factor; cmx: NULL, or dsv3_head_i8's chunk maxima of a (R, ceil(V / CH)),
 * CH then being its tile (I8_TILE_ROWS). Writes the candidates (row_of, ids: row-major, ascending ids) and
 * returns their number, or -2 when there are more than cap or memory could not be had, -3 when CH is not a
 * positive multiple of 16 or not the tile with cmx (the caller's twin then runs). */
int64_t dsv3_screen_candidates(const float *a, const float *t, const float *f, const float *c, const float *m,
                               const float *cmx, int64_t R, int64_t V, int64_t CH, float band, float eps,
                               int64_t *row_of, int64_t *ids, int64_t cap) {
    if (CH <= 0 || CH % 16 || (cmx && CH != I8_TILE_ROWS)) return -3;
    float *av = malloc((size_t)(cap > 0 ? cap : 1) * sizeof(float)), *cm = malloc((size_t)(V / CH + 1) * sizeof(float));
    int64_t n = 0;
    if (!av || !cm) n = -2;
    screen_t s = {a, t, f, c, m, cmx, (V + CH - 1) / CH, R, V, CH, band, eps, row_of, ids, av, cap};
    for (int64_t r = 0; r < R && n >= 0; r++)
        if (screen_row(&s, r, cm, &n) != 0) n = -2;
    free(av);
    free(cm);
    return n;
}

/* ------------------------------------------------------------------ the int8 product of the screen */

/* The approximate logits of the screen, a = xs * s_i * sum_j q_ij (u_j - zp), for up to a few dozen rows u (uint8)
 * over the int8 head copy q (per-row scales s), with AVX512-VNNI (vpdpbusd: 64 byte products a instruction,
 * summed in int32, exact). The copy is packed once (dsv3_i8_pack) in blocks of 16 vocabulary rows, [k / 4][16][4]
 * bytes, so one 64-byte load holds 4 k of 16 rows; a tile of 8 rows of u x 48 vocabulary rows then runs through
 * k with each row's 4 bytes broadcast (against oneDNN's int8 linear: benchmarks/kernels_bench.py --ab screen). */
#define UR 8  /* rows of u per tile */

/* q (V, D) int8 row-major -> dst: ceil(V / 16) blocks of (Dp / 4) x 16 x 4 bytes, Dp = D rounded up to 4, zero
 * padded */
void dsv3_i8_pack(const int8_t *q, int64_t V, int64_t D, int8_t *dst) {
    const int64_t Dp = (D + 3) / 4 * 4, nb = (V + VB - 1) / VB;
    memset(dst, 0, (size_t)(nb * VB * Dp));
    for (int64_t i = 0; i < V; i++) {
        int8_t *blk = dst + (i / VB) * VB * Dp + (i % VB) * 4;
        for (int64_t j = 0; j < D; j++) blk[(j / 4) * VB * 4 + j % 4] = q[i * D + j];
    }
}

typedef struct {
    const uint8_t *u;
    const int8_t *p;
    const int32_t *qsum;
    const float *ws;
    float *out, *cm; /* cm: NULL, or (R, ncm) the maxima of out over each tile's rows (NaN where one is NaN) */
    float xs;
    int32_t zp;
    int64_t R, V, Dp, ncm, lo, hi; /* this thread's blocks [lo, hi) */
} i8_t;

__attribute__((target("avx512vnni"))) static inline __attribute__((always_inline)) void i8_tile(
    const i8_t *g, int64_t b0, const int nbk, int64_t m0, const int mr) {
    __m512i acc[UR][VG];
    const uint8_t *ur[UR];
    for (int m = 0; m < mr; m++) {
        ur[m] = g->u + (m0 + m) * g->Dp;
        for (int c = 0; c < nbk; c++) acc[m][c] = _mm512_setzero_si512();
    }
    const int64_t bs = VB * g->Dp, K4 = g->Dp / 4; /* bytes of a block; steps of 4 k */
    const int8_t *pb = g->p + b0 * bs;
    /* the first row group fetches the next tile meanwhile (prefetches never fault past the end): the copy then
     * streams while the dot products run instead of after them */
    const int8_t *ahead = m0 == 0 ? pb + VG * bs : NULL;
    for (int64_t k4 = 0; k4 < K4; k4++) {
        if (ahead)
            for (int c = 0; c < VG; c++) _mm_prefetch((const char *)(ahead + c * bs + k4 * VB * 4), _MM_HINT_T0);
        __m512i w0 = _mm512_loadu_si512(pb + k4 * VB * 4), w1 = w0, w2 = w0;
        if (nbk > 1) w1 = _mm512_loadu_si512(pb + bs + k4 * VB * 4);
        if (nbk > 2) w2 = _mm512_loadu_si512(pb + 2 * bs + k4 * VB * 4);
        for (int m = 0; m < mr; m++) {
            int32_t v;
            memcpy(&v, ur[m] + k4 * 4, 4);
            __m512i uv = _mm512_set1_epi32(v);
            acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], uv, w0);
            if (nbk > 1) acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], uv, w1);
            if (nbk > 2) acc[m][2] = _mm512_dpbusd_epi32(acc[m][2], uv, w2);
        }
    }
    const __m512 xs = _mm512_set1_ps(g->xs);
    const __m512i zp = _mm512_set1_epi32(g->zp);
    __m512 mx[UR];
    __mmask16 nan[UR];
    for (int m = 0; m < mr; m++) {
        mx[m] = _mm512_set1_ps(-INFINITY);
        nan[m] = 0;
    }
#pragma GCC unroll 3
    for (int c = 0; c < nbk; c++) {
        int64_t i0 = (b0 + c) * VB, n = g->V - i0 < VB ? g->V - i0 : VB;
        __mmask16 mk = lanes(n);
        __m512i qs = _mm512_mullo_epi32(zp, _mm512_maskz_loadu_epi32(mk, g->qsum + i0));
        __m512 ws = _mm512_maskz_loadu_ps(mk, g->ws + i0);
#pragma GCC unroll 8
        for (int m = 0; m < mr; m++) { /* (sum q u - zp sum q) exactly in int32, then (that * xs) * s_i in fp32 */
            __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[m][c], qs)), xs), ws);
            _mm512_mask_storeu_ps(g->out + (m0 + m) * g->V + i0, mk, v);
            mx[m] = _mm512_mask_max_ps(mx[m], mk, mx[m], v);
            nan[m] |= _mm512_mask_cmp_ps_mask(mk, v, v, _CMP_UNORD_Q);
        }
    }
    if (g->cm) /* the tile's maxima for the candidate search, while they are in registers */
        for (int m = 0; m < mr; m++)
            g->cm[(m0 + m) * g->ncm + b0 / VG] = nan[m] ? NAN : _mm512_reduce_max_ps(mx[m]);
}

#define I8_TILE(NB, MR) \
    __attribute__((target("avx512vnni"))) static void i8_tile_##NB##_##MR(const i8_t *g, int64_t b0, int64_t m0) { \
        i8_tile(g, b0, NB, m0, MR); \
    }
#define I8_ROW(NB) I8_TILE(NB, 1) I8_TILE(NB, 2) I8_TILE(NB, 3) I8_TILE(NB, 4) I8_TILE(NB, 5) I8_TILE(NB, 6) \
    I8_TILE(NB, 7) I8_TILE(NB, 8)
I8_ROW(1)
I8_ROW(2)
I8_ROW(3)
typedef void (*i8_fn)(const i8_t *, int64_t, int64_t);
#define I8_FNS(NB) {NULL, i8_tile_##NB##_1, i8_tile_##NB##_2, i8_tile_##NB##_3, i8_tile_##NB##_4, i8_tile_##NB##_5, \
                    i8_tile_##NB##_6, i8_tile_##NB##_7, i8_tile_##NB##_8}
static const i8_fn I8_TILES[VG + 1][UR + 1] = {{NULL}, I8_FNS(1), I8_FNS(2), I8_FNS(3)};

static void *i8_run(void *arg) {
    const i8_t *g = (const i8_t *)arg;
    for (int64_t b0 = g->lo; b0 < g->hi; b0 += VG) {
        int nbk = (int)(g->hi - b0 < VG ? g->hi - b0 : VG);
        for (int64_t m0 = 0; m0 < g->R; m0 += UR) /* the tile's 48 rows of the copy stay in L1 across the row groups */
            I8_TILES[nbk][g->R - m0 < UR ? g->R - m0 : UR](g, b0, m0);
    }
    return NULL;
}

/* u (R, Dp) uint8 (rows zero padded to Dp, a multiple of 4), p: dsv3_i8_pack's copy of q (V, D), qsum (V,) int32
 * = sum_j q_ij, ws (V,) fp32 row scales -> out (R, V) fp32 = (xs * (sum_j q_ij u_j - zp qsum_i)) * ws_i, and where
 * cm is not NULL, cm (R, ceil(V / I8_TILE_ROWS)): the maximum of each row of out over each I8_TILE_ROWS-wide
 * chunk (the last one partial), NaN where the chunk holds a NaN. Returns 0, or -3 where the CPU lacks
 * AVX512-VNNI or Dp is not a multiple of 4. */
int dsv3_head_i8(const uint8_t *u, int64_t R, const int8_t *p, const int32_t *qsum, const float *ws, float xs,
                 int32_t zp, int64_t V, int64_t Dp, float *out, float *cm, int nthreads) {
    if (!__builtin_cpu_supports("avx512vnni") || Dp % 4) return -3;
    if (R == 0 || V == 0) return 0;
    const int64_t nb = (V + VB - 1) / VB;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAXT) nthreads = MAXT;
    i8_t jobs[MAXT];
    for (int t = 0; t < nthreads; t++) {
        i8_t g = {u, p, qsum, ws, out, cm, xs, zp, R, V, Dp, (V + I8_TILE_ROWS - 1) / I8_TILE_ROWS, 0, 0};
        int64_t lo, hi; /* whole tiles per thread */
        split((nb + VG - 1) / VG, t, nthreads, &lo, &hi);
        g.lo = lo * VG;
        g.hi = hi * VG < nb ? hi * VG : nb;
        jobs[t] = g;
    }
    return run_threads(i8_run, jobs, sizeof(i8_t), nthreads);
}

/* ------------------------------------------------------------------ the candidates' exact logits */

/* GreedyHead.argmax's rescoring (dsv3/infer/screen.py) of the candidates (row_of, ids: row-major, ascending ids
 * within a row) of the rows h (R, D) fp32 over the head w (V, D), fp32 (bf = 0) or bf16 (bf = 1):
 * bf16: the candidates' fp32 logits rounded to bf16, the lowest id among the largest; fp32: the largest fp32
 * logit, and where others lie within the fp32 rounding bound tol = 2 D 2^-24 max(l1) max|h_r| of it, those
 * compared in float64, the lowest id among equal ones. out[r] = the token, or -1 for a row without candidates.
 * Returns 0, or -2 when memory could not be had. */
int dsv3_screen_rescore(const float *h, int64_t R, int64_t D, const void *w, int bf, const int64_t *row_of,
                        const int64_t *ids, int64_t n, const float *l1, int64_t *out) {
    const int64_t es = bf ? 2 : 4;
    float *ex = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    if (!ex) return -2;
    for (int64_t r = 0; r < R; r++) out[r] = -1;
    for (int64_t q0 = 0; q0 < n;) {
        const int64_t r = row_of[q0];
        int64_t q1 = q0;
        while (q1 < n && row_of[q1] == r) q1++;
        const float *hr = h + r * D;
        float best = -INFINITY, l1max = 0.0f, hmax = 0.0f;
        int64_t pick = -1;
        for (int64_t q = q0; q < q1; q++) {
            float v = dot_w(hr, (const char *)w + ids[q] * D * es, D, bf);
            if (bf) v = round_bf(v);
            ex[q] = v;
            if (pick < 0 || v > best) { best = v; pick = ids[q]; } /* first of the largest: the lowest id */
            l1max = l1[ids[q]] > l1max ? l1[ids[q]] : l1max;
        }
        if (!bf) {
            for (int64_t j = 0; j < D; j++) hmax = fabsf(hr[j]) > hmax ? fabsf(hr[j]) : hmax;
            const float tol = (float)(2.0 * (double)D * 0x1p-24) * l1max * hmax;
            int64_t near = 0;
            for (int64_t q = q0; q < q1; q++) near += ex[q] >= best - tol;
            if (near > 1) { /* float64 among the near ones */
                double bd = -INFINITY;
                pick = -1;
                for (int64_t q = q0; q < q1; q++) {
                    if (!(ex[q] >= best - tol)) continue;
                    const float *wr = (const float *)w + ids[q] * D;
                    double s = 0.0;
                    for (int64_t j = 0; j < D; j++) s += (double)wr[j] * (double)hr[j];
                    if (pick < 0 || s > bd) { bd = s; pick = ids[q]; }
                }
            }
        }
        out[r] = pick;
        q0 = q1;
    }
    free(ex);
    return 0;
}

/* ------------------------------------------------------------------ the quantized activation and the bound's terms */

/* GreedyHead.argmax's preparation for the int8 product (dsv3/infer/screen.py: each row scaled to max |h| = 1,
 * one uint8 scale xs for all finite rows, zero point zp), in one call: h (R, D) fp32 -> u (R, Dp) uint8 (Dp >= D,
 * the padding u = zp: (u - zp) = 0), the bound's terms t (3, R): ||hs||_2 (float64, rounded up), ||r||_2 (r = hs -
 * (u - zp) xs in float64, times 1 + 2^-16) and c (|hs|_inf + xs) with c = rounding; returns xs (NaN when memory
 * could not be had). A row that is not finite gets NaN terms (no candidates: the caller computes it in full). */
float dsv3_screen_prepare(const float *h, int64_t R, int64_t D, int64_t Dp, int32_t zp, float rounding, uint8_t *u,
                          float *t) {
    /* the rows' scales a = max_j |h_j|; a scaled finite row's maximum is exactly 1 (a / a), a zero row's 0 */
    float *alpha = malloc((size_t)(R > 0 ? R : 1) * sizeof(float));
    if (!alpha) return NAN;
    float top = -1.0f; /* the largest maximum of the finite scaled rows, -1 for none */
    for (int64_t r = 0; r < R; r++) {
        const float *hr = h + r * D;
        float a = 0.0f;
        int fin = 1;
        for (int64_t j = 0; j < D; j++) {
            float v = fabsf(hr[j]);
            fin &= isfinite(v) != 0;
            a = v > a ? v : a;
        }
        alpha[r] = fin ? a : NAN;
        if (fin) top = a > 0 ? 1.0f : top > 0.0f ? top : 0.0f;
    }
    float xs = top >= 0 ? (float)((double)top / (double)(zp - 1)) : 1.0f;
    if (!(xs > 0.0f) || isinf(xs)) xs = 1.0f;
    for (int64_t r = 0; r < R; r++) {
        const float *hr = h + r * D;
        uint8_t *ur = u + r * Dp;
        const float a = alpha[r];
        for (int64_t j = D; j < Dp; j++) ur[j] = (uint8_t)zp;
        if (a != a) { /* not finite: no candidates (the caller computes it in full) */
            memset(ur, zp, (size_t)D);
            t[r] = t[R + r] = t[2 * R + r] = NAN;
            continue;
        }
        double n2 = 0.0, r2 = 0.0;
        float inf_norm = 0.0f;
        for (int64_t j = 0; j < D; j++) {
            float hs = a > 0 ? hr[j] / a : hr[j];
            float q = nearbyintf(hs / xs) + (float)zp; /* round half to even, as torch.round */
            q = q < 0.0f ? 0.0f : q > (float)(2 * zp - 1) ? (float)(2 * zp - 1) : q;
            ur[j] = (uint8_t)q;
            double e = (double)hs - ((double)ur[j] - zp) * (double)xs;
            n2 += (double)hs * (double)hs;
            r2 += e * e;
            inf_norm = fabsf(hs) > inf_norm ? fabsf(hs) : inf_norm;
        }
        t[r] = nextafterf((float)sqrt(n2), INFINITY); /* at least the exact norm */
        t[R + r] = nextafterf((float)sqrt(r2), INFINITY) * (1.0f + 0x1p-16f);
        t[2 * R + r] = rounding * (inf_norm + xs);
    }
    free(alpha);
    return xs;
}
