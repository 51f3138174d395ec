"""The many-row bf16 product of prefill: PyTorch's bf16 GEMM, PyTorch's fp32 GEMM (MKL) on the same values widened
beforehand, and dsv3's (dsv3/kernels/gemm_cpu.c: fp32 FMAs on widened values, bf16 out), paired rounds in one
process, on the `small` preset's prefill shapes (M rows x K -> N).

    python benchmarks/gemm_bench.py --threads 1 --rounds 7
    python benchmarks/gemm_bench.py --decode --rounds 7      # the few-row products of decode steps instead

Prints each product's median time and the ratios of the medians of per-round times: PyTorch bf16 / fp32 (how
much slower PyTorch's bf16 GEMM is than its fp32 one on this CPU), dsv3 / PyTorch fp32 (dsv3's against MKL's
fp32 GEMM, which does not have to widen) and PyTorch bf16 / dsv3 (what the model gains in bf16).

--decode: the bf16 few-row product of decode steps (dsv3_linear) on the small preset's projections (one layer's
attention projections and shared MLP, and the dense MLP: 6.5 MB of weights, more than L2), 1, 8 and 16 rows, on
the weights' packed copies (cpu.bf16_packed(True), the default) against the dot-product form on the weights as
they are; the weights are read from memory each time (a 320 MB buffer is written in between).
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


# (N, K) of the small preset's decode projections: wq_a, wq_b, wkv_a, wo, the shared MLP, and the dense MLP
DECODE_SHAPES = [(256, 512), (768, 256), (160, 512), (512, 512), (256, 512), (256, 512), (512, 256), (1408, 512),
                 (1408, 512), (512, 1408)]


def decode_ab(args, g):
    ws = [torch.randn(n, k, generator=g).bfloat16() for n, k in DECODE_SHAPES]
    mb = sum(w.numel() for w in ws) * 2 / 1e6
    flush = torch.empty(320 << 20, dtype=torch.uint8)
    before = cpu.bf16_packed()
    print(f"# bf16 few-row products of decode (dsv3_linear): {len(ws)} projections, {mb:.1f} MB, {args.threads} "
          f"threads, {args.rounds} paired rounds, median ms per pass over all of them\n")
    print("| rows | dot products (ms) | packed (ms) | dot / packed (median of rounds) | same values |")
    print("|---|---:|---:|---:|---|")
    try:
        for M in (1, 8, 16):
            xs = [torch.randn(M, k, generator=g).bfloat16() for _, k in DECODE_SHAPES]
            t, out = {False: [], True: []}, {}
            for on in (False, True):  # warm-up: the packed copies are made here
                cpu.bf16_packed(on)
                [cpu.linear(x, w) for x, w in zip(xs, ws)]
            for _ in range(args.rounds):
                for on in (False, True):
                    cpu.bf16_packed(on)
                    flush.fill_(1)
                    t0 = time.perf_counter()
                    out[on] = [cpu.linear(x, w) for x, w in zip(xs, ws)]
                    t[on].append(time.perf_counter() - t0)
            ratio = statistics.median(a / b for a, b in zip(t[False], t[True]))
            same = all(torch.equal(a, b) for a, b in zip(out[False], out[True]))
            print(f"| {M} | {statistics.median(t[False]) * 1e3:.3f} | {statistics.median(t[True]) * 1e3:.3f} | "
                  f"{ratio:.2f}x | {'yes' if same else 'no (different summation orders)'} |")
    finally:
        cpu.bf16_packed(before)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--shapes", default=None, help="M,K,N;M,K,N;... (default: the small preset's prefill shapes)")
    p.add_argument("--decode", action="store_true", help="the few-row products of decode steps (see above)")
    args = p.parse_args(argv)
    if cpu.library() is None:
        raise SystemExit(f"the CPU kernels are unavailable here: {cpu.unavailable_reason()}")
    torch.set_num_threads(args.threads)
    if args.decode:
        return decode_ab(args, torch.Generator().manual_seed(0))
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
