"""Data-parallel serving (issue 7): `dsv3 serve --dp N` under torchrun, N whole-model replicas behind
one HTTP front end (dsv3.infer.replicas).

References: a single-process Engine serving each prompt alone (what every request must get, whichever
replica runs it), the Engine's own refusals (the front end must refuse exactly what a replica would),
and the Engine's behaviour for a text stop (a `stop_checker`) and a cancel. The unit tests run the
replicas in this process (InProcessTransport: commands and replies still go through pickle) or behind
a scripted fake transport; the end-to-end test starts `torchrun --nproc-per-node 2 -m dsv3 serve
--dp 2` on a tiny model and talks HTTP to it.
"""
import asyncio
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

import dsv3
from dsv3.cli import main
from dsv3.config import preset
from dsv3.infer.engine import Engine, QueueFull, RequestRejected
from dsv3.infer.params import ABORT, LENGTH, STOP, RequestOutput, SamplingParams
from dsv3.infer.replicas import InProcessTransport, Reply, ReplicatedEngine
from dsv3.parallel.dist import free_port

from test_parallel_cli import kill_job
from test_serve_api import build_model_dir

ROOT = Path(__file__).resolve().parents[1]
KW = dict(block_size=16, num_blocks=64, max_model_len=256, eos_token_id=None)


@pytest.fixture(scope="module")
def model():
    cfg = preset("tiny").replace(vocab_size=512)
    torch.manual_seed(0)
    return dsv3.Transformer(cfg).init_weights(std=0.1).eval()


def replicated(model, n=2, **kw):
    """n engines on their own copies of the weights (an Engine switches its model's attention path)."""
    engines = [Engine(copy.deepcopy(model), **KW) for _ in range(n)]
    return ReplicatedEngine(engines[0], InProcessTransport(engines[1:]), **kw), engines


def prompts(n, seed, lo=3, hi=30):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 500, (int(k),), generator=g).tolist() for k in torch.randint(lo, hi, (n,), generator=g)]


def solo(model, prompt, params, stop_checker=None):
    """The reference: one Engine, this prompt alone."""
    e = Engine(model, **KW)
    e.add_request(prompt, params, stop_checker=stop_checker)
    outs = []
    while e.has_unfinished():
        outs += e.step()
    return outs


class Sink:
    """on_output callbacks: every RequestOutput per request id, in order."""

    def __init__(self):
        self.outs = {}

    def __call__(self, rid):
        return lambda o: self.outs.setdefault(rid, []).append(o)

    def tokens(self, rid):
        return [t for o in self.outs[rid] for t in o.new_token_ids]

    def last(self, rid):
        return self.outs[rid][-1]


def drain(rep):
    returned = []
    while rep.has_unfinished():
        returned += rep.step()
    return returned


# ---------------------------------------------------------------------- assignment and gathering
def test_greedy_outputs_equal_one_engine_whichever_replica_runs_them(model):
    rep, engines = replicated(model, 3)
    ps = prompts(9, 1)
    sink = Sink()
    news = [4 + i % 5 for i in range(9)]
    for i, p in enumerate(ps):
        rep.add_request(p, SamplingParams(max_new_tokens=news[i], ignore_eos=True), request_id=f"r{i}",
                        on_output=sink(f"r{i}"))
    # least loaded, ties to the lowest rank: round robin while all loads are equal
    assert [rep.replica_of(f"r{i}") for i in range(9)] == [0, 1, 2] * 3
    assert rep.assigned == [3, 3, 3]
    returned = drain(rep)
    for i, p in enumerate(ps):
        want = solo(model, p, SamplingParams(max_new_tokens=news[i], ignore_eos=True))
        assert sink.tokens(f"r{i}") == [t for o in want for t in o.new_token_ids]
        last = sink.last(f"r{i}")
        assert (last.finished, last.finish_reason, last.num_output_tokens, last.num_prompt_tokens) == \
            (True, LENGTH, news[i], len(p))
    # step() returns exactly what the callbacks got
    assert sorted((o.request_id, tuple(o.new_token_ids)) for o in returned) == \
        sorted((rid, tuple(o.new_token_ids)) for rid, os_ in sink.outs.items() for o in os_)
    # the statistics are the sums over the replicas' own engines
    s, parts = rep.stats(), [e.stats() for e in engines]
    assert s.generation_tokens == sum(news) == sum(p.generation_tokens for p in parts)
    assert s.prompt_tokens == sum(map(len, ps)) == sum(p.prompt_tokens for p in parts)
    assert all(p.generation_tokens > 0 for p in parts)
    assert s.num_blocks == 3 * (KW["num_blocks"] - 1) and s.num_running == 0 and s.cache_usage == 0.0
    assert s.requests_finished[LENGTH] == 9 and rep.running == []


