"""Rollouts that run ahead (`rollout.max_staleness = k >= 1`): rank 0 generates the rollouts of
steps s+1..s+k in a separate process while step s trains.

The generation (agent loop, HTTP client, chat template, sandboxed tools, reward: all Python)
runs in its own process, started with the `spawn` context, so that it never takes the
trainer's GIL (a thread would: the training step then slows down by about a third) and no
torch/gloo state is forked. The child builds everything it needs from the run's config: its
own `RolloutGenerator` (client to the trainer's servers, tokenizer, sandbox pool) and its own
`PromptSampler` at the data position of the first step it generates.

What crosses the process boundary, all small and typed:
  parent -> child, once: `ProducerSpec` (the `TrainConfig`, the server and router URLs, the
    first and last step, the data position, k), pickled by `spawn`;
  parent -> child, per step taken: a permit (the int step number it unlocks);
  child -> parent, per step: one `ReadyStep` (the step's trajectories as the agent loop
    returns them, their prompts' uids, the sampler's data position after the step's last draw,
    the client's request counts), pickled once; or one `ProducerError` with the traceback text.

The child may be at most k steps ahead of the step being trained: generating step t needs the
permit that the trainer sends when it takes step t - k (k are granted at start). A weight
update after a step reaches the servers while the child's requests are in flight (the servers
pause generation, load the weights, continue: partial rollouts); the trainer pushes it through
its own client, independent of the child's. Every token keeps the behaviour log-prob it was
sampled with, so the CTPO ratio corrects it exactly; tokens are at most k versions stale by
construction. With dynamic sampling the child keeps drawing from its own sampler until the
step is full of informative groups and hands the trainer the data position after the step's
last draw, which the trainer adopts (and checkpoints). After a kill, in-flight rollouts are
simply regenerated from the checkpoint's data position.

Failures: an exception in the child reaches `take` as a RuntimeError carrying the child's
traceback; a child that dies without one (killed, out of memory) is detected by `take` within
a second. The child ignores SIGINT/SIGTERM (a graceful stop is the trainer's to make; `close`
ends the child) and exits by itself when the trainer's process dies, even by SIGKILL (it
watches the parent's sentinel), so it is never left behind.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

logger = logging.getLogger(__name__)

POLL_S = 1.0
"""How often `take` checks that the child is alive while waiting."""


@dataclass
class ProducerSpec:
    """What the child is started with (pickled once by `spawn`)."""

    config: Any
    """The run's `TrainConfig`."""
    server_urls: list[str]
    router_url: str | None
    first_step: int
    last_step: int
    """Nothing past it is generated."""
    data_position: dict[str, int]
    """`PromptSampler.state_dict()` at the start of `first_step`."""
    max_staleness: int


@dataclass
class ReadyStep:
    """One step's rollouts as the child generated them (one pickle per step)."""

    step: int
    prompt_uids: list[str]
    """Uids of the step's first draw (`prompts_per_step` prompts, checked against the trainer's)."""
    result: Any
    """What `generate_step` returned: (trajectories, all generated, sampling metrics)."""
    data_position: dict[str, int]
    """The child sampler's `state_dict()` after the step's last draw."""
    client_stats: dict[str, int] = field(default_factory=dict)
    """The child client's request counts (requests, retried, failed) for this step."""
    waited_s: float = 0.0
    """Seconds `take` waited for it (set in the trainer)."""


@dataclass
class ProducerError:
    """The child failed: its traceback, as text."""

    traceback: str


class StepGenerator(Protocol):
    """What the child generates with (`RolloutGenerator`, or a stand-in in tests)."""

    def generate_step(self, step: int, prompts: list, sampler: Any) -> Any: ...
    def take_stats(self) -> dict[str, int]: ...
    def close(self) -> None: ...


def rollout_generator(spec: ProducerSpec) -> StepGenerator:
    """The child's generator: a `RolloutGenerator` on the trainer's servers."""
    from ctpo_megatron.trainer.rollout_driver import RolloutGenerator

    return RolloutGenerator(spec.config, spec.server_urls, router_url=spec.router_url)


