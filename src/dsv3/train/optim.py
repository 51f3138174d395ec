"""Optimizer and schedules of the DeepSeek-V3 pre-training recipe (paper §4.2), scaled to a budget.

The paper states its schedules in tokens of a 14.8T-token run. Here every schedule takes a
progress counter `step` and a budget `total_steps` and places the paper's boundaries at the same
fractions of the budget. The counter is unit-agnostic: pass optimizer steps, or pass tokens consumed
with `total_steps` the token budget to follow the paper literally while the batch size ramps
(then `warmup_steps` is in tokens too).

Gradient clipping (paper: max norm 1.0) is `torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)`
called by the trainer between backward and `optimizer.step()`; nothing to add here.
"""

import math
from types import MappingProxyType

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "PAPER",
    "build_optimizer",
    "fused_supported",
    "param_groups",
    "lr_at",
    "LRSchedule",
    "build_lr_scheduler",
    "batch_size_at",
    "mtp_weight_at",
    "gamma_at",
]

# Paper §4.2, as fractions of the 14.8T-token run (T = 1e12 tokens). Read-only: the defaults below read it.
PAPER = MappingProxyType({
    "max_lr": 2.2e-4,
    "warmup_steps": 2000,
    "constant_until": 10.0 / 14.8,  # constant max lr until 10T tokens
    "decay_until": 14.3 / 14.8,  # cosine decay over the next 4.3T tokens
    "tail_switch_at": (14.3 + 0.333) / 14.8,  # 2.2e-5 for 333B tokens, then 7.3e-6 for the last 167B
    "min_lr_fraction": 2.2e-5 / 2.2e-4,  # = 0.1: cosine end and first tail stage
    "last_lr_fraction": 7.3e-6 / 2.2e-4,  # ~0.0332: last tail stage
    "batch_start": 3072,
    "batch_end": 15360,
    "batch_ramp_until": 0.469 / 14.8,  # batch size ramps over the first 469B tokens
    "mtp_early": 0.3,
    "mtp_late": 0.1,
    "mtp_switch_at": 10.0 / 14.8,  # lambda 0.3 for the first 10T tokens, 0.1 for the remaining 4.8T
    "gamma": 0.001,
    "gamma_stop_at": 14.3 / 14.8,  # bias update speed 0.001 for 14.3T tokens, 0 for the last 500B
    "alpha": 0.0001,  # sequence-wise balance loss factor (§4.2)
    "weight_decay": 0.1,
    "betas": (0.9, 0.95),
    "grad_clip": 1.0,
})


def _is_norm(module: nn.Module) -> bool:
    # Covers torch's LayerNorm/RMSNorm/GroupNorm and dsv3's own RMSNorm class by name.
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)) or type(module).__name__.endswith("Norm")


