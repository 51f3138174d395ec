"""`dsv3 train --compile` compiles every block whole, routed experts included: the grouped GEMM's
custom op (dsv3::grouped_mm) against torch's own F.grouped_mm and its autograd, the fixed-shape expert
counts against torch.bincount, a MoE block traced as one graph, and a compiled training step (MTP,
aux-free balance loss, routing statistics) against the eager one, through torch.compile's
"aot_eager" backend (the inductor run is in test_train_perf_inductor.py)."""
import pytest
import torch
import torch.nn.functional as F

import dsv3
from dsv3.config import preset
from dsv3.model.moe import MoE, _grouped_mm_op, dispatch
from dsv3.train.trainer import compile_model, compute_losses, moe_layers


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def groups(seed=0, M=40, K=16, N=12, G=5):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K, generator=g)
    b = torch.randn(G, N, K, generator=g).transpose(1, 2)  # (G, K, N) view, as the experts pass w.T
    cuts = torch.randint(0, M + 1, (G - 1,), generator=g).sort().values  # empty groups allowed
    offs = torch.cat([cuts, torch.tensor([M])]).to(torch.int32)
    return a, b, offs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_mm_op_equals_torch_grouped_mm_and_its_gradients(seed):
    a, b, offs = groups(seed)
    dy = torch.randn(a.shape[0], b.shape[2], generator=torch.Generator().manual_seed(9))
    a1, b1 = a.clone().requires_grad_(), b.detach().clone().requires_grad_()
    a2, b2 = a.clone().requires_grad_(), b.detach().clone().requires_grad_()
    want = F.grouped_mm(a1, b1, offs=offs)
    got = _grouped_mm_op(a2, b2, offs)
    assert torch.equal(got, want)
    want.backward(dy)
    got.backward(dy)
    assert rel(a2.grad, a1.grad) <= 1e-6
    assert rel(b2.grad, b1.grad) <= 1e-6


def test_grouped_mm_op_registration():
    # torch's own checks: schema, fake (meta) kernel shapes against the real one, autograd registration
    a, b, offs = groups(3)
    torch.library.opcheck(_grouped_mm_op, (a.requires_grad_(), b.detach().clone().requires_grad_(), offs))


