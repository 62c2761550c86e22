"""Gateway overhead benchmark: the same fast upstream called directly and through the gateway, one run.

    python -m tests.benchmarks.gateway_bench [--seconds 5] [--router bundled|keyword] [--json OUT]

Starts the scripted upstream (tests/scripted_upstream.py) and ``octoroute serve`` as separate
processes on loopback, then drives both with a minimal keep-alive HTTP/1.1 client (asyncio streams;
a heavier client would be the bottleneck on 2 cores). Reports, for non-streaming and streaming:
added p50/p99 latency at concurrency 1, and requests/s at concurrency 32, on a cache miss
(every prompt unique, so the router runs for every request) and on a cache hit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import yaml

from tests.harness import REPO, free_port, wait_http


class Conn:
    """One keep-alive HTTP/1.1 connection; understands Content-Length and chunked bodies."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, path: str, body: bytes) -> bytes:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json"
                          b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        if b"transfer-encoding: chunked" in lower:
            out = bytearray()
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                out += chunk[:-2]
            data = bytes(out)
        else:
            start = lower.index(b"content-length:") + 15
            length = int(lower[start: lower.index(b"\r\n", start)])
            data = await self.reader.readexactly(length)
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {data[:200]!r}")
        return data


def _body(stream: bool, unique: int | None) -> bytes:
    text = "Compute the derivative of x^3 + 2x" if unique is None else f"Compute the derivative of x^{unique} + 2x"
    return orjson.dumps({"model": "auto", "temperature": 0, "stream": stream, "max_tokens": 16,
                         "messages": [{"role": "user", "content": text}]})


async def latency(port: int, path: str, stream: bool, n: int, unique_from: int | None) -> list[float]:
    conn = Conn("127.0.0.1", port)
    samples = []
    for i in range(n):
        body = _body(stream, None if unique_from is None else unique_from + i)
        t = time.perf_counter()
        await conn.request(path, body)
        samples.append((time.perf_counter() - t) * 1000)
    return samples


async def throughput(port: int, path: str, stream: bool, seconds: float, unique_from: int | None,
                     concurrency: int = 32) -> float:
    counter = [0]
    stop = time.perf_counter() + seconds
    next_id = [unique_from or 0]

    async def worker() -> None:
        conn = Conn("127.0.0.1", port)
        while time.perf_counter() < stop:
            uid = None
            if unique_from is not None:
                uid = next_id[0]
                next_id[0] += 1
            await conn.request(path, _body(stream, uid))
            counter[0] += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counter[0] / (time.perf_counter() - started)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


async def run(args: argparse.Namespace, upstream_port: int, gateway_port: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    unique = 10_000_000
    path = "/v1/chat/completions"
    for stream in (False, True):
        kind = "stream" if stream else "json"
        await latency(upstream_port, path, stream, 50, None)  # warm-up
        await latency(gateway_port, path, stream, 50, unique)
        unique += 1000
        direct = await latency(upstream_port, path, stream, args.n, None)
        miss = await latency(gateway_port, path, stream, args.n, unique)
        unique += args.n
        await latency(gateway_port, path, stream, 1, None)  # fill the cache for the hit runs
        hit = await latency(gateway_port, path, stream, args.n, None)
        results[kind] = {
            "direct_p50_ms": statistics.median(direct), "direct_p99_ms": pct(direct, 99),
            "added_p50_ms_miss": statistics.median(miss) - statistics.median(direct),
            "added_p99_ms_miss": pct(miss, 99) - pct(direct, 99),
            "added_p50_ms_hit": statistics.median(hit) - statistics.median(direct),
            "rps_direct_c32": await throughput(upstream_port, path, stream, args.seconds, None),
            "rps_miss_c32": await throughput(gateway_port, path, stream, args.seconds, unique),
            "rps_hit_c32": await throughput(gateway_port, path, stream, args.seconds, None),
        }
        unique += 1_000_000
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each throughput run")
    ap.add_argument("--n", type=int, default=500, help="requests per latency run")
    ap.add_argument("--router", choices=["bundled", "keyword"], default="bundled")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    upstream_port, gateway_port = free_port(), free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = {
            "server": {"port": gateway_port},
            "router": {"kind": "functional_token" if args.router == "bundled" else "keyword"},
            "experts": [{"name": n, "backend": "vllm", "base_url": f"http://127.0.0.1:{upstream_port}/v1",
                         "max_concurrency": 256} for n in ("legal", "finance", "math", "code", "general")],
            "cache": {"backend": "memory"},
            "logging": {"level": "WARNING"},
        }
        config_path = Path(tmp) / "bench.yaml"
        config_path.write_text(yaml.safe_dump(config))
        try:
            procs.append(subprocess.Popen([sys.executable, "-m", "tests.scripted_upstream", "--port",
                                           str(upstream_port), "--name", "bench"], cwd=REPO, env=env))
            procs.append(subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config_path)],
                                          cwd=REPO, env=env))
            wait_http(f"http://127.0.0.1:{upstream_port}/v1/models", proc=procs[0])
            wait_http(f"http://127.0.0.1:{gateway_port}/health", timeout_s=120, proc=procs[1])
            results = asyncio.run(run(args, upstream_port, gateway_port))
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=30)
    results["setup"] = {"router": args.router, "cpus": os.cpu_count(), "seconds": args.seconds, "n": args.n,
                        "python": sys.version.split()[0]}
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
