"""SGLangClient against real embedded servers: ordering, load balancing, validation, retries,
error bodies, control calls. (A server dying mid-batch is in test_launcher.py.)"""

import asyncio
import time

import pytest
from aiohttp import ClientSession, web

from ctpo_megatron.parallel.net import free_port
from ctpo_megatron.rollout.serving.client import GenerationError, SGLangClient, ServerError
from ctpo_megatron.rollout.serving.contract import ContractError
from ctpo_megatron.rollout.serving.launcher import LaunchConfig, ServerGroup
from tests.unit.test_embedded_server import build_tiny_model

GREEDY = {"max_new_tokens": 4, "temperature": 0.0}


@pytest.fixture(scope="module")
def urls(tmp_path_factory):
    model = build_tiny_model(tmp_path_factory.mktemp("model"))
    cfg = LaunchConfig(model_path=model, num_servers=2, health_timeout_s=120,
                       log_dir=str(tmp_path_factory.mktemp("logs")), env={"OMP_NUM_THREADS": "1"})
    with ServerGroup(cfg) as group:
        yield group.worker_urls


def run(coro):
    return asyncio.run(coro)


def test_generate_many_is_ordered_and_uses_every_server(urls):
    prompts = [[2 + i] * (1 + i % 5) for i in range(24)]

    async def go():
        async with SGLangClient(urls) as client:
            many = await client.generate_many(prompts, GREEDY)
            one = await client.generate(prompts[7], GREEDY)
            return many, one

    many, one = run(go())
    assert [r.prompt_tokens for r in many] == [len(p) for p in prompts]
    assert many[7].output_ids == one.output_ids
    assert {r.server_url for r in many} == set(urls)
    for r in many:
        assert len(r.output_log_probs) == len(r.output_ids) == 4
        assert r.weight_version == "default" and r.finish_reason == {"type": "length", "length": 4}


def test_unknown_sampling_key_fails_before_sending():
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: a sent request would retry and fail

    async def go():
        async with SGLangClient([dead], max_retries=0) as client:
            await client.generate([1, 2], {"max_new_tokens": 2, "seed": 3})

    with pytest.raises(ContractError, match="unknown field `seed`"):
        run(go())


def test_4xx_is_not_retried_and_keeps_the_body(urls):
    async def go():
        async with SGLangClient(urls[:1], max_retries=3) as client:
            await client.generate([100000], GREEDY)

    with pytest.raises(ServerError) as info:
        run(go())
    assert info.value.status == 400 and "vocabulary" in info.value.body
    assert urls[0] in str(info.value)


def test_dead_server_is_skipped(urls):
    dead = f"http://127.0.0.1:{free_port()}"

    async def go():
        async with SGLangClient([dead, urls[0]], max_retries=2, retry_backoff_s=0.01) as client:
            return await client.generate_many([[3, 4]] * 6, GREEDY)

    results = run(go())
    assert len(results) == 6 and {r.server_url for r in results} == {urls[0]}


def test_all_servers_dead_fails_loudly_naming_urls():
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]

    async def go():
        async with SGLangClient(dead, max_retries=2, retry_backoff_s=0.01) as client:
            await client.generate([1, 2], GREEDY)

    with pytest.raises(GenerationError, match="failed after 3 attempts") as info:
        run(go())
    assert all(u in str(info.value) for u in dead)


