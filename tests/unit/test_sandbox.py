"""Sandbox escapes: each attempt must fail cleanly and leave the machine as it was."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import psutil
import pytest

from ctpo_megatron.rollout.sandbox import SandboxConfig, SandboxPool, SandboxResult, SandboxSetupError, run_code
from ctpo_megatron.rollout.sandbox import _launcher
from ctpo_megatron.rollout.sandbox.runner import LAUNCHER_COMMAND, _UIDS

IS_ROOT = os.geteuid() == 0


def _run(code: str, timeout: float = 10.0, **cfg) -> SandboxResult:
    return run_code(textwrap.dedent(code), timeout=timeout, config=SandboxConfig(**cfg))


def _uid_range() -> range:
    base = 1_000_000 + (os.getpid() % 4096) * 256
    return range(base, base + 256)


def _leftover_processes(deadline_s: float = 10.0) -> list[int]:
    """Processes of the runs' uids still alive; polls until there are none or the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        left = [p.pid for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real in _uid_range()]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def test_runs_code_and_reports_errors():
    ok = _run("import sys\nprint(6 * 7)\nprint('warn', file=sys.stderr)")
    assert (ok.stdout, ok.stderr, ok.exit_code, ok.timed_out, ok.ok) == ("42\n", "warn\n", 0, False, True)
    bad = _run("x = 1\nraise ValueError('boom')")
    assert bad.exit_code == 1 and not bad.ok
    assert "ValueError: boom" in bad.stderr and 'main.py", line 2' in bad.stderr
    assert _run("import sys; sys.exit(3)").exit_code == 3
    syntax = _run("def f(:\n")
    assert syntax.exit_code == 1 and "SyntaxError" in syntax.stderr


def test_scientific_stack_works_in_the_allowlisted_root():
    # The root holds only the system directories, the interpreter and a few /etc files: what
    # math code uses (numpy's BLAS through ld.so.cache, sympy, time zone, locale) still works.
    res = _run("""
        import locale, tempfile, time
        import numpy, sympy
        x = sympy.Symbol("x")
        print(numpy.linalg.det(numpy.eye(3)), sympy.factor(x**2 - 1), time.strftime("%Z", time.gmtime()),
              locale.getpreferredencoding(), tempfile.gettempdir())
        """, timeout=60.0)
    assert res.exit_code == 0, res.stderr
    assert res.stdout == "1.0 (x - 1)*(x + 1) GMT UTF-8 /tmp\n"


def _host_python_state(flags: list[str], expr: str, setup: str = "") -> list:
    """`expr` as the interpreter with `flags` sees it on the host (clean environment), taken
    before anything else is imported."""
    out = subprocess.run([sys.executable, *flags, "-c", f"import sys\n{setup}\nstate = {expr}\nimport json\n"
                          f"print(json.dumps(state))"], capture_output=True, text=True, env={}, check=True).stdout
    return json.loads(out)


def test_code_sees_the_site_packages_without_the_start_up_hooks():
    # The code's interpreter starts without `site` (its .pth files are most of the start-up
    # CPU); the bootstrap gives it what `python -I` has: the same sys.path and prefixes, so
    # site-packages imports work, but nothing a .pth file imports is loaded.
    path, prefix = _host_python_state(["-I"], "[sys.path, sys.prefix]")
    pth_modules = (set(_host_python_state(["-I"], "list(sys.modules)"))
                   - set(_host_python_state(["-I", "-S"], "list(sys.modules)", setup="import os, site")))
    # The project's venv (an editable install, setuptools) has .pth hooks that import modules.
    assert any(m.startswith("__editable__") for m in pth_modules), sorted(pth_modules)
    res = _run("""
        import sys
        modules = list(sys.modules)
        import json, numpy
        print(json.dumps([sys.path, sys.prefix, sys.flags.no_site, modules, numpy.__file__]))
        """, timeout=30.0)
    assert res.exit_code == 0, res.stderr
    inner_path, inner_prefix, no_site, inner_modules, numpy_file = json.loads(res.stdout)
    assert (inner_path, inner_prefix, no_site) == (path, prefix, 1)
    assert numpy_file.startswith(path[-1] + "/"), numpy_file  # from the venv's site-packages
    assert sorted(pth_modules & set(inner_modules)) == []


