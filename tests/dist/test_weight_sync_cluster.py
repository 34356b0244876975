"""Weight sync as a cluster runs it: the trainer under torchrun, servers of different TP sizes
(the embedded server has SGLang's rank structure: `--tp-size N` is N ranks in the group and N
entries of a tensor update), and failures that must not hang a collective.

Servers: one of TP 1 and one of TP 2, so the group is 1 + 1 + 2 = 4 ranks with offsets 1 and 2
(a fixed per-server TP size gets either the world size or an offset wrong)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ctpo_megatron.rollout.serving.launcher import LaunchConfig, ServerGroup
from ctpo_megatron.rollout.weight_sync import WeightSyncConfig, WeightSyncError, make_weight_updater
from tests.dist.test_weight_sync import _local_scores, _server_scores
from tests.unit.test_embedded_server import build_tiny_model, call, load_local

pytestmark = pytest.mark.dist
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """[TP-1 server URL, TP-2 server URL]."""
    model = build_tiny_model(tmp_path_factory.mktemp("server_model"), seed=0)
    groups = [ServerGroup(LaunchConfig(model_path=model, tp_size=tp, health_timeout_s=120,
                                       log_dir=str(tmp_path_factory.mktemp(f"logs_tp{tp}")),
                                       env={"OMP_NUM_THREADS": "1"}, extra_args=["--rank-digests"]))
              for tp in (1, 2)]
    try:
        for g in groups:
            g.start(wait=False)
        for g in groups:
            g.wait_healthy(g.servers, 120)
        yield [g.worker_urls[0] for g in groups]
    finally:
        for g in groups:
            g.stop()


def test_servers_report_their_tp_size_like_sglang(servers):
    assert [call(u, "/server_info", method="GET")[1]["tp_size"] for u in servers] == [1, 2]


def test_trainer_under_torchrun_syncs_every_rank_of_every_server(servers, tmp_path):
    dist_model = build_tiny_model(tmp_path / "m_dist", seed=31)
    tensor_model = build_tiny_model(tmp_path / "m_tensor", seed=32)
    out = tmp_path / "out.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests/dist/torchrun_weight_sync.py"), str(out), ",".join(servers),
           f"distributed:flattened_bucket={dist_model}", f"tensor={tensor_model}"]
    log = tmp_path / "torchrun.log"
    with open(log, "w") as f:
        code = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=240).returncode
    assert code == 0, log.read_text()[-12000:]
    res = json.loads(out.read_text())
    assert res["agent_store"] == "True"  # torchrun's store mode, the one that hid the bug
    dist_res = res["distributed:flattened_bucket"]
    assert dist_res["world_size"] == 4 and dist_res["offsets"] == [1, 2]
    for transport in ("distributed:flattened_bucket", "tensor"):
        r = res[transport]
        ranks = [rank for server in r["servers"] for rank in server]
        assert [x["tp_rank"] for x in ranks] == [0, 0, 1]
        for x in ranks:  # every rank received (or decoded its own entry of) every byte
            assert x["sha256"] == r["expected"] and x["received_bytes"] == r["bytes"], transport
    # The last update (tensor) is what both servers now generate with.
    local = load_local(tensor_model)
    for url in servers:
        prompt_lps, first_lp, first_tok, version = _server_scores(url)
        assert (prompt_lps, first_lp) == _local_scores(local, first_tok)
        assert version == "tensor"


def test_configured_tp_size_that_disagrees_with_a_server_fails_naming_it(servers):
    updater = make_weight_updater(WeightSyncConfig(transport="distributed", server_tp_size=1))
    with pytest.raises(WeightSyncError, match=r"tp_size=2 but weight_sync.server_tp_size=1") as info:
        updater.connect(servers)
    assert servers[1] in str(info.value)
    updater.close()


def test_tensor_update_with_too_few_entries_fails_like_sglang(servers):
    from ctpo_megatron.rollout.weight_sync.serialization import encode_named_tensors

    url = servers[1]
    assert call(url, "/begin_weight_update", {})[0] == 200
    status, out = call(url, "/update_weights_from_tensor", {
        "serialized_named_tensors": [encode_named_tensors([("lm_head.weight", torch.zeros(128, 32))])]})
    call(url, "/end_weight_update", {})
    assert status == 400 and "tp_size 2" in out["message"]


@pytest.mark.timeout(200)
def test_rejected_bucket_aborts_the_broadcast_at_once_and_a_new_group_works(servers, tmp_path):
    """A server that refuses a bucket never joins its broadcast: the trainer must fail at once
    with the server's message, not wait for the collective timeout (here 150 s)."""
    model = load_local(build_tiny_model(tmp_path / "m", seed=41))
    updater = make_weight_updater(WeightSyncConfig(transport="distributed", http_timeout_s=150,
                                                   distributed_format="flattened_bucket",
                                                   group_name="reject"))
    updater.connect(servers)
    # The TP-2 server refuses the first bucket before receiving (as SGLang refuses a bucket for
    # a group it does not know), its connections to the group staying open.
    submit_all = updater.calls.submit_all

    def corrupt_first_bucket(path, body_of):
        if path == "/update_weights_from_distributed":
            updater.calls.submit_all = submit_all
            return submit_all(path, lambda i, url: dict(body_of(i, url), group_name="unknown") if i == 1
                              else body_of(i, url))
        return submit_all(path, body_of)

    updater.calls.submit_all = corrupt_first_bucket
    start = time.monotonic()
    with pytest.raises(WeightSyncError, match="not in") as info:
        updater.update(model.state_dict().items(), "rejected")
    assert time.monotonic() - start < 60
    assert servers[1] in str(info.value)
    assert all(call(u, "/ready", method="GET")[0] == 200 for u in servers)  # resumed
    with pytest.raises(RuntimeError, match="connect"):  # the broken group is not used again
        updater.update(model.state_dict().items(), "again")
    updater.connect(servers)  # a fresh group (new name) on the same servers
    updater.update(model.state_dict().items(), "recovered")
    updater.close()
    for url in servers:
        prompt_lps, first_lp, first_tok, version = _server_scores(url)
        assert (prompt_lps, first_lp) == _local_scores(model, first_tok) and version == "recovered"
