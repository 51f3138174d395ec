"""Exact greedy token choice that reads an int8 copy of the output head.

At batch 1 the output head dominates a decode step of a model with a large vocabulary: DeepSeek-V3's
129,280 x 7168 head (and the `small` preset's 129,280 x 512) is read in full for one argmax, while
the rest of the step reads only the activated experts. A greedy step needs only the argmax, and the
argmax can be found exactly without reading the fp32 head in full:

1. approximate logits a = Wq . hq with an int8 per-row quantized copy of the head and a dynamically
   quantized activation (oneDNN's or fbgemm's int8 kernel reads a quarter of the bytes);
2. a guaranteed per-row error bound b_i >= |a_i - l_i| (l = W . h, the fp32 logits), from norms
   precomputed once per weight and quantities of h (below);
3. every row whose upper bound a_i + b_i reaches a lower bound of the best logit (max_k a_k - b_k,
   itself at least max(a) - max(b)) is a candidate: the true argmax i* always is (l_i* >= l_k
   implies a_i* + b_i* >= a_k - b_k). The candidates (tens to a few hundred of 129,280) are
   rescored with the fp32 weight and the best one wins.

The bound, for row i (e_i = w_i - wq_i, r = h - hq):
  |a_i - l_i| <= |e_i . h| + |wq_i . r| + rounding
             <= ||e_i||_2 ||h||_2 + ||wq_i||_1 ||r||_inf + rounding,
with ||r||_inf <= s/2 for the activation scale s <= (max(h, 0) - min(h, 0)) / 127 of any 8-bit
dynamic quantization, and rounding terms for the kernel's fp32 output scaling and for the fp32 dot
products of the reference (|fl(w.h) - w.h| <= D u sum_j |w_ij h_j|, u = 2^-24). The bound is loose
by a small factor, so the candidate set stays small; when it is not (hidden states with extreme
outliers make s large), the full fp32 product is computed instead. Candidates whose fp32 values lie
within the fp32 rounding bound of the best are compared again in float64, so the token is the
argmax of the exact logits (the first of equal ones). It is the argmax of fp32 logits except where
fp32 rounding reorders two logits within ~1e-6 relative of each other; there two BLAS libraries
(or two block positions of one GEMV) can disagree too.

Used by greedy decoding in `dsv3.generate`, the engine and MTP drafting/verification, for fp32 heads
on CPU; other cases compute the full logits.
"""
from __future__ import annotations

import contextlib

import torch

# Below this many head elements the full product is cheap and the screen is not worth its setup.
MIN_ELEMENTS = 1 << 22
# Rows screened at once. oneDNN's dynamic int8 kernel costs 5.9 ms for 1 row and 9.6 ms for 16 of
# the `small` preset's 129,280 x 512 head on one core, where the fp32 GEMM costs 26 ms and 49 ms;
# above this many rows the fp32 GEMM catches up with the screen plus its candidate rescoring.
MAX_ROWS = 64
# Width of the chunks whose maxima locate the candidates (`candidates`)
CHUNK = 64
# More candidates than this in one row and that row's fp32 logits are computed in full instead.
MAX_CANDIDATES = 4096


