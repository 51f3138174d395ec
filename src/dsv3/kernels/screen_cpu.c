/* The candidate search of the greedy head screen (dsv3/infer/screen.py, GreedyHead._candidates) in one call:
 * the same fp32 arithmetic as the PyTorch twin, in the same order, so the same candidates, without the ~40
 * tensor ops (and the passes over the (R, V) approximate logits) the twin takes per step. */
#include "common.h"

#define VB 8  /* the int8 product's vocabulary rows per packed block (below) */
#define KB 8  /* bytes of k per vocabulary row and step of a block: [Dp / KB][VB][KB] */
#define VG 3  /* blocks per tile of the vocabulary-lane product: 24 rows (the loop below takes up to 3) */
#define CB 6  /* blocks per chunk whose maxima the product hands out */
#define I8_TILE_ROWS (VB * CB) /* 48 */

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

/* The approximate logits of the screen, a = xs * s_i * sum_j q_ij (u_j - zp), for the rows u (uint8) over the
 * int8 head copy q (per-row scales s), with AVX512-VNNI (vpdpbusd: 64 byte products an instruction, summed in
 * int32, exact, so the order of the sums does not matter). The copy is packed once (dsv3_i8_pack) in blocks of
 * 8 vocabulary rows, [k / 8][8][8] bytes: one 64-byte load holds 8 k of 8 rows. Two forms run on it:
 *   - vocabulary lanes (a few rows of u): a tile of up to UR rows of u x 24 vocabulary rows runs through k with
 *     each row's 8 bytes broadcast; each lane pair (one vocabulary row, two halves of k) is added at the end;
 *   - row lanes (the first 16 rows of u): the rows' bytes arranged as [k / 8][8 rows][8] for two groups of 8
 *     rows, each vocabulary row's 8 bytes broadcast against them: a single pass over the copy for 16 rows, where
 *     the vocabulary-lane form re-ran each tile for its second 8 rows with no read to overlap (on the `small`
 *     preset's head, 1.12-1.18x as fast at 16 rows as that form; docs/engine.md, benchmarks/head_bench.py).
 * (Against oneDNN's int8 linear: benchmarks/kernels_bench.py --ab screen.) */
#define UR 8  /* rows of u per tile of the vocabulary-lane form */
#define RL 16 /* rows of u per pass of the row-lane form */

/* the rows of u the row-lane form takes: the first 16 when there are that many. That pass streams the copy; the
 * rest (the vocabulary-lane form) then find each chunk in L1, where the vocabulary-lane products cost less
 * arithmetic than a second row-lane pass (no 16 x 16 transposes) */
static inline int64_t row_lane_rows(int64_t R) { return R >= RL ? RL : 0; }

/* q (V, D) int8 row-major -> dst: ceil(V / 8) blocks of (Dp / 8) x 8 x 8 bytes, Dp = D rounded up to 8, zero
 * padded */
void dsv3_i8_pack(const int8_t *q, int64_t V, int64_t D, int8_t *dst) {
    const int64_t Dp = (D + KB - 1) / KB * KB, nb = (V + VB - 1) / VB;
    memset(dst, 0, (size_t)(nb * VB * Dp));
    for (int64_t i = 0; i < V; i++) {
        int8_t *blk = dst + (i / VB) * VB * Dp + (i % VB) * KB;
        for (int64_t j = 0; j < D; j++) blk[(j / KB) * VB * KB + j % KB] = q[i * D + j];
    }
}

typedef struct {
    const uint8_t *ut, *uv; /* the rows of u arranged for the row-lane form (per 16 rows [2][Dp / 8][8][8]) and
                             * for the vocabulary-lane form (the rest, per UR rows [Dp / 8][rows][8]) */
    const int8_t *p;
    const int32_t *qsum;
    const float *ws;
    float *out, *cm; /* cm: NULL, or (R, ncm) the maxima of out over each chunk's rows (NaN where one is NaN) */
    float xs;
    int32_t zp;
    int64_t R, V, Dp, ncm, lo, hi; /* this thread's blocks [lo, hi) */
} i8_t;

