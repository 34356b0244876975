"""Padding waste of the actor's micro-batches: tokens computed per useful token, fixed
micro-batches (today's padding) vs the token budget (`actor.micro_batch_tokens`) and packing.

    python benchmarks/bench_padding.py [--budget 16384] [--dp 4] [--seed 0] [--reps 3]

Batch (the paper's length spread): one mini-batch of --trajectories (256 = 32 prompts x 8
samples), prompts uniform in [200, 500] tokens, responses log-normal with median 2500 tokens
and sigma 0.8, clipped to [64, --max-response] (8000, the paper's cap: ~7% of the responses
hit it, as truncated ones do). The mini-batch is sharded over --dp replicas as the trainer
does (`trainer.batch.plan_shards`: token-balanced, equal row counts).

(1) Accounting, exact: sum over replicas of the tokens the model runs (padding included)
    divided by the prompt + response tokens, for
      fixed, PP       micro_batch_size --mbs, every micro-batch padded to the share's longest
                      sample (what PP > 1 needs without variable_seq_lengths: today's figure)
      fixed, no PP    micro_batch_size --mbs in row order, each padded to its own longest
      budget padded   the token budget, sorted by length, each padded to its own longest,
                      micro-batch counts agreed over DP (`actor/token_budget.py`)
      budget packed   the same plan packed (THD): no padding but rounding to --seq-multiple
(2) Measured: a real forward (megatron's schedule, `actor.schedule.run_schedule`, tiny Qwen3 on
    one CPU rank) of one share whose lengths are the above divided by --scale, for the fixed-PP
    layout, the token budget (budget / scale) and packing; median wall time of --reps, printed
    as ratios to fixed-PP measured in the same run. On CPU packing's attention runs with a
    block-diagonal [T, T] mask (as much attention work as one T-token row); on TransformerEngine
    it is per sequence.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctpo_megatron.actor.token_budget import group_cost, plan_groups, split_to_count  # noqa: E402
from ctpo_megatron.parallel.spawn import run_on_ranks  # noqa: E402
from ctpo_megatron.trainer.batch import plan_shards  # noqa: E402

FILLER_TOKENS = 2
"""Tokens of a filler micro-batch (`token_budget.filler_batch`)."""


@dataclass
class Lengths:
    """What `plan_shards` reads of a StepBatch."""

    prompt_lens: torch.Tensor
    response_lens: torch.Tensor

    def __len__(self) -> int:
        return self.prompt_lens.numel()


def paper_lengths(n: int, *, max_response: int, seed: int) -> Lengths:
    """n (prompt, response) lengths with the distribution of the module docstring."""
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(200, 501, (n,), generator=gen)
    normal = torch.randn(n, generator=gen, dtype=torch.float64)
    responses = torch.exp(math.log(2500.0) + 0.8 * normal).round().clamp(64, max_response).to(torch.int64)
    return Lengths(prompts, responses)


def shares(lengths: Lengths, dp: int) -> list[list[int]]:
    """Each replica's sample lengths (P + R), as the trainer shards one mini-batch."""
    total = (lengths.prompt_lens + lengths.response_lens).tolist()
    return [[total[i] for i in plan.tolist()] for plan in plan_shards(lengths, 1, dp)]


def fixed_tokens(share: list[int], mbs: int, *, pad_to_share: bool) -> int:
    if pad_to_share:
        return math.ceil(len(share) / mbs) * mbs * max(share)
    return sum(group_cost(share[i:i + mbs], packed=False) for i in range(0, len(share), mbs))


def budget_tokens(all_shares: list[list[int]], budget: int, *, packed: bool, seq_multiple: int) -> int:
    """The token-budget plan of every replica, grown to the count agreed over DP."""
    groups = [plan_groups(s, budget, packed=packed, seq_multiple=seq_multiple) for s in all_shares]
    count = max(len(g) for g in groups)
    total = 0
    for share, g in zip(all_shares, groups):
        for group in split_to_count(g, count, share, packed=packed, seq_multiple=seq_multiple):
            cost = group_cost([share[i] for i in group], packed=packed, seq_multiple=seq_multiple)
            total += cost if group else FILLER_TOKENS
    return total


def accounting(args) -> dict[str, float]:
    lengths = paper_lengths(args.trajectories, max_response=args.max_response, seed=args.seed)
    all_shares = shares(lengths, args.dp)
    useful = sum(sum(s) for s in all_shares)
    return {
        "fixed, PP": sum(fixed_tokens(s, args.mbs, pad_to_share=True) for s in all_shares) / useful,
        "fixed, no PP": sum(fixed_tokens(s, args.mbs, pad_to_share=False) for s in all_shares) / useful,
        "budget padded": budget_tokens(all_shares, args.budget, packed=False, seq_multiple=args.seq_multiple) / useful,
        "budget packed": budget_tokens(all_shares, args.budget, packed=True, seq_multiple=args.seq_multiple) / useful,
    }


