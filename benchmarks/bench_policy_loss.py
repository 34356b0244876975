"""`policy_loss` with its metrics vs a plain unfused torch composition of the same loss.

    python benchmarks/bench_policy_loss.py [--reps 150] [--threads 1] [--shapes 8x8192 1x131072]

Four sides, forward + backward to the log-probs, on the same inputs (CTPO cumprod with
adaptive clipping, token-mean; the paper defaults):
  torch:      the pure-torch CTPO terms (`ctpo_token_terms` on the torch scan), the masked
              token-mean loss and the three clip fractions (high, low, dual) as floats;
  policy:     `algo.policy_loss` with its metrics (`policy_metrics`: every statistic of
              `LossSums`, quantiles from histograms, turned into floats);
  no-metrics: `algo.policy_loss(..., with_metrics=False)` (what the loss itself costs);
  trainer:    the trainer's loss function per micro-batch (`trainer.update.make_loss_fn` at
              CP 1): the loss and its `LossSums` (its statistics become floats once per
              step, not timed here).
Time: median of --reps runs after two warm-ups; the sides alternate within each rep so that
they see the same background load, in each of their 24 orders in turn (the side after the
torch one starts with evicted caches). Printed per shape: the four medians, the ratio
torch / policy, the metrics' share of policy_loss's time, 1 - no-metrics / policy, and the
statistics' share of the trainer's, 1 - no-metrics / trainer.
Goal: ratio >= 3, share <= 20%.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_ctpo_loss import make_inputs, print_setup, pure_torch_terms  # noqa: E402  (same folder)

from ctpo_megatron.algo import LossSums, PolicyLossConfig, policy_loss  # noqa: E402
from ctpo_megatron.algo.metrics import position_bucket_edges  # noqa: E402
from ctpo_megatron.trainer.update import make_loss_fn  # noqa: E402

SHAPES = [(8, 8192), (1, 131072)]


def torch_side(lp, olp, adv, mask, cfg) -> list[float]:
    terms = pure_torch_terms(lp, olp, adv, mask, cfg)
    n = mask.sum().clamp(min=1)
    loss = (terms.pg_losses * mask).sum() / n
    loss.backward()
    fractions = torch.stack([terms.clip_high.sum(), terms.clip_low.sum(), terms.clip_dual.sum()]) / n
    return fractions.tolist()


def policy_side(lp, olp, adv, mask, cfg, with_metrics: bool = True) -> dict[str, float]:
    loss, metrics = policy_loss(lp, olp, adv, mask, cfg, with_metrics=with_metrics)
    loss.backward()
    return metrics


@functools.lru_cache(maxsize=None)
def _bucket_edges(length: int) -> tuple[int, ...]:
    """The trainer's clip-rate buckets for rows of `length`, built outside the timed calls."""
    return tuple(position_bucket_edges(length))


def trainer_side(lp, olp, adv, mask, cfg) -> LossSums:
    """The trainer's loss function itself (`trainer.update.make_loss_fn`) at CP 1."""
    edges = _bucket_edges(mask.shape[-1])
    # The normalizer only scales the loss: the token count would cost a host sync per call here.
    inputs = {"old_log_probs": olp, "advantages": adv, "response_mask": mask, "dp_size": 1,
              "global_num_tokens": mask.numel()}
    loss, sums = make_loss_fn(cfg, edges)(lp, inputs)
    loss.backward()
    return sums


SIDES = {"torch": torch_side, "policy": policy_side,
         "no-metrics": lambda *a: policy_side(*a, with_metrics=False), "trainer": trainer_side}


def time_sides(inputs, cfg, reps: int) -> dict[str, list[float]]:
    """Seconds per fwd+bwd of each side (two warm-ups, then `reps`, alternating)."""
    lp, olp, adv, mask = inputs
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    # Each rep runs the sides in another order: a side run right after the torch side (whose
    # many temporaries evict the caches) is slower, and a fixed order would always slow the same
    # one. All orders in turn give every side each predecessor equally often.
    orders = list(itertools.permutations(SIDES))
    for rep in range(reps + 2):
        for side in orders[rep % len(orders)]:
            fn = SIDES[side]
            x = lp.detach().requires_grad_(True)
            start = time.perf_counter()
            fn(x, olp, adv, mask, cfg)
            if rep >= 2:
                times[side].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The shared machine's speed drifts by up to 2x over seconds: with 9 or 24 reps the metrics'
    # share of the same code swung by +-8 points between runs, with 150 (~25 s) by +-3.
    parser.add_argument("--reps", type=int, default=150, help="timed repetitions per side (median)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: stable timings on a shared machine; 0 = torch's default)")
    parser.add_argument("--shapes", nargs="+", default=[f"{B}x{S}" for B, S in SHAPES], metavar="BxS",
                        help="batch x sequence shapes to time (default: %(default)s)")
    args = parser.parse_args()
    if args.reps < 1:
        parser.error(f"--reps {args.reps}: must be >= 1")
    try:
        shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes]
    except ValueError:
        parser.error(f"--shapes {args.shapes}: expected BxS, e.g. 8x8192")
    if args.threads:
        torch.set_num_threads(args.threads)
    print_setup("cpu", "float32", args.reps)
    cfg = PolicyLossConfig()
    print(f"{'shape':>12} {'torch ms':>9} {'policy ms':>10} {'no-metrics ms':>14} {'trainer ms':>11} "
          f"{'torch/policy':>13} {'metrics share':>14} {'trainer share':>14}")
    for B, S in shapes:
        inputs = make_inputs(B, S, torch.float32, "cpu")
        times = time_sides(inputs, cfg, args.reps)
        t_torch, t_policy, t_bare, t_trainer = (statistics.median(times[s]) for s in SIDES)
        print(f"{f'{B}x{S}':>12} {t_torch * 1e3:9.2f} {t_policy * 1e3:10.2f} {t_bare * 1e3:14.2f} "
              f"{t_trainer * 1e3:11.2f} {t_torch / t_policy:12.2f}x {100 * (1 - t_bare / t_policy):13.1f}% "
              f"{100 * (1 - t_bare / t_trainer):13.1f}%")


if __name__ == "__main__":
    main()
