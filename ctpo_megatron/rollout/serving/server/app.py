"""The embedded server's aiohttp application: health, info and control endpoints plus the
routes of `generate.py` and `weights.py`. Shapes follow SGLang 0.5.23 (`reference/sglang-api.md`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ctpo_megatron.rollout.serving.server.bodies import BodyError, parse_body
from ctpo_megatron.rollout.serving.server.generate import handle_generate
from ctpo_megatron.rollout.serving.server.memory import memory_occupation
from ctpo_megatron.rollout.serving.server.memory import routes as memory_routes
from ctpo_megatron.rollout.serving.server.model_runner import ModelRunner
from ctpo_megatron.rollout.serving.server.sampling import SamplingParams
from ctpo_megatron.rollout.serving.server.scheduler import Request, Scheduler
from ctpo_megatron.rollout.serving.server.tp import TPRanks
from ctpo_megatron.rollout.serving.server.weights import routes as weight_routes

logger = logging.getLogger(__name__)

SERVER_VERSION = "ctpo-embedded-0.1 (SGLang 0.5.23 HTTP subset)"
HEALTH_CHECK_TIMEOUT_S = 20.0


@dataclass
class ServerState:
    """Everything the handlers share (one per process)."""

    scheduler: Scheduler
    args: dict[str, Any]
    seed: int = 0
    counter: list[int] = field(default_factory=lambda: [0])
    session_open: bool = False
    tp: TPRanks = field(default_factory=lambda: TPRanks(1))
    group_timeout_s: float = 600.0
    groups: dict[str, list[Any]] = field(default_factory=dict)
    """group name -> the group of each TP rank."""
    recv_buffers: list[dict[str, Any]] = field(default_factory=list)
    """per TP rank: reused receive buffers."""
    startup_time: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.recv_buffers = [{} for _ in range(self.tp.size)]


routes = web.RouteTableDef()


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    state = request.app["state"]
    alive = state.scheduler._thread.is_alive()
    return web.Response(status=200 if alive else 503)


@routes.get("/health_generate")
async def health_generate(request: web.Request) -> web.Response:
    """Like SGLang: a 1-token greedy generation of input_ids=[0]; 200 at once when busy."""
    scheduler = request.app["state"].scheduler
    if not scheduler._thread.is_alive() or scheduler.released:  # released memory: cannot generate
        return web.Response(status=503)
    if not scheduler.is_idle():
        return web.Response(status=200)
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    req = Request(input_ids=[0], params=SamplingParams.from_json({"max_new_tokens": 1, "temperature": 0.0}),
                  rid=f"HEALTH_CHECK_{uuid.uuid4().hex}")
    req.notify = lambda r, final: final and loop.call_soon_threadsafe(
        lambda: done.done() or done.set_result(None))
    scheduler.submit([req])
    try:
        await asyncio.wait_for(done, HEALTH_CHECK_TIMEOUT_S)
    except asyncio.TimeoutError:
        scheduler.abort(rid=req.rid)
        return web.Response(status=503)
    return web.Response(status=200)


@routes.get("/ready")
async def ready(request: web.Request) -> web.Response:
    return web.Response(status=503 if request.app["state"].scheduler.paused else 200)


def _model_info(state: ServerState) -> dict:
    runner = state.scheduler.runner
    return {
        "model_path": runner.model_path, "served_model_name": runner.model_path,
        "tokenizer_path": None, "is_generation": True, "preferred_sampling_params": None,
        "weight_version": state.scheduler.weight_version, "load_format": "auto",
        "reasoning_parser": None, "tool_call_parser": None, "disaggregation_mode": "null",
        "has_image_understanding": False, "has_audio_understanding": False,
        "model_type": getattr(runner.config, "model_type", None),
        "architectures": getattr(runner.config, "architectures", None),
    }


@routes.get("/model_info")
@routes.get("/get_model_info")
async def model_info(request: web.Request) -> web.Response:
    return web.json_response(_model_info(request.app["state"]))


@routes.get("/server_info")
@routes.get("/get_server_info")
async def server_info(request: web.Request) -> web.Response:
    state = request.app["state"]
    runner = state.scheduler.runner
    info = dict(state.args)
    info.update(
        model_path=runner.model_path, max_context_length=runner.context_length,
        max_total_num_tokens=runner.context_length * state.scheduler.max_batch_size,
        max_running_requests=state.scheduler.max_batch_size, skip_tokenizer_init=True,
        weight_version=state.scheduler.weight_version, startup_time=state.startup_time,
        version=SERVER_VERSION, frontend="python", device=str(runner.device),
        tp_size=state.tp.size, tp_ranks=state.tp.as_list(),
        memory_occupation=memory_occupation(state.scheduler),
        internal_states=[{"paused": state.scheduler.paused, "idle": state.scheduler.is_idle()}])
    return web.json_response(info)


@routes.route("*", "/flush_cache")
async def flush_cache(request: web.Request) -> web.Response:
    if request.method not in ("GET", "POST"):
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "POST"])
    scheduler = request.app["state"].scheduler
    timeout = float(request.query.get("timeout", 0.0))
    deadline = time.monotonic() + timeout
    while not scheduler.can_flush() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if scheduler.can_flush():
        scheduler.flush_prefix_cache()
        return web.Response(text="Cache flushed.\nPlease check backend logs for more details. (When there "
                                 "are running or waiting requests, the operation will not be performed.)\n")
    return web.Response(text="Flush cache failed: requests are running or waiting.\n", status=400)


async def _control_body(request: web.Request, endpoint: str):
    try:
        return await parse_body(request, endpoint), None
    except BodyError as e:
        return None, e.response


@routes.post("/abort_request")
async def abort_request(request: web.Request) -> web.Response:
    body, error = await _control_body(request, "abort_request")
    if error:
        return error
    if body["rid"] or body["abort_all"]:
        request.app["state"].scheduler.abort(rid=body["rid"] or "", abort_all=body["abort_all"])
    return web.Response(status=200)


@routes.post("/pause_generation")
async def pause_generation(request: web.Request) -> web.Response:
    body, error = await _control_body(request, "pause_generation")
    if error:
        return error
    await asyncio.to_thread(request.app["state"].scheduler.pause, body["mode"])
    return web.json_response({"message": "Generation paused successfully.", "status": "ok"})


@routes.post("/continue_generation")
async def continue_generation(request: web.Request) -> web.Response:
    body, error = await _control_body(request, "continue_generation")
    if error:
        return error
    request.app["state"].scheduler.resume()
    return web.json_response({"message": "Generation continued successfully.", "status": "ok"})


def build_app(state: ServerState) -> web.Application:
    """The aiohttp application serving `state` (bodies up to 4 GiB for weight payloads)."""
    app = web.Application(client_max_size=4 << 30)
    app["state"] = state
    app.router.add_route("POST", "/generate", handle_generate)
    app.router.add_route("PUT", "/generate", handle_generate)
    app.add_routes(routes)
    app.add_routes(weight_routes)
    app.add_routes(memory_routes)

    async def on_cleanup(app: web.Application) -> None:
        await asyncio.to_thread(state.scheduler.shutdown)

    app.on_cleanup.append(on_cleanup)
    return app


def make_state(*, model: str, seed: int = 0, max_batch_size: int = 32, dtype: str = "float32",
               device: str = "cpu", weight_version: str = "default", tp_size: int = 1,
               rank_digests: bool = False, **args: Any) -> ServerState:
    """Loads the model and starts the scheduler thread; `tp_size` weight-update ranks."""
    runner = ModelRunner(model, dtype=dtype, device=device, seed=seed)
    scheduler = Scheduler(runner, max_batch_size=max_batch_size, weight_version=weight_version)
    all_args = dict(model_path=model, random_seed=seed, max_batch_size=max_batch_size, dtype=dtype,
                    device=device, **args)
    return ServerState(scheduler=scheduler, args=all_args, seed=seed, tp=TPRanks(tp_size, rank_digests))
