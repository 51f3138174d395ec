"""FP8 tools benchmark (CPU): checkpoint conversion throughput and peak memory, FP8 GEMM speed.

    .venv/bin/python benchmarks/fp8_bench.py              # ~1 GB FP8 checkpoint in 4 shards
    .venv/bin/python benchmarks/fp8_bench.py --size-gb 0.2 --repeats 1 --skip-gemm

Conversion: a synthetic checkpoint in the released FP8 layout (DeepSeek-V3-shaped E4M3 weights
+ fp32 weight_scale_inv, one scale stored in another shard) is built in a temp dir, then each
conversion runs in a fresh subprocess that reports wall time and peak RSS (VmHWM). References
measured in the same run: a plain file copy of the input (I/O ceiling) and the load-whole-shard
approach (safetensors load_file + dequant + save_file per shard, as DeepSeek's fp8_cast_bf16.py
does). GEMM: dsv3.fp8.linear.fp8_gemm (both backends) and the dequantize+matmul twin against
fp32 and bf16 torch matmul on the same shapes. All figures are medians over --repeats runs.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# DeepSeek-V3 linear shapes (out, in) under their checkpoint names: MLA q_b/kv_b/o, routed
# expert and dense MLP projections
SHAPES = [("self_attn.q_b_proj", (24576, 1536)), ("self_attn.kv_b_proj", (32768, 512)),
          ("self_attn.o_proj", (7168, 16384)), ("mlp.experts.0.gate_proj", (2048, 7168)),
          ("mlp.experts.0.down_proj", (7168, 2048)), ("mlp.gate_proj", (18432, 7168))]

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
mode, inp, out = sys.argv[1:4]
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
import torch
base = hwm()
t = time.perf_counter()
if mode in ("fp8-to-bf16", "bf16-to-fp8"):
    from dsv3.fp8.convert import convert
    convert(inp, out, mode, progress=False)
elif mode == "naive":
    # the load-whole-shard approach: one shard (and its output) fully in memory
    from safetensors.torch import load_file, save_file
    from dsv3.fp8.quant import weight_dequant
    inp, out = Path(inp), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wm = json.loads((inp / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in sorted(set(wm.values())):
        sd = load_file(inp / shard)
        res = {}
        for k, v in sd.items():
            if k.endswith("_scale_inv"):
                continue
            if v.dtype == torch.float8_e4m3fn:
                s = sd.get(k + "_scale_inv")
                if s is None:
                    s = load_file(inp / wm[k + "_scale_inv"])[k + "_scale_inv"]
                res[k] = weight_dequant(v, s, dtype=torch.bfloat16)
            else:
                res[k] = v
        save_file(res, out / shard, metadata={"format": "pt"})
        del sd, res
elif mode == "import":
    import dsv3.fp8.convert  # noqa: F401  baseline: interpreter + torch + safetensors
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss": hwm(), "base_rss": base}))
"""


def dir_bytes(d: Path, pattern="*.safetensors") -> int:
    return sum(p.stat().st_size for p in d.glob(pattern))


