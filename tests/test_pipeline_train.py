"""Pipeline-parallel training (issue 7): `dsv3 train --pp 2` under torchrun (gloo, CPU) with the 1F1B,
DualPipe and DualPipeV schedules, and --pp 2 --dp 2 on 4 processes, against the single-process
`dsv3 train` on the same data, seed and batch (the reference: the trainer every other test ties to
transformers). fp32, --deterministic. What is compared: every step's loss, CE, MTP loss, balance
loss and gradient norm (relative 1e-5), the expert loads (exactly), the validation loss, and the one
HF checkpoint folder rank 0 writes (dsv3.load_model, within 1e-5) with its optimizer state;
`--resume` of a pipeline run (same layout and one process); the library-level trainer with DualPipe
over 4 ranks (each rank holds only its stages; shared copies stay bit-identical); bad flags.

The balance-loss factor is raised to 0.1 (paper: 1e-4) in every run so that a wrong balance-loss
gradient on a stage would move the weights far beyond the tolerance (measured: 0.5 vs 0 changes
every tensor by > 10%)."""
import shutil

import numpy as np
import pytest
import torch

import dsv3
from dsv3.cli import main
from dsv3.config import preset
from dsv3.parallel.dist import init_parallel, run_local
from dsv3.train.data import TokenDataset
from dsv3.train.pipeline_train import PipelineTrainer, train_stage_layers
from dsv3.train.trainer import Trainer, TrainConfig

import test_parallel_cli
from test_parallel_cli import STEPS, corpus, records, torchrun  # noqa: F401 (corpus: a shared fixture)


def train_args(corpus, out, cache, *extra):
    # the CLI tests' run, one row per micro-batch, a balance loss large enough that a wrong gradient
    # of it shows, and deterministic kernels
    return test_parallel_cli.train_args(corpus, out, cache, "--micro-batch-size", "1", "--seq-alpha", "0.1",
                                        "--deterministic", *extra)


def assert_same_weights(a, b, rel=1e-5):
    wa = dsv3.load_model(a / "latest", dtype=torch.float32).state_dict()
    wb = dsv3.load_model(b / "latest", dtype=torch.float32).state_dict()
    assert wa.keys() == wb.keys()
    for k in wa:
        tol = rel * max(1.0, float(wa[k].abs().max()))
        assert float((wa[k] - wb[k]).abs().max()) <= tol, k
    return wa


def assert_same_run(a, b, steps=range(1, STEPS + 1), weight_rel=1e-5):
    ra_all, rb_all = records(a, "train"), records(b, "train")
    assert [r["step"] for r in rb_all] == list(steps)
    for ra, rb in zip(ra_all, rb_all):
        assert ra["step"] == rb["step"]
        for k in ("loss", "ce", "mtp_loss", "balance_loss", "grad_norm"):
            assert abs(ra[k] - rb[k]) <= 1e-5 * abs(ra[k]), (ra["step"], k, ra[k], rb[k])
        for k in ("lr", "mtp_lambda", "gamma", "batch_size", "tokens"):
            assert ra[k] == rb[k], (k, ra[k], rb[k])
        # the loads of every MoE layer (main + MTP), counted over the whole step on the stages
        assert ra["maxvio_batch"] == rb["maxvio_batch"] and ra["maxvio_cum"] == rb["maxvio_cum"]
    ea, eb = records(a, "eval")[-1], records(b, "eval")[-1]
    assert abs(ea["val_loss"] - eb["val_loss"]) <= 1e-5 * ea["val_loss"]
    assert abs(ea["val_mtp_loss"] - eb["val_mtp_loss"]) <= 1e-5 * ea["val_mtp_loss"]
    assert ea["val_loads"] == eb["val_loads"] and ea["train_loads"] == eb["train_loads"]
    # ONE full HF checkpoint (written by rank 0) holding what one process holds
    wa = assert_same_weights(a, b, weight_rel)
    # ... and the optimizer state in the single-process layout (what makes --resume layout-free)
    sa = torch.load(a / "latest" / "trainer_state.pt", weights_only=False)
    sb = torch.load(b / "latest" / "trainer_state.pt", weights_only=False)
    oa, ob = sa["optimizer"], sb["optimizer"]
    assert [g["params"] for g in oa["param_groups"]] == [g["params"] for g in ob["param_groups"]]
    assert oa["state"].keys() == ob["state"].keys() and len(oa["state"]) == len(wa) - len(
        [k for k in wa if k.endswith("gate.bias")])  # every parameter (the router bias is a buffer)
    for i in oa["state"]:
        assert float(oa["state"][i]["step"]) == float(ob["state"][i]["step"])
        for k in ("exp_avg", "exp_avg_sq"):
            x, y = oa["state"][i][k], ob["state"][i][k]
            assert float((x - y).abs().max()) <= weight_rel * max(1e-6, float(x.abs().max())), (i, k)
    assert sa["sampler"] == sb["sampler"] and torch.equal(sa["tracker"]["total"], sb["tracker"]["total"])
    assert (a / "latest" / "tokenizer.json").read_text() == (b / "latest" / "tokenizer.json").read_text()
    assert not list((b / "checkpoints").glob(".tmp-*"))


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    d = tmp_path_factory.mktemp("single")
    assert main(train_args(corpus, d / "run", d / "cache")) == 0
    return d / "run"


