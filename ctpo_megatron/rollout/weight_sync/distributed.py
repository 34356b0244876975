"""Weight sync by broadcast: trainer rank 0 + every server rank form one process group
(`/init_weights_update_group`), then per bucket one `/update_weights_from_distributed` call on
each server runs while the trainer broadcasts the bucket, inside a begin/end session.

A bucket travels either as SGLang's `flattened_bucket` (one uint8 buffer, the tensors' bytes
concatenated in list order; one dtype per bucket keeps offsets aligned) or per tensor (one
broadcast each, straight from the tensor's memory). `distributed_format="auto"` picks
flattened buckets on NCCL and per tensor on gloo. NCCL on GPUs; gloo on CPU (the embedded
server maps `nccl` to gloo when it has no CUDA).
"""

from __future__ import annotations

import concurrent.futures
import logging
import time

import torch
import torch.distributed as dist

from ctpo_megatron.rollout.weight_sync.base import (NamedTensors, WeightSyncError, WeightUpdater,
                                                    dtype_name, iter_buckets, server_tp_sizes,
                                                    wait_all)
from ctpo_megatron.rollout.weight_sync.process_group import (destroy_custom_process_group,
                                                             host_store, init_custom_process_group,
                                                             routable_address)

logger = logging.getLogger(__name__)


