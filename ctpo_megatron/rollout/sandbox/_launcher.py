"""Sandbox launcher: a standalone script, run as `python -I -S _launcher.py CONFIG_JSON`.

It must not import the package (it runs without site-packages, for speed and so that nothing
of the trainer's environment is loaded). Process tree:

    launcher (trainer's uid, own session)          waits with the wall-clock timeout
      └─ init (pid 1 of new pid/net/mount ns)       mounts, workdir; reaps; reports status
           └─ code (unprivileged uid, rlimits)      exec python -I -u main.py

Killing init (SIGKILL from the launcher on timeout, or PDEATHSIG when the launcher dies) makes
the kernel kill every process left in the pid namespace, so nothing survives a run, whatever
the code did (fork, setsid, daemonize).

Without namespaces (SandboxConfig.use_namespaces=False, a fallback for hosts that lack them)
init is instead the leader of a new process group, the launcher is the code's subreaper, and
at the end it kills that group and, as root, every process of the run's uid, then reaps.

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
import time

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x4000, 0x40000
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
# Same numbers on every architecture (the new mount API, Linux 5.2 / 5.12).
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1
OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC, MOVE_MOUNT_F_EMPTY_PATH = 0x1, 0o2000000, 0x4
TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")

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


def _set_readonly(path):
    # struct mount_attr {u64 attr_set, attr_clr, propagation, userns_fd}
    attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY, 0, 0, 0)
    _check(_libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), AT_RECURSIVE, ctypes.byref(attr),
                         ctypes.sizeof(attr)), f"mount_setattr {path} read-only")


def _under(path, top):
    return path == top or path.startswith(top.rstrip("/") + "/")


def _private_ancestor(path):
    """The topmost ancestor of `path` that other users cannot traverse, or None."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        anc = "/" + "/".join(parts[:i])
        if not os.stat(anc).st_mode & 0o001:
            return anc
    return None


def _setup_mounts(cfg):
    """In init (pid 1): private propagation, read-only root, fresh tmpfs on the world-writable
    directories and /proc, and the interpreter kept reachable.

    The interpreter directories (`expose_paths`) may lie under a directory we cover: a tmp
    directory, or (as root) a private one like /root (mode 0700) that the code's uid could not
    traverse. Such paths are cloned as detached mounts first (open_tree), the cover is mounted
    (an empty tmpfs hides the rest of a private directory), and the clones are attached back
    at their original paths, read-only.
    """
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    if cfg["readonly_root"]:
        try:
            _set_readonly("/")
        except OSError:
            pass  # older kernel: the unprivileged uid still cannot write outside world-writable dirs
    covers = {d: f"size={cfg['tmpfs_bytes']},mode=1777" for d in TMP_DIRS if os.path.isdir(d)}
    if cfg["uid"] is not None:
        for path in cfg["expose_paths"]:
            anc = _private_ancestor(path)
            if anc is not None:
                covers.setdefault(anc, "size=65536,mode=755")
    # A cover inside another cover disappears with the outer mount: drop it.
    covers = {c: o for c, o in covers.items() if not any(c != d and _under(c, d) for d in covers)}
    keep = []
    for path in cfg["expose_paths"]:
        if any(_under(path, c) for c in covers) and path not in covers:
            fd = _libc.syscall(SYS_OPEN_TREE, AT_FDCWD, path.encode(),
                               OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE)
            _check(0 if fd >= 0 else -1, f"open_tree {path}")
            keep.append((path, fd))
    for cover, opts in sorted(covers.items()):
        _mount(b"tmpfs", cover, b"tmpfs", MS_NOSUID | MS_NODEV, opts.encode())
    for path, fd in keep:
        os.makedirs(path, 0o755, exist_ok=True)
        _check(_libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, path.encode(), MOVE_MOUNT_F_EMPTY_PATH),
               f"move_mount {path}")
        os.close(fd)
        _set_readonly(path)
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
    """pid 1 of the new namespaces: prepare the workdir, run the code, reap, report.
    Without namespaces: the leader of a new process group holding the code's processes."""
    try:
        if not namespaced:
            os.setpgid(0, 0)
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
    namespaced = cfg["use_namespaces"] and _libc.unshare(flags) == 0
    if namespaced:
        if not root:
            try:
                _write_id_maps(outer_uid, outer_gid)
            except OSError as e:
                _status(status_fd, error=f"user namespace id maps: {e!r}")
                sys.exit(125)
        _status(status_fd, isolation="root+ns" if root else "userns")
    elif cfg["require_isolation"]:
        err = ctypes.get_errno() if cfg["use_namespaces"] else 0
        _status(status_fd, error=f"unshare(net|pid|mount{'' if root else '|user'}) failed: "
                                 f"{os.strerror(err)}; set require_isolation=False to run with rlimits only")
        sys.exit(125)
    else:
        _status(status_fd, isolation="none")
    if not root:
        cfg["uid"] = None  # cannot change uid; the user namespace (if any) is the boundary
    if not namespaced:
        # Orphans of the code re-parent to us, so _cleanup_fallback can reap them.
        _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
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
        _cleanup_fallback(cfg["uid"], pgid=pid)


def _cleanup_fallback(uid, pgid):
    """Without a pid namespace: kill what the code left behind and reap it.

    The code's process group always; as root also every process of the run's own uid (a
    helper drops to that uid and signals -1), which catches processes that left the group.
    """
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
    if uid is not None:
        helper = os.fork()
        if helper == 0:
            try:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                os.kill(-1, signal.SIGKILL)
            except OSError:
                pass
            os._exit(0)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if done == 0:
            time.sleep(0.005)


if __name__ == "__main__":
    main()
