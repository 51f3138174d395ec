"""The CPU kernel for FP8 weights against the bf16 few-row kernel and fp8_gemm's torch emulation, same shapes, same
run (dsv3/kernels/fp8_cpu.c; docs/fp8.md).

    .venv/bin/python benchmarks/fp8_cpu_bench.py [--n 2048 --k 7168 --matrices 6 --rows 1 4 16 --rounds 7]

Each round multiplies `--rows` rows by `--matrices` weights of (n, k) (DeepSeek-V3's expert w1/w3 shape by default;
together larger than the caches, so they come from memory): the bf16 copies through dsv3_linear (what a bf16
model's decode runs), the FP8 values and block scales through dsv3_fp8_linear, weight-only and with the activations
quantized in 1 x 128 tiles (fp8_gemm's form). fp8_gemm's torch emulation (decode the whole weight, then per-block
products) runs on one matrix. Figures are medians over rounds, with the ratios of per-round times.
"""
import argparse
import statistics
import time

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--k", type=int, default=7168)
    p.add_argument("--matrices", type=int, default=6)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    from dsv3.fp8.linear import fp8_gemm
    from dsv3.fp8.quant import weight_quant
    from dsv3.kernels import cpu

    if cpu.library() is None:
        raise SystemExit("the CPU kernels are not available on this machine")
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    fp8, bf16 = [], []
    for _ in range(args.matrices):
        w = torch.randn(args.n, args.k, generator=g) * 0.02
        fp8.append(weight_quant(w, 128))
        bf16.append(w.bfloat16())
    del w
    print(f"# {args.matrices} matrices of {args.n} x {args.k}: {args.matrices * args.n * args.k / 1e6:.0f} MB in FP8, "
          f"twice that in bf16; {args.threads} thread(s), {args.rounds} rounds\n")
    print("| rows | bf16 kernel ms | FP8 weight-only ms | vs bf16 | FP8 W8A8 ms | vs bf16 | fp8_gemm torch ms | kernel vs torch |")
    print("|---|---|---|---|---|---|---|---|")
    for m in args.rows:
        x = torch.randn(m, args.k, generator=g).bfloat16()
        t_b, t_w, t_q, t_t = [], [], [], []
        for _ in range(args.rounds):
            t = time.perf_counter()
            for w in bf16:
                cpu.linear(x, w)
            t_b.append((time.perf_counter() - t) / args.matrices)
            t = time.perf_counter()
            for q, s in fp8:
                cpu.fp8_linear(x, q, s, 128)
            t_w.append((time.perf_counter() - t) / args.matrices)
            t = time.perf_counter()
            for q, s in fp8:
                cpu.fp8_linear(x, q, s, 128, quantize=True)
            t_q.append((time.perf_counter() - t) / args.matrices)
            t = time.perf_counter()
            fp8_gemm(x, *fp8[0], 128, backend="emulated")
            t_t.append(time.perf_counter() - t)
        med = statistics.median
        print(f"| {m} | {1e3 * med(t_b):.2f} | {1e3 * med(t_w):.2f} | {med(b / w for b, w in zip(t_b, t_w)):.2f}x | "
              f"{1e3 * med(t_q):.2f} | {med(b / q for b, q in zip(t_b, t_q)):.2f}x | {1e3 * med(t_t):.1f} | "
              f"{med(t / q for t, q in zip(t_t, t_q)):.0f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
