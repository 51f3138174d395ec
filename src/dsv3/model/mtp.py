"""Multi-token prediction modules (DeepSeek-V3 §2.2, eq. 21-23).

h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])   (the released concat order)
h^k  = Block_k(h')
P    = head(norm_k(h^k))                                    (norm_k is `shared_head.norm`)
The embedding and output head are shared with the main model.
"""
import torch
from torch import nn

from dsv3.config import ModelConfig
from dsv3.model.linear import Linear
from dsv3.model.norm import RMSNorm


class MTP(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        from dsv3.model.transformer import Block  # Block is defined next to Transformer

        d = cfg.hidden_size
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * d, d, bias=False)  # (the CPU kernels in inference, as the projections)
        self.block = Block(layer_id, cfg)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, h, emb, cos, sin, positions, mask, cache=None):
        """h: h^{k-1} (B, S, D); emb: Emb(t_{i+k}) (B, S, D) -> (h^k, norm(h^k))."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        x = self.block(x, cos, sin, positions, mask, cache)
        return x, self.norm(x)
