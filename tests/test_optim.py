"""Optimizer and schedules against the DeepSeek-V3 paper §4.2 numbers.

The paper's run is 14.8T tokens; with total_steps = 14800 one step stands for 1B tokens, so the
paper's boundaries fall on integer steps: constant lr until 10T (step 10000), cosine to 2.2e-5 by
14.3T (step 14300), 2.2e-5 for 333B tokens (until step 14633), then 7.3e-6; batch size 3072 -> 15360
over the first 469B tokens; MTP lambda 0.3 -> 0.1 at 10T; gamma 0.001 -> 0 for the last 500B.
"""

import io
import math

import pytest
import torch
from torch import nn

from dsv3.train.optim import (
    PAPER,
    LRSchedule,
    batch_size_at,
    build_lr_scheduler,
    build_optimizer,
    gamma_at,
    lr_at,
    mtp_weight_at,
)

N = 14800  # steps = billions of tokens of the paper's run
MAX = 2.2e-4


class RMSNorm(nn.Module):  # stands in for dsv3.model.norm.RMSNorm (matched by class name)
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class Gate(nn.Module):
    def __init__(self, dim, n_experts):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_experts, dim))
        # V3 keeps the routing bias as a buffer: driven by bias_update, never by the optimizer
        self.register_buffer("e_score_correction_bias", torch.zeros(n_experts, dtype=torch.float32))


