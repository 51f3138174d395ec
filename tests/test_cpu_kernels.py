"""The C kernels of dsv3/kernels (few-row fp32 / bf16 products of decode steps) against float64 references,
their batch and thread invariance, where the model takes them, and what happens without them."""
import os
import subprocess
import sys

import pytest
import torch

from dsv3.config import preset
from dsv3.kernels import cpu
from dsv3.model.linear import Linear
from dsv3.model.moe import Experts
from test_model_twins import random_moe

needs_kernels = pytest.mark.skipif(cpu.library() is None,
                                   reason=f"CPU kernels unavailable here: {cpu.unavailable_reason()}")
U = 2.0 ** -24  # fp32 unit roundoff


@pytest.fixture(params=[(True, True), (True, False), (False, False)], ids=["packed", "bf16-dot", "widened"])
def bf16_dot(request):
    """bf16 products every way the kernels compute them: the few-row products on packed weights (the default:
    each value summed in order in its own lane), and the dot-product form of the experts (and of those products
    with bf16_packed(False)) as AVX512-BF16 dot products (where the CPU has them) or exactly widened fp32 FMAs."""
    dot, packed = request.param
    if dot and cpu.library() is not None and not cpu.bf16_dot():
        pytest.skip("this CPU has no AVX512-BF16")
    before = cpu.bf16_dot(dot), cpu.bf16_packed(packed)
    yield dot
    cpu.bf16_dot(before[0])
    cpu.bf16_packed(before[1])


def dot_bound(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    """|fl(a b^T) - a b^T| <= n u |a| |b|^T (plus a margin): the classic bound of an fp32 dot product of
    length n, whatever the order of its sums."""
    return 2 * n * U * (a.abs().double() @ b.abs().double().t()) + 1e-30


@needs_kernels
@pytest.mark.parametrize("M,K,N", [(1, 512, 256), (2, 100, 37), (3, 7, 3), (8, 16, 1), (9, 33, 5),
                                   (16, 1408, 512), (13, 256, 768)])
def test_linear_within_the_fp32_bound_of_float64(M, K, N):
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    got = cpu.linear(x, w)
    want = x.double() @ w.double().t()
    assert got.shape == (M, N) and got.dtype == torch.float32
    assert ((got.double() - want).abs() <= dot_bound(x, w, K)).all()


@needs_kernels
@pytest.mark.parametrize("M,K,N", [(1, 512, 256), (3, 7, 3), (9, 33, 5), (16, 1408, 512)])
def test_bf16_linear_is_the_rounded_fp32_product(M, K, N, bf16_dot):
    """bf16 in, bf16 out: the exact product of the bf16 values within fp32 rounding, rounded once to
    bf16 (half a bf16 spacing, 2^-8 of the value); and so within one spacing of PyTorch's bf16 GEMM."""
    g = torch.Generator().manual_seed(M * 1000 + K + N)
    x, w = torch.randn(M, K, generator=g).bfloat16(), torch.randn(N, K, generator=g).bfloat16()
    got = cpu.linear(x, w)
    assert got.dtype == torch.bfloat16 and got.shape == (M, N)
    want = x.double() @ w.double().t()
    assert ((got.double() - want).abs() <= 2.0 ** -8 * want.abs() + 2 * dot_bound(x.float(), w.float(), K)).all()
    ref = torch.nn.functional.linear(x, w).double()
    assert ((got.double() - ref).abs() <= 2.0 ** -7 * ref.abs() + 2 * dot_bound(x.float(), w.float(), K)).all()


@needs_kernels
def test_bf16_linear_rows_and_tiles_do_not_change_a_value():
    """bf16 products run on the weight's packed copy (blocks of 16 outputs, k in pairs) in tiles whose shape
    depends on the row count (4 blocks x 1-4 rows, 2 x 5-8, 1 x 9-16, then groups of 16 rows): each value is
    bitwise the same whatever the tile, the row count (up to past 16), the threads or an odd K and a partial last
    block; and within the fp32 sum's bound of the float64 product, rounded once to bf16."""
    g = torch.Generator().manual_seed(3)
    K, N = 67, 37  # an odd K (a zero-padded last pair) and a last block of 5 outputs
    x, w = torch.randn(21, K, generator=g).bfloat16(), torch.randn(N, K, generator=g).bfloat16()
    solo = torch.cat([cpu.linear(x[m:m + 1], w) for m in range(21)])
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            for M in (1, 2, 3, 4, 5, 8, 9, 16, 17, 21):
                assert torch.equal(cpu.linear(x[:M], w), solo[:M]), (n, M)
    finally:
        torch.set_num_threads(threads)
    want = x.double() @ w.double().t()
    assert ((solo.double() - want).abs() <= 2.0 ** -8 * want.abs() + 2 * dot_bound(x.float(), w.float(), K)).all()


@needs_kernels
@pytest.mark.parametrize("K,N", [(512, 1408), (67, 37), (1408, 512)])
def test_bf16_decode_and_prefill_products_give_the_same_values(K, N):
    """The few-row kernel of decode steps and the many-row GEMM of prefill (dsv3_gemm) sum each value the same
    way (fp32, ascending k, one fused multiply-add a term, rounded once to bf16): a row's projections are
    bitwise the same whichever step computes them."""
    g = torch.Generator().manual_seed(K + N)
    x, w = torch.randn(20, K, generator=g).bfloat16(), torch.randn(N, K, generator=g).bfloat16()
    assert torch.equal(cpu.linear(x, w), cpu.gemm(x, w))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_far_fetch_changes_no_value(dtype):
    """The fetch of weight rows ahead into L2 (across the routed experts) is a hint: the experts and the few-row
    products give bitwise the same values with it off, for experts whose tokens span more than one chunk of 8
    and rows ahead that run past the last expert or matrix."""
    g = torch.Generator().manual_seed(5)
    E, D, I, T = 6, 96, 40, 20
    x, w = torch.randn(T, D, generator=g).to(dtype), torch.randn(300, D, generator=g).to(dtype)
    w1, w3, w2 = (torch.randn(*s, generator=g).to(dtype) for s in ((E, I, D), (E, I, D), (E, D, I)))
    idx = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T)])
    idx[:12, 0] = 4  # expert 4 gets two chunks of pairs
    gw = torch.rand(T, 2, generator=g)
    before = cpu.far_fetch()
    try:
        got = {}
        for on in (True, False):
            cpu.far_fetch(on)
            got[on] = (cpu.moe(x, w1, w3, w2, idx, gw), cpu.linear(x[:9], w), cpu.linear(x[:1], w))
    finally:
        cpu.far_fetch(before)
    assert all(torch.equal(a, b) for a, b in zip(got[True], got[False]))


