"""Prepares the tiny run's inputs: `python -m ctpo_megatron.data.tiny_setup OUT_DIR`.

Writes, into OUT_DIR (skipped when already complete, so a restarted run reuses them):
  model/        a tiny Qwen2-style HF checkpoint + character tokenizer, warm-started (SFT) on a
                few imperfect demonstrations of the tool-use arithmetic task
  train.parquet synthetic training problems (verl-style rows)
  val.parquet   held-out problems, disjoint from training and warm-start problems
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field

import torch

from ctpo_megatron.data import arithmetic
from ctpo_megatron.data.prompts import write_rows
from ctpo_megatron.data.tiny_model import TinyModelConfig, build_tiny_model, save_tiny_model
from ctpo_megatron.data.tiny_tokenizer import build_char_tokenizer
from ctpo_megatron.data.warm_start import WarmStartConfig, warm_start_arithmetic

logger = logging.getLogger(__name__)

DONE_FILE = "tiny_setup.json"


@dataclass
class TinySetupConfig:
    """Everything the tiny run's inputs depend on (saved next to them)."""

    model: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Shape of the tiny model."""
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    """Size and mix of the supervised warm start."""
    train_size: int = 2000
    """Training problems."""
    val_size: int = 64
    """Held-out problems."""
    seed: int = 1
    """Seed of the generated problem sets."""


def _render_tool_output(stdout: str) -> str:
    # The exact text the agent loop inserts after a code block, so warm start and RL agree.
    from ctpo_megatron.rollout.agent.chat import ToolFormat

    fmt = ToolFormat()
    return fmt.wrap_output(fmt.render_output(stdout), after=fmt.code_close)


def prepare_tiny_run(out_dir: str, cfg: TinySetupConfig | None = None) -> dict[str, str]:
    """Builds model, tokenizer and data in `out_dir`; returns their paths
    ({"model", "train", "val"}). Deterministic for a given config."""
    cfg = cfg or TinySetupConfig()
    paths = {"model": os.path.join(out_dir, "model"), "train": os.path.join(out_dir, "train.parquet"),
             "val": os.path.join(out_dir, "val.parquet")}
    done = os.path.join(out_dir, DONE_FILE)
    if os.path.exists(done):
        with open(done) as f:
            if json.load(f).get("config") == asdict(cfg):
                logger.info("tiny setup already complete in %s", out_dir)
                return paths
    os.makedirs(out_dir, exist_ok=True)
    train = arithmetic.make_rows(cfg.train_size, seed=cfg.seed, split="train")
    warm = arithmetic.make_rows(cfg.warm_start.num_demos, seed=cfg.warm_start.seed + 1000, split="warm_start")
    seen = {r["extra_info"]["expression"] for r in train + warm}
    val = arithmetic.make_rows(cfg.val_size, seed=cfg.seed + 1, split="test", exclude=seen)
    write_rows(train, paths["train"])
    write_rows(val, paths["val"])

    tokenizer = build_char_tokenizer(paths["model"])
    model = build_tiny_model(cfg.model, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        warm_start_arithmetic(model, tokenizer, cfg.warm_start, _render_tool_output)
    save_tiny_model(model, tokenizer, paths["model"])
    with open(done, "w") as f:
        json.dump({"config": asdict(cfg), "paths": paths}, f, indent=1)
    logger.info("tiny setup written to %s", out_dir)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ctpo_megatron.data.tiny_setup",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="directory to write model/, train.parquet, val.parquet into")
    parser.add_argument("--sft-steps", type=int, default=WarmStartConfig.steps,
                        help="warm-start optimizer steps (default %(default)s)")
    parser.add_argument("--tool-fraction", type=float, default=WarmStartConfig.tool_fraction,
                        help="fraction of demonstrations using the code tool (default %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    cfg = TinySetupConfig(warm_start=WarmStartConfig(steps=args.sft_steps, tool_fraction=args.tool_fraction))
    for name, path in prepare_tiny_run(args.out_dir, cfg).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
