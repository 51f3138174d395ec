"""`dsv3 serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the inference engine.

Threads: the engine runs in one background thread (`AsyncEngine`: Engine.run_forever's loop;
every torch op happens there); HTTP handlers run on uvicorn's asyncio loop. A handler hands its
requests to the engine with `Engine.add_request` (thread-safe: it goes through the engine's inbox)
and gets each step's output back through an asyncio.Queue: the engine's per-request `on_output`
callback collects the step's outputs, and one `loop.call_soon_threadsafe` per step delivers them.
Text work that decides when a request stops (incremental detokenization, stop strings, tool-call
parsing) runs in the engine thread inside the `stop_checker` hook, so a stop string ends
generation at the token that completes it. Before a step that would run prompts only, the engine
thread waits briefly for the rest of a burst of arrivals (AsyncEngine: arrival coalescing).

Cancellation: a client that disconnects (mid-stream, or while waiting for a non-streamed answer)
aborts its engine requests, whose cache blocks the engine frees at its next step.
Shutdown: on SIGTERM the server answers new requests with 503, lets in-flight requests finish
(uvicorn's graceful shutdown), then stops the engine thread and exits.

Reference behaviour: OpenAI's API reference, the DeepSeek API (V3 era), vLLM's OpenAI server.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import hmac
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv3.infer.cli_generate import FP8_HELP, load_checkpoint, refuse_fp8_for_ranks
from dsv3.infer.engine import QueueFull, RequestRejected
from dsv3.infer.params import ABORT, STOP, SamplingParams, StopOnText
from dsv3.serve import protocol as P
from dsv3.serve.metrics import CONTENT_TYPE, Metrics
from dsv3.serve.tools import ToolCallParser, forced_prefix, new_call_id, supports_tools, tools_system_prompt
from dsv3.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("dsv3.serve")

# JSON has no -inf: vLLM reports impossible tokens with this floor
_LOGPROB_FLOOR = -9999.0
# routes served without the API key (probes and scrapers), and the route labels of the metrics
_OPEN_PATHS = {"/health", "/metrics", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"}
_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/tokenize",
           "/detokenize", "/tokenizer_info", "/version", "/openapi.json", "/docs"}


# ====================================================================== errors
class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | int | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


def _engine_error(e: Exception) -> APIError:
    """What the engine's refusals mean over HTTP."""
    if isinstance(e, QueueFull):
        return APIError(429, str(e), "rate_limit_error", code="rate_limit_exceeded")
    if isinstance(e, RequestRejected):
        code = "context_length_exceeded" if e.reason == "prompt_too_long" else e.reason
        return APIError(400, str(e), code=code)
    return APIError(400, str(e))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    parts, param = [], None
    for e in errs[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        where = "" if e.get("type") == "json_invalid" else ".".join(loc)  # json_invalid's loc is a position
        if param is None and where:
            param = where
        if e.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}")
        else:
            parts.append(f"{where or 'body'}: {e.get('msg')}")
    if len(errs) > 5:
        parts.append(f"... and {len(errs) - 5} more")
    return "; ".join(parts) or "invalid request", param


# ====================================================================== engine side
@dataclass
class Delta:
    """What one engine step produced for one choice, text already decoded."""
    index: int
    text: str = ""
    tool_deltas: list = field(default_factory=list)
    token_ids: list = field(default_factory=list)
    logprobs: list | None = None          # TokenLogprob per new token
    offsets: list | None = None           # text offset of each new token (completions' logprobs)
    prompt_logprobs: list | None = None
    finished: bool = False
    finish_reason: str | None = None
    num_prompt: int = 0
    num_output: int = 0
    num_cached: int = 0
    time: float = 0.0
    error: APIError | None = None


class Choice:
    """The text side of one engine request. Its `stop` (StopOnText over the detokenizer or the
    tool-call parser) is the engine's stop_checker; `process` turns a RequestOutput into a Delta.
    Both run in the engine thread; the handler reads the object only after the last Delta."""

    def __init__(self, index: int, tok: Tokenizer, stop: list[str], include_stop: bool, skip_special: bool,
                 tools: bool, prefix_ids: list[int], offsets: bool, metrics: Metrics | None, arrival: float,
                 parallel_tool_calls: bool = True):
        self.index = index
        # parallel_tool_calls=false: only the first call is returned (nothing constrains the model)
        self.max_calls = None if parallel_tool_calls else 1
        self.parser = ToolCallParser(tok, skip_special) if tools else None
        if self.parser is not None:
            for t in prefix_ids:  # the forced start of a tool call is part of the answer
                self.parser.push(t)
        det = self.parser if self.parser is not None else IncrementalDetokenizer(tok, skip_special_tokens=skip_special)
        self.stop = StopOnText(det, stop, include_stop)
        self._offset_det = IncrementalDetokenizer(tok, skip_special_tokens=skip_special) if offsets else None
        self._offset = 0
        self.metrics, self.arrival = metrics, arrival
        self.first_time: float | None = None
        self.token_ids: list[int] = []

    def finish_reason(self, reason: str) -> str:
        if reason == STOP and self.parser is not None and self.parser.calls:
            return "tool_calls"
        return reason

    def process(self, out) -> Delta:
        if out.finished and out.finish_reason != ABORT:
            self.stop.finish()
        d = Delta(self.index, text=self.stop.take(), token_ids=list(out.new_token_ids), logprobs=out.new_logprobs,
                  prompt_logprobs=out.prompt_logprobs, finished=out.finished, num_prompt=out.num_prompt_tokens,
                  num_output=out.num_output_tokens, num_cached=out.num_cached_tokens, time=out.time)
        self.token_ids += d.token_ids
        if self.parser is not None:
            d.tool_deltas = [x for x in self.parser.take_deltas()
                             if self.max_calls is None or x["index"] < self.max_calls]
        if self._offset_det is not None:
            d.offsets = []
            for t in d.token_ids:
                d.offsets.append(self._offset)
                self._offset += len(self._offset_det.push(t))
        if d.token_ids and self.first_time is None:
            self.first_time = out.time
        if out.finished:
            d.finish_reason = self.finish_reason(out.finish_reason)
            if self.metrics is not None:
                self.metrics.observe_choice(d.finish_reason, out.num_prompt_tokens, out.num_output_tokens,
                                            out.num_cached_tokens, self.arrival, self.first_time, out.time)
        return d


