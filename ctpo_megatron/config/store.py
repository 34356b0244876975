"""Registers the config dataclasses in Hydra's ConfigStore; converts and saves resolved configs."""

from __future__ import annotations

import os

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ctpo_megatron.config.schema import TrainConfig

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "configs")
"""The repository's `configs/` directory (Hydra search path of the entry point)."""

_REGISTERED = False


def register_configs() -> None:
    """Stores `TrainConfig` as `train_schema` (the base of `configs/config.yaml`). Idempotent."""
    global _REGISTERED
    if _REGISTERED:
        return
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    _REGISTERED = True


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """Converts a composed config to typed dataclasses, running every `__post_init__` check."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"missing mandatory settings: {', '.join(missing)} (pass them as Hydra "
                         "overrides, e.g. model.path=/path/to/hf_checkpoint)")
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, TrainConfig):
        raise TypeError(f"composed config is a {type(obj).__name__}, expected TrainConfig "
                        "(does configs/config.yaml list train_schema first in its defaults?)")
    return obj


def load_config(overrides: list[str] | None = None, *, config_name: str = "config") -> TrainConfig:
    """Composes `configs/<config_name>.yaml` with Hydra `overrides` outside of `@hydra.main`."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(config_name=config_name, overrides=list(overrides or []))
    return to_train_config(cfg)


def save_config(cfg: TrainConfig, path: str) -> None:
    """Writes the resolved config as YAML to `path` (the run dir's `config.yaml`)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    os.replace(tmp, path)
