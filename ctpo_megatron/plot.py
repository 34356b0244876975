"""Draws a run's metrics to PNG: `python -m ctpo_megatron.plot RUN_DIR`.

Writes into `RUN_DIR/plots/`:
  reward.png            training reward and held-out accuracy per step
  clip_by_position.png  clip rate vs. generated-token position (early, middle and late steps)
  ratio.png             distribution of the policy ratio per step (quantile bands)
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from ctpo_megatron.trainer.metrics import METRICS_FILE, read_metrics

_POS_KEY = re.compile(r"^clip_rate_by_pos/(\d+)(?:-(\d+)|\+)$")
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


def plot_run(run_dir: str) -> list[str]:
    """Draws every plot of `run_dir`; returns the PNG paths.

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
    args = parser.parse_args(argv)
    for path in plot_run(args.run_dir):
        print(path)
    if args.summary:
        print(accuracy_summary(args.run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
