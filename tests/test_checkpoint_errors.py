"""Bad checkpoints are clear errors naming the tensor and the file; FP8 weights are dequantized on load."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3
from hf_ref import make_v3


@pytest.fixture
def ckpt(tmp_path):
    make_v3(tmp_path / "c", seed=41)
    return tmp_path / "c"


def rewrite(path, fn):
    f = path / "model.safetensors"
    sd = load_file(f)
    fn(sd)
    save_file(sd, f, metadata={"format": "pt"})


def test_missing_tensor(ckpt):
    rewrite(ckpt, lambda sd: sd.pop("model.layers.1.self_attn.kv_b_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors.*layers\.1\.attn\.wkv_b\.weight"):
        dsv3.load_model(ckpt)


def test_missing_expert(ckpt):
    rewrite(ckpt, lambda sd: sd.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors.*layers\.2\.ffn\.experts\.w3 experts \[5\]"):
        dsv3.load_model(ckpt)


def test_unexpected_tensor(ckpt):
    rewrite(ckpt, lambda sd: sd.update({"model.layers.0.self_attn.rotary.inv_freq": torch.zeros(4)}))
    with pytest.raises(ValueError, match=r"unexpected tensors.*model\.layers\.0\.self_attn\.rotary\.inv_freq "
                                         r"\(in model\.safetensors\)"):
        dsv3.load_model(ckpt)


def test_shape_mismatch(ckpt):
    rewrite(ckpt, lambda sd: sd.update({"model.layers.1.self_attn.o_proj.weight": torch.zeros(48, 40)}))
    with pytest.raises(ValueError, match=r"shape mismatch for model\.layers\.1\.self_attn\.o_proj\.weight in "
                                         r".*model\.safetensors: checkpoint \(48, 40\), model \(48, 48\)"):
        dsv3.load_model(ckpt)


def test_truncated_file(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        dsv3.load_model(ckpt)


def test_corrupt_header(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage-header}" + b"\0" * 64)
    with pytest.raises(ValueError, match=r"cannot read .*model\.safetensors"):
        dsv3.load_model(ckpt)


def test_index_names_missing_shard(ckpt):
    sd = load_file(ckpt / "model.safetensors")
    wm = {k: "model-00001-of-00002.safetensors" for k in sd}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(ValueError, match=r"names shard 'model-00001-of-00002\.safetensors', which is missing"):
        dsv3.load_model(ckpt)


def test_not_a_folder(tmp_path):
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        dsv3.load_model(tmp_path / "nope")


def _quantize(w):
    """The released format by its formula (V3 §3.3): per 128x128 block, scale = amax / 448,
    fp8 = w / scale, weight_scale_inv = scale. Ragged edge blocks included."""
    out_f, in_f = w.shape
    q = torch.empty_like(w, dtype=torch.float8_e4m3fn)
    s = torch.empty(-(-out_f // 128), -(-in_f // 128))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            s[i, j] = blk.abs().amax().clamp(min=1e-12) / 448.0
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (blk / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def test_fp8_checkpoint_is_dequantized_on_load(tmp_path):
    # hidden 160 and intermediate 200: ragged 128-blocks on both axes
    ref = make_v3(tmp_path / "c", seed=42, hidden_size=160, intermediate_size=200, moe_intermediate_size=136)
    path = tmp_path / "c"
    sd = load_file(path / "model.safetensors")
    quantized = {}
    for k in list(sd):
        # the released set: every 2-D linear weight but the embedding, the output head and the router
        if sd[k].dim() == 2 and "embed_tokens" not in k and "lm_head" not in k and not k.endswith("mlp.gate.weight"):
            q, s = _quantize(sd[k])
            sd[k], sd[k + "_scale_inv"] = q, s
            quantized[k] = (q, s)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    model = dsv3.load_model(path, dtype=torch.float32)
    w = model.layers[0].attn.wkv_a.weight
    q, s = quantized["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    expect = q.float() * s.repeat_interleave(128, 0)[: q.shape[0]].repeat_interleave(128, 1)[:, : q.shape[1]]
    assert torch.equal(w, expect)
    e3 = model.layers[1].ffn.experts.w3[3]
    q, s = quantized["model.layers.1.mlp.experts.3.up_proj.weight"]
    assert torch.equal(e3, q.float() * s.repeat_interleave(128, 0)[: q.shape[0]].repeat_interleave(128, 1)[:, : q.shape[1]])
    # the whole model equals the transformers reference holding the same dequantized weights
    with torch.no_grad():
        params = dict(ref.named_parameters())
        for k, (q, sc) in quantized.items():
            if k in params:
                params[k].copy_(q.float() * sc.repeat_interleave(128, 0)[: q.shape[0]]
                                .repeat_interleave(128, 1)[:, : q.shape[1]])
            else:  # transformers stacks experts: gate_up_proj (E, 2I, D) = [gate; up], down_proj (E, D, I)
                layer, e, proj = k.split(".")[2], int(k.split(".")[5]), k.split(".")[6]
                ex = ref.model.layers[int(layer)].mlp.experts
                w = q.float() * sc.repeat_interleave(128, 0)[: q.shape[0]].repeat_interleave(128, 1)[:, : q.shape[1]]
                I = ex.down_proj.shape[-1]
                if proj == "gate_proj":
                    ex.gate_up_proj[e, :I].copy_(w)
                elif proj == "up_proj":
                    ex.gate_up_proj[e, I:].copy_(w)
                else:
                    ex.down_proj[e].copy_(w)
        x = torch.randint(0, 97, (1, 16))
        assert (ref(x).logits - model(x)).abs().max() < 1e-4

    sd.pop("model.layers.1.self_attn.o_proj.weight_scale_inv")
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"FP8 tensor 'model\.layers\.1\.self_attn\.o_proj\.weight' .* has no "
                                         r"'model\.layers\.1\.self_attn\.o_proj\.weight_scale_inv'"):
        dsv3.load_model(path)


def test_cli_info_and_help(ckpt):
    run = lambda *a: subprocess.run([sys.executable, "-m", "dsv3", *a], capture_output=True, text=True)
    r = run("--help")
    assert r.returncode == 0 and "info" in r.stdout and "eplb" in r.stdout
    r = run("info", str(ckpt))
    assert r.returncode == 0, r.stderr
    cfg = dsv3.ModelConfig.from_hf(ckpt)
    n = cfg.num_params()
    assert f"({n['total']:,})" in r.stdout and f"({n['active']:,})" in r.stdout
    # the count is that of the parameters actually in the checkpoint (no MTP module here)
    model = dsv3.load_model(ckpt)
    assert n["mtp"] == 0 and n["total"] == sum(p.numel() for p in model.parameters())
    r = run("info", str(ckpt.parent / "missing"))
    assert r.returncode == 2 and "error" in r.stderr
