"""`dsv3 train`: pre-train a DeepSeek-V3-architecture model with the paper's recipe.

  dsv3 train --data FILE_OR_FOLDER --out DIR [--preset tiny|demo|small|v2-lite|v3] [--steps N] ...

Everything is checked before any work starts (files, tokenizer, model/training config), then the
tokenizer is trained or loaded, the corpus is tokenized once into memory-mapped shards (cached),
and training runs with a progress bar, JSONL metrics (OUT/metrics.jsonl), periodic validation and
atomic checkpoints (OUT/checkpoints/step-N, OUT/latest). `--resume` continues the run in OUT
exactly; `--stop-after K` ends this invocation after K steps with a checkpoint while every schedule
keeps following --steps. At the end a few samples of the trained model are printed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch

from dsv3.config import PRESETS as MODEL_PRESETS
from dsv3.config import ModelConfig, preset
from dsv3.train.trainer import BALANCE_MODES, DTYPES, TrainConfig, compile_by_default, has_cxx_compiler

# Training presets: a model config plus run defaults. "demo" is what `make demo` trains on the
# bundled corpus (data/tinyshakespeare.txt) within 10 minutes on 2 CPU cores; see docs/training.md
# for the measurements behind its sizes.
def _demo_model() -> ModelConfig:
    # The tiny preset's feature set (q-LoRA, MLA, dense + MoE layers, groups, MTP) at a width
    # that learns Shakespeare in a few minutes. No YaRN: the model trains at its native length.
    return preset("tiny").replace(
        hidden_size=128, intermediate_size=384, moe_intermediate_size=128, num_hidden_layers=4,
        first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=4, topk_group=2, rope_scaling_type=None, max_position_embeddings=1024,
    )


TRAIN_PRESETS = {
    "tiny": dict(model=lambda: preset("tiny"), vocab_size=512,
                 train=dict(steps=200, batch_size=16, seq_len=128, lr=3e-3)),
    # ~1.0M training tokens (250 steps of up to 32 x 128): validation ~2.2 bits/byte, a few minutes
    # on 2 idle cores (measurements in docs/training.md). gamma: the paper's 0.001 is sized for a run
    # of ~10^5 steps; in 250 steps the bias could move by 0.25 at most, less than the spread of the
    # sigmoid affinities, so the demo scales it to 1/steps (docs/training.md: balance study).
    "demo": dict(model=_demo_model, vocab_size=2048,
                 train=dict(steps=250, batch_size=32, batch_size_start=8, seq_len=128, lr=3e-3, warmup_steps=12,
                            gamma=0.004),
                 prompts=["ROMEO:", "First Citizen:\n"], eval_every=50),
}
# Any other model preset (or --model-config): generic defaults, the paper's peak lr.
_GENERIC = dict(vocab_size=8192, train=dict(steps=1000, batch_size=16, seq_len=512, lr=2.2e-4))

# Options that define the run's math: a resume must not change them.
FIXED_ON_RESUME = (
    "data", "preset", "model_config", "tokenizer", "vocab_size", "text_field", "val_fraction", "mtp_depth",
    "steps", "seed", "batch_size", "batch_size_start", "micro_batch_size", "seq_len", "lr", "warmup_steps",
    "balance", "gamma", "gamma_stop_at", "seq_alpha", "aux_alpha", "mtp_lambda", "mtp_switch_at",
    "init_std", "dtype", "weight_decay", "grad_clip", "compile", "fp8",
)
# torchrun layout flags (dsv3.parallel.dist.add_parallel_arguments): not part of the run's options
PARALLEL_FLAGS = ("dp", "ep", "tp", "pp", "pp_schedule", "dp_mode", "fp8_dispatch", "dist_backend")
TRAIN_FIELDS = (
    "steps", "seed", "batch_size", "batch_size_start", "micro_batch_size", "seq_len", "lr", "warmup_steps",
    "balance", "gamma", "gamma_stop_at", "seq_alpha", "aux_alpha", "mtp_lambda", "mtp_switch_at", "init_std",
    "dtype", "device", "weight_decay", "grad_clip", "compile",
)


def configure(p: argparse.ArgumentParser) -> None:
    # Defaults are None here and filled in by _resolve, so a resume can tell the flags a user
    # actually gave from the ones it restores from the checkpoint.
    g = p.add_argument_group("run")
    g.add_argument("--data", help="corpus: a text file, a folder (.txt/.jsonl/.parquet below it), JSONL or Parquet")
    g.add_argument("--out", required=True, help="run folder: metrics.jsonl, checkpoints/, latest")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    g.add_argument("--stop-after", type=int, metavar="K",
                   help="end this invocation after K optimizer steps with a checkpoint; schedules still follow --steps")
    g.add_argument("--preset", choices=sorted({*TRAIN_PRESETS, *MODEL_PRESETS}),
                   help="model + training defaults (default: tiny; demo: the `make demo` run)")
    g.add_argument("--model-config", metavar="PATH", help="a config.json (or folder with one) instead of a preset")
    g.add_argument("--device", help="cpu or cuda (default cpu)")
    g.add_argument("--dtype", choices=list(DTYPES),
                   help="compute dtype: fp32, or bf16 parameters with fp32 master weights (default fp32)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile every block (routed experts included), the MTP blocks and the norms for the "
                        "training steps: ~1.2x faster steps after a first step that compiles (~50 s on a cold "
                        "inductor cache, ~5 s warm; needs a C++ compiler on CPU). Default: on for CPU runs long "
                        "enough to pay it back (e.g. --preset demo; see docs/training.md), off otherwise")
    g.add_argument("--deterministic", action="store_true",
                   help="torch deterministic algorithms (bitwise reproducible runs and resumes)")
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    d = p.add_argument_group("data and tokenizer")
    d.add_argument("--tokenizer",
                   help="bpe (train a byte-level BPE on the corpus, default), deepseek-v3 (the released tokenizer), "
                        "or a folder with tokenizer.json")
    d.add_argument("--vocab-size", type=int, help="BPE vocabulary size (default: per preset, 512 for tiny)")
    d.add_argument("--text-field", help="JSONL field / Parquet column holding the text (default: text)")
    d.add_argument("--val-fraction", type=float, help="fraction of the tokens held out for validation (default 0.05)")
    d.add_argument("--cache-dir", help="where tokenized shards are cached (default: $DSV3_CACHE or ~/.cache/dsv3)")
    m = p.add_argument_group("model and recipe")
    m.add_argument("--mtp-depth", type=int, help="multi-token prediction depth D (default: the preset's, 1)")
    m.add_argument("--balance", choices=BALANCE_MODES,
                   help="load balancing: aux-free (bias update + sequence-wise loss, default), aux-loss "
                        "(expert-level auxiliary loss), none")
    m.add_argument("--steps", type=int, help="optimizer steps of the whole run; every schedule scales to it")
    m.add_argument("--seed", type=int, help="seed for the init and the data order (default 0)")
    m.add_argument("--batch-size", type=int, help="sequences per optimizer step after the ramp")
    m.add_argument("--batch-size-start", type=int,
                   help="batch size at step 0, ramped linearly to --batch-size over the paper's first 3.2%% of steps")
    m.add_argument("--micro-batch-size", type=int, help="sequences per forward/backward (gradient accumulation)")
    m.add_argument("--seq-len", type=int, help="tokens per training sequence")
    m.add_argument("--lr", type=float, help="peak learning rate")
    m.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 1%% of --steps)")
    m.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.1)")
    m.add_argument("--grad-clip", type=float, help="gradient norm clip (default 1.0)")
    m.add_argument("--mtp-lambda", type=float, nargs=2, metavar=("EARLY", "LATE"),
                   help="MTP loss weight before/after --mtp-switch-at (default 0.3 0.1)")
    m.add_argument("--mtp-switch-at", type=float, help="fraction of --steps where lambda switches (default 10/14.8)")
    m.add_argument("--gamma", type=float, help="aux-free bias update speed (default 0.001)")
    m.add_argument("--gamma-stop-at", type=float, help="fraction of --steps after which gamma is 0 (default 14.3/14.8)")
    m.add_argument("--seq-alpha", type=float, help="sequence-wise balance loss factor (aux-free; default 1e-4)")
    m.add_argument("--aux-alpha", type=float, help="expert-level auxiliary loss factor (aux-loss; default 1e-3)")
    m.add_argument("--init-std", type=float,
                   help="init std of every matrix (default 0.006 * sqrt(7168 / hidden): the paper's, width-scaled)")
    m.add_argument("--fp8", action="store_true", default=None,
                   help="FP8 mixed-precision GEMMs (paper §3.3: 1x128 activation tiles, 128x128 weight blocks, "
                        "fp32 accumulation; dsv3.fp8.training); weights and optimizer stay in --dtype")
    from dsv3.parallel.dist import add_parallel_arguments

    # under torchrun: `torchrun --nproc-per-node 2 -m dsv3 train ... --ep 2` (docs/parallel.md)
    add_parallel_arguments(p)
    from dsv3.train.pipeline_train import add_pipeline_arguments

    add_pipeline_arguments(p)  # --pp-schedule (dsv3.train.pipeline_train)
    e = p.add_argument_group("evaluation, checkpoints, samples")
    e.add_argument("--eval-every", type=int, help="validate every N steps (default: --steps / 10)")
    e.add_argument("--eval-batches", type=int, help="validation batches per evaluation (default 0: all)")
    e.add_argument("--save-every", type=int, help="checkpoint every N steps (default: --steps / 10; always at the end)")
    e.add_argument("--keep-checkpoints", type=int, help="checkpoints kept (default 2; 0 keeps all)")
    e.add_argument("--samples", type=int, help="samples printed after training (default 2; 0: none)")
    e.add_argument("--sample-tokens", type=int, help="tokens per sample (default 120)")
    e.add_argument("--prompt", action="append", help="a sample prompt (repeatable)")
    e.add_argument("--temperature", type=float, help="sampling temperature (default 0.8)")


RUN_DEFAULTS = dict(
    preset="tiny", model_config=None, tokenizer="bpe", vocab_size=None, text_field="text", val_fraction=0.05,
    cache_dir=None, mtp_depth=None, device="cpu", dtype="fp32", eval_every=None, eval_batches=0, save_every=None,
    keep_checkpoints=2, samples=2, sample_tokens=120, prompt=None, temperature=0.8, threads=None,
)


def _given(args) -> dict:
    skip = {"out", "resume", "stop_after", "deterministic", "no_progress", "_module", *PARALLEL_FLAGS}
    return {k: v for k, v in vars(args).items() if k not in skip and v is not None}


def _abs(path) -> str:
    return str(Path(path).expanduser().resolve())


def _resolve(args) -> tuple[dict, Path | None]:
    """The run's options (a JSON-able dict) and the checkpoint to resume from. Raises ValueError on
    any inconsistency, before anything is computed."""
    from dsv3.train import checkpointing as ck

    out = Path(args.out)
    given = _given(args)
    if "data" in given:
        given["data"] = _abs(given["data"])
    if "model_config" in given:
        given["model_config"] = _abs(given["model_config"])
    if args.resume:
        ckpt = ck.latest_checkpoint(out)
        if ckpt is None:
            raise ValueError(f"--resume: {out} holds no complete checkpoint (checkpoints/step-N)")
        saved = ck.load_run_args(ckpt)
        if not saved:
            raise ValueError(f"--resume: {ckpt} has no {ck.ARGS_FILE}")
        saved.setdefault("compile", False)  # runs from before compiling became a default ran eagerly
        for k, v in given.items():
            if k in FIXED_ON_RESUME and saved.get(k) != v:
                raise ValueError(
                    f"--resume: --{k.replace('_', '-')} {v!r} differs from the checkpointed run's {saved.get(k)!r}; "
                    f"a resumed run keeps the options that define its math (start a new --out to change them)"
                )
        opts = {**saved, **given}
    else:
        ckpt = None
        if ck.list_checkpoints(out):
            raise ValueError(f"{out} already holds checkpoints: pass --resume to continue that run, or choose a new --out")
        if "data" not in given:
            raise ValueError("--data is required: a text file, a folder, JSONL or Parquet")
        name = given.get("preset", RUN_DEFAULTS["preset"])
        if "model_config" in given and "preset" in given:
            raise ValueError("give --preset or --model-config, not both")
        tp = TRAIN_PRESETS.get(name, _GENERIC) if "model_config" not in given else _GENERIC
        opts = {**RUN_DEFAULTS, "vocab_size": tp["vocab_size"], **tp["train"],
                "prompt": tp.get("prompts"), **({"eval_every": tp["eval_every"]} if "eval_every" in tp else {}),
                **given}
        if "model_config" in given:
            opts["preset"] = None
    opts["stop_after"] = args.stop_after
    opts["deterministic"] = bool(args.deterministic or opts.get("deterministic", False))
    opts["progress"] = not args.no_progress
    steps = opts["steps"]
    if opts["eval_every"] is None:
        opts["eval_every"] = max(1, steps // 10)
    if opts["save_every"] is None:
        opts["save_every"] = max(1, steps // 10)
    for k in ("eval_every", "save_every"):
        if opts[k] < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {opts[k]}")
    for k in ("eval_batches", "keep_checkpoints", "samples", "sample_tokens"):
        if opts[k] < 0:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 0, got {opts[k]}")
    if opts["stop_after"] is not None and opts["stop_after"] < 1:
        raise ValueError(f"--stop-after must be >= 1, got {opts['stop_after']}")
    if opts["threads"] is not None and opts["threads"] < 1:
        raise ValueError(f"--threads must be >= 1, got {opts['threads']}")
    if not 0.0 < opts["val_fraction"] < 1.0:
        raise ValueError(f"--val-fraction must be in (0, 1), got {opts['val_fraction']}")
    if opts.get("compile") and opts.get("device", "cpu") == "cpu" and not has_cxx_compiler():
        raise ValueError("--compile on CPU needs a C++ compiler (g++ or clang++) for torch inductor")
    if opts["temperature"] < 0:
        raise ValueError(f"--temperature must be >= 0, got {opts['temperature']}")
    return opts, ckpt


def _model_config(opts: dict, vocab_size: int | None = None, tokenizer=None) -> ModelConfig:
    if opts.get("model_config"):
        cfg = ModelConfig.from_hf(opts["model_config"])
    else:
        name = opts["preset"]
        cfg = TRAIN_PRESETS[name]["model"]() if name in TRAIN_PRESETS else preset(name)
    kw = {"torch_dtype": "float32"}
    if opts.get("mtp_depth") is not None:
        if opts["mtp_depth"] < 0:
            raise ValueError(f"--mtp-depth must be >= 0, got {opts['mtp_depth']}")
        kw["num_nextn_predict_layers"] = opts["mtp_depth"]
    if vocab_size is not None:
        kw["vocab_size"] = vocab_size
    if tokenizer is not None:
        kw["bos_token_id"], kw["eos_token_id"] = tokenizer.bos_id, tokenizer.eos_id
    return cfg.replace(**kw)


def _train_config(opts: dict) -> TrainConfig:
    kw = {k: opts[k] for k in TRAIN_FIELDS if opts.get(k) is not None}
    if "mtp_lambda" in kw:
        kw["mtp_lambda"] = tuple(kw["mtp_lambda"])
    return TrainConfig(**kw)


def _check_tokenizer_source(opts: dict) -> None:
    src = opts["tokenizer"]
    if src == "bpe":
        from dsv3.tokenizer import CHAT_TOKENS, SPECIAL_TOKENS

        need = 256 + len(SPECIAL_TOKENS) + len(CHAT_TOKENS)
        if opts["vocab_size"] < need:
            raise ValueError(f"--vocab-size {opts['vocab_size']} is too small for a byte-level BPE: it needs at least "
                             f"{need} (256 bytes + {need - 256} special and chat tokens)")
    elif src == "deepseek-v3":
        from dsv3.tokenizer import deepseek_v3_files

        try:
            deepseek_v3_files()
        except ImportError as e:
            raise ValueError(str(e)) from None
    elif not (Path(src) / "tokenizer.json").is_file():
        raise ValueError(f"--tokenizer {src!r}: not 'bpe', 'deepseek-v3' or a folder holding tokenizer.json")


def _load_tokenizer(opts: dict, ckpt: Path | None):
    from dsv3.tokenizer import Tokenizer, train_bpe

    if ckpt is not None:
        return Tokenizer.from_dir(ckpt)  # the very tokenizer the run was trained with
    src = opts["tokenizer"]
    if src == "bpe":
        t0 = time.perf_counter()
        tok = train_bpe(opts["data"], opts["vocab_size"], text_field=opts["text_field"],
                        model_max_length=opts["seq_len"], show_progress=opts["progress"])
        print(f"trained a byte-level BPE tokenizer: {tok.vocab_size} tokens in {time.perf_counter() - t0:.1f}s")
        return tok
    if src == "deepseek-v3":
        return Tokenizer.deepseek_v3()
    return Tokenizer.from_dir(src)


LOADS_FILE = "loads.json"


class _NoMetrics:
    def write(self, rec: dict) -> None:
        pass

    def close(self):
        pass


class _Metrics:
    """Append-only JSONL; on resume, records past the checkpoint's step are dropped (they belong to
    the part of the interrupted run that is being redone)."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is None:
            self.f = open(path, "w")
            return
        kept = []
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut by the kill
                if rec.get("step", 0) <= resume_step:
                    kept.append(line)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(x + "\n" for x in kept))
        os.replace(tmp, path)
        self.f = open(path, "a")

    def write(self, rec: dict) -> None:
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()

    def close(self):
        self.f.close()


