"""Rotary embedding with DeepSeek's YaRN extension (arXiv:2309.00071; DeepSeek-V2 appendix, V3 §4.3).

Frequencies follow the official inference code's `precompute_freqs_cis`: the YaRN ramp blends
interpolated (freq / factor) and extrapolated frequencies between the correction dims of
beta_fast and beta_slow. Rotation acts on interleaved pairs (x0, x1), (x2, x3), ... as in the
released weights (`rope_interleave=False` rotates halves, for third-party checkpoints).
"""
import math

import torch

from dsv3.config import ModelConfig
from dsv3.kernels import cpu as cpu_kernels


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Returns (inverse frequencies (rope_dim/2,), cos/sin scaling)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if cfg.rope_scaling_type != "yarn":
        return freqs, 1.0
    factor = cfg.rope_factor

    def correction_dim(rotations):
        return dim * math.log(cfg.original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    smooth = 1 - ramp  # 1: keep the original (high) frequency, 0: interpolate
    freqs = freqs / factor * (1 - smooth) + freqs * smooth
    # Scaling of cos/sin: the ratio of the two mscales (HF's DeepSeek-V2 remote code and transformers);
    # 1.0 for every released config, where mscale == mscale_all_dim.
    if cfg.mscale and cfg.mscale_all_dim:
        att = _yarn_mscale(factor, cfg.mscale) / _yarn_mscale(factor, cfg.mscale_all_dim)
    else:
        att = _yarn_mscale(factor)
    return freqs, att


class Rotary(torch.nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        f, self.scaling = inv_freq(cfg)
        self.register_buffer("inv_freq", f, persistent=False)

    def reset(self):
        """Recompute the (non-persistent) frequency table, e.g. after building on the meta device."""
        self.inv_freq = inv_freq(self.config)[0]

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, S) -> cos, sin (B, S, 1, rope/2), fp32."""
        ang = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device)
        return (ang.cos() * self.scaling)[:, :, None, :], (ang.sin() * self.scaling)[:, :, None, :]



def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = True) -> torch.Tensor:
    """x (B, S, H, rope) rotated; computed in fp32, returned in x's dtype. Layout is preserved."""
    out = cpu_kernels.rotary(x, cos, sin, interleave)  # CPU inference: one kernel call
    if out is not None:
        return out
    xf = x.float()
    if interleave:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        half = xf.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
