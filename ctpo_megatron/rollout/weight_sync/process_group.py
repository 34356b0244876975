"""A process group that lives beside the default one: trainer rank 0 + the servers' ranks.

SGLang's `/init_weights_update_group` joins such a group by TCP rendezvous at
`master_address:master_port` (its `init_custom_process_group`: a TCP store, a `PrefixStore`
keyed by `group_name`, then a new backend group without touching the default group). torch has
no public API for a second "world", so this uses the same c10d internals SGLang uses.

Who hosts the store: rank 0 (trainer rank 0) creates the `TCPStore` itself with
`is_master=True`; every other rank is a client. `c10d.rendezvous("tcp://...")` is not used:
under torchrun (`TORCHELASTIC_USE_AGENT_STORE=True`) it makes *every* rank a client of a store
that torchrun's agent would host, and nobody hosts this one (both sides time out).
"""

from __future__ import annotations

import datetime
import logging
import socket
from urllib.parse import urlsplit

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

logger = logging.getLogger(__name__)
_STORES: dict = {}


def resolve_backend(backend: str) -> str:
    """`nccl` without CUDA becomes `gloo` (the CPU embedded server); anything else is kept."""
    if backend == "nccl" and not torch.cuda.is_available():
        return "gloo"
    return backend


def routable_address(server_urls: list[str]) -> str:
    """This host's address on the interface that routes to the first server.

    A UDP `connect` sends nothing; it only asks the kernel which source address it would use
    for that destination. Returns 127.0.0.1 when the server is on this host's loopback.
    Raises ValueError when no URL is given or its host cannot be resolved / routed to.
    """
    if not server_urls:
        raise ValueError("routable_address needs at least one server URL")
    url = server_urls[0] if "://" in server_urls[0] else f"http://{server_urls[0]}"
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or 80
    if not host:
        raise ValueError(f"server URL {server_urls[0]!r} has no host")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((host, port))
            return sock.getsockname()[0]
    except OSError as e:
        raise ValueError(f"no route from this host to server {url} ({host}): {e}") from None


def host_store(port: int = 0, world_size: int | None = None, timeout_s: float = 600.0) -> dist.TCPStore:
    """Rank 0's rendezvous store, listening on every interface; `port=0` picks a free port
    (read it back from `store.port`)."""
    return dist.TCPStore("0.0.0.0", port, world_size, is_master=True,
                         timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


def _client_or_host(master_address: str, master_port: int, rank: int, world_size: int,
                    timeout_s: float, store: dist.Store | None) -> dist.Store:
    if store is not None:
        return store
    if rank == 0:
        return host_store(master_port, world_size, timeout_s)
    return dist.TCPStore(master_address, master_port, world_size, is_master=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def _check_rank(group_name: str, rank: int, world_size: int) -> None:
    if not group_name:
        raise ValueError("group_name must be a non-empty string")
    if not 0 <= rank < world_size:
        raise ValueError(f"weight-update group {group_name!r}: rank {rank} is outside world size "
                         f"{world_size} (rank offsets or TP sizes disagree)")


def init_custom_process_group(*, master_address: str, master_port: int, rank: int, world_size: int,
                              group_name: str, backend: str = "gloo", timeout_s: float = 600.0,
                              store: dist.Store | None = None) -> dist.ProcessGroup:
    """Joins a group of `world_size` ranks whose store is at master_address:master_port, the
    way SGLang's ranks do (same store keys), as a c10d group registered under `group_name`
    (one rank of a given group name per process).

    Rank 0 hosts the store: pass the store from `host_store()` (or none, and one is created on
    `master_port`). Other ranks connect as clients. Blocks until every rank joined or
    `timeout_s` passes. The group works with `dist.broadcast(tensor, src=0, group=pg)`.
    """
    _check_rank(group_name, rank, world_size)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = _client_or_host(master_address, master_port, rank, world_size, timeout_s, store)
    store.set_timeout(timeout)
    pg, _ = c10d._new_process_group_helper(world_size, rank, [], dist.Backend(backend),
                                           dist.PrefixStore(group_name, store),
                                           group_name=group_name, timeout=timeout)
    # Collectives translate group ranks through this map; ranks here are global to the group.
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    _STORES[pg] = store  # the store (rank 0: its server) must live as long as the group
    logger.info("joined weight-update group %s as rank %d of %d (%s)", group_name, rank,
                world_size, backend)
    return pg


class SideGroup:
    """One rank's membership of a weight-update group, outside torch's group registry, so one
    process can hold several ranks of the same group (the TP ranks of an embedded server).
    Uses the store keys `init_custom_process_group` (and SGLang) use, so both kinds meet."""

    def __init__(self, *, master_address: str, master_port: int, rank: int, world_size: int,
                 group_name: str, backend: str = "gloo", timeout_s: float = 600.0):
        _check_rank(group_name, rank, world_size)
        timeout = datetime.timedelta(seconds=timeout_s)
        self.store = _client_or_host(master_address, master_port, rank, world_size, timeout_s, None)
        self.store.set_timeout(timeout)
        device = "cuda" if backend == "nccl" else "cpu"
        # The key layout of c10d's group helper: <name>/ + <name>/ + <device>/.
        keys = dist.PrefixStore(f"{device}/", dist.PrefixStore(f"{group_name}/",
                                                               dist.PrefixStore(group_name, self.store)))
        if backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.impl = dist.ProcessGroupNCCL(keys, rank, world_size, opts)
        elif backend == "gloo":
            self.impl = dist.ProcessGroupGloo(keys, rank, world_size, timeout)
        else:
            raise ValueError(f"weight-update group backend {backend!r}: expected nccl or gloo")
        self.backend, self.rank, self.world_size, self.group_name = backend, rank, world_size, group_name
        logger.info("joined weight-update group %s as rank %d of %d (%s)", group_name, rank,
                    world_size, backend)

    def broadcast(self, tensor: torch.Tensor, async_op: bool = False):
        """Receives (or, on rank 0, sends) `tensor` from rank 0; a Work when `async_op`."""
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        work = self.impl.broadcast([tensor], opts)
        if async_op:
            return work
        work.wait()
        return None

    def destroy(self) -> None:
        shutdown = getattr(self.impl, "shutdown", None) or getattr(self.impl, "abort", None)
        if shutdown is not None:
            try:
                shutdown()
            except Exception as e:  # noqa: BLE001 - best effort
                logger.warning("closing weight-update group %s: %s", self.group_name, e)
        self.impl = None


def destroy_custom_process_group(pg: dist.ProcessGroup) -> None:
    """Tears down a group made by `init_custom_process_group`."""
    if isinstance(pg, SideGroup):
        pg.destroy()
        return
    dist.destroy_process_group(pg)
    _STORES.pop(pg, None)
