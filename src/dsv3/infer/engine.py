"""The inference engine: token ids in, token ids out (text sits beside it: dsv3.tokenizer, and the
`stop_checker` hook for stop strings).

- Continuous batching (Orca, Yu et al. OSDI'22): requests join and leave between steps. Each step
  runs every running request's next piece of work: a chunk of its prompt (chunked prefill, bounded
  by a per-step token budget, as Sarathi/vLLM do) or its next token (decode), or with MTP
  speculation a [token, draft] pair to verify. Pieces of the same length run as one batched forward
  (rows may sit at different positions: the cache protocol masks by position), so there is no
  padding: decode rows are all length 1 (2 when verifying).
- The absorbed MLA latent cache lives in fixed-size blocks of one preallocated pool
  (dsv3.infer.paged): a memory budget in blocks admits requests, queues them, or rejects those that
  can never fit; when running requests outgrow the pool the newest is preempted (its blocks freed,
  recomputed later from its tokens, vLLM's recompute preemption) so nothing runs out of memory.
- Prefix caching of full blocks (hash chain of their tokens), reported per request as cache hits.
- Per-request sampling: temperature/top-p/top-k, seed (own torch.Generator: a request's draws do
  not depend on the batch), penalties, stop ids, stop_checker, max/min new tokens, logprobs and
  prompt logprobs; streaming (RequestOutput deltas per step, or a per-request callback);
  cancellation (abort) frees the request's blocks.

Thread safety: add_request() and abort() may be called from any thread (they go through an inbox
the engine drains at the start of each step); step() must be called from one thread at a time.
"""
import bisect
import itertools
import logging
import math
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from dsv3.infer.paged import NULL_BLOCK, BlockAllocator, PagedLatentCache, block_key
from dsv3.infer.params import (ABORT, LENGTH, STOP, Completion, Request, RequestOutput, SamplingParams,
                               TokenLogprob)
from dsv3.infer.sampling import (apply_frequency_presence, apply_repetition, batched_filtered_probs,
                                 sample_inverse_cdf, token_logprobs)
from dsv3.infer.speculative import SpecStats, rejection_sample, verify_greedy
from dsv3.infer.screen import MAX_ROWS, GreedyHead, greedy_head
from dsv3.kernels import cpu as cpu_kernels
from dsv3.model.linear import project
from dsv3.model.moe import MoE

# logits of at most this many positions are materialised at once for prompt logprobs (V is large)
_LOGITS_CHUNK = 256
log = logging.getLogger("dsv3.engine")


