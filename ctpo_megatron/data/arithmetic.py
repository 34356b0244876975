"""Synthetic tool-use arithmetic problems ("What is 37*12-5?") as verl-style prompt rows.

The intended solution writes a ```python block that prints the value, reads the tool's output
and answers `\\boxed{value}`: multiplying two-digit numbers in its head is hard for a tiny
model, copying the expression into code and the printed result into the answer is easy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

DATA_SOURCE = "tiny_arith"


@dataclass
class ArithmeticConfig:
    """Which problems the generator draws."""

    min_operand: int = 10
    """Smallest factor."""
    max_operand: int = 99
    """Largest factor."""
    max_offset: int = 9
    """Largest added/subtracted constant."""


def make_problem(rng: random.Random, cfg: ArithmeticConfig) -> tuple[str, int]:
    """One expression and its value, e.g. ("37*12-5", 439)."""
    a = rng.randint(cfg.min_operand, cfg.max_operand)
    b = rng.randint(cfg.min_operand, cfg.max_operand)
    c = rng.randint(1, cfg.max_offset)
    op = rng.choice("+-")
    expr = f"{a}*{b}{op}{c}"
    return expr, (a * b + c if op == "+" else a * b - c)


def problem_row(expr: str, value: int, index: int, split: str) -> dict:
    """A verl-style row: chat-format prompt, ground truth under `reward_model`, `data_source`."""
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": f"What is {expr}?"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(value)},
        "extra_info": {"split": split, "index": index, "expression": expr},
    }


def make_rows(n: int, *, seed: int, split: str, cfg: ArithmeticConfig | None = None,
              exclude: set[str] | None = None) -> list[dict]:
    """`n` distinct problems drawn with `seed`, skipping expressions in `exclude`."""
    cfg = cfg or ArithmeticConfig()
    rng = random.Random(seed)
    seen = set(exclude or ())
    rows: list[dict] = []
    while len(rows) < n:
        expr, value = make_problem(rng, cfg)
        if expr in seen:
            continue
        seen.add(expr)
        rows.append(problem_row(expr, value, len(rows), split))
    return rows


def code_turn(expr: str) -> str:
    """The assistant text of a tool call that evaluates `expr`."""
    return f"```python\nprint({expr})\n```"


def answer_turn(value: str) -> str:
    """The assistant's final answer text."""
    return f"\\boxed{{{value}}}"


def wrong_guess(rng: random.Random, value: int) -> int:
    """A plausible but wrong mental-arithmetic answer near `value`."""
    delta = rng.choice([-1, 1]) * rng.randint(1, max(2, abs(value) // 10))
    return value + delta
