"""`dsv3 generate` and `dsv3 chat` on a tiny checkpoint folder with a trained tokenizer: the text they
print is the engine's greedy tokens decoded; speculative decoding prints the same; chat keeps the
history (the chat template of the whole conversation) until /clear and stops at /exit."""
import io
import sys

import pytest
import torch

import dsv3
from dsv3.cli import main
from dsv3.config import preset
from dsv3.infer.engine import Engine
from dsv3.infer.params import SamplingParams
from dsv3.tokenizer import Tokenizer, train_bpe


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_chat")
    text = open("data/tinyshakespeare.txt", encoding="utf-8").read()[:60000]
    tok = train_bpe([text[i:i + 1000] for i in range(0, len(text), 1000)], 400)
    torch.manual_seed(0)
    m = dsv3.Transformer(preset("tiny").replace(vocab_size=tok.vocab_size)).init_weights(std=0.1)
    dsv3.save_model(m, d)
    tok.save(d)
    no_tok = tmp_path_factory.mktemp("no_tok")
    dsv3.save_model(m, no_tok)
    no_mtp = tmp_path_factory.mktemp("no_mtp")
    m2 = dsv3.Transformer(preset("tiny").replace(vocab_size=tok.vocab_size, num_nextn_predict_layers=0))
    dsv3.save_model(m2.init_weights(std=0.1), no_mtp)
    tok.save(no_mtp)
    return d, no_tok, no_mtp


def engine_text(d, ids, n):
    tok = Tokenizer.from_dir(d)
    m = dsv3.load_model(d, dtype=torch.float32)
    out = Engine(m, eos_token_id=None).generate([ids], SamplingParams(max_new_tokens=n, ignore_eos=True))[0]
    return out.token_ids, tok.decode(out.token_ids, skip_special_tokens=True)


def test_generate_prints_the_engine_greedy_text(folder, capsys):
    d = folder[0]
    tok = Tokenizer.from_dir(d)
    ids, text = engine_text(d, tok.encode("To be, or not"), 12)
    for extra in ([], ["--speculative", "mtp"]):
        assert main(["generate", "--model", str(d), "--prompt", "To be, or not", "--max-new-tokens", "12",
                     "--ignore-eos", "--dtype", "float32", "--stats", *extra]) == 0
        out = capsys.readouterr()
        assert out.out == text + "\n"
        assert "tokens/s" in out.err and (("MTP acceptance" in out.err) == bool(extra))
    # token ids in, token ids out
    assert main(["generate", "--model", str(d), "--prompt-ids", ",".join(map(str, tok.encode("To be, or not"))),
                 "--max-new-tokens", "12", "--ignore-eos", "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.split() == [str(t) for t in ids]
    # a stop string cuts the text before it
    stop = text[3:6]
    assert main(["generate", "--model", str(d), "--prompt", "To be, or not", "--max-new-tokens", "12",
                 "--ignore-eos", "--dtype", "float32", "--stop", stop]) == 0
    assert capsys.readouterr().out == text[:text.index(stop)] + "\n"


def test_generate_fp8_prints_the_fp8_resident_models_greedy_text(folder, capsys):
    """--fp8: the checkpoint is quantized while loading (dsv3.fp8.resident) and its FP8 engine's tokens printed."""
    from dsv3.fp8.resident import fp8_modules

    d = folder[0]
    tok = Tokenizer.from_dir(d)
    m = dsv3.load_model(d, dtype=torch.float32, fp8=True)
    assert fp8_modules(m)  # the release's FP8 set is FP8 in memory
    ids = tok.encode("To be, or not")
    out = Engine(m, eos_token_id=None).generate([ids], SamplingParams(max_new_tokens=10, ignore_eos=True))[0]
    assert out.token_ids != engine_text(d, ids, 10)[0]  # this model's FP8 tokens differ from its fp32 ones
    assert main(["generate", "--model", str(d), "--prompt", "To be, or not", "--max-new-tokens", "10",
                 "--ignore-eos", "--dtype", "float32", "--fp8"]) == 0
    assert capsys.readouterr().out == tok.decode(out.token_ids, skip_special_tokens=True) + "\n"


def test_fp8_is_refused_for_a_model_the_ranks_loaded():
    import argparse

    from dsv3.infer.cli_generate import refuse_fp8_for_ranks

    refuse_fp8_for_ranks(argparse.Namespace(fp8=True), None)  # loaded here: fine
    refuse_fp8_for_ranks(argparse.Namespace(fp8=False), object())
    with pytest.raises(ValueError, match="--fp8 is not supported"):
        refuse_fp8_for_ranks(argparse.Namespace(fp8=True), object())


def test_generate_chat_wraps_the_prompt_in_the_template(folder, capsys):
    d = folder[0]
    tok = Tokenizer.from_dir(d)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"}]
    _, text = engine_text(d, tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True), 8)
    assert main(["generate", "--model", str(d), "--prompt", "Who art thou?", "--chat", "--system", "Be brief.",
                 "--max-new-tokens", "8", "--ignore-eos", "--dtype", "float32"]) == 0
    assert capsys.readouterr().out == text + "\n"


def test_chat_keeps_history_until_clear(folder, capsys, monkeypatch):
    d = folder[0]
    tok = Tokenizer.from_dir(d)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Good morrow\nHow now?\n/clear\nHow now?\n/exit\nnever read\n"))
    assert main(["chat", "--model", str(d), "--max-new-tokens", "6", "--ignore-eos", "--dtype", "float32",
                 "--block-size", "4", "--stats"]) == 0
    out = capsys.readouterr()
    lines = out.out.split("\n")
    # replies, computed directly from the conversation each turn should render
    r1 = engine_text(d, tok.apply_chat_template([{"role": "user", "content": "Good morrow"}],
                                                add_generation_prompt=True, tokenize=True), 6)[1]
    conv = [{"role": "user", "content": "Good morrow"}, {"role": "assistant", "content": r1},
            {"role": "user", "content": "How now?"}]
    r2 = engine_text(d, tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True), 6)[1]
    r3 = engine_text(d, tok.apply_chat_template([{"role": "user", "content": "How now?"}],
                                                add_generation_prompt=True, tokenize=True), 6)[1]
    assert lines[:4] == [r1, r2, "[history cleared]", r3] and lines[4:] == [""]
    assert r2 != r3  # the history changed the second reply
    # the second turn found the first turn's latents in the prefix cache
    stats = out.err.strip().split("\n")
    assert len(stats) == 3 and "prefix cache" in stats[1]


def test_bad_input_exits_2(folder, capsys):
    d, no_tok, no_mtp = folder
    assert main(["generate", "--model", str(no_tok), "--prompt", "hi"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    assert main(["generate", "--model", str(d), "--prompt-ids", "1,x"]) == 2
    assert "--prompt-ids" in capsys.readouterr().err
    assert main(["generate", "--model", str(no_mtp), "--prompt", "hi", "--speculative", "mtp"]) == 2
    assert "no MTP layer" in capsys.readouterr().err
    assert main(["generate", "--model", str(d), "--prompt", "hi", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert main(["generate", "--model", str(d / "missing"), "--prompt", "hi"]) == 2
    assert main(["chat", "--model", str(no_tok)]) == 2