def test_code_runs_as_main_py_with_its_own_tracebacks():
    # As `python -I -u main.py` would: __name__, argv, __file__, clean globals, exit()/quit(),
    # and tracebacks that start in main.py with its line numbers (no bootstrap frame).
    res = _run("""
        import sys
        print(__name__, sys.argv, __file__, sorted(globals()))

        def fail():
            raise ValueError("boom")
        fail()
        """)
    assert res.exit_code == 1
    assert res.stdout == ("__main__ ['main.py'] /tmp/work/main.py ['__annotations__', '__builtins__', "
                          "'__cached__', '__doc__', '__file__', '__loader__', '__name__', '__package__', "
                          "'__spec__', 'sys']\n")
    assert res.stderr == ('Traceback (most recent call last):\n'
                          '  File "/tmp/work/main.py", line 7, in <module>\n    fail()\n'
                          '  File "/tmp/work/main.py", line 6, in fail\n    raise ValueError("boom")\n'
                          'ValueError: boom\n')
    syntax = _run("x = 1\ny = (\n")
    assert syntax.exit_code == 1
    assert syntax.stderr.startswith('  File "/tmp/work/main.py", line 2\n'), syntax.stderr
    assert "Traceback" not in syntax.stderr
    assert [_run(code).exit_code for code in ("exit(4)", "quit()", "raise SystemExit(5)")] == [4, 0, 5]
    # The code's globals are its own until the end: an exit handler still sees them.
    handler = _run("import atexit\ne = 'kept'\natexit.register(lambda: print(e))\nraise ValueError(1)")
    assert (handler.stdout, handler.exit_code) == ("kept\n", 1), handler.stderr
    # Source of the code's own functions (inspect reads main.py through __loader__/linecache).
    src = _run("import inspect\ndef f():\n    return 1\nprint(inspect.getsource(f), end='')")
    assert src.stdout == "def f():\n    return 1\n", src.stderr


def test_launcher_starts_from_its_cached_bytecode():
    # Run as a script, the launcher was compiled from source at every run (~6 ms of CPU); the
    # command imports it, so it loads the bytecode the package's own import cached.
    res = subprocess.run([LAUNCHER_COMMAND[0], "-v", *LAUNCHER_COMMAND[1:]], input=b"", capture_output=True,
                         env={}, timeout=30)
    cache = importlib.util.cache_from_source(_launcher.__file__)
    assert f"# code object from '{cache}'" in res.stderr.decode(), res.stderr.decode()[-2000:]


def test_infinite_loop_times_out():
    res = _run("while True:\n    pass", timeout=1.0)
    assert res.timed_out and res.exit_code is None and not res.ok


def test_timeout_keeps_output_printed_before_it():
    res = _run("import time\nprint('started')\ntime.sleep(60)", timeout=1.0)
    assert res.timed_out and res.stdout == "started\n"


