/* The small per-layer pieces of a decode step on x86 CPUs with AVX-512 (dsv3.kernels.cpu builds and loads
 * this with moe_cpu.c): each replaces a chain of a few to twenty eager PyTorch ops whose dispatch, not
 * their arithmetic, is what a decode step of a few rows pays for.
 *
 *   dsv3_rmsnorm:   out = w * (x / sqrt(mean(x^2) + eps)), statistics in fp32 (RMSNorm.composite);
 *   dsv3_rotary:    the rotary embedding of interleaved pairs or of halves (dsv3.model.rope.apply_rotary);
 *   dsv3_mla_attend: MLA's absorbed attention of a few queries over the latent cache
 *                   (MLA._absorbed, with the rotation of the queries' rope part):
 *                     q_lat_h = W_k,h^T q_nope_h                         (C values per head)
 *                     s_hl    = scale * (q_lat_h . kv_l + rope(q_pe_h) . pe_l)   over visible slots l
 *                     p_h     = softmax(s_h)
 *                     o_h     = W_v,h (sum_l p_hl kv_l)                  (v values per head)
 *
 * Every value is computed in fp32 in an order that does not depend on the other rows of the call or on
 * the number of threads (each (query, head) is one job; the absorptions into and out of the latent space run
 * per head over groups of queries sharing each weight load, each value summed the same way in any group;
 * each dot product is a 16-wide accumulator reduced in a fixed order), so a sequence's result does not depend
 * on the batch. bf16 inputs are widened
 * exactly and the outputs rounded to bf16 where the PyTorch path rounds them (after the normalisation
 * and after the weight product of RMSNorm, after the rotation, once at the end of attention).
 */
#include "common.h"

static inline void store(void *dst, int bf, int64_t i, float v) {
    if (bf) ((uint16_t *)dst)[i] = f2bf(v);
    else ((float *)dst)[i] = v;
}

/* out[i] = x[i] + y[i], i < n, in the activation dtype (bf16: the fp32 sum rounded once, as PyTorch adds) */
static void add_rows(const void *x, const void *y, void *out, int64_t n, int bf) {
    for (int64_t i = 0; i < n; i++) {
        if (bf) ((uint16_t *)out)[i] = f2bf(bf2f(((const uint16_t *)x)[i]) + bf2f(((const uint16_t *)y)[i]));
        else ((float *)out)[i] = ((const float *)x)[i] + ((const float *)y)[i];
    }
}

/* y_r[0..m) = sum_i x_r[i] W[i][0..m) for Q rows r (W (n, m) row-major, Q <= VQ): 4 column blocks of 16 at a
 * time, their sums kept in registers over i; each value is its sum from zero in ascending i, one fused
 * multiply-add a term, whatever Q (a row gets the same values alone), and each weight load serves the Q rows */
#define VQ 4
static inline __attribute__((always_inline)) void vecmat_q(const float *const *x, const int Q, const float *W, int64_t n,
                                                           int64_t m, float *const *y) {
    int64_t j = 0;
    for (; j + 64 <= m; j += 64) {
        __m512 acc[VQ][4];
        rows_x64(x, Q, W + j, m, n, acc);
        for (int r = 0; r < Q; r++)
            for (int c = 0; c < 4; c++) _mm512_storeu_ps(y[r] + j + 16 * c, acc[r][c]);
    }
    for (; j < m; j += 16) {
        __mmask16 k = lanes(m - j);
        for (int r = 0; r < Q; r++) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t i = 0; i < n; i++)
                acc = _mm512_fmadd_ps(_mm512_set1_ps(x[r][i]), _mm512_maskz_loadu_ps(k, W + i * m + j), acc);
            _mm512_mask_storeu_ps(y[r] + j, k, acc);
        }
    }
}

#define VECMAT(Q) \
    static void vecmat_##Q(const float *const *x, const float *W, int64_t n, int64_t m, float *const *y) { \
        vecmat_q(x, Q, W, n, m, y); \
    }
VECMAT(1)
VECMAT(2)
VECMAT(3)
VECMAT(4)
static void (*const VECMATS[VQ + 1])(const float *const *, const float *, int64_t, int64_t, float *const *) = {
    NULL, vecmat_1, vecmat_2, vecmat_3, vecmat_4};

/* ------------------------------------------------------------------ RMSNorm */

