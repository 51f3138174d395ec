"""Pipeline parallelism on torch.distributed point-to-point: 1F1B, DualPipe, DualPipeV.

The model code stays single-device (DESIGN.md): a pipeline stage is any nn.Module mapping one
tensor to one tensor, and `split_transformer` cuts a dsv3 Transformer into such stages by wrapping
its own submodules (embedding + first layers | ... | last layers + norm + head), so nothing in
dsv3.model knows it is pipelined. `Pipeline.step` runs one training step of a schedule from
`dsv3.parallel.schedules` on this rank: forwards, backwards and weight-gradient steps in the
schedule's order, activations and gradients exchanged with isend/irecv.

Zero-bubble split (used by DualPipe, DeepSeek-V3 report section 3.2.1): a "B" op computes only
the gradient w.r.t. the stage input (torch.autograd.grad w.r.t. the input, graph retained), so
it can be sent upstream at once; the matching "W" op later computes the weight gradients from the
same graph (torch.autograd.grad w.r.t. the parameters) and accumulates them into .grad. A "BW"
op does both in one pass. Generic modules give no access to the weight-gradient GEMMs alone, so
a W op re-walks the stage's autograd graph from its output: correct and order-preserving, but it
costs about a full backward (the schedule's timing model assumes W < B; see docs/pipeline.md).

Training with MTP, the balance losses and the rest of the recipe is dsv3.train.pipeline_train
(`dsv3 train --pp`), which builds its own stages on top of this runtime. Not covered here: MTP
modules (ignored by `split_transformer`), tied embeddings across stages,
forward-only (inference) steps, and overlapping the computation of an F&B pair (the pair runs
forward then backward, as DeepSeek's DualPipe does without a custom overlapped_forward_backward).
Tested on gloo only: receives are posted early and sends waited for at the end of the step, which
gloo's tagged point-to-point supports; NCCL, where one peer's sends and receives share a stream,
is untested.
"""
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dsv3.parallel.schedules import Layout, Op, build_schedule

__all__ = ["Pipeline", "TransformerStage", "split_transformer", "lm_loss", "local_chunks", "stage_layers"]


# ----------------------------------------------------------------------------- stages

class TransformerStage(nn.Module):
    """A contiguous piece of a dsv3 Transformer, built from the model's own submodules (shared,
    not copied). First stage: tokens (B, S) -> hidden (B, S, D); middle: hidden -> hidden; last:
    hidden -> logits (B, S, V) after the final norm and head. Plain causal positions, no cache."""

    def __init__(self, model: nn.Module, layers: range, first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        self.layer_ids = layers
        self.embed = model.embed if first else None
        self.layers = nn.ModuleList(model.layers[i] for i in layers)
        self.norm = model.norm if last else None
        self.head = model.head if last else None
        self.rotary = model.rotary
        # The model's own mask/rope preparation, so a stage computes exactly what
        # Transformer.hidden computes (a bound method: not a submodule, no parameters).
        self._prepare = model._prepare

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) if self.first else x  # (B, S, D)
        # _prepare only reads the (B, S) shape and the device of its token argument.
        positions, mask, cos, sin = self._prepare(x if self.first else h[..., 0], None, None)
        for layer in self.layers:
            h = layer(h, cos, sin, positions, mask, None)
        if self.last:
            h = self.head(self.norm(h))
        return h


def stage_layers(num_layers: int, num_stages: int, layers_per_stage: Sequence[int] | None = None) -> list[range]:
    """Contiguous layer ranges per stage: as even as possible (earlier stages take the remainder)
    unless `layers_per_stage` is given."""
    if num_stages < 1:
        raise ValueError(f"need at least one pipeline stage, got {num_stages}")
    if layers_per_stage is None:
        if num_layers < num_stages:
            raise ValueError(f"cannot split {num_layers} layers into {num_stages} pipeline stages with at least "
                             "one layer each; pass layers_per_stage or use fewer stages")
        base, extra = divmod(num_layers, num_stages)
        layers_per_stage = [base + (i < extra) for i in range(num_stages)]
    layers_per_stage = list(layers_per_stage)
    if len(layers_per_stage) != num_stages:
        raise ValueError(f"layers_per_stage has {len(layers_per_stage)} entries for {num_stages} stages")
    if any(n < 0 for n in layers_per_stage) or sum(layers_per_stage) != num_layers:
        raise ValueError(f"layers_per_stage {layers_per_stage} must be non-negative and sum to the model's "
                         f"{num_layers} layers")
    if any(n == 0 for n in layers_per_stage[1:-1]):
        raise ValueError(f"layers_per_stage {layers_per_stage}: a middle stage needs at least one layer")
    out, start = [], 0
    for n in layers_per_stage:
        out.append(range(start, start + n))
        start += n
    return out


