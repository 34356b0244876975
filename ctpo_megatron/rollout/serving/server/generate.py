"""`POST /generate` of the embedded server: SGLang 0.5.23's request handling and response shapes.

Order as in SGLang: the body passes SGLang's schema gate (`contract.validate_generate_request`,
400 `{"error": "<message>"}`), then normalization / range checks (ValueError → 400
`{"error": {"message": ...}}`), then generation. Token-in/token-out only (like a server started
with `--skip-tokenizer-init`): `text` inputs are refused and responses carry no `text`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from aiohttp import web

from ctpo_megatron.rollout.serving.contract import ContractError, validate_generate_request
from ctpo_megatron.rollout.serving.server.sampling import SamplingParams
from ctpo_megatron.rollout.serving.server.scheduler import Request, Scheduler


def _per_item(value: Any, batch: int, name: str) -> list[Any]:
    if isinstance(value, list):
        if len(value) != batch:
            raise ValueError(f"{name} has {len(value)} entries but the batch has {batch} inputs")
        return value
    return [value] * batch


def build_requests(body: dict, scheduler: Scheduler, seed_base: int,
                   counter: list[int]) -> tuple[list[Request], bool]:
    """Turns a contract-checked body into Requests (prompt-major for n > 1); returns (reqs, is_batch)."""
    if body.get("text") is not None or body.get("input_embeds") is not None:
        raise ValueError("this server is token-in/token-out (like --skip-tokenizer-init): "
                         "send input_ids, not text")
    ids = body.get("input_ids")
    if ids is None:
        raise ValueError("Either text, input_ids or input_embeds should be provided.")
    is_batch = bool(ids) and isinstance(ids[0], list)
    prompts = ids if is_batch else [ids]
    vocab = scheduler.runner.vocab_size
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"input_ids[{i}] is empty" if is_batch else "input_ids is empty")
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"input_ids contain token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
    n_items = len(prompts)
    raw_params = _per_item(body.get("sampling_params") or {}, n_items, "sampling_params")
    params = [SamplingParams.from_json(p) for p in raw_params]
    n = params[0].n
    if any(p.n != n for p in params):
        raise ValueError("The n parameter must be the same for all sampling_params in a batch.")
    return_logprob = _per_item(body.get("return_logprob") or False, n_items, "return_logprob")
    start_len = body.get("logprob_start_len")
    start_len = _per_item(-1 if start_len is None else start_len, n_items, "logprob_start_len")
    if n > 1 and any(isinstance(body.get(k), list) for k in ("return_logprob", "logprob_start_len")):
        raise ValueError("list-valued logprob fields cannot be combined with n > 1")
    rid = body.get("rid")
    if isinstance(rid, list):
        rids = _per_item(rid, n_items, "rid")
    elif rid is not None:
        rids = [f"{rid}_{i}" for i in range(n_items)] if is_batch else [rid]
    else:
        rids = [uuid.uuid4().hex for _ in range(n_items)]
    requests = []
    for i, prompt in enumerate(prompts):
        for j in range(n):
            p = params[i]
            # Sample j of a seeded request uses seed + j, so n samples differ but stay reproducible.
            if p.sampling_seed is not None:
                seed = p.sampling_seed + j
            else:
                counter[0] += 1
                seed = hash((seed_base, counter[0])) & 0x7FFFFFFF
            requests.append(Request(
                input_ids=list(prompt), params=p, rid=rids[i] if n == 1 else uuid.uuid4().hex,
                return_logprob=bool(return_logprob[i]), logprob_start_len=int(start_len[i]), seed=seed))
    return requests, is_batch or n > 1


def version_spans(versions: list[str], current: str) -> list[dict[str, Any]]:
    """SGLang's `meta_info.weight_versions`: `{version, start, end}` spans (end exclusive) of the
    output tokens each weight version sampled, in order; `[{current, 0, 0}]` without output."""
    spans: list[dict[str, Any]] = []
    for i, version in enumerate(versions):
        if spans and spans[-1]["version"] == version:
            spans[-1]["end"] = i + 1
        else:
            spans.append({"version": version, "start": i, "end": i + 1})
    return spans or [{"version": current, "start": 0, "end": 0}]


def response_of(req: Request, *, index: int | None = None, upto: int | None = None,
                final: bool = True) -> dict:
    """SGLang's response object for one request: cumulative output, its first `upto` tokens."""
    upto = len(req.output_ids) if upto is None else upto
    output_ids = req.output_ids[:upto]
    meta: dict[str, Any] = {
        "id": req.rid, "finish_reason": req.finish_reason if final else None,
        "prompt_tokens": len(req.input_ids), "completion_tokens": upto,
        "cached_tokens": req.cached_tokens,
        "reasoning_tokens": 0, "weight_version": req.weight_version,
        "num_retractions": req.num_retractions,
        "weight_versions": version_spans(req.output_versions[:upto], req.weight_version),
    }
    if req.return_logprob:
        meta["output_token_logprobs"] = [[lp, tok, None] for lp, tok in
                                         zip(req.output_logprobs[:upto], output_ids)]
        meta["output_token_logprobs_length"] = upto
        if req.input_logprobs is not None:
            offset = len(req.input_ids) - len(req.input_logprobs)
            meta["input_token_logprobs"] = [[lp, req.input_ids[offset + k], None]
                                            for k, lp in enumerate(req.input_logprobs)]
    if final and req.finished:
        meta["e2e_latency"] = time.monotonic() - req.created
    out = {"output_ids": output_ids, "meta_info": meta}
    if index is not None:
        out["index"] = index
    return out


