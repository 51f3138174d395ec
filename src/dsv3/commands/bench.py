"""`dsv3 bench`: dsv3 against transformers' DeepseekV3ForCausalLM with identical weights.

Measured (issue 2, "What must be measured"), each a median over --repeats timed runs after warmup:
- prefill tokens/s: batch 1, --prompt-len tokens, logits of the last position only (transformers
  with `logits_to_keep=1`, dsv3 with `hidden` + `logits` on the last position), no cache in either;
- batch-1 decode tokens/s: both prefill a --decode-prompt-len prompt into their own cache (dsv3: the
  absorbed LatentCache; transformers: the DynamicCache its forward returns), then --decode-tokens
  greedy single-token steps are timed;
- end-to-end `dsv3.generate` against transformers' `generate(do_sample=False)` (prefill included);
- KV-cache bytes per token per layer, measured from the cache tensors each side holds after the
  decode prompt (transformers 5 caches MLA's latent too, so the two should agree).

The same random weights reach both: a preset is built with `init_weights`, written once with
`save_model` (fp32), and loaded by `dsv3.load_model` and by `from_pretrained` in the benchmarked
dtype. Ratios are dsv3 / transformers (above 1: dsv3 is faster; for bytes, below 1 is smaller).
"""
import datetime
import json
import os
import platform
import statistics
import tempfile
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def configure(p):
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None,
                     help="benchmark a random model of this preset (tiny, small, ...; default: small)")
    src.add_argument("--model", default=None, help="benchmark this checkpoint folder (config.json + safetensors)")
    p.add_argument("--dtype", default="both", choices=["fp32", "bf16", "both"],
                   help="compute dtype of both models (default: both, one table each)")
    p.add_argument("--prompt-len", type=int, default=512, help="prefill length in tokens (default 512)")
    p.add_argument("--decode-prompt-len", type=int, default=64,
                   help="prompt prefilled into the cache before the timed decode steps (default 64)")
    p.add_argument("--decode-tokens", type=int, default=64, help="timed single-token decode steps (default 64)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before each measurement (default 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch intra-op threads (default: all cores; on a machine other jobs load, 1 thread "
                        "avoids OpenMP threads spin-waiting on a descheduled peer)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")
    p.add_argument("--no-generate", action="store_true", help="skip the end-to-end generate() comparison")
    p.add_argument("--profile", action="store_true",
                   help="also show where the time goes: per module category for both models (decode step and "
                        "prefill) and dsv3's top aten ops with their shapes")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--llama-cpp", action="store_true",
                   help="also measure llama.cpp (installed by `make llamacpp`) on the same checkpoint, converted "
                        "by llama.cpp's own converter: prefill and decode against transformers, paired")
    p.add_argument("--llama-cpp-converter", default=None, metavar="PATH",
                   help="llama.cpp's convert_hf_to_gguf.py (default: the one `make llamacpp` unpacks)")


# ---------------------------------------------------------------- models with identical weights

def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def random_checkpoint(preset_name: str, path: str, seed: int) -> str:
    """A random `preset_name` model written with save_model in fp32 (MTP dropped: neither side uses it
    for prefill/decode, and transformers' DeepseekV3ForCausalLM has no MTP module to load it into)."""
    from dsv3 import Transformer, save_model
    from dsv3.config import preset

    cfg = preset(preset_name).replace(num_nextn_predict_layers=0)
    torch.manual_seed(seed)
    model = Transformer(cfg).float().init_weights()
    save_model(model, path)
    return path


def load_pair(path: str, dtype: torch.dtype):
    """(dsv3 model, transformers model), both in eval mode and `dtype`, from the same folder."""
    from dsv3 import load_model

    transformers = _quiet_transformers()
    ours = load_model(path, dtype=dtype).eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return ours, ref


# ---------------------------------------------------------------- timing helpers

