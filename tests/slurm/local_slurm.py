"""A real Slurm (Debian slurm-wlm 22.05) on this machine in which every fake node is its own host.

Each fake node `<prefix>1..N` runs its slurmd inside its own network namespace (own eth0 with
address `NET.(10+i)` on a bridge, own loopback, own port space) and its own UTS namespace
(hostname = node name), like netns-slurm.sh in the project notes. Everything a job starts on a
node inherits both, so a process that dials 127.0.0.1 for another node gets "connection refused",
as on a cluster, and torch/gloo see distinct host names. slurmctld runs in this namespace at the
bridge address. Only loopback and addresses of NET.0/24 are used; no route leads out.

auth/none: no munged. The config lives in a private directory and is found through $SLURM_CONF
(jobs inherit it). Node names resolve through tagged /etc/hosts lines (removed at stop).
Daemons run in the foreground as children of this process (`-D`), so `stop` owns their pids;
leftovers inside the namespaces are ours too and are killed before the namespaces go.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo", "ip", "nsenter",
            "unshare")
HOSTS_FILE = "/etc/hosts"
NET = "10.231.7"
"""First three octets of the fake nodes' /24 (reserved for these tests on the project machines)."""
BRIDGE = "ctposlurm0"


def quiet_port(low: int = 20000, high: int = 32000) -> int:
    """A free TCP port below the kernel's ephemeral range (usually 32768+).

    `free_port()`-style picks come from the ephemeral range that every outgoing connection and
    every other test's free port also use; a port chosen now but bound seconds later (by a
    daemon or a job) is much less likely to be taken in between when it lies outside it.
    """
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(low, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in [{low}, {high})")


def find_binary(name: str) -> str | None:
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN_DIRS)
    return shutil.which(name, path=path)


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if find_binary(b) is None]


