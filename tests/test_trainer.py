"""The training step against references: transformers' DeepseekV3ForCausalLM loss and gradients (same
weights through the loader users use), the paper's bias update on the real model's routing, the
MTP target alignment of §2.2 (learnable vs unlearnable data), and the optimizer/precision wiring."""
import copy

import numpy as np
import pytest
import torch

import dsv3
from dsv3.checkpoint import dsv3_to_hf
from dsv3.config import preset
from dsv3.train.data import TokenDataset
from dsv3.train.optim import lr_at, mtp_weight_at
from dsv3.train.trainer import Trainer, TrainConfig, compute_losses, default_init_std, moe_layers
from hf_ref import make_v3

TOL = 1e-4


def tiny(**kw):
    return preset("tiny").replace(**kw)


def random_stream(n, vocab, seed=0):
    return TokenDataset([np.random.default_rng(seed).integers(0, vocab, n).astype(np.int64)])


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ---- against transformers -------------------------------------------------------------------


def test_loss_and_grads_match_transformers(tmp_path):
    # Same weights: transformers' model saved with save_pretrained, read by dsv3.load_model.
    ref = make_v3(tmp_path, seed=4)
    ref.train()
    model = dsv3.load_model(tmp_path, dtype=torch.float32).train()
    windows = torch.randint(0, 97, (3, 33), generator=torch.Generator().manual_seed(0))
    out = compute_losses(model, windows, seq_len=32)
    out.loss.backward()
    # transformers shifts the labels itself and averages the CE over all predicted tokens; the
    # last input token has no label, and causality keeps it from changing the other positions.
    want = ref(input_ids=windows, labels=windows).loss
    want.backward()
    assert abs(out.ce.item() - want.item()) <= TOL * abs(want.item())
    assert out.loss.item() == out.ce.item()  # no MTP, no balance term in this configuration
    # Gradients, compared under the checkpoint names (the name table users' checkpoints go through).
    grads = copy.deepcopy(model)
    for p, g in zip(model.parameters(), grads.parameters()):
        g.data = p.grad.clone()
    ours = dict(dsv3_to_hf(grads, mtp_shared_copies=False))
    # transformers 5 keeps each layer's experts fused: gate_up_proj (E, 2I, D) = [gate; up] per
    # expert, down_proj (E, D, I). dsv3 stacks w1 (gate), w3 (up), w2 (down) the same way.
    for i, layer in enumerate(grads.layers):
        if hasattr(layer.ffn, "experts"):
            ex = layer.ffn.experts
            ours[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([ex.w1, ex.w3], dim=1)
            ours[f"model.layers.{i}.mlp.experts.down_proj"] = ex.w2
    theirs = {n: p.grad for n, p in ref.named_parameters()}
    assert set(theirs) <= set(ours)
    assert any("experts" in n for n in theirs) and any("gate.weight" in n for n in theirs)
    for name, g in theirs.items():
        assert g is not None, name
        assert rel(ours[name], g) <= TOL, name


def test_gradient_accumulation_equals_full_batch():
    # Micro-batches weighted by their share of the rows give the full batch's gradient: main CE,
    # MTP CE and the sequence-wise loss are all means over sequences.
    cfg = tiny(vocab_size=64)
    data = random_stream(4000, 64)
    grads = []
    for mb in (None, 2, 3):
        tcfg = TrainConfig(steps=4, batch_size=6, micro_batch_size=mb, seq_len=16, seq_alpha=0.5, lr=1e-3)
        tr = Trainer(cfg, tcfg, data)
        windows = tr.sampler.next_windows(6)
        for micro in windows.split(mb or 6):
            out = compute_losses(tr.model, micro, 16, 0.3, "aux-free", 0.5, 0.0, tr.layers)
            (out.loss * micro.shape[0] / 6).backward()
        grads.append(torch.cat([p.grad.flatten() for p in tr.model.parameters()]))
    for g in grads[1:]:
        assert rel(g, grads[0]) <= 1e-5


# ---- MTP targets (paper §2.2: module k sees Emb(t_{i+k}) and predicts t_{i+k+1}) ----------------


def _train_on(windows_fn, steps, cfg, lr=1e-2):
    tcfg = TrainConfig(steps=steps, batch_size=8, seq_len=24, lr=lr, warmup_steps=0, balance="none",
                       mtp_lambda=(1.0, 1.0))
    tr = Trainer(cfg, tcfg, random_stream(2000, cfg.vocab_size))
    for i in range(steps):
        tr.sampler.next_windows = lambda bs, i=i: windows_fn(bs, i)
        rec = tr.train_step()
    return rec


def test_mtp_learns_predictable_text_and_cannot_peek():
    cfg = tiny(vocab_size=48, num_nextn_predict_layers=2)
    V = cfg.vocab_size
    W = 24 + 1 + 2

    def counting(bs, i):  # t_{j+1} = t_j + 1 (mod V): every depth can predict its target exactly
        start = torch.randint(0, V, (bs, 1), generator=torch.Generator().manual_seed(i))
        return (start + torch.arange(W)) % V

    rec = _train_on(counting, 60, cfg)
    assert rec["ce"] < 0.3 and rec["mtp_loss"] < 0.3

    def iid(bs, i):  # fresh uniform tokens: nothing is predictable, a loss below ln V means a leak
        return torch.randint(0, V, (bs, W), generator=torch.Generator().manual_seed(1000 + i))

    rec = _train_on(iid, 60, cfg)
    ln_v = float(np.log(V))
    assert rec["ce"] > 0.95 * ln_v and rec["mtp_loss"] > 0.95 * ln_v


def test_overfits_one_batch():
    cfg = tiny(vocab_size=256)
    tcfg = TrainConfig(steps=80, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=0)
    tr = Trainer(cfg, tcfg, random_stream(5000, 256, seed=3))
    batch = tr.sampler.next_windows(4)
    tr.sampler.next_windows = lambda bs: batch
    first = tr.train_step()
    for _ in range(79):
        last = tr.train_step()
    assert first["ce"] > 5.0  # ~ln 256 at init
    assert last["ce"] < 0.1 and last["mtp_loss"] < 0.5


# ---- aux-free balancing through the real model ------------------------------------------------


def test_bias_update_counts_the_whole_step():
    cfg = tiny(vocab_size=128)
    gamma = 1e-3
    tcfg = TrainConfig(steps=10, batch_size=8, micro_batch_size=2, seq_len=16, gamma=gamma)
    tr = Trainer(cfg, tcfg, random_stream(4000, 128, seed=1))
    # Independent recount: route every micro-batch's MoE input with the gate's own methods.
    counts = {name: [] for name, _ in tr.layers}

    def hook(name):
        def f(moe, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            with torch.no_grad():
                _, idx = moe.gate.route(moe.gate.scores(x))
            counts[name].append(torch.bincount(idx.flatten(), minlength=moe.n_experts))
        return f

    handles = [moe.register_forward_hook(hook(name)) for name, moe in tr.layers]
    before = {name: moe.gate.bias.clone() for name, moe in tr.layers}
    # Scramble the biases so that the update is not symmetric around zero.
    for _, moe in tr.layers:
        moe.gate.bias.copy_(torch.randn(moe.n_experts) * 0.05)
    before = {name: moe.gate.bias.clone() for name, moe in tr.layers}
    tr.train_step()
    for h in handles:
        h.remove()
    discriminates = False
    for name, moe in tr.layers:
        assert len(counts[name]) == 4  # four micro-batches
        loads = torch.stack(counts[name]).sum(0).double()
        want = gamma * torch.sign(loads.mean() - loads)
        torch.testing.assert_close(moe.gate.bias - before[name], want.float(), rtol=0, atol=1e-7)
        last = counts[name][-1].double()
        discriminates |= not torch.equal(torch.sign(last.mean() - last), torch.sign(loads.mean() - loads))
    assert discriminates, "choose a seed where one micro-batch alone would give another update"
    # The bias is a buffer: never handed to the optimizer.
    opt_params = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert all(id(moe.gate.bias) not in opt_params for _, moe in tr.layers)


SKEW = torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0])


