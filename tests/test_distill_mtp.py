"""`dsv3 distill-mtp`: the teacher of MTP depth k at position i is the main model's prediction of the same token
(position i + k) and the student sees nothing of that token; on a main model with a known greedy rule the
distilled MTP module drafts what the engine accepts; the main weights come out bitwise unchanged, in the
source's dtype; bad input is refused before anything is written, and a failed save leaves nothing behind."""
import json

import pytest
import torch

import dsv3
from dsv3.cli import main
from dsv3.config import preset
from dsv3.infer.engine import Engine
from dsv3.infer.params import SamplingParams
from dsv3.tokenizer import train_bpe
from dsv3.train.distill_mtp import distill_terms, greedy_continuations

TEXT = open("data/tinyshakespeare.txt", encoding="utf-8").read()[:30000]


def rule_model(vocab_size: int, seed: int = 0):
    """A tiny model whose main blocks are the identity (zero output projections), so that its final hidden state
    is norm(Emb(t)) and, with head rows = 20 x the (unit) embedding rows in a permuted order, its greedy next
    token is a fixed permutation of the current one; its MTP module keeps random weights."""
    torch.manual_seed(seed)
    m = dsv3.Transformer(preset("tiny").replace(vocab_size=vocab_size)).init_weights(std=0.1)
    with torch.no_grad():
        for layer in m.layers:
            layer.attn.wo.weight.zero_()
            ffn = layer.ffn
            (ffn.shared_experts if hasattr(ffn, "experts") else ffn).w2.weight.zero_()
            if hasattr(ffn, "experts"):
                ffn.experts.w2.zero_()
        e = torch.nn.functional.normalize(m.embed.weight, dim=1)
        m.embed.weight.copy_(e)
        m.head.weight.copy_(20.0 * e[torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed + 1))])
    return m


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    (root / "corpus.txt").write_text(TEXT, encoding="utf-8")
    tok = train_bpe([TEXT[i:i + 1000] for i in range(0, len(TEXT), 1000)], 300)
    m = rule_model(tok.vocab_size)
    src = root / "src"
    dsv3.save_model(m, src)
    tok.save(src)
    return root, src, tok


def acceptance(folder, tok) -> float:
    m = dsv3.load_model(folder, dtype=torch.float32)
    e = Engine(m, eos_token_id=None, speculative="mtp")
    ids = tok.encode(TEXT[20000:22000])
    prompts = [ids[i * 40:i * 40 + 8] for i in range(8)]
    got = e.generate(prompts, SamplingParams(max_new_tokens=32, ignore_eos=True))
    plain = Engine(m, eos_token_id=None).generate(prompts, SamplingParams(max_new_tokens=32, ignore_eos=True))
    assert [c.token_ids for c in got] == [c.token_ids for c in plain]  # speculative greedy == plain greedy
    s = e.stats().spec
    return s.accepted / s.drafted


def distill(src, out, corpus, *extra):
    return main(["distill-mtp", "--model", str(src), "--data", str(corpus), "--out", str(out), "--steps", "60",
                 "--batch-size", "8", "--seq-len", "32", "--generated", "16", "--prompt-len", "8",
                 "--eval-windows", "8", "--lr", "1e-2", "--threads", "1", *extra])


def test_teacher_is_the_main_prediction_of_the_same_token_and_the_student_does_not_see_it():
    torch.manual_seed(0)
    m = dsv3.Transformer(preset("tiny").replace(vocab_size=96, num_nextn_predict_layers=2)).init_weights(std=0.1)
    m.eval()
    tokens = torch.randint(96, (2, 12))
    terms = distill_terms(m, tokens)
    assert len(terms) == 2 and terms[0][0].shape == (2, 10, 96)
    with torch.no_grad():
        for k, (student, teacher) in enumerate(terms, start=1):
            for i in (0, 4, 9):
                # the main model alone on the prefix that ends at position i + k predicts t_{i+k+1}
                ref = torch.log_softmax(m(tokens[:, :i + k + 1])[:, -1].float(), -1)
                torch.testing.assert_close(teacher[:, i], ref, atol=1e-5, rtol=1e-5)
                # the student's prediction at i does not change when that token (and what follows) does
                other = tokens.clone()
                other[:, i + k + 1:] = (other[:, i + k + 1:] + 1) % 96
                torch.testing.assert_close(distill_terms(m, other)[k - 1][0][:, i], student[:, i])


