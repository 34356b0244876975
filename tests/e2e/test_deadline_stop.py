"""The real trainer at a deadline it cannot meet: `trainer.deadline.end_time` already passed.

Before step 1's weight sync the trainer finds that no further step (plus checkpoint and margin)
fits, so it skips that sync, checkpoints step 1, writes `status.json` `stopped` and exits 0:
the job script would requeue it (steps remain). Deterministic: the end lies in the past.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    from ctpo_megatron.data.tiny_setup import TinySetupConfig, prepare_tiny_run
    from ctpo_megatron.data.warm_start import WarmStartConfig

    return prepare_tiny_run(str(tmp_path_factory.mktemp("tiny")), TinySetupConfig(warm_start=WarmStartConfig(steps=0)))


def test_trainer_past_its_deadline_skips_the_sync_saves_and_stops(inputs, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ctpo_megatron.train", "--config-name", "tiny", f"trainer.run_dir={run}",
           f"model.path={inputs['model']}", f"data.train_files=[{inputs['train']}]",
           f"data.val_files=[{inputs['val']}]", "trainer.total_steps=3", "trainer.prompts_per_step=2",
           "trainer.mini_batch_prompts=2", "rollout.n_samples=2", "trainer.eval_every=0",
           "trainer.save_every=0", "trainer.deadline.end_time=1000000000"]  # September 2001
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
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
