"""HF config -> ModelSpec / TransformerConfig, and the errors for what cannot be converted."""

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config, Qwen3Config

from ctpo_megatron.actor.batching import TokenBatch, build_micro_batch
from ctpo_megatron.models.config import model_spec_from_hf, padded_vocab_size, transformer_config
from ctpo_megatron.parallel import ParallelDims

SMALL = dict(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2)


def _arch(cfg, name):
    cfg.architectures = [name]
    return cfg


def test_qwen2_qwen3_llama_fields():
    q2 = model_spec_from_hf(_arch(Qwen2Config(**SMALL), "Qwen2ForCausalLM"), ParallelDims(tp=2))
    assert (q2.qkv_bias, q2.qk_layernorm, q2.num_query_groups, q2.head_dim) == (True, False, 2, 16)
    assert q2.padded_vocab_size == 256  # 200 -> multiple of 128 * tp
    q3 = model_spec_from_hf(_arch(Qwen3Config(**SMALL, head_dim=24), "Qwen3ForCausalLM"), ParallelDims())
    assert (q3.qkv_bias, q3.qk_layernorm, q3.head_dim) == (False, True, 24)
    tc = transformer_config(q3, ParallelDims(), params_dtype="bfloat16")
    assert (tc.kv_channels, tc.qk_layernorm, tc.add_qkv_bias, tc.bf16) == (24, True, False, True)
    assert tc.gated_linear_unit and tc.normalization == "RMSNorm"


def test_llama3_rope_scaling_matches_transformers():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = _arch(LlamaConfig(**SMALL, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}), "LlamaForCausalLM")
    spec = model_spec_from_hf(cfg, ParallelDims())
    torch.testing.assert_close(spec.rope_inv_freq, LlamaRotaryEmbedding(cfg).inv_freq, rtol=0, atol=0)
    plain = model_spec_from_hf(_arch(LlamaConfig(**SMALL), "LlamaForCausalLM"), ParallelDims())
    assert not torch.equal(plain.rope_inv_freq, spec.rope_inv_freq)  # the scaling changed it


@pytest.mark.parametrize("make, dims, match", [
    (lambda: _arch(Qwen2Config(**SMALL), "GPT2LMHeadModel"), ParallelDims(), "unsupported architecture"),
    (lambda: _arch(Qwen2Config(**SMALL), "Qwen2ForCausalLM"), ParallelDims(tp=4), "num_key_value_heads=2"),
    (lambda: _arch(Qwen2Config(**SMALL), "Qwen2ForCausalLM"), ParallelDims(pp=3), "num_hidden_layers=4"),
    (lambda: _arch(LlamaConfig(**SMALL, attention_bias=True), "LlamaForCausalLM"), ParallelDims(), "attention_bias"),
    (lambda: _arch(LlamaConfig(**SMALL, hidden_act="gelu"), "LlamaForCausalLM"), ParallelDims(), "hidden_act"),
    (lambda: _arch(LlamaConfig(**SMALL, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
                   "LlamaForCausalLM"), ParallelDims(), "dynamic"),
])
def test_clear_errors(make, dims, match):
    with pytest.raises(ValueError, match=match):
        model_spec_from_hf(make(), dims)


def test_world_size_not_multiple_of_tp_pp():
    with pytest.raises(ValueError, match="not a multiple of"):
        ParallelDims(tp=2, pp=2).resolve(6)


def test_padded_vocab_and_overrides():
    assert padded_vocab_size(151936, 8, 128) == 152576
    spec = model_spec_from_hf(_arch(Qwen2Config(**SMALL), "Qwen2ForCausalLM"), ParallelDims())
    with pytest.raises(ValueError, match="not_a_field"):
        transformer_config(spec, ParallelDims(), overrides={"not_a_field": 1})


def test_micro_batch_scores_only_response_tokens():
    samples = [{"prompt_ids": [5, 6, 7], "response_ids": [8, 9]},
               {"prompt_ids": [1], "response_ids": [2, 3, 4], "response_mask": [1, 0, 1]}]
    mb = build_micro_batch(TokenBatch.from_samples(samples, ("response_mask",)), batch_size=3, seq_len=6)
    assert mb.tokens.tolist() == [[5, 6, 7, 8, 9, 0], [1, 2, 3, 4, 0, 0], [0] * 6]
    # response token j of sample i is predicted by position P_i + j - 1 (flat row i * S + pos)
    assert mb.rows.tolist() == [2, 3, 6, 7, 8] and mb.targets.tolist() == [8, 9, 2, 3, 4]
    assert mb.fields["response_mask"].tolist() == [[1, 1, 0], [1, 0, 1], [0, 0, 0]]
    scattered = mb.scatter(mb.targets.float())
    assert [scattered[i, :n].tolist() for i, n in enumerate(mb.response_lengths)] == [[8, 9], [2, 3, 4]]
    with pytest.raises(ValueError, match=r"samples\[0\].prompt_ids is empty"):
        TokenBatch.from_samples([{"prompt_ids": [], "response_ids": [1]}]).check(max_len=10, vocab_size=10)
    with pytest.raises(ValueError, match=r"samples\[1\].response_mask has 2 values, expected 3"):
        TokenBatch.from_samples([samples[0], dict(samples[1], response_mask=[1, 0])], ("response_mask",))
