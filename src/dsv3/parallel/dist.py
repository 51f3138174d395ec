"""Process groups for dp x ep x tp x pp under torchrun, and the entry points the CLI commands call.

Rank layout (row-major, tp fastest):  rank = ((pp_i * dp + dp_i) * ep + ep_i) * tp + tp_i.
tp innermost keeps a tensor-parallel group inside a node (its all-reduces sit on every layer);
ep next, as DeepSeek-V3 keeps each group of experts inside one node (§3.2.2).

Groups (every rank belongs to exactly one of each kind):
- tp:    the tensor-parallel ranks (inference);
- ep:    the expert-parallel ranks: they share the experts of a layer between them;
- dp:    the ranks holding the SAME expert shard (replicas): expert gradients are averaged here;
- dense: dp x ep ranks: each has its own slice of the batch, so the non-expert parameters are
         data-parallel over all of them (EP borrows its ranks from data parallelism, as in the
         paper's training: EP64 spans the DP ranks of 8 nodes);
- pp:    the pipeline stages (schedules live in dsv3.parallel.pipeline).

Integration for the commands (train / generate / serve):

    from dsv3.parallel.dist import add_parallel_arguments, setup_parallel, init_parallel
    add_parallel_arguments(parser)                 # in configure(): --dp --ep --tp --pp --fp8-dispatch --dp-mode
    # training (the model is built/loaded in full on every rank first):
    ctx = setup_parallel(args, model)              # process groups + EP + FSDP2/replicated DP
    model = ctx.model
    tokens = ctx.local_batch(global_tokens)        # this rank's slice of the global batch
    loss.backward(); ctx.reduce_gradients(); ctx.clip_grad_norm_(1.0); opt.step()
    loads = ctx.global_loads(local_counts)         # before bias_update
    # inference: each rank reads only its shard of the checkpoint
    ctx = init_parallel(args); model = ctx.load_model(path, dtype)
    ...; ctx.destroy()
Under plain `python` (no torchrun, all sizes 1) the context is a single-process no-op.
"""
import argparse
import os
import socket
import tempfile
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["ParallelContext", "add_parallel_arguments", "init_parallel", "setup_parallel", "run_local",
           "free_port"]

AXES = ("pp", "dp", "ep", "tp")


