"""Data-parallel serving: N replicas of the whole model, one HTTP front end (`dsv3 serve --dp N` under
torchrun).

This is vLLM's internal data-parallel load balancing reduced to this engine. Every rank holds the
whole model, its own paged latent cache and its own Engine (a "replica"). Rank 0 also runs the HTTP
server and the AsyncEngine as a single-process server does, but the engine the AsyncEngine drives
is a `ReplicatedEngine`: it presents the Engine interface the server uses (add_request, abort,
has_unfinished, running, step, stats, max_num_seqs, max_model_len, cfg) and spreads the requests
over the replicas. Replica 0 is rank 0's own Engine.

- Assignment, when a request arrives: the replica with the fewest unfinished requests (running +
  waiting + not yet sent), ties to the lowest rank, as vLLM's DP coordinator balances by queue
  lengths. Prefix-cache aware: a replica that already holds leading full blocks of the prompt (the
  prompts rank 0 sent it, remembered per replica up to its cache size) wins while its load is within
  `prefix_slack` requests of the least loaded one, so a shared system prompt or few-shot preamble is
  reused instead of recomputed on every replica; past the slack the load wins and the prefix spreads.
- One step: rank 0 sends each replica its new requests (token ids, sampling params with the seed
  rank 0 drew) and cancellations, every replica steps its Engine once, and rank 0 gathers their
  outputs (new tokens, logprobs, finish reasons) and statistics and hands the outputs to the
  AsyncEngine's callbacks exactly as a local Engine would. Control traffic is one collective each
  way per step over a gloo group (a broadcast of the pickled commands, a gather of the pickled
  replies, in fixed-size frames: DistTransport). When nothing is unfinished anywhere rank 0 stops
  stepping, so the replicas block in the broadcast's recv (no spinning) until the next request.
- Text stops (stop strings, tool-call parsing) are decided on rank 0, where the detokenizers live:
  rank 0 replays each remote token through the request's stop_checker, cuts the output at the token
  that completes a stop and finishes the request there (as Engine._append does), then cancels it on
  its replica at the next step. The replica may compute one more step of it meanwhile; nothing of it
  is delivered.
- Admission control (--max-queue) is per replica and lives on rank 0: requests waiting on the chosen
  replica (unfinished minus running at its last step) at the limit give QueueFull (HTTP 429). Every
  other refusal (bad sampling parameters, too long, larger than the cache) is checked on rank 0 with
  the Engine's own rules (`_check`, the twin of Engine._make_request), so a replica never refuses what
  rank 0 accepted.
- Seeds: rank 0 draws every request's seed (from --seed) in arrival order, as a single Engine does,
  so a sampled request's output does not depend on the replica that runs it; greedy outputs do not
  either (same weights, and the engine's batching does not change greedy tokens).
- Statistics (/metrics): the sum over replicas of each replica's EngineStats after its latest step
  (running/waiting requests, cache blocks and usage, prefix-cache queries and hits, speculative
  drafts and acceptances, preemptions); finish reasons and refusals are counted on rank 0, which
  sees every request end. Per-replica gauges (`ReplicaCollector`) show where the requests went.

Failures: a replica whose step raises reports it; rank 0 then raises from step(), so the AsyncEngine
fails every request in flight with HTTP 500 (as a failed step of one engine does) and the cancels it
sends free them on their replicas; the replicas keep serving. A replica process that dies breaks the
gloo group: rank 0's next collective raises (gloo reports the closed connection), the requests in
flight fail with HTTP 500, the engine is marked dead (`on_dead`: the server then answers 503 and
shuts down) and later requests are refused. A replica that hangs without dying is not detected
(the command group's timeout is a year, so that an idle server may wait for requests); torchrun
tears the job down when any of its processes exits. If rank 0 dies, the replicas' recv fails and
they exit.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import random
import signal
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from dsv3.infer.engine import Engine, EngineStats, QueueFull, RequestRejected, check_request
from dsv3.infer.lockstep import COMMAND_TIMEOUT  # idle replicas wait in a recv as long as nobody sends a request
from dsv3.infer.params import ABORT, LENGTH, STOP, GeneratedTokens, RequestOutput, SamplingParams
from dsv3.infer.speculative import SpecStats

__all__ = ["ReplicatedEngine", "Replica", "DistTransport", "InProcessTransport", "ReplicaCollector", "replica_loop",
           "check_dp_args", "init_replicas", "serve_dp"]

log = logging.getLogger("dsv3.replicas")

_STOP = "stop"  # the command that ends replica_loop


@dataclass
class Reply:
    """What one replica returns after a step."""
    outputs: list[RequestOutput]
    stats: EngineStats
    error: str | None = None                                   # its step raised
    refused: list[tuple[str, str]] = field(default_factory=list)  # (request id, why) adds it refused


class Replica:
    """One replica's side of a step: apply rank 0's commands to the local Engine, step it once."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.steps = 0

    def handle(self, ops: Sequence[tuple]) -> Reply:
        e, refused = self.engine, []
        for op in ops:  # in the order rank 0 issued them (a cancel may follow its own add)
            try:
                if op[0] == "add":
                    _, rid, prompt, params = op
                    e.add_request(prompt, params, request_id=rid)
                else:
                    e.abort(op[1])
            except Exception as x:  # rank 0 checked it with the same rules: a bug, reported, not fatal
                log.exception("data-parallel replica: %s %s failed", op[0], op[1])
                if op[0] == "add":
                    refused.append((op[1], f"{type(x).__name__}: {x}"))
        outs, error = [], None
        try:
            if e.has_unfinished():
                self.steps += 1
                outs = e.step()
        except Exception as x:
            log.exception("data-parallel replica: engine step failed")
            error = f"{type(x).__name__}: {x}"
        return Reply(outs, e.stats(), error, refused)


