"""The fused, chunked head + cross-entropy of the training step (dsv3.train.trainer.lm_loss) against
torch's own F.cross_entropy on the full fp32 logits: same loss, same gradients, for row counts that do
not divide into the blocks, in fp32 and bf16, with MTP; and it steps aside where it cannot apply."""
import pytest
import torch
import torch.nn.functional as F

import dsv3
from dsv3.config import preset
from dsv3.train.trainer import _LinearCrossEntropy, compute_losses, lm_loss


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def reference(h, w, y):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = F.cross_entropy(F.linear(h, w).float(), y)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("rows", [1, 7, 64, 300, 1000])
def test_fused_loss_and_gradients_equal_cross_entropy(rows):
    g = torch.Generator().manual_seed(0)
    N, D, V = 300, 24, 97  # 300 rows: blocks of 7 and 64 leave a ragged last block
    h = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.5  # logits of a few units: a peaked softmax
    y = torch.randint(0, V, (N,), generator=g)
    want, want_h, want_w = reference(h, w, y)
    h.requires_grad_()
    w.requires_grad_()
    got = _LinearCrossEntropy.apply(h, w, y, rows, True, True)
    (got * 3.0).backward()  # the incoming gradient scales both stored gradients
    assert abs(got.item() - want.item()) <= 1e-6 * want.item()
    assert rel(h.grad, 3.0 * want_h) <= 1e-6
    assert rel(w.grad, 3.0 * want_w) <= 1e-6


def test_fused_loss_in_bf16_matches_the_plain_bf16_path():
    g = torch.Generator().manual_seed(1)
    N, D, V = 256, 32, 130
    h = (torch.randn(N, D, generator=g)).bfloat16()
    w = (torch.randn(V, D, generator=g) * 0.3).bfloat16()
    y = torch.randint(0, V, (N,), generator=g)
    want, want_h, want_w = reference(h, w, y)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    got = _LinearCrossEntropy.apply(hh, ww, y, 64, True, True)
    got.backward()
    assert got.dtype == torch.float32
    assert hh.grad.dtype == torch.bfloat16 and ww.grad.dtype == torch.bfloat16
    # same bf16 logits, fp32 softmax: the loss agrees to fp32 rounding; the gradients to bf16 rounding
    # (the plain path rounds the whole weight gradient once, the fused one too, after fp32 sums)
    assert abs(got.item() - want.item()) <= 1e-5 * want.item()
    assert rel(hh.grad, want_h) <= 1e-2
    assert rel(ww.grad, want_w) <= 1e-2


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return dsv3.Transformer(preset("tiny").replace(**kw)).init_weights(0.05).train()


def test_compute_losses_fused_equals_plain_with_mtp():
    model = tiny_model(num_nextn_predict_layers=1)
    twin = tiny_model(num_nextn_predict_layers=1)
    windows = torch.randint(0, 512, (3, 34), generator=torch.Generator().manual_seed(2))  # S = 32, D = 1
    a = compute_losses(model, windows, 32, mtp_lambda=0.3)
    b = compute_losses(twin, windows, 32, mtp_lambda=0.3, fused_loss=False)
    a.loss.backward()
    b.loss.backward()
    assert abs(a.ce.item() - b.ce.item()) <= 1e-6 * b.ce.item()
    assert abs(a.mtp.item() - b.mtp.item()) <= 1e-6 * b.mtp.item()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert p.grad is not None and q.grad is not None, name
        assert rel(p.grad, q.grad) <= 1e-5, name


def test_plain_path_where_the_fused_loss_cannot_apply():
    model = tiny_model(num_nextn_predict_layers=0)
    h = torch.randn(2, 8, 64, requires_grad=True)
    y = torch.randint(0, 512, (2, 8))
    calls = []
    # A hooked head (FSDP2 and the tensor-parallel head work through the head's own forward) must
    # be called, not bypassed by reading its weight.
    handle = model.head.register_forward_hook(lambda *a: calls.append(1))
    lm_loss(model, h, y).backward()
    assert calls == [1]
    handle.remove()
    # Without autograd the loss is F.cross_entropy on the full logits, bit for bit.
    with torch.no_grad():
        want = F.cross_entropy(model.logits(h).float().reshape(-1, 512), y.reshape(-1))
        assert torch.equal(lm_loss(model, h, y), want)
    calls.clear()
    model.head.register_forward_hook(lambda *a: calls.append(1))
    model.head._forward_hooks.clear()
    lm_loss(model, h, y)
    assert calls == []  # a plain head is not called: the fused loss reads its weight