def _skewed_trainer(balance, gamma=0.05):
    cfg = tiny(vocab_size=128)
    tcfg = TrainConfig(steps=40, batch_size=8, seq_len=16, lr=1e-6, warmup_steps=0, balance=balance, gamma=gamma,
                       gamma_stop_at=1.0)
    tr = Trainer(cfg, tcfg, random_stream(6000, 128, seed=2))
    with torch.no_grad():
        for _, moe in tr.layers:
            # Start far from balance: sigmoid scores lie in (0, 1), so this bias makes every token
            # pick experts 0 and 1 (groups {0, 1} and one other), as a router that collapsed would.
            moe.gate.bias.copy_(SKEW)
    return tr


def test_bias_update_moves_the_real_model_toward_balance():
    tr = _skewed_trainer("aux-free")
    first = tr.train_step()
    for _ in range(39):
        last = tr.train_step()
    for name, moe in tr.layers:
        assert first["maxvio_batch"][name] > 2.0  # top-2 of 8 experts all on two experts: MaxVio ~ 3
        assert last["maxvio_batch"][name] < 1.0
        delta = moe.gate.bias - SKEW
        assert delta[:2].max() < -0.5 and delta[2:].min() > 0  # favoured experts pushed down, the rest up

    none = _skewed_trainer("none")
    for _ in range(40):
        rec = none.train_step()
    for name, moe in none.layers:
        assert torch.equal(moe.gate.bias, SKEW)
        assert rec["maxvio_batch"][name] > 2.0
        assert rec["balance_loss"] == 0.0


