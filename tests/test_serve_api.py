"""The OpenAI-compatible server against real clients and independent references.

A tiny random DeepSeek-V3 model (preset "tiny") with a byte-level BPE trained on Shakespeare is
served on a loopback port by uvicorn in a thread. Clients: the `openai` SDK (sync, async,
streaming) and raw httpx. References: greedy decoding with `dsv3.generate` on a second copy of
the weights (the engine's own reference, contiguous cache, no batching), the model's full
forward (log-probabilities), transformers' tokenizer and chat template on the same folder, and
the chat template DeepSeek released (tool-call format).

End-to-end tool calls: a random model never writes tool-call tokens by itself, so one test
scripts the sampler (it monkeypatches Engine._process so that the greedy choice follows a token
script for requests carrying a marker seed); everything after the sampler -- engine, stop
handling, the tool-call parser, SSE, the SDK's parsing -- is the real path. A named tool_choice
is exercised without any scripting (the server forces the call's opening tokens).
"""
import asyncio
import json
import math
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

import dsv3
from dsv3.config import preset
from dsv3.infer.engine import Engine
from dsv3.serve.app import Server, create_app, make_uvicorn_server
from dsv3.tokenizer import Tokenizer, train_bpe

DATA = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"
MODEL = "tiny"


# ---------------------------------------------------------------------- shared helpers (imported by
# the other test_serve_* files)
def build_model_dir(folder: Path, seed: int = 0) -> Path:
    """A tiny random DeepSeek-V3 (MoE + MTP) with a 512-token BPE trained on Shakespeare."""
    text = DATA.read_text(encoding="utf-8")[:100_000]
    tok = train_bpe([text[i:i + 2000] for i in range(0, len(text), 2000)], vocab_size=512)
    cfg = preset("tiny").replace(vocab_size=512, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(seed)
    model = dsv3.Transformer(cfg).init_weights(std=0.1)
    dsv3.save_model(model, folder)
    tok.save(folder)
    return folder


def make_server(folder: Path, api_key=None, **engine_kw) -> Server:
    model = dsv3.load_model(folder, dtype=torch.float32).eval()
    kw = dict(block_size=16, cache_memory=16 << 20, max_num_seqs=64, max_num_batched_tokens=512,
              max_model_len=1024, max_queue=256)
    kw.update(engine_kw)
    return Server(Engine(model, **kw), Tokenizer.from_dir(folder), [MODEL], root=str(folder), api_key=api_key)


class ServerThread:
    """uvicorn serving the app on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, server: Server):
        self.server = server
        self.app = create_app(server)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.uv = make_uvicorn_server(self.app, "127.0.0.1", self.port, log_level="warning", shutdown_timeout=10)
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.uv.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.uv.should_exit = True
        self.thread.join(30)


def wait_until(cond, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def tok(folder):
    return Tokenizer.from_dir(folder)


@pytest.fixture(scope="module")
def ref_model(folder):
    # a second copy of the weights: the server's engine owns the first (it switches attention paths)
    return dsv3.load_model(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def srv(folder):
    with ServerThread(make_server(folder)) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def greedy_ref(ref_model, tok, ids, n):
    return dsv3.generate(ref_model, [ids], max_new_tokens=n, eos_id=tok.eos_id)[0]


def visible(tok, ids):
    """The text a client sees for generated ids (EOS is a stop token, never text)."""
    return tok.decode([t for t in ids if t != tok.eos_id], skip_special_tokens=True)


def chat_ids(tok, messages):
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


CHATS = [
    [{"role": "user", "content": "Good morrow, sweet lady."}],
    [{"role": "system", "content": "Answer in verse."}, {"role": "user", "content": "What light through yonder?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well met."},
     {"role": "user", "content": "Tell me of Rome."}],
]


# ---------------------------------------------------------------------- models, health
def test_models_health_version(srv, client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    m = models[0]
    assert m.object == "model" and m.owned_by == "dsv3" and m.root == srv.server.root and m.created > 0
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.body["code"] == "model_not_found"
    r = httpx.get(srv.url + "/health")
    assert r.status_code == 200
    assert httpx.get(srv.url + "/version").json()["version"]


# ---------------------------------------------------------------------- chat
@pytest.mark.parametrize("i", range(len(CHATS)))
def test_chat_greedy_equals_reference(client, tok, ref_model, i):
    msgs = CHATS[i]
    ids = chat_ids(tok, msgs)
    want = greedy_ref(ref_model, tok, ids, 20)
    limit = {"max_completion_tokens": 20} if i == 1 else {"max_tokens": 20}  # the newer name, or the older
    r = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0,
                                       extra_body={"return_token_ids": True}, **limit)
    c = r.choices[0]
    assert c.token_ids == want
    assert c.prompt_token_ids == ids
    assert c.message.role == "assistant" and c.message.content == visible(tok, want)
    assert c.finish_reason == ("stop" if want[-1] == tok.eos_id else "length")
    u = r.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (len(ids), len(want), len(ids) + len(want))
    assert u.prompt_cache_hit_tokens + u.prompt_cache_miss_tokens == u.prompt_tokens
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def test_chat_streaming_sync(srv, client, tok, ref_model):
    msgs = CHATS[1]
    want = greedy_ref(ref_model, tok, chat_ids(tok, msgs), 16)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.choices[0].delta.role is None for ch in chunks[1:] if ch.choices)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == visible(tok, want)
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["stop" if want[-1] == tok.eos_id else "length"]
    # the usage chunk comes last, with no choices; the others carry usage null
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want)
    assert all(ch.usage is None for ch in chunks[:-1])
    assert len({ch.id for ch in chunks}) == 1
    # the wire format: SSE data lines, terminated by [DONE]
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json={
            "model": MODEL, "messages": msgs, "max_tokens": 4, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    assert "usage" not in json.loads(lines[1][6:])  # only with stream_options.include_usage


def test_async_client_matches_sync(srv, client, tok, ref_model):
    async def main():
        ac = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        chat = [ac.chat.completions.create(model=MODEL, messages=m, max_tokens=12, temperature=0) for m in CHATS]
        comp = ac.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=12, temperature=0)

        async def streamed():
            s = await ac.chat.completions.create(model=MODEL, messages=CHATS[0], max_tokens=12, temperature=0,
                                                 stream=True)
            return "".join([ch.choices[0].delta.content or "" async for ch in s if ch.choices])

        out = await asyncio.gather(*chat, comp, streamed())
        await ac.close()
        return out

    *chats, comp, streamed = asyncio.run(main())
    for m, r in zip(CHATS, chats):
        assert r.choices[0].message.content == visible(tok, greedy_ref(ref_model, tok, chat_ids(tok, m), 12))
    assert streamed == chats[0].choices[0].message.content
    assert comp.choices[0].text == visible(tok, greedy_ref(ref_model, tok, tok.encode("ROMEO:"), 12))


def test_chat_logprobs_match_the_model(client, tok, ref_model):
    msgs = CHATS[0]
    ids = chat_ids(tok, msgs)
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"return_token_ids": True})
    out = r.choices[0].token_ids
    with torch.no_grad():  # teacher-forced full forward over prompt + answer
        lp = ref_model(torch.tensor([ids + out]))[0].float().log_softmax(-1)
    content = r.choices[0].logprobs.content
    assert len(content) == len(out)
    for j, (t, e) in enumerate(zip(out, content)):
        row = lp[len(ids) - 1 + j]
        assert e.token == tok.decode([t]) and bytes(e.bytes) == tok.token_bytes(t)
        assert math.isclose(e.logprob, row[t].item(), abs_tol=1e-4)
        top = row.topk(3)
        assert [x.logprob for x in e.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [x.token for x in e.top_logprobs] == [tok.decode([i]) for i in top.indices.tolist()]


def test_stop_strings(client, tok, ref_model):
    msgs = CHATS[2]
    full = visible(tok, greedy_ref(ref_model, tok, chat_ids(tok, msgs), 24))
    assert len(full) > 12
    stop = full[6:9]
    want = full[:full.index(stop)]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0,
                                       stop=[stop, "\x00never"])
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    s = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0, stop=stop,
                                       stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices) == want
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0, stop=stop,
                                       extra_body={"include_stop_str_in_output": True})
    assert r.choices[0].message.content == want + stop


def test_sampling_seed_and_n(client, tok):
    kw = dict(model=MODEL, messages=CHATS[0], max_tokens=16, temperature=1.0, top_p=0.95, presence_penalty=0.5,
              frequency_penalty=0.5)
    a = client.chat.completions.create(seed=1234, n=3, extra_body={"return_token_ids": True}, **kw)
    b = client.chat.completions.create(seed=1234, n=3, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    # each choice has its own seed: with 512 tokens and 16 draws, three equal choices would be a bug
    assert len({c.message.content for c in a.choices}) > 1
    # the prompt is billed once, the completions of every choice add up
    assert a.usage.prompt_tokens == len(chat_ids(tok, CHATS[0]))
    assert a.usage.completion_tokens == sum(len(c.token_ids) for c in a.choices)
    # n > 1 streamed: every choice starts with its own role delta and ends with a finish_reason
    chunks = list(client.chat.completions.create(seed=1, n=2, stream=True, **kw))
    roles = [ch.choices[0].index for ch in chunks if ch.choices and ch.choices[0].delta.role]
    ends = sorted(ch.choices[0].index for ch in chunks if ch.choices and ch.choices[0].finish_reason)
    assert roles == [0, 1] and ends == [0, 1]


# ---------------------------------------------------------------------- completions
def test_completions_prompt_forms(client, tok, ref_model):
    texts = ["First Citizen:", "KING RICHARD III:\nNow is"]
    ids = [tok.encode(t) for t in texts]
    want = [greedy_ref(ref_model, tok, p, 10) for p in ids]
    forms = [texts[0], texts, ids[0], ids]
    for form in forms:
        r = client.completions.create(model=MODEL, prompt=form, max_tokens=10, temperature=0)
        k = 1 if form in (texts[0], ids[0]) else 2
        assert [c.index for c in r.choices] == list(range(k))
        assert [c.text for c in r.choices] == [visible(tok, w) for w in want[:k]]
        assert r.usage.prompt_tokens == sum(map(len, ids[:k]))
        assert r.usage.completion_tokens == sum(map(len, want[:k]))
    # n choices per prompt: index = prompt * n + choice (OpenAI's order)
    r = client.completions.create(model=MODEL, prompt=texts, max_tokens=10, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [visible(tok, want[0])] * 2 + [visible(tok, want[1])] * 2
    # streamed, two prompts: the pieces of each index add up to its text
    parts = {}
    for ch in client.completions.create(model=MODEL, prompt=texts, max_tokens=10, temperature=0, stream=True):
        for c in ch.choices:
            parts[c.index] = parts.get(c.index, "") + c.text
    assert parts == {0: visible(tok, want[0]), 1: visible(tok, want[1])}


def test_completions_echo_logprobs_score_the_prompt(client, tok, ref_model):
    """What lm-evaluation-harness's loglikelihood requests do: echo + logprobs, max_tokens 0 or 1,
    prompt as token ids. Every prompt token's logprob equals the model's full forward."""
    ids = tok.encode("Before we proceed any further, hear me speak.")
    with torch.no_grad():
        lp = ref_model(torch.tensor([ids]))[0].float().log_softmax(-1)
    for max_tokens in (0, 1):
        r = client.completions.create(model=MODEL, prompt=ids, max_tokens=max_tokens, temperature=0, echo=True,
                                      logprobs=2)
        c = r.choices[0]
        L = c.logprobs
        assert len(L.tokens) == len(ids) + max_tokens
        assert L.token_logprobs[0] is None and L.top_logprobs[0] is None
        for i in range(1, len(ids)):
            assert math.isclose(L.token_logprobs[i], lp[i - 1, ids[i]].item(), abs_tol=1e-4)
            top = lp[i - 1].topk(2)
            want = {tok.decode([t]): v for t, v in zip(top.indices.tolist(), top.values.tolist())}
            want.setdefault(tok.decode([ids[i]]), lp[i - 1, ids[i]].item())
            assert L.top_logprobs[i].keys() == want.keys()
        assert L.tokens[:len(ids)] == [tok.decode([t]) for t in ids]
        # offsets index the returned text: each token's piece starts where the previous one ended
        assert c.text.startswith(tok.decode(ids)) and L.text_offset == sorted(L.text_offset)
        assert [c.text[a:b] for a, b in zip(L.text_offset, L.text_offset[1:])] == \
            [tok.decode([t]) for t in ids[:len(L.text_offset) - 1]]
        if max_tokens:
            nxt = lp[-1].argmax().item()
            assert math.isclose(L.token_logprobs[-1], lp[-1, nxt].item(), abs_tol=1e-4)
            assert L.token_logprobs[-1] == max(L.top_logprobs[-1].values())  # lm-eval's is_greedy
        assert c.finish_reason == "length" and r.usage.completion_tokens == max_tokens


def test_prefix_cache_hits_are_reported(srv, client, tok):
    ids = tok.encode("To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
                     "the slings and arrows of outrageous fortune")
    assert len(ids) > 33
    hits_before = srv.server.engine.stats().prefix_cache_hits
    a = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    b = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert a.choices[0].text == b.choices[0].text
    bs = srv.server.engine.block_size
    # full blocks are reused, as long as one prompt token is left to compute
    want = (len(ids) - 1) // bs * bs
    assert b.usage.prompt_cache_hit_tokens == want == b.usage.prompt_tokens_details.cached_tokens
    assert b.usage.prompt_cache_miss_tokens == len(ids) - want
    assert srv.server.engine.stats().prefix_cache_hits - hits_before >= want


# ---------------------------------------------------------------------- tools
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
SCRIPT_SEED = 987654321


@pytest.fixture
def scripted(srv, monkeypatch):
    """Make greedy choices follow SCRIPT for requests with seed=SCRIPT_SEED (test-only sampler)."""
    engine = srv.server.engine
    script: list[int] = []
    orig = engine._process

    def process(reqs, logits, extra=None):
        x = orig(reqs, logits, extra)
        for i, r in enumerate(reqs):
            if r.params.seed == SCRIPT_SEED:
                pos = r.num_output_tokens + (len(extra[i]) if extra else 0)
                if pos < len(script):
                    x = x.clone() if x is logits else x
                    x[i] = float("-inf")
                    x[i, script[pos]] = 0.0
        return x

    monkeypatch.setattr(engine, "_process", process)
    return script


def test_tool_calls_end_to_end(client, tok, scripted):
    calls = [{"id": "call_a", "type": "function",
              "function": {"name": "get_weather", "arguments": json.dumps({"city": "Verona"})}},
             {"id": "call_b", "type": "function",
              "function": {"name": "get_weather", "arguments": json.dumps({"city": "Mantua"})}}]
    # the answer, written in DeepSeek's format by the released chat template itself
    rendered = tok.apply_chat_template([{"role": "user", "content": "x"},
                                        {"role": "assistant", "content": "Checking.", "tool_calls": calls}])
    answer = rendered.split("<｜Assistant｜>", 1)[1]
    assert answer.endswith(tok.eos_token)
    scripted[:] = tok.encode(answer)
    msgs = [{"role": "user", "content": "Weather in Verona and Mantua?"}]
    kw = dict(model=MODEL, messages=msgs, tools=[WEATHER], max_tokens=len(scripted) + 5, temperature=0,
              seed=SCRIPT_SEED)
    r = client.chat.completions.create(**kw)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    assert c.message.content == "Checking."
    assert [(t.type, t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls] == \
        [("function", "get_weather", {"city": "Verona"}), ("function", "get_weather", {"city": "Mantua"})]
    assert len({t.id for t in c.message.tool_calls}) == 2
    # streamed: the deltas rebuild the same calls; the name comes once, in the first delta of each call
    content, got, finish = "", {}, None
    for ch in client.chat.completions.create(stream=True, **kw):
        d = ch.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            if tc.id is not None:
                assert tc.index not in got and tc.function.name
                got[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
            else:
                assert tc.function.name is None
            got[tc.index]["arguments"] += tc.function.arguments or ""
        finish = ch.choices[0].finish_reason or finish
    assert content == "Checking." and finish == "tool_calls"
    assert [(g["name"], g["arguments"]) for g in got.values()] == \
        [(t.function.name, t.function.arguments) for t in c.message.tool_calls]
    # the conversation goes on: tool results back in, through the same template
    follow = msgs + [c.message.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": t.id, "content": "sunny"} for t in c.message.tool_calls]
    follow[1]["content"] = None  # what clients send next to tool_calls
    r2 = client.chat.completions.create(model=MODEL, messages=follow, tools=[WEATHER], max_tokens=4, temperature=0)
    assert r2.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # parallel_tool_calls=false: the first call only
    r4 = client.chat.completions.create(parallel_tool_calls=False, **kw)
    assert [t.function.arguments for t in r4.choices[0].message.tool_calls] == [calls[0]["function"]["arguments"]]
    # with tool_choice none the same tokens are plain text
    r3 = client.chat.completions.create(tool_choice="none", **kw)
    assert r3.choices[0].message.tool_calls == [] and "<｜tool▁call▁begin｜>" in r3.choices[0].message.content


def test_named_tool_choice_forces_a_call(srv, client, tok, ref_model):
    """No scripting: the server writes the call's opening tokens; the model writes the arguments."""
    msgs = [{"role": "user", "content": "Weather in Verona?"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], max_tokens=10, temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                       extra_body={"return_token_ids": True})
    c = r.choices[0]
    assert len(c.message.tool_calls) == 1 and c.message.tool_calls[0].function.name == "get_weather"
    # the prompt ends with the forced opening; the arguments are the model's greedy continuation
    prompt = c.model_extra["prompt_token_ids"]
    assert tok.decode(prompt).endswith("<｜tool▁sep｜>get_weather\n```json\n")
    want = greedy_ref(ref_model, tok, prompt, 10)
    assert c.token_ids == want
    assert c.message.tool_calls[0].function.arguments == visible(tok, want).removesuffix("\n```")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})


