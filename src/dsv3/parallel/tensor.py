"""Tensor parallelism for inference, as in DeepSeek's reference inference code (its ParallelEmbedding,
ColumnParallelLinear, RowParallelLinear), applied from outside to the single-device model.

What is split over the `tp` ranks of the group:
- MLA: heads. wq (or wq_b) and wkv_b are column-parallel (their outputs are laid out head-major,
  (H, head_dim), so a contiguous block of rows is a block of heads); wo is row-parallel (its input
  is the concatenation of the heads' values) and all-reduces. wq_a, wkv_a and the two norms are
  replicated (the latent is shared by all heads, so every rank keeps the full latent cache, as in
  the reference).
- Dense MLP and shared experts: w1/w3 column-parallel, w2 row-parallel (intermediate dim split).
- Routed experts: split across ranks (E/tp whole experts per rank), the reference's choice: no
  expert is cut, each rank runs the tokens that chose its experts, and one all-reduce per MoE layer
  sums the routed partials together with the shared experts' partial (its w2 does not reduce on its
  own). The gate is replicated. Splitting each expert's intermediate dim instead would balance the
  work perfectly but turn every expert GEMM into tp thin ones; with many experts per rank the
  routing spreads the load anyway.
- Embedding: vocabulary-parallel (rows [r V/tp, (r+1) V/tp)); out-of-range ids give zeros and an
  all-reduce sums the one rank that has the row. Head: vocabulary-parallel columns of the logits,
  all-gathered so every rank returns the full (.., V) logits (sampling stays identical on all ranks
  given the same seed).
All-reduces use torch.distributed directly, outside autograd: TP here is for inference, and
`apply_tensor_parallel` freezes the parameters to say so.

Loading: `load_parallel_model(path, tp_group=..., ep_group=...)` builds the model on the meta device,
applies TP/EP (recording in `model.shard_plan` which part of each checkpoint tensor the rank needs)
and reads only those parts with safetensors `get_slice` (FP8 tensors: only the 128x128 blocks that
cover the slice, dequantized with their `weight_scale_inv` blocks). No rank reads the whole model.
"""
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from dsv3.checkpoint import hf_to_dsv3
from dsv3.config import ModelConfig
from dsv3.fp8.quant import weight_dequant
from dsv3.model.mla import MLA
from dsv3.model.moe import MLP, MoE
from dsv3.model.transformer import Transformer
from dsv3.parallel.expert import LocalExperts, apply_expert_parallel

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "VocabParallelHead",
           "TensorParallelMoE", "apply_tensor_parallel", "load_sharded", "load_parallel_model"]


