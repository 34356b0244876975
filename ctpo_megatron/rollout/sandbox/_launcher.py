"""Sandbox launcher: a standalone script, run as `python -I -S _launcher.py CONFIG_JSON`.

It must not import the package (it runs without site-packages, for speed and so that nothing
of the trainer's environment is loaded). Process tree:

    launcher (trainer's uid, own session)          waits with the wall-clock timeout
      └─ init (pid 1 of new pid/net/mount ns)       mounts, workdir; reaps; reports status
           └─ code (unprivileged uid, rlimits)      exec python -I -u main.py

Killing init (SIGKILL from the launcher on timeout, or PDEATHSIG when the launcher dies) makes
the kernel kill every process left in the pid namespace, so nothing survives a run, whatever
the code did (fork, setsid, daemonize).

Protocol: the code arrives on stdin; stdout/stderr are inherited files; one JSON object per
line is written to the status fd: {"exit_code": int} from init, {"timed_out": true} from the
launcher, {"error": str} when setup failed (the code did not run), {"isolation": str}.
"""

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x1000, 0x2000, 0x4000, 0x40000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SYS_MOUNT_SETATTR = 442  # same number on every architecture (added in Linux 5.12)
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1

_libc = ctypes.CDLL(None, use_errno=True)


def _status(fd, **kv):
    try:
        os.write(fd, (json.dumps(kv) + "\n").encode())
    except OSError:
        pass


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data):
    _check(_libc.mount(source, target.encode(), fstype, ctypes.c_ulong(flags), data), f"mount {target}")


def _readonly_root():
    # struct mount_attr {u64 attr_set, attr_clr, propagation, userns_fd}
    attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY, 0, 0, 0)
    _check(_libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr),
                         ctypes.sizeof(attr)), "mount_setattr / read-only")


def _expose(paths):
    """Keeps `paths` reachable for the unprivileged uid when an ancestor is private.

    E.g. the interpreter under /root (mode 0700): hold a bind of each path in /tmp, cover the
    private ancestor with an empty world-traversable tmpfs (hiding the rest of it), then
    move the binds back to their original paths, so nothing else of that ancestor is visible.
    """
    by_ancestor = {}
    for path in paths:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            anc = "/" + "/".join(parts[:i])
            if not os.stat(anc).st_mode & 0o001:
                by_ancestor.setdefault(anc, []).append(path)
                break
    for n, (anc, inner) in enumerate(sorted(by_ancestor.items())):
        holds = []
        for k, path in enumerate(inner):
            hold = f"/tmp/.expose-{n}-{k}"
            os.mkdir(hold, 0o700)
            _mount(path.encode(), hold, None, MS_BIND | MS_REC, None)
            holds.append((hold, path))
        _mount(b"tmpfs", anc, b"tmpfs", MS_NOSUID | MS_NODEV, b"size=65536,mode=755")
        for hold, path in holds:
            os.makedirs(path, 0o755, exist_ok=True)
            _mount(hold.encode(), path, None, MS_MOVE, None)
            os.rmdir(hold)


