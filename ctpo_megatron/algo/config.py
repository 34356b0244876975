"""Configuration of the policy loss: which loss, which ratio, how it is clipped and aggregated."""

from __future__ import annotations

import math
from dataclasses import dataclass

LOSS_NAMES = ("ctpo", "grpo", "gspo", "seq")
VARIANTS = ("cumprod", "geomean")
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass
class PolicyLossConfig:
    """Policy-loss settings. Defaults are the paper run (CTPO, cumprod, adaptive clipping).

    Exposed to Hydra as the `algo` config group (`configs/algo/*.yaml`, flat keys equal to
    these fields). Every loss in `ctpo_megatron.algo.registry.LOSSES` reads its fields here.
    """

    name: str = "ctpo"
    """Loss: "ctpo" (cumulative-token ratio), "grpo" (PPO/GRPO per-token ratio with dual
    clip), "gspo" (length-normalised sequence ratio, always seq-mean-token-mean), "seq"
    (full-sequence ratio: the CTPO machinery with every prefix sum replaced by the total)."""

    variant: str = "cumprod"
    """Cumulative ratio for "ctpo"/"seq": "cumprod" (log r_t = C_t, the prefix sum of log
    ratios) or "geomean" (log r_t = C_t / n_t, the mean over generated tokens so far)."""

    adaptive_clip: bool = True
    """Position-adaptive log-space clipping (CTPO-LA): bounds la_clip_* * max(n_t, 1)**la_power.
    False: the reference's plain ratio-space clip with clip_ratio_low/high/c ("ctpo"/"seq" only;
    "grpo" and "gspo" always clip in ratio space)."""

    la_clip_low: float = 0.025
    """Log-space lower clip base, > 0: log r is clipped from below at -la_clip_low * g_t."""

    la_clip_high: float = 0.05
    """Log-space upper clip base, > 0: log r is clipped from above at +la_clip_high * g_t."""

    la_clip_c: float = 0.05
    """Log-space dual-clip base, > 0: for A < 0 the loss is capped at -A * exp(la_clip_c * g_t)."""

    la_power: float = 0.5
    """Exponent p of the position scale g_t = max(n_t, 1)**p; n_t counts generated tokens up to
    t (tool output excluded). 0.5 tracks the sqrt(t) growth of the cumulative log ratio's spread;
    0 gives a uniform scale g_t = 1 (the reference crashes there; this is its p -> 0 limit)."""

    clip_ratio_low: float = 0.2
    """Ratio-space lower clip eps_low in [0, 1]: ratios are clipped below at 1 - eps_low."""

    clip_ratio_high: float = 0.2
    """Ratio-space upper clip eps_high >= 0: ratios are clipped above at 1 + eps_high."""

    clip_ratio_c: float = 3.0
    """Ratio-space dual clip (> 1): for A < 0 the loss is capped at -A * clip_ratio_c."""

    loss_agg_mode: str = "token-mean"
    """How per-token losses become a scalar: "token-mean", "seq-mean-token-sum",
    "seq-mean-token-mean" or "seq-mean-token-sum-norm" (see `algo.aggregate`)."""

    def __post_init__(self) -> None:
        if self.name not in LOSS_NAMES:
            raise ValueError(f"PolicyLossConfig.name={self.name!r} is not one of {LOSS_NAMES}")
        if self.variant not in VARIANTS:
            raise ValueError(f"PolicyLossConfig.variant={self.variant!r} is not one of {VARIANTS}")
        if self.loss_agg_mode not in AGG_MODES:
            raise ValueError(
                f"PolicyLossConfig.loss_agg_mode={self.loss_agg_mode!r} is not one of {AGG_MODES}")
        for field in ("la_clip_low", "la_clip_high", "la_clip_c"):
            value = getattr(self, field)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"PolicyLossConfig.{field}={value!r} must be a finite number > 0")
        if not math.isfinite(self.la_power):
            raise ValueError(f"PolicyLossConfig.la_power={self.la_power!r} must be finite")
        if not 0.0 <= self.clip_ratio_low <= 1.0:
            raise ValueError(
                f"PolicyLossConfig.clip_ratio_low={self.clip_ratio_low!r} must be in [0, 1] "
                "(the ratio is clipped below at 1 - clip_ratio_low)")
        if not (math.isfinite(self.clip_ratio_high) and self.clip_ratio_high >= 0.0):
            raise ValueError(
                f"PolicyLossConfig.clip_ratio_high={self.clip_ratio_high!r} must be finite and >= 0")
        if not self.clip_ratio_c > 1.0:
            raise ValueError(
                f"PolicyLossConfig.clip_ratio_c={self.clip_ratio_c!r} must be > 1 (dual-clip "
                "threshold on the ratio for negative advantages)")
