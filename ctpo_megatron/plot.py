"""Draws a run's metrics to PNG: `python -m ctpo_megatron.plot RUN_DIR`.

Writes into `RUN_DIR/plots/`:
  reward.png            training reward and held-out accuracy per step
  clip_by_position.png  clip rate vs. generated-token position (early, middle and late steps)
  ratio.png             distribution of the policy ratio per step (quantile bands)
  staleness.png         asynchronous runs (`rollout.max_staleness` >= 1) only: the fraction of
                        generated tokens 0, 1, ... weight versions behind the trained weights
                        per step, and the fraction `rollout.stale_policy` took out of the loss
and, when the run wrote per-token dumps (`trainer.dump_every`, `RUN_DIR/token_dumps/`), from
the latest dumped step (or `--dump-step`):
  logratio_std.png      std of the cumulative log ratio log rho_t = s_t over sequences, at
                        each exact position t, with the least-squares fit sigma * sqrt(t)
                        (and the per-token log ratio's std, for comparison)
  clip_rate_exact.png   clip rate at each exact position t of a fixed ratio clip
                        [1 - eps_low, 1 + eps_high] and of the LA clip
                        [-la_low * t^p, la_high * t^p] (log space), on the same ratios
                        exp(min(s_t, 10)); advantage-aware (A > 0: upper bound, A < 0:
                        lower); the dual clip (A < 0 above clip_ratio_c, or la_c * t^p)
                        drawn apart, dashed
Clip settings come from the run's config.yaml (algo section), or --eps-* / --la-* flags.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass

from ctpo_megatron.trainer.metrics import METRICS_FILE, read_metrics

_POS_KEY = re.compile(r"^clip_rate_by_pos/(\d+)(?:-(\d+)|\+)$")
_STALENESS_KEY = re.compile(r"^staleness/(\d+)$")
RATIO_BANDS = (("is_ratio_p25", "is_ratio_p75"), ("is_ratio_min", "is_ratio_max"))


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _prefixed(records: list[dict], suffix: str) -> str | None:
    """The first metric name ending in `suffix` (the trainer prefixes loss metrics, e.g. `actor/`)."""
    for r in records:
        for k in r:
            if k == suffix or k.endswith("/" + suffix):
                return k
    return None


def _finish(fig, ax, out: str, *, title: str, xlabel: str, ylabel: str) -> None:
    """Labels, grid and title shared by every plot; writes `out` and frees the figure."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_reward(records: list[dict], out: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label, style in (("reward/mean", "train reward (mean)", "-"),
                              ("eval/accuracy", "held-out accuracy (mean@k)", "o-")):
        x, y = _series(records, key)
        if x:
            ax.plot(x, y, style, label=label)
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    _finish(fig, ax, out, title="reward", xlabel="step", ylabel="reward / accuracy")


def _position_rates(record: dict, kind: str) -> list[tuple[int, float]]:
    pts = []
    for k, v in record.items():
        if not k.startswith(kind + "/") or v is None:
            continue
        m = _POS_KEY.match("clip_rate_by_pos/" + k[len(kind) + 1:])
        if m:
            pts.append((int(m.group(1)), v))
    return sorted(pts)


