"""Red-team findings against the code sandbox, one test each, written as the attacking code
would be (CI runs them as root, like the trainer). See docs/rollout_agent.md, "Threat model"."""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import uuid

import pytest

from ctpo_megatron.rollout.sandbox import SandboxConfig, SandboxPool, SandboxResult, SandboxSetupError, run_code
from ctpo_megatron.rollout.sandbox._launcher import _ARGS, _DENY
from ctpo_megatron.rollout.sandbox.cgroup import detect as detect_cgroups
from ctpo_megatron.rollout.sandbox.runner import _UIDS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARCH = platform.machine()


def _run(code: str, timeout: float = 10.0, **cfg) -> SandboxResult:
    return run_code(textwrap.dedent(code), timeout=timeout, config=SandboxConfig(**cfg))


def test_answer_key_on_the_host_is_not_readable():
    # Finding 1: a snippet that globbed the filesystem found the training parquet and read the
    # ground truth. Data lies in a temp dir and in the home dir, world-readable.
    secret = f"ANSWER-{uuid.uuid4().hex}"
    dirs = [tempfile.mkdtemp(prefix="ctpo_data_"), tempfile.mkdtemp(prefix="ctpo_data_", dir=os.path.expanduser("~"))]
    files = []
    for d in dirs:
        os.chmod(d, 0o755)
        for name in ("train.parquet", "test.jsonl"):
            path = os.path.join(d, name)
            with open(path, "w") as f:
                f.write(f'{{"prompt": "1+1", "answer": "{secret}"}}\n')
            os.chmod(path, 0o644)
            files.append(path)
    try:
        res = _run(f"""
            import os
            found = []
            for top in sorted(os.listdir("/")):
                if top in ("proc", "usr", "lib", "lib32", "lib64", "libx32", "bin", "sbin"):
                    continue  # the system directories (bound read-only; no data there)
                for dirpath, dirnames, filenames in os.walk("/" + top):
                    dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages")]
                    for name in filenames:
                        if name.endswith((".parquet", ".jsonl")):
                            found.append(os.path.join(dirpath, name))
            for path in {files!r}:
                try:
                    found.append(open(path).read())
                except OSError as e:
                    print("absent", type(e).__name__)
            print("FOUND", found)
            print("ROOT", sorted(os.listdir("/")))
            print("HOST", [p for p in ("/run", "/var/run", "/sys", "{REPO}/ctpo_megatron", "{REPO}/tests")
                           if os.path.exists(p)])
            """, timeout=60.0)
        assert res.exit_code == 0, res.stderr
        assert secret not in res.stdout and "FOUND []" in res.stdout, res.stdout
        assert res.stdout.count("absent FileNotFoundError") == len(files)
        assert "HOST []" in res.stdout  # no /run, /sys, nor the trainer's checkout
        root = eval(res.stdout.split("ROOT ")[1].splitlines()[0])
        allowed = {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "tmp", "usr", "var"}
        # ...plus the top directories of the interpreter's prefixes (bound read-only).
        allowed |= {p.strip("/").split("/")[0] for p in (sys.prefix, sys.base_prefix, os.path.realpath(sys.executable))}
        allowed |= {os.path.abspath(sys.executable).strip("/").split("/")[0]}
        assert set(root) <= allowed, root
    finally:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def test_host_unix_sockets_under_run_are_unreachable():
    # Finding 5: the network namespace does not cover path-named Unix sockets.
    path = f"/run/ctpo_probe_{os.getpid()}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
    except OSError as e:
        pytest.skip(f"cannot create a socket under /run here: {e}")
    os.chmod(path, 0o777)
    listener.listen(4)
    listener.setblocking(False)
    try:
        res = _run(f"""
            import socket
            for p in ("{path}", "/var{path}"):
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.connect(p)
                    print("CONNECTED", p)
                except OSError as e:
                    print("blocked", type(e).__name__)
            """)
        assert res.exit_code == 0, res.stderr
        assert "CONNECTED" not in res.stdout and res.stdout.count("blocked") == 2, res.stdout
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()
        os.unlink(path)


_PTRACE_THEN_SIGNAL = """
    import ctypes, os, signal
    libc = ctypes.CDLL(None, use_errno=True)
    print("ptrace", libc.ptrace(0, 0, None, None), flush=True)   # PTRACE_TRACEME
    os.kill(os.getpid(), signal.SIGUSR1)                         # a traced child stops here
    print("still running")
    """


def test_ptrace_stop_is_the_codes_error_not_the_callers():
    # Finding 2: PTRACE_TRACEME + a signal left the child stopped; the launcher's wait saw a
    # stop status and run_code raised, which failed the whole rollout batch.
    res = _run(_PTRACE_THEN_SIGNAL)
    assert res.stdout == "ptrace -1\n" and res.exit_code == -signal.SIGUSR1  # seccomp: EPERM
    # Without the filter the trace succeeds; init ends the stopped process.
    res = _run(_PTRACE_THEN_SIGNAL, seccomp=False)
    assert res.stdout == "ptrace 0\n" and res.exit_code == -signal.SIGKILL and not res.timed_out


