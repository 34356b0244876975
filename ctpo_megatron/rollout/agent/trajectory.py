"""`Trajectory`: one scored multi-turn rollout, token-exact, ready for the trainer."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

_VERSION = re.compile(r"step_(\d+)$")


def version_number(version: str | None) -> int:
    """The trainer's weight version string `step_<n>` -> n; the base model (no version yet,
    or any other name) -> 0."""
    match = _VERSION.search(version or "")
    return int(match.group(1)) if match else 0


@dataclass
class Trajectory:
    """One sampled response to one prompt, with tool turns, as the trainer consumes it.

    Token lists are aligned over the response: `response_ids[i]`, `rollout_log_probs[i]` and
    `loss_mask[i]` describe the same token. The response is exactly what the server sampled
    plus the tool-output tokens the environment inserted; it is never re-tokenized.
    """

    prompt_ids: list[int]
    """[P] prompt token ids (chat template applied)."""
    response_ids: list[int] = field(default_factory=list)
    """[R] response token ids: generated tokens and inserted tool-output tokens, in order."""
    rollout_log_probs: list[float] = field(default_factory=list)
    """[R] float — the server's log-prob of each generated token; 0.0 at tool-output tokens."""
    loss_mask: list[int] = field(default_factory=list)
    """[R] int — 1 for generated tokens (trained), 0 for tool-output tokens."""
    num_turns: int = 0
    """Assistant generation segments (tool calls + 1 when the model went on after the last)."""
    tool_calls: int = 0
    """Code blocks executed."""
    tool_errors: int = 0
    """Executions that exited with a non-zero status (timeouts excluded)."""
    tool_timeouts: int = 0
    """Executions killed by the sandbox timeout."""
    tool_output_truncations: int = 0
    """Tool outputs cut at max_tool_output_tokens."""
    finish_reason: str = ""
    """"stop" (end of turn), "length" (response budget), "max_turns" (a call beyond the limit),
    "abort" (the server aborted the request)."""
    weight_versions: list[str] = field(default_factory=list)
    """Distinct server weight versions that produced the generated tokens, in order."""
    token_versions: list[int] = field(default_factory=list)
    """[R] int — trainer step whose weights sampled each generated token (`version_number` of
    the server's per-token version: a request paused across a weight update holds tokens of
    both), -1 at tool output; empty (trajectories built elsewhere): every token is taken to
    come from the first of `weight_versions`."""
    response_text: str = ""
    """Decoded response (special tokens kept), for reward and logging."""
    prompt_index: int = 0
    """Index of the prompt in the batch."""
    sample_index: int = 0
    """Index of this sample among the prompt's n samples."""
    ground_truth: str | None = None
    """Reference answer used by the reward (None: not scored)."""
    reward: float | None = None
    """Scalar reward (None until scored)."""
    correct: bool | None = None
    """The boxed answer verified equal to the ground truth."""
    has_boxed: bool | None = None
    """The response contains a \\boxed{} answer."""
    reward_error: str | None = None
    """Why verification did not complete, if it did not."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form per-sample data carried through (e.g. the dataset row's extra_info)."""

    @property
    def weight_version(self) -> str | None:
        """The latest weight version that generated tokens of this trajectory."""
        return self.weight_versions[-1] if self.weight_versions else None

    @property
    def num_generated_tokens(self) -> int:
        """Tokens sampled by the model (loss-mask 1)."""
        return sum(self.loss_mask)

    def check(self) -> None:
        """Raises ValueError when the per-token lists disagree in length or the mask is not 0/1."""
        n = len(self.response_ids)
        if len(self.rollout_log_probs) != n or len(self.loss_mask) != n:
            raise ValueError(f"Trajectory: response_ids has {n} tokens but rollout_log_probs has "
                             f"{len(self.rollout_log_probs)} and loss_mask {len(self.loss_mask)}")
        if self.token_versions and len(self.token_versions) != n:
            raise ValueError(f"Trajectory: response_ids has {n} tokens but token_versions has "
                             f"{len(self.token_versions)}")
        if any(m not in (0, 1) for m in self.loss_mask):
            raise ValueError("Trajectory: loss_mask must contain only 0 and 1")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-serializable) for logging and rollout dumps."""
        return asdict(self)
