"""Optional Triton kernel for the DeepSeek-V3 block-scaled FP8 GEMM (paper section 3.3).

One program computes a (BLOCK_M, BLOCK_N) tile of y = x W^T. It walks K in steps of 128 (the
quantization block): loads the fp8 tiles, decodes them to fp32 (exact: every E4M3 value is an
fp32 value), takes the 128-wide block product with tl.dot, scales that partial sum by
x_scale[m, kb] * w_scale[n // 128, kb] and adds it into an fp32 accumulator. That is the paper's
"promotion to CUDA cores" every 128 elements of K, and it is the same arithmetic as the
emulated path of `dsv3.fp8.linear.fp8_gemm` (the slow twin, tied by tests/test_fp8_triton.py).

Triton is optional: without it this module still imports, and the entry points raise a
RuntimeError that says so. On a machine without a GPU the kernel runs under Triton's
interpreter when TRITON_INTERPRET=1 is set before triton is imported (the tests do this).
"""
import torch

from dsv3.fp8.linear import _check_gemm_args
from dsv3.fp8.quant import BLOCK, FP8_DTYPE, _check_scale_fmt, act_quant

try:
    import triton
    import triton.language as tl
except ImportError:  # optional dependency: only the entry points below need it
    triton = None
    tl = None

HAS_TRITON = triton is not None


def _require_triton():
    if not HAS_TRITON:
        raise RuntimeError("dsv3.fp8.triton_kernels needs the optional 'triton' package "
                           "(pip install triton); use dsv3.fp8.linear.fp8_gemm instead")


if HAS_TRITON:

    @triton.jit
    def _fp8_block_gemm_kernel(
        x_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr,
        M, N, K,
        stride_xm, stride_xk, stride_xsm, stride_xsk,
        stride_wn, stride_wk, stride_wsn, stride_wsk,
        stride_ym, stride_yn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_n = offs_n < N
        # Weight scales are per 128x128 block: the row of w_scale for each output column.
        ws_row = offs_n // BLOCK_K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            k = kb * BLOCK_K + offs_k
            mask_k = k < K
            # Ragged edges load as 0: zeros add nothing to the block's dot products.
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(w_ptr + offs_n[None, :] * stride_wn + k[:, None] * stride_wk,
                        mask=mask_n[None, :] & mask_k[:, None], other=0.0)  # (BLOCK_K, BLOCK_N)
            # fp8 -> fp32 is exact, and E4M3 values (4 significant bits) are also exact in tf32,
            # so the Tensor Core tf32 product of two of them is exact; sums stay in fp32.
            part = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
            sa = tl.load(xs_ptr + offs_m * stride_xsm + kb * stride_xsk, mask=mask_m, other=0.0)
            sb = tl.load(ws_ptr + ws_row * stride_wsn + kb * stride_wsk, mask=mask_n, other=0.0)
            # Promotion: scale this K block's partial sum, then add into the fp32 accumulator
            # (same order of operations as fp8_gemm's emulated path: (a @ b) * sa * sb).
            acc += part * sa[:, None] * sb[None, :]
        y = acc.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, y,
                 mask=mask_m[:, None] & mask_n[None, :])


def fp8_block_gemm_triton(x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor,
                          w_scale: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_fp8 (M, K) with 1x128 scales (M, ceil(K/128)) times w_fp8 (N, K) with 128x128 scales
    (ceil(N/128), ceil(K/128)), transposed -> (M, N) in out_dtype (fp32 or bf16)."""
    _require_triton()
    if x_fp8.dim() != 2 or w_fp8.dim() != 2:
        raise ValueError(f"fp8_block_gemm_triton expects 2-D x and w, got shapes "
                         f"{tuple(x_fp8.shape)} and {tuple(w_fp8.shape)}")
    if x_fp8.dtype != FP8_DTYPE or w_fp8.dtype != FP8_DTYPE:
        raise ValueError(f"x and w must be {FP8_DTYPE}, got {x_fp8.dtype} and {w_fp8.dtype}")
    m, k = x_fp8.shape
    n, kw = w_fp8.shape
    if kw != k:
        raise ValueError(f"x has K={k} but w has in_features={kw}")
    kb, nb = -(-k // BLOCK), -(-n // BLOCK)
    if tuple(x_scale.shape) != (m, kb):
        raise ValueError(f"x_scale has shape {tuple(x_scale.shape)}, expected {(m, kb)} (1x{BLOCK} tiles)")
    if tuple(w_scale.shape) != (nb, kb):
        raise ValueError(f"w_scale has shape {tuple(w_scale.shape)}, expected {(nb, kb)} "
                         f"({BLOCK}x{BLOCK} blocks)")
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"out_dtype must be torch.float32 or torch.bfloat16, got {out_dtype}")
    devices = {t.device for t in (x_fp8, x_scale, w_fp8, w_scale)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    x_scale = x_scale.to(torch.float32)
    w_scale = w_scale.to(torch.float32)
    y = torch.empty(m, n, dtype=out_dtype, device=x_fp8.device)
    if m == 0 or n == 0:
        return y
    # tl.dot needs tiles of at least 16; BLOCK_N = 128 keeps one weight-scale row per tile on GPU.
    block_m = max(16, min(64, triton.next_power_of_2(m)))
    block_n = 128
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _fp8_block_gemm_kernel[grid](
        x_fp8, x_scale, w_fp8, w_scale, y,
        m, n, k,
        x_fp8.stride(0), x_fp8.stride(1), x_scale.stride(0), x_scale.stride(1),
        w_fp8.stride(0), w_fp8.stride(1), w_scale.stride(0), w_scale.stride(1),
        y.stride(0), y.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK,
    )
    return y


def fp8_gemm_triton(x: torch.Tensor, w_fp8: torch.Tensor, w_scale_inv: torch.Tensor,
                    scale_fmt=None) -> torch.Tensor:
    """x (..., K) @ W^T with W (N, K) fp8 + 128x128 scale_inv -> (..., N) in x.dtype; x is
    quantized on the fly in 1x128 tiles (act_quant), as in fp8_gemm."""
    _require_triton()
    _check_gemm_args(x, w_fp8, w_scale_inv, BLOCK)
    _check_scale_fmt(scale_fmt)
    n, k = w_fp8.shape
    lead = x.shape[:-1]
    xq, xs = act_quant(x.reshape(-1, k), BLOCK, scale_fmt)  # (M, K) fp8, (M, KB) fp32
    out_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    y = fp8_block_gemm_triton(xq, xs, w_fp8, w_scale_inv, out_dtype=out_dtype)
    return y.to(x.dtype).reshape(*lead, n)
