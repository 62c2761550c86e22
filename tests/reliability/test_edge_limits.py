"""Hostile clients at the HTTP edge (issue 18 #1, #6, #7): oversized heads, slowloris, a 500 on a kept-alive
connection, client-chosen metric labels. Real gateway processes (or uvicorn in a thread) on loopback."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from router_model import KeywordRouter
from router_model.interface import RouteResult
from tests.harness import Upstream, run_gateway, scripted_upstream, vllm_expert_config
from tests.reliability.common import GatewayProcess, assert_openai_error, gateway_process

MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with scripted_upstream("general") as up:
        yield up


@pytest.fixture(scope="module")
def gateway(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    config = {"experts": [vllm_expert_config("general", upstream)], "default_expert": "general",
              "cache": {"backend": "none"}, "server": {"read_timeout_s": 1.5}}
    with gateway_process(config, tmp_path_factory.mktemp("edge")) as gw:
        yield gw


def _connect(gw: GatewayProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gw.port), timeout=10)


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body (what the gateway sends outside streams)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head: {data[:200]!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-body")
        rest += chunk
    return int(lines[0].split()[1]), headers, rest[:length]


def _closed_within(sock: socket.socket, timeout_s: float) -> bool:
    sock.settimeout(timeout_s)
    try:
        while sock.recv(65536):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


@contextlib.contextmanager
def _health_latencies(gw: GatewayProcess) -> Iterator[list[float]]:
    """Probe /health from another client every 20 ms while the body of the ``with`` runs."""
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                started = time.perf_counter()
                client.get(f"{gw.url}/health").raise_for_status()
                latencies.append(time.perf_counter() - started)
                time.sleep(0.02)

    thread = threading.Thread(target=probe)
    thread.start()
    try:
        yield latencies
    finally:
        stop.set()
        thread.join(timeout=60)


def test_a_100_mb_header_is_refused_with_431_and_stalls_nobody(gateway: GatewayProcess) -> None:
    """Before: 200 after 11.8 s, the event loop busy for 11 CPU-s, other clients delayed by up to 8.5 s."""
    with _health_latencies(gateway) as latencies:
        time.sleep(0.2)
        sock = _connect(gateway)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Big: ")
        started, sent, answer = time.perf_counter(), 0, b""
        chunk = b"a" * 2**20
        with contextlib.suppress(OSError):
            while sent < 100 * 2**20:
                sock.sendall(chunk)
                sent += len(chunk)
                if select.select([sock], [], [], 0)[0]:
                    break
            answer = sock.recv(65536)
        elapsed = time.perf_counter() - started
        sock.close()
        time.sleep(0.3)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert_openai_error(orjson.loads(answer.partition(b"\r\n\r\n")[2]))
    assert elapsed < 5, elapsed
    assert latencies and max(latencies) < 1.0, max(latencies)


@pytest.mark.parametrize(("request_head", "status"), [
    (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: 1\r\n" % i for i in range(200)) + b"\r\n", 431),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 40_000 + b"\r\n\r\n", 431),
    (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"c" * 900) for i in range(40))
     + b"\r\n", 431),
    (b"GET /v1/models?" + b"q" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
])
def test_oversized_heads_are_refused(gateway: GatewayProcess, request_head: bytes, status: int) -> None:
    sock = _connect(gateway)
    sock.sendall(request_head)
    code, headers, body = _read_response(sock)
    assert code == status and headers["connection"] == "close"
    assert_openai_error(orjson.loads(body))
    assert _closed_within(sock, 3)
    sock.close()
    assert httpx.get(f"{gateway.url}/health").status_code == 200


@pytest.mark.parametrize("what", ["silent connection", "slow head", "slow body", "slow second request"])
def test_slow_clients_get_408_at_the_read_deadline(gateway: GatewayProcess, what: str) -> None:
    """server.read_timeout_s (1.5 s here) bounds the time to receive a request; before, >= 45 s."""
    sock = _connect(gateway)
    if what == "slow second request":  # on a kept-alive connection, after a first request was answered
        sock.sendall(_raw("GET", "/health"))
        assert _read_response(sock)[0] == 200
        what = "slow head"
    started = time.perf_counter()
    if what == "slow body":
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"model\"")
    code = None
    with contextlib.suppress(OSError):
        for i in range(40):
            if what == "slow head":
                sock.sendall(b"GET /health HTTP/1.1\r\n" if i == 0 else b"X")
            if select.select([sock], [], [], 0.25)[0]:
                code, _, body = _read_response(sock)
                break
    elapsed = time.perf_counter() - started
    assert code == 408, what
    assert_openai_error(orjson.loads(body))
    assert 1.2 < elapsed < 4, elapsed
    assert _closed_within(sock, 3)
    sock.close()


def test_requests_within_the_limits_keep_working(gateway: GatewayProcess) -> None:
    headers = {f"x-h{i}": "v" * 100 for i in range(50)}
    r = httpx.post(f"{gateway.url}/v1/chat/completions?{'q' * 4000}", headers=headers, timeout=10,
                   json={"model": "general", "messages": MSG})
    assert r.status_code == 200, r.text
    with httpx.Client(timeout=10) as client:  # a kept-alive connection is not cut by the read deadline
        for _ in range(3):
            assert client.get(f"{gateway.url}/health").status_code == 200
            time.sleep(0.6)


# -- an unhandled error keeps the connection ---------------------------------------------------------------

class BrokenRouter(KeywordRouter):
    """Raises on "boom": a bug the gateway did not foresee (an unhandled exception, not an OpenAIError)."""

    def route_batch(self, conversations: Sequence[Any]) -> list[RouteResult]:
        if any("boom" in str(conv) for conv in conversations):
            raise RuntimeError("router bug: secret internals /opt/model.bin")
        return super().route_batch(conversations)


def _raw(method: str, path: str, body: dict[str, Any] | None = None) -> bytes:
    data = orjson.dumps(body) if body is not None else b""
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def test_a_500_answers_in_openai_shape_and_keeps_the_connection(upstream: Upstream) -> None:
    """Before: the 500 closed the client's keep-alive connection, and the next request on it failed 30/30."""
    config = {"experts": [vllm_expert_config("general", upstream)], "cache": {"backend": "none"}}
    with run_gateway(config, router=BrokenRouter(["general"])) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            boom = [{"role": "user", "content": "boom"}]
            for path, body in (("/v1/route", {"messages": boom}), ("/v1/chat/completions", {"model": "auto",
                                                                                           "messages": boom})):
                sock.sendall(_raw("POST", path, body))
                status, headers, body = _read_response(sock)
                assert status == 500 and headers.get("connection") != "close", path
                err = assert_openai_error(orjson.loads(body))
                assert err["type"] == "server_error" and "secret" not in body.decode(), body
                assert headers["x-request-id"]
            ok = 0
            for i in range(30):
                sock.sendall(_raw("POST", "/v1/chat/completions", {"model": "general", "messages": MSG})
                             if i % 2 else _raw("GET", "/health"))
                status, _, _ = _read_response(sock)
                ok += status == 200
            assert ok == 30