class Tiny(nn.Module):
    def __init__(self, vocab=32, dim=8, n_experts=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn_norm = RMSNorm(dim)
        self.ln = nn.LayerNorm(dim)  # weight and bias
        self.torch_norm = nn.RMSNorm(dim)
        self.wq = nn.Linear(dim, dim, bias=True)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.gate = Gate(dim, n_experts)
        self.scale = nn.Parameter(torch.ones(dim))  # a bare 1-D parameter
        self.frozen = nn.Parameter(torch.ones(dim, dim), requires_grad=False)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.tied = nn.Linear(dim, vocab, bias=False)
        self.tied.weight = self.embed.weight  # tied weight: must appear once
        self.register_buffer("freqs", torch.randn(dim))


def _ids(params):
    return {id(p) for p in params}


def test_param_groups():
    m = Tiny()
    opt = build_optimizer(m, lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    for g in opt.param_groups:  # paper §4.2 defaults
        assert g["betas"] == (0.9, 0.95) and g["lr"] == 1e-3 and g["eps"] == 1e-8
    decay, no_decay = _ids(groups["decay"]["params"]), _ids(groups["no_decay"]["params"])
    assert decay == _ids([m.embed.weight, m.wq.weight, m.wo.weight, m.gate.weight, m.head.weight])
    assert no_decay == _ids([m.attn_norm.weight, m.ln.weight, m.ln.bias, m.torch_norm.weight, m.wq.bias, m.scale])
    assert not decay & no_decay
    trainable = {id(p) for p in m.parameters() if p.requires_grad}
    assert decay | no_decay == trainable  # every trainable parameter exactly once (tied included once)
    sizes = sum(len(g["params"]) for g in opt.param_groups)
    assert sizes == len(decay) + len(no_decay)
    buffers = _ids(m.buffers())
    assert not buffers & (decay | no_decay)  # e_score_correction_bias, RoPE tables: never optimized
    assert id(m.frozen) not in decay | no_decay


def test_decay_embeddings_switch():
    m = Tiny()
    opt = build_optimizer(m, lr=1e-3, decay_embeddings=False)
    groups = {g["name"]: _ids(g["params"]) for g in opt.param_groups}
    assert id(m.embed.weight) in groups["no_decay"]
    assert id(m.head.weight) in groups["decay"]


def test_adamw_step_decays_only_the_decay_group():
    # With zero gradients Adam's update is 0, so one step leaves only the decoupled weight decay:
    # p <- p * (1 - lr * wd) for the decay group, p unchanged for the rest (Loshchilov & Hutter).
    torch.manual_seed(0)
    m = Tiny()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    bias_before = m.gate.e_score_correction_bias.clone()
    opt = build_optimizer(m, lr=0.01, weight_decay=0.1)
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in m.named_parameters():
        if n in ("embed.weight", "wq.weight", "wo.weight", "gate.weight", "head.weight"):
            torch.testing.assert_close(p.detach(), before[n] * (1 - 0.01 * 0.1), rtol=1e-6, atol=0)
        else:
            assert torch.equal(p.detach(), before[n]), n
    assert torch.equal(m.gate.e_score_correction_bias, bias_before)


def test_build_optimizer_rejects_bad_input():
    with pytest.raises(ValueError, match="lr"):
        build_optimizer(Tiny(), lr=0.0)
    with pytest.raises(ValueError, match="betas"):
        build_optimizer(Tiny(), lr=1e-3, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="trainable"):
        build_optimizer(nn.Linear(2, 2).requires_grad_(False), lr=1e-3)


# --- learning rate --------------------------------------------------------------------------------


def lr(step, **kw):
    return lr_at(step, N, MAX, 2000, **kw)


def test_lr_paper_numbers():
    assert lr(0) == pytest.approx(MAX / 2000)
    assert lr(999) == pytest.approx(MAX / 2)
    assert lr(1999) == MAX  # end of the 2K warmup steps
    assert lr(2000) == MAX and lr(9999) == MAX  # constant until 10T tokens
    assert lr(10000) == pytest.approx(MAX)  # cosine starts at the peak
    assert lr(12150) == pytest.approx((2.2e-4 + 2.2e-5) / 2)  # half-way through 4.3T: mean of the ends
    quarter = 2.2e-5 + (2.2e-4 - 2.2e-5) * 0.5 * (1 + math.cos(math.pi / 4))
    assert lr(10000 + 4300 / 4) == pytest.approx(quarter)
    assert lr(14299) == pytest.approx(2.2e-5, rel=1e-5)
    assert lr(14300) == pytest.approx(2.2e-5)  # 2.2e-5 for the first 333B of the last 500B tokens
    assert lr(14632) == pytest.approx(2.2e-5)
    assert lr(14633) == pytest.approx(7.3e-6)  # then 7.3e-6 for the remaining 167B
    assert lr(N - 1) == pytest.approx(7.3e-6)
    assert lr(N + 50) == pytest.approx(7.3e-6)  # overrunning the budget keeps the final lr


def test_lr_proportions_scale_with_budget():
    # a 1480-step run has the same shape: boundaries at 1000, 1430, 1463.3
    small = [lr_at(s, 1480, 1.0, 20) for s in range(1480)]
    assert small[19] == 1.0 and small[999] == 1.0 and small[1000] == pytest.approx(1.0)
    assert small[1429] > 0.1 and small[1430] == pytest.approx(0.1)
    assert small[1463] == pytest.approx(0.1) and small[1464] == pytest.approx(7.3 / 220)
    assert PAPER["min_lr_fraction"] == pytest.approx(0.1)
    assert PAPER["last_lr_fraction"] * 2.2e-4 == pytest.approx(7.3e-6)


def test_lr_monotone():
    lrs = [lr(s) for s in range(0, N, 7)]
    peak = lrs.index(MAX)
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1 : peak + 1]))  # warmup strictly increases
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :]))  # never increases afterwards
    assert lrs[0] == pytest.approx(MAX / 2000) and min(lrs[peak:]) == pytest.approx(7.3e-6)


def test_lr_custom_fractions_and_validation():
    # no warmup, no tail stages: warmup-free cosine from the start to 0.1
    kw = dict(constant_until=0.0, decay_until=1.0, tail_switch_at=1.0)
    assert lr_at(0, 100, 1.0, 0, **kw) == pytest.approx(1.0)
    assert lr_at(50, 100, 1.0, 0, **kw) == pytest.approx(0.55)
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_at(0, 100, 1.0, 80)  # warmup would overlap the decay (constant ends at ~67.6)
    with pytest.raises(ValueError, match="constant_until <= decay_until"):
        lr_at(0, 100, 1.0, 1, constant_until=0.9, decay_until=0.8)
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, 100, 1.0, 1)
    with pytest.raises(ValueError, match="total_steps"):
        lr_at(0, 0, 1.0, 0)
    with pytest.raises(ValueError, match="min_lr_fraction"):
        LRSchedule(100, 1, min_lr_fraction=1.5)


def _run(opt, sched, steps):
    lrs = []
    for _ in range(steps):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return lrs