class AsyncEngine:
    """Runs the engine in a background thread and connects it to asyncio handlers.

    Arrival coalescing (`batch_wait`): the engine runs prompt chunks of equal length as one batched
    forward, so a burst of requests is cheapest when it is admitted together. A burst reaches the
    server spread over milliseconds (each request is parsed and validated in turn), and a busy engine
    thread would start on its first few requests, leaving the rest for the next step: two forwards
    instead of one, and two cohorts that then finish a step apart, so closed-loop clients (a chat UI,
    an agent, a benchmark at fixed concurrency) send their next requests apart too and the split
    repeats for as long as the load lasts. So before a step that would only run prompts (nothing is
    decoding, so nobody's tokens wait for it) the engine thread waits for the burst to end: until as
    many requests are waiting as finished since the previous such step (the batch that just ended,
    whose clients are replacing it), or until no request arrived for `batch_wait` seconds, and never
    longer than 4 x batch_wait. It never waits while requests decode, nor when one request replaces
    one (concurrency 1: the count is reached at once); a lone request after a larger batch ended
    waits batch_wait. (vLLM's V0 scheduler had a related knob, --scheduler-delay-factor, which
    delays prompts while others decode; this one acts only when nothing decodes.)"""

    def __init__(self, engine, batch_wait: float = 0.02):
        self.engine = engine
        self.batch_wait = batch_wait
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: dict[str, tuple] = {}   # request id -> (loop, queue, choice index)
        self._lock = threading.Lock()
        self.failures = 0
        # outputs of the current step, handed to their event loops once the step is over: one
        # wake-up per loop and step instead of one per request (each costs a syscall and GIL hand-offs)
        self._outbox: dict = {}
        self._wake = threading.Event()
        self._last_add = 0.0            # time.monotonic() of the latest add (under _lock)
        self._finished_since_gather = 0  # engine thread: requests finished since the last prompt-only step
        self.gather_waits = 0           # prompt-only steps that waited for a burst, and the time spent
        self.gather_time = 0.0

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self):
        if self.alive:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="dsv3-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0):
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self):
        # Engine.run_forever's loop, plus the hand-off of each step's outputs
        while not self._stop.is_set():
            try:
                self._wake.clear()
                if self.engine.has_unfinished():
                    if not self.engine.running:
                        self._gather()
                    self.engine.step()
                    self._flush()
                else:
                    self._wake.wait(0.1)  # add()/abort() set it
            except Exception as e:  # a failed step must not take the server down: fail its requests
                self.failures += 1
                log.exception("engine step failed; aborting the requests in flight")
                with self._lock:
                    live = list(self._live.items())
                    self._live.clear()
                err = APIError(500, f"the engine failed: {type(e).__name__}: {e}", "server_error",
                               code="engine_error")
                for rid, (loop, q, index) in live:
                    self._post(loop, q, Delta(index, finished=True, finish_reason=ABORT, error=err))
                    self.engine.abort(rid)
                self._flush()

    def _gather(self):  # engine thread, before a step with nothing running: see the class notes
        target = min(self._finished_since_gather, self.engine.max_num_seqs)
        self._finished_since_gather = 0
        if self.batch_wait <= 0:
            return
        start = time.monotonic()
        waited = False
        while not self._stop.is_set():
            self._wake.clear()  # before counting: an add after the count sets it again
            with self._lock:
                # nothing is running, so every live request is a new one (waiting or in the inbox)
                n, last = len(self._live), self._last_add
            now = time.monotonic()
            left = min(start + 4 * self.batch_wait, max(start, last) + self.batch_wait) - now
            if n >= target or left <= 0:
                break
            waited = True
            self._wake.wait(left)
        if waited:
            self.gather_waits += 1
            self.gather_time += time.monotonic() - start

    def _post(self, loop, q, item):  # engine thread
        self._outbox.setdefault(loop, []).append((q, item))

    def _flush(self):  # engine thread, after a step
        box, self._outbox = self._outbox, {}
        for loop, items in box.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed (server shut down): nobody is listening
                pass

    def add(self, rid: str, prompt: list[int], params: SamplingParams, choice: Choice, q: asyncio.Queue):
        loop = asyncio.get_running_loop()

        def on_output(out):  # engine thread
            try:
                d = choice.process(out)
            except Exception as e:  # a bug in text handling: fail this request, keep the engine going
                log.exception("output processing failed for %s", rid)
                d = Delta(choice.index, finished=True, finish_reason=ABORT,
                          error=APIError(500, f"output processing failed: {e}", "server_error"))
                if not out.finished:
                    self.engine.abort(rid)
            if d.finished:
                self._finished_since_gather += 1
                with self._lock:
                    self._live.pop(rid, None)
            self._post(loop, q, d)

        with self._lock:
            self._live[rid] = (loop, q, choice.index)
        try:
            self.engine.add_request(prompt, params, request_id=rid, stop_checker=choice.stop, on_output=on_output)
        except BaseException:
            with self._lock:
                self._live.pop(rid, None)
            raise
        with self._lock:
            self._last_add = time.monotonic()
        self._wake.set()

    def abort(self, rid: str):
        with self._lock:
            live = self._live.pop(rid, None)
        if live is not None:
            self.engine.abort(rid)
            self._wake.set()