typedef struct {
    const char *x, *w;
    char *out;
    int64_t xs, D, lo, hi;
    float eps;
    int bf;
} norm_t;

static void *norm_run(void *arg) {
    const norm_t *j = (const norm_t *)arg;
    const int64_t es = j->bf ? 2 : 4;
    float *xf = malloc((size_t)j->D * sizeof(float)), *wf = malloc((size_t)j->D * sizeof(float));
    if (!xf || !wf) { free(xf); free(wf); return (void *)1; }
    widen(j->w, j->bf, j->D, wf);
    for (int64_t m = j->lo; m < j->hi; m++) {
        widen(j->x + m * j->xs * es, j->bf, j->D, xf);
        float ms = dot_w(xf, xf, j->D, 0) / (float)j->D;
        float r = 1.0f / sqrtf(ms + j->eps);
        void *o = j->out + m * j->D * es;
        const __m512 rv = _mm512_set1_ps(r);
        for (int64_t i = 0; i < j->D; i += 16) {
            int64_t n = j->D - i < 16 ? j->D - i : 16;
            __mmask16 k = lanes(n);
            __m512 y = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, xf + i), rv);
            if (j->bf) y = round_bf16(y); /* the normalised x is rounded to the activation dtype first */
            store16(o, i, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, wf + i), y), n, j->bf);
        }
    }
    free(xf);
    free(wf);
    return NULL;
}

/* x: M rows of D values, row m at x + m * xs values; w (D,); out (M, D) contiguous; all fp32 (bf = 0) or all
 * bf16 (bf = 1). Returns 0, or -2 when memory could not be had. */
int dsv3_rmsnorm(const void *x, int64_t xs, const void *w, void *out, int64_t M, int64_t D, float eps, int nthreads,
                 int bf) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAXT) nthreads = MAXT;
    if (M * D < (1 << 16)) nthreads = 1; /* a few rows: the fan-out would cost more than it saves */
    if (nthreads > M) nthreads = (int)(M > 0 ? M : 1);
    norm_t jobs[MAXT];
    for (int t = 0; t < nthreads; t++) {
        norm_t jb = {(const char *)x, (const char *)w, (char *)out, xs, D, 0, 0, eps, bf};
        split(M, t, nthreads, &jb.lo, &jb.hi);
        jobs[t] = jb;
    }
    int failed = 0;
    if (nthreads == 1) failed = norm_run(jobs) != NULL;
    else {
#pragma omp parallel for num_threads(nthreads) schedule(static, 1) reduction(| : failed)
        for (int t = 0; t < nthreads; t++) failed |= norm_run(&jobs[t]) != NULL;
    }
    return failed ? -2 : 0;
}

/* ------------------------------------------------------------------ rotary embedding */

/* x (R values, widened) -> out, rotated by the R/2 angles of (cos, sin): interleaved pairs (x0, x1),
 * (x2, x3), ... or halves (x_i, x_{i + R/2}); fp32, each product rounded as PyTorch's separate ops do */
static inline void rotate(const float *x, const float *cs, const float *sn, int64_t R, int interleave, float *out) {
    int64_t h = R / 2;
    for (int64_t i = 0; i < h; i++) {
        float x1 = interleave ? x[2 * i] : x[i], x2 = interleave ? x[2 * i + 1] : x[i + h];
        float a = x1 * cs[i], b = x2 * sn[i], c = x2 * cs[i], d = x1 * sn[i];
        out[interleave ? 2 * i : i] = a - b;
        out[interleave ? 2 * i + 1 : i + h] = c + d;
    }
}

/* x: N rows of H heads of R values, head (n, h) at x + n * xs + h * hs values; cos, sin (N, R/2) fp32;
 * out (N, H, R) contiguous, x's dtype */
int dsv3_rotary(const void *x, int64_t xs, int64_t hs, const float *cs, const float *sn, void *out, int64_t N,
                int64_t H, int64_t R, int interleave, int bf) {
    const int64_t es = bf ? 2 : 4;
    float xf[1024], of[1024];
    if (R > 1024 || R % 2) return -3;
    for (int64_t n = 0; n < N; n++)
        for (int64_t h = 0; h < H; h++) {
            widen((const char *)x + (n * xs + h * hs) * es, bf, R, xf);
            rotate(xf, cs + n * (R / 2), sn + n * (R / 2), R, interleave, of);
            for (int64_t i = 0; i < R; i++) store(out, bf, (n * H + h) * R + i, of[i]);
        }
    return 0;
}

