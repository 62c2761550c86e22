"""Redis killed, restarted, slow and corrupt while traffic flows (a private redis-server per test).

Requests must keep succeeding (cache bypass, counted in metrics), the cache must work again once Redis is
back, no answer may ever be served for the wrong request, and a damaged entry is never served.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest

from gateway.ratelimit import RateLimiter
from router_model import KeywordRouter
from tests.harness import Upstream, run_gateway, scripted_upstream, vllm_expert_config
from tests.reliability.common import (
    RedisServer,
    assert_complete_stream,
    assert_openai_error,
    metric,
    poll,
    private_redis,
    scrape,
)


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with scripted_upstream("general") as up:
        yield up


@pytest.fixture
def rds() -> Iterator[RedisServer]:
    with private_redis() as server:
        yield server


def _config(up: Upstream, rds: RedisServer, timeout_ms: int = 1000, **auth: Any) -> dict[str, Any]:
    """``timeout_ms``: short where the test is about a slow or dead Redis; else generous, so that a loaded CI
    machine cannot turn an expected hit or miss into a bypass."""
    return {"experts": [vllm_expert_config("general", up)],
            "cache": {"backend": "redis", "url": rds.url, "timeout_ms": timeout_ms, "key_prefix": "rel"},
            "auth": {"api_keys_env": None, **auth}}


def _ask(url: str, i: int, stream: bool, headers: dict[str, str] | None = None) -> tuple[str, str]:
    """One deterministic request for prompt ``i``; returns (cache header, answer text), checking the answer."""
    prompt = f"name colour number {i}"
    r = httpx.post(f"{url}/v1/chat/completions", timeout=15, headers=headers or {},
                   json={"model": "auto", "temperature": 0, "stream": stream,
                         "messages": [{"role": "user", "content": prompt}]})
    assert r.status_code == 200, r.text
    text = assert_complete_stream(r.text) if stream else r.json()["choices"][0]["message"]["content"]
    assert text == f"general: {prompt}", f"answer for another request served: {text!r} for {prompt!r}"
    return r.headers["x-octoroute-cache"], text


@dataclass
class Traffic:
    """Background clients cycling over a few prompts (so there are hits), bounded in count and time."""

    url: str
    clients: int = 4
    max_requests: int = 3000
    max_seconds: float = 40
    stop: threading.Event = field(default_factory=threading.Event)
    results: list[tuple[float, str, float]] = field(default_factory=list)  # (finished at, cache header, seconds)
    failures: list[str] = field(default_factory=list)

    def _client(self, n: int) -> None:
        deadline = time.monotonic() + self.max_seconds
        i = 0
        while not self.stop.is_set() and time.monotonic() < deadline and len(self.results) < self.max_requests:
            started = time.monotonic()
            try:
                header, _ = _ask(self.url, (n * 7 + i) % 12, stream=i % 2 == 0)
            except Exception as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                header = "failed"
            self.results.append((time.monotonic(), header, time.monotonic() - started))
            i += 1

    def __enter__(self) -> Traffic:
        self.pool = ThreadPoolExecutor(self.clients)
        self.futures = [self.pool.submit(self._client, n) for n in range(self.clients)]
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for f in self.futures:
            f.result(timeout=60)
        self.pool.shutdown()

    def count(self, header: str, since: float = 0.0) -> int:
        return sum(1 for t, h, _ in list(self.results) if h == header and t >= since)

    def latencies(self, since: float, until: float) -> list[float]:
        return sorted(s for t, _, s in self.results if since <= t <= until)

    def assert_not_stalled(self, since: float, until: float, healthy_median_s: float) -> None:
        """Requests in the window did not wait on Redis: their median stays close to the healthy median.

        (Relative and generous: 2 shared, busy cores. A request stuck behind Redis retries or a missing
        deadline takes seconds every time, which the median shows.)"""
        took = self.latencies(since, until)
        assert len(took) >= 5, took
        median, slowest = took[len(took) // 2], took[-1]
        assert median < max(0.5, 4 * healthy_median_s) and slowest < 5, \
            f"median {median:.2f}s (healthy {healthy_median_s:.2f}s), slowest {slowest:.2f}s"

    def median(self, since: float, until: float) -> float:
        took = self.latencies(since, until)
        return took[len(took) // 2]


@pytest.mark.reliability
def test_redis_killed_and_restarted_while_traffic_flows(upstream: Upstream, rds: RedisServer) -> None:
    with run_gateway(_config(upstream, rds, timeout_ms=100), router=KeywordRouter(["general"])) as url, \
            Traffic(url) as traffic:
        poll(lambda: traffic.count("hit") >= 20, 20, "cache hits before the outage")
        healthy = traffic.median(0, time.monotonic())
        rds.kill()
        killed = time.monotonic()
        poll(lambda: traffic.count("bypass", since=killed) >= 30, 20, "requests served while Redis is down")
        down = scrape(url)
        assert metric(down, "octoroute_cache_total", result="error") >= 1
        assert metric(down, "octoroute_cache_total", result="bypass") >= 30
        rds.start()  # same port, empty
        back = time.monotonic()
        traffic.assert_not_stalled(killed, back, healthy)
        poll(lambda: traffic.count("hit", since=back) >= 20, 20, "cache hits again after Redis came back")
    assert traffic.failures == [], traffic.failures[:5]
    assert rds.client().keys("rel:resp:*"), "nothing stored after Redis came back"


@pytest.mark.reliability
@pytest.mark.parametrize("how", ["debug_sleep", "client_pause"])
def test_slow_redis_is_bypassed_then_used_again(upstream: Upstream, rds: RedisServer, how: str) -> None:
    with run_gateway(_config(upstream, rds, timeout_ms=100), router=KeywordRouter(["general"])) as url, \
            Traffic(url, clients=6) as traffic:
        poll(lambda: traffic.count("hit") >= 20, 20, "cache hits before Redis slows down")
        healthy = traffic.median(0, time.monotonic())
        errors_before = metric(scrape(url), "octoroute_cache_total", result="error")
        slow = time.monotonic()
        blocker = rds.client()
        if how == "debug_sleep":  # the server itself stalls for 2 s (the call blocks until then)
            sleeper = threading.Thread(target=blocker.execute_command, args=("DEBUG", "SLEEP", "2"))
            sleeper.start()
        else:
            blocker.execute_command("CLIENT", "PAUSE", "2000", "ALL")
            sleeper = None
        # requests keep finishing while Redis is stalled (a stall would hold them all until it recovers)
        poll(lambda: traffic.count("bypass", since=slow) >= 5, 1.8, "requests answered while Redis is stalled")
        if sleeper is not None:
            sleeper.join(timeout=10)
        else:
            time.sleep(max(0.0, slow + 2.0 - time.monotonic()))  # until the pause ends
        traffic.assert_not_stalled(slow, slow + 2.0, healthy)
        recovered = time.monotonic() + 0.1
        poll(lambda: traffic.count("hit", since=recovered) >= 20, 20, "cache hits after Redis recovered")
        assert metric(scrape(url), "octoroute_cache_total", result="error") > errors_before
    assert traffic.failures == [], traffic.failures[:5]


@pytest.mark.reliability
def test_cancelled_redis_calls_never_serve_another_requests_answer(upstream: Upstream, rds: RedisServer) -> None:
    """Timeouts cancel Redis calls mid-flight; a connection must not hand one key's reply to the next GET.

    Many distinct prompts, Redis paused repeatedly at random moments; every answer must match its prompt
    (``_ask`` checks) — cached or not."""
    with run_gateway(_config(upstream, rds, timeout_ms=100), router=KeywordRouter(["general"])) as url:
        for i in range(24):
            _ask(url, i, stream=False)  # warm: 24 distinct entries
        stop = threading.Event()
        failures: list[str] = []

        def client(n: int) -> None:
            for i in range(40):
                if stop.is_set():
                    return
                try:
                    _ask(url, (n * 13 + i) % 24, stream=i % 3 == 0)
                except Exception as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(client, n) for n in range(8)]
            blocker = rds.client()
            for pause_ms in (30, 45, 60, 80, 40, 55, 70, 35):
                blocker.execute_command("CLIENT", "PAUSE", str(pause_ms), "ALL")
                time.sleep(0.15)
            stop.set()
            for f in futures:
                f.result(timeout=60)
        assert failures == [], failures[:5]
        text = scrape(url)
        assert metric(text, "octoroute_cache_total", result="error") >= 1  # calls really were cut off
        assert metric(text, "octoroute_cache_total", result="hit") >= 1


def _only_entry(rds: RedisServer) -> bytes:
    keys = rds.client().keys("rel:resp:*")
    assert len(keys) == 1, keys
    return bytes(keys[0])


def _flip(blob: bytes) -> bytes:
    i = len(blob) - 20
    return blob[:i] + bytes([blob[i] ^ 0x01]) + blob[i + 1:]


DAMAGE = {
    "truncated": lambda b: b[: len(b) // 2],
    "one bit flipped": _flip,
    "empty": lambda b: b"",
    "no checksum": lambda b: b.partition(b"|")[2],
    "garbage": lambda b: b"\x00\xff" * 50,
    "checksum only": lambda b: b.partition(b"|")[0] + b"|",
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_damaged_entry_is_never_served(upstream: Upstream, rds: RedisServer, damage: str, stream: bool) -> None:
    with run_gateway(_config(upstream, rds), router=KeywordRouter(["general"])) as url:
        assert _ask(url, 1, stream=False)[0] == "miss"
        key = _only_entry(rds)
        client = rds.client()
        client.set(key, DAMAGE[damage](client.get(key) or b""))
        before = upstream.stats()["requests"]
        header, _ = _ask(url, 1, stream=stream)  # the answer is checked against the prompt
        assert header == "miss" and upstream.stats()["requests"] == before + 1
        assert _ask(url, 1, stream=not stream)[0] == "hit"  # stored whole again
        assert orjson.loads(client.get(key).partition(b"|")[2])["choices"][0]["message"]["content"] == \
            "general: name colour number 1"


def test_wrong_redis_type_at_the_key_is_deleted_and_caching_goes_on(upstream: Upstream, rds: RedisServer) -> None:
    """A key of the wrong type is one bad entry, not a Redis outage: it is deleted (a miss, stored again) and
    nobody else's lookups are bypassed (no back-off, no error counted)."""
    with run_gateway(_config(upstream, rds), router=KeywordRouter(["general"])) as url:
        _ask(url, 2, stream=False)
        key = _only_entry(rds)
        client = rds.client()
        client.delete(key)
        client.rpush(key, b"not a string")
        assert _ask(url, 2, stream=False)[0] == "miss"
        assert client.type(key) == b"string"  # replaced by the fresh answer
        assert _ask(url, 2, stream=True)[0] == "hit"
        assert [_ask(url, 5, stream=False)[0] for _ in range(2)] == ["miss", "hit"]  # other keys unaffected
        assert metric(scrape(url), "octoroute_cache_total", result="error") == 0


