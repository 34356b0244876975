"""GPU-path decisions checked on CPU: TE detection through megatron's TE extension, refusing
the local spec on a GPU, no [S, S] mask on a GPU, fusions with TE, no gloo groups, and which
rank fsyncs which checkpoint file."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import pytest
import torch

from ctpo_megatron.actor.checkpoint import files_written_by
from ctpo_megatron.actor.schedule import attention_mask
from ctpo_megatron.models import builder
from ctpo_megatron.models.builder import (
    LOCAL_SPEC, TE_EXTENSION, TE_SPEC, TEStatus, choose_layer_spec, transformer_engine_status,
)
from ctpo_megatron.models.config import fusion_flags

NO_TE = TEStatus(False, None, "not installed")
TE = TEStatus(True, "2.8.0", "")


def test_choose_layer_spec():
    assert choose_layer_spec(cuda=False, te=TE, allow_local_spec=False) == LOCAL_SPEC
    assert choose_layer_spec(cuda=False, te=NO_TE, allow_local_spec=False) == LOCAL_SPEC
    assert choose_layer_spec(cuda=True, te=TE, allow_local_spec=False) == TE_SPEC
    assert choose_layer_spec(cuda=True, te=NO_TE, allow_local_spec=True) == LOCAL_SPEC
    with pytest.raises(RuntimeError, match="not installed.*model.allow_local_spec=true"):
        choose_layer_spec(cuda=True, te=NO_TE, allow_local_spec=False)


def test_te_status_follows_megatrons_extension(monkeypatch):
    monkeypatch.setitem(sys.modules, TE_EXTENSION, None)  # the import raises ImportError
    status = transformer_engine_status()
    assert not status.available and TE_EXTENSION in status.reason and "ModuleNotFoundError" in status.reason

    missing = types.ModuleType(TE_EXTENSION)
    missing.HAVE_TE = False  # what the extension reports when transformer_engine is absent
    monkeypatch.setitem(sys.modules, TE_EXTENSION, missing)
    assert transformer_engine_status() == TEStatus(False, None, f"{TE_EXTENSION} imported but found "
                                                   "no transformer_engine (HAVE_TE=False)")

    present = types.ModuleType(TE_EXTENSION)
    present.HAVE_TE, present.te = True, types.SimpleNamespace(__version__="2.8.0")
    monkeypatch.setitem(sys.modules, TE_EXTENSION, present)
    assert transformer_engine_status() == TE


def test_real_extension_without_te_is_reported_absent():
    # This environment has megatron-core but no TransformerEngine.
    assert not transformer_engine_status().available


def test_resolve_use_te_refuses_silent_fallback_on_gpu(monkeypatch, caplog):
    monkeypatch.setattr(builder, "runs_on_cuda", lambda: True)
    monkeypatch.setattr(builder, "transformer_engine_status", lambda: NO_TE)
    with pytest.raises(RuntimeError, match="allow_local_spec"):
        builder.resolve_use_te()
    with caplog.at_level(logging.INFO, logger=builder.__name__):
        assert builder.resolve_use_te(allow_local_spec=True) is False
    assert "layer spec: local (device=cuda, TransformerEngine absent: not installed)" in caplog.text
    monkeypatch.setattr(builder, "transformer_engine_status", lambda: TE)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=builder.__name__):
        assert builder.resolve_use_te() is True
    assert "layer spec: transformer_engine (device=cuda, TransformerEngine 2.8.0)" in caplog.text


def test_no_materialized_mask_on_gpu():
    assert attention_mask(8, torch.device("cuda", 0), context_parallel=False) is None
    assert attention_mask(8, torch.device("cpu"), context_parallel=True) is None
    mask = attention_mask(4, torch.device("cpu"), context_parallel=False)
    assert mask.shape == (1, 1, 4, 4) and mask[0, 0, 0, 1] and not mask[0, 0, 1, 0]


def test_fusions_on_only_with_te():
    on = fusion_flags(use_te=True, have_wgrad_kernel=True)
    assert on["bias_activation_fusion"] and on["apply_rope_fusion"] and on["gradient_accumulation_fusion"]
    # megatron's own output layer refuses gradient-accumulation fusion without APEX's kernel
    assert not fusion_flags(use_te=True, have_wgrad_kernel=False)["gradient_accumulation_fusion"]
    assert not any(fusion_flags(use_te=False, have_wgrad_kernel=True).values())


def test_transformer_config_local_spec_has_no_fusions():
    from ctpo_megatron.models.config import transformer_config
    from ctpo_megatron.parallel.dims import ParallelDims
    from ctpo_megatron.models.config import model_spec_from_hf

    hf = _tiny_hf_config()
    dims = ParallelDims(tp=1, pp=1, cp=1, dp=1)
    cfg = transformer_config(model_spec_from_hf(hf, dims), dims)
    assert not (cfg.bias_activation_fusion or cfg.apply_rope_fusion or cfg.gradient_accumulation_fusion)
    sel = transformer_config(model_spec_from_hf(hf, dims), dims, recompute="selective")
    assert sel.recompute_granularity == "selective" and sel.recompute_modules == ["core_attn", "mlp"]
    with pytest.raises(ValueError, match="recompute='some'"):
        transformer_config(model_spec_from_hf(hf, dims), dims, recompute="some")


def test_every_checkpoint_file_is_fsynced_by_its_writer(tmp_path: Path):
    for name in ("__0_0.distcp", "__0_1.distcp", "__1_0.distcp", "emb__3_0.distcp", ".metadata",
                 "common.pt", "metadata.json"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "__2_0.distcp").write_bytes(b"x")
    owned = {rank: files_written_by(tmp_path, rank) for rank in range(4)}
    names = {rank: sorted(p.name for p in paths if p.is_file()) for rank, paths in owned.items()}
    assert names[1] == ["__1_0.distcp"] and names[2] == ["__2_0.distcp"] and names[3] == ["emb__3_0.distcp"]
    assert names[0] == [".metadata", "__0_0.distcp", "__0_1.distcp", "common.pt", "metadata.json"]
    assert [p for p in owned[0] if p.is_dir()] == [tmp_path / "sub", tmp_path]  # deepest first
    every = [p for paths in owned.values() for p in paths]
    assert len(every) == len(set(every)) == 8 + 2  # 8 files + 2 directories, each once


def _init_parallel_spy(rank, world_size):
    from megatron.core import parallel_state

    from ctpo_megatron.parallel import state

    calls = []
    real = parallel_state.initialize_model_parallel

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    parallel_state.initialize_model_parallel = spy
    state.is_cpu_mode = lambda: False  # as on a GPU run, should the decision read it again
    from ctpo_megatron.parallel.dims import ParallelDims

    state.init_parallel(ParallelDims(tp=1, pp=1, cp=1, dp=-1))
    return (calls[0]["create_gloo_process_groups"],
            getattr(parallel_state, "_DATA_PARALLEL_GROUP_GLOO", None) is None)


@pytest.mark.dist
def test_no_gloo_groups_on_gpu_runs():
    from ctpo_megatron.parallel.spawn import run_on_ranks

    assert run_on_ranks(_init_parallel_spy, 1) == [(False, True)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_te_is_used_or_the_local_spec_refused(monkeypatch):
    monkeypatch.setenv("CTPO_CPU_MODE", "off")
    if transformer_engine_status().available:
        assert builder.resolve_use_te() is True
    else:
        with pytest.raises(RuntimeError, match="allow_local_spec"):
            builder.resolve_use_te()
        assert builder.resolve_use_te(allow_local_spec=True) is False


def test_selective_recompute_is_offered_through_the_config():
    from ctpo_megatron.cluster.train_memory import estimate_for_train_config, memory_what_ifs
    from ctpo_megatron.config.store import load_config
    from ctpo_megatron.parallel.dims import ParallelDims

    dims = ParallelDims(tp=8, pp=2, cp=1, dp=2)
    full = load_config()  # Qwen3-32B with model.recompute_activations=true
    sel = load_config(["model.recompute_granularity=selective"])
    assert sel.actor_config(dims).recompute and sel.actor_config(dims).recompute_granularity == "selective"
    e_full, e_sel = (estimate_for_train_config(c, dims) for c in (full, sel))
    assert e_full.activations < e_sel.activations
    assert memory_what_ifs(full, dims)["with selective recompute"] * 2**30 == pytest.approx(e_sel.total)
    assert "with full recompute" in memory_what_ifs(sel, dims)
    with pytest.raises(Exception, match="recompute_granularity"):
        load_config(["model.recompute_granularity=some"])


def test_selective_recompute_skips_core_attention_under_te(monkeypatch):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ctpo_megatron.models import config as model_config
    from ctpo_megatron.parallel.dims import ParallelDims

    seen = {}
    # TE's fusions cannot be validated without TE: record the kwargs instead of building.
    monkeypatch.setattr(TransformerConfig, "__init__", lambda self, **kw: seen.update(kw))
    hf = _tiny_hf_config()
    dims = ParallelDims(tp=1, pp=1, cp=1, dp=1)
    model_config.transformer_config(model_config.model_spec_from_hf(hf, dims), dims,
                                    recompute="selective", use_te=True)
    assert seen["recompute_modules"] == ["mlp"] and seen["apply_rope_fusion"]


def _tiny_hf_config():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, architectures=["Qwen2ForCausalLM"])
