"""Smoke test of `dsv3 bench` on the tiny preset: the table has the promised rows and columns with
positive numbers, the two models really hold the same weights (last-position logits equal
transformers'), and the KV-cache row equals the formula of DeepSeek-V2 §2.1 / issue 2:
(kv_lora_rank + qk_rope_head_dim) x element size. No timing assertions."""
import json
import math
import re

import pytest

from dsv3.cli import main
from dsv3.config import preset

ROW = re.compile(r"^(?P<metric>\S.*?)\s+(?P<unit>tok/s|bytes)\s+(?P<ours>[\d.]+)\s+(?P<ref>[\d.]+)"
                 r"\s+(?P<ratio>[\d.]+)x(?:\s+(?P<paired>[\d.]+)x|\s+-)$")


def _tables(out: str) -> dict:
    """{dtype: {metric prefix: (unit, dsv3, transformers, ratio, paired ratio)}} from the printed tables."""
    tables, cur = {}, None
    for line in out.splitlines():
        m = re.match(r"^dtype (\w+)\s", line)
        if m:
            cur = tables.setdefault(m.group(1), {})
            continue
        m = ROW.match(line)
        if m and cur is not None:
            key = m.group("metric").split(" B=")[0].split(" per ")[0]
            paired = float(m.group("paired")) if m.group("paired") else None
            cur[key] = (m.group("unit"), float(m.group("ours")), float(m.group("ref")), float(m.group("ratio")), paired)
    return tables


def test_bench_tiny_table(capsys, tmp_path):
    js = tmp_path / "bench.json"
    rc = main(["bench", "--preset", "tiny", "--dtype", "both", "--repeats", "1", "--prompt-len", "16",
               "--decode-prompt-len", "8", "--decode-tokens", "4", "--threads", "1", "--profile",
               "--json", str(js)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "dsv3/transformers" in out and "transformers" in out
    tables = _tables(out)
    assert set(tables) == {"fp32", "bf16"}
    cfg = preset("tiny")
    for dtype, elem in (("fp32", 4), ("bf16", 2)):
        t = tables[dtype]
        assert set(t) == {"prefill", "decode", "generate()", "KV cache"}, t
        for key in ("prefill", "decode", "generate()"):
            unit, ours, ref, ratio, paired = t[key]
            assert unit == "tok/s" and ours > 0 and ref > 0 and ratio > 0 and paired > 0
            assert math.isclose(ratio, ours / ref, rel_tol=0.05, abs_tol=0.01)
        unit, ours, ref, ratio, paired = t["KV cache"]
        assert unit == "bytes" and paired is None
        assert ours == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * elem  # the absorbed latent cache
        assert ref > 0  # measured from transformers' DynamicCache tensors, whatever it holds

    res = json.loads(js.read_text())
    by_dtype = {r["dtype"]: r for r in res["results"]}
    fp32 = by_dtype["fp32"]
    # identical weights: the benchmark's own check against transformers, in fp32
    assert fp32["checks"]["prefill_logits_max_abs_diff"] <= 1e-4
    assert fp32["checks"]["prefill_argmax_equal"]
    assert fp32["checks"]["kv_dsv3_equals_formula"]
    # the profile names every category for both sides and the categories add up to the total
    for phase in ("decode", "prefill"):
        for side in ("dsv3", "transformers"):
            b = fp32["profile"][phase][side]
            assert b["total"] > 0
            assert math.isclose(sum(v for k, v in b.items() if k != "total"), b["total"], rel_tol=1e-6)
        assert fp32["profile"][phase]["dsv3"]["moe gate (scores + group-limited top-k)"] > 0
    assert fp32["profile"]["dsv3_decode_top_ops"]["ops"]


def test_bench_model_dir(capsys, tmp_path):
    from dsv3.commands.bench import random_checkpoint

    path = random_checkpoint("tiny", str(tmp_path / "ckpt"), seed=1)
    assert main(["bench", "--model", path, "--dtype", "fp32", "--repeats", "1", "--prompt-len", "8",
                 "--decode-prompt-len", "4", "--decode-tokens", "2", "--threads", "1", "--no-generate"]) == 0
    t = _tables(capsys.readouterr().out)["fp32"]
    assert set(t) == {"prefill", "decode", "KV cache"}


@pytest.mark.parametrize("argv, msg", [
    (["--preset", "tiny", "--repeats", "0"], "--repeats"),
    (["--preset", "nope"], "unknown preset"),
    (["--model", "/nonexistent/dir"], "not a checkpoint folder"),
    (["--preset", "tiny", "--prompt-len", "100000"], "max_position_embeddings"),
])
def test_bench_bad_input(capsys, argv, msg):
    assert main(["bench", *argv]) == 2
    assert msg in capsys.readouterr().err
