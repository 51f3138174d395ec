"""Block-wise FP8 quantization and the FP8 GEMM, against the DeepSeek-V3 paper (section 3.3) and
the released format: E4M3 (max 448), 128x128 weight blocks with an fp32 `weight_scale_inv` of shape
(ceil(out/128), ceil(in/128)) and dequant = block * scale_inv, 1x128 activation tiles with
scale = amax / 448, fp32 partial sums per 128 along K; V3.1 rounds scales up to powers of two (UE8M0).

The expected values here are computed independently: plain Python loops over blocks, and scales
checked in float64 / with math.frexp, not with the helpers under test."""
import math

import pytest
import torch
from torch import nn

from dsv3.fp8.linear import FP8Linear, _scaled_mm_supported, fp8_gemm, fp8_gemm_reference
from dsv3.fp8.quant import BLOCK, FP8_MAX, act_dequant, act_quant, weight_dequant, weight_quant

E4M3 = torch.float8_e4m3fn


def calc_diff(x, y):
    # DeepSeek's FP8 GEMM check (DeepGEMM tests): 1 - 2 sum(xy) / sum(x^2 + y^2)
    x, y = x.double(), y.double()
    return (1 - 2 * (x * y).sum() / (x * x + y * y).sum()).item()


def expected_scale(amax: float, scale_fmt) -> float:
    s = float(torch.tensor(amax, dtype=torch.float32) / torch.tensor(448.0, dtype=torch.float32))
    if scale_fmt == "ue8m0":
        m, e = math.frexp(s)  # s = m * 2**e, m in [0.5, 1)
        s = 2.0 ** (e - 1) if m == 0.5 else 2.0 ** e  # smallest power of two >= s
    return s


def bits(t):
    return t.contiguous().view(torch.uint8)


