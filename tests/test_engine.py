"""The engine against references: transformers' greedy generate and dsv3.generate; each request's
tokens whatever the batch around it; prefix cache on/off; memory budget (queue, reject, preempt);
cancellation; sampling parameters and logprobs against direct computation (transformers' logits
processors where they exist, OpenAI's penalty formula otherwise)."""
import threading

import pytest
import torch

import dsv3
from dsv3.config import preset
from dsv3.infer.engine import Engine, QueueFull, RequestRejected
from dsv3.infer.params import SamplingParams, StopOnText
from dsv3.infer.sampling import batched_filtered_probs, filtered_probs, sample_inverse_cdf
from dsv3.model.moe import MoE
from hf_ref import YARN, make_v3


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    m = dsv3.Transformer(preset("tiny").replace(**kw)).init_weights(std=0.1)
    with torch.no_grad():
        for layer in m.layers:
            if isinstance(layer.ffn, MoE):
                layer.ffn.gate.bias.normal_(0, 0.05)
    return m.eval()


def rand_prompts(lengths, seed, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def check_blocks(engine):
    """Every block reference is held by a running request, and nothing else is referenced."""
    a = engine.alloc
    held = {}
    for r in engine.running:
        for b in r.blocks:
            held[b] = held.get(b, 0) + 1
    assert {b: c for b, c in enumerate(a.ref) if c} == held
    assert a.num_used() == len(held)


def greedy(n, **kw):
    return SamplingParams(max_new_tokens=n, **kw)


def test_engine_greedy_equals_generate_and_transformers(tmp_path):
    ref = make_v3(tmp_path, seed=11, rope_parameters=YARN)
    model = dsv3.load_model(tmp_path, dtype=torch.float32)
    prompts = rand_prompts((7, 3, 12, 30), seed=5, vocab=97)
    ours = dsv3.generate(model, prompts, max_new_tokens=16)
    # small blocks and a small step budget: prompts are prefilled in chunks across steps
    engine = Engine(model, block_size=4, max_num_batched_tokens=8, eos_token_id=None)
    got = [c.token_ids for c in engine.generate(prompts, greedy(16))]
    assert got == ours
    for p, g in zip(prompts, got):
        with torch.no_grad():
            want = ref.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                pad_token_id=0, min_new_tokens=16)[0, len(p):].tolist()
        assert g == want
    assert engine.alloc.num_used() == 0


def test_each_request_gets_the_same_tokens_whatever_the_batch():
    """16 requests with different prompt lengths and budgets, joining at different steps, chunked
    prefill next to decodes, at most 6 running: each equals its solo greedy run."""
    m = tiny_model(3)
    g = torch.Generator().manual_seed(7)
    lengths = torch.randint(1, 40, (16,), generator=g).tolist()
    budgets = torch.randint(3, 20, (16,), generator=g).tolist()
    prompts = rand_prompts(lengths, seed=8)
    solo_engine = Engine(m, block_size=4, enable_prefix_cache=False, eos_token_id=None)
    solo = [solo_engine.generate([p], greedy(n))[0].token_ids for p, n in zip(prompts, budgets)]
    engine = Engine(m, block_size=4, max_num_seqs=6, max_num_batched_tokens=24, eos_token_id=None)
    join_at = {0: [0, 1, 2], 1: [3], 3: [4, 5, 6, 7], 4: [8], 7: [9, 10], 9: [11, 12, 13, 14, 15]}
    ids, outs, batch_sizes = {}, {}, []
    step = 0
    while step <= max(join_at) or engine.has_unfinished():
        for i in join_at.get(step, []):
            ids[engine.add_request(prompts[i], greedy(budgets[i]))] = i
        for o in engine.step():
            outs.setdefault(ids[o.request_id], []).extend(o.new_token_ids)
        batch_sizes.append(len(engine.running))
        check_blocks(engine)
        step += 1
    assert max(batch_sizes) == 6 and min(batch_sizes) < 6
    assert [outs[i] for i in range(16)] == solo
    assert engine.alloc.num_used() == 0


