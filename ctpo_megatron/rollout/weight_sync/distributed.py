"""Weight sync by broadcast: trainer rank 0 + every server rank form one process group
(`/init_weights_update_group`), then per bucket one `/update_weights_from_distributed` call on
each server runs while the trainer broadcasts the bucket, inside a begin/end session.

Each bucket travels as SGLang's `flattened_bucket`: one uint8 buffer, the tensors' bytes
concatenated in list order (one dtype per bucket, so offsets stay aligned). NCCL on GPUs; gloo
on CPU (the embedded server maps `nccl` to gloo when it has no CUDA).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from ctpo_megatron.parallel.net import free_port
from ctpo_megatron.rollout.weight_sync.base import (NamedTensors, WeightUpdater, dtype_name,
                                                    iter_buckets, wait_all)
from ctpo_megatron.rollout.weight_sync.process_group import (destroy_custom_process_group,
                                                             init_custom_process_group)

logger = logging.getLogger(__name__)


def flatten_bucket(bucket: list[tuple[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
    """The bucket's bytes as one uint8 tensor on `device`, tensors in list order, no padding."""
    sizes = [t.numel() * t.element_size() for _, t in bucket]
    flat = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
    offset = 0
    for (_, t), size in zip(bucket, sizes):
        flat[offset:offset + size].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
        offset += size
    return flat


class DistributedWeightUpdater(WeightUpdater):
    """`transport="distributed"`."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.pg: dist.ProcessGroup | None = None
        backend = cfg.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        self.backend = backend
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" \
            else torch.device("cpu")

    def connect(self, urls: list[str]) -> None:
        """Creates the group: trainer rank 0, server i's TP ranks at 1 + i * server_tp_size."""
        super().connect(urls)
        assert self.calls is not None
        cfg = self.cfg
        port = cfg.master_port or free_port()
        world_size = 1 + cfg.server_tp_size * len(urls)
        futures = self.calls.submit_all("/init_weights_update_group", lambda i, url: {
            "master_address": cfg.master_address, "master_port": port,
            "rank_offset": 1 + i * cfg.server_tp_size, "world_size": world_size,
            "group_name": cfg.group_name, "backend": self.backend})
        try:
            # Rank 0 hosts the rendezvous store; it joins while the servers are joining.
            self.pg = init_custom_process_group(
                master_address=cfg.master_address, master_port=port, rank=0, world_size=world_size,
                group_name=cfg.group_name, backend=self.backend, timeout_s=cfg.http_timeout_s)
        finally:
            wait_all(futures)
        logger.info("weight-update group %s ready: %d servers, world size %d (%s)", cfg.group_name,
                    len(urls), world_size, self.backend)

    def _send(self, named_tensors: NamedTensors, version: str) -> dict[str, int]:
        if self.pg is None or self.calls is None:
            raise RuntimeError("call connect(urls) before update()")
        self.calls.all("/begin_weight_update", {})
        total = buckets = 0
        try:
            pending = None
            for bucket in iter_buckets(named_tensors, self.cfg.bucket_bytes):
                if pending is not None:
                    self._broadcast(pending, None)
                pending = bucket
                buckets += 1
                total += sum(t.numel() * t.element_size() for _, t in bucket)
            if pending is None:
                raise ValueError("weight sync got no tensors")
            self._broadcast(pending, version)  # the version and the flush go with the last bucket
        finally:
            self.calls.all("/end_weight_update", {})
        return {"bytes": total, "buckets": buckets}

    def _broadcast(self, bucket: list[tuple[str, torch.Tensor]], version: str | None) -> None:
        assert self.calls is not None and self.pg is not None
        body = {"names": [n for n, _ in bucket], "dtypes": [dtype_name(t.dtype) for _, t in bucket],
                "shapes": [list(t.shape) for _, t in bucket], "group_name": self.cfg.group_name,
                "load_format": "flattened_bucket", "flush_cache": version is not None,
                "weight_version": version}
        flat = flatten_bucket(bucket, self.device)
        futures = self.calls.submit_all("/update_weights_from_distributed", lambda i, url: body)
        try:
            dist.broadcast(flat, src=0, group=self.pg)
        finally:
            wait_all(futures)

    def close(self) -> None:
        if self.pg is not None:
            if self.calls is not None:
                try:
                    self.calls.all("/destroy_weights_update_group", {"group_name": self.cfg.group_name})
                except Exception as e:  # noqa: BLE001 - best effort at shutdown
                    logger.warning("destroy_weights_update_group failed: %s", e)
            destroy_custom_process_group(self.pg)
            self.pg = None
        super().close()