class _Shadow(GeneratedTokens):
    """Rank 0's record of one request. It is also what the request's stop_checker reads (the fields
    of dsv3.infer.params.Request that checkers use: prompt, tokens, output_token_ids)."""

    def __init__(self, rid: str, replica: int, prompt: list[int], params: SamplingParams, stop_checker, on_output):
        self.request_id, self.replica = rid, replica
        self.prompt, self.params = prompt, params
        self.tokens = list(prompt)
        self.stop_checker, self.on_output = stop_checker, on_output
        self.sent = False            # its add went out to the replica
        self.cancelled = False       # abort() was called


# ====================================================================== transports
class InProcessTransport:
    """Replicas in the caller's process, stepped one after another in the caller's thread (tests,
    debugging). Commands and replies go through pickle, as they do between processes."""

    def __init__(self, engines: Sequence[Engine]):
        self.replicas = [Replica(e) for e in engines]
        self.size = 1 + len(self.replicas)
        self.stopped = False

    def exchange(self, commands: list, local: Callable[[list], Reply]) -> list[Reply]:
        assert len(commands) == self.size and not self.stopped
        cmds = pickle.loads(pickle.dumps(commands))
        out = [local(cmds[0])]
        out += [pickle.loads(pickle.dumps(r.handle(c))) for r, c in zip(self.replicas, cmds[1:])]
        return out

    def stop(self):
        self.stopped = True


FRAME = 1 << 16  # bytes: a decode step's replies for a few hundred requests, or a burst of prompts