class LocalSlurm:
    """Start/stop a private Slurm cluster of `nodes` fake nodes, one network namespace each;
    `env` is the clients' environment."""

    def __init__(self, root: Path, *, nodes: int = 4, cpus: int = 2, gpus: int = 2, prefix: str = "ctpo-n"):
        if nodes > 200:
            raise ValueError("at most 200 fake nodes (addresses NET.11..NET.210)")
        self.root, self.nodes, self.cpus, self.gpus = Path(root), nodes, cpus, gpus
        self.names = [f"{prefix}{i}" for i in range(1, nodes + 1)]
        self.addrs = {name: f"{NET}.{10 + i}" for i, name in enumerate(self.names, start=1)}
        self.conf = self.root / "slurm.conf"
        self.tag = f"# ctpo-megatron test slurm {self.root}"
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.conf),
                    "PATH": os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN_DIRS)}

    # -- network --------------------------------------------------------------------------
    def _ip(self, *args: str, check: bool = True) -> None:
        subprocess.run([find_binary("ip"), *args], check=check, capture_output=True, timeout=30)

    def _veth(self, name: str) -> tuple[str, str]:
        i = self.names.index(name) + 1
        return f"vctsl{i}", f"vctsp{i}"  # <= 15 characters

    def _net_down(self) -> None:
        for name in self.names:
            self._ip("netns", "del", name, check=False)  # deletes its eth0, hence the veth peer
            self._ip("link", "del", self._veth(name)[0], check=False)
        self._ip("link", "del", BRIDGE, check=False)

    def _net_up(self) -> None:
        self._net_down()  # leftovers of a killed earlier run (our names only)
        self._ip("link", "add", BRIDGE, "type", "bridge")
        self._ip("addr", "add", f"{NET}.1/24", "dev", BRIDGE)
        self._ip("link", "set", BRIDGE, "up")
        for name in self.names:
            host_end, node_end = self._veth(name)
            self._ip("netns", "add", name)
            self._ip("link", "add", host_end, "type", "veth", "peer", "name", node_end)
            self._ip("link", "set", host_end, "master", BRIDGE, "up")
            self._ip("link", "set", node_end, "netns", name)
            self._ip("-n", name, "link", "set", node_end, "name", "eth0")
            self._ip("-n", name, "addr", "add", f"{self.addrs[name]}/24", "dev", "eth0")
            self._ip("-n", name, "link", "set", "eth0", "up")
            self._ip("-n", name, "link", "set", "lo", "up")  # 127.0.0.1 inside: refused, not unreachable

    def namespace_pids(self, name: str) -> list[int]:
        out = subprocess.run([find_binary("ip"), "netns", "pids", name], capture_output=True, text=True,
                             timeout=30)
        return [int(p) for p in out.stdout.split() if p.isdigit()]

    # -- config ---------------------------------------------------------------------------
    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        for sub in ("ctld", "log", "run", "dev"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        lines = [
            "ClusterName=ctpotest", f"SlurmctldHost={host}({NET}.1)", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/none", "CredType=cred/none", f"SlurmctldPort={quiet_port()}",
            "SlurmdPort=6818",  # one port for all: every node has its own port space
            # a requeued job may start again once its old credentials expired (default 120 s)
            "AuthInfo=cred_expire=5",
            f"StateSaveLocation={self.root}/ctld", f"SlurmdSpoolDir={self.root}/spool-%n",
            f"SlurmctldPidFile={self.root}/run/slurmctld.pid", f"SlurmdPidFile={self.root}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={self.root}/log/slurmctld.log", f"SlurmdLogFile={self.root}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "SchedulerType=sched/backfill", "SchedulerParameters=bf_interval=1",
            "SlurmdParameters=config_overrides", "MpiDefault=none", "ReturnToService=2",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none", "SlurmctldTimeout=30", "SlurmdTimeout=30", "InactiveLimit=0",
            "MinJobAge=300", "KillWait=5", "Waittime=0", "GresTypes=gpu",
        ]
        for name in self.names:
            lines.append(f"NodeName={name} NodeHostname={name} NodeAddr={self.addrs[name]} CPUs={self.cpus} "
                         f"RealMemory=4000 Gres=gpu:{self.gpus} State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        for g in range(self.gpus):
            dev = self.root / "dev" / f"fakegpu{g}"
            if not dev.is_symlink():
                dev.symlink_to("/dev/null")  # gres/gpu needs a character device
        gres = ["AutoDetect=off"] + [f"NodeName={n} Name=gpu File={self.root}/dev/fakegpu[0-{self.gpus - 1}]"
                                     for n in self.names]
        (self.root / "gres.conf").write_text("\n".join(gres) + "\n")

    def _hosts_without_tag(self) -> list[str]:
        with open(HOSTS_FILE) as f:
            return [line for line in f.read().splitlines() if self.tag not in line]

    def _set_hosts(self, add: bool) -> None:
        lines = self._hosts_without_tag()
        if add:
            lines += [f"{self.addrs[n]} {n} {self.tag}" for n in self.names]
        with open(HOSTS_FILE, "w") as f:  # rewrite in place: /etc/hosts is often a bind mount
            f.write("\n".join(lines) + "\n")

    # -- lifecycle ------------------------------------------------------------------------
    def _spawn(self, *argv: str) -> None:
        log = open(self.root / "log" / f"{Path(argv[0]).name}-{len(self.procs)}.stdout", "ab")
        self.procs.append(subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True))

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([find_binary(argv[0]) or argv[0], *argv[1:]], env=self.env, check=check,
                              capture_output=True, text=True, timeout=timeout)

    def start(self, timeout: float = 30) -> None:
        self._net_up()
        self._write_conf()
        self._set_hosts(add=True)
        self._spawn(find_binary("slurmctld"), "-D", "-i", "-f", str(self.conf))
        for name in self.names:
            (self.root / f"spool-{name}").mkdir(exist_ok=True)
            # nsenter, not `ip netns exec` (it remounts /sys and slurmd then finds no cgroup fs);
            # a UTS namespace of its own so `hostname` is the node's name (torch resolves it)
            self._spawn(find_binary("nsenter"), f"--net=/run/netns/{name}", find_binary("unshare"), "--uts",
                        "sh", "-c", f'hostname {name} && exec "$0" -D -f "$1" -N {name}',
                        find_binary("slurmd"), str(self.conf))
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=10).stdout.split()
            states = dict(zip(out[::2], out[1::2]))
            if len(states) == self.nodes and set(states.values()) == {"idle"}:
                return
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode}; logs in {self.root}/log")
            time.sleep(0.2)
        raise RuntimeError(f"Slurm nodes not idle after {timeout} s: {states}; logs in {self.root}/log")

    def processes_of_cluster(self) -> list[int]:
        """Pids (other than ours) whose environment names this cluster's SLURM_CONF."""
        marker = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker in f.read().split(b"\0"):
                        pids.append(int(entry))
            except OSError:
                continue
        return pids

    def stop(self) -> list[int]:
        """Cancels all jobs, stops the daemons, removes namespaces, bridge and hosts lines;
        returns the pids it had to KILL."""
        try:
            self.run("scancel", "--user=root", check=False, timeout=10)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False, timeout=10).stdout.strip():
                time.sleep(0.3)
        except (OSError, subprocess.SubprocessError):
            pass
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        killed = []
        deadline = time.monotonic() + 10
        while (left := set(self.processes_of_cluster())) and time.monotonic() < deadline:
            time.sleep(0.3)
        for name in self.names:  # what is left inside our namespaces was started by our slurmd
            left.update(self.namespace_pids(name))
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        self._net_down()
        self._set_hosts(add=False)
        return killed
