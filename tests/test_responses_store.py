"""The in-memory store of /v1/responses: TTL, LRU caps, per-key namespaces, the entry size cap."""

from __future__ import annotations

from gateway.config import GatewayConfig, ResponsesConfig
from gateway.endpoints.responses.store import MemoryBackend, ResponseStore


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def entry(tag: object) -> dict[str, object]:
    return {"response": {"id": tag}, "input_items": [], "conversation": []}


def _store(clock: Clock, **caps: int) -> ResponseStore:
    config = ResponsesConfig(**{"ttl_s": 10, "max_entries": 3, "max_bytes": 10_000, **caps})
    return ResponseStore(MemoryBackend(config, clock), "t", config.max_entry_bytes)


async def test_entries_expire_after_the_ttl() -> None:
    clock = Clock()
    store = _store(clock)
    assert await store.put("k", "resp_1", entry(1))
    clock.now = 9.9
    assert await store.get("k", "resp_1") == entry(1)
    clock.now = 10.1
    assert await store.get("k", "resp_1") is None
    assert isinstance(store.backend, MemoryBackend) and store.backend.bytes == 0


async def test_least_recently_used_entries_go_first_past_the_caps() -> None:
    clock = Clock()
    store = _store(clock)
    for i in range(3):
        await store.put("k", f"resp_{i}", entry(i))
    assert await store.get("k", "resp_0") == entry(0)  # now the most recently used
    await store.put("k", "resp_3", entry(3))
    assert await store.get("k", "resp_1") is None
    assert [await store.get("k", f"resp_{i}") for i in (0, 2, 3)] == [entry(0), entry(2), entry(3)]
    small = _store(clock, max_bytes=200)
    for i in range(3):
        await small.put("k", f"resp_{i}", entry("x" * 40))
    assert await small.get("k", "resp_0") is None and await small.get("k", "resp_2") is not None


async def test_namespaces_per_key_and_the_entry_size_cap() -> None:
    store = _store(Clock(), max_entry_bytes=150)
    assert await store.put("key-a", "resp_1", entry(1))
    assert await store.get("key-b", "resp_1") is None and await store.get(None, "resp_1") is None
    assert not await store.delete("key-b", "resp_1")
    assert await store.delete("key-a", "resp_1") and await store.get("key-a", "resp_1") is None
    assert not await store.put("key-a", "resp_2", entry("x" * 100))  # too large: not stored
    assert await store.get("key-a", "resp_2") is None


async def test_entries_of_another_shape_are_absent() -> None:
    store = _store(Clock())
    assert isinstance(store.backend, MemoryBackend)
    for planted in (b"not json", b"[1]", b'{"response": {}}',
                    b'{"response": 1, "input_items": [], "conversation": []}'):
        await store.backend.set(store._key("k", "resp_1"), planted)
        assert await store.get("k", "resp_1") is None


def test_memory_store_when_the_cache_is_not_redis() -> None:
    from gateway.cache import NullCache

    config = GatewayConfig.model_validate({"experts": [{"name": "a", "backend": "vllm", "base_url": "http://x/v1"}],
                                           "cache": {"backend": "none"}, "responses": {"max_entries": 7}})
    store = ResponseStore.build(config, NullCache(config.cache))
    assert isinstance(store.backend, MemoryBackend) and store.backend.config.max_entries == 7
