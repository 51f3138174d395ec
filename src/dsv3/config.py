"""ModelConfig: one frozen dataclass for the whole DeepSeek-V2/V3 family.

Field names are those of the released config.json files (and so of transformers'
DeepseekV3Config); the YaRN fields are flattened out of `rope_scaling` under the names
the official inference code uses (rope_factor, original_seq_len, beta_fast, ...).
"""
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432          # dense MLP of the first `first_k_dense_replace` layers
    moe_intermediate_size: int = 2048       # one routed / shared expert
    num_hidden_layers: int = 61
    num_nextn_predict_layers: int = 1       # MTP depth D
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    # MLA
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536          # None: plain wq (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # MoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    # RoPE / YaRN
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_interleave: bool = True            # DeepSeek lays rotary dims out as (x0, x1), (x2, x3), ...
    rope_scaling_type: str | None = "yarn"  # None or "yarn"
    rope_factor: float = 40.0
    original_seq_len: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    # misc
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    initializer_range: float = 0.02
    torch_dtype: str = "bfloat16"
    # The released FP8 format: {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], ...}.
    # Kept as JSON text so the dataclass stays hashable.
    quantization_config: str | None = field(default=None, repr=False)

    def __post_init__(self):
        self.validate()

    # ---- derived sizes ----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def dim(self) -> int:
        return self.hidden_size

    def is_moe_layer(self, i: int) -> bool:
        return (self.n_routed_experts > 0 and i >= self.first_k_dense_replace
                and i % self.moe_layer_freq == 0)

    @property
    def softmax_scale(self) -> float:
        # qk_head_dim^-0.5, times mscale^2 under YaRN (official inference code; transformers' yarn_apply_mscale)
        scale = self.qk_head_dim ** -0.5
        if self.rope_scaling_type == "yarn" and self.mscale_all_dim and self.rope_factor > 1:
            m = 0.1 * self.mscale_all_dim * math.log(self.rope_factor) + 1.0
            scale = scale * m * m
        return scale

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer by the absorbed MLA path."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def fp8(self) -> dict | None:
        return json.loads(self.quantization_config) if self.quantization_config else None

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # ---- validation: a wrong config is a clear error, not a shape mismatch later ----
    def validate(self):
        def bad(field_, msg):
            raise ValueError(f"invalid ModelConfig.{field_}={getattr(self, field_)!r}: {msg}")

        for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                  "qk_rope_head_dim", "v_head_dim", "moe_layer_freq"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                bad(f, "must be a positive integer")
        for f in ("num_nextn_predict_layers", "first_k_dense_replace", "n_routed_experts", "n_shared_experts",
                  "qk_nope_head_dim"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 0:
                bad(f, "must be a non-negative integer")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            bad("q_lora_rank", "must be a positive integer or null")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "rotary dims come in pairs, must be even")
        if self.scoring_func not in SCORING_FUNCS:
            bad("scoring_func", f"unknown scoring function; expected one of {SCORING_FUNCS}")
        if self.topk_method not in TOPK_METHODS:
            bad("topk_method", f"unknown top-k method; expected one of {TOPK_METHODS}")
        if self.hidden_act != "silu":
            bad("hidden_act", "DeepSeek models use 'silu' (SwiGLU)")
        if self.rope_scaling_type not in (None, "yarn"):
            bad("rope_scaling_type", "only YaRN rope scaling is supported (or none)")
        if self.rope_scaling_type == "yarn" and self.rope_factor <= 0:
            bad("rope_factor", "must be > 0")
        if self.n_routed_experts > 0 and self.first_k_dense_replace < self.num_hidden_layers:
            if self.n_group <= 0:
                bad("n_group", "must be >= 1")
            if self.n_routed_experts % self.n_group:
                bad("n_routed_experts", f"not divisible by n_group={self.n_group}")
            if not 1 <= self.topk_group <= self.n_group:
                bad("topk_group", f"must be between 1 and n_group={self.n_group}")
            if not 1 <= self.num_experts_per_tok:
                bad("num_experts_per_tok", "must be >= 1")
            reachable = self.n_routed_experts if self.topk_method == "greedy" else \
                self.topk_group * (self.n_routed_experts // self.n_group)
            if self.num_experts_per_tok > reachable:
                bad("num_experts_per_tok", f"larger than the {reachable} experts the kept groups hold "
                    f"(topk_group={self.topk_group} x {self.n_routed_experts // self.n_group} experts per group)")
            if self.topk_method == "noaux_tc" and self.n_routed_experts // self.n_group < 2 and self.n_group > 1:
                bad("n_group", "noaux_tc scores a group by its top-2 experts: groups need >= 2 experts")
            if self.moe_intermediate_size <= 0:
                bad("moe_intermediate_size", "must be a positive integer")
        if self.first_k_dense_replace > 0 and self.intermediate_size <= 0:
            bad("intermediate_size", "must be a positive integer")

    # ---- HF config.json <-> ModelConfig ----
    @classmethod
    def from_hf(cls, path_or_dict) -> "ModelConfig":
        if isinstance(path_or_dict, (str, os.PathLike)):
            p = os.fspath(path_or_dict)
            if os.path.isdir(p):
                p = os.path.join(p, "config.json")
            try:
                with open(p) as f:
                    d = json.load(f)
            except FileNotFoundError:
                raise ValueError(f"no config.json at {p}") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{p} is not valid JSON: {e}") from None
        else:
            d, p = dict(path_or_dict), "<dict>"
        if not isinstance(d, dict):
            raise ValueError(f"{p}: config must be a JSON object")
        mt = d.get("model_type", "deepseek_v3")
        v2 = mt == "deepseek_v2"
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: d[k] for k in names if k in d and k not in ("quantization_config",)}
        # V2 defaults differ from V3's where the V2 config.json leaves them out.
        if v2:
            kw.setdefault("scoring_func", "softmax")
            kw.setdefault("topk_method", "greedy")
            kw.setdefault("norm_topk_prob", False)
            kw.setdefault("routed_scaling_factor", 1.0)
            kw.setdefault("num_nextn_predict_layers", 0)
        kw.setdefault("num_nextn_predict_layers", d.get("num_mtp_layers", 0))
        if "n_routed_experts" in d and d["n_routed_experts"] is None:
            kw["n_routed_experts"] = 0
        # V2-Lite: greedy routing, n_group/topk_group null -> one group holding every expert
        if d.get("n_group") is None:
            kw["n_group"] = 1
        if d.get("topk_group") is None:
            kw["topk_group"] = kw["n_group"]
        if "torch_dtype" not in d and "dtype" in d:
            kw["torch_dtype"] = d["dtype"]
        if isinstance(kw.get("torch_dtype"), str):
            kw["torch_dtype"] = kw["torch_dtype"].replace("torch.", "")
        # transformers >= 5 writes rope_parameters (with rope_theta inside); older files rope_scaling + rope_theta.
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"{p}: rope_scaling must be an object or null")
        if "rope_theta" in rope and "rope_theta" not in d:
            kw["rope_theta"] = rope["rope_theta"]
        rtype = rope.get("rope_type", rope.get("type"))
        if rtype in (None, "default"):
            kw["rope_scaling_type"] = None
        elif rtype == "yarn":
            kw["rope_scaling_type"] = "yarn"
            kw["rope_factor"] = float(rope.get("factor", 1.0))
            kw["original_seq_len"] = int(rope.get("original_max_position_embeddings",
                                                  d.get("max_position_embeddings", 4096)))
            kw["beta_fast"] = float(rope.get("beta_fast") or 32)
            kw["beta_slow"] = float(rope.get("beta_slow") or 1)
            kw["mscale"] = float(rope.get("mscale") or 0.0)
            kw["mscale_all_dim"] = float(rope.get("mscale_all_dim") or 0.0)
        else:
            raise ValueError(f"{p}: rope_scaling type {rtype!r} is not supported (only 'yarn' or none)")
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        q = d.get("quantization_config")
        if q is not None:
            if not isinstance(q, dict):
                raise ValueError(f"{p}: quantization_config must be an object")
            if q.get("quant_method") not in ("fp8", None):
                raise ValueError(f"{p}: quantization_config.quant_method {q.get('quant_method')!r} "
                                 "is not supported (only DeepSeek's block FP8)")
            kw["quantization_config"] = json.dumps(q, sort_keys=True)
        try:
            return cls(**kw)
        except TypeError as e:
            raise ValueError(f"{p}: {e}") from None

    def to_hf(self) -> dict:
        """A config.json dict that both transformers (model_type deepseek_v3 / deepseek_v2) and dsv3 read."""
        v2 = self.scoring_func == "softmax"
        d = {
            "architectures": ["DeepseekV2ForCausalLM" if v2 else "DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v2" if v2 else "deepseek_v3",
        }
        for f in dataclasses.fields(self):
            if f.name in ("rope_scaling_type", "rope_factor", "original_seq_len", "beta_fast", "beta_slow",
                          "mscale", "mscale_all_dim", "quantization_config"):
                continue
            d[f.name] = getattr(self, f.name)
        d["num_key_value_heads"] = self.num_attention_heads
        d["n_group"], d["topk_group"] = self.n_group, self.topk_group
        if self.rope_scaling_type == "yarn":
            d["rope_scaling"] = {
                "type": "yarn", "rope_type": "yarn", "factor": self.rope_factor,
                "original_max_position_embeddings": self.original_seq_len,
                "beta_fast": self.beta_fast, "beta_slow": self.beta_slow,
                "mscale": self.mscale, "mscale_all_dim": self.mscale_all_dim,
            }
        else:
            d["rope_scaling"] = None
        if self.quantization_config:
            d["quantization_config"] = json.loads(self.quantization_config)
        return d

    # ---- parameter counts (for `dsv3 info` and the presets' sanity) ----
    def num_params(self) -> dict:
        h, nh = self.hidden_size, self.num_attention_heads
        if self.q_lora_rank is None:
            q = h * nh * self.qk_head_dim
        else:
            q = h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * nh * self.qk_head_dim
        attn = (q + h * self.kv_cache_dim + self.kv_lora_rank
                + self.kv_lora_rank * nh * (self.qk_nope_head_dim + self.v_head_dim) + nh * self.v_head_dim * h)
        norms = 2 * h
        dense = 3 * h * self.intermediate_size
        expert = 3 * h * self.moe_intermediate_size
        moe_total = (self.n_routed_experts + self.n_shared_experts) * expert + self.n_routed_experts * h
        moe_active = (self.num_experts_per_tok + self.n_shared_experts) * expert + self.n_routed_experts * h
        n_moe = sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))
        n_dense = self.num_hidden_layers - n_moe
        emb = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        layers_total = self.num_hidden_layers * (attn + norms) + n_dense * dense + n_moe * moe_total
        layers_active = self.num_hidden_layers * (attn + norms) + n_dense * dense + n_moe * moe_active
        # MTP module: enorm, hnorm, eh_proj (2h -> h), one MoE block, shared_head.norm; embedding/head shared
        mtp_block = attn + norms + (moe_total if self.n_routed_experts else dense)
        mtp = self.num_nextn_predict_layers * (3 * h + 2 * h * h + mtp_block)
        return {
            "total": emb + head + layers_total + h,
            "active": emb + head + layers_active + h,
            "mtp": mtp,
        }