def test_e4m3_facts():
    assert FP8_MAX == 448.0 == torch.finfo(E4M3).max
    assert BLOCK == 128


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
@pytest.mark.parametrize("shape", [(300, 200), (128, 256), (5, 130)])
def test_weight_quant_exact_formula(shape, scale_fmt):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[1])  # blocks with very different ranges
    q, s = weight_quant(w, scale_fmt=scale_fmt)
    rb, cb = math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)
    assert q.dtype == E4M3 and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (rb, cb)
    for i in range(rb):
        for j in range(cb):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            amax = blk.abs().max().item()
            want = expected_scale(amax, scale_fmt)
            assert s[i, j].item() == want, (i, j)
            qb = q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            assert torch.equal(bits(qb), bits((blk / torch.tensor(want)).to(E4M3)))
            if scale_fmt is None:
                # the block's largest magnitude lands on the top of the E4M3 range
                assert qb.float().abs().max().item() == 448.0
            else:
                assert math.frexp(s[i, j].item())[0] == 0.5  # a power of two
                assert amax / 448 <= s[i, j].item() < 2 * amax / 448
    # dequant = block * scale_inv, element by element, on the ragged grid
    d = weight_dequant(q, s)
    for r, c in [(0, 0), (shape[0] - 1, shape[1] - 1), (shape[0] // 2, shape[1] - 1)]:
        assert d[r, c].item() == (q[r, c].float() * s[r // 128, c // 128]).item()  # fp32 product


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_weight_roundtrip_error_is_e4m3_rounding(scale_fmt):
    torch.manual_seed(1)
    w = torch.randn(300, 200)
    q, s = weight_quant(w, scale_fmt=scale_fmt)
    d = weight_dequant(q, s)
    srep = s.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    exact = w / srep  # the value E4M3 had to represent
    # E4M3 has 3 mantissa bits: half an ulp is 2^-4 relative for normals (|v| >= 2^-6),
    # and 2^-10 absolute for subnormals (spacing 2^-9).
    bound = torch.maximum(exact.abs() * 2.0 ** -4, torch.full_like(exact, 2.0 ** -10))
    assert torch.all((q.float() - exact).abs() <= bound * (1 + 1e-6))
    assert torch.all((d - w).abs() <= bound * srep * (1 + 1e-6))


def test_zero_blocks_are_safe():
    w = torch.randn(256, 200)
    w[:128, 128:] = 0
    for fmt in (None, "ue8m0"):
        q, s = weight_quant(w, scale_fmt=fmt)
        assert torch.isfinite(s).all() and s[0, 1].item() == 1.0
        assert torch.all(q[:128, 128:].float() == 0)
        assert torch.isfinite(weight_dequant(q, s)).all()
        qz, sz = weight_quant(torch.zeros(3, 3), scale_fmt=fmt)
        assert torch.all(weight_dequant(qz, sz) == 0)
        xq, xs = act_quant(torch.zeros(2, 130), scale_fmt=fmt)
        assert torch.all(act_dequant(xq, xs) == 0) and torch.isfinite(xs).all()


def test_weight_dequant_rejects_bad_scale_shape():
    q, s = weight_quant(torch.randn(300, 200))
    with pytest.raises(ValueError, match="weight_scale_inv has shape"):
        weight_dequant(q, s[:, :1])
    with pytest.raises(ValueError):
        weight_quant(torch.randn(2, 3, 4))
    with pytest.raises(ValueError):
        weight_quant(torch.randn(4, 4), scale_fmt="e8m0")


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_act_quant_exact_formula(scale_fmt):
    torch.manual_seed(2)
    x = (torch.randn(3, 5, 300) * 3).to(torch.bfloat16)
    q, s = act_quant(x, scale_fmt=scale_fmt)
    assert q.shape == x.shape and q.dtype == E4M3
    assert s.shape == (3, 5, 3) and s.dtype == torch.float32  # 1x128 tiles, ragged last tile
    xf = x.float()
    for b in range(3):
        for t in range(5):
            for j in range(3):
                tile = xf[b, t, j * 128:(j + 1) * 128]
                want = expected_scale(tile.abs().max().item(), scale_fmt)
                assert s[b, t, j].item() == want
                assert torch.equal(bits(q[b, t, j * 128:(j + 1) * 128]), bits((tile / torch.tensor(want)).to(E4M3)))
    d = act_dequant(q, s)
    srep = s.repeat_interleave(128, -1)[..., :300]
    assert torch.equal(d, q.float() * srep)
    bound = torch.maximum((xf / srep).abs() * 2.0 ** -4, torch.full_like(xf, 2.0 ** -10)) * srep
    assert torch.all((d - xf).abs() <= bound * (1 + 1e-6))


# ---------------------------------------------------------------------------------------------
# FP8 GEMM

BACKENDS = ["emulated"] + (["scaled_mm"] if _scaled_mm_supported(torch.device("cpu")) else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
@pytest.mark.parametrize("mnk", [(33, 300, 200), (16, 256, 1024), (4, 130, 1000)])
def test_fp8_gemm_accuracy(mnk, scale_fmt, backend):
    m, n, k = mnk
    torch.manual_seed(3)
    # Activation tiles and weight blocks with different magnitudes (and outlier columns), the case
    # fine-grained scaling exists for; a per-tensor scale would flush the small tiles.
    x = torch.randn(m, k) * torch.logspace(-2, 2, k)[torch.randperm(k)]
    w = torch.randn(n, k) * 0.02
    q, s = weight_quant(w, scale_fmt=scale_fmt)
    y = fp8_gemm(x, q, s, scale_fmt=scale_fmt, backend=backend)
    ref = x.double() @ w.double().t()
    assert y.shape == (m, n) and y.dtype == x.dtype
    assert calc_diff(y, ref) <= 1e-3
    # the slow twin (dequantized weight, unquantized activations) is as close
    assert calc_diff(fp8_gemm_reference(x, q, s), ref) <= 1e-3
    assert calc_diff(y, fp8_gemm_reference(x, q, s)) <= 1e-3
    # with the same quantized activations the two paths differ only by fp32 summation order
    xq, xs = act_quant(x, scale_fmt=scale_fmt)
    ref_q = fp8_gemm_reference(act_dequant(xq, xs), q, s)
    assert torch.allclose(y, ref_q, rtol=1e-5, atol=1e-5 * ref_q.abs().max().item())


def test_fp8_gemm_backends_agree_and_batch_dims():
    torch.manual_seed(4)
    x = torch.randn(2, 7, 384, dtype=torch.bfloat16)
    q, s = weight_quant(torch.randn(200, 384))
    y = fp8_gemm(x, q, s, backend="emulated")
    assert y.shape == (2, 7, 200) and y.dtype == torch.bfloat16
    assert torch.equal(y[1], fp8_gemm(x[1], q, s, backend="emulated"))
    if "scaled_mm" in BACKENDS:
        y2 = fp8_gemm(x.float(), q, s, backend="scaled_mm")
        y1 = fp8_gemm(x.float(), q, s, backend="emulated")
        assert torch.allclose(y1, y2, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="does not match weight in_features"):
        fp8_gemm(torch.randn(3, 100), q, s)


def test_fp8_linear():
    torch.manual_seed(5)
    lin = nn.Linear(640, 320, bias=False)
    fp8 = FP8Linear.from_linear(lin)
    sd = fp8.state_dict()
    assert set(sd) == {"weight", "weight_scale_inv"}  # the checkpoint names
    assert sd["weight"].dtype == E4M3 and sd["weight"].shape == (320, 640)
    assert sd["weight_scale_inv"].dtype == torch.float32 and sd["weight_scale_inv"].shape == (3, 5)
    x = torch.randn(2, 9, 640)
    with torch.no_grad():
        ref = lin(x)
        y = fp8(x)
        fp8.reference = True
        y_ref = fp8(x)
    assert y.shape == ref.shape
    assert calc_diff(y, ref) <= 1e-3 and calc_diff(y_ref, ref) <= 1e-3 and calc_diff(y, y_ref) <= 1e-3
    # bias and bf16 inputs
    lb = nn.Linear(256, 128, bias=True)
    fb = FP8Linear.from_linear(lb, scale_fmt="ue8m0")
    xb = torch.randn(4, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        yb = fb(xb)
        assert yb.dtype == torch.bfloat16
        assert calc_diff(yb, lb(xb.float())) <= 2e-3  # bf16 output rounding on top of FP8


def test_fp8_linear_memory_is_half_of_bf16():
    lin = nn.Linear(2048, 1536, bias=False).to(torch.bfloat16)
    fp8 = FP8Linear.from_linear(lin)
    bf16_bytes = sum(p.numel() * p.element_size() for p in lin.parameters())
    fp8_bytes = sum(b.numel() * b.element_size() for b in fp8.buffers())
    # 1 byte per weight + one fp32 scale per 128x128 block vs 2 bytes per weight
    assert fp8_bytes == 2048 * 1536 + 4 * 12 * 16
    assert 0.49 < fp8_bytes / bf16_bytes < 0.51
