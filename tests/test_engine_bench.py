"""benchmarks/engine_bench.py runs end to end on a tiny checkpoint, and its profile of the fused decode step
times the kernels' entry points the step really takes (the CPU blocks and the head screen)."""
import dataclasses
import json
import tempfile

import pytest
import torch

import dsv3
from dsv3.config import preset
from dsv3.infer.screen import MIN_ELEMENTS
from dsv3.kernels import cpu


@pytest.mark.skipif(cpu.library() is None or not cpu.vnni(),
                    reason=f"CPU kernels or AVX512-VNNI unavailable here: {cpu.unavailable_reason()}")
def test_engine_bench_fused_profile(tmp_path, capsys, load_benchmark, monkeypatch):
    scratch = tmp_path / "scratch"  # where the benchmark saves its checkpoint copy: removed at the end
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    cfg = preset("tiny")
    # a vocabulary large enough for the greedy head screen (and its int8 kernel) to apply
    cfg = dataclasses.replace(cfg, vocab_size=-(-MIN_ELEMENTS // cfg.hidden_size))
    torch.manual_seed(0)
    dsv3.save_model(dsv3.Transformer(cfg).init_weights().eval(), tmp_path / "m")
    out = tmp_path / "res.json"
    load_benchmark("engine_bench").main(["--model", str(tmp_path / "m"), "--skip-hf", "--threads", "1",
                                         "--prompt-len", "8", "--new-tokens", "6", "--rounds", "1", "--batch", "3",
                                         "--json", str(out)])
    text = capsys.readouterr().out
    assert "## The fused decode step by part: 1 and 3 sequences" in text
    prof = json.loads(out.read_text())["profile_fused_ms"]
    assert set(prof) == {"1", "3"}
    for rows in prof.values():
        parts = {k: v for k, v in rows.items() if k != "step"}
        # every timed entry point was called (a part the wrappers missed would read 0), and they add up to the step
        for part in ("attention blocks (dsv3_mla_block)", "FFN blocks (dsv3_ffn_block)",
                     "head: int8 product (dsv3_head_i8)", "head: quantization, candidates, rescoring"):
            assert parts[part] > 0, part
        assert parts["embedding, engine, sampling, rest"] >= 0
        assert sum(parts.values()) == pytest.approx(rows["step"])
    # the wrappers are gone afterwards, and so is the benchmark's scratch folder
    assert not [p for p in scratch.iterdir() if p.name.startswith("dsv3_bench_")]
    assert cpu.mla_block.__module__ == "dsv3.kernels.cpu" and cpu.head_i8.__module__ == "dsv3.kernels.cpu"
