"""The tiny trainer with `rollout.placement=colocated` against the embedded server, 3 steps.

Server-side evidence (the embedded server's own log, in call order): each step's rollouts are
followed by a release of every memory region, then the weights are resumed, the new weights
arrive by `/update_weights_from_tensor` (SGLang's format, one entry per rank of the server's
TP 2) as version `step_<s>`, the KV cache is resumed, and only then does the server generate
again, with that version.
Released weights are discarded and resumed ones are NaN until updated, so the next step's
rollout log-probs matching the trainer's own (`mismatch/*`) shows the pushed weights are the
ones generating.
"""

import json
import re

import pytest

from tests.e2e._trainer import run_trainer

pytestmark = pytest.mark.slow

STEPS = 3
EVENT = re.compile(r"(memory released: .*|memory resumed: \[[^]]*\]|weights updated to version \S+|"
                   r"generating with weight version \S+)")


def _events(log_path) -> list[str]:
    events = []
    for line in log_path.read_text().splitlines():
        match = EVENT.search(line)
        if match:
            events.append(match.group(1))
    return events


def test_colocated_run_releases_trains_resumes_updates_then_generates(cold_tiny_inputs, tmp_path):
    run = tmp_path / "run"
    done = run_trainer(str(run), cold_tiny_inputs["model"], cold_tiny_inputs["train"], cold_tiny_inputs["val"], [
        f"trainer.total_steps={STEPS}", "trainer.prompts_per_step=2", "trainer.mini_batch_prompts=2",
        "rollout.n_samples=2", "trainer.eval_every=0", "trainer.save_every=0",
        "rollout.placement=colocated", "rollout.weight_sync.server_tp_size=2"])
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    # A server of TP 2: every update carries one entry per TP rank (fewer is refused with a 400).
    assert "--tp-size 2" in log, log[-6000:]

    events = _events(run / "logs" / "server0.log")
    expected = ["generating with weight version default"]
    for step in range(1, STEPS + 1):
        expected += ["memory released: ['cuda_graph', 'kv_cache', 'weights'] (weights now hold 0 bytes)",
                     "memory resumed: ['weights']", f"weights updated to version step_{step}",
                     "memory resumed: ['cuda_graph', 'kv_cache']"]
        if step < STEPS:  # the last step's weights are not used for generation (no eval)
            expected.append(f"generating with weight version step_{step}")
    assert events == expected, "\n".join(events)

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for record in records:
        # Rollouts of step s were generated with version step_{s-1}; the trainer's old
        # log-probs use its own weights of step s-1: equal up to float32 rounding.
        assert record["weight_sync/bytes"] > 0
        assert record["mismatch/abs_log_prob_diff_max"] < 1e-3, record
