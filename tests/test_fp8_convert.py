"""`dsv3 convert` on checkpoints made by transformers (tiny random DeepseekV3ForCausalLM, fp32).

References: transformers' own loader (from_pretrained must load the BF16 output with no missing or
unexpected keys; with accelerate installed it also reads our FP8 output through its fine-grained
FP8 integration), the released quantization_config, and direct weight_dequant on the FP8 tensors.
Sizes make ragged 128-blocks appear (hidden 160, intermediate 288, expert 144)."""
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

import dsv3.fp8.convert as conv  # noqa: E402
from dsv3.cli import main  # noqa: E402
from dsv3.fp8.quant import weight_dequant, weight_quant  # noqa: E402

RELEASED_QC = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}

RAGGED = dict(vocab_size=256, hidden_size=160, intermediate_size=288, moe_intermediate_size=144,
              num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
              n_group=2, topk_group=1, n_shared_experts=1, num_attention_heads=2, num_key_value_heads=2,
              q_lora_rank=96, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
              max_position_embeddings=128)
# every quantized dim a multiple of 128 or a single block: the shapes transformers' FP8 dequantizer
# handles (it infers the block from weight/scale shapes instead of using ceil-sized 128 blocks)
ALIGNED = dict(RAGGED, hidden_size=256, intermediate_size=256, moe_intermediate_size=128, q_lora_rank=128,
               kv_lora_rank=64, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64)


def _save_tiny(path, cfg_kwargs, seed, **save_kw):
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**cfg_kwargs)).eval()
    with torch.no_grad():  # non-trivial norm weights and routing bias, so a mix-up shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.rand_like(p))
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.rand(cfg_kwargs["n_routed_experts"]))
    model.save_pretrained(path, **save_kw)
    (Path(path) / "tokenizer.json").write_text('{"fake": "tokenizer, copied verbatim"}')
    return model


def _tensors(folder):
    folder = Path(folder)
    out, where = {}, {}
    for f in sorted(folder.glob("*.safetensors")):
        for k, v in load_file(f).items():
            out[k], where[k] = v, f.name
    return out, where


def _bits(t):
    return t.contiguous().view(torch.uint8) if t.element_size() == 1 else t.contiguous().view(torch.int16) \
        if t.element_size() == 2 else t.contiguous().view(torch.int32)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8conv")
    ref = _save_tiny(root / "fp32", RAGGED, 0, max_shard_size="400KB")  # several shards + index
    assert (root / "fp32" / conv.INDEX_NAME).is_file()
    assert main(["convert", "bf16-to-fp8", "--input", str(root / "fp32"), "--output", str(root / "fp8"),
                 "--no-progress"]) == 0
    return root, ref


def test_is_quantized_weight_released_names():
    # the released V3 checkpoint's FP8 set (layer 61 is the MTP module): MLA and MLP/expert linears
    for name in ["model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
                 "model.layers.3.mlp.experts.255.down_proj.weight", "model.layers.3.mlp.shared_experts.up_proj.weight",
                 "model.layers.61.self_attn.o_proj.weight", "model.layers.61.mlp.experts.0.gate_proj.weight"]:
        assert conv.is_quantized_weight(name, (512, 512)), name
    # kept in high precision: embeddings, heads, norms, the router, its bias, the MTP projections
    for name in ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.3.mlp.gate.weight", "model.layers.3.mlp.gate.e_score_correction_bias",
                 "model.layers.0.self_attn.kv_a_layernorm.weight", "model.layers.61.eh_proj.weight",
                 "model.layers.61.shared_head.head.weight", "model.layers.61.enorm.weight"]:
        assert not conv.is_quantized_weight(name, (512, 512)), name


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_bf16_to_fp8_writes_released_format(ckpts, tmp_path, scale_fmt):
    root, _ = ckpts
    out = root / "fp8" if scale_fmt is None else tmp_path / "fp8_ue8m0"
    if scale_fmt:
        conv.convert(root / "fp32", out, "bf16-to-fp8", scale_fmt=scale_fmt, progress=False)
    src, src_where = _tensors(root / "fp32")
    got, got_where = _tensors(out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == (RELEASED_QC if scale_fmt is None else dict(RELEASED_QC, scale_fmt="ue8m0"))
    # layer 0: 5 MLA linears + dense MLP (3); layer 1: 5 MLA + 4 experts x 3 + shared expert (3)
    fp8_names = {k for k, v in got.items() if v.dtype == torch.float8_e4m3fn}
    assert len(fp8_names) == 8 + 20
    assert set(got) == set(src) | {k + "_scale_inv" for k in fp8_names}
    for k, v in src.items():
        if k in fp8_names:
            q, s = weight_quant(v, scale_fmt=scale_fmt)
            assert torch.equal(_bits(got[k]), _bits(q)) and torch.equal(got[k + "_scale_inv"], s), k
            assert got[k + "_scale_inv"].shape == (-(-v.shape[0] // 128), -(-v.shape[1] // 128))
            assert got_where[k + "_scale_inv"] == got_where[k] == src_where[k]
        elif k.endswith("e_score_correction_bias"):
            assert got[k].dtype == torch.float32 and torch.equal(got[k], v)
        else:  # embeddings, lm_head, norms, router gate: high precision, as released
            assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], v.to(torch.bfloat16)), k
    assert {k for k in src if "mlp.gate.weight" in k or "embed" in k or "lm_head" in k}.isdisjoint(fp8_names)
    index = json.loads((out / conv.INDEX_NAME).read_text())
    assert index["weight_map"] == got_where
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in got.values())
    if scale_fmt == "ue8m0":
        s = torch.cat([got[k + "_scale_inv"].flatten() for k in fp8_names])
        assert torch.all(torch.frexp(s).mantissa == 0.5)  # powers of two