def test_sampled_outputs_equal_one_engine_with_the_same_server_seed(model):
    # rank 0 draws each request's seed in arrival order, as one Engine does from its own seed
    ps = prompts(6, 2)
    sp = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.9, ignore_eos=True)
    one = Engine(copy.deepcopy(model), **KW, seed=123)
    want = [c.token_ids for c in one.generate(ps, sp)]
    rep, _ = replicated(model, 2, seed=123)
    sink = Sink()
    for i, p in enumerate(ps):
        rep.add_request(p, sp, request_id=f"r{i}", on_output=sink(f"r{i}"))
    drain(rep)
    assert [sink.tokens(f"r{i}") for i in range(6)] == want
    assert len({tuple(w) for w in want}) > 1


def test_least_loaded_replica_gets_the_next_request(model):
    rep, engines = replicated(model, 3)
    sp = SamplingParams(max_new_tokens=50, ignore_eos=True)
    for rid in "ABCD":
        rep.add_request(prompts(1, ord(rid))[0], sp, request_id=rid)
    assert [rep.replica_of(r) for r in "ABCD"] == [0, 1, 2, 0]
    rep.step()
    assert sorted(rep.running) == list("ABCD")  # sent to their replicas
    assert rep.abort("B")  # loads now [2, 0, 1]
    rep.step()
    assert rep.replica_of("B") is None and engines[1].stats().num_running == 0
    rep.add_request(prompts(1, 5)[0], sp, request_id="E")
    rep.add_request(prompts(1, 6)[0], sp, request_id="F")  # [2, 1, 1]: the tie goes to replica 1
    assert rep.replica_of("E") == 1 and rep.replica_of("F") == 1
    for r in "ACDEF":
        rep.abort(r)
    drain(rep)
    assert [e.stats().num_running for e in engines] == [0, 0, 0]


def test_prefix_aware_assignment_within_the_slack(model):
    shared = prompts(1, 7, 40, 41)[0]  # 40 tokens: two full blocks of 16
    a, b, c, d = (shared + prompts(1, 10 + i, 5, 6)[0] for i in range(4))
    sp = SamplingParams(max_new_tokens=2, ignore_eos=True)
    rep, _ = replicated(model, 2, prefix_slack=1)
    for rid, p in zip("abcd", (a, b, c, d)):
        rep.add_request(p, sp, request_id=rid)
    # b: replica 0 holds its first two blocks and its load (1) is within 1 of the least (0);
    # c: replica 0's load (2) is past the slack, so c spreads the prefix to replica 1;
    # d: both hold the prefix, the less loaded wins
    assert [rep.replica_of(r) for r in "abcd"] == [0, 0, 1, 1]
    drain(rep)
    plain, _ = replicated(model, 2, prefix_aware=False)
    for rid, p in zip("abcd", (a, b, c, d)):
        plain.add_request(p, sp, request_id=rid)
    assert [plain.replica_of(r) for r in "abcd"] == [0, 1, 0, 1]
    drain(plain)


