"""Warm start for the tiny run: brief supervised fine-tuning (plain torch) on a few imperfect
demonstrations of the arithmetic task, so the starting policy sometimes writes code but is far
from perfect and RL has something to learn.

A demonstration is a list of (text, trained) segments after the prompt: the assistant's code
block (trained), the tool output as the environment inserts it (not trained), the boxed answer
(trained). Imperfect demonstrations skip the tool and box a wrong mental-arithmetic guess.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ctpo_megatron.data import arithmetic

logger = logging.getLogger(__name__)


@dataclass
class WarmStartConfig:
    """Size and mix of the warm start."""

    num_demos: int = 400
    """Distinct demonstration problems (drawn disjoint from nothing: a different seed)."""
    tool_fraction: float = 0.5
    """Fraction of demonstrations that use the code tool; the rest guess (wrongly) at once."""
    steps: int = 400
    """Optimizer steps."""
    batch_size: int = 32
    """Demonstrations per step."""
    lr: float = 1e-3
    """AdamW learning rate."""
    seed: int = 3
    """Seed of demo sampling and batch order."""


Segments = list[tuple[str, bool]]


def arithmetic_demo(row: dict, rng: random.Random, tool_fraction: float,
                    render_tool_output: Callable[[str], str]) -> Segments:
    """The response segments of one demonstration for a `tiny_arith` row."""
    expr = row["extra_info"]["expression"]
    value = int(row["reward_model"]["ground_truth"])
    if rng.random() < tool_fraction:
        return [(arithmetic.code_turn(expr), True), (render_tool_output(f"{value}\n"), False),
                (arithmetic.answer_turn(str(value)), True)]
    return [(arithmetic.answer_turn(str(arithmetic.wrong_guess(rng, value))), True)]


def encode_demo(tokenizer, prompt_messages: list[dict], segments: Segments) -> tuple[list[int], list[int]]:
    """Token ids of prompt + segments + eos, and the loss mask (1 = trained token)."""
    ids = tokenizer.apply_chat_template(prompt_messages, tokenize=True, add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    ids = list(ids)
    mask = [0] * len(ids)
    for text, trained in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [int(trained)] * len(piece)
    ids.append(tokenizer.eos_token_id)
    mask.append(1)
    return ids, mask


def sft(model, examples: list[tuple[list[int], list[int]]], *, steps: int, batch_size: int, lr: float,
        seed: int, pad_id: int) -> list[float]:
    """Trains `model` (HF causal LM) on masked next-token loss; returns the per-step losses."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    start = time.monotonic()
    for step in range(steps):
        batch = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
        length = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([i + [pad_id] * (length - len(i)) for i, _ in batch])
        mask = torch.tensor([m + [0] * (length - len(m)) for _, m in batch], dtype=torch.float32)
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                              reduction="none").view(batch_size, -1)
        target_mask = mask[:, 1:]
        loss = (nll * target_mask).sum() / target_mask.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            logger.info("warm start step %d/%d loss %.3f (%.0fs)", step + 1, steps, loss.item(),
                        time.monotonic() - start)
    model.eval()
    return losses


def warm_start_arithmetic(model, tokenizer, cfg: WarmStartConfig,
                          render_tool_output: Callable[[str], str]) -> list[float]:
    """Builds `cfg.num_demos` imperfect demonstrations and fine-tunes `model` on them."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    rows = arithmetic.make_rows(cfg.num_demos, seed=cfg.seed + 1000, split="warm_start")
    examples = [encode_demo(tokenizer, row["prompt"],
                            arithmetic_demo(row, rng, cfg.tool_fraction, render_tool_output))
                for row in rows]
    return sft(model, examples, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
               pad_id=tokenizer.pad_token_id)
