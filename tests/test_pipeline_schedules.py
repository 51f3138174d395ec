"""Pipeline schedules as data (no process group): 1F1B, DualPipe, DualPipeV.

References nobody here wrote: the table of github.com/deepseek-ai/DualPipe (README, "Pipeline
Bubbles and Memory Usage Comparison"):
    1F1B       bubble (PP-1)(F+B)            activation PP
    DualPipe   bubble (PP/2-1)(F&B+B-3W)     activation PP+1
    DualPipeV  bubble (PP/2-1)(F&B+B-3W)     activation PP+1   (PP = stages = 2 x devices)
and the argument constraints asserted by its step(): DualPipe needs an even number of ranks and
an even number of micro-batches >= 2 x ranks, DualPipeV micro-batches >= 2 x ranks.
"""
import dataclasses
import io
import random

import pytest

from dsv3.parallel.schedules import (
    KINDS, Costs, Layout, Op, build_schedule, bubble_formula, dump_schedule, main, simulate, validate,
)

CASES = list(dict.fromkeys(
    [("1f1b", pp, m) for pp in (1, 2, 3, 4, 8) for m in (1, 3, pp, 2 * pp + 1, 20)]
    + [("dualpipe", pp, m) for pp in (2, 4, 6, 8) for m in (2 * pp, 2 * pp + 2, 20, 32) if m >= 2 * pp]
    + [("dualpipev", pp, m) for pp in (1, 2, 3, 4, 8) for m in (2 * pp, 2 * pp + 1, 20)]
))


@pytest.mark.parametrize("kind,pp,m", CASES)
def test_schedule_is_valid(kind, pp, m):
    layout = Layout(kind, pp, m)
    sched = build_schedule(kind, pp, m)
    validate(sched, layout)
    # Independent re-check of the core rules, in the schedule's own order on each rank.
    for r, ops in enumerate(sched):
        pos = {(op.kind, op.chunk, op.mb): i for i, op in enumerate(ops)}
        for (kind_, c, mb), i in pos.items():
            if kind_ in ("B", "BW"):
                assert pos[("F", c, mb)] < i
            if kind_ == "W":
                assert pos[("B", c, mb)] < i
            if kind_ == "B":
                assert ("W", c, mb) in pos
        # Micro-batches enter each chunk in order (FIFO per chunk, as DualPipe's chunk counters do).
        for c in range(layout.n_chunks):
            fs = [op.mb for op in ops if op.kind == "F" and op.chunk == c]
            assert fs == list(layout.micro_batches_of(c))
    # Every micro-batch passes every stage once, forward and backward.
    n_f = sum(op.kind == "F" for ops in sched for op in ops)
    n_b = sum(op.kind in ("B", "BW") for ops in sched for op in ops)
    assert n_f == n_b == layout.n_stages * m


@pytest.mark.parametrize("kind,pp,m", [("1f1b", 4, 9), ("dualpipe", 4, 10), ("dualpipev", 4, 10)])
def test_stage_order_on_the_timeline(kind, pp, m):
    # For each micro-batch: stage s+1 starts its forward after stage s finished it, backward runs
    # from the last stage down, and a W comes after its B.
    layout = Layout(kind, pp, m)
    tl = simulate(build_schedule(kind, pp, m), layout, Costs(1.0, 2.0, 1.0, 2.5), latency=0.25)
    for mb in range(m):
        f_end, b_end = -1.0, None
        for s in range(layout.n_stages):
            r, c = layout.where(s, mb)
            assert tl.start_of(r, "F", c, mb) >= f_end
            f_end = tl.end_of(r, "F", c, mb)
        for s in reversed(range(layout.n_stages)):
            r, c = layout.where(s, mb)
            kind_ = next(k for k in ("B", "BW") if _has(tl, r, k, c, mb))
            start = tl.start_of(r, kind_, c, mb)
            assert start >= tl.end_of(r, "F", c, mb)
            if b_end is not None:
                assert start >= b_end
            b_end = tl.end_of(r, kind_, c, mb)
            if kind_ == "B":
                assert tl.start_of(r, "W", c, mb) >= b_end


def _has(tl, r, kind, c, mb):
    try:
        tl.start_of(r, kind, c, mb)
        return True
    except KeyError:
        return False


@pytest.mark.parametrize("pp", [2, 3, 4, 8])
@pytest.mark.parametrize("costs", [Costs(), Costs(1.0, 1.0, 0.5), Costs(1.3, 2.9, 0.7, 3.1), Costs(2.0, 3.0, 1.0)])
def test_1f1b_bubble_is_the_table(pp, costs):
    for m in (pp, 2 * pp, 20):
        tl = simulate(build_schedule("1f1b", pp, m), Layout("1f1b", pp, m), costs)
        assert tl.bubble == pytest.approx([(pp - 1) * (costs.F + costs.B)] * pp, abs=1e-9)
        assert bubble_formula("1f1b", pp, costs) == pytest.approx((pp - 1) * (costs.F + costs.B))


