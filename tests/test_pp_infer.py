"""Pipeline-parallel inference (dsv3.parallel.pp_infer, issue 7) and MTP speculation under --tp/--ep/--pp.

- 2 and 4 gloo processes on a transformers DeepseekV3 checkpoint (4 layers): the PP forward's logits
  equal the single-process model's within 1e-5 and transformers' within 1e-4; the engine's greedy
  tokens through the pipeline (continuous batching, chunked prefill, paged cache per stage) equal
  the single-process engine's and transformers' generate; each rank reads only its stage's tensors
  (the ranks' bytes add up to the checkpoint exactly once).
- `dsv3 generate --speculative mtp` with --tp 2, --ep 2 and --pp 2 (the CLI's torchrun path, in
  forked processes with torchrun's environment) prints the plain single-process greedy tokens, and
  the drafts were both accepted and rejected; `--pp 3` without speculation as well.
- `torchrun ... dsv3 serve --pp 2`: concurrent HTTP completions equal the solo greedy outputs.
- The refused combinations say what is wrong before any process group is made.
"""
import contextlib
import io
import json
import os
import re
import signal
import threading
import urllib.request

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open

import dsv3
from dsv3.cli import main
from dsv3.config import preset
from dsv3.infer.engine import Engine
from dsv3.infer.lockstep import LockstepModel, attach, command_group, worker_loop
from dsv3.infer.params import SamplingParams
from dsv3.parallel.dist import run_local
from dsv3.parallel.pp_infer import load_stage, stage_ranges
from dsv3.tokenizer import Tokenizer, train_bpe
from hf_ref import make_v3
from test_engine import greedy, rand_prompts
from test_parallel_cli import ROOT, torchrun_server
from test_speculative import aligned_model

WATCHDOG_S = 150  # a rank stuck in a send/recv is killed: the test fails instead of hanging
PROMPTS = rand_prompts((6, 21, 1, 13, 30), seed=12, vocab=97)
NEW = 10


def engine_kw(**kw):
    # 16 tokens per step: the 21- and 30-token prompts are prefilled in chunks next to decodes
    return dict(block_size=4, max_num_batched_tokens=16, max_num_seqs=3, eos_token_id=None, **kw)


def _watchdog():
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(WATCHDOG_S)


# ---------------------------------------------------------------------------- PP against one process

@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pp_hf"))
    ref = make_v3(path, seed=21, num_hidden_layers=4)
    tokens = torch.tensor([rand_prompts((24,), seed=13, vocab=97)[0]])
    with torch.no_grad():
        hf_logits = ref(tokens).logits.float()
        hf_tokens = [ref.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                                  pad_token_id=0, min_new_tokens=NEW)[0, len(p):].tolist() for p in PROMPTS]
        model = dsv3.load_model(path, dtype=torch.float32).eval()
        logits = model(tokens)
    solo = [c.token_ids for c in Engine(model, **engine_kw()).generate(PROMPTS, greedy(NEW))]
    total = 0
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), framework="pt") as h:
                for k in h.keys():
                    t = h.get_tensor(k)
                    total += t.numel() * t.element_size()
    return dict(path=path, tokens=tokens, hf_logits=hf_logits, hf_tokens=hf_tokens, logits=logits, solo=solo,
                total_bytes=total)


def pp_rank(rank, world, path, tokens):
    """Rank 0 drives a LockstepModel over its stage (as `dsv3 generate/serve --pp` do); the others follow."""
    _watchdog()
    stage = load_stage(path, None, torch.float32)
    cmd = command_group()
    info = dict(layers=list(stage.layer_ids), bytes=stage.bytes_read)
    if rank != 0:
        return dict(info, forwards=worker_loop(stage, dist.group.WORLD, cmd))
    proxy = LockstepModel(stage, dist.group.WORLD, cmd)
    try:
        with torch.no_grad():
            logits = proxy.logits(proxy.hidden(tokens))  # the plain forward, no cache
        engine = Engine(proxy, **engine_kw())
        attach(engine)
        got = [c.token_ids for c in engine.generate(PROMPTS, greedy(NEW))]
        return dict(info, logits=logits, tokens=got, sync=proxy.check_sync(), cache_layers=engine.cache.layer_ids,
                    cache_shape=tuple(engine.cache.kv.shape))
    finally:
        proxy.shutdown()