def test_fp8_to_bf16_bitwise_and_transformers_loads(ckpts, tmp_path):
    root, ref = ckpts
    out = tmp_path / "bf16"
    assert main(["convert", "fp8-to-bf16", "--input", str(root / "fp8"), "--output", str(out), "--no-progress"]) == 0
    fp8, fp8_where = _tensors(root / "fp8")
    got, got_where = _tensors(out)
    assert set(got) == {k for k in fp8 if not k.endswith("_scale_inv")}
    for k, v in got.items():
        if fp8[k].dtype == torch.float8_e4m3fn:
            want = weight_dequant(fp8[k], fp8[k + "_scale_inv"]).to(torch.bfloat16)
            assert v.dtype == torch.bfloat16 and torch.equal(_bits(v), _bits(want)), k
        else:
            assert v.dtype == fp8[k].dtype and torch.equal(v, fp8[k]), k
        assert got_where[k] == fp8_where[k]
    assert json.loads((out / conv.INDEX_NAME).read_text())["weight_map"] == got_where
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert (out / "tokenizer.json").read_text() == (root / "fp32" / "tokenizer.json").read_text()
    assert (out / "generation_config.json").is_file()

    model, info = DeepseekV3ForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    sd = model.state_dict()
    assert torch.equal(sd["model.layers.0.mlp.down_proj.weight"], got["model.layers.0.mlp.down_proj.weight"].float())
    # the round trip fp32 -> FP8 -> BF16 keeps the model: logits close to the original's
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(tokens).logits, model(tokens).logits
    assert torch.isfinite(b).all()
    assert ((a - b).norm() / a.norm()).item() < 0.1