class RolloutProducer:
    """Generation of future steps' trajectories in a child process (rank 0 only)."""

    def __init__(self, spec: ProducerSpec, *,
                 build: Callable[[ProducerSpec], StepGenerator] = rollout_generator) -> None:
        """Starts the child. `build(spec)`, called in the child, returns its `StepGenerator`;
        it must be importable by name (spawn pickles it by reference)."""
        if spec.max_staleness < 1:
            raise ValueError(f"RolloutProducer: max_staleness={spec.max_staleness} must be >= 1")
        self.spec = spec
        ctx = multiprocessing.get_context("spawn")
        permits_in, self._permits = ctx.Pipe(duplex=False)
        self._results, results_out = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_child_main, args=(spec, build, permits_in, results_out),
                                   name="rollout-producer", daemon=True)
        self.process.start()
        permits_in.close()  # the child's ends: only the child holds them now
        results_out.close()

    def take(self, step: int, prompts: list) -> ReadyStep:
        """Step `step`'s rollouts (waits for them; steps are taken in order). `prompts`: the
        trainer's lockstep draw for the step, checked against the child's first draw."""
        start = time.monotonic()
        while not self._results.poll(POLL_S):
            if not self.process.is_alive() and not self._results.poll(0):
                raise self._died(step)
        try:
            msg = self._results.recv()
        except EOFError:
            self.process.join(timeout=5.0)
            raise self._died(step) from None
        if isinstance(msg, ProducerError):
            raise RuntimeError(f"rollout producer failed while generating step {step}; in the producer "
                               f"process:\n{msg.traceback}")
        if msg.step != step:
            raise RuntimeError(f"rollout producer generated step {msg.step}, the trainer is at step {step}")
        if msg.prompt_uids != [p.uid for p in prompts]:
            raise RuntimeError(f"rollout producer drew other prompts than the trainer at step {step}")
        if step + self.spec.max_staleness <= self.spec.last_step:
            try:
                self._permits.send(step + self.spec.max_staleness)  # that step may start now
            except OSError:  # the child is gone: the next take() reports how it ended
                pass
        msg.waited_s = time.monotonic() - start
        return msg

    def _died(self, step: int) -> RuntimeError:
        return RuntimeError(f"rollout producer process (pid {self.process.pid}) exited with code "
                            f"{self.process.exitcode} while the trainer waited for step {step}")

    def close(self, timeout_s: float = 5.0) -> None:
        """Stops the child: closing the permit pipe ends a child waiting for a permit; one still
        generating after `timeout_s` (its rollouts are not needed) is killed."""
        self._permits.close()
        self.process.join(timeout=timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=timeout_s)
        self._results.close()


# ------------------------------------------------------------------ the child process
def _child_main(spec: ProducerSpec, build: Callable[[ProducerSpec], StepGenerator],
                permits: multiprocessing.connection.Connection,
                results: multiprocessing.connection.Connection) -> None:
    """The producer process: generates steps first_step..last_step, each after its permit."""
    from ctpo_megatron.logging_utils import init_logging

    init_logging(level=logging.WARNING)  # the trainer logs the run; the child only what goes wrong
    for sig in (signal.SIGINT, signal.SIGTERM):  # the trainer decides when to stop
        signal.signal(sig, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, name="watch-parent", daemon=True).start()
    outbox: queue.Queue = queue.Queue()
    # Sending a large step blocks until the trainer reads it: a thread sends, so generating
    # the next permitted step does not wait for that.
    sender = threading.Thread(target=_send_all, args=(outbox, results), name="send", daemon=True)
    sender.start()
    generator = None
    try:
        from ctpo_megatron.data.prompts import train_sampler

        cfg = spec.config
        sampler = train_sampler(cfg.data, cfg.trainer.seed)
        sampler.load_state_dict(spec.data_position)
        generator = build(spec)
        granted = spec.first_step + spec.max_staleness - 1  # the last step it may generate
        for step in range(spec.first_step, spec.last_step + 1):
            while step > granted:
                try:
                    granted = max(granted, int(permits.recv()))
                except EOFError:  # the trainer closed the producer
                    return
            prompts = sampler.next_batch(cfg.trainer.prompts_per_step)
            result = generator.generate_step(step, prompts, sampler)
            outbox.put(ReadyStep(step, [p.uid for p in prompts], result, sampler.state_dict(),
                                 dict(generator.take_stats())))
    except BaseException:
        outbox.put(ProducerError(traceback.format_exc()))
    finally:
        outbox.put(None)
        sender.join()
        if generator is not None:
            generator.close()


def _send_all(outbox: queue.Queue, results: multiprocessing.connection.Connection) -> None:
    while (msg := outbox.get()) is not None:
        try:
            results.send(msg)
        except OSError:  # the trainer is gone or closed the producer
            return
        except Exception:  # e.g. a result that cannot be pickled: the trainer must hear of it
            results.send(ProducerError(traceback.format_exc()))
            return


def _exit_with_parent() -> None:
    """Ends the child as soon as the trainer's process is gone (a SIGKILL runs no clean-up)."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)
