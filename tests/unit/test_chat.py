"""Chat template and tool format: ids equal the tokenizer's own chat template; markers parse."""

from __future__ import annotations

import pytest

from ctpo_megatron.rollout.agent.chat import ChatTemplate, ToolFormat, as_tokenizer
from tests.unit._agent_models import bpe_tokenizer, tiny_tokenizer

MESSAGES = [
    {"role": "system", "content": "Solve with code."},
    {"role": "user", "content": "What is 6*7?\nThink ```carefully```."},
    {"role": "assistant", "content": "```python\nprint(6*7)\n```"},
    {"role": "user", "content": "and 2**10?"},
]


@pytest.fixture(scope="module", params=["char", "bpe"])
def hf_tokenizer(request, tmp_path_factory):
    return tiny_tokenizer(str(tmp_path_factory.mktemp("tok"))) if request.param == "char" else bpe_tokenizer()


def test_prompt_ids_equal_the_tokenizers_chat_template(hf_tokenizer):
    chat = ChatTemplate()
    expected = hf_tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert chat.encode_prompt(hf_tokenizer, MESSAGES) == list(expected)
    # The raw `tokenizers` object gives the same ids.
    assert chat.encode_prompt(hf_tokenizer.backend_tokenizer, MESSAGES) == list(expected)
    text = chat.render(MESSAGES)
    assert text.startswith("<|im_start|>system\nSolve with code.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = chat.encode_prompt(hf_tokenizer, MESSAGES)
    im_start = hf_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(im_start) == 5  # special tokens are single ids, never spelled out


def test_system_prompt_and_end_ids(hf_tokenizer):
    chat = ChatTemplate(system_prompt="Be brief.")
    assert chat.render([{"role": "user", "content": "hi"}], add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n")
    assert chat.render(MESSAGES[:1], add_generation_prompt=False).count("system") == 1  # not doubled
    assert chat.end_of_turn_ids(hf_tokenizer) == [hf_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    with pytest.raises(ValueError, match="message 0 must have a role"):
        chat.render([{"role": "robot", "content": "x"}])
    with pytest.raises(TypeError, match="transformers tokenizer"):
        as_tokenizer(object())


def test_tool_format_finds_the_first_complete_call():
    fmt = ToolFormat()
    text = "Plan.\n```python\nx = 1\nprint(x)\n```\nmore ```python\ny\n```"
    code, end = fmt.find_call(text)
    assert code == "x = 1\nprint(x)\n" and text[:end].endswith("print(x)\n```")
    assert fmt.find_call("```python\nprint(1)\n``") is None  # not closed yet
    assert fmt.find_call("inline ``` fences ``` only") is None
    xml = ToolFormat(code_open="<code>", code_close="</code>", output_open="<output>", output_close="</output>")
    assert xml.find_call("a<code>print(2)</code>b") == ("print(2)", len("a<code>print(2)</code>"))
    with pytest.raises(ValueError, match="code_close"):
        ToolFormat(code_close="")


def test_tool_output_rendering():
    fmt = ToolFormat(max_stderr_chars=14)  # len("ValueError: x\n")
    assert fmt.render_output("42\n") == "42"
    assert fmt.render_output("ok\n", "Traceback...\nValueError: x\n", exit_code=1) == "ok\nValueError: x"
    assert fmt.render_output("ok\n", "warning\n", exit_code=0) == "ok"  # stderr only on failure
    assert fmt.render_output("", "", None, timed_out=True, timeout=2.5) == \
        "TimeoutError: execution timed out after 2.5 seconds"
    assert fmt.wrap_output("42", after="```") == "\n```output\n42\n```\n"
    assert fmt.wrap_output("42", after="```\n") == "```output\n42\n```\n"
