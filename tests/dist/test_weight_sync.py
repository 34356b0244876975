"""Weight sync into a real embedded server, every transport: afterwards the server's log-probs
for a fixed prompt equal the updated local model's float32 forward exactly, and the version
travels in meta_info. The trainer side runs on spawned gloo ranks (a default group exists, as
in the trainer) and rank 0 syncs through its own side group."""

import asyncio
import time

import pytest
import torch
import torch.distributed as dist

from ctpo_megatron.parallel.spawn import run_on_ranks
from ctpo_megatron.rollout.serving.launcher import LaunchConfig, ServerGroup
from ctpo_megatron.rollout.weight_sync import (WeightSyncConfig, WeightSyncError, iter_buckets,
                                               make_weight_updater)
from tests.unit.test_embedded_server import RunningStream, build_tiny_model, call, load_local

pytestmark = pytest.mark.dist

PROMPT = [3, 14, 15, 92, 65, 35]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = build_tiny_model(tmp_path_factory.mktemp("server_model"), seed=0)
    cfg = LaunchConfig(model_path=model, health_timeout_s=120, log_dir=str(tmp_path_factory.mktemp("logs")),
                       env={"OMP_NUM_THREADS": "1"})
    with ServerGroup(cfg) as group:
        yield group.worker_urls[0]


TRANSPORTS = [("distributed:per_tensor", 11), ("distributed:flattened_bucket", 14), ("tensor", 12),
              ("disk", 13)]


def _server_scores(url):
    out = call(url, "/generate", {"input_ids": PROMPT, "return_logprob": True, "logprob_start_len": 0,
                                  "sampling_params": {"max_new_tokens": 1, "temperature": 1.0}})[1]
    meta = out["meta_info"]
    return [e[0] for e in meta["input_token_logprobs"][1:]], meta["output_token_logprobs"][0][0], \
        out["output_ids"][0], meta["weight_version"]


def _local_scores(model, first_token):
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([PROMPT])).logits[0].float(), -1)
    return [lp[i, PROMPT[i + 1]].item() for i in range(len(PROMPT) - 1)], lp[-1, first_token].item()


def _trainer(rank, world_size, url, model_dirs, disk_dir):
    """Rank 0 syncs each transport's model in turn and scores the prompt on server and locally."""
    results = []
    if rank == 0:
        for (transport, seed), model_dir in zip(TRANSPORTS, model_dirs):
            model = load_local(model_dir)
            kind, _, fmt = transport.partition(":")
            cfg = WeightSyncConfig(transport=kind, bucket_bytes=16 << 10, disk_dir=disk_dir,
                                   disk_config_dir=model_dir, distributed_format=fmt or "auto",
                                   group_name=f"group_{seed}")
            updater = make_weight_updater(cfg)
            updater.connect([url])
            version = f"{kind}-v{seed}"
            updater.update(((n, p.detach()) for n, p in model.state_dict().items()), version)
            metrics = updater.metrics()
            updater.close()
            server = _server_scores(url)
            expected_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            results.append((transport, version, metrics, expected_bytes, server,
                            _local_scores(model, server[2])))
        results.append(_duplicate_group_fails_fast(url))
    dist.barrier()  # the default group is untouched by the side group
    return results


def _duplicate_group_fails_fast(url):
    """A server that refuses to join must fail connect() at once, not after the join timeout."""
    first = make_weight_updater(WeightSyncConfig(transport="distributed", group_name="dup"))
    first.connect([url])
    second = make_weight_updater(WeightSyncConfig(transport="distributed", group_name="dup"))
    start = time.monotonic()
    try:
        second.connect([url])
        error = None
    except WeightSyncError as e:
        error = str(e)
    elapsed = time.monotonic() - start
    first.close()
    return error, elapsed


def test_each_transport_then_server_log_probs_equal_local(server, tmp_path):
    model_dirs = [build_tiny_model(tmp_path / f"model{seed}", seed=seed) for _, seed in TRANSPORTS]
    results = run_on_ranks(_trainer, 2, server, model_dirs, str(tmp_path / "ckpt"), timeout=240)[0]
    dup_error, dup_seconds = results.pop()
    assert dup_error is not None and "exists" in dup_error and server in dup_error
    assert dup_seconds < 60  # the join timeout is 30 minutes
    assert [r[0] for r in results] == [t for t, _ in TRANSPORTS]
    for transport, version, metrics, expected_bytes, server_scores, local_scores in results:
        assert metrics["weight_sync/buckets"] > 1, transport  # 16 KiB buckets: bucketing exercised
        assert metrics["weight_sync/bytes"] == expected_bytes, transport
        prompt_lps, first_lp, _, got_version = server_scores
        local_prompt_lps, local_first = local_scores
        assert prompt_lps == local_prompt_lps, transport  # exact float32 equality
        assert first_lp == local_first, transport
        assert got_version == version


def test_update_during_generation_retracts_and_versions_the_rollout(server, tmp_path):
    model_dir = build_tiny_model(tmp_path / "trained", seed=21)
    model = load_local(model_dir)
    updater = make_weight_updater(WeightSyncConfig(transport="tensor", pause_mode="retract"))
    updater.connect([server])

    async def scenario():
        body = {"input_ids": [7, 8], "sampling_params": {"max_new_tokens": 2500, "ignore_eos": True}}
        stream = await RunningStream(server, body).start()  # returns once generation runs
        await asyncio.to_thread(updater.update, model.state_dict().items(), "mid-run")
        return await stream.finish()

    out = asyncio.run(scenario())
    updater.close()
    assert out["meta_info"]["num_retractions"] == 1  # paused (retract) around the update
    assert out["meta_info"]["weight_version"] == "mid-run"
    assert len(out["output_ids"]) == 2500  # resumed and finished after the update


def test_failed_update_names_the_server_and_resumes_generation(server):
    updater = make_weight_updater(WeightSyncConfig(transport="tensor"))
    updater.connect([server])
    with pytest.raises(WeightSyncError, match="is not in the model") as info:
        updater.update([("model.no_such.weight", torch.zeros(2))], "bad")
    updater.close()
    assert server in str(info.value)
    assert call(server, "/ready", method="GET")[0] == 200  # not left paused
    assert call(server, "/model_info", method="GET")[1]["weight_version"] != "bad"


def test_buckets_hold_one_dtype_and_respect_the_size():
    tensors = [("a", torch.zeros(10)), ("b", torch.zeros(10)), ("c", torch.zeros(10, dtype=torch.bfloat16)),
               ("d", torch.zeros(100)), ("e", torch.zeros(1))]
    buckets = [[n for n, _ in b] for b in iter_buckets(tensors, bucket_bytes=80)]
    assert buckets == [["a", "b"], ["c"], ["d"], ["e"]]
