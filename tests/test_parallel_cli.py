"""The commands under torchrun (issue 7): `dsv3 train --ep 2`, `dsv3 generate --tp 2` and
`dsv3 serve --tp 2` on 2 gloo processes give what one process gives; the flags that are not supported say so; `dsv3 train --fp8`;
`dsv3 eplb --loads RUN` on the loads a training run recorded."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import dsv3
from dsv3.cli import main
from dsv3.parallel.dist import free_port
from dsv3.parallel.eplb import load_run_loads

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "data" / "tinyshakespeare.txt"
STEPS, BATCH, SEQ = 3, 4, 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    p.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:40000], encoding="utf-8")
    return p


def train_args(corpus, out, cache, *extra):
    return ["train", "--data", str(corpus), "--out", str(out), "--cache-dir", str(cache), "--preset", "tiny",
            "--steps", str(STEPS), "--batch-size", str(BATCH), "--seq-len", str(SEQ), "--threads", "1",
            "--no-progress", "--samples", "0", "--eval-every", str(STEPS), "--save-every", str(STEPS),
            "--eval-batches", "2", *map(str, extra)]


def torchrun(nproc, args, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(3):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), "-m", "dsv3", *args, "--dist-backend", "gloo"]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
        # free_port() closes its probe socket before torchrun binds the port: another test's gloo
        # connections (ephemeral ports) can take it in between. Only that is retried.
        if r.returncode == 0 or "address already in use" not in (r.stdout + r.stderr).lower():
            break
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def kill_job(proc):
    """SIGKILL torchrun and its workers (each in a session of its own: a killed torchrun orphans them)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == proc.pid:  # the parent pid
            kids.append(int(stat.parent.name))
    for pid in (proc.pid, *kids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


@contextlib.contextmanager
def torchrun_server(model_dir, flags, nproc=2):
    """`torchrun --nproc-per-node N -m dsv3 serve --model DIR *flags` (gloo, 1 thread per rank, served
    as model "m") on a free port; yields its URL once /health answers, then SIGTERM (after 60 s SIGKILL to
    torchrun and its workers)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), "-m", "dsv3", "serve", "--model", str(model_dir),
           "--port", str(port), *flags, "--dist-backend", "gloo", "--threads", "1", "--log-level", "warning",
           "--served-model-name", "m"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            kill_job(proc)


def records(out, kind):
    return [r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    d = tmp_path_factory.mktemp("single")
    assert main(train_args(corpus, d / "run", d / "cache")) == 0
    return d / "run"


@pytest.fixture(scope="module")
def ep2(corpus, tmp_path_factory):
    d = tmp_path_factory.mktemp("ep2")
    torchrun(2, train_args(corpus, d / "run", d / "cache", "--ep", "2"))
    return d / "run"


def test_train_ep2_equals_one_process(single, ep2):
    # the same tokenizer (rank 0 trains it, the other rank reads it)
    assert (single / "latest" / "tokenizer.json").read_text() == (ep2 / "latest" / "tokenizer.json").read_text()
    a, b = records(single, "train"), records(ep2, "train")
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        for k in ("loss", "ce", "mtp_loss", "balance_loss", "grad_norm"):
            assert abs(ra[k] - rb[k]) <= 1e-5 * max(1.0, abs(ra[k])), (ra["step"], k, ra[k], rb[k])
        assert ra["maxvio_batch"] == rb["maxvio_batch"]  # globally reduced loads: the same counts
    ea, eb = records(single, "eval")[-1], records(ep2, "eval")[-1]
    assert abs(ea["val_loss"] - eb["val_loss"]) <= 1e-5
    # rank 0 wrote one full checkpoint (all experts gathered) equal to the single-process weights
    wa = dsv3.load_model(single / "latest", dtype=torch.float32).state_dict()
    wb = dsv3.load_model(ep2 / "latest", dtype=torch.float32).state_dict()
    assert wa.keys() == wb.keys()
    for k in wa:
        tol = 1e-5 * max(1.0, float(wa[k].abs().max()))
        assert float((wa[k] - wb[k]).abs().max()) <= tol, k
    assert not list((ep2 / "checkpoints").glob(".tmp-*"))


def test_train_records_loads_for_eplb(single, ep2, capsys):
    for run in (single, ep2):
        loads, src = load_run_loads(str(run))
        assert src == str(run / "loads.json")
        rec = json.loads((run / "loads.json").read_text())
        cfg = dsv3.ModelConfig.from_hf(run / "latest")
        assert rec["layers"] == records(run, "run")[0]["moe_layers"] and rec["steps"] == STEPS
        assert loads.shape == (len(rec["layers"]), cfg.n_routed_experts)
        # every token of every step is routed to exactly top-k experts in each MoE layer
        assert loads.sum(1).tolist() == [float(STEPS * BATCH * SEQ * cfg.num_experts_per_tok)] * len(rec["layers"])
        # the checkpoint's copy, the trainer state's tracker and the last eval record agree
        assert torch.equal(load_run_loads(str(run / "latest"))[0], loads)
        assert torch.equal(load_run_loads(str(run / "metrics.jsonl"))[0], loads)
        state = torch.load(run / "latest" / "trainer_state.pt", weights_only=False)
        assert torch.equal(state["tracker"]["total"].double(), loads)
    assert torch.equal(load_run_loads(str(single))[0], load_run_loads(str(ep2))[0])
    cfg = dsv3.ModelConfig.from_hf(single / "latest")
    E = cfg.n_routed_experts
    assert main(["eplb", "--loads", str(single), "--replicas", str(E + E // 4), "--groups", str(cfg.n_group),
                 "--nodes", "2", "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "hierarchical policy" in out and "after mean" in out


def test_parallel_checkpoint_cannot_resume(ep2, corpus, capsys):
    # the sharded optimizer state is not saved: a resume is refused, not silently reset
    state = torch.load(ep2 / "latest" / "trainer_state.pt", weights_only=False)
    assert state["optimizer"] is None and state["parallel"]["ep"] == 2
    assert main(train_args(corpus, ep2, ep2.parent / "cache", "--resume")) == 2
    assert "parallel run" in capsys.readouterr().err


# --pp outside torchrun is refused before any work (the pipeline runs themselves: test_pipeline_train.py)
@pytest.mark.parametrize("flag, text", [("--pp", "launch it under torchrun"), ("--tp", "inference only")])
def test_train_rejects_pp_outside_torchrun_and_tp(corpus, tmp_path, capsys, flag, text):
    assert main(train_args(corpus, tmp_path / "run", tmp_path / "cache", flag, "2")) == 2
    assert text in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_generate_tp2_equals_one_process(single, capsys):
    args = ["generate", "--model", str(single / "latest"), "--prompt-ids", "5,6,7,8", "--max-new-tokens", "12",
            "--threads", "1", "--ignore-eos"]
    assert main(args) == 0
    one = capsys.readouterr().out.split()
    assert len(one) == 12
    two = torchrun(2, [*args, "--tp", "2"]).split()
    assert two == one  # rank 0 prints, the other rank is silent


def test_serve_parallel_flags_are_checked(single, capsys):
    for args, text in ((["--tp", "2"], "--tp 2: launch it under torchrun with 2 processes"),
                       (["--pp", "2"], "pipeline-parallel serving is not supported in a single process"),
                       (["--dp", "2"], "data-parallel serving is not supported in one process")):
        assert main(["serve", "--model", str(single / "latest"), *args]) == 2
        assert text in capsys.readouterr().err


def test_serve_tp2_under_torchrun_answers_like_one_process(single):
    """`torchrun --nproc-per-node 2 -m dsv3 serve --tp 2`: rank 0 serves HTTP, rank 1 replays its
    forwards (dsv3.infer.lockstep); completions equal a single-process engine's tokens."""
    from dsv3.infer.engine import Engine
    from dsv3.infer.params import SamplingParams
    from dsv3.tokenizer import Tokenizer

    model_dir = single / "latest"
    prompts = [[5, 6, 7, 8], [40, 41, 42, 43, 44, 45, 46, 47, 48]]
    model = dsv3.load_model(model_dir, dtype=torch.float32).eval()
    want = [c.token_ids for c in Engine(model, eos_token_id=None).generate(
        prompts, SamplingParams(max_new_tokens=10, ignore_eos=True))]
    tok = Tokenizer.from_dir(model_dir)
    with torchrun_server(model_dir, ["--tp", "2"]) as url:
        for p, w in zip(prompts, want):
            body = json.dumps({"model": "m", "prompt": p, "max_tokens": 10, "temperature": 0,
                               "ignore_eos": True}).encode()
            req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                got = json.loads(r.read())["choices"][0]["text"]
            assert got == tok.decode(w)


def test_train_fp8(single, corpus, tmp_path):
    pytest.importorskip("dsv3.fp8.training")
    assert main(train_args(corpus, tmp_path / "run", tmp_path / "cache", "--fp8")) == 0
    a, b = records(single, "train"), records(tmp_path / "run", "train")
    assert len(b) == STEPS
    for ra, rb in zip(a, b):
        assert rb["loss"] == rb["loss"] and abs(rb["loss"]) < float("inf")
        # E4M3 tiles with fp32 accumulation: the loss moves by well under 1% (measured ~1e-3 relative)
        assert abs(ra["loss"] - rb["loss"]) <= 1e-2 * abs(ra["loss"]), (ra["loss"], rb["loss"])
    # not bit-equal: the GEMMs really ran in FP8
    assert a[0]["loss"] != b[0]["loss"]
    assert json.loads((tmp_path / "run" / "train_args.json").read_text())["fp8"] is True
    # the checkpoint is a plain one (same names as without --fp8)
    plain = dsv3.load_model(single / "latest", dtype=torch.float32).state_dict()
    assert dsv3.load_model(tmp_path / "run" / "latest", dtype=torch.float32).state_dict().keys() == plain.keys()