def _interleaved(ours, ref, repeats: int, warmup: int) -> tuple[list[float], list[float]]:
    """Seconds per run of two callables, alternating them run by run (and which goes first), so
    that load from other processes on a shared machine hits both sides alike instead of skewing
    the ratio. A callable that returns a float reports its own seconds (the decode loops time only
    their steps); otherwise the whole call is timed."""
    def once(fn):
        t0 = time.perf_counter()
        r = fn()
        return r if isinstance(r, float) else time.perf_counter() - t0

    for _ in range(warmup):
        once(ours)
        once(ref)
    t_ours, t_ref = [], []
    for i in range(repeats):
        first, second = (ours, ref) if i % 2 == 0 else (ref, ours)
        a, b = once(first), once(second)
        t_ours.append(a if first is ours else b)
        t_ref.append(b if first is ours else a)
    return t_ours, t_ref


def _dsv3_prefill(model, tokens):
    h = model.hidden(tokens)
    return model.logits(h[:, -1:])  # (B, 1, V)


def _hf_prefill(model, tokens):
    return model(input_ids=tokens, use_cache=False, logits_to_keep=1).logits  # (B, 1, V)


def _dsv3_prefill_cache(model, prompt, n: int):
    """Prefill `prompt` (1, P) into a LatentCache with room for n more tokens; returns (cache, next token)."""
    from dsv3.infer.cache import LatentCache
    from dsv3.infer.screen import greedy_tokens

    cfg = model.config
    P = prompt.shape[1]
    dtype = next(model.parameters()).dtype
    cache = LatentCache(cfg, 1, P + n + 1, dtype=dtype, n_layers=cfg.num_hidden_layers)
    h = model.hidden(prompt, torch.arange(P)[None], cache)
    return cache, greedy_tokens(model, h[:, -1])  # (1,)


def _dsv3_steps(model, cache, tok, start: int, n: int):
    """n greedy single-token steps through the cache, the token at position `start` first."""
    from dsv3.infer.screen import greedy_tokens

    out = [int(tok)]
    for i in range(n):
        h = model.hidden(tok[:, None], torch.tensor([[start + i]]), cache)
        tok = greedy_tokens(model, h[:, -1])  # the argmax of the fp32 logits, as dsv3.generate takes it
        out.append(int(tok))
    return out


def _dsv3_decode(model, prompt, n: int):
    """Prefill `prompt` (1, P), then n timed greedy steps: (seconds of the n steps, tokens, cache)."""
    cache, tok = _dsv3_prefill_cache(model, prompt, n)
    t0 = time.perf_counter()
    out = _dsv3_steps(model, cache, tok, prompt.shape[1], n)
    return time.perf_counter() - t0, out, cache


def _hf_decode(model, prompt, n: int):
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    pkv = out.past_key_values
    tok = out.logits[:, -1].argmax(-1)
    toks = [int(tok)]
    t0 = time.perf_counter()
    for _ in range(n):
        out = model(input_ids=tok[:, None], past_key_values=pkv, use_cache=True)
        pkv = out.past_key_values
        tok = out.logits[:, -1].argmax(-1)
        toks.append(int(tok))
    return time.perf_counter() - t0, toks, pkv


def hf_cache_bytes(pkv, n_tokens: int, n_layers: int) -> tuple[float, str]:
    """Bytes per token per layer of a transformers cache, from the tensors it actually holds."""
    total, shapes = 0, None
    layers = getattr(pkv, "layers", None)
    if layers is not None:  # transformers >= 4.56: DynamicCache.layers[i].keys / .values
        pairs = [(layer.keys, layer.values) for layer in layers]
    else:  # legacy tuple of (k, v) per layer
        pairs = [tuple(x) for x in pkv]
    for k, v in pairs:
        total += k.numel() * k.element_size() + v.numel() * v.element_size()
        shapes = shapes or f"keys {tuple(k.shape)} {str(k.dtype).replace('torch.', '')}, values {tuple(v.shape)}"
    assert len(pairs) == n_layers, (len(pairs), n_layers)
    return total / (n_tokens * n_layers), f"{type(pkv).__name__}, per layer: {shapes}"


