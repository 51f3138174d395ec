"""Data parallelism for training, combinable with expert parallelism.

Every rank of the dense group (dp x ep ranks, see dsv3.parallel.dist) trains on its own slice of the
global batch; its loss is the mean over its slice, so the global loss is the mean over ranks. Then:
- non-expert parameters: gradient = mean over the dense group;
- expert parameters (only E/ep experts per rank, never replicated over the EP ranks): the gradient a
  rank holds is already the sum over the EP ranks' losses (their tokens all reached this shard);
  LocalExperts.grad_scale = 1/ep turns that into the mean, and the replicas of the same shard (the
  dp group) average it. Both kinds end up with the gradient of the global mean loss.

Two implementations of the same reduction:
- "fsdp": FSDP2 `fully_shard` (parameters, gradients and optimizer state sharded; runs on gloo/CPU in
  torch 2.13). Expert modules are sharded over the dp group, each Block / MTP module and then the
  root over the dense group; `hidden`, `logits` and `mtp_hidden` are registered as forward methods,
  so trainers that call them instead of forward() still unshard/reshard correctly.
- "replicate": full copies everywhere, gradients all-reduced in flat buckets after backward by
  `reduce_gradients()` (the plain DDP reduction, no overlap): the slow, transparent twin.
`clip_grad_norm_` computes the norm of the full (global) gradient in both cases.
"""
import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from dsv3.parallel.expert import LocalExperts

__all__ = ["DataParallel", "data_parallel", "expert_parameters", "full_state_dict"]


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, LocalExperts) for p in m.parameters()]


def _size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


