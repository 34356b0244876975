"""Running a CTPO job on Slurm, and the policy's memory estimate.

`config` (ClusterConfig: the `cluster` section of the trainer's config), `compose` (how the
launcher composes that config with the rest), `plan` (build_plan: nodes per role, rendezvous,
the trainer's overrides), `render` (the dry-run text, sbatch options, the job script's shell
variables), `cli` (`python -m ctpo_megatron.cluster.plan`), `role` (one role of a plan on one
node), `memory` (per-GPU memory of a model shape and layout), `train_memory` (that estimate
from the trainer's own settings: the launcher's plan and the trainer's start-up check),
`model_dims` (model shapes).
"""