def test_aux_loss_mode_keeps_bias_zero_and_adds_the_expert_loss():
    cfg = tiny(vocab_size=128)
    tr = Trainer(cfg, TrainConfig(steps=4, batch_size=4, seq_len=16, balance="aux-loss"), random_stream(2000, 128))
    for _ in range(2):
        rec = tr.train_step()
    assert rec["balance_loss"] > 0 and rec["gamma"] == 0.0
    assert all(torch.count_nonzero(moe.gate.bias) == 0 for _, moe in tr.layers)


def test_bias_is_saved_as_e_score_correction_bias(tmp_path):
    from safetensors.torch import load_file

    tr = _skewed_trainer("aux-free")
    for _ in range(3):
        tr.train_step()
    dsv3.save_model(tr.master, tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    N = tr.model_cfg.num_hidden_layers
    for name, moe in tr.layers:
        i = int(name.split(".")[1]) + (N if name.startswith("mtp") else 0)
        b = saved[f"model.layers.{i}.mlp.gate.e_score_correction_bias"]
        assert b.dtype == torch.float32 and torch.count_nonzero(b) > 0
        assert torch.equal(b, moe.gate.bias)


# ---- schedules, precision, init --------------------------------------------------------------


def test_schedules_follow_the_budget():
    cfg = tiny(vocab_size=64)
    tcfg = TrainConfig(steps=40, batch_size=8, batch_size_start=2, batch_ramp_until=0.25, seq_len=8, lr=1e-3,
                       warmup_steps=4, gamma_stop_at=0.5)
    tr = Trainer(cfg, tcfg, random_stream(20000, 64))
    recs = [tr.train_step() for _ in range(40)]
    for i, r in enumerate(recs):
        assert r["lr"] == pytest.approx(lr_at(i, 40, 1e-3, 4), rel=1e-12)
        assert r["mtp_lambda"] == mtp_weight_at(i, 40)
        assert r["gamma"] == (1e-3 if i < 20 else 0.0)
    sizes = [r["batch_size"] for r in recs]
    assert sizes[0] == 2 and sizes[-1] == 8 and sizes == sorted(sizes) and sizes[10] == 8
    assert recs[-1]["tokens"] == sum(sizes) * 8


def test_bf16_keeps_fp32_master_weights():
    cfg = tiny(vocab_size=128)
    data = random_stream(4000, 128)
    runs = {}
    for dtype in ("fp32", "bf16"):
        tr = Trainer(cfg, TrainConfig(steps=4, batch_size=4, micro_batch_size=2, seq_len=16, dtype=dtype), data)
        runs[dtype] = (tr, tr.train_step())
    tr, rec = runs["bf16"]
    assert all(p.dtype == torch.bfloat16 for p in tr.model.parameters())
    assert all(p.dtype == torch.float32 for p in tr.master.parameters())
    # the compute copy is the master rounded to bf16, the router bias one shared fp32 buffer
    for p, q in zip(tr.model.parameters(), tr.master.parameters()):
        assert torch.equal(p, q.to(torch.bfloat16))
    for (_, a), (_, b) in zip(tr.layers, moe_layers(tr.master)):
        assert a.gate.bias is b.gate.bias and a.gate.bias.dtype == torch.float32
    assert rec["ce"] == pytest.approx(runs["fp32"][1]["ce"], rel=2e-2)
    assert rec["ce"] != runs["fp32"][1]["ce"]  # it really ran in bf16


def test_init_std_keeps_the_paper_gain():
    assert default_init_std(7168) == pytest.approx(0.006)
    cfg = tiny(vocab_size=64)
    tr = Trainer(cfg, TrainConfig(steps=2, batch_size=2, seq_len=8), random_stream(1000, 64))
    w = tr.model.layers[0].attn.wkv_a.weight
    assert w.std().item() == pytest.approx(0.006 * (7168 / 64) ** 0.5, rel=0.05)
    assert torch.equal(tr.model.layers[0].attn_norm.weight, torch.ones(64))
