"""The engine counts tokens per expert (the input EPLB places replicas from), and the counts are those of
the model's own routing of the same tokens."""
import json

import torch

import dsv3
from dsv3.config import preset
from dsv3.infer.engine import Engine
from dsv3.infer.params import SamplingParams
from dsv3.model.moe import MoE
from dsv3.parallel.eplb import load_loads


def test_engine_expert_loads_match_the_model_routing(tmp_path):
    torch.manual_seed(0)
    model = dsv3.Transformer(preset("tiny").replace(num_nextn_predict_layers=0)).init_weights(std=0.1).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (9, 4, 13)]
    engine = Engine(model, enable_prefix_cache=False, eos_token_id=None, collect_expert_loads=True)
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=6))
    got = engine.expert_loads()
    # every token the engine fed through the model: the prompt and all generated tokens but the last
    seqs = [p + o.token_ids[:-1] for p, o in zip(prompts, outs)]
    want = []
    moes = [layer.ffn for layer in model.layers if isinstance(layer.ffn, MoE)]
    with torch.no_grad():
        for moe in moes:
            moe.record_routing = True
        counts = [torch.zeros(moe.n_experts, dtype=torch.long) for moe in moes]
        for seq in seqs:
            model(torch.tensor([seq]))
            for c, moe in zip(counts, moes):
                c += torch.bincount(moe.last_routing[1].flatten(), minlength=moe.n_experts)
    want = torch.stack(counts)
    assert got.shape == (len(moes), model.config.n_routed_experts)
    assert int(got.sum()) == sum(len(s) for s in seqs) * model.config.num_experts_per_tok * len(moes)
    assert torch.equal(got, want)
    engine.save_expert_loads(tmp_path / "loads.json")
    assert torch.equal(load_loads(str(tmp_path / "loads.json")).long(), want)  # our direct forwards were not counted
    assert json.loads((tmp_path / "loads.json").read_text())["source"] == "dsv3 engine"
