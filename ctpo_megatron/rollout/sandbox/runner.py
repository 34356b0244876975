"""`run_code`: run untrusted Python code once, isolated, with limits (see `_launcher.py`)."""

from __future__ import annotations

import itertools
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from ctpo_megatron.rollout.sandbox._launcher import read_records, record
from ctpo_megatron.rollout.sandbox.cgroup import RunCgroup
from ctpo_megatron.rollout.sandbox.cgroup import detect as detect_cgroups
from ctpo_megatron.rollout.sandbox.config import SandboxConfig, SandboxResult, SandboxSetupError

# The launcher is imported as a top-level module (its directory last on sys.path, after the
# standard library it imports), not run as a script: an import loads the bytecode cached in
# __pycache__ (written when this package imported it), where a script is compiled from source
# at every start (~6 ms of CPU, a sixth of a run's).
LAUNCHER_COMMAND = (sys.executable, "-I", "-S", "-c",
                    f"import sys; sys.path.append({os.path.dirname(os.path.abspath(__file__))!r}); import _launcher; "
                    "_launcher.main()")

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



_RUN_IDS = itertools.count()


# System directories the interpreter and the C library need. Bound read-only where they are
# directories, recreated where they are symlinks (merged /usr: /bin -> usr/bin).
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# /etc entries a Python program can need (dynamic linker cache, time zone, name service
# switch, alternatives); everything else of /etc (and the rest of the host) does not exist.
ETC_ENTRIES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "nsswitch.conf", "alternatives",
               "fonts", "mime.types")


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


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


# Run as `python -I -S -c`: the start-up path, then what `site` adds to it in a normal
# `python -I` start (site-packages, .pth path lines) and the prefixes it sets (a venv's).
_SITE_QUERY = ("import json, sys; base = list(sys.path); import site; site.main(); "
               "print(json.dumps([sys.prefix, sys.exec_prefix, [p for p in sys.path if p not in base]]))")


