"""The embedded server over real HTTP: SGLang's /generate contract, sampling, log-prob exactness,
batching, streaming, control endpoints and weight-update session rules."""

import asyncio
import base64
import json

import pytest
import torch
from safetensors.torch import save as save_safetensors

from ctpo_megatron.rollout.serving.contract import load_contract
from ctpo_megatron.rollout.serving.launcher import LaunchConfig, ServerGroup

EOS = 1


def build_tiny_model(out_dir, seed: int = 0, vocab: int = 128) -> str:
    """A random 2-layer Qwen2 (hidden 32, vocab 128, tied embeddings) saved as an HF directory."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      eos_token_id=EOS, bos_token_id=0, tie_word_embeddings=True)
    Qwen2ForCausalLM(cfg).save_pretrained(str(out_dir))
    return str(out_dir)


def load_local(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


async def post(url, path, body=None, method="POST"):
    import aiohttp

    async with aiohttp.ClientSession() as s:
        data = None if body is None else json.dumps(body)
        async with s.request(method, url + path, data=data) as r:
            return r.status, await r.text()


class RunningStream:
    """A streamed /generate that is known to be running: `start()` returns after its first chunk."""

    def __init__(self, url, body):
        self.url, self.body = url, dict(body, stream=True)
        self.last = None

    async def start(self):
        import aiohttp

        self.session = aiohttp.ClientSession()
        self.resp = await self.session.post(self.url + "/generate", data=json.dumps(self.body))
        await self._read_event()
        return self

    async def _read_event(self):
        line = (await self.resp.content.readuntil(b"\n\n")).decode().strip()
        if line == "data: [DONE]":
            return False
        self.last = json.loads(line[len("data: "):])
        return True

    async def finish(self):
        """Reads to [DONE]; returns the last (cumulative) chunk."""
        while await self._read_event():
            pass
        self.resp.release()
        await self.session.close()
        return self.last


def call(url, path, body=None, method="POST"):
    status, text = asyncio.run(post(url, path, body, method))
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    cfg = LaunchConfig(model_path=model_dir, health_timeout_s=120, max_batch_size=8,
                       log_dir=str(tmp_path_factory.mktemp("logs")), env={"OMP_NUM_THREADS": "1"})
    with ServerGroup(cfg) as group:
        yield group.worker_urls[0]


@pytest.fixture(scope="module")
def local(model_dir):
    return load_local(model_dir)


@pytest.fixture
def restores_weights(server, model_dir):
    """For tests that change the shared server's weights: reload the originals afterwards, so
    the other tests (which compare with `local`) pass in any order."""
    yield
    call(server, "/end_weight_update", {})  # closes a session a failed test may have left open
    released = call(server, "/server_info", method="GET")[1]["memory_occupation"]["released"]
    if released:  # memory a failed test left released
        call(server, "/resume_memory_occupation", {"tags": released})
    status, out = call(server, "/update_weights_from_disk", {"model_path": model_dir, "weight_version": "default"})
    assert status == 200, out


def gen(url, input_ids, **sampling):
    return call(url, "/generate", {"input_ids": input_ids, "sampling_params": sampling,
                                   "return_logprob": True})


def test_generate_response_shape_matches_sglang(server):
    status, out = gen(server, [5, 6, 7], max_new_tokens=5, temperature=0.8, sampling_seed=3)
    assert status == 200, out
    api = load_contract()
    decoded = api.GenerateResponse.from_json_value(out)  # SGLang's own response decoder
    assert decoded.output_ids == out["output_ids"] and len(out["output_ids"]) == 5
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 5}
    assert meta["prompt_tokens"] == 3 and meta["completion_tokens"] == 5
    assert meta["weight_version"] == "default"
    assert [e[1] for e in meta["output_token_logprobs"]] == out["output_ids"]
    assert all(e[2] is None and e[0] <= 0 for e in meta["output_token_logprobs"])


def test_seeded_sampling_is_reproducible(server):
    a = gen(server, [9, 10, 11], max_new_tokens=12, temperature=1.0, sampling_seed=7)[1]
    b = gen(server, [9, 10, 11], max_new_tokens=12, temperature=1.0, sampling_seed=7)[1]
    c = gen(server, [9, 10, 11], max_new_tokens=12, temperature=1.0, sampling_seed=8)[1]
    assert a["output_ids"] == b["output_ids"]
    assert a["meta_info"]["output_token_logprobs"] == b["meta_info"]["output_token_logprobs"]
    assert a["output_ids"] != c["output_ids"]


def test_log_probs_equal_local_float32_forward(server, local):
    prompt, temperature = [3, 14, 15, 92, 65], 0.7
    status, out = call(server, "/generate", {
        "input_ids": prompt, "return_logprob": True, "logprob_start_len": 0,
        "sampling_params": {"max_new_tokens": 8, "temperature": temperature, "sampling_seed": 1}})
    assert status == 200, out
    ids = out["output_ids"]
    with torch.no_grad():
        prompt_logits = local(torch.tensor([prompt])).logits[0].float()
        full_logits = local(torch.tensor([prompt + ids])).logits[0].float()
    meta = out["meta_info"]
    # Prefill: the same unpadded forward as the local one, so bit-equal.
    first = torch.log_softmax(prompt_logits[-1] / temperature, -1)[ids[0]].item()
    assert meta["output_token_logprobs"][0][0] == first
    inp = torch.log_softmax(prompt_logits, -1)  # input log-probs ignore the temperature (SGLang)
    assert [e[0] for e in meta["input_token_logprobs"]] == [None] + [
        inp[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]
    # Decode steps use the KV cache; float32 rounding may differ from one full forward.
    ref = torch.log_softmax(full_logits / temperature, -1)
    expected = [ref[len(prompt) - 1 + k, t].item() for k, t in enumerate(ids)]
    got = [e[0] for e in meta["output_token_logprobs"]]
    assert got == pytest.approx(expected, abs=1e-5)


def test_greedy_batch_with_padding_matches_single_requests(server, local):
    # Different prompt lengths (left padding) and lengths (rows leave the batch as they finish).
    prompts, lengths = [[4, 5, 6, 7, 8, 9], [20], [30, 31, 32]], [6, 2, 4]
    params = [{"max_new_tokens": n, "temperature": 0.0} for n in lengths]
    status, batch = call(server, "/generate", {"input_ids": prompts, "sampling_params": params})
    assert status == 200 and isinstance(batch, list) and len(batch) == 3
    for prompt, n, out in zip(prompts, lengths, batch):
        single = gen(server, prompt, max_new_tokens=n, temperature=0.0)[1]
        assert out["output_ids"] == single["output_ids"]
        with torch.no_grad():  # greedy = argmax of the local model, token by token
            seq = list(prompt)
            for _ in range(n):
                seq.append(int(local(torch.tensor([seq])).logits[0, -1].argmax()))
        assert out["output_ids"] == seq[len(prompt):]


def test_n_samples_are_prompt_major(server):
    status, outs = call(server, "/generate", {"input_ids": [[5, 6], [7, 8, 9]], "sampling_params": {
        "max_new_tokens": 3, "n": 2, "sampling_seed": 11}})
    assert status == 200 and len(outs) == 4
    assert [o["meta_info"]["prompt_tokens"] for o in outs] == [2, 2, 3, 3]
    assert outs[0]["output_ids"] != outs[1]["output_ids"]  # sample j uses seed + j


def test_stop_token_ids_and_eos(server):
    free = gen(server, [40, 41], max_new_tokens=6, temperature=0.0)[1]["output_ids"]
    stop = free[2]
    out = gen(server, [40, 41], max_new_tokens=6, temperature=0.0, stop_token_ids=[stop])[1]
    k = free.index(stop)
    assert out["output_ids"] == free[: k + 1]  # the matched stop token stays in output_ids
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    both = gen(server, [40, 41], max_new_tokens=6, temperature=0.0, stop_token_ids=[stop],
               min_new_tokens=6)[1]
    assert len(both["output_ids"]) == 6 and stop not in both["output_ids"]


@pytest.mark.parametrize("sampling, fragment", [
    ({"seed": 1}, "unknown field `seed`, expected one of `max_new_tokens`"),
    ({"temperature": "hot"}, 'invalid type: string "hot", expected f64'),
    ({"max_new_tokens": 2.5}, "invalid type: floating point `2.5`, expected i64"),
])
def test_contract_violations_are_400_with_sglang_message(server, sampling, fragment):
    status, out = call(server, "/generate", {"input_ids": [1, 2], "sampling_params": sampling})
    assert status == 400 and fragment in out["error"]


def test_invalid_values_and_inputs_are_400(server):
    status, out = call(server, "/generate", {"input_ids": [1, 2], "sampling_params": {"top_p": 0}})
    assert status == 400 and out == {"error": {"message": "top_p must be in (0, 1], got 0.0."}}
    status, out = call(server, "/generate", {"input_ids": [1.0, 2], "sampling_params": {}})
    assert status == 400 and "expected i64" in out["error"]
    status, out = call(server, "/generate", {"text": "hi", "sampling_params": {}})
    assert status == 400 and "input_ids" in out["error"]["message"]
    status, out = call(server, "/generate", {"input_ids": [100000], "sampling_params": {}})
    assert status == 400 and "vocabulary" in out["error"]["message"]


def test_stream_is_cumulative_and_ends_with_done(server):
    body = {"input_ids": [5, 6], "stream": True, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 4, "sampling_seed": 2}}
    status, text = asyncio.run(post(server, "/generate", body))
    events = [e[len("data: "):] for e in text.strip().split("\n\n")]
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [len(c["output_ids"]) for c in chunks] == [1, 2, 3, 4]
    assert all(chunks[i]["output_ids"] == chunks[-1]["output_ids"][: i + 1] for i in range(4))
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    plain = gen(server, [5, 6], max_new_tokens=4, sampling_seed=2)[1]
    assert plain["output_ids"] == chunks[-1]["output_ids"]


def test_control_endpoints(server):
    assert call(server, "/health", method="GET")[0] == 200
    assert call(server, "/health_generate", method="GET")[0] == 200
    info = call(server, "/model_info", method="GET")[1]
    assert info["is_generation"] and info["weight_version"] == "default"
    assert call(server, "/server_info", method="GET")[1]["max_running_requests"] == 8
    status, text = call(server, "/flush_cache")
    assert status == 200 and text.startswith("Cache flushed")
    status, out = call(server, "/pause_generation")  # SGLang needs a JSON body
    assert status == 400 and out["code"] == 400
    status, out = call(server, "/pause_generation", {"mode": "sideways"})
    assert status == 400
    assert call(server, "/abort_request", {"abort_all": True})[0] == 200


def test_pause_abort_and_retract(server):
    async def scenario():
        def long(rid):  # long enough to be still running when the controls arrive
            return {"input_ids": [7, 8], "rid": rid, "return_logprob": True,
                    "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}}

        stream = await RunningStream(server, long("long1")).start()
        assert (await post(server, "/flush_cache"))[0] == 400  # refused while a request runs
        assert (await post(server, "/pause_generation", {"mode": "retract"}))[0] == 200
        assert (await post(server, "/flush_cache"))[0] == 200  # retracted requests do not count
        assert (await post(server, "/continue_generation", {}))[0] == 200
        await stream._read_event()  # generating again after the retraction
        assert (await post(server, "/abort_request", {"rid": "long1"}))[0] == 200
        retracted = await stream.finish()
        stream = await RunningStream(server, long("long2")).start()
        assert (await post(server, "/pause_generation", {"mode": "abort"}))[0] == 200
        aborted = await stream.finish()
        await post(server, "/continue_generation", {})
        return retracted, aborted

    retracted, aborted = asyncio.run(scenario())
    assert retracted["meta_info"]["num_retractions"] == 1
    assert retracted["meta_info"]["finish_reason"]["type"] == "abort"
    assert 0 < len(retracted["output_ids"]) < 3000
    assert len(retracted["meta_info"]["output_token_logprobs"]) == len(retracted["output_ids"])
    assert aborted["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(aborted["output_ids"]) < 3000


def test_weight_update_session_rules_and_tensor_update(server, local, restores_weights):
    name = "model.layers.0.mlp.up_proj.weight"
    new = torch.randn_like(local.state_dict()[name])
    payload = base64.b64encode(save_safetensors({name: new.contiguous()})).decode()
    body = {"serialized_named_tensors": [payload], "weight_version": "v7"}
    status, out = call(server, "/update_weights_from_tensor", body)
    assert status == 400 and out["success"] is False and "begin_weight_update" in out["message"]
    assert call(server, "/begin_weight_update", {})[0] == 200
    status, out = call(server, "/begin_weight_update", {})
    assert status == 400 and "already open" in out["message"]
    status, out = call(server, "/update_weights_from_tensor", body)
    assert status == 200 and out["success"], out
    assert call(server, "/end_weight_update", {})[0] == 200
    assert call(server, "/end_weight_update", {})[0] == 400
    got = call(server, "/get_weights_by_name", {"name": name, "truncate_size": 2})[1]
    assert torch.tensor(got) .equal(new[:2])
    out = gen(server, [1, 2, 3], max_new_tokens=1)[1]
    assert out["meta_info"]["weight_version"] == "v7"
    assert call(server, "/model_info", method="GET")[1]["weight_version"] == "v7"


def test_update_weights_from_disk_then_logprobs_match(server, tmp_path, restores_weights):
    fresh_dir = build_tiny_model(tmp_path / "fresh", seed=123)
    status, out = call(server, "/update_weights_from_disk", {"model_path": fresh_dir, "weight_version": "d1"})
    assert status == 200 and out == {"success": True, "message": out["message"], "num_paused_requests": 0}
    fresh = load_local(fresh_dir)
    prompt = [11, 12, 13]
    out = call(server, "/generate", {"input_ids": prompt, "return_logprob": True, "logprob_start_len": 0,
                                     "sampling_params": {"max_new_tokens": 1, "temperature": 1.0}})[1]
    with torch.no_grad():
        logits = fresh(torch.tensor([prompt])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    assert out["meta_info"]["output_token_logprobs"][0][0] == lp[-1, out["output_ids"][0]].item()
    assert out["meta_info"]["weight_version"] == "d1"
    status, out = call(server, "/update_weights_from_disk", {"model_path": str(tmp_path / "missing")})
    assert status == 400 and out["success"] is False


def test_release_and_resume_memory_occupation(server, local, restores_weights):
    """SGLang's memory saver cycle: release frees the weights (generation refused meanwhile),
    resume reallocates them without values (NaN), a tensor update in SGLang's per-TP-rank
    format makes the server generate with exactly those weights again."""
    from ctpo_megatron.rollout.weight_sync.serialization import encode_named_tensors

    held = call(server, "/server_info", method="GET")[1]["memory_occupation"]
    assert held["released"] == [] and held["weight_bytes"] > 0
    # Bodies are checked like SGLang's ReleaseMemoryOccupationReqInput; unknown tags refused.
    assert call(server, "/release_memory_occupation")[0] == 400  # a JSON body is required
    status, out = call(server, "/release_memory_occupation", {"tags": "weights"})
    assert status == 400 and "must be list or null" in out["message"]
    status, out = call(server, "/release_memory_occupation", {"tags": ["optimizer"]})
    assert status == 400 and "unknown tags ['optimizer']" in out["error"]["message"]
    status, out = call(server, "/resume_memory_occupation", {"tags": ["weights"]})
    assert status == 400 and "not released" in out["error"]["message"]

    status, out = call(server, "/release_memory_occupation", {"tags": None})  # null: every region
    assert status == 200 and out is None  # SGLang's handler returns nothing
    info = call(server, "/server_info", method="GET")[1]["memory_occupation"]
    assert info == {"released": ["cuda_graph", "kv_cache", "weights"], "weight_bytes": 0}
    status, out = gen(server, [1, 2, 3], max_new_tokens=2)
    assert status == 400 and "memory is released" in out["error"]["message"]
    assert call(server, "/health_generate", method="GET")[0] == 503
    assert call(server, "/health", method="GET")[0] == 200  # alive: the launcher must not restart it
    assert call(server, "/get_weights_by_name", {"name": "lm_head.weight"})[0] == 400
    assert call(server, "/begin_weight_update", {})[0] == 200
    names = list(dict(local.named_parameters()))  # tied embeddings: one name
    entry = encode_named_tensors([(n, local.state_dict()[n]) for n in names])
    body = {"serialized_named_tensors": [entry], "weight_version": "c1"}
    status, out = call(server, "/update_weights_from_tensor", body)
    assert status == 400 and "released" in out["message"]  # weights must be resumed first

    assert call(server, "/resume_memory_occupation", {"tags": ["weights"]}) == (200, None)
    info = call(server, "/server_info", method="GET")[1]["memory_occupation"]
    assert info == {"released": ["cuda_graph", "kv_cache"], "weight_bytes": held["weight_bytes"]}
    got = call(server, "/get_weights_by_name", {"name": "lm_head.weight", "truncate_size": 1})[1]
    assert all(v != v for v in got[0])  # NaN: resumed memory holds no values
    status, out = call(server, "/update_weights_from_tensor", body)
    assert status == 200 and out["success"], out
    assert call(server, "/end_weight_update", {})[0] == 200
    assert gen(server, [1, 2, 3], max_new_tokens=2)[0] == 400  # kv_cache still released
    assert call(server, "/resume_memory_occupation", {"tags": ["kv_cache", "cuda_graph"]}) == (200, None)

    prompt = [3, 14, 15]
    status, out = call(server, "/generate", {"input_ids": prompt, "return_logprob": True,
                                             "sampling_params": {"max_new_tokens": 1, "temperature": 1.0}})
    assert status == 200 and out["meta_info"]["weight_version"] == "c1"
    with torch.no_grad():
        lp = torch.log_softmax(local(torch.tensor([prompt])).logits[0, -1].float(), -1)
    assert out["meta_info"]["output_token_logprobs"][0][0] == lp[out["output_ids"][0]].item()


def test_release_refused_while_a_request_runs(server):
    async def scenario():
        stream = await RunningStream(server, {"input_ids": [7, 8], "rid": "busy", "sampling_params": {
            "max_new_tokens": 3000, "ignore_eos": True}}).start()
        refused = await post(server, "/release_memory_occupation", {"tags": ["kv_cache"]})
        await post(server, "/abort_request", {"rid": "busy"})
        await stream.finish()
        return refused

    status, text = asyncio.run(scenario())
    assert status == 400 and json.loads(text) == {"error": {"message": (
        "release_memory_occupation should be called only when no ongoing request.")}}
    assert call(server, "/server_info", method="GET")[1]["memory_occupation"]["released"] == []


def test_request_spanning_a_weight_update_reports_each_tokens_version(server, local, tmp_path, restores_weights):
    """A partial rollout: pause (retract), new weights with a new version, continue, while one
    request is mid-generation. The client reads SGLang's `meta_info.weight_versions` spans as one
    version per token; the tokens before the update carry the old version and the old weights'
    log-probs, the tokens after it the new version and the new weights' log-probs."""
    from ctpo_megatron.rollout.serving.client import SGLangClient

    fresh_dir = build_tiny_model(tmp_path / "fresh", seed=321)
    prompt, temperature = [9, 10, 11], 0.8
    params = {"max_new_tokens": 3000, "temperature": temperature, "ignore_eos": True, "sampling_seed": 5}

    async def scenario():
        async with SGLangClient([server], health_interval_s=0) as client:
            task = asyncio.ensure_future(client.generate(prompt, params))
            while json.loads((await post(server, "/server_info", method="GET"))[1])["internal_states"][0]["idle"]:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # some tokens with the old weights
            await client.pause_generation("retract")
            status, out = await post(server, "/update_weights_from_disk",
                                     {"model_path": fresh_dir, "weight_version": "step_7"})
            assert status == 200, out
            await client.continue_generation()
            return await task

    res = asyncio.run(scenario())
    spans = res.meta_info["weight_versions"]
    decoded = load_contract().GenerateMetaInfo.from_json_value(res.meta_info)  # SGLang's own decoder
    assert [(d.version, d.start, d.end) for d in decoded.weight_versions] == [
        (s["version"], s["start"], s["end"]) for s in spans]
    assert [s["version"] for s in spans] == ["default", "step_7"], spans
    cut = spans[0]["end"]
    assert 0 < cut < len(res.output_ids) == 3000 and spans[1] == {"version": "step_7", "start": cut, "end": 3000}
    assert res.output_versions == ["default"] * cut + ["step_7"] * (3000 - cut)
    assert res.weight_version == "step_7" and res.meta_info["num_retractions"] == 1
    ids = prompt + res.output_ids
    with torch.no_grad():
        before = torch.log_softmax(local(torch.tensor([ids])).logits[0].float() / temperature, -1)
        after = torch.log_softmax(load_local(fresh_dir)(torch.tensor([ids])).logits[0].float() / temperature, -1)
    expected = [(before if k < cut else after)[len(prompt) - 1 + k, t].item() for k, t in enumerate(res.output_ids)]
    assert res.output_log_probs == pytest.approx(expected, abs=1e-4)
    old_only = [before[len(prompt) - 1 + k, t].item() for k, t in enumerate(res.output_ids)]
    assert res.output_log_probs[cut:] != pytest.approx(old_only[cut:], abs=1e-3)  # the weights did change


def test_simulated_latency_mode_server(model_dir, tmp_path):
    """A server started with CTPO_SIM_DECODE_DELAY_S runs at the lowest CPU priority (it stands
    in for GPUs on other nodes), still generates, and logs its simulated-decode summary (the
    line bench_async reads) at shutdown."""
    import os

    from ctpo_megatron.rollout.serving.server.scheduler import DECODE_DELAY_ENV

    cfg = LaunchConfig(model_path=model_dir, health_timeout_s=120, max_batch_size=8, log_dir=str(tmp_path),
                       env={"OMP_NUM_THREADS": "1", DECODE_DELAY_ENV: "0.002"})
    with ServerGroup(cfg) as group:
        proc = group.servers[0]
        assert os.getpriority(os.PRIO_PROCESS, proc.proc.pid) == 19
        status, out = gen(group.worker_urls[0], [5, 6, 7], max_new_tokens=6, ignore_eos=True, sampling_seed=3)
        assert status == 200 and len(out["output_ids"]) == 6, out
    log = proc.log.read_text()
    assert "simulated decode: 5 steps of 2.0 ms" in log, log  # 6 tokens: prefill + 5 decode steps
