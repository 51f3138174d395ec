"""The many-row C kernels of prefill (dsv3/kernels/gemm_cpu.c): the GEMM, the routed experts of many tokens and
MLA attention over decompressed keys, against float64 references written from the formulas; their
invariance to the other rows and to the thread count; where the model takes them, and that prefill with them
gives the logits it gives without them."""
import pytest
import torch

from dsv3.config import preset
from dsv3.kernels import cpu
from dsv3.model.transformer import Transformer
from test_model_twins import random_moe

pytestmark = pytest.mark.skipif(cpu.library() is None,
                                reason=f"CPU kernels unavailable here: {cpu.unavailable_reason()}")
U = 2.0 ** -24  # fp32 unit roundoff


def _bound(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    """|fl(a b^T) - a b^T| <= n u |a| |b|^T (with a margin): an fp32 sum of n products in any order."""
    return 2 * n * U * (a.abs().double() @ b.abs().double().t()) + 1e-30


@pytest.mark.parametrize("M,K,N", [(512, 512, 256), (37, 100, 70), (7, 33, 5), (6, 16, 64), (130, 1408, 129),
                                   (1, 3, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemm_against_float64(M, K, N, dtype):
    """fp32: within the fp32 bound of a dot product. bf16: the exact product of the bf16 values within that
    bound, rounded once to bf16 (half a bf16 spacing, 2^-9 of the value)."""
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    x, w = torch.randn(M, K, generator=g).to(dtype), torch.randn(N, K, generator=g).to(dtype)
    got = cpu.gemm(x, w)
    assert got.shape == (M, N) and got.dtype == dtype
    want = x.double() @ w.double().t()
    tol = _bound(x.float(), w.float(), K) + (2.0 ** -8 * want.abs() if dtype == torch.bfloat16 else 0)
    assert ((got.double() - want).abs() <= tol).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemm_rows_do_not_depend_on_the_other_rows_or_the_threads(dtype):
    """A row's sums run over k in one fixed order whatever the tiling: bitwise the same alone, inside a
    batch, through a row stride, and on 1 or 2 threads."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(50, 300, generator=g).to(dtype)
    x = big[:, 20:276]  # rows 300 apart: the kernel reads the stride, no copy
    w = torch.randn(200, 256, generator=g).to(dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.gemm(x, w)
        alone = torch.cat([cpu.gemm(x[i:i + 1], w) for i in range(x.shape[0])])
        torch.set_num_threads(2)
        two = cpu.gemm(x, w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, alone) and torch.equal(one, two)


def _experts64(x, w1, w3, w2, idx, gw):
    """sum_k gw[t, k] * w2_e (silu(w1_e x_t) * (w3_e x_t)), e = idx[t, k], in float64."""
    x, w1, w3, w2 = x.double(), w1.double(), w3.double(), w2.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            h = torch.nn.functional.silu(w1[e] @ x[t]) * (w3[e] @ x[t])
            out[t] += float(gw[t, k]) * (w2[e] @ h)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_gemm_against_float64_and_the_modules(dtype):
    cfg, moe = random_moe()
    moe = moe.to(dtype)
    ex = moe.experts
    torch.manual_seed(1)
    x = torch.randn(150, cfg.hidden_size).to(dtype)
    with torch.inference_mode():
        w, idx = moe.gate(x)
        got = cpu.moe_gemm(x, ex.w1, ex.w3, ex.w2, idx, w)
        grouped = ex.forward_grouped(x, w, idx)
    want = _experts64(x, ex.w1, ex.w3, ex.w2, idx, w)
    scale = want.abs().max()
    if dtype == torch.float32:
        assert (got.double() - want).abs().max() <= 1e-5 * scale
    else:  # each bf16 rounding of the path (h, y, the sum) is within 2^-8; the module path rounds as often
        assert (got.double() - want).abs().max() <= 0.03 * scale
        assert (got.float() - grouped.float()).abs().max() <= 0.03 * scale


def test_moe_gemm_rejects_expert_ids_out_of_range():
    cfg, moe = random_moe()
    ex = moe.experts
    x = torch.randn(3, cfg.hidden_size)
    idx = torch.tensor([[0, 1, 2], [3, 4, 99], [5, 6, 7]])
    with pytest.raises(IndexError, match="out of range"):
        cpu.moe_gemm(x, ex.w1.detach(), ex.w3.detach(), ex.w2.detach(), idx, torch.ones(3, 3))


def _attend64(qn, qp, kvb, pe, mask, scale, v_dim):
    B, S, H, nope = qn.shape
    L, R = kvb.shape[1], qp.shape[-1]
    q = torch.cat([qn, qp], -1).double()
    k = torch.cat([kvb[..., :nope], pe[:, :, None].expand(B, L, H, R)], -1).double()
    s = torch.einsum("bshd,blhd->bhsl", q, k) * scale
    m = torch.ones(S, L, dtype=torch.bool).tril()[None] if mask is None else mask
    p = s.masked_fill(~m[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)  # a row that sees nothing: 0
    return torch.einsum("bhsl,blhd->bshd", p, kvb[..., nope:].double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,S,L,H,nope,R,V,masked", [(1, 130, 130, 3, 64, 32, 64, False),
                                                     (2, 13, 40, 2, 128, 64, 128, True),
                                                     (2, 70, 70, 2, 16, 8, 24, True)])
def test_prefill_attention_against_float64(dtype, B, S, L, H, nope, R, V, masked):
    """Causal (no mask, L == S) and masked (a cached prefix, ragged positions, one row that may see no key)."""
    g = torch.Generator().manual_seed(S * 100 + L)
    qn, qp = torch.randn(B, S, H, nope, generator=g), torch.randn(B, S, H, R, generator=g)
    kvb, pe = torch.randn(B, L, H, nope + V, generator=g), torch.randn(B, L, R, generator=g)
    qn, qp, kvb, pe = (t.to(dtype) for t in (qn, qp, kvb, pe))
    mask = None
    if masked:
        pos = torch.arange(L - S, L).expand(B, S).clone()
        pos[1:] -= 3
        mask = torch.arange(L)[None, None, :] <= pos[:, :, None]
        mask[0, 2] = False
    got = cpu.prefill_attend(qn, qp, kvb, pe, mask, 0.11, V)
    want = _attend64(qn, qp, kvb, pe, mask, 0.11, V)
    assert got.shape == (B, S, H, V) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2.0 ** -8
    assert ((got.double() - want).abs() <= tol * want.abs().amax(-1, keepdim=True) + 1e-6).all()
    if masked:
        assert (got[0, 2] == 0).all()


def test_prefill_attention_declines_what_it_does_not_take():
    qn, qp = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 4)
    kvb, pe = torch.randn(1, 4, 2, 16), torch.randn(1, 4, 4)
    assert cpu.prefill_attend(qn, qp, kvb, pe, None, 1.0, 8) is not None
    assert cpu.prefill_attend(qn, qp, kvb[:, :3], pe[:, :3], None, 1.0, 8) is None  # causal needs L == S
    assert cpu.prefill_attend(qn, qp, kvb, pe, torch.ones(1, 4, 4), 1.0, 8) is None  # a float mask
    assert cpu.prefill_attend(qn, qp, kvb, pe, None, 1.0, 7) is None  # v_dim does not fit kvb
    assert cpu.prefill_attend(qn, qp.double(), kvb, pe, None, 1.0, 8) is None  # mixed dtypes


def _model(dtype, **kw):
    torch.manual_seed(0)
    cfg = preset("tiny").replace(**kw)
    m = Transformer(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m.to(dtype).eval()


def _count(monkeypatch):
    calls = {"gemm": 0, "moe_gemm": 0, "prefill_attend": 0}
    for name in calls:
        f = getattr(cpu, name)

        def counted(*a, _f=f, _n=name, **k):
            calls[_n] += 1
            return _f(*a, **k)
        monkeypatch.setattr(cpu, name, counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [{}, {"q_lora_rank": None, "scoring_func": "softmax", "topk_method": "greedy",
                                     "n_group": 1, "topk_group": 1}], ids=["v3", "v2"])
def test_prefill_with_the_kernels_equals_prefill_without(dtype, kw, monkeypatch):
    """A 2 x 40-token prefill with and without them (prefill_paths): same logits within fp32 rounding (fp32)
    or bf16 rounding (bf16), and each kernel was called (the GEMM for bf16 projections only)."""
    m = _model(dtype, **kw)
    tokens = torch.randint(0, m.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    calls = _count(monkeypatch)
    before = cpu.prefill_paths()
    try:
        with torch.inference_mode():
            cpu.prefill_paths(True)
            on = m(tokens).float()
            seen = dict(calls)
            cpu.prefill_paths(False)
            off = m(tokens).float()
    finally:
        cpu.prefill_paths(before)
    assert calls == seen  # nothing called with them off
    assert seen["prefill_attend"] == m.config.num_hidden_layers and seen["moe_gemm"] > 0
    assert (seen["gemm"] > 0) == (dtype == torch.bfloat16)
    tol = 1e-4 if dtype == torch.float32 else 0.05
    assert (on - off).abs().max() <= tol * off.abs().max()


def test_training_keeps_pytorch(monkeypatch):
    """With autograd the model runs its PyTorch ops (and gradients flow), whatever the dtype."""
    m = _model(torch.bfloat16).train()
    calls = _count(monkeypatch)
    tokens = torch.randint(0, m.config.vocab_size, (2, 40))
    m(tokens).float().sum().backward()
    assert calls == {"gemm": 0, "moe_gemm": 0, "prefill_attend": 0}
    assert m.layers[1].ffn.experts.w1.grad is not None


def test_rmsnorm_kernel_takes_many_rows():
    from dsv3.model.norm import RMSNorm
    norm = RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(300, 64)
    with torch.inference_mode():
        assert cpu.rows_usable(x, norm.weight) and not cpu.step_usable(x, norm.weight)
        got = norm(x)
    xd = x.double()
    want = norm.weight.double() * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


def test_dense_mlp_takes_the_experts_kernel_unless_hooked(monkeypatch):
    """A bf16 SwiGLU of many rows is one kernel call (the experts' GEMMs with it as the only expert), with the
    modules' values within bf16 rounding; a hook on one of its projections keeps the modules (and fires)."""
    from dsv3.model.moe import MLP
    torch.manual_seed(0)
    mlp = MLP(64, 96).to(torch.bfloat16)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(3, 20, 64).to(torch.bfloat16)
    calls = _count(monkeypatch)
    with torch.inference_mode():
        got = mlp(x)
        assert calls["moe_gemm"] == 1
        before = cpu.prefill_paths(False)
        try:
            want = mlp(x)
        finally:
            cpu.prefill_paths(before)
        fired = []
        handle = mlp.w1.register_forward_hook(lambda *a: fired.append(1))
        hooked = mlp(x)
        handle.remove()
        # a global forward hook too: it sees each projection's call
        seen = []
        handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, *a: seen.append(mod))
        try:
            global_hooked = mlp(x)
        finally:
            handle.remove()
    assert got.shape == want.shape and (got.float() - want.float()).abs().max() <= 0.02 * want.float().abs().max()
    assert fired == [1] and calls["moe_gemm"] == 1  # the hooked call ran the modules (their GEMMs: the kernel's)
    assert (hooked.float() - want.float()).abs().max() <= 0.02 * want.float().abs().max()
    assert all(any(m is lin for m in seen) for lin in (mlp.w1, mlp.w2, mlp.w3)) and calls["moe_gemm"] == 1
    assert torch.equal(global_hooked, hooked)


def test_gemm_bench_decode_ab_runs(capsys, load_benchmark):
    """benchmarks/gemm_bench.py --decode (behind docs/engine.md's packed-projection figures): a row per row count,
    and the packed setting put back."""
    packed = cpu.bf16_packed()
    load_benchmark("gemm_bench").main(["--decode", "--rounds", "1"])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.split("|")[1:2] in ([" 1 "], [" 8 "], [" 16 "])]
    assert len(rows) == 3 and all(len(r.strip("|").split("|")) == 5 for r in rows)
    assert cpu.bf16_packed() == packed


def test_gemm_bench_runs(capsys, load_benchmark):
    """benchmarks/gemm_bench.py (behind docs/engine.md's GEMM figures) on two small shapes: a row per shape with
    every timing and ratio."""
    load_benchmark("gemm_bench").main(["--rounds", "2", "--shapes", "20,32,48;7,16,70"])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| 20 x") or r.startswith("| 7 x")]
    assert len(rows) == 2 and all(len(r.strip("|").split("|")) == 8 for r in rows)
