"""The paged latent cache: the block pool against the contiguous cache (same model outputs through
the cache protocol, whatever the block layout), the allocator's refcounts, the prefix-cache keys
and LRU eviction."""
import pytest
import torch

import dsv3
from dsv3.config import preset
from dsv3.infer.cache import LatentCache
from dsv3.infer.paged import NULL_BLOCK, BlockAllocator, NoFreeBlocks, PagedLatentCache, block_key


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return dsv3.Transformer(preset("tiny").replace(**kw)).init_weights(std=0.1).eval()


@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_paged_decode_equals_contiguous_and_full_forward(impl):
    """Rows of different lengths in scattered, non-monotonic blocks: chunked prefill then decode
    through the paged cache gives the logits of the contiguous cache and of the full forward."""
    m = tiny(1)
    for mod in m.modules():
        if hasattr(mod, "attn_impl"):
            mod.attn_impl = impl
    cfg, bs = m.config, 4
    B, S = 2, 21
    x = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(0))
    paged = PagedLatentCache(cfg, num_blocks=20, block_size=bs, n_layers=cfg.num_hidden_layers)
    # row 0 gets odd blocks in reverse, row 1 even blocks shuffled: nothing contiguous
    tables = torch.tensor([[19, 17, 15, 13, 11, 9], [2, 8, 4, 12, 6, 10]])
    contiguous = LatentCache(cfg, B, S, n_layers=cfg.num_hidden_layers)
    with torch.no_grad():
        full = m(x)
        outs_p, outs_c, start = [], [], 0
        for n in [7, 5] + [1] * (S - 12):
            pos = torch.arange(start, start + n).expand(B, n)
            paged.bind(tables, pos)
            outs_p.append(m(x[:, start:start + n], pos, paged))
            outs_c.append(m(x[:, start:start + n], pos, contiguous))
            start += n
    p, c = torch.cat(outs_p, 1), torch.cat(outs_c, 1)
    assert (p - c).abs().max() < 1e-5
    assert (p - full).abs().max() < 1e-4
    # the latents sit where the tables say: slot 9 of row 1 is block tables[1, 2], offset 1
    kv0 = paged.kv[0].view(20, bs, -1)
    assert torch.allclose(kv0[4, 1], contiguous.kv[0, 1, 9])
    assert torch.allclose(kv0[15, 0], contiguous.kv[0, 0, 8])


def test_rows_at_different_positions_batch_together():
    """One decode forward over rows at different positions equals each row decoded alone."""
    m = tiny(2)
    cfg, bs = m.config, 4
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in (9, 3, 14)]
    cache = PagedLatentCache(cfg, num_blocks=16, block_size=bs, n_layers=cfg.num_hidden_layers)
    tables = torch.tensor([[1, 2, 3, 0], [4, 0, 0, 0], [5, 6, 7, 8]])
    with torch.no_grad():
        for i, s in enumerate(seqs):  # prefill each row alone (B=1)
            pos = torch.arange(len(s) - 1)[None]
            cache.bind(tables[i:i + 1], pos)
            m(s[None, :-1], pos, cache)
        pos = torch.tensor([[len(s) - 1] for s in seqs])
        cache.bind(tables, pos)
        got = m(torch.stack([s[-1:] for s in seqs]), pos, cache)[:, 0]
        for i, s in enumerate(seqs):
            assert (got[i] - m(s[None])[0, -1]).abs().max() < 1e-4
    assert cache.kv[:, :bs].abs().max() == 0  # the padding block of the tables is never written


