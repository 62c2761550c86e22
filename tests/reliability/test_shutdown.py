"""SIGTERM with a stream longer than ``server.shutdown_grace_s``: it is cut at the deadline, the process exits 0.

`tests/test_gateway_process.py` covers the drain (a stream shorter than the grace finishes). Here one
short stream still finishes, a long one is cut, its upstream call is cancelled, and the exit is bounded.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.harness import scripted_upstream, vllm_expert_config
from tests.reliability.common import assert_complete_stream, gateway_process, poll


@pytest.mark.parametrize("grace_s", [1.6, 0.5])
def test_stream_longer_than_the_grace_is_cut_and_the_process_still_exits_0(tmp_path: Path, grace_s: float) -> None:
    """Fractional graces on purpose: 1.6 s must not become 1 s, and 0.5 s must not become "wait forever"."""
    with scripted_upstream("general") as up:
        up.control("slow_chunks", delay_s=0.25)
        cfg = {"experts": [vllm_expert_config("general", up)], "default_expert": "general",
               "cache": {"backend": "none"}, "auth": {"api_keys_env": None},
               "server": {"shutdown_grace_s": grace_s}}
        with gateway_process(cfg, tmp_path) as gw:
            results: dict[str, bytes] = {}
            errors: dict[str, str] = {}
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

            # short: 3 chunks, ~0.75 s, inside a 1.6 s grace; long: 81 chunks, ~20 s, far past any grace
            threads = [threading.Thread(target=stream, args=("short", 2)),
                       threading.Thread(target=stream, args=("long", 80))]
            for t in threads:
                t.start()
            for event in started.values():
                assert event.wait(15), "streams did not start"
            assert up.stats()["requests"] == 2
            term = time.monotonic()
            gw.proc.send_signal(signal.SIGTERM)
            code = gw.proc.wait(timeout=grace_s + 15)
            exit_s = time.monotonic() - term
            for t in threads:
                t.join(timeout=15)
                assert not t.is_alive(), "a client stream hangs after the gateway exited"
        assert code == 0, gw.logs()[-2000:]
        assert grace_s - 0.3 <= exit_s < grace_s + 5, f"exited {exit_s:.2f}s after SIGTERM (grace {grace_s}s)"
        if grace_s > 1:
            assert assert_complete_stream(results["short"]) == "general: w0 w1"
        assert b"[DONE]" not in results["long"], "the long stream cannot have finished"
        assert results["long"].startswith(b"data: "), results["long"][:200]
        # the upstream call behind the cut stream was abandoned, not left running
        poll(lambda: up.stats()["cancelled"] >= 1, 5, "the long stream's upstream call cancelled")
        stats = up.stats()
        if grace_s > 1:
            assert (stats["completed"], stats["cancelled"]) == (1, 1), stats
        else:  # the short stream may or may not have made it in 0.5 s; neither call is left running
            assert stats["completed"] + stats["cancelled"] == 2, stats
        logs = gw.logs()
        assert '"status":499' in logs.replace(" ", ""), "the cut stream is logged as 499 (client saw no answer)"
