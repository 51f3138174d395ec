"""The CPU kernels for FP8 weights (dsv3/kernels/fp8_cpu.c): every e4m3 value decoded exactly, the activations'
1 x 128 quantization bitwise act_quant's, the products those of the dequantized weight (weight-only) and of
fp8_gemm's emulation (DeepSeek's W8A8 GEMM) up to fp32 summation order, independent of the other rows and of the
thread count; fp8_gemm takes them for inference on the CPU and keeps its torch path elsewhere."""
import pytest
import torch

from dsv3.fp8.linear import fp8_gemm
from dsv3.fp8.quant import act_quant, weight_dequant, weight_quant
from dsv3.kernels import cpu

pytestmark = pytest.mark.skipif(cpu.library() is None, reason="the CPU kernels are not available here")


def rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def test_every_finite_e4m3_value_decodes_exactly_and_nan_stays_nan():
    b = torch.arange(256, dtype=torch.uint8)
    b[(b & 0x7F) == 0x7F] = 0  # the two NaN codes, checked below
    w = b.view(torch.float8_e4m3fn).view(2, 128)
    eye = torch.eye(128)
    got = torch.cat([cpu.fp8_linear(eye[i:i + 16], w, torch.ones(1, 1), 128) for i in range(0, 128, 16)])
    assert torch.equal(got.t(), w.float())  # subnormals, -0 and the largest magnitudes included
    for code in (0x7F, 0xFF):
        nan = torch.zeros(1, 128, dtype=torch.uint8)
        nan[0, 5] = code
        assert cpu.fp8_linear(torch.ones(1, 128), nan.view(torch.float8_e4m3fn), torch.ones(1, 1), 128).isnan().all()


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_quantization_is_act_quants_bitwise(dtype, scale_fmt):
    g = torch.Generator().manual_seed(0)
    for M, K in [(1, 512), (5, 300), (16, 7168), (3, 17)]:
        # magnitudes over 15 decades (e4m3's subnormals and saturation), zeros, a tiny value, a zero row
        x = torch.randn(M, K, generator=g) * torch.logspace(-12, 3, K)[torch.randperm(K, generator=g)]
        x[0, :3] = torch.tensor([0.0, -0.0, 1e-30])
        if M > 2:
            x[2] = 0
        x = x.to(dtype)
        q, s = act_quant(x, 128, scale_fmt)
        xq, xs = cpu.fp8_act_quant(x, 128, scale_fmt)
        assert torch.equal(xq, q.float()) and torch.equal(xs, s)
    # ties between two e4m3 values go to the even one; |x| = 448 sets the scale to 1
    x = torch.zeros(1, 128)
    ties = torch.tensor([1.0625, 1.1875, 304.0, 0.0029296875, -1.0625])
    x[0, :5], x[0, 127] = ties, 448.0
    xq, _ = cpu.fp8_act_quant(x, 128)
    assert xq[0, :5].tolist() == [1.0, 1.25, 320.0, 0.00390625, -1.0]
    assert torch.equal(xq, act_quant(x, 128)[0].float())
    # a tile with a NaN gets scale 1, as act_quant gives it
    x = torch.randn(2, 256, generator=g)
    x[0, 5] = float("nan")
    q, s = act_quant(x, 128)
    xq, xs = cpu.fp8_act_quant(x, 128)
    assert torch.equal(xs, s) and torch.equal(xq.nan_to_num(7.0), q.float().nan_to_num(7.0))


SHAPES = [(1, 512, 256), (3, 300, 200), (9, 1024, 640), (17, 130, 129), (16, 7168, 96)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_equal_the_dequantized_weights_and_fp8_gemm(dtype):
    g = torch.Generator().manual_seed(1)
    for M, K, N in SHAPES:
        q, s = weight_quant(torch.randn(N, K, generator=g) * 0.05, 128)
        x = torch.randn(M, K, generator=g).to(dtype)
        ref = x.float() @ weight_dequant(q, s, 128, dtype=torch.float32).t()
        assert rel(cpu.fp8_linear(x, q, s, 128), ref) < 2e-6
        # W8A8: fp8_gemm's torch emulation is the twin (the same per-block sums in another order)
        got = cpu.fp8_linear(x, q, s, 128, quantize=True)
        assert rel(got, fp8_gemm(x.float(), q, s, 128, backend="emulated")) < 2e-6


def test_a_row_does_not_depend_on_the_others_or_the_threads():
    g = torch.Generator().manual_seed(2)
    q, s = weight_quant(torch.randn(300, 1000, generator=g), 128)
    x = torch.randn(16, 1000, generator=g)
    for quantize in (False, True):
        full = cpu.fp8_linear(x, q, s, 128, quantize=quantize)
        for i in (0, 7, 8, 15):
            assert torch.equal(cpu.fp8_linear(x[i:i + 1], q, s, 128, quantize=quantize)[0], full[i])
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            two = cpu.fp8_linear(x, q, s, 128, quantize=quantize)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(two, full)


def test_fp8_gemm_takes_the_kernel_for_cpu_inference_only(monkeypatch):
    calls = []
    real = cpu.fp8_linear
    monkeypatch.setattr(cpu, "fp8_linear", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    g = torch.Generator().manual_seed(3)
    q, s = weight_quant(torch.randn(256, 384, generator=g), 128)
    x = torch.randn(2, 3, 384, generator=g, dtype=torch.float32)
    y = fp8_gemm(x, q, s, 128)
    assert calls == [(6, 384)] and y.shape == (2, 3, 256) and y.dtype == x.dtype
    assert rel(y, fp8_gemm(x, q, s, 128, backend="emulated")) < 2e-6
    # autograd through x, or the emulated backend asked for: the torch path
    calls.clear()
    xg = x.clone().requires_grad_()
    fp8_gemm(xg, q, s, 128).sum().backward()
    fp8_gemm(x, q, s, 128, backend="emulated")
    assert xg.grad is not None and calls == [(6, 384)]  # the kernel was asked, and declined, once
    # sizes the kernel does not take (a block not a multiple of 16) fall back to the same values
    q2, s2 = weight_quant(torch.randn(40, 50, generator=g), 24)
    x2 = torch.randn(3, 50, generator=g)
    assert cpu.fp8_linear(x2, q2, s2, 24) is None
    assert torch.equal(fp8_gemm(x2, q2, s2, 24), fp8_gemm(x2, q2, s2, 24, backend="emulated"))


def test_fp8_cpu_bench_runs(capsys, load_benchmark):
    """benchmarks/fp8_cpu_bench.py (behind docs/fp8.md's CPU kernel figures) on small shapes: a row per row count."""
    load_benchmark("fp8_cpu_bench").main(["--n", "64", "--k", "300", "--matrices", "2", "--rows", "1", "9",
                                          "--rounds", "1"])
    rows = [r.strip("|").split("|") for r in capsys.readouterr().out.splitlines() if r.startswith(("| 1 ", "| 9 "))]
    assert len(rows) == 2 and all(len(r) == 8 and r[3].strip().endswith("x") for r in rows)