/* ------------------------------------------------------------------ absorbed MLA attention */

typedef struct {
    const char *q, *kv, *pe;
    const float *cs, *sn, *wk, *wvt;
    const int64_t *slots;
    const uint8_t *mask;
    char *out;
    int64_t B, S, H, nope, R, C, V, L, kv_sb, kv_st, pe_sb, pe_st;
    float scale;
    int interleave, bf;
} attn_t;

#define HB 8  /* heads of one query attended together: each cache row is read once for them */
#define TB 16 /* cache rows scored together: 16 dot products reduced into one vector */
#define PV 8  /* latent vectors weighted together (independent sums, one per vector of 16 values) */

/* the cache row of (b, l): its kv (C values) and pe (R values) */
static inline void cache_row(const attn_t *a, int64_t b, int64_t l, const char **kr, const char **pr) {
    const int64_t es = a->bf ? 2 : 4;
    if (a->slots) {
        int64_t slot = a->slots[b * a->L + l];
        *kr = a->kv + slot * a->kv_st * es;
        *pr = a->pe + slot * a->pe_st * es;
    } else {
        *kr = a->kv + (b * a->kv_sb + l * a->kv_st) * es;
        *pr = a->pe + (b * a->pe_sb + l * a->pe_st) * es;
    }
}

/* rows l0 .. l0 + TB - 1 of sequence b, widened to fp32 into blk (row stride P): the kv values, then the pe
 * values when width > C, zero-padded to a whole number of 16-value blocks of width; rows past L or not visible
 * to the query (mask row mrow, or past slot `last` without one) are zeros. Returns the visible rows' mask. */
static __mmask16 load_block(const attn_t *a, int64_t b, int64_t l0, const uint8_t *mrow, int64_t last, int64_t width,
                            int64_t P, float *blk) {
    const int64_t nb = a->L - l0 < TB ? a->L - l0 : TB, padded = kblocks(width) * 16;
    __mmask16 vis = 0;
    for (int64_t j = 0; j < TB; j++) {
        float *row = blk + j * P;
        int64_t l = l0 + j;
        if (j < nb && (mrow ? mrow[l] != 0 : l <= last)) {
            const char *kr, *pr;
            cache_row(a, b, l, &kr, &pr);
            widen(kr, a->bf, a->C, row);
            if (width > a->C) widen(pr, a->bf, width - a->C, row + a->C);
            memset(row + width, 0, (size_t)(padded - width) * sizeof(float));
            vis |= (__mmask16)(1u << j);
        } else {
            memset(row, 0, (size_t)padded * sizeof(float));
        }
    }
    return vis;
}

/* The queries of head h for queries [q0, q0 + nq) (nq <= VQ), joined into qj + (qi * H + h) * P: the nope part
 * moved into the latent space (C values, W_k,h read once for the nq queries), then the rotated rope part (R),
 * zeros up to P */
static void absorb_queries(const attn_t *a, int64_t h, int64_t q0, int nq, float *qj) {
    const int64_t C = a->C, R = a->R, es = a->bf ? 2 : 4, qd = a->nope + R, P = kblocks(C + R) * 16;
    float nope[VQ][1024], tmp[1024];
    const float *xs[VQ];
    float *ys[VQ];
    for (int r = 0; r < nq; r++) {
        const int64_t qi = q0 + r;
        const char *qh = a->q + ((qi * a->H + h) * qd) * es;
        float *q = qj + (qi * a->H + h) * P;
        widen(qh + a->nope * es, a->bf, R, tmp);
        rotate(tmp, a->cs + qi * (R / 2), a->sn + qi * (R / 2), R, a->interleave, q + C);
        if (a->bf) /* rounded as the PyTorch path stores the rotated query */
            for (int64_t i = 0; i < R; i++) q[C + i] = round_bf(q[C + i]);
        memset(q + C + R, 0, (size_t)(P - C - R) * sizeof(float));
        widen(qh, a->bf, a->nope, nope[r]);
        xs[r] = nope[r];
        ys[r] = q;
    }
    VECMATS[nq](xs, a->wk + h * a->nope * C, a->nope, C, ys); /* W_k,h (nope, C) */
}

