"""Expert parallelism (DeepSeek-V3 §3.2.2, §3.4): the routed experts of every MoE layer are sharded
over the ranks of an EP process group and tokens travel to the experts.

Applied from outside: `apply_expert_parallel(model, group)` swaps each Block's `ffn` (a `MoE`) for an
`ExpertParallelMoE` that reuses the same `gate` and `shared_experts` modules and keeps only this
rank's slice of the stacked expert weights. Its forward:

  1. route locally (the unchanged gate, on this rank's tokens);
  2. dispatch: each token is sent ONCE to every rank that holds at least one of its experts (as
     DeepEP sends a token once per destination and fans it out there), together with, per top-k
     slot, the local expert index on that rank (-1 when the slot's expert lives elsewhere) and the
     gate weight. The row counts are exchanged first (`all_to_all_single` on the counts), then one
     `all_to_all_single` with uneven splits moves a packed byte buffer (activations, weights,
     indices): one collective per direction keeps gloo's per-call latency out of the way;
  3. the receiving rank runs its local experts as grouped GEMMs over the (row, slot) pairs sorted
     by local expert, multiplies by the gate weights and sums per received row;
  4. combine: one `all_to_all_single` returns the weighted partial sums, which are added into the
     token's output (plus the shared experts, computed locally).
Backward runs the same collectives in reverse inside two autograd Functions (the gradient of a
dispatch is a combine and vice versa), so gradients flow to the activations, to the gate weights
(through the routed outputs) and to the local experts.

Placement of experts and node-limited routing. Expert e lives on EP rank e // (E / ep) (contiguous
slices), so expert group g (experts [g E/G, (g+1) E/G)) lives on the ranks
[g ep/G, (g+1) ep/G) when ep >= G, or rank g // (G/ep) holds G/ep whole groups when G >= ep. A "node"
in the paper's node-limited routing is the set of ranks holding one group (V3: 8 groups on 8 nodes,
EP64); the gate keeps `topk_group` groups per token, so a token is dispatched to at most
topk_group * max(1, ep // G) ranks and touches at most topk_group groups ("nodes"). With redundant
experts (`phy2log` from dsv3.parallel.eplb) physical expert p lives on rank p // (P / ep) and the
tokens of a logical expert are spread round-robin (by token index) over its replicas.

FP8 dispatch (V3 §3.3.2, "low-precision communication"): with `fp8_dispatch=True` the activations are
quantized to E4M3 in 1x128 tiles (fp32 scale per tile) before the dispatch and dequantized on
arrival; the combine and the whole backward stay in the activation dtype, as in the paper
(straight-through: the quantization is treated as identity in backward).

Gradient bookkeeping: a local expert's gradient is the gradient of the SUM of the losses of all EP
ranks (their tokens all reached it). `LocalExperts.grad_scale` (set by dsv3.parallel.data to
1/ep) turns that into the mean, so data parallelism can treat expert and dense parameters alike
(a plain mean over their replica groups).
"""
import time
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dsv3.fp8.quant import act_dequant, act_quant
from dsv3.model.moe import MoE

__all__ = ["ExpertParallelMoE", "LocalExperts", "A2AStats", "apply_expert_parallel", "global_expert_loads"]


# ----------------------------------------------------------------------------- statistics

@dataclass
class A2AStats:
    """What the dispatch/combine actually moved, accumulated over forwards (bytes of the buffers handed
    to all_to_all_single). "remote" excludes the chunk a rank sends to itself (a local copy)."""
    tokens: int = 0                 # tokens routed on this rank
    dispatch_rows: int = 0          # (token, destination rank) copies sent, self included
    dispatch_rows_remote: int = 0
    dispatch_bytes: int = 0
    dispatch_bytes_remote: int = 0
    payload_bytes_remote: int = 0   # the activation part only (no scales / gate weights / indices)
    combine_bytes: int = 0
    combine_bytes_remote: int = 0
    calls: int = 0
    dispatch_s: float = 0.0         # wall time: count exchange + pack (+ FP8 quantize) + all_to_all + unpack
    combine_s: float = 0.0
    quant_s: float = 0.0            # the part of dispatch_s spent quantizing / dequantizing (FP8)
    last_splits: tuple = ()         # (send rows per rank, receive rows per rank, bytes per row) of the last dispatch

    def reset(self):
        for f in fields(self):
            setattr(self, f.name, type(f.default)())

    def add(self, other: "A2AStats"):
        for f in fields(self):
            if f.name != "last_splits":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