FORGED = {
    "empty object": {},
    "no choices": {"id": "x", "object": "chat.completion", "created": 1, "model": "m"},
    "choices a string": {"id": "x", "object": "chat.completion", "created": 1, "model": "m", "choices": "hi"},
    "another request's answer, unfinished": {
        "id": "x", "object": "chat.completion", "created": 1, "model": "m", "usage": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "planted"}, "finish_reason": None}]},
}


@pytest.mark.parametrize("signed", [False, True], ids=["plain-sha256", "valid-hmac"])
@pytest.mark.parametrize("forged", list(FORGED), ids=list(FORGED))
def test_forged_entries_are_deleted_never_served(upstream: Upstream, rds: RedisServer, monkeypatch: pytest.MonkeyPatch,
                                                 forged: str, signed: bool) -> None:
    """An entry planted by whoever can write to Redis: sealed with the old plain SHA-256 checksum (refused by
    the HMAC), or even with the real secret but the wrong shape (refused by the shape check). Either way it
    is deleted and the request is answered by the expert."""
    import hashlib
    import hmac

    monkeypatch.setenv("OCTOROUTE_CACHE_SECRET", "rel-secret")
    with run_gateway(_config(upstream, rds), router=KeywordRouter(["general"])) as url:
        assert _ask(url, 4, stream=False)[0] == "miss"
        key = _only_entry(rds)
        payload = orjson.dumps(FORGED[forged])
        mac = (hmac.new(b"rel-secret", payload, hashlib.sha256).hexdigest() if signed
               else hashlib.sha256(payload).hexdigest()[:16])
        rds.client().set(key, mac.encode() + b"|" + payload)
        for stream in (False, True):
            header, _ = _ask(url, 4, stream=stream)  # checks the answer is this prompt's
            assert header == "miss" if not stream else header == "hit"  # the forged entry was replaced
        assert orjson.loads(rds.client().get(key).partition(b"|")[2])["choices"][0]["message"]["content"] == \
            "general: name colour number 4"


