"""Pipeline-parallel inference: the decoder layers split into PP contiguous stages, one per rank,
driven by the one engine on rank 0 (`dsv3 generate --pp N`, `dsv3 serve --pp N` under torchrun).

Stage layout (`stage_ranges`, the training split of dsv3.parallel.pipeline.stage_layers: as even as
possible, earlier stages take the remainder):

    rank 0:      embedding, layers [0, n0), final norm, head, MTP module(s)
    rank s > 0:  layers [n_{s-1}, n_s)

A forward of the main model goes 0 -> 1 -> ... -> PP-1 -> 0: rank 0 embeds and runs its layers, each
stage receives the hidden states (B, S, D) from the previous one point to point, runs its layers and
sends them on; the last stage sends them back to rank 0, which applies the final norm. Why the
head, the final norm and MTP live on rank 0 and not on the last stage: rank 0 runs the only engine
(dsv3.infer.lockstep), and everything the engine does after a forward (the head's logits or the int8
greedy screen, sampling, speculative drafting with the MTP module, which reads the embedding and
the head again) then stays local to it. The alternative (head on the last stage) would send logits,
or every draft/verify decision, back to rank 0 instead of one (B, S, D) tensor, and would split the
embedding that the MTP module shares with the main model across two ranks. The price is that rank 0
holds the embedding, head and MTP weights on top of its layers; stage_ranges gives it no more layers
than any other stage.

Lockstep: rank 0's stage runs under a `LockstepModel` proxy. Every `hidden` call broadcasts the
command header first (op, attention impl, cache binding, positions; dsv3.infer.lockstep), then all
stages enter the same chain of sends and receives. `logits` and `mtp_hidden` touch only rank 0's
modules: `lockstep_local_ops` tells the proxy to run them without a command.

Cache: each stage keeps the paged latent cache of its own layers only (`StageLatentCache`: the same
block pool geometry and block tables as the engine's cache, `layer_ids` mapping the model's layer
index to a local slot). Rank 0's also holds the MTP layer's latents when the engine speculates.

Tensors: each rank reads only its stage's tensors from the HF checkpoint (`load_stage`; the other
stages' entries are never opened). The model code (dsv3.model) stays single-device: a stage is built
from the model's own Block / MTP / Rotary modules, and rank 0's `logits` / `mtp_hidden` / `_prepare`
are Transformer's own functions applied to the stage's modules.

Not combined with --tp/--ep (refused by the commands): a stage is a whole-layer slice on one rank.
"""
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from dsv3.config import ModelConfig
from dsv3.infer.paged import PagedLatentCache
from dsv3.model.linear import Linear
from dsv3.model.mtp import MTP
from dsv3.model.norm import RMSNorm
from dsv3.model.rope import Rotary
from dsv3.model.transformer import Block, Transformer
from dsv3.parallel.pipeline import stage_layers

__all__ = ["PipelineStage", "StageLatentCache", "stage_ranges", "load_stage"]


def stage_ranges(num_layers: int, num_stages: int) -> list[range]:
    """Layer ranges of the stages. ValueError when there are fewer layers than stages."""
    if num_stages < 2:
        raise ValueError(f"pipeline-parallel inference needs at least 2 stages, got {num_stages}")
    if num_layers < num_stages:
        raise ValueError(f"--pp {num_stages}: the model has {num_layers} decoder layers, fewer than the "
                         f"{num_stages} pipeline stages (each stage needs at least one layer)")
    return stage_layers(num_layers, num_stages)