def test_prefix_cache_on_off_same_outputs_and_blocks_freed():
    m = tiny_model(4)
    shared = rand_prompts([21], seed=9)[0]
    tails = rand_prompts([3, 9, 1, 14], seed=10)
    first = [shared + tails[0], shared + tails[1]]
    results = {}
    for on in (False, True):
        engine = Engine(m, block_size=4, max_num_batched_tokens=16, enable_prefix_cache=on, eos_token_id=None)
        done = []
        wave1 = engine.generate(first, greedy(10))
        check_blocks(engine)
        # second wave: the same prompts again, new tails, and a follow-up turn that extends a
        # whole first conversation (its prompt and its reply)
        follow = first[0] + wave1[0].token_ids + tails[3]
        wave2_prompts = [first[1], shared + tails[2], follow, shared[:5]]
        ids = [engine.add_request(p, greedy(10), on_output=lambda o: done.append(o) if o.finished else None)
               for p in wave2_prompts]
        while engine.has_unfinished():
            engine.step()
            check_blocks(engine)
        by_id = {o.request_id: o for o in done}
        wave2 = [by_id[i] for i in ids]
        results[on] = ([c.token_ids for c in wave1], [o.num_cached_tokens for o in wave2], engine,
                       [c.num_cached_tokens for c in wave1])
        assert engine.alloc.num_used() == 0 and all(c == 0 for c in engine.alloc.ref)
        assert engine.stats().num_free_blocks == engine.alloc.usable
    # identical outputs
    off, on = results[False], results[True]
    assert off[0] == on[0]
    assert off[2].stats().prefix_cache_hits == 0 and off[1] == [0, 0, 0, 0]
    # hits: whole blocks, and never the last prompt token (it must be computed to sample)
    assert on[1][0] == 28            # first[1] again (30 tokens): 7 blocks; the 8th would need token 32
    assert on[1][1] == 20            # the shared prefix (21 tokens): 5 blocks
    assert on[1][2] == (len(first[0]) + 10) // 4 * 4  # the whole previous turn, in full blocks
    assert on[1][3] == 4             # 5 tokens: 1 block, the 5th token is computed
    st = on[2].stats()
    # (in wave 1 the second request already found the blocks the first had computed meanwhile)
    assert st.prefix_cache_hits == sum(on[1]) + sum(on[3])
    assert st.prefix_cache_queries == sum(map(len, first)) + sum(map(len, wave2_prompts))


def test_prefix_cache_outputs_identical_per_request():
    # the same workload with the cache on and off gives the same tokens request by request
    m = tiny_model(4)
    shared = rand_prompts([21], seed=9)[0]
    prompts = [shared + t for t in rand_prompts([3, 9, 1, 14, 0 + 2], seed=10)] * 2
    outs = []
    for on in (False, True):
        e = Engine(m, block_size=4, max_num_seqs=3, max_num_batched_tokens=16, enable_prefix_cache=on,
                   eos_token_id=None)
        outs.append([c.token_ids for c in e.generate(prompts, greedy(8))])
        assert e.alloc.num_used() == 0
    assert outs[0] == outs[1]


