"""`dsv3 distill-mtp`: align a checkpoint's MTP modules with its own main model, for speculative decoding.

  dsv3 distill-mtp --model DIR --data FILE_OR_FOLDER --out DIR [--steps 600] [--generated 512] ...

Trained jointly with the main model (paper §2.2), MTP module k learns to predict the corpus token k + 1
positions ahead. As a draft model (`--speculative mtp`) it is judged on something else: whether its
guess is the token the main model itself would choose there. The two differ most where the model is
unsure (a small model, or a main model fine-tuned after its MTP modules were trained). This command
freezes every weight of the main model and trains only the MTP modules (their projections, norms and
blocks; the embedding and head they share with the main model stay frozen) to match the main model's
own next-token distribution: for depth k at position i, the target is the main model's distribution at
position i + k (the one that predicts the same token), and the loss is KL(main || MTP) (with
--temperature T on both sides, scaled by T^2).

Training windows alternate between the corpus and the main model's own greedy continuations of corpus
prompts (--generated of them, made once before training): greedy speculative decoding drafts on text
the model wrote itself, where the two distributions are measured. Before and after training the command
reports, on held-out data, the KL and the top-1 agreement of each depth with the main model, on corpus
text and on greedy continuations of held-out prompts (there, the agreement of depth 1 is the rate at
which greedy speculative decoding accepts its drafts). The result is written atomically to --out in
the checkpoint's format and dtype, with the source's tokenizer and other files, and `distill_mtp.json`
(options and measurements). The main model's weights come out bitwise unchanged.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")
SKIP_FILES = {"config.json", "trainer_state.pt"}  # written anew / the main run's optimizer state
REPORT_FILE = "distill_mtp.json"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder with MTP modules (num_nextn_predict_layers >= 1)")
    p.add_argument("--data", required=True, help="corpus: a .txt file, a folder of .txt/.jsonl/.parquet files, ...")
    p.add_argument("--out", required=True, help="folder to write the distilled checkpoint to (must not exist)")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column of the text (default: text)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="held-out tail of the corpus (default: 0.05)")
    p.add_argument("--data-cache", default=None, help="folder for tokenized corpora (as dsv3 train)")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps (default: 600)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per step (default: 16)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window (default: 128)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default: 1e-3; cosine to 10%%)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of both sides (default: 1)")
    p.add_argument("--generated", type=int, default=512,
                   help="greedy continuations of corpus prompts to train on, alternating with corpus windows "
                        "(default: 512; 0: corpus only)")
    p.add_argument("--prompt-len", type=int, default=16, help="corpus tokens starting each continuation (default: 16)")
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows per measurement (default: 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")


def _check(args) -> None:
    for name in ("steps", "batch_size", "seq_len", "prompt_len", "eval_windows"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.generated < 0:
        raise ValueError(f"--generated must be >= 0, got {args.generated}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1): the measurements need held-out text, got {args.val_fraction}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    if not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise ValueError(f"--temperature must be a positive number, got {args.temperature}")
    src = Path(args.model)
    if not (src / "config.json").is_file():
        raise ValueError(f"--model {src}: not a checkpoint folder (no config.json)")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} already exists and is not an empty folder: choose another one")
    if out.resolve() == src.resolve():
        raise ValueError("--out must differ from --model")


def mtp_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters the distillation trains: the MTP modules' own (the embedding and head are the main model's)."""
    own = {id(p) for p in list(model.embed.parameters()) + list(model.head.parameters())}
    return [p for p in model.mtp.parameters() if id(p) not in own]


def distill_terms(model, tokens: torch.Tensor, temperature: float = 1.0):
    """tokens (B, S) -> per depth k = 1..D: (student log-probs, teacher log-probs), each (B, S - D, V).

    The main model reads tokens[:, :S] (no gradient); depth k's module at position i combines h^{k-1}_i with
    Emb(t_{i+k}) and predicts t_{i+k+1}, which the main model predicts at position i + k: its teacher."""
    D = len(model.mtp)
    S = tokens.shape[1]
    if S <= D:
        raise ValueError(f"windows of {S} tokens are too short for {D} MTP depth(s)")
    with torch.no_grad():
        h = model.hidden(tokens)
        main = model.logits(h).float()
    outs = model.mtp_hidden(h[:, :S - D], tokens, depths=D)
    terms = []
    for k, out in enumerate(outs, start=1):
        student = F.log_softmax(model.logits(out).float() / temperature, dim=-1)
        teacher = F.log_softmax(main[:, k:S - D + k] / temperature, dim=-1)
        terms.append((student, teacher))
    return terms