def dsv3_cache_bytes(cache, n_tokens: int, n_layers: int) -> tuple[float, str]:
    """Bytes per token per layer of the LatentCache: the tensors' per-slot footprint (the cache is
    preallocated, so what a token costs is one slot of kv plus one slot of pe in each layer)."""
    per_slot = (cache.kv[0, 0, 0].numel() * cache.kv.element_size()
                + cache.pe[0, 0, 0].numel() * cache.pe.element_size())
    assert per_slot == cache.bytes_per_token_per_layer()
    return float(per_slot), (f"LatentCache kv {tuple(cache.kv.shape)} + pe {tuple(cache.pe.shape)} "
                             f"{str(cache.kv.dtype).replace('torch.', '')} (layers, batch, slots, dim)")


# ---------------------------------------------------------------- the benchmark

def bench_dtype(path: str, dtype_name: str, prompt_len: int, decode_prompt_len: int, decode_tokens: int,
                repeats: int, warmup: int, seed: int, do_generate: bool = True, profile: bool = False,
                gguf: str | None = None) -> dict:
    # Load outside inference_mode, as users do: parameters created under inference_mode are
    # inference tensors, and then a (1, 1, D) slice of a longer hidden state sent through the bf16
    # head takes an unfolded bmm path that copies the whole (D, V) weight per call (~20x slower
    # on this CPU; seen while writing this benchmark).
    ours, ref = load_pair(path, DTYPES[dtype_name])
    with torch.inference_mode():
        return _bench_loaded(ours, ref, dtype_name, prompt_len, decode_prompt_len, decode_tokens, repeats, warmup,
                             seed, do_generate, profile, gguf)


