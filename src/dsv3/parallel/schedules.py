"""Pipeline-parallel schedules as plain data: 1F1B, DualPipe and DualPipeV.

A schedule is, for every pipeline rank, the ordered list of what that rank does in one training
step: forward chunks (F), backward chunks, weight-gradient chunks (W) and the point-to-point
sends/receives between them. Nothing here touches torch.distributed: `dsv3.parallel.pipeline`
executes these lists, the tests validate them, and `simulate` replays them with a cost model to
measure the pipeline bubble from the schedule itself.

Backward kinds, as in the zero-bubble split used by DualPipe (DeepSeek-V3 report section 3.2.1):
  "BW" a full backward chunk: gradients for the chunk input and the weights together;
  "B"  the input-gradient part only; its weight-gradient part is a separate "W" op later.

Where the pipeline stages live ("chunk" = a model piece held by a rank):
  1f1b       PP ranks, PP stages; rank r holds stage r (chunk 0).
  dualpipe   PP ranks (even), PP stages, each held twice: rank r holds stage r for the micro-batches
             fed at rank 0 (chunk 0, "direction 0") and stage PP-1-r for those fed at rank PP-1
             (chunk 1, "direction 1"). Micro-batches 0..M/2-1 go down, M/2..M-1 come up. The two
             copies of a stage must start equal and have their gradients summed after the step.
  dualpipev  PP ranks, 2*PP stages in a V: rank r holds stage r (chunk 0) and stage 2*PP-1-r
             (chunk 1); every micro-batch enters and leaves at rank 0.

The DualPipe / DualPipeV step order (warm-up, the F&B-overlapped main loop, zero-bubble cool-down)
follows DeepSeek's reference (github.com/deepseek-ai/DualPipe, dualpipe.py / dualpipev.py): same
phases, same counts, same points where the backward switches to the split B + W form. Its table
gives the bubble (PP/2-1)(F&B+B-3W) for DualPipe against (PP-1)(F+B) for 1F1B, and the same
(PP/2-1)(F&B+B-3W) for DualPipeV where PP counts stages, i.e. (ranks-1)(F&B+B-3W). F, B and W are
the times of one chunk's forward, full backward and weight-gradient part; F&B is the time of a
forward and a full backward executed overlapped as one unit.

Send placement is ours: a rank sends a result right after computing it, and posts each receive
before the op that consumes it, in the order its peer sends (so backends that match
point-to-point messages in FIFO order per pair, as NCCL does, pair them correctly).
"""
import argparse
import sys
from collections import defaultdict, deque
from dataclasses import dataclass, field

__all__ = [
    "KINDS", "Op", "Layout", "Costs", "Timeline", "build_schedule", "simulate", "validate",
    "bubble_formula", "bubble_table", "dump_schedule",
]

KINDS = ("1f1b", "dualpipe", "dualpipev")
COMPUTE = ("F", "B", "BW", "W")
COMM = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")


@dataclass(frozen=True)
class Op:
    kind: str        # one of COMPUTE or COMM
    chunk: int       # the rank's local model piece (0 or 1)
    mb: int          # micro-batch id, 0..M-1
    peer: int = -1   # the other rank of a send / receive
    # DualPipe's F&B: this F and the next compute op of the rank run as one overlapped unit
    # (their receives are posted before the unit, their sends follow it).
    overlap: bool = False

    def __str__(self):
        if self.kind in COMM:
            arrow = ">" if self.kind.startswith("SEND") else "<"
            return f"{arrow}{self.kind[-1]}{self.chunk}.{self.mb}@{self.peer}"
        return f"{self.kind}{self.chunk}.{self.mb}" + ("&" if self.overlap else "")


