"""The many-row bf16 product of prefill: PyTorch's bf16 GEMM, PyTorch's fp32 GEMM (MKL) on the same values widened
beforehand, and dsv3's (dsv3/kernels/gemm_cpu.c: fp32 FMAs on widened values, bf16 out), paired rounds in one
process, on the `small` preset's prefill shapes (M rows x K -> N).

    python benchmarks/gemm_bench.py --threads 1 --rounds 7

Prints each product's median time and the ratios of the medians of per-round times: PyTorch bf16 / fp32 (how
much slower PyTorch's bf16 GEMM is than its fp32 one on this CPU), dsv3 / PyTorch fp32 (dsv3's against MKL's
fp32 GEMM, which does not have to widen) and PyTorch bf16 / dsv3 (what the model gains in bf16).
"""
import argparse
import statistics
import time

import torch

from dsv3.kernels import cpu

# (M, K, N) of a 512-token prefill of the small preset: the q/kv projections, wkv_b, wo, the dense MLP's
# products, and an expert's products over its ~64 tokens
SHAPES = [(512, 512, 256), (512, 256, 768), (512, 128, 1024), (512, 512, 512), (512, 512, 1408), (512, 1408, 512),
          (64, 512, 256), (64, 256, 512)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--shapes", default=None, help="M,K,N;M,K,N;... (default: the small preset's prefill shapes)")
    args = p.parse_args(argv)
    if cpu.library() is None:
        raise SystemExit(f"the CPU kernels are unavailable here: {cpu.unavailable_reason()}")
    torch.set_num_threads(args.threads)
    shapes = SHAPES if args.shapes is None else [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    g = torch.Generator().manual_seed(0)
    print(f"# bf16 GEMM of prefill: {args.threads} threads, {args.rounds} paired rounds, median ms\n")
    print("| M x K -> N | PyTorch bf16 | PyTorch fp32 | dsv3 bf16 | PyTorch bf16 / fp32 | dsv3 / PyTorch fp32 | "
          "PyTorch bf16 / dsv3 | dsv3 == PyTorch bf16 |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for M, K, N in shapes:
        x = torch.randn(M, K, generator=g).bfloat16()
        w = torch.randn(N, K, generator=g).bfloat16()
        xf, wf = x.float(), w.float()
        runs = {"bf16": lambda: x @ w.t(), "fp32": lambda: xf @ wf.t(), "dsv3": lambda: cpu.gemm(x, w)}
        t = {k: [] for k in runs}
        for f in runs.values():
            f()  # warm-up
        for _ in range(args.rounds):
            for k, f in runs.items():
                t0 = time.perf_counter()
                f()
                t[k].append(time.perf_counter() - t0)

        def ratio(a, b):
            return statistics.median(x / y for x, y in zip(t[a], t[b]))
        med = {k: statistics.median(v) * 1e3 for k, v in t.items()}
        same = torch.equal(cpu.gemm(x, w), x @ w.t())
        print(f"| {M} x {K} -> {N} | {med['bf16']:.3f} | {med['fp32']:.3f} | {med['dsv3']:.3f} | "
              f"{ratio('bf16', 'fp32'):.2f} | {ratio('dsv3', 'fp32'):.2f} | {ratio('bf16', 'dsv3'):.2f} | "
              f"{'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()
