"""Step-time breakdown of the tiny run, and the CTPO loss's cost vs GRPO's in that step.

    python benchmarks/bench_step.py [--steps 6] [--reps 7] [--out DIR]

1. Prepares the tiny run (model, tokenizer, data, warm start) in OUT/init (reused if there).
2. Trains `--steps` CTPO steps with the real pipeline (2 ranks, TP 2, embedded server) and
   reads `time/*` from metrics.jsonl: median per phase over the steps after the first
   (warm-up), as seconds and as a share of the step.
3. Times the policy loss (forward + backward through `policy_loss`, with the metrics the
   trainer computes) for `algo=ctpo` and `algo=grpo` on micro-batches shaped like the run's
   (same micro-batch size, the run's median longest response), median of `--reps`, and
   reports the extra time CTPO costs per step as a share of the median step time
   (goal: < 2%).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("rollout", "old_log_probs", "update", "weight_sync", "eval", "checkpoint")


def run_training(out: str, steps: int, prompts_per_step: int) -> list[dict]:
    init = os.path.join(out, "init")
    subprocess.run([sys.executable, "-m", "ctpo_megatron.data.tiny_setup", init], cwd=ROOT, check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    run = os.path.join(out, f"run_{int(time.time())}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ctpo_megatron.train", "--config-name", "tiny", f"trainer.run_dir={run}",
           f"model.path={init}/model", f"data.train_files=[{init}/train.parquet]",
           f"data.val_files=[{init}/val.parquet]", f"trainer.total_steps={steps}",
           f"trainer.prompts_per_step={prompts_per_step}", "trainer.eval_every=0",
           f"trainer.save_every={steps}"]
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def time_loss(name: str, b: int, r: int, reps: int, micro_steps: int) -> float:
    """Median seconds of `micro_steps` loss forward+backward calls on [b, r] inputs."""
    from ctpo_megatron.algo import PolicyLossConfig, position_bucket_edges
    from ctpo_megatron.trainer.update import make_loss_fn

    loss_fn = make_loss_fn(PolicyLossConfig(name=name), position_bucket_edges(r, 16))
    gen = torch.Generator().manual_seed(0)
    old = -torch.rand(b, r, generator=gen) * 2
    base = old + 0.05 * torch.randn(b, r, generator=gen)
    mask = (torch.rand(b, r, generator=gen) > 0.1).float()
    adv = torch.randn(b, 1, generator=gen).expand(b, r).contiguous()
    batch = {"old_log_probs": old, "advantages": adv, "response_mask": mask,
             "rollout_is_weights": torch.ones(b, r), "global_num_tokens": int(mask.sum()), "dp_size": 1}
    times = []
    for _ in range(reps + 1):  # the first call warms up (kernel dispatch, allocations)
        start = time.perf_counter()
        for _ in range(micro_steps):
            lp = base.clone().requires_grad_()
            loss, _ = loss_fn(lp, batch)
            loss.backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="training steps (the first is warm-up)")
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--reps", type=int, default=7, help="repetitions of the loss timing (median)")
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "ctpo_bench_step"))
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is warm-up)")

    from ctpo_megatron.config import load_config

    cfg = load_config(config_name="tiny", overrides=[f"trainer.prompts_per_step={args.prompts_per_step}"])
    records = [r for r in run_training(args.out, args.steps, args.prompts_per_step) if r["step"] >= 2]
    step_s = statistics.median(r["time/step"] for r in records)
    print(f"device: CPU ({os.cpu_count()} cores), torch {torch.__version__}, python {platform.python_version()}")
    print(f"tiny run: {args.prompts_per_step} prompts x {cfg.rollout.n_samples} samples per step, "
          f"TP {cfg.parallel.tp}, {cfg.trainer.prompts_per_step // cfg.trainer.mini_batch_prompts} "
          f"updates per step; medians over steps 2..{args.steps}")
    print(f"{'phase':<16}{'seconds':>10}{'share':>9}")
    for phase in PHASES:
        values = [r.get(f"time/{phase}", 0.0) for r in records]
        med = statistics.median(values)
        if med > 0:
            print(f"{phase:<16}{med:>10.3f}{med / step_s:>9.1%}")
    print(f"{'step':<16}{step_s:>10.3f}{1:>9.0%}")
    tokens = statistics.median(r["perf/tokens"] for r in records)
    print(f"throughput: {tokens / step_s:.0f} tokens/s (prompt + response tokens per step / step time)")

    # The trainer's ranks run with OMP_NUM_THREADS=1 (torchrun's default for several ranks).
    torch.set_num_threads(1)
    b = cfg.actor.micro_batch_size
    r_len = int(statistics.median(r["response_length/max"] for r in records))
    samples = args.prompts_per_step * cfg.rollout.n_samples * cfg.trainer.epochs_per_step
    micro_steps = -(-samples // b) if b else 1
    t_ctpo = time_loss("ctpo", b, r_len, args.reps, micro_steps)
    t_grpo = time_loss("grpo", b, r_len, args.reps, micro_steps)
    print(f"loss per step ({micro_steps} micro-batches of [{b}, {r_len}], fwd+bwd+metrics, median of {args.reps}): "
          f"ctpo {t_ctpo * 1e3:.2f} ms, grpo {t_grpo * 1e3:.2f} ms, ratio {t_ctpo / t_grpo:.2f}x")
    print(f"CTPO loss overhead vs GRPO: {(t_ctpo - t_grpo) / step_s:.3%} of the step time (goal < 2%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
