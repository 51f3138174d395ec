"""`dsv3 train` / `dsv3 plot` end to end on a slice of the bundled corpus: checkpoints that
transformers and dsv3 load (weights, MTP layer, tokenizer with the DeepSeek chat template), bitwise
exact resume, a save killed midway, and clear errors before any work."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dsv3
from dsv3.cli import main
from dsv3.tokenizer import ASSISTANT, BOS, USER, Tokenizer
from dsv3.train import checkpointing as ck

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    p = d / "shakespeare.txt"
    p.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:40000], encoding="utf-8")
    return p


def base_args(corpus, out, cache, *extra):
    return ["train", "--data", str(corpus), "--out", str(out), "--cache-dir", str(cache), "--preset", "tiny",
            "--steps", "6", "--batch-size", "4", "--seq-len", "32", "--threads", "1", "--no-progress",
            "--samples", "0", *map(str, extra)]


def records(out, kind):
    return [r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    # One short run shared by the checks below.
    d = tmp_path_factory.mktemp("run")
    out = d / "run"
    rc = main(base_args(corpus, out, d / "cache", "--eval-every", "3", "--save-every", "3", "--samples", "1",
                        "--sample-tokens", "8", "--prompt", "ROMEO:"))
    assert rc == 0
    return out


def test_metrics_per_step_and_validation(trained):
    train = records(trained, "train")
    assert [r["step"] for r in train] == list(range(1, 7))
    layers = {"layers.1", "layers.2", "mtp.0"}  # tiny: layer 0 dense, 1-2 MoE, one MTP module (MoE block)
    for r in train:
        for key in ("loss", "ce", "mtp_loss", "balance_loss", "lr", "tokens_per_s", "grad_norm"):
            assert math.isfinite(r[key]), key
        assert r["loss"] == pytest.approx(r["ce"] + r["mtp_lambda"] * r["mtp_loss"] + r["balance_loss"], rel=1e-6)
        assert set(r["maxvio_batch"]) == set(r["maxvio_cum"]) == layers
        assert r["balance_loss"] > 0  # aux-free: the sequence-wise loss is on
    evals = records(trained, "eval")
    assert [r["step"] for r in evals] == [3, 6]
    header = records(trained, "run")[0]
    for r in evals:
        # bits per byte = nats per token / ln 2 / bytes per token (the scored tokens' own bytes,
        # close to the split's average)
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2) / header["bytes_per_token"], rel=0.05)
        assert set(r["val_maxvio_global"]) == layers


def test_checkpoint_loads_in_dsv3_and_transformers(trained):
    from transformers import AutoTokenizer, DeepseekV3ForCausalLM

    latest = trained / "latest"
    assert latest.is_symlink() and latest.resolve().name == "step-00000006"
    assert [s for s, _ in ck.list_checkpoints(trained)] == [3, 6]  # keep 2
    ours = dsv3.load_model(latest, dtype=torch.float32)
    assert len(ours.mtp) == 1
    theirs = DeepseekV3ForCausalLM.from_pretrained(latest, dtype=torch.float32).eval()
    x = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).logits, rtol=0, atol=1e-4)
    # The aux-free bias moved and was saved under the released name.
    from safetensors import safe_open

    with safe_open(latest / "model.safetensors", "pt") as f:
        names = set(f.keys())
        bias = f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias")
    assert torch.count_nonzero(bias) > 0
    assert "model.layers.3.eh_proj.weight" in names  # the MTP module, at num_hidden_layers + 0
    # The tokenizer travels with the model: transformers' AutoTokenizer agrees with ours and renders
    # DeepSeek-V3's chat format.
    tok = Tokenizer.from_dir(latest)
    hf_tok = AutoTokenizer.from_pretrained(latest)
    text = "ROMEO:\nWhat light through yonder window breaks?"
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == f"{BOS}{USER}Hi{ASSISTANT}"
    gen = json.loads((latest / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_id == ours.config.eos_token_id


def test_plot_draws_pngs(trained):
    assert main(["plot", str(trained)]) == 0
    for name in ("loss.png", "expert_load.png"):
        p = trained / "plots" / name
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_samples_are_printed(corpus, tmp_path, capsys):
    rc = main(base_args(corpus, tmp_path / "r", tmp_path / "cache", "--steps", "2", "--samples", "1",
                        "--sample-tokens", "6", "--prompt", "ROMEO:"))
    assert rc == 0
    out = capsys.readouterr().out
    assert "--- sample 1 ---\nROMEO:" in out
    assert "bits/byte" in out


def test_resume_is_bitwise_exact(corpus, tmp_path):
    # Ramp, micro-batches, MTP, aux-free bias and a schedule switch inside the run.
    common = ["--steps", "8", "--batch-size-start", "2", "--micro-batch-size", "2", "--eval-every", "2",
              "--mtp-depth", "2", "--deterministic", "--gamma", "0.01"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(base_args(corpus, a, tmp_path / "cache", *common)) == 0
    assert main(base_args(corpus, b, tmp_path / "cache", *common, "--stop-after", "3")) == 0
    assert ck.latest_checkpoint(b).name == "step-00000003"
    assert [r["step"] for r in records(b, "train")] == [1, 2, 3]
    assert main(["train", "--out", str(b), "--resume", "--threads", "1", "--no-progress", "--samples", "0"]) == 0

    keys = ("loss", "ce", "mtp_loss", "balance_loss", "lr", "grad_norm", "batch_size", "maxvio_batch", "maxvio_cum")
    ra, rb = records(a, "train"), records(b, "train")
    assert [r["step"] for r in rb] == list(range(1, 9))
    assert [[r[k] for k in keys] for r in ra] == [[r[k] for k in keys] for r in rb]
    assert [r["val_loss"] for r in records(a, "eval")] == [r["val_loss"] for r in records(b, "eval")]
    from safetensors.torch import load_file

    wa, wb = load_file(a / "latest" / "model.safetensors"), load_file(b / "latest" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, _ = ck.load_trainer_state(a / "latest")
    sb, _ = ck.load_trainer_state(b / "latest")
    for x, y in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert all(torch.equal(x[k], y[k]) for k in ("exp_avg", "exp_avg_sq"))


def test_killed_save_leaves_the_previous_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "dsv3", *base_args(corpus, out, tmp_path / "cache", "--save-every", "2")]
    # The test hook pauses the save of step 4 after the weights are written, before the trainer state.
    env = {**os.environ, ck.PAUSE_ENV: "4:120", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        tmp = None
        while time.time() < deadline and proc.poll() is None:
            found = list((out / "checkpoints").glob(".tmp-step-00000004-*/model.safetensors"))
            if found:
                tmp = found[0].parent
                break
            time.sleep(0.2)
        assert tmp is not None, "the save of step 4 never started"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert tmp.exists() and not (tmp / ck.STATE_FILE).exists()  # killed mid-save
    assert (out / "latest").resolve().name == "step-00000002"
    assert ck.latest_checkpoint(out).name == "step-00000002"
    model = dsv3.load_model(out / "latest", dtype=torch.float32)
    assert len(model.mtp) == 1
    # ... and the run resumes from it; the half-written folder is cleaned up.
    assert main(["train", "--out", str(out), "--resume", "--threads", "1", "--no-progress", "--samples", "0"]) == 0
    assert not tmp.exists()
    assert ck.latest_checkpoint(out).name == "step-00000006"
    assert [r["step"] for r in records(out, "train")] == list(range(1, 7))


# ---- bad input: a clear error (exit code 2) before any work ------------------------------------


def _v2_config(tmp_path):
    from dsv3.config import preset

    p = tmp_path / "v2.json"
    p.write_text(json.dumps(preset("tiny").replace(scoring_func="softmax", topk_method="greedy",
                                                   norm_topk_prob=False).to_hf()))
    return p


ERRORS = {
    "missing data": (lambda c, t: ["--data", str(t / "nope.txt")], "does not exist"),
    "empty corpus": (lambda c, t: ["--data", str(_write(t / "empty.txt", ""))], "is empty"),
    "empty folder": (lambda c, t: ["--data", str(_mkdir(t / "nothing"))], "has no"),
    "seq too long": (lambda c, t: ["--seq-len", "5000"], "max_position_embeddings"),
    "stop after steps": (lambda c, t: ["--stop-after", "7"], "more than --steps"),
    "vocab too small": (lambda c, t: ["--vocab-size", "100"], "too small"),
    "bad tokenizer": (lambda c, t: ["--tokenizer", str(t / "nowhere")], "tokenizer.json"),
    "ramp above batch": (lambda c, t: ["--batch-size-start", "9"], "batch_size_start"),
    "warmup too long": (lambda c, t: ["--warmup-steps", "50"], "warmup"),
    "no cuda": (lambda c, t: ["--device", "cuda"], "CUDA"),
    "preset and model config": (lambda c, t: ["--model-config", str(_v2_config(t)), "--preset", "tiny"], "not both"),
    "resume nothing": (lambda c, t: ["--resume"], "no complete checkpoint"),
    "val split too short": (lambda c, t: ["--val-fraction", "0.001", "--seq-len", "256"], "validation split"),
}


def _write(p, text):
    p.write_text(text)
    return p


def _mkdir(p):
    p.mkdir()
    return p


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_is_a_clear_error(corpus, tmp_path, capsys, case):
    extra, message = ERRORS[case]
    out = tmp_path / "run"
    rc = main(base_args(corpus, out, tmp_path / "cache", *extra(corpus, tmp_path)))
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert "Traceback" not in err
    assert not (out / "metrics.jsonl").exists()  # nothing was trained


def test_aux_free_needs_the_v3_gate(corpus, tmp_path, capsys):
    args = base_args(corpus, tmp_path / "run", tmp_path / "cache")
    i = args.index("--preset")
    args[i:i + 2] = ["--model-config", str(_v2_config(tmp_path))]
    assert main(args) == 2
    assert "aux-free balancing needs" in capsys.readouterr().err


def test_resume_refuses_changed_math_and_fresh_runs_refuse_old_checkpoints(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(base_args(corpus, out, tmp_path / "cache", "--steps", "2")) == 0
    capsys.readouterr()
    assert main(base_args(corpus, out, tmp_path / "cache", "--steps", "2")) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", "--lr", "0.5"]) == 2
    assert "differs from the checkpointed run" in capsys.readouterr().err


def test_unknown_balance_mode_is_rejected_by_the_parser(corpus, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(base_args(corpus, tmp_path / "run", tmp_path / "cache", "--balance", "magic"))
    assert e.value.code == 2
