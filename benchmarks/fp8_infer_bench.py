"""FP8-resident inference vs BF16 on the `small` preset: parameter memory and decode speed (CPU).

    .venv/bin/python benchmarks/fp8_infer_bench.py [--batch 1 --prompt-len 32 --new-tokens 16 --repeats 3]

One randomly initialised `small` model in bf16 (the reference), and its FP8-resident twin made by
`dsv3.fp8.resident.quantize_model_` (what `load_fp8_model` does to a BF16 checkpoint while loading):
the release's FP8 set (MLA, dense MLP, shared and routed experts) as float8_e4m3fn + fp32 block
scales, the rest (embedding, head, norms, router, MTP eh_proj) in bf16. Memory: bytes of parameters
and buffers (each storage once). Decode: `dsv3.generate` greedy, time per new token after the
prefill ((t(1 + N tokens) - t(1 token)) / N), medians over --repeats, runs interleaved. FP8 paths:
`fast` (activations in 1x128 tiles, per-128-K fp32 promotion; emulated on CPU), `scaled_mm` (the
same through torch._scaled_mm, the FP8 tensor-core path on GPUs), `reference` (dequantize + matmul).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def _decode_time(model, prompts, n):
    from dsv3 import generate

    t0 = time.perf_counter()
    generate(model, prompts, 1)
    t1 = time.perf_counter()
    out = generate(model, prompts, 1 + n)
    t2 = time.perf_counter()
    return ((t2 - t1) - (t1 - t0)) / n, t1 - t0, out


def _meta_bytes(model) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="model preset")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=16, help="decode steps timed")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per model (median)")
    p.add_argument("--paths", nargs="+", default=["fast", "scaled_mm", "reference"],
                   choices=["fast", "scaled_mm", "reference"], help="FP8 paths to time")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from dsv3.config import preset
    from dsv3.fp8.resident import fp8_modules, quantize_model_, set_reference, tensor_bytes
    from dsv3.model.transformer import Transformer

    cfg = preset(args.preset)
    torch.manual_seed(0)
    bf16 = Transformer(cfg).to(torch.bfloat16).init_weights(0.02).eval()
    fp8 = quantize_model_(copy.deepcopy(bf16)).eval()
    b_all, f_all = tensor_bytes(bf16), tensor_bytes(fp8)
    f_set = sum(tensor_bytes(m) for m in fp8_modules(fp8).values())
    b_set = sum(tensor_bytes(bf16.get_submodule(n)) for n in fp8_modules(fp8))
    n = cfg.num_params()
    print(f"{args.preset}: {n['total'] / 1e6:.1f}M parameters, vocab {cfg.vocab_size}, hidden {cfg.hidden_size}, "
          f"{cfg.num_hidden_layers} layers + {cfg.num_nextn_predict_layers} MTP\n")
    print("| parameter memory | BF16 MB | FP8-resident MB | ratio |")
    print("|---|---|---|---|")
    print(f"| the release's FP8 set (MLA, MLPs, experts) | {b_set / 1e6:.1f} | {f_set / 1e6:.1f} | "
          f"{f_set / b_set:.3f} |")
    print(f"| rest (embedding, head, norms, router, eh_proj) | {(b_all - b_set) / 1e6:.1f} | "
          f"{(f_all - f_set) / 1e6:.1f} | {(f_all - f_set) / (b_all - b_set):.3f} |")
    print(f"| whole model | {b_all / 1e6:.1f} | {f_all / 1e6:.1f} | {f_all / b_all:.3f} |")
    # The same accounting for DeepSeek-V3's published shapes, on the meta device (no memory used):
    # there the 129k-vocabulary embedding and head are a small part of the model.
    with torch.device("meta"):
        v3 = Transformer(preset("v3")).to(torch.bfloat16)
    v3_b = _meta_bytes(v3)
    v3_f = _meta_bytes(quantize_model_(v3))
    print(f"| DeepSeek-V3 shapes (meta device, computed) | {v3_b / 1e9:.1f} GB | {v3_f / 1e9:.1f} GB | "
          f"{v3_f / v3_b:.3f} |\n")

    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(2, cfg.vocab_size, (args.batch, args.prompt_len), generator=g).tolist()
    models = {"bf16": bf16}
    for path in args.paths:
        m = fp8 if path == "fast" else copy.deepcopy(fp8)
        if path == "scaled_mm":
            for mod in fp8_modules(m).values():
                mod.backend = "scaled_mm"
        if path == "reference":
            set_reference(m)
        models[f"fp8 {path}"] = m
    for m in models.values():  # warm-up (absorbed-weight caches, allocator)
        _decode_time(m, prompts, 2)
    times = {k: [] for k in models}
    prefill = {k: [] for k in models}
    for _ in range(args.repeats):
        for k, m in models.items():
            d, pf, _ = _decode_time(m, prompts, args.new_tokens)
            times[k].append(d)
            prefill[k].append(pf)
    base = statistics.median(times["bf16"])
    print(f"decode: batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}\n")
    print("| model | ms / decode step | tokens/s | speed vs bf16 | prefill ms |")
    print("|---|---|---|---|---|")
    for k in models:
        t = statistics.median(times[k])
        print(f"| {k} | {1e3 * t:.1f} | {args.batch / t:.1f} | {base / t:.2f}x | "
              f"{1e3 * statistics.median(prefill[k]):.0f} |")


if __name__ == "__main__":
    main()
