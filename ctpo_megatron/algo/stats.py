"""`LossSums`: the policy loss's statistics as additive sums, counts, histograms and maxima.

A training step produces one `LossSums` per micro-batch (`LossSums.from_terms`: a few
reductions on the device, no host sync, no data-dependent shape), adds them up (`+`) on the
device over micro-batches and updates, reduces them over ranks once (`to_vectors`: one sum and
one max all-reduce), and turns the totals into floats once (`metrics`). Rates are therefore
ratios of global sums (clipped tokens / tokens over the whole step), not means of per-micro-
batch rates; quantiles come from fixed-bin histograms (`algo.histogram`) summed the same way,
so they are quantiles of the whole step's tokens, within one bin (~0.1%) of the exact ones.
`policy_metrics` is the same for one micro-batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ctpo_megatron import ops
from ctpo_megatron.algo import histogram
from ctpo_megatron.algo.config import PolicyLossConfig
from ctpo_megatron.algo.metrics import (RATIO_QUANTILES, bucket_of_position, check_bucket_edges,
                                        position_bucket_edges, position_clip_metrics, position_counts)
from ctpo_megatron.algo.terms import TokenTerms

_MAX_FIELDS = ("ratio_max", "ratio_neg_min", "la_scale_max", "la_scale_neg_min")
"""Fields reduced with max (minima are stored negated)."""
_CLIP_SLOTS = slice(ops.LOSS_STATS_SLOTS.index("clip_high"), ops.LOSS_STATS_SLOTS.index("clip_any") + 1)
"""`LossSums.clip` (high, low, dual, any): consecutive slots of the kernel's scalar output."""
assert ops.LOSS_STATS_SLOTS[_CLIP_SLOTS] == ("clip_high", "clip_low", "clip_dual", "clip_any")


