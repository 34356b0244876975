"""Scan and fused-loss kernels (csrc extension, CUDA -> CPU -> pure torch) and the CP prefix
sum. A leaf package: `algo` imports `ops`, never the other way round.

    from ctpo_megatron.ops import segmented_cumsum, context_parallel_cumsum
    cum, count = segmented_cumsum(values, mask, cu_seqlens=None, carry=None)
    cum, count = context_parallel_cumsum(values, mask, cp_group, cu_seqlens=None)

`python -m ctpo_megatron.ops` prints which backend is active and why. Files: _backend (which
kernels), reference (the pure-torch scan), scan (segmented_cumsum + op autograd), ctpo_loss
(the raw fused CTPO op, which `algo.ctpo.fused_ctpo_token_terms` wraps, and the ops that also
give the metric values or the `loss_stats` of its terms from the same pass, which
`algo.ctpo.fused_ctpo_terms_and_metrics` and `fused_ctpo_terms_and_sums` wrap), loss_stats (the
one-pass loss statistics, `algo.stats.LossSums.from_terms` calls it, and their metric values,
`LossSums.metrics` and `policy_metrics` call those), histogram (quantiles of the statistics'
histograms; `algo.histogram.histogram_quantiles` calls it), zigzag (Megatron CP sharding
helpers), context_parallel (cross-rank scan).
"""

import torch  # noqa: F401 - must be imported before the extension loads

from ctpo_megatron.ops._backend import backend_report, extension_backends
from ctpo_megatron.ops.context_parallel import context_parallel_cumsum
from ctpo_megatron.ops.ctpo_loss import (ctpo_loss_metrics_kernel_for, ctpo_token_loss, ctpo_token_loss_metrics,
                                        ctpo_token_loss_stats, has_kernel)
from ctpo_megatron.ops.histogram import histogram_quantiles, histogram_quantiles_kernel_for
from ctpo_megatron.ops.loss_stats import MAX_SLOTS as LOSS_STATS_MAX_SLOTS
from ctpo_megatron.ops.loss_stats import SUM_SLOTS as LOSS_STATS_SUM_SLOTS
from ctpo_megatron.ops.loss_stats import (LossStatsOut, loss_metrics, loss_stats, loss_stats_kernel_for,
                                         loss_stats_metrics)
from ctpo_megatron.ops.loss_stats import metric_count as loss_metric_count
from ctpo_megatron.ops.loss_stats import sum_sections as loss_stats_sections
from ctpo_megatron.ops.scan import segmented_cumsum
from ctpo_megatron.ops.zigzag import (zigzag_chunk_cu_seqlens, zigzag_local_cu_seqlens, zigzag_shard,
                                      zigzag_unshard)

__all__ = [
    "LOSS_STATS_MAX_SLOTS", "LOSS_STATS_SUM_SLOTS", "LossStatsOut", "backend_report", "context_parallel_cumsum",
    "ctpo_loss_metrics_kernel_for", "ctpo_token_loss", "ctpo_token_loss_metrics", "ctpo_token_loss_stats",
    "extension_backends", "has_kernel",
    "histogram_quantiles", "histogram_quantiles_kernel_for",
    "loss_metric_count", "loss_metrics", "loss_stats", "loss_stats_kernel_for", "loss_stats_metrics",
    "loss_stats_sections", "segmented_cumsum", "zigzag_chunk_cu_seqlens",
    "zigzag_local_cu_seqlens", "zigzag_shard", "zigzag_unshard",
]
