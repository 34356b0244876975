"""Slice reads from single-file and sharded safetensors checkpoints, and their errors."""

import pytest
import torch
from safetensors.torch import save_file

from ctpo_megatron.models.safetensors_io import SafetensorsReader, ShardedSafetensorsWriter


def test_sharded_round_trip_and_slice_reads(tmp_path):
    tensors = {f"t{i}": torch.arange(40, dtype=torch.float32).reshape(8, 5) + i for i in range(5)}
    writer = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=400)  # 160 B each -> 3 files
    for name, t in tensors.items():
        writer.add(name, t)
    files = writer.finish()
    assert len(files) == 3 and (tmp_path / "model.safetensors.index.json").is_file()
    reader = SafetensorsReader(tmp_path)
    assert reader.read("t3", (slice(2, 4),), expected_shape=(8, 5)).tolist() == tensors["t3"][2:4].tolist()
    assert torch.equal(reader.read("t4", (slice(None), slice(1, 3)), expected_shape=(8, 5)),
                       tensors["t4"][:, 1:3])
    with pytest.raises(ValueError, match=r"tensor 't1' .* has shape \(8, 5\), expected \(5, 8\)"):
        reader.read("t1", (slice(None),), expected_shape=(5, 8))
    with pytest.raises(ValueError, match="tensor 'missing' is missing"):
        reader.read("missing", (slice(None),), expected_shape=(1,))


def test_single_file_and_no_checkpoint(tmp_path):
    save_file({"w": torch.ones(3)}, str(tmp_path / "model.safetensors"))
    assert SafetensorsReader(tmp_path).dtype("w") == torch.float32
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        SafetensorsReader(tmp_path / "nothing_here")