/* back out of the latent space for head h and queries [q0, q0 + nq): o_h = W_v,h o_lat_h, with W_v,h^T stored
 * (C, V), read once for the nq queries; olat as attend_one leaves it */
static void unabsorb(const attn_t *a, int64_t h, int64_t q0, int nq, const float *olat) {
    const int64_t C = a->C, P = kblocks(C + a->R) * 16;
    float o[VQ][1024];
    const float *xs[VQ];
    float *ys[VQ];
    for (int r = 0; r < nq; r++) {
        xs[r] = olat + ((q0 + r) * a->H + h) * P;
        ys[r] = o[r];
    }
    VECMATS[nq](xs, a->wvt + h * C * a->V, C, a->V, ys);
    for (int r = 0; r < nq; r++)
        for (int64_t i = 0; i < a->V; i += 16)
            store16(a->out, ((q0 + r) * a->H + h) * a->V + i, _mm512_maskz_loadu_ps(lanes(a->V - i), o[r] + i), a->V - i,
                    a->bf);
}

/* job j: query (b, s) = j / nhb, heads [h0, h0 + hb) with h0 = (j % nhb) * HB, its joined queries in qj (from
 * absorb_queries) -> the probability-weighted latents in olat (same layout); buf: this thread's scratch.
 * Rows are handled in blocks of TB, widened to fp32 side by side (kv then pe, zero-padded to P values); rows
 * the query does not see are zeros and their scores -inf, so they add exact zeros and a sequence's result
 * does not depend on the longer sequences it is batched with. */
static void attend_one(const attn_t *a, int64_t job, const float *qj_all, float *olat_all, float *buf) {
    const int64_t nhb = (a->H + HB - 1) / HB, qi = job / nhb, h0 = (job % nhb) * HB;
    const int64_t hb = a->H - h0 < HB ? a->H - h0 : HB, b = qi / a->S, s = qi % a->S;
    const int64_t C = a->C, R = a->R, L = a->L, P = kblocks(C + R) * 16;
    const float *qj = qj_all + (qi * a->H + h0) * P;
    float *olat = olat_all + (qi * a->H + h0) * P, *sc = buf, *blk = sc + HB * kblocks(L) * 16;
    const uint8_t *mrow = a->mask ? a->mask + qi * L : NULL;
    const int64_t last = L - a->S + s; /* causal without a mask: slots 0..L-S+s */
    /* pass 1: scores, TB rows at a time */
    const __m512 scale = _mm512_set1_ps(a->scale), ninf = _mm512_set1_ps(-INFINITY);
    for (int64_t l0 = 0; l0 < L; l0 += TB) {
        const __mmask16 vis = load_block(a, b, l0, mrow, last, C + R, P, blk);
        for (int64_t h = 0; h < hb; h++) {
            __m512 acc[TB];
            const float *q = qj + h * P;
            for (int j = 0; j < TB; j++) acc[j] = _mm512_setzero_ps();
            for (int64_t k = 0; k < P; k += 16) {
                __m512 qv = _mm512_loadu_ps(q + k);
                for (int j = 0; j < TB; j++) acc[j] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(blk + j * P + k), acc[j]);
            }
            __m512 sv = _mm512_mask_mov_ps(ninf, vis, _mm512_mul_ps(reduce16(acc), scale));
            _mm512_storeu_ps(sc + h * kblocks(L) * 16 + l0, sv); /* the row of scores is padded to whole blocks */
        }
    }
    /* softmax per head (fp32) */
    const int64_t LP = kblocks(L) * 16;
    for (int64_t h = 0; h < hb; h++) {
        float *sh = sc + h * LP;
        __m512 mv = ninf, sum = _mm512_setzero_ps();
        for (int64_t l = 0; l < LP; l += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(sh + l));
        mv = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
        for (int64_t l = 0; l < LP; l += 16) {
            __m512 e = vexp(_mm512_sub_ps(_mm512_loadu_ps(sh + l), mv));
            _mm512_storeu_ps(sh + l, e);
            sum = _mm512_add_ps(sum, e);
        }
        float tot = _mm512_reduce_add_ps(sum);
        __m512 inv = _mm512_set1_ps(tot > 0 ? 1.0f / tot : 0.0f);
        for (int64_t l = 0; l < LP; l += 16) _mm512_storeu_ps(sh + l, _mm512_mul_ps(_mm512_loadu_ps(sh + l), inv));
    }
    /* pass 2: the probability-weighted latent, TB rows at a time */
    memset(olat, 0, (size_t)(hb * P) * sizeof(float));
    const int64_t CP = kblocks(C) * 16;
    for (int64_t l0 = 0; l0 < L; l0 += TB) {
        load_block(a, b, l0, mrow, last, C, P, blk);
        for (int64_t h = 0; h < hb; h++) {
            const float *p = sc + h * LP + l0;
            float *o = olat + h * P;
            for (int64_t k0 = 0; k0 < CP; k0 += 16 * PV) { /* PV vectors of the latent in registers over the rows */
                const int nv = (int)((CP - k0) / 16 < PV ? (CP - k0) / 16 : PV);
                __m512 acc[PV];
                for (int v = 0; v < nv; v++) acc[v] = _mm512_loadu_ps(o + k0 + 16 * v);
                for (int j = 0; j < TB; j++) {
                    const __m512 pj = _mm512_set1_ps(p[j]);
                    const float *row = blk + j * P + k0;
                    for (int v = 0; v < nv; v++) acc[v] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(row + 16 * v), acc[v]);
                }
                for (int v = 0; v < nv; v++) _mm512_storeu_ps(o + k0 + 16 * v, acc[v]);
            }
        }
    }
}