class DistTransport:
    """The replicas are the ranks of `group` (None: the world); rank 0 is the front end. Per step, one
    broadcast of the commands and one gather of the replies, each a fixed-size frame of pickled bytes
    (an 8-byte length, then the payload). A payload longer than the frame (a burst of long prompts,
    prompt logprobs) sends its rest right after: a second broadcast for the commands (every rank
    reads the length), a point-to-point send to rank 0 for a reply (rank 0 reads each length). So a
    step costs one collective each way in the common case; the object collectives of
    torch.distributed cost five (sizes first, then the bytes; measured in docs/parallel.md). Use a gloo
    group with a long timeout: idle replicas wait in the broadcast's recv."""

    def __init__(self, group=None, frame: int = FRAME):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.frame = frame
        self._buf = torch.empty(frame, dtype=torch.uint8)
        self._bufs = [torch.empty(frame, dtype=torch.uint8) for _ in range(self.size)] if self.rank == 0 else None

    def exchange(self, commands: list, local: Callable[[list], Reply]) -> list[Reply]:
        assert self.rank == 0 and len(commands) == self.size
        self._broadcast(list(commands))
        mine = local(commands[0])  # this rank's replica steps while the others do
        dist.gather(self._buf, self._bufs, group=self.group, group_dst=0)  # (rank 0's own frame is not read)
        out = [mine]
        for r in range(1, self.size):
            n, head = _frame_length(self._bufs[r]), self.frame - 8
            rest = None
            if n > head:
                rest = torch.empty(n - head, dtype=torch.uint8)
                dist.recv(rest, group=self.group, group_src=r)
            out.append(_unframe(self._bufs[r], rest))
        return out

    def stop(self):
        self._broadcast(_STOP)

    def _broadcast(self, obj):
        rest = _frame(obj, self._buf)
        dist.broadcast(self._buf, group=self.group, group_src=0)
        if rest is not None:
            dist.broadcast(rest, group=self.group, group_src=0)

    # the other ranks
    def recv(self):
        dist.broadcast(self._buf, group=self.group, group_src=0)
        n, head = _frame_length(self._buf), self.frame - 8
        rest = None
        if n > head:
            rest = torch.empty(n - head, dtype=torch.uint8)
            dist.broadcast(rest, group=self.group, group_src=0)
        cmds = _unframe(self._buf, rest)
        return cmds if isinstance(cmds, str) else cmds[self.rank]

    def reply(self, r: Reply):
        rest = _frame(r, self._buf)
        dist.gather(self._buf, None, group=self.group, group_dst=0)
        if rest is not None:
            dist.send(rest, group=self.group, group_dst=0)


