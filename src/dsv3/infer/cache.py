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
        L = self._length(positions)
        rows = torch.arange(kv.shape[0], device=kv.device)[:, None]
        self.kv[layer][rows, positions] = kv.to(self.kv.dtype)
        self.pe[layer][rows, positions] = pe.to(self.pe.dtype)
        return self.kv[layer, :, :L], self.pe[layer, :, :L]

    def _length(self, positions: torch.Tensor) -> int:
        """The slots a forward at these positions reads: max(positions) + 1, within the cache."""
        L = int(positions.max()) + 1
        if L > self.max_len:
            raise ValueError(f"position {L - 1} is beyond the cache length {self.max_len}")
        return L

    def kernel_slots(self, layer: int, positions: torch.Tensor):
        """The cache as the CPU decode kernels address it (dsv3.kernels.cpu.mla_block): layer's kv (B * max_len, C)
        and pe (B * max_len, R) rows, the rows the tokens at `positions` (B, S) are written to (B * S,), and
        the rows each sequence reads, slots 0..L-1 (B, L). The two index tensors are kept for the next
        layers while the positions stay the same."""
        if self.kv.device.type != "cpu":
            return None
        memo = getattr(self, "_slots_memo", None)
        if memo is None or memo[0].shape != positions.shape or not torch.equal(memo[0], positions):
            if positions.device.type != "cpu":
                return None
            B = self.kv.shape[1]
            L = self._length(positions)
            if int(positions.min()) < 0:
                raise ValueError(f"negative position {int(positions.min())}")
            if positions.shape[0] != B:
                raise ValueError(f"{positions.shape[0]} rows of positions for a cache of {B} rows")
            base = torch.arange(B)[:, None] * self.max_len
            memo = (positions.clone(), (base + positions).flatten().contiguous(), base + torch.arange(L)[None])
            self._slots_memo = memo
        return self.kv[layer].view(-1, self.kv.shape[-1]), self.pe[layer].view(-1, self.pe.shape[-1]), memo[1], memo[2]

    def bytes_per_token_per_layer(self) -> int:
        return (self.kv.shape[-1] + self.pe.shape[-1]) * self.kv.element_size()
