"""Step time with rollouts running ahead (`rollout.max_staleness=1`) vs the synchronous step.

Runs the tiny pipeline with max_staleness 0 and 1 in one invocation, alternating (0, 1) pairs
so load drift on a shared machine hits both, same seed and settings, with the embedded server
in simulated-latency mode (`CTPO_SIM_DECODE_DELAY_S`): every decode step takes `--decode-delay`
seconds of wall time, standing in for rollout GPUs on other nodes. The server's own sampling
and forward count toward that time (only the remainder is slept); the server log's count of
steps whose compute alone exceeded it is printed, as the simulation is only faithful when it
is ~0. In that mode the server also runs at the lowest CPU priority (nice 19): remote GPUs
take no trainer CPU, and the trainer's TP ranks run in lockstep, so a core taken from one
rank stalls them all; the server then computes on the CPU the trainer leaves idle.

The goal is about overlap, so the defaults make rollout and training of comparable length:
the sync run's rollout time R and training time T (old log-probs + update + weight sync)
are printed; perfect overlap gives max(R, T) / (R + T). Also printed: the trainer's idle
fraction (share of the step spent waiting on rollouts) for both runs, and how many of the
machine's cores the run kept busy (CPU seconds of the whole process tree / wall seconds,
start-up included): when the max_staleness=1 run already uses about all cores, the rollout's
own CPU work (agent loop, sandbox, reward, the server's HTTP and forward) competes with the
trainer and overlap cannot shorten the step further on this machine.

`--trainer-ranks 1` runs the trainer as one process (`parallel=tp1`) instead of the tiny
config's TP 2 on 2 ranks, so on a 2-core machine one core is left to the rollout side: the
CPUs beside a real node's GPUs that run the agent loop, sandboxes, reward and HTTP. Its
default epochs per step is 4 (3 for 2 ranks, kept for comparison with earlier figures): one
rank trains about as fast per epoch as TP 2 on this tiny model, and 4 epochs bring T to about
R, so the perfect-overlap bound is about 0.5-0.55.

    python benchmarks/bench_async.py [--steps 6] [--decode-delay 0.02] [--epochs N] [--repeats 2]
        [--trainer-ranks {1,2}] [--init DIR]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Trainer layout per --trainer-ranks: the tiny config's TP 2 on 2 ranks, or TP 1 on one rank.
PARALLEL = {2: "tp2", 1: "tp1"}
# Default trainer.epochs_per_step per --trainer-ranks: 4 makes the sync run's training time T about
# its rollout time R at 20 ms/decode; 3 for 2 ranks is the setting of the earlier figures.
DEFAULT_EPOCHS = {2: 3, 1: 4}
SIM_LINE = re.compile(r"simulated decode: (\d+) steps of [\d.]+ ms, compute ([\d.]+) ms/step, (\d+) steps over")


def children_cpu_s() -> float:
    """CPU seconds (user + system) of every finished child process tree so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def sim_summary(run_dir: str) -> tuple[int, float, int]:
    """(decode steps, mean compute ms per step, steps over the setting) from the server logs."""
    steps = over = 0
    compute_ms = 0.0
    for path in glob.glob(os.path.join(run_dir, "logs", "server*.log")):
        with open(path) as f:
            for match in SIM_LINE.finditer(f.read()):
                n = int(match.group(1))
                steps, over = steps + n, over + int(match.group(3))
                compute_ms += n * float(match.group(2))
    return steps, compute_ms / max(steps, 1), over


