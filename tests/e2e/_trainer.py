"""Shared by the e2e tests: the trainer's torchrun command on a tiny_setup output, run to the end."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def trainer_command(run_dir: str, model: str, train: str, val: str, overrides: list[str], *,
                    ranks: int = 2) -> list[str]:
    """`torchrun --standalone --nproc-per-node ranks -m ctpo_megatron.train --config-name tiny`
    with the run directory, model and data files set, plus `overrides`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
            "-m", "ctpo_megatron.train", "--config-name", "tiny", f"trainer.run_dir={run_dir}",
            f"model.path={model}", f"data.train_files=[{train}]", f"data.val_files=[{val}]", *overrides]


def run_trainer(run_dir: str, model: str, train: str, val: str, overrides: list[str], *,
                ranks: int = 2, timeout_s: float = 600.0) -> subprocess.CompletedProcess:
    """`trainer_command`, waited for (output captured; OMP_NUM_THREADS=1, this checkout first
    on PYTHONPATH)."""
    cmd = trainer_command(run_dir, model, train, val, overrides, ranks=ranks)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
