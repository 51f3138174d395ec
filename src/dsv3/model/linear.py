"""nn.Linear for the model's projections, with a kernel for the few-row products of decode steps."""
import torch
import torch.nn.functional as F
from torch import nn

from dsv3.kernels import cpu as cpu_kernels

# Without autograd, fp32 and bf16 CPU products of at most this many rows run through
# dsv3.kernels.cpu.linear (AVX-512; docs/engine.md); more rows, another dtype or device, autograd, or
# no kernel: F.linear.
KERNEL_MAX_ROWS = 16


class Linear(nn.Linear):
    """An nn.Linear (same parameters, state_dict and construction) whose decode-sized inference calls
    take the CPU kernel. The kernel's values are those of a dot product per output, summed in a fixed
    order whatever the other rows: they differ from F.linear's by fp32 rounding only (bf16: both round
    the fp32 sum to bf16 once)."""

    def forward(self, x):
        w = self.weight
        if (self.bias is None and x.dtype is w.dtype and x.dtype in cpu_kernels.DTYPES and x.device.type == "cpu"
                and not torch.compiler.is_compiling()
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            K = x.shape[-1]
            rows = x.numel() // K if K else 0
            if 0 < rows <= KERNEL_MAX_ROWS and w.is_contiguous() and cpu_kernels.library() is not None:
                return cpu_kernels.linear(x.reshape(rows, K), w).view(*x.shape[:-1], w.shape[0])
        return F.linear(x, w, self.bias)
