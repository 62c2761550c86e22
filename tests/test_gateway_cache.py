"""Response cache: memory and the machine's real Redis, streaming replay, namespaces, outages."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import redis

from gateway.cache import cache_key
from gateway.experts import Endpoint
from router_model import KeywordRouter
from tests.conftest import REDIS_URL
from tests.harness import Upstream, free_port, run_gateway, scripted_upstream, vllm_expert_config

MSG = [{"role": "user", "content": "name three colours"}]


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with scripted_upstream("general") as up:
        yield up


def _config(up: Upstream, cache: dict[str, Any], auth: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"experts": [vllm_expert_config("general", up)], "cache": cache, "auth": auth or {"api_keys_env": None}}


def _chat(url: str, stream: bool = False, key: str | None = None, **extra: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    body = {"model": "auto", "messages": MSG, "temperature": 0, "stream": stream, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=10)


def _sse_text(r: httpx.Response) -> tuple[str, list[str]]:
    lines = [line for line in r.text.split("\n") if line.startswith("data: ")]
    import orjson

    text = ""
    for line in lines[:-1]:
        chunk = orjson.loads(line[6:])
        for c in chunk["choices"]:
            text += c["delta"].get("content") or ""
    return text, lines


def _without_identity(response: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in response.items() if k not in ("id", "created")}


@pytest.fixture(params=["memory", "redis"])
def cache_cfg(request: pytest.FixtureRequest, redis_prefix: str) -> dict[str, Any]:
    return {"backend": request.param, "url": REDIS_URL, "key_prefix": redis_prefix}


def test_hit_after_miss(upstream: Upstream, cache_cfg: dict[str, Any]) -> None:
    with run_gateway(_config(upstream, cache_cfg), router=KeywordRouter(["general"])) as url:
        before = upstream.stats()["requests"]
        first = _chat(url)
        second = _chat(url)
        assert first.headers["x-octoroute-cache"] == "miss"
        assert second.headers["x-octoroute-cache"] == "hit"
        answer, hit = first.json(), second.json()
        assert hit["id"] != answer["id"] and hit["id"].startswith("chatcmpl-")  # a response of its own ...
        assert answer["created"] <= hit["created"] <= time.time() + 1
        assert _without_identity(hit) == _without_identity(answer)  # ... carrying the cached answer
        assert upstream.stats()["requests"] == before + 1
        metrics = httpx.get(f"{url}/metrics").text
        assert 'octoroute_cache_total{result="hit"} 1.0' in metrics


def test_streaming_hit_is_a_proper_sse_stream(upstream: Upstream, cache_cfg: dict[str, Any]) -> None:
    with run_gateway(_config(upstream, cache_cfg), router=KeywordRouter(["general"])) as url:
        miss = _chat(url, stream=True, stream_options={"include_usage": True})
        assert miss.headers["x-octoroute-cache"] == "miss"
        text_miss, _ = _sse_text(miss)
        hit = _chat(url, stream=True, stream_options={"include_usage": True})
        assert hit.headers["x-octoroute-cache"] == "hit"
        assert hit.headers["content-type"].startswith("text/event-stream")
        text_hit, lines = _sse_text(hit)
        assert text_hit == text_miss == "general: name three colours"
        assert lines[-1] == "data: [DONE]"
        assert '"usage"' in lines[-2]
        # a response of its own: one new id on every chunk, the current time (streamed hits replayed both)
        miss_ids = {orjson.loads(line[6:])["id"] for line in _sse_text(miss)[1][:-1]}
        hit_chunks = [orjson.loads(line[6:]) for line in lines[:-1]]
        assert len({c["id"] for c in hit_chunks}) == 1 and not {c["id"] for c in hit_chunks} & miss_ids
        assert all(abs(c["created"] - time.time()) < 5 for c in hit_chunks)
        # the streamed answer also serves a non-streaming request
        plain = _chat(url)
        assert plain.headers["x-octoroute-cache"] == "hit"
        assert plain.json()["choices"][0]["message"]["content"] == text_miss
        assert plain.json()["id"] not in miss_ids | {c["id"] for c in hit_chunks}


def test_sampling_requests_bypass(upstream: Upstream, cache_cfg: dict[str, Any]) -> None:
    with run_gateway(_config(upstream, cache_cfg), router=KeywordRouter(["general"])) as url:
        r1 = _chat(url, temperature=0.8)
        r2 = _chat(url, temperature=0.8)
        assert r1.headers["x-octoroute-cache"] == r2.headers["x-octoroute-cache"] == "bypass"
        seeded = [_chat(url, temperature=0.8, seed=3).headers["x-octoroute-cache"] for _ in range(2)]
        assert seeded == ["miss", "hit"]


def test_partial_stream_is_not_cached(upstream: Upstream, redis_prefix: str) -> None:
    cfg = {"backend": "redis", "url": REDIS_URL, "key_prefix": redis_prefix}
    with run_gateway(_config(upstream, cfg), router=KeywordRouter(["general"])) as url:
        upstream.control("die_after", chunks=2)
        try:
            r = _chat(url, stream=True)
        finally:
            upstream.control("ok")
        assert '"error"' in r.text and "[DONE]" not in r.text
        assert list(redis.Redis.from_url(REDIS_URL).scan_iter(f"{redis_prefix}:*")) == []
        assert _chat(url).headers["x-octoroute-cache"] == "miss"


def test_namespaces_per_api_key(upstream: Upstream, redis_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_KEYS", "key-a,key-b")
    cfg = {"backend": "redis", "url": REDIS_URL, "key_prefix": redis_prefix}
    with run_gateway(_config(upstream, cfg, {"api_keys_env": "TEST_KEYS"}), router=KeywordRouter(["general"])) as url:
        assert _chat(url, key="key-a").headers["x-octoroute-cache"] == "miss"
        assert _chat(url, key="key-a").headers["x-octoroute-cache"] == "hit"
        assert _chat(url, key="key-b").headers["x-octoroute-cache"] == "miss"


def test_shared_cache_crosses_keys(upstream: Upstream, redis_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_KEYS", "key-a,key-b")
    cfg = {"backend": "redis", "url": REDIS_URL, "key_prefix": redis_prefix, "shared": True}
    with run_gateway(_config(upstream, cfg, {"api_keys_env": "TEST_KEYS"}), router=KeywordRouter(["general"])) as url:
        assert _chat(url, key="key-a").headers["x-octoroute-cache"] == "miss"
        assert _chat(url, key="key-b").headers["x-octoroute-cache"] == "hit"


def test_corrupt_entry_is_dropped_not_served(upstream: Upstream, redis_prefix: str) -> None:
    cfg = {"backend": "redis", "url": REDIS_URL, "key_prefix": redis_prefix}
    with run_gateway(_config(upstream, cfg), router=KeywordRouter(["general"])) as url:
        assert _chat(url).headers["x-octoroute-cache"] == "miss"
        client = redis.Redis.from_url(REDIS_URL)
        (key,) = list(client.scan_iter(f"{redis_prefix}:resp:*"))
        blob = client.get(key)
        assert blob is not None
        client.set(key, blob[: len(blob) // 2])  # truncated write
        r = _chat(url)
        assert r.status_code == 200 and r.headers["x-octoroute-cache"] == "miss"
        assert r.json()["choices"][0]["message"]["content"] == "general: name three colours"
        assert _chat(url).headers["x-octoroute-cache"] == "hit"  # rewritten whole


def test_redis_down_means_bypass_not_5xx(upstream: Upstream) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    cfg = {"backend": "redis", "url": dead, "timeout_ms": 50}
    with run_gateway(_config(upstream, cfg), router=KeywordRouter(["general"])) as url:
        for _ in range(3):
            r = _chat(url)
            assert r.status_code == 200 and r.headers["x-octoroute-cache"] == "bypass"
        r = _chat(url, stream=True)
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
        assert 'octoroute_cache_total{result="error"}' in httpx.get(f"{url}/metrics").text
        assert httpx.get(f"{url}/ready").json()["cache"] is False


def test_key_is_canonical_and_ignores_transport_fields() -> None:
    a = cache_key("p", "ns", "chat", "math", {"messages": MSG, "temperature": 0, "stream": True, "user": "u1"})
    b = cache_key("p", "ns", "chat", "math", {"temperature": 0, "messages": MSG})
    assert a == b
    assert a != cache_key("p", "ns", "chat", "code", {"temperature": 0, "messages": MSG})
    assert a != cache_key("p", "ns", "chat", "math", {"temperature": 0, "messages": MSG, "max_tokens": 5})
    assert a != cache_key("p", "other", "chat", "math", {"temperature": 0, "messages": MSG})


async def test_memory_cache_is_bounded_in_entries_and_bytes() -> None:
    from gateway.cache import MemoryCache
    from gateway.config import CacheConfig

    cache = MemoryCache(CacheConfig(max_entries=3, max_bytes=10_000))
    for i in range(5):
        assert await cache.set(f"k{i}", {"v": i})
    assert [await cache.get(f"k{i}") for i in (0, 1)] == [("miss", None), ("miss", None)]
    assert (await cache.get("k4")) == ("hit", {"v": 4})
    big = {"v": "x" * 4000}
    for i in range(3):
        await cache.set(f"big{i}", big)
    assert cache._bytes <= 10_000 and len(cache._entries) <= 2


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_a_cached_answer_with_several_choices_replays_as_the_same_stream(endpoint: Endpoint) -> None:
    from gateway.answers import Assembler, replay_stream

    def piece(index: int, text: str, finish: str | None = None) -> dict[str, Any]:
        if endpoint == "chat":
            return {"index": index, "delta": {"content": text}, "finish_reason": finish}
        return {"index": index, "text": text, "finish_reason": finish}

    head = {"id": "x", "created": 1, "model": "m"}
    streamed = [{**head, "choices": [piece(i, t, f)]} for i, t, f in
                [(1, "b1 ", None), (0, "a1 ", None), (0, "a2", "stop"), (1, "b2", None), (1, "", "length")]]
    first = Assembler(endpoint)
    for chunk in streamed:
        first.add(chunk)
    assert first.complete
    answer = {**first.response(), "usage": {"total_tokens": 9}}
    texts = [c["message"]["content"] if endpoint == "chat" else c["text"] for c in answer["choices"]]
    assert texts == ["a1 a2", "b1 b2"] and [c["finish_reason"] for c in answer["choices"]] == ["stop", "length"]
    again = Assembler(endpoint)
    events = replay_stream(endpoint, answer, include_usage=True).split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    for event in events[:-2]:
        again.add(orjson.loads(event[len(b"data: "):]))
    assert _without_identity(again.response()) == _without_identity(answer)
    unfinished = Assembler(endpoint)
    unfinished.add(streamed[0])
    assert not unfinished.complete


def test_only_answers_a_replay_rebuilds_field_for_field_are_cacheable() -> None:
    """Every field the API reference lists replays (tool calls, logprobs, reasoning, refusal); an answer with
    any other non-null field, or one that did not finish, is not cached (a replay would silently lose it)."""
    from gateway.answers import replayable

    def chat(**message: Any) -> dict[str, Any]:
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi", **message},
                             "logprobs": None, "finish_reason": "stop"}]}

    assert replayable("chat", chat()) and replayable("chat", chat(tool_calls=[], refusal=None))
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    assert replayable("chat", chat(tool_calls=[call], reasoning_content="because", refusal="no"))
    logprobs = chat()
    logprobs["choices"][0]["logprobs"] = {"content": [{"token": "hi", "logprob": -0.1}], "refusal": None}
    assert replayable("chat", logprobs)
    assert not replayable("chat", chat(audio={"id": "a"})) and not replayable("chat", chat(annotations=[{}]))
    assert not replayable("chat", chat(tool_calls=[{**call, "extra": 1}]))
    odd = chat()
    odd["choices"][0]["logprobs"] = {"content": "not a list"}
    assert not replayable("chat", odd)
    unknown_top = {**chat(), "prompt_filter_results": [{"x": 1}]}
    assert not replayable("chat", unknown_top)
    cut = chat()
    cut["choices"][0]["finish_reason"] = None
    assert not replayable("chat", cut) and not replayable("chat", {"choices": []})


@pytest.fixture(scope="module")
def rich_upstream() -> Iterator[Upstream]:
    with scripted_upstream("general") as up:
        yield up


def _client_view(r: httpx.Response, endpoint: Endpoint, stream: bool) -> dict[str, Any]:
    """Every field a client reads of choice 0, a stream assembled the way the openai SDK does (text joined,
    tool calls merged by index, logprobs lists joined); independent of the gateway's own Assembler."""
    assert r.status_code == 200, r.text
    keys = ("content", "reasoning_content", "refusal", "tool_calls") if endpoint == "chat" else ("text",)
    if not stream:
        choice = r.json()["choices"][0]
        source = choice["message"] if endpoint == "chat" else choice
        return {**{k: source.get(k) for k in keys}, "logprobs": choice.get("logprobs"),
                "finish_reason": choice["finish_reason"]}
    view: dict[str, Any] = {k: None for k in keys} | {"logprobs": None, "finish_reason": None}
    calls: dict[int, dict[str, Any]] = {}
    events = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        for choice in orjson.loads(event)["choices"]:
            delta = choice.get("delta") or {"text": choice.get("text")}
            for k in keys[:3] if endpoint == "chat" else keys:
                if isinstance(delta.get(k), str):
                    view[k] = (view[k] or "") + delta[k]
            for call in delta.get("tool_calls") or ():
                into = calls.setdefault(call["index"], {"function": {"arguments": ""}})
                into |= {k: call[k] for k in ("id", "type") if call.get(k)}
                into["function"]["name"] = (call.get("function") or {}).get("name") or into["function"].get("name")
                into["function"]["arguments"] += (call.get("function") or {}).get("arguments") or ""
            for k, v in (choice.get("logprobs") or {}).items():
                view["logprobs"] = view["logprobs"] or {}
                view["logprobs"][k] = (view["logprobs"].get(k) or []) + v if isinstance(v, list) else \
                    view["logprobs"].get(k)
            view["finish_reason"] = choice.get("finish_reason") or view["finish_reason"]
    if calls:
        view["tool_calls"] = [c for _, c in sorted(calls.items())]
    return view


