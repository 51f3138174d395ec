"""One engine, many ranks: serving a tensor-, expert- or pipeline-parallel model whose requests reach
rank 0 only (`dsv3 serve --tp/--ep/--pp N`), and `dsv3 generate` with the same flags.

Requests arrive on rank 0 at arbitrary times, and cancellations, text stop strings, sampling and
speculative accept/reject decisions are made there. So rank 0 runs the only Engine (the only
scheduler) and the other ranks follow it in lockstep (the driver/worker split of vLLM's multi-GPU
executor, reduced to what this engine calls). `dsv3 generate` under torchrun takes the same path
(`run_parallel`): one decision maker means the ranks cannot drift apart even where their floating
point results could differ, and MTP speculation works under every layout:

- rank 0: the Engine's model is a `LockstepModel` proxy. It forwards every attribute to the real
  model (config, parameters(), modules(), layers, head, ...) and overrides the three compute entry
  points the engine calls: `hidden`, `logits` and `mtp_hidden`. Before computing, it broadcasts a
  command: the op, the attention implementation currently set on the MLA layers (the engine picks
  naive or absorbed per call), the paged-cache binding (block tables and positions, captured from
  `PagedLatentCache.bind`, re-sent only when it changed) and the op's tensor arguments. Then it runs
  the op locally, so every rank enters the same collectives in the same order.
- other ranks: `worker_loop(model)` builds the same PagedLatentCache (geometry broadcast by
  `attach`), then receives commands, applies binding and impl, runs the op on its shard and drops
  the result (rank 0 has it), until the stop command. (Tensor parallelism needs this replay: every
  rank computes a slice of the same tokens.)

Scheduling, sampling, stop strings and cancellation stay on rank 0: they only decide WHICH forwards
come next, and the workers replay exactly the forwards that come.

Pipeline parallelism (dsv3.parallel.pp_infer): rank 0 holds the first stage (with the embedding,
head and MTP), the workers the later stages. A `hidden` command is replayed like a TP one (every
stage needs the positions and the cache binding); inside it the hidden states travel stage to
stage point to point. The model tells the proxy what differs from TP/EP through two optional
attributes: `lockstep_local_ops` (ops that run on rank 0 alone: a pipeline's `logits` and
`mtp_hidden`, no command is sent) and `latent_cache(num_blocks, block_size, n_layers, dtype)` (the
cache a rank keeps: a stage holds only its own layers' latents; `attach` puts rank 0's share in
place of the engine's full cache, `worker_loop` builds each worker's share).

Expert parallelism needs less (LockstepModel's `replay`): a rank's tokens only affect that rank's
outputs, so the workers run a 1-token dummy forward of each op (same MoE all-to-alls, no cache, no
tensors sent) and just host their experts for rank 0's tokens, and `logits` (a whole head, no
collective) runs on rank 0 alone. Rank 0 computes attention for the whole batch either way: DP
attention (each EP rank scheduling its own requests) would need one engine per rank.

Transport: a fixed-size int64 header goes over a gloo group (`command_group`: CPU, with a long
timeout, because an idle server's workers may wait for hours; with NCCL the workers then block in a
CPU recv instead of spinning a GPU kernel, as vLLM's CPU group does); the tensors themselves go over
the model's group on the model's device. If rank 0's process dies, gloo reports the closed
connection to the workers at once.

Failure: an exception inside an op on rank 0 after its command went out may leave the workers
inside a collective rank 0 never reaches. The proxy then refuses every later call (RuntimeError),
so a server fails its requests instead of computing with misaligned collectives; torchrun ends the
job when a worker exits on the matching error. A worker that fails raises (its process exits).
"""
import atexit
import datetime
import logging
import math
import os
import signal
import threading
import weakref
from typing import Callable

import torch
import torch.distributed as dist

from dsv3.infer.paged import PagedLatentCache

__all__ = ["LockstepModel", "attach", "worker_loop", "command_group", "shutdown", "check_parallel_args",
           "check_serve_args", "run_parallel", "serve_parallel"]

log = logging.getLogger("dsv3.lockstep")