def _forward_times(rank, world_size, model_dir, samples, mbs, budget, reps):
    from ctpo_megatron.actor import ActorConfig, PolicyActor
    from ctpo_megatron.actor.batching import TokenBatch
    from ctpo_megatron.actor.schedule import budget_micro_batches, make_micro_batches, run_schedule

    torch.set_num_threads(1)
    actor = PolicyActor(ActorConfig(hf_model_dir=model_dir, micro_batch_size=mbs))
    for chunk in actor.model:
        chunk.eval()
    batch = TokenBatch.from_samples(samples)
    layouts = {
        "fixed, PP": make_micro_batches(batch, micro_batch_size=mbs, fixed_shape=True),
        "budget padded": budget_micro_batches(batch, token_budget=budget),
        "budget packed": budget_micro_batches(batch, token_budget=budget, packed=True),
    }
    consume = lambda mb, lp, ent: (lp.new_zeros(()), {})  # noqa: E731
    out = {}
    for name, mbs_list in layouts.items():
        times = []
        for _ in range(reps + 1):  # the first run warms up
            start = time.perf_counter()
            with torch.no_grad():
                run_schedule(actor.model, mbs_list, pgs=actor.pgs, settings=actor._settings(False),
                             consume=consume, forward_only=True)
            times.append(time.perf_counter() - start)
        out[name] = {"seconds": statistics.median(times[1:]),
                     "tokens": sum(mb.computed_tokens for mb in mbs_list)}
    out["useful"] = int(batch.lengths.sum())
    return out


def measured(args) -> dict:
    import tempfile

    from tests._tiny_hf import build_qwen3

    lengths = paper_lengths(args.forward_samples, max_response=args.max_response, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    samples = []
    for p, r in zip(lengths.prompt_lens.tolist(), lengths.response_lens.tolist()):
        p, r = max(1, p // args.scale), max(1, r // args.scale)
        samples.append({"prompt_ids": torch.randint(0, 200, (p,), generator=gen).tolist(),
                        "response_ids": torch.randint(0, 200, (r,), generator=gen).tolist()})
    longest = max(len(s["prompt_ids"]) + len(s["response_ids"]) for s in samples)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(build_qwen3(Path(tmp) / "qwen3", num_hidden_layers=2,
                                    max_position_embeddings=max(longest, 256)))
        return run_on_ranks(_forward_times, 1, model_dir, samples, args.mbs,
                            max(args.budget // args.scale, longest), args.reps, timeout=1800)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trajectories", type=int, default=256, help="mini-batch size (trajectories)")
    parser.add_argument("--dp", type=int, default=4, help="DP replicas the mini-batch is sharded over")
    parser.add_argument("--mbs", type=int, default=1, help="micro_batch_size of the fixed layouts")
    parser.add_argument("--budget", type=int, default=16384, help="actor.micro_batch_tokens")
    parser.add_argument("--max-response", type=int, default=8000, help="response length cap")
    parser.add_argument("--seq-multiple", type=int, default=2, help="TP under sequence parallelism")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--forward-samples", type=int, default=16, help="samples of the measured share")
    parser.add_argument("--scale", type=int, default=32, help="lengths divided by this for (2)")
    parser.add_argument("--reps", type=int, default=3, help="timed forwards per layout (median)")
    args = parser.parse_args()

    print(f"python {platform.python_version()}, torch {torch.__version__}")
    ratios = accounting(args)
    print(f"(1) tokens computed per useful token: {args.trajectories} trajectories over dp={args.dp}, "
          f"mbs={args.mbs}, budget {args.budget}, responses <= {args.max_response}")
    for name, value in ratios.items():
        print(f"    {name:<14} {value:6.3f}")
    best = ratios["budget padded"]
    print(f"    goal <= 1.15: budget padded {best:.3f} ({'met' if best <= 1.15 else 'missed'}), "
          f"from fixed-PP {ratios['fixed, PP']:.3f}")
    out = measured(args)
    base = out["fixed, PP"]["seconds"]
    print(f"(2) CPU forward, tiny Qwen3, {args.forward_samples} samples (lengths / {args.scale}), "
          f"median of {args.reps}:")
    for name in ("fixed, PP", "budget padded", "budget packed"):
        r = out[name]
        print(f"    {name:<14} {r['seconds']:8.3f} s  tokens/useful {r['tokens'] / out['useful']:6.3f}")
    print(f"    time ratio budget/fixed-pp = {out['budget padded']['seconds'] / base:.3f}  "
          f"packed/fixed-pp = {out['budget packed']['seconds'] / base:.3f}")


if __name__ == "__main__":
    main()
