"""MTP speculative decoding: greedy output identical to plain greedy decoding (random MTP weights,
and MTP weights that agree with the model part of the time, so both the accept and the reject
paths run), and sampled output distributed as the target: the rejection sampler on synthetic
distributions, and the engine end to end on a 4-token vocabulary against the exact joint
distribution from full forwards (chi-square)."""
import math

import pytest
import torch

from dsv3.infer.engine import Engine
from dsv3.infer.params import SamplingParams
from dsv3.infer.speculative import frequent_tokens, rejection_sample, verify_greedy
from dsv3.model.moe import MoE
from test_engine import check_blocks, greedy, rand_prompts, tiny_model


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.09: p = 0.001)."""
    a = 2 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic, pooling the cells expected fewer than 5 times into one; (stat, df)."""
    n = counts.sum()
    exp = probs.double() * n
    small = exp < 5
    o = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    e = torch.cat([exp[~small], exp[small].sum()[None]])
    keep = e > 0
    return float((((o - e) ** 2)[keep] / e[keep]).sum()), int(keep.sum()) - 1


def aligned_model(seed=3, scale=0.05, noise=0.1):
    """A model whose MTP module mostly agrees with it: layers scaled down so the next token depends
    mostly (not only) on the current one, and an MTP module that passes the embedding of its input
    token through (eh_proj ~ [I, noise]); its draft is then right some of the time."""
    m = tiny_model(seed)

    def shrink(block):
        block.attn.wo.weight.mul_(scale)
        f = block.ffn
        if isinstance(f, MoE):
            f.experts.w2.mul_(scale)
            f.shared_experts.w2.weight.mul_(scale)
        else:
            f.w2.weight.mul_(scale)

    with torch.no_grad():
        for layer in m.layers:
            shrink(layer)
        d = m.config.hidden_size
        g = torch.Generator().manual_seed(seed)
        m.mtp[0].eh_proj.weight.copy_(torch.cat([torch.eye(d), noise * torch.randn(d, d, generator=g) / d ** 0.5], 1))
        shrink(m.mtp[0].block)
    return m


def test_rejection_sampling_recovers_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    V, N = 6, 200_000
    p = torch.softmax(torch.randn(3, V, generator=g) * 1.5, -1)  # target at draft 1, draft 2, bonus
    q = torch.softmax(torch.randn(2, V, generator=g) * 1.5, -1)
    q[0, 2] = 0.0  # a token the draft never proposes still comes out at its target rate
    q[0] /= q[0].sum()
    for k in (1, 2):
        drafts = torch.stack([torch.multinomial(q[i], N, replacement=True, generator=g) for i in range(k)], 1)
        u = torch.rand(N, k + 1, generator=g, dtype=torch.float64)
        out = rejection_sample(p[None, [*range(k), 2]].expand(N, -1, -1), q[None, :k].expand(N, -1, -1), drafts, u)
        first = torch.tensor([o[0] for o in out])
        c1 = torch.bincount(first, minlength=V)
        stat, df = chi2(c1, p[0])
        assert stat < chi2_critical(df)
        # expected acceptance of the first draft: sum_x min(p(x), q(x))
        acc = sum(len(o) > 1 for o in out) / N
        assert abs(acc - torch.minimum(p[0], q[0]).sum().item()) < 0.005
        # the token after an accepted first draft is distributed as the next target
        second = torch.tensor([o[1] for o in out if len(o) > 1])
        stat, df = chi2(torch.bincount(second, minlength=V), p[1 if k == 2 else 2])
        assert stat < chi2_critical(df)
        # and proposing from q without correction would be caught by the same test
        stat, df = chi2(torch.bincount(drafts[:, 0], minlength=V), p[0])
        assert stat > 10 * chi2_critical(df)