def _frame(obj, buf: torch.Tensor) -> torch.Tensor | None:
    """Pickle obj into buf ([length: int64][bytes]); returns what did not fit (or None)."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    n, head = len(data), buf.numel() - 8
    buf[:8] = torch.tensor([n], dtype=torch.int64).view(torch.uint8)
    k = min(n, head)
    if k:
        buf[8:8 + k] = torch.frombuffer(bytearray(data[:k]), dtype=torch.uint8)
    return torch.frombuffer(bytearray(data[k:]), dtype=torch.uint8) if n > head else None


def _frame_length(buf: torch.Tensor) -> int:
    return int(buf[:8].view(torch.int64)[0])


def _unframe(buf: torch.Tensor, rest: torch.Tensor | None):
    n = _frame_length(buf)
    data = buf[8:8 + min(n, buf.numel() - 8)].numpy().tobytes()
    if rest is not None:
        data += rest.numpy().tobytes()
    assert len(data) == n, (len(data), n)
    return pickle.loads(data)


def replica_loop(engine: Engine, transport: DistTransport) -> int:
    """The ranks other than 0: apply each step's commands and step until the stop command; returns
    the number of engine steps run. A transport error propagates (rank 0 is gone: exit)."""
    rep = Replica(engine)
    while True:
        ops = transport.recv()
        if ops == _STOP:
            return rep.steps
        transport.reply(rep.handle(ops))


# ====================================================================== rank 0
class ReplicatedEngine:
    """The Engine interface the server uses, over N replicas (see the module notes). `local` is rank
    0's Engine (replica 0); `transport` reaches the others (DistTransport, or InProcessTransport).
    All replicas must be built with the same model and flags. max_queue: waiting requests per replica
    (None: unbounded); the replicas' own Engines should have none (rank 0 admits)."""

    def __init__(self, local: Engine, transport, *, seed: int | None = None, max_queue: int | None = None,
                 prefix_aware: bool = True, prefix_slack: int = 4, on_dead: Callable[[], None] | None = None):
        self.local, self.transport = local, transport
        self.size = transport.size
        self.cfg = local.cfg
        self.max_model_len, self.block_size = local.max_model_len, local.block_size
        # the AsyncEngine's burst coalescing waits for at most this many arrivals
        self.max_num_seqs = local.max_num_seqs * self.size
        self.max_queue = max_queue
        self.prefix_aware = prefix_aware and local.alloc.enable_prefix_cache
        self.prefix_slack = prefix_slack
        self.on_dead = on_dead
        self._replica = Replica(local)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()        # request tables (HTTP threads add/abort, the engine thread steps)
        self._step_lock = threading.Lock()   # one exchange at a time (step, shutdown)
        self._live: dict[str, _Shadow] = {}
        self._ops: list[list[tuple]] = [[] for _ in range(self.size)]
        self._load = [0] * self.size         # unfinished requests per replica
        self.assigned = [0] * self.size      # requests ever assigned per replica
        self._prefix = [OrderedDict() for _ in range(self.size)]  # block-chain keys each replica was sent
        self._prefix_cap = local.alloc.usable
        first = local.stats()
        self._snap: list[EngineStats] = [dataclasses.replace(first, spec=SpecStats()) for _ in range(self.size)]
        self._finished: dict[str, int] = {STOP: 0, LENGTH: 0, ABORT: 0}
        self._rejected = 0
        self._steps = 0
        self.dead: str | None = None
        self._closed = False

    # ------------------------------------------------------------------ the Engine interface
    def add_request(self, prompt: Sequence[int], params: SamplingParams | None = None, request_id: str | None = None,
                    stop_checker: Callable | None = None, on_output: Callable[[RequestOutput], None] | None = None
                    ) -> str:
        prompt, params = self._check(prompt, params)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        params = dataclasses.replace(params, seed=seed)  # the replica's draws are then the same whichever runs it
        keys = self._keys(prompt) if self.prefix_aware else []
        with self._lock:
            if self.dead is not None or self._closed:
                raise RuntimeError(f"the data-parallel engine is down ({self.dead or 'shut down'})")
            if request_id is None:
                request_id = uuid.uuid4().hex
            elif request_id in self._live:
                raise ValueError(f"request id {request_id!r} is already in use")
            r = self._choose(keys)
            self._live[request_id] = _Shadow(request_id, r, prompt, params, stop_checker, on_output)
            self._load[r] += 1
            self.assigned[r] += 1
            self._ops[r].append(("add", request_id, prompt, params))
            lru = self._prefix[r]
            for k in keys:
                lru[k] = None
                lru.move_to_end(k)
            while len(lru) > self._prefix_cap:
                lru.popitem(last=False)
        return request_id

    def abort(self, request_id: str) -> bool:
        with self._lock:
            s = self._live.get(request_id)
            if s is None or self.dead is not None:
                return False
            if not s.cancelled:
                s.cancelled = True
                self._ops[s.replica].append(("abort", request_id))
            return True

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._live or any(self._ops))

    @property
    def running(self) -> list[str]:
        """Requests already sent to their replica and not finished (the AsyncEngine coalesces a burst
        of arrivals only when this is empty)."""
        with self._lock:
            return [rid for rid, s in self._live.items() if s.sent]

    def replica_of(self, request_id: str) -> int | None:
        with self._lock:
            s = self._live.get(request_id)
            return None if s is None else s.replica

    def step(self) -> list[RequestOutput]:
        with self._step_lock:
            if self.dead is not None or self._closed:
                raise RuntimeError(f"the data-parallel engine is down ({self.dead or 'shut down'})")
            self._steps += 1
            with self._lock:
                ops, self._ops = self._ops, [[] for _ in range(self.size)]
                for batch in ops:
                    for op in batch:
                        if op[0] == "add" and op[1] in self._live:
                            self._live[op[1]].sent = True
            try:
                replies = self.transport.exchange(ops, self._replica.handle)
            except Exception as e:
                self._die(f"{type(e).__name__}: {e}")
                raise RuntimeError(f"lost a data-parallel replica: {type(e).__name__}: {e}") from e
            now = time.monotonic()
            outs, errors = [], []
            for r, rep in enumerate(replies):
                self._snap[r] = rep.stats
                if rep.error is not None:
                    errors.append(f"replica {r}: {rep.error}")
                for rid, why in rep.refused:
                    log.error("data-parallel replica %d refused request %s: %s", r, rid, why)
                    outs += self._deliver(r, RequestOutput(rid, [], None, True, ABORT, None, 0, 0, 0), now)
                for o in rep.outputs:
                    outs += self._deliver(r, o, now)
            if errors:
                raise RuntimeError("a data-parallel replica's engine step failed: " + "; ".join(errors))
            return outs

    def stats(self) -> EngineStats:
        snaps = list(self._snap)

        def tot(name):
            return sum(getattr(s, name) for s in snaps)

        blocks = tot("num_blocks")
        used = sum(s.cache_usage * s.num_blocks for s in snaps)
        spec = SpecStats(**{f.name: sum(getattr(s.spec, f.name) for s in snaps)
                            for f in dataclasses.fields(SpecStats)})
        with self._lock:
            finished, rejected = dict(self._finished), self._rejected
        return EngineStats(num_running=tot("num_running"), num_waiting=tot("num_waiting"), num_blocks=blocks,
                           num_free_blocks=tot("num_free_blocks"), cache_usage=used / blocks if blocks else 0.0,
                           block_size=self.block_size, prompt_tokens=tot("prompt_tokens"),
                           generation_tokens=tot("generation_tokens"),
                           prefix_cache_queries=tot("prefix_cache_queries"),
                           prefix_cache_hits=tot("prefix_cache_hits"), requests_finished=finished,
                           requests_rejected=rejected + tot("requests_rejected"), preemptions=tot("preemptions"),
                           steps=self._steps, spec=spec)

    def replica_stats(self) -> list[tuple[int, EngineStats]]:
        """(requests assigned so far, EngineStats after its latest step) per replica."""
        with self._lock:
            assigned = list(self.assigned)
        return list(zip(assigned, list(self._snap)))

    def shutdown(self, timeout: float = 60.0) -> None:
        """Send the replicas the stop command (their replica_loop returns). Idempotent; waits up to
        `timeout` seconds for a step in flight."""
        if self._closed:
            return
        if not self._step_lock.acquire(timeout=timeout):
            log.error("data-parallel shutdown: a step is still running after %.0f s; replicas not stopped", timeout)
            return
        try:
            if self._closed:
                return
            self._closed = True
            if self.dead is None:
                self.transport.stop()
        finally:
            self._step_lock.release()

    # ------------------------------------------------------------------ internals
    def _check(self, prompt, params) -> tuple[list[int], SamplingParams]:
        """Engine's own request checks (dsv3.infer.engine.check_request) on the limits every replica
        shares (the replicas are built from the same flags)."""
        e = self.local
        try:
            prompt, params, _ = check_request(prompt, params, self.cfg.vocab_size, self.max_model_len,
                                              self.block_size, e.alloc.usable)
        except RequestRejected:
            self._count_rejected()
            raise
        return prompt, params

    def _count_rejected(self):
        with self._lock:
            self._rejected += 1

    def _keys(self, prompt: list[int]) -> list[int]:
        # a chain over the prompt's full blocks, those a prefix-cache hit can cover (Engine._admit leaves
        # at least one token to compute), each with the token after it as the engine's block_key has
        # (an MTP latent depends on it); process-local hashes are enough: rank 0 alone compares them
        bs, keys, h = self.block_size, [], 0
        for j in range((len(prompt) - 1) // bs):
            h = hash((h, tuple(prompt[j * bs:(j + 1) * bs + 1])))
            keys.append(h)
        return keys

    def _waiting(self, r: int) -> int:
        return max(0, self._load[r] - self._snap[r].num_running)

    def _choose(self, keys: list[int]) -> int:
        """Under self._lock: the replica for a new request (see the module notes), or QueueFull."""
        load = self._load
        least = min(range(self.size), key=lambda r: (load[r], r))
        best = least
        if keys:
            hits = []
            for r in range(self.size):
                lru, n = self._prefix[r], 0
                while n < len(keys) and keys[n] in lru:
                    n += 1
                hits.append(n)
            near = [r for r in range(self.size) if hits[r] and load[r] <= load[least] + self.prefix_slack]
            if near:
                best = max(near, key=lambda r: (hits[r], -load[r], -r))
        if self.max_queue is not None:
            if self._waiting(best) >= self.max_queue:
                best = least
            if self._waiting(best) >= self.max_queue:
                self._rejected += 1
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting on each of the "
                                f"{self.size} replicas)")
        return best

    def _deliver(self, r: int, o: RequestOutput, now: float) -> list[RequestOutput]:
        """Turn a replica's output into what the local Engine would have reported: text stops applied,
        then the request's on_output called. Outputs of requests rank 0 already finished are dropped."""
        with self._lock:
            s = self._live.get(o.request_id)
        if s is None or s.replica != r:
            return []
        toks, lps = list(o.new_token_ids), o.new_logprobs
        finished, reason, stop_reason = o.finished, o.finish_reason, o.stop_reason
        if s.stop_checker is None:
            s.tokens += toks
        else:
            for i, t in enumerate(toks):
                s.tokens.append(t)
                if i == len(toks) - 1 and o.finished and o.finish_reason == STOP and o.stop_reason == t:
                    break  # a stop token id: the Engine does not ask the checker about it
                try:
                    res = s.stop_checker(s)
                except Exception as e:  # stop the request, keep the engine (as Engine._append)
                    log.exception("stop_checker of request %s raised", s.request_id)
                    res = f"stop_checker error: {e!r}"
                if res:
                    toks = toks[:i + 1]
                    lps = None if lps is None else lps[:i + 1]
                    if not o.finished:
                        with self._lock:  # it still runs on its replica
                            self._ops[r].append(("abort", s.request_id))
                    finished, reason, stop_reason = True, STOP, res
                    break
        out = RequestOutput(request_id=o.request_id, new_token_ids=toks, new_logprobs=lps, finished=finished,
                            finish_reason=reason, stop_reason=stop_reason, num_prompt_tokens=o.num_prompt_tokens,
                            num_output_tokens=s.num_output_tokens, num_cached_tokens=o.num_cached_tokens,
                            prompt_logprobs=o.prompt_logprobs, time=now)  # rank 0's clock (the arrival's)
        if finished:
            with self._lock:
                self._live.pop(o.request_id, None)
                self._load[r] -= 1
                self._finished[reason] = self._finished.get(reason, 0) + 1
        if s.on_output is not None:
            try:
                s.on_output(out)
            except Exception:  # a caller's bug must not take the engine down (as Engine._collect)
                log.exception("on_output callback of request %s raised", s.request_id)
        return [out]

    def _die(self, why: str):
        log.error("data-parallel serving lost a replica (%s): failing the requests in flight", why)
        with self._lock:
            self.dead = why
            self._live.clear()
            self._ops = [[] for _ in range(self.size)]
        if self.on_dead is not None:
            try:
                self.on_dead()
            except Exception:
                log.exception("on_dead callback raised")


