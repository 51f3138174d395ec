"""Pre-training data: read a user corpus, tokenize it once into memory-mapped shards, and
sample deterministic, resumable batches of token windows.

Corpus formats: a plain text file (one document), a folder (every .txt / .jsonl / .parquet
file below it, sorted by path), JSON Lines with a text field, Parquet with a text column.

Documents are packed into one token stream as `<BOS> doc <EOS> <BOS> doc <EOS> ...` (DeepSeek-V3
sequences begin with BOS and the chat template ends every assistant turn with EOS, so packed
pre-training text already looks like that). The stream is written once to
`<cache>/<name>-<key>/tokens_XXXXX.bin` (raw np.uint16 when every id fits, else np.uint32) with
a meta.json; re-runs with the same files and tokenizer reuse it. The validation split is the
last `val_fraction` of the stream's tokens, so it is chosen at load time, not baked in the cache.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dsv3.tokenizer import Tokenizer

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
CACHE_FORMAT = 1
DEFAULT_SHARD_TOKENS = 1 << 28  # 256M tokens: 512 MiB (uint16) or 1 GiB (uint32) per shard


def default_cache_dir() -> Path:
    return Path(os.environ.get("DSV3_CACHE", Path.home() / ".cache" / "dsv3")) / "data"


# ---- readers ---------------------------------------------------------------------------
def corpus_files(path) -> list[Path]:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"corpus path {path} does not exist")
    if path.is_file():
        return [path]
    suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
    files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes]
    if not files:
        raise ValueError(f"corpus folder {path} has no {'/'.join(suffixes)} files (searched recursively)")
    # Sorted by path relative to the folder, so the order (hence the token stream) does not
    # depend on the file system's listing order.
    return sorted(files, key=lambda p: p.relative_to(path).as_posix())


def _cut_point(text: str) -> int:
    # Where a long text may be cut into independently tokenized pieces without changing its
    # tokens: right after a newline that is followed by a non-space character. In DeepSeek-V3's
    # pre-tokenizer (and GPT-2-style ones) no pre-token runs across such a point: newline runs
    # end pre-tokens, and a word may take at most one leading non-newline character.
    i = len(text) - 1
    while True:
        i = text.rfind("\n", 0, i)
        if i < 0:
            return -1
        if i + 1 < len(text) and not text[i + 1].isspace():
            return i + 1


def _text_pieces(file: Path, chunk_chars: int) -> Iterator[tuple[str, bool, int]]:
    # A plain text file is one document, streamed in pieces of about `chunk_chars` characters.
    buf = ""
    with open(file, encoding="utf-8", newline="") as f:
        while True:
            try:
                data = f.read(chunk_chars)
            except UnicodeDecodeError as e:
                raise ValueError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start} of a read block)") from e
            buf += data
            if not data:
                break
            if len(buf) < chunk_chars:
                continue
            cut = _cut_point(buf)
            if cut <= 0:
                # No safe point (e.g. a file without newlines): keep reading; cut anyway past
                # 16 chunks to bound memory (the tokens near that one cut may differ).
                if len(buf) < 16 * chunk_chars:
                    continue
                cut = len(buf)
            piece, buf = buf[:cut], buf[cut:]
            yield piece, False, len(piece.encode("utf-8"))
    yield buf, True, len(buf.encode("utf-8"))


def _jsonl_pieces(file: Path, text_field: str) -> Iterator[tuple[str, bool, int]]:
    with open(file, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                yield "", True, len(line)
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{file}:{lineno}: malformed JSON line ({e})") from e
            if not isinstance(record, dict):
                raise ValueError(f"{file}:{lineno}: expected a JSON object, got {type(record).__name__}")
            if text_field not in record:
                raise ValueError(
                    f"{file}:{lineno}: no field {text_field!r} (fields: {', '.join(map(repr, record))}); "
                    f"choose the field with --text-field"
                )
            text = record[text_field]
            if text is None:
                text = ""
            if not isinstance(text, str):
                raise ValueError(f"{file}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string")
            yield text, True, len(line)


def _parquet_pieces(file: Path, text_field: str) -> Iterator[tuple[str, bool, int]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(file)
    except Exception as e:
        raise ValueError(f"{file}: not a readable Parquet file ({e})") from e
    columns = pf.schema_arrow.names
    if text_field not in columns:
        raise ValueError(
            f"{file}: no column {text_field!r} (columns: {', '.join(map(repr, columns))}); "
            f"choose the column with --text-field"
        )
    rows = max(pf.metadata.num_rows, 1)
    size = file.stat().st_size
    done = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise ValueError(f"{file}: column {text_field!r} holds {type(text).__name__}, not strings")
            # Progress in file bytes, spread evenly over the rows.
            advance = size * (done + 1) // rows - size * done // rows
            done += 1
            yield text or "", True, advance


def iter_pieces(path, text_field: str = "text", chunk_chars: int = 1 << 22) -> Iterator[tuple[str, bool, int]]:
    """(text, ends_document, source_bytes_consumed) over the whole corpus; empty documents
    appear as ("", True, n) and are the caller's to skip."""
    for file in corpus_files(path):
        suffix = file.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            yield from _jsonl_pieces(file, text_field)
        elif suffix in PARQUET_SUFFIXES:
            yield from _parquet_pieces(file, text_field)
        else:
            yield from _text_pieces(file, chunk_chars)


