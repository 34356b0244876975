"""Worker of the shard-transport test (a light module: spawned ranks import only this)."""

import torch


def exchange(rank, world_size):
    from ctpo_megatron.trainer.transport import ShardTransport

    transport = ShardTransport(min(rank, 1), ["a", "b"], torch.device("cpu"))  # replicas {0}, {1, 2}
    shards = None
    if rank == 0:
        shards = [{"a": torch.arange(6).reshape(2, 3), "b": torch.tensor([0.5])},
                  {"b": torch.tensor([1.5, 2.5]), "a": torch.arange(4)}]
    return {k: v.tolist() for k, v in transport.exchange(shards).items()}
