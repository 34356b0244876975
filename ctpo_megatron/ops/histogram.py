"""`histogram_quantiles`: quantiles of a log-bin histogram on the host (the raw op behind
`algo.histogram.histogram_quantiles`, which is also its definition in numpy and the path
without the extension). `ops` never imports `algo`: the bin layout comes in as arguments."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ctpo_megatron.ops._backend import cpu_kernel_for, extension_backends, op_overload


def histogram_quantiles_kernel_for(device: torch.device) -> bool:
    """Whether the op has a kernel for counts on `device`: the CPU build of the extension."""
    return cpu_kernel_for(device)


def histogram_quantiles(counts: torch.Tensor, qs: Sequence[float], *, lo: float | None, hi: float | None,
                        total: float | None, hist_shift: int, hist_first: int) -> list[float]:
    """Runs the op (call only where `histogram_quantiles_kernel_for(counts.device)`).

    counts: [hist_bins] float64 token counts per bin (bin b holds the float32 values whose bits
    >> hist_shift are b + hist_first); qs: quantiles in [0, 1]; lo, hi: the exact minimum and
    maximum, if known; total: the sum of counts, if known. Returns len(qs) floats, as
    `algo.histogram.histogram_quantiles` defines them."""
    return op_overload("histogram_quantiles")(counts, [float(q) for q in qs], lo, hi, total, hist_shift,
                                              hist_first).tolist()


def _register() -> None:
    @torch.library.register_fake("ctpo_megatron::histogram_quantiles")
    def _fake(counts, qs, lo, hi, total, hist_shift, hist_first):
        return counts.new_empty((len(qs),), dtype=torch.float64)


if extension_backends():
    _register()
