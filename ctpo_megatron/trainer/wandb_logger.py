"""Weights & Biases backend of the metrics sink (optional: needs the `wandb` package).

One W&B run per run directory: its id is kept in `<run_dir>/wandb_run_id`, so a requeued or
restarted run logs into the same W&B run (`resume="allow"`). Metrics are logged against our
own `step` (W&B's x-axis is set to it with `define_metric`), so steps that a killed run logged
after its last checkpoint and the resumed run logs again do not trip W&B's "steps must increase"
rule. Offline mode (`trainer.wandb.mode=offline` or `WANDB_MODE=offline`) writes
`<run_dir>/wandb/offline-run-*/`; upload it later with `wandb sync`.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from ctpo_megatron.config.trainer import WandbConfig

logger = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id"
STEP_KEY = "step"


def import_wandb():
    """The `wandb` module, or ImportError saying how to get it."""
    try:
        import wandb
    except ImportError as e:
        raise ImportError("trainer.loggers includes wandb, but the wandb package is not installed: "
                          "pip install wandb (or the ctpo_megatron[wandb] extra), or drop wandb "
                          "from trainer.loggers") from e
    return wandb


def run_id(run_dir: str) -> str:
    """The W&B run id of `run_dir`: read from `wandb_run_id`, or a new random one written there
    (before the run starts, so a crash during start-up still reuses it)."""
    path = os.path.join(run_dir, RUN_ID_FILE)
    if os.path.exists(path):
        with open(path) as f:
            value = f.read().strip()
        if value:
            return value
    value = uuid.uuid4().hex[:12]  # W&B ids: letters and digits
    with open(path + ".tmp", "w") as f:
        f.write(value + "\n")
    os.replace(path + ".tmp", path)
    return value


class WandbLogger:
    """Logs step metrics and images to the W&B run of a run directory (rank 0 only)."""

    def __init__(self, run_dir: str, cfg: WandbConfig, run_config: Mapping[str, Any] | None = None):
        wandb = import_wandb()
        self._wandb = wandb
        self.cfg = cfg
        self.run_id = run_id(run_dir)
        kwargs: dict[str, Any] = dict(
            project=cfg.project, entity=cfg.entity or None,
            name=cfg.name or os.path.basename(os.path.abspath(run_dir)),
            group=cfg.group or None, tags=list(cfg.tags) or None, id=self.run_id,
            resume="allow", dir=run_dir, config=dict(run_config or {}))
        if cfg.mode:
            kwargs["mode"] = cfg.mode
        self.run = wandb.init(**kwargs)
        self.run.define_metric(STEP_KEY)
        self.run.define_metric("*", step_metric=STEP_KEY)
        self._last_step = 0
        logger.info("W&B run %s (project %s, mode %s)", self.run_id, cfg.project,
                    cfg.mode or os.environ.get("WANDB_MODE", "online"))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Logs the finite values of `metrics` at `step`."""
        row = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        row[STEP_KEY] = step
        self.run.log(row)
        self._last_step = step

    def log_images(self, paths: Sequence[str], prefix: str = "plots/") -> None:
        """Logs PNG files as images named `<prefix><file stem>` at the last logged step."""
        row: dict[str, Any] = {f"{prefix}{os.path.splitext(os.path.basename(p))[0]}":
                               self._wandb.Image(p) for p in paths}
        row[STEP_KEY] = self._last_step
        self.run.log(row)

    def close(self) -> None:
        self.run.finish()
