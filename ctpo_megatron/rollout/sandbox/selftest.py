"""What isolation this host gives the sandbox, checked by a real run (see `--self-test`).

    python -m ctpo_megatron.rollout.sandbox --self-test

Runs one probe program in the sandbox and compares what it sees with the host: namespaces,
the root's contents, the cgroup, seccomp, capabilities. The trainer logs `summary()` at
start-up.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field

from ctpo_megatron.rollout.sandbox.cgroup import detect as detect_cgroups
from ctpo_megatron.rollout.sandbox.config import SandboxConfig, SandboxSetupError
from ctpo_megatron.rollout.sandbox.runner import run_code

NAMESPACES = ("user", "pid", "net", "mnt", "ipc", "uts", "cgroup")
# Host paths that must not exist inside (sockets, kernel interfaces, typical data locations).
MUST_BE_ABSENT = ("/run", "/var/run", "/sys", "/home", "/data", "/mnt", "/srv", "/opt")

_PROBE = r"""
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
status = {}
if os.path.exists("/proc/self/status"):
    status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
r = {"uid": os.getuid(), "root": sorted(os.listdir("/")),
     "ns": {n: os.readlink(f"/proc/self/ns/{n}") for n in NAMESPACES if os.path.exists(f"/proc/self/ns/{n}")},
     "seccomp": status.get("Seccomp", "?").strip(), "no_new_privs": status.get("NoNewPrivs", "?").strip(),
     "cap_eff": status.get("CapEff", "?").strip(), "present": [p for p in MUST_BE_ABSENT if os.path.lexists(p)],
     "procs": len([p for p in os.listdir("/proc") if p.isdigit()])}
r["unshare_user"] = os.strerror(ctypes.get_errno()) if libc.unshare(0x10000000) != 0 else "allowed"
print(json.dumps(r))
"""


@dataclass
class SelfTestReport:
    """Outcome of `self_test`: one (item, ok, detail) per line, and the overall verdict."""

    items: list[tuple[str, bool, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.items)

    def lines(self) -> list[str]:
        head = (f"sandbox self-test: uid {os.geteuid()}, kernel {platform.release()}, {platform.machine()}: "
                f"{'OK' if self.ok else 'PROBLEMS (marked !!)'}")
        return [head] + [f"  {'  ' if ok else '!!'} {item:<11} {detail}" for item, ok, detail in self.items]

    def summary(self) -> str:
        return "sandbox: " + "; ".join(f"{item} {detail}" + ("" if ok else " (!!)") for item, ok, detail in self.items)


def self_test(config: SandboxConfig | None = None) -> SelfTestReport:
    """Runs the probe in a sandbox built with `config`; never raises for a weak host (the
    report says what is missing)."""
    cfg = config or SandboxConfig()
    rep = SelfTestReport()
    code = f"NAMESPACES = {NAMESPACES!r}\nMUST_BE_ABSENT = {MUST_BE_ABSENT!r}\n" + _PROBE
    try:
        res = run_code(code, timeout=min(60.0, cfg.max_timeout_s), config=cfg)
        probe = json.loads(res.stdout) if res.exit_code == 0 else None
    except (SandboxSetupError, OSError) as e:
        rep.items.append(("sandbox", False, f"cannot be built: {e}"))
        return rep
    if probe is None:
        rep.items.append(("sandbox", False, f"probe failed (exit {res.exit_code}): {res.stderr[-500:]}"))
        return rep
    rep.items.append(("isolation", res.isolation != "none",
                      {"root+ns": f"root: namespaces + per-run uid {probe['uid']}",
                       "userns": "unprivileged: user namespace, no capabilities",
                       "none": "NONE: rlimits only (require_isolation=False)"}.get(res.isolation, res.isolation)))
    host = {n: os.readlink(f"/proc/self/ns/{n}") for n in NAMESPACES if os.path.exists(f"/proc/self/ns/{n}")}
    new = [n for n in NAMESPACES if n in probe["ns"] and probe["ns"][n] != host.get(n)]
    shared = [n for n in NAMESPACES if n in probe["ns"] and n not in new]
    need = {"pid", "net", "mnt", "ipc"}
    rep.items.append(("namespaces", need <= set(new),
                      f"new: {' '.join(new) or '-'}; shared with the host: {' '.join(shared) or '-'}"))
    rep.items.append(("root", not probe["present"] and "tmp" in probe["root"],
                      f"/ holds {' '.join(probe['root'])}; "
                      + (f"{probe['procs']} process(es) in /proc" if probe["procs"] else "no procfs (/proc empty)")
                      + (f"; HOST PATHS VISIBLE: {' '.join(probe['present'])}" if probe["present"] else "")))
    if cfg.cgroup == "off":
        rep.items.append(("cgroup", True, "off (SandboxConfig.cgroup='off'): rlimits only"))
    else:
        cg = detect_cgroups(cfg.cgroup_parent)
        rep.items.append(("cgroup", cg.mode != "none",
                          cg.describe() + (f"; per run: memory {cfg.run_memory_limit >> 20} MiB, "
                                           f"{cfg.max_processes} processes" if cg.mode != "none" else "")))
    filtered = probe["seccomp"] == "2"
    rep.items.append(("seccomp", filtered or not cfg.seccomp,
                      ("filter" if filtered else "OFF" + (" (SandboxConfig.seccomp=False)" if not cfg.seccomp else ""))
                      + f"; unshare(CLONE_NEWUSER): {probe['unshare_user']}; no_new_privs {probe['no_new_privs']}; "
                        f"effective caps {probe['cap_eff']}"))
    return rep
