"""Pipeline-parallel pre-training: `dsv3 train --pp N [--pp-schedule 1f1b|dualpipe|dualpipev]`.

  torchrun --nproc-per-node 2 -m dsv3 train --data FILE --out DIR --pp 2 --pp-schedule dualpipev
  torchrun --nproc-per-node 4 -m dsv3 train --data FILE --out DIR --pp 2 --dp 2 --micro-batch-size 2
  torchrun --nproc-per-node 4 -m dsv3 train --data FILE --out DIR --pp 2 --ep 2 --pp-schedule dualpipev

The recipe is the one of dsv3.train.trainer (CE + lambda * MTP loss, aux-free bias updates on the
loads of the whole step, sequence-wise balance loss, global-norm clipping, AdamW, the LR and
batch-size schedules); `PipelineTrainer` subclasses `Trainer` and only replaces what the pipeline
changes: where the model lives, the step, the evaluation and the checkpoint state.

Where things live (paper §3.2.1: "we deploy the shallowest layers (including the embedding layer)
and deepest layers (including the output head) of the model on the same PP rank"):
- every rank builds the full model from the seed (so the weights are exactly a single-process
  run's), cuts it into stages and drops the modules its stages do not use;
- first stage: embedding + first layers; last stage: last layers + final norm + head + the MTP
  modules and their loss. MTP needs the main model's final hidden state and the shared head, which
  are there, and the shared embedding (Emb(t_{i+k}), §2.2), which lives on the first stage;
- the layers are split as evenly as possible counting each MTP module as one more layer of the
  last stage (`train_stage_layers`).

Parameters held by several ranks are kept identical by summing their gradients over the holders
before the optimizer step (`_reduce_gradients`); every holder then takes the same AdamW step on the
same gradient, so the copies stay bit-identical (checked at every checkpoint: `full_master` refuses
diverged copies). This covers:
- the embedding under MTP: held by the first and the last stage (1F1B, DualPipe). Its gradient is
  the sum of the input-embedding part (first stage) and the MTP part (last stage), as in a
  single-process model where both uses share one tensor (Megatron ties its input embedding and
  output head the same way). DualPipeV places the first and last stage on rank 0: one tensor;
- DualPipe's two copies of every stage (rank r and rank PP-1-r), whose gradients the Pipeline would
  otherwise exchange itself (it runs with sync_mirrors=False here).

Losses. The balance loss of each MoE layer is computed on the stage that owns the layer, right after
its forward, and attached to the stage output with an identity whose backward feeds the loss weight
of the micro-batch into the balance term (`_AttachLoss`, the AddAuxiliaryLoss trick of DeepSeek-V2's
released modelling code), so no extra tensor travels between stages. The last stage's loss is
CE + lambda * MTP (+ the balance terms of the MTP blocks). The reported loss, CE, MTP and balance
values are gathered from the stages that computed them and combined in the trainer's order.

Expert loads of the step are counted on each stage for its layers, summed over the pipeline (each
(stage, micro-batch) forward runs on exactly one rank) and over the data-parallel replicas, then
every holder of a layer updates its bias with the same global loads.

Expert parallelism (--ep M; the paper trains with 16-way PP, 64-way EP spanning 8 nodes and DP,
§3.2). The world is pp x dp x ep ranks in dsv3.parallel.dist's layout; the ranks of one pipeline
stage form its dense
group (dp x ep ranks, each with its own slice of the global batch) and, inside it, EP groups that
share the stage's routed experts (dsv3.parallel.expert: expert e of a layer lives on EP rank
e // (E / ep), tokens travel with all_to_all_single). Every rank of an EP group holds the same
stages, and the schedule of a pipeline rank depends only on (schedule, pp, pipeline rank,
micro-batches), so the EP ranks of a stage run the same forwards, backwards and W ops in the same
order, micro-batch after micro-batch, and their all-to-alls pair up, DualPipe's and DualPipeV's two
interleaved directions included (both chunks of a rank are expert-parallel over the same group;
a W op re-walks the graph through the dispatch/combine and so runs their backward all-to-alls,
on every EP rank of the stage at the same point of the schedule). Point-to-point messages go to the
same (dp, ep) coordinates of the neighbouring stage. Gradients: a local expert's gradient is that of
the sum of its EP group's losses, scaled by 1/ep (LocalExperts.grad_scale) into their mean, then
averaged over the dp ranks holding the same shard; every other parameter is averaged over the
stage's dense group; both as dsv3.parallel.data does without the pipeline. The step's expert loads
are summed over the pipeline and the dense group. Checkpoints gather each expert stack over its EP
group first (weights and AdamW moments), so the folder and the optimizer state are still the
single-process ones, and a resume re-slices them for any ep.

Precision (--dtype bf16): as dsv3.train.trainer: the stages run a bf16 copy of the model (bf16
activations and gradients travel between stages), the weight gradients of every (chunk,
micro-batch) are added in fp32 into the fp32 master weights, which the optimizer updates and which
are rounded into the bf16 copy after each step; the router bias is one fp32 buffer for both.

Checkpoints: ONE HF folder, as a single process writes it. Rank 0 gathers the stage weights
(`full_master`) and the optimizer state, which it writes in the single-process layout (AdamW state
indexed as `build_optimizer` on the full model indexes it), so `--resume` works under any layout:
the same pipeline, another schedule, or one process.

Not supported (refused with a ValueError before any work): --tp with --pp, FSDP (--dp-mode
fsdp) with --pp (the stages' backward runs through torch.autograd.grad, which FSDP2's hooks do not
follow; the dp replicas hold full copies of their stage and all-reduce gradients), --compile,
--fp8, tied embeddings.
"""
from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from dsv3.config import ModelConfig
from dsv3.model.moe import MoE
from dsv3.model.transformer import Transformer
from dsv3.parallel.data import full_state_dict, gather_expert_stack
from dsv3.parallel.expert import LocalExperts, apply_expert_parallel
from dsv3.parallel.pipeline import Pipeline, local_chunks, stage_layers
from dsv3.parallel.schedules import KINDS, Layout
from dsv3.train.balance import count_loads, expert_aux_loss, max_violation, sequence_balance_loss
from dsv3.train.optim import batch_size_at, build_lr_scheduler, build_optimizer
from dsv3.train.trainer import DTYPES, TrainConfig, Trainer, lm_loss, moe_layers

