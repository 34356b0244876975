"""Sandbox limits and results (plain dataclasses, validated on construction)."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field

CGROUP_MODES = ("auto", "require", "off")


@dataclass
class SandboxConfig:
    """Resource limits and isolation settings for one sandboxed run.

    Every limit is enforced by the kernel inside the child (rlimits, namespaces), not by
    polling; the wall-clock timeout is enforced by the launcher that owns the child.
    """

    python: str = sys.executable
    """Interpreter that runs the untrusted code. As root the code runs under an unprivileged
    uid, so this interpreter (and its site-packages) must be readable by other users."""

    memory_bytes: int = 2 << 30
    """RLIMIT_AS (address space) of each process of the code, bytes. Python with numpy/sympy
    needs a few hundred MiB of address space."""

    run_memory_bytes: int | None = None
    """Memory of the whole run (every process, its tmpfs files and SysV shared memory), bytes:
    the cgroup's memory limit. None: memory_bytes + 2 * tmpfs_bytes + 64 MiB, so that one
    process meets its RLIMIT_AS (a MemoryError) before the run meets this limit (the kernel
    kills a process of the run, reported in stderr)."""

    cgroup: str = "auto"
    """"auto": a per-run cgroup (v2 where this process may create one, else v1) bounds the whole
    run's memory and processes; without one, runs fall back to rlimits and a warning is
    logged once. "require": no cgroup is an error (SandboxSetupError). "off": rlimits only."""

    cgroup_parent: str | None = None
    """A delegated cgroup v2 directory (memory and pids available, no processes of its own)
    to create the run cgroups in. None: this process's own cgroup, else cgroup v1."""

    seccomp: bool = True
    """Install the seccomp filter in the code process (see `_launcher.seccomp_program`)."""

    extra_ro_paths: tuple[str, ...] = ()
    """Host paths bound read-only into the sandbox's root, beyond the system directories and
    the interpreter's prefixes. Never put data or checkpoints here: the code can read them."""

    cpu_seconds_extra: float = 1.0
    """RLIMIT_CPU is ceil(timeout + this) seconds per process (SIGXCPU, then SIGKILL)."""

    file_size_bytes: int = 16 << 20
    """RLIMIT_FSIZE: the largest file the code may write, stdout/stderr included (SIGXFSZ)."""

    max_processes: int = 32
    """RLIMIT_NPROC for the code's uid (processes + threads). Root ignores this limit, so as
    root every concurrent run gets its own unprivileged uid."""

    tmpfs_bytes: int = 64 << 20
    """Size of the private tmpfs on /tmp (the working directory lives there) and of /dev/shm."""

    max_code_bytes: int = 1 << 20
    """Largest program accepted (UTF-8 bytes); a larger one is reported as the code's error
    without launching anything. Must be below tmpfs_bytes."""

    max_timeout_s: float = 3600.0
    """Largest wall-clock timeout a caller may ask for, seconds."""

    max_output_bytes: int = 64 << 10
    """Bytes of stdout and of stderr kept in the result; the rest is replaced by a marker."""

    truncation_marker: str = "\n...[truncated {n} bytes]"
    """Appended to a truncated stream; `{n}` is the number of bytes dropped."""

    require_isolation: bool = True
    """Fail loudly (SandboxSetupError) when network/pid/mount namespaces cannot be created,
    instead of running the code with rlimits only."""

    use_namespaces: bool = True
    """Create the network/pid/mount namespaces. False (with require_isolation=False) is the
    fallback for hosts without namespace support: rlimits, an unprivileged uid as root, the
    process group killed at the end; the network is NOT isolated and a process that leaves
    the group (setsid) can outlive the run."""

    uid_base: int | None = None
    """First uid of the range used when running as root (one uid per concurrent run). None:
    derived from the pid, 1_000_000 + (pid % 4096) * 256, so trainers on one node do not
    share uids."""

    uid_slots: int = 256
    """Number of uids in the range, i.e. the most concurrent runs in one process."""

    env: dict[str, str] = field(default_factory=lambda: {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        # One thread per BLAS/OpenMP pool: threads count against max_processes and the
        # sandboxes share the trainer's cores.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    })
    """The complete environment of the code process (nothing is inherited from the trainer);
    HOME is set to the working directory."""

    @property
    def run_memory_limit(self) -> int:
        """The whole run's memory limit, bytes (see `run_memory_bytes`)."""
        if self.run_memory_bytes is not None:
            return self.run_memory_bytes
        return self.memory_bytes + 2 * self.tmpfs_bytes + (64 << 20)

    def check_timeout(self, timeout: float, where: str = "run_code") -> float:
        """`timeout` as a float, or ValueError unless it is finite and in (0, max_timeout_s]."""
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise ValueError(f"{where}: timeout must be a number of seconds, got {timeout!r}")
        if not (math.isfinite(timeout) and 0 < timeout <= self.max_timeout_s):
            raise ValueError(f"{where}: timeout must be finite and in (0, {self.max_timeout_s}] seconds "
                             f"(SandboxConfig.max_timeout_s), got {timeout!r}")
        return float(timeout)

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "file_size_bytes", "max_processes", "tmpfs_bytes",
                     "max_output_bytes", "uid_slots", "max_code_bytes", "run_memory_bytes"):
            value = getattr(self, name)
            if value is None and name == "run_memory_bytes":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"SandboxConfig.{name} must be an integer > 0, got {value!r}")
        if self.max_code_bytes >= self.tmpfs_bytes:
            raise ValueError(f"SandboxConfig.max_code_bytes ({self.max_code_bytes}) must be below "
                             f"tmpfs_bytes ({self.tmpfs_bytes}): the program is written to that tmpfs")
        if not (isinstance(self.max_timeout_s, (int, float)) and math.isfinite(self.max_timeout_s)
                and 0 < self.max_timeout_s <= 86400):
            raise ValueError(f"SandboxConfig.max_timeout_s must be finite, in (0, 86400], got {self.max_timeout_s!r}")
        if self.cgroup not in CGROUP_MODES:
            raise ValueError(f"SandboxConfig.cgroup must be one of {CGROUP_MODES}, got {self.cgroup!r}")
        for path in (*self.extra_ro_paths, *([self.cgroup_parent] if self.cgroup_parent else [])):
            if not os.path.isabs(path):
                raise ValueError(f"SandboxConfig: paths must be absolute, got {path!r}")
        if self.cpu_seconds_extra < 0:
            raise ValueError(f"SandboxConfig.cpu_seconds_extra must be >= 0, got {self.cpu_seconds_extra}")
        if not self.use_namespaces and self.require_isolation:
            raise ValueError("SandboxConfig: use_namespaces=False needs require_isolation=False "
                             "(without namespaces the network is not isolated)")
        if not os.path.isabs(self.python):
            raise ValueError(f"SandboxConfig.python must be an absolute path, got {self.python!r}")


@dataclass
class SandboxResult:
    """Outcome of one run. Output streams are decoded as UTF-8 (invalid bytes replaced)."""

    stdout: str
    """Standard output, at most `max_output_bytes` bytes of it, then a truncation marker."""
    stderr: str
    """Standard error, truncated like stdout."""
    exit_code: int | None
    """Process exit status; negative = killed by that signal; None = killed by the timeout."""
    timed_out: bool
    """True when the wall-clock timeout killed the code (its whole process tree)."""
    wall_s: float = 0.0
    """Seconds from launch to the end of the run, setup included."""
    isolation: str = ""
    """What isolated the run: "root+ns" (own uid + namespaces), "userns" (user namespace) or
    "none" (rlimits only; only when require_isolation is False)."""
    error: str = ""
    """Set when the sandbox, not the code, failed (a host problem, see `SandboxPool`); the
    result then reads as a failed run (exit_code 1) with this text in stderr."""

    @property
    def ok(self) -> bool:
        """True when the code ran to completion with exit status 0."""
        return self.exit_code == 0 and not self.timed_out


class SandboxSetupError(RuntimeError):
    """The sandbox itself could not be set up (not an error of the sandboxed code)."""
