"""ctpo_megatron: CTPO (Cumulative Token Policy Optimization) RL training on Megatron-core.

Subpackages (see README for the pipeline):
  algo/      pure tensor math of CTPO and its baselines (no process groups)
  ops/       scan and fused-loss kernels (csrc extension) with a pure-torch fallback
  parallel/  parallel sizes, process groups, CPU mode for megatron-core
  models/    HF config/checkpoints <-> Megatron GPTModel shards
  actor/     vocab-parallel log-probs, train step, distributed checkpoints
  rollout/   SGLang launcher/client, embedded CPU server, agent loop, sandbox, reward
"""

__version__ = "0.1.0"
