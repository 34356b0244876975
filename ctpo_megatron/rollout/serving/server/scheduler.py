"""Request scheduling for the embedded server: static batches of the requests that arrive
together, one background thread running prefill + decode with a KV cache, and SGLang's
control semantics (abort, pause in abort / retract / in_place mode, continue, weight-update
exclusion, flush_cache).

Threads: the aiohttp event loop submits requests and control calls; the scheduler thread runs
the model. Results travel back through `Request.notify` (set by the HTTP layer, thread-safe).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ctpo_megatron.rollout.serving.server.model_runner import ModelRunner
from ctpo_megatron.rollout.serving.server.sampling import SamplingParams, sample_rows

DECODE_DELAY_ENV = "CTPO_SIM_DECODE_DELAY_S"
"""Simulated-latency mode (default 0: off): every decode step takes this many seconds of wall
time, standing in for a GPU on another node in benchmarks of the trainer's overlap
(`benchmarks/bench_async.py`). The step's real CPU work (sampling + forward) counts toward
it and only the remainder is slept, so the step time is the setting, not the setting plus
this machine's compute; steps whose compute alone exceeds it are counted (`SimulatedDecode`)."""

logger = logging.getLogger(__name__)


class PrefixCache:
    """Which token prefixes this server has seen: a trie of finished sequences (prompt +
    output), like SGLang's radix cache, used to report `meta_info.cached_tokens`.

    Bounded: past `max_tokens` stored tokens the whole cache is dropped (this server recomputes
    every prefix anyway; the count only tells clients how well their routing reuses prefixes).
    """

    def __init__(self, max_tokens: int = 4_000_000):
        self.max_tokens = max_tokens
        self.clear()

    def clear(self) -> None:
        self._root: dict = {}
        self._size = 0

    def match(self, tokens: list[int]) -> int:
        """Length of the longest cached prefix of `tokens`."""
        node, n = self._root, 0
        for tok in tokens:
            node = node.get(tok)
            if node is None:
                break
            n += 1
        return n

    def insert(self, tokens: list[int]) -> None:
        if self._size + len(tokens) > self.max_tokens:
            self.clear()
        node = self._root
        for tok in tokens:
            child = node.get(tok)
            if child is None:
                child = node[tok] = {}
                self._size += 1
            node = child


@dataclass
class Request:
    """One sequence to generate (a batch item with n > 1 becomes n Requests)."""

    input_ids: list[int]
    params: SamplingParams
    rid: str = field(default_factory=lambda: uuid.uuid4().hex)
    return_logprob: bool = False
    logprob_start_len: int = -1
    seed: int = 0
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_versions: list[str] = field(default_factory=list)
    """Weight version that sampled each output token (a request paused across a weight update
    holds tokens of two versions): reported as `meta_info.weight_versions` spans."""
    input_logprobs: list[float | None] | None = None
    finish_reason: dict | None = None
    weight_version: str = "default"
    num_retractions: int = 0
    cached_tokens: int = 0
    stream: bool = False
    created: float = field(default_factory=time.monotonic)
    notify: Callable[["Request", bool], None] | None = None
    _abort_message: str | None = None
    _generator: torch.Generator | None = None
    _since_notify: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def generator(self) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        return self._generator

    def publish(self, final: bool) -> None:
        if self.notify is not None:
            self.notify(self, final)


@dataclass
class SimulatedDecode:
    """Simulated-latency mode's bookkeeping: each decode step lasts `delay_s` of wall time."""

    delay_s: float
    steps: int = 0
    over: int = 0
    """Steps whose own compute exceeded `delay_s` (the simulation ran slower than set)."""
    compute_s: float = 0.0
    """Sampling + forward seconds of all steps (the server's CPU work inside the wall time)."""

    def finish_step(self, compute_s: float) -> None:
        """Records a step that computed for `compute_s` and sleeps the rest of `delay_s`."""
        self.steps += 1
        self.compute_s += compute_s
        if compute_s > self.delay_s:
            self.over += 1
        else:
            time.sleep(self.delay_s - compute_s)  # wall time, no CPU

    def summary(self) -> str:
        """One line for the server log (read by `benchmarks/bench_async.py`)."""
        mean_ms = 1e3 * self.compute_s / max(self.steps, 1)
        return (f"simulated decode: {self.steps} steps of {self.delay_s * 1e3:.1f} ms, compute "
                f"{mean_ms:.2f} ms/step, {self.over} steps over the setting")