def _fmt_vio(d: dict | None) -> str:
    if not d:
        return "-"
    return f"{max(d.values()):.2f}"


def run(args) -> int:
    from tqdm.auto import tqdm

    from dsv3.infer.generate import generate
    from dsv3.train import checkpointing as ck
    from dsv3.train.data import corpus_files, load_corpus

    # ---- 1. everything checkable without work ----
    opts, ckpt = _resolve(args)
    files = corpus_files(opts["data"])  # missing path / folder without text files: ValueError
    if sum(f.stat().st_size for f in files) == 0:
        raise ValueError(f"corpus {opts['data']} is empty ({len(files)} file(s) of 0 bytes)")
    if ckpt is None:
        _check_tokenizer_source(opts)
    model_cfg = _model_config(opts, opts["vocab_size"] if opts["tokenizer"] == "bpe" else None)
    tcfg = _train_config(opts)
    # compiling was not asked for (the default below): a machine whose toolchain cannot build
    # inductor's C++ (no Python headers, say) runs those graphs eagerly instead of failing the run
    suppress_compile_errors = False
    if opts.get("compile") is None:
        # neither --compile nor --no-compile on a fresh run (a resumed one has its saved choice, False for
        # runs from before this default): compile where that pays
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or args.pp != 1
        opts["compile"], why = compile_by_default(model_cfg, tcfg, distributed, bool(opts.get("fp8")))
        if opts["compile"]:
            print(f"torch.compile on by default for {why}; the first full-size step compiles (--no-compile: eager)")
            suppress_compile_errors = True
        tcfg = dataclasses.replace(tcfg, compile=opts["compile"])
    tcfg.validate(model_cfg)
    if opts["stop_after"] is not None and ckpt is None and opts["stop_after"] > tcfg.steps:
        raise ValueError(f"--stop-after {opts['stop_after']} is more than --steps {tcfg.steps}")
    prepare = _fp8_prepare() if opts.get("fp8") else None
    ctx = _parallel_context(args, ckpt, tcfg, model_cfg, prepare)
    if ctx.size("pp") > 1:
        from dsv3.train.pipeline_train import PipelineTrainer as Trainer  # same interface, stages over pp ranks
    else:
        from dsv3.train.trainer import Trainer
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not ctx.is_main:
        opts["progress"] = False

    import torch._dynamo as dynamo  # (`import torch._dynamo` would make `torch` local to run())

    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_suppress = dynamo.config.suppress_errors
    dynamo.config.suppress_errors = prev_suppress or suppress_compile_errors
    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    if opts["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for determinism
        torch.use_deterministic_algorithms(True)
    try:
        if ctx.is_main:
            return _train(opts, ckpt, out, model_cfg, tcfg, tqdm, generate, ck, load_corpus, Trainer, ctx, prepare)
        # the other ranks compute the same steps and write nothing (rank 0 holds the metrics,
        # checkpoints and samples); their prints are dropped
        import contextlib

        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            return _train(opts, ckpt, out, model_cfg, tcfg, tqdm, generate, ck, load_corpus, Trainer, ctx, prepare)
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)
        dynamo.config.suppress_errors = prev_suppress
        if ctx.distributed:
            ctx.destroy()


