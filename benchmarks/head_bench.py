"""The greedy head screen's int8 product (dsv3_head_i8, dsv3/kernels/screen_cpu.c) on the `small` preset's head
(129,280 x 512: a 66 MB int8 copy), at several row counts against one row in the same rounds.

    python benchmarks/head_bench.py --rounds 7
    python benchmarks/head_bench.py --rows 1,16 --vocab 20000      # a smaller head

For 1, 8, 16 and 32 rows of quantized hidden states: the product's median time with its copy read from memory
(a 320 MB buffer is written before each call), its ratio to the one-row product of the same round (median of
per-round ratios), and the product's time with the copy in cache (a 2,400-row slice, scaled to the whole head:
its arithmetic alone). One row is bound by the read of the copy (PyTorch's own reductions read memory slower
than that here, so the one-row product is the read reference); at 16 rows the arithmetic is of the size of the
read, and the ratio to one row shows how much of the two the product overlaps (1.0: all of it).
"""
import argparse
import statistics
import time

import torch

from dsv3.kernels import cpu


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--rows", default="1,8,16,32", help="comma-separated row counts")
    p.add_argument("--vocab", type=int, default=129280, help="head rows (the small preset's vocabulary)")
    p.add_argument("--dim", type=int, default=512, help="hidden size")
    p.add_argument("--flush-mb", type=int, default=320, help="MB written between calls to evict the copy")
    args = p.parse_args(argv)
    if not cpu.vnni():
        print("no AVX512-VNNI int8 kernel here (dsv3.kernels.cpu.vnni() is False): nothing to measure")
        return 0
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    V, D, zp, xs = args.vocab, args.dim, 128, 0.01
    q = torch.randint(-127, 128, (V, D), dtype=torch.int8, generator=g)
    packed, qsum, ws = cpu.i8_pack(q), q.sum(1, dtype=torch.int32), torch.rand(V, generator=g) * 0.01
    del q
    hot_v = min(V, 2400)
    hot = cpu.i8_pack(torch.randint(-127, 128, (hot_v, D), dtype=torch.int8, generator=g))
    flush = torch.empty(args.flush_mb << 20, dtype=torch.uint8)
    # (written out rather than cpu.i8_dim so that it also runs on the kernel before the head's repacking, commit
    # 4543899, whose rows were padded to 4: docs/engine.md compares the two with this script)
    Dp = -(-D // getattr(cpu, "I8_K", 4)) * getattr(cpu, "I8_K", 4)
    print(f"# dsv3_head_i8: {V} x {D} int8 copy ({packed.numel() / 1e6:.1f} MB), 1 thread, {args.rounds} rounds\n")
    print("| rows | product (ms) | vs one row | arithmetic alone, copy in cache (ms) |")
    print("|---:|---:|---:|---:|")
    rows = [int(r) for r in args.rows.split(",")]
    us = {R: torch.randint(0, 256, (R, Dp), dtype=torch.uint8, generator=g) for R in sorted(set(rows) | {1})}
    for u in us.values():  # warm-up
        cpu.head_i8(u, packed, qsum, ws, xs, zp, V, chunk_max=True)
    t = {R: [] for R in us}
    th = {R: [] for R in us}
    for _ in range(args.rounds):
        for R, u in us.items():
            flush.fill_(1)
            t0 = time.perf_counter()
            cpu.head_i8(u, packed, qsum, ws, xs, zp, V, chunk_max=True)
            t[R].append(time.perf_counter() - t0)
            n = 20
            t0 = time.perf_counter()
            for _ in range(n):
                cpu.head_i8(u, hot, qsum[:hot_v], ws[:hot_v], xs, zp, hot_v, chunk_max=True)
            th[R].append((time.perf_counter() - t0) / n * V / hot_v)
    for R in rows:
        ratio = statistics.median(a / b for a, b in zip(t[R], t[1]))
        print(f"| {R} | {1e3 * statistics.median(t[R]):.2f} | {ratio:.2f}x | {1e3 * statistics.median(th[R]):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
