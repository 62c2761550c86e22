"""Soak: a mixed workload against ``octoroute serve`` for minutes, watching the gateway's memory.

    python -m tests.benchmarks.soak [--seconds 300] [--workers 24] [--json OUT]

Starts four scripted upstreams (``math`` and ``general`` healthy, ``broken`` answering 500, ``flaky`` dying
after two chunks) and the gateway as its own process (memory cache, keyword router, no fallback, so
errors reach the client), then runs ``--workers`` clients in a loop until the time is up. The mix, by
request number: unique streams, unique JSON completions, repeated deterministic questions (cache hits,
streamed and not), mid-stream upstream deaths, 5xx from an expert (then 503 while its breaker is open),
bad requests (unknown field, unknown model) and clients that hang up mid-stream.

Prints JSON: duration, requests, outcomes (``errors`` by kind: the failures, which must be zero), requests
per second, latency p50/p99 by outcome, and the gateway's RSS at start (after a warm-up), peak and end, sampled every
0.5 s. ``tests/reliability/test_soak.py`` runs it for 30 s in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from tests.harness import scripted_upstream, vllm_expert_config
from tests.reliability.common import gateway_process, metric, poll, scrape
from tests.reliability.load import Tally, request, session

MiB = 2**20


def _plan(i: int, worker: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The i-th request of a worker: (body, request() keyword arguments)."""
    n = i * 1000 + worker
    kind = i % 20
    math_q = f"solve the equation number {n}"
    if kind in (0, 1, 2, 3, 4):  # unique streams (cache miss, or bypass: no temperature)
        return {"model": "auto", "stream": True, "messages": [{"role": "user", "content": math_q}]}, {}
    if kind in (5, 6):  # unique non-streaming
        return {"model": "auto", "messages": [{"role": "user", "content": f"rivers of the world {n}"}]}, {}
    if kind in (7, 8, 9, 10, 11):  # repeated deterministic questions: cache hits after the first
        return {"model": "auto", "temperature": 0, "stream": kind % 2 == 0,
                "messages": [{"role": "user", "content": f"name colour {n % 16}"}]}, {}
    if kind in (12, 13):  # the expert dies mid-stream: an OpenAI error event, stream closed
        return {"model": "flaky", "stream": True, "messages": [{"role": "user", "content": math_q}]}, {}
    if kind == 14:  # expert answers 500 (then the breaker opens: 503 + Retry-After)
        return {"model": "broken", "messages": [{"role": "user", "content": math_q}]}, {}
    if kind == 15:
        return {"model": "auto", "messages": [{"role": "user", "content": "x"}], "frobnicate": 1}, {
            "expect_4xx": True}
    if kind == 16:
        return {"model": "gpt-nope", "messages": [{"role": "user", "content": "x"}]}, {"expect_4xx": True}
    if kind in (17, 18):  # a client that hangs up after the first bytes of a slow stream
        return {"model": "general", "stream": True, "messages": [{"role": "user", "content": math_q}]}, {
            "hang_up_after": 64}
    return {"model": "auto", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"a short story {n}"}]}, {}


async def _drive(url: str, seconds: float, workers: int, max_requests: int) -> Tally:
    tally = Tally()
    deadline = time.monotonic() + seconds
    sent = 0

    async def worker(w: int) -> None:
        nonlocal sent
        i = 0
        async with session(limit=1) as client:
            while time.monotonic() < deadline and sent < max_requests:
                sent += 1
                body, kw = _plan(i, w)
                await request(client, f"{url}/v1/chat/completions", body, tally, timeout_s=30, **kw)
                i += 1

    await asyncio.gather(*(worker(w) for w in range(workers)))
    return tally


def run(seconds: float = 300, workers: int = 24, max_requests: int = 2_000_000,
        workdir: Path | None = None) -> dict[str, Any]:
    with ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="octoroute-soak-")))
        ups = {name: stack.enter_context(scripted_upstream(name)) for name in ("math", "general", "broken", "flaky")}
        ups["broken"].control("fail", status=500)
        ups["flaky"].control("die_after", chunks=2)
        ups["general"].control("slow_chunks", delay_s=0.05)  # streams long enough to hang up in the middle
        cfg = {"experts": [vllm_expert_config("math", ups["math"]),
                           vllm_expert_config("general", ups["general"]),
                           vllm_expert_config("broken", ups["broken"], retries=0,
                                              breaker={"failure_threshold": 3, "reset_after_s": 2}),
                           vllm_expert_config("flaky", ups["flaky"], breaker={"failure_threshold": 1_000_000})],
               "default_expert": "general", "cache": {"backend": "memory", "max_entries": 2000},
               "auth": {"api_keys_env": None}, "logging": {"level": "WARNING"}}
        gw = stack.enter_context(gateway_process(cfg, workdir))

        warm = asyncio.run(_drive(gw.url, min(5.0, seconds / 8), workers, max_requests))
        poll(lambda: metric(scrape(gw.url), "octoroute_in_flight_requests") == 0, 30, "idle after warm-up")
        samples: list[tuple[float, int]] = [(0.0, gw.rss())]
        done = threading.Event()
        started = time.monotonic()

        def sample() -> None:
            while not done.wait(0.5):
                samples.append((time.monotonic() - started, gw.rss()))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            tally = asyncio.run(_drive(gw.url, seconds, workers, max_requests))
        finally:
            done.set()
            sampler.join()
        duration = time.monotonic() - started
        poll(lambda: metric(scrape(gw.url), "octoroute_in_flight_requests") == 0, 30, "idle after the soak")
        end_rss = gw.rss()
        text = scrape(gw.url)
        code = gw.terminate()
    rss = [r for _, r in samples]
    third = [r for t, r in samples if t >= duration / 3]
    return {
        "duration_s": round(duration, 1),
        "workers": workers,
        "requests": sum(tally.outcomes.values()),
        "warmup_requests": sum(warm.outcomes.values()),
        "outcomes": dict(tally.outcomes),
        "errors": tally.failures,
        "error_examples": tally.examples,
        "requests_per_s": round(sum(tally.outcomes.values()) / duration, 1),
        "latency_ms": tally.percentiles_ms(0.5, 0.99),
        "rss_mib": {"start": round(rss[0] / MiB, 1), "peak": round(max(rss) / MiB, 1),
                    "at_one_third": round((third[0] if third else rss[-1]) / MiB, 1),
                    "end": round(end_rss / MiB, 1)},
        "gateway": {"cache_hits": metric(text, "octoroute_cache_total", result="hit"),
                    "upstream_errors": metric(text, "octoroute_upstream_errors_total"),
                    "rejected_breaker_open": metric(text, "octoroute_rejected_total", reason="breaker_open"),
                    "status_499": metric(text, "octoroute_requests_total", status="499"),
                    "exit_code": code},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--workers", type=int, default=24)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    result = run(args.seconds, args.workers)
    out = json.dumps(result, indent=2)
    print(out)
    if args.json:
        Path(args.json).write_text(out)
    return 0 if not result["errors"] and result["gateway"]["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