def test_code_larger_than_the_tmpfs_is_the_codes_error():
    # Finding 2: a program that does not fit in the tmpfs (ENOSPC) made run_code raise.
    res = _run("# pad\n" * (512 << 10), tmpfs_bytes=2 << 20)  # 3 MiB
    assert res.exit_code == 1 and not res.timed_out and "program refused" in res.stderr
    with SandboxPool(max_workers=1) as pool:
        assert pool.submit("x" * (2 << 20)).result().exit_code == 1  # a pool never raises either


def test_host_failure_of_one_run_is_a_failed_result_not_an_exception():
    with SandboxPool(max_workers=1) as pool:  # the start-up check passes
        pool.config.python = "/nonexistent/bin/python"  # now every run fails on the host side
        res = pool.submit("print(1)").result()
    assert res.exit_code == 1 and res.error and "[sandbox]" in res.stderr
    assert not _UIDS._in_use  # the failed run handed its uid back


@pytest.mark.skipif(detect_cgroups().mode == "none", reason="no cgroup this process may create")
def test_whole_run_memory_is_bounded():
    # Finding 3: RLIMIT_AS is per process; 5 processes x 80 MiB under a 128 MiB RLIMIT_AS each
    # must not all hold their memory (the run's cgroup: 128 + 2 * 16 + 64 = 224 MiB).
    res = _run("""
        import os, time
        kids = []
        for i in range(5):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                data = b"\\1" * (80 << 20)          # touched, resident
                os.write(w, b"1")
                time.sleep(600)
                os._exit(0)
            os.close(w)
            os.read(r, 1)                        # allocated, or died trying
            kids.append(pid)
        deadline = time.monotonic() + 2.0         # let the kernel finish the kills
        alive = set(kids)
        while time.monotonic() < deadline:
            for pid in list(alive):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    alive.discard(pid)
            time.sleep(0.02)
        print("alive", len(alive))
        """, timeout=30.0, memory_bytes=128 << 20, tmpfs_bytes=16 << 20)
    assert not res.timed_out, res
    assert int(res.stdout.split()[-1]) < 5, res.stdout
    assert "out of memory" in res.stderr


def test_sysv_ipc_and_keyrings_do_not_outlive_or_cross_runs():
    # Findings 3-4: SysV shm outlived a run (pinned memory) and was visible to the next run;
    # the kernel keyring persisted across runs that reused a uid.
    key = 0x43540000 + (os.getpid() & 0xFFFF)
    size = (3 << 20) + 4096 * 7  # unusual size: recognisable in /proc/sysvipc/shm
    libc = ctypes.CDLL(None, use_errno=True)
    make = f"""
        import ctypes, mmap
        libc = ctypes.CDLL(None, use_errno=True)
        libc.shmat.restype = ctypes.c_void_p
        shmid = libc.shmget({key}, {size}, 0o1666)          # IPC_CREAT | 0666
        addr = libc.shmat(shmid, None, 0)
        ctypes.memset(addr, 1, {size})
        print("shm", shmid >= 0)
        libc.syscall.restype = ctypes.c_long
        print("add_key", libc.syscall({_DENY.get(ARCH, {}).get("add_key", -1)}, b"user", b"ctpo", b"secret", 6,
                                      ctypes.c_int(-4)))   # KEY_SPEC_USER_KEYRING
        """
    look = f"""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        print("found", libc.shmget({key}, 0, 0) >= 0)
        """
    try:
        first = _run(make)
        second = _run(look)
        assert first.stdout.startswith("shm True\n") and "add_key -1" in first.stdout, (first.stdout, first.stderr)
        assert second.stdout == "found False\n"
        with open("/proc/sysvipc/shm") as f:
            assert not any(line.split()[0] == str(key) for line in f.readlines()[1:])
    finally:  # before the fix the segment stayed on the host: remove it
        shmid = libc.shmget(key, 0, 0)
        if shmid >= 0:
            libc.shmctl(shmid, 0, None)  # IPC_RMID


def test_no_disk_reservation_through_stdout_and_private_ptys():
    # Finding 6: fallocate(KEEP_SIZE) on the host-backed stdout file reserved disk past
    # RLIMIT_FSIZE; the shared devpts let one run open every host pty.
    res = _run("""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        print("fallocate", libc.fallocate(1, 1, ctypes.c_long(0), ctypes.c_long(64 << 20)))  # KEEP_SIZE
        fds = []
        try:
            for _ in range(64):
                fds += os.openpty()
        except OSError as e:
            print("pty limit", type(e).__name__)
        print("ptys", len(fds) // 2, sorted(os.listdir("/dev/pts"))[:3])
        """)
    assert res.exit_code == 0, res.stderr
    assert "fallocate -1" in res.stdout, res.stdout
    assert "pty limit" in res.stdout and int(res.stdout.split("ptys ")[1].split()[0]) <= 16, res.stdout
    assert "ptys" in res.stdout and "'0'" in res.stdout  # its own numbering: a private devpts