/* acc += the int8 products of u (unsigned bytes) and w (signed): vpdpbusd written out, as compilers copy the
 * accumulators of the intrinsic around the loops below */
#define DPBUSD(acc, u, w) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(w))

/* vocabulary lanes, the products: mr rows of u (ug: [Dp / 8][mr][8]) x nbk blocks from pb -> res[m * VG + c], the
 * int32 sums of (vocabulary row, half of k) lane pairs; ahead: NULL, or the next tile, fetched into L1 meanwhile,
 * and the tile 4 after it into L2 (the copy then streams while the products run instead of after them; prefetches
 * never fault past the end). A function of its own per (mr, nbk), so that its accumulators stay in registers. */
__attribute__((target("avx512vnni"))) static inline __attribute__((always_inline)) void i8_vloop(
    const int8_t *pb, int64_t bs, const uint8_t *ug, int64_t K8, const int8_t *ahead, const int mr, const int nbk,
    __m512i *res) {
    /* named accumulators (an array of them the compiler copies around the loop), unused ones compiled away */
    const __m512i z = _mm512_setzero_si512();
#define VDECL(m) __m512i a##m##_0 = z, a##m##_1 = z, a##m##_2 = z;
    VDECL(0) VDECL(1) VDECL(2) VDECL(3) VDECL(4) VDECL(5) VDECL(6) VDECL(7)
    for (int64_t k8 = 0; k8 < K8; k8++) {
        if (ahead) {
            for (int c = 0; c < VG; c++) _mm_prefetch((const char *)(ahead + c * bs + k8 * 64), _MM_HINT_T0);
            for (int c = 0; c < VG; c++) _mm_prefetch((const char *)(ahead + (4 * VG + c) * bs + k8 * 64), _MM_HINT_T1);
        }
        __m512i w0 = _mm512_loadu_si512(pb + k8 * 64), w1 = w0, w2 = w0;
        if (nbk > 1) w1 = _mm512_loadu_si512(pb + bs + k8 * 64);
        if (nbk > 2) w2 = _mm512_loadu_si512(pb + 2 * bs + k8 * 64);
        const uint8_t *uk = ug + k8 * mr * KB;
#define VSTEP(m) \
    if (mr > m) { \
        int64_t v; \
        memcpy(&v, uk + m * KB, KB); \
        const __m512i uv = _mm512_set1_epi64(v); \
        DPBUSD(a##m##_0, uv, w0); \
        if (nbk > 1) DPBUSD(a##m##_1, uv, w1); \
        if (nbk > 2) DPBUSD(a##m##_2, uv, w2); \
    }
        VSTEP(0) VSTEP(1) VSTEP(2) VSTEP(3) VSTEP(4) VSTEP(5) VSTEP(6) VSTEP(7)
#undef VSTEP
    }
#define VOUT(m) \
    if (mr > m) { \
        _mm512_storeu_si512(res + m * VG, a##m##_0); \
        _mm512_storeu_si512(res + m * VG + 1, a##m##_1); \
        _mm512_storeu_si512(res + m * VG + 2, a##m##_2); \
    }
    VOUT(0) VOUT(1) VOUT(2) VOUT(3) VOUT(4) VOUT(5) VOUT(6) VOUT(7)
#undef VOUT
#undef VDECL
}

#define I8_VLOOP(MR, NB) \
    __attribute__((target("avx512vnni"))) static void i8_vloop_##MR##_##NB( \
        const int8_t *pb, int64_t bs, const uint8_t *ug, int64_t K8, const int8_t *ahead, __m512i *res) { \
        i8_vloop(pb, bs, ug, K8, ahead, MR, NB, res); \
    }
#define I8_VLOOPS(MR) I8_VLOOP(MR, 1) I8_VLOOP(MR, 2) I8_VLOOP(MR, 3)
I8_VLOOPS(1)
I8_VLOOPS(2)
I8_VLOOPS(3)
I8_VLOOPS(4)
I8_VLOOPS(5)
I8_VLOOPS(6)
I8_VLOOPS(7)
I8_VLOOPS(8)
typedef void (*i8_vloop_fn)(const int8_t *, int64_t, const uint8_t *, int64_t, const int8_t *, __m512i *);
#define I8_VROW(MR) {i8_vloop_##MR##_1, i8_vloop_##MR##_2, i8_vloop_##MR##_3}
static const i8_vloop_fn I8_VLOOPS_BY[UR][VG] = {I8_VROW(1), I8_VROW(2), I8_VROW(3), I8_VROW(4),
                                                  I8_VROW(5), I8_VROW(6), I8_VROW(7), I8_VROW(8)};

/* vocabulary lanes, what the values of two blocks from vocabulary row i0 (n of their rows in the tile) need of the
 * vocabulary rows, the same for every row of u: the lanes in the vocabulary, zp qsum_i and the row scales s_i */
typedef struct {
    int64_t i0;
    __mmask16 mk;
    __m512i qs;
    __m512 ws;
} i8_cols_t;

static inline i8_cols_t i8_cols(const i8_t *g, int64_t i0, int64_t n) {
    i8_cols_t c = {i0, lanes(g->V - i0 < n ? g->V - i0 : n), _mm512_setzero_si512(), _mm512_setzero_ps()};
    c.qs = _mm512_mullo_epi32(_mm512_set1_epi32(g->zp), _mm512_maskz_loadu_epi32(c.mk, g->qsum + i0));
    c.ws = _mm512_maskz_loadu_ps(c.mk, g->ws + i0);
    return c;
}

/* vocabulary lanes, the values of those two blocks for row m of u: a0, a1 the int32 sums of their (vocabulary row,
 * half of k) lane pairs (a1 zero where there is no second block) -> row m of out, its maximum into *mx / *nan */
static inline void i8_vout(const i8_t *g, const i8_cols_t *c, __m512i a0, __m512i a1, int64_t m, __m512 *mx,
                           __mmask16 *nan) {
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    /* lanes 2j, 2j + 1 hold vocabulary row j's two halves of k: their sums, the two blocks in one vector */
    const __m512i s0 = _mm512_add_epi32(a0, _mm512_shuffle_epi32(a0, _MM_PERM_CDAB));
    const __m512i s1 = _mm512_add_epi32(a1, _mm512_shuffle_epi32(a1, _MM_PERM_CDAB));
    /* (s - zp qsum_i) exactly in int32, then (that * xs) * s_i in fp32 */
    const __m512i sv = _mm512_sub_epi32(_mm512_permutex2var_epi32(s0, even, s1), c->qs);
    const __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sv), _mm512_set1_ps(g->xs)), c->ws);
    _mm512_mask_storeu_ps(g->out + m * g->V + c->i0, c->mk, v);
    *mx = _mm512_mask_max_ps(*mx, c->mk, *mx, v);
    *nan |= _mm512_mask_cmp_ps_mask(c->mk, v, v, _CMP_UNORD_Q);
}

/* vocabulary lanes: rows [m0, m0 + mr) of u x blocks [b0, b0 + nbk); the values into out, their maxima into mx /
 * nan (per row). fetch: prefetch the next tile meanwhile (the first pass over it) */
static void i8_vtile(const i8_t *g, int64_t b0, int nbk, int64_t m0, int mr, int fetch, __m512 *mx, __mmask16 *nan) {
    const int64_t bs = VB * g->Dp; /* bytes of a block */
    const int8_t *pb = g->p + b0 * bs;
    __m512i res[UR * VG];
    I8_VLOOPS_BY[mr - 1][nbk - 1](pb, bs, g->uv + (m0 - row_lane_rows(g->R)) * g->Dp, g->Dp / KB,
                                  fetch ? pb + VG * bs : NULL, res);
    for (int c = 0; c < nbk; c += 2) {
        const i8_cols_t cols = i8_cols(g, (b0 + c) * VB, (c + 1 < nbk ? 2 : 1) * VB); /* this tile's rows only */
        for (int m = 0; m < mr; m++)
            i8_vout(g, &cols, res[m * VG + c], c + 1 < nbk ? res[m * VG + c + 1] : _mm512_setzero_si512(), m0 + m,
                    mx + m, nan + m);
    }
}

/* vocabulary lanes for one row of u (row m0) over a whole chunk (CB blocks) at once: CB streams of the copy read
 * together instead of VG, the next chunk fetched meanwhile (a single row is bound by the read of the copy:
 * benchmarks/head_bench.py); values and maxima as i8_vtile */
__attribute__((target("avx512vnni"))) static void i8_vchunk1(const i8_t *g, int64_t b0, int64_t m0, int fetch,
                                                              __m512 *mx, __mmask16 *nan) {
    const int64_t bs = VB * g->Dp, K8 = g->Dp / KB;
    const int8_t *pb = g->p + b0 * bs, *ahead = fetch ? pb + CB * bs : NULL;
    const uint8_t *ug = g->uv + (m0 - row_lane_rows(g->R)) * g->Dp;
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
    for (int64_t k8 = 0; k8 < K8; k8++) {
        if (ahead)
            for (int c = 0; c < CB; c++) _mm_prefetch((const char *)(ahead + c * bs + k8 * 64), _MM_HINT_T0);
        int64_t v;
        memcpy(&v, ug + k8 * KB, KB);
        const __m512i uv = _mm512_set1_epi64(v);
        DPBUSD(a0, uv, _mm512_loadu_si512(pb + k8 * 64));
        DPBUSD(a1, uv, _mm512_loadu_si512(pb + bs + k8 * 64));
        DPBUSD(a2, uv, _mm512_loadu_si512(pb + 2 * bs + k8 * 64));
        DPBUSD(a3, uv, _mm512_loadu_si512(pb + 3 * bs + k8 * 64));
        DPBUSD(a4, uv, _mm512_loadu_si512(pb + 4 * bs + k8 * 64));
        DPBUSD(a5, uv, _mm512_loadu_si512(pb + 5 * bs + k8 * 64));
    }
    const __m512i acc[CB] = {a0, a1, a2, a3, a4, a5};
    for (int c = 0; c < CB; c += 2) {
        const i8_cols_t cols = i8_cols(g, (b0 + c) * VB, 2 * VB);
        i8_vout(g, &cols, acc[c], acc[c + 1], m0, mx, nan);
    }
}

/* row lanes: rows [m0, m0 + 16) of u (their form ut: 2 groups of [Dp / 8][8][8]) x blocks [b0, b0 + nbk) of one
 * chunk, a block at a time; the values into out (16 x 16 transposes of two blocks), their maxima into mx / nan
 * (lane = row). fetch: prefetch 2 blocks ahead into L1 and 16 ahead into L2 meanwhile (the first pass) */
__attribute__((target("avx512vnni"))) static void i8_rtile(const i8_t *g, int64_t b0, int nbk, int64_t m0, int fetch,
                                                            __m512 *mx, __mmask16 *nan) {
    const int64_t bs = VB * g->Dp, K8 = g->Dp / KB;
    const uint8_t *u0 = g->ut + m0 * g->Dp, *u1 = u0 + K8 * 64;
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    __m512 vals[2 * VB];
    for (int c = 0; c < nbk; c++) {
        const int8_t *pb = g->p + (b0 + c) * bs;
        const char *near = (const char *)pb + 2 * bs, *far = (const char *)pb + 16 * bs;
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        __m512i b0_ = a0, b1 = a0, b2 = a0, b3 = a0, b4 = a0, b5 = a0, b6 = a0, b7 = a0;
        for (int64_t k8 = 0; k8 < K8; k8++) {
            if (fetch) {
                _mm_prefetch(near + k8 * 64, _MM_HINT_T0);
                _mm_prefetch(far + k8 * 64, _MM_HINT_T1);
            }
            const __m512i x0 = _mm512_load_si512(u0 + k8 * 64), x1 = _mm512_load_si512(u1 + k8 * 64);
            const int64_t *wp = (const int64_t *)(pb + k8 * 64);
#define RSTEP(v, A, B) { const __m512i wb = _mm512_set1_epi64(wp[v]); DPBUSD(A, x0, wb); DPBUSD(B, x1, wb); }
            RSTEP(0, a0, b0_) RSTEP(1, a1, b1) RSTEP(2, a2, b2) RSTEP(3, a3, b3)
            RSTEP(4, a4, b4) RSTEP(5, a5, b5) RSTEP(6, a6, b6) RSTEP(7, a7, b7)
#undef RSTEP
        }
        __m512i A[VB] = {a0, a1, a2, a3, a4, a5, a6, a7}, B[VB] = {b0_, b1, b2, b3, b4, b5, b6, b7};
        for (int v = 0; v < VB; v++) {
            const int64_t i = (b0 + c) * VB + v;
            /* lanes 2r, 2r + 1 of A (B) hold row r (8 + r)'s two halves of k: their sums, rows 0..15 in order */
            __m512i sa = _mm512_add_epi32(A[v], _mm512_shuffle_epi32(A[v], _MM_PERM_CDAB));
            __m512i sb = _mm512_add_epi32(B[v], _mm512_shuffle_epi32(B[v], _MM_PERM_CDAB));
            __m512 x = _mm512_set1_ps(-INFINITY); /* a vocabulary row past the end: never the maximum */
            if (i < g->V) {
                __m512i s = _mm512_sub_epi32(_mm512_permutex2var_epi32(sa, even, sb),
                                             _mm512_set1_epi32(g->zp * g->qsum[i]));
                x = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(g->xs)), _mm512_set1_ps(g->ws[i]));
                *mx = _mm512_max_ps(*mx, x);
                *nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
            }
            vals[(c % 2) * VB + v] = x;
        }
        if (c % 2 == 1 || c == nbk - 1) { /* two blocks' values (lane = row) -> rows of out */
            const int64_t i0 = (b0 + c - c % 2) * VB, n = g->V - i0 < 2 * VB ? g->V - i0 : 2 * VB;
            if (c % 2 == 0)
                for (int v = VB; v < 2 * VB; v++) vals[v] = _mm512_setzero_ps();
            transpose16(vals);
            for (int r = 0; r < RL; r++) _mm512_mask_storeu_ps(g->out + (m0 + r) * g->V + i0, lanes(n), vals[r]);
        }
    }
}