def test_memory_budget_queues_rejects_and_preempts():
    m = tiny_model(5)
    prompts = rand_prompts((10, 11, 9, 12), seed=11)
    solo_engine = Engine(m, block_size=4, eos_token_id=None)
    solo = [solo_engine.generate([p], greedy(12))[0].token_ids for p in prompts]
    # 12 usable blocks of 4 tokens: each request needs 6 blocks by its end
    engine = Engine(m, block_size=4, num_blocks=13, max_model_len=64, max_queue=8, eos_token_id=None)
    with pytest.raises(RequestRejected) as e:
        engine.add_request(list(range(2, 40)), greedy(20))  # 59 slots > 48
    assert e.value.reason == "too_large_for_cache"
    with pytest.raises(RequestRejected) as e:
        engine.add_request(list(range(2, 70)), greedy(1))  # beyond the context length
    assert e.value.reason == "prompt_too_long"
    with pytest.raises(RequestRejected) as e:
        engine.add_request(list(range(2, 50)), greedy(20))  # 48 + 20 > 64
    assert e.value.reason == "prompt_too_long"
    ids = [engine.add_request(p, greedy(12)) for p in prompts]
    outs, waiting_seen, used = {}, 0, []
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
        waiting_seen = max(waiting_seen, len(engine.waiting))
        used.append(engine.alloc.num_used())
        check_blocks(engine)
    assert [outs[i] for i in ids] == solo
    assert waiting_seen > 0 and max(used) <= 12
    st = engine.stats()
    assert st.requests_rejected == 3 and st.requests_finished["length"] == 4
    # growth past the pool: requests admitted with short prompts outgrow it; the newest is
    # preempted (recomputed later) and every output is still the solo one
    short = rand_prompts((3, 2, 4, 3), seed=12)
    solo = [solo_engine.generate([p], greedy(26))[0].token_ids for p in short]
    engine = Engine(m, block_size=4, num_blocks=13, eos_token_id=None)
    got = [c.token_ids for c in engine.generate(short, greedy(26))]
    assert got == solo
    assert engine.stats().preemptions > 0 and engine.alloc.num_used() == 0
    # the queue limit
    engine = Engine(m, block_size=4, num_blocks=13, max_queue=2, eos_token_id=None)
    engine.add_request(prompts[0], greedy(4))
    engine.add_request(prompts[1], greedy(4))
    with pytest.raises(QueueFull):
        engine.add_request(prompts[2], greedy(4))


def test_cancellation_frees_blocks():
    m = tiny_model(6)
    engine = Engine(m, block_size=4, max_num_seqs=1, eos_token_id=None, enable_prefix_cache=False)
    a = engine.add_request(rand_prompts([17], seed=13)[0], greedy(40))
    b = engine.add_request(rand_prompts([5], seed=14)[0], greedy(3))  # waits: one sequence at a time
    for _ in range(3):
        engine.step()
    assert engine.alloc.num_used() >= 5 and len(engine.waiting) == 1
    assert engine.abort(a)
    outs = engine.step()
    fin = [o for o in outs if o.request_id == a]
    assert fin and fin[0].finished and fin[0].finish_reason == "abort"
    assert not engine.abort(a)  # already gone
    check_blocks(engine)
    assert [r.request_id for r in engine.running] == [b]  # the waiting request took its place
    while engine.has_unfinished():
        engine.step()
    assert engine.alloc.num_used() == 0
    # aborting a queued request, and closing a stream early
    engine = Engine(m, block_size=4, max_num_seqs=1, eos_token_id=None)
    engine.add_request([5, 6, 7], greedy(30))
    c = engine.add_request([8, 9], greedy(30))
    engine.step()
    engine.abort(c)
    assert any(o.request_id == c and o.finish_reason == "abort" for o in engine.step())
    stream = engine.stream([3, 4, 5, 6], greedy(30))
    next(stream)
    stream.close()
    while engine.has_unfinished():
        engine.step()
    assert engine.alloc.num_used() == 0 and engine.stats().requests_finished["abort"] == 2


