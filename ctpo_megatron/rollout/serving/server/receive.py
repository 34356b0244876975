"""Receiving broadcast weights on the embedded server (`/update_weights_from_distributed`).

Two layouts, as SGLang: `flattened_bucket` (one uint8 broadcast of the bucket's bytes in list
order) and per tensor (one broadcast per name, in list order). The per-tensor path receives
straight into the model's parameter memory when dtype, shape and layout match: no staging
copy on either side. Every broadcast is always received, even for a bad name, so the trainer
never hangs; errors are raised afterwards.
"""

from __future__ import annotations

import torch

from ctpo_megatron.rollout.serving.server.model_runner import ModelRunner
from ctpo_megatron.rollout.weight_sync.process_group import SideGroup


def parse_dtypes(names: list[str], dtypes: list[str]) -> list[torch.dtype]:
    out = []
    for name, dtype in zip(names, dtypes):
        dt = getattr(torch, dtype, None)
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"tensor {name!r}: dtype {dtype!r} is not a torch dtype name")
        out.append(dt)
    return out


def comm_device(pg, runner: ModelRunner) -> torch.device:
    """Where receive buffers live: the model's CUDA device for NCCL, else CPU (gloo)."""
    return runner.device if pg.backend == "nccl" else torch.device("cpu")


def receive_flattened(pg: SideGroup, names: list[str], dtypes: list[str], shapes: list[list[int]],
                      buffers: dict, device: torch.device) -> list[tuple[str, torch.Tensor]]:
    """Receives one flattened bucket; returns views into a reused buffer (load before next call).

    buffers: holds the grow-only receive buffer (fresh large buffers cost page faults).
    """
    dts = parse_dtypes(names, dtypes)
    sizes = [torch.Size(s).numel() * dt.itemsize for s, dt in zip(shapes, dts)]
    total = sum(sizes)
    if buffers.get("flat") is None or buffers["flat"].numel() < total:
        buffers["flat"] = torch.empty(total, dtype=torch.uint8, device=device)
    flat = buffers["flat"][:total]
    pg.broadcast(flat)
    out, offset = [], 0
    for name, dt, shape, size in zip(names, dts, shapes, sizes):
        if offset % dt.itemsize:
            raise ValueError(f"Unaligned received tensor {name}: byte offset {offset}, dtype {dt}")
        out.append((name, flat[offset:offset + size].view(dt).view(shape)))
        offset += size
    return out


@torch.no_grad()
def receive_into_model(pg, names: list[str], dtypes: list[str], shapes: list[list[int]],
                       runner: ModelRunner, into_model: bool = True) -> list[torch.Tensor]:
    """Receives one broadcast per tensor, into the parameter itself where possible; returns the
    received tensors in order. `into_model=False` (a TP rank that only receives): fresh buffers.

    Call with the model-update lock held. Raises (after all receives) on unknown names or
    shape mismatches.
    """
    dts = parse_dtypes(names, dtypes)
    device = comm_device(pg, runner)
    errors, staged, received = [], [], []
    works = []
    for name, dt, shape in zip(names, dts, shapes):
        target = runner._named.get(name) if into_model else None
        direct = (target is not None and target.dtype == dt and list(target.shape) == list(shape)
                  and target.is_contiguous() and target.device == device)
        buf = target.data if direct else torch.empty(shape, dtype=dt, device=device)
        works.append(pg.broadcast(buf, async_op=True))
        received.append(buf)
        if not direct:
            staged.append((name, buf))
    for work in works:
        work.wait()
    if into_model:
        for name, buf in staged:
            try:
                runner.load_weights([(name, buf)])
            except (KeyError, ValueError) as e:
                errors.append(str(e))
    if errors:
        raise ValueError("; ".join(errors))
    return received
