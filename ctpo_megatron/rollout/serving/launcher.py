"""Start, watch and stop inference servers: real SGLang (one per group of GPUs) or the embedded
server, optionally behind SGLang's router.

    cfg = LaunchConfig(model_path=..., backend="sglang", num_servers=4, tp_size=2)
    with ServerGroup(cfg) as group:          # starts, waits for /health, stops on exit
        client = SGLangClient(group.worker_urls)       # or [group.router_url]

Each server runs in its own session (process group), so `stop()` reaches its children too
(SGLang forks scheduler / detokenizer processes): SIGTERM to the group, then SIGKILL after
`stop_timeout_s`. Logs go to `log_dir/<name>.log`; a server that exits or never becomes
healthy raises `ServerStartError` / `ServerDiedError` with the tail of its log.
Weight updates must go to `worker_urls` (the router does not forward them).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ctpo_megatron.parallel.net import free_port

logger = logging.getLogger(__name__)

COLOCATED_MEM_FRACTION = 0.5
"""SGLang --mem-fraction-static of servers colocated with the trainer (`rollout.placement=
colocated`) unless set: the trainer's weights and optimizer state stay on the GPU while the
servers' weights and KV cache are resumed, so the servers take a smaller share than alone."""


class ServerStartError(RuntimeError):
    """A server did not become healthy in time (message has its log tail)."""


class ServerDiedError(RuntimeError):
    """A server process exited while it should be running (message has its log tail)."""


@dataclass
class LaunchConfig:
    """What to launch. Ports: `base_port + i` per server when set, else free ports."""

    model_path: str
    """HF model directory (or hub id for SGLang)."""
    backend: str = "embedded"
    """`sglang` (python -m sglang.launch_server; needs CUDA) or `embedded` (our server)."""
    num_servers: int = 1
    """Independent servers (data-parallel replicas)."""
    tp_size: int = 1
    """TP size of each server: GPUs per SGLang server (server i uses GPUs [base_gpu_id +
    i*tp_size, ...)); weight-update ranks of an embedded server (`--tp-size`)."""
    host: str = "127.0.0.1"
    """Bind address of every server and the router."""
    base_port: int | None = None
    """First server port; None = pick free ports."""
    base_gpu_id: int = 0
    """First GPU of server 0 (SGLang)."""
    mem_fraction_static: float | None = None
    """SGLang --mem-fraction-static (None = SGLang's auto)."""
    enable_memory_saver: bool = False
    """SGLang --enable-memory-saver: the server can release and resume its GPU memory
    (colocated with a trainer). The embedded server always can."""
    weight_version: str = "default"
    """Initial weight version reported in meta_info."""
    skip_tokenizer_init: bool = True
    """SGLang --skip-tokenizer-init: token-in/token-out (no `text` in responses)."""
    load_format: str | None = None
    """SGLang --load-format (e.g. `dummy` when the trainer pushes weights at once)."""
    dtype: str | None = None
    """--dtype for both backends (None = backend default: SGLang auto, embedded float32)."""
    seed: int | None = None
    """--random-seed (SGLang) / --seed (embedded)."""
    max_batch_size: int = 32
    """Embedded server: sequences per batch."""
    extra_args: list[str] = field(default_factory=list)
    """Appended verbatim to each server command line."""
    router: bool = False
    """Front the servers with `python -m sglang_router.launch_router`."""
    router_port: int | None = None
    """Router port (None = a free port)."""
    router_policy: str = "cache_aware"
    """Router policy: random, round_robin, cache_aware, power_of_two."""
    health_timeout_s: float = 600.0
    """Seconds to wait for every server's /health."""
    stop_timeout_s: float = 15.0
    """Seconds between SIGTERM and SIGKILL at shutdown."""
    log_dir: str | None = None
    """Where server logs go (None = a temporary directory)."""
    python: str = sys.executable
    """Interpreter for the server processes."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for every server."""
    die_with_parent: bool = True
    """Linux: each server gets SIGTERM when the launching process dies, even by SIGKILL (its own
    session would otherwise outlive it). Start the group from a thread that outlives it."""

    def __post_init__(self) -> None:
        if self.backend not in ("sglang", "embedded"):
            raise ValueError(f"LaunchConfig.backend={self.backend!r}: expected 'sglang' or 'embedded'")
        if self.num_servers < 1 or self.tp_size < 1:
            raise ValueError(f"LaunchConfig.num_servers={self.num_servers} and tp_size={self.tp_size} "
                             "must be >= 1")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static < 1:
            raise ValueError(f"LaunchConfig.mem_fraction_static={self.mem_fraction_static} must be in (0, 1)")


