"""Weight endpoints of the embedded server, with SGLang 0.5.23's session rules and responses.

* `/update_weights_from_disk`: an HF safetensors directory; no session needed.
* `/begin_weight_update` ... `/end_weight_update`: the session that `/update_weights_from_tensor`
  and `/update_weights_from_distributed` need (outside it: 400 `success=false`).
* `/init_weights_update_group` + `/update_weights_from_distributed`: the trainer is rank 0 of a
  separate group and broadcasts full HF-named tensors (per tensor, or one `flattened_bucket`
  uint8 buffer). On CPU the group uses gloo (`backend="nccl"` is mapped to gloo when CUDA is
  absent).
* `/update_weights_from_tensor`: one `serialized_named_tensors` entry per TP rank, each rank
  decodes its own. An entry is SGLang's format (base64 `MultiprocessingSerializer` pickle,
  tensors by shared-memory handle, decoded with a restricted unpickler) or, an extension for
  hosts that share no memory, `base64(safetensors bytes)` (data by value). `load_format` must
  be null or "direct" (both load by name).

With `--tp-size N` every call above runs on the server's N ranks (`tp.py`): each joins the group
at `rank_offset + tp_rank` and receives every broadcast, as SGLang's ranks do.

Every successful update records `weight_version` (when given), and with `flush_cache=true`
fails like SGLang does when requests are still running.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading

from aiohttp import web
from safetensors.torch import load as load_safetensors
from ctpo_megatron.rollout.weight_sync.serialization import decode_named_tensors

from ctpo_megatron.rollout.serving.server.bodies import BodyError, parse_body
from ctpo_megatron.rollout.serving.server.receive import comm_device, receive_flattened, receive_into_model
from ctpo_megatron.rollout.weight_sync.process_group import (SideGroup, destroy_custom_process_group,
                                                             resolve_backend)

logger = logging.getLogger(__name__)
routes = web.RouteTableDef()

_FLUSH_FAILED = ("Weights were updated, but the cache was not flushed because requests are still "
                 "running or queued. Retract or finish them, then call /flush_cache.")


def _reply(success: bool, message: str, **extra) -> web.Response:
    return web.json_response({"success": success, "message": message, **extra},
                             status=200 if success else 400)


async def _body(request: web.Request, endpoint: str):
    try:
        return await parse_body(request, endpoint), None
    except BodyError as e:
        return None, e.response


async def _apply(request: web.Request, body: dict, load_fn) -> tuple[bool, str]:
    """Runs `load_fn()` under the model-update lock, then records the version and flushes."""
    state = request.app["state"]
    if state.scheduler.runner.weights_released:
        return False, ("Failed to update weights: the weights are released (release_memory_occupation); "
                       "call resume_memory_occupation with tag 'weights' first")
    if body.get("abort_all_requests"):
        state.scheduler.abort(abort_all=True, message="Abort by weight update")

    def run() -> str:
        with state.scheduler.exclusive():
            message = load_fn()
            # Still under the lock: every token sampled with these weights carries the version.
            if body.get("weight_version") is not None:
                state.scheduler.set_weight_version(body["weight_version"])
            return message

    try:
        message = await asyncio.to_thread(run)
    except Exception as e:  # noqa: BLE001 - reported to the caller as success=false
        logger.error("weight update failed: %s", e)
        return False, f"Failed to update weights: {e}"
    if body.get("weight_version") is not None:
        logger.info("weights updated to version %s (%s)", body["weight_version"], message)
    if body.get("flush_cache", True):
        if not state.scheduler.can_flush():
            return False, _FLUSH_FAILED
        state.scheduler.flush_prefix_cache()
    return True, message


@routes.post("/update_weights_from_disk")
async def update_weights_from_disk(request: web.Request) -> web.Response:
    body, error = await _body(request, "update_weights_from_disk")
    if error:
        return error
    if body["load_format"] not in (None, "auto", "safetensors"):
        return _reply(False, f"load_format {body['load_format']!r} is not supported by the embedded "
                             "server (auto / safetensors)", num_paused_requests=0)
    runner = request.app["state"].scheduler.runner

    def load() -> str:
        count = runner.load_from_disk(body["model_path"])
        return f"Succeeded to update model weights ({count} tensors)."

    success, message = await _apply(request, body, load)
    return _reply(success, message, num_paused_requests=0)


@routes.post("/begin_weight_update")
async def begin_weight_update(request: web.Request) -> web.Response:
    body, error = await _body(request, "begin_weight_update")
    if error:
        return error
    state = request.app["state"]
    if state.session_open:
        return _reply(False, "a weight-update session is already open; call end_weight_update() first")
    state.session_open = True
    state.tp.reset()
    return _reply(True, "Success")


@routes.post("/end_weight_update")
async def end_weight_update(request: web.Request) -> web.Response:
    body, error = await _body(request, "end_weight_update")
    if error:
        return error
    state = request.app["state"]
    if not state.session_open:
        return _reply(False, "no weight-update session is open; call begin_weight_update() first")
    state.session_open = False
    return _reply(True, "Success")


@routes.post("/update_weights_from_tensor")
async def update_weights_from_tensor(request: web.Request) -> web.Response:
    body, error = await _body(request, "update_weights_from_tensor")
    if error:
        return error
    state = request.app["state"]
    if not state.session_open:
        return _reply(False, "update_weights_from_tensor must run between begin_weight_update() "
                             "and end_weight_update()")
    if body["load_format"] not in (None, "direct"):
        return _reply(False, f"load_format {body['load_format']!r} is not supported by the embedded "
                             "server: entries are base64 safetensors bytes (load_format null or 'direct')")
    entries = body["serialized_named_tensors"]
    tp = state.tp
    if len(entries) < tp.size or not all(isinstance(e, str) for e in entries):
        return _reply(False, f"serialized_named_tensors must hold one base64 string per TP rank: "
                             f"got {len(entries)} entries, this server has tp_size {tp.size}")

    def load() -> str:
        def decode(tp_rank: int) -> list:
            tensors = decode_entry(entries[tp_rank])
            tp.record(tp_rank, [t for _, t in tensors])
            return tensors

        decoded = tp.run(decode)
        count = state.scheduler.runner.load_weights(decoded[0])
        return f"Success ({count} tensors)"

    return _reply(*await _apply(request, body, load))


def decode_entry(entry: str) -> list:
    """One `serialized_named_tensors` entry: SGLang's pickle format, or base64 safetensors."""
    raw = base64.b64decode(entry[:8] + "=" * (-len(entry[:8]) % 4))[:1]
    if raw == b"\x80":  # a pickle: SGLang's MultiprocessingSerializer format
        return decode_named_tensors(entry)
    return list(load_safetensors(base64.b64decode(entry)).items())