def test_scheduler_follows_lr_at_and_round_trips():
    total, warmup, peak = 300, 10, 3e-3
    m = Tiny()
    opt = build_optimizer(m, lr=peak)
    sched = build_lr_scheduler(opt, total, warmup)
    lrs = _run(opt, sched, total)
    for step, group_lrs in enumerate(lrs):  # the lr used by optimizer step k is lr_at(k)
        for value in group_lrs:
            assert value == pytest.approx(lr_at(step, total, peak, warmup), rel=1e-12)

    # interrupt at step 213 (inside the cosine), save through torch.save, resume into a scheduler
    # built with the wrong budget: the restored state must win.
    m1 = Tiny()
    opt1 = build_optimizer(m1, lr=peak)
    sched1 = build_lr_scheduler(opt1, total, warmup)
    _run(opt1, sched1, 213)
    buf = io.BytesIO()
    torch.save({"opt": opt1.state_dict(), "sched": sched1.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    m2 = Tiny()
    opt2 = build_optimizer(m2, lr=peak)
    sched2 = build_lr_scheduler(opt2, 5000, 100, constant_until=0.5)
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    assert sched2.last_epoch == 213
    assert sched2.lr_lambdas[0].total_steps == total and sched2.lr_lambdas[0].warmup_steps == warmup
    assert sched2.lr_lambdas[0].constant_until == PAPER["constant_until"]
    assert _run(opt2, sched2, total - 213) == lrs[213:]


# --- batch size, MTP weight, gamma ----------------------------------------------------------------


def test_batch_size_ramp_paper():
    assert batch_size_at(0, N) == 3072
    assert batch_size_at(469, N) == 15360 and batch_size_at(468, N) < 15360
    assert batch_size_at(234.5, N) == (3072 + 15360) // 2  # linear: half-way is the midpoint
    assert batch_size_at(N - 1, N) == 15360
    sizes = [batch_size_at(s, N) for s in range(0, 600)]
    assert all(isinstance(b, int) for b in sizes)
    assert all(a <= b for a, b in zip(sizes, sizes[1:]))
    assert min(sizes) == 3072 and max(sizes) == 15360


def test_batch_size_multiple_of():
    sizes = [batch_size_at(s, 1000, 8, 64, 0.1, multiple_of=8) for s in range(1000)]
    assert all(b % 8 == 0 for b in sizes)
    assert all(a <= b for a, b in zip(sizes, sizes[1:]))
    assert sizes[0] == 8 and sizes[100] == 64 and sorted(set(sizes)) == list(range(8, 65, 8))
    with pytest.raises(ValueError, match="multiple"):
        batch_size_at(0, 1000, 12, 64, 0.1, multiple_of=8)
    with pytest.raises(ValueError, match="start <= end"):
        batch_size_at(0, 1000, 64, 8, 0.1)


def test_mtp_weight_and_gamma_paper():
    assert mtp_weight_at(0, N) == 0.3 and mtp_weight_at(9999, N) == 0.3
    assert mtp_weight_at(10000, N) == 0.1 and mtp_weight_at(N - 1, N) == 0.1
    assert gamma_at(0, N) == 0.001 and gamma_at(14299, N) == 0.001
    assert gamma_at(14300, N) == 0.0 and gamma_at(N - 1, N) == 0.0
    # proportions on another budget, and custom values
    assert mtp_weight_at(675, 1000) == 0.3 and mtp_weight_at(676, 1000) == 0.1
    assert gamma_at(10, 20, gamma=0.01, stop_at=0.5) == 0.0 and gamma_at(9, 20, gamma=0.01, stop_at=0.5) == 0.01
    # 0.07 * 100 = 7.000000000000001 in binary: step 7 must still be on the boundary's far side
    assert mtp_weight_at(7, 100, switch_at=0.07) == 0.1 and gamma_at(7, 100, stop_at=0.07) == 0.0
    assert mtp_weight_at(6, 100, switch_at=0.07) == 0.3
    assert lr_at(7, 100, 1.0, 0, constant_until=0.07, decay_until=0.07, tail_switch_at=0.07) == pytest.approx(7.3 / 220)
    with pytest.raises(ValueError, match="switch_at"):
        mtp_weight_at(0, 10, switch_at=2.0)


# --- fused AdamW (the default) and its foreach twin ------------------------------------------------


def _adamw_reference(p0, grads, lr, betas, eps, wd):
    """AdamW as Loshchilov & Hutter's Algorithm 2 (decoupled decay) with Adam's bias corrections,
    in float64: the update torch documents for torch.optim.AdamW."""
    p, m, v = p0.double().clone(), torch.zeros_like(p0, dtype=torch.float64), torch.zeros_like(p0, dtype=torch.float64)
    b1, b2 = betas
    for t, g in enumerate(grads, 1):
        g = g.double()
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
    return p


def _train(opt, m, grads):
    for step_grads in grads:
        for p, g in zip(m.parameters(), step_grads):
            p.grad = g.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _grads(m, steps=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g) for p in m.parameters()] for _ in range(steps)]


