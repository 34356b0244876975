"""Parallel sizes, process groups and CPU mode for megatron-core (see cpu_mode.py)."""

from ctpo_megatron.parallel.cpu_mode import (
    cpu_mode_requested,
    disable_cpu_mode,
    enable_cpu_mode,
    is_cpu_mode,
    maybe_enable_cpu_mode,
)
from ctpo_megatron.parallel.dims import ParallelDims
from ctpo_megatron.parallel.net import free_port
from ctpo_megatron.parallel.state import destroy_parallel, init_distributed, init_parallel

__all__ = [
    "ParallelDims", "cpu_mode_requested", "destroy_parallel", "disable_cpu_mode",
    "enable_cpu_mode", "free_port", "init_distributed", "init_parallel", "is_cpu_mode",
    "maybe_enable_cpu_mode",
]
