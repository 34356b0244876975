"""Weight sync through a shared filesystem: safetensors files + `/update_weights_from_disk`.

Each update writes `disk_dir/<version>/model-XXXXX.safetensors` (one file per bucket, plus the
*.json files of `disk_config_dir` when set), then every server loads that directory in one
call (no begin/end session needed). Old checkpoints beyond `disk_keep` are deleted.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from safetensors.torch import save_file

from ctpo_megatron.rollout.weight_sync.base import (NamedTensors, WeightUpdater, iter_buckets,
                                                    to_safetensors_dict)

logger = logging.getLogger(__name__)


def _safe_dirname(version: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", version) or "version"


class DiskWeightUpdater(WeightUpdater):
    """`transport="disk"`."""

    def _send(self, named_tensors: NamedTensors, version: str) -> dict[str, int]:
        root = Path(self.cfg.disk_dir)
        out = root / _safe_dirname(version)
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        total = buckets = 0
        for bucket in iter_buckets(named_tensors, self.cfg.bucket_bytes):
            buckets += 1
            tensors = to_safetensors_dict(bucket)
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            save_file(tensors, str(out / f"model-{buckets:05d}.safetensors"))
        if not buckets:
            raise ValueError("weight sync got no tensors")
        if self.cfg.disk_config_dir:
            for cfg_file in Path(self.cfg.disk_config_dir).glob("*.json"):
                if "index" not in cfg_file.name:  # a stale shard index would name other files
                    shutil.copy(cfg_file, out / cfg_file.name)
        body = {"model_path": str(out.resolve()), "weight_version": version, "flush_cache": True}
        assert self.calls is not None
        self.calls.all("/update_weights_from_disk", body)
        self._prune(root, keep=out)
        return {"bytes": total, "buckets": buckets}

    def _prune(self, root: Path, keep: Path) -> None:
        olds = sorted((p for p in root.iterdir() if p.is_dir() and p != keep),
                      key=lambda p: p.stat().st_mtime)
        for old in olds[: max(0, len(olds) - self.cfg.disk_keep)]:
            shutil.rmtree(old, ignore_errors=True)