@pytest.mark.parametrize("kind", ["1f1b", "dualpipe"])
def test_pp2_equals_one_process(single, corpus, tmp_path, kind):
    run = tmp_path / "run"
    out = torchrun(2, train_args(corpus, run, tmp_path / "cache", "--pp", "2", "--pp-schedule", kind))
    assert f"pipeline: {kind} over 2 ranks" in out  # rank 0 prints the layout; the other rank is silent
    assert_same_run(single, run)
    state = torch.load(run / "latest" / "trainer_state.pt", weights_only=False)
    assert state["parallel"] == {"pp": 2, "dp": 1, "ep": 1, "tp": 1, "pp_schedule": kind}


def test_pp2_dualpipev_resume(single, corpus, tmp_path):
    # DualPipeV, interrupted after 2 of 3 steps and resumed by the same layout ...
    run = tmp_path / "run"
    args = train_args(corpus, run, tmp_path / "cache", "--pp", "2", "--pp-schedule", "dualpipev")
    out = torchrun(2, [*args, "--stop-after", "2"])
    assert "stopped at step 2 of 3" in out
    assert len(records(run, "train")) == 2
    one = tmp_path / "one"
    shutil.copytree(run, one, symlinks=True)
    out = torchrun(2, [*args, "--resume"])
    assert "resumed" in out and "at step 2" in out
    assert_same_run(single, run)
    # ... and by one process (the checkpoint is a single-process one: same names, same optimizer layout)
    assert main(train_args(corpus, one, tmp_path / "cache", "--resume")) == 0
    assert_same_run(single, one)


def test_pp2_dp2_four_processes(single, corpus, tmp_path):
    run = tmp_path / "run"
    torchrun(4, train_args(corpus, run, tmp_path / "cache", "--pp", "2", "--dp", "2"))
    assert_same_run(single, run)


# ---- the library-level trainer: DualPipe over 4 ranks ------------------------------------------

def _cfg():
    return TrainConfig(steps=4, batch_size=8, micro_batch_size=1, seq_len=16, lr=3e-3, seq_alpha=0.1, gamma=0.01)


def _data():
    return TokenDataset([np.random.default_rng(0).integers(0, 512, 6000).astype(np.int64)])


def _pipeline_worker(rank, world, steps, sync):
    torch.use_deterministic_algorithms(True)
    ctx = init_parallel(pp=world, pp_schedule="dualpipe")
    trainer = PipelineTrainer(preset("tiny"), _cfg(), _data(), parallel=ctx)
    if not sync:
        trainer._shared = []  # the control: no gradient sum over the ranks holding the same tensor
    recs = [trainer.train_step() for _ in range(steps)]
    own = {k: v.clone() for k, v in trainer.master.state_dict().items()}
    try:
        full = trainer.full_master()
    except AssertionError as e:
        full = str(e)
    if full is not None and not isinstance(full, str):
        full = full.state_dict()
    return dict(recs=recs, own=own, full=full)


