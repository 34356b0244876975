"""`/release_memory_occupation` and `/resume_memory_occupation` of the embedded server: SGLang
0.5.23's memory saver (`--enable-memory-saver`), with which a server shares its GPUs with a
trainer (`rollout.placement=colocated`).

SGLang's rules (`scheduler_update_weights_mixin.py`), kept here:
* `tags` names memory regions: `weights`, `kv_cache`, `cuda_graph`; null or [] means all three.
* Release needs an idle server: with requests running or waiting it fails with SGLang's
  assertion message ("... only when no ongoing request."), a 400 `{"error": {"message"}}`.
* Releasing `weights` discards them; resuming reallocates them *without* their values (no CPU
  backup): the caller pushes fresh weights next. Releasing `kv_cache` drops the cache.
* Resuming a region that is not released fails (SGLang: a KeyError from its tag set).
* Success: HTTP 200 with a `null` body (SGLang's handler returns nothing).

Where this server differs, it is to fail clearly where SGLang would read unmapped memory: while
any region is released a `/generate` is refused (400), a weight update or `/get_weights_by_name`
while `weights` are released fails, resumed weights are NaN until updated, and an unknown tag
is refused. The freed bytes are visible in `/server_info` `memory_occupation`.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from ctpo_megatron.rollout.serving.server.bodies import BodyError, parse_body
from ctpo_megatron.rollout.serving.server.scheduler import Scheduler

logger = logging.getLogger(__name__)
routes = web.RouteTableDef()

MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")
"""SGLang's `GPU_MEMORY_ALL_TYPES` (`srt/constants.py`): what tags null / [] stand for."""
NOT_IDLE = "release_memory_occupation should be called only when no ongoing request."


def _error(message: str) -> web.Response:
    """SGLang's `_create_error_response`: 400 `{"error": {"message": ...}}`."""
    return web.json_response({"error": {"message": message}}, status=400)


async def _tags(request: web.Request, endpoint: str) -> tuple[frozenset[str] | None, web.Response | None]:
    try:
        body = await parse_body(request, endpoint)
    except BodyError as e:
        return None, e.response
    tags = body["tags"] or list(MEMORY_TAGS)
    unknown = [t for t in tags if t not in MEMORY_TAGS]
    if unknown:
        return None, _error(f"{endpoint}: unknown tags {unknown}; SGLang's memory regions are "
                            f"{list(MEMORY_TAGS)} (null or [] for all)")
    return frozenset(tags), None


def memory_occupation(scheduler: Scheduler) -> dict:
    """What `/server_info` reports: released regions and the bytes the weights hold now."""
    return {"released": sorted(scheduler.released), "weight_bytes": scheduler.runner.weight_bytes()}


@routes.route("*", "/release_memory_occupation")
async def release_memory_occupation(request: web.Request) -> web.Response:
    if request.method not in ("GET", "POST"):
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "POST"])
    tags, error = await _tags(request, "release_memory_occupation")
    if error:
        return error
    scheduler = request.app["state"].scheduler
    if not scheduler.mark_released(tags):
        return _error(NOT_IDLE)
    if "kv_cache" in tags:
        scheduler.flush_prefix_cache()
    if "weights" in tags:
        await asyncio.to_thread(scheduler.runner.release_weights)
    logger.info("memory released: %s (weights now hold %d bytes)", sorted(tags), scheduler.runner.weight_bytes())
    return web.json_response(None)


@routes.route("*", "/resume_memory_occupation")
async def resume_memory_occupation(request: web.Request) -> web.Response:
    if request.method not in ("GET", "POST"):
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "POST"])
    tags, error = await _tags(request, "resume_memory_occupation")
    if error:
        return error
    scheduler = request.app["state"].scheduler
    not_released = sorted(tags - scheduler.released)
    if not_released:
        return _error(f"resume_memory_occupation: {not_released} not released (released: "
                      f"{sorted(scheduler.released)})")
    if "weights" in tags:
        await asyncio.to_thread(scheduler.runner.resume_weights)
    scheduler.mark_resumed(tags)
    logger.info("memory resumed: %s (still released: %s)", sorted(tags), sorted(scheduler.released))
    return web.json_response(None)
