"""Every fast path against its slow twin: absorbed vs naive MLA, cached decode vs full forward,
grouped vs loop MoE; save -> load round trips."""
import pytest
import torch

import dsv3
from dsv3.config import preset
from dsv3.infer.cache import LatentCache
from dsv3.model.moe import MoE


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = preset("tiny").replace(**kw)
    m = dsv3.Transformer(cfg).init_weights(std=0.1)
    with torch.no_grad():
        for layer in m.layers:
            if isinstance(layer.ffn, MoE):
                layer.ffn.gate.bias.normal_(0, 0.05)
    return m.eval()


def set_impl(model, impl):
    for m in model.modules():
        if hasattr(m, "attn_impl"):
            m.attn_impl = impl


@pytest.mark.parametrize("kw", [{}, dict(q_lora_rank=None), dict(rope_interleave=False)])
def test_absorbed_equals_naive_full_forward(kw):
    m = tiny_model(**kw)
    x = torch.randint(0, 512, (2, 31))
    with torch.no_grad():
        set_impl(m, "naive")
        a = m(x)
        set_impl(m, "absorb")
        b = m(x)
    assert (a - b).abs().max() < 1e-4


def test_absorbed_equals_naive_in_bf16(monkeypatch):
    """bf16 inference: absorbed attention, whose small products run widened to fp32 on the CPU
    (dsv3.kernels.cpu.widen_bf16_products), against the naive path and against its own unwidened
    bf16 products. Dense layers only, so that bf16 rounding cannot flip a routing choice: it then moves
    the logits by about 2% of their range (measured 1.2-2.3% over four seeds); a wrong product would
    move them by the whole range."""
    from dsv3.kernels import cpu as cpu_kernels

    m = tiny_model(seed=2, first_k_dense_replace=preset("tiny").num_hidden_layers).to(torch.bfloat16)
    x = torch.randint(0, 512, (2, 31), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        set_impl(m, "naive")
        naive = m(x).float()
        set_impl(m, "absorb")
        assert cpu_kernels.widen_bf16_products(torch.zeros(1, dtype=torch.bfloat16))
        widened = m(x).float()
        monkeypatch.setattr(cpu_kernels, "widen_bf16_products", lambda t: False)
        plain = m(x).float()
    scale = naive.abs().max()
    assert (widened - naive).abs().max() < 0.05 * scale
    assert (widened - plain).abs().max() < 0.05 * scale


@pytest.mark.parametrize("impl", ["naive", "absorb", "auto"])
def test_cached_incremental_decode_equals_full_forward(impl):
    m = tiny_model(seed=1)
    set_impl(m, impl)
    B, S = 2, 24
    x = torch.randint(0, 512, (B, S))
    with torch.no_grad():
        full = m(x)
        cache = LatentCache(m.config, B, S)
        # a prefill chunk of 10, a chunk of 5, then one token at a time
        outs, start = [], 0
        for n in [10, 5] + [1] * (S - 15):
            pos = torch.arange(start, start + n).expand(B, n)
            outs.append(m(x[:, start:start + n], pos, cache))
            start += n
        inc = torch.cat(outs, dim=1)
    assert (inc - full).abs().max() < 1e-4


def test_cache_holds_only_the_latent():
    cfg = preset("tiny")
    cache = LatentCache(cfg, 1, 8, dtype=torch.bfloat16)
    assert cache.bytes_per_token_per_layer() == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2


def random_moe(seed=0):
    """A tiny-preset MoE layer with 16 experts in 4 groups, top-3, and weights N(0, 0.2)."""
    torch.manual_seed(seed)
    cfg = preset("tiny").replace(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.2)
    return cfg, moe


def test_grouped_moe_equals_loop_forward_and_backward():
    cfg, moe = random_moe()
    with torch.no_grad():
        moe.gate.bias.normal_(0, 0.1)
    x = torch.randn(3, 17, cfg.hidden_size)
    outs, grads = {}, {}
    for impl in ("grouped", "loop"):
        moe.impl = impl
        moe.zero_grad()
        xi = x.clone().requires_grad_()
        y = moe(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs[impl] = y.detach()
        grads[impl] = [xi.grad] + [p.grad.clone() for p in moe.parameters()]
    assert (outs["grouped"] - outs["loop"]).abs().max() < 1e-5
    for a, b in zip(grads["grouped"], grads["loop"]):
        assert (a - b).abs().max() < 1e-5
    # the per-pair decode path (inference, few tokens) against the loop twin, and what auto picks
    with torch.no_grad():
        for T in (1, 2, 5):
            xt = x.reshape(-1, cfg.hidden_size)[:T]
            moe.impl = "loop"
            want = moe(xt)
            moe.impl = "pairs"
            assert (moe(xt) - want).abs().max() < 1e-5
            moe.impl = "auto"
            assert (moe(xt) - want).abs().max() < 1e-5


def test_gate_follows_the_v3_rule():
    """Hand-checkable routing: 4 experts in 2 groups, bias flips the group choice but not the weights."""
    from dsv3.model.moe import Gate

    cfg = preset("tiny").replace(n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2,
                                 routed_scaling_factor=2.5)
    gate = Gate(cfg)
    s = torch.tensor([[0.9, 0.8, 0.7, 0.75]])
    w, idx = gate.route(s)
    assert sorted(idx[0].tolist()) == [0, 1]
    assert torch.allclose(w[0].sum(), torch.tensor(2.5))
    gate.bias.copy_(torch.tensor([0.0, 0.0, 0.3, 0.3]))  # group 2 now scores 1.0 + 1.05 > 1.7
    w, idx = gate.route(s)
    order = idx[0].argsort()
    assert idx[0][order].tolist() == [2, 3]
    assert torch.allclose(w[0][order], torch.tensor([0.7, 0.75]) / 1.45 * 2.5)


def test_save_load_roundtrip_is_bitwise(tmp_path):
    m = tiny_model(seed=3)
    dsv3.save_model(m, tmp_path / "a")
    back = dsv3.load_model(tmp_path / "a", dtype=torch.float32)
    sa, sb = m.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_sharded_save_loads_bitwise(tmp_path):
    import json

    m = tiny_model(seed=4).to(torch.bfloat16)
    dsv3.save_model(m, tmp_path / "s", max_shard_bytes=64 << 10)
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    back = dsv3.load_model(tmp_path / "s", dtype=torch.bfloat16)
    for k, v in m.state_dict().items():
        if k.endswith("gate.bias"):  # the router bias is kept in fp32
            assert torch.equal(back.state_dict()[k], v.float())
        else:
            assert torch.equal(back.state_dict()[k], v), k