/* q (B, S, H, nope + R) contiguous, the rope part not yet rotated; cos, sin (B, S, R/2) fp32;
 * the cache: slot l of row b holds kv (C values) at kv + b * kv_sb + l * kv_st and pe (R values) at
 * pe + b * pe_sb + l * pe_st, or, with slots (B, L), at kv + slots[b, l] * kv_st and pe + slots[b, l] * pe_st;
 * mask (B, S, L) bytes (nonzero: visible), or NULL for causal (query s sees slots 0..L-S+s);
 * wk (H, nope, C), wvt (H, C, V) fp32; out (B, S, H, V). q, the cache and out fp32 (bf = 0) or bf16 (bf = 1).
 * Returns 0, -2 when memory could not be had, -3 for unsupported sizes. */
int dsv3_mla_attend(const void *q, const float *cs, const float *sn, const void *kv, const void *pe, int64_t kv_sb,
                    int64_t kv_st, int64_t pe_sb, int64_t pe_st, const int64_t *slots, const uint8_t *mask,
                    const float *wk, const float *wvt, void *out, int64_t B, int64_t S, int64_t H, int64_t nope,
                    int64_t R, int64_t C, int64_t V, int64_t L, float scale, int interleave, int nthreads, int bf) {
    if (R > 1024 || nope > 1024 || V > 1024 || R % 2) return -3;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAXT) nthreads = MAXT;
    const int64_t nq = B * S, njobs = nq * ((H + HB - 1) / HB), ngroups = H * ((nq + VQ - 1) / VQ);
    if (njobs == 0) return 0;
    if (nthreads > njobs) nthreads = (int)njobs;
    attn_t a = {(const char *)q, (const char *)kv, (const char *)pe, cs, sn, wk, wvt, slots, mask, (char *)out,
                B, S, H, nope, R, C, V, L, kv_sb, kv_st, pe_sb, pe_st, scale, interleave, bf};
    const int64_t P = kblocks(C + R) * 16;
    /* the joined queries and the weighted latents of every (query, head): the absorptions run per head over
     * groups of VQ queries, so each head's W_k,h and W_v,h are read once per group, not once per query (a few
     * hundred KB: the callers pass decode steps' queries, dsv3.kernels.cpu at most STEP_MAX_ROWS (query, head)
     * rows) */
    float *qj = aligned_alloc(64, (size_t)(nq * H * P) * sizeof(float) + 64);
    float *olat = aligned_alloc(64, (size_t)(nq * H * P) * sizeof(float) + 64);
    const size_t per = (size_t)(HB * kblocks(L) * 16 + TB * P) * sizeof(float);
    if (!qj || !olat) {
        free(qj); free(olat);
        return -2;
    }
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed) if (nthreads > 1)
    {
        float *buf = malloc(per);
#pragma omp for schedule(static)
        for (int64_t g = 0; g < ngroups; g++) {
            int64_t h = g % H, q0 = g / H * VQ;
            absorb_queries(&a, h, q0, (int)(nq - q0 < VQ ? nq - q0 : VQ), qj);
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < njobs; j++) {
            if (buf) attend_one(&a, j, qj, olat, buf);
            else failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t g = 0; g < ngroups; g++) {
            int64_t h = g % H, q0 = g / H * VQ;
            unabsorb(&a, h, q0, (int)(nq - q0 < VQ ? nq - q0 : VQ), olat);
        }
        free(buf);
    }
    free(qj); free(olat);
    return failed ? -2 : 0;
}

