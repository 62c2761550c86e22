"""1,000 concurrent streaming requests against the gateway as its own process, twice; memory comes back.

Every request must end one of two ways: a 200 stream of well-formed chunks ending in ``[DONE]``, or a
refusal up front (429/503 with ``Retry-After``, OpenAI error body) once an expert's ``max_concurrency``
is reached. No timeouts, no broken streams. Full size (1,000 at once), not scaled down: on 2 shared
cores a burst takes ~10–30 s. The gateway's RSS after the second burst must be close to the RSS after
the first (no per-request leak) and within a bound of the warm baseline.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness import Upstream, scripted_upstream, vllm_expert_config
from tests.reliability.common import GatewayProcess, gateway_process, metric, poll, scrape
from tests.reliability.load import Tally, burst

N = 1000
PER_EXPERT = 200  # max_concurrency of each of the two experts: at most 400 streams admitted at once
MiB = 2**20


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[Upstream, Upstream]]:
    with scripted_upstream("math") as math, scripted_upstream("general") as general:
        for up in (math, general):
            up.control("slow_chunks", delay_s=0.15)  # ~1 s per stream: they really overlap
        yield math, general


@pytest.fixture(scope="module")
def gateway(upstreams: tuple[Upstream, Upstream], tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        GatewayProcess]:
    math, general = upstreams
    cfg = {"experts": [vllm_expert_config("math", math, max_concurrency=PER_EXPERT),
                       vllm_expert_config("general", general, max_concurrency=PER_EXPERT)],
           "default_expert": "general", "fallback_expert": "general", "cache": {"backend": "none"},
           "auth": {"api_keys_env": None}, "logging": {"level": "WARNING"}}
    with gateway_process(cfg, tmp_path_factory.mktemp("load")) as gw:
        yield gw


def _bodies(n: int, round_: int) -> list[dict[str, Any]]:
    prompts = ("solve the equation for x number {i}", "tell me about rivers number {i}")
    return [{"model": "auto", "stream": True, "stream_options": {"include_usage": i % 3 == 0},
             "messages": [{"role": "user", "content": prompts[i % 2].format(i=f"{round_}-{i}")}]}
            for i in range(n)]


def _run(gw: GatewayProcess, n: int, round_: int) -> tuple[Tally, float, int]:
    """One burst; returns the tally, its duration and the gateway's peak RSS during it."""
    peak = gw.rss()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.05):
            peak = max(peak, gw.rss())

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.monotonic()
    try:
        tally = asyncio.run(burst(f"{gw.url}/v1/chat/completions", _bodies(n, round_), timeout_s=90))
    finally:
        done.set()
        sampler.join()
    return tally, time.monotonic() - started, peak


def _idle(gw: GatewayProcess) -> None:
    poll(lambda: metric(scrape(gw.url), "octoroute_in_flight_requests") == 0, 30, "no request in flight")


@pytest.mark.reliability
def test_thousand_concurrent_streams_complete_or_are_refused_and_memory_returns(gateway: GatewayProcess) -> None:
    gw = gateway
    warm, _, _ = _run(gw, 200, 0)
    assert warm.failures == {}, (warm.failures, warm.examples)
    _idle(gw)
    baseline = gw.rss()
    report = []
    after = []
    refused = 0
    for round_ in (1, 2):
        tally, seconds, peak = _run(gw, N, round_)
        _idle(gw)
        time.sleep(0.5)  # let the event loop release buffers of connections closed a moment ago
        after.append(gw.rss())
        report.append(f"round {round_}: {dict(tally.outcomes)} in {seconds:.1f}s, RSS peak {peak / MiB:.1f} "
                      f"after {after[-1] / MiB:.1f} MiB")
        assert tally.failures == {}, (tally.failures, tally.examples)
        assert sum(tally.outcomes.values()) == N
        assert tally.outcomes["ok"] + tally.outcomes["refused"] == N, tally.outcomes
        assert tally.outcomes["ok"] >= 2 * PER_EXPERT, tally.outcomes  # the limits admit at least this many
        assert seconds < 90
        refused += tally.outcomes["refused"]
    text = scrape(gw.url)
    assert metric(text, "octoroute_rejected_total", reason="expert_saturated") == refused
    print(f"\nbaseline RSS {baseline / MiB:.1f} MiB; " + "; ".join(report))
    assert after[1] - after[0] < 16 * MiB, f"RSS kept growing: {[a / MiB for a in after]} MiB"
    assert after[1] - baseline < 64 * MiB, f"RSS {after[1] / MiB:.1f} MiB vs baseline {baseline / MiB:.1f} MiB"
    assert metric(text, "octoroute_in_flight_requests") == 0