def test_distilled_mtp_drafts_what_the_engine_accepts_and_the_main_model_is_untouched(source):
    root, src, tok = source
    out = root / "out"
    assert distill(src, out, root / "corpus.txt") == 0
    before, after = acceptance(src, tok), acceptance(out, tok)
    assert before < 0.05 and after > 0.5, (before, after)
    report = json.loads((out / "distill_mtp.json").read_text())
    assert report["after"]["corpus"]["kl"][0] < 0.1 * report["before"]["corpus"]["kl"][0]
    assert report["after"]["self"]["agreement"][0] > report["before"]["self"]["agreement"][0]
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    a = dsv3.load_model(src, dtype=torch.float32).state_dict()
    b = dsv3.load_model(out, dtype=torch.float32).state_dict()
    main_keys = [k for k in a if not k.startswith("mtp.")]
    assert main_keys and all(torch.equal(a[k], b[k]) for k in main_keys)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("mtp."))


def test_a_bf16_checkpoint_stays_bf16_with_its_main_weights_bitwise(source, tmp_path):
    root, src, tok = source
    m = dsv3.load_model(src, dtype=torch.bfloat16)
    bf = tmp_path / "bf16"
    dsv3.save_model(m, bf)
    tok.save(bf)
    out = tmp_path / "out"
    assert distill(bf, out, root / "corpus.txt", "--steps", "2") == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    a = dsv3.load_model(bf, dtype=torch.bfloat16).state_dict()
    b = dsv3.load_model(out, dtype=torch.bfloat16).state_dict()
    assert a["embed.weight"].dtype == torch.bfloat16
    assert all(b[k].dtype == a[k].dtype and torch.equal(a[k], b[k]) for k in a if not k.startswith("mtp."))


def test_bad_input_is_refused_before_anything_is_written(source, tmp_path, capsys):
    root, src, tok = source
    no_mtp = tmp_path / "no_mtp"
    dsv3.save_model(dsv3.Transformer(preset("tiny").replace(vocab_size=tok.vocab_size, num_nextn_predict_layers=0))
                    .init_weights(), no_mtp)
    tok.save(no_mtp)
    assert distill(no_mtp, tmp_path / "o1", root / "corpus.txt") == 2
    assert "no MTP modules" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert distill(src, taken, root / "corpus.txt") == 2
    assert "already exists" in capsys.readouterr().err and (taken / "keep.txt").read_text() == "mine"
    assert distill(src, tmp_path / "o2", root / "corpus.txt", "--steps", "0") == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert distill(src, tmp_path / "o3", root / "corpus.txt", "--seq-len", "5000") == 2
    assert "exceeds the model's context" in capsys.readouterr().err
    assert distill(src, tmp_path / "o4", root / "corpus.txt", "--val-fraction", "0") == 2
    assert "need held-out text" in capsys.readouterr().err
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3, 4))


def test_a_failed_save_leaves_no_output_and_no_temporary(source, tmp_path, monkeypatch):
    root, src, tok = source

    def boom(model, path, **kw):
        (path / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr("dsv3.checkpoint.save_model", boom)
    with pytest.raises(OSError, match="disk full"):
        distill(src, tmp_path / "out", root / "corpus.txt", "--steps", "1")
    assert list(tmp_path.iterdir()) == []


def test_continuations_are_the_engines_greedy_tokens_and_leave_the_attention_paths_alone(source):
    root, src, tok = source
    m = dsv3.load_model(src, dtype=torch.float32)
    prompts = [[5, 6, 7], [8, 9, 10]]
    got = greedy_continuations(m, prompts, 12)
    want = Engine(dsv3.load_model(src, dtype=torch.float32), eos_token_id=None).generate(
        prompts, SamplingParams(max_new_tokens=9, ignore_eos=True))
    assert got.tolist() == [p + list(c.token_ids) for p, c in zip(prompts, want)]
    assert {mod.attn_impl for mod in m.modules() if hasattr(mod, "attn_impl")} == {"auto"}
