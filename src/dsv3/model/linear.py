"""nn.Linear for the model's projections, with CPU kernels for inference products."""
import torch
import torch.nn.functional as F
from torch import nn

from dsv3.kernels import cpu as cpu_kernels


class Linear(nn.Linear):
    """An nn.Linear (same parameters, state_dict and construction; the model's projections and its output head)
    whose inference calls take the CPU kernels where dsv3.kernels.cpu.usable says so (inference on an AVX-512
    CPU): decode-sized calls (at most cpu_kernels.LINEAR_MAX_ROWS rows, fp32 or bf16) the few-row kernel, more
    bf16 rows the bf16 GEMM (PyTorch's CPU bf16 GEMM is the slower). Everything else, training included, is
    F.linear, its twin (tests/test_cpu_kernels.py). The kernels' values are those of a sum per output in a
    fixed order whatever the other rows: they differ from F.linear's by fp32 rounding only (bf16: both round
    the fp32 sum to bf16 once)."""

    def forward(self, x):
        return project(x, self.weight) if self.bias is None else F.linear(x, self.weight, self.bias)


def project(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w^T as Linear computes it without a bias: the CPU kernels where they apply, else F.linear (for
    weights that are not a module's, e.g. the engine's draft-vocabulary rows of the head)."""
    if cpu_kernels.usable(x, w):
        K = x.shape[-1]
        rows = x.numel() // K if K else 0
        if 0 < rows <= cpu_kernels.LINEAR_MAX_ROWS:
            return cpu_kernels.linear(x.reshape(rows, K), w).view(*x.shape[:-1], w.shape[0])
        if rows > cpu_kernels.LINEAR_MAX_ROWS and x.dtype == torch.bfloat16 and cpu_kernels.gemm_usable(x, w):
            return cpu_kernels.gemm(x.reshape(rows, K), w).view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)
