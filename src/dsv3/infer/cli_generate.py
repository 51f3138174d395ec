"""`dsv3 generate --model DIR --prompt TEXT [sampling flags] [--speculative mtp]`: stream a completion
of one prompt through the engine. The shared flag helpers are used by `dsv3 chat` too."""
import argparse
import os
import sys
import time

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_flags(p: argparse.ArgumentParser):
    p.add_argument("--model", required=True, help="checkpoint folder (config.json + safetensors + tokenizer.json)")
    p.add_argument("--dtype", default="auto", choices=["auto", *_DTYPES],
                   help="weights and cache dtype (auto: the checkpoint's torch_dtype)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--speculative", choices=["mtp"], default=None,
                   help="MTP speculative decoding: the model's MTP module drafts, one forward verifies")
    p.add_argument("--cache-memory-mb", type=int, default=512, help="latent cache budget in MiB")
    p.add_argument("--block-size", type=int, default=16, help="tokens per cache block")
    p.add_argument("--stats", action="store_true", help="print tokens/s (and MTP acceptance) to stderr")


def add_sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int = 128):
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI presence penalty in [-2, 2]")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI frequency penalty in [-2, 2]")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL repetition penalty (1 = off)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stop-id", action="append", type=int, default=[], help="stop token id (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")


def configure(p: argparse.ArgumentParser):
    add_model_flags(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="prompt text")
    g.add_argument("--prompt-ids", help="prompt as comma-separated token ids (prints ids; no tokenizer needed)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn with the chat template")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    add_sampling_flags(p)
    from dsv3.parallel.dist import add_parallel_arguments

    # `torchrun --nproc-per-node 2 -m dsv3 generate ... --tp 2` (or --ep 2, --pp 2; docs/parallel.md)
    add_parallel_arguments(p)


def _parallel(args) -> bool:
    """True when torchrun's processes run this command in parallel (--tp N, --ep N or --pp N): rank 0
    runs the only Engine and prints, the other ranks replay its forwards on their shard or pipeline
    stage (dsv3.infer.lockstep.run_parallel). ValueError for what is not supported."""
    if not hasattr(args, "tp"):
        return False  # a command without the parallel flags (dsv3 chat)
    if getattr(args, "dp", None) not in (None, 1):
        raise ValueError("--dp: dsv3 generate serves one prompt; data-parallel replicas would only repeat it "
                         "(use --tp, --ep or --pp)")
    from dsv3.infer.lockstep import check_parallel_args

    return check_parallel_args(args, "generate")


def sampling_params(args):
    from dsv3.infer.params import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty, stop_token_ids=list(args.stop_id), ignore_eos=args.ignore_eos)


def load_tokenizer(path):
    from dsv3.tokenizer import Tokenizer

    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise ValueError(f"{path} has no tokenizer.json: pass --prompt-ids, or add the tokenizer files")
    return Tokenizer.from_dir(path)


def _model_dtype(args):
    """The checkpoint's config and the weights' dtype; ValueError for a bad folder or flag."""
    from dsv3.config import ModelConfig

    if not os.path.isdir(args.model):
        raise ValueError(f"--model {args.model!r} is not a folder")
    cfg = ModelConfig.from_hf(args.model)
    dtype = _DTYPES.get(cfg.torch_dtype, torch.float32) if args.dtype == "auto" else _DTYPES[args.dtype]
    if args.speculative == "mtp" and cfg.num_nextn_predict_layers < 1:
        raise ValueError(f"--speculative mtp: the model in {args.model} has no MTP layer")
    return cfg, dtype


def load_engine(args, model=None):
    """The Engine of args; model: rank 0's LockstepModel under torchrun (attached here), else the
    checkpoint is loaded in this process."""
    import dsv3
    from dsv3.infer.engine import Engine
    from dsv3.infer.lockstep import LockstepModel, attach

    if args.threads:
        torch.set_num_threads(args.threads)
    _, dtype = _model_dtype(args)
    if model is None:
        model = dsv3.load_model(args.model, dtype=dtype, device=args.device).eval()
    engine = Engine(model, block_size=args.block_size, cache_memory=args.cache_memory_mb << 20,
                    speculative=args.speculative, max_num_seqs=8)
    if isinstance(model, LockstepModel):
        attach(engine)  # the other ranks build their cache and follow this engine's forwards
    return engine


def print_stats(engine, n_tokens: int, seconds: float, file=None):
    s = engine.stats()
    line = f"[{n_tokens} tokens in {seconds:.2f} s, {n_tokens / max(seconds, 1e-9):.1f} tokens/s"
    if s.spec.steps:
        line += f", MTP acceptance {s.spec.acceptance_rate:.1%}, {s.spec.mean_accepted_length:.2f} tokens/step"
    if s.prefix_cache_hits:
        line += f", prefix cache {s.prefix_cache_hits}/{s.prefix_cache_queries} prompt tokens"
    print(line + "]", file=sys.stderr if file is None else file, flush=True)


def stream_text(engine, tok, prompt_ids, params, stop_strings, out=None) -> tuple[str, int, float]:
    """Stream a completion as text; returns (text, tokens generated, seconds)."""
    out = sys.stdout if out is None else out
    from dsv3.infer.params import StopOnText
    from dsv3.tokenizer import IncrementalDetokenizer

    if tok.eos_id is not None and not params.ignore_eos:
        params.stop_token_ids = list(params.stop_token_ids) + [tok.eos_id]
    checker = StopOnText(IncrementalDetokenizer(tok, skip_special_tokens=True), stop_strings or [])
    t0, n = time.perf_counter(), 0
    for o in engine.stream(prompt_ids, params, stop_checker=checker):
        n += len(o.new_token_ids)  # the engine already ran the checker (the detokenizer) on them
        if o.finished:
            checker.finish()
        out.write(checker.take())
        out.flush()
    return checker.text, n, time.perf_counter() - t0


def run(args):
    if _parallel(args):
        from dsv3.infer.lockstep import run_parallel

        _model_dtype(args)  # bad flags fail on every rank before any process group is made
        return run_parallel(args, lambda model: _run(args, load_engine(args, model)))
    return _run(args, load_engine(args))


def _run(args, engine):
    params = sampling_params(args)
    if args.prompt_ids is not None:
        try:
            ids = [int(x) for x in args.prompt_ids.replace(" ", "").split(",") if x]
        except ValueError:
            raise ValueError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
        if args.stop:
            raise ValueError("--stop needs text: use --prompt (with a tokenizer) or --stop-id")
        t0, n = time.perf_counter(), 0
        for o in engine.stream(ids, params):
            n += len(o.new_token_ids)
            if o.new_token_ids:
                print(" ".join(map(str, o.new_token_ids)), end=" ", flush=True)
        print()
        if args.stats:
            print_stats(engine, n, time.perf_counter() - t0)
        return 0
    tok = load_tokenizer(args.model)
    if args.chat:
        msgs = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": args.prompt}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    else:
        ids = tok.encode(args.prompt, add_bos=bool(tok.config.get("add_bos_token")) and tok.bos_id is not None)
    _, n, dt = stream_text(engine, tok, ids, params, args.stop)
    print()
    if args.stats:
        print_stats(engine, n, dt)
    return 0