@needs_kernels
def test_bf16_weights_packed_once_again_when_changed_and_dropped_with_the_weight():
    import gc

    w = torch.randn(40, 30).bfloat16()
    x = torch.randn(2, 30).bfloat16()
    first = cpu.linear(x, w)
    packed = cpu.packed_bf16(w)
    assert cpu.packed_bf16(w) is packed  # kept while the values stay
    with torch.no_grad():
        w.mul_(2)  # in place: a new version
    assert cpu.packed_bf16(w) is not packed
    assert torch.equal(cpu.linear(x, w), first * 2)  # (a power of two: exact)
    key = id(w)
    del w, packed
    gc.collect()
    assert key not in cpu._PACKED


def expert_reference(ex: Experts, x, gw, idx):
    """The routed experts in float64, pair by pair, straight from the definition."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    w1, w2, w3 = (p.detach().double() for p in (ex.w1, ex.w2, ex.w3))
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            a, b = w1[e] @ x[t].double(), w3[e] @ x[t].double()
            out[t] += float(gw[t, k]) * (w2[e] @ (a * torch.sigmoid(a) * b))
    return out


@needs_kernels
@pytest.mark.parametrize("T,K,E,D,I", [(1, 4, 32, 512, 256), (2, 2, 8, 64, 32), (20, 2, 3, 40, 24),
                                       (16, 4, 32, 96, 48), (5, 1, 1, 17, 9), (64, 3, 6, 32, 16)])
def test_moe_matches_float64(T, K, E, D, I):
    """Including experts holding more than one chunk of 8 pairs (T=20 over 3 experts), sizes that are
    not multiples of 16, a single expert, and tokens whose experts repeat across the batch."""
    g = torch.Generator().manual_seed(T * 100 + E)
    ex = Experts(E, D, I)
    with torch.no_grad():
        for p in ex.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x = torch.randn(T, D, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    gw = torch.rand(T, K, generator=g)
    got = cpu.moe(x, ex.w1.detach(), ex.w3.detach(), ex.w2.detach(), idx, gw)
    want = expert_reference(ex, x, gw, idx)
    scale = want.abs().max().item()
    assert (got.double() - want).abs().max().item() <= 1e-5 * max(scale, 1.0)
    # and the fp32 loop twin the model's other paths are tied to
    with torch.no_grad():
        assert (got - ex.forward_loop(x, gw, idx)).abs().max().item() <= 1e-5 * max(scale, 1.0)


@needs_kernels
@pytest.mark.parametrize("T", [1, 2, 16])
def test_bf16_moe_matches_the_pytorch_bf16_paths(T, bf16_dot):
    """bf16 experts: within bf16 rounding of the float64 definition (on the bf16 values), and of
    PyTorch's bf16 per-pair and loop paths (which round the same intermediate values)."""
    E, D, I, K = 8, 64, 48, 3
    g = torch.Generator().manual_seed(T)
    ex = Experts(E, D, I)
    with torch.no_grad():
        for p in ex.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ex = ex.bfloat16()
    x = torch.randn(T, D, generator=g).bfloat16()
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    gw = torch.rand(T, K, generator=g)
    got = cpu.moe(x, ex.w1.detach(), ex.w3.detach(), ex.w2.detach(), idx, gw)
    assert got.dtype == torch.bfloat16
    want = expert_reference(ex, x, gw, idx)
    scale = want.abs().max().item()
    assert (got.double() - want).abs().max().item() <= 2.0 ** -6 * scale
    with torch.no_grad():
        for path in (ex.forward_loop, ex.forward_pairs):
            assert (got.double() - path(x, gw, idx).double()).abs().max().item() <= 2.0 ** -6 * scale


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_results_do_not_depend_on_the_batch_or_the_threads(dtype, bf16_dot):
    """Bitwise: a row computed alone, among others, or with two threads gives the same values."""
    if dtype == torch.float32 and not bf16_dot:
        pytest.skip("the bf16 setting does not apply to fp32")
    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(12, 200, generator=g).to(dtype), torch.randn(70, 200, generator=g).to(dtype)
    E, D, I = 8, 200, 40
    w1, w3, w2 = (torch.randn(*s, generator=g).to(dtype) for s in ((E, I, D), (E, I, D), (E, D, I)))
    idx = torch.stack([torch.randperm(E, generator=g)[:3] for _ in range(12)])
    gw = torch.rand(12, 3, generator=g)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            lin, moe = cpu.linear(x, w), cpu.moe(x, w1, w3, w2, idx, gw)
            for r in (0, 5, 11):
                assert torch.equal(cpu.linear(x[r:r + 1], w), lin[r:r + 1])
                assert torch.equal(cpu.moe(x[r:r + 1], w1, w3, w2, idx[r:r + 1], gw[r:r + 1]), moe[r:r + 1])
            if n == 1:
                ref = (lin, moe)
            else:
                assert torch.equal(lin, ref[0]) and torch.equal(moe, ref[1])
    finally:
        torch.set_num_threads(threads)