class Scheduler:
    """Batches requests and runs them on a ModelRunner in a background thread."""

    def __init__(self, runner: ModelRunner, *, max_batch_size: int = 32, batch_wait_s: float = 0.005,
                 weight_version: str = "default"):
        self.runner = runner
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        delay = os.environ.get(DECODE_DELAY_ENV, "") or "0"
        try:
            delay_s = float(delay)
        except ValueError:
            delay_s = -1.0
        if not delay_s >= 0:
            raise ValueError(f"{DECODE_DELAY_ENV}={delay!r}: expected seconds per decode step (>= 0)")
        self.sim = SimulatedDecode(delay_s) if delay_s > 0 else None
        """Simulated-latency mode (benchmarks): every decode step lasts `sim.delay_s`."""
        self.weight_version = weight_version
        self._cv = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[Request] = []
        self._paused: str | None = None      # None or the pause mode
        self._update_pending = 0
        self._stop = False
        self._live_rids: set[str] = set()
        self.prefix_cache = PrefixCache()
        self._generating_version: str | None = None
        self.released: frozenset[str] = frozenset()
        """Memory regions released by /release_memory_occupation (`server/memory.py`); while
        any is, new generation requests are refused."""
        self._thread = threading.Thread(target=self._loop, name="embedded-scheduler", daemon=True)
        self._thread.start()

    # ---- submission and control (any thread) ------------------------------------------------
    def submit(self, requests: list[Request]) -> None:
        """Queues requests; ValueError (SGLang's message) when a rid is still in use."""
        with self._cv:
            if self.released:
                raise ValueError(f"the server's memory is released ({', '.join(sorted(self.released))}, "
                                 "by release_memory_occupation): call resume_memory_occupation "
                                 "(and update the weights) before generating")
            rids = [r.rid for r in requests]
            for rid in rids:
                if rid in self._live_rids or rids.count(rid) > 1:
                    raise ValueError(f"Duplicate request ID detected: {rid}")
            for req in requests:
                req.weight_version = self.weight_version
                # At least one prompt token is always computed, as in SGLang.
                req.cached_tokens = min(self.prefix_cache.match(req.input_ids), len(req.input_ids) - 1)
                self._live_rids.add(req.rid)
                self._waiting.append(req)
            self._cv.notify_all()

    def flush_prefix_cache(self) -> None:
        with self._cv:
            self.prefix_cache.clear()

    def abort(self, rid: str = "", abort_all: bool = False, message: str = "Abort request") -> None:
        """Aborts matching requests; waiting ones finish now, running ones at the next step."""
        with self._cv:
            for req in list(self._waiting):
                if abort_all or req.rid == rid:
                    self._waiting.remove(req)
                    self._finish(req, {"type": "abort", "message": message, "status_code": None,
                                       "err_type": None})
            for req in self._running:
                if abort_all or req.rid == rid:
                    req._abort_message = message
            self._cv.notify_all()

    def pause(self, mode: str) -> None:
        """SGLang's pause_generation: returns once no batch is mid-step (abort / retract: idle)."""
        with self._cv:
            self._paused = mode
            self._cv.notify_all()
        if mode == "abort":
            self.abort(abort_all=True, message="Abort by pause_generation")
        with self._cv:
            if mode in ("abort", "retract"):
                self._cv.wait_for(lambda: not self._running)

    def resume(self) -> None:
        with self._cv:
            self._paused = None
            self._cv.notify_all()

    @property
    def paused(self) -> str | None:
        return self._paused

    def is_idle(self) -> bool:
        with self._cv:
            return not self._running and not self._waiting

    def mark_released(self, tags: frozenset[str]) -> bool:
        """Marks memory regions released if no request runs or waits (SGLang's condition);
        returns False (nothing marked) otherwise. From then on `submit` refuses requests."""
        with self._cv:
            # A batch whose requests all finished is over (its thread touches the model no more).
            running = [r for r in self._running if not r.finished]
            if running or self._waiting:
                logger.warning("release refused: %d request(s) running, %d waiting (e.g. %s)",
                               len(running), len(self._waiting), (running or list(self._waiting))[0].rid)
                return False
            self.released = self.released | tags
            return True

    def mark_resumed(self, tags: frozenset[str]) -> None:
        with self._cv:
            self.released = self.released - tags

    def can_flush(self) -> bool:
        """SGLang refuses a flush while requests run or wait (retracted ones do not count)."""
        with self._cv:
            in_place_running = bool(self._running)
            return not in_place_running and (not self._waiting or self._paused is not None)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Model-update writer lock: waits for running batches unless paused, holds new ones back."""
        with self._cv:
            self._update_pending += 1
            if self._paused is None:
                self._cv.wait_for(lambda: not self._running)
        try:
            with self.runner.lock:
                yield
        finally:
            with self._cv:
                self._update_pending -= 1
                self._cv.notify_all()

    def set_weight_version(self, version: str) -> None:
        """Call under `exclusive()`, right after the load: no token is sampled with the new weights
        under the old version string."""
        with self._cv:
            self.weight_version = version

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=10)
        if self.sim is not None:
            logger.info(self.sim.summary())

    # ---- the scheduler thread ---------------------------------------------------------------
    def _can_start(self) -> bool:
        return bool(self._waiting) and self._paused is None and not self._update_pending

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._stop or self._can_start())
                if self._stop:
                    return
            time.sleep(self.batch_wait_s)  # let requests that arrive together join one batch
            with self._cv:
                if not self._can_start():
                    continue
                batch = [self._waiting.popleft()
                         for _ in range(min(self.max_batch_size, len(self._waiting)))]
                self._running = batch
                if self.weight_version != self._generating_version:  # once per version, for the log
                    self._generating_version = self.weight_version
                    logger.info("generating with weight version %s", self.weight_version)
            try:
                self._run_batch(batch)
            except Exception as e:  # noqa: BLE001 - a failed batch must not kill the server
                logger.exception("batch of %d requests failed", len(batch))
                for req in batch:
                    if not req.finished:
                        self._finish(req, {"type": "abort", "message": f"internal error: {e}",
                                           "status_code": 500, "err_type": type(e).__name__})
            finally:
                with self._cv:
                    self._running = []
                    self._cv.notify_all()

    def _finish(self, req: Request, reason: dict) -> None:
        req.finish_reason = reason
        req.weight_version = self.weight_version
        with self._cv:
            self._live_rids.discard(req.rid)
            if reason.get("type") != "abort":
                self.prefix_cache.insert(req.input_ids + req.output_ids)
        req.publish(final=True)

    def _step_gate(self, batch: list[Request]) -> bool:
        """Between steps: apply aborts, block while paused in place, stop for a retract."""
        with self._cv:
            for req in batch:
                if not req.finished and req._abort_message is not None:
                    self._finish(req, {"type": "abort", "message": req._abort_message,
                                       "status_code": None, "err_type": None})
            self._cv.wait_for(lambda: self._paused != "in_place" or self._stop)
            if self._paused == "retract":
                for req in reversed(batch):
                    if not req.finished:
                        req.num_retractions += 1
                        self._waiting.appendleft(req)
                return False
            return not all(r.finished for r in batch)

    def _run_batch(self, batch: list[Request]) -> None:
        runner = self.runner
        wants_input = [r.return_logprob and r.logprob_start_len >= 0 and r.input_logprobs is None
                       for r in batch]
        with runner.lock:
            logits, state, pads = runner.prefill([r.input_ids + r.output_ids for r in batch],
                                                 all_logits=any(wants_input))
        for i, req in enumerate(batch):
            if wants_input[i]:
                req.input_logprobs = self._input_logprobs(logits[i, pads[i]:], req)
        # Sampling runs on CPU (per-request CPU generators); one transfer per step on GPU.
        step_logits = logits[:, -1, :].cpu()
        del logits
        rows = list(batch)  # the requests behind the cache rows, in row order
        while True:
            start = time.perf_counter()
            self._sample_step(rows, step_logits)
            sampled = time.perf_counter()
            if not self._step_gate(batch):  # may block (paused): not part of the step's time
                return
            start += time.perf_counter() - sampled
            keep = [i for i, r in enumerate(rows) if not r.finished]
            with runner.lock:
                if len(keep) < len(rows):  # finished rows leave the batch: no compute for them
                    runner.select_rows(state, keep)
                    rows = [rows[i] for i in keep]
                step_logits = runner.decode([r.output_ids[-1] for r in rows], state).cpu()
            if self.sim is not None:
                self.sim.finish_step(time.perf_counter() - start)

    def _sample_step(self, rows: list[Request], logits: torch.Tensor) -> None:
        """Samples the next token of every unfinished row (one batched `sample_rows` call).

        logits: [len(rows), V] float32 on CPU, row i for rows[i].
        """
        live, banned = [], []
        for i, req in enumerate(rows):
            if req.finished:
                continue
            limit = req.params.max_new_tokens
            if limit is not None and len(req.output_ids) >= limit:
                self._finish(req, {"type": "length", "length": limit})
                continue
            live.append(i)
            banned.append(frozenset(self._stops(req)) if len(req.output_ids) < req.params.min_new_tokens
                          else frozenset())
        if not live:
            return
        drawn = sample_rows(logits[live], [rows[i].params for i in live],
                            [rows[i].generator() for i in live], banned)
        for i, (token, logprob) in zip(live, drawn):
            self._append_token(rows[i], token, logprob)

    def _stops(self, req: Request) -> set[int]:
        stops = set(req.params.stop_token_ids)
        if not req.params.ignore_eos:
            stops |= self.runner.eos_token_ids
        return stops

    def _append_token(self, req: Request, token: int, logprob: float) -> None:
        params = req.params
        limit = params.max_new_tokens
        req.output_ids.append(token)
        req.output_logprobs.append(logprob)
        req.output_versions.append(self.weight_version)
        total = len(req.input_ids) + len(req.output_ids)
        if token in self._stops(req):
            self._finish(req, {"type": "stop", "matched": token})
        elif limit is not None and len(req.output_ids) >= limit:
            self._finish(req, {"type": "length", "length": limit})
        elif total >= self.runner.context_length:
            self._finish(req, {"type": "length", "length": len(req.output_ids)})
        elif req.stream:  # only streams want per-token events (each one wakes the event loop)
            req._since_notify += 1
            if req._since_notify >= (params.stream_interval or 1):
                req._since_notify = 0
                req.publish(final=False)

    @staticmethod
    def _input_logprobs(logits: torch.Tensor, req: Request) -> list[float | None]:
        """Prompt log-probs from `logprob_start_len` on: entry j scores token j given tokens < j.

        logits: [S_i, V] float32 — this row's prefill logits without its left padding.
        """
        ids = torch.tensor(req.input_ids, dtype=torch.long)
        lp = torch.log_softmax(logits[: len(req.input_ids) - 1], dim=-1)
        scored = lp.gather(1, ids[1:, None].to(lp.device))[:, 0].tolist()
        values: list[float | None] = [None] + scored
        return values[req.logprob_start_len:]