@pytest.mark.parametrize("how", ["killed", "paused"])
def test_rate_limiter_survives_redis_outage_without_stalling(upstream: Upstream, rds: RedisServer,
                                                             monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """The per-key limit is Redis-backed with the Redis cache; Redis dead or stalled must not slow or fail
    requests (the limiter falls back to counting in-process)."""
    monkeypatch.setenv("REL_KEYS_OUTAGE", "key-one,key-two")
    cfg = _config(upstream, rds, timeout_ms=100, api_keys_env="REL_KEYS_OUTAGE", rate_limit_per_minute=10_000)
    with run_gateway(cfg, router=KeywordRouter(["general"])) as url:
        headers = {"authorization": "Bearer key-one"}
        _ask(url, 3, stream=False, headers=headers)
        assert rds.client().keys("rel:rl:*"), "the limiter should count in Redis"
        if how == "killed":
            rds.kill()
        else:
            rds.client().execute_command("CLIENT", "PAUSE", "4000", "ALL")
        outage = time.monotonic()
        took = []
        for i in range(6):
            started = time.monotonic()
            _ask(url, 3, stream=i % 2 == 0, headers=headers)
            took.append(round(time.monotonic() - started, 2))
        assert time.monotonic() - outage < 3.5, "the requests must not have waited for Redis"
        assert max(took) < 1.0, f"request latencies {took}s with Redis {how}"
        if how == "killed":
            rds.start()
        poll(lambda: _ask(url, 3, stream=False, headers=headers)[0] == "hit", 10, "cache back after outage")


# -- the rate limiter (gateway/ratelimit.py) ------------------------------------------------------------

KEY = {"authorization": "Bearer rl-key"}


def _hello(url: str, i: int) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", headers=KEY, timeout=15,
                      json={"model": "auto", "messages": [{"role": "user", "content": f"hello {i}"}]})


