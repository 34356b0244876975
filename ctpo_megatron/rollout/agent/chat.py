"""Qwen-style chat templates and the tool-call text format, producing token ids directly.

A Qwen chat is `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, then
`<|im_start|>assistant\\n` as the generation prompt. Two conversation layouts exist
(`AgentConfig.conversation`):

- "inline" (`ChatTemplate`): tool-integrated reasoning stays inside one assistant turn: the
  model writes a code block, the environment appends the output block, the model continues.
- "tool_turns" (`Qwen3ToolTemplate`): the reference implementation's layout for Qwen3: a
  tool-use system prompt plus the code-interpreter tool schema, thinking disabled, and each
  tool output sent back as its own tool turn (`<tool_response>` inside a user turn), after
  which a new assistant turn starts.

Both block formats are data (`ToolFormat`), not code.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
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



def check_messages(messages: list[dict[str, str]], roles, where: str) -> None:
    """Raises ValueError naming `where` unless every message has a role in `roles` and string
    content."""
    for i, msg in enumerate(messages):
        role, content = msg.get("role"), msg.get("content")
        if role not in roles or not isinstance(content, str):
            raise ValueError(f"{where}: message {i} must have a role in {roles} and string content, "
                             f"got role={role!r}, content type {type(content).__name__}")

@dataclass
class _HFAdapter:
    tok: Any

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens,
                               clean_up_tokenization_spaces=False)

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

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

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
    enable_thinking: bool = True
    """False: the generation prompt is followed by Qwen3's empty `<think>\\n\\n</think>\\n\\n`
    (thinking disabled, as `apply_chat_template(..., enable_thinking=False)` renders it)."""

    def _generation_prompt(self) -> str:
        think = "" if self.enable_thinking else "<think>\n\n</think>\n\n"
        return f"{self.im_start}assistant\n{think}"

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The template text of `messages` (each {"role", "content"})."""
        check_messages(messages, self.roles, "ChatTemplate.render")
        if self.system_prompt is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        parts = [f"{self.im_start}{m['role']}\n{m['content']}{self.im_end}\n" for m in messages]
        if add_generation_prompt:
            parts.append(self._generation_prompt())
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


REFERENCE_TOOL_USE_SYSTEM_PROMPT = (
    "Solve the following problem step by step. You can write executable Python code to help your "
    "reasoning. The code will be executed by an external sandbox, and execution output will be "
    "returned as observation text starting with 'Code execution result:'. Use that result in your "
    "next step.\n\n"
    "Code format:\n"
    "1) When you want to run code, output exactly one fenced code block.\n"
    "2) Use ```python ... ``` format.\n"
    "3) Write complete code with required imports.\n"
    "4) Use print() for key intermediate values and final computed result.\n\n"
    "Answer format:\n"
    "1) If you are ready to finish, output the final answer in boxed format.\n"
    "2) The final line must be: \\boxed{your_final_answer}\n"
    "3) Do not add extra text after the final \\boxed{...}."
)
"""The reference implementation's tool-use system prompt (`DEFAULT_TOOL_USE_SYSTEM_PROMPT` of
its tool agent loop), verbatim. The reference never actually prefixes outputs with "Code
execution result:"; outputs arrive as raw stdout + stderr inside `<tool_response>`."""

CODE_INTERPRETER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "code_interpreter",
        "description": "Execute Python code in local sandbox and return stdout/stderr.",
        "parameters": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "description": "Python code to execute."},
                "timeout": {"type": "number", "description": "Optional run timeout in seconds."},
                "language": {"type": "string", "description": "Optional language tag, default is python."},
            },
            "required": ["code"],
        },
    },
}
"""The reference's tool schema, as its tool config defines it and its chat template renders it
(key order matters: the template prints it with `tojson`)."""


