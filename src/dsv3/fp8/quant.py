"""Block-wise FP8 (E4M3) quantization as in the DeepSeek-V3 paper, section 3.3.

Weights: 128x128 blocks, one fp32 scale per block stored as `weight_scale_inv`
with shape (ceil(out/128), ceil(in/128)); dequant = fp8 block * scale_inv.
"""
import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK = 128


def weight_dequant(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(out, in) fp8 weight * per-block scale_inv -> dtype. Ragged edge blocks are handled."""
    if weight.dim() != 2:
        raise ValueError(f"FP8 weight must be 2-D, got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    rb, cb = -(-out_f // block), -(-in_f // block)
    if tuple(scale_inv.shape) != (rb, cb):
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {(rb, cb)} "
                         f"for a weight of shape {(out_f, in_f)} with {block}x{block} blocks")
    s = scale_inv.to(torch.float32)
    s = s.repeat_interleave(block, 0)[:out_f].repeat_interleave(block, 1)[:, :in_f]  # (out, in)
    return (weight.to(torch.float32) * s).to(dtype)
