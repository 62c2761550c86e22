"""Measure how often a *healthy* Redis misses the cache's per-call deadline under load, per ``timeout_ms``;
or (``--stall``) what a stalled Redis costs with the cache and the rate limiter on it.

    python -m tests.reliability.redis_deadline [--seconds 10] [--clients 8] [--timeouts 50,100,250]
    python -m tests.reliability.redis_deadline --stall 10 [--clients 8]

A real gateway process (Redis cache, a private redis-server, one scripted upstream), ``--clients`` threads
asking 24 deterministic prompts in a loop (nearly all cache hits); for each deadline the run reports the
lookups that were bypassed (the deadline passed although Redis was up) next to hits and requests per
second. The deadline a Redis call gets is mostly time the call waits for the event loop, not Redis, so the
figure depends on how busy the gateway's core is: docs/reliability.md has the numbers behind the defaults.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import httpx

from tests.harness import scripted_upstream, vllm_expert_config
from tests.reliability.common import gateway_process, metric, private_redis, scrape


def run(timeout_ms: int, seconds: float, clients: int, stall_s: float = 0) -> dict[str, float]:
    with scripted_upstream("general") as up, private_redis() as rds, tempfile.TemporaryDirectory() as tmp:
        cfg = {"experts": [vllm_expert_config("general", up)], "default_expert": "general",
               "logging": {"level": "ERROR"},
               "cache": {"backend": "redis", "url": rds.url, "timeout_ms": timeout_ms, "key_prefix": "m"},
               "auth": {"api_keys_env": "M_KEYS", "rate_limit_per_minute": 10**9} if stall_s else
               {"api_keys_env": None}}
        env = {"M_KEYS": "m-key"}
        with gateway_process(cfg, Path(tmp), env=env) as gw:
            stop, count = threading.Event(), [0] * clients
            latencies: list[tuple[float, float]] = []  # (finished at, seconds)

            def client(n: int) -> None:
                with httpx.Client(timeout=15, headers={"authorization": "Bearer m-key"}) as http:
                    i = n
                    while not stop.is_set():
                        started = time.monotonic()
                        http.post(f"{gw.url}/v1/chat/completions", json={
                            "model": "general", "temperature": 0,
                            "messages": [{"role": "user", "content": f"prompt {i % 24}"}]}).raise_for_status()
                        latencies.append((time.monotonic(), time.monotonic() - started))
                        count[n] += 1
                        i += 1

            threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
            for t in threads:
                t.start()
            time.sleep(seconds)
            paused = time.monotonic()
            if stall_s:
                rds.client().execute_command("CLIENT", "PAUSE", str(int(stall_s * 1000)), "ALL")
                time.sleep(stall_s)
            stop.set()
            for t in threads:
                t.join()
            text = scrape(gw.url)
    if stall_s:
        def phase(lo: float, hi: float) -> dict[str, float]:
            took = sorted(s for at, s in latencies if lo <= at < hi)
            return {"requests_per_s": round(len(took) / (hi - lo), 1), "p50_ms": round(1000 * took[len(took) // 2], 1),
                    "p99_ms": round(1000 * took[len(took) * 99 // 100], 1)}
        return {"timeout_ms": timeout_ms, "healthy": phase(paused - seconds + 1, paused),  # type: ignore[dict-item]
                "stalled": phase(paused, paused + stall_s)}  # type: ignore[dict-item]
    return {"timeout_ms": timeout_ms, "requests_per_s": round(sum(count) / seconds, 1),
            "hit": metric(text, "octoroute_cache_total", result="hit"),
            "bypass": metric(text, "octoroute_cache_total", result="bypass"),
            "redis_errors": metric(text, "octoroute_cache_total", result="error")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--timeouts", default="50,100,250")
    ap.add_argument("--stall", type=float, default=0, help="pause Redis this long after --seconds of traffic")
    args = ap.parse_args()
    for timeout_ms in (int(t) for t in args.timeouts.split(",")):
        print(run(timeout_ms, args.seconds, args.clients, args.stall), flush=True)


if __name__ == "__main__":
    main()