def test_verify_greedy_accepts_the_matching_prefix():
    target = torch.tensor([[5, 7, 9], [5, 8, 9], [4, 7, 9]])
    drafts = torch.tensor([[5, 7], [5, 7], [5, 7]])
    assert verify_greedy(target, drafts) == [[5, 7, 9], [5, 8], [4]]
    # nested lists (the engine's screened path) give the same, and a mismatch stops the prefix for good
    assert verify_greedy(target.tolist(), drafts.tolist()) == [[5, 7, 9], [5, 8], [4]]
    assert verify_greedy([[1, 2, 3]], [[0, 2]]) == [[1]]


@pytest.mark.parametrize("kind", ["random-mtp", "aligned-mtp"])
def test_speculative_greedy_equals_plain_greedy(kind):
    m = tiny_model(3) if kind == "random-mtp" else aligned_model()
    prompts = rand_prompts((5, 17, 1, 33, 8, 2), seed=1)
    plain_engine = Engine(m, block_size=4, eos_token_id=None)
    plain = [c.token_ids for c in plain_engine.generate(prompts, greedy(24))]
    spec = Engine(m, block_size=4, eos_token_id=None, speculative="mtp", max_num_batched_tokens=16, max_num_seqs=4)
    ids = [spec.add_request(p, greedy(24)) for p in prompts]
    got = {}
    while spec.has_unfinished():
        for o in spec.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
        check_blocks(spec)
    assert [got[i] for i in ids] == plain
    st = spec.stats().spec
    assert st.emitted == sum(map(len, plain)) - len(prompts)  # the first token comes from the prefill
    if kind == "aligned-mtp":
        assert 0.1 < st.acceptance_rate < 0.9  # both paths ran, many times
        assert st.mean_accepted_length == pytest.approx(1 + st.acceptance_rate)
    # second wave through the prefix cache (MTP latents included), with penalties and stop ids
    again = spec.generate(prompts, greedy(24))
    assert [c.token_ids for c in again] == plain and sum(c.num_cached_tokens for c in again) > 0
    sp = greedy(24, presence_penalty=0.4, frequency_penalty=0.3, stop_token_ids=[plain[3][9]])
    assert [c.token_ids for c in spec.generate(prompts, sp)] == \
        [c.token_ids for c in plain_engine.generate(prompts, sp)]
    assert spec.alloc.num_used() == 0
    # a draft vocabulary (FR-Spec) changes which drafts are proposed, never the output
    vocab = frequent_tokens(plain, 40) + list(range(0, 512, 7))
    small = Engine(m, block_size=4, eos_token_id=None, speculative="mtp", draft_vocab=sorted(set(vocab)))
    assert [c.token_ids for c in small.generate(prompts, greedy(24))] == plain
    if kind == "aligned-mtp":
        assert small.stats().spec.accepted > 0


def test_greedy_drafts_over_a_draft_vocabulary_through_its_int8_screen(monkeypatch):
    """Greedy drafts over a draft vocabulary (given unsorted) read its int8 screen: the same drafts, so the
    same acceptance, as its full logits, and the plain greedy output."""
    import dsv3.infer.screen as screen

    m = aligned_model(seed=2)
    prompts = rand_prompts((5, 3, 6), seed=8)
    plain = [c.token_ids for c in Engine(m, block_size=4, eos_token_id=None).generate(prompts, greedy(20))]
    vocab = list(range(511, 0, -3)) + [t for p in plain for t in p]
    vocab = list(dict.fromkeys(vocab))
    monkeypatch.setattr(screen, "MIN_ELEMENTS", 0)
    runs = {}
    for screened in (True, False):
        e = Engine(m, block_size=4, eos_token_id=None, speculative="mtp", draft_vocab=vocab)
        assert (e._draft_screen is not None) and e._draft_id_list == sorted(vocab)
        if not screened:
            e._draft_screen = None
        calls = []
        if screened:
            real = e._draft_screen.argmax
            e._draft_screen.argmax = lambda h: calls.append(h.shape[0]) or real(h)
        assert [c.token_ids for c in e.generate(prompts, greedy(20))] == plain
        runs[screened] = (e.stats().spec.accepted, e.stats().spec.drafted)
        assert bool(calls) == screened
    assert runs[True] == runs[False] and runs[True][0] > 0


