"""Sandbox launcher: a standalone module, run as `python -I -S -c "import _launcher;
_launcher.main()"` with its directory on sys.path (`runner.LAUNCHER_COMMAND`: the import
loads its cached bytecode) or as `python -I -S _launcher.py`.

It must not import the package (it runs without site-packages, for speed and so that nothing
of the trainer's environment is loaded), and it imports only modules that load fast (no json,
re, enum: `_signal` instead of `signal`, `marshal` for the protocol). Process tree:

    launcher (trainer's uid, own session)          waits with the wall-clock timeout
      └─ init (pid 1 of new pid/net/mount/ipc/uts ns) joins the run's cgroup, builds the root,
           │                                          reaps; reports status
           └─ code (unprivileged uid or no caps,    exec python -I -S -u -c BOOTSTRAP main.py
                    rlimits, seccomp filter)             (runs main.py as `python -I -u main.py` would)

The root the code sees is built from nothing: an empty tmpfs into which only an allowlist of
host paths is bind-mounted read-only (the system directories, the interpreter's prefixes, a
few /etc files), plus a minimal /dev with a private devpts, a fresh /proc of the new pid
namespace and a private /tmp; then `pivot_root` and the host's root is detached. No host data,
checkpoint, /run socket, /sys or host /proc exists inside.

Killing init (SIGKILL from the launcher on timeout, or the launcher's process group killed by
the caller) makes the kernel kill every process left in the pid namespace, so nothing survives
a run, whatever the code did (fork, setsid, daemonize).

Without namespaces (use_namespaces=False, a fallback for hosts that lack them) init is instead
the leader of a new process group, the launcher is the code's subreaper, and at the end it kills
that group and, as root, every process of the run's uid, then reaps.

Protocol: stdin carries a record (4-byte little-endian length + `marshal` of a dict: the
settings) followed by the code; stdout/stderr are pipes the caller drains; records of the same
form are written to the status fd (held by the launcher and init only): {"isolation": str} and
{"seccomp": str} from the launcher, {"error": str} when setup failed (the code did not run; a
host problem), {"started": true} once the code is about to run, {"code_error": str} when the
code itself made the run impossible (it does not fit in the tmpfs), {"exit_code": int} from
init, {"timed_out": true} from the launcher.
"""

import _signal as signal
import ctypes
import errno
import marshal
import os
import resource
import struct
import sys
import time

CLONE_NEWNS, CLONE_NEWCGROUP = 0x00020000, 0x02000000
CLONE_NEWUTS, CLONE_NEWIPC = 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
NAMESPACE_FLAGS = (CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER
                   | CLONE_NEWPID | CLONE_NEWNET)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
MNT_DETACH = 0x2
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_SECCOMP = 1, 24, 22
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 36, 38, 47, 4
SECCOMP_MODE_FILTER = 2
# Same numbers on every architecture (the new mount API, Linux 5.12).
SYS_MOUNT_SETATTR = 442
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
# statvfs f_flag bits that a bind remount must keep (locked in a user namespace).
_KEEP_FLAGS = {0x2: MS_NOSUID, 0x4: MS_NODEV, 0x8: MS_NOEXEC, 0x400: 0x400, 0x800: 0x800, 0x1000: 1 << 21}
DEVICES = ("null", "zero", "full", "random", "urandom")
MAX_PTYS = 16

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def record(obj):
    """One protocol record: length, then the marshalled object."""
    data = marshal.dumps(obj)
    return struct.pack("<I", len(data)) + data


def read_records(raw):
    """Merges a stream of records (dicts) into one dict; a partial last record (a process
    killed mid-write) is ignored."""
    merged, pos = {}, 0
    while pos + 4 <= len(raw):
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            break
        merged.update(marshal.loads(raw[pos + 4:pos + 4 + n]))
        pos += 4 + n
    return merged


