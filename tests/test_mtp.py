"""MTP: a checkpoint whose layer `num_hidden_layers` holds MTP weights (the released layout, here in its own
shard) loads, and the MTP logits equal the paper's equations (V3 §2.2, eq. 21-23) computed with transformers'
own decoder layer as the transformer block."""
import json

import torch
from safetensors.torch import load_file, save_file

import dsv3
from hf_ref import make_v3


def rms(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def build_mtp_checkpoint(tmp_path):
    N = 2
    full = make_v3(tmp_path / "full", seed=31, num_hidden_layers=N + 1)  # layer N becomes the MTP block
    sd = load_file(tmp_path / "full" / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    d = full.config.hidden_size
    main = {k: v for k, v in sd.items() if not k.startswith(f"model.layers.{N}.")}
    mtp = {k: v for k, v in sd.items() if k.startswith(f"model.layers.{N}.")}
    extra = {
        "enorm.weight": 1 + 0.2 * torch.randn(d, generator=g),
        "hnorm.weight": 1 + 0.2 * torch.randn(d, generator=g),
        "eh_proj.weight": torch.randn(d, 2 * d, generator=g) / (2 * d) ** 0.5,
        "shared_head.norm.weight": 1 + 0.2 * torch.randn(d, generator=g),
        "shared_head.head.weight": sd["lm_head.weight"].clone(),
        "embed_tokens.weight": sd["model.embed_tokens.weight"].clone(),
    }
    mtp.update({f"model.layers.{N}.{k}": v for k, v in extra.items()})
    out = tmp_path / "mtp"
    out.mkdir()
    save_file(main, out / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(mtp, out / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    wm = {**{k: "model-00001-of-00002.safetensors" for k in main}, **{k: "model-00002-of-00002.safetensors" for k in mtp}}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    cfg = json.loads((tmp_path / "full" / "config.json").read_text())
    cfg.update(num_hidden_layers=N, num_nextn_predict_layers=1)
    (out / "config.json").write_text(json.dumps(cfg))
    return full, extra, out, N


def test_mtp_checkpoint_loads_and_matches_paper(tmp_path):
    full, extra, path, N = build_mtp_checkpoint(tmp_path)
    model = dsv3.load_model(path, dtype=torch.float32)
    assert len(model.mtp) == 1
    B, S = 2, 21
    tokens = torch.randint(0, full.config.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(3))
    m = full.model
    with torch.no_grad():
        pos = torch.arange(S)[None]
        mask = torch.full((S, S), float("-inf")).triu(1)[None, None]
        x = m.embed_tokens(tokens[:, :S])
        pe = m.rotary_emb(x, pos)
        for layer in m.layers[:N]:
            x = layer(x, attention_mask=mask, position_embeddings=pe, position_ids=pos)
        h = m.norm(x)  # h^0: the main model's output representation (head input)
        main_logits = full.lm_head(h)
        # eq. 21: h'_i = M [RMSNorm(Emb(t_{i+1})); RMSNorm(h_i)]  (released concat order: embedding first)
        e = m.embed_tokens(tokens[:, 1:S + 1])
        hp = torch.cat([rms(e, extra["enorm.weight"]), rms(h, extra["hnorm.weight"])], -1) @ extra["eh_proj.weight"].T
        # eq. 22: h^1 = TRM(h'); eq. 23: P = OutHead(h^1), the head's RMSNorm being shared_head.norm
        y = m.layers[N](hp, attention_mask=mask, position_embeddings=pe, position_ids=pos)
        want = full.lm_head(rms(y, extra["shared_head.norm.weight"]))

        h_ours = model.hidden(tokens[:, :S])
        assert (model.logits(h_ours) - main_logits).abs().max() < 1e-4
        got = model.logits(model.mtp_hidden(h_ours, tokens)[0])
    assert (got - want).abs().max() < 1e-4


def test_mtp_save_load_roundtrip_keeps_released_layout(tmp_path):
    _, _, path, N = build_mtp_checkpoint(tmp_path)
    model = dsv3.load_model(path, dtype=torch.float32)
    dsv3.save_model(model, tmp_path / "again")
    keys = set(load_file(tmp_path / "again" / "model.safetensors"))
    for k in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "shared_head.head.weight",
              "embed_tokens.weight", "self_attn.kv_a_proj_with_mqa.weight", "mlp.experts.7.down_proj.weight"):
        assert f"model.layers.{N}.{k}" in keys
    back = dsv3.load_model(tmp_path / "again", dtype=torch.float32)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