def build_checkpoint(d: Path, size_gb: float, n_shards: int, seed: int = 0) -> int:
    """Released-format FP8 checkpoint of about size_gb (fp8 bytes) in n_shards shards."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    d.mkdir(parents=True)
    target = int(size_gb * 1e9)
    per_shard = target // n_shards
    weight_map, layer = {}, 0
    carried = None  # one scale is stored in the next shard, as can happen in released indexes
    for i in range(n_shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        sd, used = {}, 0
        if carried is not None:
            sd[carried[0]] = carried[1]
            carried = None
        while used < per_shard:
            proj, (out_f, in_f) = SHAPES[layer % len(SHAPES)]
            key = f"model.layers.{layer}.{proj}.weight"
            # random bytes are random E4M3 values; 0x7F/0xFF are NaN in e4m3fn, so zero them
            raw = torch.randint(0, 256, (out_f, in_f), dtype=torch.uint8, generator=g)
            raw[(raw & 0x7F) == 0x7F] = 0
            sd[key] = raw.view(torch.float8_e4m3fn)
            scale = torch.rand(-(-out_f // 128), -(-in_f // 128), generator=g) * 1e-3
            if i < n_shards - 1 and used + out_f * in_f >= per_shard and carried is None:
                carried = (key + "_scale_inv", scale)
            else:
                sd[key + "_scale_inv"] = scale
            sd[f"model.layers.{layer}.post_attention_layernorm.weight"] = torch.ones(7168, dtype=torch.bfloat16)
            used += out_f * in_f
            layer += 1
        save_file(sd, d / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in sd})
        del sd
    assert carried is None
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    (d / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "quantization_config": qc}))
    return dir_bytes(d)


def run_child(mode, inp, out):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, mode, str(inp), str(out)], capture_output=True, text=True,
                       env=env)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{r.stderr}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["wall"] = wall
    return res


def bench_convert(args):
    tmp = Path(tempfile.mkdtemp(prefix="fp8bench-", dir=args.tmpdir))
    try:
        t = time.perf_counter()
        in_bytes = build_checkpoint(tmp / "fp8", args.size_gb, args.shards)
        print(f"built {in_bytes / 1e9:.2f} GB FP8 checkpoint in {args.shards} shards "
              f"({time.perf_counter() - t:.0f} s) under {tmp}")
        largest = max(p.stat().st_size for p in (tmp / "fp8").glob("*.safetensors"))
        rows = []

        def measure(label, fn, out_dir):
            secs, rss, base = [], [], []
            for _ in range(args.repeats):
                shutil.rmtree(out_dir, ignore_errors=True)
                res = fn()
                secs.append(res["seconds"])
                rss.append(res["peak_rss"])
                base.append(res.get("base_rss", 0))
            out_bytes = dir_bytes(out_dir)
            rows.append((label, statistics.median(secs), out_bytes, max(rss), statistics.median(base)))

        def copy():
            out = tmp / "copy"
            out.mkdir()
            t = time.perf_counter()
            for p in (tmp / "fp8").glob("*.safetensors"):
                shutil.copyfile(p, out / p.name)
            return {"seconds": time.perf_counter() - t, "peak_rss": 0}

        measure("file copy of the input (I/O reference)", copy, tmp / "copy")
        measure("naive: load_file shard + dequant + save_file",
                lambda: run_child("naive", tmp / "fp8", tmp / "naive"), tmp / "naive")
        measure("dsv3 convert fp8-to-bf16", lambda: run_child("fp8-to-bf16", tmp / "fp8", tmp / "bf16"), tmp / "bf16")
        measure("dsv3 convert bf16-to-fp8", lambda: run_child("bf16-to-fp8", tmp / "bf16", tmp / "fp8b"), tmp / "fp8b")
        base = run_child("import", "-", "-")["peak_rss"]

        print(f"\nconversion (median of {args.repeats}; largest input shard {largest / 1e6:.0f} MB; "
              f"subprocess baseline RSS after imports {base / 1e6:.0f} MB)")
        print(f"{'method':48s} {'seconds':>8s} {'out GB':>7s} {'GB/s out':>9s} "
              f"{'peak RSS MB':>12s} {'RSS-base MB':>12s}")
        for label, s, ob, rss, _ in rows:
            rss_s = f"{rss / 1e6:12.0f}" if rss else f"{'-':>12s}"
            extra = f"{(rss - base) / 1e6:12.0f}" if rss else f"{'-':>12s}"
            print(f"{label:48s} {s:8.2f} {ob / 1e9:7.2f} {ob / 1e9 / s:9.3f} {rss_s} {extra}")
        naive, ours = rows[1], rows[2]
        print(f"fp8-to-bf16 vs naive: {naive[1] / ours[1]:.2f}x speed, peak RSS above baseline "
              f"{(ours[3] - base) / 1e6:.0f} MB vs {(naive[3] - base) / 1e6:.0f} MB")
        if args.compare_bytes:
            from safetensors.torch import load_file
            same = True
            for p in sorted((tmp / "naive").glob("*.safetensors")):
                a, b = load_file(p), load_file(tmp / "bf16" / p.name)
                same &= a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            print(f"fp8-to-bf16 tensors identical to the naive conversion's: {same}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_gemm(args):
    from dsv3.fp8.linear import _scaled_mm_supported, fp8_gemm, fp8_gemm_reference
    from dsv3.fp8.quant import weight_quant

    def timeit(fn):
        fn()  # warm-up
        ts = []
        for _ in range(args.repeats_gemm):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    print(f"\nGEMM on CPU ({torch.get_num_threads()} threads), median of {args.repeats_gemm}, ms; "
          f"ratio = time / fp32 matmul time")
    cols = ["fp32 matmul", "bf16 matmul", "fp8_gemm scaled_mm", "fp8_gemm emulated", "dequant+matmul (ref)"]
    print(f"{'M x N x K':>18s} " + " ".join(f"{c:>22s}" for c in cols))
    smm = _scaled_mm_supported(torch.device("cpu"))
    torch.manual_seed(0)
    for m, n, k in [(1, 4096, 4096), (64, 4096, 4096), (512, 2048, 7168)]:
        x = torch.randn(m, k)
        w = torch.randn(n, k) * 0.02
        wb, xb = w.to(torch.bfloat16), x.to(torch.bfloat16)
        q, s = weight_quant(w)
        times = [timeit(lambda: x @ w.t()), timeit(lambda: xb @ wb.t()),
                 timeit(lambda: fp8_gemm(x, q, s, backend="scaled_mm")) if smm else float("nan"),
                 timeit(lambda: fp8_gemm(x, q, s, backend="emulated")),
                 timeit(lambda: fp8_gemm_reference(x, q, s))]
        print(f"{f'{m}x{n}x{k}':>18s} " + " ".join(f"{t * 1e3:10.2f} ({t / times[0]:5.2f}x)   " for t in times))
    print("weight bytes per element: fp32 4, bf16 2, FP8 1 + 4/16384 (one fp32 scale per 128x128 block)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=1.0, help="FP8 checkpoint size to synthesize (GB of fp8)")
    p.add_argument("--shards", type=int, default=4, help="number of shards")
    p.add_argument("--repeats", type=int, default=3, help="runs per conversion measurement (median)")
    p.add_argument("--repeats-gemm", type=int, default=3, help="runs per GEMM measurement (median)")
    p.add_argument("--tmpdir", default=None, help="where to build the synthetic checkpoint (default: system temp)")
    p.add_argument("--compare-bytes", action="store_true", help="also check our output equals the naive output")
    p.add_argument("--skip-convert", action="store_true")
    p.add_argument("--skip-gemm", action="store_true")
    args = p.parse_args()
    if not args.skip_convert:
        bench_convert(args)
    if not args.skip_gemm:
        bench_gemm(args)


if __name__ == "__main__":
    main()