def plot_clip_by_position(records: list[dict], out: str) -> None:
    import matplotlib.pyplot as plt

    kind = "clip_rate_by_pos"
    with_pos = [r for r in records if _position_rates(r, kind)]
    fig, ax = plt.subplots(figsize=(7, 4))
    picks = sorted({0, len(with_pos) // 2, len(with_pos) - 1})  # plot_run checked with_pos is not empty
    for i in picks:
        pts = _position_rates(with_pos[i], kind)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"step {with_pos[i]['step']}")
    ax.set_xscale("log", base=2)
    ax.legend()
    _finish(fig, ax, out, title="clip rate vs. position",
            xlabel="generated-token position (bucket start)", ylabel="fraction of tokens clipped")


def plot_ratio(records: list[dict], out: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    median = _prefixed(records, "is_ratio_p50")  # plot_run checked it exists
    prefix = median[: -len("is_ratio_p50")]
    for (lo, hi), alpha, label in zip(RATIO_BANDS, (0.4, 0.15), ("p25-p75", "min-max")):
        xs, lows = _series(records, prefix + lo)
        _, highs = _series(records, prefix + hi)
        if xs and len(lows) == len(highs):
            ax.fill_between(xs, lows, highs, alpha=alpha, color="C0", label=label)
    xs, ys = _series(records, median)
    ax.plot(xs, ys, "-", color="C0", label="median")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.legend()
    _finish(fig, ax, out, title="ratio distribution", xlabel="step",
            ylabel="policy ratio r_t (valid tokens)")


def staleness_ages(records: list[dict]) -> list[int]:
    """Token ages (weight versions behind) that some record counts, `staleness/<age>`."""
    return sorted({int(m.group(1)) for r in records for k in r if (m := _STALENESS_KEY.match(k))})


def plot_staleness(records: list[dict], out: str) -> None:
    """Per step, the fraction of generated tokens at each age, and the fraction taken out of
    the loss for being older than `rollout.max_staleness` (`stale/masked_tokens` over the
    step's generated tokens, the sum of `tokens_per_version/*`)."""
    import matplotlib.pyplot as plt

    rows = [r for r in records if r.get("staleness/mean") is not None]
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for age in staleness_ages(rows):
        ax.plot(steps, [r.get(f"staleness/{age}", 0.0) for r in rows], "o-",
                label=f"{age} version{'s' if age != 1 else ''} behind")
    if any("stale/masked_tokens" in r for r in rows):
        generated = [sum(v for k, v in r.items() if k.startswith("tokens_per_version/")) for r in rows]
        ax.plot(steps, [r.get("stale/masked_tokens", 0.0) / max(g, 1.0) for r, g in zip(rows, generated)],
                "x--", color="gray", label="taken out of the loss (stale_policy)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    _finish(fig, ax, out, title="token staleness", xlabel="step", ylabel="fraction of generated tokens")


REWARD_KEYS = ("reward/mean", "eval/accuracy")


def missing_metrics(records: list[dict]) -> list[str]:
    """One line per figure whose metrics no record has (empty when every figure has data)."""
    missing = []
    if not any(r.get(k) is not None for r in records for k in REWARD_KEYS):
        missing.append(f"reward.png (needs {' or '.join(REWARD_KEYS)})")
    if not any(_position_rates(r, "clip_rate_by_pos") for r in records):
        missing.append("clip_by_position.png (needs clip_rate_by_pos/<bucket>, e.g. clip_rate_by_pos/2-3)")
    if _prefixed(records, "is_ratio_p50") is None:
        missing.append("ratio.png (needs is_ratio_p50, e.g. actor/is_ratio_p50)")
    return missing


@dataclass
class ClipSettings:
    """Bounds compared by `plot_clip_rate_exact` (defaults: the paper's algo settings)."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    clip_ratio_c: float = 3.0
    la_low: float = 0.025
    la_high: float = 0.05
    la_c: float = 0.05
    la_power: float = 0.5

    @classmethod
    def from_run(cls, run_dir: str) -> ClipSettings:
        """The run's `algo` settings from its config.yaml (defaults when absent)."""
        path = os.path.join(run_dir, "config.yaml")
        if not os.path.exists(path):
            return cls()
        from omegaconf import OmegaConf

        algo = OmegaConf.load(path).get("algo") or {}
        return cls(eps_low=algo.get("clip_ratio_low", 0.2), eps_high=algo.get("clip_ratio_high", 0.2),
                   clip_ratio_c=algo.get("clip_ratio_c", 3.0), la_low=algo.get("la_clip_low", 0.025),
                   la_high=algo.get("la_clip_high", 0.05), la_c=algo.get("la_clip_c", 0.05),
                   la_power=algo.get("la_power", 0.5))


def _by_position(position, values_list, min_count: int):
    """Groups per-token arrays by exact position: (positions, counts, [per-array value lists])."""
    import numpy as np

    order = np.argsort(position, kind="stable")
    pos_sorted = position[order]
    uniq, starts, counts = np.unique(pos_sorted, return_index=True, return_counts=True)
    keep = counts >= min_count
    groups = [[v[order][a:a + c] for a, c in zip(starts[keep], counts[keep])] for v in values_list]
    return uniq[keep], counts[keep], groups


def sqrt_t_fit(t, std) -> float:
    """Least-squares sigma of std ~ sigma * sqrt(t): sum(sqrt(t) * std) / sum(t)."""
    import numpy as np

    t, std = np.asarray(t, dtype=np.float64), np.asarray(std, dtype=np.float64)
    return float((np.sqrt(t) * std).sum() / t.sum())


def logratio_std_by_position(dump: dict, min_count: int = 8):
    """(positions, std of s_t, std of delta_t, counts) over tokens at each exact position."""
    import numpy as np

    pos, counts, (cum, tok) = _by_position(dump["position"], [dump["cum_log_ratio"], dump["log_ratio"]],
                                           min_count)
    return (pos, np.array([g.std() for g in cum]), np.array([g.std() for g in tok]), counts)


def clip_rates_by_position(dump: dict, clip: ClipSettings, min_count: int = 8) -> dict:
    """Per exact position t: clip rates of the fixed and LA clips on x_t = min(s_t, 10), and of
    their dual clips (A < 0 tokens above the dual threshold), as fractions of the tokens at t."""
    import numpy as np

    x = np.minimum(dump["cum_log_ratio"].astype(np.float64), 10.0)
    adv = dump["advantage"].astype(np.float64)
    t = np.maximum(dump["position"].astype(np.float64), 1.0)
    g = t ** clip.la_power if clip.la_power != 0 else np.ones_like(t)
    pos_adv, neg_adv = adv > 0, adv < 0
    fixed = (pos_adv & (x > np.log1p(clip.eps_high))) | (neg_adv & (x < np.log1p(-clip.eps_low)))
    la = (pos_adv & (x > clip.la_high * g)) | (neg_adv & (x < -clip.la_low * g))
    fixed_dual = neg_adv & (np.exp(x) > clip.clip_ratio_c)
    la_dual = neg_adv & (x > clip.la_c * g)
    pos, counts, groups = _by_position(dump["position"], [fixed, la, fixed_dual, la_dual], min_count)
    names = ("fixed", "la", "fixed_dual", "la_dual")
    return {"position": pos, "count": counts,
            **{n: np.array([grp.mean() for grp in gs]) for n, gs in zip(names, groups)}}


def plot_logratio_std(dump: dict, out: str, min_count: int = 8) -> float:
    """Draws logratio_std.png; returns the fitted sigma."""
    import matplotlib.pyplot as plt
    import numpy as np

    pos, std_cum, std_tok, _ = logratio_std_by_position(dump, min_count)
    fig, ax = plt.subplots(figsize=(7, 4))
    sigma = float("nan")
    if len(pos):
        sigma = sqrt_t_fit(pos, std_cum)
        ax.plot(pos, std_cum, ".", ms=3, label="std of log rho_t (cumulative)")
        ax.plot(pos, sigma * np.sqrt(pos), "-", color="C3", label=f"fit sigma*sqrt(t), sigma={sigma:.3g}")
        ax.plot(pos, std_tok, ".", ms=2, color="C2", alpha=0.6, label="std of per-token log ratio")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend()
    else:
        ax.text(0.5, 0.5, f"no position with >= {min_count} tokens", ha="center", transform=ax.transAxes)
    _finish(fig, ax, out, title=f"log-ratio spread vs. position (step {int(dump['step'])})",
            xlabel="position t among generated tokens", ylabel="std over sequences")
    return sigma


def plot_clip_rate_exact(dump: dict, clip: ClipSettings, out: str, min_count: int = 8) -> dict:
    """Draws clip_rate_exact.png; returns the rates of `clip_rates_by_position`."""
    import matplotlib.pyplot as plt

    rates = clip_rates_by_position(dump, clip, min_count)
    fig, ax = plt.subplots(figsize=(7, 4))
    if len(rates["position"]):
        p = rates["position"]
        ax.plot(p, rates["fixed"], "-", lw=1, color="C0",
                label=f"fixed clip [{1 - clip.eps_low:g}, {1 + clip.eps_high:g}]")
        ax.plot(p, rates["la"], "-", lw=1, color="C1",
                label=f"LA clip [-{clip.la_low:g}, {clip.la_high:g}] x t^{clip.la_power:g}")
        ax.plot(p, rates["fixed_dual"], "--", lw=1, color="C0", alpha=0.7, label=f"fixed dual (> {clip.clip_ratio_c:g})")
        ax.plot(p, rates["la_dual"], "--", lw=1, color="C1", alpha=0.7, label=f"LA dual (> {clip.la_c:g} x t^p)")
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, f"no position with >= {min_count} tokens", ha="center", transform=ax.transAxes)
    _finish(fig, ax, out, title=f"clip rate vs. exact position, same ratios (step {int(dump['step'])})",
            xlabel="position t among generated tokens", ylabel="fraction of tokens clipped")
    return rates


def plot_dumps(run_dir: str, out_dir: str, *, step: int | None = None, clip: ClipSettings | None = None,
               min_count: int = 8) -> list[str]:
    """Draws the two dump figures of `run_dir` into `out_dir`; returns their paths."""
    from ctpo_megatron.trainer.dumps import load_token_dumps

    dump = load_token_dumps(run_dir, step)
    std_png, clip_png = os.path.join(out_dir, "logratio_std.png"), os.path.join(out_dir, "clip_rate_exact.png")
    plot_logratio_std(dump, std_png, min_count)
    plot_clip_rate_exact(dump, clip or ClipSettings.from_run(run_dir), clip_png, min_count)
    return [std_png, clip_png]


def plot_run(run_dir: str, *, dump_step: int | None = None, clip: ClipSettings | None = None) -> list[str]:
    """Draws every plot of `run_dir` (and, when it has per-token dumps, the two dump figures);
    returns the PNG paths.

    Raises FileNotFoundError without metrics.jsonl, and ValueError (writing nothing) when a
    figure's metrics are absent from every record, instead of drawing empty axes.
    """
    import matplotlib

    matplotlib.use("Agg")
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {run_dir!r} a run directory?")
    records = read_metrics(path)
    missing = missing_metrics(records)
    if missing:
        raise ValueError(f"{path}: nothing to draw for " + "; ".join(missing)
                         + f" ({len(records)} records; is this a CTPO training run's metrics file?)")
    out_dir = os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    outputs = []
    for name, fn in (("reward.png", plot_reward), ("clip_by_position.png", plot_clip_by_position),
                     ("ratio.png", plot_ratio)):
        out = os.path.join(out_dir, name)
        fn(records, out)
        outputs.append(out)
    if any(age > 0 for age in staleness_ages(records)):  # an asynchronous run
        out = os.path.join(out_dir, "staleness.png")
        plot_staleness(records, out)
        outputs.append(out)
    if os.path.isdir(os.path.join(run_dir, "token_dumps")):
        outputs += plot_dumps(run_dir, out_dir, step=dump_step, clip=clip)
    return outputs


def accuracy_summary(run_dir: str) -> str:
    """`held-out accuracy: <first> -> <last> (...)` from the run's eval/accuracy records."""
    records = [r for r in read_metrics(os.path.join(run_dir, METRICS_FILE))
               if r.get("eval/accuracy") is not None]
    if not records:
        return "held-out accuracy: n/a (no evaluation in metrics.jsonl)"
    first, last = records[0], records[-1]
    return (f"held-out accuracy: {first['eval/accuracy']:.2f} -> {last['eval/accuracy']:.2f} "
            f"(step {first['step']} -> step {last['step']}, mean@k over the held-out set)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ctpo_megatron.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="run directory holding metrics.jsonl")
    parser.add_argument("--summary", action="store_true",
                        help="print the held-out accuracy line (first -> last evaluation) last")
    parser.add_argument("--dump-step", type=int, default=None,
                        help="step of the per-token dump figures (default: the latest dumped)")
    for name in ("eps_low", "eps_high", "clip_ratio_c", "la_low", "la_high", "la_c", "la_power"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=None,
                            help=f"clip setting of the dump figures (default: the run's algo.{name})")
    args = parser.parse_args(argv)
    clip = ClipSettings.from_run(args.run_dir)
    for name in clip.__dataclass_fields__:
        if getattr(args, name) is not None:
            setattr(clip, name, getattr(args, name))
    for path in plot_run(args.run_dir, dump_step=args.dump_step, clip=clip):
        print(path)
    if args.summary:
        print(accuracy_summary(args.run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