def _fp8_prepare():
    try:
        from dsv3.fp8.training import apply_fp8_training
    except ImportError as e:
        raise ValueError(f"--fp8: FP8 training is not available in this installation ({e})") from None
    return apply_fp8_training


def _parallel_context(args, ckpt, tcfg, model_cfg, prepare):
    """The torchrun process groups (a single-process no-op under plain python)."""
    from dsv3.parallel.dist import init_parallel
    from dsv3.train.pipeline_train import check_pipeline_options

    check_pipeline_options(args, tcfg, model_cfg, fp8=prepare is not None)  # --pp: every check before any work
    if args.pp != 1:
        return init_parallel(args)  # pipeline checkpoints hold the optimizer state: --resume works
    if args.tp != 1:
        raise ValueError("--tp: tensor parallelism is for inference only (the paper trains without TP); "
                         "use --dp/--ep for dsv3 train")
    if ckpt is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--resume under torchrun (--dp/--ep) is not supported yet: the optimizer state is "
                         "sharded over the ranks and not checkpointed")
    return init_parallel(args)


def _train(opts, ckpt, out, model_cfg, tcfg, tqdm, generate, ck, load_corpus, Trainer, ctx, prepare) -> int:
    t_start = time.perf_counter()
    # ---- 2. tokenizer and data ----
    if ctx.distributed:
        # rank 0 trains the tokenizer and fills the token cache; the others then read both, so
        # every rank has the very same vocabulary and shards
        shared_tok = out / ".tokenizer"
        if ctx.is_main:
            tokenizer = _load_tokenizer(opts, ckpt)
            tokenizer.save(shared_tok)
            load_corpus(opts["data"], tokenizer, opts["cache_dir"], opts["text_field"], opts["val_fraction"],
                        progress=opts["progress"])
        ctx.barrier()
        if not ctx.is_main:
            from dsv3.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_dir(shared_tok)
    else:
        tokenizer = _load_tokenizer(opts, ckpt)
    vocab = tokenizer.vocab_size
    model_cfg = _model_config(opts, vocab, tokenizer)
    if ckpt is not None:
        state, _ = ck.load_trainer_state(ckpt)
        saved_cfg = ModelConfig.from_hf(state["model_config"])
        if saved_cfg != model_cfg:
            raise ValueError(f"--resume: the model config rebuilt from the options differs from {ckpt}/config.json")
    train_data, val_data = load_corpus(opts["data"], tokenizer, opts["cache_dir"], opts["text_field"],
                                       opts["val_fraction"], progress=opts["progress"])
    D = model_cfg.num_nextn_predict_layers
    window = tcfg.seq_len + 1 + D
    if sum(len(s) for s in val_data.window_starts(window, tcfg.seq_len)) == 0:
        raise ValueError(
            f"the validation split ({len(val_data)} tokens, --val-fraction {opts['val_fraction']}) is shorter than one "
            f"window of {window} tokens (--seq-len {tcfg.seq_len} + 1 + MTP depth {D}); use a larger --val-fraction, "
            f"a shorter --seq-len or a bigger corpus"
        )
    # the sampler raises if the train split is too short
    trainer = Trainer(model_cfg, tcfg, train_data, parallel=ctx, prepare=prepare)
    if ckpt is not None:
        from dsv3.checkpoint import load_model

        state, _ = ck.load_trainer_state(ckpt)
        weights = load_model(ckpt, dtype=torch.float32).state_dict()
        trainer.load_state_dict(state, weights)
        print(f"resumed {ckpt} at step {trainer.step}")
    if ctx.is_main:
        ck.remove_stale_temps(out)
    n = model_cfg.num_params()
    print(f"model: {n['total'] / 1e6:.2f}M parameters ({n['active'] / 1e6:.2f}M active per token, "
          f"+{n['mtp'] / 1e6:.2f}M MTP), vocab {vocab}; data: {len(train_data):,} train / {len(val_data):,} val tokens "
          f"({val_data.bytes_per_token:.2f} bytes/token); {tcfg.steps} steps of up to {tcfg.batch_size} x "
          f"{tcfg.seq_len} tokens, balance {tcfg.balance}, {tcfg.dtype}{' (fp8 GEMMs)' if prepare else ''} on "
          f"{tcfg.device}" + (f", {ctx.world} processes {ctx.sizes}" if ctx.distributed else ""))

    saved_opts = {k: v for k, v in opts.items() if k not in ("stop_after", "progress")}
    if ctx.is_main:
        (out / "train_args.json").write_text(json.dumps(saved_opts, indent=2, sort_keys=True) + "\n")
        metrics = _Metrics(out / "metrics.jsonl", trainer.step if ckpt is not None else None)
    else:
        metrics = _NoMetrics()
    metrics.write({"kind": "run", "step": trainer.step, "moe_layers": trainer.layer_names,
                   "n_experts": model_cfg.n_routed_experts, "params": n, "vocab_size": vocab,
                   "bytes_per_token": val_data.bytes_per_token, "train_config": tcfg.to_dict(),
                   "resumed": ckpt is not None})

    stop = tcfg.steps if opts["stop_after"] is None else min(tcfg.steps, trainer.step + opts["stop_after"])
    eval_batches = opts["eval_batches"] or None
    last_eval = None

    def save():
        state = trainer.state_dict()
        master = trainer.full_master()  # collective under dp/ep
        path = None
        if ctx.is_main:
            path = ck.save_checkpoint(out, trainer.step, master, tokenizer, state, saved_opts,
                                      keep=opts["keep_checkpoints"])
            loads = trainer.loads_record()
            if loads is not None:
                # cumulative expert loads of the run so far, for `dsv3 eplb --loads OUT`
                text = json.dumps(loads) + "\n"
                (path / LOADS_FILE).write_text(text)
                tmp = out / (LOADS_FILE + ".tmp")
                tmp.write_text(text)
                os.replace(tmp, out / LOADS_FILE)
        ctx.barrier()
        return path

    def evaluate():
        rec = trainer.evaluate(val_data, eval_batches)
        metrics.write(rec)
        msg = f"step {rec['step']}: val loss {rec['val_loss']:.4f}"
        if "val_bpb" in rec:
            msg += f", {rec['val_bpb']:.3f} bits/byte"
        if "val_mtp_loss" in rec:
            msg += f", MTP loss {rec['val_mtp_loss']:.4f}"
        if "val_maxvio_global" in rec:
            msg += f", MaxVio global {_fmt_vio(rec['val_maxvio_global'])}"
        tqdm.write(msg)
        return rec

    t_train = time.perf_counter()
    start_step, tokens0 = trainer.step, trainer.tokens
    with tqdm(total=tcfg.steps, initial=trainer.step, disable=not opts["progress"], unit="step",
              desc="training", dynamic_ncols=True) as bar:
        while trainer.step < stop:
            rec = trainer.train_step()
            metrics.write(rec)
            bar.update(1)
            bar.set_postfix(ce=f"{rec['ce']:.3f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}",
                            maxvio=_fmt_vio(rec.get("maxvio_batch")), refresh=False)
            if not math.isfinite(rec["loss"]):
                raise RuntimeError(f"the loss is {rec['loss']} at step {trainer.step}: training diverged "
                                   f"(try a lower --lr)")
            if trainer.step % opts["eval_every"] == 0 or trainer.step == tcfg.steps:
                last_eval = evaluate()
            if trainer.step % opts["save_every"] == 0 or trainer.step == stop:
                save()
    elapsed = time.perf_counter() - t_train
    steps_done = trainer.step - start_step
    if steps_done == 0 and (ckpt is None or not ck.list_checkpoints(out)):
        save()
    tok_s = (trainer.tokens - tokens0) / elapsed if elapsed > 0 else float("nan")
    latest = ck.latest_checkpoint(out) if ctx.is_main else None
    print(f"{steps_done} steps in {elapsed:.0f}s ({tok_s:.0f} tokens/s), {time.perf_counter() - t_start:.0f}s in all; "
          f"checkpoint {latest}")
    if trainer.step < tcfg.steps:
        print(f"stopped at step {trainer.step} of {tcfg.steps}: continue with --resume")
        return 0
    if last_eval is None:
        last_eval = evaluate()
    if "val_bpb" in last_eval:
        print(f"validation: loss {last_eval['val_loss']:.4f} nats/token, {last_eval['val_bpb']:.3f} bits/byte")
    if ctx.distributed:
        # sample from the gathered single-device model on rank 0 (no collectives in generate)
        full = trainer.full_master()
        if ctx.is_main:
            _print_samples(trainer, tokenizer, val_data, opts, generate, full)
        ctx.barrier()
    else:
        _print_samples(trainer, tokenizer, val_data, opts, generate)
    return 0


def _print_samples(trainer, tokenizer, val_data, opts, generate, model=None) -> None:
    n = opts["samples"]
    if n == 0:
        return
    prompts = list(opts.get("prompt") or [])
    ids = [tokenizer.encode(p) for p in prompts]
    if not prompts:
        # No prompt given: continue the first tokens of a few validation windows.
        for inputs, _ in val_data.sequential_batches(n, 8, 0, 1):
            ids = inputs.tolist()
    ids = [x for x in ids if x][:n] or [[tokenizer.bos_id or 0]]
    model = (trainer.model if model is None else model).eval()
    with torch.compiler.set_stance("force_eager"):  # a --compile run compiled the training shapes only
        new = generate(model, ids, opts["sample_tokens"], temperature=opts["temperature"], top_p=0.95,
                       eos_id=tokenizer.eos_id, seed=trainer.cfg.seed)
    for i, (p, x) in enumerate(zip(ids, new), 1):
        print(f"--- sample {i} ---")
        print(tokenizer.decode(p + x, skip_special_tokens=True))
    print("---")
