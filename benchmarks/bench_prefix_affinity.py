"""Prefix-cache reuse of a multi-turn rollout on several servers: with and without affinity.

    python benchmarks/bench_prefix_affinity.py [--servers 2 --prompts 8 --samples 4 --turns 3]

Workload: every prompt gets n samples, each a trajectory of several turns (turn t's input is
the previous input + its output + a few "tool output" tokens), run in waves like an agent
loop. Each server reports the prompt tokens its prefix cache served (`meta_info.cached_tokens`).
The ideal is what one server with an unbounded cache would serve for the same waves. Modes:
  none      — each request to the least-loaded server (no affinity; the baseline)
  hash      — the client pins each prompt's samples and turns to one server by hash
  router    — through SGLang's router (cache_aware policy), when sglang-router is installed
Prints the hit rate (served / ideal) of each mode, medians of --reps runs (goal: >= 0.8 with
affinity).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctpo_megatron.rollout.serving.client import SGLangClient, affinity, prompt_affinity_key  # noqa: E402
from ctpo_megatron.rollout.serving.launcher import LaunchConfig, ServerGroup  # noqa: E402
from ctpo_megatron.rollout.serving.server.scheduler import PrefixCache  # noqa: E402

SAMPLING = {"max_new_tokens": 8, "temperature": 1.0}


def build_model(out_dir: str) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    Qwen2ForCausalLM(cfg).save_pretrained(out_dir)
    return out_dir


async def run_workload(client: SGLangClient, prompts, samples: int, turns: int, use_key: bool,
                       rng: random.Random) -> tuple[int, int]:
    """Returns (cached tokens the servers reported, ideal cached tokens)."""
    ideal_cache = PrefixCache()
    inputs = {(p, s): list(prompt) for p, prompt in enumerate(prompts) for s in range(samples)}
    served = ideal = 0
    # Wave 0: the first sample of each prompt; then its other samples; then each later turn.
    waves = [[(p, 0) for p in range(len(prompts))], [(p, s) for p in range(len(prompts))
                                                     for s in range(1, samples)]]
    waves += [list(inputs)] * (turns - 1)

    async def one(key, ids):
        if use_key:
            with affinity(prompt_affinity_key(prompts[key[0]])):
                return await client.generate(ids, SAMPLING)
        return await client.generate(ids, SAMPLING)

    for wave in waves:
        ideal += sum(min(ideal_cache.match(inputs[k]), len(inputs[k]) - 1) for k in wave)
        results = await asyncio.gather(*(one(k, inputs[k]) for k in wave))
        for k, res in zip(wave, results):
            served += int(res.meta_info["cached_tokens"])
            ideal_cache.insert(inputs[k] + res.output_ids)
            # The trajectory's next turn: its whole history, then a few tool-output tokens.
            inputs[k] = inputs[k] + res.output_ids + [rng.randrange(2, 500) for _ in range(4)]
    return served, ideal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=96)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    if args.reps < 5:
        raise SystemExit("--reps must be >= 5 (medians of at least 5 runs)")
    tmp = tempfile.mkdtemp(prefix="bench_affinity_")
    has_router = importlib.util.find_spec("sglang_router") is not None
    cfg = LaunchConfig(model_path=build_model(f"{tmp}/model"), num_servers=args.servers,
                       router=has_router, health_timeout_s=300, log_dir=f"{tmp}/logs")
    modes = ["none", "hash"] + (["router"] if has_router else [])
    rates: dict[str, list[float]] = {m: [] for m in modes}
    with ServerGroup(cfg) as group:
        for rep in range(args.reps):
            for mode in modes:  # interleaved: load drift hits every mode alike
                rng = random.Random(rep)
                prompts = [[rng.randrange(2, 500) for _ in range(args.prompt_len)]
                           for _ in range(args.prompts)]

                async def go():
                    async with SGLangClient(group.worker_urls, health_interval_s=0) as admin:
                        await admin.flush_cache(timeout_s=30)  # every mode starts cold
                    async with SGLangClient(group.worker_urls, health_interval_s=0,
                                            router_url=group.router_url if mode == "router" else None) as c:
                        return await run_workload(c, prompts, args.samples, args.turns, mode == "hash", rng)

                served, ideal = asyncio.run(go())
                rates[mode].append(served / ideal)
    print(f"{args.servers} servers, {args.prompts} prompts x {args.samples} samples x {args.turns} turns, "
          f"prompt {args.prompt_len} tokens; medians of {args.reps} runs")
    base = statistics.median(rates["none"])
    for mode in modes:
        med = statistics.median(rates[mode])
        print(f"  {mode:<7} hit rate {med:5.3f} of ideal  (x{med / base:4.2f} vs none)")


if __name__ == "__main__":
    main()