def _bench_loaded(ours, ref, dtype_name, prompt_len, decode_prompt_len, decode_tokens, repeats, warmup, seed,
                  do_generate, profile, gguf=None) -> dict:
    dtype = DTYPES[dtype_name]
    cfg = ours.config
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=g)
    prompt = torch.randint(0, cfg.vocab_size, (1, decode_prompt_len), generator=g)
    res = {"dtype": dtype_name, "rows": [], "checks": {}, "details": {},
           "transformers_impl": {"attention": ref.config._attn_implementation,
                                 "experts": getattr(ref.config, "_experts_implementation", None)}}

    # identical weights: the two models' last-position logits agree
    a, b = _dsv3_prefill(ours, tokens).float(), _hf_prefill(ref, tokens).float()
    res["checks"]["prefill_logits_max_abs_diff"] = float((a - b).abs().max())
    res["checks"]["prefill_logits_max_abs"] = float(b.abs().max())
    res["checks"]["prefill_argmax_equal"] = bool(a.argmax(-1).eq(b.argmax(-1)).all())

    def row(name, unit, ours_v, ref_v, ours_runs=None, ref_runs=None):
        # ratio: of the two medians; paired: median of the run-by-run ratios (each pair ran back
        # to back, so it is the steadier figure when other processes load the machine)
        paired = statistics.median(x / y for x, y in zip(ours_runs, ref_runs)) if ours_runs else None
        res["rows"].append({"metric": name, "unit": unit, "dsv3": ours_v, "transformers": ref_v,
                            "ratio": ours_v / ref_v if ref_v else float("nan"), "paired_ratio": paired,
                            "dsv3_runs": ours_runs, "transformers_runs": ref_runs})

    def add(name, n_tokens, t_ours, t_ref):
        row(name, "tok/s", n_tokens / statistics.median(t_ours), n_tokens / statistics.median(t_ref),
            [n_tokens / t for t in t_ours], [n_tokens / t for t in t_ref])

    # prefill
    t_ours, t_ref = _interleaved(lambda: _dsv3_prefill(ours, tokens), lambda: _hf_prefill(ref, tokens),
                                 repeats, warmup)
    add(f"prefill B=1 S={prompt_len}", prompt_len, t_ours, t_ref)

    # decode: only the n single-token steps are timed (each run prefills its own fresh cache first)
    n = decode_tokens
    last = {}

    def dec_ours():
        sec, last["ours"], last["cache"] = _dsv3_decode(ours, prompt, n)
        return sec

    def dec_ref():
        sec, last["ref"], last["pkv"] = _hf_decode(ref, prompt, n)
        return sec

    t_ours, t_ref = _interleaved(dec_ours, dec_ref, repeats, warmup)
    add(f"decode B=1 (prompt {decode_prompt_len}, {n} steps)", n, t_ours, t_ref)
    toks_ours, toks_ref, cache, pkv = last["ours"], last["ref"], last["cache"], last["pkv"]
    agree = next((i for i, (x, y) in enumerate(zip(toks_ours, toks_ref)) if x != y), len(toks_ours))
    res["checks"]["decode_greedy_tokens_agree"] = f"{agree}/{len(toks_ours)}"

    # end-to-end generate (prefill of the decode prompt included)
    if do_generate:
        from dsv3 import generate

        plist = [prompt[0].tolist()]
        t_ours, t_ref = _interleaved(
            lambda: generate(ours, plist, n),
            lambda: ref.generate(prompt, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                 pad_token_id=0, attention_mask=torch.ones_like(prompt)),
            repeats, warmup)
        add(f"generate() B=1 (prompt {decode_prompt_len} + {n} new)", n, t_ours, t_ref)

    # KV cache: after the decode run each side holds prompt + n tokens (transformers' DynamicCache
    # holds exactly those; dsv3's preallocated slots are counted per slot)
    held = decode_prompt_len + n
    kb_ours, how_ours = dsv3_cache_bytes(cache, held, cfg.num_hidden_layers)
    kb_ref, how_ref = hf_cache_bytes(pkv, held, cfg.num_hidden_layers)
    row("KV cache per token per layer", "bytes", kb_ours, kb_ref)
    elem = torch.empty((), dtype=dtype).element_size()
    res["details"]["kv_formula"] = (f"(kv_lora_rank {cfg.kv_lora_rank} + qk_rope_head_dim {cfg.qk_rope_head_dim})"
                                    f" x {elem} B = {cfg.kv_cache_dim * elem} B")
    res["details"]["kv_dsv3"] = how_ours
    res["details"]["kv_transformers"] = (how_ref + f"; summed over layers / ({held} tokens x "
                                         f"{cfg.num_hidden_layers} layers)")
    res["checks"]["kv_dsv3_equals_formula"] = kb_ours == cfg.kv_cache_dim * elem

    if gguf is not None:
        res["llama_cpp"] = _bench_llama_cpp(gguf, ref, tokens, prompt, n, toks_ours, res["rows"], repeats, warmup)
    if profile:
        res["profile"] = profile_models(ours, ref, tokens, prompt, n)
    del ours, ref
    return res