def add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("parallelism (run under torchrun; world size = dp * ep * tp * pp)")
    g.add_argument("--dp", type=int, default=None,
                   help="data-parallel replicas of each expert shard (default: what is left of the world size)")
    g.add_argument("--ep", type=int, default=1, help="expert-parallel ranks: routed experts are sharded over them")
    g.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks (inference only): heads, FFN columns, vocabulary, experts split")
    g.add_argument("--pp", type=int, default=1, help="pipeline stages")
    # default None (= fsdp) so that a command can tell an explicit --dp-mode from the default
    # (dsv3 train --pp refuses an explicit fsdp: its stages are always replicated over dp)
    g.add_argument("--dp-mode", choices=("fsdp", "replicate"), default=None,
                   help="fsdp (default): FSDP2 fully_shard of the parameters; replicate: full copies, gradients "
                        "all-reduced (the only mode under --pp)")
    g.add_argument("--fp8-dispatch", action="store_true",
                   help="send MoE dispatch activations as E4M3 1x128 tiles (combine stays in the activation dtype)")
    g.add_argument("--dist-backend", choices=("auto", "gloo", "nccl"), default="auto",
                   help="torch.distributed backend (auto: nccl on CUDA, gloo on CPU)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ParallelContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sizes: dict = field(default_factory=lambda: dict.fromkeys(AXES, 1))
    coords: dict = field(default_factory=lambda: dict.fromkeys(AXES, 0))
    groups: dict = field(default_factory=dict)  # "tp" | "ep" | "dp" | "dense" | "pp" -> ProcessGroup
    fp8_dispatch: bool = False
    dp_mode: str = "fsdp"
    pp_schedule: str = "1f1b"  # dsv3.parallel.schedules.KINDS (dsv3 train --pp-schedule)
    model: torch.nn.Module | None = None
    data_parallel: object = None

    # ---- sizes, ranks, groups ----
    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def size(self, axis: str) -> int:
        return self.sizes[axis]

    def group(self, name: str):
        return self.groups.get(name)

    @property
    def data_size(self) -> int:
        """Ranks with distinct data (the dense data-parallel degree dp * ep)."""
        return self.sizes["dp"] * self.sizes["ep"]

    @property
    def data_rank(self) -> int:
        return self.coords["dp"] * self.sizes["ep"] + self.coords["ep"]

    # ---- training helpers ----
    def local_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice (dim 0) of a global batch that every rank holds."""
        n = self.data_size
        if batch.shape[0] % n:
            raise ValueError(f"global batch of {batch.shape[0]} rows does not split over {n} data-parallel "
                             f"ranks (dp={self.sizes['dp']} x ep={self.sizes['ep']})")
        b = batch.shape[0] // n
        return batch[self.data_rank * b:(self.data_rank + 1) * b]

    def global_loads(self, local_counts: torch.Tensor) -> torch.Tensor:
        from dsv3.parallel.expert import global_expert_loads
        return global_expert_loads(local_counts, self.groups.get("dense")) if self.data_size > 1 \
            else local_counts.detach().clone()

    def mean(self, value: torch.Tensor | float) -> torch.Tensor:
        """Mean of a scalar over the data-parallel ranks (for logging the global loss)."""
        t = torch.as_tensor(value, dtype=torch.float64).detach().clone()
        if self.data_size > 1:
            dist.all_reduce(t, group=self.groups["dense"])
            t /= self.data_size
        return t

    def parallelize(self, model: torch.nn.Module, dp_mode: str | None = None) -> torch.nn.Module:
        """Training: shard experts over ep, then data parallelism (FSDP2 or replicated) over the rest."""
        from dsv3.parallel.data import data_parallel
        from dsv3.parallel.expert import apply_expert_parallel

        if self.sizes["tp"] > 1:
            raise ValueError("tensor parallelism is implemented for inference only (the paper trains without "
                             "TP); use --dp/--ep/--pp for training")
        if self.sizes["ep"] > 1:
            apply_expert_parallel(model, self.groups.get("ep"), fp8_dispatch=self.fp8_dispatch)
        if self.data_size > 1:
            self.data_parallel = data_parallel(model, self, mode=dp_mode or self.dp_mode)
        self.model = model
        return model

    def reduce_gradients(self):
        if self.data_parallel is not None:
            self.data_parallel.reduce_gradients()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        if self.data_parallel is not None:
            return self.data_parallel.clip_grad_norm_(max_norm)
        return torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None],
                                              max_norm)

    # ---- inference ----
    def load_model(self, path, dtype: torch.dtype = torch.bfloat16, phy2log: torch.Tensor | None = None):
        """Inference: each rank reads only its shard of the HF checkpoint (tp: heads / columns /
        vocabulary / experts; ep: its experts, or its physical replicas under an EPLB placement
        `phy2log`). Under ep > 1 every rank must run the same number of forwards (the MoE layers
        all-to-all): give all ranks the same batch, or let an idle rank forward a dummy one."""
        from dsv3.parallel.tensor import load_parallel_model
        self.model = load_parallel_model(path, tp_group=self.groups.get("tp") if self.sizes["tp"] > 1 else None,
                                         ep_group=self.groups.get("ep") if self.sizes["ep"] > 1 else None,
                                         dtype=dtype, device=self.device, fp8_dispatch=self.fp8_dispatch,
                                         phy2log=phy2log if self.sizes["ep"] > 1 else None)
        return self.model

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def destroy(self):
        if dist.is_initialized():
            dist.destroy_process_group()


def _subgroups(sizes: dict, vary: tuple[str, ...]) -> list[list[int]]:
    """All rank lists that differ only along the `vary` axes (the layout of the module docstring)."""
    import itertools
    fixed = [a for a in AXES if a not in vary]
    out = []
    for fix in itertools.product(*(range(sizes[a]) for a in fixed)):
        c = dict(zip(fixed, fix))
        ranks = []
        for var in itertools.product(*(range(sizes[a]) for a in vary)):
            c.update(zip(vary, var))
            r = 0
            for a in AXES:
                r = r * sizes[a] + c[a]
            ranks.append(r)
        out.append(sorted(ranks))
    return out


def build_groups(ctx: ParallelContext) -> None:
    """Creates every group on every rank (new_group is collective), keeps the ones this rank is in."""
    kinds = {"tp": ("tp",), "ep": ("ep",), "dp": ("dp",), "dense": ("dp", "ep"), "pp": ("pp",)}
    for name, vary in kinds.items():
        for ranks in _subgroups(ctx.sizes, vary):
            g = dist.new_group(ranks) if len(ranks) < ctx.world else dist.group.WORLD
            if ctx.rank in ranks:
                ctx.groups[name] = g


def init_parallel(args=None, *, dp=None, ep=1, tp=1, pp=1, fp8_dispatch=False, dp_mode="fsdp",
                  backend="auto", pp_schedule="1f1b") -> ParallelContext:
    """Reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), initialises the
    default process group if needed and builds the sub-groups."""
    if args is not None:
        dp, ep, tp, pp = args.dp, args.ep, args.tp, args.pp
        fp8_dispatch, dp_mode = args.fp8_dispatch, args.dp_mode
        backend = getattr(args, "dist_backend", "auto")
        pp_schedule = getattr(args, "pp_schedule", None) or "1f1b"
    dp_mode = dp_mode or "fsdp"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    for name, v in (("ep", ep), ("tp", tp), ("pp", pp)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"--{name} must be a positive integer, got {v!r}")
    rest = ep * tp * pp
    if dp is None:
        if world % rest:
            raise ValueError(f"world size {world} is not divisible by ep*tp*pp = {ep}*{tp}*{pp}")
        dp = world // rest
    if dp < 1 or dp * rest != world:
        raise ValueError(f"dp*ep*tp*pp = {dp}*{ep}*{tp}*{pp} = {dp * rest} does not match the world size "
                         f"{world} (launch with torchrun --nproc-per-node {dp * rest}, or change the sizes)")
    if tp > 1 and ep > 1:
        raise ValueError("--tp and --ep together are not supported: under TP the experts are already split "
                         "over the TP ranks")
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    ctx = ParallelContext(rank=rank, world=world, local_rank=local_rank, device=device,
                          sizes=dict(pp=pp, dp=dp, ep=ep, tp=tp), fp8_dispatch=fp8_dispatch, dp_mode=dp_mode,
                          pp_schedule=pp_schedule)
    r = rank
    for a in reversed(AXES):
        ctx.coords[a] = r % ctx.sizes[a]
        r //= ctx.sizes[a]
    if world > 1:
        if not dist.is_initialized():
            be = ("nccl" if use_cuda else "gloo") if backend == "auto" else backend
            dist.init_process_group(be, rank=rank, world_size=world,
                                    device_id=device if use_cuda else None)
        build_groups(ctx)
    return ctx


def setup_parallel(args, model: torch.nn.Module | None = None) -> ParallelContext:
    """init_parallel(args) and, when a model is given, ctx.parallelize(model) (training); ctx.model is the
    model to use from then on."""
    ctx = init_parallel(args)
    if model is not None:
        ctx.parallelize(model.to(ctx.device))
    return ctx


# ----------------------------------------------------------------------------- local launcher

def _entry(rank, world, port, fn, args, outdir, threads, init):
    # the environment torchrun would set, so init_parallel() can also do the initialisation itself
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    if init:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(outdir, f"{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local(fn, world: int, *args, threads: int = 1, start_method: str = "fork", init: bool = True):
    """Runs fn(rank, world, *args) in `world` CPU processes joined by gloo (for tests and benchmarks)
    and returns the list of per-rank return values. "fork" (the default) skips re-importing torch
    in every child, which dominates on a small machine; the children use one intra-op thread each,
    as DataLoader workers do, the usual guard for forking a process that has run torch ops.
    "spawn" starts fresh interpreters (fn must then be importable by name). init=False leaves the
    process group to fn (torchrun's environment variables are set)."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_entry, args=(world, free_port(), fn, args, d, threads, init), nprocs=world, join=True,
                           start_method=start_method)
        return [torch.load(os.path.join(d, f"{r}.pt"), weights_only=False) for r in range(world)]
