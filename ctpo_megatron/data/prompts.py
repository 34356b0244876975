"""Prompt sets from parquet or jsonl files, including verl-style parquet as it is.

A row becomes a `Prompt`: chat messages (a `prompt` list of {role, content}, or a plain string
turned into one user message), the ground truth (default: `reward_model.ground_truth`) and the
data source. Columns some writers store as strings are decoded: a `prompt` string holding a
JSON (or Python-literal) list of messages, and a `reward_model` string holding a dict. `PromptSampler` walks the training set in seeded, per-epoch shuffled order and
exposes its position as a small dict, so a resumed run draws exactly the prompts it would have.
"""

from __future__ import annotations

import ast
import json
import logging
import random
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class Prompt:
    """One problem: what the model is asked and how its answer is checked."""

    messages: list[dict[str, str]]
    """Chat messages ({role, content}) of the prompt, rendered by the chat template."""
    ground_truth: str
    """Reference answer given to the reward function."""
    data_source: str = "unknown"
    """Dataset the row came from (metrics are also reported per source)."""
    uid: str = ""
    """Stable id: `<file>#<row>`."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Remaining row fields (not interpreted)."""


def _read_rows(path: str) -> list[dict]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.endswith((".jsonl", ".json")):
        rows = []
        with open(path) as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{line_no}: not a JSON object per line ({e})") from None
        return rows
    raise ValueError(f"{path!r}: prompt files must be .parquet or .jsonl")


def _decode_literal(text: str) -> Any:
    """A JSON or Python-literal container encoded in a string; the string itself otherwise."""
    stripped = text.strip()
    if not stripped or stripped[0] not in "[{":
        return text
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(stripped)
        except (ValueError, SyntaxError, RecursionError):
            continue
    return text


def _get_dotted(row: dict, key: str, path: str, index: int) -> Any:
    value: Any = row
    for part in key.split("."):
        if isinstance(value, str):
            value = _decode_literal(value)  # e.g. reward_model stored as a JSON string
        if not isinstance(value, dict) or part not in value:
            raise ValueError(f"{path} row {index}: no field {key!r} (columns: {sorted(row)})")
        value = value[part]
    return value


def _messages(value: Any, path: str, index: int, key: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        decoded = _decode_literal(value)
        if not isinstance(decoded, list):
            return [{"role": "user", "content": value}]
        value = decoded
    if hasattr(value, "tolist"):  # numpy arrays from pandas-written parquet
        value = value.tolist()
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]
    raise ValueError(f"{path} row {index}: field {key!r} must be a string or a non-empty list of "
                     f"{{role, content}} messages, got {type(value).__name__}")


def load_prompts(paths: list[str], *, prompt_key: str = "prompt",
                 ground_truth_key: str = "reward_model.ground_truth",
                 data_source_key: str = "data_source") -> list[Prompt]:
    """Reads every file in `paths` (parquet / jsonl) into `Prompt`s, in file order."""
    prompts: list[Prompt] = []
    for path in paths:
        rows = _read_rows(path)
        for i, row in enumerate(rows):
            messages = _messages(_get_dotted(row, prompt_key, path, i), path, i, prompt_key)
            truth = _get_dotted(row, ground_truth_key, path, i)
            if hasattr(truth, "tolist"):
                truth = truth.tolist()
            source = (row.get(data_source_key) if data_source_key else None) or "unknown"
            extra = {k: v for k, v in row.items() if k not in (prompt_key, data_source_key)}
            prompts.append(Prompt(messages=messages, ground_truth=str(truth),
                                  data_source=str(source), uid=f"{path}#{i}", extra=extra))
        logger.info("loaded %d prompts from %s", len(rows), path)
    if paths and not prompts:
        raise ValueError(f"no prompts in {paths}")
    return prompts


def train_sampler(data: Any, seed: int) -> PromptSampler:
    """A `PromptSampler` at the start of `data.train_files` (`data`: the run's `DataConfig`),
    seeded `seed` (`trainer.seed`): the trainer's, and the rollout producer's own copy."""
    prompts = load_prompts(data.train_files, prompt_key=data.prompt_key, ground_truth_key=data.ground_truth_key,
                           data_source_key=data.data_source_key)
    return PromptSampler(prompts, seed=seed, shuffle=data.shuffle)


def write_rows(rows: list[dict], path: str) -> str:
    """Writes rows to `path` as parquet or jsonl (by extension); returns `path`."""
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with open(path, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return path


class PromptSampler:
    """Draws batches of prompts in seeded, per-epoch shuffled order; resumable via `state_dict`."""

    def __init__(self, prompts: list[Prompt], *, seed: int, shuffle: bool = True) -> None:
        if not prompts:
            raise ValueError("PromptSampler: the training prompt set is empty (data.train_files)")
        self.prompts = prompts
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.offset = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, n: int) -> list[Prompt]:
        """The next `n` prompts; wraps into a freshly shuffled epoch when one runs out."""
        batch: list[Prompt] = []
        while len(batch) < n:
            if self.offset == len(self._order):
                self.epoch += 1
                self.offset = 0
                self._order = self._epoch_order(self.epoch)
            take = min(n - len(batch), len(self._order) - self.offset)
            batch += [self.prompts[i] for i in self._order[self.offset:self.offset + take]]
            self.offset += take
        return batch

    def state_dict(self) -> dict[str, int]:
        """Position in the data: {epoch, offset, seed, size}."""
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "size": len(self.prompts)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restores a position saved by `state_dict` (the prompt set must be the same size)."""
        if state["size"] != len(self.prompts):
            raise ValueError(f"PromptSampler: checkpoint was taken on {state['size']} training "
                             f"prompts, this run has {len(self.prompts)} (data.train_files changed?)")
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self.offset = state["offset"]
        self._order = self._epoch_order(self.epoch)
