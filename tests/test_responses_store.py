"""The in-memory store of /v1/responses: TTL, LRU caps, per-key namespaces, the entry size cap, bad entries."""

from __future__ import annotations

import pytest

from gateway import cache
from gateway.cache import NullCache
from gateway.config import GatewayConfig
from gateway.endpoints.responses.store import MemoryEntries, ResponseStore


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(cache.time, "monotonic", fake)
    return fake


def entry(tag: object) -> dict[str, object]:
    return {"response": {"id": tag}, "input_items": [], "conversation": []}


def _store(**responses: int) -> ResponseStore:
    config = GatewayConfig.model_validate({
        "experts": [{"name": "a", "backend": "vllm", "base_url": "http://x/v1"}], "cache": {"backend": "none"},
        "responses": {"ttl_s": 10, "max_entries": 3, "max_bytes": 10_000, **responses}})
    return ResponseStore.build(config, NullCache(config.cache))


async def test_entries_expire_after_the_ttl(clock: Clock) -> None:
    store = _store()
    assert isinstance(store.entries, MemoryEntries)  # the cache is off: the store stays in memory
    assert await store.put("k", "resp_1", entry(1))
    clock.now = 9.9
    assert await store.get("k", "resp_1") == entry(1)
    clock.now = 10.1
    assert await store.get("k", "resp_1") is None
    assert not await store.delete("k", "resp_1")


async def test_least_recently_used_entries_go_first_past_the_caps(clock: Clock) -> None:
    store = _store()
    for i in range(3):
        await store.put("k", f"resp_{i}", entry(i))
    assert await store.get("k", "resp_0") == entry(0)  # now the most recently used
    await store.put("k", "resp_3", entry(3))
    assert await store.get("k", "resp_1") is None
    assert [await store.get("k", f"resp_{i}") for i in (0, 2, 3)] == [entry(0), entry(2), entry(3)]
    small = _store(max_bytes=400)
    for i in range(3):
        await small.put("k", f"resp_{i}", entry("x" * 40 + str(i)))
    assert await small.get("k", "resp_0") is None and await small.get("k", "resp_2") is not None


async def test_namespaces_per_key_and_the_entry_size_cap(clock: Clock) -> None:
    store = _store(max_entry_bytes=200)
    assert await store.put("key-a", "resp_1", entry(1))
    assert await store.get("key-b", "resp_1") is None and await store.get(None, "resp_1") is None
    assert not await store.delete("key-b", "resp_1")
    assert await store.delete("key-a", "resp_1") and await store.get("key-a", "resp_1") is None
    assert not await store.put("key-a", "resp_2", entry("x" * 200))  # too large: not stored
    assert await store.get("key-a", "resp_2") is None


async def test_planted_or_foreign_shaped_entries_read_as_absent(clock: Clock) -> None:
    store = _store()
    key = store._key("k", "resp_1")
    unsealed = b'{"response": {}, "input_items": [], "conversation": []}'
    for planted in (b"not json", unsealed, store.entries.sealer.seal({"response": {}})):
        await store.entries._set(key, planted)
        assert await store.get("k", "resp_1") is None