def test_a_stalled_redis_costs_one_deadline_per_backoff_not_one_per_request(
        upstream: Upstream, rds: RedisServer, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Redis paused for 4 s: the first request waits out the 250 ms deadline, the following ones skip Redis for
    the back-off (cache and limiter alike). Before, every request waited the deadline (12 x 250 ms)."""
    monkeypatch.setenv("RL_KEYS", "rl-key")
    cfg = _config(upstream, rds, 250, api_keys_env="RL_KEYS", rate_limit_per_minute=10_000)
    with run_gateway(cfg, router=KeywordRouter(["general"])) as url:
        assert _hello(url, 0).status_code == 200
        rds.client().execute_command("CLIENT", "PAUSE", "4000", "ALL")
        started = time.monotonic()
        statuses = [_hello(url, i).status_code for i in range(12)]
        took = time.monotonic() - started
    assert statuses == [200] * 12
    assert took < 1.6, f"12 requests took {took:.2f}s during a Redis stall (the deadline is 0.25 s per call)"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "redis" in r.getMessage().lower()]
    assert 1 <= len(warnings) <= 3, [r.getMessage() for r in warnings]  # once per back-off, not per request


@pytest.mark.parametrize("policy", ["open", "closed"])
def test_outage_policy_open_counts_locally_closed_refuses(upstream: Upstream, rds: RedisServer,
                                                        monkeypatch: pytest.MonkeyPatch, policy: str) -> None:
    monkeypatch.setenv("RL_KEYS", "rl-key")
    cfg = _config(upstream, rds, 100, api_keys_env="RL_KEYS", rate_limit_per_minute=3,
                  rate_limit_outage=policy)
    with run_gateway(cfg, router=KeywordRouter(["general"])) as url:
        assert _hello(url, 0).status_code == 200
        rds.kill()
        answers = [_hello(url, i) for i in range(1, 5)]
    if policy == "closed":
        assert {r.status_code for r in answers} == {503}
        assert assert_openai_error(answers[0].json())["code"] == "service_unavailable"
        assert int(answers[0].headers["retry-after"]) >= 1
    else:  # counted in process from the outage on: 3 more pass, the 4th is over the limit
        assert [r.status_code for r in answers] == [200, 200, 200, 429]
        assert assert_openai_error(answers[-1].json())["code"] == "rate_limit_exceeded"


def test_the_window_moves_no_double_burst_at_a_minute_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    """20 requests at 12:00:59 and 20 more at 12:01:00.2: a fixed per-minute window admitted all 40 (2x the
    limit within 1.2 s); any 60 s may hold at most 20."""
    now = [1_800_000_000.0 + 59.0]  # 59 s into a minute
    monkeypatch.setattr(time, "time", lambda: now[0])
    limiter = RateLimiter(20)

    async def burst() -> int:
        admitted = 0
        for _ in range(20):
            try:
                await limiter.hit("k")
                admitted += 1
            except Exception as exc:
                assert getattr(exc, "status", None) == 429
        return admitted

    assert asyncio.run(burst()) == 20
    now[0] += 1.2
    assert asyncio.run(burst()) == 0
    now[0] += 60
    assert asyncio.run(burst()) == 20


def test_after_a_backoff_one_call_probes_redis_while_the_others_still_skip_it() -> None:
    """A stalled Redis delays one request per back-off: when the back-off ends, one call probes (for at most its
    deadline) and every other call keeps skipping Redis until the probe answers (a success ends the outage)."""
    from gateway.backoff import Backoff

    now = [0.0]
    backoff = Backoff(1.0, 0.25, clock=lambda: now[0])
    assert all(backoff.allow() for _ in range(3))  # healthy: everyone
    backoff.trip("GET", TimeoutError())
    assert not backoff.allow()
    now[0] = 1.0
    assert [backoff.allow() for _ in range(4)] == [True, False, False, False]  # one probe
    now[0] = 1.3  # the probe neither answered nor failed within its deadline (cancelled): another may probe
    assert [backoff.allow() for _ in range(2)] == [True, False]
    backoff.trip("GET", TimeoutError())  # still stalled
    now[0] = 2.0
    assert not backoff.allow()
    now[0] = 2.31
    assert backoff.allow()
    backoff.ok()
    assert all(backoff.allow() for _ in range(3))
