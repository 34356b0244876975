"""The reference's Qwen3 conversation, token for token.

The expected ids come from running the reference's rule literally: Qwen3's own chat template
(tests/unit/data/qwen3_chat_template.jinja) through `apply_chat_template` with the tool
schema and thinking disabled for the prompt; for each tool output, the template of the tool
message alone (minus the template's default system tokens, none for Qwen3) appended after the
sampled assistant turn. The tokenizer is a byte-level BPE with Qwen3's special tokens.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ctpo_megatron.config.rollout import RolloutConfig
from ctpo_megatron.rollout.agent.loop import AgentLoop
from ctpo_megatron.rollout.agent.config import AgentConfig, AgentOptions
from ctpo_megatron.rollout.agent.chat import (CODE_INTERPRETER_TOOL, REFERENCE_TOOL_USE_SYSTEM_PROMPT, ToolFormat,
                                        find_tool_calls, truncate_chars)
from ctpo_megatron.rollout.sandbox import SandboxPool
from tests.unit._agent_models import LocalResult

TEMPLATE = (Path(__file__).parent / "data" / "qwen3_chat_template.jinja").read_text()
QWEN3_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN3_ADDED = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]


@pytest.fixture(scope="module")
def qwen3_tokenizer(tmp_path_factory):
    from ctpo_megatron.data.tiny_tokenizer import build_char_tokenizer

    out = str(tmp_path_factory.mktemp("qwen3tok"))
    tok = build_char_tokenizer(out)
    # As in Qwen3: im_start/im_end/endoftext special; think and tool tags added, not special.
    tok.add_tokens(QWEN3_ADDED)
    tok.chat_template = TEMPLATE
    return tok


def reference_prompt_ids(tok, messages):
    """The reference agent loop's prompt: system prompt merged in, tools, thinking off."""
    messages = [{"role": "system", "content": REFERENCE_TOOL_USE_SYSTEM_PROMPT}, *messages]
    return list(tok.apply_chat_template(messages, tools=[CODE_INTERPRETER_TOOL], add_generation_prompt=True,
                                        tokenize=True, enable_thinking=False, return_dict=False))


def reference_tool_ids(tok, text):
    """The reference's tool turn: the template of the tool message alone, minus the default
    system prompt tokens (verl's rule: one empty user turn vs two)."""
    one = tok.apply_chat_template([{"role": "user", "content": ""}], tokenize=True, return_dict=False)
    two = tok.apply_chat_template([{"role": "user", "content": ""}] * 2, tokenize=True, return_dict=False)
    system = one[:-(len(two) - len(one))]
    ids = tok.apply_chat_template([{"role": "tool", "content": text}], add_generation_prompt=True,
                                  tokenize=True, enable_thinking=False, return_dict=False)
    return list(ids)[len(system):]


class ScriptedGenerator:
    """Returns fixed assistant turns (ending with <|im_end|>) with distinct log-probs."""

    def __init__(self, tok, turns):
        end = tok.convert_tokens_to_ids("<|im_end|>")
        self.turns = [tok.encode(t, add_special_tokens=False) + [end] for t in turns]
        self.inputs = []

    async def generate(self, input_ids, sampling_params, *, return_logprob=True):
        self.inputs.append((list(input_ids), dict(sampling_params)))
        ids = self.turns[len(self.inputs) - 1]
        lps = [-0.01 * (len(self.inputs) + i) for i in range(len(ids))]
        return LocalResult(ids, lps, {"type": "stop"}, "0", len(input_ids))


def paper_agent_config(**kw) -> AgentConfig:
    opts = AgentOptions(conversation="tool_turns", enable_thinking=False, code_languages=["python", "py", ""],
                        output_style="reference", max_tool_output_tokens=0, max_tool_output_chars=256,
                        tool_output_keep="middle", tool_timeout_cap_s=45, reward_mode="any",
                        reward_scope="response")
    return AgentConfig.from_rollout_config(RolloutConfig(max_tool_turns=4, tool_timeout_s=30,
                                                         max_response_len=4000, agent=opts), **kw)