def _setup_mounts(cfg):
    """In init (pid 1): private propagation, read-only root, fresh tmpfs and /proc."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    if cfg["readonly_root"]:
        try:
            _readonly_root()
        except OSError:
            pass  # older kernel: the unprivileged uid still cannot write outside world-writable dirs
    opts = f"size={cfg['tmpfs_bytes']},mode=1777".encode()
    for path in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(path):
            _mount(b"tmpfs", path, b"tmpfs", MS_NOSUID | MS_NODEV, opts)
    if cfg["uid"] is not None:
        _expose(cfg["expose_paths"])
    try:
        # A /proc of the new pid namespace: the code sees only its own processes.
        _mount(b"proc", "/proc", b"proc", MS_NOSUID | MS_NODEV, None)
    except OSError:
        pass  # the old /proc still hides other users' environ (ptrace access check)


def _write_id_maps(uid, gid):
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"0 {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"0 {gid} 1")


def _exec_code(cfg, status_fd, workdir):
    """In the code process: rlimits, privileges, clean fds, exec. Never returns."""
    try:
        limits = [
            (resource.RLIMIT_AS, cfg["memory_bytes"], cfg["memory_bytes"]),
            (resource.RLIMIT_CPU, cfg["cpu_seconds"], cfg["cpu_seconds"] + 1),
            (resource.RLIMIT_FSIZE, cfg["file_size_bytes"], cfg["file_size_bytes"]),
            (resource.RLIMIT_NPROC, cfg["max_processes"], cfg["max_processes"]),
            (resource.RLIMIT_CORE, 0, 0),
        ]
        for which, soft, hard in limits:
            resource.setrlimit(which, (soft, hard))
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setgid(cfg["uid"])
            os.setuid(cfg["uid"])
        # After the uid change (which clears it): die with init.
        _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl PDEATHSIG")
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl NO_NEW_PRIVS")
        os.set_inheritable(status_fd, False)
        os.closerange(3, status_fd)
        os.closerange(status_fd + 1, 1 << 16)
        fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(fd, 0)
        os.chdir(workdir)
        env = dict(cfg["env"], HOME=workdir)
        os.execve(cfg["python"], [cfg["python"], "-I", "-u", "main.py"], env)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, then exit
        _status(status_fd, error=f"code process setup failed: {e!r}")
    os._exit(127)


def _init(cfg, status_fd, code, namespaced):
    """pid 1 of the new namespaces: prepare the workdir, run the code, reap, report."""
    try:
        if namespaced:
            _setup_mounts(cfg)
            workdir = "/tmp/work"
            os.mkdir(workdir, 0o700)
        else:
            workdir = cfg["fallback_workdir"]
        path = os.path.join(workdir, "main.py")
        with open(path, "wb") as f:
            f.write(code)
        if cfg["uid"] is not None:
            os.chown(workdir, cfg["uid"], cfg["uid"])
            os.chown(path, cfg["uid"], cfg["uid"])
    except BaseException as e:  # noqa: BLE001
        _status(status_fd, error=f"sandbox setup failed: {e!r}")
        os._exit(125)
    pid = os.fork()
    if pid == 0:
        _exec_code(cfg, status_fd, workdir)
    while True:  # init also reaps orphans re-parented to it
        try:
            done, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        if done == pid:
            code_status = os.waitstatus_to_exitcode(status)
            _status(status_fd, exit_code=code_status)
            os._exit(0)


def main():
    cfg = json.loads(sys.argv[1])
    status_fd = cfg["status_fd"]
    code = sys.stdin.buffer.read()
    root = os.geteuid() == 0
    flags = CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS
    if not root:
        flags |= CLONE_NEWUSER
    outer_uid, outer_gid = os.getuid(), os.getgid()
    namespaced = _libc.unshare(flags) == 0
    if namespaced:
        if not root:
            try:
                _write_id_maps(outer_uid, outer_gid)
            except OSError as e:
                _status(status_fd, error=f"user namespace id maps: {e!r}")
                sys.exit(125)
        _status(status_fd, isolation="root+ns" if root else "userns")
    elif cfg["require_isolation"]:
        err = ctypes.get_errno()
        _status(status_fd, error=f"unshare(net|pid|mount{'' if root else '|user'}) failed: "
                                 f"{os.strerror(err)}; set require_isolation=False to run with rlimits only")
        sys.exit(125)
    else:
        _status(status_fd, isolation="none")
    if not root:
        cfg["uid"] = None  # cannot change uid; the user namespace (if any) is the boundary
    pid = os.fork()
    if pid == 0:
        _init(cfg, status_fd, code, namespaced)

    def on_timeout(signum, frame):
        _status(status_fd, timed_out=True)
        os.kill(pid, signal.SIGKILL)

    signal.signal(signal.SIGALRM, on_timeout)
    signal.setitimer(signal.ITIMER_REAL, cfg["timeout"])
    while True:
        try:
            os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    signal.setitimer(signal.ITIMER_REAL, 0)
    if not namespaced:
        # Without a pid namespace, kill what the code left in our process group.
        try:
            os.killpg(os.getpgid(0), signal.SIGKILL)
        except OSError:
            pass


if __name__ == "__main__":
    main()
