"""Expert-parallel dispatch/combine on CPU/gloo: bytes per token per MoE layer with FP8 vs BF16
dispatch (counted from the buffers actually handed to all_to_all_single) and the measured
dispatch+combine wall time for 2 and 4 ranks (median over iterations of the slowest rank).

The MoE layer has DeepSeek-V3's routing shape (hidden 7168, 256 experts in 8 groups, top-8 from at
most 4 groups, sigmoid gate) with random weights (so routing is roughly uniform, not a trained
model's skew); the experts' intermediate size is cut to 16, which changes the compute, not the
communication. Activations are bf16 (the paper's dispatch/combine precision baseline).

    .venv/bin/python benchmarks/ep_bench.py [--tokens 256] [--iters 10] [--ranks 2 4]
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from dsv3.config import preset
from dsv3.model.moe import MoE
from dsv3.parallel.dist import run_local
from dsv3.parallel.expert import ExpertParallelMoE, _all_to_all_rows


def _layer(cfg, moe, fp8, rank):
    ep = ExpertParallelMoE(moe, dist.group.WORLD, fp8_dispatch=fp8)
    ep.to_empty(device="cpu")
    g = torch.Generator().manual_seed(1234 + rank)
    with torch.no_grad():
        ep.gate.weight.copy_(torch.randn(ep.gate.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.02)
        ep.gate.bias.zero_()
        for p in ep.experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    ep.to(torch.bfloat16)
    ep.gate.bias.data = ep.gate.bias.data.float()
    return ep


def _timed_max(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    t = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    return t.item()


def bench_worker(rank, world, tokens, iters, warmup):
    cfg = preset("v3").replace(moe_intermediate_size=16, n_shared_experts=0)
    with torch.device("meta"):
        moe = MoE(cfg)
    layers = {"bf16": _layer(cfg, moe, False, rank), "fp8": _layer(cfg, moe, True, rank)}
    x = torch.randn(tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(99 + rank)).to(torch.bfloat16)
    # 1) the layer as used: bf16 and fp8 iterations interleaved (the load of a shared box drifts)
    times = {m: [] for m in layers}
    with torch.no_grad():
        for it in range(warmup + iters):
            for mode, ep in layers.items():
                ep.stats.reset()
                dist.barrier()
                ep(x)
                st = ep.stats
                t = torch.tensor([st.dispatch_s, st.combine_s, st.dispatch_s + st.combine_s, st.quant_s,
                                  st.dispatch_s + st.combine_s - st.quant_s])
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                if it >= warmup:
                    times[mode].append(t.tolist())
    # 2) the collectives alone, ranks aligned by a barrier, interleaved: each format's dispatch buffer
    # (same splits and row sizes as the layer's last dispatch) and the bf16 combine
    send, recv, _ = layers["bf16"].stats.last_splits
    rows = {m: ep.stats.last_splits[2] for m, ep in layers.items()}
    bufs = {"bf16": torch.zeros(sum(send), rows["bf16"], dtype=torch.uint8),
            "fp8": torch.zeros(sum(send), rows["fp8"], dtype=torch.uint8)}
    comb = torch.zeros(sum(recv), cfg.hidden_size * 2, dtype=torch.uint8)
    wire = {"bf16": [], "fp8": [], "combine": []}
    for it in range(warmup + iters):
        for key in wire:
            if key == "combine":
                t = _timed_max(lambda: _all_to_all_rows(comb, send, recv, dist.group.WORLD))
            else:
                t = _timed_max(lambda: _all_to_all_rows(bufs[key], recv, send, dist.group.WORLD))
            if it >= warmup:
                wire[key].append(t)
    results = {}
    for mode, ep in layers.items():
        st = ep.stats  # the last iteration
        tot = torch.tensor([st.tokens, st.dispatch_rows, st.dispatch_rows_remote, st.dispatch_bytes,
                            st.dispatch_bytes_remote, st.payload_bytes_remote, st.combine_bytes,
                            st.combine_bytes_remote], dtype=torch.float64)
        dist.all_reduce(tot)
        T = tot[0].item()
        tm = times[mode]
        results[mode] = {
            "copies_per_token": tot[1].item() / T,
            "remote_copies_per_token": tot[2].item() / T,
            "dispatch_bytes_per_token": tot[3].item() / T,
            "dispatch_remote_bytes_per_token": tot[4].item() / T,
            "payload_remote_bytes_per_token": tot[5].item() / T,
            "combine_bytes_per_token": tot[6].item() / T,
            "combine_remote_bytes_per_token": tot[7].item() / T,
            "row_bytes": st.dispatch_bytes / max(st.dispatch_rows, 1),
            "dispatch_ms": 1e3 * statistics.median(t[0] for t in tm),
            "combine_ms": 1e3 * statistics.median(t[1] for t in tm),
            "total_ms": 1e3 * statistics.median(t[2] for t in tm),
            "quant_ms": 1e3 * statistics.median(t[3] for t in tm),
            "comm_ms": 1e3 * statistics.median(t[4] for t in tm),
            "wire_dispatch_ms": 1e3 * statistics.median(wire[mode]),
            "wire_combine_ms": 1e3 * statistics.median(wire["combine"]),
        }
        results[mode]["wire_ms"] = results[mode]["wire_dispatch_ms"] + results[mode]["wire_combine_ms"]
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=256, help="tokens per rank per MoE forward")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--json", help="write the numbers here too")
    args = ap.parse_args(argv)
    print(f"# torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"hidden 7168, 256 experts / 8 groups, top-8 from <= 4 groups, {args.tokens} bf16 tokens per rank")
    out = {}
    for world in args.ranks:
        t0 = time.perf_counter()
        res = run_local(bench_worker, world, args.tokens, args.iters, args.warmup)[0]
        out[world] = res
        b, f = res["bf16"], res["fp8"]
        print(f"\nEP={world} ({time.perf_counter() - t0:.0f} s)")
        print(f"  copies per token (distinct destination ranks): {b['copies_per_token']:.2f} "
              f"({b['remote_copies_per_token']:.2f} to other ranks)")
        print(f"  {'':34s}{'BF16':>12s}{'FP8':>12s}{'FP8/BF16':>10s}")
        for key, label in (("row_bytes", "dispatch bytes per copy"),
                           ("payload_remote_bytes_per_token", "activation bytes/token (remote)"),
                           ("dispatch_remote_bytes_per_token", "dispatch bytes/token (remote)"),
                           ("combine_remote_bytes_per_token", "combine bytes/token (remote)")):
            print(f"  {label:34s}{b[key]:12.0f}{f[key]:12.0f}{f[key] / b[key]:10.3f}")
        both_b = b["dispatch_remote_bytes_per_token"] + b["combine_remote_bytes_per_token"]
        both_f = f["dispatch_remote_bytes_per_token"] + f["combine_remote_bytes_per_token"]
        print(f"  {'dispatch+combine bytes/token':34s}{both_b:12.0f}{both_f:12.0f}{both_f / both_b:10.3f}")
        for key, label in (("dispatch_ms", "dispatch ms (median)"), ("combine_ms", "combine ms (median)"),
                           ("total_ms", "dispatch+combine ms (median)"),
                           ("comm_ms", "  of which not FP8 (de)quant ms"),
                           ("wire_dispatch_ms", "dispatch all_to_all alone ms"),
                           ("wire_combine_ms", "combine all_to_all alone ms"),
                           ("wire_ms", "sum of the two alone ms")):
            print(f"  {label:34s}{b[key]:12.2f}{f[key]:12.2f}{f[key] / b[key]:10.3f}")
        print(f"  {'FP8 quantize+dequantize ms':34s}{'':12s}{f['quant_ms']:12.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
