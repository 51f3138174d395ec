"""What a caller hands the engine (SamplingParams) and what it gets back (RequestOutput per step,
Completion at the end). Token ids only: text (stop strings, detokenization) sits beside the engine,
through the `stop_checker` hook; `StopOnText` is the ready-made one for stop strings."""
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

# finish reasons, as the OpenAI API names them ("abort" for a cancelled request)
STOP, LENGTH, ABORT = "stop", "length", "abort"


@dataclass
class SamplingParams:
    # None: up to the context length (max_model_len - prompt length), as vLLM does for max_tokens=None
    max_new_tokens: int | None = 16
    temperature: float = 0.0              # 0 = greedy (argmax)
    top_p: float = 1.0
    top_k: int = 0                        # 0 (or -1) = off
    seed: int | None = None               # per-request torch.Generator: reproducible whatever the batch
    # OpenAI's penalties over the tokens generated so far:
    # logit[j] -= frequency_penalty * count[j] + presence_penalty * (count[j] > 0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # CTRL / transformers' multiplicative penalty over prompt + generated tokens (1.0 = off)
    repetition_penalty: float = 1.0
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False              # do not stop at the engine's EOS id
    min_new_tokens: int = 0               # EOS and stop ids are masked until this many tokens exist
    # top-N log-probabilities of every generated token (0: only the chosen token's); None: off
    logprobs: int | None = None
    # the same for every prompt token after the first (completions' echo; lm-eval loglikelihood)
    prompt_logprobs: int | None = None

    def validate(self, vocab_size: int | None = None):
        def bad(name, msg):
            raise ValueError(f"invalid sampling parameter {name}={getattr(self, name)!r}: {msg}")

        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0):
            bad("max_new_tokens", "must be a non-negative integer or None")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            bad("temperature", "must be a finite number >= 0")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", "must be an integer >= 0 (or -1 for off)")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "must be an integer or None")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and -2.0 <= v <= 2.0):
                bad(name, "must be in [-2, 2] (the OpenAI range)")
        if not (isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0):
            bad("repetition_penalty", "must be > 0")
        if not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 0:
            bad("min_new_tokens", "must be a non-negative integer")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                bad(name, "must be a non-negative integer or None")
            if v is not None and vocab_size is not None and v > vocab_size:
                bad(name, f"asks for more alternatives than the {vocab_size} tokens of the vocabulary")
        if isinstance(self.stop_token_ids, (str, bytes)) or not all(
                isinstance(t, int) for t in self.stop_token_ids):
            bad("stop_token_ids", "must be a list of token ids")
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in self.stop_token_ids):
            bad("stop_token_ids", f"token ids must be in [0, {vocab_size})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1.0


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    rank: int                                   # 1 = the most likely token
    top: list[tuple[int, float]] = field(default_factory=list)  # the N most likely, best first


@dataclass
class RequestOutput:
    """What one engine step produced for one request (a streaming delta)."""
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None                   # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None               # the stop token id, or what the stop_checker returned
    num_prompt_tokens: int
    num_output_tokens: int                      # generated so far, these new ones included
    num_cached_tokens: int                      # prompt tokens served by the prefix cache
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once, in the first output, when asked
    time: float = 0.0                           # time.monotonic() when produced


@dataclass
class Completion:
    """A finished request, for callers that do not stream (Engine.generate)."""
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    stop_reason: int | str | None
    num_cached_tokens: int
    logprobs: list[TokenLogprob] | None
    prompt_logprobs: list[TokenLogprob | None] | None
    arrival_time: float
    first_token_time: float | None
    finish_time: float


class GeneratedTokens:
    """The views of a request's `tokens` (prompt + generated) that stop checkers read; shared by the
    engine's Request and the data-parallel front end's record of it (dsv3.infer.replicas)."""
    prompt: list[int]
    tokens: list[int]

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[len(self.prompt):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.tokens) - len(self.prompt)


class Request(GeneratedTokens):
    """Engine-side state of one request. `tokens` = prompt + generated tokens; cache slots
    [0, num_computed) hold valid latents for tokens[:num_computed]."""

    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams, max_new_tokens: int,
                 stop_ids: frozenset, stop_checker: Callable | None, on_output: Callable | None,
                 generator: torch.Generator, arrival: int):
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.max_new_tokens = max_new_tokens
        self.stop_ids = stop_ids
        self.stop_checker = stop_checker
        self.on_output = on_output
        self.generator = generator
        self.arrival = arrival                  # admission order (FCFS, and preemption picks the newest)
        self.tokens: list[int] = list(prompt)
        self.num_computed = 0
        self.blocks: list[int] = []
        self.block_keys: list[bytes] = []       # prefix-cache keys of the full blocks, computed lazily
        self.num_registered = 0                 # leading blocks already offered to the prefix cache
        self.num_cached_tokens: int | None = None
        self.counts: dict[int, int] = {}        # generated token -> count (presence/frequency penalties)
        self.seen: set[int] = set(prompt) if params.repetition_penalty != 1.0 else set()
        self.draft: int | None = None           # speculative: the MTP's proposal for the next token
        self.draft_probs: torch.Tensor | None = None  # its distribution q (sampling rows only)
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.prompt_logprobs_sent = False
        self.finished = False
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.num_preemptions = 0
        self._pending: list[int] = []           # tokens produced this step, not yet reported
        self._pending_lp: list[TokenLogprob] = []

    def __repr__(self):
        return (f"Request({self.request_id!r}, prompt={len(self.prompt)}, out={self.num_output_tokens}, "
                f"computed={self.num_computed}, blocks={len(self.blocks)}, finished={self.finished})")