/* ------------------------------------------------------------------ the attention half of a decode block */

/* out = x + wo(attend(q(n), latent(n))), n = rmsnorm(x), for M = B * S rows of D values (x, out (M, D)
 * contiguous; out may be x): MLA.forward over a latent cache, with the residual add, in one call. Each piece
 * is the kernel above with the PyTorch path's roundings between them (every intermediate tensor the PyTorch
 * path materialises is rounded to the activation dtype here too), so the values are those of the per-piece
 * kernels.
 *   q: wq (H * (nope + R), D), or wq_a (QR, D), q_norm (QR,), wq_b (H * (nope + R), QR) when wq is NULL;
 *   wkv_a (C + R, D), kv_norm (C,), wo (D, H * V) (the projections in bf16 packed by dsv3_pack_bf16, as
 *   dsv3_linear takes them); wk, wvt, cos, sin, mask: as dsv3_mla_attend;
 *   the cache: the new latents of row m go to kv + wslots[m] * kv_st and pe + wslots[m] * pe_st, and the
 *   query rows of sequence b read slots rslots[b, 0..L).
 * Returns 0, -2 when memory could not be had, -3 for unsupported sizes. */
int dsv3_mla_block(const void *x, void *out, int64_t B, int64_t S, int64_t D, const void *attn_norm, float eps,
                   const void *wq, const void *wq_a, const void *q_norm, float q_eps, const void *wq_b, int64_t QR,
                   const void *wkv_a, const void *kv_norm, float kv_eps, const void *wo, const float *wk,
                   const float *wvt, const float *cs, const float *sn, void *kv, void *pe, int64_t kv_st,
                   int64_t pe_st, const int64_t *wslots, const int64_t *rslots, int64_t L, const uint8_t *mask,
                   int64_t H, int64_t nope, int64_t R, int64_t C, int64_t V, float scale, int interleave,
                   int nthreads, int bf) {
    const int64_t M = B * S, es = bf ? 2 : 4, qd = H * (nope + R);
    if (R > 1024 || R % 2 || nope > 1024 || V > 1024) return -3; /* (what dsv3_mla_attend takes: checked before the cache write) */
    if (M == 0) return 0;
    const int64_t n_xn = M * D, n_qa = wq ? 0 : M * QR, n_q = M * qd, n_kvpe = M * (C + R), n_kvn = M * C,
                  n_pe = M * R, n_o = M * H * V, n_ao = M * D;
    char *buf = malloc((size_t)(n_xn + 2 * n_qa + n_q + n_kvpe + n_kvn + n_pe + n_o + n_ao) * es);
    if (!buf) return -2;
    char *xn = buf, *qa = xn + n_xn * es, *qn = qa + n_qa * es, *q = qn + n_qa * es, *kvpe = q + n_q * es;
    char *kvn = kvpe + n_kvpe * es, *per = kvn + n_kvn * es, *o = per + n_pe * es, *ao = o + n_o * es;
    int rc;
    if ((rc = dsv3_rmsnorm(x, D, attn_norm, xn, M, D, eps, nthreads, bf))) goto done;
    if (wq) {
        if ((rc = dsv3_linear(xn, wq, q, M, D, qd, nthreads, bf))) goto done;
    } else {
        if ((rc = dsv3_linear(xn, wq_a, qa, M, D, QR, nthreads, bf))) goto done;
        if ((rc = dsv3_rmsnorm(qa, QR, q_norm, qn, M, QR, q_eps, nthreads, bf))) goto done;
        if ((rc = dsv3_linear(qn, wq_b, q, M, QR, qd, nthreads, bf))) goto done;
    }
    if ((rc = dsv3_linear(xn, wkv_a, kvpe, M, D, C + R, nthreads, bf))) goto done;
    if ((rc = dsv3_rmsnorm(kvpe, C + R, kv_norm, kvn, M, C, kv_eps, nthreads, bf))) goto done;
    if ((rc = dsv3_rotary(kvpe + C * es, C + R, 0, cs, sn, per, M, 1, R, interleave, bf))) goto done;
    for (int64_t m = 0; m < M; m++) {
        memcpy((char *)kv + wslots[m] * kv_st * es, kvn + m * C * es, (size_t)(C * es));
        memcpy((char *)pe + wslots[m] * pe_st * es, per + m * R * es, (size_t)(R * es));
    }
    if ((rc = dsv3_mla_attend(q, cs, sn, kv, pe, 0, kv_st, 0, pe_st, rslots, mask, wk, wvt, o, B, S, H, nope, R, C,
                              V, L, scale, interleave, nthreads, bf)))
        goto done;
    if ((rc = dsv3_linear(o, wo, ao, M, H * V, D, nthreads, bf))) goto done;
    add_rows(x, ao, out, M * D, bf);
done:
    free(buf);
    return rc;
}

