"""dsv3 against transformers' DeepseekV3ForCausalLM / DeepseekV2ForCausalLM (fp32, CPU), through
save_pretrained -> dsv3.load_model, the loader users use."""
import zlib

import pytest
import torch

import dsv3
from hf_ref import YARN, make_v2, make_v3

TOL = 1e-4

V3_CASES = {
    "groups+bias": {},
    "yarn": dict(rope_parameters=YARN),
    "dense0": dict(first_k_dense_replace=0),
    "dense2": dict(first_k_dense_replace=2),
    "top1": dict(num_experts_per_tok=1),
    "top4": dict(num_experts_per_tok=4, n_group=2, topk_group=1),
    "no-q-lora": dict(q_lora_rank=None),
    # third-party models on this architecture (e.g. 384 experts, one group): here 16 experts, n_group 1
    "one-group": dict(n_routed_experts=16, n_group=1, topk_group=1, num_experts_per_tok=4),
}


def _seed(case: str) -> int:
    """A fixed seed per case. (It was hash(case) % 1000, which Python salts per process: one CI run
    drew seed 384, where one token's two best biased router scores in layer 2 differ by 6e-8, one fp32
    ulp, and the two libraries' router GEMMs round that token's logits differently, so each picks a
    different expert: a tie in fp32, not a disagreement about the routing rule.)"""
    return zlib.crc32(case.encode()) % 1000


@pytest.mark.parametrize("case", list(V3_CASES))
def test_v3_logits_match_transformers(tmp_path, case):
    ref = make_v3(tmp_path, seed=_seed(case), **V3_CASES[case])
    model = dsv3.load_model(tmp_path, dtype=torch.float32)
    x = torch.randint(0, ref.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(x).logits
        got = model(x)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= TOL


def test_v3_bias_changes_routing(tmp_path):
    # the test above would be blind to a dropped bias if the bias never changed a decision
    ref = make_v3(tmp_path, seed=3)
    model = dsv3.load_model(tmp_path, dtype=torch.float32)
    x = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(x)
        for layer in model.layers:
            if hasattr(layer.ffn, "gate"):
                layer.ffn.gate.bias.zero_()
        assert (model(x) - base).abs().max() > 1e-3


V2_CASES = {
    "greedy": {},
    "group-limited": dict(topk_method="group_limited_greedy"),
    "yarn-mscale": dict(rope_parameters={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}),
    "q-lora": dict(q_lora_rank=32, first_k_dense_replace=0),
}


@pytest.mark.parametrize("case", list(V2_CASES))
def test_v2_logits_match_transformers(tmp_path, case):
    ref = make_v2(tmp_path, seed=7, **V2_CASES[case])
    model = dsv3.load_model(tmp_path, dtype=torch.float32)
    assert model.config.scoring_func == "softmax"
    x = torch.randint(0, ref.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(x).logits
        got = model(x)
    assert (got - want).abs().max().item() <= TOL


def test_greedy_generate_matches_transformers(tmp_path):
    ref = make_v3(tmp_path, seed=11, rope_parameters=YARN)
    model = dsv3.load_model(tmp_path, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, 97, (n,), generator=g).tolist() for n in (7, 3, 12)]
    ours = dsv3.generate(model, prompts, max_new_tokens=16, eos_id=None)
    for p, got in zip(prompts, ours):
        with torch.no_grad():
            want = ref.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                pad_token_id=0, min_new_tokens=16)[0, len(p):].tolist()
        assert got == want


def test_generate_eos_stops_and_batch_independent(tmp_path):
    make_v3(tmp_path, seed=12)
    model = dsv3.load_model(tmp_path, dtype=torch.float32)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(2, 97, (n,), generator=g).tolist() for n in (5, 9, 2, 14)]
    solo = [dsv3.generate(model, [p], max_new_tokens=12)[0] for p in prompts]
    assert dsv3.generate(model, prompts, max_new_tokens=12) == solo
    # stop on the token a sequence emits at step 3: it is included and nothing follows
    eos = solo[1][3]
    out = dsv3.generate(model, prompts, max_new_tokens=12, eos_id=eos)
    first = solo[1].index(eos)
    assert out[1] == solo[1][:first + 1]
    for o, s in zip(out, solo):
        assert o == (s[:s.index(eos) + 1] if eos in s else s)


def test_sampling_is_seeded(tmp_path):
    make_v3(tmp_path, seed=13)
    model = dsv3.load_model(tmp_path, dtype=torch.float32)
    p = [[3, 4, 5, 6]]
    a = dsv3.generate(model, p, 20, temperature=1.0, top_p=0.9, seed=1)
    b = dsv3.generate(model, p, 20, temperature=1.0, top_p=0.9, seed=1)
    c = dsv3.generate(model, p, 20, temperature=1.0, top_p=0.9, seed=2)
    assert a == b and a != c


def test_transformers_loads_what_save_model_writes(tmp_path):
    for make, cls_name in ((make_v3, "DeepseekV3ForCausalLM"), (make_v2, "DeepseekV2ForCausalLM")):
        import transformers

        src, dst = tmp_path / f"src_{cls_name}", tmp_path / f"dst_{cls_name}"
        ref = make(src, seed=21)
        model = dsv3.load_model(src, dtype=torch.float32)
        dsv3.save_model(model, dst)
        back, info = getattr(transformers, cls_name).from_pretrained(dst, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        x = torch.randint(0, 97, (1, 17))
        with torch.no_grad():
            assert torch.equal(back.float()(x).logits, ref(x).logits)
