"""`LossSums`: the policy loss's statistics as additive sums and counts (plus a few maxima).

A training step produces one `LossSums` per micro-batch (`LossSums.from_terms`, no host sync),
adds them up (`+`) on the device over micro-batches and updates, reduces them over ranks once
(`to_vectors`: one sum and one max all-reduce), and turns the totals into rates once
(`metrics`). Rates are therefore ratios of global sums (clipped tokens / tokens over the whole
step), not means of per-micro-batch rates. Ratio quantiles, which are not additive, are the
mean of per-micro-batch quantiles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ctpo_megatron.algo.config import PolicyLossConfig
from ctpo_megatron.algo.metrics import RATIO_QUANTILES, clip_rate_by_position, position_clip_metrics, quantiles
from ctpo_megatron.algo.terms import TokenTerms

_MAX_FIELDS = ("ratio_max", "ratio_neg_min", "la_scale_max", "la_scale_neg_min")
"""Fields reduced with max (minima are stored negated)."""


@dataclass
class LossSums:
    """Sums over a set of micro-batches (all float64 tensors on one device).

    Scalars are 0-d; `clip` is [4] (high, low, dual, any); `ratio_quantiles` [Q] sums of
    per-micro-batch quantiles; `la_clip_ratios` [3] token sums of exp(la_clip_{high,low,c} g_t);
    `position_clipped`, `position_tokens` [K] per position bucket.
    """

    loss: torch.Tensor
    """Sum of the back-propagated loss / dp_size: per optimizer update, the mini-batch loss."""
    tokens: torch.Tensor
    """Valid (generated) tokens."""
    neg_adv_tokens: torch.Tensor
    """Valid tokens with a negative advantage."""
    clip: torch.Tensor
    """[4] tokens clipped high, low, dual, any."""
    pg_clipped: torch.Tensor
    """Tokens whose clipped branch is larger (the reference's pg_clipfrac numerator)."""
    kl: torch.Tensor
    """Sum of -d_t (the reference's ppo_kl numerator)."""
    ratio_sum: torch.Tensor
    """Sum of r_t."""
    ratio_max: torch.Tensor
    ratio_neg_min: torch.Tensor
    ratio_quantiles: torch.Tensor
    micro_batches: torch.Tensor
    """Micro-batches with at least one valid token (the quantiles' denominator)."""
    la_scale_sum: torch.Tensor
    la_scale_max: torch.Tensor
    la_scale_neg_min: torch.Tensor
    la_scale_p50: torch.Tensor
    la_clip_ratios: torch.Tensor
    position_clipped: torch.Tensor
    position_tokens: torch.Tensor

    @classmethod
    def from_terms(cls, terms: TokenTerms, response_mask: torch.Tensor, advantages: torch.Tensor,
                   cfg: PolicyLossConfig, *, loss: torch.Tensor, dp_size: int,
                   bucket_edges: Sequence[int], positions: torch.Tensor | None = None) -> LossSums:
        """The sums of one micro-batch. terms, response_mask, advantages: [B, S] as given to
        `policy_loss`; loss: its 0-d result; bucket_edges, positions: see
        `clip_rate_by_position` (positions [B, S]: the generated-token index n_t of each
        column; default the cumulative mask count, which is right only when the columns are
        whole responses in order: under context parallelism pass the global n_t).

        Every sum is over valid tokens, so a rank holding a piece of each sequence (context
        parallelism) adds exactly its tokens; only the order statistics (ratio and LA-scale
        quantiles, averaged per micro-batch) are then taken per piece, an approximation."""
        with torch.no_grad():
            f64 = dict(dtype=torch.float64, device=response_mask.device)
            valid = response_mask > 0
            mask = valid.to(torch.float64)
            if advantages.dim() < 2 or advantages.shape != valid.shape:
                advantages = advantages.reshape(advantages.shape[0], -1).expand(valid.shape)
            n = mask.sum()
            ratio = terms.ratio.to(torch.float64)
            has = bool(valid.any())  # one host sync: the order statistics need a non-empty set
            neg_inf = torch.tensor(-torch.inf, **f64)
            if has:
                r = ratio[valid]
                ratio_max, ratio_neg_min = r.max(), -r.min()
                q = quantiles(r, [p for _, p in RATIO_QUANTILES])
            else:
                ratio_max = ratio_neg_min = neg_inf
                q = torch.zeros(len(RATIO_QUANTILES), **f64)
            la = dict(la_scale_sum=torch.zeros((), **f64), la_scale_max=neg_inf,
                      la_scale_neg_min=neg_inf, la_scale_p50=torch.zeros((), **f64),
                      la_clip_ratios=torch.zeros(3, **f64))
            if terms.la_scale is not None and has:
                g = terms.la_scale.to(torch.float64)[valid]
                la = dict(la_scale_sum=g.sum(), la_scale_max=g.max(), la_scale_neg_min=-g.min(),
                          la_scale_p50=quantiles(g, [0.5])[0],
                          la_clip_ratios=torch.stack([torch.exp(c * g).sum() for c in (
                              cfg.la_clip_high, -cfg.la_clip_low, cfg.la_clip_c)]))
            flags = torch.stack([terms.clip_high, terms.clip_low, terms.clip_dual, terms.clip_any])
            pos_clipped, pos_tokens = clip_rate_by_position(terms.clip_any, response_mask,
                                                            bucket_edges=bucket_edges, positions=positions)
            return cls(
                loss=loss.detach().to(torch.float64) / dp_size, tokens=n,
                neg_adv_tokens=((advantages < 0) & valid).sum().to(torch.float64),
                clip=(flags & valid).sum((1, 2)).to(torch.float64),
                pg_clipped=(terms.clipped & valid).sum().to(torch.float64),
                kl=(-terms.log_ratio_clamped.to(torch.float64) * mask).sum(),
                ratio_sum=(ratio * mask).sum(), ratio_max=ratio_max, ratio_neg_min=ratio_neg_min,
                ratio_quantiles=q, micro_batches=torch.tensor(float(has), **f64),
                position_clipped=pos_clipped.to(torch.float64),
                position_tokens=pos_tokens.to(torch.float64), **la)

    def __add__(self, other: LossSums) -> LossSums:
        out = {}
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            out[f.name] = torch.maximum(a, b) if f.name in _MAX_FIELDS else a + b
        return LossSums(**out)

    def to_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sums [K1], maxima [K2]) float64: all-reduce the first with SUM, the second with MAX."""
        sums = [getattr(self, f.name).reshape(-1) for f in dataclasses.fields(self) if f.name not in _MAX_FIELDS]
        maxes = [getattr(self, name).reshape(-1) for name in _MAX_FIELDS]
        return torch.cat(sums), torch.cat(maxes)

    def from_vectors(self, sums: torch.Tensor, maxes: torch.Tensor) -> LossSums:
        """The inverse of `to_vectors`, with this object's field shapes."""
        out, offset = {}, 0
        for f in dataclasses.fields(self):
            if f.name in _MAX_FIELDS:
                continue
            shape = getattr(self, f.name).shape
            k = getattr(self, f.name).numel()
            out[f.name] = sums[offset:offset + k].reshape(shape)
            offset += k
        for i, name in enumerate(_MAX_FIELDS):
            out[name] = maxes[i].reshape(())
        return LossSums(**out)

    def metrics(self, *, num_updates: int, bucket_edges: Sequence[int],
                adaptive_clip: bool) -> dict[str, float]:
        """Flat metrics of the totals: the names of `algo.metrics.policy_metrics` (rates over
        all tokens; `loss`, `valid_tokens`, `neg_adv_tokens` and `clip_count_*` per update),
        plus `clip_rate_by_pos/<lo>-<hi>` rates. All 0.0 when there is no valid token."""
        v = {f.name: getattr(self, f.name).to(torch.float64).cpu() for f in dataclasses.fields(self)}
        n = float(v["tokens"])
        per = 1.0 / max(num_updates, 1)
        rate = (lambda x: float(x) / n) if n else (lambda x: 0.0)  # noqa: E731
        out = {"loss": float(v["loss"]) * per, "valid_tokens": n * per,
               "neg_adv_tokens": float(v["neg_adv_tokens"]) * per,
               "pg_clipfrac": float(v["pg_clipped"]) / (n + 1e-8),
               "pg_clipfrac_lower": float(v["clip"][2]) / (n + 1e-8),
               "ppo_kl": float(v["kl"]) / (n + 1e-8)}
        for i, key in enumerate(("high", "low", "dual", "total")):
            out[f"clip_count_{key}"] = float(v["clip"][i]) * per
            out[f"clipfrac_{key}"] = rate(v["clip"][i])
        mbs = float(v["micro_batches"])
        out["is_ratio_mean"] = rate(v["ratio_sum"])
        out["is_ratio_min"] = -float(v["ratio_neg_min"]) if n else 0.0
        out["is_ratio_max"] = float(v["ratio_max"]) if n else 0.0
        for (name, _), q in zip(RATIO_QUANTILES, v["ratio_quantiles"].tolist()):
            out[f"is_ratio_{name}"] = q / mbs if mbs else 0.0
        if adaptive_clip and n:
            out["la_scale_mean"] = rate(v["la_scale_sum"])
            out["la_scale_min"] = -float(v["la_scale_neg_min"])
            out["la_scale_max"] = float(v["la_scale_max"])
            out["la_scale_p50"] = float(v["la_scale_p50"]) / mbs
            for i, key in enumerate(("high", "low", "c")):
                out[f"la_clip_{key}_ratio_mean"] = rate(v["la_clip_ratios"][i])
        out.update(position_clip_metrics(v["position_clipped"].round().long(),
                                         v["position_tokens"].round().long(), bucket_edges))
        return out
