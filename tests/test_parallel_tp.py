"""Tensor parallelism for inference on CPU/gloo, TP = 2 and 4: every rank loads only its shard of an
HF checkpoint folder (bf16/fp32 and the released FP8 block format, with slices that start inside a
128x128 block), and the logits and greedy generations equal the single-process model loaded with
dsv3.load_model (issue 7). Also: expert-parallel inference loading only the local experts."""
import json
import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

import dsv3
from dsv3.config import preset
from dsv3.fp8.quant import weight_quant
from dsv3.model.moe import MoE
from dsv3.parallel.dist import run_local
from dsv3.parallel.eplb import rebalance_experts
from dsv3.parallel.tensor import TensorParallelMoE, VocabParallelEmbedding, load_parallel_model

# intermediate 384: with tp=2 rank 1's rows of w1 are [192, 384), starting inside the second
# 128-row FP8 block; with tp=4 every slice ends inside a block.
CFG = dict(intermediate_size=384, num_hidden_layers=3, first_k_dense_replace=1)
QUANTIZED = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
             "down_proj")


def make_checkpoints(root):
    torch.manual_seed(0)
    model = dsv3.Transformer(preset("tiny").replace(**CFG)).init_weights(std=0.1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MoE):
                m.gate.bias.normal_(0, 0.05)
    plain = os.path.join(root, "plain")
    dsv3.save_model(model, plain, max_shard_bytes=1 << 20)  # sharded, with an index
    # FP8: the released format (E4M3 128x128 blocks + weight_scale_inv), written here by hand
    fp8 = os.path.join(root, "fp8")
    os.makedirs(fp8)
    with open(os.path.join(plain, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    with open(os.path.join(fp8, "config.json"), "w") as f:
        json.dump(cfg, f)
    sd = {}
    for file in sorted(os.listdir(plain)):
        if file.endswith(".safetensors"):
            sd.update(load_file(os.path.join(plain, file)))
    out = {}
    for name, t in sd.items():
        if name.endswith(".weight") and name.split(".")[-2] in QUANTIZED and "shared_head" not in name:
            q, s = weight_quant(t)
            out[name], out[name + "_scale_inv"] = q, s
        else:
            out[name] = t
    save_file(out, os.path.join(fp8, "model.safetensors"), metadata={"format": "pt"})
    return plain, fp8


def checkpoint_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def tp_worker(rank, world, plain, fp8):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 512, (3, 17), generator=g)
    prompts = [tokens[0, :5].tolist(), tokens[1, :9].tolist()]
    out = {}
    for tag, path in (("plain", plain), ("fp8", fp8)):
        ref = dsv3.load_model(path, dtype=torch.float32)
        model = load_parallel_model(path, tp_group=dist.group.WORLD, dtype=torch.float32)
        with torch.no_grad():
            want, got = ref(tokens), model(tokens)
            out[f"{tag}_logits"] = (got - want).abs().max().item()
            out[f"{tag}_scale"] = want.abs().max().item()
            h = ref.hidden(tokens[:, :16])
            hp = model.hidden(tokens[:, :16])
            out[f"{tag}_mtp"] = (model.logits(model.mtp_hidden(hp, tokens)[0])
                                 - ref.logits(ref.mtp_hidden(h, tokens)[0])).abs().max().item()
        out[f"{tag}_bytes"] = model.bytes_read
        # what this rank holds (fp32 checkpoint: the bytes it had to read, no more)
        out[f"{tag}_held"] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        if tag == "plain":
            # cached decode (absorbed MLA on the TP heads, full latent cache per rank) = greedy reference
            out["generate_equal"] = (dsv3.generate(model, prompts, 8) == dsv3.generate(ref, prompts, 8))
            out["shards"] = dict(
                embed=tuple(model.embed.weight.shape), heads=model.layers[0].attn.n_heads,
                experts=model.layers[1].ffn.experts.w1.shape[0],
                w1=tuple(model.layers[0].ffn.w1.weight.shape),
                types=(type(model.embed) is VocabParallelEmbedding, type(model.layers[1].ffn) is TensorParallelMoE),
                frozen=not any(p.requires_grad for p in model.parameters()))
    # expert-parallel inference: each rank loads only its experts and serves its own requests
    model = load_parallel_model(plain, ep_group=dist.group.WORLD, dtype=torch.float32)
    ref = dsv3.load_model(plain, dtype=torch.float32)
    with torch.no_grad():
        mine = tokens[rank % 3: rank % 3 + 1]
        out["ep_logits"] = (model(mine) - ref(mine)).abs().max().item()
    out["ep_bytes"] = model.bytes_read
    out["ep_held"] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    # ... and with an EPLB placement: redundant replicas read from the same checkpoint experts
    loads = torch.rand(3, 8, generator=torch.Generator().manual_seed(9)) + torch.arange(8.0)  # 3 MoE layers
    phy2log = rebalance_experts(loads, 8 + world, 4, 1, world)[0]
    model = load_parallel_model(plain, ep_group=dist.group.WORLD, dtype=torch.float32, phy2log=phy2log)
    with torch.no_grad():
        out["eplb_logits"] = (model(mine) - ref(mine)).abs().max().item()
    out["eplb_slots"] = model.layers[1].ffn.local_logical.tolist()
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return make_checkpoints(str(tmp_path_factory.mktemp("tp")))


@pytest.fixture(scope="module", params=[2, 4], ids=["tp2", "tp4"])
def results(request, checkpoints):
    return request.param, run_local(tp_worker, request.param, *checkpoints), checkpoints


def test_logits_equal_single_process(results):
    world, res, _ = results
    for r in res:
        assert r["plain_scale"] > 0.1
        assert r["plain_logits"] <= 1e-5 and r["plain_mtp"] <= 1e-5


def test_fp8_checkpoint_slices(results):
    # the same dequantized weights whether a rank reads a slice's covering blocks or load_model the whole
    world, res, _ = results
    for r in res:
        assert r["fp8_logits"] <= 1e-5 and r["fp8_mtp"] <= 1e-5


def test_generate_equal_single_process(results):
    world, res, _ = results
    assert all(r["generate_equal"] for r in res)


def test_each_rank_reads_only_its_shard(results):
    world, res, (plain, fp8) = results
    total = checkpoint_bytes(plain)
    for r in res:
        s = r["shards"]
        assert s["embed"] == (512 // world, 64) and s["heads"] == 4 // world
        assert s["experts"] == 8 // world and s["w1"] == (384 // world, 64)
        assert all(s["types"]) and s["frozen"]
        # the replicated part (norms, wq_a, wkv_a, gates, eh_proj) is small: a rank reads about 1/tp
        assert r["plain_bytes"] < total * (1 / world + 0.1)
        # exactly the bytes of the shard it holds: no tensor was read whole and then cut
        assert r["plain_bytes"] == r["plain_held"]
        assert r["ep_bytes"] == r["ep_held"] < total
        # FP8: only the blocks covering the slices (E4M3 bytes + fp32 block scales), less than the
        # fp32 shard itself
        assert r["fp8_bytes"] < r["plain_held"]


def test_expert_parallel_inference_loading(results):
    world, res, _ = results
    for r in res:
        assert r["ep_logits"] <= 1e-5 and r["eplb_logits"] <= 1e-5
    slots = [e for r in res for e in r["eplb_slots"]]
    assert len(slots) == 8 + world and sorted(set(slots)) == list(range(8))  # every expert, some twice
