"""The training step's fast paths against references nobody here wrote: RMSNorm's hand-written
backward (dsv3.model.norm._RMSNormFn) against torch's F.rms_norm and the composite twin it replaces,
and the blocked math attention of compiled training (dsv3.model.mla.blocked_causal_attention)
against F.scaled_dot_product_attention, outputs and gradients; and that the compiled MLA really
takes the blocked path while eager training keeps the fused kernel."""
import pytest
import torch
import torch.nn.functional as F

import dsv3
from dsv3.config import preset
from dsv3.model import mla as mla_mod
from dsv3.model.mla import blocked_causal_attention
from dsv3.model.norm import RMSNorm, _RMSNormFn
from dsv3.train.trainer import compile_model


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("shape", [(2, 9, 64), (3, 128), (1, 5, 7, 32)])
def test_rmsnorm_backward_equals_torch_rms_norm(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3.0
    w = 1.0 + 0.3 * torch.randn(shape[-1], generator=g)
    dy = torch.randn(shape, generator=g)
    norm = RMSNorm(shape[-1], eps=1e-6)
    results = []
    for fn in (lambda a, b: F.rms_norm(a, (shape[-1],), b, 1e-6),  # torch's own: the reference
               lambda a, b: RMSNorm.composite(norm, a) if norm.weight is b else None,  # the twin (autograd)
               lambda a, b: _RMSNormFn.apply(a, b, 1e-6)):  # the fused backward
        a = x.clone().requires_grad_()
        norm.weight = torch.nn.Parameter(w.clone())
        y = fn(a, norm.weight)
        y.backward(dy)
        results.append((y.detach(), a.grad, norm.weight.grad))
    (ref_y, ref_dx, ref_dw), twin, fused = results
    for y, dx, dw in (twin, fused):
        assert rel(y, ref_y) <= 1e-6
        assert rel(dx, ref_dx) <= 1e-5
        assert rel(dw, ref_dw) <= 1e-5
    assert torch.equal(fused[0], twin[0])  # same forward arithmetic as the composite: bitwise


def test_rmsnorm_module_paths():
    torch.manual_seed(0)
    norm = RMSNorm(16)
    x = torch.randn(4, 16, requires_grad=True)
    y = norm(x)
    assert isinstance(y.grad_fn, torch.autograd.function.BackwardCFunction)  # the fused backward
    with torch.no_grad():
        assert torch.equal(norm(x), y.detach())  # inference: the composite, same numbers
    norm.weight.requires_grad_(False)
    y2 = norm(x)  # only x needs a gradient
    y2.sum().backward()
    want = x.detach().clone().requires_grad_()
    norm.composite(want).sum().backward()
    assert rel(x.grad, want.grad) <= 1e-6


def test_rmsnorm_bf16():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 32, generator=g).bfloat16()
    w = (1.0 + 0.2 * torch.randn(32, generator=g)).bfloat16()
    dy = torch.randn(8, 32, generator=g).bfloat16()
    a, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    b, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    ya = _RMSNormFn.apply(a, wa, 1e-6)
    norm = RMSNorm(32)
    norm.weight = torch.nn.Parameter(wb)
    yb = norm.composite(b)
    assert ya.dtype == yb.dtype == torch.bfloat16 and torch.equal(ya, yb)
    ya.backward(dy)
    yb.backward(dy)
    assert a.grad.dtype == torch.bfloat16 and wa.grad.dtype == torch.bfloat16
    # the composite's backward runs partly in bf16, the fused one in fp32: equal to bf16 rounding
    assert rel(a.grad, b.grad) <= 2e-2 and rel(wa.grad, norm.weight.grad) <= 2e-2


@pytest.mark.parametrize("S", [1, 37, 64, 65, 200])
def test_blocked_attention_equals_sdpa(S):
    g = torch.Generator().manual_seed(S)
    B, H, E, Ev = 2, 3, 24, 16  # a V head dim unlike the query's, as MLA's
    q = torch.randn(B, S, H, E, generator=g, requires_grad=True)
    k = torch.randn(B, S, H, E, generator=g, requires_grad=True)
    v = torch.randn(B, S, H, Ev, generator=g, requires_grad=True)
    do = torch.randn(B, S, H, Ev, generator=g)
    scale = 0.37
    # reference: torch's SDPA, causal, in its math form (different head dims), in (B, H, S, D)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                          scale=scale).transpose(1, 2)
    want.backward(do)
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    got = blocked_causal_attention(q, k, v, scale)
    got.backward(do)
    assert got.shape == (B, S, H, Ev)
    assert rel(got, want) <= 1e-5
    for t, w in zip((q, k, v), grads):
        assert rel(t.grad, w) <= 1e-5


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = preset("tiny").replace(rope_scaling_type=None, max_position_embeddings=1024, **kw)
    return dsv3.Transformer(cfg).init_weights(0.05).train()


def test_compiled_mla_takes_the_blocked_path_and_eager_the_fused_kernel(monkeypatch):
    calls = []
    real = mla_mod.blocked_causal_attention

    def spy(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(mla_mod, "blocked_causal_attention", spy)
    model = _tiny(num_hidden_layers=1, first_k_dense_replace=1, num_nextn_predict_layers=0)
    attn = model.layers[0].attn
    tokens = torch.randint(0, 512, (2, 70))
    _, mask, cos, sin = model._prepare(tokens, None, None)
    x = torch.randn(2, 70, model.config.hidden_size, requires_grad=True)
    dy = torch.randn(2, 70, model.config.hidden_size)
    eager = attn(x, cos, sin, None, mask)
    eager.backward(dy)
    assert calls == []  # eager training: SDPA's fused kernel
    gx = x.grad.clone()
    gw = {n: p.grad.clone() for n, p in attn.named_parameters()}
    attn.zero_grad()
    x.grad = None
    assert not attn.blocked_attention  # off unless whoever compiles turns it on
    compile_model(model, backend="aot_eager")  # on a CPU model: turns it on, as dsv3 train does
    assert attn.blocked_attention
    compiled = torch.compile(attn, backend="aot_eager", dynamic=False)
    got = compiled(x, cos, sin, None, mask)
    assert calls and calls[0][1] == 70  # traced through the blocked path (S = 70: two blocks)
    got.backward(dy)
    assert rel(got, eager) <= 1e-5
    assert rel(x.grad, gx) <= 1e-5
    for n, p in attn.named_parameters():
        assert rel(p.grad, gw[n]) <= 1e-5, n
    # beyond MATH_ATTN_MAX_LEN the fused kernel stays, compiled or not
    calls.clear()
    monkeypatch.setattr(mla_mod, "MATH_ATTN_MAX_LEN", 64)
    torch._dynamo.reset()
    torch.compile(attn, backend="aot_eager", dynamic=False)(x, cos, sin, None, mask)
    assert calls == []
