"""Tool-interleaved multi-turn rollouts, token-in / token-out.

One trajectory (`AgentLoop.run_one`):

    ids = prompt_ids
    loop:
      generate(ids + response_ids) with stop_token_ids = tokens that can complete the
          closing marker of a code block (and end-of-turn)      -> new tokens + log-probs
      decode the current segment (tokens since the last tool output) and look for a complete
          code block; if there is one, keep only the new tokens up to the FIRST token at which
          the decoded segment contains it (binary search over prefixes), drop the rest
      no block: append all; end of turn -> "stop"; a stop token that did not close a block
          (e.g. the opening fence) or a per-call cap -> generate again; budget -> "length"
      block: run the code in the sandbox (pool, concurrent across trajectories), append the
          output block as tokens with loss-mask 0 and log-prob 0.0, continue;
          a block beyond max_turns ends the trajectory ("max_turns")

Token exactness: generated tokens are appended exactly as the server returned them (ids and
log-probs) and never decoded-and-re-encoded; only the environment's output text is encoded,
once. The trainer therefore scores the very tokens that were sampled. The kept tokens are a
prefix of what the server sampled, so their log-probs stay valid; the token that completes
the closing marker may carry extra characters (e.g. "```\\n\\n"), which are kept as sampled.
Why not stop strings: a stop string can end inside a token, and servers trim the text, not
the token list; stop ids keep the boundary on a token.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol, Sequence

from ctpo_megatron.rollout.agent.config import AgentConfig
from ctpo_megatron.rollout.agent.chat import ToolFormat, as_tokenizer, find_tool_calls, truncate_chars
from ctpo_megatron.rollout.serving.client import affinity, prompt_affinity_key
from ctpo_megatron.rollout.agent.reward import score_response
from ctpo_megatron.rollout.sandbox import SandboxPool, SandboxResult
from ctpo_megatron.rollout.agent.trajectory import Trajectory, version_number

logger = logging.getLogger(__name__)


class GenerateResultLike(Protocol):
    """What the agent reads from a generate call (SGLangClient's GenerateResult has it)."""

    output_ids: list[int]
    output_log_probs: list[float]
    finish_reason: dict | None
    weight_version: str
    """The request's weight version; `output_versions` ([R] str, optional) per token when a
    weight update landed mid-request."""


class Generator(Protocol):
    """A token-in/token-out generator: SGLangClient, or any in-process model."""

    async def generate(self, input_ids: list[int], sampling_params: dict, *,
                       return_logprob: bool = True) -> GenerateResultLike:
        """Samples a continuation of `input_ids`; returns ids (stop/eos token included) and
        one log-prob per returned id."""
        ...


_STOP_IDS_CACHE: dict[tuple, tuple[int, ...]] = {}


def tool_stop_token_ids(tokenizer: Any, fmt: ToolFormat) -> list[int]:
    """Token ids at which generation should pause to check for a finished tool call.

    If some token's text contains the whole closing marker, those tokens (except ones that
    spell the opening marker, e.g. a single "```python" token) are enough in practice: a
    sampled split of the marker over several tokens is still caught in the text after the
    request, only later. If no token contains it (e.g. a character-level vocabulary), every
    token containing the marker's last character is a stop.
    """
    tok = as_tokenizer(tokenizer)
    n = tok.vocab_size()
    raw = tok.tok
    # Scanning a 150k vocabulary takes about a second: once per tokenizer and format.
    key = (id(raw), n, fmt.code_open, fmt.code_close)
    if key in _STOP_IDS_CACHE:
        return list(_STOP_IDS_CACHE[key])
    ids = [[i] for i in range(n)]
    if hasattr(raw, "batch_decode"):
        texts = raw.batch_decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    else:
        texts = raw.decode_batch(ids, skip_special_tokens=False)
    close, opening = fmt.code_close, fmt.code_open.rstrip("\n")
    ids = [i for i, t in enumerate(texts) if close in t and opening not in t]
    if not ids:
        ids = [i for i, t in enumerate(texts) if close[-1] in t]
    _STOP_IDS_CACHE[key] = tuple(ids)
    return ids


class AgentLoop:
    """Runs trajectories against a `Generator` with a shared sandbox pool.

    tokenizer: the policy's tokenizer (transformers or `tokenizers`), used to encode prompts
        given as messages and tool outputs, and to decode segments for call detection.
    """

    def __init__(self, tokenizer: Any, cfg: AgentConfig, sandbox: SandboxPool | None = None) -> None:
        self.cfg = cfg
        self.tok = as_tokenizer(tokenizer)
        self.end_ids = set(cfg.chat.end_of_turn_ids(tokenizer))
        if not self.end_ids:
            raise ValueError(f"AgentLoop: the tokenizer has no id for the end-of-turn token "
                             f"{cfg.chat.im_end!r} and no eos token")
        # tool_turns: a turn always runs to its end; calls are parsed from the finished turn.
        auto = cfg.stop_mode == "auto" and cfg.conversation == "inline"
        stops = tool_stop_token_ids(tokenizer, cfg.tool_format) if auto else []
        self.stop_ids = sorted(self.end_ids | set(stops))
        self._own_sandbox = sandbox is None
        self.sandbox = sandbox or SandboxPool(cfg.sandbox_workers, cfg.sandbox, cfg.tool_timeout_s)

    def close(self) -> None:
        """Stops the sandbox pool if this loop created it."""
        if self._own_sandbox:
            self.sandbox.close()

    def _sampling_params(self, max_new: int, seed: int | None) -> dict:
        params = {"max_new_tokens": max_new, "temperature": self.cfg.temperature,
                  "top_p": self.cfg.top_p, "top_k": self.cfg.top_k,
                  "stop_token_ids": self.stop_ids, "skip_special_tokens": False, "no_stop_trim": True}
        if seed is not None:
            params["sampling_seed"] = seed
        return params

    def _first_call_cut(self, seg_ids: list[int], new_ids: list[int]) -> tuple[int, str] | None:
        """Smallest k such that seg_ids + new_ids[:k] decodes to text with a complete call;
        returns (k, that text) or None."""
        fmt = self.cfg.tool_format
        if fmt.find_call(self.tok.decode(seg_ids + new_ids)) is None:
            return None
        lo, hi = 1, len(new_ids)  # the predicate holds at hi and is monotone in k
        while lo < hi:
            mid = (lo + hi) // 2
            if fmt.find_call(self.tok.decode(seg_ids + new_ids[:mid])) is None:
                lo = mid + 1
            else:
                hi = mid
        return lo, self.tok.decode(seg_ids + new_ids[:lo])

    def tool_output_ids(self, segment_text: str, result: SandboxResult) -> tuple[list[int], bool]:
        """Token ids of the output block inserted after a call whose segment decodes to
        `segment_text`, and whether the output was truncated to max_tool_output_tokens."""
        fmt = self.cfg.tool_format
        body, truncated = self.tool_output_text(result)
        return self.tok.encode(fmt.wrap_output(body, after=segment_text)), truncated

    def tool_output_text(self, result: SandboxResult) -> tuple[str, bool]:
        """Text of a run's output after the character cut (`max_tool_output_chars`, keeping
        `tool_output_keep`) and the token cut (`max_tool_output_tokens`, head kept and
        marked); and whether anything was cut."""
        fmt = self.cfg.tool_format
        body = fmt.render_output(result.stdout, result.stderr, result.exit_code, result.timed_out,
                                 self.cfg.tool_timeout_s)
        body, cut_chars = truncate_chars(body, self.cfg.max_tool_output_chars, self.cfg.tool_output_keep)
        body_ids = self.tok.encode(body) if self.cfg.max_tool_output_tokens else []
        cut_tokens = 0 < self.cfg.max_tool_output_tokens < len(body_ids)
        if cut_tokens:
            body = self.tok.decode(body_ids[:self.cfg.max_tool_output_tokens]) + fmt.output_truncated
        return body, cut_chars or cut_tokens

    async def run_one(self, generator: Generator, prompt_ids: list[int], *, prompt_index: int = 0,
                      sample_index: int = 0, ground_truth: str | None = None,
                      metadata: dict | None = None) -> Trajectory:
        """One trajectory for `prompt_ids`; scored when `ground_truth` is given."""
        cfg = self.cfg
        traj = Trajectory(prompt_ids=list(prompt_ids), prompt_index=prompt_index,
                          sample_index=sample_index, ground_truth=ground_truth,
                          metadata=dict(metadata or {}))
        if cfg.conversation == "tool_turns":
            await self._run_tool_turns(generator, traj)
        else:
            await self._run_inline(generator, traj)
        traj.response_text = self.tok.decode(traj.response_ids)
        traj.check()
        if ground_truth is not None:
            await self._score(traj)
        return traj

    def _seed(self, traj: Trajectory, calls: int) -> int | None:
        cfg = self.cfg
        return None if cfg.seed is None else (
            cfg.seed * 1_000_003 + traj.prompt_index * 10_007 + traj.sample_index * 101 + calls) % (1 << 31)

    async def _generate(self, generator: Generator, traj: Trajectory, max_new: int,
                        calls: int) -> tuple[GenerateResultLike, list[int], list[float], list[str]]:
        """One request; returns the result, its output ids, log-probs and per-token versions."""
        res = await generator.generate(traj.prompt_ids + traj.response_ids,
                                       self._sampling_params(max_new, self._seed(traj, calls)),
                                       return_logprob=True)
        new_ids, new_lps = list(res.output_ids), list(res.output_log_probs)
        versions = list(getattr(res, "output_versions", None) or [res.weight_version] * len(new_ids))
        if len(new_lps) != len(new_ids) or len(versions) != len(new_ids):
            raise ValueError(f"generate returned {len(new_ids)} output_ids but {len(new_lps)} "
                             f"log-probs and {len(versions)} versions (server "
                             f"{getattr(res, 'server_url', '?')})")
        for version in versions or [res.weight_version]:
            if not traj.weight_versions or traj.weight_versions[-1] != version:
                traj.weight_versions.append(version)
        return res, new_ids, new_lps, versions

    @staticmethod
    def _append(traj: Trajectory, ids: list[int], log_probs: list[float] | None,
                versions: list[str] | None = None) -> None:
        """Appends sampled tokens (with their log-probs and weight versions, mask 1) or
        inserted ones (mask 0, version -1)."""
        traj.response_ids += ids
        traj.rollout_log_probs += [float(x) for x in log_probs] if log_probs is not None else [0.0] * len(ids)
        traj.loss_mask += [int(log_probs is not None)] * len(ids)
        traj.token_versions += [version_number(v) for v in versions] if versions is not None else [-1] * len(ids)

    async def _run_tool_turns(self, generator: Generator, traj: Trajectory) -> None:
        """The reference's layout: each assistant turn is sampled to its end-of-turn token;
        the first tool call in it is run and its output appended as a tool turn (which ends
        with the next generation prompt); at most max_turns + 1 assistant turns. A tool turn
        that does not fit the budget ends the trajectory without being appended."""
        cfg = self.cfg
        while True:
            budget = cfg.max_response_tokens - len(traj.response_ids)
            if budget <= 0:
                traj.finish_reason = "length"
                return
            res, new_ids, new_lps, versions = await self._generate(generator, traj, budget, traj.num_turns)
            turn_start = len(traj.response_ids)
            self._append(traj, new_ids, new_lps, versions)
            traj.num_turns += 1
            reason = self._finish_without_call(res, new_ids)
            if reason == "abort":
                traj.finish_reason = "abort"
                return
            if len(traj.response_ids) >= cfg.max_response_tokens or reason != "stop":
                traj.finish_reason = "length"
                return
            calls = find_tool_calls(self.tok.decode(traj.response_ids[turn_start:]), cfg.tool_format)
            if not calls:
                traj.finish_reason = "stop"
                return
            if traj.tool_calls >= cfg.max_turns:
                traj.finish_reason = "max_turns"
                return
            text = await self._call(traj, calls[0])
            ids = self.tok.encode(cfg.chat.tool_turn([text]))  # type: ignore[attr-defined]
            if len(traj.response_ids) + len(ids) >= cfg.max_response_tokens:
                traj.finish_reason = "length"
                return
            self._append(traj, ids, None)

    async def _call(self, traj: Trajectory, call: Any) -> str:
        """Runs one tool call of the tool_turns layout; returns the output text."""
        cfg = self.cfg
        traj.tool_calls += 1
        if call.name != "code_interpreter":
            traj.tool_errors += 1
            return f"Error when executing tool: {call.name!r}"
        if call.language != "python":
            traj.tool_errors += 1
            return f"sandbox blocked unsupported language: {call.language}"
        timeout = cfg.tool_timeout_s
        if call.timeout_s is not None and cfg.tool_timeout_cap_s > 0:
            timeout = min(max(1.0, float(int(call.timeout_s))), 300.0, cfg.tool_timeout_cap_s)
        result = await self.sandbox.run(call.code, timeout)
        traj.tool_timeouts += int(result.timed_out)
        traj.tool_errors += int(not result.timed_out and result.exit_code != 0)
        text, truncated = self.tool_output_text(result)
        traj.tool_output_truncations += int(truncated)
        return text

    async def _run_inline(self, generator: Generator, traj: Trajectory) -> None:
        """Our layout: tool output inserted inside the assistant turn (see the module doc)."""
        cfg = self.cfg
        seg_start = 0  # response index where the current assistant segment starts
        calls = 0
        while not traj.finish_reason:
            budget = cfg.max_response_tokens - len(traj.response_ids)
            if budget <= 0:
                traj.finish_reason = "length"
                break
            max_new = min(budget, cfg.max_tokens_per_call) if cfg.max_tokens_per_call else budget
            res, new_ids, new_lps, versions = await self._generate(generator, traj, max_new, calls)
            calls += 1
            seg_ids = traj.response_ids[seg_start:]
            cut = self._first_call_cut(seg_ids, new_ids) if new_ids else None
            keep = cut[0] if cut else len(new_ids)
            if seg_start == len(traj.response_ids) and keep > 0:
                traj.num_turns += 1  # the first tokens of a new assistant segment
            self._append(traj, new_ids[:keep], new_lps[:keep], versions[:keep])
            if cut is None:
                traj.finish_reason = self._finish_without_call(res, new_ids)
                continue
            if traj.tool_calls >= cfg.max_turns:
                traj.finish_reason = "max_turns"
                break
            await self._run_tool(traj, code=cfg.tool_format.find_call(cut[1])[0], segment_text=cut[1])
            seg_start = len(traj.response_ids)

    def _finish_without_call(self, res: GenerateResultLike, new_ids: list[int]) -> str:
        """The finish reason after a request that produced no tool call ("" = keep going)."""
        reason = res.finish_reason or {}
        kind = reason.get("type")
        if kind == "abort":
            return "abort"
        # The server includes the matched stop token in output_ids; `matched` covers one that
        # does not.
        if not new_ids or new_ids[-1] in self.end_ids or reason.get("matched") in self.end_ids:
            return "stop"
        # Paused at a marker token that closed no call, or this request's length cap (the
        # loop checks the trajectory budget): generate on.
        return ""

    async def _run_tool(self, traj: Trajectory, code: str, segment_text: str) -> None:
        result = await self.sandbox.run(code, self.cfg.tool_timeout_s)
        traj.tool_calls += 1
        traj.tool_timeouts += int(result.timed_out)
        traj.tool_errors += int(not result.timed_out and result.exit_code != 0)
        ids, truncated = self.tool_output_ids(segment_text, result)
        traj.tool_output_truncations += int(truncated)
        room = self.cfg.max_response_tokens - len(traj.response_ids)
        if len(ids) >= room:
            ids = ids[:room]
            traj.finish_reason = "length"
        self._append(traj, ids, None)

    async def _score(self, traj: Trajectory) -> None:
        res = await asyncio.to_thread(score_response, self.reward_text(traj), traj.ground_truth,
                                      self.cfg.reward, truncated=traj.finish_reason == "length")
        traj.reward, traj.correct, traj.has_boxed, traj.reward_error = (
            res.score, res.correct, res.has_boxed, res.error)

    def reward_text(self, traj: Trajectory) -> str:
        """The text the reward reads. Scope "generated": only the model's own tokens (runs of
        mask 1 joined by newlines), so a \\boxed{} printed by the code cannot score. Scope
        "response": the whole response decoded without special tokens (the reference)."""
        if self.cfg.reward.scope == "response":
            return self.tok.decode(traj.response_ids, skip_special_tokens=True)
        generated, run = [], []
        for tid, m in zip(traj.response_ids, traj.loss_mask):
            if m:
                run.append(tid)
            elif run:
                generated.append(self.tok.decode(run))
                run = []
        if run:
            generated.append(self.tok.decode(run))
        return "\n".join(generated)

    def encode_prompt(self, prompt: Sequence[int] | list[dict]) -> list[int]:
        """Token ids of a prompt given as ids (kept as is) or as chat messages."""
        if prompt and isinstance(prompt[0], dict):
            return self.cfg.chat.encode_prompt(self.tok, list(prompt))  # type: ignore[arg-type]
        if not all(isinstance(t, int) for t in prompt):
            raise TypeError("AgentLoop: a prompt must be a list of token ids or of chat messages "
                            "({'role': ..., 'content': ...})")
        return list(prompt)  # type: ignore[arg-type]

    async def run_batch(self, generator: Generator, prompts: Sequence[Sequence[int] | list[dict]], *,
                        n_samples: int = 1, ground_truths: Sequence[str | None] | None = None,
                        metadata: Sequence[dict] | None = None) -> list[Trajectory]:
        """n_samples trajectories per prompt, all concurrently; prompt-major order
        (index i * n_samples + j is prompt i, sample j). Any failure fails the batch."""
        if n_samples < 1:
            raise ValueError(f"run_batch: n_samples={n_samples} must be >= 1")
        for name, seq in (("ground_truths", ground_truths), ("metadata", metadata)):
            if seq is not None and len(seq) != len(prompts):
                raise ValueError(f"run_batch: {name} has {len(seq)} entries for {len(prompts)} prompts")
        ids = [self.encode_prompt(p) for p in prompts]
        limit = asyncio.Semaphore(self.cfg.max_concurrency or len(ids) * n_samples or 1)

        async def one(i: int, j: int) -> Trajectory:
            # Each gather item is its own task: the key covers every turn of this trajectory,
            # and the n samples of prompt i share it (one server's prefix cache).
            async with limit:
                with affinity(prompt_affinity_key(ids[i])):
                    return await self.run_one(
                        generator, ids[i], prompt_index=i, sample_index=j,
                        ground_truth=None if ground_truths is None else ground_truths[i],
                        metadata=None if metadata is None else metadata[i])

        return list(await asyncio.gather(*(one(i, j) for i in range(len(ids)) for j in range(n_samples))))


async def run_agent_batch(generator: Generator, prompts: Sequence[Sequence[int] | list[dict]],
                          cfg: AgentConfig, *, tokenizer: Any, n_samples: int = 1,
                          ground_truths: Sequence[str | None] | None = None,
                          metadata: Sequence[dict] | None = None,
                          sandbox: SandboxPool | None = None) -> list[Trajectory]:
    """Runs `n_samples` tool-interleaved trajectories per prompt concurrently (see module doc).

    prompts: token-id lists, or chat-message lists (encoded with `cfg.chat`).
    ground_truths: per prompt; when given, each trajectory is scored with the math reward.
    sandbox: a shared pool (default: one created for this call and closed after it).
    Returns prompt-major trajectories: index i * n_samples + j is prompt i, sample j.
    """
    loop = AgentLoop(tokenizer, cfg, sandbox)
    try:
        return await loop.run_batch(generator, prompts, n_samples=n_samples,
                                    ground_truths=ground_truths, metadata=metadata)
    finally:
        loop.close()


def main(argv: list[str] | None = None) -> None:
    """CLI: tool-interleaved rollouts for one prompt against running servers, as JSON lines."""
    import argparse
    import dataclasses
    import json
    import os

    parser = argparse.ArgumentParser(
        prog="python -m ctpo_megatron.rollout.agent",
        description="Runs tool-interleaved rollouts (code sandbox, math reward) for one prompt "
                    "against SGLang-API servers and prints one JSON trajectory per line.")
    parser.add_argument("--url", action="append", required=True,
                        help="server URL, e.g. http://127.0.0.1:30000 (repeat for several)")
    parser.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer/model directory")
    parser.add_argument("--prompt", required=True, help="user message")
    parser.add_argument("--system", default=None, help="system message (default: none)")
    parser.add_argument("--ground-truth", default=None, help="reference answer: scores the samples")
    parser.add_argument("-n", "--n-samples", type=int, default=1, help="samples (default 1)")
    parser.add_argument("--max-turns", type=int, default=5, help="tool calls per sample (default 5)")
    parser.add_argument("--max-response-tokens", type=int, default=2048, help="default 2048")
    parser.add_argument("--temperature", type=float, default=1.0, help="default 1.0 (0: greedy)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed base (default: none)")
    parser.add_argument("--paper", action="store_true",
                        help="the reference's setting (configs/rollout/paper.yaml): Qwen3 tool turns with its "
                             "system prompt, thinking off, 256-char outputs, any-checker reward; --system is "
                             "appended to its system prompt")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from ctpo_megatron.logging_utils import init_logging
    from ctpo_megatron.rollout.agent.chat import ChatTemplate
    from ctpo_megatron.rollout.serving.client import SGLangClient

    init_logging(0)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    cfg = AgentConfig(max_turns=args.max_turns, max_response_tokens=args.max_response_tokens,
                      temperature=args.temperature, seed=args.seed,
                      chat=ChatTemplate(system_prompt=args.system))
    if args.paper:
        from omegaconf import OmegaConf

        from ctpo_megatron.config.store import CONFIG_DIR
        from ctpo_megatron.rollout.agent.config import AgentOptions, options_fields

        paper = OmegaConf.load(os.path.join(CONFIG_DIR, "rollout", "paper.yaml"))
        opts = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(AgentOptions), paper.agent))
        cfg = dataclasses.replace(cfg, tool_timeout_s=paper.tool_timeout_s, **options_fields(opts))
        if args.system:
            cfg.chat.system_prompt = f"{cfg.chat.system_prompt}\n\n{args.system}"

    async def go() -> list[Trajectory]:
        async with SGLangClient(args.url) as client:
            return await run_agent_batch(client, [[{"role": "user", "content": args.prompt}]], cfg,
                                         tokenizer=tokenizer, n_samples=args.n_samples,
                                         ground_truths=None if args.ground_truth is None else [args.ground_truth])

    for traj in asyncio.run(go()):
        print(json.dumps(traj.to_dict()))


if __name__ == "__main__":
    main()
