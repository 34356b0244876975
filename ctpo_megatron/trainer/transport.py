"""Sending each DP replica its shard of the step batch, as tensors, from rank 0.

Rank 0 builds the step batch and one shard per DP replica. Each replica's shard travels only
to that replica's ranks (its TP/PP/CP peers): one process group per replica, made of rank 0
and the replica's ranks, carries a small int64 header (names, dtypes, shapes) and then the
shard's tensors by broadcast. No rank receives another replica's rows and nothing is pickled.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_DTYPES = (torch.int64, torch.float32, torch.float64, torch.int32, torch.bool)
MAX_DIMS = 4


class ShardTransport:
    """Rank 0 -> the ranks of each DP replica. Construct on every rank (it creates the groups:
    a collective), then call `exchange` on every rank once per step."""

    def __init__(self, dp_rank: int, field_names: list[str], device: torch.device) -> None:
        """dp_rank: this rank's DP replica index; field_names: every name a shard may hold, in
        a fixed order (the header refers to them by index); device: where collectives run
        (CUDA under NCCL, CPU under gloo)."""
        self.names = list(field_names)
        self.device = device
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.dp_rank = dp_rank
        self.groups: list[tuple[list[int], object]] = []
        if self.world == 1:
            return
        replica_of: list[int | None] = [None] * self.world
        dist.all_gather_object(replica_of, dp_rank)
        self.dp_size = max(replica_of) + 1
        for r in range(self.dp_size):
            ranks = sorted({0} | {g for g, d in enumerate(replica_of) if d == r})
            # new_group is collective over the whole world: every rank creates every group.
            group = dist.new_group(ranks) if len(ranks) > 1 else None
            self.groups.append((ranks, group))

    def exchange(self, shards: list[dict[str, torch.Tensor]] | None) -> dict[str, torch.Tensor]:
        """Rank 0 passes one `name -> tensor` dict per DP replica; every rank gets its own
        replica's dict back (tensors on the CPU)."""
        if self.world == 1:
            return shards[0]
        mine = None
        for r, (ranks, group) in enumerate(self.groups):
            if self.rank == 0:
                if r == self.dp_rank:
                    mine = shards[r]
                if group is not None:
                    self._send(shards[r], group)
            elif self.dp_rank == r:
                mine = self._receive(group)
        return mine

    def _send(self, tensors: dict[str, torch.Tensor], group) -> None:
        header = [len(tensors)]
        for name, t in tensors.items():
            if t.dim() > MAX_DIMS:
                raise ValueError(f"shard field {name!r} has {t.dim()} dims (at most {MAX_DIMS})")
            shape = list(t.shape) + [0] * (MAX_DIMS - t.dim())
            header += [self.names.index(name), _DTYPES.index(t.dtype), t.dim(), *shape]
        size = torch.tensor([len(header)], dtype=torch.int64, device=self.device)
        dist.broadcast(size, group=group, group_src=0)
        dist.broadcast(torch.tensor(header, dtype=torch.int64, device=self.device), group=group, group_src=0)
        for t in tensors.values():
            dist.broadcast(t.contiguous().to(self.device), group=group, group_src=0)

    def _receive(self, group) -> dict[str, torch.Tensor]:
        size = torch.zeros(1, dtype=torch.int64, device=self.device)
        dist.broadcast(size, group=group, group_src=0)
        header = torch.zeros(int(size.item()), dtype=torch.int64, device=self.device)
        dist.broadcast(header, group=group, group_src=0)
        values = header.tolist()
        out, pos = {}, 1
        for _ in range(values[0]):
            name, dtype, ndim = values[pos], values[pos + 1], values[pos + 2]
            shape = values[pos + 3: pos + 3 + ndim]
            pos += 3 + MAX_DIMS
            t = torch.empty(shape, dtype=_DTYPES[dtype], device=self.device)
            dist.broadcast(t, group=group, group_src=0)
            out[self.names[name]] = t.cpu()
        return out
