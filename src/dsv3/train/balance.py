"""Load-balancing math of the DeepSeek-V3 pre-training recipe (paper §2.1.2, §4.5).

Pure functions over router outputs; nothing here knows the model or the process group.
Distributed training reduces the per-expert loads (a SUM all-reduce over the data/expert
parallel ranks) before calling `bias_update`, so the update sees the global batch, as the
paper prescribes.
"""

import torch

__all__ = [
    "count_loads",
    "bias_update",
    "sequence_balance_loss",
    "expert_aux_loss",
    "max_violation",
    "LoadTracker",
]


def count_loads(topk_idx: torch.Tensor, n_routed: int) -> torch.Tensor:
    """Tokens routed to each expert: topk_idx (..., K) -> int64 (n_routed,)."""
    if n_routed <= 0:
        raise ValueError(f"count_loads: n_routed must be positive, got {n_routed}")
    if topk_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"count_loads: topk_idx must be an integer tensor, got {topk_idx.dtype}")
    counts = torch.bincount(topk_idx.reshape(-1).long(), minlength=n_routed)
    if counts.numel() != n_routed:
        raise ValueError(f"count_loads: topk_idx holds expert index {counts.numel() - 1} >= n_routed={n_routed}")
    return counts


@torch.no_grad()
def bias_update(bias: torch.Tensor, loads: torch.Tensor, gamma: float) -> torch.Tensor:
    """Auxiliary-loss-free balancing step (paper §2.1.2): b_i += gamma * sign(mean_load - load_i).

    Updates `bias` IN PLACE (it is normally the gate's `e_score_correction_bias` buffer, which the
    model reads on the next forward) and returns the same tensor. `bias` and `loads` are (E,) for
    one layer or (L, E) for a stack of layers; the mean is taken per layer over its experts.
    An expert exactly at the mean load keeps its bias (sign(0) = 0).
    """
    if bias.dtype != torch.float32:
        # An fp32 bias is required, not a preference: in bf16 the spacing between representable
        # numbers near 1 is 2^-7 ~ 0.0078, so steps of gamma = 0.001 would round away.
        raise ValueError(f"bias_update: bias must be float32, got {bias.dtype}")
    if gamma < 0:
        raise ValueError(f"bias_update: gamma must be >= 0, got {gamma}")
    if loads.shape != bias.shape:
        raise ValueError(
            f"bias_update: loads shape {tuple(loads.shape)} does not match bias shape {tuple(bias.shape)}"
        )
    if bias.dim() not in (1, 2):
        raise ValueError(f"bias_update: expected (E,) or (L, E) tensors, got {bias.dim()} dims")
    # Counts are integers; compare in fp64 so mean vs count is exact for any realistic batch.
    loads = loads.to(device=bias.device, dtype=torch.float64)
    mean = loads.mean(dim=-1, keepdim=True)
    bias.add_(torch.sign(mean - loads).to(torch.float32), alpha=gamma)
    return bias


def _check_routing(name: str, scores: torch.Tensor, topk_idx: torch.Tensor, n_routed: int, top_k: int) -> None:
    if scores.shape[-1] != n_routed:
        raise ValueError(f"{name}: scores last dim is {scores.shape[-1]}, expected n_routed={n_routed}")
    if not 0 < top_k <= n_routed:
        raise ValueError(f"{name}: top_k must be in [1, n_routed={n_routed}], got {top_k}")
    if tuple(topk_idx.shape) != tuple(scores.shape[:-1]) + (top_k,):
        raise ValueError(
            f"{name}: topk_idx shape {tuple(topk_idx.shape)} does not match scores "
            f"{tuple(scores.shape)} with top_k={top_k} (expected {tuple(scores.shape[:-1]) + (top_k,)})"
        )
    if topk_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: topk_idx must be an integer tensor, got {topk_idx.dtype}")


def sequence_balance_loss(
    scores: torch.Tensor, topk_idx: torch.Tensor, n_routed: int, top_k: int, alpha: float
) -> torch.Tensor:
    """Complementary sequence-wise balance loss (paper §2.1.2, eqs. 17-20), batch mean of per-sequence L.

    scores: (B, T, N_r) raw affinities (sigmoid outputs, no bias); topk_idx: (B, T, K_r) the
    experts counted in f_i. The paper's eq. 18 counts Topk of the raw s; the router selects on
    s + bias (and node/group limits), so pass `scores.topk(K_r, -1).indices` for the literal
    equation or the router's selection to count what was actually dispatched (the DeepSeek-V2
    reference gate counts its selection). With zero bias and no group limit the two agree.
    Gradient flows through P_i only: f_i is a count.
    """
    if scores.dim() != 3:
        raise ValueError(f"sequence_balance_loss: scores must be (B, T, N_r), got shape {tuple(scores.shape)}")
    _check_routing("sequence_balance_loss", scores, topk_idx, n_routed, top_k)
    B, T, _ = scores.shape
    # At least fp32 (paper: router math in fp32); fp64 inputs stay fp64 so gradcheck can run.
    dtype = torch.promote_types(scores.dtype, torch.float32)
    s = scores.to(dtype)
    # P_i: normalise the affinities per token (sigmoid scores do not sum to 1), mean over tokens.
    p = (s / s.sum(dim=-1, keepdim=True)).mean(dim=1)  # (B, N_r)
    counts = torch.zeros(B, n_routed, dtype=dtype, device=scores.device)
    counts.scatter_add_(
        1, topk_idx.reshape(B, T * top_k).long(), torch.ones(B, T * top_k, dtype=dtype, device=scores.device)
    )
    f = counts * (n_routed / (top_k * T))  # (B, N_r); f_i = 1 for every expert when perfectly balanced
    return alpha * (f * p).sum(dim=-1).mean()


