"""Settings of the tool-interleaved agent loop (`rollout/agent/loop.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ctpo_megatron.rollout.agent.chat import ChatTemplate, Qwen3ToolTemplate, ToolFormat
from ctpo_megatron.rollout.agent.reward import RewardConfig
from ctpo_megatron.rollout.sandbox import SandboxConfig

STOP_MODES = ("auto", "none")
CONVERSATIONS = ("inline", "tool_turns")
TRUNCATE_KEEP = ("head", "middle", "tail")


@dataclass
class AgentOptions:
    """Conversation layout, tool environment and reward rule (Hydra `rollout.agent`).

    Flat and YAML-friendly; `AgentConfig.from_rollout_config` turns it into the agent's
    settings. Defaults: our layout; `configs/rollout/paper.yaml` sets the reference's.
    """

    conversation: str = "inline"
    """"inline": tool output inserted inside the assistant turn right after the code block
    (generation pauses at the closing fence). "tool_turns": the reference's layout: each
    assistant turn runs to its end-of-turn token, its first tool call is run and the output
    comes back as a tool turn (Qwen3 template, see `chat.Qwen3ToolTemplate`)."""
    system_prompt: str | None = None
    """System prompt. None: the layout's default (inline: none; tool_turns: the reference's
    tool-use prompt `chat.REFERENCE_TOOL_USE_SYSTEM_PROMPT`); "": none."""
    tools_in_prompt: bool = True
    """tool_turns: render the code-interpreter tool schema into the system turn."""
    enable_thinking: bool = True
    """False: Qwen3 thinking disabled (an empty think block after each generation prompt)."""
    code_languages: list[str] | None = None
    """Accepted fences: None = ```` ```python ```` only; the reference: ["python", "py", ""]
    ("" = a bare ```` ``` ```` fence)."""
    output_style: str = "ours"
    """Tool output text: "ours" (stdout, stderr on failure, timeout message) or "reference"
    (stdout + stderr; "Timeout" on a timeout). See `chat.ToolFormat.output_style`."""
    max_tool_output_tokens: int = 512
    """Longest tool output kept, tokens (head kept; a marker is appended; 0: no cut)."""
    max_tool_output_chars: int = 0
    """Longest tool output kept, characters, cut before the token limit (0: off)."""
    tool_output_keep: str = "head"
    """What a character cut keeps: head, tail, or middle (= half head, half tail)."""
    tool_timeout_cap_s: float = 0.0
    """tool_turns: a JSON tool call may ask for its own timeout, capped at this (0: the call's
    timeout is ignored and rollout.tool_timeout_s applies)."""
    reward_mode: str = "strict"
    """"strict": math-verify on the last \\boxed{} of the model's own text. "any": correct if
    any of the MATH-style, DAPO-style or math-verify checkers accepts (the reference)."""
    reward_scope: str = "generated"
    """Text the reward reads: "generated" (model tokens only) or "response" (the whole
    decoded response, tool outputs included, special tokens dropped: the reference)."""

    def __post_init__(self) -> None:
        if self.conversation not in CONVERSATIONS:
            raise ValueError(f"rollout.agent.conversation={self.conversation!r}: expected one of {CONVERSATIONS}")
        if self.tool_output_keep not in TRUNCATE_KEEP:
            raise ValueError(f"rollout.agent.tool_output_keep={self.tool_output_keep!r}: expected one "
                             f"of {TRUNCATE_KEEP}")
        if self.max_tool_output_chars < 0 or self.tool_timeout_cap_s < 0:
            raise ValueError("rollout.agent.max_tool_output_chars and tool_timeout_cap_s must be >= 0")
        # RewardConfig and ToolFormat check reward_mode / reward_scope / output_style.


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
    """Longest tool output inserted, tokens; longer outputs are cut and marked (0: no cut)."""
    max_tool_output_chars: int = 0
    """Longest tool output, characters, cut first (0: off); see `tool_output_keep`."""
    tool_output_keep: str = "head"
    """What a character cut keeps: head, tail or middle (`chat.truncate_chars`)."""
    conversation: str = "inline"
    """Conversation layout: "inline" or "tool_turns" (see `AgentOptions.conversation`)."""
    tool_timeout_cap_s: float = 0.0
    """tool_turns: cap of a timeout requested by a JSON tool call (0: such requests ignored)."""
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
        if self.conversation not in CONVERSATIONS:
            raise ValueError(f"AgentConfig.conversation={self.conversation!r}: expected one of {CONVERSATIONS}")
        if self.tool_output_keep not in TRUNCATE_KEEP:
            raise ValueError(f"AgentConfig.tool_output_keep={self.tool_output_keep!r}: expected one of {TRUNCATE_KEEP}")
        for name in ("max_response_tokens", "sandbox_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"AgentConfig.{name}={getattr(self, name)} must be >= 1")
        for name in ("max_turns", "max_tokens_per_call", "max_concurrency", "max_tool_output_chars",
                     "max_tool_output_tokens"):
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
        `rollout`): sampling, response budget, tool turns and timeout, concurrency, and the
        layout / tool environment / reward rule of `rollout.agent` (`AgentOptions`)."""
        opts = getattr(rollout, "agent", None) or AgentOptions()
        fields = dict(
            max_turns=rollout.max_tool_turns, max_response_tokens=rollout.max_response_len,
            tool_timeout_s=rollout.tool_timeout_s, temperature=rollout.temperature,
            top_p=rollout.top_p, top_k=rollout.top_k, max_concurrency=rollout.max_concurrency)
        fields.update(options_fields(opts))
        fields.update(overrides)
        return cls(**fields)


def options_fields(opts: AgentOptions) -> dict[str, Any]:
    """`AgentConfig` fields (chat template, tool format, budgets, reward) set by `opts`."""
    system = opts.system_prompt
    if opts.conversation == "tool_turns":
        chat: ChatTemplate = Qwen3ToolTemplate(enable_thinking=opts.enable_thinking)
        if system is not None:
            chat.system_prompt = system or None
        if not opts.tools_in_prompt:
            chat.tools = None  # type: ignore[attr-defined]
    else:
        chat = ChatTemplate(system_prompt=system or None, enable_thinking=opts.enable_thinking)
    languages = None if opts.code_languages is None else list(opts.code_languages)
    return dict(
        conversation=opts.conversation, chat=chat,
        tool_format=ToolFormat(code_languages=languages, output_style=opts.output_style),
        max_tool_output_tokens=opts.max_tool_output_tokens,
        max_tool_output_chars=opts.max_tool_output_chars, tool_output_keep=opts.tool_output_keep,
        tool_timeout_cap_s=opts.tool_timeout_cap_s,
        reward=RewardConfig(mode=opts.reward_mode, scope=opts.reward_scope))
