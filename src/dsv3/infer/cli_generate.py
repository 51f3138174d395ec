"""`dsv3 generate --model DIR --prompt TEXT [sampling flags] [--speculative mtp]`: stream a completion
of one prompt through the engine. The shared flag helpers are used by `dsv3 chat` too.

`dsv3 generate --model DIR --prompts-file FILE [--output OUT]`: offline batch generation. Every
prompt of FILE goes into ONE Engine at once and the engine's continuous batching runs them together
(the offline mode of vLLM's `LLM.generate`); the results are written as JSONL in input order. Under
torchrun, `--dp N` runs N whole-model replicas: rank r takes the prompts with index % N == r, runs
them through its own Engine, and rank 0 gathers the records and writes the one output file.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dsv3.infer.params import SamplingParams

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FP8_HELP = ("keep the release's FP8 set (attention and MLP projections, experts) in FP8 in memory, about half of bf16 "
            "(dsv3.fp8.resident; a bf16 checkpoint is quantized while loading); the rest in --dtype")


def load_checkpoint(args, path, dtype):
    """The model of a checkpoint folder for inference, FP8-resident with args.fp8."""
    import dsv3

    return dsv3.load_model(path, dtype=dtype, device=args.device, fp8=getattr(args, "fp8", False)).eval()


def refuse_fp8_for_ranks(args, model):
    """--fp8 loads the model in this process; under torchrun the ranks load their shards themselves."""
    if model is not None and getattr(args, "fp8", False):
        raise ValueError("--fp8 is not supported with --tp, --ep or --pp (each rank loads its own shard)")


def add_model_flags(p: argparse.ArgumentParser):
    p.add_argument("--model", required=True, help="checkpoint folder (config.json + safetensors + tokenizer.json)")
    p.add_argument("--dtype", default="auto", choices=["auto", *_DTYPES],
                   help="weights and cache dtype (auto: the checkpoint's torch_dtype)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--fp8", action="store_true", help=FP8_HELP)
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
    g.add_argument("--prompts-file", help="batch generation: a text file with one prompt per line, or JSONL with "
                                          "one object per line: {\"prompt\": TEXT} or {\"prompt_ids\": [ids]}, "
                                          "optionally \"max_new_tokens\", \"temperature\", \"seed\" "
                                          "(docs/engine.md, 'Batch generation')")
    p.add_argument("--prompts-format", choices=("auto", "text", "jsonl"), default="auto",
                   help="format of --prompts-file (auto: JSONL for a .jsonl or .ndjson name, text otherwise)")
    p.add_argument("--output", default=None,
                   help="with --prompts-file: write the JSONL results here (atomically) instead of to stdout")
    p.add_argument("--max-batch", type=int, default=64,
                   help="requests the engine runs together at most (the rest wait for a free slot)")
    p.add_argument("--no-progress", action="store_true", help="with --prompts-file: no progress bar on stderr")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt (each text prompt of --prompts-file) as one user turn with the chat template")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    add_sampling_flags(p)
    from dsv3.parallel.dist import add_parallel_arguments

    # `torchrun --nproc-per-node 2 -m dsv3 generate ... --tp 2` (or --ep 2, --pp 2; docs/parallel.md), and
    # `torchrun --nproc-per-node 2 -m dsv3 generate --prompts-file FILE --dp 2` (data-parallel batch generation)
    add_parallel_arguments(p)


def _parallel(args) -> bool:
    """True when torchrun's processes run this command in parallel (--tp N, --ep N or --pp N): rank 0
    runs the only Engine and prints, the other ranks replay its forwards on their shard or pipeline
    stage (dsv3.infer.lockstep.run_parallel). ValueError for what is not supported."""
    if not hasattr(args, "tp"):
        return False  # a command without the parallel flags (dsv3 chat)
    if getattr(args, "dp", None) not in (None, 1):
        raise ValueError("--dp: dsv3 generate serves one prompt with --prompt/--prompt-ids, which data-parallel "
                         "replicas would only repeat; for batch generation over replicas pass --prompts-file FILE "
                         "(or use --tp, --ep or --pp for one prompt)")
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
    from dsv3.infer.engine import Engine
    from dsv3.infer.lockstep import LockstepModel, attach

    if args.threads:
        torch.set_num_threads(args.threads)
    _, dtype = _model_dtype(args)
    refuse_fp8_for_ranks(args, model)
    if model is None:
        model = load_checkpoint(args, args.model, dtype)
    max_batch = getattr(args, "max_batch", 8)  # dsv3 chat has no --max-batch: one conversation at a time
    if max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {max_batch}")
    engine = Engine(model, block_size=args.block_size, cache_memory=args.cache_memory_mb << 20,
                    speculative=args.speculative, max_num_seqs=max_batch)
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
    if getattr(args, "prompts_file", None) is not None:
        return run_batch(args)
    if args.output is not None:
        raise ValueError("--output goes with --prompts-file (one --prompt prints its completion to stdout)")
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


# ---------------------------------------------------------------------------- batch generation

# what one JSONL line may hold: the prompt (text or token ids) and the per-line overrides of the flags
LINE_KEYS = ("prompt", "prompt_ids", "max_new_tokens", "temperature", "seed")
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


@dataclass
class BatchItem:
    index: int                      # position among the prompts (0-based): the order of the output
    line: int                       # 1-based line number in the prompts file
    text: str | None                # the prompt text as given (None for prompt_ids)
    given_ids: list[int] | None     # the prompt_ids as given
    ids: list[int]                  # what the engine gets (tokenized; chat template applied with --chat)
    params: "SamplingParams"        # the flags' params with this line's overrides


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not a token count


def _prompts_format(args) -> str:
    if args.prompts_format != "auto":
        return args.prompts_format
    return "jsonl" if args.prompts_file.lower().endswith((".jsonl", ".ndjson")) else "text"


def _read_lines(path) -> list[tuple[int, str]]:
    """(line number, line) of every non-blank line of path; ValueError for a missing, non-UTF-8 or
    empty file."""
    if not os.path.isfile(path):
        raise ValueError(f"--prompts-file {path!r} is not a file")
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None
    if text.startswith("\ufeff"):  # a byte-order mark some editors write; not part of the first prompt
        text = text[1:]
    # split on "\n" only: str.splitlines would also cut a prompt at \x0b, \x0c, \x1c-\x1e or U+2028
    out = []
    for n, line in enumerate(text.split("\n"), 1):
        line = line[:-1] if line.endswith("\r") else line
        if line.strip():
            out.append((n, line))
    if not out:
        raise ValueError(f"{path}: no prompts (the file is empty or has only blank lines)")
    return out


def _parse_jsonl_line(where: str, line: str, vocab_size: int) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object such as {{\"prompt\": \"...\"}}, got "
                         f"{_JSON_TYPES.get(type(obj), type(obj).__name__)}")
    unknown = [k for k in obj if k not in LINE_KEYS]
    if unknown:
        raise ValueError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(map(repr, unknown))}; a line may hold {', '.join(LINE_KEYS)}")
    if "prompt" not in obj and "prompt_ids" not in obj:
        raise ValueError(f"{where}: missing \"prompt\" (text) or \"prompt_ids\" (token ids)")
    if "prompt" in obj and "prompt_ids" in obj:
        raise ValueError(f"{where}: give \"prompt\" or \"prompt_ids\", not both")
    if "prompt" in obj and not isinstance(obj["prompt"], str):
        raise ValueError(f"{where}: \"prompt\" must be a string, got {_JSON_TYPES.get(type(obj['prompt']))}")
    if "prompt_ids" in obj:
        ids = obj["prompt_ids"]
        if not isinstance(ids, list) or not ids or not all(_is_int(t) for t in ids):
            raise ValueError(f"{where}: \"prompt_ids\" must be a non-empty array of integer token ids")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{where}: \"prompt_ids\" holds {bad[0]}, outside the vocabulary [0, {vocab_size})")
    for key, ok, what in (("max_new_tokens", _is_int, "an integer"), ("seed", _is_int, "an integer"),
                          ("temperature", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                           "a number")):
        if key in obj and not ok(obj[key]):
            raise ValueError(f"{where}: \"{key}\" must be {what}, got {json.dumps(obj[key])}")
    return obj


def read_prompts(args, cfg, tok) -> list[BatchItem]:
    """The prompts of args.prompts_file, tokenized and with their sampling params, every one checked
    (ValueError naming file and line) before any model work."""
    import dataclasses

    from dsv3.infer.engine import check_request

    path, fmt = args.prompts_file, _prompts_format(args)
    lines = _read_lines(path)
    V, max_len = cfg.vocab_size, cfg.max_position_embeddings  # the Engine's context (load_engine sets no other)
    base = sampling_params(args)
    objs = [_parse_jsonl_line(f"{path}:{n}", line, V) for n, line in lines] if fmt == "jsonl" else \
        [{"prompt": line} for _, line in lines]
    texts = [o.get("prompt") for o in objs]
    if any(t is not None for t in texts) and tok is None:
        n = lines[next(i for i, t in enumerate(texts) if t is not None)][0]
        raise ValueError(f"{path}:{n}: a text prompt needs the tokenizer, and {args.model} has no tokenizer.json "
                         f"(give \"prompt_ids\" in a JSONL file, or add the tokenizer files)")
    add_bos = tok is not None and bool(tok.config.get("add_bos_token")) and tok.bos_id is not None
    if args.chat:
        for (n, _), o in zip(lines, objs):
            if "prompt_ids" in o:
                raise ValueError(f"{path}:{n}: --chat wraps text prompts in the chat template; this line gives "
                                 f"\"prompt_ids\" (already tokenized)")
        sys_turn = [{"role": "system", "content": args.system}] if args.system else []
        encoded = [tok.apply_chat_template(sys_turn + [{"role": "user", "content": t}], add_generation_prompt=True,
                                           tokenize=True) for t in texts]
    else:
        plain = [t for t in texts if t is not None]
        it = iter(tok.encode_batch(plain, add_bos=add_bos) if plain else [])
        encoded = [next(it) if t is not None else None for t in texts]
    items = []
    for i, ((n, _), o, ids) in enumerate(zip(lines, objs, encoded)):
        where = f"{path}:{n}"
        ids = list(o["prompt_ids"]) if ids is None else list(ids)
        over = {k: o[k] for k in ("max_new_tokens", "temperature", "seed") if k in o}
        if "seed" not in over and base.seed is not None:
            # --seed S: line i samples with seed S + i, so its result is what `--prompt` with --seed S+i
            # gives, whichever replica runs it and whatever else is in the batch
            over["seed"] = base.seed + i
        params = dataclasses.replace(base, stop_token_ids=list(base.stop_token_ids), **over)
        try:  # the engine's own checks (the cache budget aside: the engine queues what does not fit now)
            check_request(ids, params, V, max_len, block_size=1, usable_blocks=sys.maxsize)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        items.append(BatchItem(i, n, o.get("prompt"), o.get("prompt_ids"), ids, params))
    return items


def _check_output_path(out):
    if out is None:
        return
    folder = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        raise ValueError(f"--output {out!r} is a folder; give a file name")
    if not os.path.isdir(folder):
        raise ValueError(f"--output {out!r}: the folder {folder} does not exist")


def write_atomic(path, lines) -> None:
    """Write the lines to path through a temporary file in the same folder and one rename: path holds
    either its old content or all the new lines, never part of them (a crash, or a reader meanwhile)."""
    path = os.path.abspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; the result should look like any new file
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX within one file system
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _add_requests(args, engine, tok, items) -> dict:
    """Queue every item in the engine (nothing runs yet); request id -> [item, stop checker, tokens].
    ValueError naming the line for a request the engine refuses (e.g. larger than the cache)."""
    from dsv3.infer.params import StopOnText
    from dsv3.tokenizer import IncrementalDetokenizer

    state = {}
    for it in items:
        params = it.params
        if tok is not None and tok.eos_id is not None and not params.ignore_eos:
            params.stop_token_ids = list(params.stop_token_ids) + [tok.eos_id]  # as with --prompt (stream_text)
        checker = StopOnText(IncrementalDetokenizer(tok, skip_special_tokens=True), args.stop) \
            if tok is not None else None
        try:
            rid = engine.add_request(it.ids, params, stop_checker=checker)
        except ValueError as e:
            err = ValueError(f"{args.prompts_file}:{it.line}: {e}")
            err.line = it.line  # --dp: the replicas' refusals are reported first line first
            raise err from None
        state[rid] = [it, checker, []]
    return state


def _run_requests(engine, state, bar) -> list[dict]:
    """Step the engine until every queued request finished; one output record per request."""
    records = []
    while len(records) < len(state):
        for o in engine.step():
            st = state.get(o.request_id)
            if st is None:
                continue
            st[2].extend(o.new_token_ids)
            if o.finished:
                records.append(_record(st[0], st[1], st[2], o.finish_reason))
                bar.update(1)
    return records


def _record(it: BatchItem, checker, tokens: list[int], finish_reason: str) -> dict:
    rec = {"index": it.index, "line": it.line}
    if it.text is not None:
        rec["prompt"] = it.text
    else:
        rec["prompt_ids"] = it.given_ids
    if checker is not None:
        checker.finish()
        rec["completion"] = checker.text  # skip_special_tokens; cut before a --stop string
    rec["token_ids"] = tokens
    rec["finish_reason"] = finish_reason
    rec["usage"] = {"prompt_tokens": len(it.ids), "completion_tokens": len(tokens)}
    return rec


def _progress(args, total: int, desc: str | None = None, enabled: bool = True):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="prompt", file=sys.stderr, disable=args.no_progress or not enabled,
                dynamic_ncols=True)


def _emit(args, records: list[dict]) -> None:
    lines = (json.dumps(r, ensure_ascii=False) for r in sorted(records, key=lambda r: r["index"]))
    if args.output is None:
        for line in lines:
            sys.stdout.write(line + "\n")
        sys.stdout.flush()
    else:
        write_atomic(args.output, lines)


def _print_batch_stats(records: list[dict], seconds: float, stats: list) -> None:
    from dsv3.infer.speculative import SpecStats

    n = sum(r["usage"]["completion_tokens"] for r in records)
    line = f"[{len(records)} prompts, {n} tokens in {seconds:.2f} s, {n / max(seconds, 1e-9):.1f} tokens/s"
    if len(stats) > 1:
        line += f" over {len(stats)} replicas"
    spec = SpecStats(**{k: sum(getattr(s.spec, k) for s in stats) for k in vars(SpecStats())})
    if spec.steps:
        line += f", MTP acceptance {spec.acceptance_rate:.1%}, {spec.mean_accepted_length:.2f} tokens/step"
    hits, queries = sum(s.prefix_cache_hits for s in stats), sum(s.prefix_cache_queries for s in stats)
    if hits:
        line += f", prefix cache {hits}/{queries} prompt tokens"
    print(line + "]", file=sys.stderr, flush=True)


def _batch_mode(args) -> int:
    """Data-parallel replicas to run (1: this process alone), or 0 for the lockstep path (--tp/--ep/--pp
    under torchrun: one engine on rank 0). ValueError for what is not supported."""
    from dsv3.infer.lockstep import check_parallel_args

    tp, ep, pp, dp = args.tp, args.ep, args.pp, args.dp
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if max(tp, ep, pp) > 1:
        if dp not in (None, 1):
            flag = "tp" if tp > 1 else "ep" if ep > 1 else "pp"
            raise ValueError(f"--dp {dp} with --{flag}: replicas of a model-parallel group are not supported by "
                             f"dsv3 generate yet; use --dp N alone (each rank holds the whole model) or --{flag} "
                             f"alone")
        check_parallel_args(args, "generate")  # ValueError for a layout or world size it does not run
        return 0
    if dp is None:
        dp = world  # as for every command: --dp defaults to what is left of the world size
    if not _is_int(dp) or dp < 1:
        raise ValueError(f"--dp must be a positive integer, got {dp!r}")
    if dp != world:
        raise ValueError(f"--dp {dp}: launch it under torchrun with {dp} processes (torchrun --nproc-per-node {dp} "
                         f"-m dsv3 generate --prompts-file ... --dp {dp}), got a world size of {world}")
    return dp


def run_batch(args):
    """`dsv3 generate --prompts-file FILE`: every check first (flags, model folder, the whole file), then
    one process, the lockstep path (--tp/--ep/--pp) or --dp replicas."""
    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
    _check_output_path(args.output)
    replicas = _batch_mode(args)
    cfg, _ = _model_dtype(args)
    have_tok = os.path.isfile(os.path.join(args.model, "tokenizer.json"))
    if (args.chat or args.stop) and not have_tok:
        raise ValueError(f"{'--chat' if args.chat else '--stop'} needs the tokenizer, and {args.model} has no "
                         f"tokenizer.json")
    tok = load_tokenizer(args.model) if have_tok else None
    if args.chat and tok.chat_template is None:
        raise ValueError(f"--chat: the tokenizer in {args.model} has no chat template")
    items = read_prompts(args, cfg, tok)
    if replicas == 0:
        from dsv3.infer.lockstep import run_parallel

        return run_parallel(args, lambda model: _batch_one_engine(args, items, tok, load_engine(args, model)))
    if replicas == 1:
        return _batch_one_engine(args, items, tok, load_engine(args))
    return _batch_dp(args, items, tok, replicas)


def _batch_one_engine(args, items, tok, engine) -> int:
    t0 = time.perf_counter()
    state = _add_requests(args, engine, tok, items)
    with _progress(args, len(items)) as bar:
        records = _run_requests(engine, state, bar)
    dt = time.perf_counter() - t0
    _emit(args, records)
    if args.stats:
        _print_batch_stats(records, dt, [engine.stats()])
    return 0


def _batch_dp(args, items, tok, n: int) -> int:
    """`--dp n` under torchrun: rank r runs the items with index % n == r on its own whole model and
    Engine; rank 0 gathers every rank's records and writes them in input order."""
    import torch.distributed as dist

    from dsv3.infer.replicas import init_replicas

    r = init_replicas(args)  # the same replica set-up as `dsv3 serve --dp`
    is_main = r == 0
    try:
        mine = items[r::n]  # items[i].index == i: the prompts with index % n == r
        engine = load_engine(args)
        # a request this rank's engine refuses fails the whole run, on every rank, before any forward
        try:
            state, err = _add_requests(args, engine, tok, mine), None
        except ValueError as e:
            state, err = {}, (getattr(e, "line", 0), str(e))
        errs = [None] * n
        dist.all_gather_object(errs, err)
        bad = sorted(e for e in errs if e is not None)
        if bad:
            if is_main:
                raise ValueError(bad[0][1])
            return 2  # rank 0 reports it
        t0 = time.perf_counter()
        # rank 0 shows its own share's progress (the others' bars would overwrite it on the same terminal)
        with _progress(args, len(mine), desc=f"dp rank 0 of {n}", enabled=is_main) as bar:
            records = _run_requests(engine, state, bar)
        got = [None] * n if is_main else None
        # (a replica whose share finished early waits here for the slowest: the world group's timeout is
        # the replicas' long command timeout)
        dist.gather_object((records, engine.stats()), got, dst=0)
        if not is_main:
            return 0
        dt = time.perf_counter() - t0
        records = [rec for recs, _ in got for rec in recs]
        assert sorted(rec["index"] for rec in records) == list(range(len(items)))
        _emit(args, records)
        if args.stats:
            _print_batch_stats(records, dt, [s for _, s in got])
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