__all__ = ["PipelineTrainer", "TrainStage", "add_pipeline_arguments", "check_pipeline_options",
           "pipeline_micro_batch", "train_stage_layers"]


def add_pipeline_arguments(p) -> None:
    g = p.add_argument_group("pipeline parallelism (with --pp N under torchrun; docs/pipeline.md)")
    g.add_argument("--pp-schedule", choices=KINDS, default=None,
                   help="pipeline schedule (default 1f1b): 1f1b, dualpipe (PP even, held twice), dualpipev "
                        "(2 PP stages in a V); dualpipe/dualpipev need >= 2 PP micro-batches per step")


# ----------------------------------------------------------------------------- validation

def train_stage_layers(num_layers: int, mtp_depth: int, n_stages: int) -> list[range]:
    """Contiguous layer ranges per stage. The last stage also runs the MTP modules (a full block
    each, plus the head again), so each counts as one layer there: the num_layers + mtp_depth units
    are split as evenly as possible, the last stage gives its MTP units back, and the remaining
    layers are spread evenly over the other stages."""
    units = num_layers + mtp_depth
    if n_stages < 2 or units < n_stages:
        raise ValueError(f"cannot split {num_layers} layers (+ {mtp_depth} MTP module(s) on the last stage) into "
                         f"{n_stages} pipeline stages: use fewer stages (--pp, or 1f1b/dualpipe instead of "
                         f"dualpipev, which has 2 stages per rank) or a deeper model")
    share = units // n_stages  # the last stage's share (earlier stages take the remainder)
    last = max(0, share - mtp_depth)
    rest = num_layers - last
    if rest < n_stages - 1:
        raise ValueError(f"cannot split {num_layers} layers into {n_stages} pipeline stages with at least one layer "
                         f"before the last stage")
    base, extra = divmod(rest, n_stages - 1)
    return stage_layers(num_layers, n_stages, [base + (i < extra) for i in range(n_stages - 1)] + [last])


def pipeline_micro_batch(cfg: TrainConfig, kind: str, pp: int, dp: int) -> int:
    """Sequences per micro-batch. Every micro-batch of a pipeline has one shape (receives are posted
    before the data exists), so the batch sizes must split into whole micro-batches on every
    data-parallel rank, in numbers the schedule accepts. Default: the smallest batch of the run
    (the ramp's start) in 2 * PP micro-batches per data-parallel rank. `dp`: the ranks with
    distinct data in one stage (dp x ep: expert parallelism borrows its ranks from data parallelism)."""
    start = cfg.batch_size_start or cfg.batch_size
    if cfg.micro_batch_size is not None:
        mb = cfg.micro_batch_size
    else:
        mb = start // (dp * 2 * pp)
        if mb < 1 or start % (dp * 2 * pp):
            raise ValueError(f"--pp {pp}: the batch size {start} does not split into {2 * pp} equal micro-batches per "
                             f"data-parallel rank (dp={dp}); pass --micro-batch-size")
    unit = mb * dp * (2 if kind == "dualpipe" else 1)
    for name, b in (("--batch-size", cfg.batch_size), ("--batch-size-start", start)):
        if b % unit:
            pair = " x 2 (dualpipe: an even number of micro-batches)" if kind == "dualpipe" else ""
            raise ValueError(f"--pp {pp} --pp-schedule {kind}: {name} {b} must be a multiple of {unit} "
                             f"(micro-batch {mb} x dp {dp}{pair})")
        m = b // (mb * dp)
        try:
            Layout(kind, pp, m)
        except ValueError as e:
            raise ValueError(f"--pp {pp} --pp-schedule {kind}, {name} {b}, micro-batch {mb}, dp {dp}: {m} "
                             f"micro-batches per step, but {e} (use a smaller --micro-batch-size or a larger "
                             f"batch)") from None
    return mb


def _check_recipe(pp: int, ep: int, tp: int, dp_mode: str | None, tcfg: TrainConfig, model_cfg: ModelConfig,
                  fp8: bool) -> None:
    if tp != 1:
        raise ValueError("--tp: tensor parallelism is for inference only (the paper trains without TP); use --pp "
                         "with --dp for dsv3 train")
    has_moe = any(model_cfg.is_moe_layer(i) for i in range(model_cfg.num_hidden_layers))
    if ep != 1 and has_moe and model_cfg.n_routed_experts % ep:
        raise ValueError(f"--ep {ep}: the model's {model_cfg.n_routed_experts} routed experts do not divide over "
                         f"{ep} expert-parallel ranks")
    if dp_mode == "fsdp":
        raise ValueError("--dp-mode fsdp with --pp is not supported: the pipeline's backward runs through "
                         "torch.autograd.grad, which FSDP2's gradient hooks do not follow; under --pp the "
                         "data-parallel replicas hold full copies of their stage (--dp-mode replicate, the default "
                         "there)")
    if tcfg.compile:
        raise ValueError("--compile with --pp is not supported yet")
    if fp8:
        raise ValueError("--fp8 with --pp is not supported yet")
    if model_cfg.tie_word_embeddings:
        raise ValueError("--pp: tie_word_embeddings is not supported (the embedding and the head live on different "
                         "stages)")


