"""ctpo_megatron: CTPO (Cumulative Token Policy Optimization) RL training on Megatron-core.

Subpackages (see README for the pipeline):
  algo/      pure tensor math of CTPO and its baselines (no process groups)
  ops/       scan and fused-loss kernels (csrc extension) with a pure-torch fallback
  parallel/  parallel sizes, process groups, CPU mode for megatron-core
  models/    HF config/checkpoints <-> Megatron GPTModel shards
  actor/     vocab-parallel log-probs, train step, distributed checkpoints
  rollout/   serving/ (SGLang launcher and client, embedded CPU server), agent/ (conversation
             loop, chat templates, reward), sandbox/, weight_sync/
  config/    the typed Hydra config of a run (TrainConfig and its sections)
  data/      prompt sets, the synthetic tiny task
  trainer/   the RL loop
  cluster/   Slurm launch plan, the `cluster` config section, memory estimate
"""

__version__ = "0.1.0"