static void *i8_run(void *arg) {
    const i8_t *g = (const i8_t *)arg;
    const int64_t rl = row_lane_rows(g->R); /* rows in the row-lane form; the rest in the vocabulary-lane form */
    for (int64_t b0 = g->lo; b0 < g->hi; b0 += CB) { /* a chunk: its 24 KB of the copy stay in L1 across the passes */
        const int nch = (int)(g->hi - b0 < CB ? g->hi - b0 : CB);
        __m512 mx[RL];
        __mmask16 nan[RL];
        for (int64_t m0 = 0; m0 < rl; m0 += RL) {
            mx[0] = _mm512_set1_ps(-INFINITY);
            nan[0] = 0;
            i8_rtile(g, b0, nch, m0, m0 == 0, mx, nan);
            if (g->cm) {
                float t[RL];
                _mm512_storeu_ps(t, mx[0]);
                for (int r = 0; r < RL; r++) g->cm[(m0 + r) * g->ncm + b0 / CB] = nan[0] >> r & 1 ? NAN : t[r];
            }
        }
        for (int64_t m0 = rl; m0 < g->R; m0 += UR) {
            const int mr = (int)(g->R - m0 < UR ? g->R - m0 : UR);
            for (int m = 0; m < mr; m++) {
                mx[m] = _mm512_set1_ps(-INFINITY);
                nan[m] = 0;
            }
            if (mr == 1 && nch == CB)
                i8_vchunk1(g, b0, m0, m0 == 0, mx, nan);
            else
                for (int c = 0; c < nch; c += VG) /* the first pass over the chunk fetches the tile after each */
                    i8_vtile(g, b0 + c, nch - c < VG ? nch - c : VG, m0, mr, m0 == 0, mx, nan);
            if (g->cm)
                for (int m = 0; m < mr; m++)
                    g->cm[(m0 + m) * g->ncm + b0 / CB] = nan[m] ? NAN : _mm512_reduce_max_ps(mx[m]);
        }
    }
    return NULL;
}