# ---------------------------------------------------------------------- stops, cancels, refusals
def test_text_stop_on_a_remote_replica_cuts_like_one_engine_and_frees_it(model):
    p = prompts(1, 3)[0]
    sp = SamplingParams(max_new_tokens=30, ignore_eos=True)
    want_all = [t for o in solo(model, p, sp) for t in o.new_token_ids]
    stop_at = want_all[4]  # stop once this token (the 5th) was generated: a rank-0 decision

    def checker(req):
        return f"saw {stop_at}" if req.output_token_ids and req.output_token_ids[-1] == stop_at else None

    ref = solo(model, p, sp, checker)
    rep, engines = replicated(model, 2)
    sink = Sink()
    rep.add_request(prompts(1, 4)[0], SamplingParams(max_new_tokens=30, ignore_eos=True), request_id="other")
    rep.add_request(p, sp, request_id="x", stop_checker=checker, on_output=sink("x"))
    assert rep.replica_of("x") == 1
    while rep.replica_of("x") is not None:
        rep.step()
    got, last = sink.tokens("x"), sink.last("x")
    assert got == [t for o in ref for t in o.new_token_ids] and len(got) < 30
    assert (last.finish_reason, last.stop_reason, last.num_output_tokens) == \
        (ref[-1].finish_reason, ref[-1].stop_reason, ref[-1].num_output_tokens) == (STOP, f"saw {stop_at}", len(got))
    rep.step()  # the cancel reaches replica 1: its blocks are free, nothing more is delivered
    assert engines[1].stats().num_running == 0 and engines[1].alloc.num_used() == 0
    assert len(sink.outs["x"]) == len(got)
    assert rep.stats().requests_finished[STOP] == 1  # rank 0's count (replica 1 saw an abort)
    rep.abort("other")
    drain(rep)


class ScriptedTransport:
    """A fake transport: records the commands, answers with scripted replies per step."""

    def __init__(self, size, stats, script):
        self.size, self.stats, self.script = size, stats, list(script)
        self.sent = []

    def exchange(self, commands, local):
        self.sent.append(commands)
        outs = self.script.pop(0) if self.script else {}
        return [Reply(outs.get(r, []), self.stats) for r in range(self.size)]

    def stop(self):
        pass


def test_a_stop_inside_a_multi_token_output_cuts_it_there(model):
    # a speculative step can return two tokens at once; the stop string completes at the first
    local = Engine(copy.deepcopy(model), **KW)
    out = RequestOutput("x", [7, 8, 9], None, False, None, None, 4, 3, 0)
    t = ScriptedTransport(2, local.stats(), [{}, {1: [out]}])
    rep = ReplicatedEngine(local, t)
    seen = []

    def checker(req):
        seen.append(list(req.output_token_ids))
        return "8!" if req.output_token_ids[-1] == 8 else None

    rep.add_request([1, 2, 3, 4], SamplingParams(max_new_tokens=10), request_id="a")
    sink = Sink()
    rep.add_request([1, 2, 3, 4], SamplingParams(max_new_tokens=10, seed=5), request_id="x", stop_checker=checker,
                    on_output=sink("x"))
    assert rep.replica_of("x") == 1
    rep.step()
    assert t.sent[0][1] == [("add", "x", [1, 2, 3, 4], SamplingParams(max_new_tokens=10, seed=5))]
    assert t.sent[0][0][0][0] == "add" and t.sent[0][0][0][3].seed is not None  # rank 0 drew a's seed
    rep.step()
    assert seen == [[7], [7, 8]]  # asked after every token, as Engine._append does, and not past the stop
    o = sink.last("x")
    assert (o.new_token_ids, o.finished, o.finish_reason, o.stop_reason, o.num_output_tokens) == \
        ([7, 8], True, STOP, "8!", 2)
    rep.step()
    assert t.sent[2][1] == [("abort", "x")]  # it still ran on replica 1