def split_transformer(model: nn.Module, num_stages: int,
                      layers_per_stage: Sequence[int] | None = None) -> list[TransformerStage]:
    """All pipeline stages of `model` (every rank builds the list and keeps the ones it holds,
    see `local_chunks`). The MTP modules are not part of any stage."""
    cfg = model.config
    if cfg.tie_word_embeddings and num_stages > 1:
        raise ValueError("pipeline parallelism does not support tie_word_embeddings: the embedding and the "
                         "head would live on different stages")
    ranges = stage_layers(cfg.num_hidden_layers, num_stages, layers_per_stage)
    return [TransformerStage(model, r, first=i == 0, last=i == num_stages - 1) for i, r in enumerate(ranges)]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in fp32 (mean over the micro-batch's tokens)."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten())


def local_chunks(kind: str, pp: int, rank: int, stages: Sequence[nn.Module]) -> list[nn.Module]:
    """The stage modules rank `rank` holds, in chunk order, from the list of all stages
    (pp stages for 1f1b and dualpipe, 2*pp for dualpipev)."""
    layout = Layout(kind, pp, 2 * pp if kind != "1f1b" else 1)
    if len(stages) != layout.n_stages:
        raise ValueError(f"{kind} with pp={pp} needs {layout.n_stages} stages, got {len(stages)}")
    return [stages[s] for s in layout.stages_of(rank)]


# ----------------------------------------------------------------------------- runtime

class Pipeline:
    """Runs one rank's part of a pipeline schedule.

    chunks: this rank's stage modules in chunk order (`local_chunks`); for DualPipe the second
    chunk is a second copy of another rank's first stage and must start with the same weights.
    p2p_shape / p2p_dtype: shape and dtype of every activation (and its gradient) sent between
    stages, as DualPipe's set_p2p_tensor_shapes: receives are posted before the data exists.
    loss_fn(output, target) -> scalar, computed on the last stage of each micro-batch.
    group: the pipeline process group (default: the whole world); ranks are group ranks.
    sync_mirrors: DualPipe only. True (default): `step` sums the gradients of the two copies of each
    stage at its end (`sync_mirror_grads`). False: each copy keeps the gradient of the micro-batches
    it ran, for a caller that reduces shared parameters itself (dsv3.train.pipeline_train sums every
    parameter over all the ranks holding it, the DualPipe copies and the embedding the last stage's
    MTP shares with the first stage alike).
    accumulate(params, grads): where the weight gradients of one (chunk, micro-batch) go; default:
    added into p.grad. A mixed-precision trainer passes one that adds them, in fp32, into its fp32
    master copies (dsv3.train.pipeline_train under --dtype bf16), so that the sum over micro-batches
    is taken in fp32 as the single-process trainer takes it. DualPipe's own mirror exchange reads
    p.grad: a custom `accumulate` needs sync_mirrors=False."""

    def __init__(self, kind: str, chunks: Sequence[nn.Module], *, loss_fn: Callable, p2p_shape: Sequence[int],
                 p2p_dtype: torch.dtype = torch.float32, group: dist.ProcessGroup | None = None,
                 device: torch.device | str | None = None, sync_mirrors: bool = True,
                 accumulate: Callable | None = None):
        if not dist.is_initialized():
            raise ValueError("Pipeline needs torch.distributed to be initialised (init_process_group)")
        if accumulate is not None and kind == "dualpipe" and sync_mirrors:
            raise ValueError("Pipeline: a custom `accumulate` with dualpipe needs sync_mirrors=False (the mirror "
                             "exchange sums p.grad, which the custom accumulation does not fill)")
        self.kind = kind
        self.group = group
        self.pp = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        n_chunks = Layout(kind, self.pp, 2 * self.pp).n_chunks  # validates kind and pp
        if len(chunks) != n_chunks:
            raise ValueError(f"{kind} needs {n_chunks} stage module(s) per rank, got {len(chunks)}")
        self.chunks = list(chunks)
        self.loss_fn = loss_fn
        self.p2p_shape = tuple(p2p_shape)
        self.p2p_dtype = p2p_dtype
        self.device = torch.device(device) if device is not None else next(
            (p.device for c in chunks for p in c.parameters()), torch.device("cpu"))
        self._schedules: dict[int, list[Op]] = {}
        self.sync_mirrors = sync_mirrors
        self._accumulate = accumulate

    # -- helpers
    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _tag(self, layout: Layout, kind: str, producer_stage: int, mb: int) -> int:
        # Unique per message, so gloo pairs sends and receives by tag whatever the posting order.
        return (mb * layout.n_stages + producer_stage) * 2 + (kind == "B")

    def schedule(self, micro_batches: int) -> list[Op]:
        if micro_batches not in self._schedules:
            self._schedules[micro_batches] = build_schedule(self.kind, self.pp, micro_batches)[self.rank]
        return self._schedules[micro_batches]

    # -- one training step
    def step(self, micro_batches: int, inputs: Sequence[torch.Tensor] | None = None,
             targets: Sequence | None = None, loss_scale: float = 1.0) -> dict[int, torch.Tensor]:
        """Forward and backward of `micro_batches` micro-batches; weight gradients are accumulated
        into .grad (zero them yourself between steps). inputs[m] / targets[m] are micro-batch m's
        model input and loss target; needed on the ranks where m enters / leaves the pipeline
        (both lists may be passed everywhere). Each micro-batch's loss is back-propagated with
        weight `loss_scale` (1/M gives the mean). Returns {micro-batch: loss} for the micro-batches
        whose loss this rank computed. For DualPipe the two copies of each stage get their summed
        gradient at the end (`sync_mirror_grads`) unless the pipeline was built with sync_mirrors=False."""
        layout = Layout(self.kind, self.pp, micro_batches)
        ops = self.schedule(micro_batches)
        entering = [m for m in range(micro_batches) if layout.entry_rank(m) == self.rank]
        leaving = [m for m in range(micro_batches) if layout.exit_rank(m) == self.rank]
        if entering and (inputs is None or len(inputs) != micro_batches):
            raise ValueError(f"pipeline rank {self.rank} feeds micro-batches {entering}: pass inputs, "
                             f"one per micro-batch ({micro_batches})")
        if leaving and (targets is None or len(targets) != micro_batches):
            raise ValueError(f"pipeline rank {self.rank} computes the loss of micro-batches {leaving}: pass "
                             f"targets, one per micro-batch ({micro_batches})")

        mirror = self.kind == "dualpipe" and self.sync_mirrors
        if mirror:
            # The mirror exchange at the end must only sum this step's gradients: set the ones
            # accumulated so far aside (they are already equal on both copies) and add them back.
            before = [[p.grad for p in self._params(c)] for c in range(2)]
            for c in range(2):
                for p in self._params(c):
                    p.grad = None
        stage = [layout.stage(self.rank, c) for c in range(len(self.chunks))]
        last = layout.n_stages - 1
        x_of, y_of, g_of, gin_of = {}, {}, {}, {}  # per (chunk, mb): input, output/loss, its grad, input grad
        recvs: dict[tuple[str, int, int], tuple[dist.Work, torch.Tensor]] = {}
        sends: list[tuple[dist.Work, torch.Tensor]] = []
        losses: dict[int, torch.Tensor] = {}
        scale = torch.tensor(loss_scale, dtype=torch.float32, device=self.device)

        def remote(kind, c, mb):
            work, buf = recvs.pop((kind, c, mb))
            work.wait()
            return buf

        def forward(c, mb):
            s = stage[c]
            if s == 0:
                x = inputs[mb]
            else:
                src = layout.where(s - 1, mb)
                if src[0] == self.rank:  # DualPipeV's bend: the other chunk of this rank
                    x = y_of[src[1], mb].detach()
                else:
                    x = remote("F", c, mb)
                x.requires_grad_(True)
            with torch.enable_grad():
                y = self.chunks[c](x)
                if s == last:
                    y = self.loss_fn(y, targets[mb])
                    losses[mb] = y.detach()
            x_of[c, mb], y_of[c, mb] = x, y

        def output_grad(c, mb):
            s = stage[c]
            if s == last:
                return scale.to(y_of[c, mb].dtype)
            dst = layout.where(s + 1, mb)
            if dst[0] == self.rank:
                return gin_of.pop((dst[1], mb))
            return remote("B", c, mb)

        def accumulate(ps, grads):
            if self._accumulate is not None:
                self._accumulate(ps, grads)
                return
            for p, g in zip(ps, grads):
                if g is None:
                    continue
                if p.grad is None:
                    p.grad = g.detach().clone()
                else:
                    p.grad.add_(g)

        def backward(c, mb, weights: bool):
            y, x = y_of[c, mb], x_of[c, mb]
            g = output_grad(c, mb)
            wants_x = stage[c] > 0
            ps = self._params(c) if weights else []
            inputs_ = ([x] if wants_x else []) + ps
            if inputs_:
                grads = torch.autograd.grad(y, inputs_, g, retain_graph=not weights, allow_unused=True)
            else:
                grads = ()
            if wants_x:
                gin_of[c, mb] = grads[0]
                grads = grads[1:]
            if weights:
                accumulate(ps, grads)
                del x_of[c, mb], y_of[c, mb]
            else:
                g_of[c, mb] = g  # kept for the W op

        def weight(c, mb):
            y, g = y_of.pop((c, mb)), g_of.pop((c, mb))
            del x_of[c, mb]
            ps = self._params(c)
            if ps:
                accumulate(ps, torch.autograd.grad(y, ps, g, allow_unused=True))

        for op in ops:
            if op.kind == "F":
                forward(op.chunk, op.mb)
            elif op.kind == "B":
                backward(op.chunk, op.mb, weights=False)
            elif op.kind == "BW":
                backward(op.chunk, op.mb, weights=True)
            elif op.kind == "W":
                weight(op.chunk, op.mb)
            elif op.kind.startswith("RECV"):
                kind = op.kind[-1]
                producer = stage[op.chunk] - 1 if kind == "F" else stage[op.chunk] + 1
                buf = torch.empty(self.p2p_shape, dtype=self.p2p_dtype, device=self.device)
                work = dist.irecv(buf, src=self._global(op.peer), group=self.group,
                                  tag=self._tag(layout, kind, producer, op.mb))
                recvs[kind, op.chunk, op.mb] = (work, buf)
            else:  # SEND_F / SEND_B
                kind = op.kind[-1]
                t = (y_of[op.chunk, op.mb] if kind == "F" else gin_of.pop((op.chunk, op.mb))).detach()
                if t.shape != self.p2p_shape or t.dtype != self.p2p_dtype:
                    raise ValueError(f"stage {stage[op.chunk]} produced a {tuple(t.shape)} {t.dtype} tensor for "
                                     f"micro-batch {op.mb}, but the pipeline sends {self.p2p_shape} {self.p2p_dtype}")
                t = t.contiguous()
                work = dist.isend(t, dst=self._global(op.peer), group=self.group,
                                  tag=self._tag(layout, kind, stage[op.chunk], op.mb))
                sends.append((work, t))  # keep the tensor alive until the send completes
        for work, _ in sends:
            work.wait()
        assert not recvs and not x_of and not y_of and not g_of and not gin_of, "schedule left work behind"
        if mirror:
            self.sync_mirror_grads(tag_base=2 * layout.n_stages * micro_batches)
            for c in range(2):
                for p, old in zip(self._params(c), before[c]):
                    if old is not None:
                        p.grad = old + p.grad
        return losses

    def _params(self, c: int) -> list[nn.Parameter]:
        return [p for p in self.chunks[c].parameters() if p.requires_grad]

    def sync_mirror_grads(self, tag_base: int = 0) -> None:
        """DualPipe keeps two copies of every stage: rank r's chunk 0 and rank (pp-1-r)'s chunk 1.
        Exchange gradients with the mirror rank so both copies hold the sum (a + b == b + a in IEEE
        arithmetic, so the copies stay bit-identical)."""
        assert self.kind == "dualpipe"
        partner = self.pp - 1 - self.rank
        mine = [self._flat_grads(c) for c in range(2)]
        theirs = [torch.empty_like(t) for t in mine]  # theirs[c]: the partner's chunk 1-c, my chunk c's stage
        works = []
        for c in range(2):
            works.append(dist.isend(mine[c], dst=self._global(partner), group=self.group, tag=tag_base + c))
            works.append(dist.irecv(theirs[c], src=self._global(partner), group=self.group, tag=tag_base + 1 - c))
        for w in works:
            w.wait()
        for c in range(2):
            offset = 0
            for p in self._params(c):
                n = p.numel()
                other = theirs[c][offset:offset + n].view_as(p)
                p.grad = other.clone() if p.grad is None else p.grad + other
                offset += n

    def _flat_grads(self, c: int) -> torch.Tensor:
        ps = self._params(c)
        if not ps:
            return torch.empty(0, device=self.device)
        dtypes = {p.dtype for p in ps}
        if len(dtypes) != 1:
            raise ValueError(f"dualpipe gradient exchange needs one parameter dtype per stage, got {dtypes}")
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps])
