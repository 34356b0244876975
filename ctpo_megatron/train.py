"""Entry point of a CTPO run: `python -m ctpo_megatron.train [hydra overrides]`.

    torchrun --nproc-per-node 2 -m ctpo_megatron.train --config-name tiny
    torchrun ... -m ctpo_megatron.train model=qwen3_32b model.path=/ckpt data.train_files=[...]

Configs: `configs/config.yaml` (the paper's setup) or `--config-name tiny`; groups model,
parallel, algo, rollout, data, cluster; `--cfg job` prints the composed config.
"""

from __future__ import annotations

import logging
import os

import hydra
from omegaconf import DictConfig, OmegaConf

from ctpo_megatron.config.store import CONFIG_DIR, register_configs, to_train_config
from ctpo_megatron.logging_utils import init_logging

logger = logging.getLogger(__name__)

register_configs()


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base=None)
def main(dict_cfg: DictConfig) -> None:
    init_logging()
    cfg = to_train_config(dict_cfg)
    _log_to_run_dir(cfg.trainer.run_dir)
    logger.info("resolved config:\n%s", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    from ctpo_megatron.parallel.state import destroy_parallel
    from ctpo_megatron.trainer.loop import Trainer

    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
        destroy_parallel()


def _log_to_run_dir(run_dir: str) -> None:
    """Rank 0 also writes its log to `<run_dir>/train.log` (appended across restarts)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    os.makedirs(run_dir, exist_ok=True)
    root = logging.getLogger()
    handler = logging.FileHandler(os.path.join(run_dir, "train.log"))
    handler.setFormatter(root.handlers[0].formatter if root.handlers else None)
    root.addHandler(handler)


if __name__ == "__main__":
    main()