IMPLS = ("auto", "naive", "absorb")  # dsv3.model.mla.MLA.attn_impl
FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
STOP, GEOMETRY, HIDDEN, LOGITS, MTP, CHECK = range(6)
OPS = ("stop", "geometry", "hidden", "logits", "mtp_hidden", "check")
# The header: one int64 tensor of fixed size, the fields (shapes of the payload, so the workers can
# allocate it) then an inline area. A payload that fits rides inside the header: one broadcast per op
# instead of two or three (a broadcast costs its latency, ~0.1-0.3 ms on gloo, whatever its size here).
FIELDS = ("op", "dummy", "impl", "cache", "bind", "tab0", "tab1", "bpos0", "bpos1", "pos_mode", "pos0", "pos1", "tok0",
          "tok1", "h_ndim", "h0", "h1", "h2", "h3", "h_dtype", "depths", "num_blocks", "block_size", "n_layers",
          "cache_dtype", "inline_ints", "inline_h")
_INDEX = {k: i for i, k in enumerate(FIELDS)}
INLINE = 4096  # int64 slots (32 KiB): a decode step's tables/positions/tokens for a few dozen requests
POS_NONE, POS_BOUND, POS_OWN = 0, 1, 2
# an idle server's workers wait in a recv for as long as nobody sends a request
COMMAND_TIMEOUT = datetime.timedelta(days=365)


def _header(fields: dict, inline: list[torch.Tensor] = ()) -> torch.Tensor:
    vals = [0] * len(FIELDS)
    for k, v in fields.items():
        vals[_INDEX[k]] = int(v)
    h = torch.zeros(len(FIELDS) + INLINE, dtype=torch.int64)
    h[:len(FIELDS)] = torch.tensor(vals, dtype=torch.int64)
    off = len(FIELDS)
    for t in inline:  # flat int64 CPU tensors
        h[off:off + t.numel()] = t
        off += t.numel()
    return h


def _as_words(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor's bytes as int64 words (zero-padded), to travel in the header."""
    b = t.contiguous().view(-1).view(torch.uint8)
    pad = -b.numel() % 8
    if pad:
        b = torch.cat([b, b.new_zeros(pad)])
    return b.view(torch.int64)


def command_group(group=None):
    """A gloo group over the ranks of `group` (None: the world) for the command headers. Collective:
    every rank of the WORLD must call it (torch.distributed.new_group)."""
    ranks = sorted(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))
    return dist.new_group(ranks, backend="gloo", timeout=COMMAND_TIMEOUT)


def _mla_modules(model) -> list:
    # the modules the engine switches between naive and absorbed attention (Engine._set_impl)
    return [m for m in model.modules() if hasattr(m, "attn_impl")]


def _head_is_parallel(model) -> bool:
    from dsv3.parallel.tensor import VocabParallelHead

    return any(isinstance(m, VocabParallelHead) for m in model.head.modules())


def _expert_parallel_only(model) -> bool:
    """True when the model's only collectives are the expert-parallel MoE layers (dsv3.parallel.expert):
    then a worker's tokens never influence rank 0's results, only the collectives must line up."""
    from dsv3.parallel import tensor
    from dsv3.parallel.expert import ExpertParallelMoE

    tp_types = (tensor.ColumnParallelLinear, tensor.RowParallelLinear, tensor.VocabParallelEmbedding,
                tensor.VocabParallelHead, tensor.TensorParallelMoE)
    mods = list(model.modules())
    return any(isinstance(m, ExpertParallelMoE) for m in mods) and not any(isinstance(m, tp_types) for m in mods)


