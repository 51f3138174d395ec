"""Paged latent cache: the absorbed-MLA cache (kv_lora_rank + qk_rope_head_dim values per token per
layer) held in fixed-size blocks of one preallocated pool, as vLLM's PagedAttention does for K/V
(Kwon et al. 2023, arXiv:2309.06180). Requests own lists of block ids; nothing is reallocated
while they grow, and blocks go back to the pool when they finish.

Prefix caching: a full block is keyed by a hash chain over the tokens it holds, the key of the
block before it, and the token that follows it. The next token is in the key because the MTP
layers' latent at a block's last position depends on it (the MTP module at position i reads
Emb(t_{i+1})); it costs no hits, since a hit must leave at least one prompt token to compute
anyway. Blocks are shared by reference count; a block whose count drops to zero stays findable
(evictable, least recently freed first) until its slot is needed again.
"""
import hashlib
from collections import OrderedDict, deque

import torch

from dsv3.config import ModelConfig

NULL_BLOCK = 0  # never handed out: the padding entry of block tables (reads there are masked out)


class NoFreeBlocks(RuntimeError):
    pass


def block_key(parent: bytes | None, tokens, next_token: int) -> bytes:
    h = hashlib.sha256(parent or b"root")
    h.update(torch.tensor(list(tokens) + [next_token], dtype=torch.int64).numpy().tobytes())
    return h.digest()


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = True):
        if num_blocks < 2:
            raise ValueError(f"the cache needs at least 2 blocks (one is reserved), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_cache = enable_prefix_cache
        self.free = deque(range(1, num_blocks))
        self.ref = [0] * num_blocks
        self.key: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}          # key -> block holding those tokens' latents
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks with ref 0, LRU first
        self.hits = self.queries = 0                # prefix-cache tokens found / looked up

    @property
    def usable(self) -> int:
        return self.num_blocks - 1

    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)

    def num_used(self) -> int:
        return self.usable - self.num_free()

    def allocate(self) -> int:
        if self.free:
            b = self.free.popleft()
        elif self.evictable:
            b, _ = self.evictable.popitem(last=False)
            del self.cached[self.key[b]]
            self.key[b] = None
        else:
            raise NoFreeBlocks("the latent cache is full")
        assert self.ref[b] == 0
        self.ref[b] = 1
        return b

    def lookup(self, key: bytes) -> int | None:
        return self.cached.get(key) if self.enable_prefix_cache else None

    def acquire(self, b: int):
        if self.ref[b] == 0:
            del self.evictable[b]
        self.ref[b] += 1

    def release(self, b: int):
        assert self.ref[b] > 0, f"block {b} released more often than acquired"
        self.ref[b] -= 1
        if self.ref[b] == 0:
            if self.key[b] is not None:
                self.evictable[b] = None
            else:
                self.free.append(b)

    def register(self, b: int, key: bytes):
        """Offer a full, fully computed block to the prefix cache (first writer wins)."""
        if self.enable_prefix_cache and key not in self.cached and self.key[b] is None:
            self.cached[key] = b
            self.key[b] = key

    def reset_prefix_cache(self):
        for b in list(self.evictable):
            self.free.append(b)
        self.evictable.clear()
        for b in range(self.num_blocks):
            self.key[b] = None
        self.cached.clear()


class PagedLatentCache:
    """Implements the model's cache protocol (dsv3.model.mla) over the block pool. Before each
    forward the engine binds the block table (B, n) of the rows and their positions; `update` then
    writes the new latents into their slots and gathers each row's slots 0..L-1 in order.

    A slot holds the latent and the rotated key side by side (C + R values, one row of `lat`; `kv`
    and `pe` are views of its two parts): one write and one gather per layer, and the (kv_all,
    pe_all) that `update` returns are the two halves of one (B, L, C + R) tensor, which the
    absorbed attention scores in one product (MLA._joined)."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, n_layers: int,
                 dtype=torch.float32, device="cpu"):
        self.num_blocks, self.block_size, self.n_layers = num_blocks, block_size, n_layers
        C = cfg.kv_lora_rank
        # zeros: padded/stale slots are masked, but 0 * NaN would still poison the attention output
        self.lat = torch.zeros(n_layers, num_blocks * block_size, C + cfg.qk_rope_head_dim, dtype=dtype,
                               device=device)
        self.kv, self.pe = self.lat[..., :C], self.lat[..., C:]
        self._positions = self._slots = self._read = None
        self._L = 0
        # kernel_slots' answers: each layer's (kv, pe) views of the pool (made once), and this forward's
        # (write slots, read slots (B, L)) pair (made once per bind): a decode step asks for them per layer
        self._layer_halves = [(lat[:, :C], lat[:, C:]) for lat in self.lat] if self.lat.device.type == "cpu" else None
        self._kernel_rows = None

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, n_layers: int, dtype) -> int:
        return n_layers * block_size * cfg.kv_cache_dim * torch.empty((), dtype=dtype).element_size()

    def bind(self, tables: torch.Tensor, positions: torch.Tensor):
        """tables (B, n) block ids (NULL_BLOCK past a row's blocks); positions (B, S) of this forward."""
        bs = self.block_size
        self._L = L = int(positions.max()) + 1
        assert tables.shape[1] * bs >= L, "block table too short for these positions"
        self._positions = positions
        self._slots = (tables.gather(1, positions // bs) * bs + positions % bs).flatten()
        # the slots of positions 0..L-1 of every row, row-major: one index_select per layer gathers them
        t = torch.arange(L, device=tables.device)
        self._read = (tables[:, t // bs] * bs + t % bs).flatten()
        self._kernel_rows = None

    def kernel_slots(self, layer: int, positions: torch.Tensor):
        """The pool as the CPU decode kernels address it (dsv3.kernels.cpu.mla_block): layer's kv and pe
        halves of the slot rows, the slots the bound positions are written to, and each row's slots of
        positions 0..L-1 (B, L) (what `update` writes and gathers)."""
        assert positions is self._positions, "bind() the block tables of this forward first"
        if self._layer_halves is None:
            return None
        if self._kernel_rows is None:
            self._kernel_rows = (self._slots, self._read.view(positions.shape[0], self._L))
        return self._layer_halves[layer] + self._kernel_rows

    def update(self, layer: int, kv: torch.Tensor, pe: torch.Tensor, positions: torch.Tensor):
        # kv (B, S, C), pe (B, S, R); slot t of row b lives at block tables[b, t // bs], offset t % bs
        assert positions is self._positions, "bind() the block tables of this forward first"
        B, S, C = kv.shape
        lat = self.lat[layer]
        lat.index_copy_(0, self._slots, torch.cat([kv, pe], dim=-1).reshape(B * S, -1).to(lat.dtype))
        g = lat.index_select(0, self._read).view(B, self._L, -1)  # (B, L, C + R)
        return g[..., :C], g[..., C:]