/* u (R, Dp) uint8 (rows padded to Dp, a multiple of 8, with zp: (u - zp) = 0 there), p: dsv3_i8_pack's copy of q
 * (V, D), qsum (V,) int32 = sum_j q_ij, ws (V,) fp32 row scales -> out (R, V) fp32 = (xs * (sum_j q_ij u_j - zp
 * qsum_i)) * ws_i, and where cm is not NULL, cm (R, ceil(V / I8_TILE_ROWS)): the maximum of each row of out over
 * each I8_TILE_ROWS-wide chunk (the last one partial), NaN where the chunk holds a NaN. Returns 0, -2 when memory
 * could not be had, or -3 where the CPU lacks AVX512-VNNI or Dp is not a multiple of 8. */
int dsv3_head_i8(const uint8_t *u, int64_t R, const int8_t *p, const int32_t *qsum, const float *ws, float xs,
                 int32_t zp, int64_t V, int64_t Dp, float *out, float *cm, int nthreads) {
    if (!__builtin_cpu_supports("avx512vnni") || Dp % KB) return -3;
    if (R == 0 || V == 0) return 0;
    const int64_t nb = (V + VB - 1) / VB, K8 = Dp / KB, rl = row_lane_rows(R);
    /* the rows of u arranged: per 16 for the row-lane form, two groups of [k / 8][8 rows][8 bytes]; the rest per
     * UR rows [k / 8][rows][8 bytes] for the vocabulary-lane form (so its loop reads them through one pointer) */
    uint8_t *ut = aligned_alloc(64, (size_t)(R * Dp) + 64), *uv = ut + rl * Dp;
    if (!ut) return -2;
    for (int64_t m0 = 0; m0 < rl; m0 += RL)
        for (int64_t h = 0; h < 2; h++)
            for (int64_t k8 = 0; k8 < K8; k8++)
                for (int64_t r = 0; r < 8; r++)
                    memcpy(ut + m0 * Dp + (h * K8 + k8) * 64 + r * KB, u + (m0 + h * 8 + r) * Dp + k8 * KB, KB);
    for (int64_t m0 = rl; m0 < R; m0 += UR) {
        const int64_t mr = R - m0 < UR ? R - m0 : UR;
        for (int64_t k8 = 0; k8 < K8; k8++)
            for (int64_t r = 0; r < mr; r++)
                memcpy(uv + (m0 - rl) * Dp + (k8 * mr + r) * KB, u + (m0 + r) * Dp + k8 * KB, KB);
    }
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAXT) nthreads = MAXT;
    i8_t jobs[MAXT];
    for (int t = 0; t < nthreads; t++) {
        i8_t g = {ut, uv, p, qsum, ws, out, cm, xs, zp, R, V, Dp, (V + I8_TILE_ROWS - 1) / I8_TILE_ROWS, 0, 0};
        int64_t lo, hi; /* whole chunks per thread */
        split((nb + CB - 1) / CB, t, nthreads, &lo, &hi);
        g.lo = lo * CB;
        g.hi = hi * CB < nb ? hi * CB : nb;
        jobs[t] = g;
    }
    int rc = run_threads(i8_run, jobs, sizeof(i8_t), nthreads);
    free(ut);
    return rc;
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