def iter_documents(path, text_field: str = "text") -> Iterator[str]:
    parts = []
    for text, end, _ in iter_pieces(path, text_field):
        parts.append(text)
        if end:
            doc = "".join(parts)
            parts = []
            if doc:
                yield doc


# ---- tokenization into a cache -----------------------------------------------------------
def token_dtype(vocab_size: int) -> np.dtype:
    # uint16 holds ids 0..65535, i.e. a vocabulary of up to 65536 tokens; DeepSeek-V3's
    # 128815 (129280 in the model) needs uint32.
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _cache_key(files: list[Path], root: Path, tokenizer: Tokenizer, text_field: str) -> str:
    desc = {
        "format": CACHE_FORMAT,
        "tokenizer": tokenizer.fingerprint,
        "text_field": text_field,
        "root": str(root.resolve()),
        # Size and modification time stand for the content (as make does): hashing a large
        # corpus on every run would cost as much as reading it.
        "files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


class _ShardWriter:
    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int):
        self.folder, self.dtype, self.shard_tokens = folder, dtype, shard_tokens
        self.shards: list[dict] = []
        self._f = None
        self._n = 0

    def write(self, ids: np.ndarray):
        while len(ids):
            if self._f is None or self._n == self.shard_tokens:
                self._open()
            take = min(len(ids), self.shard_tokens - self._n)
            self._f.write(ids[:take].astype(self.dtype, copy=False).tobytes())
            self._n += take
            self.shards[-1]["num_tokens"] = self._n
            ids = ids[take:]

    def _open(self):
        self.close()
        name = f"tokens_{len(self.shards):05d}.bin"
        self._f = open(self.folder / name, "wb")
        self._n = 0
        self.shards.append({"file": name, "num_tokens": 0})

    def close(self):
        if self._f is not None:
            self._f.close()
            self._f = None