def _world(group) -> tuple[int, int]:
    if not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _split(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ValueError(f"tensor parallelism: {what} = {n} is not divisible by tp = {tp}")
    return n // tp


class ColumnParallelLinear(nn.Module):
    """y[..., this rank's output block] = x W_r^T; W_r = rows [start, start + out/tp) of W."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x):
        return F.linear(x, self.weight)


class RowParallelLinear(nn.Module):
    """x holds this rank's block of the input features; W_r = columns of W. The partial products are
    summed over the group (all-reduce) unless reduce=False (the caller reduces a larger sum once)."""

    def __init__(self, weight: torch.Tensor, group, reduce: bool = True):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.group, self.reduce = group, reduce

    def forward(self, x):
        y = F.linear(x, self.weight)
        if self.reduce and _world(self.group)[0] > 1:
            dist.all_reduce(y, group=self.group)
        return y


class VocabParallelEmbedding(nn.Module):
    def __init__(self, weight: torch.Tensor, start: int, group):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start, self.group = start, group

    def forward(self, tokens):
        local = tokens - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        y = F.embedding(local.masked_fill(outside, 0), self.weight)
        y = y.masked_fill(outside[..., None], 0)
        if _world(self.group)[0] > 1:
            dist.all_reduce(y, group=self.group)
        return y


class VocabParallelHead(nn.Module):
    """Logits for this rank's vocabulary block, all-gathered into (..., V)."""

    def __init__(self, weight: torch.Tensor, group):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.group = group

    def forward(self, h):
        y = F.linear(h, self.weight)
        tp = _world(self.group)[0]
        if tp == 1:
            return y
        parts = [torch.empty_like(y) for _ in range(tp)]
        dist.all_gather(parts, y.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


class TensorParallelMoE(MoE):
    """MoE with E/tp whole routed experts per rank, the shared experts' intermediate dim split, and one
    all-reduce of the sum. Subclasses MoE so isinstance-based load statistics keep working."""

    def __init__(self, moe: MoE, group):
        nn.Module.__init__(self)
        self.n_experts, self.topk = moe.n_experts, moe.topk
        self.gate, self.shared_experts = moe.gate, moe.shared_experts
        self.impl = moe.impl
        self.record_routing, self.last_routing = moe.record_routing, None
        self.group = group
        tp, r = _world(group)
        self.n_local = _split(self.n_experts, tp, "n_routed_experts")
        self.start = r * self.n_local
        self.local_logical = torch.arange(self.start, self.start + self.n_local)
        self.experts = LocalExperts.select(moe.experts, self.local_logical)
        self.experts.requires_grad_(False)

    def routed(self, x, weights, idx):
        # this rank's experts only; the other ranks' contributions arrive in forward's all-reduce
        here = (idx >= self.start) & (idx < self.start + self.n_local)
        slot = torch.where(here, idx - self.start, -1).to(torch.int32)
        self.experts.impl = self.impl
        return self.experts(x, slot, weights)

    def forward(self, x):
        y = super().forward(x)  # local routed experts + this rank's partial shared expert
        if _world(self.group)[0] > 1:
            dist.all_reduce(y, group=self.group)
        return y


# ----------------------------------------------------------------------------- applying TP

def _column(lin: nn.Linear, tp, r, plan, name) -> ColumnParallelLinear:
    n = _split(lin.weight.shape[0], tp, f"{name} output features")
    plan[name] = (0, r * n, n)
    return ColumnParallelLinear(lin.weight.detach().narrow(0, r * n, n).clone())


def _row(lin: nn.Linear, tp, r, plan, name, group, reduce=True) -> RowParallelLinear:
    n = _split(lin.weight.shape[1], tp, f"{name} input features")
    plan[name] = (1, r * n, n)
    return RowParallelLinear(lin.weight.detach().narrow(1, r * n, n).clone(), group, reduce)


def _mlp(mlp: MLP, tp, r, plan, prefix, group, reduce=True):
    mlp.w1 = _column(mlp.w1, tp, r, plan, f"{prefix}.w1.weight")
    mlp.w3 = _column(mlp.w3, tp, r, plan, f"{prefix}.w3.weight")
    mlp.w2 = _row(mlp.w2, tp, r, plan, f"{prefix}.w2.weight", group, reduce)


def _block(block, tp, r, plan, prefix, group):
    attn: MLA = block.attn
    attn.n_heads = _split(attn.n_heads, tp, "num_attention_heads")
    if attn.q_lora_rank is None:
        attn.wq = _column(attn.wq, tp, r, plan, f"{prefix}.attn.wq.weight")
    else:
        attn.wq_b = _column(attn.wq_b, tp, r, plan, f"{prefix}.attn.wq_b.weight")
    attn.wkv_b = _column(attn.wkv_b, tp, r, plan, f"{prefix}.attn.wkv_b.weight")
    attn.wo = _row(attn.wo, tp, r, plan, f"{prefix}.attn.wo.weight", group)
    if isinstance(block.ffn, MoE):
        moe = TensorParallelMoE(block.ffn, group)
        if moe.shared_experts is not None:
            _mlp(moe.shared_experts, tp, r, plan, f"{prefix}.ffn.shared_experts", group, reduce=False)
        for w in ("w1", "w2", "w3"):
            plan[f"{prefix}.ffn.experts.{w}"] = ("experts", moe.local_logical.tolist())
        block.ffn = moe
    else:
        _mlp(block.ffn, tp, r, plan, f"{prefix}.ffn", group)


def apply_tensor_parallel(model: Transformer, group=None) -> Transformer:
    """Splits the model over the ranks of `group` in place (works on a meta-device model, then only the
    shards are materialised by load_sharded). Freezes every parameter: TP is for inference."""
    tp, r = _world(group)
    cfg = model.config
    plan = getattr(model, "shard_plan", None) or {}
    V = _split(cfg.vocab_size, tp, "vocab_size")
    plan["embed.weight"] = (0, r * V, V)
    model.embed = VocabParallelEmbedding(model.embed.weight.detach().narrow(0, r * V, V).clone(), r * V, group)
    if cfg.tie_word_embeddings:
        model.head = VocabParallelHead(model.embed.weight, group)
    else:
        plan["head.weight"] = (0, r * V, V)
        model.head = VocabParallelHead(model.head.weight.detach().narrow(0, r * V, V).clone(), group)
    for i, layer in enumerate(model.layers):
        _block(layer, tp, r, plan, f"layers.{i}", group)
    for k, m in enumerate(model.mtp):
        _block(m.block, tp, r, plan, f"mtp.{k}.block", group)
    model.shard_plan = plan
    model.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------- shard-only loading

def _weight_map(path: str) -> dict[str, str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            try:
                wm = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        return {k: os.path.join(path, v) for k, v in wm.items()}
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"no .safetensors files in {path}")
    out = {}
    for f in files:  # headers only
        with safe_open(os.path.join(path, f), framework="pt") as h:
            out.update(dict.fromkeys(h.keys(), os.path.join(path, f)))
    return out


class _Reader:
    """Reads checkpoint tensors or slices of them; FP8 weights are dequantized block by block."""

    BLOCK = 128

    def __init__(self, files: dict[str, str]):
        self.files, self.handles = files, {}
        self.bytes_read = 0

    def _slice(self, name):
        file = self.files[name]
        if file not in self.handles:
            try:
                self.handles[file] = safe_open(file, framework="pt")
            except Exception as e:
                raise ValueError(f"cannot read {file}: {e}") from None
        return self.handles[file].get_slice(name)

    def _read(self, name, dim, start, stop):
        sl = self._slice(name)
        t = sl[start:stop] if dim == 0 else sl[:, start:stop]
        self.bytes_read += t.numel() * t.element_size()
        return t

    def read(self, name: str, spec=None) -> torch.Tensor:
        """spec None: the whole tensor; (dim, start, size): that slice of it (in fp32 if it was FP8)."""
        sl = self._slice(name)
        shape = sl.get_shape()
        if spec is None:
            dim, start, size = 0, 0, shape[0] if shape else 0
        else:
            dim, start, size = spec
        if not shape:  # a scalar
            t = self._slice(name)[:]
            self.bytes_read += t.numel() * t.element_size()
            return t
        if start + size > shape[dim]:
            raise ValueError(f"checkpoint tensor {name} has shape {tuple(shape)}: cannot take [{start}, "
                             f"{start + size}) along dim {dim}; does config.json match the weights?")
        if sl.get_dtype() != "F8_E4M3":
            return self._read(name, dim, start, start + size)
        sname = name + "_scale_inv"
        if sname not in self.files:
            raise ValueError(f"FP8 tensor {name!r} has no {sname!r} in the checkpoint")
        b = self.BLOCK
        b0, b1 = start // b, -(-(start + size) // b)  # the blocks covering the slice
        w = self._read(name, dim, b0 * b, min(b1 * b, shape[dim]))
        s = self._read(sname, dim, b0, b1)
        full = weight_dequant(w, s, block=b, dtype=torch.float32)
        return full.narrow(dim, start - b0 * b, size)

    def close(self):
        self.handles.clear()


def _targets(files: dict[str, str], cfg: ModelConfig, unexpected: list[str]):
    """The checkpoint's tensors a shard-only loader may read, in name order: (HF name, dsv3 name,
    expert index or None). Scales are skipped (the reader dequantizes with them), so are the MTP
    copies of the embedding / head (the main ones are used); names outside the mapping table go to
    `unexpected`."""
    for name in sorted(files):
        if name.endswith("_scale_inv"):
            continue
        target = hf_to_dsv3(name, cfg)
        if target is None:
            unexpected.append(name)
            continue
        ds, e = target
        if ds != "shared":
            yield name, ds, e


def _check_unexpected(path, unexpected: list[str]) -> None:
    if unexpected:
        raise ValueError(f"unexpected tensors in {path}: {', '.join(unexpected[:5])}"
                         + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))


def load_sharded(path, model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """State dict for a (meta-device) model that was split by apply_tensor_parallel and/or
    apply_expert_parallel: reads only the slices named by model.shard_plan and the experts this rank
    holds; everything else in full. Checks names and shapes like dsv3.load_model."""
    path = os.fspath(path)
    cfg: ModelConfig = model.config
    plan = getattr(model, "shard_plan", {})
    expected = model.state_dict()
    files = _weight_map(path)
    reader = _Reader(files)
    out: dict[str, torch.Tensor] = {}
    expert_slots: dict[str, dict[int, list[int]]] = {}
    for ds, spec in plan.items():
        if spec[0] == "experts":
            slots: dict[int, list[int]] = {}
            for j, e in enumerate(spec[1]):
                slots.setdefault(e, []).append(j)
            expert_slots[ds] = slots
    filled: dict[str, set] = {}
    unexpected = []
    for name, ds, e in _targets(files, cfg, unexpected):
        if ds not in expected:
            unexpected.append(name)
            continue
        ref = expected[ds]
        tdtype = torch.float32 if ds.endswith("gate.bias") else dtype
        if e is not None:
            slots = expert_slots.get(ds, {j: [j] for j in range(ref.shape[0])})
            if e not in slots:
                continue  # another rank's expert: never read
            t = reader.read(name)
            if tuple(t.shape) != tuple(ref.shape[1:]):
                raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(t.shape)}, model "
                                 f"{tuple(ref.shape[1:])} (dsv3 {ds})")
            if ds not in out:
                out[ds] = torch.empty(ref.shape, dtype=tdtype)
            for j in slots[e]:
                out[ds][j].copy_(t)
                filled.setdefault(ds, set()).add(j)
            continue
        spec = plan.get(ds)
        t = reader.read(name, None if spec is None else spec)
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"shape mismatch for {name}: checkpoint slice {tuple(t.shape)}, model "
                             f"{tuple(ref.shape)} (dsv3 {ds}); does config.json match the weights?")
        out[ds] = t.to(tdtype)
    if cfg.tie_word_embeddings and "head.weight" in expected and "embed.weight" in out:
        out["head.weight"] = out["embed.weight"]
    model.bytes_read = reader.bytes_read
    reader.close()
    _check_unexpected(path, unexpected)
    missing = [k for k in expected if k not in out]
    for ds, got in filled.items():
        if len(got) != expected[ds].shape[0]:
            missing.append(f"{ds} slots {sorted(set(range(expected[ds].shape[0])) - got)[:8]}")
    if missing:
        raise ValueError(f"missing tensors in {path}: {', '.join(missing[:8])}")
    return out


