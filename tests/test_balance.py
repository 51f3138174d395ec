"""Load-balancing math against the DeepSeek-V3 paper (§2.1.2, §4.5) and transformers' Switch/Mixtral
balance losses (the same f_i P_i product, up to a factor K_r that follows from their definitions)."""

import math

import pytest
import torch

from dsv3.train.balance import (
    LoadTracker,
    bias_update,
    count_loads,
    expert_aux_loss,
    max_violation,
    sequence_balance_loss,
)


# --- bias update (paper §2.1.2: b_i += gamma * sign(mean load - load_i)) --------------------------


@pytest.mark.parametrize(
    "loads, signs",
    [([8, 1, 1, 2], [-1, 1, 1, 1]), ([10, 2, 5, 7], [-1, 1, 1, -1])],
)
def test_bias_update_conformance(loads, signs):
    bias = torch.tensor([0.5, -0.25, 0.0, 1.0], dtype=torch.float32)
    before = bias.clone()
    out = bias_update(bias, torch.tensor(loads), 1e-3)
    assert out is bias  # documented: in place
    torch.testing.assert_close(bias - before, torch.tensor(signs, dtype=torch.float32) * 1e-3, rtol=0, atol=1e-7)


def test_bias_update_per_layer_and_ties():
    # (L, E): the mean is taken per layer; an expert exactly at its layer's mean keeps its bias.
    bias = torch.zeros(2, 3, dtype=torch.float32)
    bias_update(bias, torch.tensor([[3, 3, 3], [1, 2, 6]]), 0.01)
    expected = torch.tensor([[0.0, 0.0, 0.0], [0.01, 0.01, -0.01]])
    torch.testing.assert_close(bias, expected, rtol=0, atol=1e-8)


def test_bias_update_rejects_bad_input():
    with pytest.raises(ValueError, match="float32"):
        bias_update(torch.zeros(4, dtype=torch.bfloat16), torch.tensor([1, 2, 3, 4]), 1e-3)
    with pytest.raises(ValueError, match="shape"):
        bias_update(torch.zeros(4), torch.tensor([1, 2, 3]), 1e-3)
    with pytest.raises(ValueError, match="gamma"):
        bias_update(torch.zeros(4), torch.tensor([1, 2, 3, 4]), -1e-3)


def test_bias_update_balances_a_skewed_router():
    # The paper's claim in miniature: a router whose affinities favour a few experts becomes
    # balanced by the bias alone (selection on s + b, no gradient), while the bias never changes s.
    g = torch.Generator().manual_seed(0)
    n_tokens, n_exp, k = 2048, 16, 2
    logits = torch.randn(n_tokens, n_exp, generator=g) + torch.linspace(-2.0, 2.0, n_exp)
    s = torch.sigmoid(logits)
    bias = torch.zeros(n_exp, dtype=torch.float32)

    def loads():
        return count_loads((s + bias).topk(k, dim=-1).indices, n_exp)

    start = max_violation(loads()).item()
    history = []
    for _ in range(1000):  # the paper's gamma = 0.001
        bias_update(bias, loads(), 1e-3)
        history.append(max_violation(loads()).item())
    assert start > 2.0  # heavily skewed at the start (the top experts take most tokens)
    # sign updates settle into a small limit cycle; every one of the last 200 steps is near-balanced
    assert max(history[-200:]) < 0.1, (start, max(history[-200:]))
    assert bias[0] > bias[-1]  # the underused low-affinity experts got the largest boost


# --- sequence-wise balance loss (paper eqs. 17-20) ------------------------------------------------

PAPER_EXAMPLE = [[2, 1, -1, 0], [1.5, 2.5, 0, -2], [0, 3, 1, -1], [-1, 0.5, 2, 1]]


def test_sequence_balance_loss_conformance():
    s = torch.sigmoid(torch.tensor([PAPER_EXAMPLE], dtype=torch.float32))  # (1, 4, 4)
    idx = s.topk(2, dim=-1).indices
    alpha = 1e-4
    loss = sequence_balance_loss(s, idx, n_routed=4, top_k=2, alpha=alpha)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() / alpha - 1.084169) < 1e-6