def sglang_server_command(cfg: LaunchConfig, index: int, port: int) -> list[str]:
    """`python -m sglang.launch_server ...` for server `index` (flags as in SGLang 0.5.23's CLI)."""
    cmd = [cfg.python, "-m", "sglang.launch_server", "--model-path", cfg.model_path,
           "--host", cfg.host, "--port", str(port), "--tp-size", str(cfg.tp_size),
           "--base-gpu-id", str(cfg.base_gpu_id + index * cfg.tp_size),
           "--weight-version", cfg.weight_version]
    if cfg.mem_fraction_static is not None:
        cmd += ["--mem-fraction-static", str(cfg.mem_fraction_static)]
    if cfg.enable_memory_saver:
        cmd.append("--enable-memory-saver")
    if cfg.skip_tokenizer_init:
        cmd.append("--skip-tokenizer-init")
    if cfg.load_format:
        cmd += ["--load-format", cfg.load_format]
    if cfg.dtype:
        cmd += ["--dtype", cfg.dtype]
    if cfg.seed is not None:
        cmd += ["--random-seed", str(cfg.seed)]
    return cmd + list(cfg.extra_args)


def embedded_server_command(cfg: LaunchConfig, index: int, port: int) -> list[str]:
    """`python -m ctpo_megatron.rollout.serving.server ...` for server `index`."""
    cmd = [cfg.python, "-m", "ctpo_megatron.rollout.serving.server", "--model", cfg.model_path,
           "--host", cfg.host, "--port", str(port), "--max-batch-size", str(cfg.max_batch_size),
           "--weight-version", cfg.weight_version, "--seed", str((cfg.seed or 0) + index),
           "--tp-size", str(cfg.tp_size)]
    if cfg.dtype:
        cmd += ["--dtype", cfg.dtype]
    return cmd + list(cfg.extra_args)


def router_command(cfg: LaunchConfig, worker_urls: list[str], port: int) -> list[str]:
    """`python -m sglang_router.launch_router --worker-urls ...` (sglang-router 0.3.x CLI)."""
    return [cfg.python, "-m", "sglang_router.launch_router", "--worker-urls", *worker_urls,
            "--policy", cfg.router_policy, "--host", cfg.host, "--port", str(port)]


