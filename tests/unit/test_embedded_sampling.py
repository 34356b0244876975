"""The embedded server's batched sampler and its simulated-latency mode (no HTTP: the pieces
the scheduler thread calls per decode step)."""

import pytest
import torch

from ctpo_megatron.rollout.serving.server import scheduler as scheduler_mod
from ctpo_megatron.rollout.serving.server.sampling import SamplingParams, sample_next, sample_rows
from ctpo_megatron.rollout.serving.server.scheduler import DECODE_DELAY_ENV, Scheduler, SimulatedDecode


def _params(kind: int) -> SamplingParams:
    """A mix the server sees: plain, temperature + top-p, top-k, min-p, greedy."""
    return [SamplingParams(), SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(top_k=5),
            SamplingParams(temperature=1.3, min_p=0.05), SamplingParams(temperature=0.0, top_k=1)][kind % 5]


@pytest.mark.parametrize("vocab, rounded", [(128, False), (1000, False), (151, True)])
def test_sample_rows_equals_sample_next_bit_for_bit(vocab, rounded):
    """Same tokens and log-probs as row-by-row sampling, over several steps of the same seeded
    generators, with mixed parameters, masked stop tokens and (rounded logits) tied probabilities."""
    torch.manual_seed(vocab)
    rows = 37
    logits = torch.randn(rows, vocab) * 4
    params = [_params(i) for i in range(rows)]
    banned = [frozenset({1, 2}) if i % 6 == 0 else frozenset() for i in range(rows)]
    one = [torch.Generator().manual_seed(i) for i in range(rows)]
    batched = [torch.Generator().manual_seed(i) for i in range(rows)]
    for _ in range(4):
        step = torch.round(logits) if rounded else logits
        expected = [sample_next(step[i], params[i], one[i], banned[i]) for i in range(rows)]
        assert sample_rows(step, params, batched, banned) == expected
        logits = logits + torch.randn(rows, vocab)
    assert len({tok for tok, _ in expected}) > 1  # really sampled, not one constant token


def test_simulated_decode_sleeps_only_the_remainder(monkeypatch):
    slept = []
    monkeypatch.setattr(scheduler_mod.time, "sleep", slept.append)
    sim = SimulatedDecode(0.010)
    sim.finish_step(0.004)
    sim.finish_step(0.015)  # compute over the setting: no sleep, counted
    assert slept == [pytest.approx(0.006)]
    assert (sim.steps, sim.over, sim.compute_s) == (2, 1, pytest.approx(0.019))
    assert sim.summary() == "simulated decode: 2 steps of 10.0 ms, compute 9.50 ms/step, 1 steps over the setting"


@pytest.mark.parametrize("value", ["abc", "-0.01", "nan"])
def test_bad_decode_delay_names_the_setting(monkeypatch, value):
    monkeypatch.setenv(DECODE_DELAY_ENV, value)
    with pytest.raises(ValueError, match=DECODE_DELAY_ENV):
        Scheduler(runner=None)


def test_decode_delay_off_by_default(monkeypatch):
    monkeypatch.delenv(DECODE_DELAY_ENV, raising=False)
    sched = Scheduler(runner=None)
    try:
        assert sched.sim is None
    finally:
        sched.shutdown()
    monkeypatch.setenv(DECODE_DELAY_ENV, "0.02")
    sched = Scheduler(runner=None)
    try:
        assert sched.sim is not None and sched.sim.delay_s == 0.02
    finally:
        sched.shutdown()