class DataParallel:
    def __init__(self, model: nn.Module, dense_group, dp_group, ep_group, mode: str = "fsdp", mp_policy=None):
        if mode not in ("fsdp", "replicate"):
            raise ValueError(f"data-parallel mode must be 'fsdp' or 'replicate', got {mode!r}")
        self.model, self.mode = model, mode
        self.dense_group, self.dp_group, self.ep_group = dense_group, dp_group, ep_group
        self.ep = _size(ep_group)
        experts = expert_parameters(model)
        if experts and self.ep > 1:
            for m in model.modules():
                if isinstance(m, LocalExperts):
                    m.grad_scale = 1.0 / self.ep
        ids = {id(p) for p in experts}
        self.expert_params = experts
        self.dense_params = [p for p in model.parameters() if id(p) not in ids]
        if mode == "fsdp":
            self._shard(mp_policy)

    # ---- FSDP2 ----
    def _shard(self, mp_policy):
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        dev = "cuda" if next(self.model.parameters()).is_cuda else "cpu"
        kw = {"mp_policy": mp_policy or MixedPrecisionPolicy()}
        dense_mesh = DeviceMesh.from_group(self.dense_group, dev)
        ignored = None
        if _size(self.dp_group) > 1:
            dp_mesh = DeviceMesh.from_group(self.dp_group, dev)
            for m in self.model.modules():
                if isinstance(m, LocalExperts):
                    fully_shard(m, mesh=dp_mesh, **kw)
        elif self.expert_params:
            # no replicas of an expert shard (dp = 1): nothing to shard or reduce; the enclosing
            # blocks must not take them over (they would be averaged over the EP ranks)
            ignored = set(self.expert_params)
        blocks = list(self.model.layers) + list(getattr(self.model, "mtp", []))
        for b in blocks:
            fully_shard(b, mesh=dense_mesh, ignored_params=ignored, **kw)
        fully_shard(self.model, mesh=dense_mesh, ignored_params=ignored, **kw)
        for name in ("hidden", "logits", "mtp_hidden"):
            if hasattr(self.model, name):
                register_fsdp_forward_method(self.model, name)
        # the parameter objects are DTensors now
        ids = {id(p) for p in expert_parameters(self.model)}
        self.expert_params = [p for p in self.model.parameters() if id(p) in ids]
        self.dense_params = [p for p in self.model.parameters() if id(p) not in ids]

    # ---- replicated: bucketed all-reduce ----
    @torch.no_grad()
    def reduce_gradients(self):
        """Averages the gradients over their replica groups (replicate mode; FSDP2 already did it in
        backward). Every rank reduces every parameter, a missing gradient counting as zeros, so the
        buckets line up across ranks."""
        if self.mode == "fsdp":
            return
        for params, group in ((self.dense_params, self.dense_group), (self.expert_params, self.dp_group)):
            n = _size(group)
            if n == 1 or not params:
                continue
            by_dtype: dict = {}
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                by_dtype.setdefault(p.grad.dtype, []).append(p)
            for ps in by_dtype.values():
                grads = [p.grad for p in ps]
                flat = _flatten_dense_tensors(grads)
                dist.all_reduce(flat, group=group)
                flat /= n
                for g, r in zip(grads, _unflatten_dense_tensors(flat, grads)):
                    g.copy_(r)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ on the global gradient: coef = max_norm / (norm + 1e-6),
        clamped to 1. Returns the global norm."""
        def sq(ps):
            t = torch.zeros((), dtype=torch.float64)
            for p in ps:
                if p.grad is not None:
                    g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                    t += g.double().pow(2).sum().cpu()
            return t
        if self.mode == "fsdp":
            # shards are disjoint over the dense group (experts: over dp, and distinct over ep)
            total = sq(self.dense_params) + sq(self.expert_params)
            if _size(self.dense_group) > 1:
                dist.all_reduce(total, group=self.dense_group)
        else:
            # dense gradients are identical everywhere; expert shards differ over ep only
            ex = sq(self.expert_params)
            if self.ep > 1:
                dist.all_reduce(ex, group=self.ep_group)
            total = sq(self.dense_params) + ex
        norm = total.sqrt().float()
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in self.dense_params + self.expert_params:
            if p.grad is not None:
                p.grad.mul_(coef.item())
        return norm


def data_parallel(model: nn.Module, ctx, mode: str = "fsdp", mp_policy=None) -> DataParallel:
    """Data parallelism over ctx's groups (a dsv3.parallel.dist.ParallelContext)."""
    return DataParallel(model, ctx.group("dense"), ctx.group("dp"), ctx.group("ep"), mode, mp_policy)


def gather_expert_stack(t: torch.Tensor, group) -> torch.Tensor:
    """This EP rank's slice (dim 0) of an expert stack (or of its optimizer moments) -> all experts:
    rank r holds experts [r E/ep, (r+1) E/ep). Collective over `group`."""
    parts = [torch.empty_like(t) for _ in range(_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=0)


@torch.no_grad()
def full_state_dict(model: nn.Module, ep_group=None) -> dict[str, torch.Tensor]:
    """The single-device state dict (dsv3 names, all experts stacked in order) of a model split by
    FSDP2 and/or expert parallelism: DTensors are gathered (full_tensor), each expert stack is
    all-gathered over the EP ranks (rank r holds experts [r E/ep, (r+1) E/ep)). Collective: every rank
    calls it and gets the same dict; load it into a plain Transformer to save_model() it."""
    from dsv3.parallel.expert import ExpertParallelMoE

    stacked = {}
    for name, m in model.named_modules():
        if isinstance(m, ExpertParallelMoE):
            if m.logcnt is not None:
                raise ValueError(f"{name}: a placement with redundant experts has no single-device state dict")
            for w in ("w1", "w2", "w3"):
                stacked[f"{name}.experts.{w}"] = m.group
    out = {}
    for name, t in model.state_dict().items():
        t = t.full_tensor() if hasattr(t, "full_tensor") else t.detach()
        if name in stacked and _size(stacked[name]) > 1:
            t = gather_expert_stack(t, stacked[name])
        out[name] = t.clone()
    return out