/* ------------------------------------------------------------------ the feed-forward half of a decode block */

/* The router of one token (dsv3.model.moe.Gate.route): affinities s (E) -> the K chosen experts idx and their
 * weights gw. choice = s + bias; with groups (method 1: group_limited_greedy, groups ranked by their best
 * choice; 2: noaux_tc, by the sum of their two best), only the experts of the TG best groups compete; the K
 * best choices win, in descending order (the lower id first among equal ones); weights are their unbiased
 * s, divided by their sum when norm, times scale. */
static void route_one(const float *s, const float *bias, int64_t E, int64_t K, int64_t G, int64_t TG, int method,
                      int norm, float scale, float *choice, int64_t *idx, float *gw) {
    for (int64_t e = 0; e < E; e++) choice[e] = bias ? s[e] + bias[e] : s[e];
    if (method != 0 && G > 1) {
        const int64_t per = E / G;
        float gs[1024];
        uint8_t keep[1024];
        for (int64_t g = 0; g < G; g++) {
            float b1 = -INFINITY, b2 = -INFINITY;
            for (int64_t i = 0; i < per; i++) {
                float v = choice[g * per + i];
                if (v > b1) { b2 = b1; b1 = v; }
                else if (v > b2) b2 = v;
            }
            gs[g] = method == 2 ? b1 + b2 : b1;
            keep[g] = 0;
        }
        for (int64_t t = 0; t < TG; t++) {
            int64_t best = -1;
            for (int64_t g = 0; g < G; g++)
                if (!keep[g] && (best < 0 || gs[g] > gs[best])) best = g;
            keep[best] = 1;
        }
        for (int64_t g = 0; g < G; g++)
            if (!keep[g])
                for (int64_t i = 0; i < per; i++) choice[g * per + i] = -INFINITY;
    }
    for (int64_t k = 0; k < K; k++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++) {
            int taken = 0;
            for (int64_t j = 0; j < k; j++) taken |= idx[j] == e;
            if (!taken && (best < 0 || choice[e] > choice[best])) best = e;
        }
        idx[k] = best;
        gw[k] = s[best];
    }
    if (norm) {
        float sum = 0.0f;
        for (int64_t k = 0; k < K; k++) sum += gw[k];
        for (int64_t k = 0; k < K; k++) gw[k] /= sum;
    }
    for (int64_t k = 0; k < K; k++) gw[k] *= scale;
}

/* y = w2 (silu(w1 n) * (w3 n)) for M rows n (M, D): a SwiGLU MLP of inner size I (w1, w3 (I, D), w2 (D, I);
 * in bf16 packed by dsv3_pack_bf16, as dsv3_linear takes them),
 * with the PyTorch path's roundings (each product, the silu and their product in the activation dtype);
 * buf holds 2 * M * I values */
static int swiglu(const void *n, const void *w1, const void *w3, const void *w2, void *y, int64_t M, int64_t D,
                  int64_t I, char *buf, int nthreads, int bf) {
    const int64_t es = bf ? 2 : 4;
    char *a = buf, *b = a + M * I * es;
    int rc;
    if ((rc = dsv3_linear(n, w1, a, M, D, I, nthreads, bf)) || (rc = dsv3_linear(n, w3, b, M, D, I, nthreads, bf)))
        return rc;
    gated_rows(a, b, M * I, bf, bf);
    return dsv3_linear(a, w2, y, M, I, D, nthreads, bf);
}

