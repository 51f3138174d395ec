"""nn.Linear for the model's projections, with a kernel for the few-row products of decode steps."""
import torch.nn.functional as F
from torch import nn

from dsv3.kernels import cpu as cpu_kernels


class Linear(nn.Linear):
    """An nn.Linear (same parameters, state_dict and construction) whose decode-sized inference calls
    (at most cpu_kernels.LINEAR_MAX_ROWS rows, where dsv3.kernels.cpu.usable says so) take the CPU
    kernel; everything else, training included, is F.linear, its twin (tests/test_cpu_kernels.py). The
    kernel's values are those of a dot product per output, summed in a fixed order whatever the other
    rows: they differ from F.linear's by fp32 rounding only (bf16: both round the fp32 sum to bf16 once)."""

    def forward(self, x):
        if self.bias is None and cpu_kernels.usable(x, self.weight):
            K = x.shape[-1]
            rows = x.numel() // K if K else 0
            if 0 < rows <= cpu_kernels.LINEAR_MAX_ROWS:
                return cpu_kernels.linear(x.reshape(rows, K), self.weight).view(*x.shape[:-1], self.weight.shape[0])
        return F.linear(x, self.weight, self.bias)
