"""Qwen-style chat templates and the tool-call text format, producing token ids directly.

A Qwen chat is `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, then
`<|im_start|>assistant\\n` as the generation prompt. Tool-integrated reasoning stays inside one
assistant turn: the model writes a code block, the environment appends the output block, the
model continues. Both block formats are data (`ToolFormat`), not code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol


class Tokenizer(Protocol):
    """The two operations we need; see `as_tokenizer` for the adapters."""

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; special-token strings in it map to their ids, nothing is added."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens kept."""
        ...


@dataclass
class _HFAdapter:
    tok: Any

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def vocab_size(self) -> int:
        return len(self.tok)

    def token_id(self, token: str) -> int | None:
        tid = self.tok.convert_tokens_to_ids(token)
        return None if tid is None or tid == self.tok.unk_token_id and token != self.tok.unk_token else tid


@dataclass
class _TokenizersAdapter:
    tok: Any

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)


def as_tokenizer(tokenizer: Any) -> _HFAdapter | _TokenizersAdapter:
    """Wraps a `transformers` tokenizer or a `tokenizers.Tokenizer` (idempotent)."""
    if isinstance(tokenizer, (_HFAdapter, _TokenizersAdapter)):
        return tokenizer
    if hasattr(tokenizer, "convert_tokens_to_ids"):
        return _HFAdapter(tokenizer)
    if hasattr(tokenizer, "token_to_id"):
        return _TokenizersAdapter(tokenizer)
    raise TypeError(f"as_tokenizer: expected a transformers tokenizer or tokenizers.Tokenizer, "
                    f"got {type(tokenizer).__name__}")


@dataclass
class ChatTemplate:
    """Qwen-style (ChatML) chat template."""

    im_start: str = "<|im_start|>"
    """Special token opening a message; followed by the role and a newline."""
    im_end: str = "<|im_end|>"
    """Special token closing a message (the model's end-of-turn / eos)."""
    system_prompt: str | None = None
    """System message prepended when the conversation has none (None: no system message)."""
    roles: tuple[str, ...] = ("system", "user", "assistant", "tool")
    """Accepted message roles."""

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The template text of `messages` (each {"role", "content"})."""
        for i, msg in enumerate(messages):
            role, content = msg.get("role"), msg.get("content")
            if role not in self.roles or not isinstance(content, str):
                raise ValueError(f"ChatTemplate.render: message {i} must have a role in {self.roles} "
                                 f"and string content, got role={role!r}, content type "
                                 f"{type(content).__name__}")
        if self.system_prompt is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        parts = [f"{self.im_start}{m['role']}\n{m['content']}{self.im_end}\n" for m in messages]
        if add_generation_prompt:
            parts.append(f"{self.im_start}assistant\n")
        return "".join(parts)

    def encode_prompt(self, tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
        """Prompt token ids of `messages` with the assistant generation prompt.

        Encoded once as a whole, as `apply_chat_template(..., tokenize=True)` does: the
        tokenizer splits on its special tokens and encodes the text between them.
        """
        return as_tokenizer(tokenizer).encode(self.render(messages, add_generation_prompt=True))

    def end_of_turn_ids(self, tokenizer: Any) -> list[int]:
        """Ids that end the assistant's turn (`im_end`; the tokenizer's eos too if different)."""
        tok = as_tokenizer(tokenizer)
        ids = [tok.token_id(self.im_end)]
        eos = getattr(getattr(tok, "tok", None), "eos_token_id", None)
        ids.append(eos)
        return sorted({i for i in ids if i is not None})


@dataclass
class ToolFormat:
    """Text markers of a tool call (code block) and of the tool output inserted after it."""

    code_open: str = "```python\n"
    """Opens a tool call; the code follows it."""
    code_close: str = "```"
    """Closes a tool call (the first occurrence after `code_open`)."""
    output_open: str = "```output\n"
    """Opens the inserted tool output."""
    output_close: str = "\n```\n"
    """Closes the inserted tool output."""
    output_truncated: str = "\n...[output truncated]"
    """Appended to an output cut at `AgentConfig.max_tool_output_tokens`."""
    timeout_message: str = "TimeoutError: execution timed out after {timeout:g} seconds"
    """Shown (after any output) when the code hit the sandbox timeout."""
    show_stderr: bool = True
    """Include stderr (tracebacks) in the output when the code failed."""
    max_stderr_chars: int = 2000
    """Keep only the last this many characters of stderr (the traceback's end matters most)."""

    def __post_init__(self) -> None:
        for name in ("code_open", "code_close", "output_open", "output_close"):
            if not getattr(self, name):
                raise ValueError(f"ToolFormat.{name} must be a non-empty string")

    def find_call(self, text: str) -> tuple[str, int] | None:
        """The first complete tool call in `text`: (code, index just past its closing marker)."""
        m = _call_pattern(self.code_open, self.code_close).search(text)
        return None if m is None else (m.group(1), m.end())

    def render_output(self, stdout: str, stderr: str = "", exit_code: int | None = 0,
                      timed_out: bool = False, timeout: float = 0.0) -> str:
        """The body of the tool output block (without the open/close markers)."""
        body = stdout
        if self.show_stderr and stderr and exit_code != 0:
            tail = stderr[-self.max_stderr_chars:]
            body += ("" if not body or body.endswith("\n") else "\n") + tail
        if timed_out:
            body += ("" if not body or body.endswith("\n") else "\n") + self.timeout_message.format(timeout=timeout)
        return body.rstrip("\n")

    def wrap_output(self, body: str, after: str) -> str:
        """The full text inserted after a tool call: a newline if the generated text `after`
        does not end with one, then the output block."""
        lead = "" if after.endswith("\n") else "\n"
        return f"{lead}{self.output_open}{body}{self.output_close}"


@lru_cache(maxsize=16)
def _call_pattern(code_open: str, code_close: str) -> re.Pattern:
    return re.compile(re.escape(code_open) + r"(.*?)" + re.escape(code_close), re.S)
