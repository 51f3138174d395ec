"""nn.Linear for the model's projections, with CPU kernels for inference products."""
import torch
import torch.nn.functional as F
from torch import nn

from dsv3.kernels import cpu as cpu_kernels


def kernel_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x (..., K) @ weight (N, K)^T through a CPU kernel where one takes it (dsv3.kernels.cpu.usable:
    inference on an AVX-512 CPU), else None: decode-sized calls (at most cpu_kernels.LINEAR_MAX_ROWS rows, fp32
    or bf16) take the few-row kernel, more bf16 rows the bf16 GEMM (PyTorch's CPU bf16 GEMM is the slower)."""
    if not cpu_kernels.usable(x, weight):
        return None
    K = x.shape[-1]
    rows = x.numel() // K if K else 0
    if 0 < rows <= cpu_kernels.LINEAR_MAX_ROWS:
        return cpu_kernels.linear(x.reshape(rows, K), weight).view(*x.shape[:-1], weight.shape[0])
    if rows > cpu_kernels.LINEAR_MAX_ROWS and x.dtype == torch.bfloat16 and cpu_kernels.gemm_usable(x, weight):
        return cpu_kernels.gemm(x.reshape(rows, K), weight).view(*x.shape[:-1], weight.shape[0])
    return None


class Linear(nn.Linear):
    """An nn.Linear (same parameters, state_dict and construction) whose inference calls take the CPU
    kernels where kernel_linear says so; everything else, training included, is F.linear, its twin
    (tests/test_cpu_kernels.py). The kernels' values are those of a sum per output in a fixed order whatever
    the other rows: they differ from F.linear's by fp32 rounding only (bf16: both round the fp32 sum to bf16
    once)."""

    def forward(self, x):
        if self.bias is None:
            y = kernel_linear(x, self.weight)
            if y is not None:
                return y
        return F.linear(x, self.weight, self.bias)