def test_dualpipe_trainer_holds_its_stages_and_keeps_copies_equal():
    steps = 2
    torch.manual_seed(0)
    ref = Trainer(preset("tiny"), _cfg(), _data())
    ref_recs = [ref.train_step() for _ in range(steps)]
    res = run_local(_pipeline_worker, 4, steps, True)
    # tiny: 3 layers + 1 MTP module -> stages [0], [1], [2], [- + norm + head + MTP]; DualPipe rank r
    # holds stage r and stage 3 - r, and nothing else
    assert [list(r) for r in train_stage_layers(3, 1, 4)] == [[0], [1], [2], []]
    tops = [sorted({k.split(".")[0] + ("." + k.split(".")[1] if k.startswith(("layers", "mtp")) else "")
                    for k in r["own"]}) for r in res]
    assert tops[0] == tops[3] == ["embed", "head", "layers.0", "mtp.0", "norm"]
    assert tops[1] == tops[2] == ["layers.1", "layers.2"]
    # the two copies of every stage (and the embedding MTP shares) are bit-identical after the steps
    for a, b in ((0, 3), (1, 2)):
        assert res[a]["own"].keys() == res[b]["own"].keys()
        for k in res[a]["own"]:
            assert torch.equal(res[a]["own"][k], res[b]["own"][k]), k
    for r in res:
        for got, want in zip(r["recs"], ref_recs):
            for k in ("loss", "ce", "mtp_loss", "balance_loss", "grad_norm"):
                assert abs(got[k] - want[k]) <= 1e-5 * abs(want[k]), (k, got[k], want[k])
            assert got["maxvio_batch"] == want["maxvio_batch"]
    full, want = res[0]["full"], ref.master.state_dict()
    assert full.keys() == want.keys() and all(r["full"] is None for r in res[1:])
    for k in want:
        assert float((full[k] - want[k]).abs().max()) <= 1e-5 * max(1.0, float(want[k].abs().max())), k
    # The control: without the sum over the ranks holding a tensor, the copies drift apart after one
    # step, and the checkpoint gather refuses them.
    bad = run_local(_pipeline_worker, 4, 1, False)
    assert isinstance(bad[0]["full"], str) and "diverged" in bad[0]["full"]


# ---- bad flags: refused before any work ---------------------------------------------------------

@pytest.mark.parametrize("extra, text", [
    (["--pp", "2"], "launch it under torchrun"),
    (["--pp", "2", "--ep", "2"], "torchrun --nproc-per-node 4 -m dsv3 train ... --pp 2 --ep 2"),
    (["--pp", "2", "--ep", "3"], "the model's 8 routed experts do not divide over 3 expert-parallel ranks"),
    (["--pp", "2", "--tp", "2"], "inference only"),
    (["--pp", "2", "--dp-mode", "fsdp"], "--dp-mode fsdp with --pp is not supported"),
    (["--pp", "2", "--compile"], "--compile with --pp is not supported"),
    (["--pp", "2", "--pp-schedule", "dualpipev", "--micro-batch-size", "2"], "dualpipev needs micro-batches >= 2*pp"),
    (["--pp", "2", "--micro-batch-size", "3"], "--batch-size 4 must be a multiple of 3"),
    (["--pp", "3", "--pp-schedule", "dualpipe"], "even number of pipeline ranks"),
    (["--pp", "4", "--pp-schedule", "dualpipev"], "cannot split 3 layers"),
    (["--pp-schedule", "dualpipe"], "needs --pp > 1"),
])
def test_bad_pipeline_flags(corpus, tmp_path, capsys, extra, text):
    assert main(train_args(corpus, tmp_path / "run", tmp_path / "cache", *extra)) == 2
    assert text in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing was written, nothing was computed
