"""Data parallelism (FSDP2 fully_shard and the replicated all-reduce twin), alone and combined with
expert parallelism, on CPU/gloo: a few AdamW training steps (cross-entropy + MTP loss, global
gradient-norm clipping, aux-loss-free bias update from globally reduced loads) give the same losses,
gradient norms and parameters as single-process steps on the same global batch (issue 7)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import dsv3
from dsv3.config import preset
from dsv3.model.moe import MoE
from dsv3.parallel.data import full_state_dict
from dsv3.parallel.dist import _subgroups, add_parallel_arguments, init_parallel, run_local
from dsv3.parallel.expert import LocalExperts
from dsv3.train.balance import bias_update, count_loads
from dsv3.train.optim import build_optimizer

CFG = dict(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, num_hidden_layers=2,
           first_k_dense_replace=1)
B_LOCAL, S, STEPS, MAX_NORM, LR = 2, 8, 3, 0.5, 1e-3


def build():
    torch.manual_seed(0)
    model = dsv3.Transformer(preset("tiny").replace(**CFG)).init_weights(std=0.1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoE):
                m.gate.bias.normal_(0, 0.05)
    return model


def batches(n_rows):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 512, (n_rows, S + 2), generator=g) for _ in range(STEPS)]


def step(model, tokens, opt, clip, loads_fn):
    """One training step as a trainer runs it: main + MTP cross-entropy (means over this rank's tokens)."""
    for m in model.modules():
        if isinstance(m, MoE):
            m.record_routing = True
    h = model.hidden(tokens[:, :S])
    loss = F.cross_entropy(model.logits(h).flatten(0, 1).float(), tokens[:, 1:S + 1].flatten())
    hm = model.mtp_hidden(h, tokens[:, :S + 1])[0]
    loss = loss + 0.3 * F.cross_entropy(model.logits(hm).flatten(0, 1).float(), tokens[:, 2:S + 2].flatten())
    loss.backward()
    norm = clip()
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoE):
                bias_update(m.gate.bias, loads_fn(count_loads(m.last_routing[1], m.n_experts)), 1e-3)
    return loss.detach(), norm


def dp_worker(rank, world, setups):
    out = []
    for dp, ep, mode in setups:
        model = build()
        ref = copy.deepcopy(model)
        data = batches(world * B_LOCAL)
        # single process, global batch
        ref_opt = build_optimizer(ref, lr=LR)
        ref_hist = [step(ref, t, ref_opt, lambda: torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM),
                         lambda c: c) for t in data]
        # parallel
        ctx = init_parallel(dp=dp, ep=ep, dp_mode=mode)
        ctx.parallelize(model)
        opt = build_optimizer(model, lr=LR)

        def clip():
            ctx.reduce_gradients()
            return ctx.clip_grad_norm_(MAX_NORM)
        hist = [step(model, ctx.local_batch(t), opt, clip, ctx.global_loads) for t in data]
        r = {"setup": (dp, ep, mode),
             "loss": max(abs(ctx.mean(l).item() - lr_.item()) for (l, _), (lr_, _) in zip(hist, ref_hist)),
             "norm": max(abs(n.item() - nr.item()) / nr.item() for (_, n), (_, nr) in zip(hist, ref_hist)),
             "clipped": min(nr.item() for _, nr in ref_hist) > MAX_NORM}
        # the whole trained model, gathered back to single-device form (FSDP shards, EP expert slices)
        sd = full_state_dict(model, ctx.group("ep"))
        ref_sd, init = ref.state_dict(), build().state_dict()
        r["same_keys"] = sorted(sd) == sorted(ref_sd) and all(sd[k].shape == ref_sd[k].shape for k in sd)
        r["params"] = max((sd[k] - ref_sd[k]).abs().max().item() for k in ref_sd)
        r["moved"] = max((ref_sd[k] - init[k]).abs().max().item() for k in ref_sd if not k.endswith("gate.bias"))
        r["bias"] = max((a.gate.bias - b.gate.bias).abs().max().item() for a, b in
                        zip([m for m in model.modules() if isinstance(m, MoE)],
                            [m for m in ref.modules() if isinstance(m, MoE)]))
        r["bias_moved"] = max(m.gate.bias.abs().max().item() for m in ref.modules() if isinstance(m, MoE))
        r["sharded_experts"] = sum(isinstance(m, LocalExperts) for m in model.modules())
        r["dtensors"] = sum(hasattr(p, "full_tensor") for p in model.parameters())
        out.append(r)
    return out


SETUPS = {2: [(2, 1, "fsdp"), (1, 2, "fsdp"), (2, 1, "replicate"), (1, 2, "replicate")],
          4: [(2, 2, "fsdp"), (2, 2, "replicate")]}


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def results(request):
    w = request.param
    # init=False: init_parallel() initialises the process group from torchrun's environment variables
    return run_local(dp_worker, w, SETUPS[w], init=False)


def test_training_steps_equal_single_process(results):
    for rank_res in results:
        for r in rank_res:
            assert r["clipped"], "the reference gradient norm must exceed max_norm so clipping is exercised"
            assert r["loss"] <= 1e-5, r
            assert r["norm"] <= 1e-5, r
            assert r["moved"] > 2 * LR  # parameters did change, by more than the compared error
            assert r["same_keys"]
            assert r["params"] <= 1e-5, r


def test_bias_update_uses_global_loads(results):
    for rank_res in results:
        for r in rank_res:
            assert r["bias_moved"] > 0.05  # random init, then STEPS updates of 1e-3
            assert r["bias"] == 0.0, r  # counts are integers: the update is exact


def test_layouts(results):
    for rank_res in results:
        for r in rank_res:
            dp, ep, mode = r["setup"]
            assert r["sharded_experts"] == (2 if ep > 1 else 0)  # layer 1 and the MTP block
            assert (r["dtensors"] > 0) == (mode == "fsdp")


def test_rank_layout():
    # rank = ((pp_i * dp + dp_i) * ep + ep_i) * tp + tp_i
    sizes = dict(pp=1, dp=2, ep=2, tp=1)
    assert _subgroups(sizes, ("ep",)) == [[0, 1], [2, 3]]
    assert _subgroups(sizes, ("dp",)) == [[0, 2], [1, 3]]
    assert _subgroups(sizes, ("dp", "ep")) == [[0, 1, 2, 3]]
    sizes = dict(pp=2, dp=1, ep=1, tp=2)
    assert _subgroups(sizes, ("tp",)) == [[0, 1], [2, 3]]
    assert _subgroups(sizes, ("pp",)) == [[0, 2], [1, 3]]


def test_arguments_and_validation(monkeypatch):
    import argparse
    p = argparse.ArgumentParser()
    add_parallel_arguments(p)
    a = p.parse_args(["--ep", "2", "--fp8-dispatch", "--dp-mode", "replicate"])
    assert (a.dp, a.ep, a.tp, a.pp, a.fp8_dispatch, a.dp_mode) == (None, 2, 1, 1, True, "replicate")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = init_parallel(p.parse_args([]))  # plain python: one process, nothing initialised
    assert ctx.world == 1 and ctx.data_size == 1 and not ctx.distributed
    with pytest.raises(ValueError, match="not divisible"):
        init_parallel(a)  # ep=2 needs an even number of processes
    with pytest.raises(ValueError, match="does not match the world size"):
        init_parallel(p.parse_args(["--ep", "2", "--dp", "2"]))
    with pytest.raises(ValueError, match="positive"):
        init_parallel(p.parse_args(["--ep", "0"]))
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="together"):
        init_parallel(p.parse_args(["--ep", "2", "--tp", "2"]))
