"""Hugging Face folders (config.json + safetensors, the released DeepSeek format) <-> dsv3 modules.

ONE table (`_LAYER_NAMES`) maps a decoder layer's checkpoint names to dsv3's. Routed experts are
one tensor per expert in the checkpoint and stacked (E, out, in) in dsv3. The MTP module k lives at
`model.layers.{num_hidden_layers + k - 1}` with its own `enorm`, `hnorm`, `eh_proj`, `shared_head.norm`
and copies of the shared embedding / head (`embed_tokens`, `shared_head.head`), which are checked
on load and written on save. FP8 tensors with a `weight_scale_inv` partner are dequantized on load.
"""
import json
import os
import re

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dsv3.config import ModelConfig
from dsv3.fp8.quant import weight_dequant
from dsv3.model.transformer import Transformer

# (checkpoint suffix inside `model.layers.{i}.`, dsv3 suffix inside a Block); `{e}` is an expert index
_LAYER_NAMES = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("self_attn.q_proj.weight", "attn.wq.weight"),
    ("self_attn.q_a_proj.weight", "attn.wq_a.weight"),
    ("self_attn.q_a_layernorm.weight", "attn.q_norm.weight"),
    ("self_attn.q_b_proj.weight", "attn.wq_b.weight"),
    ("self_attn.kv_a_proj_with_mqa.weight", "attn.wkv_a.weight"),
    ("self_attn.kv_a_layernorm.weight", "attn.kv_norm.weight"),
    ("self_attn.kv_b_proj.weight", "attn.wkv_b.weight"),
    ("self_attn.o_proj.weight", "attn.wo.weight"),
    ("mlp.gate_proj.weight", "ffn.w1.weight"),
    ("mlp.up_proj.weight", "ffn.w3.weight"),
    ("mlp.down_proj.weight", "ffn.w2.weight"),
    ("mlp.gate.weight", "ffn.gate.weight"),
    ("mlp.gate.e_score_correction_bias", "ffn.gate.bias"),
    ("mlp.shared_experts.gate_proj.weight", "ffn.shared_experts.w1.weight"),
    ("mlp.shared_experts.up_proj.weight", "ffn.shared_experts.w3.weight"),
    ("mlp.shared_experts.down_proj.weight", "ffn.shared_experts.w2.weight"),
    ("mlp.experts.{e}.gate_proj.weight", "ffn.experts.w1"),
    ("mlp.experts.{e}.up_proj.weight", "ffn.experts.w3"),
    ("mlp.experts.{e}.down_proj.weight", "ffn.experts.w2"),
]
_TOP_NAMES = [("model.embed_tokens.weight", "embed.weight"), ("model.norm.weight", "norm.weight"),
              ("lm_head.weight", "head.weight")]
_MTP_NAMES = [("enorm.weight", "enorm.weight"), ("hnorm.weight", "hnorm.weight"),
              ("eh_proj.weight", "eh_proj.weight"), ("shared_head.norm.weight", "norm.weight")]
_MTP_SHARED = {"embed_tokens.weight": "embed.weight", "shared_head.head.weight": "head.weight"}

_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT_RE = re.compile(r"mlp\.experts\.(\d+)\.(.+)")
_SUFFIX_TO_DSV3 = {hf: ds for hf, ds in _LAYER_NAMES if "{e}" not in hf}
_SUFFIX_TO_HF = {ds: hf for hf, ds in _LAYER_NAMES if "{e}" not in hf}
_EXPERT_TO_DSV3 = {hf.split("{e}.")[1]: ds for hf, ds in _LAYER_NAMES if "{e}" in hf}  # "gate_proj.weight" -> w1
_EXPERT_TO_HF = {ds: hf for hf, ds in _LAYER_NAMES if "{e}" in hf}


def hf_to_dsv3(name: str, cfg: ModelConfig):
    """Checkpoint name -> (dsv3 name, expert index or None), ("shared", dsv3 name) for MTP copies of
    the embedding/head, or None when the name means nothing to dsv3."""
    for hf, ds in _TOP_NAMES:
        if name == hf:
            return ds, None
    m = _LAYER_RE.fullmatch(name)
    if not m:
        return None
    i, rest = int(m.group(1)), m.group(2)
    n = cfg.num_hidden_layers
    if i < n:
        prefix = f"layers.{i}."
    elif i < n + cfg.num_nextn_predict_layers:
        k = i - n
        for hf, ds in _MTP_NAMES:
            if rest == hf:
                return f"mtp.{k}.{ds}", None
        if rest in _MTP_SHARED:
            return "shared", _MTP_SHARED[rest]
        prefix = f"mtp.{k}.block."
    else:
        return None
    if rest in _SUFFIX_TO_DSV3:
        return prefix + _SUFFIX_TO_DSV3[rest], None
    e = _EXPERT_RE.fullmatch(rest)
    if e and e.group(2) in _EXPERT_TO_DSV3:
        return prefix + _EXPERT_TO_DSV3[e.group(2)], int(e.group(1))
    return None