def _status(fd, **kv):
    try:
        os.write(fd, record(kv))
    except OSError:
        pass


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None):
    _check(_libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(), flags,
                       data and data.encode()), f"mount {source} on {target}")


# ---------------------------------------------------------------------------------------------
# seccomp: a classic BPF program, built here so the launcher needs no library.
# ---------------------------------------------------------------------------------------------

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
# Denied outright (EPERM). Names are the kernel's; numbers per architecture.
_DENY = {
    "x86_64": {
        "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "perf_event_open": 298,
        "bpf": 321, "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272,
        "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
        "fspick": 433, "mount_setattr": 442, "name_to_handle_at": 303, "open_by_handle_at": 304,
        "kexec_load": 246, "kexec_file_load": 320, "init_module": 175, "finit_module": 313,
        "delete_module": 176, "reboot": 169, "swapon": 167, "swapoff": 168, "acct": 163,
    },
    "aarch64": {
        "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "perf_event_open": 241,
        "bpf": 280, "userfaultfd": 282, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "add_key": 217, "request_key": 218, "keyctl": 219, "unshare": 97,
        "setns": 268, "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
        "fspick": 433, "mount_setattr": 442, "name_to_handle_at": 264, "open_by_handle_at": 265,
        "kexec_load": 104, "kexec_file_load": 294, "init_module": 105, "finit_module": 273,
        "delete_module": 106, "reboot": 142, "swapon": 224, "swapoff": 225, "acct": 89,
    },
}
# Inspected by argument: clone (namespace flags), socket/socketpair (family), ioctl (TIOCSTI);
# clone3 passes its flags in memory a filter cannot read, so it reports ENOSYS and the C
# library falls back to clone.
_ARGS = {"x86_64": {"clone": 56, "clone3": 435, "socket": 41, "socketpair": 53, "ioctl": 16},
         "aarch64": {"clone": 220, "clone3": 435, "socket": 198, "socketpair": 199, "ioctl": 29}}
ALLOWED_FAMILIES = (1, 2, 10)  # AF_UNIX, AF_INET, AF_INET6
TIOCSTI = 0x5412
RET_ALLOW, RET_KILL_PROCESS, RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
LD_ABS_W, JEQ_K, JGE_K, JSET_K, RET_K = 0x20, 0x15, 0x35, 0x45, 0x06


def seccomp_program(arch):
    """The filter as a list of (code, jt, jf, k), or None for an architecture without a table.

    seccomp_data layout: int nr @0, u32 arch @4, u64 ip @8, u64 args[6] @16 (low half first
    on these little-endian architectures).
    """
    if arch not in AUDIT_ARCH:
        return None
    nrs = _ARGS[arch]
    prog, fixups = [], []  # fixups: (index, true label, false label)

    def op(code, k, jt=None, jf=None):
        fixups.append((len(prog), jt, jf))
        prog.append([code, 0, 0, k])

    op(LD_ABS_W, 4)
    op(JEQ_K, AUDIT_ARCH[arch], None, "kill")  # another ABI (i386 int 0x80): no table, kill
    op(LD_ABS_W, 0)
    if arch == "x86_64":
        op(JGE_K, 0x40000000, "eperm", None)  # the x32 ABI
    for nr in sorted(_DENY[arch].values()):
        op(JEQ_K, nr, "eperm", None)
    op(JEQ_K, nrs["clone3"], "enosys", None)
    op(JEQ_K, nrs["clone"], "clone", None)
    op(JEQ_K, nrs["socket"], "socket", None)
    op(JEQ_K, nrs["socketpair"], "socket", None)
    op(JEQ_K, nrs["ioctl"], "ioctl", None)
    labels = {"allow": None}
    op(RET_K, RET_ALLOW)
    labels["clone"] = len(prog)
    op(LD_ABS_W, 16)
    op(JSET_K, NAMESPACE_FLAGS, "eperm", "allow")
    labels["socket"] = len(prog)
    op(LD_ABS_W, 16)
    for fam in ALLOWED_FAMILIES:
        op(JEQ_K, fam, "allow", None)
    op(RET_K, RET_ERRNO | errno.EAFNOSUPPORT)
    labels["ioctl"] = len(prog)
    op(LD_ABS_W, 24)
    op(JEQ_K, TIOCSTI, "eperm", "allow")
    for name, ret in (("allow", RET_ALLOW), ("eperm", RET_ERRNO | errno.EPERM),
                      ("enosys", RET_ERRNO | errno.ENOSYS), ("kill", RET_KILL_PROCESS)):
        labels[name] = len(prog)
        op(RET_K, ret)
    for i, jt, jf in fixups:
        for slot, label in ((1, jt), (2, jf)):
            if label is not None:
                prog[i][slot] = labels[label] - i - 1
                assert 0 <= prog[i][slot] < 256
    return [tuple(p) for p in prog]