def test_dispatch_counts_equal_bincount():
    idx = torch.randint(0, 8, (50, 3), generator=torch.Generator().manual_seed(0))
    idx[:, 0] = 0  # one busy expert; expert 7 may be empty
    order, token, counts = dispatch(idx, 9)  # 9 experts: the last one never chosen
    assert torch.equal(counts, torch.bincount(idx.flatten(), minlength=9))
    assert torch.equal(order, idx.flatten().argsort(stable=True))
    assert torch.equal(token, order // 3)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = preset("tiny").replace(rope_scaling_type=None, max_position_embeddings=256, **kw)
    return dsv3.Transformer(cfg).init_weights(0.05).train()


def test_moe_block_traces_as_one_graph():
    model = tiny_model()
    block = model.layers[1]
    assert isinstance(block.ffn, MoE)
    block.ffn.record_routing = True  # the trainer's routing statistics: a side effect of the graph
    tokens = torch.randint(0, 512, (2, 16))
    _, mask, cos, sin = model._prepare(tokens, None, None)
    x = model.embed(tokens)
    ex = torch._dynamo.explain(block)(x, cos, sin, None, mask)
    assert ex.graph_break_count == 0, [str(r.reason)[:200] for r in ex.break_reasons]
    assert ex.graph_count == 1


def compiled_step_against_eager(backend, **kw):
    eager, compiled = tiny_model(**kw), tiny_model(**kw)
    compile_model(compiled, backend=backend)
    depth = eager.config.num_nextn_predict_layers
    windows = torch.randint(0, 512, (2, 33 + depth), generator=torch.Generator().manual_seed(1))  # S = 32
    outs = []
    for model in (eager, compiled):
        layers = moe_layers(model)
        for _, moe in layers:
            moe.record_routing = True
        out = compute_losses(model, windows, 32, mtp_lambda=0.3, balance="aux-free", seq_alpha=0.1, layers=layers)
        out.loss.backward()
        outs.append(out)
    a, b = outs
    assert torch.equal(a.loads, b.loads)  # same routing
    for k in ("ce", "mtp", "balance"):
        assert abs(getattr(a, k).item() - getattr(b, k).item()) <= 1e-5 * abs(getattr(a, k).item()), k
    assert (a.mtp.item() > 0) == (depth > 0)
    assert a.balance.item() > 0
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert p.grad is not None and q.grad is not None, name
        assert rel(q.grad, p.grad) <= 1e-4, name


def test_compiled_step_equals_eager_graphs_and_autograd():
    # aot_eager: dynamo's graphs and AOTAutograd's backward (the custom op's fake kernel and
    # gradient formula), run by eager kernels
    compiled_step_against_eager("aot_eager")


def test_compiled_trainer_runs_other_batch_sizes_eagerly(monkeypatch):
    # The batch-size ramp (2 -> 4) with compile: one compiled shape (the full micro-batch of 4 rows),
    # the ramp's smaller batches eager; the same batch sizes, losses and updates as an eager run.
    import numpy as np

    import dsv3.train.trainer as tr
    from dsv3.train.data import TokenDataset

    seen = []

    def backend(gm, example_inputs):
        # the hidden states (B, 16, D) among the graph's inputs (the others are weights, masks, tables)
        seen.extend(t.shape[0] for t in example_inputs
                    if isinstance(t, torch.Tensor) and t.dim() == 3 and tuple(t.shape[1:]) == (16, cfg.hidden_size))
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    real = tr.compile_model
    monkeypatch.setattr(tr, "compile_model", lambda m: real(m, backend=backend))
    torch._dynamo.reset()
    cfg = preset("tiny").replace(rope_scaling_type=None, max_position_embeddings=256)
    data = TokenDataset([np.random.default_rng(0).integers(0, 512, 20_000)])
    runs = {}
    for comp in (False, True):
        t = tr.Trainer(cfg, tr.TrainConfig(steps=10, batch_size=4, batch_size_start=2, batch_ramp_until=0.3,
                                           seq_len=16, lr=3e-3, compile=comp), data)
        runs[comp] = [t.train_step() for _ in range(5)]
    sizes = [r["batch_size"] for r in runs[True]]
    assert sizes == [r["batch_size"] for r in runs[False]] and sizes == [2, 2, 3, 4, 4]
    assert seen and set(seen) == {4}  # graphs were compiled for 4-row micro-batches only
    for a, b in zip(runs[False], runs[True]):
        for k in ("loss", "ce", "mtp_loss", "grad_norm"):
            assert abs(a[k] - b[k]) <= 1e-5 * abs(a[k]), (k, a[k], b[k])


def test_compile_by_default_only_where_it_pays(monkeypatch):
    from dsv3.train import trainer as tr
    from dsv3.train.cli import TRAIN_PRESETS

    def decide(name, **kw):
        p = TRAIN_PRESETS[name]
        cfg = p["model"]().replace(vocab_size=p["vocab_size"])
        return tr.compile_by_default(cfg, tr.TrainConfig(**p["train"]), **kw)[0]

    monkeypatch.setattr(tr.shutil, "which", lambda c: "/usr/bin/" + c)
    assert decide("demo")  # 250 steps of 32 x 128: 2.0e12 token-parameters
    assert not decide("tiny")  # 200 steps of a 0.25M model: 1.1e11
    assert not decide("demo", distributed=True)
    assert not decide("demo", fp8=True)
    monkeypatch.setattr(tr.shutil, "which", lambda c: None)
    assert not decide("demo")  # no C++ compiler for inductor


def test_cli_compile_default_and_old_runs_resume_eagerly(tmp_path, capsys):
    import json
    from pathlib import Path

    from dsv3.cli import main
    from dsv3.train import checkpointing as ck

    corpus = tmp_path / "c.txt"
    text = (Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    corpus.write_text(text[:30000], encoding="utf-8")

    def args(out, *extra):
        return ["train", "--data", str(corpus), "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                "--preset", "tiny", "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--threads", "1",
                "--no-progress", "--samples", "0", *extra]

    # a short run: eager by default, and the decision is saved with the run's options
    out = tmp_path / "a"
    assert main(args(out, "--stop-after", "2")) == 0
    ckpt = ck.latest_checkpoint(out)
    saved = json.loads((ckpt / ck.ARGS_FILE).read_text())
    assert saved["compile"] is False
    assert "torch.compile on by default" not in capsys.readouterr().out
    # a checkpoint written before compiling became a default has no "compile" option: it resumes
    # eagerly, and --no-compile agrees with it while --compile is refused (it would change the math)
    del saved["compile"]
    (ckpt / ck.ARGS_FILE).write_text(json.dumps(saved))
    assert main(["train", "--out", str(out), "--resume", "--compile"]) == 2
    assert "--compile True differs" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", "--no-compile", "--threads", "1", "--no-progress",
                 "--samples", "0"]) == 0
    assert ck.latest_checkpoint(out).name == "step-00000004"
