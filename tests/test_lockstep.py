"""Serving a tensor-, expert- or pipeline-parallel model from one engine on rank 0 (dsv3.infer.lockstep,
issue 7): the other ranks replay rank 0's forwards. On 2 gloo processes (TP = 2 and PP = 2 through
serve_parallel, the `dsv3 serve` entry point; EP = 2 through attach/worker_loop directly), with requests joining at
different steps, chunked prefill, greedy / seeded sampling / logprobs, MTP speculation, a
cancellation and a stop decided on rank 0 only, the tokens equal a single-process Engine on the same
checkpoint, every rank ran the same number of forwards, and the workers exit on shutdown (also when
rank 0's serving code raises). EP runs twice: with the workers' dummy forwards (the default) and with
full replay and no payload inlined in the command header (every tensor broadcast on its own)."""
import argparse
import signal

import pytest
import torch
import torch.distributed as dist

import dsv3
from dsv3.infer import lockstep
from dsv3.infer.engine import Engine
from dsv3.infer.lockstep import (LockstepModel, attach, check_serve_args, command_group, serve_parallel,
                                 worker_loop)
from dsv3.infer.params import SamplingParams
from dsv3.parallel.dist import run_local
from dsv3.parallel.tensor import load_parallel_model
from test_engine import greedy, rand_prompts
from test_speculative import aligned_model

PROMPTS = rand_prompts((5, 23, 11, 37, 2, 9), seed=4)
SPEC_PROMPTS = rand_prompts((5, 17, 1, 33), seed=5)
LATE_PROMPTS = rand_prompts((7, 19), seed=6)
MODES = ["tp2", "ep2", "ep2_replay", "pp2"]
WATCHDOG_S = 150  # a rank that hangs in a collective is killed (the test then fails instead of hanging)


def engine_kw(**kw):
    # budget 16 tokens per step: the 23- and 37-token prompts are prefilled in chunks
    return dict(block_size=4, max_num_batched_tokens=16, max_num_seqs=4, eos_token_id=None, **kw)


def collect(outs, ids, got):
    for o in outs:
        r = got.setdefault(ids[o.request_id], {"tokens": [], "lp": [], "plp": None, "finish": None})
        r["tokens"] += o.new_token_ids
        if o.new_logprobs:
            r["lp"] += [(lp.token_id, lp.logprob, lp.top) for lp in o.new_logprobs]
        if o.prompt_logprobs is not None:
            r["plp"] = [None if lp is None else lp.logprob for lp in o.prompt_logprobs]
        if o.finished:
            r["finish"] = (o.finish_reason, o.stop_reason)


def drive_batching(engine):
    """Six requests arriving before steps 0, 2, 3 and 5 (4 run at once, the rest queue)."""
    params = [greedy(12), SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=7),
              greedy(8, logprobs=2), SamplingParams(max_new_tokens=12, temperature=1.2, top_k=20, seed=11),
              greedy(6, prompt_logprobs=1), greedy(9, repetition_penalty=1.3)]
    arrivals = {0: [0, 1], 2: [2], 3: [3], 5: [4, 5]}
    ids, got, step = {}, {}, 0
    while step <= max(arrivals) or engine.has_unfinished():
        for i in arrivals.get(step, []):
            ids[engine.add_request(PROMPTS[i], params[i])] = i
        collect(engine.step(), ids, got)
        step += 1
    return got


def drive_spec(engine):
    params = [greedy(16), greedy(16), SamplingParams(max_new_tokens=16, temperature=0.8, seed=3), greedy(16)]
    ids, got = {}, {}
    for i, (p, sp) in enumerate(zip(SPEC_PROMPTS, params)):
        ids[engine.add_request(p, sp)] = i
    while engine.has_unfinished():
        collect(engine.step(), ids, got)
    return got