def _extremes(values: torch.Tensor, weight: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, -min) over valid entries of non-negative `values` (ratios, LA scales), 0-d float64;
    (0, -inf) when there is none, neutral under the max-reduction since values >= 0."""
    top = (values * weight).max()
    bottom = torch.where(valid, values, torch.inf).min()
    return top.to(torch.float64), -bottom.to(torch.float64)


def _exp_sums(g: torch.Tensor, weight: torch.Tensor, coefficients: Sequence[float]) -> torch.Tensor:
    """[len(coefficients)] float64: sum of weight * exp(c g) per coefficient (equal ones once)."""
    sums = {c: (torch.exp(c * g) * weight).sum().to(torch.float64) for c in dict.fromkeys(coefficients)}
    return torch.stack([sums[c] for c in coefficients])


@dataclass
class LossSums:
    """Sums over a set of micro-batches (all float64 tensors on one device).

    Scalars are 0-d; `clip` is [4] (high, low, dual, any); `ratio_hist`, `la_scale_hist`
    [histogram.NUM_BINS] token counts per bin; `la_clip_ratios` [3] token sums of
    exp(la_clip_{high,low,c} g_t); `position_clipped`, `position_tokens` [K] per
    position bucket.
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
    ratio_hist: torch.Tensor
    """Histogram of r_t (the quantiles)."""
    la_scale_sum: torch.Tensor
    la_scale_max: torch.Tensor
    la_scale_neg_min: torch.Tensor
    la_scale_hist: torch.Tensor
    la_clip_ratios: torch.Tensor
    position_clipped: torch.Tensor
    position_tokens: torch.Tensor

    @classmethod
    def from_terms(cls, terms: TokenTerms, response_mask: torch.Tensor, advantages: torch.Tensor,
                   cfg: PolicyLossConfig, *, loss: torch.Tensor, dp_size: int,
                   bucket_edges: Sequence[int], positions: torch.Tensor | None = None) -> LossSums:
        """The sums of one micro-batch. terms, response_mask (binary, or bool: the valid tokens),
        advantages: [B, S] as given to
        `policy_loss` (advantages may be [B] or [B, 1]); loss: its 0-d result; bucket_edges,
        positions: see `algo.metrics.clip_rate_by_position` (positions [B, S]: the
        generated-token index n_t of each column; default the cumulative mask count, which is
        right only when the columns are whole responses in order: under context parallelism
        pass the global n_t). They must be the n_t the loss used (its `cum_count`): the CPU
        kernel takes the LA scale statistics from g_t = max(n_t, 1)^la_power per position,
        which is what CTPO's loss computes, instead of reading `terms.la_scale` per token.

        Every sum and histogram is over valid tokens, so a rank holding a piece of each
        sequence (context parallelism) adds exactly its tokens. No host sync: every field is
        a fixed-shape reduction on the inputs' device."""
        edges = check_bucket_edges(bucket_edges)
        with torch.no_grad():
            valid = response_mask if response_mask.dtype == torch.bool else response_mask > 0
            if advantages.shape != valid.shape:
                advantages = advantages.reshape(advantages.shape[0], -1).expand(valid.shape)
            loss_sum = loss.detach().to(torch.float64) / dp_size
            coefficients = (cfg.la_clip_high, -cfg.la_clip_low, cfg.la_clip_c)
            if terms.ratio.dtype in (torch.float32, torch.float64) and ops.loss_stats_kernel_for(valid.device):
                # From the positions: running ones read tables of per-position sums (cost per
                # row, not per token); given ones where rows share positions. One row of given
                # positions has as many positions as tokens, and their table costs more than
                # reading the scales (measured: 1.5 vs 1.1 ms at 1 x 131072).
                shared = valid.dim() > 1 and valid.numel() > valid.shape[-1]
                by_position = positions is None or shared
                la_power = cfg.la_power if terms.la_scale is not None and by_position else None
                return _kernel_sums(terms, valid, advantages, loss_sum, edges, positions, coefficients, la_power)
            return _torch_sums(terms, valid, advantages, loss_sum, edges, positions, coefficients)

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
        """Flat metrics of the totals (one device-to-host copy): rates over all tokens;
        `loss`, `valid_tokens`, `neg_adv_tokens` and `clip_count_*` per update; ratio and
        LA-scale quantiles from the histograms; `clip_rate_by_pos/<lo>-<hi>` rates. All 0.0
        when there is no valid token.

            clipfrac_{high,low,dual,total}    clip/{high,low,dual,total}/rate: count / tokens
            clip_count_{high,low,dual,total}  clip/*/count per update
            valid_tokens, neg_adv_tokens      clip/valid_token_count, clip/neg_adv_token_count
            pg_clipfrac                       actor/pg_clipfrac: tokens with l2 > l1 / tokens
            pg_clipfrac_lower                 actor/pg_clipfrac_lower: dual-clipped / tokens
            ppo_kl                            actor/ppo_kl: mean of -d_t
            is_ratio_{mean,min,max,p99,p95,p90,p75,p50,p25}   is_ratio/*: r_t over valid tokens
            la_scale_{mean,min,max,p50}, la_clip_{high,low,c}_ratio_mean   (adaptive_clip only)
        """
        host = {f.name: t for f, t in zip(dataclasses.fields(self), self._stacked_to_host())}
        # Python numbers once (a float() per 0-d tensor costs more than the arithmetic below).
        v = {name: t if name.endswith("_hist") else t.tolist() for name, t in host.items()}
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
        lo, hi = (-float(v["ratio_neg_min"]), float(v["ratio_max"])) if n else (0.0, 0.0)
        out["is_ratio_mean"], out["is_ratio_min"], out["is_ratio_max"] = rate(v["ratio_sum"]), lo, hi
        qs = histogram.histogram_quantiles(v["ratio_hist"], [q for _, q in RATIO_QUANTILES], lo=lo, hi=hi, total=n)
        out.update((f"is_ratio_{name}", q) for (name, _), q in zip(RATIO_QUANTILES, qs))
        if adaptive_clip and n:
            lo, hi = -float(v["la_scale_neg_min"]), float(v["la_scale_max"])
            out["la_scale_mean"], out["la_scale_min"], out["la_scale_max"] = rate(v["la_scale_sum"]), lo, hi
            out["la_scale_p50"] = histogram.histogram_quantiles(v["la_scale_hist"], [0.5], lo=lo, hi=hi, total=n)[0]
            for i, key in enumerate(("high", "low", "c")):
                out[f"la_clip_{key}_ratio_mean"] = rate(v["la_clip_ratios"][i])
        # Whole numbers as floats: the same rates as from integers, without four tensor ops.
        out.update(position_clip_metrics(v["position_clipped"], v["position_tokens"], bucket_edges))
        return out

    def _stacked_to_host(self) -> list[torch.Tensor]:
        """Every field on the host (fields in order): as they are when already there, else with
        one device-to-host copy."""
        tensors = [getattr(self, f.name).detach() for f in dataclasses.fields(self)]
        if all(t.device.type == "cpu" for t in tensors):
            return tensors  # a concatenation would only copy the histograms once more
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors]).cpu()
        return [part.reshape(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def _torch_sums(terms: TokenTerms, valid: torch.Tensor, advantages: torch.Tensor, loss_sum: torch.Tensor,
                edges: list[int], positions: torch.Tensor | None, coefficients: tuple[float, float, float]) -> LossSums:
    """`LossSums.from_terms` in torch reductions (the definition; devices without kernels)."""
    f64 = dict(dtype=torch.float64, device=valid.device)
    mask = valid.to(torch.float64)  # histogram weights
    weight = valid.to(terms.ratio.dtype)  # sums in the compute dtype, accumulated in float64
    ratio = terms.ratio
    la = dict(la_scale_sum=torch.zeros((), **f64), la_scale_max=torch.zeros((), **f64),
              la_scale_neg_min=torch.full((), -torch.inf, **f64),
              la_scale_hist=torch.zeros(histogram.NUM_BINS, **f64), la_clip_ratios=torch.zeros(3, **f64))
    if terms.la_scale is not None:
        g = terms.la_scale
        la_max, la_neg_min = _extremes(g, weight, valid)
        la = dict(la_scale_sum=(g * weight).sum().to(torch.float64), la_scale_max=la_max,
                  la_scale_neg_min=la_neg_min, la_scale_hist=histogram.histogram(g, mask),
                  la_clip_ratios=_exp_sums(g, weight, coefficients))
    # TokenTerms' flags are False and log_ratio_clamped 0 at invalid tokens (its contract):
    # they are summed as they are; ratio is only meaningful at valid tokens, so weighted.
    clip_any = terms.clip_any
    flags = (terms.clip_high, terms.clip_low, terms.clip_dual, clip_any)
    pos_clipped, pos_tokens = position_counts(clip_any, valid, bucket_edges=edges, positions=positions)
    ratio_max, ratio_neg_min = _extremes(ratio, weight, valid)
    return LossSums(
        loss=loss_sum, tokens=mask.sum(),
        neg_adv_tokens=((advantages < 0) & valid).sum().to(torch.float64),
        clip=torch.stack([f.sum() for f in flags]).to(torch.float64),  # full reductions: no copies
        pg_clipped=terms.clipped.sum().to(torch.float64),
        kl=-terms.log_ratio_clamped.sum().to(torch.float64),
        ratio_sum=(ratio * weight).sum().to(torch.float64),
        ratio_max=ratio_max, ratio_neg_min=ratio_neg_min, ratio_hist=histogram.histogram(ratio, mask),
        position_clipped=pos_clipped, position_tokens=pos_tokens, **la)


def _kernel_sums(terms: TokenTerms, valid: torch.Tensor, advantages: torch.Tensor, loss_sum: torch.Tensor,
                 edges: list[int], positions: torch.Tensor | None, coefficients: tuple[float, float, float],
                 la_power: float | None = None) -> LossSums:
    """`LossSums.from_terms` from the one-pass `ops.loss_stats` kernel (same fields; sums are
    accumulated in float64 instead of the compute dtype, so they agree to rounding). la_power:
    with LA, the scales' statistics are those of max(n_t, 1)^la_power at the positions, per
    position (equal to `terms.la_scale`'s when the positions are the loss's n_t); None reads
    `terms.la_scale` per token."""
    unique = tuple(dict.fromkeys(coefficients))
    has_la = terms.la_scale is not None
    by_position = has_la and la_power is not None
    out = ops.loss_stats(valid, advantages, terms.ratio, terms.log_ratio_clamped,
                         None if by_position else terms.la_scale,
                         (terms.clip_high, terms.clip_low, terms.clip_dual, terms.clipped), positions=positions,
                         bucket_of_position=bucket_of_position(tuple(edges), valid.device), num_buckets=len(edges),
                         exp_coeffs=unique if has_la else (), la_power=la_power if by_position else None,
                         **histogram.KERNEL_LAYOUT)
    # Views of the one scalar output (a few µs each as separate tensor ops: this is per call).
    v = dict(zip(ops.LOSS_STATS_SLOTS, out.scalars.unbind()))
    exp_sums = out.scalars[len(ops.LOSS_STATS_SLOTS):]
    if not has_la:
        la_clip_ratios = torch.zeros(3, dtype=torch.float64, device=valid.device)
    elif unique == coefficients:
        la_clip_ratios = exp_sums
    else:
        la_clip_ratios = exp_sums[[unique.index(c) for c in coefficients]]
    return LossSums(
        loss=loss_sum, tokens=v["tokens"], neg_adv_tokens=v["neg_adv_tokens"],
        clip=out.scalars[_CLIP_SLOTS],
        pg_clipped=v["clipped"], kl=v["neg_log_ratio"], ratio_sum=v["ratio_sum"],
        ratio_max=v["ratio_max"], ratio_neg_min=-v["ratio_min"], ratio_hist=out.ratio_hist,
        la_scale_sum=v["la_scale_sum"], la_scale_max=v["la_scale_max"],
        la_scale_neg_min=-v["la_scale_min"] if has_la else torch.full_like(v["la_scale_min"], -torch.inf),
        la_scale_hist=out.la_scale_hist, la_clip_ratios=la_clip_ratios,
        position_clipped=out.positions[0], position_tokens=out.positions[1])


def policy_metrics(terms: TokenTerms, response_mask: torch.Tensor, advantages: torch.Tensor,
                   cfg: PolicyLossConfig, *, bucket_edges: Sequence[int] | None = None,
                   positions: torch.Tensor | None = None) -> dict[str, float]:
    """The metrics of one micro-batch (`LossSums.metrics` of its `LossSums`, without `loss`):
    terms, response_mask, advantages: [B, S] as given to `policy_loss`; bucket_edges: of the
    clip rate by position (default powers of two up to S); positions: [B, S] the n_t of each
    token when they are not the running count (see `LossSums.from_terms`). One device-to-host
    copy."""
    if bucket_edges is None:
        bucket_edges = position_bucket_edges(max(response_mask.shape[-1], 1))
    sums = LossSums.from_terms(terms, response_mask, advantages, cfg,
                               loss=torch.zeros((), device=response_mask.device), dp_size=1,
                               bucket_edges=bucket_edges, positions=positions)
    out = sums.metrics(num_updates=1, bucket_edges=bucket_edges, adaptive_clip=terms.la_scale is not None)
    del out["loss"]
    return out
