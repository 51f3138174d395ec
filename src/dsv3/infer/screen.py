"""Exact greedy token choice that reads an int8 copy of the output head.

At batch 1 the output head dominates a decode step of a model with a large vocabulary: DeepSeek-V3's
129,280 x 7168 head (and the `small` preset's 129,280 x 512) is read in full for one argmax, while
the rest of the step reads only the activated experts. A greedy step needs only the argmax, and the
argmax can be found exactly without reading the fp32 head in full:

1. approximate logits a = Wq . hq with an int8 per-row quantized copy of the head and a dynamically
   quantized activation (fbgemm's int8 GEMV reads a quarter of the bytes);
2. a guaranteed per-row error bound b_i >= |a_i - l_i| (l = W . h, the fp32 logits), from norms
   precomputed once per weight and quantities of h (below);
3. every row whose upper bound a_i + b_i reaches a lower bound of the best logit (a_k - b_k for the
   approximate argmax k) is a candidate: the true argmax i* always is (l_i* >= l_k implies
   a_i* + b_i* >= a_k - b_k). The candidates (a few dozen to a few hundred of 129,280) are rescored
   with the fp32 weight and the best one wins.

The bound, for row i (e_i = w_i - wq_i, r = h - hq):
  |a_i - l_i| <= |e_i . h| + |wq_i . r| + rounding
             <= ||e_i||_2 ||h||_2 + ||wq_i||_1 ||r||_inf + rounding,
with ||r||_inf <= s/2 for the activation scale s = (max(h, 0) - min(h, 0)) / 255 of an 8-bit
dynamic quantization, and rounding terms for fbgemm's fp32 output scaling and for the fp32 dot
products of the reference (|fl(w.h) - w.h| <= D u sum_j |w_ij h_j|, u = 2^-24). The bound is loose
by a small factor, so the candidate set stays small; when it is not (hidden states with extreme
outliers make s large), the full fp32 product is computed instead. The candidates are
rescored in float64, so the token is the argmax of the exact logits (the first of equal ones); it is
the argmax of fp32 logits except where fp32 rounding reorders two logits within ~1e-6 relative of
each other, where two BLAS libraries (or two block positions of one GEMV) can disagree too.

Used by greedy decoding in `dsv3.generate`, the engine and MTP drafting/verification, for fp32 heads
on CPU; other cases compute the full logits.
"""
from __future__ import annotations

import contextlib

import torch

# Below this many head elements the full product is cheap and the screen is not worth its setup.
MIN_ELEMENTS = 1 << 22
# Rows scored at once through the screen: fbgemm's dynamic int8 kernel costs about M times a GEMV for
# M rows (it is written for GEMM shapes), while the fp32 GEMM amortises the weight read over rows.
MAX_ROWS = 4
# More candidates than this and the fp32 product of the whole head is computed instead.
MAX_CANDIDATES = 4096


def _engine() -> str | None:
    engines = torch.backends.quantized.supported_engines
    for e in ("fbgemm", "x86", "onednn"):
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
            raise ValueError("GreedyHead needs a quantized CPU engine (fbgemm, x86 or onednn) in this torch build")
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
        """(R, D) fp32 -> (R, V) int8-screen logits (the kernel quantizes h per tensor, so one row at a time)."""
        with _quant_engine(self.engine):
            return torch.cat([torch.ops.quantized.linear_dynamic(h[i:i + 1], self._packed, False)
                              for i in range(h.shape[0])])

    def _terms(self, h: torch.Tensor):
        """Per row of h (R, D): the factors (||h||_2, c) of b_i = ||e_i||_2 ||h||_2 + L1_i c."""
        D = h.shape[1]
        lo = torch.clamp(h.amin(dim=1), max=0.0)
        hi = torch.clamp(h.amax(dim=1), min=0.0)
        s = (hi - lo) / 255.0  # the 8-bit dynamic activation scale
        h_inf = torch.maximum(hi, -lo)
        # activation rounding (s/2, with margin for the kernel's own float arithmetic in choosing s),
        # fbgemm's fp32 requantization, and the reference's fp32 dot product; each times the L1 norm
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
        a = self.approx(h)  # (R, V)
        hn, c = self._terms(h)
        # Any row's lower bound bounds the best logit from below; the approximate argmax k's is the
        # tightest cheap one. Then a row can only win if a_i + b_i >= a_k - b_k, and b_i <= b_max
        # (one threshold instead of a bound per row: three passes over the vocabulary, not eight).
        k = a.argmax(dim=1)  # (R,)
        rows = torch.arange(h.shape[0])
        best_lower = a[rows, k] - (self.err_l2[k] * hn + self.l1[k] * c)
        threshold = best_lower - (self.err_l2_max * hn + self.l1_max * c)
        out = torch.empty(h.shape[0], dtype=torch.long)
        self.rows += h.shape[0]
        for r in range(h.shape[0]):
            idx = (a[r] >= threshold[r]).nonzero().squeeze(1)  # ascending: ties go to the lowest id, as argmax
            n = idx.numel()
            if n > MAX_CANDIDATES:
                self.fallbacks += 1
                out[r] = torch.nn.functional.linear(h[r:r + 1], self.weight).argmax()
                continue
            self.candidates += n
            # float64 rescoring: fp32 GEMV kernels round a row's dot product differently depending on
            # where it sits in the block (two equal rows can differ in the last bit), so the candidates
            # are compared on (nearly) exact values; argmax takes the first of equal ones
            exact = self.weight[idx].double() @ h[r].double()  # (n,)
            out[r] = idx[exact.argmax()]
        return out

    def stale(self, weight: torch.Tensor) -> bool:
        return (weight.data_ptr(), weight._version) != self.version


@contextlib.contextmanager
def _quiet():
    import warnings

    with warnings.catch_warnings():  # the quantized-tensor constructors warn that they are deprecated
        warnings.simplefilter("ignore")
        yield


def greedy_head(model) -> GreedyHead | None:
    """The model's GreedyHead for its output head, built once and rebuilt when the weight changes;
    None where the screen does not apply (non-fp32 or non-CPU head, small vocabulary, no engine)."""
    w = model.head.weight
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
    gh = greedy_head(model) if flat.shape[0] <= MAX_ROWS else None
    if gh is None:
        return model.logits(flat).argmax(dim=-1).view(h.shape[:-1])
    with torch.no_grad():
        return gh.argmax(flat).to(h.device).view(h.shape[:-1])