def drive_cancel_and_stop(engine):
    """Request 0 is cancelled after 3 steps, 2 after 5; request 1 stops when rank 0's stop checker says so
    (what a text stop string does: a decision on rank 0 the other ranks never see); then two new
    requests run on the same engine and workers."""
    stop_after_4 = lambda r: "</s>" if len(r.output_token_ids) == 4 else None  # noqa: E731
    ids, got = {}, {}
    a = engine.add_request(PROMPTS[1], greedy(30))
    ids[a] = 0
    ids[engine.add_request(PROMPTS[2], greedy(30), stop_checker=stop_after_4)] = 1
    c = engine.add_request(PROMPTS[3], SamplingParams(max_new_tokens=30, temperature=1.0, seed=5))
    ids[c] = 2
    step = 0
    while engine.has_unfinished():
        if step == 3:
            engine.abort(a)
        if step == 5:
            engine.abort(c)
        collect(engine.step(), ids, got)
        step += 1
    ids[engine.add_request(LATE_PROMPTS[0], greedy(10))] = 3
    ids[engine.add_request(LATE_PROMPTS[1], SamplingParams(max_new_tokens=10, temperature=0.7, seed=9))] = 4
    while engine.has_unfinished():
        collect(engine.step(), ids, got)
    return got


def scenarios(model_or_engines):
    """The three scenarios on rank 0 (or in one process): each on a fresh engine."""
    make = model_or_engines
    return {"batching": drive_batching(make()), "spec": drive_spec(make(speculative="mtp")),
            "cancel": drive_cancel_and_stop(make())}


# ---------------------------------------------------------------------------- the parallel runs

def _watchdog():
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(WATCHDOG_S)


def tp_rank(rank, world, path, fail=None, note=None, axis="tp"):
    """TP = 2 (axis="pp": PP = 2) through serve_parallel, as `dsv3 serve --tp 2` (`--pp 2`) under
    torchrun would run it. fail="serve": rank 0's serving code raises; fail="op": rank 0's model raises
    inside a forward whose command the worker already got (messages written to `note`)."""
    _watchdog()
    sizes = {"tp": 1, "pp": 1, axis: 2}
    args = argparse.Namespace(model=path, ep=1, dp=None, dtype="float32", threads=1, dist_backend="gloo",
                              fp8_dispatch=False, **sizes)

    def serve(proxy):
        assert isinstance(proxy, LockstepModel)
        engines = []

        def make(**kw):
            e = Engine(proxy, **engine_kw(**kw))
            attach(e)
            engines.append(e)
            return e
        if fail == "serve":
            e = make()
            e.add_request(PROMPTS[0], greedy(20))
            e.step()
            e.step()
            raise RuntimeError("boom on rank 0")
        if fail == "op":
            e = make()
            e.add_request(PROMPTS[0], greedy(20))
            e.step()

            def broken(*a, **k):
                raise RuntimeError("injected failure")
            proxy.module.hidden = broken  # rank 0 only: its worker enters the forward's collectives
            msgs = []
            for _ in range(2):
                try:
                    e.step()
                except RuntimeError as err:
                    msgs.append(str(err))
            with open(note, "w") as f:
                f.write("\n".join(msgs))
            return 0
        out = scenarios(make)
        out["sync"] = proxy.check_sync()
        out["spec_stats"] = engines[1].stats().spec
        out["proxy_cache_is_engine_cache"] = proxy._cache is engines[-1].cache
        # the layers this rank's cache holds (a pipeline stage: its own, and the MTP layer when speculating)
        out["cache_layers"] = [getattr(e.cache, "layer_ids", None) for e in engines]
        return out

    return serve_parallel(args, serve)


def ep_rank(rank, world, path, replay, inline=None):
    """EP = 2 through the pieces: load_parallel_model, command_group, attach (wrapping a plain engine),
    worker_loop. replay None: the workers' dummy forwards (the default under EP); True: full replay.
    inline=0: no payload rides in the header (every tensor is broadcast on its own)."""
    _watchdog()
    if inline is not None:
        lockstep.INLINE = inline
    model = load_parallel_model(path, ep_group=dist.group.WORLD, dtype=torch.float32)
    cmd = command_group()
    if rank != 0:
        return worker_loop(model, dist.group.WORLD, cmd)
    proxy = None

    def make(**kw):
        nonlocal proxy
        if proxy is None:  # the first engine is built on the plain model and wrapped by attach
            e = Engine(model, **engine_kw(**kw))
            proxy = attach(e, dist.group.WORLD, cmd, replay=replay)
            assert e.model is proxy and proxy.module is model and proxy.replay is bool(replay)
        else:
            e = Engine(proxy, **engine_kw(**kw))
            attach(e)
        return e
    try:
        out = scenarios(make)
        out["sync"] = proxy.check_sync()
        out["commands"] = proxy.commands
    finally:
        proxy.shutdown()
    return out


