"""A light asyncio load client (aiohttp) that classifies every response; shared by the load and soak runs.

Outcomes: ``ok`` (200 and a well-formed stream ending in ``[DONE]``, or a 200 JSON completion), ``refused``
(429/503 up front, with ``Retry-After`` and an OpenAI error body), ``client_error`` (an expected 4xx with an
OpenAI error body), ``upstream_error`` (an OpenAI-shaped 5xx, or a stream that ends in an OpenAI error
event), and the failures: ``bad_stream``, ``bad_error``, ``timeout``, ``exception``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from tests.reliability.common import assert_complete_stream, assert_error_stream, assert_openai_error

FAILURES = ("bad_stream", "bad_error", "timeout", "exception", "unexpected_status")


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # first example of each failure
    latencies: dict[str, list[float]] = field(default_factory=dict)  # by outcome

    def add(self, outcome: str, detail: str = "", seconds: float | None = None) -> None:
        self.outcomes[outcome] += 1
        if outcome in FAILURES and outcome not in self.examples:
            self.examples[outcome] = detail[:500]
        if seconds is not None:
            self.latencies.setdefault(outcome, []).append(seconds)

    @property
    def failures(self) -> dict[str, int]:
        return {k: v for k, v in self.outcomes.items() if k in FAILURES}

    def percentiles_ms(self, *qs: float) -> dict[str, dict[str, float]]:
        """Latency percentiles per outcome, in milliseconds."""
        out = {}
        for outcome, values in sorted(self.latencies.items()):
            ordered = sorted(values)
            out[outcome] = {f"p{round(q * 100)}": round(ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000, 1)
                            for q in qs}
        return out


def session(limit: int = 0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, force_close=False),
                                 timeout=aiohttp.ClientTimeout(total=None))


async def request(client: aiohttp.ClientSession, url: str, body: dict[str, Any], tally: Tally,
                  timeout_s: float = 60, headers: dict[str, str] | None = None, expect_4xx: bool = False,
                  hang_up_after: int | None = None) -> None:
    """One request, classified into ``tally``. ``hang_up_after``: read that many bytes, then disconnect."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout_s), client.post(url, data=orjson.dumps(body), headers={
                "content-type": "application/json", **(headers or {})}) as resp:
            if hang_up_after is not None and resp.status == 200:
                await resp.content.read(hang_up_after)
                resp.close()  # drop the connection mid-answer
                tally.add("hung_up", seconds=time.monotonic() - started)
                return
            raw = await resp.read()
            status = resp.status
            retry_after = resp.headers.get("retry-after")
    except TimeoutError:
        tally.add("timeout", f"{body!r}")
        return
    except (aiohttp.ClientError, OSError) as exc:
        tally.add("exception", f"{type(exc).__name__}: {exc}")
        return
    elapsed = time.monotonic() - started
    try:
        if status == 200 and body.get("stream"):
            if b'"error"' in raw:
                assert_error_stream(raw)
                tally.add("upstream_error", seconds=elapsed)
            else:
                assert_complete_stream(raw)
                tally.add("ok", seconds=elapsed)
            return
        if status == 200:
            assert orjson.loads(raw)["choices"]
            tally.add("ok", seconds=elapsed)
            return
        assert_openai_error(orjson.loads(raw))
    except (AssertionError, orjson.JSONDecodeError, KeyError, TypeError) as exc:
        tally.add("bad_stream" if status == 200 else "bad_error", f"{status}: {exc}: {raw[-300:]!r}")
        return
    if status in (429, 503):
        if retry_after is None or not retry_after.isdigit():
            tally.add("bad_error", f"{status} without Retry-After")
        else:
            tally.add("refused", seconds=elapsed)
    elif 400 <= status < 500 and expect_4xx:
        tally.add("client_error", seconds=elapsed)
    elif status >= 500:
        tally.add("upstream_error", seconds=elapsed)
    else:
        tally.add("unexpected_status", f"{status}: {raw[:300]!r}")


async def burst(url: str, bodies: list[dict[str, Any]], timeout_s: float = 60) -> Tally:
    """All requests at once (one connection each), every one bounded by ``timeout_s``."""
    tally = Tally()
    async with session() as client:
        await asyncio.gather(*(request(client, url, b, tally, timeout_s) for b in bodies))
    return tally