def check_pipeline_options(args, tcfg: TrainConfig, model_cfg: ModelConfig, fp8: bool = False) -> None:
    """Everything about --pp that can be checked before any work (and before torch.distributed is
    initialised); raises ValueError. Under pp == 1 only a stray --pp-schedule is refused."""
    pp, kind = args.pp, getattr(args, "pp_schedule", None)
    if not isinstance(pp, int) or pp < 1:
        raise ValueError(f"--pp must be a positive integer, got {pp!r}")
    if pp == 1:
        if kind is not None:
            raise ValueError(f"--pp-schedule {kind} needs --pp > 1 (pipeline stages under torchrun)")
        return
    kind = kind or "1f1b"
    ep = args.ep
    if not isinstance(ep, int) or ep < 1:  # before _check_recipe, which divides by it
        raise ValueError(f"--ep must be a positive integer, got {ep!r}")
    _check_recipe(pp, ep, args.tp, args.dp_mode, tcfg, model_cfg, fp8)
    try:
        n_stages = Layout(kind, pp, 2 * pp).n_stages
    except ValueError as e:
        raise ValueError(f"--pp {pp} --pp-schedule {kind}: {e}") from None
    train_stage_layers(model_cfg.num_hidden_layers, model_cfg.num_nextn_predict_layers, n_stages)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp = args.dp if args.dp is not None else max(1, world // (pp * ep))
    if dp < 1:
        raise ValueError(f"--dp must be a positive integer, got {dp}")
    pipeline_micro_batch(tcfg, kind, pp, dp * ep)
    if world == 1:
        ep_flag = f" --ep {ep}" if ep > 1 else ""
        raise ValueError(f"--pp {pp} runs one pipeline stage per process: launch it under torchrun with dp x ep x pp "
                         f"processes, e.g. torchrun --nproc-per-node {dp * ep * pp} -m dsv3 train ... --pp {pp}{ep_flag}")


# ----------------------------------------------------------------------------- stages

@dataclass
class _StepSettings:
    """What every stage of this rank needs to know about the current step (set by the trainer)."""
    seq_len: int
    balance: str
    seq_alpha: float
    aux_alpha: float
    lam: float = 0.0     # MTP loss weight at this step
    scale: float = 1.0   # loss weight of one micro-batch (1 / micro-batches)


class _AttachLoss(torch.autograd.Function):
    """Identity on a stage's output h whose backward also hands `scale` to the scalar `aux`: the
    balance loss of the stage's MoE layers is back-propagated as if it had been added to the
    micro-batch loss (weight `scale`) on the last stage, without sending it there."""

    @staticmethod
    def forward(ctx, h, aux, scale: float):
        ctx.scale = scale
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full((), ctx.scale, dtype=torch.float32, device=grad.device), None


def _balance(moes, B: int, st: _StepSettings, losses: bool):
    """The balance loss terms and expert loads of `moes` [(row, MoE)] for their last forward, as
    dsv3.train.trainer.compute_losses computes them (same terms, same order)."""
    bal = None
    vals, counts = [], []
    for _, moe in moes:
        assert moe.last_routing is not None, "record_routing must be on for every MoE layer"
        s, idx = moe.last_routing
        moe.last_routing = None  # drop the graph reference as soon as it is used
        E, K = moe.n_experts, moe.topk
        counts.append(count_loads(idx, E))
        term = None
        if losses and st.balance == "aux-free" and st.seq_alpha > 0:
            # Eq. 18 counts Top-K_r of the raw affinities s (no bias), per sequence.
            s3 = s.view(B, -1, E)
            term = sequence_balance_loss(s3, s3.detach().topk(K, dim=-1).indices, E, K, st.seq_alpha)
        elif losses and st.balance == "aux-loss" and st.aux_alpha > 0:
            term = expert_aux_loss(s, idx, E, K, st.aux_alpha)
        if term is not None:
            bal = term if bal is None else bal + term
        vals.append(None if term is None else term.detach())
    return bal, vals, counts


class TrainStage(nn.Module):
    """One pipeline stage of a dsv3 Transformer for training, built from the model's own submodules
    (shared, not copied). Input: tokens (B, S) on the first stage, hidden (B, S, D) elsewhere.
    Output: hidden (B, S, D); on the last stage after the final norm (the head's input and the h^0
    MTP starts from), turned into the loss by `loss`. `records` / `loss_records` keep, per forward,
    the balance terms and expert loads of the stage's MoE layers for the step's statistics."""

    def __init__(self, model: Transformer, index: int, n_stages: int, layers: range, moe_names: list[str],
                 settings: _StepSettings):
        super().__init__()
        self.index = index
        self.first, self.last = index == 0, index == n_stages - 1
        self.layer_ids = layers
        depth = len(model.mtp)
        self.embed = model.embed if self.first else None
        self.layers = nn.ModuleList(model.layers[i] for i in layers)
        self.norm = model.norm if self.last else None
        self.head = model.head if self.last else None
        self.mtp = model.mtp if self.last else None
        # MTP module k embeds t_{i+k} with the main model's (shared) embedding (paper §2.2)
        self.mtp_embed = model.embed if self.last and depth and not self.first else None
        # the model's own methods (bound: no parameters registered twice), so a stage computes
        # exactly what Transformer.hidden / logits / mtp_hidden compute
        self._prepare, self._logits, self._mtp_hidden = model._prepare, model.logits, model.mtp_hidden
        # the single-process step's loss function (fused head + CE), so both compute the same numbers
        self._lm_loss = functools.partial(lm_loss, model)
        row = {name: i for i, name in enumerate(moe_names)}
        self.moes = [(row[f"layers.{i}"], model.layers[i].ffn) for i in layers if isinstance(model.layers[i].ffn, MoE)]
        self.mtp_moes = [(row[f"mtp.{k}"], m.block.ffn) for k, m in enumerate(model.mtp)
                         if self.last and isinstance(m.block.ffn, MoE)]
        self.depth = depth
        self.vocab = model.config.vocab_size
        self.settings = settings
        self.records: list = []        # per forward, in micro-batch order: (balance terms, loads)
        self.loss_records: dict = {}   # micro-batch -> (ce, mtp, MTP blocks' balance terms, loads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) if self.first else x  # (B, S, D)
        if len(self.layers):
            positions, mask, cos, sin = self._prepare(x if self.first else h[..., 0], None, None)
            for layer in self.layers:
                h = layer(h, cos, sin, positions, mask, None)
        if self.last:
            h = self.norm(h)
        bal, vals, counts = _balance(self.moes, h.shape[0], self.settings, torch.is_grad_enabled())
        self.records.append((vals, counts))
        if bal is not None:
            h = _AttachLoss.apply(h, bal, self.settings.scale)
        return h

    def loss(self, h: torch.Tensor, target) -> torch.Tensor:
        """Last stage: target = (micro-batch id, windows (B, S + 1 + D)) -> CE + lambda * MTP loss
        (+ the MTP blocks' balance terms), as compute_losses (paper eq. 24-25)."""
        mb, windows = target
        st = self.settings
        S, D = st.seq_len, self.depth
        ce = self._lm_loss(h, windows[:, 1:S + 1])
        mtp = torch.zeros((), device=windows.device)
        if D > 0:
            hs = self._mtp_hidden(h, windows[:, :S + D], depths=D)
            per_depth = [self._lm_loss(hk, windows[:, k + 1:k + 1 + S]) for k, hk in enumerate(hs, 1)]
            mtp = torch.stack(per_depth).mean()
        bal, vals, counts = _balance(self.mtp_moes, windows.shape[0], st, True)
        self.loss_records[mb] = (ce.detach(), mtp.detach(), vals, counts)
        loss = ce + st.lam * mtp
        return loss if bal is None else loss + bal

    @torch.no_grad()
    def eval_sums(self, h: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor):
        """Last stage, validation: summed main CE and summed mean-over-depths MTP CE (nats), and the
        MTP blocks' loads, as Trainer._evaluate computes them."""
        S, D, V = self.settings.seq_len, self.depth, self.vocab
        nats = F.cross_entropy(self._logits(h).float().reshape(-1, V), targets[:, :S].reshape(-1),
                               reduction="sum").double().cpu()
        mtp_nats = torch.zeros((), dtype=torch.float64)
        if D:
            windows = torch.cat([inputs[:, :1], targets], dim=1)  # (B, S + 1 + D)
            for k, hk in enumerate(self._mtp_hidden(h, windows[:, :S + D]), 1):
                mtp_nats += F.cross_entropy(self._logits(hk).float().reshape(-1, V),
                                            windows[:, k + 1:k + 1 + S].reshape(-1), reduction="sum").double().cpu() / D
        _, _, counts = _balance(self.mtp_moes, h.shape[0], self.settings, False)
        return nats, mtp_nats, counts


def _kept(model: Transformer, chunks) -> set[str]:
    """Names of the top-level pieces of `model` ("embed", "layers.3", "mtp.0", ...) that this rank's
    stages use."""
    keep = {id(m) for c in chunks for m in c.modules()}
    names = {name for name in ("embed", "norm", "head") if id(getattr(model, name)) in keep}
    for prefix, seq in (("layers", model.layers), ("mtp", model.mtp)):
        names |= {f"{prefix}.{i}" for i, m in enumerate(seq) if id(m) in keep}
    return names


def _prune(model: Transformer, kept: set[str]) -> None:
    """Drop the pieces of `model` not in `kept` (from _kept, on this model or on its bf16 twin); what
    is left keeps the full model's names (its state_dict is this rank's part of the checkpoint)."""
    for name in ("embed", "norm", "head"):
        if name not in kept:
            setattr(model, name, None)
    for prefix, seq in (("layers", model.layers), ("mtp", model.mtp)):
        for i in range(len(seq)):
            if f"{prefix}.{i}" not in kept:
                seq[i] = nn.Identity()


def _expert_names(model: nn.Module) -> set[str]:
    """Parameter names of the expert-parallel (sharded) routed experts."""
    return {f"{mn}.{pn}" for mn, m in model.named_modules() if isinstance(m, LocalExperts)
            for pn, _ in m.named_parameters(recurse=False)}


# ----------------------------------------------------------------------------- trainer

class PipelineTrainer(Trainer):
    """Trainer for `dsv3 train --pp N` (see the module docstring). `parallel`: the ParallelContext of
    init_parallel with pp >= 2 (its pp_schedule picks the schedule). Same interface as Trainer;
    `full_master()` and `state_dict()` are collective (every rank calls them) and return the full
    model / the single-process optimizer state on rank 0 only."""

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, train_data, model: Transformer | None = None,
                 parallel=None, prepare=None):
        if parallel is None or parallel.sizes["pp"] < 2:
            raise ValueError("PipelineTrainer needs a ParallelContext with pp >= 2 (dsv3.parallel.dist.init_parallel)")
        ctx = parallel
        _check_recipe(ctx.sizes["pp"], ctx.sizes["ep"], ctx.sizes["tp"], None, cfg, model_cfg, prepare is not None)
        cfg.validate(model_cfg)
        self.kind = ctx.pp_schedule
        self.pp, self.pp_rank, self.dp, self.ep = ctx.sizes["pp"], ctx.coords["pp"], ctx.sizes["dp"], ctx.sizes["ep"]
        self.data = ctx.data_size  # ranks of a stage with their own slice of the batch: dp x ep
        self.micro = pipeline_micro_batch(cfg, self.kind, self.pp, self.data)
        # batch sizes of the ramp in whole micro-batches on every data-parallel rank (DualPipe: pairs)
        self._unit = self.micro * self.data * (2 if self.kind == "dualpipe" else 1)
        # The full model from the seed, exactly as one process builds it (and its bf16 twin under
        # --dtype bf16); then its experts sharded over the EP group and the whole cut into stages.
        super().__init__(model_cfg, cfg, train_data, model=model, parallel=None, prepare=None)
        self.ctx = ctx
        self.pp_group = ctx.group("pp")
        master, compute = self.master, self.model  # the same module under fp32
        self._names = [name for name, _ in self.layers]  # every MoE layer of the model: the loads' rows
        if self.ep > 1:
            # the same expert slices on both copies; the EP layer reuses the gate (and its fp32 bias
            # buffer, shared by the bf16 twin) and keeps record_routing
            for m in ((master,) if compute is master else (master, compute)):
                apply_expert_parallel(m, ctx.group("ep"), fp8_dispatch=ctx.fp8_dispatch)
            for m in compute.modules():
                if isinstance(m, LocalExperts):
                    # the gradient of a local expert sums the losses of the whole EP group: 1/ep makes
                    # it their mean, as dsv3.parallel.data does (dp then averages the replicas)
                    m.grad_scale = 1.0 / self.ep
            self.layers = moe_layers(compute)
            assert [n for n, _ in self.layers] == self._names
        n_stages = Layout(self.kind, self.pp, 2 * self.pp).n_stages
        self.stage_ranges = train_stage_layers(model_cfg.num_hidden_layers, self.depth, n_stages)
        self.settings = _StepSettings(cfg.seq_len, cfg.balance, cfg.seq_alpha, cfg.aux_alpha)
        stages = [TrainStage(compute, i, n_stages, r, self._names, self.settings)
                  for i, r in enumerate(self.stage_ranges)]
        pname = {id(p): n for n, p in compute.named_parameters()}
        held = [{pname[id(p)] for c in local_chunks(self.kind, self.pp, q, stages) for p in c.parameters()}
                for q in range(self.pp)]
        self.chunks = local_chunks(self.kind, self.pp, self.pp_rank, stages)
        del stages
        kept = _kept(compute, self.chunks)
        for m in {id(master): master, id(compute): compute}.values():
            _prune(m, kept)
        owned = {id(m) for c in self.chunks for _, m in c.moes + c.mtp_moes}
        self.layers = [(n, m) for n, m in self.layers if id(m) in owned]  # this rank's MoE layers
        self._rows = [(self._names.index(n), m) for n, m in self.layers]
        self.params = list(master.named_parameters())  # what the optimizer updates (fp32)
        if compute is not master:
            by_name = dict(self.params)
            self._pairs = [(p, by_name[n]) for n, p in compute.named_parameters()]
            assert len(self._pairs) == len(self.params)
        self._master_of = {id(p): q for p, q in self._pairs}
        self._experts = _expert_names(master)  # sharded over ep: reduced over dp only
        self._dense_params = [p for n, p in self.params if n not in self._experts]
        self._expert_params = [p for n, p in self.params if n in self._experts]
        holders = {n: tuple(q for q in range(self.pp) if n in held[q]) for n in pname.values()}
        assert set(n for n, _ in self.params) == held[self.pp_rank]
        # the gradient norm counts each parameter once: on its first holder
        self._norm_params = [(n, p) for n, p in self.params if holders[n][0] == self.pp_rank]
        self._shared = self._shared_groups(holders)
        self.optimizer = build_optimizer(master, cfg.lr, cfg.weight_decay, tuple(cfg.betas))
        self.scheduler = build_lr_scheduler(
            self.optimizer, cfg.steps, cfg.resolved_warmup(), constant_until=cfg.constant_until,
            decay_until=cfg.decay_until, tail_switch_at=cfg.tail_switch_at,
            min_lr_fraction=cfg.min_lr_fraction, last_lr_fraction=cfg.last_lr_fraction,
        )
        last = [c for c in self.chunks if c.last]
        self.act_dtype = DTYPES[cfg.dtype]  # what travels between stages: the compute dtype
        self.pipe = Pipeline(self.kind, self.chunks, loss_fn=last[0].loss if last else _no_loss,
                             p2p_shape=(self.micro, cfg.seq_len, model_cfg.hidden_size), p2p_dtype=self.act_dtype,
                             group=self.pp_group, device=ctx.device, sync_mirrors=False,
                             accumulate=self._accumulate_master if self._pairs else None)
        layers = " | ".join(f"{r.start}-{r.stop - 1}" if len(r) else "-" for r in self.stage_ranges)
        if ctx.is_main:
            print(f"pipeline: {self.kind} over {self.pp} ranks x dp {self.dp} x ep {self.ep}, {n_stages} stages "
                  f"(layers {layers}; embedding on the first, norm + head + {self.depth} MTP on the last), "
                  f"micro-batches of {self.micro}, {cfg.dtype}")

    # ---- layout helpers ----
    @property
    def layer_names(self) -> list[str]:
        return list(self._names)

    def _global(self, pp_rank: int, dp_rank: int | None = None, ep_rank: int | None = None) -> int:
        # dsv3.parallel.dist's layout: rank = ((pp_i * dp + dp_i) * ep + ep_i) * tp + tp_i, tp = 1 here
        dp_rank = self.ctx.coords["dp"] if dp_rank is None else dp_rank
        ep_rank = self.ctx.coords["ep"] if ep_rank is None else ep_rank
        return (pp_rank * self.dp + dp_rank) * self.ep + ep_rank

    def _shared_groups(self, holders: dict) -> list:
        """[(params, process group)] for the parameters several pipeline ranks hold. new_group is
        collective over the world: every rank creates the groups of every (dp, ep) coordinate, in
        one order."""
        sets = sorted({h for h in holders.values() if len(h) > 1})
        mine = dict(self.params)
        out = []
        for h in sets:
            group = None
            if len(h) == self.pp:
                group = self.pp_group
            else:
                for d in range(self.dp):
                    for e in range(self.ep):
                        g = dist.new_group([self._global(q, d, e) for q in h])
                        if (d, e) == (self.ctx.coords["dp"], self.ctx.coords["ep"]):
                            group = g
            if self.pp_rank in h:
                out.append(([mine[n] for n, hs in holders.items() if hs == h], group))
        return out

    @torch.no_grad()
    def _accumulate_master(self, params, grads) -> None:
        """bf16: the weight gradients of one (chunk, micro-batch), added in fp32 into the master's
        .grad (the single-process trainer's _accumulate_master_grads, per micro-batch)."""
        for p, g in zip(params, grads):
            if g is None:
                continue
            q = self._master_of[id(p)]
            if q.grad is None:
                q.grad = g.float()
            else:
                q.grad.add_(g)  # bf16 -> fp32 is exact: the same sum without an fp32 temporary

    def batch_size(self, step: int | None = None) -> int:
        cfg = self.cfg
        step = self.step if step is None else step
        if cfg.batch_size_start is None or cfg.batch_size_start == cfg.batch_size:
            return cfg.batch_size
        return batch_size_at(step, cfg.steps, cfg.batch_size_start, cfg.batch_size, cfg.batch_ramp_until, self._unit)

    # ---- one optimizer step ----
    def train_step(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        bs = self.batch_size()
        lam, gamma = self.mtp_lambda(), self.gamma()
        lr = self.scheduler.get_last_lr()[0]
        windows = self.sampler.next_windows(bs).to(self.device)
        if self.data > 1:
            windows = self.ctx.local_batch(windows)  # every rank draws the global batch, keeps its slice
        local_bs = windows.shape[0]
        M = local_bs // self.micro
        assert M * self.micro == local_bs, (local_bs, self.micro)
        micro = list(windows.split(self.micro))
        self.settings.lam, self.settings.scale = lam, 1.0 / M
        for c in self.chunks:
            c.train()
            c.records.clear()
            c.loss_records.clear()
        # Every loss term is a mean over its micro-batch and all micro-batches have one size: the
        # weight 1/M makes the accumulated gradient that of the mean over the step's batch.
        self.pipe.step(M, inputs=[w[:, :cfg.seq_len] for w in micro], targets=list(enumerate(micro)),
                       loss_scale=1.0 / M)
        table, loads = self._gather_step(M)
        sums = {"loss": 0.0, "ce": 0.0, "mtp": 0.0, "balance": 0.0}
        for m in range(M):
            # the trainer's per-micro-batch arithmetic: bal summed over the layers in order, in fp32
            w = micro[m].shape[0] / local_bs
            ce, mtp = table[m, 0], table[m, 1]
            bal = torch.zeros((), device=table.device)
            for j in range(len(self._names)):
                bal = bal + table[m, 2 + j]
            loss = ce + lam * mtp + bal
            for k, v in (("loss", loss), ("ce", ce), ("mtp", mtp), ("balance", bal)):
                sums[k] += float(v) * w
        if self.data > 1:
            sums = {k: float(self.ctx.mean(v)) for k, v in sums.items()}
        self._reduce_gradients()
        grad_norm = self._clip_grad_norm(cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self._pairs:
            with torch.no_grad():
                for p, q in self._pairs:
                    p.copy_(q)  # round the fp32 master into the bf16 stages
        if loads is not None and self.data > 1:
            loads = self.ctx.global_loads(loads)  # the global batch: summed over the dp replicas
        # every holder of a layer (DualPipe's two copies) applies the same bias update
        return self._finish_step(t0, bs, lr, lam, gamma, sums, grad_norm, loads, self._rows, self._names)

    def _gather_step(self, M: int):
        """(M, 2 + n_moe) fp32 [ce, mtp, balance term per MoE layer] per micro-batch and the step's
        (n_moe, E) loads, from the stages that computed them, summed over the pipeline ranks (each
        entry is computed on exactly one rank, the others add zeros)."""
        n = len(self._names)
        table = torch.zeros(M, 2 + n, dtype=torch.float32)
        loads = torch.zeros(n, self.model_cfg.n_routed_experts, dtype=torch.int64) if n else None
        layout = Layout(self.kind, self.pp, M)
        for c, stage in enumerate(self.chunks):
            mbs = list(layout.micro_batches_of(c))
            # the schedule runs a chunk's forwards in micro-batch order (dsv3.parallel.schedules)
            assert len(stage.records) == len(mbs), (len(stage.records), mbs)
            rows = [(mb, stage.moes, rec) for mb, rec in zip(mbs, stage.records)]
            if stage.last:
                assert sorted(stage.loss_records) == mbs
                for mb, (ce, mtp, vals, counts) in stage.loss_records.items():
                    table[mb, 0], table[mb, 1] = ce.cpu(), mtp.cpu()
                    rows.append((mb, stage.mtp_moes, (vals, counts)))
            for mb, moes, (vals, counts) in rows:
                for (row, _), v, k in zip(moes, vals, counts):
                    if v is not None:
                        table[mb, 2 + row] = v.cpu()
                    loads[row] += k.cpu()
            stage.records.clear()
            stage.loss_records.clear()
        dist.all_reduce(table, group=self.pp_group)
        if loads is not None:
            dist.all_reduce(loads, group=self.pp_group)
        return table.to(self.device), loads

    @torch.no_grad()
    def _reduce_gradients(self):
        """Mean over the data-parallel ranks of the stage (each rank's loss is the mean over its
        slice): the non-expert parameters over the dense group (dp x ep), the expert shards over
        the dp ranks holding the same shard (their gradient is already the mean over the EP group,
        LocalExperts.grad_scale); then the sum over the pipeline ranks that hold the same parameter
        (the shared embedding, DualPipe's stage copies): every holder ends with the full gradient
        of the global mean loss."""
        for _, p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        dense, experts = self._dense_params, self._expert_params
        todo = []
        if self.data > 1 and dense:
            todo.append((dense, self.ctx.group("dense"), self.data))
        if self.dp > 1 and experts:
            todo.append((experts, self.ctx.group("dp"), self.dp))
        todo += [(ps, g, None) for ps, g in self._shared]
        for ps, group, n in todo:
            grads = [p.grad for p in ps]
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=group)
            if n is not None:
                flat /= n
            for g, r in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(r)

    @torch.no_grad()
    def _clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ on the whole model's gradient: each parameter counted once
        (on its first pipeline holder; an expert shard on each EP rank, since they hold different
        experts), squares summed over the EP group (experts) and the pipeline ranks."""
        sq = torch.zeros((), dtype=torch.float64)
        sq_experts = torch.zeros((), dtype=torch.float64)
        for n, p in self._norm_params:
            if n in self._experts:
                sq_experts += p.grad.double().pow(2).sum().cpu()
            else:
                sq += p.grad.double().pow(2).sum().cpu()
        if self.ep > 1:
            dist.all_reduce(sq_experts, group=self.ctx.group("ep"))
        sq += sq_experts
        dist.all_reduce(sq, group=self.pp_group)
        norm = sq.sqrt().float()
        coef = float(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        for _, p in self.params:
            p.grad.mul_(coef)
        return norm

    # ---- validation: a forward-only relay through the stages ----
    def _evaluate(self, data, max_batches: int | None) -> dict:
        cfg = self.cfg
        S, D = cfg.seq_len, self.depth
        for c in self.chunks:
            c.eval()
        layout = Layout(self.kind, self.pp, 2 * self.pp)  # where(stage, 0): DualPipe's direction-0 copies
        n_stages = layout.n_stages
        n = len(self._names)
        nats = torch.zeros((), dtype=torch.float64)
        mtp_nats = torch.zeros((), dtype=torch.float64)
        n_tok, n_bytes = 0, 0
        per_batch = []
        for inputs, targets in data.sequential_batches(self.micro, S, D, max_batches):
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            B = inputs.shape[0]
            counts = torch.zeros(n, self.model_cfg.n_routed_experts, dtype=torch.int64)
            h = None  # the previous stage's output when it ran on this rank
            for s in range(n_stages):
                rank, c = layout.where(s, 0)
                if rank != self.pp_rank:
                    h = None
                    continue
                stage = self.chunks[c]
                if s == 0:
                    x = inputs
                elif h is not None:
                    x = h
                else:
                    x = torch.empty(B, S, self.model_cfg.hidden_size, dtype=self.act_dtype, device=self.device)
                    dist.recv(x, src=self._global(layout.where(s - 1, 0)[0]), group=self.pp_group)
                h = stage(x)
                (_, stage_counts), = stage.records
                stage.records.clear()
                rows = list(zip(stage.moes, stage_counts))
                if stage.last:
                    a, b, mtp_counts = stage.eval_sums(h, inputs, targets)
                    nats += a
                    mtp_nats += b
                    rows += list(zip(stage.mtp_moes, mtp_counts))
                else:
                    nxt = layout.where(s + 1, 0)[0]
                    if nxt != self.pp_rank:
                        dist.send(h.contiguous(), dst=self._global(nxt), group=self.pp_group)
                for (row, _), k in rows:
                    counts[row] += k.cpu()
            main = targets[:, :S]
            n_tok += main.numel()
            if data.token_nbytes is not None:
                n_bytes += data.num_bytes(main.cpu())
            per_batch.append(counts)
        assert n_tok > 0
        dist.all_reduce(nats, group=self.pp_group)
        dist.all_reduce(mtp_nats, group=self.pp_group)
        val_loss = float(nats) / n_tok
        out = {"kind": "eval", "step": self.step, "val_loss": val_loss, "val_tokens": n_tok}
        if D:
            out["val_mtp_loss"] = float(mtp_nats) / n_tok
        if n_bytes:
            out["val_bpb"] = float(nats) / math.log(2) / n_bytes
        if n:
            loads = torch.stack(per_batch)  # (batches, n_moe, E)
            dist.all_reduce(loads, group=self.pp_group)
            total = loads.sum(0)
            batch_vio = torch.stack([max_violation(x) for x in loads])
            out["val_maxvio_global"] = dict(zip(self._names, max_violation(total).tolist()))
            out["val_maxvio_batch"] = dict(zip(self._names, batch_vio.mean(0).tolist()))
            out["val_loads"] = {name: row.tolist() for name, row in zip(self._names, total)}
        if self.tracker is not None and self.tracker.steps:
            out["train_loads"] = {name: row.tolist() for name, row in zip(self._names, self.tracker.total)}
        for c in self.chunks:
            c.train()
        return out

    # ---- checkpoints: one full HF folder and the single-process trainer state, on rank 0 ----
    def _gather_to_main(self, obj):
        """gather_object over this rank's pipeline group onto global rank 0; only the ranks of rank
        0's (dp, ep) coordinates take part. Returns the list on rank 0, None elsewhere."""
        if self.ctx.coords["dp"] != 0 or self.ctx.coords["ep"] != 0:
            return None
        parts = [None] * self.pp if self.ctx.is_main else None
        dist.gather_object(obj, parts, dst=0, group=self.pp_group)
        return parts

    def _local_expert_slice(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The inverse for loading: this EP rank's experts of a full stack (or moment) `name`."""
        kind, ids = self.master.shard_plan[name]
        assert kind == "experts", (name, kind)
        return t.index_select(0, torch.as_tensor(ids, dtype=torch.long, device=t.device))

    def full_master(self) -> Transformer | None:
        """The master weights as one single-device Transformer on rank 0 (None elsewhere); collective.
        Tensors several ranks hold (the MTP's embedding, DualPipe's copies) must be bit-identical."""
        mine = {k: v.cpu() for k, v in full_state_dict(self.master).items()}  # experts gathered over EP
        parts = self._gather_to_main(mine)
        if parts is None:
            return None
        weights = {}
        for q, part in enumerate(parts):
            for k, v in part.items():
                if k in weights:
                    assert torch.equal(weights[k], v), f"the pipeline copies of {k} diverged (rank {q})"
                else:
                    weights[k] = v
        full = Transformer(self.model_cfg)
        missing, unexpected = full.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.endswith("inv_freq")]
        assert not missing and not unexpected, (missing[:5], unexpected[:5])
        return full.eval()

    def _optimizer_order(self) -> list[tuple[str, list[str]]]:
        """[(group name, parameter names)] in the order a single-process Trainer's AdamW indexes its
        state (build_optimizer on the full model; built on the meta device, no memory)."""
        with torch.device("meta"):
            m = Transformer(self.model_cfg)
        opt = build_optimizer(m, self.cfg.lr, self.cfg.weight_decay, tuple(self.cfg.betas))
        names = {id(p): n for n, p in m.named_parameters()}
        return [(g["name"], [names[id(p)] for p in g["params"]]) for g in opt.param_groups]

    def state_dict(self) -> dict:
        """Trainer.state_dict with the optimizer state of all stages, in the single-process layout
        (rank 0; None on the other ranks). Collective."""
        state = super().state_dict()
        opt_state = {}
        for n, p in self._norm_params:  # one order on every rank of an EP group (the gathers pair up)
            st = self.optimizer.state.get(p)
            if not st:
                continue  # no step yet (the same on every rank)
            entry = {}
            for k, v in st.items():
                if torch.is_tensor(v):
                    v = v.detach()
                    if self.ep > 1 and n in self._experts and v.dim() > 0:
                        v = gather_expert_stack(v, self.ctx.group("ep"))  # exp_avg / exp_avg_sq of all experts
                    v = v.cpu().clone()
                entry[k] = v
            opt_state[n] = entry
        mine = {
            "state": opt_state,
            "groups": {g["name"]: {k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups},
        }
        parts = self._gather_to_main(mine)
        state["optimizer"] = None
        state["parallel"] = {**self.ctx.sizes, "pp_schedule": self.kind}
        if parts is not None:
            merged, hyper = {}, {}
            for part in parts:
                merged.update(part["state"])
                hyper.update(part["groups"])
            order = self._optimizer_order()
            assert not merged or set(merged) == {n for _, ns in order for n in ns}, "optimizer state incomplete"
            out, groups, i = {}, [], 0
            for gname, names in order:
                idx = []
                for n in names:
                    if n in merged:
                        out[i] = merged[n]
                    idx.append(i)
                    i += 1
                groups.append({**hyper[gname], "params": idx})
            state["optimizer"] = {"state": out, "param_groups": groups}
        return state

    def load_state_dict(self, state: dict, weights: dict[str, torch.Tensor]) -> None:
        """`weights`: the full master state dict (dsv3.load_model(...).state_dict()); this rank loads
        its stages' part. The optimizer state may come from any layout (it is stored in the
        single-process layout)."""
        if ModelConfig.from_hf(state["model_config"]) != self.model_cfg:
            raise ValueError("the checkpoint's model config differs from this run's")
        if state.get("optimizer") is None:
            raise ValueError(f"this checkpoint was written by a parallel run ({state.get('parallel')}) without "
                             f"optimizer state: it cannot be resumed (its weights load with dsv3.load_model)")
        own = self.master.state_dict()
        missing = [k for k in own if k not in weights]
        if missing:
            raise ValueError(f"checkpoint weights do not fit the model: missing {missing[:5]}")
        local = {k: self._local_expert_slice(k, weights[k]) if k in self._experts else weights[k] for k in own}
        bad = [k for k in own if local[k].shape != own[k].shape]
        if bad:
            raise ValueError(f"checkpoint weights do not fit the model: {bad[0]} has shape "
                             f"{tuple(weights[bad[0]].shape)}")
        with torch.no_grad():
            self.master.load_state_dict(local, strict=True)
            for p, q in self._pairs:
                p.copy_(q)  # bf16: the stages run the rounded master
        full = state["optimizer"]
        by_name = {g["name"]: g for g in full["param_groups"]}
        index = {}
        for gname, names in self._optimizer_order():
            if gname not in by_name or len(by_name[gname]["params"]) != len(names):
                raise ValueError("the checkpoint's optimizer state does not fit the model's parameter groups")
            index.update(zip(names, by_name[gname]["params"]))
        pname = {id(p): n for n, p in self.params}
        opt_local, groups, i = {}, [], 0
        for g in self.optimizer.param_groups:
            idx = []
            for p in g["params"]:
                n = pname[id(p)]
                j = index[n]
                if j in full["state"]:
                    st = full["state"][j]
                    if n in self._experts:  # this EP rank's rows of the experts' moments
                        st = {k: self._local_expert_slice(n, v) if torch.is_tensor(v) and v.dim() > 0 else v
                              for k, v in st.items()}
                    opt_local[i] = st
                idx.append(i)
                i += 1
            groups.append({**{k: v for k, v in by_name[g["name"]].items() if k != "params"}, "params": idx})
        self.optimizer.load_state_dict({"state": opt_local, "param_groups": groups})
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        if self.tracker is not None:
            self.tracker.load_state_dict(state["tracker"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])


def _no_loss(output, target):
    raise AssertionError("this pipeline rank holds no last stage: it computes no loss")