class StageLatentCache(PagedLatentCache):
    """The paged latent cache of a subset of the model's layers. `n_layers` stays the size of the
    engine's layer index space (what the engine sized its cache for); only `layer_ids` are allocated,
    in the same block geometry, so the engine's block tables address every stage's cache alike."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, n_layers: int,
                 layer_ids: Sequence[int], dtype=torch.float32, device="cpu"):
        assert layer_ids and all(0 <= i < n_layers for i in layer_ids), (layer_ids, n_layers)
        super().__init__(cfg, num_blocks, block_size, len(layer_ids), dtype, device)
        self.n_layers = n_layers
        self.layer_ids = tuple(layer_ids)
        self._slot = {layer: j for j, layer in enumerate(self.layer_ids)}

    def update(self, layer: int, kv, pe, positions):
        # MLA passes its global layer_id; a layer of another stage here is a wiring bug
        return super().update(self._slot[layer], kv, pe, positions)

    def kernel_slots(self, layer: int, positions):
        return super().kernel_slots(self._slot[layer], positions)


class PipelineStage(nn.Module):
    """One rank's part of the model (see the module docstring): `layers` holds the Blocks of
    `layer_ids` (each keeps its model-wide layer_id, which the cache is indexed by); stage 0 also has
    embed, norm, head and mtp. `group`: the pipeline group (this rank's index in it is the stage)."""

    # ops LockstepModel runs on rank 0 alone: only rank 0's modules take part in them
    lockstep_local_ops = frozenset({"logits", "mtp_hidden"})

    def __init__(self, cfg: ModelConfig, ranges: Sequence[range], stage: int, group=None):
        super().__init__()
        assert len(ranges) >= 2 and 0 <= stage < len(ranges)
        self.config = cfg
        self.stage, self.num_stages, self.group = stage, len(ranges), group
        self.layer_ids = ranges[stage]
        self.layers = nn.ModuleList(Block(i, cfg) for i in self.layer_ids)
        self.rotary = Rotary(cfg)
        self.first = stage == 0
        if self.first:
            self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            if cfg.tie_word_embeddings:
                self.head.weight = self.embed.weight
            self.mtp = nn.ModuleList(MTP(cfg.num_hidden_layers + k, cfg) for k in range(cfg.num_nextn_predict_layers))

    # The single-device model's own code on this stage's modules (they read only self.rotary,
    # self.embed, self.mtp and self.head): the same mask/rotary preparation, head and MTP as one process.
    _prepare, _tables = Transformer._prepare, Transformer._tables
    logits = Transformer.logits
    mtp_hidden = Transformer.mtp_hidden

    # ---- point to point along the ring of stages
    def _peer(self, stage: int) -> int:
        return stage % self.num_stages

    def _send(self, h: torch.Tensor, stage: int):
        dist.send(h.contiguous(), group=self.group, group_dst=self._peer(stage))

    def _recv(self, shape, dtype, device, stage: int) -> torch.Tensor:
        h = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(h, group=self.group, group_src=self._peer(stage))
        return h

    def hidden(self, tokens, positions=None, cache=None):
        """Stage 0: tokens (B, S) -> final hidden states (B, S, D) after the last norm, as
        Transformer.hidden. Other stages: the same call (tokens give only the shape and device)
        receives the previous stage's states, runs this stage's layers and sends them on; returns
        None. Every stage must make the call with the same shapes, positions and cache binding."""
        positions, mask, cos, sin = self._prepare(tokens, positions, cache)
        B, S = tokens.shape
        dtype = self.layers[0].attn_norm.weight.dtype  # the activations' dtype (norms are loaded in it)
        if self.first:
            h = self.embed(tokens)  # (B, S, D)
        else:
            h = self._recv((B, S, self.config.hidden_size), dtype, tokens.device, self.stage - 1)
        for layer in self.layers:
            h = layer(h, cos, sin, positions, mask, cache)
        assert h.dtype == dtype, (h.dtype, dtype)  # the receiving stage allocates the stage dtype
        self._send(h, self.stage + 1)  # the last stage sends back to rank 0 (stage + 1 wraps)
        if not self.first:
            return None
        h = self._recv((B, S, self.config.hidden_size), dtype, tokens.device, self.num_stages - 1)
        return self.norm(h)

    def forward(self, tokens, positions=None, cache=None):
        """Stage 0: logits (B, S, vocab); other stages: None (they only pass hidden states on)."""
        h = self.hidden(tokens, positions, cache)
        return self.logits(h) if self.first else None

    def latent_cache(self, num_blocks: int, block_size: int, n_layers: int, dtype) -> StageLatentCache:
        """This stage's share of an engine cache of `n_layers` layers (lockstep's `attach` and
        `worker_loop` call this when the model has it): its own layers, and on stage 0 the MTP
        layers (index num_hidden_layers + k) the engine's cache includes."""
        ids = list(self.layer_ids)
        if self.first:
            ids += range(self.config.num_hidden_layers, n_layers)
        return StageLatentCache(self.config, num_blocks, block_size, n_layers, ids, dtype,
                                next(self.parameters()).device)

    def local_name(self, name: str) -> str | None:
        """A model-wide dsv3 tensor name -> this stage's name for it (None: another stage's)."""
        if name.startswith("layers."):
            i, rest = name[len("layers."):].split(".", 1)
            i = int(i)
            return f"layers.{i - self.layer_ids.start}.{rest}" if i in self.layer_ids else None
        return name if self.first else None  # embed / norm / head / mtp.*


def _read_stage(path: str, stage: PipelineStage, dtype: torch.dtype) -> tuple[dict, int]:
    """This stage's state dict from the checkpoint folder (names and shapes checked as dsv3.load_model
    does); tensors of other stages are skipped without being read. Returns (state dict, bytes read)."""
    # the shard-only reader (FP8 dequantized) and its walk over the checkpoint's names
    from dsv3.parallel.tensor import _check_unexpected, _Reader, _targets, _weight_map

    cfg = stage.config
    expected = stage.state_dict()
    files = _weight_map(path)
    reader = _Reader(files)
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, set] = {}
    unexpected = []
    try:
        for name, ds, e in _targets(files, cfg, unexpected):
            local = stage.local_name(ds)
            if local is None:
                continue  # another stage's tensor: never read
            if local not in expected:
                unexpected.append(name)
                continue
            ref = expected[local]
            tdtype = torch.float32 if local.endswith("gate.bias") else dtype  # as dsv3.load_model
            t = reader.read(name)
            want = tuple(ref.shape[1:]) if e is not None else tuple(ref.shape)
            if tuple(t.shape) != want:
                raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(t.shape)}, model {want} (dsv3 {ds}); "
                                 f"does config.json match the weights?")
            if e is None:
                out[local] = t.to(tdtype)
                continue
            if not 0 <= e < ref.shape[0]:
                unexpected.append(name)
                continue
            if local not in out:
                out[local] = torch.empty(ref.shape, dtype=tdtype)
                experts[local] = set()
            out[local][e].copy_(t)
            experts[local].add(e)
    finally:
        reader.close()
    _check_unexpected(path, unexpected)
    missing = [k for k in expected if k not in out and not (k == "head.weight" and cfg.tie_word_embeddings)]
    missing += [f"{k} experts {sorted(set(range(expected[k].shape[0])) - got)[:8]}" for k, got in experts.items()
                if len(got) != expected[k].shape[0]]
    if missing:
        raise ValueError(f"missing tensors in {path} (pipeline stage {stage.stage}): {', '.join(missing[:8])}")
    return out, reader.bytes_read


def load_stage(path, group=None, dtype: torch.dtype = torch.bfloat16, device="cpu") -> PipelineStage:
    """This rank's pipeline stage of the checkpoint folder `path`: the stage is this rank's index in
    `group` (None: the world), the number of stages the group's size. Builds the stage on the meta
    device and reads only its tensors. `bytes_read` on the result says how much was read."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a checkpoint folder")
    cfg = ModelConfig.from_hf(path)
    ranges = stage_ranges(cfg.num_hidden_layers, dist.get_world_size(group))
    with torch.device("meta"):
        stage = PipelineStage(cfg, ranges, dist.get_rank(group), group)
    sd, nbytes = _read_stage(path, stage, dtype)
    if cfg.tie_word_embeddings and stage.first:
        sd["head.weight"] = sd["embed.weight"]
    stage.load_state_dict(sd, assign=True, strict=True)
    if cfg.tie_word_embeddings and stage.first:
        stage.head.weight = stage.embed.weight
    stage.rotary.reset()
    stage = stage.to(device).eval().requires_grad_(False)
    stage.bytes_read = nbytes
    return stage
