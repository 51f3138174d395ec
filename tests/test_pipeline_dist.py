"""Pipeline parallelism on gloo with 2 and 4 CPU processes: 1F1B, DualPipe and DualPipeV training
steps against a sequential single-process reference that runs the same micro-batches one after the
other through the unsplit model (issue 7: losses bit-equal in fp32, gradients with
1 - 2*sum(xy)/sum(x^2+y^2) <= 1e-12, the metric of DeepSeek's DualPipe example).

Everything is fp32. Models and data are built once in the parent and inherited by the forked
workers, so every rank starts from the same weights (DualPipe's two copies of each stage
included). Each worker runs all three schedules on two models: small MLP stages and a tiny dsv3
Transformer (dense + MoE layers) split with split_transformer, and saves its losses and gradients;
the parent compares them with the reference."""
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from dsv3.config import preset
from dsv3.model.transformer import Transformer
from dsv3.parallel.pipeline import Pipeline, lm_loss, local_chunks, split_transformer, stage_layers
from dsv3.parallel.schedules import KINDS, Layout

D, MB = 16, 3            # MLP width, MLP micro-batch rows
SEQ, TOK_MB = 8, 2       # transformer micro-batch: 2 sequences of 8 tokens


def mse(y, t):
    return F.mse_loss(y, t)


def _mlp_case(n_stages, m, seed):
    g = torch.Generator().manual_seed(seed)
    stages = []
    for _ in range(n_stages):
        s = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))
        with torch.no_grad():
            for p in s.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        stages.append(s)
    xs = [torch.randn(MB, D, generator=g) for _ in range(m)]
    ts = [torch.randn(MB, D, generator=g) for _ in range(m)]
    names = {p: f"{i}.{n}" for i, s in enumerate(stages) for n, p in s.named_parameters()}
    return dict(stages=stages, inputs=xs, targets=ts, loss=mse, shape=(MB, D), names=names,
                reference=lambda x: _seq(stages, x))


def _seq(stages, x):
    for s in stages:
        x = s(x)
    return x


def _transformer_case(n_stages, m, seed):
    cfg = preset("tiny").replace(num_hidden_layers=8, num_nextn_predict_layers=0)
    torch.manual_seed(seed)
    model = Transformer(cfg).init_weights(0.05)
    stages = split_transformer(model, n_stages)
    g = torch.Generator().manual_seed(seed + 1)
    toks = [torch.randint(0, cfg.vocab_size, (TOK_MB, SEQ + 1), generator=g) for _ in range(m)]
    names = {p: n for n, p in model.named_parameters()}
    return dict(stages=stages, inputs=[t[:, :-1] for t in toks], targets=[t[:, 1:] for t in toks], loss=lm_loss,
                shape=(TOK_MB, SEQ, cfg.hidden_size), names=names, reference=model)


def _cases(world):
    m = 10 if world == 4 else 6  # >= 2 x ranks for DualPipe / DualPipeV, several steady-state rounds
    cases = {}
    for i, kind in enumerate(KINDS):
        n = Layout(kind, world, m).n_stages
        cases[kind, "mlp"] = _mlp_case(n, m, seed=10 * world + i)
        cases[kind, "transformer"] = _transformer_case(n, m, seed=100 * world + i)
    return m, cases


