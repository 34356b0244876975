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

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ctpo_megatron import ops
from ctpo_megatron.algo import histogram
from ctpo_megatron.algo.config import PolicyLossConfig
from ctpo_megatron.algo.metrics import (RATIO_QUANTILES, check_bucket_edges,
                                        position_bucket_edges, position_clip_metrics, position_counts,
                                        position_rate_metrics)
from ctpo_megatron.algo.terms import TokenTerms

_NUM_EXP = 3
"""exp(c g) sums per token: c = la_clip_high, -la_clip_low, la_clip_c (`LossSums.la_clip_ratios`)."""
_NAMED_SLOTS = dict(zip(ops.LOSS_STATS_SUM_SLOTS, ops.LOSS_STATS_SUM_SLOTS)) | {"pg_clipped": "clipped",
                                                                               "kl": "neg_log_ratio"}
"""Scalar fields of `LossSums` and the op's slot that holds each."""
_SCALAR_INDEX = {name: ops.LOSS_STATS_SUM_SLOTS.index(slot) for name, slot in _NAMED_SLOTS.items()}
_MAX_INDEX = {name: i for i, name in enumerate(ops.LOSS_STATS_MAX_SLOTS)}
_CLIP_SLOTS = slice(ops.LOSS_STATS_SUM_SLOTS.index("clip_high"), ops.LOSS_STATS_SUM_SLOTS.index("clip_any") + 1)
assert ops.LOSS_STATS_SUM_SLOTS[_CLIP_SLOTS] == ("clip_high", "clip_low", "clip_dual", "clip_any")
_VECTORS = {"clip": "clip", "la_clip_ratios": "exp_sums", "ratio_hist": "ratio_hist",
            "la_scale_hist": "la_scale_hist", "position_clipped": "position_clipped",
            "position_tokens": "position_tokens"}
"""Vector fields of `LossSums` and the section of the op's sums vector that holds each."""
_CLIP_KEYS = tuple((f"clip_count_{key}", f"clipfrac_{key}") for key in ("high", "low", "dual", "total"))
_RATIO_QS = tuple(q for _, q in RATIO_QUANTILES)
_RATIO_QUANTILE_KEYS = tuple(f"is_ratio_{name}" for name, _ in RATIO_QUANTILES)
_LA_CLIP_KEYS = tuple(f"la_clip_{key}_ratio_mean" for key in ("high", "low", "c"))
METRIC_KEYS = ("loss", "valid_tokens", "neg_adv_tokens", "pg_clipfrac", "pg_clipfrac_lower", "ppo_kl",
               *(key for pair in _CLIP_KEYS for key in pair), "is_ratio_mean", "is_ratio_min", "is_ratio_max",
               *_RATIO_QUANTILE_KEYS)
"""The keys `LossSums.metrics` always has, in its order (the values `ops.loss_metrics` returns first)."""
_LA_KEYS = ("la_scale_mean", "la_scale_min", "la_scale_max", "la_scale_p50", *_LA_CLIP_KEYS)
"""The keys it adds with adaptive clipping and a valid token (the op's next values)."""
FIELDS = ("loss", "tokens", "neg_adv_tokens", "clip", "pg_clipped", "kl", "ratio_sum", "ratio_max", "ratio_neg_min",
          "ratio_hist", "la_scale_sum", "la_scale_max", "la_scale_neg_min", "la_scale_hist", "la_clip_ratios",
          "position_clipped", "position_tokens")
"""The named statistics of `LossSums` (each a view of its vectors)."""