@pytest.mark.parametrize("world", [2, 4])
def test_pp_equals_one_process_and_transformers(hf_ckpt, world):
    res = run_local(pp_rank, world, hf_ckpt["path"], hf_ckpt["tokens"])
    r0 = res[0]
    # logits of the pipelined forward: the single-process model's (fp32), and transformers' within 1e-4
    assert float((r0["logits"] - hf_ckpt["logits"]).abs().max()) <= 1e-5
    assert float((r0["logits"] - hf_ckpt["hf_logits"]).abs().max()) <= 1e-4
    # greedy tokens: the pipeline engine = the single-process engine = transformers' generate
    assert r0["tokens"] == hf_ckpt["solo"] == hf_ckpt["hf_tokens"]
    assert all(len(t) == NEW for t in r0["tokens"])
    # the stages cover the 4 layers once, in order; every worker ran rank 0's forwards
    assert sum((r["layers"] for r in res), []) == list(range(4))
    assert [r["layers"] for r in res] == [list(x) for x in stage_ranges(4, world)]
    assert r0["sync"] == [r0["sync"][0]] * world and r0["sync"][0] > NEW
    assert all(r["forwards"] == r0["sync"][0] for r in res[1:])
    # rank 0's cache holds only its own layers' latents (same block pool geometry)
    assert r0["cache_layers"] == tuple(r0["layers"]) and r0["cache_shape"][0] == len(r0["layers"])
    # each rank read only its stage: together they read every checkpoint tensor exactly once
    assert sum(r["bytes"] for r in res) == hf_ckpt["total_bytes"]
    assert all(r["bytes"] < hf_ckpt["total_bytes"] for r in res)


# ---------------------------------------------------------------------------- generate --speculative mtp

@pytest.fixture(scope="module")
def mtp_ckpt(tmp_path_factory):
    # MTP weights that agree with the model part of the time: drafts get both accepted and rejected
    path = str(tmp_path_factory.mktemp("pp_mtp") / "ckpt")
    dsv3.save_model(aligned_model(), path)
    return path


GEN_PROMPT = ",".join(map(str, rand_prompts((9,), seed=14)[0]))


def gen_args(path, *extra):
    return ["generate", "--model", path, "--prompt-ids", GEN_PROMPT, "--max-new-tokens", "24", "--ignore-eos",
            "--threads", "1", "--dtype", "float32", *extra]


def cli_rank(rank, world, argv):
    """`dsv3 <argv>` on one rank with torchrun's environment (set by run_local)."""
    _watchdog()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def plain_greedy(mtp_ckpt):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(gen_args(mtp_ckpt)) == 0
    toks = out.getvalue().split()
    assert len(toks) == 24
    return toks


@pytest.mark.parametrize("flags", [("--tp", "2", "--speculative", "mtp"), ("--ep", "2", "--speculative", "mtp"),
                                   ("--pp", "2", "--speculative", "mtp"), ("--pp", "3")])
def test_generate_parallel_equals_plain_greedy(mtp_ckpt, plain_greedy, flags):
    world = int(flags[1])
    res = run_local(cli_rank, world, gen_args(mtp_ckpt, "--stats", "--dist-backend", "gloo", *flags), init=False)
    assert [rc for rc, _, _ in res] == [0] * world, res[0][2][-2000:]
    assert res[0][1].split() == plain_greedy  # rank 0 prints; speculation never changes greedy output
    assert all(out == "" for _, out, _ in res[1:])
    if "--speculative" in flags:
        m = re.search(r"MTP acceptance ([\d.]+)%", res[0][2])
        assert m is not None, res[0][2]
        assert 0 < float(m.group(1)) < 100  # both the accept and the reject path ran