def test_network_connect_fails():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("0.0.0.0", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        host_ip = socket.gethostbyname(socket.gethostname())
        res = _run(f"""
            import socket
            for host in ("127.0.0.1", "{host_ip}", "8.8.8.8"):
                try:
                    socket.create_connection((host, {port}), timeout=2).close()
                    print("CONNECTED", host)
                except OSError as e:
                    print("blocked", host, type(e).__name__)
            """)
        assert res.exit_code == 0, res.stderr
        assert "CONNECTED" not in res.stdout and res.stdout.count("blocked") == 3, res.stdout
        with pytest.raises(BlockingIOError):  # nobody reached the listener
            listener.accept()
    finally:
        listener.close()


def test_fork_bomb_is_bounded_and_cleaned_up():
    res = _run("""
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """, timeout=2.0, max_processes=16)
    assert res.timed_out
    # Every process of the bomb died with the sandbox's pid namespace.
    assert _leftover_processes() == []
    assert subprocess.run([sys.executable, "-c", "pass"]).returncode == 0  # machine still fine


@pytest.mark.skipif(not IS_ROOT, reason="per-run uid (RLIMIT_NPROC as root) needs root")
def test_nproc_limit_applies_as_root():
    res = _run("""
        import os, time
        n = 0
        try:
            for _ in range(100):
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                n += 1
        except OSError as e:
            print("limited", n, type(e).__name__)
        """, timeout=10.0, max_processes=8)
    assert res.exit_code == 0 and res.stdout.startswith("limited"), (res.stdout, res.stderr)
    assert int(res.stdout.split()[1]) < 8


def test_memory_bomb_fails_cleanly():
    res = _run("x = bytearray(8 << 30)", memory_bytes=512 << 20)
    assert res.exit_code == 1 and "MemoryError" in res.stderr
    res = _run("""
        chunks = []
        while True:
            chunks.append(b"x" * (16 << 20))
        """, memory_bytes=512 << 20)
    assert res.exit_code != 0 and not res.timed_out and "MemoryError" in res.stderr


def test_huge_output_is_truncated():
    res = _run("""
        import sys
        while True:
            sys.stdout.write("x" * 65536)
        """, timeout=10.0, max_output_bytes=1000, file_size_bytes=4 << 20)
    # The parent closes the output pipe after file_size_bytes, which stops the writer long
    # before the timeout (Python ignores SIGPIPE, so the write fails with EPIPE; other
    # programs die of the signal).
    assert not res.timed_out and res.exit_code in (1, -signal.SIGPIPE)
    assert res.exit_code == -signal.SIGPIPE or "Broken pipe" in res.stderr
    assert res.stdout.startswith("x" * 1000) and "truncated" in res.stdout and len(res.stdout) < 1100


def test_cannot_write_outside_its_directory():
    owned = tempfile.mkdtemp(prefix="ctpo_probe_", dir=os.path.expanduser("~"))
    os.chmod(owned, 0o777)  # even a world-writable host directory must stay untouched
    tmp_name = f"/tmp/ctpo_probe_{os.getpid()}"
    try:
        res = _run(f"""
            import os
            for path in ("/etc/ctpo_probe", "{owned}/x", "{os.getcwd()}/ctpo_probe"):
                try:
                    open(path, "w").write("pwned")
                    print("WROTE", path)
                except OSError as e:
                    print("denied", type(e).__name__)
            open("{tmp_name}", "w").write("private")   # private tmpfs: allowed, invisible outside
            open("local.txt", "w").write("ok")
            print("cwd", os.getcwd(), sorted(os.listdir(".")))
            """)
        assert res.exit_code == 0, res.stderr
        assert "WROTE" not in res.stdout and res.stdout.count("denied") == 3, res.stdout
        assert "cwd /tmp/work ['local.txt', 'main.py']" in res.stdout
        assert os.listdir(owned) == [] and not os.path.exists("/etc/ctpo_probe")
        assert not os.path.exists(tmp_name) and not os.path.exists("ctpo_probe")
        # The next run starts from an empty directory again.
        assert _run("import os; print(sorted(os.listdir('.')))").stdout == "['main.py']\n"
    finally:
        shutil.rmtree(owned, ignore_errors=True)


def test_cannot_read_parent_environment(monkeypatch):
    monkeypatch.setenv("CTPO_TEST_SECRET", "s3cr3t-value")
    res = _run(f"""
        import glob, os
        print(dict(os.environ))
        for path in ["/proc/{os.getpid()}/environ", "/proc/1/environ"] + glob.glob("/proc/*/environ"):
            try:
                print(path, open(path, "rb").read())
            except OSError as e:
                print(path, "denied", type(e).__name__)
        """)
    assert res.exit_code == 0, res.stderr
    assert "s3cr3t-value" not in res.stdout and "CTPO_TEST_SECRET" not in res.stdout
    assert f"/proc/{os.getpid()}/environ denied" in res.stdout  # the trainer is not visible


def test_pool_runs_concurrently_in_order():
    codes = [f"import time; time.sleep(0.3); print({i} * {i})" for i in range(8)]
    with SandboxPool(max_workers=8) as pool:
        start = time.monotonic()
        results = pool.map(codes)
        elapsed = time.monotonic() - start

        async def both():
            return await asyncio.gather(pool.run("print('a')"), pool.run("print('b')"))

        assert [r.stdout for r in asyncio.run(both())] == ["a\n", "b\n"]
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(8)]
    # Overlapped, not one after another: each run lies within `elapsed`, so their lengths can
    # only add up to more than it if runs were in flight at the same time.
    assert sum(r.wall_s for r in results) > 2 * elapsed
    assert not _UIDS._in_use  # every uid handed back


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="timeout"):
        run_code("pass", timeout=0)
    with pytest.raises(ValueError, match="memory_bytes"):
        SandboxConfig(memory_bytes=0)
    with pytest.raises(ValueError, match="max_workers"):
        SandboxPool(max_workers=0)
    # An interpreter that cannot report its site-packages is a host problem naming the setting.
    with pytest.raises(SandboxSetupError, match=r"SandboxConfig.python \(/bin/false\)"):
        run_code("pass", config=SandboxConfig(python="/bin/false"))


