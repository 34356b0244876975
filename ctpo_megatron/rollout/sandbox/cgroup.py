"""Per-run cgroups: one memory limit and one process limit for the whole run.

rlimits are per process (RLIMIT_AS x RLIMIT_NPROC processes can exceed the node's memory) and
do not count SysV shared memory or tmpfs pages; a cgroup counts every page the run charges.
Each run gets a fresh child cgroup (cgroup v2 where this process may create one with the
memory and pids controllers, else cgroup v1's memory and pids hierarchies); the sandbox's init
joins it before building the root, so the code and everything it starts are inside.

Detection runs once per parent and is cached; when no cgroup can be made, runs fall back to
rlimits only and a warning says so (once).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

_CGROUP_ROOT_MOUNTS = "/proc/self/mountinfo"


@dataclass(frozen=True)
class CgroupSupport:
    """What this host lets the sandbox use."""

    mode: str
    """"v2", "v1" or "none" (rlimits only)."""
    parents: dict[str, str] = field(default_factory=dict)
    """Directory under which run cgroups are created: {"unified": dir} for v2, {"memory": dir,
    "pids": dir} for v1."""
    reason: str = ""
    """Why the better modes were not usable (empty when v2 works)."""

    def describe(self) -> str:
        if self.mode == "none":
            return f"none (rlimits only: {self.reason})"
        where = ", ".join(f"{k}={v}" for k, v in self.parents.items())
        return f"{self.mode} ({where})" + (f"; {self.reason}" if self.reason else "")


def _mounts() -> list[tuple[str, str, str, str]]:
    """(mount root in the hierarchy, mount point, fstype, super options) of cgroup mounts."""
    out = []
    with open(_CGROUP_ROOT_MOUNTS) as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fields, sup = pre.split(), post.split()
            if sup and sup[0] in ("cgroup", "cgroup2"):
                out.append((fields[3], fields[4], sup[0], sup[2] if len(sup) > 2 else ""))
    return out


def _own_paths() -> dict[str, str]:
    """Controller (or "" for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    paths = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            for c in ctrls.split(",") if ctrls else [""]:
                paths[c] = path
    return paths


def _join(mount_root: str, mount_point: str, path: str) -> str:
    rel = path[len(mount_root):] if mount_root != "/" and path.startswith(mount_root) else path
    return os.path.normpath(os.path.join(mount_point, rel.lstrip("/")))


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _probe(mode: str, parents: dict[str, str]) -> str:
    """Creates, limits and removes one test cgroup; returns "" or why it failed."""
    name = f"ctpo-sandbox-probe-{os.getpid()}-{threading.get_ident()}"
    run = RunCgroup(mode, parents, name)
    try:
        run.create(64 << 20, 8)
    except OSError as e:
        return f"{mode}: cannot create a cgroup under {', '.join(parents.values())}: {e.strerror or e}"
    finally:
        run.remove(deadline_s=1.0)
    return ""


def _detect_v2(parent: str | None) -> tuple[dict[str, str] | None, str]:
    if parent is None:
        own = _own_paths().get("")
        mounts = [m for m in _mounts() if m[2] == "cgroup2"]
        if own is None or not mounts:
            return None, "no cgroup v2 hierarchy"
        parent = _join(mounts[0][0], mounts[0][1], own)
    try:
        with open(os.path.join(parent, "cgroup.controllers")) as f:
            available = f.read().split()
        with open(os.path.join(parent, "cgroup.subtree_control")) as f:
            enabled = f.read().split()
    except OSError as e:
        return None, f"v2: {parent}: {e.strerror}"
    missing = [c for c in ("memory", "pids") if c not in available]
    if missing:
        return None, f"v2: {parent} does not have the {'/'.join(missing)} controller(s) (not delegated)"
    need = [c for c in ("memory", "pids") if c not in enabled]
    if need:
        try:  # refused (EBUSY) when the parent holds processes, e.g. this one
            _write(os.path.join(parent, "cgroup.subtree_control"), " ".join("+" + c for c in need))
        except OSError as e:
            return None, f"v2: cannot enable {'/'.join(need)} in {parent}/cgroup.subtree_control: {e.strerror}"
    parents = {"unified": parent}
    why = _probe("v2", parents)
    return (None, why) if why else (parents, "")


def _detect_v1() -> tuple[dict[str, str] | None, str]:
    own = _own_paths()
    parents = {}
    for root, point, fstype, opts in _mounts():
        if fstype != "cgroup":
            continue
        for c in ("memory", "pids"):
            if c in opts.split(",") and c in own:
                parents[c] = _join(root, point, own[c])
    if set(parents) != {"memory", "pids"}:
        return None, f"v1: memory and pids hierarchies not both mounted (found {sorted(parents)})"
    why = _probe("v1", parents)
    return (None, why) if why else (parents, "")


_CACHE: dict[str | None, CgroupSupport] = {}
_LOCK = threading.Lock()


def detect(parent: str | None = None) -> CgroupSupport:
    """The cgroup support for runs (cached). `parent`: a delegated cgroup v2 directory to create
    run cgroups in (default: this process's own cgroup, then cgroup v1)."""
    with _LOCK:
        if parent not in _CACHE:
            reasons = []
            v2, why = _detect_v2(parent)
            reasons.append(why)
            if v2 is not None:
                support = CgroupSupport("v2", v2)
            else:
                v1, why = _detect_v1() if parent is None else (None, "")
                reasons.append(why)
                reason = "; ".join(r for r in reasons if r)
                support = CgroupSupport("v1", v1, reason) if v1 is not None else CgroupSupport("none", {}, reason)
                if support.mode == "none":
                    logger.warning("sandbox: no usable cgroup (%s); each run's memory and process count are "
                                   "bounded per process only (RLIMIT_AS, RLIMIT_NPROC), not for the whole run",
                                   reason)
            _CACHE[parent] = support
        return _CACHE[parent]


class RunCgroup:
    """The cgroup(s) of one run: created with limits before it, removed after it."""

    def __init__(self, mode: str, parents: dict[str, str], name: str) -> None:
        self.mode = mode
        self.dirs = {c: os.path.join(p, name) for c, p in parents.items()}
        self.created: list[str] = []

    def create(self, memory_bytes: int, max_processes: int) -> list[str]:
        """Makes the directories and writes the limits; returns the cgroup.procs files to join."""
        for d in self.dirs.values():
            os.mkdir(d)
            self.created.append(d)
        if self.mode == "v2":
            d = self.dirs["unified"]
            _write(f"{d}/memory.max", str(memory_bytes))
            if os.path.exists(f"{d}/memory.swap.max"):
                _write(f"{d}/memory.swap.max", "0")
            _write(f"{d}/pids.max", str(max_processes))
        else:
            mem = self.dirs["memory"]
            _write(f"{mem}/memory.limit_in_bytes", str(memory_bytes))
            if os.path.exists(f"{mem}/memory.memsw.limit_in_bytes"):
                _write(f"{mem}/memory.memsw.limit_in_bytes", str(memory_bytes))
            _write(f"{self.dirs['pids']}/pids.max", str(max_processes))
        return [f"{d}/cgroup.procs" for d in self.dirs.values()]

    def oom_kills(self) -> int:
        """Processes of the run the kernel killed for exceeding the memory limit."""
        path = (f"{self.dirs['unified']}/memory.events" if self.mode == "v2"
                else f"{self.dirs['memory']}/memory.oom_control")
        try:
            with open(path) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def remove(self, deadline_s: float = 5.0) -> None:
        """Removes the directories; waits (polling) while the last processes are still exiting."""
        deadline = time.monotonic() + deadline_s
        for d in reversed(self.created):
            while True:
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        logger.warning("sandbox: cannot remove cgroup %s: %s", d, e)
                        break
                    time.sleep(0.01)
        self.created = []