def test_logprobs_and_prompt_logprobs_match_the_full_forward():
    m = tiny_model(7)
    prompt = rand_prompts([13], seed=15)[0]
    engine = Engine(m, block_size=4, max_num_batched_tokens=6, eos_token_id=None)
    engine.generate([prompt], greedy(4))  # warm the prefix cache: prompt logprobs must not use it
    c = engine.generate([prompt], SamplingParams(max_new_tokens=5, logprobs=3, prompt_logprobs=2))[0]
    seq = prompt + c.token_ids
    with torch.no_grad():
        lp = m(torch.tensor([seq]))[0].float().log_softmax(-1)
    assert c.prompt_logprobs[0] is None and len(c.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        t = c.prompt_logprobs[i]
        assert t.token_id == prompt[i] and abs(t.logprob - lp[i - 1, prompt[i]].item()) < 1e-4
        assert t.rank == int((lp[i - 1] > lp[i - 1, prompt[i]]).sum()) + 1
        assert [x for x, _ in t.top] == lp[i - 1].topk(2).indices.tolist()
    for j, t in enumerate(c.logprobs):
        row = lp[len(prompt) - 1 + j]
        assert t.token_id == c.token_ids[j] and t.rank == 1  # greedy picks the best
        assert abs(t.logprob - row.max().item()) < 1e-4
        assert [x for x, _ in t.top] == row.topk(3).indices.tolist()
        assert all(abs(v - row[x].item()) < 1e-4 for x, v in t.top)
    # echo with max_tokens 0 (lm-eval loglikelihood): prompt logprobs, no generated token
    e = engine.generate([prompt], SamplingParams(max_new_tokens=0, prompt_logprobs=0))[0]
    assert e.token_ids == [] and e.finish_reason == "length"
    assert [t.logprob for t in e.prompt_logprobs[1:]] == pytest.approx(
        [lp[i - 1, prompt[i]].item() for i in range(1, len(prompt))], abs=1e-4)
    assert engine.alloc.num_used() == 0


def _direct_greedy(m, prompt, n, process):
    seq = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            logits = m(torch.tensor([seq]))[0, -1].float()
        seq.append(int(process(seq, logits).argmax()))
    return seq[len(prompt):]


def test_penalties_match_direct_computation():
    from transformers import RepetitionPenaltyLogitsProcessor

    m = tiny_model(8)
    prompt = rand_prompts([6], seed=16)[0]
    engine = Engine(m, block_size=4, eos_token_id=None)
    plain = engine.generate([prompt], greedy(20))[0].token_ids

    def openai(seq, logits, pres=0.5, freq=0.7):
        gen = seq[len(prompt):]
        for t in set(gen):
            logits[t] -= freq * gen.count(t) + pres
        return logits

    want = _direct_greedy(m, prompt, 20, openai)
    got = engine.generate([prompt], greedy(20, presence_penalty=0.5, frequency_penalty=0.7))[0].token_ids
    assert got == want and got != plain

    proc = RepetitionPenaltyLogitsProcessor(1.5)
    want = _direct_greedy(m, prompt, 20, lambda s, x: proc(torch.tensor([s]), x[None])[0])
    got = engine.generate([prompt], greedy(20, repetition_penalty=1.5))[0].token_ids
    assert got == want and got != plain

    # stop ids end a request (the stop token is the last one); min_new_tokens masks them first
    stop = plain[2]
    c = engine.generate([prompt], greedy(20, stop_token_ids=[stop]))[0]
    assert c.token_ids == plain[:plain.index(stop) + 1] and c.finish_reason == "stop" and c.stop_reason == stop
    c = engine.generate([prompt], greedy(20, stop_token_ids=[stop], min_new_tokens=8))[0]
    assert stop not in c.token_ids[:8] and len(c.token_ids) >= 9
    # the engine's EOS id (the config's by default) stops too, unless ignore_eos
    engine_eos = Engine(m, block_size=4, eos_token_id=plain[1])
    assert engine_eos.generate([prompt], greedy(20))[0].token_ids == plain[:plain.index(plain[1]) + 1]
    assert engine_eos.generate([prompt], greedy(20, ignore_eos=True))[0].token_ids == plain


def test_top_k_top_p_temperature_match_transformers_warpers():
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=g) * 3
    temps = [0.7, 1.0, 1.3, 0.5, 2.0, 1.0]
    ks = [0, 20, 5, 0, 299, 1]
    ps = [0.9, 1.0, 0.5, 0.3, 0.95, 0.8]
    # a small candidate set forces the full-sort fallback on some rows
    for cand in (256, 8):
        got = batched_filtered_probs(logits, torch.tensor(temps), torch.tensor(ps), torch.tensor(ks),
                                     nucleus_candidates=cand)
        for i in range(6):
            x = TemperatureLogitsWarper(temps[i])(None, logits[i:i + 1].clone())
            if ks[i]:
                x = TopKLogitsWarper(ks[i])(None, x)
            if ps[i] < 1:
                x = TopPLogitsWarper(ps[i])(None, x)
            want = x.softmax(-1)[0]
            assert torch.allclose(got[i], want, atol=1e-6), i
            assert torch.allclose(got[i], filtered_probs(logits[i:i + 1], temps[i], ps[i], ks[i])[0], atol=1e-6)