def test_refusals_equal_the_engines(model):
    rep, engines = replicated(model, 2)
    one = Engine(copy.deepcopy(model), **KW)
    bad = [([], None), ([1, 600], None), ([1] * 256, None), ([1] * 200, SamplingParams(max_new_tokens=100)),
           ([1, 2], SamplingParams(temperature=-1.0)), ([1, 2], SamplingParams(top_p=0.0)),
           ([1, 2], SamplingParams(logprobs=1000)), ([1, 2], "greedy")]
    small = Engine(copy.deepcopy(model), **{**KW, "num_blocks": 4})
    small_rep = ReplicatedEngine(Engine(copy.deepcopy(model), **{**KW, "num_blocks": 4}), InProcessTransport([]))
    cases = [(rep, one, p, sp) for p, sp in bad] + [(small_rep, small, [1] * 10, SamplingParams(max_new_tokens=100))]
    for r, e, p, sp in cases:
        with pytest.raises(ValueError) as want:
            e.add_request(p, sp)
        with pytest.raises(ValueError) as got:
            r.add_request(p, sp)
        assert type(got.value) is type(want.value) and str(got.value) == str(want.value)
        if isinstance(want.value, RequestRejected):
            assert got.value.reason == want.value.reason
    assert rep.stats().requests_rejected == one.stats().requests_rejected == 2
    assert not rep.has_unfinished()
    rep.add_request([1, 2], request_id="dup")
    with pytest.raises(ValueError, match="already in use"):
        rep.add_request([1, 2], request_id="dup")
    drain(rep)


def test_queue_limit_is_per_replica(model):
    rep, _ = replicated(model, 2, max_queue=1)
    sp = SamplingParams(max_new_tokens=3, ignore_eos=True)
    rep.add_request([1, 2, 3], sp, request_id="a")
    rep.add_request([1, 2, 3], sp, request_id="b")
    with pytest.raises(QueueFull):  # one waiting on each replica
        rep.add_request([1, 2, 3], sp)
    assert rep.stats().requests_rejected == 1
    rep.step()  # both admitted (running): each replica has room for one waiting request again
    rep.add_request([1, 2, 3], sp, request_id="c")
    rep.add_request([1, 2, 3], sp, request_id="d")
    assert {rep.replica_of("c"), rep.replica_of("d")} == {0, 1}
    drain(rep)


# ---------------------------------------------------------------------- failures
def test_a_failed_replica_step_fails_the_step_and_the_rest_drains(model):
    rep, engines = replicated(model, 2)
    sink = Sink()
    for i in range(4):
        rep.add_request(prompts(1, 20 + i)[0], SamplingParams(max_new_tokens=8, ignore_eos=True),
                        request_id=f"r{i}", on_output=sink(f"r{i}"))
    rep.step()
    real = engines[1].step
    engines[1].step = lambda: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="replica 1: RuntimeError: boom"):
        rep.step()
    engines[1].step = real
    assert len(sink.outs["r0"]) == 2 and len(sink.outs["r1"]) == 1  # replica 0's tokens were delivered
    for i in range(4):  # what the AsyncEngine does after a failed step
        assert rep.abort(f"r{i}")
    drain(rep)
    assert all(sink.last(f"r{i}").finish_reason == ABORT for i in range(4))
    assert [e.stats().num_running for e in engines] == [0, 0] and engines[1].alloc.num_used() == 0


def test_a_lost_replica_marks_the_engine_dead(model):
    local = Engine(copy.deepcopy(model), **KW)

    class Broken:
        size = 2

        def exchange(self, commands, local):
            raise RuntimeError("Connection reset by peer")

        def stop(self):
            raise AssertionError("no stop command over a broken group")

    dead = []
    rep = ReplicatedEngine(local, Broken(), on_dead=lambda: dead.append(1))
    rep.add_request([1, 2, 3], request_id="a")
    with pytest.raises(RuntimeError, match="lost a data-parallel replica"):
        rep.step()
    assert dead == [1] and rep.dead and not rep.has_unfinished() and not rep.abort("a")
    with pytest.raises(RuntimeError, match="engine is down"):
        rep.add_request([1, 2, 3])
    rep.shutdown()


# ---------------------------------------------------------------------- the gloo transport
def _dist_replicas(rank, world, model, ps, frame):
    from dsv3.infer.replicas import DistTransport, replica_loop

    engine = Engine(copy.deepcopy(model), **KW)
    t = DistTransport(frame=frame)
    if rank:
        return replica_loop(engine, t)
    rep = ReplicatedEngine(engine, t)
    sink = Sink()
    for i, p in enumerate(ps):  # prompt logprobs: replies far larger than a small frame
        rep.add_request(p, SamplingParams(max_new_tokens=5, ignore_eos=True, logprobs=3, prompt_logprobs=2),
                        request_id=f"r{i}", on_output=sink(f"r{i}"))
    drain(rep)
    rep.shutdown()
    return {rid: ([t for o in outs for t in o.new_token_ids], [lp.logprob for o in outs for lp in o.new_logprobs],
                  next(o.prompt_logprobs for o in outs if o.prompt_logprobs is not None), rep.replica_stats())
            for rid, outs in sink.outs.items()}


