"""`dsv3 generate --prompts-file FILE` (offline batch generation through one Engine) and `--dp N` under
torchrun (issue 7).

- A text file (one prompt per line) and a JSONL file (prompt / prompt_ids, per-line max_new_tokens,
  temperature, seed): one JSONL record per prompt, in input order, whose greedy tokens are what the
  engine gives each prompt alone and what `dsv3.generate` and transformers' `generate` give; sampled
  lines equal a solo engine with the same seed (--seed S gives line i the seed S + i); --chat, --stop.
- Malformed files (bad JSON, missing prompt, unknown key, empty file, ...) exit 2 with file:line,
  before the model is loaded and before any process group; the output file is written atomically.
- `torchrun --nproc-per-node 2 -m dsv3 generate --prompts-file F --dp 2` writes the single-process
  output file byte for byte; `--tp 2` (one engine on rank 0) as well; a request that one replica's
  engine refuses fails every rank before any forward.
"""
import json
import os
import re
import stat

import pytest
import torch
import torch.distributed as dist

import dsv3
from dsv3.cli import main
from dsv3.infer.cli_generate import write_atomic
from dsv3.infer.engine import Engine
from dsv3.infer.params import SamplingParams
from dsv3.parallel.dist import run_local
from dsv3.tokenizer import Tokenizer
from hf_ref import make_v3
from test_cli_infer import engine_text, folder  # noqa: F401  (folder: a tiny model with a trained tokenizer)
from test_parallel_cli import torchrun
from test_pp_infer import cli_rank

NEW = 8
TEXT_PROMPTS = ["To be, or not", "ROMEO:", "What light through yonder", "Good morrow, cousin", "O Romeo"]


