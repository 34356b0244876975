"""Weight sync across distinct hosts: the server (TP 2) in one network namespace, trainer rank 0
in another, joined by a bridge (10.231.9.0/24, made and removed here). 127.0.0.1 is each
namespace's own loopback, as on a cluster: trainer rank 0 must publish the address the
servers reach it by (`master_address: auto`), and a loopback master address must fail."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests._require import missing_system
from tests.unit.test_embedded_server import build_tiny_model

pytestmark = pytest.mark.dist
ROOT = Path(__file__).resolve().parents[2]
NET, BRIDGE = "10.231.9", "ctpowsbr0"
NODES = {"ctpows-srv": f"{NET}.11", "ctpows-trn": f"{NET}.12"}


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _teardown():
    for i, ns in enumerate(NODES):
        _ip("netns", "del", ns, check=False)
        _ip("link", "del", f"vctpows{i}", check=False)
    _ip("link", "del", BRIDGE, check=False)


@pytest.fixture(scope="module")
def netns():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        missing_system("network namespaces need root and iproute2 (scripts/setup_system.sh)")
    _teardown()
    try:
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{NET}.1/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        for i, (ns, addr) in enumerate(NODES.items()):
            _ip("netns", "add", ns)
            _ip("link", "add", f"vctpows{i}", "type", "veth", "peer", "name", f"vctpowp{i}")
            _ip("link", "set", f"vctpows{i}", "master", BRIDGE, "up")
            _ip("link", "set", f"vctpowp{i}", "netns", ns)
            _ip("-n", ns, "link", "set", f"vctpowp{i}", "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield NODES
    finally:
        _teardown()


def _env():
    # gloo would advertise the address the machine's hostname resolves to (loopback here).
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="eth0",
                NO_PROXY="*", no_proxy="*")


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except OSError:
        return None


def test_trainer_publishes_its_routable_address(netns, tmp_path):
    model = build_tiny_model(tmp_path / "model", seed=0)
    pushed = build_tiny_model(tmp_path / "pushed", seed=5)
    port = 30555
    server_ip = netns["ctpows-srv"]
    url = f"http://{server_ip}:{port}"
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen(["ip", "netns", "exec", "ctpows-srv", sys.executable, "-m",
                               "ctpo_megatron.rollout.serving.server", "--model", model, "--host", "0.0.0.0",
                               "--port", str(port), "--tp-size", "2"],
                              env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        # The test runs in the root namespace, which reaches the bridge.
        while _get(url + "/health") != 200:
            assert server.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)

        def trainer(master_address):
            proc = subprocess.run(["ip", "netns", "exec", "ctpows-trn", sys.executable,
                                   str(ROOT / "tests/dist/netns_trainer.py"), master_address, pushed, url],
                                  env=_env(), capture_output=True, text=True, timeout=180)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            assert lines, proc.stdout[-2000:] + proc.stderr[-4000:]
            return json.loads(lines[-1][len("RESULT "):])

        auto = trainer("auto")
        assert auto["ok"], auto
        info = json.loads(urllib.request.urlopen(url + "/server_info").read())
        assert info["weight_version"] == "from-auto"
        assert [r["received_bytes"] > 0 for r in info["tp_ranks"]] == [True, True]
        loop = trainer("127.0.0.1")  # the server dials its own loopback: no trainer there
        assert not loop["ok"] and loop["seconds"] < 120, loop
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
