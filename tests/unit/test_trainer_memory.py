import pytest

from ctpo_megatron.config.store import load_config
from ctpo_megatron.trainer.loop import check_policy_memory

GIB = 2**30


def test_paper_layout_fits_an_80gb_gpu():
    cfg = load_config()  # Qwen3-32B, tp 8 x pp 2, sequence parallel, recompute, dist optimizer
    dims = cfg.validate(64)
    estimate = check_policy_memory(cfg, dims, gpu_memory_gib=80.0)
    assert estimate.fits and 10 * GIB < estimate.total < 80 * GIB


def test_oversized_layout_fails_at_start_up_with_the_breakdown():
    cfg = load_config(["parallel=tp1", "parallel.distributed_optimizer=false"])
    dims = cfg.validate(8)  # 32B parameters on one GPU per replica cannot fit 80 GB
    with pytest.raises(ValueError, match=r"GiB per GPU, more than 80 GiB; raise parallel"):
        check_policy_memory(cfg, dims, gpu_memory_gib=80.0)