# ---------------------------------------------------------------------- concurrency, disconnects
def test_32_concurrent_streams_each_equal_its_solo_run(srv, tok, ref_model):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 300, (int(n),), generator=g).tolist() for n in torch.randint(2, 40, (32,), generator=g)]
    lens = [8 + i % 9 for i in range(32)]
    solo = [greedy_ref(ref_model, tok, p, n) for p, n in zip(prompts, lens)]

    async def one(ac, p, n):
        s = await ac.completions.create(model=MODEL, prompt=p, max_tokens=n, temperature=0, stream=True,
                                        extra_body={"return_token_ids": True})
        ids, text, finish = [], "", None
        async for ch in s:
            for c in ch.choices:
                ids += c.model_extra.get("token_ids") or []
                text += c.text
                finish = c.finish_reason or finish
        return ids, text, finish

    async def main():
        ac = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        out = await asyncio.gather(*[one(ac, p, n) for p, n in zip(prompts, lens)])
        await ac.close()
        return out

    out = asyncio.run(main())
    assert len(out) == 32
    for (ids, text, finish), want in zip(out, solo):
        assert ids == want
        assert text == visible(tok, want)
        assert finish in ("stop", "length")
    e = srv.server.engine
    wait_until(lambda: e.stats().num_running == 0, what="the batch to drain")
    assert e.alloc.num_used() == 0


