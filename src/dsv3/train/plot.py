"""`dsv3 plot RUN`: PNGs from a training run's metrics.jsonl.

- loss.png: training CE and MTP loss, validation loss and bits per byte; learning rate and batch
  size; MaxVio per MoE layer (per batch, and cumulative dashed).
- expert_load.png: a heatmap of the tokens each expert received (MoE layers x experts, as a multiple
  of the mean load), cumulated over training up to the last evaluation, next to the same for the
  last validation pass.
"""
from __future__ import annotations

import json
from pathlib import Path


def configure(p) -> None:
    p.add_argument("run", help="a `dsv3 train` run folder (holding metrics.jsonl), or the metrics.jsonl file")
    p.add_argument("--out", help="folder for the PNGs (default: RUN/plots)")
    p.add_argument("--smooth", type=int, default=0,
                   help="moving-average window for the training curves (default 0: auto, about 1%% of the steps)")


def read_metrics(path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: give a run folder written by `dsv3 train`")
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{i}: not a JSON line") from None
    return records


def _smooth(values, window):
    if window <= 1:
        return values
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def run(args) -> int:
    try:
        import matplotlib
    except ImportError:
        raise ValueError("dsv3 plot needs matplotlib: pip install matplotlib (or the [plot] extra)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    records = read_metrics(args.run)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train:
        raise ValueError(f"{args.run}: no training steps recorded yet")
    run_dir = Path(args.run) if Path(args.run).is_dir() else Path(args.run).parent
    out = Path(args.out) if args.out else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    if args.smooth < 0:
        raise ValueError(f"--smooth must be >= 0, got {args.smooth}")
    window = args.smooth or max(1, len(train) // 100)

    steps = [r["step"] for r in train]
    layers = list(train[-1].get("maxvio_batch", {}))
    fig, axes = plt.subplots(3 if layers else 2, 1, figsize=(9, 10 if layers else 7), sharex=True)
    ax = axes[0]
    ax.plot(steps, _smooth([r["ce"] for r in train], window), label="train CE (next token)")
    if any(r.get("mtp_loss") for r in train):
        ax.plot(steps, _smooth([r["mtp_loss"] for r in train], window), label="train MTP CE (mean over depths)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation CE")
        if all("val_bpb" in r for r in evals):
            ax2 = ax.twinx()
            ax2.plot([r["step"] for r in evals], [r["val_bpb"] for r in evals], "s--", color="tab:red",
                     label="validation bits/byte")
            ax2.set_ylabel("bits per byte")
            ax2.legend(loc="upper center")
    ax.set_ylabel("nats / token")
    ax.legend(loc="upper right")
    ax.set_title(f"{run_dir.name}: loss")
    ax = axes[1]
    ax.plot(steps, [r["lr"] for r in train], color="tab:green", label="learning rate")
    ax.set_ylabel("learning rate")
    ax.legend(loc="upper left")
    axb = ax.twinx()
    axb.plot(steps, [r["batch_size"] for r in train], color="tab:gray", label="batch size (sequences)")
    axb.set_ylabel("batch size")
    axb.legend(loc="upper right")
    if layers:
        ax = axes[2]
        for i, name in enumerate(layers):
            color = f"C{i % 10}"
            ax.plot(steps, _smooth([r["maxvio_batch"][name] for r in train], window), color=color, label=name)
            ax.plot(steps, [r["maxvio_cum"][name] for r in train], "--", color=color)
        ax.set_ylabel("MaxVio (solid: batch, dashed: cumulative)")
        ax.legend(loc="upper right", ncol=min(4, len(layers)), fontsize="small")
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    loss_png = out / "loss.png"
    fig.savefig(loss_png, dpi=110)
    plt.close(fig)
    written = [loss_png]

    last = next((r for r in reversed(evals) if "train_loads" in r or "val_loads" in r), None)
    if last is not None:
        panels = [(k, t) for k, t in (("train_loads", "training (cumulative)"), ("val_loads", "validation"))
                  if k in last]
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 0.5 * len(layers) + 2.5), squeeze=False)
        for ax, (key, title) in zip(axes[0], panels):
            names = list(last[key])
            loads = np.array([last[key][n] for n in names], dtype=np.float64)
            rel = loads / np.maximum(loads.mean(axis=1, keepdims=True), 1e-9)
            im = ax.imshow(rel, aspect="auto", cmap="viridis", vmin=0)
            ax.set_yticks(range(len(names)), names)
            ax.set_xlabel("expert")
            ax.set_title(f"{title} load / mean load, step {last['step']}")
            fig.colorbar(im, ax=ax)
        fig.tight_layout()
        heat_png = out / "expert_load.png"
        fig.savefig(heat_png, dpi=110)
        plt.close(fig)
        written.append(heat_png)
    for p in written:
        print(p)
    return 0
