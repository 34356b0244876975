"""Process-group setup for the Megatron policy: the one place that calls parallel_state.

`init_parallel` returns a `ProcessGroupCollection` that is passed down explicitly; no other
module reads megatron's global parallel state.
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from ctpo_megatron.parallel.cpu_mode import maybe_enable_cpu_mode
from ctpo_megatron.parallel.dims import ParallelDims

logger = logging.getLogger(__name__)


def init_distributed(*, timeout_minutes: int = 30) -> tuple[int, int]:
    """Initializes torch.distributed from the torchrun/Slurm environment if not yet done.

    Uses gloo in CPU mode and nccl otherwise. Returns (rank, world_size). A single process
    without RANK/WORLD_SIZE in the environment becomes a world of one.
    """
    cpu = maybe_enable_cpu_mode()
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        from ctpo_megatron.parallel.net import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    backend = "gloo" if cpu else "nccl"
    if not cpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return dist.get_rank(), dist.get_world_size()


def init_parallel(dims: ParallelDims, *, seed: int = 1234):
    """Creates megatron's model-parallel groups for `dims` and seeds its RNG tracker.

    Requires torch.distributed to be initialized (see `init_distributed`). Validates the sizes
    against the world size before any collective. Returns (resolved dims, ProcessGroupCollection).
    """
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection

    if not dist.is_initialized():
        raise RuntimeError("init_parallel: torch.distributed is not initialized; call init_distributed() first")
    dims = dims.resolve(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        context_parallel_size=dims.cp,
        # No gloo twins of the NCCL groups: nothing here uses them (the optimizer is built with
        # use_gloo_process_groups=False), and each costs sockets and memory on every rank at
        # scale. In CPU mode every group is gloo already.
        create_gloo_process_groups=False,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return dims, ProcessGroupCollection.use_mpu_process_groups()


def destroy_parallel() -> None:
    """Tears down megatron's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