def test_prompt_and_tool_turns_match_the_reference_token_for_token(qwen3_tokenizer):
    tok = qwen3_tokenizer
    cfg = paper_agent_config()
    messages = [{"role": "user", "content": "Find $6 \\times 7$."}]
    loop = AgentLoop(tok, cfg, sandbox=SandboxPool(max_workers=2))
    try:
        prompt = loop.encode_prompt(messages)
        assert prompt == reference_prompt_ids(tok, messages)
        # A system message from the data follows the tool-use prompt, as in the reference.
        with_sys = [{"role": "system", "content": "Be terse."}, *messages]
        assert cfg.chat.render(with_sys).startswith(
            "<|im_start|>system\n" + REFERENCE_TOOL_USE_SYSTEM_PROMPT + "\n\nBe terse.\n\n# Tools")
        turns = ["Let me compute.\n```py\nprint(6*7)\n```\nRunning it.",
                 '<tool_call>\n{"name": "code_interpreter", "arguments": {"code": "print(\'ab\' * 200)", '
                 '"timeout": 99}}\n</tool_call>',
                 "So the answer is \\boxed{42}."]
        gen = ScriptedGenerator(tok, turns)
        traj = asyncio.run(loop.run_one(gen, prompt, ground_truth="42"))
    finally:
        loop.sandbox.close()
    long_out = "ab" * 200 + "\n"
    cut = long_out[:128] + "...(truncated)..." + long_out[-128:]
    assert truncate_chars(long_out, 256, "middle") == (cut, True)
    expected = (gen.turns[0] + reference_tool_ids(tok, "42\n") + gen.turns[1] + reference_tool_ids(tok, cut)
                + gen.turns[2])
    assert traj.response_ids == expected
    # Every sampled token is kept with its log-prob (mask 1); inserted ones have mask 0, lp 0.
    n0, n1 = len(gen.turns[0]), len(reference_tool_ids(tok, "42\n"))
    assert traj.loss_mask[:n0] == [1] * n0 and traj.loss_mask[n0:n0 + n1] == [0] * n1
    assert sum(traj.loss_mask) == sum(len(t) for t in gen.turns)
    sampled_lps = [lp for t in range(len(gen.turns)) for lp in
                   [-0.01 * (t + 1 + i) for i in range(len(gen.turns[t]))]]
    assert [lp for lp, m in zip(traj.rollout_log_probs, traj.loss_mask) if m] == sampled_lps
    assert all(lp == 0.0 for lp, m in zip(traj.rollout_log_probs, traj.loss_mask) if not m)
    # Each request continues exactly the running token sequence; only end-of-turn stops it.
    for inp, params in gen.inputs:
        assert inp == prompt + expected[:len(inp) - len(prompt)]
        assert params["stop_token_ids"] == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert (traj.tool_calls, traj.tool_output_truncations, traj.num_turns) == (2, 1, 3)
    assert traj.finish_reason == "stop" and traj.correct and traj.reward == 1.0
    text = tok.decode(expected)
    assert "<|im_end|><|im_start|>user\n<tool_response>\n42\n\n</tool_response><|im_end|>\n" \
           "<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>" in text


def test_reference_call_extraction_rules():
    fmt = ToolFormat(code_languages=["python", "py", ""])
    calls = find_tool_calls("a\n```\n\n```\n```python\nx = 1\n```\n```py\ny\n```", fmt)
    assert [c.code for c in calls] == ["x = 1", "y"]  # empty blocks skipped, bare fences accepted
    assert find_tool_calls("```js\nx\n```", fmt) == []
    assert find_tool_calls("```python\nx\n```", ToolFormat()) != []
    (call,) = find_tool_calls('{"name": "code_interpreter", "arguments": {"code": "```python\\nprint(2)\\n```"}}'
                              ' and ```python\nignored\n```', fmt)
    assert call.code == "print(2)" and call.timeout_s is None  # JSON calls win over fences
    assert truncate_chars("abcdef", 4, "head") == ("abcd...(truncated)", True)
    assert truncate_chars("abcdef", 4, "tail") == ("(truncated)...cdef", True)
    assert truncate_chars("abc", 4, "middle") == ("abc", False)


def test_fifth_assistant_turn_must_answer_and_budget_drops_tool_turn(qwen3_tokenizer):
    tok = qwen3_tokenizer
    code = "```python\nprint(1)\n```"
    loop = AgentLoop(tok, paper_agent_config(max_turns=1), sandbox=SandboxPool(max_workers=2))
    try:
        prompt = loop.encode_prompt([{"role": "user", "content": "q"}])
        traj = asyncio.run(loop.run_one(ScriptedGenerator(tok, [code, code]), prompt))
        assert (traj.tool_calls, traj.num_turns, traj.finish_reason) == (1, 2, "max_turns")
        # A tool turn that does not fit the response budget ends the trajectory, not appended.
        gen = ScriptedGenerator(tok, [code])
        small = AgentLoop(tok, paper_agent_config(max_response_tokens=len(gen.turns[0]) + 20),
                          sandbox=loop.sandbox)
        traj = asyncio.run(small.run_one(gen, prompt))
        assert traj.finish_reason == "length" and traj.response_ids == gen.turns[0]
    finally:
        loop.sandbox.close()