def _install_seccomp(prog):
    raw = b"".join(struct.pack("=HBBI", *p) for p in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))

    class FProg(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = FProg(len(prog), ctypes.addressof(buf))
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0), "seccomp filter")


# ---------------------------------------------------------------------------------------------
# The allowlisted root.
# ---------------------------------------------------------------------------------------------

# pivot_root has no C library wrapper; its number differs per architecture.
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}


def _pivot_root(new, old):
    arch = os.uname().machine
    if arch not in SYS_PIVOT_ROOT:
        raise OSError(errno.ENOSYS, f"pivot_root: syscall number unknown for {arch}")
    _check(_libc.syscall(SYS_PIVOT_ROOT[arch], new.encode(), old.encode()), f"pivot_root {new}")


def _make_readonly(path, keep_dev):
    """Read-only (recursively where the kernel can), nosuid, and nodev unless `keep_dev`."""
    attrs = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | (0 if keep_dev else MOUNT_ATTR_NODEV)
    attr = (ctypes.c_uint64 * 4)(attrs, 0, 0, 0)
    if _libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), AT_RECURSIVE, ctypes.byref(attr),
                     ctypes.sizeof(attr)) == 0:
        return
    # Before Linux 5.12: remount the top mount only, keeping the flags a user namespace locks.
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | (0 if keep_dev else MS_NODEV)
    vfs = os.statvfs(path).f_flag
    for bit, ms in _KEEP_FLAGS.items():
        if vfs & bit:
            flags |= ms
    _mount(None, path, None, flags)


def _bind(src, dst, keep_dev=False):
    """Bind host path `src` (under /oldroot) read-only at `dst` (under /newroot)."""
    if os.path.isdir(src):
        os.makedirs(dst, 0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), 0o755, exist_ok=True)
        os.close(os.open(dst, os.O_CREAT | os.O_WRONLY, 0o444))
    _mount(src, dst, None, MS_BIND | MS_REC)
    _make_readonly(dst, keep_dev)