@functools.lru_cache(maxsize=8)
def _sections(size: int) -> dict[str, slice]:
    """`ops.loss_stats_sections` of a sums vector of `size` entries (its bucket count from its size)."""
    fixed = ops.loss_stats_sections(_NUM_EXP, histogram.NUM_BINS, 0)["position_tokens"].stop
    if size < fixed or (size - fixed) % 2:
        raise ValueError(f"LossSums: a sums vector of {size} entries is not a loss_stats layout "
                         f"({fixed} + 2 x buckets)")
    sections = ops.loss_stats_sections(_NUM_EXP, histogram.NUM_BINS, (size - fixed) // 2)
    return {"clip": _CLIP_SLOTS, **sections}


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
    """Sums over a set of micro-batches: three float64 tensors on one device, laid out as the
    `ops.loss_stats` kernel writes them, so that adding two is three tensor ops and the rank
    reduction two all-reduces. The named statistics (FIELDS) are views of them:

        scalars (0-d): tokens, neg_adv_tokens, pg_clipped, kl, ratio_sum, la_scale_sum,
            ratio_max, ratio_neg_min, la_scale_max, la_scale_neg_min (minima stored negated);
        clip [4] (high, low, dual, any); la_clip_ratios [3]: token sums of
            exp(la_clip_{high,low,c} g_t); ratio_hist, la_scale_hist [histogram.NUM_BINS] token
            counts per bin; position_clipped, position_tokens [K] per position bucket.
    """

    loss: torch.Tensor
    """0-d: sum of the back-propagated loss / dp_size (per optimizer update, the mini-batch loss)."""
    sums: torch.Tensor
    """[10 + 3 + 2 x NUM_BINS + 2 x K] (`ops.loss_stats_sections`): everything reduced with a sum."""
    maxima: torch.Tensor
    """[4]: ratio_max, ratio_neg_min, la_scale_max, la_scale_neg_min, reduced with a max."""

    def field(self, name: str) -> torch.Tensor:
        """The named statistic (one of FIELDS): a view of loss, sums or maxima."""
        if name == "loss":
            return self.loss
        if name in _MAX_INDEX:
            return self.maxima[_MAX_INDEX[name]]
        if name in _SCALAR_INDEX:
            return self.sums[_SCALAR_INDEX[name]]
        if name in _VECTORS:
            return self.sums[_sections(self.sums.numel())[_VECTORS[name]]]
        raise AttributeError(f"LossSums has no statistic {name!r}; it has {', '.join(FIELDS)}")

    tokens = property(lambda self: self.field("tokens"), doc="Valid (generated) tokens.")
    neg_adv_tokens = property(lambda self: self.field("neg_adv_tokens"),
                              doc="Valid tokens with a negative advantage.")
    clip = property(lambda self: self.field("clip"), doc="[4] tokens clipped high, low, dual, any.")
    pg_clipped = property(lambda self: self.field("pg_clipped"),
                          doc="Tokens whose clipped branch is larger (the reference's pg_clipfrac numerator).")
    kl = property(lambda self: self.field("kl"), doc="Sum of -d_t (the reference's ppo_kl numerator).")
    ratio_sum = property(lambda self: self.field("ratio_sum"), doc="Sum of r_t.")
    ratio_max = property(lambda self: self.field("ratio_max"))
    ratio_neg_min = property(lambda self: self.field("ratio_neg_min"))
    ratio_hist = property(lambda self: self.field("ratio_hist"), doc="Histogram of r_t (the quantiles).")
    la_scale_sum = property(lambda self: self.field("la_scale_sum"))
    la_scale_max = property(lambda self: self.field("la_scale_max"))
    la_scale_neg_min = property(lambda self: self.field("la_scale_neg_min"))
    la_scale_hist = property(lambda self: self.field("la_scale_hist"))
    la_clip_ratios = property(lambda self: self.field("la_clip_ratios"))
    position_clipped = property(lambda self: self.field("position_clipped"))
    position_tokens = property(lambda self: self.field("position_tokens"))

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
            valid, advantages = _valid_and_advantages(response_mask, advantages)
            loss_sum = _loss_sum(loss, dp_size)
            kernel, la_power = _kernel_plan(terms, valid, cfg, positions)
            if kernel:
                return _kernel_sums(terms, valid, advantages, loss_sum, edges, positions, _coefficients(cfg), la_power)
            return _torch_sums(terms, valid, advantages, loss_sum, edges, positions, _coefficients(cfg))

    @classmethod
    def from_stats(cls, stats: ops.LossStatsOut, *, loss: torch.Tensor, dp_size: int) -> LossSums:
        """The sums of one micro-batch from the statistics op's vectors (`ops.loss_stats`, or
        `ops.ctpo_token_loss_stats` from the loss's own pass) and its loss (0-d)."""
        return cls(_loss_sum(loss, dp_size), stats.sums, stats.maxima)

    def __add__(self, other: LossSums) -> LossSums:
        if self.sums.shape != other.sums.shape:
            raise ValueError(f"LossSums: cannot add sums of {self.sums.numel()} and {other.sums.numel()} "
                             "entries (other position buckets)")
        return LossSums(self.loss + other.loss, self.sums + other.sums, torch.maximum(self.maxima, other.maxima))

    def to_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sums [1 + len(self.sums)]: loss then sums, maxima [4]) float64: all-reduce the first
        with SUM, the second with MAX."""
        return torch.cat([self.loss.reshape(1).to(self.sums.dtype), self.sums]), self.maxima

    def from_vectors(self, sums: torch.Tensor, maxes: torch.Tensor) -> LossSums:
        """The inverse of `to_vectors`."""
        if sums.shape != (1 + self.sums.numel(),) or maxes.shape != self.maxima.shape:
            raise ValueError(f"LossSums.from_vectors: got [{sums.numel()}] and [{maxes.numel()}], expected "
                             f"[{1 + self.sums.numel()}] and [{self.maxima.numel()}]")
        return LossSums(sums[0], sums[1:], maxes)

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
        host = self._to_host()
        if not ops.loss_stats_kernel_for(host.sums.device):
            return host._metrics_definition(num_updates, bucket_edges, adaptive_clip)
        buckets = host.sums.numel() - _sections(host.sums.numel())["position_clipped"].start
        values = ops.loss_metrics(host.sums, host.maxima, loss=host.loss.item(), num_exp=_NUM_EXP,
                                  num_buckets=buckets // 2, num_updates=num_updates, adaptive_clip=adaptive_clip,
                                  qs=_RATIO_QS, **histogram.KERNEL_LAYOUT)
        return _metrics_from_values(values, bucket_edges, adaptive_clip)

    def _metrics_definition(self, num_updates: int, bucket_edges: Sequence[int],
                            adaptive_clip: bool) -> dict[str, float]:
        """`metrics` of sums on the host, in Python: its definition, and the path without the
        extension (the `ops.loss_metrics` kernel computes the same, in the same order)."""
        sections = _sections(self.sums.numel())
        sums = self.sums.numpy()
        scalars = sums[:sections["exp_sums"].stop].tolist()
        v = {name: scalars[i] for name, i in _SCALAR_INDEX.items()}
        v.update(zip(ops.LOSS_STATS_MAX_SLOTS, self.maxima.tolist()))
        clip, la_clip_ratios = scalars[_CLIP_SLOTS], scalars[sections["exp_sums"]]
        n = v["tokens"]
        per = 1.0 / max(num_updates, 1)
        rate = (lambda x: x / n) if n else (lambda x: 0.0)  # noqa: E731
        out = {"loss": self.loss.item() * per, "valid_tokens": n * per,
               "neg_adv_tokens": v["neg_adv_tokens"] * per,
               "pg_clipfrac": v["pg_clipped"] / (n + 1e-8),
               "pg_clipfrac_lower": clip[2] / (n + 1e-8),
               "ppo_kl": v["kl"] / (n + 1e-8)}
        for (count_key, rate_key), c in zip(_CLIP_KEYS, clip):
            out[count_key] = c * per
            out[rate_key] = rate(c)
        lo, hi = (-v["ratio_neg_min"], v["ratio_max"]) if n else (0.0, 0.0)
        out["is_ratio_mean"], out["is_ratio_min"], out["is_ratio_max"] = rate(v["ratio_sum"]), lo, hi
        qs = histogram.histogram_quantiles(self.sums[sections["ratio_hist"]], _RATIO_QS, lo=lo, hi=hi, total=n)
        out.update(zip(_RATIO_QUANTILE_KEYS, qs))
        if adaptive_clip and n:
            lo, hi = -v["la_scale_neg_min"], v["la_scale_max"]
            out["la_scale_mean"], out["la_scale_min"], out["la_scale_max"] = rate(v["la_scale_sum"]), lo, hi
            out["la_scale_p50"] = histogram.histogram_quantiles(self.sums[sections["la_scale_hist"]], [0.5],
                                                                lo=lo, hi=hi, total=n)[0]
            for key, c in zip(_LA_CLIP_KEYS, la_clip_ratios):
                out[key] = rate(c)
        buckets = sums[sections["position_clipped"].start:].tolist()
        k = len(buckets) // 2
        out.update(position_clip_metrics(buckets[:k], buckets[k:], bucket_edges))
        return out

    def _to_host(self) -> LossSums:
        """These sums on the host: as they are when already there, else with one
        device-to-host copy."""
        if self.sums.device.type == "cpu":  # all three share one device
            return LossSums(self.loss.detach(), self.sums.detach(), self.maxima.detach())
        sums, maxima = self.to_vectors()
        flat = torch.cat([sums.detach(), maxima.detach()]).cpu()
        return self.from_vectors(flat[:sums.numel()], flat[sums.numel():])


def _loss_sum(loss: torch.Tensor, dp_size: int) -> torch.Tensor:
    """`LossSums.loss` of one micro-batch: its loss / dp_size, float64, no gradient."""
    return loss.detach().to(torch.float64) / dp_size


def _torch_sums(terms: TokenTerms, valid: torch.Tensor, advantages: torch.Tensor, loss_sum: torch.Tensor,
                edges: list[int], positions: torch.Tensor | None, coefficients: tuple[float, float, float]) -> LossSums:
    """`LossSums.from_terms` in torch reductions (the definition; devices without kernels)."""
    f64 = dict(dtype=torch.float64, device=valid.device)
    mask = valid.to(torch.float64)  # histogram weights
    weight = valid.to(terms.ratio.dtype)  # sums in the compute dtype, accumulated in float64
    ratio = terms.ratio
    zero = torch.zeros((), **f64)
    la_sum, la_max, la_neg_min = zero, zero, torch.full((), -torch.inf, **f64)
    la_hist, la_clip_ratios = torch.zeros(histogram.NUM_BINS, **f64), torch.zeros(_NUM_EXP, **f64)
    if terms.la_scale is not None:
        g = terms.la_scale
        la_max, la_neg_min = _extremes(g, weight, valid)
        la_sum, la_hist = (g * weight).sum().to(torch.float64), histogram.histogram(g, mask)
        la_clip_ratios = _exp_sums(g, weight, coefficients)
    # TokenTerms' flags are False and log_ratio_clamped 0 at invalid tokens (its contract):
    # they are summed as they are; ratio is only meaningful at valid tokens, so weighted.
    flags = (terms.clip_high, terms.clip_low, terms.clip_dual, terms.clip_any)
    pos_clipped, pos_tokens = position_counts(terms.clip_any, valid, bucket_edges=edges, positions=positions)
    ratio_max, ratio_neg_min = _extremes(ratio, weight, valid)
    named = {"tokens": mask.sum(), "neg_adv_tokens": ((advantages < 0) & valid).sum(),
             **{slot: f.sum() for slot, f in zip(ops.LOSS_STATS_SUM_SLOTS[_CLIP_SLOTS], flags)},
             "clipped": terms.clipped.sum(), "neg_log_ratio": -terms.log_ratio_clamped.sum(),
             "ratio_sum": (ratio * weight).sum(), "la_scale_sum": la_sum}
    scalars = torch.stack([named[slot].to(torch.float64) for slot in ops.LOSS_STATS_SUM_SLOTS])
    sums = torch.cat([scalars, la_clip_ratios, histogram.histogram(ratio, mask), la_hist, pos_clipped, pos_tokens])
    return LossSums(loss_sum, sums, torch.stack([ratio_max, ratio_neg_min, la_max, la_neg_min]))


def _kernel_sums(terms: TokenTerms, valid: torch.Tensor, advantages: torch.Tensor, loss_sum: torch.Tensor,
                 edges: list[int], positions: torch.Tensor | None, coefficients: tuple[float, float, float],
                 la_power: float | None = None) -> LossSums:
    """`LossSums.from_terms` from the one-pass `ops.loss_stats` kernel (the same vectors, which
    it writes in LossSums' layout; sums are accumulated in float64 instead of the compute
    dtype, so they agree to rounding). la_power: with LA, the scales' statistics are those of
    max(n_t, 1)^la_power at the positions, per position (equal to `terms.la_scale`'s when the
    positions are the loss's n_t); None reads `terms.la_scale` per token."""
    out = ops.loss_stats(**_kernel_args(terms, valid, advantages, edges, positions, coefficients, la_power))
    return LossSums(loss_sum, out.sums, out.maxima)


def _kernel_args(terms: TokenTerms, valid: torch.Tensor, advantages: torch.Tensor, edges: Sequence[int],
                 positions: torch.Tensor | None, coefficients: tuple[float, float, float],
                 la_power: float | None) -> dict:
    """The arguments of `ops.loss_stats` (and `ops.loss_stats_metrics`) for these terms."""
    by_position = terms.la_scale is not None and la_power is not None
    return dict(valid=valid, advantages=advantages, ratio=terms.ratio, log_ratio=terms.log_ratio_clamped,
                la_scale=None if by_position else terms.la_scale,
                flags=(terms.clip_high, terms.clip_low, terms.clip_dual, terms.clipped), positions=positions,
                la_power=la_power if by_position else None,
                **_layout_args(tuple(edges), tuple(coefficients)))


@functools.lru_cache(maxsize=16)
def _layout_args(edges: tuple[int, ...], coefficients: tuple[float, ...]) -> dict:
    """The statistics' layout arguments of the stats ops (buckets, exp coefficients, histogram
    bins), built once per edges and coefficients. Callers unpack it into a new dict."""
    return dict(bucket_edges=edges, exp_coeffs=coefficients, **histogram.KERNEL_LAYOUT)


def _kernel_plan(terms: TokenTerms, valid: torch.Tensor, cfg: PolicyLossConfig,
                 positions: torch.Tensor | None) -> tuple[bool, float | None]:
    """(whether the `ops.loss_stats` kernel takes these terms, the la_power it takes the LA
    statistics from, or None to read `terms.la_scale` per token)."""
    if terms.ratio.dtype not in (torch.float32, torch.float64) or not ops.loss_stats_kernel_for(valid.device):
        return False, None
    # From the positions: running ones read tables of per-position sums (cost per row, not
    # per token); given ones where rows share positions. One row of given positions has as
    # many positions as tokens, and their table costs more than reading the scales (measured:
    # 1.5 vs 1.1 ms at 1 x 131072).
    by_position = positions is None or (valid.dim() > 1 and valid.numel() > valid.shape[-1])
    return True, cfg.la_power if terms.la_scale is not None and by_position else None


@functools.lru_cache(maxsize=16)
def _default_edges(length: int) -> tuple[int, ...]:
    """`position_bucket_edges` of a row length, built once (a tuple: every call shares it)."""
    return tuple(position_bucket_edges(max(length, 1)))


def _valid_and_advantages(response_mask: torch.Tensor, advantages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid [B, S] bool, advantages [B, S]) from a binary or bool mask and [B, S], [B] or [B, 1] advantages."""
    valid = response_mask if response_mask.dtype == torch.bool else response_mask > 0
    if advantages.shape != valid.shape:
        advantages = advantages.reshape(advantages.shape[0], -1).expand(valid.shape)
    return valid, advantages


def _coefficients(cfg: PolicyLossConfig) -> tuple[float, float, float]:
    """The c of the exp(c g) sums (`LossSums.la_clip_ratios`)."""
    return cfg.la_clip_high, -cfg.la_clip_low, cfg.la_clip_c


def metrics_op_arguments(length: int, cfg: PolicyLossConfig) -> dict:
    """The statistics' arguments of `ops.ctpo_token_loss_metrics` for rows of `length` tokens:
    what `policy_metrics` passes `ops.loss_stats_metrics` (default position buckets)."""
    return dict(sums_op_arguments(_default_edges(length), cfg), qs=_RATIO_QS)


def sums_op_arguments(bucket_edges: Sequence[int], cfg: PolicyLossConfig) -> dict:
    """The statistics' arguments of `ops.ctpo_token_loss_stats` (clip-rate buckets at
    `bucket_edges`): what `LossSums.from_terms` passes `ops.loss_stats`."""
    return dict(_layout_args(tuple(bucket_edges), _coefficients(cfg)))


def metrics_from_values(values: list[float], length: int, *, adaptive_clip: bool) -> dict[str, float]:
    """`policy_metrics`' dict from `ops.ctpo_token_loss_metrics`' values (rows of `length` tokens)."""
    out = _metrics_from_values(values, _default_edges(length), adaptive_clip)
    del out["loss"]
    return out


def _metrics_from_values(values: list[float], bucket_edges: Sequence[int], adaptive_clip: bool) -> dict[str, float]:
    """`LossSums.metrics` from `ops.loss_metrics`' values (the same keys, in the same order)."""
    out = dict(zip(METRIC_KEYS, values))
    fixed = len(METRIC_KEYS)
    if adaptive_clip and out["valid_tokens"]:
        out.update(zip(_LA_KEYS, values[fixed:]))
    out.update(position_rate_metrics(values[fixed + len(_LA_KEYS):], bucket_edges))
    return out


