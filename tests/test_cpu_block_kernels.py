"""The per-layer C kernels of decode steps (dsv3/kernels/attn_cpu.c): RMSNorm, rotary embedding and absorbed
MLA attention against float64 references written from the formulas, and the fused decode blocks
(`dsv3_mla_block`, `dsv3_ffn_block`) against the modules they replace, over the configs of the family."""
import pytest
import torch

import dsv3
from dsv3.config import preset
from dsv3.infer.cache import LatentCache
from dsv3.infer.paged import PagedLatentCache
from dsv3.kernels import cpu
from dsv3.model.mla import MLA
from dsv3.model.moe import MoE
from dsv3.model.norm import RMSNorm
from dsv3.model.rope import Rotary, apply_rotary

pytestmark = pytest.mark.skipif(cpu.library() is None,
                                reason=f"CPU kernels unavailable here: {cpu.unavailable_reason()}")
U = 2.0 ** -24  # fp32 unit roundoff


def _bf16_ulp(t: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 values around each |t| (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(t.abs().clamp_min(1e-30))) - 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_kernel_against_float64(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(100, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 130, dtype=dtype)[..., 7:107]  # strided rows, evenly spaced
    with torch.inference_mode():
        assert cpu.step_usable(x, norm.weight)
        got = norm(x)
    xd = x.double()
    y = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)
    if dtype == torch.float32:
        want = norm.weight.double() * y
        assert (got.double() - want).abs().max() <= 16 * U * (norm.weight.double().abs() * y.abs()).max()
    else:  # the normalised value and the weight product each rounded to bf16: within two bf16 spacings
        want = norm.weight.double() * y.to(dtype).double()
        assert ((got.double() - want).abs() <= 2 * _bf16_ulp(want)).all()
    assert got.is_contiguous() and got.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleave", [True, False])
def test_rotary_kernel_is_the_pytorch_rotation(dtype, interleave, monkeypatch):
    """Same fp32 operations, each rounded separately (-ffp-contract=off): bitwise equal to PyTorch's."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 96, dtype=dtype)[..., 64:]  # the rope part of a query: strided heads
    cos, sin = torch.randn(2, 3, 1, 16), torch.randn(2, 3, 1, 16)
    with torch.inference_mode():
        got = apply_rotary(x, cos, sin, interleave)
        assert cpu.rotary(x, cos, sin, interleave) is not None
        monkeypatch.setattr(cpu, "library", lambda: None)
        want = apply_rotary(x, cos, sin, interleave)
    assert torch.equal(got, want)


def _attention_float64(q, cos, sin, kv, pe, mask, wkv_b, H, nope, v, scale, interleave):
    """Plain multi-head attention with the keys and values decompressed from the latents (the naive
    formulation, not the absorbed one the kernel computes), in float64."""
    B, S = q.shape[:2]
    q = q.double()
    q_pe = apply_rotary(q[..., nope:].float(), cos, sin, interleave).double()
    w = wkv_b.double().view(H, nope + v, -1)
    k_nope = torch.einsum("blc,hnc->blhn", kv.double(), w[:, :nope])
    vals = torch.einsum("blc,hvc->blhv", kv.double(), w[:, nope:])
    s = torch.einsum("bshn,blhn->bshl", q[..., :nope], k_nope) + torch.einsum("bshr,blr->bshl", q_pe, pe.double())
    s = (s * scale).masked_fill(~mask[:, :, None, :], float("-inf"))
    return torch.einsum("bshl,blhv->bshv", s.softmax(-1), vals)


@pytest.mark.parametrize("masked", [True, False])
def test_mla_attend_against_float64_naive_attention(masked):
    torch.manual_seed(0)
    cfg = preset("tiny")
    mla = MLA(cfg, 0)
    with torch.no_grad():
        for p in mla.parameters():
            p.normal_(0, 0.3)
    H, nope, R, C, v = mla.n_heads, mla.nope, mla.rope_dim, mla.kv_lora_rank, mla.v_dim
    B, S, L = 3, 2, 23
    q = torch.randn(B, S, H, nope + R)
    kv, pe = torch.randn(B, L, C), torch.randn(B, L, R)
    pos = torch.tensor([[20, 21], [9, 10], [21, 22]]) if masked else torch.tensor([[21, 22]] * B)
    mask = torch.arange(L)[None, None, :] <= pos[:, :, None]
    cos, sin = Rotary(cfg).tables(pos)
    with torch.inference_mode():
        w_k, w_v = mla._absorb_weights(torch.float32)
        got = cpu.mla_attend(q, cos, sin, kv, pe, mask if masked else None, w_k, w_v.transpose(1, 2), nope,
                             mla.softmax_scale, True)
        # the same rows read through slot indices of a flat pool, in a shuffled order
        perm = torch.randperm(B * L)
        pool_kv, pool_pe = torch.empty(B * L, C), torch.empty(B * L, R)
        pool_kv[perm], pool_pe[perm] = kv.reshape(-1, C), pe.reshape(-1, R)
        via_slots = cpu.mla_attend(q, cos, sin, pool_kv, pool_pe, mask if masked else None, w_k, w_v.transpose(1, 2),
                                   nope, mla.softmax_scale, True, slots=perm.view(B, L).contiguous())
    want = _attention_float64(q, cos, sin, kv, pe, mask, mla.wkv_b.weight, H, nope, v, mla.softmax_scale, True)
    assert got.shape == (B, S, H, v)
    assert (got.double() - want).abs().max() < 1e-5 * want.abs().max()
    assert torch.equal(got, via_slots)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_attend_query_alone_equals_it_among_others(dtype):
    """The kernel absorbs the queries of a head in groups (each head's W_k and W_v read once for several
    queries): a query's result is bitwise the same alone, in a group of any size and at 1 or 2 threads."""
    torch.manual_seed(1)
    H, nope, R, C, v, L = 4, 16, 8, 32, 16, 19
    B = 7  # groups of 4 and 3
    q = torch.randn(B, 1, H, nope + R).to(dtype)
    kv, pe = torch.randn(B, L, C).to(dtype), torch.randn(B, L, R).to(dtype)
    mask = torch.arange(L)[None, None, :] <= torch.randint(0, L, (B, 1, 1))
    ang = torch.randn(B, 1, R // 2)
    cos, sin = ang.cos(), ang.sin()
    w_k, w_vt = torch.randn(H, nope, C) * 0.2, torch.randn(H, C, v) * 0.2
    threads = torch.get_num_threads()
    try:
        got = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            got[n] = cpu.mla_attend(q, cos, sin, kv, pe, mask, w_k, w_vt, nope, 0.3, True)
        torch.set_num_threads(1)
        alone = [cpu.mla_attend(q[b:b + 1], cos[b:b + 1], sin[b:b + 1], kv[b:b + 1], pe[b:b + 1], mask[b:b + 1],
                                w_k, w_vt, nope, 0.3, True) for b in range(B)]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got[1], got[2])
    assert torch.equal(got[1], torch.cat(alone))


# configs of the family: V3 (sigmoid, noaux_tc, q-LoRA, YaRN), V2 (softmax, greedy or group-limited, no
# q-LoRA, no renormalisation), one expert per token, no shared experts with rotated halves, a large bias
CONFIGS = {
    "v3": {},
    "v2-greedy": dict(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1, q_lora_rank=None,
                      norm_topk_prob=False, routed_scaling_factor=1.0, rope_scaling_type=None),
    "v2-group": dict(scoring_func="softmax", topk_method="group_limited_greedy", q_lora_rank=None,
                     norm_topk_prob=False, routed_scaling_factor=16.0),
    "top1": dict(num_experts_per_tok=1),
    "no-shared-halves": dict(n_shared_experts=0, rope_interleave=False),
}


def _model(kw, dtype, bias_std=0.1, seed=0):
    torch.manual_seed(seed)
    cfg = preset("tiny").replace(num_nextn_predict_layers=0, **kw)
    m = dsv3.Transformer(cfg).init_weights(std=0.1)
    with torch.no_grad():
        for layer in m.layers:
            if isinstance(layer.ffn, MoE) and layer.ffn.gate.bias is not None:
                layer.ffn.gate.bias.normal_(0, bias_std)
    return m.to(dtype).eval()


def _decode(m, prompt, steps, offsets, paged=False, stepwise=False):
    """Prefill `prompt` (B, P) (in one forward, or token by token when stepwise), then `steps` single-token
    steps at ragged positions; every hidden state."""
    cfg = m.config
    B, P = prompt.shape
    dtype = next(m.parameters()).dtype
    with torch.inference_mode():
        if paged:
            cache = PagedLatentCache(cfg, num_blocks=1 + B * 8, block_size=8, n_layers=cfg.num_hidden_layers,
                                     dtype=dtype)
            tables = torch.arange(1, 1 + B * 8).view(B, 8)
        else:
            cache = LatentCache(cfg, B, P + steps + 8, dtype=dtype, n_layers=cfg.num_hidden_layers)

        def fwd(tok, pos):
            if paged:
                cache.bind(tables, pos)
            return m.hidden(tok, pos, cache)

        if stepwise:
            hs = [fwd(prompt[:, i:i + 1], torch.full((B, 1), i)) for i in range(P)]
        else:
            hs = [fwd(prompt, torch.arange(P).expand(B, P))]
        tok = prompt[:, -1:]
        for i in range(steps):
            hs.append(fwd(tok, (P + i + offsets)[:, None]))
    return torch.cat(hs, 1).float()


def _count(monkeypatch):
    n = {"attn": 0, "ffn": 0}
    ra, rf = cpu.mla_block, cpu.ffn_block

    def a(*args):  # counts the calls that ran the kernel
        out = ra(*args)
        n["attn"] += out is not None
        return out

    def f(*args):
        out = rf(*args)
        n["ffn"] += out is not None
        return out

    monkeypatch.setattr(cpu, "mla_block", a)
    monkeypatch.setattr(cpu, "ffn_block", f)
    return n


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("paged", [False, True])
def test_fused_decode_blocks_equal_the_modules(name, dtype, paged, monkeypatch):
    """Decode steps of 3 sequences at ragged positions through the fused blocks and through the modules
    (whose pieces are tested against transformers and the float64 references): fp32 within 2e-5, bf16
    within 2% of the range (the router and the experts see the same bf16 values; a different routing
    choice would move the states by their whole range)."""
    m = _model(CONFIGS[name], dtype, bias_std=1.0 if name == "v3" else 0.1)
    prompt = torch.randint(0, m.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(1))
    offsets = torch.tensor([0, -4, 2])
    n = _count(monkeypatch)
    fused = _decode(m, prompt, 6, offsets, paged)
    layers = m.config.num_hidden_layers
    assert n == {"attn": 6 * layers, "ffn": 6 * layers}  # every decode step, no prefill (11 rows x 3 > 16)
    monkeypatch.setattr(MLA, "decode_block", lambda *a: None)
    modules = _decode(m, prompt, 6, offsets, paged)
    scale = modules.abs().max()
    tol = 2e-5 * scale if dtype == torch.float32 else 0.02 * scale
    assert (fused - modules).abs().max() <= tol


def test_fused_blocks_do_not_depend_on_the_batch_or_the_threads():
    """A sequence's decode states are bitwise the same alone and among others, at 1 and 2 threads."""
    m = _model({}, torch.float32)
    for layer in m.layers:  # "auto" would take the naive path (PyTorch's GEMMs) for the first token, at L = 1
        layer.attn.attn_impl = "absorb"
    prompt = torch.randint(0, m.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(3))
    offsets = torch.tensor([0, -2, 3])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        together = _decode(m, prompt, 5, offsets, stepwise=True)
        alone = _decode(m, prompt[1:2], 5, offsets[1:2], stepwise=True)
        torch.set_num_threads(2)
        together2 = _decode(m, prompt, 5, offsets, stepwise=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(together[1:2], alone)
    assert torch.equal(together, together2)


def test_fused_blocks_see_weights_changed_in_place():
    """The fused blocks keep each block's weight pointers (bf16 projections: their packed copies) between calls;
    an in-place change of a projection weight (outside inference mode: a new version) or a replaced parameter
    must reach the next call (the states equal those of a fresh model with the new weights), and so must the
    packing setting toggled
    (the plan then hands the kernel the weights as they are)."""
    m = _model({}, torch.bfloat16)
    prompt = torch.randint(0, m.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(4))
    offsets = torch.tensor([0, 1])
    _decode(m, prompt, 2, offsets)  # the plans and packed copies exist now
    with torch.no_grad():
        for layer in m.layers:
            layer.attn.wo.weight.mul_(2)
            layer.ffn_norm.weight.mul_(0.5)
            mlp = layer.ffn.shared_experts if isinstance(layer.ffn, MoE) else layer.ffn  # a projection of the FFN half
            if mlp is not None:
                mlp.w2.weight.mul_(2)
    got = _decode(m, prompt, 2, offsets)
    fresh = _model({}, torch.bfloat16)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(got, _decode(fresh, prompt, 2, offsets))
    # a projection's parameter replaced by a new tensor: its values reach the next call too
    wq_b = m.layers[0].attn.wq_b
    wq_b.weight = torch.nn.Parameter(wq_b.weight.detach() * 2, requires_grad=False)
    got = _decode(m, prompt, 2, offsets)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(got, _decode(fresh, prompt, 2, offsets))
    attn = m.layers[0].attn
    plan = attn.__dict__["_kernel_plan"]
    proj = [plan.params[i] for i in plan.proj]  # (parameter dict, name) of the projections
    assert plan.ptrs and [plan.ptrs[i] for i in plan.proj] == [cpu.packed_bf16(d[n]).data_ptr() for d, n in proj]
    packed = cpu.bf16_packed(False)
    try:
        _decode(m, prompt, 2, offsets)  # the weights as they are now
        assert [plan.ptrs[i] for i in plan.proj] == [d[n].data_ptr() for d, n in proj]
    finally:
        cpu.bf16_packed(packed)
    assert torch.equal(_decode(m, prompt, 2, offsets), got)


def test_the_modules_run_where_the_fused_blocks_cannot(monkeypatch):
    """Forward hooks, autograd, more rows than the kernels take, forced naive attention, float64 and a
    cache without kernel slots all keep the modules' path (and the hooks see their calls)."""
    m = _model({}, torch.float32)
    n = _count(monkeypatch)
    cfg = m.config
    tok = torch.randint(0, cfg.vocab_size, (2, 1))

    def step(model, rows=2, grad=False, dtype=torch.float32):
        cache = LatentCache(cfg, rows, 8, dtype=dtype, n_layers=cfg.num_hidden_layers)
        with torch.set_grad_enabled(grad):
            return model.hidden(tok[:1].expand(rows, 1), torch.full((rows, 1), 3), cache)

    with torch.no_grad():
        step(m)
    assert n["attn"] == cfg.num_hidden_layers  # the fused path runs by default
    seen = []
    h = m.layers[0].attn.wq_a.register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        step(m)
    h.remove()
    assert seen == [1] and n["attn"] == 2 * cfg.num_hidden_layers - 1  # layer 0 ran its modules
    h = m.layers[1].ffn.register_forward_hook(lambda *a: seen.append(2))
    with torch.no_grad():
        step(m)
    h.remove()
    assert seen == [1, 2] and n["ffn"] == 3 * cfg.num_hidden_layers - 1 - 1  # layers 0 (above) and 1
    before = dict(n)
    step(m, grad=True)  # training-style forward: parameters need grad
    m.embed.weight.requires_grad_(False)  # frozen embeddings: the layers' input needs no grad, their weights do
    assert step(m, grad=True).requires_grad  # the modules ran, with autograd (the counts below stay)
    m.embed.weight.requires_grad_(True)
    with torch.no_grad():
        step(m, rows=cpu.LINEAR_MAX_ROWS + 1)
        for layer in m.layers:
            layer.attn.attn_impl = "naive"
        step(m)
        for layer in m.layers:
            layer.attn.attn_impl = "auto"
        step(m.double(), dtype=torch.float64)
    assert n == before


def test_latent_cache_kernel_slots_reject_positions_past_the_end():
    m = _model({}, torch.float32)
    cache = LatentCache(m.config, 1, 4, n_layers=m.config.num_hidden_layers)
    with torch.no_grad(), pytest.raises(ValueError, match="beyond the cache length 4"):
        m.hidden(torch.tensor([[1]]), torch.tensor([[4]]), cache)


def test_attention_kernel_leaves_autograd_to_pytorch():
    """Only wkv_b trainable (inputs and the other weights frozen): absorbed attention runs PyTorch's
    products, so the gradient reaches wkv_b."""
    m = _model({}, torch.float32)
    for p in m.parameters():
        p.requires_grad_(False)
    attn = m.layers[0].attn
    attn.wkv_b.weight.requires_grad_(True)
    attn.attn_impl = "absorb"
    x = torch.randn(1, 2, m.config.hidden_size)
    positions, mask, cos, sin = m._prepare(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, 1]]), None)
    attn(x, cos, sin, positions, mask).sum().backward()
    assert attn.wkv_b.weight.grad is not None and attn.wkv_b.weight.grad.abs().sum() > 0
