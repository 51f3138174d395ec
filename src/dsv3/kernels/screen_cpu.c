/* The candidate search of the greedy head screen (dsv3/infer/screen.py, GreedyHead._candidates) in one call:
 * the same fp32 arithmetic as the PyTorch twin, in the same order, so the same candidates, without the ~40
 * tensor ops (and the passes over the (R, V) approximate logits) the twin takes per step. */
#include "common.h"

typedef struct {
    const float *a, *t, *f, *c, *m; /* a (R, V); terms t (3, R); factors f (3, V); chunk factors c (3, n); maxima m (3) */
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
    for (int64_t j = 0; j < nch; j++) {
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
 * fp32 head); eps: the rounding slack factor. Writes the candidates (row_of, ids: row-major, ascending ids) and
 * returns their number, or -2 when there are more than cap or memory could not be had, -3 when CH is not a
 * positive multiple of 16 (the caller's twin then runs). */
int64_t dsv3_screen_candidates(const float *a, const float *t, const float *f, const float *c, const float *m,
                               int64_t R, int64_t V, int64_t CH, float band, float eps, int64_t *row_of, int64_t *ids,
                               int64_t cap) {
    if (CH <= 0 || CH % 16) return -3;
    float *av = malloc((size_t)(cap > 0 ? cap : 1) * sizeof(float)), *cm = malloc((size_t)(V / CH + 1) * sizeof(float));
    int64_t n = 0;
    if (!av || !cm) n = -2;
    screen_t s = {a, t, f, c, m, R, V, CH, band, eps, row_of, ids, av, cap};
    for (int64_t r = 0; r < R && n >= 0; r++)
        if (screen_row(&s, r, cm, &n) != 0) n = -2;
    free(av);
    free(cm);
    return n;
}
