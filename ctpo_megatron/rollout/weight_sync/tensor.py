"""Weight sync by in-memory buckets: `/update_weights_from_tensor` inside a begin/end session.

`serialized_named_tensors` holds one entry per TP rank of the receiving server (its TP size
comes from `/server_info`); each rank decodes only its own entry. Encodings
(`WeightSyncConfig.tensor_encoding`):
* `sglang` (default) — SGLang's own format (`serialization.encode_named_tensors`: base64 of
  its `MultiprocessingSerializer` pickle, tensors by shared-memory handle). What a real SGLang
  server decodes; the trainer must be on the server's node. Each entry is pickled on its own.
* `safetensors` — `base64(safetensors bytes)` of the bucket: by value, any host. Only the
  embedded server accepts it.
"""

from __future__ import annotations

import base64
import logging

import torch
from safetensors.torch import save as save_safetensors

from ctpo_megatron.rollout.weight_sync.base import (NamedTensors, WeightUpdater, iter_buckets,
                                                    server_tp_sizes, to_safetensors_dict)
from ctpo_megatron.rollout.weight_sync.serialization import encode_named_tensors

logger = logging.getLogger(__name__)


def encode_safetensors(bucket: list[tuple[str, torch.Tensor]]) -> str:
    """base64 of a safetensors blob holding the bucket (CPU copies)."""
    return base64.b64encode(save_safetensors(to_safetensors_dict(bucket))).decode()


def sglang_entries(bucket: list[tuple[str, torch.Tensor]], tp_size: int) -> tuple[list[str], list]:
    """`tp_size` SGLang payloads of `bucket` and the staging tensors they point at.

    CPU tensors are first copied (sharing moves a storage into shared memory, which must not
    happen to the trainer's own tensors); keep the returned tensors alive until the call ends.
    """
    staged = [(n, t.detach().clone() if not t.is_cuda else t.detach()) for n, t in bucket]
    return [encode_named_tensors(staged) for _ in range(tp_size)], staged


class TensorWeightUpdater(WeightUpdater):
    """`transport="tensor"`."""

    def connect(self, urls: list[str]) -> None:
        super().connect(urls)
        assert self.calls is not None
        self.tp_sizes = server_tp_sizes(self.calls, self.cfg.server_tp_size)

    def _send(self, named_tensors: NamedTensors, version: str) -> dict[str, int]:
        assert self.calls is not None
        self.calls.all("/begin_weight_update", {})
        total = buckets = 0
        try:
            pending = None
            for bucket in iter_buckets(named_tensors, self.cfg.bucket_bytes):
                if pending is not None:
                    self._post(pending, None)
                buckets += 1
                total += sum(t.numel() * t.element_size() for _, t in bucket)
                pending = bucket
            if pending is None:
                raise ValueError("weight sync got no tensors")
            # The version (and the cache flush) go with the last bucket, as SGLang records them
            # per successful call.
            self._post(pending, version)
        finally:
            self.calls.all("/end_weight_update", {})
        return {"bytes": total, "buckets": buckets}

    def _post(self, bucket: list[tuple[str, torch.Tensor]], version: str | None) -> None:
        assert self.calls is not None
        keep_alive = []
        if self.cfg.tensor_encoding == "sglang":
            per_server = []
            for tp in self.tp_sizes:
                entries, staged = sglang_entries(bucket, tp)
                per_server.append(entries)
                keep_alive.append(staged)
        else:
            blob = encode_safetensors(bucket)
            per_server = [[blob] * tp for tp in self.tp_sizes]
        # load_format null: the server's model.load_weights (SGLang shards for TP there).
        self.calls.all_bodies("/update_weights_from_tensor", [
            {"serialized_named_tensors": entries, "load_format": None,
             "flush_cache": version is not None, "weight_version": version}
            for entries in per_server])
        del keep_alive