def dsv3_to_hf(model: Transformer, mtp_shared_copies: bool = True):
    """Yields (checkpoint name, tensor) for every tensor of the model, experts unstacked."""
    cfg = model.config
    n = cfg.num_hidden_layers
    sd = model.state_dict()
    for hf, ds in _TOP_NAMES:
        if ds == "head.weight" and cfg.tie_word_embeddings:
            continue
        yield hf, sd[ds]
    for name, t in sd.items():
        m = re.fullmatch(r"(layers\.(\d+)|mtp\.(\d+)\.block)\.(.+)", name)
        if m:
            layer = int(m.group(2)) if m.group(2) is not None else n + int(m.group(3))
            rest = m.group(4)
            if rest in _SUFFIX_TO_HF:
                yield f"model.layers.{layer}.{_SUFFIX_TO_HF[rest]}", t
                continue
            assert rest in _EXPERT_TO_HF, f"no checkpoint name for {name}"
            for e in range(t.shape[0]):
                yield f"model.layers.{layer}." + _EXPERT_TO_HF[rest].format(e=e), t[e]
            continue
        m = re.fullmatch(r"mtp\.(\d+)\.(.+)", name)
        if m:
            k, rest = int(m.group(1)), m.group(2)
            hf = {ds: hf for hf, ds in _MTP_NAMES}[rest]
            yield f"model.layers.{n + k}.{hf}", t
    if mtp_shared_copies:
        for k in range(cfg.num_nextn_predict_layers):
            for hf, ds in _MTP_SHARED.items():
                yield f"model.layers.{n + k}.{hf}", sd[ds]


# ---------------------------------------------------------------- loading

