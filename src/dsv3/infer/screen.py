"""Exact greedy token choice that reads an int8 copy of the output head.

At batch 1 the output head dominates a decode step of a model with a large vocabulary: DeepSeek-V3's
129,280 x 7168 head (and the `small` preset's 129,280 x 512) is read in full for one argmax, while
the rest of the step reads only the activated experts. A greedy step needs only the argmax, and the
argmax can be found exactly without reading the fp32 head in full:

1. approximate logits a = Wq . hq with an int8 per-row quantized copy of the head and an 8-bit
   quantized activation (oneDNN's or fbgemm's int8 kernel reads a quarter of the bytes);
2. a guaranteed per-row error bound b_i >= |a_i - l_i| (l = W . h, the fp32 logits), from norms
   precomputed once per weight and quantities of h (below);
3. every row whose upper bound a_i + b_i reaches a lower bound of the best logit (max_k a_k - b_k)
   is a candidate: the true argmax i* always is (l_i* >= l_k implies a_i* + b_i* >= a_k - b_k). The
   candidates (a few to a few tens of 129,280) are rescored with the fp32 weight and the best one
   wins. They are found in one pass over a: maxima of CHUNK-wide chunks, with the largest b of each
   chunk, locate the few chunks that can hold one; only those are read again (`_candidates`).

The bound, for row i (e_i = w_i - wq_i, r = h - hq):
  |a_i - l_i| <= |e_i . h| + |wq_i . r| + rounding
             <= ||e_i||_2 ||h||_2 + ||wq_i||_2 ||r||_2 + rounding.
The activation is quantized here (uint8, one scale for the rows of a call) and handed to oneDNN's
int8 linear with that scale, so r is known exactly and ||r||_2 is measured. Where that kernel is
missing, torch's dynamic int8 linear quantizes h itself, r is not seen, and the middle term becomes
||wq_i||_1 ||r||_inf with ||r||_inf <= s/2 for the activation scale s <= (max(h, 0) - min(h, 0)) / 127
of any 8-bit dynamic quantization (about four times as wide, so about ten times the candidates).
The rounding terms cover the kernel's fp32 output scaling and the fp32 dot products of the reference
(|fl(w.h) - w.h| <= D u sum_j |w_ij h_j|, u = 2^-24). On random weights the largest error seen is
about a sixth of the bound; when the candidate set still grows too large (hidden states with extreme
outliers), the full fp32 product is computed instead. Candidates whose fp32 values lie within the
fp32 rounding bound of the best are compared again in float64, so the token is the argmax of the
exact logits (the first of equal ones). It is the argmax of fp32 logits except where fp32 rounding
reorders two logits within ~1e-6 relative of each other; there two BLAS libraries (or two block
positions of one GEMV) can disagree too.

bf16 heads (the dtype of the released checkpoints) are screened the same way, from the int8 copy of
their values. A bf16 model's greedy token is the argmax of its bf16 logits, which are the fp32-
accumulated products rounded to bf16, the first of equal ones: ties after rounding are common (8
significant bits). So every row whose exact logit may round to the best one's value is a candidate
(the threshold is lowered by 2^-6 of the best logit's magnitude, at least one bf16 spacing), the
candidates' fp32 products are rounded to bf16, and the lowest id among the largest wins. That is the
plain path's token except where an fp32 product lies within its accumulation error of a bf16 rounding
boundary, where two GEMM kernels can round it differently too.

Used by greedy decoding in `dsv3.generate`, the engine and MTP drafting/verification, for fp32 and
bf16 heads on CPU; other cases compute the full logits.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from dsv3.kernels import cpu as cpu_kernels
from dsv3.model.linear import Linear
from dsv3.model.mla import version_key

# Below this many head elements the full product is cheap and the screen is not worth its setup.
MIN_ELEMENTS = 1 << 22
# Rows screened at once. oneDNN's int8 kernel costs 5.5 ms for 1 row and 8.7 ms for 16 of the
# `small` preset's 129,280 x 512 head on one core (weights from memory), where the fp32 GEMM costs
# 26 ms and 49 ms; above this many rows the fp32 GEMM catches up with the screen and its rescoring.
MAX_ROWS = 64
# Width of the chunks whose maxima locate the candidates (`GreedyHead._candidates`): the C int8 product's tile,
# whose maxima it takes while they are in registers (any multiple of 16 finds the same candidates)
CHUNK = cpu_kernels.I8_TILE_ROWS
# rows of the head quantized at a time when a GreedyHead is built
BUILD_ROWS = 1024
# More candidates than this in one row and that row's fp32 logits are computed in full instead.
MAX_CANDIDATES = 4096
# the kernel's fp32 output scaling and the reference's fp32 dot product, per unit of L1_i ||h||_inf
_ROUNDING = 2.0 ** -18
# head dtypes the screen takes, and for bf16 the relative width of the band of logits that can round
# to the best one's bf16 value (one spacing is at most 2^-7 of the magnitude; twice that for safety)
DTYPES = (torch.float32, torch.bfloat16)
_BF16_BAND = 2.0 ** -6


def _engine() -> str | None:
    engines = torch.backends.quantized.supported_engines
    for e in ("onednn", "fbgemm", "x86"):  # oneDNN's kernel scales best with the number of rows
        if e in engines:
            return e
    return None


@functools.lru_cache(maxsize=None)
def _vnni() -> bool:
    """Whether the CPU has VNNI (int8 dot products with 32-bit accumulation). Without it, x86 int8
    kernels multiply uint8 by int8 with vpmaddubsw, whose pairwise sums saturate at int16: 8-bit
    activations (up to 255 x 127 x 2) can overflow, 7-bit ones (127 x 127 x 2 = 32,258) cannot, so
    the screen quantizes to 7 bits there (oneDNN's documented advice; torch's reduce_range). Unknown
    (no /proc/cpuinfo) counts as no VNNI."""
    return bool({"avx512_vnni", "avx_vnni"} & cpu_kernels.cpu_flags())


def _onednn_linear():
    """oneDNN's int8 linear on an activation quantized by the caller (the op torch's x86 PT2E
    quantization lowers to), or None when this torch build lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.onednn.qlinear_prepack, torch.ops.onednn.qlinear_pointwise
    except (AttributeError, RuntimeError):
        return None