def _bench_llama_cpp(gguf, ref, tokens, prompt, n, toks_ours, rows, repeats, warmup) -> dict:
    """llama.cpp against transformers, interleaved run by run as dsv3 was: prefill of the same tokens
    and n greedy decode steps after the same prompt. dsv3 / llama.cpp is the quotient of the two
    paired ratios (each measured against transformers in its own pass)."""
    from dsv3.commands.llamacpp import LlamaCpp

    lc = LlamaCpp(gguf, n_ctx=max(tokens.shape[1], prompt.shape[1] + n + 1), threads=torch.get_num_threads())
    out = {"rows": []}
    last = {}
    try:
        plist, tlist = prompt[0].tolist(), tokens[0].tolist()

        def dec_lc():
            last["toks"], sec = lc.greedy(plist, n + 1)  # the first token comes with the prefill, untimed
            return sec

        passes = (("prefill", tokens.shape[1], lambda: lc.prefill(tlist), lambda: _hf_prefill(ref, tokens)),
                  ("decode", n, dec_lc, lambda: _hf_decode(ref, prompt, n)[0]))
        for what, count, fn_lc, fn_ref in passes:
            dsv3_row = next(r for r in rows if r["metric"].startswith(what))
            t_lc, t_ref = _interleaved(fn_lc, fn_ref, repeats, warmup)
            lc_v, ref_v = count / statistics.median(t_lc), count / statistics.median(t_ref)
            paired = statistics.median(b / a for a, b in zip(t_lc, t_ref))  # tokens/s ratio run by run
            out["rows"].append({"metric": f"llama.cpp {what}", "llama_cpp": lc_v, "transformers": ref_v,
                                "ratio": lc_v / ref_v, "paired_ratio": paired,
                                "dsv3_over_llama_cpp": dsv3_row["paired_ratio"] / paired,
                                "llama_cpp_runs": [count / t for t in t_lc]})
        agree = next((i for i, (x, y) in enumerate(zip(last["toks"], toks_ours)) if x != y), len(toks_ours))
        out["greedy_tokens_agree_with_dsv3"] = f"{agree}/{len(toks_ours)}"
    finally:
        lc.close()
    return out


# ---------------------------------------------------------------- where the time goes

CATEGORIES = (
    "embed",
    "norms (attn_norm, ffn_norm, final norm)",
    "attn projections (q/kv down+up, q/kv norms, wo)",
    "attn core (rope, scores, softmax, values, cache)",
    "dense MLP (first_k_dense_replace layers)",
    "moe gate (scores + group-limited top-k)",
    "moe routed experts (dispatch + 3 GEMMs + combine)",
    "moe shared expert",
    "head (vocab projection)",
)


def dsv3_categories(model) -> dict:
    """module -> category for the timing hooks. Hooks nest, so each category gets its exclusive
    time: e.g. the MoE module's own time, less gate and shared expert, is the routed experts
    (Experts.forward_grouped is a method call, not a module call, so it has no hook of its own)."""
    from dsv3.model.moe import MoE

    e, no, pr, co, de, ga, ro, sh, hd = CATEGORIES
    cats = {model.embed: e, model.norm: no, model.head: hd}
    for layer in model.layers:
        cats[layer.attn_norm] = cats[layer.ffn_norm] = no
        cats[layer.attn] = co
        for m in layer.attn.children():  # wq_a, q_norm, wq_b, wkv_a, kv_norm, wkv_b, wo
            cats[m] = pr
        if isinstance(layer.ffn, MoE):
            # MoE.forward calls gate.scores / gate.route / experts.forward_grouped as methods, not
            # modules: they are timed through instance-level wrappers (see _Timer)
            cats[layer.ffn] = ro
            cats[(layer.ffn.gate, "scores")] = cats[(layer.ffn.gate, "route")] = ga
            cats[(layer.ffn.experts, "forward_grouped")] = cats[(layer.ffn.experts, "forward_loop")] = ro
            if layer.ffn.shared_experts is not None:
                cats[layer.ffn.shared_experts] = sh
        else:
            cats[layer.ffn] = de
    return cats


def hf_categories(model) -> dict:
    """The same categories on transformers' DeepseekV3ForCausalLM / DeepseekV2ForCausalLM."""
    e, no, pr, co, de, ga, ro, sh, hd = CATEGORIES
    inner = model.model
    cats = {inner.embed_tokens: e, inner.norm: no, model.lm_head: hd}
    for layer in inner.layers:
        cats[layer.input_layernorm] = cats[layer.post_attention_layernorm] = no
        cats[layer.self_attn] = co
        for m in layer.self_attn.children():  # q_a_proj, q_a_layernorm, q_b_proj, kv_a_proj_with_mqa, ...
            if not hasattr(m, "inv_freq"):
                cats[m] = pr
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            cats[mlp], cats[mlp.experts], cats[mlp.gate] = ro, ro, ga
            if getattr(mlp, "shared_experts", None) is not None:
                cats[mlp.shared_experts] = sh
        else:
            cats[mlp] = de
    return cats