def _is_embedding(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding) or type(module).__name__.endswith("Embedding")


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = True) -> list[dict]:
    """Split the trainable parameters into a decayed and a non-decayed AdamW group.

    No decay for norm weights, biases and every parameter with fewer than 2 dims: decaying the
    gains of RMSNorm pulls them toward 0 and rescales activations, the usual exclusion (Megatron-LM,
    nanoGPT). Embeddings ARE decayed by default: the paper gives one weight decay (0.1) with no
    exclusion list, and Megatron-LM, the closest public relative of DeepSeek's HAI-LLM trainer,
    decays its embedding table like any matrix; `decay_embeddings=False` turns that off.
    Only `named_parameters` are visited, so buffers (the gate's `e_score_correction_bias`, which
    `bias_update` drives, RoPE tables) never enter the optimizer; frozen parameters are skipped too.
    """
    decay, no_decay = [], []
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue  # tied weights are registered once, under the first module that owns them
            seen.add(id(p))
            if p.dim() < 2 or _is_norm(module) or name == "bias":
                no_decay.append(p)
            elif _is_embedding(module) and not decay_embeddings:
                no_decay.append(p)
            else:
                decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def fused_supported(params) -> bool:
    """Whether torch's fused AdamW kernel takes every one of these parameters: plain floating-point
    tensors on a device type with fused optimizer kernels (CPU included). Not FSDP2's DTensor
    parameters: the fused kernel takes each parameter's `step` counter with it, a plain tensor that
    DTensor refuses to mix with sharded ones ("got mixed torch.Tensor and DTensor"), so sharded
    runs keep foreach. Not meta tensors either (models built only to read the parameter order)."""
    from torch.distributed.tensor import DTensor
    try:  # a private torch helper (torch is pinned); without it, foreach, which always works
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:
        return False

    devices = set(_get_fused_kernels_supported_devices())
    return all(not isinstance(p, DTensor) and p.device.type in devices and torch.is_floating_point(p)
               for p in params)


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    decay_embeddings: bool = True,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW as in the paper §4.2 (beta1 0.9, beta2 0.95, weight decay 0.1), grouped by `param_groups`.

    `fused`: torch's single-kernel AdamW (one pass over each parameter's weights, gradient and both
    moments; the default optimizer of transformers' Trainer), or False for the multi-tensor
    `foreach` implementation (several elementwise passes per step), its slow twin: the same update,
    equal up to fp32 rounding (tests/test_optim.py). None: fused wherever every parameter allows it
    (`fused_supported`), foreach otherwise. The state (step, exp_avg, exp_avg_sq per parameter) has
    the same format either way; note that `load_state_dict` restores the saved groups' flags, so a
    checkpoint written by a foreach optimizer resumes with foreach (bitwise the run it was)."""
    if not lr > 0:
        raise ValueError(f"build_optimizer: lr must be positive, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"build_optimizer: weight_decay must be >= 0, got {weight_decay}")
    if not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"build_optimizer: betas must lie in [0, 1), got {betas}")
    groups = param_groups(model, weight_decay, decay_embeddings)
    if not groups:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    params = [p for g in groups for p in g["params"]]
    if fused is None:
        fused = fused_supported(params)
    elif fused and not fused_supported(params):
        raise ValueError("build_optimizer: fused=True needs plain (not DTensor) floating-point parameters on a "
                         "device with fused optimizer kernels (cpu, cuda, ...); pass fused=None to fall back to "
                         "foreach")
    # Without `fused`, torch picks foreach by itself (what this function built before fused became
    # the default, so those groups and these are the same optimizer).
    extra = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **extra)


def _boundary(fraction: float, total_steps: int | float) -> float:
    """fraction * total_steps, snapped to the integer it is meant to be: fractions are not exact
    in binary (0.07 * 100 = 7.000000000000001), and a boundary one ulp above an integer step would
    keep that step in the previous stage."""
    b = fraction * total_steps
    r = round(b)
    return float(r) if abs(b - r) <= 1e-9 * max(1.0, abs(b)) else b


def _check_fraction(fn: str, name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{fn}: {name} must be a fraction in [0, 1], got {value}")


def _check_progress(fn: str, step: int | float, total_steps: int | float) -> None:
    if not total_steps > 0:
        raise ValueError(f"{fn}: total_steps must be positive, got {total_steps}")
    if step < 0:
        raise ValueError(f"{fn}: step must be >= 0, got {step}")


def _check_lr_schedule(
    total_steps, warmup_steps, constant_until, decay_until, tail_switch_at, min_lr_fraction, last_lr_fraction
) -> None:
    fn = "lr schedule"
    _check_progress(fn, 0, total_steps)
    for name, v in [
        ("constant_until", constant_until),
        ("decay_until", decay_until),
        ("tail_switch_at", tail_switch_at),
        ("min_lr_fraction", min_lr_fraction),
        ("last_lr_fraction", last_lr_fraction),
    ]:
        _check_fraction(fn, name, v)
    if not constant_until <= decay_until <= tail_switch_at:
        raise ValueError(
            f"{fn}: need constant_until <= decay_until <= tail_switch_at, got "
            f"{constant_until}, {decay_until}, {tail_switch_at}"
        )
    if not 0 <= warmup_steps <= _boundary(constant_until, total_steps):
        raise ValueError(
            f"{fn}: warmup_steps={warmup_steps} must lie in [0, constant_until * total_steps = "
            f"{constant_until * total_steps:g}] so the warmup ends before the decay starts"
        )


def _lr_factor(
    step, total_steps, warmup_steps, constant_until, decay_until, tail_switch_at, min_lr_fraction, last_lr_fraction
) -> float:
    if step < warmup_steps:
        # `step` is the index of the optimizer step the lr is used for, so step 0 already gets
        # 1/warmup of the peak (a 0 lr would waste the first update) and step warmup-1 gets the peak.
        return (step + 1) / warmup_steps
    constant_end = _boundary(constant_until, total_steps)
    decay_end = _boundary(decay_until, total_steps)
    if step < constant_end:
        return 1.0
    if step < decay_end:
        progress = (step - constant_end) / (decay_end - constant_end)
        return min_lr_fraction + (1.0 - min_lr_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if step < _boundary(tail_switch_at, total_steps):
        return min_lr_fraction
    return last_lr_fraction  # also past the budget: training that overruns keeps the final lr


def lr_at(
    step: int | float,
    total_steps: int | float,
    max_lr: float,
    warmup_steps: int | float,
    constant_until: float = PAPER["constant_until"],
    decay_until: float = PAPER["decay_until"],
    tail_switch_at: float = PAPER["tail_switch_at"],
    min_lr_fraction: float = PAPER["min_lr_fraction"],
    last_lr_fraction: float = PAPER["last_lr_fraction"],
) -> float:
    """Learning rate for optimizer step `step` (0-based), paper §4.2 scaled to `total_steps`:
    linear warmup to max_lr over warmup_steps, constant until constant_until, cosine decay to
    min_lr_fraction * max_lr by decay_until, constant min_lr_fraction * max_lr until
    tail_switch_at, then constant last_lr_fraction * max_lr."""
    _check_lr_schedule(
        total_steps, warmup_steps, constant_until, decay_until, tail_switch_at, min_lr_fraction, last_lr_fraction
    )
    _check_progress("lr_at", step, total_steps)
    if not max_lr > 0:
        raise ValueError(f"lr_at: max_lr must be positive, got {max_lr}")
    return max_lr * _lr_factor(
        step, total_steps, warmup_steps, constant_until, decay_until, tail_switch_at, min_lr_fraction, last_lr_fraction
    )


class LRSchedule:
    """The `lr_at` schedule as a LambdaLR multiplier (the optimizer's lr is the peak). A callable
    object rather than a closure because LambdaLR saves and restores callable objects' __dict__
    in its state_dict, so a resumed run gets back the very schedule it was trained with."""

    def __init__(
        self,
        total_steps: int | float,
        warmup_steps: int | float,
        constant_until: float = PAPER["constant_until"],
        decay_until: float = PAPER["decay_until"],
        tail_switch_at: float = PAPER["tail_switch_at"],
        min_lr_fraction: float = PAPER["min_lr_fraction"],
        last_lr_fraction: float = PAPER["last_lr_fraction"],
    ):
        _check_lr_schedule(
            total_steps, warmup_steps, constant_until, decay_until, tail_switch_at, min_lr_fraction, last_lr_fraction
        )
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.constant_until = constant_until
        self.decay_until = decay_until
        self.tail_switch_at = tail_switch_at
        self.min_lr_fraction = min_lr_fraction
        self.last_lr_fraction = last_lr_fraction

    def __call__(self, step: int) -> float:
        assert step >= 0, step
        return _lr_factor(
            step,
            self.total_steps,
            self.warmup_steps,
            self.constant_until,
            self.decay_until,
            self.tail_switch_at,
            self.min_lr_fraction,
            self.last_lr_fraction,
        )


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, **fractions: float
) -> LambdaLR:
    """LambdaLR over `LRSchedule`; every group's lr at construction is its peak. Call
    `scheduler.step()` after each `optimizer.step()`; `state_dict()`/`load_state_dict()` restore it."""
    return LambdaLR(optimizer, LRSchedule(total_steps, warmup_steps, **fractions))


def batch_size_at(
    step: int | float,
    total_steps: int | float,
    start: int = PAPER["batch_start"],
    end: int = PAPER["batch_end"],
    ramp_until: float = PAPER["batch_ramp_until"],
    multiple_of: int = 1,
) -> int:
    """Batch size (sequences) for `step`: linear ramp from `start` to `end` over the first
    `ramp_until` of the budget, then `end` (paper §4.2: 3072 -> 15360 over the first 469B tokens;
    the paper does not give the ramp's shape, linear is our choice). Rounded down to a multiple of
    `multiple_of` (e.g. micro-batch x data-parallel size), so it never decreases."""
    _check_progress("batch_size_at", step, total_steps)
    _check_fraction("batch_size_at", "ramp_until", ramp_until)
    if not 0 < start <= end:
        raise ValueError(f"batch_size_at: need 0 < start <= end, got start={start}, end={end}")
    if multiple_of <= 0 or start % multiple_of or end % multiple_of:
        raise ValueError(
            f"batch_size_at: start={start} and end={end} must be multiples of multiple_of={multiple_of} (> 0)"
        )
    ramp = _boundary(ramp_until, total_steps)
    if step >= ramp:
        return end
    size = start + (end - start) * step / ramp
    return max(start, int(size // multiple_of) * multiple_of)


def mtp_weight_at(
    step: int | float,
    total_steps: int | float,
    early: float = PAPER["mtp_early"],
    late: float = PAPER["mtp_late"],
    switch_at: float = PAPER["mtp_switch_at"],
) -> float:
    """MTP loss weight lambda (paper §4.2): `early` before `switch_at` of the budget, `late` after."""
    _check_progress("mtp_weight_at", step, total_steps)
    _check_fraction("mtp_weight_at", "switch_at", switch_at)
    return early if step < _boundary(switch_at, total_steps) else late


def gamma_at(
    step: int | float,
    total_steps: int | float,
    gamma: float = PAPER["gamma"],
    stop_at: float = PAPER["gamma_stop_at"],
) -> float:
    """Bias update speed (paper §4.2): `gamma` before `stop_at` of the budget, then 0 (bias frozen)."""
    _check_progress("gamma_at", step, total_steps)
    _check_fraction("gamma_at", "stop_at", stop_at)
    return gamma if step < _boundary(stop_at, total_steps) else 0.0
