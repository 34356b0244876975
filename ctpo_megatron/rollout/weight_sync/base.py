"""Shared parts of the weight-sync transports: config, bucketing, the HTTP control calls, and
the pause → send → continue sequence with its metrics.

Runs on the trainer's global rank 0, which holds full HF-named tensors (the actor's
`iter_hf_weights()`); other ranks do not call it. Updates go to every server directly (the
router does not forward weight updates), each server exactly once.
"""

from __future__ import annotations

import abc
import json
import logging
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch

logger = logging.getLogger(__name__)

NamedTensors = Iterable[tuple[str, torch.Tensor]]


class WeightSyncError(RuntimeError):
    """A server refused or failed a weight-update call; names the server and keeps its body."""


@dataclass
class WeightSyncConfig:
    """How new weights reach the inference servers."""

    transport: str = "distributed"
    """`disk` (safetensors + /update_weights_from_disk), `tensor` (/update_weights_from_tensor
    buckets) or `distributed` (/update_weights_from_distributed broadcast over a process group)."""
    bucket_bytes: int = 512 << 20
    """Most bytes per bucket (one HTTP call + one broadcast each); a larger tensor goes alone."""
    pause_mode: str | None = "retract"
    """pause_generation mode around an update (`abort`, `retract`, `in_place`) or None (no pause)."""
    http_timeout_s: float = 1800.0
    """Timeout of one control call, seconds (an update call may wait for a broadcast)."""
    disk_dir: str = "weight_sync"
    """`disk`: where checkpoints are written (must be readable by every server)."""
    disk_config_dir: str | None = None
    """`disk`: HF directory whose *.json files (config.json, ...) are copied next to the weights."""
    disk_keep: int = 1
    """`disk`: how many old checkpoints to keep besides the newest."""
    tensor_encoding: str = "sglang"
    """`tensor`: `sglang` (SGLang's own format: one `MultiprocessingSerializer` payload per server
    TP rank, tensors by handle, so trainer rank 0 and the servers share a node; what a real
    SGLang server decodes) or `safetensors` (by value, any host; the embedded server only)."""
    server_tp_size: int | None = None
    """TP size every server must report in `/server_info` (`tp_size`); None: take it from the
    servers (the usual case: it is configured once, on the servers)."""
    master_address: str = "auto"
    """`distributed`: address of trainer rank 0 as the servers reach it. `auto`: the address of
    this host's interface that routes to the servers, found at run time."""
    master_port: int = 0
    """`distributed`: rendezvous port (0 = pick a free one)."""
    group_name: str = "weight_update_group"
    """`distributed`: name of the group on the servers."""
    backend: str = "auto"
    """`distributed`: `nccl`, `gloo`, or `auto` (nccl with CUDA, else gloo)."""
    distributed_format: str = "auto"
    """`distributed`: `flattened_bucket` (one broadcast per bucket), `per_tensor` (one per tensor,
    no staging copies), or `auto` (flattened on nccl, per tensor on gloo)."""

    def __post_init__(self) -> None:
        if self.transport not in ("disk", "tensor", "distributed"):
            raise ValueError(f"weight_sync.transport={self.transport!r}: expected disk, tensor or "
                             "distributed")
        if self.bucket_bytes < 1:
            raise ValueError(f"weight_sync.bucket_bytes={self.bucket_bytes} must be >= 1")
        if self.pause_mode not in (None, "abort", "retract", "in_place"):
            raise ValueError(f"weight_sync.pause_mode={self.pause_mode!r}: expected abort, retract, "
                             "in_place or None")
        if self.tensor_encoding not in ("safetensors", "sglang"):
            raise ValueError(f"weight_sync.tensor_encoding={self.tensor_encoding!r}: expected "
                             "safetensors or sglang")
        if self.distributed_format not in ("auto", "flattened_bucket", "per_tensor"):
            raise ValueError(f"weight_sync.distributed_format={self.distributed_format!r}: expected "
                             "auto, flattened_bucket or per_tensor")
        if self.server_tp_size is not None and self.server_tp_size < 1:
            raise ValueError(f"weight_sync.server_tp_size={self.server_tp_size} must be >= 1 or null")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"weight_sync.backend={self.backend!r}: expected auto, nccl or gloo")


