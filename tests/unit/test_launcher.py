"""Launcher: SGLang / router command lines (SGLang cannot run here), and real embedded servers
started, killed mid-batch (the client retries elsewhere), reported with their log tail, and
stopped without orphans."""

import asyncio
import json
import os
import signal
import sys
import time
import urllib.request

import pytest
import torch

from ctpo_megatron.rollout.serving.client import SGLangClient
from ctpo_megatron.rollout.serving.launcher import (LaunchConfig, ServerDiedError, ServerGroup,
                                            ServerStartError, embedded_server_command,
                                            router_command, sglang_server_command)
from ctpo_megatron.rollout.weight_sync import WeightSyncConfig, make_weight_updater
from tests._process import wait_until
from tests.unit.test_embedded_server import build_tiny_model


def test_sglang_command_matches_its_cli():
    cfg = LaunchConfig(model_path="/models/qwen", backend="sglang", num_servers=4, tp_size=2,
                       base_gpu_id=0, mem_fraction_static=0.7, weight_version="0", load_format="dummy",
                       dtype="bfloat16", seed=3, extra_args=["--disable-radix-cache"], python="py",
                       enable_memory_saver=True)
    cmd = sglang_server_command(cfg, index=2, port=30002)
    assert cmd == ["py", "-m", "sglang.launch_server", "--model-path", "/models/qwen",
                   "--host", "127.0.0.1", "--port", "30002", "--tp-size", "2",
                   "--base-gpu-id", "4", "--weight-version", "0", "--mem-fraction-static", "0.7",
                   "--enable-memory-saver", "--skip-tokenizer-init", "--load-format", "dummy", "--dtype", "bfloat16",
                   "--random-seed", "3", "--disable-radix-cache"]


def test_router_and_embedded_commands():
    cfg = LaunchConfig(model_path="m", python="py", router=True, router_policy="round_robin")
    urls = ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert router_command(cfg, urls, 9000) == [
        "py", "-m", "sglang_router.launch_router", "--worker-urls", *urls,
        "--policy", "round_robin", "--host", "127.0.0.1", "--port", "9000"]
    cmd = embedded_server_command(cfg, index=1, port=5)
    assert cmd[:3] == ["py", "-m", "ctpo_megatron.rollout.serving.server"]
    assert cmd[cmd.index("--seed") + 1] == "1" and cmd[cmd.index("--port") + 1] == "5"


@pytest.mark.parametrize("field, value", [("backend", "vllm"), ("num_servers", 0),
                                          ("mem_fraction_static", 1.5)])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        LaunchConfig(model_path="m", **{field: value})


def test_start_failure_shows_the_log_tail(tmp_path):
    cfg = LaunchConfig(model_path=str(tmp_path / "no_such_model"), health_timeout_s=60,
                       log_dir=str(tmp_path))
    with pytest.raises(ServerDiedError) as info:
        ServerGroup(cfg).start()
    assert "server0" in str(info.value) and "no_such_model" in str(info.value)