@pytest.mark.skipif(ARCH not in _DENY, reason=f"no seccomp table for {ARCH}")
def test_seccomp_denies_the_wide_kernel_surface():
    # Finding 7: nested user namespaces (full capabilities inside), io_uring, userfaultfd,
    # keyctl, AF_VSOCK all worked.
    nrs = dict(_DENY[ARCH], **_ARGS[ARCH])
    res = _run(f"""
        import ctypes, os, socket, subprocess, sys, threading
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        buf = ctypes.create_string_buffer(256)
        def call(name, *args):
            ret = libc.syscall(*args)
            print(name, ret, os.strerror(ctypes.get_errno()) if ret < 0 else "")
        call("unshare_user", {nrs["unshare"]}, 0x10000000)
        call("clone_newuser", {nrs["clone"]}, 0x10000000 | 17, 0, 0, 0, 0)
        call("io_uring_setup", {nrs["io_uring_setup"]}, 8, buf)
        call("userfaultfd", {nrs["userfaultfd"]}, 0)
        call("keyctl", {nrs["keyctl"]}, 0, -4, 0)
        call("bpf", {nrs["bpf"]}, 0, buf, 48)
        call("perf_event_open", {nrs["perf_event_open"]}, buf, 0, -1, -1, 0)
        call("ptrace", {nrs["ptrace"]}, 0, 0, 0, 0)
        for fam in (40, 16, 17):  # AF_VSOCK, AF_NETLINK, AF_PACKET
            call(f"socket_{{fam}}", {nrs["socket"]}, fam, 1, 0)
        for fam in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6):
            socket.socket(fam, socket.SOCK_STREAM).close()
        # What programs legitimately do still works: threads, subprocesses (clone3 -> clone).
        t = threading.Thread(target=print, args=("thread ok",)); t.start(); t.join()
        print(subprocess.run([sys.executable, "-c", "print('child ok')"], capture_output=True, text=True).stdout, end="")
        print("Seccomp", open("/proc/self/status").read().split("Seccomp:")[1].split()[0])
        """)
    assert res.exit_code == 0, res.stderr
    lines = dict(line.split(" ", 1) for line in res.stdout.splitlines())
    for name in ("unshare_user", "clone_newuser", "io_uring_setup", "userfaultfd", "keyctl", "bpf",
                 "perf_event_open", "ptrace"):
        assert lines[name].startswith("-1 Operation not permitted"), (name, lines[name])
    for fam in (40, 16, 17):
        assert lines[f"socket_{fam}"].startswith("-1 Address family not supported"), lines
    assert lines["thread"] == "ok" and lines["child"] == "ok" and lines["Seccomp"] == "2"


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), 1e12, 0, -1.0, "5"])
def test_bad_timeouts_are_refused_before_launch(timeout):
    # Finding 8: nan gave a cryptic error, inf/1e12 overflowed after launch, and the pool
    # silently replaced timeout=0 by its default.
    with pytest.raises(ValueError, match="timeout"):
        run_code("print(1)", timeout=timeout)
    with SandboxPool(max_workers=1, check=False) as pool:
        with pytest.raises(ValueError, match="timeout"):
            pool.submit("print(1)", timeout=timeout)


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="max_code_bytes"):
        SandboxConfig(tmpfs_bytes=1 << 20, max_code_bytes=1 << 20)
    with pytest.raises(ValueError, match="max_timeout_s"):
        SandboxConfig(max_timeout_s=float("inf"))
    with pytest.raises(ValueError, match="cgroup"):
        SandboxConfig(cgroup="v3")
    with pytest.raises(ValueError, match="default_timeout"):
        SandboxPool(max_workers=1, default_timeout=float("nan"), check=False)


def test_self_test_reports_the_isolation():
    out = subprocess.run([sys.executable, "-m", "ctpo_megatron.rollout.sandbox", "--self-test"],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=REPO))
    lines = {line.replace("!!", "").split()[0]: line for line in out.stdout.splitlines()[1:]}
    assert set(lines) == {"isolation", "namespaces", "root", "cgroup", "seccomp"}, out.stdout + out.stderr
    # Every item holds here; the cgroup only where this process may create one.
    weak = {item for item, line in lines.items() if line.lstrip().startswith("!!")}
    assert weak == ({"cgroup"} if detect_cgroups().mode == "none" else set()), out.stdout
    assert out.returncode == (1 if weak else 0)
    assert "new: pid net mnt ipc uts" in lines["namespaces"] and "seccomp     filter" in lines["seccomp"]


def test_without_a_cgroup_the_fallback_is_loud(caplog, tmp_path):
    # A parent that cannot hold run cgroups (a plain directory): rlimits only, with a warning;
    # cgroup="require" refuses to run instead.
    with caplog.at_level("WARNING", logger="ctpo_megatron.rollout.sandbox.cgroup"):
        support = detect_cgroups(str(tmp_path))
    assert support.mode == "none" and "no usable cgroup" in caplog.text
    ok = _run("print('ran')", cgroup_parent=str(tmp_path))
    assert ok.stdout == "ran\n" and ok.exit_code == 0
    with pytest.raises(SandboxSetupError, match="cgroup='require'"):
        _run("print('ran')", cgroup_parent=str(tmp_path), cgroup="require")
