"""The rollout producer (`rollout.max_staleness` >= 1) as a real spawned child process: the permit
bound, the data position handed back with dynamic sampling, the child's traceback reaching the
trainer, a dead child detected, and no child left behind when the trainer is SIGKILLed. The
child runs light generators (`tests/unit/_producer_generators.py`) in place of the agent loop,
which the e2e runs (`tests/e2e/test_tiny_layouts.py`, max_staleness=1) cover against real servers."""

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest

from ctpo_megatron.config.store import load_config
from ctpo_megatron.data.prompts import train_sampler, write_rows
from ctpo_megatron.trainer.producer import ProducerSpec, RolloutProducer
from tests._process import wait_until
from tests.unit import _producer_generators as gens

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.timeout(300)


def _spec(tmp_path, *, k: int, last: int, per_step: int = 3, overrides=()) -> ProducerSpec:
    rows = [{"prompt": f"q{i}", "reward_model": {"ground_truth": "1"}, "data_source": "t"} for i in range(50)]
    path = write_rows(rows, str(tmp_path / "train.jsonl"))
    cfg = load_config(config_name="tiny", overrides=[f"data.train_files=[{path}]", f"trainer.run_dir={tmp_path}",
                                                     f"trainer.prompts_per_step={per_step}",
                                                     f"trainer.mini_batch_prompts={per_step}", *overrides])
    start = train_sampler(cfg.data, cfg.trainer.seed).state_dict()
    return ProducerSpec(config=cfg, server_urls=[], router_url=None, first_step=1, last_step=last,
                        data_position=start, max_staleness=k)


def _started(run) -> list[int]:
    return sorted(int(f.split("_")[1]) for f in os.listdir(run) if f.startswith("started_"))


def _wait_started(run, n: int, timeout_s: float = 120.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while len(_started(run)) < n:
        assert time.monotonic() < deadline, f"the producer started only steps {_started(run)}"
        time.sleep(0.05)
    return _started(run)


@contextlib.contextmanager
def _producer(tmp_path, build, *, k: int = 1, last: int = 3):
    """A started producer and the trainer's lockstep sampler; the producer is closed after."""
    spec = _spec(tmp_path, k=k, last=last)
    producer = RolloutProducer(spec, build=build)
    try:
        yield producer, train_sampler(spec.config.data, spec.config.trainer.seed)
    finally:
        producer.close()


def _running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_producer_process_runs_at_most_k_steps_ahead(tmp_path):
    spec = _spec(tmp_path, k=2, last=7)
    lockstep = train_sampler(spec.config.data, spec.config.trainer.seed)
    producer = RolloutProducer(spec, build=gens.recording)
    try:
        assert producer.process.pid != os.getpid() and producer.process.is_alive()
        assert _wait_started(tmp_path, 2) == [1, 2]
        time.sleep(1.0)
        assert _started(tmp_path) == [1, 2]  # 2 ahead, then it waits for a permit
        for step in range(1, 8):
            ready = producer.take(step, lockstep.next_batch(3))
            assert (ready.step, ready.result[0], ready.client_stats) == (step, [f"traj of step {step}"],
                                                                         {"requests": 1})
            assert ready.data_position == lockstep.state_dict()
            if step + 2 <= 7:
                assert _wait_started(tmp_path, step + 2)[-1] == step + 2  # taking s lets s + 2 start
        producer.process.join(timeout=30)
        assert producer.process.exitcode == 0 and _started(tmp_path) == list(range(1, 8))  # nothing past 7
    finally:
        producer.close()

    (tmp_path / "other").mkdir()
    producer = RolloutProducer(_spec(tmp_path / "other", k=1, last=3), build=gens.recording)
    try:
        with pytest.raises(RuntimeError, match="other prompts than the trainer at step 1"):
            producer.take(1, lockstep.next_batch(3))  # not the producer's first draw
    finally:
        producer.close()
    assert not producer.process.is_alive()


def test_producer_process_hands_over_the_data_position_with_dynamic_sampling(tmp_path):
    """The child over-samples from its own sampler; the trainer adopts the position after each
    step's last draw, so the data position (what checkpoints save) is the synchronous run's."""
    spec = _spec(tmp_path, k=2, last=4, per_step=4, overrides=["rollout.filter_zero_variance_groups=true"])
    synchronous = train_sampler(spec.config.data, spec.config.trainer.seed)
    expected = []
    for step in range(1, 5):
        kept, _, metrics = gens.recording(spec).generate_step(step, synchronous.next_batch(4), synchronous)
        expected.append((synchronous.state_dict(), [t.reward for t in kept], metrics))
    assert sum(m["sampling/groups_dropped"] for _, _, m in expected) > 0  # it does over-sample
    lockstep = train_sampler(spec.config.data, spec.config.trainer.seed)
    producer = RolloutProducer(spec, build=gens.recording)
    try:
        for step, (position, rewards, metrics) in enumerate(expected, start=1):
            ready = producer.take(step, lockstep.next_batch(4))
            lockstep.load_state_dict(ready.data_position)  # what the trainer does
            kept, _, got = ready.result
            assert (lockstep.state_dict(), [t.reward for t in kept], got) == (position, rewards, metrics)
    finally:
        producer.close()


def test_producer_error_reaches_the_trainer_with_the_childs_traceback(tmp_path):
    with _producer(tmp_path, gens.fails_at_step_2) as (producer, lockstep):
        producer.take(1, lockstep.next_batch(3))
        with pytest.raises(RuntimeError, match="rollout producer failed while generating step 2") as err:
            producer.take(2, lockstep.next_batch(3))
        text = str(err.value)
        assert "OSError: server gone" in text and "_producer_generators.py" in text and "generate_step" in text


def test_dead_producer_process_is_detected(tmp_path):
    with _producer(tmp_path, gens.dies_at_step_2) as (producer, lockstep):
        producer.take(1, lockstep.next_batch(3))
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"exited with code 3 while the trainer waited for step 2"):
            producer.take(2, lockstep.next_batch(3))
        assert time.monotonic() - start < 60


def test_close_ends_a_producer_that_is_generating(tmp_path):
    producer = RolloutProducer(_spec(tmp_path, k=1, last=3), build=gens.hangs)
    _wait_started(tmp_path, 1)
    os.kill(producer.process.pid, signal.SIGTERM)  # the trainer's stop signal is not the child's
    time.sleep(0.5)
    assert producer.process.is_alive()
    producer.close(timeout_s=1.0)
    assert not producer.process.is_alive()


def test_no_producer_process_is_left_after_the_trainer_is_sigkilled(tmp_path):
    spec_path = tmp_path / "spec.pkl"
    spec_path.write_bytes(pickle.dumps(_spec(tmp_path, k=1, last=3)))
    script = ("import pickle, sys, time\n"
              "from ctpo_megatron.trainer.producer import RolloutProducer\n"
              "from tests.unit._producer_generators import hangs\n"
              f"producer = RolloutProducer(pickle.load(open({str(spec_path)!r}, 'rb')), build=hangs)\n"
              "print(producer.process.pid, flush=True)\n"
              "time.sleep(3600)\n")
    trainer = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": ROOT}, start_new_session=True)
    child = None
    try:
        child = int(trainer.stdout.readline())
        _wait_started(tmp_path, 1)  # the child is inside a generation
        assert _running(child)
        trainer.kill()
        trainer.wait(timeout=30)
        assert wait_until(lambda: not _running(child), 30), "the producer process outlived the SIGKILLed trainer"
    finally:
        trainer.kill()
        if child is not None and _running(child):
            os.kill(child, signal.SIGKILL)
