"""Context-parallel prefix sum: exchanging chunk totals vs all-gathering the log-probs.

    python benchmarks/bench_cp_cumsum.py [--cp 2 4] [--reps 7] [--batch 8 --seqlen 8192]

On gloo ranks (CPU), every rank holds its zigzag shard of B sequences of S tokens.
  ours:     `context_parallel_cumsum` — local scan, all-gather of 4 float64 per sequence per
            rank (chunk sums and counts), carry-in added;
  baseline: all-gather the local log-probs and mask (O(tokens)), rebuild the full sequences,
            scan them, keep the local shard — what peers do for sequence-level losses.
Both give the same values (checked). Prints per-rank bytes received by the all-gather and the
median (and min) forward time over --reps runs, max over ranks, plus ours/baseline ratios.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctpo_megatron.parallel.spawn import run_on_ranks  # noqa: E402


def _baseline(values: torch.Tensor, mask: torch.Tensor, group, cp: int, rank: int):
    from ctpo_megatron.ops import segmented_cumsum, zigzag_shard, zigzag_unshard

    vals = [torch.empty_like(values) for _ in range(cp)]
    masks = [torch.empty_like(mask) for _ in range(cp)]
    dist.all_gather(vals, values, group=group)
    dist.all_gather(masks, mask, group=group)
    cum, count = segmented_cumsum(zigzag_unshard(vals), zigzag_unshard(masks))
    return zigzag_shard(cum, cp, rank), zigzag_shard(count, cp, rank)


def _rank_bench(rank: int, world_size: int, B: int, S: int, reps: int) -> dict:
    from ctpo_megatron.ops import context_parallel_cumsum, zigzag_shard

    torch.set_num_threads(1)
    cp = world_size
    group = dist.new_group(list(range(cp)))
    g = torch.Generator().manual_seed(0)
    full = 0.1 * torch.randn(B, S, generator=g)
    full_mask = torch.rand(B, S, generator=g) > 0.1
    values, mask = zigzag_shard(full, cp, rank), zigzag_shard(full_mask, cp, rank)
    ours_out = context_parallel_cumsum(values, mask, group)
    base_out = _baseline(values, mask, group, cp, rank)
    max_diff = max((a - b).abs().max().item() for a, b in zip(ours_out, base_out))
    sides = {"ours": lambda: context_parallel_cumsum(values, mask, group),
             "baseline": lambda: _baseline(values, mask, group, cp, rank)}
    times = {name: [] for name in sides}
    for rep in range(reps + 1):
        for name, fn in sides.items():
            dist.barrier(group=group)
            start = time.perf_counter()
            fn()
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)  # the slowest rank
            if rep:
                times[name].append(elapsed.item())
    # Bytes each rank receives from the all-gathers: ours 2 stats x 2 chunks x B float64 per
    # rank; the baseline every other rank's log-probs (float32) and mask (bool).
    ours_bytes = cp * 2 * 2 * B * 8
    base_bytes = cp * values.numel() * (values.element_size() + mask.element_size())
    return {"times": times, "ours_bytes": ours_bytes, "base_bytes": base_bytes, "max_diff": max_diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cp", type=int, nargs="+", default=[2, 4], help="context-parallel sizes")
    parser.add_argument("--batch", type=int, default=8, help="sequences")
    parser.add_argument("--seqlen", type=int, default=8192, help="tokens per sequence (multiple of 2*cp)")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions (median, >= 5)")
    args = parser.parse_args()
    print(f"python {platform.python_version()}, torch {torch.__version__}, gloo on CPU, "
          f"{args.batch} x {args.seqlen} tokens, float32 values, 1 thread per rank")
    print(f"{'cp':>3} {'ours bytes':>11} {'gather bytes':>13} {'bytes ratio':>12} {'ours ms':>15} "
          f"{'gather ms':>15} {'time ratio':>11} {'max |diff|':>10}")
    for cp in args.cp:
        result = run_on_ranks(_rank_bench, cp, args.batch, args.seqlen, args.reps, timeout=600)[0]
        t = result["times"]
        ours, base = statistics.median(t["ours"]), statistics.median(t["baseline"])
        ours_ms = f"{ours * 1e3:.2f} ({min(t['ours']) * 1e3:.2f})"
        base_ms = f"{base * 1e3:.2f} ({min(t['baseline']) * 1e3:.2f})"
        print(f"{cp:>3} {result['ours_bytes']:>11,} {result['base_bytes']:>13,} "
              f"{result['ours_bytes'] / result['base_bytes']:>12.2e} {ours_ms:>15} {base_ms:>15} "
              f"{ours / base:>11.3f} {result['max_diff']:>10.1e}")

if __name__ == "__main__":
    main()
