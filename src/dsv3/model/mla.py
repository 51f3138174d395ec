"""Multi-head Latent Attention (DeepSeek-V2 §2.1, V3 §2.1.1).

Keys and values are compressed into a latent c_kv (kv_lora_rank values) plus one shared rotary
key k_pe (qk_rope_head_dim values): that is all a cache needs to hold per token per layer.

Two twins compute the same attention:
- naive: decompress K/V from the latent through wkv_b and attend per head (cheap for prefill);
- absorbed: fold wkv_b's key half into the query and its value half into the output, so the
  attention runs directly on the cached latent (cheap for decode: nothing is decompressed).

Cache protocol (used by generate() and the inference engine): an object with
`update(layer_id, kv (B, S, C), pe (B, S, R), positions (B, S)) -> (kv_all (B, L, C), pe_all (B, L, R))`
where slot t of the returned tensors holds the token at position t. Masks are built from
positions only (key slot t is visible to a query at position p iff t <= p), so a cache can be
rolled back (speculative decoding) simply by writing over the slots again.
"""
import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelConfig
from dsv3.kernels import cpu as cpu_kernels
from dsv3.model.norm import RMSNorm
from dsv3.model.linear import Linear
from dsv3.model.rope import apply_rotary

# Compiled training on CPU: causal self-attention over at most this many positions runs as blocked
# math attention (blocked_causal_attention) instead of PyTorch's fused CPU kernel; longer sequences
# keep the fused kernel, whose memory does not grow with S^2.
MATH_ATTN_MAX_LEN = 512
MATH_ATTN_BLOCK = 64  # query rows per block


