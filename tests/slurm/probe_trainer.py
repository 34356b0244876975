"""A stand-in trainer for the launcher mechanics (`torchrun -m tests.slurm.probe_trainer <overrides>`).

It does what the launcher promises the real trainer: a torch.distributed process group over
all training nodes (gloo, one all-reduce), a real /generate request to every rollout server
from `rollout.server_urls`, and a step counter checkpointed under `trainer.run_dir` that a later
run resumes from. SIGTERM checkpoints and exits (the launcher's preemption path).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import urllib.request

import torch
import torch.distributed as dist


def parse_overrides(argv: list[str]) -> dict[str, str]:
    out = {}
    for arg in argv:
        if "=" in arg and not arg.startswith("-"):
            key, value = arg.split("=", 1)
            out[key.lstrip("+")] = value
    return out


def server_urls(value: str) -> list[str]:
    return [u.strip().strip("'\"") for u in value.strip("[]").split(",") if u.strip()]


def main() -> int:
    cfg = parse_overrides(sys.argv[1:])
    run_dir, total = cfg["trainer.run_dir"], int(cfg.get("trainer.total_steps", "1"))
    step_s = float(cfg.get("probe.step_s", "0.2"))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
    total_ranks = torch.tensor([float(rank)])
    dist.all_reduce(total_ranks)
    print(f"[probe] rank {rank}/{world} on node {node}: all_reduce sum of ranks = {int(total_ranks)}", flush=True)
    ckpt = os.path.join(run_dir, "checkpoints", "latest", "state.json")
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    start = 0
    if os.path.exists(ckpt):
        with open(ckpt) as f:
            start = json.load(f)["step"]
        print(f"[probe] rank {rank}: resumed from step {start}", flush=True)
    if rank == 0:
        for url in server_urls(cfg.get("rollout.server_urls", "[]")):
            body = json.dumps({"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 4,
                                                                            "temperature": 1.0}}).encode()
            req = urllib.request.Request(url + "/generate", data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as response:
                reply = json.load(response)
            n = len(reply["output_ids"]) if isinstance(reply, dict) else len(reply[0]["output_ids"])
            print(f"[probe] rank 0 generated {n} tokens from {url}", flush=True)
    step = start
    while step < total and not stop["flag"]:
        time.sleep(step_s)
        step += 1
        dist.barrier()
        if rank == 0:
            os.makedirs(os.path.dirname(ckpt), exist_ok=True)
            with open(ckpt + ".tmp", "w") as f:
                json.dump({"step": step}, f)
            os.replace(ckpt + ".tmp", ckpt)
            print(f"[probe] step {step} done", flush=True)
    if stop["flag"]:
        print(f"[probe] rank {rank}: SIGTERM, checkpointed at step {step}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