def _deliver(items):  # on the event loop
    for q, item in items:
        q.put_nowait(item)


class Generation:
    """The engine requests behind one HTTP request (n choices of each prompt)."""

    def __init__(self, aengine: AsyncEngine, base_id: str):
        self.aengine, self.base_id = aengine, base_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.rids: list[str] = []
        self.pending: set[int] = set()

    def add(self, prompt: list[int], params: SamplingParams, choice: Choice):
        rid = f"{self.base_id}-{choice.index}"
        try:
            self.aengine.add(rid, prompt, params, choice, self.queue)
        except Exception:
            self.abort()
            raise
        self.rids.append(rid)
        self.pending.add(choice.index)

    def abort(self):
        for rid in self.rids:
            self.aengine.abort(rid)

    async def deltas(self):
        while self.pending:
            d = await self.queue.get()
            if d.finished:
                self.pending.discard(d.index)
            yield d


async def _wait_disconnect(request: Request):
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


# ====================================================================== the server
class Server:
    def __init__(self, engine, tokenizer: Tokenizer, model_names: list[str], root: str = "",
                 api_key: str | None = None, batch_wait: float = 0.02):
        if not model_names:
            raise ValueError("at least one served model name is needed")
        self.engine, self.tok = engine, tokenizer
        self.aengine = AsyncEngine(engine, batch_wait)
        self.model_names = list(model_names)
        self.root = root or model_names[0]
        self.api_key = api_key
        self.max_model_len = engine.max_model_len
        self.created = int(time.time())
        self.draining = False
        self.metrics = Metrics(engine, self.model_names[0])
        self.tools_ok = supports_tools(tokenizer)
        src = tokenizer.chat_template
        src = json.dumps(src) if isinstance(src, dict) else (src or "")
        self._template_has_tools = "tools" in src
        self.add_bos = bool(tokenizer.config.get("add_bos_token")) and tokenizer.bos_id is not None
        if tokenizer.vocab_size > engine.cfg.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                             f"{engine.cfg.vocab_size}")

    # ---------------------------------------------------------------- helpers
    def check_model(self, name: str | None):
        if name is not None and name not in self.model_names:
            raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
        return name or self.model_names[0]

    @functools.lru_cache(maxsize=65536)
    def tokstr(self, i: int) -> str:
        return self.tok.decode([i], skip_special_tokens=False)

    def sampling(self, req: P._Sampling, max_tokens: int | None, logprobs: int | None, i: int,
                 prompt_logprobs: int | None = None) -> SamplingParams:
        seed = req.seed
        if seed is not None and i:
            seed = (seed + i) % 2 ** 64  # different, reproducible choices for n > 1
        return SamplingParams(
            max_new_tokens=max_tokens, temperature=1.0 if req.temperature is None else float(req.temperature),
            top_p=1.0 if req.top_p is None else float(req.top_p), top_k=req.top_k or 0, seed=seed,
            presence_penalty=float(req.presence_penalty), frequency_penalty=float(req.frequency_penalty),
            repetition_penalty=1.0 if req.repetition_penalty is None else float(req.repetition_penalty),
            stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
            min_new_tokens=req.min_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    def chat_messages(self, messages: list[P.ChatMessage]) -> list[dict]:
        out = []
        for i, m in enumerate(messages):
            content = m.text()
            role = "system" if m.role == "developer" else m.role
            if content is None and role != "assistant":
                raise APIError(400, f"messages[{i}]: a {m.role} message needs content", param=f"messages.{i}.content")
            # the DeepSeek template concatenates content with strings: "" where clients send null
            d = {"role": role, "content": content if content is not None else ""}
            if m.tool_calls:
                d["tool_calls"] = [{"id": tc.id or new_call_id(), "type": "function",
                                    "function": {"name": tc.function.name, "arguments": tc.function.arguments}}
                                   for tc in m.tool_calls]
            for k in ("name", "tool_call_id", "reasoning_content"):
                if getattr(m, k) is not None:
                    d[k] = getattr(m, k)
            out.append(d)
        return out

    def chat_prompt(self, req) -> tuple[list[int], list[int], bool]:
        """(prompt ids, ids of the forced tool-call start, whether tool calls are parsed)."""
        msgs = self.chat_messages(req.messages)
        use_tools = bool(req.tools) and req.tool_choice != "none"
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if use_tools else None
        if use_tools and not self.tools_ok:
            raise APIError(400, "this model's tokenizer has no tool-call tokens: tools are not supported",
                           param="tools")
        if use_tools and not self._template_has_tools:
            n_sys = sum(1 for m in msgs if m["role"] == "system")
            msgs.insert(n_sys, {"role": "system", "content": tools_system_prompt(tools)})
        text = self.tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=True)
        choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, P.NamedToolChoice) else req.tool_choice
        prefix = forced_prefix(choice, tools) if use_tools else ""
        if isinstance(req.tool_choice, P.NamedToolChoice) and not use_tools:
            raise APIError(400, "tool_choice names a function but no tools are given", param="tool_choice")
        ids = self.tok.encode(text + prefix)
        prefix_ids = self.tok.encode(prefix) if prefix else []
        assert ids[len(ids) - len(prefix_ids):] == prefix_ids, "the forced tool-call prefix must tokenize apart"
        return ids, prefix_ids, use_tools

    def chat_logprobs(self, lps, k: int) -> list[dict]:
        out = []
        for lp in lps or []:
            if lp is None:
                continue
            out.append({"token": self.tokstr(lp.token_id), "logprob": max(lp.logprob, _LOGPROB_FLOOR),
                        "bytes": list(self.tok.token_bytes(lp.token_id)),
                        "top_logprobs": [{"token": self.tokstr(t), "logprob": max(v, _LOGPROB_FLOOR),
                                          "bytes": list(self.tok.token_bytes(t))} for t, v in lp.top[:k]]})
        return out

    def completion_logprobs(self, lps, offsets, k: int, base: int, acc: dict):
        """Append to the legacy completions logprobs lists (None entries: the first prompt token)."""
        for lp, off in zip(lps, offsets):
            acc["text_offset"].append(base + off)
            if lp is None:
                acc["tokens"].append(None)
                acc["token_logprobs"].append(None)
                acc["top_logprobs"].append(None)
                continue
            acc["tokens"].append(self.tokstr(lp.token_id))
            acc["token_logprobs"].append(max(lp.logprob, _LOGPROB_FLOOR))
            top = {self.tokstr(t): max(v, _LOGPROB_FLOOR) for t, v in lp.top[:k]}
            # the chosen token is always listed, as vLLM does (lm-eval's is_greedy reads this)
            top.setdefault(self.tokstr(lp.token_id), max(lp.logprob, _LOGPROB_FLOOR))
            acc["top_logprobs"].append(top)

    def prompt_pieces(self, ids: list[int], skip_special: bool) -> tuple[str, list[int]]:
        det = IncrementalDetokenizer(self.tok, skip_special_tokens=skip_special)
        text, offs = "", []
        for t in ids:
            offs.append(len(text))
            text += det.push(t)
        return text + det.flush(), offs

    def usage(self, prompt_lens: list[int], cached: list[int], completion_tokens: int) -> dict:
        pt, hit = sum(prompt_lens), sum(cached)
        return {"prompt_tokens": pt, "completion_tokens": completion_tokens, "total_tokens": pt + completion_tokens,
                "prompt_cache_hit_tokens": hit, "prompt_cache_miss_tokens": pt - hit,
                "prompt_tokens_details": {"cached_tokens": hit}}

    async def collect(self, request: Request, gen: Generation) -> list[Delta] | None:
        """All deltas of a non-streamed request; None if the client went away (the requests are
        then aborted). An error the engine reported for any of them is raised."""
        async def consume():
            return [d async for d in gen.deltas()]

        task = asyncio.ensure_future(consume())
        watch = asyncio.ensure_future(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
            if task not in done:
                return None
            deltas = task.result()
            err = next((d.error for d in deltas if d.error is not None), None)
            if err is not None:
                raise err
            return deltas
        finally:
            watch.cancel()
            task.cancel()
            gen.abort()  # no-op for finished requests

    # ---------------------------------------------------------------- chat
    async def chat(self, req: P.ChatCompletionRequest, request: Request):
        model = self.check_model(req.model)
        if req.response_format is not None and req.response_format.type != "text":
            raise APIError(400, f"response_format {req.response_format.type!r} is not supported (no constrained "
                           "decoding)", param="response_format")
        arrival = time.monotonic()
        ids, prefix_ids, use_tools = self.chat_prompt(req)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        k = (req.top_logprobs or 0) if req.logprobs else None
        rid = "chatcmpl-" + uuid.uuid4().hex
        gen = Generation(self.aengine, rid)
        choices = []
        try:
            for i in range(req.n):
                c = Choice(i, self.tok, req.stop_list(), req.include_stop_str_in_output, req.skip_special_tokens,
                           use_tools, prefix_ids, False, self.metrics, arrival, req.parallel_tool_calls is not False)
                gen.add(ids, self.sampling(req, max_tokens, k, i), c)
                choices.append(c)
        except (ValueError, RequestRejected) as e:
            raise _engine_error(e) from None
        created = int(time.time())
        if req.stream:
            return StreamingResponse(self._chat_stream(req, gen, choices, model, rid, created, ids),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        deltas = await self.collect(request, gen)
        if deltas is None:
            return Response(status_code=499)
        per = {i: [d for d in deltas if d.index == i] for i in range(req.n)}
        out, n_out = [], 0
        for i, c in enumerate(choices):
            ds = per[i]
            last = ds[-1]
            text = "".join(d.text for d in ds)
            calls = c.parser.calls[:c.max_calls] if c.parser is not None else []
            msg = {"role": "assistant", "content": text if (text or not calls) else None, "tool_calls": calls}
            ch = {"index": i, "message": msg, "logprobs": None, "finish_reason": last.finish_reason}
            if k is not None:
                ch["logprobs"] = {"content": self.chat_logprobs([lp for d in ds for lp in (d.logprobs or [])], k)}
            if req.return_token_ids:
                ch["token_ids"] = c.token_ids
                ch["prompt_token_ids"] = ids
            n_out += last.num_output
            out.append(ch)
        cached = per[0][-1].num_cached  # prompt cache hits are billed once per prompt (its first choice)
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model,
                             "choices": out, "usage": self.usage([len(ids)], [cached], n_out)})

    async def _chat_stream(self, req, gen: Generation, choices, model, rid, created, ids):
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        k = (req.top_logprobs or 0) if req.logprobs else None
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}

        def chunk(choices_, usage=None):
            body = dict(base, choices=choices_)
            if include_usage:
                body["usage"] = usage
            return "data: " + json.dumps(body, ensure_ascii=False) + "\n\n"

        n_out, cached0 = {}, 0
        try:
            for i in range(req.n):  # the role comes first, in a delta of its own (as OpenAI sends it)
                first = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}
                if req.return_token_ids:
                    first["prompt_token_ids"] = ids
                yield chunk([first])
            async for d in gen.deltas():
                if d.error is not None:
                    yield "data: " + json.dumps(error_body(d.error.message, d.error.type, code=d.error.code)) + "\n\n"
                    break
                n_out[d.index] = d.num_output
                if d.index == 0:
                    cached0 = d.num_cached
                delta = {}
                if d.text:
                    delta["content"] = d.text
                if d.tool_deltas:
                    delta["tool_calls"] = d.tool_deltas
                lp = self.chat_logprobs(d.logprobs, k) if k is not None and d.logprobs else None
                if not (delta or d.finished or lp):
                    continue
                ch = {"index": d.index, "delta": delta, "logprobs": {"content": lp} if lp else None,
                      "finish_reason": d.finish_reason if d.finished else None}
                if req.return_token_ids:
                    ch["token_ids"] = d.token_ids
                yield chunk([ch])
            else:
                if include_usage:
                    yield chunk([], self.usage([len(ids)], [cached0], sum(n_out.values())))
            yield "data: [DONE]\n\n"
        finally:
            gen.abort()  # the client went away (or we are done: a no-op)

    # ---------------------------------------------------------------- completions
    def completion_prompts(self, req: P.CompletionRequest) -> list[tuple[list[int], str | None]]:
        out = []
        for p in req.prompts():
            if isinstance(p, str):
                out.append((self.tok.encode(p, add_bos=self.add_bos), p))
            else:
                out.append((list(p), None))
        return out

    async def completions(self, req: P.CompletionRequest, request: Request):
        model = self.check_model(req.model)
        arrival = time.monotonic()
        prompts = self.completion_prompts(req)
        k = req.logprobs
        rid = "cmpl-" + uuid.uuid4().hex
        gen = Generation(self.aengine, rid)
        choices = []
        try:
            for pi, (ids, _) in enumerate(prompts):
                for j in range(req.n):
                    c = Choice(pi * req.n + j, self.tok, req.stop_list(), req.include_stop_str_in_output,
                               req.skip_special_tokens, False, [], k is not None, self.metrics, arrival)
                    params = self.sampling(req, req.max_tokens, k, j, prompt_logprobs=k if req.echo else None)
                    gen.add(ids, params, c)
                    choices.append(c)
        except (ValueError, RequestRejected) as e:
            raise _engine_error(e) from None
        created = int(time.time())
        if req.stream:
            return StreamingResponse(self._completion_stream(req, gen, prompts, model, rid, created),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        deltas = await self.collect(request, gen)
        if deltas is None:
            return Response(status_code=499)
        out, n_out, cached = [], 0, []
        for c in choices:
            ds = [d for d in deltas if d.index == c.index]
            pi = c.index // req.n
            ids, ptext = prompts[pi]
            text, acc = "", None
            if k is not None:
                acc = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            if req.echo:
                text, offs = self.prompt_pieces(ids, req.skip_special_tokens)
                if acc is not None:
                    plp = next((d.prompt_logprobs for d in ds if d.prompt_logprobs is not None), None)
                    plp = plp if plp is not None else [None] * len(ids)
                    self._prompt_logprobs_into(ids, plp, offs, k, acc)
            base = len(text)
            text += "".join(d.text for d in ds)
            if acc is not None:
                self.completion_logprobs([lp for d in ds for lp in (d.logprobs or [])],
                                         [o for d in ds for o in (d.offsets or [])], k, base, acc)
            ch = {"index": c.index, "text": text, "logprobs": acc, "finish_reason": ds[-1].finish_reason}
            if req.return_token_ids:
                ch["token_ids"] = c.token_ids
                ch["prompt_token_ids"] = ids
            out.append(ch)
            n_out += ds[-1].num_output
            if c.index % req.n == 0:
                cached.append(ds[-1].num_cached)
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model,
                             "choices": out, "usage": self.usage([len(p[0]) for p in prompts], cached, n_out)})

    def _prompt_logprobs_into(self, ids, plp, offs, k, acc):
        """Prompt tokens in the legacy logprobs lists: the first has no logprob (nothing before it)."""
        for i, t in enumerate(ids):
            lp = plp[i] if i < len(plp) else None
            acc["text_offset"].append(offs[i])
            acc["tokens"].append(self.tokstr(t))
            if lp is None:
                acc["token_logprobs"].append(None)
                acc["top_logprobs"].append(None)
            else:
                acc["token_logprobs"].append(max(lp.logprob, _LOGPROB_FLOOR))
                top = {self.tokstr(a): max(v, _LOGPROB_FLOOR) for a, v in lp.top[:k]}
                top.setdefault(self.tokstr(t), max(lp.logprob, _LOGPROB_FLOOR))
                acc["top_logprobs"].append(top)

    async def _completion_stream(self, req, gen: Generation, prompts, model, rid, created):
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        k = req.logprobs
        base = {"id": rid, "object": "text_completion", "created": created, "model": model}
        started: dict[int, int] = {}   # choice -> length of the echoed prompt text (offset base)
        n_out, cached = {}, {}

        def chunk(choices_, usage=None):
            body = dict(base, choices=choices_)
            if include_usage:
                body["usage"] = usage
            return "data: " + json.dumps(body, ensure_ascii=False) + "\n\n"

        try:
            async for d in gen.deltas():
                if d.error is not None:
                    yield "data: " + json.dumps(error_body(d.error.message, d.error.type, code=d.error.code)) + "\n\n"
                    break
                n_out[d.index] = d.num_output
                if d.index % req.n == 0:
                    cached[d.index // req.n] = d.num_cached
                text = ""
                acc = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []} \
                    if k is not None else None
                first = d.index not in started
                if first:
                    started[d.index] = 0
                    if req.echo:
                        ids, ptext = prompts[d.index // req.n]
                        text, offs = self.prompt_pieces(ids, req.skip_special_tokens)
                        started[d.index] = len(text)
                        if acc is not None:
                            plp = d.prompt_logprobs if d.prompt_logprobs is not None else [None] * len(ids)
                            self._prompt_logprobs_into(ids, plp, offs, k, acc)
                text += d.text
                if acc is not None and d.logprobs:
                    self.completion_logprobs(d.logprobs, d.offsets or [], k, started[d.index], acc)
                if not (text or d.finished or (acc and acc["tokens"]) or (req.return_token_ids and d.token_ids)):
                    continue
                ch = {"index": d.index, "text": text, "logprobs": acc,
                      "finish_reason": d.finish_reason if d.finished else None}
                if req.return_token_ids:
                    ch["token_ids"] = d.token_ids
                    if first:
                        ch["prompt_token_ids"] = prompts[d.index // req.n][0]
                yield chunk([ch])
            else:
                if include_usage:
                    yield chunk([], self.usage([len(p[0]) for p in prompts], [cached.get(i, 0) for i in
                                                                              range(len(prompts))],
                                               sum(n_out.values())))
            yield "data: [DONE]\n\n"
        finally:
            gen.abort()


# ====================================================================== ASGI gate: drain, auth, metrics
class _Gate:
    """Pure ASGI middleware (streams and disconnects pass through untouched): 503 while draining,
    401 without the API key, and the HTTP status counter."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in _ROUTES else ("/v1/models/{model}" if path.startswith("/v1/models/") else "other")
        status = {"code": 500}

        async def send_status(msg):
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        S = self.server
        try:
            if S.draining and path != "/metrics":
                resp = error_response(503, "the server is shutting down", "server_error", code="shutting_down")
                await resp(scope, receive, send_status)
            elif S.api_key and path not in _OPEN_PATHS and not self._authorized(scope):
                resp = error_response(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                      code="invalid_api_key")
                resp.headers["WWW-Authenticate"] = "Bearer"
                await resp(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            S.metrics.http.labels(route, str(status["code"])).inc()

    def _authorized(self, scope) -> bool:
        for k, v in scope.get("headers", []):
            if k == b"authorization":
                scheme, _, token = v.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                          self.server.api_key.encode())
        return False


# ====================================================================== the app
def create_app(server: Server) -> "_Gate":
    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.aengine.start()
        try:
            yield
        finally:
            server.aengine.stop()

    app = FastAPI(title="dsv3 OpenAI-compatible server", version=_version(), lifespan=lifespan,
                  description="DeepSeek-V3 (dsv3) inference over OpenAI's chat and completions APIs.")
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        # FastAPI answers 422; OpenAI (and its SDK's BadRequestError) use 400
        msg, param = _validation_message(exc)
        return error_response(400, msg, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and msg == "Not Found":
            msg = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, msg, "invalid_request_error" if exc.status_code < 500 else
                              "server_error", code=code)

    @app.exception_handler(ValueError)
    async def _value(request, exc: ValueError):
        # bad input found past validation (the tokenizer, the chat template, the engine's checks)
        return error_response(400, str(exc))

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}", "server_error", code="internal_error")

    err = {"model": P.ErrorResponse}
    errs = {400: err, 401: err, 404: err, 429: err, 503: err}

    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse, responses=errs)
    async def chat_completions(req: P.ChatCompletionRequest, request: Request):
        return await server.chat(req, request)

    @app.post("/v1/completions", response_model=P.CompletionResponse, responses=errs)
    async def completions(req: P.CompletionRequest, request: Request):
        return await server.completions(req, request)

    @app.get("/v1/models", response_model=P.ModelList)
    async def models():
        return {"object": "list", "data": [server_card(server, n) for n in server.model_names]}

    @app.get("/v1/models/{model_id:path}", response_model=P.ModelCard, responses=errs)
    async def model(model_id: str):
        server.check_model(model_id)
        return server_card(server, model_id)

    @app.get("/health")
    async def health():
        if not server.aengine.alive:
            return error_response(503, "the engine is not running", "server_error", code="engine_down")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/version")
    async def version():
        return {"version": _version()}

    @app.post("/tokenize", response_model=P.TokenizeResponse, responses=errs)
    async def tokenize(req: P.TokenizeRequest):
        server.check_model(req.model)
        if req.prompt is not None:
            ids = server.tok.encode(req.prompt, add_bos=server.add_bos and req.add_special_tokens)
        else:
            msgs = server.chat_messages(req.messages)
            tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
            ids = server.tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=req.add_generation_prompt,
                                                 tokenize=True)
        body = {"count": len(ids), "max_model_len": server.max_model_len, "tokens": ids}
        if req.return_token_strs:
            body["token_strs"] = [server.tok.id_to_token(t) for t in ids]
        return body

    @app.post("/detokenize", response_model=P.DetokenizeResponse, responses=errs)
    async def detokenize(req: P.DetokenizeRequest):
        server.check_model(req.model)
        V = server.tok.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < V]
        if bad:
            raise APIError(400, f"token ids must be in [0, {V}), got {bad[0]}", param="tokens")
        return {"prompt": server.tok.decode(req.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        t = server.tok
        tmpl = t.chat_template if isinstance(t.chat_template, str) else None
        return {"tokenizer_class": t.config.get("tokenizer_class", "PreTrainedTokenizerFast"),
                "bos_token": t.bos_token, "eos_token": t.eos_token, "pad_token": t.pad_token,
                "add_bos_token": server.add_bos, "chat_template": tmpl, "model_max_length": server.max_model_len,
                "vocab_size": t.vocab_size}

    return _Gate(app, server)


def server_card(server: Server, name: str) -> dict:
    return {"id": name, "object": "model", "created": server.created, "owned_by": "dsv3", "root": server.root,
            "parent": None, "max_model_len": server.max_model_len}


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("dsv3")
    except Exception:
        return "0"


# ====================================================================== CLI
_DTYPES = ("auto", "float32", "bfloat16", "float16")


def configure(p: argparse.ArgumentParser):
    p.add_argument("--model", required=True, help="checkpoint folder (config.json + safetensors + tokenizer.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed at start)")
    p.add_argument("--api-key", default=os.environ.get("DSV3_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on the API routes (default: $DSV3_API_KEY; none: open)")
    p.add_argument("--served-model-name", action="append", default=None,
                   help="model name(s) clients use (repeatable; default: the folder's name)")
    p.add_argument("--max-batch", type=int, default=64, help="requests decoded together at most (running batch)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for admission at most; more get HTTP 429")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length in tokens, prompt + output (default: the model's max_position_embeddings)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="tokens per engine step (prefill chunk budget)")
    p.add_argument("--cache-memory-mb", type=int, default=None,
                   help="latent cache budget in MiB (default: 512 MiB, at least one full-length sequence)")
    p.add_argument("--batch-wait-ms", type=float, default=20.0,
                   help="before a step that would only run prompts, wait up to this long after the latest arrival "
                        "for the rest of a burst of requests, so their prompts run as one batch (0: never wait; "
                        "never waits while requests decode)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per cache block")
    p.add_argument("--no-prefix-cache", action="store_true", help="disable prefix caching")
    p.add_argument("--speculative", choices=["mtp"], default=None,
                   help="MTP speculative decoding (the model's MTP module drafts, one forward verifies)")
    p.add_argument("--dtype", default="auto", choices=_DTYPES,
                   help="weights and cache dtype (auto: the checkpoint's torch_dtype)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--fp8", action="store_true", help=FP8_HELP)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--seed", type=int, default=None, help="seed of the engine's per-request seeds")
    p.add_argument("--shutdown-timeout", type=float, default=300.0,
                   help="seconds SIGTERM waits for in-flight requests before cancelling them")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level")
    from dsv3.parallel.dist import add_parallel_arguments

    # `torchrun --nproc-per-node N -m dsv3 serve ... --tp N` (or --ep N, --pp N): rank 0 runs the engine and
    # the server, the other ranks replay its forwards (dsv3.infer.lockstep); --dp N: N whole-model
    # replicas behind rank 0's server (dsv3.infer.replicas)
    add_parallel_arguments(p)


def build_server(args, model=None) -> Server:
    """model: rank 0's lockstep proxy under --tp/--ep (dsv3.infer.lockstep), else loaded here."""
    import torch

    from dsv3.config import ModelConfig
    from dsv3.infer import lockstep
    from dsv3.infer.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.model)
    if not path.is_dir():
        raise ValueError(f"--model {args.model!r} is not a folder")
    if not (path / "tokenizer.json").is_file():
        raise ValueError(f"--model {args.model!r} has no tokenizer.json: the server needs the model's tokenizer")
    for flag, v, lo in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                        ("--block-size", args.block_size, 1),
                        ("--max-num-batched-tokens", args.max_num_batched_tokens, 2),
                        ("--batch-wait-ms", args.batch_wait_ms, 0)):
        if not v >= lo:  # (also refuses NaN)
            raise ValueError(f"{flag} must be >= {lo}, got {v}")
    if args.port < 0 or args.port > 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    cfg = ModelConfig.from_hf(path)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    dtype = dtypes.get(cfg.torch_dtype, torch.float32) if args.dtype == "auto" else dtypes[args.dtype]
    if args.speculative == "mtp" and cfg.num_nextn_predict_layers < 1:
        raise ValueError(f"--speculative mtp: the model in {path} has no MTP layer")
    tok = Tokenizer.from_dir(path)
    refuse_fp8_for_ranks(args, model)
    if model is None:
        model = load_checkpoint(args, path, dtype)
    engine = Engine(model, block_size=args.block_size,
                    cache_memory=None if args.cache_memory_mb is None else args.cache_memory_mb << 20,
                    max_num_seqs=args.max_batch, max_num_batched_tokens=args.max_num_batched_tokens,
                    max_model_len=args.max_model_len, max_queue=args.max_queue,
                    enable_prefix_cache=not args.no_prefix_cache, speculative=args.speculative, seed=args.seed)
    if isinstance(model, lockstep.LockstepModel):
        lockstep.attach(engine)  # the other ranks build the same cache and follow this engine's forwards
    names = args.served_model_name or [path.resolve().name]
    server = Server(engine, tok, names, root=str(path), api_key=args.api_key or None,
                    batch_wait=args.batch_wait_ms / 1000)
    # The model, its modules and the imported libraries are ~300k objects that live as long as the process:
    # moved out of the collector's generations, a full collection no longer walks them (with `small` loaded, one
    # took 130 ms with the GIL held, a stall of every stream; the one seen while serving after the freeze, 7.5 ms:
    # docs/serving.md).
    gc.collect()
    gc.freeze()
    return server