def distill_loss(terms, temperature: float = 1.0) -> torch.Tensor:
    """Mean over depths of KL(teacher || student) per position, times T^2 (the gradients' scale does not
    depend on T)."""
    kls = [F.kl_div(s, t, log_target=True, reduction="sum") / (s.shape[0] * s.shape[1]) for s, t in terms]
    return torch.stack(kls).mean() * temperature ** 2


@torch.no_grad()
def measure(model, windows: torch.Tensor, batch_size: int) -> dict:
    """KL(main || MTP) per position and the top-1 agreement (MTP's argmax == the main model's) of each depth,
    over windows (N, S)."""
    D = len(model.mtp)
    kl, agree, n = [0.0] * D, [0] * D, 0
    for i in range(0, windows.shape[0], batch_size):
        terms = distill_terms(model, windows[i:i + batch_size])
        for k, (s, t) in enumerate(terms):
            kl[k] += float(F.kl_div(s, t, log_target=True, reduction="sum"))
            agree[k] += int((s.argmax(-1) == t.argmax(-1)).sum())
        n += terms[0][0].shape[0] * terms[0][0].shape[1]
    return {"kl": [x / n for x in kl], "agreement": [a / n for a in agree], "positions": n}


def greedy_continuations(model, prompts: list[list[int]], total_len: int) -> torch.Tensor:
    """The main model's greedy continuations of prompts, each to total_len tokens (prompt included), through the
    inference engine (plain decoding, continuous batching)."""
    from dsv3.infer.engine import Engine
    from dsv3.infer.params import SamplingParams

    params = SamplingParams(max_new_tokens=total_len - len(prompts[0]), ignore_eos=True)
    with torch.inference_mode():  # (generate gives the attention modules their path back)
        done = Engine(model, eos_token_id=None).generate(prompts, params)
    return torch.tensor([p + list(c.token_ids) for p, c in zip(prompts, done)], dtype=torch.long)