def log_tail(path: str | Path, lines: int = 40) -> str:
    """The last `lines` lines of a log file ('' when it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _parent_death_signal():
    """A preexec_fn asking the kernel for SIGTERM when the parent dies (Linux PR_SET_PDEATHSIG).

    libc is loaded here, in the parent: the child between fork and exec only makes the call
    (no imports there, which could deadlock when the parent has other threads).
    """
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)
    return lambda: prctl(pr_set_pdeathsig, sigterm)


@dataclass
class ManagedProcess:
    """One launched process in its own session; `log` holds its stdout + stderr."""

    name: str
    cmd: list[str]
    url: str
    log: Path
    proc: subprocess.Popen | None = None

    def start(self, env: dict[str, str], die_with_parent: bool = True) -> None:
        preexec = _parent_death_signal() if die_with_parent and sys.platform.startswith("linux") else None
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                         preexec_fn=preexec)
        logger.info("started %s (pid %d): %s", self.name, self.proc.pid, " ".join(self.cmd))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def died_error(self) -> ServerDiedError:
        code = None if self.proc is None else self.proc.returncode
        return ServerDiedError(f"{self.name} at {self.url} exited with code {code}; last lines of "
                               f"{self.log}:\n{log_tail(self.log)}")

    def stop(self, timeout_s: float) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after `timeout_s`."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is the leader's pid
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            if sig == signal.SIGTERM:
                # The leader is gone; children it forked may still hold the group.
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            break


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get_status(url: str, timeout: float = 5.0) -> int | None:
    try:
        with _NO_PROXY.open(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


class ServerGroup:
    """Launches `cfg.num_servers` servers (+ router) and owns their lifetime."""

    def __init__(self, cfg: LaunchConfig):
        self.cfg = cfg
        self.log_dir = Path(cfg.log_dir or tempfile.mkdtemp(prefix="ctpo_servers_"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.servers: list[ManagedProcess] = []
        self.router: ManagedProcess | None = None

    @property
    def worker_urls(self) -> list[str]:
        """Every server's own URL (send weight updates here)."""
        return [s.url for s in self.servers]

    @property
    def router_url(self) -> str | None:
        return self.router.url if self.router else None

    def __enter__(self) -> "ServerGroup":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.cfg.env)
        return env

    def start(self, wait: bool = True) -> None:
        """Starts every server (and the router once they are healthy)."""
        cfg = self.cfg
        build = sglang_server_command if cfg.backend == "sglang" else embedded_server_command
        try:
            for i in range(cfg.num_servers):
                port = cfg.base_port + i if cfg.base_port is not None else free_port(cfg.host)
                server = ManagedProcess(f"server{i}", build(cfg, i, port), f"http://{cfg.host}:{port}",
                                        self.log_dir / f"server{i}.log")
                server.start(self._env(), cfg.die_with_parent)
                self.servers.append(server)
            if wait:
                self.wait_healthy(self.servers, cfg.health_timeout_s)
            if cfg.router:
                port = cfg.router_port or free_port(cfg.host)
                self.router = ManagedProcess("router", router_command(cfg, self.worker_urls, port),
                                             f"http://{cfg.host}:{port}", self.log_dir / "router.log")
                self.router.start(self._env(), cfg.die_with_parent)
                if wait:
                    self.wait_healthy([self.router], cfg.health_timeout_s)
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def wait_healthy(procs: list[ManagedProcess], timeout_s: float) -> None:
        """Polls each `/health` until 200; ServerDiedError / ServerStartError with the log tail."""
        deadline = time.monotonic() + timeout_s
        pending = list(procs)
        while pending:
            for proc in list(pending):
                if not proc.alive():
                    raise proc.died_error()
                if _get_status(proc.url + "/health") == 200:
                    pending.remove(proc)
                    logger.info("%s healthy at %s", proc.name, proc.url)
            if not pending:
                return
            if time.monotonic() > deadline:
                names = ", ".join(f"{p.name} ({p.url})" for p in pending)
                tails = "\n".join(f"--- {p.log} ---\n{log_tail(p.log)}" for p in pending)
                raise ServerStartError(f"not healthy after {timeout_s:.0f}s: {names}\n{tails}")
            time.sleep(0.25)

    def check_alive(self) -> None:
        """Raises ServerDiedError (with the log tail) if any server or the router has exited."""
        for proc in self.servers + ([self.router] if self.router else []):
            if not proc.alive():
                raise proc.died_error()

    def stop(self) -> None:
        """Stops the router, then every server; no process of theirs survives."""
        for proc in ([self.router] if self.router else []) + self.servers:
            proc.stop(self.cfg.stop_timeout_s)

    def pids(self) -> list[int]:
        return [p.proc.pid for p in self.servers + ([self.router] if self.router else []) if p.proc]