def make_uvicorn_server(app, host: str, port: int, log_level: str = "info", shutdown_timeout: float | None = None):
    import uvicorn

    server: Server = app.server

    class _Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # from now on new requests get 503; uvicorn lets in-flight ones finish, then the lifespan
            # shutdown stops the engine
            server.draining = True
            super().handle_exit(sig, frame)
            # exit with status 0 once drained instead of re-raising the signal
            getattr(self, "_captured_signals", []).clear()

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=shutdown_timeout, timeout_keep_alive=5)
    return _Uvicorn(config)


def run(args):
    from dsv3.infer import lockstep

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "dp", None) not in (None, 1):  # --dp N under torchrun: N whole-model replicas, one front end
        from dsv3.infer.replicas import serve_dp
        return serve_dp(args)
    if lockstep.check_serve_args(args):  # --tp N / --ep N / --pp N under torchrun (ValueError otherwise)
        return lockstep.serve_parallel(args, lambda model: _serve(args, model))
    return _serve(args, None)


def _serve(args, model):
    server = build_server(args, model)
    app = create_app(server)
    uv = make_uvicorn_server(app, args.host, args.port, args.log_level, args.shutdown_timeout)
    # (uvicorn logs the address it listens on, the port the OS picked included)
    log.info("serving %s as %s (max batch %d, max queue %d, context %d tokens)", args.model,
             ", ".join(server.model_names), args.max_batch, args.max_queue, server.max_model_len)
    if getattr(args, "device", "cpu") == "cpu":
        from dsv3.kernels import cpu as cpu_kernels

        reason = cpu_kernels.unavailable_reason()
        log.info("CPU decode kernels: %s", "on" if reason is None else f"off ({reason})")
    uv.run()
    return 0