def test_inverse_cdf_sampling_follows_the_distribution():
    g = torch.Generator().manual_seed(1)
    p = torch.tensor([0.5, 0.0, 0.2, 0.25, 0.05])
    n = 40000
    draws = sample_inverse_cdf(p.expand(n, 5), torch.rand(n, generator=g, dtype=torch.float64))
    counts = torch.bincount(draws, minlength=5).double()
    assert counts[1] == 0  # zero-probability tokens are never drawn
    nz = p > 0
    chi2 = (((counts - n * p) ** 2)[nz] / (n * p[nz])).sum().item()
    assert chi2 < 16.3  # chi-square, 3 degrees of freedom, p = 0.001


def test_seeded_sampling_is_reproducible_and_batch_independent():
    m = tiny_model(9)
    prompts = rand_prompts((5, 9, 3), seed=17)
    sp = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=123)
    engine = Engine(m, block_size=4, eos_token_id=None)
    alone = engine.generate([prompts[0]], sp)[0].token_ids
    mixed = engine.generate(prompts, [sp, SamplingParams(max_new_tokens=7, temperature=0.8, seed=5), greedy(9)])
    assert mixed[0].token_ids == alone
    other = engine.generate([prompts[0]], SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50,
                                                         seed=124))[0].token_ids
    assert other != alone


def test_streaming_stop_checker_and_callbacks():
    m = tiny_model(10)
    prompt = rand_prompts([8], seed=18)[0]
    engine = Engine(m, block_size=4, eos_token_id=None)
    full = engine.generate([prompt], greedy(12))[0].token_ids
    pieces = [o.new_token_ids for o in engine.stream(prompt, greedy(12))]
    assert sum(pieces, []) == full and all(len(p) == 1 for p in pieces)
    # a stop checker (the text layer's hook) ends the request after the token it saw
    c = engine.generate([prompt], greedy(12), stop_checkers=[lambda r: "three" if len(r.output_token_ids) == 3
                                                            else None])[0]
    assert c.token_ids == full[:3] and c.finish_reason == "stop" and c.stop_reason == "three"
    # a checker or callback that raises stops its own request, not the engine
    engine.add_request(prompt, greedy(12), stop_checker=lambda r: 1 / 0)
    engine.add_request(prompt, greedy(3), on_output=lambda o: [][1])
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    bad = [o for o in outs if o.finished and "ZeroDivisionError" in str(o.stop_reason)]
    assert len(bad) == 1 and bad[0].num_output_tokens == 1
    assert sum(len(o.new_token_ids) for o in outs) == 1 + 3

    # StopOnText with a toy detokenizer (token t -> one letter): text cut before the stop string,
    # and the streamed pieces never show a partial stop string
    class Detok:
        def push(self, t):
            return chr(ord("a") + t % 26)

        def flush(self):
            return ""

    text = "".join(chr(ord("a") + t % 26) for t in full)
    stop = text[4:6]
    checker = StopOnText(Detok(), [stop, "zzzzzz"])
    streamed = []
    for o in engine.stream(prompt, greedy(12), stop_checker=checker):
        streamed.append(checker.take())
        if o.finished:
            checker.finish()
            streamed.append(checker.take())
            assert o.finish_reason == "stop" and o.stop_reason == stop
    assert checker.text == text[:text.index(stop)] == "".join(streamed)


