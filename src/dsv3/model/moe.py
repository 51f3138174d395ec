"""DeepSeekMoE (V3 §2.1.2): shared experts + routed experts chosen by a group-limited gate.

The routed experts' weights are stacked, (E, out, in) per projection, so the grouped path can
run all experts in three grouped GEMMs over tokens sorted by expert. The checkpoint keeps one
tensor per expert (`experts.{e}.gate_proj.weight`, ...); checkpoint.py stacks/unstacks them.
"""
import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.kernels import cpu as cpu_kernels
from dsv3.model.linear import Linear


# torch.compile support for the grouped GEMM: torch has no fp32 meta kernel for grouped_mm (its
# fake-tensor rule accepts bf16 only), so a traced model graph-breaks around every routed expert.
# This custom op runs the very same F.grouped_mm, and tells the compiler the output shape (fake
# kernel) and the gradient (two more grouped GEMMs through the op itself, so the backward traces too).
# Only compiled code uses it: eagerly, F.grouped_mm's own autograd is a little cheaper.
@torch.library.custom_op("dsv3::grouped_mm", mutates_args=())
def _grouped_mm_op(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(a, b, offs=offs)


@_grouped_mm_op.register_fake
def _(a, b, offs):
    if b.dim() == 3:  # (M, K) x (G, K, N) -> (M, N): rows grouped by offs
        return a.new_empty(a.shape[0], b.shape[2])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[1])  # (K, M) x (M, N) -> (G, K, N)


def _grouped_mm_setup(ctx, inputs, output):
    a, b, offs = inputs
    assert b.dim() == 3, "only the (M, K) x (G, K, N) form is differentiated"
    ctx.save_for_backward(a, b, offs)


def _grouped_mm_backward(ctx, grad):
    a, b, offs = ctx.saved_tensors
    grad = grad.contiguous()  # grouped_mm needs real strides (an incoming gradient may be expanded)
    # y_g = a_g b_g for each row group g: da_g = dy_g b_g^T, db_g = a_g^T dy_g (a grouped GEMM over M)
    da = _grouped_mm_op(grad, b.transpose(-2, -1), offs) if ctx.needs_input_grad[0] else None
    db = _grouped_mm_op(a.t(), grad, offs) if ctx.needs_input_grad[1] else None
    return da, db, None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """F.grouped_mm(a, b, offs=offs), traceable by torch.compile in every dtype."""
    if torch.compiler.is_compiling():
        return _grouped_mm_op(a, b, offs)
    return F.grouped_mm(a, b, offs=offs)


# "auto" runs the routed experts pair by pair (Experts.forward_pairs) for this many tokens or fewer
# (and through the C kernel, Experts.forward_kernel, for up to dsv3.kernels.cpu.MOE_MAX_TOKENS where it
# can: it beats both; above that, in CPU inference, through the C GEMMs of Experts.forward_gemm, and
# otherwise grouped_mm's GEMMs)
PAIRS_MAX_TOKENS = 2


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). Dense layers and shared experts."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.w1 = Linear(dim, inter, bias=False)
        self.w2 = Linear(inter, dim, bias=False)
        self.w3 = Linear(dim, inter, bias=False)

    def forward(self, x):
        y = self._kernel(x)
        if y is not None:
            return y
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def _kernel(self, x):
        """bf16 CPU inference over many rows (prefill): the three products and the gated product in one call
        of the experts' GEMM kernel with this MLP as the only expert, which rounds as the modules do; None
        where the modules run (few rows, fp32, autograd, hooks, parallel or FP8 replacements)."""
        lins = (self.w1, self.w2, self.w3)
        if x.dtype != torch.bfloat16 or not cpu_kernels.fusable(*lins):
            return None
        K = x.shape[-1]
        rows = x.numel() // K if K else 0
        if rows <= cpu_kernels.LINEAR_MAX_ROWS or not cpu_kernels.gemm_usable(x, *(m.weight for m in lins)):
            return None
        w1, w2, w3 = (m.weight.unsqueeze(0) for m in lins)
        one = torch.zeros(rows, 1, dtype=torch.int64)
        y = cpu_kernels.moe_gemm(x.reshape(rows, K), w1, w3, w2, one, torch.ones(rows, 1))
        return y.view(*x.shape[:-1], y.shape[-1])


