"""A process group that lives beside the default one: trainer rank 0 + the servers' ranks.

SGLang's `/init_weights_update_group` joins such a group by TCP rendezvous at
`master_address:master_port` (its `init_custom_process_group`: rendezvous, a `PrefixStore`
keyed by `group_name`, then a new backend group without touching the default group). The
trainer side must join the same way; the embedded server uses this helper too. torch has no
public API for a second "world", so this uses the same c10d internals SGLang uses.
"""

from __future__ import annotations

import datetime
import logging

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

logger = logging.getLogger(__name__)


def resolve_backend(backend: str) -> str:
    """`nccl` without CUDA becomes `gloo` (the CPU embedded server); anything else is kept."""
    if backend == "nccl" and not torch.cuda.is_available():
        return "gloo"
    return backend


def init_custom_process_group(*, master_address: str, master_port: int, rank: int, world_size: int,
                              group_name: str, backend: str = "gloo",
                              timeout_s: float = 600.0) -> dist.ProcessGroup:
    """Joins (rank 0: hosts) a group of `world_size` ranks at tcp://master_address:master_port.

    Blocks until every rank joined or `timeout_s` passes. The returned group works with
    `torch.distributed.broadcast(tensor, src=0, group=pg)`.
    """
    if not group_name:
        raise ValueError("group_name must be a non-empty string")
    timeout = datetime.timedelta(seconds=timeout_s)
    url = f"tcp://{master_address}:{master_port}"
    store, rank, world_size = next(c10d.rendezvous(url, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = dist.PrefixStore(group_name, store)
    pg, _ = c10d._new_process_group_helper(world_size, rank, [], dist.Backend(backend), store,
                                           group_name=group_name, timeout=timeout)
    # Collectives translate group ranks through this map; ranks here are global to the group.
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    logger.info("joined weight-update group %s as rank %d of %d (%s)", group_name, rank,
                world_size, backend)
    return pg


def destroy_custom_process_group(pg: dist.ProcessGroup) -> None:
    """Tears down a group made by `init_custom_process_group`."""
    dist.destroy_process_group(pg)