@routes.post("/init_weights_update_group")
async def init_weights_update_group(request: web.Request) -> web.Response:
    body, error = await _body(request, "init_weights_update_group")
    if error:
        return error
    state = request.app["state"]
    name = body["group_name"]
    if name in state.groups:
        return _reply(False, f"Failed to initialize custom process group: group {name!r} exists.")

    def join(tp_rank: int):
        return SideGroup(
            master_address=body["master_address"], master_port=body["master_port"],
            rank=body["rank_offset"] + tp_rank, world_size=body["world_size"], group_name=name,
            backend=resolve_backend(body["backend"]), timeout_s=state.group_timeout_s)

    try:
        state.groups[name] = await asyncio.to_thread(state.tp.run, join)
    except Exception as e:  # noqa: BLE001 - reported to the caller as success=false
        return _reply(False, f"Failed to initialize custom process group: {e}.")
    return _reply(True, "Succeeded to initialize custom process group.")


@routes.post("/destroy_weights_update_group")
async def destroy_weights_update_group(request: web.Request) -> web.Response:
    body, error = await _body(request, "destroy_weights_update_group")
    if error:
        return error
    pgs = request.app["state"].groups.pop(body["group_name"], None)
    if pgs is None:
        return _reply(False, "The group to be destroyed does not exist.")
    # In the background: a group whose broadcast failed may still have a receive pending, and
    # tearing it down waits for that.
    for pg in pgs:
        threading.Thread(target=destroy_custom_process_group, args=(pg,), daemon=True).start()
    return _reply(True, "Succeeded to destroy custom process group.")