_UNPRIVILEGED_PROBE = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
from ctpo_megatron.rollout.sandbox import SandboxConfig, run_code
os.environ["CTPO_TEST_SECRET"] = "s3cr3t-value"
cfg = SandboxConfig(python=sys.executable, max_processes=16)
probe = run_code('''
import os, socket
print("secret" if "CTPO_TEST_SECRET" in os.environ else "no-secret")
try:
    socket.create_connection(("127.0.0.1", 22), timeout=1)
    print("CONNECTED")
except OSError:
    print("net-blocked")
try:
    open(os.path.expanduser("~") + "/../../etc/ctpo_probe", "w")
    print("WROTE")
except OSError:
    print("write-denied")
try:  # init is uid 0 of the same user namespace, but holds capabilities the code lacks
    open("/proc/1/mem", "rb")
    print("INIT-MEM")
except OSError:
    print("init-mem-denied")
''', config=cfg)
bomb = run_code("import os\nwhile True:\n    try: os.fork()\n    except OSError: pass", timeout=2, config=cfg)
loop = run_code("while True: pass", timeout=1, config=cfg)
print(json.dumps({"probe": probe.stdout, "isolation": probe.isolation, "bomb": bomb.timed_out,
                  "loop": [loop.timed_out, loop.exit_code]}))
"""


def _unprivileged_python() -> str | None:
    """An interpreter uid 65534 can run and that can import this checkout, or None."""
    if not IS_ROOT or shutil.which("setpriv") is None:
        return None
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for python in (sys.executable, "/usr/bin/python3"):
        ok = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c",
                             f"import subprocess, sys; subprocess.run([sys.executable, '-c', ''], check=True); "
                             f"sys.path.insert(0, {repo!r}); import ctpo_megatron.rollout.sandbox"],
                            capture_output=True, env={"PATH": "/usr/bin:/bin"})
        if ok.returncode == 0:
            return python
    return None


def test_unprivileged_caller_is_isolated_by_a_user_namespace():
    # The non-root path (no uid switch; a user namespace instead), run for real as uid 65534.
    python = _unprivileged_python()
    if python is None:
        pytest.skip("needs root (to become uid 65534 via setpriv) and an interpreter uid 65534 can run")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(_UNPRIVILEGED_PROBE)
    os.chmod(f.name, 0o644)
    try:
        out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, f.name, repo],
                             capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"})
    finally:
        os.unlink(f.name)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["isolation"] == "userns"
    assert res["probe"].split() == ["no-secret", "net-blocked", "write-denied", "init-mem-denied"]
    assert res["bomb"] and res["loop"] == [True, None]
    leftover = [p.pid for p in psutil.process_iter(["uids", "cmdline"])
                if p.info["uids"] and p.info["uids"].real == 65534 and "main.py" in (p.info["cmdline"] or [])]
    assert leftover == []


def test_interpreter_under_a_covered_directory_stays_usable_read_only(tmp_path):
    # A venv in /tmp (covered by the sandbox's private tmpfs) is re-attached, read-only.
    venv = tempfile.mkdtemp(prefix="ctpo_venv_", dir="/tmp")
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
        os.chmod(venv, 0o755)
        res = run_code(textwrap.dedent(f"""
            import os, sys
            print(sys.prefix)
            try:
                open("{venv}/pwned", "w")
            except OSError as e:
                print("denied", type(e).__name__)
            """), config=SandboxConfig(python=f"{venv}/bin/python"))
        assert res.exit_code == 0, res.stderr
        assert res.stdout == f"{venv}\ndenied OSError\n"
        assert not os.path.exists(f"{venv}/pwned")
    finally:
        shutil.rmtree(venv, ignore_errors=True)


def test_fallback_without_namespaces_still_limits(tmp_path):
    # Hosts without namespace support: rlimits, own uid as root, process-group kill; no netns.
    cfg = dict(use_namespaces=False, require_isolation=False)
    with pytest.raises(ValueError, match="require_isolation=False"):
        SandboxConfig(use_namespaces=False)
    python = _unprivileged_python() if IS_ROOT else sys.executable
    if python is None:
        pytest.skip("as root the fallback runs the code as an unprivileged uid: needs an interpreter "
                    "that uid can run")
    cfg["python"] = python
    ok = _run("import os; print(os.getcwd().startswith('/tmp/ctpo_sandbox_'), sorted(os.listdir('.')))", **cfg)
    assert (ok.stdout, ok.isolation) == ("True ['main.py']\n", "none")
    loop = _run("import time\nprint('hi')\ntime.sleep(30)", timeout=1.0, **cfg)
    assert loop.timed_out and loop.stdout == "hi\n"
    if IS_ROOT:
        bomb = _run("""
            import os
            n = 0
            try:
                for _ in range(64):
                    if os.fork() == 0:
                        import time; time.sleep(30); os._exit(0)
                    n += 1
            except OSError:
                print("limited", n)
            """, timeout=3.0, max_processes=8, **cfg)
        assert bomb.stdout.startswith("limited"), (bomb.stdout, bomb.stderr)
        # A child that leaves the process group is still found by its uid.
        escape = _run("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\n"
                      "print('parent done')", **cfg)
        assert escape.stdout == "parent done\n"
    assert _leftover_processes() == []  # the sleeping children died with the process group