class _Timer:
    """Adds up each category's exclusive wall time while `active`: forward hooks on modules, and
    instance-level wrappers for (object, method name) keys, removed again by remove()."""

    def __init__(self, cats: dict):
        self.cats, self.excl, self.stack, self.active = cats, {}, [], False
        self.handles, self.patched = [], []
        for key, cat in cats.items():
            if isinstance(key, tuple):
                obj, name = key
                self.patched.append((obj, name))
                setattr(obj, name, self._wrap(getattr(obj, name), cat))  # shadows the class method
            else:
                self.handles += [key.register_forward_pre_hook(self._pre), key.register_forward_hook(self._post)]

    def _wrap(self, fn, cat):
        def timed(*args, **kwargs):
            self._enter(cat)
            try:
                return fn(*args, **kwargs)
            finally:
                self._exit()
        return timed

    def _enter(self, cat):
        self.stack.append([cat, time.perf_counter(), 0.0])  # category, start, time in children

    def _exit(self):
        cat, t0, child = self.stack.pop()
        dt = time.perf_counter() - t0
        if self.active:
            self.excl[cat] = self.excl.get(cat, 0.0) + dt - child
        if self.stack:
            self.stack[-1][2] += dt

    def _pre(self, m, _args):
        self._enter(self.cats[m])

    def _post(self, m, _args, _out):
        self._exit()

    def measure(self, fn) -> tuple[float, dict]:
        """Runs fn once with the hooks counting: (wall seconds, {category: seconds})."""
        self.excl, self.active = {}, True
        t0 = time.perf_counter()
        try:
            fn()
        finally:
            self.active = False
        return time.perf_counter() - t0, dict(self.excl)

    def remove(self):
        for h in self.handles:
            h.remove()
        for obj, name in self.patched:
            del obj.__dict__[name]


def _breakdown(wall: float, excl: dict, per: int) -> dict:
    """ms per `per` (steps) for each category, plus the rest of the wall time as python glue."""
    out = {c: 1e3 * excl.get(c, 0.0) / per for c in CATEGORIES}
    out["other (python glue between modules: loop, residual adds, mask/rope tables, argmax)"] = \
        1e3 * (wall - sum(excl.values())) / per
    out["total"] = 1e3 * wall / per
    return out


def _shapes(shapes) -> str:
    return " ".join("x".join(map(str, sh)) for sh in (shapes or []) if sh)


def _top_ops(fn, per: int, k: int = 15) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    ev = [e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in ev) or 1
    top = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:k]
    return {"aten_calls_per_step": sum(e.count for e in ev) / per,
            "ops": [{"op": e.key, "shapes": _shapes(e.input_shapes), "calls_per_step": e.count / per,
                     "self_ms_per_step": e.self_cpu_time_total / 1e3 / per,
                     "share": e.self_cpu_time_total / total} for e in top]}