# ---------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # MTP weights that agree with the model part of the time: drafts get both accepted and rejected
    path = str(tmp_path_factory.mktemp("lockstep") / "ckpt")
    dsv3.save_model(aligned_model(), path)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint):
    torch.manual_seed(0)
    model = dsv3.load_model(checkpoint, dtype=torch.float32).eval()
    ref = scenarios(lambda **kw: Engine(model, **engine_kw(**kw)))
    plain = drive_spec(Engine(model, **engine_kw()))  # speculation off: plain greedy / plain sampling
    return ref, plain


@pytest.fixture(scope="module")
def tp2(checkpoint):
    return run_local(tp_rank, 2, checkpoint, init=False)


@pytest.fixture(scope="module")
def pp2(checkpoint):
    return run_local(tp_rank, 2, checkpoint, None, None, "pp", init=False)


@pytest.fixture(scope="module")
def ep2(checkpoint):
    return run_local(ep_rank, 2, checkpoint, None)


@pytest.fixture(scope="module")
def ep2_replay(checkpoint):
    return run_local(ep_rank, 2, checkpoint, True, 0)


def assert_same(got, want):
    assert got.keys() == want.keys()
    for k in want:
        g, w = got[k], want[k]
        assert g["tokens"] == w["tokens"], k
        assert g["finish"] == w["finish"], k
        assert [t for t, _, _ in g["lp"]] == [t for t, _, _ in w["lp"]]
        for (_, a, ta), (_, b, tb) in zip(g["lp"], w["lp"]):
            assert abs(a - b) <= 1e-4 and [t for t, _ in ta] == [t for t, _ in tb]
        if w["plp"] is not None:
            assert g["plp"][0] is None and w["plp"][0] is None
            assert max(abs(a - b) for a, b in zip(g["plp"][1:], w["plp"][1:])) <= 1e-4


# ---------------------------------------------------------------------------- tests

@pytest.mark.parametrize("mode", MODES)
def test_continuous_batching_equals_one_process(mode, request, reference):
    res = request.getfixturevalue(mode)
    got, want = res[0]["batching"], reference[0]["batching"]
    assert_same(got, want)
    # the scenario really exercised what it claims: 6 requests, a sampled one, logprobs, prompt logprobs
    assert len(got) == 6 and len(got[2]["lp"]) == 8 and len(got[4]["plp"]) == len(PROMPTS[4])


@pytest.mark.parametrize("mode", MODES)
def test_mtp_speculation_equals_plain_decoding(mode, request, reference):
    res = request.getfixturevalue(mode)
    got = res[0]["spec"]
    ref_spec, plain = reference
    assert_same(got, ref_spec["spec"])  # the same as one process with speculation
    for i in (0, 1, 3):  # greedy rows: exactly plain greedy decoding (V3 §2.2: MTP only proposes)
        assert got[i]["tokens"] == plain[i]["tokens"] and len(got[i]["tokens"]) == 16
    if mode in ("tp2", "pp2"):
        st = res[0]["spec_stats"]
        assert st.drafted > 0 and 0 < st.accepted < st.drafted  # both verify paths ran


@pytest.mark.parametrize("mode", MODES)
def test_cancel_and_rank0_stop_keep_workers_in_step(mode, request, reference):
    res = request.getfixturevalue(mode)
    got, want = res[0]["cancel"], reference[0]["cancel"]
    assert_same(got, want)
    assert got[0]["finish"] == ("abort", None) and got[2]["finish"] == ("abort", None)
    assert 0 < len(got[0]["tokens"]) < 30 and 0 < len(got[2]["tokens"]) < 30
    assert got[1]["finish"] == ("stop", "</s>") and len(got[1]["tokens"]) == 4
    assert len(got[3]["tokens"]) == 10 and len(got[4]["tokens"]) == 10
    # every rank ran the same number of forwards
    n0, n1 = res[0]["sync"]
    assert n0 == n1 > 50