@dataclass
class Qwen3ToolTemplate(ChatTemplate):
    """Qwen3's chat template with tools, as the reference renders it (`apply_chat_template(
    messages, tools=[code_interpreter], enable_thinking=False)`).

    Prompt: a system turn holding the tool-use system prompt (prepended to a system message
    the data already has, "\n\n" between, unless it already contains it), then the tools
    block; then the user turns; then `<|im_start|>assistant\n`, followed by an empty think
    block when thinking is disabled. A tool turn (`tool_turn`) is what the reference appends
    after an assistant turn that called a tool: the template of the tool messages alone.
    """

    system_prompt: str | None = REFERENCE_TOOL_USE_SYSTEM_PROMPT
    """Tool-use system prompt (None: none; the tools block still opens a system turn)."""
    tools: list[dict] | None = field(default_factory=lambda: [CODE_INTERPRETER_TOOL])
    """Tool schemas rendered into the system turn (None or []: no tools block)."""
    enable_thinking: bool = False
    """Off, as in the reference's Qwen3 runs."""

    def _with_system(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        if self.system_prompt is None:
            return list(messages)
        if messages and messages[0]["role"] == "system":
            existing = messages[0]["content"]
            if self.system_prompt in existing:
                return list(messages)
            return [{"role": "system", "content": f"{self.system_prompt}\n\n{existing}"}, *messages[1:]]
        return [{"role": "system", "content": self.system_prompt}, *messages]

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The template text of `messages` (system, user and tool turns; assistant turns only
        before the last user turn, where Qwen3 renders them verbatim)."""
        check_messages(messages, self.roles, "Qwen3ToolTemplate.render")
        messages = self._with_system(messages)
        parts: list[str] = []
        first_system = bool(messages) and messages[0]["role"] == "system"
        if self.tools:
            parts.append(f"{self.im_start}system\n")
            if first_system:
                parts.append(messages[0]["content"] + "\n\n")
            parts.append("# Tools\n\nYou may call one or more functions to assist with the user "
                         "query.\n\nYou are provided with function signatures within <tools></tools> "
                         "XML tags:\n<tools>")
            parts += ["\n" + json.dumps(t, ensure_ascii=False) for t in self.tools]
            parts.append("\n</tools>\n\nFor each function call, return a json object with function "
                         "name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                         "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"
                         f"</tool_call>{self.im_end}\n")
        elif first_system:
            parts.append(f"{self.im_start}system\n{messages[0]['content']}{self.im_end}\n")
        last_query = max((i for i, m in enumerate(messages) if m["role"] == "user" and not (
            m["content"].startswith("<tool_response>") and m["content"].endswith("</tool_response>"))),
            default=len(messages) - 1)
        for i, m in enumerate(messages):
            role, content = m["role"], m["content"]
            if role == "user" or (role == "system" and i > 0):
                parts.append(f"{self.im_start}{role}\n{content}{self.im_end}\n")
            elif role == "assistant":
                if i > last_query or "</think>" in content:
                    raise ValueError(f"Qwen3ToolTemplate.render: message {i}: assistant turns after "
                                     "the last user turn, or with think blocks, are not supported "
                                     "in prompts")
                parts.append(f"{self.im_start}assistant\n{content}{self.im_end}\n")
            elif role == "tool":
                if i == 0 or messages[i - 1]["role"] != "tool":
                    parts.append(f"{self.im_start}user")
                parts.append(f"\n<tool_response>\n{content}\n</tool_response>")
                if i == len(messages) - 1 or messages[i + 1]["role"] != "tool":
                    parts.append(f"{self.im_end}\n")
        if add_generation_prompt:
            parts.append(self._generation_prompt())
        return "".join(parts)

    def tool_turn(self, outputs: list[str]) -> str:
        """Text appended after an assistant turn (which ends with its own end-of-turn token)
        that called tools: one tool message per output, then the next generation prompt. The
        reference encodes the tool messages alone with the template, so no newline follows
        the model's `<|im_end|>`."""
        bare = dataclasses.replace(self, system_prompt=None, tools=None)
        return bare.render([{"role": "tool", "content": o} for o in outputs])


def truncate_chars(text: str, limit: int, keep: str = "middle") -> tuple[str, bool]:
    """Cuts `text` to `limit` characters as the reference does; returns (text, truncated).

    keep: "head" keeps the first `limit` characters + "...(truncated)"; "tail" keeps the last
    ones after "(truncated)..."; "middle" keeps limit // 2 from each end around
    "...(truncated)...". limit <= 0: no cut.
    """
    if limit <= 0 or len(text) <= limit:
        return text, False
    if keep == "head":
        return text[:limit] + "...(truncated)", True
    if keep == "tail":
        return "(truncated)..." + text[-limit:], True
    if keep == "middle":
        half = limit // 2
        return text[:half] + "...(truncated)..." + text[-half:], True
    raise ValueError(f"truncate_chars: keep={keep!r}: expected head, middle or tail")


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
    code_languages: list[str] | None = None
    """Fence languages accepted as a tool call instead of `code_open`/`code_close`: a call is
    ```` ```<lang>\\n<code>\\n``` ```` for any listed lang ("" = a bare fence), the code
    stripped, empty blocks skipped (the reference's rule with ["python", "py", ""])."""
    output_style: str = "ours"
    """How a run's result becomes text. "ours": stdout, then stderr only when the code
    failed (last `max_stderr_chars`), then the timeout message, trailing newlines dropped.
    "reference": stdout + stderr as they are; a timeout shows only "Timeout\\n" (the
    reference's sandbox drops the partial output)."""

    def __post_init__(self) -> None:
        for name in ("code_open", "code_close", "output_open", "output_close"):
            if not getattr(self, name):
                raise ValueError(f"ToolFormat.{name} must be a non-empty string")
        if self.output_style not in ("ours", "reference"):
            raise ValueError(f"ToolFormat.output_style={self.output_style!r}: expected ours or reference")
        if self.code_languages is not None:
            self.code_languages = [str(x) for x in self.code_languages]
            if any(not re.fullmatch(r"[A-Za-z0-9_+-]*", x) for x in self.code_languages):
                raise ValueError(f"ToolFormat.code_languages={self.code_languages}: languages are "
                                 "fence tags such as python, py or \"\" (bare)")

    def find_call(self, text: str) -> tuple[str, int] | None:
        """The first complete tool call in `text`: (code, index just past its closing marker)."""
        if self.code_languages is not None:
            for m in _fence_pattern(tuple(self.code_languages)).finditer(text):
                if m.group(1).strip():
                    return m.group(1).strip(), m.end()
            return None
        m = _call_pattern(self.code_open, self.code_close).search(text)
        return None if m is None else (m.group(1), m.end())

    def render_output(self, stdout: str, stderr: str = "", exit_code: int | None = 0,
                      timed_out: bool = False, timeout: float = 0.0) -> str:
        """The body of the tool output block (without the open/close markers)."""
        if self.output_style == "reference":
            return "Timeout\n" if timed_out else stdout + stderr
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


@lru_cache(maxsize=16)
def _fence_pattern(languages: tuple[str, ...]) -> re.Pattern:
    tags = "|".join(re.escape(x) for x in sorted(languages, key=len, reverse=True) if x)
    optional = "" in languages
    lang = f"(?:{tags})" + ("?" if optional else "") if tags else ""
    return re.compile("```" + lang + r"\n(.*?)\n```", re.S)


@dataclass
class ToolCall:
    """One tool call found in an assistant turn (tool_turns layout)."""

    name: str
    """Called tool; only "code_interpreter" exists."""
    code: str = ""
    """Python source to run."""
    timeout_s: float | None = None
    """Timeout the call asked for (None: the configured one)."""
    language: str = "python"
    """Language tag of the call."""


_JSON_CALL = re.compile(r'\{\s*"name"\s*:\s*"(?P<name>[^"]+)"\s*,\s*"arguments"\s*:\s*(?P<arguments>\{.*?\})\s*\}',
                        re.S)


def find_tool_calls(text: str, fmt: ToolFormat) -> list[ToolCall]:
    """Tool calls of one finished assistant turn, the reference's rule: JSON calls
    `{"name": ..., "arguments": {...}}` (e.g. inside `<tool_call>` tags) if any parse, else
    every non-empty code block `fmt.find_call` accepts, in order. A JSON call's code that is
    itself a fenced block is unwrapped."""
    calls: list[ToolCall] = []
    for m in _JSON_CALL.finditer(text):
        try:
            args = json.loads(m.group("arguments"))
        except ValueError:
            continue
        if not isinstance(args, dict):
            continue
        code = str(args.get("code", ""))
        inner = _fence_pattern(("py", "python", "")).search(code)
        if inner:
            code = inner.group(1).strip()
        timeout = args.get("timeout")
        try:
            timeout = None if timeout is None else float(str(timeout).strip())
        except ValueError:
            timeout = None
        calls.append(ToolCall(m.group("name"), code, timeout,
                              str(args.get("language", "python")).strip().lower()))
    if calls:
        return calls
    pos = 0
    while (found := fmt.find_call(text[pos:])) is not None:
        calls.append(ToolCall("code_interpreter", found[0]))
        pos += found[1]
    return calls
