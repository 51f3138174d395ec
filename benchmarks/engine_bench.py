"""Engine benchmark on CPU: ratios against transformers measured in the same run, same weights.

    python benchmarks/engine_bench.py --preset small --threads 2
    python benchmarks/engine_bench.py --model runs/demo/latest --mtp-only          # MTP on a trained checkpoint
    python benchmarks/engine_bench.py --model runs/demo/mtp-distilled --mtp-only   # ... after dsv3 distill-mtp

Reports (as Markdown tables):
  1. batch-1 decode tokens/s: dsv3 engine, dsv3.generate (contiguous cache), transformers
     generate(do_sample=False); the % of the memory-bandwidth roofline: bytes of weights and cache
     read per decoded token / the bandwidth of a large tensor copy measured in this run;
  2. 16 concurrent sequences: aggregate decode tokens/s against one sequence (engine; transformers
     batched generate as a reference);
  3. MTP speculative decoding at batch 1: acceptance rate, mean accepted length, speed-up over
     plain decoding (on the given checkpoint; with random MTP weights the acceptance is ~0 and
     the row says so), plus a constructed model whose MTP module agrees with it most of the time,
     to show what the machinery gives at a known acceptance;
  4. a profile of the batch-1 decode step: time per part of the model and engine overhead.
Decode figures exclude the prefill. Measurements alternate between the systems over several
rounds and report medians of per-round ratios, since the machines here are shared; with
`--clock cpu` (the default at 1 thread) times are the process's CPU time, which does not count the
time other processes hold the core (memory-bandwidth contention still shows).
"""
import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

import dsv3
from dsv3.config import preset
from dsv3.infer.engine import Engine
from dsv3.infer.params import SamplingParams
from dsv3.kernels import cpu as cpu_kernels
from dsv3.model.moe import MoE


CLOCK = time.perf_counter


def copy_bandwidth(gib: float = 1.0, reps: int = 5) -> float:
    """Bytes moved per second (read + write) by a large tensor copy (beyond the caches)."""
    n = int(gib * (1 << 30)) // 4
    a = torch.ones(n, dtype=torch.float32)
    b = torch.empty_like(a)
    b.copy_(a)
    ts = []
    for _ in range(reps):
        t = CLOCK()
        b.copy_(a)
        ts.append(CLOCK() - t)
    return 2 * n * 4 / statistics.median(ts)


def bytes_per_token(model, context: int, cache_elem: int, head_elem: int | None = None) -> int:
    """Weights read to decode one token at batch 1 (every dense weight, the router, the shared
    experts and num_experts_per_tok routed experts per MoE layer, one embedding row, the head)
    plus the latent cache of `context` positions in every layer. head_elem: bytes per head element
    when the head is read in another format (1: dsv3's int8 screen for greedy decoding; its few
    rescored fp32 rows are negligible)."""
    cfg = model.config
    elem = next(model.parameters()).element_size()
    total = cfg.hidden_size  # the embedding row
    for layer in model.layers:
        for name, p in layer.named_parameters():
            if ".experts." in f".{name}":
                continue
            total += p.numel()
        if isinstance(layer.ffn, MoE):
            e = layer.ffn.experts
            total += cfg.num_experts_per_tok * (e.w1[0].numel() + e.w2[0].numel() + e.w3[0].numel())
    total += model.norm.weight.numel()
    head = model.head.weight.numel() * (elem if head_elem is None else head_elem)
    return total * elem + head + cfg.num_hidden_layers * context * cfg.kv_cache_dim * cache_elem


def engine_decode(engine, prompts, n_new):
    """Aggregate decode tokens/s of the requests run together (time after the last prefill)."""
    count, seconds = _decode(engine, prompts, n_new)
    return count / seconds


def sequential_decode(engine, prompts, n_new):
    """Decode tokens/s at batch 1 over several prompts run one after another."""
    runs = [_decode(engine, [p], n_new) for p in prompts]
    return sum(c for c, _ in runs) / sum(s for _, s in runs)


