"""ModelConfig reads the config.json of every model of the family (fields as published) and rejects
inconsistent configs with a ValueError naming the field."""
import json

import pytest

from dsv3.config import ModelConfig, preset

FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
# deepseek-ai/DeepSeek-V3 (and R1, same architecture) config.json
V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
    "n_routed_experts": 256, "ep_size": 1, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8,
    "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840,
    "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 1,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "quantization_config": FP8,
}
# DeepSeek-V3.1: power-of-two (UE8M0) scales
V31 = {**V3, "quantization_config": {**FP8, "scale_fmt": "ue8m0"}}
# deepseek-ai/DeepSeek-V2 / V2.5 (softmax, group-limited greedy)
V2 = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
    "hidden_size": 5120, "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_hidden_layers": 60,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 2, "n_routed_experts": 160,
    "routed_scaling_factor": 16.0, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "group_limited_greedy", "n_group": 8,
    "topk_group": 3, "num_experts_per_tok": 6, "moe_layer_freq": 1, "first_k_dense_replace": 1,
    "norm_topk_prob": False, "scoring_func": "softmax", "aux_loss_alpha": 0.003, "seq_aux": True,
    "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "bos_token_id": 100000, "eos_token_id": 100001, "torch_dtype": "bfloat16",
}
# deepseek-ai/DeepSeek-V2-Lite: no q-LoRA, plain greedy, null groups
V2_LITE = {**V2, "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
           "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16, "n_routed_experts": 64,
           "routed_scaling_factor": 1.0, "q_lora_rank": None, "topk_method": "greedy", "n_group": None,
           "topk_group": None, "aux_loss_alpha": 0.001}
# a third-party model on this architecture (Kimi-K2-like: 384 experts in one group)
K2 = {**V3, "n_routed_experts": 384, "n_group": 1, "topk_group": 1, "num_attention_heads": 64,
      "first_k_dense_replace": 1, "routed_scaling_factor": 2.827, "rope_scaling": {**V3["rope_scaling"], "factor": 32},
      "num_nextn_predict_layers": 0, "quantization_config": None}


@pytest.mark.parametrize("d", [V3, V31, V2, V2_LITE, K2], ids=["v3", "v3.1", "v2", "v2-lite", "k2-like"])
def test_family_configs_load_and_roundtrip(d, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = ModelConfig.from_hf(tmp_path)
    assert cfg.hidden_size == d["hidden_size"] and cfg.n_routed_experts == d["n_routed_experts"]
    assert cfg.q_lora_rank == d["q_lora_rank"]
    assert cfg.scoring_func == d["scoring_func"]
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    # the written dict is also what transformers reads
    import transformers

    cls = transformers.DeepseekV2Config if d["model_type"] == "deepseek_v2" else transformers.DeepseekV3Config
    hf = cls(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "model_type")})
    assert hf.n_routed_experts == cfg.n_routed_experts and hf.kv_lora_rank == cfg.kv_lora_rank


def test_v3_facts():
    cfg = ModelConfig.from_hf(V3)
    assert cfg.fp8["weight_block_size"] == [128, 128]
    assert ModelConfig.from_hf(V31).fp8["scale_fmt"] == "ue8m0"
    assert cfg.kv_cache_dim == 576  # kv_lora_rank + qk_rope_head_dim
    # softmax scale: qk_head_dim^-0.5 * mscale^2, mscale = 0.1 * mscale_all_dim * ln(40) + 1
    import math

    m = 0.1 * 1.0 * math.log(40) + 1
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * m * m, rel=1e-12)
    n = cfg.num_params()
    # the paper: 671B total, 37B activated per token; MTP module 14B with its embedding and head copies
    assert 670e9 < n["total"] < 672e9
    assert 37e9 < n["active"] < 38e9
    assert 13e9 < n["mtp"] + 2 * 129280 * 7168 < 14.5e9


def test_presets_are_consistent():
    assert preset("v3") == ModelConfig.from_hf(V3)
    lite = preset("v2-lite")
    assert lite == ModelConfig.from_hf(V2_LITE)
    assert 15.5e9 < lite.num_params()["total"] < 16e9  # published: 15.7B
    assert 180e6 < preset("small").num_params()["total"] < 230e6
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")


@pytest.mark.parametrize("change,field", [
    (dict(n_routed_experts=250), "n_routed_experts"),           # not divisible by n_group=8
    (dict(num_experts_per_tok=80), "num_experts_per_tok"),      # more than the kept groups hold (see below)
    (dict(topk_group=9), "topk_group"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(topk_method="top1"), "topk_method"),
    (dict(qk_rope_head_dim=63), "qk_rope_head_dim"),
    (dict(hidden_size=0), "hidden_size"),
])
def test_inconsistent_configs_name_the_field(change, field):
    d = {**V3, **change}
    if field == "num_experts_per_tok":
        d.update(n_routed_experts=64, n_group=8, topk_group=4)  # 4 kept groups x 8 experts = 32 < 80
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_hf(d)


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**V3, "rope_scaling": {"type": "dynamic", "factor": 2}}))
    with pytest.raises(ValueError, match="rope_scaling type"):
        ModelConfig.from_hf(tmp_path)