@contextlib.contextmanager
def _quant_engine(name: str):
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


class GreedyHead:
    """Exact argmax over `weight @ h` (weight (V, D) fp32 or bf16) that reads an int8 copy of the weight.

    kernel: "c" (this project's AVX512-VNNI kernel, dsv3/kernels/screen_cpu.c, on the activation quantized
    here, r measured), "onednn" (oneDNN's int8 linear on the same activation), "dynamic" (torch's dynamic
    int8 linear; the twin the tests tie to them, and the fallback where neither is available), or None for
    the first available."""

    def __init__(self, weight: torch.Tensor, kernel: str | None = None):
        if weight.dtype not in DTYPES or weight.device.type != "cpu" or weight.dim() != 2:
            raise ValueError("GreedyHead needs a 2-D fp32 or bf16 CPU weight")
        if kernel not in (None, "c", "onednn", "dynamic"):
            raise ValueError(f"kernel must be None, 'c', 'onednn' or 'dynamic', got {kernel!r}")
        self.weight = weight.detach()  # rescoring reads candidate rows of it
        self.bf16 = weight.dtype == torch.bfloat16
        V, D = self.weight.shape
        # per-row symmetric int8 quantization (zero rows get scale 1 and stay exactly 0), built BUILD_ROWS rows at a
        # time: the fp32 temporaries stay in cache instead of several (V, D) fp32 copies (a 129k x 7168 head: ~4 GB
        # each), and every row's values are those of a whole-matrix build (row-wise operations only)
        scale = torch.empty(V)
        q8 = torch.empty(V, D, dtype=torch.int8)
        self.err_l2, self.wq_l2, self.l1 = torch.empty(V), torch.empty(V), torch.empty(V)
        qsum = torch.empty(V, dtype=torch.int32)
        for i in range(0, V, BUILD_ROWS):
            j = min(V, i + BUILD_ROWS)
            w = self.weight[i:j].float()  # the values (exact for bf16)
            s = w.abs().amax(dim=1) / 127.0
            s = torch.where(s > 0, s, torch.ones_like(s))
            q = torch.round(w / s[:, None]).clamp_(-127, 127)
            wq = q * s[:, None]  # the dequantized rows the kernel multiplies by
            torch.linalg.vector_norm(w - wq, dim=1, out=self.err_l2[i:j])  # ||e_i||_2
            torch.linalg.vector_norm(wq, dim=1, out=self.wq_l2[i:j])  # ||wq_i||_2
            # one L1 norm for the rounding terms (and the dynamic kernel's activation term): max(||wq_i||_1, ||w_i||_1)
            torch.maximum(wq.abs().sum(dim=1), w.abs().sum(dim=1), out=self.l1[i:j])
            scale[i:j], q8[i:j], qsum[i:j] = s, q, q.sum(dim=1)
        # b_ri = sum_f factor_f[i] * term_f[r], f over (||e_i||_2, ||wq_i||_2, L1_i)
        self._factors = (self.err_l2, self.wq_l2, self.l1)
        self._factor_max = tuple(f.max() for f in self._factors)
        self.err_l2_max, self.l1_max = self._factor_max[0], self._factor_max[2]
        # the largest factors of each CHUNK-wide chunk of rows: a bound of the chunk's b_i (_candidates)
        n = V // CHUNK
        self._factor_chunk = tuple(f[:n * CHUNK].view(n, CHUNK).amax(dim=1) for f in self._factors)
        # the same, stacked for the C candidate search (dsv3.kernels.cpu.screen_candidates)
        self._stacked = (torch.stack(self._factors).float().contiguous(),
                         torch.stack(self._factor_chunk).float().contiguous() if n else torch.zeros(3, 0),
                         torch.stack(self._factor_max).float().contiguous())
        self.kernel = self.engine = None
        if kernel in (None, "c") and cpu_kernels.vnni():
            # this project's AVX512-VNNI kernel (dsv3/kernels/screen_cpu.c) on a copy packed for it
            self._i8 = cpu_kernels.i8_pack(q8)
            self._i8_qsum = qsum
            self._w_scale = scale.float().contiguous()
            self.kernel = "c"
        elif kernel == "c":
            raise ValueError("kernel 'c' needs the CPU kernels and AVX512-VNNI")
        ops = _onednn_linear() if kernel in (None, "onednn") and self.kernel is None else None
        if ops is not None:
            try:
                self._w_packed = ops[0](q8, [1, D])
                self._w_scale, self._w_zp = scale.float(), torch.zeros(V, dtype=torch.long)
                self._linear = ops[1]
                self.kernel = "onednn"
            except RuntimeError:
                if kernel == "onednn":
                    raise
        if self.kernel is None:
            if kernel == "onednn":
                raise ValueError("this torch build has no oneDNN int8 linear (torch.ops.onednn.qlinear_pointwise)")
            engine = _engine()
            if engine is None:
                raise ValueError("GreedyHead needs oneDNN or a quantized CPU engine (onednn, fbgemm or x86) "
                                 "in this torch build")
            with _quant_engine(engine), _quiet():
                qw = torch.quantize_per_channel(self.weight.float(), scale.double(), torch.zeros(V, dtype=torch.long), 0, torch.qint8)
                self._packed = torch.ops.quantized.linear_prepack(qw, None)
            self.kernel, self.engine = "dynamic", engine
        # the candidate search and rescoring: "c" (one kernel call each, where the CPU kernels load) or "torch"
        # (their twins)
        self.search = "c"
        self.version = version_key(self.weight)
        self.rows = self.candidates = self.fallbacks = 0  # statistics: rows screened, candidates rescored

    @staticmethod
    def supported(weight: torch.Tensor) -> bool:
        return (weight.dtype in DTYPES and weight.device.type == "cpu" and weight.dim() == 2
                and weight.numel() >= MIN_ELEMENTS and (_onednn_linear() is not None or _engine() is not None))

    def _screen(self, h: torch.Tensor):
        """h (R, D) fp32 -> approximate logits a (R, V) and the terms (R,) of each row's bound:
        b_ri = ||e_i||_2 t0_r + ||wq_i||_2 t1_r + L1_i t2_r >= |a_ri - (W h_r)_i|."""
        D = h.shape[1]
        h_inf = h.abs().amax(dim=1)
        if self.kernel in ("onednn", "c"):
            # uint8 with zero point 128 and one fp32 scale xs for every row: the kernel computes
            # a = xs * scale_i * sum_j q_ij (u_j - 128) (exact in int32), so hq = xs (u - 128) is known
            # 8 bits (zero point 128) with VNNI, 7 bits (zero point 64) without: see _vnni
            zp = 128 if _vnni() or self.kernel == "c" else 64
            # (from the finite rows only: a row that is not finite gets no candidates and its full product
            # anyway, and must not coarsen the others' quantization)
            fin = h_inf[torch.isfinite(h_inf)]
            xs = float(torch.tensor(float(fin.max()) / (zp - 1), dtype=torch.float32)) if fin.numel() else 1.0
            if not 0.0 < xs < float("inf"):  # all zero (a = 0, exactly) or not finite (the bound is NaN)
                xs = 1.0
            u = torch.round(h / xs).add_(zp).clamp_(0, 2 * zp - 1).to(torch.uint8)
            if self.kernel == "c":
                Dp = cpu_kernels.i8_dim(D)
                up = u if Dp == D else torch.nn.functional.pad(u, (0, Dp - D), value=zp)  # (u - zp) = 0 there
                a = cpu_kernels.head_i8(up.contiguous(), self._i8, self._i8_qsum, self._w_scale, xs, zp,
                                        self.weight.shape[0])
            else:
                a = self._linear(u, xs, zp, self._w_packed, self._w_scale, self._w_zp, None, 1.0, 0, torch.float32,
                                 "none", [None], "")
            # r in float64 is exact up to 2^-53; the factor covers that and the fp32 norm
            r = h.double() - (u.double() - zp) * xs
            rn = r.norm(dim=1).float() * (1 + 2.0 ** -16)
            return a, (h.norm(dim=1), rn, (_ROUNDING + 2 * D * 2.0 ** -24) * (h_inf + xs))
        with _quant_engine(self.engine):
            a = torch.ops.quantized.linear_dynamic(h, self._packed, not _vnni())  # reduce_range without VNNI
        # The kernel quantizes all of h with one scale s. Whatever its scheme (asymmetric uint8 over
        # [min(h, 0), max(h, 0)]: s = range / 255; with reduce_range: range / 127; symmetric int8:
        # max|h| / 127), s <= range / 127, and each element is off by at most s / 2 (with margin for
        # the kernel's float arithmetic in choosing s): a term of the L1 norm, as the rounding is
        s = (torch.clamp(h.amax(), min=0.0) - torch.clamp(h.amin(), max=0.0)) / 127.0
        c = 0.5 * s * 1.01 + (_ROUNDING + 2 * D * 2.0 ** -24) * (h_inf + s)
        return a, (h.norm(dim=1), torch.zeros_like(c), c)

    def _screen_c(self, h: torch.Tensor):
        """argmax's scaling and _screen for kernel "c": the quantization and the bound's terms in one C call
        (norms in float64, rounded up), then the int8 product, with the maxima of its CHUNK-wide chunks."""
        u, t, xs = cpu_kernels.screen_prepare(h, 128, _ROUNDING + 2 * h.shape[1] * 2.0 ** -24)
        a, chunk_max = cpu_kernels.head_i8(u, self._i8, self._i8_qsum, self._w_scale, xs, 128, self.weight.shape[0],
                                           chunk_max=True)
        return a, (t[0], t[1], t[2]), chunk_max

    def approx(self, h: torch.Tensor) -> torch.Tensor:
        """(R, D) fp32 -> (R, V) logits from the int8 weight and 8-bit quantized h."""
        return self._screen(h.float().contiguous())[0]

    def bound(self, h: torch.Tensor) -> torch.Tensor:
        """(R, D) -> (R, V): b[r, i] >= |approx(h)[r, i] - (W h_r)_i| (see the module docstring)."""
        t = self._screen(h.float().contiguous())[1]
        return sum(f[None] * x[:, None] for f, x in zip(self._factors, t))

    def bound_max(self, h: torch.Tensor) -> torch.Tensor:
        """(R, D) -> (R,): the largest b[r, i] of a row can be, from the largest factors."""
        t = self._screen(h.float().contiguous())[1]
        return sum(m * x for m, x in zip(self._factor_max, t))

    def argmax(self, h: torch.Tensor) -> torch.Tensor:
        """h (R, D) -> (R,) int64: argmax of the logits W h_r, for each row (fp32 logits, or for a bf16
        head the bf16 logits, first of equal ones: see the module docstring)."""
        assert h.dim() == 2 and h.shape[1] == self.weight.shape[1]
        h_in = h
        h = h.float().contiguous()
        R, D = h.shape
        # The kernel quantizes all rows with one scale: rows scaled to max |h_r| = 1 each get the
        # resolution of their own range (the argmax of a row does not change under a positive scale;
        # the bound below is computed for the scaled rows, the rescoring uses h itself)
        chunk_max = None
        if self.kernel == "c" and self.search == "c":
            a, terms, chunk_max = self._screen_c(h)  # the same in two C calls (their twin: the lines below)
        else:
            alpha = h.abs().amax(dim=1, keepdim=True)
            hs = h / torch.where(alpha > 0, alpha, torch.ones_like(alpha))
            a, terms = self._screen(hs)  # (R, V)
        row_of, ids = self._candidates(a, terms, chunk_max)  # row-major, ascending ids within a row
        self.rows += R
        counts = torch.bincount(row_of, minlength=R)
        out = torch.empty(R, dtype=torch.long)
        # (the few rows' counts checked as Python ints: a decode step pays per tensor op here)
        bad_rows = [r for r, c in enumerate(counts.tolist()) if c == 0 or c > MAX_CANDIDATES]
        if bad_rows:  # bound too loose (extreme outliers) or h not finite: the full product
            bad = torch.zeros(R, dtype=torch.bool)
            bad[bad_rows] = True
            for r in bad_rows:
                self.fallbacks += 1
                out[r] = torch.nn.functional.linear(h_in[r:r + 1].to(self.weight.dtype), self.weight).argmax()
            keep = ~bad[row_of]
            row_of, ids, counts = row_of[keep], ids[keep], counts.masked_fill(bad, 0)
        n = ids.numel()
        if n == 0:
            return out
        self.candidates += n
        if self.search == "c":  # the rescoring below in one C call (dsv3/kernels/screen_cpu.c), its twin
            got = cpu_kernels.screen_rescore(h, self.weight, row_of, ids, self.l1)
            if got is not None:
                if not bad_rows:
                    return got
                keep = counts > 0  # rows that fell back above have count 0
                out[keep] = got[keep]
                return out
        # One gather of every row's candidates, then one GEMV per row on its slice (a product of all
        # candidates with all rows would multiply R times the weights needed)
        wc = self.weight.index_select(0, ids).float()  # (n, D)
        cl = counts.tolist()
        exact = torch.cat([torch.mv(w, h[r]) for r, w in enumerate(wc.split(cl)) if cl[r]])  # (n,) fp32
        if self.bf16:
            # the bf16 logits: the fp32 products rounded; the lowest id among the largest (ids ascend
            # within a row)
            rounded = exact.to(torch.bfloat16).float()
            best = torch.full((R,), float("-inf")).scatter_reduce_(0, row_of, rounded, "amax")
            top = (rounded == best[row_of]).nonzero().squeeze(1)
            first = torch.full((R,), torch.iinfo(torch.long).max).scatter_reduce_(0, row_of[top], ids[top], "amin")
            out[counts > 0] = first[counts > 0]  # rows that fell back above have count 0
            return out
        # fp32 GEMV kernels round a dot product differently depending on where the row sits in the
        # block (two equal rows can differ in the last bit). Each fp32 value is within
        # D u ||w_i||_1 ||h||_inf of the exact one, so every row that may truly be the best lies within
        # twice that of the fp32 maximum: those are compared again in float64, ties going to the
        # lowest id, as argmax does
        best = torch.full((R,), float("-inf")).scatter_reduce_(0, row_of, exact, "amax")
        l1 = torch.zeros(R).scatter_reduce_(0, row_of, self.l1[ids], "amax")
        tol = 2 * D * 2.0 ** -24 * l1 * h.abs().amax(dim=1)
        near = (exact >= (best - tol)[row_of]).nonzero().squeeze(1)
        near_rows = row_of[near]
        out[near_rows] = ids[near]  # rows with a single near candidate: that one
        for r in (torch.bincount(near_rows, minlength=R) > 1).nonzero().squeeze(1).tolist():
            sel = near[near_rows == r]  # ascending ids
            out[r] = ids[sel[(wc[sel].double() @ h[r].double()).argmax()]]
        return out

    def _candidates(self, a: torch.Tensor, terms, chunk_max: torch.Tensor | None = None):
        """a (R, V) approximate logits, terms: the (R,) terms of each row's bound (_screen) -> (row,
        id) pairs, row-major with ascending ids, of every i with a_i + b_i >= max_k (a_k - b_k) - slack_r:
        the candidates of step 3 in the module docstring (slack_r covers the fp32 rounding of these
        sums and, for a bf16 head, the band of logits that may round to the best one's bf16 value). A
        row whose a or bound is not finite has none.

        One pass over a: the maxima of CHUNK-wide chunks give the row maxima and, with the largest b
        of each chunk, the few chunks that can hold a candidate; only those are read again. (A
        compare + nonzero over each row of 129,280 costs ~0.3 ms a row on one core, ten times this.)
        With search "c" the C kernel (dsv3/kernels/screen_cpu.c) does the same fp32 arithmetic in the
        same order in one call; the tensor ops below are its twin and the fallback."""
        if self.search == "c":
            got = cpu_kernels.screen_candidates(a, torch.stack(terms).float().contiguous(), *self._stacked, CHUNK,
                                                _BF16_BAND if self.bf16 else 0.0, 2.0 ** -20, chunk_max)
            if got is not None:
                return got
        R, V = a.shape
        n = V // CHUNK
        body_n = n * CHUNK
        r_ar = torch.arange(R)
        f0, f1, f2 = self._factors
        t0, t1, t2 = terms
        # k: the row's argmax of a; a_k - b_k is a lower bound of the best logit, so every candidate
        # has a_i + b_i >= a_k - b_k (-slack); the exact max_k (a_k - b_k) comes from the pairs found
        if n:
            body = a[:, :body_n].view(R, n, CHUNK)
            cmax = body.amax(dim=2)  # (R, n)
            jb = cmax.argmax(dim=1)
            k = jb * CHUNK + body[r_ar, jb].argmax(dim=1)
        tail = a[:, body_n:]
        if V > body_n:
            tv, tj = tail.max(dim=1)
            k = tj + body_n if not n else torch.where(tv > a[r_ar, k], tj + body_n, k)
        ak = a[r_ar, k]
        m0, m1, m2 = self._factor_max
        bmax = m0 * t0 + m1 * t1 + m2 * t2
        slack = 2.0 ** -20 * (ak.abs() + 4 * bmax)
        if self.bf16:  # every row whose logit may round to the best one's bf16 value; |best| <= |a_k| + bmax
            slack = slack + _BF16_BAND * (ak.abs() + bmax)
        thr = ak - (f0[k] * t0 + f1[k] * t1 + f2[k] * t2) - slack  # (R,)
        row_of = ids = torch.empty(0, dtype=torch.long)
        av = a.new_empty(0)
        if n:
            # b of a chunk's rows is at most bch; a chunk whose max + bch is below thr holds none
            c0, c1, c2 = self._factor_chunk
            bch = t0[:, None] * c0[None] + t1[:, None] * c1[None] + t2[:, None] * c2[None]  # (R, n)
            rows, chunks = (cmax + bch >= thr[:, None]).nonzero(as_tuple=True)
            vals = body[rows, chunks]  # (K, CHUNK)
            # a flat nonzero: twice as fast as a 2-D one on CPU
            hit = (vals + bch[rows, chunks][:, None] >= thr[rows][:, None]).view(-1).nonzero().squeeze(1)
            hk = hit // CHUNK
            row_of, ids, av = rows[hk], chunks[hk] * CHUNK + hit % CHUNK, vals.view(-1)[hit]
        if V > body_n:
            tb = (t0[:, None] * f0[None, body_n:] + t1[:, None] * f1[None, body_n:]
                  + t2[:, None] * f2[None, body_n:])
            tr, tjs = (tail + tb >= thr[:, None]).nonzero(as_tuple=True)
            if tr.numel():
                row_of, ids = torch.cat([row_of, tr]), torch.cat([ids, tjs + body_n])
                av = torch.cat([av, tail[tr, tjs]])
                order = row_of.argsort(stable=True)  # tail ids are the largest of their row
                row_of, ids, av = row_of[order], ids[order], av[order]
        bv = f0[ids] * t0[row_of] + f1[ids] * t1[row_of] + f2[ids] * t2[row_of]
        lower = torch.full((R,), float("-inf")).scatter_reduce_(0, row_of, av - bv, "amax")
        keep = (av + bv >= (lower - slack)[row_of]).nonzero().squeeze(1)
        return row_of[keep], ids[keep]

    def stale(self, weight: torch.Tensor) -> bool:
        """Whether to build it again: the weight changed, or its kernel "c" can no longer be had (the CPU kernels
        switched off since, e.g. by an A/B benchmark)."""
        return version_key(weight) != self.version or (self.kernel == "c" and not cpu_kernels.vnni())


