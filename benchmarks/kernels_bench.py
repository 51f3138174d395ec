"""Paired A/B of the CPU decode kernels (dsv3/kernels): the engine's decode throughput with the kernels
and with PyTorch's paths, same process, same weights, alternating rounds.

    python benchmarks/kernels_bench.py --preset small --threads 1 --rounds 5
    python benchmarks/kernels_bench.py --dtype bfloat16 --batch 1 16
    python benchmarks/kernels_bench.py --dtype bfloat16 --ab fused       # the fused blocks alone
    python benchmarks/kernels_bench.py --dtype bfloat16 --ab bf16-dot    # vdpbf16ps against widening
    python benchmarks/kernels_bench.py --dtype bfloat16 --ab prefill --prompt-len 512   # the prefill kernels
    python benchmarks/kernels_bench.py --dtype bfloat16 --ab screen      # the greedy head screen's C kernels
    python benchmarks/kernels_bench.py --dtype bfloat16 --ab bf16-packed # bf16 projections on packed weights
    python benchmarks/kernels_bench.py --dtype bfloat16 --ab far-fetch   # weight rows fetched 32 KB ahead into L2

What is switched off and on (--ab):
  kernels   every kernel (off: PyTorch's paths);
  fused     the fused decode blocks (dsv3_mla_block / dsv3_ffn_block; off: the model's modules, which
            still take the per-op kernels);
  bf16-dot  bf16 products as AVX512-BF16 dot products (off: every value widened to fp32 first);
  bf16-packed  the bf16 few-row projections (attention, shared and dense MLPs) on the weights' packed copies,
            each value summed in order in a lane of its own (off: dot products on the weights as they are);
  far-fetch the expert and few-row linear kernels' fetch of the weight rows 32 KB ahead into L2 (off: the near
            prefetch only; the same values);
  prefill   the many-row kernels (dsv3.kernels.cpu.prefill_paths: bf16 GEMMs, routed experts of many tokens,
            prefill attention, RMSNorm of any row count; off: PyTorch's GEMMs, grouped_mm and SDPA). This
            one times a prefill instead: `batch` prompts of --prompt-len tokens through the model, the
            logits of the last position only (as dsv3 bench times it), prefill tokens/s;
  screen    the greedy head screen's own kernels (dsv3/kernels/screen_cpu.c: the AVX512-VNNI int8 product,
            quantization, candidate search and rescoring; off: oneDNN's int8 linear and the tensor-op
            twins, the screen as it was before them).

For each batch size: aggregate decode tokens/s (time after every prefill; process CPU time at 1
thread, wall time otherwise) off and on, and the median of the per-round on/off ratios (the machines
here are shared: a ratio within a round is what is comparable). The greedy tokens of both are compared
too.
"""
import argparse
import statistics
import time

import torch

import dsv3
from dsv3.config import preset
from dsv3.infer.engine import Engine
from dsv3.infer.params import SamplingParams
from dsv3.kernels import cpu


