"""Trainer rank 0 in its own network namespace: connect a distributed weight updater to the
server URLs with the given master address, push a model, print the outcome as JSON."""

import json
import sys
import time

from ctpo_megatron.rollout.weight_sync import WeightSyncConfig, make_weight_updater


def main(master_address, model_dir, *urls):
    from transformers import AutoModelForCausalLM

    named = list(AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items())
    cfg = WeightSyncConfig(transport="distributed", master_address=master_address, http_timeout_s=10,
                           group_name=f"netns_{master_address.replace('.', '_')}")
    updater = make_weight_updater(cfg)
    start = time.monotonic()
    try:
        updater.connect(list(urls))
        updater.update(named, version=f"from-{master_address}")
        out = {"ok": True}
    except Exception as e:  # noqa: BLE001 - the test reads the outcome
        out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    out["seconds"] = time.monotonic() - start
    print("RESULT " + json.dumps(out), flush=True)
    if out["ok"]:
        updater.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
