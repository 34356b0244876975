"""Trainer-side checkpoint glue: where checkpoints live, the `latest` pointer, per-rank RNG.

The actor writes each checkpoint (model + optimizer + the trainer's `extra_state`: step and
data position) as a new directory under `<run_dir>/checkpoints/` and moves `latest` to it only
once every rank finished writing, so a run killed at any point (SIGKILL included) resumes
from the last complete checkpoint. This module adds each rank's RNG state to that directory
and prunes old checkpoints.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from typing import Any

import torch

logger = logging.getLogger(__name__)

LATEST = "latest"
RNG_FILE = "rng_rank{rank}.pt"


def checkpoint_root(run_dir: str) -> str:
    """`<run_dir>/checkpoints`: the directory handed to the actor's save/load."""
    return os.path.join(run_dir, "checkpoints")


def latest_checkpoint(run_dir: str) -> str | None:
    """The directory `checkpoints/latest` points at (a symlink, or a file naming it), or None."""
    link = os.path.join(checkpoint_root(run_dir), LATEST)
    if not os.path.lexists(link):
        return None
    if os.path.islink(link) or os.path.isdir(link):
        target = os.path.realpath(link)
    else:
        with open(link) as f:
            name = f.read().strip()
        target = name if os.path.isabs(name) else os.path.join(checkpoint_root(run_dir), name)
    if not os.path.isdir(target):
        raise RuntimeError(f"{link} points at {target!r}, which is not a directory (edited by hand?)")
    return target


def rng_state() -> dict[str, Any]:
    """This process's Python and torch RNG states (CUDA too when initialized)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_rank_rng(ckpt_dir: str, rank: int) -> None:
    """Writes this rank's RNG state into `ckpt_dir` (fsync'd by this rank, the writer; atomic
    rename)."""
    path = os.path.join(ckpt_dir, RNG_FILE.format(rank=rank))
    with open(path + ".tmp", "wb") as f:
        torch.save(rng_state(), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def restore_rank_rng(ckpt_dir: str, rank: int) -> bool:
    """Restores this rank's RNG state from `ckpt_dir` if it was saved there; returns whether."""
    path = os.path.join(ckpt_dir, RNG_FILE.format(rank=rank))
    if not os.path.exists(path):
        logger.warning("no RNG state for rank %d in %s (world size changed?)", rank, ckpt_dir)
        return False
    state = torch.load(path, weights_only=False)
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return True


def prune_checkpoints(run_dir: str, keep: int) -> list[str]:
    """Keeps `latest` and the newest `keep - 1` checkpoints before it; deletes the rest,
    including directories newer than `latest` (left by a save that was killed). Returns the
    deleted paths. Call on one rank after a save completed."""
    root = checkpoint_root(run_dir)
    latest = latest_checkpoint(run_dir)
    if latest is None or keep < 1:
        return []
    dirs = [os.path.join(root, d) for d in os.listdir(root)
            if not d.startswith(".") and d != LATEST and os.path.isdir(os.path.join(root, d))]
    others = sorted((d for d in dirs if os.path.realpath(d) != latest), key=os.path.getmtime)
    latest_mtime = os.path.getmtime(latest)
    older = [d for d in others if os.path.getmtime(d) <= latest_mtime]
    doomed = [d for d in others if os.path.getmtime(d) > latest_mtime] + older[:max(len(older) - (keep - 1), 0)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return sorted(doomed)