@dataclass(frozen=True)
class Layout:
    """Which rank and chunk run which stage of which micro-batch."""
    kind: str
    pp: int              # pipeline ranks
    micro_batches: int   # M, per training step, all directions together

    def __post_init__(self):
        kind, pp, m = self.kind, self.pp, self.micro_batches
        if kind not in KINDS:
            raise ValueError(f"unknown pipeline schedule {kind!r}; choose from {', '.join(KINDS)}")
        if not isinstance(pp, int) or pp < 1:
            raise ValueError(f"pipeline ranks must be a positive integer, got pp={pp!r}")
        if not isinstance(m, int) or m < 1:
            raise ValueError(f"micro-batches must be a positive integer, got {m!r}")
        # Constraints of DeepSeek's reference implementation (asserted in its step()).
        if kind == "dualpipe":
            if pp % 2:
                raise ValueError(f"dualpipe needs an even number of pipeline ranks, got pp={pp}")
            if m % 2 or m < 2 * pp:
                raise ValueError(f"dualpipe needs an even number of micro-batches >= 2*pp = {2 * pp}, got {m}")
        if kind == "dualpipev" and m < 2 * pp:
            raise ValueError(f"dualpipev needs micro-batches >= 2*pp = {2 * pp}, got {m}")

    @property
    def n_chunks(self) -> int:
        return 1 if self.kind == "1f1b" else 2

    @property
    def n_stages(self) -> int:
        return 2 * self.pp if self.kind == "dualpipev" else self.pp

    def stage(self, rank: int, chunk: int) -> int:
        if chunk == 0:
            return rank
        return self.pp - 1 - rank if self.kind == "dualpipe" else 2 * self.pp - 1 - rank

    def micro_batches_of(self, chunk: int) -> range:
        m = self.micro_batches
        if self.kind == "dualpipe":
            return range(0, m // 2) if chunk == 0 else range(m // 2, m)
        return range(m)

    def where(self, stage: int, mb: int) -> tuple[int, int]:
        """(rank, chunk) that runs `stage` for micro-batch `mb`."""
        assert 0 <= stage < self.n_stages and 0 <= mb < self.micro_batches
        if self.kind == "1f1b":
            return stage, 0
        if self.kind == "dualpipe":
            return (stage, 0) if mb < self.micro_batches // 2 else (self.pp - 1 - stage, 1)
        return (stage, 0) if stage < self.pp else (2 * self.pp - 1 - stage, 1)

    def entry_rank(self, mb: int) -> int:
        return self.where(0, mb)[0]

    def exit_rank(self, mb: int) -> int:
        return self.where(self.n_stages - 1, mb)[0]

    def stages_of(self, rank: int) -> list[int]:
        return [self.stage(rank, c) for c in range(self.n_chunks)]


# ----------------------------------------------------------------------------- generation

class _Builder:
    """Emits one rank's compute ops; micro-batch ids and the W queue are tracked here so the
    step recipes below only say *which chunk* does *what*."""

    def __init__(self, layout: Layout, rank: int):
        self.layout, self.rank = layout, rank
        self.next_f = [iter(layout.micro_batches_of(c)) for c in range(layout.n_chunks)]
        self.next_b = [iter(layout.micro_batches_of(c)) for c in range(layout.n_chunks)]
        self.w_queue: deque[tuple[int, int]] = deque()  # deferred W, first in first out
        self.ops: list[Op] = []

    def f(self, chunk, overlap=False):
        self.ops.append(Op("F", chunk, next(self.next_f[chunk]), overlap=overlap))

    def b(self, chunk, zero_bubble=False):
        mb = next(self.next_b[chunk])
        if zero_bubble:
            self.ops.append(Op("B", chunk, mb))
            self.w_queue.append((chunk, mb))
        else:
            self.ops.append(Op("BW", chunk, mb))

    def fb(self, f_chunk, b_chunk):
        self.f(f_chunk, overlap=True)
        self.b(b_chunk)

    def w(self):
        chunk, mb = self.w_queue.popleft()
        self.ops.append(Op("W", chunk, mb))


def _one_f_one_b(layout: Layout, rank: int) -> list[Op]:
    # Classic 1F1B (PipeDream-Flush): PP-1-r warm-up forwards, then alternate one forward and
    # one full backward, then drain the backwards.
    bld = _Builder(layout, rank)
    m = layout.micro_batches
    warm = min(layout.pp - 1 - rank, m)
    for _ in range(warm):
        bld.f(0)
    for _ in range(m - warm):
        bld.f(0)
        bld.b(0)
    for _ in range(warm):
        bld.b(0)
    return bld.ops


def _dual(layout: Layout, rank: int) -> list[Op]:
    # DualPipe and DualPipeV share one recipe written in "phases": phase 0 is the chunk in which
    # this rank sits in the first half of its pipeline (it sees micro-batches early), phase 1 the
    # other. DualPipe's second half of ranks maps phase p to chunk 1-p; DualPipeV is DualPipe cut
    # in half: H = PP ranks, h = rank, and every micro-batch counts for both chunks.
    pp, m = layout.pp, layout.micro_batches
    if layout.kind == "dualpipe":
        H, h, per_dir = pp // 2, min(rank, pp - 1 - rank), m // 2
        flip = int(rank >= pp // 2)
    else:
        H, h, per_dir, flip = pp, rank, m, 0
    bld = _Builder(layout, rank)
    c0, c1 = flip, 1 - flip  # chunk of phase 0, chunk of phase 1
    middle = h == H - 1      # the rank(s) at the bend of the pipeline
    warm = H - h - 1

    for _ in range(2 * warm):                 # 1: forwards of phase 0 only
        bld.f(c0)
    for _ in range(h + 1):                    # 2: forwards of both phases
        bld.f(c0)
        bld.f(c1)
    for _ in range(warm):                     # 3: B (zero-bubble) + W + F, phase 1
        bld.b(c1, zero_bubble=True)
        bld.w()
        bld.f(c1)
    for i in range(per_dir - 2 * H + h + 1):  # 4: main loop, F&B overlapped both ways
        if i == 0 and middle:
            # The reference does not overlap this first pair on the middle ranks: the F output
            # is needed at once by the other half, so running it alone shrinks the bubble.
            bld.f(c0)
            bld.b(c1)
        else:
            bld.fb(c0, c1)
        bld.fb(c1, c0)
    for _ in range(warm):                     # 5: B phase 1, then F&B
        bld.b(c1)
        bld.fb(c1, c0)
    zero_bubble = False                       # 6: backwards of both phases; the later half split
    for i in range(h + 1):
        if i == (h + 1) // 2 and h % 2 == 1:
            zero_bubble = True
        bld.b(c1, zero_bubble)
        if i == (h + 1) // 2 and h % 2 == 0:
            zero_bubble = True
        bld.b(c0, zero_bubble)
    for _ in range(warm):                     # 7: W fills the gaps between phase-0 backwards
        bld.w()
        bld.b(c0, zero_bubble=True)
    for _ in range(h + 1):                    # 8: remaining W
        bld.w()
    assert not bld.w_queue
    for c in range(layout.n_chunks):
        assert next(bld.next_f[c], None) is None and next(bld.next_b[c], None) is None
    return bld.ops


def _units(ops: list[Op]) -> list[list[Op]]:
    # Group compute ops into execution units: an overlapped F with the op after it, else single.
    units, i = [], 0
    while i < len(ops):
        if ops[i].overlap:
            assert i + 1 < len(ops) and ops[i + 1].kind in ("B", "BW"), "an F&B unit needs a backward"
            units.append([ops[i], ops[i + 1]])
            i += 2
        else:
            units.append([ops[i]])
            i += 1
    return units


def _needs(layout: Layout, rank: int, op: Op):
    # The remote message a compute op consumes, as ((src rank), message key) or None.
    # Message keys: ("F", producing stage, mb) for activations, ("B", producing stage, mb) for
    # gradients w.r.t. the producing stage's input.
    s = layout.stage(rank, op.chunk)
    if op.kind == "F" and s > 0:
        src = layout.where(s - 1, op.mb)[0]
        if src != rank:
            return src, ("F", s - 1, op.mb)
    if op.kind in ("B", "BW") and s < layout.n_stages - 1:
        src = layout.where(s + 1, op.mb)[0]
        if src != rank:
            return src, ("B", s + 1, op.mb)
    return None


def _produces(layout: Layout, rank: int, op: Op):
    # The remote message a compute op produces, as (dst rank, key) or None.
    s = layout.stage(rank, op.chunk)
    if op.kind == "F" and s < layout.n_stages - 1:
        dst, chunk = layout.where(s + 1, op.mb)
        if dst != rank:
            return dst, chunk, ("F", s, op.mb)
    if op.kind in ("B", "BW") and s > 0:
        dst, chunk = layout.where(s - 1, op.mb)
        if dst != rank:
            return dst, chunk, ("B", s, op.mb)
    return None


def build_schedule(kind: str, pp: int, micro_batches: int) -> list[list[Op]]:
    """Per-rank op lists (compute and point-to-point) for one training step."""
    layout = Layout(kind, pp, micro_batches)
    gen = _one_f_one_b if kind == "1f1b" else _dual
    compute = [gen(layout, r) for r in range(pp)]

    # Sends right after the unit that produced them; remember the order per (src, dst) pair.
    with_sends: list[list[list[Op]]] = []  # per rank: per unit, [unit ops..., sends...]
    order: dict[tuple[int, int], list] = defaultdict(list)  # (src, dst) -> [(key, dst chunk)]
    for r in range(pp):
        rows = []
        for unit in _units(compute[r]):
            sends = []
            for op in unit:
                out = _produces(layout, r, op)
                if out is not None:
                    dst, dst_chunk, key = out
                    sends.append(Op("SEND_" + key[0], op.chunk, op.mb, peer=dst))
                    order[r, dst].append((key, dst_chunk))
            rows.append((unit, sends))
        with_sends.append(rows)

    # Receives: before a unit, post every message it needs, together with all messages the same
    # peer sent earlier that are not posted yet (FIFO per pair).
    schedule = []
    for r in range(pp):
        posted = defaultdict(int)  # src -> messages from src already posted
        ops: list[Op] = []
        for unit, sends in with_sends[r]:
            for op in unit:
                need = _needs(layout, r, op)
                if need is None:
                    continue
                src, key = need
                queue = order[src, r]
                target = next(i for i, (k, _) in enumerate(queue) if k == key)
                while posted[src] <= target:
                    k, chunk = queue[posted[src]]
                    ops.append(Op("RECV_" + k[0], chunk, k[2], peer=src))
                    posted[src] += 1
            ops.extend(unit)
            ops.extend(sends)
        schedule.append(ops)
    return schedule


# ----------------------------------------------------------------------------- cost model

@dataclass(frozen=True)
class Costs:
    """Execution times of one chunk (DualPipe's notation). B is a full backward; an input-only
    backward "B" op costs B - W; an F&B unit costs FB (default F + B: no overlap gain)."""
    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    FB: float | None = None

    @property
    def fb(self) -> float:
        return self.F + self.B if self.FB is None else self.FB

    def of_unit(self, unit: list[Op]) -> float:
        if len(unit) == 2:
            assert unit[1].kind == "BW", "F&B units pair a forward with a full backward"
            return self.fb
        return {"F": self.F, "BW": self.B, "B": self.B - self.W, "W": self.W}[unit[0].kind]


@dataclass
class Timeline:
    layout: Layout
    costs: Costs
    units: list[list[tuple[float, float, list[Op]]]]  # per rank: (start, end, ops)
    makespan: float = 0.0
    busy: list[float] = field(default_factory=list)

    @property
    def bubble(self) -> list[float]:
        """Idle time of each rank within the step (makespan - its busy time)."""
        return [self.makespan - b for b in self.busy]

    @property
    def bubble_fraction(self) -> float:
        """Idle share of all rank-time: sum(bubble) / (ranks * makespan)."""
        return sum(self.bubble) / (len(self.busy) * self.makespan)

    def start_of(self, rank: int, kind: str, chunk: int, mb: int) -> float:
        return self._find(rank, kind, chunk, mb)[0]

    def end_of(self, rank: int, kind: str, chunk: int, mb: int) -> float:
        return self._find(rank, kind, chunk, mb)[1]

    def _find(self, rank, kind, chunk, mb):
        for start, end, unit in self.units[rank]:
            for op in unit:
                if op.kind == kind and op.chunk == chunk and op.mb == mb:
                    return start, end
        raise KeyError((rank, kind, chunk, mb))


def simulate(schedule: list[list[Op]], layout: Layout, costs: Costs = Costs(), latency: float = 0.0) -> Timeline:
    """Replay the per-rank lists: each rank runs its units in order, a unit starts once the rank
    is free and its inputs exist (a remote input arrives `latency` after it was produced).
    Raises RuntimeError if the ranks would wait on each other forever."""
    pp = layout.pp
    units = [_units([op for op in ops if op.kind in COMPUTE]) for ops in schedule]
    done: dict[tuple[str, int, int], float] = {}  # ("F"|"B"|"W", stage, mb) -> end time
    clock = [0.0] * pp
    pos = [0] * pp
    out = [[] for _ in range(pp)]

    def ready(rank, op):
        s = layout.stage(rank, op.chunk)
        deps = []  # (key, is remote)
        if op.kind == "F":
            if s > 0:
                deps.append((("F", s - 1, op.mb), layout.where(s - 1, op.mb)[0] != rank))
        elif op.kind in ("B", "BW"):
            deps.append((("F", s, op.mb), False))
            if s < layout.n_stages - 1:
                deps.append((("B", s + 1, op.mb), layout.where(s + 1, op.mb)[0] != rank))
        else:
            deps.append((("B", s, op.mb), False))
        t = 0.0
        for key, remote in deps:
            if key not in done:
                return None
            t = max(t, done[key] + (latency if remote else 0.0))
        return t

    remaining = sum(len(u) for u in units)
    while remaining:
        progressed = False
        for r in range(pp):
            while pos[r] < len(units[r]):
                unit = units[r][pos[r]]
                # A unit starts when all its ops' inputs exist (an F&B unit is one piece of work).
                times = [ready(r, op) for op in unit]
                if all(t is not None for t in times):
                    start = max([clock[r]] + times)
                    end = start + costs.of_unit(unit)
                    for op in unit:
                        key = ("B" if op.kind in ("B", "BW") else op.kind, layout.stage(r, op.chunk), op.mb)
                        done[key] = end
                    out[r].append((start, end, unit))
                    clock[r] = end
                    pos[r] += 1
                    remaining -= 1
                    progressed = True
                else:
                    break
        if not progressed:
            stuck = {r: [str(o) for o in units[r][pos[r]]] for r in range(pp) if pos[r] < len(units[r])}
            raise RuntimeError(f"schedule deadlocks: ranks wait on each other at {stuck}")
    tl = Timeline(layout, costs, out)
    tl.makespan = max(clock)
    tl.busy = [sum(e - s for s, e, _ in rows) for rows in out]
    return tl


def bubble_formula(kind: str, pp: int, costs: Costs = Costs()) -> float:
    """The bubble of DualPipe's README table, with pp = pipeline ranks."""
    if kind == "1f1b":
        return (pp - 1) * (costs.F + costs.B)
    if kind == "dualpipe":
        return (pp / 2 - 1) * (costs.fb + costs.B - 3 * costs.W)
    if kind == "dualpipev":
        return (pp - 1) * (costs.fb + costs.B - 3 * costs.W)  # the table's PP counts 2 stages per rank
    raise ValueError(f"unknown pipeline schedule {kind!r}; choose from {', '.join(KINDS)}")


# ----------------------------------------------------------------------------- validation

def validate(schedule: list[list[Op]], layout: Layout) -> None:
    """Raise AssertionError unless the schedule is complete and consistent:
    every (stage, micro-batch) has one F and one backward, split backwards have one W after
    them, every rank runs only its own chunks, each remote input is received before it is
    used (and sent after it is produced), sends and receives pair up in the same order per
    pair of ranks, and the ranks cannot deadlock (the replay finishes)."""
    pp, n_stages = layout.pp, layout.n_stages
    assert len(schedule) == pp, f"{len(schedule)} rank lists for pp={pp}"
    seen: dict[tuple[str, int, int], tuple[int, int]] = {}  # (F|BACK|W, stage, mb) -> (rank, index)
    split: set[tuple[int, int]] = set()
    sent: dict[tuple[int, int], list] = defaultdict(list)
    received: dict[tuple[int, int], list] = defaultdict(list)
    for r, ops in enumerate(schedule):
        recv_at, send_at = {}, {}
        for i, op in enumerate(ops):
            assert op.chunk in range(layout.n_chunks), f"rank {r}: bad chunk in {op}"
            assert op.mb in layout.micro_batches_of(op.chunk), f"rank {r}: {op} runs a micro-batch of the other chunk"
            s = layout.stage(r, op.chunk)
            if op.kind in COMPUTE:
                assert layout.where(s, op.mb) == (r, op.chunk), f"rank {r} runs {op} it does not hold"
                key = ("BACK" if op.kind in ("B", "BW") else op.kind, s, op.mb)
                assert key not in seen, f"rank {r}: {op} appears twice"
                seen[key] = (r, i)
                if op.kind == "B":
                    split.add((s, op.mb))
                need = _needs(layout, r, op)
                if need is not None:
                    src, msg = need
                    assert (src, msg) in recv_at, f"rank {r}: {op} runs before receiving {msg} from rank {src}"
                out = _produces(layout, r, op)
                if out is not None:
                    send_at[(out[0], out[2])] = i
            else:
                if op.kind.startswith("RECV"):
                    kind = op.kind[-1]
                    producer = s - 1 if kind == "F" else s + 1
                    assert 0 <= producer < n_stages, f"rank {r}: {op} has no producer stage"
                    assert layout.where(producer, op.mb)[0] == op.peer, f"rank {r}: {op} from the wrong rank"
                    msg = (kind, producer, op.mb)
                    recv_at[(op.peer, msg)] = i
                    received[op.peer, r].append(msg)
                else:
                    kind = op.kind[-1]
                    msg = (kind, s, op.mb)
                    assert (op.peer, msg) in send_at, f"rank {r}: {op} sent before it was computed"
                    consumer = s + 1 if kind == "F" else s - 1
                    assert layout.where(consumer, op.mb)[0] == op.peer, f"rank {r}: {op} to the wrong rank"
                    sent[r, op.peer].append(msg)
    for s in range(n_stages):
        for mb in range(layout.micro_batches):
            f, b = seen.get(("F", s, mb)), seen.get(("BACK", s, mb))
            assert f is not None and b is not None, f"stage {s} micro-batch {mb}: missing F or backward"
            assert f < b, f"stage {s} micro-batch {mb}: backward before forward"
            w = seen.get(("W", s, mb))
            if (s, mb) in split:
                assert w is not None and b < w, f"stage {s} micro-batch {mb}: split backward without a later W"
            else:
                assert w is None, f"stage {s} micro-batch {mb}: W after a full backward"
    assert len(seen) == 2 * n_stages * layout.micro_batches + len(split), "unexpected compute ops"
    for pair in set(sent) | set(received):
        assert sent[pair] == received[pair], f"ranks {pair}: sends {sent[pair]} != receives {received[pair]}"
    try:
        simulate(schedule, layout)
    except RuntimeError as e:
        raise AssertionError(str(e)) from e


# ----------------------------------------------------------------------------- dump

def _cell(op: Op) -> str:
    # Upper case for chunk 0, lower case for chunk 1 (DualPipe's two directions / DualPipeV's legs).
    k = {"F": "F", "B": "B", "BW": "B", "W": "W"}[op.kind]
    return (k if op.chunk == 0 else k.lower()) + str(op.mb)


def dump_schedule(kind: str, pp: int, micro_batches: int, costs: Costs = Costs(), file=None,
                  show_ops: bool = False) -> Timeline:
    """Print the per-rank timeline (one column per time unit of the cost model) and the
    bubble measured on it next to the formula of DualPipe's table. Returns the Timeline."""
    file = sys.stdout if file is None else file
    layout = Layout(kind, pp, micro_batches)
    schedule = build_schedule(kind, pp, micro_batches)
    tl = simulate(schedule, layout, costs)
    width = max(3, len(str(micro_batches - 1)) + 2)
    integral = all(float(x).is_integer() for x in (costs.F, costs.B, costs.W, costs.fb))
    print(f"{kind}: pp={pp} ranks, {layout.n_stages} stages, {micro_batches} micro-batches; "
          f"costs F={costs.F:g} B={costs.B:g} W={costs.W:g} F&B={costs.fb:g} "
          "(B = full backward, an input-only backward costs B-W)", file=file)
    print("cells: F/B/W = forward / backward / weight-grad of chunk 0, f/b/w of chunk 1, "
          "'&' = F&B overlapped unit, '.' = idle", file=file)
    for r in range(pp):
        if integral:
            row, t = [], 0.0
            for start, end, unit in tl.units[r]:
                row += ["." * width] * int(start - t)
                label = "&".join(_cell(op) for op in unit) if len(unit) == 2 else _cell(unit[0])
                n = int(end - start)
                text = label.ljust(n * width, "-" if n > 1 else " ")[: n * width] if n else ""
                row.append(text)
                t = end
            row += ["." * width] * int(tl.makespan - t)
            line = "".join(row)
        else:
            line = " ".join(f"{start:g}:{'&'.join(_cell(o) for o in unit)}" for start, _, unit in tl.units[r])
        print(f"rank {r:>2} |{line}|", file=file)
    if show_ops:
        for r, ops in enumerate(schedule):
            print(f"rank {r:>2} ops: " + " ".join(str(o) for o in ops), file=file)
    formula = bubble_formula(kind, pp, costs)
    busy = tl.busy
    print(f"makespan {tl.makespan:g}; busy per rank {[round(b, 6) for b in busy]}", file=file)
    print(f"bubble per rank (makespan - busy) {[round(b, 6) for b in tl.bubble]}; "
          f"max {max(tl.bubble):g}, formula {formula:g}; bubble fraction {tl.bubble_fraction:.2%}",
          file=file)
    return tl


def bubble_table(pps=(4, 8), micro=None, costs: Costs = Costs(), file=None) -> list[dict]:
    """Bubble of every schedule measured on its simulated timeline, for each PP and a few
    micro-batch counts (default: 2*PP, 4*PP and 20). Prints a markdown table; returns the rows."""
    file = sys.stdout if file is None else file
    rows = []
    for pp in pps:
        for m in (micro or sorted({2 * pp, 4 * pp, 20})):
            for kind in KINDS:
                try:
                    layout = Layout(kind, pp, m)
                except ValueError:
                    continue
                tl = simulate(build_schedule(kind, pp, m), layout, costs)
                rows.append(dict(kind=kind, pp=pp, micro_batches=m, stages=layout.n_stages,
                                 makespan=tl.makespan, bubble=max(tl.bubble),
                                 formula=bubble_formula(kind, pp, costs), fraction=tl.bubble_fraction))
    print(f"costs F={costs.F:g} B={costs.B:g} W={costs.W:g} F&B={costs.fb:g}", file=file)
    print("| schedule | PP (ranks) | stages | micro-batches | makespan | bubble (max idle per rank) | "
          "table formula | bubble fraction |", file=file)
    print("|---|---|---|---|---|---|---|---|", file=file)
    for r in rows:
        print(f"| {r['kind']} | {r['pp']} | {r['stages']} | {r['micro_batches']} | {r['makespan']:g} | "
              f"{r['bubble']:g} | {r['formula']:g} | {r['fraction']:.2%} |", file=file)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsv3.parallel.schedules",
                                 description="print a pipeline schedule and its bubble")
    ap.add_argument("--kind", choices=KINDS, default="dualpipe", help="pipeline schedule")
    ap.add_argument("--pp", type=int, default=8, help="pipeline-parallel ranks")
    ap.add_argument("--micro", type=int, default=20, help="micro-batches per step (all directions)")
    ap.add_argument("--cost-f", type=float, default=1.0, help="time of one forward chunk")
    ap.add_argument("--cost-b", type=float, default=2.0, help="time of one full backward chunk")
    ap.add_argument("--cost-w", type=float, default=1.0, help="time of one weight-gradient chunk")
    ap.add_argument("--cost-fb", type=float, default=None,
                    help="time of an overlapped forward+backward unit (default F+B)")
    ap.add_argument("--ops", action="store_true", help="also list every rank's ops, sends and receives")
    ap.add_argument("--table", action="store_true",
                    help="print the bubble of every schedule for PP 4 and 8 instead of one timeline")
    args = ap.parse_args(argv)
    costs = Costs(args.cost_f, args.cost_b, args.cost_w, args.cost_fb)
    if args.table:
        bubble_table(costs=costs)
        return 0
    dump_schedule(args.kind, args.pp, args.micro, costs, show_ops=args.ops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