@pytest.mark.parametrize("frame", [64 << 10, 256])
def test_gloo_transport_between_two_processes(model, frame):
    """DistTransport + replica_loop over gloo (forked processes); a 256-byte frame makes every command
    and reply spill past it (the second broadcast, the point-to-point rest)."""
    from dsv3.parallel.dist import run_local

    ps = prompts(4, 9)
    got, steps = run_local(_dist_replicas, 2, model, ps, frame)
    assert steps > 0  # replica 1 stepped its engine
    for i, p in enumerate(ps):
        sp = SamplingParams(max_new_tokens=5, ignore_eos=True, logprobs=3, prompt_logprobs=2)
        want = solo(model, p, sp)
        toks, lps, plp, per = got[f"r{i}"]
        assert toks == [t for o in want for t in o.new_token_ids]
        assert lps == pytest.approx([lp.logprob for o in want for lp in o.new_logprobs], abs=1e-5)
        assert [x and x.token_id for x in plp] == [x and x.token_id for x in want[0].prompt_logprobs]
    assert [a for a, _ in per] == [2, 2] and all(s.generation_tokens == 10 for _, s in per)


# ---------------------------------------------------------------------- the command line
def test_bad_flag_combinations_are_user_errors(tmp_path, capsys, monkeypatch):
    d = str(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for extra, text in ((["--dp", "2"], "launch it under torchrun with 2 processes"),
                        (["--dp", "2", "--tp", "2"], "--dp 2 together with --tp 2 is not supported yet"),
                        (["--dp", "2", "--pp", "2"], "--dp 2 together with --pp 2 is not supported yet"),
                        (["--dp", "0"], "--dp must be a positive integer")):
        assert main(["serve", "--model", d, *extra]) == 2
        assert text in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["serve", "--model", d, "--dp", "2"]) == 2
    assert "the world size is 3" in capsys.readouterr().err


# ---------------------------------------------------------------------- torchrun end to end
def _sse(lines):
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


def _metrics(url):
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k.replace('model_name="m",', "").replace(',model_name="m"', "").replace('{model_name="m"}', "")] = \
                float(v)
    return out