def flatten_bucket(bucket: list[tuple[str, torch.Tensor]], device: torch.device,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """The bucket's bytes as one uint8 tensor on `device`, tensors in list order, no padding.

    out: optional uint8 buffer with at least that many bytes, reused (fresh multi-MB buffers
    cost page faults on first write, as much as the copy itself on CPU).
    """
    sizes = [t.numel() * t.element_size() for _, t in bucket]
    total = sum(sizes)
    if out is not None and out.numel() >= total:
        flat = out[:total]
    else:
        flat = torch.empty(total, dtype=torch.uint8, device=device)
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
        self.pg_failed = False
        self.group_name = cfg.group_name
        self._generation = 0
        self._abandoned: list[dist.ProcessGroup] = []
        self.world_size, self.rank_offsets = 0, []
        self._buffers: list[torch.Tensor | None] = [None, None]
        backend = cfg.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        self.backend = backend
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" \
            else torch.device("cpu")
        fmt = cfg.distributed_format
        if fmt == "auto":
            # gloo (CPU): per-tensor broadcasts land straight in the server's parameters; NCCL:
            # one flattened buffer per bucket (fewer collectives), as SGLang recommends.
            fmt = "per_tensor" if backend == "gloo" else "flattened_bucket"
        self.format = fmt

    def connect(self, urls: list[str]) -> None:
        """Creates the group: trainer rank 0, then every TP rank of every server.

        Each server's TP size comes from its `/server_info` (checked against
        `server_tp_size` when that is set); server i's ranks start at 1 + the TP sizes of the
        servers before it, and the world size is 1 + their sum. Trainer rank 0 hosts the
        rendezvous store on a free port and publishes its routable address (`master_address:
        auto`). Calling it again (e.g. without a server that died) forms a fresh group.
        """
        self._drop_group()
        self.pg_failed = False
        super().connect(urls)
        assert self.calls is not None
        cfg = self.cfg
        tp_sizes = server_tp_sizes(self.calls, cfg.server_tp_size)
        offsets = [1 + sum(tp_sizes[:i]) for i in range(len(tp_sizes))]
        world_size = 1 + sum(tp_sizes)
        address = routable_address(self.calls.urls) if cfg.master_address == "auto" else cfg.master_address
        store = host_store(cfg.master_port, world_size, cfg.http_timeout_s)
        self._generation += 1
        name = cfg.group_name if self._generation == 1 else f"{cfg.group_name}-{self._generation}"
        futures = self.calls.submit_all("/init_weights_update_group", lambda i, url: {
            "master_address": address, "master_port": store.port, "rank_offset": offsets[i],
            "world_size": world_size, "group_name": name, "backend": self.backend})
        # Rank 0 joins while the servers are joining. A server that refuses (e.g. the group
        # name exists) would leave the join waiting until its timeout: watch the HTTP replies
        # and fail at once instead.
        join = self.calls.pool.submit(
            init_custom_process_group, master_address=address, master_port=store.port, rank=0,
            world_size=world_size, group_name=name, backend=self.backend,
            timeout_s=cfg.http_timeout_s, store=store)
        while not join.done():
            failed = [f for f in futures if f.done() and f.exception() is not None]
            if failed:
                raise failed[0].exception()
            time.sleep(0.01)
        if join.exception() is not None:
            # A server's own refusal (e.g. the group exists there) says more: give it a moment.
            concurrent.futures.wait(futures, timeout=10)
            failed = [f for f in futures if f.done() and f.exception() is not None]
            raise (failed[0].exception() if failed else join.exception())
        self.pg = join.result()
        self.group_name = name
        wait_all(futures)
        self.world_size, self.rank_offsets = world_size, offsets
        logger.info("weight-update group %s ready at %s:%d: %d servers (TP %s), world size %d (%s)",
                    name, address, store.port, len(urls), tp_sizes, world_size, self.backend)

    def _drop_group(self) -> None:
        """Forgets the current group (after a failure its collectives may never finish: it is
        not destroyed here, which could block on them)."""
        if self.pg is not None:
            self._abandoned.append(self.pg)
            self.pg = None
        if self.calls is not None:
            self.calls.close()
            self.calls = None

    def _send(self, named_tensors: NamedTensors, version: str) -> dict[str, int]:
        """Pipelined: bucket k+1 is flattened while bucket k is broadcast and loaded.

        The servers get one bucket call at a time (their receives must follow the broadcast
        order), so only the flatten overlaps; two reused buffers alternate.
        """
        if self.pg is None or self.calls is None:
            raise RuntimeError("call connect(urls) before update() (again after a failed update: "
                               "its group is unusable)")
        self.calls.all("/begin_weight_update", {})
        total = buckets = 0
        in_flight = None
        try:
            pending = None
            for bucket in iter_buckets(named_tensors, self.cfg.bucket_bytes):
                if pending is not None:
                    in_flight = self._start(pending, None, buckets % 2, in_flight)
                pending = bucket
                buckets += 1
                total += sum(t.numel() * t.element_size() for _, t in bucket)
            if pending is None:
                raise ValueError("weight sync got no tensors")
            # The version and the cache flush go with the last bucket.
            in_flight = self._start(pending, version, buckets % 2, in_flight)
        except BaseException:
            if not self.pg_failed:
                self._finish(in_flight)
            raise
        else:
            self._finish(in_flight)
        finally:
            if self.pg_failed:
                # Never wait on this group again; connect() forms a new one. The servers tear
                # their side down, which also ends receives still waiting for this group.
                self._abandoned.append(self.pg)
                self.pg = None
                self._destroy_on_servers()
            try:
                self.calls.all("/end_weight_update", {})
            except WeightSyncError as e:
                if not self.pg_failed:
                    raise
                logger.warning("end_weight_update after a failed update: %s", e)
        return {"bytes": total, "buckets": buckets}

    def _start(self, bucket: list[tuple[str, torch.Tensor]], version: str | None, slot: int, previous):
        """Flattens `bucket` (overlapping `previous`), waits for `previous`, starts this one."""
        assert self.calls is not None and self.pg is not None
        if self.format == "per_tensor":
            return self._start_per_tensor(bucket, version, previous)
        size = sum(t.numel() * t.element_size() for _, t in bucket)
        if self._buffers[slot] is None or self._buffers[slot].numel() < size:
            self._buffers[slot] = torch.empty(size, dtype=torch.uint8, device=self.device)
        flat = flatten_bucket(bucket, self.device, out=self._buffers[slot])
        self._finish(previous)
        body = self._body(bucket, version, "flattened_bucket")
        futures = self.calls.submit_all("/update_weights_from_distributed", lambda i, url: body)
        try:
            work = dist.broadcast(flat, src=0, group=self.pg, async_op=True)
        except BaseException:
            wait_all(futures)
            raise
        return work, futures

    def _body(self, bucket: list[tuple[str, torch.Tensor]], version: str | None, load_format) -> dict:
        return {"names": [n for n, _ in bucket], "dtypes": [dtype_name(t.dtype) for _, t in bucket],
                "shapes": [list(t.shape) for _, t in bucket], "group_name": self.group_name,
                "load_format": load_format, "flush_cache": version is not None,
                "weight_version": version}

    def _start_per_tensor(self, bucket, version: str | None, previous):
        """One broadcast per tensor, from the tensor's own memory (no staging copy)."""
        assert self.calls is not None and self.pg is not None
        tensors = [t.detach().to(self.device).contiguous() for _, t in bucket]
        self._finish(previous)
        body = self._body(bucket, version, None)
        futures = self.calls.submit_all("/update_weights_from_distributed", lambda i, url: body)
        works = []
        try:
            for t in tensors:
                works.append(dist.broadcast(t, src=0, group=self.pg, async_op=True))
        except BaseException:
            wait_all(futures)
            raise
        return works, futures, tensors

    def _finish(self, in_flight) -> None:
        """Waits for a bucket's broadcast and every server's reply to it.

        A server that rejects the bucket (or dies) never joins or finishes the broadcast, so
        the collective would wait for its timeout: the replies are watched while it runs, and
        the first failure is raised at once. The group is then unusable (the servers' receive
        order is broken): it is dropped, and the next update needs `connect()` again.
        """
        if in_flight is None:
            return
        works, futures = in_flight[0], in_flight[1]
        works = works if isinstance(works, list) else [works]
        while not all(w.is_completed() for w in works):
            failed = [f for f in futures if f.done() and f.exception() is not None]
            if failed:
                self.pg_failed = True
                raise WeightSyncError(f"weight update aborted, the broadcast stopped: "
                                      f"{failed[0].exception()}") from failed[0].exception()
            time.sleep(0.002)
        try:
            for work in works:
                work.wait()
        except Exception as e:
            self.pg_failed = True
            raise WeightSyncError(f"weight broadcast failed: {e}") from e
        try:
            wait_all(futures)
        except Exception:
            self.pg_failed = True
            raise

    def _destroy_on_servers(self) -> None:
        """Best effort: every server that still answers drops the current group."""
        assert self.calls is not None
        futures = self.calls.submit_all("/destroy_weights_update_group", lambda i, u: {"group_name": self.group_name})
        for url, fut in zip(self.calls.urls, futures):
            try:
                fut.result(timeout=60)
            except Exception as e:  # noqa: BLE001 - a dead server cannot answer
                logger.warning("%s: destroy_weights_update_group %s: %s", url, self.group_name, e)

    def close(self) -> None:
        if self.pg is not None and not self.pg_failed:
            if self.calls is not None:
                try:
                    self.calls.all("/destroy_weights_update_group", {"group_name": self.group_name})
                except Exception as e:  # noqa: BLE001 - best effort at shutdown
                    logger.warning("destroy_weights_update_group failed: %s", e)
            destroy_custom_process_group(self.pg)
            self.pg = None
        self._drop_group()
        super().close()
