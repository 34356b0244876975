"""Megatron policy log-probs equal transformers' own float32 log-probs (Llama, Qwen2, Qwen3;
GQA; tied and untied; single-file, sharded and bf16 checkpoints) at TP1, TP2, PP2 and TP2xPP2,
with ragged batches; HF export round trip is bit-exact.

One 4-rank spawn runs every layout and model (re-initializing the parallel groups in between)
to pay process start-up once.
"""

import json
import shutil

import pytest
import torch

from ctpo_megatron.parallel.spawn import run_on_ranks
from tests._tiny_hf import build_llama, build_qwen2, build_qwen3, hf_response_log_probs, random_samples

pytestmark = pytest.mark.dist

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
TEMPERATURE = 0.7


def _layouts(rank, world_size, models, samples, export_root, bad_dir):
    from safetensors import safe_open

    from ctpo_megatron.actor import ActorConfig, PolicyActor
    from ctpo_megatron.parallel import ParallelDims

    results = {}
    for name, model_dir in models.items():
        for tp, pp in LAYOUTS:
            # Chunks of 4 tokens and micro-batches of 2 exercise the chunk loop and PP filler rows.
            cfg = ActorConfig(hf_model_dir=model_dir, dims=ParallelDims(tp=tp, pp=pp),
                              micro_batch_size=2, logprob_chunk_size=4, temperature=TEMPERATURE)
            actor = PolicyActor(cfg)
            lps, ents = actor.compute_log_probs(samples, with_entropy=True)
            results[(name, tp, pp)] = ([t.tolist() for t in lps], [t.tolist() for t in ents])
            if (tp, pp) == (2, 2):
                out = f"{export_root}/{name}"
                actor.export_hf(out)
                if rank == 0:  # bit-exact: compare raw bytes of every tensor
                    with open(f"{model_dir}/config.json") as f:
                        assert json.load(f) == json.load(open(f"{out}/config.json"))
                    src = _tensors(model_dir, safe_open)
                    dst = _tensors(out, safe_open)
                    assert src.keys() == dst.keys(), (name, src.keys() ^ dst.keys())
                    for key in src:
                        assert src[key].dtype == dst[key].dtype and torch.equal(src[key], dst[key]), key
    # A checkpoint whose tensors do not match its config: the error names the tensor.
    try:
        PolicyActor(ActorConfig(hf_model_dir=bad_dir, dims=ParallelDims(tp=2, pp=2)))
    except ValueError as e:
        results["bad"] = str(e)
    return results


def _tensors(model_dir, safe_open):
    import glob

    out = {}
    for path in glob.glob(f"{model_dir}/*.safetensors"):
        with safe_open(path, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_log_probs_match_transformers_across_layouts(tmp_path):
    models = {
        "llama_tied_gqa": build_llama(tmp_path / "llama"),
        "qwen2_untied_bias_sharded": build_qwen2(tmp_path / "qwen2_src"),
        "qwen3_tied_qknorm_bf16": build_qwen3(tmp_path / "qwen3", dtype=torch.bfloat16),
    }
    # Re-save Qwen2 as a sharded checkpoint (several files + index) to exercise that reader.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(models["qwen2_untied_bias_sharded"]).save_pretrained(
        tmp_path / "qwen2", max_shard_size="60KB")
    models["qwen2_untied_bias_sharded"] = tmp_path / "qwen2"
    assert (tmp_path / "qwen2" / "model.safetensors.index.json").is_file()
    models = {k: str(v) for k, v in models.items()}
    bad = tmp_path / "bad"
    shutil.copytree(models["llama_tied_gqa"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=128)))
    samples = random_samples(5, seed=7)  # ragged: 3..19 prompt and response tokens
    results = run_on_ranks(_layouts, 4, models, samples, str(tmp_path / "export"), str(bad),
                           timeout=600)
    for r in results:
        assert "model.layers.0.mlp.gate_proj.weight" in r["bad"] or \
            "model.layers.2.mlp.gate_proj.weight" in r["bad"], r["bad"]  # first layer of each stage
        assert "(96, 64), expected (128, 64)" in r["bad"]
    for name, model_dir in models.items():
        ref_lp, ref_ent = hf_response_log_probs(model_dir, samples, temperature=TEMPERATURE,
                                                with_entropy=True)
        for tp, pp in LAYOUTS:
            for rank in range(4):
                lps, ents = results[rank][(name, tp, pp)]
                assert [len(x) for x in lps] == [len(s["response_ids"]) for s in samples]
                for got, want in zip(lps, ref_lp):
                    # The issue's bar: float32 log-probs within 1e-4 of transformers'.
                    torch.testing.assert_close(torch.tensor(got), want, rtol=0, atol=1e-4,
                                               msg=f"{name} tp{tp} pp{pp} rank{rank}")
                for got, want in zip(ents, ref_ent):
                    torch.testing.assert_close(torch.tensor(got), want, rtol=0, atol=1e-4,
                                               msg=f"entropy {name} tp{tp} pp{pp} rank{rank}")