def test_health_timeout_names_the_server(tmp_path, monkeypatch):
    # A process that never serves HTTP: the wait must end with the server named and its log.
    from ctpo_megatron.rollout.serving import launcher

    monkeypatch.setattr(launcher, "embedded_server_command", lambda cfg, i, port: [
        sys.executable, "-c", "print('booting', flush=True); import time; time.sleep(60)"])
    group = ServerGroup(LaunchConfig(model_path="m", health_timeout_s=1, log_dir=str(tmp_path)))
    with pytest.raises(ServerStartError, match="server0") as info:
        group.start()
    assert "booting" in str(info.value)
    assert not any(_group_alive(pid) for pid in group.pids())


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_kill_one_of_two_mid_batch(tmp_path):
    model = build_tiny_model(tmp_path / "model")
    cfg = LaunchConfig(model_path=model, num_servers=2, health_timeout_s=120, log_dir=str(tmp_path),
                       env={"OMP_NUM_THREADS": "1"})
    group = ServerGroup(cfg)
    group.start()
    try:
        victim = group.servers[1]
        # The weight-update group spans both servers before the kill.
        updater = make_weight_updater(WeightSyncConfig(transport="distributed", http_timeout_s=300))
        updater.connect(group.worker_urls)

        async def go():
            async with SGLangClient(group.worker_urls, max_retries=3, retry_backoff_s=0.05,
                                    health_interval_s=0.2) as client:
                task = asyncio.ensure_future(client.generate_many(
                    [[3, 4 + i] for i in range(8)], {"max_new_tokens": 1500, "ignore_eos": True}))
                await asyncio.sleep(0.5)
                in_flight = client.in_flight[victim.url]
                assert in_flight > 0  # it really was serving part of the batch
                os.killpg(victim.proc.pid, signal.SIGKILL)
                results = await task
                while victim.url in client.healthy_urls():  # the health poll notices
                    await asyncio.sleep(0.1)
                return results, client.take_stats(), client.healthy_urls(), in_flight

        results, stats, healthy, in_flight = asyncio.run(go())
        # Nothing dropped: every request finished, the victim's ones on the survivor.
        assert len(results) == 8 and all(len(r.output_ids) == 1500 for r in results)
        assert {r.server_url for r in results} == {group.worker_urls[0]}
        assert stats["requests"] == 8 and stats["failed"] == 0 and stats["retried"] >= in_flight
        assert healthy == [group.worker_urls[0]]
        # The next weight sync goes to the survivor only, and no collective waits for the dead one.
        start = time.monotonic()
        assert updater.retarget(healthy)
        updater.update([("lm_head.weight", torch.full((128, 32), 0.25))], "after-kill")
        assert time.monotonic() - start < 120  # the group timeout is 300 s
        assert updater.world_size == 2
        updater.close()
        out = json.loads(urllib.request.urlopen(group.worker_urls[0] + "/model_info").read())
        assert out["weight_version"] == "after-kill"
        with pytest.raises(ServerDiedError, match="server1") as info:
            group.check_alive()
        assert "serving" in str(info.value)  # the tail of the dead server's log
    finally:
        group.stop()
    assert not any(_group_alive(pid) for pid in group.pids())


_PARENT = """
import sys, time
from ctpo_megatron.rollout.serving.launcher import LaunchConfig, ServerGroup
group = ServerGroup(LaunchConfig(model_path=sys.argv[1], health_timeout_s=120, log_dir=sys.argv[2]))
group.start()
print(group.pids()[0], flush=True)
time.sleep(600)
"""


def test_servers_die_with_a_killed_parent(tmp_path):
    """The launching process is SIGKILLed (no cleanup runs): its server must not outlive it."""
    import subprocess

    model = build_tiny_model(tmp_path / "model")
    server_pid = None
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, model, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        server_pid = int(parent.stdout.readline())
        assert _group_alive(server_pid)
        parent.kill()
        parent.wait(timeout=30)
        assert wait_until(lambda: not _group_alive(server_pid), 30, interval_s=0.2)
    finally:
        parent.kill()
        if server_pid is not None and _group_alive(server_pid):
            os.killpg(server_pid, signal.SIGKILL)


def test_trainer_launched_colocated_servers_get_the_memory_saver():
    """Servers the trainer starts itself: colocated SGLang servers get --enable-memory-saver and
    --mem-fraction-static 0.5 (or the setting), and must fit the node's GPUs."""
    from ctpo_megatron.config.store import load_config
    from ctpo_megatron.trainer.rollout_driver import server_launch_config

    def argv(overrides, gpus=8):
        cfg = load_config(config_name="tiny", overrides=["model.path=/m", "rollout.server_backend=sglang",
                                                         *overrides])
        launch = server_launch_config(cfg, "/run", gpus=gpus)
        return sglang_server_command(launch, 1, 30001)

    colocated = ["rollout.placement=colocated", "rollout.num_servers=2", "rollout.weight_sync.server_tp_size=4"]
    cmd = argv(colocated)
    assert "--enable-memory-saver" in cmd and cmd[cmd.index("--mem-fraction-static") + 1] == "0.5"
    assert cmd[cmd.index("--tp-size") + 1] == "4" and cmd[cmd.index("--base-gpu-id") + 1] == "4"
    cmd = argv(colocated + ["rollout.server_mem_fraction_static=0.3"])
    assert cmd[cmd.index("--mem-fraction-static") + 1] == "0.3"
    with pytest.raises(ValueError, match="= 8 GPUs, but the training node has 4"):
        argv(colocated, gpus=4)
    separate = argv([])
    assert "--enable-memory-saver" not in separate and "--mem-fraction-static" not in separate
