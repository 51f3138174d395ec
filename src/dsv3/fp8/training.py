"""FP8 mixed-precision training (DeepSeek-V3 §3.3), applied from outside the model.

`apply_fp8_training(model)` swaps the linears of attention (MLA), dense MLPs and shared experts
for `FP8TrainLinear`, and the routed experts for `FP8TrainExperts`. Both keep the model's very
Parameter objects (same names, same dtype: the master weights and the optimizer state are
untouched); only the three GEMMs of each linear change:

  Fprop  y  = x  W^T   x: 1x128 tiles along K (= in)        W: 128x128 blocks
  Dgrad  dx = dy W     dy: 1x128 tiles along N (= out)      W: the same 128x128 blocks, transposed
  Wgrad  dW = dy^T x   dy^T and x^T: 1x128 tiles along the token dim (the contraction of Wgrad),
                       i.e. 128x1 tiles of dy and x

Every GEMM takes FP8 (E4M3) operands and accumulates in fp32 with the partial sum of each 128-wide
K block scaled and promoted (the same per-block scheme as dsv3.fp8.linear.fp8_gemm). As in the
paper (§3.3.3), the forward caches the FP8 activation (1x128 tiles along K) for the backward; Wgrad
needs tiles along the tokens instead, so the cached tiles are dequantized, transposed and
re-quantized (the procedure §3.5.2 describes for current hardware). The weight is quantized once
per forward and its blocks serve both Fprop and Dgrad (a 128x128 block is its own transpose's block).

Stay in high precision, as the paper lists: embedding, output head, MoE gate, norms, attention core
(softmax / SDPA), the MTP eh_proj (kept unquantized, as in the release), and everything the
optimizer sees (weights, gradients, moments). Gradients come back in the parameter's dtype after
fp32 accumulation.
"""
import torch
import torch.nn.functional as F
from torch import nn

from dsv3.fp8.linear import BACKENDS, _scaled_mm_supported
from dsv3.fp8.quant import BLOCK, FP8_DTYPE, act_dequant, act_quant, weight_quant
from dsv3.model.moe import MLP, Experts, MoE, combine, dispatch


def _rows(scale: torch.Tensor, n: int, block: int) -> torch.Tensor:
    """(ceil(n/block), KB) block scales -> (n, KB): each row of a weight gets its block-row's scales."""
    return scale.repeat_interleave(block, dim=0)[:n]


def _use_scaled_mm(device: torch.device, backend: str) -> bool:
    return backend == "scaled_mm" or (backend == "auto" and device.type != "cpu" and _scaled_mm_supported(device))