def test_workers_exit_cleanly(tp2, ep2, ep2_replay, pp2):
    for par in (tp2, pp2):
        assert par[1] == 0  # serve_parallel's return on the worker: it left worker_loop on the stop command
        assert par[0]["proxy_cache_is_engine_cache"]
    for ep in (ep2, ep2_replay):
        assert ep[1] == ep[0]["commands"] == ep[0]["sync"][1]  # worker_loop's count = rank 0's
    # EP: the head is whole, so logits never go through the workers: fewer commands than TP
    assert ep2[0]["commands"] < tp2[0]["sync"][0]
    # PP: head and MTP live on rank 0, so only main-model forwards are commands: fewer than TP's
    assert pp2[0]["sync"][0] < tp2[0]["sync"][0]
    # rank 0's stage caches only its layers (3 layers split 2 | 1), plus the MTP layer (index 3) when
    # the engine speculates (the second engine); TP keeps the engine's full cache
    assert pp2[0]["cache_layers"] == [(0, 1), (0, 1, 3), (0, 1)]
    assert tp2[0]["cache_layers"] == [None, None, None]


def _catching(rank, world, path):
    try:
        return tp_rank(rank, world, path, "serve")
    except RuntimeError as e:
        return str(e)


def test_rank0_failure_stops_the_workers(checkpoint):
    # rank 0's serving code raises mid-way: the stop command is still sent (serve_parallel's finally), so
    # the worker leaves worker_loop normally (returns 0) instead of failing on a closed connection
    assert run_local(_catching, 2, checkpoint, init=False) == ["boom on rank 0", 0]


def test_failed_op_refuses_later_calls_and_ends_the_job(checkpoint, tmp_path):
    # a forward that fails on rank 0 after its command went out: the worker is left inside a collective;
    # the proxy refuses every later call rather than misalign collectives, and the job ends (the worker
    # fails when rank 0's process exits) instead of hanging
    note = tmp_path / "rank0.txt"
    with pytest.raises(Exception, match="(?i)connection closed"):
        run_local(tp_rank, 2, checkpoint, "op", str(note), init=False)
    msgs = note.read_text().splitlines()
    assert msgs[0] == "injected failure"
    assert "out of lockstep after a failed hidden" in msgs[1]


@pytest.mark.parametrize("kw, env, text", [
    (dict(pp=2), None, "--pp 2: pipeline-parallel serving is not supported in a single process; launch it under "
                       "torchrun with 2 processes"),
    (dict(pp=2), "4", "--pp 2: launch it under torchrun with 2 processes .* got a world size of 4"),
    (dict(pp=2, tp=2), "4", "--pp with --tp is not supported by dsv3 serve"),
    (dict(pp=2, ep=2), "4", "--pp with --ep is not supported by dsv3 serve"),
    (dict(pp=0), None, "--pp must be a positive integer"),
    (dict(dp=2), None, "--dp 2: data-parallel serving"),  # replicas, not one lockstep engine (dsv3.infer.replicas)
    (dict(tp=2, ep=2), None, "--tp and --ep together"),
    (dict(tp=2), None, "launch it under torchrun with 2 processes"),
    (dict(ep=2), "4", "got a world size of 4"),
    (dict(), "2", "needs --tp 2, --ep 2, --pp 2 or --dp 2"),
])
def test_serve_flags_refused(kw, env, text, monkeypatch, tmp_path):
    if env is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", env)
    args = argparse.Namespace(**{"model": str(tmp_path), "tp": 1, "ep": 1, "dp": None, "pp": 1, **kw})
    with pytest.raises(ValueError, match=text):
        serve_parallel(args, lambda m: 0)
    assert not dist.is_initialized()


def test_single_process_is_not_parallel(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert check_serve_args(argparse.Namespace(tp=1, ep=1, dp=1, pp=1)) is False
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert check_serve_args(argparse.Namespace(tp=2, ep=1, dp=None, pp=1)) is True
    assert check_serve_args(argparse.Namespace(tp=1, ep=1, dp=None, pp=2)) is True