@contextlib.contextmanager
def _quiet():
    import warnings

    with warnings.catch_warnings():  # the quantized-tensor constructors warn that they are deprecated
        warnings.simplefilter("ignore")
        yield


def greedy_head(model, rows: int = 1) -> GreedyHead | None:
    """The model's GreedyHead for its output head, built once and rebuilt when the weight changes;
    None where the screen does not apply (more than MAX_ROWS rows at once, a head neither fp32 nor
    bf16, a non-CPU head, a small vocabulary, no quantized engine)."""
    if rows > MAX_ROWS:
        return None
    head = model.head
    # only a plain, whole head: a tensor-parallel head (dsv3.parallel.tensor) holds one vocabulary
    # shard and gathers logits across ranks, so an argmax of its local weight would be wrong
    if type(head) not in (torch.nn.Linear, Linear) or head.weight.shape[0] != model.config.vocab_size:
        return None
    w = head.weight
    if not GreedyHead.supported(w):
        return None
    gh = model.__dict__.get("_greedy_head")
    if gh is None or gh.stale(w):
        gh = GreedyHead(w)
        model.__dict__["_greedy_head"] = gh  # not a submodule: no state_dict entry, no .to()
    return gh


def greedy_tokens(model, h: torch.Tensor) -> torch.Tensor:
    """h (..., D) final hidden states -> argmax of model.logits(h) over the vocabulary, shape (...)."""
    flat = h.reshape(-1, h.shape[-1])
    gh = greedy_head(model, flat.shape[0])
    if gh is None:
        return model.logits(flat).argmax(dim=-1).view(h.shape[:-1])
    with torch.no_grad():
        return gh.argmax(flat).to(h.device).view(h.shape[:-1])
