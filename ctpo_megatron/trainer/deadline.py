"""When the trainer stops: stop signals, the job's end, and a running estimate of step and
checkpoint time.

A Slurm job ends at its time limit (or is preempted). A 32B step plus its checkpoint takes many
minutes, so reacting to the end is too late: before each step the trainer asks whether that step
*and* the checkpoint after it still fit before the end (plus a safety margin). When they do not,
it checkpoints now and exits cleanly; the job script requeues the job because work remains.

* **The end** (`job_end`): `trainer.deadline.end_time` when set, else Slurm's: `squeue -h -o %e
  -j $SLURM_JOB_ID` (re-read every `refresh_s`, so `scontrol update TimeLimit=...` is seen),
  falling back to `$SLURM_JOB_END_TIME` (newer Slurm) and then `$CTPO_JOB_END` (unix seconds,
  exported by the job script, which runs outside the container) where squeue is missing.
  Outside Slurm with no configured end there is no deadline.
* **The estimates**: a step costs the most of the last `STEP_WINDOW` steps (steps vary with
  response lengths; a high guess stops one step early, a low guess loses the step); a
  checkpoint costs the most of the saves measured so far, before the first one
  `checkpoint_s` (the launcher sizes it from the model). Both are carried to the next job
  attempt in `<run_dir>/status.json`.
* **Signals**: SIGTERM (preemption, scancel) and SIGUSR1 (Slurm's time-limit warning, forwarded
  by the launcher) ask for a stop. A stop known before the step's weight sync skips the sync
  (the resumed run pushes its weights to the fresh servers at start-up anyway) and saves first.
* **Agreement**: every decision is one all-reduce (MAX) of a flag, so all ranks stop after the
  same step; only global rank 0 reads the job's end.
* **Status** (`status.json`, rank 0): `running` at start, then `finished` or `stopped` (with the
  reason) at a clean exit. The job script requeues only a `stopped` attempt of its own job
  (`python -m ctpo_megatron.trainer.deadline --work-remains RUN_DIR --attempt JOB-RESTART`); a
  crashed trainer leaves `running` and is not requeued into a crash loop.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

logger = logging.getLogger(__name__)

STATUS_FILE = "status.json"
STEP_WINDOW = 3
"""Steps whose maximum is the step-time estimate."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class DeadlineConfig:
    """When to stop before the job's end (`trainer.deadline.*`)."""

    end_time: str = ""
    """The run's end: unix seconds or an ISO time (`2026-12-01T06:00:00`, local time unless it
    carries an offset). Empty: the Slurm job's end (squeue / SLURM_JOB_END_TIME); none outside
    Slurm."""
    margin_s: float = 60.0
    """Safety margin, seconds: a step starts only if the step, a checkpoint and this margin fit
    before the end."""
    checkpoint_s: float = 300.0
    """Estimated seconds of one checkpoint until one has been measured (the Slurm launcher
    sets it from the model's checkpoint size and `cluster.checkpoint_write_gbps`)."""
    refresh_s: float = 60.0
    """Re-read the Slurm job's end at most this often, seconds (a time limit can change)."""

    def __post_init__(self) -> None:
        for name in ("margin_s", "checkpoint_s", "refresh_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"trainer.deadline.{name}={getattr(self, name)} must be >= 0")
        if self.end_time:
            parse_end_time(self.end_time, what="trainer.deadline.end_time")


def parse_end_time(text: str, *, what: str) -> float | None:
    """Unix seconds of `text` (unix seconds or ISO time); None for Slurm's "Unknown"/"N/A"
    (no limit). Raises ValueError naming `what` for anything else."""
    text = text.strip()
    if text in ("", "Unknown", "N/A", "NONE", "UNLIMITED"):
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(f"{what}={text!r}: expected unix seconds or an ISO time") from None


def slurm_job_end(env: dict[str, str] | None = None, *, squeue: str | None = None) -> float | None:
    """The Slurm job's current end (unix seconds), or None outside Slurm / without a limit.

    squeue first (it sees `scontrol update TimeLimit=...`), then `$SLURM_JOB_END_TIME`, then
    `$CTPO_JOB_END` (what the job script read with squeue when the attempt started).
    """
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    squeue = squeue or shutil.which("squeue")
    if squeue:
        try:
            out = subprocess.run([squeue, "-h", "-o", "%e", "-j", job], capture_output=True, text=True,
                                 timeout=30, env=env)
            if out.returncode == 0 and out.stdout.strip():
                return parse_end_time(out.stdout.splitlines()[0], what="squeue end time")
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            logger.warning("squeue could not tell the job's end (%s); using SLURM_JOB_END_TIME", e)
    for name in ("SLURM_JOB_END_TIME", "CTPO_JOB_END"):
        if env.get(name):
            return parse_end_time(env[name], what=name)
    return None


def attempt_id(env: dict[str, str] | None = None) -> str:
    """`<job id>-<restart count>` of this Slurm job attempt ('' outside Slurm)."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID", "")
    return f"{job}-{env.get('SLURM_RESTART_COUNT', '0')}" if job else ""


def read_status(run_dir: str) -> dict:
    """`<run_dir>/status.json` ({} when missing or unreadable)."""
    try:
        with open(os.path.join(run_dir, STATUS_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (one all-reduce; collective)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class StopPlanner:
    """Decides, identically on every rank, whether the trainer stops after the current step.

    Construct it early (it installs the SIGTERM/SIGUSR1 handlers). `clock` and `job_end` are
    injectable for tests; by default wall-clock time and the Slurm job's end.
    """

    def __init__(self, cfg: DeadlineConfig, *, run_dir: str, total_steps: int, rank: int,
                 clock: Callable[[], float] = time.time,
                 job_end: Callable[[], float | None] | None = None,
                 agree: Callable[[bool], bool] = any_rank) -> None:
        self.cfg, self.run_dir, self.total_steps, self.rank = cfg, run_dir, total_steps, rank
        self.clock, self.agree = clock, agree
        self._job_end_source = job_end or slurm_job_end
        self._end: float | None = None
        self._end_read_at = float("-inf")
        self.signal: int | None = None
        self.stopping = False
        """Sticky: once a stop was agreed (e.g. the weight sync was skipped) no step follows."""
        self.reason = ""
        self.step_times: deque[float] = deque(maxlen=STEP_WINDOW)
        self.checkpoint_times: list[float] = []
        previous = read_status(run_dir) if rank == 0 else {}
        self._previous_step_s = float(previous.get("step_s") or 0.0)
        self._previous_checkpoint_s = float(previous.get("checkpoint_s") or 0.0)
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        if rank == 0:
            end = self.job_end()
            if end is not None:
                logger.info("deadline: the job ends at %s (in %.0f s); a step starts only if it and a "
                            "checkpoint (~%.0f s) fit with %.0f s to spare",
                            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(end)), end - self.clock(),
                            self.checkpoint_estimate, cfg.margin_s)
            elif os.environ.get("SLURM_JOB_ID"):
                logger.warning("deadline: the Slurm job has no time limit, or its end is unknown (no squeue here, "
                               "no SLURM_JOB_END_TIME or CTPO_JOB_END): only signals stop this run early; "
                               "set trainer.deadline.end_time")
            self._write_status("running", step=None)

    # ---------------------------------------------------------------- inputs
    def _on_signal(self, signum, _frame) -> None:
        self.signal = signum
        logger.warning("signal %d: will checkpoint after the current step (skipping its weight sync "
                       "if not started) and exit", signum)

    def job_end(self) -> float | None:
        """The run's end in unix seconds (configured, else Slurm's; re-read every refresh_s)."""
        if self.cfg.end_time:
            return parse_end_time(self.cfg.end_time, what="trainer.deadline.end_time")
        now = self.clock()
        if now - self._end_read_at >= self.cfg.refresh_s:
            self._end, self._end_read_at = self._job_end_source(), now
        return self._end

    @property
    def step_estimate(self) -> float:
        """Seconds of the next step: the most of the recent ones (0 before any was measured)."""
        return max(self.step_times) if self.step_times else self._previous_step_s

    @property
    def checkpoint_estimate(self) -> float:
        """Seconds of one checkpoint: the most measured, else the previous attempt's, else the guess."""
        if self.checkpoint_times:
            return max(self.checkpoint_times)
        return self._previous_checkpoint_s or self.cfg.checkpoint_s

    @contextmanager
    def checkpointing(self) -> Iterator[None]:
        """Times a checkpoint save (the estimate uses it)."""
        start = time.monotonic()
        yield
        self.checkpoint_times.append(time.monotonic() - start)
        if self.rank == 0:
            self._write_status("running", step=None)

    # ---------------------------------------------------------------- decisions
    def _out_of_time(self) -> str:
        """'' when another step and its checkpoint fit before the end (rank 0 decides), else why not."""
        if self.rank != 0:
            return ""
        end = self.job_end()
        if end is None:
            return ""
        left = end - self.clock()
        need = self.step_estimate + self.checkpoint_estimate + self.cfg.margin_s
        if left >= need:
            return ""
        return (f"the job ends in {left:.0f} s; another step needs ~{self.step_estimate:.0f} s + checkpoint "
                f"~{self.checkpoint_estimate:.0f} s + margin {self.cfg.margin_s:.0f} s")

    def _decide(self) -> bool:
        """Collective: whether to stop (a signal on any rank, or no time for another step)."""
        why = "" if self.stopping else (f"signal {self.signal}" if self.signal is not None else self._out_of_time())
        stop = self.agree(self.stopping or bool(why))
        if stop and not self.stopping:
            self.stopping = True
            self.reason = why or "stop requested on another rank"
            logger.warning("stopping: %s", self.reason)
        return stop

    def skip_weight_sync(self, step: int) -> bool:
        """Collective, before step `step`'s weight sync: True when the run stops after this step
        anyway (the sync would be wasted: the resumed run syncs at start-up), so it saves first;
        `should_stop` is then True. The last step always syncs (its evaluation uses the servers)."""
        return step < self.total_steps and self._decide()

    def should_stop(self, step: int, step_s: float) -> bool:
        """Collective, after step `step` took `step_s` seconds: stop (checkpoint, exit) now?"""
        self.step_times.append(step_s)
        return self._decide() and step < self.total_steps

    def finish(self, step: int) -> None:
        """Records the attempt's end in status.json (rank 0): `finished` or `stopped`."""
        if self.rank == 0:
            self._write_status("finished" if step >= self.total_steps else "stopped", step=step)

    def _write_status(self, state: str, *, step: int | None) -> None:
        data = {"state": state, "step": step, "total_steps": self.total_steps, "reason": self.reason,
                "attempt": attempt_id(), "step_s": self.step_estimate,
                "checkpoint_s": max(self.checkpoint_times) if self.checkpoint_times else self._previous_checkpoint_s,
                "time": time.time()}
        os.makedirs(self.run_dir, exist_ok=True)
        path = os.path.join(self.run_dir, STATUS_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(data, f)
        os.replace(path + ".tmp", path)


def work_remains(run_dir: str, attempt: str) -> bool:
    """Whether job attempt `attempt` stopped cleanly with steps left (so the job should requeue)."""
    status = read_status(run_dir)
    return (status.get("state") == "stopped" and status.get("attempt") == attempt
            and status.get("step") is not None and status["step"] < status.get("total_steps", 0))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ctpo_megatron.trainer.deadline",
                                description="Exit 0 when the given job attempt stopped with work left "
                                            "(used by launch/ctpo_32b.sh to decide on a requeue), else 1.")
    p.add_argument("--work-remains", metavar="RUN_DIR", required=True)
    p.add_argument("--attempt", required=True, help="<job id>-<restart count>")
    args = p.parse_args(argv)
    status = read_status(args.work_remains)
    remains = work_remains(args.work_remains, args.attempt)
    print(f"[ctpo] trainer status: {json.dumps(status) if status else 'none'}; work remains: "
          f"{'yes' if remains else 'no'}")
    return 0 if remains else 1


if __name__ == "__main__":
    sys.exit(main())
