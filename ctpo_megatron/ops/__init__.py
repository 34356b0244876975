"""Scan and fused-loss kernels (csrc extension, CUDA -> CPU -> pure torch) and the CP prefix sum.

    from ctpo_megatron.ops import segmented_cumsum, context_parallel_cumsum
    cum, count = segmented_cumsum(values, mask, cu_seqlens=None, carry=None)
    cum, count = context_parallel_cumsum(values, mask, cp_group, cu_seqlens=None)
    terms = fused_ctpo_token_terms(log_probs, old_log_probs, advantages, response_mask, cfg)

`python -m ctpo_megatron.ops` prints which backend is active and why. Files: _backend (which
kernels), reference (pure-torch scans), scan (segmented_cumsum + op autograd), ctpo_loss
(fused CTPO terms), zigzag (Megatron CP sharding helpers), context_parallel (cross-rank scan).
"""

import torch  # noqa: F401 - must be imported before the extension loads

from ctpo_megatron.ops._backend import backend_report, extension_backends
from ctpo_megatron.ops.context_parallel import context_parallel_cumsum
from ctpo_megatron.ops.ctpo_loss import fused_ctpo_token_terms
from ctpo_megatron.ops.scan import segmented_cumsum
from ctpo_megatron.ops.zigzag import (zigzag_chunk_cu_seqlens, zigzag_local_cu_seqlens, zigzag_shard,
                                      zigzag_unshard)

__all__ = [
    "backend_report", "context_parallel_cumsum", "extension_backends", "fused_ctpo_token_terms",
    "segmented_cumsum", "zigzag_chunk_cu_seqlens", "zigzag_local_cu_seqlens", "zigzag_shard",
    "zigzag_unshard",
]
