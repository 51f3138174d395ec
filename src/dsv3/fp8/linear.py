"""FP8 linear layer with the DeepSeek-V3 fine-grained recipe (paper section 3.3).

y = x W^T with W stored as float8_e4m3fn in 128x128 blocks plus an fp32 `weight_scale_inv`
(the released checkpoint format), and x quantized on the fly in 1x128 tiles.

Two paths, tied together by tests/test_fp8_quant.py:
- `fp8_gemm_reference`: dequantize W to fp32 and matmul with x in fp32 (the slow twin).
- `fp8_gemm`: quantize x per 1x128 tile, then for each 128-wide block of the contraction
  dim K run an FP8 x FP8 product and scale it by (activation tile scale) x (weight block
  scale); the partial results are summed in fp32. This is the paper's "promotion to CUDA
  cores": Tensor Cores accumulate only ~14 bits, so every 128 elements of K the partial
  sum is scaled and added into an fp32 accumulator.
"""
import torch
from torch import nn

from dsv3.fp8.quant import BLOCK, FP8_DTYPE, _check_scale_fmt, act_quant, weight_dequant, weight_quant
from dsv3.kernels import cpu as cpu_kernels

BACKENDS = ("auto", "scaled_mm", "emulated")
_scaled_mm_ok: dict = {}  # device type -> bool, probed once


def _scaled_mm_supported(device: torch.device) -> bool:
    # torch._scaled_mm with fp32 row-wise scales exists on CPU in recent torch and on
    # Hopper-class GPUs; probe once per device type (with a known answer) so a build
    # without it falls back to emulation instead of failing.
    key = device.type
    if key not in _scaled_mm_ok:
        try:
            a = torch.ones(16, 32, device=device).to(FP8_DTYPE)
            b = torch.ones(16, 32, device=device).to(FP8_DTYPE)
            out = torch._scaled_mm(a, b.t(), scale_a=torch.full((16, 1), 0.5, device=device),
                                   scale_b=torch.full((1, 16), 2.0, device=device),
                                   out_dtype=torch.float32)
            _scaled_mm_ok[key] = bool(torch.all(out == 32.0))
        except (RuntimeError, TypeError, AttributeError, NotImplementedError):
            _scaled_mm_ok[key] = False
    return _scaled_mm_ok[key]


