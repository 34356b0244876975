"""SGLang's `/update_weights_from_tensor` payload format, both directions.

SGLang (0.5.23, `srt/utils/common.py`) reads entry `serialized_named_tensors[tp_rank]` of the
request with `MultiprocessingSerializer.deserialize`: base64 → a `ForkingPickler` pickle of a
`list[(name, tensor)]` → loaded by its `SafeUnpickler` (an allowlist of globals). Tensors
travel *by handle*: CPU storages move to shared memory and are passed as file descriptors
(through the sender's resource sharer), CUDA tensors as IPC handles. So the sender must share
the server's host and keep the tensors alive until the call returns; each TP rank gets its
own entry (a rank reads only its own, as SGLang does for IPC reference counts).

`encode_named_tensors` produces one entry; `decode_named_tensors` is the embedded server's
decoder: the same restricted unpickling, limited to what tensors of these payloads need.
"""

from __future__ import annotations

import base64
import binascii
import io
import pickle
import threading
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing

_STRATEGY_LOCK = threading.Lock()

# Globals a payload of CPU (or CUDA) tensors pickled by ForkingPickler refers to. Everything
# else is refused, like SGLang's SafeUnpickler refuses globals outside its allowlist.
_ALLOWED = {
    ("builtins", "list"), ("builtins", "tuple"), ("builtins", "dict"), ("builtins", "str"),
    ("builtins", "int"), ("builtins", "float"), ("builtins", "bool"), ("collections", "OrderedDict"),
    ("torch", "Size"), ("torch", "device"), ("torch", "Tensor"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch.storage", "UntypedStorage"),
    ("torch.storage", "TypedStorage"), ("torch", "UntypedStorage"),
    ("multiprocessing.resource_sharer", "DupFd"),
    ("torch.multiprocessing.reductions", "rebuild_tensor"),
    ("torch.multiprocessing.reductions", "rebuild_storage_fd"),
    ("torch.multiprocessing.reductions", "rebuild_storage_filename"),
    ("torch.multiprocessing.reductions", "rebuild_storage_empty"),
    ("torch.multiprocessing.reductions", "rebuild_typed_storage"),
    ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"),
}


class PayloadError(ValueError):
    """A payload is not a base64 pickle of `list[(str, tensor)]`, or refers to a forbidden global."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                            torch.dtype)):
            return super().find_class(module, name)
        raise PayloadError(f"Blocked unsafe global ({module}.{name}) during pickle deserialization")


def encode_named_tensors(named_tensors: list[tuple[str, torch.Tensor]]) -> str:
    """SGLang's `MultiprocessingSerializer.serialize(named_tensors, output_str=True)`.

    CPU tensors are moved to shared memory by torch's reductions (the storage is shared, not
    copied, when it already is). CUDA tensors need sglang's torch patches (device by UUID).
    """
    if any(t.is_cuda for _, t in named_tensors):
        try:
            from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
        except ImportError as e:
            raise RuntimeError("tensor_encoding='sglang' with CUDA tensors needs sglang importable "
                               "(its torch reductions map devices by UUID)") from e
        monkey_patch_torch_reductions()
    buf = io.BytesIO()
    # CPU storages by shared-memory file name: a file descriptor would travel through this
    # process's resource sharer, which only processes it started may authenticate to (the
    # server is an independent process).
    previous = torch.multiprocessing.get_sharing_strategy()
    with _STRATEGY_LOCK:
        torch.multiprocessing.set_sharing_strategy("file_system")
        try:
            ForkingPickler(buf).dump([(str(name), t.detach()) for name, t in named_tensors])
        finally:
            torch.multiprocessing.set_sharing_strategy(previous)
    return base64.b64encode(buf.getvalue()).decode()


def decode_named_tensors(payload: str) -> list[tuple[str, torch.Tensor]]:
    """One entry of `serialized_named_tensors` → `[(name, tensor)]`; PayloadError when it is
    not SGLang's format (e.g. base64 safetensors bytes) or names a forbidden global."""
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError, TypeError) as e:
        raise PayloadError(f"payload is not base64: {e}") from None
    if len(data) < 2 or data[0] != 0x80:
        raise PayloadError("payload is not a pickle (SGLang's MultiprocessingSerializer format "
                           "expected, e.g. not safetensors bytes)")
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data)).load()
    except PayloadError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad payload
        raise PayloadError(f"payload cannot be unpickled: {type(e).__name__}: {e}") from None
    if not isinstance(obj, list) or not all(
            isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
            and isinstance(item[1], torch.Tensor) for item in obj):
        raise PayloadError(f"payload holds {type(obj).__name__}, expected list[(name, tensor)]")
    return obj
