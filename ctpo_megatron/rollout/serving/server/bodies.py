"""JSON bodies of SGLang's control endpoints (`srt/managers/io_struct.py` in 0.5.23).

SGLang parses them into structs by field name: unknown keys are ignored, a missing required
field or a wrong type is a 400 in FastAPI's validation shape, and a POST without a JSON body
fails the same way. Field tables: required fields have `REQUIRED` as default.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

REQUIRED = object()
_ANY = object()

# name -> (allowed python types, default)
_OPT_STR = ((str, type(None)), None)
_BOOL_T = ((bool,), True)
_BOOL_F = ((bool,), False)
BODIES: dict[str, dict[str, tuple[tuple[type, ...], Any]]] = {
    "abort_request": {"rid": ((str, type(None)), ""), "abort_all": _BOOL_F},
    "pause_generation": {"mode": ((str,), "abort")},
    "continue_generation": {"torch_empty_cache": _BOOL_T},
    "update_weights_from_disk": {
        "model_path": ((str,), REQUIRED), "load_format": _OPT_STR, "abort_all_requests": _BOOL_F,
        "weight_version": _OPT_STR, "is_async": _BOOL_F, "torch_empty_cache": _BOOL_F,
        "keep_pause": _BOOL_F, "recapture_cuda_graph": _BOOL_F, "token_step": ((int,), 0),
        "flush_cache": _BOOL_T, "manifest": ((dict, type(None)), None)},
    "init_weights_update_group": {
        "master_address": ((str,), REQUIRED), "master_port": ((int,), REQUIRED),
        "rank_offset": ((int,), REQUIRED), "world_size": ((int,), REQUIRED),
        "group_name": ((str,), "weight_update_group"), "backend": ((str,), "nccl")},
    "destroy_weights_update_group": {"group_name": ((str,), "weight_update_group")},
    "begin_weight_update": {"selector": ((str,), "all")},
    "end_weight_update": {},
    "update_weights_from_distributed": {
        "names": ((list,), REQUIRED), "dtypes": ((list,), REQUIRED), "shapes": ((list,), REQUIRED),
        "group_name": ((str,), "weight_update_group"), "flush_cache": _BOOL_T,
        "abort_all_requests": _BOOL_F, "weight_version": _OPT_STR, "load_format": _OPT_STR,
        "selector": ((str,), "all"), "torch_empty_cache": _BOOL_F},
    "update_weights_from_tensor": {
        "serialized_named_tensors": ((list,), REQUIRED), "load_format": _OPT_STR,
        "flush_cache": _BOOL_T, "abort_all_requests": _BOOL_F, "weight_version": _OPT_STR,
        "selector": ((str,), "all"), "torch_empty_cache": _BOOL_F},
    "update_weight_version": {"new_version": ((str,), REQUIRED), "abort_all_requests": _BOOL_T},
    "get_weights_by_name": {"name": ((str,), REQUIRED), "truncate_size": ((int,), 100)},
    "release_memory_occupation": {"tags": ((list, type(None)), None)},
    "resume_memory_occupation": {"tags": ((list, type(None)), None)},
}
CHOICES = {("pause_generation", "mode"): ("abort", "retract", "in_place"),
           ("begin_weight_update", "selector"): ("target", "draft", "all"),
           ("update_weights_from_distributed", "load_format"): (None, "flattened_bucket")}


def validation_error(message: str) -> web.Response:
    """SGLang's `validation_exception_handler` body (FastAPI validation errors become 400)."""
    return web.json_response({"object": "error", "message": message, "type": "Bad Request",
                              "param": None, "code": 400}, status=400)


class BodyError(Exception):
    """Raised by `parse_body`; `.response` is the 400 to return."""

    def __init__(self, response: web.Response):
        super().__init__(response.text)
        self.response = response


async def parse_body(request: web.Request, endpoint: str) -> dict[str, Any]:
    """Parses and type-checks the JSON body of `endpoint`; fills defaults; ignores unknown keys."""
    fields = BODIES[endpoint]
    raw = await request.read()
    if not raw:
        raise BodyError(validation_error(f"{endpoint}: a JSON object body is required (send {{}})"))
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BodyError(validation_error(f"{endpoint}: body is not valid JSON: {e}")) from None
    if not isinstance(body, dict):
        raise BodyError(validation_error(f"{endpoint}: body must be a JSON object"))
    out: dict[str, Any] = {}
    for name, (types, default) in fields.items():
        if name not in body:
            if default is REQUIRED:
                raise BodyError(validation_error(f"{endpoint}: field required: {name!r}"))
            out[name] = default
            continue
        value = body[name]
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise BodyError(validation_error(f"{endpoint}: field {name!r} must be {expected}, "
                                             f"got {json.dumps(value)[:80]}"))
        choices = CHOICES.get((endpoint, name))
        if choices is not None and value not in choices:
            raise BodyError(validation_error(f"{endpoint}: field {name!r} must be one of "
                                             f"{list(choices)}, got {value!r}"))
        out[name] = value
    return out