def _check_gemm_args(x, w_fp8, w_scale_inv, block):
    if w_fp8.dim() != 2:
        raise ValueError(f"FP8 weight must be 2-D (out, in), got shape {tuple(w_fp8.shape)}")
    n, k = w_fp8.shape
    if x.shape[-1] != k:
        raise ValueError(f"input last dim {x.shape[-1]} does not match weight in_features {k}")
    if tuple(w_scale_inv.shape) != (-(-n // block), -(-k // block)):
        raise ValueError(f"weight_scale_inv has shape {tuple(w_scale_inv.shape)}, expected "
                         f"{(-(-n // block), -(-k // block))} for a weight of shape {(n, k)}")


def fp8_gemm_reference(x: torch.Tensor, w_fp8: torch.Tensor, w_scale_inv: torch.Tensor,
                       block: int = BLOCK) -> torch.Tensor:
    """Slow twin: x @ dequant(W)^T in fp32, activations not quantized. Returns x.dtype."""
    _check_gemm_args(x, w_fp8, w_scale_inv, block)
    w = weight_dequant(w_fp8, w_scale_inv, block, dtype=torch.float32)
    return (x.to(torch.float32) @ w.t()).to(x.dtype)


def fp8_gemm(x: torch.Tensor, w_fp8: torch.Tensor, w_scale_inv: torch.Tensor, block: int = BLOCK,
             scale_fmt=None, backend: str = "auto") -> torch.Tensor:
    """x (..., K) @ W^T with W (N, K) fp8 + (ceil(N/block), ceil(K/block)) scales -> (..., N) x.dtype.

    backend: "scaled_mm" runs each K block as an FP8 x FP8 torch._scaled_mm with row-wise fp32
    scales; "emulated" decodes the fp8 values to fp32 (exact) and does the same per-block products;
    "auto" picks scaled_mm off-CPU when the probe passes; on the CPU, inference of up to
    cpu.FP8_MAX_ROWS rows takes this project's kernels (dsv3/kernels/fp8_cpu.c, the emulation's values
    summed in another order), else the emulation (torch's FP8 scaled_mm has no fast CPU kernel and
    measures slower than the emulation: benchmarks/fp8_bench.py)."""
    _check_gemm_args(x, w_fp8, w_scale_inv, block)
    _check_scale_fmt(scale_fmt)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    n, k = w_fp8.shape
    lead = x.shape[:-1]
    if backend == "auto" and x.device.type == "cpu":
        # inference on the CPU: the activations' quantization and the product in two kernel calls that read the
        # weight as its bytes (the same values and sums, in another order; "emulated" below is its twin,
        # tests/test_fp8_cpu.py)
        y = cpu_kernels.fp8_linear(x.reshape(-1, k), w_fp8, w_scale_inv, block, quantize=True, scale_fmt=scale_fmt)
        if y is not None:
            return y.to(x.dtype).reshape(*lead, n)
    xq, xs = act_quant(x.reshape(-1, k), block, scale_fmt)  # (M, K) fp8, (M, KB) fp32
    m = xq.shape[0]
    # Weight block scales broadcast to one per output column: (KB, N).
    ws = w_scale_inv.to(torch.float32).t().repeat_interleave(block, dim=1)[:, :n].contiguous()
    use_smm = backend == "scaled_mm" or (backend == "auto" and x.device.type != "cpu"
                                         and _scaled_mm_supported(x.device))
    if not use_smm:
        # fp8 -> fp32 is exact; decoding the weight in one contiguous pass is several times
        # faster on CPU than decoding strided 128-column slices inside the loop.
        xf, wf = xq.to(torch.float32), w_fp8.to(torch.float32)
    out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    for kb in range(xs.shape[1]):
        k0, k1 = kb * block, min((kb + 1) * block, k)
        sa, sb = xs[:, kb:kb + 1].contiguous(), ws[kb:kb + 1]  # (M, 1), (1, N)
        if use_smm:
            a, b = xq[:, k0:k1], w_fp8[:, k0:k1]  # (M, bk), (N, bk)
            if k1 - k0 < block:
                # Ragged last K block: zero-pad to a full block (fp8 GEMM kernels want
                # K in multiples of 16; zeros add nothing to the dot products).
                pad = block - (k1 - k0)
                a = torch.nn.functional.pad(a.view(torch.uint8), (0, pad)).view(FP8_DTYPE)
                b = torch.nn.functional.pad(b.view(torch.uint8), (0, pad)).view(FP8_DTYPE)
            # FP8 x FP8 with the two scales applied to the fp32 result of this K block.
            out += torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32)
        else:
            # Emulation: fp8 values are exact in fp32, so this is the same product with
            # fp32 accumulation; scales are applied to the block's partial sum, as above.
            out += (xf[:, k0:k1] @ wf[:, k0:k1].t()).mul_(sa).mul_(sb)
    return out.to(x.dtype).reshape(*lead, n)


class FP8Linear(nn.Module):
    """y = x W^T (+ bias) with W in the released FP8 format: `weight` (float8_e4m3fn, (out, in))
    and `weight_scale_inv` (fp32, (ceil(out/128), ceil(in/128))), stored as buffers so the
    state_dict keys match the checkpoint names `<name>.weight` / `<name>.weight_scale_inv`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, block: int = BLOCK,
                 scale_fmt=None, reference: bool = False, backend: str = "auto",
                 device=None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        _check_scale_fmt(scale_fmt)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.in_features, self.out_features = in_features, out_features
        self.block, self.scale_fmt = block, scale_fmt
        self.reference = reference  # True: dequantize + matmul (slow twin), for checks
        self.backend = backend
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale_inv", torch.ones(
            -(-out_features // block), -(-in_features // block), dtype=torch.float32, device=device))
        # bias stays in high precision (the paper keeps small tensors out of FP8)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scale_fmt=None, block: int = BLOCK, **kwargs) -> "FP8Linear":
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, block=block,
                scale_fmt=scale_fmt, device=linear.weight.device,
                dtype=linear.bias.dtype if linear.bias is not None else torch.bfloat16, **kwargs)
        with torch.no_grad():
            q, s = weight_quant(linear.weight.detach(), block, scale_fmt)
            m.weight.copy_(q)
            m.weight_scale_inv.copy_(s)
            if linear.bias is not None:
                m.bias.copy_(linear.bias.detach())
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reference:
            y = fp8_gemm_reference(x, self.weight, self.weight_scale_inv, self.block)
        else:
            y = fp8_gemm(x, self.weight, self.weight_scale_inv, self.block, self.scale_fmt, self.backend)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, block={self.block}, scale_fmt={self.scale_fmt}")