def _weight_files(path: str) -> dict[str, str]:
    """checkpoint name -> shard file, from the index or by reading every shard's header."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                wm = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        for file in set(wm.values()):
            if not os.path.exists(os.path.join(path, file)):
                raise ValueError(f"{index} names shard {file!r}, which is missing from {path}")
        return {k: os.path.join(path, v) for k, v in wm.items()}
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"no .safetensors files in {path}")
    out = {}
    for f in files:
        for k in _open(os.path.join(path, f)).keys():
            out[k] = os.path.join(path, f)
    return out


def _open(file: str):
    try:
        return safe_open(file, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read {file}: {e} (truncated or corrupt safetensors file?)") from None


def _get(handles, file: str, name: str) -> torch.Tensor:
    if file not in handles:
        handles[file] = _open(file)
    try:
        return handles[file].get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"cannot read tensor {name!r} from {file}: {e}") from None
    except Exception as e:  # safetensors reports a missing name with a plain exception type
        raise ValueError(f"cannot read tensor {name!r} from {file}: {e}") from None


def load_state_dict(path: str, cfg: ModelConfig, model: Transformer, dtype: torch.dtype) -> dict:
    """Reads every tensor of the folder into dsv3 names, checking names and shapes against `model`
    (which may live on the meta device)."""
    expected = {k: v for k, v in model.state_dict().items()}
    files = _weight_files(path)
    handles: dict = {}
    out: dict[str, torch.Tensor] = {}
    filled_experts: dict[str, set] = {}
    unexpected = []
    for name, file in sorted(files.items()):
        if name.endswith("_scale_inv"):
            base = name[: -len("_scale_inv")]
            if base not in files:
                unexpected.append((name, file))
            continue
        target = hf_to_dsv3(name, cfg)
        if target is None:
            unexpected.append((name, file))
            continue
        t = _get(handles, file, name)
        if t.dtype == torch.float8_e4m3fn:
            sname = name + "_scale_inv"
            if sname not in files:
                raise ValueError(f"FP8 tensor {name!r} in {file} has no {sname!r} in the checkpoint")
            t = weight_dequant(t, _get(handles, files[sname], sname), dtype=torch.float32)
        ds, e = target
        if not check_shape(name, file, t.shape, ds, e, expected):
            continue
        ref = expected[ds]
        # the router bias stays fp32 (selection is sensitive to small bias differences)
        tdtype = torch.float32 if ds.endswith("gate.bias") else dtype
        if e is not None:
            if not 0 <= e < ref.shape[0]:
                unexpected.append((name, file))
                continue
            if ds not in out:
                out[ds] = torch.empty(ref.shape, dtype=tdtype)
                filled_experts[ds] = set()
            out[ds][e].copy_(t)
            filled_experts[ds].add(e)
        else:
            out[ds] = t.to(tdtype)
    check_complete(path, expected, out, filled_experts, unexpected)
    return out


def check_shape(name: str, file: str, shape, ds: str, e, expected: dict) -> bool:
    """A checkpoint tensor's shape against the model's (one expert's slice for stacked experts).
    False for an MTP copy of the embedding / head: checked, then skipped (the main one is used)."""
    if ds == "shared":
        ref = tuple(expected[e].shape)
        if tuple(shape) != ref:
            raise ValueError(f"shape mismatch for {name} in {file}: checkpoint {tuple(shape)}, model {ref}")
        return False
    ref = expected[ds].shape
    want = tuple(ref[1:]) if e is not None else tuple(ref)
    if tuple(shape) != want:
        raise ValueError(f"shape mismatch for {name} in {file}: checkpoint {tuple(shape)}, model {want} "
                         f"(dsv3 {ds}); does config.json match the weights?")
    return True


def check_complete(path, expected: dict, out: dict, filled_experts: dict, unexpected: list):
    """The loader's verdict: checkpoint tensors dsv3 has no place for, then model tensors (or single
    experts of a stacked tensor) the checkpoint did not provide. Each error names tensors and files."""
    if unexpected:
        names = ", ".join(f"{n} (in {os.path.basename(f)})" for n, f in unexpected[:5])
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise ValueError(f"unexpected tensors in {path}: {names}{more}")
    missing = [k for k in expected if k not in out]
    for ds, got in filled_experts.items():
        lost = sorted(set(range(expected[ds].shape[0])) - got)
        if lost:
            missing.append(f"{ds} experts {lost[:8]}")
    if missing:
        raise ValueError(f"missing tensors in {path}: {', '.join(missing[:8])}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))


def load_model(path, dtype: torch.dtype = torch.bfloat16, device="cpu", fp8: bool = False) -> Transformer:
    """Loads an HF-format folder (config.json + one or sharded safetensors) into a dsv3 Transformer.
    The model is built on the meta device and the loaded tensors are assigned, not copied.
    fp8=True keeps the linear weights in FP8 with their block scales (dsv3.fp8.resident): an FP8
    checkpoint as released, a BF16/FP32 one quantized while loading."""
    if fp8:
        from dsv3.fp8.resident import load_fp8_model  # imports this module: keep the import here

        return load_fp8_model(path, dtype=dtype, device=device)
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a checkpoint folder")
    cfg = ModelConfig.from_hf(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    sd = load_state_dict(path, cfg, model, dtype)
    model.load_state_dict(sd, assign=True, strict=True)
    if cfg.tie_word_embeddings:
        model.head.weight = model.embed.weight
    model.rotary.reset()
    return model.to(device).eval()


# ---------------------------------------------------------------- saving

def save_model(model: Transformer, path, max_shard_bytes: int = 4 << 30, mtp_shared_copies: bool = True):
    """Writes config.json and safetensors shards (with an index when there is more than one) in the
    released format, which transformers' DeepseekV3ForCausalLM / DeepseekV2ForCausalLM load."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    cfg = model.config
    hf = cfg.to_hf()
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) == 1:
        hf["torch_dtype"] = str(next(iter(dtypes))).replace("torch.", "")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    # pass 1: plan the shards from sizes only; pass 2: copy and write one shard at a time
    plan, size = [[]], 0
    for name, t in dsv3_to_hf(model, mtp_shared_copies):
        nbytes = t.numel() * t.element_size()
        if plan[-1] and size + nbytes > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += nbytes
    names = {n: i for i, shard in enumerate(plan) for n in shard}
    fnames = ["model.safetensors"] if len(plan) == 1 else \
        [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    cur, shard_i, weight_map, total = {}, 0, {}, 0
    for name, t in dsv3_to_hf(model, mtp_shared_copies):
        if names[name] != shard_i:
            save_file(cur, os.path.join(path, fnames[shard_i]), metadata={"format": "pt"})
            cur, shard_i = {}, names[name]
        # own storage: expert slices and shared copies may not alias each other in a safetensors file
        cur[name] = t.detach().to("cpu").contiguous().clone()
        weight_map[name] = fnames[shard_i]
        total += t.numel() * t.element_size()
    save_file(cur, os.path.join(path, fnames[shard_i]), metadata={"format": "pt"})
    if len(plan) > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return path
