"""The metrics sink: one JSON line per step in `metrics.jsonl`, plus TensorBoard scalars and
Weights & Biases when `trainer.loggers` asks for them.

Metrics are flat `name -> float` dicts with `/`-separated names (`loss/policy`,
`clip/high`, `clip_rate_by_pos/4-7`, `time/rollout`, ...). Only rank 0 writes. On resume the
JSONL file is truncated to the steps before the resumed step, so no step is counted twice
(TensorBoard purges them; W&B plots against our `step`, see `wandb_logger`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ctpo_megatron.config.schema import TrainConfig
    from ctpo_megatron.config.trainer import WandbConfig

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsSink:
    """Appends per-step metrics to `<run_dir>/metrics.jsonl`, TensorBoard event files and (when
    `wandb` is given) the run directory's W&B run."""

    def __init__(self, run_dir: str, *, tensorboard: bool = True, resume_step: int = 0,
                 wandb: "WandbConfig | None" = None,
                 run_config: Mapping[str, Any] | None = None) -> None:
        """resume_step: the first step this process will log; lines of later steps left by a
        killed run (logged after its last checkpoint) are dropped. wandb: log to W&B with these
        settings (needs the wandb package); run_config: the resolved config shown in W&B."""
        os.makedirs(run_dir, exist_ok=True)
        self.run_dir = run_dir
        self._wandb = None
        if wandb is not None:  # first: a missing package fails before any file is touched
            from ctpo_megatron.trainer.wandb_logger import WandbLogger

            self._wandb = WandbLogger(run_dir, wandb, run_config)
        self.path = os.path.join(run_dir, METRICS_FILE)
        _truncate_after(self.path, resume_step)
        self._file = open(self.path, "a")
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(os.path.join(run_dir, TENSORBOARD_DIR),
                                             purge_step=resume_step if resume_step else None)
            except ImportError as e:  # tensorboard is a declared dependency; keep JSONL anyway
                logger.warning("TensorBoard disabled: %s", e)

    @classmethod
    def from_config(cls, cfg: "TrainConfig", *, resume_step: int = 0) -> "MetricsSink":
        """The sink `cfg.trainer.loggers` asks for, in `cfg.trainer.run_dir`."""
        from omegaconf import OmegaConf

        tc = cfg.trainer
        wandb = tc.wandb if "wandb" in tc.loggers else None
        run_config = OmegaConf.to_container(OmegaConf.structured(cfg)) if wandb else None
        return cls(tc.run_dir, tensorboard="tensorboard" in tc.loggers, resume_step=resume_step,
                   wandb=wandb, run_config=run_config)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Writes the metrics of `step` (non-finite values are kept in JSONL as null)."""
        record = {"step": step}
        for key, value in metrics.items():
            value = float(value)
            record[key] = value if math.isfinite(value) else None
            if self._writer is not None and math.isfinite(value):
                self._writer.add_scalar(key, value, step)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            self._writer.flush()
        if self._wandb is not None:
            self._wandb.log(step, metrics)

    def close(self) -> None:
        """Flushes and closes every logger; with W&B, first draws the run's plots
        (`ctpo_megatron.plot`) and logs them as images."""
        if self._file.closed:
            return
        self._file.close()
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            try:
                if self._wandb.cfg.log_plots:
                    self._log_plots()
            finally:
                self._wandb.close()

    def _log_plots(self) -> None:
        from ctpo_megatron.plot import plot_run

        try:
            paths = plot_run(self.run_dir)
        except Exception as e:  # noqa: BLE001 - a plot must not fail the end of a finished run
            logger.warning("plots not logged to W&B: drawing them failed: %s", e)
            return
        self._wandb.log_images(paths)


def _truncate_after(path: str, first_step: int) -> None:
    if not os.path.exists(path):
        return
    kept = [r for r in read_metrics(path) if r["step"] < first_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for record in kept:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def read_metrics(path: str) -> list[dict]:
    """Records of a metrics.jsonl file (a torn last line from a killed run is skipped)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def padding_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """`perf/padding_ratio`: tokens the actor computed (padding included) per useful token, from
    `PolicyActor.pop_token_counts` averaged over ranks (every replica has as many ranks, so the
    ratio of the means is that of the sums). 1.0 is no padding; {} without the counts."""
    useful = metrics.get("perf/actor_tokens_useful", 0.0)
    if not useful:
        return {}
    return {"perf/padding_ratio": metrics["perf/actor_tokens_computed"] / useful}


def mean_metrics(dicts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Key-wise mean over metric dicts (keys missing from some dicts average over the rest)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            sums[k] = sums.get(k, 0.0) + float(v)
            counts[k] = counts.get(k, 0) + 1
    return {k: sums[k] / counts[k] for k in sums}