def _build_root(cfg, code):
    """In init (pid 1): builds the code's root and pivots into it; returns the workdir.

    Works like bubblewrap: a scratch tmpfs over /tmp becomes the root for a moment (the host's
    root moves to /oldroot, where its /tmp is visible again), the new root is assembled in
    /newroot from binds of /oldroot/..., then the scratch and the host's root are detached.
    """
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=65536,mode=755")
    os.chdir("/tmp")
    os.mkdir("newroot", 0o755)
    os.mkdir("oldroot", 0o755)
    _mount("tmpfs", "newroot", "tmpfs", MS_NOSUID | MS_NODEV, "size=1048576,nr_inodes=4096,mode=755")
    _pivot_root(".", "oldroot")
    os.chdir("/")
    new = "/newroot"
    for path, target in cfg["symlinks"]:
        os.makedirs(os.path.dirname(new + path), 0o755, exist_ok=True)
        os.symlink(target, new + path)
    # /tmp first: an interpreter that lives under the host's /tmp is bound inside it.
    os.mkdir(new + "/tmp", 0o755)
    _mount("tmpfs", new + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['tmpfs_bytes']},mode=1777")
    for src, dst in cfg["binds"]:
        _bind("/oldroot" + src, new + dst)
    os.makedirs(new + "/etc", 0o755, exist_ok=True)
    for name, text in cfg["etc_text"].items():
        with open(f"{new}/etc/{name}", "w") as f:
            f.write(text)
    dev = new + "/dev"
    os.makedirs(dev + "/pts", 0o755, exist_ok=True)
    for name in DEVICES:
        _bind(f"/oldroot/dev/{name}", f"{dev}/{name}", keep_dev=True)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx")):
        os.symlink(target, f"{dev}/{name}")
    # Its own devpts instance: the code sees and can open only its own (few) ptys. Where the
    # kernel refuses one, /dev/pts stays empty (no ptys at all; never the host's).
    try:
        _mount("devpts", dev + "/pts", "devpts", MS_NOSUID | MS_NOEXEC,
               f"newinstance,ptmxmode=0666,mode=0620,max={MAX_PTYS}")
    except OSError:
        pass
    os.mkdir(dev + "/shm", 0o755)
    _mount("tmpfs", dev + "/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['tmpfs_bytes']},mode=1777")
    os.mkdir(new + "/proc", 0o555)
    # A procfs of the new pid namespace: the code sees only its own processes. A user namespace
    # may not mount one where the host's /proc is partly masked (containers): then /proc stays
    # empty (Python runs without it; the host's is never visible).
    try:
        _mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:
        pass
    workdir = "/tmp/work"
    os.mkdir(new + workdir, 0o700)
    _write_code(new + workdir, cfg["uid"], code)
    _check(_libc.umount2(b"/oldroot", MNT_DETACH), "umount old root")
    os.chdir(new)
    _pivot_root(".", ".")
    _check(_libc.umount2(b".", MNT_DETACH), "umount scratch root")
    os.chdir("/")
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    return workdir


class CodeError(Exception):
    """The code itself made the run impossible (reported as the code's failure)."""


def _write_code(workdir, uid, code):
    path = os.path.join(workdir, "main.py")
    try:
        with open(path, "wb") as f:
            f.write(code)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise CodeError(f"the program ({len(code)} bytes) does not fit in the sandbox's "
                            f"/tmp: {e.strerror}") from None
        raise
    if uid is not None:
        os.chown(workdir, uid, uid)
        os.chown(path, uid, uid)


# ---------------------------------------------------------------------------------------------
# Processes.
# ---------------------------------------------------------------------------------------------

# The code's interpreter starts with -S: `site` executing the environment's .pth files (an
# editable install's import finder, setuptools' distutils shim) is most of a bare start-up's
# CPU time and of no use inside the sandbox. This bootstrap then does what the code can see of
# `site`: the prefixes and sys.path entries of `python -I` on the host (computed once by the
# caller, argv[2:]; those the root does not hold are left out, as `site` would) and
# exit/quit/help/copyright/credits/license. It runs main.py in __main__ as `python -I -u
# main.py` would (same sys.argv, __file__, globals, exit status, SyntaxError report) and drops
# its own frame from tracebacks, so they start in main.py. Start-up hooks (.pth imports,
# sitecustomize) do not run.
BOOTSTRAP = """\
import sys
sys.prefix, sys.exec_prefix = sys.argv[2], sys.argv[3]
import os, site
sys.path.extend(p for p in sys.argv[4:] if os.path.exists(p))
sys.argv[:] = sys.argv[1:2]
site.setquit(); site.setcopyright(); site.sethelper()
__file__, __cached__ = os.path.abspath(sys.argv[0]), None
__loader__ = sys.modules["_frozen_importlib_external"].SourceFileLoader("__main__", __file__)
del os, site, sys
try:
    exec(compile(__loader__.get_data(__file__), __file__, "exec", dont_inherit=True))
except BaseException:  # binds no name: the code's globals stay as it left them (atexit)
    __import__("sys").exc_info()[1].with_traceback(__import__("sys").exc_info()[2].tb_next)
    raise
"""


