"""Rollouts that run ahead (`rollout.max_staleness = k >= 1`): rank 0 generates the rollouts of
steps s+1..s+k in a background thread while step s trains.

The producer draws prompts from its own copy of the data position (the trainer's sampler
advances in lockstep, once per trained step, and is what checkpoints save), generates each
step's batch with that step's sampling seed, and may be at most k steps ahead of the step
being trained: generating step t needs a permit that the trainer hands out when it takes
step t - k. A weight update after a step reaches the servers while the producer's requests
are in flight (the servers pause generation, load the weights, continue: partial rollouts);
every token keeps the behaviour log-prob it was sampled with, so the CTPO ratio corrects it
exactly. Tokens are at most k versions stale by construction. With dynamic sampling the
producer keeps drawing from its own sampler until the step is full of informative groups and
hands the trainer the data position after the step's last draw, which the trainer adopts (and
checkpoints). After a kill, in-flight rollouts are simply regenerated from the checkpoint's
data position.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class ReadyStep:
    """One step's rollouts as the producer generated them."""

    prompts: list
    """The step's first draw (`prompts_per_step` prompts, checked against the trainer's)."""
    result: Any
    """What `generate` returned."""
    data_position: dict[str, int]
    """The producer sampler's `state_dict()` after the step's last draw."""
    waited_s: float = 0.0
    """Seconds `take` waited for it."""


class RolloutProducer:
    """Background generation of future steps' trajectories (rank 0 only)."""

    def __init__(self, generate: Callable[[int, list, Any], Any], sampler: Any, *, prompts_per_step: int,
                 first_step: int, last_step: int, max_staleness: int) -> None:
        """generate(step, prompts, sampler) -> the step's rollouts (it may draw more prompts
        from `sampler`: dynamic sampling); sampler: a `PromptSampler` at the data position of
        `first_step` (the producer owns it from now on); nothing past `last_step` is
        generated."""
        if max_staleness < 1:
            raise ValueError(f"RolloutProducer: max_staleness={max_staleness} must be >= 1")
        self._generate = generate
        self._sampler = sampler
        self._per_step = prompts_per_step
        self._next = first_step
        self._last = last_step
        self._permits = threading.Semaphore(max_staleness)
        self._ready: dict[int, ReadyStep] = {}
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self.lock = threading.Lock()
        """Held while generating; take it to use the servers' client from another thread."""
        self._thread = threading.Thread(target=self._run, name="rollout-producer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and self._next <= self._last:
                if not self._permits.acquire(timeout=0.2):
                    continue
                step = self._next
                prompts = self._sampler.next_batch(self._per_step)
                with self.lock:
                    if self._stop.is_set():
                        return
                    result = self._generate(step, prompts, self._sampler)
                with self._cond:
                    self._ready[step] = ReadyStep(prompts, result, self._sampler.state_dict())
                    self._cond.notify_all()
                self._next += 1
        except BaseException as exc:  # surfaced to the trainer by take()
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def take(self, step: int, prompts: list) -> ReadyStep:
        """Step `step`'s rollouts (waits for them). `prompts`: the trainer's lockstep draw for
        the step, checked against the producer's first draw."""
        start = time.monotonic()
        with self._cond:
            while step not in self._ready and self._error is None:
                self._cond.wait(timeout=1.0)
            if self._error is not None:
                raise RuntimeError("rollout producer failed") from self._error
            ready = self._ready.pop(step)
        if [p.uid for p in ready.prompts] != [p.uid for p in prompts]:
            raise RuntimeError(f"rollout producer drew other prompts than the trainer at step {step}")
        self._permits.release()  # step + k may start now
        ready.waited_s = time.monotonic() - start
        return ready

    def close(self, timeout_s: float = 30.0) -> None:
        """Stops the producer; waits up to `timeout_s` for a generation in flight (the thread
        is a daemon, so a hung one cannot keep the process alive)."""
        self._stop.set()
        self._thread.join(timeout=timeout_s)