def prepare_corpus(
    path,
    tokenizer: Tokenizer,
    cache_dir=None,
    text_field: str = "text",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = True,
    chunk_chars: int = 1 << 22,
    batch_chars: int = 1 << 22,
) -> Path:
    """Tokenize `path` once into `cache_dir`; returns the cache folder (reused when the files and
    the tokenizer are unchanged)."""
    path = Path(path)
    files = corpus_files(path)
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no eos_token: documents could not be separated")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    root = path if path.is_dir() else path.parent
    key = _cache_key(files, root, tokenizer, text_field)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache_dir / f"{path.stem or 'corpus'}-{key[:16]}"
    meta_file = folder / "meta.json"
    if meta_file.is_file():
        with open(meta_file) as f:
            if json.load(f).get("key") == key:
                return folder

    dtype = token_dtype(tokenizer.vocab_size)
    tmp = cache_dir / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = _ShardWriter(tmp, dtype, shard_tokens)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    n_docs = n_bytes = 0
    doc_open = False  # inside a document whose BOS has been written
    texts: list[str] = []
    ends: list[bool] = []
    chars = 0

    def flush():
        nonlocal doc_open, n_docs
        for ids, end in zip(tokenizer.encode_batch(texts), ends):
            out = []
            if not doc_open and bos is not None:
                out.append(bos)
            doc_open = True
            out.extend(ids)
            if end:
                out.append(eos)
                doc_open = False
                n_docs += 1
            writer.write(np.asarray(out, dtype=np.int64))
        texts.clear()
        ends.clear()

    total = sum(f.stat().st_size for f in files)
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenizing {path.name}", disable=not progress) as bar:
            in_doc = False  # the current document has text already (buffered or written)
            for text, end, consumed in iter_pieces(path, text_field, chunk_chars):
                bar.update(consumed)
                if not text and end and not in_doc:
                    continue  # an empty document
                in_doc = not end
                n_bytes += len(text.encode("utf-8"))
                texts.append(text)
                ends.append(end)
                chars += len(text)
                if chars >= batch_chars:
                    flush()
                    chars = 0
            flush()
        writer.close()
        if n_docs == 0:
            raise ValueError(f"corpus {path} is empty: no text found in {len(files)} file(s)")
        shards = [s for s in writer.shards if s["num_tokens"] > 0]
        nbytes = tokenizer.token_byte_lengths()
        np.save(tmp / "token_nbytes.npy", nbytes.astype(np.int32))
        meta = {
            "format": CACHE_FORMAT,
            "key": key,
            "corpus": str(path.resolve()),
            "num_files": len(files),
            "text_field": text_field,
            "tokenizer": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size,
            "bos_id": bos,
            "eos_id": eos,
            "dtype": dtype.name,
            "num_documents": n_docs,
            "num_tokens": sum(s["num_tokens"] for s in shards),
            "num_bytes": n_bytes,
            "shards": shards,
        }
        # meta.json is written last and the folder renamed into place, so an interrupted run
        # never leaves a cache that looks complete.
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=2)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


class TokenizedCorpus:
    def __init__(self, folder):
        self.folder = Path(folder)
        meta_file = self.folder / "meta.json"
        if not meta_file.is_file():
            raise ValueError(f"{self.folder} is not a tokenized corpus (no meta.json)")
        with open(meta_file) as f:
            self.meta = json.load(f)
        dtype = np.dtype(self.meta["dtype"])
        self.shards = [
            np.memmap(self.folder / s["file"], dtype=dtype, mode="r", shape=(s["num_tokens"],))
            for s in self.meta["shards"]
        ]
        self.token_nbytes = np.load(self.folder / "token_nbytes.npy")

    @classmethod
    def build(cls, path, tokenizer: Tokenizer, cache_dir=None, text_field: str = "text", **kw) -> "TokenizedCorpus":
        return cls(prepare_corpus(path, tokenizer, cache_dir, text_field, **kw))

    @property
    def num_tokens(self) -> int:
        return self.meta["num_tokens"]

    def tokens(self, start: int = 0, end: int | None = None) -> list[np.ndarray]:
        # The stream positions [start, end) as views of the shards (one per shard touched).
        end = self.num_tokens if end is None else end
        out, offset = [], 0
        for shard in self.shards:
            a, b = max(start - offset, 0), min(end - offset, len(shard))
            if a < b:
                out.append(shard[a:b])
            offset += len(shard)
        return out

    def split(self, val_fraction: float = 0.05) -> tuple["TokenDataset", "TokenDataset"]:
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        n = self.num_tokens
        n_val = math.ceil(val_fraction * n)
        cut = n - n_val
        name = self.meta["key"][:16]
        train = TokenDataset(self.tokens(0, cut), self.token_nbytes, f"{name}:train:{cut}")
        val = TokenDataset(self.tokens(cut, n), self.token_nbytes, f"{name}:val:{cut}:{n}")
        return train, val


def load_corpus(
    path, tokenizer: Tokenizer, cache_dir=None, text_field: str = "text", val_fraction: float = 0.05, **kw
) -> tuple["TokenDataset", "TokenDataset"]:
    """Tokenize (or reuse the cache of) `path` and return its (train, validation) datasets."""
    return TokenizedCorpus.build(path, tokenizer, cache_dir, text_field, **kw).split(val_fraction)