@pytest.fixture
def gate(srv, monkeypatch):
    """Hold the engine thread inside a step of a request with seed=GATE_SEED until released."""
    engine = srv.server.engine
    ev, entered = threading.Event(), threading.Event()
    orig = engine._process

    def process(reqs, logits, extra=None):
        if any(r.params.seed == GATE_SEED and r.num_output_tokens >= 2 for r in reqs):
            entered.set()
            ev.wait(60)
        return orig(reqs, logits, extra)

    monkeypatch.setattr(engine, "_process", process)
    yield entered, ev
    ev.set()


GATE_SEED = 424242


def _abort_count(srv):
    return srv.server.engine.stats().requests_finished.get("abort", 0)


def _metric(srv, name):
    for line in httpx.get(srv.url + "/metrics").text.splitlines():
        if line.startswith(name):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_aborts_and_frees(srv, gate, stream):
    entered, release = gate
    s = srv.server
    aborts = _abort_count(srv)
    metric = 'dsv3:engine_requests_finished_total{finished_reason="abort",model_name="tiny"}'
    m0 = _metric(srv, metric)
    body = {"model": MODEL, "prompt": "Now is the winter of our discontent", "max_tokens": 500, "temperature": 0,
            "ignore_eos": True, "seed": GATE_SEED, "stream": stream}
    if stream:
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # (a dropped iterator would close the response right away)
            next(lines)  # the first tokens arrived
            assert entered.wait(30)
        # leaving the block closed the connection mid-stream
    else:
        with pytest.raises(httpx.ReadTimeout):  # the engine is held at the gate: the client gives up
            httpx.post(srv.url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=5.0))
        assert entered.wait(30)
    # the server noticed while the engine was busy, and asked it to abort
    wait_until(lambda: not s.aengine._live, what="the server to drop the request")
    release.set()
    wait_until(lambda: _abort_count(srv) == aborts + 1, what="the engine to abort the request")
    wait_until(lambda: s.engine.stats().num_running == 0, what="the request to leave the batch")
    assert s.engine.alloc.num_used() == 0  # its cache blocks are free
    assert _metric(srv, metric) == m0 + 1


