"""CPU mode: run real megatron-core 0.16 (parallel_state, GPTModel, tensor-parallel layers,
pipeline schedules, DDP, DistributedOptimizer, dist checkpointing) on CPU with gloo.

megatron-core assumes CUDA in a handful of places (buffers allocated on
`torch.cuda.current_device()`, `torch.cuda.synchronize()` after p2p, a CUDA RNG tracker, and a
`Tensor.type()` check for `torch.cuda.*Tensor` in the distributed optimizer). CPU mode redirects
exactly those to the CPU so a parallel layout (TP x PP x DP) can be debugged on a laptop and
tested in CI without a GPU. It is selected by `CTPO_CPU_MODE`:

  auto (default)  on when no CUDA device is present, off otherwise
  on              forced on (also on a GPU machine, e.g. to compare against CPU results)
  off             never; megatron then needs CUDA

Call `maybe_enable_cpu_mode()` in every worker process before
`parallel_state.initialize_model_parallel`. The redirection is a `TorchFunctionMode`, which is
thread-local: code that starts its own threads runs outside it. torch pops the mode while it
handles `torch.autograd.backward`, so the autograd engine is wrapped to run backward passes
(megatron's sequence-parallel reduce-scatter buffers, recomputed layers) inside it again.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_ACTIVE_MODE: "_CpuDeviceMode | None" = None
_SAVED_CUDA_FNS: dict[str, object] = {}
_SAVED_TRACKER: object | None = None
_SAVED_RNG_FNS: dict[str, object] = {}
_SAVED_ENGINE_RUN: list = []


def _is_cuda_device(device: object) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True  # megatron passes torch.cuda.current_device() ints as devices
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CpuDeviceMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU and reports CPU tensors' `.type()` as CUDA ones."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            # Pinned memory needs an accelerator; megatron pins host buffers it then copies to
            # the GPU (e.g. the zigzag RoPE slice under context parallelism).
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        if func is torch.Tensor.cuda:
            return args[0]
        out = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and isinstance(out, str):
            # DistributedOptimizer and clip_grads accept only torch.cuda.*Tensor parameters.
            out = out.replace("torch.", "torch.cuda.", 1)
        return out


def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mp_random

    base = _SAVED_TRACKER or mp_random.CudaRNGStatesTracker

    class CpuRNGStatesTracker(base):  # type: ignore[misc, valid-type]
        """megatron's model-parallel RNG tracker, holding CPU generator states."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"cuda rng state {name} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"cuda rng state {name} is not added")
            outer_state = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer_state)

    return CpuRNGStatesTracker


def cpu_mode_requested() -> bool:
    """Whether CTPO_CPU_MODE (auto/on/off) asks for CPU mode on this machine."""
    setting = os.environ.get("CTPO_CPU_MODE", "auto").strip().lower()
    if setting in ("1", "on", "true", "yes"):
        return True
    if setting in ("0", "off", "false", "no"):
        return False
    if setting != "auto":
        raise ValueError(f"CTPO_CPU_MODE={setting!r}: expected one of auto, on, off")
    return not torch.cuda.is_available()


def is_cpu_mode() -> bool:
    """Whether CPU mode is active in this process."""
    return _ACTIVE_MODE is not None


def enable_cpu_mode() -> None:
    """Activates CPU mode in this process (idempotent)."""
    global _ACTIVE_MODE, _SAVED_TRACKER
    if _ACTIVE_MODE is not None:
        return
    from megatron.core.tensor_parallel import random as mp_random

    _SAVED_CUDA_FNS.update(current_device=torch.cuda.current_device,
                           synchronize=torch.cuda.synchronize)
    torch.cuda.current_device = lambda: 0  # 0 is then mapped to cpu by the mode
    torch.cuda.synchronize = lambda *args, **kwargs: None
    _SAVED_TRACKER = mp_random.CudaRNGStatesTracker
    # Activation recomputation saves/restores the CUDA RNG state around each recomputed layer;
    # on CPU there is none (the CPU state is saved by megatron separately).
    _SAVED_RNG_FNS.update(_get_cuda_rng_state=mp_random._get_cuda_rng_state,
                          _set_cuda_rng_state=mp_random._set_cuda_rng_state)
    mp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    mp_random._set_cuda_rng_state = lambda *args, **kwargs: None
    # initialize_rng_tracker() instantiates whatever this name points to.
    mp_random.CudaRNGStatesTracker = _cpu_rng_tracker_class()
    import torch.autograd as autograd

    engine_run = autograd._engine_run_backward
    _SAVED_ENGINE_RUN.append(engine_run)

    def run_backward_in_cpu_mode(*args, **kwargs):
        with _CpuDeviceMode():
            return engine_run(*args, **kwargs)

    autograd._engine_run_backward = run_backward_in_cpu_mode
    _ACTIVE_MODE = _CpuDeviceMode()
    _ACTIVE_MODE.__enter__()
    logger.info("CPU mode on: megatron-core runs on CPU with gloo")


def disable_cpu_mode() -> None:
    """Deactivates CPU mode and restores what `enable_cpu_mode` replaced (idempotent)."""
    global _ACTIVE_MODE, _SAVED_TRACKER
    if _ACTIVE_MODE is None:
        return
    from megatron.core.tensor_parallel import random as mp_random

    _ACTIVE_MODE.__exit__(None, None, None)
    _ACTIVE_MODE = None
    if _SAVED_ENGINE_RUN:
        import torch.autograd as autograd

        autograd._engine_run_backward = _SAVED_ENGINE_RUN.pop()
    for name, fn in _SAVED_CUDA_FNS.items():
        setattr(torch.cuda, name, fn)
    _SAVED_CUDA_FNS.clear()
    mp_random.CudaRNGStatesTracker = _SAVED_TRACKER
    _SAVED_TRACKER = None
    for name, fn in _SAVED_RNG_FNS.items():
        setattr(mp_random, name, fn)
    _SAVED_RNG_FNS.clear()


def maybe_enable_cpu_mode() -> bool:
    """Enables CPU mode if CTPO_CPU_MODE asks for it (default: no GPU); returns whether on."""
    if cpu_mode_requested():
        enable_cpu_mode()
    return is_cpu_mode()