def load_parallel_model(path, tp_group=None, ep_group=None, dtype: torch.dtype = torch.bfloat16, device="cpu",
                        fp8_dispatch: bool = False, phy2log: torch.Tensor | None = None) -> Transformer:
    """Each rank builds the model on the meta device, splits it (tp_group: apply_tensor_parallel;
    ep_group: apply_expert_parallel, optionally with an EPLB placement `phy2log` (n_moe_layers, P)
    whose redundant replicas are read from the same checkpoint experts) and reads only its shard of
    the HF checkpoint folder."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a checkpoint folder")
    if tp_group is not None and ep_group is not None:
        raise ValueError("tensor and expert parallelism together are not supported")
    cfg = ModelConfig.from_hf(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    if tp_group is not None:
        apply_tensor_parallel(model, tp_group)
    if ep_group is not None:
        apply_expert_parallel(model, ep_group, phy2log=phy2log, fp8_dispatch=fp8_dispatch)
        model.requires_grad_(False)
    sd = load_sharded(path, model, dtype)
    bytes_read = model.bytes_read
    model.load_state_dict(sd, assign=True, strict=True)
    if cfg.tie_word_embeddings:
        model.head.weight = model.embed.weight
    model.rotary.reset()
    model = model.to(device).eval()
    model.bytes_read = bytes_read
    return model
