"""The server's engine thread admits a burst of requests as one batch (AsyncEngine's arrival
coalescing), and a closed loop at concurrency 1 never waits for it.

Why it matters: the engine runs prompt chunks of equal length as one forward. Before the server
coalesced arrivals, a burst that reached it a few milliseconds apart was split over two steps, and
the two cohorts then finished a step apart, so clients at a fixed concurrency kept sending their
next requests apart (the split repeated for the whole run: it cost the server ~10% against the
engine alone at concurrency 16 on the `small` preset).

The steps are observed through the engine's own schedule (the prompt chunks each step runs); the
outputs are checked against Engine.generate on the same prompts (greedy, so batching must not
change them).
"""
import asyncio

import pytest
import torch

import dsv3
from dsv3.infer.engine import Engine
from dsv3.infer.params import SamplingParams
from dsv3.serve.app import AsyncEngine, Choice
from dsv3.tokenizer import Tokenizer

from test_serve_api import build_model_dir

PROMPT_LEN, NEW = 12, 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("batching") / "tiny")


def _prompts(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 500, (n, PROMPT_LEN), generator=g).tolist()


class Recorder:
    """Wraps Engine._schedule: per step, how many prompt chunks (of the full prompt) it runs."""

    def __init__(self, engine):
        self.steps = []
        orig = engine._schedule

        def schedule():
            items = orig()
            self.steps.append(sum(1 for it in items if it.kind == "fill" and it.start == 0 and it.n == PROMPT_LEN))
            return items

        engine._schedule = schedule

    def prompt_steps(self, since=0):
        return [n for n in self.steps[since:] if n]


async def _run(ae, tok, prompts, tag, gap=0.0, new=NEW):
    """Add the prompts `gap` seconds apart; return their greedy outputs."""
    async def one(i, p):
        q = asyncio.Queue()
        c = Choice(0, tok, [], False, True, False, [], False, None, 0.0)
        ae.add(f"{tag}-{i}", p, SamplingParams(max_new_tokens=new, ignore_eos=True), c, q)
        out = []
        while True:
            d = await q.get()
            assert d.error is None
            out += d.token_ids
            if d.finished:
                return out

    tasks = []
    for i, p in enumerate(prompts):
        tasks.append(asyncio.ensure_future(one(i, p)))
        if gap:
            await asyncio.sleep(gap)
    return await asyncio.gather(*tasks)


def test_a_burst_is_admitted_together_and_concurrency_1_never_waits(folder):
    tok = Tokenizer.from_dir(folder)
    model = dsv3.load_model(folder, dtype=torch.float32).eval()
    engine = Engine(model, block_size=16, cache_memory=16 << 20, max_num_seqs=8, max_model_len=256,
                    eos_token_id=None)
    ref = Engine(dsv3.load_model(folder, dtype=torch.float32).eval(), block_size=16, cache_memory=16 << 20,
                 max_num_seqs=8, max_model_len=256, eos_token_id=None)
    rec = Recorder(engine)
    # a generous window: the test asserts the policy, not a timing (arrivals are 20 ms apart)
    ae = AsyncEngine(engine, batch_wait=2.0)
    ae.start()
    first, burst, single = _prompts(4, 0), _prompts(4, 1), _prompts(3, 2)

    async def main():
        # a batch of 4 runs and ends (arrivals at once: however they split, all 4 finish)
        await _run(ae, tok, first, "a")
        n0 = len(rec.steps)
        # its clients send 4 new requests 20 ms apart: one prompt step runs all 4 (without the
        # coalescing the engine thread starts on the first as soon as it arrives)
        out_burst = await _run(ae, tok, burst, "b", gap=0.02)
        assert rec.prompt_steps(n0) == [4]
        assert ae.gather_waits == 1
        # concurrency 1: each request replaces the one that finished. Only the first waits (it follows
        # a batch of 4, whose other clients might be sending theirs); the next ones start at once
        n1 = len(rec.steps)
        out_single = [(await _run(ae, tok, [p], f"s{i}"))[0] for i, p in enumerate(single)]
        assert rec.prompt_steps(n1) == [1, 1, 1]
        assert ae.gather_waits == 2
        return out_burst, out_single

    try:
        out_burst, out_single = asyncio.run(main())
    finally:
        ae.stop()
    assert ae.failures == 0
    greedy = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    assert out_burst == [c.token_ids for c in ref.generate(burst, greedy)]
    assert out_single == [c.token_ids for c in ref.generate(single, greedy)]


def test_requests_arriving_while_others_decode_are_not_held(folder):
    """The engine only waits before a step that would run prompts alone: requests that arrive while
    another one decodes join the batch as they come (holding them would stall its tokens)."""
    tok = Tokenizer.from_dir(folder)
    model = dsv3.load_model(folder, dtype=torch.float32).eval()
    engine = Engine(model, block_size=16, cache_memory=16 << 20, max_num_seqs=8, max_model_len=1024,
                    eos_token_id=None)
    rec = Recorder(engine)
    ae = AsyncEngine(engine, batch_wait=2.0)
    ae.start()

    async def main():
        long_ = asyncio.ensure_future(_run(ae, tok, _prompts(1, 3), "long", new=600))
        while engine.stats().generation_tokens == 0:
            await asyncio.sleep(0.005)
        await _run(ae, tok, _prompts(3, 4), "b", gap=0.02)
        assert not long_.done()  # the three ran while the long one decoded
        return await long_

    try:
        (out,) = asyncio.run(main())
    finally:
        ae.stop()
    assert ae.failures == 0 and len(out) == 600
    assert ae.gather_waits == 0
    assert sum(rec.prompt_steps()) == 4