class RequestRejected(ValueError):
    """The request can never be served as asked (e.g. longer than the context, or than the whole
    cache). `reason` is a short machine-readable tag."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class QueueFull(RequestRejected):
    """The waiting queue is at max_queue: try again later (HTTP 429)."""

    def __init__(self, message: str):
        super().__init__(message, "queue_full")


def check_request(prompt, params, vocab_size: int, max_model_len: int, block_size: int, usable_blocks: int):
    """Validate a request against the engine's limits -> (prompt ids, params, max new tokens).
    ValueError for malformed input, RequestRejected for a request that does not fit (counted by the
    caller). Shared by Engine and the data-parallel front end (dsv3.infer.replicas)."""
    params = SamplingParams() if params is None else params
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
    params.validate(vocab_size)
    if hasattr(prompt, "tolist"):
        prompt = prompt.tolist()
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError("the prompt needs at least one token")
    if any(not 0 <= t < vocab_size for t in prompt):
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
    n = len(prompt)
    if n >= max_model_len:
        raise RequestRejected(f"the prompt has {n} tokens; the context length is {max_model_len}", "prompt_too_long")
    max_new = max_model_len - n if params.max_new_tokens is None else params.max_new_tokens
    if n + max_new > max_model_len:
        raise RequestRejected(f"prompt ({n} tokens) + max_new_tokens ({max_new}) exceeds the context length "
                              f"{max_model_len}", "prompt_too_long")
    need = math.ceil((n + max_new + 1) / block_size)  # +1: the slot of a draft being verified
    if need > usable_blocks:
        raise RequestRejected(f"the request needs {need} cache blocks of {block_size} tokens "
                              f"({n} prompt + {max_new} new tokens) but the cache holds {usable_blocks}",
                              "too_large_for_cache")
    return prompt, params, max_new


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_blocks: int                 # usable blocks of the pool
    num_free_blocks: int            # free or evictable (cached with no owner)
    cache_usage: float              # fraction of blocks held by requests
    block_size: int
    prompt_tokens: int              # prompt tokens of admitted requests
    generation_tokens: int
    prefix_cache_queries: int       # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int          # of which found
    requests_finished: dict[str, int]
    requests_rejected: int
    preemptions: int
    steps: int
    spec: SpecStats = field(default_factory=SpecStats)


@dataclass
class _Item:
    req: Request
    start: int
    n: int
    kind: str       # "fill" (prompt chunk or plain decode) or "verify" ([last token, draft])


class Engine:
    def __init__(self, model, *, block_size: int = 16, num_blocks: int | None = None,
                 cache_memory: int | None = None, max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
                 max_model_len: int | None = None, max_queue: int | None = None, enable_prefix_cache: bool = True,
                 speculative: str | None = None, draft_vocab: Sequence[int] | None = None,
                 eos_token_id: int | None = -1, seed: int | None = None, cache_dtype: torch.dtype | None = None,
                 collect_expert_loads: bool = False):
        """num_blocks / cache_memory (bytes): the cache budget (default: 512 MiB, at least one
        full-length sequence). eos_token_id: -1 takes the model config's; None disables EOS.
        speculative: None or "mtp" (needs num_nextn_predict_layers >= 1). draft_vocab: token ids the
        MTP draft may propose (e.g. speculative.frequent_tokens of a corpus): its output projection
        then reads only those rows of the head (FR-Spec); the output distribution is unchanged."""
        cfg = model.config
        self.model, self.cfg = model, cfg
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        if self.device.type == "cpu":
            cpu_kernels.library()  # the decode kernels' first use builds them (~1-2 s): now, not in a request
        if speculative not in (None, "mtp"):
            raise ValueError(f"speculative must be None or 'mtp', got {speculative!r}")
        if speculative == "mtp" and cfg.num_nextn_predict_layers < 1:
            raise ValueError("speculative='mtp' needs a model with MTP layers (num_nextn_predict_layers >= 1)")
        self.spec = speculative == "mtp"
        self._draft_ids = self._draft_w = self._draft_screen = self._draft_id_list = None
        if draft_vocab is not None:
            if not self.spec:
                raise ValueError("draft_vocab is only used with speculative='mtp'")
            ids = torch.as_tensor(list(draft_vocab), dtype=torch.long)
            if ids.numel() == 0 or ids.min() < 0 or ids.max() >= cfg.vocab_size or ids.unique().numel() != ids.numel():
                raise ValueError(f"draft_vocab must be distinct token ids in [0, {cfg.vocab_size})")
            # in increasing order: the screen's ties go to the lowest row, which is then the lowest id, as the
            # argmax over the full masked logits takes it
            ids = ids.sort().values
            self._draft_ids, self._draft_id_list = ids.to(self.device), ids.tolist()
            # model.logits(x) is head(x): the draft reads only these rows of its weight, through the few-row
            # kernels, and greedy drafts through an int8 screen of its own (None where the screen does not apply)
            self._draft_w = model.head.weight.detach()[self._draft_ids].contiguous()
            self._draft_screen = GreedyHead(self._draft_w) if GreedyHead.supported(self._draft_w) else None
        self.max_model_len = cfg.max_position_embeddings if max_model_len is None else int(max_model_len)
        if max_num_seqs < 1 or max_num_batched_tokens < 2:
            raise ValueError("max_num_seqs must be >= 1 and max_num_batched_tokens >= 2")
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.max_queue = max_queue
        self.eos_token_id = cfg.eos_token_id if eos_token_id == -1 else eos_token_id
        # MTP layers keep their own latents, at cache layer num_hidden_layers + k - 1
        n_layers = cfg.num_hidden_layers + (1 if self.spec else 0)
        cache_dtype = self.dtype if cache_dtype is None else cache_dtype
        per_block = PagedLatentCache.bytes_per_block(cfg, block_size, n_layers, cache_dtype)
        if num_blocks is None:
            budget = (512 << 20) if cache_memory is None else int(cache_memory)
            num_blocks = budget // per_block
            if cache_memory is None:
                num_blocks = max(num_blocks, math.ceil((self.max_model_len + 1) / block_size) + 1)
        num_blocks = int(num_blocks)
        self.block_size = block_size
        self.alloc = BlockAllocator(num_blocks, block_size, enable_prefix_cache)
        self.cache = PagedLatentCache(cfg, num_blocks, block_size, n_layers, cache_dtype, self.device)
        self._mla = [m for m in model.modules() if hasattr(m, "attn_impl")]
        # collect_expert_loads: count the tokens routed to each expert of every main-model MoE layer
        # (what EPLB places replicas from; `save_expert_loads` writes what `dsv3 eplb --loads` reads)
        self._loads: dict[int, torch.Tensor] | None = None
        self._in_step = False
        if collect_expert_loads:
            self._loads = {}
            for layer in model.layers:
                if isinstance(layer.ffn, MoE):
                    self._loads[layer.layer_id] = torch.zeros(layer.ffn.n_experts, dtype=torch.long)
                    layer.ffn.record_routing = True
                    layer.ffn.register_forward_hook(self._load_counter(layer.layer_id))
        self._impl = None
        # the int8 copy of the head that greedy steps screen with (dsv3.infer.screen), made now rather than in the
        # first request's step (0.3 s for a 129k x 512 head on one core; None where the screen does not apply)
        greedy_head(model)

        self.waiting: list[Request] = []      # sorted by arrival
        self.running: list[Request] = []      # in admission order
        self._requests: dict[str, Request] = {}
        self._inbox: list = []
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._arrival = itertools.count()
        self._rng = random.Random(seed)
        self._aborted_outputs: list[Request] = []
        # counters
        self.spec_stats = SpecStats()
        self._prompt_tokens = self._generation_tokens = 0
        self._finished: dict[str, int] = {STOP: 0, LENGTH: 0, ABORT: 0}
        self._rejected = self._preemptions = self._steps = 0

    # ------------------------------------------------------------------ public API
    def add_request(self, prompt: Sequence[int], params: SamplingParams | None = None, request_id: str | None = None,
                    stop_checker: Callable[[Request], object] | None = None,
                    on_output: Callable[[RequestOutput], None] | None = None) -> str:
        """Queue a request; returns its id. Raises ValueError for bad input, RequestRejected when it
        can never fit (context or cache), QueueFull when max_queue requests are already waiting.
        stop_checker(request) is called after every new token; a truthy return stops the request
        (finish_reason "stop", stop_reason = that value). on_output(RequestOutput) is called from
        the engine's thread after every step that produced something for this request."""
        return self._make_request(prompt, params, request_id, stop_checker, on_output).request_id

    def abort(self, request_id: str) -> bool:
        """Cancel a request (between steps); its blocks are freed. False if it is unknown or done."""
        with self._lock:
            if request_id not in self._requests:
                return False
            self._inbox.append(("abort", request_id))
            self._work.notify_all()
        return True

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self.waiting or self.running or self._inbox or self._aborted_outputs)

    def stats(self) -> EngineStats:
        a = self.alloc
        return EngineStats(
            num_running=len(self.running), num_waiting=len(self.waiting), num_blocks=a.usable,
            num_free_blocks=a.num_free(), cache_usage=a.num_used() / a.usable, block_size=self.block_size,
            prompt_tokens=self._prompt_tokens, generation_tokens=self._generation_tokens,
            prefix_cache_queries=a.queries, prefix_cache_hits=a.hits, requests_finished=dict(self._finished),
            requests_rejected=self._rejected, preemptions=self._preemptions, steps=self._steps,
            spec=SpecStats(**vars(self.spec_stats)))

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 stop_checkers: Sequence[Callable | None] | None = None) -> list[Completion]:
        """Run prompts to completion (continuous batching underneath); results in prompt order. The model's
        attention modules get back the path they had (steps set it per chunk, e.g. absorbed for decode), so that
        the model's own forwards after this call (training, a full-sequence scoring) run as before it."""
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        checkers = stop_checkers or [None] * len(prompts)
        reqs = []
        try:
            for p, sp, c in zip(prompts, params, checkers):
                reqs.append(self._make_request(p, sp, None, c, None))
        except ValueError:
            for r in reqs:
                self.abort(r.request_id)
            self._drain_inbox()
            raise
        impls = [m.attn_impl for m in self._mla]
        try:
            while not all(r.finished for r in reqs):
                self.step()
        finally:
            for m, impl in zip(self._mla, impls):
                m.attn_impl = impl
            self._impl = None  # (the next step sets its path again)
        return [self._completion(r) for r in reqs]

    def stream(self, prompt: Sequence[int], params: SamplingParams | None = None,
               stop_checker: Callable | None = None) -> Iterator[RequestOutput]:
        """Yield this request's outputs as they come (driving step() itself; other requests advance
        too). Closing the iterator early cancels the request."""
        req = self._make_request(prompt, params, None, stop_checker, None)
        try:
            while True:
                for out in self.step():
                    if out.request_id == req.request_id:
                        yield out
                        if out.finished:
                            return
        finally:
            if not req.finished:
                self.abort(req.request_id)
                self.step()

    def run_forever(self, stop: threading.Event, idle_timeout: float = 0.1):
        """Step while there is work; sleep on a condition when idle (for a server's engine thread)."""
        while not stop.is_set():
            if self.has_unfinished():
                self.step()
            else:
                with self._lock:
                    self._work.wait_for(lambda: self._inbox or stop.is_set(), timeout=idle_timeout)

    def _load_counter(self, layer_id: int):
        def hook(moe, args, out):
            if not self._in_step:
                return
            idx = moe.last_routing[1]
            self._loads[layer_id] += torch.bincount(idx.flatten(), minlength=moe.n_experts).cpu()
        return hook

    def expert_loads(self) -> torch.Tensor:
        """(MoE layers, experts) token counts since the engine started (collect_expert_loads=True)."""
        if self._loads is None:
            raise ValueError("expert loads are collected only with Engine(collect_expert_loads=True)")
        return torch.stack([self._loads[k] for k in sorted(self._loads)])

    def save_expert_loads(self, path) -> None:
        import json

        with open(path, "w") as f:
            json.dump({"loads": self.expert_loads().tolist(), "source": "dsv3 engine",
                       "layers": sorted(self._loads)}, f)

    def reset_prefix_cache(self):
        self.alloc.reset_prefix_cache()

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        self._steps += 1
        self._drain_inbox()
        items = self._schedule()
        groups: dict[tuple[str, int], list[_Item]] = {}
        for it in items:
            groups.setdefault((it.kind, it.n), []).append(it)
        self._in_step = True  # expert-load hooks count only the engine's own forwards
        try:
            for (kind, n), group in groups.items():
                if kind == "verify":
                    self._run_verify(group)
                else:
                    self._run_fill(group, n)
        finally:
            self._in_step = False
        return self._collect([it.req for it in items])

    # ------------------------------------------------------------------ requests in and out
    def _make_request(self, prompt, params, request_id, stop_checker, on_output) -> Request:
        try:
            prompt, params, max_new = check_request(prompt, params, self.cfg.vocab_size, self.max_model_len,
                                                    self.block_size, self.alloc.usable)
        except RequestRejected:
            self._rejected += 1
            raise
        stop_ids = set(params.stop_token_ids)
        if self.eos_token_id is not None and not params.ignore_eos:
            stop_ids.add(self.eos_token_id)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        gen = torch.Generator().manual_seed(seed)  # CPU: the same draws on every device
        with self._lock:
            if request_id is None:
                request_id = uuid.uuid4().hex
            elif request_id in self._requests:
                raise ValueError(f"request id {request_id!r} is already in use")
            if self.max_queue is not None and len(self.waiting) + len(self._inbox) >= self.max_queue:
                self._rejected += 1
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            req = Request(request_id, prompt, params, max_new, frozenset(stop_ids), stop_checker, on_output,
                          gen, next(self._arrival))
            self._requests[request_id] = req
            self._inbox.append(("add", req))
            self._work.notify_all()
        return req

    def _drain_inbox(self):
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for op, x in inbox:
            if op == "add":
                if not x.finished:
                    self.waiting.append(x)  # arrival numbers increase: the list stays sorted
            else:
                r = self._requests.get(x)
                if r is None or r.finished:
                    continue
                if r in self.running:
                    self.running.remove(r)
                    self._release(r)
                elif r in self.waiting:
                    self.waiting.remove(r)
                self._finish(r, ABORT, None)
                self._aborted_outputs.append(r)

    def _finish(self, r: Request, reason: str, stop_reason):
        r.finished, r.finish_reason, r.stop_reason = True, reason, stop_reason
        r.finish_time = time.monotonic()
        self._finished[reason] = self._finished.get(reason, 0) + 1
        with self._lock:
            self._requests.pop(r.request_id, None)

    def _collect(self, touched: list[Request]) -> list[RequestOutput]:
        now = time.monotonic()
        outs, seen = [], set()
        for r in self._aborted_outputs + touched:
            if id(r) in seen:
                continue
            seen.add(id(r))
            plp = None
            if r.prompt_logprobs is not None and not r.prompt_logprobs_sent and \
                    (r.num_computed >= len(r.prompt) or r.finished):
                plp, r.prompt_logprobs_sent = r.prompt_logprobs, True
            if not r.finished:
                self._register(r)  # share computed prompt blocks with requests arriving meanwhile
            if not (r._pending or r.finished or plp is not None):
                continue
            if r.finished and r in self.running:
                self.running.remove(r)
                self._release(r)
            out = RequestOutput(
                request_id=r.request_id, new_token_ids=r._pending,
                new_logprobs=r._pending_lp if r.logprobs is not None else None, finished=r.finished,
                finish_reason=r.finish_reason, stop_reason=r.stop_reason, num_prompt_tokens=len(r.prompt),
                num_output_tokens=r.num_output_tokens, num_cached_tokens=r.num_cached_tokens or 0,
                prompt_logprobs=plp, time=now)
            r._pending, r._pending_lp = [], []
            outs.append(out)
            if r.on_output is not None:
                try:
                    r.on_output(out)
                except Exception:  # a caller's bug must not take the engine (and every request) down
                    log.exception("on_output callback of request %s raised", r.request_id)
        self._aborted_outputs = []
        return outs

    def _completion(self, r: Request) -> Completion:
        return Completion(r.request_id, list(r.prompt), r.output_token_ids, r.finish_reason, r.stop_reason,
                          r.num_cached_tokens or 0, r.logprobs, r.prompt_logprobs, r.arrival_time,
                          r.first_token_time, r.finish_time)

    # ------------------------------------------------------------------ blocks
    def _key(self, r: Request, j: int) -> bytes:
        bs = self.block_size
        while len(r.block_keys) <= j:
            i = len(r.block_keys)
            parent = r.block_keys[i - 1] if i else None
            r.block_keys.append(block_key(parent, r.tokens[i * bs:(i + 1) * bs], r.tokens[(i + 1) * bs]))
        return r.block_keys[j]

    def _register(self, r: Request):
        # a full block is offered once all its latents are valid and the token after it is known
        limit = min(r.num_computed, len(r.tokens) - 1) // self.block_size
        while r.num_registered < limit:
            j = r.num_registered
            self.alloc.register(r.blocks[j], self._key(r, j))
            r.num_registered += 1

    def _release(self, r: Request):
        self._register(r)
        for b in reversed(r.blocks):  # tail blocks become the first to be evicted
            self.alloc.release(b)
        r.blocks = []

    def _preempt(self, r: Request):
        self.running.remove(r)
        self._release(r)
        r.num_computed = r.num_registered = 0
        r.draft = r.draft_probs = None
        if r.prompt_logprobs is not None and not r.prompt_logprobs_sent:
            r.prompt_logprobs = None
        r.num_preemptions += 1
        self._preemptions += 1
        bisect.insort(self.waiting, r, key=lambda x: x.arrival)

    def _ensure_blocks(self, r: Request, n_slots: int) -> bool:
        """Give r blocks for slots [0, n_slots); preempt the newest running requests if the pool is
        empty. False if r itself had to be preempted."""
        need = math.ceil(n_slots / self.block_size) - len(r.blocks)
        while need > 0:
            if self.alloc.num_free() == 0:
                victim = max(self.running, key=lambda x: x.arrival)
                self._preempt(victim)
                if victim is r:
                    return False
                continue
            r.blocks.append(self.alloc.allocate())
            need -= 1
        return True

    def _admit(self, r: Request) -> bool:
        bs, a = self.block_size, self.alloc
        hits = []
        if r.params.prompt_logprobs is None or r.prompt_logprobs_sent:
            # a hit leaves at least one token to compute: the key of block j needs token (j+1)*bs
            while (len(hits) + 1) * bs < len(r.tokens):
                b = a.lookup(self._key(r, len(hits)))
                if b is None:
                    break
                hits.append(b)
        need = math.ceil(len(r.tokens) / bs) - len(hits)
        reclaimed = sum(1 for b in hits if a.ref[b] == 0)  # evictable hits stop counting as free
        watermark = len(self.running)  # room for each running request to grow by a block
        if a.num_free() - reclaimed < need + watermark and self.running:
            return False
        if a.num_free() - reclaimed < need:
            return False
        for b in hits:
            a.acquire(b)
        r.blocks = hits + [a.allocate() for _ in range(need)]
        r.num_computed, r.num_registered = len(hits) * bs, len(hits)
        if r.num_cached_tokens is None:  # first admission: this is what the request is billed for
            r.num_cached_tokens = len(hits) * bs
            a.queries += len(r.prompt)
            a.hits += len(hits) * bs
            self._prompt_tokens += len(r.prompt)
        self.running.append(r)
        return True

    # ------------------------------------------------------------------ scheduling
    def _schedule(self) -> list[_Item]:
        budget = self.max_num_batched_tokens
        items: list[_Item] = []
        preempted_before = self._preemptions
        # 1. running requests: decodes (and speculative verifies) first, then unfinished prefills
        order = sorted(self.running, key=lambda r: (len(r.tokens) - r.num_computed > 1 or r.num_output_tokens == 0,
                                                    r.arrival))
        for r in order:
            if r not in self.running or budget <= 0:
                continue
            remaining = len(r.tokens) - r.num_computed
            if self.spec and r.draft is not None and remaining == 1:
                kind, n = "verify", 2
            else:
                kind, n = "fill", min(remaining, budget)
            if n > budget:
                continue
            if not self._ensure_blocks(r, r.num_computed + n):
                continue
            items.append(_Item(r, r.num_computed, n, kind))
            budget -= n
        if self._preemptions != preempted_before:
            items = [it for it in items if it.req in self.running]
        # 2. admit waiting requests (FCFS: the head blocks the rest, so nothing starves)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            r = self.waiting[0]
            if not self._admit(r):
                break
            self.waiting.pop(0)
            n = min(len(r.tokens) - r.num_computed, budget)
            items.append(_Item(r, r.num_computed, n, "fill"))
            budget -= n
        return items

    # ------------------------------------------------------------------ forwards
    def _set_impl(self, impl: str):
        if impl != self._impl:
            for m in self._mla:
                m.attn_impl = impl
            self._impl = impl

    def _bind(self, reqs: list[Request], positions: torch.Tensor):
        width = max(len(r.blocks) for r in reqs)
        # one tensor from padded lists (a tensor per row cost ~10 us a row at 16 rows)
        tables = torch.tensor([r.blocks + [NULL_BLOCK] * (width - len(r.blocks)) for r in reqs], dtype=torch.long)
        self.cache.bind(tables.to(self.device), positions)

    def _run_fill(self, group: list[_Item], n: int):
        reqs = [it.req for it in group]
        dev = self.device
        tokens = torch.tensor([it.req.tokens[it.start:it.start + n] for it in group], dtype=torch.long, device=dev)
        starts = torch.tensor([it.start for it in group], dtype=torch.long)
        positions = (starts[:, None] + torch.arange(n)).to(dev)
        self._bind(reqs, positions)
        # naive attention for prompt chunks (decompressing the latent is cheaper for many queries),
        # absorbed for single-token decode (nothing is decompressed; DeepSeek-V2 §2.1.3)
        self._set_impl("naive" if n > 1 else "absorb")
        h = self.model.hidden(tokens, positions, self.cache)  # (B, n, D)
        for i, it in enumerate(group):
            r = it.req
            if r.prompt_logprobs is None and r.params.prompt_logprobs is not None and it.start == 0 \
                    and not r.prompt_logprobs_sent:
                r.prompt_logprobs = [None]  # the first prompt token has no context to be scored in
            if r.prompt_logprobs is not None and not r.prompt_logprobs_sent and it.start < len(r.prompt) - 1:
                self._prompt_logprobs(r, h[i], it.start, n)
            r.num_computed = it.start + n
        # rows that reached their last token produce the next one
        ends = [i for i, it in enumerate(group) if it.start + n == len(it.req.tokens)]
        sample_rows = []
        for i in ends:
            r = reqs[i]
            if r.num_output_tokens >= r.max_new_tokens:  # max_new_tokens=0: prompt (logprobs) only
                self._finish(r, LENGTH, None)
            else:
                sample_rows.append(i)
        if sample_rows:
            sreqs = [reqs[i] for i in sample_rows]
            # every row (plain decode): a view, no gather
            last = h[:, n - 1] if len(sample_rows) == len(group) else h[torch.tensor(sample_rows, device=dev), n - 1]
            toks = self._screened(sreqs, last)
            if toks is not None:
                lps = [None] * len(sreqs)
            else:
                logits = self.model.logits(last).float()  # (R, V)
                toks, _ = self._choose(sreqs, logits)
                lps = self._logprobs(sreqs, logits, toks)
            for j, i in enumerate(sample_rows):
                self._append(reqs[i], toks[j], lps[j])
        if self.spec:
            # MTP over the chunk: position i combines h_i with Emb(t_{i+1}); drafts for rows that go on
            nxt = torch.zeros(len(group), n, dtype=torch.long)
            for i, it in enumerate(group):
                t = it.req.tokens[it.start + 1:it.start + n + 1]
                nxt[i, :len(t)] = torch.tensor(t, dtype=torch.long)
            self._draft(group, h, tokens, nxt.to(dev), positions, {i: n - 1 for i in ends})

    def _run_verify(self, group: list[_Item]):
        reqs = [it.req for it in group]
        dev = self.device
        tokens = torch.tensor([[r.tokens[-1], r.draft] for r in reqs], dtype=torch.long, device=dev)
        positions = torch.tensor([[it.start, it.start + 1] for it in group], dtype=torch.long, device=dev)
        self._bind(reqs, positions)
        # absorbed attention also for the 2-token verify: the cache is never decompressed in decode
        self._set_impl("absorb")
        h = self.model.hidden(tokens, positions, self.cache)  # (B, 2, D)
        B = len(reqs)
        drafts = [[r.draft] for r in reqs]
        tgt = self._screened(reqs, h.reshape(2 * B, -1))
        if tgt is not None:  # every row greedy without penalties or logprobs: no full logits needed
            self._accept(group, h, tokens, positions, verify_greedy([tgt[2 * i:2 * i + 2] for i in range(B)], drafts),
                         None)
            return
        logits = self.model.logits(h).float()  # (B, 2, V)
        x0 = self._process(reqs, logits[:, 0])
        x1 = self._process(reqs, logits[:, 1], extra=drafts)
        emitted: list[list[int]] = [None] * B
        greedy = [i for i, r in enumerate(reqs) if r.params.greedy]
        sampled = [i for i, r in enumerate(reqs) if not r.params.greedy]
        if greedy:
            g = torch.tensor(greedy, device=dev)
            tgt = torch.stack([x0[g].argmax(-1), x1[g].argmax(-1)], dim=1)
            d = torch.tensor([drafts[i] for i in greedy], device=dev)
            for i, e in zip(greedy, verify_greedy(tgt, d)):
                emitted[i] = e
        if sampled:
            s = torch.tensor(sampled, device=dev)
            sr = [reqs[i] for i in sampled]
            p = torch.stack([self._probs(sr, x0[s]), self._probs(sr, x1[s])], dim=1)  # (R, 2, V)
            q = torch.stack([reqs[i].draft_probs for i in sampled])[:, None]  # (R, 1, V)
            d = torch.tensor([drafts[i] for i in sampled], device=dev)
            u = torch.stack([torch.rand(2, generator=reqs[i].generator, dtype=torch.float64) for i in sampled])
            for i, e in zip(sampled, rejection_sample(p, q, d, u.to(dev))):
                emitted[i] = e
        self._accept(group, h, tokens, positions, emitted, logits)

    def _accept(self, group: list[_Item], h, tokens, positions, emitted: list[list[int]], logits):
        """Append each row's verified tokens (with logprobs from the (B, 2, V) logits if there are
        any), then draft the next token from the last valid position."""
        reqs = [it.req for it in group]
        B, dev = len(reqs), self.device
        st = self.spec_stats
        acc = []
        for i, r in enumerate(reqs):
            e = emitted[i]
            a = len(e) - 1
            acc.append(a)
            st.steps += 1
            st.drafted += 1
            st.accepted += a
            # main latents now valid: t_n, and the draft's slot if it was accepted
            r.num_computed = group[i].start + 1 + a
            for j, t in enumerate(e):
                lp = None if logits is None else \
                    self._logprobs([r], logits[i:i + 1, j], torch.tensor([t], device=dev))[0]
                st.emitted += 1
                if self._append(r, t, lp):
                    break
        # MTP over the two verified positions; the draft comes from the last valid one
        nxt = torch.tensor([e + [0] * (2 - len(e)) for e in emitted], dtype=torch.long, device=dev)
        self._draft(group, h, tokens, nxt, positions, dict(enumerate(acc)))

    def _draft(self, group: list[_Item], h, tokens, nxt, positions, rows_pos: dict[int, int]):
        """Run MTP module 1 over this forward's positions (filling its cache layer) and draft the next
        token of row i (if its request goes on) from hidden position rows_pos[i]."""
        ext = torch.cat([tokens[:, :1], nxt], dim=1)  # mtp_hidden reads Emb(ext[:, 1:S+1])
        out = self.model.mtp_hidden(h, ext, positions, self.cache, depths=1)[0]  # (B, S, D)
        live = [i for i in sorted(rows_pos) if not group[i].req.finished]
        if not live:
            return
        reqs = [group[i].req for i in live]
        if len(live) == 1:  # a view (batch 1): no index tensors
            x = out[live[0], rows_pos[live[0]]][None]
        else:
            x = out[torch.tensor(live, device=self.device), torch.tensor([rows_pos[i] for i in live], device=self.device)]
        toks = self._screened(reqs, x, need_logprobs=False, draft=self._draft_ids is not None)
        if toks is not None:
            for j, r in enumerate(reqs):
                r.draft, r.draft_probs = toks[j], None
            return
        if self._draft_ids is None:
            logits = self.model.logits(x).float()
        else:  # tokens outside the draft vocabulary get probability 0 in q
            logits = torch.full((len(live), self.cfg.vocab_size), float("-inf"), device=x.device)
            logits[:, self._draft_ids] = project(x, self._draft_w).float()
        toks, probs = self._choose(reqs, logits, keep_probs=True)
        for j, r in enumerate(reqs):
            r.draft = toks[j]
            r.draft_probs = probs.get(j)

    # ------------------------------------------------------------------ sampling
    def _process(self, reqs: list[Request], logits: torch.Tensor, extra: list[list[int]] | None = None):
        """Penalties and min_new_tokens on (R, V) fp32 logits (a copy when anything changes).
        extra: tokens to count as generated on top of each request's own (a draft being verified)."""
        out = logits
        for i, r in enumerate(reqs):
            p = r.params
            ext = extra[i] if extra else ()
            mask_stop = r.stop_ids and r.num_output_tokens + len(ext) < p.min_new_tokens
            if not (p.penalised or mask_stop):
                continue
            if out is logits:
                out = logits.clone()
            row = out[i]
            if p.repetition_penalty != 1.0:
                seen = r.seen | set(ext) if ext else r.seen
                apply_repetition(row, torch.tensor(sorted(seen), dtype=torch.long, device=row.device),
                                 p.repetition_penalty)
            if p.presence_penalty or p.frequency_penalty:
                counts = dict(r.counts)
                for t in ext:
                    counts[t] = counts.get(t, 0) + 1
                if counts:
                    ids = torch.tensor(list(counts), dtype=torch.long, device=row.device)
                    c = torch.tensor(list(counts.values()), device=row.device)
                    apply_frequency_presence(row, ids, c, p.frequency_penalty, p.presence_penalty)
            if mask_stop:
                row[torch.tensor(sorted(r.stop_ids), device=row.device)] = float("-inf")
        return out

    def _screened(self, reqs: list[Request], h: torch.Tensor, need_logprobs: bool = True, draft: bool = False):
        """Greedy tokens for hidden states h (R, D), one row per request (or two consecutive rows per
        request in verification), through the int8 screen of the head (dsv3.infer.screen): exactly
        the argmax of the full logits (fp32, or bf16 with ties to the lowest id), without reading the
        head in full. None when any request needs the full logits (sampling, penalties, a masked stop
        id, logprobs) or the screen does not apply (dtype, device, vocabulary size, too many rows);
        the caller then computes them. draft: the rows are MTP drafts over the draft vocabulary (its own screen)."""
        for r in reqs:
            p = r.params
            if not p.greedy or p.penalised or (need_logprobs and p.logprobs is not None):
                return None
            if r.stop_ids and r.num_output_tokens < p.min_new_tokens:  # stop ids masked (see _process)
                return None
        if draft:
            gh = self._draft_screen if h.shape[0] <= MAX_ROWS else None
            ids = self._draft_id_list
            return None if gh is None else [ids[t] for t in gh.argmax(h).tolist()]
        gh = greedy_head(self.model, h.shape[0])
        if gh is None:
            return None
        return gh.argmax(h).tolist()

    def _probs(self, reqs: list[Request], x: torch.Tensor) -> torch.Tensor:
        dev = x.device
        temp = torch.tensor([r.params.temperature for r in reqs], device=dev)
        top_p = torch.tensor([r.params.top_p for r in reqs], device=dev)
        top_k = torch.tensor([max(r.params.top_k, 0) for r in reqs], device=dev)
        return batched_filtered_probs(x, temp, top_p, top_k)

    def _choose(self, reqs: list[Request], logits: torch.Tensor, keep_probs: bool = False):
        """Next token per row: argmax for greedy rows, a draw from the filtered distribution (with the
        request's own generator) otherwise. Returns (tokens, {row: probs} of sampled rows if asked)."""
        x = self._process(reqs, logits)
        toks = x.argmax(dim=-1)
        sampled = [i for i, r in enumerate(reqs) if not r.params.greedy]
        probs = {}
        if sampled:
            s = torch.tensor(sampled, device=x.device)
            pr = self._probs([reqs[i] for i in sampled], x[s])
            u = torch.cat([torch.rand(1, generator=reqs[i].generator, dtype=torch.float64) for i in sampled])
            toks[s] = sample_inverse_cdf(pr, u.to(x.device))
            if keep_probs:
                probs = {i: pr[j] for j, i in enumerate(sampled)}
        return toks.tolist(), probs

    def _logprobs(self, reqs: list[Request], logits: torch.Tensor, toks) -> list[TokenLogprob | None]:
        """Log-probabilities of the raw model distribution (before temperature and penalties, as
        vLLM reports them and as lm-eval's loglikelihood needs)."""
        want = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
        out: list[TokenLogprob | None] = [None] * len(reqs)
        if not want:
            return out
        dev = logits.device
        idx = torch.tensor(want, device=dev)
        chosen = torch.as_tensor(toks, device=dev).reshape(-1)[idx]
        n = max(reqs[i].params.logprobs for i in want)
        lp, rank, ids, vals = token_logprobs(logits[idx].float().log_softmax(dim=-1), chosen, n)
        lp, rank, ids, vals = lp.tolist(), rank.tolist(), ids.tolist(), vals.tolist()
        for j, i in enumerate(want):
            k = reqs[i].params.logprobs
            out[i] = TokenLogprob(int(chosen[j]), lp[j], rank[j], list(zip(ids[j][:k], vals[j][:k])))
        return out

    def _prompt_logprobs(self, r: Request, h: torch.Tensor, start: int, n: int):
        # position i's logits score prompt token i+1
        end = min(start + n, len(r.prompt) - 1)
        k = r.params.prompt_logprobs
        for a in range(start, end, _LOGITS_CHUNK):
            b = min(a + _LOGITS_CHUNK, end)
            lp_all = self.model.logits(h[a - start:b - start]).float().log_softmax(dim=-1)
            chosen = torch.tensor(r.prompt[a + 1:b + 1], device=h.device)
            lp, rank, ids, vals = token_logprobs(lp_all, chosen, k)
            for j, (t, l, rk, ti, tv) in enumerate(zip(chosen.tolist(), lp.tolist(), rank.tolist(), ids.tolist(),
                                                       vals.tolist())):
                r.prompt_logprobs.append(TokenLogprob(t, l, rk, list(zip(ti, tv))))

    def _append(self, r: Request, t: int, lp: TokenLogprob | None) -> bool:
        """Add a generated token; True when the request finished with it."""
        r.tokens.append(t)
        r.counts[t] = r.counts.get(t, 0) + 1
        if r.params.repetition_penalty != 1.0:
            r.seen.add(t)
        r._pending.append(t)
        if r.logprobs is not None:
            r.logprobs.append(lp)
            r._pending_lp.append(lp)
        if r.first_token_time is None:
            r.first_token_time = time.monotonic()
        self._generation_tokens += 1
        res = None
        if r.stop_checker is not None and t not in r.stop_ids:
            try:
                res = r.stop_checker(r)
            except Exception as e:  # stop the request, keep the engine
                log.exception("stop_checker of request %s raised", r.request_id)
                res = f"stop_checker error: {e!r}"
        if t in r.stop_ids:
            self._finish(r, STOP, t)
        elif res:
            self._finish(r, STOP, res)
        elif r.num_output_tokens >= r.max_new_tokens:
            self._finish(r, LENGTH, None)
        return r.finished
