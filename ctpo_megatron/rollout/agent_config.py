"""Settings of the tool-interleaved agent loop (`rollout/agent.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ctpo_megatron.rollout.chat import ChatTemplate, ToolFormat
from ctpo_megatron.rollout.reward import RewardConfig
from ctpo_megatron.rollout.sandbox import SandboxConfig

STOP_MODES = ("auto", "none")


@dataclass
class AgentConfig:
    """Budgets, sampling and formats of one multi-turn rollout. Defaults: the paper's setup."""

    max_turns: int = 5
    """Tool calls per trajectory. A further code block ends the trajectory with finish
    reason "max_turns" (its tokens are kept; the code is not run)."""
    max_response_tokens: int = 8192
    """Response budget, tokens: generated plus inserted tool-output tokens."""
    max_tokens_per_call: int = 0
    """Cap of `max_new_tokens` of one generate request (0: the remaining budget)."""
    max_tool_output_tokens: int = 512
    """Longest tool output inserted, tokens; longer outputs are cut and marked."""
    tool_timeout_s: float = 10.0
    """Wall-clock limit of one sandboxed code run, seconds."""
    sandbox_workers: int = 8
    """Sandboxes running at once (processes; each is cheap while the code sleeps/waits)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int = -1
    """Top-k sampling (-1: off)."""
    seed: int | None = None
    """Base of per-request `sampling_seed`s (None: unseeded). Request seeds are derived from
    (seed, prompt index, sample index, call index), so reruns reproduce."""
    stop_mode: str = "auto"
    """How generation pauses at a tool call. "auto": `stop_token_ids` of every token that can
    complete the closing marker (then the text is checked and the cut is exact); "none": no
    stop tokens, calls are found in the text after each request (wastes tokens past a call)."""
    max_concurrency: int = 0
    """Trajectories in flight at once (0: all of the batch)."""
    tool_format: ToolFormat = field(default_factory=ToolFormat)
    """Tool-call and tool-output markers."""
    chat: ChatTemplate = field(default_factory=ChatTemplate)
    """Chat template applied to prompts given as messages."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Math reward settings (used when ground truths are given)."""
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    """Limits of the code sandbox."""

    def __post_init__(self) -> None:
        for name in ("max_response_tokens", "max_tool_output_tokens", "sandbox_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"AgentConfig.{name}={getattr(self, name)} must be >= 1")
        for name in ("max_turns", "max_tokens_per_call", "max_concurrency"):
            if getattr(self, name) < 0:
                raise ValueError(f"AgentConfig.{name}={getattr(self, name)} must be >= 0")
        if self.tool_timeout_s <= 0:
            raise ValueError(f"AgentConfig.tool_timeout_s={self.tool_timeout_s} must be > 0")
        if self.stop_mode not in STOP_MODES:
            raise ValueError(f"AgentConfig.stop_mode={self.stop_mode!r}: expected one of {STOP_MODES}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"AgentConfig: temperature={self.temperature} must be >= 0 and "
                             f"top_p={self.top_p} in (0, 1]")

    @classmethod
    def from_rollout_config(cls, rollout: Any, **overrides: Any) -> AgentConfig:
        """Builds the agent settings from the trainer's `RolloutConfig` (Hydra group
        `rollout`): sampling, response budget, tool turns and timeout, concurrency."""
        fields = dict(
            max_turns=rollout.max_tool_turns, max_response_tokens=rollout.max_response_len,
            tool_timeout_s=rollout.tool_timeout_s, temperature=rollout.temperature,
            top_p=rollout.top_p, top_k=rollout.top_k, max_concurrency=rollout.max_concurrency)
        fields.update(overrides)
        return cls(**fields)