def run_cli(capsys, *argv):
    rc = main(["generate", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def records_of(text):
    return [json.loads(line) for line in text.splitlines()]


def write(path, text):
    path.write_bytes(text.encode("utf-8"))
    return path


def base_args(model, prompts_file, *extra):
    return ["--model", model, "--prompts-file", prompts_file, "--max-new-tokens", NEW, "--ignore-eos",
            "--dtype", "float32", "--threads", "1", *extra]


# ---------------------------------------------------------------------------- single process

def test_text_file_equals_each_prompt_alone(folder, tmp_path, capsys):
    d = folder[0]
    tok = Tokenizer.from_dir(d)
    # a blank line is skipped (its line number too), a CRLF line ending is not part of the prompt
    f = write(tmp_path / "prompts.txt", "To be, or not\nROMEO:\n\nWhat light through yonder\r\nGood morrow, cousin\n")
    # --max-batch 2: the later prompts wait for a slot and join the running batch
    rc, out, err = run_cli(capsys, *base_args(d, f, "--max-batch", "2", "--stats"))
    assert rc == 0
    recs = records_of(out)
    prompts = ["To be, or not", "ROMEO:", "What light through yonder", "Good morrow, cousin"]
    assert [r["index"] for r in recs] == [0, 1, 2, 3]
    assert [r["line"] for r in recs] == [1, 2, 4, 5]
    assert [r["prompt"] for r in recs] == prompts
    model = dsv3.load_model(d, dtype=torch.float32)
    for r, p in zip(recs, prompts):
        ids = tok.encode(p)
        solo_ids, solo_text = engine_text(d, ids, NEW)  # the engine with this prompt alone
        assert r["token_ids"] == solo_ids == dsv3.generate(model, [ids], max_new_tokens=NEW)[0]
        assert r["completion"] == solo_text == tok.decode(solo_ids, skip_special_tokens=True)
        assert r["finish_reason"] == "length"
        assert r["usage"] == {"prompt_tokens": len(ids), "completion_tokens": NEW}
        assert set(r) == {"index", "line", "prompt", "completion", "token_ids", "finish_reason", "usage"}
    assert f"4 prompts, {4 * NEW} tokens in" in err
    assert "4/4" in err  # the progress bar (stderr)
    # --no-progress: no bar; the same records
    rc, out2, err = run_cli(capsys, *base_args(d, f, "--no-progress"))
    assert rc == 0 and out2 == out and err == ""


def test_chat_and_stop_strings_apply_to_every_prompt(folder, tmp_path, capsys):
    d = folder[0]
    tok = Tokenizer.from_dir(d)
    f = write(tmp_path / "p.txt", "\n".join(TEXT_PROMPTS[:3]) + "\n")
    rc, out, _ = run_cli(capsys, *base_args(d, f, "--chat", "--system", "Be brief.", "--no-progress"))
    assert rc == 0
    for r, p in zip(records_of(out), TEXT_PROMPTS[:3]):
        ids = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": p}],
                                      add_generation_prompt=True, tokenize=True)
        assert r["prompt"] == p and r["usage"]["prompt_tokens"] == len(ids)
        assert (r["token_ids"], r["completion"]) == engine_text(d, ids, NEW)
    # a stop string: completions that contain it are cut before it and end with "stop"
    full = [engine_text(d, tok.encode(p), NEW) for p in TEXT_PROMPTS[:3]]
    stop = full[0][1][2:4]
    assert stop
    rc, out, _ = run_cli(capsys, *base_args(d, f, "--stop", stop, "--no-progress"))
    assert rc == 0
    recs = records_of(out)
    assert recs[0]["finish_reason"] == "stop"
    for r, (ids, text) in zip(recs, full):
        if stop in text:
            assert r["completion"] == text[:text.index(stop)] and r["finish_reason"] == "stop"
            assert r["token_ids"] == ids[:len(r["token_ids"])] and len(r["token_ids"]) < NEW
        else:
            assert (r["token_ids"], r["completion"], r["finish_reason"]) == (ids, text, "length")


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("batch_hf")
    return path, make_v3(path, seed=31)  # no tokenizer in this folder: token ids in, token ids out


def test_jsonl_ids_overrides_equal_transformers_and_seeded_solo_runs(hf_ckpt, tmp_path, capsys):
    path, ref = hf_ckpt
    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(2, 97, (n,), generator=g).tolist() for n in (5, 17, 1, 9, 12)]
    lines = [{"prompt_ids": ids[0]},
             {"prompt_ids": ids[1], "max_new_tokens": 3},
             {"prompt_ids": ids[2], "temperature": 0.9, "seed": 5},
             {"prompt_ids": ids[3], "temperature": 0.9},  # no seed of its own: --seed 100 + its index 3
             {"prompt_ids": ids[4], "max_new_tokens": 0}]
    f = write(tmp_path / "p.jsonl", "".join(json.dumps(o) + "\n" for o in lines))
    rc, out, _ = run_cli(capsys, *base_args(path, f, "--seed", "100", "--no-progress", "--max-batch", "3"))
    assert rc == 0
    recs = records_of(out)
    assert [r["index"] for r in recs] == list(range(5)) and [r["line"] for r in recs] == [1, 2, 3, 4, 5]
    assert all("completion" not in r and r["prompt_ids"] == p for r, p in zip(recs, ids))  # no tokenizer
    assert [len(r["token_ids"]) for r in recs] == [NEW, 3, NEW, NEW, 0]
    # greedy lines: transformers' generate (the reference nobody here wrote)
    for i, n in ((0, NEW), (1, 3)):
        with torch.no_grad():
            hf = ref.generate(torch.tensor([ids[i]]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(ids[i]):].tolist()
        assert recs[i]["token_ids"] == hf
    # sampled lines: a solo engine with the line's seed draws the same tokens whatever else is batched
    model = dsv3.load_model(path, dtype=torch.float32)
    for i, seed in ((2, 5), (3, 103)):
        solo = Engine(model).generate([ids[i]], SamplingParams(max_new_tokens=NEW, temperature=0.9, seed=seed,
                                                               ignore_eos=True))[0]
        assert recs[i]["token_ids"] == solo.token_ids
    greedy3 = Engine(model).generate([ids[3]], SamplingParams(max_new_tokens=NEW, ignore_eos=True))[0]
    assert recs[3]["token_ids"] != greedy3.token_ids  # the temperature override did apply
    assert recs[4]["finish_reason"] == "length" and recs[4]["usage"] == {"prompt_tokens": 12, "completion_tokens": 0}
    # a file named .txt read as JSONL with --prompts-format
    g2 = write(tmp_path / "p.txt", f.read_text())
    rc, out2, _ = run_cli(capsys, *base_args(path, g2, "--seed", "100", "--no-progress", "--prompts-format", "jsonl"))
    assert rc == 0 and out2 == out


# ---------------------------------------------------------------------------- refusals, before any model work

BAD = [
    ("p.jsonl", '{"prompt": "a"}\n{"prompt": \n', [], r"p\.jsonl:2: not valid JSON"),
    ("p.jsonl", '{"prompt": "a"}\n\n{"max_new_tokens": 3}\n', [],
     r'p\.jsonl:3: missing "prompt" \(text\) or "prompt_ids"'),  # line numbers count the blank line
    ("p.jsonl", '{"prompt": "a", "top_p": 0.5}\n', [], r"p\.jsonl:1: unknown key 'top_p'; a line may hold prompt, "),
    ("p.jsonl", "", [], r"p\.jsonl: no prompts \(the file is empty"),
    ("p.txt", "\n  \n\n", [], r"p\.txt: no prompts"),
    ("p.jsonl", "[1, 2]\n", [], r"p\.jsonl:1: expected a JSON object .* got an array"),
    ("p.jsonl", '{"prompt": "a", "prompt_ids": [3]}\n', [], r'p\.jsonl:1: give "prompt" or "prompt_ids", not both'),
    ("p.jsonl", '{"prompt_ids": [3, 400]}\n', [], r'p\.jsonl:1: "prompt_ids" holds 400, outside the vocabulary'),
    ("p.jsonl", '{"prompt_ids": []}\n', [], r'p\.jsonl:1: "prompt_ids" must be a non-empty array'),
    ("p.jsonl", '{"prompt": 3}\n', [], r'p\.jsonl:1: "prompt" must be a string'),
    ("p.jsonl", '{"prompt": "a", "max_new_tokens": true}\n', [], r'p\.jsonl:1: "max_new_tokens" must be an integer'),
    ("p.jsonl", '{"prompt": "a"}\n{"prompt": "b", "temperature": -1}\n', [], r"p\.jsonl:2: .*temperature"),
    ("p.jsonl", '{"prompt_ids": [3]}\n', ["--chat"], r"p\.jsonl:1: --chat wraps text prompts"),
    ("p.txt", "a\n" + "b" * 9000 + "\n", [], r"p\.txt:2: the prompt has \d+ tokens; the context length is 4096"),
    ("p.txt", "a\n", ["--output", "missing/out.jsonl"], r"--output .*missing/out\.jsonl.*does not exist"),
]


@pytest.mark.parametrize("name, content, extra, error", BAD)
def test_malformed_files_are_refused_before_model_work(folder, tmp_path, capsys, monkeypatch, name, content, extra,
                                                       error):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(dsv3, "load_model", no_model)
    monkeypatch.chdir(tmp_path)
    f = write(tmp_path / name, content)
    out = tmp_path / "out.jsonl"
    if "--output" not in extra:
        extra = [*extra, "--output", out]
    rc, stdout, err = run_cli(capsys, *base_args(folder[0], f, *extra))
    assert rc == 2 and stdout == ""
    assert re.search(error, err), err
    assert not out.exists() and not dist.is_initialized()


def test_not_utf8_and_no_tokenizer(folder, tmp_path, capsys):
    d, no_tok, _ = folder
    f = tmp_path / "p.txt"
    f.write_bytes(b"fine\nbad \xff byte\n")
    rc, _, err = run_cli(capsys, *base_args(d, f))
    assert rc == 2 and "p.txt:2: not UTF-8 text" in err
    # text prompts need the tokenizer; token ids do not
    g = write(tmp_path / "p.jsonl", '{"prompt_ids": [5, 6]}\n{"prompt": "hi"}\n')
    rc, _, err = run_cli(capsys, *base_args(no_tok, g))
    assert rc == 2 and "p.jsonl:2: a text prompt needs the tokenizer" in err
    g = write(tmp_path / "ids.jsonl", '{"prompt_ids": [5, 6]}\n')
    rc, out, _ = run_cli(capsys, *base_args(no_tok, g, "--no-progress"))
    assert rc == 0 and records_of(out)[0]["token_ids"] == engine_text(d, [5, 6], NEW)[0]  # same weights


@pytest.mark.parametrize("argv, world, error", [
    (["--prompt", "hi", "--dp", "2"], "2", r"--dp: dsv3 generate serves one prompt .* pass --prompts-file FILE"),
    (["--dp", "2"], None, r"--dp 2: launch it under torchrun with 2 processes .* got a world size of 1"),
    (["--dp", "2"], "3", r"--dp 2: launch it under torchrun .* got a world size of 3"),
    (["--dp", "2", "--tp", "2"], "4", r"--dp 2 with --tp: replicas of a model-parallel group are not supported"),
    (["--dp", "2", "--pp", "2"], "4", r"--dp 2 with --pp: .* not supported"),
    (["--output", "x.jsonl", "--prompt", "hi"], None, r"--output goes with --prompts-file"),
])
def test_parallel_flags_are_checked(folder, tmp_path, capsys, monkeypatch, argv, world, error):
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.chdir(tmp_path)
    f = write(tmp_path / "p.txt", "a\nb\n")
    args = ["--model", folder[0], *([] if "--prompt" in argv else ["--prompts-file", f]), *argv]
    rc, _, err = run_cli(capsys, *args)
    assert rc == 2 and re.search(error, err), err
    assert not dist.is_initialized()


# ---------------------------------------------------------------------------- atomic output

def test_output_is_written_atomically(folder, tmp_path, capsys):
    d = folder[0]
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    f = write(tmp_path / "p.txt", "ROMEO:\nO Romeo\n")
    rc, stdout, _ = run_cli(capsys, *base_args(d, f, "--output", out, "--no-progress"))
    assert rc == 0 and stdout == ""  # the records go to the file only
    recs = records_of(out.read_text())
    assert [r["prompt"] for r in recs] == ["ROMEO:", "O Romeo"]
    assert set(os.listdir(tmp_path)) == {"out.jsonl", "p.txt"}  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # like any new file, not mkstemp's 0600
    # a failure while writing leaves the previous file whole and no temporary file behind
    before = out.read_bytes()

    def lines():
        yield "first"
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(out, lines())
    assert out.read_bytes() == before
    assert set(os.listdir(tmp_path)) == {"out.jsonl", "p.txt"}
    # a refused run does not touch it either
    bad = write(tmp_path / "bad.jsonl", '{"prompt": "a", "n": 2}\n')
    assert run_cli(capsys, *base_args(d, bad, "--output", out))[0] == 2
    assert out.read_bytes() == before


# ---------------------------------------------------------------------------- --dp 2 / --tp 2 under torchrun

def mixed_file(tmp_path, vocab):
    g = torch.Generator().manual_seed(9)
    lines = [{"prompt": TEXT_PROMPTS[0]}, {"prompt_ids": torch.randint(2, vocab, (11,), generator=g).tolist()},
             {"prompt": TEXT_PROMPTS[1], "max_new_tokens": 3}, {"prompt": TEXT_PROMPTS[2], "temperature": 0.8},
             {"prompt": TEXT_PROMPTS[3], "temperature": 1.0, "seed": 4},
             {"prompt_ids": torch.randint(2, vocab, (4,), generator=g).tolist(), "max_new_tokens": 5},
             {"prompt": TEXT_PROMPTS[4]}]
    return write(tmp_path / "mixed.jsonl", "".join(json.dumps(o) + "\n" for o in lines))


def test_dp2_under_torchrun_writes_the_single_process_file(folder, tmp_path, capsys):
    d = folder[0]
    f = mixed_file(tmp_path, 400)
    args = base_args(d, f, "--seed", "7", "--max-batch", "2", "--no-progress")
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert run_cli(capsys, *args, "--output", one)[0] == 0
    stdout = torchrun(2, ["generate", *map(str, args), "--output", str(two), "--dp", "2"])
    assert stdout == ""
    assert two.read_text().splitlines() == one.read_text().splitlines()
    recs = records_of(one.read_text())
    assert [r["index"] for r in recs] == list(range(7)) and len({json.dumps(r["token_ids"]) for r in recs}) == 7


def test_tp2_batch_and_a_replica_refusal(folder, tmp_path, capsys):
    d = folder[0]
    f = mixed_file(tmp_path, 400)
    args = ["generate", *map(str, base_args(d, f, "--seed", "7", "--no-progress", "--dist-backend", "gloo"))]
    assert main(args) == 0
    one = capsys.readouterr().out
    # --tp 2: one engine on rank 0 over a LockstepModel (dsv3.infer.lockstep); rank 0 prints the records
    res = run_local(cli_rank, 2, [*args, "--tp", "2"], init=False)
    assert [rc for rc, _, _ in res] == [0, 0], res[0][2][-2000:]
    assert res[0][1] == one and res[1][1] == ""
    # --dp 2: line 2 (index 1, rank 1's share) is larger than the cache; every rank stops before any forward
    big = write(tmp_path / "big.jsonl", '{"prompt": "a"}\n{"prompt_ids": [5], "max_new_tokens": 3000}\n'
                                         '{"prompt": "b"}\n')
    res = run_local(cli_rank, 2, ["generate", *map(str, base_args(d, big, "--cache-memory-mb", "1",
                                                                   "--dist-backend", "gloo", "--dp", "2"))],
                    init=False)
    assert [rc for rc, _, _ in res] == [2, 2]
    assert re.search(r"big\.jsonl:2: the request needs \d+ cache blocks", res[0][2]), res[0][2]
    assert res[1][2] == "" and res[0][1] == res[1][1] == ""
