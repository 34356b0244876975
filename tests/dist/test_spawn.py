import time

import pytest
import torch
import torch.distributed as dist

from ctpo_megatron.parallel import ParallelDims, init_parallel
from ctpo_megatron.parallel.spawn import RankError, run_on_ranks

pytestmark = pytest.mark.dist


def _all_reduce_rank(rank, world_size):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom from rank one")
    dist.barrier()  # rank 0 blocks here: the helper must not hang on it


def _hang(rank, world_size):
    time.sleep(120)


def _megatron_tp2(rank, world_size):
    from megatron.core import tensor_parallel

    dims, pgs = init_parallel(ParallelDims(tp=2), seed=5)
    layer = tensor_parallel.ColumnParallelLinear(
        8, 6, config=_tiny_config(), init_method=torch.nn.init.ones_, bias=False,
        gather_output=True, tp_group=pgs.tp)
    out, _ = layer(torch.ones(3, 8))
    return dims.dp, pgs.tp.size(), tuple(out.shape), out.sum().item()


def _tiny_config():
    from megatron.core.model_parallel_config import ModelParallelConfig

    return ModelParallelConfig(tensor_model_parallel_size=2)


def test_results_in_rank_order():
    assert run_on_ranks(_all_reduce_rank, 3, timeout=120) == [3.0, 3.0, 3.0]


def test_rank_traceback_propagates_and_peers_do_not_hang():
    # Rank 0 waits in a barrier for rank 1, which failed: a hanging helper would end in a
    # TimeoutError after 120 s instead of this RankError (no wall-time bound needed).
    with pytest.raises(RankError, match="boom from rank one") as info:
        run_on_ranks(_fail_on_rank_one, 2, timeout=120)
    assert "--- rank 1 ---" in str(info.value)


def _live_children() -> set[int]:
    import psutil

    return {c.pid for c in psutil.Process().children(recursive=True)
            if c.is_running() and c.status() != psutil.STATUS_ZOMBIE}


def test_hard_timeout_kills_the_group():
    before = _live_children()
    with pytest.raises(TimeoutError, match="timed out after 5s"):
        run_on_ranks(_hang, 2, timeout=5)
    # The ranks (sleeping 120 s) are gone: polled with a deadline, not timed.
    deadline = time.monotonic() + 60
    while _live_children() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _live_children() - before, "rank processes outlived the timeout"


def test_megatron_tensor_parallel_layer_in_cpu_mode():
    results = run_on_ranks(_megatron_tp2, 2, timeout=180)
    for dp, tp, shape, total in results:
        assert (dp, tp, shape) == (1, 2, (3, 6))
        assert total == pytest.approx(3 * 6 * 8)  # ones @ ones over 8 inputs, gathered over TP
