"""The tiny run at context parallelism 2: the launcher's trainer command (`launch/ctpo_tiny.sh`
runs it after its setup) with `parallel.tp=1 parallel.cp=2` on 2 gloo ranks, a few short steps
through the real pipeline (embedded rollout server, sandboxed tools, weight resync) with every
response split zigzag over the two ranks and CTPO's prefix sums taken across them.

Asserts: the run completes every step, the loss and the step statistics it logs are finite,
the ranks trained on every generated token of the step (`actor/valid_tokens` is the whole
count, not a rank's share), the old log-probs the actor scores at CP 2 equal the rollout's,
every token's ratio is 1 while the weights stay put (untrained model: zero rewards, zero
gradients), and the clip-rate-by-position metrics are present. That CP 2 learns like CP 1 is
measured by hand (docs/training.md "Measured"); the loss's CP 2 = CP 1 equality, gradients
included, is `tests/dist/test_actor_context_parallel.py`.
"""

import json
import math

import pytest

from tests.e2e._trainer import run_trainer

pytestmark = pytest.mark.slow

STEPS = 2


def test_tiny_run_at_cp2_completes_with_finite_metrics(cold_tiny_inputs, tmp_path):
    run = tmp_path / "run"
    done = run_trainer(str(run), cold_tiny_inputs["model"], cold_tiny_inputs["train"], cold_tiny_inputs["val"], [
        f"trainer.total_steps={STEPS}", "trainer.prompts_per_step=4", "trainer.mini_batch_prompts=2",
        "rollout.n_samples=4", "trainer.eval_every=0", "trainer.save_every=0", "trainer.dump_every=1",
        "parallel.tp=1", "parallel.cp=2"])
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    assert "tp 1 x pp 1 x cp 2 x dp 1" in log, log[-4000:]
    assert "per-token dumps are off under context parallelism" in log, log[-4000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "actor/loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1)), records
    for r in steps:
        for key in ("actor/loss", "actor/grad_norm", "actor/clipfrac_total", "actor/is_ratio_mean",
                    "actor/ppo_kl"):
            assert math.isfinite(r[key]), (key, r)
        # both ranks' tokens were counted: the 2 updates (per-update valid tokens) cover every
        # generated token of the step's 4 prompts x 4 samples
        assert r["actor/valid_tokens"] * 2 == pytest.approx(r["generated_tokens/mean"] * 16, abs=0.5), r
        assert any(k.startswith("clip_rate_by_pos/") for k in r), sorted(r)
        # old log-probs scored by the actor at CP 2 (gathered back to response order) equal the
        # rollout server's, token by token
        assert r["mismatch/abs_log_prob_diff_max"] < 1e-4, r
        # the weights did not move (zero advantages), so every token's ratio pi/pi_old is 1:
        # old log-probs, masks and log-probs met at the same tokens in the local zigzag layout
        assert r["actor/grad_norm"] == 0 and r["reward/mean"] == 0, r
        assert abs(r["actor/is_ratio_max"] - 1) < 1e-3 and abs(r["actor/is_ratio_min"] - 1) < 1e-3, r
    assert not (run / "token_dumps").exists()