@needs_kernels
def test_bad_expert_id_is_an_error():
    x, w = torch.randn(2, 16), torch.randn(4, 8, 16)
    with pytest.raises(IndexError, match="expert id out of range"):
        cpu.moe(x, w, w, torch.randn(4, 16, 8), torch.tensor([[0], [4]]), torch.ones(2, 1))


def _spy(monkeypatch, cls, name):
    calls = []
    real = getattr(cls, name)

    def f(self, *a, **k):
        calls.append(a[0].shape[0])
        return real(self, *a, **k)

    monkeypatch.setattr(cls, name, f)
    return calls


@needs_kernels
def test_model_takes_the_kernels_for_decode_only(monkeypatch):
    """MoE "auto" and Linear take the kernels for few fp32 or bf16 rows without autograd; training
    (autograd), many rows and other dtypes keep PyTorch's paths, and the results agree."""
    cfg, moe = random_moe()
    calls = _spy(monkeypatch, Experts, "forward_kernel")
    x = torch.randn(cpu.MOE_MAX_TOKENS + 1, cfg.hidden_size)
    with torch.no_grad():
        moe.impl = "loop"
        want = moe(x)
        moe.impl = "auto"
        for T in (1, 2, 16, cpu.MOE_MAX_TOKENS):
            assert (moe(x[:T]) - want[:T]).abs().max() < 1e-5
        moe(x)  # one token too many: grouped GEMMs
        moe.to(torch.bfloat16)
        assert (moe(x[:2].bfloat16()).float() - want[:2]).abs().max() < 0.05 * want[:2].abs().max()  # bf16 too
        moe.double()(x[:2].double())  # another dtype: PyTorch's paths (here the per-pair one)
        moe.float()
    assert calls == [1, 2, 16, cpu.MOE_MAX_TOKENS, 2]
    moe(x[:2].requires_grad_()).sum().backward()  # autograd: PyTorch's path, gradients flow
    assert calls == [1, 2, 16, cpu.MOE_MAX_TOKENS, 2] and moe.experts.w1.grad is not None

    lin = Linear(48, 20, bias=False)
    lcalls = []
    real = cpu.linear
    monkeypatch.setattr(cpu, "linear", lambda a, b: lcalls.append(a.shape[0]) or real(a, b))
    xs = torch.randn(2, cpu.LINEAR_MAX_ROWS, 48)
    with torch.no_grad():
        want = torch.nn.functional.linear(xs, lin.weight)
        assert (lin(xs[:1, :3]) - want[:1, :3]).abs().max() < 1e-5  # (1, 3, 48): 3 rows
        assert (lin(xs[0]) - want[0]).abs().max() < 1e-5
        assert (lin(xs) - want).abs().max() < 1e-5  # 2 * cpu.LINEAR_MAX_ROWS rows: F.linear
    assert lcalls == [3, cpu.LINEAR_MAX_ROWS]
    y = lin(xs[0])
    assert y.requires_grad and lcalls == [3, cpu.LINEAR_MAX_ROWS]
    with torch.no_grad():
        lin.bfloat16()
        y = lin(xs[0].bfloat16())
        assert y.dtype == torch.bfloat16 and (y.float() - want[0]).abs().max() < 0.02 * want[0].abs().max()
        lin.double()(xs[0].double())  # float64: F.linear
    assert lcalls == [3, cpu.LINEAR_MAX_ROWS, cpu.LINEAR_MAX_ROWS]


