"""Which kernels `ctpo_megatron.ops` runs: the csrc extension (CUDA, CPU) or pure torch.

The extension `ctpo_megatron._C` registers the ops `torch.ops.ctpo_megatron.*` for the
backends it was compiled with. A missing or broken extension, or a device it was not built
for, degrades to the pure-torch path in `ops/reference.py` with one warning per reason.
"""

from __future__ import annotations

import functools
import logging

import torch

from ctpo_megatron.logging_utils import warn_once

logger = logging.getLogger(__name__)

# Why setup.py left the CUDA sources out (it compiles the code into build_info()).
_CUDA_SKIP_REASONS = {
    "torch_cpu": "torch was a CPU build at install time",
    "no_nvcc": "no nvcc / CUDA toolkit at install time",
    "forced": "CTPO_FORCE_CPU=1 at install time",
}


@functools.cache
def _load() -> tuple[frozenset[str], str]:
    """(backends compiled into the extension, why the extension or CUDA is missing)."""
    try:
        import ctpo_megatron._C  # noqa: F401 - importing registers torch.ops.ctpo_megatron.*
        info = torch.ops.ctpo_megatron.build_info()
    except (ImportError, OSError, RuntimeError, AttributeError) as exc:
        return frozenset(), f"extension ctpo_megatron._C not importable ({exc})"
    fields = dict(item.split("=", 1) if "=" in item else (item, "") for item in info.split(";"))
    backends = frozenset(b for b in fields.get("backends", "").split(",") if b)
    reason = _CUDA_SKIP_REASONS.get(fields.get("cuda_skipped", ""), fields.get("cuda_skipped", ""))
    return backends, reason


def extension_backends() -> frozenset[str]:
    """Device types ("cpu", "cuda") the csrc extension has kernels for; empty without it."""
    return _load()[0]


def use_extension(device: torch.device) -> bool:
    """True when the extension has kernels for `device`; otherwise warns once and says False."""
    backends, reason = _load()
    if device.type in backends:
        return True
    if not backends:
        warn_once(logger, f"ctpo_megatron.ops: {reason}; using the pure-torch path "
                          "(reinstall with `pip install --no-build-isolation -e .` to build it)")
    else:
        why = f": {reason}" if device.type == "cuda" and reason else ""
        warn_once(logger, f"ctpo_megatron.ops: no {device.type} kernels in the extension{why}; "
                          f"using the pure-torch path on {device.type}")
    return False


def backend_report() -> list[str]:
    """Human-readable lines: the active backend per device type and why."""
    backends, reason = _load()
    lines = [f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}; "
             f"GPU available: {torch.cuda.is_available()})"]
    if not backends:
        lines.append(f"extension: not loaded: {reason}")
        lines.append("cpu: pure torch (ops/reference.py)")
        lines.append("cuda: pure torch (ops/reference.py)")
        return lines
    lines.append(f"extension: ctpo_megatron._C with backends {sorted(backends)}")
    lines.append("cpu: csrc CPU kernels (at::parallel_for, "
                 f"{torch.get_num_threads()} threads)")
    if "cuda" in backends:
        lines.append("cuda: csrc CUDA kernels" + ("" if torch.cuda.is_available()
                                                  else " (built, but no GPU visible now)"))
    else:
        lines.append(f"cuda: pure torch — CUDA kernels not built: {reason or 'unknown reason'}")
    return lines


@functools.cache
def op_overload(name: str) -> torch._ops.OpOverload:
    """`torch.ops.ctpo_megatron.<name>.default`, looked up once: a call through the overload
    skips the packet's overload resolution (microseconds, for the ops called per micro-batch).
    Call only where the extension is loaded."""
    return getattr(torch.ops.ctpo_megatron, name).default


def dense(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`tensor` in `dtype`, contiguous; itself when it already is (this runs per micro-batch, and
    a no-op `.to().contiguous()` still costs two calls)."""
    if (dtype is None or tensor.dtype == dtype) and tensor.is_contiguous():
        return tensor
    return tensor.to(dtype or tensor.dtype).contiguous()


def cpu_kernel_for(device: torch.device) -> bool:
    """True for `device` on the CPU with the extension's CPU kernels: the ops written for the
    host only (the loss statistics, the histogram quantiles)."""
    return device.type == "cpu" and use_extension(device)