def policy_metrics(terms: TokenTerms, response_mask: torch.Tensor, advantages: torch.Tensor,
                   cfg: PolicyLossConfig, *, bucket_edges: Sequence[int] | None = None,
                   positions: torch.Tensor | None = None) -> dict[str, float]:
    """The metrics of one micro-batch (`LossSums.metrics` of its `LossSums`, without `loss`):
    terms, response_mask, advantages: [B, S] as given to `policy_loss`; bucket_edges: of the
    clip rate by position (default powers of two up to S); positions: [B, S] the n_t of each
    token when they are not the running count (see `LossSums.from_terms`). One device-to-host
    copy."""
    edges = _default_edges(response_mask.shape[-1]) if bucket_edges is None else check_bucket_edges(bucket_edges)
    adaptive_clip = terms.la_scale is not None
    with torch.no_grad():
        valid, advantages = _valid_and_advantages(response_mask, advantages)
        kernel, la_power = _kernel_plan(terms, valid, cfg, positions)
        if kernel:  # one call: the statistics and their values
            values = ops.loss_stats_metrics(**_kernel_args(terms, valid, advantages, edges, positions,
                                                           _coefficients(cfg), la_power),
                                            qs=_RATIO_QS, adaptive_clip=adaptive_clip)
            out = _metrics_from_values(values, edges, adaptive_clip)
        else:
            sums = LossSums.from_terms(terms, valid, advantages, cfg, dp_size=1, bucket_edges=edges,
                                       loss=torch.zeros((), dtype=torch.float64, device=valid.device),
                                       positions=positions)
            out = sums.metrics(num_updates=1, bucket_edges=edges, adaptive_clip=adaptive_clip)
    del out["loss"]
    return out
