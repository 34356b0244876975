"""The Megatron policy actor: vocab-parallel log-probs, train step, checkpoints."""

from ctpo_megatron.actor.batching import TokenBatch
from ctpo_megatron.actor.config import ActorConfig
from ctpo_megatron.actor.context_parallel import context_parallel_policy_loss
from ctpo_megatron.actor.policy import PolicyActor, UpdateResult
from ctpo_megatron.actor.vocab_parallel import vocab_parallel_log_probs

__all__ = ["ActorConfig", "PolicyActor", "TokenBatch", "UpdateResult", "context_parallel_policy_loss",
           "vocab_parallel_log_probs"]
