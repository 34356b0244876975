"""Context parallelism on 4 ranks (one start-up for all of it): the actor's log-probs at
TP2 x CP2 vs transformers, the CP core attention vs full attention at CP 4 and CP 2, and the
CTPO loss at CP 2 vs CP 1 (values, gradients, positions)."""

import pytest
import torch

from ctpo_megatron.parallel.spawn import run_on_ranks
from tests._tiny_hf import BUILDERS, hf_response_log_probs, random_samples
from tests.dist.cp_checks import check_cp_attention, check_cp_loss, check_trainer_loss

pytestmark = pytest.mark.dist


def _samples():
    """Ragged lengths (most not a multiple of 2*cp = 4), a one-token prompt, and a one-token
    response alone in the last micro-batch (so one CP rank scores nothing there)."""
    samples = random_samples(5, seed=31, max_len=14)
    samples[4]["response_ids"] = samples[4]["response_ids"][:1]
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
        # lists, not tensors: tensors would cross the result queue as shared-memory handles
        out[name] = ([t.tolist() for t in lps], [t.tolist() for t in ents], seen)
    out["attention"] = {c: check_cp_attention(c) for c in (world_size, 2)}
    out["loss"] = check_cp_loss(2, *_loss_batch())
    out["trainer_loss"] = check_trainer_loss(2, *_loss_batch(), EDGES)
    return out


EDGES = [1, 2, 4, 8]
"""Clip-rate position buckets for the loss batch (responses of up to 16 tokens)."""


def _loss_batch():
    """Ragged samples with tool-output spans, an all-masked response, a length-1 response, and
    current log-probs near the old ones."""
    samples = random_samples(6, seed=41, max_len=17)
    samples[0]["response_ids"] = samples[0]["response_ids"][:1]
    gen = torch.Generator().manual_seed(42)
    current = []
    for i, s in enumerate(samples):
        r = len(s["response_ids"])
        old = -torch.rand(r, generator=gen, dtype=torch.float64) * 3
        mask = (torch.rand(r, generator=gen) > 0.3).float() if i != 3 else torch.zeros(r)
        s.update(old_log_probs=old.tolist(), advantages=[1.0 if i % 2 else -0.5] * r,
                 response_mask=mask.tolist(), rollout_is_weights=(1 + 0.1 * torch.rand(r, generator=gen)).tolist())
        current.append((old + 0.2 * torch.randn(r, generator=gen, dtype=torch.float64)).tolist())
    return samples, current


@pytest.fixture(scope="module")
def cp_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("cp")
    dirs = {name: str(BUILDERS[name](tmp_path / name, num_hidden_layers=2)) for name in ("llama", "qwen2", "qwen3")}
    return dirs, run_on_ranks(_log_probs, 4, dirs, 2, 2, {"qwen3": True}, timeout=600)


def test_tp2_cp2_log_probs_match_transformers(cp_run):
    """TP2 x CP2 (4 ranks) on Llama, Qwen2 and Qwen3 (2 layers, GQA; Qwen3 also with sequence
    parallelism): log-probs and entropy within 1e-5 of transformers' float32, while every rank's
    decoder sees only S/(cp*tp) (SP) or S/cp tokens."""
    dirs, results = cp_run
    result = results[0]
    samples = _samples()
    longest = max(len(s["prompt_ids"]) + len(s["response_ids"]) for s in samples[:2])
    for name, model_dir in dirs.items():
        want_lp, want_ent = hf_response_log_probs(model_dir, samples, with_entropy=True)
        lps, ents, seen = result[name]
        for got, want in zip(lps, want_lp):
            torch.testing.assert_close(torch.tensor(got), want, rtol=0, atol=1e-5, msg=name)
        for got, want in zip(ents, want_ent):
            torch.testing.assert_close(torch.tensor(got), want, rtol=0, atol=1e-5, msg=name)
        padded = -(-longest // 8) * 8 if name == "qwen3" else -(-longest // 4) * 4
        assert seen[0] == padded // (4 if name == "qwen3" else 2), (name, seen)


def test_cp_attention_equals_full_causal_attention(cp_run):
    """CP 4 and CP 2 (GQA 4 heads / 2 groups): output and the q, k, v gradients (k/v gradients
    reduce-scattered back to their owners) equal full causal attention in float64."""
    for rank, result in enumerate(cp_run[1]):
        for cp, errors in result["attention"].items():
            for name, err in errors.items():
                assert err < 1e-12, (rank, cp, name, err)


def test_ctpo_loss_at_cp2_equals_cp1(cp_run):
    """The loss through `context_parallel_policy_loss` on each rank's zigzag part (prefix sums
    over CP) equals CP 1 on the whole batch: loss, gradient and positions, float64, on every
    rank, for CTPO cumprod-LA, geomean-LA and GRPO."""
    for rank, result in enumerate(cp_run[1]):
        for name, err in result["loss"].items():
            assert err["grad_scale"] > 1e-3, (rank, name)  # the gradient is not trivially zero
            assert err["loss"] < 1e-12 and err["grad"] < 1e-12 and err["positions"] == 0, (rank, name, err)


def test_trainer_loss_at_cp2_equals_cp1(cp_run):
    """The trainer's loss closure (`make_loss_fn`) at CP 2 equals CP 1 on the same batch: every
    step metric from its `LossSums` reduced over CP (loss, token counts, clip rates, KL, ratio
    mean/min/max, LA scale, and clip rates by GLOBAL position bucket) within 1e-6, and the
    gradient; ratio quantiles are per-piece order statistics under CP and are left out."""
    for rank, result in enumerate(cp_run[1]):
        for name, err in result["trainer_loss"].items():
            m1 = err["cp1"]
            assert m1["clipfrac_total"] > 0 and m1["valid_tokens"] > 20, (name, m1)  # not trivial
            assert sum(k.startswith("clip_rate_by_pos/") for k in m1) == len(EDGES), sorted(m1)
            assert err["keys_equal"], (rank, name)
            assert err["metrics"] < 1e-6 and err["grad"] < 1e-12 and err["position_tokens"] == 0, (rank, name, err)