# ---------------------------------------------------------------------------- serve --pp 2 under torchrun

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("pp_serve")
    text = (ROOT / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:20000]
    tok = train_bpe([text[i:i + 1000] for i in range(0, len(text), 1000)], 300)
    torch.manual_seed(5)
    m = dsv3.Transformer(preset("tiny").replace(vocab_size=tok.vocab_size)).init_weights(std=0.1).eval()
    dsv3.save_model(m, d)
    tok.save(d)
    return d, m


def test_serve_pp2_under_torchrun_answers_like_one_process(served):
    """`torchrun --nproc-per-node 2 -m dsv3 serve --pp 2`: rank 0 serves HTTP and holds stage 0 (embedding,
    layers 0-1, head); rank 1 holds layer 2. Concurrent completions equal each prompt's solo greedy run."""
    model_dir, model = served
    prompts = [[5, 6, 7, 8], [40, 41, 42, 43, 44, 45, 46, 47, 48], [100, 7], list(range(60, 85))]
    solo = Engine(model, eos_token_id=None)
    want = [solo.generate([p], SamplingParams(max_new_tokens=8, ignore_eos=True))[0].token_ids for p in prompts]
    tok = Tokenizer.from_dir(model_dir)
    with torchrun_server(model_dir, ["--pp", "2", "--block-size", "4"]) as url:
        got: dict[int, str] = {}

        def ask(i):
            body = json.dumps({"model": "m", "prompt": prompts[i], "max_tokens": 8, "temperature": 0,
                               "ignore_eos": True}).encode()
            req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                got[i] = json.loads(r.read())["choices"][0]["text"]
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
        assert got == {i: tok.decode(w) for i, w in enumerate(want)}


# ---------------------------------------------------------------------------- refused combinations

@pytest.mark.parametrize("command, argv, world, text", [
    ("generate", ["--pp", "2"], None,
     "--pp 2: pipeline-parallel inference is not supported in a single process; launch it under torchrun with 2"),
    ("generate", ["--pp", "2", "--tp", "2"], "4", "--pp with --tp is not supported by dsv3 generate"),
    ("generate", ["--pp", "2", "--ep", "2"], "4", "--pp with --ep is not supported by dsv3 generate"),
    ("generate", ["--pp", "4"], "4", "the model has 3 decoder layers, fewer than the 4 pipeline stages"),
    ("generate", ["--pp", "2"], "3", "--pp 2: launch it under torchrun with 2 processes .* got a world size of 3"),
    ("generate", ["--dp", "2"], "2", "--dp: dsv3 generate serves one prompt"),
    ("generate", [], "2", "dsv3 generate under torchrun \\(2 processes\\) needs --tp 2, --ep 2, --pp 2 or --dp 2"),
    ("serve", ["--pp", "2", "--tp", "2"], "4", "--pp with --tp is not supported by dsv3 serve"),
    ("serve", ["--pp", "2"], None, "--pp 2: pipeline-parallel serving is not supported in a single process"),
])
def test_refused_combinations(mtp_ckpt, monkeypatch, capsys, command, argv, world, text):
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    base = gen_args(mtp_ckpt) if command == "generate" else ["serve", "--model", mtp_ckpt]
    assert main([*base, *argv]) == 2
    assert re.search(text, capsys.readouterr().err)
    assert not dist.is_initialized()  # refused before any process group


def test_speculative_needs_an_mtp_layer_before_any_process_group(tmp_path, monkeypatch, capsys):
    dsv3.save_model(dsv3.Transformer(preset("tiny").replace(num_nextn_predict_layers=0)).init_weights(), tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(gen_args(str(tmp_path), "--pp", "2", "--speculative", "mtp")) == 2
    assert "has no MTP layer" in capsys.readouterr().err
    assert not dist.is_initialized()
