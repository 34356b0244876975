"""Fused CTPO loss (csrc kernel) vs the unfused pure-torch composition: time and peak memory.

    python benchmarks/bench_ctpo_loss.py [--reps 7] [--threads N] [--dtype float32] [--device cpu]
                                         [--clip la|plain]

Both sides compute the per-token CTPO terms (cumprod; adaptive clipping, the paper default, or
with --clip plain the ratio-space clip), the token-mean loss and its backward to the log-probs,
on the same inputs:
  baseline: `algo.ctpo_token_terms` with its prefix sum on `torch.cumsum` (pure torch, the
            oracle the fused kernel is tested against);
  fused:    `algo.fused_ctpo_token_terms` (one kernel pass forward, one multiply backward).
Shapes: 8 x 8192 and 1 x 131072 response tokens. Time: median of --reps runs after two
warm-ups. Peak memory (CPU): each side runs in a fresh subprocess; the peak resident set
above the inputs (VmHWM after resetting it) is reported. Goal: >= 3x faster, <= 1/3 memory.
On CUDA the peak is torch.cuda.max_memory_allocated and the achieved bandwidth is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctpo_megatron.algo import PolicyLossConfig, ctpo_token_terms, fused_ctpo_token_terms  # noqa: E402
from ctpo_megatron.ops import _backend, backend_report  # noqa: E402

SHAPES = [(8, 8192), (1, 131072)]


def make_inputs(B: int, S: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, S, generator=g)
    olp = lp + 0.02 * torch.randn(B, S, generator=g)
    adv = torch.randn(B, 1, generator=g).expand(B, S).contiguous()
    mask = (torch.rand(B, S, generator=g) > 0.1).float()
    return [t.to(device=device, dtype=dtype) for t in (lp, olp, adv, mask)]


def pure_torch_terms(*args, **kwargs):
    """algo's torch path with the prefix sum on the torch reference scan (not the csrc scan)."""
    original = _backend._load
    _backend._load = lambda: (frozenset(), "pure-torch baseline")
    try:
        return ctpo_token_terms(*args, **kwargs)
    finally:
        _backend._load = original


SIDES = {"baseline": pure_torch_terms, "fused": fused_ctpo_token_terms}


def step(side: str, lp, olp, adv, mask, cfg: PolicyLossConfig) -> None:
    lp = lp.detach().requires_grad_(True)
    terms = SIDES[side](lp, olp, adv, mask, cfg)
    loss = (terms.pg_losses * mask).sum() / mask.sum().clamp(min=1)
    loss.backward()


def time_sides(inputs, cfg, reps: int, device: str) -> dict[str, list[float]]:
    """Seconds per fwd+bwd of each side; reps alternate between the sides so that both see
    the same background load (the machine may be shared)."""
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    for rep in range(reps + 2):
        for side in SIDES:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(side, *inputs, cfg)
            if device == "cuda":
                torch.cuda.synchronize()
            if rep >= 2:  # two warm-ups
                times[side].append(time.perf_counter() - start)
    return times


def _vm_hwm_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("VmHWM not in /proc/self/status")


def loss_config(clip: str) -> PolicyLossConfig:
    """CTPO cumprod with LA clipping ("la", the paper default) or the ratio-space clip ("plain")."""
    return PolicyLossConfig(adaptive_clip=clip == "la")


def child_peak(side: str, B: int, S: int, dtype: str, device: str, clip: str) -> int:
    """Run in a fresh process: bytes of peak memory one fwd+bwd needs above its inputs."""
    cfg = loss_config(clip)
    inputs = make_inputs(B, S, getattr(torch, dtype), device)
    step(side, *inputs, cfg)  # warm-up: first-touch code pages and allocator caches are not tensors
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(side, *inputs, cfg)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    base = _vm_hwm_kb()
    step(side, *inputs, cfg)
    return (_vm_hwm_kb() - base) * 1024


def measure_peak(side: str, B: int, S: int, dtype: str, device: str, clip: str) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),
           # Fixed mmap threshold: freed tensors go back to the OS, so the resident set tracks
           # live allocations instead of glibc's cached heap.
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, __file__, "--child", side, str(B), str(S), dtype, device, clip],
                         capture_output=True, text=True, env=env, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"])


def print_setup(device: str, dtype: str, reps: int, cfg: PolicyLossConfig | None = None) -> None:
    """The benchmark's context: versions, threads, kernel backends and the loss settings."""
    print(f"python {platform.python_version()}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {device}, dtype {dtype}")
    for line in backend_report():
        print(f"  {line}")
    cfg = cfg or PolicyLossConfig()
    print(f"loss: ctpo {cfg.variant}, adaptive_clip={cfg.adaptive_clip}, token-mean; fwd+bwd; median of {reps}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per side (median, >= 5)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: stable timings on a shared machine; 0 = torch's default)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shapes", nargs="+", default=[f"{B}x{S}" for B, S in SHAPES], metavar="BxS",
                        help="batch x sequence shapes to time (default: %(default)s)")
    parser.add_argument("--clip", default="la", choices=["la", "plain"],
                        help="la: adaptive clipping (paper default); plain: the ratio-space clip")
    parser.add_argument("--child", nargs=6, metavar=("SIDE", "B", "S", "DTYPE", "DEVICE", "CLIP"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, B, S, dtype, device, clip = args.child
        print(json.dumps({"peak_bytes": child_peak(side, int(B), int(S), dtype, device, clip)}))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = loss_config(args.clip)
    print_setup(args.device, args.dtype, args.reps, cfg)
    print("time: median (min) ms; speedup = torch/fused of the medians (of the mins)")
    print(f"{'shape':>12} {'torch ms':>15} {'fused ms':>15} {'speedup':>15} {'torch MB':>9} {'fused MB':>9} "
          f"{'mem ratio':>9}")
    try:
        shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes]
    except ValueError:
        parser.error(f"--shapes {args.shapes}: expected BxS, e.g. 8x4096")
    for B, S in shapes:
        inputs = make_inputs(B, S, getattr(torch, args.dtype), args.device)
        times = time_sides(inputs, cfg, args.reps, args.device)
        t_base, t_fused = (statistics.median(times[s]) for s in ("baseline", "fused"))
        b_min, f_min = (min(times[s]) for s in ("baseline", "fused"))
        m_base = measure_peak("baseline", B, S, args.dtype, args.device, args.clip)
        m_fused = measure_peak("fused", B, S, args.dtype, args.device, args.clip)
        print(f"{f'{B}x{S}':>12} {f'{t_base * 1e3:.2f} ({b_min * 1e3:.2f})':>15} "
              f"{f'{t_fused * 1e3:.2f} ({f_min * 1e3:.2f})':>15} "
              f"{f'{t_base / t_fused:.2f}x ({b_min / f_min:.2f}x)':>15} "
              f"{m_base / 2**20:9.1f} {m_fused / 2**20:9.1f} {m_fused / max(m_base, 1):9.3f}")
        if args.device == "cuda":
            # Bytes the fused forward must move: 4 inputs read, 5 float outputs + flags written.
            elem = inputs[0].element_size()
            out_elem = 4 if elem == 2 else elem
            moved = B * S * (4 * elem + 5 * out_elem + 1)
            print(f"{'':>12} fused fwd+bwd moves >= {moved / 2**20:.1f} MB: "
                  f"{moved / t_fused / 1e9:.1f} GB/s achieved")


if __name__ == "__main__":
    main()