def expert_aux_loss(
    probs: torch.Tensor, topk_idx: torch.Tensor, n_routed: int, top_k: int, alpha: float
) -> torch.Tensor:
    """Expert-level auxiliary loss over the whole batch: the paper's §4.5 baseline (DeepSeek-V2's
    L_ExpBal, Switch-style), L = alpha * sum_i f_i P_i with f_i = N_r/(K_r T) * count_i over all
    T tokens of the batch and P_i the mean over those tokens of the normalised scores.

    probs: (..., N_r) scores (softmax or sigmoid; normalised here per token, a no-op for softmax);
    topk_idx: (..., K_r). All leading dims are flattened into tokens.
    """
    _check_routing("expert_aux_loss", probs, topk_idx, n_routed, top_k)
    dtype = torch.promote_types(probs.dtype, torch.float32)
    s = probs.reshape(-1, n_routed).to(dtype)
    T = s.shape[0]
    p = (s / s.sum(dim=-1, keepdim=True)).mean(dim=0)  # (N_r,)
    f = count_loads(topk_idx, n_routed).to(device=probs.device, dtype=dtype) * (n_routed / (top_k * T))
    return alpha * (f * p).sum()


def max_violation(loads: torch.Tensor) -> torch.Tensor:
    """MaxVio = max_i load_i / mean_load - 1 (Wang et al. 2024, used in the paper's §4.5 ablations).

    loads: (E,) -> scalar, or (L, E) -> (L,) one value per layer. fp32 result. A layer that
    received no tokens has an undefined MaxVio and yields nan (0/0).
    """
    if loads.dim() not in (1, 2):
        raise ValueError(f"max_violation: expected (E,) or (L, E) loads, got shape {tuple(loads.shape)}")
    loads = loads.to(torch.float64)
    return (loads.amax(dim=-1) / loads.mean(dim=-1) - 1.0).to(torch.float32)


class LoadTracker:
    """Per-layer expert loads for logging: the last batch (MaxVio_batch) and the running total
    since the last reset (a cumulative MaxVio, MaxVio_global when accumulated over an eval set)."""

    def __init__(self, n_layers: int, n_experts: int):
        if n_layers <= 0 or n_experts <= 0:
            raise ValueError(f"LoadTracker: n_layers and n_experts must be positive, got {n_layers}, {n_experts}")
        self.n_layers = n_layers
        self.n_experts = n_experts
        self.batch = torch.zeros(n_layers, n_experts, dtype=torch.int64)
        self.total = torch.zeros(n_layers, n_experts, dtype=torch.int64)
        self.steps = 0

    def update(self, loads: torch.Tensor | list[torch.Tensor]) -> None:
        """Record one batch: (L, E) counts, or a list of L per-layer (E,) counts."""
        if isinstance(loads, (list, tuple)):
            loads = torch.stack([x.detach().to("cpu", torch.int64) for x in loads])
        loads = loads.detach().to("cpu", torch.int64)
        if tuple(loads.shape) != (self.n_layers, self.n_experts):
            raise ValueError(
                f"LoadTracker.update: loads shape {tuple(loads.shape)}, expected ({self.n_layers}, {self.n_experts})"
            )
        self.batch = loads.clone()
        self.total += loads
        self.steps += 1

    def batch_max_violation(self) -> torch.Tensor:
        """(L,) MaxVio of the last recorded batch."""
        if self.steps == 0:
            raise ValueError("LoadTracker: no batch recorded yet")
        return max_violation(self.batch)

    def cumulative_max_violation(self) -> torch.Tensor:
        """(L,) MaxVio of all loads recorded since the last reset."""
        if self.steps == 0:
            raise ValueError("LoadTracker: no batch recorded yet")
        return max_violation(self.total)

    def reset(self) -> None:
        self.batch.zero_()
        self.total.zero_()
        self.steps = 0

    def state_dict(self) -> dict:
        return {
            "n_layers": self.n_layers,
            "n_experts": self.n_experts,
            "batch": self.batch.clone(),
            "total": self.total.clone(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        if (state["n_layers"], state["n_experts"]) != (self.n_layers, self.n_experts):
            raise ValueError(
                f"LoadTracker.load_state_dict: state is for ({state['n_layers']}, {state['n_experts']}) "
                f"layers x experts, this tracker has ({self.n_layers}, {self.n_experts})"
            )
        self.batch = state["batch"].to("cpu", torch.int64).clone()
        self.total = state["total"].to("cpu", torch.int64).clone()
        self.steps = int(state["steps"])