def test_allocator_refcounts_prefix_cache_and_lru_eviction():
    a = BlockAllocator(num_blocks=5, block_size=2)
    assert a.usable == 4 and a.num_free() == 4
    b1, b2, b3 = a.allocate(), a.allocate(), a.allocate()
    assert NULL_BLOCK not in (b1, b2, b3)
    k1, k2 = block_key(None, [1, 2], 3), block_key(None, [1, 2], 4)
    assert k1 != k2  # the token after the block is part of its key
    assert block_key(k1, [3, 4], 5) != block_key(k2, [3, 4], 5)  # and so is everything before it
    assert k1 == block_key(None, [1, 2], 3)
    a.register(b1, k1)
    a.register(b2, k2)
    a.register(b3, k1)  # first writer wins
    assert a.lookup(k1) == b1 and a.lookup(k2) == b2
    a.acquire(b1)  # a second request shares b1
    a.release(b1)
    assert a.ref[b1] == 1 and a.num_free() == 1
    a.release(b2)  # cached, unowned: evictable, still findable
    a.release(b1)
    a.release(b3)  # not cached: straight back to the free list
    assert a.num_free() == 4 and a.num_used() == 0
    assert a.lookup(k1) == b1
    a.acquire(b1)  # revived from the evictable set
    assert a.num_free() == 3
    a.release(b1)
    # the free list is used first, then the least recently freed cached block (b2, then b1)
    got = [a.allocate() for _ in range(3)]
    assert b1 not in got and b2 in got and a.lookup(k2) is None and a.lookup(k1) == b1
    a.allocate()
    assert a.lookup(k1) is None
    with pytest.raises(NoFreeBlocks):
        a.allocate()
    with pytest.raises(AssertionError):
        BlockAllocator(3, 2).release(1)


def test_prefix_cache_off_finds_nothing():
    a = BlockAllocator(num_blocks=4, block_size=2, enable_prefix_cache=False)
    b = a.allocate()
    a.register(b, block_key(None, [1, 2], 3))
    assert a.lookup(block_key(None, [1, 2], 3)) is None
    a.release(b)
    assert a.num_free() == 3


def test_bytes_per_block_is_the_latent_only():
    cfg = preset("small")
    # (kv_lora_rank + qk_rope_head_dim) values per token per layer, 2 bytes in bf16
    assert PagedLatentCache.bytes_per_block(cfg, 16, 7, torch.bfloat16) == 7 * 16 * (128 + 32) * 2


def test_absorbed_attention_reads_the_paged_latents_in_place():
    """The paged cache returns kv and pe as the two halves of one gathered (B, L, C + R) tensor: the
    absorbed attention scores them as that one view (no copy) and gets bit for bit what it gets from
    two separate tensors (its torch.cat twin), and what the naive attention gets."""
    from dsv3.model.mla import _joined

    m = tiny(3)
    cfg, bs, B = m.config, 4, 3
    mla = m.layers[0].attn
    g = torch.Generator().manual_seed(2)
    cache = PagedLatentCache(cfg, num_blocks=12, block_size=bs, n_layers=cfg.num_hidden_layers)
    tables = torch.tensor([[3, 7, 1], [2, 9, 0], [11, 4, 6]])
    C, R, H = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.num_attention_heads
    pos = torch.arange(9).expand(B, 9)
    cache.bind(tables, pos)
    cache.update(0, torch.randn(B, 9, C, generator=g), torch.randn(B, 9, R, generator=g), pos)
    pos = torch.tensor([[9], [6], [9]])  # rows at different positions: row 1 masks its last slots
    cache.bind(tables, pos)
    kv, pe = cache.update(0, torch.randn(B, 1, C, generator=g), torch.randn(B, 1, R, generator=g), pos)
    assert _joined(kv, pe).data_ptr() == kv.data_ptr()  # the view, not a copy
    assert _joined(kv.clone(), pe.clone()).data_ptr() != kv.data_ptr()
    q_nope = torch.randn(B, 1, H, cfg.qk_nope_head_dim, generator=g)
    q_pe = torch.randn(B, 1, H, R, generator=g)
    mask = torch.arange(10)[None, None, :] <= pos[:, :, None]
    with torch.no_grad():
        fast = mla._absorbed(q_nope, q_pe, kv, pe, mask)
        twin = mla._absorbed(q_nope, q_pe, kv.clone(), pe.clone(), mask)
        naive = mla._naive(q_nope, q_pe, kv, pe, mask)
    assert torch.equal(fast, twin)
    assert (fast - naive).abs().max() < 1e-5 * naive.abs().max()