/* out = x + ffn(rmsnorm(x)) for M rows of D values (x, out (M, D) contiguous; out may be x): Block.forward's
 * second half in one call. ffn is a MoE when gate is given: the router (gate (E, D) in the activation dtype,
 * bias (E,) fp32 or NULL, score 0 sigmoid / 1 softmax, method 0 greedy / 1 group_limited_greedy / 2 noaux_tc,
 * G groups of which TG are kept, K experts per token, norm, scale; affinities in fp32 as Gate.scores computes
 * them), the routed experts w1, w3 (E, I, D), w2 (E, D, I) (dsv3_moe), and the shared experts s1, s3 (SI, D),
 * s2 (D, SI) if s1 is not NULL; without a gate, the dense SwiGLU MLP s1, s3, s2 (s1, s3, s2 as swiglu takes them).
 * Returns 0, -1 for an expert id out of range, -2 when memory could not be had, -3 for unsupported sizes. */
int dsv3_ffn_block(const void *x, void *out, int64_t M, int64_t D, const void *norm_w, float eps, const void *gate,
                   const float *bias, int64_t E, int64_t K, int64_t G, int64_t TG, int score, int method, int norm,
                   float scale, const void *w1, const void *w3, const void *w2, int64_t I, const void *s1,
                   const void *s3, const void *s2, int64_t SI, int nthreads, int bf) {
    const int64_t es = bf ? 2 : 4;
    if (gate && (E > 1024 || G > 1024 || G < 1 || E % G || K > E || TG > G)) return -3;
    if (M == 0) return 0;
    const int64_t inner = SI > I ? SI : I;
    /* scratch parts, each 64-byte aligned */
    const size_t sizes[8] = {(size_t)(M * D * es), (size_t)(M * D * es), (size_t)(M * D * es), (size_t)(2 * M * inner * es),
                             (size_t)(M * E) * 4, (size_t)(M * E) * 4, (size_t)(M * K) * 4, (size_t)(M * K) * 8 + (size_t)D * 4};
    size_t offs[8], total = 0;
    for (int i = 0; i < 8; i++) {
        offs[i] = total;
        total += (sizes[i] + 63) / 64 * 64;
    }
    char *buf = aligned_alloc(64, total);
    if (!buf) return -2;
    char *xn = buf + offs[0], *yr = buf + offs[1], *ys = buf + offs[2], *mlp = buf + offs[3];
    float *sc = (float *)(buf + offs[4]), *choice = (float *)(buf + offs[5]), *gw = (float *)(buf + offs[6]);
    int64_t *idx = (int64_t *)(buf + offs[7]);
    float *row = (float *)(idx + M * K); /* a widened normalised row, for the router */
    int rc;
    if ((rc = dsv3_rmsnorm(x, D, norm_w, xn, M, D, eps, nthreads, bf))) goto done;
    if (gate) {
        for (int64_t m = 0; m < M; m++) {
            float *s = sc + m * E;
            widen(xn + m * D * es, bf, D, row);
            for (int64_t e = 0; e < E; e++) s[e] = dot_w(row, (const char *)gate + e * D * es, D, bf);
            if (score == 0) {
                for (int64_t e = 0; e < E; e++) s[e] = 1.0f / (1.0f + expf(-s[e]));
            } else {
                float mx = -INFINITY, tot = 0.0f;
                for (int64_t e = 0; e < E; e++) mx = s[e] > mx ? s[e] : mx;
                for (int64_t e = 0; e < E; e++) tot += (s[e] = expf(s[e] - mx));
                for (int64_t e = 0; e < E; e++) s[e] /= tot;
            }
            route_one(s, bias, E, K, G, TG, method, norm, scale, choice + m * E, idx + m * K, gw + m * K);
        }
        if ((rc = dsv3_moe(xn, w1, w3, w2, idx, gw, yr, M, D, I, K, E, nthreads, bf))) goto done;
        if (s1) {
            if ((rc = swiglu(xn, s1, s3, s2, ys, M, D, SI, mlp, nthreads, bf))) goto done;
            add_rows(yr, ys, yr, M * D, bf); /* the MoE's output: routed + shared */
        }
    } else if ((rc = swiglu(xn, s1, s3, s2, yr, M, D, SI, mlp, nthreads, bf))) goto done;
    add_rows(x, yr, out, M * D, bf);
done:
    free(buf);
    return rc;
}