def run(init: str, out: str, staleness: int, args: argparse.Namespace) -> tuple[list[dict], float, tuple]:
    """One training run; (metrics records of steps >= 2, cores kept busy, sim summary)."""
    run_dir = os.path.join(out, f"k{staleness}_{time.time_ns()}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.trainer_ranks),
           "-m", "ctpo_megatron.train", "--config-name", "tiny", f"parallel={PARALLEL[args.trainer_ranks]}",
           f"trainer.run_dir={run_dir}",
           f"model.path={init}/model", f"data.train_files=[{init}/train.parquet]",
           f"data.val_files=[{init}/val.parquet]", f"trainer.total_steps={args.steps}",
           f"trainer.prompts_per_step={args.prompts_per_step}", "trainer.eval_every=0",
           f"trainer.epochs_per_step={args.epochs}",
           f"trainer.save_every={args.steps}", "trainer.tensorboard=false",
           f"rollout.max_staleness={staleness}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CTPO_SIM_DECODE_DELAY_S": str(args.decode_delay)}
    cpu0, wall0 = children_cpu_s(), time.monotonic()
    subprocess.run(cmd, cwd=ROOT, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cores = (children_cpu_s() - cpu0) / (time.monotonic() - wall0)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [r for r in map(json.loads, f) if r["step"] >= 2]
    return records, cores, sim_summary(run_dir)


def train_s(record: dict) -> float:
    """The trainer's own work in a step: old log-probs + update + weight sync."""
    return sum(record.get(k, 0.0) for k in ("time/old_log_probs", "time/update", "time/weight_sync"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="training steps per run (>= 3)")
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--decode-delay", type=float, default=0.02,
                        help="seconds per decode step (simulated remote GPU; 0 = real CPU speed)")
    parser.add_argument("--epochs", type=int, default=0,
                        help="trainer.epochs_per_step; 0 = the default for --trainer-ranks (3 for 2 ranks, 4 for "
                             "1), which makes training about as long as the rollout")
    parser.add_argument("--repeats", type=int, default=2,
                        help="alternating (0, 1) run pairs; medians over all their steps")
    parser.add_argument("--trainer-ranks", type=int, choices=sorted(PARALLEL), default=2,
                        help="trainer processes: 2 = the tiny config's TP 2 on the machine's cores; 1 = TP 1, "
                             "leaving a core to the rollout side (the CPUs beside a real node's GPUs)")
    parser.add_argument("--init", default="", help="a tiny_setup output dir (built when empty)")
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "ctpo_bench_async"))
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps must be >= 3")
    if args.epochs < 0:
        parser.error("--epochs must be >= 0 (0 = the default for --trainer-ranks)")
    if args.decode_delay < 0:
        parser.error("--decode-delay must be >= 0")
    args.epochs = args.epochs or DEFAULT_EPOCHS[args.trainer_ranks]
    init = args.init or os.path.join(args.out, "init")
    if not os.path.exists(os.path.join(init, "model", "config.json")):
        subprocess.run([sys.executable, "-m", "ctpo_megatron.data.tiny_setup", init], cwd=ROOT, check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    records: dict[int, list[dict]] = {0: [], 1: []}
    cores: dict[int, list[float]] = {0: [], 1: []}
    sims: dict[int, list[tuple]] = {0: [], 1: []}
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeats):  # alternate, so load drift on a shared machine hits both
        for k in (0, 1):
            recs, busy, sim = run(init, args.out, k, args)
            records[k] += recs
            cores[k].append(busy)
            sims[k].append(sim)
            loads.append(os.getloadavg()[0])
    rows = {}
    for k, recs in records.items():
        steps = sum(s[0] for s in sims[k])
        rows[k] = dict(step=statistics.median(r["time/step"] for r in recs),
                       rollout=statistics.median(r["time/rollout"] for r in recs),
                       train=statistics.median(train_s(r) for r in recs),
                       idle=statistics.median(r["perf/trainer_idle_frac"] for r in recs),
                       stale=max(r.get("staleness/max", 0.0) for r in recs),
                       partial=statistics.mean(r.get("rollout/partial", 0.0) for r in recs),
                       cores=statistics.median(cores[k]),
                       compute=sum(s[0] * s[1] for s in sims[k]) / max(steps, 1),
                       over=sum(s[2] for s in sims[k]) / max(steps, 1))
    sync = rows[0]
    print(f"tiny run, trainer {args.trainer_ranks} rank(s) (parallel={PARALLEL[args.trainer_ranks]}), "
          f"{args.prompts_per_step} prompts x 8 samples per step, {args.epochs} epoch(s) per step, "
          f"simulated decode {args.decode_delay * 1e3:.0f} ms/step; medians over steps 2..{args.steps} "
          f"of {args.repeats} alternating run pair(s); {os.cpu_count()} cores, load average (1 min) "
          f"{min(loads):.1f}..{max(loads):.1f}")
    print(f"sync run: rollout R {sync['rollout']:.2f} s, training T {sync['train']:.2f} s "
          f"(perfect overlap: max(R,T)/(R+T) = {max(sync['rollout'], sync['train']) / (sync['rollout'] + sync['train']):.2f})")
    if args.decode_delay > 0:
        print(f"server decode compute {sync['compute']:.1f} ms/step (sync) vs the setting "
              f"{args.decode_delay * 1e3:.0f} ms; steps over it: {sync['over']:.0%} (sync), {rows[1]['over']:.0%} (k=1)")
    print(f"{'max_staleness':<15}{'step s':>9}{'rollout s':>11}{'train s':>9}{'idle':>7}{'cores busy':>12}"
          f"{'max stale':>11}{'partial/step':>14}")
    for k, r in rows.items():
        print(f"{k:<15}{r['step']:>9.2f}{r['rollout']:>11.2f}{r['train']:>9.2f}{r['idle']:>7.0%}"
              f"{r['cores']:>12.2f}{r['stale']:>11.0f}{r['partial']:>14.1f}")
    print(f"step time ratio (max_staleness=1 / 0): {rows[1]['step'] / sync['step']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