@pytest.mark.parametrize("kind,pps", [("dualpipe", (2, 4, 6, 8, 10)), ("dualpipev", (1, 2, 3, 4, 8))])
def test_dualpipe_bubble_is_the_table_at_unit_costs(kind, pps):
    # DualPipe's figure uses one time unit per F, per input-backward and per W (B = 2, F&B = F+B):
    # every rank then idles exactly (PP/2-1)(F&B+B-3W) = 2 (PP/2-1) units for DualPipe and
    # 2 (ranks-1) units for DualPipeV, whatever the number of micro-batches.
    for pp in pps:
        for m in (2 * pp, 2 * pp + 2, 20, 40):
            if m < 2 * pp:
                continue
            tl = simulate(build_schedule(kind, pp, m), Layout(kind, pp, m))
            expect = (pp / 2 - 1) * (3 + 2 - 3) if kind == "dualpipe" else (pp - 1) * (3 + 2 - 3)
            assert bubble_formula(kind, pp) == expect
            assert tl.bubble == pytest.approx([expect] * pp, abs=1e-9)
            # each rank runs one F, one input-backward and one W per (chunk, micro-batch) it holds
            chunks_per_mb = 1 if kind == "dualpipe" else 2
            assert tl.busy == pytest.approx([3.0 * m * chunks_per_mb] * pp)


def test_dualpipe_readme_example():
    # The README's figure: DualPipe, 8 PP ranks, 20 micro-batches in two directions.
    tl = simulate(build_schedule("dualpipe", 8, 20), Layout("dualpipe", 8, 20))
    assert tl.makespan == 60 + 6  # 20 x (F + B-W + W) of work + the (8/2-1)(3+2-3) bubble


@pytest.mark.parametrize("kind,pps", [("dualpipe", (2, 4, 6, 8)), ("dualpipev", (1, 2, 3, 5, 8))])
def test_dualpipe_bubble_formula_with_overlap(kind, pps):
    # With a real F&B overlap (F&B < F+B) ranks differ in how many overlapped pairs they run; the
    # table's bubble is the largest idle time. It holds exactly whenever the input-gradient part
    # costs as much as a forward (B - W = F) and W <= F, the zero-bubble paper's setting; we check
    # random costs of that kind.
    rng = random.Random(0)
    for pp in pps:
        for m in (2 * pp, 2 * pp + 2, 4 * pp):
            layout, sched = Layout(kind, pp, m), build_schedule(kind, pp, m)
            for _ in range(10):
                f = rng.uniform(0.5, 2.0)
                w = rng.uniform(0.1, f)
                costs = Costs(f, f + w, w, rng.uniform(f + w, 2 * f + w))
                tl = simulate(sched, layout, costs)
                assert max(tl.bubble) == pytest.approx(bubble_formula(kind, pp, costs), abs=1e-9)


def test_dualpipe_beats_1f1b():
    for pp in (4, 8):
        m = 2 * pp
        one = simulate(build_schedule("1f1b", pp, m), Layout("1f1b", pp, m))
        dual = simulate(build_schedule("dualpipe", pp, m), Layout("dualpipe", pp, m))
        assert dual.bubble_fraction < one.bubble_fraction


@pytest.mark.parametrize("kind,pp,m,expect", [
    ("1f1b", 4, 16, [4, 3, 2, 1]), ("1f1b", 8, 32, [8, 7, 6, 5, 4, 3, 2, 1]),
    ("dualpipe", 4, 16, [5] * 4), ("dualpipe", 8, 20, [9] * 8),
    ("dualpipev", 4, 16, [9] * 4), ("dualpipev", 8, 32, [17] * 8),
])
def test_activation_memory_is_the_table(kind, pp, m, expect):
    # Peak number of chunk activations a rank holds (forward done, weight gradient not yet):
    # the table's PP for 1F1B (on the first rank), PP+1 for DualPipe, and PP+1 for DualPipeV with
    # PP counted in stages (2 x ranks).
    peaks = []
    for ops in build_schedule(kind, pp, m):
        held = peak = 0
        for op in ops:
            held += (op.kind == "F") - (op.kind in ("BW", "W"))
            peak = max(peak, held)
        peaks.append(peak)
    assert peaks == expect


