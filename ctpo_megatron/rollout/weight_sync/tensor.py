"""Weight sync by in-memory buckets: `/update_weights_from_tensor` inside a begin/end session.

Encodings (`WeightSyncConfig.tensor_encoding`):
* `safetensors` — each bucket as `base64(safetensors bytes)`: data travels by value over HTTP,
  any host. This is what the embedded server accepts.
* `sglang` — SGLang's own format: `base64(ForkingPickler.dumps(list[(name, tensor)]))`, i.e.
  tensors *by handle* (CUDA IPC / shared memory): the trainer must be on the server's node and
  keep the tensors alive until the call returns. CUDA tensors need sglang's
  `monkey_patch_torch_reductions` (applied when sglang is importable).
The list holds one copy per server TP rank (`server_tp_size`); the server reads its own entry.
"""

from __future__ import annotations

import base64
import io
import logging
from multiprocessing.reduction import ForkingPickler

import torch
from safetensors.torch import save as save_safetensors

from ctpo_megatron.rollout.weight_sync.base import (NamedTensors, WeightUpdater, iter_buckets,
                                                    to_safetensors_dict)

logger = logging.getLogger(__name__)


def encode_safetensors(bucket: list[tuple[str, torch.Tensor]]) -> str:
    """base64 of a safetensors blob holding the bucket (CPU copies)."""
    return base64.b64encode(save_safetensors(to_safetensors_dict(bucket))).decode()


def encode_sglang(bucket: list[tuple[str, torch.Tensor]]) -> str:
    """SGLang's MultiprocessingSerializer.serialize(list[(name, tensor)], output_str=True)."""
    if any(t.is_cuda for _, t in bucket):
        try:
            from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
        except ImportError as e:
            raise RuntimeError("tensor_encoding='sglang' with CUDA tensors needs sglang importable "
                               "(its torch reductions map devices by UUID)") from e
        monkey_patch_torch_reductions()
    buf = io.BytesIO()
    ForkingPickler(buf).dump([(name, t.detach()) for name, t in bucket])
    return base64.b64encode(buf.getvalue()).decode()


class TensorWeightUpdater(WeightUpdater):
    """`transport="tensor"`."""

    def _send(self, named_tensors: NamedTensors, version: str) -> dict[str, int]:
        assert self.calls is not None
        encode = encode_safetensors if self.cfg.tensor_encoding == "safetensors" else encode_sglang
        self.calls.all("/begin_weight_update", {})
        total = buckets = 0
        try:
            pending = None
            for bucket in iter_buckets(named_tensors, self.cfg.bucket_bytes):
                if pending is not None:
                    self._post(pending, None, flush=False)
                buckets += 1
                total += sum(t.numel() * t.element_size() for _, t in bucket)
                pending = [encode(bucket)] * self.cfg.server_tp_size
            if pending is None:
                raise ValueError("weight sync got no tensors")
            # The version (and the cache flush) go with the last bucket, as SGLang records them
            # per successful call.
            self._post(pending, version, flush=True)
        finally:
            self.calls.all("/end_weight_update", {})
        return {"bytes": total, "buckets": buckets}

    def _post(self, entries: list[str], version: str | None, flush: bool) -> None:
        assert self.calls is not None
        # load_format null: the server's model.load_weights (SGLang shards for TP there).
        body = {"serialized_named_tensors": entries, "load_format": None,
                "flush_cache": flush, "weight_version": version}
        self.calls.all("/update_weights_from_tensor", body)