def test_stop_on_text_holds_back_partial_matches():
    class R:
        output_token_ids = []

    pieces = iter(["Hel", "lo wo", "rld", "!!"])

    class Detok:
        def push(self, t):
            return next(pieces)

        def flush(self):
            return ""

    c = StopOnText(Detok(), ["world", "lo w!"])
    out = []
    for i in range(3):
        R.output_token_ids = list(range(i + 1))
        res = c(R)
        out.append(c.take())
    # "l" could start "lo w!", then "wo" could start "world": each is held back until it cannot
    assert res == "world" and c.text == "Hello " and out == ["He", "llo ", ""]


def test_background_loop_with_requests_from_other_threads():
    m = tiny_model(11)
    prompts = rand_prompts((4, 7, 2, 9, 5), seed=19)
    engine = Engine(m, block_size=4, eos_token_id=None)
    want = [c.token_ids for c in engine.generate(prompts, greedy(6))]
    stop = threading.Event()
    loop = threading.Thread(target=engine.run_forever, args=(stop,), daemon=True)
    loop.start()
    got, done = {}, threading.Semaphore(0)

    def on_output(o):
        got.setdefault(o.request_id, []).extend(o.new_token_ids)
        if o.finished:
            done.release()

    def client(i):
        ids[i] = engine.add_request(prompts[i], greedy(6), on_output=on_output)

    ids = {}
    threads = [threading.Thread(target=client, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for _ in range(5):
        assert done.acquire(timeout=60)
    stop.set()
    loop.join(timeout=10)
    assert [got[ids[i]] for i in range(5)] == want
    st = engine.stats()
    assert st.num_running == 0 and st.generation_tokens == 2 * 30 and st.prompt_tokens == 2 * 27


def test_generate_gives_the_attention_modules_their_path_back():
    m = tiny_model()
    mlas = [mod for mod in m.modules() if hasattr(mod, "attn_impl")]
    mlas[0].attn_impl = "naive"  # whatever the caller had set
    e = Engine(m, eos_token_id=None)
    prompts = rand_prompts([5, 9], seed=3)
    first = e.generate(prompts, greedy(6))
    assert [mod.attn_impl for mod in mlas] == ["naive"] + ["auto"] * (len(mlas) - 1)
    # the engine sets its paths again on its next steps: the same tokens
    assert [c.token_ids for c in e.generate(prompts, greedy(6))] == [c.token_ids for c in first]


def test_bad_input_is_a_value_error():
    m = tiny_model(12)
    engine = Engine(m, block_size=4)
    for prompt, sp, msg in [([], None, "at least one token"), ([600], None, "in \\[0, 512\\)"),
                            ([1], SamplingParams(temperature=-1), "temperature"),
                            ([1], SamplingParams(top_p=0), "top_p"),
                            ([1], SamplingParams(presence_penalty=3), "presence_penalty"),
                            ([1], SamplingParams(logprobs=1000), "logprobs"),
                            ([1], SamplingParams(stop_token_ids=[999]), "stop_token_ids")]:
        with pytest.raises(ValueError, match=msg):
            engine.add_request(prompt, sp)
    with pytest.raises(ValueError, match="speculative"):
        Engine(m, speculative="eagle")
    with pytest.raises(ValueError, match="MTP"):
        Engine(tiny_model(0, num_nextn_predict_layers=0), speculative="mtp")
    engine.add_request([1, 2], request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1, 2], request_id="x")