def test_fused_adamw_is_the_default_and_equals_the_paper_update_and_foreach():
    torch.manual_seed(0)
    m = Tiny()
    init = {n: p.detach().clone() for n, p in m.named_parameters()}
    fused = build_optimizer(m, lr=1e-2, weight_decay=0.1)
    assert all(g["fused"] is True for g in fused.param_groups)  # CPU parameters: the fused kernel
    twin = Tiny()
    twin.load_state_dict(m.state_dict())
    foreach = build_optimizer(twin, lr=1e-2, weight_decay=0.1, fused=False)
    assert all(not g["fused"] and g["foreach"] is None for g in foreach.param_groups)  # as before: torch's pick
    grads = _grads(m)
    _train(fused, m, grads)
    _train(foreach, twin, grads)
    decayed = {"embed.weight", "wq.weight", "wo.weight", "gate.weight", "head.weight"}
    for i, ((name, p), q) in enumerate(zip(m.named_parameters(), twin.parameters())):
        if not p.requires_grad:
            continue
        want = _adamw_reference(init[name], [g[i] for g in grads], 1e-2, (0.9, 0.95), 1e-8,
                                0.1 if name in decayed else 0.0)
        assert (p.detach().double() - want).abs().max() <= 1e-6 * want.abs().max(), name
        assert (p.detach() - q.detach()).abs().max() <= 1e-6 * q.detach().abs().max(), name
        assert not torch.equal(p.detach(), init[name]), name  # it moved
    # the same state format: the fused optimizer's state loads into the foreach one and vice versa
    for key in ("step", "exp_avg", "exp_avg_sq"):
        a = fused.state[m.wq.weight][key]
        b = foreach.state[twin.wq.weight][key]
        assert a.shape == b.shape and a.dtype == b.dtype, key


def test_fused_falls_back_where_it_cannot_run():
    from dsv3.train.optim import fused_supported

    with torch.device("meta"):
        meta = Tiny()
    assert not fused_supported(list(meta.parameters()))
    assert all(not g["fused"] for g in build_optimizer(meta, lr=1e-3).param_groups)  # foreach instead
    with pytest.raises(ValueError, match="fused=True"):
        build_optimizer(meta, lr=1e-3, fused=True)


def test_checkpoints_of_either_implementation_resume_exactly():
    # A checkpoint written before fused became the default (foreach) resumes with foreach, bitwise the
    # run it was; a fused one resumes fused, bitwise too.
    torch.manual_seed(0)
    grads = _grads(Tiny(), steps=6, seed=1)
    for fused in (False, True):
        full = Tiny()
        start = {k: v.clone() for k, v in full.state_dict().items()}
        _train(build_optimizer(full, lr=1e-2, fused=fused), full, grads)
        first = Tiny()
        first.load_state_dict(start)
        opt = build_optimizer(first, lr=1e-2, fused=fused)
        _train(opt, first, grads[:3])
        buf = io.BytesIO()
        torch.save({"opt": opt.state_dict(), "model": first.state_dict()}, buf)
        buf.seek(0)
        saved = torch.load(buf, weights_only=True)
        resumed = Tiny()
        resumed.load_state_dict(saved["model"])
        opt2 = build_optimizer(resumed, lr=1e-2)  # today's default, fused
        opt2.load_state_dict(saved["opt"])
        assert all(bool(g["fused"]) == fused for g in opt2.param_groups)
        _train(opt2, resumed, grads[3:])
        for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
            assert torch.equal(p, q), (fused, name)
