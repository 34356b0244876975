"""Weight-sync throughput into a live embedded server vs a raw torch.distributed broadcast.

    python benchmarks/bench_weight_sync.py [--hidden 1024 --layers 6 --vocab 32000 --bucket-mb 256]

Baseline: trainer rank 0 broadcasts the same buckets (same byte sizes, same order) to one plain
receiver process over the same kind of side group (gloo on CPU, nccl on GPU). Ours: the full
`update()` of each transport into a real server process (pause, begin, HTTP calls + broadcast,
load into the model, version, end, continue). Prints medians of --reps runs after one warm-up
and the ratio ours/raw in GB/s (goal for `distributed`: >= 0.8).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctpo_megatron.parallel.net import free_port  # noqa: E402
from ctpo_megatron.rollout.serving.launcher import LaunchConfig, ServerGroup  # noqa: E402
from ctpo_megatron.rollout.weight_sync import (WeightSyncConfig, iter_buckets,  # noqa: E402
                                               make_weight_updater)
from ctpo_megatron.rollout.weight_sync.distributed import flatten_bucket  # noqa: E402
from ctpo_megatron.rollout.weight_sync.process_group import init_custom_process_group  # noqa: E402


def build_model(out_dir: str, hidden: int, layers: int, vocab: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 128), max_position_embeddings=512,
                      tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(out_dir)
    return model


def _receiver(port: int, sizes: list[int], reps: int) -> None:
    pg = init_custom_process_group(master_address="127.0.0.1", master_port=port, rank=1, world_size=2,
                                   group_name="bench", backend="gloo")
    bufs = [torch.empty(size, dtype=torch.uint8) for size in sizes]
    for _ in range(reps):
        for buf in bufs:
            dist.broadcast(buf, src=0, group=pg)
        dist.barrier(group=pg)
    dist.destroy_process_group(pg)


class RawBroadcast:
    """Trainer rank 0 + a plain receiver process; `run()` broadcasts the pre-flattened buckets."""

    def __init__(self, buckets, rounds: int):
        self.flats = [flatten_bucket(b, torch.device("cpu")) for b in buckets]
        port = free_port()
        self.proc = mp.get_context("spawn").Process(
            target=_receiver, args=(port, [f.numel() for f in self.flats], rounds))
        self.proc.start()
        self.pg = init_custom_process_group(master_address="127.0.0.1", master_port=port, rank=0,
                                            world_size=2, group_name="bench", backend="gloo")

    def run(self) -> float:
        start = time.perf_counter()
        for flat in self.flats:
            dist.broadcast(flat, src=0, group=self.pg)
        dist.barrier(group=self.pg)
        return time.perf_counter() - start

    def close(self) -> None:
        self.proc.join(timeout=60)
        dist.destroy_process_group(self.pg)


def make_updater(url: str, transport: str, bucket_bytes: int, disk_dir: str):
    fmt = "auto"
    if transport.startswith("distributed:"):
        transport, fmt = transport.split(":")
    updater = make_weight_updater(WeightSyncConfig(transport=transport, bucket_bytes=bucket_bytes,
                                                   disk_dir=disk_dir, distributed_format=fmt,
                                                   group_name=f"bench_{fmt}"))
    updater.connect([url])
    return updater


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--bucket-mb", type=float, default=256.0)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tp-size", type=int, default=1,
                        help="TP ranks of the server (each receives every broadcast, as in SGLang)")
    parser.add_argument("--transports",
                        default="distributed:per_tensor,distributed:flattened_bucket,tensor,disk",
                        help="comma list; distributed:<format> picks the broadcast layout")
    args = parser.parse_args()
    if args.reps < 5:
        raise SystemExit("--reps must be >= 5 (medians of at least 5 runs)")
    tmp = tempfile.mkdtemp(prefix="bench_wsync_")
    model = build_model(f"{tmp}/model", args.hidden, args.layers, args.vocab)
    named = [(n, p.detach()) for n, p in model.state_dict().items()]
    total = sum(t.numel() * t.element_size() for _, t in named)
    bucket_bytes = int(args.bucket_mb * (1 << 20))
    buckets = list(iter_buckets(named, bucket_bytes))
    print(f"torch {torch.__version__} | python {platform.python_version()} | device cpu (gloo) | "
          f"{torch.get_num_threads()} threads")
    print(f"model: hidden {args.hidden}, layers {args.layers}, vocab {args.vocab}: {len(named)} tensors, "
          f"{total / 1e6:.1f} MB float32; {len(buckets)} buckets of <= {args.bucket_mb:g} MiB; "
          f"server TP {args.tp_size}")
    transports = args.transports.split(",")
    cfg = LaunchConfig(model_path=f"{tmp}/model", health_timeout_s=300, log_dir=f"{tmp}/logs",
                       tp_size=args.tp_size)
    with ServerGroup(cfg) as group:
        raw = RawBroadcast(buckets, rounds=args.reps + 1)
        updaters = {t: make_updater(group.worker_urls[0], t, bucket_bytes, f"{tmp}/ckpt") for t in transports}
        times: dict[str, list[float]] = {"raw": [], **{t: [] for t in transports}}
        # Interleaved reps: the machine's load drifts, so each rep measures everything back to back.
        for rep in range(args.reps + 1):
            times["raw"].append(raw.run())
            for t, updater in updaters.items():
                start = time.perf_counter()
                updater.update(named, version=f"bench-{rep}")
                times[t].append(time.perf_counter() - start)
        raw.close()
        for updater in updaters.values():
            updater.close()
    medians = {k: statistics.median(v[1:]) for k, v in times.items()}  # rep 0 is the warm-up
    raw_gbps = total / medians["raw"] / 1e9
    print(f"{'raw broadcast':<34}: median {medians['raw'] * 1e3:8.1f} ms  {raw_gbps:6.2f} GB/s")
    for t in transports:
        gbps = total / medians[t] / 1e9
        print(f"{'sync ' + t:<34}: median {medians[t] * 1e3:8.1f} ms  {gbps:6.2f} GB/s  "
              f"ratio vs raw {gbps / raw_gbps:5.2f}")


if __name__ == "__main__":
    main()
