"""Step time with rollouts running ahead (`rollout.max_staleness=1`) vs the synchronous step.

Runs the tiny pipeline twice in one invocation, same seed and settings, with the embedded
server in simulated-latency mode: every decode step sleeps `--decode-delay` seconds
(`CTPO_SIM_DECODE_DELAY_S`), standing in for rollout GPUs on other nodes (wall time, no
trainer CPU). Prints the median step time of each (steps 2..N; step 1 has no overlap to
gain), their ratio, and the trainer's idle fraction (share of the step spent waiting on
rollouts).

    python benchmarks/bench_async.py [--steps 6] [--decode-delay 0.03] [--repeats 2] [--init DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(init: str, out: str, staleness: int, args: argparse.Namespace) -> list[dict]:
    run_dir = os.path.join(out, f"k{staleness}_{int(time.time())}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ctpo_megatron.train", "--config-name", "tiny", f"trainer.run_dir={run_dir}",
           f"model.path={init}/model", f"data.train_files=[{init}/train.parquet]",
           f"data.val_files=[{init}/val.parquet]", f"trainer.total_steps={args.steps}",
           f"trainer.prompts_per_step={args.prompts_per_step}", "trainer.eval_every=0",
           f"trainer.save_every={args.steps}", "trainer.tensorboard=false",
           f"rollout.max_staleness={staleness}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CTPO_SIM_DECODE_DELAY_S": str(args.decode_delay)}
    subprocess.run(cmd, cwd=ROOT, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["step"] >= 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="training steps per run (>= 3)")
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--decode-delay", type=float, default=0.03, help="seconds per decode step")
    parser.add_argument("--repeats", type=int, default=2,
                        help="alternating (0, 1) run pairs; medians over all their steps")
    parser.add_argument("--init", default="", help="a tiny_setup output dir (built when empty)")
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "ctpo_bench_async"))
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps must be >= 3")
    init = args.init or os.path.join(args.out, "init")
    if not os.path.exists(os.path.join(init, "model", "config.json")):
        subprocess.run([sys.executable, "-m", "ctpo_megatron.data.tiny_setup", init], cwd=ROOT, check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    records: dict[int, list[dict]] = {0: [], 1: []}
    for _ in range(args.repeats):  # alternate, so load drift on a shared machine hits both
        for k in (0, 1):
            records[k] += run(init, args.out, k, args)
    rows = {}
    for k, recs in records.items():
        rows[k] = (statistics.median(r["time/step"] for r in recs),
                   statistics.median(r["perf/trainer_idle_frac"] for r in recs),
                   statistics.median(r["time/update"] + r["time/old_log_probs"] for r in recs),
                   max(r.get("staleness/max", 0.0) for r in recs),
                   statistics.mean(r.get("rollout/partial", 0.0) for r in recs))
    print(f"tiny run, {args.prompts_per_step} prompts x 8 samples per step, simulated decode "
          f"{args.decode_delay * 1e3:.0f} ms/step; medians over steps 2..{args.steps}")
    print(f"{'max_staleness':<15}{'step s':>9}{'train s':>9}{'idle':>7}{'max stale':>11}{'partial/step':>14}")
    for k, (step, idle, train, stale, partial) in rows.items():
        print(f"{k:<15}{step:>9.2f}{train:>9.2f}{idle:>7.0%}{stale:>11.0f}{partial:>14.1f}")
    print(f"step time ratio (max_staleness=1 / 0): {rows[1][0] / rows[0][0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
