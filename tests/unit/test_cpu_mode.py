import pytest
import torch

from ctpo_megatron.parallel import cpu_mode
from ctpo_megatron.parallel.dims import ParallelDims


@pytest.fixture
def cpu_mode_on():
    cpu_mode.enable_cpu_mode()
    try:
        yield
    finally:
        cpu_mode.disable_cpu_mode()


def test_cuda_devices_map_to_cpu(cpu_mode_on):
    assert cpu_mode.is_cpu_mode()
    assert torch.zeros(3, device="cuda").device.type == "cpu"
    assert torch.zeros(3, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.ones(2).to("cuda").device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    # DistributedOptimizer only accepts parameters whose type() reads torch.cuda.*.
    assert torch.ones(2).type() == "torch.cuda.FloatTensor"
    torch.cuda.synchronize()  # a no-op instead of "Torch not compiled with CUDA enabled"


def test_megatron_rng_tracker_forks_on_cpu(cpu_mode_on):
    from megatron.core.tensor_parallel import random as mp_random

    tracker = mp_random.CudaRNGStatesTracker()
    tracker.add("model-parallel-rng", 7)
    outer = torch.get_rng_state()
    with tracker.fork("model-parallel-rng"):
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outer)  # the outer stream is untouched
    with tracker.fork("model-parallel-rng"):
        second = torch.rand(4)
    assert not torch.equal(first, second)  # the forked stream advanced
    assert torch.equal(first, torch.rand(4, generator=torch.Generator().manual_seed(7)))


def test_disable_restores_everything():
    original_type = torch.ones(1).type()
    cpu_mode.enable_cpu_mode()
    cpu_mode.disable_cpu_mode()
    assert not cpu_mode.is_cpu_mode()
    assert torch.ones(1).type() == original_type == "torch.FloatTensor"
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")


@pytest.mark.parametrize("value,expected", [("on", True), ("off", False), ("1", True), ("0", False),
                                            ("auto", not torch.cuda.is_available())])
def test_env_switch(monkeypatch, value, expected):
    monkeypatch.setenv("CTPO_CPU_MODE", value)
    assert cpu_mode.cpu_mode_requested() is expected


def test_env_switch_rejects_garbage(monkeypatch):
    monkeypatch.setenv("CTPO_CPU_MODE", "maybe")
    with pytest.raises(ValueError, match="CTPO_CPU_MODE"):
        cpu_mode.cpu_mode_requested()


def test_parallel_dims_resolve_and_errors():
    assert ParallelDims(tp=2, pp=2).resolve(8).dp == 2
    with pytest.raises(ValueError, match=r"world size 6 is not a multiple of tp\(2\) \* pp\(2\)"):
        ParallelDims(tp=2, pp=2).resolve(6)
    with pytest.raises(ValueError, match=r"dp\(4\)"):
        ParallelDims(tp=2, dp=4).resolve(4)
    with pytest.raises(ValueError, match="parallel.tp"):
        ParallelDims(tp=0)
    with pytest.raises(ValueError, match="num_attention_heads=6"):
        ParallelDims(tp=4).check_model(num_attention_heads=6, num_query_groups=2, num_layers=2)