def test_frequent_tokens_ranks_by_count():
    assert frequent_tokens([[5, 3, 5], [7, 5, 3]], 2) == [5, 3]


def test_speculative_under_preemption_and_with_logprobs():
    m = aligned_model(seed=4)
    prompts = rand_prompts((3, 2, 4, 3), seed=12)
    plain = Engine(m, block_size=4, eos_token_id=None).generate(prompts, greedy(26, logprobs=2))
    spec = Engine(m, block_size=4, num_blocks=14, eos_token_id=None, speculative="mtp")
    got = spec.generate(prompts, greedy(26, logprobs=2))
    assert [c.token_ids for c in got] == [c.token_ids for c in plain]
    assert spec.stats().preemptions > 0 and spec.alloc.num_used() == 0
    for a, b in zip(got, plain):
        assert [t.logprob for t in a.logprobs] == pytest.approx([t.logprob for t in b.logprobs], abs=1e-4)
        assert [t.top[1][0] for t in a.logprobs] == [t.top[1][0] for t in b.logprobs]


@pytest.mark.parametrize("draft_vocab", [None, [0, 2, 3]])
def test_speculative_sampling_keeps_the_target_distribution(draft_vocab):
    """4-token vocabulary, temperature 1: the joint law of the first three generated tokens (t1 from
    the prefill, t2 through accept/reject of the MTP draft, t3 a bonus token or the next verify)
    against the exact law from full forwards; also when the draft may only propose 3 of the 4
    tokens (a draft vocabulary): token 1 then only ever comes from the residual."""
    m = tiny_model(5, vocab_size=4)
    prompt, V, N = [1, 2, 3], 4, 5000
    engine = Engine(m, block_size=16, eos_token_id=None, speculative="mtp", max_num_seqs=1024,
                    max_num_batched_tokens=8192, draft_vocab=draft_vocab)
    out = engine.generate([prompt] * N, [SamplingParams(max_new_tokens=3, temperature=1.0, seed=i) for i in range(N)])
    st = engine.stats().spec
    assert 0.1 < st.acceptance_rate < 0.95  # both accept and reject happened often
    counts = torch.zeros(V ** 3, dtype=torch.long)
    for c in out:
        t1, t2, t3 = c.token_ids
        counts[t1 * V * V + t2 * V + t3] += 1
    seqs = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])  # (16, 5)
    with torch.no_grad():
        lp = m(seqs).float().softmax(-1)  # p(. | prefix) at every position
        h = m.hidden(seqs[:, :4])
        q = m.logits(m.mtp_hidden(h[:, :3], seqs[:, :4], depths=1)[0][:, 2]).float().softmax(-1)  # draft of t2
    p1 = lp[0, 2]                                   # t1 | prompt
    p2 = lp[::V, 3]                                 # t2 | prompt, t1  (rows with b = 0)
    p3 = lp[:, 4].view(V, V, V)                     # t3 | prompt, t1, t2
    joint = (p1[:, None, None] * p2[:, :, None] * p3).flatten()
    stat, df = chi2(counts, joint)
    assert stat < chi2_critical(df)
    # power: had the draft simply been kept (t2 ~ q), the same test would reject
    if draft_vocab is not None:
        q = q.clone()
        q[:, 1] = 0
        q = q / q.sum(-1, keepdim=True)
    wrong = (p1[:, None, None] * q[::V][:, :, None] * p3).flatten()
    stat, df = chi2(counts, wrong)
    assert stat > 3 * chi2_critical(df)


def test_speculative_seeded_sampling_is_batch_independent():
    m = aligned_model(seed=6)
    prompts = rand_prompts((5, 9, 3), seed=17)
    sp = SamplingParams(max_new_tokens=16, temperature=0.9, top_k=40, seed=7)
    engine = Engine(m, block_size=4, eos_token_id=None, speculative="mtp")
    alone = engine.generate([prompts[0]], sp)[0].token_ids
    mixed = engine.generate(prompts, [sp, SamplingParams(max_new_tokens=5, temperature=1.0, seed=1), greedy(11)])
    assert mixed[0].token_ids == alone and len(alone) == 16
