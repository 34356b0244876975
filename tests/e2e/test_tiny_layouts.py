"""The tiny run's trainer (the command `launch/ctpo_tiny.sh` runs after its setup) in other
layouts and schedules, compared with one synchronous run made in the same session: TP 2 against
DP 2, rollouts one step ahead, and asynchronous dynamic sampling killed with SIGKILL and resumed.
"""

import os
import re
import time

import pytest

from tests.e2e._launch import BUDGET_S, TIMEOUT_S, Launch, read_records
from tests.e2e._trainer import run_trainer, trainer_command

pytestmark = [pytest.mark.slow, pytest.mark.timeout(TIMEOUT_S)]


# The synchronous run that the other layouts and the asynchronous run are compared with. It is
# recorded on this machine, not kept in the repo: the rollouts sample from a model warm-started by
# 400 SFT steps, so every sampled token depends on the CPU's float kernels, and a recording
# from one machine type fails on another.
REFERENCE_ARGS = ["parallel=tp1", "trainer.total_steps=3", "trainer.prompts_per_step=4",
                  "trainer.mini_batch_prompts=2", "trainer.eval_every=3", "trainer.eval_samples=2",
                  "data.max_val_prompts=8", "trainer.save_every=0", "trainer.tensorboard=false",
                  "rollout.n_samples=4", "actor.micro_batch_size=2"]
ROLLOUT_KEYS = ("reward/", "eval/", "accuracy", "response_length/", "generated_tokens/", "tool/", "boxed_rate",
                "data/", "sampling/")
"""Values that depend only on the rollouts (and so on the weights the servers hold)."""


def _rollout_values(record: dict) -> dict:
    return {k: v for k, v in record.items() if k.startswith(ROLLOUT_KEYS)}


@pytest.fixture(scope="module")
def sync_reference(tiny_init, tmp_path_factory) -> list[dict]:
    """The records of the synchronous run of REFERENCE_ARGS: TP 1 x DP 2 on 2 ranks, 3 steps of
    2 updates x 2 micro-batches, held-out evaluation at steps 0 and 3."""
    run = str(tmp_path_factory.mktemp("sync") / "run")
    done = run_trainer(run, f"{tiny_init}/model", f"{tiny_init}/train.parquet", f"{tiny_init}/val.parquet",
                       REFERENCE_ARGS)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    records = read_records(run)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    return records


def test_tp2_run_equals_the_dp2_run(tiny_init, sync_reference, tmp_path):
    """The same run at TP 2 x DP 1 (one replica gets the whole step batch) and at TP 1 x DP 2
    (each replica gets its shard of it) gives the same rollouts, rewards, held-out results and
    data position at every step, and the same loss statistics, losses and gradient norms to
    1e-4 (the layouts sum in different orders, and the embedded server's log-probs vary by
    ~1e-7 with how requests happen to be batched, which moves the IS weights by as much). A
    replica that trained on the wrong shard, or twice on one, changes the loss and grad norm."""
    run = str(tmp_path / "run")
    done = run_trainer(run, f"{tiny_init}/model", f"{tiny_init}/train.parquet", f"{tiny_init}/val.parquet",
                       [a for a in REFERENCE_ARGS if not a.startswith("parallel=")] + ["parallel=tp2"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    records = read_records(run)
    assert "world size 2 = tp 2 x pp 1 x cp 1 x dp 1" in open(os.path.join(run, "train.log")).read()
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    for ref, new in zip(sync_reference, records):
        assert _rollout_values(new) == _rollout_values(ref), ref["step"]
        actor = [k for k in ref if k.startswith(("actor/", "clip_rate_by_pos/"))]
        assert actor or not ref["step"]
        for key in actor:
            # A ratio within ~1e-7 of a histogram bin edge may land in the next bin (2^-10 wide).
            rel = 3e-3 if key.startswith(("actor/is_ratio_p", "actor/la_scale_p")) else 1e-4
            assert new[key] == pytest.approx(ref[key], rel=rel, abs=1e-6), (ref["step"], key)
        if ref["step"]:
            assert new["staleness/0"] == 1.0 and new["staleness/max"] == 0.0  # synchronous


def test_rollouts_run_one_step_ahead(tiny_init, sync_reference, tmp_path):
    """rollout.max_staleness=1: step s+1's rollouts are generated while step s trains. Step 1
    matches the synchronous run (same weights, same seed); later steps train on tokens at most
    one version old; the data position advances exactly as in the synchronous run."""
    run = str(tmp_path / "run")
    done = run_trainer(run, f"{tiny_init}/model", f"{tiny_init}/train.parquet", f"{tiny_init}/val.parquet",
                       [*REFERENCE_ARGS, "rollout.max_staleness=1"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    records = read_records(run)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert _rollout_values(records[1]) == _rollout_values(sync_reference[1])
    assert records[1]["actor/loss"] == pytest.approx(sync_reference[1]["actor/loss"], rel=1e-4)
    for r, ref in zip(records[1:], sync_reference[1:]):
        assert r["data/offset"] == ref["data/offset"]
        assert r["staleness/max"] <= 1.0 and "rollout/partial" in r and 0 <= r["perf/trainer_idle_frac"] <= 1
    assert records[1]["staleness/0"] == 1.0  # generated with the initial weights for step 1
    # generation of step s+1 starts as step s starts training, before its weights reach the
    # servers: some of those tokens come from the previous version
    assert max(records[2]["staleness/mean"], records[3]["staleness/mean"]) > 0


def test_async_dynamic_sampling_resumes_exactly_after_sigkill(tiny_init, tmp_path):
    """rollout.max_staleness=1 with dynamic sampling: the producer over-samples ahead. Killed
    with SIGKILL after step 3 (checkpoint after step 2; step 4's rollouts in flight) and rerun:
    every step is logged once, and the data position advances by exactly the prompts each step
    drew (none skipped or repeated across the kill), tokens at most one version old."""
    deadline = time.monotonic() + BUDGET_S
    run = str(tmp_path / "run")
    replaced = ("trainer.total_steps=", "trainer.eval_every=", "trainer.save_every=")
    args = [a for a in REFERENCE_ARGS if not a.startswith(replaced)] + [
        "trainer.total_steps=4", "trainer.eval_every=0", "trainer.save_every=2", "rollout.max_staleness=1",
        "rollout.filter_zero_variance_groups=true", "rollout.max_sampling_rounds=3"]
    cmd = trainer_command(run, f"{tiny_init}/model", f"{tiny_init}/train.parquet", f"{tiny_init}/val.parquet", args)
    first = Launch([], run, str(tmp_path / "first"), command=cmd)
    try:
        first.wait(deadline, until=lambda: any(r["step"] >= 3 for r in read_records(run)))
        assert first.proc.poll() is None, f"training exited early:\n{first.logs()}"
    finally:
        first.kill()
    killed = read_records(run)
    second = Launch([], run, str(tmp_path / "second"), command=cmd)
    second.wait(deadline)
    assert second.proc.returncode == 0, second.logs()
    assert re.search(r"resumed from \S+ at step 2 ", open(second.err_path).read()), second.logs()
    records = read_records(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[:2] == killed[:2]  # the checkpointed steps stay; 3 is redone
    offset = 0.0
    for r in records:
        assert r["data/offset"] - offset == r["sampling/groups_drawn"] >= 4, (r["step"], offset)
        offset = r["data/offset"]
        assert r["staleness/max"] <= 1.0 and r["stale/tokens"] == 0.0 and "rollout/partial" in r
    assert sum(r["sampling/groups_dropped"] for r in records) > 0  # it did over-sample