def tile_gemm(aq: torch.Tensor, sa: torch.Tensor, bq: torch.Tensor, sb: torch.Tensor, block: int = BLOCK,
              backend: str = "auto") -> torch.Tensor:
    """A (M, K) fp8 with per-row tile scales sa (M, KB) times B (N, K) fp8 with per-row tile scales
    sb (N, KB) -> A_deq @ B_deq^T (M, N) fp32, accumulated per 128-wide K block: each block's FP8
    product is scaled by sa[:, kb] x sb[:, kb] and added into an fp32 accumulator (the paper's
    promotion every 128 along K). Weight blocks enter as sb = their block-row scales per row."""
    m, k = aq.shape
    n = bq.shape[0]
    assert bq.shape[1] == k and sa.shape == (m, -(-k // block)) and sb.shape == (n, -(-k // block)), \
        (aq.shape, sa.shape, bq.shape, sb.shape)
    out = torch.zeros(m, n, dtype=torch.float32, device=aq.device)
    if m == 0 or n == 0:
        return out
    sb_t = sb.t().contiguous()  # (KB, N)
    smm = _use_scaled_mm(aq.device, backend)
    if not smm:
        af, bf = aq.to(torch.float32), bq.to(torch.float32)  # exact: every E4M3 value is an fp32
    for kb in range(sa.shape[1]):
        k0, k1 = kb * block, min((kb + 1) * block, k)
        s_a, s_b = sa[:, kb:kb + 1].contiguous(), sb_t[kb:kb + 1]  # (M, 1), (1, N)
        if smm:
            a, b = aq[:, k0:k1], bq[:, k0:k1]
            pad = (-(k1 - k0)) % 16  # FP8 GEMM kernels want K in multiples of 16; zeros add nothing
            if pad:
                a = F.pad(a.view(torch.uint8), (0, pad)).view(FP8_DTYPE)
                b = F.pad(b.view(torch.uint8), (0, pad)).view(FP8_DTYPE)
            out += torch._scaled_mm(a.contiguous(), b.contiguous().t(), scale_a=s_a, scale_b=s_b,
                                    out_dtype=torch.float32)
        else:
            out += (af[:, k0:k1] @ bf[:, k0:k1].t()).mul_(s_a).mul_(s_b)
    return out


def _fprop(xq, xs, wq, ws, block, backend):
    return tile_gemm(xq, xs, wq, _rows(ws, wq.shape[0], block), block, backend)


def _dgrad(gq, gs, wq, ws, block, backend):
    # dx = dy W: contraction over N; W^T (K, N) keeps W's blocks, transposed.
    return tile_gemm(gq, gs, wq.t().contiguous(), _rows(ws.t(), wq.shape[1], block), block, backend)


def _wgrad(g, xq, xs, block, backend):
    # dW = dy^T x: contraction over the M tokens, so both operands are tiled along the tokens.
    x = act_dequant(xq, xs, block, torch.float32)  # (M, K): the FP8 cache of the forward
    gtq, gts = act_quant(g.t(), block)  # (N, M), (N, MB)
    xtq, xts = act_quant(x.t(), block)  # (K, M), (K, MB)
    return tile_gemm(gtq, gts, xtq, xts, block, backend)


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, block, backend):
        n, k = weight.shape
        lead = x.shape[:-1]
        xq, xs = act_quant(x.reshape(-1, k), block)  # (M, K) fp8, (M, KB)
        wq, ws = weight_quant(weight.detach(), block)  # (N, K) fp8, (NB, KB)
        y = _fprop(xq, xs, wq, ws, block, backend)
        ctx.save_for_backward(xq, xs, wq, ws)
        ctx.block, ctx.backend, ctx.x_dtype, ctx.w_dtype, ctx.lead = block, backend, x.dtype, weight.dtype, lead
        return y.to(x.dtype).reshape(*lead, n)

    @staticmethod
    def backward(ctx, gy):
        xq, xs, wq, ws = ctx.saved_tensors
        block, backend = ctx.block, ctx.backend
        g = gy.reshape(-1, wq.shape[0])  # (M, N)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            gq, gs = act_quant(g, block)  # 1x128 tiles along N, Dgrad's contraction
            dx = _dgrad(gq, gs, wq, ws, block, backend).to(ctx.x_dtype).reshape(*ctx.lead, wq.shape[1])
        if ctx.needs_input_grad[1]:
            dw = _wgrad(g, xq, xs, block, backend).to(ctx.w_dtype)
        return dx, dw, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, block: int = BLOCK, backend: str = "auto") -> torch.Tensor:
    """y = x W^T with FP8 Fprop / Dgrad / Wgrad GEMMs (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8_linear: input (..., {x.shape[-1]}) does not fit weight {tuple(weight.shape)}")
    return _FP8LinearFn.apply(x, weight, block, backend)


class _FP8GroupedFn(torch.autograd.Function):
    """Rows of x sorted by expert, counts[e] rows each; y[rows of e] = x[rows of e] W[e]^T.
    One Function for all experts, so Wgrad fills one (E, N, K) gradient (no per-expert
    full-size gradient buffers from indexing the stacked parameter)."""

    @staticmethod
    def forward(ctx, x, weight, counts, block, backend):
        E, n, k = weight.shape
        xq, xs = act_quant(x, block)  # tiles are per row: the same as quantizing each group alone
        y = torch.zeros(x.shape[0], n, dtype=torch.float32, device=x.device)
        wqs = {}
        start = 0
        for e, c in enumerate(counts):
            if c:
                wq, ws = weight_quant(weight[e].detach(), block)
                wqs[e] = (wq, ws)
                y[start:start + c] = _fprop(xq[start:start + c], xs[start:start + c], wq, ws, block, backend)
            start += c
        ctx.save_for_backward(xq, xs)
        ctx.wqs, ctx.counts, ctx.block, ctx.backend = wqs, counts, block, backend
        ctx.x_dtype, ctx.w_dtype, ctx.w_shape = x.dtype, weight.dtype, weight.shape
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        xq, xs = ctx.saved_tensors
        block, backend = ctx.block, ctx.backend
        E, n, k = ctx.w_shape
        dx = torch.zeros(xq.shape[0], k, dtype=ctx.x_dtype, device=gy.device) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(ctx.w_shape, dtype=ctx.w_dtype, device=gy.device) if ctx.needs_input_grad[1] else None
        if dx is not None:
            gq, gs = act_quant(gy, block)
        start = 0
        for e, c in enumerate(ctx.counts):
            if c:
                sl = slice(start, start + c)
                wq, ws = ctx.wqs[e]
                if dx is not None:
                    dx[sl] = _dgrad(gq[sl], gs[sl], wq, ws, block, backend).to(ctx.x_dtype)
                if dw is not None:
                    dw[e] = _wgrad(gy[sl], xq[sl], xs[sl], block, backend).to(ctx.w_dtype)
            start += c
        ctx.wqs = None
        return dx, dw, None, None, None


class FP8TrainLinear(nn.Module):
    """Drop-in for a bias-free or biased nn.Linear that trains with FP8 GEMMs; holds the original
    module's Parameters (`weight`, `bias`), so state_dict keys and optimizer state are unchanged."""

    def __init__(self, linear: nn.Linear, block: int = BLOCK, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.block, self.backend = block, backend

    def forward(self, x):
        y = _FP8LinearFn.apply(x, self.weight, self.block, self.backend)
        # the bias add stays in high precision (not a GEMM)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, block={self.block}")


class FP8TrainExperts(nn.Module):
    """The routed experts (same stacked Parameters w1/w3 (E, I, D), w2 (E, D, I) as the Experts it
    replaces) with FP8 GEMMs; forward_grouped / forward_loop as in dsv3.model.moe.Experts."""

    def __init__(self, experts: Experts, block: int = BLOCK, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.w1, self.w2, self.w3 = experts.w1, experts.w2, experts.w3
        self.block, self.backend = block, backend

    def forward_grouped(self, x, weights, idx):
        order, token, counts = dispatch(idx, self.w1.shape[0])
        counts = counts.tolist()
        xs = x[token]  # (T*K, D), grouped by expert

        def gemm(a, w):
            return _FP8GroupedFn.apply(a, w, counts, self.block, self.backend)

        h = F.silu(gemm(xs, self.w1)) * gemm(xs, self.w3)
        y = gemm(h, self.w2)  # (T*K, D)
        return combine(x, y, weights, order, token)

    def forward_loop(self, x, weights, idx):
        out = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():
            tok, slot = torch.where(idx == e)
            xe = x[tok]
            h = F.silu(fp8_linear(xe, self.w1[e], self.block, self.backend)) * \
                fp8_linear(xe, self.w3[e], self.block, self.backend)
            y = fp8_linear(h, self.w2[e], self.block, self.backend) * weights[tok, slot, None].to(x.dtype)
            out.index_add_(0, tok, y)
        return out

    def extra_repr(self) -> str:
        return f"n_experts={self.w1.shape[0]}, block={self.block}"


def apply_fp8_training(model: nn.Module, block: int = BLOCK, backend: str = "auto") -> list[str]:
    """In place: the GEMMs of attention, dense MLPs, shared and routed experts (main layers and
    MTP blocks) run in FP8 for forward and backward. Parameters stay the same objects, so call it
    before or after building the optimizer. Idempotent. Returns the names of the swapped modules."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not hasattr(model, "layers") or not hasattr(model, "mtp"):
        raise ValueError(f"apply_fp8_training expects a dsv3 Transformer, got {type(model).__name__}")
    blocks = [(f"layers.{i}", b) for i, b in enumerate(model.layers)] + \
             [(f"mtp.{k}.block", m.block) for k, m in enumerate(model.mtp)]
    swapped = []
    for prefix, b in blocks:
        targets = [(b.attn, f"{prefix}.attn", n) for n, m in b.attn.named_children() if isinstance(m, nn.Linear)]
        ffn = b.ffn
        mlps = [(ffn, f"{prefix}.ffn")] if isinstance(ffn, MLP) else []
        if isinstance(ffn, MoE) and ffn.shared_experts is not None:
            mlps.append((ffn.shared_experts, f"{prefix}.ffn.shared_experts"))
        for mlp, path in mlps:
            targets += [(mlp, path, n) for n, m in mlp.named_children() if isinstance(m, nn.Linear)]
        for parent, path, name in targets:
            # setattr on an existing child keeps its place in _modules, so parameter order is unchanged
            setattr(parent, name, FP8TrainLinear(getattr(parent, name), block, backend))
            swapped.append(f"{path}.{name}")
        if isinstance(ffn, MoE) and isinstance(ffn.experts, Experts):
            ffn.experts = FP8TrainExperts(ffn.experts, block, backend)
            swapped.append(f"{prefix}.ffn.experts")
    return swapped