@routes.post("/update_weights_from_distributed")
async def update_weights_from_distributed(request: web.Request) -> web.Response:
    body, error = await _body(request, "update_weights_from_distributed")
    if error:
        return error
    state = request.app["state"]
    if not state.session_open:
        return _reply(False, "update_weights_from_distributed must run between begin_weight_update() "
                             "and end_weight_update()")
    pgs = state.groups.get(body["group_name"])
    if pgs is None:
        return _reply(False, f"Failed to receive weights: Group {body['group_name']} not in "
                             f"{list(state.groups)}. Please call `init_weights_update_group` first.")
    names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
    if not len(names) == len(dtypes) == len(shapes):
        return _reply(False, f"names ({len(names)}), dtypes ({len(dtypes)}) and shapes "
                             f"({len(shapes)}) must have the same length")
    runner, tp = state.scheduler.runner, state.tp
    if body["load_format"] == "flattened_bucket":
        def receive(tp_rank: int) -> list:
            received = receive_flattened(pgs[tp_rank], names, dtypes, shapes,
                                         state.recv_buffers[tp_rank], comm_device(pgs[tp_rank], runner))
            tp.record(tp_rank, [t for _, t in received])
            return received

        try:
            # Receive outside the model lock (the broadcast must not wait for generation), then load.
            received = (await asyncio.to_thread(tp.run, receive))[0]
        except Exception as e:  # noqa: BLE001 - reported to the caller as success=false
            return _reply(False, f"Failed to receive weights: {e}")

        def load() -> str:
            runner.load_weights(received)
            return "Succeeded to update parameter online."

        success, message = await _apply(request, body, load)
    else:
        # Per tensor: rank 0 receives straight into the parameters, under the model-update lock.
        def load() -> str:
            def receive(tp_rank: int) -> None:
                tensors = receive_into_model(pgs[tp_rank], names, dtypes, shapes, runner,
                                             into_model=tp_rank == 0)
                tp.record(tp_rank, tensors)

            tp.run(receive)
            return "Succeeded to update parameter online."

        success, message = await _apply(request, body, load)
    return _reply(success, message)


@routes.post("/update_weight_version")
async def update_weight_version(request: web.Request) -> web.Response:
    body, error = await _body(request, "update_weight_version")
    if error:
        return error
    state = request.app["state"]
    if body["abort_all_requests"]:
        state.scheduler.abort(abort_all=True, message="Abort by update_weight_version")
    state.scheduler.set_weight_version(body["new_version"])
    return web.json_response({"success": True, "message": f"Weight version updated to {body['new_version']}",
                              "new_version": body["new_version"]})


@routes.route("*", "/get_weights_by_name")
async def get_weights_by_name(request: web.Request) -> web.Response:
    if request.method not in ("GET", "POST"):
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "POST"])
    body, error = await _body(request, "get_weights_by_name")
    if error:
        return error
    runner = request.app["state"].scheduler.runner
    if runner.weights_released:
        return web.json_response({"error": {"message": "Get parameter by name failed: the weights are "
                                                       "released (release_memory_occupation)"}}, status=400)
    try:
        with runner.lock:
            values = runner.parameter(body["name"]).detach().float().cpu().tolist()
    except KeyError as e:
        return web.json_response({"error": {"message": f"Get parameter by name failed: {e}"}}, status=400)
    if isinstance(values, list):
        values = values[: body["truncate_size"]]
    return web.json_response(values)
