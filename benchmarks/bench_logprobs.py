"""Per-token log-probs from vocab-parallel logits: our chunked kernel vs gather-then-log_softmax.

For TP in --tp (gloo ranks on this machine, CPU), each rank holds a [T, V/TP] float32 logits
shard. We time (median of --reps after a warm-up) and measure the peak extra resident memory
(VmHWM above the resident size once the inputs exist) of:

  ours      ctpo_megatron.actor.vocab_parallel_log_probs (all-reduces per-token statistics,
            fp32 temporaries bounded by chunk x V/TP)
  baseline  all_gather the shards into [T, V], log_softmax, gather the targets (what a
            non-vocab-parallel implementation does)

in two modes: forward only (scoring) and forward + backward (training). Each (method, mode, TP)
runs in fresh processes. Prints ratios ours / baseline; the memory goal is <= 1/TP.

    python benchmarks/bench_logprobs.py [--tokens 2048] [--vocab 32768] [--tp 2 4] [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ctpo_megatron.parallel.spawn import run_on_ranks  # noqa: E402


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)


def _run(rank, world_size, method, backward, tokens, vocab, chunk, reps):
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_fn

    from ctpo_megatron.actor.vocab_parallel import vocab_parallel_log_probs

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(rank)
    shard = torch.randn(tokens, vocab // world_size, generator=gen)
    targets = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(0))
    rows = torch.arange(tokens)

    def once():
        x = shard.detach().requires_grad_(backward)
        if method == "ours":
            lp, _ = vocab_parallel_log_probs(x, rows, targets, tp_group=dist.group.WORLD,
                                             vocab_size=vocab, chunk_size=chunk)
        else:
            full = torch.cat(dist_fn.all_gather(x) if backward else _gather(x), dim=-1)
            lp = torch.log_softmax(full, dim=-1).gather(-1, targets[:, None])[:, 0]
        if backward:
            lp.sum().backward()
        return lp.detach()

    def _gather(x):
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x)
        return parts

    result = once()  # warm-up, and the value compared across methods
    dist.barrier()
    rss = _status_kb("VmRSS")
    _reset_peak()
    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    peak = (_status_kb("VmHWM") - rss) * 1024
    return statistics.median(times), peak, result[:64].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="response tokens scored (T)")
    parser.add_argument("--vocab", type=int, default=32768, help="vocabulary size (V)")
    parser.add_argument("--tp", type=int, nargs="+", default=[2, 4], help="TP sizes to run")
    parser.add_argument("--chunk", type=int, default=1024, help="tokens per chunk (ours)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median)")
    args = parser.parse_args()
    os.environ["PYTHONWARNINGS"] = "ignore"  # the ranks' import-time TE/Apex notices
    print(f"torch {torch.__version__}, CPU, gloo; T={args.tokens} V={args.vocab} float32, "
          f"chunk={args.chunk}, median of {args.reps}")
    print(f"{'tp':>3} {'mode':>9} {'ours s':>8} {'base s':>8} {'time':>6} "
          f"{'ours MiB':>9} {'base MiB':>9} {'mem':>6} {'goal':>6}")
    for tp in args.tp:
        for backward in (False, True):
            res = {m: run_on_ranks(_run, tp, m, backward, args.tokens, args.vocab, args.chunk,
                                   args.reps, timeout=900)
                   for m in ("ours", "baseline")}
            for r in range(tp):  # same numbers from both paths
                diff = max(abs(a - b) for a, b in zip(res["ours"][r][2], res["baseline"][r][2]))
                assert diff < 1e-4, f"tp{tp} rank{r}: log-probs differ by {diff}"
            t_ours = max(x[0] for x in res["ours"])
            t_base = max(x[0] for x in res["baseline"])
            m_ours = max(x[1] for x in res["ours"]) / 2**20
            m_base = max(x[1] for x in res["baseline"]) / 2**20
            print(f"{tp:>3} {'fwd+bwd' if backward else 'fwd':>9} {t_ours:8.3f} {t_base:8.3f} "
                  f"{t_ours / t_base:6.2f} {m_ours:9.1f} {m_base:9.1f} {m_ours / m_base:6.3f} "
                  f"{1 / tp:6.3f}")


if __name__ == "__main__":
    main()