def code_argv(cfg):
    """The code process's argv: main.py (in the cwd) run by BOOTSTRAP."""
    return [cfg["python"], "-I", "-S", "-u", "-c", BOOTSTRAP, "main.py", cfg["site_prefix"],
            cfg["site_exec_prefix"], *cfg["site_path"]]


def _exec_code(cfg, status_fd, workdir, seccomp):
    """In the code process: rlimits, privileges, seccomp, clean fds, exec. Never returns."""
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
        else:
            # uid 0 of a user namespace (or the caller's own uid): no capability survives exec.
            _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
            for cap in range(64):
                if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == errno.EINVAL:
                    break
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
        if seccomp is not None:
            _install_seccomp(seccomp)  # last: everything above may use the denied calls
        os.execve(cfg["python"], code_argv(cfg), env)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, then exit
        _status(status_fd, error=f"code process setup failed: {e!r}")
    os._exit(127)


def _join_cgroup(cfg):
    for procs in cfg["cgroup_procs"]:
        with open(procs, "w") as f:
            f.write("0")


def _init(cfg, status_fd, code, namespaced, seccomp):
    """pid 1 of the new namespaces: join the cgroup, build the root, run the code, reap, report.
    Without namespaces: the leader of a new process group holding the code's processes."""
    try:
        _join_cgroup(cfg)
        if namespaced:
            _libc.sethostname(b"sandbox", 7)  # best effort: the host's name is not the code's business
            workdir = _build_root(cfg, code)
        else:
            os.setpgid(0, 0)
            workdir = cfg["fallback_workdir"]
            _write_code(workdir, cfg["uid"], code)
    except CodeError as e:
        _status(status_fd, started=True, code_error=str(e))
        os._exit(1)
    except BaseException as e:  # noqa: BLE001
        _status(status_fd, error=f"sandbox setup failed: {e!r}")
        os._exit(125)
    _status(status_fd, started=True)
    pid = os.fork()
    if pid == 0:
        _exec_code(cfg, status_fd, workdir, seccomp)
    while True:  # init also reaps orphans re-parented to it
        try:
            done, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        except InterruptedError:
            continue
        if os.WIFSTOPPED(status):
            # Only a tracer sees this (PTRACE_TRACEME made init one): end the stopped process.
            try:
                os.kill(done, signal.SIGKILL)
            except OSError:
                pass
            continue
        if done == pid:
            _status(status_fd, exit_code=os.waitstatus_to_exitcode(status))
            os._exit(0)


def main():
    data = sys.stdin.buffer.read()
    (n,) = struct.unpack_from("<I", data)
    cfg = read_records(data[:4 + n])
    code = data[4 + n:]
    status_fd = cfg["status_fd"]
    root = os.geteuid() == 0
    flags = CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS
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
        _status(status_fd, error=f"unshare(net|pid|mount|ipc|uts{'' if root else '|user'}) failed: "
                                 f"{os.strerror(err)}; set require_isolation=False to run with rlimits only")
        sys.exit(125)
    else:
        _status(status_fd, isolation="none")
    arch = os.uname().machine
    seccomp = seccomp_program(arch) if cfg["seccomp"] else None
    _status(status_fd, seccomp="off" if not cfg["seccomp"] else
            ("filter" if seccomp is not None else f"unsupported architecture {arch}"))
    if not root:
        cfg["uid"] = None  # cannot change uid; the user namespace (if any) is the boundary
    if not namespaced:
        # Orphans of the code re-parent to us, so _cleanup_fallback can reap them.
        _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    pid = os.fork()
    if pid == 0:
        _init(cfg, status_fd, code, namespaced, seccomp)

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


def _write_id_maps(uid, gid):
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"0 {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"0 {gid} 1")


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