def test_sends_match_receives_in_order():
    sched = build_schedule("dualpipe", 4, 12)
    for src, ops in enumerate(sched):
        for dst in range(4):
            sends = [(op.kind[-1], op.mb) for op in ops if op.kind.startswith("SEND") and op.peer == dst]
            recvs = [(op.kind[-1], op.mb) for op in sched[dst] if op.kind.startswith("RECV") and op.peer == src]
            assert sends == recvs
    # DualPipeV's bend (last rank, chunk 0 -> chunk 1) never leaves the rank.
    last = build_schedule("dualpipev", 3, 6)[2]
    assert all(op.peer != 2 for op in last)
    assert {op.peer for op in last if op.kind in ("SEND_F", "SEND_B", "RECV_F", "RECV_B")} == {1}


def _broken(sched, rank, fn):
    out = [list(ops) for ops in sched]
    out[rank] = fn(out[rank])
    return out


def test_validate_rejects_broken_schedules():
    layout = Layout("dualpipe", 4, 8)
    good = build_schedule("dualpipe", 4, 8)
    validate(good, layout)

    def swap_first(kind_a, kind_b):
        def fn(ops):
            i = next(i for i, o in enumerate(ops) if o.kind == kind_a)
            j = next(j for j, o in enumerate(ops) if o.kind == kind_b and o.chunk == ops[i].chunk and o.mb == ops[i].mb)
            ops[i], ops[j] = ops[j], ops[i]
            return ops
        return fn

    def drop(kind):
        def fn(ops):
            i = next(i for i, o in enumerate(ops) if o.kind == kind)
            return ops[:i] + ops[i + 1:]
        return fn

    def reorder_sends(ops):
        idx = [i for i, o in enumerate(ops) if o.kind == "SEND_F"]
        a, b = idx[0], idx[1]
        ops[a], ops[b] = ops[b], ops[a]
        return ops

    def wrong_peer(ops):
        i = next(i for i, o in enumerate(ops) if o.kind == "RECV_B")
        ops[i] = dataclasses.replace(ops[i], peer=(ops[i].peer + 2) % 4)
        return ops

    broken = [
        _broken(good, 1, swap_first("F", "BW")),    # backward before its forward
        _broken(good, 0, swap_first("B", "W")),     # W before its B
        _broken(good, 2, drop("W")),                # a split backward without its W
        _broken(good, 1, drop("RECV_F")),           # a forward without its input
        _broken(good, 1, drop("SEND_B")),           # a gradient never sent
        _broken(good, 1, reorder_sends),            # FIFO order between a pair of ranks broken
        _broken(good, 2, wrong_peer),               # receive from the wrong rank
    ]
    for sched in broken:
        with pytest.raises(AssertionError):
            validate(sched, layout)


def test_simulate_detects_deadlock():
    layout = Layout("1f1b", 2, 1)
    # rank 0 waits for the gradient before running the forward it depends on
    sched = [[Op("RECV_B", 0, 0, peer=1), Op("BW", 0, 0), Op("F", 0, 0), Op("SEND_F", 0, 0, peer=1)],
             [Op("RECV_F", 0, 0, peer=0), Op("F", 0, 0), Op("BW", 0, 0), Op("SEND_B", 0, 0, peer=0)]]
    with pytest.raises(RuntimeError, match="deadlock"):
        simulate(sched, layout)


@pytest.mark.parametrize("kind,pp,m,msg", [
    ("gpipe", 4, 8, "unknown pipeline schedule"),
    ("dualpipe", 3, 8, "even number of pipeline ranks"),
    ("dualpipe", 4, 6, "micro-batches >= 2\\*pp"),
    ("dualpipe", 4, 9, "even number of micro-batches"),
    ("dualpipev", 4, 7, "micro-batches >= 2\\*pp"),
    ("1f1b", 0, 4, "positive integer"),
    ("1f1b", 2, 0, "positive integer"),
])
def test_bad_arguments(kind, pp, m, msg):
    with pytest.raises(ValueError, match=msg):
        build_schedule(kind, pp, m)


def test_dump_and_cli(capsys):
    buf = io.StringIO()
    tl = dump_schedule("dualpipe", 8, 20, file=buf)
    text = buf.getvalue()
    assert len([line for line in text.splitlines() if line.startswith("rank ")]) == 8
    assert "formula 6" in text and "max 6" in text and "9.09%" in text
    assert tl.makespan == 66
    assert main(["--kind", "dualpipev", "--pp", "4", "--micro", "10"]) == 0
    out = capsys.readouterr().out
    assert "dualpipev: pp=4 ranks, 8 stages" in out and "formula 6" in out
    for kind in KINDS:
        dump_schedule(kind, 4, 8, file=io.StringIO(), costs=Costs(1.0, 2.0, 1.0, 2.5))  # non-integral F&B path