def _engine() -> str | None:
    engines = torch.backends.quantized.supported_engines
    for e in ("onednn", "fbgemm", "x86"):  # oneDNN's kernel scales best with the number of rows
        if e in engines:
            return e
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
    """Exact argmax over `weight @ h` (weight (V, D) fp32) that reads an int8 copy of the weight."""

    def __init__(self, weight: torch.Tensor):
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2:
            raise ValueError("GreedyHead needs a 2-D fp32 CPU weight")
        engine = _engine()
        if engine is None:
            raise ValueError("GreedyHead needs a quantized CPU engine (onednn, fbgemm or x86) in this torch build")
        w = weight.detach()
        self.weight, self.engine = w, engine
        V, D = w.shape
        # per-row symmetric int8 quantization (zero rows get scale 1 and stay exactly 0)
        scale = w.abs().amax(dim=1) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(w / scale[:, None]).clamp_(-127, 127)
        wq = q * scale[:, None]  # (V, D) the dequantized copy the kernel multiplies by
        self.err_l2 = (w - wq).norm(dim=1)  # ||e_i||_2
        # one L1 norm for both rounding terms: max(||wq_i||_1, ||w_i||_1)
        self.l1 = torch.maximum(wq.abs().sum(dim=1), w.abs().sum(dim=1))
        del wq
        self.err_l2_max, self.l1_max = self.err_l2.max(), self.l1.max()
        with _quant_engine(engine), _quiet():
            qw = torch.quantize_per_channel(w, scale.double(), torch.zeros(V, dtype=torch.long), 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(qw, None)
        self.version = (w.data_ptr(), w._version)
        self.rows = self.candidates = self.fallbacks = 0  # statistics: rows screened, candidates rescored

    @staticmethod
    def supported(weight: torch.Tensor) -> bool:
        return (weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.dim() == 2
                and weight.numel() >= MIN_ELEMENTS and _engine() is not None)

    def approx(self, h: torch.Tensor) -> torch.Tensor:
        """(R, D) fp32 -> (R, V) logits from the int8 weight and the kernel's 8-bit quantized h."""
        with _quant_engine(self.engine):
            return torch.ops.quantized.linear_dynamic(h, self._packed, False)

    def _terms(self, h: torch.Tensor):
        """Per row of h (R, D): the factors (||h_r||_2, c_r) of b_ri = ||e_i||_2 ||h_r||_2 + L1_i c_r."""
        D = h.shape[1]
        # The kernel quantizes all of h with one scale s. Whatever its scheme (asymmetric uint8 over
        # [min(h, 0), max(h, 0)]: s = range / 255; with reduce_range: range / 127; symmetric int8:
        # max|h| / 127), s <= range / 127, and each element is off by at most s / 2.
        lo = torch.clamp(h.amin(), max=0.0)
        hi = torch.clamp(h.amax(), min=0.0)
        s = (hi - lo) / 127.0
        h_inf = h.abs().amax(dim=1)
        # activation rounding (s/2, with margin for the kernel's float arithmetic in choosing s), the
        # kernel's fp32 requantization, and the reference's fp32 dot product; each times the L1 norm
        c = 0.5 * s * 1.01 + (2.0 ** -18 + 2 * D * 2.0 ** -24) * (h_inf + s)
        return h.norm(dim=1), c

    def bound(self, h: torch.Tensor) -> torch.Tensor:
        """(R, D) -> (R, V): b[r, i] >= |approx(h)[r, i] - (W h_r)_i| (see the module docstring)."""
        hn, c = self._terms(h.float())
        return torch.addcmul(self.err_l2[None] * hn[:, None], self.l1[None], c[:, None])

    def argmax(self, h: torch.Tensor) -> torch.Tensor:
        """h (R, D) -> (R,) int64: argmax of the fp32 logits W h_r, for each row."""
        assert h.dim() == 2 and h.shape[1] == self.weight.shape[1]
        h = h.float().contiguous()
        R = h.shape[0]
        # The kernel quantizes all rows with one scale: rows scaled to max |h_r| = 1 each get the
        # resolution of their own range (the argmax of a row does not change under a positive scale;
        # the bound below is computed for the scaled rows, the rescoring uses h itself)
        alpha = h.abs().amax(dim=1, keepdim=True)
        hs = h / torch.where(alpha > 0, alpha, torch.ones_like(alpha))
        a = self.approx(hs)  # (R, V)
        hn, c = self._terms(hs)
        # The best logit is at least max_k a_k - b_k >= max(a) - b_max; a row can only beat it if
        # a_i + b_i >= that, and b_i <= b_max: one threshold per row (b_max from the largest norms).
        b_max = self.err_l2_max * hn + self.l1_max * c  # (R,)
        cands = candidates(a, 2 * b_max)
        self.rows += R
        out = torch.empty(R, dtype=torch.long)
        for r in range(R):
            idx = cands[r]  # ascending ids
            n = idx.numel()
            if n > MAX_CANDIDATES or n == 0:  # bound too loose (extreme outliers) or h not finite: fp32 in full
                self.fallbacks += 1
                out[r] = torch.nn.functional.linear(h[r:r + 1], self.weight).argmax()
                continue
            self.candidates += n
            wc = self.weight.index_select(0, idx)  # (n, D)
            exact = torch.mv(wc, h[r])  # (n,) fp32
            # fp32 GEMV kernels round a dot product differently depending on where the row sits in
            # the block (two equal rows can differ in the last bit). Each fp32 value is within
            # D u ||w_i||_1 ||h||_inf of the exact one, so every row that may truly be the best lies
            # within twice that of the fp32 maximum: those are compared again in float64, ties
            # going to the lowest id, as argmax does
            tol = 2 * h.shape[1] * 2.0 ** -24 * float(self.l1[idx].max()) * float(h[r].abs().max())
            near = (exact >= exact.max() - tol).nonzero().squeeze(1)
            if near.numel() == 1:
                out[r] = idx[near[0]]
            else:
                out[r] = idx[near[(wc[near].double() @ h[r].double()).argmax()]]
        return out

    def stale(self, weight: torch.Tensor) -> bool:
        return (weight.data_ptr(), weight._version) != self.version


def candidates(a: torch.Tensor, margin: torch.Tensor) -> list[torch.Tensor]:
    """a (R, V), margin (R,) -> per row, the ascending ids i with a[r, i] >= max(a[r]) - margin[r]
    (none in a row whose max or margin is NaN).

    One pass over a: the maxima of CHUNK-wide chunks give both the row maxima and the few chunks
    that can hold a candidate; only those chunks are read again. (A compare + nonzero over each
    row of 129,280 costs ~0.3 ms a row on one core, ten times this pass.)"""
    R, V = a.shape
    body_n = V - V % CHUNK
    body = a[:, :body_n].view(R, body_n // CHUNK, CHUNK)
    cmax = body.amax(dim=2)  # (R, V // CHUNK)
    tail = a[:, body_n:]
    best = torch.cat([cmax, tail.amax(dim=1, keepdim=True)] if tail.shape[1] else [cmax], dim=1).amax(dim=1)
    thr = best - margin  # (R,)
    rows, chunks = (cmax >= thr[:, None]).nonzero(as_tuple=True)
    hit_k, hit_j = (body[rows, chunks] >= thr[rows, None]).nonzero(as_tuple=True)  # (K, CHUNK) -> hits
    row_of, ids = rows[hit_k], chunks[hit_k] * CHUNK + hit_j
    if tail.shape[1]:
        tr, tj = (tail >= thr[:, None]).nonzero(as_tuple=True)
        row_of, ids = torch.cat([row_of, tr]), torch.cat([ids, tj + body_n])
    key = (row_of * V + ids).sort().values  # row-major, ascending ids within a row
    counts = torch.bincount(key // V, minlength=R).tolist()
    return list((key % V).split(counts))


@contextlib.contextmanager
def _quiet():
    import warnings

    with warnings.catch_warnings():  # the quantized-tensor constructors warn that they are deprecated
        warnings.simplefilter("ignore")
        yield


def greedy_head(model, rows: int = 1) -> GreedyHead | None:
    """The model's GreedyHead for its output head, built once and rebuilt when the weight changes;
    None where the screen does not apply (more than MAX_ROWS rows at once, a non-fp32 or non-CPU
    head, a small vocabulary, no quantized engine)."""
    if rows > MAX_ROWS:
        return None
    head = model.head
    # only a plain, whole head: a tensor-parallel head (dsv3.parallel.tensor) holds one vocabulary
    # shard and gathers logits across ranks, so an argmax of its local weight would be wrong
    if type(head) is not torch.nn.Linear or head.weight.shape[0] != model.config.vocab_size:
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