@pytest.mark.parametrize(("endpoint", "field"), [("chat", "reasoning_content"), ("chat", "tool_calls"),
                                                 ("chat", "logprobs"), ("chat", "refusal"),
                                                 ("completions", "logprobs")])
def test_a_cache_hit_replays_every_field_streamed_or_not(rich_upstream: Upstream, endpoint: Endpoint,
                                                         field: str) -> None:
    """Hit after miss in all four directions (JSON/SSE miss, JSON/SSE hit): the client sees the same answer,
    field for field, as on the miss, with its own id (a streamed reasoning answer used to lose its reasoning)."""
    rich_upstream.control("rich", fields=[field])
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    with run_gateway(_config(rich_upstream, {"backend": "memory"}), router=KeywordRouter(["general"])) as url:
        for n, (first, then) in enumerate([(False, False), (False, True), (True, True), (True, False)]):
            text = f"case {n} of {field}"
            body: dict[str, Any] = ({"messages": [{"role": "user", "content": text}]} if endpoint == "chat"
                                    else {"prompt": text})

            def ask(stream: bool, body: dict[str, Any] = body) -> httpx.Response:
                return httpx.post(f"{url}{path}", timeout=10,
                                  json={"model": "auto", "temperature": 0, "stream": stream, **body})

            miss, hit = ask(first), ask(then)
            assert (miss.headers["x-octoroute-cache"], hit.headers["x-octoroute-cache"]) == ("miss", "hit")
            seen = _client_view(miss, endpoint, first)
            assert seen[field] not in (None, "", []), seen  # the upstream really sent the field
            assert _client_view(hit, endpoint, then) == seen, (first, then)
    rich_upstream.control("ok")