class ReplicaCollector:
    """Per-replica series for /metrics (registered beside the server's summed engine metrics)."""

    def __init__(self, engine: ReplicatedEngine, model_name: str):
        self.engine, self.model_name = engine, model_name

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        lab = ["model_name", "replica"]
        fams = {
            "assigned": CounterMetricFamily("dsv3:dp_replica_requests_assigned", "requests assigned to each "
                                            "data-parallel replica", labels=lab),
            "running": GaugeMetricFamily("dsv3:dp_replica_num_requests_running", "requests in each replica's "
                                         "running batch (after its latest step)", labels=lab),
            "waiting": GaugeMetricFamily("dsv3:dp_replica_num_requests_waiting", "requests queued on each replica",
                                         labels=lab),
            "usage": GaugeMetricFamily("dsv3:dp_replica_kv_cache_usage_perc", "fraction of each replica's "
                                       "latent-cache blocks held by requests (0..1)", labels=lab),
            "gen": CounterMetricFamily("dsv3:dp_replica_generation_tokens", "tokens generated by each replica",
                                       labels=lab),
            "hits": CounterMetricFamily("dsv3:dp_replica_prefix_cache_hits", "prompt tokens each replica served "
                                        "from its prefix cache", labels=lab),
        }
        for r, (assigned, s) in enumerate(self.engine.replica_stats()):
            val = [self.model_name, str(r)]
            for k, v in (("assigned", assigned), ("running", s.num_running), ("waiting", s.num_waiting),
                         ("usage", s.cache_usage), ("gen", s.generation_tokens), ("hits", s.prefix_cache_hits)):
                fams[k].add_metric(val, float(v))
        yield from fams.values()