def test_sequence_balance_loss_by_hand_formula():
    # Same example, the equation written out term by term in plain Python floats.
    T, N, K = 4, 4, 2
    s = [[1 / (1 + math.exp(-v)) for v in row] for row in PAPER_EXAMPLE]
    top = [sorted(range(N), key=lambda j: -row[j])[:K] for row in s]
    f = [N / (K * T) * sum(i in top[t] for t in range(T)) for i in range(N)]
    p = [sum(s[t][i] / sum(s[t]) for t in range(T)) / T for i in range(N)]
    expected = sum(fi * pi for fi, pi in zip(f, p))
    st = torch.tensor([s], dtype=torch.float64)
    got = sequence_balance_loss(st, st.topk(K, -1).indices, N, K, alpha=1.0)
    assert got.dtype == torch.float64
    assert abs(got.item() - expected) < 1e-12


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_sequence_balance_loss_matches_switch_transformers(top_k):
    # transformers' Switch loss is per group (= sequence): E^2 * mean_{b,i}(frac_{b,i} * P_{b,i}) with
    # frac = share of tokens routed to i, i.e. N_r * mean_b sum_i frac P = K_r * (our L / alpha).
    from transformers.models.switch_transformers.modeling_switch_transformers import load_balancing_loss_func

    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(3, 11, 8, generator=g), dim=-1)
    idx = probs.topk(top_k, dim=-1).indices
    ours = sequence_balance_loss(probs, idx, n_routed=8, top_k=top_k, alpha=1.0)
    ref = load_balancing_loss_func(probs, idx)
    torch.testing.assert_close(ours * top_k, ref, rtol=1e-6, atol=0)


def test_sequence_balance_loss_is_per_sequence():
    # Two sequences, each routed entirely to one expert but to different ones: the batch as a whole
    # is balanced (the batch-wise loss sees nothing wrong), each sequence is not (the sequence-wise does).
    T, N = 6, 2
    probs = torch.full((2, T, N), 0.5, dtype=torch.float64)
    idx = torch.stack([torch.zeros(T, 1), torch.ones(T, 1)]).long()  # (2, T, 1)
    seq = sequence_balance_loss(probs, idx, N, 1, alpha=1.0)
    batch = expert_aux_loss(probs, idx, N, 1, alpha=1.0)
    assert batch.item() == pytest.approx(1.0)  # perfectly balanced: f_i = 1, sum P_i = 1
    assert seq.item() == pytest.approx(1.0)  # f = (2, 0), P = (.5, .5): also 1 with flat scores
    # with peaked scores that follow the routing, the sequence-wise loss grows, the batch-wise does not
    peaked = torch.tensor([[0.9, 0.1], [0.1, 0.9]], dtype=torch.float64)[:, None, :].expand(2, T, N)
    assert sequence_balance_loss(peaked, idx, N, 1, 1.0).item() == pytest.approx(1.8)
    assert expert_aux_loss(peaked, idx, N, 1, 1.0).item() == pytest.approx(1.0)
    # the batch mean of per-sequence losses
    one = sequence_balance_loss(peaked[:1], idx[:1], N, 1, 1.0)
    two = sequence_balance_loss(peaked[1:], idx[1:], N, 1, 1.0)
    torch.testing.assert_close(sequence_balance_loss(peaked, idx, N, 1, 1.0), (one + two) / 2)


def test_sequence_balance_loss_gradient():
    g = torch.Generator().manual_seed(2)
    s = torch.sigmoid(torch.randn(2, 5, 6, generator=g, dtype=torch.float64)).requires_grad_()
    idx = s.detach().topk(2, -1).indices
    # f_i is a constant count: the loss is linear in the normalised scores, and gradcheck confirms
    # autograd's gradient of that expression matches finite differences.
    assert torch.autograd.gradcheck(lambda x: sequence_balance_loss(x, idx, 6, 2, 0.3), (s,))
    # dL/ds_{i,t} for one sequence, by hand: alpha/T * (f_i - sum_j f_j q_j) / sum_j s_j, q = s/sum s
    loss = sequence_balance_loss(s[:1], idx[:1], 6, 2, 0.3)
    (grad,) = torch.autograd.grad(loss, s)
    x = s[0].detach()
    f = torch.zeros(6, dtype=torch.float64).index_add_(0, idx[0].reshape(-1), torch.ones(10, dtype=torch.float64))
    f = f * 6 / (2 * 5)
    q = x / x.sum(-1, keepdim=True)
    expected = 0.3 / 5 * (f - (q * f).sum(-1, keepdim=True)) / x.sum(-1, keepdim=True)
    torch.testing.assert_close(grad[0], expected)
    assert torch.all(grad[1] == 0)


