"""Sandbox limits and results (plain dataclasses, validated on construction)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field


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
    """RLIMIT_AS (address space) of the code process, bytes. Python with numpy/sympy needs
    a few hundred MiB of address space."""

    cpu_seconds_extra: float = 1.0
    """RLIMIT_CPU is ceil(timeout + this) seconds per process (SIGXCPU, then SIGKILL)."""

    file_size_bytes: int = 16 << 20
    """RLIMIT_FSIZE: the largest file the code may write, stdout/stderr included (SIGXFSZ)."""

    max_processes: int = 32
    """RLIMIT_NPROC for the code's uid (processes + threads). Root ignores this limit, so as
    root every concurrent run gets its own unprivileged uid."""

    tmpfs_bytes: int = 64 << 20
    """Size of the private tmpfs mounted on /tmp (the working directory lives there)."""

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

    readonly_root: bool = True
    """Remount the whole filesystem read-only inside the sandbox's mount namespace (best
    effort); the private /tmp, /var/tmp and /dev/shm tmpfs mounts stay writable."""

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

    def __post_init__(self) -> None:
        for name in ("memory_bytes", "file_size_bytes", "max_processes", "tmpfs_bytes",
                     "max_output_bytes", "uid_slots"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SandboxConfig.{name} must be > 0, got {getattr(self, name)}")
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

    @property
    def ok(self) -> bool:
        """True when the code ran to completion with exit status 0."""
        return self.exit_code == 0 and not self.timed_out


class SandboxSetupError(RuntimeError):
    """The sandbox itself could not be set up (not an error of the sandboxed code)."""
