"""Latent KV caches for the absorbed MLA path: per token per layer only the normalised latent
(kv_lora_rank values) and the rotated shared rope key (qk_rope_head_dim values) are kept."""
import torch

from dsv3.config import ModelConfig


class LatentCache:
    """Contiguous cache for a fixed batch: slot t of row b holds the token at position t of
    sequence b (the protocol MLA expects; see dsv3.model.mla)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype=torch.float32, device="cpu",
                 n_layers: int | None = None):
        n_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers if n_layers is None else n_layers
        self.max_len = max_len
        self.kv = torch.zeros(n_layers, batch, max_len, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.pe = torch.zeros(n_layers, batch, max_len, cfg.qk_rope_head_dim, dtype=dtype, device=device)

    def update(self, layer: int, kv: torch.Tensor, pe: torch.Tensor, positions: torch.Tensor):
        # kv (B, S, C), pe (B, S, R), positions (B, S) -> the first max(positions)+1 slots
        L = int(positions.max()) + 1
        if L > self.max_len:
            raise ValueError(f"position {L - 1} is beyond the cache length {self.max_len}")
        rows = torch.arange(kv.shape[0], device=kv.device)[:, None]
        self.kv[layer][rows, positions] = kv.to(self.kv.dtype)
        self.pe[layer][rows, positions] = pe.to(self.pe.dtype)
        return self.kv[layer, :, :L], self.pe[layer, :, :L]

    def bytes_per_token_per_layer(self) -> int:
        return (self.kv.shape[-1] + self.pe.shape[-1]) * self.kv.element_size()
