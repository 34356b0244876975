"""The real trainer at a deadline it cannot meet: `trainer.deadline.end_time` already passed.

Before step 1's weight sync the trainer finds that no further step (plus checkpoint and margin)
fits, so it skips that sync, checkpoints step 1, writes `status.json` `stopped` and exits 0:
the job script would requeue it (steps remain). Deterministic: the end lies in the past.
"""

import json

import pytest

from tests.e2e._trainer import run_trainer

pytestmark = pytest.mark.slow



def test_trainer_past_its_deadline_skips_the_sync_saves_and_stops(cold_tiny_inputs, tmp_path):
    run = tmp_path / "run"
    done = run_trainer(str(run), cold_tiny_inputs["model"], cold_tiny_inputs["train"], cold_tiny_inputs["val"], [
        "trainer.total_steps=3", "trainer.prompts_per_step=2", "trainer.mini_batch_prompts=2",
        "rollout.n_samples=2", "trainer.eval_every=0", "trainer.save_every=0",
        "trainer.deadline.end_time=1000000000"])  # September 2001
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    assert "stopping: the job ends in -" in log and "another step needs" in log, log[-4000:]
    assert "weight sync (" not in log, log[-4000:]  # step 1's sync was skipped: the run stops anyway
    assert "checkpoint saved at step 1" in log and "stopping after step 1 on request" in log
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped" and status["step"] == 1 and status["total_steps"] == 3
    assert status["checkpoint_s"] > 0 and status["step_s"] > 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1] and "time/weight_sync" not in records[0]
