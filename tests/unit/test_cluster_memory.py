"""Memory estimate vs numbers computed by hand (see the arithmetic in each comment)."""

from __future__ import annotations

import pytest

from ctpo_megatron.cluster.memory import GIB, check_memory, estimate_memory
from ctpo_megatron.cluster.model_dims import PRESETS, ModelDims, model_dims_from_hf_config
from ctpo_megatron.parallel.dims import ParallelDims

# h=8, 4 layers, 4 heads x head_dim 2 (q width 8), 2 kv heads (kv width 4), SwiGLU ffn 16, vocab 32.
SMALL = ModelDims(hidden_size=8, num_layers=4, num_attention_heads=4, num_query_groups=2,
                  ffn_hidden_size=16, vocab_size=32, head_dim=2)
# TP2 PP2 CP2 DP2; seq 16 x micro-batch 2 / cp 2 = 16 tokens per GPU.
DIMS = ParallelDims(tp=2, pp=2, cp=2, dp=2)


def est(**kw):
    kw.setdefault("weight_sync_bucket_bytes", 0)
    return estimate_memory(SMALL, DIMS, seq_len=16, micro_batch=2, overhead_gib=0.0, **kw)


def test_param_counts_by_hand():
    # attention 8*8 (q) + 2*8*4 (k, v) + 8*8 (o) = 192; MLP 3*8*16 = 384; two norms 2*8 = 16
    assert SMALL.params_per_layer == 592
    # 4 layers + embedding 32*8 + output 32*8 + final norm 8
    assert SMALL.total_params == 4 * 592 + 256 + 256 + 8
    # Qwen3-32B: layer = 2*5120*8192 + 2*5120*1024 + qk-norm 256 + 3*5120*25600 + 2*5120
    #          = 487,598,336; x64 + 2 * 151936*5120 + 5120 (final norm)
    assert PRESETS["qwen3_32b"].params_per_layer == 487_598_336
    assert PRESETS["qwen3_32b"].total_params == 32_762_123_264


