"""Trainer side of the weight-sync test, launched by torchrun like the trainer (its workers
carry TORCHELASTIC_USE_AGENT_STORE=True). Rank 0 pushes one model with each transport given
and records each server's per-rank receipts (`/server_info` `tp_ranks`) after it.

    torchrun --standalone --nproc-per-node 2 tests/dist/torchrun_weight_sync.py OUT.json \
        URLS(comma) TRANSPORT=MODEL_DIR ...
"""

import faulthandler
import hashlib
import signal
import json
import sys
import urllib.request

import torch
import torch.distributed as dist

from ctpo_megatron.rollout.weight_sync import WeightSyncConfig, make_weight_updater


def digest(named):
    h = hashlib.sha256()
    for _, t in named:
        h.update(memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def main(out_path, urls, *jobs):
    faulthandler.register(signal.SIGUSR2, all_threads=True)
    faulthandler.dump_traceback_later(75, exit=True)  # a hang shows where, then fails
    dist.init_process_group("gloo")  # env://, the store torchrun's agent hosts
    results = {"agent_store": __import__("os").environ.get("TORCHELASTIC_USE_AGENT_STORE")}
    if dist.get_rank() == 0:
        from transformers import AutoModelForCausalLM

        for job in jobs:
            transport, model_dir = job.split("=", 1)
            kind, _, fmt = transport.partition(":")
            named = list(AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items())
            cfg = WeightSyncConfig(transport=kind, distributed_format=fmt or "auto", bucket_bytes=16 << 10,
                                   http_timeout_s=90, group_name=f"g_{kind}")
            updater = make_weight_updater(cfg)
            updater.connect(urls.split(","))
            updater.update(named, version=transport)
            infos = [json.load(urllib.request.urlopen(u + "/server_info")) for u in urls.split(",")]
            results[transport] = {"expected": digest(named), "bytes": updater.metrics()["weight_sync/bytes"],
                                  "world_size": getattr(updater, "world_size", None),
                                  "offsets": getattr(updater, "rank_offsets", None),
                                  "servers": [i["tp_ranks"] for i in infos]}
            updater.close()
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
