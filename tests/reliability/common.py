"""Shared pieces of the reliability suite: the gateway as a process, a private Redis, SSE checks, polling."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
import redis
import yaml

from tests.harness import REPO, free_port, wait_http

T = TypeVar("T")
ERROR_FIELDS = {"message", "type", "param", "code"}


def poll(check: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.05) -> T:
    """Call ``check`` until it returns something truthy; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for: {what} (last value {value!r})")
        time.sleep(interval_s)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (Prometheus text format)."""
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def scrape(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=10).text


def assert_openai_error(body: Any) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}`` with a non-empty message and a string type."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err, dict) and set(err) == ERROR_FIELDS, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], str), err
    return dict(err)


def sse_events(raw: str | bytes) -> list[bytes]:
    """The ``data:`` payloads of an SSE body; asserts every non-blank line is a ``data:`` line."""
    text = raw.encode() if isinstance(raw, str) else raw
    events = []
    for line in text.split(b"\n"):
        if not line.strip():
            continue
        assert line.startswith(b"data: "), f"not an SSE data line: {line[:200]!r}"
        events.append(line[6:])
    return events


def assert_complete_stream(raw: str | bytes) -> str:
    """A well-formed successful stream: JSON chunks, one finish_reason, no error, ``[DONE]`` last.

    Returns the streamed text (chat deltas or completion text)."""
    events = sse_events(raw)
    assert events and events[-1] == b"[DONE]", f"stream does not end with [DONE]: {raw[-300:]!r}"
    assert b"[DONE]" not in events[:-1]
    text, finishes = "", []
    for payload in events[:-1]:
        chunk = orjson.loads(payload)
        assert "error" not in chunk, chunk
        for choice in chunk.get("choices") or ():
            text += (choice.get("delta") or {}).get("content") or choice.get("text") or ""
            if choice.get("finish_reason"):
                finishes.append(choice["finish_reason"])
    assert len(finishes) == 1, finishes
    return text


def assert_error_stream(raw: str | bytes) -> dict[str, Any]:
    """A stream that broke off: its last event is an OpenAI-shaped error, and there is no ``[DONE]``."""
    events = sse_events(raw)
    assert events, "empty stream"
    assert b"[DONE]" not in events, "a failed stream must not end with [DONE]"
    for payload in events[:-1]:
        assert "error" not in orjson.loads(payload)
    return assert_openai_error(orjson.loads(events[-1]))


# -- the gateway as its own process -------------------------------------------------------------------------


@dataclass
class GatewayProcess:
    """``python -m gateway serve --config FILE``; stderr (the JSON logs) goes to ``log_path``."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> int:
        return rss_bytes(self.proc.pid)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout_s: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)


@contextlib.contextmanager
def gateway_process(config: dict[str, Any], workdir: Path, env: dict[str, str] | None = None) -> Iterator[
        GatewayProcess]:
    port = free_port()
    config = {**config, "server": {**config.get("server", {}), "port": port}}
    config.setdefault("router", {"kind": "keyword"})
    path = workdir / f"gateway-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = workdir / f"gateway-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(path)], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    gw = GatewayProcess(proc, port, log_path)
    try:
        try:
            wait_http(f"{gw.url}/health", timeout_s=60, proc=proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}; gateway output:\n{gw.logs()[-3000:]}") from None
        yield gw
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


# -- a private Redis ------------------------------------------------------------------------------------------


REDIS_SERVER = shutil.which("redis-server")


class RedisServer:
    """A private ``redis-server`` on a free loopback port, to kill, restart and slow down at will."""

    def __init__(self) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not installed")
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> None:
        assert REDIS_SERVER is not None
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--loglevel", "warning", "--enable-debug-command", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up() -> bool:
            try:
                return bool(self.client().ping())
            except redis.RedisError:
                return False

        poll(up, 10, f"redis-server on port {self.port}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.kill()
        self.start()


@contextlib.contextmanager
def private_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.kill()
