"""Agent loop against a real in-process model: tool calls, masks, token-exact log-probs."""

from __future__ import annotations

import asyncio

import pytest
import torch
from tokenizers import Tokenizer, models

from ctpo_megatron.rollout.agent.loop import AgentLoop, run_agent_batch, tool_stop_token_ids
from ctpo_megatron.rollout.agent.config import AgentConfig
from ctpo_megatron.rollout.agent.chat import ToolFormat
from ctpo_megatron.rollout.sandbox import SandboxPool
from tests.unit._agent_models import DEMOS, TorchGenerator, teacher_forced_log_probs, tiny_model, trained_setup

# fp32 KV-cache decoding vs one full forward of the same model: rounding only.
LOGPROB_ATOL = 1e-5


@pytest.fixture(scope="module")
def tokenizer():
    return trained_setup()[0]


@pytest.fixture(scope="module")
def sandbox():
    with SandboxPool(max_workers=4) as pool:
        yield pool


def _trained(tokenizer):
    _, model, examples, _ = trained_setup()
    return model, examples


def assert_token_exact(model, traj):
    traj.check()
    lp = teacher_forced_log_probs(model, traj.prompt_ids, traj.response_ids)
    mask = torch.tensor(traj.loss_mask, dtype=torch.bool)
    rollout = torch.tensor(traj.rollout_log_probs)
    assert torch.allclose(lp[mask], rollout[mask], atol=LOGPROB_ATOL, rtol=0)
    assert (rollout[~mask] == 0).all()


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_trained_model_calls_tools_and_gets_scored(kind, sandbox):
    tokenizer, model, examples, _ = trained_setup(kind)
    gen = TorchGenerator(model, eos_ids=[tokenizer.convert_tokens_to_ids("<|im_end|>")])
    cfg = AgentConfig(temperature=0.0, max_response_tokens=400, tool_timeout_s=5.0)
    prompts = [[{"role": "user", "content": q}] for q, _, _ in DEMOS]
    trajs = asyncio.run(run_agent_batch(gen, prompts, cfg, tokenizer=tokenizer, sandbox=sandbox,
                                        ground_truths=[g for _, _, g in DEMOS]))
    for traj, (prompt, response, mask) in zip(trajs, examples):
        # Greedy decoding reproduces the demo, tool outputs included, token for token.
        assert traj.prompt_ids == prompt and traj.response_ids == response and traj.loss_mask == mask
        assert traj.finish_reason == "stop" and traj.weight_versions == ["0"]
        assert traj.token_versions == [0 if m else -1 for m in mask]  # tool output: -1
        assert_token_exact(model, traj)
    one, two, err = trajs
    assert (one.tool_calls, one.num_turns, one.tool_errors, one.reward, one.correct) == (1, 2, 0, 1.0, True)
    assert "```output\n42\n```" in one.response_text
    assert (two.tool_calls, two.num_turns, two.reward) == (2, 3, 1.0)
    assert "```output\nTrue\n```" in two.response_text
    assert (err.tool_calls, err.tool_errors, err.reward, err.has_boxed) == (1, 1, 0.0, True)
    assert "ZeroDivisionError: division by zero\n```" in err.response_text
    # Opening fences also hit the stop tokens: those requests resumed without a tool call.
    assert len(gen.requests) > sum(t.num_turns for t in trajs)
    for ids, params in gen.requests:
        assert params["stop_token_ids"] and params["max_new_tokens"] >= 1


def test_max_turns_and_budgets(tokenizer, sandbox):
    model, examples = _trained(tokenizer)
    gen = TorchGenerator(model, eos_ids=[tokenizer.convert_tokens_to_ids("<|im_end|>")])
    prompt = [[{"role": "user", "content": DEMOS[1][0]}]]  # the two-call demo
    loop = AgentLoop(tokenizer, AgentConfig(temperature=0.0, max_turns=1, max_response_tokens=400), sandbox)
    (traj,) = asyncio.run(loop.run_batch(gen, prompt))
    assert traj.finish_reason == "max_turns" and traj.tool_calls == 1
    assert traj.response_text.endswith("print(1024 == 2**10)\n```")  # the 2nd call is kept, not run
    assert_token_exact(model, traj)

    loop = AgentLoop(tokenizer, AgentConfig(temperature=0.0, max_response_tokens=30), sandbox)
    (traj,) = asyncio.run(loop.run_batch(gen, prompt))
    assert traj.finish_reason == "length" and len(traj.response_ids) == 30

    # Tool output cut to max_tool_output_tokens (char tokenizer: one token per character).
    loop = AgentLoop(tokenizer, AgentConfig(temperature=0.0, max_tool_output_tokens=3,
                                            max_response_tokens=400), sandbox)
    (traj,) = asyncio.run(loop.run_batch(gen, [[{"role": "user", "content": DEMOS[2][0]}]]))
    assert traj.tool_output_truncations == 1
    assert "```output\nTra\n...[output truncated]\n```" in traj.response_text

    # A per-request cap only splits requests; the result is the same trajectory.
    loop = AgentLoop(tokenizer, AgentConfig(temperature=0.0, max_tokens_per_call=7, max_response_tokens=400), sandbox)
    (traj,) = asyncio.run(loop.run_batch(gen, prompt))
    assert traj.response_ids == examples[1][1] and traj.finish_reason == "stop"