def test_no_recompute_worst_stage_is_the_last():
    e = est(recompute="none")
    # Stage 0 (2 layers + embedding 16*8 = 736 params/GPU, 2 micro-batches in flight under 1F1B):
    # 736*2 + 736*4 + 736*12//4 (dist-opt over dp*cp=4) + activations 2 layers * 112 B * 16 tokens
    # * 2 = 1472 + 2944 + 2208 + 7168 = 13792 bytes. Bytes per token per layer with SP: residual
    # 2*4*8/2 = 32, attention 2*(2*8+2*4)/2 + 4*4/2 = 32, MLP 2*3*16/2 = 48 -> 112.
    # Last stage (2 layers + output 16*8 + final norm 8 = 744 params, 1 micro-batch in flight):
    assert (e.stage, e.params_per_gpu, e.in_flight_microbatches) == (1, 744, 1)
    assert (e.weights, e.grads, e.optimizer) == (744 * 2, 744 * 4, 744 * 12 // 4)
    assert e.activations == 2 * 112 * 16
    # unchunked log-prob temporaries 16 tokens x 16 vocab rows x 10 B; the bf16 logits kept for
    # backward and their bf16 gradient, 16 x 16 x (2 + 2) B
    assert (e.logits, e.logits_kept, e.weight_sync) == (2560, 1024, 0)
    assert e.total == 1488 + 2976 + 2232 + 3584 + 2560 + 1024  # 13864 > stage 0's 13792


def test_full_recompute_moves_the_peak_to_the_last_stage():
    e = est(recompute="full")
    assert (e.stage, e.params_per_gpu) == (1, 744)
    # stored layer inputs 2 * (2*8/2 bytes) * 16 tokens * 1 in flight + one recomputed layer 112 * 16
    assert e.activations == 2 * 8 * 16 + 112 * 16
    assert e.logits == 16 * 16 * 10 and e.logits_kept == 16 * 16 * 4
    assert e.total == 744 * 2 + 744 * 4 + 744 * 12 // 4 + 2048 + 2560 + 1024  # 12328 vs stage 0's 8928
    chunked = est(recompute="full", logits_chunk_tokens=4)
    # chunking shrinks the fp32 temporaries, not the kept logits
    assert chunked.logits == 4 * 16 * 10 and chunked.total == e.total - 2560 + 640


def test_without_distributed_optimizer_and_selective():
    assert est(recompute="none", distributed_optimizer=False).optimizer == 744 * 12  # last stage
    # selective (core attention + MLP): per layer 112 - 48 (MLP) = 64 B/token kept, plus one
    # layer's MLP re-run in backward: last stage 2 * 64 * 16 * 1 + 48 * 16 = 2816
    sel = est(recompute="selective")
    assert (sel.stage, sel.activations) == (1, 2816)
    assert sel.total == est(recompute="none").total - 3584 + 2816


def test_weight_sync_bucket_is_counted():
    assert est(weight_sync_bucket_bytes=1000).total == est().total + 1000
    default = estimate_memory(SMALL, DIMS, seq_len=16, micro_batch=2, overhead_gib=0.0)
    assert default.weight_sync == 512 << 20 and "weight sync" in default.format()


def test_single_gpu_no_sequence_parallel():
    e = estimate_memory(SMALL, ParallelDims(1, 1, 1, 1), seq_len=16, micro_batch=1, recompute="none",
                        overhead_gib=0.0)
    assert e.params_per_gpu == SMALL.total_params
    # residual 2*4*8 = 64, attention 2*(16+8) + 4*4 = 64, MLP 2*3*16 = 96 -> 224 bytes/token/layer
    assert e.activations == 4 * 224 * 16
    assert e.logits == 16 * 32 * 10 and e.logits_kept == 16 * 32 * 4


def test_qwen3_32b_paper_layout_fits_80gb():
    e = estimate_memory(PRESETS["qwen3_32b"], ParallelDims(tp=8, pp=2, cp=2, dp=2), seq_len=24576,
                        recompute="full", logits_chunk_tokens=4096)
    assert e.fits and e.total < 30 * GIB
    naive = estimate_memory(PRESETS["qwen3_32b"], ParallelDims(tp=8, pp=2, cp=1, dp=2), seq_len=24576,
                            recompute="none", distributed_optimizer=False)
    assert not naive.fits
    with pytest.raises(ValueError, match="DOES NOT FIT"):
        check_memory(naive)
    assert "fits" in e.format() and "GiB" in e.format()


@pytest.mark.parametrize("kwargs, match", [
    (dict(recompute="some"), "recompute"),
    (dict(seq_len=15), "2\\*cp"),
    (dict(logits_chunk_tokens=-1), "logits_chunk_tokens"),
    (dict(micro_batch_tokens=-1), "micro_batch_tokens"),
    (dict(micro_batch=0), "micro_batch"),
])
def test_bad_input_names_the_setting(kwargs, match):
    args = dict(seq_len=16, micro_batch=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        estimate_memory(SMALL, DIMS, **args)


def test_unresolved_dp_and_indivisible_heads():
    with pytest.raises(ValueError, match="parallel.dp"):
        estimate_memory(SMALL, ParallelDims(tp=2), seq_len=16)
    with pytest.raises(ValueError, match="num_attention_heads"):
        estimate_memory(SMALL, ParallelDims(tp=8, dp=1), seq_len=16)


def test_hf_config_reader(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"model_type": "qwen3", "hidden_size": 5120, "num_hidden_layers": 64, "num_attention_heads": 64,'
        ' "num_key_value_heads": 8, "intermediate_size": 25600, "vocab_size": 151936, "head_dim": 128,'
        ' "tie_word_embeddings": false}')
    assert model_dims_from_hf_config(tmp_path) == PRESETS["qwen3_32b"]
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(ValueError, match="num_attention_heads"):
        model_dims_from_hf_config(tmp_path)


def test_rollout_server_memory_by_hand():
    from ctpo_megatron.cluster.memory import estimate_rollout_memory

    r = estimate_rollout_memory(PRESETS["qwen3_32b"], 4)
    assert r.weights == 32_762_123_264 * 2 // 4
    # K and V x 64 layers x (8 kv heads / tp 4 = 2) x head_dim 128 x 2 bytes
    assert r.kv_bytes_per_token == 2 * 64 * 2 * 128 * 2 == 65536
    # 0.85 x 80 GiB = 73,014,444,032 bytes; minus weights 16,381,061,632 -> / 65536
    assert r.kv_tokens == (73_014_444_032 - 16_381_061_632) // 65536 == 864_156
    # TP 16 > 8 KV heads: each GPU keeps one (replicated) KV head
    assert estimate_rollout_memory(PRESETS["qwen3_32b"], 16).kv_bytes_per_token == 2 * 64 * 1 * 128 * 2
    with pytest.raises(ValueError, match="rollout_gpus_per_server"):
        # 61 GiB of bf16 weights on one GPU > 0.5 x 80 GiB
        estimate_rollout_memory(PRESETS["qwen3_32b"], 1, mem_fraction=0.5)
