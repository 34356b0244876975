"""Push full HF-named weights from trainer rank 0 to the inference servers.

    updater = make_weight_updater(WeightSyncConfig(transport="distributed"))
    updater.connect(worker_urls)                       # each server directly, not the router
    updater.update(actor.iter_hf_weights(), version=str(step))
    updater.metrics()   # {"weight_sync/gbps": ..., ...}

Transports (one class each, same interface): `disk`, `tensor`, `distributed`.
"""

from ctpo_megatron.rollout.weight_sync.base import (WeightSyncConfig, WeightSyncError, WeightUpdater,
                                                    iter_buckets)
from ctpo_megatron.rollout.weight_sync.disk import DiskWeightUpdater
from ctpo_megatron.rollout.weight_sync.distributed import DistributedWeightUpdater
from ctpo_megatron.rollout.weight_sync.tensor import TensorWeightUpdater

UPDATERS: dict[str, type[WeightUpdater]] = {
    "disk": DiskWeightUpdater,
    "tensor": TensorWeightUpdater,
    "distributed": DistributedWeightUpdater,
}


def make_weight_updater(cfg: WeightSyncConfig) -> WeightUpdater:
    """The updater class for `cfg.transport`."""
    return UPDATERS[cfg.transport](cfg)


__all__ = ["UPDATERS", "DiskWeightUpdater", "DistributedWeightUpdater", "TensorWeightUpdater",
           "WeightSyncConfig", "WeightSyncError", "WeightUpdater", "iter_buckets", "make_weight_updater"]