def profile_models(ours, ref, tokens, prompt, n: int, prefill_runs: int = 3) -> dict:
    """Per-category exclusive time of a prefill and of a decode step, dsv3 and transformers side by
    side (forward hooks + perf_counter, after the benchmark's own warm runs), and dsv3's top aten
    ops by self CPU time (torch.profiler, with input shapes)."""
    P = prompt.shape[1]
    out = {}
    t_ours, t_ref = _Timer(dsv3_categories(ours)), _Timer(hf_categories(ref))
    try:
        # prefill: of `prefill_runs` alternating runs per side, the breakdown of the run with the median total
        runs = {"dsv3": [], "transformers": []}
        for _ in range(prefill_runs):
            runs["dsv3"].append(t_ours.measure(lambda: _dsv3_prefill(ours, tokens)))
            runs["transformers"].append(t_ref.measure(lambda: _hf_prefill(ref, tokens)))
        out["prefill"] = {side: _breakdown(*sorted(r, key=lambda we: we[0])[len(r) // 2], 1)
                          for side, r in runs.items()}

        cache, tok = _dsv3_prefill_cache(ours, prompt, n)
        w, ex = t_ours.measure(lambda: _dsv3_steps(ours, cache, tok, P, n))
        out["decode"] = {"dsv3": _breakdown(w, ex, n)}
        first = ref(input_ids=prompt, use_cache=True, logits_to_keep=1)
        state = {"pkv": first.past_key_values, "tok": first.logits[:, -1].argmax(-1)}

        def hf_steps():
            for _ in range(n):
                o = ref(input_ids=state["tok"][:, None], past_key_values=state["pkv"], use_cache=True)
                state["pkv"], state["tok"] = o.past_key_values, o.logits[:, -1].argmax(-1)

        w, ex = t_ref.measure(hf_steps)
        out["decode"]["transformers"] = _breakdown(w, ex, n)
    finally:
        t_ours.remove()
        t_ref.remove()
    cache, tok = _dsv3_prefill_cache(ours, prompt, n)
    out["dsv3_decode_top_ops"] = _top_ops(lambda: _dsv3_steps(ours, cache, tok, P, n), n)
    out["dsv3_prefill_top_ops"] = _top_ops(lambda: _dsv3_prefill(ours, tokens), 1)
    out["decode_steps"] = n
    return out


# ---------------------------------------------------------------- output

def machine_info(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    import transformers

    from dsv3.kernels import cpu as cpu_kernels

    reason = cpu_kernels.unavailable_reason()
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu,
            "cores": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), "loadavg": load,
            "dsv3_cpu_kernels": "on" if reason is None else f"off ({reason})"}


def format_table(res: dict) -> str:
    lines = [f"dtype {res['dtype']}  (transformers: attention={res['transformers_impl']['attention']}, "
             f"experts={res['transformers_impl']['experts']})"]
    head = f"{'metric':<42} {'unit':>6} {'dsv3':>12} {'transformers':>13} {'dsv3/transformers':>18} {'paired':>7}"
    lines += [head, "-" * len(head)]
    for r in res["rows"]:
        fmt = (lambda v: f"{v:12.1f}") if r["unit"] == "tok/s" else (lambda v: f"{v:12.0f}")
        paired = f"{r['paired_ratio']:6.2f}x" if r["paired_ratio"] is not None else f"{'-':>7}"
        lines.append(f"{r['metric']:<42} {r['unit']:>6} {fmt(r['dsv3'])} {fmt(r['transformers']):>13} "
                     f"{r['ratio']:17.2f}x {paired}")
    c = res["checks"]
    lines.append(f"checks: last-position logits max |diff| {c['prefill_logits_max_abs_diff']:.2e} "
                 f"(max |logit| {c['prefill_logits_max_abs']:.2e}), same argmax: {c['prefill_argmax_equal']}, "
                 f"greedy decode tokens agree for {c['decode_greedy_tokens_agree']} steps, "
                 f"KV bytes == formula: {c['kv_dsv3_equals_formula']}")
    for k, v in res["details"].items():
        lines.append(f"  {k}: {v}")
    if "llama_cpp" in res:
        lc = res["llama_cpp"]
        lines.append(f"llama.cpp on the same checkpoint (GGUF from llama.cpp's converter; its own pass against "
                     f"transformers); greedy tokens agree with dsv3's for {lc['greedy_tokens_agree_with_dsv3']} steps")
        head = f"{'metric':<42} {'unit':>6} {'llama.cpp':>12} {'transformers':>13} {'llama.cpp/tf':>18} {'paired':>7} " \
               f"{'dsv3/llama.cpp':>15}"
        lines += [head, "-" * len(head)]
        for r in lc["rows"]:
            lines.append(f"{r['metric']:<42} {'tok/s':>6} {r['llama_cpp']:12.1f} {r['transformers']:13.1f} "
                         f"{r['ratio']:17.2f}x {r['paired_ratio']:6.2f}x {r['dsv3_over_llama_cpp']:14.2f}x")
    if "profile" in res:
        lines.append(format_profile(res["profile"]))
    return "\n".join(lines)


def format_profile(p: dict) -> str:
    lines = [f"where the time goes (ms; exclusive time per module category via forward hooks; "
             f"decode = per step, mean of {p['decode_steps']} steps; prefill = the median of 3 runs; the hooks "
             f"turn dsv3's fused CPU decode blocks off, so its decode column is the step through the modules)",
             f"{'category':<84} {'decode dsv3':>11} {'decode tf':>10} {'prefill dsv3':>13} {'prefill tf':>11}"]
    d, f = p["decode"], p["prefill"]
    for c in d["dsv3"]:
        lines.append(f"{c:<84} {d['dsv3'][c]:11.2f} {d['transformers'][c]:10.2f} "
                     f"{f['dsv3'][c]:13.1f} {f['transformers'][c]:11.1f}")
    for key, what in (("dsv3_decode_top_ops", "decode step"), ("dsv3_prefill_top_ops", "prefill")):
        t = p[key]
        lines.append(f"dsv3 {what}: top aten ops by self CPU time (torch.profiler; "
                     f"{t['aten_calls_per_step']:.0f} aten calls, nested ones included)")
        for o in t["ops"]:
            lines.append(f"  {o['self_ms_per_step']:9.3f} ms {100 * o['share']:5.1f}% "
                         f"{o['calls_per_step']:8.1f} calls  {o['op']} {o['shapes']}")
    return "\n".join(lines)


def _check_args(args):
    for name in ("prompt_len", "decode_prompt_len", "decode_tokens", "repeats", "threads"):
        if getattr(args, name) is None or getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")


def run(args):
    _check_args(args)
    from dsv3.config import PRESETS, ModelConfig

    torch.set_num_threads(args.threads)
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    converter = None
    if args.llama_cpp:
        from dsv3.commands import llamacpp

        converter = llamacpp.require(args.llama_cpp_converter)
    with tempfile.TemporaryDirectory(prefix="dsv3-bench-") as tmp:
        if args.model is not None:
            if not os.path.isdir(args.model):
                raise ValueError(f"--model {args.model}: not a checkpoint folder")
            path, cfg, source = args.model, ModelConfig.from_hf(args.model), f"checkpoint {args.model}"
        else:
            name = args.preset or "small"
            if name not in PRESETS:
                raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
            path = random_checkpoint(name, os.path.join(tmp, name), args.seed)
            cfg, source = ModelConfig.from_hf(path), f"preset {name} (random weights, seed {args.seed})"
        longest = max(args.prompt_len, args.decode_prompt_len + args.decode_tokens + 1)
        if longest > cfg.max_position_embeddings:
            raise ValueError(f"{longest} positions exceed max_position_embeddings={cfg.max_position_embeddings}")
        info = machine_info(args.threads)
        counts = cfg.num_params()
        print(f"dsv3 bench: {source}; {counts['total'] / 1e6:.1f}M parameters "
              f"({counts['active'] / 1e6:.1f}M activated per token), vocab {cfg.vocab_size}, "
              f"{cfg.num_hidden_layers} layers")
        print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
        print(f"medians of {args.repeats} runs after {args.warmup} warmup; ratios are dsv3 / transformers\n")
        results = []
        for d in dtypes:
            gguf = None
            if converter is not None:
                gguf = llamacpp.convert(path, os.path.join(tmp, f"gguf-{d}"), converter,
                                        outtype={"fp32": "f32", "bf16": "bf16"}[d])
            res = bench_dtype(path, d, args.prompt_len, args.decode_prompt_len, args.decode_tokens, args.repeats,
                              args.warmup, args.seed, do_generate=not args.no_generate, profile=args.profile,
                              gguf=gguf)
            results.append(res)
            print(format_table(res), end="\n\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"source": source, "machine": info, "args": {k: v for k, v in vars(args).items()
                                                                   if not k.startswith("_")},
                       "results": results}, f, indent=2)
    return 0