def _probe(env: dict) -> str:
    code = "from dsv3.kernels import cpu; print(cpu.library() is None, cpu.unavailable_reason(), sep='|')"
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_disabled_or_unbuildable_kernels_leave_the_pytorch_paths(tmp_path):
    assert _probe({"DSV3_CPU_KERNELS": "0"}) == "True|disabled by DSV3_CPU_KERNELS=0"
    if cpu.library() is None:
        pytest.skip(f"CPU kernels unavailable here: {cpu.unavailable_reason()}")
    out = _probe({"CC": "false", "DSV3_CACHE_DIR": str(tmp_path / "broken")})
    assert out.startswith("True|build failed: false failed")
    # a fresh cache folder gets a freshly built library, which loads
    assert _probe({"DSV3_CACHE_DIR": str(tmp_path / "fresh")}) == "False|None"
    assert [f for f in os.listdir(tmp_path / "fresh") if f.endswith(".so")]


def test_engine_tokens_with_and_without_kernels(monkeypatch):
    """Greedy tokens of the engine on a tiny model: the same with the kernels and with PyTorch's paths."""
    from dsv3.infer.engine import Engine
    from dsv3.infer.params import SamplingParams

    torch.manual_seed(0)
    import dsv3

    m = dsv3.Transformer(preset("tiny")).init_weights(std=0.1).eval()
    prompts = [[5, 9, 2, 7], [3, 3, 8], [11, 4, 6, 1, 2]]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)

    def run():
        return [c.token_ids for c in Engine(m, eos_token_id=None).generate(prompts, params)]

    with_kernels = run()
    monkeypatch.setattr(cpu, "library", lambda: None)
    assert run() == with_kernels


@needs_kernels
@pytest.mark.parametrize("ab", ["kernels", "fused", "bf16-dot", "bf16-packed", "far-fetch", "screen"])
def test_kernels_bench_runs(capsys, monkeypatch, load_benchmark, ab):
    """benchmarks/kernels_bench.py (the A/B behind docs/engine.md's figures) on the tiny preset, for each thing
    it switches (for "screen", the head screen let onto the tiny head); fp32, so the greedy tokens must agree
    off and on."""
    import dsv3.infer.screen as screen

    if ab == "bf16-dot" and not cpu.bf16_dot():
        pytest.skip("this CPU has no AVX512-BF16")
    if ab == "screen":
        if not cpu.vnni() or screen._onednn_linear() is None:
            pytest.skip("needs AVX512-VNNI and oneDNN's int8 linear")
        monkeypatch.setattr(screen, "MIN_ELEMENTS", 0)
    library, mla_block, dot, packed, far = cpu.library, cpu.mla_block, cpu.bf16_dot(), cpu.bf16_packed(), cpu.far_fetch()
    load_benchmark("kernels_bench").main(["--preset", "tiny", "--batch", "1", "3", "--rounds", "2", "--new-tokens", "4",
                                          "--ab", ab])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 |") or line.startswith("| 3 |")]
    assert len(rows) == 2 and all(r.endswith("| yes |") for r in rows)
    # the A/B put everything back
    assert cpu.library is library and cpu.mla_block is mla_block and cpu.bf16_dot() == dot
    assert cpu.bf16_packed() == packed and cpu.far_fetch() == far


@needs_kernels
def test_kernels_bench_prefill_ab_runs(capsys, load_benchmark):
    """--ab prefill (the A/B behind docs/engine.md's prefill figures) on the tiny preset: fp32 logits off and
    on within fp32 rounding, and the switch put back."""
    before = cpu.prefill_paths()
    load_benchmark("kernels_bench").main(["--preset", "tiny", "--batch", "1", "2", "--rounds", "2", "--prompt-len", "24",
                                          "--ab", "prefill"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 2 and all(float(r.rstrip(" |").rsplit("|", 1)[1]) < 1e-4 for r in rows)
    assert cpu.prefill_paths() == before
