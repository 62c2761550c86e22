"""Real processes and servers for tests: scripted upstreams (subprocesses) and a gateway on loopback."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.experts import Expert
from gateway.http_limits import uvicorn_config
from router_model import Router

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout_s: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s")


@dataclass
class Upstream:
    """A scripted OpenAI-compatible server in its own process."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def control(self, mode: str = "ok", **kw: Any) -> None:
        httpx.post(f"http://127.0.0.1:{self.port}/_control", json={"mode": mode, **kw}, timeout=5).raise_for_status()

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"http://127.0.0.1:{self.port}/_stats", timeout=5).json()
        return data

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.proc = _spawn_upstream(self.name, self.port)


def _spawn_upstream(name: str, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.scripted_upstream", "--port", str(port), "--name", name],
                            cwd=REPO)
    wait_http(f"http://127.0.0.1:{port}/v1/models", proc=proc)
    return proc


@contextlib.contextmanager
def scripted_upstream(name: str) -> Iterator[Upstream]:
    port = free_port()
    up = Upstream(name, port, _spawn_upstream(name, port))
    try:
        yield up
    finally:
        up.proc.kill()
        up.proc.wait(timeout=10)


def vllm_expert_config(name: str, upstream: Upstream, **extra: Any) -> dict[str, Any]:
    return {"name": name, "backend": "vllm", "base_url": upstream.base_url, **extra}


@contextlib.contextmanager
def run_gateway(config: GatewayConfig | dict[str, Any], router: Router | None = None,
                experts: dict[str, Expert] | None = None) -> Iterator[str]:
    """Serve the gateway with uvicorn on a loopback port in a thread; yields its base URL."""
    if isinstance(config, dict):
        config = GatewayConfig.model_validate(config)
    port = free_port()
    server = uvicorn.Server(uvicorn_config(create_app(config, router=router, experts=experts), config.server,
                                           "127.0.0.1", port, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("gateway did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