class LockstepModel:
    """Rank 0's view of a parallel model: the real model, whose compute calls are replayed by the
    other ranks of `group` (which run worker_loop). `group`: the group spanning every rank of the
    model (the tp or the ep group); this rank must be its rank 0. `cmd_group`: a gloo group over the
    same ranks for the headers (default: `group`; command_group() makes one with a long timeout).

    replay: True: the workers run each forward on rank 0's inputs and cache binding (tensor
    parallelism needs it: every rank computes a slice of the same tokens). False: they run a
    1-token dummy forward of the same op instead (no cache, no tensors sent). That is enough under
    expert parallelism, where a rank's tokens only ever affect that rank's outputs and each MoE
    layer runs the same three all-to-alls whatever the token count (counts, dispatch, combine);
    replaying would make every expert process each of rank 0's tokens once per EP rank and hold
    a full latent cache per rank for nothing. None (default): False exactly when the model's only
    parallel modules are ExpertParallelMoE layers."""

    def __init__(self, model, group=None, cmd_group=None, replay: bool | None = None):
        self._model = model
        self._group = group
        self._cmd = cmd_group if cmd_group is not None else group
        if dist.get_rank(self._group) != 0:
            raise ValueError("LockstepModel runs on rank 0 of its group; the other ranks run worker_loop")
        self._mla = _mla_modules(model)
        self._head_collective = _head_is_parallel(model)
        # ops only rank 0's modules take part in (a pipeline's head and MTP): run without a command
        self._local = frozenset(getattr(model, "lockstep_local_ops", ()))
        self.replay = not _expert_parallel_only(model) if replay is None else bool(replay)
        if not self.replay and self._head_collective:
            raise ValueError("replay=False needs a model whose head has no collective (expert parallelism only)")
        self._device = next(model.parameters()).device
        self._lock = threading.Lock()
        self._cache: PagedLatentCache | None = None
        self._binding = None            # (tables, positions) of the latest cache.bind
        self._bind_version = 0
        self._sent_version = -1
        self._closed = False
        self._broken: str | None = None
        self.commands = 0               # compute commands sent (and run here)
        ref = weakref.ref(self)
        atexit.register(lambda: (p := ref()) is not None and p._stop_at_exit())

    # everything the engine reads that is not a compute entry point: the real model's
    def __getattr__(self, name):
        if name == "_model":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._model, name)

    @property
    def module(self):
        return self._model

    # ------------------------------------------------------------------ wiring
    def attach(self, engine) -> None:
        """Wire an Engine built on this proxy: capture its cache bindings and have the workers build
        the same cache (num_blocks, block_size, layers, dtype). One engine at a time: attaching a new
        one replaces the workers' cache."""
        if engine.model is not self:
            raise ValueError("attach: the engine's model is not this LockstepModel (build the Engine on it)")
        if engine._draft_ids is not None and self._head_collective:
            # Engine reads rows of head.weight by global token id; a vocabulary-parallel head holds one shard
            raise ValueError("draft_vocab is not supported with a tensor-parallel head (each rank holds one "
                             "vocabulary shard); use speculative='mtp' without draft_vocab")
        cache = engine.cache
        dtype = cache.kv.dtype
        if dtype not in FLOATS:
            raise ValueError(f"cache dtype {dtype} is not supported by the lockstep proxy")
        make = getattr(self._model, "latent_cache", None)
        if make is not None and type(cache) is PagedLatentCache:
            # a model holding only some layers (a pipeline stage) keeps only their latents: its share
            # of the engine's cache, same blocks and tables (the engine's full one is dropped here)
            cache = make(cache.num_blocks, cache.block_size, cache.n_layers, dtype)
            engine.cache = cache
        bind = cache.bind

        def bind_and_record(tables, positions):
            bind(tables, positions)
            self._binding = (tables, positions)
            self._bind_version += 1

        cache.bind = bind_and_record  # instance attribute: shadows PagedLatentCache.bind for this cache
        with self._lock:
            self._check_open()
            self._cache, self._binding, self._sent_version = cache, None, -1
            self._send(_header(dict(op=GEOMETRY, dummy=not self.replay, num_blocks=cache.num_blocks,
                                    block_size=cache.block_size, n_layers=cache.n_layers,
                                    cache_dtype=FLOATS.index(dtype))))

    def shutdown(self, timeout: float = 60.0) -> None:
        """Send the stop command (the workers' worker_loop returns). Idempotent. Waits up to `timeout`
        seconds for an op in flight on the engine's thread."""
        if self._closed:
            return
        if not self._lock.acquire(timeout=timeout):
            log.error("lockstep shutdown: an op is still running after %.0f s; the workers are not stopped", timeout)
            return
        try:
            if self._closed:
                return
            self._closed = True
            if self._broken is not None:
                # the workers may be inside a collective of the failed op: a header would not reach them
                # (they fail when this process exits and its connections close)
                log.error("lockstep shutdown after a failed op (%s): workers not stopped cleanly", self._broken)
                return
            self._send(_header(dict(op=STOP)))
        finally:
            self._lock.release()

    def _stop_at_exit(self):
        # the interpreter exits without shutdown() (an exception on rank 0): let the workers go
        if not self._closed and dist.is_initialized():
            try:
                self.shutdown(timeout=5.0)
            except Exception:  # the process group may be half torn down already
                pass

    def check_sync(self) -> list[int]:
        """Compute commands run by each rank of the group (rank 0 first): equal when in lockstep."""
        with self._lock:
            self._check_open()
            self._send(_header(dict(op=CHECK)))
            return _gather_count(self.commands, self._cmd)

    # ------------------------------------------------------------------ compute entry points
    def hidden(self, tokens, positions=None, cache=None):
        return self._run(HIDDEN, lambda: self._model.hidden(tokens, positions, cache), tokens=tokens,
                         positions=positions, cache=cache)

    def logits(self, h):
        # a whole head on rank 0 (EP, PP, or TP = 1): no collective inside
        if not self._head_collective or "logits" in self._local:
            return self._model.logits(h)
        return self._run(LOGITS, lambda: self._model.logits(h), h=h)

    def mtp_hidden(self, h, tokens, positions=None, cache=None, depths=None):
        if depths is not None and tokens.shape[1] < h.shape[1] + depths:  # fail before the workers see it
            raise ValueError(f"MTP depth {depths} needs {h.shape[1] + depths} tokens, got {tokens.shape[1]}")
        if "mtp_hidden" in self._local:  # the MTP modules live on rank 0 alone (pipeline stage 0)
            if cache is not None and cache is not self._cache:
                raise ValueError("the lockstep proxy only runs forwards on the cache of the engine it is attached "
                                 "to (attach(engine) first)")
            return self._model.mtp_hidden(h, tokens, positions, cache, depths)
        return self._run(MTP, lambda: self._model.mtp_hidden(h, tokens, positions, cache, depths), h=h,
                         tokens=tokens, positions=positions, cache=cache, depths=depths)

    # ------------------------------------------------------------------ sending
    def _check_open(self):
        if self._broken is not None:
            raise RuntimeError(f"the parallel model is out of lockstep after a failed {self._broken}; restart the "
                               f"server")
        if self._closed:
            raise RuntimeError("the parallel model was shut down")

    def _send(self, header: torch.Tensor, *tensors: torch.Tensor):
        dist.broadcast(header, group=self._cmd, group_src=0)
        for t in tensors:
            dist.broadcast(t, group=self._group, group_src=0)

    def _run(self, op: int, fn: Callable, h=None, tokens=None, positions=None, cache=None, depths=None):
        with self._lock:
            self._check_open()
            if cache is not None and cache is not self._cache:
                raise ValueError("the lockstep proxy only runs forwards on the cache of the engine it is attached to "
                                 "(attach(engine) first)")
            if cache is not None and positions is None:
                raise ValueError("a cached forward needs explicit positions")
            if not self.replay:  # the op and its depth are all a dummy forward needs
                self._send(_header(dict(op=op, dummy=1, depths=-1 if depths is None else depths)))
                self.commands += 1
                return self._call(op, fn)
            impls = {m.attn_impl for m in self._mla}
            assert len(impls) == 1 and next(iter(impls)) in IMPLS, impls
            kw = dict(op=op, impl=IMPLS.index(impls.pop()), cache=cache is not None,
                      depths=-1 if depths is None else depths)
            ints = []
            if cache is not None:
                if self._binding is None:
                    raise ValueError("a cached forward needs cache.bind(tables, positions) first")
                if self._sent_version != self._bind_version:
                    tables, bpos = self._binding
                    kw.update(bind=1, tab0=tables.shape[0], tab1=tables.shape[1], bpos0=bpos.shape[0],
                              bpos1=bpos.shape[1])
                    ints += [tables, bpos]
            if positions is None:
                kw["pos_mode"] = POS_NONE
            elif cache is not None and positions is self._binding[1]:
                kw["pos_mode"] = POS_BOUND  # the worker passes its bound tensor (the cache checks identity)
            else:
                kw.update(pos_mode=POS_OWN, pos0=positions.shape[0], pos1=positions.shape[1])
                ints.append(positions)
            if tokens is not None:
                kw.update(tok0=tokens.shape[0], tok1=tokens.shape[1])
                ints.append(tokens)
            inline, payload, room = [], [], INLINE
            if ints:
                assert all(t.dtype == torch.int64 and t.dim() == 2 for t in ints)
                flat = torch.cat([t.reshape(-1) for t in ints])
                if flat.numel() <= room:
                    kw["inline_ints"] = 1
                    inline.append(flat.cpu())
                    room -= flat.numel()
                else:
                    payload.append(flat.to(self._device))
            if h is not None:
                assert h.dim() <= 4 and h.dtype in FLOATS, (h.shape, h.dtype)
                kw.update(h_ndim=h.dim(), h_dtype=FLOATS.index(h.dtype), **{f"h{i}": s for i, s in enumerate(h.shape)})
                # inline only from CPU: a GPU tensor is better sent by its own group (NCCL) than copied out
                if h.device.type == "cpu" and -(-h.numel() * h.element_size() // 8) <= room:
                    kw["inline_h"] = 1
                    inline.append(_as_words(h))
                else:
                    payload.append(h.contiguous())
            self._send(_header(kw, inline), *payload)
            if kw.get("bind"):
                self._sent_version = self._bind_version
            self.commands += 1
            return self._call(op, fn)

    def _call(self, op: int, fn: Callable):
        try:
            return fn()
        except BaseException:
            self._broken = OPS[op]
            raise


def _gather_count(n: int, cmd_group) -> list[int]:
    world = dist.get_world_size(cmd_group)
    parts = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(parts, torch.tensor([n], dtype=torch.int64), group=cmd_group)
    return [int(p) for p in parts]


def attach(engine, group=None, cmd_group=None, replay: bool | None = None) -> LockstepModel:
    """Make `engine` (on rank 0) drive its parallel model in lockstep with the other ranks of `group`:
    wraps engine.model in a LockstepModel(model, group, cmd_group, replay) unless it already is one,
    and announces the cache geometry to the workers. Returns the proxy (call .shutdown() when done)."""
    proxy = engine.model
    if not isinstance(proxy, LockstepModel):
        proxy = LockstepModel(proxy, group, cmd_group, replay)
        engine.model = proxy
    proxy.attach(engine)
    return proxy


def shutdown(model_or_engine) -> None:
    """Stop the workers of a LockstepModel, or of the one an engine runs on; a no-op for any other model
    (so a server can call it whether or not it serves in parallel)."""
    m = model_or_engine
    if not isinstance(m, LockstepModel):
        m = getattr(m, "model", None)
    if isinstance(m, LockstepModel):
        m.shutdown()


@torch.no_grad()
def worker_loop(model, group=None, cmd_group=None) -> int:
    """The other ranks: replay rank 0's compute commands on this rank's shard of the model until the
    stop command; returns the number of compute commands run. Exceptions propagate (a worker that
    cannot follow must end its process: rank 0 would otherwise wait in a collective)."""
    cmd = cmd_group if cmd_group is not None else group
    cfg = model.config
    p = next(model.parameters())
    device, dtype = p.device, p.dtype
    mla = _mla_modules(model)
    impl = None
    cache: PagedLatentCache | None = None
    bound = None  # the positions tensor of the current binding (the cache checks its identity)
    n = 0
    header = torch.zeros(len(FIELDS) + INLINE, dtype=torch.int64)
    while True:
        dist.broadcast(header, group=cmd, group_src=0)
        f = dict(zip(FIELDS, header[:len(FIELDS)].tolist()))
        off = len(FIELDS)
        op = f["op"]
        if op == STOP:
            return n
        if op == GEOMETRY:
            make = getattr(model, "latent_cache", None)  # a pipeline stage keeps only its layers' latents
            if f["dummy"]:
                cache = None
            elif make is not None:
                cache = make(f["num_blocks"], f["block_size"], f["n_layers"], FLOATS[f["cache_dtype"]])
            else:
                cache = PagedLatentCache(cfg, f["num_blocks"], f["block_size"], f["n_layers"],
                                         FLOATS[f["cache_dtype"]], device)
            bound = None
            continue
        if op == CHECK:
            _gather_count(n, cmd)
            continue
        assert op in (HIDDEN, LOGITS, MTP), f"unknown lockstep command {op}"
        if f["dummy"]:
            # the same op on one token at position 0, no cache: the same collectives (see LockstepModel)
            d = len(model.mtp) if f["depths"] < 0 else f["depths"]
            if op == HIDDEN:
                model.hidden(torch.zeros(1, 1, dtype=torch.int64, device=device))
            elif op == MTP:
                model.mtp_hidden(torch.zeros(1, 1, cfg.hidden_size, dtype=dtype, device=device),
                                 torch.zeros(1, 1 + d, dtype=torch.int64, device=device), None, None, d)
            else:
                raise AssertionError("a dummy logits command: the head has no collective under replay=False")
            n += 1
            continue
        if IMPLS[f["impl"]] != impl:
            impl = IMPLS[f["impl"]]
            for m in mla:
                m.attn_impl = impl
        shapes = []
        if f["bind"]:
            shapes += [(f["tab0"], f["tab1"]), (f["bpos0"], f["bpos1"])]
        if f["pos_mode"] == POS_OWN:
            shapes.append((f["pos0"], f["pos1"]))
        if op != LOGITS:
            shapes.append((f["tok0"], f["tok1"]))
        ints = []
        if shapes:
            sizes = [a * b for a, b in shapes]
            if f["inline_ints"]:  # copied out: the header buffer is overwritten by the next command
                flat = header[off:off + sum(sizes)].to(device, copy=True)
                off += sum(sizes)
            else:
                flat = torch.empty(sum(sizes), dtype=torch.int64, device=device)
                dist.broadcast(flat, group=group, group_src=0)
            ints = [t.view(s) for t, s in zip(flat.split(sizes), shapes)]
        h = None
        if f["h_ndim"]:
            shape, hdt = [f[f"h{i}"] for i in range(f["h_ndim"])], FLOATS[f["h_dtype"]]
            if f["inline_h"]:
                nbytes = math.prod(shape) * hdt.itemsize
                words = header[off:off - (-nbytes // 8)]
                h = words.view(torch.uint8)[:nbytes].view(hdt).view(shape).to(device, copy=True)
            else:
                h = torch.empty(shape, dtype=hdt, device=device)
                dist.broadcast(h, group=group, group_src=0)
        if f["bind"]:
            assert cache is not None, "a cache binding before the cache geometry"
            tables, bound = ints.pop(0), ints.pop(0)
            cache.bind(tables, bound)
        positions = bound if f["pos_mode"] == POS_BOUND else ints.pop(0) if f["pos_mode"] == POS_OWN else None
        c = cache if f["cache"] else None
        depths = None if f["depths"] < 0 else f["depths"]
        if op == HIDDEN:
            model.hidden(ints[0], positions, c)
        elif op == LOGITS:
            model.logits(h)
        else:
            model.mtp_hidden(h, ints[0], positions, c, depths)
        n += 1


# ---------------------------------------------------------------------------- the commands under torchrun

def check_parallel_args(args, command: str) -> bool:
    """True when `dsv3 <command>` is asked to run in parallel (--tp N, --ep N or --pp N under
    torchrun); ValueError for the layouts the lockstep engine does not run. Reads args.tp/ep/pp
    (--dp is the caller's to check: its meaning differs per command)."""
    tp, ep, pp = getattr(args, "tp", 1), getattr(args, "ep", 1), getattr(args, "pp", 1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for name, v in (("tp", tp), ("ep", ep), ("pp", pp)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"--{name} must be a positive integer, got {v!r}")
    if tp > 1 and ep > 1:
        raise ValueError("--tp and --ep together are not supported: under TP the experts are already split")
    if pp > 1 and (tp > 1 or ep > 1):
        raise ValueError(f"--pp with --{'tp' if tp > 1 else 'ep'} is not supported by dsv3 {command}: a pipeline "
                         f"stage is whole layers on one rank; use --pp alone, or --tp / --ep alone")
    size = tp * ep * pp
    if size == 1:
        if world > 1:
            raise ValueError(f"dsv3 {command} under torchrun ({world} processes) needs --tp {world}, --ep {world}, "
                             f"--pp {world} or --dp {world}")
        return False
    flag = "tp" if tp > 1 else "ep" if ep > 1 else "pp"
    if world != size:
        single = ""
        if flag == "pp" and world == 1:
            what = "serving" if command == "serve" else "inference"
            single = f"pipeline-parallel {what} is not supported in a single process; "
        raise ValueError(f"--{flag} {size}: {single}launch it under torchrun with {size} processes "
                         f"(torchrun --nproc-per-node {size} -m dsv3 {command} ...), got a world size of {world}")
    return True


def check_serve_args(args) -> bool:
    """True when `dsv3 serve` is asked to serve in parallel (--tp N, --ep N or --pp N under torchrun);
    ValueError for what parallel serving does not do. Reads args.dp/ep/tp/pp (dp may be None)."""
    dp = getattr(args, "dp", None)
    if dp not in (None, 1):
        # `dsv3 serve --dp N` is N whole-model replicas (dsv3.infer.replicas.serve_dp), not one lockstep engine
        raise ValueError(f"--dp {dp}: data-parallel serving is whole-model replicas (dsv3.infer.replicas.serve_dp, "
                         f"what `dsv3 serve --dp` runs), not a lockstep engine")
    return check_parallel_args(args, "serve")


def run_parallel(args, fn: Callable[[LockstepModel], int | None]) -> int:
    """A command's parallel run under torchrun (--tp N, --ep N or --pp N, checked by the caller).
    Every rank initialises the process groups and loads only its part of args.model (its TP/EP shard
    with ctx.load_model, or its pipeline stage with dsv3.parallel.pp_infer.load_stage; dtype from
    args.dtype, "auto" = the checkpoint's). Rank 0 calls fn(model) with a LockstepModel: build the
    Engine on it, `attach(engine)`, do the work, return the exit code. The other ranks follow in
    worker_loop until rank 0 returns or raises (the stop command is sent in a finally), then all
    ranks leave the process group. Returns fn's result on rank 0 and 0 elsewhere."""
    from dsv3.config import ModelConfig
    from dsv3.parallel.dist import init_parallel

    if not os.path.isdir(args.model):
        raise ValueError(f"--model {args.model!r} is not a folder")
    cfg = ModelConfig.from_hf(args.model)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    want = getattr(args, "dtype", "auto")
    dtype = dtypes.get(cfg.torch_dtype, torch.float32) if want == "auto" else dtypes[want]
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    pp = getattr(args, "pp", 1)
    if pp > 1:
        from dsv3.parallel.pp_infer import stage_ranges

        stage_ranges(cfg.num_hidden_layers, pp)  # fewer layers than stages: fail before any process group
    ctx = init_parallel(dp=1, ep=args.ep, tp=args.tp, pp=pp, fp8_dispatch=getattr(args, "fp8_dispatch", False),
                        backend=getattr(args, "dist_backend", "auto"))
    try:
        if pp > 1:
            from dsv3.parallel.pp_infer import load_stage

            group = ctx.group("pp")
            model = load_stage(args.model, group, dtype, ctx.device)  # each rank reads only its stage
        else:
            model = ctx.load_model(args.model, dtype).eval()  # each rank reads only its shard
            group = ctx.group("tp") if ctx.sizes["tp"] > 1 else ctx.group("ep")
        cmd = command_group(group)
        if not ctx.is_main:
            # torchrun forwards SIGINT/SIGTERM to every rank; rank 0 drains its requests first (uvicorn's
            # graceful shutdown) and needs the workers until it sends the stop command. A worker still
            # ends when rank 0's process does (its connections close) or on SIGKILL.
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(sig, signal.SIG_IGN)
            n = worker_loop(model, group, cmd)
            log.info("rank %d: lockstep worker stopped after %d forwards", ctx.rank, n)
            return 0
        proxy = LockstepModel(model, group, cmd)
        try:
            return fn(proxy)
        finally:
            proxy.shutdown()
    finally:
        ctx.destroy()


def serve_parallel(args, serve: Callable[[LockstepModel], int | None]) -> int:
    """`dsv3 serve --tp N` / `--ep N` / `--pp N` under torchrun: check_serve_args, then run_parallel
    with serve(model) on rank 0 (it builds the Engine on the LockstepModel, attaches it and runs the
    server)."""
    check_serve_args(args)
    return run_parallel(args, serve)
