"""Typed configuration of a CTPO run (dataclasses registered in Hydra's ConfigStore).

`TrainConfig` (schema) holds the sections; the model, parallel, rollout, data and trainer
sections live here, the others next to the code that uses them (`actor.config.ActorConfig`,
`algo.config.PolicyLossConfig`, `algo.correction.RolloutCorrectionConfig`,
`cluster.config.ClusterConfig`).
"""

from ctpo_megatron.config.data import DataConfig
from ctpo_megatron.config.model import ModelConfig, ParallelConfig
from ctpo_megatron.config.rollout import RolloutConfig
from ctpo_megatron.config.schema import TrainConfig
from ctpo_megatron.config.store import load_config, register_configs, save_config
from ctpo_megatron.config.trainer import TrainerConfig

__all__ = ["DataConfig", "ModelConfig", "ParallelConfig", "RolloutConfig", "TrainConfig",
           "TrainerConfig", "load_config", "register_configs", "save_config"]