def test_sequence_balance_loss_rejects_bad_shapes():
    s = torch.rand(2, 5, 6)
    idx = s.topk(2, -1).indices
    with pytest.raises(ValueError, match="n_routed"):
        sequence_balance_loss(s, idx, 7, 2, 1e-4)
    with pytest.raises(ValueError, match="topk_idx shape"):
        sequence_balance_loss(s, idx, 6, 3, 1e-4)
    with pytest.raises(ValueError, match=r"\(B, T, N_r\)"):
        sequence_balance_loss(s[0], idx[0], 6, 2, 1e-4)


# --- expert-level auxiliary loss (DeepSeek-V2 L_ExpBal, the paper's §4.5 baseline) ----------------


def test_expert_aux_loss_by_hand():
    # T = 3 tokens, N_r = 3, K_r = 1; softmax-like rows (already normalised).
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    idx = torch.tensor([[0], [0], [1]])
    # f = 3/(1*3) * (2, 1, 0) = (2, 1, 0); P = (0.5, 1/3, 1/6); sum f P = 1 + 1/3 = 4/3
    loss = expert_aux_loss(probs, idx, n_routed=3, top_k=1, alpha=0.01)
    assert loss.item() == pytest.approx(0.01 * 4 / 3, rel=1e-6)
    # sigmoid scores are normalised per token first: scaling a row changes nothing
    scaled = probs * torch.tensor([[0.5], [2.0], [3.0]])
    assert expert_aux_loss(scaled, idx, 3, 1, 0.01).item() == pytest.approx(0.01 * 4 / 3, rel=1e-6)


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_expert_aux_loss_matches_mixtral(top_k):
    # transformers' Mixtral loss: N_r * sum_i (count_i / T) * P_i over the whole batch = K_r * (L / alpha).
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4 * 9, 8, generator=g)
    probs = torch.softmax(logits, dim=-1)
    idx = probs.topk(top_k, dim=-1).indices
    ours = expert_aux_loss(probs.view(4, 9, 8), idx.view(4, 9, top_k), n_routed=8, top_k=top_k, alpha=1.0)
    ref = load_balancing_loss_func((logits,), num_experts=8, top_k=top_k)
    torch.testing.assert_close(ours * top_k, ref, rtol=1e-6, atol=0)


# --- MaxVio and the tracker -----------------------------------------------------------------------


def test_max_violation():
    assert max_violation(torch.tensor([8, 1, 1, 2])).item() == pytest.approx(8 / 3 - 1)
    assert max_violation(torch.tensor([5, 5, 5, 5])).item() == 0.0
    per_layer = max_violation(torch.tensor([[8, 1, 1, 2], [10, 2, 5, 7], [1, 1, 1, 1]]))
    assert per_layer.shape == (3,)
    torch.testing.assert_close(per_layer, torch.tensor([5 / 3, 10 / 6 - 1, 0.0]))
    with pytest.raises(ValueError):
        max_violation(torch.zeros(2, 2, 2))


def test_count_loads():
    idx = torch.tensor([[[0, 1], [1, 2]], [[1, 3], [0, 1]]])
    assert count_loads(idx, 5).tolist() == [2, 4, 1, 1, 0]
    with pytest.raises(ValueError, match="n_routed"):
        count_loads(idx, 3)


def test_load_tracker_and_state_round_trip():
    tr = LoadTracker(n_layers=2, n_experts=4)
    with pytest.raises(ValueError):
        tr.batch_max_violation()
    tr.update(torch.tensor([[8, 1, 1, 2], [3, 3, 3, 3]]))
    tr.update([torch.tensor([0, 5, 5, 2]), torch.tensor([1, 1, 1, 9])])
    torch.testing.assert_close(tr.batch_max_violation(), torch.tensor([5 / 3 - 1, 9 / 3 - 1]))
    # cumulative loads: [8, 6, 6, 4] (mean 6) and [4, 4, 4, 12] (mean 6)
    torch.testing.assert_close(tr.cumulative_max_violation(), torch.tensor([8 / 6 - 1, 12 / 6 - 1]))
    with pytest.raises(ValueError, match="shape"):
        tr.update(torch.zeros(3, 4, dtype=torch.int64))

    restored = LoadTracker(2, 4)
    restored.load_state_dict(tr.state_dict())
    assert restored.steps == 2
    torch.testing.assert_close(restored.cumulative_max_violation(), tr.cumulative_max_violation())
    torch.testing.assert_close(restored.batch_max_violation(), tr.batch_max_violation())
    with pytest.raises(ValueError, match="layers x experts"):
        LoadTracker(3, 4).load_state_dict(tr.state_dict())
    tr.reset()
    assert tr.steps == 0 and tr.total.sum() == 0
