"""`run_code`: run untrusted Python code once, isolated, with limits (see `_launcher.py`)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ctpo_megatron.rollout.sandbox.config import SandboxConfig, SandboxResult, SandboxSetupError

_LAUNCHER = str(Path(__file__).with_name("_launcher.py"))
# Extra wall time the parent grants the launcher beyond the code's timeout before it kills
# the launcher's whole process group itself (the launcher normally enforces the timeout).
_PARENT_GRACE_S = 5.0


class _UidPool:
    """Hands out distinct unprivileged uids to concurrent runs (root only).

    One uid per run makes RLIMIT_NPROC a per-run limit and keeps runs from signalling each
    other's processes.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._in_use: set[int] = set()

    def acquire(self, base: int, slots: int) -> int:
        with self._cond:
            while True:
                for uid in range(base, base + slots):
                    if uid not in self._in_use:
                        self._in_use.add(uid)
                        return uid
                self._cond.wait()

    def release(self, uid: int) -> None:
        with self._cond:
            self._in_use.discard(uid)
            self._cond.notify()


_UIDS = _UidPool()


def _interpreter_dirs(python: str) -> list[str]:
    """Directories the interpreter needs at run time (installation prefix, venv)."""
    # <prefix>/bin/python of the venv and of the installation it links to.
    dirs = {os.path.dirname(os.path.dirname(os.path.abspath(python))),
            os.path.dirname(os.path.dirname(os.path.realpath(python)))}
    if python == sys.executable:
        dirs |= {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}
    dirs = {d for d in dirs if d != "/"}
    # Drop entries nested in another entry: exposing the outer one covers them.
    return sorted(d for d in dirs if not any(d != o and d.startswith(o + "/") for o in dirs))


def _read_truncated(f, limit: int, marker: str) -> str:
    f.seek(0)
    data = f.read(limit)
    size = os.fstat(f.fileno()).st_size
    text = data.decode("utf-8", errors="replace")
    if size > limit:
        text += marker.format(n=size - limit)
    return text


def _parse_status(raw: bytes) -> dict:
    status: dict = {}
    for line in raw.decode(errors="replace").splitlines():
        try:
            status.update(json.loads(line))
        except json.JSONDecodeError:
            continue  # a partial line from a process killed mid-write
    return status


def run_code(code: str, timeout: float = 10.0, config: SandboxConfig | None = None) -> SandboxResult:
    """Runs `code` as a Python program in a fresh sandbox and returns its outcome.

    code: program text (written to `main.py` in a private working directory).
    timeout: wall-clock seconds; on expiry the whole process tree is killed and
        `timed_out` is True. CPU time is limited to about the same.
    config: limits and isolation (default: `SandboxConfig()`).

    Isolation: new network namespace (no interfaces up: every connect fails), new pid
    namespace (nothing outlives the run), new mount namespace (read-only root, private tmpfs
    /tmp, /var/tmp, /dev/shm; cwd /tmp/work), empty environment, and as root a distinct
    unprivileged uid per concurrent run (so RLIMIT_NPROC applies). Raises SandboxSetupError
    when the sandbox cannot be created; errors of the code itself are in the result. Thread
    safe; blocks the calling thread (use `SandboxPool` for many runs).
    """
    if timeout <= 0:
        raise ValueError(f"run_code: timeout must be > 0 seconds, got {timeout}")
    cfg = config or SandboxConfig()
    root = os.geteuid() == 0
    base = cfg.uid_base if cfg.uid_base is not None else 1_000_000 + (os.getpid() % 4096) * 256
    uid = _UIDS.acquire(base, cfg.uid_slots) if root else None
    fallback_dir = tempfile.mkdtemp(prefix="ctpo_sandbox_")  # used only without namespaces
    status_r, status_w = os.pipe()
    start = time.monotonic()
    try:
        launch_cfg = {
            "status_fd": status_w, "timeout": float(timeout), "uid": uid, "python": cfg.python,
            "memory_bytes": cfg.memory_bytes, "file_size_bytes": cfg.file_size_bytes,
            "cpu_seconds": int(math.ceil(timeout + cfg.cpu_seconds_extra)),
            "max_processes": cfg.max_processes, "tmpfs_bytes": cfg.tmpfs_bytes,
            "readonly_root": cfg.readonly_root, "require_isolation": cfg.require_isolation,
            "use_namespaces": cfg.use_namespaces,
            "env": cfg.env, "fallback_workdir": fallback_dir,
            "expose_paths": _interpreter_dirs(cfg.python),
        }
        if uid is not None:
            os.chown(fallback_dir, uid, uid)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", _LAUNCHER, json.dumps(launch_cfg)],
                stdin=subprocess.PIPE, stdout=out, stderr=err, pass_fds=(status_w,),
                start_new_session=True, env={}, close_fds=True)
            os.close(status_w)
            status_w = -1
            killed = False
            try:
                proc.communicate(code.encode("utf-8", errors="replace"), timeout=timeout + _PARENT_GRACE_S)
            except subprocess.TimeoutExpired:
                # The launcher itself is stuck: kill its session (pdeathsig takes the rest).
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed = True
            with os.fdopen(status_r, "rb") as f:
                status_r = -1
                status = _parse_status(f.read())
            if "error" in status:
                raise SandboxSetupError(f"sandbox: {status['error']}")
            timed_out = killed or bool(status.get("timed_out", False))
            if "exit_code" not in status and not timed_out:
                raise SandboxSetupError(
                    f"sandbox launcher exited with status {proc.returncode} without reporting "
                    f"the code's status; launcher stderr: {_read_truncated(err, 2000, '...')!r}")
            return SandboxResult(
                stdout=_read_truncated(out, cfg.max_output_bytes, cfg.truncation_marker),
                stderr=_read_truncated(err, cfg.max_output_bytes, cfg.truncation_marker),
                exit_code=None if timed_out else int(status["exit_code"]),
                timed_out=timed_out, wall_s=time.monotonic() - start,
                isolation=str(status.get("isolation", "")))
    finally:
        for fd in (status_r, status_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(fallback_dir, ignore_errors=True)
        if uid is not None:
            _UIDS.release(uid)
