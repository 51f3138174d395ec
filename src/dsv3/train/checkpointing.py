"""Training checkpoints: an HF-format model folder plus the trainer state, written atomically.

Layout of a run folder OUT:

  OUT/checkpoints/step-00000100/   config.json, model.safetensors (dsv3.save_model, MTP included,
                                   fp32 master weights), tokenizer.json, tokenizer_config.json
                                   (chat template), generation_config.json, trainer_state.pt,
                                   train_args.json
  OUT/latest -> checkpoints/step-00000100      (symlink: `dsv3 generate --model OUT/latest`)
  OUT/metrics.jsonl

Atomicity: a checkpoint is written into `checkpoints/.tmp-step-N-PID` (same file system), every file
and the folder are fsynced, then the folder is renamed to `step-N` (atomic on POSIX) and the parent
fsynced; only then is `latest` swapped (a new symlink renamed over the old one) and older
checkpoints pruned. A process killed at any point leaves either the old or the new checkpoint as
`latest`, both complete; leftover `.tmp-*` folders are ignored and removed by the next writer.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch

from dsv3.checkpoint import save_model

STATE_FILE = "trainer_state.pt"
ARGS_FILE = "train_args.json"
_STEP_RE = re.compile(r"step-(\d+)")
_ASIDE_RE = re.compile(r"\.old-step-(\d+)-\d+")
# Test hook (see tests/test_train_cli.py): "STEP:SECONDS" sleeps in the middle of the save of that
# step, after the weights are written and before the trainer state, so a test can kill the process
# while a checkpoint is half written.
PAUSE_ENV = "DSV3_TEST_SAVE_PAUSE"


def checkpoint_dir(out) -> Path:
    return Path(out) / "checkpoints"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            _fsync_path(p)
    _fsync_path(folder)


def is_complete(folder: Path) -> bool:
    return (folder / STATE_FILE).is_file() and (folder / "config.json").is_file()


def list_checkpoints(out) -> list[tuple[int, Path]]:
    root = checkpoint_dir(out)
    if not root.is_dir():
        return []
    found = {}
    for p in root.iterdir():
        m = _STEP_RE.fullmatch(p.name)
        if m and p.is_dir() and is_complete(p):
            found[int(m.group(1))] = p
    # A checkpoint moved aside while the same step is re-saved (see save_checkpoint) still counts
    # until its replacement is in place.
    for p in root.iterdir():
        m = _ASIDE_RE.fullmatch(p.name)
        if m and int(m.group(1)) not in found and p.is_dir() and is_complete(p):
            found[int(m.group(1))] = p
    return sorted(found.items())


def latest_checkpoint(out) -> Path | None:
    """The newest complete checkpoint of the run (normally the one `OUT/latest` points to: a
    process killed between the rename and the link swap leaves a newer complete folder, which
    wins); None when the run has no checkpoint."""
    found = list_checkpoints(out)
    return found[-1][1] if found else None


def remove_stale_temps(out) -> None:
    root = checkpoint_dir(out)
    if root.is_dir():
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in root.glob(".old-*"):
            m = _ASIDE_RE.fullmatch(p.name)
            if m is None or is_complete(root / f"step-{int(m.group(1)):08d}"):
                shutil.rmtree(p, ignore_errors=True)


def _maybe_pause(step: int) -> None:
    spec = os.environ.get(PAUSE_ENV)
    if spec:
        at, seconds = spec.split(":")
        if int(at) == step:
            time.sleep(float(seconds))


def save_checkpoint(out, step: int, model, tokenizer, state: dict, args: dict, keep: int = 2) -> Path:
    """Write checkpoint `step` of the run in `out` atomically and point `out/latest` at it. `model` is
    the fp32 master Transformer, `state` the trainer's state_dict(), `args` the run's options (JSON).
    Keeps the newest `keep` checkpoints (keep <= 0 keeps all)."""
    out = Path(out)
    root = checkpoint_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, tmp)
    if tokenizer is not None:
        tokenizer.save(tmp)
        gen = {"_from_model_config": True}
        if tokenizer.bos_id is not None:
            gen["bos_token_id"] = tokenizer.bos_id
        if tokenizer.eos_id is not None:
            gen["eos_token_id"] = tokenizer.eos_id
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    _maybe_pause(step)
    torch.save(state, tmp / STATE_FILE)
    (tmp / ARGS_FILE).write_text(json.dumps(args, indent=2, sort_keys=True) + "\n")
    _fsync_tree(tmp)
    if final.exists():
        # Re-saving a step: move the old folder aside (list_checkpoints still finds it there)
        # and put the new one in its place.
        aside = root / f".old-{name}-{os.getpid()}"
        os.rename(final, aside)
        os.rename(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_path(root)
    link_tmp = out / f".latest.tmp-{os.getpid()}"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    os.symlink(os.path.join("checkpoints", name), link_tmp)
    os.replace(link_tmp, out / "latest")
    _fsync_path(out)
    if keep > 0:
        for s, p in list_checkpoints(out)[:-keep]:
            if p.resolve() != final.resolve():
                shutil.rmtree(p, ignore_errors=True)
    return final


def load_run_args(folder) -> dict:
    """The run options saved with a checkpoint ({} when absent)."""
    path = Path(folder) / ARGS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def load_trainer_state(folder) -> tuple[dict, dict]:
    """(trainer state, run options) of a checkpoint folder."""
    folder = Path(folder)
    if not is_complete(folder):
        raise ValueError(f"{folder} is not a complete training checkpoint (no {STATE_FILE})")
    # weights_only: the state holds tensors, numbers, strings and containers only.
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    return state, load_run_args(folder)