def _decode(engine, prompts, n_new):
    params = SamplingParams(max_new_tokens=n_new, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    first, count, t0 = set(), 0, None
    while engine.has_unfinished():
        outs = engine.step()
        for o in outs:
            if o.request_id not in first:
                first.add(o.request_id)
            elif t0 is not None:
                count += len(o.new_token_ids)
        if t0 is None and len(first) == len(ids):
            t0 = CLOCK()  # every prefill done: decode from here
    return count, CLOCK() - t0


@functools.lru_cache(maxsize=None)
def corpus_and_tokenizer(folder):
    """(bundled corpus text, the checkpoint's tokenizer), or None when either is missing."""
    corpus = os.path.join(os.path.dirname(__file__), "..", "data", "tinyshakespeare.txt")
    if not (os.path.isfile(os.path.join(folder, "tokenizer.json")) and os.path.isfile(corpus)):
        return None
    from dsv3.tokenizer import Tokenizer

    return open(corpus, encoding="utf-8").read(), Tokenizer.from_dir(folder)


def corpus_prompts(folder, n, length):
    """n prompts of `length` tokens from the held-out end of the bundled corpus (the last 10%, where
    `dsv3 train`'s validation split lies), each starting at a line; None without a tokenizer."""
    found = corpus_and_tokenizer(folder)
    if found is None:
        return None
    text, tok = found
    tail = text[int(len(text) * 0.9):]
    out = []
    for i in range(n):
        start = tail.index("\n", i * len(tail) // n) + 1
        ids = tok.encode(tail[start:start + 8 * length])[:length]
        if len(ids) == length:
            out.append(ids)
    return out or None


def hf_decode(hf, prompts, n_new):
    x = torch.tensor(prompts)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        t = CLOCK()
        hf.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = CLOCK() - t
        t = CLOCK()
        hf.generate(x, max_new_tokens=n_new, min_new_tokens=n_new, **kw)
        tn = CLOCK() - t
    return len(prompts) * (n_new - 1) / (tn - t1)


def dsv3_generate_decode(model, prompts, n_new):
    with torch.no_grad():
        t = CLOCK()
        dsv3.generate(model, prompts, 1)
        t1 = CLOCK() - t
        t = CLOCK()
        dsv3.generate(model, prompts, n_new)
        tn = CLOCK() - t
    return len(prompts) * (n_new - 1) / (tn - t1)


def aligned_mtp(model, scale=0.01, noise=0.1):
    """Constructed in place: layers scaled down (the next token depends mostly on the current one)
    and an MTP module passing its input token's embedding through, so its draft is often right."""
    def shrink(block):
        block.attn.wo.weight.mul_(scale)
        f = block.ffn
        if isinstance(f, MoE):
            f.experts.w2.mul_(scale)
            if f.shared_experts is not None:
                f.shared_experts.w2.weight.mul_(scale)
        else:
            f.w2.weight.mul_(scale)

    with torch.no_grad():
        for layer in model.layers:
            shrink(layer)
        d = model.config.hidden_size
        w = torch.cat([torch.eye(d), noise * torch.randn(d, d) / d ** 0.5], 1)
        model.mtp[0].eh_proj.weight.copy_(w.to(model.mtp[0].eh_proj.weight.dtype))
        shrink(model.mtp[0].block)
    return model


def profile_decode(engine, prompt, steps=12):
    """Wall time per part of a batch-1 decode step, through forward hooks."""
    model = engine.model
    acc = {}
    stack = {}

    def pre(name):
        def f(mod, inp):
            stack[name] = CLOCK()
        return f

    def post(name):
        def f(mod, inp, out):
            acc[name] = acc.get(name, 0.0) + CLOCK() - stack[name]
        return f

    parts = {"embedding": [model.embed], "attention (MLA)": [l.attn for l in model.layers],
             "MoE / MLP": [l.ffn for l in model.layers], "output head": [model.head],
             "norms": [model.norm] + [n for l in model.layers for n in (l.attn_norm, l.ffn_norm)]}
    if len(model.mtp):
        parts["MTP module"] = [model.mtp[0]]
    handles = []
    for name, mods in parts.items():
        for m in mods:
            handles.append(m.register_forward_pre_hook(pre(name)))
            handles.append(m.register_forward_hook(post(name)))
    engine.add_request(prompt, SamplingParams(max_new_tokens=steps + 3, ignore_eos=True))
    for _ in range(3):
        engine.step()
    acc.clear()
    t = CLOCK()
    n = 0
    while engine.has_unfinished():
        engine.step()
        n += 1
    total = CLOCK() - t
    for h in handles:
        h.remove()
    rows = [(k, v / n * 1e3) for k, v in acc.items()]
    rows.append(("engine + sampling + rest", (total - sum(acc.values())) / n * 1e3))
    return rows, total / n * 1e3


# the kernel entry points the fused decode step spends its time in (dsv3.kernels.cpu; the model and the head
# screen call them through the module, so wrapping the module's functions times them)
FUSED_PARTS = {"attention blocks (dsv3_mla_block)": ("mla_block",), "FFN blocks (dsv3_ffn_block)": ("ffn_block",),
               "head: int8 product (dsv3_head_i8)": ("head_i8",),
               "head: quantization, candidates, rescoring": ("screen_prepare", "screen_candidates", "screen_rescore")}


def profile_fused(engine, prompts, steps=16):
    """Time per part of a decode step through the fused CPU blocks (no hooks: the step as measured), for the
    requests `prompts` decoded together: {part: ms / step} plus the rest (embedding, norms outside the blocks,
    engine, sampling, Python) and the step's total."""
    acc = {}
    saved = {}

    def timed(part, fn):
        def f(*a, **k):
            t = CLOCK()
            try:
                return fn(*a, **k)
            finally:
                acc[part] = acc.get(part, 0.0) + CLOCK() - t
        return f

    for part, names in FUSED_PARTS.items():
        for name in names:
            saved[name] = getattr(cpu_kernels, name)
            setattr(cpu_kernels, name, timed(part, saved[name]))
    try:
        params = SamplingParams(max_new_tokens=steps + 3, ignore_eos=True)
        ids = {engine.add_request(p, params) for p in prompts}
        started = set()
        while started != ids:  # the prefill (chunks of it when the prompts exceed a step's token budget)
            started.update(o.request_id for o in engine.step() if o.new_token_ids)
        for _ in range(2):  # two decode steps
            engine.step()
        acc.clear()
        t, n = CLOCK(), 0
        while engine.has_unfinished():
            engine.step()
            n += 1
        total = CLOCK() - t
    finally:
        for name, fn in saved.items():
            setattr(cpu_kernels, name, fn)
    rows = {part: acc.get(part, 0.0) / n * 1e3 for part in FUSED_PARTS}
    rows["embedding, engine, sampling, rest"] = total / n * 1e3 - sum(rows.values())
    rows["step"] = total / n * 1e3
    return rows


def table(headers, rows):
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def main(argv=None):
    # the checkpoint saved for transformers (and llama.cpp's GGUF): ~0.3-2 GB a run, removed whatever happens
    tmp = tempfile.mkdtemp(prefix="dsv3_bench_")
    try:
        return _main(argv, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _main(argv, tmp):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="model preset with random weights (default: small)")
    p.add_argument("--model", default=None, help="a checkpoint folder instead of a preset")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights for both systems")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=48, help="tokens decoded per request")
    p.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds (medians reported)")
    p.add_argument("--batch", type=int, default=16, help="concurrent sequences for the batching figure")
    p.add_argument("--draft-vocab", type=int, default=16384,
                   help="MTP draft vocabulary size (FR-Spec; 0 = the whole vocabulary)")
    p.add_argument("--mtp-prompts", type=int, default=8,
                   help="MTP section on a trained checkpoint with a tokenizer: this many prompts from the held-out "
                        "end of data/tinyshakespeare.txt, decoded one after another at batch 1 (default 8)")
    p.add_argument("--skip-hf", action="store_true", help="no transformers reference")
    p.add_argument("--llama-cpp", action="store_true",
                   help="llama.cpp (make llamacpp) as a second reference for batch-1 decode, on the same checkpoint "
                        "converted to F32 GGUF by llama.cpp's own converter")
    p.add_argument("--mtp-only", action="store_true", help="only the MTP section")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                   help="process CPU time or wall time (auto: CPU time at 1 thread, wall otherwise)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    global CLOCK
    cpu = args.clock == "cpu" or (args.clock == "auto" and args.threads == 1)
    CLOCK = time.process_time if cpu else time.perf_counter
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    if args.model:
        model = dsv3.load_model(args.model, dtype=dtype).eval()
        folder, trained = args.model, True
        name = os.path.basename(os.path.normpath(args.model))
    else:
        model = dsv3.Transformer(preset(args.preset)).init_weights().to(dtype).eval()
        folder, trained = tmp, False
        dsv3.save_model(model, folder)
        name = f"{args.preset} preset (random weights)"
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, cfg.vocab_size, (args.batch, args.prompt_len), generator=g).tolist()
    kernels_off = cpu_kernels.unavailable_reason()
    res = {"model": name, "dtype": args.dtype, "threads": args.threads, "params": cfg.num_params(),
           "cpu_kernels": kernels_off is None}
    print(f"# dsv3 engine benchmark: {name}, {args.dtype}, {args.threads} threads, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.rounds} rounds, "
          f"{'CPU' if cpu else 'wall'} time; dsv3 CPU decode kernels "
          f"{'on' if kernels_off is None else 'off (' + kernels_off + ')'}\n")

    if not args.mtp_only:
        hf = None
        if not args.skip_hf:
            import transformers
            from transformers import DeepseekV3ForCausalLM
            transformers.logging.set_verbosity_error()
            hf = DeepseekV3ForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        lc = None
        if args.llama_cpp:
            from dsv3.commands import llamacpp

            try:
                converter = llamacpp.require()
            except ValueError as e:
                sys.exit(str(e))
            if args.dtype != "float32":
                sys.exit("--llama-cpp: measured on F32 weights only (--dtype float32)")
            gguf = llamacpp.convert(folder, os.path.join(tmp, "gguf"), converter)
            lc = llamacpp.LlamaCpp(gguf, n_ctx=args.prompt_len + args.new_tokens + 8, threads=args.threads)
            lc.greedy(prompts[0], 4, CLOCK)  # warm-up
        engine = Engine(model, eos_token_id=None, max_num_seqs=max(16, args.batch))
        engine_decode(engine, prompts[:1], 4)  # warm-up
        runs = {"engine": [], "dsv3.generate": [], "transformers": [], "llama.cpp": [], "bw": [],
                "engine_b": [], "transformers_b": []}
        lc_tokens = None
        for r in range(args.rounds):
            runs["bw"].append(copy_bandwidth())
            runs["engine"].append(engine_decode(engine, prompts[:1], args.new_tokens))
            runs["dsv3.generate"].append(dsv3_generate_decode(model, prompts[:1], args.new_tokens))
            if hf is not None:
                runs["transformers"].append(hf_decode(hf, prompts[:1], args.new_tokens))
            if lc is not None:
                lc_tokens, sec = lc.greedy(prompts[0], args.new_tokens, CLOCK)
                runs["llama.cpp"].append((args.new_tokens - 1) / sec)
            runs["engine_b"].append(engine_decode(engine, prompts, args.new_tokens))
            if hf is not None:
                runs["transformers_b"].append(hf_decode(hf, prompts, args.new_tokens))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in runs.items() if v), file=sys.stderr)
        med = {k: statistics.median(v) for k, v in runs.items() if v}
        ctx = args.prompt_len + args.new_tokens // 2
        cache_elem = model.layers[0].attn.wkv_a.weight.element_size()
        bpt = bytes_per_token(model, ctx, cache_elem)
        # greedy decoding in dsv3 reads the int8 copy of the head when the screen applies
        from dsv3.infer.screen import greedy_head
        bpt_dsv3 = bytes_per_token(model, ctx, cache_elem, 1 if greedy_head(model) is not None else None)
        # llama.cpp reads every weight in F32 like transformers (its latent cache is kept in F32 too)
        bytes_of = {"engine": bpt_dsv3, "dsv3.generate": bpt_dsv3, "transformers": bpt, "llama.cpp": bpt}

        def ratio(a, b):  # median over rounds of the ratio measured within a round (the load drifts)
            return statistics.median(x / y for x, y in zip(runs[a], runs[b])) if runs[a] and runs[b] else float("nan")

        rows = []
        for k in ("engine", "dsv3.generate", "transformers", "llama.cpp"):
            if k in med:
                vs = ratio(k, "transformers")
                rows.append((k, f"{med[k]:.2f}", "n/a (--skip-hf)" if vs != vs else f"{vs:.2f}x", f"{bytes_of[k] / 1e6:.1f}",
                             f"{100 * statistics.median(x * bytes_of[k] / b for x, b in zip(runs[k], runs['bw'])):.0f}%"))
        print("## Batch-1 decode\n")
        print(table(["system", "tokens/s", "vs transformers", "MB read / token", "% of roofline"], rows))
        print(f"\nroofline: MB read per token (weights + latent cache at context {ctx}; dsv3 reads its head "
              f"as int8 when greedy: {bpt_dsv3 / 1e6:.1f} MB vs {bpt / 1e6:.1f} MB) / "
              f"{med['bw'] / 1e9:.2f} GB/s copy bandwidth (median) = {med['bw'] / bpt_dsv3:.1f} tokens/s for dsv3, "
              f"{med['bw'] / bpt:.1f} for transformers; ratios and % are medians of per-round figures\n")
        if lc is not None:
            ours = dsv3.generate(model, prompts[:1], args.new_tokens)[0]
            agree = next((i for i, (x, y) in enumerate(zip(lc_tokens, ours)) if x != y), len(ours))
            print(f"llama.cpp (GGUF F32 from llama.cpp's converter, {args.threads} threads): greedy tokens agree with "
                  f"dsv3's for {agree}/{len(ours)}; engine / llama.cpp {ratio('engine', 'llama.cpp'):.2f}x\n")
            res["llama_cpp_tokens_agree"] = f"{agree}/{len(ours)}"
            lc.close()
        roof = med["bw"] / bpt_dsv3
        rows = [("engine, 1 sequence", f"{med['engine']:.2f}", "1.00x"),
                (f"engine, {args.batch} sequences", f"{med['engine_b']:.2f}",
                 f"{ratio('engine_b', 'engine'):.2f}x")]
        if "transformers_b" in med:
            rows.append((f"transformers, {args.batch} sequences", f"{med['transformers_b']:.2f}",
                         f"{ratio('transformers_b', 'transformers'):.2f}x (vs its batch 1)"))
        print(f"## {args.batch} concurrent sequences (aggregate decode tokens/s)\n")
        print(table(["run", "tokens/s", "vs 1 sequence"], rows))
        res.update({k: v for k, v in med.items()}, roofline_tokens_s=roof, bytes_per_token=bpt,
                   bytes_per_token_dsv3=bpt_dsv3, runs=runs)

        prof, step_ms = profile_decode(Engine(model, eos_token_id=None), prompts[0])
        print(f"\n## Profile of the batch-1 decode step ({step_ms:.1f} ms)\n")
        print("(forward hooks time the parts, and hooks turn the fused CPU decode blocks off: this is the step "
              "through the modules, slower than the measured one)\n")
        print(table(["part", "ms / step", "share"], [(k, f"{v:.2f}", f"{100 * v / step_ms:.0f}%") for k, v in prof]))
        res["profile_ms"] = dict(prof)
        if kernels_off is None:
            one = profile_fused(engine, prompts[:1])
            many = profile_fused(engine, prompts)
            print(f"\n## The fused decode step by part: 1 and {args.batch} sequences (ms / step)\n")
            print(f"(the kernels' entry points timed without hooks; what the {args.batch}/1 ratio above is made of)\n")
            print(table(["part", "1 sequence", f"{args.batch} sequences", "ratio"],
                        [(k, f"{one[k]:.2f}", f"{many[k]:.2f}", f"{many[k] / one[k]:.2f}x" if one[k] > 0 else "-")
                         for k in one]))
            res["profile_fused_ms"] = {"1": one, str(args.batch): many}
        del hf

    # ---- MTP speculative decoding at batch 1
    if cfg.num_nextn_predict_layers:
        draft_vocab = None
        if args.draft_vocab and args.draft_vocab < cfg.vocab_size:
            draft_vocab = list(range(args.draft_vocab))
            found = corpus_and_tokenizer(folder)
            if found is not None:
                from dsv3.infer.speculative import frequent_tokens
                text, tok = found
                freq = frequent_tokens([tok.encode(text)], args.draft_vocab)
                have = set(freq)
                draft_vocab = freq + [t for t in range(cfg.vocab_size) if t not in have][:args.draft_vocab - len(freq)]
        cases = [(name + ("" if trained else ": MTP weights random, acceptance ~0"), model)]
        if not trained:
            m2 = dsv3.Transformer(cfg).init_weights().eval()
            m2.load_state_dict(model.state_dict())
            cases.append((f"{args.preset} preset, constructed agreeing MTP (not trained)", aligned_mtp(m2.to(dtype))))
        rows = []
        # a trained model is measured on text like its training data (random ids would make it
        # continue from noise); each round decodes every prompt, one at a time
        text_prompts = corpus_prompts(folder, args.mtp_prompts, args.prompt_len) if trained else None
        prompt = text_prompts or prompts[:1]
        src = "held-out text of data/tinyshakespeare.txt" if text_prompts else "random token ids"
        res["mtp_prompts"] = f"{len(prompt)} x {len(prompt[0])} tokens, {src}"
        print(f"MTP prompts: {res['mtp_prompts']}", file=sys.stderr)
        for label, m in cases:
            e_plain = Engine(m, eos_token_id=None)
            # a frequency-ranked draft vocabulary means nothing to the constructed model (its tokens
            # are arbitrary): there it is left out; on random MTP weights it shows the cost saving
            variants = [(f"draft vocab {args.draft_vocab}", draft_vocab)] if draft_vocab and m is model else []
            variants.append(("full draft vocab", None))
            engines = [Engine(m, eos_token_id=None, speculative="mtp", draft_vocab=v) for _, v in variants]
            for e in engines:
                engine_decode(e, prompt, 4)
            plain, spec = [], [[] for _ in engines]
            acc, tau = [[] for _ in engines], [[] for _ in engines]
            for r in range(args.rounds):
                plain.append(sequential_decode(e_plain, prompt, args.new_tokens))
                for i, e in enumerate(engines):
                    before = e.stats().spec
                    spec[i].append(sequential_decode(e, prompt, args.new_tokens))
                    after = e.stats().spec
                    acc[i].append((after.accepted - before.accepted) / max(1, after.drafted - before.drafted))
                    tau[i].append(1 + (after.accepted - before.accepted) / max(1, after.steps - before.steps))
                print(f"MTP round {r + 1}: plain {plain[-1]:.2f}, " +
                      ", ".join(f"{v[0]} {spec[i][-1]:.2f}" for i, v in enumerate(variants)), file=sys.stderr)
            p_ = statistics.median(plain)
            for i, (dv_label, _) in enumerate(variants):
                s_, a_, t_ = statistics.median(spec[i]), statistics.median(acc[i]), statistics.median(tau[i])
                speedup = statistics.median(x / y for x, y in zip(spec[i], plain))
                # cost of a verify step relative to a plain decode step: the speed-up is tau / this
                cost = statistics.median(tt * y / x for tt, x, y in zip(tau[i], spec[i], plain))
                rows.append((label, dv_label, f"{100 * a_:.1f}%", f"{t_:.2f}", f"{cost:.2f}", f"{p_:.2f}", f"{s_:.2f}",
                             f"{speedup:.2f}x"))
                res.setdefault("mtp", []).append(dict(model=label, draft=dv_label, acceptance=a_,
                                                      mean_accepted_length=t_, plain_tokens_s=p_,
                                                      spec_tokens_s=s_, speedup=speedup, verify_cost=cost))
        print(f"\n## MTP speculative decoding, batch 1 (greedy; prompts: {res['mtp_prompts']})\n")
        print(table(["model", "draft", "acceptance", "tokens / verify", "verify step / plain step", "plain tokens/s",
                     "MTP tokens/s", "speed-up"], rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