def test_sampled_batch_is_token_exact(tokenizer, sandbox):
    model = tiny_model(tokenizer, seed=1)  # random weights: arbitrary text, rare tool calls
    gen = TorchGenerator(model, eos_ids=[tokenizer.convert_tokens_to_ids("<|im_end|>")], weight_version="7")
    cfg = AgentConfig(temperature=1.0, max_response_tokens=48, max_tokens_per_call=20, seed=3)
    prompts = [[{"role": "user", "content": "hi"}], tokenizer.encode("<|im_start|>user\nx<|im_end|>\n")]
    trajs = asyncio.run(run_agent_batch(gen, prompts, cfg, tokenizer=tokenizer, n_samples=3, sandbox=sandbox))
    assert [(t.prompt_index, t.sample_index) for t in trajs] == [(i, j) for i in range(2) for j in range(3)]
    assert trajs[3].prompt_ids == prompts[1]
    for t in trajs:
        assert t.finish_reason in ("stop", "length") and t.weight_version == "7"
        assert_token_exact(model, t)
    assert len({tuple(t.response_ids) for t in trajs[:3]}) > 1  # samples differ
    again = asyncio.run(run_agent_batch(gen, prompts, cfg, tokenizer=tokenizer, n_samples=3, sandbox=sandbox))
    assert [t.response_ids for t in again] == [t.response_ids for t in trajs]  # seeded


def test_tokens_keep_the_version_that_sampled_them(tokenizer, sandbox):
    """A request that spans a weight update (the server reports per-token versions) gives
    its tokens both versions: the trajectory records each token's trainer step."""
    model, examples = _trained(tokenizer)
    gen = TorchGenerator(model, eos_ids=[tokenizer.convert_tokens_to_ids("<|im_end|>")])
    split = []

    class UpdateMidRequest:  # each request's second half sampled after an update to step_2
        async def generate(self, input_ids, sampling_params, *, return_logprob=True):
            res = await gen.generate(input_ids, sampling_params, return_logprob=return_logprob)
            half = len(res.output_ids) // 2
            res.output_versions = ["step_1"] * half + ["step_2"] * (len(res.output_ids) - half)
            split.append(res.output_versions)
            return res

    loop = AgentLoop(tokenizer, AgentConfig(temperature=0.0, max_response_tokens=400), sandbox)
    (traj,) = asyncio.run(loop.run_batch(UpdateMidRequest(), [[{"role": "user", "content": DEMOS[0][0]}]]))
    assert traj.response_ids == examples[0][1] and traj.tool_calls == 1
    sampled = [v for t, v in zip(traj.loss_mask, traj.token_versions) if t]
    assert sampled == [int(v[-1]) for versions in split for v in versions]  # every request's tokens, in order
    assert all(v == -1 for t, v in zip(traj.loss_mask, traj.token_versions) if not t)
    assert traj.weight_versions[:2] == ["step_1", "step_2"] and traj.weight_version == "step_2"


def test_stop_token_selection():
    vocab = {"```": 0, "```\n": 1, "```python": 2, "`": 3, "a": 4, "x```": 5}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="a"))
    # A single-token marker: stop on tokens containing it, but not on the opening fence.
    assert tool_stop_token_ids(tok, ToolFormat()) == [0, 1, 5]
    # No token holds the marker: every token with its last character can complete it.
    assert tool_stop_token_ids(tok, ToolFormat(code_close="`~")) == []
    assert tool_stop_token_ids(tok, ToolFormat(code_open="<code>", code_close="<a")) == [4]


def test_bad_inputs(tokenizer):
    with pytest.raises(ValueError, match="max_response_tokens"):
        AgentConfig(max_response_tokens=0)
    with pytest.raises(ValueError, match="stop_mode"):
        AgentConfig(stop_mode="regex")
    loop = AgentLoop(tokenizer, AgentConfig(), sandbox=SandboxPool(1))
    with pytest.raises(TypeError, match="token ids or of chat messages"):
        loop.encode_prompt(["hello"])
    with pytest.raises(ValueError, match="ground_truths has 1 entries for 2 prompts"):
        asyncio.run(loop.run_batch(None, [[1], [2]], ground_truths=["1"]))
    loop.sandbox.close()