# ====================================================================== dsv3 serve --dp N
def check_dp_args(args) -> int:
    """ValueError for what `dsv3 serve --dp N` does not do; returns N."""
    dp = args.dp
    if not isinstance(dp, int) or dp < 1:
        raise ValueError(f"--dp must be a positive integer, got {dp!r}")
    others = [f"--{k} {getattr(args, k, 1)}" for k in ("tp", "ep", "pp") if getattr(args, k, 1) != 1]
    if others:
        raise ValueError(f"--dp {dp} together with {' '.join(others)} is not supported yet: each data-parallel "
                         f"serving replica is one process holding the whole model")
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        raise ValueError(f"--dp {dp}: data-parallel serving is not supported in one process; launch it under "
                         f"torchrun with {dp} processes (torchrun --nproc-per-node {dp} -m dsv3 serve ... --dp {dp})")
    world = int(os.environ["WORLD_SIZE"])
    if world != dp:
        raise ValueError(f"--dp {dp}: one replica per process, but the world size is {world} (launch torchrun "
                         f"with --nproc-per-node {dp})")
    return dp


def init_replicas(args) -> int:
    """The torchrun ranks as whole-model replicas (`dsv3 serve --dp`, `dsv3 generate --prompts-file
    --dp`): one device per replica (`--device cuda` becomes cuda:LOCAL_RANK; an explicit index is
    kept) and a gloo world group with the long command timeout, since what the replicas exchange is
    small CPU objects whatever the model's device. Returns this rank."""
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if args.device.startswith("cuda") and ":" not in args.device:
        args.device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=COMMAND_TIMEOUT)
    return rank