def test_503_while_starting_is_retried(urls):
    """A real proxy in front of a real server answers 503 twice (SGLang while starting)."""
    calls = {"n": 0}

    async def handler(request: web.Request) -> web.Response:
        calls["n"] += 1
        if calls["n"] <= 2:
            return web.Response(status=503, text="starting")
        async with ClientSession() as s:
            async with s.post(urls[0] + "/generate", data=await request.read()) as r:
                return web.Response(status=r.status, text=await r.text(), content_type="application/json")

    async def go():
        app = web.Application()
        app.router.add_post("/generate", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            async with SGLangClient([f"http://127.0.0.1:{port}"], max_retries=3,
                                    retry_backoff_s=0.01) as client:
                return await client.generate([5, 6], GREEDY)
        finally:
            await runner.cleanup()

    result = run(go())
    assert calls["n"] == 3 and len(result.output_ids) == 4


def test_503_budget_exhausted_reports_each_attempt():
    async def always_503(request: web.Request) -> web.Response:
        return web.Response(status=503, text="still starting")

    async def go():
        app = web.Application()
        app.router.add_post("/generate", always_503)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            async with SGLangClient([f"127.0.0.1:{port}"], max_retries=1, retry_backoff_s=0.01) as c:
                await c.generate([5, 6], GREEDY)
        finally:
            await runner.cleanup()

    with pytest.raises(GenerationError) as info:
        run(go())
    assert str(info.value).count("HTTP 503: still starting") == 2


def test_control_calls_reach_every_server(urls):
    async def go():
        async with SGLangClient(urls) as client:
            health = await client.health()
            await client.flush_cache()
            await client.pause_generation("in_place")
            await client.continue_generation()
            await client.abort_all()
            await client.update_weight_version("step-3")
            info = await client.model_info(urls[1])
            results = await client.generate_many([[1, 2]] * 4, GREEDY)
            await client.update_weight_version("default")
            return health, info, results

    health, info, results = run(go())
    assert health == {u: True for u in urls}
    assert info["weight_version"] == "step-3"
    assert {r.weight_version for r in results} == {"step-3"}


def test_thousand_requests_in_flight(urls):
    async def go():
        async with SGLangClient(urls, max_in_flight=1000) as client:
            return await client.generate_many([[7, i % 100 + 2] for i in range(1000)],
                                              {"max_new_tokens": 1, "temperature": 0.0})

    results = run(go())
    assert len(results) == 1000 and all(len(r.output_ids) == 1 for r in results)


def test_timeout_aborts_the_request_on_the_server(urls):
    long = {"max_new_tokens": 4000, "ignore_eos": True}  # > 4 s of decoding on this model

    async def go():
        async with SGLangClient(urls[:1], timeout_s=0.5, max_retries=0) as client:
            with pytest.raises(GenerationError, match="TimeoutError"):
                await client.generate([9, 9], long)
            # The abort reached the server: idle again within 1 s, long before 4000 tokens are done.
            status = None
            for _ in range(20):
                status, _ = await client._request("POST", urls[0], "/flush_cache")
                if status == 200:
                    break
                await asyncio.sleep(0.05)
            return status

    assert run(go()) == 200


def test_flush_cache_waits_for_running_requests_when_asked(urls):
    """Without a timeout a server refuses the flush while a request runs (SGLang's 400); with
    one it waits until the request is done (aborted here after 0.3 s) and flushes."""
    long = {"max_new_tokens": 4000, "ignore_eos": True}  # > 4 s of decoding on this model

    async def go():
        async with SGLangClient(urls[:1]) as client:
            running = asyncio.create_task(client.generate([9, 9], long, rid="flush-long"))
            await asyncio.sleep(0.3)
            with pytest.raises(ServerError, match="HTTP 400: Flush cache failed"):
                await client.flush_cache()

            async def abort_later():
                await asyncio.sleep(0.3)
                await client.abort("flush-long")

            start = time.monotonic()
            flushed, _ = await asyncio.gather(client.flush_cache(timeout_s=30), abort_later())
            waited = time.monotonic() - start
            result = await running
            return flushed, waited, result

    flushed, waited, result = run(go())
    assert list(flushed.values())[0].startswith("Cache flushed")
    assert 0.25 <= waited < 10
    assert result.meta_info["finish_reason"]["type"] == "abort"


def test_duplicate_rid_is_refused_and_a_retry_gets_a_fresh_rid(urls):
    """SGLang answers 400 "Duplicate request ID" for a rid it still knows; so every retry of a
    request carries a new rid. Here the first attempt times out on a paused server."""
    import json

    url = urls[0]

    async def go():
        async with ClientSession() as s:
            async def post(path, body):
                async with s.post(url + path, data=json.dumps(body)) as r:
                    return r.status, await r.text()

            await post("/pause_generation", {"mode": "in_place"})
            waiting = asyncio.ensure_future(post("/generate", {"input_ids": [5, 6], "rid": "taken"}))
            await asyncio.sleep(0.3)
            dup = await post("/generate", {"input_ids": [5, 6], "rid": "taken"})
            async with SGLangClient([url], timeout_s=1.0, max_retries=1, retry_backoff_s=0.1,
                                    health_interval_s=0) as client:
                task = asyncio.ensure_future(client.generate([7, 8], GREEDY, rid="fixed"))
                while client.stats["retried"] < 1:  # the first attempt timed out
                    await asyncio.sleep(0.05)
                await post("/continue_generation", {})
                result = await task
                stats = client.take_stats()
            await waiting
            return dup, result, stats

    (status, body), result, stats = run(go())
    assert status == 400 and "Duplicate request ID detected: taken" in body
    assert result.rid.startswith("fixed-retry1-")
    assert stats == {"requests": 1, "retried": 1, "failed": 0}


def test_without_router_a_prompts_samples_and_turns_stay_on_one_server(urls):
    """Affinity by prompt: all samples and turns of a prompt reach one server, whose prefix
    cache then serves the shared prefix (`cached_tokens`); the prompts still spread."""
    from ctpo_megatron.rollout.serving.client import affinity, pinned_server, prompt_affinity_key

    # The servers' ports are random, so which server a prompt maps to is too: take the first
    # three prompts that map to each server, else all six could land on one (1 run in 32).
    candidates = [[10 + p] + [20 + (p * 7 + k) % 90 for k in range(30)] for p in range(64)]
    prompts = []
    for url in urls:
        prompts += [p for p in candidates if pinned_server(prompt_affinity_key(p), urls) == url][:3]
    assert len(prompts) == 6

    async def go():
        async with SGLangClient(urls, health_interval_s=0) as client:
            async def trajectory(prompt):
                with affinity(prompt_affinity_key(prompt)):
                    first = await client.generate(prompt, GREEDY)
                    second = await client.generate(prompt + first.output_ids + [3, 4], GREEDY)
                    return first, second

            out = []
            for prompt in prompts:  # the first sample warms the cache, the rest run together
                out.append([await trajectory(prompt)])
                out[-1] += await asyncio.gather(*(trajectory(prompt) for _ in range(3)))
            return out

    results = run(go())
    servers = set()
    for prompt, samples in zip(prompts, results):
        assert {r.server_url for s in samples for r in s} == {
            pinned_server(prompt_affinity_key(prompt), urls)}
        servers.add(samples[0][0].server_url)
        for first, second in samples[1:]:
            assert first.meta_info["cached_tokens"] == len(prompt) - 1  # all but the last token
        for first, second in samples:  # the next turn reuses the whole first turn
            assert second.meta_info["cached_tokens"] >= len(prompt) + len(first.output_ids) - 1
    assert servers == set(urls)


def test_generation_goes_through_the_real_router(tmp_path):
    """sglang-router (the Rust binary) in front of two embedded servers, cache-aware policy:
    generation goes through it and the samples of a prompt hit one server's cache."""
    model = build_tiny_model(tmp_path / "model")
    cfg = LaunchConfig(model_path=model, num_servers=2, router=True, health_timeout_s=120,
                       log_dir=str(tmp_path / "logs"), env={"OMP_NUM_THREADS": "1"})
    prompts = [[10 + p] + [20 + (p * 5 + k) % 90 for k in range(40)] for p in range(3)]
    with ServerGroup(cfg) as group:
        async def go():
            async with SGLangClient(group.worker_urls, router_url=group.router_url,
                                    health_interval_s=0) as client:
                out = []
                for prompt in prompts:
                    for _ in range(4):
                        out.append((prompt, await client.generate(prompt, GREEDY)))
                return out

        results = run(go())
    assert all(r.server_url == group.router_url for _, r in results)
    cached = [r.meta_info["cached_tokens"] for _, r in results]
    # Per prompt: the first request misses, the other three are served from the cache.
    assert cached == [0, 40, 40, 40] * 3


def test_weight_version_spans_become_one_version_per_token():
    """SGLang's meta_info.weight_versions spans (end exclusive) -> one version per output token;
    no spans (an SGLang without them): the request's version for every token; spans that do not
    tile the output are a malformed response."""
    import json

    from ctpo_megatron.rollout.serving.client import token_versions

    spans = [{"version": "step_3", "start": 0, "end": 2}, {"version": "step_4", "start": 2, "end": 5}]
    assert token_versions(spans, 5, "step_4") == ["step_3"] * 2 + ["step_4"] * 3
    assert token_versions(None, 3, "step_4") == ["step_4"] * 3
    assert token_versions([{"version": "v", "start": 0, "end": 0}], 0, "v") == []
    for bad, n in (([{"version": "a", "start": 1, "end": 3}], 3), (spans, 6), (spans[1:], 3)):
        with pytest.raises(ValueError):
            token_versions(bad, n, "x")
    body = {"output_ids": [4, 5, 6], "meta_info": {"weight_version": "step_4", "weight_versions": spans,
                                                   "output_token_logprobs": [[-1.0, t, None] for t in (4, 5, 6)]}}
    with pytest.raises(ServerError, match="weight_versions"):
        SGLangClient._parse("http://h:1", json.dumps(body), True)
    body["meta_info"]["weight_versions"] = spans[:1] + [{"version": "step_4", "start": 2, "end": 3}]
    assert SGLangClient._parse("http://h:1", json.dumps(body), True).output_versions == ["step_3"] * 2 + ["step_4"]