def add_data_arguments(parser):
    # The corpus flags, for commands that read a training corpus (e.g. `dsv3 train`).
    parser.add_argument("--data", help="training corpus: a .txt file, a folder of .txt/.jsonl/.parquet files "
                        "(recursive), a .jsonl file or a .parquet file")
    parser.add_argument("--text-field", default="text",
                        help="JSONL field / Parquet column holding the document text (default: text)")
    parser.add_argument("--val-fraction", type=float, default=0.05,
                        help="last fraction of the corpus tokens held out for validation (default: 0.05)")
    parser.add_argument("--data-cache", default=None,
                        help="folder for tokenized corpora (default: $DSV3_CACHE/data or ~/.cache/dsv3/data)")
    return parser


# ---- datasets and sampling ---------------------------------------------------------------
class TokenDataset:
    """A token stream made of one or more contiguous segments (windows never cross segments:
    a shard boundary or the train/validation cut)."""

    def __init__(self, segments: list[np.ndarray], token_nbytes: np.ndarray | None = None, name: str = "tokens"):
        self.segments = [s for s in segments if len(s) > 0]
        self.token_nbytes = token_nbytes
        self.name = name

    def __len__(self) -> int:
        return sum(len(s) for s in self.segments)

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes of text per token (document separators count as tokens of 0 bytes), so
        that bits/byte = (mean loss in nats per token) / ln 2 / bytes_per_token."""
        if self.token_nbytes is None:
            raise ValueError("this dataset has no token byte lengths (build it with TokenizedCorpus)")
        n = len(self)
        if n == 0:
            raise ValueError(f"dataset {self.name} is empty")
        step = 1 << 24  # read memory-mapped segments in slices
        total = sum(
            int(self.token_nbytes[np.asarray(s[i:i + step])].sum())
            for s in self.segments
            for i in range(0, len(s), step)
        )
        return total / n

    def num_bytes(self, tokens) -> int:
        # Bytes of text that `tokens` (e.g. the targets a validation pass scored) stand for.
        if self.token_nbytes is None:
            raise ValueError("this dataset has no token byte lengths (build it with TokenizedCorpus)")
        t = tokens.numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
        return int(self.token_nbytes[t].sum())

    def window_starts(self, window: int, stride: int, offset: int = 0) -> list[np.ndarray]:
        # Per segment, the starts of the windows offset, offset + stride, ... that fit whole.
        out = []
        for s in self.segments:
            n = (len(s) - offset - window) // stride + 1 if len(s) - offset >= window else 0
            out.append(offset + stride * np.arange(max(n, 0), dtype=np.int64))
        return out

    def read(self, segment: int, start: int, length: int) -> np.ndarray:
        return np.asarray(self.segments[segment][start:start + length], dtype=np.int64)

    def sequential_batches(
        self, batch_size: int, seq_len: int, extra: int = 0, max_batches: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed validation windows: stride seq_len from the start of each segment, in order, so
        every call (and every run) scores the same tokens. The last batch may be smaller."""
        _check_shape(batch_size, seq_len, extra)
        window = seq_len + 1 + extra
        starts = [(i, int(p)) for i, seg in enumerate(self.window_starts(window, seq_len)) for p in seg]
        if not starts:
            raise ValueError(
                f"dataset {self.name} has {len(self)} tokens: too few for one window of {window} tokens "
                f"(seq_len {seq_len} + 1 + extra {extra})"
            )
        for b, i in enumerate(range(0, len(starts), batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            rows = np.stack([self.read(seg, p, window) for seg, p in starts[i:i + batch_size]])
            yield _split_window(torch.from_numpy(rows), seq_len)


def _check_shape(batch_size: int, seq_len: int, extra: int):
    if batch_size < 1 or seq_len < 1 or extra < 0:
        raise ValueError(f"need batch_size >= 1, seq_len >= 1, extra >= 0; got {batch_size}, {seq_len}, {extra}")


def _split_window(windows: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    # windows (B, S + 1 + extra) -> inputs (B, S), targets (B, S + extra): targets[:, k:k+S] are
    # the tokens k + 1 ahead of the inputs, i.e. the main next-token targets for k = 0 and the
    # depth-k multi-token-prediction targets for k >= 1 (paper §2.2).
    return windows[:, :seq_len], windows[:, 1:]


class BatchSampler:
    """Deterministic, resumable sampling of training windows.

    Each epoch cuts the stream into windows of seq_len + 1 + extra tokens at stride seq_len
    (consecutive windows overlap by 1 + extra, so every token is a next-token target once per
    epoch), from a random offset in [0, seq_len) so epochs see different cuts, and visits them
    in a random permutation. Both come from (seed, epoch) alone, so the sampler's state is two
    integers and a resumed run draws exactly the batches the uninterrupted run would have, also
    when the batch size changes from step to step (batch-size ramp, paper §4.2).

    With world_size > 1 each data-parallel rank takes its slice of the global batch."""

    def __init__(
        self,
        dataset: TokenDataset,
        seq_len: int,
        extra: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        _check_shape(1, seq_len, extra)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.dataset = dataset
        self.seq_len, self.extra, self.seed = seq_len, extra, seed
        self.rank, self.world_size = rank, world_size
        self.window = seq_len + 1 + extra
        if sum(len(s) for s in dataset.window_starts(self.window, seq_len)) == 0:
            raise ValueError(
                f"dataset {dataset.name} has {len(dataset)} tokens in {len(dataset.segments)} segment(s): too few for "
                f"one window of {self.window} tokens (seq_len {seq_len} + 1 + extra {extra})"
            )
        self.epoch = 0
        self.position = 0  # windows of the current epoch already drawn
        self._plan_epoch = None

    def _plan(self, epoch: int):
        # (offset, cumulative window counts per segment, permutation) of one epoch.
        if self._plan_epoch is not None and self._plan_epoch[0] == epoch:
            return self._plan_epoch[1]
        # numpy's Generator is reproducible for a given numpy version: resume in the same
        # environment (checkpoints record the sampler state, not the batches).
        rng = np.random.default_rng([self.seed, epoch])
        offset = int(rng.integers(0, self.seq_len))
        starts = self.dataset.window_starts(self.window, self.seq_len, offset)
        if sum(len(s) for s in starts) == 0:  # a short stream where only offset 0 fits
            offset, starts = 0, self.dataset.window_starts(self.window, self.seq_len, 0)
        counts = np.cumsum([len(s) for s in starts])
        perm = rng.permutation(int(counts[-1]))
        plan = (offset, counts, perm)
        self._plan_epoch = (epoch, plan)
        return plan

    @property
    def windows_per_epoch(self) -> int:
        return int(self._plan(self.epoch)[1][-1])

    def next_windows(self, batch_size: int) -> torch.Tensor:
        """The next global batch of `batch_size` windows; this rank's rows: (batch_size /
        world_size, seq_len + 1 + extra) int64."""
        _check_shape(batch_size, self.seq_len, self.extra)
        if batch_size % self.world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by world_size {self.world_size}")
        picks = []
        while len(picks) < batch_size:
            offset, counts, perm = self._plan(self.epoch)
            take = min(batch_size - len(picks), len(perm) - self.position)
            for idx in perm[self.position:self.position + take]:
                seg = int(np.searchsorted(counts, idx, side="right"))
                local = int(idx) - (int(counts[seg - 1]) if seg else 0)
                picks.append((seg, offset + local * self.seq_len))
            self.position += take
            if self.position == len(perm):
                self.epoch, self.position = self.epoch + 1, 0
        per_rank = batch_size // self.world_size
        mine = picks[self.rank * per_rank:(self.rank + 1) * per_rank]
        return torch.from_numpy(np.stack([self.dataset.read(seg, p, self.window) for seg, p in mine]))

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs (B, seq_len), targets (B, seq_len + extra)) LongTensors, B = batch_size /
        world_size; targets[:, :seq_len] are the next-token targets."""
        return _split_window(self.next_windows(batch_size), self.seq_len)

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "seq_len": self.seq_len,
            "extra": self.extra,
            "dataset": self.dataset.name,
            "num_tokens": len(self.dataset),
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: dict):
        for key, mine in (("seed", self.seed), ("seq_len", self.seq_len), ("extra", self.extra),
                          ("dataset", self.dataset.name), ("num_tokens", len(self.dataset))):
            if state.get(key) != mine:
                raise ValueError(
                    f"cannot resume the batch sampler: the checkpoint has {key}={state.get(key)!r}, this run "
                    f"{key}={mine!r} (resuming needs the same data, tokenizer, seed and window shape)"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if not 0 <= self.position < self.windows_per_epoch:
            raise ValueError(f"sampler state position {self.position} is outside epoch {self.epoch}")
