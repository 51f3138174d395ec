"""Training benchmarks (issue 3): throughput against transformers, and the paper's balance claim.

  python benchmarks/train_bench.py throughput [--batch 8 --seq 256 --runs 7]
  python benchmarks/train_bench.py balance [--steps 300]
  python benchmarks/train_bench.py all

throughput: one training step (forward, fp32 cross-entropy, backward, AdamW step) of the same
model (the `demo` preset without MTP, fp32 CPU) on the same batch, dsv3 vs transformers'
DeepseekV3ForCausalLM loaded from the same weights (save_model -> from_pretrained), runs
interleaved, medians and the median of the per-run ratios reported. Both use torch's AdamW, fused by
default (what `dsv3 train` builds and transformers' Trainer defaults to; `--adamw foreach` for the
multi-tensor one). Before timing, the loss and the gradient norm of each dsv3 variant on the
training path (autograd on) are printed against transformers'. Rows: dsv3 as `dsv3 train --preset
demo` runs it by default (compiled: every block whole, blocked math attention; fused chunked head +
CE), the eager step (`--no-compile`: what shorter runs get by default), the eager step with the
plain full-logits CE; the full dsv3 recipe step (MTP depth 1, aux-free balancing, clipping,
schedules: `Trainer.train_step`, eager and compiled) is listed for context.

balance: aux-free (the paper's gamma 1e-3, and a gamma scaled to the short budget) vs aux-loss vs
none, same model, data, seed and steps on the bundled corpus; validation loss and bits per byte,
MaxVio_global on the validation set and MaxVio_batch (training batches, mean over the last half of
the run; validation batches), averaged over the MoE layers (Wang et al. 2024's metrics, used in the
paper's §4.5).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
COMPILED = "dsv3 (dsv3 train --preset demo's default step: compiled)"
EAGER = "dsv3 eager (--no-compile)"


def demo_config(vocab: int, mtp: int = 0, **kw):
    from dsv3.train.cli import _demo_model

    return _demo_model().replace(vocab_size=vocab, num_nextn_predict_layers=mtp, **kw)


# ---- throughput ---------------------------------------------------------------------------------


def throughput(args) -> None:
    from transformers import DeepseekV3ForCausalLM

    import dsv3
    from dsv3.train.data import TokenDataset
    from dsv3.train.trainer import Trainer, TrainConfig, compile_model, compute_losses

    B, S = args.batch, args.seq
    cfg = demo_config(args.vocab)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        init = dsv3.Transformer(cfg).init_weights(0.02)
        dsv3.save_model(init, tmp)
        ours = dsv3.load_model(tmp, dtype=torch.float32).train()
        theirs = DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32).train()
    impl = getattr(theirs.config, "_experts_implementation", "?")
    attn = getattr(theirs.config, "_attn_implementation", "?")
    windows = torch.randint(0, cfg.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(0))

    def copy_of(model):
        m = dsv3.Transformer(cfg)
        m.load_state_dict(model.state_dict())
        return m.train()

    # dsv3 as `dsv3 train --preset demo` runs it by default (compiled), the eager step (--no-compile),
    # and the eager step with the plain full-logits CE (what the fused loss buys).
    variants = {}
    if not args.no_compile:
        compiled = copy_of(ours)
        compile_model(compiled)
        variants[COMPILED] = (compiled, {})
    variants[EAGER] = (ours, {})
    variants["dsv3 eager, plain CE (F.cross_entropy on full logits)"] = (copy_of(ours), {"fused_loss": False})

    def grad_norm(model):
        return torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)).item()

    # Same loss and gradients as transformers on the training path (autograd on), before any step.
    want = theirs(input_ids=windows, labels=windows).loss
    want.backward()
    want, want_g = want.item(), grad_norm(theirs)
    theirs.zero_grad(set_to_none=True)
    print(f"same weights, same batch: transformers loss {want:.6f}, gradient norm {want_g:.6f}")
    for name, (model, kw) in variants.items():
        t = time.perf_counter()
        out = compute_losses(model, windows, S, **kw)
        out.loss.backward()
        dt = time.perf_counter() - t
        g = grad_norm(model)
        model.zero_grad(set_to_none=True)
        print(f"  {name}: loss {out.ce.item():.6f} (rel. diff {abs(out.ce.item() - want) / want:.1e}), gradient norm "
              f"{g:.6f} (rel. diff {abs(g - want_g) / want_g:.1e}); first step {dt:.1f}s")

    # The same optimizer for both models: torch's AdamW, by default its fused kernel (what `dsv3 train`
    # builds, dsv3.train.optim.build_optimizer, and transformers' Trainer default since torch 2.8),
    # with --adamw foreach the multi-tensor implementation.
    adamw = dict(lr=1e-4, fused=True) if args.adamw == "fused" else dict(lr=1e-4, foreach=True)

    def stepper(model, kw):
        opt = torch.optim.AdamW(model.parameters(), **adamw)

        def step():
            compute_losses(model, windows, S, **kw).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    opt_theirs = torch.optim.AdamW(theirs.parameters(), **adamw)

    def step_theirs():
        theirs(input_ids=windows, labels=windows).loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)

    fns = {"transformers": step_theirs}
    fns.update({name: stepper(model, kw) for name, (model, kw) in variants.items()})
    if not args.no_recipe:
        # The full recipe: MTP depth 1 + aux-free balancing + clipping + schedules, same model otherwise.
        data = TokenDataset([np.random.default_rng(0).integers(0, cfg.vocab_size, 200_000)])
        recipe = ([] if args.no_compile else [("dsv3 full recipe (MTP + aux-free), compiled", True)]) + \
            [("dsv3 full recipe (MTP + aux-free), eager", False)]
        for name, comp in recipe:
            trainer = Trainer(demo_config(args.vocab, mtp=1),
                              TrainConfig(steps=1000, batch_size=B, seq_len=S, compile=comp), data)
            if args.adamw == "foreach":  # the trainer builds the fused one; before its first step,
                for g in trainer.optimizer.param_groups:  # groups without `fused` take torch's foreach
                    g["fused"] = None
            trainer.train_step()  # compiles
            fns[name] = trainer.train_step

    times = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(args.runs):
        for k, fn in fns.items():  # interleaved, so load drift on a shared machine hits all alike
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    # per-run ratios: each run's transformers step against the same run's dsv3 step (paired)
    paired = {k: statistics.median(a / b for a, b in zip(times["transformers"], v)) for k, v in times.items()}
    n = cfg.num_params()
    print(f"\nmodel: demo preset, {n['total'] / 1e6:.2f}M parameters ({n['active'] / 1e6:.2f}M active), vocab "
          f"{cfg.vocab_size}; batch {B} x {S} tokens; fp32; {torch.get_num_threads()} thread(s); transformers "
          f"attention: {attn}, experts: {impl}; AdamW {args.adamw} for both models; median of {args.runs} "
          f"interleaved runs\n")
    print("| step (fwd + bwd + AdamW) | median s | tokens/s | vs transformers (medians) | vs transformers (paired) |")
    print("|---|---|---|---|---|")
    for k in fns:
        print(f"| {k} | {med[k]:.3f} | {B * S / med[k]:,.0f} | {med['transformers'] / med[k]:.2f}x | "
              f"{paired[k]:.2f}x |")


# ---- balance study ------------------------------------------------------------------------------


def balance(args) -> None:
    from dsv3.tokenizer import train_bpe
    from dsv3.train.data import load_corpus
    from dsv3.train.trainer import Trainer, TrainConfig

    corpus = ROOT / "data" / "tinyshakespeare.txt"
    tok = train_bpe(corpus, args.vocab)
    cache = Path(tempfile.gettempdir()) / "dsv3-bench-cache"
    train, val = load_corpus(corpus, tok, cache, val_fraction=0.05, progress=False)
    # More experts than the demo so that imbalance has room to show: 16 routed, top-2, 4 groups.
    cfg = demo_config(tok.vocab_size, mtp=1, n_routed_experts=16, moe_intermediate_size=64, n_group=4, topk_group=2,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    base = dict(steps=args.steps, batch_size=args.batch, seq_len=args.seq, lr=args.lr, warmup_steps=args.steps // 50,
                seed=args.seed)
    scaled_gamma = round(1.0 / args.steps, 4)  # the bias can cross the sigmoid range (~1) within the run
    variants = [
        ("aux-free, gamma 1e-3 (paper)", dict(balance="aux-free")),
        (f"aux-free, gamma {scaled_gamma:g} (scaled to {args.steps} steps)", dict(balance="aux-free", gamma=scaled_gamma)),
        ("aux-loss, alpha 1e-3", dict(balance="aux-loss")),
        ("none", dict(balance="none")),
    ]
    n = cfg.num_params()
    print(f"balance study: {n['total'] / 1e6:.2f}M-parameter model, {cfg.n_routed_experts} routed experts top-"
          f"{cfg.num_experts_per_tok} in {sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))} MoE layers "
          f"+ MTP; {args.steps} steps of {args.batch} x {args.seq} tokens; seed {args.seed}; "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    rows = []
    for name, kw in variants:
        t0 = time.perf_counter()
        tr = Trainer(cfg, TrainConfig(**base, **kw), train)
        batch_vio = []
        for _ in range(args.steps):
            rec = tr.train_step()
            batch_vio.append(np.mean(list(rec["maxvio_batch"].values())))
        ev = tr.evaluate(val)
        rows.append((name, ev["val_loss"], ev["val_bpb"], np.mean(list(ev["val_maxvio_global"].values())),
                     np.mean(batch_vio[len(batch_vio) // 2:]), np.mean(list(ev["val_maxvio_batch"].values()))))
        print(f"  {name}: done in {time.perf_counter() - t0:.0f}s", flush=True)
    print("\n| balancing | val loss | val bits/byte | MaxVio_global (val) | MaxVio_batch (train, 2nd half) "
          "| MaxVio_batch (val) |")
    print("|---|---|---|---|---|---|")
    for name, loss, bpb, g, bt, bv in rows:
        print(f"| {name} | {loss:.4f} | {bpb:.3f} | {g:.3f} | {bt:.3f} | {bv:.3f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("throughput", "balance", "all"))
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--vocab", type=int, default=2048, help="vocabulary size (BPE size for the balance study)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--runs", type=int, default=7, help="timed runs per implementation (throughput)")
    p.add_argument("--steps", type=int, default=300, help="training steps per variant (balance)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (throughput)")
    p.add_argument("--no-recipe", action="store_true", help="skip the full-recipe rows (throughput)")
    p.add_argument("--adamw", choices=("fused", "foreach"), default="fused",
                   help="torch AdamW implementation for both models in the throughput rows (default fused: what "
                        "dsv3 train builds and transformers' Trainer defaults to)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what in ("throughput", "all"):
        throughput(args)
    if args.what in ("balance", "all"):
        if args.what == "all":
            print()
        balance(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