class Gate(nn.Module):
    """Router. V3: sigmoid affinities; the load-balancing bias shifts *selection* only (aux-loss-free
    balancing, V3 §2.1.2); groups are ranked by the sum of their top-2 biased scores, the best
    `topk_group` kept, the rest masked with -inf; weights are the unbiased affinities of the chosen
    experts, renormalised to sum 1 and scaled by routed_scaling_factor.
    V2: softmax affinities, groups ranked by their max score, no renormalisation by default."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.topk = cfg.num_experts_per_tok
        self.n_experts = cfg.n_routed_experts
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.score_func = cfg.scoring_func
        self.topk_method = cfg.topk_method
        self.norm_topk_prob = cfg.norm_topk_prob
        self.route_scale = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size))
        # e_score_correction_bias: a buffer (never trained by the optimizer), kept in fp32
        if cfg.topk_method == "noaux_tc":
            self.register_buffer("bias", torch.zeros(self.n_experts, dtype=torch.float32))
        else:
            self.bias = None

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """(T, D) -> raw affinities s (T, E) in fp32."""
        logits = F.linear(x.float(), self.weight.float())
        return logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)

    def route(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """affinities (T, E) -> (weights (T, K) fp32, expert indices (T, K))."""
        choice = s if self.bias is None else s + self.bias
        if self.topk_method != "greedy" and self.n_group > 1:
            g = choice.view(-1, self.n_group, self.n_experts // self.n_group)  # (T, G, E/G)
            if self.topk_method == "noaux_tc":
                group_scores = g.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = g.amax(dim=-1)
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            drop = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            choice = g.masked_fill(drop[..., None], float("-inf")).flatten(1)
        idx = choice.topk(self.topk, dim=-1).indices
        w = s.gather(1, idx)
        if self.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        return w * self.route_scale, idx

    def forward(self, x):
        return self.route(self.scores(x))


def dispatch(idx: torch.Tensor, n_experts: int):
    """Expert ids (T, K) -> the (token, expert) pairs sorted by expert: their order in idx.flatten(),
    the token of each sorted pair, and the pair count per expert (E,). Every grouped expert
    implementation (this one, FP8 inference, FP8 training) runs its GEMMs on that layout."""
    flat = idx.flatten()
    order = flat.argsort(stable=True)
    # bincount's output length depends on the data (torch.compile would stop its graph here);
    # a scatter-add into n_experts counters gives the same integers at a fixed shape.
    counts = torch.zeros(n_experts, dtype=torch.int64, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))
    return order, order // idx.shape[1], counts


def combine(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, order, token) -> torch.Tensor:
    """Sorted pair outputs y (T*K, D) -> (T, D): each scaled by its gate weight, summed per token."""
    y = y * weights.flatten()[order, None].to(y.dtype)
    return torch.zeros_like(x).index_add_(0, token, y)


class Experts(nn.Module):
    """The routed experts, stacked: w1/w3 (E, I, D), w2 (E, D, I)."""

    def __init__(self, n: int, dim: int, inter: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n, inter, dim))
        self.w2 = nn.Parameter(torch.empty(n, dim, inter))
        self.w3 = nn.Parameter(torch.empty(n, inter, dim))

    def forward_grouped(self, x, weights, idx):
        """Fast path: sort the (token, expert) pairs by expert and run three grouped GEMMs."""
        order, token, counts = dispatch(idx, self.w1.shape[0])
        offs = counts.cumsum(0).to(torch.int32)
        xs = x[token]  # (T*K, D), grouped by expert
        h = F.silu(grouped_mm(xs, self.w1.transpose(1, 2), offs)) * grouped_mm(xs, self.w3.transpose(1, 2), offs)
        y = grouped_mm(h, self.w2.transpose(1, 2), offs)  # (T*K, D)
        return combine(x, y, weights, order, token)

    def forward_loop(self, x, weights, idx):
        """Slow twin: one expert at a time, as the reference implementation does."""
        out = torch.zeros_like(x)
        for e in torch.unique(idx).tolist():
            tok, slot = torch.where(idx == e)
            h = F.silu(x[tok] @ self.w1[e].t()) * (x[tok] @ self.w3[e].t())
            y = (h @ self.w2[e].t()) * weights[tok, slot, None].to(x.dtype)
            out.index_add_(0, tok, y)
        return out

    def kernel_ok(self, x) -> bool:
        """Whether forward_kernel takes x and these weights (dsv3.kernels.cpu.usable)."""
        return cpu_kernels.usable(x, self.w1, self.w2, self.w3)

    def forward_kernel(self, x, weights, idx):
        """Decode path without autograd on AVX-512 CPUs, fp32 or bf16: the C kernel of dsv3/kernels/moe_cpu.c
        reads each chosen expert once and computes all its tokens (no sort, gather or scatter ops),
        each token's sum in ascending expert order whatever the batch (batch-invariant)."""
        return cpu_kernels.moe(x, self.w1, self.w3, self.w2, idx, weights)

    def gemm_ok(self, x) -> bool:
        """Whether forward_gemm takes x and these weights (dsv3.kernels.cpu.gemm_usable: CPU inference)."""
        return cpu_kernels.gemm_usable(x, self.w1, self.w2, self.w3)

    def forward_gemm(self, x, weights, idx):
        """Many-token path without autograd (prefill): the C kernel of dsv3/kernels/gemm_cpu.c runs each
        expert's three products as GEMMs over its tokens (fp32 sums, in bf16 the grouped path's roundings) and
        adds each token's outputs in ascending expert order, with no sort, gather or scatter ops."""
        return cpu_kernels.moe_gemm(x, self.w1, self.w3, self.w2, idx, weights)

    def forward_pairs(self, x, weights, idx):
        """Decode path for a few tokens without autograd: one matrix-vector product per (token, expert)
        pair on views of the stacked weights. The loop twin's sort, gathers and index_add cost more
        than the products themselves when a step has one or two tokens."""
        out = torch.empty_like(x)
        for t, (ws, es) in enumerate(zip(weights.tolist(), idx.tolist())):
            xt = x[t:t + 1]  # (1, D): a one-row F.linear, not torch.mv, whose bf16 CPU kernel is 2-3x slower
            acc = None
            for w, e in zip(ws, es):
                y = F.linear(F.silu(F.linear(xt, self.w1[e])) * F.linear(xt, self.w3[e]), self.w2[e])
                acc = y.mul_(w) if acc is None else acc.add_(y, alpha=w)
            out[t] = acc[0]
        return out


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.topk = cfg.num_experts_per_tok
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size) \
            if cfg.n_shared_experts else None
        # "auto": grouped GEMMs when many (token, expert) pairs, else a loop over just the chosen
        # experts (decode: grouped_mm's CPU path visits every expert, even empty ones);
        # "grouped" / "loop" force one path (the twins the tests tie together); "pairs" is the
        # per-pair decode path auto takes for at most PAIRS_MAX_TOKENS tokens without autograd, and
        # "kernel" the C kernel it takes before that for at most cpu_kernels.MOE_MAX_TOKENS; beyond,
        # inference takes "gemm", the C GEMMs of many tokens.
        self.impl = "auto"
        # When set, forward() stores (affinities (T, E), indices (T, K)) for the load-balancing
        # statistics and losses of training / the engine's expert-load counters.
        self.record_routing = False
        self.last_routing = None

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, D)
        s = self.gate.scores(x)
        weights, idx = self.gate.route(s)
        if self.record_routing:
            self.last_routing = (s, idx)
        y = self.routed(x, weights, idx)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)

    def routed(self, x, weights, idx):
        """x (T, D), gate weights (T, K), expert ids (T, K) -> routed output (T, D). The one piece
        that expert / tensor parallelism (dsv3.parallel) replace."""
        impl = self.impl
        if impl == "auto":
            # (other expert implementations, e.g. FP8-resident ones, bring grouped and loop only)
            if x.shape[0] <= cpu_kernels.MOE_MAX_TOKENS and hasattr(self.experts, "forward_kernel") \
                    and self.experts.kernel_ok(x):
                impl = "kernel"
            elif hasattr(self.experts, "forward_gemm") and self.experts.gemm_ok(x):
                impl = "gemm"
            elif x.shape[0] <= PAIRS_MAX_TOKENS and not (torch.is_grad_enabled() and x.requires_grad) \
                    and hasattr(self.experts, "forward_pairs"):
                impl = "pairs"
            else:
                impl = "grouped" if idx.numel() >= self.n_experts else "loop"
        return getattr(self.experts, f"forward_{impl}")(x, weights, idx)
