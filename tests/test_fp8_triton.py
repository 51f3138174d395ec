"""The optional Triton FP8 block GEMM against the DeepSeek-V3 recipe (paper section 3.3): fp8 E4M3
inputs, 1x128 activation scales, 128x128 weight scales, partial sums scaled and promoted to fp32
every 128 along K. Ties the kernel to its slow twin `fp8_gemm` (same quantized inputs, fp32
accumulation: equal up to summation order), to an independent float64 block loop written here,
and to the unquantized matmul with DeepSeek's DeepGEMM check (calc_diff <= 1e-3).

Without CUDA the kernel runs under Triton's CPU interpreter, which must be selected before
triton is imported; shapes stay small and ragged so that it is quick."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read by triton at import time

pytest.importorskip("triton")

from dsv3.fp8 import triton_kernels  # noqa: E402
from dsv3.fp8.linear import fp8_gemm  # noqa: E402
from dsv3.fp8.quant import act_quant, weight_quant  # noqa: E402
from dsv3.fp8.triton_kernels import fp8_block_gemm_triton, fp8_gemm_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def calc_diff(x, y):
    # DeepSeek's FP8 GEMM check (DeepGEMM tests): 1 - 2 sum(xy) / sum(x^2 + y^2)
    x, y = x.double(), y.double()
    return (1 - 2 * (x * y).sum() / (x * x + y * y).sum()).item()


def make_inputs(m, n, k, seed, scale_fmt=None):
    g = torch.Generator().manual_seed(seed)
    # Tiles and blocks of very different magnitudes, so a scale applied to the wrong
    # block (wrong m, n // 128 or k // 128 index) changes the result visibly.
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 2, k)[torch.randperm(k, generator=g)]
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 0, n)[torch.randperm(n, generator=g), None]
    q, s = weight_quant(w, scale_fmt=scale_fmt)
    return x, w, q, s


def block_loop_expected(xq, xs, q, s):
    # Independent of the code under test: float64 per-(row, 128-column) and per-128x128-block
    # scales applied element by element, then one float64 matmul.
    m, k = xq.shape
    n = q.shape[0]
    xd = xq.double().clone()
    wd = q.double().clone()
    for kb in range(xs.shape[1]):
        ks = slice(kb * 128, min(k, (kb + 1) * 128))
        xd[:, ks] *= xs[:, kb:kb + 1].double()
        for nb in range(s.shape[0]):
            wd[nb * 128:min(n, (nb + 1) * 128), ks] *= float(s[nb, kb])
    return xd @ wd.t()


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
@pytest.mark.parametrize("mnk", [(5, 130, 200), (33, 260, 300), (17, 129, 256), (1, 200, 129)])
def test_triton_kernel_matches_fp8_gemm(mnk, scale_fmt):
    m, n, k = mnk
    x, w, q, s = make_inputs(m, n, k, seed=m + n + k, scale_fmt=scale_fmt)
    xq, xs = act_quant(x, scale_fmt=scale_fmt)
    y = fp8_block_gemm_triton(xq.to(DEVICE), xs.to(DEVICE), q.to(DEVICE), s.to(DEVICE)).cpu()
    assert y.shape == (m, n) and y.dtype == torch.float32
    # slow twin, same quantized activations (fp8_gemm quantizes x the same way internally):
    # both accumulate in fp32, so only the summation order differs
    twin = fp8_gemm(x, q, s, scale_fmt=scale_fmt, backend="emulated")
    tol = 1e-5 * twin.abs().max().item()
    assert torch.allclose(y, twin, rtol=1e-5, atol=tol), (y - twin).abs().max()
    exact = block_loop_expected(xq, xs, q, s)
    assert torch.allclose(y.double(), exact, rtol=1e-5, atol=tol)
    # against the unquantized product: DeepGEMM's acceptance bound
    assert calc_diff(y, x.double() @ w.double().t()) <= 1e-3


def test_wrapper_bf16_batch_dims_and_wrong_scales_are_detected():
    x, w, q, s = make_inputs(9, 150, 280, seed=1)
    x3 = x.reshape(3, 3, 280).to(DEVICE)
    y = fp8_gemm_triton(x3, q.to(DEVICE), s.to(DEVICE)).cpu()
    assert y.shape == (3, 3, 150) and y.dtype == torch.float32
    assert torch.allclose(y.reshape(9, 150), fp8_gemm(x, q, s, backend="emulated"), rtol=1e-5,
                          atol=1e-5 * y.abs().max().item())
    assert calc_diff(y.reshape(9, 150), x.double() @ w.double().t()) <= 1e-3
    yb = fp8_gemm_triton(x.to(torch.bfloat16).to(DEVICE), q.to(DEVICE), s.to(DEVICE)).cpu()
    assert yb.dtype == torch.bfloat16 and calc_diff(yb, x.double() @ w.double().t()) <= 1e-3
    # a wrong weight block scale (the second row of blocks, n >= 128) must show up
    s_bad = s.clone()
    s_bad[1, 0] *= 2
    y_bad = fp8_gemm_triton(x.to(DEVICE), q.to(DEVICE), s_bad.to(DEVICE)).cpu()
    assert torch.allclose(y_bad[:, :128], y.reshape(9, 150)[:, :128])
    assert not torch.allclose(y_bad[:, 128:], y.reshape(9, 150)[:, 128:], rtol=1e-3)


def test_bad_inputs_raise():
    _, _, q, s = make_inputs(4, 130, 200, seed=2)
    xq, xs = act_quant(torch.randn(4, 200))
    with pytest.raises(ValueError, match="w_scale has shape"):
        fp8_block_gemm_triton(xq, xs, q, s[:, :1])
    with pytest.raises(ValueError, match="x_scale has shape"):
        fp8_block_gemm_triton(xq, xs[:, :1], q, s)
    with pytest.raises(ValueError, match="must be"):
        fp8_block_gemm_triton(xq.float(), xs, q, s)
    with pytest.raises(ValueError, match="does not match weight in_features"):
        fp8_gemm_triton(torch.randn(4, 100), q, s)


def test_missing_triton_gives_clear_error(monkeypatch):
    monkeypatch.setattr(triton_kernels, "HAS_TRITON", False)
    _, _, q, s = make_inputs(4, 130, 200, seed=3)
    with pytest.raises(RuntimeError, match="pip install triton"):
        fp8_gemm_triton(torch.randn(4, 200), q, s)