def blocked_causal_attention(q, k, v, scale: float) -> torch.Tensor:
    """Causal softmax(q k^T * scale) v for q, k (B, S, H, E) and v (B, S, H, Ev) -> (B, S, H, Ev),
    the same function as F.scaled_dot_product_attention(..., is_causal=True), written as two matmuls
    and a softmax per block of MATH_ATTN_BLOCK query rows: rows [i, e) only see keys [0, e), so most
    of the masked upper triangle is never computed (5/8 of the full score matrix at 4 blocks), and V
    needs no zero padding to the query head dim. Scores and softmax in fp32 (DESIGN.md), as SDPA
    accumulates internally. Only used under torch.compile (MLA._naive, when MLA.blocked_attention is set), where inductor fuses the
    scale, mask and softmax (forward and backward) around the GEMMs: there it ran ~1.3x faster than
    the fused CPU kernel at S = 128 and 256 (docs/training.md); eagerly the fused kernel is faster."""
    S = q.shape[1]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, E)
    outs = []
    for i in range(0, S, MATH_ATTN_BLOCK):
        e = min(i + MATH_ATTN_BLOCK, S)
        s = torch.matmul(q[:, :, i:e], k[:, :, :e].transpose(-1, -2)).float() * scale  # (B, H, e - i, e)
        future = torch.arange(e, device=q.device)[None, :] > torch.arange(i, e, device=q.device)[:, None]
        p = s.masked_fill(future, float("-inf")).softmax(dim=-1).to(v.dtype)
        outs.append(torch.matmul(p, v[:, :, :e]))  # (B, H, e - i, Ev)
    return torch.cat(outs, dim=2).transpose(1, 2)  # (B, S, H, Ev)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.qk_head_dim = cfg.qk_head_dim
        h, dim = self.n_heads, cfg.hidden_size
        if cfg.q_lora_rank is None:
            self.wq = Linear(dim, h * self.qk_head_dim, bias=False)
        else:
            self.wq_a = Linear(dim, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank)  # eps 1e-6 in the reference, not rms_norm_eps
            self.wq_b = Linear(cfg.q_lora_rank, h * self.qk_head_dim, bias=False)
        self.wkv_a = Linear(dim, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank)
        self.wkv_b = Linear(self.kv_lora_rank, h * (self.nope + self.v_dim), bias=False)
        self.wo = Linear(h * self.v_dim, dim, bias=False)
        self.softmax_scale = cfg.softmax_scale
        # naive-path causal attention as blocked_causal_attention while torch.compile traces it; who
        # compiles decides (dsv3.train.trainer.compile_model turns it on for CPU training)
        self.blocked_attention = False
        self.interleave = cfg.rope_interleave
        # "naive", "absorb", or "auto": whichever needs fewer FLOPs for this query/key shape (naive for
        # prefill and training, absorbed for decode and short verify chunks over a long cache).
        self.attn_impl = "auto"

    def _q(self, x):
        q = self.wq(x) if self.q_lora_rank is None else self.wq_b(self.q_norm(self.wq_a(x)))
        return q.view(*x.shape[:2], self.n_heads, self.qk_head_dim)  # (B, S, H, nope + rope), rope not rotated

    def _query(self, x, cos, sin):
        q_nope, q_pe = self._q(x).split([self.nope, self.rope_dim], dim=-1)
        return q_nope, apply_rotary(q_pe, cos, sin, self.interleave)

    def latent(self, x, cos, sin):
        """(B, S, D) -> normalised latent (B, S, C) and rotated shared key (B, S, R): what is cached."""
        kv, pe = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_norm(kv), apply_rotary(pe.unsqueeze(2), cos, sin, self.interleave).squeeze(2)

    def forward(self, x, cos, sin, positions, mask, cache=None):
        # x (B, S, D); cos/sin (B, S, 1, R/2); positions (B, S); mask (B, S, L) bool or None (causal, no cache)
        q = self._q(x)
        kv, pe = self.latent(x, cos, sin)
        if cache is not None:
            kv, pe = cache.update(self.layer_id, kv, pe, positions)
        impl = self.attn_impl
        if impl == "auto":
            impl = self._cheaper(x.shape[1], kv.shape[1])
        o = None
        if impl != "naive" and cpu_kernels.step_usable(q) and not (torch.is_grad_enabled() and any(
                t.requires_grad for t in (kv, pe, self.wkv_b.weight))):
            # decode-sized inference on the CPU: the whole absorbed attention, query rotation included, in
            # one kernel call (dsv3/kernels/attn_cpu.c; None where it does not take these tensors)
            w_k, w_v = self._absorb_weights(torch.float32)
            o = cpu_kernels.mla_attend(q, cos, sin, kv, pe, mask, w_k, w_v.transpose(1, 2), self.nope,
                                       self.softmax_scale, self.interleave)
        if o is None:
            q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
            q_pe = apply_rotary(q_pe, cos, sin, self.interleave)
            o = (self._naive if impl == "naive" else self._absorbed)(q_nope, q_pe, kv, pe, mask)
        return self.wo(o.flatten(2))

    def decode_block(self, x, norm, cos, sin, positions, mask, cache):
        """x + self(norm(x), ...) for the few rows of a decode step over a cache that offers its slots to
        the CPU kernels (`cache.kernel_slots`): the whole attention half of the block in one kernel call
        (dsv3/kernels/attn_cpu.c, dsv3_mla_block). None where that does not apply; the caller then runs
        the modules (their twin, tests/test_cpu_block_kernels.py)."""
        B, S = x.shape[:2]
        if (cache is None or B * S > cpu_kernels.LINEAR_MAX_ROWS or self.attn_impl == "naive"
                or not hasattr(cache, "kernel_slots") or not cpu_kernels.usable(x)):
            return None
        slots = cache.kernel_slots(self.layer_id, positions)
        if slots is None or (self.attn_impl == "auto" and self._cheaper(S, slots[3].shape[1]) == "naive"):
            return None
        return cpu_kernels.mla_block(x, norm, self, cos, sin, mask, slots)

    def _cheaper(self, S: int, L: int) -> str:
        """FLOPs per batch row: naive decompresses all L latents through wkv_b then attends per
        head; absorbed maps the S queries into the latent space and attends over L latents."""
        H, C, R = self.n_heads, self.kv_lora_rank, self.rope_dim
        naive = L * C * H * (self.nope + self.v_dim) + S * L * H * (self.qk_head_dim + self.v_dim)
        absorb = S * H * C * (self.nope + self.v_dim) + S * L * H * (2 * C + R)
        return "naive" if naive <= absorb else "absorb"

    def _naive(self, q_nope, q_pe, kv, pe, mask):
        B, S, H, _ = q_nope.shape
        L = kv.shape[1]
        kvb = self.wkv_b(kv).view(B, L, H, self.nope + self.v_dim)  # (B, L, H, nope + v)
        if cpu_kernels.gemm_usable(q_nope):  # CPU inference: one kernel call (dsv3/kernels/gemm_cpu.c)
            o = cpu_kernels.prefill_attend(q_nope, q_pe, kvb, pe, mask, self.softmax_scale, self.v_dim)
            if o is not None:
                return o
        k_nope, v = kvb.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, pe[:, :, None, :].expand(B, L, H, self.rope_dim)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        if self.blocked_attention and mask is None and S <= MATH_ATTN_MAX_LEN and torch.compiler.is_compiling():
            return blocked_causal_attention(q, k, v, self.softmax_scale)  # plain causal, no cache: L == S
        # SDPA accumulates and normalises in fp32 internally; (B, H, S, D) layout
        attn_mask = None if mask is None else mask[:, None, :, :]
        # PyTorch's fused CPU attention kernel needs v_head_dim == qk_head_dim (DeepSeek: 128 vs 192);
        # zero-padding V and slicing the output back is exact and avoids the slow math fallback.
        pad = self.qk_head_dim - self.v_dim
        if pad > 0:
            v = F.pad(v, (0, pad))
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=attn_mask, is_causal=mask is None, scale=self.softmax_scale)
        return o.transpose(1, 2)[..., :self.v_dim]  # (B, S, H, v)

    def _absorb_weights(self, dtype=None):
        """wkv_b split into its key half (H, nope, C) and value half (H, v, C), in `dtype` (default: the
        weight's). Without autograd (inference) contiguous copies are kept and refreshed whenever the
        weight changes, so a decode step does not re-copy strided slices; the value half is kept as the
        transpose of a contiguous (H, C, v), the layout the absorbed output product reads."""
        H = self.n_heads
        w = self.wkv_b.weight
        if torch.is_grad_enabled() and w.requires_grad:
            w = w.view(H, self.nope + self.v_dim, self.kv_lora_rank)
            return w[:, :self.nope], w[:, self.nope:]
        dtype = dtype or w.dtype
        key = (version_key(w), dtype)
        if getattr(self, "_absorb_key", None) != key:
            w3 = w.detach().view(H, self.nope + self.v_dim, self.kv_lora_rank).to(dtype)
            w_vt = w3[:, self.nope:].transpose(1, 2).contiguous()  # (H, C, v)
            self._absorb_cache = (w3[:, :self.nope].contiguous(), w_vt.transpose(1, 2))
            self._absorb_key = key
        return self._absorb_cache

    def _absorbed(self, q_nope, q_pe, kv, pe, mask):
        # Batched products in the layouts the cache and the projections already have (no einsum
        # permutes): decode runs this once per layer per step, on tiny shapes where op count is the cost
        B, S, H, _ = q_nope.shape
        L, C = kv.shape[1], self.kv_lora_rank
        dtype = q_nope.dtype
        # where small bf16 products are slow (PyTorch's CPU bmm), they run in fp32 on the exactly widened
        # values and the output is rounded to bf16 once
        up = cpu_kernels.widen_bf16_products(q_nope)
        w_k, w_v = self._absorb_weights(torch.float32 if up else None)  # (H, nope, C), (H, v, C)
        kvpe = _joined(kv, pe)  # (B, L, C + R)
        if up:
            q_nope, q_pe, kvpe = q_nope.float(), q_pe.float(), kvpe.float()
            kv = kvpe[..., :C]
        # the query moved into the latent space, per head: (H, B*S, nope) @ (H, nope, C)
        q_lat = torch.bmm(q_nope.reshape(B * S, H, -1).transpose(0, 1), w_k)  # (H, B*S, C)
        # scores q_lat . c_kv + q_pe . k_pe as one product over the joined C + R values
        q = torch.cat([q_lat.transpose(0, 1).view(B, S, H, C), q_pe], dim=-1)  # (B, S, H, C + R)
        scores = torch.bmm(q.view(B, S * H, -1), kvpe.transpose(1, 2)).float()  # (B, S*H, L)
        scores.mul_(self.softmax_scale)
        if mask is None:
            mask = torch.ones(S, L, dtype=torch.bool, device=kv.device).tril(L - S)[None]
        scores.view(B, S, H, L).masked_fill_(~mask[:, :, None, :], float("-inf"))
        p = scores.softmax(dim=-1).to(kv.dtype)  # softmax in fp32
        o_lat = torch.bmm(p, kv)  # (B, S*H, C)
        o = torch.bmm(o_lat.view(B * S, H, C).transpose(0, 1), w_v.transpose(1, 2))  # (H, B*S, v)
        return o.transpose(0, 1).reshape(B, S, H, -1).to(dtype)  # (B, S, H, v)