def test_speculative_server_greedy_and_acceptance_metrics(folder, tok, ref_model):
    """--speculative mtp: greedy answers unchanged, and the acceptance counters are exported."""
    with ServerThread(make_server(folder, speculative="mtp")) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        for text in ("ROMEO:", "Now is the winter of our discontent"):
            r = c.completions.create(model=MODEL, prompt=text, max_tokens=24, temperature=0,
                                     extra_body={"return_token_ids": True})
            assert r.choices[0].model_extra["token_ids"] == greedy_ref(ref_model, tok, tok.encode(text), 24)
        st = s.server.engine.stats().spec
        assert st.drafted > 0
        assert _metric(s, 'dsv3:spec_decode_num_draft_tokens_total{model_name="tiny"}') == st.drafted
        assert _metric(s, 'dsv3:spec_decode_num_accepted_tokens_total{model_name="tiny"}') == st.accepted
        assert _metric(s, 'dsv3:spec_decode_acceptance_rate{model_name="tiny"}') == pytest.approx(st.acceptance_rate)


# ---------------------------------------------------------------------- errors
def test_errors_have_openai_shape(srv, client):
    def check(r, status, code=None, param=None):
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        if code is not None:
            assert err["code"] == code
        if param is not None:
            assert err["param"] == param

    url = srv.url
    chat = url + "/v1/chat/completions"
    ok_msgs = [{"role": "user", "content": "hi"}]
    check(httpx.post(chat, content=b"{not json", headers={"content-type": "application/json"}), 400)
    check(httpx.post(chat, json=[1, 2]), 400)
    check(httpx.post(chat, json={"messages": ok_msgs, "temperature": 5}), 400, param="temperature")
    check(httpx.post(chat, json={"messages": ok_msgs, "n": 0}), 400, param="n")
    check(httpx.post(chat, json={"messages": ok_msgs, "stop": ["x"] * 17}), 400)
    check(httpx.post(chat, json={"messages": [{"role": "user"}]}), 400)
    check(httpx.post(chat, json={"messages": [{"role": "wizard", "content": "x"}]}), 400)
    check(httpx.post(chat, json={"messages": ok_msgs, "model": "gpt-4"}), 404, code="model_not_found")
    check(httpx.post(url + "/v1/completions", json={"prompt": [1, 2, 10 ** 9]}), 400)
    check(httpx.post(url + "/v1/completions", json={"prompt": "a " * 1500}), 400, code="context_length_exceeded")
    check(httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 5000}), 400,
          code="context_length_exceeded")
    check(httpx.get(url + "/v1/nothing"), 404)
    check(httpx.get(chat), 405)
    check(httpx.post(url + "/detokenize", json={"tokens": [-1]}), 400)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ok_msgs, top_logprobs=30, logprobs=True)
    assert e.value.status_code == 400 and e.value.body["param"] == "top_logprobs"
    # still serving
    assert client.chat.completions.create(model=MODEL, messages=ok_msgs, max_tokens=2).choices


