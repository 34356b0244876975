"""SGLang's own `/generate` request contract, loaded from the sglang wheel's `api_types.py`.

SGLang 0.5.23 checks every `/generate` body with `sglang/api/v1/api_types.py` (generated,
needs only msgspec) before anything else runs: unknown keys inside `sampling_params` and
values of the wrong JSON type are an HTTP 400 `{"error": "<serde-style message>"}`. Our client
checks its payloads with the same module, and the embedded server answers with it, so neither
can drift from the real server.

The file is looked up at `$CTPO_SGLANG_CONTRACT` or `<repo>/.cache/sglang_contract/api_types.py`
(`scripts/setup_env.sh` extracts it from the sglang wheel, fetched without dependencies). When
it is absent, `FallbackContract` below applies the same rules to the fields the RL path uses,
with the same messages (a mirror of 0.5.23's `decode_SamplingParams`; tests compare the two).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

CONTRACT_ENV = "CTPO_SGLANG_CONTRACT"
_DEFAULT_PATH = Path(__file__).resolve().parents[3] / ".cache" / "sglang_contract" / "api_types.py"

# SamplingParams keys in SGLang 0.5.23's contract, in its declaration order (the order its
# "unknown field" message lists them), and the JSON kind each must have (null always allowed).
SAMPLING_PARAM_KINDS: dict[str, str] = {
    "max_new_tokens": "int", "stop": "str_or_list", "stop_token_ids": "int_list",
    "stop_regex": "str_or_list", "temperature": "float", "top_p": "float", "top_k": "int",
    "min_p": "float", "frequency_penalty": "float", "presence_penalty": "float",
    "repetition_penalty": "float", "min_new_tokens": "int", "n": "int", "json_schema": "str",
    "regex": "str", "ebnf": "str", "structural_tag": "str", "ignore_eos": "bool",
    "skip_special_tokens": "bool", "spaces_between_special_tokens": "bool",
    "no_stop_trim": "bool", "stream_interval": "int", "logit_bias": "float_map",
    "sampling_seed": "int", "custom_params": "any", "beam_width": "int", "watermark": "map",
    "choice": "str_list",
}
SAMPLING_PARAM_KEYS: tuple[str, ...] = tuple(SAMPLING_PARAM_KINDS)


class ContractError(ValueError):
    """A request body violates SGLang's JSON contract; the message is the server's 400 text."""


def contract_path() -> Path:
    """Where the contract file is expected ($CTPO_SGLANG_CONTRACT wins)."""
    return Path(os.environ.get(CONTRACT_ENV) or _DEFAULT_PATH)


@lru_cache(maxsize=4)
def _load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("_ctpo_sglang_api_types", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load SGLang's contract from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_contract(path: str | os.PathLike | None = None) -> ModuleType:
    """Imports SGLang's `api_types.py` by file path (no sglang install needed).

    Raises FileNotFoundError naming the path and how to get the file when it is missing.
    """
    path = Path(path) if path is not None else contract_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"SGLang's contract file {path} does not exist: run scripts/setup_env.sh (it extracts "
            f"sglang/api/v1/api_types.py from the sglang==0.5.23 wheel) or point ${CONTRACT_ENV} at it")
    return _load(str(path))


def contract_available() -> bool:
    """Whether SGLang's own contract file can be loaded."""
    try:
        load_contract()
    except (FileNotFoundError, ImportError):
        return False
    return True