async def handle_generate(request: web.Request) -> web.StreamResponse:
    state = request.app["state"]
    try:
        body = await request.json()
    except json.JSONDecodeError as e:
        return web.json_response({"error": f"invalid JSON body: {e}"}, status=400)
    try:
        validate_generate_request(body)
    except ContractError as e:
        return web.json_response({"error": str(e)}, status=400)
    try:
        reqs, is_list = build_requests(body, state.scheduler, state.seed, state.counter)
    except ValueError as e:
        return web.json_response({"error": {"message": str(e)}}, status=400)

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def notify(req: Request, final: bool) -> None:
        # Runs on the scheduler thread: record how many tokens this event covers right now.
        loop.call_soon_threadsafe(queue.put_nowait, (req, final, len(req.output_ids)))

    for req in reqs:
        req.notify = notify
        req.stream = bool(body.get("stream"))
    try:
        state.scheduler.submit(reqs)
    except ValueError as e:
        return web.json_response({"error": {"message": str(e)}}, status=400)
    index_of = {id(r): i for i, r in enumerate(reqs)}
    if body.get("stream"):
        return await _stream(request, state, reqs, queue, index_of, is_list)
    pending = len(reqs)
    try:
        while pending:
            _, final, _ = await queue.get()
            pending -= int(final)
    except asyncio.CancelledError:
        for req in reqs:
            state.scheduler.abort(rid=req.rid, message="client disconnected")
        raise
    outs = [response_of(r) for r in reqs]
    for r, out in zip(reqs, outs):
        reason = r.finish_reason or {}
        if reason.get("type") == "abort" and (reason.get("status_code") or 0) >= 400:
            return web.json_response({"error": {"message": reason.get("message", "aborted")}},
                                     status=reason["status_code"])
    return web.json_response(outs if is_list else outs[0])


async def _stream(request: web.Request, state, reqs: list[Request], queue: asyncio.Queue,
                  index_of: dict, is_list: bool) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    pending = len(reqs)
    try:
        while pending:
            req, final, upto = await queue.get()
            pending -= int(final)
            chunk = response_of(req, index=index_of[id(req)] if is_list else None, upto=upto,
                                final=final)
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
    except (asyncio.CancelledError, ConnectionResetError):
        for req in reqs:
            state.scheduler.abort(rid=req.rid, message="client disconnected")
        raise
    await resp.write_eof()
    return resp