def test_queue_full_auth_and_draining(srv, client, monkeypatch):
    s = srv.server
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    monkeypatch.setattr(s.engine, "max_queue", 0)  # every new request finds the queue full
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(**kw)
    assert e.value.status_code == 429
    monkeypatch.setattr(s.engine, "max_queue", 256)
    monkeypatch.setattr(s, "api_key", "sekrit")
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(**kw)
    keyed = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekrit", max_retries=0)
    assert keyed.chat.completions.create(**kw).choices
    assert httpx.get(srv.url + "/health").status_code == 200  # probes need no key
    monkeypatch.setattr(s, "api_key", None)
    monkeypatch.setattr(s, "draining", True)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(**kw)
    assert e.value.status_code == 503
    assert httpx.get(srv.url + "/health").status_code == 503


# ---------------------------------------------------------------------- tokenizer routes, metrics
def test_tokenize_detokenize_match_transformers(srv, folder, tok):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(folder)
    text = "O Romeo, Romeo! wherefore art thou Romeo? 北京 🌧"
    r = httpx.post(srv.url + "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert r["tokens"] == hf.encode(text, add_special_tokens=False) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 1024
    msgs = CHATS[2]
    r = httpx.post(srv.url + "/tokenize", json={"messages": msgs}).json()
    want = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert r["tokens"] == list(want)
    assert httpx.post(srv.url + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == \
        hf.decode(r["tokens"])
    info = httpx.get(srv.url + "/tokenizer_info").json()
    assert info["eos_token"] == hf.eos_token and info["chat_template"] == hf.chat_template


def test_metrics_exposition(srv, client):
    before = _metric(srv, 'dsv3:time_to_first_token_seconds_count{model_name="tiny"}')
    client.completions.create(model=MODEL, prompt="ab", max_tokens=3, temperature=0, n=2)
    text = httpx.get(srv.url + "/metrics").text
    for name in ("dsv3:http_requests_total", "dsv3:request_success_total", "dsv3:prompt_tokens_total",
                 "dsv3:generation_tokens_total", "dsv3:time_to_first_token_seconds_bucket",
                 "dsv3:time_per_output_token_seconds_bucket", "dsv3:num_requests_running",
                 "dsv3:num_requests_waiting", "dsv3:kv_cache_usage_perc", "dsv3:prefix_cache_hits_total",
                 "dsv3:prefix_cache_queries_total", "dsv3:spec_decode_num_accepted_tokens_total",
                 "dsv3:spec_decode_acceptance_rate"):
        assert name in text, name
    assert _metric(srv, 'dsv3:time_to_first_token_seconds_count{model_name="tiny"}') == before + 2
    assert 'dsv3:http_requests_total{route="/v1/completions",status="200"}' in text


# ---------------------------------------------------------------------- bench-serve
def test_bench_definitions():
    """vLLM bench-serve definitions on hand-made timings."""
    from dsv3.serve.bench import RequestResult, summarize

    a = RequestResult(ok=True, ttft=0.1, latency=0.7, itl=[0.2, 0.2, 0.2], output_tokens=4, prompt_tokens=10)
    b = RequestResult(ok=True, ttft=0.3, latency=0.5, itl=[0.2], output_tokens=2, prompt_tokens=10)
    s = summarize([a, b, RequestResult(ok=False, error="x")], duration=2.0, concurrency=2)
    assert (s["completed"], s["failed"], s["output_tokens"]) == (2, 1, 6)
    assert s["request_throughput"] == 1.0 and s["output_throughput"] == 3.0 and s["total_token_throughput"] == 13.0
    assert s["median_ttft_ms"] == pytest.approx(200) and s["p99_ttft_ms"] == pytest.approx(298)
    assert s["median_tpot_ms"] == pytest.approx(200)        # (0.7-0.1)/3 and (0.5-0.3)/1
    assert s["median_itl_ms"] == pytest.approx(200) and s["mean_e2el_ms"] == pytest.approx(600)


def test_bench_serve_against_the_server(srv, capsys):
    from dsv3.cli import main

    assert main(["bench-serve", "--url", srv.url, "--concurrency", "1,3", "--num-prompts", "3", "--input-len", "8",
                 "--output-len", "5"]) == 0
    out = capsys.readouterr().out
    assert "| 1 | 3/3 |" in out and "| 3 | 3/3 |" in out
