"""Agent loop end to end through the real HTTP path: SGLangClient -> embedded server
(`python -m ctpo_megatron.rollout.serving.server`) -> the tool-trained tiny model."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from ctpo_megatron.data.tiny_model import save_tiny_model
from ctpo_megatron.rollout.agent.loop import run_agent_batch
from ctpo_megatron.rollout.agent.config import AgentConfig
from ctpo_megatron.rollout.serving.client import SGLangClient
from ctpo_megatron.rollout.serving.launcher import LaunchConfig, ServerGroup
from ctpo_megatron.rollout.sandbox import SandboxPool
from tests.unit._agent_models import DEMOS, trained_setup
from tests.unit.test_agent import assert_token_exact


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    tokenizer, model, _, _ = trained_setup()
    path = save_tiny_model(model, tokenizer, str(tmp_path_factory.mktemp("model")))
    cfg = LaunchConfig(model_path=path, num_servers=1, health_timeout_s=120,
                       log_dir=str(tmp_path_factory.mktemp("logs")), env={"OMP_NUM_THREADS": "1"})
    with ServerGroup(cfg) as group:
        yield group.worker_urls[0]


def test_tool_rollouts_over_http_are_token_exact(server_url):
    tokenizer, model, examples, _ = trained_setup()
    prompts = [[{"role": "user", "content": q}] for q, _, _ in DEMOS]

    async def go(cfg, n):
        async with SGLangClient([server_url]) as client:
            with SandboxPool(max_workers=4) as pool:
                return await run_agent_batch(client, prompts, cfg, tokenizer=tokenizer, n_samples=n,
                                             ground_truths=[g for _, _, g in DEMOS], sandbox=pool)

    greedy = asyncio.run(go(AgentConfig(temperature=0.0, max_response_tokens=400), 1))
    for traj, (prompt, response, mask) in zip(greedy, examples):
        # The server's greedy tokens are the demo's, tool outputs inserted by our sandbox.
        assert traj.prompt_ids == prompt and traj.response_ids == response and traj.loss_mask == mask
        assert traj.finish_reason == "stop" and traj.weight_versions == ["default"]
        assert_token_exact(model, traj)
    assert [t.reward for t in greedy] == [1.0, 1.0, 0.0]
    assert [t.tool_calls for t in greedy] == [1, 2, 1]

    sampled = asyncio.run(go(AgentConfig(temperature=1.0, max_response_tokens=200, seed=5), 2))
    assert len(sampled) == 6
    for traj in sampled:
        assert_token_exact(model, traj)  # temperature 1: the server's log-probs are the raw ones


def test_cli_prints_scored_trajectories(server_url):
    _, _, examples, tok_dir = trained_setup()
    out = subprocess.run(
        [sys.executable, "-m", "ctpo_megatron.rollout.agent", "--url", server_url, "--tokenizer", tok_dir,
         "--prompt", DEMOS[0][0], "--ground-truth", DEMOS[0][2], "--temperature", "0", "-n", "2"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["response_ids"] == examples[0][1] and row["reward"] == 1.0 and row["tool_calls"] == 1


def test_cli_paper_setting_renders_the_reference_prompt(server_url):
    from ctpo_megatron.rollout.agent.chat import REFERENCE_TOOL_USE_SYSTEM_PROMPT

    _, _, _, tok_dir = trained_setup()
    out = subprocess.run(
        [sys.executable, "-m", "ctpo_megatron.rollout.agent", "--url", server_url, "--tokenizer", tok_dir,
         "--prompt", DEMOS[0][0], "--temperature", "0", "--max-response-tokens", "32", "--paper"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    (row,) = [json.loads(line) for line in out.stdout.splitlines()]
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(tok_dir).decode(row["prompt_ids"])
    assert prompt.startswith("<|im_start|>system\n" + REFERENCE_TOOL_USE_SYSTEM_PROMPT + "\n\n# Tools")
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert row["finish_reason"] in ("stop", "length", "max_turns")
