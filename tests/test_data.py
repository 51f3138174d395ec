"""Corpus readers, the tokenized cache and the batch sampler. References: the tokenizer applied
directly to the documents, the UTF-8 byte counts of the source text, pyarrow-written Parquet."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dsv3.tokenizer import Tokenizer, train_bpe
from dsv3.train.data import (
    BatchSampler,
    TokenDataset,
    TokenizedCorpus,
    corpus_files,
    iter_documents,
    iter_pieces,
    load_corpus,
    prepare_corpus,
    token_dtype,
)

SHAKESPEARE = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"
TEXT = SHAKESPEARE.read_text(encoding="utf-8")[:60_000]
DOCS = [
    "First document.\nWith two lines.",
    "第二个文档：中文和 emoji 😀👍🏽。",
    "Third one, Ελληνικά and русский.",
    "  fourth\n\n\nhas spaces  ",
]


@pytest.fixture(scope="module")
def tok():
    return train_bpe([TEXT, *DOCS], vocab_size=600, chat_template=None)


def _stream(tok, docs):
    # The reference packing: <BOS> doc <EOS> for every non-empty document.
    out = []
    for d in docs:
        out += tok.encode(d, add_bos=True, add_eos=True)
    return out


def _all_tokens(folder):
    return np.concatenate(TokenizedCorpus(folder).tokens()).tolist()


# ---- readers -----------------------------------------------------------------------------
def test_readers_each_format(tmp_path):
    (tmp_path / "a.txt").write_text(DOCS[0], encoding="utf-8")
    sub = tmp_path / "sub" / "deeper"
    sub.mkdir(parents=True)
    (sub / "b.txt").write_text(DOCS[1], encoding="utf-8")
    (tmp_path / "ignored.md").write_text("not a corpus file")
    assert list(iter_documents(tmp_path / "a.txt")) == [DOCS[0]]
    # Folder: recursive, sorted by relative path ("a.txt" < "sub/deeper/b.txt"), other suffixes ignored.
    assert list(iter_documents(tmp_path)) == [DOCS[0], DOCS[1]]

    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"id": i, "body": d}, ensure_ascii=False) for i, d in enumerate(DOCS)) + "\n\n")
    assert list(iter_documents(jl, text_field="body")) == DOCS

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS + [None, ""], "n": list(range(6))}), tmp_path / "d.parquet")
    assert list(iter_documents(tmp_path / "d.parquet")) == DOCS
    assert corpus_files(tmp_path) == sorted(
        [tmp_path / "a.txt", jl, tmp_path / "d.parquet", sub / "b.txt"], key=lambda p: p.relative_to(tmp_path).as_posix())


def test_reader_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        list(iter_documents(tmp_path / "nope.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no"):
        list(iter_documents(tmp_path / "empty"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "also ok"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3"):
        list(iter_documents(bad))
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"text": "ok"}\n{"content": "x"}\n')
    with pytest.raises(ValueError, match=r"nofield\.jsonl:2: no field 'text'"):
        list(iter_documents(nofield))
    with pytest.raises(ValueError, match="not a string"):
        (tmp_path / "num.jsonl").write_text('{"text": 3}\n')
        list(iter_documents(tmp_path / "num.jsonl"))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match="no column 'text'.*'content'"):
        list(iter_documents(tmp_path / "p.parquet"))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        list(iter_documents(latin1))


def test_chunked_text_tokenizes_like_the_whole(tok, tmp_path):
    # A long text file is tokenized in pieces cut at newlines; the tokens must be those of the
    # whole text (the cut points are pre-token boundaries).
    f = tmp_path / "s.txt"
    f.write_text(TEXT, encoding="utf-8")
    pieces = list(iter_pieces(f, chunk_chars=1000))
    assert len(pieces) > 20 and "".join(p for p, _, _ in pieces) == TEXT
    assert [end for _, end, _ in pieces] == [False] * (len(pieces) - 1) + [True]
    folder = prepare_corpus(f, tok, tmp_path / "cache", progress=False, chunk_chars=1000, batch_chars=5000)
    assert _all_tokens(folder) == _stream(tok, [TEXT])


def test_chunked_deepseek_tokenizer_on_shakespeare(tmp_path):
    ds = Tokenizer.deepseek_v3()
    f = tmp_path / "s.txt"
    f.write_text(TEXT[:20_000], encoding="utf-8")
    folder = prepare_corpus(f, ds, tmp_path / "cache", progress=False, chunk_chars=700, batch_chars=3000)
    assert TokenizedCorpus(folder).shards[0].dtype == np.uint32  # 128815 ids do not fit uint16
    assert _all_tokens(folder) == _stream(ds, [TEXT[:20_000]])


# ---- tokenized cache -----------------------------------------------------------------------
def test_prepare_matches_direct_tokenization_and_shards(tok, tmp_path):
    jl = tmp_path / "docs.jsonl"
    jl.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in DOCS + [""] + DOCS))
    ref = _stream(tok, DOCS + DOCS)  # the empty document is skipped
    one = prepare_corpus(jl, tok, tmp_path / "c1", progress=False)
    many = prepare_corpus(jl, tok, tmp_path / "c2", progress=False, shard_tokens=17)
    assert _all_tokens(one) == _all_tokens(many) == ref
    corpus = TokenizedCorpus(many)
    assert len(corpus.shards) == -(-len(ref) // 17) and corpus.shards[0].dtype == np.uint16
    meta = corpus.meta
    assert meta["num_documents"] == 2 * len(DOCS)
    assert meta["num_tokens"] == len(ref)
    assert meta["num_bytes"] == 2 * sum(len(d.encode("utf-8")) for d in DOCS)
    assert meta["tokenizer"] == tok.fingerprint
    # Bytes per token of the whole stream = UTF-8 bytes of the documents / tokens (BOS/EOS count
    # as tokens of no text).
    train, val = corpus.split(0.0)
    assert len(val) == 0
    assert train.bytes_per_token == pytest.approx(meta["num_bytes"] / len(ref), rel=1e-12)


def test_cache_is_reused_and_invalidated(tok, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(TEXT[:5000], encoding="utf-8")
    folder = prepare_corpus(f, tok, tmp_path / "cache", progress=False)

    class NoEncode(Tokenizer):
        def encode_batch(self, *a, **k):
            raise AssertionError("tokenized again")

    same = NoEncode(tok.tokenizer, tok.config)
    assert prepare_corpus(f, same, tmp_path / "cache", progress=False) == folder
    f.write_text(TEXT[:4000], encoding="utf-8")  # the corpus changed: a new cache
    folder2 = prepare_corpus(f, tok, tmp_path / "cache", progress=False)
    assert folder2 != folder and _all_tokens(folder2) == _stream(tok, [TEXT[:4000]])
    other = train_bpe([TEXT[:20_000]], vocab_size=400, chat_template=None)  # another tokenizer
    assert prepare_corpus(f, other, tmp_path / "cache", progress=False) != folder2
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_empty_corpus_errors(tok, tmp_path):
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        prepare_corpus(tmp_path / "e.txt", tok, tmp_path / "cache", progress=False)
    (tmp_path / "e.jsonl").write_text('{"text": ""}\n\n')
    with pytest.raises(ValueError, match="empty"):
        prepare_corpus(tmp_path / "e.jsonl", tok, tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_token_dtype():
    assert token_dtype(65536) == np.uint16  # ids 0..65535
    assert token_dtype(65537) == np.uint32
    assert token_dtype(129280) == np.uint32


def test_split_and_bytes_per_token(tok, tmp_path):
    f = tmp_path / "s.txt"
    f.write_text(TEXT, encoding="utf-8")
    train, val = load_corpus(f, tok, tmp_path / "cache", val_fraction=0.1, progress=False)
    ref = _stream(tok, [TEXT])
    assert len(train) + len(val) == len(ref) and len(val) == -(-len(ref) // 10)
    val_tokens = np.concatenate([np.asarray(s) for s in val.segments]).tolist()
    assert val_tokens == ref[len(train):]
    # ASCII text: the validation tokens decode to exactly their bytes.
    val_text = tok.decode(val_tokens, skip_special_tokens=True)
    assert val.bytes_per_token == pytest.approx(len(val_text.encode("utf-8")) / len(val_tokens), rel=1e-12)
    assert val.num_bytes(torch.tensor(val_tokens)) == len(val_text.encode("utf-8"))
    with pytest.raises(ValueError, match="val_fraction"):
        TokenizedCorpus(prepare_corpus(f, tok, tmp_path / "cache", progress=False)).split(1.0)


# ---- sampling ------------------------------------------------------------------------------
def _positions(n, segments=(None,)):
    # A dataset whose token at stream position p is p: every window tells where it came from.
    arr = np.arange(n, dtype=np.uint32)
    if segments == (None,):
        return TokenDataset([arr])
    return TokenDataset(np.split(arr, list(segments)))


def test_batches_are_shifted_corpus_windows(tok, tmp_path):
    f = tmp_path / "s.txt"
    f.write_text(TEXT, encoding="utf-8")
    train, _ = load_corpus(f, tok, tmp_path / "cache", val_fraction=0.1, progress=False)
    stream = np.concatenate([np.asarray(s) for s in train.segments]).astype(np.int64)
    sampler = BatchSampler(train, seq_len=32, extra=2, seed=3)
    x, y = sampler.next_batch(6)
    assert x.shape == (6, 32) and y.shape == (6, 34) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :31])
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        window = np.concatenate([row_x, row_y[-3:]])
        starts = np.flatnonzero(stream[: len(stream) - 34] == window[0])
        assert any((stream[s:s + 35] == window).all() for s in starts)


def test_epoch_covers_every_target_once():
    seq, n = 16, 1000
    ds = _positions(n)
    sampler = BatchSampler(ds, seq_len=seq, extra=0, seed=7)
    per_epoch = sampler.windows_per_epoch
    targets = []
    while sampler.epoch == 0:
        _, y = sampler.next_batch(min(5, per_epoch - sampler.position))
        targets += y.flatten().tolist()
    assert len(targets) == len(set(targets)) == per_epoch * seq  # no target twice
    assert sorted(targets) == list(range(min(targets), min(targets) + per_epoch * seq))  # contiguous
    assert min(targets) <= seq  # starts within the first window's offset
    # The next epoch uses a different permutation (and usually offset).
    _, y_next = sampler.next_batch(4)
    assert y_next.shape == (4, seq)


def test_sampler_is_deterministic_and_resumes_exactly():
    ds = _positions(5000, segments=(1234, 4000))  # windows never cross segment boundaries
    sizes = [2, 2, 4, 4, 8, 8, 16, 16, 32, 32, 64, 64]  # a batch-size ramp, crossing epochs
    a = BatchSampler(ds, seq_len=20, extra=1, seed=11)
    b = BatchSampler(ds, seq_len=20, extra=1, seed=11)
    c = BatchSampler(ds, seq_len=20, extra=1, seed=12)
    first = [a.next_windows(s) for s in sizes[:6]]
    assert all(torch.equal(w, b.next_windows(s)) for w, s in zip(first, sizes[:6]))
    assert not all(torch.equal(w, c.next_windows(s)) for w, s in zip(first, sizes[:6]))
    state = json.loads(json.dumps(a.state_dict()))  # survives a JSON checkpoint
    rest = [a.next_windows(s) for s in sizes[6:]]
    assert a.epoch >= 1  # the run crossed an epoch boundary
    resumed = BatchSampler(ds, seq_len=20, extra=1, seed=11)
    resumed.load_state_dict(state)
    assert all(torch.equal(w, resumed.next_windows(s)) for w, s in zip(rest, sizes[6:]))
    for w in first + rest:
        assert (w[:, 1:] - w[:, :-1] == 1).all()  # contiguous positions: no window crosses a segment cut
        assert not ((w[:, :1] < 1234) & (w[:, -1:] >= 1234)).any()
        assert not ((w[:, :1] < 4000) & (w[:, -1:] >= 4000)).any()
    with pytest.raises(ValueError, match="seq_len"):
        BatchSampler(ds, seq_len=21, extra=1, seed=11).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        BatchSampler(ds, seq_len=20, extra=1, seed=5).load_state_dict(state)


def test_data_parallel_ranks_split_the_global_batch():
    ds = _positions(3000)
    full = BatchSampler(ds, seq_len=10, seed=1)
    ranks = [BatchSampler(ds, seq_len=10, seed=1, rank=r, world_size=4) for r in range(4)]
    for size in (4, 8, 12):
        whole = full.next_windows(size)
        assert torch.equal(torch.cat([r.next_windows(size) for r in ranks]), whole)
    with pytest.raises(ValueError, match="divisible"):
        ranks[0].next_windows(6)


def test_validation_batches_are_fixed():
    ds = _positions(205, segments=(100,))
    batches = list(ds.sequential_batches(batch_size=3, seq_len=10, extra=1))
    again = list(ds.sequential_batches(batch_size=3, seq_len=10, extra=1))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    starts = torch.cat([x[:, 0] for x, _ in batches]).tolist()
    # Stride seq_len from the start of each segment; windows of 12 tokens fit whole.
    assert starts == [0, 10, 20, 30, 40, 50, 60, 70, 80, 100, 110, 120, 130, 140, 150, 160, 170, 180, 190]
    for x, y in batches:
        assert x.shape[1] == 10 and y.shape[1] == 11 and torch.equal(y[:, :10], x + 1)
    assert len(list(ds.sequential_batches(3, 10, max_batches=2))) == 2


def test_too_small_dataset_errors():
    with pytest.raises(ValueError, match="too few"):
        BatchSampler(_positions(20), seq_len=32)
    with pytest.raises(ValueError, match="too few"):
        list(_positions(20).sequential_batches(2, 32))


def test_data_arguments(tok, tmp_path):
    import argparse

    from dsv3.train.data import add_data_arguments

    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps({"body": d}, ensure_ascii=False) + "\n" for d in DOCS * 30))
    args = add_data_arguments(argparse.ArgumentParser()).parse_args(
        ["--data", str(jl), "--text-field", "body", "--val-fraction", "0.25", "--data-cache", str(tmp_path / "c")])
    train, val = load_corpus(args.data, tok, args.data_cache, args.text_field, args.val_fraction, progress=False)
    assert len(val) == -(-len(_stream(tok, DOCS * 30)) // 4)
    with pytest.raises(ValueError, match="no field 'text'"):
        load_corpus(args.data, tok, args.data_cache, progress=False)