# -- metric labels ------------------------------------------------------------------------------------------

def test_client_chosen_model_names_do_not_grow_metrics(gateway: GatewayProcess) -> None:
    """Before: 2,000 distinct unknown model names made 2,000 series (/metrics 16 KB -> 1.41 MB)."""
    with httpx.Client(timeout=10) as client:
        for i in range(20):  # every label value the test can reach exists before the baseline
            client.post(f"{gateway.url}/v1/chat/completions", json={"model": f"warm-{i}", "messages": MSG})
            client.post(f"{gateway.url}/v1/completions", json={"model": f"warm-{i}", "prompt": "x"})
        before = client.get(f"{gateway.url}/metrics").text
        for i in range(1000):
            r = client.post(f"{gateway.url}/v1/chat/completions", json={"model": f"bogus-{i}", "messages": MSG})
            assert r.status_code == 404
            client.post(f"{gateway.url}/v1/completions", json={"model": f"bogus-c{i}", "prompt": "x"})
        after = client.get(f"{gateway.url}/metrics").text
    series = [line for line in after.splitlines() if line and not line.startswith("#")]
    assert len(series) == len([line for line in before.splitlines() if line and not line.startswith("#")])
    assert "bogus" not in after and "warm" not in after
    assert 'model="other"' in after and len(after) < len(before) + 2000


def test_closed_counter_keeps_known_names(tmp_path: Path) -> None:
    from gateway.metrics import Metrics

    metrics = Metrics()
    metrics.set_models(["auto", "general"])
    metrics.requests.labels("general", "general", "chat", "200").inc()
    metrics.requests.labels(expert="none", model="made-up", endpoint="chat", status="404").inc()
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    assert 'model="general"' in text and 'model="other"' in text and "made-up" not in text