def serve_dp(args) -> int:
    """`torchrun --nproc-per-node N -m dsv3 serve ... --dp N`: every rank builds the same Engine from the
    flags; rank 0 serves HTTP over a ReplicatedEngine, the others run replica_loop until rank 0 sends
    the stop command (after SIGTERM's drain, or when its server fails). Returns the exit code."""
    from dsv3.serve import app as A

    check_dp_args(args)
    if not os.path.isdir(args.model):
        raise ValueError(f"--model {args.model!r} is not a folder")
    rank = init_replicas(args)
    try:
        # every rank checks the flags and builds its engine; all fail together if any fails (a rank
        # left waiting in a collective for a peer that exited would wait for a year)
        server, err = None, None
        try:
            server = A.build_server(args)
        except Exception as e:
            err = e
        errs = [None] * dist.get_world_size()
        dist.all_gather_object(errs, None if err is None else (type(err).__name__, str(err)))
        if err is not None:
            raise err
        bad = next(((i, e) for i, e in enumerate(errs) if e is not None), None)
        if bad is not None:
            raise RuntimeError(f"rank {bad[0]} failed to start: {bad[1][0]}: {bad[1][1]}")
        engine = server.engine
        engine.max_queue = None  # rank 0 admits (per replica): see ReplicatedEngine
        transport = DistTransport()
        if rank != 0:
            # torchrun forwards SIGINT/SIGTERM to every rank; rank 0 drains the requests of every replica
            # first and then sends the stop command, so the replicas must keep stepping until then
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(sig, signal.SIG_IGN)
            n = replica_loop(engine, transport)
            log.info("rank %d: data-parallel replica stopped after %d steps", rank, n)
            return 0
        rep = ReplicatedEngine(engine, transport, seed=args.seed, max_queue=args.max_queue,
                               prefix_aware=not args.no_prefix_cache)
        srv = A.Server(rep, server.tok, server.model_names, root=server.root, api_key=server.api_key,
                       batch_wait=args.batch_wait_ms / 1000)
        srv.metrics.registry.register(ReplicaCollector(rep, srv.model_names[0]))
        app = A.create_app(srv)
        uv = A.make_uvicorn_server(app, args.host, args.port, args.log_level, args.shutdown_timeout)

        def dead():  # a replica is gone: answer 503 from now on and shut the server down
            srv.draining = True
            uv.should_exit = True

        rep.on_dead = dead
        log.info("serving %s as %s on %d data-parallel replicas (per replica: max batch %d, max queue %d; "
                 "context %d tokens)", args.model, ", ".join(srv.model_names), rep.size, args.max_batch,
                 args.max_queue, srv.max_model_len)
        try:
            uv.run()
        finally:
            srv.aengine.stop()  # (the lifespan stopped it already, unless uvicorn failed to start)
            rep.shutdown()
        log.info("rank 0: data-parallel server stopped after %d steps", rep._steps)
        return 1 if rep.dead is not None else 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