def iter_buckets(named_tensors: NamedTensors, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Groups tensors into buckets of at most `bucket_bytes`, one dtype per bucket.

    One dtype per bucket keeps every tensor's byte offset in a flattened bucket a multiple of its
    element size (SGLang's FlattenedTensorBucket rejects unaligned offsets).
    """
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and (size + nbytes > bucket_bytes or tensor.dtype != bucket[0][1].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def to_safetensors_dict(bucket: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, storage-disjoint copies where needed (safetensors refuses shared memory,
    e.g. tied embeddings yielded under both names)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in bucket:
        t = tensor.detach().contiguous().cpu()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def dtype_name(dtype: torch.dtype) -> str:
    """torch dtype → the name SGLang expects (`getattr(torch, name)`), e.g. "bfloat16"."""
    return str(dtype).removeprefix("torch.")


class ServerCalls:
    """Blocking JSON POSTs to every server, in parallel threads (the trainer loop is sync)."""

    def __init__(self, urls: list[str], timeout_s: float):
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout_s = timeout_s
        self.pool = ThreadPoolExecutor(max_workers=max(4, 2 * len(urls)), thread_name_prefix="wsync")
        # Servers are cluster-internal: never route these calls through an environment proxy.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def post(self, url: str, path: str, body: dict) -> Any:
        data = json.dumps(body).encode()
        req = urllib.request.Request(url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            raise WeightSyncError(f"{url}{path} returned HTTP {e.code}: {text[:2000]}") from None
        except (urllib.error.URLError, OSError) as e:
            raise WeightSyncError(f"{url}{path} failed: {e}") from None
        try:
            out = json.loads(text) if text else None
        except json.JSONDecodeError:
            return text
        if isinstance(out, dict) and out.get("success") is False:
            raise WeightSyncError(f"{url}{path} reported failure: {out.get('message')}")
        return out

    def get(self, url: str, path: str) -> Any:
        """GET `path` on one server; the parsed JSON body. WeightSyncError on failure."""
        try:
            with self._opener.open(url + path, timeout=min(self.timeout_s, 60.0)) as resp:
                return json.loads(resp.read().decode())
        except urllib.error.HTTPError as e:
            raise WeightSyncError(f"{url}{path} returned HTTP {e.code}: "
                                  f"{e.read().decode(errors='replace')[:2000]}") from None
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as e:
            raise WeightSyncError(f"{url}{path} failed: {e}") from None

    def submit_all(self, path: str, body_of) -> list[Future]:
        """Starts `path` on every server; `body_of(i, url)` builds each body."""
        return [self.pool.submit(self.post, url, path, body_of(i, url)) for i, url in enumerate(self.urls)]

    def all_bodies(self, path: str, bodies: list[dict]) -> list[Any]:
        """POSTs `bodies[i]` to server i, in parallel; raises the first error after all settled."""
        return wait_all(self.submit_all(path, lambda i, u: bodies[i]))

    def all(self, path: str, body: dict | None = None) -> list[Any]:
        return wait_all(self.submit_all(path, lambda i, u: {} if body is None else body))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def wait_all(futures: list[Future]) -> list[Any]:
    """Results of every future; raises the first error only after all have settled."""
    results, errors = [], []
    for fut in futures:
        try:
            results.append(fut.result())
        except Exception as e:  # noqa: BLE001 - collected and re-raised below
            errors.append(e)
    if errors:
        raise errors[0]
    return results


def server_tp_sizes(calls: ServerCalls, expected: int | None) -> list[int]:
    """Each server's TP size as it reports it (`/server_info` `tp_size`, as SGLang does).

    expected: the configured size, or None. Raises WeightSyncError naming the server when a
    server does not report one, or reports another size than configured.
    """
    sizes = []
    for url, info in zip(calls.urls, wait_all([calls.pool.submit(calls.get, u, "/server_info")
                                               for u in calls.urls])):
        tp = info.get("tp_size") if isinstance(info, dict) else None
        if not isinstance(tp, int) or tp < 1:
            raise WeightSyncError(f"{url}/server_info reports no valid tp_size ({tp!r})")
        if expected is not None and tp != expected:
            raise WeightSyncError(f"{url} runs with tp_size={tp} but weight_sync.server_tp_size="
                                  f"{expected}: fix the setting (or leave it null to take the "
                                  "servers' own size)")
        sizes.append(tp)
    return sizes


class WeightUpdater(abc.ABC):
    """One transport. `connect(urls)` once, `update(named_tensors, version)` per step."""

    def __init__(self, cfg: WeightSyncConfig):
        self.cfg = cfg
        self.calls: ServerCalls | None = None
        self._metrics: dict[str, float] = {}

    def connect(self, urls: list[str]) -> None:
        """Binds to the servers' own URLs (not a router: it does not forward weight updates)."""
        if not urls:
            raise ValueError("weight sync needs at least one server URL")
        self.calls = ServerCalls(list(urls), self.cfg.http_timeout_s)

    @property
    def urls(self) -> list[str]:
        """The servers this updater is connected to."""
        return list(self.calls.urls) if self.calls is not None else []

    def retarget(self, urls: list[str]) -> bool:
        """Connects to exactly `urls` (e.g. without a server that died): reconnects when they
        differ from the current servers; returns whether it did. Never waits on a dead server
        beyond one failed HTTP call."""
        urls = [u.rstrip("/") for u in urls]
        if self.calls is not None and sorted(urls) == sorted(self.calls.urls):
            return False
        self.close()
        self.connect(urls)
        return True

    def update(self, named_tensors: NamedTensors, version: str) -> None:
        """Pauses generation, sends every tensor, records `version`, resumes generation.

        named_tensors: iterable of `(hf_name, tensor)`, full (unsharded) tensors in HF layout.
        Generation resumes even when the send fails; the error is then raised.
        """
        if self.calls is None:
            raise RuntimeError("call connect(urls) before update()")
        start = time.perf_counter()
        if self.cfg.pause_mode:
            self.calls.all("/pause_generation", {"mode": self.cfg.pause_mode})
        paused = time.perf_counter()
        try:
            stats = self._send(named_tensors, str(version))
        finally:
            if self.cfg.pause_mode:
                self.calls.all("/continue_generation", {})
        end = time.perf_counter()
        sent = end - paused
        self._metrics = {
            "weight_sync/bytes": float(stats["bytes"]), "weight_sync/buckets": float(stats["buckets"]),
            "weight_sync/seconds": end - start, "weight_sync/pause_seconds": paused - start,
            "weight_sync/gbps": stats["bytes"] / max(sent, 1e-9) / 1e9,
        }
        logger.info("weight sync (%s) version %s: %.1f MB in %.2fs (%.2f GB/s)", self.cfg.transport,
                    version, stats["bytes"] / 1e6, end - start, self._metrics["weight_sync/gbps"])

    def metrics(self) -> dict[str, float]:
        """Numbers of the last update: bytes, buckets, seconds, pause_seconds, gbps."""
        return dict(self._metrics)

    def close(self) -> None:
        if self.calls is not None:
            self.calls.close()
            self.calls = None

    @abc.abstractmethod
    def _send(self, named_tensors: NamedTensors, version: str) -> dict[str, int]:
        """Transport-specific part; returns {"bytes": ..., "buckets": ...}."""
