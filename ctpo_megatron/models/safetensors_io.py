"""Reading slices of HF safetensors checkpoints and writing sharded ones.

`SafetensorsReader` opens a single `model.safetensors` or a sharded checkpoint described by
`model.safetensors.index.json` and reads only the requested slice of a tensor (safetensors'
`get_slice`), so each rank's memory stays proportional to its shard.
`ShardedSafetensorsWriter` streams tensors into files of bounded size plus an index.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsReader:
    """Reads tensors or slices of tensors from an HF checkpoint directory (any rank, no comms)."""

    def __init__(self, model_dir: str | os.PathLike):
        from safetensors import safe_open

        self._safe_open = safe_open
        self.model_dir = Path(model_dir)
        index = self.model_dir / INDEX_FILE
        single = self.model_dir / SINGLE_FILE
        if index.is_file():
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no 'weight_map' object")
            self.weight_map: dict[str, str] = dict(weight_map)
        elif single.is_file():
            with safe_open(str(single), framework="pt") as f:
                self.weight_map = {name: SINGLE_FILE for name in f.keys()}
        else:
            raise FileNotFoundError(f"{self.model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
        self._handles: dict[str, object] = {}

    def _handle(self, name: str):
        if name not in self.weight_map:
            raise ValueError(f"tensor {name!r} is missing from the checkpoint in {self.model_dir}")
        file = self.weight_map[name]
        if file not in self._handles:
            path = self.model_dir / file
            if not path.is_file():
                raise FileNotFoundError(f"tensor {name!r}: shard file {path} does not exist")
            self._handles[file] = self._safe_open(str(path), framework="pt")
        return self._handles[file]

    def shape(self, name: str) -> tuple[int, ...]:
        """Full shape of tensor `name` as stored."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """Stored dtype of tensor `name` (read from the header, no data)."""
        sl = self._handle(name).get_slice(name)
        return _SAFETENSORS_DTYPES[sl.get_dtype()]

    def read(self, name: str, index: tuple, *, expected_shape: tuple[int, ...]) -> torch.Tensor:
        """Reads `tensor[index]` after checking its full shape is `expected_shape`."""
        sl = self._handle(name).get_slice(name)
        shape = tuple(sl.get_shape())
        if shape != tuple(expected_shape):
            raise ValueError(f"tensor {name!r} in {self.model_dir} has shape {shape}, "
                             f"expected {tuple(expected_shape)}")
        return sl[index]

    def close(self) -> None:
        """Drops the open file handles (safetensors closes a file when its handle is freed)."""
        self._handles.clear()


_SAFETENSORS_DTYPES = {
    "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class ShardedSafetensorsWriter:
    """Streams tensors into `model-0000k-of-0000n.safetensors` files of at most
    `max_shard_bytes` each (a single `model.safetensors` if everything fits) plus the index."""

    def __init__(self, out_dir: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files: list[list[str]] = []
        self._total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous().cpu()
        self._pending_bytes += nbytes
        self._total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        index = len(self._files)
        save_file(self._pending, str(self.out_dir / f"shard-{index}.tmp"), metadata={"format": "pt"})
        self._files.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Writes the last file, renames the files to HF's names and writes the index if sharded."""
        if self._pending or not self._files:
            self._flush()
        n = len(self._files)
        names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        mode = 0o666 & ~_umask()  # safetensors creates 0600 files; others must read a model
        for i, name in enumerate(names):
            os.replace(self.out_dir / f"shard-{i}.tmp", self.out_dir / name)
            os.chmod(self.out_dir / name, mode)
        if n > 1:
            weight_map = {t: names[i] for i, tensors in enumerate(self._files) for t in tensors}
            with open(self.out_dir / INDEX_FILE, "w") as f:
                json.dump({"metadata": {"total_size": self._total_bytes},
                           "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        return names


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; restore at once
    os.umask(mask)
    return mask
