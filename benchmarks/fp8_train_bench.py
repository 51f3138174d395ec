"""FP8 mixed-precision training vs high precision (DeepSeek-V3 §3.3; the paper reports a relative loss
gap below 0.25% against BF16 at 16B/230B scale).

    .venv/bin/python benchmarks/fp8_train_bench.py                      # fp32 vs fp8, ~10 min on 2 cores
    .venv/bin/python benchmarks/fp8_train_bench.py --modes bf16 fp8-bf16 --steps 60

Same data (data/tinyshakespeare.txt, byte-level BPE from dsv3.tokenizer.train_bpe, windows from
dsv3.train.data), same seed, init, batches and steps; each run is `dsv3.train.trainer.Trainer` (the
full recipe: MTP, aux-free balancing, AdamW, schedules, clipping) and the FP8 runs call
`dsv3.fp8.training.apply_fp8_training(trainer.model)` right after building the trainer, which is
what `dsv3 train --fp8` does. Modes:
  fp32      fp32 weights and compute (the high-precision reference on CPU, where bf16 is slow)
  fp8       fp32 master/optimizer/non-GEMM parts, FP8 GEMMs (Fprop, Dgrad, Wgrad)
  bf16      the trainer's bf16 mode (bf16 model, fp32 master): the paper's baseline
  fp8-bf16  bf16 mode + FP8 GEMMs
Reported: the training loss averaged over the last 10 steps, the validation loss at the end (the
same fixed validation windows for every run), and their relative gaps to the first mode.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODES = {"fp32": ("fp32", False), "fp8": ("fp32", True), "bf16": ("bf16", False), "fp8-bf16": ("bf16", True)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / "data" / "tinyshakespeare.txt"), help="training corpus")
    p.add_argument("--modes", nargs="+", default=["fp32", "fp8"], choices=list(MODES),
                   help="runs to compare; gaps are relative to the first")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary size")
    p.add_argument("--seed", type=int, default=0, help="init and data-order seed")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches at the end")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", help="write the per-step losses and results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from dsv3.config import preset
    from dsv3.fp8.training import apply_fp8_training
    from dsv3.tokenizer import train_bpe
    from dsv3.train.data import load_corpus
    from dsv3.train.trainer import TrainConfig, Trainer

    tok = train_bpe(args.data, args.vocab_size)
    with tempfile.TemporaryDirectory() as cache:
        train, val = load_corpus(args.data, tok, cache, val_fraction=0.05, progress=False)
        # the `tiny` preset (q-LoRA MLA, a dense layer, 2 MoE layers with 8 routed + 1 shared
        # experts in 4 groups, MTP depth 1) without YaRN: it trains at its native length
        cfg = preset("tiny").replace(vocab_size=tok.vocab_size, rope_scaling_type=None, max_position_embeddings=1024)
        results = {}
        for mode in args.modes:
            dtype, fp8 = MODES[mode]
            tcfg = TrainConfig(steps=args.steps, seed=args.seed, batch_size=args.batch_size, seq_len=args.seq_len,
                               lr=args.lr, dtype=dtype)
            trainer = Trainer(cfg, tcfg, train)
            if fp8:
                apply_fp8_training(trainer.model)
            losses, t0 = [], time.perf_counter()
            for _ in range(args.steps):
                rec = trainer.train_step()
                losses.append(rec["ce"])
                if not math.isfinite(rec["loss"]):
                    raise RuntimeError(f"{mode}: loss {rec['loss']} at step {trainer.step}")
            dt = time.perf_counter() - t0
            ev = trainer.evaluate(val, args.eval_batches)
            results[mode] = dict(train_last10=sum(losses[-10:]) / len(losses[-10:]), val_loss=ev["val_loss"],
                                 val_bpb=ev.get("val_bpb"), s_per_step=dt / args.steps, losses=losses)
            print(f"{mode}: train CE (last 10) {results[mode]['train_last10']:.4f}, val {ev['val_loss']:.4f}, "
                  f"{dt / args.steps:.2f} s/step", flush=True)
    base = args.modes[0]
    b = results[base]
    print(f"\n{args.steps} steps x {args.batch_size} x {args.seq_len} tokens, seed {args.seed}, lr {args.lr}, "
          f"vocab {tok.vocab_size}; gaps relative to {base}\n")
    print("| run | train CE, last 10 steps | gap | val loss | gap | val bits/byte | s/step |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        g1 = (r["train_last10"] - b["train_last10"]) / b["train_last10"]
        g2 = (r["val_loss"] - b["val_loss"]) / b["val_loss"]
        bpb = f"{r['val_bpb']:.4f}" if r["val_bpb"] is not None else "-"
        print(f"| {mode} | {r['train_last10']:.4f} | {100 * g1:+.3f}% | {r['val_loss']:.4f} | {100 * g2:+.3f}% | "
              f"{bpb} | {r['s_per_step']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
