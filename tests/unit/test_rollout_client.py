"""SGLangClient against real embedded servers: ordering, load balancing, validation, retries,
error bodies, control calls. (A server dying mid-batch is in test_launcher.py.)"""

import asyncio

import pytest
from aiohttp import ClientSession, web

from ctpo_megatron.parallel.net import free_port
from ctpo_megatron.rollout.client import GenerationError, SGLangClient, ServerError
from ctpo_megatron.rollout.contract import ContractError
from ctpo_megatron.rollout.launcher import LaunchConfig, ServerGroup
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