def _preset(**kw) -> ModelConfig:
    return ModelConfig(**kw)


PRESETS = {
    # Unit tests: every feature on (q-LoRA, YaRN, dense + MoE layers, groups, MTP), tiny sizes.
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_nextn_predict_layers=1, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=32,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, max_position_embeddings=4096,
        rope_scaling_type="yarn", rope_factor=4.0, original_seq_len=1024, torch_dtype="float32",
    ),
    # Benchmarks: ~200M total parameters with the real 129,280-token vocabulary.
    "small": dict(
        vocab_size=129280, hidden_size=512, intermediate_size=1408, moe_intermediate_size=256,
        num_hidden_layers=6, num_nextn_predict_layers=1, first_k_dense_replace=1, num_attention_heads=8,
        q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        max_position_embeddings=16384, rope_scaling_type="yarn", rope_factor=4.0, original_seq_len=4096,
        torch_dtype="bfloat16",
    ),
    # Published shapes (deepseek-ai/DeepSeek-V2-Lite and deepseek-ai/DeepSeek-V3 config.json).
    "v2-lite": dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_nextn_predict_layers=0, first_k_dense_replace=1, num_attention_heads=16,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
        scoring_func="softmax", topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0,
        max_position_embeddings=163840, rope_scaling_type="yarn", rope_factor=40.0, original_seq_len=4096,
        mscale=0.707, mscale_all_dim=0.707, bos_token_id=100000, eos_token_id=100001,
    ),
    "v3": dict(
        quantization_config=json.dumps({"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                        "weight_block_size": [128, 128]}, sort_keys=True),
    ),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return _preset(**PRESETS[name])
