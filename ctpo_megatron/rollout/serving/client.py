"""Async HTTP client for SGLang's native API (0.5.23), token-in/token-out.

    async with SGLangClient(["http://h1:30000", "http://h2:30000"]) as client:
        res = await client.generate([1, 2, 3], {"max_new_tokens": 64, "temperature": 1.0})
        res.output_ids, res.output_log_probs, res.weight_version

* Routing, for prefix-cache reuse (the n samples of a prompt and the turns of a trajectory share
  a prefix): with `router_url` every request goes through SGLang's router (its cache-aware
  policy keeps shared prefixes on one server). Without a router, a request with an affinity
  key (`affinity(key)`, e.g. the prompt) goes to the server the key hashes to among the healthy
  ones (rendezvous hashing: when a server leaves, only its keys move); without a key, to the
  healthy server with the fewest requests in flight.
* Health: while requests run, every server's `/health` is polled every `health_interval_s`;
  an unhealthy server gets no new requests until it answers again.
* Concurrency: at most `max_in_flight` requests in flight (a semaphore); one connection pool.
* Failures: connection errors, timeouts and 5xx (503 while a server starts) are retried with
  exponential backoff, on another server when there is one, up to `max_retries` times, each
  attempt with a fresh `rid` (SGLang refuses a rid it still knows: 400 "Duplicate request
  ID"); a server that refused a connection is skipped for `down_cooldown_s`. 4xx is not
  retried. When the budget is spent the request fails with `GenerationError` naming every URL
  tried and the last response body: a request is never dropped silently. `take_stats()`
  counts requests, retried attempts and failed requests.
* Requests finished by the server with `finish_reason.type == "abort"` (abort_request,
  pause_generation(mode="abort")) are returned as they are; the caller decides.
* Payloads: `sampling_params` is checked client-side against SGLang's own contract
  (`rollout.serving.contract`), so an unknown key fails here, before any request is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import json
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import aiohttp

from ctpo_megatron.rollout.serving.contract import validate_sampling_params

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateResult:
    """One finished generation.

    output_ids: [R] int — generated token ids, including the matched stop/EOS token.
    output_log_probs: [R] float — rollout log-prob of each output token (empty when
      return_logprob=False); SGLang's definition: log_softmax(logits / temperature).
    output_versions: [R] str — the weight version that sampled each output token. A request
      paused across a weight update (partial rollout: pause, new weights, continue) holds
      tokens of two versions; SGLang reports them as `meta_info.weight_versions` spans. A
      server without spans: every token at the request's `weight_version`.
    """

    output_ids: list[int]
    output_log_probs: list[float]
    finish_reason: dict | None
    weight_version: str
    prompt_tokens: int
    server_url: str
    rid: str = ""
    meta_info: dict = field(default_factory=dict, repr=False)
    output_versions: list[str] = field(default_factory=list, repr=False)


class ServerError(RuntimeError):
    """A server answered with an error status (or an unusable body); keeps the body."""

    def __init__(self, url: str, status: int, body: str, path: str = "/generate"):
        super().__init__(f"{url}{path} returned HTTP {status}: {body[:2000]}")
        self.url, self.status, self.body, self.path = url, status, body, path


class GenerationError(RuntimeError):
    """A request failed on every attempt; the message names each URL tried and why."""


_TRANSIENT = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError)


def _normalize_url(url: str) -> str:
    url = url.rstrip("/")
    return url if "://" in url else f"http://{url}"


_AFFINITY: contextvars.ContextVar[str | None] = contextvars.ContextVar("ctpo_affinity", default=None)


@contextlib.contextmanager
def affinity(key: str | None) -> Iterator[None]:
    """Requests made inside (in this task) share `key`: without a router they go to the same
    server while it is healthy, so their common prefix is served from its cache."""
    token = _AFFINITY.set(key)
    try:
        yield
    finally:
        _AFFINITY.reset(token)


def prompt_affinity_key(prompt_ids: Sequence[int]) -> str:
    """A stable key of a prompt (its token ids), for `affinity()`."""
    return hashlib.blake2b(",".join(map(str, prompt_ids)).encode(), digest_size=8).hexdigest()


def pinned_server(key: str, urls: Sequence[str]) -> str:
    """The server `key` maps to: highest rendezvous weight, so removing a server moves only
    the keys that mapped to it."""
    return max(urls, key=lambda u: hashlib.blake2b(f"{key}|{u}".encode(), digest_size=8).digest())


def token_versions(spans: list[dict] | None, num_tokens: int, default: str) -> list[str]:
    """Per-token weight versions from SGLang's `meta_info.weight_versions` spans
    (`{version, start, end}`, end exclusive, contiguous from 0 over the output tokens);
    `default` for every token when the server sent no spans. ValueError when the spans do
    not cover the output exactly."""
    if not spans:
        return [default] * num_tokens
    out: list[str] = []
    for span in spans:
        start, end = int(span["start"]), int(span["end"])
        if start != len(out) or end < start:
            raise ValueError(f"span {span} does not continue at token {len(out)}")
        out += [str(span["version"])] * (end - start)
    if len(out) != num_tokens:
        raise ValueError(f"spans cover {len(out)} tokens, the output has {num_tokens}")
    return out


class SGLangClient:
    """Client for one or more SGLang (or embedded) servers; see the module docstring."""

    def __init__(self, urls: Sequence[str], *, timeout_s: float = 3600.0, connect_timeout_s: float = 10.0,
                 max_retries: int = 3, max_in_flight: int = 2048, retry_backoff_s: float = 0.5,
                 down_cooldown_s: float = 5.0, validate: bool = True, router_url: str | None = None,
                 health_interval_s: float = 2.0):
        if not urls:
            raise ValueError("SGLangClient needs at least one server URL")
        if max_retries < 0 or max_in_flight < 1:
            raise ValueError(f"max_retries must be >= 0 and max_in_flight >= 1, got {max_retries}, "
                             f"{max_in_flight}")
        self.urls = [_normalize_url(u) for u in urls]
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, connect=connect_timeout_s)
        self.max_retries = max_retries
        self.max_in_flight = max_in_flight
        self.retry_backoff_s = retry_backoff_s
        self.down_cooldown_s = down_cooldown_s
        self.validate = validate
        self.router_url = _normalize_url(router_url) if router_url else None
        self.health_interval_s = health_interval_s
        self.in_flight = {u: 0 for u in self.urls + ([self.router_url] if self.router_url else [])}
        self._down_until = {u: 0.0 for u in self.in_flight}
        self._unhealthy: set[str] = set()
        self._monitor: asyncio.Task | None = None
        self.stats: Counter = Counter()
        self._semaphore: asyncio.Semaphore | None = None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "SGLangClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._monitor
            self._monitor = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.max_in_flight + 16, limit_per_host=0)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self.timeout)
            self._semaphore = asyncio.Semaphore(self.max_in_flight)
        if self.health_interval_s > 0 and (self._monitor is None or self._monitor.done()):
            self._monitor = asyncio.ensure_future(self._watch_health())
        return self._session

    async def _watch_health(self) -> None:
        """Polls every server's /health; unhealthy ones get no new requests until they recover."""
        while True:
            for url, ok in (await self.health()).items():
                if not ok and url not in self._unhealthy:
                    logger.warning("server %s is unhealthy: no new requests go there", url)
                    self._unhealthy.add(url)
                elif ok and url in self._unhealthy:
                    logger.info("server %s is healthy again", url)
                    self._unhealthy.discard(url)
            await asyncio.sleep(self.health_interval_s)

    def healthy_urls(self) -> list[str]:
        """Servers that passed the last health poll and did not refuse a connection lately."""
        now = time.monotonic()
        return [u for u in self.urls if u not in self._unhealthy and self._down_until[u] <= now]

    def take_stats(self) -> dict[str, int]:
        """Counts since the last call: `requests`, `retried` (attempts after a failure),
        `failed` (requests that failed on every attempt)."""
        out = {k: int(self.stats.get(k, 0)) for k in ("requests", "retried", "failed")}
        self.stats.clear()
        return out

    def _pick(self, tried: set[str], key: str | None = None) -> str:
        if self.router_url and self.router_url not in tried and self._down_until[self.router_url] <= time.monotonic():
            return self.router_url
        healthy = [u for u in self.healthy_urls() if u not in tried]
        if key is not None and healthy:
            return pinned_server(key, healthy)
        candidates = healthy or [u for u in self.urls if u not in tried] or self.urls
        return min(candidates, key=lambda u: (u in self._unhealthy, self.in_flight[u], self._down_until[u]))

    # ---- raw HTTP --------------------------------------------------------------------------
    async def _request(self, method: str, url: str, path: str, body: Any = None,
                       timeout: aiohttp.ClientTimeout | None = None) -> tuple[int, str]:
        session = self._get_session()
        data = None if body is None else json.dumps(body)
        async with session.request(method, url + path, data=data, timeout=timeout or self.timeout,
                                   headers={"Content-Type": "application/json"}) as resp:
            return resp.status, await resp.text()

    async def post_json(self, url: str, path: str, body: dict | None = None) -> Any:
        """POSTs `body` ({} by default: SGLang control endpoints need a JSON body) to one server.

        Returns the parsed JSON (or the text); raises ServerError on a non-200 answer.
        """
        status, text = await self._request("POST", url, path, {} if body is None else body)
        if status != 200:
            raise ServerError(url, status, text, path)
        try:
            return json.loads(text) if text else None
        except json.JSONDecodeError:
            return text

    async def _all(self, method: str, path: str, body: dict | None = None) -> dict[str, Any]:
        async def one(url: str) -> Any:
            if method == "GET":
                status, text = await self._request("GET", url, path)
                if status != 200:
                    raise ServerError(url, status, text, path)
                return text
            return await self.post_json(url, path, body)

        results = await asyncio.gather(*(one(u) for u in self.urls), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        return dict(zip(self.urls, results))

    # ---- generation ------------------------------------------------------------------------
    async def generate(self, input_ids: Sequence[int], sampling_params: dict, *,
                       return_logprob: bool = True, rid: str | None = None,
                       _validated: bool = False) -> GenerateResult:
        """Generates from one prompt; retried on transient failures (see module docstring)."""
        if not input_ids:
            raise ValueError("input_ids is empty")
        if (sampling_params or {}).get("n", 1) not in (1, None):
            raise ValueError("generate() returns one sample: use n=1 and call generate_many with the "
                             "prompt repeated for several samples")
        if self.validate and not _validated:
            validate_sampling_params(sampling_params)
        body = self.build_generate_body(input_ids, sampling_params, return_logprob=return_logprob, rid=rid)
        self._get_session()
        assert self._semaphore is not None
        async with self._semaphore:
            return await self._generate_with_retries(body, return_logprob)

    @staticmethod
    def build_generate_body(input_ids: Sequence[int], sampling_params: dict, *,
                            return_logprob: bool = True, rid: str | None = None) -> dict:
        """The exact `/generate` JSON body `generate()` sends (token-in, one prompt)."""
        return {"input_ids": [int(t) for t in input_ids], "sampling_params": dict(sampling_params),
                "return_logprob": bool(return_logprob), "rid": rid or uuid.uuid4().hex}

    async def _generate_with_retries(self, body: dict, return_logprob: bool) -> GenerateResult:
        tried: set[str] = set()
        failures: list[str] = []
        key = _AFFINITY.get()
        self.stats["requests"] += 1
        first_rid = body["rid"]
        for attempt in range(self.max_retries + 1):
            url = self._pick(tried, key)
            tried.add(url)
            if attempt:
                # A fresh rid: the server may still know the old one (Duplicate request ID).
                body = dict(body, rid=f"{first_rid}-retry{attempt}-{uuid.uuid4().hex[:8]}")
                self.stats["retried"] += 1
            self.in_flight[url] += 1
            try:
                status, text = await self._request("POST", url, "/generate", body)
            except _TRANSIENT as e:
                if isinstance(e, asyncio.TimeoutError):
                    # The server may still be generating it: abort there before retrying elsewhere.
                    asyncio.ensure_future(self._abort_quietly(url, body["rid"]))
                else:
                    self._down_until[url] = time.monotonic() + self.down_cooldown_s
                failures.append(f"{url}: {type(e).__name__}: {e}")
                logger.warning("generate on %s failed (%s), attempt %d/%d", url, e, attempt + 1,
                               self.max_retries + 1)
            else:
                if status == 200:
                    return self._parse(url, text, return_logprob)
                if status < 500:
                    self.stats["failed"] += 1
                    raise ServerError(url, status, text)
                failures.append(f"{url}: HTTP {status}: {text[:500]}")
                logger.warning("generate on %s answered %d, attempt %d/%d", url, status, attempt + 1,
                               self.max_retries + 1)
            finally:
                self.in_flight[url] -= 1
            if attempt < self.max_retries:
                await asyncio.sleep(min(self.retry_backoff_s * 2 ** attempt, 10.0))
        self.stats["failed"] += 1
        raise GenerationError(f"generate (rid {first_rid}) failed after {self.max_retries + 1} "
                              "attempts:\n  " + "\n  ".join(failures))

    async def _abort_quietly(self, url: str, rid: str) -> None:
        try:
            await self._request("POST", url, "/abort_request", {"rid": rid},
                                timeout=aiohttp.ClientTimeout(total=10))
        except Exception as e:  # noqa: BLE001 - best effort; the retry goes on regardless
            logger.warning("could not abort %s on %s: %s", rid, url, e)

    @staticmethod
    def _parse(url: str, text: str, return_logprob: bool) -> GenerateResult:
        try:
            out = json.loads(text)
            meta = out["meta_info"]
            output_ids = [int(t) for t in out["output_ids"]]
            entries = (meta.get("output_token_logprobs") or []) if return_logprob else []
            logprobs = [float(e[0]) for e in entries]
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise ServerError(url, 200, f"malformed /generate response ({e}): {text[:2000]}") from None
        if return_logprob and len(logprobs) != len(output_ids):
            raise ServerError(url, 200, f"{len(logprobs)} log-probs for {len(output_ids)} output ids: "
                                        f"{text[:2000]}")
        version = str(meta.get("weight_version") or "default")
        try:
            versions = token_versions(meta.get("weight_versions"), len(output_ids), version)
        except (ValueError, KeyError, TypeError) as e:
            raise ServerError(url, 200, f"malformed meta_info.weight_versions ({e}): {text[:2000]}") from None
        return GenerateResult(output_ids=output_ids, output_log_probs=logprobs,
                              finish_reason=meta.get("finish_reason"), weight_version=version,
                              prompt_tokens=int(meta.get("prompt_tokens", 0)), server_url=url,
                              rid=str(meta.get("id", "")), meta_info=meta, output_versions=versions)

    async def generate_many(self, list_of_input_ids: Sequence[Sequence[int]], sampling_params: dict, *,
                            return_logprob: bool = True) -> list[GenerateResult]:
        """Generates for many prompts concurrently (each its own request); results in input order.

        Raises the first failure after every request has settled (none keeps running).
        """
        if self.validate:
            validate_sampling_params(sampling_params)
        tasks = [asyncio.ensure_future(self.generate(ids, sampling_params, return_logprob=return_logprob,
                                                     _validated=True))
                 for ids in list_of_input_ids]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return list(results)

    # ---- control -----------------------------------------------------------------------------
    async def health(self) -> dict[str, bool]:
        """`GET /health` on every server: {url: healthy}."""
        async def one(url: str) -> bool:
            try:
                status, _ = await self._request("GET", url, "/health",
                                                timeout=aiohttp.ClientTimeout(total=30, connect=5))
                return status == 200
            except _TRANSIENT:
                return False
        return dict(zip(self.urls, await asyncio.gather(*(one(u) for u in self.urls))))

    async def model_info(self, url: str | None = None) -> dict:
        """`GET /model_info` of one server (the first by default)."""
        url = _normalize_url(url) if url else self.urls[0]
        status, text = await self._request("GET", url, "/model_info")
        if status != 200:
            raise ServerError(url, status, text, "/model_info")
        return json.loads(text)

    async def flush_cache(self, timeout_s: float = 0.0) -> dict[str, str]:
        """`POST /flush_cache` on every server; ServerError when one refuses (requests running).

        timeout_s: how long each server waits for its running and queued requests to finish
        before it refuses (SGLang's `?timeout=`). A request whose reply has just reached the
        client may still count as running for a moment, so a flush right after a workload
        should wait."""
        return await self._all("POST", f"/flush_cache?timeout={timeout_s:g}" if timeout_s > 0 else "/flush_cache")

    async def abort(self, rid: str) -> None:
        """Aborts request `rid` wherever it runs."""
        await self._all("POST", "/abort_request", {"rid": rid})

    async def abort_all(self) -> None:
        """Aborts every request on every server; they finish with finish_reason type "abort"."""
        await self._all("POST", "/abort_request", {"abort_all": True})

    async def pause_generation(self, mode: str = "retract") -> None:
        """Pauses every server: "abort" | "retract" | "in_place" (new requests wait meanwhile)."""
        if mode not in ("abort", "retract", "in_place"):
            raise ValueError(f"pause mode must be abort, retract or in_place, got {mode!r}")
        await self._all("POST", "/pause_generation", {"mode": mode})

    async def continue_generation(self) -> None:
        """Resumes every server after pause_generation."""
        await self._all("POST", "/continue_generation", {})

    async def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        """Frees memory regions on every server (SGLang's memory saver: `weights`, `kv_cache`,
        `cuda_graph`; None: all). Servers must be idle; ServerError when one refuses."""
        await self._all("POST", "/release_memory_occupation", {"tags": tags})

    async def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        """Allocates released regions again on every server; resumed weights hold no values
        until the next weight update."""
        await self._all("POST", "/resume_memory_occupation", {"tags": tags})

    async def update_weight_version(self, version: str, abort_all_requests: bool = False) -> None:
        """Sets the weight version string reported in later responses' meta_info."""
        await self._all("POST", "/update_weight_version",
                        {"new_version": version, "abort_all_requests": abort_all_requests})
