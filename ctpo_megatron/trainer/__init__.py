"""The RL loop (`Trainer`) and its step path: the typed step batch (batch), the per-replica shard
transport, the update phase, rollouts running ahead (producer), dynamic sampling, checkpoint
glue, metrics sink and timers."""
