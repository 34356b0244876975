"""A real Slurm (Debian slurm-wlm 22.05) on this machine: slurmctld + one slurmd per fake node.

Fake nodes `<prefix>1..N` all run on this host (NodeHostname = this host, one slurmd port each),
declare `cpus` CPUs and `gpus` fake GPUs (gres files are symlinks to /dev/null, so Slurm sets
CUDA_VISIBLE_DEVICES). auth/none: no munged. The config lives in a private directory and is
found through $SLURM_CONF (jobs inherit it). The node names are added to /etc/hosts (tagged
line, removed at stop) so `http://<node>:port` and the torchrun rendezvous resolve.
Daemons run in the foreground as children of this process (`-D`), so `stop` owns their pids.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import random

SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
HOSTS_FILE = "/etc/hosts"


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
    """Start/stop a private Slurm cluster of `nodes` fake nodes; `env` is the clients' environment."""

    def __init__(self, root: Path, *, nodes: int = 3, cpus: int = 2, gpus: int = 1, prefix: str = "ctpo-n"):
        self.root, self.nodes, self.cpus, self.gpus = Path(root), nodes, cpus, gpus
        self.names = [f"{prefix}{i}" for i in range(1, nodes + 1)]
        self.conf = self.root / "slurm.conf"
        self.tag = f"# ctpo-megatron test slurm {self.root}"
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.conf),
                    "PATH": os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN_DIRS)}

    # -- config ---------------------------------------------------------------------------
    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        for sub in ("ctld", "log", "run", "dev"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        lines = [
            "ClusterName=ctpotest", f"SlurmctldHost={host}(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/none", "CredType=cred/none", f"SlurmctldPort={quiet_port()}",
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
            lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={quiet_port()} "
                         f"CPUs={self.cpus} RealMemory=4000 Gres=gpu:{self.gpus} State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        devices = []
        for g in range(self.gpus):
            dev = self.root / "dev" / f"fakegpu{g}"
            if not dev.is_symlink():
                dev.symlink_to("/dev/null")  # gres/gpu needs a character device
            devices.append(dev)
        gres = ["AutoDetect=off"] + [f"NodeName={n} Name=gpu File={self.root}/dev/fakegpu[0-{self.gpus - 1}]"
                                     for n in self.names]
        (self.root / "gres.conf").write_text("\n".join(gres) + "\n")

    def _hosts_without_tag(self) -> list[str]:
        with open(HOSTS_FILE) as f:
            return [line for line in f.read().splitlines() if self.tag not in line]

    def _set_hosts(self, add: bool) -> None:
        lines = self._hosts_without_tag()
        if add:
            lines.append(f"127.0.0.1 {' '.join(self.names)} {self.tag}")
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
        self._write_conf()
        self._set_hosts(add=True)
        self._spawn(find_binary("slurmctld"), "-D", "-i", "-f", str(self.conf))
        for name in self.names:
            (self.root / f"spool-{name}").mkdir(exist_ok=True)
            self._spawn(find_binary("slurmd"), "-D", "-f", str(self.conf), "-N", name)
        deadline = time.monotonic() + timeout
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
        """Cancels all jobs, stops the daemons, removes the hosts line; returns pids it had to KILL."""
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
        while (left := self.processes_of_cluster()) and time.monotonic() < deadline:
            time.sleep(0.3)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        self._set_hosts(add=False)
        return killed