def version_key(t: torch.Tensor) -> tuple:
    """What identifies a weight's current values for the caches built from it (absorbed attention's
    per-head copies, the greedy head screen): its storage and, where tracked, its version counter.
    Inference tensors (a model built, loaded or converted under torch.inference_mode) keep no version
    counter: for them a new storage is what marks a change (they can only be modified in place inside
    inference mode, and such an in-place change is not seen)."""
    return (t.data_ptr(), None if t.is_inference() else t._version, t.dtype, t.device)


def _joined(kv: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """kv (B, L, C), pe (B, L, R) -> (B, L, C + R): a view when they are the two halves of one
    tensor's last dimension (as dsv3.infer.paged's cache returns them) and no gradient flows, else
    a copy (torch.cat, the twin the view is tested against)."""
    C, R = kv.shape[-1], pe.shape[-1]
    st = kv.stride()
    if (not (torch.is_grad_enabled() and (kv.requires_grad or pe.requires_grad)) and kv.dtype == pe.dtype
            and pe.stride() == st and st[-1] == 1 and st[-2] >= C + R and kv.shape[:-1] == pe.shape[:-1]
            and kv.untyped_storage().data_ptr() == pe.untyped_storage().data_ptr()
            and pe.storage_offset() == kv.storage_offset() + C):
        return kv.as_strided((*kv.shape[:-1], C + R), st, kv.storage_offset())
    return torch.cat([kv, pe], dim=-1)