def decode(model, prompts, n_new, clock):
    engine = Engine(model, eos_token_id=None, max_num_seqs=max(16, len(prompts)))
    params = SamplingParams(max_new_tokens=n_new, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    tokens = {i: [] for i in ids}
    count, t0 = 0, None
    while engine.has_unfinished():
        for o in engine.step():
            if t0 is not None:
                count += len(o.new_token_ids)
            tokens[o.request_id] += o.new_token_ids
        if t0 is None and all(tokens[i] for i in ids):
            t0 = clock()  # every prefill done: decode from here
    return count / (clock() - t0), [tokens[i] for i in ids]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--ab", default="kernels", choices=["kernels", "fused", "bf16-dot", "bf16-packed", "far-fetch", "prefill",
                                                    "screen"],
                   help="what is switched off and on (default: every kernel)")
    args = p.parse_args(argv)
    if cpu.library() is None:
        raise SystemExit(f"the CPU kernels are unavailable here: {cpu.unavailable_reason()}")
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = dsv3.Transformer(preset(args.preset)).init_weights().to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    if args.ab == "bf16-dot" and not cpu.bf16_dot():
        raise SystemExit("--ab bf16-dot: this CPU has no AVX512-BF16")
    library, mla_block, dot, pre, packed = cpu.library, cpu.mla_block, cpu.bf16_dot(), cpu.prefill_paths(), cpu.bf16_packed()
    far = cpu.far_fetch()
    heads = None
    if args.ab == "screen":
        from dsv3.infer.screen import GreedyHead, greedy_head

        if greedy_head(model) is None or not cpu.vnni():
            raise SystemExit("--ab screen: no head screen here (a small vocabulary) or no AVX512-VNNI")
        heads = {True: GreedyHead(model.head.weight, "c"), False: GreedyHead(model.head.weight, "onednn")}
        heads[False].search = "torch"

    def switch(on: bool):
        if args.ab == "screen":  # the model's screen, as greedy_head() keeps it
            model.__dict__["_greedy_head"] = heads[on]
        elif args.ab == "kernels":
            cpu.library = library if on else (lambda: None)
        elif args.ab == "fused":  # the FFN half is fused only after the attention half
            cpu.mla_block = mla_block if on else (lambda *a: None)
        elif args.ab == "prefill":
            cpu.prefill_paths(on)
        elif args.ab == "bf16-packed":
            cpu.bf16_packed(on)
        elif args.ab == "far-fetch":
            cpu.far_fetch(on)
        else:
            cpu.bf16_dot(on)

    def restore():
        if heads is not None:
            model.__dict__["_greedy_head"] = heads[True]
        cpu.library, cpu.mla_block = library, mla_block
        cpu.bf16_dot(dot)
        cpu.bf16_packed(packed)
        cpu.far_fetch(far)
        cpu.prefill_paths(pre)

    if args.ab == "prefill":
        return prefill_ab(model, args, g, clock, switch, restore)

    print(f"# CPU kernels A/B ({args.ab} off / on): {args.preset} preset (random weights), {args.dtype}, {args.threads} threads, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.rounds} rounds, "
          f"{'CPU' if args.threads == 1 else 'wall'} time\n")
    print(f"| batch | {args.ab} off (tok/s) | {args.ab} on (tok/s) | on / off (median of rounds) | rounds | same tokens |")
    print("|---|---:|---:|---:|---|---|")
    for batch in args.batch:
        prompts = torch.randint(3, model.config.vocab_size, (batch, args.prompt_len), generator=g).tolist()
        decode(model, prompts, 4, clock)  # warm-up (and the kernels' build)
        runs, toks = paired(args.rounds, switch, restore, lambda: decode(model, prompts, args.new_tokens, clock))
        print(row(batch, runs, 'yes' if toks[True] == toks[False] else 'no'))


def paired(rounds, switch, restore, once):
    """rounds x (off, on) of once() -> (rate, result): the rates of each side and the last results."""
    runs, out = {False: [], True: []}, {}
    try:
        for _ in range(rounds):
            for on in (False, True):
                switch(on)
                rate, out[on] = once()
                runs[on].append(rate)
    finally:
        restore()
    return runs, out


def row(batch, runs, last: str) -> str:
    ratios = [a / b for a, b in zip(runs[True], runs[False])]
    return (f"| {batch} | {statistics.median(runs[False]):.1f} | {statistics.median(runs[True]):.1f} | "
            f"{statistics.median(ratios):.3f}x | {', '.join(f'{r:.2f}' for r in ratios)} | {last} |")


def prefill_ab(model, args, g, clock, switch, restore):
    print(f"# CPU kernels A/B (prefill off / on): {args.preset} preset (random weights), {args.dtype}, "
          f"{args.threads} threads, prompts of {args.prompt_len} tokens, {args.rounds} rounds, "
          f"{'CPU' if args.threads == 1 else 'wall'} time\n")
    print("| batch | prefill off (tok/s) | prefill on (tok/s) | on / off (median of rounds) | rounds | max |logit diff| |")
    print("|---|---:|---:|---:|---|---|")
    for batch in args.batch:
        tokens = torch.randint(3, model.config.vocab_size, (batch, args.prompt_len), generator=g)

        def once():
            t0 = clock()
            with torch.inference_mode():
                out = model.logits(model.hidden(tokens)[:, -1:]).float()
            return tokens.numel() / (clock() - t0), out
        paired(1, switch, lambda: None, once)  # warm-up of both sides
        runs, out = paired(args.rounds, switch, restore, once)
        print(row(batch, runs, f"{(out[True] - out[False]).abs().max():.2e}"))


if __name__ == "__main__":
    main()
