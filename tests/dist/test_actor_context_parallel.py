"""The policy actor at context parallelism 2: log-probs vs transformers, the CTPO loss at CP 2
vs CP 1, and checkpoints resharded between CP 2 and CP 1."""

import pytest
import torch

from ctpo_megatron.parallel.spawn import run_on_ranks
from tests._tiny_hf import BUILDERS, hf_response_log_probs, random_samples

pytestmark = pytest.mark.dist


def _samples():
    """Ragged lengths (none a multiple of 2*cp = 4 for most), one response of length 1."""
    samples = random_samples(5, seed=31, max_len=14)
    samples[1]["response_ids"] = samples[1]["response_ids"][:1]
    samples[2]["prompt_ids"] = samples[2]["prompt_ids"][:1]
    return samples


def _log_probs(rank, world_size, model_dirs, tp, cp, sequence_parallel):
    from ctpo_megatron.actor import ActorConfig, PolicyActor
    from ctpo_megatron.parallel import ParallelDims

    out = {}
    for name, model_dir in model_dirs.items():
        cfg = ActorConfig(hf_model_dir=model_dir, dims=ParallelDims(tp=tp, cp=cp), micro_batch_size=2,
                          logprob_chunk_size=7, sequence_parallel=sequence_parallel.get(name, False))
        actor = PolicyActor(cfg)
        seen = []
        hook = actor.model[0].module.decoder.register_forward_pre_hook(
            lambda _m, args, kwargs: seen.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
        lps, ents = actor.compute_log_probs(_samples(), with_entropy=True)
        hook.remove()
        out[name] = (lps, ents, seen)
    return out if rank == 0 else None


def test_tp2_cp2_log_probs_match_transformers(tmp_path):
    """TP2 x CP2 (4 ranks) on Llama, Qwen2 and Qwen3 (2 layers, GQA; Qwen3 also with sequence
    parallelism): log-probs and entropy within 1e-5 of transformers' float32, while every rank's
    decoder sees only S/(cp*tp) (SP) or S/cp tokens."""
    dirs = {name: str(BUILDERS[name](tmp_path / name, num_hidden_layers=2)) for name in ("llama", "qwen2", "qwen3")}
    samples = _samples()
    result = run_on_ranks(_log_probs, 4, dirs, 2, 2, {"qwen3": True}, timeout=400)[0]
    longest = max(len(s["prompt_ids"]) + len(s["response_ids"]) for s in samples[:2])
    for name, model_dir in dirs.items():
        want_lp, want_ent = hf_response_log_probs(model_dir, samples, with_entropy=True)
        lps, ents, seen = result[name]
        for got, want in zip(lps, want_lp):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=name)
        for got, want in zip(ents, want_ent):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=name)
        padded = -(-longest // 8) * 8 if name == "qwen3" else -(-longest // 4) * 4
        assert seen[0] == padded // (4 if name == "qwen3" else 2), (name, seen)