def _worker(rank, world, m, cases, store, out_dir):
    torch.set_num_threads(1)  # same kernels as the reference, and no oversubscription of 2 cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = {}
        for (kind, model), case in cases.items():
            chunks = local_chunks(kind, world, rank, case["stages"])
            pipe = Pipeline(kind, chunks, loss_fn=case["loss"], p2p_shape=case["shape"])
            losses = pipe.step(m, case["inputs"], case["targets"], loss_scale=1.0 / m)
            grads = {}
            for c, chunk in enumerate(chunks):
                stage = Layout(kind, world, m).stage(rank, c)
                for p in chunk.parameters():
                    grads[stage, case["names"][p]] = p.grad.clone()
            result[kind, model] = dict(losses=losses, grads=grads)
            if model == "mlp":
                # A second step accumulates into .grad (DualPipe must not count the first twice).
                pipe.step(m, case["inputs"], case["targets"], loss_scale=1.0 / m)
                result[kind, model]["grads2"] = {
                    (Layout(kind, world, m).stage(rank, c), case["names"][p]): p.grad.clone()
                    for c, chunk in enumerate(chunks) for p in chunk.parameters()}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _launch(world, m, cases, tmp_path, timeout=120.0):
    # fork: the workers inherit the models and data (no re-import, identical weights everywhere).
    ctx = mp.start_processes(_worker, args=(world, m, cases, str(tmp_path / "store"), str(tmp_path)),
                             nprocs=world, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise AssertionError(f"pipeline workers did not finish within {timeout:.0f} s (deadlock?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()  # only our own workers, by handle
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _reference(case, m):
    # Sequential: micro-batch by micro-batch through the whole model, each loss back-propagated
    # with weight 1/M, gradients accumulated in .grad: what one process would do.
    torch.set_num_threads(1)
    losses = []
    for x, t in zip(case["inputs"], case["targets"]):
        loss = case["loss"](case["reference"](x), t)
        torch.autograd.backward(loss, torch.tensor(1.0 / m))
        losses.append(loss.detach())
    grads = {case["names"][p]: p.grad for p in case["names"] if p.grad is not None}
    return losses, grads


def rel_diff(x, y):
    x, y = x.double(), y.double()
    den = (x * x + y * y).sum()
    if den == 0:
        return 0.0
    return (1 - 2 * (x * y).sum() / den).item()


@pytest.mark.parametrize("world", [2, 4])
def test_pipeline_matches_sequential(world, tmp_path):
    m, cases = _cases(world)
    results = _launch(world, m, cases, tmp_path)
    threads = torch.get_num_threads()
    try:
        for (kind, model), case in cases.items():
            layout = Layout(kind, world, m)
            ref_losses, ref_grads = _reference(case, m)
            # Losses: each micro-batch's loss comes from the rank holding its last stage, bit-equal.
            got = {}
            for r, res in enumerate(results):
                mine = res[kind, model]["losses"]
                assert sorted(mine) == [mb for mb in range(m) if layout.exit_rank(mb) == r], (kind, model, r)
                got.update(mine)
            for mb in range(m):
                assert torch.equal(got[mb], ref_losses[mb]), (kind, model, mb, got[mb].item(), ref_losses[mb].item())
            # Gradients: every parameter of every stage, on every rank that holds a copy.
            copies = {}
            for res in results:
                for (stage, name), g in res[kind, model]["grads"].items():
                    copies.setdefault(name, []).append(g)
            assert set(copies) == set(ref_grads), (kind, model)
            worst = 0.0
            for name, gs in copies.items():
                assert len(gs) == (2 if kind == "dualpipe" else 1), (kind, model, name)
                for g in gs:
                    worst = max(worst, rel_diff(g, ref_grads[name]))
                # DualPipe: both copies of a stage hold the same summed gradient, bit for bit.
                assert all(torch.equal(g, gs[0]) for g in gs), (kind, model, name)
            assert worst <= 1e-12, (kind, model, worst)
            if model == "mlp":
                for res in results:
                    for (stage, name), g in res[kind, model]["grads2"].items():
                        assert rel_diff(g, 2 * ref_grads[name]) <= 1e-12, (kind, "second step", name)
    finally:
        torch.set_num_threads(threads)


def test_reference_is_sensitive():
    # The comparison can fail: dropping one micro-batch's backward, or perturbing one weight,
    # moves the gradient metric far above 1e-12 and changes the loss bits.
    _, cases = _cases(2)
    case = cases["1f1b", "transformer"]
    m = len(case["inputs"])
    losses, grads = _reference(case, m)
    for p in case["names"]:
        p.grad = None
    short = dict(case, inputs=case["inputs"][:-1], targets=case["targets"][:-1])
    _, grads_short = _reference(short, m)
    assert max(rel_diff(grads_short[n], grads[n]) for n in grads) > 1e-6
    with torch.no_grad():
        case["reference"].layers[3].attn.wo.weight[0, 0] += 1e-3
    loss = case["loss"](case["reference"](case["inputs"][0]), case["targets"][0])
    assert not torch.equal(loss, losses[0])


def test_stage_split_and_errors():
    cfg = preset("tiny").replace(num_hidden_layers=5, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    model = Transformer(cfg).init_weights(0.05)
    stages = split_transformer(model, 3)
    assert [list(s.layer_ids) for s in stages] == [[0, 1], [2, 3], [4]]
    # The stages hold the model's own parameters, each exactly once, MTP excluded.
    held = [p for s in stages for p in s.parameters()]
    assert len(held) == len({id(p) for p in held}) == len(list(model.parameters()))
    # Composing the stages is the model's forward, bit for bit.
    tokens = torch.randint(0, cfg.vocab_size, (2, 7))
    h = tokens
    for s in stages:
        h = s(h)
    assert torch.equal(h, model(tokens))
    assert [len(r) for r in stage_layers(5, 2, [0, 5])] == [0, 5]
    with pytest.raises(ValueError, match="at least one layer"):
        split_transformer(model, 6)
    with pytest.raises(ValueError, match="sum to"):
        stage_layers(5, 2, [2, 2])
    with pytest.raises(ValueError, match="middle stage"):
        stage_layers(5, 3, [3, 0, 2])
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        split_transformer(Transformer(cfg.replace(tie_word_embeddings=True)), 2)
    with pytest.raises(ValueError, match="needs 8 stages"):
        local_chunks("dualpipev", 4, 0, stages)
    assert local_chunks("dualpipe", 4, 1, list("abcd")) == ["b", "c"]
    assert local_chunks("dualpipev", 2, 1, list("abcd")) == ["b", "c"]
    assert local_chunks("dualpipev", 2, 0, list("abcd")) == ["a", "d"]
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="init_process_group"):
            Pipeline("1f1b", stages[:1], loss_fn=lm_loss, p2p_shape=(2, 7, cfg.hidden_size))