# ----------------------------------------------------------------------------- packed all-to-all

def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """(N, c) tensor of any dtype -> (N, c * itemsize) uint8 view (no copy when contiguous)."""
    assert t.dim() == 2
    return t.contiguous().view(torch.uint8)


def _from_bytes(buf: torch.Tensor, start: int, dtype: torch.dtype, cols: int) -> tuple[torch.Tensor, int]:
    size = torch.empty((), dtype=dtype).element_size()
    end = start + cols * size
    out = buf[:, start:end].contiguous().view(dtype)
    assert out.shape == (buf.shape[0], cols)
    return out, end


def _all_to_all_rows(buf: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = buf.new_empty((sum(out_splits), *buf.shape[1:]))
    dist.all_to_all_single(out, buf.contiguous(), out_splits, in_splits, group=group)
    return out


def _dequant_tiles(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """act_dequant for (N, D) fp8 with 1x128 tile scales (N, D/128); when D is a multiple of 128 the
    scales broadcast over a (N, D/128, 128) view instead of being repeated to (N, D): same products."""
    N, D = q.shape
    if D % 128:
        return act_dequant(q, s, dtype=dtype)
    return (q.to(torch.float32).view(N, D // 128, 128) * s[..., None]).view(N, D).to(dtype)


class _Dispatch(torch.autograd.Function):
    """Tokens x (T, D); rows = (token index (N,), gate weights (N, K) fp32, local slots (N, K) int32),
    one row per (token, destination rank), ordered by rank -> the rows this rank receives.
    FP8 quantizes each token once (before it is copied to its destinations).
    Backward: the received rows' gradients travel back (a combine) and are summed per token."""

    @staticmethod
    def forward(ctx, x, tok, w, slot, out_splits, in_splits, group, fp8, stats, rank):
        (T, D), K = x.shape, w.shape[1]
        if fp8:
            t0 = time.perf_counter()
            q, s = act_quant(x)  # E4M3, one fp32 scale per 1x128 tile
            if stats is not None:
                stats.quant_s += time.perf_counter() - t0
            parts = [_as_bytes(q[tok]), _as_bytes(s[tok])]
            payload = q.shape[1]
        else:
            parts = [_as_bytes(x[tok])]
            payload = D * x.element_size()
        parts += [_as_bytes(w.float()), _as_bytes(slot.to(torch.int32))]
        buf = torch.cat(parts, dim=1)  # (N, bytes per row)
        out = _all_to_all_rows(buf, out_splits, in_splits, group)
        if stats is not None:
            stats.last_splits = (list(in_splits), list(out_splits), buf.shape[1])
            remote_rows = sum(in_splits) - in_splits[rank]
            stats.dispatch_rows += sum(in_splits)
            stats.dispatch_rows_remote += remote_rows
            stats.dispatch_bytes += buf.numel()
            stats.dispatch_bytes_remote += remote_rows * buf.shape[1]
            stats.payload_bytes_remote += remote_rows * payload
        if fp8:
            t0 = time.perf_counter()
            q, pos = _from_bytes(out, 0, torch.float8_e4m3fn, D)
            s, pos = _from_bytes(out, pos, torch.float32, -(-D // 128))
            xr = _dequant_tiles(q, s, x.dtype)
            if stats is not None:
                stats.quant_s += time.perf_counter() - t0
        else:
            xr, pos = _from_bytes(out, 0, x.dtype, D)
        wr, pos = _from_bytes(out, pos, torch.float32, K)
        sr, pos = _from_bytes(out, pos, torch.int32, K)
        assert pos == out.shape[1]
        ctx.meta = (out_splits, in_splits, group, x.dtype, T, D, K, x.device)
        ctx.save_for_backward(tok)
        ctx.mark_non_differentiable(sr)
        return xr, wr, sr

    @staticmethod
    def backward(ctx, gx, gw, _gs):
        out_splits, in_splits, group, dtype, T, D, K, device = ctx.meta
        (tok,) = ctx.saved_tensors
        n = sum(out_splits)
        gx = torch.zeros(n, D, dtype=dtype, device=device) if gx is None else gx.to(dtype)
        gw = torch.zeros(n, K, dtype=torch.float32, device=device) if gw is None else gw.float()
        back = _all_to_all_rows(torch.cat([_as_bytes(gx), _as_bytes(gw)], dim=1), in_splits, out_splits, group)
        grows, pos = _from_bytes(back, 0, dtype, D)
        gw, _ = _from_bytes(back, pos, torch.float32, K)
        gx = torch.zeros(T, D, dtype=dtype, device=device).index_add_(0, tok, grows)
        return gx, None, gw, None, None, None, None, None, None, None


class _Combine(torch.autograd.Function):
    """Partial expert outputs (Nr, D) go back to the ranks their rows came from. Backward: a dispatch."""

    @staticmethod
    def forward(ctx, y, out_splits, in_splits, group, stats, rank):
        ctx.meta = (out_splits, in_splits, group)
        out = _all_to_all_rows(y, out_splits, in_splits, group)
        if stats is not None:
            row = y.shape[1] * y.element_size()
            stats.combine_bytes += y.shape[0] * row
            stats.combine_bytes_remote += (y.shape[0] - in_splits[rank]) * row
        return out

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits, group = ctx.meta
        return _all_to_all_rows(g, in_splits, out_splits, group), None, None, None, None, None


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


# ----------------------------------------------------------------------------- local experts

class LocalExperts(nn.Module):
    """This rank's routed experts, stacked like dsv3.model.moe.Experts: w1/w3 (n, I, D), w2 (n, D, I).
    `forward` takes rows with, per top-k slot, a local expert index (-1: not here) and a gate weight,
    and returns per row the weighted sum of its local experts' outputs."""

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, requires_grad: bool = True):
        super().__init__()
        self.w1 = nn.Parameter(w1, requires_grad=requires_grad)
        self.w2 = nn.Parameter(w2, requires_grad=requires_grad)
        self.w3 = nn.Parameter(w3, requires_grad=requires_grad)
        self.impl = "grouped"  # or "loop": the slow twin
        self.grad_scale = 1.0

    @classmethod
    def select(cls, experts: nn.Module, logical: torch.Tensor) -> "LocalExperts":
        """Copies the stacked weights of the listed (logical) experts; works on the meta device too."""
        with torch.no_grad():
            ws = [getattr(experts, n).detach().index_select(0, logical.to(getattr(experts, n).device)).clone()
                  for n in ("w1", "w2", "w3")]
        return cls(*ws, requires_grad=experts.w1.requires_grad)

    def forward(self, x, slot, w):
        # x (N, D); slot (N, K) int32, local expert index or -1; w (N, K) fp32 gate weights
        w1, w2, w3 = self.w1, self.w2, self.w3
        if self.grad_scale != 1.0 and torch.is_grad_enabled():
            w1, w2, w3 = (_ScaleGrad.apply(t, self.grad_scale) for t in (w1, w2, w3))
        row, k = (slot >= 0).nonzero(as_tuple=True)
        e = slot[row, k].long()
        order = e.argsort(stable=True)
        row, k, e = row[order], k[order], e[order]
        gw = w[row, k].to(x.dtype)[:, None]
        if self.impl == "loop":
            out = torch.zeros_like(x)
            for j in torch.unique(e).tolist():
                sel = e == j
                xs = x[row[sel]]
                y = (F.silu(xs @ w1[j].t()) * (xs @ w3[j].t())) @ w2[j].t()
                out = out.index_add(0, row[sel], y * gw[sel])
            return out
        offs = torch.bincount(e, minlength=w1.shape[0]).cumsum(0).to(torch.int32)
        xs = x[row]  # (pairs, D) grouped by local expert
        h = F.silu(F.grouped_mm(xs, w1.transpose(1, 2), offs=offs)) * F.grouped_mm(xs, w3.transpose(1, 2), offs=offs)
        y = F.grouped_mm(h, w2.transpose(1, 2), offs=offs) * gw  # (pairs, D)
        return torch.zeros_like(x).index_add_(0, row, y)


# ----------------------------------------------------------------------------- the EP MoE layer

def _placement_tables(phy2log: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """phy2log (P,) -> log2phy (E, max replicas) padded with -1, logcnt (E,)."""
    logcnt = torch.bincount(phy2log, minlength=n_experts)
    if logcnt.numel() != n_experts or bool((logcnt == 0).any()):
        raise ValueError(f"expert placement must name every expert 0..{n_experts - 1} at least once "
                         f"(and nothing else); got replica counts {logcnt.tolist()}")
    log2phy = torch.full((n_experts, int(logcnt.max())), -1, dtype=torch.long)
    seen = torch.zeros(n_experts, dtype=torch.long)
    for p, e in enumerate(phy2log.tolist()):
        log2phy[e, seen[e]] = p
        seen[e] += 1
    return log2phy, logcnt


class ExpertParallelMoE(MoE):
    """Drop-in for a `MoE` (same attributes: gate, experts, shared_experts, impl, record_routing,
    last_routing) whose routed experts are sharded over `group`. Subclasses MoE so code that finds MoE
    layers with isinstance (load statistics, balance losses) keeps working; `experts` holds only the
    local slice."""

    def __init__(self, moe: MoE, group=None, phy2log: torch.Tensor | None = None, fp8_dispatch: bool = False):
        nn.Module.__init__(self)
        self.n_experts, self.topk = moe.n_experts, moe.topk
        self.gate = moe.gate
        self.shared_experts = moe.shared_experts
        self.impl = moe.impl
        self.record_routing = moe.record_routing
        self.last_routing = None
        self.group = group
        self.ep_size = dist.get_world_size(group) if dist.is_initialized() else 1
        self.ep_rank = dist.get_rank(group) if dist.is_initialized() else 0
        E = self.n_experts
        if phy2log is None:
            phy2log = torch.arange(E)
            self.log2phy = self.logcnt = None
        else:
            phy2log = torch.as_tensor(phy2log, dtype=torch.long).flatten()
            self.log2phy, self.logcnt = _placement_tables(phy2log, E)
        P = phy2log.numel()
        if P % self.ep_size:
            raise ValueError(f"expert parallelism: {P} {'physical ' if self.logcnt is not None else ''}experts "
                             f"do not divide over {self.ep_size} EP ranks")
        self.n_local = P // self.ep_size
        self.local_logical = phy2log[self.ep_rank * self.n_local:(self.ep_rank + 1) * self.n_local].clone()
        self.experts = LocalExperts.select(moe.experts, self.local_logical)
        self.fp8_dispatch = fp8_dispatch
        self.stats = A2AStats()
        self.collect_stats = True

    def physical(self, idx: torch.Tensor) -> torch.Tensor:
        """Logical expert ids (T, K) -> physical ids: identity without replicas; otherwise replica
        (token index mod replica count) of the logical expert, spreading its tokens evenly."""
        if self.logcnt is None:
            return idx
        t = torch.arange(idx.shape[0], device=idx.device)[:, None]
        rep = t % self.logcnt.to(idx.device)[idx]
        return self.log2phy.to(idx.device)[idx, rep]

    def routed(self, x, weights, idx):
        """x (T, D), gate weights (T, K), logical expert ids (T, K) -> routed output (T, D)."""
        T, K = idx.shape
        ep, nl = self.ep_size, self.n_local
        self.experts.impl = self.impl
        phys = self.physical(idx)
        dest, slot = phys // nl, phys % nl  # (T, K) destination rank and local slot there
        if ep == 1:
            return self.experts(x, slot.to(torch.int32), weights)
        # one copy of a token per destination rank; rows ordered by rank, then token
        hit = torch.zeros(T, ep, dtype=torch.bool, device=x.device).scatter_(1, dest, True)
        row_rank, row_tok = hit.t().nonzero(as_tuple=True)
        mine = dest[row_tok] == row_rank[:, None]  # (N, K): which top-k slots of the row go to that rank
        row_slot = torch.where(mine, slot[row_tok], -1)
        row_w = torch.where(mine, weights[row_tok], torch.zeros((), dtype=weights.dtype, device=x.device))
        t0 = time.perf_counter()
        send = hit.sum(0)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)  # counts first: the splits are uneven
        in_splits, out_splits = send.tolist(), recv.tolist()
        stats = self.stats if self.collect_stats else None
        xr, wr, sr = _Dispatch.apply(x, row_tok, row_w, row_slot, out_splits, in_splits, self.group,
                                     self.fp8_dispatch, stats, self.ep_rank)
        t1 = time.perf_counter()
        yr = self.experts(xr, sr, wr)  # (Nr, D) weighted sums over this rank's experts
        t2 = time.perf_counter()
        yb = _Combine.apply(yr, in_splits, out_splits, self.group, stats, self.ep_rank)
        if stats is not None:
            stats.tokens += T
            stats.calls += 1
            stats.dispatch_s += t1 - t0
            stats.combine_s += time.perf_counter() - t2
        return torch.zeros_like(x).index_add_(0, row_tok, yb.to(x.dtype))


# ----------------------------------------------------------------------------- applying it

def _moe_blocks(model: nn.Module):
    """(state-dict prefix of the block, block) for every Block whose ffn is a MoE: main layers first,
    then the MTP modules' blocks (the order EPLB's per-layer placements use)."""
    out = []
    for i, layer in enumerate(model.layers):
        if isinstance(layer.ffn, MoE):
            out.append((f"layers.{i}", layer))
    for k, m in enumerate(getattr(model, "mtp", [])):
        if isinstance(m.block.ffn, MoE):
            out.append((f"mtp.{k}.block", m.block))
    return out


def apply_expert_parallel(model: nn.Module, group=None, phy2log: torch.Tensor | None = None,
                          fp8_dispatch: bool = False) -> nn.Module:
    """Shards the routed experts of every MoE layer (main layers and MTP blocks) over `group` (None:
    the default group), in place. `phy2log` (n_moe_layers, P) or (P,): an EPLB placement with
    redundant experts (P physical experts, P % ep == 0; replicas are meant for inference: their
    gradients are not summed). Records `model.shard_plan[name] = ("experts", logical ids)` for the
    shard-only checkpoint loader (dsv3.parallel.tensor.load_sharded)."""
    blocks = _moe_blocks(model)
    if phy2log is not None:
        phy2log = torch.as_tensor(phy2log, dtype=torch.long)
        if phy2log.dim() == 1:
            phy2log = phy2log.expand(len(blocks), -1)
        if phy2log.shape[0] != len(blocks):
            raise ValueError(f"phy2log has {phy2log.shape[0]} rows but the model has {len(blocks)} MoE layers "
                             "(main layers then MTP blocks)")
    plan = getattr(model, "shard_plan", None) or {}
    for j, (prefix, block) in enumerate(blocks):
        if isinstance(block.ffn, ExpertParallelMoE):
            raise ValueError(f"{prefix}.ffn is already expert-parallel")
        ffn = ExpertParallelMoE(block.ffn, group, None if phy2log is None else phy2log[j], fp8_dispatch)
        block.ffn = ffn
        for n in ("w1", "w2", "w3"):
            plan[f"{prefix}.ffn.experts.{n}"] = ("experts", ffn.local_logical.tolist())
    model.shard_plan = plan
    return model


def global_expert_loads(local_counts: torch.Tensor, group=None) -> torch.Tensor:
    """Per-expert token counts of this rank's routing -> counts over the global batch: a SUM
    all-reduce over every rank that routed its own tokens (all data-parallel x expert-parallel ranks),
    so the aux-loss-free bias update (dsv3.train.balance.bias_update) sees the same loads, and keeps
    the same bias, everywhere."""
    out = local_counts.detach().clone()
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out