def _split_scales_across_shards(src, dst):
    """Two shards where the scale of some weights sits in the other shard (index says where)."""
    tensors, _ = _tensors(src)
    names = sorted(tensors)
    first = set(names[: len(names) // 2])
    moved = [k for k in names if k.endswith("_scale_inv")][::3]
    for k in moved:  # put these scales in the shard their weight is not in
        if k[: -len("_scale_inv")] in first:
            first.discard(k)
        else:
            first.add(k)
    shards = {"model-00001-of-00002.safetensors": {k: tensors[k] for k in names if k in first},
              "model-00002-of-00002.safetensors": {k: tensors[k] for k in names if k not in first}}
    dst.mkdir()
    weight_map = {}
    for fname, sd in shards.items():
        save_file(sd, dst / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in sd})
    (dst / conv.INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in ("config.json", "generation_config.json", "tokenizer.json"):
        (dst / f).write_text((src / f).read_text())
    crossed = [k for k in moved if weight_map[k] != weight_map[k[: -len("_scale_inv")]]]
    assert crossed
    return crossed


def test_scale_in_other_shard(ckpts, tmp_path):
    root, _ = ckpts
    crossed = _split_scales_across_shards(root / "fp8", tmp_path / "fp8_2")
    conv.convert(tmp_path / "fp8_2", tmp_path / "bf16_2", "fp8-to-bf16", progress=False)
    conv.convert(root / "fp8", tmp_path / "bf16_1", "fp8-to-bf16", progress=False)
    a, a_where = _tensors(tmp_path / "bf16_2")
    b, _ = _tensors(tmp_path / "bf16_1")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(_bits(a[k]), _bits(b[k])), k
    assert len(set(a_where.values())) == 2
    for k in crossed:  # the weights whose scale was elsewhere really were dequantized
        w = k[: -len("_scale_inv")]
        assert a[w].dtype == torch.bfloat16


def test_missing_scale_is_a_clear_error(ckpts, tmp_path):
    root, _ = ckpts
    src = tmp_path / "broken"
    src.mkdir()
    index = json.loads((root / "fp8" / conv.INDEX_NAME).read_text())
    victim = "model.layers.1.mlp.experts.2.down_proj.weight"
    shard = index["weight_map"][victim]
    for f in (root / "fp8").iterdir():
        if f.name == shard:
            sd = load_file(f)
            del sd[victim + "_scale_inv"]
            save_file(sd, src / f.name, metadata={"format": "pt"})
        elif f.name != conv.INDEX_NAME:
            (src / f.name).write_bytes(f.read_bytes())
    del index["weight_map"][victim + "_scale_inv"]
    (src / conv.INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"{victim}.*{shard}"):
        conv.convert(src, tmp_path / "out", "fp8-to-bf16", progress=False)
    assert not list((tmp_path / "out").glob("*.safetensors*"))  # failed before writing anything
    assert main(["convert", "fp8-to-bf16", "--input", str(src), "--output", str(tmp_path / "out2"),
                 "--no-progress"]) == 2


def test_refuses_to_write_into_input(ckpts):
    root, _ = ckpts
    before = {p.name: p.stat().st_mtime_ns for p in (root / "fp8").iterdir()}
    for out in (root / "fp8", root / "fp8" / "sub", root / "fp8" / ".." / "fp8"):
        with pytest.raises(ValueError, match="inside it"):
            conv.convert(root / "fp8", out, "fp8-to-bf16", progress=False)
    assert main(["convert", "fp8-to-bf16", "--input", str(root / "fp8"), "--output", str(root / "fp8")]) == 2
    assert {p.name: p.stat().st_mtime_ns for p in (root / "fp8").iterdir()} == before


def test_rerun_after_interruption_completes(ckpts, tmp_path, monkeypatch):
    root, _ = ckpts
    clean = tmp_path / "clean"
    conv.convert(root / "fp8", clean, "fp8-to-bf16", progress=False)
    shards = sorted(p.name for p in clean.glob("*.safetensors"))
    assert len(shards) >= 3

    out = tmp_path / "resumed"
    real = conv._convert_tensor
    # the run is killed in the middle of shard k (the first after shard 0 with 2+ tensors to convert)
    plain = [{n for n in load_file(root / "fp8" / f) if not n.endswith("_scale_inv")} for f in shards]
    k = next(i for i in range(1, len(shards)) if len(plain[i]) >= 2)
    seen = []

    def dying(name, *a, **kw):
        if name in plain[k]:
            seen.append(name)
            if len(seen) == 2:
                raise KeyboardInterrupt
        return real(name, *a, **kw)

    monkeypatch.setattr(conv, "_convert_tensor", dying)
    with pytest.raises(KeyboardInterrupt):
        conv.convert(root / "fp8", out, "fp8-to-bf16", progress=False)
    monkeypatch.setattr(conv, "_convert_tensor", real)
    assert all((out / f).is_file() for f in shards[:k]) and not (out / shards[k]).exists()
    assert (out / (shards[k] + conv.PARTIAL_SUFFIX)).exists()  # half-written, under its temp name
    assert not (out / conv.INDEX_NAME).exists()

    first_mtime = (out / shards[0]).stat().st_mtime_ns
    stats = conv.convert(root / "fp8", out, "fp8-to-bf16", progress=False)
    assert stats["shards_skipped"] == k and stats["shards_written"] == len(shards) - k
    assert (out / shards[0]).stat().st_mtime_ns == first_mtime
    assert not list(out.glob("*" + conv.PARTIAL_SUFFIX))
    for f in sorted(os.listdir(clean)):
        assert (out / f).read_bytes() == (clean / f).read_bytes(), f

    # a damaged "finished" shard (e.g. truncated by a full disk) is detected and rewritten
    data = (out / shards[-1]).read_bytes()
    (out / shards[-1]).write_bytes(data[: len(data) // 2])
    stats = conv.convert(root / "fp8", out, "fp8-to-bf16", progress=False)
    assert stats["shards_written"] == 1
    assert (out / shards[-1]).read_bytes() == (clean / shards[-1]).read_bytes()


def test_transformers_reads_our_fp8_format(tmp_path):
    # transformers' fine-grained FP8 loader (dequantizing on CPU) as an outside reader of our output
    pytest.importorskip("accelerate")
    _save_tiny(tmp_path / "fp32", ALIGNED, 1)
    conv.convert(tmp_path / "fp32", tmp_path / "fp8", "bf16-to-fp8", progress=False)
    model, info = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "fp8", output_loading_info=True,
                                                        dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    sd = model.state_dict()
    fp8 = load_file(tmp_path / "fp8" / "model.safetensors")
    for k in ["model.layers.0.self_attn.q_b_proj.weight", "model.layers.0.mlp.down_proj.weight",
              "model.layers.1.self_attn.kv_a_proj_with_mqa.weight", "model.layers.1.mlp.shared_experts.up_proj.weight"]:
        assert torch.equal(sd[k], weight_dequant(fp8[k], fp8[k + "_scale_inv"])), k
    # transformers fuses experts: gate_up_proj[e] = [gate_proj; up_proj]
    e = 3
    g = weight_dequant(fp8[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"],
                       fp8[f"model.layers.1.mlp.experts.{e}.gate_proj.weight_scale_inv"])
    u = weight_dequant(fp8[f"model.layers.1.mlp.experts.{e}.up_proj.weight"],
                       fp8[f"model.layers.1.mlp.experts.{e}.up_proj.weight_scale_inv"])
    assert torch.equal(sd["model.layers.1.mlp.experts.gate_up_proj"][e], torch.cat([g, u]))


def test_single_file_round_trip_keeps_layout(tmp_path):
    _save_tiny(tmp_path / "fp32", RAGGED, 2)  # one model.safetensors, no index
    conv.convert(tmp_path / "fp32", tmp_path / "fp8", "bf16-to-fp8", progress=False)
    conv.convert(tmp_path / "fp8", tmp_path / "bf16", "fp8-to-bf16", progress=False)
    for d in ("fp8", "bf16"):
        assert sorted(p.name for p in (tmp_path / d).glob("*.safetensors")) == ["model.safetensors"]
        assert not (tmp_path / d / conv.INDEX_NAME).exists()
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    with pytest.raises(ValueError, match="already FP8"):
        conv.convert(tmp_path / "fp8", tmp_path / "again", "bf16-to-fp8", progress=False)
    with pytest.raises(ValueError, match="neither"):
        (tmp_path / "empty").mkdir()
        conv.convert(tmp_path / "empty", tmp_path / "x", "fp8-to-bf16", progress=False)


def test_piecewise_streaming_gives_identical_files(ckpts, tmp_path, monkeypatch):
    # tensors are read and written in row pieces of whole 128-row blocks; one block row per piece
    # (288-row experts -> 3 pieces, ragged last) must give byte-identical files
    root, _ = ckpts
    conv.convert(root / "fp8", tmp_path / "whole", "fp8-to-bf16", progress=False)
    conv.convert(root / "fp32", tmp_path / "whole8", "bf16-to-fp8", progress=False)
    monkeypatch.setattr(conv, "CHUNK_ELEMS", 1)
    conv.convert(root / "fp8", tmp_path / "pieces", "fp8-to-bf16", progress=False)
    conv.convert(root / "fp32", tmp_path / "pieces8", "bf16-to-fp8", progress=False)
    for a, b in (("whole", "pieces"), ("whole8", "pieces8")):
        files = sorted(os.listdir(tmp_path / a))
        assert files == sorted(os.listdir(tmp_path / b))
        for f in files:
            assert (tmp_path / a / f).read_bytes() == (tmp_path / b / f).read_bytes(), f
    assert (tmp_path / "whole8" / "config.json").read_bytes() == (root / "fp8" / "config.json").read_bytes()
