import pytest

from ctpo_megatron.config.store import load_config
from ctpo_megatron.trainer.loop import check_policy_memory

GIB = 2**30


def test_paper_layout_fits_an_80gb_gpu():
    cfg = load_config()  # Qwen3-32B, tp 8 x pp 2, sequence parallel, recompute, dist optimizer
    dims = cfg.validate(64)
    estimate = check_policy_memory(cfg, dims, gpu_memory_gib=80.0)
    assert estimate.fits
    # By hand: Qwen3-32B has 32.8 B parameters (model card), 1/16 of them per GPU at tp 8 x pp 2
    # (the first stage holds the input embedding, the last the output layer: same size).
    assert estimate.params_per_gpu == pytest.approx(32.8e9 / 16, rel=0.01)
    # bf16 weights (2 B) + fp32 main grads (4 B) + fp32 master and two Adam moments (12 B)
    # sharded over dp = 4 by the distributed optimizer: 9 bytes per parameter, exactly.
    assert estimate.weights + estimate.grads + estimate.optimizer == 9 * estimate.params_per_gpu
    # The last pipeline stage is the largest (it also holds the output layer's logits): under
    # 1F1B it has one micro-batch in flight. Full recompute keeps each layer's input (bf16,
    # hidden 5120 split by sequence parallelism over tp 8) for 32 layers x 1 micro-batch x
    # 24000 tokens (16000 prompt + 8000 response) = 0.92 GiB, plus one layer's activations
    # being recomputed (~0.6 GiB).
    assert (estimate.stage, estimate.in_flight_microbatches, estimate.tokens_per_gpu) == (1, 1, 24000)
    checkpoints = 32 * 1 * 24000 * 2 * 5120 / 8
    assert checkpoints < estimate.activations < checkpoints + 1.0 * GIB
    # The bf16 logits kept for backward and their bf16 gradient: 24000 tokens x the vocabulary
    # (151936, padded to a multiple of 128 x tp) / tp 8 x (2 + 2) bytes.
    assert estimate.logits_kept == 24000 * (151936 // 8) * 4
    # 17.2 GiB of states + 1.6 GiB activations + 0.7 + 1.7 GiB logits + a 0.5 GiB weight-sync
    # bucket + the 4 GiB allowance: 25.65 GiB observed.
    assert 25.0 * GIB < estimate.total < 26.5 * GIB


def test_oversized_layout_fails_at_start_up_with_the_breakdown():
    cfg = load_config(["parallel=tp1", "parallel.distributed_optimizer=false"])
    dims = cfg.validate(8)  # 32B parameters on one GPU per replica cannot fit 80 GB
    with pytest.raises(ValueError, match=r"GiB per GPU, more than 80 GiB; raise parallel"):
        check_policy_memory(cfg, dims, gpu_memory_gib=80.0)


def test_colocated_servers_must_fit_beside_the_resident_trainer():
    """rollout.placement=colocated: while the servers generate, the trainer's weights, gradient
    buffers and optimizer state stay on the GPU (17.2 GiB + the 4 GiB allowance for the paper
    layout), so the servers' --mem-fraction-static must leave room for them."""
    cfg = load_config(["rollout.placement=colocated", "rollout.weight_sync.transport=tensor"])
    dims = cfg.validate(64)
    estimate = check_policy_memory(cfg, dims, gpu_memory_gib=80.0)  # the default share, 0.5, fits
    resident = (estimate.weights + estimate.grads + estimate.optimizer + estimate.overhead) / GIB
    assert 21.0 < resident < 21.5
    greedy = load_config(["rollout.placement=colocated", "rollout.weight_sync.transport=tensor",
                          "rollout.server_mem_fraction_static=0.85"])
    with pytest.raises(ValueError, match=r"set rollout.server_mem_fraction_static <= 0\.73"):
        check_policy_memory(greedy, dims, gpu_memory_gib=80.0)
    alone = load_config(["rollout.server_mem_fraction_static=0.85"])  # servers on other GPUs
    assert check_policy_memory(alone, dims, gpu_memory_gib=80.0).fits