def _site_settings(python: str) -> tuple[str, str, list[str]]:
    """(sys.prefix, sys.exec_prefix, sys.path entries added by `site`) of `python -I` on the
    host: what the sandbox's bootstrap gives the code, whose interpreter starts without `site`
    (see `_launcher.BOOTSTRAP`). Runs the interpreter once, so its .pth files run here."""
    try:
        out = subprocess.run([python, "-I", "-S", "-c", _SITE_QUERY], capture_output=True, text=True,
                             env={}, timeout=60, check=True).stdout
        prefix, exec_prefix, added = json.loads(out.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
        detail = getattr(e, "stderr", None) or e
        raise SandboxSetupError(f"sandbox: cannot read the site-packages of SandboxConfig.python "
                                f"({python}): {detail}") from e
    return prefix, exec_prefix, added


_ROOT_PLAN: dict[tuple, dict] = {}


def _root_plan(cfg: SandboxConfig, uid: int | None) -> dict:
    """What the launcher puts into the sandbox's root (cached per interpreter and paths):
    read-only binds [(host real path, path inside)], symlinks [(path, target)], /etc texts,
    and the interpreter's site settings (`_site_settings`)."""
    key = (cfg.python, cfg.extra_ro_paths)
    plan = _ROOT_PLAN.get(key)
    if plan is None:
        binds, links = [], []
        for path in SYSTEM_PATHS:
            if os.path.islink(path):
                links.append((path, os.readlink(path)))
            elif os.path.isdir(path):
                binds.append((path, path))
        for name in ETC_ENTRIES:
            path = f"/etc/{name}"
            if os.path.islink(path):
                links.append((path, os.readlink(path)))
            elif os.path.exists(path):
                binds.append((os.path.realpath(path), path))
        covered = [dst for _, dst in binds]
        for path in (*_interpreter_dirs(cfg.python), *cfg.extra_ro_paths):
            if not os.path.exists(path):
                raise SandboxSetupError(f"sandbox: {path} (interpreter prefix or extra_ro_paths) does not exist")
            if not any(_under(path, c) for c in covered):
                binds.append((os.path.realpath(path), os.path.abspath(path)))
                covered.append(path)
        prefix, exec_prefix, site_path = _site_settings(cfg.python)
        plan = {"binds": binds, "symlinks": links + [("/var/tmp", "../tmp")], "site_prefix": prefix,
                "site_exec_prefix": exec_prefix, "site_path": site_path}
        _ROOT_PLAN[key] = plan
    name = "sandbox" if uid is not None else "root"
    passwd = "root:x:0:0:root:/root:/usr/sbin/nologin\n"
    group = "root:x:0:\n"
    if uid is not None:
        passwd += f"{name}:x:{uid}:{uid}:{name}:/tmp/work:/usr/sbin/nologin\n"
        group += f"{name}:x:{uid}:\n"
    return dict(plan, etc_text={"passwd": passwd, "group": group, "hostname": "sandbox\n",
                                "hosts": "127.0.0.1 localhost sandbox\n::1 localhost\n"})


class _Stream:
    """One output pipe of the run: keeps the first `keep` bytes, counts the rest, and closes the
    pipe once `cap` bytes came through (the writer then gets EPIPE: output floods stop)."""

    def __init__(self, fd: int, keep: int, cap: int) -> None:
        self.fd, self.keep, self.cap = fd, keep, cap
        self.data = bytearray()
        self.total = 0
        self.open = True

    def read(self) -> None:
        try:
            chunk = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return
        if not chunk:
            self.close()
            return
        self.total += len(chunk)
        room = self.keep - len(self.data)
        if room > 0:
            self.data += chunk[:room]
        if self.total >= self.cap:
            self.close()

    def close(self) -> None:
        if self.open:
            self.open = False
            os.close(self.fd)

    def text(self, marker: str) -> str:
        out = self.data.decode("utf-8", errors="replace")
        if self.total > len(self.data):
            out += marker.format(n=self.total - len(self.data))
        return out




def _communicate(proc: subprocess.Popen, code: bytes, status_r: int, streams: list[_Stream],
                 deadline: float) -> tuple[bytes, bool]:
    """Feeds the program to the launcher and drains status and output pipes until the launcher
    and everything it started are gone (all pipes at EOF), or until `deadline` (monotonic), when
    the launcher's process group is killed. Returns (status bytes, killed)."""
    status = bytearray()
    stdin = proc.stdin.fileno()
    os.set_blocking(stdin, False)
    for fd in (status_r, *(s.fd for s in streams)):
        os.set_blocking(fd, False)
    pending = memoryview(code)
    killed = False
    status_open = True
    with selectors.DefaultSelector() as sel:
        sel.register(stdin, selectors.EVENT_WRITE, "stdin")
        sel.register(status_r, selectors.EVENT_READ, "status")
        for s in streams:
            sel.register(s.fd, selectors.EVENT_READ, s)
        while status_open or any(s.open for s in streams):
            left = deadline - time.monotonic()
            if left <= 0:
                if killed:
                    break  # the pipes are held by something we cannot kill: give up on them
                # The launcher itself is stuck: kill its group (init dies, the pid ns with it).
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                killed = True
                deadline = time.monotonic() + 2.0
                continue
            for key, _ in sel.select(min(left, 1.0)):
                what = key.data
                if what == "stdin":
                    try:
                        n = os.write(stdin, pending[:1 << 16])
                    except BlockingIOError:
                        continue
                    except OSError:  # the launcher is gone (broken pipe)
                        n = len(pending)
                    pending = pending[n:]
                    if not pending:
                        sel.unregister(stdin)
                        proc.stdin.close()
                elif what == "status":
                    try:
                        chunk = os.read(status_r, 4096)
                    except BlockingIOError:
                        continue
                    status += chunk
                    if not chunk:
                        sel.unregister(status_r)
                        status_open = False
                else:
                    what.read()
                    if not what.open:
                        sel.unregister(key.fd)
    if not proc.stdin.closed:
        proc.stdin.close()
    return bytes(status), killed


def run_code(code: str, timeout: float = 10.0, config: SandboxConfig | None = None) -> SandboxResult:
    """Runs `code` as a Python program in a fresh sandbox and returns its outcome.

    code: program text (written to `main.py` in a private working directory); at most
        `max_code_bytes` UTF-8 bytes, a longer one is reported as the code's error.
    timeout: wall-clock seconds, finite, in (0, max_timeout_s] (else ValueError); on expiry the
        whole process tree is killed and `timed_out` is True. CPU time is limited to about the
        same.
    config: limits and isolation (default: `SandboxConfig()`).

    Isolation: new network, pid, mount, IPC and UTS namespaces; a root of its own (an empty
    tmpfs with read-only binds of the system directories and the interpreter, a minimal /dev
    with a private devpts, a fresh /proc, private /tmp and /dev/shm; cwd /tmp/work; no host
    data, /run, /sys); empty environment; as root a distinct unprivileged uid per concurrent
    run, else no capabilities; a seccomp filter; a per-run cgroup for the memory and process
    count of the whole run; output through pipes drained up to a cap. Anything the code does
    ends up in the result (exit code, stderr); SandboxSetupError only when the host cannot
    build the sandbox. Thread safe; blocks the calling thread (use `SandboxPool` for many runs).
    """
    cfg = config or SandboxConfig()
    timeout = cfg.check_timeout(timeout)
    if not isinstance(code, str):
        raise TypeError(f"run_code: code must be str, got {type(code).__name__}")
    code_bytes = code.encode("utf-8", errors="replace")
    if len(code_bytes) > cfg.max_code_bytes:
        return SandboxResult(stdout="", stderr=f"[sandbox] program refused: it is {len(code_bytes)} bytes, "
                             f"the limit is {cfg.max_code_bytes}\n", exit_code=1, timed_out=False)
    root = os.geteuid() == 0
    cgroups = None if cfg.cgroup == "off" else detect_cgroups(cfg.cgroup_parent)
    if cfg.cgroup == "require" and cgroups.mode == "none":
        raise SandboxSetupError(f"sandbox: SandboxConfig.cgroup='require' but {cgroups.describe()}")
    base = cfg.uid_base if cfg.uid_base is not None else 1_000_000 + (os.getpid() % 4096) * 256
    uid = _UIDS.acquire(base, cfg.uid_slots) if root else None
    fallback_dir = None
    status_r = status_w = -1
    run_cg = None
    start = time.monotonic()
    try:
        plan = _root_plan(cfg, uid)
        fallback_dir = None if cfg.use_namespaces else tempfile.mkdtemp(prefix="ctpo_sandbox_")
        status_r, status_w = os.pipe()
        if cgroups is not None and cgroups.mode != "none":
            run_cg = RunCgroup(cgroups.mode, cgroups.parents, f"ctpo-sandbox-{os.getpid()}-{next(_RUN_IDS)}")
            try:
                procs = run_cg.create(cfg.run_memory_limit, cfg.max_processes)
            except OSError as e:
                raise SandboxSetupError(f"sandbox: cannot create the run's cgroup: {e}") from e
        else:
            procs = []
        launch_cfg = {
            "status_fd": status_w, "timeout": timeout, "uid": uid, "python": cfg.python,
            "memory_bytes": cfg.memory_bytes, "file_size_bytes": cfg.file_size_bytes,
            "cpu_seconds": int(math.ceil(timeout + cfg.cpu_seconds_extra)),
            "max_processes": cfg.max_processes, "tmpfs_bytes": cfg.tmpfs_bytes,
            "require_isolation": cfg.require_isolation, "use_namespaces": cfg.use_namespaces,
            "seccomp": cfg.seccomp, "cgroup_procs": procs,
            "env": cfg.env, "fallback_workdir": fallback_dir, **plan,
        }
        if uid is not None and fallback_dir is not None:
            os.chown(fallback_dir, uid, uid)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            proc = subprocess.Popen(
                LAUNCHER_COMMAND,
                stdin=subprocess.PIPE, stdout=out_w, stderr=err_w, pass_fds=(status_w,),
                start_new_session=True, env={}, close_fds=True)
        except BaseException:
            for fd in (out_r, err_r):
                os.close(fd)
            raise
        finally:
            for fd in (out_w, err_w, status_w):
                os.close(fd)
            status_w = -1
        # Output beyond file_size_bytes per stream closes its pipe (the writer gets EPIPE).
        cap = max(cfg.file_size_bytes, cfg.max_output_bytes)
        streams = [_Stream(out_r, cfg.max_output_bytes, cap), _Stream(err_r, cfg.max_output_bytes, cap)]
        try:
            raw, killed = _communicate(proc, record(launch_cfg) + code_bytes, status_r, streams,
                                       time.monotonic() + timeout + _PARENT_GRACE_S)
        finally:
            for s in streams:
                s.close()
            proc.wait()
        status = read_records(raw)
        if "error" in status:
            raise SandboxSetupError(f"sandbox: {status['error']}")
        if not status.get("started") and not killed:
            raise SandboxSetupError(
                f"sandbox launcher exited with status {proc.returncode} before the code started; "
                f"launcher stderr: {streams[1].text('...')[:2000]!r}")
        timed_out = killed or bool(status.get("timed_out", False))
        stderr = streams[1].text(cfg.truncation_marker)
        exit_code = status.get("exit_code")
        if "code_error" in status:
            stderr += f"[sandbox] {status['code_error']}\n"
            exit_code = 1
        elif exit_code is None and not timed_out:
            # Started, then init died without a report: something of the run killed it.
            stderr += "[sandbox] the run was killed before it reported an exit status\n"
            exit_code = -signal.SIGKILL
        if run_cg is not None and run_cg.oom_kills():
            stderr += (f"[sandbox] out of memory: the kernel killed a process of this run (the run's "
                       f"memory limit is {cfg.run_memory_limit} bytes)\n")
        return SandboxResult(
            stdout=streams[0].text(cfg.truncation_marker), stderr=stderr,
            exit_code=None if timed_out else int(exit_code),
            timed_out=timed_out, wall_s=time.monotonic() - start,
            isolation=str(status.get("isolation", "")))
    finally:
        for fd in (status_r, status_w):
            if fd >= 0:
                os.close(fd)
        if run_cg is not None:
            run_cg.remove()
        if fallback_dir is not None:
            shutil.rmtree(fallback_dir, ignore_errors=True)
        if uid is not None:
            _UIDS.release(uid)