def _wait(cond, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_serve_dp2_under_torchrun(tmp_path):
    folder = build_model_dir(tmp_path / "tiny")
    port = free_port()
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "dsv3", "serve", "--model", str(folder), "--port", str(port),
           "--dp", "2", "--threads", "1", "--log-level", "info", "--served-model-name", "m",
           "--max-model-len", "1024", "--cache-memory-mb", "16"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    ref_model = dsv3.load_model(folder, dtype=torch.float32).eval()
    try:
        # the reference while the server starts: each prompt alone in one process
        ps = prompts(16, 11, 3, 40)
        news = [6 + i % 7 for i in range(16)]
        want = [[t for o in solo(ref_model, p, SamplingParams(max_new_tokens=n, ignore_eos=True))
                 for t in o.new_token_ids] for p, n in zip(ps, news)]

        def up():
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        _wait(up, "the server", 180)

        def body(p, n, **kw):
            return {"model": "m", "prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True,
                    "return_token_ids": True, **kw}

        # 16 concurrent streams
        async def one(client, p, n):
            toks, finish = [], None
            async with client.stream("POST", url + "/v1/completions", json=body(p, n)) as r:
                assert r.status_code == 200
                async for ch in _aiter_sse(r):
                    toks += ch["choices"][0].get("token_ids") or []
                    finish = ch["choices"][0]["finish_reason"] or finish
            return toks, finish

        async def burst():
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*(one(client, p, n) for p, n in zip(ps, news)))

        got = asyncio.run(burst())
        for (toks, finish), w in zip(got, want):
            assert toks == w and finish == "length"
        m = _metrics(url)
        a0, a1 = m['dsv3:dp_replica_requests_assigned_total{replica="0"}'], \
            m['dsv3:dp_replica_requests_assigned_total{replica="1"}']
        assert a0 > 0 and a1 > 0 and a0 + a1 == 16
        g0, g1 = m['dsv3:dp_replica_generation_tokens_total{replica="0"}'], \
            m['dsv3:dp_replica_generation_tokens_total{replica="1"}']
        assert g0 > 0 and g1 > 0 and g0 + g1 == m["dsv3:engine_generation_tokens_total"] == sum(news)
        assert m['dsv3:engine_requests_finished_total{finished_reason="length"}'] == 16
        assert m["dsv3:num_requests_running"] == 0

        # a stream that goes away frees its request on its replica (replica 1: A holds replica 0)
        with httpx.Client(timeout=120) as client:
            with client.stream("POST", url + "/v1/completions", json=body([5, 6, 7], 1000)) as ra:
                sa = _sse(ra.iter_lines())  # (kept: closing the line iterator would close the stream)
                next(sa)
                with client.stream("POST", url + "/v1/completions", json=body([8, 9, 10], 1000)) as rb:
                    sb = _sse(rb.iter_lines())
                    next(sb)
                    m = _metrics(url)
                    assert m['dsv3:dp_replica_requests_assigned_total{replica="1"}'] == a1 + 1
                    gen1 = m['dsv3:dp_replica_generation_tokens_total{replica="1"}']
                # B's connection is closed
                _wait(lambda: _metrics(url)['dsv3:dp_replica_num_requests_running{replica="1"}'] == 0,
                      "replica 1 to drop the cancelled request")
                m = _metrics(url)
                assert m['dsv3:dp_replica_kv_cache_usage_perc{replica="1"}'] == 0.0
                assert m['dsv3:engine_requests_finished_total{finished_reason="abort"}'] == 1
                assert m['dsv3:dp_replica_num_requests_running{replica="0"}'] == 1  # A runs on
                assert m['dsv3:dp_replica_generation_tokens_total{replica="1"}'] < gen1 + 900
        _wait(lambda: _metrics(url)["dsv3:num_requests_running"] == 0, "A to be cancelled too")

        # SIGTERM while a stream runs on each replica: both finish, then every rank exits. Two prompts
        # no replica has seen: the router places them by load alone (one each), whereas the prompts
        # above may both have left their prefix on one replica, depending on how the 16 streams arrived
        # (1000 tokens each: 150 could all be out before the metrics scrape on a loaded machine, as in one CI run)
        last = prompts(2, 99, 3, 40)
        with httpx.Client(timeout=120) as client:
            with client.stream("POST", url + "/v1/completions", json=body(last[0], 1000)) as rc, \
                    client.stream("POST", url + "/v1/completions", json=body(last[1], 1000)) as rd:
                streams = [_sse(rc.iter_lines()), _sse(rd.iter_lines())]
                firsts = [next(s) for s in streams]
                m = _metrics(url)
                assert [m[f'dsv3:dp_replica_num_requests_running{{replica="{r}"}}'] for r in (0, 1)] == [1, 1]
                proc.send_signal(signal.SIGTERM)
                for i, (s, first) in enumerate(zip(streams, firsts)):
                    chunks = [first, *s]
                    toks = [t for ch in chunks for t in ch["choices"][0].get("token_ids") or []]
                    ref = list(Engine(ref_model, **{**KW, "num_blocks": 128, "max_model_len": 1024}).generate(
                        [last[i]], SamplingParams(max_new_tokens=1000, ignore_eos=True))[0].token_ids)
                    assert toks == ref and chunks[-1]["choices"][0]["finish_reason"] == "length"
        proc.wait(60)
        text = log.read_text()
        assert "rank 1: data-parallel replica stopped" in text and "rank 0: data-parallel server stopped" in text, \
            text[-3000:]
    finally:
        kill_job(proc)  # whatever is left of the job (nothing, when it passed)


async def _aiter_sse(r):
    async for line in r.aiter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])