def _windows(data, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """n windows of `length` tokens at random places of data (seeded by gen): the held-out measurement sets and
    the continuations' prompts (training batches come from dsv3.train.data.BatchSampler)."""
    segs = [s for s in data.segments if len(s) >= length]
    if not segs:
        raise ValueError(f"dataset {data.name} has no segment of {length} tokens (--seq-len, --prompt-len)")
    rows = []
    for _ in range(n):
        s = segs[int(torch.randint(len(segs), (1,), generator=gen))]
        p = int(torch.randint(len(s) - length + 1, (1,), generator=gen))
        rows.append(torch.as_tensor(s[p:p + length].astype("int64")))
    return torch.stack(rows)


def _lr_at(step: int, steps: int, peak: float) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return peak * (step + 1) / warm
    frac = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _write(model, src: Path, out: Path, dtype: torch.dtype, report: dict) -> None:
    """The checkpoint (in dtype) with the source's other files and the report, into out atomically."""
    from dsv3.checkpoint import save_model
    from dsv3.train.checkpointing import _fsync_path, _fsync_tree

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name not in SKIP_FILES and not f.name.endswith(WEIGHT_SUFFIXES):
                shutil.copy2(f, tmp / f.name)
            elif f.is_dir() and f.name == "additional_chat_templates":
                shutil.copytree(f, tmp / f.name)
        save_model(model.to(dtype), tmp)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        _fsync_tree(tmp)
        if out.exists():
            out.rmdir()  # (checked empty)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left behind
        raise
    _fsync_path(out.parent)


def _fmt(m: dict) -> str:
    return ", ".join(f"depth {k + 1}: agreement {100 * a:.1f}%, KL {kl:.4f}"
                     for k, (a, kl) in enumerate(zip(m["agreement"], m["kl"])))


def run(args) -> int:
    _check(args)
    from dsv3.checkpoint import load_model
    from dsv3.config import ModelConfig
    from dsv3.tokenizer import Tokenizer
    from dsv3.train.data import BatchSampler, load_corpus

    src, out = Path(args.model), Path(args.out)
    cfg = ModelConfig.from_hf(src)
    if cfg.num_nextn_predict_layers < 1:
        raise ValueError(f"--model {src} has no MTP modules (num_nextn_predict_layers is 0): nothing to distill")
    if cfg.quantization_config:
        raise ValueError(f"--model {src} is an FP8 checkpoint: convert it to BF16 first (dsv3 convert)")
    saved_dtype = getattr(torch, cfg.torch_dtype, None)
    if not isinstance(saved_dtype, torch.dtype) or not saved_dtype.is_floating_point:
        saved_dtype = torch.bfloat16
    if args.seq_len <= cfg.num_nextn_predict_layers + 1:
        raise ValueError(f"--seq-len {args.seq_len} is too short for {cfg.num_nextn_predict_layers} MTP depth(s)")
    if args.seq_len > cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's context ({cfg.max_position_embeddings})")
    if args.generated and args.prompt_len >= args.seq_len:
        raise ValueError(f"--prompt-len {args.prompt_len} must be shorter than --seq-len {args.seq_len}")
    tok = Tokenizer.from_dir(src)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    train, val = load_corpus(args.data, tok, args.data_cache, args.text_field, args.val_fraction)
    t_start = time.perf_counter()
    model = load_model(src, dtype=torch.float32).eval()  # eval: the MoE gates' load-balancing bias stays fixed
    for p in model.parameters():
        p.requires_grad_(False)
    params = mtp_parameters(model)
    for p in params:
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(args.seed)
    S, D = args.seq_len, cfg.num_nextn_predict_layers

    # held-out measurement sets: corpus windows, and greedy continuations of held-out prompts
    val_text = _windows(val, args.eval_windows, S, gen)
    val_prompts = _windows(val, args.eval_windows, min(args.prompt_len, S - D - 1), gen).tolist()
    val_self = greedy_continuations(model, val_prompts, S)
    before = {"corpus": measure(model, val_text, args.batch_size), "self": measure(model, val_self, args.batch_size)}
    print(f"before: held-out text: {_fmt(before['corpus'])}")
    print(f"        greedy continuations: {_fmt(before['self'])}")

    t0 = time.perf_counter()
    own = greedy_continuations(model, _windows(train, args.generated, args.prompt_len, gen).tolist(), S) \
        if args.generated else None
    if own is not None:
        print(f"generated {own.shape[0]} greedy continuations of {S} tokens in {time.perf_counter() - t0:.1f}s")

    corpus = BatchSampler(train, S - 1, seed=args.seed)  # windows of S tokens, an epoch without repeats
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, args.steps, args.lr)
        if own is not None and step % 2 == 0:
            batch = own[torch.randint(own.shape[0], (args.batch_size,), generator=gen)]
        else:
            batch = corpus.next_windows(args.batch_size)
        loss = distill_loss(distill_terms(model, batch, args.temperature), args.temperature)
        if not torch.isfinite(loss):
            raise RuntimeError(f"step {step + 1}: the distillation loss is {float(loss)}; nothing was written")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, args.steps // 10) == 0 or step + 1 == args.steps:
            recent = losses[-max(1, args.steps // 10):]
            print(f"step {step + 1}/{args.steps}: KL {sum(recent) / len(recent):.4f} "
                  f"({time.perf_counter() - t0:.1f}s)", flush=True)
    for p in params:
        p.requires_grad_(False)

    after = {"corpus": measure(model, val_text, args.batch_size), "self": measure(model, val_self, args.batch_size)}
    print(f"after:  held-out text: {_fmt(after['corpus'])}")
    print(f"        greedy continuations: {_fmt(after['self'])}")
    report = {"source": os.fspath(src.resolve()), "options": {k: v for k, v in vars(args).items() if k != "_module"},
              "before": before, "after": after, "seconds": time.perf_counter() - t_start,
              "final_kl": losses[-1]}
    _write(model, src, out, saved_dtype, report)
    print(f"wrote {out} ({saved_dtype}); greedy acceptance on held-out continuations (depth 1): "
          f"{100 * before['self']['agreement'][0]:.1f}% -> {100 * after['self']['agreement'][0]:.1f}%")
    return 0
