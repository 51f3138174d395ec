"""Tiny random reference models from transformers (the reference nobody here wrote), saved with
save_pretrained so dsv3 reads them through the same loader users use."""
import torch

BASE_V3 = dict(
    vocab_size=97, hidden_size=48, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, kv_lora_rank=24,
    q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=16, n_group=4, topk_group=2,
    num_experts_per_tok=2, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
    max_position_embeddings=512, rms_norm_eps=1e-6, num_mtp_layers=0, tie_word_embeddings=False,
)

BASE_V2 = dict(
    vocab_size=97, hidden_size=48, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2, n_routed_experts=8, kv_lora_rank=24,
    q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=16, n_group=4, topk_group=2,
    num_experts_per_tok=3, first_k_dense_replace=1, routed_scaling_factor=1.0, topk_method="greedy",
    max_position_embeddings=512, rms_norm_eps=1e-6,
)


def _randomize(model, seed):
    """transformers' init is tiny (std 0.02): widen it so routing, norms and attention are far from
    uniform, and give the router a non-zero, partly negative correction bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / p.shape[-1] ** 0.5) if p.dim() > 1
                        else torch.randn(p.shape, generator=g) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model


def make_v3(path, seed=0, **overrides):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    cfg = DeepseekV3Config(**{**BASE_V3, **overrides})
    model = _randomize(DeepseekV3ForCausalLM(cfg).float().eval(), seed)
    model.save_pretrained(path)
    return model


def make_v2(path, seed=0, **overrides):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(seed)
    cfg = DeepseekV2Config(**{**BASE_V2, **overrides})
    model = _randomize(DeepseekV2ForCausalLM(cfg).float().eval(), seed)
    model.save_pretrained(path)
    return model


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