def _unexpected(v: Any) -> str:
    # serde's `Unexpected` display, the text SGLang's messages use.
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean `{'true' if v else 'false'}`"
    if isinstance(v, int):
        return f"integer `{v}`"
    if isinstance(v, float):
        return f"floating point `{v}`"
    if isinstance(v, str):
        return f'string "{v}"'
    return "sequence" if isinstance(v, list) else "map" if isinstance(v, dict) else type(v).__name__


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_kind(value: Any, kind: str) -> None:
    def bad(expected: str) -> ContractError:
        return ContractError(f"invalid type: {_unexpected(value)}, expected {expected}")

    if value is None or kind == "any":
        return
    if kind == "int" and not _is_int(value):
        raise bad("i64")
    if kind == "float" and not (_is_int(value) or isinstance(value, float)):
        raise bad("f64")
    if kind == "bool" and not isinstance(value, bool):
        raise bad("a boolean")
    if kind == "str" and not isinstance(value, str):
        raise bad("a string")
    if kind == "map" and not isinstance(value, dict):
        raise bad("a map")
    if kind in ("int_list", "str_list"):
        if not isinstance(value, list):
            raise bad("a sequence")
        for item in value:
            _check_kind(item, "int" if kind == "int_list" else "str")
            if item is None:
                expected = "i64" if kind == "int_list" else "a string"
                raise ContractError(f"invalid type: null, expected {expected}")
    if kind == "str_or_list" and not isinstance(value, str):
        if not isinstance(value, list):
            raise ContractError(f"invalid type: {_unexpected(value)}, expected a value or an array "
                                "of values for StringOrList")
        _check_kind(value, "str_list")
    if kind == "float_map":
        if not isinstance(value, dict):
            raise bad("a map")
        for item in value.values():
            _check_kind(item, "float")


class FallbackContract:
    """The subset of SGLang 0.5.23's `/generate` contract the RL path uses, same messages.

    Used only when `api_types.py` is not available; covers `sampling_params` (every key, unknown
    keys rejected), `input_ids`, `rid`, `stream`, `return_logprob`, `logprob_start_len`.
    """

    @staticmethod
    def check_sampling_params(params: Any) -> None:
        if not isinstance(params, dict):
            raise ContractError(f"invalid type: {_unexpected(params)}, expected struct SamplingParams")
        for key, value in params.items():
            kind = SAMPLING_PARAM_KINDS.get(key)
            if kind is None:
                listed = ", ".join(f"`{k}`" for k in SAMPLING_PARAM_KEYS)
                raise ContractError(f"unknown field `{key}`, expected one of {listed}")
            _check_kind(value, kind)

    @classmethod
    def check_generate(cls, body: Any) -> None:
        if not isinstance(body, dict):
            raise ContractError(f"invalid type: {_unexpected(body)}, expected struct GenerateRequest")
        ids = body.get("input_ids")
        if ids is not None:
            rows = ids if ids and isinstance(ids, list) and isinstance(ids[0], list) else [ids]
            for row in rows:
                _check_kind(row, "int_list")
        for key in ("stream",):
            _check_kind(body.get(key), "bool")
        for key, kind, alias in (("return_logprob", "bool", "BoolOrList"),
                                 ("logprob_start_len", "int", "Int64OrList"),
                                 ("rid", "str", "StringOrList")):
            value = body.get(key)
            if isinstance(value, list):
                for item in value:
                    _check_kind(item, kind)
                    if item is None:  # null elements are not allowed in these lists
                        expected = {"bool": "a boolean", "int": "i64", "str": "a string"}[kind]
                        raise ContractError(f"invalid type: null, expected {expected}")
            elif value is not None:
                try:
                    _check_kind(value, kind)
                except ContractError:
                    raise ContractError(f"invalid type: {_unexpected(value)}, expected a value or "
                                        f"an array of values for {alias}") from None
        params = body.get("sampling_params")
        if params is not None:
            for item in params if isinstance(params, list) else [params]:
                cls.check_sampling_params(item)


def validate_generate_request(body: Any) -> None:
    """Checks a `/generate` JSON body exactly as SGLang 0.5.23's schema gate does.

    Raises ContractError with the server's own 400 message. Uses SGLang's `api_types.py` when
    it can be loaded, else `FallbackContract`.
    """
    _validate("GenerateRequest", FallbackContract.check_generate, body)


def validate_sampling_params(params: Any) -> None:
    """Checks one `sampling_params` object (unknown keys and bad types raise ContractError)."""
    _validate("SamplingParams", FallbackContract.check_sampling_params, params)


def _validate(type_name: str, fallback: Any, value: Any) -> None:
    """Decodes `value` as SGLang's `api_types.<type_name>`, or checks it with `fallback` when
    SGLang's contract file cannot be loaded; raises ContractError with the server's message."""
    try:
        api = load_contract()
    except (FileNotFoundError, ImportError):
        fallback(value)
        return
    try:
        getattr(api, type_name).from_json_value(value)
    except api.JsonContractError as e:
        raise ContractError(str(e)) from None
