"""SIGTERM with requests longer than ``server.shutdown_grace_s``: they end with an error, the process exits 0.

`tests/test_gateway_process.py` covers the drain (a stream shorter than the grace finishes). Here one
short stream still finishes; a long stream gets an SSE error event at the gateway's drain deadline (not a
silently cut connection) and its upstream call is cancelled; a long non-streamed request gets a 503 with
an OpenAI error body; and the exit is bounded.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from pathlib import Path

import httpx
import orjson
import pytest

from gateway.errors import OpenAIError
from gateway.shutdown import Shutdown, drain_seconds
from tests.harness import scripted_upstream, vllm_expert_config
from tests.reliability.common import ERROR_FIELDS, assert_complete_stream, gateway_process, poll


async def test_the_drain_deadline_ends_waits_begun_before_it_and_refuses_new_ones() -> None:
    shutdown = Shutdown()
    assert await shutdown.before_deadline(asyncio.sleep(0, "fast")) == "fast"
    loop = asyncio.get_running_loop()
    slow = asyncio.ensure_future(shutdown.before_deadline(asyncio.sleep(30)))
    await asyncio.sleep(0.05)
    began = loop.time()
    shutdown.begin(0.5)
    assert shutdown.draining
    with pytest.raises(OpenAIError) as stopped:
        await slow
    assert stopped.value.status == 503 and stopped.value.code == "service_unavailable"
    assert drain_seconds(0.5) <= loop.time() - began < 5
    with pytest.raises(OpenAIError):  # past the deadline a new wait fails at once
        await asyncio.wait_for(shutdown.before_deadline(asyncio.sleep(30)), 5)
    assert drain_seconds(30) == 29 and drain_seconds(1.6) == pytest.approx(1.44) and drain_seconds(0) == 0


@pytest.mark.parametrize("grace_s", [1.6, 0.5])
def test_requests_longer_than_the_grace_end_with_an_error_and_the_process_exits_0(
        tmp_path: Path, grace_s: float) -> None:
    """Fractional graces on purpose: 1.6 s must not become 1 s, and 0.5 s must not become "wait forever"."""
    with scripted_upstream("general") as up, scripted_upstream("slowpoke") as slow:
        up.control("slow_chunks", delay_s=0.25)
        slow.control("slow_first", delay_s=30)
        cfg = {"experts": [vllm_expert_config("general", up), vllm_expert_config("slowpoke", slow)],
               "default_expert": "general",
               "cache": {"backend": "none"}, "auth": {"api_keys_env": None},
               "server": {"shutdown_grace_s": grace_s}}
        with gateway_process(cfg, tmp_path) as gw:
            results: dict[str, bytes] = {}
            errors: dict[str, str] = {}
            statuses: dict[str, int] = {}
            started = {name: threading.Event() for name in ("short", "long")}

            def stream(name: str, words: int) -> None:
                text = " ".join(f"w{i}" for i in range(words))
                body = bytearray()
                try:
                    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", timeout=30, json={
                            "model": "general", "stream": True,
                            "messages": [{"role": "user", "content": text}]}) as r:
                        for chunk in r.iter_raw():
                            body += chunk
                            started[name].set()
                except httpx.HTTPError as exc:  # a cut chunked body may surface as a protocol error
                    errors[name] = type(exc).__name__
                finally:
                    started[name].set()
                    results[name] = bytes(body)

            def unstreamed() -> None:
                r = httpx.post(f"{gw.url}/v1/chat/completions", timeout=60, json={
                    "model": "slowpoke", "messages": [{"role": "user", "content": "take your time"}]})
                results["unstreamed"] = r.content
                statuses["unstreamed"] = r.status_code

            # short: 3 chunks, ~0.75 s, inside a 1.6 s grace; long: 81 chunks, ~20 s, far past any grace;
            # unstreamed: its expert sleeps 30 s before answering
            threads = [threading.Thread(target=stream, args=("short", 2)),
                       threading.Thread(target=stream, args=("long", 80)), threading.Thread(target=unstreamed)]
            for t in threads:
                t.start()
            for event in started.values():
                assert event.wait(15), "streams did not start"
            poll(lambda: up.stats()["requests"] == 2 and slow.stats()["requests"] == 1, 15, "all three upstream calls")
            term = time.monotonic()
            gw.proc.send_signal(signal.SIGTERM)
            code = gw.proc.wait(timeout=grace_s + 15)
            exit_s = time.monotonic() - term
            for t in threads:
                t.join(timeout=15)
                assert not t.is_alive(), "a client stream hangs after the gateway exited"
        assert code == 0, gw.logs()[-2000:]
        assert drain_seconds(grace_s) - 0.3 <= exit_s < grace_s + 5, f"exited {exit_s:.2f}s after SIGTERM"
        if grace_s > 1:
            assert assert_complete_stream(results["short"]) == "general: w0 w1"
        # the long stream got some tokens, then an error event saying why it stopped, and was closed cleanly
        assert "long" not in errors, f"the long stream was cut without an error event: {errors}"
        events = [e for e in results["long"].split(b"\n\n") if e]
        assert len(events) >= 2 and b"[DONE]" not in results["long"], events[-3:]
        assert all(e.startswith(b"data: ") for e in events), events[-3:]
        last = orjson.loads(events[-1][len(b"data: "):])
        assert set(last) == {"error"} and set(last["error"]) == ERROR_FIELDS, last
        assert last["error"]["code"] == "service_unavailable" and "shutting down" in last["error"]["message"], last
        assert "choices" in orjson.loads(events[-2][len(b"data: "):]), "tokens came before the error"
        # the non-streamed request got an OpenAI-shaped 503, not a dropped connection
        assert statuses["unstreamed"] == 503, results.get("unstreamed")
        body = orjson.loads(results["unstreamed"])
        assert set(body["error"]) == ERROR_FIELDS and body["error"]["code"] == "service_unavailable", body
        # the upstream call behind the cut stream was abandoned, not left running
        poll(lambda: up.stats()["cancelled"] >= 1, 5, "the long stream's upstream call cancelled")
        stats = up.stats()
        if grace_s > 1:
            assert (stats["completed"], stats["cancelled"]) == (1, 1), stats
        else:  # the short stream may or may not have made it in 0.5 s; neither call is left running
            assert stats["completed"] + stats["cancelled"] == 2, stats
        logs = gw.logs().replace(" ", "")
        # at 0.5 s the short stream may be stopped too
        assert logs.count('"status":503') in ((2,) if grace_s > 1 else (2, 3)), "stopped requests are logged as 503"
        assert '"status":499' not in logs, "no request was cut without an answer"