class StopOnText:
    """A `stop_checker` for stop strings (OpenAI `stop`). It feeds each new token through a
    detokenizer (anything with push(token_id) -> str and flush() -> str, e.g.
    dsv3.tokenizer.IncrementalDetokenizer) and stops at the first occurrence of any stop string.
    `text` is the output text cut before the stop string (or including it with include_stop);
    `take()` returns the text that is safe to stream: a tail that could still grow into a stop
    string is held back until it cannot (so a stream never shows part of a stop string)."""

    def __init__(self, detokenizer, stop: Sequence[str], include_stop: bool = False):
        if isinstance(stop, str):
            stop = [stop]
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError("stop strings must be non-empty strings")
        self.detokenizer = detokenizer
        self.stop = list(stop)
        self.include_stop = include_stop
        self.text = ""
        self.matched: str | None = None
        self._seen = 0          # output tokens consumed
        self._sent = 0          # characters of text handed out by take()
        self._done = False

    def __call__(self, request) -> str | None:
        out = request.output_token_ids
        while self._seen < len(out) and self.matched is None:
            piece = self.detokenizer.push(out[self._seen])
            self._seen += 1
            self._append(piece)
        return self.matched

    def _append(self, piece: str):
        if not piece or self.matched is not None:
            return
        start = max(0, len(self.text) - max(map(len, self.stop), default=0) + 1)
        self.text += piece
        best = None
        for s in self.stop:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            i, s = best
            self.matched = s
            self.text = self.text[:i + len(s)] if self.include_stop else self.text[:i]

    def finish(self):
        """Call once the request has finished: flushes the detokenizer (unless a stop matched)."""
        if not self._done and self.matched is None:
            self._append(self.detokenizer.flush())
        self._done = True

    def take(self) -> str:
        end = len(self.text)
        if self.matched is None and not self._done:
            # hold back the longest tail that is a proper prefix of some stop string
            for k in range(min(max(map(len, self.stop), default=0) - 1, end - self._sent), 0, -1):
                tail = self.text[end - k:]
                if any(s.startswith(tail) for s in self.stop):
                    end -= k
                    break
        out = self.text[self._sent:end]
        self._sent = end
        return out
