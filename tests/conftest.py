"""Shared fixtures. Redis is the machine's real server at 127.0.0.1:6379 (key prefix per test)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A fresh key prefix on the real Redis; its keys are deleted afterwards."""
    prefix = f"octotest-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


# ---- demo experts and a real vLLM server --------------------------------------------------------------


@pytest.fixture(scope="session")
def demo_experts_dir() -> Path:
    """The five demo experts, built on first use (~1.5 min on one free core) and then reused across
    sessions until their recipe version changes. Set OCTOROUTE_HOME to build elsewhere."""
    from gateway.config import DEFAULT_DEMO_DIR
    from gateway.experts.demo import ensure_demo_experts

    return ensure_demo_experts(DEFAULT_DEMO_DIR)


@pytest.fixture(scope="session")
def vllm_expert(demo_experts_dir: Path) -> Iterator[tuple[str, str, Path]]:
    """A real vLLM server (CPU, bf16) serving the ``math`` demo expert: (base_url, served_name, model_dir).

    base_url has no ``/v1``. The server is pinned to this process's last allowed core.
    """
    from tests.harness import free_port
    from tests.vllm_server import VllmServer

    model_dir = demo_experts_dir / "math"
    server = VllmServer(model_dir, free_port(), "math", cpu_core=max(os.sched_getaffinity(0)))
    with server as base_url:
        print(f"\nvLLM ready in {server.ready_s:.1f}s, RSS {server.rss_bytes() / 2**30:.2f} GiB")
        yield base_url, "math", model_dir
